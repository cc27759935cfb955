/**
 * The keyed hash chain, as pure functions (the service adds the database and the keys).
 *
 *   hash(n) = HMAC-SHA256(audit key, hash(n - 1) ‖ UTF-8(canonical JSON of event n))
 *   hash(0) = 32 zero bytes (GENESIS_HASH)
 *
 * Canonical JSON of an event: one object with exactly these members, in this order (which is
 * their sorted order), no whitespace:
 *
 *   {"action":…,"actor":…,"details":{…},"keyId":…|null,"outcome":…,"position":n,"requestId":…|null,"time":"…"}
 *
 * - `time` is UTC with microsecond precision, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (the precision of
 *   `timestamptz`, so a changed microsecond breaks the hash too; events are written in ms).
 * - `details` is canonicalised recursively: object members sorted by key (UTF-16 code units,
 *   JavaScript's default sort), arrays in order, strings and numbers as `JSON.stringify` writes
 *   them. For the JSON values we store this is RFC 8785 (JCS).
 * - Before hashing, every string (including detail keys) is made storable exactly: NUL and lone
 *   surrogates become U+FFFD, because PostgreSQL text/jsonb cannot hold them and the verifier
 *   must recompute the same bytes from what was stored. Details go through a JSON round trip
 *   (undefined members dropped, Dates as ISO strings, non-finite numbers as null).
 */
import crypto, { type KeyObject } from 'node:crypto';
import type { AuditEventInput, AuditOutcome } from './audit.types.js';

export const HASH_BYTES = 32;
export const GENESIS_HASH: Buffer = Buffer.alloc(HASH_BYTES);

const OUTCOMES: ReadonlySet<string> = new Set<AuditOutcome>(['success', 'failure', 'denied']);
const LIMITS = { actor: 256, action: 128, keyId: 512, requestId: 128, detailsBytes: 64 * 1024 } as const;
// eslint-disable-next-line no-control-regex
const UNSTORABLE = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** An event checked and normalised so that what is hashed is exactly what the database stores. */
export interface PreparedEvent {
  actor: string;
  action: string;
  outcome: AuditOutcome;
  keyId: string | null;
  requestId: string | null;
  /** canonical JSON of the details object */
  detailsJson: string;
}

export class InvalidAuditEventError extends Error {
  constructor(message: string) {
    super(`Invalid audit event: ${message}`);
    this.name = 'InvalidAuditEventError';
  }
}

// eslint-disable-next-line no-control-regex
const MAYBE_UNSTORABLE = /[\u0000\uD800-\uDFFF]/;

function storable(value: string): string {
  // the cheap test first: almost no string holds a NUL or a surrogate
  return MAYBE_UNSTORABLE.test(value) ? value.replace(UNSTORABLE, '\uFFFD') : value;
}

function requiredText(name: keyof typeof LIMITS, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0) throw new InvalidAuditEventError(`${name} must be a non-empty string`);
  if (value.length > LIMITS[name]) throw new InvalidAuditEventError(`${name} is longer than ${LIMITS[name]} characters`);
  return storable(value);
}

function optionalText(name: keyof typeof LIMITS, value: unknown): string | null {
  return value === undefined || value === null ? null : requiredText(name, value);
}

