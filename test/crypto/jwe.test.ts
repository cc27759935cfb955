import crypto from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compactDecrypt, decodeProtectedHeader, exportJWK, generateKeyPair } from 'jose';
import { base64urlLength, encryptKeySet, importDeliveryKey, keySetPayload, parseDeliveryJwk, writeBase64url } from '../../src/crypto/jwe.js';
import { BadRequestError } from '../../src/http/errors.js';

describe('JWE key delivery', () => {
  for (const alg of ['X25519', 'P-256'] as const) {
    it(`when keys are delivered to a ${alg} key, then the private key decrypts one JWK Set with every key`, async () => {
      const { publicKey, privateKey } = alg === 'X25519' ? await generateKeyPair('ECDH-ES+A256KW', { crv: 'X25519', extractable: true }) : await generateKeyPair('ECDH-ES+A256KW', { crv: 'P-256', extractable: true });
      const { jwk, kid } = await parseDeliveryJwk((await exportJWK(publicKey)) as Record<string, unknown>);
      const keys = [
        { kid: 'd1:v1', key: Buffer.alloc(32, 1), meta: { state: 'primary' } },
        { kid: 'd1/patient_id:v2', key: Buffer.alloc(32, 2), meta: { state: 'grace' } },
      ];
      const jwe = await encryptKeySet(await importDeliveryKey(jwk), kid, keys);
      const header = decodeProtectedHeader(jwe);
      expect(header).toMatchObject({ alg: 'ECDH-ES+A256KW', enc: 'A256GCM', kid });
      expect(header.epk).toBeDefined();
      const { plaintext } = await compactDecrypt(jwe, privateKey);
      const set = JSON.parse(new TextDecoder().decode(plaintext)) as { keys: Array<{ kid: string; k: string; kty: string; state: string }> };
      expect(set.keys.map((k) => [k.kid, k.kty, k.state, Buffer.from(k.k, 'base64url')])).toEqual([
        ['d1:v1', 'oct', 'primary', Buffer.alloc(32, 1)],
        ['d1/patient_id:v2', 'oct', 'grace', Buffer.alloc(32, 2)],
      ]);
    });
  }

  it('when key metadata holds any strings, numbers or nulls, then the decrypted JWK Set is exactly the metadata plus kty, alg, kid and k', async () => {
    const { publicKey, privateKey } = await generateKeyPair('ECDH-ES+A256KW', { crv: 'X25519', extractable: true });
    const { jwk, kid: deliveryKid } = await parseDeliveryJwk((await exportJWK(publicKey)) as Record<string, unknown>);
    const deliveryKey = await importDeliveryKey(jwk);
    const metaValue = fc.oneof(fc.string({ unit: 'binary' }), fc.integer(), fc.double(), fc.constant(null));
    await fc.assert(
      fc.asyncProperty(fc.array(fc.record({ kid: fc.string({ unit: 'binary' }), meta: fc.dictionary(fc.string({ unit: 'binary' }), metaValue) }), { maxLength: 5 }), async (items) => {
        const keys = items.map((item) => ({ kid: item.kid, key: crypto.randomBytes(32), meta: item.meta as Record<string, unknown> }));
        // what the JWK Set must equal: the spread it replaces, through a JSON round trip (NaN → null, -0 → 0)
        const expected = JSON.parse(JSON.stringify({ keys: keys.map((k) => ({ ...k.meta, kty: 'oct', alg: 'A256GCM', kid: k.kid, k: k.key.toString('base64url') })) }));
        const jwe = await encryptKeySet(deliveryKey, deliveryKid, keys);
        const { plaintext } = await compactDecrypt(jwe, privateKey);
        expect(JSON.parse(new TextDecoder().decode(plaintext))).toEqual(expected);
      }),
      { numRuns: 150 },
    );
  });

  it('when the same keys are delivered twice, then each JWE uses a fresh ephemeral key', async () => {
    const { publicKey } = await generateKeyPair('ECDH-ES+A256KW', { crv: 'X25519', extractable: true });
    const { jwk, kid } = await parseDeliveryJwk((await exportJWK(publicKey)) as Record<string, unknown>);
    const key = await importDeliveryKey(jwk);
    const keys = () => [{ kid: 'd:v1', key: Buffer.alloc(32, 7), meta: {} }];
    const a = decodeProtectedHeader(await encryptKeySet(key, kid, keys()));
    const b = decodeProtectedHeader(await encryptKeySet(key, kid, keys()));
    expect(a.epk).not.toEqual(b.epk);
  });

  it('when a private JWK, a symmetric JWK, a signing key or a point off the curve is offered, then it is refused', async () => {
    const { privateKey } = await generateKeyPair('ECDH-ES+A256KW', { crv: 'P-256', extractable: true });
    const privateJwk = (await exportJWK(privateKey)) as Record<string, unknown>;
    const bad: Array<Record<string, unknown>> = [
      privateJwk,
      { kty: 'oct', k: 'AAAA' },
      { kty: 'OKP', crv: 'Ed25519', x: privateJwk.x },
      { kty: 'EC', crv: 'P-256', x: 'A'.repeat(43), y: 'A'.repeat(43) },
      { kty: 'EC', crv: 'P-384', x: privateJwk.x, y: privateJwk.y },
      { ...privateJwk, d: undefined, use: 'sig' },
      {},
    ];
    for (const input of bad) {
      const clean = Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined));
      await expect(parseDeliveryJwk(clean)).rejects.toBeInstanceOf(BadRequestError);
    }
  });
});

