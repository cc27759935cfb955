/**
 * Crypto-shredding that can be cancelled (DESIGN §2): a device whose destruction is requested
 * remembers when it becomes final (`devices.destroy_after`), and each version it moved to
 * `destroy_scheduled` remembers its previous state and state end, so a restore during the
 * waiting period puts every version back exactly where it was. Partial indexes let the sweeps
 * (grace expiry, due destructions) find their work without scanning every version.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

const RESTORABLE = `('pending','primary','grace','decrypt_only','disabled')`;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  // null: not being destroyed; set: destruction requested, final at this time (stays once destroyed)
  await db.schema.alterTable('devices').addColumn('destroy_after', 'timestamptz').execute();

  for (const table of ['device_versions', 'field_versions']) {
    await db.schema
      .alterTable(table)
      .addColumn('state_before_destroy', 'text', (c) => c.check(sql.raw(`state_before_destroy in ${RESTORABLE}`)))
      .addColumn('state_until_before_destroy', 'timestamptz')
      .execute();
    // only a version scheduled for (or past) destruction remembers what it was before
    await db.schema
      .alterTable(table)
      .addCheckConstraint(`${table}_before_destroy`, sql`state_before_destroy is null or state in ('destroy_scheduled', 'destroyed')`)
      .execute();
    await sql`create index ${sql.raw(`${table}_due`)} on ${sql.table(table)} (state, state_until) where state in ('grace', 'destroy_scheduled')`.execute(db);
  }
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['field_versions', 'device_versions']) {
    await db.schema.dropIndex(`${table}_due`).execute();
    await db.schema.alterTable(table).dropConstraint(`${table}_before_destroy`).execute();
    await db.schema.alterTable(table).dropColumn('state_until_before_destroy').dropColumn('state_before_destroy').execute();
  }
  await db.schema.alterTable('devices').dropColumn('destroy_after').execute();
}
