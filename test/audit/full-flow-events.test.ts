/**
 * Issue 3: a full flow produces exactly the expected audit events, in order, with the right
 * actors and outcomes, and the chain they form verifies.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/app.js';
import { call, newDeliveryKeyPair } from '../support/flow.js';

describe('the audit trail of a full flow', () => {
  let t: TestApp;
  beforeAll(async () => {
    t = await createTestApp();
  });
  afterAll(async () => t.close());

  it('when an admin and a backend walk the flow (with refusals), then exactly the expected events are chained, in order', async () => {
    const admin = await t.token('keystrata:admin', { sub: 'alice' });
    const before = (await t.audit.queryEvents({}, undefined, 1000)).items.length;

    expect((await call(t.app, admin, 'POST', '/v1/groups', { id: 'ward-7', deviceType: 'pump', region: 'eu' })).status).toBe(201);
    expect((await call(t.app, admin, 'POST', '/v1/groups/ward-7/devices/bulk', { ids: ['pump-1', 'pump-2'] })).status).toBe(201);
    expect((await call(t.app, admin, 'POST', '/v1/devices/pump-1/fields', { field: 'patient_id' })).status).toBe(201);
    const backend = await newDeliveryKeyPair();
    expect((await call(t.app, admin, 'PUT', '/v1/clients/ingest/delivery-key', { jwk: backend.publicJwk })).status).toBe(200);
    const reader = await t.token('keystrata:keys:read', { sub: 'ingest', groups: ['ward-7'] });
    expect((await call(t.app, reader, 'GET', '/v1/devices/pump-1/keys')).status).toBe(200);
    expect((await call(t.app, reader, 'GET', '/v1/devices/pump-1/fields/patient_id/keys?version=1')).status).toBe(200);
    expect((await call(t.app, reader, 'POST', '/v1/keys/fetch', { items: [{ deviceId: 'pump-2' }, { deviceId: 'nope' }] })).status).toBe(200);
    expect((await call(t.app, reader, 'POST', '/v1/groups', { id: 'x', deviceType: 'pump', region: 'eu' })).status).toBe(403);
    expect((await call(t.app, undefined, 'GET', '/v1/groups')).status).toBe(401);
    expect((await call(t.app, reader, 'GET', '/v1/devices/pump-1/keys?version=9')).status).toBe(404);

    const all = (await t.audit.queryEvents({}, undefined, 1000)).items.slice(before);
    const shape = all.map((e) => [e.actor, e.action, e.outcome, e.keyId ?? null]);
    expect(shape).toEqual([
      ['alice', 'group.create', 'success', 'group:ward-7'],
      ['alice', 'device.enrol', 'success', 'device:pump-1'],
      ['alice', 'device.enrol', 'success', 'device:pump-2'],
      ['alice', 'field_key.create', 'success', 'field:pump-1/patient_id'],
      ['alice', 'client.delivery_key.set', 'success', 'client:ingest'],
      ['ingest', 'key.deliver', 'success', 'device:pump-1'],
      ['ingest', 'key.deliver', 'success', 'field:pump-1/patient_id'],
      ['ingest', 'key.deliver', 'success', 'bulk'],
      ['ingest', 'authz.refused', 'denied', null],
      ['anonymous', 'auth.failed', 'denied', null],
      ['ingest', 'key.deliver', 'failure', 'device:pump-1'],
    ]);
    // what was delivered, to which delivery key, is on record (never the keys themselves)
    const deliveries = all.filter((e) => e.action === 'key.deliver' && e.outcome === 'success');
    expect(deliveries.map((e) => (e.details as { kids: string[] }).kids)).toEqual([['pump-1:v1'], ['pump-1/patient_id:v1'], ['pump-2:v1']]);
    const deliveryKid = (deliveries[0]!.details as { deliveryKid: string }).deliveryKid;
    expect(deliveryKid).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect((all.at(-1)!.details as { reason: string }).reason).toBe('not_found');
    expect((all[9]!.details as { reason: string }).reason).toBe('missing_token');
    // positions are consecutive and the chain verifies
    const positions = all.map((e) => e.position);
    expect(positions).toEqual(positions.map((_, i) => positions[0]! + i));
    expect(await t.audit.verify({})).toMatchObject({ ok: true });
    expect(JSON.stringify(all)).not.toMatch(/"k":|eyJ/);
  });
});