/** Replace unstorable characters in every string and key of a JSON value. */
function storableJson(value: unknown): unknown {
  if (typeof value === 'string') return storable(value);
  if (value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map(storableJson);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) {
    Object.defineProperty(out, storable(k), { value: storableJson(v), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

/**
 * Canonical JSON of a details object, as `canonicalJson(storableJson(JSON.parse(JSON.stringify(details))))`
 * gives it, in one pass over the parsed value. Bulk writes (a rollout chunk, an enrolment) carry
 * the same details again and again: the result is remembered per JSON text (a pure function of
 * it), for small texts and a bounded number of them.
 */
const DETAILS_MEMO_ENTRIES = 1000;
const DETAILS_MEMO_MAX_CHARS = 1024;
const detailsMemo = new Map<string, string>();

function canonicalDetails(details: object): string {
  let text: string | undefined;
  let canonical: string | undefined;
  try {
    text = JSON.stringify(details);
    canonical = detailsMemo.get(text);
    if (canonical !== undefined) return canonical;
    canonical = canonicalStorableJson(JSON.parse(text));
  } catch {
    throw new InvalidAuditEventError('details must be JSON-serialisable');
  }
  if (Buffer.byteLength(canonical, 'utf8') > LIMITS.detailsBytes) throw new InvalidAuditEventError(`details exceed ${LIMITS.detailsBytes} bytes`);
  if (text.length <= DETAILS_MEMO_MAX_CHARS) {
    if (detailsMemo.size >= DETAILS_MEMO_ENTRIES) detailsMemo.clear();
    detailsMemo.set(text, canonical);
  }
  return canonical;
}

/** `canonicalJson(storableJson(value))` for a parsed JSON value, without the intermediate copy. */
function canonicalStorableJson(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(storable(value));
  if (value === null || typeof value !== 'object') return canonicalJson(value);
  if (Array.isArray(value)) return `[${value.map(canonicalStorableJson).join(',')}]`;
  const object = value as Record<string, unknown>;
  const keys = Object.keys(object);
  // a key that storable() changes may collide with another: let storableJson settle it, as always
  for (const key of keys) if (MAYBE_UNSTORABLE.test(key)) return canonicalJson(storableJson(value));
  keys.sort();
  let out = '{';
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i] as string;
    if (i > 0) out += ',';
    out += `${JSON.stringify(key)}:${canonicalStorableJson(object[key])}`;
  }
  return `${out}}`;
}

export function prepareEvent(input: AuditEventInput): PreparedEvent {
  if (input === null || typeof input !== 'object') throw new InvalidAuditEventError('not an object');
  if (!OUTCOMES.has(input.outcome)) throw new InvalidAuditEventError('outcome must be success, failure or denied');
  const details = input.details ?? {};
  if (typeof details !== 'object' || details === null || Array.isArray(details)) throw new InvalidAuditEventError('details must be an object');
  const detailsJson = canonicalDetails(details);
  return {
    actor: requiredText('actor', input.actor),
    action: requiredText('action', input.action),
    outcome: input.outcome,
    keyId: optionalText('keyId', input.keyId),
    requestId: optionalText('requestId', input.requestId),
    detailsJson,
  };
}

/** Sorted keys, no whitespace (see the header). */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') {
    // JSON.stringify gives undefined for undefined/functions/symbols: those cannot be stored
    const text = JSON.stringify(value);
    if (text === undefined) throw new TypeError('Not a JSON value');
    return text;
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const object = value as Record<string, unknown>;
  const keys = Object.keys(object).sort();
  let out = '{';
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i] as string;
    if (i > 0) out += ',';
    out += `${JSON.stringify(key)}:${canonicalJson(object[key])}`;
  }
  return `${out}}`;
}

/** `YYYY-MM-DDTHH:MM:SS.ffffffZ`, what PostgreSQL's to_char(…, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') gives. */
export function canonicalTime(date: Date): string {
  const iso = date.toISOString();
  if (iso.length !== 24) throw new RangeError('Audit timestamps must fall in the years 0000–9999');
  return `${iso.slice(0, 23)}000Z`;
}

export interface CanonicalFields {
  position: number;
  time: string;
  actor: string;
  action: string;
  outcome: string;
  keyId: string | null;
  detailsJson: string;
  requestId: string | null;
}

/** The fixed member order below is the sorted order of the member names. */
export function canonicalEvent(e: CanonicalFields): string {
  return (
    `{"action":${JSON.stringify(e.action)},"actor":${JSON.stringify(e.actor)},"details":${e.detailsJson}` +
    `,"keyId":${e.keyId === null ? 'null' : JSON.stringify(e.keyId)},"outcome":${JSON.stringify(e.outcome)}` +
    `,"position":${e.position},"requestId":${e.requestId === null ? 'null' : JSON.stringify(e.requestId)}` +
    `,"time":${JSON.stringify(e.time)}}`
  );
}

export function chainHash(key: KeyObject, prevHash: Buffer, canonical: string): Buffer {
  return crypto.createHmac('sha256', key).update(prevHash).update(canonical, 'utf8').digest();
}

/** The same with hex in and out: the verifier's fast path (rows arrive with hex hashes). */
export function chainHashHex(key: KeyObject, prevHashHex: string, canonical: string): string {
  return crypto.createHmac('sha256', key).update(prevHashHex, 'hex').update(canonical, 'utf8').digest('hex');
}

/**
 * Whether `storedHashHex` is the chain hash of the event, compared in constant time: someone
 * who can write rows but lacks the key must not learn, from how long a verify takes, how much of
 * a forged hash is right (the classic MAC-check timing oracle).
 */
export function chainHashMatchesHex(key: KeyObject, prevHashHex: string, canonical: string, storedHashHex: string): boolean {
  return hexDigestsEqual(chainHashHex(key, prevHashHex, canonical), storedHashHex);
}

/**
 * Two hex digests are equal, in time that depends on their length only (which is public): no
 * early exit. In JS over the strings, as crypto.timingSafeEqual would need two Buffer decodes
 * per event on the verifier's hot path.
 */
export function hexDigestsEqual(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return difference === 0;
}
