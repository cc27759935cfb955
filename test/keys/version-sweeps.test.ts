/** The sweeps the cron entry calls: grace expiry and due destructions, chunked, shared between runners, with a dry run. */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createVersionSweeps } from '../../src/keys/version-sweeps.js';
import { call } from '../support/flow.js';
import { DAY, createFleet, deviceRows, enrol, events, fetchKeys, fieldRows, keyBytes, snapshot, storedFieldKey, type Fleet } from './support.js';

describe('grace expiry', () => {
  let f: Fleet;
  const ids = Array.from({ length: 30 }, (_, i) => `gr-${String(i).padStart(2, '0')}`);
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ids, ['dose']);
    for (const id of ids) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/rotate`, {})).status).toBe(200);
    expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/gr-00/fields/dose/rotate`, {})).status).toBe(200);
  });
  afterAll(async () => f.close());

  /** grace ends as the policy says (device and field grace periods differ): read them from the rows */
  async function graceEnds(): Promise<number[]> {
    const rows = await f.t.database.db
      .selectFrom('device_versions')
      .select('state_until')
      .where('state', '=', 'grace')
      .unionAll(f.t.database.db.selectFrom('field_versions').select('state_until').where('state', '=', 'grace'))
      .execute();
    return rows.map((r) => (r.state_until as Date).getTime());
  }

  it('when the grace period has not ended, then nothing is due', async () => {
    const ends = await graceEnds();
    expect(ends).toHaveLength(31);
    f.clock.set(new Date(Math.min(...ends) - 1));
    const result = await f.sweeps.expireGrace();
    expect(result).toEqual({ dryRun: false, devices: 0, fields: 0, items: [], more: false, heldForAck: 0 });
  });

  it('when a dry run is asked for, then it lists the due versions and the database is unchanged', async () => {
    f.clock.set(new Date(Math.max(...(await graceEnds())) + 3_600_000)); // cron runs an hour late
    const before = await snapshot(f);
    const dry = await f.sweeps.expireGrace({ dryRun: true, limit: 1000 });
    expect(dry).toMatchObject({ dryRun: true, devices: 30, fields: 1, more: false });
    expect(dry.items.find((i) => i.level === 'field')).toMatchObject({ deviceId: 'gr-00', field: 'dose', version: 1, from: 'grace', to: 'decrypt_only' });
    expect(await snapshot(f)).toBe(before);
  });

  it('when two runners sweep at once in small chunks, then every grace version becomes decrypt_only exactly once', async () => {
    const other = createVersionSweeps({ db: f.t.database.db, audit: f.t.audit, material: { cache: f.sweepCache }, clock: f.clock });
    const seen: string[] = [];
    const drain = async (sweeps: typeof other) => {
      for (;;) {
        const r = await sweeps.expireGrace({ limit: 4 });
        seen.push(...r.items.map((i) => `${i.level}:${i.deviceId}/${i.field ?? ''}:v${i.version}`));
        if (!r.more && r.items.length === 0) return;
      }
    };
    await Promise.all([drain(f.sweeps), drain(other)]);
    expect(seen).toHaveLength(31);
    expect(new Set(seen).size).toBe(31);

    const states = await f.t.database.db.selectFrom('device_versions').select(['version', 'state', 'state_until']).where('device_id', 'in', ids).execute();
    expect(states.filter((r) => r.version === 1).every((r) => r.state === 'decrypt_only' && r.state_until === null)).toBe(true);
    expect(states.filter((r) => r.version === 2).every((r) => r.state === 'primary')).toBe(true);
    expect((await fieldRows(f, 'gr-00')).map((r) => [r.version, r.state])).toEqual([
      [1, 'decrypt_only'],
      [2, 'primary'],
    ]);
    const expired = await events(f, { action: 'device.grace_expire' });
    expect(expired).toHaveLength(30);
    expect(new Set(expired.map((e) => e.keyId)).size).toBe(30);
    expect(expired[0]).toMatchObject({ actor: 'system:rotation', details: { version: 1, state: 'decrypt_only' } });
    expect(await events(f, { action: 'field_key.grace_expire' })).toHaveLength(1);
  });

  it('when cron expires a grace late, then the decrypt_only state dates from the grace end, not from the late run', async () => {
    const expired = await events(f, { action: 'device.grace_expire' });
    const rows = await f.t.database.db.selectFrom('device_versions').select(['device_id', 'state_changed_at']).where('version', '=', 1).where('device_id', 'in', ids).execute();
    const changedAt = new Map(rows.map((r) => [`device:${r.device_id}`, (r.state_changed_at as Date).toISOString()]));
    for (const event of expired) expect(changedAt.get(event.keyId as string)).toBe((event.details as { graceUntil: string }).graceUntil);
    expect(Math.min(...rows.map((r) => (r.state_changed_at as Date).getTime()))).toBeLessThan(f.clock.now().getTime());
  });

  it('when grace is over, then key fetch still delivers the old version, flagged decrypt_only', async () => {
    const delivered = await fetchKeys(f, 'gr-05');
    expect(delivered.keys.map((k) => [k.kid, k.state, k.stateUntil])).toEqual([
      ['gr-05:v1', 'decrypt_only', null],
      ['gr-05:v2', 'primary', null],
    ]);
    const field = await fetchKeys(f, 'gr-00', { field: 'dose', version: 1 });
    expect(keyBytes(field.keys[0])).toEqual(await storedFieldKey(f, 'gr-00', 'dose', 1));
    expect(field.keys[0]?.state).toBe('decrypt_only');
  });

  it('when the limit is not a positive integer, then the sweep refuses it', async () => {
    await expect(f.sweeps.expireGrace({ limit: 0 })).rejects.toThrow(RangeError);
  });
});

