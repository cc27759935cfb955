/**
 * Key fetch: resolve what a backend asked for, check it may have it, unwrap it down the
 * hierarchy and hand it over as one JWE to the client's registered delivery key. The JWE is
 * the only form key material ever leaves the process in; the delivery is audited (group
 * commit) before the response is sent.
 */
import type { Kysely } from 'kysely';
import type { AuditSink } from '../audit/audit.types.js';
import { canReachGroup, hasScope, type Principal } from '../auth/principal.js';
import type { DeliveredKey, DeliveryKey } from '../crypto/jwe.js';
import type { JweEncryptor } from '../crypto/jwe-threads.js';
import { fieldKeyId } from '../crypto/binding.js';
import type { DB } from '../db/database.js';
import { createCoalescedReader } from '../db/coalesced-reads.js';
import { ConflictError, ForbiddenError, GoneError, NotFoundError } from '../http/errors.js';
import type { KeyMaterial } from '../keys/key-material.js';
import * as keys from '../keys/key.repository.js';
import * as fetchRepo from './key-fetch.repository.js';
import type { ClientService } from './client.service.js';

export const MAX_FETCH_ITEMS = 1000;

export interface FetchItem {
  deviceId: string;
  field?: string | undefined;
  /** a version number; omitted or 'all' → every deliverable version */
  version?: number | 'all' | undefined;
}

export type MissingReason = 'not_found' | 'not_deliverable' | 'destroyed';

export interface MissingItem {
  deviceId: string;
  field?: string;
  version?: number | 'all';
  reason: MissingReason;
}

interface Resolved {
  keys: DeliveredKey[];
  missing: MissingItem[];
}

type VersionRow = fetchRepo.DeviceVersionForFetch | fetchRepo.FieldVersionForFetch;

