/**
 * The backend client against a real keystrata served on a loopback port (real HTTP: status
 * codes, headers, problem+json, the delivery JWE), with devices played by the device
 * reference. Requests are counted by wrapping fetch; 503 storms come from a real HTTP proxy.
 */
import { inspect } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createManualClock } from '../../src/clock.js';
import {
  EnvelopeAuthenticationError,
  EnvelopeContextError,
  FieldDecryptionError,
  KeyStateError,
  KeyUnavailableError,
  KeystrataClientError,
  MessageFormatError,
  createDeviceEncryptor,
  createKeystrataClient,
  deviceFieldKeyFromJwk,
  type KeystrataClientOptions,
} from '../../src/client/index.js';
import { newDeliveryKeyPair } from '../support/flow.js';
import {
  addFieldVersion,
  countingFetch,
  deviceKeys,
  setDeviceState,
  setFieldState,
  startFlakyProxy,
  startFleet,
  type Fleet,
} from './support.js';

const DEVICES = Array.from({ length: 30 }, (_, i) => `dev-${String(i).padStart(3, '0')}`);
const BULK_DEVICES = Array.from({ length: 1200 }, (_, i) => `bulk-${String(i).padStart(4, '0')}`);
const FIELDS: Record<string, string[]> = Object.fromEntries(DEVICES.map((d, i) => [d, i < 5 ? ['patient_id', 'medical_record'] : ['patient_id']]));

let fleet: Fleet;
beforeAll(async () => {
  fleet = await startFleet({ devices: [...DEVICES, ...BULK_DEVICES], fields: FIELDS });
});
afterAll(async () => fleet?.close());

function client(overrides: Partial<KeystrataClientOptions> = {}) {
  const counter = countingFetch(overrides.fetch);
  const keystrata = createKeystrataClient({
    baseUrl: fleet.baseUrl,
    token: fleet.reader,
    deliveryPrivateKey: fleet.backend.privateKey,
    ...overrides,
    fetch: counter.fetch,
  });
  return { keystrata, calls: counter.calls };
}

async function device(deviceId: string, fields: string[]) {
  const keys = [];
  for (const field of fields) keys.push(...(await deviceKeys(fleet, deviceId, field)).map((jwk) => deviceFieldKeyFromJwk(jwk)));
  return createDeviceEncryptor({ deviceId, keys });
}

const message = (timestamp: number, extra: Record<string, unknown> = {}) => ({
  timestamp,
  device_type: 'bedside-monitor',
  temperature: 36.6,
  heart_rate: 72,
  patient_id: 'P-12345',
  ...extra,
});

