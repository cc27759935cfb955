/**
 * Delivered keys: the JWK Set inside a delivery JWE, checked member by member, and the rule
 * that says whether a message may be accepted under a version given its state (DESIGN §2).
 */
import crypto, { type KeyObject } from 'node:crypto';
import { compactDecrypt, type CryptoKey, type JWK } from 'jose';
import { KeyStateError, KeystrataClientError, type KeyStateRefusal } from './errors.js';

export const DELIVERY_ALG = 'ECDH-ES+A256KW';
export const DELIVERY_ENC = 'A256GCM';

export type VersionState = 'pending' | 'primary' | 'grace' | 'decrypt_only' | 'disabled' | 'destroy_scheduled' | 'destroyed';
const STATES: ReadonlySet<string> = new Set(['pending', 'primary', 'grace', 'decrypt_only', 'disabled', 'destroy_scheduled', 'destroyed']);

/** Where the time a version stopped being usable for encryption came from. */
export type EncryptionEndSource = 'server' | 'grace_end' | 'observed';

/** One delivered key version. `key` is a KeyObject: it prints and serialises as nothing secret. */
export interface KeyVersion {
  kid: string;
  deviceId: string;
  /** set for field keys */
  field?: string;
  version: number;
  state: VersionState;
  /** when the version entered its current state (ms), when the service says so */
  stateChangedAt: number | undefined;
  /** when the current state ends (ms), if it does */
  stateUntil: number | null;
  createdAt: number | undefined;
  key: KeyObject;
  /** when this client received it (ms, client clock) */
  fetchedAt: number;
  /**
   * For `decrypt_only`: the instant after which messages under this version are refused, and how
   * it was learnt. The service's `stateChangedAt` when present; otherwise the end of the grace
   * period this client saw earlier; otherwise the time this client first saw the version as
   * decrypt_only (an upper bound: late messages in between are accepted).
   */
  encryptionEnd?: { at: number; source: EncryptionEndSource };
}

const FIELD_KID = /^([A-Za-z0-9._:-]{1,128})\/([a-z][a-z0-9_]{0,63}):v([1-9][0-9]{0,9})$/;
const DEVICE_KID = /^([A-Za-z0-9._:-]{1,128}):v([1-9][0-9]{0,9})$/;

/** `<deviceId>:v<N>` or `<deviceId>/<field>:v<N>` */
export function kidOf(deviceId: string, field: string | undefined, version: number): string {
  return field === undefined ? `${deviceId}:v${version}` : `${deviceId}/${field}:v${version}`;
}

/** The key a version belongs to: `<deviceId>` or `<deviceId>/<field>`. */
export function keyNameOf(deviceId: string, field: string | undefined): string {
  return field === undefined ? deviceId : `${deviceId}/${field}`;
}

/** The delivery private key once imported. */
export type ImportedDeliveryKey = CryptoKey | KeyObject;

/** Decrypt a delivery JWE and check every key in its JWK Set. The payload buffer is zeroed. */
export async function openKeySet(jwe: string, privateKey: ImportedDeliveryKey, now: number): Promise<KeyVersion[]> {
  let plaintext: Uint8Array;
  try {
    ({ plaintext } = await compactDecrypt(jwe, privateKey, {
      keyManagementAlgorithms: [DELIVERY_ALG],
      contentEncryptionAlgorithms: [DELIVERY_ENC],
    }));
  } catch (error) {
    throw new KeystrataClientError(
      'delivery_decrypt_failed',
      'The key delivery could not be decrypted with the delivery private key (was another delivery key registered for this client?)',
      { cause: error instanceof Error ? new Error(error.message) : undefined },
    );
  }
  let set: unknown;
  try {
    set = JSON.parse(Buffer.from(plaintext.buffer, plaintext.byteOffset, plaintext.byteLength).toString('utf8'));
  } catch {
    throw new KeystrataClientError('delivery_malformed', 'The key delivery payload is not JSON');
  } finally {
    plaintext.fill(0);
  }
  const keys = (set as { keys?: unknown })?.keys;
  if (!Array.isArray(keys)) throw new KeystrataClientError('delivery_malformed', 'The key delivery payload is not a JWK Set');
  return keys.map((jwk) => toKeyVersion(jwk as JWK & Record<string, unknown>, now));
}

