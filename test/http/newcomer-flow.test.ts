/**
 * The newcomer flow of issue 2, through the HTTP API: create a group, enrol 10,000 devices in
 * one call, create a field key, register a delivery key, fetch device and field keys as JWE,
 * decrypt them and check they are the keys stored (unwrapped independently, straight from the
 * database rows, in this test).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unwrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';

describe('the newcomer flow', () => {
  let t: TestApp;
  let admin: string;
  beforeAll(async () => {
    t = await createTestApp();
    admin = await t.token('keystrata:admin', { sub: 'alice' });
  });
  afterAll(async () => t.close());

  /** The stored key, unwrapped here without the service's code paths: KEK → group → device (→ field). */
  async function storedDeviceKey(deviceId: string, version: number): Promise<Buffer> {
    const device = await t.database.db.selectFrom('devices').select('group_id').where('id', '=', deviceId).executeTakeFirstOrThrow();
    const row = await t.database.db.selectFrom('device_versions').selectAll().where('device_id', '=', deviceId).where('version', '=', version).executeTakeFirstOrThrow();
    const group = await t.database.db.selectFrom('group_versions').selectAll().where('group_id', '=', device.group_id).where('version', '=', row.parent_version).executeTakeFirstOrThrow();
    const groupKey = await t.kek.unwrap(group.wrapped_key as string, groupBinding(device.group_id, group.version, t.kek.keyName));
    return unwrapKey(groupKey, row.wrapped_key as Buffer, deviceBinding(deviceId, version, device.group_id, group.version));
  }

  it('when an admin walks the whole flow, then the backend decrypts the very keys that are stored', async () => {
    const created = await call(t.app, admin, 'POST', '/v1/groups', { id: 'icu-monitors', deviceType: 'bedside-monitor', region: 'eu-west' });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ id: 'icu-monitors', versions: [{ version: 1, state: 'primary', parentVersion: 1 }] });

    const ids = Array.from({ length: 10_000 }, (_, i) => `monitor-${String(i).padStart(5, '0')}`);
    const bulk = await call(t.app, admin, 'POST', '/v1/groups/icu-monitors/devices/bulk', { ids });
    expect(bulk.status).toBe(201);
    expect(bulk.body).toEqual({ groupId: 'icu-monitors', enrolled: 10_000, groupVersion: 1 });
    const count = await t.database.db.selectFrom('device_versions').select((eb) => eb.fn.countAll<number>().as('n')).where('state', '=', 'primary').executeTakeFirstOrThrow();
    expect(Number(count.n)).toBe(10_000);

    const field = await call(t.app, admin, 'POST', '/v1/devices/monitor-00042/fields', { field: 'patient_id' });
    expect(field.status).toBe(201);
    expect(field.body).toMatchObject({ field: 'patient_id', versions: [{ version: 1, state: 'primary', parentVersion: 1 }] });

    const device = await call(t.app, admin, 'GET', '/v1/devices/monitor-00042');
    expect(device.status).toBe(200);
    expect(device.body).toMatchObject({ id: 'monitor-00042', groupId: 'icu-monitors', versions: [{ version: 1, state: 'primary' }], fields: [{ field: 'patient_id' }] });

    const backend = await newDeliveryKeyPair('X25519');
    const registered = await call(t.app, admin, 'PUT', '/v1/clients/ingest-pipeline/delivery-key', { jwk: backend.publicJwk });
    expect(registered.status).toBe(200);
    expect(registered.body).toMatchObject({ clientId: 'ingest-pipeline', kid: expect.any(String) });

    const reader = await t.token('keystrata:keys:read', { sub: 'ingest-pipeline', groups: ['icu-monitors'] });

    const deviceKeys = await call(t.app, reader, 'GET', '/v1/devices/monitor-00042/keys');
    expect(deviceKeys.status).toBe(200);
    expect(Object.keys(deviceKeys.body)).toEqual(['jwe']);
    const [deviceJwk, ...rest] = await decryptKeySet(deviceKeys.body.jwe as string, backend.privateKey);
    expect(rest).toEqual([]);
    expect(deviceJwk).toMatchObject({ kty: 'oct', alg: 'A256GCM', kid: 'monitor-00042:v1', state: 'primary', version: 1 });
    const deliveredDeviceKey = Buffer.from(deviceJwk!.k, 'base64url');
    expect(deliveredDeviceKey.length).toBe(32);
    expect(deliveredDeviceKey).toEqual(await storedDeviceKey('monitor-00042', 1));

    const fieldKeys = await call(t.app, reader, 'GET', '/v1/devices/monitor-00042/fields/patient_id/keys?version=1');
    expect(fieldKeys.status).toBe(200);
    const [fieldJwk] = await decryptKeySet(fieldKeys.body.jwe as string, backend.privateKey);
    expect(fieldJwk).toMatchObject({ kty: 'oct', kid: 'monitor-00042/patient_id:v1', state: 'primary', field: 'patient_id' });
    const fieldRow = await t.database.db.selectFrom('field_versions').selectAll().where('device_id', '=', 'monitor-00042').executeTakeFirstOrThrow();
    const storedFieldKey = unwrapKey(await storedDeviceKey('monitor-00042', 1), fieldRow.wrapped_key as Buffer, fieldBinding('monitor-00042', 'patient_id', 1, 1));
    expect(Buffer.from(fieldJwk!.k, 'base64url')).toEqual(storedFieldKey);

    // bulk: 1,000 items in one request, answered as ONE JWE
    const items = ids.slice(0, 999).map((deviceId) => ({ deviceId }));
    items.push({ deviceId: 'monitor-00042', field: 'patient_id' } as { deviceId: string });
    const many = await call(t.app, reader, 'POST', '/v1/keys/fetch', { items });
    expect(many.status).toBe(200);
    expect(many.body.missing).toEqual([]);
    const set = await decryptKeySet(many.body.jwe as string, backend.privateKey);
    expect(set).toHaveLength(1000);
    expect(set.filter((k) => k.field === 'patient_id')).toHaveLength(1);
    for (const sample of [set[0]!, set[500]!, set[998]!]) {
      expect(Buffer.from(sample.k, 'base64url')).toEqual(await storedDeviceKey(sample.deviceId, 1));
    }
  });

  it('when a bulk fetch names unknown devices and versions, then they are listed as missing and the rest delivered', async () => {
    const backend = await newDeliveryKeyPair('P-256');
    await call(t.app, admin, 'PUT', '/v1/clients/analytics/delivery-key', { jwk: backend.publicJwk });
    const reader = await t.token('keystrata:keys:read', { sub: 'analytics', groups: ['icu-monitors'] });
    const result = await call(t.app, reader, 'POST', '/v1/keys/fetch', {
      items: [{ deviceId: 'monitor-00001', version: 1 }, { deviceId: 'no-such-device' }, { deviceId: 'monitor-00002', version: 7 }, { deviceId: 'monitor-00003', field: 'no_such_field' }],
    });
    expect(result.status).toBe(200);
    expect(result.body.missing).toEqual([
      { deviceId: 'no-such-device', reason: 'not_found' },
      { deviceId: 'monitor-00002', version: 7, reason: 'not_found' },
      { deviceId: 'monitor-00003', field: 'no_such_field', reason: 'not_found' },
    ]);
    const set = await decryptKeySet(result.body.jwe as string, backend.privateKey);
    expect(set.map((k) => k.kid)).toEqual(['monitor-00001:v1']);
  });

  it('when the KEK is read, then its name, provider and versions are shown and no material', async () => {
    const kek = await call(t.app, admin, 'GET', '/v1/kek');
    expect(kek.status).toBe(200);
    expect(kek.body).toMatchObject({ name: 'keystrata-kek', provider: 'local', latestVersion: 1, minDecryptionVersion: 1, derived: true });
  });

  it('when groups are listed page by page, then the cursor walks them all', async () => {
    for (const id of ['g-a', 'g-b', 'g-c']) await call(t.app, admin, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'us' });
    const first = await call(t.app, admin, 'GET', '/v1/groups?limit=2');
    expect((first.body.items as Array<{ id: string }>).map((g) => g.id)).toEqual(['g-a', 'g-b']);
    const second = await call(t.app, admin, 'GET', `/v1/groups?limit=2&cursor=${first.body.nextCursor as string}`);
    expect((second.body.items as Array<{ id: string }>).map((g) => g.id)).toEqual(['g-c', 'icu-monitors']);
  });
});
