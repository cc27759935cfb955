/**
 * A simulated device, written only from the documented wire format (the README section and
 * src/distribution/transport.ts's comment), with Node's crypto and mqtt: nothing from src/.
 * It is what the README's decoding example does, plus bookkeeping for the tests.
 */
import crypto from 'node:crypto';
import { connect, type MqttClient } from 'mqtt';

export interface KeyUpdate {
  type: string;
  v: number;
  id: number;
  deviceId: string;
  kind: 'device' | 'field';
  field?: string;
  keyId: string;
  kid: string;
  version: number;
  state: string;
  notBefore: string | null;
  wrappedBy: { kind: 'device'; version: number };
  alg: string;
  wrapped: string;
}

/** README example: open a key update with the device DEK version it names. Returns the 32-byte key, or an empty buffer for a state change. */
export function openKeyUpdate(msg: KeyUpdate, myDeviceId: string, deviceKeys: Map<number, Buffer>): Buffer {
  if (msg.type !== 'keystrata.key-update' || msg.v !== 1 || msg.alg !== 'A256GCM') throw new Error('not a keystrata v1 key update');
  if (msg.deviceId !== myDeviceId) throw new Error('addressed to another device');
  const keyId = msg.kind === 'device' ? myDeviceId : `${myDeviceId}/${msg.field}`;
  if (msg.keyId !== keyId || msg.wrappedBy.kind !== 'device') throw new Error('unexpected key id');
  const wrappingKey = deviceKeys.get(msg.wrappedBy.version);
  if (!wrappingKey) throw new Error(`device key v${msg.wrappedBy.version} not held`);
  const aad = [
    'keystrata:v1', 'transport', myDeviceId, msg.kind, keyId, msg.version,
    'device', myDeviceId, msg.wrappedBy.version, msg.state, msg.notBefore ?? '-', msg.id,
  ].join('|');
  const blob = Buffer.from(msg.wrapped, 'base64url'); // nonce(12) ‖ ciphertext ‖ tag(16)
  const decipher = crypto.createDecipheriv('aes-256-gcm', wrappingKey, blob.subarray(0, 12));
  decipher.setAAD(Buffer.from(aad, 'utf8'));
  decipher.setAuthTag(blob.subarray(blob.length - 16));
  return Buffer.concat([decipher.update(blob.subarray(12, blob.length - 16)), decipher.final()]); // throws if tampered
}

/** README example: the acknowledgement of a version, MAC'd with a key derived from that version's key. */
export function ackPayload(deviceId: string, kind: 'device' | 'field', field: string | undefined, version: number, key: Buffer): string {
  const keyId = kind === 'device' ? deviceId : `${deviceId}/${field}`;
  const ackKey = Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'keystrata:v1|ack-key', 32));
  const tag = crypto.createHmac('sha256', ackKey).update(`keystrata:v1|ack|${deviceId}|${kind}|${keyId}|${version}`).digest('base64url');
  return JSON.stringify({ deviceId, kind, ...(kind === 'field' ? { field } : {}), version, tag });
}

export interface SimulatedDevice {
  id: string;
  /** every message received, in arrival order (duplicates included) */
  received: KeyUpdate[];
  /** device DEK versions held */
  deviceKeys: Map<number, Buffer>;
  /** field keys held, by `<field>:v<N>` */
  fieldKeys: Map<string, Buffer>;
  /** states last announced, by `<kind>/<field>:v<N>` */
  states: Map<string, string>;
  /** message ids applied (each once), in order */
  applied: number[];
  errors: string[];
  client: MqttClient;
  ack(kind: 'device' | 'field', field: string | undefined, version: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * Connect with a persistent session (clean start off, session kept an hour) and subscribe with
 * QoS 2, so updates published while the device is offline wait for it on the broker. Applies
 * each message id once (ids increase per device), optionally acknowledging every key received.
 */
export async function connectDevice(url: string, id: string, enrolmentKey: Buffer, options: { autoAck?: boolean } = {}): Promise<SimulatedDevice> {
  const client = connect(url, {
    protocolVersion: 5,
    clientId: `device-${id}`,
    clean: false,
    properties: { sessionExpiryInterval: 3600 },
    reconnectPeriod: 100,
    connectTimeout: 5000,
  });
  const device: SimulatedDevice = {
    id,
    received: [],
    deviceKeys: new Map([[1, enrolmentKey]]),
    fieldKeys: new Map(),
    states: new Map(),
    applied: [],
    errors: [],
    client,
    async ack(kind, field, version) {
      const key = kind === 'device' ? device.deviceKeys.get(version) : device.fieldKeys.get(`${field}:v${version}`);
      if (!key) throw new Error(`device ${id} does not hold ${kind} ${field ?? ''} v${version}`);
      await client.publishAsync(`keystrata/devices/${id}/keys/ack`, ackPayload(id, kind, field, version, key), { qos: 1 });
    },
    async close() {
      await client.endAsync(true);
    },
  };
  client.on('message', (_topic, payload) => {
    let msg: KeyUpdate;
    try {
      msg = JSON.parse(payload.toString('utf8')) as KeyUpdate;
    } catch {
      device.errors.push('not json');
      return;
    }
    device.received.push(msg);
    if (device.applied.length > 0 && msg.id <= (device.applied.at(-1) as number)) return; // already applied (a re-delivery)
    let key: Buffer;
    try {
      key = openKeyUpdate(msg, id, device.deviceKeys);
    } catch (error) {
      device.errors.push(`message ${msg.id}: ${(error as Error).message}`);
      return;
    }
    device.applied.push(msg.id);
    device.states.set(`${msg.kind}/${msg.field ?? ''}:v${msg.version}`, msg.state);
    if (key.length === 32) {
      if (msg.kind === 'device') device.deviceKeys.set(msg.version, key);
      else device.fieldKeys.set(`${msg.field}:v${msg.version}`, key);
      if (options.autoAck) void device.ack(msg.kind, msg.field, msg.version).catch((e: Error) => device.errors.push(`ack: ${e.message}`));
    }
  });
  await new Promise<void>((resolve, reject) => {
    client.once('connect', () => resolve());
    client.once('error', reject);
  });
  await client.subscribeAsync(`keystrata/devices/${id}/keys`, { qos: 2 });
  return device;
}
