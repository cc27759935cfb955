/**
 * Rotation (DESIGN §3): policies per level and per-group overrides with maintenance windows,
 * the KEK versions keystrata has seen (when each became the latest: rotation due dates and the
 * grace before min_decryption_version is raised), and short leases that keep two cron runs
 * from rotating the KEK twice. No key material in any of these tables.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  // Default policy of one level. A level without a row uses the built-in default
  // (src/rotation/policy.defaults.ts); PUT /v1/policies writes the row.
  await db.schema
    .createTable('rotation_policies')
    .addColumn('level', 'text', (c) => c.primaryKey().check(sql`level in ('kek','group','device','field')`))
    .addColumn('rotation_period_days', 'integer', (c) => c.notNull().check(sql`rotation_period_days between 1 and 3650`))
    .addColumn('grace_period_days', 'integer', (c) => c.notNull().check(sql`grace_period_days between 0 and 3650`))
    // null: decrypt_only versions are kept for ever
    .addColumn('retention_days', 'integer', (c) => c.check(sql`retention_days between 0 and 36500`))
    .addColumn('destruction_wait_days', 'integer', (c) => c.notNull().check(sql`destruction_wait_days between 1 and 30`))
    .addColumn('percent_per_day', 'double precision', (c) => c.check(sql`percent_per_day > 0 and percent_per_day <= 100`))
    .addColumn('halt_threshold', 'double precision', (c) => c.check(sql`halt_threshold >= 0 and halt_threshold <= 1`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_by', 'text', (c) => c.notNull())
    .execute();

  // Per-group override: a partial policy per level (JSON, validated by the service) and the
  // maintenance windows outside which cron starts no rotation of the group.
  await db.schema
    .createTable('group_policies')
    .addColumn('group_id', 'text', (c) => c.primaryKey().references('key_groups.id'))
    .addColumn('overrides', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('maintenance_windows', 'jsonb', (c) => c.notNull().defaultTo(sql`'[]'::jsonb`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_by', 'text', (c) => c.notNull())
    .execute();

  // When each KEK version became the latest, as keystrata saw it: `rotated` (keystrata rotated
  // it) or `observed` (found already there: the first version, or a rotation made in Vault).
  await db.schema
    .createTable('kek_versions')
    .addColumn('kek_name', 'text', (c) => c.notNull())
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('became_latest_at', 'timestamptz', (c) => c.notNull())
    .addColumn('source', 'text', (c) => c.notNull().check(sql`source in ('rotated','observed')`))
    .addPrimaryKeyConstraint('kek_versions_pk', ['kek_name', 'version'])
    .execute();

  // A lease on one piece of singleton work (the KEK rotation): taken with one conditional
  // upsert, renewed while the work runs, released at the end; a killed holder's lease expires.
  await db.schema
    .createTable('rotation_leases')
    .addColumn('name', 'text', (c) => c.primaryKey())
    .addColumn('holder', 'text', (c) => c.notNull())
    .addColumn('expires_at', 'timestamptz', (c) => c.notNull())
    .execute();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['rotation_leases', 'kek_versions', 'group_policies', 'rotation_policies']) {
    await db.schema.dropTable(table).execute();
  }
}
