/**
 * A complete keystrata for one test file: its own database, a local KEK with a random root
 * key, the real audit log, the development token issuer in a temp dir, and every log line
 * captured so tests can search them for secrets.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { buildApp, type AppDeps, type KeystrataApp } from '../../src/app.js';
import { auditRoutes } from '../../src/audit/audit.routes.js';
import { createAuditService, type AuditService } from '../../src/audit/audit.service.js';
import { createAuthenticator } from '../../src/auth/authenticator.js';
import { loadOrCreateDevIssuer } from '../../src/auth/dev-issuer.js';
import type { Scope } from '../../src/auth/principal.js';
import { createManualClock, systemClock, type Clock } from '../../src/clock.js';
import { loadConfig, type Config } from '../../src/config.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { loadHttpsOptions } from '../../src/http/tls.js';
import { createLogger } from '../../src/logger.js';
import { createPostgresDatabase } from '../../src/db/database.js';
import { createTestDatabase, type TestDatabase } from './db.js';

export interface TestApp {
  app: KeystrataApp;
  database: TestDatabase;
  kek: KekProvider;
  audit: AuditService;
  config: Readonly<Config>;
  clock: Clock;
  /** every log line written so far, raw JSON text */
  logs: string[];
  token(scopes: Scope[] | Scope, options?: { sub?: string; groups?: string[]; ttlSeconds?: number }): Promise<string>;
  close(): Promise<void>;
}

export async function createTestApp(
  options: {
    env?: Record<string, string>;
    kek?: (database: TestDatabase) => Promise<KekProvider>;
    manualClock?: boolean;
    plugins?: AppDeps['plugins'];
    /** PostgreSQL only: the app's pool connects to this URL instead (e.g. a fault-injecting proxy); `database.url` stays the direct one */
    databaseUrl?: (directUrl: string) => string;
  } = {},
): Promise<TestApp> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-test-'));
  const config = loadConfig({ KEYSTRATA_DATA_DIR: dataDir, LOG_LEVEL: 'debug', ...options.env });
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      logs.push(...chunk.toString('utf8').split('\n').filter((l) => l !== ''));
      callback();
    },
  });
  const logger = createLogger(config.logLevel, sink);
  const clock = options.manualClock ? createManualClock(new Date()) : systemClock;
  const created = await createTestDatabase();
  const database = options.databaseUrl && created.url ? routedDatabase(created, options.databaseUrl(created.url), config.databaseQueryTimeoutMs) : created;
  const kek = options.kek
    ? await options.kek(database)
    : createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir, keyName: config.kekName, logger });
  await kek.init();
  const audit = createAuditService({ db: database.db, kek, clock, logger });
  await audit.init();
  const authenticator = await createAuthenticator({ ...config.auth, dataDir });
  const issuer = await loadOrCreateDevIssuer(dataDir);
  const app = await buildApp({
    config,
    database,
    kek,
    audit,
    authenticator,
    clock,
    logger,
    https: loadHttpsOptions(config.tls), // TLS_* in options.env serve HTTPS, as server.ts does
    plugins: [async (instance) => instance.register(auditRoutes, { audit }), ...(options.plugins ?? [])],
  });
  await app.ready();

  return {
    app,
    database,
    kek,
    audit,
    config,
    clock,
    logs,
    token: (scopes, tokenOptions = {}) =>
      issuer.mintToken({
        sub: tokenOptions.sub ?? 'test-admin',
        scopes: Array.isArray(scopes) ? scopes : [scopes],
        groups: tokenOptions.groups ?? [],
        ttlSeconds: tokenOptions.ttlSeconds ?? 600,
        issuer: config.auth.issuer,
        audience: config.auth.audience,
      }),
    async close() {
      await app.close();
      await audit.close();
      await kek.close();
      await database.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** The test database, reached through another URL (its direct pool is never used); closing drops it as usual. */
function routedDatabase(direct: TestDatabase, url: string, queryTimeoutMs: number): TestDatabase {
  const routed = createPostgresDatabase(url, 5, { queryTimeoutMs });
  return {
    ...routed,
    url: direct.url,
    async close() {
      await routed.close();
      await direct.close();
    },
  };
}
