/**
 * KEK rotation through the vault provider against the transit emulator, with a small proxy in
 * front of it that records every rewrap request's batch size and can make single items fail
 * (transit answers 200 with a per-item `error`) or take Vault down in the middle of a rewrap.
 */
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createVaultKekProvider } from '../../src/kek/vault.provider.js';
import { call, expectProblem } from '../support/flow.js';
import { startTransitEmulator, type TransitEmulator } from '../support/transit-emulator.js';
import { createFleet, createGroup, createGroups, events, fetchDeviceKeys, runCron, setPolicies, storedDeviceKeys, type Fleet } from './support.js';

interface Proxy {
  url: string;
  rewrapBatches: number[];
  /** group ids whose rewrap items the proxy turns into per-item errors */
  failingGroups: Set<string>;
  /** after this many more rewrap requests, answer 503 to everything until cleared */
  outageAfter: number | undefined;
  down: boolean;
  close(): Promise<void>;
}

async function startProxy(target: string): Promise<Proxy> {
  const state: Omit<Proxy, 'url' | 'close'> = { rewrapBatches: [], failingGroups: new Set(), outageAfter: undefined, down: false };
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      void (async () => {
        const body = Buffer.concat(chunks);
        const rewrap = req.method === 'POST' && /\/rewrap\//.test(req.url ?? '');
        if (state.down) {
          res.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ errors: ['Vault is sealed'] }));
          return;
        }
        let contexts: string[] = [];
        if (rewrap) {
          const input = (JSON.parse(body.toString('utf8')) as { batch_input: Array<{ context: string }> }).batch_input;
          state.rewrapBatches.push(input.length);
          contexts = input.map((i) => Buffer.from(i.context, 'base64').toString('utf8'));
        }
        const headers: Record<string, string> = {};
        for (const [name, value] of Object.entries(req.headers)) if (typeof value === 'string' && name !== 'host' && name !== 'content-length') headers[name] = value;
        const answer = await fetch(`${target}${req.url}`, { method: req.method ?? 'GET', headers, ...(body.length > 0 ? { body } : {}) });
        let text = await answer.text();
        if (rewrap && answer.status === 200 && state.failingGroups.size > 0) {
          const parsed = JSON.parse(text) as { data: { batch_results: Array<Record<string, unknown>> } };
          parsed.data.batch_results = parsed.data.batch_results.map((r, i) =>
            [...state.failingGroups].some((g) => contexts[i]!.includes(`|group|${g}|`)) ? { error: 'injected: item could not be rewrapped', reference: '' } : r,
          );
          text = JSON.stringify(parsed);
        }
        if (rewrap && state.outageAfter !== undefined) {
          state.outageAfter -= 1;
          if (state.outageAfter <= 0) state.down = true;
        }
        res.writeHead(answer.status, { 'content-type': answer.headers.get('content-type') ?? 'application/json' }).end(text);
      })().catch(() => res.destroy());
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  const proxy = state as Proxy;
  proxy.url = `http://127.0.0.1:${port}`;
  proxy.close = () => new Promise<void>((resolve) => server.close(() => resolve()));
  return proxy;
}

