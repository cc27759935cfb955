/**
 * Audit tables (owned by the audit module; migrations/20261121000200_audit.ts). Events and
 * checkpoints are append-only: their columns are not updatable, and the database refuses it too.
 */
import type { ColumnType, Generated } from 'kysely';

type Immutable<T, I = T> = ColumnType<T, I, never>;

/** One link of the keyed hash chain. */
export interface AuditEventsTable {
  /** 1, 2, 3, … with no gap */
  position: Immutable<number>;
  occurred_at: Immutable<Date, Date | string>;
  actor: Immutable<string>;
  action: Immutable<string>;
  outcome: Immutable<'success' | 'failure' | 'denied'>;
  key_id: Immutable<string | null>;
  /** inserted as JSON text cast to jsonb */
  details: Immutable<Record<string, unknown>, string>;
  request_id: Immutable<string | null>;
  /** hash of position - 1 (32 zero bytes for position 1) */
  prev_hash: Immutable<Buffer>;
  /** HMAC-SHA256(audit key, prev_hash ‖ canonical JSON of the event) */
  hash: Immutable<Buffer>;
}

/** The single row (id = 1) every writer locks: the last position and its hash (0 / zero hash when empty). */
export interface AuditChainHeadTable {
  id: ColumnType<number, number, never>;
  position: number;
  hash: Buffer;
}

export type AuditKeyPurpose = 'hmac' | 'checkpoint';

/** Audit keys, stored only wrapped by the KEK: the chain's HMAC key and the checkpoint signing key (PKCS#8). */
export interface AuditKeysTable {
  purpose: ColumnType<AuditKeyPurpose, AuditKeyPurpose, never>;
  version: ColumnType<number, number, never>;
  /** KEK blob (`vault:vN:…` / `local:vN:…`); never logged */
  wrapped_key: string;
  kek_version: number;
  created_at: ColumnType<Date, Date | string | undefined, never>;
}

/** A signed chain head: JWS (Ed25519) over {position, hash, time, kekName}. */
export interface AuditCheckpointsTable {
  id: Generated<number>;
  position: Immutable<number>;
  hash: Immutable<Buffer>;
  signed_at: Immutable<Date, Date | string>;
  kid: Immutable<string>;
  jws: Immutable<string>;
}

export interface AuditTables {
  audit_events: AuditEventsTable;
  audit_chain_head: AuditChainHeadTable;
  audit_keys: AuditKeysTable;
  audit_checkpoints: AuditCheckpointsTable;
}
