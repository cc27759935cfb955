/**
 * Rollouts the cron entry starts by itself, and field-level rollouts. When a group's device level
 * falls due, a dry run reports the rollout that would start and changes nothing, the real run
 * starts it (reason `policy`, the policy's settings) and rotates its first wave, and no second
 * one starts while it is active or within a rotation period of its start; a group outside its
 * maintenance windows waits for them. rotation-status shows the active rollout. A field-level
 * rollout rotates the named field key (or every one) of the devices that have it, under each
 * device's primary DEK, and lists no other device.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpDatabase } from '../rotation/support.js';
import { call, decryptKeySet } from '../support/flow.js';
import { createFleet, createGroup, DAY, events, getRollout, runCron, runner, startRollout, storedFieldKey, type Fleet } from './support.js';

interface RolloutsSummary {
  started: Array<{ rolloutId: string | null; groupId: string; level: string }>;
  waves: number;
  devices: number;
  failed: number;
  more: boolean;
}
const rolloutsOf = (summary: { devices: { rollouts: unknown } }) => summary.devices.rollouts as RolloutsSummary;

describe('rollouts started by the cron entry', () => {
  let f: Fleet;
  let windowStartHour: number;
  beforeAll(async () => {
    f = await createFleet({ readerGroups: ['north', 'south', 'east'] });
    await createGroup(f, 'north', 200);
    await createGroup(f, 'south', 50);
    // south may start rotations only in a one-hour window opening two hours from now, every day
    windowStartHour = (f.clock.now().getUTCHours() + 2) % 24;
    const hh = (h: number) => String(h % 24).padStart(2, '0');
    const put = await call(f.t.app, f.admin, 'PUT', '/v1/groups/south/policy', { maintenanceWindows: [{ days: [1, 2, 3, 4, 5, 6, 7], start: `${hh(windowStartHour)}:00`, end: `${hh(windowStartHour + 1)}:00`, tz: 'UTC' }] });
    expect(put.status, put.raw).toBe(200);
  });
  afterAll(async () => f.close());

  it('when a group’s device level falls due, then a dry run reports the rollout that would start and changes nothing; the real run starts it and rotates its first wave; the next run starts no second one', async () => {
    f.clock.advance(31 * DAY);
    const before = await dumpDatabase(f);
    const dry = await runCron(f, { dryRun: true });
    expect(await dumpDatabase(f)).toBe(before);
    // south is due too, but outside its window
    expect(rolloutsOf(dry)).toMatchObject({ started: [{ rolloutId: null, groupId: 'north', level: 'device' }], devices: 0 });

    const real = await runCron(f);
    expect(real.errors).toEqual([]);
    const started = rolloutsOf(real).started;
    expect(started).toEqual([{ rolloutId: expect.stringMatching(/^ro-/), groupId: 'north', level: 'device' }]);
    const rollout = await getRollout(f, started[0]!.rolloutId!);
    expect(rollout).toMatchObject({ reason: 'policy', state: 'running', percentPerDay: 10, haltThreshold: 0.01, waveCount: 10, currentWave: 1 });
    expect(rollout.waves[0]).toMatchObject({ state: 'completed', failed: 0 });
    expect(rollout.waves[0]!.done).toBe(rolloutsOf(real).devices);
    expect((await events(f, { action: 'rollout.start' }))[0]).toMatchObject({ actor: 'cron', details: { reason: 'policy', level: 'device' } });

    const again = await runCron(f);
    expect(rolloutsOf(again)).toMatchObject({ started: [], devices: 0 });
    const status = await call(f.t.app, f.admin, 'GET', '/v1/groups/north/rotation-status');
    expect(status.status, status.raw).toBe(200);
    expect(status.body).toMatchObject({
      devices: { rollout: { rolloutId: rollout.id, state: 'running', devicesOnOldVersions: 200 - rollout.waves[0]!.done } },
      fields: { rollout: null },
    });
  });

  it('when the group’s maintenance window opens, then its rollout starts', async () => {
    const now = f.clock.now();
    let open = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate(), windowStartHour, 15));
    if (open <= now) open = new Date(open.getTime() + DAY);
    f.clock.set(open);
    const inside = await runCron(f);
    expect(rolloutsOf(inside).started).toEqual([{ rolloutId: expect.stringMatching(/^ro-/), groupId: 'south', level: 'device' }]);
  });

  it('when a rollout has finished, then the level falls due again only a rotation period after that rollout started', async () => {
    const list = await call(f.t.app, f.admin, 'GET', '/v1/rollouts?groupId=north');
    const first = (list.body.items as Array<{ id: string; startedAt: string }>)[0]!;
    const startedAt = new Date(first.startedAt).getTime();
    for (let day = 1; day <= 12; day++) {
      f.clock.set(new Date(startedAt + day * DAY));
      expect(rolloutsOf(await runCron(f)).started.filter((s) => s.groupId === 'north')).toEqual([]);
    }
    expect((await getRollout(f, first.id)).state).toBe('completed');
    f.clock.set(new Date(startedAt + 29 * DAY));
    expect(rolloutsOf(await runCron(f)).started.filter((s) => s.groupId === 'north')).toEqual([]);
    f.clock.set(new Date(startedAt + 31 * DAY));
    expect(rolloutsOf(await runCron(f)).started.filter((s) => s.groupId === 'north')).toEqual([{ rolloutId: expect.stringMatching(/^ro-/), groupId: 'north', level: 'device' }]);
  });

  it('when a field-level rollout names a field, then that field key of every device that has it gets a new primary under the device’s primary DEK, and no other key or device is touched', async () => {
    const ids = await createGroup(f, 'east', 40);
    const patients = ids.slice(0, 20);
    const hearts = ids.slice(0, 10);
    for (const id of patients) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field: 'patient_id' })).status).toBe(201);
    for (const id of hearts) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field: 'heart_rate' })).status).toBe(201);
    const before = new Map<string, Buffer>();
    for (const id of patients) before.set(id, await storedFieldKey(f, 'east', id, 'patient_id', 1));

    const rollout = await startRollout(f, { groupId: 'east', level: 'field', field: 'patient_id', percentPerDay: 100 });
    const result = await runner(f).run();
    expect(result).toMatchObject({ errors: [], failed: 0, fields: 20 });
    const view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'completed', devicesOnOldVersions: 0, totals: { devices: 20, done: 20, skipped: 0 } });

    const rows = await f.t.database.db
      .selectFrom('field_versions')
      .select(['device_id', 'field', 'version', 'state', 'parent_version'])
      .where('device_id', 'like', 'east-%')
      .orderBy('device_id')
      .orderBy('field')
      .orderBy('version')
      .execute();
    for (const id of patients) {
      expect(rows.filter((r) => r.device_id === id && r.field === 'patient_id').map((r) => [r.version, r.state, r.parent_version])).toEqual([
        [1, 'grace', 1],
        [2, 'primary', 1],
      ]);
      expect((await storedFieldKey(f, 'east', id, 'patient_id', 1)).equals(before.get(id)!)).toBe(true);
    }
    for (const id of hearts) expect(rows.filter((r) => r.device_id === id && r.field === 'heart_rate').map((r) => [r.version, r.state])).toEqual([[1, 'primary']]);
    // the device DEKs were not rotated
    expect(await f.t.database.db.selectFrom('device_versions').select('version').where('device_id', 'like', 'east-%').where('version', '>', 1).execute()).toEqual([]);
    // delivered as stored, and announced to the device
    const delivered = await call(f.t.app, f.reader, 'GET', `/v1/devices/${patients[0]}/fields/patient_id/keys?version=2`);
    expect(delivered.status, delivered.raw).toBe(200);
    const [key] = await decryptKeySet(delivered.body.jwe as string, f.backend.privateKey);
    expect(key).toMatchObject({ kid: `${patients[0]}/patient_id:v2`, state: 'primary' });
    expect(Buffer.from(key!.k, 'base64url').equals(await storedFieldKey(f, 'east', patients[0]!, 'patient_id', 2))).toBe(true);
    const outbox = await f.t.database.db
      .withTables<{ key_outbox: { device_id: string; kind: string; field: string; version: number; with_key: boolean } }>()
      .selectFrom('key_outbox')
      .select(['device_id'])
      .where('kind', '=', 'field')
      .where('field', '=', 'patient_id')
      .where('version', '=', 2)
      .where('with_key', '=', true)
      .execute();
    expect(outbox).toHaveLength(20);
    expect((await events(f, { action: 'field_key.rotate', keyIdPrefix: 'field:east-' })).filter((e) => (e.details as { rolloutId?: string }).rolloutId === rollout.id)).toHaveLength(20);

    // every field: the other field keys follow
    const all = await startRollout(f, { groupId: 'east', level: 'field', percentPerDay: 100 });
    expect((await runner(f).run()).fields).toBe(30);
    expect(await getRollout(f, all.id)).toMatchObject({ state: 'completed', totals: { devices: 20, done: 20 } });
    const after = await f.t.database.db.selectFrom('field_versions').select(['device_id', 'field', 'version']).where('device_id', 'like', 'east-%').where('state', '=', 'primary').execute();
    expect(after.filter((r) => r.field === 'patient_id').every((r) => r.version === 3)).toBe(true);
    expect(after.filter((r) => r.field === 'heart_rate').every((r) => r.version === 2)).toBe(true);
  });
});
