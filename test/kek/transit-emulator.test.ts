/**
 * The transit emulator against shared/reference/vault-transit.md (§16 checklist), through real
 * node-vault calls over loopback HTTP: if these pass, tests that use the emulator see what a real
 * Vault / OpenBao would answer.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import nodeVault from 'node-vault';
import { createManualClock } from '../../src/clock.js';
import { decodeGoBase64, startTransitEmulator, type TransitEmulator, type TransitEmulatorOptions } from '../support/transit-emulator.js';

type Client = ReturnType<typeof nodeVault>;
const b64 = (text: string | Buffer) => (typeof text === 'string' ? Buffer.from(text, 'utf8') : text).toString('base64');

/** A node-vault client pinned to the emulator (nothing picked up from VAULT_* in the environment). */
function clientFor(emulator: TransitEmulator, overrides: { token?: string; namespace?: string; noCustomHTTPVerbs?: boolean } = {}): Client {
  const client = nodeVault({ endpoint: emulator.url, token: 'placeholder', noCustomHTTPVerbs: overrides.noCustomHTTPVerbs ?? false });
  Object.assign(client, { token: overrides.token ?? emulator.token, namespace: overrides.namespace ?? '', pathPrefix: '' });
  return client;
}

/** Resolves to the node-vault rejection (status, message, body); fails if the call succeeded. */
async function failure(promise: Promise<unknown>): Promise<{ status: number; message: string; body: any }> {
  try {
    await promise;
  } catch (error) {
    const e = error as { message: string; response?: { statusCode: number; body: unknown } };
    if (!e.response) throw error;
    return { status: e.response.statusCode, message: e.message, body: e.response.body };
  }
  throw new Error('expected the call to fail');
}

