/**
 * The `vault` KEK provider: a derived `aes256-gcm96` key in the Vault / OpenBao transit engine,
 * through `node-vault` (DESIGN §1, reference/vault-transit.md).
 *
 * * Paths of the configured mount through the generic `write` / `read` calls: node-vault's transit
 *   helpers hard-code `transit/`.
 * * Every call sends `context` = base64(binding string of the row): the blob is bound to its row
 *   and still rewrappable (transit's rewrap takes `context`, not `associated_data`).
 * * The key is created explicitly (never by encrypt's upsert), and an existing key that is not a
 *   derived aes256-gcm96 key is refused.
 * * Batch rewrap answers 200 even when items fail: every item is checked.
 * * Unreachable, timed out, sealed, rate-limited, 5xx, refused token → KekUnavailableError (503);
 *   a blob that does not authenticate or is below min_decryption_version → UnwrapError.
 *   Messages never carry plaintext, blobs or the token; raw client errors (whose request config
 *   holds the token) are never attached.
 */
import nodeVault from 'node-vault';
import { BadRequestError, ConflictError, KekUnavailableError, UnwrapError } from '../http/errors.js';
import type { KekInfo, KekLogger, KekProvider, KekVersionInfo, RewrapResult } from './kek.types.js';

export interface VaultKekProviderOptions {
  addr: string;
  token: string;
  namespace?: string | undefined;
  transitMount: string;
  keyName: string;
  requestTimeoutMs: number;
  logger?: KekLogger | undefined;
  /** Items per rewrap request (default 500): bounded so a request stays far below Vault's 32 MiB cap. */
  rewrapBatchSize?: number | undefined;
}

const VAULT_BLOB = /^vault:v\d+:[A-Za-z0-9+/]+={0,2}$/;
const KEY_NAME = /^\w([\w.-]*\w)?$/;
/** The same bound as the local provider (Node's hkdfSync), so a context valid in development is valid in production. */
const MAX_CONTEXT_BYTES = 1024;

/** What a node-vault rejection carries: `response` for an HTTP answer, `code` for a network failure. */
interface ClientFailure {
  response?: { statusCode?: unknown; body?: unknown };
  code?: unknown;
  message?: unknown;
}

class DeadlineExceeded extends Error {}

type JsonObject = Record<string, unknown>;

