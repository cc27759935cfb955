/**
 * Prometheus metrics of key distribution, on the app's registry (http/metrics.ts). The outbox
 * gauges exist whether or not a publisher runs here: a growing depth with MQTT_URL unset, or
 * with the broker down, is exactly what an operator must see. No label carries an id.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export interface DistributionMetrics {
  published: Counter;
  publishFailures: Counter<'reason'>;
  /** publish call → PUBCOMP */
  publishLatency: Histogram;
  /** outbox row written → PUBCOMP */
  deliveryDelay: Histogram;
  acks: Counter<'outcome'>;
  connected: Gauge;
}

export function createDistributionMetrics(registry: Registry, sources: { outboxDepth: () => Promise<{ pending: number; oldestSeconds: number }> }): DistributionMetrics {
  // one query per scrape for both gauges
  let cached: { at: number; value: Promise<{ pending: number; oldestSeconds: number }> } | undefined;
  const depth = () => {
    if (!cached || Date.now() - cached.at > 1000) cached = { at: Date.now(), value: sources.outboxDepth() };
    return cached.value;
  };
  new Gauge({
    name: 'keystrata_outbox_depth',
    help: 'Key updates waiting in the outbox (not yet accepted by the MQTT broker)',
    registers: [registry],
    async collect() {
      // a scrape must not fail because the database is briefly unreachable: keep the last value
      try {
        this.set((await depth()).pending);
      } catch {
        /* keep the previous value */
      }
    },
  });
  new Gauge({
    name: 'keystrata_outbox_oldest_pending_seconds',
    help: 'Age of the oldest key update waiting in the outbox',
    registers: [registry],
    async collect() {
      try {
        this.set((await depth()).oldestSeconds);
      } catch {
        /* keep the previous value */
      }
    },
  });
  return {
    published: new Counter({ name: 'keystrata_mqtt_published_total', help: 'Key updates accepted by the broker (QoS 2 PUBCOMP)', registers: [registry] }),
    publishFailures: new Counter({
      name: 'keystrata_mqtt_publish_failures_total',
      help: 'Failed key update publishes by reason (broker refusal, connection lost, key material unavailable, dropped)',
      labelNames: ['reason'],
      registers: [registry],
    }),
    publishLatency: new Histogram({
      name: 'keystrata_mqtt_publish_duration_seconds',
      help: 'From publish to the broker\'s PUBCOMP',
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    }),
    deliveryDelay: new Histogram({
      name: 'keystrata_outbox_delivery_delay_seconds',
      help: 'From the outbox row being written to the broker\'s PUBCOMP',
      buckets: [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 86_400],
      registers: [registry],
    }),
    acks: new Counter({ name: 'keystrata_key_acks_total', help: 'Device acknowledgements by outcome (accepted, duplicate, or the reason one was refused)', labelNames: ['outcome'], registers: [registry] }),
    connected: new Gauge({ name: 'keystrata_mqtt_connected', help: '1 while this replica\'s publisher is connected to the broker', registers: [registry] }),
  };
}
