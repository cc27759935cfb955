/**
 * Group DEK rotation: a new primary, every device version moved to it in chunks (same device
 * key material, AAD of the new parent), delivered keys unchanged, an interrupted rewrap
 * finished by a re-run with nothing lost, two runners splitting the work, retirement of the
 * old version only once nothing is wrapped under it and the retention allows.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createRotation } from '../../src/rotation/index.js';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, createGroup, DAY, events, fetchDeviceKeys, runCron, setPolicies, storedDeviceKeys, type Fleet } from './support.js';

describe('group rotation', () => {
  let f: Fleet;
  let ids: string[];
  beforeAll(async () => {
    f = await createFleet({ readerGroups: ['pumps', 'monitors', 'solo'] });
    ids = await createGroup(f, 'pumps', 2_000);
  });
  afterAll(async () => f.close());

  it('when an admin rotates a group, then every device version moves to the new primary with the same material, and deliveries do not change', async () => {
    const before = await storedDeviceKeys(f, 'pumps');
    expect(before.size).toBe(2_000);
    const deliveredBefore = await fetchDeviceKeys(f, ids[7]!);

    const response = await call(f.t.app, f.admin, 'POST', '/v1/groups/pumps/rotate', {});
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({ groupId: 'pumps', fromVersion: 1, toVersion: 2, rewrap: { rewrapped: 2_000, failed: 0, remaining: 0, chunks: 4 } });

    const versions = await f.t.database.db.selectFrom('group_versions').select(['version', 'state']).where('group_id', '=', 'pumps').orderBy('version').execute();
    expect(versions).toEqual([
      { version: 1, state: 'decrypt_only' },
      { version: 2, state: 'primary' },
    ]);
    const parents = await f.t.database.db.selectFrom('device_versions').select('parent_version').distinct().execute();
    expect(parents).toEqual([{ parent_version: 2 }]);

    const after = await storedDeviceKeys(f, 'pumps');
    expect(after.size).toBe(2_000);
    for (const [key, material] of before) expect(after.get(key)?.equals(material), key).toBe(true);
    const deliveredAfter = await fetchDeviceKeys(f, ids[7]!);
    expect(deliveredAfter.map((k) => k.k)).toEqual(deliveredBefore.map((k) => k.k));
    expect(Buffer.from(deliveredAfter[0]!.k, 'base64url').equals(after.get(`${ids[7]}:v1`)!)).toBe(true);

    const rotate = await events(f, { action: 'group.rotate', keyId: 'group:pumps' });
    expect(rotate).toHaveLength(1);
    expect(rotate[0]).toMatchObject({ actor: 'alice', outcome: 'success', details: { fromVersion: 1, toVersion: 2, reason: 'manual' } });
    const moved = await events(f, { action: 'device.group_rewrap' });
    expect(moved).toHaveLength(2_000);
    expect(moved[0]).toMatchObject({ outcome: 'success', details: { groupId: 'pumps', fromGroupVersion: 1, toGroupVersion: 2 } });
    // nothing but ids and versions: no blob, no key
    expect(JSON.stringify(moved.map((e) => e.details))).not.toMatch(/[A-Za-z0-9+/=]{24,}/);
  });

  it('when the rewrap is interrupted between chunks, then no key is lost meanwhile and a cron run finishes it', async () => {
    const monitors = await createGroup(f, 'monitors', 1_200);
    const before = await storedDeviceKeys(f, 'monitors');
    let chunks = 0;
    const crashing = createRotation({
      db: f.t.database.db,
      kek: f.t.kek,
      material: createKeyMaterial({ kek: f.t.kek, cache: createKeyCache({ ttlSeconds: 60, maxEntries: 100 }) }),
      audit: f.t.audit,
      clock: f.clock,
      childChunkSize: 250,
      hooks: {
        afterChildChunk() {
          chunks += 1;
          if (chunks === 2) throw new Error('injected crash between chunks');
        },
      },
    });
    await expect(crashing.groupRotation.rotate({ actor: 'alice' }, 'monitors', { limit: 100_000 })).rejects.toThrow('injected crash');

    // half-way: 500 moved, 700 still under v1, and every key still unwraps to its material
    const half = await f.t.database.db
      .selectFrom('device_versions as dv')
      .innerJoin('devices as d', 'd.id', 'dv.device_id')
      .select(['dv.parent_version'])
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .where('d.group_id', '=', 'monitors')
      .groupBy('dv.parent_version')
      .orderBy('dv.parent_version')
      .execute();
    expect(half.map((r) => [r.parent_version, Number(r.n)])).toEqual([
      [1, 700],
      [2, 500],
    ]);
    const during = await storedDeviceKeys(f, 'monitors');
    for (const [key, material] of before) expect(during.get(key)?.equals(material), key).toBe(true);
    expect((await fetchDeviceKeys(f, monitors[0]!))[0]!.k).toBe((await fetchDeviceKeys(f, monitors[0]!))[0]!.k);
    const debt = await call(f.t.app, f.admin, 'GET', '/v1/groups/monitors/rotation-status');
    expect(debt.status, debt.raw).toBe(200);
    expect(debt.body).toMatchObject({
      group: { primaryVersion: 2, versions: [{ version: 1, state: 'decrypt_only', deviceVersionsWrapped: 700, retirement: { blockedBy: ['children', 'retention'] } }, { version: 2, deviceVersionsWrapped: 500, retirement: null }] },
      devices: { wrappedUnderOldGroupVersions: 700 },
    });

    const summary = await runCron(f);
    expect(summary.groups.rotated).toEqual([]); // nothing is due: v2 is new
    expect(summary.groups.children).toMatchObject({ rewrapped: 700, failed: 0, remaining: 0 });
    const after = await storedDeviceKeys(f, 'monitors');
    expect(after.size).toBe(1_200);
    for (const [key, material] of before) expect(after.get(key)?.equals(material), key).toBe(true);
    expect((await events(f, { action: 'device.group_rewrap', keyIdPrefix: 'device:monitors-' })).length).toBe(1_200);
  });

  it('when two runners move the same group at once, then they split the work and each device version moves once', async () => {
    await createGroup(f, 'solo', 3_000);
    const material = () => createKeyMaterial({ kek: f.t.kek, cache: createKeyCache({ ttlSeconds: 60, maxEntries: 100 }) });
    const parts = { db: f.t.database.db, kek: f.t.kek, audit: f.t.audit, clock: f.clock, childChunkSize: 100 };
    const a = createRotation({ ...parts, material: material() });
    const b = createRotation({ ...parts, material: material() });
    await a.groupRotation.start({ actor: 'alice' }, 'solo', { reason: 'manual' });
    const [ra, rb] = await Promise.all([a.groupRotation.rewrapChildren({ actor: 'a' }, 'solo', { limit: 10_000 }), b.groupRotation.rewrapChildren({ actor: 'b' }, 'solo', { limit: 10_000 })]);
    expect(ra.rewrapped + rb.rewrapped).toBe(3_000);
    // each counted what was left when it finished; once both are done, nothing is
    expect(Math.min(ra.remaining, rb.remaining)).toBe(0);
    const parents = await f.t.database.db.selectFrom('device_versions as dv').innerJoin('devices as d', 'd.id', 'dv.device_id').select('dv.parent_version').distinct().where('d.group_id', '=', 'solo').execute();
    expect(parents).toEqual([{ parent_version: 2 }]);
    expect(ra.rewrapped).toBeGreaterThan(0);
    expect(rb.rewrapped).toBeGreaterThan(0);
    expect((await events(f, { action: 'device.group_rewrap', keyIdPrefix: 'device:solo-' })).length).toBe(3_000);
  });

  it('when the old version has no children and its retention is over, then cron schedules it, waits, and erases it', async () => {
    await setPolicies(f, { group: { retentionDays: 10, destructionWaitDays: 3 } });
    f.clock.advance(9 * DAY);
    expect((await runCron(f)).groups.retired).toEqual([]);
    f.clock.advance(1 * DAY + 1000);
    const scheduled = await runCron(f);
    expect(scheduled.groups.retired.filter((r) => r.groupId === 'pumps')).toEqual([{ groupId: 'pumps', version: 1, from: 'decrypt_only', to: 'destroy_scheduled', destroyAfter: expect.any(String) }]);
    const status = await call(f.t.app, f.admin, 'GET', '/v1/groups/pumps/rotation-status');
    expect(status.body).toMatchObject({ group: { versions: [{ version: 1, state: 'destroy_scheduled', retirement: { blockedBy: ['waiting_period'] } }, { version: 2 }] } });
    f.clock.advance(3 * DAY);
    const destroyed = await runCron(f);
    expect(destroyed.groups.retired.filter((r) => r.groupId === 'pumps')).toEqual([{ groupId: 'pumps', version: 1, from: 'destroy_scheduled', to: 'destroyed' }]);
    const row = await f.t.database.db.selectFrom('group_versions').selectAll().where('group_id', '=', 'pumps').where('version', '=', 1).executeTakeFirstOrThrow();
    expect(row).toMatchObject({ state: 'destroyed', wrapped_key: null });
    expect(await events(f, { action: 'group.version.destroy', keyId: 'group:pumps' })).toHaveLength(1);
    // the devices did not notice
    expect((await storedDeviceKeys(f, 'pumps')).size).toBe(2_000);
    await fetchDeviceKeys(f, ids[1]!);
  });

  it('when the group or its primary is missing, then 404 and 409', async () => {
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/groups/nope/rotate', {}), 404);
    expectProblem(await call(f.t.app, f.admin, 'GET', '/v1/groups/nope/rotation-status'), 404);
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/groups/pumps/rotate', {}), 403);
  });
});
