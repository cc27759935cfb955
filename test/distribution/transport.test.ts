/**
 * The wire format, without a broker: the AAD (a known answer), sealing and opening with the
 * device-side code of the README, tampering with every header field, state-only messages,
 * the acknowledgement MAC and its strict parser; and the MQTT settings.
 */
import crypto from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';
import { ackTag, parseAck, parseAckTopic, sealKeyUpdate, transportBinding, verifyAckTag, type KeyUpdateHeader } from '../../src/distribution/transport.js';
import { ackPayload, openKeyUpdate, type KeyUpdate } from './device.js';

const header: KeyUpdateHeader = {
  id: 42,
  deviceId: 'pump-7',
  kind: 'field',
  field: 'patient_id',
  version: 3,
  state: 'pending',
  notBefore: new Date('2026-05-01T10:00:00.000Z'),
  wrappedBy: 5,
};

describe('key update messages', () => {
  it('when the AAD is built, then it is DESIGN §1\'s binding behind a transport tag, followed by state, not-before and message id', () => {
    expect(transportBinding(header)).toBe('keystrata:v1|transport|pump-7|field|pump-7/patient_id|3|device|pump-7|5|pending|2026-05-01T10:00:00.000Z|42');
    expect(transportBinding({ ...header, kind: 'device', field: undefined, notBefore: null })).toBe('keystrata:v1|transport|pump-7|device|pump-7|3|device|pump-7|5|pending|-|42');
  });

  it('when a key is sealed, then the device opens it with the named device key, and the message holds no plaintext', () => {
    const wrapping = crypto.randomBytes(32);
    const key = crypto.randomBytes(32);
    const msg = sealKeyUpdate(header, wrapping, key) as unknown as KeyUpdate;
    expect(msg).toMatchObject({ type: 'keystrata.key-update', v: 1, id: 42, keyId: 'pump-7/patient_id', kid: 'pump-7/patient_id:v3', notBefore: '2026-05-01T10:00:00.000Z', wrappedBy: { kind: 'device', version: 5 }, alg: 'A256GCM' });
    expect(Buffer.from(msg.wrapped, 'base64url')).toHaveLength(12 + 32 + 16);
    expect(openKeyUpdate(msg, 'pump-7', new Map([[5, wrapping]]))).toEqual(key);
    const text = JSON.stringify(msg);
    for (const enc of ['base64', 'base64url', 'hex'] as const) expect(text).not.toContain(key.toString(enc));
  });

  it('when any header field, the blob or the key is changed, then the device refuses the message', () => {
    const wrapping = crypto.randomBytes(32);
    const msg = sealKeyUpdate(header, wrapping, crypto.randomBytes(32)) as unknown as KeyUpdate;
    const keys = new Map([[5, wrapping], [4, crypto.randomBytes(32)]]);
    const blob = Buffer.from(msg.wrapped, 'base64url');
    const flipped = Buffer.from(blob);
    flipped[20] = (flipped[20] as number) ^ 1;
    const variants: KeyUpdate[] = [
      { ...msg, state: 'primary' },
      { ...msg, version: 4 },
      { ...msg, kid: 'pump-7/patient_id:v4', version: 4 },
      { ...msg, notBefore: null },
      { ...msg, notBefore: '2026-05-01T10:00:00.001Z' },
      { ...msg, id: 43 },
      { ...msg, wrappedBy: { kind: 'device', version: 4 } },
      { ...msg, field: 'spo2', keyId: 'pump-7/spo2' },
      { ...msg, kind: 'device', keyId: 'pump-7' },
      { ...msg, wrapped: flipped.toString('base64url') },
      { ...msg, wrapped: blob.subarray(0, blob.length - 1).toString('base64url') },
    ];
    for (const v of variants) expect(() => openKeyUpdate(v, 'pump-7', keys)).toThrow();
    // addressed to another device
    expect(() => openKeyUpdate({ ...msg, deviceId: 'pump-8' }, 'pump-8', keys)).toThrow();
    // the right message under another key
    expect(() => openKeyUpdate(msg, 'pump-7', new Map([[5, crypto.randomBytes(32)]]))).toThrow();
  });

  it('when a state change carries no key, then the ciphertext is empty and the header is still authenticated', () => {
    const wrapping = crypto.randomBytes(32);
    const msg = sealKeyUpdate({ ...header, kind: 'device', field: undefined, state: 'disabled', notBefore: null }, wrapping, null) as unknown as KeyUpdate;
    expect(Buffer.from(msg.wrapped, 'base64url')).toHaveLength(28);
    expect(openKeyUpdate(msg, 'pump-7', new Map([[5, wrapping]]))).toHaveLength(0);
    expect(() => openKeyUpdate({ ...msg, state: 'primary' }, 'pump-7', new Map([[5, wrapping]]))).toThrow();
  });
});

