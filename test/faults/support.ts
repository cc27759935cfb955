/**
 * Fault-injection helpers: a fleet on its own database (optionally reached through a TCP proxy
 * the test can cut), the checks every fault test ends with (no key lost, every deliverable
 * version delivered and equal to the stored material unwrapped independently, the audit chain
 * verifies, refusals were 503 + Retry-After problem+json in bounded time), and the proxy.
 */
import net from 'node:net';
import type { CryptoKey } from 'jose';
import { sql, type Kysely } from 'kysely';
import { expect } from 'vitest';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import type { DB } from '../../src/db/database.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { DELIVERABLE_STATES } from '../../src/keys/key.repository.js';
import { createTestApp, type TestApp } from '../support/app.js';
import type { TestDatabase } from '../support/db.js';
import { call, decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';

export interface FaultFleet {
  t: TestApp;
  /** admin token of client `verifier`, which has a delivery key: it may fetch every group's keys */
  admin: string;
  rotator: string;
  backend: { privateKey: CryptoKey };
  close(): Promise<void>;
}

export async function createFaultFleet(
  options: { kek?: (database: TestDatabase) => Promise<KekProvider>; env?: Record<string, string>; databaseUrl?: (directUrl: string) => string } = {},
): Promise<FaultFleet> {
  const t = await createTestApp({
    env: { RATE_LIMIT_ENABLED: 'false', LOG_LEVEL: 'info', ...options.env },
    ...(options.kek ? { kek: options.kek } : {}),
    ...(options.databaseUrl ? { databaseUrl: options.databaseUrl } : {}),
  });
  await t.audit.init();
  const admin = await t.token('keystrata:admin', { sub: 'verifier', ttlSeconds: 3600 });
  const rotator = await t.token('keystrata:rotate', { sub: 'cron', ttlSeconds: 3600 });
  const backend = await newDeliveryKeyPair('X25519');
  const registered = await call(t.app, admin, 'PUT', '/v1/clients/verifier/delivery-key', { jwk: backend.publicJwk });
  expect(registered.status, registered.raw).toBe(200);
  return { t, admin, rotator, backend, close: () => t.close() };
}

export async function createGroupWithDevices(f: FaultFleet, id: string, devices: number, fields: string[] = []): Promise<string[]> {
  const created = await call(f.t.app, f.admin, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'eu' });
  expect(created.status, created.raw).toBe(201);
  const ids = Array.from({ length: devices }, (_, i) => `${id}-d${String(i).padStart(5, '0')}`);
  for (let i = 0; i < ids.length; i += 10_000) {
    const bulk = await call(f.t.app, f.admin, 'POST', `/v1/groups/${id}/devices/bulk`, { ids: ids.slice(i, i + 10_000) });
    expect(bulk.status, bulk.raw).toBe(201);
  }
  for (const field of fields) {
    for (const deviceId of ids.slice(0, 3)) {
      const response = await call(f.t.app, f.admin, 'POST', `/v1/devices/${deviceId}/fields`, { field });
      expect(response.status, response.raw).toBe(201);
    }
  }
  return ids;
}

/** kid (as delivered: `device:vN`, `device/field:vN`) → key, for every stored version with material, unwrapped here from the rows. */
export async function storedMaterial(db: Kysely<DB>, kek: KekProvider): Promise<Map<string, { key: Buffer; state: string }>> {
  const groupKeys = new Map<string, Buffer>();
  for (const g of await db.selectFrom('group_versions').select(['group_id', 'version', 'wrapped_key']).execute()) {
    if (g.wrapped_key !== null) groupKeys.set(`${g.group_id}:${g.version}`, await kek.unwrap(g.wrapped_key, groupBinding(g.group_id, g.version, kek.keyName)));
  }
  const out = new Map<string, { key: Buffer; state: string }>();
  const deviceKeys = new Map<string, Buffer>();
  const devices = await db
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select(['d.group_id', 'dv.device_id', 'dv.version', 'dv.parent_version', 'dv.wrapped_key', 'dv.state'])
    .where('dv.wrapped_key', 'is not', null)
    .execute();
  for (const r of devices) {
    const parent = groupKeys.get(`${r.group_id}:${r.parent_version}`);
    if (!parent) throw new Error(`device ${r.device_id} v${r.version}: its group version ${r.parent_version} has no material`);
    const key = unwrapKey(parent, r.wrapped_key as Buffer, deviceBinding(r.device_id, r.version, r.group_id, r.parent_version));
    deviceKeys.set(`${r.device_id}:${r.version}`, key);
    out.set(`${r.device_id}:v${r.version}`, { key, state: r.state });
  }
  const fields = await db.selectFrom('field_versions').select(['device_id', 'field', 'version', 'parent_version', 'wrapped_key', 'state']).where('wrapped_key', 'is not', null).execute();
  for (const r of fields) {
    const parent = deviceKeys.get(`${r.device_id}:${r.parent_version}`);
    if (!parent) throw new Error(`field ${r.device_id}/${r.field} v${r.version}: its device version ${r.parent_version} has no material`);
    out.set(`${r.device_id}/${r.field}:v${r.version}`, { key: unwrapKey(parent, r.wrapped_key as Buffer, fieldBinding(r.device_id, r.field, r.version, r.parent_version)), state: r.state });
  }
  return out;
}

