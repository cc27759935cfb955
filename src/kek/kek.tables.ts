/**
 * Tables of the `local` KEK provider: non-secret state only (versions, minimum versions,
 * creation times, a check value of the root key). Key material is never stored: every version
 * key is derived from the root key on demand (kek/local.provider.ts).
 */
import type { ColumnType } from 'kysely';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
/** a timestamp column with a database default */
type DefaultedTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;

export interface KekLocalKeysTable {
  name: string;
  latest_version: number;
  min_decryption_version: number;
  /** 0 = no minimum (transit semantics) */
  min_encryption_version: number;
  /** HMAC-SHA256(root key, fixed label), truncated: detects a changed root key at start-up. */
  root_key_check: string;
  created_at: DefaultedTimestamp;
  updated_at: DefaultedTimestamp;
}

export interface KekLocalVersionsTable {
  key_name: string;
  version: number;
  created_at: Timestamp;
}

export interface KekTables {
  kek_local_keys: KekLocalKeysTable;
  kek_local_versions: KekLocalVersionsTable;
}
