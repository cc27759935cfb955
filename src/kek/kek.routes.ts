/** GET /v1/kek: which KEK, which provider, which versions. Never any material. */
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { errorResponses } from '../http/schemas.js';
import type { KekProvider } from './kek.types.js';

const KekView = Type.Object(
  {
    name: Type.String(),
    provider: Type.Union([Type.Literal('local'), Type.Literal('vault')]),
    type: Type.String(),
    derived: Type.Boolean(),
    latestVersion: Type.Integer(),
    minDecryptionVersion: Type.Integer(),
    minEncryptionVersion: Type.Integer(),
    versions: Type.Array(Type.Object({ version: Type.Integer(), createdAt: Type.String() }, { additionalProperties: false })),
  },
  { additionalProperties: false },
);

export const kekRoutes: FastifyPluginAsyncTypebox<{ kek: KekProvider }> = async (app, { kek }) => {
  app.get('/v1/kek', {
    config: { scope: 'keystrata:admin' },
    schema: {
      operationId: 'getKek',
      tags: ['kek'],
      summary: 'The KEK: name, provider, versions, minimum decryption version',
      response: { 200: KekView, ...errorResponses() },
    },
    handler: async () => kek.info(),
  });
};
