/** The HTTP contract of the version lifecycle: rotation, crypto-shredding, disable/enable. */
import { Type } from '@sinclair/typebox';
import { DeviceId, FieldName, Version, VersionState } from '../http/schemas.js';
import { MAX_DESTROY_WAIT_DAYS, MIN_DESTROY_WAIT_DAYS } from './device-lifecycle.service.js';

export const DeviceParams = Type.Object({ deviceId: DeviceId }, { additionalProperties: false });
export const FieldParams = Type.Object({ deviceId: DeviceId, field: FieldName }, { additionalProperties: false });
export const DeviceVersionParams = Type.Object({ deviceId: DeviceId, version: Version }, { additionalProperties: false });
export const FieldVersionParams = Type.Object({ deviceId: DeviceId, field: FieldName, version: Version }, { additionalProperties: false });

export const RotateBody = Type.Object(
  {
    compromised: Type.Optional(
      Type.Boolean({ default: false, description: 'suspected compromise: the old primary goes straight to `disabled` (not delivered any more) instead of `grace`' }),
    ),
  },
  { additionalProperties: false },
);

export const DisableBody = Type.Object(
  {
    force: Type.Optional(
      Type.Boolean({
        default: false,
        description:
          'disabling the primary when no grace version can take its place: replace it by a fresh primary (an immediate rotation). Without it such a call is a 409; with a grace version present, that version becomes primary again and force is not needed',
      }),
    ),
  },
  { additionalProperties: false },
);

export const EmptyBody = Type.Object({}, { additionalProperties: false });

export const DestroyQuery = Type.Object(
  {
    waitDays: Type.Optional(
      Type.Integer({
        minimum: MIN_DESTROY_WAIT_DAYS,
        maximum: MAX_DESTROY_WAIT_DAYS,
        description: `waiting period before the material is erased, in days (${MIN_DESTROY_WAIT_DAYS}–${MAX_DESTROY_WAIT_DAYS}; default: the policy's, 7)`,
      }),
    ),
  },
  { additionalProperties: false },
);

export const DestructionSchedule = Type.Object(
  {
    deviceId: DeviceId,
    destroyAfter: Type.String({ format: 'date-time', description: 'when the material is erased; until then POST …/restore cancels' }),
    waitDays: Type.Integer(),
    versions: Type.Array(
      Type.Object(
        {
          field: Type.Optional(FieldName),
          version: Version,
          previousState: VersionState,
          stateUntil: Type.String({ format: 'date-time' }),
        },
        { additionalProperties: false },
      ),
      { description: 'the versions now `destroy_scheduled`: device DEK versions (no `field`) and field key versions; restore puts each back in `previousState`' },
    ),
  },
  { additionalProperties: false },
);
