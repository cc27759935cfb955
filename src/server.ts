/**
 * The only entry that listens: load config, build the app, listen, shut down cleanly.
 *
 * With KEYSTRATA_WORKERS > 1 this process becomes a node:cluster primary that only supervises:
 * the workers share the port and each is a replica like any other (they already coordinate
 * through PostgreSQL: audit chain-head lock, SKIP LOCKED leases, advisory locks). The first
 * worker starts alone (migrations, local key files), the rest once it listens; only the first
 * signs periodic audit checkpoints. A worker that dies is replaced, unless workers keep dying
 * right after their start (then the primary gives up rather than spin).
 */
import cluster, { type Worker } from 'node:cluster';
import { buildApp } from './app.js';
import { auditRoutes } from './audit/audit.routes.js';
import { ConfigError, loadConfig } from './config.js';
import { loadHttpsOptions } from './http/tls.js';
import { createLogger } from './logger.js';
import { createRuntime } from './runtime.js';

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`keystrata: ${error.message}\n`);
      process.exit(1);
    }
    throw error;
  }
  const logger = createLogger(config.logLevel);
  if (config.workers > 1 && cluster.isPrimary) return superviseWorkers(config.workers, logger);
  const https = loadHttpsOptions(config.tls); // unreadable certificate files fail the start before anything opens
  const isFirstWorker = !cluster.isWorker || process.env.KEYSTRATA_WORKER_INDEX === '0';
  const runtime = await createRuntime(config, logger, { checkpoints: isFirstWorker });
  const app = await buildApp({
    ...runtime,
    https,
    plugins: [async (instance) => instance.register(auditRoutes, { audit: runtime.audit })],
  });

  let closing = false;
  const shutdown = async (signal: string) => {
    if (closing) return;
    closing = true;
    logger.info({ signal }, 'shutting down');
    try {
      await app.close();
      await runtime.close();
    } finally {
      process.exit(0);
    }
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));

  await app.listen({ port: config.port, host: config.host });
  logger.info(
    { url: `${https ? 'https' : 'http'}://${config.host}:${config.port}`, docs: `${https ? 'https' : 'http'}://${config.host}:${config.port}/docs`, mtls: config.tls?.requireClientCert ?? false, kek: runtime.kek.kind, database: runtime.database.kind },
    'keystrata is listening',
  );
  // issue 6: key distribution (distribution/publisher.ts starts with the app when MQTT_URL is set)
  if (config.mqtt === undefined) logger.warn('MQTT_URL is not set: the key distribution publisher is off; key updates wait in the outbox (keystrata_outbox_depth)');
  else logger.info({ broker: config.mqtt.endpoint, clientId: config.mqtt.clientId }, 'key distribution publisher started');
}

/** Fork `count` workers (the first alone), replace the ones that die, pass SIGTERM/SIGINT on. */
function superviseWorkers(count: number, logger: ReturnType<typeof createLogger>): void {
  let stopping = false;
  const QUICK_DEATH_MS = 5000;
  let quickDeaths = 0;
  const fork = (index: number): Worker => {
    const worker = cluster.fork({ KEYSTRATA_WORKER_INDEX: String(index) });
    const startedAt = Date.now();
    worker.on('exit', (code, signal) => {
      if (stopping) return;
      quickDeaths = Date.now() - startedAt < QUICK_DEATH_MS ? quickDeaths + 1 : 0;
      logger.error({ worker: index, pid: worker.process.pid, code, signal }, 'worker exited');
      if (quickDeaths >= 3) {
        logger.fatal('workers keep exiting right after their start: giving up');
        stopping = true;
        for (const w of Object.values(cluster.workers ?? {})) w?.kill('SIGTERM');
        process.exitCode = 1;
        return;
      }
      fork(index);
    });
    return worker;
  };
  const first = fork(0);
  first.once('listening', () => {
    for (let index = 1; index < count; index++) fork(index);
  });
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal, workers: count }, 'stopping workers');
    for (const w of Object.values(cluster.workers ?? {})) w?.process.kill(signal);
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  logger.info({ workers: count }, 'supervising worker processes');
}

main().catch((error: unknown) => {
  // config and secrets are never part of these messages
  process.stderr.write(`keystrata: failed to start: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
