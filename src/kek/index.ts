/**
 * The KEK provider named by the configuration: `vault` when VAULT_ADDR is set, else the embedded
 * `local` provider (DESIGN §7), behind retries and a circuit breaker (circuit-breaker.ts).
 * Call `init()` on the result before use.
 */
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB } from '../db/database.js';
import { withKekResilience, type ResilientKekProvider } from './circuit-breaker.js';
import type { KekLogger, KekProvider } from './kek.types.js';
import { createLocalKekProvider } from './local.provider.js';
import { createVaultKekProvider } from './vault.provider.js';

export type { KekInfo, KekLogger, KekProvider, KekProviderKind, KekVersionInfo, RewrapResult } from './kek.types.js';
export { kekBlobVersion } from './kek.types.js';
export { isResilient, KekCircuitOpenError, registerKekCircuitMetrics, withKekResilience, type CircuitView, type ResilientKekProvider } from './circuit-breaker.js';

export function createKekProvider(
  config: Pick<Config, 'vault' | 'rootKey' | 'dataDir' | 'kekName'> & Partial<Pick<Config, 'kekResilience'>>,
  deps: { db: Kysely<DB>; logger?: KekLogger | undefined; clock?: Clock | undefined },
): ResilientKekProvider {
  const resilience = config.kekResilience ?? { breakerFailures: 5, breakerCooldownMs: 10_000, retryAttempts: 3 };
  return withKekResilience(createProvider(config, deps), {
    failureThreshold: resilience.breakerFailures,
    cooldownMs: resilience.breakerCooldownMs,
    retryAttempts: resilience.retryAttempts,
    logger: deps.logger,
  });
}

function createProvider(
  config: Pick<Config, 'vault' | 'rootKey' | 'dataDir' | 'kekName'>,
  deps: { db: Kysely<DB>; logger?: KekLogger | undefined; clock?: Clock | undefined },
): KekProvider {
  if (config.vault) {
    return createVaultKekProvider({
      addr: config.vault.addr,
      token: config.vault.token,
      namespace: config.vault.namespace,
      transitMount: config.vault.transitMount,
      keyName: config.kekName,
      requestTimeoutMs: config.vault.requestTimeoutMs,
      logger: deps.logger,
    });
  }
  return createLocalKekProvider({
    db: deps.db,
    rootKey: config.rootKey,
    dataDir: config.dataDir,
    keyName: config.kekName,
    logger: deps.logger,
    clock: deps.clock,
  });
}
