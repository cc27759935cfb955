/** HTTP for staggered rollouts: start, list, read, pause, resume, cancel. Thin: one service call each. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { actorOf } from '../http/request-context.js';
import { errorResponses } from '../http/schemas.js';
import type { RolloutService } from './rollout.service.js';
import * as s from './rollout.schemas.js';

export const rolloutRoutes: FastifyPluginAsyncTypebox<{ rollouts: RolloutService }> = async (app, { rollouts }) => {
  const admin = { scope: 'keystrata:admin' } as const;
  // pause, resume and cancel take no options: a POST without a body (no content type) means `{}`
  app.addHook('preValidation', async (request) => {
    if (request.method === 'POST' && request.body === undefined) request.body = {};
  });

  app.post('/v1/rollouts', {
    config: admin,
    schema: {
      operationId: 'startRollout',
      tags: ['rollouts'],
      summary: "Start a staggered rollout of a group's device DEKs or field keys",
      description:
        'Devices go into waves by a stable hash of their id (turned by the rollout id): an optional canary first, then `percentPerDay` of the group per wave, one wave every `waveIntervalSeconds`, then a final sweep for devices enrolled after their wave. The cron entry (`POST /v1/rotation/run`) rotates the due waves in chunks: new primary, previous primary to grace, field keys rewrapped, an audit event per device. A wave whose failure rate exceeds `haltThreshold` halts the rollout (with `rollbackOnHalt`, its devices go back to their previous primary). Defaults come from the group\'s effective policy for the level. 409 while the group has an active rollout of the level.',
      body: s.StartRolloutBody,
      response: { 201: s.Rollout, ...errorResponses(404, 409) },
    },
    handler: async (request, reply) => {
      reply.code(201);
      return rollouts.start(actorOf(request), request.body);
    },
  });

  app.get('/v1/rollouts', {
    config: admin,
    schema: {
      operationId: 'listRollouts',
      tags: ['rollouts'],
      summary: 'Rollouts, newest first, with their totals',
      querystring: s.ListRolloutsQuery,
      response: { 200: s.RolloutList, ...errorResponses() },
    },
    handler: async (request) => rollouts.list({ limit: request.query.limit ?? 100, cursor: request.query.cursor, groupId: request.query.groupId, state: request.query.state }),
  });

  app.get('/v1/rollouts/:rolloutId', {
    config: admin,
    schema: {
      operationId: 'getRollout',
      tags: ['rollouts'],
      summary: 'A rollout: per wave its due time, devices, done, failed and state; devices still on old versions; failed devices',
      params: s.RolloutParams,
      response: { 200: s.Rollout, ...errorResponses(404) },
    },
    handler: async (request) => rollouts.get(request.params.rolloutId),
  });

  const control = (action: 'pause' | 'resume' | 'cancel', summary: string, description: string) =>
    app.post(`/v1/rollouts/:rolloutId/${action}`, {
      config: admin,
      schema: {
        operationId: `${action}Rollout`,
        tags: ['rollouts'],
        summary,
        description,
        params: s.RolloutParams,
        body: s.EmptyBody,
        response: { 200: s.Rollout, ...errorResponses(404, 409) },
      },
      handler: async (request) => rollouts[action](actorOf(request), request.params.rolloutId),
    });

  control('pause', 'Pause a running rollout (audited)', 'No new chunk starts; a chunk in flight rolls back whole. 409 unless running.');
  control('resume', 'Resume a paused or halted rollout (audited)', 'The schedule moves by the time it was held. A halted wave goes on, its failure rate counted afresh from here. 409 unless paused or halted.');
  control(
    'cancel',
    'Cancel a rollout (audited)',
    'Valid until it has finished: running, paused, halted or rolling back. No further device is changed; every device stays on a readable primary (rotated or not). 409 once completed, cancelled or rolled back.',
  );
};
