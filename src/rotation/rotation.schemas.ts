/** The HTTP contract of rotation: KEK and group rotation, the cron entry, rotation debt. */
import { Type, type Static } from '@sinclair/typebox';
import { DeviceId, GroupId, VersionState } from '../http/schemas.js';
import { AwaitingAck } from './awaiting-ack.js';
import { LevelPolicy, MaintenanceWindow } from './policy.schemas.js';

const Count = Type.Integer({ minimum: 0 });
const Time = Type.String({ format: 'date-time' });
const NullableTime = Type.Union([Time, Type.Null()]);
const StateCounts = Type.Object(
  Object.fromEntries(['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroy_scheduled', 'destroyed'].map((s) => [s, Count])),
  { additionalProperties: false, description: 'number of versions in each state' },
);

export const MAX_RUN_LIMIT = 1_000_000;
export const DEFAULT_RUN_LIMIT = 10_000;

const Limit = (description: string) => Type.Integer({ minimum: 1, maximum: MAX_RUN_LIMIT, description });

// ---------- KEK rotation ----------

export const KekRotateBody = Type.Object(
  {
    rewrapOnly: Type.Optional(Type.Boolean({ description: 'do not create a new KEK version: finish an interrupted rewrap and raise the minimum decryption version when allowed' })),
    limit: Type.Optional(Limit('most blobs rewrapped by this call (default: all); the cron entry finishes the rest')),
  },
  { additionalProperties: false },
);
export type KekRotateBody = Static<typeof KekRotateBody>;

const RewrapCounts = Type.Object({ rewrapped: Count, failed: Count, remaining: Count }, { additionalProperties: false });

export const KekRotationSummary = Type.Object(
  {
    kekName: Type.String(),
    provider: Type.Union([Type.Literal('local'), Type.Literal('vault')]),
    dryRun: Type.Boolean(),
    status: Type.Union([Type.Literal('done'), Type.Literal('skipped')], { description: '`skipped`: another run holds the KEK rotation lease' }),
    reason: Type.Optional(Type.String()),
    due: Type.Boolean({ description: 'the KEK policy says a rotation is due' }),
    dueAt: NullableTime,
    rotated: Type.Boolean({ description: 'a new KEK version was (dry run: would be) created' }),
    fromVersion: Type.Integer(),
    toVersion: Type.Integer(),
    observedVersions: Type.Array(Type.Integer(), { description: 'KEK versions found in the provider that keystrata had not recorded yet' }),
    rewrap: Type.Object(
      {
        batches: Count,
        groupKeys: RewrapCounts,
        auditKeys: RewrapCounts,
        failures: Type.Array(
          Type.Object({ keyId: Type.String(), version: Type.Integer(), kekVersion: Type.Integer(), error: Type.String() }, { additionalProperties: false }),
          { description: 'failed items (at most 100 listed): each keeps its old blob, still readable' },
        ),
      },
      { additionalProperties: false },
    ),
    minDecryptionVersion: Type.Object(
      {
        before: Type.Integer(),
        after: Type.Integer(),
        raised: Type.Boolean(),
        lowestReferenced: Type.Integer({ description: 'lowest KEK version a stored blob is wrapped under' }),
        blockedBy: Type.Union([Type.Literal('up_to_date'), Type.Literal('references'), Type.Literal('grace'), Type.Literal('failed'), Type.Null()]),
        graceEndsAt: NullableTime,
      },
      { additionalProperties: false },
    ),
  },
  { additionalProperties: false },
);

// ---------- group rotation ----------

export const GroupRotateBody = Type.Object(
  { limit: Type.Optional(Limit(`most device versions moved to the new version by this call (default ${DEFAULT_RUN_LIMIT}); the cron entry finishes the rest`)) },
  { additionalProperties: false },
);
export type GroupRotateBody = Static<typeof GroupRotateBody>;

