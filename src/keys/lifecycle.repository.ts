/**
 * SQL of version state changes: row locks for the device-level operations (rotate, shred,
 * restore, disable/enable), guarded updates, and the due-work queries of the sweeps.
 *
 * Lock order, everywhere: the group's primary version (share) → the `devices` row → its
 * `device_versions` rows → its `field_versions` rows → (last, at commit) the audit chain head.
 * The sweeps lock version rows only, with SKIP LOCKED, so they never wait on a device operation.
 */
import { sql, type ExpressionBuilder, type Insertable, type RawBuilder, type Selectable, type SqlBool, type Updateable } from 'kysely';
import type { DB, Executor } from '../db/database.js';
import { successorAcknowledgedAt, successorSent, successorUnacknowledged, type SentRows } from '../distribution/index.js';
import type { DeviceVersionsTable, FieldVersionsTable, VersionState } from '../db/tables.js';
import type { GroupVersionRow } from './key.repository.js';

export type LockedDeviceVersion = Selectable<DeviceVersionsTable>;
export type LockedFieldVersion = Selectable<FieldVersionsTable>;
export type DeviceVersionPatch = Updateable<DeviceVersionsTable>;
export type FieldVersionPatch = Updateable<FieldVersionsTable>;

export interface LockedDevice {
  id: string;
  group_id: string;
  destroy_after: Date | null;
}

const DEVICE_VERSION_COLUMNS = [
  'device_id',
  'version',
  'state',
  'wrapped_key',
  'parent_version',
  'created_at',
  'state_changed_at',
  'state_until',
  'state_before_destroy',
  'state_until_before_destroy',
] as const;
const FIELD_VERSION_COLUMNS = ['field', ...DEVICE_VERSION_COLUMNS] as const;

// ---------- locks (device operations) ----------

/** The serialization point of every operation on one device. */
export async function lockDevice(ex: Executor, deviceId: string): Promise<LockedDevice | undefined> {
  return ex.selectFrom('devices').select(['id', 'group_id', 'destroy_after']).where('id', '=', deviceId).forUpdate().executeTakeFirst();
}

export async function lockDeviceVersions(ex: Executor, deviceId: string): Promise<LockedDeviceVersion[]> {
  return ex.selectFrom('device_versions').select(DEVICE_VERSION_COLUMNS).where('device_id', '=', deviceId).orderBy('version').forUpdate().execute();
}

export async function lockFieldVersions(ex: Executor, deviceId: string): Promise<LockedFieldVersion[]> {
  return ex
    .selectFrom('field_versions')
    .select(FIELD_VERSION_COLUMNS)
    .where('device_id', '=', deviceId)
    .orderBy('field')
    .orderBy('version')
    .forUpdate()
    .execute();
}

/** The group's primary version, share-locked so a group rotation cannot retire it under a new wrap. */
export async function lockGroupPrimaryForShare(ex: Executor, groupId: string): Promise<Pick<GroupVersionRow, 'version'> | undefined> {
  return ex.selectFrom('group_versions').select('version').where('group_id', '=', groupId).where('state', '=', 'primary').forShare().executeTakeFirst();
}

export async function listGroupVersionMaterial(ex: Executor, groupId: string, versions: readonly number[]): Promise<Array<Pick<GroupVersionRow, 'version' | 'wrapped_key'>>> {
  if (versions.length === 0) return [];
  return ex.selectFrom('group_versions').select(['version', 'wrapped_key']).where('group_id', '=', groupId).where('version', 'in', versions).execute();
}

// ---------- writes ----------

export async function setDestroyAfter(ex: Executor, deviceId: string, destroyAfter: Date | null): Promise<void> {
  await ex.updateTable('devices').set({ destroy_after: destroyAfter }).where('id', '=', deviceId).execute();
}

export async function insertDeviceVersion(ex: Executor, row: Insertable<DeviceVersionsTable>): Promise<void> {
  await ex.insertInto('device_versions').values(row).execute();
}

export async function insertFieldVersion(ex: Executor, row: Insertable<FieldVersionsTable>): Promise<void> {
  await ex.insertInto('field_versions').values(row).execute();
}

/** Update one device version if it is still in `from` (the caller holds its lock; the guard makes a lost race loud). */
export async function updateDeviceVersion(ex: Executor, deviceId: string, version: number, from: VersionState, patch: DeviceVersionPatch): Promise<void> {
  const result = await ex
    .updateTable('device_versions')
    .set(patch)
    .where('device_id', '=', deviceId)
    .where('version', '=', version)
    .where('state', '=', from)
    .executeTakeFirst();
  if (Number(result.numUpdatedRows) !== 1) throw new Error(`device ${deviceId} v${version} was not in state ${from}`);
}

