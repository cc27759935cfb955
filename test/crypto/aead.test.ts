import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { generateKey, unwrapKey, wrapKey } from '../../src/crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../../src/crypto/binding.js';
import { UnwrapError } from '../../src/http/errors.js';

// Known answer, computed independently with Python's `cryptography` AESGCM:
// key = 0x11 × 32, nonce = 00..0b, plaintext = 0x22 × 32, AAD = the binding string below.
const KAT = {
  parentKey: Buffer.alloc(32, 0x11),
  plaintext: Buffer.alloc(32, 0x22),
  aad: 'keystrata:v1|device|sensor-1|1|group|g1|1',
  blob: Buffer.from(
    '000102030405060708090a0b' + // nonce
      '31c19431598117d6369af1bde68dd504eb83224a3757700d8bc29d5ddf62410c' + // ciphertext
      '0e615cbc06930fff374eb603cbf2a8c8', // tag
    'hex',
  ),
};

describe('AES-256-GCM key wrapping', () => {
  it('when the known-answer blob is unwrapped, then the known plaintext comes out', () => {
    expect(unwrapKey(KAT.parentKey, KAT.blob, KAT.aad)).toEqual(KAT.plaintext);
  });

  it('when the binding rule builds the KAT AAD, then it is exactly the documented string', () => {
    expect(deviceBinding('sensor-1', 1, 'g1', 1)).toBe(KAT.aad);
    expect(groupBinding('g1', 3, 'keystrata-kek')).toBe('keystrata:v1|group|g1|3|kek|keystrata-kek|-');
    expect(fieldBinding('sensor-1', 'patient_id', 2, 5)).toBe('keystrata:v1|field|sensor-1/patient_id|2|device|sensor-1|5');
  });

  it('when a key is wrapped, then the blob is nonce ‖ ciphertext ‖ tag with a fresh nonce each time', () => {
    const parent = generateKey();
    const key = generateKey();
    const a = wrapKey(parent, key, KAT.aad);
    const b = wrapKey(parent, key, KAT.aad);
    expect(a.length).toBe(12 + 32 + 16);
    expect(a.subarray(0, 12)).not.toEqual(b.subarray(0, 12));
    expect(unwrapKey(parent, a, KAT.aad)).toEqual(key);
  });

  it('when any single bit of the blob is flipped, then unwrap fails with UnwrapError and yields nothing', () => {
    for (let bit = 0; bit < KAT.blob.length * 8; bit++) {
      const tampered = Buffer.from(KAT.blob);
      tampered[bit >> 3] = (tampered[bit >> 3] as number) ^ (1 << (bit & 7));
      expect(() => unwrapKey(KAT.parentKey, tampered, KAT.aad)).toThrow(UnwrapError);
    }
  });

  it('when the blob is truncated or extended, then unwrap fails cleanly', () => {
    for (const length of [0, 1, 12, 28, 59]) {
      expect(() => unwrapKey(KAT.parentKey, KAT.blob.subarray(0, length), KAT.aad)).toThrow(UnwrapError);
    }
    expect(() => unwrapKey(KAT.parentKey, Buffer.concat([KAT.blob, Buffer.from([0])]), KAT.aad)).toThrow(UnwrapError);
  });

  it("when a blob is moved to another device's row (or version, or parent version), then unwrap fails", () => {
    const other = [deviceBinding('sensor-2', 1, 'g1', 1), deviceBinding('sensor-1', 2, 'g1', 1), deviceBinding('sensor-1', 1, 'g1', 2), deviceBinding('sensor-1', 1, 'g2', 1)];
    for (const aad of other) expect(() => unwrapKey(KAT.parentKey, KAT.blob, aad)).toThrow(UnwrapError);
  });

  it('when the wrong parent key is used, then unwrap fails', () => {
    expect(() => unwrapKey(Buffer.alloc(32, 0x12), KAT.blob, KAT.aad)).toThrow(UnwrapError);
  });

  it('when any key is wrapped under any binding, then only that exact binding unwraps it (property)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.string({ maxLength: 40 }), fc.string({ maxLength: 40 }), (keyBytes, aad, otherAad) => {
        const parent = generateKey();
        const blob = wrapKey(parent, Buffer.from(keyBytes), aad);
        expect(unwrapKey(parent, blob, aad)).toEqual(Buffer.from(keyBytes));
        if (otherAad !== aad) expect(() => unwrapKey(parent, blob, otherAad)).toThrow(UnwrapError);
      }),
      { numRuns: 200 },
    );
  });
});