describe('due destructions', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await enrol(f, ['d-1', 'd-2', 'd-3', 'd-4', 'd-5', 'd-6'], ['serial']);
  });
  afterAll(async () => f.close());

  it('when several runners destroy at once, then each version is erased exactly once and the results add up', async () => {
    for (const id of ['d-1', 'd-2', 'd-3', 'd-4', 'd-5']) expect((await call(f.t.app, f.admin, 'DELETE', `/v1/devices/${id}?waitDays=1`)).status).toBe(202);
    f.clock.advance(DAY);
    const runners = [f.sweeps, createVersionSweeps({ db: f.t.database.db, audit: f.t.audit, material: { cache: f.sweepCache }, clock: f.clock })];
    const results = await Promise.all([...runners, ...runners].map((s) => s.destroyDue({ limit: 2 })));
    let total = results.reduce((n, r) => n + r.devices + r.fields, 0);
    for (;;) {
      const r = await f.sweeps.destroyDue({ limit: 2 });
      total += r.devices + r.fields;
      if (r.items.length === 0) break;
    }
    expect(total).toBe(10);
    for (const id of ['d-1', 'd-2', 'd-3', 'd-4', 'd-5']) {
      expect([...(await deviceRows(f, id)), ...(await fieldRows(f, id))].map((r) => [r.state, r.wrapped_key])).toEqual([
        ['destroyed', null],
        ['destroyed', null],
      ]);
    }
    expect(await events(f, { action: 'device.destroy' })).toHaveLength(5);
    expect(await events(f, { action: 'field_key.destroy' })).toHaveLength(5);
    // the untouched device is untouched
    expect((await deviceRows(f, 'd-6')).map((r) => r.state)).toEqual(['primary']);
  });

  it('when a due device version still has a live field key wrapped under it, then it is held back and counted as blocked', async () => {
    // retention (another module) may schedule a single version; simulate one whose field key stays live
    const now = f.clock.now();
    await sql`update device_versions set state = 'destroy_scheduled', state_until = ${now} where device_id = 'd-6' and version = 1`.execute(f.t.database.db);
    const dry = await f.sweeps.destroyDue({ dryRun: true });
    expect(dry).toMatchObject({ devices: 0, fields: 0, blocked: 1 });
    const real = await f.sweeps.destroyDue();
    expect(real).toMatchObject({ devices: 0, fields: 0, blocked: 1 });
    expect((await deviceRows(f, 'd-6'))[0]?.wrapped_key).not.toBeNull();
    expect(await storedFieldKey(f, 'd-6', 'serial', 1)).toHaveLength(32);
  });
});
