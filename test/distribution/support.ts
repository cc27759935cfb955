/**
 * Helpers of the distribution tests: a keystrata app wired to a test broker (or not), a
 * group of enrolled devices, keys unwrapped independently of the service, polling.
 */
import crypto from 'node:crypto';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { expect } from 'vitest';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import { loadConfig } from '../../src/config.js';
import { createDistribution, type DistributionService } from '../../src/distribution/distribution.service.js';
import { distributionDb } from '../../src/distribution/distribution.tables.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call } from '../support/flow.js';

/** Settings that make a test publisher quick (polling, reconnects, retries). */
export function mqttEnv(url: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    MQTT_URL: url,
    OUTBOX_POLL_INTERVAL_MS: '50',
    OUTBOX_RETRY_BASE_MS: '50',
    OUTBOX_RETRY_MAX_MS: '500',
    MQTT_RECONNECT_MIN_MS: '100',
    MQTT_RECONNECT_MAX_MS: '400',
    ...extra,
  };
}

export interface Env {
  t: TestApp;
  admin: string;
  close(): Promise<void>;
}

export async function createEnv(options: { env?: Record<string, string>; groupId?: string } = {}): Promise<Env> {
  const t = await createTestApp({ manualClock: true, ...(options.env ? { env: options.env } : {}) });
  const admin = await t.token('keystrata:admin', { sub: 'alice' });
  const groupId = options.groupId ?? 'pumps';
  const created = await call(t.app, admin, 'POST', '/v1/groups', { id: groupId, deviceType: 'infusion-pump', region: 'eu-west' });
  expect(created.status, created.raw).toBe(201);
  return { t, admin, close: () => t.close() };
}

export async function enrol(e: Env, ids: string[], fields: string[] = [], groupId = 'pumps'): Promise<void> {
  const r = await call(e.t.app, e.admin, 'POST', `/v1/groups/${groupId}/devices/bulk`, { ids });
  expect(r.status, r.raw).toBe(201);
  for (const id of ids) {
    for (const field of fields) {
      const f = await call(e.t.app, e.admin, 'POST', `/v1/devices/${id}/fields`, { field });
      expect(f.status, f.raw).toBe(201);
    }
  }
}

export async function rotate(e: Env, deviceId: string, field?: string, body: Record<string, unknown> = {}): Promise<void> {
  const url = field === undefined ? `/v1/devices/${deviceId}/rotate` : `/v1/devices/${deviceId}/fields/${field}/rotate`;
  const r = await call(e.t.app, e.admin, 'POST', url, body);
  expect(r.status, r.raw).toBe(200);
}

/** The stored device DEK, unwrapped straight from the rows (not through the service). */
export async function storedDeviceKey(t: TestApp, deviceId: string, version: number): Promise<Buffer> {
  const db = t.database.db;
  const device = await db.selectFrom('devices').select('group_id').where('id', '=', deviceId).executeTakeFirstOrThrow();
  const row = await db.selectFrom('device_versions').selectAll().where('device_id', '=', deviceId).where('version', '=', version).executeTakeFirstOrThrow();
  const group = await db.selectFrom('group_versions').selectAll().where('group_id', '=', device.group_id).where('version', '=', row.parent_version).executeTakeFirstOrThrow();
  const groupKey = await t.kek.unwrap(group.wrapped_key as string, groupBinding(device.group_id, group.version, t.kek.keyName));
  return unwrapKey(groupKey, row.wrapped_key as Buffer, deviceBinding(deviceId, version, device.group_id, group.version));
}

export async function storedFieldKey(t: TestApp, deviceId: string, field: string, version: number): Promise<Buffer> {
  const row = await t.database.db
    .selectFrom('field_versions')
    .selectAll()
    .where('device_id', '=', deviceId)
    .where('field', '=', field)
    .where('version', '=', version)
    .executeTakeFirstOrThrow();
  const deviceKey = await storedDeviceKey(t, deviceId, row.parent_version);
  return unwrapKey(deviceKey, row.wrapped_key as Buffer, fieldBinding(deviceId, field, version, row.parent_version));
}

export async function outboxRows(t: TestApp, deviceId?: string) {
  let q = distributionDb(t.database.db).selectFrom('key_outbox').selectAll().orderBy('id');
  if (deviceId !== undefined) q = q.where('device_id', '=', deviceId);
  return (await q.execute()).map((r) => ({ ...r, id: Number(r.id) }));
}

export async function ackRows(t: TestApp) {
  return distributionDb(t.database.db).selectFrom('key_acks').selectAll().orderBy('device_id').orderBy('kind').orderBy('field').orderBy('version').execute();
}

export async function waitFor<T>(what: string, probe: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      last = error;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
}

/** A second (third…) publisher on the app's database, as another replica would run it. */
export function extraPublisher(t: TestApp, env: Record<string, string>): DistributionService {
  const config = loadConfig({ KEYSTRATA_DATA_DIR: '/nonexistent', ...env });
  const material = createKeyMaterial({ kek: t.kek, cache: createKeyCache({ ttlSeconds: 3600, maxEntries: 1000 }) });
  return createDistribution({
    db: t.database.db,
    material,
    audit: t.audit,
    clock: t.clock,
    logger: pino({ level: 'silent' }),
    registry: new Registry(),
    mqtt: config.mqtt,
  });
}

export const randomKey = (): Buffer => crypto.randomBytes(32);
