/** Immediate device and field key rotation: POST /v1/devices/{id}/rotate and …/fields/{field}/rotate. */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inject } from 'vitest';
import { call, expectProblem } from '../support/flow.js';
import { DAY, createFleet, deviceRows, enrol, events, fetchBulk, fetchKeys, fieldRows, keyBytes, storedDeviceKey, storedFieldKey, type Fleet } from './support.js';

describe('device and field key rotation', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['pump-1', 'pump-2', 'pump-3', 'pump-4', 'pump-5', 'pump-6'], ['patient_id', 'dose']);
  });
  afterAll(async () => f.close());

  it('when a device is rotated, then the new primary is delivered and equals the stored key, and the old one is still delivered in grace', async () => {
    const before = await fetchKeys(f, 'pump-1');
    const oldKey = keyBytes(before.keys[0]);
    const now = f.clock.now();

    const rotated = await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-1/rotate', {});
    expect(rotated.status, rotated.raw).toBe(200);
    const graceUntil = new Date(now.getTime() + 7 * DAY).toISOString();
    expect(rotated.body).toMatchObject({
      id: 'pump-1',
      versions: [
        { version: 1, state: 'grace', parentVersion: 1, stateUntil: graceUntil },
        { version: 2, state: 'primary', parentVersion: 1, stateUntil: null },
      ],
    });

    const rows = await deviceRows(f, 'pump-1');
    expect(rows.map((r) => [r.version, r.state, r.parent_version])).toEqual([
      [1, 'grace', 1],
      [2, 'primary', 1],
    ]);
    expect(rows[0]!.state_until?.toISOString()).toBe(graceUntil);

    const after = await fetchKeys(f, 'pump-1');
    expect(after.status).toBe(200);
    const byKid = new Map(after.keys.map((k) => [k.kid, k]));
    expect(byKid.get('pump-1:v1')).toMatchObject({ state: 'grace', stateUntil: graceUntil });
    expect(byKid.get('pump-1:v2')).toMatchObject({ state: 'primary', stateUntil: null });
    expect(keyBytes(byKid.get('pump-1:v1'))).toEqual(oldKey);
    const newKey = keyBytes(byKid.get('pump-1:v2'));
    expect(newKey).toEqual(await storedDeviceKey(f, 'pump-1', 2));
    expect(newKey).not.toEqual(oldKey);

    // no key material in the logs or the audit log
    const trail = JSON.stringify(await events(f, { keyIdPrefix: 'device:pump-1' }));
    for (const text of [...f.t.logs, trail]) {
      expect(text).not.toContain(newKey.toString('base64url'));
      expect(text).not.toContain(newKey.toString('base64'));
      expect(text).not.toContain(newKey.toString('hex'));
    }
  });

  it('when a device is rotated, then its field keys keep their material, rewrapped under the new device version', async () => {
    const deliveredBefore = await fetchBulk(f, [
      { deviceId: 'pump-2', field: 'patient_id' },
      { deviceId: 'pump-2', field: 'dose' },
    ]);
    const blobsBefore = await fieldRows(f, 'pump-2');
    expect(blobsBefore.map((r) => r.parent_version)).toEqual([1, 1]);

    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-2/rotate', {})).status).toBe(200);

    const rows = await fieldRows(f, 'pump-2');
    expect(rows.map((r) => [r.field, r.version, r.state, r.parent_version])).toEqual([
      ['dose', 1, 'primary', 2],
      ['patient_id', 1, 'primary', 2],
    ]);
    for (const [i, row] of rows.entries()) expect(row.wrapped_key).not.toEqual(blobsBefore[i]!.wrapped_key);
    // unwrapped independently under device v2 with the v2 binding: the same key as before
    for (const k of deliveredBefore.keys) {
      expect(await storedFieldKey(f, 'pump-2', k.field as string, 1)).toEqual(keyBytes(k));
    }
    const deliveredAfter = await fetchBulk(f, [
      { deviceId: 'pump-2', field: 'patient_id' },
      { deviceId: 'pump-2', field: 'dose' },
    ]);
    expect(deliveredAfter.keys.map((k) => [k.kid, k.k])).toEqual(deliveredBefore.keys.map((k) => [k.kid, k.k]));

    const rewraps = await events(f, { action: 'field_key.rewrap', keyIdPrefix: 'field:pump-2/' });
    expect(rewraps.map((e) => [e.keyId, e.details])).toEqual(
      expect.arrayContaining([
        ['field:pump-2/patient_id', { versions: [1], fromDeviceVersions: [1], toDeviceVersion: 2 }],
        ['field:pump-2/dose', { versions: [1], fromDeviceVersions: [1], toDeviceVersion: 2 }],
      ]),
    );
    const [rotation] = await events(f, { action: 'device.rotate', keyId: 'device:pump-2' });
    expect(rotation).toMatchObject({ actor: 'alice', outcome: 'success', details: { version: 2, previousVersion: 1, previousVersionState: 'grace', compromised: false, fieldVersionsRewrapped: 2 } });
  });

  it('when a device is rotated as compromised, then the old primary is disabled at once and no longer delivered', async () => {
    const rotated = await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-3/rotate', { compromised: true });
    expect(rotated.status).toBe(200);
    expect((await deviceRows(f, 'pump-3')).map((r) => [r.version, r.state, r.state_until])).toEqual([
      [1, 'disabled', null],
      [2, 'primary', null],
    ]);
    const all = await fetchKeys(f, 'pump-3');
    expect(all.keys.map((k) => k.kid)).toEqual(['pump-3:v2']);
    expectProblem(await fetchKeys(f, 'pump-3', { version: 1 }), 409, 'version_not_deliverable');
    const [rotation] = await events(f, { action: 'device.rotate', keyId: 'device:pump-3' });
    expect(rotation?.details).toMatchObject({ compromised: true, reason: 'compromise', previousVersionState: 'disabled' });
  });

  it('when a field key is rotated, then a new primary under the device primary is delivered and the old one is in grace', async () => {
    const before = await fetchKeys(f, 'pump-4', { field: 'dose' });
    const rotated = await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-4/fields/dose/rotate', {});
    expect(rotated.status, rotated.raw).toBe(200);
    const dose = (rotated.body.fields as Array<{ field: string; versions: unknown[] }>).find((x) => x.field === 'dose');
    expect(dose?.versions).toMatchObject([
      { version: 1, state: 'grace', parentVersion: 1 },
      { version: 2, state: 'primary', parentVersion: 1, stateUntil: null },
    ]);
    const after = await fetchKeys(f, 'pump-4', { field: 'dose' });
    const byKid = new Map(after.keys.map((k) => [k.kid, k]));
    expect(keyBytes(byKid.get('pump-4/dose:v1'))).toEqual(keyBytes(before.keys[0]));
    expect(byKid.get('pump-4/dose:v1')?.state).toBe('grace');
    expect(keyBytes(byKid.get('pump-4/dose:v2'))).toEqual(await storedFieldKey(f, 'pump-4', 'dose', 2));
    // the other field key is untouched
    expect((await fieldRows(f, 'pump-4', 'patient_id')).map((r) => [r.version, r.state])).toEqual([[1, 'primary']]);
    expect(await events(f, { action: 'field_key.rotate', keyId: 'field:pump-4/dose' })).toHaveLength(1);

    // a later device rotation moves both versions of the field key
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-4/rotate', {})).status).toBe(200);
    expect((await fieldRows(f, 'pump-4', 'dose')).map((r) => [r.version, r.parent_version])).toEqual([
      [1, 2],
      [2, 2],
    ]);
    expect(await storedFieldKey(f, 'pump-4', 'dose', 1)).toEqual(keyBytes(byKid.get('pump-4/dose:v1')));
  });

  it('when the rotated device or field key does not exist, then 404', async () => {
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/nope/rotate', {}), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-5/fields/nope/rotate', {}), 404);
  });

  it('when the body has an unknown member, then 400', async () => {
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-5/rotate', { compromized: true }), 400);
  });

  it('when a reader (not admin) rotates, then 403', async () => {
    expectProblem(await call(f.t.app, f.reader, 'POST', '/v1/devices/pump-5/rotate', {}), 403);
  });

  it('when the device is scheduled for destruction, then rotation is refused with 409', async () => {
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/pump-6')).status).toBe(202);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-6/rotate', {}), 409, 'device_destruction_scheduled');
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/pump-6/fields/dose/rotate', {}), 409, 'device_destruction_scheduled');
    expect((await deviceRows(f, 'pump-6')).map((r) => r.state)).toEqual(['destroy_scheduled']);
  });
});

