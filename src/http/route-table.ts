/**
 * Every route the app registers, with its method, URL, config (scope, public, idempotent),
 * schema and body limit, collected by an onRoute hook. Tests walk it to cover every route,
 * present and future (the authorization matrix, body limits), instead of keeping a list that
 * drifts; it also backs checks that must hold for every route.
 */
import type { FastifyContextConfig, FastifyInstance, FastifySchema } from 'fastify';

export interface RouteEntry {
  method: string;
  url: string;
  config: FastifyContextConfig;
  schema: FastifySchema | undefined;
  /** the route's own body limit; undefined → the app's BODY_LIMIT_BYTES */
  bodyLimit: number | undefined;
}

declare module 'fastify' {
  interface FastifyInstance {
    routeTable: ReadonlyArray<RouteEntry>;
  }
}

/** Call before any route is registered (onRoute sees only routes added after it). */
export function registerRouteTable(app: FastifyInstance): void {
  const table: RouteEntry[] = [];
  app.decorate('routeTable', table);
  app.addHook('onRoute', (route) => {
    for (const method of [route.method].flat()) {
      table.push({ method, url: route.url, config: (route.config ?? {}) as FastifyContextConfig, schema: route.schema, bodyLimit: route.bodyLimit });
    }
  });
}
