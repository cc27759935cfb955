/**
 * State of the `local` KEK provider: which versions of a KEK exist and the minimum versions
 * allowed to decrypt / encrypt. No key material: version keys are derived from the root key.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('kek_local_keys')
    .addColumn('name', 'text', (c) => c.primaryKey())
    .addColumn('latest_version', 'integer', (c) => c.notNull().check(sql`latest_version >= 1`))
    .addColumn('min_decryption_version', 'integer', (c) => c.notNull().check(sql`min_decryption_version >= 1`))
    .addColumn('min_encryption_version', 'integer', (c) => c.notNull().defaultTo(0).check(sql`min_encryption_version >= 0`))
    .addColumn('root_key_check', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addCheckConstraint('kek_local_keys_min_decryption', sql`min_decryption_version <= latest_version`)
    .addCheckConstraint('kek_local_keys_min_encryption', sql`min_encryption_version <= latest_version`)
    .addCheckConstraint(
      'kek_local_keys_min_order',
      sql`min_encryption_version = 0 or min_encryption_version >= min_decryption_version`,
    )
    .execute();

  await db.schema
    .createTable('kek_local_versions')
    .addColumn('key_name', 'text', (c) => c.notNull().references('kek_local_keys.name').onDelete('cascade'))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('created_at', 'timestamptz', (c) => c.notNull())
    .addPrimaryKeyConstraint('kek_local_versions_pk', ['key_name', 'version'])
    .execute();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('kek_local_versions').execute();
  await db.schema.dropTable('kek_local_keys').execute();
}
