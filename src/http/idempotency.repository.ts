/** SQL of the Idempotency-Key records (table `idempotency_keys`, migration 20261121000500). */
import { sql } from 'kysely';
import type { Executor } from '../db/database.js';

export interface IdempotencyKeysTable {
  principal: string;
  idempotency_key: string;
  fingerprint: string;
  method: string;
  path: string;
  state: 'in_flight' | 'completed';
  request_id: string;
  status_code: number | null;
  content_type: string | null;
  body: string | null;
  created_at: Date;
  completed_at: Date | null;
  expires_at: Date;
}

export interface IdempotencyTables {
  idempotency_keys: IdempotencyKeysTable;
}

export type IdempotencyExecutor = Executor;

export interface IdempotencyRecordKey {
  principal: string;
  key: string;
  /** the request that holds the reservation: only it may complete or release it */
  requestId: string;
}

export interface StoredAnswer {
  state: 'in_flight' | 'completed';
  fingerprint: string;
  statusCode: number | null;
  contentType: string | null;
  body: string | null;
}

export interface Reservation extends IdempotencyRecordKey {
  fingerprint: string;
  method: string;
  path: string;
  now: Date;
  expiresAt: Date;
}

/** Claim the key for this request: false when a live record (in flight or completed) holds it. */
export async function reserve(db: IdempotencyExecutor, r: Reservation): Promise<boolean> {
  const row = {
    principal: r.principal,
    idempotency_key: r.key,
    fingerprint: r.fingerprint,
    method: r.method,
    path: r.path,
    state: 'in_flight' as const,
    request_id: r.requestId,
    status_code: null,
    content_type: null,
    body: null,
    created_at: r.now,
    completed_at: null,
    expires_at: r.expiresAt,
  };
  // An expired record is taken over in the same statement, so two requests racing for an
  // expired key still see exactly one winner (the row lock of the conflicting row decides).
  const inserted = await db
    .insertInto('idempotency_keys')
    .values(row)
    .onConflict((oc) =>
      oc
        .columns(['principal', 'idempotency_key'])
        .doUpdateSet(row)
        .where('idempotency_keys.expires_at', '<=', r.now),
    )
    .returning('request_id')
    .executeTakeFirst();
  return inserted?.request_id === r.requestId;
}

export async function find(db: IdempotencyExecutor, principal: string, key: string, now: Date): Promise<StoredAnswer | undefined> {
  const row = await db
    .selectFrom('idempotency_keys')
    .select(['state', 'fingerprint', 'status_code', 'content_type', 'body'])
    .where('principal', '=', principal)
    .where('idempotency_key', '=', key)
    .where('expires_at', '>', now)
    .executeTakeFirst();
  return row && { state: row.state, fingerprint: row.fingerprint, statusCode: row.status_code, contentType: row.content_type, body: row.body };
}

export async function complete(
  db: IdempotencyExecutor,
  k: IdempotencyRecordKey,
  answer: { statusCode: number; contentType: string | null; body: string; completedAt: Date },
): Promise<boolean> {
  const result = await db
    .updateTable('idempotency_keys')
    .set({ state: 'completed', status_code: answer.statusCode, content_type: answer.contentType, body: answer.body, completed_at: answer.completedAt })
    .where('principal', '=', k.principal)
    .where('idempotency_key', '=', k.key)
    .where('request_id', '=', k.requestId)
    .where('state', '=', 'in_flight')
    .executeTakeFirst();
  return result.numUpdatedRows === 1n;
}

/** Give the key back (the request failed without effect): a retry runs again. */
export async function release(db: IdempotencyExecutor, k: IdempotencyRecordKey): Promise<void> {
  await db
    .deleteFrom('idempotency_keys')
    .where('principal', '=', k.principal)
    .where('idempotency_key', '=', k.key)
    .where('request_id', '=', k.requestId)
    .where('state', '=', 'in_flight')
    .execute();
}

/** Delete up to `limit` expired records; returns how many went. */
export async function purgeExpired(db: IdempotencyExecutor, now: Date, limit: number): Promise<number> {
  const result = await db
    .deleteFrom('idempotency_keys')
    .where(sql<boolean>`(principal, idempotency_key) in (select principal, idempotency_key from idempotency_keys where expires_at <= ${now} limit ${limit})`)
    .executeTakeFirst();
  return Number(result.numDeletedRows);
}
