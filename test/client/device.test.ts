/** The device-side reference: which key it encrypts with, what it refuses, what a backend gets back. */
import crypto from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MessageFormatError, createDeviceEncryptor, decryptField, deviceFieldKeyFromJwk, parseEnvelope } from '../../src/client/index.js';

const T = Date.UTC(2026, 0, 1);
const k = () => crypto.randomBytes(32);

function open(envelope: unknown, key: Buffer, deviceId: string, field: string, timestamp = T): unknown {
  return JSON.parse(decryptField({ key, deviceId, field, timestamp, envelope: envelope as string }).toString('utf8'));
}

describe('device encryptor', () => {
  it('when a message is encrypted, then exactly the fields it holds keys for become envelopes and the rest stays as is', () => {
    const pid = k();
    const rec = k();
    const dev = createDeviceEncryptor({
      deviceId: 'dev-1',
      keys: [
        { field: 'patient_id', version: 3, key: pid },
        { field: 'medical_record', version: 1, key: rec },
      ],
    });
    const message = { timestamp: T, temperature: 36.6, patient_id: 'P-1', medical_record: { dx: ['I10'], n: null, ok: true }, location: { lat: 1 } };
    const sent = dev.encryptMessage(message);
    expect(Object.keys(sent)).toEqual(Object.keys(message));
    expect(sent).toMatchObject({ timestamp: T, temperature: 36.6, location: { lat: 1 } });
    expect(parseEnvelope(sent.patient_id as string).kid).toBe('dev-1/patient_id:v3');
    expect(open(sent.patient_id, pid, 'dev-1', 'patient_id')).toBe('P-1');
    expect(open(sent.medical_record, rec, 'dev-1', 'medical_record')).toEqual({ dx: ['I10'], n: null, ok: true });
    // only some fields, on request
    const partial = dev.encryptMessage(message, ['medical_record']);
    expect(partial.patient_id).toBe('P-1');
    expect(partial.medical_record).toMatch(/^ENC:v1:dev-1\/medical_record:v1:/);
  });

  it('when it holds several versions, then it encrypts with the primary (else the newest grace one), and a newer primary replaces it', () => {
    const v1 = k();
    const v2 = k();
    const v3 = k();
    const dev = createDeviceEncryptor({
      deviceId: 'dev-1',
      keys: [
        { field: 'patient_id', version: 2, key: v2, state: 'primary' },
        { field: 'patient_id', version: 1, key: v1, state: 'grace' },
      ],
    });
    expect(dev.versions()).toEqual({ patient_id: 2 });
    dev.setKey({ field: 'patient_id', version: 3, key: v3, state: 'primary' });
    expect(dev.versions()).toEqual({ patient_id: 3 });
    const sent = dev.encryptMessage({ timestamp: T, patient_id: 'x' });
    expect(open(sent.patient_id, v3, 'dev-1', 'patient_id')).toBe('x');
  });

  it('when handed a pending, decrypt_only or disabled key, then it refuses to hold it', () => {
    const dev = createDeviceEncryptor({ deviceId: 'dev-1', keys: [] });
    for (const state of ['pending', 'decrypt_only', 'disabled']) {
      expect(() => dev.setKey({ field: 'patient_id', version: 2, key: k(), state })).toThrow(/may not encrypt/);
    }
  });

  it('when the message breaks the rules, then the device refuses to send it', () => {
    const dev = createDeviceEncryptor({ deviceId: 'dev-1', keys: [{ field: 'patient_id', version: 1, key: k() }] });
    expect(() => dev.encryptMessage({ timestamp: T, note: 'ENC:looks like an envelope', patient_id: 'x' })).toThrow(/would read as an envelope/);
    expect(() => dev.encryptMessage({ timestamp: T, patient_id: 'x' }, ['timestamp'])).toThrow(MessageFormatError);
    expect(() => dev.encryptMessage({ timestamp: T, patient_id: 'x' }, ['heart_rate'])).toThrow(/no field/);
    expect(() => dev.encryptMessage({ timestamp: T, heart_rate: 1 }, ['heart_rate'])).toThrow(/holds no key/);
    expect(() => dev.encryptMessage({ timestamp: String(T), patient_id: 'x' })).toThrow(/timestamp/);
    expect(() => dev.encryptMessage({ timestamp: 1_767_225_600, patient_id: 'x' })).toThrow(/before 2000/);
    expect(() => createDeviceEncryptor({ deviceId: 'bad/id', keys: [] })).toThrow(MessageFormatError);
  });

  it('when the fleet counts seconds, then the AAD carries the same instant in milliseconds', () => {
    const key = k();
    const dev = createDeviceEncryptor({ deviceId: 'dev-1', keys: [{ field: 'patient_id', version: 1, key }], timestampUnit: 's' });
    const sent = dev.encryptMessage({ timestamp: T / 1000, patient_id: 'x' });
    expect(open(sent.patient_id, key, 'dev-1', 'patient_id', T)).toBe('x');
  });

  it('when a delivered JWK is turned into a device key, then kid, version and state are read and a device DEK is refused', () => {
    const key = k();
    const held = deviceFieldKeyFromJwk({ kid: 'eu:icu-7/patient_id:v12', k: key.toString('base64url'), state: 'primary' });
    expect(held).toMatchObject({ deviceId: 'eu:icu-7', field: 'patient_id', version: 12, state: 'primary' });
    expect(() => deviceFieldKeyFromJwk({ kid: 'eu:icu-7:v12', k: key.toString('base64url') })).toThrow(/not a field key/);
    expect(() => deviceFieldKeyFromJwk({ kid: 'd/f:v1', k: 'AAAA' })).toThrow(/256-bit/);
  });
});
