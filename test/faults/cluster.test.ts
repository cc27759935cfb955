/**
 * KEYSTRATA_WORKERS (issue 7): the real server (`node --import tsx src/server.ts`) as a
 * node:cluster primary with two workers on this file's database. Both workers serve key
 * fetches (each delivered key equals the stored material, unwrapped independently), a worker
 * killed with SIGKILL is replaced while the other keeps serving, the audit chain written by both
 * verifies, and SIGTERM to the primary stops every process cleanly. Workers whose requests cannot
 * finish kill themselves at SHUTDOWN_TIMEOUT_MS, or at once on a second signal, and the primary
 * exits with 1 saying so. PGlite refuses more than one worker at configuration time.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { CryptoKey } from 'jose';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { loadOrCreateDevIssuer } from '../../src/auth/dev-issuer.js';
import { ConfigError, loadConfig } from '../../src/config.js';
import { createPostgresDatabase, type Database } from '../../src/db/database.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';
import { decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';
import { freePort, storedMaterial, until } from './support.js';

const setup = inject('testDb');

/** Live worker processes of a pid: children running src/server.ts (tsx's esbuild service is a child too), from /proc. */
function childrenOf(pid: number): number[] {
  const children: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) !== pid || fields[0] === 'Z') continue;
      // by command line: the thread name in `stat` is "node" on Node 20 but "MainThread" on Node 24
      if (fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes('src/server.ts')) children.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return children;
}

function cpuTicks(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/** The real server as a cluster primary with two workers; resolves once both listen. */
async function startPrimary(options: { databaseUrl: string; dataDir: string; rootKey: Buffer; port: number; output: string[]; env?: Record<string, string> }): Promise<{ primary: ChildProcess; exited: Promise<number | null> }> {
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: process.env.HOME ?? os.tmpdir(),
    DATABASE_URL: options.databaseUrl,
    KEYSTRATA_DATA_DIR: options.dataDir,
    KEYSTRATA_ROOT_KEY: options.rootKey.toString('base64'),
    KEYSTRATA_WORKERS: '2',
    PORT: String(options.port),
    HOST: '127.0.0.1',
    LOG_LEVEL: 'info',
    ...options.env,
  };
  const primary = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], { cwd: process.cwd(), env, stdio: ['ignore', 'pipe', 'pipe'] });
  primary.stdout!.on('data', (chunk: Buffer) => options.output.push(chunk.toString('utf8')));
  primary.stderr!.on('data', (chunk: Buffer) => options.output.push(chunk.toString('utf8')));
  const exited = new Promise<number | null>((resolve) => primary.on('exit', (code) => resolve(code)));
  await until(async () => {
    if (primary.exitCode !== null) throw new Error(`the server exited: ${options.output.join('')}`);
    return childrenOf(primary.pid!).length === 2 && options.output.join('').split('keystrata is listening').length === 3;
  }, 90_000, 100);
  return { primary, exited };
}

function killPrimaryAndWorkers(primary: ChildProcess | undefined): void {
  if (primary && primary.exitCode === null && primary.signalCode === null) {
    const workers = childrenOf(primary.pid!);
    primary.kill('SIGKILL');
    for (const pid of workers) process.kill(pid, 'SIGKILL');
  }
}

describe('KEYSTRATA_WORKERS configuration', () => {
  it('when more than one worker is asked for without DATABASE_URL, then the configuration is refused with the reason', () => {
    expect(() => loadConfig({ KEYSTRATA_WORKERS: '2' })).toThrow(ConfigError);
    expect(() => loadConfig({ KEYSTRATA_WORKERS: '2' })).toThrow(/KEYSTRATA_WORKERS above 1 needs DATABASE_URL/);
    expect(() => loadConfig({ KEYSTRATA_WORKERS: '0', DATABASE_URL: 'postgres://x@127.0.0.1/db' })).toThrow(/KEYSTRATA_WORKERS must be an integer from 1 to 64/);
    expect(loadConfig({ KEYSTRATA_WORKERS: '2', DATABASE_URL: 'postgres://x@127.0.0.1/db' }).workers).toBe(2);
  });
});

