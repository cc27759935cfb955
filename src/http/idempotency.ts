/**
 * `Idempotency-Key` for every POST that changes something, so a client (or cron job) that
 * retries after a timeout never creates, enrols or rotates twice.
 *
 * The rule, from the route table rather than per route: every authenticated POST route takes
 * the header, unless its config says `idempotent: false` (pure reads sent as POST because of
 * their body: `POST /v1/keys/fetch`, `POST /v1/audit/verify`). The header is optional; when it
 * is sent:
 *
 * - it must be 1–255 visible ASCII characters (a UUID is the usual choice), else 400;
 * - the first request is admitted (after authentication and validation: a refused or invalid
 *   request reserves nothing) and its answer, status + content type + body, is stored, keyed
 *   by the token's `sub` and the key, with a fingerprint of method, path and canonical body;
 * - a retry with the same key and the same request gets the stored answer back, with
 *   `Idempotent-Replayed: true`, without running again;
 * - the same key with a different request → 422 `idempotency_key_reused`;
 * - the same key while the first request is still running → 409 `idempotency_key_in_use`
 *   with `Retry-After`;
 * - an answer of 5xx is not stored and the key is given back, so the retry runs again: a 5xx
 *   means the change and its audit event were rolled back together (DESIGN §8). 4xx answers
 *   (404, 409…) are the request's outcome and are replayed like successes.
 * - records expire after IDEMPOTENCY_TTL_SECONDS (24 h); then the key may be used afresh.
 *
 * Keys are per client: two clients using the same key never see each other's answers.
 * Stored answers must never carry key material: a route whose response schema has a `jwe`
 * property is refused at start-up unless it opts out, and an answer with a `jwe` field is
 * never written (the retry is told the outcome was withheld, and still does not run again).
 * An interrupted first request (process killed after admission) leaves its key `in_flight`
 * until it expires: its outcome is unknown, so it is never run a second time by this key.
 */
import crypto from 'node:crypto';
import type { FastifyBaseLogger, FastifyInstance, FastifyRequest, FastifySchema } from 'fastify';
import { canonicalJson } from '../audit/audit.chain.js';
import type { Clock } from '../clock.js';
import { AppError, BadRequestError, ConflictError } from './errors.js';
import * as repository from './idempotency.repository.js';
import { ProblemRef } from './schemas.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** false: a POST that only reads (its retry is harmless) takes no Idempotency-Key */
    idempotent?: boolean;
  }
}

export const IDEMPOTENCY_HEADER = 'idempotency-key';
export const IDEMPOTENCY_KEY_PATTERN = '^[!-~]{1,255}$';
const KEY = new RegExp(IDEMPOTENCY_KEY_PATTERN);
/** Response properties that carry key material: an answer with one is never stored. */
const KEY_MATERIAL_FIELDS = new Set(['jwe']);
const PURGE_EVERY_MS = 10 * 60 * 1000;
const PURGE_BATCH = 1000;

export class IdempotencyKeyReusedError extends AppError {
  constructor() {
    super(422, 'idempotency_key_reused', 'This Idempotency-Key was used for a different request (method, path or body); use a new key for a new request');
  }
}

/** Does this route take an Idempotency-Key? Every authenticated POST, unless it opts out. */
export function takesIdempotencyKey(method: string, config: { public?: boolean; idempotent?: boolean; scope?: string } | undefined): boolean {
  return method === 'POST' && config?.public !== true && config?.idempotent !== false;
}

export interface IdempotencyDeps {
  db: repository.IdempotencyExecutor;
  clock: Clock;
  ttlSeconds: number;
  logger: FastifyBaseLogger;
}

