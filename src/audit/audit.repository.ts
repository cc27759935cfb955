/**
 * SQL of the audit log, nothing else: every function takes the executor it runs on, so the
 * service decides what runs inside which transaction. Rows are normalised here (int8 → number,
 * bytea → Buffer) because PGlite and pg decode them differently.
 */
import { CompiledQuery, sql } from 'kysely';
import { preparedStatement, type Executor } from '../db/database.js';
import type { AuditKeyPurpose } from './audit.tables.js';
import type { AuditOutcome } from './audit.types.js';
import type { ChainPageData } from './audit.verify-page.js';

/** Postgres renders `occurred_at` exactly as the canonical JSON writes it (UTC, microseconds). */
const CANONICAL_TIME = `YYYY-MM-DD"T"HH24:MI:SS.US"Z"`;

export interface ChainHead {
  position: number;
  hash: Buffer;
}

export interface AuditEventRow {
  position: number;
  occurredAt: Date;
  actor: string;
  action: string;
  outcome: AuditOutcome;
  keyId: string | null;
  details: Record<string, unknown>;
  requestId: string | null;
  prevHash: Buffer;
  hash: Buffer;
}

/**
 * An event as the verifier reads it, one JSON array per event:
 * [position, canonical time, actor, action, outcome, keyId, details, requestId, prevHash hex, hash hex].
 */
export type ChainTuple = [number, string, string, string, string, string | null, Record<string, unknown>, string | null, string, string];

/**
 * Consecutive new events, as columns: event i (0-based) has position `firstPosition + i`, links
 * to `chain[32·i, 32·i + 32)` and has the hash `chain[32·(i + 1), 32·(i + 2))`. All of one
 * `record` share one time (read under the chain-head lock).
 */
export interface NewAuditEvents {
  firstPosition: number;
  occurredAt: Date;
  actors: string[];
  actions: string[];
  outcomes: AuditOutcome[];
  keyIds: Array<string | null>;
  /** canonical JSON text of each event's details */
  details: string[];
  requestIds: Array<string | null>;
  /** the hash before the first event, then every event's hash: 32 · (count + 1) bytes */
  chain: Buffer;
}

export interface EventFilters {
  actor?: string | undefined;
  action?: string | undefined;
  keyId?: string | undefined;
  keyIdPrefix?: string | undefined;
  outcome?: AuditOutcome | undefined;
  from?: Date | undefined;
  to?: Date | undefined;
}

export interface CheckpointRow {
  id: number;
  position: number;
  hash: Buffer;
  signedAt: Date;
  kid: string;
  jws: string;
}

export function toBuffer(value: Uint8Array): Buffer {
  return Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
}

/** Events per INSERT statement (a bound on the statement's arrays, not a cost per row). */
const INSERT_CHUNK = 50_000;

// ---- chain head ----

/** Lock the chain head for the rest of the caller's transaction: every writer queues here. */
// Every append runs these three (prepared once per connection: db/database.ts preparedStatement).
const LOCK_HEAD = preparedStatement('select position, hash from audit_chain_head where id = 1 for update');
const UPDATE_HEAD = preparedStatement('update audit_chain_head set position = $1, hash = $2 where id = 1');
const INSERT_EVENTS = preparedStatement(`
  insert into audit_events (position, occurred_at, actor, action, outcome, key_id, details, request_id, prev_hash, hash)
  select $1::int8 + e.ord - 1, $2::timestamptz, e.actor, e.action, e.outcome, e.key_id,
         cast(e.details as jsonb), e.request_id, substring(c.chain, (32 * e.ord - 31)::int, 32), substring(c.chain, (32 * e.ord + 1)::int, 32)
  from (select $3::bytea as chain) c,
       unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
         with ordinality as e(actor, action, outcome, key_id, details, request_id, ord)
  order by e.ord`);

export async function lockHead(trx: Executor): Promise<ChainHead> {
  const row = (await trx.executeQuery<{ position: number | string; hash: Buffer | Uint8Array }>(CompiledQuery.raw(LOCK_HEAD, []))).rows[0];
  if (!row) throw new Error('The audit chain head row is missing');
  return { position: Number(row.position), hash: toBuffer(row.hash) };
}

