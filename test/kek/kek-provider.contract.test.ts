/**
 * One contract for every KekProvider: the `local` provider on this file's test database, the
 * `vault` provider against the transit emulator, and, when VAULT_ADDR and VAULT_TOKEN are set
 * for the run, the `vault` provider against that real Vault / OpenBao (a unique key per run,
 * deleted afterwards). Provider-specific behaviour follows the contract.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import nodeVault from 'node-vault';
import { createPostgresDatabase, type Database } from '../../src/db/database.js';
import { BadRequestError, ConflictError, KekUnavailableError, UnwrapError } from '../../src/http/errors.js';
import { createKekProvider } from '../../src/kek/index.js';
import { kekBlobVersion, type KekLogger, type KekProvider } from '../../src/kek/kek.types.js';
import { createLocalKekProvider, ROOT_KEY_FILE } from '../../src/kek/local.provider.js';
import { createVaultKekProvider } from '../../src/kek/vault.provider.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';
import { startTransitEmulator, type TransitEmulator } from '../support/transit-emulator.js';

const runId = crypto.randomBytes(4).toString('hex');
let keyCounter = 0;
const uniqueKeyName = () => `keystrata-test-${runId}-${++keyCounter}`;

/** Binding strings as crypto/binding.ts builds them (DESIGN §1). */
const binding = (groupId: string, version = 1, kekVersion = 1) => `keystrata:v1|group|${groupId}|${version}|kek|keystrata-kek|${kekVersion}`;

function quietLogger(): KekLogger & { warnings: string[] } {
  const warnings: string[] = [];
  return { warnings, warn: (message: string) => void warnings.push(message), info: () => {} };
}

/** Flip one bit of the decoded `nonce ‖ ciphertext ‖ tag` at `index` (negative: from the end). */
function flipBit(blob: string, index: number): string {
  const cut = blob.lastIndexOf(':') + 1;
  const body = Buffer.from(blob.slice(cut), 'base64');
  const at = index < 0 ? body.length + index : index;
  body[at]! ^= 0x01;
  return blob.slice(0, cut) + body.toString('base64');
}

interface Target {
  name: string;
  prefix: 'local' | 'vault';
  before(): Promise<void>;
  after(): Promise<void>;
  /** A fresh, initialised provider on its own key. */
  create(): Promise<KekProvider>;
  /** A provider whose backend cannot be reached. */
  unreachable(): Promise<KekProvider>;
}

