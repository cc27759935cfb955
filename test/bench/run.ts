/**
 * `npm run bench`: the performance figures of issue 7 against real PostgreSQL, on this machine,
 * with the load generator (autocannon) in this process. Prints a table (figure, value, target,
 * pass/fail, CPU µs per delivered key) and writes it as JSON to bench-results/bench.json.
 * How to run and read it: test/bench/README.md.
 *
 *   1  bare Fastify route req/s (baseline)        child process, one trivial JSON route
 *   2  single key fetch GET /v1/devices/{id}/keys keystrata server child, a distinct device per request
 *   3  bulk fetch POST /v1/keys/fetch             1,000 distinct devices per request
 *   4  bulk enrolment                             POST /v1/groups/{id}/devices/bulk, 10,000 per call
 *   5  rollout wave over 1,000,000 devices        test/bench/rollout-wave.ts (child process)
 *   6  KEK rotation rewrap of 10,000 group DEKs   kek-rewrap.ts, transit emulator in a child process
 *   7  audit verify                               test/bench/audit-verify.ts (child process)
 *
 * Throughput figures are the median of BENCH_RUNS (3) runs; the single-fetch ratio is to the bare
 * route measured in the same invocation. Every server-side load run must be clean (all 2xx).
 */
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AutocannonRequest } from 'autocannon';
import { compactDecrypt } from 'jose';
import pg from 'pg';
import { loadOrCreateDevIssuer } from '../../src/auth/dev-issuer.js';
import type { Scope } from '../../src/auth/principal.js';
import { loadConfig } from '../../src/config.js';
import { benchKekRewrap } from './kek-rewrap.js';
import {
  ADMIN_URL,
  assertClean,
  baseEnv,
  checkPostgres,
  cpuSplit,
  createScratchDatabase,
  describeCpu,
  dropAllScratch,
  freePort,
  killAllChildren,
  load,
  log,
  machine,
  median,
  peakRss,
  QUICK,
  REPO_ROOT,
  startNode,
  sumCpu,
  waitForHttp,
  watchPeakRss,
  type Child,
  type CpuSplit,
  type LoadResult,
  type ScratchDatabase,
} from './support.js';

// ---------------------------------------------------------------------------------------------
// Settings

