/**
 * One rollout wave over a whole group on real PostgreSQL:
 *
 *   npx tsx test/bench/rollout-wave.ts [--devices 100000] [--fields 0] [--chunk 1000] [--workers 2] [--keep] [--statements]
 *
 * Creates a scratch database on BENCH_DATABASE_URL (or TEST_DATABASE_URL, or the machine's
 * 127.0.0.1:5432), migrates it, creates a group and enrols `--devices` devices directly (fast
 * path: device DEKs generated and wrapped in Node, rows written with multi-row `unnest` INSERTs
 * of 10,000; no enrolment audit events), `--fields` of them (a fraction, 0..1) with one field key.
 * Then it starts a device-level rollout at 100 % a day (one wave) and runs the cron hook once over
 * all of it, as `POST /v1/rotation/run` would (listing the wave, chunks in FOR UPDATE SKIP LOCKED
 * transactions, audit events, outbox rows), and prints devices/s and the peak RSS of this process
 * (`process.resourceUsage().maxRSS`), this process's CPU and the CPU of the PostgreSQL backends
 * serving the scratch database (from /proc, by process title: on a shared machine the wall time
 * moves with the load, the CPU per device much less), checks every device was rotated exactly
 * once, and drops the database (unless --keep). `--statements`: client-side wall time per SQL
 * statement (lock waits included) and the wall time spent in `audit.record`, for profiling.
 * Last line: `BENCH_RESULT {...}` for the benchmark runner.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { parseArgs } from 'node:util';
import { sql } from 'kysely';
import pg from 'pg';
import { createAuditService } from '../../src/audit/audit.service.js';
import { systemClock } from '../../src/clock.js';
import { generateKey, wrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding } from '../../src/crypto/binding.js';
import { createPostgresDatabase } from '../../src/db/database.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createKeyService } from '../../src/keys/key.service.js';
import { createPolicyService } from '../../src/rotation/policy.service.js';
import { createRolloutService } from '../../src/rotation/rollout.service.js';

const { values: args } = parseArgs({
  options: {
    devices: { type: 'string', default: '100000' },
    fields: { type: 'string', default: '0' },
    chunk: { type: 'string', default: '1000' },
    workers: { type: 'string', default: '2' },
    keep: { type: 'boolean', default: false },
    /** per statement: calls, wall time (client side, lock waits included), and the wall time inside audit.record */
    statements: { type: 'boolean', default: false },
  },
});
const devices = Number(args.devices);
const fieldShare = Number(args.fields);
const chunkSize = Number(args.chunk);
const workers = Number(args.workers);
const adminUrl = process.env.BENCH_DATABASE_URL ?? process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const name = `ks_bench_rollout_${crypto.randomBytes(4).toString('hex')}`;
const ENROL_BATCH = 10_000;
const GROUP = 'bench-fleet';
const MB = 1024 * 1024;

async function admin(statement: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(statement);
  } finally {
    await client.end();
  }
}

/** RSS sampled every 100 ms besides the kernel's own peak (maxRSS), to see where memory goes. */
function watchMemory(): { stop(): { maxRssMb: number; sampledPeakMb: number; heapPeakMb: number } } {
  let peak = 0;
  let heap = 0;
  const timer = setInterval(() => {
    const m = process.memoryUsage();
    peak = Math.max(peak, m.rss);
    heap = Math.max(heap, m.heapUsed);
  }, 100);
  return {
    stop() {
      clearInterval(timer);
      return { maxRssMb: process.resourceUsage().maxRSS / 1024, sampledPeakMb: peak / MB, heapPeakMb: heap / MB };
    },
  };
}

/**
 * CPU time of the PostgreSQL processes working for this database (its backends and autovacuum
 * workers, by process title) and of the shared background processes (WAL writer, checkpointer,
 * background writer: shared with anything else on the server), from /proc, sampled every 100 ms
 * so that backends which exit are still counted. Linux only; zero elsewhere.
 */
