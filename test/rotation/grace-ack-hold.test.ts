/**
 * Issue 6, part 4: a grace version is not moved to decrypt_only while its successor was sent to
 * the device over MQTT and not acknowledged (policy graceRequiresAck, per level and per group),
 * for at most graceAckMaxHoldDays after its grace end; rotation debt and rollout progress list
 * the devices that have not acknowledged. The app runs without a broker (MQTT off): "sent" is a
 * published outbox row, marked here as the publisher would after the broker's PUBCOMP; a valid
 * acknowledgement is inserted through the distribution repository, as the ack service does once
 * the device's tag checks out. The publisher-on mode (queued rows hold too) is checked on sweeps
 * built the way the rotation module builds them with MQTT_URL set.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { insertAck } from '../../src/distribution/distribution.repository.js';
import { distributionDb } from '../../src/distribution/distribution.tables.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createVersionSweeps } from '../../src/keys/version-sweeps.js';
import { BUILT_IN_POLICIES } from '../../src/rotation/policy.defaults.js';
import { call } from '../support/flow.js';
import { getRollout, startRollout } from '../rollouts/support.js';
import { createFleet, createGroup, DAY, events, runCron, setPolicies, type Fleet } from './support.js';

interface SweepView {
  devices: number;
  fields: number;
  heldForAck?: number;
  items: Array<{ deviceId: string; version: number }>;
}

describe('grace versions wait for the acknowledgement of their successor', () => {
  let f: Fleet;
  let pumps: string[];
  let loose: string[];
  let graceEnd: Date;
  const db = () => f.t.database.db;

  const rotate = async (deviceId: string) => {
    const r = await call(f.t.app, f.admin, 'POST', `/v1/devices/${deviceId}/rotate`, {});
    expect(r.status, r.raw).toBe(200);
  };
  /** what the publisher does once the broker completed the QoS 2 exchange */
  const publish = (deviceId: string, version: number) =>
    sql`update key_outbox set status = 'published', published_at = now() where device_id = ${deviceId} and kind = 'device' and version = ${version}`.execute(db());
  /** what the ack service records once the device's acknowledgement checks out */
  const acknowledge = (deviceId: string, version: number) =>
    insertAck(distributionDb(db()), { device_id: deviceId, kind: 'device', field: '', version, acknowledged_at: f.clock.now() });
  const version = (deviceId: string, v: number) =>
    db().selectFrom('device_versions').select(['state', 'state_changed_at', 'state_until']).where('device_id', '=', deviceId).where('version', '=', v).executeTakeFirstOrThrow();
  const graceSweep = (summary: unknown) => (summary as { sweeps: { graceExpired: SweepView } }).sweeps.graceExpired;
  const status = async (groupId: string) => {
    const r = await call(f.t.app, f.admin, 'GET', `/v1/groups/${groupId}/rotation-status`);
    expect(r.status, r.raw).toBe(200);
    return r.body as { devices: { awaitingAck: { devices: number; versions: number; deviceIds: string[] } }; fields: { awaitingAck: { devices: number } } };
  };

  beforeAll(async () => {
    f = await createFleet();
    // long rotation periods: cron must not start rollouts of its own while the clock runs a month
    await setPolicies(f, { device: { rotationPeriodDays: 365, gracePeriodDays: 7, graceAckMaxHoldDays: 10 }, field: { rotationPeriodDays: 365 } });
    pumps = await createGroup(f, 'pumps', 4);
    loose = await createGroup(f, 'loose', 1);
    const put = await call(f.t.app, f.admin, 'PUT', '/v1/groups/loose/policy', { device: { graceRequiresAck: false } });
    expect(put.status, put.raw).toBe(200);
    expect(put.body).toMatchObject({ effective: { device: { graceRequiresAck: false, graceAckMaxHoldDays: 10 }, field: { graceRequiresAck: true, graceAckMaxHoldDays: 30 } } });
    for (const id of [...pumps.slice(0, 3), ...loose]) await rotate(id);
    graceEnd = (await version(pumps[0] as string, 1)).state_until as Date;
    // d0, d1 and the loose device got their new key from the broker; d2's still waits in the outbox (MQTT off)
    for (const id of [pumps[0], pumps[1], loose[0]]) await publish(id as string, 2);
  });
  afterAll(async () => f?.close());

  it('when the policy is read, then graceRequiresAck and graceAckMaxHoldDays are there, stored, per level and per group', async () => {
    const r = await call(f.t.app, f.admin, 'GET', '/v1/policies');
    expect(r.body).toMatchObject({
      kek: { graceRequiresAck: null, graceAckMaxHoldDays: null },
      device: { graceRequiresAck: true, graceAckMaxHoldDays: 10, source: 'stored' },
      field: { graceRequiresAck: true, graceAckMaxHoldDays: 30 },
    });
    const row = await sql<{ grace_requires_ack: boolean; grace_ack_max_hold_days: number }>`select grace_requires_ack, grace_ack_max_hold_days from rotation_policies where level = 'device'`.execute(db());
    expect(row.rows).toEqual([{ grace_requires_ack: true, grace_ack_max_hold_days: 10 }]);
  });

  it('when new keys were sent and not acknowledged, then rotation debt lists those devices', async () => {
    const s = await status('pumps');
    // sent = queued or published: d2's key is on its way too
    expect(s.devices.awaitingAck).toEqual({ devices: 3, versions: 3, deviceIds: pumps.slice(0, 3) });
    expect(s.fields.awaitingAck).toMatchObject({ devices: 0 });
    expect((await status('loose')).devices.awaitingAck.deviceIds).toEqual(loose);
  });

  it('when the grace ends, then a version whose published successor is unacknowledged stays in grace; with MQTT off a queued one holds nothing; a group with the flag off moves on', async () => {
    f.clock.set(new Date(graceEnd.getTime() + DAY));
    const sweep = graceSweep(await runCron(f));
    expect(sweep.heldForAck).toBe(2);
    expect(sweep.items.map((i) => `${i.deviceId}:v${i.version}`).sort()).toEqual([`${loose[0]}:v1`, `${pumps[2]}:v1`].sort());
    expect((await version(pumps[0] as string, 1)).state).toBe('grace');
    expect((await version(pumps[1] as string, 1)).state).toBe('grace');
    // not held: decrypt_only dates from the grace end, as before
    for (const id of [pumps[2], loose[0]]) expect(await version(id as string, 1)).toMatchObject({ state: 'decrypt_only', state_changed_at: graceEnd });
  });

  it('when the device acknowledges, then the next sweep moves its old version, dated from the acknowledgement, and it leaves the debt list', async () => {
    const ackedAt = f.clock.now();
    expect(await acknowledge(pumps[0] as string, 2)).toBe(true);
    expect((await status('pumps')).devices.awaitingAck.deviceIds).toEqual([pumps[1], pumps[2]]);
    f.clock.advance(DAY);
    const sweep = graceSweep(await runCron(f));
    expect(sweep.heldForAck).toBe(1);
    expect(sweep.items.map((i) => i.deviceId)).toEqual([pumps[0]]);
    expect(await version(pumps[0] as string, 1)).toMatchObject({ state: 'decrypt_only', state_changed_at: ackedAt });
    const [expired] = await events(f, { action: 'device.grace_expire', keyId: `device:${pumps[0]}` });
    expect(expired?.details).toMatchObject({ version: 1, graceUntil: graceEnd.toISOString(), heldForAckUntil: ackedAt.toISOString() });
  });

  it('when a device never acknowledges, then graceAckMaxHoldDays after the grace end the version moves anyway, dated from the end of the hold', async () => {
    f.clock.set(new Date(graceEnd.getTime() + 10 * DAY - 1000));
    expect(graceSweep(await runCron(f, { dryRun: true })).heldForAck).toBe(1);
    f.clock.set(new Date(graceEnd.getTime() + 10 * DAY + 1000));
    const sweep = graceSweep(await runCron(f));
    expect(sweep.heldForAck).toBe(0);
    expect(sweep.items.map((i) => i.deviceId)).toEqual([pumps[1]]);
    expect(await version(pumps[1] as string, 1)).toMatchObject({ state: 'decrypt_only', state_changed_at: new Date(graceEnd.getTime() + 10 * DAY) });
    // still not acknowledged: rotation debt keeps showing it
    expect((await status('pumps')).devices.awaitingAck.deviceIds).toContain(pumps[1]);
  });

  it('when a rollout rotates the group, then its progress lists the devices that have not acknowledged their new key', async () => {
    const rollout = await startRollout(f, { groupId: 'pumps', percentPerDay: 100, waveIntervalSeconds: 60 });
    await runCron(f);
    const view = (await getRollout(f, rollout.id)) as unknown as { totals: { done: number }; awaitingAck: { devices: number; deviceIds: string[] } };
    expect(view.totals.done).toBe(4);
    expect(view.awaitingAck).toMatchObject({ devices: 4, deviceIds: pumps });
    const top = await db().selectFrom('device_versions').select(['device_id', 'version']).where('device_id', '=', pumps[3] as string).where('state', '=', 'primary').executeTakeFirstOrThrow();
    await acknowledge(pumps[3] as string, top.version);
    expect(((await getRollout(f, rollout.id)) as unknown as { awaitingAck: { devices: number; deviceIds: string[] } }).awaitingAck).toMatchObject({ devices: 3, deviceIds: pumps.slice(0, 3) });
  });

  it('when the publisher is on, then a successor still queued in the outbox holds its predecessor too (a broker outage is not an acknowledgement)', async () => {
    // the rollout's new keys are queued, not published; their predecessors' grace ends 7 days on
    f.clock.advance(8 * DAY);
    const built = (sent: 'queued' | 'published') =>
      createVersionSweeps({ db: db(), audit: f.t.audit, material: { cache: createKeyCache({ ttlSeconds: 60, maxEntries: 10 }) }, clock: f.clock, ackHold: { sent, builtIn: BUILT_IN_POLICIES } });
    const on = await built('queued').expireGrace({ dryRun: true });
    expect(on.heldForAck).toBe(3);
    expect(on.items.map((i) => i.deviceId)).toEqual([pumps[3]]);
    const off = await built('published').expireGrace({ dryRun: true });
    expect(off.heldForAck).toBe(0);
    expect(off.items.map((i) => i.deviceId).sort()).toEqual([...pumps].sort());
  });
});
