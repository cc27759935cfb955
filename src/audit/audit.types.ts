/**
 * What the rest of keystrata needs from the audit log. Every change writes its events through
 * `record(trx, …)` inside its own transaction (fail closed: if the audit write fails, the
 * change rolls back). Reads (key deliveries) go through `recordRead`, which group-commits
 * events from many requests into one transaction and resolves only once they are committed.
 *
 * Never put key material, tokens or wrapped blobs in an event: ids, versions and states only.
 */
import type { Executor } from '../db/database.js';

export type AuditOutcome = 'success' | 'failure' | 'denied';

export interface AuditEventInput {
  /** who: `sub` of the token, `system:rotation`, `cli`, or `anonymous` */
  actor: string;
  /** what, dotted: `group.create`, `device.enrol`, `key.deliver`, `auth.failed`, … */
  action: string;
  outcome: AuditOutcome;
  /** the key concerned: `group:<id>`, `device:<id>`, `field:<deviceId>/<field>`, `client:<id>`, `kek:<name>` */
  keyId?: string | undefined;
  /** anything else non-secret: versions, states, counts, delivery key id, reason */
  details?: Record<string, unknown> | undefined;
  requestId?: string | undefined;
}

export interface AuditSink {
  /** Append events inside the caller's transaction (one chain-head lock per transaction). */
  record(trx: Executor, events: ReadonlyArray<AuditEventInput>): Promise<void>;
  /** Append events of a read outside any transaction; resolves once committed (group commit). */
  recordRead(events: ReadonlyArray<AuditEventInput>): Promise<void>;
}