function watchPostgresCpu(database: string): { stop(): { ownSeconds: number; sharedSeconds: number } } {
  const tick = 100; // USER_HZ (clock ticks a second) on Linux
  const ownFirst = new Map<number, number>();
  const ownLast = new Map<number, number>();
  const sharedFirst = new Map<number, number>();
  const sharedLast = new Map<number, number>();
  const read = (first: boolean) => {
    let pids: string[];
    try {
      pids = fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d));
    } catch {
      return;
    }
    for (const pid of pids) {
      let title: string;
      let stat: string;
      try {
        title = fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1');
        if (!title.startsWith('postgres: ')) continue;
        stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
      } catch {
        continue;
      }
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const cpu = (Number(fields[11]) + Number(fields[12])) / tick;
      const own = title.includes(` ${database} `) || title.includes(`autovacuum worker ${database}`);
      const shared = /(walwriter|checkpointer|background writer)/.test(title);
      if (!own && !shared) continue;
      const [firstMap, lastMap] = own ? [ownFirst, ownLast] : [sharedFirst, sharedLast];
      if (!firstMap.has(Number(pid))) firstMap.set(Number(pid), first ? cpu : 0);
      lastMap.set(Number(pid), cpu);
    }
  };
  read(true);
  const timer = setInterval(() => read(false), 100);
  const sum = (first: Map<number, number>, last: Map<number, number>) => [...last].reduce((n, [pid, cpu]) => n + cpu - (first.get(pid) ?? 0), 0);
  return {
    stop() {
      clearInterval(timer);
      read(false);
      return { ownSeconds: sum(ownFirst, ownLast), sharedSeconds: sum(sharedFirst, sharedLast) };
    },
  };
}

/** Client-side wall time per statement (normalised text), lock waits included. */
function watchStatements(): { stop(): Array<{ statement: string; calls: number; seconds: number }> } {
  const stats = new Map<string, { calls: number; ns: bigint }>();
  const proto = pg.Client.prototype as unknown as { query: (...a: unknown[]) => unknown };
  const original = proto.query;
  proto.query = function (this: unknown, ...a: unknown[]) {
    const text = typeof a[0] === 'string' ? a[0] : ((a[0] as { text?: string } | undefined)?.text ?? '?');
    const key = text.replace(/\s+/g, ' ').trim().slice(0, 90);
    const started = process.hrtime.bigint();
    const out = original.apply(this, a);
    const done = () => {
      const entry = stats.get(key) ?? { calls: 0, ns: 0n };
      entry.calls += 1;
      entry.ns += process.hrtime.bigint() - started;
      stats.set(key, entry);
    };
    if (out && typeof (out as Promise<unknown>).then === 'function') (out as Promise<unknown>).then(done, done);
    return out;
  };
  return {
    stop() {
      proto.query = original;
      return [...stats].map(([statement, s]) => ({ statement, calls: s.calls, seconds: Number(s.ns) / 1e9 })).sort((a, b) => b.seconds - a.seconds);
    },
  };
}

