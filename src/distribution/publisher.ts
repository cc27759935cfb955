/**
 * The MQTT publisher: drains the outbox to the broker and receives the devices'
 * acknowledgements. One runs in every server replica (MQTT_URL set); they share the work
 * through the database, never through a coordinator.
 *
 *  - Claim: a round leases due rows (`FOR UPDATE SKIP LOCKED`, lease = OUTBOX_LEASE_SECONDS),
 *    each the oldest pending row of its device, so a device's version N+1 is never published
 *    before the broker has completed N, and no two replicas hold the same row. Leases of rows
 *    in flight are renewed; a replica that dies loses them when they expire.
 *  - Publish: QoS 2 on `keystrata/devices/{deviceId}/keys`; the row is marked published only
 *    in the callback of the broker's PUBCOMP. A broker refusal (v5 reason code) releases the
 *    row for a retry after an exponential backoff with jitter.
 *  - Connection loss: messages still in flight are taken back from the MQTT client (so it does
 *    not re-send them on its own after reconnecting) and their rows released at once; rows are
 *    only claimed while connected, and the client reconnects with exponential backoff. After a
 *    broker restart every unacknowledged row is therefore sent again, in order per device.
 *
 * Delivery is at-least-once end to end: a message whose PUBCOMP was lost with the connection is
 * sent again, so devices ignore a message id they have already applied (transport.ts).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { Kysely } from 'kysely';
import { connect, ErrorWithReasonCode, type IClientOptions, type MqttClient } from 'mqtt';
import type { Logger } from 'pino';
import type { AuditSink } from '../audit/audit.types.js';
import type { DB } from '../db/database.js';
import { KekUnavailableError, UnwrapError } from '../http/errors.js';
import type { AckService } from './ack.service.js';
import type { DistributionMetrics } from './distribution.metrics.js';
import * as repo from './distribution.repository.js';
import { distributionDb, type DistributionDB } from './distribution.tables.js';
import { DropRow, type MessageBuilder } from './message.builder.js';
import type { MqttConfig } from './mqtt.config.js';
import { ACK_TOPIC_FILTER, keyIdOf, keysTopic } from './transport.js';

export interface PublisherTuning {
  /** how long stop() waits for messages in flight before taking them back */
  drainTimeoutMs?: number;
  connectTimeoutMs?: number;
}

export interface KeyPublisher {
  /** this replica's lease owner id */
  readonly owner: string;
  /** Connect and start draining (returns at once; the connection comes up in the background). */
  start(): void;
  /** Stop claiming, let messages in flight finish (bounded), release the rest, disconnect. */
  stop(): Promise<void>;
  /** Look for due rows now (after an enqueue in this process, in tests). */
  kick(): void;
  isConnected(): boolean;
  stats(): { published: number; failed: number; dropped: number; inFlight: number };
}

type Callback = (error?: Error) => void;

interface InFlight {
  row: repo.ClaimedRow;
  callback?: Callback;
  done: Promise<void>;
}

const ACTOR = 'system:distribution';

