/**
 * Group DEK rotation (DESIGN §3).
 *
 *   start    a new group version becomes `primary` (fresh material, wrapped by the KEK before
 *            the transaction opens); the old primary goes to `decrypt_only`, not `grace`:
 *            nothing but keystrata encrypts with a group DEK, and from this commit on every new
 *            device DEK is wrapped under the new primary, so the old version is only needed to
 *            unwrap the children still under it. One transaction, with its audit event, after
 *            locking the group row and checking the primary is still the one we read: two
 *            concurrent starts make one new version, never two.
 *   rewrap   every device version of the group still wrapped under another group version is
 *            unwrapped with that version and wrapped again under the primary — same device key
 *            material, AAD of the new parent — in chunks of `FOR UPDATE SKIP LOCKED` rows, one
 *            transaction each with its audit events. What is left is read from the rows
 *            (`parent_version` ≠ primary), so any later run resumes, and two runners split the
 *            work instead of repeating it.
 *   retire   an old version with no child wrapped under it and whose retention (group policy)
 *            has run out is scheduled for destruction (`destroy_scheduled`, the policy's
 *            waiting period), then destroyed: material erased, row and audit trail kept. Both
 *            steps re-count the children under a row lock.
 */
import type { Kysely } from 'kysely';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { unwrapKey, wrapKey } from '../crypto/aead.js';
import { deviceBinding } from '../crypto/binding.js';
import type { DB, Executor } from '../db/database.js';
import { ConflictError, NotFoundError, UnavailableError } from '../http/errors.js';
import { admitKekBlob, KEK_FENCE_ATTEMPTS } from '../keys/kek-fence.repository.js';
import type { KeyMaterial } from '../keys/key-material.js';
import * as keys from '../keys/key.repository.js';
import type { Actor } from '../keys/key.service.js';
import { assertTransition } from '../keys/lifecycle.js';
import { addDays } from './policy.defaults.js';
import type { EffectivePolicy } from './policy.service.js';
import * as repo from './rotation.repository.js';
import { rotationDb, type RotationDB } from './rotation.tables.js';

export const DEFAULT_CHILD_CHUNK = 500;
const MAX_LISTED_FAILURES = 100;

export interface StartResult {
  groupId: string;
  fromVersion: number;
  toVersion: number;
  kekVersion: number | null;
}

export interface ChildFailure {
  deviceId: string;
  version: number;
  parentVersion: number;
  error: string;
}

export interface RewrapResult {
  /** device versions moved to the primary (dry run: that would be moved) */
  rewrapped: number;
  failed: number;
  failures: ChildFailure[];
  chunks: number;
  /** device versions still wrapped under another group version */
  remaining: number;
}

export interface RetireResult {
  groupId: string;
  version: number;
  from: 'decrypt_only' | 'destroy_scheduled';
  to: 'destroy_scheduled' | 'destroyed';
  destroyAfter?: string;
}

export interface GroupRotationHooks {
  /** after each committed chunk of child rewraps (tests inject failures here) */
  afterChildChunk?(info: { groupId: string; chunk: number; rewrapped: number }): void | Promise<void>;
}

export interface GroupRotationService {
  /** POST /v1/groups/{id}/rotate: start, then move up to `limit` children (the cron entry finishes the rest). */
  rotate(who: Actor, groupId: string, options: { limit: number }): Promise<StartResult & { rewrap: RewrapResult }>;
  /** A new primary. With `expectedPrimary`, only if that is still the primary (else undefined: someone else rotated). */
  start(who: Actor, groupId: string, options: { reason: 'manual' | 'policy'; expectedPrimary?: number; dryRun?: boolean }): Promise<StartResult | undefined>;
  rewrapChildren(who: Actor, groupId: string, options: { limit: number; dryRun?: boolean }): Promise<RewrapResult>;
  retire(who: Actor, groupId: string, policy: EffectivePolicy, options: { dryRun?: boolean }): Promise<RetireResult[]>;
}

