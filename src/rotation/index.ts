/**
 * The rotation module, composed once for the app (app.ts) and the CLI (`keystrata rotate`):
 * policies, KEK rotation, group rotation, rotation debt, staggered rollouts and the cron entry.
 */
import type { Kysely } from 'kysely';
import type { Registry } from 'prom-client';
import type { AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import type { KekProvider } from '../kek/kek.types.js';
import type { LifecyclePolicyLookup } from '../keys/device-lifecycle.service.js';
import type { KeyMaterial } from '../keys/key-material.js';
import { createVersionSweeps, type VersionSweeps } from '../keys/version-sweeps.js';
import { createComplianceService, type ComplianceService } from './compliance.service.js';
import { createGroupRotationService, type GroupRotationHooks, type GroupRotationService } from './group-rotation.service.js';
import { createKekRotationService, type KekRotationHooks, type KekRotationService } from './kek-rotation.service.js';
import { BUILT_IN_POLICIES, DAY_MS } from './policy.defaults.js';
import { createPolicyService, type PolicyService } from './policy.service.js';
import { createRolloutMetrics } from './rollout.metrics.js';
import { createRolloutService, type RolloutService, type RolloutServiceDeps } from './rollout.service.js';
import { createRotationRunService, type DueWaves, type RotationRunService } from './rotation-run.service.js';
import { createRotationStatusService, type RotationStatusService } from './rotation-status.service.js';

export { rotationRoutes } from './rotation.routes.js';
export { rolloutRoutes } from './rollout.routes.js';
export type { RolloutService } from './rollout.service.js';
export type { EffectivePolicy, PolicyService } from './policy.service.js';
export type { DueWaves } from './rotation-run.service.js';

export interface Rotation {
  policies: PolicyService;
  kekRotation: KekRotationService;
  groupRotation: GroupRotationService;
  status: RotationStatusService;
  runner: RotationRunService;
  rollouts: RolloutService;
  compliance: ComplianceService;
}

export interface RotationDeps {
  db: Kysely<DB>;
  kek: KekProvider;
  material: KeyMaterial;
  audit: AuditSink;
  clock: Clock;
  /** the grace-expiry and destruction sweeps of device and field key versions (built from the deps when left out) */
  sweeps?: VersionSweeps | undefined;
  /**
   * the MQTT publisher is on (config.mqtt): the grace sweep then also holds versions whose
   * successor is still queued in the outbox; off (default), only successors the broker accepted
   * earlier hold a version (nothing is being sent, so nothing waiting in the outbox holds one)
   */
  mqttEnabled?: boolean | undefined;
  /** the cron entry runs due rollout waves through this hook (default: the rollout service) */
  dueWaves?: DueWaves | undefined;
  /** rollout tuning (chunk size, workers) and test hooks */
  rollouts?: Pick<RolloutServiceDeps, 'chunkSize' | 'listStep' | 'workers' | 'failDevice' | 'hooks'> | undefined;
  /** rollout halts and completions are logged here */
  logger?: RolloutServiceDeps['logger'];
  /** the app's metrics registry (rollout metrics); none for the CLI */
  registry?: Registry | undefined;
  /** items per KEK rewrap call (default 500, at least 250) */
  kekBatchSize?: number | undefined;
  /** device versions per child-rewrap transaction (default 500) */
  childChunkSize?: number | undefined;
  hooks?: (KekRotationHooks & GroupRotationHooks) | undefined;
}

export function createRotation(deps: RotationDeps): Rotation {
  const { db, kek, material, audit, clock } = deps;
  const policies = createPolicyService({ db, audit, clock });
  const kekRotation = createKekRotationService({ db, kek, audit, clock, policies, batchSize: deps.kekBatchSize, hooks: deps.hooks });
  const groupRotation = createGroupRotationService({ db, material, audit, clock, chunkSize: deps.childChunkSize, hooks: deps.hooks });
  const status = createRotationStatusService({ db, kek, clock, policies });
  // issue 6: grace versions wait for the device's acknowledgement of their successor when the group's policy says so
  const ackHold = { sent: deps.mqttEnabled === true ? ('queued' as const) : ('published' as const), builtIn: { device: BUILT_IN_POLICIES.device, field: BUILT_IN_POLICIES.field } };
  const sweeps = deps.sweeps ?? createVersionSweeps({ db, audit, material, clock, ackHold });
  const rollouts = createRolloutService({
    db,
    material,
    audit,
    clock,
    policies,
    logger: deps.logger,
    metrics: deps.registry ? createRolloutMetrics(deps.registry) : undefined,
    ...deps.rollouts,
  });
  const runner = createRotationRunService({ db, audit, clock, policies, kekRotation, groupRotation, sweeps, dueWaves: deps.dueWaves ?? rollouts });
  const compliance = createComplianceService({ db, kek, clock, policies });
  return { policies, kekRotation, groupRotation, status, runner, rollouts, compliance };
}

/** The device lifecycle's policy lookup (grace and destruction waiting period), from the effective policies. */
export function lifecyclePolicyLookup(policies: Pick<PolicyService, 'effectivePolicy'>): LifecyclePolicyLookup {
  return async ({ level, groupId }) => {
    const policy = (await policies.effectivePolicy(groupId))[level];
    return { gracePeriodMs: policy.gracePeriodDays * DAY_MS, destroyWaitMs: policy.destructionWaitDays * DAY_MS };
  };
}
