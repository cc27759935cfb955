/**
 * The cron entry (DESIGN §3): `POST /v1/rotation/run` and `keystrata rotate` call `run`.
 *
 *   1. KEK: finish an unfinished rewrap, rotate when the policy says it is due, raise the
 *      minimum decryption version when nothing older is referenced and the grace is over.
 *   2. Groups, page by page: move children still under old group versions (any time); start a
 *      rotation of a due group only inside its maintenance windows; retire old versions.
 *   3. Devices and field keys: the due ones are counted; staggered rollouts (`dueWaves`,
 *      rollout.service.ts) start a rollout per group and level that fell due and rotate the
 *      due waves of every running rollout, in chunks (new waves only inside maintenance windows).
 *   4. Sweeps of device and field key versions: grace expiry, retention expiry (`decrypt_only`
 *      past the group's retention → `destroy_scheduled`), due destructions.
 *
 * Safe to run twice at once and to kill anywhere: the KEK step holds a lease, a group start
 * re-checks the primary under a row lock, rewraps take SKIP LOCKED chunks, retirements and
 * sweeps re-check under row locks; every piece of work commits with its audit events, and what
 * is left is read from the rows, so the next run resumes. A dry run takes no lease, calls no
 * KEK operation but `info`, and writes nothing (no audit event either).
 */
import type { Kysely } from 'kysely';
import type { AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB, Executor } from '../db/database.js';
import { AppError } from '../http/errors.js';
import type { Actor } from '../keys/key.service.js';
import type { DestroyResult, GraceResult, RetentionResult, SweepResult, VersionSweeps } from '../keys/version-sweeps.js';
import type { GroupRotationService } from './group-rotation.service.js';
import type { KekRotationService, KekRotationSummary } from './kek-rotation.service.js';
import { inMaintenanceWindow } from './maintenance-window.js';
import { addDays } from './policy.defaults.js';
import type { PolicyService } from './policy.service.js';
import * as repo from './rotation.repository.js';
import { DEFAULT_RUN_LIMIT, MAX_RUN_LIMIT, type RunSummaryView } from './rotation.schemas.js';
import { rotationDb, type RotationDB } from './rotation.tables.js';

const GROUP_PAGE = 100;
const MAX_LISTED = 100;

/**
 * The hook for staggered rollouts (issue 5): run the waves that are due, starting new waves
 * only for groups where `canStart` says the maintenance window is open.
 */
export interface DueWaves {
  runDueWaves(options: {
    now: Date;
    limit: number;
    dryRun: boolean;
    actor: string;
    requestId?: string | undefined;
    canStart(groupId: string): Promise<boolean>;
  }): Promise<{
    waves: number;
    devices: number;
    fields: number;
    failed: number;
    more: boolean;
    started: Array<{ rolloutId: string | null; groupId: string; level: 'device' | 'field' }>;
    halted: Array<{ rolloutId: string; groupId: string; wave: number; rolledBack: boolean }>;
    /** a rollout whose step failed (the others still ran) */
    errors: Array<{ rolloutId: string; groupId: string; error: unknown }>;
  }>;
}

