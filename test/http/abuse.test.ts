/**
 * Abuse (issue 8, part 3): rate limits per IP and per client, body size limits on every route,
 * deep and huge JSON, and Idempotency-Key on every POST that changes something.
 */
import crypto from 'node:crypto';
import os from 'node:os';
import { Readable } from 'node:stream';
import Fastify from 'fastify';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig, ConfigError } from '../../src/config.js';
import { KekUnavailableError } from '../../src/http/errors.js';
import { carriesKeyMaterial, registerIdempotency } from '../../src/http/idempotency.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createLogger } from '../../src/logger.js';
import { systemClock } from '../../src/clock.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { expectProblem, newDeliveryKeyPair } from '../support/flow.js';

type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

interface Answer {
  status: number;
  body: Record<string, unknown>;
  headers: Record<string, string | string[] | number | undefined>;
  raw: string;
}

async function send(
  t: TestApp,
  method: Method,
  url: string,
  options: { token?: string; payload?: unknown; headers?: Record<string, string>; ip?: string } = {},
): Promise<Answer> {
  const response = await t.app.inject({
    method,
    url,
    remoteAddress: options.ip ?? '127.0.0.1',
    headers: { ...(options.token ? { authorization: `Bearer ${options.token}` } : {}), ...options.headers },
    ...(options.payload !== undefined ? { payload: options.payload as Record<string, unknown> } : {}),
  });
  let body: Record<string, unknown> = {};
  try {
    body = response.body ? (JSON.parse(response.body) as Record<string, unknown>) : {};
  } catch {
    // not JSON (docs, metrics)
  }
  return { status: response.statusCode, body, headers: response.headers, raw: response.body };
}

async function auditCount(t: TestApp, action: string): Promise<number> {
  const { rows } = await sql<{ n: number }>`select count(*)::int as n from audit_events where action = ${action}`.execute(t.database.db);
  return rows[0]!.n;
}

