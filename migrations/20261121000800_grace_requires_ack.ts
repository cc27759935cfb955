/**
 * Grace hold for acknowledgements (issue 6, part 4): two policy settings of the device and
 * field levels.
 *
 *  - `grace_requires_ack`: a version whose grace has ended stays in `grace` (is not moved to
 *    `decrypt_only`) while its successor was sent to the device over MQTT and the device has
 *    acknowledged no newer version. null for the kek and group levels (nothing is sent to a
 *    device); true for stored device and field rows (the built-in default).
 *  - `grace_ack_max_hold_days`: the bound of that hold, counted from the grace's end: after it
 *    the version moves on anyway, so a dead device cannot freeze rotation forever. null for the
 *    kek and group levels; 30 for stored device and field rows.
 *
 * Per-group overrides are jsonb (group_policies.overrides) and partial: nothing to migrate.
 * Frozen once merged: later changes go in new migrations.
 */
import { sql, type Kysely } from 'kysely';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('rotation_policies').addColumn('grace_requires_ack', 'boolean').execute();
  await db.schema
    .alterTable('rotation_policies')
    .addColumn('grace_ack_max_hold_days', 'integer', (c) => c.check(sql`grace_ack_max_hold_days between 1 and 3650`))
    .execute();
  // rows stored before this migration get the built-in defaults of their level
  await sql`update rotation_policies set grace_requires_ack = true, grace_ack_max_hold_days = 30 where level in ('device', 'field')`.execute(db);
  await sql`alter table rotation_policies add constraint rotation_policies_grace_ack_levels check (
    (level in ('device', 'field')) = (grace_requires_ack is not null and grace_ack_max_hold_days is not null)
    and (level in ('device', 'field') or (grace_requires_ack is null and grace_ack_max_hold_days is null)))`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await sql`alter table rotation_policies drop constraint rotation_policies_grace_ack_levels`.execute(db);
  await db.schema.alterTable('rotation_policies').dropColumn('grace_ack_max_hold_days').execute();
  await db.schema.alterTable('rotation_policies').dropColumn('grace_requires_ack').execute();
}
