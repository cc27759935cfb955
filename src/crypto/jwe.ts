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
 * The JWK Set `{"keys":[{...meta, kty, alg, kid, k}, …]}` as UTF-8, written directly: for a
 * 1,000-key bulk fetch, spreading each key's metadata into a new object for JSON.stringify cost
 * about twice as much (issue 7). Same JSON as that spread (meta members first; kty, alg, kid and
 * k are ours, so a meta member of one of those names is left out).
 */
export function keySetPayload(keys: ReadonlyArray<DeliveredKey>): Buffer {
  const parts = new Array<string>(keys.length);
  for (let i = 0; i < keys.length; i++) {
    const k = keys[i] as DeliveredKey;
    let json = '{';
    for (const name in k.meta) {
      const value = k.meta[name];
      if (value === undefined || JWK_MEMBERS.has(name)) continue;
      json += `${quotedName(name)}:${typeof value === 'number' ? (Number.isFinite(value) ? String(value) : 'null') : value === null ? 'null' : JSON.stringify(value)},`;
    }
    parts[i] = `${json}"kty":"oct","alg":"A256GCM","kid":${JSON.stringify(k.kid)},"k":"${k.key.toString('base64url')}"}`;
  }
  const json = `{"keys":[${parts.join(',')}]}`;
  // its own ArrayBuffer (never a slice of Node's shared pool), so it can be moved to a JWE thread
  const payload = Buffer.allocUnsafeSlow(Buffer.byteLength(json, 'utf8'));
  payload.write(json, 'utf8');
  return payload;
}

const JWK_MEMBERS = new Set(['kty', 'alg', 'kid', 'k']);
const QUOTED_NAMES = new Map<string, string>();
function quotedName(name: string): string {
  let quoted = QUOTED_NAMES.get(name);
  if (quoted === undefined) {
    quoted = JSON.stringify(name);
    if (QUOTED_NAMES.size < 64) QUOTED_NAMES.set(name, quoted);
  }
  return quoted;
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
