/** HTTP for key distribution: a device's outbox and acknowledgements. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { errorResponses } from '../http/schemas.js';
import type { DistributionService } from './distribution.service.js';
import * as s from './distribution.schemas.js';

export const distributionRoutes: FastifyPluginAsyncTypebox<{ distribution: Pick<DistributionService, 'getDevice'> }> = async (app, { distribution }) => {
  app.get('/v1/devices/:deviceId/distribution', {
    config: { scope: 'keystrata:admin' },
    schema: {
      operationId: 'getDeviceDistribution',
      tags: ['devices'],
      summary: 'Key updates sent to a device over MQTT and the versions it has acknowledged',
      description:
        'The device\'s outbox (each row is one MQTT message on `keystrata/devices/{deviceId}/keys`, marked published once the broker completed QoS 2), the key versions the device acknowledged on `…/keys/ack`, and the current versions still awaiting its acknowledgement.',
      params: s.DeviceParams,
      response: { 200: s.DeviceDistribution, ...errorResponses(404) },
    },
    handler: async (request) => distribution.getDevice(request.params.deviceId),
  });
};
