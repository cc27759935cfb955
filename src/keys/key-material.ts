/**
 * Walking the hierarchy: new key material is generated and wrapped under its parent, stored
 * material is unwrapped parent by parent (KEK → group → device → field). Unwrapped group and
 * device DEKs are cached (keys/key-cache.ts); field keys are leaves and never cached.
 * Every wrap and unwrap binds the blob to its row (crypto/binding.ts).
 */
import { generateKey, unwrapKey, wrapKey } from '../crypto/aead.js';
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
  deviceKey(groupKey: Buffer, groupId: string, groupVersion: number, deviceId: string, version: number, wrapped: Buffer | null): Buffer;
  newFieldKey(deviceKey: Buffer, deviceId: string, deviceVersion: number, field: string, version: number): { wrapped: Buffer; key: Buffer };
  fieldKey(deviceKey: Buffer, deviceId: string, deviceVersion: number, field: string, version: number, wrapped: Buffer | null): Buffer;
  readonly cache: KeyCache;
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

    deviceKey(groupKey, groupId, groupVersion, deviceId, version, wrapped) {
      const cached = cache.get('device', deviceId, version);
      if (cached) return cached;
      if (wrapped === null) return failed(`device:${deviceId}`, version);
      let key: Buffer;
      try {
        key = unwrapKey(groupKey, wrapped, deviceBinding(deviceId, version, groupId, groupVersion));
      } catch (error) {
        if (error instanceof UnwrapError) failed(`device:${deviceId}`, version);
        throw error;
      }
      cache.set('device', deviceId, version, key);
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
