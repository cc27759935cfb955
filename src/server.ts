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
import pino from 'pino';
import { buildApp } from './app.js';
import { auditRoutes } from './audit/audit.routes.js';
import { ConfigError, loadConfig } from './config.js';
import { loadHttpsOptions } from './http/tls.js';
import { createLogger } from './logger.js';
import { createRuntime } from './runtime.js';
import { createShutdown } from './shutdown.js';

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

  const shutdown = createShutdown({
    // written synchronously, as the process may SIGKILL itself right after a line (the main
    // logger's stdout stream is asynchronous, and a queued line would die with the process)
    logger: createLogger(config.logLevel, pino.destination({ dest: 1, sync: true })),
    timeoutMs: config.shutdownTimeoutMs,
    close: async () => {
      await app.close();
      await runtime.close();
    },
  });
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

/** Fork `count` workers (the first alone), replace the ones that die, pass every SIGTERM/SIGINT on. */
function superviseWorkers(count: number, logger: ReturnType<typeof createLogger>): void {
  let stopping = false;
  const QUICK_DEATH_MS = 5000;
  let quickDeaths = 0;
  const fork = (index: number): Worker => {
    const worker = cluster.fork({ KEYSTRATA_WORKER_INDEX: String(index) });
    const startedAt = Date.now();
    worker.on('exit', (code, signal) => {
      if (stopping) {
        // a worker that had to kill itself (the shutdown deadline, a second signal) may have cut
        // requests short: say so, and make the primary's exit code say so too. One still starting
        // dies of the forwarded signal itself (no handler yet), which cuts nothing short.
        if (signal === 'SIGKILL' || (code !== null && code !== 0)) {
          logger.error({ worker: index, pid: worker.process.pid, code, signal }, 'worker did not stop cleanly');
          process.exitCode = 1;
        }
        return;
      }
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
  // every signal is passed on, a second one too: each worker stops at once on its second signal
  const stop = (signal: NodeJS.Signals) => {
    logger.info({ signal, workers: count }, stopping ? 'stopping workers now' : 'stopping workers');
    stopping = true;
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
