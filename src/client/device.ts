/**
 * Device-side reference: what firmware does with the field keys it holds. It encrypts chosen
 * top-level fields of a telemetry message into `ENC:v1:` envelopes (message rules:
 * message.ts), always with the version the device currently encrypts with (primary, else
 * grace). Tests use it to play a device; firmware authors can read it as the specification
 * in code, next to test/vectors/field-envelope-v1.json.
 */
import crypto, { type KeyObject } from 'node:crypto';
import { encryptField, fieldKid, isEnvelope } from '../envelope/field-envelope.js';
import { MessageFormatError } from './errors.js';
import { FIELD_NAME, assertDeviceId, assertMessage, messageTimestampMs, type TelemetryMessage, type TimestampUnit } from './message.js';

/** A field key version a device holds. `state`, when known, must allow encryption. */
export interface DeviceFieldKey {
  field: string;
  version: number;
  key: Uint8Array | KeyObject;
  state?: string;
}

const ENCRYPTING_STATES = new Set(['primary', 'grace']);

/**
 * A field key from a delivered JWK (`kid: <deviceId>/<field>:v<N>`, `k`, `state`), as a
 * device receives it. Throws if it is not a 256-bit field key.
 */
export function deviceFieldKeyFromJwk(jwk: { kid?: unknown; k?: unknown; state?: unknown }): DeviceFieldKey & { deviceId: string } {
  const match = typeof jwk.kid === 'string' ? /^([A-Za-z0-9._:-]{1,128})\/([a-z][a-z0-9_]{0,63}):v([1-9][0-9]{0,9})$/.exec(jwk.kid) : null;
  if (!match) throw new MessageFormatError('The JWK is not a field key (kid <deviceId>/<field>:v<N>)');
  const bytes = typeof jwk.k === 'string' ? Buffer.from(jwk.k, 'base64url') : Buffer.alloc(0);
  if (bytes.length !== 32) throw new MessageFormatError('The JWK is not a 256-bit key');
  const key = crypto.createSecretKey(bytes);
  bytes.fill(0);
  return {
    deviceId: match[1] as string,
    field: match[2] as string,
    version: Number(match[3]),
    key,
    ...(typeof jwk.state === 'string' ? { state: jwk.state } : {}),
  };
}

export interface DeviceEncryptorOptions {
  deviceId: string;
  keys: Iterable<DeviceFieldKey>;
  /** unit of `message.timestamp` in this fleet (default 'ms') */
  timestampUnit?: TimestampUnit;
}

export function createDeviceEncryptor(options: DeviceEncryptorOptions) {
  const { deviceId } = options;
  assertDeviceId(deviceId);
  const unit = options.timestampUnit ?? 'ms';
  const current = new Map<string, { version: number; kid: string; key: KeyObject; primary: boolean }>();

  /** Hold a key; the device encrypts a field with its primary version, else its newest grace one. */
  function setKey(input: DeviceFieldKey): void {
    if (!FIELD_NAME.test(input.field)) throw new MessageFormatError('field must match ^[a-z][a-z0-9_]{0,63}$');
    if (input.state !== undefined && !ENCRYPTING_STATES.has(input.state)) {
      throw new MessageFormatError(`A device may not encrypt with a ${input.state} version (${input.field} v${input.version})`);
    }
    const key = input.key instanceof Uint8Array ? crypto.createSecretKey(input.key) : input.key;
    if (key.type !== 'secret' || key.symmetricKeySize !== 32) throw new MessageFormatError('A field key must be 32 bytes');
    const candidate = { version: input.version, kid: fieldKid(deviceId, input.field, input.version), key, primary: input.state !== 'grace' };
    const held = current.get(input.field);
    const better = !held || (candidate.primary && !held.primary) || (candidate.primary === held.primary && candidate.version >= held.version);
    if (better) current.set(input.field, candidate);
  }

  for (const key of options.keys) setKey(key);

  /** Encrypt one value of `field` for a message stamped `timestampMs`. */
  function encryptValue(field: string, value: unknown, timestampMs: number): string {
    const held = current.get(field);
    if (!held) throw new MessageFormatError(`This device holds no key for field "${field}"`);
    const json = JSON.stringify(value);
    if (json === undefined) throw new MessageFormatError(`The value of "${field}" is not JSON-serialisable`);
    return encryptField({ key: held.key, kid: held.kid, deviceId, field, timestamp: timestampMs, plaintext: json });
  }

  return {
    deviceId,
    setKey,
    /** the version each field is encrypted with */
    versions: (): Record<string, number> => Object.fromEntries([...current].map(([field, held]) => [field, held.version])),
    encryptValue,
    /**
     * A copy of the message with `fields` (default: every top-level field this device holds a
     * key for) replaced by envelopes bound to this device, the field and message.timestamp.
     */
    encryptMessage(message: TelemetryMessage, fields?: readonly string[]): TelemetryMessage {
      assertMessage(message);
      const timestamp = messageTimestampMs(message, unit);
      const chosen = new Set(fields ?? [...current.keys()].filter((f) => f in message));
      for (const field of chosen) {
        if (!(field in message)) throw new MessageFormatError(`The message has no field "${field}"`);
        if (field === 'timestamp') throw new MessageFormatError('The timestamp is the AAD of the other fields and stays in clear');
      }
      const out: TelemetryMessage = {};
      for (const [name, value] of Object.entries(message)) {
        if (chosen.has(name)) out[name] = encryptValue(name, value, timestamp);
        else if (isEnvelope(value)) throw new MessageFormatError(`The clear field "${name}" starts with ENC:, which would read as an envelope`);
        else out[name] = value;
      }
      return out;
    },
  };
}

export type DeviceEncryptor = ReturnType<typeof createDeviceEncryptor>;
