import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import type { AuditEventInput } from '../../src/audit/audit.types.js';
import { auditKeyBinding } from '../../src/audit/audit.service.js';
import { UnavailableError } from '../../src/http/errors.js';
import { createAuditFixture, type AuditFixture } from './support.js';

const event = (actor: string, extra: Partial<AuditEventInput> = {}): AuditEventInput => ({ actor, action: 'test.write', outcome: 'success', ...extra });

describe('audit writes', () => {
  let f: AuditFixture;
  beforeAll(async () => {
    f = await createAuditFixture();
  });
  afterAll(async () => f.close());

  async function positions(): Promise<Array<{ position: number; actor: string }>> {
    const rows = await f.database.db.selectFrom('audit_events').select(['position', 'actor']).orderBy('position').execute();
    return rows.map((r) => ({ position: Number(r.position), actor: r.actor }));
  }

  it('when 200 requests write at once (transactions, group-committed reads, a second replica), then there is one unbroken chain holding every event once', async () => {
    const before = await f.audit.chainLength();
    const replica = await f.replica({ batchWindowMs: 2 });
    const db = f.database.db;
    const work: Array<Promise<unknown>> = [];
    for (let i = 0; i < 200; i++) {
      const writer = i % 2 === 0 ? f.audit : replica;
      if (i % 4 < 2) {
        // a change: its own transaction with 1–3 events
        work.push(db.transaction().execute((trx) => writer.record(trx, Array.from({ length: (i % 3) + 1 }, (_, j) => event(`tx-${i}-${j}`)))));
      } else {
        work.push(writer.recordRead([event(`read-${i}`, { action: 'key.deliver' })]));
      }
    }
    await Promise.all(work);

    const rows = (await positions()).filter((r) => r.position > before);
    const expected = [...Array(200).keys()].reduce((n, i) => n + (i % 4 < 2 ? (i % 3) + 1 : 1), 0);
    expect(rows.length).toBe(expected);
    expect(rows.map((r) => r.position)).toEqual(rows.map((_, k) => before + 1 + k));
    expect(new Set(rows.map((r) => r.actor)).size).toBe(rows.length);
    expect(await f.audit.chainLength()).toBe(before + rows.length);
    expect(await f.audit.verify()).toMatchObject({ ok: true, checked: before + rows.length, headPosition: before + rows.length });
  });

  it('when one transaction records hundreds of events, then the chain head is locked and updated once', async () => {
    const counts = await f.database.db.transaction().execute(async (trx) => {
      // per-backend counters, so compare before and after inside the one transaction
      const read = async () =>
        (
          await sql<{ head_updates: string; inserted: string }>`
            select pg_stat_get_xact_tuples_updated('audit_chain_head'::regclass) as head_updates,
                   pg_stat_get_xact_tuples_inserted('audit_events'::regclass) as inserted`.execute(trx)
        ).rows[0];
      const before = await read();
      await f.audit.record(trx, Array.from({ length: 1500 }, (_, i) => event(`bulk-${i}`)));
      const after = await read();
      return { headUpdates: Number(after?.head_updates) - Number(before?.head_updates), inserted: Number(after?.inserted) - Number(before?.inserted) };
    });
    expect(counts).toEqual({ headUpdates: 1, inserted: 1500 });
    expect((await f.audit.verify()).ok).toBe(true);
  });

  it('when record is given the database handle instead of a transaction, then it opens one of its own', async () => {
    const before = await f.audit.chainLength();
    await f.audit.record(f.database.db, [event('no-trx-1'), event('no-trx-2')]);
    expect(await f.audit.chainLength()).toBe(before + 2);
  });

  it('when the audit insert fails, then the change it belonged to leaves nothing behind and the chain is unchanged', async () => {
    const db = f.database.db;
    const before = await f.audit.chainLength();
    await sql`create function test_refuse_boom() returns trigger language plpgsql as $$
      begin if new.actor = 'boom' then raise exception 'audit storage failure'; end if; return new; end $$`.execute(db);
    await sql`create trigger test_refuse_boom before insert on audit_events for each row execute function test_refuse_boom()`.execute(db);
    try {
      await expect(
        db.transaction().execute(async (trx) => {
          await trx.insertInto('key_groups').values({ id: 'rolled-back', device_type: 'pump', region: 'eu' }).execute();
          await f.audit.record(trx, [event('fine'), event('boom')]);
        }),
      ).rejects.toThrow(/audit storage failure/);
      expect(await db.selectFrom('key_groups').select('id').where('id', '=', 'rolled-back').executeTakeFirst()).toBeUndefined();
      expect(await f.audit.chainLength()).toBe(before);

      // a group commit holding the bad event fails every request in it (fail closed) …
      const batch = await Promise.allSettled([f.audit.recordRead([event('read-ok')]), f.audit.recordRead([event('boom')])]);
      expect(batch.map((r) => r.status)).toEqual(['rejected', 'rejected']);
      const reason = (batch[0] as PromiseRejectedResult).reason as Error;
      expect(reason).toBeInstanceOf(UnavailableError);
      expect(reason.message).not.toMatch(/boom|local:v/);
      expect(await f.audit.chainLength()).toBe(before);
    } finally {
      await sql`drop trigger test_refuse_boom on audit_events`.execute(db);
      await sql`drop function test_refuse_boom()`.execute(db);
    }
    // … and the next one goes through, at the very next position
    await f.audit.recordRead([event('after-failure')]);
    expect(await f.audit.chainLength()).toBe(before + 1);
    expect((await f.audit.verify()).ok).toBe(true);
  });

  it('when the caller rolls back after recording, then its events vanish without leaving a gap', async () => {
    const before = await f.audit.chainLength();
    await expect(
      f.database.db.transaction().execute(async (trx) => {
        await f.audit.record(trx, [event('doomed-1'), event('doomed-2')]);
        throw new Error('the change failed after its audit');
      }),
    ).rejects.toThrow(/the change failed/);
    await f.audit.record(f.database.db, [event('survivor')]);
    const last = (await positions()).at(-1);
    expect(last).toEqual({ position: before + 1, actor: 'survivor' });
    expect((await f.audit.verify()).ok).toBe(true);
  });

  it('when a read is audited, then its promise resolves only once the event is committed and visible to others', async () => {
    await f.audit.recordRead([event('visible-reader', { requestId: 'req-visible' })]);
    const row = await f.database.db.selectFrom('audit_events').select('actor').where('request_id', '=', 'req-visible').executeTakeFirst();
    expect(row?.actor).toBe('visible-reader');
  });

  it('when one request brings an invalid event, then only that request fails', async () => {
    const results = await Promise.allSettled([f.audit.recordRead([event('good-neighbour')]), f.audit.recordRead([event('', { action: '' })])]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected']);
  });

  it('when the service closes with reads still queued, then they are committed first and later reads are refused', async () => {
    const service = await f.replica({ batchWindowMs: 50 });
    const pending = service.recordRead([event('queued-at-close')]);
    await service.close();
    await expect(pending).resolves.toBeUndefined();
    expect(await f.database.db.selectFrom('audit_events').select('position').where('actor', '=', 'queued-at-close').executeTakeFirst()).toBeDefined();
    await expect(service.recordRead([event('too-late')])).rejects.toBeInstanceOf(UnavailableError);
  });

  it('when the chain is written, then its rows cannot be updated, deleted or truncated, nor can a row be appended out of line', async () => {
    const db = f.database.db;
    await expect(sql`update audit_events set actor = 'mallory' where position = 1`.execute(db)).rejects.toThrow(/append-only/);
    await expect(sql`delete from audit_events where position = 1`.execute(db)).rejects.toThrow(/append-only/);
    await expect(sql`truncate audit_events`.execute(db)).rejects.toThrow(/append-only/);
    await expect(sql`delete from audit_chain_head`.execute(db)).rejects.toThrow(/append-only/);
    await expect(sql`update audit_chain_head set position = position - 1`.execute(db)).rejects.toThrow(/never moves backwards/);
    await expect(sql`delete from audit_keys`.execute(db)).rejects.toThrow(/append-only/);
    const head = await f.audit.chainLength();
    await expect(
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, prev_hash, hash)
          values (${head + 2}, now(), 'mallory', 'x', 'success', ${Buffer.alloc(32)}, ${Buffer.alloc(32, 1)})`.execute(db),
    ).rejects.toThrow(/no predecessor/);
    await expect(
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, prev_hash, hash)
          values (${head + 1}, now(), 'mallory', 'x', 'success', ${Buffer.alloc(32)}, ${Buffer.alloc(32, 1)})`.execute(db),
    ).rejects.toThrow(/does not link/);
  });

  it('when two replicas create the audit keys at once, then exactly one key of each kind is stored, only wrapped, bound to its row', async () => {
    const fresh = await createAuditFixture({ init: false });
    try {
      const replicas = [fresh.audit, await fresh.replica({ init: false }), await fresh.replica({ init: false })];
      await Promise.all(replicas.map((r) => r.init()));
      await Promise.all(replicas.map((r, i) => r.record(fresh.database.db, [event(`replica-${i}`)])));
      for (const r of replicas) expect((await r.verify()).ok).toBe(true);
      const keys = await fresh.database.db.selectFrom('audit_keys').select(['purpose', 'version', 'wrapped_key', 'kek_version']).orderBy('purpose').execute();
      expect(keys.map((k) => [k.purpose, k.version, k.kek_version])).toEqual([
        ['checkpoint', 1, 1],
        ['hmac', 1, 1],
      ]);
      const hmac = keys.find((k) => k.purpose === 'hmac');
      expect(hmac?.wrapped_key).toMatch(/^local:v1:/);
      const plaintext = await fresh.kek.unwrap(hmac?.wrapped_key ?? '', auditKeyBinding('hmac', 1, fresh.kek.keyName));
      expect(plaintext.length).toBe(32);
      // the blob is bound to its row: under another row's binding it does not unwrap
      await expect(fresh.kek.unwrap(hmac?.wrapped_key ?? '', auditKeyBinding('checkpoint', 1, fresh.kek.keyName))).rejects.toThrow();
      // and no audit table holds the plaintext
      const dump = JSON.stringify(await sql`select (select json_agg(e) from audit_events e) as events, (select json_agg(k) from audit_keys k) as keys`.execute(fresh.database.db));
      expect(dump).not.toContain(plaintext.toString('hex'));
      expect(dump).not.toContain(plaintext.toString('base64'));
    } finally {
      await fresh.close();
    }
  });

  it('when the KEK rotates, then the audit keys are rewrapped to the new version and the chain still verifies', async () => {
    await f.audit.init();
    expect(await f.audit.kekVersionsInUse()).toEqual([1]);
    await f.kek.rotate();
    expect(await f.audit.rewrapKeys()).toEqual({ rewrapped: 2, failed: 0 });
    expect(await f.audit.kekVersionsInUse()).toEqual([2]);
    const restarted = await f.replica({ init: false });
    expect((await restarted.verify()).ok).toBe(true);
  });

  it('when the service logs a failure, then no wrapped blob or key material is in the log', async () => {
    const lines: string[] = [];
    const capture = (level: string) => (obj: object, msg: string) => lines.push(JSON.stringify({ level, msg, obj, err: String((obj as { err?: unknown }).err) }));
    const service = await f.replica({ init: false, logger: { info: capture('info'), warn: capture('warn'), error: capture('error') } });
    await service.init();
    await service.recordRead([event('logged', { details: { ok: true } })]);
    await service.createCheckpoint();
    const blobs = await f.database.db.selectFrom('audit_keys').select('wrapped_key').execute();
    expect(lines.length).toBeGreaterThan(0);
    for (const { wrapped_key } of blobs) {
      expect(lines.join('\n')).not.toContain(wrapped_key);
      expect(lines.join('\n')).not.toContain(wrapped_key.slice(9, 40));
    }
  });
});

