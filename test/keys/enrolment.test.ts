/**
 * Bulk enrolment writes its rows set-based (one INSERT per table) with device DEKs wrapped in
 * one batch: every stored blob must still be a fresh key bound by its AAD to its own row, and
 * an id already enrolled must leave nothing behind (no device, no version, no audit event).
 */
import crypto from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unwrapKey, wrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, groupBinding } from '../../src/crypto/binding.js';
import { UnwrapError } from '../../src/http/errors.js';
import { WRAPPED_KEY_BYTES, wrapNewKeys } from '../../src/keys/key-material.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, expectProblem } from '../support/flow.js';

describe('wrapNewKeys', () => {
  it('when keys are wrapped in a batch, then each blob is a fresh key that unwraps only under its own AAD', () => {
    const parent = crypto.randomBytes(32);
    const aad = (i: number) => `keystrata:v1|device|d-${i}|1|group|g|1`;
    const blobs = wrapNewKeys(parent, 50, aad);
    expect(blobs.length).toBe(50 * WRAPPED_KEY_BYTES);
    expect(WRAPPED_KEY_BYTES).toBe(wrapKey(parent, crypto.randomBytes(32), 'x').length);
    const keys = new Set<string>();
    const nonces = new Set<string>();
    for (let i = 0; i < 50; i += 1) {
      const blob = blobs.subarray(i * WRAPPED_KEY_BYTES, (i + 1) * WRAPPED_KEY_BYTES);
      const key = unwrapKey(parent, blob, aad(i));
      expect(key.length).toBe(32);
      expect(key.equals(Buffer.alloc(32))).toBe(false);
      keys.add(key.toString('hex'));
      nonces.add(blob.subarray(0, 12).toString('hex'));
      expect(() => unwrapKey(parent, blob, aad(i + 1))).toThrow(UnwrapError);
    }
    expect(keys.size).toBe(50);
    expect(nonces.size).toBe(50);
  });
});

describe('bulk enrolment', () => {
  let t: TestApp;
  let admin: string;

  beforeAll(async () => {
    t = await createTestApp();
    admin = await t.token('keystrata:admin', { sub: 'alice' });
    expect((await call(t.app, admin, 'POST', '/v1/groups', { id: 'meters', deviceType: 'meter', region: 'eu-west' })).status).toBe(201);
  });
  afterAll(async () => t?.close());

  async function groupKey(): Promise<Buffer> {
    const group = await t.database.db.selectFrom('group_versions').selectAll().where('group_id', '=', 'meters').where('version', '=', 1).executeTakeFirstOrThrow();
    return t.kek.unwrap(group.wrapped_key as string, groupBinding('meters', 1, t.kek.keyName));
  }

  it('when 3,000 devices are enrolled, then every row holds its own key bound to its row, and one audit event each', async () => {
    const ids = Array.from({ length: 3000 }, (_, i) => `meter-${String(i).padStart(5, '0')}`);
    const answer = await call(t.app, admin, 'POST', '/v1/groups/meters/devices/bulk', { ids });
    expect(answer.status).toBe(201);
    expect(answer.body).toEqual({ groupId: 'meters', enrolled: 3000, groupVersion: 1 });

    const rows = await t.database.db.selectFrom('device_versions').selectAll().where('device_id', 'like', 'meter-%').orderBy('device_id').execute();
    expect(rows.map((r) => r.device_id)).toEqual(ids);
    const parent = await groupKey();
    const keys = new Set<string>();
    for (const [i, row] of rows.entries()) {
      expect(row).toMatchObject({ version: 1, state: 'primary', parent_version: 1, state_until: null });
      const blob = row.wrapped_key as Buffer;
      keys.add(unwrapKey(parent, blob, deviceBinding(row.device_id, 1, 'meters', 1)).toString('hex'));
      // a blob moved to a neighbour's row does not unwrap there
      if (i < 20) expect(() => unwrapKey(parent, blob, deviceBinding(ids[(i + 1) % ids.length]!, 1, 'meters', 1))).toThrow(UnwrapError);
    }
    expect(keys.size).toBe(3000);
    const devices = await t.database.db.selectFrom('devices').select(['id', 'group_id']).where('id', 'like', 'meter-%').execute();
    expect(devices.length).toBe(3000);
    expect(devices.every((d) => d.group_id === 'meters')).toBe(true);
    const events = await t.database.db.selectFrom('audit_events').select(['key_id', 'details']).where('action', '=', 'device.enrol').execute();
    expect(new Set(events.map((e) => e.key_id))).toEqual(new Set(ids.map((id) => `device:${id}`)));
  });

  it('when a call names ids already enrolled, then 409 lists them and nothing of the call is written', async () => {
    const count = async () => {
      const [d, v, a] = await Promise.all([
        t.database.db.selectFrom('devices').select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow(),
        t.database.db.selectFrom('device_versions').select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow(),
        t.database.db.selectFrom('audit_events').select((eb) => eb.fn.countAll<string>().as('n')).executeTakeFirstOrThrow(),
      ]);
      return [Number(d.n), Number(v.n), Number(a.n)];
    };
    const before = await count();
    const ids = ['fresh-1', 'meter-00007', 'fresh-2', 'meter-01234'];
    const answer = await call(t.app, admin, 'POST', '/v1/groups/meters/devices/bulk', { ids });
    expectProblem(answer, 409, 'device_exists');
    expect(String(answer.body.detail)).toContain('2 device id(s) are already enrolled: meter-00007, meter-01234');
    expect(await count()).toEqual(before);
    expect(await t.database.db.selectFrom('devices').select('id').where('id', 'in', ['fresh-1', 'fresh-2']).execute()).toEqual([]);

    // the same ids alone afterwards: enrolled
    expect((await call(t.app, admin, 'POST', '/v1/groups/meters/devices/bulk', { ids: ['fresh-1', 'fresh-2'] })).status).toBe(201);
  });
});
