/**
 * KEK rotation (DESIGN §3): rotate the KEK in its provider, rewrap every stored KEK blob (group
 * DEKs and the audit module's keys) to the latest version in batches — transit `rewrap`, so no
 * plaintext leaves the provider — then raise `min_decryption_version` to the lowest version
 * still referenced, once the grace period of the KEK policy has passed since that version
 * became the latest.
 *
 * Resumable and idempotent: what still needs a rewrap is read from the rows themselves
 * (`kek_version` below the latest), so a re-run, or the cron entry, finishes an interrupted
 * rewrap. Each batch's swap commits in its own transaction with its audit events, and only if
 * the row still holds the blob that was rewrapped. A failed item keeps its old blob (still
 * readable: the minimum decryption version is never raised above a referenced version) and is
 * reported. One lease keeps two runs from rotating at once; a killed run's lease expires.
 */
import type { Kysely } from 'kysely';
import { auditKeyBinding } from '../audit/audit.service.js';
import * as auditRepo from '../audit/audit.repository.js';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import { groupBinding } from '../crypto/binding.js';
import type { DB, Executor } from '../db/database.js';
import { ConflictError } from '../http/errors.js';
import { kekBlobVersion, type KekInfo, type KekProvider, type RewrapResult } from '../kek/kek.types.js';
import { lockKekFenceExclusive } from '../keys/kek-fence.repository.js';
import type { Actor } from '../keys/key.service.js';
import { tryAcquireLease, type Lease } from './lease.js';
import { addDays } from './policy.defaults.js';
import type { PolicyService } from './policy.service.js';
import * as repo from './rotation.repository.js';
import { rotationDb, type RotationDB } from './rotation.tables.js';

/** Items per provider rewrap call: transit batches of a few hundred spread its per-request cost (reference §14). */
export const DEFAULT_KEK_BATCH = 500;
export const MIN_KEK_BATCH = 250;
export const KEK_LEASE = 'kek-rotation';
const LEASE_MS = 10 * 60 * 1000;
/** the rewrap renews its lease when this long has passed since the last renewal (a 20th of the lease) */
const LEASE_RENEW_MS = LEASE_MS / 20;
const MAX_LISTED_FAILURES = 100;

export interface KekRotationOptions {
  /** `manual`: rotate now (POST /v1/kek/rotate); `policy`: rotate only when the KEK policy says it is due (cron) */
  mode: 'manual' | 'policy';
  /** do not rotate, only finish the rewrap and raise the minimum decryption version */
  rewrapOnly?: boolean | undefined;
  dryRun?: boolean | undefined;
  /** most blobs rewrapped in this call */
  limit?: number | undefined;
}

export interface RewrapFailure {
  keyId: string;
  version: number;
  kekVersion: number;
  error: string;
}

export interface KekRotationSummary {
  kekName: string;
  provider: 'local' | 'vault';
  dryRun: boolean;
  /** `skipped`: another run holds the KEK rotation lease */
  status: 'done' | 'skipped';
  reason?: string;
  due: boolean;
  dueAt: string | null;
  rotated: boolean;
  fromVersion: number;
  toVersion: number;
  /** KEK versions found in the provider that keystrata had not recorded (first version, rotations made in Vault) */
  observedVersions: number[];
  rewrap: {
    batches: number;
    groupKeys: { rewrapped: number; failed: number; remaining: number };
    auditKeys: { rewrapped: number; failed: number; remaining: number };
    failures: RewrapFailure[];
  };
  minDecryptionVersion: {
    before: number;
    after: number;
    raised: boolean;
    /** lowest KEK version a stored blob is wrapped under (the latest when none is older) */
    lowestReferenced: number;
    blockedBy: 'up_to_date' | 'references' | 'grace' | 'failed' | null;
    graceEndsAt: string | null;
  };
}