describe('rate limits', () => {
  let t: TestApp;
  const PER_IP = 5;
  const PER_CLIENT = 8;
  beforeAll(async () => {
    t = await createTestApp({ env: { RATE_LIMIT_PER_IP_MAX: String(PER_IP), RATE_LIMIT_PER_CLIENT_MAX: String(PER_CLIENT), TRUST_PROXY: '10.9.9.9' } });
  });
  afterAll(async () => t.close());

  it('when an IP sends more requests without a token than its budget, then 429 problem+json with Retry-After and x-ratelimit-* headers, and the excess is not audited', async () => {
    const ip = '10.0.0.1';
    const auditedBefore = await auditCount(t, 'auth.failed');
    for (let i = 1; i <= PER_IP; i++) {
      const answer = await send(t, 'GET', '/v1/groups', { ip });
      expectProblem(answer, 401, 'unauthorized');
      expect(answer.headers['x-ratelimit-limit']).toBe(String(PER_IP));
      expect(answer.headers['x-ratelimit-remaining']).toBe(String(PER_IP - i));
      expect(Number(answer.headers['x-ratelimit-reset'])).toBeGreaterThan(0);
    }
    const refused = await send(t, 'GET', '/v1/groups', { ip });
    expectProblem(refused, 429, 'rate_limited');
    expect(refused.body.detail).toMatch(/without a valid token from this address/);
    const retryAfter = Number(refused.headers['retry-after']);
    expect(retryAfter).toBeGreaterThan(0);
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(refused.headers['x-ratelimit-limit']).toBe(String(PER_IP));
    expect(refused.headers['x-ratelimit-remaining']).toBe('0');
    expect(refused.headers['x-request-id']).toBeDefined();
    expect(await auditCount(t, 'auth.failed')).toBe(auditedBefore + PER_IP); // the refused one never reached authentication

    // unknown routes and the docs spend the same budget; another IP has its own
    expectProblem(await send(t, 'GET', '/no/such/route', { ip }), 429, 'rate_limited');
    expect((await send(t, 'GET', '/v1/groups', { ip: '10.0.0.2' })).status).toBe(401);
  });

  it('when an IP is over its budget, then health, readiness and metrics still answer (exempt)', async () => {
    const ip = '10.0.0.3';
    for (let i = 0; i < PER_IP + 1; i++) await send(t, 'GET', '/v1/groups', { ip });
    expect((await send(t, 'GET', '/v1/groups', { ip })).status).toBe(429);
    for (let i = 0; i < 3 * PER_IP; i++) {
      for (const url of ['/healthz', '/readyz', '/metrics']) {
        const answer = await send(t, 'GET', url, { ip });
        expect(answer.status, url).toBe(200);
        expect(answer.headers['x-ratelimit-limit']).toBeUndefined();
      }
    }
  });

  it('when forged tokens come from one IP, then they spend its budget, and once it is spent the next token is refused before verification', async () => {
    const ip = '10.0.0.4';
    const forged = await t.token('keystrata:admin', { sub: 'victim' });
    const bad = `${forged.slice(0, -4)}AAAA`; // a broken signature, still claiming sub=victim
    const auditedBefore = await auditCount(t, 'auth.failed');
    for (let i = 0; i < PER_IP; i++) expectProblem(await send(t, 'GET', '/v1/groups', { ip, token: bad }), 401);
    expectProblem(await send(t, 'GET', '/v1/groups', { ip, token: bad }), 429, 'rate_limited');
    expect(await auditCount(t, 'auth.failed')).toBe(auditedBefore + PER_IP);
    // a valid token from that IP is refused too while the IP's budget is spent (documented)…
    expectProblem(await send(t, 'GET', '/v1/groups', { ip, token: forged }), 429, 'rate_limited');
    // …but the victim whose sub was claimed lost nothing: from another IP it has its whole budget
    const fine = await send(t, 'GET', '/v1/groups', { ip: '10.0.0.5', token: forged });
    expect(fine.status).toBe(200);
    expect(fine.headers['x-ratelimit-remaining']).toBe(String(PER_CLIENT - 1));
  });

  it('when an authenticated client exceeds its budget, then 429 for it alone: other clients and anonymous callers on the same IP are unaffected', async () => {
    const ip = '10.0.0.6';
    const busy = await t.token('keystrata:admin', { sub: 'busy-client' });
    for (let i = 1; i <= PER_CLIENT; i++) {
      const answer = await send(t, 'GET', '/v1/groups', { ip, token: busy });
      expect(answer.status).toBe(200);
      expect(answer.headers['x-ratelimit-limit']).toBe(String(PER_CLIENT));
      expect(answer.headers['x-ratelimit-remaining']).toBe(String(PER_CLIENT - i));
    }
    const refused = await send(t, 'GET', '/v1/groups', { ip, token: busy });
    expectProblem(refused, 429, 'rate_limited');
    expect(refused.body.detail).toMatch(/for this client/);
    expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
    // the IP budget was never touched by the client's requests
    const other = await send(t, 'GET', '/v1/groups', { ip, token: await t.token('keystrata:admin', { sub: 'quiet-client' }) });
    expect(other.status).toBe(200);
    const anonymous = await send(t, 'GET', '/v1/groups', { ip });
    expect(anonymous.status).toBe(401);
    expect(anonymous.headers['x-ratelimit-remaining']).toBe(String(PER_IP - 1));
  });

  it('when a valid token lacks the scope, then each 403 is charged to its client, and an exhausted client is refused before the refusal is audited', async () => {
    const ip = '10.0.0.7';
    const reader = await t.token('keystrata:audit:read', { sub: 'nosy-client' });
    for (let i = 0; i < PER_CLIENT; i++) expectProblem(await send(t, 'GET', '/v1/groups', { ip, token: reader }), 403, 'insufficient_scope');
    const refusedBefore = await auditCount(t, 'authz.refused');
    expectProblem(await send(t, 'GET', '/v1/groups', { ip, token: reader }), 429, 'rate_limited');
    expectProblem(await send(t, 'POST', '/v1/groups', { ip, token: reader, payload: { id: 'nope', deviceType: 'x', region: 'eu' } }), 429, 'rate_limited');
    expect(await auditCount(t, 'authz.refused')).toBe(refusedBefore);
  });

  it('when TRUST_PROXY names the proxy, then clients behind it are counted by X-Forwarded-For; from anyone else the header is ignored', async () => {
    const proxy = '10.9.9.9';
    for (let i = 0; i < PER_IP; i++) await send(t, 'GET', '/v1/groups', { ip: proxy, headers: { 'x-forwarded-for': '192.0.2.10' } });
    expect((await send(t, 'GET', '/v1/groups', { ip: proxy, headers: { 'x-forwarded-for': '192.0.2.10' } })).status).toBe(429);
    expect((await send(t, 'GET', '/v1/groups', { ip: proxy, headers: { 'x-forwarded-for': '192.0.2.11' } })).status).toBe(401);
    // a direct client cannot pick its own address
    const direct = '10.0.0.8';
    for (let i = 0; i < PER_IP; i++) await send(t, 'GET', '/v1/groups', { ip: direct, headers: { 'x-forwarded-for': `198.51.100.${i}` } });
    expect((await send(t, 'GET', '/v1/groups', { ip: direct, headers: { 'x-forwarded-for': '198.51.100.99' } })).status).toBe(429);
  });

  it('when the window has passed, then the budget is back', async () => {
    const short = await createTestApp({ env: { RATE_LIMIT_PER_IP_MAX: '2', RATE_LIMIT_WINDOW_SECONDS: '1' } });
    try {
      for (let i = 0; i < 2; i++) expect((await send(short, 'GET', '/v1/groups')).status).toBe(401);
      const refused = await send(short, 'GET', '/v1/groups');
      expect(refused.status).toBe(429);
      expect(refused.headers['retry-after']).toBe('1');
      await new Promise((resolve) => setTimeout(resolve, 1100));
      expect((await send(short, 'GET', '/v1/groups')).status).toBe(401);
    } finally {
      await short.close();
    }
  });

  it('when RATE_LIMIT_ENABLED=false, then nothing is limited and no x-ratelimit headers are sent', async () => {
    const off = await createTestApp({ env: { RATE_LIMIT_ENABLED: 'false', RATE_LIMIT_PER_IP_MAX: '1' } });
    try {
      for (let i = 0; i < 5; i++) {
        const answer = await send(off, 'GET', '/v1/groups');
        expect(answer.status).toBe(401);
        expect(answer.headers['x-ratelimit-limit']).toBeUndefined();
      }
    } finally {
      await off.close();
    }
  });

  it('when the settings are out of range, then the configuration is refused naming each', () => {
    const attempt = () =>
      loadConfig({ RATE_LIMIT_ENABLED: 'maybe', RATE_LIMIT_PER_IP_MAX: '0', RATE_LIMIT_PER_CLIENT_MAX: '-1', RATE_LIMIT_WINDOW_SECONDS: 'soon', TRUST_PROXY: '3', IDEMPOTENCY_TTL_SECONDS: '1' });
    expect(attempt).toThrow(ConfigError);
    try {
      attempt();
    } catch (error) {
      const text = (error as ConfigError).problems.join('\n');
      for (const name of ['RATE_LIMIT_ENABLED', 'RATE_LIMIT_PER_IP_MAX', 'RATE_LIMIT_PER_CLIENT_MAX', 'RATE_LIMIT_WINDOW_SECONDS', 'TRUST_PROXY', 'IDEMPOTENCY_TTL_SECONDS']) {
        expect(text).toContain(name);
      }
    }
    const defaults = loadConfig({});
    expect(defaults.rateLimit).toEqual({ enabled: true, windowSeconds: 60, perIpMax: 600, perClientMax: 6000 });
    expect(defaults.trustProxy).toBe(false);
    expect(loadConfig({ TRUST_PROXY: '10.0.0.0/8, 192.0.2.1' }).trustProxy).toEqual(['10.0.0.0/8', '192.0.2.1']);
    expect(defaults.idempotencyTtlSeconds).toBe(86_400);
  });
});

