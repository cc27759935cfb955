/**
 * `enqueueKeyUpdate`: the one call every place that creates a device DEK or field key version,
 * or changes which version a device must use (rotation, rollout wave, rollback, disable),
 * makes INSIDE ITS OWN TRANSACTION, after the version rows are written:
 *
 *   await enqueueKeyUpdate(trx, { deviceId, kind: 'device', version, state: 'primary' });
 *
 * `enqueueKeyUpdates(trx, updates)` does the same for a whole chunk (a rollout wave) in a
 * constant number of statements; both apply exactly the same rules (one code path).
 *
 * It writes one outbox row and nothing else: ids, versions, state, not-before, and the device
 * DEK version the message will be sealed under. No key material is read, unwrapped or stored
 * here (the publisher builds the sealed payload at publish time, outside any transaction), so
 * the caller's transaction never waits on the KEK provider.
 *
 * The caller holds the device's row lock (every version-creating path does: version numbers
 * are allocated under it). That lock also orders the device's outbox rows: ids increase in
 * commit order per device, which is the order the publisher delivers them in.
 *
 * Transport key (`wrapped_by`): a device DEK version the device already holds and that is not
 * the subject itself, preferring, in order, the primary, the newest `grace` (the previous
 * primary right after a rotation), `pending`, `decrypt_only`. A state change without a key that
 * finds none of those is sealed under the subject version itself. Only as a last resort, a
 * `disabled` version: a new key after a compromise rotation of a device that holds nothing
 * else (whoever holds a compromised key can read what is sent under it: re-provision such a
 * device out of band). Every device version but the enrolment one reached the device through
 * an earlier outbox row, delivered first.
 *
 * Key material in the message (`with_key`): only for a version in `pending`, `primary` or
 * `grace` whose key has not been queued for the device before and is not device DEK v1 (the
 * enrolment key, provisioned with the device, never sent over MQTT). A later state change of the
 * same version (pending → primary, grace → primary after a rollback, → disabled) carries no
 * key: the device has it, and re-sending it under another key would only widen who can read it.
 */
import { sql, type Kysely, type Transaction } from 'kysely';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import { ConflictError } from '../http/errors.js';
import * as repo from './distribution.repository.js';
import type { KeyKind } from './distribution.tables.js';

export interface KeyUpdate {
  deviceId: string;
  kind: KeyKind;
  /** required for kind 'field' */
  field?: string | undefined;
  version: number;
  /** the version's state as of this transaction */
  state: VersionState;
  /** when a pending version becomes usable (staggered rollouts) */
  notBefore?: Date | null | undefined;
}

export interface EnqueuedUpdate {
  id: number;
  wrappedBy: number;
  withKey: boolean;
}

const KEY_STATES: readonly VersionState[] = ['pending', 'primary', 'grace'];
const TRUSTED_TRANSPORT: readonly VersionState[] = ['primary', 'grace', 'pending', 'decrypt_only'];

/** Write one outbox row in the caller's transaction (see the file comment). */
export async function enqueueKeyUpdate(trx: Transaction<DB> | Kysely<DB>, update: KeyUpdate): Promise<EnqueuedUpdate> {
  return (await enqueueKeyUpdates(trx, [update]))[0] as EnqueuedUpdate;
}

/**
 * Write one outbox row per update, in the given order (per device, that is the order the
 * device receives them), in the caller's transaction, with a constant number of statements.
 */
