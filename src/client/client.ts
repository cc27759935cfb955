/**
 * The keystrata client for backend services: fetches device and field keys (one bulk request
 * for everything a message or a batch needs), opens the delivery JWE with the backend's
 * delivery private key, caches versions with a TTL and a size bound, honours version states,
 * and decrypts the `ENC:v1:` fields of telemetry messages.
 *
 * Freshness: a cached version is served for `cacheTtlMs` (default 1 h, as seed 000 advises).
 * When a message names a version this client does not hold for a key it already knows, the
 * client takes it as a sign of rotation and re-reads every version of that key in the same
 * request, so states of the older versions (grace → decrypt_only, disabled) are refreshed
 * too and versions no longer delivered are dropped. A version cached as `pending` is re-read
 * (at most every `minRefreshIntervalMs`) before a message under it is refused.
 */
import crypto, { type KeyObject } from 'node:crypto';
import { types } from 'node:util';
import { importJWK, type CryptoKey, type JWK } from 'jose';
import { EnvelopeContextError, decryptField, isEnvelope, parseEnvelope, type ParsedEnvelope } from '../envelope/field-envelope.js';
import { createKeyVersionCache } from './cache.js';
import { FieldDecryptionError, KeyUnavailableError, KeystrataClientError, MessageFormatError, type MissingReason } from './errors.js';
import { createHttp, serviceUrl, type RetryOptions, type TokenSource } from './http.js';
import { DELIVERY_ALG, judge, keyNameOf, kidOf, openKeySet, type ImportedDeliveryKey, type KeyVersion } from './keys.js';
import {
  EARLIEST_TIMESTAMP_MS,
  FIELD_NAME,
  assertDeviceId,
  assertMessage,
  assertNoNestedEnvelopes,
  messageTimestampMs,
  type TelemetryMessage,
  type TimestampUnit,
} from './message.js';

export const MAX_FETCH_ITEMS = 1000;

export interface KeystrataClientOptions {
  /** the service, e.g. `https://keystrata.internal:8443` (a path prefix is kept) */
  baseUrl: string | URL;
  /** a bearer token, or a function returning a current one (called before every request, and again once after a 401) */
  token: TokenSource;
  /** the private half of the delivery key registered for this client: a private JWK (EC P-256 or X25519), CryptoKey or KeyObject */
  deliveryPrivateKey: JWK | CryptoKey | KeyObject;
  /** how long a delivered version is served from memory (default 3,600,000 = 1 h) */
  cacheTtlMs?: number;
  /** most versions held at once, least recently used evicted first (default 10,000) */
  maxCacheEntries?: number;
  /** how long a refusal (unknown, not deliverable, destroyed) is remembered (default 30 s; 0 = never) */
  negativeCacheTtlMs?: number;
  /** least time between forced re-reads of one version (default 10 s) */
  minRefreshIntervalMs?: number;
  fetch?: typeof fetch;
  retry?: RetryOptions;
  /** per attempt (default 10 s) */
  requestTimeoutMs?: number;
  clock?: { now(): Date };
  /** unit of `message.timestamp` in this fleet (default 'ms') */
  timestampUnit?: TimestampUnit;
  /** allow plain http to a non-loopback host (e.g. behind a mesh that terminates mTLS) */
  allowInsecureHttp?: boolean;
  /** how the client waits between retries (tests inject one) */
  sleep?: (ms: number) => Promise<void>;
}

export interface KeyRef {
  deviceId: string;
  /** omitted for a device DEK */
  field?: string | undefined;
  version: number;
}

export interface PrefetchResult {
  /** versions served from the cache */
  cached: number;
  /** versions this call asked the service for */
  fetched: number;
  missing: Array<KeyRef & { kid: string; reason: MissingReason }>;
}

export interface ClientStats {
  /** HTTP key-fetch calls made (retries not counted) */
  fetchCalls: number;
  cacheHits: number;
  cacheMisses: number;
  cacheSize: number;
}

type Resolution = KeyVersion | MissingReason;

interface FetchItem {
  deviceId: string;
  field?: string;
  version: number | 'all';
}