describe('audit keys on first use', () => {
  it('when the first write ever happens inside a transaction, then the keys are created on the spot and it commits (on PGlite, it fails closed once)', async () => {
    const fresh = await createAuditFixture({ init: false });
    try {
      const write = () => fresh.database.db.transaction().execute((trx) => fresh.audit.record(trx, [event('first-ever')]));
      if (fresh.database.kind === 'pglite') {
        // one connection, held by the caller's transaction: the key is created after it, so this one answers 503
        await expect(write()).rejects.toBeInstanceOf(UnavailableError);
        await expect.poll(async () => (await fresh.database.db.selectFrom('audit_keys').select('purpose').execute()).length, { timeout: 5000 }).toBe(1);
      }
      await write();
      expect(await fresh.audit.verify()).toMatchObject({ ok: true, checked: 1 });
    } finally {
      await fresh.close();
    }
  });

  it('when a burst of first writes holds every pooled connection, then they fail closed within about a second instead of hanging, and later writes succeed', async (context) => {
    const fresh = await createAuditFixture({ init: false });
    try {
      if (fresh.database.kind === 'pglite') context.skip(); // one connection: covered by the test above
      const db = fresh.database.db;
      const started = Date.now();
      const results = await Promise.allSettled(
        Array.from({ length: 12 }, (_, i) => db.transaction().execute((trx) => fresh.audit.record(trx, [event(`burst-${i}`)]))),
      );
      expect(Date.now() - started).toBeLessThan(4000);
      for (const r of results) if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(UnavailableError);
      await fresh.audit.init();
      await db.transaction().execute((trx) => fresh.audit.record(trx, [event('after-burst')]));
      const committed = results.filter((r) => r.status === 'fulfilled').length;
      expect(await fresh.audit.verify()).toMatchObject({ ok: true, checked: committed + 1 });
    } finally {
      await fresh.close();
    }
  });
});