export async function enqueueKeyUpdates(trx: Transaction<DB> | Kysely<DB>, updates: readonly KeyUpdate[]): Promise<EnqueuedUpdate[]> {
  if (!trx.isTransaction) throw new Error('enqueueKeyUpdate must run inside the transaction that changes the version');
  if (updates.length === 0) return [];
  for (const u of updates) {
    if (u.kind === 'field' ? !u.field : u.field !== undefined) throw new Error('enqueueKeyUpdate: a field key update needs its field, a device DEK update has none');
  }
  const fieldOf = (u: KeyUpdate) => (u.kind === 'field' ? (u.field as string) : '');
  const keyOf = (deviceId: string, kind: KeyKind, field: string, version: number) => `${deviceId}\u0000${kind}\u0000${field}\u0000${version}`;
  const deviceIds = [...new Set(updates.map((u) => u.deviceId))].sort();

  // three statements whatever the number of updates, each with a handful of array parameters
  // (a chunk of a rollout wave is thousands of updates: lists of literals cost the server more
  // to parse and plan than the lookups themselves). The lock is its own statement: the reads
  // after it must see what a transaction we waited for committed (a new snapshot).
  const locked = new Set(await lockDeviceRows(trx, deviceIds));
  const missing = deviceIds.find((id) => !locked.has(id));
  if (missing !== undefined) throw new Error(`enqueueKeyUpdate: device ${missing} does not exist`);

  const fieldUpdates = updates.filter((u) => u.kind === 'field');
  const state = await readEnqueueState(trx, {
    deviceIds,
    fieldDeviceIds: [...new Set(fieldUpdates.map((u) => u.deviceId))],
    fields: [...new Set(fieldUpdates.map(fieldOf))],
    versions: [...new Set(updates.map((u) => u.version))],
  });

  const versionsByDevice = new Map<string, repo.VersionMaterialState[]>();
  const subjects = new Map<string, repo.VersionMaterialState>();
  for (const v of state.deviceVersions) {
    const list = versionsByDevice.get(v.device_id);
    if (list) list.push(v);
    else versionsByDevice.set(v.device_id, [v]);
    subjects.set(keyOf(v.device_id, 'device', '', v.version), v);
  }
  // newest first per device (decide's preference order)
  for (const list of versionsByDevice.values()) if (list.length > 1) list.sort((a, b) => b.version - a.version);
  for (const v of state.fieldVersions) subjects.set(keyOf(v.device_id, 'field', v.field, v.version), v);
  const alreadyQueued = new Set(state.queued.map((q) => keyOf(q.device_id, q.kind, q.field, q.version)));

  const rows: repo.NewOutboxRow[] = updates.map((update) => {
    const field = fieldOf(update);
    const key = keyOf(update.deviceId, update.kind, field, update.version);
    const subject = subjects.get(key);
    if (!subject) throw new Error(`enqueueKeyUpdate: ${update.kind} version ${update.version} of ${update.deviceId} does not exist`);
    const { withKey, wrappedBy } = decide(update, subject, versionsByDevice.get(update.deviceId) ?? [], alreadyQueued.has(key));
    if (withKey) alreadyQueued.add(key);
    return {
      device_id: update.deviceId,
      kind: update.kind,
      field,
      version: update.version,
      state: update.state,
      not_before: update.notBefore ?? null,
      wrapped_by: wrappedBy,
      with_key: withKey,
    };
  });
  const ids = await insertRows(trx, rows);
  return rows.map((row, i) => ({ id: ids[i] as number, wrappedBy: row.wrapped_by, withKey: row.with_key }));
}

// ---------- the SQL of enqueueKeyUpdates ----------

/**
 * Lock the device rows (in id order) against other enqueuers until commit, so each device's
 * outbox ids follow commit order. FOR NO KEY UPDATE: it does not conflict with the KEY SHARE a
 * foreign-key check takes (a field key insert), so two such transactions cannot deadlock on it;
 * a caller already holding FOR UPDATE (the lifecycle service, a rollout chunk) passes straight
 * through. Returns the ids found. `ids` sorted.
 */
async function lockDeviceRows(ex: Transaction<DB> | Kysely<DB>, ids: readonly string[]): Promise<string[]> {
  const { rows } = await sql<{ id: string }>`select id from devices where id = any(${ids}::text[]) order by id for no key update`.execute(ex);
  return rows.map((r) => r.id);
}

interface EnqueueState {
  /** device DEK versions of the devices (any order) */
  deviceVersions: repo.VersionMaterialState[];
  fieldVersions: repo.VersionMaterialState[];
  /** keys already queued (or sent) to these devices in an earlier message, among these versions */
  queued: Array<{ device_id: string; kind: KeyKind; field: string; version: number }>;
}

