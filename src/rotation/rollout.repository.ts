/**
 * SQL of staggered rollouts. Every function takes an executor: the service decides the
 * transactions. The work of a chunk is set-based: one statement per kind of change for the
 * whole chunk (`… FROM unnest($1::text[], $2::int[], …)`), never one round trip per device.
 *
 * Lock order (the device lifecycle's, extended): the group's primary version (share) → the
 * chunk's `rollout_items` (SKIP LOCKED) → `devices` rows (id order) → their `device_versions`
 * → their `field_versions` → the `rollouts` row → the `rollout_waves` row → (last, at commit)
 * the audit chain head. Control operations (pause, resume, cancel) lock the rollouts row, then
 * wave rows, then the audit chain head; listing a wave's devices locks only its wave row.
 */
import { sql } from 'kysely';
import type { VersionState } from '../db/tables.js';
import { BUCKETS } from './rollout.waves.js';
import type {
  ItemFieldRotation,
  ItemStatus,
  RolloutExecutor,
  RolloutLevel,
  RolloutState,
  RolloutsTable,
  RolloutWavesTable,
  WaveState,
} from './rollout.tables.js';
import { ACTIVE_ROLLOUT_STATES } from './rollout.tables.js';
import type { Insertable, Selectable, Updateable } from 'kysely';

export type RolloutRow = Selectable<RolloutsTable>;
export type WaveRow = Selectable<RolloutWavesTable>;

const ROLLOUT_COLUMNS = [
  'id',
  'group_id',
  'level',
  'field',
  'state',
  'reason',
  'percent_per_day',
  'canary_percent',
  'wave_interval_seconds',
  'halt_threshold',
  'rollback_on_halt',
  'bucket_offset',
  'wave_count',
  'started_at',
  'paused_ms',
  'paused_at',
  'halted_wave',
  'halt_reason',
  'finished_at',
  'created_by',
  'created_at',
  'updated_at',
] as const;

const WAVE_COLUMNS = [
  'rollout_id',
  'wave',
  'kind',
  'bucket_from',
  'bucket_to',
  'state',
  'listed_to',
  'devices',
  'done',
  'failed',
  'skipped',
  'rolled_back',
  'rollback_failed',
  'base_done',
  'base_failed',
  'started_at',
  'finished_at',
] as const;

const toRollout = (r: RolloutRow): RolloutRow => ({ ...r, paused_ms: Number(r.paused_ms) });

// ---------- rollouts ----------

export async function insertRollout(ex: RolloutExecutor, row: Insertable<RolloutsTable>, waves: ReadonlyArray<Insertable<RolloutWavesTable>>): Promise<void> {
  await ex.insertInto('rollouts').values(row).execute();
  for (let i = 0; i < waves.length; i += 1000) await ex.insertInto('rollout_waves').values(waves.slice(i, i + 1000)).execute();
}

export async function findRollout(ex: RolloutExecutor, id: string, options: { lock?: 'update' | 'no_key_update' } = {}): Promise<RolloutRow | undefined> {
  let query = ex.selectFrom('rollouts').select(ROLLOUT_COLUMNS).where('id', '=', id);
  if (options.lock === 'update') query = query.forUpdate();
  if (options.lock === 'no_key_update') query = query.forNoKeyUpdate();
  const row = await query.executeTakeFirst();
  return row && toRollout(row);
}

export async function findActiveRollout(ex: RolloutExecutor, groupId: string, level: RolloutLevel): Promise<RolloutRow | undefined> {
  const row = await ex.selectFrom('rollouts').select(ROLLOUT_COLUMNS).where('group_id', '=', groupId).where('level', '=', level).where('state', 'in', ACTIVE_ROLLOUT_STATES).executeTakeFirst();
  return row && toRollout(row);
}