/** POST /v1/keys/fetch of some service (in-process or over HTTP), with the private half of the caller's delivery key. */
export interface Deliveries {
  fetchBulk(items: ReadonlyArray<{ deviceId: string; field?: string; version: 'all' }>): Promise<{ status: number; body: Record<string, unknown>; raw: string }>;
  privateKey: CryptoKey;
}

/**
 * Fetch every device's and field's deliverable versions through the API (bulk fetch, JWE to the
 * verifier's delivery key), decrypt, and compare with the stored material unwrapped
 * independently (`kek`: a provider of our own, not the app's). Returns the stored material.
 */
export async function expectEveryDeliverableVersionUnwraps(target: FaultFleet | Deliveries, db: Kysely<DB>, kek: KekProvider): Promise<Map<string, { key: Buffer; state: string }>> {
  const deliveries: Deliveries =
    'fetchBulk' in target ? target : { fetchBulk: (items) => call(target.t.app, target.admin, 'POST', '/v1/keys/fetch', { items }), privateKey: target.backend.privateKey };
  const stored = await storedMaterial(db, kek);
  const items: Array<{ deviceId: string; field?: string; version: 'all' }> = [];
  for (const d of await db.selectFrom('devices').select('id').orderBy('id').execute()) items.push({ deviceId: d.id, version: 'all' });
  for (const k of await db.selectFrom('field_keys').select(['device_id', 'field']).orderBy('device_id').execute()) items.push({ deviceId: k.device_id, field: k.field, version: 'all' });
  const delivered = new Map<string, Buffer>();
  const missing: string[] = [];
  for (let i = 0; i < items.length; i += 1000) {
    const response = await deliveries.fetchBulk(items.slice(i, i + 1000));
    expect(response.status, response.raw).toBe(200);
    for (const m of response.body.missing as Array<{ deviceId: string; field?: string }>) missing.push(m.field ? `${m.deviceId}/${m.field}` : m.deviceId);
    for (const jwk of await decryptKeySet(response.body.jwe as string, deliveries.privateKey)) delivered.set(jwk.kid, Buffer.from(jwk.k, 'base64url'));
  }
  const deliverable = [...stored].filter(([, v]) => (DELIVERABLE_STATES as readonly string[]).includes(v.state));
  // listed as missing: exactly the keys none of whose versions is deliverable (shredded, disabled)
  const owner = (kid: string) => kid.slice(0, kid.lastIndexOf(':v'));
  const withDeliverable = new Set(deliverable.map(([kid]) => owner(kid)));
  expect(missing.filter((m) => withDeliverable.has(m)), 'a key with a deliverable version is never missing').toEqual([]);
  expect(deliverable.length).toBeGreaterThan(0);
  for (const [kid, { key }] of deliverable) {
    expect(delivered.get(kid)?.equals(key), `${kid} is delivered and equals the stored key`).toBe(true);
  }
  expect(delivered.size).toBe(deliverable.length);
  return stored;
}

/** Nothing that existed is gone or changed: every key of `before` is in `after`, byte for byte. */
export function expectNoKeyLost(before: Map<string, { key: Buffer }>, after: Map<string, { key: Buffer }>): void {
  const lost = [...before].filter(([kid, { key }]) => !after.get(kid)?.key.equals(key)).map(([kid]) => kid);
  expect(lost).toEqual([]);
}

export async function expectAuditChainVerifies(f: FaultFleet): Promise<void> {
  const result = await f.t.audit.verify({});
  expect(result, JSON.stringify(result)).toMatchObject({ ok: true });
}

export interface Answer {
  status: number;
  body: Record<string, unknown>;
  headers: Record<string, unknown>;
  raw: string;
  ms: number;
}

