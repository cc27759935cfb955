/** HTTP for backend clients: delivery keys (admin) and key fetch (keys:read). */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import { actorOf, principalOf } from '../http/request-context.js';
import type { ClientService } from './client.service.js';
import type { KeyFetchService } from './key-fetch.service.js';
import * as s from './delivery.schemas.js';

const parseVersion = (version: string | undefined): number | 'all' => (version === undefined || version === 'all' ? 'all' : Number(version));

export const deliveryRoutes: FastifyPluginAsyncTypebox<{ clients: ClientService; fetch: KeyFetchService }> = async (app, { clients, fetch }) => {
  app.put('/v1/clients/:clientId/delivery-key', {
    config: { scope: 'keystrata:admin' },
    schema: {
      operationId: 'setDeliveryKey',
      tags: ['clients'],
      summary: "Register (or replace) a backend's public delivery key",
      params: s.ClientParams,
      body: s.SetDeliveryKeyBody,
      response: { 200: s.DeliveryKeyView, ...errorResponses() },
    },
    handler: async (request) => clients.setDeliveryKey(actorOf(request), request.params.clientId, request.body.jwk),
  });

  app.get('/v1/devices/:deviceId/keys', {
    config: { scope: 'keystrata:keys:read' },
    schema: {
      operationId: 'fetchDeviceKeys',
      tags: ['key fetch'],
      summary: 'Device DEK version(s) as a JWE to your delivery key',
      params: s.DeviceKeysParams,
      querystring: s.VersionQuery,
      response: { 200: s.JweResult, ...errorResponses(404, 409, 410) },
    },
    handler: async (request) =>
      fetch.fetchOne(principalOf(request), request.id, { deviceId: request.params.deviceId, version: parseVersion(request.query.version) }),
  });

  app.get('/v1/devices/:deviceId/fields/:field/keys', {
    config: { scope: 'keystrata:keys:read' },
    schema: {
      operationId: 'fetchFieldKeys',
      tags: ['key fetch'],
      summary: 'Field key version(s) as a JWE to your delivery key',
      params: s.FieldKeysParams,
      querystring: s.VersionQuery,
      response: { 200: s.JweResult, ...errorResponses(404, 409, 410) },
    },
    handler: async (request) =>
      fetch.fetchOne(principalOf(request), request.id, {
        deviceId: request.params.deviceId,
        field: request.params.field,
        version: parseVersion(request.query.version),
      }),
  });

  app.post('/v1/keys/fetch', {
    // a read (POST for its body); its answer is key material, never stored for Idempotency-Key replays
    config: { scope: 'keystrata:keys:read', idempotent: false },
    schema: {
      operationId: 'fetchKeys',
      tags: ['key fetch'],
      summary: 'Up to 1,000 (device, field?, version?) keys as ONE JWE whose payload is a JWK Set',
      body: s.FetchBody,
      response: { 200: s.FetchResult, ...errorResponses(413) },
    },
    handler: async (request) => fetch.fetchMany(principalOf(request), request.id, request.body.items),
  });
};
