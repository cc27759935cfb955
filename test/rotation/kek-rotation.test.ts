/**
 * KEK rotation with the local provider: every group DEK blob and the audit keys are rewrapped
 * to the new version, each swap audited; a failing item keeps its old, still readable blob
 * and is reported; min_decryption_version is raised only when nothing references an older
 * version, never above the lowest referenced one, and only after the KEK grace; a re-run
 * finishes what an interrupted rotation left; two rotations at once never rotate twice.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createRotation } from '../../src/rotation/index.js';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, createGroup, createGroups, DAY, events, fetchDeviceKeys, localKek, runCron, setPolicies, storedDeviceKeys, type Fleet } from './support.js';

/** A provider whose rewrap fails for the blobs of the groups named in `failing` (a per-item error, like transit's). */
function flaky(inner: KekProvider, failing: Set<string>): KekProvider {
  return {
    ...inner,
    kind: inner.kind,
    keyName: inner.keyName,
    async rewrapBatch(items) {
      const results = await inner.rewrapBatch(items);
      return results.map((r, i) => ([...failing].some((g) => items[i]!.context.includes(`|group|${g}|`)) ? { ok: false as const, error: 'injected item failure' } : r));
    },
  };
}

describe('KEK rotation (local provider)', () => {
  let f: Fleet;
  const failing = new Set<string>();
  let devices: string[];
  beforeAll(async () => {
    const base = localKek();
    f = await createFleet({ kek: async (db) => flaky(await base(db), failing), readerGroups: ['g-000', 'g-001', 'fleet'] });
    await f.t.audit.init(); // both audit keys (HMAC, checkpoint signing) exist, wrapped by the KEK
    devices = await createGroup(f, 'fleet', 50);
    await createGroups(f, Array.from({ length: 599 }, (_, i) => `g-${String(i).padStart(3, '0')}`));
  });
  afterAll(async () => f.close());

  const kekVersions = async () =>
    (await f.t.database.db.selectFrom('group_versions').select('kek_version').select((eb) => eb.fn.countAll<number>().as('n')).groupBy('kek_version').orderBy('kek_version').execute()).map((r) => [r.kek_version, Number(r.n)]);

  it('when the KEK is rotated, then all 600 group blobs and the audit keys move to the new version in batches of 500, each swap audited, and keys still deliver', async () => {
    const before = await storedDeviceKeys(f, 'fleet');
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({
      status: 'done',
      rotated: true,
      fromVersion: 1,
      toVersion: 2,
      rewrap: { batches: 3, groupKeys: { rewrapped: 600, failed: 0, remaining: 0 }, auditKeys: { rewrapped: 2, failed: 0, remaining: 0 }, failures: [] },
      // default KEK grace: 30 days before the old version stops decrypting
      minDecryptionVersion: { before: 1, after: 1, raised: false, lowestReferenced: 2, blockedBy: 'grace' },
    });
    expect(await kekVersions()).toEqual([[2, 600]]);
    const auditKeys = await f.t.database.db.selectFrom('audit_keys').select(['purpose', 'kek_version']).orderBy('purpose').execute();
    expect(auditKeys).toEqual([
      { purpose: 'checkpoint', kek_version: 2 },
      { purpose: 'hmac', kek_version: 2 },
    ]);
    expect(await events(f, { action: 'kek.rotate' })).toMatchObject([{ actor: 'alice', outcome: 'success', details: { fromVersion: 1, toVersion: 2, reason: 'manual' } }]);
    expect(await events(f, { action: 'group.kek_rewrap', outcome: 'success' })).toHaveLength(600);
    expect(await events(f, { action: 'audit_key.kek_rewrap', outcome: 'success' })).toHaveLength(2);
    const after = await storedDeviceKeys(f, 'fleet');
    for (const [key, material] of before) expect(after.get(key)?.equals(material)).toBe(true);
    expect(Buffer.from((await fetchDeviceKeys(f, devices[3]!))[0]!.k, 'base64url').equals(after.get(`${devices[3]}:v1`)!)).toBe(true);
    // the audit chain still verifies with the rewrapped HMAC key
    expect((await f.t.audit.verify()).ok).toBe(true);
  });

  it('when the grace is over and nothing references version 1, then the minimum decryption version is raised to 2', async () => {
    f.clock.advance(30 * DAY + 1000);
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', { rewrapOnly: true });
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({ rotated: false, toVersion: 2, minDecryptionVersion: { before: 1, after: 2, raised: true, lowestReferenced: 2 } });
    expect((await f.t.kek.info()).minDecryptionVersion).toBe(2);
    expect(await events(f, { action: 'kek.min_decryption_version' })).toMatchObject([{ outcome: 'success', details: { from: 1, to: 2 } }]);
  });

  it('when some items fail, then they keep their old blob, still readable, are reported and audited, and the minimum stays below them until a re-run fixes them', async () => {
    await setPolicies(f, { kek: { gracePeriodDays: 0 } });
    failing.add('g-000').add('g-001');
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({
      toVersion: 3,
      rewrap: {
        groupKeys: { rewrapped: 598, failed: 2, remaining: 2 },
        failures: [
          { keyId: 'group:g-000', version: 1, kekVersion: 2, error: 'injected item failure' },
          { keyId: 'group:g-001', version: 1, kekVersion: 2, error: 'injected item failure' },
        ],
      },
      minDecryptionVersion: { before: 2, after: 2, raised: false, lowestReferenced: 2, blockedBy: 'references' },
    });
    expect(await kekVersions()).toEqual([
      [2, 2],
      [3, 598],
    ]);
    // still readable: a device enrolled under a failed group still gets its key
    expect((await call(f.t.app, f.admin, 'POST', '/v1/groups/g-000/devices', { id: 'late-device' })).status).toBe(201);
    expect(await fetchDeviceKeys(f, 'late-device')).toHaveLength(1);
    expect(await events(f, { action: 'group.kek_rewrap', outcome: 'failure' })).toMatchObject([
      { keyId: 'group:g-000', details: { error: 'injected item failure', fromKekVersion: 2 } },
      { keyId: 'group:g-001', details: { error: 'injected item failure', fromKekVersion: 2 } },
    ]);

    // the cron entry retries them (no rotation: the KEK is not due), then raises the minimum
    failing.clear();
    const run = await runCron(f);
    expect(run.kek).toMatchObject({ rotated: false, rewrap: { groupKeys: { rewrapped: 2, failed: 0, remaining: 0 } }, minDecryptionVersion: { before: 2, after: 3, raised: true } });
    expect(await kekVersions()).toEqual([[3, 600]]);
    expect((await f.t.kek.info()).minDecryptionVersion).toBe(3);
    expect(await fetchDeviceKeys(f, 'late-device')).toHaveLength(1);
  });

  it('when a rotation is interrupted between batches, then the blobs are readable at every step and a re-run finishes the rewrap', async () => {
    let batches = 0;
    const crashing = createRotation({
      db: f.t.database.db,
      kek: f.t.kek,
      material: createKeyMaterial({ kek: f.t.kek, cache: createKeyCache({ ttlSeconds: 60, maxEntries: 10 }) }),
      audit: f.t.audit,
      clock: f.clock,
      kekBatchSize: 250,
      hooks: {
        afterKekBatch() {
          batches += 1;
          if (batches === 2) throw new Error('injected crash between batches');
        },
      },
    });
    await expect(crashing.kekRotation.run({ actor: 'alice' }, { mode: 'manual' })).rejects.toThrow('injected crash');
    // 2 × 250 rewrapped (the audit keys went first, in their own call), 100 left on version 3
    expect(await kekVersions()).toEqual([
      [3, 100],
      [4, 500],
    ]);
    expect((await f.t.kek.info()).minDecryptionVersion).toBe(3);
    // every device version with material still unwraps (cron's rollouts may have added new versions)
    expect((await storedDeviceKeys(f, 'fleet')).size).toBeGreaterThanOrEqual(50);
    expect(await fetchDeviceKeys(f, 'late-device')).toHaveLength(1);

    const resumed = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', { rewrapOnly: true });
    expect(resumed.body).toMatchObject({ rotated: false, toVersion: 4, rewrap: { groupKeys: { rewrapped: 100, remaining: 0 } }, minDecryptionVersion: { after: 4, raised: true } });
    expect(await kekVersions()).toEqual([[4, 600]]);
  });

  it('when a rotation is requested while another is running, then it is refused with 409 and the KEK rotates once', async () => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let paused!: () => void;
    const pausedAt = new Promise<void>((resolve) => (paused = resolve));
    const slow = createRotation({
      db: f.t.database.db,
      kek: f.t.kek,
      material: createKeyMaterial({ kek: f.t.kek, cache: createKeyCache({ ttlSeconds: 60, maxEntries: 10 }) }),
      audit: f.t.audit,
      clock: f.clock,
      hooks: {
        async afterKekBatch() {
          paused();
          await gate;
        },
      },
    });
    const first = slow.kekRotation.run({ actor: 'alice' }, { mode: 'manual' });
    await pausedAt; // the first rotation holds the lease, half-way through its rewrap
    const second = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    expectProblem(second, 409, 'rotation_in_progress');
    const cron = await runCron(f);
    expect(cron.kek).toMatchObject({ status: 'skipped', rotated: false });
    release();
    expect(await first).toMatchObject({ status: 'done', rotated: true, toVersion: 5, rewrap: { groupKeys: { remaining: 0 } } });
    expect((await f.t.kek.info()).latestVersion).toBe(5);
    expect(await events(f, { action: 'kek.rotate' })).toHaveLength(4);
  });

  it('when the caller is not an admin, then 403 and nothing rotates', async () => {
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/kek/rotate', {}), 403);
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', { limit: 0 }), 400);
    expect((await f.t.kek.info()).latestVersion).toBe(5);
  });
});
