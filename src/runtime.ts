/**
 * The parts the server and the CLI share, built from the configuration: database (PostgreSQL
 * or embedded PGlite), migrations, KEK provider, audit log, token verification.
 */
import type { Logger } from 'pino';
import { createAuditService, type AuditService } from './audit/audit.service.js';
import { createAuthenticator, type Authenticator } from './auth/authenticator.js';
import { systemClock, type Clock } from './clock.js';
import type { Config } from './config.js';
import { createPgliteDatabase, createPostgresDatabase, type Database } from './db/database.js';
import { migrateToLatest } from './db/migrator.js';
import { createKekProvider } from './kek/index.js';
import type { KekProvider } from './kek/kek.types.js';

export interface Runtime {
  config: Readonly<Config>;
  database: Database;
  kek: KekProvider;
  audit: AuditService;
  authenticator: Authenticator;
  clock: Clock;
  logger: Logger;
  close(): Promise<void>;
}

export async function openDatabase(config: Readonly<Config>, logger: Logger): Promise<Database> {
  if (config.databaseUrl !== undefined) return createPostgresDatabase(config.databaseUrl, config.databasePoolSize, { queryTimeoutMs: config.databaseQueryTimeoutMs });
  logger.warn({ dataDir: config.dataDir }, 'DATABASE_URL is not set: using embedded PGlite in the data directory (development and single-node use)');
  return createPgliteDatabase(config.dataDir);
}

export async function createRuntime(config: Readonly<Config>, logger: Logger, options: { migrate?: boolean; clock?: Clock; /** sign audit checkpoints periodically (the server) */ checkpoints?: boolean } = {}): Promise<Runtime> {
  const clock = options.clock ?? systemClock;
  const database = await openDatabase(config, logger);
  try {
    if (options.migrate ?? config.migrateOnStart) {
      const result = await migrateToLatest(database.db);
      const applied = result.results?.filter((r) => r.status === 'Success').map((r) => r.migrationName) ?? [];
      if (applied.length > 0) logger.info({ applied }, 'migrations applied');
    }
    const kek = await createKekProvider(config, { db: database.db, logger });
    await kek.init();
    const audit = createAuditService({
      db: database.db,
      kek,
      clock,
      logger,
      ...(options.checkpoints ? { checkpointIntervalMs: config.auditCheckpointIntervalSeconds * 1000 } : {}),
    });
    await audit.init();
    if (config.auth.jwksUrl === undefined) {
      logger.warn('AUTH_JWKS_URL is not set: tokens are verified against the local development issuer (`keystrata token`)');
    }
    const authenticator = await createAuthenticator({ ...config.auth, dataDir: config.dataDir });
    return {
      config,
      database,
      kek,
      audit,
      authenticator,
      clock,
      logger,
      async close() {
        await audit.close();
        await kek.close();
        await database.close();
      },
    };
  } catch (error) {
    await database.close().catch(() => {});
    throw error;
  }
}
