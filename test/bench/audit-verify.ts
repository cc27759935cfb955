/**
 * How fast the audit chain is written and verified:
 *
 *   npx tsx test/bench/audit-verify.ts [events] [runs] [--batch N] [--skip-verify]
 *
 * (default 300,000 events, 1 verify run, `record` calls of 5,000 events). Creates a scratch
 * database on BENCH_DATABASE_URL (or TEST_DATABASE_URL, or the machine's 127.0.0.1:5432), fills
 * the chain through `record(trx, events)` with `--batch` events per transaction (bulk enrolment
 * writes 10,000 per call), verifies the whole chain `runs` times, prints events/s for both with
 * the CPU time spent per event — by this Node process (all its threads, so verify's workers
 * too) and by the PostgreSQL backends of the scratch database (from /proc, so only when the
 * server runs on this machine) — and drops the database. The machine is shared: compare CPU per
 * event as well as rates, and compare before/after in back-to-back runs.
 *
 * Figure 7 of `npm run bench` (run.ts) runs it as a child process with the two positional
 * arguments and reads its last line:
 * `BENCH_RESULT {"events":…,"writeSeconds":…,"verify":[{"ok":…,"checked":…,"seconds":…,…}],…}`.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { sql } from 'kysely';
import pg from 'pg';
import { createAuditService } from '../../src/audit/audit.service.js';
import { createManualClock } from '../../src/clock.js';
import { createPostgresDatabase } from '../../src/db/database.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';

const USAGE = `usage: npx tsx test/bench/audit-verify.ts [events=300000] [runs=1] [--batch N=5000] [--skip-verify]
  events         events written through record(trx, events), then verified
  runs           how many times the whole chain is verified
  --batch N      events per record() call, one transaction each (bulk enrolment writes 10,000)
  --skip-verify  measure the writes only
env: BENCH_DATABASE_URL / TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)`;

const argv = process.argv.slice(2);
if (argv.includes('--help') || argv.includes('-h')) {
  console.log(USAGE);
  process.exit(0);
}
function flag(name: string): string | undefined {
  const i = argv.indexOf(name);
  if (i < 0) return undefined;
  const value = argv[i + 1];
  argv.splice(i, 2);
  return value;
}
const skipVerify = argv.includes('--skip-verify');
if (skipVerify) argv.splice(argv.indexOf('--skip-verify'), 1);
const PER_TRANSACTION = Number(flag('--batch') ?? 5000);
const events = Number(argv[0] ?? 300_000);
const runs = Number(argv[1] ?? 1);
if (![PER_TRANSACTION, events, runs].every((n) => Number.isSafeInteger(n) && n > 0)) {
  console.error(USAGE);
  process.exit(2);
}
const adminUrl = process.env.BENCH_DATABASE_URL ?? process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const name = `ks_bench_audit_${crypto.randomBytes(4).toString('hex')}`;
const TICK_SECONDS = 1 / 100; // USER_HZ; /proc/<pid>/stat counts in clock ticks

async function admin(statement: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(statement);
  } finally {
    await client.end();
  }
}

/** CPU seconds (user + system) of the server processes of the scratch database, by pid. */
async function serverCpu(): Promise<Map<number, number> | undefined> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    const { rows } = await client.query<{ pid: number }>('select pid from pg_stat_activity where datname = $1', [name]);
    const cpu = new Map<number, number>();
    for (const { pid } of rows) {
      try {
        const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
        const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        cpu.set(pid, (Number(fields[11]) + Number(fields[12])) * TICK_SECONDS);
      } catch {
        return undefined; // not on this machine
      }
    }
    return cpu;
  } finally {
    await client.end();
  }
}

/** Measure `fn`: wall seconds, CPU seconds of this process (every thread) and of the database's backends. */
async function measure<T>(fn: () => Promise<T>): Promise<{ value: T; seconds: number; nodeCpu: number; serverCpu: number | undefined }> {
  const serverBefore = await serverCpu();
  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  const value = await fn();
  const seconds = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  const serverAfter = await serverCpu();
  let server: number | undefined;
  if (serverBefore && serverAfter) {
    // the pool keeps its connections while busy; a backend that appeared counts from zero
    server = 0;
    for (const [pid, seconds] of serverAfter) server += seconds - (serverBefore.get(pid) ?? 0);
  }
  return { value, seconds, nodeCpu: (cpu.user + cpu.system) / 1e6, serverCpu: server };
}

