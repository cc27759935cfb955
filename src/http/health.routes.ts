/** Liveness and readiness: no token, no secrets, nothing but reachability. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';

export interface ReadinessChecks {
  database(): Promise<void>;
  kek(): Promise<{ ok: boolean; detail?: string }>;
}

const Check = Type.Object({ ok: Type.Boolean(), detail: Type.Optional(Type.String()) }, { additionalProperties: false });
const Readiness = Type.Object(
  { status: Type.Union([Type.Literal('ready'), Type.Literal('unavailable')]), checks: Type.Object({ database: Check, kek: Check }) },
  { additionalProperties: false },
);

const CHECK_TIMEOUT_MS = 3000;

export const healthRoutes: FastifyPluginAsyncTypebox<{ checks: ReadinessChecks }> = async (app, { checks }) => {
  app.get('/healthz', {
    config: { public: true },
    schema: {
      operationId: 'healthz',
      tags: ['health'],
      summary: 'The process is alive',
      security: [],
      response: { 200: Type.Object({ status: Type.Literal('ok') }) },
    },
    handler: async () => ({ status: 'ok' as const }),
  });

  app.get('/readyz', {
    config: { public: true },
    schema: {
      operationId: 'readyz',
      tags: ['health'],
      summary: 'Database and KEK provider reachable (503 when either is not)',
      security: [],
      response: { 200: Readiness, 503: Readiness },
    },
    handler: async (_request, reply) => {
      const [database, kek] = await Promise.all([
        withTimeout(checks.database().then(() => ({ ok: true }))),
        withTimeout(checks.kek().then((r) => (r.ok ? { ok: true } : { ok: false, detail: 'KEK provider not ready' }))),
      ]);
      const ready = database.ok && kek.ok;
      if (!ready) reply.header('retry-after', '5');
      return reply.code(ready ? 200 : 503).send({ status: ready ? 'ready' : 'unavailable', checks: { database, kek } });
    },
  });
};

async function withTimeout(check: Promise<{ ok: boolean; detail?: string }>): Promise<{ ok: boolean; detail?: string }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<{ ok: boolean; detail: string }>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, detail: 'timed out' }), CHECK_TIMEOUT_MS);
  });
  try {
    // the failure's message may name hosts; keep readiness answers generic
    return await Promise.race([check.catch(() => ({ ok: false, detail: 'unreachable' })), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
