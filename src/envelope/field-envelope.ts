/**
 * The field envelope, version 1: how a device carries one encrypted telemetry field.
 *
 *   ENC:v1:<kid>:<payload>
 *
 *   kid     = <deviceId>/<field>:v<version>      the field key version that encrypted it
 *   payload = base64url, unpadded, canonical, of  nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)
 *
 * Cipher: AES-256-GCM with the field key named by the kid, a fresh random 96-bit nonce per
 * value, a 128-bit tag. The AAD binds the value to its device, field, message and key:
 *
 *   AAD = UTF-8 of  "keystrata:envelope:v1|" deviceId "|" field "|" timestamp "|" kid
 *
 * where `timestamp` is the message time as Unix epoch milliseconds, written as a plain decimal
 * integer (0 ≤ t ≤ 2^53 − 1, no sign, no leading zeros, no exponent). The separator `|` cannot
 * occur in any component: device ids match ^[A-Za-z0-9._:-]{1,128}$, field names
 * ^[a-z][a-z0-9_]{0,63}$, the kid is built from those plus `/`, `:v` and digits, and every
 * component is checked against its pattern before the AAD is built, on both sides.
 *
 * Parsing is unambiguous although ids and kids contain `:`: the prefix `ENC:v1:` is fixed, the
 * payload is everything after the LAST `:` (base64url has no `:`), the kid is what lies between.
 * Inside the kid, `/` occurs exactly once (ids and fields have none) and the field has no `:`.
 *
 * A value whose kid does not name (deviceId, field) is refused before any decryption; a value
 * moved to another message (timestamp) or altered in any way fails GCM authentication. Field
 * keys are rotated weekly, far below the 2^32 random-nonce invocations NIST SP 800-38D allows
 * per key.
 */
import crypto, { type KeyObject } from 'node:crypto';

export const ENVELOPE_PREFIX = 'ENC:v1:';
export const AAD_PREFIX = 'keystrata:envelope:v1';
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const KEY_BYTES = 32;
/** Largest plaintext one envelope may carry (a telemetry field, not a file). */
export const MAX_PLAINTEXT_BYTES = 64 * 1024;

const DEVICE_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const FIELD = /^[a-z][a-z0-9_]{0,63}$/;
const FIELD_KID = /^([A-Za-z0-9._:-]{1,128})\/([a-z][a-z0-9_]{0,63}):v([1-9][0-9]{0,9})$/;
const B64URL = /^[A-Za-z0-9_-]*$/;
const MAX_VERSION = 2_147_483_647;
// prefix + longest kid + payload of the largest plaintext
const MAX_ENVELOPE_CHARS = ENVELOPE_PREFIX.length + 128 + 1 + 64 + 12 + 1 + Math.ceil(((NONCE_BYTES + MAX_PLAINTEXT_BYTES + TAG_BYTES) * 4) / 3);

export type EnvelopeErrorCode =
  | 'malformed'
  | 'unsupported_version'
  | 'truncated'
  | 'non_canonical'
  | 'too_large'
  | 'context_mismatch'
  | 'authentication_failed'
  | 'invalid_argument';

