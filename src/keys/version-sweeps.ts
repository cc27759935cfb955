/**
 * The two time-driven state changes of device DEK and field key versions, called by the cron
 * entry (`POST /v1/rotation/run`, `keystrata rotate`):
 *
 *  - `expireGrace`: `grace` → `decrypt_only` once `state_until` has passed;
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

export interface VersionSweeps {
  expireGrace(options?: SweepOptions): Promise<GraceResult>;
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

  return { expireGrace, destroyDue };
}

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