export function createKeystrataClient(options: KeystrataClientOptions) {
  const clock = options.clock ?? { now: () => new Date() };
  const now = () => clock.now().getTime();
  const ttlMs = positive(options.cacheTtlMs ?? 3_600_000, 'cacheTtlMs');
  const minRefreshIntervalMs = nonNegative(options.minRefreshIntervalMs ?? 10_000, 'minRefreshIntervalMs');
  const timestampUnit = options.timestampUnit ?? 'ms';
  if (timestampUnit !== 'ms' && timestampUnit !== 's') throw new KeystrataClientError('invalid_option', "timestampUnit must be 'ms' or 's'");
  const cache = createKeyVersionCache({
    maxEntries: positive(options.maxCacheEntries ?? 10_000, 'maxCacheEntries'),
    ttlMs,
    negativeTtlMs: nonNegative(options.negativeCacheTtlMs ?? 30_000, 'negativeCacheTtlMs'),
    now,
  });
  if (typeof options.token !== 'string' && typeof options.token !== 'function') throw new KeystrataClientError('invalid_option', 'token must be a string or a function');
  const http = createHttp({
    baseUrl: serviceUrl(options.baseUrl, options.allowInsecureHttp ?? false),
    token: options.token,
    fetch: options.fetch ?? ((input, init) => globalThis.fetch(input, init)),
    retry: {
      maxAttempts: positive(options.retry?.maxAttempts ?? 4, 'retry.maxAttempts'),
      maxDelayMs: nonNegative(options.retry?.maxDelayMs ?? 10_000, 'retry.maxDelayMs'),
      baseDelayMs: nonNegative(options.retry?.baseDelayMs ?? 250, 'retry.baseDelayMs'),
    },
    requestTimeoutMs: positive(options.requestTimeoutMs ?? 10_000, 'requestTimeoutMs'),
    now,
    sleep: options.sleep ?? ((ms) => new Promise((resolve) => setTimeout(resolve, ms))),
    random: Math.random,
  });
  let deliveryKey: Promise<ImportedDeliveryKey> | undefined;
  const inflight = new Map<string, Promise<Resolution>>();
  const stats = { fetchCalls: 0, cacheHits: 0, cacheMisses: 0 };

  /** Resolve versions: cache first, then ONE bulk request (per 1,000 items) for all the rest. */
  async function resolveMany(refs: readonly KeyRef[], forced: ReadonlySet<string> = new Set()): Promise<Map<string, Resolution>> {
    return (await resolveCounted(refs, forced)).out;
  }

  async function resolveCounted(refs: readonly KeyRef[], forced: ReadonlySet<string> = new Set()): Promise<{ out: Map<string, Resolution>; fetched: number }> {
    const out = new Map<string, Resolution>();
    const waits: Array<Promise<void>> = [];
    const toFetch = new Map<string, KeyRef>();
    for (const ref of refs) {
      const kid = checkedKid(ref);
      if (out.has(kid) || toFetch.has(kid)) continue;
      if (!forced.has(kid)) {
        const hit = cache.get(kid);
        if (hit) {
          stats.cacheHits++;
          out.set(kid, hit);
          continue;
        }
        const refused = cache.getMissing(kid);
        if (refused) {
          out.set(kid, refused);
          continue;
        }
        const pending = inflight.get(kid);
        if (pending) {
          waits.push(pending.then((r) => void out.set(kid, r)));
          continue;
        }
      }
      stats.cacheMisses++;
      toFetch.set(kid, ref);
    }
    if (toFetch.size > 0) {
      const batch = fetchVersions([...toFetch.values()], forced);
      const perKid = new Map<string, Promise<Resolution>>();
      for (const kid of toFetch.keys()) {
        const one = batch.then((m) => m.get(kid) ?? 'not_found');
        one.catch(() => {}); // awaited below or by a concurrent caller; never unhandled
        perKid.set(kid, one);
        inflight.set(kid, one);
      }
      try {
        const fetched = await batch;
        for (const kid of toFetch.keys()) out.set(kid, fetched.get(kid) ?? 'not_found');
      } finally {
        for (const [kid, one] of perKid) if (inflight.get(kid) === one) inflight.delete(kid);
      }
    }
    await Promise.all(waits);
    return { out, fetched: toFetch.size };
  }

  /**
   * Ask the service for these versions. A version not held (fresh or stale) of a key held in
   * other versions is the sign of a rotation: that key is re-read whole. A version merely
   * stale is re-read alone: re-reading the whole key at every TTL refresh would fetch (and
   * make the service unwrap and audit) every version a key has ever kept.
   */
  async function fetchVersions(refs: readonly KeyRef[], forced: ReadonlySet<string>): Promise<Map<string, Resolution>> {
    const items: FetchItem[] = [];
    const rereadWhole = new Set<string>();
    for (const ref of refs) {
      items.push(item(ref.deviceId, ref.field, ref.version));
      const name = keyNameOf(ref.deviceId, ref.field);
      const known = cache.versionsOf(name);
      const rotated = known.length > 0 && !known.some((v) => v.version === ref.version);
      if (!rereadWhole.has(name) && (forced.has(kidOf(ref.deviceId, ref.field, ref.version)) || rotated)) {
        rereadWhole.add(name);
        items.push(item(ref.deviceId, ref.field, 'all'));
      }
    }
    const out = new Map<string, Resolution>();
    for (let i = 0; i < items.length; i += MAX_FETCH_ITEMS) {
      await fetchChunk(items.slice(i, i + MAX_FETCH_ITEMS), out);
    }
    return out;
  }

  async function fetchChunk(items: FetchItem[], out: Map<string, Resolution>): Promise<void> {
    stats.fetchCalls++;
    const body = await http.requestJson('POST', 'v1/keys/fetch', { items });
    const { jwe, missing } = checkFetchResult(body);
    const delivered = await openKeySet(jwe, await privateKey(), now());
    const asked = new Set(items.map((i) => keyNameOf(i.deviceId, i.field)));
    const deliveredByKey = new Map<string, Set<string>>();
    for (const version of delivered) {
      const name = keyNameOf(version.deviceId, version.field);
      if (!asked.has(name)) continue; // not ours to hold
      out.set(version.kid, cache.set(version));
      let kids = deliveredByKey.get(name);
      if (!kids) deliveredByKey.set(name, (kids = new Set()));
      kids.add(version.kid);
    }
    const goneKeys = new Set<string>();
    for (const miss of missing) {
      if (typeof miss.version === 'number') {
        const kid = kidOf(miss.deviceId, miss.field, miss.version);
        cache.delete(kid);
        cache.setMissing(kid, miss.reason);
        out.set(kid, miss.reason);
      } else {
        goneKeys.add(keyNameOf(miss.deviceId, miss.field));
      }
    }
    // a whole-key re-read lists every deliverable version: drop cached ones no longer among them
    for (const whole of items.filter((i) => i.version === 'all')) {
      const name = keyNameOf(whole.deviceId, whole.field);
      const still = deliveredByKey.get(name) ?? new Set();
      for (const cached of cache.versionsOf(name)) {
        if (goneKeys.has(name) || !still.has(cached.kid)) cache.delete(cached.kid);
      }
    }
    for (const exact of items) {
      if (exact.version === 'all') continue;
      const kid = kidOf(exact.deviceId, exact.field, exact.version);
      if (!out.has(kid)) {
        const reason: MissingReason = goneKeys.has(keyNameOf(exact.deviceId, exact.field)) ? 'not_deliverable' : 'not_found';
        cache.setMissing(kid, reason);
        out.set(kid, reason);
      }
    }
  }

  function privateKey(): Promise<ImportedDeliveryKey> {
    if (!deliveryKey) {
      const importing = importDeliveryPrivateKey(options.deliveryPrivateKey);
      // a failed import is not remembered: the next call reports it again
      importing.catch(() => {
        if (deliveryKey === importing) deliveryKey = undefined;
      });
      deliveryKey = importing;
    }
    return deliveryKey;
  }

  function expectKey(resolution: Resolution | undefined, kid: string): KeyVersion {
    if (resolution === undefined) throw new KeyUnavailableError(kid, 'not_found');
    if (typeof resolution === 'string') throw new KeyUnavailableError(kid, resolution);
    return resolution;
  }

  async function getKey(ref: KeyRef): Promise<KeyVersion> {
    const kid = checkedKid(ref);
    return expectKey((await resolveMany([ref])).get(kid), kid);
  }

  /** Decrypt the `ENC:` fields of one message; every key it needs in at most one request (two if a pending version must be re-read). */
  async function decryptFields(deviceId: string, message: TelemetryMessage): Promise<TelemetryMessage> {
    assertDeviceId(deviceId);
    assertMessage(message);
    return decryptAt(deviceId, message, messageTimestampMs(message, timestampUnit));
  }

  async function decryptAt(deviceId: string, message: TelemetryMessage, timestamp: number): Promise<TelemetryMessage> {
    assertNoNestedEnvelopes(message);
    const targets: Array<{ field: string; envelope: ParsedEnvelope }> = [];
    for (const [field, value] of Object.entries(message)) {
      if (!isEnvelope(value)) continue;
      try {
        if (!FIELD_NAME.test(field)) throw new MessageFormatError(`"${field.slice(0, 80)}" is not a field name (^[a-z][a-z0-9_]{0,63}$)`);
        const envelope = parseEnvelope(value);
        // refuse a value moved from another device or field before fetching anyone's keys
        if (envelope.deviceId !== deviceId || envelope.field !== field) {
          throw new EnvelopeContextError('context_mismatch', `The value was encrypted for ${envelope.deviceId}/${envelope.field}: it was moved to another device or field`);
        }
        targets.push({ field, envelope });
      } catch (error) {
        throw new FieldDecryptionError(field, undefined, error);
      }
    }
    if (targets.length === 0) return { ...message };

    const refs = targets.map((t) => ({ deviceId, field: t.field, version: t.envelope.version }));
    const resolved = await resolveMany(refs);
    const stale = targets.filter((t) => {
      const entry = resolved.get(t.envelope.kid);
      if (entry === undefined || typeof entry === 'string') return false;
      const verdict = judge(entry, timestamp);
      return !verdict.ok && verdict.refresh && now() - entry.fetchedAt >= minRefreshIntervalMs;
    });
    if (stale.length > 0) {
      const again = await resolveMany(
        stale.map((t) => ({ deviceId, field: t.field, version: t.envelope.version })),
        new Set(stale.map((t) => t.envelope.kid)),
      );
      for (const [kid, resolution] of again) resolved.set(kid, resolution);
    }

    const clear = new Map<string, unknown>();
    for (const { field, envelope } of targets) {
      try {
        const entry = expectKey(resolved.get(envelope.kid), envelope.kid);
        const verdict = judge(entry, timestamp);
        if (!verdict.ok) throw verdict.error;
        clear.set(field, openValue(entry, deviceId, field, timestamp, envelope));
      } catch (error) {
        throw new FieldDecryptionError(field, envelope.kid, error);
      }
    }
    return Object.fromEntries(Object.entries(message).map(([name, value]) => [name, clear.has(name) ? clear.get(name) : value]));
  }

  return {
    /** A device DEK version. */
    getDeviceKey: (deviceId: string, version: number): Promise<KeyVersion> => getKey({ deviceId, version }),
    /** A field key version. */
    getFieldKey: (deviceId: string, field: string, version: number): Promise<KeyVersion> => getKey({ deviceId, field, version }),
    /** Warm the cache: one bulk request (per 1,000 items) for every version not cached, none if all are. */
    async prefetch(items: readonly KeyRef[]): Promise<PrefetchResult> {
      const { out: resolved, fetched } = await resolveCounted(items);
      const missing: PrefetchResult['missing'] = [];
      for (const ref of items) {
        const kid = kidOf(ref.deviceId, ref.field, ref.version);
        const resolution = resolved.get(kid);
        if (typeof resolution === 'string' && !missing.some((m) => m.kid === kid)) missing.push({ ...ref, kid, reason: resolution });
      }
      return { cached: resolved.size - fetched, fetched, missing };
    },
    decryptFields,
    /** Decrypt one `ENC:v1:` value of (deviceId, field) stamped `timestamp` (Unix ms), with the same state rules. */
    async decryptValue(deviceId: string, field: string, value: string, timestamp: number): Promise<unknown> {
      assertDeviceId(deviceId);
      if (!Number.isSafeInteger(timestamp) || timestamp < EARLIEST_TIMESTAMP_MS) throw new MessageFormatError('timestamp must be an integer of Unix epoch milliseconds, after 2000-01-01');
      if (!isEnvelope(value)) throw new MessageFormatError('The value is not an ENC: envelope');
      const result = await decryptAt(deviceId, { [field]: value }, timestamp);
      return result[field];
    },
    /** Forget every cached version of a device DEK (no field) or field key, e.g. on a compromise notice. */
    invalidate: (deviceId: string, field?: string) => cache.invalidate(deviceId, field),
    clearCache: () => cache.clear(),
    stats: (): ClientStats => ({ ...stats, cacheSize: cache.size }),
  };
}

