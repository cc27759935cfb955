/**
 * The audit log (DESIGN §6): an append-only, keyed-hash-chained event table, the chain head that
 * every writer locks, the audit keys (stored only wrapped by the KEK) and signed checkpoints.
 * Frozen once merged: later changes go in new migrations.
 *
 * What the database enforces by itself (defence in depth; `keystrata audit verify` checks it all
 * again with the audit key, and catches tampering done with these triggers disabled):
 *   - audit_events and audit_checkpoints refuse UPDATE, DELETE and TRUNCATE;
 *   - an event links to its predecessor: position 1 carries the zero hash as `prev_hash`, every
 *     later position carries exactly the stored hash of position - 1 (so no gap, no fork);
 *   - the single chain-head row cannot be deleted, never moves backwards and always names an
 *     existing event's (position, hash);
 *   - audit_keys rows cannot be deleted (losing the audit key makes the log unverifiable);
 *     UPDATE stays allowed so a KEK rotation can rewrap them.
 *
 * Application role. When the setting `keystrata.app_role` names a role at migration time, the
 * migration revokes from it what it must never do on these tables (UPDATE/DELETE/TRUNCATE/
 * TRIGGER on events and checkpoints, DELETE/TRUNCATE/TRIGGER on keys and head, INSERT on head).
 * Set it for the migrating session, e.g. `PGOPTIONS='-c keystrata.app_role=keystrata_app'
 * keystrata migrate`, or `ALTER DATABASE … SET keystrata.app_role = 'keystrata_app'`. A setting
 * that names a missing role fails the migration (a typo must not silently skip the revoke).
 * This only helps when migrations run as a different role (the owner) than the service: an owner
 * can re-grant itself anything and disable triggers.
 */
import { sql, type Kysely } from 'kysely';

