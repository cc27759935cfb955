/**
 * The cron entry: `POST /v1/rotation/run` and `keystrata rotate`. A dry run reports everything
 * and changes not one byte of the database; two runs at once (one app, and two app instances on
 * one database) rotate nothing twice; maintenance windows hold back rotation starts; the CLI
 * does the same as the route.
 */
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp, type KeystrataApp } from '../../src/app.js';
import { createAuditService } from '../../src/audit/audit.service.js';
import { createAuthenticator } from '../../src/auth/authenticator.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import { createLogger } from '../../src/logger.js';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, createGroup, DAY, dumpDatabase, events, fetchDeviceKeys, localKek, runCron, setPolicies, storedDeviceKeys, type Fleet } from './support.js';

const run = promisify(execFile);

describe('the cron entry', () => {
  let f: Fleet;
  const rootKey = crypto.randomBytes(32);
  beforeAll(async () => {
    f = await createFleet({ kek: localKek(rootKey), readerGroups: ['north', 'south', 'night'] });
    await createGroup(f, 'north', 300);
    await createGroup(f, 'south', 300);
  });
  afterAll(async () => f.close());

  it('when nothing is due, then a run changes no key and says it is complete', async () => {
    const summary = await runCron(f);
    expect(summary).toMatchObject({ dryRun: false, complete: true, errors: [], kek: { status: 'done', rotated: false, observedVersions: [1] }, groups: { checked: 2, rotated: [] } });
    expect(summary.devices).toMatchObject({ primariesDue: 0, rollouts: { started: [], waves: 0, devices: 0, more: false } });
    expect(await events(f, { action: 'rotation.run' })).toHaveLength(1);
  });

  it('when work is due everywhere, then a dry run reports all of it and the database stays byte-identical; the real run then does exactly that', async () => {
    await setPolicies(f, { kek: { rotationPeriodDays: 30, gracePeriodDays: 0 }, group: { retentionDays: 0, destructionWaitDays: 1 } });
    // a device rotated now (its old primary in grace for 7 days) and one scheduled for destruction (3 days)
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/north-d00001/rotate', {})).status).toBe(200);
    expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/north-d00002?waitDays=3')).status).toBe(202);
    f.clock.advance(91 * DAY);

    const before = await dumpDatabase(f);
    const dry = await runCron(f, { dryRun: true });
    expect(await dumpDatabase(f)).toBe(before);
    expect(dry).toMatchObject({
      dryRun: true,
      kek: { rotated: true, fromVersion: 1, toVersion: 2, rewrap: { groupKeys: { rewrapped: 2, remaining: 0 }, auditKeys: { rewrapped: 2 } }, minDecryptionVersion: { before: 1, after: 2, raised: true } },
      // 600 devices, one with two versions
      groups: { rotated: [{ groupId: 'north', fromVersion: 1, toVersion: 2 }, { groupId: 'south', fromVersion: 1, toVersion: 2 }], children: { rewrapped: 601, remaining: 0 } },
      // the one scheduled for destruction is not due for rotation; the device level fell due: a rollout per group would start
      devices: {
        primariesDue: 599,
        rollouts: {
          started: [
            { rolloutId: null, groupId: 'north', level: 'device' },
            { rolloutId: null, groupId: 'south', level: 'device' },
          ],
        },
      },
      sweeps: { graceExpired: { devices: 1 }, destroyed: { devices: 1 } },
    });
    expect(JSON.stringify(dry)).not.toMatch(/local:v\d+:/);

    const real = await runCron(f);
    expect(real).toMatchObject({
      dryRun: false,
      errors: [],
      kek: { rotated: true, toVersion: 2, rewrap: { groupKeys: { rewrapped: 2, remaining: 0 } }, minDecryptionVersion: { after: 2, raised: true } },
      groups: dry.groups,
      devices: { primariesDue: 599, rollouts: { started: [{ groupId: 'north', level: 'device' }, { groupId: 'south', level: 'device' }], failed: 0 } },
      sweeps: { graceExpired: { devices: 1 }, destroyed: { devices: 1 } },
    });
    expect(await dumpDatabase(f)).not.toBe(before);
    // north: 300 device versions with material (one device has two, the destroyed one none) and those
    // of the rollout's first wave, all readable
    const rollout = await call(f.t.app, f.admin, 'GET', '/v1/rollouts?groupId=north');
    const firstWave = (rollout.body.items as Array<{ totals: { done: number } }>)[0]!.totals.done;
    expect(firstWave).toBeGreaterThan(0);
    expect((await storedDeviceKeys(f, 'north')).size).toBe(300 + firstWave);
    expect(await f.t.database.db.selectFrom('device_versions').select(['version', 'state']).where('device_id', '=', 'north-d00002').execute()).toEqual([{ version: 1, state: 'destroyed' }]);
    expect(await events(f, { action: 'group.rotate' })).toHaveLength(2);
  });

  it('when two runs start at once, then each key rotates once', async () => {
    f.clock.advance(91 * DAY);
    // every device version with material moves to the new group versions (the rollouts' new ones too)
    const withMaterial = Number(
      (await f.t.database.db.selectFrom('device_versions').select((eb) => eb.fn.countAll().as('n')).where('wrapped_key', 'is not', null).executeTakeFirstOrThrow()).n,
    );
    const [a, b] = await Promise.all([runCron(f), runCron(f)]);
    const rotatedGroups = [...a.groups.rotated, ...b.groups.rotated].map((r) => r.groupId).sort();
    expect(rotatedGroups).toEqual(['north', 'south']);
    expect([a.kek?.rotated, b.kek?.rotated].filter(Boolean)).toHaveLength(1);
    // the other one either found the lease taken ('skipped') or, after it, nothing due
    for (const r of [a, b]) expect(['done', 'skipped']).toContain(r.kek?.status);
    expect(a.groups.children.rewrapped + b.groups.children.rewrapped).toBe(withMaterial); // the destroyed version has nothing to move
    expect(a.errors).toEqual([]);
    expect(b.errors).toEqual([]);
    const versions = await f.t.database.db.selectFrom('group_versions').select(['group_id', 'version', 'state']).where('state', '=', 'primary').orderBy('group_id').execute();
    expect(versions).toEqual([
      { group_id: 'north', version: 3, state: 'primary' },
      { group_id: 'south', version: 3, state: 'primary' },
    ]);
    expect((await f.t.kek.info()).latestVersion).toBe(3);
  });

  it('when two app instances share the database, then their simultaneous runs rotate each key once', async () => {
    const other = await secondInstance(f, rootKey);
    try {
      f.clock.advance(91 * DAY);
      const [a, b] = await Promise.all([call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', {}), call(other.app, f.rotator, 'POST', '/v1/rotation/run', {})]);
      expect([a.status, b.status]).toEqual([200, 200]);
      const rotated = [...(a.body.groups as { rotated: Array<{ groupId: string; toVersion: number }> }).rotated, ...(b.body.groups as { rotated: Array<{ groupId: string; toVersion: number }> }).rotated];
      expect(rotated.map((r) => `${r.groupId}:v${r.toVersion}`).sort()).toEqual(['north:v4', 'south:v4']);
      expect((await f.t.kek.info()).latestVersion).toBe(4);
      expect(await events(f, { action: 'kek.rotate' })).toHaveLength(3);
      // both apps deliver the same keys, still equal to what is stored
      const stored = await storedDeviceKeys(f, 'south');
      expect(Buffer.from((await fetchDeviceKeys(f, 'south-d00009'))[0]!.k, 'base64url').equals(stored.get('south-d00009:v1')!)).toBe(true);
      expect((await f.t.audit.verify()).ok).toBe(true);
    } finally {
      await other.close();
    }
  });

  it('when a group is due outside its maintenance windows, then cron waits for the window (and still finishes its unfinished work)', async () => {
    await createGroup(f, 'night', 10);
    const now = f.clock.now();
    const hour = now.getUTCHours();
    // a window opening two hours from now, for an hour, on every day
    const hh = (h: number) => String(((h % 24) + 24) % 24).padStart(2, '0');
    const put = await call(f.t.app, f.admin, 'PUT', '/v1/groups/night/policy', {
      group: { rotationPeriodDays: 1 },
      maintenanceWindows: [{ days: [1, 2, 3, 4, 5, 6, 7], start: `${hh(hour + 2)}:00`, end: `${hh(hour + 3)}:00`, tz: 'UTC' }],
    });
    expect(put.status, put.raw).toBe(200);
    expect(put.body).toMatchObject({ effective: { group: { rotationPeriodDays: 1, retentionDays: 0 } } });
    f.clock.advance(DAY);
    const outside = await runCron(f);
    expect(outside.groups.dueOutsideWindow).toEqual(['night']);
    expect(outside.groups.rotated).toEqual([]);
    expect((await call(f.t.app, f.admin, 'GET', '/v1/groups/night/rotation-status')).body).toMatchObject({ inMaintenanceWindow: false });
    f.clock.set(new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + 1, hour + 2, 30)));
    const inside = await runCron(f);
    expect(inside.groups.rotated).toEqual([{ groupId: 'night', fromVersion: 1, toVersion: 2 }]);
  });

  it('when the CLI runs `keystrata rotate --dry-run` and `keystrata rotate`, then it prints the same summary the route gives and changes nothing in the dry run', async () => {
    if (f.t.database.url === undefined) return; // PGlite fallback: no server for a second process
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-cli-'));
    const env = { ...process.env, DATABASE_URL: f.t.database.url, KEYSTRATA_ROOT_KEY: rootKey.toString('base64'), KEYSTRATA_DATA_DIR: dataDir, LOG_LEVEL: 'error', KEYSTRATA_MIGRATE_ON_START: 'false' };
    try {
      const before = await dumpDatabase(f);
      const dry = await run('npx', ['tsx', 'src/cli.ts', 'rotate', '--dry-run'], { env, cwd: process.cwd() });
      expect(await dumpDatabase(f)).toBe(before);
      const summary = JSON.parse(dry.stdout) as { dryRun: boolean; errors: unknown[]; groups: { checked: number } };
      expect(summary).toMatchObject({ dryRun: true, errors: [], groups: { checked: 3 } });
      const real = await run('npx', ['tsx', 'src/cli.ts', 'rotate', '--limit', '1000'], { env, cwd: process.cwd() });
      expect(JSON.parse(real.stdout)).toMatchObject({ dryRun: false, errors: [], limit: 1000 });
      expect((await events(f, { action: 'rotation.run' })).at(-1)).toMatchObject({ actor: 'cli', outcome: 'success' });
      await expect(run('npx', ['tsx', 'src/cli.ts', 'rotate', '--limit', 'zero'], { env })).rejects.toMatchObject({ code: 2 });
    } finally {
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it('when the token lacks the rotate scope or the body is wrong, then 403 / 400 and nothing runs', async () => {
    const reader = await f.t.token('keystrata:keys:read', { sub: 'ingest' });
    expectProblem(await call(f.t.app, reader, 'POST', '/v1/rotation/run', {}), 403);
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', { dryRun: 'yes' }), 400);
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', { limit: 0 }), 400);
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', { now: '2030-01-01' }), 400);
  });
});

/** A second keystrata on the same database: its own KEK provider instance, audit writer, caches. */
async function secondInstance(f: Fleet, rootKey: Buffer): Promise<{ app: KeystrataApp; close(): Promise<void> }> {
  const logger = createLogger('silent');
  const kek = createLocalKekProvider({ db: f.t.database.db, rootKey, dataDir: '/nonexistent', keyName: f.t.config.kekName, logger: { warn() {} } });
  await kek.init();
  const audit = createAuditService({ db: f.t.database.db, kek, clock: f.clock, logger });
  const authenticator = await createAuthenticator({ ...f.t.config.auth, dataDir: f.t.config.dataDir });
  const app = await buildApp({ config: f.t.config, database: f.t.database, kek, audit, authenticator, clock: f.clock, logger });
  await app.ready();
  return {
    app,
    async close() {
      await app.close();
      await audit.close();
    },
  };
}
