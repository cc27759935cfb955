/**
 * Built-in default policies (DESIGN §3), used for a level until PUT /v1/policies stores one.
 *
 *   kek     rotated yearly. Grace 30 d: min_decryption_version is raised no sooner than 30 days
 *           after the version that replaced the old one, so a database backup taken just before
 *           the rewrap can still be restored and read. KEK versions are never destroyed by
 *           keystrata (trim them in Vault), so no retention.
 *   group   rotated quarterly. No grace: nothing but keystrata encrypts with a group DEK, and
 *           once it is rotated every new device DEK is wrapped under the new one, so the old
 *           version goes straight to `decrypt_only`. Retention 30 d: an old version nobody is
 *           wrapped under any more is destroyed 30 days (plus the waiting period) after it stopped
 *           being primary.
 *   device  monthly, 10 % of the fleet a day, halt above 1 % failures; grace 7 d (devices cache
 *           the old and the new key); old versions are kept (data encrypted under them stays
 *           readable) until an operator sets a retention.
 *   field   weekly, 20 % a day (a rollout must finish inside the week), grace 2 d, kept.
 *
 * Device and field levels also wait for acknowledgements (graceRequiresAck): a version whose
 * grace has ended stays in grace while its successor was sent to the device over MQTT and not
 * acknowledged, for at most graceAckMaxHoldDays (30) after the grace's end, then moves on anyway
 * (a dead device must not freeze rotation). null for kek and group: nothing is sent to devices.
 */
import type { PolicyLevel } from './rotation.tables.js';
import type { LevelPolicy } from './policy.schemas.js';

export const POLICY_LEVELS: readonly PolicyLevel[] = ['kek', 'group', 'device', 'field'];

export const BUILT_IN_POLICIES: Readonly<Record<PolicyLevel, Readonly<LevelPolicy>>> = Object.freeze({
  kek: { rotationPeriodDays: 365, gracePeriodDays: 30, retentionDays: null, destructionWaitDays: 7, percentPerDay: null, haltThreshold: null, graceRequiresAck: null, graceAckMaxHoldDays: null },
  group: { rotationPeriodDays: 90, gracePeriodDays: 0, retentionDays: 30, destructionWaitDays: 7, percentPerDay: null, haltThreshold: null, graceRequiresAck: null, graceAckMaxHoldDays: null },
  device: { rotationPeriodDays: 30, gracePeriodDays: 7, retentionDays: null, destructionWaitDays: 7, percentPerDay: 10, haltThreshold: 0.01, graceRequiresAck: true, graceAckMaxHoldDays: 30 },
  field: { rotationPeriodDays: 7, gracePeriodDays: 2, retentionDays: null, destructionWaitDays: 7, percentPerDay: 20, haltThreshold: 0.01, graceRequiresAck: true, graceAckMaxHoldDays: 30 },
});

export const DAY_MS = 24 * 60 * 60 * 1000;
export const addDays = (at: Date, days: number): Date => new Date(at.getTime() + days * DAY_MS);
