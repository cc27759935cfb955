/**
 * Canary, waves and halts: a canary goes first, then the waves; a wave whose failure rate
 * (failures injected for some of its devices) exceeds the threshold halts the rollout (logged,
 * counted, audited) and no later wave starts; resuming continues the halted wave with its rate
 * counted afresh and moves the schedule by the time held. With rollbackOnHalt the halted wave's
 * rotated devices go back to their previous primary, the new versions are disabled, and every
 * key still unwraps and is delivered as before.
 */
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRolloutMetrics } from '../../src/rotation/rollout.metrics.js';
import { call, expectProblem } from '../support/flow.js';
import {
  control,
  createFleet,
  createGroup,
  deviceStates,
  events,
  fetchDeviceKeys,
  getRollout,
  items,
  runner,
  startRollout,
  storedDeviceKeys,
  storedFieldKey,
  wavesOf,
  type Fleet,
} from './support.js';

const MINUTE = 60_000;

function capture() {
  const lines: Array<{ level: string; obj: Record<string, unknown>; msg: string }> = [];
  const log = (level: string) => (obj: unknown, msg?: string) => void lines.push({ level, obj: obj as Record<string, unknown>, msg: msg ?? '' });
  return { lines, logger: { info: log('info'), warn: log('warn'), error: log('error') } as never };
}

