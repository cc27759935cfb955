/**
 * Request budgets (@fastify/rate-limit), one rule for every route, present and future:
 *
 * - per client: a request whose bearer token verified is charged to the token's `sub`
 *   (RATE_LIMIT_PER_CLIENT_MAX per window), whatever the IP (many backends may share a NAT);
 * - per IP: every other request is charged to the client IP (RATE_LIMIT_PER_IP_MAX per window):
 *   no token, a token that failed authentication, an unknown route, the docs. A flood of forged
 *   tokens therefore spends the IP's budget, and once it is spent the IP is refused *before*
 *   the token is verified or the failure is audited (the expensive parts).
 * - routes with `config.public` (health, readiness, metrics) are never limited: a load balancer
 *   or Prometheus must not be locked out.
 *
 * Order of checks: before authentication (an onRequest hook added ahead of the auth hook) a
 * request without a token is charged to its IP; one with a token only *peeks* at its IP's
 * budget and at the budget of the `sub` it claims (decoded, not yet verified: peeking never
 * charges anyone, so naming someone else's `sub` costs them nothing). After authentication
 * (preParsing, before the body is read) it is charged to the verified `sub`. Requests refused
 * by authentication or authorization (401/403) are charged afterwards (onResponse): to their
 * IP, or to their `sub` when the token was valid but lacked the scope.
 *
 * Answers carry `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` (seconds)
 * of the budget they were charged to; a refusal is a 429 problem+json with `Retry-After`.
 *
 * The counters live in this process (an LRU of CACHE_ENTRIES keys): N replicas behind a load
 * balancer each allow the budget, so a client may get up to N times as much. Where that
 * matters, @fastify/rate-limit's Redis store (`redis` option) shares the counters.
 * Behind a reverse proxy set TRUST_PROXY, or every request seems to come from the proxy.
 */
import rateLimit, { normalizeIP, type CreateRateLimitOptions } from '@fastify/rate-limit';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { decodeJwt } from 'jose';
import type { Config } from '../config.js';
import { AppError } from './errors.js';

/** Distinct IPs and clients remembered per window; beyond it the least recently seen are forgotten. */
const CACHE_ENTRIES = 100_000;
const MAX_TOKEN_LENGTH = 8192;

export class TooManyRequestsError extends AppError {
  constructor(message: string) {
    super(429, 'rate_limited', message);
  }
}

type Limiter = ReturnType<FastifyInstance['createRateLimit']>;
type Budget = 'ip' | 'client';

interface RequestState {
  /** charged to a budget already (or exempt) */
  settled: boolean;
  /** the `sub` an unverified token claims, for the peek before authentication */
  claimedSub?: string;
}

export async function registerRateLimits(app: FastifyInstance, settings: Config['rateLimit']): Promise<void> {
  if (!settings.enabled) return;
  // global: false: no route gets the plugin's own hook; ours below apply to every route
  await app.register(rateLimit, { global: false });

  const states = new WeakMap<FastifyRequest, RequestState>();
  const stateOf = (request: FastifyRequest): RequestState => {
    let state = states.get(request);
    if (state === undefined) {
      state = { settled: false };
      states.set(request, state);
    }
    return state;
  };
  const options = (max: number, keyGenerator: (request: FastifyRequest) => string): CreateRateLimitOptions =>
    // `cache` sizes the LRU of this limiter's store (the plugin merges it, its types omit it)
    ({ max, timeWindow: settings.windowSeconds * 1000, keyGenerator, cache: CACHE_ENTRIES }) as CreateRateLimitOptions;
  const limiters: Record<Budget, Limiter> = {
    ip: app.createRateLimit(options(settings.perIpMax, (request) => `ip:${clientIp(request)}`)),
    client: app.createRateLimit(options(settings.perClientMax, (request) => `sub:${request.principal?.sub ?? stateOf(request).claimedSub ?? ''}`)),
  };

  const refuse = (reply: FastifyReply, budget: Budget, max: number, ttlInSeconds: number): never => {
    const after = Math.max(1, ttlInSeconds);
    reply.header('x-ratelimit-limit', max).header('x-ratelimit-remaining', 0).header('x-ratelimit-reset', after).header('retry-after', after);
    throw new TooManyRequestsError(
      budget === 'client'
        ? `Too many requests for this client: at most ${max} per ${settings.windowSeconds} s; retry after ${after} s`
        : `Too many requests without a valid token from this address: at most ${max} per ${settings.windowSeconds} s; retry after ${after} s`,
    );
  };

  /** Charge the request to a budget; refuse it (429) when that budget is spent. */
  const charge = async (request: FastifyRequest, reply: FastifyReply, budget: Budget, mayRefuse = true): Promise<void> => {
    stateOf(request).settled = true;
    const result = await limiters[budget](request);
    if (result.isAllowed) return;
    if (result.isExceeded && mayRefuse) refuse(reply, budget, result.max, result.ttlInSeconds);
    if (!reply.sent) {
      reply.header('x-ratelimit-limit', result.max).header('x-ratelimit-remaining', result.remaining).header('x-ratelimit-reset', result.ttlInSeconds);
    }
  };

  /** Refuse (429) when the budget is already spent, without charging anything. */
  const peek = async (request: FastifyRequest, reply: FastifyReply, budget: Budget): Promise<void> => {
    const result = await limiters[budget](request, { increment: false });
    if (!result.isAllowed && result.remaining <= 0 && result.ttl > 0) {
      stateOf(request).settled = true; // refused without charging anyone (the budget is spent already)
      refuse(reply, budget, result.max, result.ttlInSeconds);
    }
  };

  // Before authentication: registered here, ahead of the auth hook that buildApp adds later.
  app.addHook('onRequest', async (request, reply) => {
    const state = stateOf(request);
    if (request.routeOptions.config.public) {
      state.settled = true; // exempt
      return;
    }
    const authorization = request.headers.authorization;
    if (authorization === undefined || request.routeOptions.url === undefined) {
      await charge(request, reply, 'ip');
      return;
    }
    await peek(request, reply, 'ip');
    state.claimedSub = claimedSub(authorization);
    if (state.claimedSub !== undefined) await peek(request, reply, 'client');
  });

  // After authentication, before the body is read.
  app.addHook('preParsing', async (request, reply) => {
    if (!stateOf(request).settled) await charge(request, reply, request.principal ? 'client' : 'ip');
  });

  // Refused before preParsing (401, 403, a 429 from a peek…): charged now, never refused twice.
  app.addHook('onResponse', async (request, reply) => {
    if (!stateOf(request).settled) await charge(request, reply, request.principal ? 'client' : 'ip', false);
  });
}

function clientIp(request: FastifyRequest): string {
  // an IPv6 client is one /64 (what one host usually gets), as the plugin does by default
  return typeof request.ip === 'string' && request.ip !== '' ? normalizeIP(request.ip, 64) : 'unknown';
}

/** The `sub` an unverified bearer token claims, only to find its budget; never trusted. */
function claimedSub(authorization: string): string | undefined {
  const match = /^Bearer ([A-Za-z0-9_.-]+)$/.exec(authorization);
  if (!match?.[1] || match[1].length > MAX_TOKEN_LENGTH) return undefined;
  try {
    const { sub } = decodeJwt(match[1]);
    return typeof sub === 'string' && sub.length <= 256 ? sub : undefined;
  } catch {
    return undefined;
  }
}
