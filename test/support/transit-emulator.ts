/**
 * A loopback emulator of the Vault / OpenBao transit engine, faithful to
 * shared/reference/vault-transit.md (its §16 checklist). Tests talk to it with the real
 * `node-vault` client over real HTTP, so routing, auth, envelopes, status codes, batch
 * semantics and the `vault:vN:` wire format are exercised exactly as in production.
 *
 * It is its own small HTTP/1.1 server on `net`: Node's http parser refuses the `LIST` verb that
 * node-vault's `list()` sends (reference §13), and owning the socket also lets faults drop a
 * connection or send a body that is not JSON.
 *
 * Not emulated: asymmetric and managed key types, hmac/verify/sign, export, backup/restore,
 * soft-delete, token capabilities (one root-like token may do everything).
 */
import crypto from 'node:crypto';
import net from 'node:net';
import { systemClock, type Clock } from '../../src/clock.js';

export type TransitFlavor = 'common' | 'vault' | 'openbao';
export type HealthState = 'active' | 'standby' | 'uninitialized' | 'sealed';

/** `path`: substring or RegExp matched against the request path without `/v1/` and query. */
export type TransitFault = (
  | { kind: 'status'; status: number; message?: string }
  | { kind: 'delay'; ms: number }
  | { kind: 'garbage'; status?: number; body?: string }
  | { kind: 'drop' }
) & { path?: string | RegExp; times?: number };

export interface TransitEmulatorOptions {
  /** the accepted token (default: random) */
  token?: string;
  /** mount path of the transit engine (default `transit`) */
  mount?: string;
  /** `common` (default) answers only what Vault and OpenBao share */
  flavor?: TransitFlavor;
  clock?: Clock;
  /** create/rotate/config/trim answer a bare 204, as before Vault 1.14 */
  legacy204?: boolean;
  port?: number;
}

export interface TransitEmulator {
  url: string;
  token: string;
  mount: string;
  close(): Promise<void>;
  setFault(fault: TransitFault | undefined): void;
  setHealth(state: HealthState): void;
  /** The auto-rotation job: rotates keys whose latest version is older than their period. Returns how many. */
  tick(): number;
  /** Requests answered so far (method and path), for asserting batching. */
  readonly requests: ReadonlyArray<{ method: string; path: string; status: number }>;
}

// ---------------------------------------------------------------------------------------------
// Go's base64.StdEncoding, error offsets included (reference §3)

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const DECODE_MAP = new Int16Array(256).fill(-1);
for (let i = 0; i < B64.length; i++) DECODE_MAP[B64.charCodeAt(i)] = i;
const CANONICAL_B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

class Base64Error extends Error {
  constructor(offset: number) {
    super(`illegal base64 data at input byte ${offset}`);
  }
}

/** Standard, padded base64 as Go decodes it: `\r`/`\n` skipped, anything else exact. */
export function decodeGoBase64(input: string): Buffer {
  if (CANONICAL_B64.test(input)) return Buffer.from(input, 'base64');
  const src = Buffer.from(input, 'utf8');
  const out: number[] = [];
  const isNewline = (c: number | undefined) => c === 0x0a || c === 0x0d;
  let si = 0;
  for (;;) {
    const quantum = [0, 0, 0, 0];
    let length = 4;
    let last = false;
    for (let j = 0; j < 4; j++) {
      if (si === src.length) {
        if (j === 0) return Buffer.from(out);
        throw new Base64Error(si - j);
      }
      const c = src[si++] as number;
      const value = DECODE_MAP[c] as number;
      if (value >= 0) {
        quantum[j] = value;
        continue;
      }
      if (isNewline(c)) {
        j--;
        continue;
      }
      if (c !== 0x3d || j < 2) throw new Base64Error(si - 1);
      if (j === 2) {
        while (si < src.length && isNewline(src[si])) si++;
        if (si === src.length) throw new Base64Error(src.length);
        if (src[si] !== 0x3d) throw new Base64Error(si - 1);
        si++;
      }
      while (si < src.length && isNewline(src[si])) si++;
      if (si < src.length) throw new Base64Error(si);
      length = j;
      last = true;
      break;
    }
    const value = ((quantum[0] as number) << 18) | ((quantum[1] as number) << 12) | ((quantum[2] as number) << 6) | (quantum[3] as number);
    out.push(...[(value >> 16) & 0xff, (value >> 8) & 0xff, value & 0xff].slice(0, length - 1));
    if (last) return Buffer.from(out);
  }
}

// ---------------------------------------------------------------------------------------------
// Keys and their crypto (reference §10)

type KeyType = 'aes128-gcm96' | 'aes256-gcm96' | 'chacha20-poly1305' | 'hmac';
const ENCRYPTION_TYPES: ReadonlySet<string> = new Set(['aes128-gcm96', 'aes256-gcm96', 'chacha20-poly1305']);
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

interface KeyVersion {
  key: Buffer;
  createdAt: number; // unix seconds
  prk?: Buffer; // HKDF-extract of `key`, computed on first derivation
}

/** A per-request key: the cipher key, and the convergent nonce's HMAC key. */
interface RequestKey {
  encKey: Buffer;
  hmacKey: Buffer | undefined;
}

interface TransitKey {
  name: string;
  type: KeyType;
  derived: boolean;
  convergent: boolean;
  exportable: boolean;
  allowPlaintextBackup: boolean;
  deletionAllowed: boolean;
  autoRotatePeriod: number; // seconds
  keySize: number | undefined; // hmac only
  latestVersion: number;
  minDecryptionVersion: number;
  minEncryptionVersion: number;
  minAvailableVersion: number;
  versions: Map<number, KeyVersion>;
  /**
   * Derived keys by version and context, as a server keeps its keyring in memory: a derived key
   * is a pure function of (version key, context), so this changes no answer, only how often the
   * HKDF runs. Bounded (oldest entries go first); cleared when versions are trimmed.
   */
  derivedKeys: Map<string, RequestKey>;
}

const MAX_DERIVED_KEYS = 65_536;

/** A user error (400) or an internal one (500), as transit's errutil tells them apart. */
class TransitError extends Error {
  constructor(
    message: string,
    readonly internal = false,
  ) {
    super(message);
  }
}

const MISSING_CONTEXT =
  "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key";

function keyBytes(type: KeyType, keySize: number | undefined): number {
  if (type === 'aes128-gcm96') return 16;
  if (type === 'hmac') return keySize ?? 32;
  return 32;
}

/**
 * HKDF-SHA256 with an empty salt (RFC 5869), as transit derives per-context keys. Written out
 * because Node's hkdfSync caps `info` at 1024 bytes (transit does not) and because the extract
 * step (`prk`, one per key version) can then be cached: rewrap throughput depends on it.
 */
function hkdfExtract(ikm: Buffer): Buffer {
  return crypto.createHmac('sha256', Buffer.alloc(32)).update(ikm).digest();
}

const COUNTERS = Array.from({ length: 255 }, (_, i) => Buffer.from([i + 1]));

