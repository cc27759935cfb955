/**
 * The `local` KEK provider: the embedded default for development and tests, with the same
 * semantics as a derived transit `aes256-gcm96` key (DESIGN §1, reference/vault-transit.md §10).
 *
 *   root key         32 bytes: KEYSTRATA_ROOT_KEY, or `<dataDir>/root-key` made on first start
 *   version key N    HKDF-SHA256(IKM = root key, salt = VERSION_SALT, info = "<label>|<key name>|v<N>")
 *   context key      HKDF-SHA256(IKM = version key, salt = empty, info = context)   (as transit)
 *   blob             local:v<N>:<base64( nonce(12) ‖ ciphertext ‖ tag(16) )>
 *
 * Only non-secret state is stored (kek_local_keys / kek_local_versions): latest version,
 * minimum decryption / encryption versions, creation times and a check value of the root key.
 * State is read on every call, so several replicas sharing one database agree at once; rotation
 * is one atomic `update … set latest_version = latest_version + 1`.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Kysely } from 'kysely';
import { systemClock, type Clock } from '../clock.js';
import type { DB } from '../db/database.js';
import { BadRequestError, ConflictError, KekUnavailableError, UnwrapError } from '../http/errors.js';
import type { KekInfo, KekLogger, KekProvider, RewrapResult } from './kek.types.js';

export const LOCAL_BLOB_PREFIX = 'local';
export const ROOT_KEY_FILE = 'root-key';

const KEY_BYTES = 32;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const VERSION_SALT = Buffer.from('keystrata/local-kek/v1', 'utf8');
const VERSION_INFO_LABEL = 'keystrata local KEK';
const ROOT_KEY_CHECK_LABEL = 'keystrata local KEK root key check v1';
/** Node's hkdfSync refuses a longer `info`; binding strings are far shorter. */
const MAX_CONTEXT_BYTES = 1024;
const BLOB_PATTERN = /^local:v([1-9]\d{0,8}):([A-Za-z0-9+/]+={0,2})$/;

export interface LocalKekProviderOptions {
  db: Kysely<DB>;
  /** 32-byte root key (KEYSTRATA_ROOT_KEY); without it, `<dataDir>/root-key` is used (created if missing). */
  rootKey?: Buffer | undefined;
  dataDir: string;
  keyName: string;
  logger?: KekLogger | undefined;
  clock?: Clock | undefined;
}

interface KeyState {
  latestVersion: number;
  minDecryptionVersion: number;
  minEncryptionVersion: number;
}

