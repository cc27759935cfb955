/**
 * Builds the known-answer vectors of the field envelope v1 (test/vectors/field-envelope-v1.json)
 * with fixed keys and nonces, through the internal fixed-nonce hook that only this file uses.
 * test/envelope/field-envelope.test.ts rebuilds them and fails if the committed file differs,
 * so code and vectors cannot drift. To rewrite the file after a deliberate change:
 *
 *   npx tsx test/vectors/field-envelope-v1.generate.ts
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  AAD_PREFIX,
  EnvelopeError,
  decryptField,
  encryptFieldWithFixedNonceForVectors,
  envelopeAad,
  fieldKid,
} from '../../src/envelope/field-envelope.js';

export const VECTORS_PATH = fileURLToPath(new URL('./field-envelope-v1.json', import.meta.url));

interface ValidInput {
  name: string;
  key: string;
  deviceId: string;
  field: string;
  version: number;
  timestamp: number;
  nonce: string;
  plaintextUtf8: string;
}

const hex = (bytes: number, start: number) => Buffer.from(Array.from({ length: bytes }, (_, i) => (start + i) & 0xff)).toString('hex');

const VALID: ValidInput[] = [
  {
    name: 'string value (JSON "P-12345"), seed 000 style message',
    key: hex(32, 0x00),
    deviceId: 'sensor-001',
    field: 'patient_id',
    version: 1,
    timestamp: 1767225600000,
    nonce: hex(12, 0xa0),
    plaintextUtf8: '"P-12345"',
  },
  {
    name: "device id containing ':', ':v' and '.', non-ASCII plaintext",
    key: hex(32, 0x40),
    deviceId: 'eu:icu.monitor-7:v2',
    field: 'medical_record',
    version: 12,
    timestamp: 1634567890123,
    nonce: hex(12, 0xb0),
    plaintextUtf8: '{"dx":"I10","note":"ünïcödé ✓"}',
  },
  {
    name: 'number value (JSON 72), largest version and largest timestamp',
    key: hex(32, 0x80),
    deviceId: 'P',
    field: 'heart_rate',
    version: 2147483647,
    timestamp: 9007199254740991,
    nonce: hex(12, 0xc0),
    plaintextUtf8: '72',
  },
  {
    name: 'empty plaintext: the payload is nonce and tag only',
    key: hex(32, 0xc0),
    deviceId: 'gw_01',
    field: 'x',
    version: 3,
    timestamp: 946684800000,
    nonce: hex(12, 0x00),
    plaintextUtf8: '',
  },
  {
    name: 'several AES blocks',
    key: hex(32, 0xe0),
    deviceId: 'A-b.C_d:e',
    field: 'free_text_2',
    version: 7,
    timestamp: 1767225600999,
    nonce: hex(12, 0xf0),
    plaintextUtf8: JSON.stringify('The quick brown fox jumps over the lazy dog; 0123456789 — 64+ bytes of text.'),
  },
];

export interface FieldEnvelopeVectors {
  description: string;
  spec: string[];
  valid: Array<ValidInput & { kid: string; plaintext: string; aad: string; ciphertext: string; tag: string; envelope: string }>;
  invalid: Array<{ name: string; key: string; deviceId: string; field: string; timestamp: number; envelope: string; error: string }>;
}

export function buildVectors(): FieldEnvelopeVectors {
  const valid = VALID.map((v) => {
    const kid = fieldKid(v.deviceId, v.field, v.version);
    const plaintext = Buffer.from(v.plaintextUtf8, 'utf8');
    const envelope = encryptFieldWithFixedNonceForVectors(
      { key: Buffer.from(v.key, 'hex'), kid, deviceId: v.deviceId, field: v.field, timestamp: v.timestamp, plaintext },
      Buffer.from(v.nonce, 'hex'),
    );
    const payload = Buffer.from(envelope.slice(envelope.lastIndexOf(':') + 1), 'base64url');
    return {
      ...v,
      kid,
      plaintext: plaintext.toString('hex'),
      aad: envelopeAad(v.deviceId, v.field, v.timestamp, kid).toString('utf8'),
      ciphertext: payload.subarray(12, payload.length - 16).toString('hex'),
      tag: payload.subarray(payload.length - 16).toString('hex'),
      envelope,
    };
  });

  const [a, b] = valid as [(typeof valid)[0], (typeof valid)[1]];
  const aPayload = a.envelope.slice(a.envelope.lastIndexOf(':') + 1);
  const base = { key: a.key, deviceId: a.deviceId, field: a.field, timestamp: a.timestamp };
  const withPayload = (payload: string) => `ENC:v1:${a.kid}:${payload}`;
  const flipLastTagBit = () => {
    const bytes = Buffer.from(aPayload, 'base64url');
    bytes[bytes.length - 1] = (bytes[bytes.length - 1] as number) ^ 0x01;
    return withPayload(bytes.toString('base64url'));
  };
  // 37 payload bytes: the last base64url character carries 4 unused bits, which must be zero
  const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
  const last = ALPHABET.indexOf(aPayload.at(-1) as string);
  if (Buffer.from(aPayload, 'base64url').length % 3 !== 1 || last % 16 !== 0) throw new Error('vector 0 no longer has 4 spare bits');
  const strayBits = withPayload(aPayload.slice(0, -1) + ALPHABET[last + 1]);
  const bPayload = b.envelope.slice(b.envelope.lastIndexOf(':') + 1);
  if (!/[-_]/.test(bPayload)) throw new Error('vector 1 has no - or _ to re-encode');
  const asBase64 = `ENC:v1:${b.kid}:${Buffer.from(bPayload, 'base64url').toString('base64').replace(/=+$/, '')}`;

  const invalidInputs = [
    { name: 'moved to another device', ...base, deviceId: 'sensor-002', envelope: a.envelope },
    { name: 'moved to another field of the same device', ...base, field: 'medical_record', envelope: a.envelope },
    { name: 'moved to another message (timestamp + 1 ms)', ...base, timestamp: a.timestamp + 1, envelope: a.envelope },
    { name: 'kid rewritten to another version (same key, same payload)', ...base, envelope: a.envelope.replace(`:${a.kid}:`, `:${fieldKid(a.deviceId, a.field, 2)}:`) },
    { name: 'wrong key', ...base, key: b.key, envelope: a.envelope },
    { name: 'one tag bit flipped', ...base, envelope: flipLastTagBit() },
    { name: 'truncated to fewer bytes than nonce and tag', ...base, envelope: withPayload(aPayload.slice(0, 36)) },
    { name: 'truncated by one character (impossible base64url length)', ...base, envelope: withPayload(aPayload.slice(0, -1)) },
    { name: 'last three tag bytes cut off (then canonically re-encoded)', ...base, envelope: withPayload(Buffer.from(aPayload, 'base64url').subarray(0, -3).toString('base64url')) },
    { name: 'truncated by four characters', ...base, envelope: withPayload(aPayload.slice(0, -4)) },
    { name: 're-encoded with = padding', ...base, envelope: `${a.envelope}${'='.repeat((4 - (aPayload.length % 4)) % 4)}` },
    { name: 're-encoded as standard base64 (+ and /)', ...base, deviceId: b.deviceId, field: b.field, timestamp: b.timestamp, key: b.key, envelope: asBase64 },
    { name: 'non-zero unused bits in the last character', ...base, envelope: strayBits },
    { name: 'character outside base64url', ...base, envelope: withPayload(`${aPayload.slice(0, 10)}.${aPayload.slice(11)}`) },
    { name: 'unknown envelope version', ...base, envelope: a.envelope.replace('ENC:v1:', 'ENC:v2:') },
    { name: 'seed 000 style, not a keystrata envelope', ...base, envelope: 'ENC:AES256:abc123' },
    { name: 'kid of a device DEK, not a field key', ...base, envelope: `ENC:v1:${a.deviceId}:v1:${aPayload}` },
    { name: 'no payload', ...base, envelope: `ENC:v1:${a.kid}:` },
  ];
  const invalid = invalidInputs.map((v) => {
    let error = 'none';
    try {
      decryptField({ key: Buffer.from(v.key, 'hex'), deviceId: v.deviceId, field: v.field, timestamp: v.timestamp, envelope: v.envelope });
    } catch (e) {
      if (!(e instanceof EnvelopeError)) throw e;
      error = e.code;
    }
    return { name: v.name, key: v.key, deviceId: v.deviceId, field: v.field, timestamp: v.timestamp, envelope: v.envelope, error };
  });

  return {
    description:
      'keystrata field envelope v1 known answers. Firmware: for each valid vector, encrypting plaintext with key, nonce and aad must give ciphertext and tag, and envelope must decrypt to plaintext; every invalid vector must be refused (error is the code keystrata uses).',
    spec: [
      'envelope = "ENC:v1:" kid ":" base64url_nopad(nonce[12] || ciphertext || tag[16])',
      'kid = deviceId "/" field ":v" version ; deviceId ~ ^[A-Za-z0-9._:-]{1,128}$ ; field ~ ^[a-z][a-z0-9_]{0,63}$ ; version 1..2147483647, no leading zero',
      'parse: payload = text after the LAST ":" ; kid = text between "ENC:v1:" and that ":"',
      'payload must be canonical unpadded base64url: no "=", no "+" or "/", unused trailing bits zero, length mod 4 != 1',
      `aad = UTF-8("${AAD_PREFIX}|" deviceId "|" field "|" timestamp "|" kid), timestamp = Unix epoch milliseconds as a plain decimal integer`,
      'cipher = AES-256-GCM, 96-bit nonce (random in production, fixed here), 128-bit tag',
      'refuse before decrypting when the kid names another device or field than the one presented',
    ],
    valid,
    invalid,
  };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === fs.realpathSync(process.argv[1])) {
  fs.writeFileSync(VECTORS_PATH, `${JSON.stringify(buildVectors(), null, 2)}\n`);
  console.log(`wrote ${VECTORS_PATH}`);
}