function hkdfExpand(prk: Buffer, info: Buffer, length: number): Buffer {
  const blocks: Buffer[] = [];
  let previous: Buffer | undefined;
  for (let i = 0; blocks.length * 32 < length; i++) {
    const hmac = crypto.createHmac('sha256', prk);
    if (previous) hmac.update(previous);
    previous = hmac.update(info).update(COUNTERS[i] as Buffer).digest();
    blocks.push(previous);
  }
  return blocks.length === 1 && length === 32 ? (blocks[0] as Buffer) : Buffer.concat(blocks).subarray(0, length);
}

/** Random nonces, drawn from the CSPRNG a few thousand at a time (each byte used once). */
const noncePool = Buffer.alloc(NONCE_BYTES * 4096);
let noncePoolOffset = noncePool.length;
function writeRandomNonce(target: Buffer): void {
  if (noncePoolOffset + NONCE_BYTES > noncePool.length) {
    crypto.randomFillSync(noncePool);
    noncePoolOffset = 0;
  }
  noncePool.copy(target, 0, noncePoolOffset, noncePoolOffset + NONCE_BYTES);
  noncePool.fill(0, noncePoolOffset, noncePoolOffset + NONCE_BYTES);
  noncePoolOffset += NONCE_BYTES;
}

function cipherName(type: KeyType): crypto.CipherGCMTypes | 'chacha20-poly1305' {
  if (type === 'aes128-gcm96') return 'aes-128-gcm';
  if (type === 'chacha20-poly1305') return 'chacha20-poly1305';
  return 'aes-256-gcm';
}

/** The per-request key (and the convergent HMAC key): transit's GetKey / DeriveKey. */
function requestKey(key: TransitKey, version: number, context: Buffer): RequestKey {
  const entry = key.versions.get(version);
  if (!entry || version < key.minDecryptionVersion) throw new TransitError('no such key version');
  if (!key.derived) return { encKey: entry.key, hmacKey: undefined };
  if (context.length === 0) throw new TransitError(MISSING_CONTEXT);
  const cacheKey = `${version}:${context.toString('latin1')}`;
  const cached = key.derivedKeys.get(cacheKey);
  if (cached) return cached;
  const encBytes = keyBytes(key.type, undefined);
  entry.prk ??= hkdfExtract(entry.key);
  const derived = hkdfExpand(entry.prk, context, key.convergent ? encBytes + 32 : encBytes);
  const result: RequestKey = { encKey: derived.subarray(0, encBytes), hmacKey: key.convergent ? derived.subarray(encBytes) : undefined };
  if (key.derivedKeys.size >= MAX_DERIVED_KEYS) key.derivedKeys.delete(key.derivedKeys.keys().next().value as string);
  key.derivedKeys.set(cacheKey, result);
  return result;
}

function encryptWithKey(key: TransitKey, requestedVersion: number, context: Buffer, plaintextB64: string, aad: Buffer | undefined): { ciphertext: string; version: number } {
  if (!ENCRYPTION_TYPES.has(key.type)) throw new TransitError(`message encryption not supported for key type ${key.type}`);
  return encryptBytes(key, requestedVersion, context, decodeGoBase64(plaintextB64), aad);
}

/** Transit's Policy.Encrypt on decoded plaintext (rewrap hands its decrypted bytes straight over). */
function encryptBytes(key: TransitKey, requestedVersion: number, context: Buffer, plaintext: Buffer, aad: Buffer | undefined): { ciphertext: string; version: number } {
  if (!ENCRYPTION_TYPES.has(key.type)) throw new TransitError(`message encryption not supported for key type ${key.type}`);
  let version = requestedVersion;
  if (version === 0) version = key.latestVersion;
  else if (version < 0) throw new TransitError('requested version for encryption is negative');
  else if (version > key.latestVersion) throw new TransitError('requested version for encryption is higher than the latest key version');
  else if (version < key.minEncryptionVersion) throw new TransitError('requested version for encryption is less than the minimum encryption key version');
  const { encKey, hmacKey } = requestKey(key, version, context);
  // nonce ‖ ct ‖ tag
  const body = Buffer.allocUnsafe(NONCE_BYTES + plaintext.length + TAG_BYTES);
  if (hmacKey) crypto.createHmac('sha256', hmacKey).update(plaintext).digest().copy(body, 0, 0, NONCE_BYTES); // convergent v3
  else writeRandomNonce(body);
  const cipher = crypto.createCipheriv(cipherName(key.type) as 'aes-256-gcm', encKey, body.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
  if (aad) cipher.setAAD(aad);
  let at = NONCE_BYTES + cipher.update(plaintext).copy(body, NONCE_BYTES);
  at += cipher.final().copy(body, at);
  cipher.getAuthTag().copy(body, at);
  return { ciphertext: `vault:v${version}:${body.toString('base64')}`, version };
}

/** Transit's Policy.Decrypt, every check in the order of reference §5 (the unknown key is checked by the caller). */
function decryptWithKey(key: TransitKey, context: Buffer, value: string, aad: Buffer | undefined): Buffer {
  if (!ENCRYPTION_TYPES.has(key.type)) throw new TransitError(`message decryption not supported for key type ${key.type}`);
  if (!value.startsWith('vault:v')) throw new TransitError('invalid ciphertext: no prefix');
  const rest = value.slice('vault:v'.length);
  const colon = rest.indexOf(':');
  if (colon < 0) throw new TransitError('invalid ciphertext: wrong number of fields');
  const versionText = rest.slice(0, colon);
  if (!/^[+-]?\d{1,18}$/.test(versionText)) throw new TransitError('invalid ciphertext: version number could not be decoded');
  let version = Number(versionText);
  if (version === 0) version = 1;
  if (version > key.latestVersion) throw new TransitError('invalid ciphertext: version is too new');
  if (key.minDecryptionVersion > 0 && version < key.minDecryptionVersion) {
    throw new TransitError('ciphertext or signature version is disallowed by policy (too old)');
  }
  let body: Buffer;
  try {
    body = decodeGoBase64(rest.slice(colon + 1));
  } catch {
    throw new TransitError('invalid ciphertext: could not decode base64');
  }
  const { encKey } = requestKey(key, version, context);
  if (body.length < NONCE_BYTES) throw new TransitError('invalid ciphertext length');
  try {
    const decipher = crypto.createDecipheriv(cipherName(key.type) as 'aes-256-gcm', encKey, body.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
    if (body.length < NONCE_BYTES + TAG_BYTES) throw new Error('short');
    decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
    if (aad) decipher.setAAD(aad);
    return Buffer.concat([decipher.update(body.subarray(NONCE_BYTES, body.length - TAG_BYTES)), decipher.final()]);
  } catch {
    throw new TransitError('cipher: message authentication failed');
  }
}

// ---------------------------------------------------------------------------------------------
// Request plumbing

interface Request {
  method: string;
  path: string; // without /v1/ and query
  query: URLSearchParams;
  headers: Record<string, string>;
  body: Buffer;
}

interface Reply {
  status: number;
  body?: unknown; // JSON, or a raw string for faults
  raw?: boolean;
  drop?: boolean;
}

type JsonObject = Record<string, unknown>;

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly errors: string[],
  ) {
    super(errors[0] ?? String(status));
  }
}

