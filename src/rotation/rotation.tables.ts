/**
 * Tables of the rotation module (migrations/20261121000400_rotation_policies.ts). They are
 * joined to the shared `DB` type with Kysely's `withTables`, so db/database.ts stays untouched.
 * No key material in any of them.
 */
import type { ColumnType, Kysely, Transaction } from 'kysely';
import type { DB } from '../db/database.js';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
type DefaultedTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;
/** jsonb: written as JSON text, read back parsed */
type Json<T> = ColumnType<T, string, string>;

export type PolicyLevel = 'kek' | 'group' | 'device' | 'field';

export interface RotationPoliciesTable {
  level: PolicyLevel;
  rotation_period_days: number;
  grace_period_days: number;
  retention_days: number | null;
  destruction_wait_days: number;
  percent_per_day: number | null;
  halt_threshold: number | null;
  /** migrations/20261121000800_grace_requires_ack.ts: device and field levels only (null for kek and group) */
  grace_requires_ack: boolean | null;
  grace_ack_max_hold_days: number | null;
  updated_at: DefaultedTimestamp;
  updated_by: string;
}

export interface GroupPoliciesTable {
  group_id: string;
  overrides: Json<unknown>;
  maintenance_windows: Json<unknown>;
  updated_at: DefaultedTimestamp;
  updated_by: string;
}

export interface KekVersionsTable {
  kek_name: string;
  version: number;
  became_latest_at: Timestamp;
  source: 'rotated' | 'observed';
}

export interface RotationLeasesTable {
  name: string;
  holder: string;
  expires_at: Timestamp;
}

// a type alias, not an interface: withTables wants an index-signature-compatible record
export type RotationTables = {
  rotation_policies: RotationPoliciesTable;
  group_policies: GroupPoliciesTable;
  kek_versions: KekVersionsTable;
  rotation_leases: RotationLeasesTable;
};

export type RotationDB = DB & RotationTables;
export type RotationExecutor = Kysely<RotationDB> | Transaction<RotationDB>;

/** The shared handle, typed with the rotation tables too. */
export function rotationDb(db: Kysely<DB>): Kysely<RotationDB> {
  return db.withTables<RotationTables>() as unknown as Kysely<RotationDB>;
}
