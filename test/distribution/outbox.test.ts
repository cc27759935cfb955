/**
 * The outbox, without a broker (MQTT_URL unset: rows wait): which rows every version change
 * writes, under which transport version, with or without a key; that a row commits or rolls
 * back with its change; and the read models and the grace hold-back predicate.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { countAwaitingAck, enqueueKeyUpdate, enqueueKeyUpdates, isHeldForAck, listAwaitingAck, successorUnacknowledged, type KeyUpdate } from '../../src/distribution/index.js';
import { distributionDb } from '../../src/distribution/distribution.tables.js';
import { call } from '../support/flow.js';
import { createEnv, enrol, outboxRows, rotate, type Env } from './support.js';

const pick = (rows: Awaited<ReturnType<typeof outboxRows>>) => rows.map((r) => ({ kind: r.kind, field: r.field, version: r.version, state: r.state, wrappedBy: r.wrapped_by, withKey: r.with_key, status: r.status }));

describe('what each version change writes to the outbox', () => {
  let e: Env;
  beforeAll(async () => {
    e = await createEnv();
  });
  afterAll(async () => e?.close());

  it('when a device is enrolled, then nothing is queued (its v1 is provisioned with it); a field key is queued under the device primary', async () => {
    await enrol(e, ['o-1']);
    expect(await outboxRows(e.t, 'o-1')).toEqual([]);
    expect((await call(e.t.app, e.admin, 'POST', '/v1/devices/o-1/fields', { field: 'hr' })).status).toBe(201);
    expect(pick(await outboxRows(e.t, 'o-1'))).toEqual([{ kind: 'field', field: 'hr', version: 1, state: 'primary', wrappedBy: 1, withKey: true, status: 'pending' }]);
  });

  it('when a device is rotated, then its new key is queued under the previous primary; a field rotation under the new device primary', async () => {
    await rotate(e, 'o-1');
    await rotate(e, 'o-1', 'hr');
    expect(pick(await outboxRows(e.t, 'o-1')).slice(1)).toEqual([
      { kind: 'device', field: '', version: 2, state: 'primary', wrappedBy: 1, withKey: true, status: 'pending' },
      { kind: 'field', field: 'hr', version: 2, state: 'primary', wrappedBy: 2, withKey: true, status: 'pending' },
    ]);
  });

  it('when a rotation is for a compromise, then the new key goes under a version still in grace rather than the revoked one, and the revocation is announced without a key', async () => {
    await rotate(e, 'o-1'); // v3; v2 grace, v1 grace
    await rotate(e, 'o-1', undefined, { compromised: true }); // v4; v3 disabled
    expect(pick(await outboxRows(e.t, 'o-1')).slice(3)).toEqual([
      { kind: 'device', field: '', version: 3, state: 'primary', wrappedBy: 2, withKey: true, status: 'pending' },
      { kind: 'device', field: '', version: 4, state: 'primary', wrappedBy: 2, withKey: true, status: 'pending' },
      { kind: 'device', field: '', version: 3, state: 'disabled', wrappedBy: 4, withKey: false, status: 'pending' },
    ]);
  });

  it('when the only other version is the compromised one, then the new key can only go under it (the documented limit of in-band rotation)', async () => {
    await enrol(e, ['o-2']);
    await rotate(e, 'o-2', undefined, { compromised: true });
    expect(pick(await outboxRows(e.t, 'o-2'))).toEqual([
      { kind: 'device', field: '', version: 2, state: 'primary', wrappedBy: 1, withKey: true, status: 'pending' },
      { kind: 'device', field: '', version: 1, state: 'disabled', wrappedBy: 2, withKey: false, status: 'pending' },
    ]);
  });

  it('when a new primary is disabled and the previous one takes over (rollback), then the device is told both, without re-sending either key', async () => {
    await enrol(e, ['o-3']);
    await rotate(e, 'o-3');
    const r = await call(e.t.app, e.admin, 'POST', '/v1/devices/o-3/versions/2/disable', {});
    expect(r.status, r.raw).toBe(200);
    expect(pick(await outboxRows(e.t, 'o-3'))).toEqual([
      { kind: 'device', field: '', version: 2, state: 'primary', wrappedBy: 1, withKey: true, status: 'pending' },
      // never sealed under the revoked v2: the state change of v1 is authenticated under v1 itself
      { kind: 'device', field: '', version: 1, state: 'primary', wrappedBy: 1, withKey: false, status: 'pending' },
      { kind: 'device', field: '', version: 2, state: 'disabled', wrappedBy: 1, withKey: false, status: 'pending' },
    ]);
  });

  it('when a chunk is enqueued at once, then each row is what one-by-one calls write, in the given order', async () => {
    await enrol(e, ['o-4', 'o-5']);
    await rotate(e, 'o-4');
    await rotate(e, 'o-5', undefined, { compromised: true });
    const updates: KeyUpdate[] = [
      { deviceId: 'o-4', kind: 'device', version: 2, state: 'primary' },
      { deviceId: 'o-5', kind: 'device', version: 2, state: 'pending', notBefore: new Date('2026-06-01T00:00:00Z') },
      { deviceId: 'o-4', kind: 'device', version: 1, state: 'disabled' },
      { deviceId: 'o-1', kind: 'field', field: 'hr', version: 2, state: 'grace' },
      { deviceId: 'o-5', kind: 'device', version: 1, state: 'primary' },
      { deviceId: 'o-3', kind: 'device', version: 1, state: 'primary' },
    ];
    // the same updates twice over: first in a fresh outbox state, then with the keys already queued
    const both = [...updates, ...updates];
    const written = async (write: (trx: Parameters<typeof enqueueKeyUpdates>[0]) => Promise<unknown>) => {
      let rows: Awaited<ReturnType<typeof outboxRows>> = [];
      const before = (await outboxRows(e.t)).length;
      await e.t.database.db
        .transaction()
        .execute(async (trx) => {
          await write(trx);
          rows = (await sql<Awaited<ReturnType<typeof outboxRows>>[number]>`select * from key_outbox order by id`.execute(trx)).rows.slice(before);
          throw new Error('rollback');
        })
        .catch(() => {});
      return rows.map((r) => ({ deviceId: r.device_id, ...pick([r])[0], notBefore: r.not_before }));
    };
    await sql`delete from key_outbox where device_id in ('o-4', 'o-5')`.execute(e.t.database.db);
    const batch = await written((trx) => enqueueKeyUpdates(trx, both));
    const single = await written(async (trx) => {
      for (const u of both) await enqueueKeyUpdate(trx, u);
    });
    expect(batch).toHaveLength(both.length);
    expect(batch).toEqual(single);
    expect(batch.slice(0, 2).map((r) => r.withKey)).toEqual([true, true]);
    expect(batch.slice(6, 8).map((r) => r.withKey)).toEqual([false, false]);
  });

  it('when enqueue runs outside a transaction, or its transaction rolls back, then no row exists', async () => {
    await expect(enqueueKeyUpdate(e.t.database.db, { deviceId: 'o-3', kind: 'device', version: 1, state: 'primary' })).rejects.toThrow(/inside the transaction/);
    const before = (await outboxRows(e.t)).length;
    await expect(
      e.t.database.db.transaction().execute(async (trx) => {
        await enqueueKeyUpdate(trx, { deviceId: 'o-3', kind: 'device', version: 1, state: 'primary' });
        throw new Error('the version change failed');
      }),
    ).rejects.toThrow('the version change failed');
    expect(await outboxRows(e.t)).toHaveLength(before);
    await expect(e.t.database.db.transaction().execute((trx) => enqueueKeyUpdate(trx, { deviceId: 'nobody', kind: 'device', version: 1, state: 'primary' }))).rejects.toThrow(/does not exist/);
    await expect(e.t.database.db.transaction().execute((trx) => enqueueKeyUpdate(trx, { deviceId: 'o-3', kind: 'field', version: 1, state: 'primary' }))).rejects.toThrow(/needs its field/);
  });
});

describe('acknowledgement state for rotation debt, rollouts and the grace sweep', () => {
  let e: Env;
  beforeAll(async () => {
    e = await createEnv();
    await enrol(e, ['k-1', 'k-2', 'k-3']);
    await rotate(e, 'k-1');
    await rotate(e, 'k-2');
  });
  afterAll(async () => e?.close());

  const ack = (deviceId: string, version: number) =>
    distributionDb(e.t.database.db).insertInto('key_acks').values({ device_id: deviceId, kind: 'device', field: '', version, acknowledged_at: new Date() }).execute();
  const ddb = () => distributionDb(e.t.database.db);
  /** grace versions the sweep may expire when it waits for acknowledgements */
  const expirable = async () =>
    (
      await ddb()
        .selectFrom('device_versions as d')
        .select(['d.device_id', 'd.version'])
        .where('d.state', '=', 'grace')
        .where((eb) => eb.not(successorUnacknowledged({ kind: 'device', deviceId: 'd.device_id', version: 'd.version' })))
        .orderBy('d.device_id')
        .execute()
    ).map((r) => `${r.device_id}:v${r.version}`);

  it('when new versions were sent but not acknowledged, then they are listed and counted, and their predecessors are held in grace', async () => {
    expect((await listAwaitingAck(ddb(), { groupId: 'pumps' })).map((a) => `${a.deviceId}:${a.kind}:v${a.version}:${a.state}`)).toEqual(['k-1:device:v2:primary', 'k-2:device:v2:primary']);
    expect(await countAwaitingAck(ddb(), 'pumps')).toEqual({ devices: 2, versions: 2 });
    expect(await isHeldForAck(ddb(), { deviceId: 'k-1', kind: 'device', version: 1 })).toBe(true);
    expect(await expirable()).toEqual([]);
  });

  it('when a device acknowledges, then it leaves the list and its old version may leave grace; a version whose successor never went through the outbox is not held', async () => {
    await ack('k-1', 2);
    expect((await listAwaitingAck(ddb(), { groupId: 'pumps' })).map((a) => a.deviceId)).toEqual(['k-2']);
    expect(await countAwaitingAck(ddb(), 'pumps')).toEqual({ devices: 1, versions: 1 });
    expect(await isHeldForAck(ddb(), { deviceId: 'k-1', kind: 'device', version: 1 })).toBe(false);
    expect(await expirable()).toEqual(['k-1:v1']);
    // k-3 rotated by something that wrote no outbox row (older code): nothing to wait for
    await rotate(e, 'k-3');
    await sql`delete from key_outbox where device_id = 'k-3'`.execute(e.t.database.db);
    expect(await isHeldForAck(ddb(), { deviceId: 'k-3', kind: 'device', version: 1 })).toBe(false);
    expect(await expirable()).toEqual(['k-1:v1', 'k-3:v1']);
    // an acknowledgement of a newer version covers the older ones
    await rotate(e, 'k-2');
    await ack('k-2', 3);
    expect(await listAwaitingAck(ddb(), { deviceIds: ['k-2'] })).toEqual([]);
    expect(await isHeldForAck(ddb(), { deviceId: 'k-2', kind: 'device', version: 2 })).toBe(false);
  });

  it('when the predicate is used on field versions, then it holds exactly the unacknowledged ones; unqualified references are refused', async () => {
    expect((await call(e.t.app, e.admin, 'POST', '/v1/devices/k-1/fields', { field: 'temp' })).status).toBe(201);
    expect((await call(e.t.app, e.admin, 'POST', '/v1/devices/k-2/fields', { field: 'temp' })).status).toBe(201);
    await rotate(e, 'k-1', 'temp');
    await rotate(e, 'k-2', 'temp');
    await distributionDb(e.t.database.db).insertInto('key_acks').values({ device_id: 'k-2', kind: 'field', field: 'temp', version: 2, acknowledged_at: new Date() }).execute();
    const graceFields = await ddb()
      .selectFrom('field_versions')
      .select(['field_versions.device_id', 'field_versions.version'])
      .where('field_versions.state', '=', 'grace')
      .where((eb) => eb.not(successorUnacknowledged({ kind: 'field', deviceId: 'field_versions.device_id', field: 'field_versions.field', version: 'field_versions.version' })))
      .execute();
    expect(graceFields.map((r) => `${r.device_id}:v${r.version}`)).toEqual(['k-2:v1']);
    expect(() => successorUnacknowledged({ kind: 'field', deviceId: 'device_id', field: 'field', version: 'version' })).toThrow(/qualified/);
  });
});