const userError = (message: string) => new HttpError(400, [message]);

function goTypeName(value: unknown): string {
  if (typeof value === 'string') return 'string';
  if (typeof value === 'boolean') return 'bool';
  if (typeof value === 'number') return 'json.Number';
  if (Array.isArray(value)) return '[]interface {}';
  if (value === null) return '<nil>';
  return 'map[string]interface {}';
}

/** Top-level fields go through Vault's framework: numeric strings are accepted for ints (reference §1). */
const present = (body: JsonObject, field: string) => body[field] !== undefined && body[field] !== null;

function intField(body: JsonObject, field: string, fallback = 0): number {
  const raw = body[field];
  if (raw === undefined || raw === null) return fallback;
  if (typeof raw === 'number' && Number.isInteger(raw)) return raw;
  if (typeof raw === 'string' && /^[+-]?\d+$/.test(raw.trim())) return Number(raw.trim());
  throw userError(`error converting input ${JSON.stringify(raw)} for field "${field}": cannot parse as int`);
}

function boolField(body: JsonObject, field: string, fallback = false): boolean {
  const raw = body[field];
  if (raw === undefined || raw === null) return fallback;
  if (typeof raw === 'boolean') return raw;
  if (raw === 'true' || raw === '1' || raw === 1) return true;
  if (raw === 'false' || raw === '0' || raw === 0) return false;
  throw userError(`error converting input ${JSON.stringify(raw)} for field "${field}": cannot parse as bool`);
}

function stringField(body: JsonObject, field: string, fallback = ''): string {
  const raw = body[field];
  if (raw === undefined || raw === null) return fallback;
  if (typeof raw === 'string') return raw;
  if (typeof raw === 'number' || typeof raw === 'boolean') return String(raw);
  throw userError(`error converting input ${JSON.stringify(raw)} for field "${field}": cannot parse as string`);
}

/** Durations: integer seconds, or Go duration strings (plus `d`), as transit parses auto_rotate_period. */
function durationField(body: JsonObject, field: string): number | undefined {
  const raw = body[field];
  if (raw === undefined || raw === null) return undefined;
  if (typeof raw === 'number' && Number.isInteger(raw)) return raw;
  if (typeof raw === 'string') {
    if (/^\d+$/.test(raw)) return Number(raw);
    const units: Record<string, number> = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86_400 };
    const parts = [...raw.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)];
    if (parts.length > 0 && parts.map((p) => p[0]).join('') === raw) {
      return Math.floor(parts.reduce((sum, p) => sum + Number(p[1]) * (units[p[2] as string] as number), 0));
    }
  }
  throw userError(`error converting input ${JSON.stringify(raw)} for field "${field}": time: invalid duration "${String(raw)}"`);
}

const STATUS_TEXT: Record<number, string> = {
  200: 'OK', 204: 'No Content', 400: 'Bad Request', 403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
  411: 'Length Required', 413: 'Request Entity Too Large', 429: 'Too Many Requests', 431: 'Request Header Fields Too Large',
  472: 'Disaster Recovery Mode Replication Secondary and Active', 473: 'Performance Standby', 500: 'Internal Server Error',
  501: 'Not Implemented', 502: 'Bad Gateway', 503: 'Service Unavailable',
};

const MAX_BODY_BYTES = 32 * 1024 * 1024;
const MAX_HEADER_BYTES = 64 * 1024;
const KEY_NAME = '\\w(?:[\\w.-]*\\w)?';

// ---------------------------------------------------------------------------------------------

