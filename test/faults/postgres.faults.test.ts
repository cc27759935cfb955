/**
 * PostgreSQL unreachable (issue 8, part 1b). The app reaches its database through a TCP proxy
 * of the test's own (the machine's PostgreSQL is never touched): `cut` kills every connection
 * and refuses new ones, as a restart does; `blackhole` holds connections open and forwards
 * nothing, as a network partition does. The test reads and checks the database directly.
 *
 * - Every route, with a valid request, while the database is away: 503 + Retry-After
 *   problem+json in bounded time (no 500, no hang), nothing stored; once back, everything works.
 * - A group rotation and a staggered rollout cut in the middle: the next cron runs finish them,
 *   every device moved exactly once, nothing lost.
 * Each case ends with every deliverable version delivered equal to the stored material
 * (unwrapped independently), and the audit chain verifying.
 */
import crypto from 'node:crypto';
import { sql, type Kysely } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from 'vitest';
import { createPostgresDatabase, type Database, type DB } from '../../src/db/database.js';
import type { RouteEntry } from '../../src/http/route-table.js';
import { withKekResilience } from '../../src/kek/circuit-breaker.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import { call } from '../support/flow.js';
import { validRequest, type Fixtures } from '../fuzz/schema.js';
import {
  createFaultFleet,
  createGroupWithDevices,
  expectAuditChainVerifies,
  expectEveryDeliverableVersionUnwraps,
  expectNoKeyLost,
  expectUnavailable,
  sleep,
  startTcpProxy,
  tableSnapshot,
  timedCall,
  until,
  type Answer,
  type FaultFleet,
  type TcpProxy,
} from './support.js';

const setup = inject('testDb');
/** pg's connectionTimeoutMillis (db/database.ts) is the longest a request may wait for a connection */
const CONNECT_TIMEOUT_MS = 5000;
/** DATABASE_QUERY_TIMEOUT_MS: the longest a query may wait for its answer */
const QUERY_TIMEOUT_MS = 2000;