describe('key fetch and cache', () => {
  it('when N unknown field keys are prefetched, then ONE bulk request fetches them all, and none once they are cached', async () => {
    const { keystrata, calls } = client();
    const items = DEVICES.slice(0, 20).map((deviceId) => ({ deviceId, field: 'patient_id', version: 1 }));
    const first = await keystrata.prefetch(items);
    expect(first).toEqual({ cached: 0, fetched: 20, missing: [] });
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ method: 'POST', url: `${fleet.baseUrl}/v1/keys/fetch` });
    expect(calls[0]!.body!.items).toHaveLength(20);

    const second = await keystrata.prefetch(items);
    expect(second).toEqual({ cached: 20, fetched: 0, missing: [] });
    const key = await keystrata.getFieldKey('dev-007', 'patient_id', 1);
    expect(key).toMatchObject({ kid: 'dev-007/patient_id:v1', deviceId: 'dev-007', field: 'patient_id', version: 1, state: 'primary' });
    expect(calls).toHaveLength(1);

    // a mix: cached ones are not asked again, the unknown ones go in one request
    const mixed = await keystrata.prefetch([...items.slice(0, 5), ...DEVICES.slice(20, 25).map((deviceId) => ({ deviceId, field: 'patient_id', version: 1 }))]);
    expect(mixed).toEqual({ cached: 5, fetched: 5, missing: [] });
    expect(calls).toHaveLength(2);
    expect(calls[1]!.body!.items!.map((i) => i.deviceId)).toEqual(DEVICES.slice(20, 25));
  });

  it('when more than 1,000 unknown keys are prefetched, then they go in requests of at most 1,000 items', async () => {
    const { keystrata, calls } = client();
    const result = await keystrata.prefetch(BULK_DEVICES.map((deviceId) => ({ deviceId, version: 1 })));
    expect(result).toEqual({ cached: 0, fetched: 1200, missing: [] });
    expect(calls.map((c) => c.body!.items!.length)).toEqual([1000, 200]);
    expect(keystrata.stats().cacheSize).toBe(1200);
  });

  it('when the delivered device key is compared with what the service delivers to another reader, then they are the same key', async () => {
    const { keystrata } = client();
    const deviceKey = await keystrata.getDeviceKey('dev-001', 1);
    expect(deviceKey).toMatchObject({ kid: 'dev-001:v1', deviceId: 'dev-001', version: 1, state: 'primary' });
    expect(deviceKey.field).toBeUndefined();
    const [jwk] = await deviceKeys(fleet, 'dev-001', 'patient_id');
    const fieldKey = await keystrata.getFieldKey('dev-001', 'patient_id', 1);
    expect(fieldKey.key.export().toString('base64url')).toBe(jwk!.k);
    expect(fieldKey.stateChangedAt).toEqual(expect.any(Number));
  });

  it('when the TTL passes (injected clock), then the next use refetches, and not before', async () => {
    const clock = createManualClock(new Date());
    const { keystrata, calls } = client({ clock, cacheTtlMs: 60_000 });
    await keystrata.getFieldKey('dev-002', 'patient_id', 1);
    clock.advance(59_999);
    await keystrata.getFieldKey('dev-002', 'patient_id', 1);
    expect(calls).toHaveLength(1);
    clock.advance(1);
    await keystrata.getFieldKey('dev-002', 'patient_id', 1);
    expect(calls).toHaveLength(2);
    await keystrata.getFieldKey('dev-002', 'patient_id', 1);
    expect(calls).toHaveLength(2);
  });

  it('when the cache is bounded, then the least recently used versions are evicted and refetched on demand', async () => {
    const { keystrata, calls } = client({ maxCacheEntries: 5 });
    await keystrata.prefetch(DEVICES.slice(0, 10).map((deviceId) => ({ deviceId, field: 'patient_id', version: 1 })));
    expect(keystrata.stats().cacheSize).toBe(5);
    await keystrata.getFieldKey('dev-009', 'patient_id', 1);
    expect(calls).toHaveLength(1);
    await keystrata.getFieldKey('dev-000', 'patient_id', 1);
    expect(calls).toHaveLength(2);
  });

  it('when several messages of one device are decrypted at once, then their keys are fetched by one request', async () => {
    const dev = await device('dev-010', ['patient_id']);
    const { keystrata, calls } = client();
    const now = Date.now();
    const messages = [0, 1, 2, 3].map((i) => dev.encryptMessage(message(now + i)));
    const clear = await Promise.all(messages.map((m) => keystrata.decryptFields('dev-010', m)));
    expect(clear.map((m) => m.patient_id)).toEqual(['P-12345', 'P-12345', 'P-12345', 'P-12345']);
    expect(calls).toHaveLength(1);
  });

  it('when keys are unknown to the service, then prefetch lists them as missing and a get refuses with KeyUnavailableError', async () => {
    const { keystrata, calls } = client();
    const result = await keystrata.prefetch([
      { deviceId: 'dev-003', field: 'patient_id', version: 1 },
      { deviceId: 'dev-003', field: 'patient_id', version: 9 },
      { deviceId: 'no-such-device', field: 'patient_id', version: 1 },
    ]);
    expect(result.missing).toEqual([
      { deviceId: 'dev-003', field: 'patient_id', version: 9, kid: 'dev-003/patient_id:v9', reason: 'not_found' },
      { deviceId: 'no-such-device', field: 'patient_id', version: 1, kid: 'no-such-device/patient_id:v1', reason: 'not_found' },
    ]);
    // remembered briefly: a device sending bogus versions does not cost a request per message
    const error = await keystrata.getFieldKey('dev-003', 'patient_id', 9).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyUnavailableError);
    expect(error).toMatchObject({ code: 'key_not_found', kid: 'dev-003/patient_id:v9', reason: 'not_found' });
    expect(calls).toHaveLength(1);
  });
});