export function createGroupRotationService(deps: {
  db: Kysely<DB>;
  material: KeyMaterial;
  audit: AuditSink;
  clock: Clock;
  chunkSize?: number | undefined;
  hooks?: GroupRotationHooks | undefined;
}): GroupRotationService {
  const { material, audit, clock } = deps;
  const chunkSize = deps.chunkSize ?? DEFAULT_CHILD_CHUNK;
  if (!Number.isInteger(chunkSize) || chunkSize < 1) throw new Error('The child rewrap chunk must be a positive integer');
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));
  const ex = (trx: unknown) => trx as Executor;
  const event = (who: Actor, e: Omit<AuditEventInput, 'actor' | 'requestId'>): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });

  async function primaryOf(groupId: string): Promise<keys.GroupVersionRow> {
    const primary = await keys.findPrimaryGroupVersion(deps.db, groupId);
    if (primary) return primary;
    if (!(await keys.findGroup(deps.db, groupId))) throw new NotFoundError(`Group ${groupId} not found`);
    throw new ConflictError(`Group ${groupId} has no primary version`, 'no_primary_version');
  }

  async function start(who: Actor, groupId: string, options: { reason: 'manual' | 'policy'; expectedPrimary?: number; dryRun?: boolean }): Promise<StartResult | undefined> {
    const primary = await primaryOf(groupId);
    if (options.expectedPrimary !== undefined && primary.version !== options.expectedPrimary) return undefined;
    assertTransition(`Group ${groupId} v${primary.version}`, 'primary', 'decrypt_only');
    const next = (await repo.maxGroupVersion(db(), groupId)) + 1;
    if (options.dryRun) return { groupId, fromVersion: primary.version, toVersion: next, kekVersion: null };

    let started: boolean | 'stale_kek' = 'stale_kek';
    let kekVersion = 0;
    for (let attempt = 1; started === 'stale_kek'; attempt += 1) {
      // a KEK rotation overtook the previous wrap: wrap again under the version it made current
      if (attempt > KEK_FENCE_ATTEMPTS) throw new UnavailableError('The KEK is being rotated; retry shortly');
      const wrap = await material.newGroupKey(groupId, next);
      kekVersion = wrap.kekVersion;
      started = await insertRotated(who, groupId, primary.version, next, wrap, options);
    }
    if (!started) return undefined;
    // the old version now only unwraps children being moved: drop it, the rewrap reloads it
    material.cache.invalidate('group', groupId, primary.version);
    return { groupId, fromVersion: primary.version, toVersion: next, kekVersion };
  }

  /** The new primary and the old one's retirement in one transaction; `stale_kek`: nothing stored, wrap again. */
  async function insertRotated(
    who: Actor,
    groupId: string,
    from: number,
    next: number,
    wrap: { wrapped: string; kekVersion: number; kekName: string; key: Buffer },
    options: { reason: 'manual' | 'policy'; expectedPrimary?: number },
  ): Promise<boolean | 'stale_kek'> {
    // KEK call before the transaction (no connection waits on Vault); the KEK fence admits the blob
    const { wrapped, kekVersion, kekName, key } = wrap;
    key.fill(0);
    const primary = { version: from };
    const now = clock.now();
    return db()
      .transaction()
      .execute(async (trx): Promise<boolean | 'stale_kek'> => {
        if (!(await admitKekBlob(ex(trx), kekName, kekVersion))) return 'stale_kek';
        if (!(await repo.lockGroup(trx, groupId))) throw new NotFoundError(`Group ${groupId} not found`);
        const current = await keys.findPrimaryGroupVersion(ex(trx), groupId);
        if (!current || current.version !== primary.version || (await repo.maxGroupVersion(trx, groupId)) >= next) {
          if (options.expectedPrimary !== undefined) return false;
          throw new ConflictError(`Group ${groupId} was rotated by another request meanwhile; read it and retry`, 'rotated_concurrently');
        }
        if (!(await repo.updateGroupVersionState(trx, groupId, primary.version, 'primary', { state: 'decrypt_only', state_changed_at: now, state_until: null }))) {
          throw new ConflictError(`Group ${groupId} v${primary.version} is no longer primary`, 'rotated_concurrently');
        }
        await keys.insertGroupVersion(ex(trx), {
          group_id: groupId,
          version: next,
          state: 'primary',
          wrapped_key: wrapped,
          kek_version: kekVersion,
          created_at: now,
          state_changed_at: now,
          state_until: null,
        });
        await audit.record(ex(trx), [
          event(who, {
            action: 'group.rotate',
            outcome: 'success',
            keyId: `group:${groupId}`,
            details: { fromVersion: primary.version, toVersion: next, kekVersion, previousState: 'decrypt_only', reason: options.reason },
          }),
        ]);
        return true;
      });
  }

  async function rewrapChildren(who: Actor, groupId: string, options: { limit: number; dryRun?: boolean }): Promise<RewrapResult> {
    const result: RewrapResult = { rewrapped: 0, failed: 0, failures: [], chunks: 0, remaining: 0 };
    const primary = await keys.findPrimaryGroupVersion(deps.db, groupId);
    if (!primary) return result;
    const byParent = await repo.countChildrenByParent(db(), groupId);
    const pending = [...byParent].filter(([parent]) => parent !== primary.version);
    const total = pending.reduce((sum, [, n]) => sum + n, 0);
    if (options.dryRun || total === 0 || options.limit <= 0) {
      result.rewrapped = Math.min(total, options.limit);
      result.chunks = Math.ceil(result.rewrapped / chunkSize);
      result.remaining = total - result.rewrapped;
      return result;
    }

    // Parent keys are unwrapped (KEK calls) before any transaction opens, and zeroed at the end.
    const parentKeys = new Map<number, Buffer>();
    const parentErrors = new Map<number, string>();
    const versions = await keys.listGroupVersions(deps.db, [groupId]);
    let newKey: Buffer | undefined;
    try {
      newKey = await material.groupKey(groupId, primary.version, primary.wrapped_key);
      for (const [parent] of pending) {
        const row = versions.find((v) => v.version === parent);
        if (!row || row.wrapped_key === null) {
          parentErrors.set(parent, `group version ${parent} has no material`);
          continue;
        }
        try {
          parentKeys.set(parent, await material.groupKey(groupId, parent, row.wrapped_key));
        } catch (error) {
          if (!(error instanceof Error) || (error as { status?: number }).status === 503) throw error;
          parentErrors.set(parent, `group version ${parent} failed to unwrap`);
        }
      }

      let after: { deviceId: string; version: number } | undefined;
      let budget = options.limit;
      while (budget > 0) {
        const chunk = await moveChunk(who, groupId, primary.version, newKey, parentKeys, parentErrors, after, Math.min(chunkSize, budget), result);
        if (!chunk) break;
        after = chunk.last;
        budget -= chunk.size;
        result.chunks += 1;
        await deps.hooks?.afterChildChunk?.({ groupId, chunk: result.chunks, rewrapped: result.rewrapped });
      }
    } finally {
      newKey?.fill(0);
      for (const key of parentKeys.values()) key.fill(0);
    }
    const left = await repo.countChildrenByParent(db(), groupId);
    result.remaining = [...left].filter(([parent]) => parent !== primary.version).reduce((sum, [, n]) => sum + n, 0);
    return result;
  }

  /** One chunk in one transaction: lock, move, audit, commit. Undefined when nothing is left (for this runner). */
  async function moveChunk(
    who: Actor,
    groupId: string,
    primaryVersion: number,
    newKey: Buffer,
    parentKeys: Map<number, Buffer>,
    parentErrors: Map<number, string>,
    after: { deviceId: string; version: number } | undefined,
    size: number,
    result: RewrapResult,
  ): Promise<{ last: { deviceId: string; version: number }; size: number } | undefined> {
    return db()
      .transaction()
      .execute(async (trx) => {
        const rows = await repo.lockChildrenToRewrap(trx, groupId, primaryVersion, after, size);
        const last = rows.at(-1);
        if (!last) return undefined;
        const swaps: Array<{ deviceId: string; version: number; oldParent: number; newParent: number; wrapped: Buffer }> = [];
        const events: AuditEventInput[] = [];
        for (const row of rows) {
          const parentKey = parentKeys.get(row.parent_version);
          let failure = parentKey ? undefined : (parentErrors.get(row.parent_version) ?? `group version ${row.parent_version} appeared during the rewrap; a later run moves it`);
          if (parentKey) {
            let plaintext: Buffer | undefined;
            try {
              plaintext = unwrapKey(parentKey, row.wrapped_key, deviceBinding(row.device_id, row.version, groupId, row.parent_version));
              swaps.push({
                deviceId: row.device_id,
                version: row.version,
                oldParent: row.parent_version,
                newParent: primaryVersion,
                wrapped: wrapKey(newKey, plaintext, deviceBinding(row.device_id, row.version, groupId, primaryVersion)),
              });
            } catch {
              failure = 'stored material failed to unwrap under its group version';
            } finally {
              plaintext?.fill(0);
            }
          }
          if (failure !== undefined) {
            result.failed += 1;
            if (result.failures.length < MAX_LISTED_FAILURES) result.failures.push({ deviceId: row.device_id, version: row.version, parentVersion: row.parent_version, error: failure });
            events.push(event(who, { action: 'device.group_rewrap', outcome: 'failure', keyId: `device:${row.device_id}`, details: { version: row.version, groupId, fromGroupVersion: row.parent_version, toGroupVersion: primaryVersion, error: failure } }));
          }
        }
        const updated = new Set((await repo.replaceChildWraps(trx, swaps)).map((r) => `${r.device_id}\u0000${r.version}`));
        for (const s of swaps) {
          if (!updated.has(`${s.deviceId}\u0000${s.version}`)) continue;
          result.rewrapped += 1;
          events.push(event(who, { action: 'device.group_rewrap', outcome: 'success', keyId: `device:${s.deviceId}`, details: { version: s.version, groupId, fromGroupVersion: s.oldParent, toGroupVersion: s.newParent } }));
        }
        if (events.length > 0) await audit.record(ex(trx), events);
        return { last: { deviceId: last.device_id, version: last.version }, size: rows.length };
      });
  }

  async function retire(who: Actor, groupId: string, policy: EffectivePolicy, options: { dryRun?: boolean }): Promise<RetireResult[]> {
    const now = clock.now();
    const versions = await repo.listGroupVersionStates(db(), [groupId]);
    const children = await repo.countChildrenByParent(db(), groupId);
    const out: RetireResult[] = [];
    const retention = policy.group.retentionDays;
    for (const v of versions) {
      if ((children.get(v.version) ?? 0) > 0) continue;
      if (v.state === 'decrypt_only' && retention !== null && now >= addDays(v.state_changed_at, retention)) {
        const destroyAfter = addDays(now, policy.group.destructionWaitDays);
        if (options.dryRun || (await schedule(who, groupId, v.version, now, destroyAfter, retention))) {
          out.push({ groupId, version: v.version, from: 'decrypt_only', to: 'destroy_scheduled', destroyAfter: destroyAfter.toISOString() });
        }
      } else if (v.state === 'destroy_scheduled' && v.state_until !== null && now >= v.state_until) {
        if (options.dryRun || (await destroy(who, groupId, v.version, now))) out.push({ groupId, version: v.version, from: 'destroy_scheduled', to: 'destroyed' });
      }
    }
    return out;
  }

  async function schedule(who: Actor, groupId: string, version: number, now: Date, destroyAfter: Date, retentionDays: number): Promise<boolean> {
    return db()
      .transaction()
      .execute(async (trx) => {
        const [row] = await lockVersion(trx, groupId, version);
        if (!row || row.state !== 'decrypt_only' || (await repo.countChildrenOf(trx, groupId, version)) > 0) return false;
        assertTransition(`Group ${groupId} v${version}`, 'decrypt_only', 'destroy_scheduled');
        if (!(await repo.updateGroupVersionState(trx, groupId, version, 'decrypt_only', { state: 'destroy_scheduled', state_changed_at: now, state_until: destroyAfter }))) return false;
        await audit.record(ex(trx), [
          event(who, {
            action: 'group.version.schedule_destroy',
            outcome: 'success',
            keyId: `group:${groupId}`,
            details: { version, destroyAfter: destroyAfter.toISOString(), reason: 'retention', retentionDays },
          }),
        ]);
        return true;
      });
  }

  async function destroy(who: Actor, groupId: string, version: number, now: Date): Promise<boolean> {
    const done = await db()
      .transaction()
      .execute(async (trx) => {
        const [row] = await lockVersion(trx, groupId, version);
        if (!row || row.state !== 'destroy_scheduled' || row.state_until === null || now < row.state_until) return false;
        if ((await repo.countChildrenOf(trx, groupId, version)) > 0) return false;
        assertTransition(`Group ${groupId} v${version}`, 'destroy_scheduled', 'destroyed');
        if (!(await repo.updateGroupVersionState(trx, groupId, version, 'destroy_scheduled', { state: 'destroyed', state_changed_at: now, state_until: null, erase: true }))) return false;
        await audit.record(ex(trx), [event(who, { action: 'group.version.destroy', outcome: 'success', keyId: `group:${groupId}`, details: { version, kekVersion: row.kek_version } })]);
        return true;
      });
    if (done) material.cache.invalidate('group', groupId, version);
    return done;
  }

  async function lockVersion(trx: Kysely<RotationDB>, groupId: string, version: number) {
    return trx
      .selectFrom('group_versions')
      .select(['state', 'state_until', 'kek_version'])
      .where('group_id', '=', groupId)
      .where('version', '=', version)
      .forUpdate()
      .execute();
  }

  async function rotate(who: Actor, groupId: string, options: { limit: number }): Promise<StartResult & { rewrap: RewrapResult }> {
    const started = await start(who, groupId, { reason: 'manual' });
    if (!started) throw new ConflictError(`Group ${groupId} was rotated by another request meanwhile`, 'rotated_concurrently');
    const rewrap = await rewrapChildren(who, groupId, { limit: options.limit });
    return { ...started, rewrap };
  }

  return { rotate, start, rewrapChildren, retire };
}
