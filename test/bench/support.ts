/**
 * Benchmark plumbing: scratch PostgreSQL databases, child processes (the keystrata server, the
 * bare Fastify route, helper scripts), their CPU time and peak RSS from /proc, autocannon, and
 * medians. Nothing here measures anything by itself.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon, { type AutocannonOptions, type AutocannonResult } from 'autocannon';
import pg from 'pg';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const ADMIN_URL = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const QUICK = process.env.BENCH_QUICK === '1' || process.env.BENCH_QUICK === 'true';

export const median = (values: readonly number[]): number => {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
};

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export function log(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL scratch databases (created on the admin URL's server, always dropped)

async function adminQuery(statement: string): Promise<void> {
  const client = new pg.Client({ connectionString: ADMIN_URL });
  await client.connect();
  try {
    await client.query(statement);
  } finally {
    await client.end();
  }
}

export interface ScratchDatabase {
  name: string;
  url: string;
  drop(): Promise<void>;
}

const scratch = new Set<string>();

export async function createScratchDatabase(label: string): Promise<ScratchDatabase> {
  const name = `ks_bench_${label}_${crypto.randomBytes(4).toString('hex')}`;
  await adminQuery(`create database "${name}"`);
  scratch.add(name);
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  return {
    name,
    url: url.toString(),
    async drop() {
      await adminQuery(`drop database if exists "${name}" with (force)`);
      scratch.delete(name);
    },
  };
}

/** Drops whatever scratch database is still there (on errors and Ctrl-C). */
export async function dropAllScratch(): Promise<void> {
  for (const name of [...scratch]) {
    await adminQuery(`drop database if exists "${name}" with (force)`).catch((error: unknown) => log(`could not drop ${name}: ${String(error)}`));
    scratch.delete(name);
  }
}

export async function checkPostgres(): Promise<string> {
  const client = new pg.Client({ connectionString: ADMIN_URL, connectionTimeoutMillis: 5000 });
  await client.connect();
  try {
    const { rows } = await client.query<{ version: string }>('select version()');
    return rows[0]?.version.split(' on ')[0] ?? 'PostgreSQL';
  } finally {
    await client.end();
  }
}

// ---------------------------------------------------------------------------------------------
// Child processes

const children = new Set<ChildProcess>();

export function killAllChildren(): void {
  for (const child of children) if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) child.kill('SIGKILL');
}

export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** A clean environment for children: no settings inherited by accident (MQTT_URL, VAULT_ADDR, …). */
export function baseEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const keep = ['PATH', 'HOME', 'TMPDIR', 'LANG', 'TZ'];
  const env: NodeJS.ProcessEnv = {};
  for (const name of keep) if (process.env[name] !== undefined) env[name] = process.env[name];
  return { ...env, ...extra };
}

