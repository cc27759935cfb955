/**
 * `keystrata_rollout_bucket(id)` made inlinable, same values (issue 7, bulk enrolment).
 *
 * The index `devices_rollout_bucket (group_id, keystrata_rollout_bucket(id), id)` evaluates the
 * function for every device inserted. Its body used `convert_to(text, 'UTF8')`, which is STABLE,
 * so PostgreSQL could not inline the IMMUTABLE SQL function and ran it as a SQL-function call
 * per row (≈ 15–25 µs of the database's CPU per enrolled device, more than the rest of the
 * devices row). In a UTF8 database the text's bytes are its UTF-8 bytes, and
 * `replace(id, '\', '\\')::bytea` yields exactly those bytes with immutable functions only
 * (bytea's escape input maps `\\` back to one backslash and copies every other byte; a leading
 * `\x` becomes `\\x`, so it never reads as hex input). Same sha256, same bucket, for every id:
 * the existing index stays valid and rollout.waves.ts (the same bucket in Node) still agrees.
 * Databases in another encoding keep the original body.
 *
 * Each backend caches an index's expressions as it first planned them (here: the function call);
 * resetting a storage option of the index invalidates that cache everywhere, so backends that
 * are already connected plan `keystrata_rollout_bucket(d.id) >= …` against the inlined form too
 * and keep using the index.
 */
import { sql, type Kysely } from 'kysely';

const ORIGINAL = sql`select (('x' || encode(substring(sha256(convert_to(device_id, 'UTF8')) from 1 for 4), 'hex'))::bit(32)::bigint % 10000)::integer`;
const INLINABLE = sql`select (('x' || encode(substring(sha256(replace(device_id, '\\', '\\\\')::bytea) from 1 for 4), 'hex'))::bit(32)::bigint % 10000)::integer`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
async function define(db: Kysely<any>, body: typeof ORIGINAL): Promise<void> {
  await sql`
    create or replace function keystrata_rollout_bucket(device_id text) returns integer
      language sql immutable strict parallel safe
      as $$ ${body} $$`.execute(db);
  await sql`alter index devices_rollout_bucket reset (fillfactor)`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  const { rows } = await sql<{ encoding: string }>`select getdatabaseencoding() as encoding`.execute(db);
  if (rows[0]?.encoding !== 'UTF8') return;
  await define(db, INLINABLE);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await define(db, ORIGINAL);
}
