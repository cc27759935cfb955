/**
 * Staggered rollouts (DESIGN §3): a group's device DEKs (or field keys) rotated in waves.
 *
 *   start     POST /v1/rollouts, or the cron entry when a group's device (or field) level falls
 *             due: a rollout row and its wave rows (canary, waves, final sweep; rollout.waves.ts),
 *             audited. At most one active rollout per group and level.
 *   waves     The cron entry (`runDueWaves`) takes the first unfinished wave of each running
 *             rollout once it is due (`start + paused time + k × interval`; a new wave only
 *             inside the group's maintenance windows), lists its devices from the live device
 *             set by bucket range (small transactions under the wave's row lock, so devices
 *             enrolled up to then are in), then rotates them in chunks: ONE transaction per chunk
 *             of up to `chunkSize` devices, claimed with FOR UPDATE SKIP LOCKED, so runners and
 *             replicas share a wave without overlap. A chunk plans each device's rotation in
 *             memory (keys/device-rotation.ts, as the immediate rotation does) and writes the
 *             whole chunk with set-based SQL: old primaries → grace, new primaries, field keys
 *             rewrapped, outbox rows, items, the wave's counters, and its audit events (one
 *             chain-head lock). A device's item moves from `pending` exactly once, so nothing is
 *             rotated twice, and a killed chunk leaves its items pending for the next run.
 *   halt      After each chunk the wave's failure rate so far (since the last resume) is checked
 *             against the threshold, in the chunk's own transaction: over it, the rollout is
 *             halted (log, metric, audit); with `rollbackOnHalt` it rolls the halted wave back
 *             instead, chunk by chunk: each rotated device's previous primary (grace) is primary
 *             again, the new version disabled, its field keys rewrapped back.
 *   control   pause / resume / cancel at any moment. A chunk commits only if, at its end, under
 *             the rollout's row lock, the rollout is still running (rolling back, for a rollback
 *             chunk); otherwise it rolls back whole. So after a pause, a halt or a cancel no
 *             further device changes, and a cancelled rollout leaves every device on a readable
 *             primary (rotated or not). Resuming moves the schedule by the time held.
 *
 * Memory is bounded by the chunk size: no fleet is ever read into memory. Group DEKs are
 * unwrapped (KEK provider) before any transaction opens; every plaintext key is zeroed.
 */
import crypto from 'node:crypto';
import type { Kysely, Transaction } from 'kysely';
import type { Logger } from 'pino';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { unwrapKey } from '../crypto/aead.js';
import { deviceBinding } from '../crypto/binding.js';
import type { DB } from '../db/database.js';
import { enqueueKeyUpdates, type KeyUpdate } from '../distribution/index.js';
import { AppError, BadRequestError, ConflictError, NotFoundError, UnwrapError } from '../http/errors.js';
import { decodeCursor, encodeCursor } from '../http/schemas.js';
import {
  deviceKeyBatch,
  deviceRotateEvent,
  fieldRewrapEvents,
  fieldRotateEvent,
  planDeviceRotation,
  planFieldRewraps,
  planFieldRotation,
  type DeviceVersionRow,
  type PlanKeys,
  type PlannedEvent,
} from '../keys/device-rotation.js';
import type { KeyMaterial } from '../keys/key-material.js';
import * as keyRepo from '../keys/key.repository.js';
import type { Actor } from '../keys/key.service.js';
import { DAY_MS } from './policy.defaults.js';
import type { PolicyService } from './policy.service.js';
import type { RolloutMetrics } from './rollout.metrics.js';
import * as repo from './rollout.repository.js';
import type { RolloutListView, RolloutSummaryView, RolloutView, StartRolloutBody } from './rollout.schemas.js';
import { awaitingAckOf } from './awaiting-ack.js'; // issue 6 (acknowledgements)
import { rolloutDb, type ItemFieldRotation, type RolloutDB, type RolloutLevel, type RolloutState, type WaveState } from './rollout.tables.js';
import { bucketOffset, BUCKETS, planWaves, rawRanges, waveDueAt } from './rollout.waves.js';
import * as rotationRepo from './rotation.repository.js';
import { rotationDb } from './rotation.tables.js';

export const DEFAULT_CHUNK_SIZE = 1000;
export const DEFAULT_LIST_STEP = 500;
export const DEFAULT_WORKERS = 2;
const MAX_ATTEMPTS = 3;
const MAX_LISTED_FAILURES = 100;
const PAGE = 50;

const FINISHED_WAVES: readonly WaveState[] = ['completed', 'rolled_back', 'cancelled'];

export interface RolloutHooks {
  /** after each committed chunk (tests inject a crash between chunks here) */
  afterChunk?(info: { rolloutId: string; wave: number; kind: 'forward' | 'rollback'; devices: number }): void | Promise<void>;
}

export interface RolloutServiceDeps {
  db: Kysely<DB>;
  material: KeyMaterial;
  audit: AuditSink;
  clock: Clock;
  policies: Pick<PolicyService, 'effectivePolicy' | 'effectivePolicies'>;
  logger?: Pick<Logger, 'info' | 'warn' | 'error'> | undefined;
  metrics?: RolloutMetrics | undefined;
  /** devices per chunk transaction (default 1000) */
  chunkSize?: number | undefined;
  /** buckets (of 10,000) listed per transaction when a wave starts (default 500) */
  listStep?: number | undefined;
  /** chunks in flight at once per rollout in one process (default 2) */
  workers?: number | undefined;
  /** the outbox rows of a chunk, in its transaction (default: distribution's enqueueKeyUpdates) */
  enqueue?: ((trx: Transaction<DB>, updates: readonly KeyUpdate[]) => Promise<unknown>) | undefined;
  /** tests only: a device for which this returns true fails (`injected_failure`) */
  failDevice?: ((deviceId: string) => boolean) | undefined;
  hooks?: RolloutHooks | undefined;
}

export interface DueWavesOptions {
  now: Date;
  /** most devices processed (rotated, failed, skipped or rolled back) by this call */
  limit: number;
  dryRun: boolean;
  actor: string;
  requestId?: string | undefined;
  /** is the group's maintenance window open (new rollouts and new waves start only then) */
  canStart(groupId: string): Promise<boolean>;
}

export interface DueWavesResult {
  /** waves worked on (dry run: that would be) */
  waves: number;
  /** devices processed (dry run: an estimate of those due) */
  devices: number;
  /** field key versions created or rewrapped */
  fields: number;
  failed: number;
  /** the limit stopped the run with due work left */
  more: boolean;
  started: Array<{ rolloutId: string | null; groupId: string; level: RolloutLevel }>;
  halted: Array<{ rolloutId: string; groupId: string; wave: number; rolledBack: boolean }>;
  errors: Array<{ rolloutId: string; groupId: string; error: unknown }>;
}

/** A group key the chunk needs but nobody fetched (the group was rotated meanwhile): roll back, load, run again. */
class NeedGroupKeys extends Error {
  constructor() {
    super('group keys needed');
  }
}

/** The rollout left `running` (or `rolling_back`) while the chunk ran: nothing of it may land. */
class ChunkAborted extends Error {
  constructor(readonly state: RolloutState | undefined) {
    super('rollout no longer running');
  }
}

interface ChunkResult {
  claimed: number;
  /** the last device claimed (the worker's cursor) */
  last?: string | undefined;
  done: number;
  failed: number;
  skipped: number;
  fields: number;
  halted?: { wave: number; rolledBack: boolean };
}