export async function updateFieldVersion(ex: Executor, deviceId: string, field: string, version: number, from: VersionState, patch: FieldVersionPatch): Promise<void> {
  const result = await ex
    .updateTable('field_versions')
    .set(patch)
    .where('device_id', '=', deviceId)
    .where('field', '=', field)
    .where('version', '=', version)
    .where('state', '=', from)
    .executeTakeFirst();
  if (Number(result.numUpdatedRows) !== 1) throw new Error(`field ${deviceId}/${field} v${version} was not in state ${from}`);
}

/** Move one field key version's wrap to another device version (its own material is unchanged). */
export async function rewrapFieldVersion(ex: Executor, row: { device_id: string; field: string; version: number; parent_version: number }, wrapped: Buffer, newParent: number): Promise<void> {
  const result = await ex
    .updateTable('field_versions')
    .set({ wrapped_key: wrapped, parent_version: newParent })
    .where('device_id', '=', row.device_id)
    .where('field', '=', row.field)
    .where('version', '=', row.version)
    .where('parent_version', '=', row.parent_version)
    .executeTakeFirst();
  if (Number(result.numUpdatedRows) !== 1) throw new Error(`field ${row.device_id}/${row.field} v${row.version} moved concurrently`);
}

// ---------- sweeps ----------

export interface DueVersion {
  device_id: string;
  field: string | null;
  version: number;
  state: VersionState;
  state_until: Date;
  state_before_destroy: VersionState | null;
  /**
   * grace sweep: when the version's use for encryption really ended, which its decrypt_only
   * state dates from: its grace end, or later when it was held for an acknowledgement (the
   * first acknowledgement of a newer version, or the end of the longest hold)
   */
  changed_at: Date;
}

/**
 * The grace sweep's hold for acknowledgements (issue 6): a version whose grace has ended stays
 * in grace while the effective policy of its device's group says `graceRequiresAck` (group
 * override → stored default → built-in), a newer version of the key was sent to the device
 * (`sent`, see successorUnacknowledged) and the device has acknowledged none, and the hold has
 * lasted less than `graceAckMaxHoldDays` after the grace end.
 */
export interface AckHold {
  /** `queued` while the MQTT publisher is on; `published` when it is off (nothing is being sent) */
  sent: SentRows;
  /** the built-in policy of each level, for when no policy row is stored */
  builtIn: Record<'device' | 'field', { graceRequiresAck: boolean | null; graceAckMaxHoldDays: number | null }>;
}

export interface DueQuery {
  state: 'grace' | 'destroy_scheduled';
  now: Date;
  limit: number;
  /** FOR UPDATE SKIP LOCKED (a real run); false for a dry run, which locks nothing */
  lock: boolean;
  /** grace only: skip versions held for an acknowledgement; undefined: nothing is held */
  ackHold?: AckHold | undefined;
}

type Level = 'device' | 'field';
interface VersionRefs {
  deviceId: string;
  version: string;
  stateUntil: string;
  field?: string;
}

const FIELD_REFS: VersionRefs = { deviceId: 'fv.device_id', version: 'fv.version', stateUntil: 'fv.state_until', field: 'fv.field' };
const DEVICE_REFS: VersionRefs = { deviceId: 'd.device_id', version: 'd.version', stateUntil: 'd.state_until' };

/**
 * When the hold of this version ends under its group's effective policy (grace end + the longest
 * hold), or null when the policy does not wait for acknowledgements. One scalar subquery per
 * row (device and group policy by primary key), so the sweep stays one statement per chunk; a
 * subquery in WHERE locks nothing, FOR UPDATE still takes the version rows only.
 */
function holdEnd(level: Level, refs: VersionRefs, hold: AckHold): RawBuilder<Date | null> {
  const l = sql.lit(level);
  const builtIn = hold.builtIn[level];
  const requires = sql`coalesce((hgp.overrides -> ${l} ->> 'graceRequiresAck')::boolean, hrp.grace_requires_ack, ${sql.lit(builtIn.graceRequiresAck ?? false)})`;
  const days = sql`coalesce((hgp.overrides -> ${l} ->> 'graceAckMaxHoldDays')::integer, hrp.grace_ack_max_hold_days, ${sql.lit(builtIn.graceAckMaxHoldDays ?? 0)})`;
  return sql<Date | null>`(select case when ${requires} then ${sql.ref(refs.stateUntil)} + ${days} * interval '1 day' end
      from devices hd
      left join group_policies hgp on hgp.group_id = hd.group_id
      left join rotation_policies hrp on hrp.level = ${l}
     where hd.id = ${sql.ref(refs.deviceId)})`;
}

