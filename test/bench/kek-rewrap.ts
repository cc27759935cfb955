/**
 * Figure 6: KEK rotation rewrap of N group DEKs through the vault provider and the transit
 * emulator (its own process, as Vault would be), with the service's own rotation code
 * (rotation/kek-rotation.service.ts: transit rotate, rewrap in batches, each batch's swap and
 * audit events in one transaction).
 *
 * Seeding: N groups with one primary version each, their DEKs wrapped through the provider
 * (transit encrypt, bounded concurrency) and inserted in bulk; the audit keys come from
 * audit.init(). Each run is one `POST /v1/kek/rotate` worth of work (`run({ mode: 'manual' })`):
 * a new KEK version and every blob rewrapped to it. Batch sizes are counted twice: items per
 * `rewrapBatch` call at the provider boundary, and rewrap requests answered by the emulator.
 */
import { fork } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import inspector from 'node:inspector/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createAuditService } from '../../src/audit/audit.service.js';
import { systemClock } from '../../src/clock.js';
import { groupBinding } from '../../src/crypto/binding.js';
import { createPostgresDatabase } from '../../src/db/database.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createVaultKekProvider } from '../../src/kek/vault.provider.js';
import { createKekRotationService, type KekRotationSummary } from '../../src/rotation/kek-rotation.service.js';
import { createPolicyService } from '../../src/rotation/policy.service.js';
import { cpuSplit, createScratchDatabase, log, REPO_ROOT, type CpuSplit } from './support.js';

export interface KekRewrapRun {
  seconds: number;
  blobsPerSecond: number;
  groupBlobs: number;
  auditKeys: number;
  failed: number;
  /** items per rewrapBatch call carrying group blobs (the provider boundary) */
  groupBatchSizes: number[];
  /** rewrap requests the emulator answered during the run (group batches + the audit keys' one) */
  transitRewrapRequests: number;
  /** watched: the emulator's process; bench: this process (the rotation service, pg, node-vault) */
  cpu: CpuSplit;
}

export interface KekRewrapResult {
  groups: number;
  seedSeconds: number;
  runs: KekRewrapRun[];
}

interface EmulatorChild {
  pid: number | undefined;
  url: string;
  token: string;
  mount: string;
  rewrapRequests(): Promise<number>;
  /** starts the emulator's CPU profiler (through node:inspector) */
  profileStart(): Promise<void>;
  /** stops it and writes the profile to `file` */
  profileStop(file: string): Promise<void>;
  close(): Promise<void>;
}

async function startEmulatorChild(): Promise<EmulatorChild> {
  const child = fork(path.join(REPO_ROOT, 'test/bench/transit-child.ts'), [], { cwd: REPO_ROOT, execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  type Message =
    | { type: 'ready'; url: string; token: string; mount: string }
    | { type: 'requests'; requests: Array<{ method: string; path: string; status: number }> }
    | { type: 'profiling' }
    | { type: 'profiled' };
  const next = <T extends Message['type']>(type: T) =>
    new Promise<Extract<Message, { type: T }>>((resolve, reject) => {
      const onMessage = (message: Message) => {
        if (message.type !== type) return;
        child.off('message', onMessage);
        child.off('exit', onExit);
        resolve(message as Extract<Message, { type: T }>);
      };
      const onExit = (code: number | null) => reject(new Error(`the transit emulator exited (${code})`));
      child.on('message', onMessage);
      child.once('exit', onExit);
    });
  const ready = await next('ready');
  return {
    pid: child.pid,
    url: ready.url,
    token: ready.token,
    mount: ready.mount,
    async rewrapRequests() {
      const answer = next('requests');
      child.send({ type: 'requests' });
      return (await answer).requests.filter((r) => r.method === 'POST' && /\/rewrap\//.test(r.path) && r.status === 200).length;
    },
    async profileStart() {
      const answer = next('profiling');
      child.send({ type: 'profile-start' });
      await answer;
    },
    async profileStop(file: string) {
      const answer = next('profiled');
      child.send({ type: 'profile-stop', file });
      await answer;
    },
    async close() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.send({ type: 'close' });
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 5000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}

/** Runs `work` over `items` with at most `concurrency` in flight. */
async function pool<T>(items: readonly T[], concurrency: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, items.length) }, async () => {
      while (next < items.length) await work(items[next++] as T);
    }),
  );
}

