/**
 * The broker goes away while rotations happen, and comes back: every key update is delivered
 * afterwards, in order per device, none lost. Devices hold persistent sessions (as real
 * devices must, to get updates published while they are offline) and the broker keeps its
 * state across the restart.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startBroker, type TestBroker } from './broker.js';
import { connectDevice, type SimulatedDevice } from './device.js';
import { createEnv, enrol, mqttEnv, outboxRows, rotate, storedDeviceKey, storedFieldKey, waitFor, type Env } from './support.js';

const DEVICES = ['m-1', 'm-2', 'm-3', 'm-4', 'm-5', 'm-6'];

describe('broker stopped during rotations, then restarted', () => {
  let broker: TestBroker;
  let e: Env;
  const devices = new Map<string, SimulatedDevice>();

  beforeAll(async () => {
    broker = await startBroker();
    e = await createEnv({ env: mqttEnv(broker.url) });
    await enrol(e, DEVICES);
    for (const id of DEVICES) devices.set(id, await connectDevice(broker.url, id, await storedDeviceKey(e.t, id, 1)));
  });
  afterAll(async () => {
    for (const d of devices.values()) await d.close();
    await e?.close();
    await broker?.close();
  });

  it('when rotations happen before, during and after the outage, then every device gets every update once applied, in order, and can unwrap each with its previous key', async () => {
    const started = Date.now();
    // while the broker is up: a field key and a rotation per device, and the broker is stopped
    // right away, with some of them still in flight
    for (const id of DEVICES) {
      const r = await e.t.app.inject({ method: 'POST', url: `/v1/devices/${id}/fields`, headers: { authorization: `Bearer ${e.admin}` }, payload: { field: 'spo2' } });
      expect(r.statusCode).toBe(201);
      await rotate(e, id);
    }
    await broker.stop();

    // during the outage: two device rotations and a field rotation each; nothing can be published
    for (const id of DEVICES) {
      await rotate(e, id);
      await rotate(e, id, 'spo2');
      await rotate(e, id);
    }
    await new Promise((r) => setTimeout(r, 500));
    const waiting = (await outboxRows(e.t)).filter((r) => r.status === 'pending');
    expect(waiting.length).toBeGreaterThanOrEqual(DEVICES.length * 3);
    const depth = await e.t.app.inject({ method: 'GET', url: '/metrics' });
    expect(Number(/^keystrata_outbox_depth (\d+)$/m.exec(depth.body)?.[1])).toBe(waiting.length);

    await broker.start();
    await waitFor('the outbox drained', async () => (await outboxRows(e.t)).every((r) => r.status === 'published'), 30_000);

    for (const id of DEVICES) {
      const rows = await outboxRows(e.t, id);
      const device = devices.get(id) as SimulatedDevice;
      // every row arrives (re-deliveries after the outage are allowed, and ignored by id)
      await waitFor(`all updates on ${id}`, () => rows.every((r) => device.applied.includes(r.id)), 20_000);
      expect(device.errors).toEqual([]);
      // applied exactly the outbox, in the outbox's order
      expect(device.applied).toEqual(rows.map((r) => r.id));
      // arrival order never goes backwards (a duplicate may repeat the newest, never an older one after a newer)
      const ids = device.received.map((m) => m.id);
      for (let i = 1; i < ids.length; i++) expect(ids[i]).toBeGreaterThanOrEqual(ids[i - 1] as number);
      // and the keys are the stored ones: v2..v4 each unwrapped with the one before it
      for (const v of [2, 3, 4]) expect(device.deviceKeys.get(v)).toEqual(await storedDeviceKey(e.t, id, v));
      for (const v of [1, 2]) expect(device.fieldKeys.get(`spo2:v${v}`)).toEqual(await storedFieldKey(e.t, id, 'spo2', v));
      expect(device.received.filter((m) => m.kind === 'device').map((m) => m.wrappedBy.version)).toEqual(expect.arrayContaining([1, 2, 3]));
    }
    const duplicates = [...devices.values()].reduce((n, d) => n + d.received.length - d.applied.length, 0);
    console.info(`broker restart: ${(await outboxRows(e.t)).length} updates to ${DEVICES.length} devices, ${duplicates} re-deliveries, ${Date.now() - started} ms`);
  });

  it('when the broker freezes with updates in flight and then crashes, then those updates are taken back and sent again after it restarts', async () => {
    // a clean stop/start first, so the broker's saved state has every device session
    await broker.stop();
    await broker.start();
    await waitFor('devices and publisher reconnected', async () => {
      if (![...devices.values()].every((d) => d.client.connected)) return false;
      const m = await e.t.app.inject({ method: 'GET', url: '/metrics' });
      return /^keystrata_mqtt_connected 1$/m.test(m.body);
    });
    const before = (await outboxRows(e.t)).length;

    broker.freeze();
    for (const id of DEVICES) await rotate(e, id);
    // the publisher has sent them (no PUBREC will come): leased, still pending
    await waitFor('updates in flight', async () => {
      const fresh = (await outboxRows(e.t)).slice(before);
      return fresh.length === DEVICES.length && fresh.every((r) => r.status === 'pending' && r.lease_owner !== null);
    });
    await broker.kill();
    // taken back from the MQTT client at once: released, not waiting for the lease to expire
    await waitFor('in-flight rows released', async () => (await outboxRows(e.t)).slice(before).every((r) => r.lease_owner === null && r.status === 'pending'));

    await broker.start();
    await waitFor('the outbox drained', async () => (await outboxRows(e.t)).every((r) => r.status === 'published'), 30_000);
    for (const id of DEVICES) {
      const device = devices.get(id) as SimulatedDevice;
      const rows = await outboxRows(e.t, id);
      await waitFor(`all updates on ${id}`, () => rows.every((r) => device.applied.includes(r.id)), 20_000);
      expect(device.applied).toEqual(rows.map((r) => r.id));
      expect(device.deviceKeys.get(5)).toEqual(await storedDeviceKey(e.t, id, 5));
      expect(device.errors).toEqual([]);
    }
    const retried = (await outboxRows(e.t)).slice(before);
    expect(retried.every((r) => r.attempts >= 2)).toBe(true);
  });
});
