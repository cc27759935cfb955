/** One database, a local KEK and the audit service for an audit test file. */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createManualClock } from '../../src/clock.js';
import { createAuditService, type AuditService, type AuditServiceOptions } from '../../src/audit/audit.service.js';
import { createLocalKekProvider } from '../../src/kek/local.provider.js';
import type { KekProvider } from '../../src/kek/kek.types.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';

export interface AuditFixture {
  database: TestDatabase;
  kek: KekProvider;
  clock: ReturnType<typeof createManualClock>;
  audit: AuditService;
  /** another service on the same database and KEK, as a second replica would be (initialised unless `init: false`) */
  replica(options?: Partial<AuditServiceOptions> & { init?: boolean }): Promise<AuditService>;
  close(): Promise<void>;
}

/** `init: false` leaves the audit keys to be created on first use (start-up calls init() in production). */
export async function createAuditFixture(options: Partial<AuditServiceOptions> & { init?: boolean } = {}): Promise<AuditFixture> {
  const { init = true, ...serviceOptions } = options;
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-audit-'));
  const database = await createTestDatabase();
  const kek = createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir, keyName: 'keystrata-kek', logger: { warn() {} } });
  await kek.init();
  const clock = createManualClock(new Date('2026-03-01T12:00:00.000Z'));
  const services: AuditService[] = [];
  const make = (extra: Partial<AuditServiceOptions> = {}): AuditService => {
    const service = createAuditService({ db: database.db, kek, clock, ...serviceOptions, ...extra });
    services.push(service);
    return service;
  };
  const audit = make();
  if (init) await audit.init();
  return {
    database,
    kek,
    clock,
    audit,
    async replica({ init: initReplica = true, ...extra } = {}) {
      const service = make(extra);
      if (initReplica) await service.init();
      return service;
    },
    async close() {
      for (const service of services) await service.close();
      await kek.close();
      await database.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