export async function timedCall(f: FaultFleet, token: string | undefined, method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, payload?: unknown): Promise<Answer> {
  const started = performance.now();
  const response = await call(f.t.app, token, method, url, payload);
  return { ...response, ms: performance.now() - started };
}

/** 503 problem+json with a Retry-After of whole seconds (≥ 1, ≤ max), answered within `withinMs`. */
export function expectUnavailable(answer: Answer, options: { withinMs: number; maxRetryAfter?: number }): number {
  const what = `${answer.status} after ${Math.round(answer.ms)} ms: ${answer.raw.slice(0, 300)}`;
  expect(answer.status, what).toBe(503);
  expect(answer.headers['content-type'], what).toMatch(/^application\/problem\+json/);
  expect(answer.body, what).toMatchObject({ status: 503, title: expect.any(String), detail: expect.any(String) });
  const retryAfter = String(answer.headers['retry-after']);
  expect(retryAfter, what).toMatch(/^[1-9]\d*$/);
  if (options.maxRetryAfter !== undefined) expect(Number(retryAfter), what).toBeLessThanOrEqual(options.maxRetryAfter);
  expect(answer.ms, what).toBeLessThan(options.withinMs);
  return Number(retryAfter);
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** A TCP port free on loopback right now (for a server the test starts). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Poll until `check` holds (or fail after `timeoutMs`). */
export async function until(check: () => Promise<boolean> | boolean, timeoutMs = 30_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await sleep(everyMs);
  }
}

/**
 * Rows of every table but the append-only and bookkeeping ones, as counts plus an md5 of the
 * rows in a stable order: equal snapshots mean nothing was inserted, updated or deleted there.
 */
export async function tableSnapshot(db: Kysely<DB>, skip: readonly string[] = ['audit_events', 'audit_chain_head', 'idempotency_keys', 'kysely_migration', 'kysely_migration_lock']): Promise<Record<string, string>> {
  const { rows: tables } = await sql<{ table_name: string }>`
    select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`.execute(db);
  const out: Record<string, string> = {};
  for (const { table_name } of tables) {
    if (skip.includes(table_name)) continue;
    const { rows } = await sql<{ n: number; digest: string | null }>`
      select count(*)::int as n, md5(coalesce(string_agg(t::text, '|' order by t::text), '')) as digest from ${sql.table(table_name)} t`.execute(db);
    out[table_name] = `${rows[0]!.n}:${rows[0]!.digest}`;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of PostgreSQL that a test can cut (every connection killed, new ones
// refused, as during a restart) or black-hole (connections accepted, nothing forwarded).

export interface TcpProxy {
  port: number;
  /** the same connection string, through the proxy */
  urlFor(directUrl: string): string;
  cut(): void;
  blackhole(): void;
  restore(): void;
  readonly mode: 'open' | 'refuse' | 'blackhole';
  /** connections accepted while open, in all */
  readonly accepted: number;
  close(): Promise<void>;
}

export async function startTcpProxy(target: { host: string; port: number }): Promise<TcpProxy> {
  let mode: TcpProxy['mode'] = 'open';
  let accepted = 0;
  const live = new Set<net.Socket>();
  const pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();
  const server = net.createServer((client) => {
    live.add(client);
    client.on('close', () => live.delete(client));
    client.on('error', () => {});
    if (mode === 'refuse') {
      client.destroy();
      return;
    }
    if (mode === 'blackhole') return; // held open, never answered
    accepted += 1;
    const upstream = net.connect(target.port, target.host);
    live.add(upstream);
    const pair = { client, upstream };
    pairs.add(pair);
    upstream.on('close', () => {
      live.delete(upstream);
      pairs.delete(pair);
      client.destroy();
    });
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const killAll = () => {
    for (const socket of live) socket.destroy();
    live.clear();
    pairs.clear();
  };
  return {
    port,
    urlFor(directUrl) {
      const url = new URL(directUrl);
      url.hostname = '127.0.0.1';
      url.port = String(port);
      return url.toString();
    },
    cut() {
      mode = 'refuse';
      killAll();
    },
    blackhole() {
      mode = 'blackhole';
      // established connections stop forwarding in both directions (a partition: no FIN, no RST)
      for (const { client, upstream } of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    restore() {
      if (mode === 'blackhole') killAll(); // what was held is gone, as after a real partition
      mode = 'open';
    },
    get mode() {
      return mode;
    },
    get accepted() {
      return accepted;
    },
    close: () =>
      new Promise<void>((resolve) => {
        killAll();
        server.close(() => resolve());
      }),
  };
}
