/**
 * SQL of key distribution: the outbox (enqueue, lease-based claims, completion), the devices'
 * acknowledgements, and the read models other modules use (rotation debt, rollout progress,
 * the grace sweep's hold-back predicate). Every function takes an executor: services decide
 * the transactions. Lease and retry times are the database's clock (`now()`), shared by every
 * replica, so replicas with skewed clocks never steal each other's leases.
 */
import { sql, type Expression, type RawBuilder, type SqlBool } from 'kysely';
import type { VersionState } from '../db/tables.js';
import type { DistributionExecutor, KeyKind, OutboxStatus } from './distribution.tables.js';

// ---------- enqueue (inside the caller's transaction) ----------

// large chunks are split so one statement stays well under PostgreSQL's 65,535 parameters
const CHUNK = 2000;

function chunks<T>(items: readonly T[]): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += CHUNK) out.push(items.slice(i, i + CHUNK));
  return out;
}

/**
 * Lock the device rows (in id order) against other enqueuers until commit, so each device's
 * outbox ids follow commit order. FOR NO KEY UPDATE: it does not conflict with the KEY SHARE a
 * foreign-key check takes (a field key insert), so two such transactions cannot deadlock on it;
 * a caller already holding FOR UPDATE (the lifecycle service, a rollout chunk) passes straight
 * through. Returns the ids found.
 */
export async function lockDevices(ex: DistributionExecutor, deviceIds: readonly string[]): Promise<string[]> {
  const found: string[] = [];
  for (const part of chunks([...deviceIds].sort())) {
    const rows = await ex.selectFrom('devices').select('id').where('id', 'in', part).orderBy('id').forNoKeyUpdate().execute();
    for (const row of rows) found.push(row.id);
  }
  return found;
}

export interface VersionMaterialState {
  device_id: string;
  field: string;
  version: number;
  state: VersionState;
  has_material: boolean;
}

/** The device DEK versions of these devices, newest first per device. */
export async function listDeviceVersionStatesOf(ex: DistributionExecutor, deviceIds: readonly string[]): Promise<VersionMaterialState[]> {
  const out: VersionMaterialState[] = [];
  for (const part of chunks(deviceIds)) {
    const rows = await ex
      .selectFrom('device_versions')
      .select(['device_id', sql<string>`''`.as('field'), 'version', 'state', sql<boolean>`wrapped_key is not null`.as('has_material')])
      .where('device_id', 'in', part)
      .orderBy('device_id')
      .orderBy('version', 'desc')
      .execute();
    out.push(...rows);
  }
  return out;
}

export async function listFieldVersionStatesOf(ex: DistributionExecutor, deviceIds: readonly string[], fields: readonly string[]): Promise<VersionMaterialState[]> {
  if (deviceIds.length === 0 || fields.length === 0) return [];
  const out: VersionMaterialState[] = [];
  for (const part of chunks(deviceIds)) {
    const rows = await ex
      .selectFrom('field_versions')
      .select(['device_id', 'field', 'version', 'state', sql<boolean>`wrapped_key is not null`.as('has_material')])
      .where('device_id', 'in', part)
      .where('field', 'in', fields)
      .execute();
    out.push(...rows);
  }
  return out;
}

/** Keys already queued (or sent) to these devices in an earlier message, among these versions. */
export async function listQueuedKeys(
  ex: DistributionExecutor,
  deviceIds: readonly string[],
  versions: readonly number[],
): Promise<Array<{ device_id: string; kind: KeyKind; field: string; version: number }>> {
  const out: Array<{ device_id: string; kind: KeyKind; field: string; version: number }> = [];
  for (const part of chunks(deviceIds)) {
    const rows = await ex
      .selectFrom('key_outbox')
      .select(['device_id', 'kind', 'field', 'version'])
      .distinct()
      .where('device_id', 'in', part)
      .where('version', 'in', versions)
      .where('with_key', '=', true)
      .where('status', '<>', 'dropped')
      .execute();
    out.push(...rows);
  }
  return out;
}

export interface NewOutboxRow {
  device_id: string;
  kind: KeyKind;
  field: string;
  version: number;
  state: VersionState;
  not_before: Date | null;
  wrapped_by: number;
  with_key: boolean;
}

/** Insert rows in the given order (ids ascend in that order); returns their ids, in order. */
export async function insertOutboxRows(ex: DistributionExecutor, rows: readonly NewOutboxRow[]): Promise<number[]> {
  const ids: number[] = [];
  for (const part of chunks(rows)) {
    const inserted = await ex.insertInto('key_outbox').values(part).returning('id').execute();
    // a multi-row INSERT takes its serial values in VALUES order; sorting makes that explicit
    ids.push(...inserted.map((r) => Number(r.id)).sort((a, b) => a - b));
  }
  return ids;
}

