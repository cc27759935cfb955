/**
 * Bad input at scale (issue 8, part 2): every route of `app.routeTable` (the docs' static assets
 * aside) gets property-based requests from fast-check, with fixed seeds:
 *
 * - malformed, derived from the route's schemas: wrong types, missing and unknown properties,
 *   boundary lengths and numbers, hostile strings (path traversal, NUL, RTL override,
 *   homoglyphs, combining marks, lone surrogates), hostile path segments (`..`, `%2e%2e`,
 *   overlong and invalid UTF-8 percent-encodings), junk and duplicate query parameters, raw
 *   bodies (invalid JSON, duplicate keys, deep nesting, huge arrays and numbers, invalid UTF-8,
 *   over the body limit), wrong content types, hostile Idempotency-Key / X-Request-Id /
 *   Authorization headers, and tokens of the other scopes;
 * - random: any method on a path shaped like the route's, any body;
 * - valid: values generated from the schemas (these may succeed).
 *
 * Every answer must be a 4xx problem+json (status, title, detail; the shared Problem schema) or
 * a success whose body matches the route's response schema for that status (compiled with
 * ajv); never a 5xx. And a refused request stores nothing: around each route's batch of
 * malformed and random requests, a snapshot of every table (counts and a checksum of the rows;
 * audit events and idempotency records aside) must not change unless one of its changing
 * requests succeeded.
 *
 * Prints the number of requests and of server errors. FUZZ_FAILURES_FILE=<path> writes the
 * failures (with fast-check's shrunk counterexamples) there as JSON.
 */
import { Ajv, type ValidateFunction } from 'ajv';
import addFormats from 'ajv-formats';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RouteEntry } from '../../src/http/route-table.js';
import { Problem } from '../../src/http/schemas.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, newDeliveryKeyPair } from '../support/flow.js';
import { tableSnapshot } from '../faults/support.js';
import { anyJson, arbitraryValid, HOSTILE_STRINGS, malformed, pathSegment, queryValue, sampleValid, schemaOf, urlWithParams, type Fixtures, type Schema } from './schema.js';

const SEED = 20_261_122;
const RUNS = { malformed: 50, random: 20, valid: 15 };
const CONCURRENCY = 16;

type TokenName = 'admin' | 'keysRead' | 'rotate' | 'audit' | 'none' | 'garbage';
interface FuzzRequest {
  method: string;
  url: string;
  token: TokenName;
  headers: Record<string, string>;
  body?: string | Buffer | undefined;
  why: string;
}

interface Failure {
  route: string;
  kind: string;
  request: string;
  problem: string;
}

const CONTENT_TYPES = [
  'text/plain',
  'application/xml',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=x',
  'application/json; charset=utf-16',
  'application/json; charset=latin1',
  'application/problem+json',
  'APPLICATION/JSON',
  'application/jsonx',
  'application/json, text/plain',
  '*/*',
  'application/octet-stream',
];

