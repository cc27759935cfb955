/** The HTTP contract of staggered rollouts (TypeBox: validation, types and OpenAPI). */
import { Type, type Static } from '@sinclair/typebox';
import { DeviceId, FieldName, GroupId, PageQuery } from '../http/schemas.js';
import { AwaitingAck } from './awaiting-ack.js'; // issue 6 (acknowledgements)

const Count = Type.Integer({ minimum: 0 });
const Time = Type.String({ format: 'date-time' });
const NullableTime = Type.Union([Time, Type.Null()]);

export const RolloutId = Type.String({ pattern: '^ro-[0-9a-f-]{36}$', description: 'rollout id', examples: ['ro-0b0e3c1e-6f7a-4a52-9d58-3c1f2b7a9e01'] });
export const RolloutParams = Type.Object({ rolloutId: RolloutId }, { additionalProperties: false });
export type RolloutParams = Static<typeof RolloutParams>;
export const EmptyBody = Type.Object({}, { additionalProperties: false });

const Level = Type.Union([Type.Literal('device'), Type.Literal('field')], { description: '`device`: device DEKs (field keys rewrapped under the new ones); `field`: field keys' });
const RolloutStateSchema = Type.Union(
  [
    Type.Literal('running'),
    Type.Literal('paused'),
    Type.Literal('halted'),
    Type.Literal('rolling_back'),
    Type.Literal('rolled_back'),
    Type.Literal('cancelled'),
    Type.Literal('completed'),
  ],
  { description: 'running → (paused ⇄ running) → completed; a wave over its failure threshold → halted (or rolling_back → rolled_back); cancel from any unfinished state' },
);
const WaveStateSchema = Type.Union([
  Type.Literal('scheduled'),
  Type.Literal('running'),
  Type.Literal('completed'),
  Type.Literal('halted'),
  Type.Literal('rolling_back'),
  Type.Literal('rolled_back'),
  Type.Literal('cancelled'),
]);

export const StartRolloutBody = Type.Object(
  {
    groupId: GroupId,
    level: Level,
    field: Type.Optional(FieldName),
    percentPerDay: Type.Optional(Type.Number({ minimum: 0.01, maximum: 100, description: "share of the group's devices per wave (default: the group's effective policy for the level, else 10)" })),
    waveIntervalSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 31_536_000, default: 86_400, description: 'time between waves (default one day)' })),
    canaryPercent: Type.Optional(Type.Number({ minimum: 0.01, maximum: 50, description: 'a first, small wave (e.g. 1) before the regular ones' })),
    haltThreshold: Type.Optional(Type.Number({ minimum: 0, maximum: 1, description: "a wave whose failure rate exceeds this halts the rollout (default: the group's policy, else 0.01)" })),
    rollbackOnHalt: Type.Optional(Type.Boolean({ default: false, description: "on a halt, the halted wave's devices go back to their previous primary and the new versions are disabled" })),
  },
  { additionalProperties: false },
);
export type StartRolloutBody = Static<typeof StartRolloutBody>;

export const ListRolloutsQuery = Type.Object(
  { ...PageQuery, groupId: Type.Optional(GroupId), state: Type.Optional(RolloutStateSchema) },
  { additionalProperties: false },
);
export type ListRolloutsQuery = Static<typeof ListRolloutsQuery>;

const Counters = {
  devices: Type.Integer({ minimum: 0, description: 'devices listed for the wave so far (a wave lists its devices when it starts)' }),
  done: Type.Integer({ minimum: 0, description: 'rotated' }),
  failed: Type.Integer({ minimum: 0, description: 'not rotated: still on their previous key (see failures)' }),
  skipped: Type.Integer({ minimum: 0, description: 'not rotated on purpose (device being crypto-shredded, no field key left)' }),
  rolledBack: Type.Integer({ minimum: 0, description: 'rotated, then put back on their previous key by a rollback' }),
  rollbackFailed: Type.Integer({ minimum: 0, description: 'rotated, and the rollback could not put them back (they stay on the new key)' }),
};

export const Wave = Type.Object(
  {
    wave: Type.Integer({ minimum: 0 }),
    kind: Type.Union([Type.Literal('canary'), Type.Literal('wave'), Type.Literal('sweep')], { description: '`sweep`: after the last wave, the devices enrolled after their own wave was listed' }),
    percentFrom: Type.Number({ description: "the wave's share of the (turned) bucket space, from this percentage" }),
    percentTo: Type.Number(),
    dueAt: Time,
    state: WaveStateSchema,
    ...Counters,
    pending: Count,
    startedAt: NullableTime,
    finishedAt: NullableTime,
  },
  { additionalProperties: false },
);

const RolloutFields = {
  id: RolloutId,
  groupId: GroupId,
  level: Level,
  field: Type.Union([FieldName, Type.Null()], { description: 'field level: the one field type rotated, or null for all' }),
  state: RolloutStateSchema,
  reason: Type.Union([Type.Literal('manual'), Type.Literal('policy')], { description: '`policy`: started by the cron entry when the level fell due' }),
  percentPerDay: Type.Number(),
  canaryPercent: Type.Union([Type.Number(), Type.Null()]),
  waveIntervalSeconds: Type.Integer(),
  haltThreshold: Type.Number(),
  rollbackOnHalt: Type.Boolean(),
  waveCount: Type.Integer({ description: 'waves, canary included, sweep not' }),
  currentWave: Type.Union([Type.Integer(), Type.Null()], { description: 'the first wave not finished (null once finished)' }),
  startedAt: Time,
  pausedAt: NullableTime,
  haltedWave: Type.Union([Type.Integer(), Type.Null()]),
  haltReason: Type.Union([Type.String(), Type.Null()]),
  finishedAt: NullableTime,
  createdBy: Type.String(),
  totals: Type.Object({ ...Counters, pending: Count }, { additionalProperties: false }),
};

export const RolloutSummary = Type.Object(RolloutFields, { additionalProperties: false });
export type RolloutSummaryView = Static<typeof RolloutSummary>;

export const Rollout = Type.Object(
  {
    ...RolloutFields,
    awaitingAck: AwaitingAck, // issue 6 (acknowledgements): devices of the group whose current key of the rollout's level (and field) is not acknowledged yet
    devicesOnOldVersions: Type.Integer({
      minimum: 0,
      description: 'devices of the group not on a key from this rollout: device level, whose primary device DEK the rollout did not make; field level, with a primary field key (of the field) the rollout did not rotate',
    }),
    waves: Type.Array(Wave),
    failures: Type.Array(
      Type.Object({ deviceId: DeviceId, wave: Type.Integer(), status: Type.Union([Type.Literal('failed'), Type.Literal('rollback_failed')]), reason: Type.Union([Type.String(), Type.Null()]) }, { additionalProperties: false }),
      { description: 'failed devices (at most 100 listed)' },
    ),
  },
  { additionalProperties: false },
);
export type RolloutView = Static<typeof Rollout>;

export const RolloutList = Type.Object({ items: Type.Array(RolloutSummary), nextCursor: Type.Optional(Type.String()) }, { additionalProperties: false });
export type RolloutListView = Static<typeof RolloutList>;
