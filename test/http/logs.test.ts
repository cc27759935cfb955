/**
 * Plaintext key material, tokens, wrapped blobs and JWEs never reach a log line. The whole
 * newcomer flow runs at debug level with every line captured; then every secret the test saw
 * (in every encoding it could appear in) is searched for.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';

describe('logs', () => {
  let t: TestApp;
  beforeAll(async () => {
    t = await createTestApp();
  });
  afterAll(async () => t.close());

  it('when the whole flow runs (including failures), then no key, token, wrapped blob or JWE appears in the logs', async () => {
    const admin = await t.token('keystrata:admin');
    const secrets: string[] = [admin];
    await call(t.app, admin, 'POST', '/v1/groups', { id: 'g1', deviceType: 'pump', region: 'eu' });
    await call(t.app, admin, 'POST', '/v1/groups/g1/devices/bulk', { ids: ['d1', 'd2', 'd3'] });
    await call(t.app, admin, 'POST', '/v1/devices/d1/fields', { field: 'patient_id' });
    const backend = await newDeliveryKeyPair();
    await call(t.app, admin, 'PUT', '/v1/clients/backend/delivery-key', { jwk: backend.publicJwk });
    // a private JWK sent by mistake must not be logged either
    const leaked = await newDeliveryKeyPair();
    const { exportJWK } = await import('jose');
    const privateJwk = await exportJWK(leaked.privateKey);
    secrets.push(privateJwk.d as string);
    await call(t.app, admin, 'PUT', '/v1/clients/backend-2/delivery-key', { jwk: privateJwk });

    const reader = await t.token('keystrata:keys:read', { sub: 'backend', groups: ['g1'] });
    secrets.push(reader);
    for (const url of ['/v1/devices/d1/keys', '/v1/devices/d1/fields/patient_id/keys', '/v1/devices/d2/keys?version=1']) {
      const response = await call(t.app, reader, 'GET', url);
      expect(response.status).toBe(200);
      const jwe = response.body.jwe as string;
      secrets.push(jwe);
      for (const k of await decryptKeySet(jwe, backend.privateKey)) {
        const raw = Buffer.from(k.k, 'base64url');
        secrets.push(k.k, raw.toString('base64'), raw.toString('hex'));
      }
    }
    const bulk = await call(t.app, reader, 'POST', '/v1/keys/fetch', { items: [{ deviceId: 'd3' }] });
    secrets.push(bulk.body.jwe as string);
    // failures: bad token, wrong scope, unknown device
    await call(t.app, `${reader}x`, 'GET', '/v1/devices/d1/keys');
    await call(t.app, reader, 'POST', '/v1/groups', { id: 'g2', deviceType: 'pump', region: 'eu' });
    await call(t.app, reader, 'GET', '/v1/devices/nope/keys');

    for (const row of await t.database.db.selectFrom('device_versions').select('wrapped_key').execute()) {
      secrets.push((row.wrapped_key as Buffer).toString('base64'), (row.wrapped_key as Buffer).toString('hex'));
    }
    for (const row of await t.database.db.selectFrom('group_versions').select('wrapped_key').execute()) secrets.push(row.wrapped_key as string);

    const logText = t.logs.join('\n');
    expect(t.logs.filter((l) => l.includes('"request completed"')).length).toBeGreaterThan(10); // the flow really was logged
    expect(logText).toContain('"reqId"');
    for (const secret of secrets) {
      expect(secret.length).toBeGreaterThan(16);
      expect(logText.includes(secret), `a secret of length ${secret.length} leaked into the logs`).toBe(false);
    }
    // nor any JWE or JWT-shaped string at all
    expect(logText).not.toMatch(/eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*\./);
  });
});