describe('fuzzing every route (fast-check)', () => {
  let t: TestApp;
  let fixtures: Fixtures;
  const tokens = new Map<TokenName, string>();
  const responseValidators = new Map<string, ValidateFunction>();
  let problemValidator: ValidateFunction;
  let routes: RouteEntry[] = [];
  let fresh = 0;
  const stats = { requests: 0, serverErrors: 0, byStatus: new Map<number, number>(), snapshotsCompared: 0, snapshotsSkipped: 0 };
  const failures: Failure[] = [];

  beforeAll(async () => {
    t = await createTestApp({ env: { RATE_LIMIT_ENABLED: 'false', LOG_LEVEL: 'warn' } });
    const admin = await t.token('keystrata:admin', { sub: 'fuzzer', ttlSeconds: 3600 });
    tokens.set('admin', admin);
    tokens.set('keysRead', await t.token('keystrata:keys:read', { sub: 'fz-reader', groups: ['fz-g'], ttlSeconds: 3600 }));
    tokens.set('rotate', await t.token('keystrata:rotate', { sub: 'fz-cron', ttlSeconds: 3600 }));
    tokens.set('audit', await t.token('keystrata:audit:read', { sub: 'fz-auditor', ttlSeconds: 3600 }));
    const ok = async (method: 'POST' | 'PUT', url: string, body: unknown) => {
      const response = await call(t.app, admin, method, url, body);
      expect(response.status, `${method} ${url}: ${response.raw}`).toBeLessThan(300);
      return response.body;
    };
    await ok('POST', '/v1/groups', { id: 'fz-g', deviceType: 'pump', region: 'eu' });
    await ok('POST', '/v1/groups/fz-g/devices/bulk', { ids: ['fz-d0', 'fz-d1', 'fz-d2'] });
    await ok('POST', '/v1/devices/fz-d0/fields', { field: 'serial' });
    await ok('POST', '/v1/groups', { id: 'fz-r', deviceType: 'pump', region: 'eu' });
    await ok('POST', '/v1/groups/fz-r/devices/bulk', { ids: ['fz-r0', 'fz-r1'] });
    const rollout = await ok('POST', '/v1/rollouts', { groupId: 'fz-r', level: 'device', percentPerDay: 10, waveIntervalSeconds: 86_400 });
    for (const client of ['fuzzer', 'fz-reader']) await ok('PUT', `/v1/clients/${client}/delivery-key`, { jwk: (await newDeliveryKeyPair()).publicJwk });
    fixtures = { groupId: 'fz-g', deviceId: 'fz-d0', field: 'serial', clientId: 'fz-reader', rolloutId: rollout.id as string, version: 1, freshId: () => `fz-new-${++fresh}` };

    const ajv = new Ajv({ strict: false, allErrors: false });
    addFormats.default(ajv);
    ajv.addSchema(Problem);
    problemValidator = ajv.getSchema('Problem')!;
    routes = t.app.routeTable.filter((r) => !r.url.startsWith('/docs'));
    for (const route of routes) {
      const responses = ((route.schema as Record<string, unknown> | undefined)?.response ?? {}) as Record<string, Schema>;
      for (const [status, schema] of Object.entries(responses)) {
        responseValidators.set(`${route.method} ${route.url} ${status}`, ajv.compile(schema));
      }
    }
    expect(routes.length).toBeGreaterThan(40);
  }, 120_000);

  afterAll(async () => {
    const statuses = [...stats.byStatus].sort(([a], [b]) => a - b).map(([s, n]) => `${s}×${n}`).join(' ');
    console.info(
      `fuzz: ${stats.requests} requests to ${routes.length} routes, ${stats.serverErrors} server errors; statuses ${statuses}; ` +
        `refused batches checked for stored changes: ${stats.snapshotsCompared} (skipped ${stats.snapshotsSkipped}: a changing request in them succeeded)`,
    );
    if (process.env.FUZZ_FAILURES_FILE) (await import('node:fs')).writeFileSync(process.env.FUZZ_FAILURES_FILE, JSON.stringify(failures, null, 2));
    await t?.close();
  });

  // ---- sending and judging one request ------------------------------------------------------

  async function send(request: FuzzRequest): Promise<{ status: number; headers: Record<string, unknown>; body: string }> {
    const token = request.token === 'none' ? undefined : request.token === 'garbage' ? 'not.a.jwt' : tokens.get(request.token);
    const response = await t.app.inject({
      method: request.method as 'GET',
      url: request.url,
      headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...request.headers },
      ...(request.body !== undefined ? { payload: request.body } : {}),
    });
    stats.requests += 1;
    stats.byStatus.set(response.statusCode, (stats.byStatus.get(response.statusCode) ?? 0) + 1);
    if (response.statusCode >= 500) stats.serverErrors += 1;
    return { status: response.statusCode, headers: response.headers, body: response.body };
  }

  /** Throws (for fast-check to shrink and report) when the answer breaks the contract. */
  function judge(route: RouteEntry, request: FuzzRequest, answer: { status: number; headers: Record<string, unknown>; body: string }): void {
    const { status } = answer;
    if (status >= 500) throw new Error(`${status} (server error): ${answer.body.slice(0, 300)}`);
    const head = request.method === 'HEAD';
    if (status >= 400) {
      if (!/^application\/problem\+json/.test(String(answer.headers['content-type']))) throw new Error(`${status} with content-type ${String(answer.headers['content-type'])}`);
      if (head) return;
      const problem = JSON.parse(answer.body) as Record<string, unknown>;
      if (!problemValidator(problem)) throw new Error(`${status}: not a problem document: ${answer.body.slice(0, 300)}`);
      if (problem.status !== status || typeof problem.title !== 'string' || typeof problem.detail !== 'string' || problem.detail === '') throw new Error(`${status}: problem without status/title/detail: ${answer.body.slice(0, 300)}`);
      return;
    }
    if (status < 200 || status >= 300) throw new Error(`unexpected status ${status}`);
    // a success: only on the route itself (a path the router sent elsewhere is judged by that route's contract)
    const matched = routes.find((r) => r.method === request.method && matches(r.url, request.url)) ?? route;
    const validate = responseValidators.get(`${matched.method} ${matched.url} ${status}`);
    if (!validate) throw new Error(`${status} is not a documented answer of ${matched.method} ${matched.url}`);
    if (head) return;
    const contentType = String(answer.headers['content-type'] ?? '');
    const body: unknown = /json/.test(contentType) ? JSON.parse(answer.body) : answer.body;
    if (!validate(body)) throw new Error(`${status} body does not match the response schema (${ajvErrors(validate)}): ${answer.body.slice(0, 300)}`);
  }

  function ajvErrors(validate: ValidateFunction): string {
    return (validate.errors ?? []).map((e) => `${e.instancePath} ${e.message ?? ''}`).join('; ');
  }

  function matches(template: string, url: string): boolean {
    const path = url.split('?')[0]!;
    const pattern = new RegExp(`^${template.replace(/[.*+?^${}()|[\]\\]/g, '\\$&').replace(/:\w+/g, '[^/]+')}$`);
    return pattern.test(path);
  }

  /**
   * One property per route. The generated requests (fast-check, fixed seed) are sent CONCURRENCY
   * at a time (refusals wait for the audit log's group commit: one at a time would be slow); a
   * route with a failure is run again as a fast-check property, one request at a time, so the
   * reported counterexample is shrunk. Failures are collected, not thrown.
   */
  async function fuzz(kind: string, arbitraryOf: (route: RouteEntry) => fc.Arbitrary<FuzzRequest>, numRuns: number, options: { checkStored: boolean }): Promise<void> {
    for (const [index, route] of routes.entries()) {
      const before = options.checkStored ? await tableSnapshot(t.database.db) : undefined;
      let changedSomething = false;
      const seed = SEED + index;
      const requests = fc.sample(arbitraryOf(route), { numRuns, seed });
      let failed = false;
      for (let i = 0; i < requests.length; i += CONCURRENCY) {
        await Promise.all(
          requests.slice(i, i + CONCURRENCY).map(async (request) => {
            const answer = await send(request);
            if (answer.status < 400 && !['GET', 'HEAD'].includes(request.method)) changedSomething = true;
            try {
              judge(route, request, answer);
            } catch {
              failed = true;
            }
          }),
        );
      }
      if (failed) {
        const details = await fc.check(
          fc.asyncProperty(arbitraryOf(route), async (request) => judge(route, request, await send(request))),
          { numRuns, seed, markInterruptAsFailure: true },
        );
        const example = details.counterexample?.[0] as FuzzRequest | undefined;
        failures.push({
          route: `${route.method} ${route.url}`,
          kind,
          request: example ? `${example.method} ${example.url} [${example.why}] token=${example.token} headers=${JSON.stringify(example.headers)} body=${String(example.body ?? '').slice(0, 200)}` : 'n/a (did not fail again one at a time)',
          problem: details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance ?? 'concurrent run failed'),
        });
      }
      if (before) {
        if (changedSomething) stats.snapshotsSkipped += 1;
        else {
          stats.snapshotsCompared += 1;
          const after = await tableSnapshot(t.database.db);
          if (JSON.stringify(after) !== JSON.stringify(before)) {
            const changed = Object.keys(after).filter((table) => after[table] !== before[table]);
            failures.push({ route: `${route.method} ${route.url}`, kind, request: 'the batch', problem: `refused requests changed ${changed.join(', ')}` });
          }
        }
      }
    }
  }

  // ---- the arbitraries ----------------------------------------------------------------------

  const json = (value: unknown) => (value === undefined ? undefined : JSON.stringify(value));
  const tokenFor = (route: RouteEntry): TokenName => (route.config.public ? 'none' : route.config.scope === 'keystrata:rotate' ? 'rotate' : route.config.scope === 'keystrata:audit:read' ? 'audit' : route.config.scope === 'keystrata:keys:read' ? 'keysRead' : 'admin');
  const takesBody = (route: RouteEntry) => ['POST', 'PUT', 'PATCH', 'DELETE'].includes(route.method);

  function validParts(route: RouteEntry): { url: string; body: unknown; query: Record<string, unknown> } {
    const querySchema = schemaOf(route, 'querystring');
    const query = querySchema ? (sampleValid(querySchema, fixtures) as Record<string, unknown>) : {};
    const bodySchema = schemaOf(route, 'body');
    return { url: urlWithParams(route, fixtures), body: bodySchema ? sampleValid(bodySchema, fixtures) : takesBody(route) ? {} : undefined, query };
  }

  const withQuery = (url: string, query: Array<[string, string]>) => (query.length > 0 ? `${url}?${new URLSearchParams(query).toString()}` : url);

  function malformedRequest(route: RouteEntry): fc.Arbitrary<FuzzRequest> {
    const valid = validParts(route);
    const token = tokenFor(route);
    const jsonHeaders = { 'content-type': 'application/json' };
    const validQuery = Object.entries(valid.query).map(([k, v]): [string, string] => [k, String(v)]);
    const base = (why: string, over: Partial<FuzzRequest> = {}): FuzzRequest => ({
      method: route.method,
      url: withQuery(valid.url, validQuery),
      token,
      headers: valid.body !== undefined ? jsonHeaders : {},
      body: json(valid.body),
      why,
      ...over,
    });
    const options: Array<fc.Arbitrary<FuzzRequest>> = [];
    const bodySchema = schemaOf(route, 'body');
    if (takesBody(route)) {
      options.push(malformed(bodySchema, valid.body).map((b) => base('schema-derived malformed body', { body: json(b) ?? 'null' })));
      options.push(fc.constantFrom(...rawBodies(route)).map(([why, body, type]) => base(why, { body, headers: { 'content-type': type } })));
      options.push(fc.constantFrom(...CONTENT_TYPES).map((type) => base(`content-type ${type}`, { headers: { 'content-type': type } })));
      options.push(fc.constant(base('no body at all', { body: undefined, headers: {} })));
    } else {
      options.push(anyJson.map((b) => base('a body on a GET/HEAD', { body: JSON.stringify(b), headers: jsonHeaders })));
    }
    const params = [...route.url.matchAll(/:(\w+)/g)].map((m) => m[1]!);
    if (params.length > 0) {
      options.push(
        fc.record({ name: fc.constantFrom(...params), segment: pathSegment }).map(({ name, segment }) =>
          base(`hostile path parameter ${name}`, { url: withQuery(urlWithParams(route, fixtures, { [name]: segment }), validQuery) }),
        ),
      );
    }
    const querySchema = schemaOf(route, 'querystring');
    const queryNames = Object.keys((querySchema?.properties ?? {}) as object);
    options.push(
      fc
        .array(fc.tuple(fc.constantFrom(...queryNames, 'admin', '__proto__', 'limit', 'version', 'cursor', 'x'.repeat(300)), queryValue), { minLength: 1, maxLength: 4 })
        .map((pairs) => base('junk, duplicate or out-of-range query parameters', { url: withQuery(valid.url, [...validQuery, ...pairs]) })),
    );
    options.push(
      fc
        .record({
          header: fc.constantFrom('idempotency-key', 'x-request-id', 'authorization', 'content-length', 'accept', 'x-forwarded-for'),
          value: fc.constantFrom(...HOSTILE_STRINGS.filter((s) => !/[\r\n\u0000-\u001f\u007f-\uffff]/.test(s)), 'Bearer', 'Bearer ', 'Basic YWRtaW46YWRtaW4=', 'Bearer a.b.c', '-1', '99999999999', 'application/xml'),
        })
        .map(({ header, value }) => base(`hostile ${header} header`, { headers: { ...(valid.body !== undefined ? jsonHeaders : {}), [header]: value } })),
    );
    options.push(fc.constantFrom<TokenName>('admin', 'keysRead', 'rotate', 'audit', 'none', 'garbage').map((other) => base(`token ${other}`, { token: other })));
    return fc.oneof(...options);
  }

  /** Raw bodies no JSON serializer would write. */
  function rawBodies(route: RouteEntry): Array<[string, string | Buffer, string]> {
    const limit = route.bodyLimit ?? t.config.bodyLimitBytes;
    const j = 'application/json';
    return [
      ['invalid JSON', '{', j],
      ['invalid JSON (trailing comma)', '{"a":1,}', j],
      ['JSON null', 'null', j],
      ['JSON array', '[]', j],
      ['JSON string', '"x"', j],
      ['JSON number', '1e999999', j],
      ['duplicate keys', '{"id":"fz-dup","id":"fz-dup2","deviceType":"pump","region":"eu","groupId":"fz-g","groupId":"x","items":[],"items":[{"deviceId":"fz-d0"}]}', j],
      ['prototype pollution', '{"__proto__":{"admin":true,"scope":"keystrata:admin"},"constructor":{"prototype":{"polluted":true}}}', j],
      ['deep arrays (50,000)', `${'['.repeat(50_000)}${']'.repeat(50_000)}`, j],
      ['deep objects (20,000)', `${'{"a":'.repeat(20_000)}1${'}'.repeat(20_000)}`, j],
      ['deep JSON where the schema is open', `{"jwk":{"kty":"OKP","crv":"X25519","x":"3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08","ext":${'['.repeat(20_000)}${']'.repeat(20_000)}}}`, j],
      ['a huge array', JSON.stringify({ ids: Array.from({ length: 60_000 }, (_, i) => `d${i}`), items: [] }), j],
      ['huge numbers', '{"limit":1e400,"version":9007199254740993,"percentPerDay":-1e308,"waitDays":1.0000000000000002}', j],
      ['BOM then JSON', '\uFEFF{}', j],
      ['a raw NUL in a string', '{"id":"a\u0000b"}', j],
      ['escaped NUL and RTL override', '{"id":"a\\u0000b\\u202e","field":"x\\u0000"}', j],
      ['a lone surrogate escape', '{"id":"\\ud800","field":"\\udfff"}', j],
      ['invalid UTF-8 (overlong)', Buffer.from([0x7b, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0xc0, 0xae, 0xc0, 0xae, 0x22, 0x7d]), j],
      ['invalid UTF-8 (0xFF)', Buffer.from([0x7b, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0xff, 0xfe, 0x22, 0x7d]), j],
      ['UTF-16 JSON', Buffer.from('{"id":"x"}', 'utf16le'), 'application/json; charset=utf-16'],
      ['over the body limit', Buffer.alloc(limit + 1, 0x20), j],
      ['empty body with a JSON content type', '', j],
    ];
  }

  function randomRequest(route: RouteEntry): fc.Arbitrary<FuzzRequest> {
    const segments = route.url.split('/').filter((s) => s !== '');
    return fc
      .record({
        method: fc.constantFrom('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS', route.method),
        path: fc.tuple(...segments.map((s) => (s.startsWith(':') ? pathSegment : fc.oneof({ weight: 5, arbitrary: fc.constant(s) }, { weight: 1, arbitrary: pathSegment })))),
        extra: fc.array(pathSegment, { maxLength: 2 }),
        query: fc.array(fc.tuple(fc.string({ maxLength: 10 }), queryValue), { maxLength: 3 }),
        body: fc.option(anyJson, { nil: undefined }),
        type: fc.constantFrom('application/json', ...CONTENT_TYPES),
        token: fc.constantFrom<TokenName>('admin', 'admin', 'keysRead', 'rotate', 'audit', 'none', 'garbage'),
      })
      .map(({ method, path, extra, query, body, type, token }): FuzzRequest => ({
        method,
        url: withQuery(`/${[...path, ...extra].join('/')}`, query),
        token,
        headers: body !== undefined ? { 'content-type': type } : {},
        body: body !== undefined ? JSON.stringify(body) : undefined,
        why: 'random',
      }));
  }

  function validRequestArb(route: RouteEntry): fc.Arbitrary<FuzzRequest> {
    const params = [...route.url.matchAll(/:(\w+)/g)].map((m) => m[1]!);
    const paramsSchema = schemaOf(route, 'params');
    const querySchema = schemaOf(route, 'querystring');
    const bodySchema = schemaOf(route, 'body');
    const paramArbs = Object.fromEntries(params.map((name) => [name, arbitraryValid(((paramsSchema?.properties ?? {}) as Record<string, Schema>)[name], fixtures, name).map(String)]));
    return fc
      .record({
        params: fc.record(paramArbs),
        query: querySchema ? arbitraryValid(querySchema, fixtures) : fc.constant({}),
        body: bodySchema ? arbitraryValid(bodySchema, fixtures) : fc.constant(undefined),
        idempotencyKey: fc.option(fc.uuid(), { nil: undefined }),
      })
      .map(({ params: values, query, body, idempotencyKey }) => ({
        method: route.method,
        url: withQuery(
          urlWithParams(route, fixtures, Object.fromEntries(Object.entries(values).map(([k, v]) => [k, encodeURIComponent(v as string)]))),
          Object.entries(query as Record<string, unknown>).map(([k, v]): [string, string] => [k, String(v)]),
        ),
        token: tokenFor(route),
        headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...(idempotencyKey && route.method === 'POST' ? { 'idempotency-key': idempotencyKey } : {}) },
        body: body !== undefined ? JSON.stringify(body) : takesBody(route) && route.method !== 'DELETE' ? '{}' : undefined,
        why: 'schema-valid',
      }));
  }

  // ---- the properties -----------------------------------------------------------------------

  it('when every route gets schema-derived malformed requests, then each answer is a 4xx problem+json (or a documented success), never a 5xx, and the refused ones store nothing', async () => {
    await fuzz('malformed', malformedRequest, RUNS.malformed, { checkStored: true });
    expect(failures.filter((f) => f.kind === 'malformed')).toEqual([]);
  });

  it('when every route gets random requests (any method, path segments, query, body, content type, token), then each answer is a 4xx problem+json or a documented success, never a 5xx, and the refused ones store nothing', async () => {
    await fuzz('random', randomRequest, RUNS.random, { checkStored: true });
    expect(failures.filter((f) => f.kind === 'random')).toEqual([]);
  });

  it('when every route gets schema-valid requests with generated values, then each answer is a success matching the response schema or a 4xx problem+json, never a 5xx', async () => {
    await fuzz('valid', validRequestArb, RUNS.valid, { checkStored: false });
    expect(failures.filter((f) => f.kind === 'valid')).toEqual([]);
  });
});