/** Newest first, after the cursor (created_at, id). */
export async function listRollouts(
  ex: RolloutExecutor,
  q: { before?: { createdAt: Date; id: string } | undefined; limit: number; groupId?: string | undefined; state?: RolloutState | undefined },
): Promise<RolloutRow[]> {
  let query = ex.selectFrom('rollouts').select(ROLLOUT_COLUMNS).orderBy('created_at', 'desc').orderBy('id', 'desc').limit(q.limit);
  if (q.before) query = query.where(sql<boolean>`(created_at, id) < (${q.before.createdAt}, ${q.before.id})`);
  if (q.groupId !== undefined) query = query.where('group_id', '=', q.groupId);
  if (q.state !== undefined) query = query.where('state', '=', q.state);
  return (await query.execute()).map(toRollout);
}

/** Rollouts with work for the cron entry (running or rolling back), oldest first. */
export async function listRunnableRollouts(ex: RolloutExecutor, after: { startedAt: Date; id: string } | undefined, limit: number): Promise<RolloutRow[]> {
  let query = ex.selectFrom('rollouts').select(ROLLOUT_COLUMNS).where('state', 'in', ['running', 'rolling_back']).orderBy('started_at').orderBy('id').limit(limit);
  if (after) query = query.where(sql<boolean>`(started_at, id) > (${after.startedAt}, ${after.id})`);
  return (await query.execute()).map(toRollout);
}

