import { Type } from '@sinclair/typebox';
import { ClientId, DeviceId, FieldName, ID_PATTERN } from '../http/schemas.js';
import { MAX_FETCH_ITEMS } from './key-fetch.service.js';

export const ClientParams = Type.Object({ clientId: ClientId }, { additionalProperties: false });

const PublicJwk = Type.Object(
  {
    kty: Type.Union([Type.Literal('EC'), Type.Literal('OKP')]),
    crv: Type.Union([Type.Literal('P-256'), Type.Literal('X25519')]),
    x: Type.String({ maxLength: 64 }),
    y: Type.Optional(Type.String({ maxLength: 64 })),
    use: Type.Optional(Type.String({ maxLength: 16 })),
    alg: Type.Optional(Type.String({ maxLength: 32 })),
    kid: Type.Optional(Type.String({ maxLength: 128 })),
  },
  {
    // private members (d, …) are refused by the service with a precise message, so they are allowed through validation
    additionalProperties: true,
    maxProperties: 16,
    description: 'public EC P-256 or OKP X25519 JWK; private members are refused',
    examples: [{ kty: 'OKP', crv: 'X25519', x: '3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08' }],
  },
);

export const SetDeliveryKeyBody = Type.Object({ jwk: PublicJwk }, { additionalProperties: false });

export const DeliveryKeyView = Type.Object(
  {
    clientId: ClientId,
    kid: Type.String({ description: 'RFC 7638 thumbprint; the `kid` of every JWE delivered to this client' }),
    jwk: Type.Object({ kty: Type.String(), crv: Type.String(), x: Type.String(), y: Type.Optional(Type.String()) }, { additionalProperties: false }),
    updatedAt: Type.String({ format: 'date-time' }),
  },
  { additionalProperties: false },
);

const VersionSelector = Type.Union([Type.Literal('all'), Type.String({ pattern: '^[1-9][0-9]{0,9}$' })], {
  description: 'a version number, or `all` (default): every deliverable version',
});

export const DeviceKeysParams = Type.Object({ deviceId: DeviceId }, { additionalProperties: false });
export const FieldKeysParams = Type.Object({ deviceId: DeviceId, field: FieldName }, { additionalProperties: false });
export const VersionQuery = Type.Object({ version: Type.Optional(VersionSelector) }, { additionalProperties: false });

export const JweResult = Type.Object(
  { jwe: Type.String({ description: 'compact JWE (ECDH-ES+A256KW / A256GCM) to your delivery key; payload: a JWK Set' }) },
  { additionalProperties: false },
);

export const FetchBody = Type.Object(
  {
    items: Type.Array(
      Type.Object(
        {
          deviceId: DeviceId,
          field: Type.Optional(FieldName),
          version: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: 2_147_483_647 }), Type.Literal('all')])),
        },
        { additionalProperties: false },
      ),
      { minItems: 1, maxItems: MAX_FETCH_ITEMS },
    ),
  },
  { additionalProperties: false },
);

export const FetchResult = Type.Object(
  {
    jwe: Type.String({ description: 'one compact JWE whose payload is a JWK Set of every resolved key' }),
    missing: Type.Array(
      Type.Object(
        {
          deviceId: Type.String({ pattern: ID_PATTERN }),
          field: Type.Optional(Type.String()),
          version: Type.Optional(Type.Union([Type.Integer(), Type.Literal('all')])),
          reason: Type.Union([Type.Literal('not_found'), Type.Literal('not_deliverable'), Type.Literal('destroyed')]),
        },
        { additionalProperties: false },
      ),
    ),
  },
  { additionalProperties: false },
);