/** Call before any route is registered: the onRoute check and the header schema apply to routes added later. */
export function registerIdempotency(app: FastifyInstance, deps: IdempotencyDeps): void {
  const { db, clock, ttlSeconds, logger } = deps;
  const pending = new WeakMap<FastifyRequest, repository.IdempotencyRecordKey>();
  let lastPurge = 0;

  app.addHook('onRoute', (route) => {
    const methods = [route.method].flat();
    if (!methods.some((m) => takesIdempotencyKey(m, route.config))) return;
    const field = keyMaterialField(route.schema?.response);
    if (field !== undefined) {
      throw new Error(`POST ${route.url}: its responses carry key material (\`${field}\`), which is never stored; set config.idempotent = false`);
    }
    route.schema = withIdempotencyContract(route.schema);
  });

  app.addHook('preHandler', async (request, reply) => {
    const header = request.headers[IDEMPOTENCY_HEADER];
    if (header === undefined || !request.principal || !takesIdempotencyKey(request.method, request.routeOptions.config)) return;
    if (typeof header !== 'string' || !KEY.test(header)) {
      throw new BadRequestError('Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID, say), sent once', { field: 'headers.idempotency-key' });
    }
    const now = clock.now();
    const reservation: repository.Reservation = {
      principal: request.principal.sub,
      key: header,
      requestId: request.id,
      fingerprint: fingerprint(request),
      method: request.method,
      path: request.url,
      now,
      expiresAt: new Date(now.getTime() + ttlSeconds * 1000),
    };
    if (await repository.reserve(db, reservation)) {
      pending.set(request, { principal: reservation.principal, key: reservation.key, requestId: reservation.requestId });
      purgeNow(now);
      return;
    }
    const stored = await repository.find(db, reservation.principal, reservation.key, now);
    if (stored === undefined) {
      // it expired between the two statements: a retry will find the key free
      reply.header('retry-after', '1');
      throw new ConflictError('This Idempotency-Key just expired; retry the request', 'idempotency_key_in_use');
    }
    if (stored.fingerprint !== reservation.fingerprint) throw new IdempotencyKeyReusedError();
    if (stored.state === 'in_flight' || stored.statusCode === null || stored.body === null) {
      reply.header('retry-after', '1');
      throw new ConflictError('A request with this Idempotency-Key is still being processed (or was interrupted); retry later', 'idempotency_key_in_use');
    }
    reply.header('idempotent-replayed', 'true');
    if (stored.contentType !== null) reply.type(stored.contentType);
    return reply.code(stored.statusCode).send(stored.body);
  });

  app.addHook('onSend', async (request, reply, payload) => {
    const record = pending.get(request);
    if (record === undefined) return payload;
    pending.delete(request);
    try {
      if (reply.statusCode >= 500) {
        await repository.release(db, record);
        return payload;
      }
      let body = typeof payload === 'string' ? payload : Buffer.isBuffer(payload) ? payload.toString('utf8') : undefined;
      let statusCode = reply.statusCode;
      let contentType = headerText(reply.getHeader('content-type'));
      if (body === undefined || carriesKeyMaterial(body)) {
        // executed, but its answer cannot be stored: a retry learns that, and does not run again
        request.log.error({ route: request.routeOptions.url }, 'an idempotent answer was not stored (key material or a stream)');
        statusCode = 409;
        contentType = 'application/problem+json';
        body = JSON.stringify(withheldProblem(request.url.split('?')[0] ?? '', request.id));
      }
      const stored = await repository.complete(db, record, { statusCode, contentType, body, completedAt: clock.now() });
      if (!stored) request.log.warn('the idempotency record vanished before its answer was stored');
    } catch (err) {
      // the change has happened: answer the client anyway; a retry with this key gets a 409
      request.log.error({ err }, 'could not store the answer of an idempotent request');
    }
    return payload;
  });

  function purgeNow(now: Date): void {
    if (now.getTime() - lastPurge < PURGE_EVERY_MS) return;
    lastPurge = now.getTime();
    repository.purgeExpired(db, now, PURGE_BATCH).catch((err: unknown) => logger.warn({ err }, 'could not purge expired idempotency keys'));
  }
}

/** SHA-256 over method, path (with query) and the canonical JSON of the validated body. */
function fingerprint(request: FastifyRequest): string {
  const body = request.body === undefined ? '' : canonicalJson(request.body);
  return crypto.createHash('sha256').update(`${request.method} ${request.url}\n`).update(body).digest('hex');
}

/** Document the header and its two problems on the route (validation and OpenAPI alike). */
function withIdempotencyContract(schema: FastifySchema | undefined): FastifySchema {
  const header = {
    type: 'string',
    pattern: IDEMPOTENCY_KEY_PATTERN,
    description:
      'Optional. A retry with the same key and request gets the first answer back without running again (keys live 24 h by default); the same key with another request is a 422; while the first is running, a 409.',
  };
  const headers = (schema?.headers ?? { type: 'object', properties: {} }) as { properties?: Record<string, unknown> };
  const response = schema?.response as Record<string, unknown> | undefined;
  return {
    ...schema,
    headers: { ...headers, properties: { ...headers.properties, [IDEMPOTENCY_HEADER]: header } },
    ...(response ? { response: { ...response, 409: response[409] ?? ProblemRef, 422: response[422] ?? ProblemRef } } : {}),
  };
}

/** The name of a key-material property anywhere in a response schema, if any. */
function keyMaterialField(schema: unknown, seen = new Set<unknown>()): string | undefined {
  if (schema === null || typeof schema !== 'object' || seen.has(schema)) return undefined;
  seen.add(schema);
  const properties = (schema as { properties?: unknown }).properties;
  if (properties !== null && typeof properties === 'object') {
    for (const name of Object.keys(properties)) if (KEY_MATERIAL_FIELDS.has(name)) return name;
  }
  for (const value of Object.values(schema)) {
    const found = keyMaterialField(value, seen);
    if (found !== undefined) return found;
  }
  return undefined;
}

/** Does this JSON text have a key-material field at any depth? (Non-JSON text cannot be checked: treated as yes.) */
export function carriesKeyMaterial(text: string): boolean {
  let value: unknown;
  try {
    value = text === '' ? null : JSON.parse(text);
  } catch {
    return true;
  }
  const stack = [value];
  while (stack.length > 0) {
    const current = stack.pop();
    if (current === null || typeof current !== 'object') continue;
    if (!Array.isArray(current) && Object.keys(current).some((k) => KEY_MATERIAL_FIELDS.has(k))) return true;
    for (const child of Object.values(current)) stack.push(child);
  }
  return false;
}

function withheldProblem(instance: string, requestId: string) {
  return {
    type: 'https://keystrata.dev/problems/idempotent_answer_withheld',
    title: 'Conflict',
    status: 409,
    detail: 'The request with this Idempotency-Key was executed, but its answer is not kept; read the resource to see its outcome',
    code: 'idempotent_answer_withheld',
    instance,
    requestId,
  };
}

function headerText(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (Array.isArray(value) && typeof value[0] === 'string') return value[0];
  return null;
}