describe('body limits and hostile JSON', () => {
  let t: TestApp;
  let admin: string;
  beforeAll(async () => {
    t = await createTestApp();
    admin = await t.token('keystrata:admin');
  });
  afterAll(async () => t.close());

  /** Every route that takes a body, from the route table: none is forgotten, present or future. */
  function bodyRoutes() {
    return t.app.routeTable.filter((r) => ['POST', 'PUT', 'PATCH', 'DELETE'].includes(r.method) && !r.url.startsWith('/docs'));
  }
  const concrete = (url: string) => url.replace(/:(\w+)/g, (_m, name: string) => (name === 'version' ? '1' : `x-${name}`));
  const oversized = (bytes: number) => JSON.stringify({ padding: 'x'.repeat(bytes) });

  it('when any route gets a body one byte over its limit, then 413 problem+json and the handler never runs', async () => {
    const routes = bodyRoutes();
    expect(routes.length).toBeGreaterThanOrEqual(10);
    for (const route of routes) {
      const limit = route.bodyLimit ?? t.config.bodyLimitBytes;
      const payload = oversized(limit - 14 + 1); // {"padding":""} is 14 bytes
      expect(Buffer.byteLength(payload)).toBe(limit + 1);
      const answer = await send(t, route.method as Method, concrete(route.url), { token: admin, payload, headers: { 'content-type': 'application/json' } });
      expectProblem(answer, 413, 'ctp_body_too_large');
      expect(answer.body.detail, `${route.method} ${route.url}`).toBe('The request body is too large');
    }
  });

  it('when a body arrives without Content-Length (chunked) and grows past the limit, then 413 as well', async () => {
    const chunk = Buffer.alloc(64 * 1024, 0x20);
    let sent = 0;
    const stream = new Readable({
      read() {
        if (sent > t.config.bodyLimitBytes + chunk.length) return this.push(null);
        sent += chunk.length;
        this.push(sent === chunk.length ? Buffer.concat([Buffer.from('{"id":"'), chunk]) : chunk);
      },
    });
    const response = await t.app.inject({
      method: 'POST',
      url: '/v1/groups',
      headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json', 'transfer-encoding': 'chunked' },
      payload: stream,
    });
    expect(response.statusCode).toBe(413);
    expect(response.headers['content-type']).toMatch(/^application\/problem\+json/);
  });

  it('when JSON is deeply nested, enormous in breadth, or carries __proto__, then a clean 4xx problem and nothing is stored', async () => {
    const depth = 200_000;
    const cases: Array<[string, string]> = [
      ['/v1/groups', `${'['.repeat(depth)}${']'.repeat(depth)}`],
      ['/v1/groups', `{"id":${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}}`],
      ['/v1/groups/g/devices/bulk', `{"ids":${'['.repeat(depth)}${']'.repeat(depth)}}`],
      ['/v1/groups', `{${Array.from({ length: 40_000 }, (_, i) => `"k${i}":${i}`).join(',')}}`],
      ['/v1/groups/g/devices/bulk', `{"ids":[${Array.from({ length: 100_000 }, () => '1').join(',')}]}`],
      ['/v1/groups', '{"id":"g","deviceType":"pump","region":"eu","__proto__":{"admin":true}}'],
      ['/v1/groups', '{"id":"g","deviceType":"pump","region":"eu","constructor":{"prototype":{"admin":true}}}'],
      ['/v1/groups', '{"id":"g",'],
      ['/v1/groups', '\u0000'],
    ];
    for (const [url, payload] of cases) {
      const answer = await send(t, 'POST', url, { token: admin, payload, headers: { 'content-type': 'application/json' } });
      expect(answer.status, `${url} ${payload.slice(0, 40)}`).toBeGreaterThanOrEqual(400);
      expect(answer.status).toBeLessThan(500);
      expect(answer.headers['content-type']).toMatch(/^application\/problem\+json/);
    }
    const { rows } = await sql<{ n: number }>`select count(*)::int as n from key_groups`.execute(t.database.db);
    expect(rows[0]!.n).toBe(0);
    expect(({} as Record<string, unknown>).admin).toBeUndefined();
  });
});

