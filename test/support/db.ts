/**
 * One database per test file: a clone of the migrated template on PostgreSQL, or a fresh
 * in-memory PGlite (migrated) when no server is reachable.
 */
import crypto from 'node:crypto';
import pg from 'pg';
import { inject } from 'vitest';
import { createPgliteDatabase, createPostgresDatabase, type Database } from '../../src/db/database.js';
import { migrateToLatest } from '../../src/db/migrator.js';

export interface TestDatabase extends Database {
  /** connection string of this file's database (postgres mode only) */
  url: string | undefined;
}

export async function createTestDatabase(): Promise<TestDatabase> {
  const setup = inject('testDb');
  if (setup.mode === 'pglite') {
    const database = await createPgliteDatabase(undefined);
    await migrateToLatest(database.db);
    return { ...database, url: undefined };
  }
  const name = `ks_${setup.runId}_${crypto.randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: setup.adminUrl });
  await admin.connect();
  try {
    await admin.query(`create database "${name}" template "${setup.template}"`);
  } finally {
    await admin.end();
  }
  const url = new URL(setup.adminUrl);
  url.pathname = `/${name}`;
  const database = createPostgresDatabase(url.toString(), 5);
  return {
    ...database,
    url: url.toString(),
    async close() {
      await database.close();
      const dropper = new pg.Client({ connectionString: setup.adminUrl });
      await dropper.connect();
      await dropper.query(`drop database if exists "${name}" with (force)`).catch(() => {});
      await dropper.end();
    },
  };
}
