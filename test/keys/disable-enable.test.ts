/** Disable (revoke) and enable (reinstate) single device DEK and field key versions. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, deviceRows, enrol, events, fetchKeys, fieldRows, keyBytes, storedDeviceKey, storedFieldKey, type Fleet } from './support.js';

describe('disable and enable versions', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['cam-1', 'cam-2', 'cam-3', 'cam-4', 'cam-5', 'cam-6'], ['plate']);
  });
  afterAll(async () => f.close());

  const rotate = async (deviceId: string) => expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${deviceId}/rotate`, {})).status).toBe(200);

  it('when a grace version is disabled, then it is not delivered; when enabled, then it is delivered again as decrypt_only', async () => {
    await rotate('cam-1');
    const original = keyBytes((await fetchKeys(f, 'cam-1', { version: 1 })).keys[0]);

    const disabled = await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/disable');
    expect(disabled.status, disabled.raw).toBe(200);
    expect(disabled.body.versions).toMatchObject([
      { version: 1, state: 'disabled', stateUntil: null },
      { version: 2, state: 'primary' },
    ]);
    expect((await deviceRows(f, 'cam-1')).map((r) => r.state)).toEqual(['disabled', 'primary']);
    expectProblem(await fetchKeys(f, 'cam-1', { version: 1 }), 409, 'version_not_deliverable');
    expect((await fetchKeys(f, 'cam-1')).keys.map((k) => k.kid)).toEqual(['cam-1:v2']);

    const enabled = await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/enable', {});
    expect(enabled.status).toBe(200);
    expect((await deviceRows(f, 'cam-1')).map((r) => r.state)).toEqual(['decrypt_only', 'primary']);
    const back = await fetchKeys(f, 'cam-1', { version: 1 });
    expect(back.keys[0]).toMatchObject({ kid: 'cam-1:v1', state: 'decrypt_only' });
    expect(keyBytes(back.keys[0])).toEqual(original);

    const trail = (await events(f, { keyId: 'device:cam-1' })).filter((e) => e.action.startsWith('device.version_'));
    expect(trail.map((e) => [e.action, e.actor, e.details])).toEqual([
      ['device.version_disable', 'alice', { version: 1, previousState: 'grace', state: 'disabled' }],
      ['device.version_enable', 'alice', { version: 1, previousState: 'disabled', state: 'decrypt_only' }],
    ]);
  });

  it('when a transition is illegal, then 409 and nothing changes; when the version or device is unknown, then 404', async () => {
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/2/enable'), 409, 'illegal_state_transition'); // primary
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/enable'), 409, 'illegal_state_transition'); // decrypt_only
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/disable')).status).toBe(200);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/disable'), 409, 'illegal_state_transition'); // already disabled
    expect((await deviceRows(f, 'cam-1')).map((r) => r.state)).toEqual(['disabled', 'primary']);

    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/9/disable'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/9/enable'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/nope/versions/1/disable'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/fields/nope/versions/1/disable'), 404);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/0/disable'), 400);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/disable', { force: 'yes' }), 400);
  });

  it('when the only primary is disabled without force, then 409 primary_required and the device keeps its primary', async () => {
    const refused = await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-2/versions/1/disable', {});
    expectProblem(refused, 409, 'primary_required');
    expect((await deviceRows(f, 'cam-2')).map((r) => r.state)).toEqual(['primary']);
    expect(await events(f, { action: 'device.version_disable', keyId: 'device:cam-2' })).toEqual([]);
  });

  it('when the only primary is disabled with force, then a fresh primary replaces it and the field keys move under it', async () => {
    const fieldKey = await storedFieldKey(f, 'cam-3', 'plate', 1);
    const forced = await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-3/versions/1/disable', { force: true });
    expect(forced.status, forced.raw).toBe(200);
    expect((await deviceRows(f, 'cam-3')).map((r) => [r.version, r.state])).toEqual([
      [1, 'disabled'],
      [2, 'primary'],
    ]);
    expect((await fieldRows(f, 'cam-3')).map((r) => [r.version, r.parent_version])).toEqual([[1, 2]]);
    expect(await storedFieldKey(f, 'cam-3', 'plate', 1)).toEqual(fieldKey);
    const delivered = await fetchKeys(f, 'cam-3');
    expect(delivered.keys.map((k) => k.kid)).toEqual(['cam-3:v2']);
    expect(keyBytes(delivered.keys[0])).toEqual(await storedDeviceKey(f, 'cam-3', 2));
    const [rotation] = await events(f, { action: 'device.rotate', keyId: 'device:cam-3' });
    expect(rotation?.details).toMatchObject({ reason: 'disable_primary', compromised: true, previousVersion: 1 });
    const [disable] = await events(f, { action: 'device.version_disable', keyId: 'device:cam-3' });
    expect(disable?.details).toEqual({ version: 1, previousState: 'primary', state: 'disabled', force: true, replacedBy: 2 });
  });

  it('when the primary is disabled while a grace version exists, then the grace version is primary again and the field keys are rewrapped under it', async () => {
    await rotate('cam-4');
    const before = await fetchKeys(f, 'cam-4', { field: 'plate' });
    expect((await fieldRows(f, 'cam-4')).map((r) => r.parent_version)).toEqual([2]);

    const disabled = await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-4/versions/2/disable');
    expect(disabled.status, disabled.raw).toBe(200);
    expect((await deviceRows(f, 'cam-4')).map((r) => [r.version, r.state, r.state_until])).toEqual([
      [1, 'primary', null],
      [2, 'disabled', null],
    ]);
    expect((await fieldRows(f, 'cam-4')).map((r) => r.parent_version)).toEqual([1]);
    expect(keyBytes((await fetchKeys(f, 'cam-4', { field: 'plate' })).keys[0])).toEqual(keyBytes(before.keys[0]));
    expect(keyBytes((await fetchKeys(f, 'cam-4')).keys[0])).toEqual(await storedDeviceKey(f, 'cam-4', 1));
    const [disable] = await events(f, { action: 'device.version_disable', keyId: 'device:cam-4' });
    expect(disable?.details).toMatchObject({ version: 2, previousState: 'primary', promotedVersion: 1 });
  });

  it('when the grace version has run out of grace, then it is not promoted (force is needed)', async () => {
    await rotate('cam-5');
    const [grace] = await deviceRows(f, 'cam-5');
    f.clock.set(new Date((grace!.state_until as Date).getTime() + 1));
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-5/versions/2/disable'), 409, 'primary_required');
    expect((await deviceRows(f, 'cam-5')).map((r) => r.state)).toEqual(['grace', 'primary']);
  });

  it('when field key versions are disabled and enabled, then the same rules hold at the field level', async () => {
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-6/fields/plate/rotate', {})).status).toBe(200);
    const v1 = keyBytes((await fetchKeys(f, 'cam-6', { field: 'plate', version: 1 })).keys[0]);

    // the primary (v2) with a grace v1: v1 takes over
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-6/fields/plate/versions/2/disable')).status).toBe(200);
    expect((await fieldRows(f, 'cam-6')).map((r) => [r.version, r.state])).toEqual([
      [1, 'primary'],
      [2, 'disabled'],
    ]);
    expectProblem(await fetchKeys(f, 'cam-6', { field: 'plate', version: 2 }), 409, 'version_not_deliverable');
    // the only primary now: refused without force
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-6/fields/plate/versions/1/disable'), 409, 'primary_required');
    // enable v2 → decrypt_only, never primary
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-6/fields/plate/versions/2/enable')).status).toBe(200);
    expect((await fieldRows(f, 'cam-6')).map((r) => [r.version, r.state])).toEqual([
      [1, 'primary'],
      [2, 'decrypt_only'],
    ]);
    // with force: a fresh primary v3 under the device primary
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-6/fields/plate/versions/1/disable', { force: true })).status).toBe(200);
    expect((await fieldRows(f, 'cam-6')).map((r) => [r.version, r.state, r.parent_version])).toEqual([
      [1, 'disabled', 1],
      [2, 'decrypt_only', 1],
      [3, 'primary', 1],
    ]);
    const delivered = await fetchKeys(f, 'cam-6', { field: 'plate' });
    expect(delivered.keys.map((k) => [k.kid, k.state])).toEqual([
      ['cam-6/plate:v2', 'decrypt_only'],
      ['cam-6/plate:v3', 'primary'],
    ]);
    expect(keyBytes(delivered.keys[1])).toEqual(await storedFieldKey(f, 'cam-6', 'plate', 3));
    expect(keyBytes(delivered.keys[1])).not.toEqual(v1);
    expect((await events(f, { keyId: 'field:cam-6/plate' })).filter((e) => e.action !== 'key.deliver').map((e) => e.action)).toEqual([
      'field_key.create',
      'field_key.rotate',
      'field_key.version_disable',
      'field_key.version_enable',
      'field_key.rotate',
      'field_key.version_disable',
    ]);
  });

  it('when the device is scheduled for destruction, then disable and enable are refused (restore first)', async () => {
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/cam-1')).status).toBe(202);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/1/enable'), 409, 'device_destruction_scheduled');
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/versions/2/disable', { force: true }), 409, 'device_destruction_scheduled');
    expect((await deviceRows(f, 'cam-1')).map((r) => [r.state, r.state_before_destroy])).toEqual([
      ['destroy_scheduled', 'disabled'],
      ['destroy_scheduled', 'primary'],
    ]);
    // restore puts the disabled one back as disabled
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/cam-1/restore')).status).toBe(200);
    expect((await deviceRows(f, 'cam-1')).map((r) => r.state)).toEqual(['disabled', 'primary']);
  });
});
