/**
 * Several publishers (replicas) on one database: the work is shared through row leases, no
 * outbox row is ever sent twice, per-device order holds, and a replica that dies with rows
 * leased gives them up when the lease expires.
 */
import { connect, type MqttClient } from 'mqtt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as repo from '../../src/distribution/distribution.repository.js';
import type { DistributionService } from '../../src/distribution/distribution.service.js';
import { distributionDb } from '../../src/distribution/distribution.tables.js';
import { startBroker, type TestBroker } from './broker.js';
import type { KeyUpdate } from './device.js';
import { createEnv, enrol, extraPublisher, mqttEnv, outboxRows, rotate, waitFor, type Env } from './support.js';

async function watcher(url: string): Promise<{ client: MqttClient; seen: KeyUpdate[] }> {
  const client = connect(url, { protocolVersion: 5, clientId: `watcher-${Math.random().toString(36).slice(2)}`, reconnectPeriod: 100 });
  const seen: KeyUpdate[] = [];
  client.on('message', (_topic, payload) => seen.push(JSON.parse(payload.toString('utf8')) as KeyUpdate));
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => resolve());
    client.once('error', reject);
  });
  await client.subscribeAsync('keystrata/devices/+/keys', { qos: 2 });
  return { client, seen };
}

describe('two publishers on one database', () => {
  let broker: TestBroker;
  let e: Env;
  const publishers: DistributionService[] = [];

  beforeAll(async () => {
    broker = await startBroker();
    // the app itself runs no publisher here: the outbox fills up first
    e = await createEnv();
  });
  afterAll(async () => {
    for (const p of publishers) await p.publisher?.stop();
    await e?.close();
    await broker?.close();
  });

  it('when both drain a full outbox at once, then every row is sent exactly once, each device in order, and both did part of the work', async () => {
    const ids = Array.from({ length: 30 }, (_, i) => `r-${String(i).padStart(2, '0')}`);
    await enrol(e, ids, ['hr']);
    for (const id of ids) {
      await rotate(e, id);
      await rotate(e, id, 'hr');
      await rotate(e, id);
    }
    const rows = await outboxRows(e.t);
    expect(rows).toHaveLength(ids.length * 4);
    expect(rows.every((r) => r.status === 'pending')).toBe(true);

    const { client, seen } = await watcher(broker.url);
    try {
      const settings = { OUTBOX_BATCH_SIZE: '4' };
      const a = extraPublisher(e.t, mqttEnv(broker.url, { ...settings, MQTT_CLIENT_ID: 'replica-a' }));
      const b = extraPublisher(e.t, mqttEnv(broker.url, { ...settings, MQTT_CLIENT_ID: 'replica-b' }));
      publishers.push(a, b);
      const started = Date.now();
      a.publisher?.start();
      b.publisher?.start();
      await waitFor('the outbox drained', async () => (await outboxRows(e.t)).every((r) => r.status === 'published'), 60_000);
      await waitFor('every message seen', () => seen.length >= rows.length);
      await new Promise((r) => setTimeout(r, 300)); // anything sent twice would arrive by now
      const elapsed = Date.now() - started;

      const counts = new Map<number, number>();
      for (const m of seen) counts.set(m.id, (counts.get(m.id) ?? 0) + 1);
      expect([...counts.values()].filter((n) => n !== 1)).toEqual([]);
      expect([...counts.keys()].sort((x, y) => x - y)).toEqual(rows.map((r) => r.id));
      for (const id of ids) {
        const perDevice = seen.filter((m) => m.deviceId === id).map((m) => m.id);
        expect(perDevice).toEqual(rows.filter((r) => r.device_id === id).map((r) => r.id));
      }
      const done = await outboxRows(e.t);
      expect(done.every((r) => r.attempts === 1 && r.lease_owner === null)).toBe(true);
      const sa = a.publisher?.stats();
      const sb = b.publisher?.stats();
      expect((sa?.published ?? 0) + (sb?.published ?? 0)).toBe(rows.length);
      expect(sa?.published).toBeGreaterThan(0);
      expect(sb?.published).toBeGreaterThan(0);
      console.info(`two publishers: ${rows.length} rows in ${elapsed} ms, split ${sa?.published}/${sb?.published}`);
    } finally {
      await client.endAsync(true);
    }
  });

  it('when a replica dies holding leases, then its rows wait for the lease to expire and another replica sends them, in order', async () => {
    for (const p of publishers.splice(0)) await p.publisher?.stop();
    const before = (await outboxRows(e.t)).length;
    await rotate(e, 'r-00');
    await rotate(e, 'r-00');
    const db = distributionDb(e.t.database.db);
    // a replica that claimed the head row and died: a 2-second lease nobody renews
    const claimed = await repo.claimDue(db, 'dead-replica', 2, 10);
    expect(claimed.map((r) => r.device_id)).toEqual(['r-00']);
    const { client, seen } = await watcher(broker.url);
    const survivor = extraPublisher(e.t, mqttEnv(broker.url, { MQTT_CLIENT_ID: 'replica-c' }));
    publishers.push(survivor);
    survivor.publisher?.start();
    try {
      const leasedAt = Date.now();
      const fresh = () => outboxRows(e.t).then((rows) => rows.slice(before));
      await new Promise((r) => setTimeout(r, 600));
      // the live publisher skips the leased row and, keeping order, the row behind it
      expect((await fresh()).map((r) => r.status)).toEqual(['pending', 'pending']);
      await waitFor('taken over after the lease', async () => (await fresh()).every((r) => r.status === 'published'), 15_000);
      expect(Date.now() - leasedAt).toBeGreaterThanOrEqual(1000);
      await waitFor('both seen', () => seen.filter((m) => m.deviceId === 'r-00').length >= 2);
      expect(seen.filter((m) => m.deviceId === 'r-00').map((m) => m.version)).toEqual([4, 5]);
    } finally {
      await client.endAsync(true);
    }
  });
});