describe('KEK rotation through the vault provider (transit emulator)', () => {
  let emulator: TransitEmulator;
  let proxy: Proxy;
  let f: Fleet;
  let devices: string[];
  beforeAll(async () => {
    emulator = await startTransitEmulator();
    proxy = await startProxy(emulator.url);
    f = await createFleet({
      kek: async () => createVaultKekProvider({ addr: proxy.url, token: emulator.token, transitMount: emulator.mount, keyName: 'keystrata-kek', requestTimeoutMs: 5000 }),
      readerGroups: ['fleet', 'grp-0000'],
    });
    await f.t.audit.init();
    await setPolicies(f, { kek: { gracePeriodDays: 0 } });
    devices = await createGroup(f, 'fleet', 20);
    await createGroups(f, Array.from({ length: 999 }, (_, i) => `grp-${String(i).padStart(4, '0')}`));
  });
  afterAll(async () => {
    await f.close();
    await proxy.close();
    await emulator.close();
  });

  const kekVersions = async () =>
    (await f.t.database.db.selectFrom('group_versions').select('kek_version').select((eb) => eb.fn.countAll<number>().as('n')).groupBy('kek_version').orderBy('kek_version').execute()).map((r) => [r.kek_version, Number(r.n)]);

  it('when the KEK is rotated, then transit rewraps all 1,000 group blobs in batches of 500 (seen at the emulator), and min_decryption_version follows', async () => {
    const before = await storedDeviceKeys(f, 'fleet');
    proxy.rewrapBatches.length = 0;
    const started = Date.now();
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    const ms = Date.now() - started;
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({
      provider: 'vault',
      rotated: true,
      fromVersion: 1,
      toVersion: 2,
      rewrap: { batches: 3, groupKeys: { rewrapped: 1_000, failed: 0, remaining: 0 }, auditKeys: { rewrapped: 2, failed: 0, remaining: 0 } },
      minDecryptionVersion: { before: 1, after: 2, raised: true },
    });
    // the two audit keys in one call, then the group blobs: every batch of group blobs ≥ 250
    expect(proxy.rewrapBatches).toEqual([2, 500, 500]);
    expect(await kekVersions()).toEqual([[2, 1_000]]);
    expect(await f.t.kek.info()).toMatchObject({ latestVersion: 2, minDecryptionVersion: 2 });
    const after = await storedDeviceKeys(f, 'fleet');
    for (const [key, material] of before) expect(after.get(key)?.equals(material)).toBe(true);
    expect(Buffer.from((await fetchDeviceKeys(f, devices[0]!))[0]!.k, 'base64url').equals(after.get(`${devices[0]}:v1`)!)).toBe(true);
    console.info(`KEK rotation through transit: 1,000 group blobs + 2 audit keys rewrapped in ${ms} ms`);
  });

  it('when transit fails single items, then each is reported and audited, keeps its old blob (still readable), and blocks the minimum', async () => {
    proxy.failingGroups.add('grp-0000');
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({
      toVersion: 3,
      rewrap: { groupKeys: { rewrapped: 999, failed: 1, remaining: 1 }, failures: [{ keyId: 'group:grp-0000', kekVersion: 2, error: 'injected: item could not be rewrapped' }] },
      minDecryptionVersion: { before: 2, after: 2, raised: false, lowestReferenced: 2, blockedBy: 'references' },
    });
    expect(await f.t.kek.info()).toMatchObject({ latestVersion: 3, minDecryptionVersion: 2 });
    // the old blob still unwraps through transit: a device enrolled in that group gets its key
    expect((await call(f.t.app, f.admin, 'POST', '/v1/groups/grp-0000/devices', { id: 'in-failed-group' })).status).toBe(201);
    expect(await fetchDeviceKeys(f, 'in-failed-group')).toHaveLength(1);
    expect(await events(f, { action: 'group.kek_rewrap', outcome: 'failure', keyId: 'group:grp-0000' })).toHaveLength(1);
    proxy.failingGroups.clear();
  });

  it('when Vault goes down in the middle of a rewrap, then the request fails with 503, nothing is lost, and a cron run finishes the job', async () => {
    proxy.rewrapBatches.length = 0;
    proxy.outageAfter = 2; // the audit keys' call and the first 500 group blobs go through
    const response = await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {});
    expectProblem(response, 503, 'unavailable');
    expect(response.headers['retry-after']).toBeDefined();
    expect(JSON.stringify(response.body)).not.toMatch(/vault:v\d+:/);
    expect(proxy.rewrapBatches).toEqual([2, 500]); // the next call never reached transit: 503
    // the first 500 in key order (the one left on version 2 among them) are on version 4
    expect(await kekVersions()).toEqual([
      [3, 500],
      [4, 500],
    ]);

    // cron during the outage: the KEK step fails and is reported and logged (no blob, no token); the rest still runs
    const during = await runCron(f);
    expect(during.errors).toEqual([{ step: 'kek', code: 'unavailable', message: expect.stringContaining('503') }]);
    expect(during.kek).toBeNull();
    const logged = f.t.logs.filter((l) => l.includes('rotation run: a step failed'));
    expect(logged.length).toBeGreaterThan(0);
    for (const line of f.t.logs) {
      expect(line).not.toMatch(/vault:v\d+:[A-Za-z0-9+/]/);
      expect(line).not.toContain(emulator.token);
    }

    proxy.down = false;
    proxy.outageAfter = undefined;
    // at every step every key stays readable
    expect((await storedDeviceKeys(f, 'fleet')).size).toBe(20);
    expect(await fetchDeviceKeys(f, 'in-failed-group')).toHaveLength(1);

    const run = await runCron(f);
    expect(run.kek).toMatchObject({ rotated: false, toVersion: 4, rewrap: { groupKeys: { rewrapped: 500, failed: 0, remaining: 0 } }, minDecryptionVersion: { before: 2, after: 4, raised: true } });
    expect(await kekVersions()).toEqual([[4, 1_000]]);
    expect(await f.t.kek.info()).toMatchObject({ latestVersion: 4, minDecryptionVersion: 4 });
    expect(await fetchDeviceKeys(f, 'in-failed-group')).toHaveLength(1);
    expect(await fetchDeviceKeys(f, devices[5]!)).toHaveLength(1);
    expect((await f.t.audit.verify()).ok).toBe(true);
  });
});