export function createKeyFetchService(deps: {
  db: Kysely<DB>;
  material: KeyMaterial;
  clients: ClientService;
  audit: AuditSink;
  jwe: JweEncryptor;
  onDelivered?: (kind: 'single' | 'bulk', keyCount: number) => void;
}) {
  const { db, material, clients, audit } = deps;
  // single fetches arriving together read their devices in one query (db/coalesced-reads.ts)
  const deviceReader = createCoalescedReader({ read: (ids) => fetchRepo.listDevicesWithVersions(db, ids), idOf: (row) => row.device_id, maxIds: MAX_FETCH_ITEMS });
  const fieldReader = createCoalescedReader({ read: (ids) => fetchRepo.listFieldVersions(db, ids), idOf: (row) => row.device_id, maxIds: MAX_FETCH_ITEMS });

  /** GET /v1/devices/{id}/keys and /fields/{field}/keys: one item, errors as HTTP problems. */
  async function fetchOne(principal: Principal, requestId: string, item: FetchItem): Promise<{ jwe: string }> {
    const [delivery, rows] = await Promise.all([requireDeliveryKey(principal), loadRowsOf(item)]);
    const { keys: delivered, missing } = await resolve(principal, [item], rows);
    const miss = missing[0];
    if (miss) {
      const what = item.field ? `Field key ${item.field} of device ${item.deviceId}` : `Device ${item.deviceId}`;
      const versionText = typeof item.version === 'number' ? ` version ${item.version}` : '';
      await audit.recordRead([
        { actor: principal.sub, requestId, action: 'key.deliver', outcome: 'failure', keyId: keyIdOf(item), details: { reason: miss.reason, version: item.version ?? 'all' } },
      ]);
      if (miss.reason === 'destroyed') throw new GoneError(`${what}${versionText} has been destroyed`);
      if (miss.reason === 'not_deliverable') throw new ConflictError(`${what}${versionText} is not deliverable in its current state`, 'version_not_deliverable');
      throw new NotFoundError(`${what}${versionText} not found (or not in the groups of your token)`);
    }
    const result = await deliver(principal, requestId, delivery, delivered, keyIdOf(item));
    deps.onDelivered?.('single', delivered.length);
    return result;
  }

  /** POST /v1/keys/fetch: up to 1,000 items, one JWE, unresolvable items listed in `missing`. */
  async function fetchMany(principal: Principal, requestId: string, items: readonly FetchItem[]): Promise<{ jwe: string; missing: MissingItem[] }> {
    const [delivery, rows] = await Promise.all([requireDeliveryKey(principal), loadRows(items)]);
    const { keys: delivered, missing } = await resolve(principal, items, rows);
    const count = delivered.length;
    const { jwe } = await deliver(principal, requestId, delivery, delivered, 'bulk', missing.length);
    deps.onDelivered?.('bulk', count);
    return { jwe, missing };
  }

  async function requireDeliveryKey(principal: Principal) {
    if (!hasScope(principal, 'keystrata:keys:read')) throw new ForbiddenError('The token lacks the keystrata:keys:read scope', 'insufficient_scope');
    const delivery = await clients.deliveryKeyFor(principal.sub);
    if (!delivery) {
      throw new ForbiddenError(
        `No delivery key is registered for client ${principal.sub}: an admin must PUT /v1/clients/${principal.sub}/delivery-key first`,
        'delivery_key_missing',
      );
    }
    return delivery;
  }

  async function deliver(
    principal: Principal,
    requestId: string,
    delivery: { kid: string; key: DeliveryKey },
    delivered: DeliveredKey[],
    keyId: string,
    missingCount = 0,
  ): Promise<{ jwe: string }> {
    try {
      const jwe = await deps.jwe.encrypt(delivery.key, delivery.kid, delivered);
      // fail closed: no audit row, no keys
      await audit.recordRead([
        {
          actor: principal.sub,
          requestId,
          action: 'key.deliver',
          outcome: 'success',
          keyId,
          details: { kids: delivered.map((k) => k.kid), deliveryKid: delivery.kid, missing: missingCount },
        },
      ]);
      return { jwe };
    } finally {
      for (const k of delivered) k.key.fill(0);
    }
  }

  /** The rows of one item, read together with the other single fetches in flight. */
  async function loadRowsOf(item: FetchItem): Promise<LoadedRows> {
    const [deviceRows, fieldVersions] = await Promise.all([deviceReader.load(item.deviceId), item.field === undefined ? [] : fieldReader.load(item.deviceId)]);
    return { deviceRows, fieldVersions };
  }

  /** Every row a request may need, in two queries run side by side (devices with their versions; field versions). */
  async function loadRows(items: readonly FetchItem[]): Promise<LoadedRows> {
    const deviceIds = [...new Set(items.map((i) => i.deviceId))];
    const fieldDevices = [...new Set(items.filter((i) => i.field !== undefined).map((i) => i.deviceId))];
    const [deviceRows, fieldVersions] = await Promise.all([fetchRepo.listDevicesWithVersions(db, deviceIds), fetchRepo.listFieldVersions(db, fieldDevices)]);
    return { deviceRows, fieldVersions };
  }

  async function resolve(principal: Principal, items: readonly FetchItem[], rows: LoadedRows): Promise<Resolved> {
    const devices = new Map(rows.deviceRows.map((d) => [d.device_id, d.group_id]));
    const reachableSet = new Set([...devices].filter(([, groupId]) => canReachGroup(principal, groupId)).map(([id]) => id));
    const byDevice = groupBy(
      rows.deviceRows.filter((v) => reachableSet.has(v.device_id)),
      (v) => v.device_id,
    );
    const byField = groupBy(
      rows.fieldVersions.filter((v) => reachableSet.has(v.device_id)),
      (v) => `${v.device_id}/${v.field}`,
    );
    const groupVersionOf = await loadGroupVersions(byDevice, devices);

    const out: Resolved = { keys: [], missing: [] };
    const seen = new Set<string>();
    // unwrapped group keys of this request, one copy per group version however many keys it parents; zeroed below
    const groupKeys = new Map<string, Buffer>();
    try {
      for (const item of items) {
        const miss = (reason: MissingReason) => out.missing.push({ deviceId: item.deviceId, ...(item.field ? { field: item.field } : {}), ...(item.version !== undefined ? { version: item.version } : {}), reason });
        if (!reachableSet.has(item.deviceId)) {
          miss('not_found');
          continue;
        }
        const candidates: readonly VersionRow[] = item.field === undefined ? byDevice.get(item.deviceId) ?? [] : byField.get(`${item.deviceId}/${item.field}`) ?? [];
        const chosen = chooseVersions(candidates, item.version);
        if (typeof chosen === 'string') {
          miss(chosen);
          continue;
        }
        const groupId = devices.get(item.deviceId) as string;
        for (const row of chosen) {
          const kid = item.field === undefined ? `${item.deviceId}:v${row.version}` : `${fieldKeyId(item.deviceId, item.field)}:v${row.version}`;
          if (seen.has(kid)) continue;
          seen.add(kid);
          const key = await unwrapRow(groupId, row, byDevice.get(item.deviceId) ?? [], groupVersionOf, groupKeys);
          out.keys.push({
            kid,
            key,
            meta: {
              state: row.state,
              stateChangedAt: row.state_changed_at,
              stateUntil: row.state_until,
              version: row.version,
              deviceId: item.deviceId,
              ...(item.field !== undefined ? { field: item.field } : {}),
              createdAt: row.created_at,
            },
          });
        }
      }
    } catch (error) {
      for (const k of out.keys) k.key.fill(0); // nothing is delivered: no unwrapped key is left behind either
      throw error;
    } finally {
      for (const key of groupKeys.values()) key.fill(0);
    }
    return out;
  }

  async function unwrapRow(
    groupId: string,
    row: VersionRow,
    deviceRows: readonly fetchRepo.DeviceVersionForFetch[],
    groupVersionOf: Map<string, { wrapped_key: string | null }>,
    groupKeys: Map<string, Buffer>,
  ): Promise<Buffer> {
    const deviceRow = 'field' in row ? deviceRows.find((d) => d.version === row.parent_version) : row;
    if (!deviceRow) throw new ConflictError(`Parent version ${row.parent_version} of a field key is missing`, 'parent_missing');
    const groupVersion = deviceRow.parent_version;
    const groupKeyId = `${groupId}\u0000${groupVersion}`;
    let groupKey = groupKeys.get(groupKeyId);
    if (!groupKey) {
      groupKey = material.cache.get('group', groupId, groupVersion) ?? (await unwrapGroup(groupId, groupVersion, groupVersionOf));
      groupKeys.set(groupKeyId, groupKey);
    }
    const isLeaf = !('field' in row);
    const deviceKey = material.deviceKey(groupKey, groupId, groupVersion, deviceRow.device_id, deviceRow.version, deviceRow.wrapped_key, { cacheAsParent: !isLeaf });
    if (isLeaf) return deviceKey;
    try {
      return material.fieldKey(deviceKey, row.device_id, row.parent_version, row.field, row.version, row.wrapped_key);
    } finally {
      deviceKey.fill(0);
    }
  }

  /** Group DEK rows, read only for the parent versions whose unwrapped key is not cached. */
  async function loadGroupVersions(byDevice: Map<string, fetchRepo.DeviceVersionForFetch[]>, devices: Map<string, string>) {
    const needed = new Map<string, { groupId: string; version: number }>();
    for (const [deviceId, versions] of byDevice) {
      const groupId = devices.get(deviceId) as string;
      for (const v of versions) {
        const key = `${groupId}:${v.parent_version}`;
        if (!needed.has(key) && !material.cache.has('group', groupId, v.parent_version)) needed.set(key, { groupId, version: v.parent_version });
      }
    }
    const rows = await keys.listGroupVersionsByPairs(db, [...needed.values()]);
    return new Map(rows.map((g) => [`${g.group_id}:${g.version}`, g]));
  }

  async function unwrapGroup(groupId: string, version: number, groupVersionOf: Map<string, { wrapped_key: string | null }>): Promise<Buffer> {
    const row = groupVersionOf.get(`${groupId}:${version}`) ?? (await keys.findGroupVersion(db, groupId, version));
    if (!row) throw new ConflictError(`Parent group version ${version} is missing`, 'parent_missing');
    return material.groupKey(groupId, version, row.wrapped_key);
  }

  return { fetchOne, fetchMany };
}

