/**
 * The wire format of key distribution: topics, the key-update message and its AAD, and the
 * device's authenticated acknowledgement. Reviewed with crypto/: it only composes
 * crypto/aead.ts (AES-256-GCM, `nonce ‖ ciphertext ‖ tag`) and Node's HKDF/HMAC.
 *
 * Key update, published with QoS 2 on `keystrata/devices/{deviceId}/keys` (JSON, UTF-8):
 *
 *   { "type": "keystrata.key-update", "v": 1, "id": 42,
 *     "deviceId": "dev-1", "kind": "device" | "field", "field": "temp" (field keys only),
 *     "keyId": "dev-1" | "dev-1/temp", "kid": "dev-1:v3" | "dev-1/temp:v3",
 *     "version": 3, "state": "primary", "notBefore": "2026-…Z" | null,
 *     "wrappedBy": { "kind": "device", "version": 2 },
 *     "alg": "A256GCM", "wrapped": base64url(nonce(12) ‖ ciphertext ‖ tag(16)) }
 *
 * `wrapped` is AES-256-GCM under the device's DEK version `wrappedBy.version` (one the device
 * already holds: its enrolment key or one delivered by an earlier message) with the AAD
 *
 *   keystrata:v1|transport|<deviceId>|<kind>|<keyId>|<version>|device|<deviceId>|<wrappedBy>|<state>|<notBefore or ->|<id>
 *
 * i.e. DESIGN §1's binding (`<kind>|<key id>|<version>|<parent kind>|<parent id>|<parent
 * version>`) behind a `transport|<addressee>` domain tag, so a message can never pass for a
 * stored blob (or the reverse), followed by every other header field a device acts on (state,
 * not-before, message id). Changing any header field, or moving the message to another device,
 * key or version, makes the tag fail. The plaintext is the 32-byte key, or empty for a state
 * change of a version the device already holds (e.g. "v3 disabled"), which then only
 * authenticates the header. Message ids increase per device: a device ignores an id it has
 * already applied (re-deliveries after a broker or publisher failure are expected).
 *
 * Acknowledgement, published by the device on `keystrata/devices/{deviceId}/keys/ack`:
 *
 *   { "deviceId": "dev-1", "kind": "field", "field": "temp", "version": 3, "tag": base64url(32 bytes) }
 *
 *   tag = HMAC-SHA256(ackKey, "keystrata:v1|ack|<deviceId>|<kind>|<keyId>|<version>")
 *   ackKey = HKDF-SHA256(ikm = the acknowledged version's key, salt = empty, info = "keystrata:v1|ack-key", 32 bytes)
 *
 * so an acknowledgement proves possession of the very key it acknowledges; the derived key
 * keeps the MAC apart from every other use of that key.
 */
import crypto from 'node:crypto';
import { wrapKey } from '../crypto/aead.js';
import { fieldKeyId } from '../crypto/binding.js';
import type { VersionState } from '../db/tables.js';
import type { KeyKind } from './distribution.tables.js';

export const TOPIC_PREFIX = 'keystrata/devices';
export const ACK_TOPIC_FILTER = `${TOPIC_PREFIX}/+/keys/ack`;
export const MESSAGE_TYPE = 'keystrata.key-update';
export const MAX_ACK_BYTES = 1024;

const DEVICE_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const FIELD = /^[a-z][a-z0-9_]{0,63}$/;
const ACK_TOPIC = /^keystrata\/devices\/([^/]+)\/keys\/ack$/;

export const keysTopic = (deviceId: string): string => `${TOPIC_PREFIX}/${deviceId}/keys`;

/** The device id of an acknowledgement topic, or undefined when the topic is not one. */
export function parseAckTopic(topic: string): string | undefined {
  const id = ACK_TOPIC.exec(topic)?.[1];
  return id !== undefined && DEVICE_ID.test(id) ? id : undefined;
}

export interface KeyUpdateHeader {
  id: number;
  deviceId: string;
  kind: KeyKind;
  /** field keys only */
  field?: string | undefined;
  version: number;
  state: VersionState;
  notBefore: Date | null;
  /** device DEK version the payload is sealed under */
  wrappedBy: number;
}

export interface KeyUpdateMessage {
  type: typeof MESSAGE_TYPE;
  v: 1;
  id: number;
  deviceId: string;
  kind: KeyKind;
  field?: string;
  keyId: string;
  kid: string;
  version: number;
  state: VersionState;
  notBefore: string | null;
  wrappedBy: { kind: 'device'; version: number };
  alg: 'A256GCM';
  wrapped: string;
}

export const keyIdOf = (deviceId: string, kind: KeyKind, field: string | undefined): string => (kind === 'device' ? deviceId : fieldKeyId(deviceId, field ?? ''));