export async function readHead(db: Executor): Promise<ChainHead | undefined> {
  const row = await db.selectFrom('audit_chain_head').select(['position', 'hash']).where('id', '=', 1).executeTakeFirst();
  return row && { position: Number(row.position), hash: toBuffer(row.hash) };
}

export async function updateHead(trx: Executor, head: ChainHead): Promise<void> {
  await trx.executeQuery(CompiledQuery.raw(UPDATE_HEAD, [head.position, head.hash]));
}

/**
 * Append `events` in one statement if the head is still `expected` (migration
 * 20261122000100_audit_append_if_head): `appended` false means nothing was written and `head`
 * is where the chain really ends.
 */
const APPEND_IF_HEAD = preparedStatement(
  'select head_position, head_hash, appended from audit_append_if_head($1::int8, $2::bytea, $3::timestamptz, $4::bytea, $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])',
);

export async function appendIfHead(db: Executor, expected: ChainHead, events: NewAuditEvents): Promise<{ head: ChainHead; appended: boolean }> {
  const row = (
    await db.executeQuery<{ head_position: number | string; head_hash: Uint8Array; appended: boolean }>(
      CompiledQuery.raw(APPEND_IF_HEAD, [expected.position, expected.hash, events.occurredAt, events.chain, events.actors, events.actions, events.outcomes, events.keyIds, events.details, events.requestIds]),
    )
  ).rows[0];
  if (!row) throw new Error('audit_append_if_head returned no row');
  return { head: { position: Number(row.head_position), hash: toBuffer(row.head_hash) }, appended: row.appended };
}

// ---- events ----

/**
 * Append events with one set-based INSERT (per 50,000): the columns travel as arrays, the
 * hashes as one bytea, and the link trigger checks the whole statement at once
 * (migrations/20261121000900_audit_bulk.ts). Details are text cast by the server: pg and
 * PGlite would each serialise an object their own way.
 */
export async function insertEvents(trx: Executor, events: NewAuditEvents): Promise<void> {
  const count = events.actors.length;
  for (let i = 0; i < count; i += INSERT_CHUNK) {
    const end = Math.min(i + INSERT_CHUNK, count);
    const part = <T>(column: T[]): T[] => (i === 0 && end === count ? column : column.slice(i, end));
    const chain = events.chain.subarray(i * 32, (end + 1) * 32);
    await trx.executeQuery(
      CompiledQuery.raw(INSERT_EVENTS, [
        events.firstPosition + i,
        events.occurredAt,
        chain,
        part(events.actors),
        part(events.actions),
        part(events.outcomes),
        part(events.keyIds),
        part(events.details),
        part(events.requestIds),
      ]),
    );
  }
}

/**
 * The events with `from <= position <= to`, as an array indexed by `position - from` (a hole
 * where an event is missing). Pages are position ranges, not LIMITs: positions are
 * consecutive, and a LIMIT over a range can make the planner sort the whole range. The page
 * comes back as ONE JSON text parsed in one call, several times faster than decoding ten
 * columns a row, so `verify` can walk hundreds of thousands of events a second; the rows are
 * placed by position rather than sorted by the server.
 */
export async function selectChainPage(db: Executor, from: number, to: number): Promise<Array<ChainTuple | undefined>> {
  const page = new Array<ChainTuple | undefined>(to - from + 1);
  for (const tuple of JSON.parse(await selectChainPageText(db, from, to)) as ChainTuple[]) page[tuple[0] - from] = tuple;
  return page;
}

async function selectChainPageText(db: Executor, from: number, to: number): Promise<string> {
  const { rows } = await sql<{ page: string }>`
    select '[' || coalesce(string_agg(json_build_array(
             position, to_char(occurred_at at time zone 'UTC', ${CANONICAL_TIME}), actor, action, outcome,
             key_id, details, request_id, encode(prev_hash, 'hex'), encode(hash, 'hex'))::text, ','), '') || ']' as page
    from audit_events
    where position >= ${from} and position <= ${to}`.execute(db);
  return rows[0]?.page ?? '[]';
}

/**
 * The events with `from <= position <= to` for `verify`, each column aggregated by the server
 * into one text (see ChainPageData): far less work for PostgreSQL than one JSON array per event,
 * and nothing for this thread to parse (the page goes to a worker as it is). When a page holds
 * anything the column form cannot carry exactly (a NULL or a hash that is not 32 bytes, which
 * only tampering with the constraints could store), it is read again in the per-event form.
 */