function localTarget(): Target {
  let database: TestDatabase;
  let dataDir: string;
  const deadDatabases: Database[] = [];
  const rootKey = crypto.randomBytes(32);
  return {
    name: 'local provider on the test database',
    prefix: 'local',
    async before() {
      database = await createTestDatabase();
      dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-kek-'));
    },
    async after() {
      for (const dead of deadDatabases) await dead.close();
      await database.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
    async create() {
      const provider = createLocalKekProvider({ db: database.db, rootKey, dataDir, keyName: uniqueKeyName(), logger: quietLogger() });
      await provider.init();
      return provider;
    },
    async unreachable() {
      const dead = createPostgresDatabase('postgres://postgres@127.0.0.1:1/nothing', 1);
      deadDatabases.push(dead);
      return createLocalKekProvider({ db: dead.db, rootKey, dataDir, keyName: 'unreachable', logger: quietLogger() });
    },
  };
}

function emulatorTarget(): Target {
  let emulator: TransitEmulator;
  const options = (emu: TransitEmulator) => ({ addr: emu.url, token: emu.token, transitMount: emu.mount, keyName: uniqueKeyName(), requestTimeoutMs: 2000 });
  return {
    name: 'vault provider against the transit emulator',
    prefix: 'vault',
    async before() {
      emulator = await startTransitEmulator({ mount: 'kms/transit' });
    },
    async after() {
      await emulator.close();
    },
    async create() {
      const provider = createVaultKekProvider(options(emulator));
      await provider.init();
      return provider;
    },
    async unreachable() {
      const doomed = await startTransitEmulator();
      const provider = createVaultKekProvider(options(doomed));
      await provider.init();
      await doomed.close(); // the emulator goes down under an initialised provider
      return provider;
    },
  };
}

function realVaultTarget(addr: string, token: string): Target {
  const namespace = process.env.VAULT_NAMESPACE || undefined;
  const mount = process.env.VAULT_TRANSIT_MOUNT || 'transit';
  const created: string[] = [];
  return {
    name: `vault provider against the real server at ${new URL(addr).host}`,
    prefix: 'vault',
    async before() {},
    async after() {
      const client = nodeVault({ endpoint: addr, token, ...(namespace ? { namespace } : {}) });
      for (const name of created) {
        await client.write(`${mount}/keys/${name}/config`, { deletion_allowed: true }).catch(() => {});
        await client.delete(`${mount}/keys/${name}`).catch(() => {});
      }
    },
    async create() {
      const keyName = uniqueKeyName();
      created.push(keyName);
      const provider = createVaultKekProvider({ addr, token, namespace, transitMount: mount, keyName, requestTimeoutMs: 10_000 });
      await provider.init();
      return provider;
    },
    async unreachable() {
      return createVaultKekProvider({ addr: 'http://127.0.0.1:1', token, transitMount: mount, keyName: 'unreachable', requestTimeoutMs: 2000 });
    },
  };
}

const targets: Target[] = [localTarget(), emulatorTarget()];
if (process.env.VAULT_ADDR && process.env.VAULT_TOKEN) targets.push(realVaultTarget(process.env.VAULT_ADDR, process.env.VAULT_TOKEN));

describe.each(targets)('KEK provider contract: $name', (target) => {
  const providers: KekProvider[] = [];
  const fresh = async () => {
    const provider = await target.create();
    providers.push(provider);
    return provider;
  };
  beforeAll(() => target.before());
  afterAll(async () => {
    for (const provider of providers) await provider.close();
    await target.after();
  });

  it('when material is wrapped and unwrapped with the same context, then the same bytes come back from a <prefix>:v1: blob', async () => {
    const kek = await fresh();
    const material = crypto.randomBytes(32);
    const blob = await kek.wrap(material, binding('g1'));
    expect(blob).toMatch(new RegExp(`^${target.prefix}:v1:[A-Za-z0-9+/]+={0,2}$`));
    expect(kekBlobVersion(blob)).toBe(1);
    expect(blob).not.toContain(material.toString('base64'));
    expect((await kek.unwrap(blob, binding('g1'))).equals(material)).toBe(true);
    expect(await kek.wrap(material, binding('g1'))).not.toBe(blob); // fresh nonce each time
  });

  it('when init runs again, then the KEK keeps its versions', async () => {
    const kek = await fresh();
    await kek.rotate();
    await kek.init();
    expect((await kek.info()).latestVersion).toBe(2);
  });

  it('when a blob is moved to another row (another context), then unwrapping fails with UnwrapError', async () => {
    const kek = await fresh();
    const blob = await kek.wrap(crypto.randomBytes(32), binding('g1', 1));
    await expect(kek.unwrap(blob, binding('g2', 1))).rejects.toBeInstanceOf(UnwrapError);
    await expect(kek.unwrap(blob, binding('g1', 2))).rejects.toBeInstanceOf(UnwrapError);
  });

  it.each([
    ['the nonce', 0],
    ['the ciphertext', 12],
    ['the tag', -1],
  ])('when one bit of %s is flipped, then unwrapping fails with UnwrapError and the message holds no blob', async (_part, index) => {
    const kek = await fresh();
    const blob = await kek.wrap(crypto.randomBytes(32), binding('g1'));
    const tampered = flipBit(blob, index);
    const error = await kek.unwrap(tampered, binding('g1')).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(UnwrapError);
    expect((error as Error).message).not.toContain(tampered.slice(-20));
  });

  it('when a blob is truncated or not a blob at all, then unwrapping fails with UnwrapError', async () => {
    const kek = await fresh();
    const blob = await kek.wrap(crypto.randomBytes(32), binding('g1'));
    await expect(kek.unwrap(blob.slice(0, blob.length - 8), binding('g1'))).rejects.toBeInstanceOf(UnwrapError);
    await expect(kek.unwrap('not a blob', binding('g1'))).rejects.toBeInstanceOf(UnwrapError);
    await expect(kek.unwrap(`${target.prefix}:v1:AAAA`, binding('g1'))).rejects.toBeInstanceOf(UnwrapError);
  });

  it('when the KEK is rotated, then new blobs use the new version and old blobs still unwrap', async () => {
    const kek = await fresh();
    const oldMaterial = crypto.randomBytes(32);
    const oldBlob = await kek.wrap(oldMaterial, binding('g1'));
    const rotated = await kek.rotate();
    expect(rotated.latestVersion).toBe(2);
    const newBlob = await kek.wrap(crypto.randomBytes(32), binding('g2'));
    expect(kekBlobVersion(newBlob)).toBe(2);
    expect((await kek.unwrap(oldBlob, binding('g1'))).equals(oldMaterial)).toBe(true);
    // the version in the prefix is bound too: relabelling a v1 blob as v2 fails
    await expect(kek.unwrap(oldBlob.replace(':v1:', ':v2:'), binding('g1'))).rejects.toBeInstanceOf(UnwrapError);
  });

  it('when rewrapBatch runs after a rotation, then every blob moves to the latest version, in order, still bound to its row', async () => {
    const kek = await fresh();
    const materials = Array.from({ length: 5 }, () => crypto.randomBytes(32));
    const items = await Promise.all(materials.map(async (m, i) => ({ blob: await kek.wrap(m, binding(`g${i}`)), context: binding(`g${i}`) })));
    await kek.rotate();
    await kek.rotate();
    const results = await kek.rewrapBatch(items);
    expect(results).toHaveLength(5);
    for (const [i, result] of results.entries()) {
      if (!result.ok) throw new Error(`item ${i} failed: ${result.error}`);
      expect(kekBlobVersion(result.blob)).toBe(3);
      expect(result.blob).not.toBe(items[i]!.blob);
      expect((await kek.unwrap(result.blob, binding(`g${i}`))).equals(materials[i]!)).toBe(true);
      await expect(kek.unwrap(result.blob, binding(`g${(i + 1) % 5}`))).rejects.toBeInstanceOf(UnwrapError);
    }
  });

  it('when a batch holds one bad item, then that item reports failure and the others are rewrapped', async () => {
    const kek = await fresh();
    const a = await kek.wrap(crypto.randomBytes(32), binding('a'));
    const b = await kek.wrap(crypto.randomBytes(32), binding('b'));
    const c = await kek.wrap(crypto.randomBytes(32), binding('c'));
    await kek.rotate();
    const results = await kek.rewrapBatch([
      { blob: a, context: binding('a') },
      { blob: b, context: binding('moved') },
      { blob: c, context: binding('c') },
    ]);
    expect(results.map((r) => r.ok)).toEqual([true, false, true]);
    const failed = results[1]!;
    if (failed.ok) throw new Error('unreachable');
    expect(failed.error).not.toContain(b.slice(-20));
  });

  it('when the context is empty or longer than 1024 bytes, then wrap and unwrap refuse it', async () => {
    const kek = await fresh();
    await expect(kek.wrap(crypto.randomBytes(32), '')).rejects.toThrow(/context is required/);
    await expect(kek.wrap(crypto.randomBytes(32), 'x'.repeat(1025))).rejects.toThrow(/at most 1024 bytes/);
    const blob = await kek.wrap(crypto.randomBytes(32), 'x'.repeat(1024));
    await expect(kek.unwrap(blob, '')).rejects.toThrow(/context is required/);
  });

  it('when an empty batch is rewrapped, then the answer is empty', async () => {
    const kek = await fresh();
    expect(await kek.rewrapBatch([])).toEqual([]);
  });

  it('when the minimum decryption version is raised, then older blobs fail with UnwrapError and newer ones still unwrap', async () => {
    const kek = await fresh();
    const old = await kek.wrap(crypto.randomBytes(32), binding('g1'));
    await kek.rotate();
    const current = crypto.randomBytes(32);
    const fresher = await kek.wrap(current, binding('g1'));
    await kek.setMinDecryptionVersion(2);
    await expect(kek.unwrap(old, binding('g1'))).rejects.toBeInstanceOf(UnwrapError);
    expect((await kek.unwrap(fresher, binding('g1'))).equals(current)).toBe(true);
    const [rewrap] = await kek.rewrapBatch([{ blob: old, context: binding('g1') }]);
    expect(rewrap?.ok).toBe(false);
    const info = await kek.info();
    expect(info.minDecryptionVersion).toBe(2);
    expect(info.versions.map((v) => v.version)).toEqual([2]); // the working set, as transit reports it
  });

  it('when the minimum decryption version is set above the latest version or below 1, then it is refused', async () => {
    const kek = await fresh();
    await expect(kek.setMinDecryptionVersion(5)).rejects.toBeInstanceOf(ConflictError);
    await expect(kek.setMinDecryptionVersion(0)).rejects.toBeInstanceOf(BadRequestError);
    expect((await kek.info()).minDecryptionVersion).toBe(1);
  });

  it('when info() is read, then it names the key, its type, derivation and every version with its creation time', async () => {
    const kek = await fresh();
    const before = Date.now() - 2000;
    await kek.rotate();
    const info = await kek.info();
    expect(info).toMatchObject({
      name: kek.keyName,
      provider: kek.kind,
      type: 'aes256-gcm96',
      derived: true,
      latestVersion: 2,
      minDecryptionVersion: 1,
      minEncryptionVersion: 0,
    });
    expect(info.versions.map((v) => v.version)).toEqual([1, 2]);
    for (const version of info.versions) {
      expect(new Date(version.createdAt).toISOString()).toBe(version.createdAt);
      expect(new Date(version.createdAt).getTime()).toBeGreaterThanOrEqual(Math.floor(before / 1000) * 1000);
    }
    expect(await kek.health()).toEqual({ ok: true });
  });

  it('when the backend is down, then every call fails with KekUnavailableError and health() is not ok', async () => {
    const kek = await target.unreachable();
    providers.push(kek);
    const blob = `${target.prefix}:v1:${Buffer.alloc(60).toString('base64')}`;
    await expect(kek.wrap(crypto.randomBytes(32), binding('g1'))).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.unwrap(blob, binding('g1'))).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.rewrapBatch([{ blob, context: binding('g1') }])).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.rotate()).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.info()).rejects.toBeInstanceOf(KekUnavailableError);
    expect((await kek.health()).ok).toBe(false);
  });
});