/** Every refusal of this module. The message never contains key material or plaintext. */
export class EnvelopeError extends Error {
  constructor(
    readonly code: EnvelopeErrorCode,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** Not an `ENC:v1:` envelope at all, or its kid or payload alphabet is wrong. */
export class EnvelopeFormatError extends EnvelopeError {}
/** The payload is too short to hold nonce and tag, or has an impossible base64url length. */
export class EnvelopeTruncatedError extends EnvelopeError {}
/** The payload is not the one canonical unpadded base64url encoding (padding, `+`/`/`, stray bits). */
export class EnvelopeEncodingError extends EnvelopeError {}
/** The kid names another device or field than the one the value was presented for. */
export class EnvelopeContextError extends EnvelopeError {}
/** GCM authentication failed: wrong key, altered value, or moved to another message (timestamp). */
export class EnvelopeAuthenticationError extends EnvelopeError {}

export interface FieldKid {
  kid: string;
  deviceId: string;
  field: string;
  version: number;
}

export interface ParsedEnvelope extends FieldKid {
  nonce: Buffer;
  ciphertext: Buffer;
  tag: Buffer;
}

export type FieldKeyInput = Uint8Array | KeyObject;

export interface EncryptFieldInput {
  key: FieldKeyInput;
  kid: string;
  deviceId: string;
  field: string;
  /** message time, Unix epoch milliseconds (integer) */
  timestamp: number;
  /** bytes, or a string encoded as UTF-8 */
  plaintext: Uint8Array | string;
}

export interface DecryptFieldInput {
  key: FieldKeyInput;
  deviceId: string;
  field: string;
  timestamp: number;
  /** the `ENC:v1:…` string, or what parseEnvelope returned for it */
  envelope: string | ParsedEnvelope;
}

/** True when the value looks like an envelope of any version (starts with `ENC:`). */
export function isEnvelope(value: unknown): value is string {
  return typeof value === 'string' && value.startsWith('ENC:');
}

/** The kid of a field key version: `<deviceId>/<field>:v<version>`. */
export function fieldKid(deviceId: string, field: string, version: number): string {
  assertDeviceId(deviceId);
  assertField(field);
  if (!Number.isInteger(version) || version < 1 || version > MAX_VERSION) throw new EnvelopeError('invalid_argument', 'version must be an integer from 1 to 2147483647');
  return `${deviceId}/${field}:v${version}`;
}

/** Split a field kid into its parts, or throw EnvelopeFormatError. */
export function parseFieldKid(kid: string): FieldKid {
  const match = FIELD_KID.exec(kid);
  const version = match ? Number(match[3]) : NaN;
  if (!match || version > MAX_VERSION) {
    throw new EnvelopeFormatError('malformed', 'The kid is not a field key id of the form <deviceId>/<field>:v<version>');
  }
  return { kid, deviceId: match[1] as string, field: match[2] as string, version };
}

/** The AAD of a value: see the module comment. Exported so firmware authors can compare. */
export function envelopeAad(deviceId: string, field: string, timestamp: number, kid: string): Buffer {
  assertDeviceId(deviceId);
  assertField(field);
  assertTimestamp(timestamp);
  parseFieldKid(kid);
  return Buffer.from([AAD_PREFIX, deviceId, field, String(timestamp), kid].join('|'), 'utf8');
}

/** Parse `ENC:v1:<kid>:<payload>` without decrypting it. Throws a typed EnvelopeError. */
export function parseEnvelope(value: string): ParsedEnvelope {
  if (typeof value !== 'string' || !value.startsWith('ENC:')) throw new EnvelopeFormatError('malformed', 'The value is not an envelope: it must start with ENC:');
  if (!value.startsWith(ENVELOPE_PREFIX)) {
    const version = /^ENC:([^:]{0,16})/.exec(value)?.[1] ?? '';
    throw new EnvelopeFormatError('unsupported_version', `Unsupported envelope version "${version}": only ENC:v1 is understood`);
  }
  if (value.length > MAX_ENVELOPE_CHARS) throw new EnvelopeError('too_large', `The envelope is longer than ${MAX_ENVELOPE_CHARS} characters`);
  const rest = value.slice(ENVELOPE_PREFIX.length);
  const split = rest.lastIndexOf(':');
  if (split < 0) throw new EnvelopeFormatError('malformed', 'The envelope has no kid: expected ENC:v1:<kid>:<payload>');
  const parsedKid = parseFieldKid(rest.slice(0, split));
  const bytes = decodeCanonicalBase64url(rest.slice(split + 1));
  if (bytes.length < NONCE_BYTES + TAG_BYTES) {
    throw new EnvelopeTruncatedError('truncated', `The payload is ${bytes.length} bytes, shorter than nonce and tag (${NONCE_BYTES + TAG_BYTES}): truncated`);
  }
  return {
    ...parsedKid,
    nonce: bytes.subarray(0, NONCE_BYTES),
    ciphertext: bytes.subarray(NONCE_BYTES, bytes.length - TAG_BYTES),
    tag: bytes.subarray(bytes.length - TAG_BYTES),
  };
}

/** Encrypt one field value under the field key `kid`, with a fresh random nonce. */
export function encryptField(input: EncryptFieldInput): string {
  return sealWithNonce(input, crypto.randomBytes(NONCE_BYTES));
}

/**
 * Decrypt one value. Checks, in order: envelope syntax, that the kid names (deviceId, field),
 * then GCM authentication over the AAD. Returns the plaintext bytes.
 */
export function decryptField(input: DecryptFieldInput): Buffer {
  const envelope = typeof input.envelope === 'string' ? parseEnvelope(input.envelope) : input.envelope;
  if (envelope.deviceId !== input.deviceId || envelope.field !== input.field) {
    throw new EnvelopeContextError(
      'context_mismatch',
      `The value was encrypted for ${envelope.deviceId}/${envelope.field}, not ${input.deviceId}/${input.field}: it was moved to another device or field`,
    );
  }
  const aad = envelopeAad(input.deviceId, input.field, input.timestamp, envelope.kid);
  const decipher = crypto.createDecipheriv('aes-256-gcm', secretKey(input.key), envelope.nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad);
  decipher.setAuthTag(envelope.tag);
  const plaintext = decipher.update(envelope.ciphertext);
  try {
    decipher.final();
  } catch {
    plaintext.fill(0);
    throw new EnvelopeAuthenticationError(
      'authentication_failed',
      `The value under ${envelope.kid} failed authentication: wrong key, altered, or moved to another message (timestamp)`,
    );
  }
  return plaintext;
}

/**
 * @internal Deterministic encryption with a caller-chosen nonce, ONLY for generating and
 * checking the committed known-answer vectors. Never re-export it: a repeated nonce under one
 * key breaks GCM completely.
 */
export function encryptFieldWithFixedNonceForVectors(input: EncryptFieldInput, nonce: Uint8Array): string {
  if (nonce.length !== NONCE_BYTES) throw new EnvelopeError('invalid_argument', `The nonce must be ${NONCE_BYTES} bytes`);
  return sealWithNonce(input, Buffer.from(nonce));
}

function sealWithNonce(input: EncryptFieldInput, nonce: Buffer): string {
  const parsedKid = parseFieldKid(input.kid);
  if (parsedKid.deviceId !== input.deviceId || parsedKid.field !== input.field) {
    throw new EnvelopeContextError('context_mismatch', `The kid ${input.kid} is not a key of ${input.deviceId}/${input.field}`);
  }
  const plaintext = typeof input.plaintext === 'string' ? Buffer.from(input.plaintext, 'utf8') : input.plaintext;
  if (plaintext.length > MAX_PLAINTEXT_BYTES) throw new EnvelopeError('too_large', `The plaintext is larger than ${MAX_PLAINTEXT_BYTES} bytes`);
  const aad = envelopeAad(input.deviceId, input.field, input.timestamp, input.kid);
  const cipher = crypto.createCipheriv('aes-256-gcm', secretKey(input.key), nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  const payload = Buffer.concat([nonce, ciphertext, cipher.getAuthTag()]);
  return `${ENVELOPE_PREFIX}${input.kid}:${payload.toString('base64url')}`;
}

/** Decode base64url, accepting only the canonical unpadded form (so one value has one spelling). */
function decodeCanonicalBase64url(text: string): Buffer {
  if (text.length === 0) throw new EnvelopeTruncatedError('truncated', 'The payload is empty: truncated');
  if (/[+/=]/.test(text)) {
    throw new EnvelopeEncodingError('non_canonical', 'The payload was re-encoded: it must be unpadded base64url (- and _, no = padding), not base64');
  }
  if (!B64URL.test(text)) throw new EnvelopeFormatError('malformed', 'The payload contains characters outside the base64url alphabet');
  if (text.length % 4 === 1) throw new EnvelopeTruncatedError('truncated', 'The payload has an impossible base64url length: truncated or corrupted');
  const bytes = Buffer.from(text, 'base64url');
  if (bytes.toString('base64url') !== text) {
    throw new EnvelopeEncodingError('non_canonical', 'The payload is not canonical base64url (non-zero unused trailing bits): it was truncated, re-encoded or altered');
  }
  return bytes;
}

function secretKey(key: FieldKeyInput): KeyObject {
  if (key instanceof Uint8Array) {
    if (key.length !== KEY_BYTES) throw new EnvelopeError('invalid_argument', 'A field key must be 32 bytes (AES-256)');
    return crypto.createSecretKey(key);
  }
  if (key.type !== 'secret' || key.symmetricKeySize !== KEY_BYTES) throw new EnvelopeError('invalid_argument', 'A field key must be a 32-byte secret KeyObject (AES-256)');
  return key;
}

function assertDeviceId(deviceId: string): void {
  if (typeof deviceId !== 'string' || !DEVICE_ID.test(deviceId)) throw new EnvelopeError('invalid_argument', 'deviceId must match ^[A-Za-z0-9._:-]{1,128}$');
}

function assertField(field: string): void {
  if (typeof field !== 'string' || !FIELD.test(field)) throw new EnvelopeError('invalid_argument', 'field must match ^[a-z][a-z0-9_]{0,63}$');
}

function assertTimestamp(timestamp: number): void {
  if (!Number.isSafeInteger(timestamp) || timestamp < 0) {
    throw new EnvelopeError('invalid_argument', 'timestamp must be a non-negative integer of Unix epoch milliseconds (at most 2^53 − 1)');
  }
}
