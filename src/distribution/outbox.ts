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
import type { Kysely, Transaction } from 'kysely';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import { ConflictError } from '../http/errors.js';
import * as repo from './distribution.repository.js';
import { distributionDb, type KeyKind } from './distribution.tables.js';

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
  const ex = distributionDb(trx);
  const fieldOf = (u: KeyUpdate) => (u.kind === 'field' ? (u.field as string) : '');
  const keyOf = (deviceId: string, kind: KeyKind, field: string, version: number) => `${deviceId}\u0000${kind}\u0000${field}\u0000${version}`;
  const deviceIds = [...new Set(updates.map((u) => u.deviceId))].sort();

  const locked = new Set(await repo.lockDevices(ex, deviceIds));
  const missing = deviceIds.find((id) => !locked.has(id));
  if (missing !== undefined) throw new Error(`enqueueKeyUpdate: device ${missing} does not exist`);

  const deviceVersions = await repo.listDeviceVersionStatesOf(ex, deviceIds);
  const fieldUpdates = updates.filter((u) => u.kind === 'field');
  const fieldVersions = await repo.listFieldVersionStatesOf(ex, [...new Set(fieldUpdates.map((u) => u.deviceId))], [...new Set(fieldUpdates.map(fieldOf))]);
  const queued = await repo.listQueuedKeys(ex, deviceIds, [...new Set(updates.map((u) => u.version))]);

  const versionsByDevice = new Map<string, repo.VersionMaterialState[]>();
  const subjects = new Map<string, repo.VersionMaterialState>();
  for (const v of deviceVersions) {
    const list = versionsByDevice.get(v.device_id);
    if (list) list.push(v);
    else versionsByDevice.set(v.device_id, [v]);
    subjects.set(keyOf(v.device_id, 'device', '', v.version), v);
  }
  for (const v of fieldVersions) subjects.set(keyOf(v.device_id, 'field', v.field, v.version), v);
  const alreadyQueued = new Set(queued.map((q) => keyOf(q.device_id, q.kind, q.field, q.version)));

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
  const ids = await repo.insertOutboxRows(ex, rows);
  return rows.map((row, i) => ({ id: ids[i] as number, wrappedBy: row.wrapped_by, withKey: row.with_key }));
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