export interface Child {
  process: ChildProcess;
  pid: number;
  /** resolves with the exit code (or the signal's name) */
  exited: Promise<number | string>;
  /** the last lines of output (stdout and stderr), for error messages */
  tail(): string;
  stop(signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
}

/**
 * `node --import tsx <script> …args` from the repository root. Output goes to `logFile` when given
 * (the kernel writes it: the benchmark process spends no CPU on the server's logs), else it is
 * collected here (scripts whose result lines we parse).
 */
export function startNode(script: string, args: string[], options: { env: NodeJS.ProcessEnv; logFile?: string; nodeArgs?: string[]; onLine?: (line: string) => void }): Child {
  let output = '';
  const logFd = options.logFile !== undefined ? fs.openSync(options.logFile, 'a') : undefined;
  // TypeScript through tsx; compiled JavaScript (dist/) as is
  const loader = script.endsWith('.ts') ? ['--import', 'tsx'] : [];
  const child = spawn(process.execPath, [...(options.nodeArgs ?? []), ...loader, script, ...args], {
    cwd: REPO_ROOT,
    env: options.env,
    stdio: logFd !== undefined ? ['ignore', logFd, logFd] : ['ignore', 'pipe', 'pipe'],
  });
  if (logFd !== undefined) fs.closeSync(logFd);
  if (child.pid === undefined) throw new Error(`could not start ${script}`);
  children.add(child);
  let partial = '';
  const collect = (chunk: Buffer) => {
    const text = chunk.toString('utf8');
    output = (output + text).slice(-64 * 1024);
    if (options.onLine) {
      partial += text;
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) options.onLine(line);
    }
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  const exited = new Promise<number | string>((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve(code ?? signal ?? 'unknown');
    });
  });
  const tail = () => {
    const text = options.logFile !== undefined ? readTail(options.logFile) : output;
    return text.split('\n').slice(-15).join('\n');
  };
  return {
    process: child,
    pid: child.pid,
    exited,
    tail,
    async stop(signal = 'SIGTERM', graceMs = 10_000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      const timer = sleep(graceMs).then(() => 'timeout' as const);
      if ((await Promise.race([exited, timer])) === 'timeout') {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}

function readTail(file: string): string {
  try {
    const size = fs.statSync(file).size;
    const fd = fs.openSync(file, 'r');
    try {
      const length = Math.min(size, 16 * 1024);
      const buffer = Buffer.alloc(length);
      fs.readSync(fd, buffer, 0, length, size - length);
      return buffer.toString('utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return '';
  }
}

const CLOCK_TICKS = 100; // sysconf(_SC_CLK_TCK) on Linux

/**
 * User + system CPU seconds so far of a process (all its threads) and of its live descendants
 * (a server with KEYSTRATA_WORKERS > 1 is a cluster primary whose workers do the work; tsx may
 * put a child in between), from /proc/<pid>/stat.
 */
export function processCpuSeconds(pid: number): number {
  return processTree(pid).reduce((sum, p) => sum + p.cpuSeconds, 0);
}

/** The process and its live descendants, each with its own CPU seconds so far. */
export function processTree(pid: number): Array<{ pid: number; cpuSeconds: number }> {
  const parentOf = new Map<number, number>();
  const cpuOf = new Map<number, number>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      // the command name (field 2) may hold spaces: fields are counted after its closing parenthesis
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      parentOf.set(Number(entry), Number(fields[1]));
      cpuOf.set(Number(entry), (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS);
    } catch {
      // exited while we looked
    }
  }
  const tree: Array<{ pid: number; cpuSeconds: number }> = [];
  const visit = (p: number) => {
    const cpu = cpuOf.get(p);
    if (cpu === undefined) return;
    tree.push({ pid: p, cpuSeconds: cpu });
    for (const [child, parent] of parentOf) if (parent === p) visit(child);
  };
  visit(pid);
  return tree;
}

/** Busy and total CPU seconds of the whole machine so far (all CPUs), from /proc/stat. */
function machineCpuSeconds(): { busy: number; total: number } {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = line.trim().split(/\s+/).slice(1).map(Number);
  const busy = user + nice + system + irq + softirq + steal;
  return { busy: busy / CLOCK_TICKS, total: (busy + idle + iowait) / CLOCK_TICKS };
}

export interface CpuSplit {
  wallSeconds: number;
  /** CPU seconds of the watched process (the server, or a script) */
  watched: number;
  /** CPU seconds of this process (the load generator) */
  bench: number;
  /** CPU seconds of the PostgreSQL backends connected to the watched database */
  postgres: number;
  /** CPU seconds of everything else on the machine (PostgreSQL's shared processes, other programs) */
  rest: number;
  /** idle CPU seconds of the machine */
  idle: number;
}

/** CPU seconds so far of each PostgreSQL backend connected to a database (same machine only). */
async function backendCpu(database: string | undefined): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  if (database === undefined) return out;
  const client = new pg.Client({ connectionString: ADMIN_URL });
  await client.connect();
  try {
    const { rows } = await client.query<{ pid: number }>('select pid from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()', [database]);
    for (const { pid } of rows) {
      try {
        out.set(pid, processCpuSeconds(pid));
      } catch {
        // gone, or PostgreSQL runs elsewhere
      }
    }
  } finally {
    await client.end();
  }
  return out;
}

/**
 * Where the machine's CPU time goes between start and stop: the watched process, this one, the
 * PostgreSQL backends of `database` (backends that ended in between are missed), the rest, idle.
 */
export async function cpuSplit(watchPid: number | undefined, database?: string): Promise<{ stop(): Promise<CpuSplit> }> {
  const backends0 = await backendCpu(database);
  const started = performance.now();
  const machine0 = machineCpuSeconds();
  const self0 = process.cpuUsage();
  const watched0 = watchPid !== undefined ? processCpuSeconds(watchPid) : 0;
  return {
    async stop() {
      const machine1 = machineCpuSeconds();
      const self = process.cpuUsage(self0);
      const watched = watchPid !== undefined ? processCpuSeconds(watchPid) - watched0 : 0;
      const wallSeconds = (performance.now() - started) / 1000;
      const backends1 = await backendCpu(database);
      let postgres = 0;
      for (const [pid, cpu] of backends1) postgres += cpu - (backends0.get(pid) ?? 0);
      const bench = (self.user + self.system) / 1e6;
      const busy = machine1.busy - machine0.busy;
      return { wallSeconds, watched, bench, postgres, rest: Math.max(0, busy - watched - bench - postgres), idle: Math.max(0, machine1.total - machine0.total - busy) };
    },
  };
}

export function sumCpu(splits: readonly CpuSplit[]): CpuSplit {
  const sum = (pick: (s: CpuSplit) => number) => splits.reduce((total, s) => total + pick(s), 0);
  return { wallSeconds: sum((s) => s.wallSeconds), watched: sum((s) => s.watched), bench: sum((s) => s.bench), postgres: sum((s) => s.postgres), rest: sum((s) => s.rest), idle: sum((s) => s.idle) };
}

/** `CPU in cores: server 0.93, load generator 0.71, rest 0.30, idle 0.06` averaged over the measured time. */
export function describeCpu(split: CpuSplit, names: { watched: string; bench: string } = { watched: 'server', bench: 'load generator' }): string {
  const cores = (seconds: number) => (seconds / split.wallSeconds).toFixed(2);
  const parts = [
    split.watched > 0 ? `${names.watched} ${cores(split.watched)}` : '',
    `${names.bench} ${cores(split.bench)}`,
    split.postgres > 0 ? `PostgreSQL backends ${cores(split.postgres)}` : '',
    `rest ${cores(split.rest)}`,
    `idle ${cores(split.idle)}`,
  ];
  return `CPU in cores: ${parts.filter((p) => p !== '').join(', ')}`;
}

/**
 * Peak resident set size (VmHWM) so far of a process plus its live descendants (each one's own
 * peak, summed: an upper bound of the tree's peak), in bytes; undefined once it has exited.
 */
export function peakRss(pid: number): number | undefined {
  let sum: number | undefined;
  for (const { pid: p } of processTree(pid)) {
    try {
      const status = fs.readFileSync(`/proc/${p}/status`, 'utf8');
      const match = /^VmHWM:\s+(\d+) kB/m.exec(status);
      if (match) sum = (sum ?? 0) + Number(match[1]) * 1024;
    } catch {
      // exited
    }
  }
  return sum;
}

/** Follows a child's peak RSS by polling VmHWM (a high-water mark, so polling misses nothing but the last interval). */
export function watchPeakRss(pid: number, intervalMs = 250): { stop(): number } {
  let peak = 0;
  const read = () => {
    const value = peakRss(pid);
    if (value !== undefined && value > peak) peak = value;
  };
  read();
  const timer = setInterval(read, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      read();
      return peak;
    },
  };
}

export async function waitForHttp(url: string, child: Child, timeoutMs = 90_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let exitCode: number | string | undefined;
  void child.exited.then((code) => (exitCode = code));
  for (;;) {
    if (exitCode !== undefined) throw new Error(`the child exited (${exitCode}) before ${url} answered:\n${child.tail()}`);
    try {
      const response = await fetch(url, { signal: AbortSignal.timeout(2000) });
      if (response.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${url} did not answer within ${timeoutMs / 1000} s:\n${child.tail()}`);
    await sleep(200);
  }
}

// ---------------------------------------------------------------------------------------------
// Load

export interface LoadResult {
  /** 2xx answers per second over the run */
  rps: number;
  ok: number;
  non2xx: number;
  errors: number;
  timeouts: number;
  p50: number;
  p99: number;
  seconds: number;
  statusCodes: Record<string, number>;
  /** CPU seconds the watched process spent during the run */
  cpuSeconds?: number;
  cpu: CpuSplit;
}

export async function load(options: AutocannonOptions, watch?: { pid: number; database?: string }): Promise<LoadResult> {
  const watchPid = watch?.pid;
  const split = await cpuSplit(watchPid, watch?.database);
  const result: AutocannonResult = await autocannon(options);
  const cpu = await split.stop();
  const statusCodes = Object.fromEntries(Object.entries(result.statusCodeStats).map(([code, s]) => [code, s.count]));
  return {
    rps: result['2xx'] / result.duration,
    ok: result['2xx'],
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    p50: result.latency.p50,
    p99: result.latency.p99,
    seconds: result.duration,
    statusCodes,
    ...(watchPid !== undefined ? { cpuSeconds: cpu.watched } : {}),
    cpu,
  };
}

/** A load run must be clean: every answer 2xx, no socket errors or timeouts. */
export function assertClean(what: string, result: LoadResult): void {
  if (result.non2xx > 0 || result.errors > 0 || result.timeouts > 0) {
    throw new Error(`${what}: ${result.non2xx} non-2xx answers (${JSON.stringify(result.statusCodes)}), ${result.errors} errors, ${result.timeouts} timeouts`);
  }
}

export function machine(): { cpus: number; model: string; memoryGiB: number; node: string; platform: string } {
  const cpus = os.cpus();
  return { cpus: cpus.length, model: cpus[0]?.model.trim() ?? 'unknown', memoryGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version, platform: `${os.platform()} ${os.release()}` };
}
