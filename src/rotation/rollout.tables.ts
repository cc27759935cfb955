/**
 * Tables of staggered rollouts (migrations/20261121000700_rollouts.ts), joined to the shared
 * `DB` type with Kysely's `withTables` like the other rotation tables. No key material in any.
 */
import type { ColumnType, Kysely, Transaction } from 'kysely';
import type { DB } from '../db/database.js';
import type { RotationTables } from './rotation.tables.js';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
type OptionalTimestamp = ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
type Counter = ColumnType<number, number | undefined, number>;
/** jsonb: written as JSON text, read back parsed */
type Json<T> = ColumnType<T | null, string | null | undefined, string | null>;

export type RolloutLevel = 'device' | 'field';
export type RolloutState = 'running' | 'paused' | 'halted' | 'rolling_back' | 'rolled_back' | 'cancelled' | 'completed';
export type WaveKind = 'canary' | 'wave' | 'sweep';
export type WaveState = 'scheduled' | 'running' | 'completed' | 'halted' | 'rolling_back' | 'rolled_back' | 'cancelled';
export type ItemStatus = 'pending' | 'done' | 'failed' | 'skipped' | 'rolled_back' | 'rollback_failed';

/** States in which a rollout holds its group and level (one at a time). */
export const ACTIVE_ROLLOUT_STATES: readonly RolloutState[] = ['running', 'paused', 'halted', 'rolling_back'];

export interface RolloutsTable {
  id: string;
  group_id: string;
  level: RolloutLevel;
  field: string | null;
  state: RolloutState;
  reason: 'manual' | 'policy';
  percent_per_day: number;
  canary_percent: number | null;
  wave_interval_seconds: number;
  halt_threshold: number;
  rollback_on_halt: boolean;
  bucket_offset: number;
  wave_count: number;
  started_at: Timestamp;
  paused_ms: Counter;
  paused_at: OptionalTimestamp;
  halted_wave: number | null;
  halt_reason: string | null;
  finished_at: OptionalTimestamp;
  created_by: string;
  created_at: Timestamp;
  updated_at: Timestamp;
}

export interface RolloutWavesTable {
  rollout_id: string;
  wave: number;
  kind: WaveKind;
  bucket_from: number;
  bucket_to: number;
  state: WaveState;
  listed_to: number;
  devices: Counter;
  done: Counter;
  failed: Counter;
  skipped: Counter;
  rolled_back: Counter;
  rollback_failed: Counter;
  base_done: Counter;
  base_failed: Counter;
  started_at: OptionalTimestamp;
  finished_at: OptionalTimestamp;
}

/** [field, from version (null: there was no primary), to version] */
export type ItemFieldRotation = [string, number | null, number];

export interface RolloutItemsTable {
  rollout_id: string;
  device_id: string;
  wave: number;
  status: ItemStatus;
  from_version: number | null;
  to_version: number | null;
  fields: Json<ItemFieldRotation[]>;
  reason: string | null;
  updated_at: Timestamp;
}

// a type alias, not an interface: withTables wants an index-signature-compatible record
export type RolloutTables = {
  rollouts: RolloutsTable;
  rollout_waves: RolloutWavesTable;
  rollout_items: RolloutItemsTable;
};

export type RolloutDB = DB & RotationTables & RolloutTables;
export type RolloutExecutor = Kysely<RolloutDB> | Transaction<RolloutDB>;

/** The shared handle, typed with the rollout (and rotation) tables too. */
export function rolloutDb(db: Kysely<DB>): Kysely<RolloutDB> {
  return db.withTables<RotationTables & RolloutTables>() as unknown as Kysely<RolloutDB>;
}
