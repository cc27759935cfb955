/**
 * Staggered rollouts (DESIGN §3): a rollout rotates one group's device DEKs (or field keys) in
 * waves, a few percent of the devices a day.
 *
 *  - `keystrata_rollout_bucket(device id)`: the device's place in every rollout, 0..9999, from
 *    the first 4 bytes of SHA-256 of its id (UTF-8), read as an unsigned big-endian integer,
 *    mod 10000. The same on every run and every replica (src/rotation/rollout.waves.ts computes
 *    it in Node the same way, and a test checks they agree). Each rollout turns the buckets by
 *    its own offset, so successive rollouts do not always start with the same devices.
 *    An expression index on (group_id, bucket, id) lets a wave find its devices by bucket range
 *    without hashing the whole group.
 *  - `rollouts`: one row per rollout, its settings and state; at most one active rollout per
 *    group and level (partial unique index).
 *  - `rollout_waves`: one row per wave (created with the rollout), with its bucket range, how far
 *    its device list has been built, and its counters (updated in each chunk's transaction).
 *  - `rollout_items`: one row per (rollout, device): `pending` until a chunk rotates it
 *    (`done`), fails it (`failed`, with the reason) or skips it (`skipped`); a rollback turns
 *    `done` into `rolled_back` (or `rollback_failed`). The primary key is what makes a device
 *    rotate at most once per rollout; the partial index on pending items is the work queue.
 *    No foreign keys on this bulk table (a million rows per rollout): devices are never
 *    deleted, and items are written only by the rollout module.
 *
 * No key material in any of these tables. Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

const ROLLOUT_STATES = `('running','paused','halted','rolling_back','rolled_back','cancelled','completed')`;
const WAVE_STATES = `('scheduled','running','completed','halted','rolling_back','rolled_back','cancelled')`;
const ITEM_STATUSES = `('pending','done','failed','skipped','rolled_back','rollback_failed')`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    create function keystrata_rollout_bucket(device_id text) returns integer
      language sql immutable strict parallel safe
      as $$ select (('x' || encode(substring(sha256(convert_to(device_id, 'UTF8')) from 1 for 4), 'hex'))::bit(32)::bigint % 10000)::integer $$`.execute(db);
  await sql`create index devices_rollout_bucket on devices (group_id, keystrata_rollout_bucket(id), id)`.execute(db);

  await db.schema
    .createTable('rollouts')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('group_id', 'text', (c) => c.notNull().references('key_groups.id'))
    .addColumn('level', 'text', (c) => c.notNull().check(sql`level in ('device','field')`))
    // field level: one field type, or null for every field key of the device
    .addColumn('field', 'text')
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${ROLLOUT_STATES}`)))
    .addColumn('reason', 'text', (c) => c.notNull().check(sql`reason in ('manual','policy')`))
    .addColumn('percent_per_day', 'double precision', (c) => c.notNull().check(sql`percent_per_day > 0 and percent_per_day <= 100`))
    .addColumn('canary_percent', 'double precision', (c) => c.check(sql`canary_percent > 0 and canary_percent < 100`))
    .addColumn('wave_interval_seconds', 'integer', (c) => c.notNull().check(sql`wave_interval_seconds between 1 and 31536000`))
    .addColumn('halt_threshold', 'double precision', (c) => c.notNull().check(sql`halt_threshold >= 0 and halt_threshold <= 1`))
    .addColumn('rollback_on_halt', 'boolean', (c) => c.notNull())
    .addColumn('bucket_offset', 'integer', (c) => c.notNull().check(sql`bucket_offset between 0 and 9999`))
    .addColumn('wave_count', 'integer', (c) => c.notNull().check(sql`wave_count between 1 and 10001`))
    .addColumn('started_at', 'timestamptz', (c) => c.notNull())
    // the schedule moves by the time spent paused or halted: wave k is due at started_at + paused_ms + k × interval
    .addColumn('paused_ms', 'bigint', (c) => c.notNull().defaultTo(0).check(sql`paused_ms >= 0`))
    // since when it is paused or halted
    .addColumn('paused_at', 'timestamptz')
    .addColumn('halted_wave', 'integer')
    .addColumn('halt_reason', 'text')
    .addColumn('finished_at', 'timestamptz')
    .addColumn('created_by', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull())
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull())
    .addCheckConstraint('rollouts_field', sql`level = 'field' or field is null`)
    .addCheckConstraint('rollouts_paused', sql`(state in ('paused','halted')) = (paused_at is not null)`)
    .execute();
  // no two active rollouts of one group and level
  await sql`create unique index rollouts_one_active on rollouts (group_id, level) where state in ('running','paused','halted','rolling_back')`.execute(db);
  await sql`create index rollouts_active on rollouts (started_at, id) where state in ('running','rolling_back')`.execute(db);
  await db.schema.createIndex('rollouts_group').on('rollouts').columns(['group_id', 'level', 'started_at']).execute();
  await db.schema.createIndex('rollouts_listing').on('rollouts').columns(['created_at', 'id']).execute();

  await db.schema
    .createTable('rollout_waves')
    .addColumn('rollout_id', 'text', (c) => c.notNull().references('rollouts.id'))
    .addColumn('wave', 'integer', (c) => c.notNull().check(sql`wave >= 0`))
    .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('canary','wave','sweep')`))
    // the wave's share of the (turned) bucket space, [bucket_from, bucket_to)
    .addColumn('bucket_from', 'integer', (c) => c.notNull().check(sql`bucket_from between 0 and 10000`))
    .addColumn('bucket_to', 'integer', (c) => c.notNull().check(sql`bucket_to between 0 and 10000`))
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${WAVE_STATES}`)))
    // how far the device list has been built (turned bucket); = bucket_to once complete
    .addColumn('listed_to', 'integer', (c) => c.notNull())
    .addColumn('devices', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('done', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('failed', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('skipped', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('rolled_back', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('rollback_failed', 'integer', (c) => c.notNull().defaultTo(0))
    // counters when the rollout was last resumed after a halt: the halt rule looks at what came after
    .addColumn('base_done', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('base_failed', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('started_at', 'timestamptz')
    .addColumn('finished_at', 'timestamptz')
    .addPrimaryKeyConstraint('rollout_waves_pk', ['rollout_id', 'wave'])
    .addCheckConstraint('rollout_waves_range', sql`bucket_from <= bucket_to and listed_to between bucket_from and bucket_to`)
    .execute();

  await db.schema
    .createTable('rollout_items')
    .addColumn('rollout_id', 'text', (c) => c.notNull())
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('wave', 'integer', (c) => c.notNull())
    .addColumn('status', 'text', (c) => c.notNull().check(sql.raw(`status in ${ITEM_STATUSES}`)))
    // device level: the device DEK versions before and after the rotation
    .addColumn('from_version', 'integer')
    .addColumn('to_version', 'integer')
    // field level: [[field, from version, to version], …] of the field keys rotated
    .addColumn('fields', 'jsonb')
    .addColumn('reason', 'text')
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull())
    .addPrimaryKeyConstraint('rollout_items_pk', ['rollout_id', 'device_id'])
    .execute();
  await sql`create index rollout_items_pending on rollout_items (rollout_id, wave, device_id) where status = 'pending'`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('rollout_items').execute();
  await db.schema.dropTable('rollout_waves').execute();
  await db.schema.dropTable('rollouts').execute();
  await sql`drop index devices_rollout_bucket`.execute(db);
  await sql`drop function keystrata_rollout_bucket(text)`.execute(db);
}
