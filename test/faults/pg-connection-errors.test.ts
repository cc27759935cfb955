/**
 * Regression: a PostgreSQL connection that dies while a request holds it (inside a transaction,
 * or mid-query) must fail that request, never the process. pg-pool listens for client errors
 * only while a client is idle; a checked-out client whose connection ends emits 'error' with no
 * listener, an uncaught exception that would kill the server on a database restart.
 */
import type { FastifyRequest } from 'fastify';
import { sql } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from 'vitest';
import { createPostgresDatabase, DatabaseTimeoutError, type Database } from '../../src/db/database.js';
import { toProblem } from '../../src/http/error-handler.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';
import { sleep, startTcpProxy, type TcpProxy } from './support.js';

const setup = inject('testDb');

describe('errors of a lost PostgreSQL connection', () => {
  const request = { url: '/v1/groups/g/rotate', id: 'req-1' } as FastifyRequest;
  it.each([
    ['Connection terminated unexpectedly'],
    ['Client has encountered a connection error and is not queryable'], // the ROLLBACK of an interrupted transaction (was a 500)
    ['Client was closed and is not queryable'],
    ['timeout exceeded when trying to connect'],
    ['Connection terminated due to connection timeout'],
  ])('when pg says "%s", then the answer is 503 + Retry-After, not a 500', (message) => {
    expect(toProblem(new Error(message), request)).toMatchObject({ problem: { status: 503, code: 'database_unavailable' }, retryAfter: 5 });
  });
  it('when a query passes its deadline, then the answer is 503 + Retry-After', () => {
    expect(toProblem(new DatabaseTimeoutError(2000), request)).toMatchObject({ problem: { status: 503, code: 'database_unavailable' }, retryAfter: 5 });
  });
});

describe.skipIf(setup.mode !== 'postgres')('a PostgreSQL connection dying under a request', () => {
  let target: TestDatabase;
  let proxy: TcpProxy;
  let database: Database;
  const uncaught: unknown[] = [];
  const record = (error: unknown) => void uncaught.push(error);

  beforeAll(async () => {
    target = await createTestDatabase();
    const url = new URL(target.url!);
    proxy = await startTcpProxy({ host: url.hostname, port: Number(url.port || 5432) });
    database = createPostgresDatabase(proxy.urlFor(target.url!), 2);
    process.on('uncaughtException', record);
  });
  afterEach(() => proxy.restore());
  afterAll(async () => {
    process.off('uncaughtException', record);
    await database?.close();
    await proxy?.close();
    await target?.close();
  });

  it('when the connection is cut between two statements of a transaction, then the transaction fails, nothing is uncaught, and the pool serves the next query', async () => {
    const transaction = database.db.transaction().execute(async (trx) => {
      await sql`select 1`.execute(trx);
      proxy.cut();
      await sleep(100); // the client learns its connection ended while no query runs on it
      await sql`select 2`.execute(trx);
    });
    await expect(transaction).rejects.toThrow(/Connection terminated|not queryable/);
    await sleep(50);
    expect(uncaught).toEqual([]);
    proxy.restore();
    expect((await sql<{ n: number }>`select 3 as n`.execute(database.db)).rows).toEqual([{ n: 3 }]);
  });

  it('when the network is partitioned (nothing answers), then a query fails at its deadline, a transaction too (as a 503), and the pool recovers', async () => {
    const bounded = createPostgresDatabase(proxy.urlFor(target.url!), 2, { queryTimeoutMs: 500 });
    try {
      await Promise.all([sql`select pg_sleep(0.05)`.execute(bounded.db), sql`select pg_sleep(0.05)`.execute(bounded.db)]); // two idle connections
      proxy.blackhole();
      let started = performance.now();
      await expect(sql`select 1`.execute(bounded.db)).rejects.toBeInstanceOf(DatabaseTimeoutError);
      expect(performance.now() - started).toBeLessThan(1500);
      started = performance.now();
      const failure = await bounded.db
        .transaction()
        .execute(async (trx) => sql`select 2`.execute(trx))
        .then(() => undefined, (error: unknown) => error);
      expect(performance.now() - started).toBeLessThan(1500);
      expect(toProblem(failure, { url: '/x', id: 'r' } as FastifyRequest)).toMatchObject({ problem: { status: 503 }, retryAfter: 5 });
      proxy.restore(); // the held connections are gone, as after a partition; the pool notices
      await sleep(50);
      expect((await sql<{ n: number }>`select 5 as n`.execute(bounded.db)).rows).toEqual([{ n: 5 }]);
      expect(uncaught).toEqual([]);
    } finally {
      proxy.restore();
      await bounded.close();
    }
  });

  it('when the connection is cut in the middle of a query, then that query fails, nothing is uncaught, and the pool serves the next query', async () => {
    const slow = sql`select pg_sleep(1)`.execute(database.db);
    await sleep(100);
    proxy.cut();
    await expect(slow).rejects.toThrow(/Connection terminated/);
    await sleep(50);
    expect(uncaught).toEqual([]);
    proxy.restore();
    expect((await sql<{ n: number }>`select 4 as n`.execute(database.db)).rows).toEqual([{ n: 4 }]);
  });
});
