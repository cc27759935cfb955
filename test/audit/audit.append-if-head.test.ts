/**
 * Group commit in one statement (migration 20261122000100_audit_append_if_head, issue 7): a
 * batch of reads after the first is appended by ONE statement when the chain head is where this
 * process left it; when another writer moved it, nothing is written by the stale attempt and the
 * batch is hashed again onto the real head; a batch that does not link is refused by the triggers.
 */
import crypto from 'node:crypto';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createAuditService, type AuditService } from '../../src/audit/audit.service.js';
import * as repo from '../../src/audit/audit.repository.js';
import type { DB } from '../../src/db/database.js';
import { createAuditFixture, type AuditFixture } from './support.js';

const setup = inject('testDb');

const read = (actor: string) => [{ actor, action: 'key.deliver', outcome: 'success' as const, keyId: `device:${actor}` }];

function newEvents(after: repo.ChainHead, count: number, firstHash = after.hash): repo.NewAuditEvents {
  const chain = Buffer.concat([firstHash, crypto.randomBytes(32 * count)]);
  const column = <T>(value: (i: number) => T) => Array.from({ length: count }, (_, i) => value(i));
  return {
    firstPosition: after.position + 1,
    occurredAt: new Date(),
    actors: column((i) => `raw-${i}`),
    actions: column(() => 'test.raw'),
    outcomes: column(() => 'success'),
    keyIds: column(() => null),
    details: column(() => '{}'),
    requestIds: column(() => null),
    chain,
  };
}

describe('audit group commit in one statement', () => {
  let f: AuditFixture;
  beforeAll(async () => {
    f = await createAuditFixture();
  });
  afterAll(async () => f.close());

  describe.skipIf(setup.mode !== 'postgres')('statements sent (PostgreSQL)', () => {
    let statements: string[];
    let logged: Kysely<DB>;
    let service: AuditService;
    beforeAll(async () => {
      statements = [];
      logged = new Kysely<DB>({
        dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: f.database.url, max: 2 }) }),
        log: (event) => {
          statements.push(event.query.sql);
        },
      });
      service = createAuditService({ db: logged, kek: f.kek, clock: f.clock, batchWindowMs: 1 });
      await service.init();
    });
    afterAll(async () => {
      await service.close();
      await logged.destroy();
    });

    it('when reads are committed batch after batch, then the first takes the lock in a transaction and every later batch is one statement', async () => {
      const before = await f.audit.chainLength();
      statements.length = 0;
      await service.recordRead(read('first'));
      expect(statements.some((s) => /for update/i.test(s))).toBe(true); // no head known yet: the locking path
      for (let i = 0; i < 5; i++) {
        statements.length = 0;
        await service.recordRead(read(`next-${i}`));
        expect(statements).toHaveLength(1);
        expect(statements[0]).toMatch(/audit_append_if_head/);
      }
      expect(await f.audit.chainLength()).toBe(before + 6);
      expect(await f.audit.verify()).toMatchObject({ ok: true });
    });

    it('when another writer appended since the last batch, then the stale attempt writes nothing and the batch is hashed onto the real head', async () => {
      await service.recordRead(read('known-head'));
      const before = await f.audit.chainLength();
      await f.database.db.transaction().execute((trx) => f.audit.record(trx, [{ actor: 'other-writer', action: 'test.change', outcome: 'success' }]));
      statements.length = 0;
      await service.recordRead(read('after-other'));
      expect(statements.filter((s) => /audit_append_if_head/.test(s))).toHaveLength(2); // missed once, then appended
      const rows = await f.database.db.selectFrom('audit_events').select(['position', 'actor']).where('position', '>', before).orderBy('position').execute();
      expect(rows.map((r) => [Number(r.position), r.actor])).toEqual([
        [before + 1, 'other-writer'],
        [before + 2, 'after-other'],
      ]);
      expect(await f.audit.verify()).toMatchObject({ ok: true, headPosition: before + 2 });
    });
  });

  it('when two services on one database commit reads concurrently, then every event is in one unbroken chain', async () => {
    const before = await f.audit.chainLength();
    const replica = await f.replica({ batchWindowMs: 1 });
    await Promise.all(Array.from({ length: 300 }, (_, i) => (i % 2 === 0 ? f.audit : replica).recordRead(read(`concurrent-${i}`))));
    const rows = await f.database.db.selectFrom('audit_events').select(['position', 'actor']).where('position', '>', before).orderBy('position').execute();
    expect(new Set(rows.map((r) => r.actor)).size).toBe(300);
    expect(rows.map((r) => Number(r.position))).toEqual(rows.map((_, k) => before + 1 + k));
    expect(await f.audit.verify()).toMatchObject({ ok: true, headPosition: before + 300 });
  });

  it('when appendIfHead is given a stale head, then it writes nothing and returns the real head', async () => {
    await f.audit.recordRead(read('head-now'));
    const head = (await repo.readHead(f.database.db)) as repo.ChainHead;
    const stale = { position: head.position - 1, hash: crypto.randomBytes(32) };
    const result = await repo.appendIfHead(f.database.db, stale, newEvents(stale, 2));
    expect(result).toEqual({ appended: false, head });
    expect(await f.audit.chainLength()).toBe(head.position);
  });

  it('when the events do not link to the head, or the chain bytes do not match the events, then the statement is refused and nothing changes', async () => {
    const head = (await repo.readHead(f.database.db)) as repo.ChainHead;
    await expect(repo.appendIfHead(f.database.db, head, newEvents(head, 2, crypto.randomBytes(32)))).rejects.toThrow(/does not link/);
    const short = newEvents(head, 2);
    short.chain = short.chain.subarray(0, 64);
    await expect(repo.appendIfHead(f.database.db, head, short)).rejects.toThrow(/chain bytes/);
    expect(await repo.readHead(f.database.db)).toEqual(head);
    expect(await f.audit.verify()).toMatchObject({ ok: true, headPosition: head.position });
  });
});
