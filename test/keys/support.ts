/**
 * A fleet for lifecycle tests: a full app on its own database with a manual clock, a group,
 * devices with field keys, a backend with a registered delivery key, and helpers that unwrap
 * stored material independently of the service (KEK → group → device → field, straight from
 * the rows) and fetch + decrypt delivered keys.
 */
import type { CryptoKey } from 'jose';
import { sql } from 'kysely';
import { expect } from 'vitest';
import type { AuditEventView } from '../../src/audit/audit.service.js';
import type { createManualClock } from '../../src/clock.js';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createVersionSweeps, type VersionSweeps } from '../../src/keys/version-sweeps.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair, type DeliveredJwk } from '../support/flow.js';

export const DAY = 24 * 60 * 60 * 1000;

export interface Fleet {
  t: TestApp;
  clock: ReturnType<typeof createManualClock>;
  admin: string;
  reader: string;
  backend: { privateKey: CryptoKey };
  sweeps: VersionSweeps;
  /** the cache handed to the sweeps (the app's own cache is internal) */
  sweepCache: ReturnType<typeof createKeyCache>;
  close(): Promise<void>;
}

export async function createFleet(groupId = 'pumps'): Promise<Fleet> {
  const t = await createTestApp({ manualClock: true });
  const clock = t.clock as ReturnType<typeof createManualClock>;
  const admin = await t.token('keystrata:admin', { sub: 'alice' });
  expect((await call(t.app, admin, 'POST', '/v1/groups', { id: groupId, deviceType: 'infusion-pump', region: 'eu-west' })).status).toBe(201);
  const backend = await newDeliveryKeyPair('X25519');
  expect((await call(t.app, admin, 'PUT', '/v1/clients/ingest/delivery-key', { jwk: backend.publicJwk })).status).toBe(200);
  const reader = await t.token('keystrata:keys:read', { sub: 'ingest', groups: [groupId] });
  const sweepCache = createKeyCache({ ttlSeconds: 3600, maxEntries: 100 });
  const sweeps = createVersionSweeps({ db: t.database.db, audit: t.audit, material: { cache: sweepCache }, clock });
  return { t, clock, admin, reader, backend, sweeps, sweepCache, close: () => t.close() };
}

/** Enrol devices, each with the given field keys. */
export async function enrol(f: Fleet, ids: string[], fields: string[] = [], groupId = 'pumps'): Promise<void> {
  expect((await call(f.t.app, f.admin, 'POST', `/v1/groups/${groupId}/devices/bulk`, { ids })).status).toBe(201);
  for (const id of ids) {
    for (const field of fields) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field })).status).toBe(201);
  }
}

export async function deviceRows(f: Fleet, deviceId: string) {
  return f.t.database.db.selectFrom('device_versions').selectAll().where('device_id', '=', deviceId).orderBy('version').execute();
}

export async function fieldRows(f: Fleet, deviceId: string, field?: string) {
  let q = f.t.database.db.selectFrom('field_versions').selectAll().where('device_id', '=', deviceId);
  if (field !== undefined) q = q.where('field', '=', field);
  return q.orderBy('field').orderBy('version').execute();
}

/** The stored device DEK, unwrapped here without the service's code paths. */
export async function storedDeviceKey(f: Fleet, deviceId: string, version: number): Promise<Buffer> {
  const db = f.t.database.db;
  const device = await db.selectFrom('devices').select('group_id').where('id', '=', deviceId).executeTakeFirstOrThrow();
  const row = await db.selectFrom('device_versions').selectAll().where('device_id', '=', deviceId).where('version', '=', version).executeTakeFirstOrThrow();
  const group = await db.selectFrom('group_versions').selectAll().where('group_id', '=', device.group_id).where('version', '=', row.parent_version).executeTakeFirstOrThrow();
  const groupKey = await f.t.kek.unwrap(group.wrapped_key as string, groupBinding(device.group_id, group.version, f.t.kek.keyName));
  return unwrapKey(groupKey, row.wrapped_key as Buffer, deviceBinding(deviceId, version, device.group_id, group.version));
}

/** The stored field key, unwrapped under the device version its row names. */
export async function storedFieldKey(f: Fleet, deviceId: string, field: string, version: number): Promise<Buffer> {
  const row = await f.t.database.db
    .selectFrom('field_versions')
    .selectAll()
    .where('device_id', '=', deviceId)
    .where('field', '=', field)
    .where('version', '=', version)
    .executeTakeFirstOrThrow();
  const deviceKey = await storedDeviceKey(f, deviceId, row.parent_version);
  return unwrapKey(deviceKey, row.wrapped_key as Buffer, fieldBinding(deviceId, field, version, row.parent_version));
}

/** GET …/keys (device or field), decrypted; or the problem response when it is refused. */
export async function fetchKeys(f: Fleet, deviceId: string, options: { field?: string; version?: number | 'all' } = {}) {
  const base = options.field === undefined ? `/v1/devices/${deviceId}/keys` : `/v1/devices/${deviceId}/fields/${options.field}/keys`;
  const url = options.version === undefined ? base : `${base}?version=${options.version}`;
  const response = await call(f.t.app, f.reader, 'GET', url);
  const keys = response.status === 200 ? await decryptKeySet(response.body.jwe as string, f.backend.privateKey) : [];
  return { ...response, keys };
}

export async function fetchBulk(f: Fleet, items: Array<{ deviceId: string; field?: string; version?: number | 'all' }>) {
  const response = await call(f.t.app, f.reader, 'POST', '/v1/keys/fetch', { items });
  expect(response.status, response.raw).toBe(200);
  return { keys: await decryptKeySet(response.body.jwe as string, f.backend.privateKey), missing: response.body.missing as Array<Record<string, unknown>> };
}

export const keyBytes = (jwk: DeliveredJwk | undefined): Buffer => Buffer.from((jwk as DeliveredJwk).k, 'base64url');

export async function events(f: Fleet, filters: { action?: string; keyId?: string; keyIdPrefix?: string }): Promise<AuditEventView[]> {
  return (await f.t.audit.queryEvents(filters, undefined, 1000)).items;
}

/** Every row of the tables a lifecycle change can touch, for before/after comparisons. */
export async function snapshot(f: Fleet): Promise<string> {
  const db = f.t.database.db;
  const tables = ['devices', 'device_versions', 'field_versions', 'group_versions', 'audit_events'] as const;
  const out: Record<string, unknown> = {};
  for (const table of tables) {
    const { rows } = await sql<Record<string, unknown>>`select * from ${sql.table(table)} order by 1, 2`.execute(db);
    out[table] = rows;
  }
  return JSON.stringify(out, (_k, v: unknown) => (v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' ? Buffer.from((v as { data: number[] }).data).toString('hex') : v));
}
