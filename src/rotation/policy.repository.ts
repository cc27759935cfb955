/** SQL of rotation policies. Every function takes an executor: services decide transactions. */
import type { RotationExecutor, RotationPoliciesTable, PolicyLevel } from './rotation.tables.js';
import type { Selectable } from 'kysely';

export type PolicyRow = Selectable<RotationPoliciesTable>;

export interface GroupPolicyRow {
  group_id: string;
  overrides: unknown;
  maintenance_windows: unknown;
  updated_at: Date;
  updated_by: string;
}

const POLICY_COLUMNS = ['level', 'rotation_period_days', 'grace_period_days', 'retention_days', 'destruction_wait_days', 'percent_per_day', 'halt_threshold', 'grace_requires_ack', 'grace_ack_max_hold_days', 'updated_at', 'updated_by'] as const;

export async function listPolicies(ex: RotationExecutor, options: { forUpdate?: boolean } = {}): Promise<PolicyRow[]> {
  let query = ex.selectFrom('rotation_policies').select(POLICY_COLUMNS).orderBy('level');
  if (options.forUpdate) query = query.forUpdate();
  return query.execute();
}

export async function upsertPolicy(ex: RotationExecutor, row: PolicyRow): Promise<void> {
  const { level, ...values } = row;
  await ex
    .insertInto('rotation_policies')
    .values(row)
    .onConflict((oc) => oc.column('level').doUpdateSet(values))
    .execute();
}

export async function findGroupPolicy(ex: RotationExecutor, groupId: string, options: { forUpdate?: boolean } = {}): Promise<GroupPolicyRow | undefined> {
  let query = ex.selectFrom('group_policies').select(['group_id', 'overrides', 'maintenance_windows', 'updated_at', 'updated_by']).where('group_id', '=', groupId);
  if (options.forUpdate) query = query.forUpdate();
  return query.executeTakeFirst();
}

export async function listGroupPolicies(ex: RotationExecutor, groupIds: readonly string[]): Promise<GroupPolicyRow[]> {
  if (groupIds.length === 0) return [];
  return ex.selectFrom('group_policies').select(['group_id', 'overrides', 'maintenance_windows', 'updated_at', 'updated_by']).where('group_id', 'in', groupIds).execute();
}

export async function upsertGroupPolicy(
  ex: RotationExecutor,
  row: { group_id: string; overrides: string; maintenance_windows: string; updated_at: Date; updated_by: string },
): Promise<void> {
  const { group_id: _groupId, ...values } = row;
  await ex
    .insertInto('group_policies')
    .values(row)
    .onConflict((oc) => oc.column('group_id').doUpdateSet(values))
    .execute();
}

export async function deleteGroupPolicy(ex: RotationExecutor, groupId: string): Promise<void> {
  await ex.deleteFrom('group_policies').where('group_id', '=', groupId).execute();
}

export type { PolicyLevel };