describe('Idempotency-Key', () => {
  let t: TestApp;
  let admin: string;
  let failing = false;
  beforeAll(async () => {
    t = await createTestApp({
      manualClock: true,
      // a KEK provider that can be made to fail, for the 503 case
      kek: async (database) => {
        const real = createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir: os.tmpdir(), keyName: 'keystrata-kek', logger: createLogger('silent') });
        return new Proxy(real, {
          get(target, property, receiver) {
            const value = Reflect.get(target, property, receiver) as unknown;
            if (typeof value !== 'function' || !['wrap', 'unwrap'].includes(String(property))) return value;
            return (...args: unknown[]) => {
              if (failing) return Promise.reject(new KekUnavailableError());
              return (value as (...a: unknown[]) => unknown).apply(target, args);
            };
          },
        }) as KekProvider;
      },
    });
    admin = await t.token('keystrata:admin');
  });
  afterAll(async () => t.close());

  const key = () => crypto.randomUUID();
  const post = (url: string, payload: unknown, idempotencyKey: string | undefined, token = admin) =>
    send(t, 'POST', url, { token, payload, headers: idempotencyKey === undefined ? {} : { 'idempotency-key': idempotencyKey } });
  const rows = async () =>
    (await sql<{ principal: string; state: string; body: string | null; path: string }>`select principal, state, body, path from idempotency_keys`.execute(t.database.db)).rows;
  const versionsOf = async (deviceId: string) => (await send(t, 'GET', `/v1/devices/${deviceId}`, { token: admin })).body.versions as unknown[];

  it('when a create is retried with the same key, then the first answer comes back (Idempotent-Replayed) and nothing is created twice', async () => {
    const k = key();
    const first = await post('/v1/groups', { id: 'idem-g1', deviceType: 'pump', region: 'eu' }, k);
    expect(first.status).toBe(201);
    expect(first.headers['idempotent-replayed']).toBeUndefined();
    const events = await auditCount(t, 'group.create');
    const retry = await post('/v1/groups', { region: 'eu', id: 'idem-g1', deviceType: 'pump' }, k); // same body, keys reordered
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect(retry.raw).toBe(first.raw);
    expect(retry.headers['content-type']).toBe(first.headers['content-type']);
    expect(retry.headers['x-request-id']).not.toBe(first.headers['x-request-id']);
    expect(await auditCount(t, 'group.create')).toBe(events);
    // without a key, the same request is simply a conflict: the key is what made the retry safe
    expectProblem(await post('/v1/groups', { id: 'idem-g1', deviceType: 'pump', region: 'eu' }, undefined), 409);
  });

  it('when a device rotation is retried with the same key, then the device is rotated once', async () => {
    expect((await post('/v1/groups/idem-g1/devices', { id: 'idem-d1' }, key())).status).toBe(201);
    expect(await versionsOf('idem-d1')).toHaveLength(1);
    const k = key();
    const first = await post('/v1/devices/idem-d1/rotate', {}, k);
    expect(first.status).toBe(200);
    for (let i = 0; i < 3; i++) {
      const retry = await post('/v1/devices/idem-d1/rotate', {}, k);
      expect(retry.status).toBe(200);
      expect(retry.headers['idempotent-replayed']).toBe('true');
      expect(retry.raw).toBe(first.raw);
    }
    expect(await versionsOf('idem-d1')).toHaveLength(2);
    // a new key is a new rotation
    expect((await post('/v1/devices/idem-d1/rotate', {}, key())).status).toBe(200);
    expect(await versionsOf('idem-d1')).toHaveLength(3);
  });

  it('when the same key comes with another body or another path, then 422 and nothing runs', async () => {
    const k = key();
    expect((await post('/v1/groups', { id: 'idem-g2', deviceType: 'pump', region: 'eu' }, k)).status).toBe(201);
    const otherBody = await post('/v1/groups', { id: 'idem-g3', deviceType: 'pump', region: 'eu' }, k);
    expectProblem(otherBody, 422, 'idempotency_key_reused');
    expect(otherBody.body.title).toBe('Unprocessable Content');
    expectProblem(await post('/v1/groups/idem-g2/devices', { id: 'idem-d2' }, k), 422, 'idempotency_key_reused');
    expect((await send(t, 'GET', '/v1/groups/idem-g3', { token: admin })).status).toBe(404);
    expect((await send(t, 'GET', '/v1/devices/idem-d2', { token: admin })).status).toBe(404);
  });

  it('when another client uses the same key, then it is its own key: no replay, no 422', async () => {
    const k = key();
    expect((await post('/v1/groups', { id: 'idem-g4', deviceType: 'pump', region: 'eu' }, k)).status).toBe(201);
    const other = await t.token('keystrata:admin', { sub: 'second-operator' });
    const theirs = await post('/v1/groups', { id: 'idem-g5', deviceType: 'pump', region: 'eu' }, k, other);
    expect(theirs.status).toBe(201);
    expect(theirs.headers['idempotent-replayed']).toBeUndefined();
    expect((await rows()).filter((r) => r.path === '/v1/groups').map((r) => r.principal)).toEqual(expect.arrayContaining(['test-admin', 'second-operator']));
  });

  it('when a duplicate arrives while the first is still running, then 409 with Retry-After; afterwards the retry replays', async () => {
    expect((await post('/v1/groups', { id: 'idem-bulk', deviceType: 'pump', region: 'eu' }, key())).status).toBe(201);
    const k = key();
    const ids = Array.from({ length: 3000 }, (_, i) => `idem-bulk-${i}`);
    const first = post('/v1/groups/idem-bulk/devices/bulk', { ids }, k);
    // wait until the first one holds the key
    for (let i = 0; i < 200 && !(await rows()).some((r) => r.state === 'in_flight'); i++) await new Promise((r) => setTimeout(r, 5));
    const duplicate = await post('/v1/groups/idem-bulk/devices/bulk', { ids }, k);
    expectProblem(duplicate, 409, 'idempotency_key_in_use');
    expect(duplicate.headers['retry-after']).toBe('1');
    const done = await first;
    expect(done.status).toBe(201);
    expect(done.body.enrolled).toBe(3000);
    const retry = await post('/v1/groups/idem-bulk/devices/bulk', { ids }, k);
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBe('true');
  });

  it('when two identical requests race, then exactly one runs', async () => {
    const k = key();
    const answers = await Promise.all([0, 1, 2, 3].map(() => post('/v1/groups/idem-g1/devices', { id: 'idem-race' }, k)));
    const ran = answers.filter((a) => a.status === 201 && a.headers['idempotent-replayed'] === undefined);
    expect(ran).toHaveLength(1);
    for (const a of answers) expect([201, 409]).toContain(a.status);
    for (const a of answers.filter((x) => x.status === 409)) expect(a.body.code).toBe('idempotency_key_in_use');
  });

  it('when the first request fails with a 5xx, then the key is given back and the retry runs', async () => {
    const k = key();
    failing = true;
    try {
      const failed = await post('/v1/groups', { id: 'idem-g6', deviceType: 'pump', region: 'eu' }, k);
      expectProblem(failed, 503);
    } finally {
      failing = false;
    }
    expect((await rows()).some((r) => r.path === '/v1/groups' && r.state === 'in_flight')).toBe(false);
    const retry = await post('/v1/groups', { id: 'idem-g6', deviceType: 'pump', region: 'eu' }, k);
    expect(retry.status).toBe(201);
    expect(retry.headers['idempotent-replayed']).toBeUndefined();
  });

  it('when the first request ends in a 4xx, then that outcome is replayed (the request does not run again)', async () => {
    const k = key();
    expectProblem(await post('/v1/groups/idem-later/devices', { id: 'idem-d3' }, k), 404);
    expect((await post('/v1/groups', { id: 'idem-later', deviceType: 'pump', region: 'eu' }, key())).status).toBe(201);
    const retry = await post('/v1/groups/idem-later/devices', { id: 'idem-d3' }, k);
    expectProblem(retry, 404);
    expect(retry.headers['idempotent-replayed']).toBe('true');
    expect((await send(t, 'GET', '/v1/devices/idem-d3', { token: admin })).status).toBe(404);
  });

  it('when the key has expired (24 h), then the same key runs the request again', async () => {
    const k = key();
    expect((await post('/v1/groups', { id: 'idem-g7', deviceType: 'pump', region: 'eu' }, k)).status).toBe(201);
    (t.clock as unknown as { advance(ms: number): void }).advance(t.config.idempotencyTtlSeconds * 1000 + 1000);
    const again = await post('/v1/groups', { id: 'idem-g7', deviceType: 'pump', region: 'eu' }, k);
    expectProblem(again, 409); // it ran: the group exists already
    expect(again.headers['idempotent-replayed']).toBeUndefined();
  });

  it('when the key is malformed, then 400 before anything runs', async () => {
    for (const bad of ['x'.repeat(256), 'with space', 'naïve', '']) {
      const answer = await post('/v1/groups', { id: 'idem-bad', deviceType: 'pump', region: 'eu' }, bad);
      expectProblem(answer, 400);
      expect(JSON.stringify(answer.body)).toContain('idempotency-key');
    }
    expect((await post('/v1/groups', { id: 'idem-ok', deviceType: 'pump', region: 'eu' }, 'k'.repeat(255))).status).toBe(201);
    expect((await send(t, 'GET', '/v1/groups/idem-bad', { token: admin })).status).toBe(404);
  });

  it('when a read sent as POST carries a key (key fetch, audit verify), then it is ignored: nothing stored, key material never kept', async () => {
    const backend = await newDeliveryKeyPair();
    expect((await send(t, 'PUT', '/v1/clients/idem-reader/delivery-key', { token: admin, payload: { jwk: backend.publicJwk } })).status).toBe(200);
    const reader = await t.token('keystrata:keys:read', { sub: 'idem-reader', groups: ['idem-g1'] });
    const k = key();
    const fetches = [await post('/v1/keys/fetch', { items: [{ deviceId: 'idem-d1' }] }, k, reader), await post('/v1/keys/fetch', { items: [{ deviceId: 'idem-d1' }] }, k, reader)];
    for (const f of fetches) {
      expect(f.status).toBe(200);
      expect(typeof f.body.jwe).toBe('string');
      expect(f.headers['idempotent-replayed']).toBeUndefined();
    }
    expect(fetches[0]!.body.jwe).not.toBe(fetches[1]!.body.jwe); // both ran
    const auditor = await t.token('keystrata:audit:read', { sub: 'idem-auditor' });
    expect((await post('/v1/audit/verify', {}, k, auditor)).status).toBe(200);
    const stored = await rows();
    expect(stored.some((r) => r.principal === 'idem-reader' || r.principal === 'idem-auditor')).toBe(false);
    for (const r of stored) expect(r.body === null || !carriesKeyMaterial(r.body)).toBe(true);
    // and the OpenAPI document says which routes take the header
    const doc = (await t.app.inject({ method: 'GET', url: '/docs/json' })).json() as { paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string }> }>> };
    const takesKey = (path: string, method: string) => (doc.paths[path]?.[method]?.parameters ?? []).some((p) => p.in === 'header' && p.name === 'idempotency-key');
    expect(takesKey('/v1/groups', 'post')).toBe(true);
    expect(takesKey('/v1/devices/{deviceId}/rotate', 'post')).toBe(true);
    expect(takesKey('/v1/keys/fetch', 'post')).toBe(false);
    expect(takesKey('/v1/audit/verify', 'post')).toBe(false);
    expect(takesKey('/v1/clients/{clientId}/delivery-key', 'put')).toBe(false);
  });

  it('when a POST route whose answer carries key material does not opt out, then the app refuses to start', async () => {
    const app = Fastify();
    registerIdempotency(app, { db: undefined as never, clock: systemClock, ttlSeconds: 60, logger: app.log });
    const start = async () => {
      app.post('/leaky', {
        config: { scope: 'keystrata:keys:read' },
        schema: { response: { 200: { type: 'object', properties: { items: { type: 'array', items: { type: 'object', properties: { jwe: { type: 'string' } } } } } } } },
        handler: async () => ({ items: [] }),
      });
      await app.ready();
    };
    await expect(start()).rejects.toThrow(/key material \(`jwe`\).*idempotent = false/);
    await app.close().catch(() => {});
    const optedOut = Fastify();
    registerIdempotency(optedOut, { db: undefined as never, clock: systemClock, ttlSeconds: 60, logger: optedOut.log });
    optedOut.post('/leaky', { config: { idempotent: false }, schema: { response: { 200: { type: 'object', properties: { jwe: { type: 'string' } } } } }, handler: async () => ({}) });
    await optedOut.ready();
    await optedOut.close();
    expect(carriesKeyMaterial('{"a":[{"b":{"jwe":"x"}}]}')).toBe(true);
    expect(carriesKeyMaterial('{"a":"\\"jwe\\": 1"}')).toBe(false);
    expect(carriesKeyMaterial('not json')).toBe(true);
  });
});