describe.skipIf(setup.mode !== 'postgres')('the server with KEYSTRATA_WORKERS=2', () => {
  let target: TestDatabase;
  let direct: Database;
  let dataDir: string;
  let port: number;
  let primary: ChildProcess;
  let exited: Promise<number | null>;
  const output: string[] = [];
  let admin: string;
  let backend: { privateKey: CryptoKey };
  let independent: KekProvider;
  const rootKey = crypto.randomBytes(32);
  const devices = Array.from({ length: 200 }, (_, i) => `cl-d${i}`);

  async function api(token: string, method: string, url: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown>; raw: string }> {
    const response = await fetch(`http://127.0.0.1:${port}${url}`, {
      method,
      headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
    const raw = await response.text();
    return { status: response.status, body: raw ? (JSON.parse(raw) as Record<string, unknown>) : {}, raw };
  }

  /** Fetch every device's keys (20 at a time) and check each key against the stored material. */
  async function fetchAllAndCheck(): Promise<void> {
    const stored = await storedMaterial(direct.db, independent);
    for (let i = 0; i < devices.length; i += 20) {
      await Promise.all(
        devices.slice(i, i + 20).map(async (id) => {
          const answer = await api(admin, 'GET', `/v1/devices/${id}/keys`);
          expect(answer.status, answer.raw).toBe(200);
          const keys = await decryptKeySet(answer.body.jwe as string, backend.privateKey);
          expect(keys.length).toBe(1);
          expect(Buffer.from(keys[0]!.k, 'base64url').equals(stored.get(keys[0]!.kid)!.key)).toBe(true);
        }),
      );
    }
  }

  beforeAll(async () => {
    target = await createTestDatabase();
    direct = createPostgresDatabase(target.url!, 3);
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-cluster-'));
    port = await freePort();
    ({ primary, exited } = await startPrimary({ databaseUrl: target.url!, dataDir, rootKey, port, output }));
    const issuer = await loadOrCreateDevIssuer(dataDir);
    admin = await issuer.mintToken({ sub: 'cluster-admin', scopes: ['keystrata:admin'], groups: [], ttlSeconds: 3600, issuer: 'keystrata-dev', audience: 'keystrata' });
    const pair = await newDeliveryKeyPair('X25519');
    backend = { privateKey: pair.privateKey };
    expect((await api(admin, 'PUT', '/v1/clients/cluster-admin/delivery-key', { jwk: pair.publicJwk })).status).toBe(200);
    expect((await api(admin, 'POST', '/v1/groups', { id: 'cl', deviceType: 'pump', region: 'eu' })).status).toBe(201);
    expect((await api(admin, 'POST', '/v1/groups/cl/devices/bulk', { ids: devices })).status).toBe(201);
    independent = createLocalKekProvider({ db: direct.db, rootKey, dataDir: '/nonexistent', keyName: 'keystrata-kek', logger: { warn() {} } });
  }, 180_000);

  afterAll(async () => {
    killPrimaryAndWorkers(primary);
    await direct?.close();
    await target?.close();
    if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('when keys are fetched, then both workers serve them and every delivered key equals the stored material', async () => {
    const workers = childrenOf(primary.pid!);
    expect(workers).toHaveLength(2);
    const before = workers.map(cpuTicks);
    await fetchAllAndCheck();
    await fetchAllAndCheck();
    // the primary hands connections to the workers in turn: each did a real share of the work
    const spent = workers.map((pid, i) => cpuTicks(pid) - before[i]!);
    const total = spent.reduce((a, b) => a + b, 0);
    expect(spent.every((ticks) => ticks >= total * 0.2), `CPU ticks per worker: ${spent.join(', ')}`).toBe(true);
  }, 120_000);

  it('when a worker is SIGKILLed, then requests keep being answered and the primary starts a replacement', async () => {
    const [victim, survivor] = childrenOf(primary.pid!);
    process.kill(victim!, 'SIGKILL');
    await until(async () => {
      const now = childrenOf(primary.pid!);
      return now.length === 2 && !now.includes(victim!) && now.includes(survivor!);
    }, 60_000, 100);
    await until(async () => (await fetch(`http://127.0.0.1:${port}/readyz`).catch(() => undefined))?.status === 200, 30_000, 100);
    await fetchAllAndCheck();
    expect(output.join('')).toContain('worker exited');
  }, 120_000);

  it('when both workers wrote audit events, then the chain verifies', async () => {
    const verified = await api(admin, 'POST', '/v1/audit/verify', {});
    expect(verified.status, verified.raw).toBe(200);
    expect(verified.body).toMatchObject({ ok: true });
    expect(verified.body.checked as number).toBeGreaterThan(2 * 2 * devices.length);
  }, 60_000);

  it('when the primary gets SIGTERM, then every worker stops and the primary exits with 0', async () => {
    const workers = childrenOf(primary.pid!);
    primary.kill('SIGTERM');
    expect(await exited).toBe(0);
    for (const pid of workers) expect(fs.existsSync(`/proc/${pid}`) && fs.readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z')).toBe(false);
  }, 60_000);
});

describe.skipIf(setup.mode !== 'postgres')('the server with KEYSTRATA_WORKERS=2, when requests hold up its shutdown', () => {
  let target: TestDatabase;
  let locker: pg.Client | undefined;
  const dataDirs: string[] = [];
  const primaries: ChildProcess[] = [];
  // one root key for the database: the server refuses to start with another one than its KEK's
  const rootKey = crypto.randomBytes(32);

  beforeAll(async () => {
    target = await createTestDatabase();
  }, 60_000);

  afterAll(async () => {
    for (const primary of primaries) killPrimaryAndWorkers(primary);
    await locker?.end().catch(() => undefined);
    await target?.close();
    for (const dir of dataDirs) fs.rmSync(dir, { recursive: true, force: true });
  });

  /**
   * A cluster whose workers each hold in-flight requests that cannot finish: a transaction of the
   * test's own holds an exclusive lock on key_groups, and every worker is listing groups. Closing
   * waits for in-flight requests, so neither worker can finish its shutdown on its own.
   */
  async function startStuckCluster(env: Record<string, string>): Promise<{ primary: ChildProcess; exited: Promise<number | null>; output: string[] }> {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-cluster-'));
    dataDirs.push(dataDir);
    const output: string[] = [];
    const port = await freePort();
    // the lock of the test before, released: start-up reads key_groups too
    await locker?.end();
    locker = undefined;
    const started = await startPrimary({ databaseUrl: target.url!, dataDir, rootKey, port, output, env });
    primaries.push(started.primary);
    const issuer = await loadOrCreateDevIssuer(dataDir);
    const admin = await issuer.mintToken({ sub: 'cluster-admin', scopes: ['keystrata:admin'], groups: [], ttlSeconds: 3600, issuer: 'keystrata-dev', audience: 'keystrata' });
    locker = new pg.Client({ connectionString: target.url! });
    await locker.connect();
    await locker.query('BEGIN');
    await locker.query('LOCK TABLE key_groups IN ACCESS EXCLUSIVE MODE');
    // new connections go to the workers in turn: eight of them reach both
    for (let i = 0; i < 8; i++) {
      void fetch(`http://127.0.0.1:${port}/v1/groups`, { headers: { authorization: `Bearer ${admin}`, connection: 'close' } }).catch(() => undefined);
    }
    await until(async () => {
      const waiting = await locker!.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = 'key_groups'::regclass`);
      return waiting.rows[0]!.n >= 2;
    }, 30_000, 50);
    return { ...started, output };
  }

  const count = (log: string, text: string) => log.split(text).length - 1;

  it('when SIGTERM finds the workers unable to finish within SHUTDOWN_TIMEOUT_MS, then each kills itself at the deadline and the primary reports it and exits with 1', async () => {
    const { primary, exited, output } = await startStuckCluster({ SHUTDOWN_TIMEOUT_MS: '1000' });
    const workers = childrenOf(primary.pid!);
    const signalledAt = Date.now();
    primary.kill('SIGTERM');
    expect(await exited).toBe(1);
    const elapsed = Date.now() - signalledAt;
    const log = output.join('');
    expect(count(log, 'shutdown did not finish within SHUTDOWN_TIMEOUT_MS: killing the process'), log).toBe(2);
    expect(count(log, 'worker did not stop cleanly'), log).toBe(2);
    expect(log).toContain('"signal":"SIGKILL"');
    expect(elapsed).toBeGreaterThanOrEqual(1000);
    expect(elapsed, 'the stuck requests, not the deadline, ended the shutdown (query timeout 30 s)').toBeLessThan(20_000);
    for (const pid of workers) expect(fs.existsSync(`/proc/${pid}`)).toBe(false);
  }, 180_000);

  it('when a second signal follows SIGTERM, then each worker stops at once (SIGKILL) and the primary reports it and exits with 1', async () => {
    const { primary, exited, output } = await startStuckCluster({ SHUTDOWN_TIMEOUT_MS: '600000' });
    primary.kill('SIGTERM');
    await until(async () => count(output.join(''), '"msg":"shutting down"') === 2, 30_000, 20);
    const signalledAt = Date.now();
    primary.kill('SIGINT');
    expect(await exited).toBe(1);
    const log = output.join('');
    expect(count(log, 'second signal during shutdown: stopping now'), log).toBe(2);
    expect(count(log, 'worker did not stop cleanly'), log).toBe(2);
    expect(Date.now() - signalledAt, 'the second signal did not stop the workers at once').toBeLessThan(20_000);
  }, 180_000);
});
