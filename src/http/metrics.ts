/**
 * Prometheus metrics (prom-client). One registry per app so tests and replicas in one process
 * never share counters. Labels are low-cardinality by construction: the route pattern, never
 * the URL, and never an id.
 */
import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export interface Metrics {
  registry: Registry;
  keyDeliveries: Counter<'kind'>;
  deliveredKeys: Counter;
  failedUnwraps: Counter;
  failedAuthentications: Counter<'reason'>;
  refusedAuthorizations: Counter;
}

const CHAIN_LENGTH_TIMEOUT_MS = 1000;

function withinMs<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('timed out')), ms);
  });
  promise.catch(() => {});
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function createMetrics(sources: { auditChainLength: () => Promise<number>; cacheStats: () => { hits: number; misses: number; size: number } }): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'keystrata_process_' });
  new Gauge({
    name: 'keystrata_audit_chain_length',
    help: 'Events in the audit hash chain',
    registers: [registry],
    async collect() {
      // the one metric read from the database: an outage must not take every other metric (and
      // the scrape) down with it, nor hold the scrape for a query deadline; the last value stays
      const length = await withinMs(sources.auditChainLength(), CHAIN_LENGTH_TIMEOUT_MS).catch(() => undefined);
      if (length !== undefined) this.set(length);
    },
  });
  new Gauge({
    name: 'keystrata_key_cache_hit_ratio',
    help: 'Hits / (hits + misses) of the unwrapped parent key cache since start',
    registers: [registry],
    collect() {
      const { hits, misses } = sources.cacheStats();
      this.set(hits + misses === 0 ? 0 : hits / (hits + misses));
    },
  });
  new Gauge({
    name: 'keystrata_key_cache_entries',
    help: 'Unwrapped parent keys held in memory',
    registers: [registry],
    collect() {
      this.set(sources.cacheStats().size);
    },
  });
  return {
    registry,
    keyDeliveries: new Counter({ name: 'keystrata_key_deliveries_total', help: 'JWE deliveries (requests answered with keys)', labelNames: ['kind'], registers: [registry] }),
    deliveredKeys: new Counter({ name: 'keystrata_delivered_keys_total', help: 'Keys delivered inside JWEs', registers: [registry] }),
    failedUnwraps: new Counter({ name: 'keystrata_failed_unwraps_total', help: 'Stored blobs that failed to unwrap (tampering, wrong binding, retired KEK version)', registers: [registry] }),
    failedAuthentications: new Counter({ name: 'keystrata_failed_authentications_total', help: 'Requests refused for a missing or invalid token', labelNames: ['reason'], registers: [registry] }),
    refusedAuthorizations: new Counter({ name: 'keystrata_refused_authorizations_total', help: 'Requests refused for a missing scope', registers: [registry] }),
  };
}

/** Request counts and latencies by route pattern (a global hook), and GET /metrics. */
export function registerMetrics(app: FastifyInstance, registry: Registry): void {
  {
    const requests = new Counter({ name: 'keystrata_http_requests_total', help: 'HTTP requests', labelNames: ['method', 'route', 'status'], registers: [registry] });
    const latency = new Histogram({
      name: 'keystrata_http_request_duration_seconds',
      help: 'HTTP request latency',
      labelNames: ['method', 'route'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [registry],
    });
    app.addHook('onResponse', async (request, reply) => {
      const route = request.routeOptions.url ?? 'unmatched';
      requests.inc({ method: request.method, route, status: String(reply.statusCode) });
      latency.observe({ method: request.method, route }, reply.elapsedTime / 1000);
    });
    app.get(
      '/metrics',
      {
        config: { public: true },
        schema: { operationId: 'metrics', tags: ['health'], summary: 'Prometheus metrics', security: [], response: { 200: { type: 'string' } } },
      },
      async (_request, reply) => {
        reply.type(registry.contentType);
        return registry.metrics();
      },
    );
  }
}
