/**
 * Builds the sealed key-update message of one outbox row at publish time (transport.ts has the
 * format): the row's key, if it carries one, sealed under the device DEK version the row names.
 * Keys are unwrapped only for the moment of sealing and zeroed right after.
 *
 * If that transport version has lost its material since the row was written (destroyed during
 * a long outage), the newest device DEK version the device has acknowledged is used instead.
 * A row that can never be built (its own key destroyed, or no transport key left) is dropped:
 * thrown as `DropRow`, so the device's next row can follow.
 */
import type { Kysely } from 'kysely';
import type { DB } from '../db/database.js';
import { MaterialMissing, type DistributionKeys } from './distribution.keys.js';
import * as repo from './distribution.repository.js';
import { distributionDb, type DistributionDB } from './distribution.tables.js';
import { sealKeyUpdate, type KeyUpdateMessage } from './transport.js';

export class DropRow extends Error {
  constructor(readonly reason: 'device_missing' | 'key_destroyed' | 'no_transport_key') {
    super(`outbox row dropped: ${reason}`);
  }
}

export interface BuiltMessage {
  message: KeyUpdateMessage;
  /** the device DEK version actually used (the row's, or the acknowledged fallback) */
  wrappedBy: number;
}

export function createMessageBuilder(deps: { db: Kysely<DB>; keys: DistributionKeys }) {
  let handle: Kysely<DistributionDB> | undefined;
  const db = () => (handle ??= distributionDb(deps.db));
  const { keys } = deps;

  return {
    async build(row: repo.ClaimedRow): Promise<BuiltMessage> {
      const groupId = await keys.groupOf(row.device_id);
      if (groupId === undefined) throw new DropRow('device_missing');
      let wrappedBy = row.wrapped_by;
      let wrappingKey: Buffer | undefined;
      let key: Buffer | null = null;
      try {
        try {
          wrappingKey = await keys.deviceKey(groupId, row.device_id, wrappedBy);
        } catch (error) {
          if (!(error instanceof MaterialMissing)) throw error;
          const fallback = await repo.newestAcknowledgedDeviceVersion(db(), row.device_id, row.kind === 'device' ? row.version : 0);
          if (fallback === undefined) throw new DropRow('no_transport_key');
          wrappedBy = fallback;
          wrappingKey = await keys.deviceKey(groupId, row.device_id, wrappedBy);
        }
        if (row.with_key) {
          try {
            key = await keys.versionKey(groupId, row.device_id, row.kind, row.field, row.version);
          } catch (error) {
            if (error instanceof MaterialMissing) throw new DropRow('key_destroyed');
            throw error;
          }
        }
        const message = sealKeyUpdate(
          {
            id: row.id,
            deviceId: row.device_id,
            kind: row.kind,
            field: row.kind === 'field' ? row.field : undefined,
            version: row.version,
            state: row.state,
            notBefore: row.not_before,
            wrappedBy,
          },
          wrappingKey,
          key,
        );
        return { message, wrappedBy };
      } finally {
        wrappingKey?.fill(0);
        key?.fill(0);
      }
    },
  };
}

export type MessageBuilder = ReturnType<typeof createMessageBuilder>;
