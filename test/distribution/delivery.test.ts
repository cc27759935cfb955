/**
 * End to end against a real Mosquitto: a device subscribes, receives its new keys after
 * rotations, unwraps them with the key it already holds, acknowledges, and the service shows
 * the acknowledgement.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call } from '../support/flow.js';
import { startBroker, type TestBroker } from './broker.js';
import { connectDevice, type SimulatedDevice } from './device.js';
import { ackRows, createEnv, enrol, mqttEnv, outboxRows, rotate, storedDeviceKey, storedFieldKey, waitFor, type Env } from './support.js';

describe('a device receives its rotated keys over MQTT', () => {
  let broker: TestBroker;
  let e: Env;
  let device: SimulatedDevice;

  beforeAll(async () => {
    broker = await startBroker();
    e = await createEnv({ env: mqttEnv(broker.url) });
    await enrol(e, ['pump-1']);
    // the enrolment key (v1) is provisioned with the device, out of band
    device = await connectDevice(broker.url, 'pump-1', await storedDeviceKey(e.t, 'pump-1', 1));
  });
  afterAll(async () => {
    await device?.close();
    await e?.close();
    await broker?.close();
  });

  it('when a field key is created, then the device receives it wrapped under its enrolment key and can unwrap it', async () => {
    const created = await call(e.t.app, e.admin, 'POST', '/v1/devices/pump-1/fields', { field: 'patient_id' });
    expect(created.status).toBe(201);
    await waitFor('field key v1 on the device', () => device.fieldKeys.get('patient_id:v1'));
    const msg = device.received.find((m) => m.kind === 'field');
    expect(msg).toMatchObject({ deviceId: 'pump-1', kind: 'field', field: 'patient_id', keyId: 'pump-1/patient_id', kid: 'pump-1/patient_id:v1', version: 1, state: 'primary', wrappedBy: { kind: 'device', version: 1 } });
    expect(device.fieldKeys.get('patient_id:v1')).toEqual(await storedFieldKey(e.t, 'pump-1', 'patient_id', 1));
    expect(device.errors).toEqual([]);
  });

  it('when the device is rotated, then it receives v2 wrapped under v1, unwraps it with its old key, acknowledges, and the service shows the acknowledgement', async () => {
    await rotate(e, 'pump-1');
    const v2 = await waitFor('device DEK v2 on the device', () => device.deviceKeys.get(2));
    expect(v2).toEqual(await storedDeviceKey(e.t, 'pump-1', 2));
    const msg = device.received.find((m) => m.kind === 'device' && m.version === 2);
    expect(msg).toMatchObject({ kid: 'pump-1:v2', state: 'primary', wrappedBy: { kind: 'device', version: 1 }, notBefore: null });
    // the message carries no plaintext: the key bytes appear nowhere in it
    const raw = JSON.stringify(msg);
    for (const encoding of ['base64', 'base64url', 'hex'] as const) expect(raw).not.toContain(v2.toString(encoding));

    // the outbox row is marked published only after the broker's PUBCOMP
    const row = (await outboxRows(e.t, 'pump-1')).find((r) => r.kind === 'device' && r.version === 2);
    expect(row).toMatchObject({ status: 'published', wrapped_by: 1, with_key: true, attempts: 1, lease_owner: null });

    let view = await call(e.t.app, e.admin, 'GET', '/v1/devices/pump-1/distribution');
    expect(view.status).toBe(200);
    expect(view.body.awaitingAcknowledgement).toEqual(expect.arrayContaining([expect.objectContaining({ kind: 'device', version: 2, state: 'primary' })]));

    await device.ack('device', undefined, 2);
    await waitFor('the acknowledgement recorded', async () => (await ackRows(e.t)).some((a) => a.kind === 'device' && a.version === 2));
    view = await call(e.t.app, e.admin, 'GET', '/v1/devices/pump-1/distribution');
    expect(view.body.acknowledged).toEqual([expect.objectContaining({ kind: 'device', version: 2, acknowledgedAt: expect.any(String) })]);
    expect((view.body.awaitingAcknowledgement as Array<{ kind: string }>).filter((a) => a.kind === 'device')).toEqual([]);
    expect(view.body.outbox).toEqual(expect.arrayContaining([expect.objectContaining({ kind: 'device', version: 2, status: 'published', withKey: true, wrappedBy: 1 })]));

    const acks = (await e.t.audit.queryEvents({ action: 'key.ack' }, undefined, 100)).items;
    expect(acks).toEqual([expect.objectContaining({ actor: 'device:pump-1', outcome: 'success', keyId: 'device:pump-1' })]);
    const sent = (await e.t.audit.queryEvents({ action: 'key.distribute' }, undefined, 100)).items;
    expect(sent.length).toBeGreaterThanOrEqual(2);
    // nothing secret in the audit trail
    expect(JSON.stringify(sent)).not.toContain(msg?.wrapped as string);
  });

  it('when the field key is rotated after that, then the new field key comes wrapped under the device\'s new DEK v2', async () => {
    await rotate(e, 'pump-1', 'patient_id');
    await waitFor('field key v2 on the device', () => device.fieldKeys.get('patient_id:v2'));
    const msg = device.received.find((m) => m.kind === 'field' && m.version === 2);
    expect(msg?.wrappedBy.version).toBe(2);
    expect(device.fieldKeys.get('patient_id:v2')).toEqual(await storedFieldKey(e.t, 'pump-1', 'patient_id', 2));
    await device.ack('field', 'patient_id', 2);
    await waitFor('field ack', async () => (await ackRows(e.t)).some((a) => a.kind === 'field' && a.version === 2));
  });

  it('when a rotation is rolled back by disabling the new primary, then the device is told, without any key, to use its previous version again', async () => {
    await rotate(e, 'pump-1');
    await waitFor('device DEK v3', () => device.deviceKeys.get(3));
    const disabled = await call(e.t.app, e.admin, 'POST', '/v1/devices/pump-1/versions/3/disable', {});
    expect(disabled.status, disabled.raw).toBe(200);
    await waitFor('state messages', () => device.states.get('device/:v3') === 'disabled' && device.states.get('device/:v2') === 'primary');
    const stateOnly = device.received.filter((m) => m.kind === 'device' && (m.state === 'disabled' || (m.version === 2 && m.state === 'primary' && m.id > (device.received.find((x) => x.version === 3)?.id ?? 0))));
    expect(stateOnly).toHaveLength(2);
    // an empty ciphertext: nonce ‖ tag only, and never sealed under the revoked version
    for (const m of stateOnly) {
      expect(Buffer.from(m.wrapped, 'base64url')).toHaveLength(28);
      expect(m.wrappedBy.version).not.toBe(3);
    }
    expect(device.errors).toEqual([]);
  });

  it('when /metrics is scraped, then the outbox depth and the publish counters are there', async () => {
    await waitFor('empty outbox', async () => (await outboxRows(e.t)).every((r) => r.status === 'published'));
    const metrics = await e.t.app.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toMatch(/^keystrata_outbox_depth 0$/m);
    expect(metrics.body).toMatch(/^keystrata_mqtt_published_total [1-9]\d*$/m);
    expect(metrics.body).toMatch(/^keystrata_mqtt_publish_duration_seconds_count [1-9]\d*$/m);
    expect(metrics.body).toMatch(/^keystrata_mqtt_connected 1$/m);
    expect(metrics.body).toMatch(/^keystrata_key_acks_total\{outcome="accepted"\} 2$/m);
  });
});
