/**
 * The one place errors become HTTP answers: RFC 9457 problem+json with the request id.
 * AppErrors carry their status; validation, parsing and size errors from Fastify become 4xx;
 * PostgreSQL errors are mapped here (unique violation → 409, unreachable → 503); anything
 * else is a 500 with a generic message, logged in full (with secrets redacted by pino).
 */
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { AppError, UnavailableError } from './errors.js';

interface ProblemBody {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  instance?: string;
  requestId?: string;
  [extra: string]: unknown;
}

const TITLES: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  406: 'Not Acceptable',
  409: 'Conflict',
  410: 'Gone',
  413: 'Payload Too Large',
  414: 'URI Too Long',
  415: 'Unsupported Media Type',
  422: 'Unprocessable Content',
  429: 'Too Many Requests',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

// SQLSTATE classes meaning "the database is not there right now"
const PG_UNAVAILABLE = /^(08|53|57P0[1-3])/;
const NODE_NET_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EHOSTUNREACH']);

export function toProblem(error: unknown, request: FastifyRequest): { problem: ProblemBody; retryAfter?: number } {
  const base = (status: number, code: string, detail: string, extra: Record<string, unknown> = {}): ProblemBody => ({
    type: `https://keystrata.dev/problems/${code}`,
    title: TITLES[status] ?? 'Error',
    status,
    detail,
    code,
    instance: request.url.split('?')[0],
    requestId: request.id,
    ...extra,
  });

  if (error instanceof AppError) {
    const problem = base(error.status, error.code, error.message, error.extra);
    return error instanceof UnavailableError ? { problem, retryAfter: error.retryAfterSeconds } : { problem };
  }

  const fastifyError = error as FastifyError & { validation?: Array<{ instancePath: string; message?: string; params?: Record<string, unknown> }>; validationContext?: string };
  if (fastifyError.validation) {
    const context = fastifyError.validationContext ?? 'body';
    const errors = fastifyError.validation.map((v) => {
      const extraProperty = v.params?.additionalProperty;
      const missing = v.params?.missingProperty;
      const path = `${context}${v.instancePath.replace(/\//g, '.')}${extraProperty ? `.${String(extraProperty)}` : ''}${missing ? `.${String(missing)}` : ''}`;
      return { field: path, message: v.message ?? 'is invalid' };
    });
    const first = errors[0];
    return { problem: base(400, 'validation_failed', first ? `${first.field} ${first.message}` : 'Request validation failed', { field: first?.field, errors }) };
  }

  if (typeof fastifyError.statusCode === 'number' && fastifyError.statusCode >= 400 && fastifyError.statusCode < 500) {
    // Fastify's own client errors: bad JSON, unsupported media type, body too large, …
    const code = (fastifyError.code ?? 'bad_request').replace(/^FST_ERR_/, '').toLowerCase();
    return { problem: base(fastifyError.statusCode, code, safeClientMessage(fastifyError)) };
  }

  const pgCode = (error as { code?: unknown }).code;
  if (typeof pgCode === 'string') {
    if (pgCode === '23505') return { problem: base(409, 'already_exists', 'A resource with that id already exists') };
    // text PostgreSQL cannot hold (a NUL character; an escape jsonb refuses) in a value the schema let through
    if (pgCode === '22021' || pgCode === '22P05') return { problem: base(400, 'unsupported_character', 'The request contains a character that cannot be stored or searched for (e.g. NUL)') };
    if (pgCode === '40001' || pgCode === '40P01') {
      return { problem: base(503, 'retry', 'The request conflicted with a concurrent one; retry it'), retryAfter: 1 };
    }
    if (PG_UNAVAILABLE.test(pgCode) || NODE_NET_ERRORS.has(pgCode)) {
      return { problem: base(503, 'database_unavailable', 'The database is unavailable'), retryAfter: 5 };
    }
  }
  // pg's messages for a connection lost or never made; "not queryable" is what a client whose
  // connection died answers next, e.g. to the ROLLBACK of an interrupted transaction, whose error
  // Kysely throws in place of the first one
  if (error instanceof Error && /Connection terminated|is not queryable|timeout exceeded when trying to connect|connect ECONNREFUSED/i.test(error.message)) {
    return { problem: base(503, 'database_unavailable', 'The database is unavailable'), retryAfter: 5 };
  }
  return { problem: base(500, 'internal_error', 'An internal error occurred; the request id identifies it in the logs') };
}

function safeClientMessage(error: FastifyError): string {
  switch (error.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return 'Unsupported content type: send application/json';
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return 'The request body is too large';
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return 'The JSON body is empty';
    case 'FST_ERR_BAD_URL':
      return 'The URL is not valid: a percent-encoding is malformed or not UTF-8';
    case 'FST_ERR_MAX_PARAM_LENGTH':
      return 'A path parameter is too long';
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case undefined:
      return error.statusCode === 400 ? 'The request body is not valid JSON' : 'The request was refused';
    default:
      // Fastify's messages never carry request data except the body parser's (handled above)
      return error.message.slice(0, 200);
  }
}

export function sendProblem(reply: FastifyReply, problem: ProblemBody, retryAfter?: number): FastifyReply {
  if (retryAfter !== undefined) reply.header('retry-after', String(retryAfter));
  if (problem.status === 401) reply.header('www-authenticate', 'Bearer realm="keystrata", error="invalid_token"');
  return reply.code(problem.status).type('application/problem+json').send(problem);
}

/**
 * Fastify's `frameworkErrors` option: errors the router meets before any route or hook (a URL
 * whose percent-encoding is not UTF-8, a path parameter over maxParamLength) answer a problem
 * too; Fastify's default wrote plain JSON echoing the path.
 */
export function frameworkErrors(error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  const { problem, retryAfter } = toProblem(error, request);
  request.log.info({ code: problem.code, status: problem.status }, 'request refused');
  reply.header('x-request-id', request.id);
  reply.header('cache-control', 'no-store');
  void sendProblem(reply, problem, retryAfter);
}

export function registerErrorHandling(app: FastifyInstance): void {
  app.setErrorHandler((error, request, reply) => {
    const { problem, retryAfter } = toProblem(error, request);
    if (problem.status >= 500) request.log.error({ err: error }, 'request failed');
    else request.log.info({ code: problem.code, status: problem.status }, 'request refused');
    return sendProblem(reply, problem, retryAfter);
  });
  app.setNotFoundHandler((request, reply) => {
    const problem: ProblemBody = {
      type: 'https://keystrata.dev/problems/not_found',
      title: 'Not Found',
      status: 404,
      detail: `No route ${request.method} ${request.url.split('?')[0]}`,
      code: 'route_not_found',
      requestId: request.id,
    };
    return sendProblem(reply, problem);
  });
}
