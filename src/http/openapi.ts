/**
 * The OpenAPI document, generated from the route schemas with inert parts (no database, no
 * KEK: registering routes touches neither). `npm run openapi` writes it to openapi/openapi.json;
 * test/http/openapi.test.ts fails when the committed file drifts from the routes.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildApp, type AppDeps } from '../app.js';
import { auditRoutes } from '../audit/audit.routes.js';
import type { AuditService } from '../audit/audit.service.js';
import { systemClock } from '../clock.js';
import { loadConfig } from '../config.js';
import { createLogger } from '../logger.js';

export const OPENAPI_FILE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../openapi/openapi.json');

/** A stand-in that may be passed around and have its members read, but never be called. */
const inert = <T>(path = 'dependency'): T =>
  new Proxy(() => undefined, {
    get: (_target, property) => (property === 'then' ? undefined : inert(`${path}.${String(property)}`)),
    apply: () => {
      throw new Error(`OpenAPI generation called ${path}`);
    },
  }) as T;

export async function generateOpenApi(): Promise<Record<string, unknown>> {
  const deps: AppDeps = {
    config: loadConfig({}),
    database: inert(),
    kek: inert(),
    audit: inert(),
    authenticator: inert(),
    clock: systemClock,
    logger: createLogger('silent'),
    plugins: [async (app) => app.register(auditRoutes, { audit: inert<AuditService>() })],
  };
  const app = await buildApp(deps);
  await app.ready();
  const document = app.swagger() as unknown as Record<string, unknown>;
  await app.close();
  return document;
}

export function serializeOpenApi(document: Record<string, unknown>): string {
  return `${JSON.stringify(document, null, 2)}\n`;
}
