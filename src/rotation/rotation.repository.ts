/**
 * SQL of rotation: KEK-wrapped blobs below a KEK version, device versions wrapped under old
 * group versions, the KEK versions keystrata has seen, leases, and the counts behind rotation
 * debt. Every function takes an executor: services decide the transactions.
 */
import { sql } from 'kysely';
import type { VersionState } from '../db/tables.js';
import type { RotationExecutor } from './rotation.tables.js';

// ---------- KEK-wrapped group DEK blobs ----------

export interface GroupBlobRow {
  group_id: string;
  version: number;
  wrapped_key: string;
  kek_version: number;
}

/** Group versions with material wrapped under a KEK version below `latest`, in key order after `after`. */
export async function groupBlobsBelow(ex: RotationExecutor, latest: number, after: { groupId: string; version: number } | undefined, limit: number): Promise<GroupBlobRow[]> {
  let query = ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'wrapped_key', 'kek_version'])
    .where('wrapped_key', 'is not', null)
    .where('kek_version', '<', latest)
    .orderBy('group_id')
    .orderBy('version')
    .limit(limit);
  if (after) query = query.where(sql<boolean>`(group_id, version) > (${after.groupId}, ${after.version})`);
  const rows = await query.execute();
  return rows.map((r) => ({ group_id: r.group_id, version: r.version, wrapped_key: r.wrapped_key ?? '', kek_version: r.kek_version }));
}