const ChildRewrap = Type.Object(
  {
    rewrapped: Count,
    failed: Count,
    failures: Type.Array(
      Type.Object({ deviceId: DeviceId, version: Type.Integer(), parentVersion: Type.Integer(), error: Type.String() }, { additionalProperties: false }),
      { description: 'at most 100 listed; each stays under its old group version (still readable)' },
    ),
    chunks: Count,
    remaining: Type.Integer({ minimum: 0, description: 'device versions still wrapped under an old group version' }),
  },
  { additionalProperties: false },
);

export const GroupRotationResult = Type.Object(
  {
    groupId: GroupId,
    fromVersion: Type.Integer({ description: 'the previous primary, now decrypt_only' }),
    toVersion: Type.Integer({ description: 'the new primary' }),
    kekVersion: Type.Union([Type.Integer(), Type.Null()]),
    rewrap: ChildRewrap,
  },
  { additionalProperties: false },
);

// ---------- the cron entry ----------

export const RunBody = Type.Object(
  {
    dryRun: Type.Optional(Type.Boolean({ default: false, description: 'report what would be done, change nothing' })),
    limit: Type.Optional(Limit(`most items per kind of work in this run (blobs, device versions, sweeps; default ${DEFAULT_RUN_LIMIT})`)),
  },
  { additionalProperties: false },
);
export type RunBody = Static<typeof RunBody>;

const Retired = Type.Object(
  {
    groupId: GroupId,
    version: Type.Integer(),
    from: Type.Union([Type.Literal('decrypt_only'), Type.Literal('destroy_scheduled')]),
    to: Type.Union([Type.Literal('destroy_scheduled'), Type.Literal('destroyed')]),
    destroyAfter: Type.Optional(Time),
  },
  { additionalProperties: false },
);

const SweepSummary = Type.Object(
  {
    devices: Count,
    fields: Count,
    more: Type.Boolean(),
    blocked: Type.Optional(Count),
    heldForAck: Type.Optional(
      Type.Integer({ minimum: 0, description: 'grace expiry: versions past their grace end kept in grace, their successor sent to the device and not acknowledged (policy graceRequiresAck, at most graceAckMaxHoldDays)' }),
    ),
    items: Type.Array(
      Type.Object(
        {
          level: Type.Union([Type.Literal('device'), Type.Literal('field')]),
          deviceId: DeviceId,
          field: Type.Optional(Type.String()),
          version: Type.Integer(),
          from: VersionState,
          to: VersionState,
          due: Time,
        },
        { additionalProperties: false },
      ),
      { description: 'at most 100 listed' },
    ),
  },
  { additionalProperties: false },
);

