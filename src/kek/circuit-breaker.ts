/**
 * Resilience around a KEK provider (issue 8): bounded retries with backoff for idempotent calls,
 * and a circuit breaker, so a Vault that is down costs each request one fast 503 instead of a
 * pile of requests each waiting out VAULT_REQUEST_TIMEOUT_MS.
 *
 *   closed     calls go through. A call failing with KekUnavailableError (unreachable, timed out,
 *              sealed, 5xx, garbage answer) is retried up to `retryAttempts` attempts in all, with
 *              exponential backoff and full jitter, when the call is idempotent: wrap, unwrap,
 *              rewrapBatch (a pure function of its input; the rotation service swaps a row only
 *              if it still holds the rewrapped blob), info, setMinDecryptionVersion (setting a
 *              value twice is setting it once). Never `rotate`: a retry after a lost answer would
 *              create two KEK versions. `failureThreshold` unavailability failures in a row (each
 *              attempt counts) open the circuit.
 *   open       every call fails at once with KekUnavailableError whose Retry-After is the rest of
 *              the cool-down; health() answers not ok without calling the provider.
 *   half-open  after the cool-down, ONE call goes through as a probe (the others still fail
 *              fast, Retry-After 1): success closes the circuit, unavailability opens it again
 *              for a fresh cool-down.
 *
 * Only unavailability counts. UnwrapError (the stored data's fault), BadRequest/Conflict (the
 * caller's) and any other answer prove the provider is there: they reset the failure count and
 * are never retried. A small hand-written state machine rather than a library (opossum,
 * cockatiel): the whole policy is these few rules, and it must know the provider's error types.
 */
import type { Registry } from 'prom-client';
import { Counter, Gauge } from 'prom-client';
import { KekUnavailableError } from '../http/errors.js';
import type { KekLogger, KekProvider } from './kek.types.js';

export type CircuitState = 'closed' | 'open' | 'half_open';

export interface KekResilienceOptions {
  /** unavailability failures in a row that open the circuit (KEK_BREAKER_FAILURES) */
  failureThreshold: number;
  /** how long the circuit stays open before one probe is let through (KEK_BREAKER_COOLDOWN_MS) */
  cooldownMs: number;
  /** attempts in all for an idempotent call, 1 = no retry (KEK_RETRY_ATTEMPTS) */
  retryAttempts: number;
  /** first backoff (doubled per retry, full jitter, at most `maxBackoffMs`); default 50 ms */
  baseBackoffMs?: number | undefined;
  maxBackoffMs?: number | undefined;
  logger?: KekLogger | undefined;
  /** for tests: time in ms and sleep */
  now?: (() => number) | undefined;
  sleep?: ((ms: number) => Promise<void>) | undefined;
}

export interface CircuitView {
  state: CircuitState;
  consecutiveFailures: number;
  /** ms left of the cool-down while open, else 0 */
  retryInMs: number;
  retries: number;
  rejected: number;
  opened: number;
}

export interface ResilientKekProvider extends KekProvider {
  readonly circuit: { view(): CircuitView };
}

/** The circuit is open: fail fast, and tell the client when to come back. */
export class KekCircuitOpenError extends KekUnavailableError {
  constructor(retryAfterSeconds: number) {
    super('The KEK provider is unavailable (circuit open after repeated failures); retry later', retryAfterSeconds);
  }
}

