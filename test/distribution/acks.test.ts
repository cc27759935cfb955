/**
 * Acknowledgements over the broker: only a well-formed acknowledgement, on the device's own
 * topic, of an existing version, MAC'd with that version's key, is recorded. Garbage, unknown
 * devices, wrong versions and forged tags change nothing and are audited as denied.
 */
import crypto from 'node:crypto';
import { sql } from 'kysely';
import { connect, type MqttClient } from 'mqtt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startBroker, type TestBroker } from './broker.js';
import { ackPayload } from './device.js';
import { ackRows, createEnv, enrol, mqttEnv, rotate, storedDeviceKey, storedFieldKey, waitFor, type Env } from './support.js';

describe('device acknowledgements', () => {
  let broker: TestBroker;
  let e: Env;
  let client: MqttClient;

  const denied = async () => (await e.t.audit.queryEvents({ action: 'key.ack', outcome: 'denied' }, undefined, 1000)).items;
  const publish = (deviceId: string, payload: string | Buffer) => client.publishAsync(`keystrata/devices/${deviceId}/keys/ack`, payload, { qos: 1 });

  beforeAll(async () => {
    broker = await startBroker();
    e = await createEnv({ env: mqttEnv(broker.url) });
    await enrol(e, ['a-1', 'a-2'], ['temp']);
    await rotate(e, 'a-1');
    client = connect(broker.url, { protocolVersion: 5, clientId: 'attacker', reconnectPeriod: 100 });
    await new Promise<void>((resolve) => client.once('connect', () => resolve()));
    // the publisher subscribes once it is connected
    await waitFor('publisher connected', async () => /^keystrata_mqtt_connected 1$/m.test((await e.t.app.inject({ method: 'GET', url: '/metrics' })).body));
    await new Promise((r) => setTimeout(r, 200));
  });
  afterAll(async () => {
    await client?.endAsync(true);
    await e?.close();
    await broker?.close();
  });

  it('when acknowledgements are malformed, misaddressed, for unknown devices or versions, or forged, then nothing is recorded, each is audited as denied, and a valid one still goes through', async () => {
    const v2 = await storedDeviceKey(e.t, 'a-1', 2);
    const v1 = await storedDeviceKey(e.t, 'a-1', 1);
    const other = await storedDeviceKey(e.t, 'a-2', 1);
    const good = JSON.parse(ackPayload('a-1', 'device', undefined, 2, v2)) as Record<string, unknown>;
    const before = JSON.stringify(await sql`select * from device_versions order by 1, 2`.execute(e.t.database.db).then((r) => r.rows));

    const bad: Array<[string, string | Buffer, string]> = [
      ['a-1', Buffer.from([0xff, 0x00, 0x13, 0x37]), 'not_json'],
      ['a-1', 'not json at all', 'not_json'],
      ['a-1', '[1,2,3]', 'bad_shape'],
      ['a-1', JSON.stringify({ ...good, extra: true }), 'bad_shape'],
      ['a-1', JSON.stringify({ ...good, version: '2' }), 'bad_shape'],
      ['a-1', JSON.stringify({ ...good, tag: undefined }), 'bad_shape'],
      ['a-1', JSON.stringify({ ...good, kind: 'group' }), 'bad_shape'],
      ['a-1', 'x'.repeat(5000), 'too_large'],
      // a valid acknowledgement of a-1, replayed on a-2's topic
      ['a-2', JSON.stringify(good), 'device_mismatch'],
      // unknown device (its own topic, a well-formed MAC under some key)
      ['ghost-9', ackPayload('ghost-9', 'device', undefined, 1, crypto.randomBytes(32)), 'unknown_device'],
      // wrong version: one that does not exist
      ['a-1', ackPayload('a-1', 'device', undefined, 7, v2), 'unknown_version'],
      ['a-1', ackPayload('a-1', 'field', 'nope', 1, v2), 'unknown_version'],
      // forged: random tag; the previous key's MAC for the new version; another device's key
      ['a-1', JSON.stringify({ ...good, tag: crypto.randomBytes(32).toString('base64url') }), 'bad_tag'],
      ['a-1', ackPayload('a-1', 'device', undefined, 2, v1), 'bad_tag'],
      ['a-1', ackPayload('a-1', 'device', undefined, 2, other), 'bad_tag'],
      // the MAC of v2 presented as an acknowledgement of v1
      ['a-1', JSON.stringify({ ...good, version: 1 }), 'bad_tag'],
    ];
    for (const [deviceId, payload] of bad) await publish(deviceId, payload);
    // acknowledgements are handled in arrival order: once this valid one is recorded, all the above were handled
    await publish('a-2', ackPayload('a-2', 'device', undefined, 1, other));
    await waitFor('the valid acknowledgement', async () => (await ackRows(e.t)).length === 1);

    expect((await ackRows(e.t)).map((a) => [a.device_id, a.kind, a.version])).toEqual([['a-2', 'device', 1]]);
    const refused = await denied();
    expect(refused.map((ev) => (ev.details as { reason: string }).reason).sort()).toEqual(bad.map(([, , reason]) => reason).sort());
    for (const ev of refused) expect(ev.actor).toBe('anonymous');
    // nothing secret in what was audited
    const text = JSON.stringify(refused);
    expect(text).not.toContain(good.tag as string);
    expect(text).not.toContain('x'.repeat(100));
    // and nothing else changed
    expect(JSON.stringify(await sql`select * from device_versions order by 1, 2`.execute(e.t.database.db).then((r) => r.rows))).toBe(before);
    const view = await e.t.app.inject({ method: 'GET', url: '/v1/devices/a-1/distribution', headers: { authorization: `Bearer ${e.admin}` } });
    expect(JSON.parse(view.body).acknowledged).toEqual([]);
  });

  it('when a valid acknowledgement arrives twice (a re-delivery), then it is recorded once, and a field key acknowledgement is recorded for that field', async () => {
    const v2 = await storedDeviceKey(e.t, 'a-1', 2);
    await publish('a-1', ackPayload('a-1', 'device', undefined, 2, v2));
    await publish('a-1', ackPayload('a-1', 'device', undefined, 2, v2));
    await publish('a-1', ackPayload('a-1', 'field', 'temp', 1, await storedFieldKey(e.t, 'a-1', 'temp', 1)));
    await waitFor('field ack', async () => (await ackRows(e.t)).some((a) => a.device_id === 'a-1' && a.kind === 'field'));
    expect((await ackRows(e.t)).filter((a) => a.device_id === 'a-1').map((a) => [a.kind, a.field, a.version])).toEqual([
      ['device', '', 2],
      ['field', 'temp', 1],
    ]);
    const accepted = (await e.t.audit.queryEvents({ action: 'key.ack', outcome: 'success' }, undefined, 100)).items;
    expect(accepted.map((ev) => ev.keyId).sort()).toEqual(['device:a-1', 'device:a-2', 'field:a-1/temp']);
    const metrics = (await e.t.app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(metrics).toMatch(/^keystrata_key_acks_total\{outcome="duplicate"\} 1$/m);
    expect(metrics).toMatch(/^keystrata_key_acks_total\{outcome="bad_tag"\} 4$/m);
  });
});