function describe(count: number, m: { seconds: number; nodeCpu: number; serverCpu: number | undefined }): string {
  const perEvent = (s: number) => `${((s / count) * 1e6).toFixed(2)} µs`;
  return (
    `${count} events in ${m.seconds.toFixed(2)} s = ${Math.round(count / m.seconds)} events/s; CPU/event: node ${perEvent(m.nodeCpu)}` +
    (m.serverCpu === undefined ? '' : `, postgres ${perEvent(m.serverCpu)}`)
  );
}

async function main(): Promise<void> {
  await admin(`create database "${name}"`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  const database = createPostgresDatabase(url.toString(), 4);
  const dataDir = os.tmpdir();
  try {
    await migrateToLatest(database.db);
    const kek = createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir, keyName: 'bench-kek', logger: { warn() {} } });
    await kek.init();
    const audit = createAuditService({ db: database.db, kek, clock: createManualClock() });
    await audit.init();

    // As in the server, each connection's first events come one at a time (a delivery, a policy
    // change): PostgreSQL keeps the link check's plan per connection, so a plan made for one row
    // must not slow the big batches after it (it once did: 20261121001300_audit_links_window.ts).
    await Promise.all(
      Array.from({ length: 4 }, (_, i) =>
        database.db.transaction().execute((trx) => audit.record(trx, [{ actor: 'bench', action: 'bench.prime', outcome: 'success', keyId: `prime-${i}`, details: {}, requestId: `prime-${i}` }])),
      ),
    );
    const write = await measure(async () => {
      for (let done = 0; done < events; done += PER_TRANSACTION) {
        const batch = Array.from({ length: Math.min(PER_TRANSACTION, events - done) }, (_, i) => ({
          actor: 'system:rotation',
          action: 'device.rotate',
          outcome: 'success' as const,
          keyId: `device:sensor-${done + i}`,
          details: { fromVersion: 3, toVersion: 4, rollout: 'r-2026-03', wave: 2 },
          requestId: 'req-0f8e2c1a',
        }));
        await database.db.transaction().execute((trx) => audit.record(trx, batch));
      }
    });
    // settled as a long-lived chain is: its hint bits set and vacuumed, so no autovacuum of the rows
    // just written runs during (and is counted in) a verify run, and run 1 does not set hint bits
    await sql`vacuum (analyze) audit_events`.execute(database.db);
    console.log(`write : ${describe(events, write)} (record() calls of ${PER_TRANSACTION}, one transaction each)`);

    const verified: Array<{ ok: boolean; checked: number; seconds: number; nodeCpuSeconds: number; serverCpuSeconds?: number }> = [];
    // a warm-up walk, not counted (as the load figures' warm-up): it starts the verify worker
    // threads and compiles the hot paths, which a long-running service does once
    if (!skipVerify) {
      const warmUp = await measure(() => audit.verify());
      console.log(`warm-up verify (not counted): ${describe(warmUp.value.checked, warmUp)}, ok ${warmUp.value.ok}`);
    }
    for (let run = 1; run <= (skipVerify ? 0 : runs); run++) {
      const m = await measure(() => audit.verify());
      console.log(JSON.stringify(m.value));
      console.log(`verify: ${describe(m.value.checked, m)} (${os.cpus().length} CPUs, Node ${process.version})`);
      verified.push({ ok: m.value.ok, checked: m.value.checked, seconds: m.seconds, nodeCpuSeconds: m.nodeCpu, ...(m.serverCpu === undefined ? {} : { serverCpuSeconds: m.serverCpu }) });
    }
    const result = {
      events,
      writeSeconds: write.seconds,
      writeBatch: PER_TRANSACTION,
      writeNodeCpuSeconds: write.nodeCpu,
      ...(write.serverCpu === undefined ? {} : { writeServerCpuSeconds: write.serverCpu }),
      verify: verified,
    };
    console.log(`BENCH_RESULT ${JSON.stringify(result)}`);
    await audit.close();
    await kek.close();
  } finally {
    await database.close();
    await admin(`drop database if exists "${name}" with (force)`);
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
