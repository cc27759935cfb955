/** The only entry that listens: load config, build the app, listen, shut down cleanly. */
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
  const https = loadHttpsOptions(config.tls); // unreadable certificate files fail the start before anything opens
  const runtime = await createRuntime(config, logger, { checkpoints: true });
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

main().catch((error: unknown) => {
  // config and secrets are never part of these messages
  process.stderr.write(`keystrata: failed to start: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