describe('decryptFields', () => {
  it('when a device encrypts fields of a message, then decryptFields gives back the clear message with one request', async () => {
    const dev = await device('dev-004', ['patient_id', 'medical_record']);
    const clear = message(Date.now(), { medical_record: { dx: 'I10', allergies: ['penicillin'] }, location: { lat: 37.77, lon: -122.42 } });
    const sent = dev.encryptMessage(clear);
    expect(sent.patient_id).toMatch(/^ENC:v1:dev-004\/patient_id:v1:[A-Za-z0-9_-]+$/);
    expect(sent.medical_record).toMatch(/^ENC:v1:dev-004\/medical_record:v1:/);
    expect(sent.temperature).toBe(36.6);
    expect(JSON.stringify(sent)).not.toContain('P-12345');

    const { keystrata, calls } = client();
    const decrypted = await keystrata.decryptFields('dev-004', JSON.parse(JSON.stringify(sent)) as Record<string, unknown>);
    expect(decrypted).toEqual(clear);
    expect(Object.keys(decrypted)).toEqual(Object.keys(clear));
    expect(calls).toHaveLength(1);
    expect(calls[0]!.body!.items).toEqual([
      { deviceId: 'dev-004', field: 'patient_id', version: 1 },
      { deviceId: 'dev-004', field: 'medical_record', version: 1 },
    ]);
    // the next message of the same device costs nothing
    await keystrata.decryptFields('dev-004', dev.encryptMessage(message(Date.now())));
    expect(calls).toHaveLength(1);
  });

  it('when one value is decrypted with decryptValue, then the same rules apply', async () => {
    const dev = await device('dev-009', ['patient_id']);
    const now = Date.now();
    const sent = dev.encryptMessage(message(now));
    const { keystrata } = client();
    expect(await keystrata.decryptValue('dev-009', 'patient_id', sent.patient_id as string, now)).toBe('P-12345');
    await expect(keystrata.decryptValue('dev-009', 'patient_id', sent.patient_id as string, now + 1)).rejects.toMatchObject({ code: 'authentication_failed' });
    await expect(keystrata.decryptValue('dev-009', 'patient_id', 'P-12345', now)).rejects.toThrow(MessageFormatError);
  });

  it('when a fleet counts time in seconds (seed 000), then timestampUnit s works end to end', async () => {
    const keys = (await deviceKeys(fleet, 'dev-005', 'patient_id')).map((jwk) => deviceFieldKeyFromJwk(jwk));
    const dev = createDeviceEncryptor({ deviceId: 'dev-005', keys, timestampUnit: 's' });
    const sent = dev.encryptMessage(message(Math.floor(Date.now() / 1000)));
    const { keystrata } = client({ timestampUnit: 's' });
    expect((await keystrata.decryptFields('dev-005', sent)).patient_id).toBe('P-12345');
    const { keystrata: msClient } = client();
    // read as milliseconds, the same number lands in 1970 and is refused outright
    await expect(msClient.decryptFields('dev-005', sent)).rejects.toThrow(MessageFormatError);
  });

  it('when a value is moved to another device, then it is refused before any key is fetched', async () => {
    const a = await device('dev-006', ['patient_id']);
    const now = Date.now();
    const fromA = a.encryptMessage(message(now));
    const forged = { ...message(now), patient_id: fromA.patient_id };
    const { keystrata, calls } = client();
    const error = await keystrata.decryptFields('dev-007', forged).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(FieldDecryptionError);
    expect(error).toMatchObject({ field: 'patient_id', code: 'context_mismatch' });
    expect((error as Error).cause).toBeInstanceOf(EnvelopeContextError);
    expect(calls).toHaveLength(0);
  });

  it('when a value is moved to another field or another message, then it is refused', async () => {
    const dev = await device('dev-001', ['patient_id', 'medical_record']);
    const now = Date.now();
    const sent = dev.encryptMessage(message(now, { medical_record: 'r' }));
    const { keystrata } = client();
    const swapped = { ...sent, medical_record: sent.patient_id, patient_id: sent.medical_record };
    await expect(keystrata.decryptFields('dev-001', swapped)).rejects.toMatchObject({ code: 'context_mismatch' });
    const replayed = { ...sent, timestamp: now + 1 };
    const error = await keystrata.decryptFields('dev-001', replayed).catch((e: unknown) => e);
    expect(error).toMatchObject({ field: 'patient_id', code: 'authentication_failed' });
    expect((error as Error).cause).toBeInstanceOf(EnvelopeAuthenticationError);
  });

  it('when the message breaks the message rules, then MessageFormatError says which rule', async () => {
    const dev = await device('dev-008', ['patient_id']);
    const sent = dev.encryptMessage(message(Date.now()));
    const { keystrata, calls } = client();
    await expect(keystrata.decryptFields('dev-008', { ...sent, timestamp: new Date().toISOString() })).rejects.toThrow(/timestamp must be a non-negative integer/);
    await expect(keystrata.decryptFields('dev-008', { ...sent, timestamp: 1.5 })).rejects.toThrow(MessageFormatError);
    await expect(keystrata.decryptFields('dev-008', { patient_id: sent.patient_id })).rejects.toThrow(MessageFormatError);
    await expect(keystrata.decryptFields('dev-008', { ...sent, nested: { deep: sent.patient_id } })).rejects.toThrow(/only top-level fields/);
    await expect(keystrata.decryptFields('dev-008', { ...sent, patient_id: 'ENC:AES256:abc' })).rejects.toMatchObject({ code: 'unsupported_version' });
    await expect(keystrata.decryptFields('bad id!', sent)).rejects.toThrow(MessageFormatError);
    expect(calls).toHaveLength(0);
    // no envelope at all: a copy, untouched, no request
    expect(await keystrata.decryptFields('dev-008', { timestamp: Date.now(), temperature: 1 })).toEqual({ timestamp: expect.any(Number), temperature: 1 });
    expect(calls).toHaveLength(0);
  });
});

