/** Crypto-shredding: DELETE /v1/devices/{id} (202), restore within the waiting period, erasure by destroyDue, 410 after. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, expectProblem } from '../support/flow.js';
import { DAY, createFleet, deviceRows, enrol, events, fetchBulk, fetchKeys, fieldRows, keyBytes, snapshot, storedDeviceKey, storedFieldKey, type Fleet } from './support.js';

describe('crypto-shredding', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['meter-1', 'meter-2', 'meter-3', 'meter-4', 'meter-5'], ['patient_id', 'location']);
  });
  afterAll(async () => f.close());

  it('when a device is shredded and then restored, then every version is refused during the wait and comes back exactly as it was', async () => {
    // give meter-1 a grace version and a field key with two versions first
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-1/rotate', {})).status).toBe(200);
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-1/fields/location/rotate', {})).status).toBe(200);
    const before = await fetchBulk(f, [{ deviceId: 'meter-1' }, { deviceId: 'meter-1', field: 'patient_id' }, { deviceId: 'meter-1', field: 'location' }]);
    expect(before.keys.map((k) => k.kid).sort()).toEqual(['meter-1/location:v1', 'meter-1/location:v2', 'meter-1/patient_id:v1', 'meter-1:v1', 'meter-1:v2']);
    const rowsBefore = { devices: await deviceRows(f, 'meter-1'), fields: await fieldRows(f, 'meter-1') };

    const now = f.clock.now();
    const shred = await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-1');
    expect(shred.status, shred.raw).toBe(202);
    const destroyAfter = new Date(now.getTime() + 7 * DAY).toISOString();
    expect(shred.body).toEqual({
      deviceId: 'meter-1',
      destroyAfter,
      waitDays: 7,
      versions: [
        { version: 1, previousState: 'grace', stateUntil: destroyAfter },
        { version: 2, previousState: 'primary', stateUntil: destroyAfter },
        { field: 'location', version: 1, previousState: 'grace', stateUntil: destroyAfter },
        { field: 'location', version: 2, previousState: 'primary', stateUntil: destroyAfter },
        { field: 'patient_id', version: 1, previousState: 'primary', stateUntil: destroyAfter },
      ],
    });
    const scheduled = [...(await deviceRows(f, 'meter-1')), ...(await fieldRows(f, 'meter-1'))];
    for (const row of scheduled) {
      expect(row.state).toBe('destroy_scheduled');
      expect(row.state_until?.toISOString()).toBe(destroyAfter);
      expect(row.wrapped_key).not.toBeNull();
    }
    expect(scheduled.map((r) => r.state_before_destroy)).toEqual(['grace', 'primary', 'grace', 'primary', 'primary']);

    // not deliverable while waiting: single fetch 409, bulk lists them as missing
    expectProblem(await fetchKeys(f, 'meter-1'), 409, 'version_not_deliverable');
    expectProblem(await fetchKeys(f, 'meter-1', { field: 'patient_id', version: 1 }), 409, 'version_not_deliverable');
    const bulk = await fetchBulk(f, [{ deviceId: 'meter-1' }, { deviceId: 'meter-1', field: 'location' }, { deviceId: 'meter-2' }]);
    expect(bulk.missing).toEqual([
      { deviceId: 'meter-1', reason: 'not_deliverable' },
      { deviceId: 'meter-1', field: 'location', reason: 'not_deliverable' },
    ]);
    expect(bulk.keys.map((k) => k.kid)).toEqual(['meter-2:v1']);
    // a second request while scheduled is a conflict, not a new schedule
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-1'), 409, 'device_destruction_scheduled');

    f.clock.advance(DAY / 2); // within every grace period (the field policy's is the shortest)
    const restored = await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-1/restore');
    expect(restored.status, restored.raw).toBe(200);
    const rowsAfter = { devices: await deviceRows(f, 'meter-1'), fields: await fieldRows(f, 'meter-1') };
    const shape = (rows: typeof rowsBefore) => ({
      devices: rows.devices.map((r) => [r.version, r.state, r.state_until?.toISOString() ?? null, r.parent_version, r.wrapped_key?.toString('hex'), r.state_before_destroy]),
      fields: rows.fields.map((r) => [r.field, r.version, r.state, r.state_until?.toISOString() ?? null, r.parent_version, r.wrapped_key?.toString('hex'), r.state_before_destroy]),
    });
    expect(shape(rowsAfter)).toEqual(shape(rowsBefore));
    const device = await f.t.database.db.selectFrom('devices').select('destroy_after').where('id', '=', 'meter-1').executeTakeFirstOrThrow();
    expect(device.destroy_after).toBeNull();

    const again = await fetchBulk(f, [{ deviceId: 'meter-1' }, { deviceId: 'meter-1', field: 'patient_id' }, { deviceId: 'meter-1', field: 'location' }]);
    expect(again.missing).toEqual([]);
    expect(again.keys.map((k) => [k.kid, k.k, k.state]).sort()).toEqual(before.keys.map((k) => [k.kid, k.k, k.state]).sort());
    // and the device can be rotated again
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-1/rotate', {})).status).toBe(200);

    const trail = (await events(f, { keyIdPrefix: 'device:meter-1' })).filter((e) => e.action !== 'key.deliver');
    expect(trail.map((e) => e.action)).toEqual(['device.enrol', 'device.rotate', 'device.destroy_request', 'device.restore', 'device.rotate']);
    expect(trail[2]?.details).toMatchObject({ destroyAfter, waitDays: 7, fieldKeys: ['location', 'patient_id'] });
    expect(trail[3]?.details).toMatchObject({ cancelledDestroyAfter: destroyAfter, versions: [{ version: 1, state: 'grace' }, { version: 2, state: 'primary' }] });
    expect((await events(f, { action: 'field_key.destroy_request', keyIdPrefix: 'field:meter-1/' })).map((e) => e.keyId).sort()).toEqual(['field:meter-1/location', 'field:meter-1/patient_id']);
    expect((await events(f, { action: 'field_key.restore', keyIdPrefix: 'field:meter-1/' })).map((e) => e.keyId).sort()).toEqual(['field:meter-1/location', 'field:meter-1/patient_id']);
  });

  it('when the waiting period is over and destroyDue runs, then the material is gone, fetches answer 410, and the rows and audit trail remain', async () => {
    const fieldKey = await storedFieldKey(f, 'meter-2', 'patient_id', 1);
    expect(fieldKey).toHaveLength(32);
    const shred = await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-2?waitDays=3');
    expect(shred.status).toBe(202);
    expect(shred.body.waitDays).toBe(3);

    // not yet due: nothing happens
    f.clock.advance(3 * DAY - 1000);
    const early = await f.sweeps.destroyDue();
    expect(early.items.filter((i) => i.deviceId === 'meter-2')).toEqual([]);
    expect((await deviceRows(f, 'meter-2'))[0]?.wrapped_key).not.toBeNull();

    f.clock.advance(1000);
    // the window has closed: restore is refused even before the sweep ran
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-2/restore'), 409, 'device_destroyed');

    const due = await f.sweeps.destroyDue();
    expect(due).toMatchObject({ dryRun: false, devices: 1, fields: 2, blocked: 0, more: false });
    expect(due.items.map((i) => [i.level, i.deviceId, i.field ?? null, i.version, i.from, i.to])).toEqual([
      ['device', 'meter-2', null, 1, 'destroy_scheduled', 'destroyed'],
      ['field', 'meter-2', 'location', 1, 'destroy_scheduled', 'destroyed'],
      ['field', 'meter-2', 'patient_id', 1, 'destroy_scheduled', 'destroyed'],
    ]);

    const rows = [...(await deviceRows(f, 'meter-2')), ...(await fieldRows(f, 'meter-2'))];
    expect(rows).toHaveLength(3);
    for (const row of rows) {
      expect(row.state).toBe('destroyed');
      expect(row.wrapped_key).toBeNull();
      expect(row.state_before_destroy).toBe('primary');
    }
    await expect(storedDeviceKey(f, 'meter-2', 1)).rejects.toThrow();

    expectProblem(await fetchKeys(f, 'meter-2'), 410);
    expectProblem(await fetchKeys(f, 'meter-2', { version: 1 }), 410);
    expectProblem(await fetchKeys(f, 'meter-2', { field: 'patient_id' }), 410);
    const bulk = await fetchBulk(f, [{ deviceId: 'meter-2' }, { deviceId: 'meter-2', field: 'location', version: 1 }, { deviceId: 'meter-3' }]);
    expect(bulk.missing).toEqual([
      { deviceId: 'meter-2', reason: 'destroyed' },
      { deviceId: 'meter-2', field: 'location', version: 1, reason: 'destroyed' },
    ]);
    expect(bulk.keys.map((k) => k.kid)).toEqual(['meter-3:v1']);

    // everything else about the device is a conflict now
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-2/restore'), 409, 'device_destroyed');
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-2/rotate', {}), 409, 'device_destroyed');
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-2'), 409, 'device_destroyed');
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-2/versions/1/enable'), 409);
    const view = await call(f.t.app, f.admin, 'GET', '/v1/devices/meter-2');
    expect(view.status).toBe(200);
    expect(view.body.versions).toMatchObject([{ version: 1, state: 'destroyed' }]);

    const destroyed = await events(f, { keyIdPrefix: 'device:meter-2' });
    expect(destroyed.map((e) => e.action)).toEqual(['device.enrol', 'device.destroy_request', 'device.destroy', 'key.deliver', 'key.deliver']);
    // the refused fetches are audited too, with their reason
    expect(destroyed.slice(3).map((e) => [e.outcome, e.details.reason])).toEqual([
      ['failure', 'destroyed'],
      ['failure', 'destroyed'],
    ]);
    expect(destroyed[2]).toMatchObject({ actor: 'system:rotation', details: { version: 1, materialErased: true, stateBeforeDestroy: 'primary' } });
    expect((await events(f, { action: 'field_key.destroy', keyIdPrefix: 'field:meter-2/' })).map((e) => e.keyId).sort()).toEqual(['field:meter-2/location', 'field:meter-2/patient_id']);

    // a second run finds nothing more to do
    const rerun = await f.sweeps.destroyDue();
    expect(rerun.items.filter((i) => i.deviceId === 'meter-2')).toEqual([]);
  });

  it('when the destruction sweep runs, then the erased device versions are dropped from the key cache', async () => {
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-5?waitDays=1')).status).toBe(202);
    f.sweepCache.set('device', 'meter-5', 1, Buffer.alloc(32, 7));
    f.clock.advance(DAY);
    const result = await f.sweeps.destroyDue();
    expect(result.items.some((i) => i.deviceId === 'meter-5' && i.level === 'device')).toBe(true);
    expect(f.sweepCache.get('device', 'meter-5', 1)).toBeUndefined();
  });

  it('when a dry run is asked for, then it reports the due destructions and changes nothing', async () => {
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-3?waitDays=1')).status).toBe(202);
    f.clock.advance(DAY + 1);
    const before = await snapshot(f);
    const dry = await f.sweeps.destroyDue({ dryRun: true });
    expect(dry).toMatchObject({ dryRun: true, devices: 1, fields: 2 });
    expect(dry.items.map((i) => [i.deviceId, i.field ?? null, i.to])).toEqual([
      ['meter-3', null, 'destroyed'],
      ['meter-3', 'location', 'destroyed'],
      ['meter-3', 'patient_id', 'destroyed'],
    ]);
    expect(await snapshot(f)).toBe(before);
    const real = await f.sweeps.destroyDue();
    expect(real.items).toEqual(dry.items);
  });

  it('when the waiting period is out of bounds, then 400; when the device is unknown, then 404; restore of a device not scheduled, then 409', async () => {
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-4?waitDays=0'), 400);
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-4?waitDays=31'), 400);
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-4?waitDays=2.5'), 400);
    expectProblem(await call(f.t.app, f.admin, 'DELETE', '/v1/devices/nope'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/nope/restore'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/meter-4/restore'), 409, 'not_scheduled_for_destruction');
    expect((await deviceRows(f, 'meter-4')).map((r) => r.state)).toEqual(['primary']);
    const thirty = await call(f.t.app, f.admin, 'DELETE', '/v1/devices/meter-4?waitDays=30');
    expect(thirty.status).toBe(202);
    expect(new Date(thirty.body.destroyAfter as string).getTime() - f.clock.now().getTime()).toBe(30 * DAY);
  });
});

describe('restore when time has passed during the wait', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['clock-1', 'skew-1'], ['patient_id']);
  });
  afterAll(async () => f.close());

  it('when a grace version ran out of grace while scheduled, then restore brings it back as decrypt_only and the primary as primary', async () => {
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/clock-1/rotate', {})).status).toBe(200);
    f.clock.advance(5 * DAY);
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/clock-1?waitDays=10')).status).toBe(202);
    f.clock.advance(3 * DAY); // the grace (7 d from the rotation) ended during the wait
    const restored = await call(f.t.app, f.admin, 'POST', '/v1/devices/clock-1/restore');
    expect(restored.status).toBe(200);
    expect((await deviceRows(f, 'clock-1')).map((r) => [r.version, r.state, r.state_until, r.state_before_destroy])).toEqual([
      [1, 'decrypt_only', null, null],
      [2, 'primary', null, null],
    ]);
    const keys = await fetchKeys(f, 'clock-1');
    expect(keys.keys.map((k) => [k.kid, k.state])).toEqual([
      ['clock-1:v1', 'decrypt_only'],
      ['clock-1:v2', 'primary'],
    ]);
    expect(keyBytes(keys.keys[1])).toEqual(await storedDeviceKey(f, 'clock-1', 2));
  });

  it('when a runner with a clock ahead already erased the device, then restore is refused and nothing comes back half-way', async () => {
    const shred = await call(f.t.app, f.admin, 'DELETE', '/v1/devices/skew-1?waitDays=1');
    expect(shred.status).toBe(202);
    const ahead = new Date(new Date(shred.body.destroyAfter as string).getTime() + 1000);
    const erased = await f.sweeps.destroyDue({ now: ahead });
    expect(erased.items.filter((i) => i.deviceId === 'skew-1')).toHaveLength(2);
    // this replica's clock is still inside the waiting period
    expect(f.clock.now().getTime()).toBeLessThan(ahead.getTime());
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/skew-1/restore'), 409, 'device_destroyed');
    expect([...(await deviceRows(f, 'skew-1')), ...(await fieldRows(f, 'skew-1'))].map((r) => r.state)).toEqual(['destroyed', 'destroyed']);
    const device = await f.t.database.db.selectFrom('devices').select('destroy_after').where('id', '=', 'skew-1').executeTakeFirstOrThrow();
    expect(device.destroy_after?.toISOString()).toBe(shred.body.destroyAfter);
  });
});
