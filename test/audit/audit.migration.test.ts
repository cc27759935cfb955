import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql, type Kysely } from 'kysely';
import pg from 'pg';
import { createPostgresDatabase } from '../../src/db/database.js';
import * as auditMigration from '../../migrations/20261121000200_audit.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';

/**
 * `keystrata.app_role`: when set while migrating, the audit migration revokes what the
 * application role must never do. Roles are cluster-wide, so this needs the PostgreSQL server.
 */
describe('audit migration and the application role', () => {
  let database: TestDatabase;
  const role = `ks_app_${crypto.randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(async () => {
    if (database.url !== undefined) {
      const client = new pg.Client({ connectionString: database.url });
      await client.connect();
      await client.query(`drop owned by ${role}`).catch(() => {});
      await client.query(`drop role if exists ${role}`).catch(() => {});
      await client.end();
    }
    await database.close();
  });

  /** A session of its own with `keystrata.app_role` set, as `PGOPTIONS=-c keystrata.app_role=…` would give. */
  async function withAppRoleSetting<T>(value: string, fn: (db: Kysely<any>) => Promise<T>): Promise<T> {
    const url = new URL(database.url ?? '');
    url.searchParams.set('options', `-c keystrata.app_role=${value}`);
    const session = createPostgresDatabase(url.toString(), 1);
    try {
      return await fn(session.db);
    } finally {
      await session.close();
    }
  }

  async function privileges(table: string): Promise<Record<string, boolean>> {
    const { rows } = await sql<Record<string, boolean>>`
      select has_table_privilege(${role}, ${table}, 'SELECT') as select, has_table_privilege(${role}, ${table}, 'INSERT') as insert,
             has_table_privilege(${role}, ${table}, 'UPDATE') as update, has_table_privilege(${role}, ${table}, 'DELETE') as delete,
             has_table_privilege(${role}, ${table}, 'TRUNCATE') as truncate`.execute(database.db);
    return rows[0] ?? {};
  }

  it('when the setting names the app role, then the migration revokes UPDATE, DELETE and TRUNCATE on the audit log from it', async (context) => {
    if (database.url === undefined) context.skip();
    await sql.raw(`create role ${role} nologin`).execute(database.db);
    // everything the app role might have been granted by default on new tables
    await sql.raw(`alter default privileges in schema public grant all on tables to ${role}`).execute(database.db);
    await withAppRoleSetting(role, async (db) => {
      await auditMigration.down(db);
      await auditMigration.up(db);
    });
    await sql.raw(`alter default privileges in schema public revoke all on tables from ${role}`).execute(database.db);

    expect(await privileges('audit_events')).toEqual({ select: true, insert: true, update: false, delete: false, truncate: false });
    expect(await privileges('audit_checkpoints')).toEqual({ select: true, insert: true, update: false, delete: false, truncate: false });
    expect(await privileges('audit_chain_head')).toEqual({ select: true, insert: false, update: true, delete: false, truncate: false });
    expect(await privileges('audit_keys')).toEqual({ select: true, insert: true, update: true, delete: false, truncate: false });
  });

  it('when the setting names a role that does not exist, then the migration fails rather than skip the revoke', async (context) => {
    if (database.url === undefined) context.skip();
    await withAppRoleSetting('ks_no_such_role', async (db) => {
      await auditMigration.down(db);
      // Kysely's Migrator runs each migration in a transaction on PostgreSQL: the failure undoes it all
      await expect(db.transaction().execute((trx) => auditMigration.up(trx))).rejects.toThrow(/ks_no_such_role.*does not exist/);
    });
    // without the setting it goes through again
    await auditMigration.up(database.db);
    expect(Number((await sql<{ n: string }>`select count(*) as n from audit_chain_head`.execute(database.db)).rows[0]?.n)).toBe(1);
  });
});
