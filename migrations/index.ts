/**
 * The list of migrations, in order. Imported statically (not read from the folder at run time)
 * so the same list runs under tsx, vitest and the compiled image. Add a line per new migration.
 */
import type { Migration } from 'kysely';
import * as hierarchy from './20261121000100_hierarchy.js';
import * as localKek from './20261121000150_local_kek.js';
import * as audit from './20261121000200_audit.js';
import * as versionRestore from './20261121000300_version_restore.js';
import * as idempotency from './20261121000500_idempotency.js';
import * as rotationPolicies from './20261121000400_rotation_policies.js';
import * as distribution from './20261121000600_distribution.js';
import * as rollouts from './20261121000700_rollouts.js';
import * as graceRequiresAck from './20261121000800_grace_requires_ack.js';
import * as auditBulk from './20261121000900_audit_bulk.js';
import * as inlineRolloutBucket from './20261121001000_inline_rollout_bucket.js';
import * as auditAppendIfHead from './20261122000100_audit_append_if_head.js';
import * as auditLinksWindow from './20261121001300_audit_links_window.js';

export const migrations: Record<string, Migration> = {
  '20261121000100_hierarchy': hierarchy,
  '20261121000150_local_kek': localKek,
  '20261121000200_audit': audit,
  '20261121000300_version_restore': versionRestore,
  '20261121000400_rotation_policies': rotationPolicies,
  '20261121000500_idempotency': idempotency,
  '20261121000600_distribution': distribution,
  '20261121000700_rollouts': rollouts,
  '20261121000800_grace_requires_ack': graceRequiresAck,
  '20261121000900_audit_bulk': auditBulk,
  '20261121001000_inline_rollout_bucket': inlineRolloutBucket,
  '20261121001300_audit_links_window': auditLinksWindow,
  '20261122000100_audit_append_if_head': auditAppendIfHead,
};