async function main(): Promise<void> {
  if (!Number.isInteger(devices) || devices < 1 || !(fieldShare >= 0 && fieldShare <= 1)) throw new Error('usage: --devices N (>= 1) --fields F (0..1)');
  await admin(`create database "${name}"`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  const database = createPostgresDatabase(url.toString(), 10);
  const db = database.db;
  const logger = { info() {}, warn() {}, error: (obj: unknown, msg?: string) => console.error(msg, obj) };
  try {
    await migrateToLatest(db);
    const kek = createLocalKekProvider({ db, rootKey: crypto.randomBytes(32), dataDir: os.tmpdir(), keyName: 'bench-kek', logger: { warn() {} } });
    await kek.init();
    const audit = createAuditService({ db, kek, clock: systemClock });
    await audit.init();
    const material = createKeyMaterial({ kek, cache: createKeyCache({ ttlSeconds: 3600, maxEntries: 10_000 }) });
    const keys = createKeyService({ db, material, audit, clock: systemClock });
    await keys.createGroup({ actor: 'bench' }, { id: GROUP, deviceType: 'meter', region: 'eu' });
    const groupRow = await db.selectFrom('group_versions').select(['version', 'wrapped_key']).where('group_id', '=', GROUP).executeTakeFirstOrThrow();
    const groupKey = await material.groupKey(GROUP, groupRow.version, groupRow.wrapped_key);

    // ---- enrolment (fast path) ----
    let started = performance.now();
    const now = new Date();
    let withFields = 0;
    for (let from = 0; from < devices; from += ENROL_BATCH) {
      const ids = Array.from({ length: Math.min(ENROL_BATCH, devices - from) }, (_, i) => `meter-${String(from + i).padStart(8, '0')}`);
      const wrapped: Buffer[] = [];
      const fieldIds: string[] = [];
      const fieldWraps: Buffer[] = [];
      for (const id of ids) {
        const key = generateKey();
        wrapped.push(wrapKey(groupKey, key, deviceBinding(id, 1, GROUP, groupRow.version)));
        // a deterministic share of the devices gets one field key, wrapped under device v1
        if (fieldShare > 0 && crypto.createHash('sha1').update(id).digest().readUInt16BE(0) / 65_536 < fieldShare) {
          const fieldKey = generateKey();
          fieldIds.push(id);
          fieldWraps.push(wrapKey(key, fieldKey, fieldBinding(id, 'reading', 1, 1)));
          fieldKey.fill(0);
        }
        key.fill(0);
      }
      await db.transaction().execute(async (trx) => {
        await sql`insert into devices (id, group_id, created_at) select u.id, ${GROUP}, ${now}::timestamptz from unnest(${ids}::text[]) as u(id)`.execute(trx);
        await sql`
          insert into device_versions (device_id, version, state, wrapped_key, parent_version, created_at, state_changed_at)
          select u.id, 1, 'primary', u.w, ${groupRow.version}, ${now}::timestamptz, ${now}::timestamptz from unnest(${ids}::text[], ${wrapped}::bytea[]) as u(id, w)`.execute(trx);
        if (fieldIds.length > 0) {
          await sql`insert into field_keys (device_id, field, created_at) select u.id, 'reading', ${now}::timestamptz from unnest(${fieldIds}::text[]) as u(id)`.execute(trx);
          await sql`
            insert into field_versions (device_id, field, version, state, wrapped_key, parent_version, created_at, state_changed_at)
            select u.id, 'reading', 1, 'primary', u.w, 1, ${now}::timestamptz, ${now}::timestamptz from unnest(${fieldIds}::text[], ${fieldWraps}::bytea[]) as u(id, w)`.execute(trx);
        }
      });
      withFields += fieldIds.length;
    }
    groupKey.fill(0);
    // statistics for the fleet's tables only: analyzing the nearly empty audit_events now would
    // give its insert trigger's predecessor lookup a sequential-scan plan for the whole run
    await sql`analyze devices, device_versions, field_keys, field_versions`.execute(db);
    const enrolSeconds = (performance.now() - started) / 1000;
    console.log(`enrol : ${devices} devices (${withFields} with a field key) in ${enrolSeconds.toFixed(1)} s`);

    // ---- one wave over all of them ----
    const policies = createPolicyService({ db, audit, clock: systemClock });
    let firstChunkAt: number | undefined;
    let chunks = 0;
    let auditNs = 0n;
    let auditEvents = 0;
    const timedAudit: typeof audit = {
      ...audit,
      async record(executor, events) {
        const t0 = process.hrtime.bigint();
        try {
          await audit.record(executor, events);
        } finally {
          auditNs += process.hrtime.bigint() - t0;
          auditEvents += events.length;
        }
      },
    };
    const rollouts = createRolloutService({
      db,
      material,
      audit: args.statements ? timedAudit : audit,
      clock: systemClock,
      policies,
      logger,
      chunkSize,
      workers,
      hooks: {
        afterChunk: () => {
          chunks += 1;
          firstChunkAt ??= performance.now();
        },
      },
    });
    const rollout = await rollouts.start({ actor: 'bench' }, { groupId: GROUP, level: 'device', percentPerDay: 100, waveIntervalSeconds: 86_400 });
    const memory = watchMemory();
    const pgCpu = watchPostgresCpu(name);
    const statements = args.statements ? watchStatements() : undefined;
    const cpuBefore = process.cpuUsage();
    started = performance.now();
    const result = await rollouts.runDueWaves({ now: new Date(), limit: devices * 2, dryRun: false, actor: 'bench', canStart: async () => true });
    const waveSeconds = (performance.now() - started) / 1000;
    const cpu = process.cpuUsage(cpuBefore);
    const nodeCpuSeconds = (cpu.user + cpu.system) / 1e6;
    const { maxRssMb, sampledPeakMb, heapPeakMb } = memory.stop();
    const { ownSeconds: pgCpuSeconds, sharedSeconds: pgSharedCpuSeconds } = pgCpu.stop();
    const statementStats = statements?.stop();
    if (result.errors.length > 0) throw result.errors[0]!.error;
    const listSeconds = firstChunkAt === undefined ? 0 : (firstChunkAt - started) / 1000;

    // ---- checks: every device rotated exactly once ----
    const view = await rollouts.get(rollout.id);
    const { rows } = await sql<{ versions: number; primaries_v2: number; graces: number; outbox: number }>`
      select (select count(*) from device_versions) as versions,
             (select count(*) from device_versions where state = 'primary' and version = 2) as primaries_v2,
             (select count(*) from device_versions where state = 'grace' and version = 1) as graces,
             (select count(*) from key_outbox where kind = 'device' and version = 2) as outbox`.execute(db);
    const check = rows[0]!;
    const ok = view.state === 'completed' && view.totals.done === devices && check.versions === 2 * devices && check.primaries_v2 === devices && check.graces === devices && check.outbox === devices;
    const rate = devices / waveSeconds;
    console.log(
      `wave  : ${result.devices} devices in ${waveSeconds.toFixed(1)} s = ${Math.round(rate)} devices/s ` +
        `(listing ${listSeconds.toFixed(1)} s, ${chunks} chunks of ${chunkSize}, ${workers} workers, ${result.fields} field keys rewrapped)`,
    );
    console.log(`cpu   : this process ${nodeCpuSeconds.toFixed(1)} s (${Math.round((nodeCpuSeconds / devices) * 1e6)} µs a device); the rest of the wave's time is PostgreSQL's`);
    console.log(
      `pg cpu: this database's backends ${pgCpuSeconds.toFixed(1)} s (${Math.round((pgCpuSeconds / devices) * 1e6)} µs a device); ` +
        `WAL writer, checkpointer, background writer ${pgSharedCpuSeconds.toFixed(1)} s (shared with the rest of the server)`,
    );
    if (statementStats) {
      console.log(`audit : audit.record ${(Number(auditNs) / 1e9).toFixed(1)} s wall over ${auditEvents} events (head lock wait included; summed over workers)`);
      console.log('statements (client wall time summed over workers, lock waits included):');
      for (const s of statementStats.slice(0, 25)) console.log(`  ${s.seconds.toFixed(2).padStart(7)} s ${String(s.calls).padStart(6)}×  ${s.statement}`);
    }
    console.log(`memory: peak RSS ${maxRssMb.toFixed(0)} MB (maxRSS of the process, enrolment included); sampled during the wave ${sampledPeakMb.toFixed(0)} MB, JS heap at most ${heapPeakMb.toFixed(0)} MB`);
    console.log(`check : ${ok ? 'every device rotated exactly once (v1 grace, v2 primary, one outbox row each)' : `FAILED ${JSON.stringify({ state: view.state, totals: view.totals, ...check })}`}`);
    console.log(`host  : ${os.cpus().length} CPUs, load ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, Node ${process.version}`);
    console.log(
      `BENCH_RESULT ${JSON.stringify({ devices, withFields, chunkSize, workers, enrolSeconds, waveSeconds, listSeconds, devicesPerSecond: rate, nodeCpuSeconds, pgCpuSeconds, pgSharedCpuSeconds, maxRssMb, sampledPeakMb, heapPeakMb, ok })}`,
    );
    await audit.close();
    await kek.close();
    if (!ok) process.exitCode = 1;
  } finally {
    await database.close();
    if (!args.keep) await admin(`drop database if exists "${name}" with (force)`);
    else console.log(`kept database ${name}`);
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
