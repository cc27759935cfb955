/** What routes need from an authenticated request, and the route-level auth configuration. */
import type { FastifyRequest } from 'fastify';
import type { Principal, Scope } from '../auth/principal.js';
import { UnauthorizedError } from './errors.js';
import type { Actor } from '../keys/key.service.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** the scope a route requires; a route with neither `scope` nor `public` is refused (deny by default) */
    scope?: Scope;
    /** health, metrics and docs: no token */
    public?: boolean;
  }
  interface FastifyRequest {
    principal?: Principal;
  }
}

export function principalOf(request: FastifyRequest): Principal {
  if (!request.principal) throw new UnauthorizedError();
  return request.principal;
}

export function actorOf(request: FastifyRequest): Actor {
  return { actor: principalOf(request).sub, requestId: request.id };
}