export async function startTransitEmulator(options: TransitEmulatorOptions = {}): Promise<TransitEmulator> {
  const token = options.token ?? `emu-${crypto.randomBytes(12).toString('hex')}`;
  const mount = (options.mount ?? 'transit').replace(/^\/+|\/+$/g, '');
  const flavor = options.flavor ?? 'common';
  const clock = options.clock ?? systemClock;
  const legacy204 = options.legacy204 ?? false;
  const namespaces = new Map<string, { keys: Map<string, TransitKey>; disableUpsert: boolean }>();
  let fault: TransitFault | undefined;
  let health: HealthState = 'active';
  const requests: Array<{ method: string; path: string; status: number }> = [];

  const nowSeconds = () => Math.floor(clock.now().getTime() / 1000);
  const space = (namespace: string) => {
    let entry = namespaces.get(namespace);
    if (!entry) namespaces.set(namespace, (entry = { keys: new Map(), disableUpsert: false }));
    return entry;
  };

  function newKey(name: string, type: KeyType, derived: boolean, convergent: boolean, keySize: number | undefined): TransitKey {
    const key: TransitKey = {
      name, type, derived, convergent, keySize,
      exportable: false, allowPlaintextBackup: false, deletionAllowed: false, autoRotatePeriod: 0,
      latestVersion: 0, minDecryptionVersion: 1, minEncryptionVersion: 0, minAvailableVersion: 0,
      versions: new Map(), derivedKeys: new Map(),
    };
    rotateKey(key);
    return key;
  }

  function rotateKey(key: TransitKey): void {
    key.latestVersion += 1;
    key.versions.set(key.latestVersion, { key: crypto.randomBytes(keyBytes(key.type, key.keySize)), createdAt: nowSeconds() });
  }

  function keyBody(key: TransitKey): JsonObject {
    const keys: Record<string, number> = {};
    for (let v = Math.max(key.minDecryptionVersion, 1); v <= key.latestVersion; v++) {
      const entry = key.versions.get(v);
      if (entry) keys[String(v)] = entry.createdAt;
    }
    const encrypting = ENCRYPTION_TYPES.has(key.type);
    const data: JsonObject = {
      name: key.name,
      type: key.type,
      derived: key.derived,
      deletion_allowed: key.deletionAllowed,
      exportable: key.exportable,
      allow_plaintext_backup: key.allowPlaintextBackup,
      latest_version: key.latestVersion,
      min_available_version: key.minAvailableVersion,
      min_decryption_version: key.minDecryptionVersion,
      min_encryption_version: key.minEncryptionVersion,
      auto_rotate_period: key.autoRotatePeriod,
      supports_encryption: encrypting,
      supports_decryption: encrypting,
      supports_signing: false,
      supports_derivation: encrypting,
      imported_key: false,
      keys,
    };
    if (key.derived) {
      data.kdf = 'hkdf_sha256';
      data.convergent_encryption = key.convergent;
      if (key.convergent) data.convergent_encryption_version = 3;
    }
    if (key.type === 'hmac') data.key_size = key.keySize ?? 32;
    if (flavor === 'openbao') data.soft_deleted = false;
    return data;
  }

  /** create/rotate/config/trim: the key body since Vault 1.14, a bare 204 before. */
  const keyReply = (key: TransitKey, warnings: string[]): Reply => (legacy204 ? { status: 204 } : ok(keyBody(key), warnings));

  function ok(data: unknown, warnings: string[] = [], status = 200): Reply {
    const body: JsonObject = {
      request_id: crypto.randomUUID(),
      lease_id: '',
      renewable: false,
      lease_duration: 0,
      data,
      wrap_info: null,
      warnings: warnings.length > 0 ? warnings : null,
      auth: null,
    };
    if (flavor === 'vault') body.mount_type = 'transit';
    return { status, body };
  }

  function ignoredParameters(body: JsonObject, known: string[]): string[] {
    const allowed = new Set([...known, 'name']);
    const ignored = Object.keys(body).filter((k) => !allowed.has(k)).sort();
    return ignored.length > 0 ? [`Endpoint ignored these unrecognized parameters: [${ignored.join(' ')}]`] : [];
  }

  const vaultOnly = (fields: string[]) => (flavor === 'vault' ? fields : []);

  // --- key management (reference §2) --------------------------------------------------------

  function createKey(ns: string, name: string, body: JsonObject): Reply {
    const warnings = ignoredParameters(body, ['type', 'derived', 'convergent_encryption', 'exportable', 'allow_plaintext_backup', 'auto_rotate_period', 'key_size', 'context', 'managed_key_name', 'managed_key_id']);
    const derived = boolField(body, 'derived');
    const convergent = boolField(body, 'convergent_encryption');
    const type = stringField(body, 'type', 'aes256-gcm96');
    const exportable = boolField(body, 'exportable');
    const allowPlaintextBackup = boolField(body, 'allow_plaintext_backup');
    const period = durationField(body, 'auto_rotate_period') ?? 0;
    const keySize = intField(body, 'key_size');
    if (period !== 0 && period < 3600) throw userError('auto rotate period must be 0 to disable or at least an hour');
    if (!derived && convergent) throw userError('convergent encryption requires derivation to be enabled');
    if (!ENCRYPTION_TYPES.has(type) && type !== 'hmac') {
      const known = ['ed25519', 'ecdsa-p256', 'ecdsa-p384', 'ecdsa-p521', 'rsa-2048', 'rsa-3072', 'rsa-4096'];
      if (known.includes(type)) throw new HttpError(400, [`key type ${type} is not supported by this emulator`]);
      throw userError(`unknown key type ${type}`);
    }
    if (keySize !== 0) {
      if (type !== 'hmac') throw userError(`key_size is not valid for algorithm ${type}`);
      if (keySize < 32 || keySize > 512) throw userError(`invalid key_size ${keySize}`);
    }
    const keys = space(ns).keys;
    const existing = keys.get(name);
    if (existing) return keyReply(existing, [...warnings, `key ${name} already existed`]);
    if (type === 'hmac' && derived) throw new HttpError(500, ['key derivation and convergent encryption not supported for keys of type hmac']);
    const key = newKey(name, type as KeyType, derived, convergent, type === 'hmac' ? keySize || 32 : undefined);
    key.exportable = exportable;
    key.allowPlaintextBackup = allowPlaintextBackup;
    key.autoRotatePeriod = period;
    keys.set(name, key);
    return keyReply(key, warnings);
  }

  function configKey(ns: string, name: string, body: JsonObject): Reply {
    const key = space(ns).keys.get(name);
    if (!key) throw userError(`no existing key named ${name} could be found`);
    const warnings = ignoredParameters(body, ['min_decryption_version', 'min_encryption_version', 'deletion_allowed', 'exportable', 'allow_plaintext_backup', 'auto_rotate_period']);
    // Validate on a copy: if any check fails, nothing changes.
    const next = { ...key };
    if (present(body, 'min_decryption_version')) {
      let v = intField(body, 'min_decryption_version');
      if (v < 0) throw userError('min decryption version cannot be negative');
      if (v === 0) {
        v = 1;
        warnings.push('since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1');
      }
      if (v !== key.minDecryptionVersion) {
        if (v > key.latestVersion) throw userError(`cannot set min decryption version of ${v}, latest key version is ${key.latestVersion}`);
        if (v < key.minAvailableVersion) throw userError('min decryption version should not be less then min available version');
        next.minDecryptionVersion = v;
      }
    }
    if (present(body, 'min_encryption_version')) {
      const v = intField(body, 'min_encryption_version');
      if (v < 0) throw userError('min encryption version cannot be negative');
      if (v !== key.minEncryptionVersion) {
        if (v > key.latestVersion) throw userError(`cannot set min encryption version of ${v}, latest key version is ${key.latestVersion}`);
        if (v > 0 && v < key.minAvailableVersion) throw userError('min encryption version should not be less than min available version');
        next.minEncryptionVersion = v;
      }
    }
    if (next.minEncryptionVersion > 0 && next.minEncryptionVersion < next.minDecryptionVersion) {
      throw userError(
        `cannot set min encryption/decryption values; min encryption version of ${next.minEncryptionVersion} must be greater than or equal to min decryption version of ${next.minDecryptionVersion}`,
      );
    }
    if (present(body, 'deletion_allowed')) next.deletionAllowed = boolField(body, 'deletion_allowed');
    if (present(body, 'exportable')) {
      const v = boolField(body, 'exportable');
      if (!v && key.exportable) throw userError('exportable key setting cannot be disabled');
      next.exportable = v || key.exportable;
    }
    if (present(body, 'allow_plaintext_backup')) {
      const v = boolField(body, 'allow_plaintext_backup');
      if (!v && key.allowPlaintextBackup) throw userError('plaintext backup setting cannot be disabled');
      next.allowPlaintextBackup = v || key.allowPlaintextBackup;
    }
    const period = durationField(body, 'auto_rotate_period');
    if (period !== undefined) {
      if (period !== 0 && period < 3600) throw userError('auto rotate period must be 0 to disable or at least an hour');
      next.autoRotatePeriod = period;
    }
    Object.assign(key, next);
    return keyReply(key, warnings);
  }

  function trimKey(ns: string, name: string, body: JsonObject): Reply {
    const key = space(ns).keys.get(name);
    if (!key) throw userError('invalid key name');
    if (!present(body, 'min_available_version')) throw userError('missing min_available_version');
    const v = intField(body, 'min_available_version');
    if (v < key.minAvailableVersion) throw userError('minimum available version cannot be decremented');
    if (key.minEncryptionVersion === 0) throw userError('minimum available version cannot be set when minimum encryption version is not set');
    if (key.minDecryptionVersion === 0) throw userError('minimum available version cannot be set when minimum decryption version is not set');
    if (v > key.minEncryptionVersion) throw userError('minimum available version cannot be greater than minmum encryption version');
    if (v > key.minDecryptionVersion) throw userError('minimum available version cannot be greater than minimum decryption version');
    if (v < 0) throw userError('minimum available version cannot be negative');
    if (v === 0) throw userError('minimum available version should be positive');
    for (const version of [...key.versions.keys()]) if (version < v) key.versions.delete(version); // gone for good
    key.derivedKeys.clear();
    key.minAvailableVersion = v;
    return keyReply(key, ignoredParameters(body, ['min_available_version']));
  }

  // --- encrypt / decrypt / rewrap / datakey (reference §4–§8) --------------------------------

  interface BatchItem {
    plaintext: string;
    ciphertext: string;
    context: string;
    keyVersion: number;
    associatedData: string;
    reference: string;
    decodedContext: Buffer;
  }

  /** Transit's decodeBatchRequestItems: a missing required field or a wrong type fails the whole request (500). */
  function decodeBatch(raw: unknown, require: 'plaintext' | 'ciphertext' | undefined): BatchItem[] {
    if (!Array.isArray(raw)) throw new HttpError(500, [`failed to parse batch input: source data must be an array or slice, got ${goTypeName(raw)}`]);
    const errors: string[] = [];
    const items = raw.map((entry, i): BatchItem => {
      const item: BatchItem = { plaintext: '', ciphertext: '', context: '', keyVersion: 0, associatedData: '', reference: '', decodedContext: Buffer.alloc(0) };
      if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
        throw new HttpError(500, [`failed to parse batch input: [${i}] expected a map, got '${goTypeName(entry)}'`]);
      }
      const record = entry as JsonObject;
      for (const field of ['context', 'ciphertext', 'plaintext', 'associated_data', 'reference'] as const) {
        const value = record[field];
        if (value === undefined || (value === null && field !== 'plaintext')) {
          if (field === require) errors.push(`'[${i}].${field}' missing ${field === 'plaintext' ? 'plaintext to encrypt' : 'ciphertext to decrypt'}`);
          continue;
        }
        if (typeof value !== 'string') {
          errors.push(`'[${i}].${field}' expected type 'string', got unconvertible type '${goTypeName(value)}'`);
          continue;
        }
        if (field === 'associated_data') item.associatedData = value;
        else item[field] = value;
      }
      const version = record.key_version;
      if (version !== undefined && version !== null) {
        if (typeof version === 'number' && Number.isInteger(version)) item.keyVersion = version;
        else if (typeof version === 'number') errors.push(`error decoding json.Number into [${i}].key_version: strconv.ParseInt: parsing "${version}": invalid syntax`);
        else errors.push(`'[${i}].key_version' expected type 'int', got unconvertible type '${goTypeName(version)}'`);
      }
      return item;
    });
    if (errors.length > 0) {
      throw new HttpError(500, [`failed to parse batch input: ${errors.length} error(s) decoding:\n\n${errors.map((e) => `* ${e}`).join('\n')}`]);
    }
    return items;
  }

  function checkContextAllOrNone(items: BatchItem[]): void {
    const contextSet = (items[0]?.context.length ?? 0) !== 0;
    for (const item of items) {
      if ((item.context.length === 0) === contextSet) {
        throw userError('context should be set either in all the request blocks or in none');
      }
    }
  }

  function decodeAad(value: string): Buffer | undefined {
    if (value === '') return undefined;
    try {
      return decodeGoBase64(value);
    } catch (error) {
      throw new TransitError(`unable to get associated_data/additional_data from factory[0]: ${(error as Error).message}`, true);
    }
  }

  /** The 400/500/partial_failure_response_code rule of batch encrypt and decrypt (reference §7). */
  function batchStatus(body: JsonObject, warnings: string[], successes: boolean, userErrors: boolean, internalErrors: boolean): number {
    if (!userErrors && !internalErrors) return 200;
    let code = userErrors ? 400 : 500;
    if (present(body, 'partial_failure_response_code') && successes) {
      const override = intField(body, 'partial_failure_response_code');
      if (override < 1 || override > 599) warnings.push(`invalid HTTP response code override from partial_failure_response_code, reverting to ${code}`);
      else code = override;
    }
    return code;
  }

  function encrypt(ns: string, name: string, body: JsonObject): Reply {
    const warnings = ignoredParameters(body, ['plaintext', 'context', 'key_version', 'type', 'convergent_encryption', 'batch_input', 'associated_data', 'partial_failure_response_code', ...vaultOnly(['nonce', 'padding_scheme'])]);
    const batchMode = present(body, 'batch_input');
    let items: BatchItem[];
    if (batchMode) {
      items = decodeBatch(body.batch_input, 'plaintext');
      if (items.length === 0) throw userError('missing batch input to process');
    } else {
      if (!present(body, 'plaintext')) throw userError('missing plaintext to encrypt');
      items = [{
        plaintext: stringField(body, 'plaintext'), ciphertext: '', context: stringField(body, 'context'), keyVersion: intField(body, 'key_version'),
        associatedData: stringField(body, 'associated_data'), reference: '', decodedContext: Buffer.alloc(0),
      }];
    }
    if (flavor === 'vault' && stringField(body, 'nonce') !== '') throw userError('provided nonce not allowed for this key');
    const results: JsonObject[] = items.map((item) => ({ reference: item.reference }));
    const contextSet = (items[0]?.context.length ?? 0) !== 0;
    let userErrors = false;
    let internalErrors = false;
    items.forEach((item, i) => {
      if ((item.context.length === 0) === contextSet) throw userError('context should be set either in all the request blocks or in none');
      try {
        decodeGoBase64(item.plaintext);
        if (item.context.length !== 0) item.decodedContext = decodeGoBase64(item.context);
      } catch (error) {
        userErrors = true;
        (results[i] as JsonObject).error = (error as Error).message;
      }
    });

    const namespace = space(ns);
    let key = namespace.keys.get(name);
    if (!key) {
      // Upsert (reference §4): only encrypt creates a key, derived iff context was sent.
      const convergent = boolField(body, 'convergent_encryption');
      if (convergent && !contextSet) throw userError('convergent encryption requires derivation to be enabled, so context is required');
      const type = stringField(body, 'type', 'aes256-gcm96');
      if (/^ecdsa-p(256|384|521)$/.test(type)) throw userError(`key type ${type} not supported for this operation`);
      if (!ENCRYPTION_TYPES.has(type)) throw userError(`unknown key type ${type}`);
      if (namespace.disableUpsert) throw userError('encryption key not found');
      key = newKey(name, type as KeyType, contextSet, convergent, undefined);
      namespace.keys.set(name, key);
    }

    let successes = false;
    items.forEach((item, i) => {
      const result = results[i] as JsonObject;
      if (result.error !== undefined) return;
      try {
        const aad = decodeAad(item.associatedData);
        const { ciphertext, version } = encryptWithKey(key, item.keyVersion, item.decodedContext, item.plaintext, aad);
        result.ciphertext = ciphertext;
        result.key_version = version;
        successes = true;
      } catch (error) {
        if (!(error instanceof TransitError) && !(error instanceof Base64Error)) throw error;
        if (error instanceof TransitError && error.internal) internalErrors = true;
        else userErrors = true;
        result.error = error.message;
      }
    });

    if (!batchMode) {
      const [result] = results as [JsonObject];
      if (result.error !== undefined) throw new HttpError(internalErrors ? 500 : 400, [String(result.error)]);
      return ok({ ciphertext: result.ciphertext, key_version: result.key_version }, warnings);
    }
    const ordered = results.map((r) => orderItem(r, ['ciphertext', 'key_version', 'error', 'reference']));
    const status = batchStatus(body, warnings, successes, userErrors, internalErrors);
    return ok({ batch_results: ordered }, warnings, status);
  }

  function decrypt(ns: string, name: string, body: JsonObject): Reply {
    const warnings = ignoredParameters(body, ['ciphertext', 'context', 'batch_input', 'associated_data', 'partial_failure_response_code', ...vaultOnly(['nonce', 'padding_scheme'])]);
    const batchMode = present(body, 'batch_input');
    let items: BatchItem[];
    if (batchMode) {
      items = decodeBatch(body.batch_input, 'ciphertext');
      if (items.length === 0) throw userError('missing batch input to process');
    } else {
      const ciphertext = stringField(body, 'ciphertext');
      if (ciphertext === '') throw userError('missing ciphertext to decrypt');
      items = [{
        plaintext: '', ciphertext, context: stringField(body, 'context'), keyVersion: 0,
        associatedData: stringField(body, 'associated_data'), reference: '', decodedContext: Buffer.alloc(0),
      }];
    }
    const results: JsonObject[] = items.map((item) => ({ plaintext: '', reference: item.reference }));
    checkContextAllOrNone(items);
    let userErrors = false;
    let internalErrors = false;
    items.forEach((item, i) => {
      const result = results[i] as JsonObject;
      if (item.ciphertext === '') {
        userErrors = true;
        result.error = 'missing ciphertext to decrypt';
        return;
      }
      if (item.context.length !== 0) {
        try {
          item.decodedContext = decodeGoBase64(item.context);
        } catch (error) {
          userErrors = true;
          result.error = (error as Error).message;
        }
      }
    });
    const key = space(ns).keys.get(name);
    if (!key) throw userError('encryption key not found');

    let successes = false;
    items.forEach((item, i) => {
      const result = results[i] as JsonObject;
      if (result.error !== undefined) return;
      try {
        const aad = decodeAad(item.associatedData);
        result.plaintext = decryptWithKey(key, item.decodedContext, item.ciphertext, aad).toString('base64');
        successes = true;
      } catch (error) {
        if (!(error instanceof TransitError)) throw error;
        if (error.internal) internalErrors = true;
        else userErrors = true;
        result.error = error.message;
      }
    });

    if (!batchMode) {
      const [result] = results as [JsonObject];
      if (result.error !== undefined) throw new HttpError(internalErrors ? 500 : 400, [String(result.error)]);
      return ok({ plaintext: result.plaintext }, warnings);
    }
    const ordered = results.map((r) => orderItem(r, ['plaintext', 'error', 'reference']));
    const status = batchStatus(body, warnings, successes, userErrors, internalErrors);
    return ok({ batch_results: ordered }, warnings, status);
  }

  function rewrap(ns: string, name: string, body: JsonObject): Reply {
    const warnings = ignoredParameters(body, ['ciphertext', 'context', 'key_version', 'batch_input', ...vaultOnly(['nonce', 'encrypt_padding_scheme', 'decrypt_padding_scheme'])]);
    const batchMode = present(body, 'batch_input');
    let items: BatchItem[];
    if (batchMode) {
      items = decodeBatch(body.batch_input, undefined);
      if (items.length === 0) throw userError('missing batch input to process');
    } else {
      const ciphertext = stringField(body, 'ciphertext');
      if (ciphertext === '') throw userError('missing ciphertext to decrypt');
      items = [{
        plaintext: '', ciphertext, context: stringField(body, 'context'), keyVersion: intField(body, 'key_version'),
        associatedData: '', reference: '', decodedContext: Buffer.alloc(0),
      }];
    }
    const results: JsonObject[] = items.map((item) => ({ reference: item.reference }));
    checkContextAllOrNone(items);
    items.forEach((item, i) => {
      const result = results[i] as JsonObject;
      if (item.ciphertext === '') {
        result.error = 'missing ciphertext to decrypt';
        return;
      }
      if (item.context.length !== 0) {
        try {
          item.decodedContext = decodeGoBase64(item.context);
        } catch (error) {
          result.error = (error as Error).message;
        }
      }
    });
    const key = space(ns).keys.get(name);
    if (!key) throw userError('encryption key not found');

    items.forEach((item, i) => {
      const result = results[i] as JsonObject;
      if (result.error !== undefined) return;
      try {
        // No associated_data: rewrap cannot authenticate blobs that were encrypted with AAD (reference §6).
        const plaintext = decryptWithKey(key, item.decodedContext, item.ciphertext, undefined);
        const { ciphertext, version } = encryptBytes(key, item.keyVersion, item.decodedContext, plaintext, undefined);
        plaintext.fill(0);
        result.ciphertext = ciphertext;
        result.key_version = version;
      } catch (error) {
        if (!(error instanceof TransitError) || error.internal) throw new HttpError(500, [(error as Error).message]);
        result.error = error.message;
      }
    });

    if (!batchMode) {
      const [result] = results as [JsonObject];
      if (result.error !== undefined) throw userError(String(result.error));
      return ok({ ciphertext: result.ciphertext, key_version: result.key_version }, warnings);
    }
    // Batch rewrap never uses the batch status codes: 200 whatever happened to the items.
    return ok({ batch_results: results.map((r) => orderItem(r, ['ciphertext', 'key_version', 'error', 'reference'])) }, warnings);
  }

  function datakey(ns: string, kind: string, name: string, body: JsonObject): Reply {
    const warnings = ignoredParameters(body, ['plaintext', 'context', 'bits', 'key_version', ...vaultOnly(['nonce', 'padding_scheme']), ...(flavor === 'openbao' ? ['associated_data'] : [])]);
    if (kind !== 'plaintext' && kind !== 'wrapped') throw userError("Invalid path, must be 'plaintext' or 'wrapped'");
    let context: Buffer = Buffer.alloc(0);
    const contextText = stringField(body, 'context');
    if (contextText !== '') {
      try {
        context = decodeGoBase64(contextText);
      } catch {
        throw userError('failed to base64-decode context');
      }
    }
    const bits = intField(body, 'bits', 256);
    if (![128, 256, 512].includes(bits)) throw userError('invalid bit length');
    const key = space(ns).keys.get(name);
    if (!key) throw userError('encryption key not found'); // datakey never creates a key
    const aad = flavor === 'openbao' ? decodeAadOr500(stringField(body, 'associated_data')) : undefined;
    const material = crypto.randomBytes(bits / 8);
    try {
      const { ciphertext, version } = encryptWithKey(key, intField(body, 'key_version'), context, material.toString('base64'), aad);
      const data: JsonObject = { ciphertext, key_version: version };
      if (kind === 'plaintext') data.plaintext = material.toString('base64');
      return ok(data, warnings);
    } catch (error) {
      if (!(error instanceof TransitError)) throw error;
      throw new HttpError(error.internal ? 500 : 400, [error.message]);
    }
  }

  function decodeAadOr500(value: string): Buffer | undefined {
    try {
      return decodeAad(value);
    } catch (error) {
      throw new HttpError(500, [(error as Error).message]);
    }
  }

  /** Go's JSON field order and omitempty: ciphertext, key_version and error only when set. */
  function orderItem(result: JsonObject, fields: string[]): JsonObject {
    const out: JsonObject = {};
    for (const field of fields) {
      const value = result[field];
      if (field === 'plaintext' || field === 'reference') out[field] = value ?? '';
      else if (value !== undefined && value !== '' && value !== 0) out[field] = value;
    }
    return out;
  }

  // --- sys/health (reference §12) ------------------------------------------------------------

  function sysHealth(request: Request): Reply {
    const q = request.query;
    const code = (name: string, fallback: number) => {
      const raw = q.get(name);
      return raw !== null && /^\d+$/.test(raw) ? Number(raw) : fallback;
    };
    let status: number;
    if (health === 'uninitialized') status = code('uninitcode', 501);
    else if (health === 'sealed') status = code('sealedcode', 503);
    else if (health === 'standby') status = q.get('standbyok') === 'true' ? code('activecode', 200) : code('standbycode', 429);
    else status = code('activecode', 200);
    return {
      status,
      body: {
        initialized: health !== 'uninitialized',
        sealed: health === 'sealed' || health === 'uninitialized',
        standby: health === 'standby',
        performance_standby: false,
        replication_performance_mode: 'disabled',
        replication_dr_mode: 'disabled',
        server_time_utc: nowSeconds(),
        version: flavor === 'openbao' ? '2.6.0' : '1.21.0',
        cluster_name: 'transit-emulator',
        cluster_id: '00000000-0000-4000-8000-000000000000',
      },
    };
  }

  // --- routing (reference §1) ----------------------------------------------------------------

  function parseBody(request: Request): JsonObject {
    if (request.body.length === 0) return {};
    let parsed: unknown;
    try {
      parsed = JSON.parse(request.body.toString('utf8'));
    } catch {
      throw new HttpError(400, ['error parsing JSON']);
    }
    if (parsed === null) return {};
    if (typeof parsed !== 'object' || Array.isArray(parsed)) throw new HttpError(400, ['error parsing JSON']);
    return parsed as JsonObject;
  }

  function route(request: Request): Reply {
    const { path } = request;
    const method = request.method === 'PUT' ? 'POST' : request.method;
    if (path === 'sys/health' && (method === 'GET' || method === 'HEAD')) return sysHealth(request);
    // An uninitialised Vault is sealed too; a standby forwards requests to the active node.
    if (health === 'sealed' || health === 'uninitialized') throw new HttpError(503, ['Vault is sealed']);

    const presented = request.headers['x-vault-token'] ?? /^Bearer\s+(.+)$/i.exec(request.headers.authorization ?? '')?.[1];
    if (presented === undefined || presented !== token) throw new HttpError(403, ['permission denied']);

    const ns = (request.headers['x-vault-namespace'] ?? '').replace(/^\/+|\/+$/g, '');
    const list = method === 'LIST' || (method === 'GET' && ['true', '1'].includes(request.query.get('list') ?? ''));
    if (!path.startsWith(`${mount}/`)) throw new HttpError(404, [`no handler for route "${path}". route entry not found.`]);
    const sub = path.slice(mount.length + 1);
    const unsupported = () => new HttpError(405, ['unsupported operation']);
    let m: RegExpExecArray | null;

    if (/^keys\/?$/.test(sub)) {
      if (!list) throw unsupported();
      const names = [...space(ns).keys.keys()].sort();
      if (names.length === 0) throw new HttpError(404, []);
      return ok({ keys: names });
    }
    if ((m = new RegExp(`^keys/(${KEY_NAME})$`).exec(sub))) {
      const name = m[1] as string;
      if (list) throw unsupported();
      if (method === 'GET') {
        const key = space(ns).keys.get(name);
        if (!key) throw new HttpError(404, []);
        return ok(keyBody(key));
      }
      if (method === 'POST') return createKey(ns, name, parseBody(request));
      if (method === 'DELETE') {
        const keys = space(ns).keys;
        const key = keys.get(name);
        if (!key) throw userError(`error deleting policy ${name}: could not delete key; not found`);
        if (!key.deletionAllowed) throw userError(`error deleting policy ${name}: deletion is not allowed for this key`);
        keys.delete(name); // the archive goes with it: every ciphertext under the key is lost
        return { status: 204 };
      }
      throw unsupported();
    }
    if ((m = new RegExp(`^keys/(${KEY_NAME})/(config|rotate|trim)$`).exec(sub))) {
      if (method !== 'POST') throw unsupported();
      const name = m[1] as string;
      const body = parseBody(request);
      if (m[2] === 'config') return configKey(ns, name, body);
      if (m[2] === 'trim') return trimKey(ns, name, body);
      const key = space(ns).keys.get(name);
      if (!key) throw userError('key not found');
      rotateKey(key);
      return keyReply(key, ignoredParameters(body, ['managed_key_name', 'managed_key_id']));
    }
    if ((m = new RegExp(`^(encrypt|decrypt|rewrap)/(${KEY_NAME})$`).exec(sub))) {
      if (method !== 'POST') throw unsupported();
      const body = parseBody(request);
      const name = m[2] as string;
      if (m[1] === 'encrypt') return encrypt(ns, name, body);
      if (m[1] === 'decrypt') return decrypt(ns, name, body);
      return rewrap(ns, name, body);
    }
    if ((m = new RegExp(`^datakey/(\\w+)/(${KEY_NAME})$`).exec(sub))) {
      if (method !== 'POST') throw unsupported();
      return datakey(ns, m[1] as string, m[2] as string, parseBody(request));
    }
    if (sub === 'config/keys') {
      if (method === 'GET') return ok({ disable_upsert: space(ns).disableUpsert });
      if (method === 'POST') {
        const body = parseBody(request);
        space(ns).disableUpsert = boolField(body, 'disable_upsert');
        return ok({ disable_upsert: space(ns).disableUpsert }, ignoredParameters(body, ['disable_upsert']));
      }
      throw unsupported();
    }
    throw new HttpError(404, ['unsupported path']);
  }

  async function handle(request: Request): Promise<Reply> {
    const active = fault;
    if (active && faultMatches(active, request.path)) {
      if (active.times !== undefined && --active.times <= 0) fault = undefined;
      switch (active.kind) {
        case 'delay':
          await new Promise((resolve) => setTimeout(resolve, active.ms));
          break;
        case 'drop':
          return { status: 0, drop: true };
        case 'garbage':
          return { status: active.status ?? 200, body: active.body ?? '<html><body>upstream connect error</body></html>', raw: true };
        case 'status': {
          const defaults: Record<number, string> = {
            429: `request path "${request.path}": rate limit quota exceeded`,
            500: 'internal error',
            502: 'bad gateway',
            503: 'Vault is sealed',
          };
          return { status: active.status, body: { errors: [active.message ?? defaults[active.status] ?? 'injected fault'] } };
        }
      }
    }
    if (request.method === 'PATCH') return { status: 405, body: { errors: ['unsupported operation'] } };
    try {
      return route(request);
    } catch (error) {
      if (error instanceof HttpError) return { status: error.status, body: { errors: error.errors } };
      return { status: 500, body: { errors: [`internal error: ${(error as Error).message}`] } };
    }
  }

  // --- HTTP/1.1 on net -----------------------------------------------------------------------

  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    serveConnection(socket);
  });

  function serveConnection(socket: net.Socket): void {
    let buffer: Buffer = Buffer.alloc(0);
    let busy = false;
    socket.on('data', (chunk: Buffer) => {
      buffer = buffer.length === 0 ? chunk : Buffer.concat([buffer, chunk]);
      void pump();
    });

    async function pump(): Promise<void> {
      if (busy) return;
      busy = true;
      try {
        while (!socket.destroyed) {
          const parsed = parseRequest();
          if (parsed === undefined) break;
          if ('error' in parsed) {
            write(parsed.error, { errors: [STATUS_TEXT[parsed.error] ?? 'bad request'] }, false, true, false);
            return;
          }
          const { request, keepAlive } = parsed;
          const reply = await handle(request);
          requests.push({ method: request.method, path: request.path, status: reply.drop ? 0 : reply.status });
          if (requests.length > 100_000) requests.splice(0, 50_000);
          if (reply.drop) {
            socket.destroy();
            return;
          }
          write(reply.status, reply.body, reply.raw ?? false, !keepAlive, request.method === 'HEAD');
          if (!keepAlive) return;
        }
      } finally {
        busy = false;
      }
    }

    function parseRequest(): { request: Request; keepAlive: boolean } | { error: number } | undefined {
      const headerEnd = buffer.indexOf('\r\n\r\n');
      if (headerEnd < 0) return buffer.length > MAX_HEADER_BYTES ? { error: 431 } : undefined;
      const lines = buffer.subarray(0, headerEnd).toString('latin1').split('\r\n');
      const [method, target, version] = (lines[0] ?? '').split(' ');
      if (!method || !target || !version?.startsWith('HTTP/1.')) return { error: 400 };
      const headers: Record<string, string> = {};
      for (const line of lines.slice(1)) {
        const colon = line.indexOf(':');
        if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
      let body: Buffer;
      let consumed: number;
      if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
        const chunked = decodeChunked(buffer, headerEnd + 4);
        if (chunked === undefined) return undefined;
        if (chunked === 'too-large') return { error: 413 };
        ({ body, consumed } = chunked);
      } else {
        const length = Number(headers['content-length'] ?? '0');
        if (!Number.isSafeInteger(length) || length < 0) return { error: 400 };
        if (length > MAX_BODY_BYTES) return { error: 413 };
        if (headers.expect?.toLowerCase() === '100-continue' && buffer.length === headerEnd + 4 && length > 0) {
          socket.write('HTTP/1.1 100 Continue\r\n\r\n');
          headers.expect = '';
        }
        if (buffer.length < headerEnd + 4 + length) return undefined;
        body = buffer.subarray(headerEnd + 4, headerEnd + 4 + length);
        consumed = headerEnd + 4 + length;
      }
      buffer = buffer.subarray(consumed);
      const url = new URL(target, 'http://emulator');
      const connection = (headers.connection ?? '').toLowerCase();
      const keepAlive = version === 'HTTP/1.1' ? connection !== 'close' : connection === 'keep-alive';
      let path: string;
      try {
        path = decodeURIComponent(url.pathname).replace(/^\/v1\//, '').replace(/^\/+/, '');
      } catch {
        return { error: 400 };
      }
      return { request: { method: method.toUpperCase(), path, query: url.searchParams, headers, body }, keepAlive };
    }

    function write(status: number, body: unknown, raw: boolean, close: boolean, head: boolean): void {
      if (socket.destroyed) return;
      const payload = status === 204 || body === undefined ? Buffer.alloc(0) : Buffer.from(raw ? String(body) : JSON.stringify(body), 'utf8');
      const lines = [
        `HTTP/1.1 ${status} ${STATUS_TEXT[status] ?? 'Status'}`,
        `Date: ${new Date().toUTCString()}`,
        'Cache-Control: no-store',
        ...(status === 204 ? [] : ['Content-Type: application/json', `Content-Length: ${head ? 0 : payload.length}`]),
        `Connection: ${close ? 'close' : 'keep-alive'}`,
      ];
      socket.write(`${lines.join('\r\n')}\r\n\r\n`);
      if (!head && payload.length > 0) socket.write(payload);
      if (close) socket.end();
    }
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as net.AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    token,
    mount,
    requests,
    setFault(next) {
      fault = next === undefined ? undefined : { ...next };
    },
    setHealth(state) {
      health = state;
    },
    tick() {
      let rotated = 0;
      const now = nowSeconds();
      for (const { keys } of namespaces.values()) {
        for (const key of keys.values()) {
          const latest = key.versions.get(key.latestVersion);
          if (key.autoRotatePeriod > 0 && latest && now >= latest.createdAt + key.autoRotatePeriod) {
            rotateKey(key);
            rotated++;
          }
        }
      }
      return rotated;
    },
    async close() {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
    },
  };
}