describe('local provider', () => {
  let database: TestDatabase;
  let dataDir: string;
  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(async () => {
    await database.close();
  });
  afterEach(() => {
    if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
  });
  const newDataDir = () => (dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-kek-')));

  it('when no root key is configured, then a 0600 root-key file is made once, reused, and a loud warning names it', async () => {
    const dir = path.join(newDataDir(), 'nested');
    const keyName = uniqueKeyName();
    const logger = quietLogger();
    const first = createLocalKekProvider({ db: database.db, dataDir: dir, keyName, logger });
    await first.init();
    const file = path.join(dir, ROOT_KEY_FILE);
    const stat = fs.statSync(file);
    expect(stat.mode & 0o777).toBe(0o600);
    const rootKey = fs.readFileSync(file, 'utf8').trim();
    expect(Buffer.from(rootKey, 'base64')).toHaveLength(32);
    expect(logger.warnings).toHaveLength(1);
    expect(logger.warnings[0]).toMatch(/development/);
    expect(logger.warnings[0]).toContain(file);
    expect(logger.warnings[0]).not.toContain(rootKey);

    const blob = await first.wrap(Buffer.from('material'), binding('g1'));
    const second = createLocalKekProvider({ db: database.db, dataDir: dir, keyName, logger: quietLogger() });
    await second.init();
    expect(fs.readFileSync(file, 'utf8').trim()).toBe(rootKey);
    expect((await second.unwrap(blob, binding('g1'))).toString()).toBe('material');
  });

  it('when the root key is not the one the KEK was created with, then init refuses to start', async () => {
    const keyName = uniqueKeyName();
    const dir = newDataDir();
    await createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir: dir, keyName, logger: quietLogger() }).init();
    const other = createLocalKekProvider({ db: database.db, rootKey: crypto.randomBytes(32), dataDir: dir, keyName, logger: quietLogger() });
    await expect(other.init()).rejects.toThrow(/root key does not match/);
  });

  it('when the root-key file is readable by others, then the provider refuses it', async () => {
    const dir = newDataDir();
    fs.writeFileSync(path.join(dir, ROOT_KEY_FILE), `${crypto.randomBytes(32).toString('base64')}\n`, { mode: 0o644 });
    fs.chmodSync(path.join(dir, ROOT_KEY_FILE), 0o644);
    const kek = createLocalKekProvider({ db: database.db, dataDir: dir, keyName: uniqueKeyName(), logger: quietLogger() });
    await expect(kek.init()).rejects.toThrow(/readable by other users/);
  });

  it('when two replicas rotate at the same time, then every rotation gets its own version', async () => {
    const keyName = uniqueKeyName();
    const rootKey = crypto.randomBytes(32);
    const dir = newDataDir();
    const replicas = [0, 1].map(() => createLocalKekProvider({ db: database.db, rootKey, dataDir: dir, keyName, logger: quietLogger() }));
    await Promise.all(replicas.map((r) => r.init()));
    await Promise.all(Array.from({ length: 10 }, (_, i) => replicas[i % 2]!.rotate()));
    const info = await replicas[0]!.info();
    expect(info.latestVersion).toBe(11);
    expect(info.versions.map((v) => v.version)).toEqual(Array.from({ length: 11 }, (_, i) => i + 1));
    // what one replica wraps, the other unwraps
    const blob = await replicas[1]!.wrap(Buffer.from('shared'), binding('g1'));
    expect(kekBlobVersion(blob)).toBe(11);
    expect((await replicas[0]!.unwrap(blob, binding('g1'))).toString()).toBe('shared');
  });

  it('when the database is read, then it holds versions and a root-key check value but no key material', async () => {
    const rootKey = crypto.randomBytes(32);
    const keyName = uniqueKeyName();
    const kek = createLocalKekProvider({ db: database.db, rootKey, dataDir: newDataDir(), keyName, logger: quietLogger() });
    await kek.init();
    await kek.rotate();
    const row = await database.db.selectFrom('kek_local_keys').selectAll().where('name', '=', keyName).executeTakeFirstOrThrow();
    const dump = JSON.stringify(row) + JSON.stringify(await database.db.selectFrom('kek_local_versions').selectAll().where('key_name', '=', keyName).execute());
    expect(dump).not.toContain(rootKey.toString('base64'));
    expect(dump).not.toContain(rootKey.toString('hex'));
    expect(row.root_key_check).toMatch(/^[0-9a-f]{32}$/);
  });

  it('when createKekProvider gets a configuration without vault, then it builds the local provider; with vault, the vault one', async () => {
    const local = createKekProvider(
      { vault: undefined, rootKey: crypto.randomBytes(32), dataDir: newDataDir(), kekName: 'keystrata-kek' },
      { db: database.db, logger: quietLogger() },
    );
    expect(local.kind).toBe('local');
    const vault = createKekProvider(
      {
        vault: { addr: 'http://127.0.0.1:8200', token: 't', namespace: undefined, transitMount: 'transit', requestTimeoutMs: 1000 },
        rootKey: undefined,
        dataDir: newDataDir(),
        kekName: 'keystrata-kek',
      },
      { db: database.db },
    );
    expect(vault.kind).toBe('vault');
    expect(vault.keyName).toBe('keystrata-kek');
  });
});

