/**
 * Vault down (issue 8, part 1a): the transit emulator answers 503, takes longer than
 * VAULT_REQUEST_TIMEOUT_MS, sends garbage or drops the connection — during key fetches with a
 * cold cache, during group creation, and during the rewrap of a KEK rotation. The app's KEK
 * provider is built as the server builds it (createKekProvider: vault provider behind retries
 * and the circuit breaker), with a short timeout and cool-down.
 *
 * Each case ends the same way: clients were told 503 + Retry-After in bounded time (never a
 * 500, never a hang), the circuit opened and later closed, and once Vault is healed every
 * deliverable version is delivered equal to the stored material (unwrapped independently,
 * through a provider of the test's own), nothing was lost, and the audit chain verifies.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createKekProvider, type ResilientKekProvider } from '../../src/kek/index.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createVaultKekProvider } from '../../src/kek/vault.provider.js';
import { call } from '../support/flow.js';
import { startTransitEmulator, type TransitEmulator, type TransitFault } from '../support/transit-emulator.js';
import {
  createFaultFleet,
  createGroupWithDevices,
  expectAuditChainVerifies,
  expectEveryDeliverableVersionUnwraps,
  expectNoKeyLost,
  expectUnavailable,
  sleep,
  tableSnapshot,
  timedCall,
  type FaultFleet,
} from './support.js';

const TIMEOUT_MS = 300; // VAULT_REQUEST_TIMEOUT_MS
const COOLDOWN_MS = 1500; // KEK_BREAKER_COOLDOWN_MS
const ATTEMPTS = 2; // KEK_RETRY_ATTEMPTS
const FAILURES = 3; // KEK_BREAKER_FAILURES
const CACHE_TTL_MS = 1000; // KEY_CACHE_TTL_SECONDS=1
/** the slowest a refusal may be: every attempt times out (a dropped connection is retried once inside the provider), plus backoff */
const REFUSAL_BOUND_MS = ATTEMPTS * 2 * TIMEOUT_MS + 1000;
const FAST_MS = 250;

const FAULTS: Array<{ name: string; fault: TransitFault }> = [
  { name: '503 (sealed)', fault: { kind: 'status', status: 503 } },
  { name: 'a delay beyond the request timeout', fault: { kind: 'delay', ms: 4 * TIMEOUT_MS } },
  { name: 'garbage (200, HTML)', fault: { kind: 'garbage' } },
  { name: 'garbage (502, HTML from a proxy)', fault: { kind: 'garbage', status: 502 } },
  { name: 'a dropped connection', fault: { kind: 'drop' } },
];

