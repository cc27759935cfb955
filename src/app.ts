/**
 * The composition root: builds the Fastify app from its parts and never listens. The server
 * (server.ts) and the tests (app.inject) both call buildApp with their own parts.
 */
import crypto from 'node:crypto';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { ServerOptions as HttpsOptions } from 'node:https';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { AccessLogController } from './http/access-log.js';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { Logger } from 'pino';
import type { AuditSink } from './audit/audit.types.js';
import { AuthenticationError, type Authenticator } from './auth/authenticator.js';
import { hasScope } from './auth/principal.js';
import type { Clock } from './clock.js';
import type { Config } from './config.js';
import type { Database } from './db/database.js';
import { createClientService } from './delivery/client.service.js';
import { deliveryRoutes } from './delivery/delivery.routes.js';
import { createDistribution } from './distribution/distribution.service.js';
import { distributionRoutes } from './distribution/distribution.routes.js';
import { createKeyFetchService } from './delivery/key-fetch.service.js';
import { createJweEncryptor } from './crypto/jwe-threads.js';
import { ForbiddenError } from './http/errors.js';
import { frameworkErrors, registerErrorHandling } from './http/error-handler.js';
import { healthRoutes } from './http/health.routes.js';
import { createMetrics, registerMetrics } from './http/metrics.js';
import { Problem } from './http/schemas.js';
import { registerSwagger } from './http/swagger.js';
import { registerValidation } from './http/validation.js';
import { registerIdempotency } from './http/idempotency.js';
import { registerRateLimits } from './http/rate-limit.js';
import { registerRouteTable } from './http/route-table.js';
import './http/request-context.js';
import { kekRoutes } from './kek/kek.routes.js';
import type { KekProvider } from './kek/kek.types.js';
import { registerKekCircuitMetrics } from './kek/circuit-breaker.js';
import { createKeyCache } from './keys/key-cache.js';
import { createKeyMaterial } from './keys/key-material.js';
import { keyRoutes } from './keys/key.routes.js';
import { createDeviceLifecycleService } from './keys/device-lifecycle.service.js';
import { lifecycleRoutes } from './keys/lifecycle.routes.js';
import { createKeyService } from './keys/key.service.js';
import { createRotation, lifecyclePolicyLookup, rolloutRoutes, rotationRoutes } from './rotation/index.js';

export interface AppDeps {
  config: Readonly<Config>;
  database: Database;
  kek: KekProvider;
  audit: AuditSink & { chainLength?(): Promise<number> };
  authenticator: Authenticator;
  clock: Clock;
  logger: Logger;
  /** serve HTTPS with these (http/tls.ts builds them from the TLS_* settings); Fastify takes them at construction */
  https?: HttpsOptions;
  /** extra route plugins (e.g. audit routes), registered after the core routes */
  plugins?: ReadonlyArray<(app: KeystrataApp) => Promise<void>>;
}

export type KeystrataApp = FastifyInstance<Server, IncomingMessage, ServerResponse, FastifyBaseLogger, TypeBoxTypeProvider>;

const REQUEST_ID = /^[A-Za-z0-9._:-]{8,64}$/;

