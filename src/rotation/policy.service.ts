/**
 * Rotation policies (DESIGN §3): a default per level (built in until PUT /v1/policies stores
 * one), and per group a partial override plus maintenance windows. `effectivePolicy(groupId)`
 * is what every rotation decision reads: defaults, with the group's override on top.
 * Every change is audited (`policy.change`) in its own transaction.
 */
import { Value } from '@sinclair/typebox/value';
import type { Kysely } from 'kysely';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB, Executor } from '../db/database.js';
import { BadRequestError, NotFoundError } from '../http/errors.js';
import * as keys from '../keys/key.repository.js';
import type { Actor } from '../keys/key.service.js';
import { validateWindows } from './maintenance-window.js';
import { BUILT_IN_POLICIES, POLICY_LEVELS } from './policy.defaults.js';
import * as repo from './policy.repository.js';
import {
  GroupPolicyOverrides,
  MaintenanceWindow,
  type GroupPolicyView,
  type LevelPolicy,
  type LevelPolicyPatch,
  type PoliciesView,
  type PutGroupPolicyBody,
  type PutPoliciesBody,
} from './policy.schemas.js';
import { rotationDb, type PolicyLevel, type RotationDB } from './rotation.tables.js';

export interface EffectivePolicy {
  kek: LevelPolicy;
  group: LevelPolicy;
  device: LevelPolicy;
  field: LevelPolicy;
  /** empty: cron may start this group's rotations at any time */
  maintenanceWindows: MaintenanceWindow[];
}

export type GroupLevel = 'group' | 'device' | 'field';
const GROUP_LEVELS: readonly GroupLevel[] = ['group', 'device', 'field'];

export interface PolicyService {
  getPolicies(): Promise<PoliciesView>;
  putPolicies(who: Actor, body: PutPoliciesBody): Promise<PoliciesView>;
  getGroupPolicy(groupId: string): Promise<GroupPolicyView>;
  putGroupPolicy(who: Actor, groupId: string, body: PutGroupPolicyBody): Promise<GroupPolicyView>;
  /** Defaults with the group's override on top (no group: the defaults). */
  effectivePolicy(groupId?: string): Promise<EffectivePolicy>;
  /** The same for many groups in two queries (cron). */
  effectivePolicies(groupIds: readonly string[]): Promise<Map<string, EffectivePolicy>>;
}