export const RunSummary = Type.Object(
  {
    dryRun: Type.Boolean(),
    startedAt: Time,
    durationMs: Count,
    limit: Type.Integer(),
    complete: Type.Boolean({ description: 'nothing due was left undone and nothing failed; otherwise the next run continues' }),
    errors: Type.Array(
      Type.Object({ step: Type.String(), groupId: Type.Optional(GroupId), code: Type.String(), message: Type.String() }, { additionalProperties: false }),
    ),
    kek: Type.Union([KekRotationSummary, Type.Null()]),
    groups: Type.Object(
      {
        checked: Count,
        rotated: Type.Array(Type.Object({ groupId: GroupId, fromVersion: Type.Integer(), toVersion: Type.Integer() }, { additionalProperties: false })),
        dueOutsideWindow: Type.Array(GroupId, { description: 'due, but outside their maintenance windows: started by a later run' }),
        deferred: Type.Array(GroupId, { description: 'due, but this run had used its limit: started by a later run' }),
        children: Type.Object(
          {
            rewrapped: Count,
            failed: Count,
            remaining: Count,
            failures: Type.Array(
              Type.Object({ groupId: GroupId, deviceId: DeviceId, version: Type.Integer(), parentVersion: Type.Integer(), error: Type.String() }, { additionalProperties: false }),
            ),
          },
          { additionalProperties: false },
        ),
        retired: Type.Array(Retired),
      },
      { additionalProperties: false },
    ),
    devices: Type.Object(
      {
        primariesDue: Type.Integer({ minimum: 0, description: 'primary device DEK versions older than their rotation period' }),
        fieldPrimariesDue: Type.Integer({ minimum: 0, description: 'primary field key versions older than their rotation period' }),
        byGroup: Type.Array(
          Type.Object({ groupId: GroupId, devices: Count, fields: Count, inMaintenanceWindow: Type.Boolean() }, { additionalProperties: false }),
          { description: 'groups with due devices or field keys (at most 100 listed)' },
        ),
        rollouts: Type.Union(
          [
            Type.Object(
              {
                waves: Type.Integer({ minimum: 0, description: 'waves worked on (dry run: due)' }),
                devices: Type.Integer({ minimum: 0, description: 'devices rotated, failed, skipped or rolled back (dry run: due)' }),
                fields: Type.Integer({ minimum: 0, description: 'field key versions created or rewrapped' }),
                failed: Count,
                more: Type.Boolean({ description: 'the limit stopped the run with due devices left' }),
                started: Type.Array(
                  Type.Object(
                    { rolloutId: Type.Union([Type.String(), Type.Null()], { description: 'null in a dry run' }), groupId: GroupId, level: Type.Union([Type.Literal('device'), Type.Literal('field')]) },
                    { additionalProperties: false },
                  ),
                  { description: 'rollouts started because their level fell due (at most 100 listed)' },
                ),
                halted: Type.Array(
                  Type.Object({ rolloutId: Type.String(), groupId: GroupId, wave: Type.Integer(), rolledBack: Type.Boolean() }, { additionalProperties: false }),
                  { description: 'rollouts halted by a wave over its failure threshold in this run' },
                ),
              },
              { additionalProperties: false },
            ),
            Type.Literal('not_available'),
          ],
          { description: 'staggered rollouts (GET /v1/rollouts): started when a level falls due, their due waves rotated in chunks; `not_available` without the rollout module' },
        ),
      },
      { additionalProperties: false },
    ),
    sweeps: Type.Object(
      {
        graceExpired: Type.Union([SweepSummary, Type.Null()]),
        retentionExpired: Type.Union([SweepSummary, Type.Null()], {
          description: '`decrypt_only` versions past their group\'s retention → `destroy_scheduled` (erased after the waiting period); `blocked`: device versions held back by live field key versions wrapped under them',
        }),
        destroyed: Type.Union([SweepSummary, Type.Null()]),
      },
      { additionalProperties: false, description: '`grace` → `decrypt_only`, `decrypt_only` past retention → `destroy_scheduled`, and `destroy_scheduled` → `destroyed` of device and field key versions' },
    ),
  },
  { additionalProperties: false },
);
export type RunSummaryView = Static<typeof RunSummary>;

// ---------- rotation debt ----------

const ActiveRollout = Type.Union(
  [
    Type.Object(
      {
        rolloutId: Type.String(),
        state: Type.Union([Type.Literal('running'), Type.Literal('paused'), Type.Literal('halted'), Type.Literal('rolling_back')]),
        startedAt: Time,
        devicesOnOldVersions: Type.Integer({ minimum: 0, description: 'devices not yet on a key (device DEK, or field key) from this rollout' }),
      },
      { additionalProperties: false },
    ),
    Type.Null(),
  ],
  { description: "the level's active staggered rollout (GET /v1/rollouts/{id} for its waves), or null" },
);

