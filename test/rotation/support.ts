/**
 * Rotation test helpers: an app on its own database with a manual clock, tokens, a backend with
 * a delivery key, independent unwrapping of stored material (KEK → group → device, straight
 * from the rows), a byte-level database dump, and audit queries.
 */
import crypto from 'node:crypto';
import type { CryptoKey } from 'jose';
import { sql } from 'kysely';
import { expect } from 'vitest';
import type { AuditEventView } from '../../src/audit/audit.service.js';
import type { createManualClock } from '../../src/clock.js';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import type { TestDatabase } from '../support/db.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair, type DeliveredJwk } from '../support/flow.js';

export const DAY = 24 * 60 * 60 * 1000;

export interface Fleet {
  t: TestApp;
  clock: ReturnType<typeof createManualClock>;
  admin: string;
  rotator: string;
  reader: string;
  backend: { privateKey: CryptoKey };
  close(): Promise<void>;
}

export async function createFleet(options: { kek?: (database: TestDatabase) => Promise<KekProvider>; readerGroups?: string[] } = {}): Promise<Fleet> {
  const t = await createTestApp({ manualClock: true, ...(options.kek ? { kek: options.kek } : {}) });
  const clock = t.clock as ReturnType<typeof createManualClock>;
  // the audit keys exist before the first change (on single-connection PGlite, a first change cannot create them)
  await t.audit.init();
  const admin = await t.token('keystrata:admin', { sub: 'alice' });
  const rotator = await t.token('keystrata:rotate', { sub: 'cron', ttlSeconds: 3600 });
  const backend = await newDeliveryKeyPair('X25519');
  expect((await call(t.app, admin, 'PUT', '/v1/clients/ingest/delivery-key', { jwk: backend.publicJwk })).status).toBe(200);
  const reader = await t.token('keystrata:keys:read', { sub: 'ingest', groups: options.readerGroups ?? [], ttlSeconds: 3600 });
  return { t, clock, admin, rotator, reader, backend, close: () => t.close() };
}

/** A local KEK provider with a known root key (so a CLI process can use the same KEK). */
export function localKek(rootKey: Buffer = crypto.randomBytes(32)) {
  return async (database: TestDatabase) => createLocalKekProvider({ db: database.db, rootKey, dataDir: '/nonexistent', keyName: 'keystrata-kek', logger: { warn() {} } });
}

export async function createGroup(f: Fleet, id: string, devices: number, prefix = id): Promise<string[]> {
  const created = await call(f.t.app, f.admin, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'eu' });
  expect(created.status, created.raw).toBe(201);
  const ids = Array.from({ length: devices }, (_, i) => `${prefix}-d${String(i).padStart(5, '0')}`);
  for (let i = 0; i < ids.length; i += 10_000) {
    const bulk = await call(f.t.app, f.admin, 'POST', `/v1/groups/${id}/devices/bulk`, { ids: ids.slice(i, i + 10_000) });
    expect(bulk.status, bulk.raw).toBe(201);
  }
  return ids;
}

/** Create many groups (no devices) a few at a time. */
export async function createGroups(f: Fleet, ids: string[]): Promise<void> {
  for (let i = 0; i < ids.length; i += 20) {
    const answers = await Promise.all(ids.slice(i, i + 20).map((id) => call(f.t.app, f.admin, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'eu' })));
    for (const a of answers) expect(a.status, a.raw).toBe(201);
  }
}

/** Every device version of a group with material, unwrapped here without the service's code paths. */
export async function storedDeviceKeys(f: Fleet, groupId: string): Promise<Map<string, Buffer>> {
  const db = f.t.database.db;
  const groups = await db.selectFrom('group_versions').selectAll().where('group_id', '=', groupId).execute();
  const groupKeys = new Map<number, Buffer>();
  for (const g of groups) {
    if (g.wrapped_key !== null) groupKeys.set(g.version, await f.t.kek.unwrap(g.wrapped_key, groupBinding(groupId, g.version, f.t.kek.keyName)));
  }
  const rows = await db
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select(['dv.device_id', 'dv.version', 'dv.parent_version', 'dv.wrapped_key'])
    .where('d.group_id', '=', groupId)
    .where('dv.wrapped_key', 'is not', null)
    .execute();
  const out = new Map<string, Buffer>();
  for (const r of rows) {
    const parent = groupKeys.get(r.parent_version);
    if (!parent) throw new Error(`device ${r.device_id} v${r.version} is wrapped under group v${r.parent_version}, which has no material`);
    out.set(`${r.device_id}:v${r.version}`, unwrapKey(parent, r.wrapped_key as Buffer, deviceBinding(r.device_id, r.version, groupId, r.parent_version)));
  }
  return out;
}

