/**
 * Retention of old device and field key versions: a `decrypt_only` version past its group's
 * retention (the group's override, else the default) is scheduled for destruction after the
 * waiting period, never while a live field key version is wrapped under a device version;
 * chunked, shared between runners, with a dry run that changes nothing; the cron entry runs it.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { wrapKey } from '../../src/crypto/aead.js';
import { fieldBinding } from '../../src/crypto/binding.js';
import { createVersionSweeps, type RetentionPolicyLookup } from '../../src/keys/version-sweeps.js';
import { createPolicyService } from '../../src/rotation/policy.service.js';
import { call } from '../support/flow.js';
import { DAY, createFleet, deviceRows, enrol, events, fieldRows, storedDeviceKey, storedFieldKey, type Fleet } from './support.js';

/** Every row of every table with its physical position and inserting transaction: any write changes it. */
async function dump(f: Fleet): Promise<string> {
  const db = f.t.database.db;
  const { rows: tables } = await sql<{ table_name: string }>`
    select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`.execute(db);
  const out: Record<string, unknown> = {};
  for (const { table_name } of tables) {
    out[table_name] = (await sql<Record<string, unknown>>`select ctid::text as "_ctid", xmin::text as "_xmin", t.* from ${sql.table(table_name)} t order by ctid`.execute(db)).rows;
  }
  return JSON.stringify(out, (_k, v: unknown) => (v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' ? Buffer.from((v as { data: number[] }).data).toString('hex') : v));
}

async function ok(f: Fleet, method: 'POST' | 'PUT', url: string, body: Record<string, unknown> = {}, status = 200) {
  const response = await call(f.t.app, f.admin, method, url, body);
  expect(response.status, response.raw).toBe(status);
  return response;
}

function policyLookup(f: Fleet): RetentionPolicyLookup {
  const policies = createPolicyService({ db: f.t.database.db, audit: f.t.audit, clock: f.clock });
  return (ids) => policies.effectivePolicies(ids);
}

/** Move a field key version's wrap back under an older device version (as a failed or partial rewrap would leave it). */
async function wrapFieldUnder(f: Fleet, deviceId: string, field: string, version: number, deviceVersion: number): Promise<void> {
  const key = await storedFieldKey(f, deviceId, field, version);
  const wrapped = wrapKey(await storedDeviceKey(f, deviceId, deviceVersion), key, fieldBinding(deviceId, field, version, deviceVersion));
  await f.t.database.db.updateTable('field_versions').set({ wrapped_key: wrapped, parent_version: deviceVersion }).where('device_id', '=', deviceId).where('field', '=', field).where('version', '=', version).execute();
}

const at = <T extends { version: number }>(rows: T[], version: number): T | undefined => rows.find((r) => r.version === version);

describe('retention of decrypt_only versions', () => {
  let f: Fleet;
  let policyFor: RetentionPolicyLookup;
  /** when the rotated-away v1s became decrypt_only (the end of their grace) */
  let graceEnd: number;

  beforeAll(async () => {
    f = await createFleet('pumps');
    policyFor = policyLookup(f);
    for (const id of ['valves', 'eternal']) await ok(f, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'eu' }, 201);
    await ok(f, 'PUT', '/v1/policies', { device: { retentionDays: 60 }, field: { retentionDays: 10 } });
    await ok(f, 'PUT', '/v1/groups/valves/policy', { device: { retentionDays: 20, destructionWaitDays: 3 } });
    await ok(f, 'PUT', '/v1/groups/eternal/policy', { device: { retentionDays: null }, field: { retentionDays: null } });
    await enrol(f, ['p-1', 'p-2', 'p-3'], [], 'pumps');
    await enrol(f, ['p-4'], ['dose'], 'pumps');
    await enrol(f, ['v-1', 'v-2'], [], 'valves');
    await enrol(f, ['e-1'], [], 'eternal');
    for (const id of ['p-1', 'p-2', 'p-3', 'p-4', 'v-1', 'v-2', 'e-1']) await ok(f, 'POST', `/v1/devices/${id}/rotate`);
    // p-4's field key stays wrapped under its old device version
    await wrapFieldUnder(f, 'p-4', 'dose', 1, 1);
    graceEnd = (at(await deviceRows(f, 'p-1'), 1)?.state_until as Date).getTime();
    f.clock.set(new Date(graceEnd + 1000));
    expect(await f.sweeps.expireGrace()).toMatchObject({ devices: 7 });
  });
  afterAll(async () => f.close());

  it('when no retention has passed yet, then nothing is scheduled', async () => {
    f.clock.set(new Date(graceEnd + 20 * DAY - 1));
    expect(await f.sweeps.expireRetention({ policyFor })).toEqual({ dryRun: false, devices: 0, fields: 0, items: [], more: false, blocked: 0 });
  });

  it("when the cron entry is dry run past a group's shorter override, then it reports that group's versions and the database is byte-identical", async () => {
    f.clock.set(new Date(graceEnd + 20 * DAY));
    const rotator = await f.t.token('keystrata:rotate', { sub: 'cron' });
    const before = await dump(f);
    const response = await call(f.t.app, rotator, 'POST', '/v1/rotation/run', { dryRun: true });
    expect(response.status, response.raw).toBe(200);
    const retention = (response.body.sweeps as Record<string, { devices: number; fields: number; blocked: number; items: Array<Record<string, unknown>> }>).retentionExpired;
    expect(retention).toMatchObject({ devices: 2, fields: 0, blocked: 0, more: false });
    expect(retention?.items.map((i) => [i.deviceId, i.version, i.from, i.to, i.due])).toEqual([
      ['v-1', 1, 'decrypt_only', 'destroy_scheduled', new Date(graceEnd + 20 * DAY).toISOString()],
      ['v-2', 1, 'decrypt_only', 'destroy_scheduled', new Date(graceEnd + 20 * DAY).toISOString()],
    ]);
    expect(await dump(f)).toBe(before);
  });

  it("when a group's override is shorter than the default, then only its versions are scheduled, with its waiting period", async () => {
    const now = f.clock.now();
    const result = await f.sweeps.expireRetention({ policyFor });
    expect(result).toMatchObject({ devices: 2, fields: 0, blocked: 0, more: false });
    for (const id of ['v-1', 'v-2']) {
      const rows = await deviceRows(f, id);
      expect(at(rows, 1)).toMatchObject({ state: 'destroy_scheduled', state_changed_at: now, state_until: new Date(now.getTime() + 3 * DAY), state_before_destroy: null });
      expect(at(rows, 1)?.wrapped_key).not.toBeNull();
      expect(at(rows, 2)?.state).toBe('primary');
    }
    for (const id of ['p-1', 'p-4', 'e-1']) expect(at(await deviceRows(f, id), 1)?.state).toBe('decrypt_only');
    const audited = await events(f, { action: 'device.retention_expire' });
    expect(audited.map((e) => e.keyId).sort()).toEqual(['device:v-1', 'device:v-2']);
    expect(audited[0]).toMatchObject({ actor: 'system:rotation', details: { version: 1, retentionDays: 20, state: 'destroy_scheduled', decryptOnlySince: new Date(graceEnd).toISOString() } });
    // delivered no more
    const fetched = await call(f.t.app, await f.t.token('keystrata:keys:read', { sub: 'ingest', groups: ['valves'] }), 'GET', '/v1/devices/v-1/keys?version=1');
    expect(fetched.status).not.toBe(200);
  });

  it('when the default retention passes, then the default groups are scheduled, never the group that keeps its versions, and not a device version with a live field key under it', async () => {
    f.clock.set(new Date(graceEnd + 60 * DAY));
    const result = await f.sweeps.expireRetention({ policyFor });
    expect(result).toMatchObject({ devices: 3, fields: 0, blocked: 1 });
    expect(result.items.map((i) => i.deviceId).sort()).toEqual(['p-1', 'p-2', 'p-3']);
    expect(at(await deviceRows(f, 'p-4'), 1)?.state).toBe('decrypt_only');
    expect(at(await deviceRows(f, 'e-1'), 1)?.state).toBe('decrypt_only');
    f.clock.set(new Date(graceEnd + 3650 * DAY));
    expect(await f.sweeps.expireRetention({ policyFor, dryRun: true })).toMatchObject({ devices: 0, fields: 0, blocked: 1 });
    expect(at(await deviceRows(f, 'e-1'), 1)?.state).toBe('decrypt_only');
  });

  it('when the field key under it is rotated and ages out, then field and device versions are scheduled in the same run and erased field first, the field key readable until then', async () => {
    await ok(f, 'POST', '/v1/devices/p-4/fields/dose/rotate');
    expect((await fieldRows(f, 'p-4', 'dose')).map((r) => [r.version, r.state, r.parent_version])).toEqual([
      [1, 'grace', 1],
      [2, 'primary', 2],
    ]);
    const fieldGraceEnd = (at(await fieldRows(f, 'p-4', 'dose'), 1)?.state_until as Date).getTime();
    f.clock.set(new Date(fieldGraceEnd));
    expect(await f.sweeps.expireGrace()).toMatchObject({ fields: 1 });
    f.clock.set(new Date(fieldGraceEnd + 10 * DAY));

    const before = await dump(f);
    const dry = await f.sweeps.expireRetention({ policyFor, dryRun: true });
    expect(await dump(f)).toBe(before);
    expect(dry).toMatchObject({ dryRun: true, devices: 1, fields: 1, blocked: 0 });

    const real = await f.sweeps.expireRetention({ policyFor });
    expect(real).toMatchObject({ dryRun: false, devices: 1, fields: 1, blocked: 0 });
    expect(real.items.map((i) => [i.level, i.deviceId, i.field ?? null, i.version])).toEqual(dry.items.map((i) => [i.level, i.deviceId, i.field ?? null, i.version]));
    expect(at(await fieldRows(f, 'p-4', 'dose'), 1)).toMatchObject({ state: 'destroy_scheduled', state_until: new Date(f.clock.now().getTime() + 7 * DAY) });
    expect(await events(f, { action: 'field_key.retention_expire' })).toHaveLength(1);
    expect(await storedFieldKey(f, 'p-4', 'dose', 1)).toHaveLength(32);

    f.clock.advance(7 * DAY);
    const destroyed = await f.sweeps.destroyDue();
    expect(destroyed).toMatchObject({ blocked: 0 });
    expect(destroyed.items.map((i) => `${i.level}:${i.deviceId}:v${i.version}`).sort()).toEqual(['device:p-1:v1', 'device:p-2:v1', 'device:p-3:v1', 'device:p-4:v1', 'field:p-4:v1', 'device:v-1:v1', 'device:v-2:v1'].sort());
    expect(at(await deviceRows(f, 'p-4'), 1)).toMatchObject({ state: 'destroyed', wrapped_key: null });
    expect(at(await fieldRows(f, 'p-4', 'dose'), 1)).toMatchObject({ state: 'destroyed', wrapped_key: null });
    expect(await storedFieldKey(f, 'p-4', 'dose', 2)).toHaveLength(32);
  });

  it('when a device with a retention-scheduled version is shredded and restored, then that version stays scheduled', async () => {
    // e-1 keeps its versions for ever: give it a retention-scheduled one by override
    await ok(f, 'PUT', '/v1/groups/eternal/policy', { device: { retentionDays: 1 } });
    expect(await f.sweeps.expireRetention({ policyFor })).toMatchObject({ devices: 1 });
    await ok(f, 'DELETE' as 'POST', '/v1/devices/e-1', {}, 202);
    await ok(f, 'POST', '/v1/devices/e-1/restore');
    expect((await deviceRows(f, 'e-1')).map((r) => [r.version, r.state])).toEqual([
      [1, 'destroy_scheduled'],
      [2, 'primary'],
    ]);
  });
});

describe('retention with several runners', () => {
  let f: Fleet;
  const ids = Array.from({ length: 25 }, (_, i) => `r-${String(i).padStart(2, '0')}`);
  beforeAll(async () => {
    f = await createFleet('racks');
    await ok(f, 'PUT', '/v1/groups/racks/policy', { device: { retentionDays: 5 } });
    await enrol(f, ids, [], 'racks');
    for (const id of ids) await ok(f, 'POST', `/v1/devices/${id}/rotate`);
    f.clock.advance(8 * DAY);
    expect(await f.sweeps.expireGrace()).toMatchObject({ devices: 25 });
    f.clock.advance(5 * DAY);
  });
  afterAll(async () => f.close());

  it('when two runners sweep at once in small chunks, then every version is scheduled exactly once and each audited once', async () => {
    const policyFor = policyLookup(f);
    const other = createVersionSweeps({ db: f.t.database.db, audit: f.t.audit, material: { cache: f.sweepCache }, clock: f.clock });
    const seen: string[] = [];
    const drain = async (sweeps: typeof other) => {
      for (;;) {
        const r = await sweeps.expireRetention({ policyFor, limit: 3 });
        seen.push(...r.items.map((i) => `${i.deviceId}:v${i.version}`));
        if (r.items.length === 0) return;
      }
    };
    await Promise.all([drain(f.sweeps), drain(other), drain(f.sweeps)]);
    expect(seen).toHaveLength(25);
    expect(new Set(seen).size).toBe(25);
    const rows = await f.t.database.db.selectFrom('device_versions').select(['version', 'state']).where('device_id', 'in', ids).execute();
    expect(rows.filter((r) => r.version === 1).every((r) => r.state === 'destroy_scheduled')).toBe(true);
    expect(rows.filter((r) => r.version === 2).every((r) => r.state === 'primary')).toBe(true);
    const audited = await events(f, { action: 'device.retention_expire' });
    expect(audited).toHaveLength(25);
    expect(new Set(audited.map((e) => e.keyId)).size).toBe(25);
  });

  it('when the limit is filled, then more is reported', async () => {
    await sql`update device_versions set state = 'decrypt_only', state_until = null, state_changed_at = state_changed_at - interval '30 days' where version = 1`.execute(f.t.database.db);
    const r = await f.sweeps.expireRetention({ policyFor: policyLookup(f), limit: 10, dryRun: true });
    expect(r).toMatchObject({ devices: 10, more: true });
  });
});