export async function selectChainColumns(db: Executor, from: number, to: number): Promise<ChainPageData> {
  const { rows } = await sql<{
    irregular: number | string;
    positions: string | null;
    times: string;
    actors: string;
    actions: string;
    outcomes: string;
    key_ids: string;
    request_ids: string;
    details: string;
    prev_hashes: string;
    hashes: string;
  }>`
    select count(*) filter (where details is null or octet_length(prev_hash) is distinct from 32 or octet_length(hash) is distinct from 32) as irregular,
           json_agg(position)::text as positions,
           json_agg(to_char(occurred_at at time zone 'UTC', ${CANONICAL_TIME}))::text as times,
           json_agg(actor)::text as actors, json_agg(action)::text as actions, json_agg(outcome)::text as outcomes,
           json_agg(key_id)::text as key_ids, json_agg(request_id)::text as request_ids,
           string_agg(details::text, chr(10)) as details,
           encode(string_agg(prev_hash, ''::bytea), 'hex') as prev_hashes, encode(string_agg(hash, ''::bytea), 'hex') as hashes
    from audit_events
    where position >= ${from} and position <= ${to}`.execute(db);
  const row = rows[0];
  if (!row || row.positions === null) return { kind: 'empty' };
  if (Number(row.irregular) > 0) return { kind: 'rows', json: await selectChainPageText(db, from, to) };
  return {
    kind: 'columns',
    positions: row.positions,
    times: row.times,
    actors: row.actors,
    actions: row.actions,
    outcomes: row.outcomes,
    keyIds: row.key_ids,
    requestIds: row.request_ids,
    details: row.details,
    prevHashes: row.prev_hashes,
    hashes: row.hashes,
  };
}

export async function hashAt(db: Executor, position: number): Promise<Buffer | undefined> {
  const row = await db.selectFrom('audit_events').select('hash').where('position', '=', position).executeTakeFirst();
  return row && toBuffer(row.hash);
}

export async function maxPosition(db: Executor): Promise<number> {
  const row = await db
    .selectFrom('audit_events')
    .select((eb) => eb.fn.max('position').as('max'))
    .executeTakeFirst();
  return row?.max == null ? 0 : Number(row.max);
}

/** Filtered events after `afterPosition` (exclusive), in position order. */
export async function queryEvents(
  db: Executor,
  filters: EventFilters,
  afterPosition: number | undefined,
  order: 'asc' | 'desc',
  limit: number,
): Promise<AuditEventRow[]> {
  let query = db
    .selectFrom('audit_events')
    .select(['position', 'occurred_at', 'actor', 'action', 'outcome', 'key_id', 'details', 'request_id', 'prev_hash', 'hash']);
  if (filters.actor !== undefined) query = query.where('actor', '=', filters.actor);
  if (filters.action !== undefined) query = query.where('action', '=', filters.action);
  if (filters.keyId !== undefined) query = query.where('key_id', '=', filters.keyId);
  if (filters.keyIdPrefix !== undefined) query = query.where('key_id', 'like', `${escapeLike(filters.keyIdPrefix)}%`);
  if (filters.outcome !== undefined) query = query.where('outcome', '=', filters.outcome);
  if (filters.from !== undefined) query = query.where('occurred_at', '>=', filters.from);
  if (filters.to !== undefined) query = query.where('occurred_at', '<', filters.to);
  if (afterPosition !== undefined) query = query.where('position', order === 'asc' ? '>' : '<', afterPosition);
  const rows = await query.orderBy('position', order).limit(limit).execute();
  return rows.map((r) => ({
    position: Number(r.position),
    occurredAt: r.occurred_at,
    actor: r.actor,
    action: r.action,
    outcome: r.outcome,
    keyId: r.key_id,
    details: r.details,
    requestId: r.request_id,
    prevHash: toBuffer(r.prev_hash),
    hash: toBuffer(r.hash),
  }));
}

/** `like` pattern for a literal prefix (the default escape character is a backslash). */
function escapeLike(value: string): string {
  return value.replace(/[\\%_]/g, (c) => `\\${c}`);
}

// ---- keys ----

