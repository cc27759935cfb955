import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import Fastify, { type FastifyInstance, type RouteOptions } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { auditRoutes } from '../../src/audit/audit.routes.js';
import { registerErrorHandling } from '../../src/http/error-handler.js';
import { Problem } from '../../src/http/schemas.js';
import { createAuditFixture, type AuditFixture } from './support.js';

/** The audit routes alone, on the app's validation settings and error handler (auth is the app's hook). */
describe('audit routes', () => {
  let f: AuditFixture;
  let app: FastifyInstance;
  const routes: RouteOptions[] = [];

  beforeAll(async () => {
    f = await createAuditFixture();
    await f.audit.record(f.database.db, [
      { actor: 'alice', action: 'group.create', outcome: 'success', keyId: 'group:g1', requestId: 'req-00000001' },
      { actor: 'reader', action: 'key.deliver', outcome: 'success', keyId: 'device:d1', details: { versions: [1, 2] } },
      { actor: 'anonymous', action: 'auth.failed', outcome: 'denied', details: { reason: 'expired' } },
    ]);
    app = Fastify({ ajv: { customOptions: { removeAdditional: false, coerceTypes: 'array', allErrors: false } } }).withTypeProvider<TypeBoxTypeProvider>();
    app.addHook('onRoute', (route) => {
      routes.push(route);
    });
    app.addSchema(Problem);
    registerErrorHandling(app);
    await app.register(auditRoutes, { audit: f.audit });
    await app.ready();
  });
  afterAll(async () => {
    await app.close();
    await f.close();
  });

  it('when registered, then every route states its scope, operationId, audit tag, summary and responses', () => {
    const byUrl = Object.fromEntries(routes.filter((r) => r.method !== 'HEAD').map((r) => [`${String(r.method)} ${r.url}`, r]));
    expect(Object.keys(byUrl).sort()).toEqual(['GET /v1/audit/checkpoints', 'GET /v1/audit/events', 'POST /v1/audit/checkpoints', 'POST /v1/audit/verify']);
    for (const [key, route] of Object.entries(byUrl)) {
      const scope = key === 'POST /v1/audit/checkpoints' ? 'keystrata:admin' : 'keystrata:audit:read';
      expect(route.config).toMatchObject({ scope });
      expect(route.schema).toMatchObject({ operationId: expect.any(String), tags: ['audit'], summary: expect.any(String) });
      const responses = (route.schema as { response: Record<string, unknown> }).response;
      expect(Object.keys(responses)).toEqual(expect.arrayContaining(['400', '401', '403', '500', '503']));
    }
  });

  it('when events are listed with filters and a cursor, then pages come back in the documented shape', async () => {
    const first = await app.inject({ method: 'GET', url: '/v1/audit/events?limit=2' });
    expect(first.statusCode).toBe(200);
    const body = first.json<{ items: Array<{ position: number }>; nextCursor?: string }>();
    expect(body.items.map((e) => e.position)).toEqual([1, 2]);
    const second = await app.inject({ method: 'GET', url: `/v1/audit/events?limit=2&cursor=${body.nextCursor}` });
    expect(second.json()).toEqual({ items: [expect.objectContaining({ position: 3, actor: 'anonymous', outcome: 'denied', details: { reason: 'expired' } })] });

    const filtered = await app.inject({ method: 'GET', url: '/v1/audit/events?keyId=device:d1&outcome=success&order=desc' });
    expect(filtered.json()).toEqual({
      items: [
        {
          position: 2,
          time: expect.any(String),
          actor: 'reader',
          action: 'key.deliver',
          outcome: 'success',
          keyId: 'device:d1',
          details: { versions: [1, 2] },
          requestId: null,
          prevHash: expect.stringMatching(/^[0-9a-f]{64}$/),
          hash: expect.stringMatching(/^[0-9a-f]{64}$/),
        },
      ],
    });
  });

  it('when the query is bad, then the answer is a 400 problem naming the rule', async () => {
    for (const url of ['/v1/audit/events?limit=1001', '/v1/audit/events?outcome=maybe', '/v1/audit/events?from=yesterday', '/v1/audit/events?bogus=1', '/v1/audit/events?cursor=!!!', '/v1/audit/events?cursor=bm9wZQ']) {
      const response = await app.inject({ method: 'GET', url });
      expect(response.statusCode, url).toBe(400);
      expect(response.headers['content-type']).toMatch(/application\/problem\+json/);
    }
  });

  it('when verify is posted with no body, or from a position, then the chain report comes back', async () => {
    const whole = await app.inject({ method: 'POST', url: '/v1/audit/verify' });
    expect(whole.statusCode).toBe(200);
    expect(whole.json()).toEqual({ ok: true, checked: 3, fromPosition: 1, headPosition: 3, checkpointsChecked: 0 });
    const partial = await app.inject({ method: 'POST', url: '/v1/audit/verify', payload: { fromPosition: 2 } });
    expect(partial.json()).toMatchObject({ ok: true, checked: 2, fromPosition: 2 });
  });

  it('when verify is asked the impossible, then it answers 400 or 404 problems', async () => {
    expect((await app.inject({ method: 'POST', url: '/v1/audit/verify', payload: { fromPosition: 1, fromCheckpoint: 1 } })).statusCode).toBe(400);
    expect((await app.inject({ method: 'POST', url: '/v1/audit/verify', payload: { fromPosition: 0 } })).statusCode).toBe(400);
    expect((await app.inject({ method: 'POST', url: '/v1/audit/verify', payload: { extra: true } })).statusCode).toBe(400);
    const missing = await app.inject({ method: 'POST', url: '/v1/audit/verify', payload: { fromCheckpoint: 42 } });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toMatchObject({ code: 'not_found', detail: 'Checkpoint 42 does not exist' });
  });

  it('when a checkpoint is created and listed, then it comes with the public key and nothing private', async () => {
    const created = await app.inject({ method: 'POST', url: '/v1/audit/checkpoints' });
    expect(created.statusCode).toBe(201);
    expect(created.json()).toMatchObject({ position: 3, hash: expect.stringMatching(/^[0-9a-f]{64}$/) });
    const listed = await app.inject({ method: 'GET', url: '/v1/audit/checkpoints' });
    expect(listed.statusCode).toBe(200);
    const body = listed.json<{ publicKey: Record<string, string>; items: unknown[] }>();
    expect(body.items).toEqual([created.json()]);
    expect(body.publicKey).toEqual({ kty: 'OKP', crv: 'Ed25519', x: expect.any(String), kid: expect.any(String), alg: 'Ed25519', use: 'sig' });
    expect(listed.body).not.toMatch(/"d"|local:v/);
  });
});
