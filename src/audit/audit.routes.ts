/** HTTP for the audit log: schema in, one service call, typed result out. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import type { AuditService } from './audit.service.js';
import * as s from './audit.schemas.js';

export type AuditRoutesService = Pick<AuditService, 'queryEvents' | 'verify' | 'listCheckpoints' | 'createCheckpoint'>;

export const auditRoutes: FastifyPluginAsyncTypebox<{ audit: AuditRoutesService }> = async (app, { audit }) => {
  const auditRead = { scope: 'keystrata:audit:read' } as const;

  app.get('/v1/audit/events', {
    config: auditRead,
    schema: {
      operationId: 'listAuditEvents',
      tags: ['audit'],
      summary: 'List audit events, filtered, in chain order (cursor pagination)',
      querystring: s.AuditEventsQuery,
      response: { 200: s.AuditEventPage, ...errorResponses() },
    },
    handler: async (request) => {
      const { cursor, limit, ...filters } = request.query;
      return audit.queryEvents(filters, cursor, limit ?? 100);
    },
  });

  app.post('/v1/audit/verify', {
    config: { ...auditRead, idempotent: false }, // a read: repeating it is harmless
    schema: {
      operationId: 'verifyAuditChain',
      tags: ['audit'],
      summary: 'Walk the hash chain (whole, from a position or from a checkpoint) and report the first broken link',
      body: s.VerifyBody,
      response: { 200: s.VerifyResult, ...errorResponses(404) },
    },
    // an empty POST means "verify everything"
    preValidation: async (request) => {
      request.body ??= {};
    },
    handler: async (request) => audit.verify(request.body),
  });

  app.get('/v1/audit/checkpoints', {
    config: auditRead,
    schema: {
      operationId: 'listAuditCheckpoints',
      tags: ['audit'],
      summary: 'Signed checkpoints of the chain head (newest first) with the public key that verifies them offline',
      querystring: s.CheckpointsQuery,
      response: { 200: s.CheckpointPage, ...errorResponses() },
    },
    handler: async (request) => audit.listCheckpoints({ cursor: request.query.cursor, limit: request.query.limit }),
  });

  app.post('/v1/audit/checkpoints', {
    config: { scope: 'keystrata:admin' },
    schema: {
      operationId: 'createAuditCheckpoint',
      tags: ['audit'],
      summary: 'Sign the current chain head now (on demand; a timer can also do it periodically)',
      response: { 201: s.Checkpoint, ...errorResponses() },
    },
    handler: async (_request, reply) => reply.code(201).send(await audit.createCheckpoint()),
  });
};