export function createLocalKekProvider(options: LocalKekProviderOptions): KekProvider {
  const { db, dataDir, keyName } = options;
  const logger: KekLogger = options.logger ?? console;
  const clock = options.clock ?? systemClock;
  if (!/^\w([\w.-]*\w)?$/.test(keyName)) throw new Error('The KEK name must match \\w([\\w.-]*\\w)?');

  let rootKey: Buffer | undefined = options.rootKey;
  if (rootKey !== undefined && rootKey.length !== KEY_BYTES) throw new Error('The local KEK root key must be 32 bytes');
  const versionKeys = new Map<number, Buffer>();

  function versionKey(version: number): Buffer {
    let key = versionKeys.get(version);
    if (key === undefined) {
      if (rootKey === undefined) throw new Error('The local KEK provider is not initialised: call init() first');
      const info = Buffer.from(`${VERSION_INFO_LABEL}|${keyName}|v${version}`, 'utf8');
      key = Buffer.from(crypto.hkdfSync('sha256', rootKey, VERSION_SALT, info, KEY_BYTES));
      versionKeys.set(version, key);
    }
    return key;
  }

  /** The per-row key, exactly as transit derives it for a `derived` key. */
  function contextKey(version: number, context: Buffer): Buffer {
    return Buffer.from(crypto.hkdfSync('sha256', versionKey(version), Buffer.alloc(0), context, KEY_BYTES));
  }

  function encrypt(version: number, context: Buffer, plaintext: Buffer): string {
    const key = contextKey(version, context);
    const nonce = crypto.randomBytes(NONCE_BYTES);
    const cipher = crypto.createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
    const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()]);
    const sealed = Buffer.concat([nonce, ciphertext, cipher.getAuthTag()]); // nonce ‖ ciphertext ‖ tag
    key.fill(0);
    return `${LOCAL_BLOB_PREFIX}:v${version}:${sealed.toString('base64')}`;
  }

  /** Throws UnwrapError (never with the blob in the message) when the blob does not authenticate. */
  function decrypt(state: KeyState, blob: string, context: Buffer): Buffer {
    const match = BLOB_PATTERN.exec(blob);
    if (!match) throw new UnwrapError('Stored key material failed to unwrap: not a local KEK blob');
    const version = Number(match[1]);
    if (version > state.latestVersion) throw new UnwrapError('Stored key material failed to unwrap: KEK version is too new');
    if (version < state.minDecryptionVersion) {
      throw new UnwrapError(`Stored key material failed to unwrap: KEK version ${version} is below the minimum decryption version`);
    }
    const encoded = match[2] ?? '';
    const sealed = Buffer.from(encoded, 'base64');
    if (sealed.toString('base64') !== encoded) throw new UnwrapError('Stored key material failed to unwrap: malformed base64');
    if (sealed.length < NONCE_BYTES + TAG_BYTES) throw new UnwrapError('Stored key material failed to unwrap: blob too short');
    const nonce = sealed.subarray(0, NONCE_BYTES);
    const ciphertext = sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES);
    const tag = sealed.subarray(sealed.length - TAG_BYTES);
    const key = contextKey(version, context);
    try {
      const decipher = crypto.createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
      decipher.setAuthTag(tag);
      return Buffer.concat([decipher.update(ciphertext), decipher.final()]);
    } catch {
      throw new UnwrapError('Stored key material failed to unwrap: authentication failed (wrong context or tampered blob)');
    } finally {
      key.fill(0);
    }
  }

  async function readState(): Promise<KeyState> {
    let row;
    try {
      row = await db
        .selectFrom('kek_local_keys')
        .select(['latest_version', 'min_decryption_version', 'min_encryption_version'])
        .where('name', '=', keyName)
        .executeTakeFirst();
    } catch (error) {
      throw isDatabaseUnreachable(error) ? unavailable('The local KEK state could not be read', error) : error;
    }
    if (!row) throw new Error(`The local KEK "${keyName}" does not exist: call init() first`);
    return {
      latestVersion: row.latest_version,
      minDecryptionVersion: row.min_decryption_version,
      minEncryptionVersion: row.min_encryption_version,
    };
  }

  async function info(): Promise<KekInfo> {
    const state = await readState();
    let versions;
    try {
      versions = await db
        .selectFrom('kek_local_versions')
        .select(['version', 'created_at'])
        .where('key_name', '=', keyName)
        .where('version', '>=', state.minDecryptionVersion) // the working set, as transit reports it
        .orderBy('version')
        .execute();
    } catch (error) {
      throw isDatabaseUnreachable(error) ? unavailable('The local KEK state could not be read', error) : error;
    }
    return {
      name: keyName,
      provider: 'local',
      type: 'aes256-gcm96',
      derived: true,
      latestVersion: state.latestVersion,
      minDecryptionVersion: state.minDecryptionVersion,
      minEncryptionVersion: state.minEncryptionVersion,
      versions: versions.map((v) => ({ version: v.version, createdAt: new Date(v.created_at).toISOString() })),
    };
  }

  return {
    kind: 'local',
    keyName,

    async init() {
      let generatedAt: string | undefined;
      if (rootKey === undefined) {
        const loaded = loadOrCreateRootKeyFile(dataDir);
        rootKey = loaded.key;
        if (loaded.created) generatedAt = loaded.file;
      }
      const check = rootKeyCheck(rootKey);
      await db.transaction().execute(async (trx) => {
        const inserted = await trx
          .insertInto('kek_local_keys')
          .values({ name: keyName, latest_version: 1, min_decryption_version: 1, min_encryption_version: 0, root_key_check: check })
          .onConflict((oc) => oc.column('name').doNothing())
          .returning('name')
          .executeTakeFirst();
        if (inserted) {
          await trx.insertInto('kek_local_versions').values({ key_name: keyName, version: 1, created_at: clock.now() }).execute();
          return;
        }
        const existing = await trx.selectFrom('kek_local_keys').select('root_key_check').where('name', '=', keyName).executeTakeFirstOrThrow();
        if (existing.root_key_check !== check) {
          throw new Error(
            `The local KEK root key does not match the one KEK "${keyName}" was created with: ` +
              'check KEYSTRATA_ROOT_KEY or the root-key file in the data directory (stored keys cannot be unwrapped with another root key)',
          );
        }
      });
      logger.warn(
        '*** The local KEK provider is in use: the root key is ' +
          (options.rootKey !== undefined ? 'read from KEYSTRATA_ROOT_KEY' : `kept in ${path.join(dataDir, ROOT_KEY_FILE)}`) +
          (generatedAt !== undefined ? ' (generated just now)' : '') +
          '. This is for development and tests only, like Vault -dev mode: set VAULT_ADDR to keep the KEK in Vault transit. ***',
      );
    },

    async wrap(plaintext, context) {
      const contextBytes = contextBuffer(context);
      const state = await readState();
      return encrypt(state.latestVersion, contextBytes, plaintext);
    },

    async unwrap(blob, context) {
      const contextBytes = contextBuffer(context);
      const state = await readState();
      return decrypt(state, blob, contextBytes);
    },

    async rewrapBatch(items) {
      if (items.length === 0) return [];
      const state = await readState();
      return items.map(({ blob, context }): RewrapResult => {
        let plaintext: Buffer | undefined;
        try {
          const contextBytes = contextBuffer(context);
          plaintext = decrypt(state, blob, contextBytes);
          return { ok: true, blob: encrypt(state.latestVersion, contextBytes, plaintext) };
        } catch (error) {
          return { ok: false, error: error instanceof Error ? error.message : 'rewrap failed' };
        } finally {
          plaintext?.fill(0);
        }
      });
    },

    async rotate() {
      try {
        await db.transaction().execute(async (trx) => {
          // One atomic increment: concurrent rotations from several replicas get distinct versions.
          const row = await trx
            .updateTable('kek_local_keys')
            .set((eb) => ({ latest_version: eb('latest_version', '+', 1), updated_at: clock.now() }))
            .where('name', '=', keyName)
            .returning('latest_version')
            .executeTakeFirst();
          if (!row) throw new Error(`The local KEK "${keyName}" does not exist: call init() first`);
          await trx.insertInto('kek_local_versions').values({ key_name: keyName, version: row.latest_version, created_at: clock.now() }).execute();
        });
      } catch (error) {
        throw isDatabaseUnreachable(error) ? unavailable('The local KEK state could not be updated', error) : error;
      }
      return info();
    },

    info,

    async setMinDecryptionVersion(version) {
      if (!Number.isSafeInteger(version) || version < 1) throw new BadRequestError('The minimum decryption version must be an integer ≥ 1');
      try {
        await db.transaction().execute(async (trx) => {
          const row = await trx
            .selectFrom('kek_local_keys')
            .select(['latest_version', 'min_encryption_version'])
            .where('name', '=', keyName)
            .forUpdate()
            .executeTakeFirst();
          if (!row) throw new Error(`The local KEK "${keyName}" does not exist: call init() first`);
          if (version > row.latest_version) {
            throw new ConflictError(`Cannot set the minimum decryption version to ${version}: the latest KEK version is ${row.latest_version}`, 'kek_min_version');
          }
          // Transit refuses min_encryption (when set) below min_decryption: raise both together.
          const minEncryption = row.min_encryption_version > 0 && row.min_encryption_version < version ? version : row.min_encryption_version;
          await trx
            .updateTable('kek_local_keys')
            .set({ min_decryption_version: version, min_encryption_version: minEncryption, updated_at: clock.now() })
            .where('name', '=', keyName)
            .execute();
        });
      } catch (error) {
        throw isDatabaseUnreachable(error) ? unavailable('The local KEK state could not be updated', error) : error;
      }
    },

    async health() {
      try {
        await readState();
        return { ok: true };
      } catch (error) {
        return { ok: false, detail: error instanceof Error ? error.message : 'local KEK state unreadable' };
      }
    },

    async close() {
      for (const key of versionKeys.values()) key.fill(0);
      versionKeys.clear();
    },
  };
}