export function transportBinding(h: KeyUpdateHeader): string {
  const keyId = keyIdOf(h.deviceId, h.kind, h.field);
  return [
    'keystrata:v1',
    'transport',
    h.deviceId,
    h.kind,
    keyId,
    h.version,
    'device',
    h.deviceId,
    h.wrappedBy,
    h.state,
    h.notBefore ? h.notBefore.toISOString() : '-',
    h.id,
  ].join('|');
}

/**
 * The message for one outbox row: `key` (the version's 32-byte key) sealed under
 * `wrappingKey` (device DEK version `h.wrappedBy`), or, with `key` null, an empty plaintext
 * that authenticates the header only. Neither key is kept or copied.
 */
export function sealKeyUpdate(h: KeyUpdateHeader, wrappingKey: Buffer, key: Buffer | null): KeyUpdateMessage {
  if (h.kind === 'field' && (h.field === undefined || !FIELD.test(h.field))) throw new Error('a field key update needs a valid field name');
  const keyId = keyIdOf(h.deviceId, h.kind, h.field);
  const wrapped = wrapKey(wrappingKey, key ?? Buffer.alloc(0), transportBinding(h));
  return {
    type: MESSAGE_TYPE,
    v: 1,
    id: h.id,
    deviceId: h.deviceId,
    kind: h.kind,
    ...(h.kind === 'field' ? { field: h.field as string } : {}),
    keyId,
    kid: `${keyId}:v${h.version}`,
    version: h.version,
    state: h.state,
    notBefore: h.notBefore ? h.notBefore.toISOString() : null,
    wrappedBy: { kind: 'device', version: h.wrappedBy },
    alg: 'A256GCM',
    wrapped: wrapped.toString('base64url'),
  };
}

// ---------- acknowledgements ----------

export interface KeyAck {
  deviceId: string;
  kind: KeyKind;
  field?: string | undefined;
  version: number;
  /** 32 bytes */
  tag: Buffer;
}

export type AckParseResult = { ok: true; ack: KeyAck } | { ok: false; reason: 'too_large' | 'not_json' | 'bad_shape' | 'device_mismatch' };

/** Parse an acknowledgement strictly: exactly the documented members, nothing else. */
export function parseAck(topicDeviceId: string, payload: Buffer): AckParseResult {
  if (payload.length > MAX_ACK_BYTES) return { ok: false, reason: 'too_large' };
  let value: unknown;
  try {
    value = JSON.parse(payload.toString('utf8'));
  } catch {
    return { ok: false, reason: 'not_json' };
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return { ok: false, reason: 'bad_shape' };
  const o = value as Record<string, unknown>;
  const allowed = o.kind === 'field' ? ['deviceId', 'kind', 'field', 'version', 'tag'] : ['deviceId', 'kind', 'version', 'tag'];
  if (Object.keys(o).some((k) => !allowed.includes(k))) return { ok: false, reason: 'bad_shape' };
  if (typeof o.deviceId !== 'string' || !DEVICE_ID.test(o.deviceId)) return { ok: false, reason: 'bad_shape' };
  if (o.kind !== 'device' && o.kind !== 'field') return { ok: false, reason: 'bad_shape' };
  if (o.kind === 'field' && (typeof o.field !== 'string' || !FIELD.test(o.field))) return { ok: false, reason: 'bad_shape' };
  if (typeof o.version !== 'number' || !Number.isSafeInteger(o.version) || o.version < 1 || o.version > 2_147_483_647) return { ok: false, reason: 'bad_shape' };
  if (typeof o.tag !== 'string' || !/^[A-Za-z0-9_-]{43}$/.test(o.tag)) return { ok: false, reason: 'bad_shape' };
  if (o.deviceId !== topicDeviceId) return { ok: false, reason: 'device_mismatch' };
  return {
    ok: true,
    ack: { deviceId: o.deviceId, kind: o.kind, ...(o.kind === 'field' ? { field: o.field as string } : {}), version: o.version, tag: Buffer.from(o.tag, 'base64url') },
  };
}

export function ackMacInput(a: Pick<KeyAck, 'deviceId' | 'kind' | 'field' | 'version'>): string {
  return ['keystrata:v1', 'ack', a.deviceId, a.kind, keyIdOf(a.deviceId, a.kind, a.field), a.version].join('|');
}

/** HMAC-SHA256 under a key derived from the acknowledged version's key (what a device computes). */
export function ackTag(key: Buffer, a: Pick<KeyAck, 'deviceId' | 'kind' | 'field' | 'version'>): Buffer {
  const ackKey = Buffer.from(crypto.hkdfSync('sha256', key, Buffer.alloc(0), 'keystrata:v1|ack-key', 32));
  try {
    return crypto.createHmac('sha256', ackKey).update(ackMacInput(a), 'utf8').digest();
  } finally {
    ackKey.fill(0);
  }
}

export function verifyAckTag(key: Buffer, ack: KeyAck): boolean {
  const expected = ackTag(key, ack);
  return ack.tag.length === expected.length && crypto.timingSafeEqual(ack.tag, expected);
}