export function createKeyPublisher(deps: {
  db: Kysely<DB>;
  builder: MessageBuilder;
  acks: AckService;
  audit: AuditSink;
  logger: Logger;
  metrics: DistributionMetrics;
  config: MqttConfig;
  tuning?: PublisherTuning | undefined;
}): KeyPublisher {
  const { builder, acks, audit, metrics, config } = deps;
  const logger = deps.logger.child({ component: 'mqtt-publisher' });
  const db: Kysely<DistributionDB> = distributionDb(deps.db);
  const owner = `${config.clientId}:${crypto.randomUUID()}`;
  const { batchSize, pollIntervalMs, leaseSeconds, retryBaseMs, retryMaxMs } = config.outbox;
  const reconnectBaseMs = config.reconnectMinMs;
  const reconnectMaxMs = config.reconnectMaxMs;
  const drainTimeoutMs = deps.tuning?.drainTimeoutMs ?? 5000;

  const inflight = new Map<number, InFlight>();
  const ourCallbacks = new Set<Callback>();
  const counts = { published: 0, failed: 0, dropped: 0 };
  let client: MqttClient | undefined;
  let stopped = false;
  let ticking = false;
  let again = false;
  let pollTimer: NodeJS.Timeout | undefined;
  let leaseTimer: NodeJS.Timeout | undefined;
  let ackChain: Promise<unknown> = Promise.resolve();
  let ackBacklog = 0;
  let everConnected = false;

  // ---------- claiming ----------

  function kick(): void {
    if (ticking) {
      again = true;
      return;
    }
    void tick();
  }

  async function tick(): Promise<void> {
    ticking = true;
    try {
      do {
        again = false;
        if (stopped || !client?.connected) break;
        const room = batchSize - inflight.size;
        if (room <= 0) break;
        let rows: repo.ClaimedRow[];
        try {
          rows = await repo.claimDue(db, owner, leaseSeconds, room);
        } catch (err) {
          logger.warn({ err }, 'could not claim outbox rows (database unavailable?)');
          break;
        }
        for (const row of rows) startPublish(row);
      } while (again);
    } finally {
      ticking = false;
    }
  }

  // ---------- one row ----------

  function startPublish(row: repo.ClaimedRow): void {
    const entry = { row } as InFlight;
    inflight.set(row.id, entry);
    entry.done = publishRow(entry)
      .catch((err: unknown) => logger.error({ err, outboxId: row.id }, 'outbox row handling failed'))
      .finally(() => {
        inflight.delete(row.id);
        if (entry.callback) ourCallbacks.delete(entry.callback);
        kick();
      });
  }

  async function publishRow(entry: InFlight): Promise<void> {
    const { row } = entry;
    let built;
    try {
      built = await deps.builder.build(row);
    } catch (error) {
      if (error instanceof DropRow) return drop(row, error.reason);
      return fail(row, error instanceof KekUnavailableError ? 'kek_unavailable' : error instanceof UnwrapError ? 'unwrap_failed' : 'build_failed', error);
    }
    const payload = Buffer.from(JSON.stringify(built.message), 'utf8');
    const started = performance.now();
    const error = await new Promise<Error | undefined>((resolve) => {
      const callback: Callback = (err) => resolve(err ?? undefined);
      entry.callback = callback;
      ourCallbacks.add(callback);
      if (stopped || !client?.connected) return resolve(new Error('not connected'));
      client.publish(keysTopic(row.device_id), payload, { qos: 2, properties: { contentType: 'application/json', payloadFormatIndicator: true } }, callback);
    });
    if (error) {
      const refused = error instanceof ErrorWithReasonCode;
      return fail(row, refused ? 'broker_refused' : 'connection_lost', refused ? { message: error.message, code: error.code } : undefined);
    }
    metrics.publishLatency.observe((performance.now() - started) / 1000);
    metrics.deliveryDelay.observe(Math.max(0, Date.now() - row.created_at.getTime()) / 1000);
    metrics.published.inc();
    counts.published++;
    if (!(await retrying(() => repo.markPublished(db, row.id, owner)))) {
      logger.error({ outboxId: row.id, deviceId: row.device_id }, 'published, but the outbox row lease was lost: it may be sent again');
    }
    await audit
      .recordRead([
        {
          actor: ACTOR,
          action: 'key.distribute',
          outcome: 'success',
          keyId: `${row.kind}:${keyIdOf(row.device_id, row.kind, row.field)}`,
          details: { messageId: row.id, version: row.version, state: row.state, wrappedBy: built.wrappedBy, withKey: row.with_key },
        },
      ])
      .catch((err: unknown) => logger.error({ err }, 'could not audit a key distribution'));
  }

  async function fail(row: repo.ClaimedRow, reason: string, detail?: unknown): Promise<void> {
    metrics.publishFailures.inc({ reason });
    counts.failed++;
    // a lost connection is retried as soon as it is back (the reconnect itself backs off)
    const attempt = row.attempts + 1;
    const delay = reason === 'connection_lost' ? 0 : Math.min(retryMaxMs, retryBaseMs * 2 ** Math.min(attempt - 1, 30)) * (0.8 + Math.random() * 0.4);
    logger.warn({ outboxId: row.id, deviceId: row.device_id, reason, attempt, retryInMs: Math.round(delay), detail: detail instanceof Error ? detail.message : detail }, 'key update not published; will retry');
    await retrying(() => repo.releaseForRetry(db, row.id, owner, delay, reason)).catch(() => false);
  }

  async function drop(row: repo.ClaimedRow, reason: DropRow['reason']): Promise<void> {
    metrics.publishFailures.inc({ reason: `dropped_${reason}` });
    counts.dropped++;
    logger.error({ outboxId: row.id, deviceId: row.device_id, kind: row.kind, field: row.field || undefined, version: row.version, reason }, 'key update can never be built: dropped');
    await retrying(() => repo.markDropped(db, row.id, owner, reason)).catch(() => false);
    await audit
      .recordRead([
        {
          actor: ACTOR,
          action: 'key.distribute',
          outcome: 'failure',
          keyId: `${row.kind}:${keyIdOf(row.device_id, row.kind, row.field)}`,
          details: { messageId: row.id, version: row.version, state: row.state, reason },
        },
      ])
      .catch((err: unknown) => logger.error({ err }, 'could not audit a dropped key update'));
  }

  /** A short retry for bookkeeping writes (a database blip must not cost a re-send). */
  async function retrying<T>(write: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await write();
      } catch (err) {
        if (attempt >= 5) throw err;
        await new Promise((r) => setTimeout(r, 100 * 2 ** attempt));
      }
    }
  }

  // ---------- connection ----------

  /** Take our messages back from the client so it never re-sends them by itself; their callbacks fail and release the rows. */
  function takeBackInFlight(c: MqttClient): void {
    for (const [messageId, pending] of Object.entries(c.outgoing)) {
      if (ourCallbacks.has(pending.cb as Callback)) c.removeOutgoingMessage(Number(messageId));
    }
  }

  function clientOptions(): IClientOptions {
    const read = (file: string | undefined) => (file === undefined ? undefined : fs.readFileSync(file));
    return {
      protocolVersion: 5,
      clientId: config.clientId,
      clean: config.sessionExpirySeconds === 0,
      ...(config.sessionExpirySeconds > 0 ? { properties: { sessionExpiryInterval: config.sessionExpirySeconds } } : {}),
      keepalive: config.keepaliveSeconds,
      reconnectPeriod: reconnectBaseMs,
      connectTimeout: deps.tuning?.connectTimeoutMs ?? 10_000,
      resubscribe: false,
      queueQoSZero: false,
      ...(config.username !== undefined ? { username: config.username } : {}),
      ...(config.password !== undefined ? { password: config.password } : {}),
      ...(config.caFile !== undefined ? { ca: read(config.caFile) } : {}),
      ...(config.certFile !== undefined ? { cert: read(config.certFile), key: read(config.keyFile) } : {}),
      rejectUnauthorized: true,
    };
  }

  function onAck(topic: string, payload: Buffer): void {
    if (ackBacklog >= 10_000) {
      metrics.acks.inc({ outcome: 'overloaded' });
      return;
    }
    ackBacklog++;
    ackChain = ackChain
      .then(() => acks.handle(topic, payload))
      .catch((err: unknown) => logger.error({ err }, 'acknowledgement handling failed'))
      .finally(() => ackBacklog--);
  }

  function start(): void {
    if (client) return;
    stopped = false;
    const c = connect(config.url, clientOptions());
    client = c;
    c.on('connect', () => {
      metrics.connected.set(1);
      c.options.reconnectPeriod = reconnectBaseMs;
      logger.info({ broker: config.endpoint, clientId: config.clientId, reconnected: everConnected }, 'connected to the MQTT broker');
      everConnected = true;
      c.subscribe(`$share/${config.ackShareGroup}/${ACK_TOPIC_FILTER}`, { qos: 1 }, (err) => {
        if (err) logger.error({ err: err.message }, 'could not subscribe to device acknowledgements');
      });
      kick();
    });
    c.on('close', () => {
      metrics.connected.set(0);
      takeBackInFlight(c);
      // exponential reconnect backoff (the client reads the period when it schedules the next try)
      c.options.reconnectPeriod = Math.min(reconnectMaxMs, Math.max(reconnectBaseMs, (c.options.reconnectPeriod ?? reconnectBaseMs) * 2));
    });
    c.on('offline', () => logger.warn({ broker: config.endpoint }, 'MQTT broker unreachable; reconnecting with backoff'));
    // connection refusals, TLS and auth failures: the message names no secret
    c.on('error', (err) => logger.warn({ broker: config.endpoint, err: err.message }, 'MQTT client error'));
    c.on('message', onAck);
    pollTimer = setInterval(kick, pollIntervalMs);
    pollTimer.unref();
    leaseTimer = setInterval(() => void renew(), Math.max(1000, (leaseSeconds * 1000) / 3));
    leaseTimer.unref();
  }

  async function renew(): Promise<void> {
    const ids = [...inflight.keys()];
    if (ids.length === 0) return;
    try {
      const held = new Set(await repo.renewLeases(db, owner, ids, leaseSeconds));
      const lost = ids.filter((id) => !held.has(id) && inflight.has(id));
      if (lost.length > 0) {
        metrics.publishFailures.inc({ reason: 'lease_lost' }, lost.length);
        logger.error({ outboxIds: lost }, 'outbox leases lost while in flight (database unavailable for longer than the lease?)');
      }
    } catch (err) {
      logger.warn({ err }, 'could not renew outbox leases');
    }
  }

  async function stop(): Promise<void> {
    if (stopped && !client) return;
    stopped = true;
    clearInterval(pollTimer);
    clearInterval(leaseTimer);
    const settle = (ms: number) => Promise.race([Promise.allSettled([...inflight.values()].map((e) => e.done)), new Promise((r) => setTimeout(r, ms))]);
    await settle(drainTimeoutMs);
    const c = client;
    client = undefined;
    if (c) {
      takeBackInFlight(c);
      await settle(1000);
      await c.endAsync(true).catch(() => {});
    }
    // anything still unsettled: hand the rows back now rather than when the lease expires
    for (const { row } of inflight.values()) await repo.releaseForRetry(db, row.id, owner, 0, 'publisher_stopped').catch(() => false);
    await Promise.race([ackChain, new Promise((r) => setTimeout(r, 2000))]);
    metrics.connected.set(0);
  }

  return {
    owner,
    start,
    stop,
    kick,
    isConnected: () => client?.connected === true,
    stats: () => ({ ...counts, inFlight: inflight.size }),
  };
}
