/**
 * The KEK provider's retries and circuit breaker (src/kek/circuit-breaker.ts) on a scripted
 * provider and a manual clock: what is retried and what is not, when the circuit opens, what a
 * fast failure says (503, Retry-After = the rest of the cool-down), the half-open probe, and
 * the metrics.
 */
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { BadRequestError, KekUnavailableError, UnwrapError } from '../../src/http/errors.js';
import { KekCircuitOpenError, registerKekCircuitMetrics, withKekResilience, type KekResilienceOptions } from '../../src/kek/circuit-breaker.js';
import type { KekInfo, KekProvider } from '../../src/kek/kek.types.js';

type Outcome = 'ok' | 'unavailable' | 'unwrap' | 'bad';

function scripted() {
  const calls: string[] = [];
  let script: Outcome[] = [];
  let fallback: Outcome = 'ok';
  const info: KekInfo = { name: 'k', provider: 'vault', type: 'aes256-gcm96', derived: true, latestVersion: 1, minDecryptionVersion: 1, minEncryptionVersion: 0, versions: [] };
  const next = async <T>(name: string, value: T): Promise<T> => {
    calls.push(name);
    const outcome = script.shift() ?? fallback;
    if (outcome === 'unavailable') throw new KekUnavailableError('down (test)');
    if (outcome === 'unwrap') throw new UnwrapError();
    if (outcome === 'bad') throw new BadRequestError('bad (test)');
    return value;
  };
  const provider: KekProvider = {
    kind: 'vault',
    keyName: 'k',
    init: async () => {},
    wrap: (p) => next('wrap', `vault:v1:${p.toString('base64')}`),
    unwrap: () => next('unwrap', Buffer.alloc(32)),
    rewrapBatch: (items) => next('rewrap', items.map(() => ({ ok: true as const, blob: 'vault:v2:AA==' }))),
    rotate: () => next('rotate', info),
    info: () => next('info', info),
    setMinDecryptionVersion: () => next('config', undefined),
    health: async () => {
      calls.push('health');
      const outcome = script.shift() ?? fallback;
      return outcome === 'ok' ? { ok: true } : { ok: false, detail: 'down (test)' };
    },
    close: async () => {},
  };
  return {
    provider,
    calls,
    script: (...outcomes: Outcome[]) => void (script = outcomes),
    always: (outcome: Outcome) => void (fallback = outcome),
  };
}

function setup(overrides: Partial<KekResilienceOptions> = {}) {
  const s = scripted();
  let time = 1_000_000;
  const sleeps: number[] = [];
  const kek = withKekResilience(s.provider, {
    failureThreshold: 3,
    cooldownMs: 10_000,
    retryAttempts: 3,
    baseBackoffMs: 100,
    now: () => time,
    sleep: async (ms) => void sleeps.push(ms),
    ...overrides,
  });
  return { ...s, kek, sleeps, advance: (ms: number) => void (time += ms) };
}

async function failure(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('expected a failure');
}

