import crypto from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { sql, type RawBuilder } from 'kysely';
import type { AuditService } from '../../src/audit/audit.service.js';
import { createAuditFixture, type AuditFixture } from './support.js';

/**
 * verify in worker threads (pages checked apart, outcomes walked in order) must report exactly
 * what the walk on the main thread reports: same first bad position, reason, detail, counts.
 */
describe('audit verify in worker threads', () => {
  let f: AuditFixture;
  let inline: AuditService;
  let parallel: AuditService;
  let warnings: string[];

  beforeEach(async () => {
    f = await createAuditFixture();
    for (let i = 1; i <= 23; i += 4) {
      await f.database.db.transaction().execute((trx) =>
        f.audit.record(
          trx,
          Array.from({ length: Math.min(4, 23 - i + 1) }, (_, j) => ({
            actor: `admin-${(i + j) % 3}`,
            action: (i + j) % 2 === 0 ? 'device.rotate' : 'key.deliver',
            outcome: 'success' as const,
            keyId: (i + j) % 5 === 0 ? undefined : `device:sensor-${i + j}`,
            details: { version: i + j, nested: { tags: ['a', 'é', '\u{1F600}'], q: 'quote " \\ \n' }, big: 1e21 },
            requestId: (i + j) % 4 === 0 ? undefined : `req-${i + j}`,
          })),
        ),
      );
      f.clock.advance(1000);
    }
    // pages of 3 events: page borders everywhere; the workers take every walk
    inline = await f.replica({ verifyPageSize: 3, verifyWorkers: 0 });
    warnings = [];
    const logger = { info() {}, warn: (_obj: object, msg: string) => warnings.push(msg), error: (_obj: object, msg: string) => warnings.push(msg) };
    parallel = await f.replica({ verifyPageSize: 3, verifyWorkers: 2, verifyParallelMin: 1, logger });
  });
  afterEach(async () => {
    // the workers started (no fallback to the main thread was logged)
    expect(warnings).toEqual([]);
    await f.close();
  });

  async function tamper(...statements: Array<RawBuilder<unknown>>): Promise<void> {
    await f.database.db.transaction().execute(async (trx) => {
      await sql`alter table audit_events disable trigger user`.execute(trx);
      await sql`alter table audit_chain_head disable trigger user`.execute(trx);
      for (const statement of statements) await statement.execute(trx);
      await sql`alter table audit_events enable trigger user`.execute(trx);
      await sql`alter table audit_chain_head enable trigger user`.execute(trx);
    });
  }

  async function same(options: Parameters<AuditService['verify']>[0] = {}) {
    const expected = await inline.verify(options);
    expect(await parallel.verify(options)).toEqual(expected);
    return expected;
  }

  it('when nothing was touched, then both pass with the same counts', async () => {
    expect(await same()).toEqual({ ok: true, checked: 23, fromPosition: 1, headPosition: 23, checkpointsChecked: 0 });
    expect(await same({ fromPosition: 8 })).toMatchObject({ ok: true, checked: 16 });
  });

  it.each([
    ['a changed field mid-page', [sql`update audit_events set actor = 'mallory' where position = 8`]],
    ['a changed field at a page start', [sql`update audit_events set details = '{}' where position = 10`]],
    ['a deleted event at a page start', [sql`delete from audit_events where position = 7`]],
    ['a deleted event mid-page', [sql`delete from audit_events where position = 8`]],
    ['a deleted tail', [sql`delete from audit_events where position >= 20`]],
    ['two events swapped whole', [sql`update audit_events set position = 1000 where position = 6`, sql`update audit_events set position = 6 where position = 13`, sql`update audit_events set position = 13 where position = 1000`]],
    ['a wrong prev_hash at a page start', [sql`update audit_events set prev_hash = ${crypto.randomBytes(32)} where position = 13`]],
    ['a wrong prev_hash mid-page', [sql`update audit_events set prev_hash = ${crypto.randomBytes(32)} where position = 14`]],
    ['a changed time', [sql`update audit_events set occurred_at = occurred_at + interval '1 microsecond' where position = 17`]],
  ])('when %s, then both name the same position and reason', async (_what, statements) => {
    await tamper(...statements);
    const result = await same();
    expect(result.ok).toBe(false);
  });

  it('when a hash is not 32 bytes (constraints dropped), then both still agree (the page is read per event)', async () => {
    await sql`alter table audit_events drop constraint audit_events_hash_check`.execute(f.database.db);
    await tamper(sql`update audit_events set hash = hash || '\\x00'::bytea where position = 11`);
    expect(await same()).toMatchObject({ ok: false, firstBadPosition: 11, reason: 'hash_mismatch' });
  });

  it('when checkpoints lie on the way, then both check them in order and agree on a mismatch', async () => {
    await f.audit.createCheckpoint();
    expect(await same()).toMatchObject({ ok: true, checkpointsChecked: 1 });
    await tamper(sql`update audit_events set actor = 'mallory' where position = 23`);
    expect(await same()).toMatchObject({ ok: false, firstBadPosition: 23 });
    const checkpoint = (await f.audit.listCheckpoints()).items[0];
    expect(await same({ fromCheckpoint: checkpoint?.id })).toMatchObject({ ok: false });
  });
});
