/**
 * Unwrapping the keys distribution needs, outside any transaction, through the hierarchy
 * (keys/key-material.ts: KEK → group DEK (cached) → device DEK (cached) → field key). Every
 * buffer returned belongs to the caller, who zeroes it once used.
 */
import type { Kysely } from 'kysely';
import type { DB } from '../db/database.js';
import type { KeyMaterial } from '../keys/key-material.js';
import * as repo from './distribution.repository.js';
import { distributionDb, type DistributionDB, type KeyKind } from './distribution.tables.js';

/** The material a message or an acknowledgement needs is gone (destroyed) or never existed. */
export class MaterialMissing extends Error {
  constructor(readonly what: string) {
    super(`${what} has no key material`);
  }
}

export interface DistributionKeys {
  groupOf(deviceId: string): Promise<string | undefined>;
  /** a device DEK version's key */
  deviceKey(groupId: string, deviceId: string, version: number): Promise<Buffer>;
  /** a device DEK or field key version's key */
  versionKey(groupId: string, deviceId: string, kind: KeyKind, field: string, version: number): Promise<Buffer>;
}

export function createDistributionKeys(deps: { db: Kysely<DB>; material: KeyMaterial }): DistributionKeys {
  let handle: Kysely<DistributionDB> | undefined;
  const db = () => (handle ??= distributionDb(deps.db));
  const { material } = deps;

  async function groupKey(groupId: string, version: number): Promise<Buffer> {
    const blob = await repo.findGroupVersionBlob(db(), groupId, version);
    if (blob === undefined || blob === null) throw new MaterialMissing(`group ${groupId} v${version}`);
    return material.groupKey(groupId, version, blob);
  }

  async function deviceKeyOf(groupId: string, deviceId: string, row: repo.MaterialRow | undefined, version: number): Promise<Buffer> {
    if (!row || row.wrapped_key === null) throw new MaterialMissing(`device ${deviceId} v${version}`);
    const parent = await groupKey(groupId, row.parent_version);
    try {
      return material.deviceKey(parent, groupId, row.parent_version, deviceId, row.version, row.wrapped_key);
    } finally {
      parent.fill(0);
    }
  }

  async function deviceKey(groupId: string, deviceId: string, version: number): Promise<Buffer> {
    return deviceKeyOf(groupId, deviceId, await repo.findDeviceVersionMaterial(db(), deviceId, version), version);
  }

  return {
    groupOf: (deviceId) => repo.findDeviceGroup(db(), deviceId),
    deviceKey,
    async versionKey(groupId, deviceId, kind, field, version) {
      if (kind === 'device') return deviceKey(groupId, deviceId, version);
      const row = await repo.findFieldVersionMaterial(db(), deviceId, field, version);
      if (!row || row.wrapped_key === null) throw new MaterialMissing(`field ${deviceId}/${field} v${version}`);
      const parent = await deviceKey(groupId, deviceId, row.parent_version);
      try {
        return material.fieldKey(parent, deviceId, row.parent_version, field, row.version, row.wrapped_key);
      } finally {
        parent.fill(0);
      }
    },
  };
}
