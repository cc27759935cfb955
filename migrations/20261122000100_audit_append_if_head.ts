/**
 * `audit_append_if_head(...)`: append a batch of events in ONE statement, if the chain head is
 * still where the writer last saw it (issue 7).
 *
 * Why: the group commit of key deliveries appended each batch as BEGIN, lock the head, INSERT,
 * update the head, COMMIT: five round trips. At ~2,000 deliveries a second a batch holds a few
 * events, and those writes were about an eighth of the server's CPU (a socket write that wakes a
 * backend costs tens of µs on this machine). The writer knows the head it left behind; this
 * function locks the head, and only if it is unchanged inserts the events and moves the head,
 * all in the one statement's transaction. Otherwise (another process appended in between) it
 * changes nothing and returns the current head, and the writer hashes its events again on top
 * of that. The triggers check every row exactly as for any other INSERT.
 */
import { sql, type Kysely } from 'kysely';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    create function audit_append_if_head(
      p_expected_position int8, p_expected_hash bytea, p_occurred_at timestamptz, p_chain bytea,
      p_actors text[], p_actions text[], p_outcomes text[], p_key_ids text[], p_details text[], p_request_ids text[]
    ) returns table (head_position int8, head_hash bytea, appended boolean)
    language plpgsql as $$
    declare
      current_position int8;
      current_hash bytea;
      event_count int8 := cardinality(p_actors);
    begin
      select h.position, h.hash into current_position, current_hash from audit_chain_head h where h.id = 1 for update;
      if current_position <> p_expected_position or current_hash <> p_expected_hash then
        return query select current_position, current_hash, false;
        return;
      end if;
      if event_count < 1 or octet_length(p_chain) <> 32 * (event_count + 1) then
        raise exception 'audit: % events need % chain bytes', event_count, 32 * (event_count + 1) using errcode = 'invalid_parameter_value';
      end if;
      insert into audit_events (position, occurred_at, actor, action, outcome, key_id, details, request_id, prev_hash, hash)
      select p_expected_position + e.ord, p_occurred_at, e.actor, e.action, e.outcome, e.key_id,
             cast(e.details as jsonb), e.request_id, substring(p_chain, (32 * e.ord - 31)::int, 32), substring(p_chain, (32 * e.ord + 1)::int, 32)
      from unnest(p_actors, p_actions, p_outcomes, p_key_ids, p_details, p_request_ids)
             with ordinality as e(actor, action, outcome, key_id, details, request_id, ord)
      order by e.ord;
      update audit_chain_head set position = p_expected_position + event_count, hash = substring(p_chain, (32 * event_count + 1)::int, 32) where id = 1;
      return query select p_expected_position + event_count, substring(p_chain, (32 * event_count + 1)::int, 32), true;
    end $$`.execute(db);
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export async function down(db: Kysely<any>): Promise<void> {
  await sql`drop function audit_append_if_head(int8, bytea, timestamptz, bytea, text[], text[], text[], text[], text[], text[])`.execute(db);
}