export async function countGroupBlobsBelow(ex: RotationExecutor, latest: number): Promise<number> {
  const row = await ex
    .selectFrom('group_versions')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('wrapped_key', 'is not', null)
    .where('kek_version', '<', latest)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/** The lowest KEK version any stored group blob is wrapped under (undefined: none stored). */
export async function lowestGroupKekVersion(ex: RotationExecutor): Promise<number | undefined> {
  const row = await ex
    .selectFrom('group_versions')
    .select((eb) => eb.fn.min<number | null>('kek_version').as('v'))
    .where('wrapped_key', 'is not', null)
    .executeTakeFirst();
  return row?.v === null || row?.v === undefined ? undefined : Number(row.v);
}

export interface GroupBlobSwap {
  groupId: string;
  version: number;
  oldBlob: string;
  newBlob: string;
  kekVersion: number;
}

/** Swaps as the statement takes them: one array literal per column, built ahead of the transaction. */
export interface PreparedGroupBlobSwaps {
  readonly count: number;
  readonly groupIds: string;
  readonly versions: string;
  readonly oldBlobs: string;
  readonly newBlobs: string;
  readonly kekVersions: string;
}

export function prepareGroupBlobSwaps(items: ReadonlyArray<GroupBlobSwap>): PreparedGroupBlobSwaps {
  return {
    count: items.length,
    groupIds: textArray(items.map((i) => i.groupId)),
    versions: intArray(items.map((i) => i.version)),
    oldBlobs: textArray(items.map((i) => i.oldBlob)),
    newBlobs: textArray(items.map((i) => i.newBlob)),
    kekVersions: intArray(items.map((i) => i.kekVersion)),
  };
}

/**
 * Swap in rewrapped blobs, each only if its row still holds the blob that was rewrapped (a
 * concurrent rewrap or destruction wins). One statement over arrays: five parameters whatever
 * the batch size, each row found through the primary key (`group_id = any(…)` keeps the planner
 * on the index when its statistics are stale, instead of hashing the whole table per batch).
 * Returns, per item in order, whether its row was updated.
 */
export async function replaceGroupBlobs(ex: RotationExecutor, items: ReadonlyArray<GroupBlobSwap> | PreparedGroupBlobSwaps): Promise<boolean[]> {
  const swaps = 'count' in items ? items : prepareGroupBlobSwaps(items);
  if (swaps.count === 0) return [];
  const result = await sql<{ i: number }>`
    update group_versions as g
       set wrapped_key = v.new_blob, kek_version = v.kek_version
      from unnest(${swaps.groupIds}::text[], ${swaps.versions}::integer[], ${swaps.oldBlobs}::text[], ${swaps.newBlobs}::text[], ${swaps.kekVersions}::integer[])
           with ordinality as v(group_id, version, old_blob, new_blob, kek_version, i)
     where g.group_id = any(${swaps.groupIds}::text[])
       and g.group_id = v.group_id and g.version = v.version and g.wrapped_key = v.old_blob
    returning v.i::integer as i`.execute(ex);
  const updated = new Array<boolean>(swaps.count).fill(false);
  for (const { i } of result.rows) updated[i - 1] = true;
  return updated;
}

/** A PostgreSQL array literal of texts, every element quoted (what node-postgres sends for a string[], built in one pass). */
export function textArray(values: readonly string[]): string {
  let out = '{';
  for (let i = 0; i < values.length; i++) {
    const value = values[i] as string;
    out += `${i === 0 ? '' : ','}"${/["\\]/.test(value) ? value.replace(/["\\]/g, '\\$&') : value}"`;
  }
  return `${out}}`;
}

function intArray(values: readonly number[]): string {
  for (const value of values) if (!Number.isSafeInteger(value)) throw new Error('Not an integer');
  return `{${values.join(',')}}`;
}

// ---------- KEK versions seen ----------

export async function listKekVersions(ex: RotationExecutor, kekName: string): Promise<Array<{ version: number; became_latest_at: Date; source: 'rotated' | 'observed' }>> {
  return ex.selectFrom('kek_versions').select(['version', 'became_latest_at', 'source']).where('kek_name', '=', kekName).orderBy('version').execute();
}

export async function insertKekVersion(ex: RotationExecutor, row: { kek_name: string; version: number; became_latest_at: Date; source: 'rotated' | 'observed' }): Promise<boolean> {
  const result = await ex.insertInto('kek_versions').values(row).onConflict((oc) => oc.columns(['kek_name', 'version']).doNothing()).executeTakeFirst();
  return Number(result.numInsertedOrUpdatedRows ?? 0) === 1;
}

// ---------- leases ----------

/** Take the lease when nobody holds it or the holder's lease has expired. */
export async function acquireLease(ex: RotationExecutor, name: string, holder: string, now: Date, expiresAt: Date): Promise<boolean> {
  const row = await ex
    .insertInto('rotation_leases')
    .values({ name, holder, expires_at: expiresAt })
    .onConflict((oc) => oc.column('name').doUpdateSet({ holder, expires_at: expiresAt }).where('rotation_leases.expires_at', '<=', now))
    .returning('holder')
    .executeTakeFirst();
  return row?.holder === holder;
}

export async function renewLease(ex: RotationExecutor, name: string, holder: string, expiresAt: Date): Promise<boolean> {
  const result = await ex.updateTable('rotation_leases').set({ expires_at: expiresAt }).where('name', '=', name).where('holder', '=', holder).executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

export async function releaseLease(ex: RotationExecutor, name: string, holder: string): Promise<void> {
  await ex.deleteFrom('rotation_leases').where('name', '=', name).where('holder', '=', holder).execute();
}

export async function findLease(ex: RotationExecutor, name: string): Promise<{ holder: string; expires_at: Date } | undefined> {
  return ex.selectFrom('rotation_leases').select(['holder', 'expires_at']).where('name', '=', name).executeTakeFirst();
}

// ---------- groups ----------

export async function listGroupIds(ex: RotationExecutor, after: string | undefined, limit: number): Promise<string[]> {
  let query = ex.selectFrom('key_groups').select('id').orderBy('id').limit(limit);
  if (after !== undefined) query = query.where('id', '>', after);
  return (await query.execute()).map((r) => r.id);
}

export async function lockGroup(ex: RotationExecutor, groupId: string): Promise<boolean> {
  const row = await ex.selectFrom('key_groups').select('id').where('id', '=', groupId).forUpdate().executeTakeFirst();
  return row !== undefined;
}

export interface GroupVersionState {
  group_id: string;
  version: number;
  state: VersionState;
  kek_version: number;
  has_material: boolean;
  created_at: Date;
  state_changed_at: Date;
  state_until: Date | null;
}

/** Version rows without material, for decisions and reports. */
export async function listGroupVersionStates(ex: RotationExecutor, groupIds: readonly string[], options: { forUpdate?: boolean } = {}): Promise<GroupVersionState[]> {
  if (groupIds.length === 0) return [];
  let query = ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'state', 'kek_version', 'created_at', 'state_changed_at', 'state_until'])
    .select(sql<boolean>`wrapped_key is not null`.as('has_material'))
    .where('group_id', 'in', groupIds)
    .orderBy('group_id')
    .orderBy('version');
  if (options.forUpdate) query = query.forUpdate();
  return query.execute();
}