/** Where a failed step is logged in full (pino redacts secrets): the request's logger, the CLI's. */
export interface RunLogger {
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface RotationRunService {
  run(who: Actor, options: { dryRun?: boolean | undefined; limit?: number | undefined; log?: RunLogger | undefined }): Promise<RunSummaryView>;
}

export function createRotationRunService(deps: {
  db: Kysely<DB>;
  audit: AuditSink;
  clock: Clock;
  policies: Pick<PolicyService, 'effectivePolicies' | 'effectivePolicy'>;
  kekRotation: Pick<KekRotationService, 'run'>;
  groupRotation: Pick<GroupRotationService, 'start' | 'rewrapChildren' | 'retire'>;
  sweeps?: VersionSweeps | undefined;
  dueWaves?: DueWaves | undefined;
}): RotationRunService {
  const { audit, clock, policies } = deps;
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));

  async function run(who: Actor, options: { dryRun?: boolean | undefined; limit?: number | undefined; log?: RunLogger | undefined }): Promise<RunSummaryView> {
    const dryRun = options.dryRun === true;
    const limit = Math.min(options.limit ?? DEFAULT_RUN_LIMIT, MAX_RUN_LIMIT);
    const started = Date.now();
    const now = clock.now();
    const summary: RunSummaryView = {
      dryRun,
      startedAt: now.toISOString(),
      durationMs: 0,
      limit,
      complete: false,
      errors: [],
      kek: null,
      groups: { checked: 0, rotated: [], dueOutsideWindow: [], deferred: [], children: { rewrapped: 0, failed: 0, remaining: 0, failures: [] }, retired: [] },
      devices: { primariesDue: 0, fieldPrimariesDue: 0, byGroup: [], rollouts: 'not_available' },
      sweeps: { graceExpired: null, retentionExpired: null, destroyed: null },
    };
    const fail = (step: string, error: unknown, groupId?: string) => {
      if (error instanceof AppError) options.log?.warn({ step, groupId, code: error.code, detail: error.message }, 'rotation run: a step failed');
      else options.log?.error({ step, groupId, err: error }, 'rotation run: a step failed unexpectedly');
      summary.errors.push({
        step,
        ...(groupId !== undefined ? { groupId } : {}),
        code: error instanceof AppError ? error.code : 'internal',
        // AppError messages are written for clients (never material); anything else stays generic
        message: error instanceof AppError ? error.message : 'unexpected error (see the service log)',
      });
    };

    // 1. KEK
    try {
      summary.kek = await deps.kekRotation.run(who, { mode: 'policy', dryRun, limit });
    } catch (error) {
      fail('kek', error);
    }

    // 2. groups
    let budget = limit;
    // maintenance windows seen on the way, so the rollouts' per-group question costs no query
    const windowOpen = new Map<string, boolean>();
    let after: string | undefined;
    for (;;) {
      const ids = await repo.listGroupIds(db(), after, GROUP_PAGE);
      if (ids.length === 0) break;
      after = ids.at(-1);
      const [effective, versions] = await Promise.all([policies.effectivePolicies(ids), repo.listGroupVersionStates(db(), ids)]);
      const cutoffs = [];
      for (const groupId of ids) {
        summary.groups.checked += 1;
        const policy = effective.get(groupId);
        if (!policy) continue;
        const inWindow = inMaintenanceWindow(policy.maintenanceWindows, now);
        windowOpen.set(groupId, inWindow);
        cutoffs.push({ groupId, device: addDays(now, -policy.device.rotationPeriodDays), field: addDays(now, -policy.field.rotationPeriodDays), inWindow });
        try {
          const primary = versions.find((v) => v.group_id === groupId && v.state === 'primary');
          const due = primary !== undefined && now >= addDays(primary.created_at, policy.group.rotationPeriodDays);
          let rotated: Awaited<ReturnType<typeof deps.groupRotation.start>>;
          if (primary && due) {
            if (!inWindow) summary.groups.dueOutsideWindow.push(groupId);
            else if (budget <= 0) summary.groups.deferred.push(groupId);
            else rotated = await deps.groupRotation.start(who, groupId, { reason: 'policy', expectedPrimary: primary.version, dryRun });
          }
          if (rotated) summary.groups.rotated.push({ groupId, fromVersion: rotated.fromVersion, toVersion: rotated.toVersion });
          // One pass moves every child not under the primary: after a start, all of them (old
          // debt included) go straight to the new version. Unfinished rewraps continue at any
          // time, windows or not: they only shorten the life of old versions.
          // children can only be under versions with material: a group with one such version has no debt
          const own = versions.filter((v) => v.group_id === groupId);
          if (rotated || own.filter((v) => v.has_material).length > 1) {
            const moved = dryRun && rotated ? await wouldMoveAll(groupId, Math.max(budget, 0)) : await deps.groupRotation.rewrapChildren(who, groupId, { limit: Math.max(budget, 0), dryRun });
            budget -= moved.rewrapped + moved.failed;
            addChildren(summary, groupId, moved);
          }
          if (own.some((v) => v.state === 'decrypt_only' || v.state === 'destroy_scheduled')) {
            summary.groups.retired.push(...(await deps.groupRotation.retire(who, groupId, policy, { dryRun })));
          }
        } catch (error) {
          fail('group', error, groupId);
        }
      }
      // 3. devices and field keys due by policy (reported until rollouts exist)
      try {
        const due = await repo.countDuePrimaries(db(), cutoffs);
        for (const c of cutoffs) {
          const counts = due.get(c.groupId);
          if (!counts || (counts.devices === 0 && counts.fields === 0)) continue;
          summary.devices.primariesDue += counts.devices;
          summary.devices.fieldPrimariesDue += counts.fields;
          if (summary.devices.byGroup.length < MAX_LISTED) summary.devices.byGroup.push({ groupId: c.groupId, devices: counts.devices, fields: counts.fields, inMaintenanceWindow: c.inWindow });
        }
      } catch (error) {
        fail('devices', error);
      }
      if (ids.length < GROUP_PAGE) break;
    }

    if (deps.dueWaves) {
      try {
        const { errors, ...rollouts } = await deps.dueWaves.runDueWaves({
          now,
          limit,
          dryRun,
          actor: who.actor,
          requestId: who.requestId,
          canStart: async (groupId) => windowOpen.get(groupId) ?? inMaintenanceWindow((await policies.effectivePolicy(groupId)).maintenanceWindows, now),
        });
        summary.devices.rollouts = { ...rollouts, started: rollouts.started.slice(0, MAX_LISTED), halted: rollouts.halted.slice(0, MAX_LISTED) };
        for (const e of errors) fail('rollouts', e.error, e.groupId === '-' ? undefined : e.groupId);
      } catch (error) {
        fail('rollouts', error);
      }
    }

    // 4. sweeps
    if (deps.sweeps) {
      const sweepOptions = { now, limit, dryRun, actor: who.actor, requestId: who.requestId };
      try {
        summary.sweeps.graceExpired = sweepView(await deps.sweeps.expireGrace(sweepOptions));
      } catch (error) {
        fail('expire_grace', error);
      }
      // after grace expiry (a version that just became decrypt_only dates from its grace end) and
      // before destruction (what it schedules is erased by a later run, after the waiting period)
      try {
        summary.sweeps.retentionExpired = sweepView(await deps.sweeps.expireRetention({ ...sweepOptions, policyFor: (ids) => policies.effectivePolicies(ids) }));
      } catch (error) {
        fail('expire_retention', error);
      }
      try {
        summary.sweeps.destroyed = sweepView(await deps.sweeps.destroyDue(sweepOptions));
      } catch (error) {
        fail('destroy_due', error);
      }
    }

    summary.complete =
      summary.errors.length === 0 &&
      (summary.kek === null || (summary.kek.rewrap.groupKeys.remaining === 0 && summary.kek.rewrap.auditKeys.remaining === 0 && summary.kek.rewrap.failures.length === 0 && summary.kek.status === 'done')) &&
      summary.groups.children.remaining === 0 &&
      summary.groups.children.failed === 0 &&
      summary.groups.deferred.length === 0 &&
      !(summary.sweeps.graceExpired?.more ?? false) &&
      !(summary.sweeps.retentionExpired?.more ?? false) &&
      !(summary.sweeps.destroyed?.more ?? false) &&
      (summary.devices.rollouts === 'not_available' || !summary.devices.rollouts.more);
    summary.durationMs = Date.now() - started;

    if (!dryRun) {
      await db()
        .transaction()
        .execute(async (trx) =>
          audit.record(trx as unknown as Executor, [{ actor: who.actor, requestId: who.requestId, action: 'rotation.run', outcome: summary.errors.length === 0 ? 'success' : 'failure', details: runDetails(summary) }]),
        )
        .catch((error: unknown) => fail('audit', error));
    }
    return summary;
  }

  /** Dry run of a rotation that would start now: every child with material would move. */
  async function wouldMoveAll(groupId: string, budget: number): Promise<{ rewrapped: number; failed: number; failures: []; chunks: number; remaining: number }> {
    const total = [...(await repo.countChildrenByParent(db(), groupId)).values()].reduce((a, b) => a + b, 0);
    const rewrapped = Math.min(total, budget);
    return { rewrapped, failed: 0, failures: [], chunks: 0, remaining: total - rewrapped };
  }

  return { run };
}

