/** HTTP for rotation: policies, KEK and group rotation, rotation debt, the cron entry. Thin: one service call each. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import { actorOf } from '../http/request-context.js';
import { GroupParams } from '../keys/key.schemas.js';
import type { Rotation } from './index.js';
import * as p from './policy.schemas.js';
import * as s from './rotation.schemas.js';

export const rotationRoutes: FastifyPluginAsyncTypebox<{ rotation: Rotation }> = async (app, { rotation }) => {
  const admin = { scope: 'keystrata:admin' } as const;

  app.get('/v1/policies', {
    config: admin,
    schema: {
      operationId: 'getPolicies',
      tags: ['rotation'],
      summary: 'Default rotation policies per level (kek, group, device, field)',
      response: { 200: p.Policies, ...errorResponses() },
    },
    handler: async () => rotation.policies.getPolicies(),
  });

  app.put('/v1/policies', {
    config: admin,
    schema: {
      operationId: 'putPolicies',
      tags: ['rotation'],
      summary: 'Change default rotation policies (audited as policy.change)',
      description: 'Levels and fields left out keep their current value. Rules beyond the field ranges: device and field levels need percentPerDay, haltThreshold, graceRequiresAck and graceAckMaxHoldDays, and a grace period shorter than the rotation period; kek and group have none of them (null); the group grace period is 0.',
      body: p.PutPoliciesBody,
      response: { 200: p.Policies, ...errorResponses() },
    },
    handler: async (request) => rotation.policies.putPolicies(actorOf(request), request.body),
  });

  app.get('/v1/groups/:groupId/policy', {
    config: admin,
    schema: {
      operationId: 'getGroupPolicy',
      tags: ['rotation'],
      summary: "A group's policy override, maintenance windows and effective policy",
      params: GroupParams,
      response: { 200: p.GroupPolicy, ...errorResponses(404) },
    },
    handler: async (request) => rotation.policies.getGroupPolicy(request.params.groupId),
  });

  app.put('/v1/groups/:groupId/policy', {
    config: admin,
    schema: {
      operationId: 'putGroupPolicy',
      tags: ['rotation'],
      summary: "Replace a group's policy override and maintenance windows (audited as policy.change)",
      description: 'Partial per level: fields left out follow the defaults. `{}` removes the override. Outside its maintenance windows cron starts no rotation of the group.',
      params: GroupParams,
      body: p.PutGroupPolicyBody,
      response: { 200: p.GroupPolicy, ...errorResponses(404) },
    },
    handler: async (request) => rotation.policies.putGroupPolicy(actorOf(request), request.params.groupId, request.body),
  });

  app.post('/v1/kek/rotate', {
    config: admin,
    schema: {
      operationId: 'rotateKek',
      tags: ['kek'],
      summary: 'Rotate the KEK and rewrap every stored KEK blob',
      description:
        'Creates a new KEK version in the provider, rewraps every group DEK and audit key blob to it in batches (transit rewrap: no plaintext leaves the provider; each batch commits with its audit events), then raises min_decryption_version to the lowest version still referenced once the KEK grace period allows. A failed item keeps its old, still readable blob and is listed. `rewrapOnly` finishes an interrupted rewrap without rotating. 409 while another KEK rotation runs.',
      body: s.KekRotateBody,
      response: { 200: s.KekRotationSummary, ...errorResponses(409) },
    },
    handler: async (request) =>
      rotation.kekRotation.run(actorOf(request), { mode: 'manual', rewrapOnly: request.body.rewrapOnly, limit: request.body.limit }),
  });

  app.post('/v1/groups/:groupId/rotate', {
    config: admin,
    schema: {
      operationId: 'rotateGroup',
      tags: ['groups'],
      summary: 'New group DEK version; the device DEKs are rewrapped under it',
      description:
        'The new version becomes primary and the old one decrypt_only. Device DEK wraps move to the new version in chunks (their material does not change); up to `limit` here, the rest by the cron entry. The old version is destroyed by cron once nothing is wrapped under it and the group retention policy allows.',
      params: GroupParams,
      body: s.GroupRotateBody,
      response: { 200: s.GroupRotationResult, ...errorResponses(404, 409) },
    },
    handler: async (request) => rotation.groupRotation.rotate(actorOf(request), request.params.groupId, { limit: request.body.limit ?? s.DEFAULT_RUN_LIMIT }),
  });

  app.get('/v1/groups/:groupId/rotation-status', {
    config: admin,
    schema: {
      operationId: 'getRotationStatus',
      tags: ['rotation'],
      summary: 'Rotation debt: versions per state, children under old parents, what blocks retiring each old version',
      params: GroupParams,
      response: { 200: s.RotationStatus, ...errorResponses(404) },
    },
    handler: async (request) => rotation.status.status(request.params.groupId),
  });

  app.post('/v1/rotation/run', {
    config: { scope: 'keystrata:rotate' },
    schema: {
      operationId: 'runRotation',
      tags: ['rotation'],
      summary: 'The cron entry: rotate what is due, finish rewraps, expire grace, destroy what is due',
      description:
        'Same as `keystrata rotate`. Bounded work (`limit` per kind); safe to call twice at once and to interrupt; `complete: false` means the next run continues. `dryRun` reports it all and changes nothing. Failing steps are listed in `errors` (200), the others still run.',
      body: s.RunBody,
      response: { 200: s.RunSummary, ...errorResponses() },
    },
    handler: async (request) => rotation.runner.run(actorOf(request), { dryRun: request.body.dryRun, limit: request.body.limit, log: request.log }),
  });

  app.get('/v1/compliance/cryptoperiods', {
    config: { scope: 'keystrata:audit:read' },
    schema: {
      operationId: 'getCryptoperiods',
      tags: ['rotation'],
      summary: 'Cryptoperiod report: per key type the configured periods and every version past them',
      description:
        'NIST SP 800-57 / PCI DSS 3.7.4–3.7.5. Originator-usage period: primary + grace (rotation + grace period); recipient-usage period: decrypt_only until the retention ends (KEK: an old version until min_decryption_version passes it, bounded by the KEK grace). Each version is judged by its own group\'s effective policy.',
      querystring: s.CryptoperiodQuery,
      response: { 200: s.CryptoperiodReport, ...errorResponses() },
    },
    handler: async (request) => rotation.compliance.cryptoperiods({ limit: request.query.limit ?? 100 }),
  });
};