function toKeyVersion(jwk: JWK & Record<string, unknown>, now: number): KeyVersion {
  const bad = (what: string): never => {
    throw new KeystrataClientError('delivery_malformed', `A delivered key is malformed: ${what}`);
  };
  if (jwk.kty !== 'oct' || jwk.alg !== 'A256GCM') bad('expected kty "oct" and alg "A256GCM"');
  const kid = typeof jwk.kid === 'string' ? jwk.kid : bad('no kid');
  const fieldMatch = FIELD_KID.exec(kid);
  const deviceMatch = fieldMatch ? null : DEVICE_KID.exec(kid);
  if (!fieldMatch && !deviceMatch) bad(`kid ${JSON.stringify(kid.slice(0, 200))} is not a device or field key id`);
  const deviceId = (fieldMatch?.[1] ?? deviceMatch?.[1]) as string;
  const field = fieldMatch?.[2];
  const version = Number(fieldMatch?.[3] ?? deviceMatch?.[2]);
  // the metadata must agree with the kid it travels with
  if (jwk.deviceId !== deviceId || jwk.version !== version || (jwk.field ?? undefined) !== field) bad(`metadata of ${kid} disagree with its kid`);
  const state = typeof jwk.state === 'string' && STATES.has(jwk.state) ? (jwk.state as VersionState) : bad(`${kid} has an unknown state`);
  const material = typeof jwk.k === 'string' && /^[A-Za-z0-9_-]{43}$/.test(jwk.k) ? Buffer.from(jwk.k, 'base64url') : bad(`${kid} is not a 256-bit key`);
  if (material.length !== 32 || material.toString('base64url') !== jwk.k) bad(`${kid} is not a 256-bit key`);
  const key = crypto.createSecretKey(material);
  material.fill(0);
  const entry: KeyVersion = {
    kid,
    deviceId,
    ...(field !== undefined ? { field } : {}),
    version,
    state,
    stateChangedAt: optionalTime(jwk.stateChangedAt, `${kid} stateChangedAt`, bad),
    stateUntil: optionalTime(jwk.stateUntil, `${kid} stateUntil`, bad) ?? null,
    createdAt: optionalTime(jwk.createdAt, `${kid} createdAt`, bad),
    key,
    fetchedAt: now,
  };
  return entry;
}

function optionalTime(value: unknown, what: string, bad: (what: string) => never): number | undefined {
  if (value === undefined || value === null) return undefined;
  const ms = typeof value === 'string' ? Date.parse(value) : NaN;
  return Number.isFinite(ms) ? ms : bad(`${what} is not a date-time`);
}

/**
 * Fill in `encryptionEnd` of a freshly delivered version, using what the client knew of the
 * same version before (see KeyVersion.encryptionEnd).
 */
export function withEncryptionEnd(fresh: KeyVersion, previous: KeyVersion | undefined): KeyVersion {
  if (fresh.state !== 'decrypt_only') return fresh;
  if (fresh.stateChangedAt !== undefined) return { ...fresh, encryptionEnd: { at: fresh.stateChangedAt, source: 'server' } };
  if (previous?.encryptionEnd) return { ...fresh, encryptionEnd: previous.encryptionEnd };
  if (previous?.state === 'grace' && previous.stateUntil !== null) return { ...fresh, encryptionEnd: { at: previous.stateUntil, source: 'grace_end' } };
  return { ...fresh, encryptionEnd: { at: fresh.fetchedAt, source: 'observed' } };
}

export type Verdict = { ok: true } | { ok: false; refresh: boolean; error: KeyStateError };

/**
 * May a message stamped `timestamp` (ms) be accepted under this version?
 *
 * - primary: yes.
 * - grace: yes, until its `stateUntil` (the end of grace, after which the version is
 *   decrypt_only even if the service has not recorded the change yet).
 * - decrypt_only: only for messages stamped at or before the moment it stopped being usable
 *   for encryption (`encryptionEnd`); later ones are refused.
 * - pending: devices may not encrypt with it yet; refused (the caller refreshes the state once,
 *   since a cached pending version may have become primary meanwhile).
 * - disabled, destroy_scheduled, destroyed: refused (never delivered; defence in depth).
 */
export function judge(entry: KeyVersion, timestamp: number): Verdict {
  const iso = (ms: number) => new Date(ms).toISOString();
  switch (entry.state) {
    case 'primary':
      return { ok: true };
    case 'grace':
      if (entry.stateUntil !== null && timestamp > entry.stateUntil) {
        return refuse('key_decrypt_only', entry, `Key ${entry.kid}: its grace period ended at ${iso(entry.stateUntil)}; the message is stamped ${iso(timestamp)}`, false);
      }
      return { ok: true };
    case 'decrypt_only': {
      const end = entry.encryptionEnd ?? withEncryptionEnd(entry, undefined).encryptionEnd;
      if (end && timestamp > end.at) {
        return refuse('key_decrypt_only', entry, `Key ${entry.kid} is decrypt_only since ${iso(end.at)}; the message is stamped ${iso(timestamp)}, after that`, false);
      }
      return { ok: true };
    }
    case 'pending':
      return refuse('key_pending', entry, `Key ${entry.kid} is pending: devices may not encrypt with it yet`, true);
    default:
      return refuse('key_disabled', entry, `Key ${entry.kid} is ${entry.state}`, false);
  }
}

function refuse(code: KeyStateRefusal, entry: KeyVersion, message: string, refresh: boolean): Verdict {
  return { ok: false, refresh, error: new KeyStateError(code, entry.kid, entry.state, message) };
}
