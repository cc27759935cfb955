/**
 * KEK rotation against a concurrent group creation or group rotation, with the KEK grace at 0:
 * a group DEK wrapped under the old KEK version before the rotation, or stored while the
 * rewrap was scanning, must never end up below the raised minimum decryption version. The
 * interleavings are forced step by step (a gated KEK wrap, a gated audit write inside the
 * creation's transaction, the rotation's beforeMinDecryptionRaise hook, pg_locks).
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditSink } from '../../src/audit/audit.types.js';
import { groupBinding } from '../../src/crypto/binding.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createKeyService } from '../../src/keys/key.service.js';
import { createGroupRotationService } from '../../src/rotation/group-rotation.service.js';
import { createKekRotationService, type KekRotationHooks } from '../../src/rotation/kek-rotation.service.js';
import { createPolicyService } from '../../src/rotation/policy.service.js';
import { createFleet, createGroup, localKek, setPolicies, type Fleet } from './support.js';

const who = { actor: 'test:alice' };

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

describe('KEK rotation vs concurrent group creation (KEK grace 0)', () => {
  let f: Fleet;
  /** the next KEK wrap completes, then waits for `release` before returning its blob */
  let wrapGate: { wrapped: Deferred; release: Deferred } | undefined;
  /** the next group.create audit write (inside the creation's transaction, after its insert) waits */
  let auditGate: { reached: Deferred; release: Deferred } | undefined;
  let keys: ReturnType<typeof createKeyService>;
  let groups: ReturnType<typeof createGroupRotationService>;
  const kekRotation = (hooks?: KekRotationHooks) =>
    createKekRotationService({ db: f.t.database.db, kek: f.t.kek, audit: f.t.audit, clock: f.clock, policies: createPolicyService({ db: f.t.database.db, audit: f.t.audit, clock: f.clock }), hooks });

  beforeAll(async () => {
    f = await createFleet({ kek: localKek() });
    await setPolicies(f, { kek: { gracePeriodDays: 0 } });
    await createGroup(f, 'fleet', 3);
    const gated: KekProvider = {
      ...f.t.kek,
      kind: f.t.kek.kind,
      keyName: f.t.kek.keyName,
      async wrap(plaintext, context) {
        const blob = await f.t.kek.wrap(plaintext, context);
        const gate = wrapGate;
        if (gate) {
          wrapGate = undefined;
          gate.wrapped.resolve();
          await gate.release.promise;
        }
        return blob;
      },
    };
    const audit: AuditSink = {
      recordRead: (events) => f.t.audit.recordRead(events),
      async record(trx, events) {
        const gate = auditGate;
        if (gate && events.some((e) => e.action === 'group.create')) {
          auditGate = undefined;
          gate.reached.resolve();
          await gate.release.promise;
        }
        return f.t.audit.record(trx, events);
      },
    };
    const material = createKeyMaterial({ kek: gated, cache: createKeyCache({ ttlSeconds: 60, maxEntries: 100 }) });
    keys = createKeyService({ db: f.t.database.db, material, audit, clock: f.clock });
    groups = createGroupRotationService({ db: f.t.database.db, material, audit, clock: f.clock });
  });
  afterAll(async () => f.close());

  async function groupVersion(groupId: string, version: number) {
    return f.t.database.db.selectFrom('group_versions').select(['wrapped_key', 'kek_version', 'state']).where('group_id', '=', groupId).where('version', '=', version).executeTakeFirstOrThrow();
  }
  async function unwraps(groupId: string, version: number): Promise<Buffer> {
    const row = await groupVersion(groupId, version);
    return f.t.kek.unwrap(row.wrapped_key as string, groupBinding(groupId, version, f.t.kek.keyName));
  }

  it('when a creation wrapped under the old KEK version stores its blob after the minimum was computed, then it wraps again under the new version and stays readable', async () => {
    const before = await f.t.kek.info();
    const gate = (wrapGate = { wrapped: deferred(), release: deferred() });
    const creating = keys.createGroup(who, { id: 'late', deviceType: 'pump', region: 'eu' });
    await gate.wrapped.promise; // its DEK is wrapped under the current KEK version, not stored yet
    let stored: unknown;
    const summary = await kekRotation({
      // the rotation has rotated, rewrapped every stored blob and computed the lowest referenced
      // version; now the creation goes on and must not store its blob under the replaced version
      async beforeMinDecryptionRaise() {
        gate.release.resolve();
        stored = await creating;
      },
    }).run(who, { mode: 'manual' });
    expect(stored).toMatchObject({ id: 'late' });
    expect(summary).toMatchObject({ rotated: true, fromVersion: before.latestVersion, toVersion: before.latestVersion + 1 });
    expect(summary.minDecryptionVersion).toMatchObject({ raised: true, after: before.latestVersion + 1 });
    expect((await f.t.kek.info()).minDecryptionVersion).toBe(before.latestVersion + 1);
    expect((await groupVersion('late', 1)).kek_version).toBe(before.latestVersion + 1);
    expect(await unwraps('late', 1)).toHaveLength(32);
  });

  it('when a creation is inside its transaction while the minimum is raised, then the raise waits for it, counts its blob, and raises no further than it', async () => {
    const before = await f.t.kek.info();
    const gate = (auditGate = { reached: deferred(), release: deferred() });
    const creating = keys.createGroup(who, { id: 'inflight', deviceType: 'pump', region: 'eu' });
    await gate.reached.promise; // admitted and inserted under the current KEK version, not committed
    const release = gate.release;
    const rotating = kekRotation().run(who, { mode: 'manual' });
    // the rotation rotates, rewraps what is committed, then waits on the fence for the creation
    for (let i = 0; ; i += 1) {
      const { rows } = await sql<{ n: string }>`select count(*) as n from pg_locks where locktype = 'advisory' and not granted`.execute(f.t.database.db);
      if (Number(rows[0]?.n) > 0) break;
      if (i > 500) throw new Error('the raise never waited on the KEK fence');
      await new Promise((r) => setTimeout(r, 20));
    }
    release.resolve();
    await creating;
    const summary = await rotating;
    expect(summary.rotated).toBe(true);
    expect(summary.minDecryptionVersion).toMatchObject({ raised: false, blockedBy: 'references', lowestReferenced: before.latestVersion });
    expect((await f.t.kek.info()).minDecryptionVersion).toBe(before.minDecryptionVersion);
    expect(await unwraps('inflight', 1)).toHaveLength(32);

    // the next run rewraps it and raises
    const next = await kekRotation().run(who, { mode: 'manual', rewrapOnly: true });
    expect(next.rewrap.groupKeys).toMatchObject({ rewrapped: 1, remaining: 0 });
    expect(next.minDecryptionVersion).toMatchObject({ raised: true, after: before.latestVersion + 1 });
    expect(await unwraps('inflight', 1)).toHaveLength(32);
    expect(await unwraps('late', 1)).toHaveLength(32);
  });

  it('when a group rotation wrapped its new DEK under the old KEK version, then it wraps again under the new one', async () => {
    const before = await f.t.kek.info();
    const gate = (wrapGate = { wrapped: deferred(), release: deferred() });
    const starting = groups.start(who, 'fleet', { reason: 'manual' });
    await gate.wrapped.promise;
    let started: Awaited<typeof starting> | undefined;
    const summary = await kekRotation({
      async beforeMinDecryptionRaise() {
        gate.release.resolve();
        started = await starting;
      },
    }).run(who, { mode: 'manual' });
    expect(summary.minDecryptionVersion).toMatchObject({ raised: true, after: before.latestVersion + 1 });
    expect(started).toMatchObject({ groupId: 'fleet', kekVersion: before.latestVersion + 1 });
    const version = (started as { toVersion: number }).toVersion;
    expect((await groupVersion('fleet', version)).state).toBe('primary');
    expect(await unwraps('fleet', version)).toHaveLength(32);
  });
});
