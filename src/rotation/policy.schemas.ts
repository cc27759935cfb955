/** The HTTP contract of rotation policies (TypeBox: validation, types and OpenAPI). */
import { Type, type Static } from '@sinclair/typebox';
import { GroupId } from '../http/schemas.js';

const days = (description: string, minimum: number, maximum: number) => Type.Integer({ minimum, maximum, description });

const levelFields = {
  rotationPeriodDays: days('a new version every so many days', 1, 3650),
  gracePeriodDays: days('after a rotation, the previous version stays usable for encryption this long (`grace`), then becomes `decrypt_only`', 0, 3650),
  retentionDays: Type.Union([days('`decrypt_only` versions are scheduled for destruction after this many days', 0, 36500), Type.Null()], {
    description: 'days a `decrypt_only` version is kept before its destruction is scheduled; null = kept for ever',
  }),
  destructionWaitDays: days('waiting period of a scheduled destruction (crypto-shred), during which it can be cancelled', 1, 30),
  percentPerDay: Type.Union([Type.Number({ exclusiveMinimum: 0, maximum: 100 }), Type.Null()], {
    description: 'staggered rollouts (device and field levels): share of the fleet rotated per day; null for kek and group',
  }),
  haltThreshold: Type.Union([Type.Number({ minimum: 0, maximum: 1 }), Type.Null()], {
    description: 'staggered rollouts: a wave whose failure rate exceeds this halts the rollout (0.01 = 1 %); null for kek and group',
  }),
  graceRequiresAck: Type.Union([Type.Boolean(), Type.Null()], {
    description:
      'device and field levels: a version whose grace has ended stays in `grace` while its successor was sent to the device over MQTT (queued while the publisher is on, or published) and the device has acknowledged no newer version; false: it becomes `decrypt_only` at the grace end regardless. Without MQTT nothing is sent, so nothing is held. null for kek and group',
  }),
  graceAckMaxHoldDays: Type.Union([days('the longest such hold, counted from the grace end; then the version becomes `decrypt_only` anyway (a dead device must not freeze rotation)', 1, 3650), Type.Null()], {
    description: 'device and field levels: the longest a version is held in grace for an acknowledgement, in days after its grace end; null for kek and group',
  }),
};

export const LevelPolicy = Type.Object(levelFields, { additionalProperties: false });
export type LevelPolicy = Static<typeof LevelPolicy>;

export const LevelPolicyPatch = Type.Partial(Type.Object(levelFields, { additionalProperties: false }), { additionalProperties: false, minProperties: 1 });
export type LevelPolicyPatch = Static<typeof LevelPolicyPatch>;

export const LevelPolicyView = Type.Object(
  {
    ...levelFields,
    source: Type.Union([Type.Literal('built-in'), Type.Literal('stored')], { description: '`built-in` until PUT /v1/policies stores the level' }),
    updatedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
    updatedBy: Type.Union([Type.String(), Type.Null()]),
  },
  { additionalProperties: false },
);

export const Policies = Type.Object(
  { kek: LevelPolicyView, group: LevelPolicyView, device: LevelPolicyView, field: LevelPolicyView },
  { additionalProperties: false },
);
export type PoliciesView = Static<typeof Policies>;

export const PutPoliciesBody = Type.Object(
  { kek: Type.Optional(LevelPolicyPatch), group: Type.Optional(LevelPolicyPatch), device: Type.Optional(LevelPolicyPatch), field: Type.Optional(LevelPolicyPatch) },
  { additionalProperties: false, minProperties: 1, description: 'levels to change; fields left out keep their current value' },
);
export type PutPoliciesBody = Static<typeof PutPoliciesBody>;

const HHMM = '^([01][0-9]|2[0-3]):[0-5][0-9]$';

export const MaintenanceWindow = Type.Object(
  {
    days: Type.Array(Type.Integer({ minimum: 1, maximum: 7 }), {
      minItems: 1,
      maxItems: 7,
      uniqueItems: true,
      description: 'ISO weekdays the window opens on: 1 = Monday … 7 = Sunday',
    }),
    start: Type.String({ pattern: HHMM, description: 'local opening time, HH:MM', examples: ['02:00'] }),
    end: Type.String({ pattern: HHMM, description: 'local closing time, HH:MM (earlier than start: the window runs past midnight)', examples: ['05:00'] }),
    tz: Type.String({ minLength: 1, maxLength: 64, pattern: '^[A-Za-z0-9_+/-]+$', description: 'IANA time zone', examples: ['UTC', 'Europe/Berlin'] }),
  },
  { additionalProperties: false },
);
export type MaintenanceWindow = Static<typeof MaintenanceWindow>;

export const GroupPolicyOverrides = Type.Object(
  { group: Type.Optional(LevelPolicyPatch), device: Type.Optional(LevelPolicyPatch), field: Type.Optional(LevelPolicyPatch) },
  { additionalProperties: false },
);
export type GroupPolicyOverrides = Static<typeof GroupPolicyOverrides>;

export const PutGroupPolicyBody = Type.Object(
  {
    group: Type.Optional(LevelPolicyPatch),
    device: Type.Optional(LevelPolicyPatch),
    field: Type.Optional(LevelPolicyPatch),
    maintenanceWindows: Type.Optional(Type.Array(MaintenanceWindow, { maxItems: 32, description: 'empty or left out: cron may start rotations at any time' })),
  },
  { additionalProperties: false, description: "the group's whole override (it replaces the stored one): levels and fields left out follow the defaults; {} removes the override" },
);
export type PutGroupPolicyBody = Static<typeof PutGroupPolicyBody>;

export const EffectiveLevels = Type.Object({ group: LevelPolicy, device: LevelPolicy, field: LevelPolicy }, { additionalProperties: false });

export const GroupPolicy = Type.Object(
  {
    groupId: GroupId,
    overrides: GroupPolicyOverrides,
    maintenanceWindows: Type.Array(MaintenanceWindow),
    effective: EffectiveLevels,
    updatedAt: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
    updatedBy: Type.Union([Type.String(), Type.Null()]),
  },
  { additionalProperties: false },
);
export type GroupPolicyView = Static<typeof GroupPolicy>;
