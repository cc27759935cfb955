/** HTTP for groups, devices and field keys: schema in, one service call, typed result out. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import { actorOf } from '../http/request-context.js';
import type { KeyService } from './key.service.js';
import * as s from './key.schemas.js';

export const BULK_BODY_LIMIT_BYTES = 2 * 1024 * 1024;

export const keyRoutes: FastifyPluginAsyncTypebox<{ keys: KeyService }> = async (app, { keys }) => {
  const admin = { scope: 'keystrata:admin' } as const;

  app.post('/v1/groups', {
    config: admin,
    schema: {
      operationId: 'createGroup',
      tags: ['groups'],
      summary: 'Create a group and its first group DEK version',
      body: s.CreateGroupBody,
      response: { 201: s.Group, ...errorResponses(409) },
    },
    handler: async (request, reply) => reply.code(201).send(await keys.createGroup(actorOf(request), request.body)),
  });

  app.get('/v1/groups', {
    config: admin,
    schema: {
      operationId: 'listGroups',
      tags: ['groups'],
      summary: 'List groups with their versions',
      querystring: s.ListQuery,
      response: { 200: s.GroupList, ...errorResponses() },
    },
    handler: async (request) => keys.listGroups(request.query.cursor, request.query.limit ?? 100),
  });

  app.get('/v1/groups/:groupId', {
    config: admin,
    schema: {
      operationId: 'getGroup',
      tags: ['groups'],
      summary: 'Read a group and its DEK versions with their states',
      params: s.GroupParams,
      response: { 200: s.Group, ...errorResponses(404) },
    },
    handler: async (request) => keys.getGroup(request.params.groupId),
  });

  app.post('/v1/groups/:groupId/devices', {
    config: admin,
    schema: {
      operationId: 'enrolDevice',
      tags: ['devices'],
      summary: 'Enrol one device (device DEK version 1 under the group primary)',
      params: s.GroupParams,
      body: s.EnrolDeviceBody,
      response: { 201: s.Device, ...errorResponses(404, 409) },
    },
    handler: async (request, reply) => {
      await keys.enrolDevices(actorOf(request), request.params.groupId, [request.body.id]);
      return reply.code(201).send(await keys.getDevice(request.body.id));
    },
  });

  app.post('/v1/groups/:groupId/devices/bulk', {
    config: admin,
    // 10,000 ids of up to 128 characters are ~1.3 MB of JSON
    bodyLimit: BULK_BODY_LIMIT_BYTES,
    schema: {
      operationId: 'enrolDevicesBulk',
      tags: ['devices'],
      summary: 'Enrol up to 10,000 devices in one call, all or nothing',
      params: s.GroupParams,
      body: s.EnrolBulkBody,
      response: { 201: s.EnrolBulkResult, ...errorResponses(404, 409, 413) },
    },
    handler: async (request, reply) => {
      const result = await keys.enrolDevices(actorOf(request), request.params.groupId, request.body.ids);
      return reply.code(201).send({ groupId: request.params.groupId, ...result });
    },
  });

  app.get('/v1/devices/:deviceId', {
    config: admin,
    schema: {
      operationId: 'getDevice',
      tags: ['devices'],
      summary: 'Read a device: DEK versions with states, and its field keys',
      params: s.DeviceParams,
      response: { 200: s.Device, ...errorResponses(404) },
    },
    handler: async (request) => keys.getDevice(request.params.deviceId),
  });

  app.post('/v1/devices/:deviceId/fields', {
    config: admin,
    schema: {
      operationId: 'createFieldKey',
      tags: ['field keys'],
      summary: 'Create a field key for one sensitive field type of a device',
      params: s.DeviceParams,
      body: s.CreateFieldBody,
      response: { 201: s.FieldKey, ...errorResponses(404, 409) },
    },
    handler: async (request, reply) => reply.code(201).send(await keys.createFieldKey(actorOf(request), request.params.deviceId, request.body.field)),
  });
};