/** `profileDir`: CPU profiles of both processes (this one and the emulator's) over each measured run, `kek-<run>-{rotation,emulator}.cpuprofile`. */
export async function benchKekRewrap(options: { groups: number; runs: number; profileDir?: string | undefined }): Promise<KekRewrapResult> {
  const emulator = await startEmulatorChild();
  const scratch = await createScratchDatabase('kek');
  const database = createPostgresDatabase(scratch.url, 10);
  const batchSizes: number[] = [];
  try {
    await migrateToLatest(database.db);
    const vault = createVaultKekProvider({ addr: emulator.url, token: emulator.token, transitMount: emulator.mount, keyName: 'keystrata-kek', requestTimeoutMs: 60_000 });
    // the provider as the rotation service sees it, counting the items of each rewrap call
    const kek: KekProvider = {
      ...vault,
      async rewrapBatch(items) {
        batchSizes.push(items.length);
        return vault.rewrapBatch(items);
      },
    };
    await kek.init();
    const audit = createAuditService({ db: database.db, kek, clock: systemClock });
    await audit.init();
    const policies = createPolicyService({ db: database.db, audit, clock: systemClock });
    const rotation = createKekRotationService({ db: database.db, kek, audit, clock: systemClock, policies });

    // --- seed: N group DEKs wrapped by transit, inserted in bulk
    let started = performance.now();
    const ids = Array.from({ length: options.groups }, (_, i) => `bench-kek-${String(i).padStart(6, '0')}`);
    const wrapped = new Map<string, string>();
    await pool(ids, 32, async (id) => {
      const key = crypto.randomBytes(32);
      wrapped.set(id, await kek.wrap(key, groupBinding(id, 1, kek.keyName)));
      key.fill(0);
    });
    const now = new Date();
    for (let i = 0; i < ids.length; i += 1000) {
      const slice = ids.slice(i, i + 1000);
      await database.db.transaction().execute(async (trx) => {
        await trx.insertInto('key_groups').values(slice.map((id) => ({ id, device_type: 'sensor', region: 'eu', created_at: now }))).execute();
        await trx
          .insertInto('group_versions')
          .values(slice.map((id) => ({ group_id: id, version: 1, state: 'primary' as const, wrapped_key: wrapped.get(id) as string, kek_version: 1, created_at: now, state_changed_at: now, state_until: null })))
          .execute();
      });
    }
    const seedSeconds = (performance.now() - started) / 1000;
    log(`kek: seeded ${options.groups} group DEKs through transit in ${seedSeconds.toFixed(1)} s`);

    const runs: KekRewrapRun[] = [];
    for (let run = 1; run <= options.runs; run++) {
      batchSizes.length = 0;
      const requestsBefore = await emulator.rewrapRequests();
      started = performance.now();
      const profiler = options.profileDir !== undefined ? new inspector.Session() : undefined;
      if (profiler) {
        profiler.connect();
        await profiler.post('Profiler.enable');
        await profiler.post('Profiler.start');
        await emulator.profileStart();
        started = performance.now();
      }
      const split = await cpuSplit(emulator.pid, scratch.name);
      const summary: KekRotationSummary = await rotation.run({ actor: 'bench', requestId: `bench-kek-${run}` }, { mode: 'manual' });
      const seconds = (performance.now() - started) / 1000;
      const cpu = await split.stop();
      if (profiler && options.profileDir !== undefined) {
        const { profile } = await profiler.post('Profiler.stop');
        profiler.disconnect();
        fs.mkdirSync(options.profileDir, { recursive: true });
        fs.writeFileSync(path.join(options.profileDir, `kek-${run}-rotation.cpuprofile`), JSON.stringify(profile));
        await emulator.profileStop(path.resolve(options.profileDir, `kek-${run}-emulator.cpuprofile`));
      }
      const transitRewrapRequests = (await emulator.rewrapRequests()) - requestsBefore;
      const { groupKeys, auditKeys } = summary.rewrap;
      if (groupKeys.rewrapped !== options.groups || groupKeys.failed > 0 || groupKeys.remaining > 0) {
        throw new Error(`KEK rewrap run ${run}: ${JSON.stringify(summary.rewrap)}`);
      }
      // the audit keys go first, in a call of their own (kek-rotation.service.ts)
      const groupBatchSizes = auditKeys.rewrapped + auditKeys.failed > 0 ? batchSizes.slice(1) : [...batchSizes];
      runs.push({
        seconds,
        blobsPerSecond: groupKeys.rewrapped / seconds,
        groupBlobs: groupKeys.rewrapped,
        auditKeys: auditKeys.rewrapped,
        failed: groupKeys.failed + auditKeys.failed,
        groupBatchSizes,
        transitRewrapRequests,
        cpu,
      });
      log(`kek run ${run}: ${groupKeys.rewrapped} group blobs (+${auditKeys.rewrapped} audit keys) rewrapped v${summary.fromVersion}→v${summary.toVersion} in ${seconds.toFixed(2)} s = ${Math.round(groupKeys.rewrapped / seconds)} blobs/s; ${transitRewrapRequests} rewrap requests at transit`);
    }
    await audit.close();
    await kek.close();
    return { groups: options.groups, seedSeconds, runs };
  } finally {
    await database.close();
    await scratch.drop();
    await emulator.close();
  }
}

// Standalone: `npx tsx test/bench/kek-rewrap.ts` (BENCH_KEK_GROUPS, BENCH_RUNS, BENCH_KEK_PROFILE=<dir>):
// each run's rate, batch sizes and CPU per blob (rotation process, emulator, PostgreSQL backends).
if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const groups = Number(process.env.BENCH_KEK_GROUPS ?? 10_000);
  const runs = Number(process.env.BENCH_RUNS ?? 3);
  const result = await benchKekRewrap({ groups, runs, profileDir: process.env.BENCH_KEK_PROFILE || undefined });
  const us = (seconds: number, blobs: number) => ((seconds * 1e6) / blobs).toFixed(0);
  for (const [i, r] of result.runs.entries()) {
    const sizes = r.groupBatchSizes;
    process.stdout.write(
      `run ${i + 1}: ${r.groupBlobs} blobs in ${r.seconds.toFixed(3)} s = ${Math.round(r.blobsPerSecond)} blobs/s; batches ${sizes.length} (min ${Math.min(...sizes)}, max ${Math.max(...sizes)}), ` +
        `${r.transitRewrapRequests} rewrap requests; CPU µs/blob: rotation ${us(r.cpu.bench, r.groupBlobs)}, emulator ${us(r.cpu.watched, r.groupBlobs)}, ` +
        `PostgreSQL ${us(r.cpu.postgres, r.groupBlobs)}, rest ${us(r.cpu.rest, r.groupBlobs)}; idle ${(r.cpu.idle / r.cpu.wallSeconds).toFixed(2)} cores\n`,
    );
  }
  const rates = result.runs.map((r) => r.blobsPerSecond).sort((a, b) => a - b);
  process.stdout.write(`median ${Math.round(rates[Math.floor(rates.length / 2)] as number)} blobs/s over ${rates.length} runs (seeded in ${result.seedSeconds.toFixed(1)} s)\n`);
}
