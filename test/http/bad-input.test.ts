/** Bad input always gets a clear 4xx problem+json, and nothing is stored. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exportJWK, generateKeyPair } from 'jose';
import { sql } from 'kysely';
import { BULK_BODY_LIMIT_BYTES } from '../../src/keys/key.routes.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, expectProblem } from '../support/flow.js';

describe('bad input', () => {
  let t: TestApp;
  let admin: string;
  beforeAll(async () => {
    t = await createTestApp();
    admin = await t.token('keystrata:admin');
    expect((await call(t.app, admin, 'POST', '/v1/groups', { id: 'g1', deviceType: 'pump', region: 'eu' })).status).toBe(201);
    expect((await call(t.app, admin, 'POST', '/v1/groups/g1/devices', { id: 'existing' })).status).toBe(201);
  });
  afterAll(async () => t.close());

  async function counts(): Promise<Record<string, number>> {
    const tables = ['key_groups', 'group_versions', 'devices', 'device_versions', 'field_keys', 'field_versions', 'clients'];
    const out: Record<string, number> = {};
    for (const table of tables) {
      const { rows } = await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)}`.execute(t.database.db);
      out[table] = rows[0]!.n;
    }
    return out;
  }

  it('when ids are malformed, properties unknown or required ones missing, then 400 naming the field, and nothing is stored', async () => {
    const before = await counts();
    const cases: Array<[string, string, unknown, string]> = [
      ['POST', '/v1/groups', { id: 'bad id with spaces', deviceType: 'pump', region: 'eu' }, 'body.id'],
      ['POST', '/v1/groups', { id: 'x'.repeat(129), deviceType: 'pump', region: 'eu' }, 'body.id'],
      ['POST', '/v1/groups', { id: 'ok', deviceType: 'pump', region: 'eu', admin: true }, 'body.admin'],
      ['POST', '/v1/groups', { id: 'ok', deviceType: 'pump' }, 'body.region'],
      ['POST', '/v1/groups', { id: '../../etc/passwd', deviceType: 'pump', region: 'eu' }, 'body.id'],
      ['POST', '/v1/groups/g1/devices', { id: 'dev\u202Eevil' }, 'body.id'],
      ['POST', '/v1/groups/g1/devices', { id: 42 }, 'body.id'],
      ['POST', '/v1/devices/existing/fields', { field: 'Patient-ID' }, 'body.field'],
      ['POST', '/v1/devices/existing/fields', { field: 'patient_id', extra: 1 }, 'body.extra'],
      ['GET', '/v1/groups?limit=1001', undefined, 'querystring.limit'],
      ['GET', '/v1/devices/existing/keys?version=-1', undefined, 'querystring.version'],
    ];
    for (const [method, url, payload, field] of cases) {
      const response = await call(t.app, admin, method as 'POST', url, payload);
      expectProblem(response, 400, 'validation_failed');
      expect(response.body.field, `${method} ${url}`).toBe(field);
    }
    expectProblem(await call(t.app, admin, 'GET', '/v1/devices/bad%20id'), 400, 'validation_failed');
    expect(await counts()).toEqual(before);
  });

  it('when a bulk enrolment has 10,001 ids, duplicates, or an id already enrolled, then 4xx and no device is stored', async () => {
    const before = await counts();
    const tooMany = Array.from({ length: 10_001 }, (_, i) => `d-${i}`);
    expectProblem(await call(t.app, admin, 'POST', '/v1/groups/g1/devices/bulk', { ids: tooMany }), 400, 'validation_failed');

    const withDuplicates = await call(t.app, admin, 'POST', '/v1/groups/g1/devices/bulk', { ids: ['n-1', 'n-2', 'n-1'] });
    expectProblem(withDuplicates, 400, 'bad_request');
    expect(withDuplicates.body.detail).toContain('n-1');

    const withExisting = await call(t.app, admin, 'POST', '/v1/groups/g1/devices/bulk', { ids: ['n-3', 'existing'] });
    expectProblem(withExisting, 409, 'device_exists');
    expect(withExisting.body.detail).toContain('existing');

    expectProblem(await call(t.app, admin, 'POST', '/v1/groups/g1/devices/bulk', { ids: [] }), 400);
    expectProblem(await call(t.app, admin, 'POST', '/v1/groups/no-such-group/devices/bulk', { ids: ['n-4'] }), 404);
    expect(await counts()).toEqual(before);
  });

  it('when a delivery key is not a JWK, is private, symmetric or for signing, then 400 and no client is stored', async () => {
    const before = await counts();
    const { privateKey } = await generateKeyPair('ECDH-ES+A256KW', { crv: 'P-256', extractable: true });
    const privateJwk = await exportJWK(privateKey);
    const { publicKey: edKey } = await generateKeyPair('EdDSA', { extractable: true });
    const bad: unknown[] = [
      { jwk: 'not a jwk' },
      { jwk: privateJwk },
      { jwk: { kty: 'oct', k: 'c2VjcmV0' } },
      { jwk: await exportJWK(edKey) },
      { jwk: { kty: 'EC', crv: 'P-256', x: privateJwk.x } },
      { jwk: { ...privateJwk, d: undefined, use: 'sig' } },
      { key: privateJwk },
    ];
    for (const body of bad) {
      const response = await call(t.app, admin, 'PUT', '/v1/clients/backend-1/delivery-key', JSON.parse(JSON.stringify(body)));
      expectProblem(response, 400);
      // the private key's secret member never comes back in the error
      expect(response.raw).not.toContain(privateJwk.d as string);
    }
    expect(await counts()).toEqual(before);
  });

  it('when the body is not JSON, too large, or of another content type, then 4xx problem+json', async () => {
    const notJson = await t.app.inject({ method: 'POST', url: '/v1/groups', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, payload: '{"id": ' });
    expect(notJson.statusCode).toBe(400);
    expect(notJson.headers['content-type']).toMatch(/problem\+json/);
    const wrongType = await t.app.inject({ method: 'POST', url: '/v1/groups', headers: { authorization: `Bearer ${admin}`, 'content-type': 'text/plain' }, payload: 'hello' });
    expect(wrongType.statusCode).toBe(415);
    const huge = await t.app.inject({
      method: 'POST',
      url: '/v1/groups/g1/devices/bulk',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' },
      payload: JSON.stringify({ ids: ['x'.repeat(BULK_BODY_LIMIT_BYTES)] }),
    });
    expect(huge.statusCode).toBe(413);
    expect(huge.headers['content-type']).toMatch(/problem\+json/);
  });

  it('when a route does not exist, then 404 problem+json', async () => {
    expectProblem(await call(t.app, admin, 'GET', '/v1/nothing-here'), 404, 'route_not_found');
  });

  it('when a group or field key is created twice, then 409 and the first is unchanged', async () => {
    expectProblem(await call(t.app, admin, 'POST', '/v1/groups', { id: 'g1', deviceType: 'other', region: 'us' }), 409, 'group_exists');
    expect((await call(t.app, admin, 'GET', '/v1/groups/g1')).body).toMatchObject({ deviceType: 'pump', region: 'eu' });
    expect((await call(t.app, admin, 'POST', '/v1/devices/existing/fields', { field: 'location' })).status).toBe(201);
    expectProblem(await call(t.app, admin, 'POST', '/v1/devices/existing/fields', { field: 'location' }), 409, 'field_key_exists');
  });
});
