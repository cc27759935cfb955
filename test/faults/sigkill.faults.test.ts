/**
 * The process killed (issue 8, part 1c): the real server (`node --import tsx src/server.ts`)
 * on this file's database is SIGKILLed in the middle of a rotation run — a rollout wave over
 * 10,000 devices, and a group rotation moving 10,000 device keys — then started again, and
 * cron runs until the work is done. Afterwards every device was rotated (or moved) exactly once,
 * no chunk landed half, nothing was lost, every deliverable version is delivered equal to the
 * stored material (unwrapped independently), and the audit chain verifies.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { CryptoKey } from 'jose';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { loadOrCreateDevIssuer, type DevIssuer } from '../../src/auth/dev-issuer.js';
import { createPostgresDatabase, type Database } from '../../src/db/database.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';
import { newDeliveryKeyPair } from '../support/flow.js';
import { expectEveryDeliverableVersionUnwraps, expectNoKeyLost, freePort, storedMaterial, until, type Deliveries } from './support.js';

const setup = inject('testDb');
const DEVICES = 10_000;

interface Server {
  child: ChildProcess;
  output: string[];
  exited: Promise<number | null>;
}

describe.skipIf(setup.mode !== 'postgres')('the server SIGKILLed in the middle of a rotation run', () => {
  let target: TestDatabase;
  let direct: Database;
  let dataDir: string;
  let port: number;
  let server: Server | undefined;
  let issuer: DevIssuer;
  let admin: string;
  let rotator: string;
  let backend: { privateKey: CryptoKey };
  let independent: KekProvider;
  const rootKey = crypto.randomBytes(32);
  const base = () => `http://127.0.0.1:${port}`;

  function start(): Server {
    const env: Record<string, string> = {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      HOME: process.env.HOME ?? os.tmpdir(),
      DATABASE_URL: target.url!,
      KEYSTRATA_DATA_DIR: dataDir,
      KEYSTRATA_ROOT_KEY: rootKey.toString('base64'),
      PORT: String(port),
      HOST: '127.0.0.1',
      LOG_LEVEL: 'warn',
      RATE_LIMIT_ENABLED: 'false',
      AUDIT_CHECKPOINT_INTERVAL_SECONDS: '3600',
    };
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], { cwd: process.cwd(), env, stdio: ['ignore', 'pipe', 'pipe'] });
    const output: string[] = [];
    child.stdout!.on('data', (chunk: Buffer) => output.push(chunk.toString('utf8')));
    child.stderr!.on('data', (chunk: Buffer) => output.push(chunk.toString('utf8')));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    return { child, output, exited };
  }

  async function ready(s: Server): Promise<void> {
    await until(async () => {
      if (s.child.exitCode !== null) throw new Error(`the server exited: ${s.output.join('')}`);
      return (await fetch(`${base()}/readyz`).catch(() => undefined))?.status === 200;
    }, 60_000, 100);
  }

  async function api(token: string, method: string, url: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown>; raw: string }> {
    const response = await fetch(`${base()}${url}`, {
      method,
      headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
    const raw = await response.text();
    return { status: response.status, body: raw ? (JSON.parse(raw) as Record<string, unknown>) : {}, raw };
  }

  async function kill(s: Server): Promise<void> {
    s.child.kill('SIGKILL');
    expect(await s.exited).toBeNull(); // killed by the signal, no exit code: nothing ran to clean up
  }

  const deliveries = (): Deliveries => ({ fetchBulk: (items) => api(admin, 'POST', '/v1/keys/fetch', { items }), privateKey: backend.privateKey });

  async function enrol(groupId: string): Promise<string[]> {
    expect((await api(admin, 'POST', '/v1/groups', { id: groupId, deviceType: 'pump', region: 'eu' })).status).toBe(201);
    const ids = Array.from({ length: DEVICES }, (_, i) => `${groupId}-d${String(i).padStart(5, '0')}`);
    for (let i = 0; i < ids.length; i += 10_000) {
      const bulk = await api(admin, 'POST', `/v1/groups/${groupId}/devices/bulk`, { ids: ids.slice(i, i + 10_000) });
      expect(bulk.status, bulk.raw).toBe(201);
    }
    for (const id of ids.slice(0, 5)) expect((await api(admin, 'POST', `/v1/devices/${id}/fields`, { field: 'serial' })).status).toBe(201);
    return ids;
  }

  async function count(query: ReturnType<typeof sql<{ n: number }>>): Promise<number> {
    return (await query.execute(direct.db)).rows[0]!.n;
  }

  async function expectChainVerifies(): Promise<void> {
    const verified = await api(admin, 'POST', '/v1/audit/verify', {});
    expect(verified.status, verified.raw).toBe(200);
    expect(verified.body, verified.raw).toMatchObject({ ok: true });
  }

  beforeAll(async () => {
    target = await createTestDatabase();
    direct = createPostgresDatabase(target.url!, 3);
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-sigkill-'));
    port = await freePort();
    server = start();
    await ready(server);
    issuer = await loadOrCreateDevIssuer(dataDir); // the server created it in the data directory
    const mint = (scopes: string[], sub: string) =>
      issuer.mintToken({ sub, scopes: scopes as never, groups: [], ttlSeconds: 3600, issuer: 'keystrata-dev', audience: 'keystrata' });
    admin = await mint(['keystrata:admin'], 'verifier');
    rotator = await mint(['keystrata:rotate'], 'cron');
    const pair = await newDeliveryKeyPair('X25519');
    backend = { privateKey: pair.privateKey };
    expect((await api(admin, 'PUT', '/v1/clients/verifier/delivery-key', { jwk: pair.publicJwk })).status).toBe(200);
    independent = createLocalKekProvider({ db: direct.db, rootKey, dataDir: '/nonexistent', keyName: 'keystrata-kek', logger: { warn() {} } });
  }, 180_000);
  afterAll(async () => {
    if (server && server.child.exitCode === null && server.child.signalCode === null) {
      server.child.kill('SIGTERM');
      await server.exited;
    }
    await direct?.close();
    await target?.close();
    if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it(`when the server is killed in the middle of a rollout wave over ${DEVICES.toLocaleString('en')} devices, then after a restart cron finishes it: each device rotated exactly once, nothing lost`, async () => {
    const ids = await enrol('kill-roll');
    const before = await storedMaterial(direct.db, independent);
    const started = await api(admin, 'POST', '/v1/rollouts', { groupId: 'kill-roll', level: 'device', percentPerDay: 100 });
    expect(started.status, started.raw).toBe(201);
    const rolloutId = started.body.id as string;
    const done = () => count(sql<{ n: number }>`select count(*)::int as n from rollout_items where rollout_id = ${rolloutId} and status = 'done'`);
    const rotated = () => count(sql<{ n: number }>`select count(*)::int as n from device_versions v join devices d on d.id = v.device_id where d.group_id = 'kill-roll' and v.version = 2`);

    const runStarted = performance.now();
    const run = api(rotator, 'POST', '/v1/rotation/run', {}).catch((error: unknown) => error);
    await until(async () => (await done()) >= 2000, 60_000, 5);
    const killedAfter = performance.now() - runStarted;
    await kill(server!);
    expect(await run).toBeInstanceOf(Error); // the connection died with the process
    const atKill = await done();
    expect(atKill).toBeLessThan(ids.length);
    // whole chunks only: every rotated device has its item done, and no item is done without its rotation
    expect(await rotated()).toBe(atKill);

    server = start();
    await ready(server);
    for (let i = 0; i < 10 && (await done()) < ids.length; i++) {
      const again = await api(rotator, 'POST', '/v1/rotation/run', {});
      expect(again.status, again.raw).toBe(200);
    }
    expect(await done()).toBe(ids.length);
    const states = await sql<{ states: string; n: number }>`
      select states, count(*)::int as n from (
        select string_agg(v.version || ':' || v.state, ',' order by v.version) as states
        from device_versions v join devices d on d.id = v.device_id where d.group_id = 'kill-roll' group by v.device_id) s
      group by states`.execute(direct.db);
    expect(states.rows).toEqual([{ states: '1:grace,2:primary', n: ids.length }]);
    expect(
      await count(sql<{ n: number }>`select count(*)::int as n from (
        select key_id from audit_events where action = 'device.rotate' and outcome = 'success' and key_id like 'device:kill-roll-%' group by key_id having count(*) = 1) once`),
    ).toBe(ids.length);
    expect(await count(sql<{ n: number }>`select count(*)::int as n from audit_events where action = 'device.rotate' and key_id like 'device:kill-roll-%'`)).toBe(ids.length);
    expect(await count(sql<{ n: number }>`select count(*)::int as n from key_outbox where kind = 'device' and version = 2 and device_id like 'kill-roll-%'`)).toBe(ids.length);
    console.info(`SIGKILL ${Math.round(killedAfter)} ms into a rollout wave of ${ids.length} devices: ${atKill} rotated before the kill (whole chunks), the rest after the restart; each rotated once`);

    const after = await expectEveryDeliverableVersionUnwraps(deliveries(), direct.db, independent);
    expectNoKeyLost(before, after);
    await expectChainVerifies();
  }, 120_000);

  it(`when the server is killed while a group rotation moves ${DEVICES.toLocaleString('en')} device keys, then after a restart cron finishes it: each moved exactly once, nothing lost`, async () => {
    const ids = await enrol('kill-grp');
    const before = await storedMaterial(direct.db, independent);
    const moved = () =>
      count(sql<{ n: number }>`select count(*)::int as n from device_versions v join devices d on d.id = v.device_id where d.group_id = 'kill-grp' and v.parent_version = 2`);
    const events = () => count(sql<{ n: number }>`select count(*)::int as n from audit_events where action = 'device.group_rewrap' and key_id like 'device:kill-grp-%'`);

    const rotationStarted = performance.now();
    const rotation = api(admin, 'POST', '/v1/groups/kill-grp/rotate', { limit: DEVICES }).catch((error: unknown) => error);
    await until(async () => (await moved()) >= 2000, 60_000, 5);
    const killedAfter = performance.now() - rotationStarted;
    await kill(server!);
    expect(await rotation).toBeInstanceOf(Error);
    const atKill = await moved();
    expect(atKill).toBeLessThan(ids.length);
    expect(await events()).toBe(atKill); // each committed chunk with its audit events, nothing else

    server = start();
    await ready(server);
    for (let i = 0; i < 10 && (await moved()) < ids.length; i++) {
      const again = await api(rotator, 'POST', '/v1/rotation/run', {});
      expect(again.status, again.raw).toBe(200);
    }
    expect(await moved()).toBe(ids.length);
    expect(await events()).toBe(ids.length);
    expect(
      await count(sql<{ n: number }>`select count(*)::int as n from (
        select key_id from audit_events where action = 'device.group_rewrap' and outcome = 'success' and key_id like 'device:kill-grp-%' group by key_id having count(*) = 1) once`),
    ).toBe(ids.length);
    console.info(`SIGKILL ${Math.round(killedAfter)} ms into a group rotation of ${ids.length} devices: ${atKill} moved before the kill (whole chunks), the rest by cron after the restart; each moved once`);

    const after = await expectEveryDeliverableVersionUnwraps(deliveries(), direct.db, independent);
    expectNoKeyLost(before, after);
    await expectChainVerifies();
  }, 120_000);
});
