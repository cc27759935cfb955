/**
 * Rotation debt of one group (DESIGN §3, GET /v1/groups/{id}/rotation-status): per level the
 * versions in each state, the children still wrapped under old parent versions, and what keeps
 * each old group version from being retired (children, retention, waiting period), and per
 * level the active staggered rollout with the devices still on keys older than its start, and
 * the devices that have not acknowledged keys sent to them over MQTT (awaiting-ack.ts).
 * Read-only; no key material is read.
 */
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import { NotFoundError } from '../http/errors.js';
import type { KekProvider } from '../kek/kek.types.js';
import * as keys from '../keys/key.repository.js';
import { VERSION_STATES } from '../keys/lifecycle.js';
import { awaitingAckOf, type AwaitingAckView } from './awaiting-ack.js';
import { inMaintenanceWindow } from './maintenance-window.js';
import { addDays } from './policy.defaults.js';
import type { PolicyService } from './policy.service.js';
import * as repo from './rotation.repository.js';
import * as rollouts from './rollout.repository.js';
import { rolloutDb } from './rollout.tables.js';
import { rotationDb, type RotationDB } from './rotation.tables.js';
import type { RotationStatusView } from './rotation.schemas.js';

export type RetireBlocker = 'children' | 'retention' | 'kept_by_policy' | 'waiting_period';

export function createRotationStatusService(deps: { db: Kysely<DB>; kek: Pick<KekProvider, 'info' | 'keyName'>; clock: Clock; policies: Pick<PolicyService, 'effectivePolicy'> }) {
  const { clock, policies } = deps;
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));

  async function status(groupId: string): Promise<RotationStatusView> {
    if (!(await keys.findGroup(deps.db, groupId))) throw new NotFoundError(`Group ${groupId} not found`);
    const now = clock.now();
    const policy = await policies.effectivePolicy(groupId);
    const [info, versions, children, deviceStates, fieldStates, fieldParents, due] = await Promise.all([
      deps.kek.info(),
      repo.listGroupVersionStates(db(), [groupId]),
      repo.countChildrenByParent(db(), groupId),
      repo.countDeviceVersionsByState(db(), groupId),
      repo.countFieldVersionsByState(db(), groupId),
      repo.countFieldChildrenByParentState(db(), groupId),
      repo.countDuePrimaries(db(), [
        { groupId, device: addDays(now, -policy.device.rotationPeriodDays), field: addDays(now, -policy.field.rotationPeriodDays) },
      ]),
    ]);
    const primary = versions.find((v) => v.state === 'primary');
    const retention = policy.group.retentionDays;

    const groupVersions = versions.map((v) => {
      const childCount = children.get(v.version) ?? 0;
      const blockedBy: RetireBlocker[] = [];
      let retentionEndsAt: string | null = null;
      if (v.state !== 'primary' && v.state !== 'destroyed') {
        if (childCount > 0) blockedBy.push('children');
        if (v.state === 'decrypt_only') {
          if (retention === null) blockedBy.push('kept_by_policy');
          else {
            const ends = addDays(v.state_changed_at, retention);
            retentionEndsAt = ends.toISOString();
            if (now < ends) blockedBy.push('retention');
          }
        }
        if (v.state === 'destroy_scheduled' && v.state_until !== null && now < v.state_until) blockedBy.push('waiting_period');
      }
      return {
        version: v.version,
        state: v.state,
        kekVersion: v.kek_version,
        createdAt: v.created_at.toISOString(),
        stateChangedAt: v.state_changed_at.toISOString(),
        stateUntil: v.state_until ? v.state_until.toISOString() : null,
        deviceVersionsWrapped: childCount,
        retirement: v.state === 'primary' || v.state === 'destroyed' ? null : { blockedBy, retentionEndsAt, destroyAfter: v.state === 'destroy_scheduled' && v.state_until ? v.state_until.toISOString() : null },
      };
    });

    const underOld = [...children].filter(([parent]) => parent !== primary?.version).reduce((sum, [, n]) => sum + n, 0);
    let fieldsUnderOld = 0;
    let oldDeviceVersionsWithFields = 0;
    for (const [state, counts] of fieldParents) {
      if (state === 'primary') continue;
      fieldsUnderOld += counts.fieldVersions;
      oldDeviceVersionsWithFields += counts.deviceVersions;
    }
    const dueCounts = due.get(groupId) ?? { devices: 0, fields: 0 };
    const [deviceRollout, fieldRollout] = await Promise.all((['device', 'field'] as const).map((level) => activeRollout(groupId, level)));
    // issue 6: keys sent to devices over MQTT and not acknowledged yet
    const [deviceAcks, fieldAcks] = await Promise.all((['device', 'field'] as const).map((kind) => awaitingAckOf(deps.db, groupId, { kind })));

    return {
      groupId,
      at: now.toISOString(),
      inMaintenanceWindow: inMaintenanceWindow(policy.maintenanceWindows, now),
      policy: { group: policy.group, device: policy.device, field: policy.field, maintenanceWindows: policy.maintenanceWindows },
      kek: {
        name: deps.kek.keyName,
        latestVersion: info.latestVersion,
        minDecryptionVersion: info.minDecryptionVersion,
        groupVersionsBelowLatest: versions.filter((v) => v.has_material && v.kek_version < info.latestVersion).length,
      },
      group: {
        primaryVersion: primary?.version ?? null,
        rotationDueAt: primary ? addDays(primary.created_at, policy.group.rotationPeriodDays).toISOString() : null,
        states: stateCounts(new Map(countBy(versions.map((v) => v.state)))),
        versions: groupVersions,
      },
      devices: {
        states: stateCounts(deviceStates),
        wrappedUnderOldGroupVersions: underOld,
        primariesDueForRotation: dueCounts.devices,
        oldVersionsWithFieldKeys: oldDeviceVersionsWithFields,
        rollout: deviceRollout ?? null,
        awaitingAck: deviceAcks as AwaitingAckView,
      },
      fields: {
        states: stateCounts(fieldStates),
        wrappedUnderOldDeviceVersions: fieldsUnderOld,
        primariesDueForRotation: dueCounts.fields,
        rollout: fieldRollout ?? null,
        awaitingAck: fieldAcks as AwaitingAckView,
      },
    };
  }

  /** The level's active rollout and how many devices are still on keys older than its start. */
  async function activeRollout(groupId: string, level: 'device' | 'field') {
    const ex = rolloutDb(deps.db);
    const r = await rollouts.findActiveRollout(ex, groupId, level);
    if (!r) return undefined;
    return {
      rolloutId: r.id,
      state: r.state as 'running' | 'paused' | 'halted' | 'rolling_back', // findActiveRollout returns only these
      startedAt: r.started_at.toISOString(),
      devicesOnOldVersions: await rollouts.countOnOldVersions(ex, r),
    };
  }

  return { status };
}

export type RotationStatusService = ReturnType<typeof createRotationStatusService>;

function countBy<T>(items: readonly T[]): Array<[T, number]> {
  const out = new Map<T, number>();
  for (const item of items) out.set(item, (out.get(item) ?? 0) + 1);
  return [...out];
}

function stateCounts(counts: Map<VersionState, number>): Record<VersionState, number> {
  return Object.fromEntries(VERSION_STATES.map((s) => [s, counts.get(s) ?? 0])) as Record<VersionState, number>;
}
