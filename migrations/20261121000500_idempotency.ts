/**
 * Idempotency-Key (src/http/idempotency.ts): one row per (client `sub`, key). A row is
 * `in_flight` from the moment the first request is admitted until its answer is stored, then
 * `completed` with the status, content type and body that a retry gets back instead of running
 * the request again. Rows live until `expires_at` (24 h by default), then are purged or reused.
 * The fingerprint is SHA-256 (hex) over method, path and canonical body: the same key with
 * another request is refused. No key material is ever stored here (the code refuses it).
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('idempotency_keys')
    .addColumn('principal', 'text', (c) => c.notNull().check(sql`length(principal) between 1 and 256`))
    .addColumn('idempotency_key', 'text', (c) => c.notNull().check(sql`length(idempotency_key) between 1 and 255`))
    .addColumn('fingerprint', 'text', (c) => c.notNull().check(sql`fingerprint ~ '^[0-9a-f]{64}$'`))
    .addColumn('method', 'text', (c) => c.notNull())
    .addColumn('path', 'text', (c) => c.notNull())
    .addColumn('state', 'text', (c) => c.notNull().check(sql`state in ('in_flight', 'completed')`))
    .addColumn('request_id', 'text', (c) => c.notNull())
    .addColumn('status_code', 'integer', (c) => c.check(sql`status_code between 100 and 599`))
    .addColumn('content_type', 'text')
    .addColumn('body', 'text')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull())
    .addColumn('completed_at', 'timestamptz')
    .addColumn('expires_at', 'timestamptz', (c) => c.notNull())
    .addPrimaryKeyConstraint('idempotency_keys_pk', ['principal', 'idempotency_key'])
    // a completed row has its answer; an in-flight one has none yet
    .addCheckConstraint(
      'idempotency_keys_answer',
      sql`(state = 'completed') = (status_code is not null and body is not null and completed_at is not null)`,
    )
    .execute();
  await db.schema.createIndex('idempotency_keys_expires').on('idempotency_keys').column('expires_at').execute();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('idempotency_keys').execute();
}
