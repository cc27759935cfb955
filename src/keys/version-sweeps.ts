/**
 * The three time-driven state changes of device DEK and field key versions, called by the cron
 * entry (`POST /v1/rotation/run`, `keystrata rotate`):
 *
 *  - `expireGrace`: `grace` → `decrypt_only` once `state_until` has passed;
 *  - `expireRetention`: `decrypt_only` → `destroy_scheduled` once the group's retention of
 *    that level has passed since `state_changed_at` (`state_until` = now + the waiting period);
 *    a device version is left alone while live field key versions are wrapped under it;
 *  - `destroyDue`:  `destroy_scheduled` → `destroyed` once `state_until` has passed: the
 *    material is erased (`wrapped_key = NULL`), the row and its audit trail stay.
 *
 * Each call does one bounded chunk per level (field keys first, then device DEKs) in one
 * transaction per level, its audit events in the same transaction. Rows are taken with
 * `FOR UPDATE SKIP LOCKED`, so several runners (replicas, overlapping cron runs) share the
 * work and never do one item twice; `more: true` says a level filled its chunk, call again.
 * A dry run reads the same rows without locking and changes nothing.
 *
 * A device version is never erased while a field key version that is neither destroyed nor
 * due is still wrapped under it (that key would become unreadable); such versions are counted
 * in `blocked` and retried by later runs.
 *
 * With `ackHold` (issue 6, the rotation module passes it), a grace version whose successor was
 * sent to the device over MQTT and not acknowledged stays in grace while its group's policy
 * says `graceRequiresAck`, for at most `graceAckMaxHoldDays` after its grace end
 * (lifecycle.repository.ts AckHold); such versions are counted in `heldForAck`. A held version
 * that moves on dates its decrypt_only state from when the hold ended (the acknowledgement, or
 * the end of the longest hold), not from its grace end.
 */
import type { Kysely } from 'kysely';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { fieldKeyId } from '../crypto/binding.js';
import type { DB, Executor } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import type { KeyMaterial } from './key-material.js';
import { assertTransition } from './lifecycle.js';
import * as repo from './lifecycle.repository.js';

export const DEFAULT_SWEEP_LIMIT = 500;
export const MAX_SWEEP_LIMIT = 10_000;

export interface SweepOptions {
  /** defaults to the injected clock */
  now?: Date | undefined;
  /** at most this many versions per level per call (default 500, at most 10,000) */
  limit?: number | undefined;
  /** report what would change, touch nothing */
  dryRun?: boolean | undefined;
  /** audit actor (default `system:rotation`) and request id */
  actor?: string | undefined;
  requestId?: string | undefined;
}

export interface SweepItem {
  level: 'device' | 'field';
  deviceId: string;
  field?: string;
  version: number;
  from: VersionState;
  to: VersionState;
  /** when its state ended */
  due: string;
}

export interface SweepResult {
  dryRun: boolean;
  /** device DEK versions changed (or that would be) */
  devices: number;
  /** field key versions changed (or that would be) */
  fields: number;
  /** what changed (or would), at most `limit` per level */
  items: SweepItem[];
  /** a level filled its chunk: there may be more due, call again */
  more: boolean;
}

export interface GraceResult extends SweepResult {
  /** due grace versions left in grace: their successor was sent and not acknowledged, and the policy waits (0 without ackHold) */
  heldForAck: number;
}

export interface DestroyResult extends SweepResult {
  /** due device versions left alone because live field key versions are still wrapped under them */
  blocked: number;
}

/** One level's retention of `decrypt_only` versions (null: kept for ever) and its destruction waiting period. */
export interface RetentionRule {
  retentionDays: number | null;
  destructionWaitDays: number;
}

/** The effective device and field retention of many groups at once (PolicyService.effectivePolicies fits). */
export type RetentionPolicyLookup = (groupIds: readonly string[]) => Promise<ReadonlyMap<string, { device: RetentionRule; field: RetentionRule }>>;

export interface RetentionOptions extends SweepOptions {
  policyFor: RetentionPolicyLookup;
}

export interface RetentionResult extends SweepResult {
  /** device versions past retention left alone because live field key versions are still wrapped under them */
  blocked: number;
}

