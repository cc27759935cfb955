/**
 * `keystrata/client`: what backend services and devices import.
 *
 *   import { createKeystrataClient } from 'keystrata/client';
 *   const keystrata = createKeystrataClient({ baseUrl, token, deliveryPrivateKey });
 *   const clear = await keystrata.decryptFields(deviceId, message);
 *
 * Only Node built-ins, jose and lru-cache are imported from here down.
 */
export { createKeystrataClient, MAX_FETCH_ITEMS, type ClientStats, type KeyRef, type KeystrataClient, type KeystrataClientOptions, type PrefetchResult } from './client.js';
export { createDeviceEncryptor, deviceFieldKeyFromJwk, type DeviceEncryptor, type DeviceEncryptorOptions, type DeviceFieldKey } from './device.js';
export {
  FieldDecryptionError,
  KeyStateError,
  KeyUnavailableError,
  KeystrataClientError,
  MessageFormatError,
  type KeyStateRefusal,
  type KeystrataClientErrorOptions,
  type MissingReason,
  type Problem,
} from './errors.js';
export { parseRetryAfter, type RetryOptions, type TokenSource } from './http.js';
export { judge, type EncryptionEndSource, type KeyVersion, type VersionState } from './keys.js';
export { EARLIEST_TIMESTAMP_MS, messageTimestampMs, type TelemetryMessage, type TimestampUnit } from './message.js';
export * from '../envelope/index.js';
