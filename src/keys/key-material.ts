/**
 * Walking the hierarchy: new key material is generated and wrapped under its parent, stored
 * material is unwrapped parent by parent (KEK → group → device → field). Unwrapped group and
 * device DEKs are cached (keys/key-cache.ts); field keys are leaves and never cached.
 * Every wrap and unwrap binds the blob to its row (crypto/binding.ts).
 */
import crypto from 'node:crypto';
import { generateKey, KEY_BYTES, unwrapKey, wrapKey } from '../crypto/aead.js';
import { deviceBinding, fieldBinding, groupBinding } from '../crypto/binding.js';
import { UnwrapError } from '../http/errors.js';
import { kekBlobVersion, type KekProvider } from '../kek/kek.types.js';
import type { KeyCache } from './key-cache.js';

export interface UnwrapFailure {
  keyId: string;
  version: number;
}

export interface KeyMaterial {
  /** A fresh group DEK wrapped by the KEK (store it only through the KEK fence, keys/kek-fence.repository.ts). */
  newGroupKey(groupId: string, version: number): Promise<{ wrapped: string; kekVersion: number; kekName: string; key: Buffer }>;
  groupKey(groupId: string, version: number, wrapped: string | null): Promise<Buffer>;
  /** A fresh device DEK (or field key) wrapped under the given parent key. */
  newDeviceKey(groupKey: Buffer, groupId: string, groupVersion: number, deviceId: string, version: number): { wrapped: Buffer; key: Buffer };
  /**
   * Fresh device DEKs for many devices at once, wrapped under the group key: the blobs of
   * `deviceIds[i]`, each WRAPPED_KEY_BYTES long and bound by its AAD to its own row, laid end to
   * end in one buffer. The plaintext keys are zeroed before this returns.
   */
  newDeviceKeys(groupKey: Buffer, groupId: string, groupVersion: number, deviceIds: readonly string[], version: number): Buffer;
  /**
   * A device DEK, unwrapped (or from the parent cache). `cacheAsParent: false` when it is the
   * leaf being delivered and not the parent of field keys: then the cache is neither asked nor
   * filled (for a 1,000-device bulk fetch the lookups were nearly all misses, and the inserts
   * churned the cache: issue 7).
   */
  deviceKey(groupKey: Buffer, groupId: string, groupVersion: number, deviceId: string, version: number, wrapped: Buffer | null, options?: { cacheAsParent?: boolean }): Buffer;
  newFieldKey(deviceKey: Buffer, deviceId: string, deviceVersion: number, field: string, version: number): { wrapped: Buffer; key: Buffer };
  fieldKey(deviceKey: Buffer, deviceId: string, deviceVersion: number, field: string, version: number, wrapped: Buffer | null): Buffer;
  readonly cache: KeyCache;
}

// the layout of crypto/aead.ts wrapKey: nonce (12) ‖ ciphertext (32) ‖ tag (16)
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
/** Length of one wrapped 32-byte key (crypto/aead.ts). */
export const WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES;

/**
 * wrapKey for a batch: the same AES-256-GCM wrap with a fresh random 96-bit nonce per blob and
 * the row's binding string as AAD, but the fresh keys and nonces come from ONE CSPRNG call and
 * the blobs are written straight into one buffer (two allocations a device less, and no
 * Buffer.concat). The random buffer (plaintext keys included) is zeroed before returning.
 */
