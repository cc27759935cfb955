/**
 * Kysely on `pg` when DATABASE_URL is set, on embedded PGlite (real Postgres in WASM) in the
 * data directory otherwise. Both speak the same SQL, so every query and migration runs on both.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Kysely, PostgresDialect, type PostgresPool, type PostgresPoolClient, type Transaction } from 'kysely';
import pg from 'pg';
import type { HierarchyTables } from './tables.js';
import type { AuditTables } from '../audit/audit.tables.js';
import type { KekTables } from '../kek/kek.tables.js';
import type { IdempotencyTables } from '../http/idempotency.repository.js';

export interface DB extends HierarchyTables, AuditTables, KekTables, IdempotencyTables {}
export type Executor = Kysely<DB> | Transaction<DB>;

export interface Database {
  db: Kysely<DB>;
  kind: 'postgres' | 'pglite';
  /** Cheap reachability check for /readyz. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

// int8 (bigint, counts) as JS numbers: every count we keep fits in 2^53.
pg.types.setTypeParser(20, (value: string) => Number(value));

/** A query the database did not answer in time (mapped to 503 by its code, like other network errors). */
export class DatabaseTimeoutError extends Error {
  readonly code = 'ETIMEDOUT';
  constructor(ms: number) {
    super(`The database did not answer within ${ms} ms`);
    this.name = 'DatabaseTimeoutError';
  }
}

/**
 * `queryTimeoutMs` (DATABASE_QUERY_TIMEOUT_MS; 0: none) bounds every query: past it the query
 * fails and its connection is destroyed. Without it a network partition (no FIN, no RST) held
 * every request on a pooled connection forever; connecting has its own 5 s timeout.
 */
export function createPostgresDatabase(connectionString: string, poolSize = 10, options: { queryTimeoutMs?: number | undefined } = {}): Database {
  const pool = new pg.Pool({ connectionString, max: poolSize, connectionTimeoutMillis: 5000 });
  // An idle client losing its connection (PostgreSQL restart) must not crash the process.
  pool.on('error', () => {});
  // Nor a checked-out one: pg-pool listens for errors only while a client is idle, and a client
  // whose connection ends emits 'error', so a restart while a request held a connection (inside
  // a transaction, or mid-query) was an uncaught exception. The query in flight still gets the
  // error, the next one is refused, and the pool drops the client when it is released.
  pool.on('connect', (client) => client.on('error', () => {}));
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool: wrapPool(pool, options.queryTimeoutMs ?? 0) }) });
  return {
    db,
    kind: 'postgres',
    async ping() {
      await pool.query('select 1');
    },
    async close() {
      await db.destroy();
    },
  };
}

/**
 * SQL texts run as named prepared statements on PostgreSQL (text → statement name). A hot
 * statement with a fixed text (key fetch, the audit appends) is then parsed and planned once
 * per connection instead of on every call: about half of such a query's PostgreSQL CPU here
 * (issue 7). Only fixed texts belong here (ids and lists travel as parameters, arrays included),
 * or every variant would stay prepared on every connection. PGlite runs them as usual.
 */
const PREPARED = new Map<string, string>();

/** Mark a fixed SQL text for a named prepared statement; returns the text, to pass on as usual. */
export function preparedStatement(text: string): string {
  if (!PREPARED.has(text)) PREPARED.set(text, `keystrata_${PREPARED.size + 1}`);
  return text;
}

/**
 * Kysely's pool: texts marked by preparedStatement run as named statements, and with a deadline
 * (`ms` > 0) each query is raced against it; a late query's connection is destroyed (it may never answer).
 */
function wrapPool(pool: pg.Pool, ms: number): PostgresPool {
  return {
    async connect() {
      const client = await pool.connect();
      const query = (sqlOrCursor: unknown, parameters?: ReadonlyArray<unknown>): unknown => {
        if (typeof sqlOrCursor !== 'string') return client.query(sqlOrCursor as never); // cursors (streaming) are not bounded
        const name = PREPARED.get(sqlOrCursor);
        const run = () => (name === undefined ? client.query(sqlOrCursor, parameters as unknown[]) : client.query({ name, text: sqlOrCursor, values: parameters as unknown[] }));
        if (ms <= 0) return run();
        let timer: NodeJS.Timeout | undefined;
        const deadline = new Promise<never>((_, reject) => {
          timer = setTimeout(() => {
            reject(new DatabaseTimeoutError(ms));
            // pg-pool frees a connection that never answers its connect the same way
            (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
          }, ms);
        });
        const running = run();
        running.catch(() => {}); // it fails once its connection is destroyed: the deadline answered already
        return Promise.race([running, deadline]).finally(() => clearTimeout(timer));
      };
      return { query: query as PostgresPoolClient['query'], release: () => client.release() };
    },
    end: () => pool.end(),
  };
}

/** `dataDir` undefined → in-memory (tests without a PostgreSQL server). */
export async function createPgliteDatabase(dataDir: string | undefined): Promise<Database> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { PGliteDialect } = await import('kysely-pglite-dialect');
  let client;
  if (dataDir === undefined) {
    client = new PGlite();
  } else {
    const dir = path.join(dataDir, 'pglite');
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    client = new PGlite(dir);
  }
  await client.waitReady;
  const db = new Kysely<DB>({ dialect: new PGliteDialect(client) });
  return {
    db,
    kind: 'pglite',
    async ping() {
      await client.query('select 1');
    },
    async close() {
      await db.destroy();
    },
  };
}
