/**
 * Named prepared statements (db/database.ts preparedStatement, issue 7): a marked SQL text runs
 * as a named statement on PostgreSQL, parsed once per connection, with the same answers as an
 * unmarked one, with or without the query deadline; unmarked texts stay unnamed.
 */
import { CompiledQuery } from 'kysely';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createPostgresDatabase, preparedStatement, type Database } from '../../src/db/database.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';

const setup = inject('testDb');

describe.skipIf(setup.mode !== 'postgres')('named prepared statements', () => {
  let target: TestDatabase;
  const opened: Database[] = [];
  beforeAll(async () => {
    target = await createTestDatabase();
  });
  afterAll(async () => {
    for (const d of opened) await d.close();
    await target?.close();
  });

  const MARKED = preparedStatement('select x, x * 2 as twice from unnest($1::int[]) as t(x) order by x');
  const UNMARKED = 'select x, x * 3 as thrice from unnest($1::int[]) as t(x) order by x';
  const prepared = async (db: Database) =>
    (await db.db.executeQuery<{ name: string; statement: string }>(CompiledQuery.raw('select name, statement from pg_prepared_statements order by name', []))).rows;

  for (const queryTimeoutMs of [0, 30_000]) {
    it(`when a marked text runs (query deadline ${queryTimeoutMs} ms), then it is one named statement on the connection and answers like any query`, async () => {
      const database = createPostgresDatabase(target.url!, 1, { queryTimeoutMs }); // one connection: every query below shares it
      opened.push(database);
      for (const values of [[3, 1, 2], [10], []]) {
        const rows = (await database.db.executeQuery<{ x: number; twice: number }>(CompiledQuery.raw(MARKED, [values]))).rows;
        expect(rows).toEqual([...values].sort((a, b) => a - b).map((x) => ({ x, twice: 2 * x })));
      }
      await database.db.executeQuery(CompiledQuery.raw(UNMARKED, [[1]]));
      const statements = await prepared(database);
      expect(statements).toHaveLength(1);
      expect(statements[0]!.name).toMatch(/^keystrata_\d+$/);
      expect(statements[0]!.statement).toBe(MARKED);
    });
  }

  it('when the same text is marked twice, then it keeps one name', async () => {
    expect(preparedStatement(MARKED)).toBe(MARKED);
    const database = createPostgresDatabase(target.url!, 1);
    opened.push(database);
    await database.db.executeQuery(CompiledQuery.raw(MARKED, [[1]]));
    await database.db.executeQuery(CompiledQuery.raw(preparedStatement(MARKED), [[2]]));
    expect(await prepared(database)).toHaveLength(1);
  });
});
