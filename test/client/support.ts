/**
 * A keystrata served on a real loopback port for the client tests, with a fleet (group,
 * devices, field keys), a backend client id with its delivery key, devices' own field keys
 * (fetched through the API, as MQTT would hand them over), a request-counting fetch, a tiny
 * HTTP proxy that can answer 503 storms, and direct version-state changes in the test DB
 * (the rotation and disable routes belong to other issues).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import crypto from 'node:crypto';
import { sql } from 'kysely';
import type { CryptoKey } from 'jose';
import { wrapKey } from '../../src/crypto/aead.js';
import { fieldBinding } from '../../src/crypto/binding.js';
import type { VersionState } from '../../src/db/tables.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';

export const GROUP = 'wards';
export const BACKEND = 'ingest';

export interface Fleet {
  t: TestApp;
  baseUrl: string;
  admin: string;
  /** keys:read token of the backend client id */
  reader: string;
  backend: { publicJwk: Record<string, unknown>; privateKey: CryptoKey };
  close(): Promise<void>;
}

export async function startFleet(options: { devices: string[]; fields: Record<string, string[]> }): Promise<Fleet> {
  const t = await createTestApp();
  const admin = await t.token('keystrata:admin', { sub: 'alice' });
  await expectOk(call(t.app, admin, 'POST', '/v1/groups', { id: GROUP, deviceType: 'bedside-monitor', region: 'eu-west' }));
  await expectOk(call(t.app, admin, 'POST', `/v1/groups/${GROUP}/devices/bulk`, { ids: options.devices }));
  for (const [deviceId, fields] of Object.entries(options.fields)) {
    for (const field of fields) await expectOk(call(t.app, admin, 'POST', `/v1/devices/${deviceId}/fields`, { field }));
  }
  const backend = await newDeliveryKeyPair('X25519');
  await expectOk(call(t.app, admin, 'PUT', `/v1/clients/${BACKEND}/delivery-key`, { jwk: backend.publicJwk }));
  const reader = await t.token('keystrata:keys:read', { sub: BACKEND, groups: [GROUP], ttlSeconds: 3600 });
  await t.app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = t.app.server.address() as AddressInfo;
  return { t, baseUrl: `http://127.0.0.1:${port}`, admin, reader, backend, close: () => t.close() };
}

async function expectOk(response: Promise<{ status: number; raw: string }>): Promise<void> {
  const { status, raw } = await response;
  if (status >= 300) throw new Error(`setup call failed: ${status} ${raw}`);
}

/** The field keys a device holds, as delivered JWKs (fetched here by a second backend identity). */
export async function deviceKeys(fleet: Fleet, deviceId: string, field: string): Promise<Array<{ kid: string; k: string; state: string; version: number }>> {
  const carrier = await newDeliveryKeyPair('P-256');
  const id = `mqtt-carrier-${crypto.randomBytes(4).toString('hex')}`;
  await expectOk(call(fleet.t.app, fleet.admin, 'PUT', `/v1/clients/${id}/delivery-key`, { jwk: carrier.publicJwk }));
  const token = await fleet.t.token('keystrata:keys:read', { sub: id, groups: [GROUP] });
  const response = await call(fleet.t.app, token, 'GET', `/v1/devices/${deviceId}/fields/${field}/keys?version=all`);
  if (response.status !== 200) throw new Error(`device key fetch failed: ${response.raw}`);
  return decryptKeySet(response.body.jwe as string, carrier.privateKey);
}

/** fetch that records every request (url, method, parsed JSON body) before passing it on. */
export function countingFetch(inner: typeof fetch = fetch) {
  const calls: Array<{ url: string; method: string; body: { items?: Array<Record<string, unknown>> } | undefined }> = [];
  const wrapped: typeof fetch = async (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    calls.push({ url, method: init?.method ?? 'GET', body: typeof init?.body === 'string' ? JSON.parse(init.body) : undefined });
    return inner(input, init);
  };
  return { fetch: wrapped, calls };
}

/**
 * A real HTTP proxy in front of the service. While `failNext > 0` (or `failAlways`) it answers
 * 503 problem+json with the given Retry-After instead of forwarding.
 */
export async function startFlakyProxy(target: string) {
  const state = { failNext: 0, failAlways: false, retryAfter: '1' as string | null, seen: 0, failed: 0 };
  const server = http.createServer((req, res) => {
    state.seen++;
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (state.failAlways || state.failNext > 0) {
        state.failNext = Math.max(0, state.failNext - 1);
        state.failed++;
        res.writeHead(503, { 'content-type': 'application/problem+json', ...(state.retryAfter !== null ? { 'retry-after': state.retryAfter } : {}) });
        res.end(
          JSON.stringify({
            type: 'https://keystrata.dev/problems/database_unavailable',
            title: 'Service Unavailable',
            status: 503,
            detail: 'The database is unavailable',
            code: 'database_unavailable',
            requestId: `proxy-${state.seen}`,
          }),
        );
        return;
      }
      const headers: Record<string, string> = {};
      for (const [name, value] of Object.entries(req.headers)) if (typeof value === 'string' && name !== 'host' && name !== 'content-length') headers[name] = value;
      fetch(new URL(req.url ?? '/', target), { method: req.method ?? 'GET', headers, ...(chunks.length ? { body: Buffer.concat(chunks) } : {}) })
        .then(async (upstream) => {
          const body = Buffer.from(await upstream.arrayBuffer());
          res.writeHead(upstream.status, Object.fromEntries([...upstream.headers].filter(([n]) => n !== 'content-length' && n !== 'transfer-encoding')));
          res.end(body);
        })
        .catch(() => {
          res.writeHead(502).end();
        });
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, state, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

export async function setFieldState(fleet: Fleet, deviceId: string, field: string, version: number, state: VersionState, changedAt = new Date(), until: Date | null = null) {
  await fleet.t.database.db
    .updateTable('field_versions')
    .set({ state, state_changed_at: changedAt, state_until: until })
    .where('device_id', '=', deviceId)
    .where('field', '=', field)
    .where('version', '=', version)
    .executeTakeFirstOrThrow();
}

export async function setDeviceState(fleet: Fleet, deviceId: string, version: number, state: VersionState) {
  await fleet.t.database.db
    .updateTable('device_versions')
    .set({ state, state_changed_at: new Date() })
    .where('device_id', '=', deviceId)
    .where('version', '=', version)
    .executeTakeFirstOrThrow();
}

/**
 * A new field key version, wrapped under device DEK v1 exactly as the service wraps (the
 * rotation service is another issue's). Returns the raw key so a device can use it.
 */
export async function addFieldVersion(fleet: Fleet, deviceKeyV1: Buffer, deviceId: string, field: string, version: number, state: VersionState): Promise<Buffer> {
  const key = crypto.randomBytes(32);
  await fleet.t.database.db
    .insertInto('field_versions')
    .values({
      device_id: deviceId,
      field,
      version,
      state,
      wrapped_key: wrapKey(deviceKeyV1, key, fieldBinding(deviceId, field, version, 1)),
      parent_version: 1,
      created_at: new Date(),
      state_changed_at: new Date(),
      state_until: null,
    })
    .execute();
  return key;
}

export async function versionStates(fleet: Fleet, deviceId: string, field: string): Promise<Array<{ version: number; state: string }>> {
  const rows = await sql<{ version: number; state: string }>`select version, state from field_versions where device_id = ${deviceId} and field = ${field} order by version`.execute(fleet.t.database.db);
  return rows.rows;
}