const env = process.env;
const int = (name: string, fallback: number): number => {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a positive integer (got "${raw}")`);
  return value;
};

const S = {
  runs: int('BENCH_RUNS', QUICK ? 1 : 3),
  logLevel: env.BENCH_LOG_LEVEL ?? 'info',
  /**
   * `dist` (default): the server runs compiled (`tsc -p tsconfig.build.json`, as in the Docker
   * image); `tsx`: from source as `npm start` does (esbuild's keepNames wrappers and the loader
   * cost a few % of a fetch's CPU)
   */
  runtime: env.BENCH_RUNTIME === 'tsx' ? ('tsx' as const) : ('dist' as const),
  /** the server's KEYSTRATA_WORKERS (node:cluster processes sharing the port) */
  workers: int('BENCH_WORKERS', 1),
  /** the server's DELIVERY_JWE_THREADS (unset: the server's default) */
  jweThreads: env.BENCH_JWE_THREADS,
  /** also measure figure 2 with the server at LOG_LEVEL=warn (request logging off): info costs ~30 % of the requests' CPU */
  logCompare: env.BENCH_LOG_COMPARE === undefined || env.BENCH_LOG_COMPARE === '' ? !QUICK : env.BENCH_LOG_COMPARE === '1',
  /** server figures to run under --cpu-prof: `1` means figure 2 (`single`), else a list (`enrol,single,bulk-fetch`) */
  cpuProfile: new Set(env.BENCH_CPU_PROF === '1' ? ['single'] : (env.BENCH_CPU_PROF ?? '').split(',').map((s) => s.trim()).filter((s) => s !== '')),
  strict: env.BENCH_STRICT === '1',
  only: env.BENCH_ONLY ? new Set(env.BENCH_ONLY.split(',').map((s) => s.trim())) : undefined,
  connections: 50,
  bulkConnections: int('BENCH_BULK_CONNECTIONS', 8),
  warmupSeconds: QUICK ? 2 : 5,
  bareSeconds: int('BENCH_BARE_SECONDS', QUICK ? 3 : 10),
  singleSeconds: int('BENCH_SINGLE_SECONDS', QUICK ? 5 : 15),
  bulkSeconds: int('BENCH_BULK_SECONDS', QUICK ? 5 : 10),
  enrolPerRun: int('BENCH_ENROL_DEVICES', QUICK ? 20_000 : 50_000),
  enrolBatch: 10_000,
  fetchItems: 1000,
  kekGroups: int('BENCH_KEK_GROUPS', QUICK ? 2_000 : 10_000),
  auditEvents: int('BENCH_AUDIT_EVENTS', QUICK ? 50_000 : 300_000),
  rolloutDevices: int('BENCH_ROLLOUT_DEVICES', QUICK ? 20_000 : 1_000_000),
  rolloutRuns: int('BENCH_ROLLOUT_RUNS', QUICK ? 1 : 3),
  /** time for all rollout runs, seeding included: a run that would end past it is not started (noted in the table) */
  rolloutBudgetSeconds: int('BENCH_ROLLOUT_BUDGET_SECONDS', 540),
};
const FIGURES = ['bare', 'single', 'bulk-fetch', 'enrol', 'rollout', 'kek', 'audit'] as const;
type FigureKey = (typeof FIGURES)[number];
const wanted = (key: FigureKey) => S.only === undefined || S.only.has(key);
for (const key of S.cpuProfile) if (!['enrol', 'single', 'bulk-fetch'].includes(key)) throw new Error(`BENCH_CPU_PROF: "${key}" is not a server figure (1, or a list of enrol, single, bulk-fetch)`);
if (S.only) for (const key of S.only) if (!(FIGURES as readonly string[]).includes(key)) throw new Error(`BENCH_ONLY: unknown figure "${key}" (one of ${FIGURES.join(', ')})`);

const RESULTS_DIR = path.join(REPO_ROOT, 'bench-results');
const ROLLOUT_SCRIPT = path.join(REPO_ROOT, 'test/bench/rollout-wave.ts');
const AUDIT_SCRIPT = path.join(REPO_ROOT, 'test/bench/audit-verify.ts');

// ---------------------------------------------------------------------------------------------
// The table

type Status = 'pass' | 'fail' | 'not measured' | 'error' | 'info';

interface Row {
  id: string;
  figure: string;
  value: number | null;
  unit: string;
  target: string;
  status: Status;
  /** server CPU µs per delivered key (figures 2 and 3) */
  cpuUsPerKey?: number | null;
  /** the per-run values the median was taken from */
  runs?: number[];
  notes?: string;
}

const rows: Row[] = [];

function measured(id: string, figure: string, value: number, unit: string, target: { op: '>=' | '<='; threshold: number } | undefined, extra: Partial<Row> = {}): Row {
  const targetText = target ? `${target.op === '>=' ? '≥' : '≤'} ${format(target.threshold)} ${unit}`.trim() : '—';
  const ok = target === undefined ? undefined : target.op === '>=' ? value >= target.threshold : value <= target.threshold;
  const row: Row = { id, figure, value, unit, target: targetText, status: ok === undefined ? 'info' : ok ? 'pass' : 'fail', ...extra };
  rows.push(row);
  return row;
}

function missing(id: string, figure: string, unit: string, target: string, status: 'not measured' | 'error', reason: string): void {
  rows.push({ id, figure, value: null, unit, target, status, notes: reason });
}

function format(value: number): string {
  if (!Number.isFinite(value)) return String(value);
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function printTable(): string {
  const header = ['#', 'figure', 'value', 'target', 'result', 'CPU µs/key', 'runs / notes'];
  const lines = rows.map((r) => [
    r.id,
    r.figure,
    r.value === null ? '—' : `${format(r.value)} ${r.unit}`.trim(),
    r.target,
    r.status === 'pass' ? 'PASS' : r.status === 'fail' ? 'FAIL' : r.status,
    r.cpuUsPerKey === undefined ? '' : r.cpuUsPerKey === null ? '—' : format(r.cpuUsPerKey),
    [r.runs && r.runs.length > 1 ? `runs: ${r.runs.map(format).join(' / ')}` : '', r.notes ?? ''].filter((s) => s !== '').join('; '),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => (l[i] as string).length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] as number))).join(' | ');
  return [fmt(header), widths.map((w, i) => (i === widths.length - 1 ? '-'.repeat(12) : '-'.repeat(w))).join('-|-'), ...lines.map(fmt)].join('\n');
}

// ---------------------------------------------------------------------------------------------
// The keystrata server as a child process

interface Server {
  child: Child;
  /** Date.now() when the process was started */
  startedAt: number;
  /** the scratch database's name */
  database: string;
  url: string;
  logFile: string;
  stop(): Promise<void>;
}

async function startServer(database: ScratchDatabase, dataDir: string, options: { logLevel: string; cpuProfile?: string }): Promise<Server> {
  const port = await freePort();
  const startedAt = Date.now();
  const logFile = path.join(dataDir, `server-${port}.log`);
  // one profile per thread (tsx's module loader runs in a worker); the main thread's is `CPU.<date>.<time>.<pid>.0.<seq>.cpuprofile`
  const nodeArgs = options.cpuProfile ? ['--cpu-prof', `--cpu-prof-dir=${options.cpuProfile}`] : [];
  const child = startNode(serverEntry(), [], {
    env: baseEnv({ DATABASE_URL: database.url, KEYSTRATA_DATA_DIR: dataDir, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: options.logLevel, RATE_LIMIT_ENABLED: 'false', KEYSTRATA_WORKERS: String(S.workers), ...(S.jweThreads !== undefined ? { DELIVERY_JWE_THREADS: S.jweThreads } : {}) }),
    logFile,
    nodeArgs,
  });
  const url = `http://127.0.0.1:${port}`;
  await waitForHttp(`${url}/readyz`, child);
  // the first worker answers /readyz while the others may still be loading: wait for all of them
  for (const deadline = Date.now() + 120_000; S.workers > 1 && countInFile(logFile, '"keystrata is listening"') < S.workers; ) {
    if (Date.now() > deadline) throw new Error(`only ${countInFile(logFile, '"keystrata is listening"')} of ${S.workers} workers listen after 120 s`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  log(`keystrata server pid ${child.pid} on ${url} (LOG_LEVEL=${options.logLevel}, KEYSTRATA_WORKERS=${S.workers}${options.cpuProfile ? `, --cpu-prof → ${options.cpuProfile}` : ''})`);
  return { child, startedAt, database: database.name, url, logFile, stop: () => child.stop('SIGTERM', 30_000) };
}

let built = false;
/** The server's entry: compiled once per bench invocation into dist/ (BENCH_RUNTIME=dist), or the TypeScript source. */
function serverEntry(): string {
  if (S.runtime === 'tsx') return 'src/server.ts';
  if (!built) {
    log('compiling the server (tsc -p tsconfig.build.json → dist/; BENCH_RUNTIME=tsx runs the source instead)');
    execFileSync(process.execPath, [path.join(REPO_ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { cwd: REPO_ROOT, stdio: 'inherit' });
    built = true;
  }
  return 'dist/src/server.js';
}

function countInFile(file: string, needle: string): number {
  try {
    return fs.readFileSync(file, 'utf8').split(needle).length - 1;
  } catch {
    return 0;
  }
}

/** `; server peak RSS so far 412 MB` (VmHWM: it only grows, so successive figures show which one raised it) */
function serverRss(server: Server): string {
  const rss = peakRss(server.child.pid);
  return rss === undefined ? '' : `; server peak RSS so far ${Math.round(rss / 2 ** 20)} MB`;
}

async function api(server: Server, token: string, method: string, route: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const response = await fetch(`${server.url}${route}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await response.text();
  let json: Record<string, unknown> = {};
  try {
    json = JSON.parse(text) as Record<string, unknown>;
  } catch {
    json = { raw: text.slice(0, 500) };
  }
  return { status: response.status, json };
}

function expectStatus(what: string, answer: { status: number; json: unknown }, status: number): void {
  if (answer.status !== status) throw new Error(`${what}: expected ${status}, got ${answer.status} ${JSON.stringify(answer.json).slice(0, 500)}`);
}

async function decryptKeys(jwe: string, privateKey: KeyObject): Promise<Array<{ kid: string; k: string }>> {
  const { plaintext } = await compactDecrypt(jwe, privateKey);
  return (JSON.parse(new TextDecoder().decode(plaintext)) as { keys: Array<{ kid: string; k: string }> }).keys;
}

function shuffled<T>(items: readonly T[]): T[] {
  const out = [...items];
  let seed = 0x9e3779b9;
  for (let i = out.length - 1; i > 0; i--) {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    const j = seed % (i + 1);
    [out[i], out[j]] = [out[j] as T, out[i] as T];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Figure 1: the bare route

async function figureBare(): Promise<number | undefined> {
  const port = await freePort();
  const child = startNode('test/bench/bare-route.ts', [], { env: baseEnv({ PORT: String(port) }) });
  try {
    await waitForHttp(`http://127.0.0.1:${port}/hello`, child, 60_000);
    const options = { url: `http://127.0.0.1:${port}/hello`, connections: S.connections };
    await load({ ...options, duration: S.warmupSeconds });
    const runs: LoadResult[] = [];
    for (let run = 1; run <= S.runs; run++) {
      const result = await load({ ...options, duration: S.bareSeconds }, { pid: child.pid });
      assertClean('bare route', result);
      runs.push(result);
      log(`bare run ${run}: ${Math.round(result.rps)} req/s, p99 ${result.p99} ms`);
    }
    const rps = median(runs.map((r) => r.rps));
    measured('1', 'bare Fastify route (baseline)', rps, 'req/s', undefined, {
      runs: runs.map((r) => r.rps),
      notes: `GET /hello, Fastify without logger, own process; ${S.connections} connections, ${S.bareSeconds} s per run; p99 ${format(median(runs.map((r) => r.p99)))} ms; ${describeCpu(sumCpu(runs.map((r) => r.cpu)), { watched: 'bare server', bench: 'load generator' })}`,
    });
    return rps;
  } finally {
    await child.stop();
  }
}

// ---------------------------------------------------------------------------------------------
// Figures 2, 3 and 4: one keystrata server on a scratch database

interface Fleet {
  admin: string;
  reader: string;
  privateKey: KeyObject;
  groups: string[];
  devices: string[];
}

async function prepareClients(server: Server, dataDir: string, groups: string[]): Promise<Omit<Fleet, 'devices' | 'groups'>> {
  const config = loadConfig({ KEYSTRATA_DATA_DIR: dataDir });
  const issuer = await loadOrCreateDevIssuer(dataDir);
  const mint = (sub: string, scopes: Scope[], tokenGroups: string[] = []) =>
    issuer.mintToken({ sub, scopes, groups: tokenGroups, ttlSeconds: 4 * 3600, issuer: config.auth.issuer, audience: config.auth.audience });
  const admin = await mint('bench-admin', ['keystrata:admin']);
  const { publicKey, privateKey } = generateKeyPairSync('x25519');
  const jwk = publicKey.export({ format: 'jwk' });
  expectStatus('register the delivery key', await api(server, admin, 'PUT', '/v1/clients/bench-reader/delivery-key', { jwk: { kty: jwk.kty, crv: jwk.crv, x: jwk.x } }), 200);
  const reader = await mint('bench-reader', ['keystrata:keys:read'], groups);
  return { admin, reader, privateKey };
}

async function figureEnrol(server: Server, admin: string, groups: string[]): Promise<string[]> {
  const devices: string[] = [];
  const perRun: Array<{ devices: number; seconds: number; rate: number; cpu: CpuSplit }> = [];
  for (const [index, group] of groups.entries()) {
    expectStatus(`create group ${group}`, await api(server, admin, 'POST', '/v1/groups', { id: group, deviceType: 'sensor', region: 'eu-west' }), 201);
    const ids = Array.from({ length: S.enrolPerRun }, (_, i) => `${group}-dev-${String(i).padStart(7, '0')}`);
    const started = performance.now();
    const split = await cpuSplit(server.child.pid, server.database);
    for (let i = 0; i < ids.length; i += S.enrolBatch) {
      const answer = await api(server, admin, 'POST', `/v1/groups/${group}/devices/bulk`, { ids: ids.slice(i, i + S.enrolBatch) });
      expectStatus('bulk enrolment', answer, 201);
    }
    const seconds = (performance.now() - started) / 1000;
    devices.push(...ids);
    perRun.push({ devices: ids.length, seconds, rate: ids.length / seconds, cpu: await split.stop() });
    log(`enrol run ${index + 1}: ${ids.length} devices in ${seconds.toFixed(2)} s = ${Math.round(ids.length / seconds)} devices/s`);
  }
  measured('4', 'bulk enrolment', median(perRun.map((r) => r.rate)), 'devices/s', { op: '>=', threshold: 20_000 }, {
    runs: perRun.map((r) => r.rate),
    notes: `${S.enrolPerRun.toLocaleString('en-US')} devices per run in calls of ${S.enrolBatch.toLocaleString('en-US')}, one call at a time, a fresh group per run; server CPU ${format(median(perRun.map((r) => (r.cpu.watched * 1e6) / r.devices)))} µs per device; ${describeCpu(sumCpu(perRun.map((r) => r.cpu)), { watched: 'server', bench: 'client' })}${serverRss(server)}`,
  });
  return devices;
}

/** Returns when (Date.now()) the first measured run started. */
async function figureSingle(server: Server, fleet: Fleet, bareRps: number | undefined, label: { suffix: string; logLevel: string }): Promise<number> {
  // a sample delivery, decrypted: the answer really carries the device's key
  const ids = shuffled(fleet.devices);
  const sample = await api(server, fleet.reader, 'GET', `/v1/devices/${ids[0]}/keys`);
  expectStatus('single fetch sample', sample, 200);
  const keys = await decryptKeys(sample.json.jwe as string, fleet.privateKey);
  if (keys.length !== 1 || keys[0]?.kid !== `${ids[0]}:v1`) throw new Error(`single fetch sample: unexpected key set ${JSON.stringify(keys.map((k) => k.kid))}`);
  const keysPerAnswer = keys.length;

  let next = 0;
  const options = {
    url: server.url,
    connections: S.connections,
    headers: { authorization: `Bearer ${fleet.reader}` },
    requests: [
      {
        method: 'GET',
        setupRequest: (request: AutocannonRequest) => {
          request.path = `/v1/devices/${ids[next++ % ids.length]}/keys`;
          return request;
        },
      },
    ],
  };
  await load({ ...options, duration: S.warmupSeconds });
  const measuredFrom = Date.now();
  const runs: LoadResult[] = [];
  for (let run = 1; run <= S.runs; run++) {
    const result = await load({ ...options, duration: S.singleSeconds }, { pid: server.child.pid, database: server.database });
    assertClean('single key fetch', result);
    runs.push(result);
    log(`single run ${run}${label.suffix}: ${Math.round(result.rps)} req/s, p50 ${result.p50} ms, p99 ${result.p99} ms, ${format(((result.cpuSeconds ?? 0) * 1e6) / (result.ok * keysPerAnswer))} CPU µs/key`);
  }
  const rps = median(runs.map((r) => r.rps));
  const cpu = median(runs.map((r) => ((r.cpuSeconds ?? 0) * 1e6) / (r.ok * keysPerAnswer)));
  measured(`2a${label.suffix}`, `single key fetch${label.suffix ? ` (LOG_LEVEL=${label.logLevel})` : ''}`, rps, 'req/s', { op: '>=', threshold: 5_000 }, {
    runs: runs.map((r) => r.rps),
    cpuUsPerKey: cpu,
    notes: `GET /v1/devices/{id}/keys, ${S.connections} connections, ${S.singleSeconds} s per run, a different device per request (${ids.length.toLocaleString('en-US')} devices rotated through, ${next.toLocaleString('en-US')} requests incl. warm-up); server ${S.runtime === "dist" ? "compiled" : "on tsx"}, LOG_LEVEL=${label.logLevel}, KEYSTRATA_WORKERS=${S.workers}; ${describeCpu(sumCpu(runs.map((r) => r.cpu)))}${serverRss(server)}`,
  });
  measured(`2b${label.suffix}`, `single key fetch p99${label.suffix ? ` (LOG_LEVEL=${label.logLevel})` : ''}`, median(runs.map((r) => r.p99)), 'ms', { op: '<=', threshold: 25 }, {
    runs: runs.map((r) => r.p99),
    notes: `p50 ${format(median(runs.map((r) => r.p50)))} ms`,
  });
  if (bareRps !== undefined) {
    measured(`2c${label.suffix}`, `single key fetch / bare route${label.suffix ? ` (LOG_LEVEL=${label.logLevel})` : ''}`, (100 * rps) / bareRps, '%', { op: '>=', threshold: 15 }, {
      notes: `${format(rps)} / ${format(bareRps)} req/s (medians, same invocation)`,
    });
  } else {
    missing(`2c${label.suffix}`, 'single key fetch / bare route', '%', '≥ 15 %', 'not measured', 'the bare route was not measured (BENCH_ONLY)');
  }
  return measuredFrom;
}

/** Returns when (Date.now()) the first measured run started. */
async function figureBulkFetch(server: Server, fleet: Fleet): Promise<number> {
  const ids = shuffled(fleet.devices);
  const bodies: string[] = [];
  for (let i = 0; i + S.fetchItems <= ids.length; i += S.fetchItems) {
    bodies.push(JSON.stringify({ items: ids.slice(i, i + S.fetchItems).map((deviceId) => ({ deviceId })) }));
  }
  if (bodies.length === 0) throw new Error('bulk fetch: fewer devices than one request needs');
  const sample = await api(server, fleet.reader, 'POST', '/v1/keys/fetch', JSON.parse(bodies[0] as string));
  expectStatus('bulk fetch sample', sample, 200);
  const keys = await decryptKeys(sample.json.jwe as string, fleet.privateKey);
  if (keys.length !== S.fetchItems || (sample.json.missing as unknown[]).length !== 0) {
    throw new Error(`bulk fetch sample: ${keys.length} keys, ${(sample.json.missing as unknown[]).length} missing`);
  }
  const keysPerAnswer = keys.length;

  let next = 0;
  const options = {
    url: server.url,
    connections: S.bulkConnections,
    headers: { authorization: `Bearer ${fleet.reader}`, 'content-type': 'application/json' },
    requests: [
      {
        method: 'POST',
        path: '/v1/keys/fetch',
        setupRequest: (request: AutocannonRequest) => {
          request.body = bodies[next++ % bodies.length] as string;
          return request;
        },
      },
    ],
  };
  await load({ ...options, duration: S.warmupSeconds });
  const measuredFrom = Date.now();
  const runs: LoadResult[] = [];
  for (let run = 1; run <= S.runs; run++) {
    const result = await load({ ...options, duration: S.bulkSeconds }, { pid: server.child.pid, database: server.database });
    assertClean('bulk fetch', result);
    runs.push(result);
    log(`bulk fetch run ${run}: ${Math.round(result.rps)} req/s = ${Math.round(result.rps * keysPerAnswer)} keys/s, p99 ${result.p99} ms, ${format(((result.cpuSeconds ?? 0) * 1e6) / (result.ok * keysPerAnswer))} CPU µs/key`);
  }
  measured('3', 'bulk fetch, 1,000 keys per request', median(runs.map((r) => r.rps * keysPerAnswer)), 'keys/s', { op: '>=', threshold: 100_000 }, {
    runs: runs.map((r) => r.rps * keysPerAnswer),
    cpuUsPerKey: median(runs.map((r) => ((r.cpuSeconds ?? 0) * 1e6) / (r.ok * keysPerAnswer))),
    notes: `POST /v1/keys/fetch, ${S.bulkConnections} connections, ${S.bulkSeconds} s per run, distinct devices per request; KEYSTRATA_WORKERS=${S.workers}; ${format(median(runs.map((r) => r.rps)))} req/s, p99 ${format(median(runs.map((r) => r.p99)))} ms; ${describeCpu(sumCpu(runs.map((r) => r.cpu)))}${serverRss(server)}`,
  });  return measuredFrom;
}

async function serverFigures(bareRps: number | undefined): Promise<void> {
  const database = await createScratchDatabase('server');
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-bench-'));
  const profileRoot = path.join(RESULTS_DIR, 'profiles', new Date().toISOString().replace(/[:.]/g, '-'));
  let server: Server | undefined;
  const start = async (options: { logLevel: string; cpuProfile?: string }) => {
    await server?.stop();
    server = undefined;
    server = await startServer(database, dataDir, options);
    return server;
  };
  /** Runs a figure on a server started with --cpu-prof when BENCH_CPU_PROF names it, then goes back to a plain one. */
  const profiled = async (key: FigureKey, fn: (s: Server) => Promise<number>): Promise<void> => {
    if (!S.cpuProfile.has(key)) {
      await fn(server ?? (await start({ logLevel: S.logLevel })));
      return;
    }
    const dir = path.join(profileRoot, key);
    fs.mkdirSync(dir, { recursive: true });
    const s = await start({ logLevel: S.logLevel, cpuProfile: dir });
    const measuredFrom = await fn(s);
    await start({ logLevel: S.logLevel });
    const main = fs.readdirSync(dir).find((f) => f.includes(`.${s.child.pid}.0.`));
    const shown = path.relative(REPO_ROOT, main ? path.join(dir, main) : dir);
    const skip = Math.max(0, Math.floor((measuredFrom - s.startedAt) / 1000));
    log(`CPU profile of the server's main thread during "${key}": ${shown}\n    summary of the measured runs: npx tsx test/bench/profile-summary.ts ${shown} --skip ${skip}`);
  };
  try {
    const groups = Array.from({ length: S.runs }, (_, i) => `bench-g${i + 1}`);
    const first = await start({ logLevel: S.logLevel });
    const clients = await prepareClients(first, dataDir, groups);
    let devices: string[] = [];
    await profiled('enrol', async (s) => {
      const from = Date.now();
      devices = await figureEnrol(s, clients.admin, groups);
      return from;
    });
    const fleet: Fleet = { ...clients, groups, devices };
    // what autovacuum would have done by now in production: fresh statistics for 100k+ new rows
    const client = new pg.Client({ connectionString: database.url });
    await client.connect();
    await client.query('vacuum analyze');
    await client.end();

    if (wanted('single')) {
      await profiled('single', (s) => figureSingle(s, fleet, bareRps, { suffix: '', logLevel: S.logLevel }));
      if (S.logCompare && S.logLevel !== 'warn') {
        const quiet = await start({ logLevel: 'warn' });
        await figureSingle(quiet, fleet, bareRps, { suffix: ' warn', logLevel: 'warn' });
        await start({ logLevel: S.logLevel });
      }
    }
    if (wanted('bulk-fetch')) await profiled('bulk-fetch', (s) => figureBulkFetch(s, fleet));
    const last = server as Server | undefined;
    const rss = last ? peakRss(last.child.pid) : undefined;
    if (rss !== undefined) log(`keystrata server peak RSS (last server process): ${Math.round(rss / 2 ** 20)} MB`);
  } catch (error) {
    // the server's logs are in dataDir, removed below: keep them for the post-mortem
    const kept = path.join(RESULTS_DIR, 'server-logs', new Date().toISOString().replace(/[:.]/g, '-'));
    fs.mkdirSync(kept, { recursive: true });
    for (const file of fs.readdirSync(dataDir).filter((f) => f.endsWith('.log'))) fs.copyFileSync(path.join(dataDir, file), path.join(kept, file));
    log(`the server logs of the failed figures are kept in ${path.relative(REPO_ROOT, kept)}`);
    throw error;
  } finally {
    await server?.stop();
    await database.drop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Figures 5 and 7: scripts in child processes, one result line each

/** The `BENCH_RESULT {…}` line of a script's output (else its last line that is a JSON object). */
function resultLine(output: string): Record<string, unknown> | undefined {
  const lines = output.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  const tagged = lines.filter((l) => l.startsWith('BENCH_RESULT ')).at(-1);
  const candidates = tagged !== undefined ? [tagged.slice('BENCH_RESULT '.length)] : lines.filter((l) => l.startsWith('{')).reverse();
  for (const candidate of candidates) {
    try {
      const parsed = JSON.parse(candidate) as unknown;
      if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) return parsed as Record<string, unknown>;
    } catch {
      // not JSON
    }
  }
  return undefined;
}

async function runScript(script: string, args: string[], extraEnv: Record<string, string>): Promise<{ code: number | string; output: string; peakRss: number; seconds: number }> {
  let output = '';
  const started = performance.now();
  const child = startNode(script, args, {
    env: baseEnv({ BENCH_DATABASE_URL: ADMIN_URL, TEST_DATABASE_URL: ADMIN_URL, ...(QUICK ? { BENCH_QUICK: '1' } : {}), ...extraEnv }),
    onLine: (line) => {
      output += `${line}\n`;
      process.stderr.write(`    ${path.basename(script)}: ${line}\n`);
    },
  });
  const rss = watchPeakRss(child.pid);
  const code = await child.exited;
  return { code, output, peakRss: rss.stop(), seconds: (performance.now() - started) / 1000 };
}

async function figureAudit(): Promise<void> {
  const result = await runScript(AUDIT_SCRIPT, [String(S.auditEvents), String(S.runs)], {});
  const parsed = resultLine(result.output) as { events: number; writeSeconds: number; verify: Array<{ ok: boolean; checked: number; seconds: number }> } | undefined;
  if (result.code !== 0 || !parsed || !Array.isArray(parsed.verify) || parsed.verify.length === 0) {
    missing('7', 'audit verify', 'events/s', '≥ 200,000 events/s', 'error', `audit-verify.ts exited ${result.code} without a result: ${result.output.split('\n').slice(-5).join(' ')}`);
    return;
  }
  if (parsed.verify.some((v) => !v.ok)) throw new Error('audit verify reported a broken chain on a freshly written one');
  const rates = parsed.verify.map((v) => v.checked / v.seconds);
  measured('7', 'audit verify', median(rates), 'events/s', { op: '>=', threshold: 200_000 }, {
    runs: rates,
    notes: `whole chain of ${parsed.events.toLocaleString('en-US')} events (written at ${format(parsed.events / parsed.writeSeconds)} events/s in transactions of 5,000), verified ${parsed.verify.length}× in audit-verify.ts`,
  });
}

async function figureRollout(): Promise<void> {
  if (!fs.existsSync(ROLLOUT_SCRIPT)) {
    missing('5a', 'rollout wave over 1,000,000 devices', 'devices/s', '≥ 10,000 devices/s (≤ 100 s)', 'not measured', 'test/bench/rollout-wave.ts does not exist yet (the rollout helper writes it); run.ts runs it as a child process once it does');
    missing('5b', 'rollout wave peak RSS', 'MB', '≤ 300 MB', 'not measured', 'see 5a');
    return;
  }
  const runs: Array<{ rate: number; seconds: number; devices: number; rssMB: number; waveRssMB: number | undefined; ownRssMB: number; scriptSeconds: number; chunks: string; nodeCores: number | undefined }> = [];
  let skipped = '';
  const figureStarted = performance.now();
  for (let run = 1; run <= S.rolloutRuns; run++) {
    const elapsed = (performance.now() - figureStarted) / 1000;
    const last = runs.at(-1)?.scriptSeconds ?? 0;
    if (run > 1 && elapsed + last > S.rolloutBudgetSeconds) {
      skipped = `; ${S.rolloutRuns - run + 1} more run(s) skipped: another ${Math.round(last)} s run would end past BENCH_ROLLOUT_BUDGET_SECONDS=${S.rolloutBudgetSeconds}`;
      break;
    }
    // rollout-wave.ts: enrols N devices directly, one 100 % wave through the rollout service's cron hook, checks each device rotated once
    const result = await runScript(ROLLOUT_SCRIPT, ['--devices', String(S.rolloutDevices)], {});
    const parsed = resultLine(result.output);
    const num = (...names: string[]) => names.map((n) => parsed?.[n]).find((v): v is number => typeof v === 'number' && Number.isFinite(v));
    const devices = num('devices') ?? S.rolloutDevices;
    const seconds = num('waveSeconds', 'seconds');
    const rate = num('devicesPerSecond') ?? (seconds !== undefined ? devices / seconds : undefined);
    if (result.code !== 0 || rate === undefined || parsed?.ok === false) {
      const why = parsed?.ok === false ? 'its check failed (not every device rotated exactly once)' : `exited ${result.code} without a BENCH_RESULT line`;
      missing('5a', `rollout wave over ${S.rolloutDevices.toLocaleString('en-US')} devices`, 'devices/s', '≥ 10,000 devices/s (≤ 100 s)', 'error', `rollout-wave.ts run ${run}: ${why}: ${result.output.split('\n').slice(-5).join(' ')}`);
      missing('5b', 'rollout wave peak RSS', 'MB', '≤ 300 MB', 'error', 'see 5a');
      return;
    }
    // the script's maxRSS is the kernel's peak for its process (enrolment included); VmHWM sampled here is the same quantity
    const reported = num('maxRssMb', 'peakRssMB') ?? (num('peakRssBytes') ?? NaN) / 2 ** 20;
    const ownRssMB = result.peakRss / 2 ** 20;
    const rssMB = Number.isFinite(reported) ? reported : ownRssMB;
    const nodeCpu = num('nodeCpuSeconds');
    runs.push({ rate, seconds: seconds ?? devices / rate, devices, rssMB, waveRssMB: num('sampledPeakMb'), ownRssMB, scriptSeconds: result.seconds, chunks: `chunks of ${num('chunkSize') ?? '?'}, ${num('workers') ?? '?'} workers`, nodeCores: nodeCpu !== undefined && seconds !== undefined ? nodeCpu / seconds : undefined });
    log(`rollout run ${run}: ${devices} devices at ${Math.round(rate)} devices/s, peak RSS ${Math.round(rssMB)} MB (whole script ${result.seconds.toFixed(0)} s)`);
  }
  const seconds = median(runs.map((r) => r.seconds));
  measured('5a', `rollout wave over ${S.rolloutDevices.toLocaleString('en-US')} devices`, median(runs.map((r) => r.rate)), 'devices/s', { op: '>=', threshold: 10_000 }, {
    runs: runs.map((r) => r.rate),
    notes: `wave ${format(seconds)} s (target ≤ 100 s at 1,000,000); rollout-wave.ts: one 100 % wave via the cron hook, ${runs[0]?.chunks}, every device checked rotated once; ${format(median(runs.map((r) => r.scriptSeconds)))} s per run with seeding${runs[0]?.nodeCores !== undefined ? `; the script's Node process used ${runs.map((r) => r.nodeCores?.toFixed(2)).join('/')} cores during the wave (the rest of the wave's time is PostgreSQL's)` : ''}${skipped}`,
  });
  const waveRss = runs.map((r) => r.waveRssMB).filter((v): v is number => v !== undefined);
  measured('5b', 'rollout wave peak RSS', Math.max(...runs.map((r) => r.rssMB)), 'MB', { op: '<=', threshold: 300 }, {
    runs: runs.map((r) => r.rssMB),
    notes: `highest of the runs: maxRSS of the script's process, enrolment included (VmHWM seen here ${runs.map((r) => Math.round(r.ownRssMB)).join('/')} MB${waveRss.length > 0 ? `; sampled during the wave only ${waveRss.map((v) => Math.round(v)).join('/')} MB` : ''})`,
  });
}

async function figureKek(): Promise<void> {
  const result = await benchKekRewrap({ groups: S.kekGroups, runs: S.runs });
  const rates = result.runs.map((r) => r.blobsPerSecond);
  const sizes = result.runs.flatMap((r) => r.groupBatchSizes);
  const groupRequests = result.runs.map((r) => r.transitRewrapRequests - (r.auditKeys > 0 ? 1 : 0));
  measured('6a', `KEK rotation rewrap of ${S.kekGroups.toLocaleString('en-US')} group DEKs`, median(rates), 'blobs/s', { op: '>=', threshold: 5_000 }, {
    runs: rates,
    notes: `vault provider → transit emulator (own process); whole POST /v1/kek/rotate work (rotate, rewrap, swaps + audit per batch); seeded in ${format(result.seedSeconds)} s; ${describeCpu(sumCpu(result.runs.map((r) => r.cpu)), { watched: 'transit emulator', bench: 'keystrata rotation (bench process)' })}`,
  });
  // the provider may split a call into several requests: the emulator's count says what transit saw
  const expectedRequests = result.runs.map((r) => r.groupBatchSizes.reduce((n, size) => n + Math.ceil(size / 500), 0));
  const consistent = groupRequests.every((n, i) => n === expectedRequests[i]);
  measured('6b', 'KEK rewrap batch size (smallest)', Math.min(...sizes), 'items', { op: '>=', threshold: 250 }, {
    notes: `${result.runs[0]?.groupBlobs.toLocaleString('en-US')} group blobs in ${groupRequests.join(' / ')} transit rewrap requests per run (counted at the emulator, plus one for the 2 audit keys); call sizes ${[...new Set(sizes)].join(', ')}${consistent ? '' : ` — MISMATCH with the emulator's count (${expectedRequests.join('/')} expected)`}`,
  });
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const startedAt = new Date();
  const m = machine();
  const loadStart = os.loadavg();
  process.stdout.write(`keystrata bench${QUICK ? ' (BENCH_QUICK: smaller N, 1 run each — a smoke run, not the figures)' : ''}\n`);
  process.stdout.write(`machine: ${m.cpus} × ${m.model}, ${m.memoryGiB} GiB, ${m.platform}, Node ${m.node}\n`);
  process.stdout.write(`load average at start: ${loadStart.map((l) => l.toFixed(2)).join(' ')}\n`);
  if ((loadStart[0] ?? 0) > 1) process.stdout.write(`WARNING: the 1-minute load average is ${loadStart[0]?.toFixed(2)} (> 1): something else is running; the figures will be low and noisy\n`);
  const postgres = await checkPostgres().catch((error: unknown) => {
    throw new Error(`PostgreSQL is not reachable at ${ADMIN_URL.replace(/\/\/[^@]*@/, '//…@')} (set BENCH_DATABASE_URL): ${error instanceof Error ? error.message : String(error)}`);
  });
  process.stdout.write(`database: ${postgres}; server ${S.runtime === "dist" ? "compiled (dist/)" : "from source (tsx)"}, LOG_LEVEL=${S.logLevel}, KEYSTRATA_WORKERS=${S.workers} (BENCH_WORKERS), RATE_LIMIT_ENABLED=false (the limits would cap the load generator)\n\n`);

  const errors: string[] = [];
  const attempt = async (name: string, fn: () => Promise<void>) => {
    log(`— ${name} (load ${os.loadavg()[0]?.toFixed(2)})`);
    try {
      await fn();
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      errors.push(`${name}: ${message}`);
      log(`${name} failed: ${message}`);
    }
  };

  let bareRps: number | undefined;
  if (wanted('bare')) await attempt('figure 1: bare route', async () => void (bareRps = await figureBare()));
  if (wanted('enrol') || wanted('single') || wanted('bulk-fetch')) {
    const before = rows.length;
    await attempt('figures 4, 2, 3: keystrata server', () => serverFigures(bareRps));
    if (rows.length === before) missing('2–4', 'server figures', '', '', 'error', 'see the error below');
  }
  if (wanted('kek')) await attempt('figure 6: KEK rewrap', figureKek);
  if (wanted('audit')) await attempt('figure 7: audit verify', figureAudit);
  if (wanted('rollout')) await attempt('figure 5: rollout wave', figureRollout);
  rows.sort((a, b) => a.id.localeCompare(b.id, 'en', { numeric: true }));

  const loadEnd = os.loadavg();
  const table = printTable();
  process.stdout.write(`\n${table}\n\n`);
  process.stdout.write(`load average at end: ${loadEnd.map((l) => l.toFixed(2)).join(' ')}; ${((Date.now() - startedAt.getTime()) / 1000).toFixed(0)} s in all\n`);
  for (const error of errors) process.stdout.write(`ERROR ${error}\n`);

  fs.mkdirSync(RESULTS_DIR, { recursive: true });
  const file = path.join(RESULTS_DIR, 'bench.json');
  const report = {
    startedAt: startedAt.toISOString(),
    seconds: (Date.now() - startedAt.getTime()) / 1000,
    quick: QUICK,
    machine: { ...m, loadAverageStart: loadStart, loadAverageEnd: loadEnd },
    database: postgres,
    settings: { ...S, only: S.only ? [...S.only] : undefined, cpuProfile: [...S.cpuProfile], rateLimitEnabled: false, loadGenerator: 'autocannon@8 in the bench process (same machine)' },
    figures: rows,
    errors,
  };
  fs.writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`written: ${path.relative(process.cwd(), file)}\n`);
  if (errors.length > 0 || (S.strict && rows.some((r) => r.status === 'fail' || r.status === 'error'))) process.exitCode = 1;
}

let interrupted = false;
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (interrupted) process.exit(130);
    interrupted = true;
    log(`${signal}: stopping children and dropping scratch databases`);
    killAllChildren();
    void dropAllScratch().finally(() => process.exit(130));
  });
}

main()
  .catch((error: unknown) => {
    process.stderr.write(`bench: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  })
  .finally(async () => {
    killAllChildren();
    await dropAllScratch();
  });
