/**
 * The telemetry message rules shared by devices (device.ts) and backends (decryptFields).
 *
 * A message is a JSON object. Encrypted fields are TOP-LEVEL properties whose value is an
 * `ENC:v1:` envelope string; the property name is the field name (^[a-z][a-z0-9_]{0,63}$) and
 * must be the field named by the envelope's kid. An `ENC:` string anywhere deeper is refused,
 * so a backend never mistakes a half-decrypted message for a clear one; a device must not send
 * a clear top-level string starting with `ENC:`.
 *
 * The envelope's plaintext is the UTF-8 JSON encoding of the field's value, so types survive
 * (`"P-12345"` is encrypted as the 9 bytes `"P-12345"` with the quotes, `72` as `72`).
 *
 * The message time is `message.timestamp`: a JSON number, a non-negative integer of Unix epoch
 * milliseconds (or seconds when the fleet is configured with `timestampUnit: 's'`, as in seed
 * 000's example; it is then multiplied by 1000). The envelope's AAD always carries
 * milliseconds. Strings, fractions and anything before 2000-01-01T00:00:00Z are refused: the
 * latter is a seconds value read as milliseconds or a clock that was never set, and the
 * decrypt_only rule could not be applied to it.
 */
import { MessageFormatError } from './errors.js';

export type TimestampUnit = 'ms' | 's';
export type TelemetryMessage = Record<string, unknown>;

export const EARLIEST_TIMESTAMP_MS = Date.UTC(2000, 0, 1);
export const FIELD_NAME = /^[a-z][a-z0-9_]{0,63}$/;
export const DEVICE_ID = /^[A-Za-z0-9._:-]{1,128}$/;

export function assertMessage(message: unknown): asserts message is TelemetryMessage {
  if (message === null || typeof message !== 'object' || Array.isArray(message)) throw new MessageFormatError('The message must be a JSON object');
}

export function assertDeviceId(deviceId: string): void {
  if (typeof deviceId !== 'string' || !DEVICE_ID.test(deviceId)) throw new MessageFormatError('deviceId must match ^[A-Za-z0-9._:-]{1,128}$');
}

/** The message time in Unix epoch milliseconds, per the rule above. */
export function messageTimestampMs(message: TelemetryMessage, unit: TimestampUnit = 'ms'): number {
  const raw = message.timestamp;
  if (typeof raw !== 'number' || !Number.isSafeInteger(raw) || raw < 0) {
    throw new MessageFormatError(`message.timestamp must be a non-negative integer of Unix epoch ${unit === 's' ? 'seconds' : 'milliseconds'}`);
  }
  const ms = unit === 's' ? raw * 1000 : raw;
  if (!Number.isSafeInteger(ms)) throw new MessageFormatError('message.timestamp is out of range');
  if (ms < EARLIEST_TIMESTAMP_MS) {
    throw new MessageFormatError(
      `message.timestamp is before 2000-01-01: a ${unit === 'ms' ? 'seconds value sent as milliseconds' : 'wrong unit'} or an unset device clock`,
    );
  }
  return ms;
}

/** Throw if an `ENC:` string hides below the top level (only top-level fields may be encrypted). */
export function assertNoNestedEnvelopes(message: TelemetryMessage): void {
  const walk = (value: unknown, path: string, depth: number): void => {
    if (depth > 64) throw new MessageFormatError('The message is nested too deeply');
    if (typeof value === 'string') {
      if (value.startsWith('ENC:')) throw new MessageFormatError(`An envelope at ${path}: only top-level fields may be encrypted`);
    } else if (Array.isArray(value)) {
      value.forEach((item, i) => walk(item, `${path}[${i}]`, depth + 1));
    } else if (value !== null && typeof value === 'object') {
      for (const [key, item] of Object.entries(value)) walk(item, `${path}.${key}`, depth + 1);
    }
  };
  for (const [key, value] of Object.entries(message)) {
    if (typeof value !== 'string') walk(value, key, 1);
  }
}
