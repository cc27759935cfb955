/**
 * Prometheus metrics of staggered rollouts, on the app's registry (http/metrics.ts). Labels are
 * low-cardinality: level and outcome, never a rollout, group or device id.
 */
import { Counter, Histogram, type Registry } from 'prom-client';

export interface RolloutMetrics {
  /** devices per outcome: done, failed, skipped, rolled_back, rollback_failed */
  devices: Counter<'level' | 'outcome'>;
  /** rollouts halted by a wave over its failure threshold */
  halts: Counter<'level'>;
  /** one chunk transaction (forward or rollback) */
  chunkSeconds: Histogram<'kind'>;
}

export function createRolloutMetrics(registry: Registry): RolloutMetrics {
  return {
    devices: new Counter({ name: 'keystrata_rollout_devices_total', help: 'Devices processed by rollout waves, by outcome', labelNames: ['level', 'outcome'], registers: [registry] }),
    halts: new Counter({ name: 'keystrata_rollout_halts_total', help: 'Rollouts halted by a wave whose failure rate exceeded its threshold', labelNames: ['level'], registers: [registry] }),
    chunkSeconds: new Histogram({
      name: 'keystrata_rollout_chunk_duration_seconds',
      help: 'Duration of one rollout chunk transaction',
      labelNames: ['kind'],
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    }),
  };
}
