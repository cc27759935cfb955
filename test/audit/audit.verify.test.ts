import crypto from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { sql, type RawBuilder } from 'kysely';
import { canonicalEvent, canonicalJson, chainHash } from '../../src/audit/audit.chain.js';
import { auditKeyBinding } from '../../src/audit/audit.service.js';
import { BadRequestError, NotFoundError } from '../../src/http/errors.js';
import { createAuditFixture, type AuditFixture } from './support.js';

/** 20 events over a few transactions, with varied fields so each one matters. */
async function writeChain(f: AuditFixture, count = 20): Promise<void> {
  for (let i = 1; i <= count; i += 4) {
    await f.database.db.transaction().execute((trx) =>
      f.audit.record(
        trx,
        Array.from({ length: Math.min(4, count - i + 1) }, (_, j) => ({
          actor: `admin-${(i + j) % 3}`,
          action: (i + j) % 2 === 0 ? 'device.rotate' : 'key.deliver',
          outcome: 'success' as const,
          keyId: `device:sensor-${i + j}`,
          details: { version: i + j, state: 'primary', nested: { wave: 2, tags: ['a', 'b'] } },
          requestId: `req-${i + j}`,
        })),
      ),
    );
    f.clock.advance(1000);
  }
}

describe('audit verify', () => {
  let f: AuditFixture;
  beforeEach(async () => {
    f = await createAuditFixture();
    await writeChain(f);
  });
  afterEach(async () => f.close());

  /** Run SQL as an attacker who can write the tables and switch the triggers off. */
  async function tamper(...statements: Array<RawBuilder<unknown>>): Promise<void> {
    await f.database.db.transaction().execute(async (trx) => {
      await sql`alter table audit_events disable trigger user`.execute(trx);
      await sql`alter table audit_chain_head disable trigger user`.execute(trx);
      await sql`alter table audit_checkpoints disable trigger user`.execute(trx);
      for (const statement of statements) await statement.execute(trx);
      await sql`alter table audit_events enable trigger user`.execute(trx);
      await sql`alter table audit_chain_head enable trigger user`.execute(trx);
      await sql`alter table audit_checkpoints enable trigger user`.execute(trx);
    });
  }

  it('when nobody touched the chain, then it verifies end to end and names no bad position', async () => {
    const result = await f.audit.verify();
    expect(result).toEqual({ ok: true, checked: 20, fromPosition: 1, headPosition: 20, checkpointsChecked: 0 });
  });

  it('when one field of one event is changed, then verify names that event', async () => {
    await tamper(sql`update audit_events set actor = 'mallory' where position = 7`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 7, reason: 'hash_mismatch', checked: 6 });
  });

  it.each([
    ['details', sql`update audit_events set details = jsonb_set(details, '{version}', '99') where position = 11`],
    ['a nested detail', sql`update audit_events set details = jsonb_set(details, '{nested,tags}', '["a"]') where position = 11`],
    ['the key id', sql`update audit_events set key_id = null where position = 11`],
    ['the outcome', sql`update audit_events set outcome = 'denied' where position = 11`],
    ['the request id', sql`update audit_events set request_id = 'req-other' where position = 11`],
    ['the time, by one microsecond', sql`update audit_events set occurred_at = occurred_at + interval '1 microsecond' where position = 11`],
  ])('when %s of an event is changed, then verify names that event', async (_what, statement) => {
    await tamper(statement);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 11, reason: 'hash_mismatch' });
  });

  it('when an event is deleted, then verify names the missing position', async () => {
    await tamper(sql`delete from audit_events where position = 9`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 9, reason: 'missing_event', checked: 8 });
  });

  it('when the newest events are deleted, then verify names the first missing one (the head still counts them)', async () => {
    await tamper(sql`delete from audit_events where position >= 18`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 18, reason: 'missing_event' });
  });

  it('when the newest events are deleted and the head rewound to a made-up hash, then verify names the head', async () => {
    await tamper(sql`delete from audit_events where position >= 18`, sql`update audit_chain_head set position = 17, hash = ${crypto.randomBytes(32)}`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 17, reason: 'head_mismatch' });
  });

  it('when the newest events are deleted and the head rewound consistently, then a later signed checkpoint names the truncation', async () => {
    await f.audit.createCheckpoint();
    await tamper(sql`delete from audit_events where position >= 18`, sql`update audit_chain_head set position = 17, hash = (select hash from audit_events where position = 17)`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 18, reason: 'missing_event', checked: 17 });
  });

  it('when an event is forged and appended with the head moved along, then verify names the forged position', async () => {
    const last = await f.database.db.selectFrom('audit_events').select('hash').where('position', '=', 20).executeTakeFirstOrThrow();
    const forgedHash = crypto.createHash('sha256').update('forged').digest();
    await tamper(
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, key_id, details, request_id, prev_hash, hash)
          values (21, now(), 'mallory', 'key.deliver', 'success', 'device:sensor-1', '{}', null, ${last.hash}, ${forgedHash})`,
      sql`update audit_chain_head set position = 21, hash = ${forgedHash}`,
    );
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 21, reason: 'hash_mismatch', checked: 20 });
  });

  it('when an event is forged beyond the head (the head left alone), then verify names it', async () => {
    const last = await f.database.db.selectFrom('audit_events').select('hash').where('position', '=', 20).executeTakeFirstOrThrow();
    await tamper(
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, prev_hash, hash)
          values (21, now(), 'mallory', 'key.deliver', 'success', ${last.hash}, ${crypto.randomBytes(32)})`,
    );
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 21, reason: 'event_after_head' });
  });

  it('when an event is replaced by a forged one that links correctly, then verify names it', async () => {
    const prev = await f.database.db.selectFrom('audit_events').select('hash').where('position', '=', 4).executeTakeFirstOrThrow();
    const original = await f.database.db.selectFrom('audit_events').select('hash').where('position', '=', 5).executeTakeFirstOrThrow();
    await tamper(
      sql`delete from audit_events where position = 5`,
      sql`insert into audit_events (position, occurred_at, actor, action, outcome, prev_hash, hash)
          values (5, now(), 'mallory', 'policy.update', 'success', ${prev.hash}, ${original.hash})`,
    );
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 5, reason: 'hash_mismatch' });
  });

  it('when two events swap places whole (hashes included), then verify names the first of them', async () => {
    await tamper(
      sql`update audit_events set position = 1000 where position = 6`,
      sql`update audit_events set position = 6 where position = 13`,
      sql`update audit_events set position = 13 where position = 1000`,
    );
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 6, reason: 'broken_link' });
  });

  it('when two events swap their contents but keep their hashes, then verify names the first of them', async () => {
    await tamper(
      sql`update audit_events a set actor = b.actor, action = b.action, key_id = b.key_id, details = b.details, request_id = b.request_id
          from audit_events b where (a.position, b.position) in ((6, 13), (13, 6))`,
    );
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 6, reason: 'hash_mismatch' });
  });

  it('when verify starts after the damage, then it passes; when it starts before, then it names the damage', async () => {
    await tamper(sql`update audit_events set action = 'nothing.happened' where position = 5`);
    expect(await f.audit.verify({ fromPosition: 6 })).toMatchObject({ ok: true, checked: 15, fromPosition: 6 });
    expect(await f.audit.verify({ fromPosition: 3 })).toMatchObject({ ok: false, firstBadPosition: 5 });
  });

  it('when verify starts from a checkpoint, then it anchors there: damage before passes, damage at or after is named', async () => {
    const head = await f.audit.chainLength();
    const checkpointAt = 10;
    await tamper(sql`update audit_chain_head set position = ${checkpointAt}, hash = (select hash from audit_events where position = ${checkpointAt})`);
    const checkpoint = await f.audit.createCheckpoint();
    await tamper(sql`update audit_chain_head set position = ${head}, hash = (select hash from audit_events where position = ${head})`);
    expect(checkpoint.position).toBe(checkpointAt);

    await tamper(sql`update audit_events set actor = 'mallory' where position = 4`);
    expect(await f.audit.verify({ fromCheckpoint: checkpoint.id })).toMatchObject({ ok: true, fromPosition: 10, checked: 11, checkpointsChecked: 1 });
    await tamper(sql`update audit_events set actor = 'mallory' where position = 15`);
    expect(await f.audit.verify({ fromCheckpoint: checkpoint.id })).toMatchObject({ ok: false, firstBadPosition: 15, reason: 'hash_mismatch' });
  });

  it('when someone holding the HMAC key (but not the signing key) rewrites a checkpointed event consistently, then the signed checkpoint names it', async () => {
    const checkpoint = await f.audit.createCheckpoint();
    const stolen = crypto.createSecretKey(await f.kek.unwrap(
      (await f.database.db.selectFrom('audit_keys').select('wrapped_key').where('purpose', '=', 'hmac').executeTakeFirstOrThrow()).wrapped_key,
      auditKeyBinding('hmac', 1, f.kek.keyName),
    ));
    const { rows } = await sql<{ prev_hash: Buffer; time: string; action: string; outcome: string; key_id: string; details: Record<string, unknown>; request_id: string }>`
      select prev_hash, to_char(occurred_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') as time, action, outcome, key_id, details, request_id
      from audit_events where position = 20`.execute(f.database.db);
    const row = rows[0]!;
    const rewritten = chainHash(stolen, row.prev_hash, canonicalEvent({
      position: 20, time: row.time, actor: 'mallory', action: row.action, outcome: row.outcome, keyId: row.key_id, detailsJson: canonicalJson(row.details), requestId: row.request_id,
    }));
    await tamper(sql`update audit_events set actor = 'mallory', hash = ${rewritten} where position = 20`, sql`update audit_chain_head set hash = ${rewritten}`);
    expect(await f.audit.verify()).toMatchObject({ ok: false, firstBadPosition: 20, reason: 'checkpoint_mismatch', checked: 19 });
  });

  it('when a stored checkpoint is altered, then verify from it refuses it as invalid', async () => {
    const checkpoint = await f.audit.createCheckpoint();
    const [header, , signature] = checkpoint.jws.split('.');
    const payload = Buffer.from(JSON.stringify({ position: 20, hash: 'ab'.repeat(32), time: checkpoint.time, kekName: 'keystrata-kek' })).toString('base64url');
    await tamper(sql`update audit_checkpoints set jws = ${`${header}.${payload}.${signature}`}, hash = ${Buffer.from('ab'.repeat(32), 'hex')} where id = ${checkpoint.id}`);
    expect(await f.audit.verify({ fromCheckpoint: checkpoint.id })).toMatchObject({ ok: false, reason: 'checkpoint_invalid', firstBadPosition: 20 });
    expect(await f.audit.verify()).toMatchObject({ ok: false, reason: 'checkpoint_invalid', firstBadPosition: 20 });
  });

  it('when the options are wrong, then verify refuses them with the right error', async () => {
    await expect(f.audit.verify({ fromPosition: 1, fromCheckpoint: 1 })).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.verify({ fromPosition: 0 })).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.verify({ fromPosition: 21 })).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.verify({ fromCheckpoint: 999 })).rejects.toBeInstanceOf(NotFoundError);
  });

  it('when the chain spans several verify pages, then a gap at a page border is still named', async () => {
    const paged = await f.replica({ verifyPageSize: 4 });
    expect(await paged.verify()).toMatchObject({ ok: true, checked: 20 });
    await tamper(sql`delete from audit_events where position = 9`);
    expect(await paged.verify()).toMatchObject({ ok: false, firstBadPosition: 9, reason: 'missing_event' });
  });
});

describe('audit verify on an empty chain', () => {
  it('when nothing was ever written, then the chain verifies with nothing checked', async () => {
    const f = await createAuditFixture();
    try {
      expect(await f.audit.verify()).toEqual({ ok: true, checked: 0, fromPosition: 1, headPosition: 0, checkpointsChecked: 0 });
    } finally {
      await f.close();
    }
  });
});
