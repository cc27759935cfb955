/**
 * Key distribution to devices over MQTT (DESIGN §4).
 *
 *  - `key_outbox`: one row per key update a device must receive, written in the same
 *    transaction as the version change it announces. It holds ids, versions and states only:
 *    the payload (the new key wrapped under a device DEK version the device already holds) is
 *    built by the publisher at publish time, so no key material, wrapped or not, is stored here.
 *    Publishers take rows with short leases (`FOR UPDATE SKIP LOCKED`), one row per device at a
 *    time (the device's oldest pending row), so devices get their updates in order and no two
 *    replicas send the same row.
 *  - `key_acks`: which versions each device has acknowledged holding (authenticated acks only).
 *
 * `field` is '' for a device DEK (so it can be part of a key), a field name for a field key.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

const STATES = `('pending','primary','grace','decrypt_only','disabled','destroy_scheduled','destroyed')`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('key_outbox')
    .addColumn('id', 'bigserial', (c) => c.primaryKey())
    .addColumn('device_id', 'text', (c) => c.notNull().references('devices.id'))
    .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('device','field')`))
    .addColumn('field', 'text', (c) => c.notNull().defaultTo(''))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${STATES}`)))
    .addColumn('not_before', 'timestamptz')
    // the device DEK version the payload is wrapped (or, without a key, authenticated) under
    .addColumn('wrapped_by', 'integer', (c) => c.notNull().check(sql`wrapped_by >= 1`))
    // false: a state change of a version the device already holds (no key material in the message)
    .addColumn('with_key', 'boolean', (c) => c.notNull())
    .addColumn('status', 'text', (c) => c.notNull().defaultTo('pending').check(sql`status in ('pending','published','dropped')`))
    .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('next_attempt_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('lease_owner', 'text')
    .addColumn('lease_until', 'timestamptz')
    .addColumn('last_error', 'text')
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('published_at', 'timestamptz')
    .addCheckConstraint('key_outbox_field', sql`(kind = 'device') = (field = '')`)
    .addCheckConstraint('key_outbox_published', sql`(status = 'published') = (published_at is not null)`)
    .execute();
  // the publishers' work queue: a device's pending rows in order
  await sql`create index key_outbox_pending on key_outbox (device_id, id) where status = 'pending'`.execute(db);
  await sql`create index key_outbox_key on key_outbox (device_id, kind, field, version)`.execute(db);

  await db.schema
    .createTable('key_acks')
    .addColumn('device_id', 'text', (c) => c.notNull().references('devices.id'))
    .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('device','field')`))
    .addColumn('field', 'text', (c) => c.notNull().defaultTo(''))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('acknowledged_at', 'timestamptz', (c) => c.notNull())
    .addPrimaryKeyConstraint('key_acks_pk', ['device_id', 'kind', 'field', 'version'])
    .addCheckConstraint('key_acks_field', sql`(kind = 'device') = (field = '')`)
    .execute();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('key_acks').execute();
  await db.schema.dropTable('key_outbox').execute();
}