describe('version states', () => {
  it('when a field key version is disabled, then decryption under it is refused and getFieldKey too', async () => {
    const dev = await device('dev-011', ['patient_id']);
    const sent = dev.encryptMessage(message(Date.now()));
    await setFieldState(fleet, 'dev-011', 'patient_id', 1, 'disabled');
    const { keystrata } = client();
    const error = await keystrata.decryptFields('dev-011', sent).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(FieldDecryptionError);
    expect(error).toMatchObject({ field: 'patient_id', kid: 'dev-011/patient_id:v1', code: 'key_not_deliverable' });
    expect((error as Error).cause).toBeInstanceOf(KeyUnavailableError);
    expect((error as Error).message).toMatch(/disabled or scheduled for destruction/);
    await expect(keystrata.getFieldKey('dev-011', 'patient_id', 1)).rejects.toMatchObject({ reason: 'not_deliverable' });
  });

  it('when a device DEK version is disabled, then getDeviceKey refuses it', async () => {
    await setDeviceState(fleet, 'dev-012', 1, 'disabled');
    const { keystrata } = client();
    await expect(keystrata.getDeviceKey('dev-012', 1)).rejects.toThrow(KeyUnavailableError);
    await expect(keystrata.getDeviceKey('dev-012', 1)).rejects.toMatchObject({ code: 'key_not_deliverable' });
  });

  it('when a field key version is destroyed, then the refusal says destroyed', async () => {
    await fleet.t.database.db
      .updateTable('field_versions')
      .set({ state: 'destroyed', wrapped_key: null, state_changed_at: new Date() })
      .where('device_id', '=', 'dev-013')
      .where('field', '=', 'patient_id')
      .execute();
    const { keystrata } = client();
    await expect(keystrata.getFieldKey('dev-013', 'patient_id', 1)).rejects.toMatchObject({ code: 'key_destroyed', reason: 'destroyed' });
  });

  it('when a new version appears, then the client re-reads the whole key and refuses late messages under the now decrypt_only version', async () => {
    const deviceId = 'dev-014';
    const dev = await device(deviceId, ['patient_id']);
    const { keystrata, calls } = client();
    const t0 = Date.now();
    await keystrata.decryptFields(deviceId, dev.encryptMessage(message(t0))); // v1 cached as primary
    expect(calls).toHaveLength(1);

    // rotation (done here in the DB: the rotation service is another issue's)
    const deviceKey = (await keystrata.getDeviceKey(deviceId, 1)).key.export();
    const changedAt = new Date(t0 + 1000);
    await setFieldState(fleet, deviceId, 'patient_id', 1, 'decrypt_only', changedAt);
    const v2 = await addFieldVersion(fleet, deviceKey, deviceId, 'patient_id', 2, 'primary');
    const oldKeyDevice = createDeviceEncryptor({ deviceId, keys: [{ field: 'patient_id', version: 1, key: (await keystrata.getFieldKey(deviceId, 'patient_id', 1)).key }] });
    dev.setKey({ field: 'patient_id', version: 2, key: v2, state: 'primary' });
    const callsBefore = calls.length;

    const fresh = await keystrata.decryptFields(deviceId, dev.encryptMessage(message(t0 + 2000)));
    expect(fresh.patient_id).toBe('P-12345');
    expect(calls).toHaveLength(callsBefore + 1);
    expect(calls.at(-1)!.body!.items).toEqual([
      { deviceId, field: 'patient_id', version: 2 },
      { deviceId, field: 'patient_id', version: 'all' },
    ]);
    const v1 = await keystrata.getFieldKey(deviceId, 'patient_id', 1);
    expect(v1).toMatchObject({ state: 'decrypt_only', stateChangedAt: changedAt.getTime(), encryptionEnd: { at: changedAt.getTime(), source: 'server' } });

    // a message under v1 stamped before the change is still read; one stamped after is refused
    expect((await keystrata.decryptFields(deviceId, oldKeyDevice.encryptMessage(message(t0 + 500)))).patient_id).toBe('P-12345');
    expect((await keystrata.decryptFields(deviceId, oldKeyDevice.encryptMessage(message(changedAt.getTime())))).patient_id).toBe('P-12345');
    const late = await keystrata.decryptFields(deviceId, oldKeyDevice.encryptMessage(message(t0 + 1001))).catch((e: unknown) => e);
    expect(late).toBeInstanceOf(FieldDecryptionError);
    expect(late).toMatchObject({ code: 'key_decrypt_only', kid: `${deviceId}/patient_id:v1` });
    expect((late as Error).cause).toBeInstanceOf(KeyStateError);
    expect(calls).toHaveLength(callsBefore + 1);

    // a client that never saw v1 before learns the same from its first fetch
    const { keystrata: cold } = client();
    await expect(cold.decryptFields(deviceId, oldKeyDevice.encryptMessage(message(t0 + 5000)))).rejects.toMatchObject({ code: 'key_decrypt_only' });
  });

  it('when a cached version is disabled and the device moves to a new version, then the re-read drops the disabled one', async () => {
    const deviceId = 'dev-015';
    const { keystrata } = client();
    await keystrata.getFieldKey(deviceId, 'patient_id', 1);
    const deviceKey = (await keystrata.getDeviceKey(deviceId, 1)).key.export();
    await setFieldState(fleet, deviceId, 'patient_id', 1, 'disabled');
    await addFieldVersion(fleet, deviceKey, deviceId, 'patient_id', 2, 'primary');
    await keystrata.getFieldKey(deviceId, 'patient_id', 2);
    await expect(keystrata.getFieldKey(deviceId, 'patient_id', 1)).rejects.toMatchObject({ code: 'key_not_deliverable' });
  });

  it('when versions of a rotated key go stale, then the TTL refresh asks for the version a message names, not the whole key again', async () => {
    const deviceId = 'dev-021';
    const clock = createManualClock(new Date());
    const { keystrata, calls } = client({ clock, cacheTtlMs: 60_000 });
    const deviceKey = (await keystrata.getDeviceKey(deviceId, 1)).key.export();
    const v1Device = await device(deviceId, ['patient_id']);
    await setFieldState(fleet, deviceId, 'patient_id', 1, 'grace', new Date(), new Date(Date.now() + 86_400_000));
    const v2 = await addFieldVersion(fleet, deviceKey, deviceId, 'patient_id', 2, 'primary');
    const v2Device = createDeviceEncryptor({ deviceId, keys: [{ field: 'patient_id', version: 2, key: v2, state: 'primary' }] });
    const itemsOf = async (sent: Record<string, unknown>) => {
      const before = calls.length;
      expect((await keystrata.decryptFields(deviceId, sent)).patient_id).toBe('P-12345');
      return calls.slice(before).map((c) => c.body!.items);
    };

    expect(await itemsOf(v1Device.encryptMessage(message(Date.now())))).toEqual([[{ deviceId, field: 'patient_id', version: 1 }]]);
    // v2 is new for a key the client knows: the sign of a rotation, the whole key is re-read
    expect(await itemsOf(v2Device.encryptMessage(message(Date.now())))).toEqual([
      [
        { deviceId, field: 'patient_id', version: 2 },
        { deviceId, field: 'patient_id', version: 'all' },
      ],
    ]);
    // once the TTL has passed, each refresh fetches just the version named (a key kept for a
    // year of weekly rotations would otherwise cost ~52 versions per refresh, every TTL)
    clock.advance(60_000);
    expect(await itemsOf(v2Device.encryptMessage(message(Date.now())))).toEqual([[{ deviceId, field: 'patient_id', version: 2 }]]);
    expect(await itemsOf(v1Device.encryptMessage(message(Date.now())))).toEqual([[{ deviceId, field: 'patient_id', version: 1 }]]);
    expect(await itemsOf(v2Device.encryptMessage(message(Date.now())))).toEqual([]);
  });

  it('when a grace version is used after its grace ended, then the message is refused even before the service records decrypt_only', async () => {
    const deviceId = 'dev-016';
    const dev = await device(deviceId, ['patient_id']);
    const { keystrata } = client();
    const deviceKey = (await keystrata.getDeviceKey(deviceId, 1)).key.export();
    const graceEnd = new Date(Date.now() + 60_000);
    await setFieldState(fleet, deviceId, 'patient_id', 1, 'grace', new Date(), graceEnd);
    await addFieldVersion(fleet, deviceKey, deviceId, 'patient_id', 2, 'primary');
    expect((await keystrata.decryptFields(deviceId, dev.encryptMessage(message(graceEnd.getTime())))).patient_id).toBe('P-12345');
    await expect(keystrata.decryptFields(deviceId, dev.encryptMessage(message(graceEnd.getTime() + 1)))).rejects.toMatchObject({ code: 'key_decrypt_only' });
  });

  it('when a message uses a pending version, then the client re-reads it once and refuses it while it stays pending, and accepts it once primary', async () => {
    const deviceId = 'dev-017';
    const clock = createManualClock(new Date());
    const { keystrata, calls } = client({ clock, minRefreshIntervalMs: 5_000 });
    const deviceKey = (await keystrata.getDeviceKey(deviceId, 1)).key.export();
    const v2 = await addFieldVersion(fleet, deviceKey, deviceId, 'patient_id', 2, 'pending');
    const early = createDeviceEncryptor({ deviceId, keys: [{ field: 'patient_id', version: 2, key: v2 }] });
    const sent = early.encryptMessage(message(Date.now()));
    const before = calls.length;
    await expect(keystrata.decryptFields(deviceId, sent)).rejects.toMatchObject({ code: 'key_pending' });
    expect(calls.length - before).toBe(1); // just fetched: no forced re-read yet
    clock.advance(5_000);
    await expect(keystrata.decryptFields(deviceId, sent)).rejects.toMatchObject({ code: 'key_pending' });
    expect(calls.length - before).toBe(2);

    await setFieldState(fleet, deviceId, 'patient_id', 1, 'grace');
    await setFieldState(fleet, deviceId, 'patient_id', 2, 'primary');
    clock.advance(5_000);
    expect((await keystrata.decryptFields(deviceId, sent)).patient_id).toBe('P-12345');
    expect(calls.length - before).toBe(3);
    expect((await keystrata.getFieldKey(deviceId, 'patient_id', 1)).state).toBe('grace');
  });
});