export async function findKey(db: Executor, purpose: AuditKeyPurpose, version: number): Promise<{ wrappedKey: string } | undefined> {
  const row = await db
    .selectFrom('audit_keys')
    .select('wrapped_key')
    .where('purpose', '=', purpose)
    .where('version', '=', version)
    .executeTakeFirst();
  return row && { wrappedKey: row.wrapped_key };
}

/** Insert unless another writer got there first (then the caller reads the winner's row). */
export async function insertKeyIfAbsent(
  db: Executor,
  key: { purpose: AuditKeyPurpose; version: number; wrappedKey: string; kekVersion: number; createdAt: Date },
): Promise<void> {
  await db
    .insertInto('audit_keys')
    .values({ purpose: key.purpose, version: key.version, wrapped_key: key.wrappedKey, kek_version: key.kekVersion, created_at: key.createdAt })
    .onConflict((oc) => oc.columns(['purpose', 'version']).doNothing())
    .execute();
}

export async function listKeys(db: Executor): Promise<Array<{ purpose: AuditKeyPurpose; version: number; wrappedKey: string; kekVersion: number }>> {
  const rows = await db.selectFrom('audit_keys').select(['purpose', 'version', 'wrapped_key', 'kek_version']).orderBy('purpose').orderBy('version').execute();
  return rows.map((r) => ({ purpose: r.purpose, version: r.version, wrappedKey: r.wrapped_key, kekVersion: r.kek_version }));
}

/** Replace a blob only if it is still the one that was rewrapped (a concurrent rewrap wins otherwise). */
export async function replaceKeyBlob(
  db: Executor,
  key: { purpose: AuditKeyPurpose; version: number; oldWrappedKey: string; wrappedKey: string; kekVersion: number },
): Promise<boolean> {
  const result = await db
    .updateTable('audit_keys')
    .set({ wrapped_key: key.wrappedKey, kek_version: key.kekVersion })
    .where('purpose', '=', key.purpose)
    .where('version', '=', key.version)
    .where('wrapped_key', '=', key.oldWrappedKey)
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

// ---- checkpoints ----

export async function insertCheckpoint(db: Executor, checkpoint: Omit<CheckpointRow, 'id'>): Promise<number> {
  const row = await db
    .insertInto('audit_checkpoints')
    .values({ position: checkpoint.position, hash: checkpoint.hash, signed_at: checkpoint.signedAt, kid: checkpoint.kid, jws: checkpoint.jws })
    .returning('id')
    .executeTakeFirstOrThrow();
  return Number(row.id);
}

const CHECKPOINT_COLUMNS = ['id', 'position', 'hash', 'signed_at', 'kid', 'jws'] as const;

function toCheckpoint(r: { id: number; position: number; hash: Buffer; signed_at: Date; kid: string; jws: string }): CheckpointRow {
  return { id: Number(r.id), position: Number(r.position), hash: toBuffer(r.hash), signedAt: r.signed_at, kid: r.kid, jws: r.jws };
}

export async function findCheckpoint(db: Executor, id: number): Promise<CheckpointRow | undefined> {
  const row = await db.selectFrom('audit_checkpoints').select(CHECKPOINT_COLUMNS).where('id', '=', id).executeTakeFirst();
  return row && toCheckpoint(row);
}

export async function latestCheckpoint(db: Executor): Promise<CheckpointRow | undefined> {
  const row = await db.selectFrom('audit_checkpoints').select(CHECKPOINT_COLUMNS).orderBy('id', 'desc').limit(1).executeTakeFirst();
  return row && toCheckpoint(row);
}

/** Newest first, before `beforeId` (exclusive). */
export async function listCheckpoints(db: Executor, beforeId: number | undefined, limit: number): Promise<CheckpointRow[]> {
  let query = db.selectFrom('audit_checkpoints').select(CHECKPOINT_COLUMNS);
  if (beforeId !== undefined) query = query.where('id', '<', beforeId);
  const rows = await query.orderBy('id', 'desc').limit(limit).execute();
  return rows.map(toCheckpoint);
}

/** Checkpoints whose position is at least `from`, oldest first. */
export async function checkpointsFrom(db: Executor, from: number): Promise<CheckpointRow[]> {
  const rows = await db
    .selectFrom('audit_checkpoints')
    .select(CHECKPOINT_COLUMNS)
    .where('position', '>=', from)
    .orderBy('position')
    .orderBy('id')
    .execute();
  return rows.map(toCheckpoint);
}