export interface KekRotationHooks {
  /** after each committed rewrap batch (tests inject failures here) */
  afterKekBatch?(info: { batch: number; rewrapped: number }): void | Promise<void>;
  /** after the lowest referenced version was computed (and the KEK fence released), before the provider is asked to raise to it */
  beforeMinDecryptionRaise?(info: { to: number }): void | Promise<void>;
}

export interface KekRotationService {
  run(who: Actor, options: KekRotationOptions): Promise<KekRotationSummary>;
  /** When the latest version became the latest, and when the policy makes the next rotation due. */
  schedule(): Promise<{ latestVersion: number; latestSince: Date; dueAt: Date }>;
}

export function createKekRotationService(deps: {
  db: Kysely<DB>;
  kek: KekProvider;
  audit: AuditSink;
  clock: Clock;
  policies: Pick<PolicyService, 'effectivePolicy'>;
  batchSize?: number | undefined;
  hooks?: KekRotationHooks | undefined;
}): KekRotationService {
  const { kek, audit, clock, policies } = deps;
  const batchSize = deps.batchSize ?? DEFAULT_KEK_BATCH;
  if (!Number.isInteger(batchSize) || batchSize < MIN_KEK_BATCH) throw new Error(`The KEK rewrap batch must be at least ${MIN_KEK_BATCH} items`);
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));
  const ex = (trx: unknown) => trx as Executor;
  const event = (who: Actor, e: Omit<AuditEventInput, 'actor' | 'requestId'>): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });
  const kekKeyId = () => `kek:${kek.keyName}`;

  /** When each KEK version became the latest; versions the provider has and we never recorded are recorded now (unless dry run). */
  async function seenVersions(who: Actor, info: KekInfo, dryRun: boolean): Promise<{ seen: Map<number, Date>; observed: number[] }> {
    const now = clock.now();
    const rows = await repo.listKekVersions(db(), kek.keyName);
    const seen = new Map(rows.map((r) => [r.version, r.became_latest_at]));
    const missing = info.versions.filter((v) => !seen.has(v.version) && v.version <= info.latestVersion);
    if (!seen.has(info.latestVersion) && !missing.some((v) => v.version === info.latestVersion)) {
      missing.push({ version: info.latestVersion, createdAt: now.toISOString() });
    }
    const observed: number[] = [];
    for (const v of missing) {
      const created = new Date(v.createdAt);
      // the provider's clock is not ours: never record a time in our future
      const at = Number.isNaN(created.getTime()) || created.getTime() <= 0 || created > now ? now : created;
      seen.set(v.version, at);
      observed.push(v.version);
    }
    if (!dryRun && missing.length > 0) {
      await db()
        .transaction()
        .execute(async (trx) => {
          const recorded: number[] = [];
          for (const version of observed) {
            if (await repo.insertKekVersion(trx, { kek_name: kek.keyName, version, became_latest_at: seen.get(version) ?? now, source: 'observed' })) recorded.push(version);
          }
          if (recorded.length > 0) {
            await audit.record(ex(trx), [event(who, { action: 'kek.version_observed', outcome: 'success', keyId: kekKeyId(), details: { versions: recorded, latestVersion: info.latestVersion } })]);
          }
        });
    }
    return { seen, observed: observed.sort((a, b) => a - b) };
  }

  async function schedule(): Promise<{ latestVersion: number; latestSince: Date; dueAt: Date }> {
    const [info, policy] = await Promise.all([kek.info(), policies.effectivePolicy()]);
    const rows = await repo.listKekVersions(db(), kek.keyName);
    const since = rows.find((r) => r.version === info.latestVersion)?.became_latest_at ?? new Date(info.versions.find((v) => v.version === info.latestVersion)?.createdAt ?? clock.now());
    return { latestVersion: info.latestVersion, latestSince: since, dueAt: addDays(since, policy.kek.rotationPeriodDays) };
  }

  async function run(who: Actor, options: KekRotationOptions): Promise<KekRotationSummary> {
    const dryRun = options.dryRun === true;
    const limit = options.limit ?? Number.MAX_SAFE_INTEGER;
    let lease: Lease | undefined;
    if (!dryRun) {
      lease = await tryAcquireLease(db(), clock, KEK_LEASE, LEASE_MS);
      if (!lease) {
        if (options.mode === 'manual') throw new ConflictError('Another KEK rotation or rewrap is running; retry when it has finished', 'rotation_in_progress');
      }
    }
    try {
      const info = await kek.info();
      const policy = (await policies.effectivePolicy()).kek;
      const summary: KekRotationSummary = {
        kekName: kek.keyName,
        provider: kek.kind,
        dryRun,
        status: 'done',
        due: false,
        dueAt: null,
        rotated: false,
        fromVersion: info.latestVersion,
        toVersion: info.latestVersion,
        observedVersions: [],
        rewrap: { batches: 0, groupKeys: { rewrapped: 0, failed: 0, remaining: 0 }, auditKeys: { rewrapped: 0, failed: 0, remaining: 0 }, failures: [] },
        minDecryptionVersion: { before: info.minDecryptionVersion, after: info.minDecryptionVersion, raised: false, lowestReferenced: info.latestVersion, blockedBy: null, graceEndsAt: null },
      };
      if (!dryRun && !lease) {
        summary.status = 'skipped';
        summary.reason = 'another run holds the KEK rotation lease';
        return summary;
      }
      const { seen, observed } = await seenVersions(who, info, dryRun);
      summary.observedVersions = observed;
      const now = clock.now();
      const dueAt = addDays(seen.get(info.latestVersion) ?? now, policy.rotationPeriodDays);
      summary.dueAt = dueAt.toISOString();
      summary.due = now >= dueAt;
      const rotate = options.mode === 'manual' ? options.rewrapOnly !== true : summary.due;

      let target = info.latestVersion;
      if (rotate) {
        if (dryRun) target = info.latestVersion + 1;
        else {
          target = await rotateProvider(who, info, options.mode);
          seen.set(target, clock.now());
        }
        summary.rotated = true;
        summary.toVersion = target;
      }

      await rewrapAll(who, target, limit, dryRun, summary, lease);
      await raiseMinimum(who, info, target, seen, policy.gracePeriodDays, dryRun, summary);
      return summary;
    } finally {
      await lease?.release().catch(() => {});
    }
  }

  async function rotateProvider(who: Actor, before: KekInfo, mode: 'manual' | 'policy'): Promise<number> {
    let after: KekInfo;
    try {
      after = await kek.rotate();
    } catch (error) {
      await recordFailure(who, 'kek.rotate', { fromVersion: before.latestVersion, reason: mode, error: errorText(error) });
      throw error;
    }
    const now = clock.now();
    await db()
      .transaction()
      .execute(async (trx) => {
        await repo.insertKekVersion(trx, { kek_name: kek.keyName, version: after.latestVersion, became_latest_at: now, source: 'rotated' });
        await audit.record(ex(trx), [
          event(who, { action: 'kek.rotate', outcome: 'success', keyId: kekKeyId(), details: { fromVersion: before.latestVersion, toVersion: after.latestVersion, provider: kek.kind, reason: mode } }),
        ]);
      });
    return after.latestVersion;
  }

  async function rewrapAll(who: Actor, target: number, limit: number, dryRun: boolean, summary: KekRotationSummary, lease: Lease | undefined): Promise<void> {
    const auditKeys = (await auditRepo.listKeys(deps.db)).filter((k) => k.kekVersion < target);
    if (dryRun) {
      const below = await repo.countGroupBlobsBelow(db(), target);
      const rewrapped = Math.min(below, limit);
      summary.rewrap.groupKeys = { rewrapped, failed: 0, remaining: below - rewrapped };
      summary.rewrap.batches = Math.ceil(rewrapped / batchSize);
      summary.rewrap.auditKeys = { rewrapped: auditKeys.length, failed: 0, remaining: 0 };
      return;
    }

    // the audit keys first: few, and the chain cannot be verified if they become unreadable
    if (auditKeys.length > 0) {
      const results = await kek.rewrapBatch(auditKeys.map((k) => ({ blob: k.wrappedKey, context: auditKeyBinding(k.purpose, k.version, kek.keyName) })));
      const events: AuditEventInput[] = [];
      await db()
        .transaction()
        .execute(async (trx) => {
          for (const [i, k] of auditKeys.entries()) {
            const result = checked(results[i], target);
            const keyId = `audit-key:${k.purpose}`;
            if (!result.ok) {
              summary.rewrap.auditKeys.failed += 1;
              addFailure(summary, { keyId, version: k.version, kekVersion: k.kekVersion, error: result.error });
              events.push(event(who, { action: 'audit_key.kek_rewrap', outcome: 'failure', keyId, details: { version: k.version, fromKekVersion: k.kekVersion, error: result.error } }));
              continue;
            }
            const newVersion = kekBlobVersion(result.blob);
            if (await auditRepo.replaceKeyBlob(ex(trx), { purpose: k.purpose, version: k.version, oldWrappedKey: k.wrappedKey, wrappedKey: result.blob, kekVersion: newVersion })) {
              summary.rewrap.auditKeys.rewrapped += 1;
              events.push(event(who, { action: 'audit_key.kek_rewrap', outcome: 'success', keyId, details: { version: k.version, fromKekVersion: k.kekVersion, toKekVersion: newVersion } }));
            }
          }
          if (events.length > 0) await audit.record(ex(trx), events);
        });
      summary.rewrap.batches += 1;
    }

    // The group blobs, pipelined in two stages: batch N+1 is read, rewrapped at the provider and
    // checked (its swap and audit events prepared) while batch N's swaps and audit events
    // commit, so the commit stage (the slower one) is the only thing on the critical path. Provider
    // calls go one at a time, in key order (a Vault that fails mid-way has seen only the batches
    // before it); commits go in order too, each only after the previous one (and its hook)
    // succeeded. When anything fails, nothing further is committed, and the run returns only once
    // the batch read or rewrapped ahead has settled (its results are dropped: its rows keep their
    // old, still readable blobs, and a re-run picks them up).
    let after: { groupId: string; version: number } | undefined;
    let budget = limit;
    let stopped = false;
    let providerTurn: Promise<unknown> = Promise.resolve();
    const settling: Array<Promise<unknown>> = [];
    const fetchNext = async (): Promise<Promise<PreparedBatch | undefined> | undefined> => {
      if (stopped || budget <= 0) return undefined;
      const rows = await repo.groupBlobsBelow(db(), target, after, Math.min(batchSize, budget));
      const last = rows.at(-1);
      if (!last || stopped) return undefined;
      after = { groupId: last.group_id, version: last.version };
      budget -= rows.length;
      const items = rows.map((r) => ({ blob: r.wrapped_key, context: groupBinding(r.group_id, r.version, kek.keyName) }));
      const prepared = providerTurn.then(async () => (stopped ? undefined : prepareBatch(who, rows, await kek.rewrapBatch(items), target)));
      providerTurn = prepared.catch(() => {});
      settling.push(providerTurn);
      return prepared;
    };
    const started = (fetching: Promise<Promise<PreparedBatch | undefined> | undefined>) => {
      settling.push(fetching.catch(() => {}));
      return fetching;
    };
    // The lease lasts LEASE_MS; renewing it every LEASE_RENEW_MS (by either clock) is plenty and
    // keeps a round trip per batch off the critical path.
    let renewedAt = { clock: clock.now().getTime(), monotonic: performance.now() };
    const renewIfDue = async () => {
      if (!lease) return;
      const now = { clock: clock.now().getTime(), monotonic: performance.now() };
      if (now.clock - renewedAt.clock < LEASE_RENEW_MS && now.monotonic - renewedAt.monotonic < LEASE_RENEW_MS) return;
      await lease.renew();
      renewedAt = now;
    };
    let next = started(fetchNext());
    try {
      for (;;) {
        const fetched = await next;
        if (!fetched) break;
        next = started(fetchNext()); // read (and queue at the provider) the batch after this one
        const batch = await fetched;
        if (!batch) break; // stopped (cannot happen while this loop runs)
        for (const failure of batch.failures) {
          summary.rewrap.groupKeys.failed += 1;
          addFailure(summary, failure);
        }
        await db()
          .transaction()
          .execute(async (trx) => {
            const updated = await repo.replaceGroupBlobs(trx, batch.swaps);
            const events = [...batch.failureEvents];
            for (const [i, success] of batch.successEvents.entries()) {
              if (!updated[i]) continue; // changed meanwhile (rewrapped by another run, destroyed)
              summary.rewrap.groupKeys.rewrapped += 1;
              events.push(success);
            }
            if (events.length > 0) await audit.record(ex(trx), events);
          });
        summary.rewrap.batches += 1;
        await renewIfDue();
        await deps.hooks?.afterKekBatch?.({ batch: summary.rewrap.batches, rewrapped: summary.rewrap.groupKeys.rewrapped });
      }
    } finally {
      stopped = true;
      // nothing of this run may still be reading or calling the provider once it returns
      while (settling.length > 0) await Promise.all(settling.splice(0));
    }
    summary.rewrap.groupKeys.remaining = await repo.countGroupBlobsBelow(db(), target);
    summary.rewrap.auditKeys.remaining = (await auditRepo.listKeys(deps.db)).filter((k) => k.kekVersion < target).length;
  }

  async function raiseMinimum(who: Actor, info: KekInfo, target: number, seen: Map<number, Date>, graceDays: number, dryRun: boolean, summary: KekRotationSummary): Promise<void> {
    const min = summary.minDecryptionVersion;
    // what is referenced now (dry run: what would be, once the rewrap it reports is done)
    let lowest = target;
    if (dryRun) {
      if (summary.rewrap.groupKeys.remaining > 0) lowest = Math.min(lowest, (await repo.lowestGroupKekVersion(db())) ?? target);
    } else {
      // Inside the KEK fence (keys/kek-fence.repository.ts), exclusive: a group version whose
      // insert is admitted but not committed yet (its blob possibly under an old KEK version,
      // unseen by the rewrap) is waited for and counted. Once the fence is released, every blob
      // admitted is under the newest recorded version, at least `target`, so the raise below
      // cannot go above it.
      lowest = await db()
        .transaction()
        .execute(async (trx) => {
          await lockKekFenceExclusive(ex(trx));
          const group = await repo.lowestGroupKekVersion(trx);
          const auditVersions = (await auditRepo.listKeys(ex(trx))).map((k) => k.kekVersion);
          return Math.min(target, group ?? target, ...auditVersions);
        });
    }
    min.lowestReferenced = lowest;
    if (lowest <= info.minDecryptionVersion) {
      min.blockedBy = lowest < target ? 'references' : 'up_to_date';
      return;
    }
    // the grace runs from the moment `lowest` became the latest, i.e. when the versions below it stopped encrypting
    const since = seen.get(lowest) ?? clock.now();
    const graceEnds = addDays(since, graceDays);
    min.graceEndsAt = graceEnds.toISOString();
    if (clock.now() < graceEnds) {
      min.blockedBy = 'grace';
      return;
    }
    if (dryRun) {
      min.after = lowest;
      min.raised = true;
      return;
    }
    await deps.hooks?.beforeMinDecryptionRaise?.({ to: lowest });
    try {
      await kek.setMinDecryptionVersion(lowest);
    } catch (error) {
      min.blockedBy = 'failed';
      await recordFailure(who, 'kek.min_decryption_version', { from: info.minDecryptionVersion, to: lowest, error: errorText(error) });
      throw error;
    }
    await db()
      .transaction()
      .execute(async (trx) => {
        await audit.record(ex(trx), [
          event(who, { action: 'kek.min_decryption_version', outcome: 'success', keyId: kekKeyId(), details: { from: info.minDecryptionVersion, to: lowest, latestVersion: target } }),
        ]);
      });
    min.after = lowest;
    min.raised = true;
  }

  async function recordFailure(who: Actor, action: string, details: Record<string, unknown>): Promise<void> {
    await db()
      .transaction()
      .execute(async (trx) => audit.record(ex(trx), [event(who, { action, outcome: 'failure', keyId: kekKeyId(), details })]))
      .catch(() => {}); // the provider failure is what the caller must see
  }

  return { run, schedule };
}

