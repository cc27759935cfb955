/**
 * A rollout survives being killed and shares its work: a run killed between chunks, or inside
 * one (its transaction rolls back whole), is finished by the next run with no device rotated
 * twice and none skipped; two runners on one wave at once split it without overlap.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { enqueueKeyUpdates } from '../../src/distribution/index.js';
import { createFleet, createGroup, deviceStates, events, getRollout, items, runner, startRollout, storedDeviceKeys, type Fleet } from './support.js';

/** Every device rotated exactly once by the rollout: v1 in grace, v2 primary, one success event, one outbox row. */
async function expectEachRotatedOnce(f: Fleet, groupId: string, ids: readonly string[], rolloutId: string): Promise<void> {
  const states = await deviceStates(f, groupId);
  for (const id of ids) {
    expect(states.get(id)!.versions.map((v) => [v.version, v.state]), id).toEqual([
      [1, 'grace'],
      [2, 'primary'],
    ]);
  }
  const rolled = await items(f, rolloutId);
  expect([...rolled.values()].filter((i) => i.status === 'done' && i.from === 1 && i.to === 2)).toHaveLength(ids.length);
  const rotations = (await events(f, { action: 'device.rotate', keyIdPrefix: `device:${groupId}-` })).filter((e) => (e.details as { rolloutId?: string }).rolloutId === rolloutId);
  expect(rotations.filter((e) => e.outcome === 'success')).toHaveLength(ids.length);
  expect(new Set(rotations.map((e) => e.keyId)).size).toBe(ids.length);
  const outbox = await f.t.database.db
    .withTables<{ key_outbox: { device_id: string; kind: string; version: number } }>()
    .selectFrom('key_outbox')
    .select('device_id')
    .where('kind', '=', 'device')
    .where('version', '=', 2)
    .where('device_id', 'like', `${groupId}-%`)
    .execute();
  expect(outbox).toHaveLength(ids.length);
  expect((await storedDeviceKeys(f, groupId)).size).toBe(2 * ids.length);
}

describe('a rollout that is killed, or run twice at once', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
  });
  afterAll(async () => f.close());

  it('when a run is killed between chunks and another inside a chunk, then the next run finishes the wave: no device rotated twice, none skipped', async () => {
    const ids = await createGroup(f, 'pumps', 1000);
    const rollout = await startRollout(f, { groupId: 'pumps', percentPerDay: 100, waveIntervalSeconds: 60 });

    // killed after its third chunk had committed
    let chunks = 0;
    const killed = runner(f, {
      chunkSize: 100,
      workers: 1,
      hooks: {
        afterChunk: () => {
          chunks += 1;
          if (chunks === 3) throw new Error('killed between chunks');
        },
      },
    });
    const first = await killed.run();
    expect(first.errors.map((e) => (e.error as Error).message)).toEqual(['killed between chunks']);
    expect(first.devices).toBe(300);
    let view = await getRollout(f, rollout.id);
    expect(view.waves[0]).toMatchObject({ state: 'running', devices: 1000, done: 300, pending: 700 });

    // killed inside its second chunk, after the version rows were written: that chunk rolls back whole
    let enqueued = 0;
    const crashing = runner(f, {
      chunkSize: 100,
      workers: 1,
      enqueue: async (trx, updates) => {
        enqueued += 1;
        if (enqueued === 2) throw new Error('killed inside a chunk');
        return enqueueKeyUpdates(trx, updates);
      },
    });
    const second = await crashing.run();
    expect(second.errors.map((e) => (e.error as Error).message)).toEqual(['killed inside a chunk']);
    expect(second.devices).toBe(100);
    view = await getRollout(f, rollout.id);
    expect(view.waves[0]).toMatchObject({ done: 400, pending: 600 });
    const states = await deviceStates(f, 'pumps');
    expect([...states.values()].filter((s) => s.primary === 2)).toHaveLength(400);

    const third = await runner(f, { chunkSize: 100 }).run();
    expect(third).toMatchObject({ devices: 600, failed: 0, errors: [] });
    view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'completed', totals: { devices: 1000, done: 1000, pending: 0 } });
    await expectEachRotatedOnce(f, 'pumps', ids, rollout.id);
    expect((await f.t.audit.verify()).ok).toBe(true);
  });

  it('when two runners process one wave at the same time, then they split it: each device is rotated by exactly one of them', async () => {
    const ids = await createGroup(f, 'valves', 1000);
    const rollout = await startRollout(f, { groupId: 'valves', percentPerDay: 100, waveIntervalSeconds: 60 });
    const a = runner(f, { chunkSize: 50, workers: 2 });
    const b = runner(f, { chunkSize: 50, workers: 2 });
    const [ra, rb] = await Promise.all([a.run(), b.run()]);
    expect(ra.errors).toEqual([]);
    expect(rb.errors).toEqual([]);
    expect(ra.devices + rb.devices).toBe(1000);
    expect(ra.devices).toBeGreaterThan(0);
    expect(rb.devices).toBeGreaterThan(0);
    expect(await getRollout(f, rollout.id)).toMatchObject({ state: 'completed', totals: { devices: 1000, done: 1000, failed: 0, pending: 0 } });
    await expectEachRotatedOnce(f, 'valves', ids, rollout.id);
    expect(await events(f, { action: 'rollout.wave_complete', keyId: 'group:valves' })).toHaveLength(2);
    expect(await events(f, { action: 'rollout.complete', keyId: 'group:valves' })).toHaveLength(1);
    expect((await f.t.audit.verify()).ok).toBe(true);
  });
});
