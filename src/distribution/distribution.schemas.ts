/** The HTTP contract of key distribution: what a device has been sent and has acknowledged. */
import { Type } from '@sinclair/typebox';
import { DeviceId, FieldName, Version, VersionState } from '../http/schemas.js';

export const DeviceParams = Type.Object({ deviceId: DeviceId }, { additionalProperties: false });

const Kind = Type.Union([Type.Literal('device'), Type.Literal('field')]);
const Timestamp = Type.String({ format: 'date-time' });

export const DeviceDistribution = Type.Object(
  {
    deviceId: DeviceId,
    acknowledged: Type.Array(
      Type.Object({ kind: Kind, field: Type.Optional(FieldName), version: Version, acknowledgedAt: Timestamp }, { additionalProperties: false }),
      { description: 'key versions the device has acknowledged holding (authenticated acknowledgements only)' },
    ),
    awaitingAcknowledgement: Type.Array(
      Type.Object(
        {
          kind: Kind,
          field: Type.Optional(FieldName),
          version: Version,
          state: VersionState,
          enqueuedAt: Timestamp,
          publishedAt: Type.Union([Timestamp, Type.Null()], { description: 'when the broker accepted it; null while it waits in the outbox' }),
        },
        { additionalProperties: false },
      ),
      { description: 'current (pending/primary) versions sent to the device that it has not acknowledged' },
    ),
    outbox: Type.Array(
      Type.Object(
        {
          messageId: Type.Integer({ description: 'the `id` of the MQTT message' }),
          kind: Kind,
          field: Type.Optional(FieldName),
          version: Version,
          state: VersionState,
          notBefore: Type.Union([Timestamp, Type.Null()]),
          wrappedBy: Version,
          withKey: Type.Boolean({ description: 'false: a state change of a version the device already holds (no key in the message)' }),
          status: Type.Union([Type.Literal('pending'), Type.Literal('published'), Type.Literal('dropped')]),
          attempts: Type.Integer(),
          nextAttemptAt: Type.Union([Timestamp, Type.Null()]),
          lastError: Type.Union([Type.String(), Type.Null()]),
          createdAt: Timestamp,
          publishedAt: Type.Union([Timestamp, Type.Null()]),
        },
        { additionalProperties: false },
      ),
      { description: 'the newest 100 key updates for the device, newest first (ids, versions and states only: payloads are built at publish time)' },
    ),
  },
  { additionalProperties: false },
);
