/** HTTP for the version lifecycle: rotate, crypto-shred and restore, disable and enable. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import { actorOf } from '../http/request-context.js';
import type { DeviceLifecycleService } from './device-lifecycle.service.js';
import { Device } from './key.schemas.js';
import * as s from './lifecycle.schemas.js';

export const lifecycleRoutes: FastifyPluginAsyncTypebox<{ lifecycle: DeviceLifecycleService }> = async (app, { lifecycle }) => {
  const admin = { scope: 'keystrata:admin' } as const;
  // these bodies only carry options: a POST without one (no content type) means `{}`
  app.addHook('preValidation', async (request) => {
    if (request.method === 'POST' && request.body === undefined) request.body = {};
  });

  app.post('/v1/devices/:deviceId/rotate', {
    config: admin,
    schema: {
      operationId: 'rotateDevice',
      tags: ['devices'],
      summary: 'Rotate a device DEK now (e.g. suspected compromise)',
      description:
        'New device DEK version as primary under the group primary; the old primary goes to `grace` (or `disabled` with `compromised`); the field keys are rewrapped under the new version (their material does not change). 409 while the device is scheduled for destruction, or when it was rotated concurrently.',
      params: s.DeviceParams,
      body: s.RotateBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) => lifecycle.rotateDevice(actorOf(request), request.params.deviceId, { compromised: request.body.compromised }),
  });

  app.post('/v1/devices/:deviceId/fields/:field/rotate', {
    config: admin,
    schema: {
      operationId: 'rotateFieldKey',
      tags: ['field keys'],
      summary: 'Rotate a field key now',
      description: 'New field key version as primary under the device primary; the old primary goes to `grace` (or `disabled` with `compromised`).',
      params: s.FieldParams,
      body: s.RotateBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) => lifecycle.rotateField(actorOf(request), request.params.deviceId, request.params.field, { compromised: request.body.compromised }),
  });

  app.delete('/v1/devices/:deviceId', {
    config: admin,
    schema: {
      operationId: 'destroyDevice',
      tags: ['devices'],
      summary: 'Crypto-shred a device: schedule its DEK versions and field keys for destruction',
      description:
        'Every version becomes `destroy_scheduled` (not delivered) until `destroyAfter`; then the cron entry erases the material and fetches answer 410. `POST …/restore` cancels within the waiting period.',
      params: s.DeviceParams,
      querystring: s.DestroyQuery,
      response: { 202: s.DestructionSchedule, ...errorResponses(404, 409) },
    },
    handler: async (request, reply) =>
      reply.code(202).send(await lifecycle.scheduleDestruction(actorOf(request), request.params.deviceId, { waitDays: request.query.waitDays })),
  });

  app.post('/v1/devices/:deviceId/restore', {
    config: admin,
    schema: {
      operationId: 'restoreDevice',
      tags: ['devices'],
      summary: 'Cancel a scheduled destruction: every version back to the state it had',
      description: '409 when the device is not scheduled for destruction, or once the waiting period is over.',
      params: s.DeviceParams,
      body: s.EmptyBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) => lifecycle.restore(actorOf(request), request.params.deviceId),
  });

  app.post('/v1/devices/:deviceId/versions/:version/disable', {
    config: admin,
    schema: {
      operationId: 'disableDeviceVersion',
      tags: ['devices'],
      summary: 'Revoke a device DEK version (reversible)',
      description:
        'Any deliverable version. The primary only if a version takes its place: the newest `grace` version becomes primary again (the field keys are rewrapped under it); with none, `force` replaces it by a fresh primary, and without `force` the answer is 409. A device never stays without a readable primary.',
      params: s.DeviceVersionParams,
      body: s.DisableBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) =>
      lifecycle.disableVersion(actorOf(request), { deviceId: request.params.deviceId, version: request.params.version }, { force: request.body.force }),
  });

  app.post('/v1/devices/:deviceId/versions/:version/enable', {
    config: admin,
    schema: {
      operationId: 'enableDeviceVersion',
      tags: ['devices'],
      summary: 'Reinstate a disabled device DEK version as decrypt_only (never as primary)',
      params: s.DeviceVersionParams,
      body: s.EmptyBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) => lifecycle.enableVersion(actorOf(request), { deviceId: request.params.deviceId, version: request.params.version }),
  });

  app.post('/v1/devices/:deviceId/fields/:field/versions/:version/disable', {
    config: admin,
    schema: {
      operationId: 'disableFieldKeyVersion',
      tags: ['field keys'],
      summary: 'Revoke a field key version (reversible)',
      description: 'Same rules as for device DEK versions: the primary only if a grace version takes its place, or with `force` (a fresh primary).',
      params: s.FieldVersionParams,
      body: s.DisableBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) =>
      lifecycle.disableVersion(actorOf(request), { deviceId: request.params.deviceId, field: request.params.field, version: request.params.version }, { force: request.body.force }),
  });

  app.post('/v1/devices/:deviceId/fields/:field/versions/:version/enable', {
    config: admin,
    schema: {
      operationId: 'enableFieldKeyVersion',
      tags: ['field keys'],
      summary: 'Reinstate a disabled field key version as decrypt_only (never as primary)',
      params: s.FieldVersionParams,
      body: s.EmptyBody,
      response: { 200: Device, ...errorResponses(404, 409) },
    },
    handler: async (request) =>
      lifecycle.enableVersion(actorOf(request), { deviceId: request.params.deviceId, field: request.params.field, version: request.params.version }),
  });
};
