import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { canonicalJson, prepareEvent } from '../../src/audit/audit.chain.js';
import { createAuditFixture, type AuditFixture } from './support.js';

/** What prepareEvent computed before its one-pass rewrite: the reference for the details text. */
function referenceDetails(details: Record<string, unknown>): string {
  const storable = (value: string) => value.replace(/\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');
  const storableJson = (value: unknown): unknown => {
    if (typeof value === 'string') return storable(value);
    if (value === null || typeof value !== 'object') return value;
    if (Array.isArray(value)) return value.map(storableJson);
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) Object.defineProperty(out, storable(k), { value: storableJson(v), enumerable: true, writable: true, configurable: true });
    return out;
  };
  return canonicalJson(storableJson(JSON.parse(JSON.stringify(details))));
}

describe('audit details canonicalisation (one pass, remembered per text)', () => {
  it.each([
    ['nested objects and arrays', { b: [3, { z: null, y: 'x' }], a: { d: true, c: 1.5e-7 } }],
    ['numbers JSON.stringify rewrites', { n: [1e21, -0, 0.1, Number.NaN, Number.POSITIVE_INFINITY] }],
    ['dates, undefined members and toJSON', { when: new Date('2026-03-01T12:00:00.000Z'), gone: undefined, custom: { toJSON: () => ({ y: 1, x: 2 }) } }],
    ['unstorable strings', { s: 'nul \u0000 lone \uD800 pair \u{1F600}', list: ['\uDC00'] }],
    ['keys that storable() makes collide', { 'a\u0000': 1, 'a\uFFFD': 2, 'b\uD800': { 'c\u0000': 3 } }],
    ['__proto__ as a key', JSON.parse('{"__proto__":{"x":1},"a":2}') as Record<string, unknown>],
    ['escapes', { s: 'quote " backslash \\ tab \t nl \n ctl \u0001 \u2028' }],
  ])('when details hold %s, then the text is what the reference canonicalisation gives (twice: computed, then remembered)', (_what, details) => {
    const expected = referenceDetails(details);
    const event = { actor: 'a', action: 'b', outcome: 'success' as const, details };
    expect(prepareEvent(event).detailsJson).toBe(expected);
    expect(prepareEvent(event).detailsJson).toBe(expected);
  });
});

describe('audit bulk writes and the statement-level link check', () => {
  let f: AuditFixture;
  beforeAll(async () => {
    f = await createAuditFixture();
  });
  afterAll(async () => f.close());

  it('when one record() call carries more events than one INSERT takes, then they chain in order across the INSERTs and verify', async () => {
    const before = await f.audit.chainLength();
    const events = Array.from({ length: 4500 }, (_, i) => ({
      actor: 'system:enrol',
      action: 'device.enrol',
      outcome: 'success' as const,
      keyId: `device:d-${i}`,
      details: { group: 'g-1', version: i % 3 },
      requestId: i % 2 === 0 ? `req-${i}` : undefined,
    }));
    await f.database.db.transaction().execute((trx) => f.audit.record(trx, events));
    expect(await f.audit.chainLength()).toBe(before + 4500);
    const rows = await f.database.db.selectFrom('audit_events').select(['position', 'key_id', 'request_id']).where('position', '>', before).orderBy('position').execute();
    expect(rows.map((r) => r.key_id)).toEqual(events.map((e) => e.keyId));
    expect(rows.map((r) => r.request_id)).toEqual(events.map((e) => e.requestId ?? null));
    expect(await f.audit.verify()).toMatchObject({ ok: true, checked: before + 4500 });
  });

  it('when one INSERT statement forges several rows, then the lowest bad one is refused with the errors of the row trigger', async () => {
    const db = f.database.db;
    const head = await f.audit.chainLength();
    const last = await db.selectFrom('audit_events').select('hash').where('position', '=', head).executeTakeFirstOrThrow();
    const [h1, h2, h3] = [crypto.randomBytes(32), crypto.randomBytes(32), crypto.randomBytes(32)];
    const forged = (rows: Array<[number, Buffer, Buffer]>) =>
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, prev_hash, hash)
          select p, now(), 'mallory', 'x', 'success', prev, h from unnest(${rows.map((r) => r[0])}::int8[], ${rows.map((r) => r[1])}::bytea[], ${rows.map((r) => r[2])}::bytea[]) as t(p, prev, h)`.execute(db);
    // rows linking among themselves, but the second of them does not
    await expect(forged([[head + 1, last.hash, h1], [head + 2, h3, h2], [head + 3, h2, h3]])).rejects.toThrow(`audit: event ${head + 2} does not link to its predecessor`);
    // a gap inside the statement
    await expect(forged([[head + 1, last.hash, h1], [head + 3, h2, h3]])).rejects.toThrow(`audit: event ${head + 3} has no predecessor`);
    // the first row does not link to the stored chain
    await expect(forged([[head + 1, h3, h1], [head + 2, h1, h2]])).rejects.toThrow(`audit: event ${head + 1} does not link to its predecessor`);
    // position 1 must carry the zero hash, even next to valid-looking rows
    await expect(forged([[1, h1, h2]])).rejects.toThrow(/duplicate key|does not link/);
    expect(await f.audit.chainLength()).toBe(head);
    expect((await f.audit.verify()).ok).toBe(true);
  });

  it('when the trigger functions probe audit_events by position, then they cannot be planned as sequential scans', async (context) => {
    if (f.database.kind === 'pglite') context.skip();
    const { rows } = await sql<{ proname: string; proconfig: string[] | null }>`
      select proname, proconfig from pg_proc where proname in ('audit_events_check_links', 'audit_chain_head_check') order by proname`.execute(f.database.db);
    expect(rows).toEqual([
      { proname: 'audit_chain_head_check', proconfig: ['enable_seqscan=off'] },
      { proname: 'audit_events_check_links', proconfig: ['enable_seqscan=off'] },
    ]);
  });
});
