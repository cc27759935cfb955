import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { SignJWT, UnsecuredJWT, calculateJwkThumbprint, generateKeyPair, importJWK, type CryptoKey, type JWK } from 'jose';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, expectProblem, newDeliveryKeyPair } from '../support/flow.js';

describe('authentication and authorization', () => {
  let t: TestApp;
  let admin: string;
  beforeAll(async () => {
    t = await createTestApp();
    admin = await t.token('keystrata:admin');
    for (const id of ['group-a', 'group-b']) {
      expect((await call(t.app, admin, 'POST', '/v1/groups', { id, deviceType: 'pump', region: 'eu' })).status).toBe(201);
      expect((await call(t.app, admin, 'POST', `/v1/groups/${id}/devices`, { id: `${id}-dev` })).status).toBe(201);
    }
    const backend = await newDeliveryKeyPair();
    expect((await call(t.app, admin, 'PUT', '/v1/clients/reader-a/delivery-key', { jwk: backend.publicJwk })).status).toBe(200);
  });
  afterAll(async () => t.close());

  const claims = (overrides: Record<string, unknown> = {}) => ({ scope: 'keystrata:admin', keystrata_groups: [], ...overrides });

  /** The service's own development issuer key, so each bad token is wrong in exactly one way. */
  async function issuerKey(): Promise<{ key: CryptoKey; kid: string }> {
    const jwk = JSON.parse(fs.readFileSync(path.join(t.config.dataDir, 'issuer-key.json'), 'utf8')) as JWK;
    const { d: _private, ...publicJwk } = jwk;
    return { key: (await importJWK(jwk, 'EdDSA')) as CryptoKey, kid: await calculateJwkThumbprint(publicJwk) };
  }

  async function signed(options: { issuer?: string; audience?: string; exp?: number; key?: CryptoKey | Uint8Array; alg?: string } = {}): Promise<string> {
    const own = await issuerKey();
    const key = options.key ?? own.key;
    return new SignJWT(claims())
      .setProtectedHeader({ alg: options.alg ?? 'EdDSA', ...(options.key ? {} : { kid: own.kid }) })
      .setIssuer(options.issuer ?? t.config.auth.issuer)
      .setAudience(options.audience ?? t.config.auth.audience)
      .setSubject('mallory')
      .setIssuedAt()
      .setExpirationTime(options.exp ?? Math.floor(Date.now() / 1000) + 600)
      .sign(key);
  }

  it('when no token is sent, then 401 problem+json with WWW-Authenticate, and the refusal is audited', async () => {
    const response = await call(t.app, undefined, 'GET', '/v1/groups');
    expectProblem(response, 401, 'unauthorized');
    expect(response.headers['www-authenticate']).toMatch(/^Bearer/);
    const events = await t.audit.queryEvents({ action: 'auth.failed' }, undefined, 100);
    expect(events.items.some((e) => (e.details as { reason?: string }).reason === 'missing_token')).toBe(true);
  });

  it('when the token is expired, for another audience or issuer, unsigned (alg none), or signed by another key, then 401', async () => {
    const tolerance = t.config.auth.clockToleranceSeconds;
    expect((await call(t.app, await signed(), 'GET', '/v1/groups')).status).toBe(200); // the control: right in every way
    const bad = [
      await signed({ exp: Math.floor(Date.now() / 1000) - tolerance - 60 }),
      await signed({ audience: 'someone-else' }),
      await signed({ issuer: 'https://evil.example' }),
      new UnsecuredJWT(claims()).setIssuer(t.config.auth.issuer).setAudience(t.config.auth.audience).setSubject('mallory').setExpirationTime('10m').encode(),
      await signed({ key: (await generateKeyPair('EdDSA')).privateKey }), // a key the service has never seen
      await signed({ alg: 'HS256', key: new TextEncoder().encode('a-shared-secret-of-enough-length-32b') }),
      'not-a-jwt',
    ];
    for (const token of bad) expectProblem(await call(t.app, token, 'GET', '/v1/groups'), 401, 'unauthorized');
    const reasons = (await t.audit.queryEvents({ action: 'auth.failed' }, undefined, 100)).items.map((e) => (e.details as { reason: string }).reason);
    expect(reasons).toEqual(expect.arrayContaining(['expired', 'wrong_audience', 'wrong_issuer', 'alg_none', 'malformed_header']));
  });

  it('when a token lacks the scope, then 403 and the refusal is audited', async () => {
    const reader = await t.token('keystrata:keys:read', { sub: 'reader-a', groups: ['group-a'] });
    expectProblem(await call(t.app, reader, 'POST', '/v1/groups', { id: 'x', deviceType: 'pump', region: 'eu' }), 403, 'insufficient_scope');
    expectProblem(await call(t.app, await t.token('keystrata:audit:read'), 'GET', '/v1/devices/group-a-dev/keys'), 403, 'insufficient_scope');
    const events = await t.audit.queryEvents({ action: 'authz.refused' }, undefined, 100);
    expect(events.items.length).toBeGreaterThanOrEqual(2);
    expect((await call(t.app, admin, 'GET', '/v1/groups/x')).status).toBe(404); // nothing created
  });

  it('when a keys:read token for group A asks for a device of group B, then it is refused without revealing the device', async () => {
    const reader = await t.token('keystrata:keys:read', { sub: 'reader-a', groups: ['group-a'] });
    expect((await call(t.app, reader, 'GET', '/v1/devices/group-a-dev/keys')).status).toBe(200);
    const other = await call(t.app, reader, 'GET', '/v1/devices/group-b-dev/keys');
    const unknown = await call(t.app, reader, 'GET', '/v1/devices/no-such-dev/keys');
    expectProblem(other, 404);
    expectProblem(unknown, 404);
    expect(other.body.detail).toBe('Device group-b-dev not found (or not in your groups)'.replace('not in your groups', 'not in the groups of your token'));
    const bulk = await call(t.app, reader, 'POST', '/v1/keys/fetch', { items: [{ deviceId: 'group-b-dev' }] });
    expect(bulk.body.missing).toEqual([{ deviceId: 'group-b-dev', reason: 'not_found' }]);
  });

  it('when a token with no groups claim fetches keys, then nothing is reachable (deny by default)', async () => {
    const reader = await t.token('keystrata:keys:read', { sub: 'reader-a' });
    expectProblem(await call(t.app, reader, 'GET', '/v1/devices/group-a-dev/keys'), 404);
  });

  it('when the client has no delivery key registered, then key fetch is refused with a clear problem', async () => {
    const reader = await t.token('keystrata:keys:read', { sub: 'unregistered', groups: ['group-a'] });
    const response = await call(t.app, reader, 'GET', '/v1/devices/group-a-dev/keys');
    expectProblem(response, 403, 'delivery_key_missing');
    expect(response.body.detail).toContain('PUT /v1/clients/unregistered/delivery-key');
  });

  it('when health, readiness and docs are called without a token, then they answer', async () => {
    expect((await call(t.app, undefined, 'GET', '/healthz')).status).toBe(200);
    const ready = await call(t.app, undefined, 'GET', '/readyz');
    expect(ready.status).toBe(200);
    expect(ready.body).toEqual({ status: 'ready', checks: { database: { ok: true }, kek: { ok: true } } });
    expect((await t.app.inject({ method: 'GET', url: '/docs/json' })).statusCode).toBe(200);
    expect((await t.app.inject({ method: 'GET', url: '/docs' })).statusCode).toBeLessThan(400);
  });
});
