/**
 * Waves: the bucket of a device (Node and SQL agree), the wave plan (canary, waves, sweep), and
 * a 10 %/day rollout over 1,000 devices driven day by day through the cron entry: after each
 * simulated day exactly the due waves are done, every device is rotated exactly once, every old
 * version is in grace, field keys follow the new version unchanged; devices enrolled during the
 * rollout go into their own wave when it is still to come, else into the final sweep.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BUCKETS, deviceBucket, planWaves, rawRanges, waveDueAt } from '../../src/rotation/rollout.waves.js';
import { call } from '../support/flow.js';
import {
  createFleet,
  createGroup,
  DAY,
  deviceStates,
  events,
  fetchDeviceKeys,
  getRollout,
  items,
  runCron,
  startRollout,
  storedDeviceKeys,
  storedFieldKey,
  wavesOf,
  type Fleet,
} from './support.js';

const MINUTE = 60_000;

describe('the wave plan', () => {
  it('when there is a canary, then it comes first, the waves cut the rest by percentPerDay, the last takes the remainder, and a sweep ends it', () => {
    const plan = planWaves({ percentPerDay: 10, canaryPercent: 1 });
    expect(plan.map((w) => [w.kind, w.from, w.to])).toEqual([
      ['canary', 0, 100],
      ...Array.from({ length: 9 }, (_, i) => ['wave', 100 + i * 1000, 1100 + i * 1000]),
      ['wave', 9100, 10_000],
      ['sweep', 0, 10_000],
    ]);
    expect(planWaves({ percentPerDay: 10 }).filter((w) => w.kind === 'wave')).toHaveLength(10);
    expect(planWaves({ percentPerDay: 100 }).map((w) => w.kind)).toEqual(['wave', 'sweep']);
    expect(planWaves({ percentPerDay: 30 }).map((w) => w.to)).toEqual([3000, 6000, 9000, 10_000, 10_000]);
  });

  it('when a range of turned buckets wraps past 9999, then it maps to two raw ranges', () => {
    expect(rawRanges(0, 1000, 0)).toEqual([[0, 1000]]);
    expect(rawRanges(0, 1000, 9500)).toEqual([[500, 1500]]);
    expect(rawRanges(0, 1000, 300)).toEqual([[9700, 10_000], [0, 700]]);
    expect(rawRanges(0, BUCKETS, 1234)).toEqual([[0, BUCKETS]]);
    expect(rawRanges(500, 500, 7)).toEqual([]);
  });

  it('when a rollout was paused, then every wave is due that much later; the sweep is due with the last wave', () => {
    const startedAt = new Date('2026-03-01T00:00:00Z');
    const r = { startedAt, pausedMs: 5000, intervalSeconds: 86_400, waveCount: 10 };
    expect(waveDueAt(r, 0).toISOString()).toBe('2026-03-01T00:00:05.000Z');
    expect(waveDueAt(r, 3).toISOString()).toBe('2026-03-04T00:00:05.000Z');
    expect(waveDueAt(r, 10)).toEqual(waveDueAt(r, 9));
  });
});

describe('a rollout of 10 % a day over 1,000 devices', () => {
  let f: Fleet;
  let ids: string[];
  const withFields: string[] = [];
  beforeAll(async () => {
    f = await createFleet({ readerGroups: ['pumps', 'valves'] });
    ids = await createGroup(f, 'pumps', 1000);
    for (const id of ids.slice(0, 20)) {
      expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field: 'patient_id' })).status).toBe(201);
      withFields.push(id);
    }
  });
  afterAll(async () => f.close());

  it('when the bucket is computed in SQL and in Node, then it is the same for every device', async () => {
    const { rows } = await sql<{ id: string; bucket: number }>`select id, keystrata_rollout_bucket(id) as bucket from devices`.execute(f.t.database.db);
    expect(rows).toHaveLength(1000);
    for (const r of rows) expect(r.bucket, r.id).toBe(deviceBucket(r.id));
    // and they spread: every tenth of the bucket space holds some 10 % of the devices
    const tenths = new Array<number>(10).fill(0);
    for (const r of rows) tenths[Math.floor(r.bucket / 1000)]! += 1;
    for (const n of tenths) expect(n).toBeGreaterThan(60);
  });

  it('when cron runs once per simulated day, then exactly the due waves are done, each device is rotated once and its old version is in grace', async () => {
    const start = f.clock.now();
    const fieldKeysBefore = new Map<string, Buffer>();
    for (const id of withFields) fieldKeysBefore.set(id, await storedFieldKey(f, 'pumps', id, 'patient_id', 1));

    const rollout = await startRollout(f, { groupId: 'pumps', percentPerDay: 10, waveIntervalSeconds: 60 });
    expect(rollout).toMatchObject({ groupId: 'pumps', level: 'device', state: 'running', reason: 'manual', waveCount: 10, currentWave: 0, haltThreshold: 0.01, rollbackOnHalt: false });
    expect(rollout.waves.map((w) => w.kind)).toEqual([...new Array<string>(10).fill('wave'), 'sweep']);
    expect(rollout.waves[3]!.dueAt).toBe(new Date(start.getTime() + 3 * MINUTE).toISOString());
    expect(rollout.devicesOnOldVersions).toBe(1000);
    const { waveOf } = await wavesOf(f, rollout.id);
    const expected = new Map(ids.map((id) => [id, waveOf(id)]));

    for (let day = 0; day < 10; day++) {
      const now = new Date(start.getTime() + day * MINUTE);
      f.clock.set(now);
      const summary = await runCron(f);
      expect(summary.errors, `day ${day}`).toEqual([]);
      const dueToday = ids.filter((id) => expected.get(id) === day).length;
      expect(summary.devices.rollouts, `day ${day}`).toMatchObject({ devices: dueToday, failed: 0, more: false, started: [], halted: [] });

      const view = await getRollout(f, rollout.id);
      expect(
        view.waves.map((w) => w.state),
        `day ${day}`,
      ).toEqual([...Array.from({ length: 10 }, (_, k) => (k <= day ? 'completed' : 'scheduled')), day === 9 ? 'completed' : 'scheduled']);
      for (const w of view.waves.filter((x) => x.kind === 'wave' && x.wave <= day)) {
        const size = ids.filter((id) => expected.get(id) === w.wave).length;
        expect(w).toMatchObject({ devices: size, done: size, failed: 0, skipped: 0, pending: 0 });
      }
      const states = await deviceStates(f, 'pumps');
      for (const id of ids) {
        const s = states.get(id)!;
        if (expected.get(id)! <= day) {
          expect(s.versions.map((v) => [v.version, v.state]), `${id} on day ${day}`).toEqual([
            [1, 'grace'],
            [2, 'primary'],
          ]);
          // grace for the device policy's 7 days from the day it was rotated
          expect(s.versions[0]!.stateUntil!.getTime()).toBe(new Date(start.getTime() + expected.get(id)! * MINUTE).getTime() + 7 * DAY);
        } else {
          expect(s.versions.map((v) => [v.version, v.state]), `${id} on day ${day}`).toEqual([[1, 'primary']]);
        }
      }
      expect(view.devicesOnOldVersions).toBe(ids.filter((id) => expected.get(id)! > day).length);
    }

    const done = await getRollout(f, rollout.id);
    expect(done).toMatchObject({ state: 'completed', currentWave: null, devicesOnOldVersions: 0, totals: { devices: 1000, done: 1000, failed: 0, skipped: 0, pending: 0 } });
    // rotated exactly once: one success event per device, all of this rollout
    const rotations = (await events(f, { action: 'device.rotate' })).filter((e) => (e.details as { rolloutId?: string }).rolloutId === rollout.id);
    expect(rotations).toHaveLength(1000);
    expect(new Set(rotations.map((e) => e.keyId)).size).toBe(1000);
    expect(rotations.every((e) => e.outcome === 'success' && e.actor === 'cron')).toBe(true);
    for (const [action, n] of [['rollout.start', 1], ['rollout.wave_start', 11], ['rollout.wave_complete', 11], ['rollout.complete', 1]] as const) {
      expect(await events(f, { action }), action).toHaveLength(n);
    }

    // field keys moved under v2 with the same material; every stored key unwraps; delivery agrees
    for (const id of withFields) {
      const row = await f.t.database.db.selectFrom('field_versions').select(['parent_version', 'state']).where('device_id', '=', id).executeTakeFirstOrThrow();
      expect(row).toEqual({ parent_version: 2, state: 'primary' });
      expect((await storedFieldKey(f, 'pumps', id, 'patient_id', 1)).equals(fieldKeysBefore.get(id)!)).toBe(true);
    }
    const stored = await storedDeviceKeys(f, 'pumps');
    expect(stored.size).toBe(2000);
    for (const id of [ids[0]!, ids[500]!, ids[999]!]) {
      const delivered = await fetchDeviceKeys(f, id);
      const primary = delivered.find((k) => k.kid === `${id}:v2`)!;
      expect(primary.state).toBe('primary');
      expect(Buffer.from(primary.k, 'base64url').equals(stored.get(`${id}:v2`)!)).toBe(true);
      expect(delivered.find((k) => k.kid === `${id}:v1`)?.state).toBe('grace');
    }
    // one outbox row per new device DEK, in the transaction that made it
    const outbox = await f.t.database.db
      .withTables<{ key_outbox: { device_id: string; kind: string; version: number; state: string; with_key: boolean; wrapped_by: number } }>()
      .selectFrom('key_outbox')
      .select(['device_id', 'kind', 'version', 'state', 'with_key', 'wrapped_by'])
      .where('kind', '=', 'device')
      .where('version', '=', 2)
      .execute();
    expect(outbox).toHaveLength(1000);
    expect(outbox.every((o) => o.state === 'primary' && o.with_key && o.wrapped_by === 1)).toBe(true);
    expect((await f.t.audit.verify()).ok).toBe(true);
    // and counted for Prometheus
    const metrics = await f.t.app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toContain('keystrata_rollout_devices_total{level="device",outcome="done"} 1000');
    expect(metrics.body).toMatch(/keystrata_rollout_chunk_duration_seconds_count\{kind="forward"\} [1-9]/);
  });

  it('when devices are enrolled during a rollout, then one whose wave is still to come goes with it, one whose wave was listed goes with the final sweep, and one enrolled after the end is left alone', async () => {
    const valves = await createGroup(f, 'valves', 200);
    const start = f.clock.now();
    const rollout = await startRollout(f, { groupId: 'valves', percentPerDay: 25, waveIntervalSeconds: 60 });
    const { waveOf } = await wavesOf(f, rollout.id);
    const candidates = Array.from({ length: 400 }, (_, i) => `valves-late-${i}`);
    const early = candidates.find((id) => waveOf(id) === 0)!;
    const later = candidates.find((id) => waveOf(id) === 3)!;
    const after = candidates.find((id) => id !== early && id !== later)!;

    for (let day = 0; day < 4; day++) {
      f.clock.set(new Date(start.getTime() + day * MINUTE));
      if (day === 2) expect((await call(f.t.app, f.admin, 'POST', '/v1/groups/valves/devices/bulk', { ids: [early, later] })).status).toBe(201);
      expect((await runCron(f)).errors).toEqual([]);
    }
    const view = await getRollout(f, rollout.id);
    expect(view.state).toBe('completed');
    expect(view.waves.at(-1)).toMatchObject({ kind: 'sweep', devices: 1, done: 1 });
    const rolled = await items(f, rollout.id);
    expect(rolled.size).toBe(202);
    expect(rolled.get(early)).toMatchObject({ wave: 4, status: 'done', from: 1, to: 2 });
    expect(rolled.get(later)).toMatchObject({ wave: 3, status: 'done', from: 1, to: 2 });
    for (const id of valves) expect(rolled.get(id)).toMatchObject({ wave: waveOf(id), status: 'done' });

    expect((await call(f.t.app, f.admin, 'POST', '/v1/groups/valves/devices', { id: after })).status).toBe(201);
    f.clock.advance(MINUTE);
    expect((await runCron(f)).errors).toEqual([]);
    expect((await items(f, rollout.id)).has(after)).toBe(false);
    expect((await deviceStates(f, 'valves')).get(after)!.versions.map((v) => v.state)).toEqual(['primary']);
  });
});