export function createVaultKekProvider(options: VaultKekProviderOptions): KekProvider {
  const { token, keyName, requestTimeoutMs } = options;
  const mount = options.transitMount.replace(/^\/+|\/+$/g, '');
  const batchSize = options.rewrapBatchSize ?? 500;
  const logger = options.logger;
  if (!KEY_NAME.test(keyName)) throw new Error('The KEK name must match \\w([\\w.-]*\\w)? (a transit key name)');
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new Error('rewrapBatchSize must be a positive integer');

  const clientOptions = {
    endpoint: options.addr,
    token,
    requestOptions: { timeout: requestTimeoutMs },
    // node-vault would otherwise turn TLS verification off when VAULT_SKIP_VERIFY is set in the
    // environment, and log request bodies (plaintext key material) under DEBUG=node-vault.
    rpDefaults: { strictSSL: true },
    debug: () => {},
  };
  const client = nodeVault(clientOptions);
  // Set after construction: node-vault falls back to VAULT_NAMESPACE / VAULT_PREFIX from the
  // environment for falsy values, and config.ts is the only reader of the environment.
  Object.assign(client, { namespace: options.namespace ?? '', pathPrefix: '' });

  const keyPath = `${mount}/keys/${keyName}`;
  let closed = false;

  /** One Vault call with a hard deadline; a reset keep-alive socket is retried once for idempotent calls. */
  async function send(operation: string, request: () => Promise<unknown>, idempotent = true): Promise<unknown> {
    if (closed) throw new Error('The KEK provider is closed');
    for (let attempt = 1; ; attempt++) {
      try {
        return await withDeadline(request(), requestTimeoutMs);
      } catch (error) {
        const code = (error as ClientFailure | undefined)?.code;
        if (idempotent && attempt === 1 && (code === 'ECONNRESET' || code === 'EPIPE')) continue;
        throw toProviderError(operation, error);
      }
    }
  }

  function toProviderError(operation: string, error: unknown): Error {
    if (error instanceof DeadlineExceeded) {
      return new KekUnavailableError(`The KEK provider did not answer ${operation} within ${requestTimeoutMs} ms`);
    }
    const failure = (error ?? {}) as ClientFailure;
    const status = typeof failure.response?.statusCode === 'number' ? failure.response.statusCode : undefined;
    if (status === undefined) {
      const code = typeof failure.code === 'string' && /^[A-Z_]+$/.test(failure.code) ? failure.code : 'network error';
      return new KekUnavailableError(`The KEK provider is unreachable (${operation}: ${code})`);
    }
    const message = safeMessage(failure.message);
    if (status === 403) return new KekUnavailableError(`The KEK provider refused the token (${operation}: 403 permission denied): check VAULT_TOKEN and its policy`);
    if (status === 429 || status === 412 || status >= 500) return new KekUnavailableError(`The KEK provider is unavailable (${operation}: ${status} ${message})`);
    if (/encryption key not found|no existing key named|key not found/.test(message)) {
      return new KekUnavailableError(`The KEK "${keyName}" does not exist on the transit mount "${mount}" (${operation})`);
    }
    return new VaultRequestError(`Vault transit ${operation} failed (${status}): ${message}`, status, message);
  }

  /** `data` of a success envelope, or KekUnavailableError when the answer is not one. */
  function dataOf(operation: string, body: unknown): JsonObject {
    const data = isObject(body) ? body.data : undefined;
    if (!isObject(data)) throw new KekUnavailableError(`The KEK provider sent an unexpected answer to ${operation}`);
    return data;
  }

  async function readKey(): Promise<JsonObject | undefined> {
    try {
      return dataOf('read key', await send('read key', () => client.read(keyPath)));
    } catch (error) {
      if (error instanceof VaultRequestError && error.status === 404) return undefined;
      throw error;
    }
  }

  async function info(): Promise<KekInfo> {
    const data = await readKey();
    if (!data) throw new KekUnavailableError(`The KEK "${keyName}" does not exist on the transit mount "${mount}"`);
    return toInfo(data);
  }

  function toInfo(data: JsonObject): KekInfo {
    const latestVersion = data.latest_version;
    const minDecryptionVersion = data.min_decryption_version;
    const minEncryptionVersion = data.min_encryption_version;
    if (typeof latestVersion !== 'number' || typeof minDecryptionVersion !== 'number' || typeof minEncryptionVersion !== 'number') {
      throw new KekUnavailableError('The KEK provider sent an unexpected answer to read key');
    }
    const versions: KekVersionInfo[] = Object.entries(isObject(data.keys) ? data.keys : {})
      .map(([version, created]) => ({ version: Number(version), createdAt: creationTime(created) }))
      .filter((v) => Number.isInteger(v.version))
      .sort((a, b) => a.version - b.version);
    return {
      name: keyName,
      provider: 'vault',
      type: typeof data.type === 'string' ? data.type : 'unknown',
      derived: data.derived === true,
      latestVersion,
      minDecryptionVersion,
      minEncryptionVersion,
      versions,
    };
  }

  return {
    kind: 'vault',
    keyName,

    async init() {
      let data = await readKey();
      if (!data) {
        // Explicit creation, idempotent (an existing name is left untouched): never encrypt's upsert.
        await send('create key', () => client.write(keyPath, { type: 'aes256-gcm96', derived: true }));
        logger?.info?.(`Created the KEK "${keyName}" (derived aes256-gcm96) on the transit mount "${mount}"`);
        data = await readKey();
        if (!data) throw new KekUnavailableError(`The KEK "${keyName}" could not be created on the transit mount "${mount}"`);
      }
      if (data.type !== 'aes256-gcm96' || data.derived !== true || data.convergent_encryption === true) {
        throw new Error(
          `The transit key "${keyName}" on mount "${mount}" exists but is not a derived, non-convergent aes256-gcm96 key ` +
            `(type ${String(data.type)}, derived ${String(data.derived)}, convergent ${String(data.convergent_encryption ?? false)}). ` +
            'keystrata binds every blob to its row through the derivation context; use another KEYSTRATA_KEK_NAME.',
        );
      }
    },

    async wrap(plaintext, context) {
      const body = { plaintext: plaintext.toString('base64'), context: encodeContext(context) };
      const data = dataOf('encrypt', await send('encrypt', () => client.write(`${mount}/encrypt/${keyName}`, body)));
      if (typeof data.ciphertext !== 'string' || !VAULT_BLOB.test(data.ciphertext)) {
        throw new KekUnavailableError('The KEK provider sent an unexpected answer to encrypt');
      }
      return data.ciphertext;
    },

    async unwrap(blob, context) {
      if (!VAULT_BLOB.test(blob)) throw new UnwrapError('Stored key material failed to unwrap: not a Vault transit blob');
      const body = { ciphertext: blob, context: encodeContext(context) };
      let answer: unknown;
      try {
        answer = await send('decrypt', () => client.write(`${mount}/decrypt/${keyName}`, body));
      } catch (error) {
        // Every other 400 of decrypt means this blob and context were refused: auth failure,
        // version below min_decryption_version or too new, malformed ciphertext.
        if (error instanceof VaultRequestError && error.status === 400) {
          throw new UnwrapError(`Stored key material failed to unwrap: ${error.vaultMessage}`);
        }
        throw error;
      }
      const data = dataOf('decrypt', answer);
      if (typeof data.plaintext !== 'string') throw new KekUnavailableError('The KEK provider sent an unexpected answer to decrypt');
      return Buffer.from(data.plaintext, 'base64');
    },

    async rewrapBatch(items) {
      const results: RewrapResult[] = new Array(items.length);
      const pending: Array<{ index: number; ciphertext: string; context: string }> = [];
      items.forEach(({ blob, context }, index) => {
        if (!VAULT_BLOB.test(blob)) results[index] = { ok: false, error: 'not a Vault transit blob' };
        else if (context.length === 0) results[index] = { ok: false, error: 'a KEK context is required' };
        else pending.push({ index, ciphertext: blob, context: encodeContext(context) });
      });
      for (let start = 0; start < pending.length; start += batchSize) {
        const chunk = pending.slice(start, start + batchSize);
        const body = { batch_input: chunk.map(({ ciphertext, context }) => ({ ciphertext, context })) };
        const data = dataOf('rewrap', await send('rewrap', () => client.write(`${mount}/rewrap/${keyName}`, body)));
        const answers = data.batch_results;
        if (!Array.isArray(answers) || answers.length !== chunk.length) {
          throw new KekUnavailableError('The KEK provider sent an unexpected answer to rewrap');
        }
        // Batch rewrap answers 200 whatever happened to the items: check each one.
        chunk.forEach(({ index }, i) => {
          const answer: unknown = answers[i];
          if (isObject(answer) && typeof answer.error === 'string' && answer.error !== '') {
            results[index] = { ok: false, error: safeMessage(answer.error) };
          } else if (isObject(answer) && typeof answer.ciphertext === 'string' && VAULT_BLOB.test(answer.ciphertext)) {
            results[index] = { ok: true, blob: answer.ciphertext };
          } else {
            results[index] = { ok: false, error: 'unexpected item in the rewrap answer' };
          }
        });
      }
      return results;
    },

    async rotate() {
      // Not retried: a retry after a lost answer could rotate twice.
      await send('rotate', () => client.write(`${keyPath}/rotate`, {}), false);
      return info();
    },

    info,

    async setMinDecryptionVersion(version) {
      if (!Number.isSafeInteger(version) || version < 1) throw new BadRequestError('The minimum decryption version must be an integer ≥ 1');
      const current = await info();
      if (version > current.latestVersion) {
        throw new ConflictError(`Cannot set the minimum decryption version to ${version}: the latest KEK version is ${current.latestVersion}`, 'kek_min_version');
      }
      const body: JsonObject = { min_decryption_version: version };
      // Transit refuses a (non-zero) min_encryption_version below min_decryption_version: raise both.
      if (current.minEncryptionVersion > 0 && current.minEncryptionVersion < version) body.min_encryption_version = version;
      try {
        await send('config', () => client.write(`${keyPath}/config`, body));
      } catch (error) {
        if (error instanceof VaultRequestError && error.status === 400) throw new ConflictError(`Vault refused the KEK config change: ${error.vaultMessage}`, 'kek_min_version');
        throw error;
      }
    },

    async health() {
      // A read of the key proves more than sys/health: reachable, unsealed, token valid, key present.
      try {
        const data = await readKey();
        return data ? { ok: true } : { ok: false, detail: `the KEK "${keyName}" does not exist` };
      } catch (error) {
        return { ok: false, detail: error instanceof Error ? error.message : 'unavailable' };
      }
    },

    async close() {
      closed = true;
    },
  };
}

