/**
 * Key delivery: every key leaves the service only as a compact JWE (ECDH-ES+A256KW / A256GCM)
 * to the public delivery key a backend registered. The payload is a JWK Set, so a bulk fetch
 * costs one ECDH however many keys it carries. Every call uses a fresh ephemeral key
 * (ECDH-ES), so nothing is reused between deliveries. jose validates delivery keys; the
 * encryption itself is below, on node:crypto (see encryptKeySet).
 */
import crypto, { type KeyObject } from 'node:crypto';
import { calculateJwkThumbprint, importJWK } from 'jose';
import { BadRequestError } from '../http/errors.js';

export const DELIVERY_ALG = 'ECDH-ES+A256KW';
export const DELIVERY_ENC = 'A256GCM';

/** A public delivery key as we store it: only the public members, nothing else. */
export type DeliveryJwk = { kty: 'EC'; crv: 'P-256'; x: string; y: string } | { kty: 'OKP'; crv: 'X25519'; x: string };

const B64URL_32 = /^[A-Za-z0-9_-]{43}$/;
const PRIVATE_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];

/**
 * Accept only a public EC P-256 or X25519 JWK fit for ECDH-ES+A256KW. A private JWK is
 * refused outright (it must never be sent to us, let alone stored).
 */
export async function parseDeliveryJwk(input: Record<string, unknown>): Promise<{ jwk: DeliveryJwk; kid: string }> {
  if (PRIVATE_MEMBERS.some((member) => member in input)) {
    throw new BadRequestError('The delivery key must be a public JWK: private key members are refused', { field: 'jwk' });
  }
  if (input.use !== undefined && input.use !== 'enc') throw new BadRequestError('jwk.use must be "enc" when present', { field: 'jwk.use' });
  if (input.alg !== undefined && input.alg !== DELIVERY_ALG) {
    throw new BadRequestError(`jwk.alg must be "${DELIVERY_ALG}" when present`, { field: 'jwk.alg' });
  }
  let jwk: DeliveryJwk;
  if (input.kty === 'EC' && input.crv === 'P-256' && isB64Url32(input.x) && isB64Url32(input.y)) {
    jwk = { kty: 'EC', crv: 'P-256', x: input.x, y: input.y };
  } else if (input.kty === 'OKP' && input.crv === 'X25519' && isB64Url32(input.x)) {
    jwk = { kty: 'OKP', crv: 'X25519', x: input.x };
  } else {
    throw new BadRequestError('The delivery key must be a public EC P-256 or OKP X25519 JWK', { field: 'jwk' });
  }
  try {
    // Importing checks the point is on the curve.
    await importJWK(jwk, DELIVERY_ALG);
  } catch {
    throw new BadRequestError('The delivery key is not a valid public key', { field: 'jwk' });
  }
  return { jwk, kid: await calculateJwkThumbprint(jwk, 'sha256') };
}

function isB64Url32(value: unknown): value is string {
  return typeof value === 'string' && B64URL_32.test(value);
}

export interface DeliveredKey {
  kid: string;
  key: Buffer;
  /** non-secret metadata carried next to the key (state, version, …) */
  meta: Record<string, unknown>;
}

export type DeliveryKey = { jwk: DeliveryJwk; publicKey: KeyObject };

export async function importDeliveryKey(jwk: DeliveryJwk): Promise<DeliveryKey> {
  return { jwk, publicKey: crypto.createPublicKey({ key: jwk, format: 'jwk' }) };
}

/**
 * Encrypt a JWK Set of the given keys to one delivery key, as a compact JWE
 * (RFC 7516/7518 §4.6: ECDH-ES+A256KW, A256GCM).
 *
 * Written on node:crypto rather than jose's WebCrypto path because key fetch is the hot path
 * (about 10× faster here, issue 7); it is the same construction step by step, and
 * test/crypto/jwe.test.ts checks every output decrypts with jose.
 *
 *   epk        fresh ephemeral key pair on the recipient's curve, for every JWE
 *   Z          ECDH(epk private, recipient public)
 *   KEK        Concat KDF (NIST SP 800-56A, SHA-256, one round): SHA-256(1 ‖ Z ‖ OtherInfo),
 *              OtherInfo = len‖"ECDH-ES+A256KW" ‖ len‖apu(empty) ‖ len‖apv(empty) ‖ 256
 *   CEK        32 random bytes, wrapped with AES-256-KW (RFC 3394) under KEK
 *   content    AES-256-GCM(CEK, 96-bit random IV, AAD = ASCII(base64url(protected header)))
 *   output     header . encrypted key . iv . ciphertext . tag (each base64url)
 */
export async function encryptKeySet(deliveryKey: DeliveryKey, deliveryKid: string, keys: ReadonlyArray<DeliveredKey>): Promise<string> {
  const payload = keySetPayload(keys);
  try {
    return encryptPayload(deliveryKey, deliveryKid, payload);
  } finally {
    payload.fill(0);
  }
}

