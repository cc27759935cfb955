/**
 * The reads of key fetch, the hot path of the service (issue 7). Written as plain SQL run
 * through Kysely's executor rather than the query builder: each fetch is one statement whose
 * text never changes (the ids travel as one array parameter, so PostgreSQL sees one statement
 * shape whatever the batch size, prepared once per connection: db/database.ts
 * preparedStatement), no per-request query compilation, and times come back as the ISO strings
 * the response carries instead of Dates parsed and formatted again.
 */
import { CompiledQuery } from 'kysely';
import { preparedStatement, type Executor } from '../db/database.js';
import type { VersionState } from '../db/tables.js';

interface DeliverableVersion {
  device_id: string;
  version: number;
  state: VersionState;
  wrapped_key: Buffer | null;
  parent_version: number;
  /** ISO 8601, milliseconds, UTC (as Date.toISOString) */
  created_at: string;
  state_changed_at: string;
  state_until: string | null;
}

export interface DeviceVersionForFetch extends DeliverableVersion {
  group_id: string;
}

export interface FieldVersionForFetch extends DeliverableVersion {
  field: string;
}

const iso = (column: string) => `to_char(${column} at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`;
const TIMES = (alias: string) => `${iso(`${alias}.created_at`)} as created_at, ${iso(`${alias}.state_changed_at`)} as state_changed_at, ${iso(`${alias}.state_until`)} as state_until`;

const DEVICES_WITH_VERSIONS = preparedStatement(`
  select v.device_id, d.group_id, v.version, v.state, v.wrapped_key, v.parent_version, ${TIMES('v')}
  from device_versions v join devices d on d.id = v.device_id
  where v.device_id = any($1::text[])
  order by v.device_id, v.version`);

const FIELD_VERSIONS = preparedStatement(`
  select f.device_id, f.field, f.version, f.state, f.wrapped_key, f.parent_version, ${TIMES('f')}
  from field_versions f
  where f.device_id = any($1::text[])
  order by f.device_id, f.field, f.version`);

/** Devices (with their group) and every version of each, in one statement. */
export async function listDevicesWithVersions(ex: Executor, deviceIds: readonly string[]): Promise<DeviceVersionForFetch[]> {
  if (deviceIds.length === 0) return [];
  const result = await ex.executeQuery<DeviceVersionForFetch>(CompiledQuery.raw(DEVICES_WITH_VERSIONS, [deviceIds]));
  return result.rows;
}

/** Every field key version of these devices. */
export async function listFieldVersions(ex: Executor, deviceIds: readonly string[]): Promise<FieldVersionForFetch[]> {
  if (deviceIds.length === 0) return [];
  const result = await ex.executeQuery<FieldVersionForFetch>(CompiledQuery.raw(FIELD_VERSIONS, [deviceIds]));
  return result.rows;
}