describe('the key-set payload', () => {
  const spread = (keys: { kid: string; key: Buffer; meta: Record<string, unknown> }[]) =>
    JSON.stringify({ keys: keys.map((k) => ({ ...k.meta, kty: 'oct', alg: 'A256GCM', kid: k.kid, k: k.key.toString('base64url') })) });

  it('when keys of any length carry metadata, then the bytes are exactly the JSON of the spread form', () => {
    const metaValue = fc.oneof(fc.string({ unit: 'binary' }), fc.integer(), fc.double(), fc.constant(null), fc.boolean());
    const name = fc.string({ unit: 'binary' }).filter((n) => !['kty', 'alg', 'kid', 'k'].includes(n));
    fc.assert(
      fc.property(fc.array(fc.record({ kid: fc.string({ unit: 'binary' }), key: fc.uint8Array({ maxLength: 70 }), meta: fc.dictionary(name, metaValue) }), { maxLength: 8 }), (items) => {
        const keys = items.map((item) => ({ kid: item.kid, key: Buffer.from(item.key), meta: item.meta as Record<string, unknown> }));
        const payload = keySetPayload(keys);
        expect(payload.toString('utf8')).toBe(spread(keys));
        // its own ArrayBuffer, whole: it is moved to the JWE thread, never a slice of the shared pool
        expect([payload.byteOffset, payload.buffer.byteLength]).toEqual([0, payload.length]);
      }),
      { numRuns: 300 },
    );
  });

  it('when metadata holds members named kty, alg, kid or k, then those are left out and ours stay; __proto__ stays a plain member', () => {
    const key = crypto.randomBytes(32);
    const meta = JSON.parse('{"kty":"RSA","alg":"none","kid":"forged","k":"AAAA","version":3,"__proto__":"x"}') as Record<string, unknown>;
    const set = JSON.parse(keySetPayload([{ kid: 'dev-1:v3', key, meta }]).toString('utf8')) as { keys: Record<string, unknown>[] };
    expect(set.keys).toHaveLength(1);
    expect(Object.entries(set.keys[0]!)).toEqual([
      ['version', 3],
      ['__proto__', 'x'],
      ['kty', 'oct'],
      ['alg', 'A256GCM'],
      ['kid', 'dev-1:v3'],
      ['k', key.toString('base64url')],
    ]);
    expect(keySetPayload([]).toString('utf8')).toBe('{"keys":[]}');
  });

  it('when bytes are base64url-encoded into a buffer, then they equal Buffer\'s unpadded base64url and fill exactly base64urlLength bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), fc.nat(8), (bytes, at) => {
        const out = Buffer.alloc(at + base64urlLength(bytes.length) + 3, 0xff);
        expect(writeBase64url(bytes, out, at)).toBe(at + base64urlLength(bytes.length));
        expect(out.subarray(at, at + base64urlLength(bytes.length)).toString('latin1')).toBe(Buffer.from(bytes).toString('base64url'));
        expect([...out.subarray(0, at), ...out.subarray(at + base64urlLength(bytes.length))].every((b) => b === 0xff)).toBe(true);
      }),
      { numRuns: 500 },
    );
  });
});
