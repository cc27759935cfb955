/**
 * The statement-level link check of audit_events (20261121000900_audit_bulk.ts) finds the rows
 * that do not link to a predecessor of the same statement with a window (lag over position)
 * instead of a self-join of the transition table.
 *
 * Why: PL/pgSQL plans that query once per session and keeps the plan. Planned on a first
 * INSERT of one event (a key delivery, a policy change), the self-join became a nested loop, and
 * a later 10,000-event INSERT on that connection (bulk enrolment, a rollout chunk) compared every
 * row with every row: ~0.7 ms per event, most of an enrolment's time (issue 7). A window over the
 * transition table is one sort, whatever plan was kept and however many rows come.
 *
 * Same guarantee, same errors, same lowest offending position.
 */
import { sql, type Kysely } from 'kysely';

const ZERO_HASH = sql.raw(`'\\x${'00'.repeat(32)}'::bytea`);

function checkLinks(candidates: ReturnType<typeof sql.raw>, predecessorInBatch: ReturnType<typeof sql.raw>) {
  return sql`
    create or replace function audit_events_check_links() returns trigger language plpgsql
    set enable_seqscan = off
    as $$
    declare
      candidate record;
      previous bytea;
    begin
      -- rows that do not visibly link to a predecessor inserted by this same statement
      for candidate in ${candidates}
      loop
        if candidate.position = 1 then
          previous := ${ZERO_HASH};
        elsif ${predecessorInBatch} then
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
    end $$`;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await checkLinks(
    sql.raw(`
        select s.position, s.prev_hash, s.batch_previous, s.batch_previous_position
        from (
          select n.position, n.prev_hash, lag(n.hash) over w as batch_previous, lag(n.position) over w as batch_previous_position
          from audit_events_inserted n
          window w as (order by n.position)
        ) s
        where s.position = 1 or s.batch_previous_position is distinct from s.position - 1 or s.prev_hash <> s.batch_previous
        order by s.position`),
    sql.raw('candidate.batch_previous_position = candidate.position - 1'),
  ).execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await checkLinks(
    sql.raw(`
        select n.position, n.prev_hash, p.hash as batch_previous
        from audit_events_inserted n
        left join audit_events_inserted p on p.position = n.position - 1
        where n.position = 1 or p.position is null or n.prev_hash <> p.hash
        order by n.position`),
    sql.raw('candidate.batch_previous is not null'),
  ).execute(db);
}
