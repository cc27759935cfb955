/**
 * Key delivery: every key leaves the service only as a compact JWE (ECDH-ES+A256KW / A256GCM)
 * to the public delivery key a backend registered. The payload is a JWK Set, so a bulk fetch
 * costs one ECDH however many keys it carries. jose does the JOSE work; every call uses a
 * fresh ephemeral key (ECDH-ES), so nothing is reused between deliveries.
 */
import { CompactEncrypt, calculateJwkThumbprint, importJWK, type JWK } from 'jose';
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

export type DeliveryKey = Awaited<ReturnType<typeof importJWK>>;

export async function importDeliveryKey(jwk: DeliveryJwk): Promise<DeliveryKey> {
  return importJWK(jwk, DELIVERY_ALG);
}

/** Encrypt a JWK Set of the given keys to one delivery key. */
export async function encryptKeySet(deliveryKey: DeliveryKey, deliveryKid: string, keys: ReadonlyArray<DeliveredKey>): Promise<string> {
  const jwks: { keys: JWK[] } = {
    keys: keys.map((k) => ({ ...k.meta, kty: 'oct', alg: 'A256GCM', kid: k.kid, k: k.key.toString('base64url') })),
  };
  const payload = Buffer.from(JSON.stringify(jwks), 'utf8');
  try {
    return await new CompactEncrypt(payload)
      .setProtectedHeader({ alg: DELIVERY_ALG, enc: DELIVERY_ENC, kid: deliveryKid, cty: 'jwk-set+json' })
      .encrypt(deliveryKey);
  } finally {
    payload.fill(0);
  }
}
