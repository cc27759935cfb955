/** OpenAPI document from the route schemas, and Swagger UI at /docs with a bearer "Authorize". */
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance } from 'fastify';

export const OPENAPI_INFO = {
  title: 'keystrata',
  description:
    'Key management for IoT fleets: KEK → group DEK → device DEK → field key. Keys are delivered only as JWE to a ' +
    "backend's registered delivery key. Authorize with a bearer JWT (`npx keystrata token --scope keystrata:admin` in the embedded default).",
  version: '1',
};

export async function registerSwagger(app: FastifyInstance): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: OPENAPI_INFO,
      components: { securitySchemes: { bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' } } },
      security: [{ bearerAuth: [] }],
      tags: [
        { name: 'health', description: 'liveness, readiness, metrics' },
        { name: 'kek', description: 'the key-encryption key (held by the KEK provider)' },
        { name: 'groups', description: 'groups and their DEK versions' },
        { name: 'devices', description: 'devices and their DEK versions' },
        { name: 'field keys', description: 'per-device keys of sensitive field types' },
        { name: 'clients', description: 'backend services and their delivery keys' },
        { name: 'key fetch', description: 'keys delivered as JWE' },
        { name: 'audit', description: 'the hash-chained audit log' },
      ],
    },
    // name shared schemas by their $id (e.g. #/components/schemas/Problem) instead of def-N
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => (typeof json.$id === 'string' ? json.$id : `def-${i}`) },
  });
  // persistAuthorization stays off: it would keep an admin's bearer token in localStorage.
  await app.register(swaggerUi, {
    routePrefix: '/docs',
    uiConfig: { persistAuthorization: false, docExpansion: 'list', deepLinking: true, tryItOutEnabled: true },
    staticCSP: true,
  });
}