export type KeystrataClient = ReturnType<typeof createKeystrataClient>;

function openValue(entry: KeyVersion, deviceId: string, field: string, timestamp: number, envelope: ParsedEnvelope): unknown {
  const plaintext = decryptField({ key: entry.key, deviceId, field, timestamp, envelope });
  try {
    return JSON.parse(plaintext.toString('utf8'));
  } catch {
    throw new MessageFormatError('The decrypted value is not JSON: the device broke the message rules');
  } finally {
    plaintext.fill(0);
  }
}

function item(deviceId: string, field: string | undefined, version: number | 'all'): FetchItem {
  return field === undefined ? { deviceId, version } : { deviceId, field, version };
}

function checkedKid(ref: KeyRef): string {
  assertDeviceId(ref.deviceId);
  if (ref.field !== undefined && !FIELD_NAME.test(ref.field)) throw new MessageFormatError('field must match ^[a-z][a-z0-9_]{0,63}$');
  if (!Number.isInteger(ref.version) || ref.version < 1 || ref.version > 2_147_483_647) throw new MessageFormatError('version must be an integer from 1 to 2147483647');
  return kidOf(ref.deviceId, ref.field, ref.version);
}

function checkFetchResult(body: unknown): { jwe: string; missing: Array<{ deviceId: string; field?: string; version?: number | 'all'; reason: MissingReason }> } {
  const { jwe, missing } = (body ?? {}) as { jwe?: unknown; missing?: unknown };
  if (typeof jwe !== 'string' || !Array.isArray(missing)) throw new KeystrataClientError('invalid_response', 'The key fetch answer is not {jwe, missing}');
  for (const m of missing as Array<Record<string, unknown>>) {
    if (typeof m?.deviceId !== 'string' || !['not_found', 'not_deliverable', 'destroyed'].includes(m.reason as string)) {
      throw new KeystrataClientError('invalid_response', 'The key fetch answer lists a malformed missing item');
    }
  }
  return { jwe, missing: missing as Array<{ deviceId: string; field?: string; version?: number | 'all'; reason: MissingReason }> };
}

