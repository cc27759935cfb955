/**
 * Rollout test helpers: the rotation fleet (an app on its own database, manual clock, tokens, a
 * backend with a delivery key, independent unwrapping), a rollout runner of our own (a second
 * rollout service on the same database, so tests can inject failures and crashes), and reads
 * of what is stored: each device's versions and its expected wave computed in Node.
 */
import { expect } from 'vitest';
import { createKeyCache } from '../../src/keys/key-cache.js';
import { createKeyMaterial } from '../../src/keys/key-material.js';
import { createPolicyService } from '../../src/rotation/policy.service.js';
import { createRolloutService, type DueWavesResult, type RolloutServiceDeps } from '../../src/rotation/rollout.service.js';
import { planWaves, waveOfDevice, type WavePlan } from '../../src/rotation/rollout.waves.js';
import { call } from '../support/flow.js';
import type { Fleet } from '../rotation/support.js';

export { createFleet, createGroup, DAY, events, fetchDeviceKeys, runCron, storedDeviceKeys, storedFieldKey, type Fleet } from '../rotation/support.js';

export interface RolloutBody {
  groupId: string;
  level?: 'device' | 'field';
  field?: string;
  percentPerDay?: number;
  waveIntervalSeconds?: number;
  canaryPercent?: number;
  haltThreshold?: number;
  rollbackOnHalt?: boolean;
}

export interface WaveView {
  wave: number;
  kind: 'canary' | 'wave' | 'sweep';
  state: string;
  dueAt: string;
  devices: number;
  done: number;
  failed: number;
  skipped: number;
  rolledBack: number;
  rollbackFailed: number;
  pending: number;
}

export interface RolloutView {
  id: string;
  groupId: string;
  level: string;
  field: string | null;
  state: string;
  reason: string;
  waveCount: number;
  currentWave: number | null;
  haltedWave: number | null;
  haltReason: string | null;
  devicesOnOldVersions: number;
  totals: { devices: number; done: number; failed: number; skipped: number; rolledBack: number; rollbackFailed: number; pending: number };
  waves: WaveView[];
  failures: Array<{ deviceId: string; wave: number; status: string; reason: string | null }>;
}

export async function startRollout(f: Fleet, body: RolloutBody): Promise<RolloutView> {
  const response = await call(f.t.app, f.admin, 'POST', '/v1/rollouts', { level: 'device', ...body });
  expect(response.status, response.raw).toBe(201);
  return response.body as unknown as RolloutView;
}

export async function getRollout(f: Fleet, id: string): Promise<RolloutView> {
  const response = await call(f.t.app, f.admin, 'GET', `/v1/rollouts/${id}`);
  expect(response.status, response.raw).toBe(200);
  return response.body as unknown as RolloutView;
}

export async function control(f: Fleet, id: string, action: 'pause' | 'resume' | 'cancel') {
  return call(f.t.app, f.admin, 'POST', `/v1/rollouts/${id}/${action}`);
}

/** The wave plan and bucket offset of a stored rollout, to compute each device's wave in Node. */
export async function wavesOf(f: Fleet, id: string): Promise<{ plan: WavePlan[]; offset: number; waveOf: (deviceId: string) => number }> {
  const row = await f.t.database.db
    .withTables<{ rollouts: { id: string; percent_per_day: number; canary_percent: number | null; bucket_offset: number } }>()
    .selectFrom('rollouts')
    .select(['percent_per_day', 'canary_percent', 'bucket_offset'])
    .where('id', '=', id)
    .executeTakeFirstOrThrow();
  const plan = planWaves({ percentPerDay: row.percent_per_day, canaryPercent: row.canary_percent });
  return { plan, offset: row.bucket_offset, waveOf: (deviceId) => waveOfDevice(deviceId, row.bucket_offset, plan) };
}

/** A rollout runner of our own on the app's database (its own key cache), with test deps. */
export function runner(f: Fleet, extra: Partial<Pick<RolloutServiceDeps, 'chunkSize' | 'listStep' | 'workers' | 'failDevice' | 'hooks' | 'logger' | 'enqueue' | 'metrics'>> = {}) {
  const material = createKeyMaterial({ kek: f.t.kek, cache: createKeyCache({ ttlSeconds: 3600, maxEntries: 100 }) });
  const policies = createPolicyService({ db: f.t.database.db, audit: f.t.audit, clock: f.clock });
  const service = createRolloutService({ db: f.t.database.db, material, audit: f.t.audit, clock: f.clock, policies, ...extra });
  return {
    service,
    run: (options: { limit?: number; dryRun?: boolean; canStart?: (groupId: string) => Promise<boolean> } = {}): Promise<DueWavesResult> =>
      service.runDueWaves({
        now: f.clock.now(),
        limit: options.limit ?? 1_000_000,
        dryRun: options.dryRun ?? false,
        actor: 'test-runner',
        canStart: options.canStart ?? (async () => true),
      }),
  };
}

export interface DeviceState {
  versions: Array<{ version: number; state: string; stateUntil: Date | null; createdAt: Date }>;
  primary: number | undefined;
}

/** Every device of the group with its versions (in version order). */
export async function deviceStates(f: Fleet, groupId: string): Promise<Map<string, DeviceState>> {
  const rows = await f.t.database.db
    .selectFrom('device_versions as v')
    .innerJoin('devices as d', 'd.id', 'v.device_id')
    .select(['v.device_id', 'v.version', 'v.state', 'v.state_until', 'v.created_at'])
    .where('d.group_id', '=', groupId)
    .orderBy('v.device_id')
    .orderBy('v.version')
    .execute();
  const out = new Map<string, DeviceState>();
  for (const r of rows) {
    const entry = out.get(r.device_id) ?? { versions: [], primary: undefined };
    entry.versions.push({ version: r.version, state: r.state, stateUntil: r.state_until, createdAt: r.created_at });
    if (r.state === 'primary') entry.primary = r.version;
    out.set(r.device_id, entry);
  }
  return out;
}

/** Rollout items of one rollout, by device. */
export async function items(f: Fleet, rolloutId: string): Promise<Map<string, { wave: number; status: string; from: number | null; to: number | null; reason: string | null }>> {
  const rows = await f.t.database.db
    .withTables<{ rollout_items: { rollout_id: string; device_id: string; wave: number; status: string; from_version: number | null; to_version: number | null; reason: string | null } }>()
    .selectFrom('rollout_items')
    .select(['device_id', 'wave', 'status', 'from_version', 'to_version', 'reason'])
    .where('rollout_id', '=', rolloutId)
    .execute();
  return new Map(rows.map((r) => [r.device_id, { wave: r.wave, status: r.status, from: r.from_version, to: r.to_version, reason: r.reason }]));
}