export function wrapNewKeys(parentKey: Buffer, count: number, aadOf: (index: number) => string): Buffer {
  if (parentKey.length !== KEY_BYTES) throw new Error('AES-256 key must be 32 bytes');
  const random = crypto.randomBytes(count * (KEY_BYTES + NONCE_BYTES));
  const out = Buffer.allocUnsafe(count * WRAPPED_KEY_BYTES);
  try {
    for (let i = 0, r = 0, o = 0; i < count; i += 1, r += KEY_BYTES + NONCE_BYTES, o += WRAPPED_KEY_BYTES) {
      const nonce = random.subarray(r + KEY_BYTES, r + KEY_BYTES + NONCE_BYTES);
      const cipher = crypto.createCipheriv('aes-256-gcm', parentKey, nonce, { authTagLength: TAG_BYTES });
      cipher.setAAD(Buffer.from(aadOf(i), 'utf8'));
      const ciphertext = cipher.update(random.subarray(r, r + KEY_BYTES));
      cipher.final();
      if (ciphertext.length !== KEY_BYTES) throw new Error('AES-GCM returned an unexpected ciphertext length');
      out.set(nonce, o);
      out.set(ciphertext, o + NONCE_BYTES);
      out.set(cipher.getAuthTag(), o + NONCE_BYTES + KEY_BYTES);
    }
  } finally {
    random.fill(0);
  }
  return out;
}

export function createKeyMaterial(deps: { kek: KekProvider; cache: KeyCache; onUnwrapFailure?: (failure: UnwrapFailure) => void }): KeyMaterial {
  const { kek, cache } = deps;
  const failed = (keyId: string, version: number): never => {
    deps.onUnwrapFailure?.({ keyId, version });
    throw new UnwrapError(`Stored material of ${keyId} v${version} failed to unwrap`);
  };

  return {
    cache,
    async newGroupKey(groupId, version) {
      const key = generateKey();
      const wrapped = await kek.wrap(key, groupBinding(groupId, version, kek.keyName));
      return { wrapped, kekVersion: kekBlobVersion(wrapped), kekName: kek.keyName, key };
    },

    async groupKey(groupId, version, wrapped) {
      const cached = cache.get('group', groupId, version);
      if (cached) return cached;
      if (wrapped === null) return failed(`group:${groupId}`, version);
      let key: Buffer;
      try {
        key = await kek.unwrap(wrapped, groupBinding(groupId, version, kek.keyName));
      } catch (error) {
        if (error instanceof UnwrapError) failed(`group:${groupId}`, version);
        throw error;
      }
      cache.set('group', groupId, version, key);
      return key;
    },

    newDeviceKey(groupKey, groupId, groupVersion, deviceId, version) {
      const key = generateKey();
      return { key, wrapped: wrapKey(groupKey, key, deviceBinding(deviceId, version, groupId, groupVersion)) };
    },

    newDeviceKeys(groupKey, groupId, groupVersion, deviceIds, version) {
      return wrapNewKeys(groupKey, deviceIds.length, (i) => deviceBinding(deviceIds[i] as string, version, groupId, groupVersion));
    },

    deviceKey(groupKey, groupId, groupVersion, deviceId, version, wrapped, options) {
      const asParent = options?.cacheAsParent !== false;
      const cached = asParent ? cache.get('device', deviceId, version) : undefined;
      if (cached) return cached;
      if (wrapped === null) return failed(`device:${deviceId}`, version);
      let key: Buffer;
      try {
        key = unwrapKey(groupKey, wrapped, deviceBinding(deviceId, version, groupId, groupVersion));
      } catch (error) {
        if (error instanceof UnwrapError) failed(`device:${deviceId}`, version);
        throw error;
      }
      if (asParent) cache.set('device', deviceId, version, key);
      return key;
    },

    newFieldKey(deviceKey, deviceId, deviceVersion, field, version) {
      const key = generateKey();
      return { key, wrapped: wrapKey(deviceKey, key, fieldBinding(deviceId, field, version, deviceVersion)) };
    },

    fieldKey(deviceKey, deviceId, deviceVersion, field, version, wrapped) {
      if (wrapped === null) return failed(`field:${deviceId}/${field}`, version);
      try {
        return unwrapKey(deviceKey, wrapped, fieldBinding(deviceId, field, version, deviceVersion));
      } catch (error) {
        if (error instanceof UnwrapError) failed(`field:${deviceId}/${field}`, version);
        throw error;
      }
    },
  };
}