describe('Vault unavailable: key fetches, group creation and KEK rewrap', () => {
  let emulator: TransitEmulator;
  let f: FaultFleet;
  let kek: ResilientKekProvider;
  /** the test's own provider, straight to the emulator: the independent unwrap */
  let independent: KekProvider;
  let dataDir: string;
  const devices: string[] = [];
  const groups = ['vf-a', 'vf-b', 'vf-c', 'vf-d'];

  beforeAll(async () => {
    emulator = await startTransitEmulator();
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-vault-faults-'));
    f = await createFaultFleet({
      env: { KEY_CACHE_TTL_SECONDS: String(CACHE_TTL_MS / 1000) },
      kek: async (database) => {
        kek = createKekProvider(
          {
            vault: { addr: emulator.url, token: emulator.token, namespace: undefined, transitMount: emulator.mount, requestTimeoutMs: TIMEOUT_MS },
            rootKey: undefined,
            dataDir,
            kekName: 'keystrata-kek',
            kekResilience: { breakerFailures: FAILURES, breakerCooldownMs: COOLDOWN_MS, retryAttempts: ATTEMPTS },
          },
          { db: database.db, logger: { warn() {}, info() {} } },
        );
        return kek;
      },
    });
    independent = createVaultKekProvider({ addr: emulator.url, token: emulator.token, transitMount: emulator.mount, keyName: 'keystrata-kek', requestTimeoutMs: 5000 });
    expect((await call(f.t.app, f.admin, 'PUT', '/v1/policies', { kek: { gracePeriodDays: 0 } })).status).toBe(200);
    for (const g of groups) devices.push(...(await createGroupWithDevices(f, g, 30, ['serial'])));
  });
  afterAll(async () => {
    emulator?.setFault(undefined);
    await f?.close();
    await independent?.close();
    await emulator?.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  /** Healed, the circuit closed again (after its cool-down, the first call is the probe), the cache cold. */
  async function healed(): Promise<void> {
    emulator.setFault(undefined);
    await sleep(Math.max(COOLDOWN_MS, CACHE_TTL_MS) + 100);
    expect(['closed', 'half_open']).toContain(kek.circuit.view().state);
  }

  const requestsTo = (operation: string) => emulator.requests.filter((r) => r.path.includes(`/${operation}/`)).length;

  for (const { name, fault } of FAULTS) {
    it(`when Vault answers key fetches with ${name} (cold cache), then every client gets a bounded 503 + Retry-After, the circuit opens, and once healed every key is delivered`, async () => {
      await healed();
      const before = await expectEveryDeliverableVersionUnwraps(f, f.t.database.db, independent);
      await sleep(CACHE_TTL_MS + 100); // the fetches above warmed the cache: let it go cold again

      emulator.setFault({ ...fault, path: '/decrypt/' });
      const started = performance.now();
      const answers = await Promise.all([
        ...groups.flatMap((g) => [0, 1, 2].map((i) => timedCall(f, f.admin, 'GET', `/v1/devices/${g}-d0000${i}/keys`))),
        timedCall(f, f.admin, 'GET', `/v1/devices/${groups[0]}-d00000/fields/serial/keys`),
        timedCall(f, f.admin, 'POST', '/v1/keys/fetch', { items: devices.slice(0, 50).map((deviceId) => ({ deviceId })) }),
      ]);
      for (const answer of answers) expectUnavailable(answer, { withinMs: REFUSAL_BOUND_MS, maxRetryAfter: 5 });
      expect(performance.now() - started).toBeLessThan(REFUSAL_BOUND_MS);
      expect(kek.circuit.view()).toMatchObject({ state: 'open' });
      const slowest = Math.round(Math.max(...answers.map((a) => a.ms)));

      // open: no call reaches Vault, the answer is immediate and says when to come back
      const calls = requestsTo('decrypt');
      const fast = await timedCall(f, f.admin, 'GET', `/v1/devices/${groups[3]}-d00010/keys`);
      expectUnavailable(fast, { withinMs: FAST_MS, maxRetryAfter: Math.ceil(COOLDOWN_MS / 1000) });
      expect(fast.body.detail).toMatch(/circuit open/);
      const ready = await timedCall(f, undefined, 'GET', '/readyz');
      expect(ready.status).toBe(503);
      expect(ready.headers['retry-after']).toBe('5');
      expect(ready.body).toMatchObject({ status: 'unavailable', checks: { database: { ok: true }, kek: { ok: false } } });
      expect(requestsTo('decrypt')).toBe(calls);
      console.info(`vault fault during key fetches, ${name}: ${answers.length} concurrent requests → 503 + Retry-After, slowest ${slowest} ms; circuit open → ${Math.round(fast.ms)} ms, Retry-After ${String(fast.headers['retry-after'])}`);
      const text = (await f.t.app.inject({ method: 'GET', url: '/metrics' })).body;
      expect(text).toMatch(/^keystrata_kek_circuit_state 2$/m);
      // no answer carried a blob, the token or a stack
      for (const answer of answers) expect(answer.raw).not.toMatch(/vault:v\d+:|at .*\.ts:\d+|hvs\.|s\.[A-Za-z0-9]{20}/);
      expect(answers.map((a) => a.raw).join('')).not.toContain(emulator.token);

      await healed();
      const after = await expectEveryDeliverableVersionUnwraps(f, f.t.database.db, independent);
      expect(kek.circuit.view().state).toBe('closed');
      expect((await f.t.app.inject({ method: 'GET', url: '/metrics' })).body).toMatch(/^keystrata_kek_circuit_state 0$/m);
      expectNoKeyLost(before, after);
      await expectAuditChainVerifies(f);
    });
  }

  it('when Vault refuses to encrypt, then creating a group is a bounded 503 + Retry-After and stores nothing', async () => {
    await healed();
    const before = await tableSnapshot(f.t.database.db);
    emulator.setFault({ kind: 'status', status: 503, path: '/encrypt/' });
    const answer = await timedCall(f, f.admin, 'POST', '/v1/groups', { id: 'vf-new', deviceType: 'pump', region: 'eu' });
    expectUnavailable(answer, { withinMs: REFUSAL_BOUND_MS });
    expect(await tableSnapshot(f.t.database.db)).toEqual(before);
    await healed();
    expect((await call(f.t.app, f.admin, 'POST', '/v1/groups', { id: 'vf-new', deviceType: 'pump', region: 'eu' })).status).toBe(201);
    await expectAuditChainVerifies(f);
  });

  for (const { name, fault } of FAULTS) {
    it(`when Vault answers the KEK rewrap with ${name}, then POST /v1/kek/rotate is a bounded 503 + Retry-After, every key stays readable, and cron finishes the rewrap once healed`, async () => {
      await healed();
      const before = await expectEveryDeliverableVersionUnwraps(f, f.t.database.db, independent);
      const from = (await independent.info()).latestVersion;

      emulator.setFault({ ...fault, path: '/rewrap/' });
      const rotate = await timedCall(f, f.admin, 'POST', '/v1/kek/rotate', {});
      expectUnavailable(rotate, { withinMs: REFUSAL_BOUND_MS + 2000 });
      expect(rotate.raw).not.toMatch(/vault:v\d+:/);
      // the new version exists; no group blob moved to it
      expect((await independent.info()).latestVersion).toBe(from + 1);
      const onOld = await f.t.database.db.selectFrom('group_versions').select('kek_version').where('kek_version', '<', from + 1).execute();
      expect(onOld.length).toBeGreaterThanOrEqual(groups.length);

      // reads do not need rewrap: keys are still delivered (cold cache, decrypt is healthy)
      await sleep(CACHE_TTL_MS + 100);
      await expectEveryDeliverableVersionUnwraps(f, f.t.database.db, independent);
      // retried while Vault still fails: 503 again, never a 409 (the lease was given back). The
      // circuit stays closed: transit answers everything but rewrap, and each run's info() succeeds.
      expectUnavailable(await timedCall(f, f.admin, 'POST', '/v1/kek/rotate', { rewrapOnly: true }), { withinMs: REFUSAL_BOUND_MS + 2000 });
      const again = await timedCall(f, f.admin, 'POST', '/v1/kek/rotate', { rewrapOnly: true });
      expectUnavailable(again, { withinMs: REFUSAL_BOUND_MS + 2000 });
      console.info(`vault fault during KEK rewrap, ${name}: rotate → 503 in ${Math.round(rotate.ms)} ms (Retry-After ${String(rotate.headers['retry-after'])}); retried → 503 in ${Math.round(again.ms)} ms (circuit ${kek.circuit.view().state})`);

      await healed();
      const run = await call(f.t.app, f.rotator, 'POST', '/v1/rotation/run', {});
      expect(run.status, run.raw).toBe(200);
      expect(run.body.errors).toEqual([]);
      expect(run.body.kek).toMatchObject({ toVersion: from + 1, rewrap: { groupKeys: { failed: 0, remaining: 0 }, auditKeys: { failed: 0, remaining: 0 } }, minDecryptionVersion: { after: from + 1 } });
      const versions = await f.t.database.db.selectFrom('group_versions').select('kek_version').distinct().execute();
      expect(versions.map((v) => v.kek_version)).toEqual([from + 1]);
      expect(await independent.info()).toMatchObject({ latestVersion: from + 1, minDecryptionVersion: from + 1 });

      await sleep(CACHE_TTL_MS + 100);
      const after = await expectEveryDeliverableVersionUnwraps(f, f.t.database.db, independent);
      expectNoKeyLost(before, after);
      await expectAuditChainVerifies(f);
    });
  }
});
