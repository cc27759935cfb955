/**
 * SQL of the key hierarchy. Every function takes an executor (the Kysely handle or the
 * caller's transaction): services decide the transaction boundaries.
 */
import { sql, type Insertable, type Selectable } from 'kysely';
import type { Executor } from '../db/database.js';
import type {
  DeviceVersionsTable,
  FieldVersionsTable,
  GroupVersionsTable,
  KeyGroupsTable,
  VersionState,
} from '../db/tables.js';

export type GroupRow = Selectable<KeyGroupsTable>;
export type GroupVersionRow = Selectable<GroupVersionsTable>;
// the columns the hierarchy reads (the crypto-shred bookkeeping lives in lifecycle.repository.ts)
export type DeviceVersionRow = Omit<Selectable<DeviceVersionsTable>, 'state_before_destroy' | 'state_until_before_destroy'>;
export type FieldVersionRow = Omit<Selectable<FieldVersionsTable>, 'state_before_destroy' | 'state_until_before_destroy'>;

/** States whose material may be delivered to backends (DESIGN §2). */
export { DELIVERABLE_STATES } from './lifecycle.js';

// ---------- groups ----------

export async function insertGroup(ex: Executor, group: Insertable<KeyGroupsTable>): Promise<void> {
  await ex.insertInto('key_groups').values(group).execute();
}

export async function insertGroupVersion(ex: Executor, version: Insertable<GroupVersionsTable>): Promise<void> {
  await ex.insertInto('group_versions').values(version).execute();
}

export async function findGroup(ex: Executor, groupId: string): Promise<GroupRow | undefined> {
  return ex.selectFrom('key_groups').select(['id', 'device_type', 'region', 'created_at']).where('id', '=', groupId).executeTakeFirst();
}

export async function listGroups(ex: Executor, after: string | undefined, limit: number): Promise<GroupRow[]> {
  let query = ex.selectFrom('key_groups').select(['id', 'device_type', 'region', 'created_at']).orderBy('id').limit(limit);
  if (after !== undefined) query = query.where('id', '>', after);
  return query.execute();
}

export async function listGroupVersions(ex: Executor, groupIds: readonly string[]): Promise<GroupVersionRow[]> {
  if (groupIds.length === 0) return [];
  return ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'state', 'wrapped_key', 'kek_version', 'created_at', 'state_changed_at', 'state_until'])
    .where('group_id', 'in', groupIds)
    .orderBy('group_id')
    .orderBy('version')
    .execute();
}

export async function findGroupVersion(ex: Executor, groupId: string, version: number): Promise<GroupVersionRow | undefined> {
  return ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'state', 'wrapped_key', 'kek_version', 'created_at', 'state_changed_at', 'state_until'])
    .where('group_id', '=', groupId)
    .where('version', '=', version)
    .executeTakeFirst();
}

export async function findPrimaryGroupVersion(ex: Executor, groupId: string): Promise<GroupVersionRow | undefined> {
  return ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'state', 'wrapped_key', 'kek_version', 'created_at', 'state_changed_at', 'state_until'])
    .where('group_id', '=', groupId)
    .where('state', '=', 'primary')
    .executeTakeFirst();
}

// ---------- devices ----------

/**
 * New devices of one group, set-based: ONE statement for all the ids (an array parameter
 * unnested by the server), however many there are. An id that already exists fails the
 * statement with a unique violation on `devices_pkey` (isExistingDeviceError); nothing is
 * written then, and the caller's transaction is aborted.
 */
export async function insertDeviceRows(ex: Executor, groupId: string, ids: readonly string[], now: Date): Promise<void> {
  await sql`insert into devices (id, group_id, created_at)
            select u.id, ${groupId}, ${now}::timestamptz from unnest(${ids}::text[]) as u(id)`.execute(ex);
}

/**
 * Version 1 (primary) of each new device, set-based: `wrapped` holds the blobs of `ids[i]`
 * end to end, `blobBytes` each, sent as ONE binary bytea parameter and cut per row by the
 * server (the i-th id gets the i-th blob: `with ordinality` keeps the array order).
 */