describe('a canary, then waves, and a wave over its failure threshold', () => {
  let f: Fleet;
  let ids: string[];
  beforeAll(async () => {
    f = await createFleet({ readerGroups: ['pumps', 'valves'] });
    ids = await createGroup(f, 'pumps', 1000);
  });
  afterAll(async () => f.close());

  it('when a fifth of the third wave fails, then the canary and the first wave are done, the third halts the rollout and nothing after it starts until it is resumed', async () => {
    const start = f.clock.now();
    const rollout = await startRollout(f, { groupId: 'pumps', canaryPercent: 1, percentPerDay: 20, waveIntervalSeconds: 60, haltThreshold: 0.05 });
    expect(rollout.waves.map((w) => w.kind)).toEqual(['canary', 'wave', 'wave', 'wave', 'wave', 'wave', 'sweep']);
    const { waveOf } = await wavesOf(f, rollout.id);
    const inWave = (k: number) => ids.filter((id) => waveOf(id) === k).sort();
    const failing = new Set(inWave(2).filter((_, i) => i % 5 === 0));
    const { lines, logger } = capture();
    const registry = new Registry();
    const r = runner(f, { chunkSize: 50, workers: 1, failDevice: (id) => failing.has(id), logger, metrics: createRolloutMetrics(registry) });

    f.clock.set(start);
    await r.run();
    let view = await getRollout(f, rollout.id);
    expect(view.waves[0]).toMatchObject({ kind: 'canary', state: 'completed', devices: inWave(0).length, done: inWave(0).length });
    expect(inWave(0).length).toBeGreaterThan(0);
    expect(inWave(0).length).toBeLessThan(40); // 1 %
    expect(view.waves[1]!.state).toBe('scheduled');

    f.clock.set(new Date(start.getTime() + MINUTE));
    await r.run();
    view = await getRollout(f, rollout.id);
    expect(view.waves[1]).toMatchObject({ state: 'completed', done: inWave(1).length, failed: 0 });

    f.clock.set(new Date(start.getTime() + 2 * MINUTE));
    const halting = await r.run();
    expect(halting.halted).toEqual([{ rolloutId: rollout.id, groupId: 'pumps', wave: 2, rolledBack: false }]);
    view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'halted', haltedWave: 2, currentWave: 2 });
    expect(view.haltReason).toMatch(/^wave 2: \d+ of 50 devices failed/);
    // halted after its first chunk: the rest of the wave waits
    expect(view.waves[2]).toMatchObject({ state: 'halted', devices: inWave(2).length });
    expect(view.waves[2]!.done + view.waves[2]!.failed).toBe(50);
    expect(view.waves[2]!.pending).toBe(inWave(2).length - 50);
    const failedItems = [...(await items(f, rollout.id))].filter(([, i]) => i.status === 'failed');
    expect(failedItems.length).toBe(view.waves[2]!.failed);
    for (const [id, item] of failedItems) {
      expect(failing.has(id)).toBe(true);
      expect(item).toMatchObject({ wave: 2, reason: 'injected_failure', from: 1, to: null });
    }
    expect(view.failures.every((x) => x.status === 'failed' && x.reason === 'injected_failure' && failing.has(x.deviceId))).toBe(true);
    const states = await deviceStates(f, 'pumps');
    for (const [id] of failedItems) expect(states.get(id)!.versions.map((v) => v.state)).toEqual(['primary']);
    const halt = await events(f, { action: 'rollout.halt' });
    expect(halt).toHaveLength(1);
    expect(halt[0]).toMatchObject({ outcome: 'failure', keyId: 'group:pumps', details: { rolloutId: rollout.id, wave: 2, processed: 50, haltThreshold: 0.05, rollback: false } });
    expect(lines.filter((l) => l.level === 'error' && /halted/.test(l.msg))).toHaveLength(1);
    expect(await registry.getSingleMetricAsString('keystrata_rollout_halts_total')).toContain('keystrata_rollout_halts_total{level="device"} 1');
    expect(await registry.getSingleMetricAsString('keystrata_rollout_devices_total')).toContain(`keystrata_rollout_devices_total{level="device",outcome="failed"} ${failedItems.length}`);

    // days pass: a halted rollout starts nothing
    for (let day = 3; day <= 6; day++) {
      f.clock.set(new Date(start.getTime() + day * MINUTE));
      expect((await r.run()).devices).toBe(0);
      expect((await runCron(f)).devices.rollouts).toMatchObject({ devices: 0, waves: 0 });
    }
    view = await getRollout(f, rollout.id);
    expect(view.waves.slice(3).map((w) => w.state)).toEqual(['scheduled', 'scheduled', 'scheduled', 'scheduled']);
    expect(view.totals.done).toBe(inWave(0).length + inWave(1).length + view.waves[2]!.done);

    // resumed (the cause fixed): the halted wave goes on; later waves are due 4 minutes later than planned
    const resumed = await control(f, rollout.id, 'resume');
    expect(resumed.status, resumed.raw).toBe(200);
    expect(resumed.body).toMatchObject({ state: 'running', haltedWave: null, haltReason: null });
    const fixed = runner(f, { chunkSize: 50, workers: 1 });
    await fixed.run();
    view = await getRollout(f, rollout.id);
    expect(view.waves[2]).toMatchObject({ state: 'completed', pending: 0, done: inWave(2).length - view.waves[2]!.failed });
    expect(view.waves[3]).toMatchObject({ state: 'scheduled', dueAt: new Date(start.getTime() + 7 * MINUTE).toISOString() });
    expect(await events(f, { action: 'rollout.resume' })).toHaveLength(1);

    f.clock.set(new Date(start.getTime() + 11 * MINUTE));
    await fixed.run();
    view = await getRollout(f, rollout.id);
    // the devices that failed before the halt stay failed (on their previous key); all others are rotated
    expect(view).toMatchObject({ state: 'completed', totals: { devices: 1000, failed: failedItems.length, done: 1000 - failedItems.length, pending: 0 } });
    // every device on exactly one primary, rotated at most once
    for (const [, s] of await deviceStates(f, 'pumps')) {
      expect(s.versions.filter((v) => v.state === 'primary')).toHaveLength(1);
      expect(s.versions.length).toBeLessThanOrEqual(2);
    }
  });

  it('when the halted wave is rolled back, then its rotated devices are on their previous primary again, the new versions are disabled, and every key still unwraps and is delivered as before', async () => {
    const valves = await createGroup(f, 'valves', 300);
    const withFields = valves.slice(0, 60);
    for (const id of withFields) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field: 'patient_id' })).status).toBe(201);
    const keysBefore = await storedDeviceKeys(f, 'valves');
    const fieldBefore = new Map<string, Buffer>();
    for (const id of withFields) fieldBefore.set(id, await storedFieldKey(f, 'valves', id, 'patient_id', 1));

    const start = f.clock.now();
    const rollout = await startRollout(f, { groupId: 'valves', percentPerDay: 50, waveIntervalSeconds: 60, haltThreshold: 0.02, rollbackOnHalt: true });
    const { waveOf } = await wavesOf(f, rollout.id);
    const wave1 = valves.filter((id) => waveOf(id) === 1).sort();
    const wave0 = valves.filter((id) => waveOf(id) === 0);
    // the first chunk of wave 1 (40 devices, in id order): every fourth fails
    const failing = new Set(wave1.slice(0, 40).filter((_, i) => i % 4 === 3));
    const rotatedThenRolledBack = wave1.slice(0, 40).filter((id) => !failing.has(id));
    const r = runner(f, { chunkSize: 40, workers: 1, failDevice: (id) => failing.has(id) });

    await r.run();
    f.clock.set(new Date(start.getTime() + MINUTE));
    const result = await r.run();
    expect(result.halted).toEqual([{ rolloutId: rollout.id, groupId: 'valves', wave: 1, rolledBack: true }]);

    const view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'rolled_back', haltedWave: 1 });
    expect(view.waves[0]).toMatchObject({ state: 'completed', done: wave0.length });
    expect(view.waves[1]).toMatchObject({ state: 'rolled_back', done: 0, failed: 10, rolledBack: 30, rollbackFailed: 0, pending: wave1.length - 40 });
    expect(view.waves[2]).toMatchObject({ kind: 'sweep', state: 'cancelled' });

    const states = await deviceStates(f, 'valves');
    for (const id of rotatedThenRolledBack) expect(states.get(id)!.versions.map((v) => [v.version, v.state]), id).toEqual([[1, 'primary'], [2, 'disabled']]);
    for (const id of failing) expect(states.get(id)!.versions.map((v) => [v.version, v.state])).toEqual([[1, 'primary']]);
    for (const id of wave1.slice(40)) expect(states.get(id)!.versions.map((v) => [v.version, v.state])).toEqual([[1, 'primary']]);
    for (const id of wave0) expect(states.get(id)!.primary).toBe(2); // earlier waves stay rotated

    // every key unwraps: the previous ones are the very same keys
    const keysAfter = await storedDeviceKeys(f, 'valves');
    for (const [kid, key] of keysBefore) expect(keysAfter.get(kid)!.equals(key), kid).toBe(true);
    for (const id of withFields) {
      const parent = (await f.t.database.db.selectFrom('field_versions').select('parent_version').where('device_id', '=', id).executeTakeFirstOrThrow()).parent_version;
      expect(parent).toBe(waveOf(id) === 0 ? 2 : 1);
      expect((await storedFieldKey(f, 'valves', id, 'patient_id', 1)).equals(fieldBefore.get(id)!)).toBe(true);
    }
    // fetched through the API: the previous key is the primary again, the disabled one is not delivered
    for (const id of rotatedThenRolledBack.slice(0, 5)) {
      const delivered = await fetchDeviceKeys(f, id);
      expect(delivered.map((k) => [k.kid, k.state])).toEqual([[`${id}:v1`, 'primary']]);
      expect(Buffer.from(delivered[0]!.k, 'base64url').equals(keysBefore.get(`${id}:v1`)!)).toBe(true);
    }
    // the devices hear of it: new key, then back to the previous one, and the new one disabled
    const outbox = await f.t.database.db
      .withTables<{ key_outbox: { id: number; device_id: string; kind: string; version: number; state: string; with_key: boolean } }>()
      .selectFrom('key_outbox')
      .select(['version', 'state', 'with_key'])
      .where('device_id', '=', rotatedThenRolledBack[0]!)
      .where('kind', '=', 'device')
      .orderBy('id')
      .execute();
    expect(outbox).toEqual([
      { version: 2, state: 'primary', with_key: true },
      { version: 1, state: 'primary', with_key: false },
      { version: 2, state: 'disabled', with_key: false },
    ]);
    expect((await events(f, { action: 'device.rollback' })).filter((e) => e.outcome === 'success')).toHaveLength(30);
    expect(await events(f, { action: 'rollout.rolled_back' })).toHaveLength(1);
    expect((await f.t.audit.verify()).ok).toBe(true);

    // finished: cron leaves it alone, and it cannot be resumed or cancelled
    f.clock.set(new Date(start.getTime() + 5 * MINUTE));
    expect((await r.run()).devices).toBe(0);
    expectProblem(await control(f, rollout.id, 'resume'), 409, 'illegal_rollout_transition');
    expectProblem(await control(f, rollout.id, 'cancel'), 409, 'illegal_rollout_transition');
  });
});

async function runCron(f: Fleet) {
  const response = await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', {});
  expect(response.status, response.raw).toBe(200);
  return response.body as { devices: { rollouts: unknown } };
}
