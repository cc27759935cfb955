/**
 * Device acknowledgements (`keystrata/devices/{deviceId}/keys/ack`, format in transport.ts).
 *
 * An acknowledgement is accepted only when it parses strictly, names the device of its topic,
 * names an existing version of that device whose material still exists, and carries the MAC
 * only the holder of that version's key can compute. Then, in one transaction, the version is
 * recorded as held by the device (`key_acks`) with its audit event. Anything else (garbage,
 * an unknown device or version, a forged or replayed-onto-another-version tag) changes nothing:
 * it is counted, logged at debug, and audited as `key.ack` / `denied` through the group-committed
 * read path — at most AUDIT_BUDGET such events per minute, so a flood of garbage on the broker
 * cannot flood the audit chain; the rest are summed up in one event per minute.
 * A repeated valid acknowledgement (QoS 1 re-delivery, a device re-acking) is a no-op.
 */
import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import { KekUnavailableError } from '../http/errors.js';
import { MaterialMissing, type DistributionKeys } from './distribution.keys.js';
import type { DistributionMetrics } from './distribution.metrics.js';
import * as repo from './distribution.repository.js';
import { distributionDb } from './distribution.tables.js';
import { keyIdOf, parseAck, parseAckTopic, verifyAckTag, type KeyAck } from './transport.js';

export type AckOutcome =
  | 'accepted'
  | 'duplicate'
  | 'bad_topic'
  | 'too_large'
  | 'not_json'
  | 'bad_shape'
  | 'device_mismatch'
  | 'unknown_device'
  | 'unknown_version'
  | 'bad_tag'
  | 'unavailable';

const AUDIT_BUDGET = 60;
const WINDOW_MS = 60_000;

export function createAckService(deps: {
  db: Kysely<DB>;
  keys: DistributionKeys;
  audit: AuditSink;
  clock: Clock;
  logger: Logger;
  metrics?: Pick<DistributionMetrics, 'acks'> | undefined;
}) {
  const { keys, audit, clock, logger } = deps;

  let windowStart = 0;
  let auditedInWindow = 0;
  let suppressed = 0;

  async function auditRefusal(outcome: AckOutcome, topicDeviceId: string | undefined, ack: Partial<KeyAck>): Promise<void> {
    const now = Date.now();
    const events: AuditEventInput[] = [];
    if (now - windowStart >= WINDOW_MS) {
      if (suppressed > 0) {
        events.push({ actor: 'anonymous', action: 'key.ack', outcome: 'denied', details: { reason: 'suppressed', suppressed, windowSeconds: WINDOW_MS / 1000 } });
      }
      windowStart = now;
      auditedInWindow = 0;
      suppressed = 0;
    }
    if (auditedInWindow < AUDIT_BUDGET) {
      auditedInWindow++;
      events.push({
        actor: 'anonymous',
        action: 'key.ack',
        outcome: 'denied',
        // only what was claimed and well-formed; never the payload or the tag
        keyId: topicDeviceId === undefined ? undefined : ack.kind === undefined ? `device:${topicDeviceId}` : `${ack.kind}:${keyIdOf(topicDeviceId, ack.kind, ack.field)}`,
        details: { reason: outcome, ...(ack.version !== undefined ? { version: ack.version } : {}) },
      });
    } else {
      suppressed++;
    }
    if (events.length > 0) {
      await audit.recordRead(events).catch((err: unknown) => logger.error({ err }, 'could not audit a refused key acknowledgement'));
    }
  }

  async function refuse(outcome: AckOutcome, topicDeviceId: string | undefined, ack: Partial<KeyAck> = {}): Promise<AckOutcome> {
    deps.metrics?.acks.inc({ outcome });
    logger.debug({ outcome, deviceId: topicDeviceId, kind: ack.kind, field: ack.field, version: ack.version }, 'key acknowledgement refused');
    await auditRefusal(outcome, topicDeviceId, ack);
    return outcome;
  }

  /** Handle one message from the acknowledgement topic. Never throws. */
  async function handle(topic: string, payload: Buffer): Promise<AckOutcome> {
    const topicDeviceId = parseAckTopic(topic);
    if (topicDeviceId === undefined) return refuse('bad_topic', undefined);
    const parsed = parseAck(topicDeviceId, payload);
    if (!parsed.ok) return refuse(parsed.reason, topicDeviceId);
    const { ack } = parsed;
    const claimed = { kind: ack.kind, field: ack.field, version: ack.version };
    const field = ack.kind === 'field' ? (ack.field as string) : '';

    let key: Buffer | undefined;
    try {
      const groupId = await keys.groupOf(ack.deviceId);
      if (groupId === undefined) return await refuse('unknown_device', topicDeviceId, claimed);
      try {
        key = await keys.versionKey(groupId, ack.deviceId, ack.kind, field, ack.version);
      } catch (error) {
        if (error instanceof MaterialMissing) return await refuse('unknown_version', topicDeviceId, claimed);
        throw error;
      }
      if (!verifyAckTag(key, ack)) return await refuse('bad_tag', topicDeviceId, claimed);
    } catch (error) {
      // KEK provider or database unreachable: nothing recorded; the device acknowledges again on re-delivery
      deps.metrics?.acks.inc({ outcome: 'unavailable' });
      logger.warn({ err: error instanceof KekUnavailableError ? error.message : error, deviceId: ack.deviceId }, 'key acknowledgement could not be checked');
      return 'unavailable';
    } finally {
      key?.fill(0);
    }

    try {
      const inserted = await deps.db
        .transaction()
        .execute(async (trx) => {
          const added = await repo.insertAck(distributionDb(trx), { device_id: ack.deviceId, kind: ack.kind, field, version: ack.version, acknowledged_at: clock.now() });
          if (added) {
            await audit.record(trx, [
              {
                actor: `device:${ack.deviceId}`,
                action: 'key.ack',
                outcome: 'success',
                keyId: `${ack.kind}:${keyIdOf(ack.deviceId, ack.kind, ack.field)}`,
                details: { version: ack.version },
              },
            ]);
          }
          return added;
        });
      const outcome: AckOutcome = inserted ? 'accepted' : 'duplicate';
      deps.metrics?.acks.inc({ outcome });
      if (inserted) logger.info({ deviceId: ack.deviceId, kind: ack.kind, field: ack.field, version: ack.version }, 'device acknowledged a key version');
      return outcome;
    } catch (error) {
      deps.metrics?.acks.inc({ outcome: 'unavailable' });
      logger.warn({ err: error, deviceId: ack.deviceId }, 'key acknowledgement could not be recorded');
      return 'unavailable';
    }
  }

  return { handle };
}

export type AckService = ReturnType<typeof createAckService>;