export function createPolicyService(deps: { db: Kysely<DB>; audit: AuditSink; clock: Clock }): PolicyService {
  const { audit, clock } = deps;
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));
  const event = (who: Actor, e: Omit<AuditEventInput, 'actor' | 'requestId'>): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });

  async function defaults(ex: Parameters<typeof repo.listPolicies>[0], forUpdate = false): Promise<Map<PolicyLevel, repo.PolicyRow>> {
    const rows = await repo.listPolicies(ex, { forUpdate });
    return new Map(rows.map((r) => [r.level, r]));
  }

  function toLevel(level: PolicyLevel, row: repo.PolicyRow | undefined): LevelPolicy {
    if (!row) return { ...BUILT_IN_POLICIES[level] };
    return {
      rotationPeriodDays: row.rotation_period_days,
      gracePeriodDays: row.grace_period_days,
      retentionDays: row.retention_days,
      destructionWaitDays: row.destruction_wait_days,
      percentPerDay: row.percent_per_day,
      haltThreshold: row.halt_threshold,
      graceRequiresAck: row.grace_requires_ack,
      graceAckMaxHoldDays: row.grace_ack_max_hold_days,
    };
  }

  function toView(rows: Map<PolicyLevel, repo.PolicyRow>): PoliciesView {
    const view = (level: PolicyLevel) => {
      const row = rows.get(level);
      return {
        ...toLevel(level, row),
        source: row ? ('stored' as const) : ('built-in' as const),
        updatedAt: row ? row.updated_at.toISOString() : null,
        updatedBy: row ? row.updated_by : null,
      };
    };
    return { kek: view('kek'), group: view('group'), device: view('device'), field: view('field') };
  }

  async function getPolicies(): Promise<PoliciesView> {
    return toView(await defaults(db()));
  }

  async function putPolicies(who: Actor, body: PutPoliciesBody): Promise<PoliciesView> {
    const now = clock.now();
    await db()
      .transaction()
      .execute(async (trx) => {
        const current = await defaults(trx, true);
        const before: Partial<Record<PolicyLevel, LevelPolicy>> = {};
        const after: Partial<Record<PolicyLevel, LevelPolicy>> = {};
        for (const level of POLICY_LEVELS) {
          const patch = body[level];
          if (!patch) continue;
          const old = toLevel(level, current.get(level));
          const next = { ...old, ...patch };
          validateLevel(level, next, `body.${level}`);
          before[level] = old;
          after[level] = next;
          await repo.upsertPolicy(trx, {
            level,
            rotation_period_days: next.rotationPeriodDays,
            grace_period_days: next.gracePeriodDays,
            retention_days: next.retentionDays,
            destruction_wait_days: next.destructionWaitDays,
            percent_per_day: next.percentPerDay,
            halt_threshold: next.haltThreshold,
            grace_requires_ack: next.graceRequiresAck,
            grace_ack_max_hold_days: next.graceAckMaxHoldDays,
            updated_at: now,
            updated_by: who.actor,
          });
        }
        await audit.record(trx as unknown as Executor, [event(who, { action: 'policy.change', outcome: 'success', details: { scope: 'default', before, after } })]);
      });
    return getPolicies();
  }

  function parseOverrides(row: repo.GroupPolicyRow | undefined): { overrides: GroupPolicyOverrides; maintenanceWindows: MaintenanceWindow[] } {
    if (!row) return { overrides: {}, maintenanceWindows: [] };
    const overrides = row.overrides;
    const windows = row.maintenance_windows;
    // written only by this service, checked again on the way out: a hand-edited row must not steer rotation
    if (!Value.Check(GroupPolicyOverrides, overrides) || !Array.isArray(windows) || !windows.every((w) => Value.Check(MaintenanceWindow, w))) {
      throw new Error(`The stored rotation policy of group ${row.group_id} is not valid`);
    }
    return { overrides, maintenanceWindows: windows };
  }

  function merge(base: Map<PolicyLevel, repo.PolicyRow>, overrides: GroupPolicyOverrides, windows: MaintenanceWindow[]): EffectivePolicy {
    const level = (l: GroupLevel) => ({ ...toLevel(l, base.get(l)), ...(overrides[l] ?? {}) });
    return { kek: toLevel('kek', base.get('kek')), group: level('group'), device: level('device'), field: level('field'), maintenanceWindows: windows };
  }

  async function requireGroup(ex: Executor, groupId: string): Promise<void> {
    if (!(await keys.findGroup(ex, groupId))) throw new NotFoundError(`Group ${groupId} not found`);
  }

  async function getGroupPolicy(groupId: string): Promise<GroupPolicyView> {
    await requireGroup(deps.db, groupId);
    const [base, row] = await Promise.all([defaults(db()), repo.findGroupPolicy(db(), groupId)]);
    const { overrides, maintenanceWindows } = parseOverrides(row);
    const effective = merge(base, overrides, maintenanceWindows);
    return {
      groupId,
      overrides,
      maintenanceWindows,
      effective: { group: effective.group, device: effective.device, field: effective.field },
      updatedAt: row ? row.updated_at.toISOString() : null,
      updatedBy: row ? row.updated_by : null,
    };
  }

  async function putGroupPolicy(who: Actor, groupId: string, body: PutGroupPolicyBody): Promise<GroupPolicyView> {
    const overrides: GroupPolicyOverrides = {};
    for (const level of GROUP_LEVELS) if (body[level]) overrides[level] = body[level] as LevelPolicyPatch;
    const windows = body.maintenanceWindows ?? [];
    validateWindows(windows, 'body.maintenanceWindows');
    const now = clock.now();
    await db()
      .transaction()
      .execute(async (trx) => {
        await requireGroup(trx as unknown as Executor, groupId);
        const base = await defaults(trx);
        for (const level of GROUP_LEVELS) validateLevel(level, { ...toLevel(level, base.get(level)), ...(overrides[level] ?? {}) }, `body.${level}`);
        const before = parseOverrides(await repo.findGroupPolicy(trx, groupId, { forUpdate: true }));
        if (Object.keys(overrides).length === 0 && windows.length === 0) await repo.deleteGroupPolicy(trx, groupId);
        else {
          await repo.upsertGroupPolicy(trx, {
            group_id: groupId,
            overrides: JSON.stringify(overrides),
            maintenance_windows: JSON.stringify(windows),
            updated_at: now,
            updated_by: who.actor,
          });
        }
        await audit.record(trx as unknown as Executor, [
          event(who, { action: 'policy.change', outcome: 'success', keyId: `group:${groupId}`, details: { scope: 'group', before, after: { overrides, maintenanceWindows: windows } } }),
        ]);
      });
    return getGroupPolicy(groupId);
  }

  async function effectivePolicies(groupIds: readonly string[]): Promise<Map<string, EffectivePolicy>> {
    const [base, rows] = await Promise.all([defaults(db()), repo.listGroupPolicies(db(), groupIds)]);
    const byGroup = new Map(rows.map((r) => [r.group_id, r]));
    return new Map(
      groupIds.map((id) => {
        const { overrides, maintenanceWindows } = parseOverrides(byGroup.get(id));
        return [id, merge(base, overrides, maintenanceWindows)];
      }),
    );
  }

  async function effectivePolicy(groupId?: string): Promise<EffectivePolicy> {
    if (groupId === undefined) return merge(await defaults(db()), {}, []);
    const policy = (await effectivePolicies([groupId])).get(groupId);
    if (!policy) throw new Error('unreachable');
    return policy;
  }

  return { getPolicies, putPolicies, getGroupPolicy, putGroupPolicy, effectivePolicy, effectivePolicies };
}