/** A Vault answer other than success, unavailability or a missing key: status and a safe message. */
class VaultRequestError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly vaultMessage: string,
  ) {
    super(message);
    this.name = 'VaultRequestError';
  }
}

function encodeContext(context: string): string {
  const bytes = Buffer.from(context, 'utf8');
  if (bytes.length === 0) throw new Error('A KEK context is required (the binding string of the row)');
  if (bytes.length > MAX_CONTEXT_BYTES) throw new Error(`A KEK context must be at most ${MAX_CONTEXT_BYTES} bytes`);
  return bytes.toString('base64');
}

function withDeadline<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new DeadlineExceeded()), ms);
  });
  promise.catch(() => {}); // a late failure after the deadline must not become unhandled
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/** Vault's error text, with anything that could be a blob, key or token removed. */
function safeMessage(message: unknown): string {
  if (typeof message !== 'string') return 'unknown error';
  return message
    .replace(/vault:v\d+:[A-Za-z0-9+/=]*/g, 'vault:v…:[redacted]')
    .replace(/[A-Za-z0-9+/=._-]{24,}/g, '[redacted]')
    .replace(/\s+/g, ' ')
    .trim()
    .slice(0, 300);
}

function creationTime(value: unknown): string {
  if (typeof value === 'number') return new Date(value * 1000).toISOString(); // transit: unix seconds
  const text = typeof value === 'string' ? value : isObject(value) && typeof value.creation_time === 'string' ? value.creation_time : undefined;
  const date = text === undefined ? undefined : new Date(text);
  return date && !Number.isNaN(date.getTime()) ? date.toISOString() : new Date(0).toISOString();
}

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
