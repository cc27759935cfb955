/**
 * The binding string of a stored blob (DESIGN §1). It is the AES-GCM AAD of every local wrap
 * and the transit `context` of every KEK wrap, so a blob copied to another row, key or
 * version fails to unwrap.
 *
 *   keystrata:v1|<kind>|<key id>|<version>|<parent kind>|<parent id>|<parent version>
 *
 * For a blob wrapped by the KEK the parent version is `-`: the KEK version is carried (and
 * authenticated) by the provider's own `vault:vN:` prefix, and it must be allowed to change
 * under transit `rewrap`, which keeps the context.
 */
export type KeyKind = 'group' | 'device' | 'field';

export interface KeyRef {
  kind: KeyKind;
  /** group id, device id, or `<deviceId>/<field>` */
  id: string;
  version: number;
}

export function bindingString(key: KeyRef, parent: { kind: KeyKind | 'kek'; id: string; version: number | '-' }): string {
  return ['keystrata:v1', key.kind, key.id, key.version, parent.kind, parent.id, parent.version].join('|');
}

export const groupBinding = (groupId: string, version: number, kekName: string): string =>
  bindingString({ kind: 'group', id: groupId, version }, { kind: 'kek', id: kekName, version: '-' });

export const deviceBinding = (deviceId: string, version: number, groupId: string, groupVersion: number): string =>
  bindingString({ kind: 'device', id: deviceId, version }, { kind: 'group', id: groupId, version: groupVersion });

export const fieldKeyId = (deviceId: string, field: string): string => `${deviceId}/${field}`;

export const fieldBinding = (deviceId: string, field: string, version: number, deviceVersion: number): string =>
  bindingString({ kind: 'field', id: fieldKeyId(deviceId, field), version }, { kind: 'device', id: deviceId, version: deviceVersion });
