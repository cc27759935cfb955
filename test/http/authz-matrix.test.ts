/**
 * The authorization matrix (issue 8, part 3), generated from the route table (app.routeTable,
 * filled by an onRoute hook): every route, present and future, × every caller (no token, a
 * token with no scope, each scope) × a resource of the caller's own group and of another
 * group. The expectation comes from the route's config alone:
 *
 * - public (config.public, /docs): answered for everyone;
 * - no `scope` and not public: refused for everyone, admins included (deny by default);
 * - no token → 401; a token without the scope (admin implies every scope) → 403, and nothing
 *   changes in the database;
 * - with the scope: never 401/403 and never a 5xx; reads (GET/HEAD, read-only POSTs) of the
 *   fixtures' resources succeed (2xx), except that a keys:read token reaches only the groups
 *   of its `keystrata_groups` claim (another group's device is a 404, or `missing` in a bulk
 *   fetch). Routes naming ids the fixtures do not create (a rollout id) may answer 4xx.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hasScope, type Principal, type Scope } from '../../src/auth/principal.js';
import type { RouteEntry } from '../../src/http/route-table.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { newDeliveryKeyPair } from '../support/flow.js';

const OWN = { group: 'm-own', device: 'm-own-dev', client: 'matrix-reader' };
const OTHER = { group: 'm-other', device: 'm-other-dev', client: 'matrix-other-client' };
type Target = typeof OWN;
const FIELD = 'patient_id';

const CALLERS = [
  { name: 'no token', scopes: undefined },
  { name: 'no scope', scopes: [] },
  { name: 'admin', scopes: ['keystrata:admin'] },
  { name: 'keys:read', scopes: ['keystrata:keys:read'] },
  { name: 'rotate', scopes: ['keystrata:rotate'] },
  { name: 'audit:read', scopes: ['keystrata:audit:read'] },
] as const satisfies ReadonlyArray<{ name: string; scopes: Scope[] | undefined }>;
type Caller = (typeof CALLERS)[number];

type Method = 'GET' | 'HEAD' | 'POST' | 'PUT' | 'DELETE' | 'PATCH';
interface Case {
  route: RouteEntry;
  caller: Caller;
  target: 'own' | 'other';
  expected: 'public' | 'unauthenticated' | 'forbidden' | 'read' | 'change';
}

describe('authorization matrix (every route × every scope × own/other group)', () => {
  let t: TestApp;
  const tokens = new Map<string, string>();
  let newIds = 0;

  beforeAll(async () => {
    t = await createTestApp({
      plugins: [
        // a route someone forgot to give a scope: deny by default must refuse it
        async (app) => {
          app.get('/v1/matrix/unscoped', { schema: { response: { 200: { type: 'object' } } } }, async () => ({ leaked: true }));
          app.post('/v1/matrix/unscoped', { schema: { response: { 200: { type: 'object' } } } }, async () => ({ leaked: true }));
        },
      ],
    });
    const admin = await t.token('keystrata:admin', { sub: 'matrix-setup' });
    const setup = async (method: Method, url: string, payload?: unknown) => {
      const response = await t.app.inject({ method, url, headers: { authorization: `Bearer ${admin}` }, ...(payload ? { payload: payload as object } : {}) });
      expect(response.statusCode, `${method} ${url}: ${response.body}`).toBeLessThan(300);
    };
    for (const target of [OWN, OTHER]) {
      await setup('POST', '/v1/groups', { id: target.group, deviceType: 'pump', region: 'eu' });
      await setup('POST', `/v1/groups/${target.group}/devices`, { id: target.device });
      await setup('POST', `/v1/devices/${target.device}/fields`, { field: FIELD });
    }
    for (const client of [OWN.client, OTHER.client, 'matrix-admin']) {
      await setup('PUT', `/v1/clients/${client}/delivery-key`, { jwk: (await newDeliveryKeyPair()).publicJwk });
    }
    for (const caller of CALLERS) {
      if (caller.scopes === undefined) continue;
      const sub = caller.name === 'keys:read' ? OWN.client : `matrix-${caller.name.replace(/\W/g, '-')}`;
      tokens.set(caller.name, await t.token([...caller.scopes], { sub, groups: [OWN.group] }));
    }
  });
  afterAll(async () => t?.close());

  const isPublic = (route: RouteEntry) => route.config.public === true || route.url.startsWith('/docs');
  const isRead = (route: RouteEntry) => route.method === 'GET' || route.method === 'HEAD' || (route.method === 'POST' && route.config.idempotent === false);

  function expectation(route: RouteEntry, caller: Caller): Case['expected'] {
    if (isPublic(route)) return 'public';
    if (caller.scopes === undefined) return 'unauthenticated';
    const principal: Principal = { sub: 'x', scopes: new Set(caller.scopes), groups: new Set() };
    if (route.config.scope === undefined || !hasScope(principal, route.config.scope)) return 'forbidden';
    return isRead(route) ? 'read' : 'change';
  }

  function cases(): Case[] {
    const all: Case[] = [];
    for (const route of t.app.routeTable) {
      for (const caller of CALLERS) {
        for (const target of ['own', 'other'] as const) all.push({ route, caller, target, expected: expectation(route, caller) });
      }
    }
    return all;
  }

  const FIXTURE_PARAMS = new Set(['groupId', 'deviceId', 'clientId', 'field', 'version']);
  /** Do the fixtures above hold what this route's path names? (Otherwise its reads may well be 404s.) */
  const fixturesCover = (route: RouteEntry) => [...route.url.matchAll(/:(\w+)/g)].every((m) => FIXTURE_PARAMS.has(m[1]!));

  /** Path parameters from their names: the target's group/device/client, an existing field and version. */
  function urlOf(route: RouteEntry, target: Target): string {
    return route.url
      .replace(/:(\w+)/g, (_m, name: string) => {
        switch (name) {
          case 'groupId':
            return target.group;
          case 'deviceId':
            return target.device;
          case 'clientId':
            return target.client;
          case 'field':
            return FIELD;
          case 'version':
            return '1';
          default:
            return `m-${name}`;
        }
      })
      .replace(/\*$/, 'swagger-ui.css');
  }

  /** A small valid-looking body from the route's schema; ids point at the target, new ids are fresh. */
  function bodyOf(schema: unknown, target: Target, name = ''): unknown {
    const s = (schema ?? {}) as Record<string, unknown>;
    if (s.type === 'string') {
      if (name === 'deviceId') return target.device;
      if (name === 'groupId') return target.group;
      if (name === 'field') return FIELD;
      if (name === 'id') return `m-new-${++newIds}`;
    }
    if (Array.isArray(s.examples) && s.examples.length > 0) return s.examples[0];
    if ('default' in s) return s.default;
    if ('const' in s) return s.const;
    const union = (s.anyOf ?? s.oneOf) as unknown[] | undefined;
    if (union?.length) return bodyOf(union[0], target, name);
    switch (s.type) {
      case 'object': {
        const properties = (s.properties ?? {}) as Record<string, unknown>;
        const required = (s.required ?? []) as string[];
        return Object.fromEntries(required.map((key) => [key, bodyOf(properties[key], target, key)]));
      }
      case 'array':
        return [bodyOf(s.items, target, name === 'ids' ? 'id' : name)];
      case 'integer':
      case 'number':
        return typeof s.minimum === 'number' ? s.minimum : 1;
      case 'boolean':
        return false;
      case 'string':
        if (s.format === 'date-time') return new Date().toISOString();
        return 'x';
      default:
        return undefined;
    }
  }

  async function run(c: Case) {
    const target = c.target === 'own' ? OWN : OTHER;
    const token = tokens.get(c.caller.name);
    const bodySchema = c.route.schema?.body;
    const payload = bodySchema ? bodyOf(bodySchema, target) : undefined;
    const response = await t.app.inject({
      method: c.route.method as Method,
      url: urlOf(c.route, target),
      headers: token ? { authorization: `Bearer ${token}` } : {},
      ...(payload !== undefined ? { payload: payload as object } : {}),
    });
    const label = `${c.route.method} ${c.route.url} as ${c.caller.name} on ${c.target} group → ${response.statusCode} ${response.body.slice(0, 200)}`;
    return { response, label };
  }

  async function snapshot(): Promise<string> {
    const tables = ['key_groups', 'group_versions', 'devices', 'device_versions', 'field_keys', 'field_versions', 'clients', 'idempotency_keys'];
    const parts: string[] = [];
    for (const table of tables) {
      const { rows } = await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)}`.execute(t.database.db);
      parts.push(`${table}=${rows[0]!.n}`);
    }
    const { rows } = await sql<{ s: string }>`select coalesce(string_agg(device_id || ':' || version || ':' || state, ',' order by device_id, version), '') as s from device_versions`.execute(t.database.db);
    return `${parts.join(' ')} ${rows[0]!.s}`;
  }

  let total = 0;
  const changeStatuses: Record<number, number> = {};

  it('covers every route, including ones with no scope', () => {
    const urls = new Set(t.app.routeTable.map((r) => `${r.method} ${r.url}`));
    for (const known of ['POST /v1/groups', 'GET /v1/devices/:deviceId/keys', 'POST /v1/keys/fetch', 'GET /v1/audit/events', 'GET /healthz', 'GET /v1/matrix/unscoped']) {
      expect(urls).toContain(known);
    }
    expect(t.app.routeTable.length).toBeGreaterThanOrEqual(50);
  });

  it('when a caller has no token or lacks the scope, then 401/403 problem+json on every route, and nothing changes', async () => {
    const before = await snapshot();
    const refused = cases().filter((c) => c.expected === 'unauthenticated' || c.expected === 'forbidden');
    for (const c of refused) {
      const { response, label } = await run(c);
      expect(response.statusCode, label).toBe(c.expected === 'unauthenticated' ? 401 : 403);
      if (c.route.method !== 'HEAD') {
        expect(response.headers['content-type'], label).toMatch(/^application\/problem\+json/);
        expect(response.json().code, label).toBe(c.expected === 'unauthenticated' ? 'unauthorized' : 'insufficient_scope');
      }
      if (c.route.url === '/v1/matrix/unscoped') expect(response.body).not.toContain('leaked');
    }
    expect(await snapshot()).toBe(before);
    total += refused.length;
    // deny by default reached the admin too
    expect(refused.some((c) => c.route.url === '/v1/matrix/unscoped' && c.caller.name === 'admin')).toBe(true);
  });

  it('when the route is public, then everyone is answered, token or not', async () => {
    const open = cases().filter((c) => c.expected === 'public');
    for (const c of open) {
      const { response, label } = await run(c);
      expect(response.statusCode, label).toBeLessThan(400);
    }
    total += open.length;
  });

  it('when a caller has the scope and reads, then 2xx, except another group for keys:read (404, or `missing` in bulk)', async () => {
    const reads = cases().filter((c) => c.expected === 'read');
    for (const c of reads) {
      const { response, label } = await run(c);
      const groupBound = c.route.config.scope === 'keystrata:keys:read' && c.caller.name === 'keys:read' && c.target === 'other';
      if (groupBound && c.route.method !== 'POST') {
        expect(response.statusCode, label).toBe(404);
        continue;
      }
      if (!fixturesCover(c.route)) {
        // a resource this matrix did not create (a rollout id, say): authorized, so never 401/403/5xx
        expect([401, 403], label).not.toContain(response.statusCode);
        expect(response.statusCode, label).toBeLessThan(500);
        continue;
      }
      expect(response.statusCode, label).toBeGreaterThanOrEqual(200);
      expect(response.statusCode, label).toBeLessThan(300);
      if (c.route.url === '/v1/keys/fetch') {
        const missing = (response.json() as { missing: unknown[] }).missing;
        expect(missing, label).toEqual(groupBound ? [{ deviceId: OTHER.device, reason: 'not_found' }] : []);
      }
    }
    total += reads.length;
  });

  it('when a caller has the scope and changes something, then never 401/403 and never 5xx (a 4xx is a problem+json)', async () => {
    // DELETE (crypto-shred) last, so that it does not turn the other changes into 409s
    const changes = cases()
      .filter((c) => c.expected === 'change')
      .sort((a, b) => Number(a.route.method === 'DELETE') - Number(b.route.method === 'DELETE'));
    for (const c of changes) {
      const { response, label } = await run(c);
      expect([401, 403], label).not.toContain(response.statusCode);
      expect(response.statusCode, label).toBeLessThan(500);
      if (response.statusCode >= 400) expect(response.headers['content-type'], label).toMatch(/^application\/problem\+json/);
      changeStatuses[response.statusCode] = (changeStatuses[response.statusCode] ?? 0) + 1;
    }
    total += changes.length;
    expect(changes.length).toBeGreaterThan(0);
  });

  afterAll(() => {
    console.info(
      `authorization matrix: ${total} cases over ${t.app.routeTable.length} routes × ${CALLERS.length} callers × 2 groups; ` +
        `statuses of the authorized changes: ${JSON.stringify(changeStatuses)}`,
    );
  });
});
