/**
 * The lifecycle of device DEK and field key versions (DESIGN §2, §3): immediate rotation,
 * crypto-shredding with a cancellable waiting period, and disable/enable of single versions.
 *
 * Every operation runs in ONE transaction that first locks the device row, then its version
 * rows (`SELECT … FOR UPDATE`, lifecycle.repository.ts), checks every state change with
 * `assertTransition`, and writes its audit events last, in the same transaction.
 *
 * Group DEKs are unwrapped by the KEK provider (a network call to Vault) *before* the
 * transaction opens, so no database connection waits on Vault. A transaction that finds it
 * needs a group key nobody fetched (a group rotation moved a wrap meanwhile) rolls back, the
 * key is fetched, and the transaction runs again. Device DEKs and field keys are unwrapped
 * locally inside the transaction; every plaintext key is zeroed once used.
 *
 * Invariant: a device that is not being destroyed always keeps a readable primary. Disabling
 * the primary promotes the newest `grace` version (the previous primary, still held by devices)
 * or, with `force`, replaces it by a fresh primary (an immediate rotation); otherwise 409.
 */
import type { Kysely, Transaction } from 'kysely';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { fieldKeyId } from '../crypto/binding.js';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import { BadRequestError, ConflictError, NotFoundError } from '../http/errors.js';
import { deviceRotateEvent, fieldRewrapEvents, fieldRotateEvent, planDeviceRotation, planFieldRewraps, planFieldRotation, type PlanKeys } from './device-rotation.js';
import type { KeyMaterial } from './key-material.js';
import * as keyRepo from './key.repository.js';
import type { Actor, DeviceView, KeyService } from './key.service.js';
import { assertTransition, LIVE_STATES } from './lifecycle.js';
import * as repo from './lifecycle.repository.js';
import { enqueueKeyUpdate } from '../distribution/outbox.js'; // issue 6: key updates to devices (outbox, same transaction)

const DAY_MS = 24 * 60 * 60 * 1000;

export const MIN_DESTROY_WAIT_DAYS = 1;
export const MAX_DESTROY_WAIT_DAYS = 30;

/** What a rotation policy says about the lifecycle of one level's versions. */
export interface LifecyclePolicy {
  /** how long the previous primary stays in `grace` after a rotation */
  gracePeriodMs: number;
  /** default crypto-shred waiting period (bounded to 1–30 days) */
  destroyWaitMs: number;
}

/** Policy lookup (the rotation policies plug in here); the defaults apply without one. */
export type LifecyclePolicyLookup = (scope: { level: 'device' | 'field'; groupId: string }) => LifecyclePolicy | Promise<LifecyclePolicy>;

export const DEFAULT_LIFECYCLE_POLICY: Readonly<LifecyclePolicy> = Object.freeze({ gracePeriodMs: 7 * DAY_MS, destroyWaitMs: 7 * DAY_MS });

export interface RotateOptions {
  /** suspected compromise: the old primary goes straight to `disabled` instead of `grace` */
  compromised?: boolean | undefined;
  /** overrides the policy's grace period for this rotation */
  gracePeriodMs?: number | undefined;
}

export interface VersionTarget {
  deviceId: string;
  /** a field key version when set, a device DEK version otherwise */
  field?: string | undefined;
  version: number;
}

export interface ScheduledVersion {
  field?: string;
  version: number;
  previousState: VersionState;
  stateUntil: string;
}

export interface DestructionSchedule {
  deviceId: string;
  destroyAfter: string;
  waitDays: number;
  versions: ScheduledVersion[];
}

type Trx = Transaction<DB>;

interface Locked {
  /** the group's primary version, share-locked (operations that may create a version) */
  groupPrimary: number | null;
  device: repo.LockedDevice;
  versions: repo.LockedDeviceVersion[];
  fields: repo.LockedFieldVersion[];
}

/** A group key the transaction needs but nobody fetched: roll back, fetch, run again. */
class NeedGroupKeys extends Error {
  constructor(readonly versions: number[]) {
    super('group keys needed');
  }
}

const MAX_ATTEMPTS = 3;