async function importDeliveryPrivateKey(input: JWK | CryptoKey | KeyObject): Promise<ImportedDeliveryKey> {
  if (input instanceof crypto.KeyObject) {
    if (input.type !== 'private') throw new KeystrataClientError('invalid_option', 'deliveryPrivateKey must be a private key');
    return input;
  }
  if (types.isCryptoKey(input)) {
    if ((input as CryptoKey).type !== 'private') throw new KeystrataClientError('invalid_option', 'deliveryPrivateKey must be a private key');
    return input as CryptoKey;
  }
  const jwk = input as JWK;
  if (jwk === null || typeof jwk !== 'object' || typeof jwk.kty !== 'string') {
    throw new KeystrataClientError('invalid_option', 'deliveryPrivateKey must be a private JWK, a CryptoKey or a KeyObject');
  }
  if (typeof jwk.d !== 'string') throw new KeystrataClientError('invalid_option', 'deliveryPrivateKey is a public JWK: the private key (with "d") is needed');
  try {
    return (await importJWK(jwk, DELIVERY_ALG)) as CryptoKey;
  } catch {
    // jose's message is safe, but say nothing about the key at all
    throw new KeystrataClientError('invalid_option', 'deliveryPrivateKey is not a valid EC P-256 or X25519 private JWK');
  }
}

function positive(value: number, name: string): number {
  if (!Number.isFinite(value) || value <= 0) throw new KeystrataClientError('invalid_option', `${name} must be a positive number`);
  return value;
}

function nonNegative(value: number, name: string): number {
  if (!Number.isFinite(value) || value < 0) throw new KeystrataClientError('invalid_option', `${name} must be a non-negative number`);
  return value;
}