// ---------- publishers ----------

export interface ClaimedRow {
  id: number;
  device_id: string;
  kind: KeyKind;
  field: string;
  version: number;
  state: VersionState;
  not_before: Date | null;
  wrapped_by: number;
  with_key: boolean;
  attempts: number;
  created_at: Date;
}

/**
 * Lease up to `limit` due rows, each the OLDEST pending row of its device (so a device's N+1
 * is never taken while its N is pending, in flight or waiting for a retry), skipping rows
 * another publisher is locking right now and rows under a live lease.
 */
export async function claimDue(ex: DistributionExecutor, owner: string, leaseSeconds: number, limit: number): Promise<ClaimedRow[]> {
  const result = await sql<ClaimedRow>`
    update key_outbox
       set lease_owner = ${owner}, lease_until = now() + ${leaseSeconds} * interval '1 second'
     where id in (
       select o.id from key_outbox o
        where o.status = 'pending'
          and o.next_attempt_at <= now()
          and (o.lease_until is null or o.lease_until < now())
          and not exists (select 1 from key_outbox p where p.device_id = o.device_id and p.status = 'pending' and p.id < o.id)
        order by o.id
        limit ${limit}
          for update skip locked)
       and status = 'pending'
    returning id, device_id, kind, field, version, state, not_before, wrapped_by, with_key, attempts, created_at`.execute(ex);
  return result.rows.map((r) => ({ ...r, id: Number(r.id) })).sort((a, b) => a.id - b.id);
}

/** Extend the leases of rows still in flight; returns the ids still held. */
export async function renewLeases(ex: DistributionExecutor, owner: string, ids: readonly number[], leaseSeconds: number): Promise<number[]> {
  if (ids.length === 0) return [];
  const rows = await ex
    .updateTable('key_outbox')
    .set({ lease_until: sql<Date>`now() + ${leaseSeconds} * interval '1 second'` })
    .where('id', 'in', ids)
    .where('lease_owner', '=', owner)
    .where('status', '=', 'pending')
    .returning('id')
    .execute();
  return rows.map((r) => Number(r.id));
}