export const RotationStatus = Type.Object(
  {
    groupId: GroupId,
    at: Time,
    inMaintenanceWindow: Type.Boolean(),
    policy: Type.Object({ group: LevelPolicy, device: LevelPolicy, field: LevelPolicy, maintenanceWindows: Type.Array(MaintenanceWindow) }, { additionalProperties: false }),
    kek: Type.Object(
      {
        name: Type.String(),
        latestVersion: Type.Integer(),
        minDecryptionVersion: Type.Integer(),
        groupVersionsBelowLatest: Type.Integer({ minimum: 0, description: "this group's DEK versions still wrapped under an older KEK version" }),
      },
      { additionalProperties: false },
    ),
    group: Type.Object(
      {
        primaryVersion: Type.Union([Type.Integer(), Type.Null()]),
        rotationDueAt: NullableTime,
        states: StateCounts,
        versions: Type.Array(
          Type.Object(
            {
              version: Type.Integer(),
              state: VersionState,
              kekVersion: Type.Integer(),
              createdAt: Time,
              stateChangedAt: Time,
              stateUntil: NullableTime,
              deviceVersionsWrapped: Type.Integer({ minimum: 0, description: 'device versions with material wrapped under this group version' }),
              retirement: Type.Union([
                Type.Object(
                  {
                    blockedBy: Type.Array(
                      Type.Union([Type.Literal('children'), Type.Literal('retention'), Type.Literal('kept_by_policy'), Type.Literal('waiting_period')]),
                      { description: 'empty: the next cron run retires it' },
                    ),
                    retentionEndsAt: NullableTime,
                    destroyAfter: NullableTime,
                  },
                  { additionalProperties: false },
                ),
                Type.Null(),
              ]),
            },
            { additionalProperties: false },
          ),
        ),
      },
      { additionalProperties: false },
    ),
    devices: Type.Object(
      {
        states: StateCounts,
        wrappedUnderOldGroupVersions: Count,
        primariesDueForRotation: Count,
        oldVersionsWithFieldKeys: Type.Integer({ minimum: 0, description: 'non-primary device versions that field key versions are still wrapped under' }),
        rollout: ActiveRollout,
        awaitingAck: AwaitingAck,
      },
      { additionalProperties: false },
    ),
    fields: Type.Object(
      { states: StateCounts, wrappedUnderOldDeviceVersions: Count, primariesDueForRotation: Count, rollout: ActiveRollout, awaitingAck: AwaitingAck },
      { additionalProperties: false },
    ),
  },
  { additionalProperties: false },
);
export type RotationStatusView = Static<typeof RotationStatus>;

// ---------- cryptoperiods ----------

export const CryptoperiodQuery = Type.Object(
  { limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100, description: 'most overdue versions listed per level (the counts are complete)' })) },
  { additionalProperties: false },
);

export const CryptoperiodReport = Type.Object(
  {
    at: Time,
    levels: Type.Array(
      Type.Object(
        {
          level: Type.Union([Type.Literal('kek'), Type.Literal('group'), Type.Literal('device'), Type.Literal('field')]),
          originatorUsageDays: Type.Integer({ description: 'default policy: how long a version may protect new data (primary + grace; the KEK: while it is the latest)' }),
          recipientUsageDays: Type.Union([Type.Integer(), Type.Null()], {
            description: 'default policy: how long a version may only still decrypt (decrypt_only until its retention ends; the KEK: until min_decryption_version passes it); null = unbounded',
          }),
          groupsWithOverrides: Type.Integer({ minimum: 0, description: 'groups whose own policy changes these periods (versions are judged by their group\'s policy)' }),
          pastOriginatorUsage: Count,
          pastRecipientUsage: Count,
          overdue: Type.Array(
            Type.Object(
              {
                keyId: Type.String(),
                version: Type.Integer(),
                state: VersionState,
                period: Type.Union([Type.Literal('originator'), Type.Literal('recipient')]),
                endedAt: Time,
              },
              { additionalProperties: false },
            ),
            { description: 'versions past a period, oldest first (at most `limit`)' },
          ),
        },
        { additionalProperties: false },
      ),
    ),
  },
  { additionalProperties: false },
);
export type CryptoperiodReportView = Static<typeof CryptoperiodReport>;
