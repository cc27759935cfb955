/**
 * The cryptoperiod report (DESIGN §3; NIST SP 800-57 part 1 §5.3, PCI DSS 3.7.4/3.7.5).
 *
 *   originator-usage period  while a version may protect new data: `primary` + `grace`,
 *                            i.e. rotation period + grace period of the level's policy
 *                            (the KEK: its rotation period, while it is the latest version)
 *   recipient-usage period   while it may only still decrypt: `decrypt_only` until its retention
 *                            ends (the KEK: an older version stays decryptable until
 *                            min_decryption_version passes it, which the grace period bounds)
 *
 * Per level, the report gives the configured periods (the defaults, and how many groups
 * override them) and every version past either period under its group's effective policy.
 * Read-only, ids and dates only.
 */
import { sql, type Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import type { VersionState } from '../db/tables.js';
import type { KekProvider } from '../kek/kek.types.js';
import { addDays } from './policy.defaults.js';
import type { EffectivePolicy, PolicyService } from './policy.service.js';
import * as repo from './rotation.repository.js';
import { rotationDb, type PolicyLevel, type RotationDB } from './rotation.tables.js';
import type { CryptoperiodReportView } from './rotation.schemas.js';

type Level = CryptoperiodReportView['levels'][number];
type Overdue = Level['overdue'][number];

export function createComplianceService(deps: { db: Kysely<DB>; kek: Pick<KekProvider, 'info' | 'keyName'>; clock: Clock; policies: Pick<PolicyService, 'effectivePolicy' | 'effectivePolicies'> }) {
  const { clock, policies } = deps;
  let handle: Kysely<RotationDB> | undefined;
  const db = () => (handle ??= rotationDb(deps.db));

  async function cryptoperiods(options: { limit: number }): Promise<CryptoperiodReportView> {
    const now = clock.now();
    const defaults = await policies.effectivePolicy();
    const groupIds: string[] = [];
    for (let after: string | undefined; ; ) {
      const page = await repo.listGroupIds(db(), after, 1000);
      groupIds.push(...page);
      if (page.length < 1000) break;
      after = page.at(-1);
    }
    const effective = await policies.effectivePolicies(groupIds);
    const levels: Level[] = [await kekLevel(now, defaults, options.limit)];
    for (const level of ['group', 'device', 'field'] as const) levels.push(await hierarchyLevel(level, now, defaults, effective, options.limit));
    return { at: now.toISOString(), levels };
  }

  async function kekLevel(now: Date, defaults: EffectivePolicy, limit: number): Promise<Level> {
    const policy = defaults.kek;
    const info = await deps.kek.info();
    const seen = new Map((await repo.listKekVersions(db(), deps.kek.keyName)).map((r) => [r.version, r.became_latest_at]));
    const since = (v: number) => seen.get(v) ?? new Date(info.versions.find((x) => x.version === v)?.createdAt ?? now);
    const overdue: Overdue[] = [];
    const latestEnds = addDays(since(info.latestVersion), policy.rotationPeriodDays);
    if (now > latestEnds) overdue.push({ keyId: `kek:${info.name}`, version: info.latestVersion, state: 'primary', period: 'originator', endedAt: latestEnds.toISOString() });
    for (const v of info.versions) {
      if (v.version >= info.latestVersion || v.version < info.minDecryptionVersion) continue;
      // version v stopped encrypting when v + 1 became the latest; it may decrypt for the grace period after that
      const ends = addDays(since(v.version + 1), policy.gracePeriodDays);
      if (now > ends) overdue.push({ keyId: `kek:${info.name}`, version: v.version, state: 'decrypt_only', period: 'recipient', endedAt: ends.toISOString() });
    }
    return {
      level: 'kek',
      originatorUsageDays: policy.rotationPeriodDays,
      recipientUsageDays: policy.gracePeriodDays,
      groupsWithOverrides: 0,
      pastOriginatorUsage: overdue.filter((o) => o.period === 'originator').length,
      pastRecipientUsage: overdue.filter((o) => o.period === 'recipient').length,
      overdue: overdue.slice(0, limit),
    };
  }

  async function hierarchyLevel(level: 'group' | 'device' | 'field', now: Date, defaults: EffectivePolicy, effective: Map<string, EffectivePolicy>, limit: number): Promise<Level> {
    const base = defaults[level];
    let overrides = 0;
    const cutoffs: Array<{ groupId: string; originator: Date; recipient: Date | null }> = [];
    for (const [groupId, policy] of effective) {
      const p = policy[level];
      if (p.rotationPeriodDays !== base.rotationPeriodDays || p.gracePeriodDays !== base.gracePeriodDays || p.retentionDays !== base.retentionDays) overrides += 1;
      cutoffs.push({
        groupId,
        // a version created before this is past its originator-usage period if it still encrypts
        originator: addDays(now, -(p.rotationPeriodDays + p.gracePeriodDays)),
        // decrypt_only since before this: past its recipient-usage period
        recipient: p.retentionDays === null ? null : addDays(now, -p.retentionDays),
      });
    }
    const rows = cutoffs.length === 0 ? { total: [], listed: [] } : await overdueRows(level, cutoffs, limit);
    const count = (period: 'originator' | 'recipient') => Number(rows.total.find((r) => r.period === period)?.n ?? 0);
    return {
      level,
      originatorUsageDays: base.rotationPeriodDays + base.gracePeriodDays,
      recipientUsageDays: base.retentionDays,
      groupsWithOverrides: overrides,
      pastOriginatorUsage: count('originator'),
      pastRecipientUsage: count('recipient'),
      overdue: rows.listed.map((r) => ({ keyId: r.key_id, version: r.version, state: r.state, period: r.period, endedAt: new Date(r.ended_at).toISOString() })),
    };
  }

  async function overdueRows(level: 'group' | 'device' | 'field', cutoffs: Array<{ groupId: string; originator: Date; recipient: Date | null }>, limit: number) {
    const values = sql.join(cutoffs.map((c) => sql`(${c.groupId}::text, ${c.originator}::timestamptz, ${c.recipient}::timestamptz)`));
    const source =
      level === 'group'
        ? sql`select 'group:' || v.group_id as key_id, v.version, v.state, v.created_at, v.state_changed_at, c.originator, c.recipient
                from group_versions v join c on c.group_id = v.group_id`
        : level === 'device'
          ? sql`select 'device:' || v.device_id as key_id, v.version, v.state, v.created_at, v.state_changed_at, c.originator, c.recipient
                  from device_versions v join devices d on d.id = v.device_id join c on c.group_id = d.group_id`
          : sql`select 'field:' || v.device_id || '/' || v.field as key_id, v.version, v.state, v.created_at, v.state_changed_at, c.originator, c.recipient
                  from field_versions v join devices d on d.id = v.device_id join c on c.group_id = d.group_id`;
    const overdue = sql`
      with c(group_id, originator, recipient) as (values ${values}),
      s as (${source}),
      o as (
        select key_id, version, state, 'originator' as period, created_at as started, originator as cutoff from s
         where state in ('primary', 'grace') and created_at < originator
        union all
        select key_id, version, state, 'recipient' as period, state_changed_at, recipient from s
         where state = 'decrypt_only' and recipient is not null and state_changed_at < recipient
      )`;
    const total = await sql<{ period: 'originator' | 'recipient'; n: number }>`${overdue} select period, count(*) as n from o group by period`.execute(db());
    const listed = await sql<{ key_id: string; version: number; state: VersionState; period: 'originator' | 'recipient'; started: Date; cutoff: Date }>`
      ${overdue} select key_id, version, state, period, started, cutoff from o order by started, key_id, version limit ${limit}`.execute(db());
    const now = clock.now().getTime();
    return {
      total: total.rows,
      // the period ended as long after the version's start as now is after the cutoff
      listed: listed.rows.map((r) => ({ ...r, ended_at: new Date(r.started).getTime() + (now - new Date(r.cutoff).getTime()) })),
    };
  }

  return { cryptoperiods };
}

export type ComplianceService = ReturnType<typeof createComplianceService>;
export type { PolicyLevel };