export interface VersionSweeps {
  expireGrace(options?: SweepOptions): Promise<GraceResult>;
  /** `decrypt_only` → `destroy_scheduled` once the group's retention has passed since the version became decrypt_only */
  expireRetention(options: RetentionOptions): Promise<RetentionResult>;
  destroyDue(options?: SweepOptions): Promise<DestroyResult>;
}

export function createVersionSweeps(deps: {
  db: Kysely<DB>;
  audit: AuditSink;
  material: Pick<KeyMaterial, 'cache'>;
  clock: Clock;
  /** hold grace versions for acknowledgements (see above); undefined: never hold */
  ackHold?: repo.AckHold | undefined;
}): VersionSweeps {
  const { db, audit, material, clock } = deps;

  interface Pass {
    from: 'grace' | 'destroy_scheduled';
    to: VersionState;
    find: (ex: Executor, q: repo.DueQuery) => Promise<repo.DueVersion[]>;
    apply: (ex: Executor, row: repo.DueVersion, now: Date) => Promise<void>;
    event: (row: repo.DueVersion) => Omit<AuditEventInput, 'actor' | 'requestId'>;
  }

  /** One level, one chunk, one transaction (or a plain read for a dry run). */
  async function runPass(pass: Pass, level: 'device' | 'field', options: SweepOptions): Promise<{ items: SweepItem[]; full: boolean }> {
    const now = options.now ?? clock.now();
    const limit = boundedLimit(options.limit);
    const query = { state: pass.from, now, limit, ackHold: deps.ackHold };
    const toItem = (row: repo.DueVersion): SweepItem => ({
      level,
      deviceId: row.device_id,
      ...(row.field !== null ? { field: row.field } : {}),
      version: row.version,
      from: pass.from,
      to: pass.to,
      due: row.state_until.toISOString(),
    });
    if (options.dryRun) {
      const rows = await pass.find(db, { ...query, lock: false });
      return { items: rows.map(toItem), full: rows.length === limit };
    }
    const rows = await db.transaction().execute(async (trx) => {
      const due = await pass.find(trx, { ...query, lock: true });
      for (const row of due) {
        assertTransition(`${level === 'device' ? 'Device' : 'Field key'} version`, row.state, pass.to);
        await pass.apply(trx, row, now);
      }
      await audit.record(
        trx,
        due.map((row) => ({ ...pass.event(row), actor: options.actor ?? 'system:rotation', requestId: options.requestId })),
      );
      return due;
    });
    return { items: rows.map(toItem), full: rows.length === limit };
  }

  const keyIdOf = (row: repo.DueVersion) => (row.field === null ? `device:${row.device_id}` : `field:${fieldKeyId(row.device_id, row.field)}`);

  // a version held for an acknowledgement says until when (the change dates from then)
  const graceDetails = (row: repo.DueVersion) => ({
    version: row.version,
    graceUntil: row.state_until.toISOString(),
    ...(row.changed_at.getTime() > row.state_until.getTime() ? { heldForAckUntil: row.changed_at.toISOString() } : {}),
    state: 'decrypt_only',
  });
  const graceField: Pass = {
    from: 'grace',
    to: 'decrypt_only',
    find: repo.findDueFieldVersions,
    // The change dates from the grace's end (or the end of a hold for an acknowledgement), not
    // from when cron got to it: a late run must not widen the window in which backends accept
    // new messages under this version.
    apply: (ex, row) => repo.updateFieldVersion(ex, row.device_id, row.field as string, row.version, 'grace', { state: 'decrypt_only', state_changed_at: row.changed_at, state_until: null }),
    event: (row) => ({ action: 'field_key.grace_expire', outcome: 'success', keyId: keyIdOf(row), details: graceDetails(row) }),
  };
  const graceDevice: Pass = {
    ...graceField,
    find: repo.findDueDeviceVersions,
    apply: (ex, row) => repo.updateDeviceVersion(ex, row.device_id, row.version, 'grace', { state: 'decrypt_only', state_changed_at: row.changed_at, state_until: null }),
    event: (row) => ({ action: 'device.grace_expire', outcome: 'success', keyId: keyIdOf(row), details: graceDetails(row) }),
  };
  const destroyEvent = (action: string) => (row: repo.DueVersion): Omit<AuditEventInput, 'actor' | 'requestId'> => ({
    action,
    outcome: 'success',
    keyId: keyIdOf(row),
    details: { version: row.version, scheduledFor: row.state_until.toISOString(), stateBeforeDestroy: row.state_before_destroy, materialErased: true },
  });
  const destroyField: Pass = {
    from: 'destroy_scheduled',
    to: 'destroyed',
    find: repo.findDueFieldVersions,
    apply: (ex, row, now) => repo.destroyFieldVersion(ex, row.device_id, row.field as string, row.version, now),
    event: destroyEvent('field_key.destroy'),
  };
  const destroyDevice: Pass = {
    ...destroyField,
    find: repo.findDueDeviceVersions,
    apply: (ex, row, now) => repo.destroyDeviceVersion(ex, row.device_id, row.version, now),
    event: destroyEvent('device.destroy'),
  };

  async function expireGrace(options: SweepOptions = {}): Promise<GraceResult> {
    const now = options.now ?? clock.now();
    const pinned = { ...options, now };
    const fields = await runPass(graceField, 'field', pinned);
    const devices = await runPass(graceDevice, 'device', pinned);
    const hold = deps.ackHold;
    const heldForAck = hold ? (await repo.countHeldForAck(db, 'field', now, hold)) + (await repo.countHeldForAck(db, 'device', now, hold)) : 0;
    return { ...summary(options, devices, fields), heldForAck };
  }

  async function destroyDue(options: SweepOptions = {}): Promise<DestroyResult> {
    const now = options.now ?? clock.now();
    const pinned = { ...options, now };
    // field keys first: their device version is erased only once nothing live hangs under it
    const fields = await runPass(destroyField, 'field', pinned);
    const devices = await runPass(destroyDevice, 'device', pinned);
    if (!options.dryRun) {
      for (const item of devices.items) material.cache.invalidate('device', item.deviceId, item.version);
    }
    const blocked = await repo.countBlockedDeviceDestructions(db, now);
    return { ...summary(options, devices, fields), blocked };
  }

  // ---------- retention: decrypt_only → destroy_scheduled ----------

  /** One page of groups' cutoffs (policies differ per group); undefined when none of them has a retention. */
  async function retentionCutoffs(ids: readonly string[], now: Date, policyFor: RetentionPolicyLookup): Promise<repo.RetentionCutoffs | undefined> {
    const policies = await policyFor(ids);
    const c: repo.RetentionCutoffs = { groupIds: [], deviceCutoff: [], deviceDestroyAfter: [], fieldCutoff: [], fieldDestroyAfter: [] };
    const at = (days: number) => new Date(now.getTime() + days * DAY_MS);
    for (const id of ids) {
      const p = policies.get(id);
      if (!p || (p.device.retentionDays === null && p.field.retentionDays === null)) continue;
      c.groupIds.push(id);
      c.deviceCutoff.push(p.device.retentionDays === null ? null : at(-p.device.retentionDays));
      c.deviceDestroyAfter.push(at(p.device.destructionWaitDays));
      c.fieldCutoff.push(p.field.retentionDays === null ? null : at(-p.field.retentionDays));
      c.fieldDestroyAfter.push(at(p.field.destructionWaitDays));
    }
    return c.groupIds.length > 0 ? c : undefined;
  }

  /** One level, one chunk over one page of groups, one transaction (a plain read for a dry run). */
  async function retentionPass(level: 'device' | 'field', groups: repo.RetentionCutoffs, now: Date, limit: number, options: RetentionOptions): Promise<SweepItem[]> {
    const find = level === 'field' ? repo.findRetentionDueFieldVersions : repo.findRetentionDueDeviceVersions;
    // when retention ended: the cutoff is `now - retention`, so the end is `state_changed_at + (now - cutoff)`
    const endOf = (row: repo.RetentionDueVersion) => new Date(row.state_changed_at.getTime() + (now.getTime() - row.cutoff.getTime()));
    const toItem = (row: repo.RetentionDueVersion): SweepItem => ({
      level,
      deviceId: row.device_id,
      ...(row.field !== null ? { field: row.field } : {}),
      version: row.version,
      from: 'decrypt_only',
      to: 'destroy_scheduled',
      due: endOf(row).toISOString(),
    });
    if (options.dryRun) return (await find(db, { groups, limit, lock: false, anticipateFields: true })).map(toItem);
    const rows = await db.transaction().execute(async (trx) => {
      const due = await find(trx, { groups, limit, lock: true, anticipateFields: false });
      if (due.length === 0) return due;
      for (const row of due) assertTransition(`${level === 'device' ? 'Device' : 'Field key'} version`, row.state, 'destroy_scheduled');
      const changed =
        level === 'field'
          ? await repo.scheduleRetentionFieldVersions(trx, due.map((r) => ({ ...r, field: r.field as string })), now)
          : await repo.scheduleRetentionDeviceVersions(trx, due, now);
      // the rows are locked by this transaction: anything else is a bug, and nothing of the chunk commits
      if (changed !== due.length) throw new Error(`retention: ${due.length - changed} locked ${level} version(s) were no longer decrypt_only`);
      await audit.record(
        trx,
        due.map((row) => ({
          action: level === 'device' ? 'device.retention_expire' : 'field_key.retention_expire',
          outcome: 'success' as const,
          keyId: level === 'device' ? `device:${row.device_id}` : `field:${fieldKeyId(row.device_id, row.field as string)}`,
          details: {
            version: row.version,
            decryptOnlySince: row.state_changed_at.toISOString(),
            retentionDays: Math.round((now.getTime() - row.cutoff.getTime()) / DAY_MS),
            retentionEndedAt: endOf(row).toISOString(),
            destroyAfter: row.destroy_after.toISOString(),
            state: 'destroy_scheduled',
          },
          actor: options.actor ?? 'system:rotation',
          requestId: options.requestId,
        })),
      );
      return due;
    });
    // no longer deliverable: drop unwrapped device DEKs now (field keys are never cached)
    if (level === 'device') for (const row of rows) material.cache.invalidate('device', row.device_id, row.version);
    return rows.map(toItem);
  }

  /**
   * Groups are read a page at a time, each page's effective policies resolved at once, and each
   * level swept with one query per chunk joining the page's cutoffs (so a group that keeps its
   * versions for ever never fills a chunk with versions nobody may schedule). Field keys go
   * first, so a device version whose field keys expire in the same run is not held back by them.
   */
  async function expireRetention(options: RetentionOptions): Promise<RetentionResult> {
    const now = options.now ?? clock.now();
    const limit = boundedLimit(options.limit);
    const fields: SweepItem[] = [];
    const devices: SweepItem[] = [];
    let blocked = 0;
    let after: string | undefined;
    for (;;) {
      const ids = await repo.listGroupIdPage(db, after, RETENTION_GROUP_PAGE);
      if (ids.length === 0) break;
      after = ids.at(-1);
      const groups = await retentionCutoffs(ids, now, options.policyFor);
      if (groups) {
        if (fields.length < limit) fields.push(...(await retentionPass('field', groups, now, limit - fields.length, options)));
        if (devices.length < limit) devices.push(...(await retentionPass('device', groups, now, limit - devices.length, options)));
        blocked += await repo.countRetentionBlockedDeviceVersions(db, groups, options.dryRun === true);
      }
      if (ids.length < RETENTION_GROUP_PAGE || (fields.length >= limit && devices.length >= limit)) break;
    }
    return { ...summary(options, { items: devices, full: devices.length >= limit }, { items: fields, full: fields.length >= limit }), blocked };
  }

  return { expireGrace, expireRetention, destroyDue };
}

const DAY_MS = 24 * 60 * 60 * 1000;
const RETENTION_GROUP_PAGE = 500;

function summary(options: SweepOptions, devices: { items: SweepItem[]; full: boolean }, fields: { items: SweepItem[]; full: boolean }): SweepResult {
  return {
    dryRun: options.dryRun === true,
    devices: devices.items.length,
    fields: fields.items.length,
    items: [...devices.items, ...fields.items],
    more: devices.full || fields.full,
  };
}

function boundedLimit(limit: number | undefined): number {
  if (limit === undefined) return DEFAULT_SWEEP_LIMIT;
  if (!Number.isInteger(limit) || limit < 1) throw new RangeError('limit must be a positive integer');
  return Math.min(limit, MAX_SWEEP_LIMIT);
}