describe('vault provider against the transit emulator', () => {
  let emulator: TransitEmulator;
  beforeAll(async () => {
    emulator = await startTransitEmulator();
  });
  afterAll(async () => {
    await emulator.close();
  });
  afterEach(() => {
    emulator.setFault(undefined);
    emulator.setHealth('active');
  });
  const provider = (overrides: Partial<Parameters<typeof createVaultKekProvider>[0]> = {}) =>
    createVaultKekProvider({ addr: emulator.url, token: emulator.token, transitMount: emulator.mount, keyName: uniqueKeyName(), requestTimeoutMs: 500, ...overrides });
  const admin = () => {
    const client = nodeVault({ endpoint: emulator.url, token: emulator.token });
    Object.assign(client, { namespace: '', pathPrefix: '' });
    return client;
  };

  it('when init runs on an empty mount, then the key is created explicitly as derived aes256-gcm96, never through encrypt', async () => {
    const kek = provider();
    const seen = emulator.requests.length;
    await kek.init();
    await kek.wrap(Buffer.from('x'), binding('g1'));
    const calls = emulator.requests.slice(seen).map((r) => `${r.method} ${r.path}`);
    expect(calls.slice(0, 3)).toEqual([`GET transit/keys/${kek.keyName}`, `POST transit/keys/${kek.keyName}`, `GET transit/keys/${kek.keyName}`]);
    expect((await admin().read(`transit/keys/${kek.keyName}`)).data).toMatchObject({ type: 'aes256-gcm96', derived: true, convergent_encryption: false });
  });

  it('when the key exists but is not derived aes256-gcm96, then init refuses with a clear error', async () => {
    const plain = uniqueKeyName();
    await admin().write(`transit/keys/${plain}`, { type: 'aes256-gcm96' });
    await expect(provider({ keyName: plain }).init()).rejects.toThrow(/not a derived, non-convergent aes256-gcm96 key/);
    const chacha = uniqueKeyName();
    await admin().write(`transit/keys/${chacha}`, { type: 'chacha20-poly1305', derived: true });
    await expect(provider({ keyName: chacha }).init()).rejects.toThrow(/type chacha20-poly1305/);
  });

  it('when a rewrap has more items than a request may carry, then it is split into requests and the order is kept', async () => {
    const kek = provider({ rewrapBatchSize: 4 });
    await kek.init();
    const items = await Promise.all(Array.from({ length: 10 }, async (_, i) => ({ blob: await kek.wrap(Buffer.from(`m${i}`), binding(`g${i}`)), context: binding(`g${i}`) })));
    items[5] = { blob: items[5]!.blob, context: binding('elsewhere') };
    await kek.rotate();
    const seen = emulator.requests.length;
    const results = await kek.rewrapBatch(items);
    expect(emulator.requests.slice(seen).filter((r) => r.path.startsWith('transit/rewrap/'))).toHaveLength(3);
    expect(results.map((r) => r.ok)).toEqual([true, true, true, true, true, false, true, true, true, true]);
    for (const [i, result] of results.entries()) {
      if (result.ok) expect((await kek.unwrap(result.blob, binding(`g${i}`))).toString()).toBe(`m${i}`);
    }
  });

  it.each([
    ['a 503', { kind: 'status', status: 503 }],
    ['a 500', { kind: 'status', status: 500 }],
    ['a 429 quota error', { kind: 'status', status: 429 }],
    ['a body that is not JSON', { kind: 'garbage' }],
    ['a dropped connection', { kind: 'drop' }],
    ['an answer slower than the timeout', { kind: 'delay', ms: 1500 }],
  ] as const)('when Vault answers with %s, then the call fails with KekUnavailableError', async (_what, fault) => {
    const kek = provider();
    await kek.init();
    const blob = await kek.wrap(Buffer.from('material'), binding('g1'));
    emulator.setFault({ ...fault, path: /\/(encrypt|decrypt|rewrap)\// });
    await expect(kek.wrap(Buffer.from('material'), binding('g1'))).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.unwrap(blob, binding('g1'))).rejects.toBeInstanceOf(KekUnavailableError);
    await expect(kek.rewrapBatch([{ blob, context: binding('g1') }])).rejects.toBeInstanceOf(KekUnavailableError);
    emulator.setFault(undefined);
    expect((await kek.unwrap(blob, binding('g1'))).toString()).toBe('material');
  });

  it('when the token is refused, then KekUnavailableError and the message never shows the token', async () => {
    const token = `s.${crypto.randomBytes(16).toString('hex')}`;
    const kek = provider({ token });
    const error = await kek.init().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KekUnavailableError);
    expect((error as Error).message).toMatch(/refused the token/);
    expect((error as Error).message).not.toContain(token);
    expect(JSON.stringify(error)).not.toContain(token);
  });

  it('when Vault is sealed, then calls fail with KekUnavailableError and health() says why', async () => {
    const kek = provider();
    await kek.init();
    emulator.setHealth('sealed');
    await expect(kek.wrap(Buffer.from('x'), binding('g1'))).rejects.toBeInstanceOf(KekUnavailableError);
    const health = await kek.health();
    expect(health.ok).toBe(false);
    expect(health.detail).toMatch(/sealed/);
  });

  it('when the key is deleted under the provider, then calls fail with KekUnavailableError naming the missing KEK', async () => {
    const kek = provider();
    await kek.init();
    const blob = await kek.wrap(Buffer.from('x'), binding('g1'));
    await admin().write(`transit/keys/${kek.keyName}/config`, { deletion_allowed: true });
    await admin().delete(`transit/keys/${kek.keyName}`);
    await expect(kek.unwrap(blob, binding('g1'))).rejects.toThrow(/does not exist/);
    await expect(kek.rewrapBatch([{ blob, context: binding('g1') }])).rejects.toBeInstanceOf(KekUnavailableError);
    expect(await kek.health()).toMatchObject({ ok: false });
  });

  it('when a wrap fails, then the error message holds neither the plaintext nor the context', async () => {
    const kek = provider();
    await kek.init();
    emulator.setFault({ kind: 'status', status: 500, message: 'storage failure', path: '/encrypt/' });
    const material = crypto.randomBytes(32);
    const error = (await kek.wrap(material, binding('secret-group')).catch((e: unknown) => e)) as Error;
    expect(error).toBeInstanceOf(KekUnavailableError);
    expect(error.message).not.toContain(material.toString('base64'));
    expect(error.message).not.toContain('secret-group');
    expect(error.cause).toBeUndefined();
  });
});
