/**
 * Devices that have not acknowledged their current keys (issue 6, part 4), as rotation debt
 * (GET /v1/groups/{id}/rotation-status) and rollout progress (GET /v1/rollouts/{id}) show them:
 * counts, and the first device ids in id order. Read through the distribution module's read
 * models (listAwaitingAck / countAwaitingAck): a key version counts when it is pending or
 * primary, was written to the outbox with its key (queued or published), and the device has
 * acknowledged neither it nor a newer version of the same key. Keys never sent over MQTT
 * (enrolment keys, versions older than distribution) are not counted.
 */
import { Type, type Static } from '@sinclair/typebox';
import type { Kysely } from 'kysely';
import type { DB } from '../db/database.js';
import { countAwaitingAck, listAwaitingAck, type KeyFilter } from '../distribution/index.js';
import { distributionDb } from '../distribution/distribution.tables.js';
import { DeviceId } from '../http/schemas.js';

/** Device ids listed at most. */
export const AWAITING_ACK_LISTED = 20;

export const AwaitingAck = Type.Object(
  {
    devices: Type.Integer({ minimum: 0, description: 'devices with at least one such key version' }),
    versions: Type.Integer({ minimum: 0, description: 'key versions sent and not acknowledged' }),
    deviceIds: Type.Array(DeviceId, { description: `the first ${AWAITING_ACK_LISTED} of those devices, in id order` }),
  },
  {
    additionalProperties: false,
    description:
      "devices of the group whose current key (pending or primary) of this level was sent over MQTT (queued in the outbox or published) and that have acknowledged neither it nor a newer version; while the policy's graceRequiresAck holds, their previous version stays in grace",
  },
);
export type AwaitingAckView = Static<typeof AwaitingAck>;

export async function awaitingAckOf(db: Kysely<DB>, groupId: string, filter: KeyFilter): Promise<AwaitingAckView> {
  const ex = distributionDb(db);
  const counts = await countAwaitingAck(ex, groupId, filter);
  const deviceIds: string[] = [];
  // rows are versions (a device can await several field keys), in device order: page by device until enough ids
  let after: string | undefined;
  const step = AWAITING_ACK_LISTED * 4;
  while (deviceIds.length < Math.min(AWAITING_ACK_LISTED, counts.devices)) {
    const page = await listAwaitingAck(ex, { groupId, ...filter, limit: step, afterDeviceId: after });
    for (const row of page) if (deviceIds.at(-1) !== row.deviceId && deviceIds.length < AWAITING_ACK_LISTED) deviceIds.push(row.deviceId);
    if (page.length < step) break;
    after = page.at(-1)?.deviceId;
  }
  return { devices: counts.devices, versions: counts.versions, deviceIds };
}