function addChildren(summary: RunSummaryView, groupId: string, r: { rewrapped: number; failed: number; remaining: number; failures: Array<{ deviceId: string; version: number; parentVersion: number; error: string }> }): void {
  const c = summary.groups.children;
  c.rewrapped += r.rewrapped;
  c.failed += r.failed;
  c.remaining += r.remaining;
  for (const f of r.failures) if (c.failures.length < MAX_LISTED) c.failures.push({ groupId, ...f });
}

function sweepView(result: SweepResult | GraceResult | DestroyResult | RetentionResult): NonNullable<RunSummaryView['sweeps']['graceExpired']> {
  return {
    devices: result.devices,
    fields: result.fields,
    more: result.more,
    ...('blocked' in result ? { blocked: result.blocked } : {}),
    ...('heldForAck' in result ? { heldForAck: result.heldForAck } : {}),
    items: result.items.slice(0, MAX_LISTED).map((i) => ({ level: i.level, deviceId: i.deviceId, ...(i.field !== undefined ? { field: i.field } : {}), version: i.version, from: i.from, to: i.to, due: i.due })),
  };
}

/** What the audit event of a run keeps: counts and ids, never material. */
function runDetails(s: RunSummaryView): Record<string, unknown> {
  const kek: KekRotationSummary | null = s.kek;
  return {
    limit: s.limit,
    complete: s.complete,
    errors: s.errors.length,
    kek: kek ? { status: kek.status, rotated: kek.rotated, toVersion: kek.toVersion, rewrapped: kek.rewrap.groupKeys.rewrapped + kek.rewrap.auditKeys.rewrapped, failed: kek.rewrap.groupKeys.failed + kek.rewrap.auditKeys.failed, minDecryptionVersion: kek.minDecryptionVersion.after } : null,
    groupsRotated: s.groups.rotated.map((r) => `${r.groupId}:v${r.toVersion}`).slice(0, MAX_LISTED),
    childrenRewrapped: s.groups.children.rewrapped,
    childrenRemaining: s.groups.children.remaining,
    retired: s.groups.retired.length,
    devicesDue: s.devices.primariesDue,
    fieldKeysDue: s.devices.fieldPrimariesDue,
    rollouts:
      s.devices.rollouts === 'not_available'
        ? null
        : { started: s.devices.rollouts.started.length, waves: s.devices.rollouts.waves, devices: s.devices.rollouts.devices, failed: s.devices.rollouts.failed, halted: s.devices.rollouts.halted.length },
    graceExpired: s.sweeps.graceExpired ? s.sweeps.graceExpired.devices + s.sweeps.graceExpired.fields : null,
    retentionExpired: s.sweeps.retentionExpired ? s.sweeps.retentionExpired.devices + s.sweeps.retentionExpired.fields : null,
    destroyed: s.sweeps.destroyed ? s.sweeps.destroyed.devices + s.sweeps.destroyed.fields : null,
  };
}