describe.skipIf(inject('testDb').mode !== 'postgres')('concurrent rotations of one device', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['race-1'], ['patient_id']);
  });
  afterAll(async () => f.close());

  it('when two rotations run at once, then exactly one succeeds and the device has exactly one new primary', async () => {
    // hold the device row so both requests read the same primary, then queue on the lock
    const blocker = new pg.Client({ connectionString: f.t.database.url });
    // watched from outside the blocker's transaction (pg_stat_activity is a snapshot inside one)
    const monitor = new pg.Client({ connectionString: f.t.database.url });
    await blocker.connect();
    await monitor.connect();
    try {
      await blocker.query('begin');
      await blocker.query(`select id from devices where id = 'race-1' for update`);
      const both = Promise.all([
        call(f.t.app, f.admin, 'POST', '/v1/devices/race-1/rotate', {}),
        call(f.t.app, f.admin, 'POST', '/v1/devices/race-1/rotate', {}),
      ]);
      await waitForLockWaiters(monitor, 2);
      await blocker.query('commit');
      const statuses = (await both).map((r) => r.status).sort();
      expect(statuses).toEqual([200, 409]);
      const loser = (await both).find((r) => r.status === 409);
      expect(loser?.body.code).toBe('concurrent_rotation');
    } finally {
      await blocker.end();
      await monitor.end();
    }
    const rows = await deviceRows(f, 'race-1');
    expect(rows.map((r) => [r.version, r.state])).toEqual([
      [1, 'grace'],
      [2, 'primary'],
    ]);
    expect((await fieldRows(f, 'race-1')).map((r) => r.parent_version)).toEqual([2]);
    expect(await events(f, { action: 'device.rotate', keyId: 'device:race-1' })).toHaveLength(1);
  });

  it('when many rotations race without coordination, then there is never more than one primary and every success made exactly one version', async () => {
    const results = await Promise.all(Array.from({ length: 6 }, () => call(f.t.app, f.admin, 'POST', '/v1/devices/race-1/rotate', {})));
    const ok = results.filter((r) => r.status === 200).length;
    expect(ok).toBeGreaterThanOrEqual(1);
    for (const r of results) expect([200, 409]).toContain(r.status);
    const rows = await deviceRows(f, 'race-1');
    expect(rows).toHaveLength(2 + ok);
    expect(rows.filter((r) => r.state === 'primary')).toHaveLength(1);
    expect(rows.at(-1)?.state).toBe('primary');
    const primary = rows.at(-1)!.version;
    expect((await fieldRows(f, 'race-1')).map((r) => r.parent_version)).toEqual([primary]);
    expect(await storedFieldKey(f, 'race-1', 'patient_id', 1)).toHaveLength(32);
    expect(await storedDeviceKey(f, 'race-1', primary)).toHaveLength(32);
  });
});

async function waitForLockWaiters(client: pg.Client, n: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const { rows } = await client.query<{ n: string }>(
      `select count(*) as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' and pid <> pg_backend_pid()`,
    );
    if (Number(rows[0]?.n) >= n) return;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error(`fewer than ${n} transactions waited on the lock`);
}