/** The compact JWE of a key-set payload (keySetPayload); the caller zeroes `payload`. */
export function encryptPayload(deliveryKey: DeliveryKey, deliveryKid: string, payload: Buffer): string {
  const random = randomBytes(32 + 12);
  const cek = random.subarray(0, 32);
  const iv = random.subarray(32);
  let kek: Buffer | undefined;
  try {
    const ephemeral = generateEphemeralKeyPair(deliveryKey.jwk.kty);
    const z = crypto.diffieHellman({ privateKey: ephemeral.privateKey, publicKey: deliveryKey.publicKey });
    kek = concatKdf(z);
    z.fill(0);
    const epk = ephemeralPublicJwk(ephemeral.publicKey, deliveryKey.jwk.kty);
    const header = base64url(JSON.stringify({ alg: DELIVERY_ALG, enc: DELIVERY_ENC, kid: deliveryKid, cty: 'jwk-set+json', epk }));
    const wrapper = crypto.createCipheriv('id-aes256-wrap', kek, AES_KW_IV);
    const encryptedKey = Buffer.concat([wrapper.update(cek), wrapper.final()]);
    const cipher = crypto.createCipheriv('aes-256-gcm', cek, iv);
    cipher.setAAD(Buffer.from(header, 'ascii'));
    const ciphertext = Buffer.concat([cipher.update(payload), cipher.final()]);
    return [header, encryptedKey.toString('base64url'), iv.toString('base64url'), ciphertext.toString('base64url'), cipher.getAuthTag().toString('base64url')].join('.');
  } finally {
    random.fill(0);
    kek?.fill(0);
  }
}

/**
 * CSPRNG bytes (for CEKs and IVs), drawn from the OS generator 4 KiB at a time: one
 * crypto.randomBytes call cost 4–15 µs here whatever its size (issue 7), and a JWE needs 44.
 * Bytes are copied out and zeroed in the pool as they are handed out, so none is used twice
 * and none waits in the pool once used.
 */
const RANDOM_POOL_BYTES = 4096;
let randomPool = Buffer.alloc(0);
let randomOffset = 0;

function randomBytes(size: number): Buffer {
  if (size > RANDOM_POOL_BYTES) return crypto.randomBytes(size);
  if (randomOffset + size > randomPool.length) {
    randomPool.fill(0);
    randomPool = crypto.randomBytes(RANDOM_POOL_BYTES);
    randomOffset = 0;
  }
  const slice = randomPool.subarray(randomOffset, randomOffset + size);
  const out = Buffer.from(slice);
  slice.fill(0);
  randomOffset += size;
  return out;
}

/**
 * The JWK Set `{"keys":[{...meta, kty, alg, kid, k}, …]}` as UTF-8 bytes. The key bytes are
 * base64url-encoded straight into the buffer (which the caller zeroes), never into a string:
 * a JS string cannot be zeroed and lives until the collector takes it. Each key's metadata is
 * one JSON.stringify (V8's fast path for a plain object), and the parts are written into one
 * buffer sized up front rather than joined into one big string first. For a 1,000-key bulk
 * fetch that is 1.7 ms against 3.8 ms for the joined string (the flattening and re-scanning of
 * ~170 KB of concatenated text, 11 % of the server's busy time in the bench profile, issue 7).
 * Same JSON as `JSON.stringify({ keys: keys.map((k) => ({ ...k.meta, kty, alg, kid, k })) })`,
 * except that a meta member named kty, alg, kid or k is left out (those are ours).
 */
export function keySetPayload(keys: ReadonlyArray<DeliveredKey>): Buffer {
  const heads = new Array<string>(keys.length);
  let total = KEYS_OPEN.length + KEYS_CLOSE.length + Math.max(0, keys.length - 1);
  for (let i = 0; i < keys.length; i++) {
    const k = keys[i] as DeliveredKey;
    const head = `${openWithMeta(k.meta)}"kty":"oct","alg":"A256GCM","kid":${JSON.stringify(k.kid)},"k":"`;
    heads[i] = head;
    total += Buffer.byteLength(head, 'utf8') + base64urlLength(k.key.length) + KEY_CLOSE.length;
  }
  // its own ArrayBuffer (never a slice of Node's shared pool), so it can be moved to a JWE thread
  const payload = Buffer.allocUnsafeSlow(total);
  let at = payload.write(KEYS_OPEN, 0, 'latin1');
  for (let i = 0; i < keys.length; i++) {
    if (i > 0) payload[at++] = COMMA;
    at += payload.write(heads[i] as string, at, 'utf8');
    at = writeBase64url((keys[i] as DeliveredKey).key, payload, at);
    at += payload.write(KEY_CLOSE, at, 'latin1');
  }
  at += payload.write(KEYS_CLOSE, at, 'latin1');
  if (at !== total) {
    payload.fill(0);
    throw new Error(`key set payload: wrote ${at} of ${total} bytes`);
  }
  return payload;
}