export async function buildApp(deps: AppDeps): Promise<KeystrataApp> {
  const { config, database, kek, audit, authenticator, clock } = deps;
  const app = Fastify({
    loggerInstance: deps.logger as FastifyBaseLogger,
    bodyLimit: config.bodyLimitBytes,
    // a well-formed incoming id is kept so calls can be traced across services
    genReqId: (req) => {
      const incoming = req.headers['x-request-id'];
      return typeof incoming === 'string' && REQUEST_ID.test(incoming) ? incoming : crypto.randomUUID();
    },
    requestIdHeader: false,
    logController: new AccessLogController(),
    routerOptions: { maxParamLength: 200 },
    frameworkErrors, // a malformed URL or an overlong parameter: problem+json like every other refusal
    trustProxy: config.trustProxy,
    // (typed as the plain-HTTP app: routes and hooks do not depend on the transport)
    ...((deps.https ? { https: deps.https } : {}) as object),
  }).withTypeProvider<TypeBoxTypeProvider>();

  app.addSchema(Problem);
  registerValidation(app);
  registerErrorHandling(app);
  // before any route and before the auth hook: they apply to every route, present and future
  registerRouteTable(app);
  await registerRateLimits(app, config.rateLimit);
  registerIdempotency(app, { db: database.db, clock, ttlSeconds: config.idempotencyTtlSeconds, logger: app.log });
  await registerSwagger(app);
  app.addHook('onSend', async (request, reply) => {
    reply.header('x-request-id', request.id);
    reply.header('cache-control', 'no-store');
  });

  const cache = createKeyCache(config.keyCache);
  const metrics = createMetrics({ auditChainLength: async () => (audit.chainLength ? audit.chainLength() : 0), cacheStats: () => cache.stats() });
  registerMetrics(app, metrics.registry);
  registerKekCircuitMetrics(metrics.registry, kek); // when the provider is behind the breaker (kek/index.ts)
  const material = createKeyMaterial({
    kek,
    cache,
    onUnwrapFailure: ({ keyId, version }) => {
      metrics.failedUnwraps.inc();
      audit.recordRead([{ actor: 'system', action: 'key.unwrap', outcome: 'failure', keyId, details: { version } }]).catch((err: unknown) => {
        deps.logger.error({ err }, 'could not audit a failed unwrap');
      });
    },
  });
  const keys = createKeyService({ db: database.db, material, audit, clock });
  const rotation = createRotation({ db: database.db, kek, material, audit, clock, logger: deps.logger, registry: metrics.registry, mqttEnabled: config.mqtt !== undefined });
  const lifecycle = createDeviceLifecycleService({ db: database.db, material, audit, clock, keys, policy: lifecyclePolicyLookup(rotation.policies) });
  const clients = createClientService({ db: database.db, audit, clock, cacheSeconds: config.deliveryKeyCacheSeconds });
  const jwe = createJweEncryptor(config.deliveryJweThreads);
  app.addHook('onClose', async () => jwe.close());
  const fetch = createKeyFetchService({
    db: database.db,
    material,
    clients,
    audit,
    jwe,
    onDelivered: (kind, keyCount) => {
      metrics.keyDeliveries.inc({ kind });
      metrics.deliveredKeys.inc(keyCount);
    },
  });
  // key distribution (distribution/): outbox metrics always; the MQTT publisher only with MQTT_URL,
  // started once the app is ready and stopped (in-flight rows handed back) when it closes
  const distribution = createDistribution({ db: database.db, material, audit, clock, logger: deps.logger, registry: metrics.registry, mqtt: config.mqtt });
  const publisher = distribution.publisher;
  if (publisher) {
    app.addHook('onReady', async () => publisher.start());
    app.addHook('onClose', async () => publisher.stop());
  }

  // Deny by default: a route must say it is public or name the scope it needs.
  app.addHook('onRequest', async (request) => {
    const routeConfig = request.routeOptions.config;
    if (routeConfig.public || request.routeOptions.url?.startsWith('/docs')) return;
    if (request.routeOptions.url === undefined) return; // no route: the not-found handler answers 404
    try {
      request.principal = await authenticator.authenticate(request.headers.authorization);
    } catch (error) {
      if (error instanceof AuthenticationError) {
        metrics.failedAuthentications.inc({ reason: error.reason });
        await audit.recordRead([
          { actor: 'anonymous', action: 'auth.failed', outcome: 'denied', requestId: request.id, details: { reason: error.reason, method: request.method, route: request.routeOptions.url } },
        ]);
      }
      throw error;
    }
    const scope = routeConfig.scope;
    if (scope === undefined || !hasScope(request.principal, scope)) {
      metrics.refusedAuthorizations.inc();
      await audit.recordRead([
        { actor: request.principal.sub, action: 'authz.refused', outcome: 'denied', requestId: request.id, details: { required: scope ?? 'none', method: request.method, route: request.routeOptions.url } },
      ]);
      throw new ForbiddenError(scope ? `This operation needs the ${scope} scope` : 'This operation is not available', 'insufficient_scope');
    }
  });

  await app.register(healthRoutes, { checks: { database: () => database.ping(), kek: () => kek.health() } });
  await app.register(kekRoutes, { kek });
  await app.register(keyRoutes, { keys });
  await app.register(lifecycleRoutes, { lifecycle });
  await app.register(rotationRoutes, { rotation });
  await app.register(rolloutRoutes, { rollouts: rotation.rollouts });
  await app.register(deliveryRoutes, { clients, fetch });
  await app.register(distributionRoutes, { distribution });
  for (const plugin of deps.plugins ?? []) await app.register(plugin);
  return app;
}