describe('KEK retries and circuit breaker', () => {
  it('when an idempotent call meets a transient outage, then it is retried with growing, jittered backoff and succeeds', async () => {
    const t = setup();
    t.script('unavailable', 'unavailable', 'ok');
    expect((await t.kek.unwrap('vault:v1:AA==', 'ctx')).length).toBe(32);
    expect(t.calls).toEqual(['unwrap', 'unwrap', 'unwrap']);
    expect(t.sleeps).toHaveLength(2);
    expect(t.sleeps[0]).toBeLessThanOrEqual(100);
    expect(t.sleeps[1]).toBeLessThanOrEqual(200);
    expect(t.kek.circuit.view()).toMatchObject({ state: 'closed', consecutiveFailures: 0, retries: 2 });
  });

  it('when every attempt fails, then the call fails after retryAttempts attempts with KekUnavailableError', async () => {
    const t = setup({ failureThreshold: 10 });
    t.always('unavailable');
    expect(await failure(t.kek.wrap(Buffer.from('k'), 'ctx'))).toBeInstanceOf(KekUnavailableError);
    expect(t.calls).toEqual(['wrap', 'wrap', 'wrap']);
  });

  it('when rotate fails, then it is never retried (a retry after a lost answer would create two versions)', async () => {
    const t = setup();
    t.script('unavailable');
    expect(await failure(t.kek.rotate())).toBeInstanceOf(KekUnavailableError);
    expect(t.calls).toEqual(['rotate']);
  });

  it('when the provider refuses the data (UnwrapError) or the request (400), then nothing is retried and the circuit stays closed', async () => {
    const t = setup({ failureThreshold: 1 });
    t.script('unwrap', 'bad');
    expect(await failure(t.kek.unwrap('vault:v1:AA==', 'ctx'))).toBeInstanceOf(UnwrapError);
    expect(await failure(t.kek.setMinDecryptionVersion(2))).toBeInstanceOf(BadRequestError);
    expect(t.calls).toEqual(['unwrap', 'config']);
    expect(t.kek.circuit.view()).toMatchObject({ state: 'closed', consecutiveFailures: 0 });
    // and many UnwrapErrors in a row never open it
    t.always('unwrap');
    for (let i = 0; i < 10; i++) await failure(t.kek.unwrap('vault:v1:AA==', 'ctx'));
    expect(t.kek.circuit.view().state).toBe('closed');
  });

  it('when N unavailability failures come in a row, then the circuit opens and calls fail fast with Retry-After = the rest of the cool-down', async () => {
    const t = setup({ retryAttempts: 1 });
    t.always('unavailable');
    for (let i = 0; i < 3; i++) expect(await failure(t.kek.info())).toBeInstanceOf(KekUnavailableError);
    expect(t.kek.circuit.view()).toMatchObject({ state: 'open', consecutiveFailures: 3, retryInMs: 10_000, opened: 1 });
    const before = t.calls.length;
    t.advance(2_500);
    const fast = await failure(t.kek.unwrap('vault:v1:AA==', 'ctx'));
    expect(fast).toBeInstanceOf(KekCircuitOpenError);
    expect(fast).toBeInstanceOf(KekUnavailableError); // → 503 through the error handler
    expect((fast as KekCircuitOpenError).status).toBe(503);
    expect((fast as KekCircuitOpenError).retryAfterSeconds).toBe(8); // ceil(7.5 s)
    expect(await t.kek.health()).toMatchObject({ ok: false, detail: expect.stringContaining('circuit open') });
    expect(t.calls.length).toBe(before); // the provider was not called
    expect(t.kek.circuit.view().rejected).toBe(2);
  });

  it('when the circuit opens in the middle of a retried call, then the retries stop at once', async () => {
    const t = setup({ failureThreshold: 2, retryAttempts: 5 });
    t.always('unavailable');
    expect(await failure(t.kek.wrap(Buffer.from('k'), 'ctx'))).toBeInstanceOf(KekCircuitOpenError);
    expect(t.calls).toEqual(['wrap', 'wrap']);
  });

  it('when the cool-down is over, then one probe goes through (the others still fail fast); its success closes the circuit', async () => {
    const t = setup({ retryAttempts: 1 });
    t.always('unavailable');
    for (let i = 0; i < 3; i++) await failure(t.kek.info());
    t.advance(10_000);
    expect(t.kek.circuit.view().state).toBe('half_open');
    t.always('ok');
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const slow = t.provider.info;
    t.provider.info = async () => {
      await gate;
      return slow();
    };
    const probe = t.kek.info();
    const other = await failure(t.kek.info());
    expect(other).toBeInstanceOf(KekCircuitOpenError);
    expect((other as KekCircuitOpenError).retryAfterSeconds).toBe(1);
    release();
    await probe;
    expect(t.kek.circuit.view()).toMatchObject({ state: 'closed', consecutiveFailures: 0 });
    await t.kek.info();
  });

  it('when the probe fails, then the circuit opens again for a fresh cool-down', async () => {
    const t = setup({ retryAttempts: 3 });
    t.always('unavailable');
    for (let i = 0; i < 3; i++) await failure(t.kek.unwrap('vault:v1:AA==', 'ctx')).catch(() => {});
    expect(t.kek.circuit.view().state).toBe('open');
    t.advance(10_001);
    const calls = t.calls.length;
    expect(await failure(t.kek.unwrap('vault:v1:AA==', 'ctx'))).toBeInstanceOf(KekUnavailableError);
    expect(t.calls.length).toBe(calls + 1); // the probe only: the retry met the open circuit
    expect(t.kek.circuit.view()).toMatchObject({ state: 'open', retryInMs: 10_000, opened: 2 });
  });

  it('when readiness probes find the provider down, then they count towards opening the circuit, and a good one closes it', async () => {
    const t = setup();
    t.always('unavailable');
    for (let i = 0; i < 3; i++) expect((await t.kek.health()).ok).toBe(false);
    expect(t.kek.circuit.view().state).toBe('open');
    t.advance(10_000);
    t.always('ok');
    expect(await t.kek.health()).toEqual({ ok: true });
    expect(t.kek.circuit.view().state).toBe('closed');
  });

  it('when metrics are scraped, then the circuit state and the retry, rejection and opening counts are exported', async () => {
    const t = setup({ retryAttempts: 2 });
    const registry = new Registry();
    registerKekCircuitMetrics(registry, t.kek);
    t.always('unavailable');
    await failure(t.kek.info()); // 2 attempts, 1 retry
    await failure(t.kek.info()); // 3rd failure opens; no retry after the fast fail
    await failure(t.kek.info()); // rejected
    const text = await registry.metrics();
    expect(text).toMatch(/^keystrata_kek_circuit_state 2$/m);
    expect(text).toMatch(/^keystrata_kek_retries_total 2$/m);
    expect(text).toMatch(/^keystrata_kek_circuit_rejections_total 2$/m);
    expect(text).toMatch(/^keystrata_kek_circuit_openings_total 1$/m);
    // a provider without the breaker registers nothing
    const plain = new Registry();
    registerKekCircuitMetrics(plain, scripted().provider);
    expect((await plain.metrics()).trim()).toBe('');
  });

  it('when the options are out of range, then it refuses to build', () => {
    const s = scripted();
    expect(() => withKekResilience(s.provider, { failureThreshold: 0, cooldownMs: 1, retryAttempts: 1 })).toThrow(/failureThreshold/);
    expect(() => withKekResilience(s.provider, { failureThreshold: 1, cooldownMs: 1, retryAttempts: 0 })).toThrow(/retryAttempts/);
  });
});
