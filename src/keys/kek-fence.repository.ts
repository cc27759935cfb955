/**
 * The fence between storing a new KEK blob (a group DEK version) and raising the KEK's
 * `min_decryption_version`.
 *
 * A group creation or group rotation wraps its new DEK under the KEK *before* its transaction
 * (no connection waits on Vault), so the blob may be under a KEK version that a concurrent KEK
 * rotation has already replaced, and the rewrap, scanning committed rows, never sees it. With a
 * KEK grace of 0 the minimum decryption version could then be raised above that blob and the
 * group key would be unreadable. Two rules close it, whatever the policy:
 *
 *  - a transaction that inserts a group version takes the fence in shared mode and admits its
 *    blob only if the blob is under the newest KEK version keystrata has recorded (kek_versions:
 *    every rotation and observed version is recorded before any rewrap or raise); otherwise the
 *    caller wraps again under the current version;
 *  - the raise takes the fence in exclusive mode and computes the lowest referenced version
 *    inside it, so an admitted blob not yet committed is waited for and counted.
 *
 * A raise never goes above the version it rotated to, which is recorded before it starts: a blob
 * admitted after the raise is at least that version. Transaction-level advisory locks: released
 * at commit or rollback, never leaked by a killed process.
 */
import { sql } from 'kysely';
import type { Executor } from '../db/database.js';

/** pg advisory lock key of the fence (an arbitrary constant: "ksKEKfen" as a 63-bit number) */
export const KEK_FENCE_LOCK = 0x6b734b454b66656en;

/**
 * Shared side: take the fence for the rest of the transaction and say whether a blob under
 * `blobVersion` may be stored (false: a newer KEK version exists; wrap again).
 */
export async function admitKekBlob(ex: Executor, kekName: string, blobVersion: number): Promise<boolean> {
  await sql`select pg_advisory_xact_lock_shared(${KEK_FENCE_LOCK.toString()}::bigint)`.execute(ex);
  const { rows } = await sql<{ v: number | null }>`select max(version) as v from kek_versions where kek_name = ${kekName}`.execute(ex);
  const newest = rows[0]?.v;
  return newest === null || newest === undefined || blobVersion >= Number(newest);
}

/** Exclusive side (the raise): waits for every transaction inside the fence, keeps new ones out until commit. */
export async function lockKekFenceExclusive(ex: Executor): Promise<void> {
  await sql`select pg_advisory_xact_lock(${KEK_FENCE_LOCK.toString()}::bigint)`.execute(ex);
}

/** How many times a creation wraps again when a KEK rotation overtook it (each retry follows a rotation, so 3 is plenty). */
export const KEK_FENCE_ATTEMPTS = 3;