export async function storedFieldKey(f: Fleet, groupId: string, deviceId: string, field: string, version: number): Promise<Buffer> {
  const row = await f.t.database.db.selectFrom('field_versions').selectAll().where('device_id', '=', deviceId).where('field', '=', field).where('version', '=', version).executeTakeFirstOrThrow();
  const deviceKey = (await storedDeviceKeys(f, groupId)).get(`${deviceId}:v${row.parent_version}`);
  if (!deviceKey) throw new Error('device version missing');
  return unwrapKey(deviceKey, row.wrapped_key as Buffer, fieldBinding(deviceId, field, version, row.parent_version));
}

export async function fetchDeviceKeys(f: Fleet, deviceId: string, version: number | 'all' = 'all'): Promise<DeliveredJwk[]> {
  const response = await call(f.t.app, f.reader, 'GET', `/v1/devices/${deviceId}/keys?version=${version}`);
  expect(response.status, response.raw).toBe(200);
  return decryptKeySet(response.body.jwe as string, f.backend.privateKey);
}

export async function events(f: Fleet, filters: { action?: string; keyId?: string; keyIdPrefix?: string; outcome?: 'success' | 'failure' | 'denied' }): Promise<AuditEventView[]> {
  const out: AuditEventView[] = [];
  let cursor: string | undefined;
  do {
    const page = await f.t.audit.queryEvents(filters, cursor, 1000);
    out.push(...page.items);
    cursor = page.nextCursor;
  } while (cursor !== undefined);
  return out;
}

export async function countRows(f: Fleet, table: 'group_versions' | 'device_versions', where: (q: any) => any = (q) => q): Promise<number> {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const row = await where(f.t.database.db.selectFrom(table as any).select((eb: any) => eb.fn.countAll().as('n'))).executeTakeFirstOrThrow();
  return Number((row as { n: unknown }).n);
}

/**
 * Every row of every table of the schema, with its physical position (ctid) and inserting
 * transaction (xmin): any INSERT, UPDATE or DELETE — even one that writes the same values —
 * changes the dump.
 */
export async function dumpDatabase(f: Fleet): Promise<string> {
  const db = f.t.database.db;
  const { rows: tables } = await sql<{ table_name: string }>`
    select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`.execute(db);
  const out: Record<string, unknown> = {};
  for (const { table_name } of tables) {
    const { rows } = await sql<Record<string, unknown>>`select ctid::text as "_ctid", xmin::text as "_xmin", t.* from ${sql.table(table_name)} t order by ctid`.execute(db);
    out[table_name] = rows;
  }
  return JSON.stringify(out, (_k, v: unknown) => (Buffer.isBuffer(v) ? v.toString('hex') : v && typeof v === 'object' && (v as { type?: string }).type === 'Buffer' ? Buffer.from((v as { data: number[] }).data).toString('hex') : v));
}

export async function setPolicies(f: Fleet, body: Record<string, unknown>): Promise<void> {
  const response = await call(f.t.app, f.admin, 'PUT', '/v1/policies', body);
  expect(response.status, response.raw).toBe(200);
}

export async function runCron(f: Fleet, body: Record<string, unknown> = {}) {
  const response = await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', body);
  expect(response.status, response.raw).toBe(200);
  return response.body as unknown as RunSummary;
}

// the parts of the summary tests read
export interface RunSummary {
  dryRun: boolean;
  complete: boolean;
  errors: Array<{ step: string; groupId?: string; code: string; message: string }>;
  kek: { status: string; rotated: boolean; fromVersion: number; toVersion: number; rewrap: { batches: number; groupKeys: { rewrapped: number; failed: number; remaining: number }; auditKeys: { rewrapped: number; failed: number; remaining: number } }; minDecryptionVersion: { before: number; after: number; raised: boolean; blockedBy: string | null } } | null;
  groups: { checked: number; rotated: Array<{ groupId: string; fromVersion: number; toVersion: number }>; dueOutsideWindow: string[]; deferred: string[]; children: { rewrapped: number; failed: number; remaining: number }; retired: Array<{ groupId: string; version: number; from: string; to: string }> };
  devices: { primariesDue: number; fieldPrimariesDue: number; byGroup: unknown[]; rollouts: unknown };
  sweeps: { graceExpired: { devices: number; fields: number } | null; destroyed: { devices: number; fields: number } | null };
}