export async function insertFirstDeviceVersions(
  ex: Executor,
  ids: readonly string[],
  wrapped: Buffer,
  blobBytes: number,
  parentVersion: number,
  now: Date,
): Promise<void> {
  if (wrapped.length !== ids.length * blobBytes) throw new Error('insertFirstDeviceVersions: one blob per id expected');
  await sql`insert into device_versions (device_id, version, state, wrapped_key, parent_version, created_at, state_changed_at, state_until)
            select u.id, 1, 'primary', substring(${wrapped}::bytea from ((u.n - 1) * ${blobBytes}::int + 1)::int for ${blobBytes}::int),
                   ${parentVersion}::int, ${now}::timestamptz, ${now}::timestamptz, null
            from unnest(${ids}::text[]) with ordinality as u(id, n)`.execute(ex);
}

/** The error insertDeviceRows raises when an id is already enrolled. */
export function isExistingDeviceError(error: unknown): boolean {
  const e = error as { code?: unknown; constraint?: unknown } | null;
  return e?.code === '23505' && (e.constraint === undefined || e.constraint === 'devices_pkey');
}

export async function findExistingDeviceIds(ex: Executor, ids: readonly string[]): Promise<string[]> {
  if (ids.length === 0) return [];
  const { rows } = await sql<{ id: string }>`select id from devices where id = any(${ids}::text[]) order by id`.execute(ex);
  return rows.map((row) => row.id);
}

export async function findDevice(ex: Executor, deviceId: string): Promise<{ id: string; group_id: string; created_at: Date } | undefined> {
  return ex.selectFrom('devices').select(['id', 'group_id', 'created_at']).where('id', '=', deviceId).executeTakeFirst();
}

export async function findDevices(ex: Executor, deviceIds: readonly string[]): Promise<Array<{ id: string; group_id: string }>> {
  if (deviceIds.length === 0) return [];
  return ex.selectFrom('devices').select(['id', 'group_id']).where('id', 'in', deviceIds).execute();
}

const DEVICE_VERSION_COLUMNS = ['device_id', 'version', 'state', 'wrapped_key', 'parent_version', 'created_at', 'state_changed_at', 'state_until'] as const;

export async function listDeviceVersions(ex: Executor, deviceIds: readonly string[]): Promise<DeviceVersionRow[]> {
  if (deviceIds.length === 0) return [];
  return ex
    .selectFrom('device_versions')
    .select(DEVICE_VERSION_COLUMNS)
    .where('device_id', 'in', deviceIds)
    .orderBy('device_id')
    .orderBy('version')
    .execute();
}

export async function listGroupVersionsByPairs(ex: Executor, pairs: ReadonlyArray<{ groupId: string; version: number }>): Promise<GroupVersionRow[]> {
  if (pairs.length === 0) return [];
  return ex
    .selectFrom('group_versions')
    .select(['group_id', 'version', 'state', 'wrapped_key', 'kek_version', 'created_at', 'state_changed_at', 'state_until'])
    .where((eb) => eb.or(pairs.map((p) => eb.and([eb('group_id', '=', p.groupId), eb('version', '=', p.version)]))))
    .execute();
}

export async function findPrimaryDeviceVersion(ex: Executor, deviceId: string): Promise<DeviceVersionRow | undefined> {
  return ex
    .selectFrom('device_versions')
    .select(DEVICE_VERSION_COLUMNS)
    .where('device_id', '=', deviceId)
    .where('state', '=', 'primary')
    .executeTakeFirst();
}

// ---------- field keys ----------

export async function insertFieldKey(ex: Executor, deviceId: string, field: string, version: Insertable<FieldVersionsTable>): Promise<void> {
  await ex.insertInto('field_keys').values({ device_id: deviceId, field }).execute();
  await ex.insertInto('field_versions').values(version).execute();
}

const FIELD_VERSION_COLUMNS = ['device_id', 'field', 'version', 'state', 'wrapped_key', 'parent_version', 'created_at', 'state_changed_at', 'state_until'] as const;

export async function listFieldVersions(ex: Executor, deviceIds: readonly string[], field?: string): Promise<FieldVersionRow[]> {
  if (deviceIds.length === 0) return [];
  let query = ex.selectFrom('field_versions').select(FIELD_VERSION_COLUMNS).where('device_id', 'in', deviceIds);
  if (field !== undefined) query = query.where('field', '=', field);
  return query.orderBy('device_id').orderBy('field').orderBy('version').execute();
}

export async function fieldKeyExists(ex: Executor, deviceId: string, field: string): Promise<boolean> {
  const row = await ex.selectFrom('field_keys').select('field').where('device_id', '=', deviceId).where('field', '=', field).executeTakeFirst();
  return row !== undefined;
}
