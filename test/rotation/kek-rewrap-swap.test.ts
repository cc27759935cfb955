/**
 * The rewrap's swap statement (rotation.repository.ts replaceGroupBlobs): one set-based update
 * over arrays that swaps a blob only where the row still holds the blob that was rewrapped, and
 * answers per item, in order, whether it did. The array literal it sends is built by hand
 * (textArray), so it is checked against PostgreSQL's own parsing with hostile strings.
 */
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { replaceGroupBlobs, textArray } from '../../src/rotation/rotation.repository.js';
import { rotationDb } from '../../src/rotation/rotation.tables.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';

describe('KEK rewrap swap statement', () => {
  let database: TestDatabase;
  beforeAll(async () => {
    database = await createTestDatabase();
    const now = new Date();
    const ids = ['g-a', 'g-b', 'g-c', 'g-"quoted"\\slash,{brace} NULL'];
    await database.db.insertInto('key_groups').values(ids.map((id) => ({ id, device_type: 'sensor', region: 'eu', created_at: now }))).execute();
    await database.db
      .insertInto('group_versions')
      .values(ids.map((id) => ({ group_id: id, version: 1, state: 'primary' as const, wrapped_key: `vault:v1:${id}`, kek_version: 1, created_at: now, state_changed_at: now, state_until: null })))
      .execute();
  });
  afterAll(async () => database.close());

  it('when texts with quotes, backslashes, commas, braces, NULL, spaces, unicode and the empty string are sent as an array literal, then PostgreSQL reads them back unchanged', async () => {
    const values = ['plain', 'with "quotes"', 'back\\slash', 'a,b', '{braces}', 'NULL', 'null', ' spaced ', '', 'ünïcødé ✓', '\\"', 'tab\tnew\nline'];
    const { rows } = await sql<{ v: string[] }>`select ${textArray(values)}::text[] as v`.execute(database.db);
    expect(rows[0]!.v).toEqual(values);
  });

  it('when some rows changed since they were read, then only the unchanged ones are swapped and the answer says which, in order', async () => {
    const db = rotationDb(database.db);
    const updated = await replaceGroupBlobs(db, [
      { groupId: 'g-a', version: 1, oldBlob: 'vault:v1:g-a', newBlob: 'vault:v2:new-a', kekVersion: 2 },
      { groupId: 'g-b', version: 1, oldBlob: 'vault:v1:something-else', newBlob: 'vault:v2:new-b', kekVersion: 2 }, // changed meanwhile
      { groupId: 'g-missing', version: 1, oldBlob: 'vault:v1:g-missing', newBlob: 'vault:v2:x', kekVersion: 2 }, // destroyed
      { groupId: 'g-"quoted"\\slash,{brace} NULL', version: 1, oldBlob: 'vault:v1:g-"quoted"\\slash,{brace} NULL', newBlob: 'vault:v3:new-q', kekVersion: 3 },
      { groupId: 'g-c', version: 2, oldBlob: 'vault:v1:g-c', newBlob: 'vault:v2:new-c', kekVersion: 2 }, // no such version
    ]);
    expect(updated).toEqual([true, false, false, true, false]);
    const rows = await database.db.selectFrom('group_versions').select(['group_id', 'wrapped_key', 'kek_version']).orderBy('group_id').execute();
    expect(rows).toEqual([
      { group_id: 'g-"quoted"\\slash,{brace} NULL', wrapped_key: 'vault:v3:new-q', kek_version: 3 },
      { group_id: 'g-a', wrapped_key: 'vault:v2:new-a', kek_version: 2 },
      { group_id: 'g-b', wrapped_key: 'vault:v1:g-b', kek_version: 1 },
      { group_id: 'g-c', wrapped_key: 'vault:v1:g-c', kek_version: 1 },
    ]);
    expect(await replaceGroupBlobs(db, [])).toEqual([]);
  });
});