interface LoadedRows {
  deviceRows: fetchRepo.DeviceVersionForFetch[];
  fieldVersions: fetchRepo.FieldVersionForFetch[];
}

export type KeyFetchService = ReturnType<typeof createKeyFetchService>;

function chooseVersions<T extends VersionRow>(rows: readonly T[], version: FetchItem['version']): T[] | MissingReason {
  if (rows.length === 0) return 'not_found';
  if (typeof version === 'number') {
    const row = rows.find((r) => r.version === version);
    if (!row) return 'not_found';
    if (row.state === 'destroyed') return 'destroyed';
    return keys.DELIVERABLE_STATES.includes(row.state) ? [row] : 'not_deliverable';
  }
  const deliverable = rows.filter((r) => keys.DELIVERABLE_STATES.includes(r.state));
  if (deliverable.length > 0) return deliverable;
  return rows.every((r) => r.state === 'destroyed') ? 'destroyed' : 'not_deliverable';
}

function keyIdOf(item: FetchItem): string {
  return item.field === undefined ? `device:${item.deviceId}` : `field:${fieldKeyId(item.deviceId, item.field)}`;
}

function groupBy<T>(rows: readonly T[], key: (row: T) => string): Map<string, T[]> {
  const map = new Map<string, T[]>();
  for (const row of rows) {
    const k = key(row);
    const list = map.get(k);
    if (list) list.push(row);
    else map.set(k, [row]);
  }
  return map;
}
