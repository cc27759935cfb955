/**
 * `enqueueKeyUpdate`: the one call every place that creates a device DEK or field key version,
 * or changes which version a device must use (rotation, rollout wave, rollback, disable),
 * makes INSIDE ITS OWN TRANSACTION, after the version rows are written:
 *
 *   await enqueueKeyUpdate(trx, { deviceId, kind: 'device', version, state: 'primary' });
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
const TRANSPORT_PREFERENCE: readonly VersionState[] = [...TRUSTED_TRANSPORT, 'disabled'];

/** Write one outbox row in the caller's transaction (see the file comment). */
export async function enqueueKeyUpdate(trx: Transaction<DB> | Kysely<DB>, update: KeyUpdate): Promise<EnqueuedUpdate> {
  if (!trx.isTransaction) throw new Error('enqueueKeyUpdate must run inside the transaction that changes the version');
  const ex = distributionDb(trx);
  if (update.kind === 'field' ? !update.field : update.field !== undefined) throw new Error('enqueueKeyUpdate: a field key update needs its field, a device DEK update has none');
  const field = update.kind === 'field' ? (update.field as string) : '';

  if (!(await repo.lockDevice(ex, update.deviceId))) throw new Error(`enqueueKeyUpdate: device ${update.deviceId} does not exist`);
  const subject = await repo.findVersionState(ex, update.deviceId, update.kind, field, update.version);
  if (!subject) throw new Error(`enqueueKeyUpdate: ${update.kind} version ${update.version} of ${update.deviceId} does not exist`);

  // device DEK v1 is the enrolment key, provisioned with the device: never sent over MQTT
  const enrolmentKey = update.kind === 'device' && update.version === 1;
  const withKey =
    KEY_STATES.includes(update.state) &&
    subject.has_material &&
    !enrolmentKey &&
    !(await repo.keyAlreadyQueued(ex, update.deviceId, update.kind, field, update.version));

  const candidates = (await repo.listDeviceVersionStates(ex, update.deviceId)).filter(
    (v) => v.has_material && TRANSPORT_PREFERENCE.includes(v.state) && !(update.kind === 'device' && v.version === update.version),
  );
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

  const id = await repo.insertOutboxRow(ex, {
    device_id: update.deviceId,
    kind: update.kind,
    field,
    version: update.version,
    state: update.state,
    not_before: update.notBefore ?? null,
    wrapped_by: wrappedBy,
    with_key: withKey,
  });
  return { id, wrappedBy, withKey };
}
