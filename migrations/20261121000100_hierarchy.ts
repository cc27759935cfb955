/**
 * The key hierarchy: groups, devices, field keys, their versions, and backend clients.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

const STATES = `('pending','primary','grace','decrypt_only','disabled','destroy_scheduled','destroyed')`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('key_groups')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('device_type', 'text', (c) => c.notNull())
    .addColumn('region', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();

  await db.schema
    .createTable('group_versions')
    .addColumn('group_id', 'text', (c) => c.notNull().references('key_groups.id'))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${STATES}`)))
    .addColumn('wrapped_key', 'text')
    .addColumn('kek_version', 'integer', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_changed_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_until', 'timestamptz')
    .addPrimaryKeyConstraint('group_versions_pk', ['group_id', 'version'])
    // material is erased exactly when the version is destroyed
    .addCheckConstraint('group_versions_material', sql`(state = 'destroyed') = (wrapped_key is null)`)
    .execute();
  // exactly one primary per key (DESIGN §2)
  await sql`create unique index group_versions_one_primary on group_versions (group_id) where state = 'primary'`.execute(db);
  await sql`create index group_versions_kek_version on group_versions (kek_version) where wrapped_key is not null`.execute(db);

  await db.schema
    .createTable('devices')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('group_id', 'text', (c) => c.notNull().references('key_groups.id'))
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
  await db.schema.createIndex('devices_group').on('devices').columns(['group_id', 'id']).execute();

  await db.schema
    .createTable('device_versions')
    .addColumn('device_id', 'text', (c) => c.notNull().references('devices.id'))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${STATES}`)))
    .addColumn('wrapped_key', 'bytea')
    .addColumn('parent_version', 'integer', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_changed_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_until', 'timestamptz')
    .addPrimaryKeyConstraint('device_versions_pk', ['device_id', 'version'])
    .addCheckConstraint('device_versions_material', sql`(state = 'destroyed') = (wrapped_key is null)`)
    .execute();
  await sql`create unique index device_versions_one_primary on device_versions (device_id) where state = 'primary'`.execute(db);

  await db.schema
    .createTable('field_keys')
    .addColumn('device_id', 'text', (c) => c.notNull().references('devices.id'))
    .addColumn('field', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('field_keys_pk', ['device_id', 'field'])
    .execute();

  await db.schema
    .createTable('field_versions')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('field', 'text', (c) => c.notNull())
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('state', 'text', (c) => c.notNull().check(sql.raw(`state in ${STATES}`)))
    .addColumn('wrapped_key', 'bytea')
    .addColumn('parent_version', 'integer', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_changed_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('state_until', 'timestamptz')
    .addPrimaryKeyConstraint('field_versions_pk', ['device_id', 'field', 'version'])
    .addForeignKeyConstraint('field_versions_key', ['device_id', 'field'], 'field_keys', ['device_id', 'field'])
    .addCheckConstraint('field_versions_material', sql`(state = 'destroyed') = (wrapped_key is null)`)
    .execute();
  await sql`create unique index field_versions_one_primary on field_versions (device_id, field) where state = 'primary'`.execute(db);
  // children wrapped under a given device version (rotation debt, rewrap on device rotation)
  await db.schema.createIndex('field_versions_parent').on('field_versions').columns(['device_id', 'parent_version']).execute();

  await db.schema
    .createTable('clients')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('delivery_jwk', 'text', (c) => c.notNull())
    .addColumn('delivery_kid', 'text', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['clients', 'field_versions', 'field_keys', 'device_versions', 'devices', 'group_versions', 'key_groups']) {
    await db.schema.dropTable(table).execute();
  }
}