/** What the rules need, as of this transaction, in one round trip. */
async function readEnqueueState(
  ex: Transaction<DB> | Kysely<DB>,
  q: { deviceIds: readonly string[]; fieldDeviceIds: readonly string[]; fields: readonly string[]; versions: readonly number[] },
): Promise<EnqueueState> {
  const { rows } = await sql<{ src: 'd' | 'f' | 'q'; device_id: string; kind: KeyKind; field: string; version: number; state: VersionState | null; has_material: boolean | null }>`
    select 'd' as src, device_id, 'device' as kind, '' as field, version, state, wrapped_key is not null as has_material
      from device_versions where device_id = any(${q.deviceIds}::text[])
    union all
    select 'f', device_id, 'field', field, version, state, wrapped_key is not null
      from field_versions where device_id = any(${q.fieldDeviceIds}::text[]) and field = any(${q.fields}::text[])
    union all
    select distinct 'q', device_id, kind, field, version, null::text, null::boolean
      from key_outbox
     where device_id = any(${q.deviceIds}::text[]) and version = any(${q.versions}::int[]) and with_key and status <> 'dropped'`.execute(ex);
  const out: EnqueueState = { deviceVersions: [], fieldVersions: [], queued: [] };
  for (const r of rows) {
    if (r.src === 'q') out.queued.push({ device_id: r.device_id, kind: r.kind, field: r.field, version: r.version });
    else (r.src === 'd' ? out.deviceVersions : out.fieldVersions).push({ device_id: r.device_id, field: r.field, version: r.version, state: r.state as VersionState, has_material: r.has_material === true });
  }
  return out;
}

/** Insert rows in the given order (ids ascend in that order, one statement); returns their ids, in order. */
async function insertRows(ex: Transaction<DB> | Kysely<DB>, rows: readonly repo.NewOutboxRow[]): Promise<number[]> {
  const { rows: inserted } = await sql<{ id: number | string }>`
    insert into key_outbox (device_id, kind, field, version, state, not_before, wrapped_by, with_key)
    select u.device_id, u.kind, u.field, u.version, u.state, u.not_before, u.wrapped_by, u.with_key
      from unnest(${rows.map((r) => r.device_id)}::text[], ${rows.map((r) => r.kind)}::text[], ${rows.map((r) => r.field)}::text[],
                  ${rows.map((r) => r.version)}::int[], ${rows.map((r) => r.state)}::text[], ${rows.map((r) => r.not_before)}::timestamptz[],
                  ${rows.map((r) => r.wrapped_by)}::int[], ${rows.map((r) => r.with_key)}::boolean[])
           with ordinality as u(device_id, kind, field, version, state, not_before, wrapped_by, with_key, ord)
     order by u.ord
    returning id`.execute(ex);
  // the serial values are taken in the order rows reach the insert (the ORDER BY); sorting makes that explicit
  return inserted.map((r) => Number(r.id)).sort((a, b) => a - b);
}

/**
 * The rules of the file comment, for one update. `versions`: the device's DEK versions as of
 * this transaction, newest first.
 */
function decide(update: KeyUpdate, subject: repo.VersionMaterialState, versions: readonly repo.VersionMaterialState[], keyQueuedBefore: boolean): { withKey: boolean; wrappedBy: number } {
  // device DEK v1 is the enrolment key, provisioned with the device: never sent over MQTT
  const enrolmentKey = update.kind === 'device' && update.version === 1;
  const withKey = KEY_STATES.includes(update.state) && subject.has_material && !enrolmentKey && !keyQueuedBefore;

  const candidates = versions.filter((v) => v.has_material && !(update.kind === 'device' && v.version === update.version));
  // newest first within each state (the list comes newest first)
  const best = (states: readonly VersionState[]) => states.map((state) => candidates.find((v) => v.state === state)).find((v) => v !== undefined)?.version;
  let wrappedBy = best(TRUSTED_TRANSPORT);
  if (wrappedBy === undefined && !withKey && update.kind === 'device' && subject.has_material) {
    // a state change with nothing but revoked versions besides the subject: authenticated under
    // the subject itself (the device holds it), never under a version that may be compromised
    wrappedBy = update.version;
  }
  wrappedBy ??= best(['disabled']);
  if (wrappedBy === undefined) throw new ConflictError(`Device ${update.deviceId} holds no device DEK version a key update could be sealed under`, 'no_transport_key');
  return { withKey, wrappedBy };
}