/** Group DEK versions of one group: a key, or null when it has no readable material. */
type GroupKeys = Map<number, Buffer | null>;

export function createRolloutService(deps: RolloutServiceDeps) {
  const { material, audit, clock, policies, metrics } = deps;
  const chunkSize = deps.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const listStep = deps.listStep ?? DEFAULT_LIST_STEP;
  const workers = deps.workers ?? DEFAULT_WORKERS;
  const enqueue = deps.enqueue ?? enqueueKeyUpdates;
  for (const [name, value] of [['chunkSize', chunkSize], ['listStep', listStep], ['workers', workers]] as const) {
    if (!Number.isInteger(value) || value < 1) throw new Error(`rollouts: ${name} must be a positive integer`);
  }
  let handle: Kysely<RolloutDB> | undefined;
  const db = () => (handle ??= rolloutDb(deps.db));
  const ex = (trx: Transaction<RolloutDB>) => trx as unknown as Transaction<DB>;
  const event = (who: Actor, e: PlannedEvent): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });

  // ---------- start ----------

  /** A new rollout and its waves (audited); its id. */
  async function create(who: Actor, body: StartRolloutBody, reason: 'manual' | 'policy'): Promise<string> {
    if (body.field !== undefined && body.level !== 'field') throw new BadRequestError('field applies to field-level rollouts only', { field: 'body.field' });
    if (!(await keyRepo.findGroup(deps.db, body.groupId))) throw new NotFoundError(`Group ${body.groupId} not found`);
    const policy = (await policies.effectivePolicy(body.groupId))[body.level];
    const percentPerDay = body.percentPerDay ?? policy.percentPerDay ?? 10;
    const haltThreshold = body.haltThreshold ?? policy.haltThreshold ?? 0.01;
    const waveIntervalSeconds = body.waveIntervalSeconds ?? 86_400;
    const canaryPercent = body.canaryPercent ?? null;
    const id = `ro-${crypto.randomUUID()}`;
    const offset = bucketOffset(id);
    const waves = planWaves({ percentPerDay, canaryPercent });
    const now = clock.now();
    try {
      await db()
        .transaction()
        .execute(async (trx) => {
          const active = await repo.findActiveRollout(trx, body.groupId, body.level);
          if (active) throw new ConflictError(`Group ${body.groupId} already has an active ${body.level}-level rollout (${active.id}, ${active.state}): cancel it first`, 'rollout_active');
          await repo.insertRollout(
            trx,
            {
              id,
              group_id: body.groupId,
              level: body.level,
              field: body.field ?? null,
              state: 'running',
              reason,
              percent_per_day: percentPerDay,
              canary_percent: canaryPercent,
              wave_interval_seconds: waveIntervalSeconds,
              halt_threshold: haltThreshold,
              rollback_on_halt: body.rollbackOnHalt ?? false,
              bucket_offset: offset,
              wave_count: waves.length - 1,
              started_at: now,
              created_by: who.actor,
              created_at: now,
              updated_at: now,
            },
            waves.map((w) => ({ rollout_id: id, wave: w.wave, kind: w.kind, bucket_from: w.from, bucket_to: w.to, state: 'scheduled' as const, listed_to: w.from })),
          );
          await audit.record(ex(trx), [
            event(who, {
              action: 'rollout.start',
              outcome: 'success',
              keyId: `group:${body.groupId}`,
              details: { rolloutId: id, level: body.level, field: body.field ?? null, reason, percentPerDay, canaryPercent, waveIntervalSeconds, haltThreshold, rollbackOnHalt: body.rollbackOnHalt ?? false, waves: waves.length - 1 },
            }),
          ]);
        });
    } catch (error) {
      // two starts at once: the partial unique index lets one through
      if ((error as { code?: string }).code === '23505') throw new ConflictError(`Group ${body.groupId} already has an active ${body.level}-level rollout`, 'rollout_active');
      throw error;
    }
    deps.logger?.info({ rolloutId: id, groupId: body.groupId, level: body.level, reason }, 'rollout started');
    return id;
  }

  // ---------- reads ----------

  function summaryOf(r: repo.RolloutRow, waves: readonly repo.WaveRow[]): RolloutSummaryView {
    const totals = { devices: 0, done: 0, failed: 0, skipped: 0, rolledBack: 0, rollbackFailed: 0, pending: 0 };
    for (const w of waves) {
      totals.devices += w.devices;
      totals.done += w.done;
      totals.failed += w.failed;
      totals.skipped += w.skipped;
      totals.rolledBack += w.rolled_back;
      totals.rollbackFailed += w.rollback_failed;
      totals.pending += pendingOf(w);
    }
    const current = waves.find((w) => !FINISHED_WAVES.includes(w.state));
    const finished = r.state === 'completed' || r.state === 'cancelled' || r.state === 'rolled_back';
    return {
      id: r.id,
      groupId: r.group_id,
      level: r.level,
      field: r.field,
      state: r.state,
      reason: r.reason,
      percentPerDay: r.percent_per_day,
      canaryPercent: r.canary_percent,
      waveIntervalSeconds: r.wave_interval_seconds,
      haltThreshold: r.halt_threshold,
      rollbackOnHalt: r.rollback_on_halt,
      waveCount: r.wave_count,
      currentWave: finished || !current ? null : current.wave,
      startedAt: r.started_at.toISOString(),
      pausedAt: r.paused_at ? r.paused_at.toISOString() : null,
      haltedWave: r.halted_wave,
      haltReason: r.halt_reason,
      finishedAt: r.finished_at ? r.finished_at.toISOString() : null,
      createdBy: r.created_by,
      totals,
    };
  }

  const pendingOf = (w: repo.WaveRow) => Math.max(0, w.devices - w.done - w.failed - w.skipped - w.rolled_back - w.rollback_failed);
  const schedule = (r: repo.RolloutRow) => ({ startedAt: r.started_at, pausedMs: r.paused_ms, intervalSeconds: r.wave_interval_seconds, waveCount: r.wave_count });

  async function get(id: string): Promise<RolloutView> {
    const r = await repo.findRollout(db(), id);
    if (!r) throw new NotFoundError(`Rollout ${id} not found`);
    const [waves, onOld, failures] = await Promise.all([
      repo.listWaves(db(), [id]),
      repo.countOnOldVersions(db(), r),
      repo.listFailedItems(db(), id, MAX_LISTED_FAILURES),
    ]);
    return {
      ...summaryOf(r, waves),
      devicesOnOldVersions: onOld,
      // issue 6 (acknowledgements): devices of the group that have not acknowledged their current key of this level
      awaitingAck: await awaitingAckOf(deps.db, r.group_id, { kind: r.level, field: r.field ?? undefined }),
      waves: waves.map((w) => ({
        wave: w.wave,
        kind: w.kind,
        percentFrom: w.bucket_from / 100,
        percentTo: w.bucket_to / 100,
        dueAt: waveDueAt(schedule(r), w.wave).toISOString(),
        state: w.state,
        devices: w.devices,
        done: w.done,
        failed: w.failed,
        skipped: w.skipped,
        rolledBack: w.rolled_back,
        rollbackFailed: w.rollback_failed,
        pending: pendingOf(w),
        startedAt: w.started_at ? w.started_at.toISOString() : null,
        finishedAt: w.finished_at ? w.finished_at.toISOString() : null,
      })),
      failures: failures.map((f) => ({ deviceId: f.device_id, wave: f.wave, status: f.status as 'failed' | 'rollback_failed', reason: f.reason })),
    };
  }

  async function list(q: { limit: number; cursor?: string | undefined; groupId?: string | undefined; state?: RolloutState | undefined }): Promise<RolloutListView> {
    const cursor = decodeCursor(q.cursor, (v): v is { t: string; id: string } => typeof (v as { t?: unknown })?.t === 'string' && typeof (v as { id?: unknown })?.id === 'string');
    if (q.cursor !== undefined && (cursor === undefined || Number.isNaN(Date.parse(cursor.t)))) throw new BadRequestError('cursor is not valid', { field: 'querystring.cursor' });
    const rows = await repo.listRollouts(db(), { before: cursor ? { createdAt: new Date(cursor.t), id: cursor.id } : undefined, limit: q.limit, groupId: q.groupId, state: q.state });
    const waves = await repo.listWaves(
      db(),
      rows.map((r) => r.id),
    );
    const items = rows.map((r) => summaryOf(r, waves.filter((w) => w.rollout_id === r.id)));
    const last = rows.at(-1);
    return rows.length === q.limit && last ? { items, nextCursor: encodeCursor({ t: last.created_at.toISOString(), id: last.id }) } : { items };
  }

  // ---------- control ----------

  async function control(who: Actor, id: string, action: 'pause' | 'resume' | 'cancel'): Promise<RolloutView> {
    const allowed: Record<typeof action, readonly RolloutState[]> = {
      pause: ['running'],
      resume: ['paused', 'halted'],
      cancel: ['running', 'paused', 'halted', 'rolling_back'],
    };
    await db()
      .transaction()
      .execute(async (trx) => {
        const now = clock.now();
        const r = await repo.findRollout(trx, id, { lock: 'update' });
        if (!r) throw new NotFoundError(`Rollout ${id} not found`);
        if (!allowed[action].includes(r.state)) throw new ConflictError(`Rollout ${id} is ${r.state}: it cannot be ${action === 'pause' ? 'paused' : action === 'resume' ? 'resumed' : 'cancelled'}`, 'illegal_rollout_transition');
        const details: Record<string, unknown> = { rolloutId: id, level: r.level, from: r.state };
        if (action === 'pause') {
          await repo.updateRollout(trx, id, ['running'], { state: 'paused', paused_at: now, updated_at: now });
          details.to = 'paused';
        } else if (action === 'resume') {
          const held = r.paused_at ? Math.max(0, now.getTime() - r.paused_at.getTime()) : 0;
          await repo.updateRollout(trx, id, [r.state], { state: 'running', paused_at: null, paused_ms: r.paused_ms + held, halted_wave: null, halt_reason: null, updated_at: now });
          if (r.state === 'halted' && r.halted_wave !== null) {
            // the halted wave goes on; its halt rule counts from here
            const w = await repo.lockWave(trx, id, r.halted_wave);
            if (w) await repo.updateWave(trx, id, w.wave, ['halted'], { state: 'running', base_done: w.done, base_failed: w.failed });
            details.resumedWave = r.halted_wave;
          }
          details.to = 'running';
          details.scheduleMovedMs = held;
        } else {
          await repo.updateRollout(trx, id, [r.state], { state: 'cancelled', paused_at: null, finished_at: now, updated_at: now });
          details.to = 'cancelled';
          details.wavesCancelled = await repo.finishOpenWaves(trx, id, 'cancelled', now);
        }
        await audit.record(ex(trx), [event(who, { action: `rollout.${action}`, outcome: 'success', keyId: `group:${r.group_id}`, details })]);
      });
    deps.logger?.info({ rolloutId: id, action, actor: who.actor }, `rollout ${action}`);
    return get(id);
  }

  // ---------- the cron hook ----------

  async function runDueWaves(o: DueWavesOptions): Promise<DueWavesResult> {
    const result: DueWavesResult = { waves: 0, devices: 0, fields: 0, failed: 0, more: false, started: [], halted: [], errors: [] };
    const who: Actor = { actor: o.actor, requestId: o.requestId };
    const budget = { left: o.limit };
    try {
      await startDue(who, o, result);
    } catch (error) {
      result.errors.push({ rolloutId: '-', groupId: '-', error });
    }
    let after: { startedAt: Date; id: string } | undefined;
    for (;;) {
      const page = await repo.listRunnableRollouts(db(), after, PAGE);
      for (const r of page) {
        if (budget.left <= 0) {
          result.more = true;
          return result;
        }
        try {
          if (r.state === 'rolling_back') await rollBack(who, r, o, budget, result);
          else await runRollout(who, r, o, budget, result);
        } catch (error) {
          result.errors.push({ rolloutId: r.id, groupId: r.group_id, error });
          if (!(error instanceof AppError)) deps.logger?.error({ err: error, rolloutId: r.id }, 'rollout step failed');
        }
      }
      const last = page.at(-1);
      if (page.length < PAGE || !last) break;
      after = { startedAt: last.started_at, id: last.id };
    }
    return result;
  }

  /**
   * Start a rollout per group and level that fell due: some primary is older than the level's
   * rotation period, no rollout of that group and level is active, none started within the
   * period (so devices that failed one rollout do not restart it for the whole group at once),
   * and the group's maintenance window is open.
   */
  async function startDue(who: Actor, o: DueWavesOptions, result: DueWavesResult): Promise<void> {
    let after: string | undefined;
    for (;;) {
      const ids = await rotationRepo.listGroupIds(rotationDb(deps.db), after, 100);
      if (ids.length === 0) return;
      after = ids.at(-1);
      const [effective, latest] = await Promise.all([policies.effectivePolicies(ids), repo.latestRolloutStarts(db(), ids)]);
      for (const groupId of ids) {
        for (const level of ['device', 'field'] as const) {
          const policy = effective.get(groupId)?.[level];
          if (!policy) continue;
          const cutoff = new Date(o.now.getTime() - policy.rotationPeriodDays * DAY_MS);
          const last = latest.get(`${groupId}\u0000${level}`);
          if (last !== undefined && last > cutoff) continue;
          if (await repo.findActiveRollout(db(), groupId, level)) continue;
          if (!(await repo.hasPrimaryOlderThan(db(), groupId, level, cutoff))) continue;
          if (!(await o.canStart(groupId))) continue;
          if (o.dryRun) {
            result.started.push({ rolloutId: null, groupId, level });
            continue;
          }
          try {
            result.started.push({ rolloutId: await create(who, { groupId, level }, 'policy'), groupId, level });
          } catch (error) {
            if (!(error instanceof ConflictError)) throw error; // another runner started it
          }
        }
      }
      if (ids.length < 100) return;
    }
  }

  async function runRollout(who: Actor, initial: repo.RolloutRow, o: DueWavesOptions, budget: { left: number }, result: DueWavesResult): Promise<void> {
    let keys: GroupKeys | undefined;
    try {
      for (;;) {
        const r = await repo.findRollout(db(), initial.id);
        if (!r || r.state !== 'running') return;
        const waves = await repo.listWaves(db(), [r.id]);
        const current = waves.find((w) => !FINISHED_WAVES.includes(w.state));
        if (!current) {
          if (!o.dryRun) await finishRollout(who, r);
          return;
        }
        if (o.now < waveDueAt(schedule(r), current.wave)) return;
        if (current.state === 'scheduled' && !(await o.canStart(r.group_id))) return;
        if (o.dryRun) return estimate(r, waves, current, o, result);
        if (current.state === 'scheduled') await startWave(who, r, current.wave);
        await listDevices(r, current.wave);
        if (budget.left <= 0) {
          result.more = true;
          return;
        }
        keys ??= await loadGroupKeys(r.group_id);
        result.waves += 1;
        const stop = await processWave(who, r, current.wave, keys, budget, result);
        if (stop === 'budget') {
          result.more = true;
          return;
        }
        if (stop !== 'empty') return;
        if (!(await completeWave(who, r, current.wave))) return; // another runner still holds some of it
      }
    } finally {
      zeroKeys(keys);
    }
  }

  /** Dry run: the due waves of a rollout and the devices they would take (pending + not yet listed). */
  async function estimate(r: repo.RolloutRow, waves: readonly repo.WaveRow[], current: repo.WaveRow, o: DueWavesOptions, result: DueWavesResult): Promise<void> {
    for (const w of waves.filter((x) => x.wave >= current.wave && !FINISHED_WAVES.includes(x.state))) {
      if (o.now < waveDueAt(schedule(r), w.wave)) break;
      result.waves += 1;
      let devices = await repo.countPendingItems(db(), r.id, w.wave);
      if (w.kind !== 'sweep') {
        for (const [a, b] of rawRanges(w.listed_to, w.bucket_to, r.bucket_offset)) devices += await repo.countGroupDevices(db(), r.group_id, a, b);
      }
      result.devices += devices;
    }
  }

  async function startWave(who: Actor, r: repo.RolloutRow, wave: number): Promise<void> {
    await db()
      .transaction()
      .execute(async (trx) => {
        const now = clock.now();
        const locked = await repo.findRollout(trx, r.id, { lock: 'no_key_update' });
        if (!locked || locked.state !== 'running') return;
        const w = await repo.lockWave(trx, r.id, wave);
        if (!w || w.state !== 'scheduled') return;
        await repo.updateWave(trx, r.id, wave, ['scheduled'], { state: 'running', started_at: now });
        await audit.record(ex(trx), [
          event(who, { action: 'rollout.wave_start', outcome: 'success', keyId: `group:${r.group_id}`, details: { rolloutId: r.id, wave, kind: w.kind, dueAt: waveDueAt(schedule(locked), wave).toISOString() } }),
        ]);
      });
  }

  /** Build the wave's item list from the live device set, `listStep` buckets per transaction. */
  async function listDevices(r: repo.RolloutRow, wave: number): Promise<void> {
    for (;;) {
      const more = await db()
        .transaction()
        .execute(async (trx) => {
          const w = await repo.lockWave(trx, r.id, wave);
          if (!w || w.state !== 'running' || w.listed_to >= w.bucket_to) return false;
          const now = clock.now();
          const base = { rolloutId: r.id, groupId: r.group_id, wave, level: r.level, field: r.field, now };
          let to: number;
          let added = 0;
          if (w.kind === 'sweep') {
            // the devices enrolled after their own wave was listed: everything not in the rollout yet
            to = w.bucket_to;
            added = await repo.listWaveDevices(trx, { ...base, from: 0, to: BUCKETS });
          } else {
            to = Math.min(w.bucket_to, w.listed_to + listStep);
            for (const [a, b] of rawRanges(w.listed_to, to, r.bucket_offset)) added += await repo.listWaveDevices(trx, { ...base, from: a, to: b });
          }
          await trx.updateTable('rollout_waves').set({ listed_to: to, devices: w.devices + added }).where('rollout_id', '=', r.id).where('wave', '=', wave).execute();
          return to < w.bucket_to;
        });
      if (!more) return;
    }
  }

  type Stop = 'empty' | 'budget' | 'halted' | 'not_running';

  /** Chunks of one wave, `workers` at a time, until it is empty, the budget is spent, or the rollout stops. */
  async function processWave(who: Actor, r: repo.RolloutRow, wave: number, keys: GroupKeys, budget: { left: number }, result: DueWavesResult): Promise<Stop> {
    const policy = (await policies.effectivePolicy(r.group_id))[r.level];
    const graceMs = policy.gracePeriodDays * DAY_MS;
    let stop: Stop | undefined;
    const worker = async () => {
      // Each worker claims after the last device it claimed: the items done before it stay in
      // the pending index as dead entries until a vacuum, and a claim from the start of the wave
      // would step over all of them (quadratic over a million devices). Items passed over because
      // another runner held them are found by one claim from the start once the cursor runs dry.
      const cursor: { after?: string | undefined; restarted: boolean } = { restarted: false };
      while (stop === undefined) {
        if (budget.left <= 0) {
          stop = 'budget';
          return;
        }
        const size = Math.min(chunkSize, budget.left);
        budget.left -= size;
        let chunk: ChunkResult;
        try {
          const after = cursor.after;
          chunk = await withGroupKeys(r.group_id, keys, () => (r.level === 'device' ? deviceChunk(who, r, wave, keys, size, graceMs, after) : fieldChunk(who, r, wave, keys, size, graceMs, after)));
        } catch (error) {
          budget.left += size;
          if (error instanceof ChunkAborted) {
            stop ??= 'not_running';
            return;
          }
          stop ??= 'not_running';
          throw error;
        }
        budget.left += size - chunk.claimed;
        if (chunk.last !== undefined) cursor.after = chunk.last; // only once committed: a chunk that rolled back is claimed again
        if (chunk.claimed === 0) {
          if (cursor.after !== undefined && !cursor.restarted) {
            cursor.after = undefined;
            cursor.restarted = true;
            continue;
          }
          stop ??= 'empty';
          return;
        }
        result.devices += chunk.claimed;
        result.fields += chunk.fields;
        result.failed += chunk.failed;
        if (chunk.halted) {
          result.halted.push({ rolloutId: r.id, groupId: r.group_id, wave: chunk.halted.wave, rolledBack: chunk.halted.rolledBack });
          stop = 'halted';
        }
        await deps.hooks?.afterChunk?.({ rolloutId: r.id, wave, kind: 'forward', devices: chunk.claimed });
      }
    };
    const settled = await Promise.allSettled(Array.from({ length: workers }, () => worker()));
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed) throw failed.reason;
    if (stop === 'halted') {
      // with rollbackOnHalt, the rollback starts in this run
      const r2 = await repo.findRollout(db(), r.id);
      if (r2?.state === 'rolling_back') await rollBack(who, r2, { now: clock.now() }, budget, result);
    }
    return stop ?? 'empty';
  }

  /** Run a chunk with the group keys it needs; a key nobody loaded (a group rotation meanwhile) → load, run again. */
  async function withGroupKeys<T>(groupId: string, keys: GroupKeys, work: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await work();
      } catch (error) {
        if (!(error instanceof NeedGroupKeys)) throw error;
        if (attempt >= MAX_ATTEMPTS) throw new ConflictError('The key hierarchy changed during the rollout; the next run continues', 'concurrent_modification');
        const fresh = await loadGroupKeys(groupId);
        for (const [version, key] of fresh) {
          if (!keys.has(version)) keys.set(version, key);
          else key?.fill(0);
        }
      }
    }
  }

  async function loadGroupKeys(groupId: string): Promise<GroupKeys> {
    const keys: GroupKeys = new Map();
    for (const row of await keyRepo.listGroupVersions(deps.db, [groupId])) {
      if (row.wrapped_key === null) {
        keys.set(row.version, null);
        continue;
      }
      try {
        keys.set(row.version, await material.groupKey(groupId, row.version, row.wrapped_key));
      } catch (error) {
        if (!(error instanceof UnwrapError)) {
          zeroKeys(keys);
          throw error; // e.g. the KEK provider is unavailable: the next run tries again
        }
        keys.set(row.version, null);
      }
    }
    return keys;
  }

  function zeroKeys(keys: GroupKeys | undefined): void {
    for (const key of keys?.values() ?? []) key?.fill(0);
  }

  /** Unwrapping for the rotation plans: device DEKs straight from their rows (not cached: a rollout would flush the delivery cache). */
  function planKeys(groupId: string, deviceId: string, keys: GroupKeys, scratch: Buffer[]): PlanKeys {
    const keep = (buffer: Buffer) => {
      scratch.push(buffer);
      return buffer;
    };
    return {
      device(row: DeviceVersionRow) {
        const groupKey = keys.get(row.parent_version);
        if (groupKey === undefined) throw new NeedGroupKeys();
        if (groupKey === null || row.wrapped_key === null) throw new UnwrapError(`Device ${deviceId} v${row.version} cannot be unwrapped (no material under group v${row.parent_version})`);
        return keep(unwrapKey(groupKey, row.wrapped_key, deviceBinding(deviceId, row.version, groupId, row.parent_version)));
      },
      field: (deviceKey, deviceVersion, row) => material.fieldKey(deviceKey, deviceId, deviceVersion, row.field, row.version, row.wrapped_key),
      keep,
    };
  }

  /** Why a device could not be rotated (the item's reason). Errors that are not about the device abort the whole chunk. */
  function failureOf(error: unknown): string {
    if (error instanceof NeedGroupKeys) throw error;
    if (error instanceof UnwrapError) return 'unwrap_failed';
    if (error instanceof AppError) return error.code;
    throw error;
  }

  const groupBy = <T extends { device_id: string }>(rows: readonly T[]) => {
    const out = new Map<string, T[]>();
    for (const row of rows) {
      const list = out.get(row.device_id);
      if (list) list.push(row);
      else out.set(row.device_id, [row]);
    }
    return out;
  };

  /** One chunk of a device-level wave, in one transaction. */
  async function deviceChunk(who: Actor, r: repo.RolloutRow, wave: number, keys: GroupKeys, size: number, graceMs: number, after: string | undefined): Promise<ChunkResult> {
    const started = process.hrtime.bigint();
    const scratch: Buffer[] = [];
    const zeroAfter: Array<{ zero(): void }> = [];
    try {
      const out = await db()
        .transaction()
        .execute(async (trx): Promise<ChunkResult & { events: number }> => {
          const now = clock.now();
          // the rollout's state, key lookups, and the group's primary share-locked (so a group
          // rotation cannot retire it under the new wraps), in one round trip; no primary visible
          // (a group rotation committed while we waited for it): load the keys, run again
          const opened = await repo.openDeviceChunk(trx, r.id, r.group_id);
          if (opened.state !== 'running') throw new ChunkAborted(opened.state);
          if (opened.groupVersion === undefined) throw new NeedGroupKeys();
          const gp = { version: opened.groupVersion };
          const groupKey = keys.get(gp.version);
          if (groupKey === undefined) throw new NeedGroupKeys();
          if (groupKey === null) throw new ConflictError(`Group ${r.group_id} v${gp.version} has no readable material`, 'parent_missing');

          const ids = await repo.claimPendingItems(trx, r.id, wave, after, size);
          if (ids.length === 0) return { claimed: 0, done: 0, failed: 0, skipped: 0, fields: 0, events: 0 };
          const devices = await repo.lockDevices(trx, ids);
          const versions = groupBy(await repo.lockDeviceVersions(trx, ids));
          const fields = groupBy(await repo.lockFieldVersions(trx, ids));
          const graceUntil = new Date(now.getTime() + graceMs);
          // the chunk's new keys and nonces from one CSPRNG call, zeroed with the chunk
          const newKeys = deviceKeyBatch(ids.length, material);
          zeroAfter.push(newKeys);

          const outcomes: repo.ItemOutcome[] = [];
          const events: AuditEventInput[] = [];
          const moves: repo.StateMove[] = [];
          const inserts: repo.NewVersion[] = [];
          const rewraps: repo.FieldWrapMove[] = [];
          const updates: KeyUpdate[] = [];
          const rolloutDetails = { rolloutId: r.id, wave };
          for (const device of devices) {
            const id = device.id;
            if (device.destroy_after !== null) {
              outcomes.push({ deviceId: id, status: 'skipped', reason: 'device_being_destroyed' });
              continue;
            }
            const rows = versions.get(id) ?? [];
            const from = rows.find((v) => v.state === 'primary')?.version ?? null;
            let plan: ReturnType<typeof planDeviceRotation>;
            try {
              if (deps.failDevice?.(id)) throw new AppError(500, 'injected_failure', 'injected');
              plan = planDeviceRotation({
                deviceId: id,
                groupId: r.group_id,
                groupVersion: gp.version,
                groupKey,
                versions: rows,
                fields: fields.get(id) ?? [],
                material: newKeys,
                keys: planKeys(r.group_id, id, keys, scratch),
                compromised: false,
                graceUntil,
                now,
              });
            } catch (error) {
              const reason = failureOf(error);
              outcomes.push({ deviceId: id, status: 'failed', fromVersion: from, reason });
              events.push(event(who, { action: 'device.rotate', outcome: 'failure', keyId: `device:${id}`, details: { reason: 'rollout', ...rolloutDetails, error: reason } }));
              continue;
            }
            if (plan.previous) moves.push({ deviceId: id, version: plan.previous.version, from: 'primary', to: plan.previous.to, until: plan.previous.stateUntil });
            inserts.push({ deviceId: id, version: plan.version, wrapped: plan.row.wrapped_key, parentVersion: gp.version });
            for (const f of plan.rewraps) rewraps.push({ deviceId: id, field: f.field, version: f.version, fromParent: f.fromParent, toParent: plan.version, wrapped: f.wrapped });
            updates.push({ deviceId: id, kind: 'device', version: plan.version, state: 'primary' });
            outcomes.push({ deviceId: id, status: 'done', fromVersion: from, toVersion: plan.version });
            events.push(event(who, deviceRotateEvent(id, plan, { reason: 'rollout', compromised: false, extra: rolloutDetails })));
            for (const e of fieldRewrapEvents(id, plan.rewraps, plan.version)) events.push(event(who, e));
          }
          // items claimed for devices that no longer exist cannot happen (devices are never deleted); be loud if they do
          if (devices.length !== ids.length) throw new Error(`rollout ${r.id}: ${ids.length - devices.length} claimed device(s) missing`);

          // one statement: the old primaries leave first (one primary per key is a unique index),
          // then the new ones, the field rewraps and the items; any count off rolls the chunk back
          const wrote = await repo.writeDeviceChunk(trx, r.id, { moves, inserts, rewraps, items: outcomes }, now);
          if (wrote.moved !== moves.length) throw new Error('a locked primary changed state during the chunk');
          if (wrote.inserted !== inserts.length) throw new Error('new device versions were not all inserted');
          if (wrote.rewrapped !== rewraps.length) throw new Error('a locked field key version moved during the chunk');
          if (wrote.items !== outcomes.length) throw new Error('a claimed item left pending during the chunk');
          await enqueue(ex(trx), updates);
          const count = (s: string) => outcomes.filter((x) => x.status === s).length;
          const tally = { claimed: ids.length, done: count('done'), failed: count('failed'), skipped: count('skipped'), fields: rewraps.length };
          const halted = await chunkTail(trx, who, r, wave, tally, events, now);
          await audit.record(ex(trx), events);
          return { ...tally, ...(halted ? { halted } : {}), events: events.length, last: ids.at(-1) };
        });
      afterChunk(r, 'forward', out, started);
      return out;
    } finally {
      for (const b of scratch) b.fill(0);
      for (const z of zeroAfter) z.zero();
    }
  }

  /** One chunk of a field-level wave: each device's field keys (of the field, or all) get a new primary under the device's primary DEK. */
  async function fieldChunk(who: Actor, r: repo.RolloutRow, wave: number, keys: GroupKeys, size: number, graceMs: number, after: string | undefined): Promise<ChunkResult> {
    const started = process.hrtime.bigint();
    const scratch: Buffer[] = [];
    try {
      const out = await db()
        .transaction()
        .execute(async (trx): Promise<ChunkResult & { events: number }> => {
          const now = clock.now();
          const current = await repo.findRollout(trx, r.id);
          if (!current || current.state !== 'running') throw new ChunkAborted(current?.state);
          await repo.preferKeyLookups(trx);
          const ids = await repo.claimPendingItems(trx, r.id, wave, after, size);
          if (ids.length === 0) return { claimed: 0, done: 0, failed: 0, skipped: 0, fields: 0, events: 0 };
          const devices = await repo.lockDevices(trx, ids);
          const versions = groupBy(await repo.lockDeviceVersions(trx, ids));
          const fields = groupBy(await repo.lockFieldVersions(trx, ids));
          const graceUntil = new Date(now.getTime() + graceMs);

          const outcomes: repo.ItemOutcome[] = [];
          const events: AuditEventInput[] = [];
          const moves: repo.StateMove[] = [];
          const inserts: repo.NewVersion[] = [];
          const updates: KeyUpdate[] = [];
          const rolloutDetails = { rolloutId: r.id, wave };
          for (const device of devices) {
            const id = device.id;
            if (device.destroy_after !== null) {
              outcomes.push({ deviceId: id, status: 'skipped', reason: 'device_being_destroyed' });
              continue;
            }
            const own = fields.get(id) ?? [];
            const names = [...new Set(own.filter((f) => f.state === 'primary' && (r.field === null || f.field === r.field)).map((f) => f.field))];
            if (names.length === 0) {
              outcomes.push({ deviceId: id, status: 'skipped', reason: 'no_field_keys' });
              continue;
            }
            const planned: Array<ReturnType<typeof planFieldRotation>> = [];
            try {
              if (deps.failDevice?.(id)) throw new AppError(500, 'injected_failure', 'injected');
              const devicePrimary = (versions.get(id) ?? []).find((v) => v.state === 'primary');
              if (!devicePrimary) throw new ConflictError(`Device ${id} has no primary version`, 'no_primary_version');
              const pk = planKeys(r.group_id, id, keys, scratch);
              const deviceKey = pk.device(devicePrimary);
              for (const field of names) {
                const rows = own.filter((f) => f.field === field);
                planned.push(planFieldRotation({ deviceId: id, field, rows, deviceVersion: devicePrimary.version, deviceKey, material, keys: pk, compromised: false, graceUntil, now }));
              }
            } catch (error) {
              const reason = failureOf(error);
              outcomes.push({ deviceId: id, status: 'failed', reason });
              events.push(event(who, { action: 'field_key.rotate', outcome: 'failure', keyId: `device:${id}`, details: { reason: 'rollout', ...rolloutDetails, error: reason } }));
              continue;
            }
            const rotated: ItemFieldRotation[] = [];
            for (const plan of planned) {
              if (plan.previous) moves.push({ deviceId: id, field: plan.field, version: plan.previous.version, from: 'primary', to: plan.previous.to, until: plan.previous.stateUntil });
              inserts.push({ deviceId: id, field: plan.field, version: plan.version, wrapped: plan.row.wrapped_key, parentVersion: plan.deviceVersion });
              updates.push({ deviceId: id, kind: 'field', field: plan.field, version: plan.version, state: 'primary' });
              rotated.push([plan.field, plan.previous?.version ?? null, plan.version]);
              events.push(event(who, fieldRotateEvent(id, plan, { reason: 'rollout', compromised: false, extra: rolloutDetails })));
            }
            outcomes.push({ deviceId: id, status: 'done', fields: rotated });
          }
          if (devices.length !== ids.length) throw new Error(`rollout ${r.id}: ${ids.length - devices.length} claimed device(s) missing`);

          if ((await repo.moveFieldVersions(trx, moves, now)) !== moves.length) throw new Error('a locked field key primary changed state during the chunk');
          await repo.insertFieldVersions(trx, inserts, now);
          await enqueue(ex(trx), updates);
          await repo.finishItems(trx, r.id, 'pending', outcomes, now);
          const count = (s: string) => outcomes.filter((x) => x.status === s).length;
          const tally = { claimed: ids.length, done: count('done'), failed: count('failed'), skipped: count('skipped'), fields: inserts.length };
          const halted = await chunkTail(trx, who, r, wave, tally, events, now);
          await audit.record(ex(trx), events);
          return { ...tally, ...(halted ? { halted } : {}), events: events.length, last: ids.at(-1) };
        });
      afterChunk(r, 'forward', out, started);
      return out;
    } finally {
      for (const b of scratch) b.fill(0);
    }
  }

  /**
   * The end of a forward chunk, under the rollout's row lock: still running (else the whole
   * chunk rolls back), the wave's counters, and the halt rule — the failure rate of the wave
   * since its last resume above the threshold halts the rollout (or starts its rollback).
   */
  async function chunkTail(
    trx: Transaction<RolloutDB>,
    who: Actor,
    r: repo.RolloutRow,
    wave: number,
    tally: { done: number; failed: number; skipped: number },
    events: AuditEventInput[],
    now: Date,
  ): Promise<{ wave: number; rolledBack: boolean } | undefined> {
    const { rollout: locked, counters: w } = await repo.lockRolloutAndCount(trx, r.id, wave, tally);
    if (!locked || locked.state !== 'running') throw new ChunkAborted(locked?.state);
    if (!w) throw new Error(`rollout ${r.id}: wave ${wave} is missing`);
    const failed = w.failed - w.base_failed;
    const processed = failed + (w.done - w.base_done);
    if (processed === 0 || failed / processed <= locked.halt_threshold) return undefined;

    const rate = failed / processed;
    const rollback = locked.rollback_on_halt;
    const reason = `wave ${wave}: ${failed} of ${processed} devices failed (${(rate * 100).toFixed(2)} %), above the halt threshold of ${(locked.halt_threshold * 100).toFixed(2)} %`;
    await repo.updateRollout(trx, r.id, ['running'], {
      state: rollback ? 'rolling_back' : 'halted',
      paused_at: rollback ? null : now,
      halted_wave: wave,
      halt_reason: reason,
      updated_at: now,
    });
    await repo.updateWave(trx, r.id, wave, ['running'], { state: rollback ? 'rolling_back' : 'halted' });
    events.push(
      event(who, {
        action: 'rollout.halt',
        outcome: 'failure',
        keyId: `group:${r.group_id}`,
        details: { rolloutId: r.id, level: r.level, wave, failed, processed, failureRate: rate, haltThreshold: locked.halt_threshold, rollback },
      }),
    );
    return { wave, rolledBack: rollback };
  }

  function afterChunk(r: repo.RolloutRow, kind: 'forward' | 'rollback', out: ChunkResult, started: bigint): void {
    if (out.claimed === 0) return;
    metrics?.chunkSeconds.observe({ kind }, Number(process.hrtime.bigint() - started) / 1e9);
    if (kind === 'forward') {
      if (out.done) metrics?.devices.inc({ level: r.level, outcome: 'done' }, out.done);
      if (out.failed) metrics?.devices.inc({ level: r.level, outcome: 'failed' }, out.failed);
      if (out.skipped) metrics?.devices.inc({ level: r.level, outcome: 'skipped' }, out.skipped);
    }
    if (out.halted) {
      metrics?.halts.inc({ level: r.level });
      deps.logger?.error(
        { rolloutId: r.id, groupId: r.group_id, level: r.level, wave: out.halted.wave, rollback: out.halted.rolledBack },
        `rollout ${r.id} halted: wave ${out.halted.wave} of group ${r.group_id} exceeded its failure threshold${out.halted.rolledBack ? '; rolling the wave back' : ''}`,
      );
    }
  }

  async function completeWave(who: Actor, r: repo.RolloutRow, wave: number): Promise<boolean> {
    return db()
      .transaction()
      .execute(async (trx) => {
        const now = clock.now();
        const locked = await repo.findRollout(trx, r.id, { lock: 'no_key_update' });
        if (!locked || locked.state !== 'running') return false;
        const w = await repo.lockWave(trx, r.id, wave);
        if (!w || w.state !== 'running' || w.listed_to < w.bucket_to) return false;
        if (await repo.hasPendingItems(trx, r.id, wave)) return false;
        await repo.updateWave(trx, r.id, wave, ['running'], { state: 'completed', finished_at: now });
        await audit.record(ex(trx), [
          event(who, {
            action: 'rollout.wave_complete',
            outcome: 'success',
            keyId: `group:${r.group_id}`,
            details: { rolloutId: r.id, wave, kind: w.kind, devices: w.devices, done: w.done, failed: w.failed, skipped: w.skipped },
          }),
        ]);
        return true;
      });
  }

  async function finishRollout(who: Actor, r: repo.RolloutRow): Promise<void> {
    const done = await db()
      .transaction()
      .execute(async (trx) => {
        const now = clock.now();
        const locked = await repo.findRollout(trx, r.id, { lock: 'update' });
        if (!locked || locked.state !== 'running') return false;
        const waves = await repo.listWaves(trx, [r.id]);
        if (waves.some((w) => !FINISHED_WAVES.includes(w.state))) return false;
        await repo.updateRollout(trx, r.id, ['running'], { state: 'completed', finished_at: now, updated_at: now });
        const sum = (k: 'devices' | 'done' | 'failed' | 'skipped') => waves.reduce((n, w) => n + w[k], 0);
        await audit.record(ex(trx), [
          event(who, {
            action: 'rollout.complete',
            outcome: 'success',
            keyId: `group:${r.group_id}`,
            details: { rolloutId: r.id, level: r.level, devices: sum('devices'), done: sum('done'), failed: sum('failed'), skipped: sum('skipped') },
          }),
        ]);
        return true;
      });
    if (done) deps.logger?.info({ rolloutId: r.id, groupId: r.group_id }, 'rollout completed');
  }

  // ---------- rollback of a halted wave ----------

  async function rollBack(who: Actor, r: repo.RolloutRow, o: Pick<DueWavesOptions, 'now'> & Partial<DueWavesOptions>, budget: { left: number }, result: DueWavesResult): Promise<void> {
    if (o.dryRun) {
      if (r.halted_wave !== null) result.devices += (await repo.listWaves(db(), [r.id])).find((w) => w.wave === r.halted_wave)?.done ?? 0;
      return;
    }
    const wave = r.halted_wave;
    if (wave === null) throw new Error(`rollout ${r.id} is rolling back without a halted wave`);
    const keys = await loadGroupKeys(r.group_id);
    try {
      let after: string | undefined;
      for (;;) {
        if (budget.left <= 0) {
          result.more = true;
          return;
        }
        const size = Math.min(chunkSize, budget.left);
        let chunk: ChunkResult;
        try {
          chunk = await withGroupKeys(r.group_id, keys, () => rollbackChunk(who, r, wave, keys, after, size));
        } catch (error) {
          if (error instanceof ChunkAborted) return;
          throw error;
        }
        if (chunk.claimed === 0) break;
        budget.left -= chunk.claimed;
        result.devices += chunk.claimed;
        result.fields += chunk.fields;
        after = chunk.last;
        await deps.hooks?.afterChunk?.({ rolloutId: r.id, wave, kind: 'rollback', devices: chunk.claimed });
      }
      await finishRollback(who, r, wave);
    } finally {
      zeroKeys(keys);
    }
  }

  /**
   * Put up to `size` rotated devices of the halted wave back on their previous primary: the new
   * version → disabled, the previous one (in grace) → primary, field keys rewrapped under it.
   * A device whose versions moved since (rotated again, grace over, being destroyed) stays on
   * the new key (`rollback_failed`, with the reason).
   */
  async function rollbackChunk(who: Actor, r: repo.RolloutRow, wave: number, keys: GroupKeys, after: string | undefined, size: number): Promise<ChunkResult> {
    const started = process.hrtime.bigint();
    const scratch: Buffer[] = [];
    const disabled: Array<{ deviceId: string; version: number }> = [];
    try {
      const out = await db()
        .transaction()
        .execute(async (trx): Promise<ChunkResult & { rolledBack: number; rollbackFailed: number }> => {
          const now = clock.now();
          const current = await repo.findRollout(trx, r.id);
          if (!current || current.state !== 'rolling_back') throw new ChunkAborted(current?.state);
          await repo.preferKeyLookups(trx);
          const items = await repo.claimDoneItems(trx, r.id, wave, after, size);
          const empty = { claimed: 0, done: 0, failed: 0, skipped: 0, fields: 0, rolledBack: 0, rollbackFailed: 0 };
          if (items.length === 0) return empty;
          const ids = items.map((i) => i.device_id);
          const devices = new Map((await repo.lockDevices(trx, ids)).map((d) => [d.id, d]));
          const versions = groupBy(await repo.lockDeviceVersions(trx, ids));
          const fields = groupBy(await repo.lockFieldVersions(trx, ids));

          const outcomes: repo.ItemOutcome[] = [];
          const events: AuditEventInput[] = [];
          const demote: repo.StateMove[] = [];
          const promote: repo.StateMove[] = [];
          const rewraps: repo.FieldWrapMove[] = [];
          const updates: KeyUpdate[] = [];
          const details = { rolloutId: r.id, wave };
          const fail = (id: string, reason: string) => {
            outcomes.push({ deviceId: id, status: 'rollback_failed', reason });
            events.push(event(who, { action: r.level === 'device' ? 'device.rollback' : 'field_key.rollback', outcome: 'failure', keyId: `device:${id}`, details: { ...details, error: reason } }));
          };
          for (const item of items) {
            const id = item.device_id;
            const device = devices.get(id);
            if (!device || device.destroy_after !== null) {
              fail(id, 'device_being_destroyed');
              continue;
            }
            if (r.level === 'device') {
              const rows = versions.get(id) ?? [];
              const next = rows.find((v) => v.version === item.to_version);
              const prev = rows.find((v) => v.version === item.from_version);
              if (!next || next.state !== 'primary' || !prev || prev.state !== 'grace' || prev.wrapped_key === null) {
                fail(id, `versions_changed: v${item.to_version} is ${next?.state ?? 'missing'}, v${item.from_version} is ${prev?.state ?? 'missing'}`);
                continue;
              }
              let moved: ReturnType<typeof planFieldRewraps>;
              try {
                const pk = planKeys(r.group_id, id, keys, scratch);
                moved = planFieldRewraps(id, rows, fields.get(id) ?? [], prev.version, pk.device(prev), pk);
              } catch (error) {
                fail(id, failureOf(error));
                continue;
              }
              demote.push({ deviceId: id, version: next.version, from: 'primary', to: 'disabled', until: null });
              promote.push({ deviceId: id, version: prev.version, from: 'grace', to: 'primary', until: null });
              for (const f of moved) rewraps.push({ deviceId: id, field: f.field, version: f.version, fromParent: f.fromParent, toParent: prev.version, wrapped: f.wrapped });
              updates.push({ deviceId: id, kind: 'device', version: prev.version, state: 'primary' }, { deviceId: id, kind: 'device', version: next.version, state: 'disabled' });
              disabled.push({ deviceId: id, version: next.version });
              outcomes.push({ deviceId: id, status: 'rolled_back' });
              events.push(
                event(who, { action: 'device.rollback', outcome: 'success', keyId: `device:${id}`, details: { ...details, version: prev.version, disabledVersion: next.version, fieldVersionsRewrapped: moved.length } }),
                ...fieldRewrapEvents(id, moved, prev.version).map((e) => event(who, e)),
              );
            } else {
              const own = fields.get(id) ?? [];
              const pairs = (item.fields ?? []).map(([field, from, to]) => ({ field, prev: own.find((f) => f.field === field && f.version === from), next: own.find((f) => f.field === field && f.version === to) }));
              const broken = pairs.find((p) => !p.next || p.next.state !== 'primary' || !p.prev || p.prev.state !== 'grace');
              if (broken) {
                fail(id, `versions_changed: field ${broken.field}`);
                continue;
              }
              for (const p of pairs) {
                if (!p.prev || !p.next) continue;
                demote.push({ deviceId: id, field: p.field, version: p.next.version, from: 'primary', to: 'disabled', until: null });
                promote.push({ deviceId: id, field: p.field, version: p.prev.version, from: 'grace', to: 'primary', until: null });
                updates.push({ deviceId: id, kind: 'field', field: p.field, version: p.prev.version, state: 'primary' }, { deviceId: id, kind: 'field', field: p.field, version: p.next.version, state: 'disabled' });
              }
              outcomes.push({ deviceId: id, status: 'rolled_back' });
              events.push(event(who, { action: 'field_key.rollback', outcome: 'success', keyId: `device:${id}`, details: { ...details, fields: pairs.map((p) => ({ field: p.field, version: p.prev?.version, disabledVersion: p.next?.version })) } }));
            }
          }
          const move = r.level === 'device' ? repo.moveDeviceVersions : repo.moveFieldVersions;
          // the new primary leaves first: one primary per key is a unique index
          if ((await move(trx, demote, now)) !== demote.length || (await move(trx, promote, now)) !== promote.length) throw new Error('a locked version changed state during the rollback');
          if ((await repo.rewrapFieldVersions(trx, rewraps)) !== rewraps.length) throw new Error('a locked field key version moved during the rollback');
          await enqueue(ex(trx), updates);
          await repo.finishItems(trx, r.id, 'done', outcomes, now);

          const locked = await repo.findRollout(trx, r.id, { lock: 'no_key_update' });
          if (!locked || locked.state !== 'rolling_back') throw new ChunkAborted(locked?.state);
          const rolledBack = outcomes.filter((x) => x.status === 'rolled_back').length;
          const rollbackFailed = outcomes.length - rolledBack;
          await repo.addWaveCounters(trx, r.id, wave, { done: -outcomes.length, rolledBack, rollbackFailed });
          await audit.record(ex(trx), events);
          return { ...empty, claimed: items.length, fields: rewraps.length, rolledBack, rollbackFailed, last: ids.at(-1) };
        });
      afterChunk(r, 'rollback', out, started);
      if (out.rolledBack) metrics?.devices.inc({ level: r.level, outcome: 'rolled_back' }, out.rolledBack);
      if (out.rollbackFailed) metrics?.devices.inc({ level: r.level, outcome: 'rollback_failed' }, out.rollbackFailed);
      // the revoked versions must not stay in this process's cache of unwrapped DEKs
      for (const d of disabled) material.cache.invalidate('device', d.deviceId, d.version);
      return out;
    } finally {
      for (const b of scratch) b.fill(0);
    }
  }

  async function finishRollback(who: Actor, r: repo.RolloutRow, wave: number): Promise<void> {
    const done = await db()
      .transaction()
      .execute(async (trx) => {
        const now = clock.now();
        const locked = await repo.findRollout(trx, r.id, { lock: 'update' });
        if (!locked || locked.state !== 'rolling_back') return false;
        if (await repo.hasDoneItems(trx, r.id, wave)) return false; // another runner still holds some
        await repo.updateRollout(trx, r.id, ['rolling_back'], { state: 'rolled_back', finished_at: now, updated_at: now });
        await repo.updateWave(trx, r.id, wave, ['rolling_back'], { state: 'rolled_back', finished_at: now });
        await repo.finishOpenWaves(trx, r.id, 'cancelled', now);
        const w = (await repo.listWaves(trx, [r.id])).find((x) => x.wave === wave);
        await audit.record(ex(trx), [
          event(who, {
            action: 'rollout.rolled_back',
            outcome: 'success',
            keyId: `group:${r.group_id}`,
            details: { rolloutId: r.id, wave, rolledBack: w?.rolled_back ?? 0, rollbackFailed: w?.rollback_failed ?? 0 },
          }),
        ]);
        return true;
      });
    if (done) deps.logger?.warn({ rolloutId: r.id, groupId: r.group_id, wave }, `rollout ${r.id}: wave ${wave} rolled back`);
  }

  return {
    start: async (who: Actor, body: StartRolloutBody) => get(await create(who, body, 'manual')),
    get,
    list,
    pause: (who: Actor, id: string) => control(who, id, 'pause'),
    resume: (who: Actor, id: string) => control(who, id, 'resume'),
    cancel: (who: Actor, id: string) => control(who, id, 'cancel'),
    runDueWaves,
  };
}

export type RolloutService = ReturnType<typeof createRolloutService>;