export function createDeviceLifecycleService(deps: {
  db: Kysely<DB>;
  material: KeyMaterial;
  audit: AuditSink;
  clock: Clock;
  keys: Pick<KeyService, 'getDevice'>;
  policy?: LifecyclePolicyLookup | undefined;
}) {
  const { db, material, audit, clock, keys } = deps;
  const policyFor = async (level: 'device' | 'field', groupId: string): Promise<LifecyclePolicy> =>
    deps.policy ? deps.policy({ level, groupId }) : DEFAULT_LIFECYCLE_POLICY;
  const event = (who: Actor, e: Omit<AuditEventInput, 'actor' | 'requestId'>): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });

  // ---------- group keys fetched outside the transaction ----------

  interface KeyRing {
    groupId: string;
    group(version: number): Buffer;
    /** the device DEK of a locked row (unwrapped locally; zeroed with the ring) */
    device(row: { device_id: string; version: number; parent_version: number; wrapped_key: Buffer | null }): Buffer;
    /** a buffer the ring zeroes at the end */
    keep(buffer: Buffer): Buffer;
  }

  /**
   * Run `work` in one transaction with the group keys it needs. `prefetch` names the group
   * versions it will probably need; anything else it asks for makes it roll back and run again.
   */
  async function withKeys<T>(groupId: string, prefetch: readonly number[], work: (trx: Trx, ring: KeyRing) => Promise<T>): Promise<T> {
    const groupKeys = new Map<number, Buffer>();
    const tried = new Set<number>();
    const scratch: Buffer[] = [];
    const load = async (versions: readonly number[]) => {
      const wanted = [...new Set(versions)].filter((v) => !tried.has(v));
      const rows = await repo.listGroupVersionMaterial(db, groupId, wanted);
      for (const row of rows) {
        if (row.wrapped_key !== null) groupKeys.set(row.version, await material.groupKey(groupId, row.version, row.wrapped_key));
      }
      for (const v of wanted) tried.add(v);
    };
    const ring: KeyRing = {
      groupId,
      group(version) {
        const key = groupKeys.get(version);
        if (key) return key;
        if (tried.has(version)) throw new ConflictError(`Group ${groupId} version ${version} has no material to unwrap with`, 'parent_missing');
        throw new NeedGroupKeys([version]);
      },
      device(row) {
        return ring.keep(material.deviceKey(ring.group(row.parent_version), groupId, row.parent_version, row.device_id, row.version, row.wrapped_key));
      },
      keep(buffer) {
        scratch.push(buffer);
        return buffer;
      },
    };
    try {
      await load(prefetch);
      for (let attempt = 1; ; attempt++) {
        try {
          return await db.transaction().execute((trx) => work(trx, ring));
        } catch (error) {
          if (!(error instanceof NeedGroupKeys)) throw error;
          if (attempt >= MAX_ATTEMPTS) throw new ConflictError('The key hierarchy changed during the operation; try again', 'concurrent_modification');
          await load(error.versions);
        } finally {
          for (const b of scratch.splice(0)) b.fill(0);
        }
      }
    } finally {
      for (const key of groupKeys.values()) key.fill(0);
    }
  }

  // ---------- reads and checks under lock ----------

  async function findDeviceOrThrow(deviceId: string): Promise<{ id: string; group_id: string }> {
    const device = await keyRepo.findDevice(db, deviceId);
    if (!device) throw new NotFoundError(`Device ${deviceId} not found`);
    return device;
  }

  /** Locks in the one order every writer uses: group primary (share) → device → device versions → field versions. */
  async function lockAll(trx: Trx, device: { id: string; group_id: string }, options: { groupPrimary?: boolean } = {}): Promise<Locked> {
    const groupPrimary = options.groupPrimary ? ((await repo.lockGroupPrimaryForShare(trx, device.group_id))?.version ?? null) : null;
    const locked = await repo.lockDevice(trx, device.id);
    if (!locked) throw new NotFoundError(`Device ${device.id} not found`);
    const versions = await repo.lockDeviceVersions(trx, device.id);
    const fields = await repo.lockFieldVersions(trx, device.id);
    return { groupPrimary, device: locked, versions, fields };
  }

  function assertNotBeingDestroyed(device: repo.LockedDevice, now: Date): void {
    if (device.destroy_after === null) return;
    if (device.destroy_after <= now) throw new ConflictError(`Device ${device.id} has been destroyed`, 'device_destroyed');
    throw new ConflictError(
      `Device ${device.id} is scheduled for destruction at ${device.destroy_after.toISOString()}: restore it first (POST /v1/devices/${device.id}/restore)`,
      'device_destruction_scheduled',
    );
  }

  const isLive = (state: VersionState) => LIVE_STATES.includes(state);
  /** The version that can take over from a revoked primary: the newest one still in its grace period (devices hold it). */
  const successorOf = <T extends { state: VersionState; version: number; state_until: Date | null }>(rows: readonly T[], now: Date): T | undefined =>
    rows.filter((r) => r.state === 'grace' && (r.state_until === null || r.state_until > now)).sort((a, b) => b.version - a.version)[0];

  // ---------- the building blocks (inside a transaction, under the device lock) ----------

  /**
   * Move every live field key version not already under `toVersion` to be wrapped under it.
   * The field keys' material does not change (devices notice nothing); only the wrap and
   * `parent_version` do. Returns the audit events (one per field key).
   */
  async function rewrapFieldsUnder(trx: Trx, ring: KeyRing, who: Actor, locked: Locked, toVersion: number, toKey: Buffer): Promise<AuditEventInput[]> {
    const rewraps = planFieldRewraps(locked.device.id, locked.versions, locked.fields, toVersion, toKey, planKeys(ring, locked.device.id));
    await applyFieldRewraps(trx, locked, rewraps, toVersion);
    return fieldRewrapEvents(locked.device.id, rewraps, toVersion).map((e) => event(who, e));
  }

  async function applyFieldRewraps(trx: Trx, locked: Locked, rewraps: ReturnType<typeof planFieldRewraps>, toVersion: number): Promise<void> {
    for (const r of rewraps) {
      await repo.rewrapFieldVersion(trx, { device_id: locked.device.id, field: r.field, version: r.version, parent_version: r.fromParent }, r.wrapped, toVersion);
      const row = locked.fields.find((f) => f.field === r.field && f.version === r.version);
      if (row) {
        row.parent_version = toVersion;
        row.wrapped_key = r.wrapped;
      }
    }
  }

  /** Unwrapping for the shared rotation plans (device-rotation.ts), through the ring (cached, zeroed with it). */
  function planKeys(ring: KeyRing, deviceId: string): PlanKeys {
    return {
      device: (row) => ring.device({ device_id: deviceId, version: row.version, parent_version: row.parent_version, wrapped_key: row.wrapped_key }),
      field: (deviceKey, deviceVersion, row) => material.fieldKey(deviceKey, deviceId, deviceVersion, row.field, row.version, row.wrapped_key),
      keep: (buffer) => ring.keep(buffer),
    };
  }

  /** New device DEK version as primary; the old primary → grace (or disabled); field keys rewrapped. */
  async function rotateDeviceLocked(
    trx: Trx,
    ring: KeyRing,
    who: Actor,
    locked: Locked,
    options: { compromised: boolean; graceUntil: Date; now: Date; reason: string },
  ): Promise<{ version: number; previous?: number }> {
    const { device, versions, groupPrimary } = locked;
    const { now } = options;
    if (groupPrimary === null) throw new ConflictError(`Group ${device.group_id} has no primary version`, 'no_primary_version');
    const plan = planDeviceRotation({
      deviceId: device.id,
      groupId: device.group_id,
      groupVersion: groupPrimary,
      groupKey: ring.group(groupPrimary),
      versions,
      fields: locked.fields,
      material,
      keys: planKeys(ring, device.id),
      ...options,
    });
    const { version, previous } = plan;
    if (previous) {
      // the old primary leaves first: one primary per key is a unique index
      await repo.updateDeviceVersion(trx, device.id, previous.version, 'primary', { state: previous.to, state_changed_at: now, state_until: previous.stateUntil });
      const old = versions.find((v) => v.version === previous.version);
      if (old) {
        old.state = previous.to;
        old.state_until = previous.stateUntil;
      }
    }
    await repo.insertDeviceVersion(trx, plan.row);
    versions.push(plan.row);
    await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'device', version, state: 'primary' }); // issue 6: the new key to the device
    if (previous?.to === 'disabled') await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'device', version: previous.version, state: 'disabled' }); // issue 6

    await applyFieldRewraps(trx, locked, plan.rewraps, version);
    await audit.record(trx, [
      event(who, deviceRotateEvent(device.id, plan, { reason: options.reason, compromised: options.compromised })),
      ...fieldRewrapEvents(device.id, plan.rewraps, version).map((e) => event(who, e)),
    ]);
    return previous ? { version, previous: previous.version } : { version };
  }

  /** New field key version as primary under the device primary; the old primary → grace (or disabled). */
  async function rotateFieldLocked(
    trx: Trx,
    ring: KeyRing,
    who: Actor,
    locked: Locked,
    field: string,
    options: { compromised: boolean; graceUntil: Date; now: Date; reason: string },
  ): Promise<{ version: number; previous?: number }> {
    const { device, versions, fields } = locked;
    const { now } = options;
    const rows = fields.filter((f) => f.field === field);
    if (rows.length === 0) throw new NotFoundError(`Field key ${field} of device ${device.id} not found`);
    const devicePrimary = versions.find((v) => v.state === 'primary');
    if (!devicePrimary) throw new ConflictError(`Device ${device.id} has no primary version to wrap a new field key under`, 'no_primary_version');
    const plan = planFieldRotation({
      deviceId: device.id,
      field,
      rows,
      deviceVersion: devicePrimary.version,
      deviceKey: ring.device(devicePrimary),
      material,
      keys: ring,
      ...options,
    });
    const { version, previous } = plan;
    if (previous) {
      await repo.updateFieldVersion(trx, device.id, field, previous.version, 'primary', { state: previous.to, state_changed_at: now, state_until: previous.stateUntil });
      const old = rows.find((r) => r.version === previous.version);
      if (old) {
        old.state = previous.to;
        old.state_until = previous.stateUntil;
      }
    }
    await repo.insertFieldVersion(trx, plan.row);
    fields.push(plan.row);
    await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'field', field, version, state: 'primary' }); // issue 6: the new key to the device
    if (previous?.to === 'disabled') await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'field', field, version: previous.version, state: 'disabled' }); // issue 6
    await audit.record(trx, [event(who, fieldRotateEvent(device.id, plan, { reason: options.reason, compromised: options.compromised }))]);
    return previous ? { version, previous: previous.version } : { version };
  }

  // ---------- rotation ----------

  /**
   * Immediate device rotation. Refused (409 `concurrent_rotation`) when the primary changed
   * since this call read it, so two concurrent rotations of one device cannot both succeed.
   */
  async function rotateDevice(who: Actor, deviceId: string, options: RotateOptions = {}): Promise<DeviceView> {
    const device = await findDeviceOrThrow(deviceId);
    const grace = options.gracePeriodMs ?? (await policyFor('device', device.group_id)).gracePeriodMs;
    assertGracePeriod(grace);
    const seen = await keyRepo.listDeviceVersions(db, [deviceId]);
    const expectedPrimary = seen.find((v) => v.state === 'primary')?.version ?? null;
    const groupPrimary = await keyRepo.findPrimaryGroupVersion(db, device.group_id);
    const prefetch = [...(groupPrimary ? [groupPrimary.version] : []), ...seen.filter((v) => isLive(v.state)).map((v) => v.parent_version)];

    const result = await withKeys(device.group_id, prefetch, async (trx, ring) => {
      const now = clock.now();
      const locked = await lockAll(trx, device, { groupPrimary: true });
      assertNotBeingDestroyed(locked.device, now);
      const primary = locked.versions.find((v) => v.state === 'primary')?.version ?? null;
      if (primary !== expectedPrimary) {
        throw new ConflictError(`Device ${deviceId} was rotated concurrently (primary is now v${primary ?? 'none'}); read it again before rotating`, 'concurrent_rotation');
      }
      const compromised = options.compromised === true;
      return rotateDeviceLocked(trx, ring, who, locked, { compromised, graceUntil: new Date(now.getTime() + grace), now, reason: compromised ? 'compromise' : 'manual' });
    });
    if (result.previous !== undefined && options.compromised) material.cache.invalidate('device', deviceId, result.previous);
    return keys.getDevice(deviceId);
  }

  async function rotateField(who: Actor, deviceId: string, field: string, options: RotateOptions = {}): Promise<DeviceView> {
    const device = await findDeviceOrThrow(deviceId);
    const grace = options.gracePeriodMs ?? (await policyFor('field', device.group_id)).gracePeriodMs;
    assertGracePeriod(grace);
    const seen = await keyRepo.listFieldVersions(db, [deviceId], field);
    if (seen.length === 0) throw new NotFoundError(`Field key ${field} of device ${deviceId} not found`);
    const expectedPrimary = seen.find((v) => v.state === 'primary')?.version ?? null;
    const devicePrimary = await keyRepo.findPrimaryDeviceVersion(db, deviceId);

    await withKeys(device.group_id, devicePrimary ? [devicePrimary.parent_version] : [], async (trx, ring) => {
      const now = clock.now();
      const locked = await lockAll(trx, device);
      assertNotBeingDestroyed(locked.device, now);
      const primary = locked.fields.find((f) => f.field === field && f.state === 'primary')?.version ?? null;
      if (primary !== expectedPrimary) {
        throw new ConflictError(`Field key ${field} of device ${deviceId} was rotated concurrently; read it again before rotating`, 'concurrent_rotation');
      }
      const compromised = options.compromised === true;
      return rotateFieldLocked(trx, ring, who, locked, field, { compromised, graceUntil: new Date(now.getTime() + grace), now, reason: compromised ? 'compromise' : 'manual' });
    });
    return keys.getDevice(deviceId);
  }

  // ---------- crypto-shredding ----------

  /**
   * Schedule every version of the device and of its field keys for destruction after the
   * waiting period. Each version remembers its state so `restore` can put it back. A version
   * already scheduled (by retention) keeps its schedule, brought forward to the device's if later.
   */
  async function scheduleDestruction(who: Actor, deviceId: string, options: { waitDays?: number | undefined } = {}): Promise<DestructionSchedule> {
    const device = await findDeviceOrThrow(deviceId);
    const waitMs = options.waitDays !== undefined ? options.waitDays * DAY_MS : (await policyFor('device', device.group_id)).destroyWaitMs;
    if (!Number.isInteger(waitMs / DAY_MS) || waitMs < MIN_DESTROY_WAIT_DAYS * DAY_MS || waitMs > MAX_DESTROY_WAIT_DAYS * DAY_MS) {
      throw new BadRequestError(`waitDays must be a whole number of days from ${MIN_DESTROY_WAIT_DAYS} to ${MAX_DESTROY_WAIT_DAYS}`, { field: 'querystring.waitDays' });
    }
    const waitDays = waitMs / DAY_MS;

    const schedule = await db.transaction().execute(async (trx) => {
      const now = clock.now();
      const locked = await lockAll(trx, device);
      assertNotBeingDestroyed(locked.device, now);
      const destroyAfter = new Date(now.getTime() + waitMs);
      const scheduled: ScheduledVersion[] = [];

      const scheduleRow = async (row: repo.LockedDeviceVersion | repo.LockedFieldVersion, what: string, update: (from: VersionState, patch: repo.DeviceVersionPatch) => Promise<void>) => {
        if (row.state === 'destroyed') return;
        const field = 'field' in row ? { field: row.field } : {};
        if (row.state === 'destroy_scheduled') {
          // already on its way (retention): never later than the device
          if (row.state_until === null || row.state_until > destroyAfter) await update('destroy_scheduled', { state_until: destroyAfter });
          return;
        }
        assertTransition(what, row.state, 'destroy_scheduled');
        await update(row.state, {
          state: 'destroy_scheduled',
          state_changed_at: now,
          state_until: destroyAfter,
          state_before_destroy: row.state,
          state_until_before_destroy: row.state_until,
        });
        scheduled.push({ ...field, version: row.version, previousState: row.state, stateUntil: destroyAfter.toISOString() });
      };
      for (const row of locked.versions) {
        await scheduleRow(row, `Device ${deviceId} v${row.version}`, (from, patch) => repo.updateDeviceVersion(trx, deviceId, row.version, from, patch));
      }
      for (const row of locked.fields) {
        await scheduleRow(row, `Field key ${row.field} v${row.version} of device ${deviceId}`, (from, patch) => repo.updateFieldVersion(trx, deviceId, row.field, row.version, from, patch));
      }
      await repo.setDestroyAfter(trx, deviceId, destroyAfter);

      const byField = groupByField(scheduled);
      await audit.record(trx, [
        event(who, {
          action: 'device.destroy_request',
          outcome: 'success',
          keyId: `device:${deviceId}`,
          details: {
            destroyAfter: destroyAfter.toISOString(),
            waitDays,
            versions: scheduled.filter((s) => s.field === undefined).map((s) => ({ version: s.version, previousState: s.previousState })),
            fieldKeys: [...byField.keys()],
          },
        }),
        ...[...byField].map(([field, list]) =>
          event(who, {
            action: 'field_key.destroy_request',
            outcome: 'success',
            keyId: `field:${fieldKeyId(deviceId, field)}`,
            details: { destroyAfter: destroyAfter.toISOString(), versions: list.map((s) => ({ version: s.version, previousState: s.previousState })) },
          }),
        ),
      ]);
      return { deviceId, destroyAfter: destroyAfter.toISOString(), waitDays, versions: scheduled };
    });
    // nothing of this device is deliverable any more: drop its unwrapped DEKs now
    material.cache.invalidate('device', deviceId);
    return schedule;
  }

  /** Cancel a scheduled destruction within its waiting period: every version back to the state it had. */
  async function restore(who: Actor, deviceId: string): Promise<DeviceView> {
    const found = await findDeviceOrThrow(deviceId);
    await db.transaction().execute(async (trx) => {
      const now = clock.now();
      const { device, versions, fields } = await lockAll(trx, found);
      if (device.destroy_after === null) throw new ConflictError(`Device ${deviceId} is not scheduled for destruction`, 'not_scheduled_for_destruction');
      if (device.destroy_after <= now) {
        throw new ConflictError(`The waiting period of device ${deviceId} ended at ${device.destroy_after.toISOString()}: its keys are destroyed and cannot be restored`, 'device_destroyed');
      }
      // a runner whose clock is ahead may already have erased part of it: never restore half a device
      if ([...versions, ...fields].some((v) => v.state === 'destroyed' && v.state_before_destroy !== null)) {
        throw new ConflictError(`Device ${deviceId} is already (partly) destroyed and cannot be restored`, 'device_destroyed');
      }
      const restored: Array<{ field?: string; version: number; state: VersionState }> = [];
      const restoreRows = async <T extends repo.LockedDeviceVersion>(
        rows: readonly T[],
        field: string | undefined,
        what: (row: T) => string,
        update: (row: T, patch: repo.DeviceVersionPatch) => Promise<void>,
      ) => {
        // a former primary is primary again unless the key has another one (it cannot, while scheduled; the check is cheap)
        let hasPrimary = rows.some((r) => r.state === 'primary');
        for (const row of rows) {
          if (row.state !== 'destroy_scheduled' || row.state_before_destroy === null) continue;
          let to = row.state_before_destroy;
          let until = row.state_until_before_destroy;
          if (to === 'primary' && hasPrimary) to = 'decrypt_only';
          if (to === 'grace' && until !== null && until <= now) {
            // its grace ended during the waiting period
            to = 'decrypt_only';
            until = null;
          }
          assertTransition(what(row), 'destroy_scheduled', to);
          await update(row, { state: to, state_changed_at: now, state_until: until, state_before_destroy: null, state_until_before_destroy: null });
          if (to === 'primary') hasPrimary = true;
          restored.push({ ...(field !== undefined ? { field } : {}), version: row.version, state: to });
        }
      };
      await restoreRows(versions, undefined, (r) => `Device ${deviceId} v${r.version}`, (r, patch) => repo.updateDeviceVersion(trx, deviceId, r.version, 'destroy_scheduled', patch));
      for (const [field, rows] of groupByField(fields)) {
        await restoreRows(rows, field, (r) => `Field key ${field} v${r.version} of device ${deviceId}`, (r, patch) => repo.updateFieldVersion(trx, deviceId, field, r.version, 'destroy_scheduled', patch));
      }
      await repo.setDestroyAfter(trx, deviceId, null);

      const byField = groupByField(restored);
      await audit.record(trx, [
        event(who, {
          action: 'device.restore',
          outcome: 'success',
          keyId: `device:${deviceId}`,
          details: {
            cancelledDestroyAfter: device.destroy_after.toISOString(),
            versions: restored.filter((r) => r.field === undefined).map((r) => ({ version: r.version, state: r.state })),
            fieldKeys: [...byField.keys()],
          },
        }),
        ...[...byField].map(([field, list]) =>
          event(who, {
            action: 'field_key.restore',
            outcome: 'success',
            keyId: `field:${fieldKeyId(deviceId, field)}`,
            details: { versions: list.map((r) => ({ version: r.version, state: r.state })) },
          }),
        ),
      ]);
    });
    return keys.getDevice(deviceId);
  }

  // ---------- disable / enable ----------

  /**
   * Revoke one version (not deliverable any more; reversible with `enableVersion`). Any
   * deliverable version may be disabled. The primary only if something takes its place:
   * the newest `grace` version is promoted back to primary (devices still hold it) and, for
   * a device DEK, the field keys are rewrapped under it; with no grace version, `force: true`
   * replaces it by a fresh primary (an immediate rotation), and without `force` it is a 409.
   */
  async function disableVersion(who: Actor, target: VersionTarget, options: { force?: boolean | undefined } = {}): Promise<DeviceView> {
    const device = await findDeviceOrThrow(target.deviceId);
    const level = target.field === undefined ? 'device' : 'field';
    const grace = (await policyFor(level, device.group_id)).gracePeriodMs;
    const force = options.force === true;
    // no prefetch: revoking a non-primary version needs no key (and must work while Vault is down)
    await withKeys(device.group_id, [], async (trx, ring) => {
      const now = clock.now();
      // the group primary is share-locked in case disabling a primary has to create a fresh one
      const locked = await lockAll(trx, device, { groupPrimary: target.field === undefined && force });
      assertNotBeingDestroyed(locked.device, now);
      if (target.field === undefined) return disableDeviceLocked(trx, ring, who, locked, target.version, { force, now, grace });
      return disableFieldLocked(trx, ring, who, locked, target.field, target.version, { force, now, grace });
    });
    if (target.field === undefined) material.cache.invalidate('device', target.deviceId, target.version);
    return keys.getDevice(target.deviceId);
  }

  async function disableDeviceLocked(trx: Trx, ring: KeyRing, who: Actor, locked: Locked, version: number, o: { force: boolean; now: Date; grace: number }): Promise<void> {
    const { device, versions } = locked;
    const what = `Device ${device.id} v${version}`;
    const row = versions.find((v) => v.version === version);
    if (!row) throw new NotFoundError(`${what} not found`);
    assertDisableable(what, row.state);
    if (row.state !== 'primary') {
      await repo.updateDeviceVersion(trx, device.id, version, row.state, { state: 'disabled', state_changed_at: o.now, state_until: null });
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'device', version, state: 'disabled' }); // issue 6
      await audit.record(trx, [disabledEvent(who, `device:${device.id}`, version, row.state, {})]);
      return;
    }
    const successor = successorOf(versions, o.now);
    if (successor) {
      assertTransition(what, 'primary', 'disabled');
      assertTransition(`Device ${device.id} v${successor.version}`, 'grace', 'primary');
      await repo.updateDeviceVersion(trx, device.id, version, 'primary', { state: 'disabled', state_changed_at: o.now, state_until: null });
      await repo.updateDeviceVersion(trx, device.id, successor.version, 'grace', { state: 'primary', state_changed_at: o.now, state_until: null });
      row.state = 'disabled';
      successor.state = 'primary';
      // nothing stays wrapped under the revoked version
      const fieldEvents = await rewrapFieldsUnder(trx, ring, who, locked, successor.version, ring.device(successor));
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'device', version: successor.version, state: 'primary' }); // issue 6: rollback to the previous key
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'device', version, state: 'disabled' }); // issue 6
      await audit.record(trx, [disabledEvent(who, `device:${device.id}`, version, 'primary', { promotedVersion: successor.version }), ...fieldEvents]);
      return;
    }
    if (!o.force) throw primaryRequired(what, `POST /v1/devices/${device.id}/rotate with {"compromised":true}`);
    const rotated = await rotateDeviceLocked(trx, ring, who, locked, { compromised: true, graceUntil: new Date(o.now.getTime() + o.grace), now: o.now, reason: 'disable_primary' });
    await audit.record(trx, [disabledEvent(who, `device:${device.id}`, version, 'primary', { force: true, replacedBy: rotated.version })]);
  }

  async function disableFieldLocked(trx: Trx, ring: KeyRing, who: Actor, locked: Locked, field: string, version: number, o: { force: boolean; now: Date; grace: number }): Promise<void> {
    const { device } = locked;
    const what = `Field key ${field} v${version} of device ${device.id}`;
    const rows = locked.fields.filter((f) => f.field === field);
    const row = rows.find((f) => f.version === version);
    if (!row) throw new NotFoundError(`${what} not found`);
    assertDisableable(what, row.state);
    const keyId = `field:${fieldKeyId(device.id, field)}`;
    if (row.state !== 'primary') {
      await repo.updateFieldVersion(trx, device.id, field, version, row.state, { state: 'disabled', state_changed_at: o.now, state_until: null });
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'field', field, version, state: 'disabled' }); // issue 6
      await audit.record(trx, [disabledEvent(who, keyId, version, row.state, {})]);
      return;
    }
    const successor = successorOf(rows, o.now);
    if (successor) {
      assertTransition(what, 'primary', 'disabled');
      assertTransition(`Field key ${field} v${successor.version} of device ${device.id}`, 'grace', 'primary');
      await repo.updateFieldVersion(trx, device.id, field, version, 'primary', { state: 'disabled', state_changed_at: o.now, state_until: null });
      await repo.updateFieldVersion(trx, device.id, field, successor.version, 'grace', { state: 'primary', state_changed_at: o.now, state_until: null });
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'field', field, version: successor.version, state: 'primary' }); // issue 6: rollback to the previous key
      await enqueueKeyUpdate(trx, { deviceId: device.id, kind: 'field', field, version, state: 'disabled' }); // issue 6
      await audit.record(trx, [disabledEvent(who, keyId, version, 'primary', { promotedVersion: successor.version })]);
      return;
    }
    if (!o.force) throw primaryRequired(what, `POST /v1/devices/${device.id}/fields/${field}/rotate with {"compromised":true}`);
    const rotated = await rotateFieldLocked(trx, ring, who, locked, field, { compromised: true, graceUntil: new Date(o.now.getTime() + o.grace), now: o.now, reason: 'disable_primary' });
    await audit.record(trx, [disabledEvent(who, keyId, version, 'primary', { force: true, replacedBy: rotated.version })]);
  }

  /** Reinstate a disabled version as `decrypt_only` (never as primary: a new primary comes only from a rotation). */
  async function enableVersion(who: Actor, target: VersionTarget): Promise<DeviceView> {
    const found = await findDeviceOrThrow(target.deviceId);
    await db.transaction().execute(async (trx) => {
      const now = clock.now();
      const { device, versions, fields } = await lockAll(trx, found);
      assertNotBeingDestroyed(device, now);
      const what = target.field === undefined ? `Device ${device.id} v${target.version}` : `Field key ${target.field} v${target.version} of device ${device.id}`;
      const row =
        target.field === undefined ? versions.find((v) => v.version === target.version) : fields.find((f) => f.field === target.field && f.version === target.version);
      if (!row) throw new NotFoundError(`${what} not found`);
      if (row.state !== 'disabled') throw new ConflictError(`${what} is ${row.state}: only a disabled version can be enabled`, 'illegal_state_transition');
      assertTransition(what, 'disabled', 'decrypt_only');
      const patch = { state: 'decrypt_only' as const, state_changed_at: now, state_until: null };
      if (target.field === undefined) await repo.updateDeviceVersion(trx, device.id, target.version, 'disabled', patch);
      else await repo.updateFieldVersion(trx, device.id, target.field, target.version, 'disabled', patch);
      await audit.record(trx, [
        event(who, {
          action: target.field === undefined ? 'device.version_enable' : 'field_key.version_enable',
          outcome: 'success',
          keyId: target.field === undefined ? `device:${device.id}` : `field:${fieldKeyId(device.id, target.field)}`,
          details: { version: target.version, previousState: 'disabled', state: 'decrypt_only' },
        }),
      ]);
    });
    return keys.getDevice(target.deviceId);
  }

  function disabledEvent(who: Actor, keyId: string, version: number, previousState: VersionState, extra: Record<string, unknown>): AuditEventInput {
    return event(who, {
      action: keyId.startsWith('device:') ? 'device.version_disable' : 'field_key.version_disable',
      outcome: 'success',
      keyId,
      details: { version, previousState, state: 'disabled', ...extra },
    });
  }

  return { rotateDevice, rotateField, scheduleDestruction, restore, disableVersion, enableVersion };
}

export type DeviceLifecycleService = ReturnType<typeof createDeviceLifecycleService>;

/** Disable applies to deliverable versions; a scheduled destruction is cancelled with restore, not disable. */
function assertDisableable(what: string, state: VersionState): void {
  if (state === 'destroy_scheduled') throw new ConflictError(`${what} is scheduled for destruction: cancel that with restore, not disable`, 'illegal_state_transition');
  assertTransition(what, state, 'disabled');
}

function primaryRequired(what: string, hint: string): ConflictError {
  return new ConflictError(
    `${what} is the primary and no grace version can take its place: pass {"force":true} to replace it by a fresh primary, or ${hint}`,
    'primary_required',
  );
}

function assertGracePeriod(ms: number): void {
  if (!Number.isFinite(ms) || ms < 0 || ms > 3650 * DAY_MS) throw new BadRequestError('The grace period must be between 0 and 3650 days', { field: 'gracePeriodMs' });
}

function groupByField<T extends { field?: string | undefined }>(rows: readonly T[]): Map<string, T[]> {
  const map = new Map<string, T[]>();
  for (const row of rows) {
    if (row.field === undefined) continue;
    const list = map.get(row.field);
    if (list) list.push(row);
    else map.set(row.field, [row]);
  }
  return map;
}