describe('errors and retries', () => {
  it('when the service answers a short 503 storm with Retry-After, then the client waits as told and succeeds', async () => {
    const proxy = await startFlakyProxy(fleet.baseUrl);
    try {
      const slept: number[] = [];
      const { keystrata, calls } = client({ baseUrl: proxy.url, retry: { maxAttempts: 4, maxDelayMs: 5_000 }, sleep: async (ms) => void slept.push(ms) });
      proxy.state.failNext = 2;
      proxy.state.retryAfter = '2';
      const key = await keystrata.getFieldKey('dev-018', 'patient_id', 1);
      expect(key.state).toBe('primary');
      expect(slept).toEqual([2000, 2000]);
      expect(calls).toHaveLength(3);
      expect(proxy.state.failed).toBe(2);
    } finally {
      await proxy.close();
    }
  });

  it('when the 503 storm outlasts the attempts, then KeystrataClientError carries status, problem, attempts and Retry-After', async () => {
    const proxy = await startFlakyProxy(fleet.baseUrl);
    try {
      const slept: number[] = [];
      const { keystrata, calls } = client({ baseUrl: proxy.url, retry: { maxAttempts: 3, maxDelayMs: 5_000 }, sleep: async (ms) => void slept.push(ms) });
      proxy.state.failAlways = true;
      proxy.state.retryAfter = new Date(Date.now() + 3_000).toUTCString(); // an HTTP-date this time
      const error = await keystrata.getFieldKey('dev-018', 'patient_id', 1).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(KeystrataClientError);
      expect(error).toMatchObject({
        code: 'database_unavailable',
        status: 503,
        attempts: 3,
        requestId: 'proxy-3',
        problem: { status: 503, detail: 'The database is unavailable', code: 'database_unavailable' },
      });
      expect((error as KeystrataClientError).retryAfterMs).toBeGreaterThan(1000);
      expect(calls).toHaveLength(3);
      expect(slept).toHaveLength(2);
      for (const ms of slept) expect(ms).toBeGreaterThan(1000);
    } finally {
      await proxy.close();
    }
  });

  it('when Retry-After exceeds maxDelayMs, then the client does not retry early and surfaces the 503 at once', async () => {
    const proxy = await startFlakyProxy(fleet.baseUrl);
    try {
      const slept: number[] = [];
      const { keystrata, calls } = client({ baseUrl: proxy.url, retry: { maxAttempts: 5, maxDelayMs: 1_000 }, sleep: async (ms) => void slept.push(ms) });
      proxy.state.failAlways = true;
      proxy.state.retryAfter = '30';
      await expect(keystrata.getFieldKey('dev-018', 'patient_id', 1)).rejects.toMatchObject({ status: 503, attempts: 1, retryAfterMs: 30_000 });
      expect(calls).toHaveLength(1);
      expect(slept).toEqual([]);
    } finally {
      await proxy.close();
    }
  });

  it('when no Retry-After comes, then the backoff stays under maxDelayMs', async () => {
    const proxy = await startFlakyProxy(fleet.baseUrl);
    try {
      const slept: number[] = [];
      const { keystrata } = client({ baseUrl: proxy.url, retry: { maxAttempts: 6, maxDelayMs: 300, baseDelayMs: 100 }, sleep: async (ms) => void slept.push(ms) });
      proxy.state.failAlways = true;
      proxy.state.retryAfter = null;
      await expect(keystrata.getFieldKey('dev-018', 'patient_id', 1)).rejects.toMatchObject({ status: 503, attempts: 6 });
      expect(slept).toHaveLength(5);
      for (const ms of slept) expect(ms).toBeLessThanOrEqual(300);
    } finally {
      await proxy.close();
    }
  });

  it('when the client id has no delivery key, then the 403 problem is surfaced as KeystrataClientError without retries', async () => {
    const token = await fleet.t.token('keystrata:keys:read', { sub: 'unregistered', groups: ['wards'] });
    const { keystrata, calls } = client({ token });
    const error = await keystrata.getFieldKey('dev-019', 'patient_id', 1).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeystrataClientError);
    expect(error).toMatchObject({ status: 403, code: 'delivery_key_missing', problem: { status: 403, code: 'delivery_key_missing' }, attempts: 1 });
    expect((error as KeystrataClientError).requestId).toEqual(expect.any(String));
    expect(calls).toHaveLength(1);
  });

  it('when the token function hands out a token the service rejects, then the client asks it again once after the 401', async () => {
    // a stale token: same claims, signature no longer valid
    const expired = `${fleet.reader.slice(0, fleet.reader.lastIndexOf('.'))}.${Buffer.alloc(64).toString('base64url')}`;
    const tokens = [expired, fleet.reader];
    let asked = 0;
    const { keystrata, calls } = client({ token: async () => tokens[Math.min(asked++, 1)]! });
    expect((await keystrata.getFieldKey('dev-019', 'patient_id', 1)).state).toBe('primary');
    expect(asked).toBe(2);
    expect(calls).toHaveLength(2);

    const { keystrata: stuck } = client({ token: async () => expired });
    await expect(stuck.getFieldKey('dev-019', 'patient_id', 1)).rejects.toMatchObject({ status: 401 });
  });

  it('when the delivery private key is not the registered one, then the delivery cannot be opened and says so', async () => {
    const other = await newDeliveryKeyPair('X25519');
    const { keystrata } = client({ deliveryPrivateKey: other.privateKey });
    await expect(keystrata.getFieldKey('dev-019', 'patient_id', 1)).rejects.toMatchObject({ code: 'delivery_decrypt_failed' });
  });

  it('when the delivery private key is given as a JWK (P-256 here), then it works, and a public JWK is refused', async () => {
    const { exportJWK } = await import('jose');
    const pair = await newDeliveryKeyPair('P-256');
    const { call } = await import('../support/flow.js');
    await call(fleet.t.app, fleet.admin, 'PUT', '/v1/clients/analytics/delivery-key', { jwk: pair.publicJwk });
    const token = await fleet.t.token('keystrata:keys:read', { sub: 'analytics', groups: ['wards'] });
    const privateJwk = await exportJWK(pair.privateKey);
    const { keystrata } = client({ token, deliveryPrivateKey: privateJwk });
    expect((await keystrata.getFieldKey('dev-019', 'patient_id', 1)).state).toBe('primary');
    const { keystrata: wrong } = client({ token, deliveryPrivateKey: pair.publicJwk });
    await expect(wrong.getFieldKey('dev-019', 'patient_id', 1)).rejects.toMatchObject({ code: 'invalid_option' });
  });

  it('when the base URL is plain http to a remote host, then the client refuses to start unless allowed', () => {
    expect(() => createKeystrataClient({ baseUrl: 'http://keystrata.example', token: 't', deliveryPrivateKey: fleet.backend.privateKey })).toThrow(/https/);
    expect(() => createKeystrataClient({ baseUrl: 'http://keystrata.example', token: 't', deliveryPrivateKey: fleet.backend.privateKey, allowInsecureHttp: true })).not.toThrow();
  });

  it('when keys and errors are printed or serialised, then no key material appears', async () => {
    const { keystrata } = client();
    const key = await keystrata.getFieldKey('dev-020', 'patient_id', 1);
    const material = key.key.export().toString('base64url');
    const errors: unknown[] = [];
    const dev = await device('dev-020', ['patient_id']);
    const sent = dev.encryptMessage(message(Date.now()));
    errors.push(await keystrata.decryptFields('dev-020', { ...sent, timestamp: (sent.timestamp as number) + 1 }).catch((e: unknown) => e));
    await setFieldState(fleet, 'dev-020', 'patient_id', 1, 'decrypt_only', new Date(Date.now() - 60_000));
    keystrata.invalidate('dev-020', 'patient_id');
    errors.push(await keystrata.decryptFields('dev-020', sent).catch((e: unknown) => e));
    for (const text of [inspect(key, { depth: 5 }), JSON.stringify(key), ...errors.map((e) => inspect(e, { depth: 5 })), ...errors.map((e) => JSON.stringify(e))]) {
      expect(text).not.toContain(material);
      expect(text).not.toContain(Buffer.from(material, 'base64url').toString('hex'));
      expect(text).not.toContain('P-12345');
    }
    expect(errors.map((e) => (e as KeystrataClientError).code)).toEqual(['authentication_failed', 'key_decrypt_only']);
  });
});
