/**
 * The field envelope v1: known answers, binding (device, field, message, kid), truncation and
 * re-encoding, property tests.
 *
 * The known answers in test/vectors/field-envelope-v1.json are cross-checked independently
 * with Python's `cryptography` (AESGCM) by test/vectors/check_field_envelope_v1.py, which
 * shares no code with src/: it re-encrypts every valid vector and refuses every invalid one
 * with the same error code. It passed when the vectors were committed; the last test below
 * runs it again whenever python3 and `cryptography` are installed (and is skipped otherwise).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  EnvelopeAuthenticationError,
  EnvelopeContextError,
  EnvelopeEncodingError,
  EnvelopeError,
  EnvelopeFormatError,
  EnvelopeTruncatedError,
  MAX_PLAINTEXT_BYTES,
  decryptField,
  encryptField,
  envelopeAad,
  fieldKid,
  parseEnvelope,
  parseFieldKid,
} from '../../src/envelope/field-envelope.js';
import * as publicEnvelope from '../../src/envelope/index.js';
import { VECTORS_PATH, buildVectors, type FieldEnvelopeVectors } from '../vectors/field-envelope-v1.generate.js';

const committed = JSON.parse(fs.readFileSync(VECTORS_PATH, 'utf8')) as FieldEnvelopeVectors;
const key = () => crypto.randomBytes(32);
const T = 1767225600000;

function sample(overrides: Partial<{ deviceId: string; field: string; version: number; timestamp: number; plaintext: string }> = {}) {
  const deviceId = overrides.deviceId ?? 'monitor-00042';
  const field = overrides.field ?? 'patient_id';
  const k = key();
  const kid = fieldKid(deviceId, field, overrides.version ?? 1);
  const envelope = encryptField({ key: k, kid, deviceId, field, timestamp: overrides.timestamp ?? T, plaintext: overrides.plaintext ?? '"P-12345"' });
  return { key: k, kid, deviceId, field, timestamp: overrides.timestamp ?? T, envelope };
}

function payloadOf(envelope: string): string {
  return envelope.slice(envelope.lastIndexOf(':') + 1);
}

describe('field envelope v1: known answers', () => {
  it('when the vectors are rebuilt with the fixed-nonce hook, then they equal the committed file byte for byte', () => {
    expect(buildVectors()).toEqual(committed);
  });

  it('when every committed valid vector is decrypted, then its plaintext comes out and its parts are as listed', () => {
    expect(committed.valid.length).toBeGreaterThanOrEqual(5);
    for (const v of committed.valid) {
      const clear = decryptField({ key: Buffer.from(v.key, 'hex'), deviceId: v.deviceId, field: v.field, timestamp: v.timestamp, envelope: v.envelope });
      expect(clear.toString('hex'), v.name).toBe(v.plaintext);
      expect(envelopeAad(v.deviceId, v.field, v.timestamp, v.kid).toString('utf8')).toBe(v.aad);
      const parsed = parseEnvelope(v.envelope);
      expect(parsed).toMatchObject({ kid: v.kid, deviceId: v.deviceId, field: v.field, version: v.version });
      expect(parsed.nonce.toString('hex')).toBe(v.nonce);
      expect(parsed.ciphertext.toString('hex')).toBe(v.ciphertext);
      expect(parsed.tag.toString('hex')).toBe(v.tag);
    }
  });

  it('when every committed invalid vector is presented, then it is refused with the listed error code', () => {
    expect(committed.invalid.length).toBeGreaterThanOrEqual(15);
    for (const v of committed.invalid) {
      let caught: unknown;
      try {
        decryptField({ key: Buffer.from(v.key, 'hex'), deviceId: v.deviceId, field: v.field, timestamp: v.timestamp, envelope: v.envelope });
      } catch (error) {
        caught = error;
      }
      expect(caught, v.name).toBeInstanceOf(EnvelopeError);
      expect((caught as EnvelopeError).code, v.name).toBe(v.error);
    }
  });

  it('when the AAD is built, then it is the documented |-separated string', () => {
    expect(envelopeAad('eu:icu.m-7', 'patient_id', 1767225600000, 'eu:icu.m-7/patient_id:v3').toString('utf8')).toBe(
      'keystrata:envelope:v1|eu:icu.m-7|patient_id|1767225600000|eu:icu.m-7/patient_id:v3',
    );
  });

  it('when a device id contains ":v" and digits, then the kid still parses into the right device, field and version', () => {
    expect(parseFieldKid('a:v1/b_2:v3')).toEqual({ kid: 'a:v1/b_2:v3', deviceId: 'a:v1', field: 'b_2', version: 3 });
    expect(() => parseFieldKid('a:v1')).toThrow(EnvelopeFormatError);
    expect(() => parseFieldKid('a/B:v1')).toThrow(EnvelopeFormatError);
    expect(() => parseFieldKid('a/b:v01')).toThrow(EnvelopeFormatError);
    expect(() => parseFieldKid('a/b:v2147483648')).toThrow(EnvelopeFormatError);
  });

  it('when the public entry point is imported, then the fixed-nonce hook is not in it', () => {
    expect(Object.keys(publicEnvelope)).not.toContain('encryptFieldWithFixedNonceForVectors');
    expect(publicEnvelope.encryptField).toBe(encryptField);
  });
});

describe('field envelope v1: binding', () => {
  it('when a value is encrypted twice, then the nonces differ and both decrypt', () => {
    const s = sample();
    const again = encryptField({ key: s.key, kid: s.kid, deviceId: s.deviceId, field: s.field, timestamp: s.timestamp, plaintext: '"P-12345"' });
    expect(parseEnvelope(again).nonce).not.toEqual(parseEnvelope(s.envelope).nonce);
    for (const envelope of [s.envelope, again]) expect(decryptField({ ...s, envelope }).toString()).toBe('"P-12345"');
  });

  it('when a value is moved to another device, then it is refused as moved before any decryption', () => {
    const s = sample();
    expect(() => decryptField({ ...s, deviceId: 'monitor-00043' })).toThrow(EnvelopeContextError);
    expect(() => decryptField({ ...s, deviceId: 'monitor-00043' })).toThrow(/moved to another device or field/);
  });

  it('when a value is moved to another field of the same device, then it is refused', () => {
    const s = sample();
    expect(() => decryptField({ ...s, field: 'medical_record' })).toThrow(EnvelopeContextError);
  });

  it('when a value is moved to another message (timestamp), then authentication fails', () => {
    const s = sample();
    for (const timestamp of [s.timestamp + 1, s.timestamp - 1, s.timestamp + 1000, 0]) {
      expect(() => decryptField({ ...s, timestamp })).toThrow(EnvelopeAuthenticationError);
    }
  });

  it("when the kid is rewritten to another version or another device's key of the same bytes, then authentication fails", () => {
    const s = sample({ deviceId: 'd1' });
    const other = s.envelope.replace('ENC:v1:d1/patient_id:v1:', 'ENC:v1:d1/patient_id:v2:');
    expect(() => decryptField({ ...s, envelope: other })).toThrow(EnvelopeAuthenticationError);
    // same key material registered under another device: the AAD still carries the device id
    const moved = s.envelope.replace('ENC:v1:d1/', 'ENC:v1:d2/');
    expect(() => decryptField({ ...s, deviceId: 'd2', envelope: moved })).toThrow(EnvelopeAuthenticationError);
  });

  it('when the wrong key is used, then authentication fails and no plaintext is returned', () => {
    const s = sample();
    expect(() => decryptField({ ...s, key: key() })).toThrow(EnvelopeAuthenticationError);
  });

  it('when any single bit of the payload is flipped, then the value is refused', () => {
    const s = sample();
    const bytes = Buffer.from(payloadOf(s.envelope), 'base64url');
    for (let bit = 0; bit < bytes.length * 8; bit++) {
      const tampered = Buffer.from(bytes);
      tampered[bit >> 3] = (tampered[bit >> 3] as number) ^ (1 << (bit & 7));
      const envelope = `ENC:v1:${s.kid}:${tampered.toString('base64url')}`;
      expect(() => decryptField({ ...s, envelope })).toThrow(EnvelopeAuthenticationError);
    }
  });

  it('when encrypting with a kid of another device or field, then it is refused', () => {
    expect(() => encryptField({ key: key(), kid: 'other/patient_id:v1', deviceId: 'd1', field: 'patient_id', timestamp: T, plaintext: 'x' })).toThrow(EnvelopeContextError);
  });

  it('when inputs break the id rules or the timestamp is not an integer of ms, then encryption refuses with invalid_argument', () => {
    const ok = { key: key(), kid: 'd1/f:v1', deviceId: 'd1', field: 'f', timestamp: T, plaintext: 'x' };
    const bad = [
      { ...ok, deviceId: 'd|1', kid: 'd|1/f:v1' },
      { ...ok, timestamp: 1.5 },
      { ...ok, timestamp: -1 },
      { ...ok, timestamp: 2 ** 53 },
      { ...ok, key: Buffer.alloc(16) },
      { ...ok, plaintext: Buffer.alloc(MAX_PLAINTEXT_BYTES + 1) },
    ];
    for (const input of bad) expect(() => encryptField(input)).toThrow(EnvelopeError);
    expect(() => encryptField({ ...ok, deviceId: 'd|1', kid: 'd|1/f:v1' })).toThrow(EnvelopeFormatError);
  });
});

describe('field envelope v1: truncation and re-encoding', () => {
  const s = sample();
  const payload = payloadOf(s.envelope);
  const withPayload = (p: string) => `ENC:v1:${s.kid}:${p}`;

  it('when the value is truncated to fewer bytes than nonce and tag, then the error says truncated', () => {
    for (const length of [0, 4, 20, 36]) {
      const error = catchError(() => decryptField({ ...s, envelope: withPayload(payload.slice(0, length)) }));
      expect(error).toBeInstanceOf(EnvelopeTruncatedError);
      expect(error.message).toMatch(/truncated/);
    }
  });

  it('when the value is cut anywhere, then it is refused with an EnvelopeError, never decrypted', () => {
    for (let cut = 1; cut < s.envelope.length; cut++) {
      const error = catchError(() => decryptField({ ...s, envelope: s.envelope.slice(0, s.envelope.length - cut) }));
      expect(error, `cut ${cut}`).toBeInstanceOf(EnvelopeError);
    }
  });

  it('when the payload is re-encoded as padded or standard base64, then the error says re-encoded', () => {
    const raw = Buffer.from(payload, 'base64url');
    const padded = raw.toString('base64url') + '='.repeat((4 - (payload.length % 4)) % 4);
    const standard = raw.toString('base64').replace(/=+$/, '');
    for (const p of [padded, raw.toString('base64')]) {
      const error = catchError(() => decryptField({ ...s, envelope: withPayload(p) }));
      expect(error).toBeInstanceOf(EnvelopeEncodingError);
      expect(error.message).toMatch(/re-encoded/);
    }
    if (standard !== payload) expect(catchError(() => decryptField({ ...s, envelope: withPayload(standard) }))).toBeInstanceOf(EnvelopeEncodingError);
  });

  it('when the last character carries non-zero unused bits (a second spelling of the same bytes), then it is refused', () => {
    const raw = Buffer.from(payload, 'base64url');
    const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
    const spareBits = raw.length % 3 === 1 ? 4 : raw.length % 3 === 2 ? 2 : 0;
    if (spareBits === 0) return;
    const last = alphabet.indexOf(payload.at(-1) as string);
    const respelled = payload.slice(0, -1) + alphabet[last | 1];
    expect(Buffer.from(respelled, 'base64url')).toEqual(raw); // Node alone would accept it
    expect(catchError(() => decryptField({ ...s, envelope: withPayload(respelled) }))).toBeInstanceOf(EnvelopeEncodingError);
  });

  it('when the value is not a v1 envelope, then the error names the problem', () => {
    expect(catchError(() => parseEnvelope('P-12345'))).toBeInstanceOf(EnvelopeFormatError);
    expect(catchError(() => parseEnvelope('ENC:AES256:abc123')).message).toMatch(/Unsupported envelope version "AES256"/);
    expect(catchError(() => parseEnvelope(`ENC:v1:${payload}`)).message).toMatch(/no kid|kid/);
    expect(catchError(() => parseEnvelope(`${s.envelope} `))).toBeInstanceOf(EnvelopeFormatError);
    expect(catchError(() => parseEnvelope(`ENC:v1:${s.kid}:${'A'.repeat(200_000)}`)).code).toBe('too_large');
  });
});

describe('field envelope v1: properties', () => {
  const deviceId = fc.stringMatching(/^[A-Za-z0-9._:-]{1,128}$/);
  const field = fc.stringMatching(/^[a-z][a-z0-9_]{0,63}$/);
  const version = fc.integer({ min: 1, max: 2_147_483_647 });
  const timestamp = fc.maxSafeNat();

  it('when any valid input is encrypted, then it decrypts to itself and the kid parses back', () => {
    fc.assert(
      fc.property(deviceId, field, version, timestamp, fc.uint8Array({ maxLength: 512 }), (d, f, v, t, plaintext) => {
        const k = crypto.randomBytes(32);
        const kid = fieldKid(d, f, v);
        const envelope = encryptField({ key: k, kid, deviceId: d, field: f, timestamp: t, plaintext });
        expect(parseEnvelope(envelope)).toMatchObject({ kid, deviceId: d, field: f, version: v });
        expect(decryptField({ key: k, deviceId: d, field: f, timestamp: t, envelope })).toEqual(Buffer.from(plaintext));
      }),
      { numRuns: 300 },
    );
  });

  it('when any of device, field or timestamp differs, then decryption is refused', () => {
    fc.assert(
      fc.property(deviceId, deviceId, field, field, timestamp, timestamp, (d1, d2, f1, f2, t1, t2) => {
        fc.pre(d1 !== d2 || f1 !== f2 || t1 !== t2);
        const k = crypto.randomBytes(32);
        const envelope = encryptField({ key: k, kid: fieldKid(d1, f1, 1), deviceId: d1, field: f1, timestamp: t1, plaintext: 'v' });
        expect(() => decryptField({ key: k, deviceId: d2, field: f2, timestamp: t2, envelope })).toThrow(EnvelopeError);
      }),
      { numRuns: 300 },
    );
  });

  it('when the AADs of two distinct (device, field, timestamp, kid) tuples are built, then they differ', () => {
    fc.assert(
      fc.property(deviceId, deviceId, field, field, timestamp, timestamp, version, version, (d1, d2, f1, f2, t1, t2, v1, v2) => {
        fc.pre(d1 !== d2 || f1 !== f2 || t1 !== t2 || v1 !== v2);
        const a = envelopeAad(d1, f1, t1, fieldKid(d1, f1, v1));
        const b = envelopeAad(d2, f2, t2, fieldKid(d2, f2, v2));
        expect(a.equals(b)).toBe(false);
      }),
      { numRuns: 500 },
    );
  });

  it('when an arbitrary string is parsed, then it either parses or throws an EnvelopeError, nothing else', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.string().map((s) => `ENC:v1:${s}`), fc.string().map((s) => `ENC:v1:d/f:v1:${s}`)), (text) => {
        try {
          parseEnvelope(text);
        } catch (error) {
          expect(error).toBeInstanceOf(EnvelopeError);
        }
      }),
      { numRuns: 1000 },
    );
  });
});

const python = spawnSync('python3', ['-c', 'import cryptography'], { stdio: 'ignore' });
describe.skipIf(python.status !== 0)('field envelope v1: independent cross-check', () => {
  it("when Python's cryptography checks the committed vectors, then every one agrees", () => {
    const out = execFileSync('python3', [new URL('../vectors/check_field_envelope_v1.py', import.meta.url).pathname, VECTORS_PATH], { encoding: 'utf8' });
    expect(out).toMatch(/^ok: 5 valid, 18 invalid/);
  });
});

function catchError(fn: () => unknown): EnvelopeError {
  try {
    fn();
  } catch (error) {
    if (error instanceof EnvelopeError) return error;
    throw error;
  }
  throw new Error('expected an EnvelopeError');
}