describe('transit emulator', () => {
  let emulator: TransitEmulator;
  let vault: Client;
  const clock = createManualClock(new Date('2026-03-01T00:00:00Z'));
  let keyCounter = 0;
  const keyName = () => `key-${++keyCounter}`;

  beforeAll(async () => {
    emulator = await startTransitEmulator({ clock });
    vault = clientFor(emulator);
  });
  afterAll(async () => {
    await emulator.close();
  });
  afterEach(() => {
    emulator.setFault(undefined);
    emulator.setHealth('active');
  });

  const createDerived = async (name: string) => vault.write(`transit/keys/${name}`, { type: 'aes256-gcm96', derived: true });
  const encrypt = async (name: string, plaintext: string, context?: string, extra: object = {}) =>
    (await vault.write(`transit/encrypt/${name}`, { plaintext: b64(plaintext), ...(context !== undefined ? { context: b64(context) } : {}), ...extra })).data;
  const decrypt = async (name: string, ciphertext: string, context?: string, extra: object = {}) =>
    (await vault.write(`transit/decrypt/${name}`, { ciphertext, ...(context !== undefined ? { context: b64(context) } : {}), ...extra })).data;

  describe('routing, auth and envelopes (§1)', () => {
    it('when a key is written with PUT instead of POST, then it is created the same way', async () => {
      const name = keyName();
      await vault.request({ path: `/transit/keys/${name}`, method: 'PUT', json: { derived: true } });
      expect((await vault.read(`transit/keys/${name}`)).data.derived).toBe(true);
    });

    it('when keys are listed with the LIST verb or GET ?list=true, then both answer the sorted names', async () => {
      await vault.write('transit/keys/zeta', {});
      await vault.write('transit/keys/alpha', {});
      const viaList = await vault.list('transit/keys');
      const viaGet = await clientFor(emulator, { noCustomHTTPVerbs: true }).list('transit/keys');
      expect(viaList.data.keys).toEqual(expect.arrayContaining(['alpha', 'zeta']));
      expect(viaGet.data.keys).toEqual(viaList.data.keys);
      expect([...viaList.data.keys].sort()).toEqual(viaList.data.keys);
    });

    it('when no token, a wrong token or a Bearer token is sent, then 403 permission denied, 403, and success', async () => {
      const missing = await failure(clientFor(emulator, { token: '' }).read('transit/keys/alpha'));
      expect(missing.status).toBe(403);
      expect(missing.body).toEqual({ errors: ['permission denied'] });
      expect((await failure(clientFor(emulator, { token: 'wrong' }).read('transit/keys/alpha'))).status).toBe(403);
      const bearer = await fetch(`${emulator.url}/v1/transit/keys/alpha`, { headers: { authorization: `Bearer ${emulator.token}` } });
      expect(bearer.status).toBe(200);
    });

    it('when a path is unknown or a verb unsupported, then 404 unsupported path and 405', async () => {
      expect(await failure(vault.write('transit/nonsense/x', {}))).toMatchObject({ status: 404, message: expect.stringContaining('unsupported path') });
      expect((await failure(vault.update('transit/keys/alpha', {}))).status).toBe(405); // PATCH
      expect((await failure(vault.delete('transit/encrypt/alpha'))).status).toBe(405);
      expect((await failure(vault.read('transit/keys/bad name!'))).status).toBe(404); // not a key name
    });

    it('when a call succeeds, then the answer is the full success envelope', async () => {
      const body = await vault.read('transit/keys/alpha');
      expect(body).toMatchObject({ lease_id: '', renewable: false, lease_duration: 0, wrap_info: null, warnings: null, auth: null });
      expect(body.request_id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    });

    it('when the body carries unknown parameters, then they are ignored with a warning', async () => {
      const name = keyName();
      const body = await vault.write(`transit/keys/${name}`, { derived: true, colour: 'blue', alpha: 1 });
      expect(body.warnings).toEqual(['Endpoint ignored these unrecognized parameters: [alpha colour]']);
    });

    it('when top-level numbers arrive as strings, then they are accepted', async () => {
      const name = keyName();
      await vault.write(`transit/keys/${name}`, {});
      await vault.write(`transit/keys/${name}/rotate`, {});
      const body = await vault.write(`transit/keys/${name}/config`, { min_decryption_version: '2' });
      expect(body.data.min_decryption_version).toBe(2);
    });

    it('when the body is not JSON, then 400 error parsing JSON', async () => {
      const response = await fetch(`${emulator.url}/v1/transit/keys/${keyName()}`, { method: 'POST', headers: { 'x-vault-token': emulator.token }, body: '{nope' });
      expect(response.status).toBe(400);
      expect(await response.json()).toEqual({ errors: ['error parsing JSON'] });
    });
  });

  describe('key management (§2)', () => {
    it('when a key is created, then it reads back with the exact field set of §2.2', async () => {
      const name = keyName();
      const created = await createDerived(name);
      const read = await vault.read(`transit/keys/${name}`);
      expect(created.data).toEqual(read.data); // ≥ 1.14: create answers the key body
      expect(Object.keys(read.data).sort()).toEqual(
        [
          'allow_plaintext_backup', 'auto_rotate_period', 'convergent_encryption', 'deletion_allowed', 'derived', 'exportable',
          'imported_key', 'kdf', 'keys', 'latest_version', 'min_available_version', 'min_decryption_version', 'min_encryption_version',
          'name', 'supports_decryption', 'supports_derivation', 'supports_encryption', 'supports_signing', 'type',
        ].sort(),
      );
      expect(read.data).toMatchObject({
        name, type: 'aes256-gcm96', derived: true, kdf: 'hkdf_sha256', convergent_encryption: false, latest_version: 1,
        min_decryption_version: 1, min_encryption_version: 0, min_available_version: 0, deletion_allowed: false, auto_rotate_period: 0,
      });
      expect(read.data.keys).toEqual({ '1': Math.floor(clock.now().getTime() / 1000) });
    });

    it('when a non-derived key is read, then kdf and convergent_encryption are absent', async () => {
      const name = keyName();
      await vault.write(`transit/keys/${name}`, {});
      const { data } = await vault.read(`transit/keys/${name}`);
      expect(data.derived).toBe(false);
      expect(data).not.toHaveProperty('kdf');
      expect(data).not.toHaveProperty('convergent_encryption');
    });

    it('when an existing name is created again with other settings, then nothing changes and a warning says so', async () => {
      const name = keyName();
      await createDerived(name);
      const again = await vault.write(`transit/keys/${name}`, { type: 'chacha20-poly1305', derived: false });
      expect(again.warnings).toEqual([`key ${name} already existed`]);
      expect(again.data).toMatchObject({ type: 'aes256-gcm96', derived: true });
    });

    it('when create gets a bad type, period or convergent without derived, then 400 with the server messages', async () => {
      expect((await failure(vault.write(`transit/keys/${keyName()}`, { type: 'des' }))).message).toBe('unknown key type des');
      expect((await failure(vault.write(`transit/keys/${keyName()}`, { auto_rotate_period: '30m' }))).message).toBe(
        'auto rotate period must be 0 to disable or at least an hour',
      );
      expect((await failure(vault.write(`transit/keys/${keyName()}`, { convergent_encryption: true }))).message).toBe(
        'convergent encryption requires derivation to be enabled',
      );
      expect((await failure(vault.write(`transit/keys/${keyName()}`, { key_size: 64 }))).message).toBe('key_size is not valid for algorithm aes256-gcm96');
    });

    it('when auto_rotate_period is a duration string, then it reads back in integer seconds', async () => {
      const name = keyName();
      const { data } = await vault.write(`transit/keys/${name}`, { auto_rotate_period: '8760h' });
      expect(data.auto_rotate_period).toBe(8760 * 3600);
      expect((await vault.write(`transit/keys/${keyName()}`, { auto_rotate_period: '365d' })).data.auto_rotate_period).toBe(365 * 86_400);
    });

    it('when a missing key is read, then 404 with an empty errors list', async () => {
      const missing = await failure(vault.read('transit/keys/does-not-exist'));
      expect(missing).toMatchObject({ status: 404, body: { errors: [] } });
    });

    it('when a key is rotated, then the new version has the clock time, min versions stay and old blobs decrypt', async () => {
      const name = keyName();
      await createDerived(name);
      const old = await encrypt(name, 'material', 'row-1');
      clock.advance(86_400_000);
      const rotated = await vault.write(`transit/keys/${name}/rotate`, {});
      expect(rotated.data).toMatchObject({ latest_version: 2, min_decryption_version: 1, min_encryption_version: 0 });
      expect(rotated.data.keys['2']).toBe(Math.floor(clock.now().getTime() / 1000));
      expect((await encrypt(name, 'x', 'row-1')).ciphertext).toMatch(/^vault:v2:/);
      expect(Buffer.from((await decrypt(name, old.ciphertext, 'row-1')).plaintext, 'base64').toString()).toBe('material');
    });

    it('when config breaks any rule, then 400 with the exact message and nothing is applied', async () => {
      const name = keyName();
      await createDerived(name);
      await vault.write(`transit/keys/${name}/rotate`, {});
      await vault.write(`transit/keys/${name}/rotate`, {});
      const cases: Array<[object, string]> = [
        [{ min_decryption_version: -1 }, 'min decryption version cannot be negative'],
        [{ min_encryption_version: -1 }, 'min encryption version cannot be negative'],
        [{ min_decryption_version: 4 }, 'cannot set min decryption version of 4, latest key version is 3'],
        [{ min_encryption_version: 4 }, 'cannot set min encryption version of 4, latest key version is 3'],
        [
          { min_decryption_version: 3, min_encryption_version: 2, deletion_allowed: true },
          'cannot set min encryption/decryption values; min encryption version of 2 must be greater than or equal to min decryption version of 3',
        ],
        [{ auto_rotate_period: 59 }, 'auto rotate period must be 0 to disable or at least an hour'],
      ];
      for (const [body, message] of cases) {
        expect(await failure(vault.write(`transit/keys/${name}/config`, body))).toMatchObject({ status: 400, message });
      }
      expect((await vault.read(`transit/keys/${name}`)).data).toMatchObject({ min_decryption_version: 1, min_encryption_version: 0, deletion_allowed: false });
      expect((await failure(vault.write('transit/keys/nope/config', {}))).message).toBe('no existing key named nope could be found');
    });

    it('when min_decryption_version is raised and lowered, then versions leave and come back to keys; 0 becomes 1 with a warning', async () => {
      const name = keyName();
      await createDerived(name);
      await vault.write(`transit/keys/${name}/rotate`, {});
      await vault.write(`transit/keys/${name}/rotate`, {});
      const raised = await vault.write(`transit/keys/${name}/config`, { min_decryption_version: 3 });
      expect(Object.keys(raised.data.keys)).toEqual(['3']);
      const lowered = await vault.write(`transit/keys/${name}/config`, { min_decryption_version: 0 });
      expect(lowered.warnings).toEqual(['since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1']);
      expect(Object.keys(lowered.data.keys)).toEqual(['1', '2', '3']);
    });

    it('when exportable is switched on, then it cannot be switched off', async () => {
      const name = keyName();
      await createDerived(name);
      await vault.write(`transit/keys/${name}/config`, { exportable: true });
      expect((await failure(vault.write(`transit/keys/${name}/config`, { exportable: false }))).status).toBe(400);
      expect((await vault.read(`transit/keys/${name}`)).data.exportable).toBe(true);
    });

    it('when trim is asked with the default min_encryption_version 0, then it is refused; after config it deletes versions for good', async () => {
      const name = keyName();
      await createDerived(name);
      const v1 = await encrypt(name, 'one', 'ctx');
      await vault.write(`transit/keys/${name}/rotate`, {});
      await vault.write(`transit/keys/${name}/rotate`, {});
      expect((await failure(vault.write(`transit/keys/${name}/trim`, { min_available_version: 2 }))).message).toBe(
        'minimum available version cannot be set when minimum encryption version is not set',
      );
      expect((await failure(vault.write(`transit/keys/${name}/trim`, {}))).message).toBe('missing min_available_version');
      await vault.write(`transit/keys/${name}/config`, { min_decryption_version: 2, min_encryption_version: 2 });
      expect((await failure(vault.write(`transit/keys/${name}/trim`, { min_available_version: 3 }))).message).toBe(
        'minimum available version cannot be greater than minmum encryption version',
      );
      const trimmed = await vault.write(`transit/keys/${name}/trim`, { min_available_version: 2 });
      expect(trimmed.data.min_available_version).toBe(2);
      expect((await failure(vault.write(`transit/keys/${name}/config`, { min_decryption_version: 1 }))).message).toBe(
        'min decryption version should not be less then min available version',
      );
      expect((await failure(vault.write(`transit/keys/${name}/trim`, { min_available_version: 1 }))).message).toBe(
        'minimum available version cannot be decremented',
      );
      expect((await failure(decrypt(name, v1.ciphertext, 'ctx'))).message).toBe('ciphertext or signature version is disallowed by policy (too old)');
      expect((await failure(vault.write('transit/keys/nope/trim', { min_available_version: 1 }))).message).toBe('invalid key name');
    });

    it('when a key is deleted, then 400 until deletion_allowed, then 204, 404 on read, and encrypt upserts a new key', async () => {
      const name = keyName();
      await createDerived(name);
      const blob = await encrypt(name, 'gone', 'ctx');
      expect((await failure(vault.delete(`transit/keys/${name}`))).message).toBe(`error deleting policy ${name}: deletion is not allowed for this key`);
      await vault.write(`transit/keys/${name}/config`, { deletion_allowed: true });
      const response = await fetch(`${emulator.url}/v1/transit/keys/${name}`, { method: 'DELETE', headers: { 'x-vault-token': emulator.token } });
      expect(response.status).toBe(204);
      expect(await response.text()).toBe('');
      expect((await failure(vault.read(`transit/keys/${name}`))).status).toBe(404);
      expect((await failure(vault.delete(`transit/keys/${name}`))).message).toBe(`error deleting policy ${name}: could not delete key; not found`);
      await encrypt(name, 'new', 'ctx');
      expect((await failure(decrypt(name, blob.ciphertext, 'ctx'))).message).toBe('cipher: message authentication failed');
    });

    it('when an operation other than encrypt names an unknown key, then 400 (not 404) and no key is created', async () => {
      const name = keyName();
      const blob = 'vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA';
      expect((await failure(vault.write(`transit/decrypt/${name}`, { ciphertext: blob }))).message).toBe('encryption key not found');
      expect((await failure(vault.write(`transit/rewrap/${name}`, { ciphertext: blob }))).message).toBe('encryption key not found');
      expect((await failure(vault.write(`transit/datakey/plaintext/${name}`, {}))).message).toBe('encryption key not found');
      expect((await failure(vault.write(`transit/keys/${name}/rotate`, {}))).message).toBe('key not found');
      expect((await failure(vault.read(`transit/keys/${name}`))).status).toBe(404);
    });
  });

  describe('encrypt, decrypt and the wire format (§3–§5, §10)', () => {
    it('when material is encrypted, then the blob is vault:v1: + base64(12-byte nonce ‖ ct ‖ 16-byte tag), fresh each time', async () => {
      const name = keyName();
      await createDerived(name);
      const first = await encrypt(name, 'sixteen byte key', 'ctx');
      const second = await encrypt(name, 'sixteen byte key', 'ctx');
      expect(first).toEqual({ ciphertext: expect.stringMatching(/^vault:v1:[A-Za-z0-9+/]+={0,2}$/), key_version: 1 });
      expect(Buffer.from(first.ciphertext.slice('vault:v1:'.length), 'base64')).toHaveLength(28 + 16);
      expect(second.ciphertext).not.toBe(first.ciphertext);
    });

    it('when plaintext is empty, then it encrypts and decrypts back to empty', async () => {
      const name = keyName();
      await createDerived(name);
      const { ciphertext } = await encrypt(name, '', 'ctx');
      expect((await decrypt(name, ciphertext, 'ctx')).plaintext).toBe('');
    });

    it('when base64 is URL-safe, unpadded or has trailing bytes, then illegal base64 data at input byte N; newlines are skipped', async () => {
      const name = keyName();
      await createDerived(name);
      const bad = async (plaintext: string) => (await failure(vault.write(`transit/encrypt/${name}`, { plaintext, context: b64('c') }))).message;
      expect(await bad('ab-c')).toBe('illegal base64 data at input byte 2');
      expect(await bad('YWJj\nZA')).toBe('illegal base64 data at input byte 5');
      expect(await bad('YQ=')).toBe('illegal base64 data at input byte 3');
      expect(await bad('YQ==YQ==')).toBe('illegal base64 data at input byte 4');
      const ok = await vault.write(`transit/encrypt/${name}`, { plaintext: 'YW\r\nJj', context: b64('c') });
      expect(Buffer.from((await decrypt(name, ok.data.ciphertext, 'c')).plaintext, 'base64').toString()).toBe('abc');
      expect(decodeGoBase64('YWJj\nZA==').toString()).toBe('abcd');
    });

    it('when encrypt names an unknown key, then it is created, derived only if a context was sent', async () => {
      const withContext = keyName();
      const without = keyName();
      await encrypt(withContext, 'x', 'ctx');
      await encrypt(without, 'x');
      expect((await vault.read(`transit/keys/${withContext}`)).data).toMatchObject({ derived: true, type: 'aes256-gcm96', deletion_allowed: false });
      expect((await vault.read(`transit/keys/${without}`)).data.derived).toBe(false);
    });

    it('when disable_upsert is set, then encrypt on an unknown key answers 400 encryption key not found', async () => {
      const other = await startTransitEmulator();
      try {
        const client = clientFor(other);
        await client.write('transit/config/keys', { disable_upsert: true });
        expect((await client.read('transit/config/keys')).data).toEqual({ disable_upsert: true });
        expect((await failure(client.write('transit/encrypt/nope', { plaintext: b64('x') }))).message).toBe('encryption key not found');
      } finally {
        await other.close();
      }
    });

    it('when a derived key gets no context, a wrong context, or a non-derived key gets one, then missing context, auth failure, ignored', async () => {
      const name = keyName();
      await createDerived(name);
      expect((await failure(encrypt(name, 'x'))).message).toMatch(/^missing 'context' for key derivation; the key was created using a derived key/);
      const blob = await encrypt(name, 'x', 'row-1');
      expect((await failure(decrypt(name, blob.ciphertext, 'row-2'))).message).toBe('cipher: message authentication failed');
      expect((await failure(decrypt(name, blob.ciphertext))).message).toMatch(/^missing 'context'/);
      const plain = keyName();
      await vault.write(`transit/keys/${plain}`, {});
      const ignored = await encrypt(plain, 'y', 'any');
      expect(Buffer.from((await decrypt(plain, ignored.ciphertext, 'other')).plaintext, 'base64').toString()).toBe('y');
    });

    it('when ciphertexts are malformed, then decrypt answers the §5 messages in order', async () => {
      const name = keyName();
      await createDerived(name);
      const cases: Array<[string, string]> = [
        ['local:v1:abcd', 'invalid ciphertext: no prefix'],
        ['vault:v1', 'invalid ciphertext: wrong number of fields'],
        ['vault:vX:abcd', 'invalid ciphertext: version number could not be decoded'],
        ['vault:v9:abcd', 'invalid ciphertext: version is too new'],
        ['vault:v1:ab-d', 'invalid ciphertext: could not decode base64'],
        ['vault:v1:AAAA', 'invalid ciphertext length'],
        [`vault:v1:${Buffer.alloc(40).toString('base64')}`, 'cipher: message authentication failed'],
      ];
      for (const [ciphertext, message] of cases) {
        expect(await failure(decrypt(name, ciphertext, 'ctx'))).toMatchObject({ status: 400, message });
      }
      expect((await failure(vault.write(`transit/decrypt/${name}`, { ciphertext: '' }))).message).toBe('missing ciphertext to decrypt');
    });

    it('when a blob says v0, then it is read as v1; below min_decryption_version it is too old', async () => {
      const name = keyName();
      await createDerived(name);
      const blob = await encrypt(name, 'zero', 'ctx');
      const v0 = blob.ciphertext.replace('vault:v1:', 'vault:v0:');
      expect(Buffer.from((await decrypt(name, v0, 'ctx')).plaintext, 'base64').toString()).toBe('zero');
      await vault.write(`transit/keys/${name}/rotate`, {});
      await vault.write(`transit/keys/${name}/config`, { min_decryption_version: 2 });
      expect((await failure(decrypt(name, blob.ciphertext, 'ctx'))).message).toBe('ciphertext or signature version is disallowed by policy (too old)');
    });

    it('when a bit of nonce, ciphertext or tag is flipped, then cipher: message authentication failed', async () => {
      const name = keyName();
      await createDerived(name);
      const { ciphertext } = await encrypt(name, 'tamper me please', 'ctx');
      const body = Buffer.from(ciphertext.slice('vault:v1:'.length), 'base64');
      for (const index of [0, 12, body.length - 1]) {
        const copy = Buffer.from(body);
        copy[index]! ^= 0x01;
        expect((await failure(decrypt(name, `vault:v1:${copy.toString('base64')}`, 'ctx'))).message).toBe('cipher: message authentication failed');
      }
    });

    it('when encrypt asks for a key_version, then negative, too high, below min_encryption and archived versions are refused', async () => {
      const name = keyName();
      await createDerived(name);
      for (let i = 0; i < 3; i++) await vault.write(`transit/keys/${name}/rotate`, {});
      expect((await encrypt(name, 'x', 'c', { key_version: 2 })).key_version).toBe(2);
      expect((await failure(encrypt(name, 'x', 'c', { key_version: -1 }))).message).toBe('requested version for encryption is negative');
      expect((await failure(encrypt(name, 'x', 'c', { key_version: 5 }))).message).toBe('requested version for encryption is higher than the latest key version');
      await vault.write(`transit/keys/${name}/config`, { min_decryption_version: 2 });
      expect((await failure(encrypt(name, 'x', 'c', { key_version: 1 }))).message).toBe('no such key version');
      await vault.write(`transit/keys/${name}/config`, { min_encryption_version: 3 });
      expect((await failure(encrypt(name, 'x', 'c', { key_version: 2 }))).message).toBe(
        'requested version for encryption is less than the minimum encryption key version',
      );
    });

    it('when associated_data is used, then decrypt needs it, rewrap cannot authenticate it, and bad base64 AAD is a 500', async () => {
      const name = keyName();
      await createDerived(name);
      const aad = b64('row binding');
      const blob = await encrypt(name, 'with aad', 'ctx', { associated_data: aad });
      expect(Buffer.from((await decrypt(name, blob.ciphertext, 'ctx', { associated_data: aad })).plaintext, 'base64').toString()).toBe('with aad');
      expect((await failure(decrypt(name, blob.ciphertext, 'ctx'))).message).toBe('cipher: message authentication failed');
      expect((await failure(vault.write(`transit/rewrap/${name}`, { ciphertext: blob.ciphertext, context: b64('ctx') }))).message).toBe(
        'cipher: message authentication failed',
      );
      const broken = await failure(encrypt(name, 'x', 'ctx', { associated_data: 'not base64!' }));
      expect(broken.status).toBe(500);
      expect(broken.message).toMatch(/^unable to get associated_data\/additional_data from factory\[0\]: illegal base64/);
    });

    it('when a convergent key encrypts the same input twice, then the blobs are equal', async () => {
      const name = keyName();
      await vault.write(`transit/keys/${name}`, { derived: true, convergent_encryption: true });
      const a = await encrypt(name, 'same', 'ctx');
      const b = await encrypt(name, 'same', 'ctx');
      expect(a.ciphertext).toBe(b.ciphertext);
      expect((await vault.read(`transit/keys/${name}`)).data.convergent_encryption_version).toBe(3);
    });

    it('when keys are aes128-gcm96 or chacha20-poly1305, then they round-trip too', async () => {
      for (const type of ['aes128-gcm96', 'chacha20-poly1305']) {
        const name = keyName();
        await vault.write(`transit/keys/${name}`, { type, derived: true });
        const blob = await encrypt(name, type, 'ctx');
        expect(Buffer.from((await decrypt(name, blob.ciphertext, 'ctx')).plaintext, 'base64').toString()).toBe(type);
      }
    });
  });

  describe('batches (§6, §7)', () => {
    const items = (n: number) => Array.from({ length: n }, (_, i) => ({ plaintext: b64(`item-${i}`), context: b64(`row-${i}`), reference: `ref-${i}` }));

    it('when every item of a batch encrypt succeeds, then 200 with one result per item in order, reference always present', async () => {
      const name = keyName();
      await createDerived(name);
      const { data } = await vault.write(`transit/encrypt/${name}`, { batch_input: [...items(3), { plaintext: b64('x'), context: b64('y') }] });
      expect(data.batch_results).toHaveLength(4);
      expect(data.batch_results[0]).toEqual({ ciphertext: expect.stringMatching(/^vault:v1:/), key_version: 1, reference: 'ref-0' });
      expect(data.batch_results[3].reference).toBe('');
      const decrypted = await vault.write(`transit/decrypt/${name}`, {
        batch_input: data.batch_results.slice(0, 3).map((r: { ciphertext: string }, i: number) => ({ ciphertext: r.ciphertext, context: b64(`row-${i}`) })),
      });
      expect(decrypted.data.batch_results.map((r: { plaintext: string }) => Buffer.from(r.plaintext, 'base64').toString())).toEqual(['item-0', 'item-1', 'item-2']);
    });

    it('when one batch encrypt item is bad, then 400 with the success envelope, no errors key, per-item error', async () => {
      const name = keyName();
      await createDerived(name);
      const batch = items(3);
      batch[1] = { ...batch[1]!, plaintext: 'not base64!' };
      const rejected = await failure(vault.write(`transit/encrypt/${name}`, { batch_input: batch }));
      expect(rejected.status).toBe(400);
      expect(rejected.message).toBe('Status 400');
      expect(rejected.body).not.toHaveProperty('errors');
      expect(rejected.body.data.batch_results[1]).toEqual({ error: 'illegal base64 data at input byte 3', reference: 'ref-1' });
      expect(rejected.body.data.batch_results[0].ciphertext).toMatch(/^vault:v1:/);
    });

    it('when partial_failure_response_code is set, then it replaces 400 only when at least one item succeeded', async () => {
      const name = keyName();
      await createDerived(name);
      const partial = await vault.write(`transit/encrypt/${name}`, {
        batch_input: [{ plaintext: b64('ok'), context: b64('c') }, { plaintext: '!', context: b64('c') }],
        partial_failure_response_code: 200,
      });
      expect(partial.data.batch_results[1].error).toMatch(/illegal base64/);
      const allBad = await failure(
        vault.write(`transit/encrypt/${name}`, { batch_input: [{ plaintext: '!', context: b64('c') }], partial_failure_response_code: 200 }),
      );
      expect(allBad.status).toBe(400);
    });

    it('when one batch decrypt item fails, then 400 and the failed item still carries an empty plaintext', async () => {
      const name = keyName();
      await createDerived(name);
      const blob = await encrypt(name, 'fine', 'row-0');
      const rejected = await failure(
        vault.write(`transit/decrypt/${name}`, {
          batch_input: [
            { ciphertext: blob.ciphertext, context: b64('row-0') },
            { ciphertext: blob.ciphertext, context: b64('row-9'), reference: 'moved' },
            { ciphertext: '', context: b64('row-0') },
          ],
        }),
      );
      expect(rejected.status).toBe(400);
      expect(rejected.body.data.batch_results).toEqual([
        { plaintext: b64('fine'), reference: '' },
        { plaintext: '', error: 'cipher: message authentication failed', reference: 'moved' },
        { plaintext: '', error: 'missing ciphertext to decrypt', reference: '' },
      ]);
    });

    it('when a batch is empty, mixes context, or lacks the plaintext field, then 400, 400 and 500', async () => {
      const name = keyName();
      await createDerived(name);
      expect(await failure(vault.write(`transit/encrypt/${name}`, { batch_input: [] }))).toMatchObject({ status: 400, message: 'missing batch input to process' });
      expect(
        await failure(vault.write(`transit/encrypt/${name}`, { batch_input: [{ plaintext: b64('a'), context: b64('c') }, { plaintext: b64('b') }] })),
      ).toMatchObject({ status: 400, message: 'context should be set either in all the request blocks or in none' });
      const missing = await failure(vault.write(`transit/encrypt/${name}`, { batch_input: [{ context: b64('c') }] }));
      expect(missing.status).toBe(500);
      expect(missing.message).toContain("'[0].plaintext' missing plaintext to encrypt");
      const wrongType = await failure(vault.write(`transit/encrypt/${name}`, { batch_input: [{ plaintext: b64('a'), context: b64('c'), key_version: '1' }] }));
      expect(wrongType.status).toBe(500);
      const decryptMissing = await failure(vault.write(`transit/decrypt/${name}`, { batch_input: [{ context: b64('c') }] }));
      expect(decryptMissing.message).toContain("'[0].ciphertext' missing ciphertext to decrypt");
    });

    it('when a batch rewrap has failing items, then 200 with per-item errors, new blobs differ and an explicit key_version is honoured', async () => {
      const name = keyName();
      await createDerived(name);
      const v1 = await encrypt(name, 'rewrap me', 'row-1');
      await vault.write(`transit/keys/${name}/rotate`, {});
      await vault.write(`transit/keys/${name}/rotate`, {});
      const { data } = await vault.write(`transit/rewrap/${name}`, {
        batch_input: [
          { ciphertext: v1.ciphertext, context: b64('row-1') },
          { ciphertext: v1.ciphertext, context: b64('row-2'), reference: 'wrong row' },
          { ciphertext: v1.ciphertext, context: b64('row-1'), key_version: 2 },
        ],
      });
      expect(data.batch_results[0]).toEqual({ ciphertext: expect.stringMatching(/^vault:v3:/), key_version: 3, reference: '' });
      expect(data.batch_results[1]).toEqual({ error: 'cipher: message authentication failed', reference: 'wrong row' });
      expect(data.batch_results[2]).toMatchObject({ ciphertext: expect.stringMatching(/^vault:v2:/), key_version: 2 });
      const again = await vault.write(`transit/rewrap/${name}`, { ciphertext: data.batch_results[0].ciphertext, context: b64('row-1') });
      expect(again.data.ciphertext).not.toBe(data.batch_results[0].ciphertext); // always re-encrypted, never a no-op
      expect(Buffer.from((await decrypt(name, again.data.ciphertext, 'row-1')).plaintext, 'base64').toString()).toBe('rewrap me');
    });

    // CPU time of this process (the emulator and its node-vault client both run here), not wall
    // time: on the shared 2-core machine other work takes the cores, and a wall-clock rate then
    // measures the machine (it failed at ~3,800/s under a load average of 9, before and after).
    it('when 10,000 blobs are rewrapped in batches of 250, then the emulator keeps well above 5,000 blobs per CPU second', async () => {
      const name = keyName();
      await createDerived(name);
      const inputs = Array.from({ length: 10_000 }, (_, i) => ({ plaintext: b64(Buffer.alloc(32, i % 256)), context: b64(`keystrata:v1|group|g-${i}|1|kek|k|1`) }));
      const blobs: string[] = [];
      for (let i = 0; i < inputs.length; i += 1000) {
        const { data } = await vault.write(`transit/encrypt/${name}`, { batch_input: inputs.slice(i, i + 1000) });
        blobs.push(...data.batch_results.map((r: { ciphertext: string }) => r.ciphertext));
      }
      await vault.write(`transit/keys/${name}/rotate`, {});
      const started = performance.now();
      const cpu = process.cpuUsage();
      let rewrapped = 0;
      for (let i = 0; i < blobs.length; i += 250) {
        const { data } = await vault.write(`transit/rewrap/${name}`, {
          batch_input: blobs.slice(i, i + 250).map((ciphertext, j) => ({ ciphertext, context: inputs[i + j]!.context })),
        });
        rewrapped += data.batch_results.filter((r: { key_version?: number }) => r.key_version === 2).length;
      }
      const used = process.cpuUsage(cpu);
      const perCpuSecond = rewrapped / ((used.user + used.system) / 1e6);
      const perSecond = rewrapped / ((performance.now() - started) / 1000);
      expect(rewrapped).toBe(10_000);
      expect(perCpuSecond, `${Math.round(perCpuSecond)} blobs per CPU second (${Math.round(perSecond)} blobs/s of wall time)`).toBeGreaterThan(5_000);
    });
  });

  describe('datakey (§8)', () => {
    it('when a plaintext datakey is asked, then its ciphertext decrypts to the returned plaintext', async () => {
      const name = keyName();
      await createDerived(name);
      const { data } = await vault.write(`transit/datakey/plaintext/${name}`, { context: b64('ctx'), bits: 512 });
      expect(Buffer.from(data.plaintext, 'base64')).toHaveLength(64);
      expect((await decrypt(name, data.ciphertext, 'ctx')).plaintext).toBe(data.plaintext);
      const wrapped = await vault.write(`transit/datakey/wrapped/${name}`, { context: b64('ctx') });
      expect(wrapped.data).not.toHaveProperty('plaintext');
      expect((await failure(vault.write(`transit/datakey/other/${name}`, {}))).message).toBe("Invalid path, must be 'plaintext' or 'wrapped'");
      expect((await failure(vault.write(`transit/datakey/plaintext/${name}`, { context: b64('ctx'), bits: 100 }))).message).toBe('invalid bit length');
    });
  });

  describe('auto-rotation (§11)', () => {
    it('when the period has not passed since the latest version, then tick() rotates nothing; once it has, it rotates', async () => {
      const name = keyName();
      await vault.write(`transit/keys/${name}`, { derived: true, auto_rotate_period: '1h' });
      clock.advance(59 * 60_000);
      expect(emulator.tick()).toBe(0);
      clock.advance(60_000);
      expect(emulator.tick()).toBeGreaterThanOrEqual(1);
      expect((await vault.read(`transit/keys/${name}`)).data.latest_version).toBe(2);
    });
  });

  describe('sys/health and sealing (§12)', () => {
    it('when the emulator is active, standby, uninitialised or sealed, then sys/health answers 200, 429, 501, 503 without a token', async () => {
      const status = async (query = '') => (await fetch(`${emulator.url}/v1/sys/health${query}`)).status;
      expect(await status()).toBe(200);
      const body = await (await fetch(`${emulator.url}/v1/sys/health`)).json();
      expect(body).toMatchObject({ initialized: true, sealed: false, standby: false });
      emulator.setHealth('standby');
      expect(await status()).toBe(429);
      expect(await status('?standbyok=true')).toBe(200);
      emulator.setHealth('uninitialized');
      expect(await status()).toBe(501);
      emulator.setHealth('sealed');
      expect(await status()).toBe(503);
      expect(await status('?sealedcode=200')).toBe(200);
      expect((await fetch(`${emulator.url}/v1/sys/health`, { method: 'HEAD' })).status).toBe(503);
    });

    it('when sealed, then every other path answers 503 Vault is sealed', async () => {
      emulator.setHealth('sealed');
      expect(await failure(vault.read('transit/keys/alpha'))).toMatchObject({ status: 503, message: 'Vault is sealed' });
      // node-vault resolves sys/health whatever the status: the body tells
      expect((await vault.health()).sealed).toBe(true);
    });
  });

  describe('fault injection (§16.23)', () => {
    it('when a 503 or 429 fault is set for a path pattern, then only matching paths fail, and `times` limits it', async () => {
      const name = keyName();
      await createDerived(name);
      emulator.setFault({ kind: 'status', status: 503, path: /\/encrypt\//, times: 1 });
      expect((await failure(encrypt(name, 'x', 'c'))).status).toBe(503);
      expect((await encrypt(name, 'x', 'c')).key_version).toBe(1);
      emulator.setFault({ kind: 'status', status: 429, path: 'keys/' });
      expect(await failure(vault.read(`transit/keys/${name}`))).toMatchObject({ status: 429, message: expect.stringContaining('rate limit quota exceeded') });
    });

    it('when a delay, garbage or drop fault is set, then calls are slow, unparseable or cut off', async () => {
      emulator.setFault({ kind: 'delay', ms: 150 });
      const started = performance.now();
      await vault.read('transit/keys/alpha');
      expect(performance.now() - started).toBeGreaterThanOrEqual(140);
      emulator.setFault({ kind: 'garbage' });
      expect(typeof (await vault.read('transit/keys/alpha'))).toBe('string');
      emulator.setFault({ kind: 'drop' });
      await expect(vault.read('transit/keys/alpha')).rejects.toMatchObject({ code: expect.stringMatching(/ECONNRESET|ERR_BAD_RESPONSE|ECONNABORTED/) });
    });
  });

  describe('options', () => {
    let other: TransitEmulator | undefined;
    const start = async (options: TransitEmulatorOptions) => (other = await startTransitEmulator(options));
    beforeEach(() => {
      other = undefined;
    });
    afterEach(async () => {
      await other?.close();
    });

    it('when legacy204 is set, then create, rotate and config answer a bare 204', async () => {
      const emu = await start({ legacy204: true });
      const client = clientFor(emu);
      expect(await client.write('transit/keys/k', { derived: true })).toBe('');
      expect(await client.write('transit/keys/k/rotate', {})).toBe('');
      expect((await client.read('transit/keys/k')).data.latest_version).toBe(2);
    });

    it('when another mount is configured, then the paths live under it and transit/ is not served', async () => {
      const emu = await start({ mount: 'kms/transit' });
      const client = clientFor(emu);
      await client.write('kms/transit/keys/k', { derived: true });
      expect((await client.read('kms/transit/keys/k')).data.name).toBe('k');
      expect((await failure(client.read('transit/keys/k'))).status).toBe(404);
    });

    it('when requests carry different namespaces, then each namespace has its own keys', async () => {
      const emu = await start({});
      await clientFor(emu, { namespace: 'team-a/' }).write('transit/keys/k', {});
      expect((await failure(clientFor(emu, { namespace: 'team-b/' }).read('transit/keys/k'))).status).toBe(404);
      expect((await clientFor(emu, { namespace: 'team-a' }).read('transit/keys/k')).data.name).toBe('k');
    });

    it('when the flavor is vault or openbao, then mount_type, nonce and soft_deleted follow that server', async () => {
      const vaultEmu = await start({ flavor: 'vault' });
      const client = clientFor(vaultEmu);
      const created = await client.write('transit/keys/k', { derived: true });
      expect(created.mount_type).toBe('transit');
      expect((await failure(client.write('transit/encrypt/k', { plaintext: b64('x'), context: b64('c'), nonce: b64('123456789012') }))).message).toBe(
        'provided nonce not allowed for this key',
      );
      await vaultEmu.close();
      const bao = await start({ flavor: 'openbao' });
      const baoCreated = await clientFor(bao).write('transit/keys/k', {});
      expect(baoCreated.data.soft_deleted).toBe(false);
      expect(baoCreated).not.toHaveProperty('mount_type');
    });
  });
});