/** A rewrap result must be a blob of at least the target version (a concurrent rotation may make it newer). */
function checked(result: { ok: true; blob: string } | { ok: false; error: string } | undefined, target: number): { ok: true; blob: string } | { ok: false; error: string } {
  if (!result) return { ok: false, error: 'no result for this item' };
  if (!result.ok) return { ok: false, error: result.error.slice(0, 300) };
  let version: number;
  try {
    version = kekBlobVersion(result.blob);
  } catch {
    return { ok: false, error: 'the provider returned something that is not a KEK blob' };
  }
  if (version < target) return { ok: false, error: `the provider rewrapped to KEK version ${version}, below ${target}` };
  return result;
}

/** A rewrapped batch, every item checked: the swap to run, and the audit events it will commit with. */
interface PreparedBatch {
  swaps: repo.PreparedGroupBlobSwaps;
  /** one per swap, in order: recorded only if that row was swapped */
  successEvents: AuditEventInput[];
  failureEvents: AuditEventInput[];
  failures: RewrapFailure[];
}

function prepareBatch(who: Actor, rows: readonly repo.GroupBlobRow[], results: readonly RewrapResult[], target: number): PreparedBatch {
  if (results.length !== rows.length) throw new Error('The KEK provider answered a rewrap batch with the wrong number of results');
  const swaps: repo.GroupBlobSwap[] = [];
  const successEvents: AuditEventInput[] = [];
  const failureEvents: AuditEventInput[] = [];
  const failures: RewrapFailure[] = [];
  for (const [i, row] of rows.entries()) {
    const result = checked(results[i], target);
    const keyId = `group:${row.group_id}`;
    if (result.ok) {
      const kekVersion = kekBlobVersion(result.blob);
      swaps.push({ groupId: row.group_id, version: row.version, oldBlob: row.wrapped_key, newBlob: result.blob, kekVersion });
      successEvents.push({
        action: 'group.kek_rewrap',
        outcome: 'success',
        keyId,
        details: { version: row.version, fromKekVersion: row.kek_version, toKekVersion: kekVersion },
        actor: who.actor,
        requestId: who.requestId,
      });
    } else {
      failures.push({ keyId, version: row.version, kekVersion: row.kek_version, error: result.error });
      failureEvents.push({
        action: 'group.kek_rewrap',
        outcome: 'failure',
        keyId,
        details: { version: row.version, fromKekVersion: row.kek_version, error: result.error },
        actor: who.actor,
        requestId: who.requestId,
      });
    }
  }
  return { swaps: repo.prepareGroupBlobSwaps(swaps), successEvents, failureEvents, failures };
}

function addFailure(summary: KekRotationSummary, failure: RewrapFailure): void {
  if (summary.rewrap.failures.length < MAX_LISTED_FAILURES) summary.rewrap.failures.push(failure);
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message.slice(0, 300) : 'unknown error';
}