describe.skipIf(setup.mode !== 'postgres')('PostgreSQL unreachable', () => {
  let proxy: TcpProxy;
  let f: FaultFleet;
  let direct: Database;
  let independent: KekProvider;
  const rootKey = crypto.randomBytes(32);
  let fixtures: Fixtures;
  let fresh = 0;

  beforeAll(async () => {
    const admin = new URL(setup.mode === 'postgres' ? setup.adminUrl : 'postgres://127.0.0.1:5432');
    proxy = await startTcpProxy({ host: admin.hostname, port: Number(admin.port || 5432) });
    f = await createFaultFleet({
      env: { DATABASE_QUERY_TIMEOUT_MS: String(QUERY_TIMEOUT_MS) },
      databaseUrl: (url) => proxy.urlFor(url),
      kek: async (database) =>
        withKekResilience(createLocalKekProvider({ db: database.db, rootKey, dataDir: '/nonexistent', keyName: 'keystrata-kek', logger: { warn() {} } }), {
          failureThreshold: 5,
          cooldownMs: 1000,
          retryAttempts: 2,
        }),
    });
    direct = createPostgresDatabase(f.t.database.url!, 3);
    independent = createLocalKekProvider({ db: direct.db, rootKey, dataDir: '/nonexistent', keyName: 'keystrata-kek', logger: { warn() {} } });
    await createGroupWithDevices(f, 'pg-a', 20, ['serial']);
    fixtures = { groupId: 'pg-a', deviceId: 'pg-a-d00000', field: 'serial', clientId: 'pg-other-client', rolloutId: `ro-${crypto.randomUUID()}`, version: 1, freshId: () => `pg-new-${++fresh}` };
  });
  afterEach(() => proxy.restore()); // a failed case must not leave the next one without a database
  afterAll(async () => {
    proxy?.restore();
    await f?.close();
    await direct?.close();
    await proxy?.close();
  });

  const db = (): Kysely<DB> => direct.db;

  /** One valid request per route (the docs' static files aside), with a token holding its scope. */
  async function everyRoute(): Promise<Array<{ route: RouteEntry; answer: Answer }>> {
    const out: Array<{ route: RouteEntry; answer: Answer }> = [];
    const routes = f.t.app.routeTable.filter((r) => !r.url.startsWith('/docs'));
    // ten at a time, as a busy service would see them
    for (let i = 0; i < routes.length; i += 10) {
      await Promise.all(
        routes.slice(i, i + 10).map(async (route) => {
          const request = validRequest(route, fixtures);
          const token = route.config.scope === 'keystrata:rotate' ? f.rotator : route.config.public ? undefined : f.admin;
          const started = performance.now();
          const response = await f.t.app.inject({
            method: request.method as 'GET',
            url: request.url,
            headers: token ? { authorization: `Bearer ${token}` } : {},
            ...(request.payload !== undefined ? { payload: request.payload as object } : {}),
          });
          const raw = response.body;
          let body: Record<string, unknown> = {};
          try {
            body = raw ? (JSON.parse(raw) as Record<string, unknown>) : {};
          } catch {
            // /metrics is text
          }
          out.push({ route, answer: { status: response.statusCode, body, headers: response.headers, raw, ms: performance.now() - started } });
        }),
      );
    }
    return out;
  }

  function expectRefusedWhileDown(answers: Array<{ route: RouteEntry; answer: Answer }>, withinMs: number): void {
    for (const { route, answer } of answers) {
      const what = `${route.method} ${route.url}`;
      expect(answer.status, `${what}: never a 500`).not.toBe(500);
      if (route.url === '/healthz') expect(answer.status, what).toBe(200);
      else if (route.url === '/readyz') {
        expect(answer.status, what).toBe(503);
        expect(answer.headers['retry-after'], what).toBe('5');
      } else if (route.url === '/metrics') expect(answer.status, what).toBe(200); // metrics outlive the database (the chain length keeps its last value)
      else if (route.method === 'HEAD') {
        expect(answer.status, what).toBe(503);
        expect(answer.headers['retry-after'], what).toMatch(/^[1-9]\d*$/);
      } else expectUnavailable(answer, { withinMs });
    }
  }

  async function expectIntact(before: Map<string, { key: Buffer }>): Promise<Map<string, { key: Buffer; state: string }>> {
    const after = await expectEveryDeliverableVersionUnwraps(f, db(), independent);
    expectNoKeyLost(before, after);
    await expectAuditChainVerifies(f);
    return after;
  }

  async function back(): Promise<void> {
    proxy.restore();
    // ready again: the pool reconnects on its own, the KEK circuit (local provider: its state is in the database) closes
    await until(async () => (await call(f.t.app, undefined, 'GET', '/readyz')).status === 200, 15_000, 100);
  }

  it('when PostgreSQL goes away (connections killed, new ones refused), then every route answers a bounded 503 + Retry-After, stores nothing, and works again once it is back', async () => {
    const before = await expectEveryDeliverableVersionUnwraps(f, db(), independent);
    const snapshot = await tableSnapshot(db());
    const events = await auditLength();

    proxy.cut();
    const started = performance.now();
    const answers = await everyRoute();
    const took = performance.now() - started;
    expectRefusedWhileDown(answers, CONNECT_TIMEOUT_MS + 1000);
    const refused = answers.filter((a) => a.answer.status === 503);
    console.info(
      `postgres cut: ${answers.length} routes, ${refused.length} × 503 + Retry-After (slowest ${Math.round(Math.max(...refused.map((a) => a.answer.ms)))} ms), 0 × 500, in ${Math.round(took)} ms; ` +
        `/metrics ${answers.find((a) => a.route.url === '/metrics' && a.route.method === 'GET')!.answer.status}`,
    );

    await back();
    expect(await tableSnapshot(db())).toEqual(snapshot);
    expect(await auditLength()).toBe(events); // not even an audit event: nothing reached the database
    // every route works again (the same batch, now answered for real: never a 5xx)
    for (const { route, answer } of await everyRoute()) expect(answer.status, `${route.method} ${route.url}: ${answer.raw.slice(0, 200)}`).toBeLessThan(500);
    await expectIntact(before);
  });

  it('when the network to PostgreSQL is partitioned (nothing answers, nothing is refused), then requests still end in a bounded 503 + Retry-After, and the service recovers', async () => {
    // warm the pool: idle connections exist when the partition starts
    await Promise.all(Array.from({ length: 5 }, () => call(f.t.app, f.admin, 'GET', '/v1/groups/pg-a')));
    const before = await expectEveryDeliverableVersionUnwraps(f, db(), independent);
    const snapshot = await tableSnapshot(db());

    proxy.blackhole();
    const answers = await Promise.all([
      timedCall(f, f.admin, 'GET', '/v1/groups/pg-a'),
      timedCall(f, f.admin, 'GET', '/v1/devices/pg-a-d00001'),
      timedCall(f, f.admin, 'POST', '/v1/groups', { id: 'pg-partitioned', deviceType: 'pump', region: 'eu' }),
      timedCall(f, f.admin, 'GET', '/v1/devices/pg-a-d00002/keys'),
      timedCall(f, f.admin, 'POST', '/v1/groups/pg-a/devices', { id: 'pg-partitioned-dev' }),
      timedCall(f, f.rotator, 'POST', '/v1/rotation/run', {}),
    ]);
    // a query on a pooled connection waits out its deadline, a new connection its connect timeout; a transaction may meet both
    for (const answer of answers) expectUnavailable(answer, { withinMs: QUERY_TIMEOUT_MS + 2 * CONNECT_TIMEOUT_MS });
    console.info(`postgres partition: ${answers.length} requests → 503 + Retry-After, slowest ${Math.round(Math.max(...answers.map((a) => a.ms)))} ms`);

    await back();
    expect(await tableSnapshot(db())).toEqual(snapshot);
    await expectIntact(before);
  });

  it('when PostgreSQL restarts in the middle of a group rotation, then the request is a 503, and cron finishes it: every device moved to the new group version exactly once, nothing lost', async () => {
    const ids = await createGroupWithDevices(f, 'pg-rot', 6000, ['serial']);
    const before = await expectEveryDeliverableVersionUnwraps(f, db(), independent);

    const pending = timedCall(f, f.admin, 'POST', '/v1/groups/pg-rot/rotate', {});
    await until(async () => (await movedTo(2)) > 0, 30_000, 2);
    proxy.cut();
    const answer = await pending;
    const movedAtCut = await movedTo(2);
    expect(movedAtCut).toBeLessThan(ids.length); // cut in the middle
    expectUnavailable(answer, { withinMs: CONNECT_TIMEOUT_MS + 1000 });
    await sleep(300);

    await back();
    // what was committed stays; the cron entry resumes from the rows
    expect(await movedTo(2)).toBe(movedAtCut);
    const run = await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', {});
    expect(run.status, run.raw).toBe(200);
    expect(run.body.errors).toEqual([]);
    expect(await movedTo(2)).toBe(ids.length);
    // exactly once: one success event per device version, none failed
    const rewraps = await sql<{ key_id: string; n: number; failed: number }>`
      select key_id, count(*)::int as n, count(*) filter (where outcome <> 'success')::int as failed
      from audit_events where action = 'device.group_rewrap' and key_id like 'device:pg-rot-%' group by key_id`.execute(db());
    expect(rewraps.rows).toHaveLength(ids.length);
    expect(rewraps.rows.every((r) => r.n === 1 && r.failed === 0)).toBe(true);
    console.info(`postgres cut during a group rotation of ${ids.length} devices: ${movedAtCut} moved before the cut, the rest by cron; each moved once`);
    await expectIntact(before);
  });

  it('when PostgreSQL restarts in the middle of a rollout wave, then cron finishes the wave: every device rotated exactly once, nothing lost', async () => {
    const ids = await createGroupWithDevices(f, 'pg-roll', 6000);
    const before = await expectEveryDeliverableVersionUnwraps(f, db(), independent);
    const started = await call(f.t.app, f.admin, 'POST', '/v1/rollouts', { groupId: 'pg-roll', level: 'device', percentPerDay: 100 });
    expect(started.status, started.raw).toBe(201);
    const rolloutId = started.body.id as string;

    const pending = timedCall(f, f.rotator, 'POST', '/v1/rotation/run', {});
    await until(async () => (await rolled(rolloutId)) > 0, 30_000, 2);
    proxy.cut();
    const answer = await pending;
    const doneAtCut = await rolled(rolloutId);
    expect(doneAtCut).toBeLessThan(ids.length);
    // the run answers 503, or 200 listing the failed step: never a 500, never a hang
    expect([200, 503], answer.raw).toContain(answer.status);
    expect(answer.ms).toBeLessThan(CONNECT_TIMEOUT_MS + 1000);
    if (answer.status === 503) expectUnavailable(answer, { withinMs: CONNECT_TIMEOUT_MS + 1000 });
    else expect((answer.body.errors as unknown[]).length).toBeGreaterThan(0);
    await sleep(300);

    await back();
    for (let i = 0; i < 5 && (await rolled(rolloutId)) < ids.length; i++) {
      const run = await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', {});
      expect(run.status, run.raw).toBe(200);
    }
    expect(await rolled(rolloutId)).toBe(ids.length);
    const versions = await sql<{ device_id: string; states: string }>`
      select v.device_id, string_agg(v.version || ':' || v.state, ',' order by v.version) as states
      from device_versions v join devices d on d.id = v.device_id where d.group_id = 'pg-roll' group by v.device_id`.execute(db());
    expect(versions.rows).toHaveLength(ids.length);
    expect(versions.rows.filter((r) => r.states !== '1:grace,2:primary')).toEqual([]);
    const rotations = await sql<{ n: number; devices: number }>`
      select count(*)::int as n, count(distinct key_id)::int as devices from audit_events
      where action = 'device.rotate' and outcome = 'success' and key_id like 'device:pg-roll-%'`.execute(db());
    expect(rotations.rows[0]).toEqual({ n: ids.length, devices: ids.length });
    const outbox = await sql<{ n: number }>`select count(*)::int as n from key_outbox where kind = 'device' and version = 2 and device_id like 'pg-roll-%'`.execute(db());
    expect(outbox.rows[0]!.n).toBe(ids.length);
    console.info(`postgres cut during a rollout wave of ${ids.length} devices: ${doneAtCut} rotated before the cut, the rest by cron; each rotated once`);
    await expectIntact(before);
  });

  async function auditLength(): Promise<number> {
    const { rows } = await sql<{ n: number }>`select count(*)::int as n from audit_events`.execute(db());
    return rows[0]!.n;
  }

  async function movedTo(groupVersion: number): Promise<number> {
    const { rows } = await sql<{ n: number }>`
      select count(*)::int as n from device_versions v join devices d on d.id = v.device_id
      where d.group_id = 'pg-rot' and v.parent_version = ${groupVersion}`.execute(db());
    return rows[0]!.n;
  }

  async function rolled(rolloutId: string): Promise<number> {
    const { rows } = await sql<{ n: number }>`select count(*)::int as n from rollout_items where rollout_id = ${rolloutId} and status = 'done'`.execute(db());
    return rows[0]!.n;
  }
});