function faultMatches(fault: TransitFault, path: string): boolean {
  if (fault.path === undefined) return true;
  return typeof fault.path === 'string' ? path.includes(fault.path) : fault.path.test(path);
}

/** A complete chunked body starting at `start`, or undefined while more bytes are needed. */
function decodeChunked(buffer: Buffer, start: number): { body: Buffer; consumed: number } | 'too-large' | undefined {
  const parts: Buffer[] = [];
  let offset = start;
  let total = 0;
  for (;;) {
    const lineEnd = buffer.indexOf('\r\n', offset);
    if (lineEnd < 0) return undefined;
    const size = parseInt(buffer.subarray(offset, lineEnd).toString('latin1').split(';')[0] ?? '', 16);
    if (!Number.isFinite(size) || size < 0) return 'too-large';
    if (size === 0) {
      const end = buffer.indexOf('\r\n\r\n', lineEnd);
      if (end < 0) return undefined;
      return { body: Buffer.concat(parts), consumed: end + 4 };
    }
    total += size;
    if (total > MAX_BODY_BYTES) return 'too-large';
    if (buffer.length < lineEnd + 2 + size + 2) return undefined;
    parts.push(buffer.subarray(lineEnd + 2, lineEnd + 2 + size));
    offset = lineEnd + 2 + size + 2;
  }
}