describe('acknowledgements', () => {
  const key = crypto.randomBytes(32);

  it('when a device computes the documented MAC, then the service computes the same tag and accepts it; another key, version or device is refused', () => {
    const payload = Buffer.from(ackPayload('pump-7', 'field', 'patient_id', 3, key));
    const parsed = parseAck('pump-7', payload);
    expect(parsed.ok).toBe(true);
    if (!parsed.ok) return;
    expect(parsed.ack.tag).toEqual(ackTag(key, { deviceId: 'pump-7', kind: 'field', field: 'patient_id', version: 3 }));
    expect(verifyAckTag(key, parsed.ack)).toBe(true);
    expect(verifyAckTag(crypto.randomBytes(32), parsed.ack)).toBe(false);
    expect(verifyAckTag(key, { ...parsed.ack, version: 4 })).toBe(false);
    expect(verifyAckTag(key, { ...parsed.ack, field: 'spo2' })).toBe(false);
    expect(verifyAckTag(key, { ...parsed.ack, deviceId: 'pump-8' })).toBe(false);
    // the MAC key is derived: the tag is not an HMAC under the raw key
    expect(parsed.ack.tag).not.toEqual(crypto.createHmac('sha256', key).update('keystrata:v1|ack|pump-7|field|pump-7/patient_id|3').digest());
  });

  it('when an acknowledgement is not exactly the documented shape, then it is refused with a reason', () => {
    const good = JSON.parse(ackPayload('pump-7', 'device', undefined, 2, key)) as Record<string, unknown>;
    const cases: Array<[unknown, string]> = [
      ['{', 'not_json'],
      [null, 'bad_shape'],
      [[good], 'bad_shape'],
      [{ ...good, field: 'x' }, 'bad_shape'],
      [{ ...good, version: 0 }, 'bad_shape'],
      [{ ...good, version: 1.5 }, 'bad_shape'],
      [{ ...good, version: 2 ** 31 }, 'bad_shape'],
      [{ ...good, deviceId: 'a/b' }, 'bad_shape'],
      [{ ...good, tag: `${good.tag as string}A` }, 'bad_shape'],
      [{ ...good, kind: 'field' }, 'bad_shape'],
      [{ ...good, kind: 'field', field: 'Bad' }, 'bad_shape'],
      [{ ...good, deviceId: 'pump-8' }, 'device_mismatch'],
    ];
    for (const [value, reason] of cases) {
      const payload = Buffer.from(typeof value === 'string' ? value : JSON.stringify(value));
      expect(parseAck('pump-7', payload), JSON.stringify(value)).toEqual({ ok: false, reason });
    }
    expect(parseAck('pump-7', Buffer.alloc(2000, 0x20))).toEqual({ ok: false, reason: 'too_large' });
    expect(parseAckTopic('keystrata/devices/pump-7/keys/ack')).toBe('pump-7');
    for (const topic of ['keystrata/devices/pump-7/keys', 'keystrata/devices//keys/ack', 'keystrata/devices/a b/keys/ack', 'x/keystrata/devices/p/keys/ack']) expect(parseAckTopic(topic)).toBeUndefined();
  });
});

describe('MQTT settings', () => {
  const problems = (env: Record<string, string>): string[] => {
    try {
      loadConfig({ KEYSTRATA_DATA_DIR: '/tmp', ...env });
      return [];
    } catch (error) {
      return (error as ConfigError).problems;
    }
  };

  it('when MQTT_URL is unset, then the publisher is off; when set, the defaults apply', () => {
    expect(loadConfig({ KEYSTRATA_DATA_DIR: '/tmp' }).mqtt).toBeUndefined();
    const config = loadConfig({ KEYSTRATA_DATA_DIR: '/tmp', MQTT_URL: 'mqtts://broker.example:8883', MQTT_USERNAME: 'ks', MQTT_PASSWORD: 's3cret' }).mqtt;
    expect(config).toMatchObject({ endpoint: 'mqtts://broker.example:8883', username: 'ks', sessionExpirySeconds: 0, ackShareGroup: 'keystrata', outbox: { batchSize: 100, leaseSeconds: 60 } });
    expect(config?.clientId).toMatch(/^keystrata-/);
  });

  it('when the settings are unsafe or inconsistent, then start-up fails naming each problem, never echoing the URL or password', () => {
    const found = problems({ MQTT_URL: 'mqtt://user:hunter2@broker.example', MQTT_CERT_FILE: '/c.pem', MQTT_PASSWORD: 'p', MQTT_SESSION_EXPIRY_SECONDS: '60' });
    expect(found.join('\n')).toMatch(/must not carry credentials/);
    expect(found.join('\n')).toMatch(/must use mqtts/);
    expect(found.join('\n')).toMatch(/MQTT_CERT_FILE and MQTT_KEY_FILE go together/);
    expect(found.join('\n')).toMatch(/MQTT_PASSWORD needs MQTT_USERNAME/);
    expect(found.join('\n')).toMatch(/stable MQTT_CLIENT_ID/);
    expect(found.join('\n')).not.toContain('hunter2');
    expect(problems({ MQTT_URL: 'http://broker.example' })).toEqual(['MQTT_URL must be an mqtt:// or mqtts:// URL']);
    expect(problems({ MQTT_URL: 'mqtt://broker.internal:1883', MQTT_ALLOW_PLAINTEXT: 'true' })).toEqual([]);
    expect(problems({ MQTT_URL: 'mqtt://127.0.0.1:1883' })).toEqual([]);
    expect(problems({ MQTT_CA_FILE: '/ca.pem' })).toEqual(['MQTT_* settings are given but MQTT_URL is not']);
  });
});