const KEYS_OPEN = '{"keys":[';
const KEYS_CLOSE = ']}';
const KEY_CLOSE = '"}';
const COMMA = 0x2c;
const JWK_MEMBERS = ['kty', 'alg', 'kid', 'k'];

/** `{` and the metadata members, each followed by a comma: `{"state":"active",…,`. */
function openWithMeta(meta: Record<string, unknown>): string {
  // fromEntries defines own members, so a member named __proto__ stays a member
  const own = JWK_MEMBERS.some((name) => Object.hasOwn(meta, name)) ? Object.fromEntries(Object.entries(meta).filter(([name]) => !JWK_MEMBERS.includes(name))) : meta;
  const json = JSON.stringify(own);
  return json === '{}' ? '{' : `${json.slice(0, -1)},`;
}

const BASE64URL = Buffer.from('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_', 'latin1');

/** Unpadded base64url length of `bytes` bytes (RFC 7515 §2). */
export function base64urlLength(bytes: number): number {
  return Math.floor(bytes / 3) * 4 + (bytes % 3 === 0 ? 0 : (bytes % 3) + 1);
}

/** Unpadded base64url of `bytes` written into `out` at `at`; returns the offset after it. */
export function writeBase64url(bytes: Uint8Array, out: Uint8Array, at: number): number {
  let i = 0;
  for (; i + 2 < bytes.length; i += 3) {
    const n = ((bytes[i] as number) << 16) | ((bytes[i + 1] as number) << 8) | (bytes[i + 2] as number);
    out[at++] = BASE64URL[n >>> 18] as number;
    out[at++] = BASE64URL[(n >>> 12) & 63] as number;
    out[at++] = BASE64URL[(n >>> 6) & 63] as number;
    out[at++] = BASE64URL[n & 63] as number;
  }
  const rest = bytes.length - i;
  if (rest > 0) {
    const n = ((bytes[i] as number) << 16) | (rest === 2 ? (bytes[i + 1] as number) << 8 : 0);
    out[at++] = BASE64URL[n >>> 18] as number;
    out[at++] = BASE64URL[(n >>> 12) & 63] as number;
    if (rest === 2) out[at++] = BASE64URL[(n >>> 6) & 63] as number;
  }
  return at;
}

const AES_KW_IV = Buffer.from('a6a6a6a6a6a6a6a6', 'hex'); // RFC 3394 default initial value

/** Concat KDF for ECDH-ES+A256KW with empty apu/apv: one SHA-256 round yields the 256-bit KEK. */
const OTHER_INFO = Buffer.concat([lengthPrefixed(Buffer.from(DELIVERY_ALG, 'ascii')), lengthPrefixed(Buffer.alloc(0)), lengthPrefixed(Buffer.alloc(0)), uint32(256)]);

function concatKdf(z: Buffer): Buffer {
  return crypto.createHash('sha256').update(uint32(1)).update(z).update(OTHER_INFO).digest();
}

function uint32(value: number): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value);
  return out;
}

function lengthPrefixed(data: Buffer): Buffer {
  return Buffer.concat([uint32(data.length), data]);
}

/**
 * A fresh ephemeral key pair, its public half exported as a JWK by the key generation itself.
 * Not `publicKey.export({ format: 'jwk' })` afterwards: on Node 20 that export holds the key's
 * mutex while it allocates, and a garbage collection there that frees the finished generation
 * job (which locks the same mutex as it is destroyed) deadlocks the thread for good. It hung
 * the event loop or the JWE thread once in every 5,000–30,000 deliveries here (issue 7; gdb showed
 * ExportJWKEdKey -> CollectGarbage -> ~KeyGenJob -> uv_mutex_lock).
 */
function generateEphemeralKeyPair(kty: DeliveryJwk['kty']): { privateKey: KeyObject; publicKey: crypto.JsonWebKey } {
  // Node supports the 'jwk' encoding here; @types/node does not declare it
  const publicKeyEncoding = { format: 'jwk' } as never;
  const pair = (
    kty === 'OKP'
      ? crypto.generateKeyPairSync('x25519', { publicKeyEncoding })
      : crypto.generateKeyPairSync('ec', { namedCurve: 'prime256v1', publicKeyEncoding } as crypto.ECKeyPairKeyObjectOptions)
  ) as unknown as { privateKey: KeyObject; publicKey: crypto.JsonWebKey };
  if (typeof pair.publicKey.x !== 'string') throw new Error('The ephemeral public key was not exported as a JWK');
  return pair;
}

function ephemeralPublicJwk(jwk: crypto.JsonWebKey, kty: DeliveryJwk['kty']): Record<string, string> {
  return kty === 'OKP' ? { kty: 'OKP', crv: 'X25519', x: jwk.x as string } : { kty: 'EC', crv: 'P-256', x: jwk.x as string, y: jwk.y as string };
}

function base64url(text: string): string {
  return Buffer.from(text, 'utf8').toString('base64url');
}
