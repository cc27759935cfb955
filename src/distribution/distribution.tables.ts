/**
 * Tables of key distribution (migrations/20261121000600_distribution.ts), joined to the shared
 * `DB` type with Kysely's `withTables` (as rotation/ does), so db/database.ts stays untouched.
 * No key material in either table.
 */
import type { ColumnType, Generated, Kysely, Transaction } from 'kysely';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
type DefaultedTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;
type Nullable<T, W = T> = ColumnType<T | null, W | null | undefined, W | null>;

export type KeyKind = 'device' | 'field';
export type OutboxStatus = 'pending' | 'published' | 'dropped';

export interface KeyOutboxTable {
  /** bigserial: read back as a JS number (db/database.ts parses int8; ids stay far below 2^53) */
  id: Generated<number>;
  device_id: string;
  kind: KeyKind;
  /** '' for a device DEK */
  field: ColumnType<string, string | undefined, string>;
  version: number;
  state: VersionState;
  not_before: Nullable<Date, Date | string>;
  wrapped_by: number;
  with_key: boolean;
  status: ColumnType<OutboxStatus, OutboxStatus | undefined, OutboxStatus>;
  attempts: ColumnType<number, number | undefined, number>;
  next_attempt_at: DefaultedTimestamp;
  lease_owner: Nullable<string>;
  lease_until: Nullable<Date, Date | string>;
  last_error: Nullable<string>;
  created_at: DefaultedTimestamp;
  published_at: Nullable<Date, Date | string>;
}

export interface KeyAcksTable {
  device_id: string;
  kind: KeyKind;
  /** '' for a device DEK */
  field: ColumnType<string, string | undefined, string>;
  version: number;
  acknowledged_at: Timestamp;
}

// a type alias (not an interface): withTables needs its implicit index signature
export type DistributionTables = {
  key_outbox: KeyOutboxTable;
  key_acks: KeyAcksTable;
};

export type DistributionDB = DB & DistributionTables;
export type DistributionExecutor = Kysely<DistributionDB> | Transaction<DistributionDB>;

/** The shared handle (or a caller's transaction), typed with the distribution tables too. */
export function distributionDb<E extends Kysely<DB>>(ex: E): E extends Transaction<DB> ? Transaction<DistributionDB> : Kysely<DistributionDB> {
  return ex.withTables<DistributionTables>() as never;
}