/** The broker completed the QoS 2 exchange (PUBCOMP). False: the lease had been lost. */
export async function markPublished(ex: DistributionExecutor, id: number, owner: string): Promise<boolean> {
  const result = await ex
    .updateTable('key_outbox')
    .set({ status: 'published', published_at: sql<Date>`now()`, attempts: sql<number>`attempts + 1`, lease_owner: null, lease_until: null, last_error: null })
    .where('id', '=', id)
    .where('lease_owner', '=', owner)
    .where('status', '=', 'pending')
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/** A failed attempt: release the lease, retry after `delayMs`. `error` is a short code, never a secret. */
export async function releaseForRetry(ex: DistributionExecutor, id: number, owner: string, delayMs: number, error: string): Promise<boolean> {
  const result = await ex
    .updateTable('key_outbox')
    .set({
      attempts: sql<number>`attempts + 1`,
      next_attempt_at: sql<Date>`now() + ${Math.max(0, Math.round(delayMs))} * interval '1 millisecond'`,
      lease_owner: null,
      lease_until: null,
      last_error: error.slice(0, 200),
    })
    .where('id', '=', id)
    .where('lease_owner', '=', owner)
    .where('status', '=', 'pending')
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/** Give up on a row that can never be built (its key or every transport key is gone); the device's next row follows. */
export async function markDropped(ex: DistributionExecutor, id: number, owner: string, error: string): Promise<boolean> {
  const result = await ex
    .updateTable('key_outbox')
    .set({ status: 'dropped', attempts: sql<number>`attempts + 1`, lease_owner: null, lease_until: null, last_error: error.slice(0, 200) })
    .where('id', '=', id)
    .where('lease_owner', '=', owner)
    .where('status', '=', 'pending')
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

export async function outboxDepth(ex: DistributionExecutor): Promise<{ pending: number; oldestSeconds: number }> {
  const row = await ex
    .selectFrom('key_outbox')
    .select([
      (eb) => eb.fn.countAll<number>().as('n'),
      sql<number | null>`extract(epoch from (now() - min(created_at)))`.as('oldest'),
    ])
    .where('status', '=', 'pending')
    .executeTakeFirstOrThrow();
  return { pending: Number(row.n), oldestSeconds: row.oldest === null ? 0 : Math.max(0, Number(row.oldest)) };
}

// ---------- material for building a message (read outside any transaction) ----------

export interface MaterialRow {
  version: number;
  state: VersionState;
  wrapped_key: Buffer | null;
  parent_version: number;
}

export async function findDeviceGroup(ex: DistributionExecutor, deviceId: string): Promise<string | undefined> {
  return (await ex.selectFrom('devices').select('group_id').where('id', '=', deviceId).executeTakeFirst())?.group_id;
}

export async function findDeviceVersionMaterial(ex: DistributionExecutor, deviceId: string, version: number): Promise<MaterialRow | undefined> {
  return ex
    .selectFrom('device_versions')
    .select(['version', 'state', 'wrapped_key', 'parent_version'])
    .where('device_id', '=', deviceId)
    .where('version', '=', version)
    .executeTakeFirst();
}

export async function findFieldVersionMaterial(ex: DistributionExecutor, deviceId: string, field: string, version: number): Promise<MaterialRow | undefined> {
  return ex
    .selectFrom('field_versions')
    .select(['version', 'state', 'wrapped_key', 'parent_version'])
    .where('device_id', '=', deviceId)
    .where('field', '=', field)
    .where('version', '=', version)
    .executeTakeFirst();
}

export async function findGroupVersionBlob(ex: DistributionExecutor, groupId: string, version: number): Promise<string | null | undefined> {
  const row = await ex.selectFrom('group_versions').select('wrapped_key').where('group_id', '=', groupId).where('version', '=', version).executeTakeFirst();
  return row === undefined ? undefined : row.wrapped_key;
}

/** The newest device DEK version the device has acknowledged that still has material (fallback transport key). */
export async function newestAcknowledgedDeviceVersion(ex: DistributionExecutor, deviceId: string, excluding: number): Promise<number | undefined> {
  const row = await ex
    .selectFrom('key_acks as a')
    .innerJoin('device_versions as v', (j) => j.onRef('v.device_id', '=', 'a.device_id').onRef('v.version', '=', 'a.version'))
    .select('a.version')
    .where('a.device_id', '=', deviceId)
    .where('a.kind', '=', 'device')
    .where('a.version', '<>', excluding)
    .where('v.wrapped_key', 'is not', null)
    .where('v.state', 'not in', ['destroy_scheduled', 'destroyed'])
    .orderBy('a.version', 'desc')
    .limit(1)
    .executeTakeFirst();
  return row?.version;
}

// ---------- acknowledgements ----------

/** Record that a device holds a version; false when it was already recorded. */
export async function insertAck(ex: DistributionExecutor, ack: { device_id: string; kind: KeyKind; field: string; version: number; acknowledged_at: Date }): Promise<boolean> {
  const rows = await ex.insertInto('key_acks').values(ack).onConflict((oc) => oc.doNothing()).returning('version').execute();
  return rows.length === 1;
}

export interface AckRow {
  kind: KeyKind;
  field: string;
  version: number;
  acknowledged_at: Date;
}

export async function listAcks(ex: DistributionExecutor, deviceId: string): Promise<AckRow[]> {
  return ex
    .selectFrom('key_acks')
    .select(['kind', 'field', 'version', 'acknowledged_at'])
    .where('device_id', '=', deviceId)
    .orderBy('kind')
    .orderBy('field')
    .orderBy('version')
    .execute();
}

export interface OutboxRowView {
  id: number;
  kind: KeyKind;
  field: string;
  version: number;
  state: VersionState;
  not_before: Date | null;
  wrapped_by: number;
  with_key: boolean;
  status: OutboxStatus;
  attempts: number;
  next_attempt_at: Date;
  last_error: string | null;
  created_at: Date;
  published_at: Date | null;
}

/** A device's newest outbox rows, newest first. */
export async function listOutbox(ex: DistributionExecutor, deviceId: string, limit: number): Promise<OutboxRowView[]> {
  const rows = await ex
    .selectFrom('key_outbox')
    .select(['id', 'kind', 'field', 'version', 'state', 'not_before', 'wrapped_by', 'with_key', 'status', 'attempts', 'next_attempt_at', 'last_error', 'created_at', 'published_at'])
    .where('device_id', '=', deviceId)
    .orderBy('id', 'desc')
    .limit(limit)
    .execute();
  return rows.map((r) => ({ ...r, id: Number(r.id) }));
}

// ---------- read models for rotation debt, rollout progress and the grace sweep ----------

export interface AwaitingAck {
  deviceId: string;
  kind: KeyKind;
  /** undefined for a device DEK */
  field?: string;
  version: number;
  /** the version's current state (pending or primary) */
  state: VersionState;
  /** when the outbox row carrying its key was written */
  enqueuedAt: Date;
  /** when the broker accepted it; null while it waits in the outbox */
  publishedAt: Date | null;
}

/**
 * Current key versions (`pending` or `primary`) whose key was sent to the device (an outbox
 * row carrying it) but that the device has not acknowledged, nor any newer version of the same
 * key: what rotation debt and rollout progress show as "not yet on the device". Versions never
 * sent over MQTT (enrolment keys, versions older than distribution) are not listed.
 * Filter by group or by devices, and by kind (and field); ordered by device, kind, field.
 */
export async function listAwaitingAck(
  ex: DistributionExecutor,
  filter: { groupId?: string | undefined; deviceIds?: readonly string[] | undefined; limit?: number | undefined; afterDeviceId?: string | undefined } & KeyFilter,
): Promise<AwaitingAck[]> {
  if (filter.deviceIds !== undefined && filter.deviceIds.length === 0) return [];
  const groupFilter = sql`${filter.groupId === undefined ? sql`` : sql`and d.group_id = ${filter.groupId}`} ${keyFilter(filter)}`;
  const deviceFilter = filter.deviceIds === undefined ? sql`` : sql`and o.device_id in (${sql.join(filter.deviceIds)})`;
  const afterFilter = filter.afterDeviceId === undefined ? sql`` : sql`and o.device_id > ${filter.afterDeviceId}`;
  const limit = filter.limit ?? 1000;
  const result = await sql<{ device_id: string; kind: KeyKind; field: string; version: number; state: VersionState; enqueued_at: Date; published_at: Date | null }>`
    select o.device_id, o.kind, o.field, o.version, s.state, min(o.created_at) as enqueued_at, max(o.published_at) as published_at
      from key_outbox o
      join devices d on d.id = o.device_id
      join (
        select device_id, 'device'::text as kind, ''::text as field, version, state from device_versions where state in ('pending', 'primary')
        union all
        select device_id, 'field'::text, field, version, state from field_versions where state in ('pending', 'primary')
      ) s on s.device_id = o.device_id and s.kind = o.kind and s.field = o.field and s.version = o.version
     where o.with_key and o.status <> 'dropped'
       ${groupFilter} ${deviceFilter} ${afterFilter}
       and not exists (select 1 from key_acks a where a.device_id = o.device_id and a.kind = o.kind and a.field = o.field and a.version >= o.version)
     group by o.device_id, o.kind, o.field, o.version, s.state
     order by o.device_id, o.kind, o.field, o.version
     limit ${limit}`.execute(ex);
  return result.rows.map((r) => ({
    deviceId: r.device_id,
    kind: r.kind,
    ...(r.kind === 'field' ? { field: r.field } : {}),
    version: r.version,
    state: r.state,
    enqueuedAt: r.enqueued_at,
    publishedAt: r.published_at,
  }));
}

/** Only one kind of key (and, for field keys, one field). */
export interface KeyFilter {
  kind?: KeyKind | undefined;
  field?: string | undefined;
}

function keyFilter(filter: KeyFilter) {
  const kind = filter.kind === undefined ? sql`` : sql`and o.kind = ${filter.kind}`;
  const field = filter.kind === 'field' && filter.field !== undefined ? sql`and o.field = ${filter.field}` : sql``;
  return sql`${kind} ${field}`;
}

/** How many devices (and key versions) of a group are awaiting acknowledgement, as listAwaitingAck counts them. */
export async function countAwaitingAck(ex: DistributionExecutor, groupId: string, filter: KeyFilter = {}): Promise<{ devices: number; versions: number }> {
  const result = await sql<{ devices: number; versions: number }>`
    select count(distinct o.device_id) as devices, count(distinct (o.device_id, o.kind, o.field, o.version)) as versions
      from key_outbox o
      join devices d on d.id = o.device_id and d.group_id = ${groupId}
     where o.with_key and o.status <> 'dropped' ${keyFilter(filter)}
       and (exists (select 1 from device_versions v where o.kind = 'device' and v.device_id = o.device_id and v.version = o.version and v.state in ('pending', 'primary'))
         or exists (select 1 from field_versions f where o.kind = 'field' and f.device_id = o.device_id and f.field = o.field and f.version = o.version and f.state in ('pending', 'primary')))
       and not exists (select 1 from key_acks a where a.device_id = o.device_id and a.kind = o.kind and a.field = o.field and a.version >= o.version)`.execute(ex);
  const row = result.rows[0];
  return { devices: Number(row?.devices ?? 0), versions: Number(row?.versions ?? 0) };
}

/**
 * The grace sweep's hold-back predicate, as SQL for a WHERE clause over a version row: TRUE
 * when a successor of this version (a newer version of the same key) was sent to the device
 * and the device has acknowledged none of the newer versions, i.e. the device may not hold a
 * key to replace this one yet. Versions whose successors never went through the outbox are not
 * held. Columns are passed as references, e.g. for `device_versions as d`:
 *
 *   .where((eb) => eb.not(successorUnacknowledged({ kind: 'device', deviceId: 'd.device_id', version: 'd.version' })))
 *
 * and for field_versions: `{ kind: 'field', deviceId: 'field_versions.device_id', field: 'field_versions.field', version: 'field_versions.version' }`.
 * References must be qualified (`table.column` or `alias.column`): unqualified, they would bind
 * to the subqueries' own tables. Apply it only where the policy asks to wait for acknowledgements.
 *
 * `sent`: which outbox rows count as "sent". `queued` (the default): pending or published, for
 * when the publisher is on (a successor waiting out a broker outage has still not reached the
 * device). `published`: only rows the broker accepted, for when MQTT is off: then nothing is
 * being sent, so nothing waiting in the outbox holds a version.
 */
export function successorUnacknowledged(ref: SuccessorRef, options: { sent?: SentRows } = {}): RawBuilder<SqlBool> & Expression<SqlBool> {
  const { deviceId, version, field } = successorRefs(ref);
  return sql<SqlBool>`(${successorSent(ref, options)}
    and not exists (select 1 from key_acks sa where sa.device_id = ${deviceId} and sa.kind = ${ref.kind} and sa.field = ${field} and sa.version > ${version}))`;
}

export type SentRows = 'queued' | 'published';
export interface SuccessorRef {
  kind: KeyKind;
  deviceId: string;
  version: string;
  field?: string;
}

/** The first half of successorUnacknowledged: a newer version of this key was sent (see `sent`). */
export function successorSent(ref: SuccessorRef, options: { sent?: SentRows } = {}): RawBuilder<SqlBool> & Expression<SqlBool> {
  const { deviceId, version, field } = successorRefs(ref);
  const status = (options.sent ?? 'queued') === 'published' ? sql`so.status = 'published'` : sql`so.status <> 'dropped'`;
  return sql<SqlBool>`exists (select 1 from key_outbox so where so.device_id = ${deviceId} and so.kind = ${ref.kind} and so.field = ${field} and so.version > ${version} and so.with_key and ${status})`;
}

/** When the device first acknowledged a version newer than this one (null: never), as SQL. */
export function successorAcknowledgedAt(ref: SuccessorRef): RawBuilder<Date | null> {
  const { deviceId, version, field } = successorRefs(ref);
  return sql<Date | null>`(select min(sa.acknowledged_at) from key_acks sa where sa.device_id = ${deviceId} and sa.kind = ${ref.kind} and sa.field = ${field} and sa.version > ${version})`;
}

function successorRefs(ref: SuccessorRef) {
  for (const column of [ref.deviceId, ref.version, ...(ref.kind === 'field' ? [ref.field ?? ''] : [])]) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$/.test(column)) throw new Error(`successorUnacknowledged needs qualified column references (got "${column}")`);
  }
  return { field: ref.kind === 'device' ? sql`''` : sql.ref(ref.field as string), deviceId: sql.ref(ref.deviceId), version: sql.ref(ref.version) };
}

/** The same predicate for one version (true: hold it in grace). */
export async function isHeldForAck(ex: DistributionExecutor, key: { deviceId: string; kind: KeyKind; field?: string | undefined; version: number }, options: { sent?: SentRows } = {}): Promise<boolean> {
  const field = key.kind === 'device' ? '' : (key.field ?? '');
  const status = (options.sent ?? 'queued') === 'published' ? sql`so.status = 'published'` : sql`so.status <> 'dropped'`;
  const result = await sql<{ held: boolean }>`
    select (exists (select 1 from key_outbox so where so.device_id = ${key.deviceId} and so.kind = ${key.kind} and so.field = ${field} and so.version > ${key.version} and so.with_key and ${status})
      and not exists (select 1 from key_acks sa where sa.device_id = ${key.deviceId} and sa.kind = ${key.kind} and sa.field = ${field} and sa.version > ${key.version})) as held`.execute(ex);
  return result.rows[0]?.held === true;
}