/** Reads `<dataDir>/root-key`, or creates it (0600, 32 random bytes, base64) atomically on first start. */
export function loadOrCreateRootKeyFile(dataDir: string): { key: Buffer; file: string; created: boolean } {
  const file = path.join(dataDir, ROOT_KEY_FILE);
  let created = false;
  if (!fs.existsSync(file)) {
    fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    // Write a temporary file, then link() it into place: link fails if another process won the
    // race, and nobody ever reads a half-written key file.
    const temporary = `${file}.${process.pid}.${crypto.randomBytes(6).toString('hex')}.tmp`;
    const key = crypto.randomBytes(KEY_BYTES);
    try {
      fs.writeFileSync(temporary, `${key.toString('base64')}\n`, { mode: 0o600, flag: 'wx' });
      fs.linkSync(temporary, file);
      created = true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    } finally {
      key.fill(0);
      fs.rmSync(temporary, { force: true });
    }
  }
  const text = fs.readFileSync(file, 'utf8').trim();
  const key = Buffer.from(text, 'base64');
  if (key.length !== KEY_BYTES || key.toString('base64') !== text) {
    throw new Error(`The local KEK root key file ${file} must hold exactly 32 bytes, base64-encoded`);
  }
  if (process.platform !== 'win32' && (fs.statSync(file).mode & 0o077) !== 0) {
    throw new Error(`The local KEK root key file ${file} is readable by other users: chmod 600 it`);
  }
  return { key, file, created };
}

function rootKeyCheck(rootKey: Buffer): string {
  return crypto.createHmac('sha256', rootKey).update(ROOT_KEY_CHECK_LABEL).digest().subarray(0, 16).toString('hex');
}

function contextBuffer(context: string): Buffer {
  const bytes = Buffer.from(context, 'utf8');
  if (bytes.length === 0) throw new Error('A KEK context is required (the binding string of the row)');
  if (bytes.length > MAX_CONTEXT_BYTES) throw new Error(`A KEK context must be at most ${MAX_CONTEXT_BYTES} bytes`);
  return bytes;
}

function isDatabaseUnreachable(error: unknown): boolean {
  const code = (error as { code?: unknown } | undefined)?.code;
  // pg connection errors, and SQLSTATE class 08 (connection exception) / 57P (shutdown)
  return typeof code === 'string' && (/^E(CONN|TIMEDOUT|HOSTUNREACH|PIPE)/.test(code) || /^(08|57P)/.test(code));
}

function unavailable(message: string, cause: unknown): KekUnavailableError {
  const error = new KekUnavailableError(message);
  error.cause = cause; // a database error: carries no key material
  return error;
}
