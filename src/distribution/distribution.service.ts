/**
 * Key distribution, assembled: metrics (always, so the outbox depth is visible even with the
 * publisher off), the acknowledgement handler, the message builder, the publisher (only with
 * MQTT_URL), and the per-device read model behind GET /v1/devices/{deviceId}/distribution.
 *
 * Nothing here touches the database until it is used (the OpenAPI generator builds the app
 * with inert parts).
 */
import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import type { AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import { NotFoundError } from '../http/errors.js';
import type { KeyMaterial } from '../keys/key-material.js';
import { createAckService, type AckService } from './ack.service.js';
import { createDistributionKeys } from './distribution.keys.js';
import { createDistributionMetrics, type DistributionMetrics } from './distribution.metrics.js';
import * as repo from './distribution.repository.js';
import { distributionDb, type DistributionDB } from './distribution.tables.js';
import { createMessageBuilder } from './message.builder.js';
import type { MqttConfig } from './mqtt.config.js';
import { createKeyPublisher, type KeyPublisher, type PublisherTuning } from './publisher.js';

export interface DeviceDistributionView {
  deviceId: string;
  acknowledged: Array<{ kind: 'device' | 'field'; field?: string; version: number; acknowledgedAt: string }>;
  awaitingAcknowledgement: Array<{ kind: 'device' | 'field'; field?: string; version: number; state: repo.AwaitingAck['state']; enqueuedAt: string; publishedAt: string | null }>;
  outbox: Array<{
    messageId: number;
    kind: 'device' | 'field';
    field?: string;
    version: number;
    state: repo.OutboxRowView['state'];
    notBefore: string | null;
    wrappedBy: number;
    withKey: boolean;
    status: repo.OutboxRowView['status'];
    attempts: number;
    nextAttemptAt: string | null;
    lastError: string | null;
    createdAt: string;
    publishedAt: string | null;
  }>;
}

export interface DistributionService {
  metrics: DistributionMetrics;
  acks: AckService;
  /** undefined when MQTT_URL is not set */
  publisher: KeyPublisher | undefined;
  getDevice(deviceId: string): Promise<DeviceDistributionView>;
}

const iso = (d: Date | null): string | null => (d === null ? null : d.toISOString());
const fieldOf = (field: string) => (field === '' ? {} : { field });

export function createDistribution(deps: {
  db: Kysely<DB>;
  material: KeyMaterial;
  audit: AuditSink;
  clock: Clock;
  logger: Logger;
  registry: Registry;
  mqtt: MqttConfig | undefined;
  tuning?: PublisherTuning | undefined;
}): DistributionService {
  let handle: Kysely<DistributionDB> | undefined;
  const db = () => (handle ??= distributionDb(deps.db));
  const metrics = createDistributionMetrics(deps.registry, { outboxDepth: () => repo.outboxDepth(db()) });
  const keys = createDistributionKeys({ db: deps.db, material: deps.material });
  const acks = createAckService({ db: deps.db, keys, audit: deps.audit, clock: deps.clock, logger: deps.logger, metrics });
  const publisher = deps.mqtt
    ? createKeyPublisher({
        db: deps.db,
        builder: createMessageBuilder({ db: deps.db, keys }),
        acks,
        audit: deps.audit,
        logger: deps.logger,
        metrics,
        config: deps.mqtt,
        tuning: deps.tuning,
      })
    : undefined;

  async function getDevice(deviceId: string): Promise<DeviceDistributionView> {
    if ((await repo.findDeviceGroup(db(), deviceId)) === undefined) throw new NotFoundError(`Device ${deviceId} not found`);
    const [acked, awaiting, outbox] = await Promise.all([
      repo.listAcks(db(), deviceId),
      repo.listAwaitingAck(db(), { deviceIds: [deviceId] }),
      repo.listOutbox(db(), deviceId, 100),
    ]);
    return {
      deviceId,
      acknowledged: acked.map((a) => ({ kind: a.kind, ...fieldOf(a.field), version: a.version, acknowledgedAt: a.acknowledged_at.toISOString() })),
      awaitingAcknowledgement: awaiting.map((a) => ({
        kind: a.kind,
        ...(a.field !== undefined ? { field: a.field } : {}),
        version: a.version,
        state: a.state,
        enqueuedAt: a.enqueuedAt.toISOString(),
        publishedAt: iso(a.publishedAt),
      })),
      outbox: outbox.map((o) => ({
        messageId: o.id,
        kind: o.kind,
        ...fieldOf(o.field),
        version: o.version,
        state: o.state,
        notBefore: iso(o.not_before),
        wrappedBy: o.wrapped_by,
        withKey: o.with_key,
        status: o.status,
        attempts: o.attempts,
        nextAttemptAt: o.status === 'pending' ? o.next_attempt_at.toISOString() : null,
        lastError: o.last_error,
        createdAt: o.created_at.toISOString(),
        publishedAt: iso(o.published_at),
      })),
    };
  }

  return { metrics, acks, publisher, getDevice };
}
