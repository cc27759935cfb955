import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { createTestDatabase, type TestDatabase } from '../support/db.js';
import { createMigrator } from '../../src/db/migrator.js';

describe('migrations', () => {
  let database: TestDatabase;
  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(async () => {
    await database.close();
  });

  it('when migrated down to nothing and up again, then every table comes back', async () => {
    const migrator = createMigrator(database.db);
    const tablesBefore = await listTables();
    expect(tablesBefore).toContain('device_versions');

    let step = await migrator.migrateDown();
    while (!step.error && step.results && step.results.length > 0) step = await migrator.migrateDown();
    expect(step.error).toBeUndefined();
    expect(await listTables()).not.toContain('device_versions');

    const up = await migrator.migrateToLatest();
    expect(up.error).toBeUndefined();
    expect(await listTables()).toEqual(tablesBefore);
  });

  async function listTables(): Promise<string[]> {
    const { rows } = await sql<{ table_name: string }>`
      select table_name from information_schema.tables
      where table_schema = 'public' and table_name not like 'kysely_%' order by table_name`.execute(database.db);
    return rows.map((r) => r.table_name);
  }
});
