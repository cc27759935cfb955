/**
 * Table types of the key hierarchy. Each feature's tables are declared next to its data
 * access (audit/audit.tables.ts, kek/kek.tables.ts) and joined into one `DB` in db/database.ts.
 */
import type { ColumnType } from 'kysely';

type Timestamp = ColumnType<Date, Date | string, Date | string>;
/** a timestamp column with a database default */
type DefaultedTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;
/** a nullable column that inserts may omit */
type Optional<T, W = T> = ColumnType<T | null, W | null | undefined, W | null>;
type OptionalTimestamp = Optional<Date, Date | string>;

export type VersionState =
  | 'pending'
  | 'primary'
  | 'grace'
  | 'decrypt_only'
  | 'disabled'
  | 'destroy_scheduled'
  | 'destroyed';

export interface KeyGroupsTable {
  id: string;
  device_type: string;
  region: string;
  created_at: DefaultedTimestamp;
}

/** A group DEK version: 32 bytes wrapped by the KEK (provider blob, e.g. `vault:v3:…`). */
export interface GroupVersionsTable {
  group_id: string;
  version: number;
  state: VersionState;
  /** null once destroyed */
  wrapped_key: string | null;
  kek_version: number;
  created_at: DefaultedTimestamp;
  state_changed_at: DefaultedTimestamp;
  /** when the current state ends (grace end, destruction time), if it does */
  state_until: Timestamp | null;
}

export interface DevicesTable {
  id: string;
  group_id: string;
  created_at: DefaultedTimestamp;
  /** crypto-shred requested: when it becomes final (null when not being destroyed) */
  destroy_after: OptionalTimestamp;
}

/** A device DEK version: `nonce ‖ ciphertext ‖ tag` under one group DEK version. */
export interface DeviceVersionsTable {
  device_id: string;
  version: number;
  state: VersionState;
  wrapped_key: Buffer | null;
  parent_version: number;
  created_at: DefaultedTimestamp;
  state_changed_at: DefaultedTimestamp;
  state_until: Timestamp | null;
  /** the state before a crypto-shred request moved it to destroy_scheduled (restore puts it back) */
  state_before_destroy: Optional<VersionState>;
  state_until_before_destroy: OptionalTimestamp;
}

export interface FieldKeysTable {
  device_id: string;
  field: string;
  created_at: DefaultedTimestamp;
}

/** A field key version: `nonce ‖ ciphertext ‖ tag` under one device DEK version. */
export interface FieldVersionsTable {
  device_id: string;
  field: string;
  version: number;
  state: VersionState;
  wrapped_key: Buffer | null;
  parent_version: number;
  created_at: DefaultedTimestamp;
  state_changed_at: DefaultedTimestamp;
  state_until: Timestamp | null;
  /** the state before a crypto-shred request moved it to destroy_scheduled (restore puts it back) */
  state_before_destroy: Optional<VersionState>;
  state_until_before_destroy: OptionalTimestamp;
}

/** A backend service and the public key its deliveries are encrypted to. */
export interface ClientsTable {
  id: string;
  delivery_jwk: string; // JSON text of the public JWK
  delivery_kid: string; // RFC 7638 thumbprint
  created_at: DefaultedTimestamp;
  updated_at: DefaultedTimestamp;
}

export interface HierarchyTables {
  key_groups: KeyGroupsTable;
  group_versions: GroupVersionsTable;
  devices: DevicesTable;
  device_versions: DeviceVersionsTable;
  field_keys: FieldKeysTable;
  field_versions: FieldVersionsTable;
  clients: ClientsTable;
}
