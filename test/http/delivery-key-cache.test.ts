/**
 * DELIVERY_KEY_CACHE_SECONDS (issue 7): a client's imported delivery key is reused for a short
 * time instead of being read on every fetch. A change made through this process applies to the
 * next fetch at once; a change another replica made (here: the row written directly, as its PUT
 * would) applies within the cache time, and at once when the cache is off.
 */
import { decodeProtectedHeader } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseDeliveryJwk } from '../../src/crypto/jwe.js';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, decryptKeySet, newDeliveryKeyPair } from '../support/flow.js';

async function setup(cacheSeconds: string) {
  const t = await createTestApp({ env: { DELIVERY_KEY_CACHE_SECONDS: cacheSeconds } });
  const admin = await t.token('keystrata:admin', { sub: 'svc' });
  expect((await call(t.app, admin, 'POST', '/v1/groups', { id: 'g', deviceType: 'pump', region: 'eu' })).status).toBe(201);
  expect((await call(t.app, admin, 'POST', '/v1/groups/g/devices/bulk', { ids: ['d1'] })).status).toBe(201);
  /** the kid the next fetch's JWE is addressed to (and proof it decrypts with that key's private half) */
  const fetchKid = async (pairs: Map<string, Awaited<ReturnType<typeof newDeliveryKeyPair>>>) => {
    const answer = await call(t.app, admin, 'GET', '/v1/devices/d1/keys');
    expect(answer.status, answer.raw).toBe(200);
    const jwe = answer.body.jwe as string;
    const kid = decodeProtectedHeader(jwe).kid as string;
    expect(await decryptKeySet(jwe, pairs.get(kid)!.privateKey)).toHaveLength(1);
    return kid;
  };
  /** register through this process's API */
  const putKey = async (pairs: Map<string, Awaited<ReturnType<typeof newDeliveryKeyPair>>>) => {
    const pair = await newDeliveryKeyPair();
    const { kid } = await parseDeliveryJwk(pair.publicJwk);
    pairs.set(kid, pair);
    expect((await call(t.app, admin, 'PUT', '/v1/clients/svc/delivery-key', { jwk: pair.publicJwk })).status).toBe(200);
    return kid;
  };
  /** what another replica's PUT leaves in the database */
  const writeRowElsewhere = async (pairs: Map<string, Awaited<ReturnType<typeof newDeliveryKeyPair>>>) => {
    const pair = await newDeliveryKeyPair();
    const { jwk, kid } = await parseDeliveryJwk(pair.publicJwk);
    pairs.set(kid, pair);
    await t.database.db.updateTable('clients').set({ delivery_jwk: JSON.stringify(jwk), delivery_kid: kid }).where('id', '=', 'svc').execute();
    return kid;
  };
  return { t, fetchKid, putKey, writeRowElsewhere };
}

describe('delivery key cache (DELIVERY_KEY_CACHE_SECONDS=3)', () => {
  let s: Awaited<ReturnType<typeof setup>>;
  const pairs = new Map<string, Awaited<ReturnType<typeof newDeliveryKeyPair>>>();
  beforeAll(async () => {
    s = await setup('3');
  });
  afterAll(async () => s.t.close());

  it('when the key is replaced through this process, then the very next fetch is encrypted to the new key', async () => {
    const first = await s.putKey(pairs);
    expect(await s.fetchKid(pairs)).toBe(first);
    const second = await s.putKey(pairs);
    expect(await s.fetchKid(pairs)).toBe(second);
  });

  it('when another replica replaced the key, then fetches use the old one at most for the cache time, then the new one', async () => {
    const current = await s.putKey(pairs);
    expect(await s.fetchKid(pairs)).toBe(current);
    const replaced = await s.writeRowElsewhere(pairs);
    expect(await s.fetchKid(pairs)).toBe(current); // within the 3 s: the cached import
    await new Promise((resolve) => setTimeout(resolve, 3100));
    expect(await s.fetchKid(pairs)).toBe(replaced);
  });
});

describe('delivery key cache off (DELIVERY_KEY_CACHE_SECONDS=0)', () => {
  let s: Awaited<ReturnType<typeof setup>>;
  const pairs = new Map<string, Awaited<ReturnType<typeof newDeliveryKeyPair>>>();
  beforeAll(async () => {
    s = await setup('0');
  });
  afterAll(async () => s.t.close());

  it('when another replica replaced the key, then the next fetch already uses the new one', async () => {
    const current = await s.putKey(pairs);
    expect(await s.fetchKid(pairs)).toBe(current);
    const replaced = await s.writeRowElsewhere(pairs);
    expect(await s.fetchKid(pairs)).toBe(replaced);
  });
});