export async function maxGroupVersion(ex: RotationExecutor, groupId: string): Promise<number> {
  const row = await ex.selectFrom('group_versions').select((eb) => eb.fn.max<number | null>('version').as('v')).where('group_id', '=', groupId).executeTakeFirst();
  return Number(row?.v ?? 0);
}

/** Move one group version from `from` to `to` (and set its other columns); false when it was not in `from`. */
export async function updateGroupVersionState(
  ex: RotationExecutor,
  groupId: string,
  version: number,
  from: VersionState,
  patch: { state: VersionState; state_changed_at: Date; state_until: Date | null; erase?: boolean },
): Promise<boolean> {
  const result = await ex
    .updateTable('group_versions')
    .set({ state: patch.state, state_changed_at: patch.state_changed_at, state_until: patch.state_until, ...(patch.erase ? { wrapped_key: null } : {}) })
    .where('group_id', '=', groupId)
    .where('version', '=', version)
    .where('state', '=', from)
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

// ---------- device versions under group versions ----------

export interface ChildRow {
  device_id: string;
  version: number;
  parent_version: number;
  wrapped_key: Buffer;
}

/**
 * The next chunk of a group's device versions with material wrapped under a group version
 * other than `primary`, after `after` in (device id, version) order, locked; rows another
 * runner holds are skipped (it is moving them).
 */
export async function lockChildrenToRewrap(ex: RotationExecutor, groupId: string, primary: number, after: { deviceId: string; version: number } | undefined, limit: number): Promise<ChildRow[]> {
  let query = ex
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select(['dv.device_id', 'dv.version', 'dv.parent_version', 'dv.wrapped_key'])
    .where('d.group_id', '=', groupId)
    .where('dv.wrapped_key', 'is not', null)
    .where('dv.parent_version', '<>', primary)
    .orderBy('dv.device_id')
    .orderBy('dv.version')
    .limit(limit)
    .forUpdate(['dv'])
    .skipLocked();
  if (after) query = query.where(sql<boolean>`(dv.device_id, dv.version) > (${after.deviceId}, ${after.version})`);
  const rows = await query.execute();
  return rows.map((r) => ({ device_id: r.device_id, version: r.version, parent_version: r.parent_version, wrapped_key: r.wrapped_key ?? Buffer.alloc(0) }));
}

/** Swap in the new wraps, each only if the row is still under the parent it was unwrapped with. */
export async function replaceChildWraps(
  ex: RotationExecutor,
  items: ReadonlyArray<{ deviceId: string; version: number; oldParent: number; newParent: number; wrapped: Buffer }>,
): Promise<Array<{ device_id: string; version: number }>> {
  if (items.length === 0) return [];
  const values = sql.join(items.map((i) => sql`(${i.deviceId}::text, ${i.version}::integer, ${i.oldParent}::integer, ${i.newParent}::integer, ${i.wrapped}::bytea)`));
  const result = await sql<{ device_id: string; version: number }>`
    update device_versions as dv
       set wrapped_key = v.wrapped, parent_version = v.new_parent
      from (values ${values}) as v(device_id, version, old_parent, new_parent, wrapped)
     where dv.device_id = v.device_id and dv.version = v.version and dv.parent_version = v.old_parent and dv.wrapped_key is not null
    returning dv.device_id, dv.version`.execute(ex);
  return result.rows;
}

/** Device versions with material, per group version they are wrapped under. */
export async function countChildrenByParent(ex: RotationExecutor, groupId: string): Promise<Map<number, number>> {
  const rows = await ex
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select(['dv.parent_version'])
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('d.group_id', '=', groupId)
    .where('dv.wrapped_key', 'is not', null)
    .groupBy('dv.parent_version')
    .execute();
  return new Map(rows.map((r) => [r.parent_version, Number(r.n)]));
}

export async function countChildrenOf(ex: RotationExecutor, groupId: string, parentVersion: number): Promise<number> {
  const row = await ex
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('d.group_id', '=', groupId)
    .where('dv.parent_version', '=', parentVersion)
    .where('dv.wrapped_key', 'is not', null)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

// ---------- rotation debt and due keys ----------

export async function countDeviceVersionsByState(ex: RotationExecutor, groupId: string): Promise<Map<VersionState, number>> {
  const rows = await ex
    .selectFrom('device_versions as dv')
    .innerJoin('devices as d', 'd.id', 'dv.device_id')
    .select(['dv.state'])
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('d.group_id', '=', groupId)
    .groupBy('dv.state')
    .execute();
  return new Map(rows.map((r) => [r.state, Number(r.n)]));
}

export async function countFieldVersionsByState(ex: RotationExecutor, groupId: string): Promise<Map<VersionState, number>> {
  const rows = await ex
    .selectFrom('field_versions as fv')
    .innerJoin('devices as d', 'd.id', 'fv.device_id')
    .select(['fv.state'])
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('d.group_id', '=', groupId)
    .groupBy('fv.state')
    .execute();
  return new Map(rows.map((r) => [r.state, Number(r.n)]));
}

/** Field versions with material wrapped under a device version, per state of that device version. */
export async function countFieldChildrenByParentState(ex: RotationExecutor, groupId: string): Promise<Map<VersionState, { fieldVersions: number; deviceVersions: number }>> {
  const rows = await ex
    .selectFrom('field_versions as fv')
    .innerJoin('devices as d', 'd.id', 'fv.device_id')
    .innerJoin('device_versions as dv', (j) => j.onRef('dv.device_id', '=', 'fv.device_id').onRef('dv.version', '=', 'fv.parent_version'))
    .select(['dv.state'])
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .select(sql<number>`count(distinct (dv.device_id, dv.version))`.as('parents'))
    .where('d.group_id', '=', groupId)
    .where('fv.wrapped_key', 'is not', null)
    .groupBy('dv.state')
    .execute();
  return new Map(rows.map((r) => [r.state, { fieldVersions: Number(r.n), deviceVersions: Number(r.parents) }]));
}

/**
 * Per group: primary device DEK versions and primary field key versions created at or before
 * their cutoff (due for rotation by policy).
 */
export async function countDuePrimaries(
  ex: RotationExecutor,
  cutoffs: ReadonlyArray<{ groupId: string; device: Date; field: Date }>,
): Promise<Map<string, { devices: number; fields: number }>> {
  const out = new Map<string, { devices: number; fields: number }>();
  if (cutoffs.length === 0) return out;
  for (const c of cutoffs) out.set(c.groupId, { devices: 0, fields: 0 });
  const values = sql.join(cutoffs.map((c) => sql`(${c.groupId}::text, ${c.device}::timestamptz, ${c.field}::timestamptz)`));
  const devices = await sql<{ group_id: string; n: number }>`
    select c.group_id, count(*) as n
      from (values ${values}) as c(group_id, device_cutoff, field_cutoff)
      join devices d on d.group_id = c.group_id
      join device_versions dv on dv.device_id = d.id
     where dv.state = 'primary' and dv.created_at <= c.device_cutoff
     group by c.group_id`.execute(ex);
  const fields = await sql<{ group_id: string; n: number }>`
    select c.group_id, count(*) as n
      from (values ${values}) as c(group_id, device_cutoff, field_cutoff)
      join devices d on d.group_id = c.group_id
      join field_versions fv on fv.device_id = d.id
     where fv.state = 'primary' and fv.created_at <= c.field_cutoff
     group by c.group_id`.execute(ex);
  for (const r of devices.rows) out.set(r.group_id, { devices: Number(r.n), fields: out.get(r.group_id)?.fields ?? 0 });
  for (const r of fields.rows) out.set(r.group_id, { devices: out.get(r.group_id)?.devices ?? 0, fields: Number(r.n) });
  return out;
}
