/**
 * Local wrapping below the KEK: AES-256-GCM (Node crypto), random 96-bit nonce, 128-bit tag.
 *
 *   blob = nonce (12 bytes) ‖ ciphertext (same length as the key) ‖ tag (16 bytes)
 *
 * The AAD is the row's binding string (crypto/binding.ts). A blob that fails to authenticate
 * raises UnwrapError and yields no bytes at all.
 */
import crypto from 'node:crypto';
import { UnwrapError } from '../http/errors.js';

export const KEY_BYTES = 32;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

export function generateKey(): Buffer {
  return crypto.randomBytes(KEY_BYTES);
}

export function wrapKey(parentKey: Buffer, plaintextKey: Buffer, aad: string): Buffer {
  assertKey(parentKey);
  const nonce = crypto.randomBytes(NONCE_BYTES);
  const cipher = crypto.createCipheriv('aes-256-gcm', parentKey, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(Buffer.from(aad, 'utf8'));
  const ciphertext = Buffer.concat([cipher.update(plaintextKey), cipher.final()]);
  return Buffer.concat([nonce, ciphertext, cipher.getAuthTag()]);
}

export function unwrapKey(parentKey: Buffer, blob: Buffer, aad: string): Buffer {
  assertKey(parentKey);
  if (blob.length !== NONCE_BYTES + KEY_BYTES + TAG_BYTES) throw new UnwrapError('Wrapped key has the wrong length');
  const nonce = blob.subarray(0, NONCE_BYTES);
  const ciphertext = blob.subarray(NONCE_BYTES, blob.length - TAG_BYTES);
  const tag = blob.subarray(blob.length - TAG_BYTES);
  const decipher = crypto.createDecipheriv('aes-256-gcm', parentKey, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(Buffer.from(aad, 'utf8'));
  decipher.setAuthTag(tag);
  const plaintext = decipher.update(ciphertext);
  try {
    decipher.final();
  } catch {
    plaintext.fill(0);
    throw new UnwrapError();
  }
  return plaintext;
}

function assertKey(key: Buffer): void {
  if (key.length !== KEY_BYTES) throw new Error('AES-256 key must be 32 bytes');
}