const successor = (level: Level, refs: VersionRefs) =>
  level === 'device' ? { kind: level, deviceId: refs.deviceId, version: refs.version } : { kind: level, deviceId: refs.deviceId, version: refs.version, field: refs.field as string };

/** TRUE while this due grace version is held for an acknowledgement. */
function heldForAck(level: Level, refs: VersionRefs, hold: AckHold, now: Date): RawBuilder<SqlBool> {
  return sql<SqlBool>`(coalesce(${holdEnd(level, refs, hold)} > ${now}, false) and ${successorUnacknowledged(successor(level, refs), { sent: hold.sent })})`;
}

/** What the decrypt_only state dates from (DueVersion.changed_at). */
function changedAt(level: Level, refs: VersionRefs, hold: AckHold | undefined): RawBuilder<Date> {
  const until = sql.ref(refs.stateUntil);
  if (hold === undefined) return sql<Date>`${until}`;
  const end = holdEnd(level, refs, hold);
  return sql<Date>`case when ${end} is not null and ${successorSent(successor(level, refs), { sent: hold.sent })}
    then greatest(${until}, least(${end}, ${successorAcknowledgedAt(successor(level, refs))})) else ${until} end`;
}

export async function findDueFieldVersions(ex: Executor, q: DueQuery): Promise<DueVersion[]> {
  const hold = q.state === 'grace' ? q.ackHold : undefined;
  let query = ex
    .selectFrom('field_versions as fv')
    .select(['fv.device_id', 'fv.field', 'fv.version', 'fv.state', 'fv.state_until', 'fv.state_before_destroy', changedAt('field', FIELD_REFS, hold).as('changed_at')])
    .where('fv.state', '=', q.state)
    .where('fv.state_until', '<=', q.now)
    .orderBy('fv.state_until')
    .orderBy('fv.device_id')
    .orderBy('fv.field')
    .orderBy('fv.version')
    .limit(q.limit);
  if (hold) query = query.where((eb) => eb.not(heldForAck('field', FIELD_REFS, hold, q.now)));
  if (q.lock) query = query.forUpdate().skipLocked();
  return (await query.execute()) as DueVersion[];
}

/** Due grace versions of one level held for an acknowledgement right now (the sweep reports them). */
export async function countHeldForAck(ex: Executor, level: Level, now: Date, hold: AckHold): Promise<number> {
  const query =
    level === 'device'
      ? ex.selectFrom('device_versions as d').select((eb) => eb.fn.countAll<number>().as('n')).where('d.state', '=', 'grace').where('d.state_until', '<=', now).where(heldForAck('device', DEVICE_REFS, hold, now))
      : ex.selectFrom('field_versions as fv').select((eb) => eb.fn.countAll<number>().as('n')).where('fv.state', '=', 'grace').where('fv.state_until', '<=', now).where(heldForAck('field', FIELD_REFS, hold, now));
  return Number((await query.executeTakeFirstOrThrow()).n);
}

/**
 * Due device versions. For destruction, a device version that still has field key versions
 * wrapped under it that are neither destroyed nor due themselves is left alone: erasing it
 * would make them unreadable. (Due ones are erased in the same run, field level first.)
 */
export async function findDueDeviceVersions(ex: Executor, q: DueQuery): Promise<DueVersion[]> {
  const hold = q.state === 'grace' ? q.ackHold : undefined;
  let query = ex
    .selectFrom('device_versions as d')
    .select(['d.device_id', sql<null>`null`.as('field'), 'd.version', 'd.state', 'd.state_until', 'd.state_before_destroy', changedAt('device', DEVICE_REFS, hold).as('changed_at')])
    .where('d.state', '=', q.state)
    .where('d.state_until', '<=', q.now)
    .orderBy('d.state_until')
    .orderBy('d.device_id')
    .orderBy('d.version')
    .limit(q.limit);
  if (q.state === 'destroy_scheduled') query = query.where((eb) => eb.not(eb.exists(liveChildren(eb, q.now))));
  if (hold) query = query.where((eb) => eb.not(heldForAck('device', DEVICE_REFS, hold, q.now)));
  if (q.lock) query = query.forUpdate().skipLocked();
  return (await query.execute()) as DueVersion[];
}

