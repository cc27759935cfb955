/**
 * Groups, devices and field keys: creation and reads. Each change and its audit events commit
 * in one transaction. KEK calls happen before the transaction opens, so no database connection
 * is held across a network round trip to Vault.
 */
import type { Kysely } from 'kysely';
import type { AuditEventInput, AuditSink } from '../audit/audit.types.js';
import type { Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import { BadRequestError, ConflictError, NotFoundError, UnavailableError } from '../http/errors.js';
import { decodeCursor, encodeCursor } from '../http/schemas.js';
import { admitKekBlob, KEK_FENCE_ATTEMPTS } from './kek-fence.repository.js';
import { WRAPPED_KEY_BYTES, type KeyMaterial } from './key-material.js';
import * as repo from './key.repository.js';
import { enqueueKeyUpdate } from '../distribution/outbox.js'; // issue 6: key updates to devices (outbox, same transaction)

export interface Actor {
  actor: string;
  requestId?: string | undefined;
}

export interface VersionView {
  version: number;
  state: repo.GroupVersionRow['state'];
  parentVersion: number;
  createdAt: string;
  stateChangedAt: string;
  stateUntil: string | null;
}

export interface GroupView {
  id: string;
  deviceType: string;
  region: string;
  createdAt: string;
  versions: VersionView[];
}

export interface FieldKeyView {
  field: string;
  versions: VersionView[];
}

export interface DeviceView {
  id: string;
  groupId: string;
  createdAt: string;
  versions: VersionView[];
  fields: FieldKeyView[];
}

export const MAX_BULK_ENROL = 10_000;

export function createKeyService(deps: { db: Kysely<DB>; material: KeyMaterial; audit: AuditSink; clock: Clock }) {
  const { db, material, audit, clock } = deps;
  const event = (who: Actor, e: Omit<AuditEventInput, 'actor' | 'requestId'>): AuditEventInput => ({ ...e, actor: who.actor, requestId: who.requestId });

  async function createGroup(who: Actor, input: { id: string; deviceType: string; region: string }): Promise<GroupView> {
    if (await repo.findGroup(db, input.id)) throw new ConflictError(`Group ${input.id} already exists`, 'group_exists');
    for (let attempt = 1; ; attempt += 1) {
      if (await storeNewGroup(who, input)) break;
      // a KEK rotation overtook the wrap: wrap again under the version it made current
      if (attempt >= KEK_FENCE_ATTEMPTS) throw new UnavailableError('The KEK is being rotated; retry shortly');
    }
    return getGroup(input.id);
  }

  /** false: the blob is under a KEK version a rotation has replaced meanwhile (nothing stored) */
  async function storeNewGroup(who: Actor, input: { id: string; deviceType: string; region: string }): Promise<boolean> {
    const { wrapped, kekVersion, kekName, key } = await material.newGroupKey(input.id, 1);
    key.fill(0);
    const now = clock.now();
    return db.transaction().execute(async (trx) => {
      if (!(await admitKekBlob(trx, kekName, kekVersion))) return false;
      await repo.insertGroup(trx, { id: input.id, device_type: input.deviceType, region: input.region, created_at: now });
      await repo.insertGroupVersion(trx, {
        group_id: input.id,
        version: 1,
        state: 'primary',
        wrapped_key: wrapped,
        kek_version: kekVersion,
        created_at: now,
        state_changed_at: now,
        state_until: null,
      });
      await audit.record(trx, [event(who, { action: 'group.create', outcome: 'success', keyId: `group:${input.id}`, details: { version: 1, kekVersion, deviceType: input.deviceType, region: input.region } })]);
      return true;
    });
  }

  async function getGroup(groupId: string): Promise<GroupView> {
    const group = await repo.findGroup(db, groupId);
    if (!group) throw new NotFoundError(`Group ${groupId} not found`);
    const versions = await repo.listGroupVersions(db, [groupId]);
    return toGroupView(group, versions);
  }

  async function listGroups(cursor: string | undefined, limit: number): Promise<{ items: GroupView[]; nextCursor?: string }> {
    const after = decodeCursor(cursor, (v): v is { after: string } => typeof (v as { after?: unknown })?.after === 'string');
    if (cursor !== undefined && after === undefined) throw new BadRequestError('cursor is not valid', { field: 'querystring.cursor' });
    const groups = await repo.listGroups(db, after?.after, limit);
    const versions = await repo.listGroupVersions(db, groups.map((g) => g.id));
    const items = groups.map((g) => toGroupView(g, versions.filter((v) => v.group_id === g.id)));
    const last = groups.at(-1);
    return groups.length === limit && last ? { items, nextCursor: encodeCursor({ after: last.id }) } : { items };
  }

  /** Enrol devices: each gets a fresh device DEK (version 1, primary) under the group's primary DEK. All or nothing. */
  async function enrolDevices(who: Actor, groupId: string, ids: readonly string[]): Promise<{ groupVersion: number; enrolled: number }> {
    if (ids.length === 0) throw new BadRequestError('ids must not be empty', { field: 'body.ids' });
    if (ids.length > MAX_BULK_ENROL) throw new BadRequestError(`At most ${MAX_BULK_ENROL} devices per call`, { field: 'body.ids' });
    const duplicates = findDuplicates(ids);
    if (duplicates.length > 0) {
      throw new BadRequestError(`ids contains duplicates: ${duplicates.slice(0, 10).join(', ')}`, { field: 'body.ids', conflicts: duplicates.slice(0, 100) });
    }
    const group = await repo.findPrimaryGroupVersion(db, groupId);
    if (!group) {
      if (!(await repo.findGroup(db, groupId))) throw new NotFoundError(`Group ${groupId} not found`);
      throw new ConflictError(`Group ${groupId} has no primary version`, 'no_primary_version');
    }
    const groupKey = await material.groupKey(groupId, group.version, group.wrapped_key);
    const now = clock.now();
    // Set-based and pipelined: the devices INSERT is sent first and PostgreSQL runs it while
    // Node wraps the new device DEKs; then one INSERT of all the version rows, then the audit
    // events. The existence check is the INSERT itself: an id already enrolled fails it with a
    // unique violation, the transaction rolls back (nothing written), and the ids are listed
    // afterwards for the 409.
    let exists = false;
    try {
      await db.transaction().execute(async (trx) => {
        const devicesInserted = repo.insertDeviceRows(trx, groupId, ids, now).catch((error: unknown) => {
          if (repo.isExistingDeviceError(error)) exists = true;
          throw error;
        });
        devicesInserted.catch(() => undefined); // handled: awaited below, once the keys are wrapped
        let wrapped: Buffer;
        try {
          await new Promise<void>((resolve) => setImmediate(resolve)); // the INSERT goes out to the server first
          wrapped = material.newDeviceKeys(groupKey, groupId, group.version, ids, 1);
        } catch (error) {
          await devicesInserted.catch(() => undefined);
          throw error;
        }
        await devicesInserted;
        await repo.insertFirstDeviceVersions(trx, ids, wrapped, WRAPPED_KEY_BYTES, group.version, now);
        await audit.record(
          trx,
          ids.map((deviceId) => event(who, { action: 'device.enrol', outcome: 'success', keyId: `device:${deviceId}`, details: { groupId, version: 1, groupVersion: group.version } })),
        );
      });
    } catch (error) {
      if (!exists) throw error;
      const existing = await repo.findExistingDeviceIds(db, ids);
      throw new ConflictError(
        existing.length > 0
          ? `${existing.length} device id(s) are already enrolled: ${existing.slice(0, 10).join(', ')}`
          : 'Some device ids were enrolled concurrently by another call',
        'device_exists',
      );
    } finally {
      groupKey.fill(0);
    }
    return { groupVersion: group.version, enrolled: ids.length };
  }

  async function getDevice(deviceId: string): Promise<DeviceView> {
    const device = await repo.findDevice(db, deviceId);
    if (!device) throw new NotFoundError(`Device ${deviceId} not found`);
    const [versions, fieldVersions] = await Promise.all([repo.listDeviceVersions(db, [deviceId]), repo.listFieldVersions(db, [deviceId])]);
    const fields = new Map<string, VersionView[]>();
    for (const row of fieldVersions) {
      const list = fields.get(row.field) ?? [];
      list.push(toVersionView(row, row.parent_version));
      fields.set(row.field, list);
    }
    return {
      id: device.id,
      groupId: device.group_id,
      createdAt: device.created_at.toISOString(),
      versions: versions.map((v) => toVersionView(v, v.parent_version)),
      fields: [...fields].map(([field, list]) => ({ field, versions: list })),
    };
  }

  /** Create a field key (version 1, primary) wrapped under the device's primary DEK. */
  async function createFieldKey(who: Actor, deviceId: string, field: string): Promise<FieldKeyView> {
    const device = await repo.findDevice(db, deviceId);
    if (!device) throw new NotFoundError(`Device ${deviceId} not found`);
    if (await repo.fieldKeyExists(db, deviceId, field)) throw new ConflictError(`Field key ${field} already exists for device ${deviceId}`, 'field_key_exists');
    const deviceVersion = await repo.findPrimaryDeviceVersion(db, deviceId);
    if (!deviceVersion) throw new ConflictError(`Device ${deviceId} has no primary version`, 'no_primary_version');
    const groupVersion = await repo.findGroupVersion(db, device.group_id, deviceVersion.parent_version);
    if (!groupVersion) throw new ConflictError(`Device ${deviceId} is wrapped under a missing group version`, 'parent_missing');

    const groupKey = await material.groupKey(device.group_id, groupVersion.version, groupVersion.wrapped_key);
    const deviceKey = material.deviceKey(groupKey, device.group_id, groupVersion.version, deviceId, deviceVersion.version, deviceVersion.wrapped_key);
    const { wrapped, key } = material.newFieldKey(deviceKey, deviceId, deviceVersion.version, field, 1);
    key.fill(0);
    groupKey.fill(0);
    deviceKey.fill(0);
    const now = clock.now();
    await db.transaction().execute(async (trx) => {
      await repo.insertFieldKey(trx, deviceId, field, {
        device_id: deviceId,
        field,
        version: 1,
        state: 'primary',
        wrapped_key: wrapped,
        parent_version: deviceVersion.version,
        created_at: now,
        state_changed_at: now,
        state_until: null,
      });
      await enqueueKeyUpdate(trx, { deviceId, kind: 'field', field, version: 1, state: 'primary' }); // issue 6: the new field key to the device
      await audit.record(trx, [event(who, { action: 'field_key.create', outcome: 'success', keyId: `field:${deviceId}/${field}`, details: { version: 1, deviceVersion: deviceVersion.version } })]);
    });
    const versions = await repo.listFieldVersions(db, [deviceId], field);
    return { field, versions: versions.map((v) => toVersionView(v, v.parent_version)) };
  }

  return { createGroup, getGroup, listGroups, enrolDevices, getDevice, createFieldKey };
}

export type KeyService = ReturnType<typeof createKeyService>;

function toGroupView(group: repo.GroupRow, versions: repo.GroupVersionRow[]): GroupView {
  return {
    id: group.id,
    deviceType: group.device_type,
    region: group.region,
    createdAt: group.created_at.toISOString(),
    versions: versions.map((v) => toVersionView(v, v.kek_version)),
  };
}

function toVersionView(row: { version: number; state: VersionView['state']; created_at: Date; state_changed_at: Date; state_until: Date | null }, parentVersion: number): VersionView {
  return {
    version: row.version,
    state: row.state,
    parentVersion,
    createdAt: row.created_at.toISOString(),
    stateChangedAt: row.state_changed_at.toISOString(),
    stateUntil: row.state_until ? row.state_until.toISOString() : null,
  };
}

function findDuplicates(ids: readonly string[]): string[] {
  const seen = new Set<string>();
  const duplicates = new Set<string>();
  for (const id of ids) {
    if (seen.has(id)) duplicates.add(id);
    seen.add(id);
  }
  return [...duplicates];
}