export function withKekResilience(provider: KekProvider, options: KekResilienceOptions): ResilientKekProvider {
  const { failureThreshold, cooldownMs, retryAttempts, logger } = options;
  for (const [name, value, min] of [['failureThreshold', failureThreshold, 1], ['cooldownMs', cooldownMs, 1], ['retryAttempts', retryAttempts, 1]] as const) {
    if (!Number.isInteger(value) || value < min) throw new Error(`${name} must be an integer ≥ ${min}`);
  }
  const baseBackoffMs = options.baseBackoffMs ?? 50;
  const maxBackoffMs = options.maxBackoffMs ?? 1000;
  const now = options.now ?? Date.now;
  const sleep = options.sleep ?? ((ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms)));

  let state: CircuitState = 'closed';
  let failures = 0;
  let openedAt = 0;
  let probing = false;
  const counts = { retries: 0, rejected: 0, opened: 0 };

  const remainingMs = () => Math.max(0, openedAt + cooldownMs - now());

  /** May a call go through now? Returns whether it is the half-open probe; throws when open. */
  function admit(): boolean {
    if (state === 'open') {
      if (remainingMs() > 0) {
        counts.rejected += 1;
        throw new KekCircuitOpenError(Math.max(1, Math.ceil(remainingMs() / 1000)));
      }
      state = 'half_open';
      probing = false;
    }
    if (state === 'half_open') {
      if (probing) {
        counts.rejected += 1;
        throw new KekCircuitOpenError(1);
      }
      probing = true;
      return true;
    }
    return false;
  }

  function succeeded(probe: boolean): void {
    if (probe) probing = false;
    failures = 0;
    if (state !== 'closed') {
      state = 'closed';
      logger?.info?.('KEK circuit closed: the provider answers again');
    }
  }

  function failed(probe: boolean): void {
    if (probe) probing = false;
    failures += 1;
    if (state === 'half_open' || (state === 'closed' && failures >= failureThreshold)) {
      state = 'open';
      openedAt = now();
      counts.opened += 1;
      logger?.warn(`KEK circuit open after ${failures} unavailability failure(s) in a row: calls fail fast for ${cooldownMs} ms`);
    }
  }

  /** One attempt through the breaker. */
  async function attempt<T>(call: () => Promise<T>): Promise<T> {
    const probe = admit();
    try {
      const result = await call();
      succeeded(probe);
      return result;
    } catch (error) {
      if (error instanceof KekUnavailableError) failed(probe);
      else succeeded(probe); // the provider answered (UnwrapError, Conflict, …): it is there
      throw error;
    }
  }

  /** Up to `attempts` attempts, backing off between them; only unavailability is retried, and never a fast-fail. */
  async function guarded<T>(call: () => Promise<T>, attempts: number): Promise<T> {
    for (let n = 1; ; n++) {
      try {
        return await attempt(call);
      } catch (error) {
        if (n >= attempts || !(error instanceof KekUnavailableError) || error instanceof KekCircuitOpenError) throw error;
        counts.retries += 1;
        const cap = Math.min(maxBackoffMs, baseBackoffMs * 2 ** (n - 1));
        await sleep(Math.random() * cap);
      }
    }
  }

  const idempotent = <T>(call: () => Promise<T>) => guarded(call, retryAttempts);

  return {
    kind: provider.kind,
    keyName: provider.keyName,
    init: () => provider.init(),
    wrap: (plaintext, context) => idempotent(() => provider.wrap(plaintext, context)),
    unwrap: (blob, context) => idempotent(() => provider.unwrap(blob, context)),
    rewrapBatch: (items) => idempotent(() => provider.rewrapBatch(items)),
    rotate: () => guarded(() => provider.rotate(), 1),
    info: () => idempotent(() => provider.info()),
    setMinDecryptionVersion: (version) => idempotent(() => provider.setMinDecryptionVersion(version)),
    async health() {
      // one attempt (readiness has its own deadline); a not-ok answer counts as a failure
      try {
        return await attempt(async () => {
          const result = await provider.health();
          if (!result.ok) throw new KekUnavailableError(result.detail ?? 'The KEK provider is not ready');
          return result;
        });
      } catch (error) {
        return { ok: false, detail: error instanceof Error ? error.message : 'unavailable' };
      }
    },
    close: () => provider.close(),
    circuit: {
      view: () => ({
        state: state === 'open' && remainingMs() === 0 ? 'half_open' : state,
        consecutiveFailures: failures,
        retryInMs: state === 'open' ? remainingMs() : 0,
        ...counts,
      }),
    },
  };
}

export function isResilient(kek: KekProvider): kek is ResilientKekProvider {
  return typeof (kek as Partial<ResilientKekProvider>).circuit?.view === 'function';
}

const STATE_VALUE: Record<CircuitState, number> = { closed: 0, half_open: 1, open: 2 };

/** keystrata_kek_circuit_state (0 closed, 1 half-open, 2 open) and counters of retries, fast fails and openings. */
export function registerKekCircuitMetrics(registry: Registry, kek: KekProvider): void {
  if (!isResilient(kek)) return;
  const view = () => kek.circuit.view();
  new Gauge({
    name: 'keystrata_kek_circuit_state',
    help: 'Circuit breaker of the KEK provider: 0 closed, 1 half-open (a probe may go through), 2 open (calls fail fast with 503)',
    registers: [registry],
    collect() {
      this.set(STATE_VALUE[view().state]);
    },
  });
  for (const [name, help, key] of [
    ['keystrata_kek_retries_total', 'KEK provider calls retried after an unavailability failure', 'retries'],
    ['keystrata_kek_circuit_rejections_total', 'KEK provider calls refused at once while the circuit was open', 'rejected'],
    ['keystrata_kek_circuit_openings_total', 'Times the KEK circuit opened', 'opened'],
  ] as const) {
    // mirrored from the breaker's own tallies at scrape time (they only grow)
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(view()[key]);
      },
    });
  }
}