const ZERO_HASH = sql.raw(`'\\x${'00'.repeat(32)}'::bytea`);

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('audit_events')
    .addColumn('position', 'bigint', (c) => c.primaryKey().check(sql`position >= 1`))
    .addColumn('occurred_at', 'timestamptz', (c) => c.notNull())
    .addColumn('actor', 'text', (c) => c.notNull())
    .addColumn('action', 'text', (c) => c.notNull())
    .addColumn('outcome', 'text', (c) => c.notNull().check(sql`outcome in ('success','failure','denied')`))
    .addColumn('key_id', 'text')
    .addColumn('details', 'jsonb', (c) => c.notNull().defaultTo(sql`'{}'::jsonb`))
    .addColumn('request_id', 'text')
    .addColumn('prev_hash', 'bytea', (c) => c.notNull().check(sql`octet_length(prev_hash) = 32`))
    .addColumn('hash', 'bytea', (c) => c.notNull().check(sql`octet_length(hash) = 32`))
    .execute();
  // query filters, each ordered by position (the cursor); text_pattern_ops also serves keyIdPrefix
  await sql`create index audit_events_actor on audit_events (actor, position)`.execute(db);
  await sql`create index audit_events_action on audit_events (action, position)`.execute(db);
  await sql`create index audit_events_key_id on audit_events (key_id text_pattern_ops, position) where key_id is not null`.execute(db);
  await sql`create index audit_events_occurred_at on audit_events (occurred_at)`.execute(db);
  await sql`create index audit_events_not_success on audit_events (outcome, position) where outcome <> 'success'`.execute(db);

  // exactly one row; position 0 / zero hash = empty chain
  await db.schema
    .createTable('audit_chain_head')
    .addColumn('id', 'smallint', (c) => c.primaryKey().check(sql`id = 1`))
    .addColumn('position', 'bigint', (c) => c.notNull().check(sql`position >= 0`))
    .addColumn('hash', 'bytea', (c) => c.notNull().check(sql`octet_length(hash) = 32`))
    .execute();
  await sql`insert into audit_chain_head (id, position, hash) values (1, 0, ${ZERO_HASH})`.execute(db);

  await db.schema
    .createTable('audit_keys')
    .addColumn('purpose', 'text', (c) => c.notNull().check(sql`purpose in ('hmac','checkpoint')`))
    .addColumn('version', 'integer', (c) => c.notNull().check(sql`version >= 1`))
    .addColumn('wrapped_key', 'text', (c) => c.notNull())
    .addColumn('kek_version', 'integer', (c) => c.notNull())
    .addColumn('created_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('audit_keys_pk', ['purpose', 'version'])
    .execute();
  await sql`create index audit_keys_kek_version on audit_keys (kek_version)`.execute(db);

  await db.schema
    .createTable('audit_checkpoints')
    .addColumn('id', 'bigserial', (c) => c.primaryKey())
    .addColumn('position', 'bigint', (c) => c.notNull().check(sql`position >= 0`))
    .addColumn('hash', 'bytea', (c) => c.notNull().check(sql`octet_length(hash) = 32`))
    .addColumn('signed_at', 'timestamptz', (c) => c.notNull())
    .addColumn('kid', 'text', (c) => c.notNull())
    .addColumn('jws', 'text', (c) => c.notNull())
    .execute();
  await sql`create index audit_checkpoints_position on audit_checkpoints (position)`.execute(db);

  await sql`
    create function audit_refuse_change() returns trigger language plpgsql as $$
    begin
      raise exception 'audit: % on % is not allowed (append-only)', tg_op, tg_table_name
        using errcode = 'insufficient_privilege';
    end $$`.execute(db);

  await sql`
    create function audit_events_check_link() returns trigger language plpgsql as $$
    declare
      previous bytea;
    begin
      if new.position = 1 then
        previous := ${ZERO_HASH};
      else
        select hash into previous from audit_events where position = new.position - 1;
        if not found then
          raise exception 'audit: event % has no predecessor', new.position using errcode = 'integrity_constraint_violation';
        end if;
      end if;
      if new.prev_hash <> previous then
        raise exception 'audit: event % does not link to its predecessor', new.position using errcode = 'integrity_constraint_violation';
      end if;
      return new;
    end $$`.execute(db);

  await sql`
    create function audit_chain_head_check() returns trigger language plpgsql as $$
    begin
      if new.id <> old.id or new.position < old.position then
        raise exception 'audit: the chain head never moves backwards' using errcode = 'integrity_constraint_violation';
      end if;
      if new.position = 0 then
        if new.hash <> ${ZERO_HASH} then
          raise exception 'audit: the empty chain has the zero hash' using errcode = 'integrity_constraint_violation';
        end if;
      elsif not exists (select 1 from audit_events where position = new.position and hash = new.hash) then
        raise exception 'audit: the chain head must name an existing event' using errcode = 'integrity_constraint_violation';
      end if;
      return new;
    end $$`.execute(db);

  for (const table of ['audit_events', 'audit_checkpoints']) {
    await sql`create trigger ${sql.id(`${table}_no_update_delete`)} before update or delete on ${sql.table(table)}
      for each row execute function audit_refuse_change()`.execute(db);
    await sql`create trigger ${sql.id(`${table}_no_truncate`)} before truncate on ${sql.table(table)}
      for each statement execute function audit_refuse_change()`.execute(db);
  }
  await sql`create trigger audit_events_link before insert on audit_events
    for each row execute function audit_events_check_link()`.execute(db);
  await sql`create trigger audit_chain_head_no_delete before delete on audit_chain_head
    for each row execute function audit_refuse_change()`.execute(db);
  await sql`create trigger audit_chain_head_no_truncate before truncate on audit_chain_head
    for each statement execute function audit_refuse_change()`.execute(db);
  await sql`create trigger audit_chain_head_check before update on audit_chain_head
    for each row execute function audit_chain_head_check()`.execute(db);
  await sql`create trigger audit_keys_no_delete before delete on audit_keys
    for each row execute function audit_refuse_change()`.execute(db);
  await sql`create trigger audit_keys_no_truncate before truncate on audit_keys
    for each statement execute function audit_refuse_change()`.execute(db);

  await sql`
    do $$
    declare
      app_role text := nullif(current_setting('keystrata.app_role', true), '');
    begin
      if app_role is null then
        return;
      end if;
      if not exists (select 1 from pg_roles where rolname = app_role) then
        raise exception 'keystrata.app_role names role "%", which does not exist', app_role;
      end if;
      execute format('revoke update, delete, truncate, trigger on audit_events, audit_checkpoints from %I', app_role);
      execute format('revoke insert, delete, truncate, trigger on audit_chain_head from %I', app_role);
      execute format('revoke delete, truncate, trigger on audit_keys from %I', app_role);
    end $$`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['audit_checkpoints', 'audit_keys', 'audit_chain_head', 'audit_events']) {
    await db.schema.dropTable(table).execute();
  }
  for (const fn of ['audit_chain_head_check', 'audit_events_check_link', 'audit_refuse_change']) {
    await sql`drop function ${sql.id(fn)}()`.execute(db);
  }
}
