/**
 * The KEK provider named by the configuration: `vault` when VAULT_ADDR is set, else the embedded
 * `local` provider (DESIGN §7). Call `init()` on the result before use.
 */
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB } from '../db/database.js';
import type { KekLogger, KekProvider } from './kek.types.js';
import { createLocalKekProvider } from './local.provider.js';
import { createVaultKekProvider } from './vault.provider.js';

export type { KekInfo, KekLogger, KekProvider, KekProviderKind, KekVersionInfo, RewrapResult } from './kek.types.js';
export { kekBlobVersion } from './kek.types.js';

export function createKekProvider(
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
