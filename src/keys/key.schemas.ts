/** The HTTP contract of groups, devices and field keys (TypeBox: validation, types and OpenAPI). */
import { Type, type Static } from '@sinclair/typebox';
import { DeviceId, FieldName, GroupId, PageQuery, VersionInfo } from '../http/schemas.js';
import { MAX_BULK_ENROL } from './key.service.js';

const Label = (description: string, example: string) =>
  Type.String({ minLength: 1, maxLength: 128, pattern: '^[A-Za-z0-9 ._:/-]+$', description, examples: [example] });

export const CreateGroupBody = Type.Object(
  { id: GroupId, deviceType: Label('device type the group is for', 'infusion-pump'), region: Label('region of the devices', 'eu-west') },
  { additionalProperties: false },
);
export type CreateGroupBody = Static<typeof CreateGroupBody>;

export const Group = Type.Object(
  {
    id: GroupId,
    deviceType: Type.String(),
    region: Type.String(),
    createdAt: Type.String({ format: 'date-time' }),
    versions: Type.Array(VersionInfo, { description: 'group DEK versions; parentVersion is the KEK version it is wrapped under' }),
  },
  { additionalProperties: false },
);

export const GroupList = Type.Object(
  { items: Type.Array(Group), nextCursor: Type.Optional(Type.String()) },
  { additionalProperties: false },
);

export const GroupParams = Type.Object({ groupId: GroupId }, { additionalProperties: false });
export const DeviceParams = Type.Object({ deviceId: DeviceId }, { additionalProperties: false });
export const ListQuery = Type.Object(PageQuery, { additionalProperties: false });

export const EnrolDeviceBody = Type.Object({ id: DeviceId }, { additionalProperties: false });

export const EnrolBulkBody = Type.Object(
  { ids: Type.Array(DeviceId, { minItems: 1, maxItems: MAX_BULK_ENROL, description: `up to ${MAX_BULK_ENROL} new device ids, no duplicates` }) },
  { additionalProperties: false },
);

export const EnrolBulkResult = Type.Object(
  {
    groupId: GroupId,
    enrolled: Type.Integer({ description: 'devices created, each with device DEK version 1 (primary)' }),
    groupVersion: Type.Integer({ description: 'the group DEK version the new device DEKs are wrapped under' }),
  },
  { additionalProperties: false },
);

export const FieldKey = Type.Object({ field: FieldName, versions: Type.Array(VersionInfo) }, { additionalProperties: false });

export const Device = Type.Object(
  {
    id: DeviceId,
    groupId: GroupId,
    createdAt: Type.String({ format: 'date-time' }),
    versions: Type.Array(VersionInfo, { description: 'device DEK versions; parentVersion is the group DEK version' }),
    fields: Type.Array(FieldKey, { description: 'field keys; parentVersion is the device DEK version' }),
  },
  { additionalProperties: false },
);

export const CreateFieldBody = Type.Object({ field: FieldName }, { additionalProperties: false });
