/**
 * How fast `verify` walks the audit chain: `npx tsx test/bench/audit-verify.ts [events] [runs]`
 * (default 300,000 events, 1 run). Creates a scratch database on BENCH_DATABASE_URL (or
 * TEST_DATABASE_URL, or the machine's 127.0.0.1:5432), fills the chain through `record` in
 * rollout-sized transactions, verifies the whole chain `runs` times, prints events/s for both,
 * and drops the database. Figure 7 of `npm run bench` (run.ts) runs it as a child process and
 * reads its last line: `BENCH_RESULT {"events":…,"writeSeconds":…,"verify":[{"checked":…,"seconds":…}]}`.
 */
import crypto from 'node:crypto';
import os from 'node:os';
import { sql } from 'kysely';
import pg from 'pg';
import { createAuditService } from '../../src/audit/audit.service.js';
import { createManualClock } from '../../src/clock.js';
import { createPostgresDatabase } from '../../src/db/database.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';

const events = Number(process.argv[2] ?? 300_000);
const runs = Number(process.argv[3] ?? 1);
const adminUrl = process.env.BENCH_DATABASE_URL ?? process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const name = `ks_bench_audit_${crypto.randomBytes(4).toString('hex')}`;
const PER_TRANSACTION = 5000;

async function admin(statement: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(statement);
  } finally {
    await client.end();
  }
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

    let started = performance.now();
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
    const writeSeconds = (performance.now() - started) / 1000;
    await sql`analyze audit_events`.execute(database.db);

    console.log(`write : ${events} events in ${writeSeconds.toFixed(2)} s = ${Math.round(events / writeSeconds)} events/s (transactions of ${PER_TRANSACTION})`);
    const verified: Array<{ ok: boolean; checked: number; seconds: number }> = [];
    for (let run = 1; run <= runs; run++) {
      started = performance.now();
      const result = await audit.verify();
      const verifySeconds = (performance.now() - started) / 1000;
      console.log(JSON.stringify(result));
      console.log(`verify: ${result.checked} events in ${verifySeconds.toFixed(2)} s = ${Math.round(result.checked / verifySeconds)} events/s (${os.cpus().length} CPUs, Node ${process.version})`);
      verified.push({ ok: result.ok, checked: result.checked, seconds: verifySeconds });
    }
    console.log(`BENCH_RESULT ${JSON.stringify({ events, writeSeconds, verify: verified })}`);
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