/** Change a rollout if it is (still) in one of `from`; false otherwise. */
export async function updateRollout(ex: RolloutExecutor, id: string, from: readonly RolloutState[], patch: Updateable<RolloutsTable>): Promise<boolean> {
  const result = await ex.updateTable('rollouts').set(patch).where('id', '=', id).where('state', 'in', from).executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/** Per group and level: when the latest rollout started (the policy trigger waits a rotation period after it). */
export async function latestRolloutStarts(ex: RolloutExecutor, groupIds: readonly string[]): Promise<Map<string, Date>> {
  if (groupIds.length === 0) return new Map();
  const rows = await ex
    .selectFrom('rollouts')
    .select(['group_id', 'level'])
    .select((eb) => eb.fn.max<Date>('started_at').as('started_at'))
    .where('group_id', 'in', groupIds)
    .groupBy(['group_id', 'level'])
    .execute();
  return new Map(rows.map((r) => [`${r.group_id}\u0000${r.level}`, r.started_at]));
}

/** Is some primary of the group (device DEK or field key) created at or before `cutoff`? */
export async function hasPrimaryOlderThan(ex: RolloutExecutor, groupId: string, level: RolloutLevel, cutoff: Date): Promise<boolean> {
  const table = level === 'device' ? sql.table('device_versions') : sql.table('field_versions');
  const { rows } = await sql<{ due: boolean }>`
    select exists (
      select 1 from devices d join ${table} v on v.device_id = d.id
       where d.group_id = ${groupId} and v.state = 'primary' and v.created_at <= ${cutoff}) as due`.execute(ex);
  return rows[0]?.due === true;
}

// ---------- waves ----------

export async function listWaves(ex: RolloutExecutor, rolloutIds: readonly string[]): Promise<WaveRow[]> {
  if (rolloutIds.length === 0) return [];
  return ex.selectFrom('rollout_waves').select(WAVE_COLUMNS).where('rollout_id', 'in', rolloutIds).orderBy('rollout_id').orderBy('wave').execute();
}

export async function lockWave(ex: RolloutExecutor, rolloutId: string, wave: number): Promise<WaveRow | undefined> {
  return ex.selectFrom('rollout_waves').select(WAVE_COLUMNS).where('rollout_id', '=', rolloutId).where('wave', '=', wave).forUpdate().executeTakeFirst();
}

export async function updateWave(ex: RolloutExecutor, rolloutId: string, wave: number, from: readonly WaveState[], patch: Updateable<RolloutWavesTable>): Promise<boolean> {
  const result = await ex.updateTable('rollout_waves').set(patch).where('rollout_id', '=', rolloutId).where('wave', '=', wave).where('state', 'in', from).executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/** Every wave of the rollout not yet finished → `to`. */
export async function finishOpenWaves(ex: RolloutExecutor, rolloutId: string, to: WaveState, now: Date): Promise<number> {
  const result = await ex
    .updateTable('rollout_waves')
    .set({ state: to, finished_at: now })
    .where('rollout_id', '=', rolloutId)
    .where('state', 'in', ['scheduled', 'running', 'halted', 'rolling_back'])
    .executeTakeFirst();
  return Number(result.numUpdatedRows);
}

export interface WaveDeltas {
  done?: number;
  failed?: number;
  skipped?: number;
  rolledBack?: number;
  rollbackFailed?: number;
}

/** Add a chunk's outcome to its wave's counters (under the wave row's lock); the counters after. */
export async function addWaveCounters(ex: RolloutExecutor, rolloutId: string, wave: number, d: WaveDeltas): Promise<WaveRow> {
  return ex
    .updateTable('rollout_waves')
    .set((eb) => ({
      done: eb('done', '+', d.done ?? 0),
      failed: eb('failed', '+', d.failed ?? 0),
      skipped: eb('skipped', '+', d.skipped ?? 0),
      rolled_back: eb('rolled_back', '+', d.rolledBack ?? 0),
      rollback_failed: eb('rollback_failed', '+', d.rollbackFailed ?? 0),
    }))
    .where('rollout_id', '=', rolloutId)
    .where('wave', '=', wave)
    .returning(WAVE_COLUMNS)
    .executeTakeFirstOrThrow();
}

// ---------- listing a wave's devices ----------

/**
 * Add the devices of the group whose raw bucket is in [from, to) as pending items of the
 * wave (a sweep: every device of the group not yet in the rollout). Field level: only
 * devices with a primary field key (of the field, when the rollout names one). Devices
 * already in the rollout keep their item. Returns how many were added.
 */
export async function listWaveDevices(
  ex: RolloutExecutor,
  q: { rolloutId: string; groupId: string; wave: number; level: RolloutLevel; field: string | null; from: number; to: number; now: Date },
): Promise<number> {
  const sweep = q.from === 0 && q.to === BUCKETS;
  const range = sweep ? sql`` : sql`and keystrata_rollout_bucket(d.id) >= ${q.from} and keystrata_rollout_bucket(d.id) < ${q.to}`;
  // a device is in exactly one wave by its bucket: only the sweep can meet devices already listed
  const notListed = sweep ? sql`and not exists (select 1 from rollout_items i where i.rollout_id = ${q.rolloutId} and i.device_id = d.id)` : sql``;
  const withFields =
    q.level === 'field'
      ? sql`and exists (select 1 from field_versions f where f.device_id = d.id and f.state = 'primary' ${q.field === null ? sql`` : sql`and f.field = ${q.field}`})`
      : sql``;
  const result = await sql`
    insert into rollout_items (rollout_id, device_id, wave, status, updated_at)
    select ${q.rolloutId}, d.id, ${q.wave}, 'pending', ${q.now}::timestamptz
      from devices d
     where d.group_id = ${q.groupId} ${range} ${withFields} ${notListed}
    on conflict (rollout_id, device_id) do nothing`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

/** Devices of the group in a raw bucket range (a dry run's estimate of what a wave would list). */
export async function countGroupDevices(ex: RolloutExecutor, groupId: string, from: number, to: number): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    select count(*) as n from devices d
     where d.group_id = ${groupId} and keystrata_rollout_bucket(d.id) >= ${from} and keystrata_rollout_bucket(d.id) < ${to}`.execute(ex);
  return Number(rows[0]?.n ?? 0);
}

export async function hasPendingItems(ex: RolloutExecutor, rolloutId: string, wave: number): Promise<boolean> {
  const row = await ex.selectFrom('rollout_items').select('device_id').where('rollout_id', '=', rolloutId).where('wave', '=', wave).where('status', '=', 'pending').limit(1).executeTakeFirst();
  return row !== undefined;
}

export async function countPendingItems(ex: RolloutExecutor, rolloutId: string, wave: number): Promise<number> {
  const row = await ex
    .selectFrom('rollout_items')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('rollout_id', '=', rolloutId)
    .where('wave', '=', wave)
    .where('status', '=', 'pending')
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

// ---------- chunks ----------

/**
 * Every statement of a chunk looks rows up by key for a chunk's worth of ids (`= any($ids)`,
 * `JOIN unnest($ids, …)`). The planner cannot know how many ids an array parameter holds and,
 * with statistics of tables that grew by a million rows since the last ANALYZE (or of a new
 * rollout id it has never seen), it picks hash joins over the whole table: measured at 300,000
 * devices, 560 ms instead of 30 ms per statement, every chunk, and growing with the fleet. For the
 * rest of the chunk's transaction only (`set_config(…, true)` = SET LOCAL), key lookups it is, and
 * no parallel workers (a chunk's statements touch a few thousand rows by key: starting workers
 * and shipping them the plan, array parameters included, cost more than the work; seen in a
 * profile of the 100,000-device wave).
 */
export async function preferKeyLookups(ex: RolloutExecutor): Promise<void> {
  await sql`select set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
                    set_config('max_parallel_workers_per_gather', '0', true)`.execute(ex);
}

/** The next pending items of a wave (after `after`, in device id order), locked; items another runner holds are skipped. */
export async function claimPendingItems(ex: RolloutExecutor, rolloutId: string, wave: number, after: string | undefined, limit: number): Promise<string[]> {
  const { rows } = await sql<{ device_id: string }>`
    select device_id from rollout_items
     where rollout_id = ${rolloutId} and wave = ${wave} and status = 'pending' ${after === undefined ? sql`` : sql`and device_id > ${after}`}
     order by device_id limit ${limit}
       for update skip locked`.execute(ex);
  return rows.map((r) => r.device_id);
}

/**
 * The opening of a device-level chunk, in one round trip: key lookups for the rest of the
 * transaction (preferKeyLookups), the rollout's state, and the group's primary version,
 * share-locked (a group rotation cannot retire it under the chunk's new wraps). `groupVersion`
 * undefined: the group has no primary visible (a group rotation committed while we waited).
 */
export async function openDeviceChunk(ex: RolloutExecutor, rolloutId: string, groupId: string): Promise<{ state: RolloutState | undefined; groupVersion: number | undefined }> {
  const { rows } = await sql<{ state: RolloutState | null; group_version: number | null }>`
    select (select state from rollouts where id = ${rolloutId}) as state, g.version as group_version,
           set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
           set_config('max_parallel_workers_per_gather', '0', true)
      from (select 1) as one
      left join lateral (select version from group_versions where group_id = ${groupId} and state = 'primary' for share) as g on true`.execute(ex);
  const row = rows[0];
  return { state: row?.state ?? undefined, groupVersion: row?.group_version ?? undefined };
}

export interface DoneItem {
  device_id: string;
  from_version: number | null;
  to_version: number | null;
  fields: ItemFieldRotation[] | null;
}

/** The next rotated (`done`) items of a wave after `after`, locked (a rollback's chunk). */
export async function claimDoneItems(ex: RolloutExecutor, rolloutId: string, wave: number, after: string | undefined, limit: number): Promise<DoneItem[]> {
  let query = ex
    .selectFrom('rollout_items')
    .select(['device_id', 'from_version', 'to_version', 'fields'])
    .where('rollout_id', '=', rolloutId)
    .where('wave', '=', wave)
    .where('status', '=', 'done')
    .orderBy('device_id')
    .limit(limit)
    .forUpdate()
    .skipLocked();
  if (after !== undefined) query = query.where('device_id', '>', after);
  return query.execute();
}

export async function hasDoneItems(ex: RolloutExecutor, rolloutId: string, wave: number): Promise<boolean> {
  const row = await ex.selectFrom('rollout_items').select('device_id').where('rollout_id', '=', rolloutId).where('wave', '=', wave).where('status', '=', 'done').limit(1).executeTakeFirst();
  return row !== undefined;
}

export interface ItemOutcome {
  deviceId: string;
  status: ItemStatus;
  fromVersion?: number | null | undefined;
  toVersion?: number | null | undefined;
  fields?: ItemFieldRotation[] | null | undefined;
  reason?: string | null | undefined;
}

/**
 * Record the outcome of a chunk's items (the caller holds their locks). Every condition on
 * `rollout_items` is a join condition with the unnest, never a constant: with `rollout_id = $1`
 * or `status = 'pending'` the planner could scan the rollout's items through the primary key or
 * the pending partial index as the outer side and walk the chunk's list for each of them
 * (measured: 1.3 s a chunk at 50,000 devices, growing with the wave); with only join conditions
 * (and the chunk's preferKeyLookups), the chunk's list drives primary-key lookups.
 */
export async function finishItems(ex: RolloutExecutor, rolloutId: string, from: ItemStatus, items: readonly ItemOutcome[], now: Date): Promise<number> {
  if (items.length === 0) return 0;
  const result = await itemOutcomesUpdate(rolloutId, from, items, now).execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

/** The UPDATE of finishItems, also the `items` step of writeDeviceChunk's one statement. */
function itemOutcomesUpdate(rolloutId: string, from: ItemStatus, items: readonly ItemOutcome[], now: Date) {
  const keep = (v: unknown) => v === undefined; // undefined: the column keeps its value
  return sql`
    update rollout_items as i
       set status = u.status,
           from_version = case when u.keep_versions then i.from_version else u.from_version end,
           to_version = case when u.keep_versions then i.to_version else u.to_version end,
           fields = case when u.keep_fields then i.fields else u.fields end,
           reason = u.reason,
           updated_at = ${now}::timestamptz
      from unnest(${items.map((i) => i.deviceId)}::text[], ${items.map((i) => i.status)}::text[],
                  ${items.map((i) => i.fromVersion ?? null)}::int[], ${items.map((i) => i.toVersion ?? null)}::int[],
                  ${items.map((i) => keep(i.fromVersion) && keep(i.toVersion))}::boolean[],
                  ${items.map((i) => (i.fields ? JSON.stringify(i.fields) : null))}::jsonb[], ${items.map((i) => keep(i.fields))}::boolean[],
                  ${items.map((i) => i.reason ?? null)}::text[], ${items.map(() => from)}::text[], ${items.map(() => rolloutId)}::text[])
           as u(device_id, status, from_version, to_version, keep_versions, fields, keep_fields, reason, from_status, rollout_id)
     where i.rollout_id = u.rollout_id and i.device_id = u.device_id and i.status = u.from_status`;
}

export async function listFailedItems(ex: RolloutExecutor, rolloutId: string, limit: number): Promise<Array<{ device_id: string; wave: number; status: ItemStatus; reason: string | null }>> {
  return ex
    .selectFrom('rollout_items')
    .select(['device_id', 'wave', 'status', 'reason'])
    .where('rollout_id', '=', rolloutId)
    .where('status', 'in', ['failed', 'rollback_failed'])
    .orderBy('wave')
    .orderBy('device_id')
    .limit(limit)
    .execute();
}

// ---------- the devices of a chunk, locked ----------

export interface ChunkDevice {
  id: string;
  destroy_after: Date | null;
}

export interface ChunkVersion {
  device_id: string;
  version: number;
  state: VersionState;
  wrapped_key: Buffer | null;
  parent_version: number;
  state_until: Date | null;
}

export interface ChunkFieldVersion extends ChunkVersion {
  field: string;
}

export async function lockDevices(ex: RolloutExecutor, ids: readonly string[]): Promise<ChunkDevice[]> {
  if (ids.length === 0) return [];
  const { rows } = await sql<ChunkDevice>`select id, destroy_after from devices where id = any(${ids}::text[]) order by id for update`.execute(ex);
  return rows;
}

export async function lockDeviceVersions(ex: RolloutExecutor, ids: readonly string[]): Promise<ChunkVersion[]> {
  if (ids.length === 0) return [];
  const { rows } = await sql<ChunkVersion>`
    select device_id, version, state, wrapped_key, parent_version, state_until
      from device_versions where device_id = any(${ids}::text[]) order by device_id, version for update`.execute(ex);
  return rows;
}

export async function lockFieldVersions(ex: RolloutExecutor, ids: readonly string[]): Promise<ChunkFieldVersion[]> {
  if (ids.length === 0) return [];
  const { rows } = await sql<ChunkFieldVersion>`
    select device_id, field, version, state, wrapped_key, parent_version, state_until
      from field_versions where device_id = any(${ids}::text[]) order by device_id, field, version for update`.execute(ex);
  return rows;
}

// ---------- set-based version changes ----------

export interface StateMove {
  deviceId: string;
  /** field keys only */
  field?: string;
  version: number;
  from: VersionState;
  to: VersionState;
  until: Date | null;
}

/** Move device DEK versions between states, each only if still in `from`. Returns how many moved. */
export async function moveDeviceVersions(ex: RolloutExecutor, moves: readonly StateMove[], now: Date): Promise<number> {
  if (moves.length === 0) return 0;
  const result = await sql`
    update device_versions as v
       set state = u.to_state, state_changed_at = ${now}::timestamptz, state_until = u.until
      from unnest(${moves.map((m) => m.deviceId)}::text[], ${moves.map((m) => m.version)}::int[], ${moves.map((m) => m.from)}::text[],
                  ${moves.map((m) => m.to)}::text[], ${moves.map((m) => m.until)}::timestamptz[]) as u(device_id, version, from_state, to_state, until)
     where v.device_id = u.device_id and v.version = u.version and v.state = u.from_state`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

export async function moveFieldVersions(ex: RolloutExecutor, moves: readonly StateMove[], now: Date): Promise<number> {
  if (moves.length === 0) return 0;
  const result = await sql`
    update field_versions as v
       set state = u.to_state, state_changed_at = ${now}::timestamptz, state_until = u.until
      from unnest(${moves.map((m) => m.deviceId)}::text[], ${moves.map((m) => m.field ?? '')}::text[], ${moves.map((m) => m.version)}::int[],
                  ${moves.map((m) => m.from)}::text[], ${moves.map((m) => m.to)}::text[], ${moves.map((m) => m.until)}::timestamptz[])
           as u(device_id, field, version, from_state, to_state, until)
     where v.device_id = u.device_id and v.field = u.field and v.version = u.version and v.state = u.from_state`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

export interface NewVersion {
  deviceId: string;
  field?: string;
  version: number;
  wrapped: Buffer;
  parentVersion: number;
}

/** New primary device DEK versions (the previous primaries must have left `primary` first). */
export async function insertDeviceVersions(ex: RolloutExecutor, rows: readonly NewVersion[], now: Date): Promise<void> {
  if (rows.length === 0) return;
  await sql`
    insert into device_versions (device_id, version, state, wrapped_key, parent_version, created_at, state_changed_at)
    select u.device_id, u.version, 'primary', u.wrapped, u.parent_version, ${now}::timestamptz, ${now}::timestamptz
      from unnest(${rows.map((r) => r.deviceId)}::text[], ${rows.map((r) => r.version)}::int[], ${rows.map((r) => r.wrapped)}::bytea[],
                  ${rows.map((r) => r.parentVersion)}::int[]) as u(device_id, version, wrapped, parent_version)`.execute(ex);
}

export async function insertFieldVersions(ex: RolloutExecutor, rows: readonly NewVersion[], now: Date): Promise<void> {
  if (rows.length === 0) return;
  await sql`
    insert into field_versions (device_id, field, version, state, wrapped_key, parent_version, created_at, state_changed_at)
    select u.device_id, u.field, u.version, 'primary', u.wrapped, u.parent_version, ${now}::timestamptz, ${now}::timestamptz
      from unnest(${rows.map((r) => r.deviceId)}::text[], ${rows.map((r) => r.field ?? '')}::text[], ${rows.map((r) => r.version)}::int[],
                  ${rows.map((r) => r.wrapped)}::bytea[], ${rows.map((r) => r.parentVersion)}::int[]) as u(device_id, field, version, wrapped, parent_version)`.execute(ex);
}

export interface FieldWrapMove {
  deviceId: string;
  field: string;
  version: number;
  fromParent: number;
  toParent: number;
  wrapped: Buffer;
}

/** Move field key versions' wraps to other device versions, each only if still under the parent it was unwrapped with. */
export async function rewrapFieldVersions(ex: RolloutExecutor, moves: readonly FieldWrapMove[]): Promise<number> {
  if (moves.length === 0) return 0;
  const result = await sql`
    update field_versions as v
       set wrapped_key = u.wrapped, parent_version = u.to_parent
      from unnest(${moves.map((m) => m.deviceId)}::text[], ${moves.map((m) => m.field)}::text[], ${moves.map((m) => m.version)}::int[],
                  ${moves.map((m) => m.fromParent)}::int[], ${moves.map((m) => m.toParent)}::int[], ${moves.map((m) => m.wrapped)}::bytea[])
           as u(device_id, field, version, from_parent, to_parent, wrapped)
     where v.device_id = u.device_id and v.field = u.field and v.version = u.version and v.parent_version = u.from_parent and v.wrapped_key is not null`.execute(ex);
  return Number(result.numAffectedRows ?? 0);
}

// ---------- a device-level chunk's writes, in one statement ----------

export interface DeviceChunkWrites {
  /** old primaries → grace (or disabled), each only if still in `from` */
  moves: readonly StateMove[];
  /** the new primaries; inserted only once every move landed (one primary per key is a unique index) */
  inserts: readonly NewVersion[];
  /** field key versions rewrapped under the new primaries */
  rewraps: readonly FieldWrapMove[];
  /** the items' outcomes (from `pending`) */
  items: readonly ItemOutcome[];
}

/**
 * Everything a device-level chunk changes in the fleet's rows, in ONE statement (the caller
 * holds the devices', versions' and items' locks): the moves, then (gated on all of them having
 * landed) the inserts, the field rewraps and the items. Returns how many rows each part
 * changed: the caller compares them with what it asked for and rolls the chunk back on any
 * difference. The inserts read the count of the moves (an InitPlan), so every old primary has
 * left `primary` before the first new one goes in.
 */
export async function writeDeviceChunk(ex: RolloutExecutor, rolloutId: string, w: DeviceChunkWrites, now: Date): Promise<{ moved: number; inserted: number; rewrapped: number; items: number }> {
  const { moves, inserts, rewraps, items } = w;
  const { rows } = await sql<{ moved: number; inserted: number; rewrapped: number; items: number }>`
    with moved as (
      update device_versions as v
         set state = u.to_state, state_changed_at = ${now}::timestamptz, state_until = u.until
        from unnest(${moves.map((m) => m.deviceId)}::text[], ${moves.map((m) => m.version)}::int[], ${moves.map((m) => m.from)}::text[],
                    ${moves.map((m) => m.to)}::text[], ${moves.map((m) => m.until)}::timestamptz[]) as u(device_id, version, from_state, to_state, until)
       where v.device_id = u.device_id and v.version = u.version and v.state = u.from_state
      returning 1
    ), inserted as (
      insert into device_versions (device_id, version, state, wrapped_key, parent_version, created_at, state_changed_at)
      select u.device_id, u.version, 'primary', u.wrapped, u.parent_version, ${now}::timestamptz, ${now}::timestamptz
        from unnest(${inserts.map((r) => r.deviceId)}::text[], ${inserts.map((r) => r.version)}::int[], ${inserts.map((r) => r.wrapped)}::bytea[],
                    ${inserts.map((r) => r.parentVersion)}::int[]) as u(device_id, version, wrapped, parent_version)
       where (select count(*) from moved) = ${moves.length}
      returning 1
    ), rewrapped as (
      update field_versions as v
         set wrapped_key = u.wrapped, parent_version = u.to_parent
        from unnest(${rewraps.map((m) => m.deviceId)}::text[], ${rewraps.map((m) => m.field)}::text[], ${rewraps.map((m) => m.version)}::int[],
                    ${rewraps.map((m) => m.fromParent)}::int[], ${rewraps.map((m) => m.toParent)}::int[], ${rewraps.map((m) => m.wrapped)}::bytea[])
             as u(device_id, field, version, from_parent, to_parent, wrapped)
       where v.device_id = u.device_id and v.field = u.field and v.version = u.version and v.parent_version = u.from_parent and v.wrapped_key is not null
      returning 1
    ), items as (
      ${itemOutcomesUpdate(rolloutId, 'pending', items, now)}
      returning 1
    )
    select (select count(*) from moved) as moved, (select count(*) from inserted) as inserted,
           (select count(*) from rewrapped) as rewrapped, (select count(*) from items) as items`.execute(ex);
  const row = rows[0];
  return { moved: Number(row?.moved ?? 0), inserted: Number(row?.inserted ?? 0), rewrapped: Number(row?.rewrapped ?? 0), items: Number(row?.items ?? 0) };
}

/**
 * The end of a forward chunk in one round trip: the rollout's row, locked (FOR NO KEY UPDATE),
 * and, only if it is still running, the chunk's outcome added to its wave's counters. Returns
 * the rollout's state and halt rule, and the wave's counters after (`counters` undefined: the
 * rollout is not running, or the wave is gone, and nothing changed).
 */
export async function lockRolloutAndCount(
  ex: RolloutExecutor,
  rolloutId: string,
  wave: number,
  d: WaveDeltas,
): Promise<{
  rollout?: Pick<RolloutRow, 'state' | 'halt_threshold' | 'rollback_on_halt'>;
  counters?: Pick<WaveRow, 'done' | 'failed' | 'base_done' | 'base_failed'>;
}> {
  const { rows } = await sql<{
    state: RolloutState | null;
    halt_threshold: number | null;
    rollback_on_halt: boolean | null;
    done: number | null;
    failed: number | null;
    base_done: number | null;
    base_failed: number | null;
  }>`
    with r as (
      select state, halt_threshold, rollback_on_halt from rollouts where id = ${rolloutId} for no key update
    ), w as (
      update rollout_waves
         set done = done + ${d.done ?? 0}, failed = failed + ${d.failed ?? 0}, skipped = skipped + ${d.skipped ?? 0},
             rolled_back = rolled_back + ${d.rolledBack ?? 0}, rollback_failed = rollback_failed + ${d.rollbackFailed ?? 0}
       where rollout_id = ${rolloutId} and wave = ${wave} and (select state from r) = 'running'
      returning done, failed, base_done, base_failed
    )
    select r.state, r.halt_threshold, r.rollback_on_halt, w.done, w.failed, w.base_done, w.base_failed
      from (select 1) as one left join r on true left join w on true`.execute(ex);
  const row = rows[0];
  if (!row || row.state === null) return {};
  const rollout = { state: row.state, halt_threshold: Number(row.halt_threshold), rollback_on_halt: row.rollback_on_halt === true };
  if (row.done === null) return { rollout };
  return { rollout, counters: { done: row.done, failed: Number(row.failed), base_done: Number(row.base_done), base_failed: Number(row.base_failed) } };
}

// ---------- progress ----------

/**
 * Devices of the group not (yet) on a key from this rollout: device level, devices whose primary
 * device DEK is not the one the rollout made; field level, devices with a primary field key (of
 * `field`, or any) that the rollout has not rotated.
 */
export async function countOnOldVersions(ex: RolloutExecutor, r: { id: string; group_id: string; level: RolloutLevel; field: string | null }): Promise<number> {
  const { rows } =
    r.level === 'device'
      ? await sql<{ n: number }>`
          select count(*) as n
            from devices d
            join device_versions v on v.device_id = d.id and v.state = 'primary'
            left join rollout_items i on i.rollout_id = ${r.id} and i.device_id = d.id and i.status = 'done' and i.to_version = v.version
           where d.group_id = ${r.group_id} and i.device_id is null`.execute(ex)
      : await sql<{ n: number }>`
          select count(distinct d.id) as n
            from devices d
            join field_versions v on v.device_id = d.id and v.state = 'primary' ${r.field === null ? sql`` : sql`and v.field = ${r.field}`}
            left join rollout_items i on i.rollout_id = ${r.id} and i.device_id = d.id and i.status = 'done'
           where d.group_id = ${r.group_id} and i.device_id is null`.execute(ex);
  return Number(rows[0]?.n ?? 0);
}
