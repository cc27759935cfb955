/**
 * Bulk audit writes: the link check of audit_events runs once per INSERT statement instead of
 * once per row, so `record(trx, events)` can append thousands of events in one set-based INSERT.
 *
 * The guarantee stays the one of 20261121000200_audit.ts: when an INSERT statement ends, every
 * row it inserted links to its predecessor (position 1 carries the zero hash as `prev_hash`,
 * every later position exactly the stored hash of position - 1; so no gap, no fork), or the
 * statement fails with the same errors as before ("audit: event N has no predecessor", "audit:
 * event N does not link to its predecessor", naming the lowest offending position). The check is
 * an AFTER … FOR EACH STATEMENT trigger over the transition table of the inserted rows: a row
 * whose predecessor was inserted by the same statement is compared with it in memory (a hash
 * join of the transition table with itself); only a row whose predecessor is not in the
 * statement — the first of a legitimate batch — is looked up in audit_events, by primary key.
 *
 * Plans: both trigger functions that probe audit_events by position (this one and the chain
 * head check) run with `enable_seqscan = off`. Their statements are prepared once per session
 * and may keep a generic plan made while the table was nearly empty (or analyzed so): a
 * sequential scan per lookup would then grow with the chain. The primary key always serves
 * these lookups.
 */
import { sql, type Kysely } from 'kysely';

const ZERO_HASH = sql.raw(`'\\x${'00'.repeat(32)}'::bytea`);

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    create function audit_events_check_links() returns trigger language plpgsql
    set enable_seqscan = off
    as $$
    declare
      candidate record;
      previous bytea;
    begin
      -- rows that do not visibly link to a predecessor inserted by this same statement
      for candidate in
        select n.position, n.prev_hash, p.hash as batch_previous
        from audit_events_inserted n
        left join audit_events_inserted p on p.position = n.position - 1
        where n.position = 1 or p.position is null or n.prev_hash <> p.hash
        order by n.position
      loop
        if candidate.position = 1 then
          previous := ${ZERO_HASH};
        elsif candidate.batch_previous is not null then
          previous := candidate.batch_previous;
        else
          select e.hash into previous from audit_events e where e.position = candidate.position - 1;
          if not found then
            raise exception 'audit: event % has no predecessor', candidate.position using errcode = 'integrity_constraint_violation';
          end if;
        end if;
        if candidate.prev_hash <> previous then
          raise exception 'audit: event % does not link to its predecessor', candidate.position using errcode = 'integrity_constraint_violation';
        end if;
      end loop;
      return null;
    end $$`.execute(db);
  await sql`drop trigger audit_events_link on audit_events`.execute(db);
  await sql`create trigger audit_events_link_statement after insert on audit_events
    referencing new table as audit_events_inserted
    for each statement execute function audit_events_check_links()`.execute(db);
  await sql`alter function audit_chain_head_check() set enable_seqscan = off`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await sql`alter function audit_chain_head_check() reset enable_seqscan`.execute(db);
  await sql`drop trigger audit_events_link_statement on audit_events`.execute(db);
  await sql`create trigger audit_events_link before insert on audit_events
    for each row execute function audit_events_check_link()`.execute(db);
  await sql`drop function audit_events_check_links()`.execute(db);
}