/** Due device destructions held back by live field key versions wrapped under them. */
export async function countBlockedDeviceDestructions(ex: Executor, now: Date): Promise<number> {
  const row = await ex
    .selectFrom('device_versions as d')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('d.state', '=', 'destroy_scheduled')
    .where('d.state_until', '<=', now)
    .where((eb) => eb.exists(liveChildren(eb, now)))
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

function liveChildren(eb: ExpressionBuilder<DB & { d: DeviceVersionsTable }, 'd'>, now: Date) {
  return eb
    .selectFrom('field_versions as f')
    .select(sql<number>`1`.as('one'))
    .whereRef('f.device_id', '=', 'd.device_id')
    .whereRef('f.parent_version', '=', 'd.version')
    .where('f.state', '<>', 'destroyed')
    .where((eb) => eb.or([eb('f.state', '<>', 'destroy_scheduled'), eb('f.state_until', 'is', null), eb('f.state_until', '>', now)]));
}

/** Erase one version's material (the row and its history stay). */
export async function destroyDeviceVersion(ex: Executor, deviceId: string, version: number, now: Date): Promise<void> {
  await updateDeviceVersion(ex, deviceId, version, 'destroy_scheduled', { state: 'destroyed', wrapped_key: null, state_changed_at: now, state_until: null });
}

export async function destroyFieldVersion(ex: Executor, deviceId: string, field: string, version: number, now: Date): Promise<void> {
  await updateFieldVersion(ex, deviceId, field, version, 'destroy_scheduled', { state: 'destroyed', wrapped_key: null, state_changed_at: now, state_until: null });
}

// ---------- retention ----------

/**
 * The effective retention of each group, as parallel arrays (sent as three array parameters and
 * joined with `unnest`, so one query covers a whole page of groups whatever their overrides).
 * A null cutoff: that level of the group keeps its old versions for ever.
 */
export interface RetentionCutoffs {
  groupIds: string[];
  /** a `decrypt_only` version whose state changed at or before this is past retention */
  deviceCutoff: Array<Date | null>;
  /** when a device version scheduled now may be erased (now + the waiting period) */
  deviceDestroyAfter: Date[];
  fieldCutoff: Array<Date | null>;
  fieldDestroyAfter: Date[];
}

export interface RetentionQuery {
  groups: RetentionCutoffs;
  limit: number;
  /** FOR UPDATE SKIP LOCKED on the version rows (a real run); false for a dry run */
  lock: boolean;
  /**
   * Dry run only: field key versions that this run's field pass (which goes first) would
   * schedule before the device version's own erasure do not count as live children.
   */
  anticipateFields: boolean;
}

export interface RetentionDueVersion {
  device_id: string;
  field: string | null;
  version: number;
  state: VersionState;
  state_changed_at: Date;
  cutoff: Date;
  destroy_after: Date;
}

function retentionGroups(c: RetentionCutoffs) {
  const iso = (d: Date | null) => (d === null ? null : d.toISOString());
  return sql`unnest(${c.groupIds}::text[], ${c.deviceCutoff.map(iso)}::timestamptz[], ${c.deviceDestroyAfter.map(iso)}::timestamptz[], ${c.fieldCutoff.map(iso)}::timestamptz[], ${c.fieldDestroyAfter.map(iso)}::timestamptz[]) as p(group_id, device_cutoff, device_destroy_after, field_cutoff, field_destroy_after)`;
}

/**
 * Field key versions wrapped under device version `dv` that would still be live when `dv`,
 * scheduled now, becomes due: anything not destroyed, except versions already scheduled to be
 * erased no later than it (the same rule `destroyDue` applies at erasure time).
 */
function liveChildrenAtErasure(anticipateFields: boolean) {
  const anticipated = anticipateFields
    ? sql`and not (f.state = 'decrypt_only' and f.state_changed_at <= p.field_cutoff and p.field_destroy_after <= p.device_destroy_after)`
    : sql``;
  return sql`exists (
    select 1 from field_versions f
    where f.device_id = dv.device_id and f.parent_version = dv.version and f.state <> 'destroyed'
      and not (f.state = 'destroy_scheduled' and f.state_until is not null and f.state_until <= p.device_destroy_after)
      ${anticipated})`;
}

/** `decrypt_only` field key versions past their group's field retention, oldest first. */
export async function findRetentionDueFieldVersions(ex: Executor, q: RetentionQuery): Promise<RetentionDueVersion[]> {
  if (q.groups.groupIds.length === 0) return [];
  const { rows } = await sql<RetentionDueVersion>`
    select f.device_id, f.field, f.version, f.state, f.state_changed_at, p.field_cutoff as cutoff, p.field_destroy_after as destroy_after
    from field_versions f
    join devices d on d.id = f.device_id
    join ${retentionGroups(q.groups)} on p.group_id = d.group_id
    where f.state = 'decrypt_only' and f.state_changed_at <= p.field_cutoff
    order by f.state_changed_at, f.device_id, f.field, f.version
    limit ${q.limit}
    ${q.lock ? sql`for update of f skip locked` : sql``}`.execute(ex);
  return rows;
}

/** `decrypt_only` device versions past their group's device retention with no live field key version wrapped under them. */
export async function findRetentionDueDeviceVersions(ex: Executor, q: RetentionQuery): Promise<RetentionDueVersion[]> {
  if (q.groups.groupIds.length === 0) return [];
  const { rows } = await sql<RetentionDueVersion>`
    select dv.device_id, null::text as field, dv.version, dv.state, dv.state_changed_at, p.device_cutoff as cutoff, p.device_destroy_after as destroy_after
    from device_versions dv
    join devices d on d.id = dv.device_id
    join ${retentionGroups(q.groups)} on p.group_id = d.group_id
    where dv.state = 'decrypt_only' and dv.state_changed_at <= p.device_cutoff
      and not ${liveChildrenAtErasure(q.anticipateFields)}
    order by dv.state_changed_at, dv.device_id, dv.version
    limit ${q.limit}
    ${q.lock ? sql`for update of dv skip locked` : sql``}`.execute(ex);
  return rows;
}

/** Device versions past retention left alone because live field key versions are wrapped under them. */
export async function countRetentionBlockedDeviceVersions(ex: Executor, groups: RetentionCutoffs, anticipateFields: boolean): Promise<number> {
  if (groups.groupIds.length === 0) return 0;
  const { rows } = await sql<{ n: string | number }>`
    select count(*) as n
    from device_versions dv
    join devices d on d.id = dv.device_id
    join ${retentionGroups(groups)} on p.group_id = d.group_id
    where dv.state = 'decrypt_only' and dv.state_changed_at <= p.device_cutoff
      and ${liveChildrenAtErasure(anticipateFields)}`.execute(ex);
  return Number(rows[0]?.n ?? 0);
}

/**
 * Schedule locked `decrypt_only` versions for destruction, one statement per chunk. Retention,
 * not a crypto-shred: `state_before_destroy` stays null, so a device restore leaves them scheduled.
 * Returns how many rows changed (the caller holds their locks: anything else is a lost race).
 */
export async function scheduleRetentionDeviceVersions(ex: Executor, rows: ReadonlyArray<{ device_id: string; version: number; destroy_after: Date }>, now: Date): Promise<number> {
  if (rows.length === 0) return 0;
  const result = await sql`
    update device_versions dv
    set state = 'destroy_scheduled', state_changed_at = ${now.toISOString()}::timestamptz, state_until = r.destroy_after,
        state_before_destroy = null, state_until_before_destroy = null
    from unnest(${rows.map((r) => r.device_id)}::text[], ${rows.map((r) => r.version)}::int[], ${rows.map((r) => r.destroy_after.toISOString())}::timestamptz[]) as r(device_id, version, destroy_after)
    where dv.device_id = r.device_id and dv.version = r.version and dv.state = 'decrypt_only'`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

export async function scheduleRetentionFieldVersions(
  ex: Executor,
  rows: ReadonlyArray<{ device_id: string; field: string; version: number; destroy_after: Date }>,
  now: Date,
): Promise<number> {
  if (rows.length === 0) return 0;
  const result = await sql`
    update field_versions f
    set state = 'destroy_scheduled', state_changed_at = ${now.toISOString()}::timestamptz, state_until = r.destroy_after,
        state_before_destroy = null, state_until_before_destroy = null
    from unnest(${rows.map((r) => r.device_id)}::text[], ${rows.map((r) => r.field)}::text[], ${rows.map((r) => r.version)}::int[], ${rows.map((r) => r.destroy_after.toISOString())}::timestamptz[]) as r(device_id, field, version, destroy_after)
    where f.device_id = r.device_id and f.field = r.field and f.version = r.version and f.state = 'decrypt_only'`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

/** One page of group ids (the retention sweep resolves each page's policies at once). */
export async function listGroupIdPage(ex: Executor, after: string | undefined, limit: number): Promise<string[]> {
  let query = ex.selectFrom('key_groups').select('id').orderBy('id').limit(limit);
  if (after !== undefined) query = query.where('id', '>', after);
  return (await query.execute()).map((r) => r.id);
}
