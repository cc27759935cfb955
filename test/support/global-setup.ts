/**
 * Runs once per `vitest run`: finds the PostgreSQL server (TEST_DATABASE_URL, or the machine's
 * 127.0.0.1:5432), migrates one template database, and lets every test file clone it
 * (`CREATE DATABASE … TEMPLATE …`, immich's trick) so files run in parallel, isolated.
 * With no server reachable, test files fall back to in-memory PGlite, and we say so loudly.
 */
import type { TestProject } from 'vitest/node';
import pg from 'pg';
import { Kysely, PostgresDialect } from 'kysely';
import { migrateToLatest } from '../../src/db/migrator.js';

declare module 'vitest' {
  export interface ProvidedContext {
    testDb: { mode: 'postgres'; adminUrl: string; template: string; runId: string } | { mode: 'pglite' };
  }
}

const DEFAULT_URL = 'postgres://postgres@127.0.0.1:5432/postgres';

function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

async function reachable(url: string): Promise<boolean> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 3000 });
  try {
    await client.connect();
    await client.query('select 1');
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const adminUrl = process.env.TEST_DATABASE_URL ?? DEFAULT_URL;
  if (!(await reachable(adminUrl))) {
    console.warn(
      `\n*** No PostgreSQL server reachable at ${new URL(adminUrl).host}: tests fall back to embedded PGlite (in memory).\n` +
        `*** CI runs against real PostgreSQL; start it to test what production runs.\n`,
    );
    project.provide('testDb', { mode: 'pglite' });
    return async () => {};
  }

  const runId = `${Date.now().toString(36)}${process.pid.toString(36)}`;
  const template = `ks_tpl_${runId}`;
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  await admin.query(`create database "${template}"`);
  const db = new Kysely<unknown>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: withDatabase(adminUrl, template), max: 1 }) }),
  });
  try {
    await migrateToLatest(db);
  } finally {
    await db.destroy();
  }
  console.info(`Tests run against PostgreSQL at ${new URL(adminUrl).host} (template database ${template}).`);
  project.provide('testDb', { mode: 'postgres', adminUrl, template, runId });

  return async () => {
    // Drop every database this run created (test files drop their own; this catches crashes).
    const { rows } = await admin.query<{ datname: string }>('select datname from pg_database where datname like $1', [`ks_%${runId}%`]);
    for (const { datname } of rows) {
      await admin.query(`drop database if exists "${datname}" with (force)`).catch(() => {});
    }
    await admin.end();
  };
}