/** Rules between fields, which the schema cannot state. */
export function validateLevel(level: PolicyLevel, policy: LevelPolicy, field: string): void {
  const fail = (name: string, message: string): never => {
    throw new BadRequestError(`${field}.${name} ${message}`, { field: `${field}.${name}` });
  };
  const rollouts = level === 'device' || level === 'field';
  if (rollouts) {
    if (policy.percentPerDay === null) fail('percentPerDay', 'is required for the device and field levels (staggered rollouts)');
    if (policy.haltThreshold === null) fail('haltThreshold', 'is required for the device and field levels (staggered rollouts)');
    if (policy.graceRequiresAck === null) fail('graceRequiresAck', 'is required for the device and field levels (keys are sent to devices)');
    if (policy.graceAckMaxHoldDays === null) fail('graceAckMaxHoldDays', 'is required for the device and field levels (keys are sent to devices)');
    // a version past its grace must not still be needed for encryption when the next rotation comes
    if (policy.gracePeriodDays >= policy.rotationPeriodDays) fail('gracePeriodDays', 'must be shorter than rotationPeriodDays');
  } else {
    if (policy.percentPerDay !== null) fail('percentPerDay', `must be null for the ${level} level (it is not rolled out to devices)`);
    if (policy.haltThreshold !== null) fail('haltThreshold', `must be null for the ${level} level (it is not rolled out to devices)`);
    if (policy.graceRequiresAck !== null) fail('graceRequiresAck', `must be null for the ${level} level (it is not sent to devices)`);
    if (policy.graceAckMaxHoldDays !== null) fail('graceAckMaxHoldDays', `must be null for the ${level} level (it is not sent to devices)`);
  }
  // nothing but keystrata encrypts with a group DEK: a rotated group version goes straight to decrypt_only
  if (level === 'group' && policy.gracePeriodDays !== 0) fail('gracePeriodDays', 'must be 0 for the group level (an old group version is decrypt_only at once)');
}
