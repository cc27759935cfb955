import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { createPrivateKey, generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { exportJWK, generateKeyPair, SignJWT, type JWTPayload } from 'jose';
import {
  AuthenticationError,
  AuthUnavailableError,
  createAuthenticator,
  type AuthFailureReason,
  type Authenticator,
} from '../../src/auth/authenticator.js';
import { ISSUER_KEY_FILE, loadOrCreateDevIssuer, parseTtl, type DevIssuer } from '../../src/auth/dev-issuer.js';
import { canReachGroup, hasScope, type Principal, type Scope } from '../../src/auth/principal.js';

const ISSUER = 'keystrata-dev';
const AUDIENCE = 'keystrata';
const now = (): number => Math.floor(Date.now() / 1000);
const b64url = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url');

const tempDirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'keystrata-auth-'));
  tempDirs.push(dir);
  return dir;
}
afterAll(async () => {
  await Promise.all(tempDirs.map((dir) => fs.rm(dir, { recursive: true, force: true })));
});

/** Expects a 401 with this reason, a generic message, and nothing of the token anywhere. */
async function expectRefused(promise: Promise<unknown>, reason: AuthFailureReason, token?: string): Promise<void> {
  const error = await promise.then(
    () => expect.unreachable('the token was accepted'),
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(AuthenticationError);
  const authError = error as AuthenticationError;
  expect(authError.status).toBe(401);
  expect(authError.code).toBe('unauthorized');
  expect(authError.reason).toBe(reason);
  expect(authError.message).toBe('A valid bearer token is required');
  expect(authError.extra).toEqual({}); // extra goes to the client: the reason must not
  if (token !== undefined) {
    const everything = `${authError.message} ${authError.stack ?? ''} ${JSON.stringify(authError)}`;
    for (const part of token.split('.').filter((p) => p.length > 8)) expect(everything).not.toContain(part);
  }
}

describe('embedded default: tokens of the local development issuer', () => {
  let dataDir: string;
  let issuer: DevIssuer;
  let auth: Authenticator;
  let devKey: KeyObject;

  /** Signs arbitrary claims with the dev issuer's own private key. */
  const signWithDevKey = (claims: JWTPayload, header: Record<string, unknown> = {}): Promise<string> =>
    new SignJWT(claims).setProtectedHeader({ alg: 'EdDSA', typ: 'JWT', kid: issuer.kid, ...header }).sign(devKey);
  const goodClaims = (overrides: JWTPayload = {}): JWTPayload => ({
    iss: ISSUER,
    aud: AUDIENCE,
    sub: 'backend-1',
    iat: now(),
    exp: now() + 600,
    scope: 'keystrata:keys:read',
    keystrata_groups: ['g1'],
    ...overrides,
  });

  beforeAll(async () => {
    dataDir = await tempDir();
    auth = await createAuthenticator({ jwksUrl: undefined, issuer: ISSUER, audience: AUDIENCE, clockToleranceSeconds: 30, dataDir });
    issuer = await loadOrCreateDevIssuer(dataDir);
    const stored = JSON.parse(await fs.readFile(path.join(dataDir, ISSUER_KEY_FILE), 'utf8')) as Record<string, string>;
    devKey = createPrivateKey({ key: stored, format: 'jwk' });
  });

  it('when a minted token is valid, then authenticate returns its principal', async () => {
    const token = await issuer.mintToken({
      sub: 'backend-1',
      scopes: ['keystrata:keys:read', 'keystrata:audit:read'],
      groups: ['g1', 'g2'],
      ttlSeconds: 3600,
      issuer: ISSUER,
      audience: AUDIENCE,
    });
    const principal = await auth.authenticate(`Bearer ${token}`);
    expect(principal.sub).toBe('backend-1');
    expect([...principal.scopes].sort()).toEqual(['keystrata:audit:read', 'keystrata:keys:read']);
    expect([...principal.groups].sort()).toEqual(['g1', 'g2']);
    expect(principal.tokenId).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('when a minted token is decoded, then it carries EdDSA, kid, iss, aud, sub, iat, exp, jti, scope and keystrata_groups', async () => {
    const token = await issuer.mintToken({ sub: 'ops', scopes: ['keystrata:admin'], ttlSeconds: 60, issuer: ISSUER, audience: AUDIENCE });
    const [header, payload] = token.split('.').slice(0, 2).map((p) => JSON.parse(Buffer.from(p, 'base64url').toString('utf8')));
    expect(header).toEqual({ alg: 'EdDSA', typ: 'JWT', kid: issuer.kid });
    expect(payload).toMatchObject({ iss: ISSUER, aud: AUDIENCE, sub: 'ops', scope: 'keystrata:admin', keystrata_groups: [] });
    expect(payload.exp - payload.iat).toBe(60);
    expect(typeof payload.jti).toBe('string');
  });

  it('when the scheme is written in another case, then the token is still accepted', async () => {
    const token = await signWithDevKey(goodClaims());
    await expect(auth.authenticate(`bearer ${token}`)).resolves.toMatchObject({ sub: 'backend-1' });
    await expect(auth.authenticate(`BEARER ${token}`)).resolves.toMatchObject({ sub: 'backend-1' });
  });

  it('when there is no Authorization header, then 401 missing_token', async () => {
    await expectRefused(auth.authenticate(undefined), 'missing_token');
    await expectRefused(auth.authenticate(''), 'missing_token');
  });

  it('when the Authorization header is malformed, then 401 malformed_header without echoing it', async () => {
    const token = await signWithDevKey(goodClaims());
    const headers = [
      'Bearer',
      'Bearer ',
      `Bearer  ${token}`, // two spaces
      `Bearer\t${token}`,
      ` Bearer ${token}`,
      `Bearer ${token} `,
      `Bearer ${token} extra`,
      `Basic ${Buffer.from('user:pass').toString('base64')}`,
      `Token ${token}`,
      token, // no scheme
      `Bearer ${token.split('.').slice(0, 2).join('.')}`, // two segments
      `Bearer ${token}.x.y`, // JWE-like five segments
      `Bearer ${token.replace('.', '.+/')}`, // not base64url
      `Bearer ${'a'.repeat(9000)}.b.c`, // absurdly long
    ];
    for (const header of headers) await expectRefused(auth.authenticate(header), 'malformed_header', token);
  });

  it('when the token is expired beyond the clock tolerance, then 401 expired', async () => {
    const token = await signWithDevKey(goodClaims({ iat: now() - 3600, exp: now() - 60 }));
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'expired', token);
  });

  it('when the token expired within the clock tolerance, then it is still accepted', async () => {
    const token = await signWithDevKey(goodClaims({ iat: now() - 3600, exp: now() - 10 }));
    await expect(auth.authenticate(`Bearer ${token}`)).resolves.toMatchObject({ sub: 'backend-1' });
  });

  it('when nbf is in the future beyond the tolerance, then 401 not_yet_valid', async () => {
    const token = await signWithDevKey(goodClaims({ nbf: now() + 300 }));
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'not_yet_valid', token);
  });

  it('when the audience is wrong, then 401 wrong_audience', async () => {
    const token = await signWithDevKey(goodClaims({ aud: 'someone-else' }));
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'wrong_audience', token);
  });

  it('when the audience is a list that includes ours, then the token is accepted', async () => {
    const token = await signWithDevKey(goodClaims({ aud: ['other', AUDIENCE] }));
    await expect(auth.authenticate(`Bearer ${token}`)).resolves.toMatchObject({ sub: 'backend-1' });
  });

  it('when the issuer is wrong, then 401 wrong_issuer', async () => {
    const token = await signWithDevKey(goodClaims({ iss: 'https://evil.example' }));
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'wrong_issuer', token);
  });

  it.each(['iss', 'aud', 'exp', 'sub'] as const)('when the %s claim is missing, then 401 missing_claim', async (claim) => {
    const claims = goodClaims();
    delete claims[claim];
    const token = await signWithDevKey(claims);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'missing_claim', token);
  });

  it('when sub is not a non-empty string, then 401 invalid_claims', async () => {
    for (const sub of ['', 42, ['a']]) {
      const token = await signWithDevKey(goodClaims({ sub: sub as string }));
      await expectRefused(auth.authenticate(`Bearer ${token}`), 'invalid_claims', token);
    }
  });

  it('when exp is not a number, then 401 invalid_claims', async () => {
    const token = await signWithDevKey(goodClaims({ exp: 'tomorrow' as unknown as number }));
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'invalid_claims', token);
  });

  it('when the token is unsigned (alg none), then 401 alg_none', async () => {
    const token = `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(goodClaims({ scope: 'keystrata:admin' }))}.`;
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'alg_none', token);
    const shouting = `${b64url({ alg: 'NONE' })}.${b64url(goodClaims())}.`;
    await expectRefused(auth.authenticate(`Bearer ${shouting}`), 'alg_none', shouting);
  });

  it('when the token is signed by a different Ed25519 key under our kid, then 401 bad_signature', async () => {
    const { privateKey } = generateKeyPairSync('ed25519');
    const token = await new SignJWT(goodClaims()).setProtectedHeader({ alg: 'EdDSA', kid: issuer.kid }).sign(privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'bad_signature', token);
  });

  it('when the token is signed by a different Ed25519 key without a kid, then 401 bad_signature', async () => {
    const { privateKey } = generateKeyPairSync('ed25519');
    const token = await new SignJWT(goodClaims()).setProtectedHeader({ alg: 'EdDSA' }).sign(privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'bad_signature', token);
  });

  it('when the token names a kid we do not have, then 401 unknown_key', async () => {
    const { privateKey } = generateKeyPairSync('ed25519');
    const token = await new SignJWT(goodClaims()).setProtectedHeader({ alg: 'EdDSA', kid: 'attacker' }).sign(privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'unknown_key', token);
  });

  it('when the token is HS256 signed with a secret (even our public key bytes), then 401 alg_not_allowed', async () => {
    const publicX = Buffer.from(String(issuer.publicJwks.keys[0]?.x), 'base64url');
    for (const secret of [new TextEncoder().encode('a shared secret of thirty-two by'), publicX]) {
      const token = await new SignJWT(goodClaims({ scope: 'keystrata:admin' }))
        .setProtectedHeader({ alg: 'HS256', kid: issuer.kid })
        .sign(secret);
      await expectRefused(auth.authenticate(`Bearer ${token}`), 'alg_not_allowed', token);
    }
  });

  it('when the token is signed with an allowed algorithm the dev issuer does not use (ES256), then 401', async () => {
    const { privateKey } = await generateKeyPair('ES256');
    const token = await new SignJWT(goodClaims()).setProtectedHeader({ alg: 'ES256', kid: issuer.kid }).sign(privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'alg_not_allowed', token);
  });

  it('when the payload has been tampered with, then 401 bad_signature', async () => {
    const token = await signWithDevKey(goodClaims());
    const [h, , s] = token.split('.');
    const forged = `${h}.${b64url(goodClaims({ scope: 'keystrata:admin' }))}.${s}`;
    await expectRefused(auth.authenticate(`Bearer ${forged}`), 'bad_signature', forged);
  });

  it('when the token parts are not valid JSON, then 401 malformed_token', async () => {
    const garbage = `${Buffer.from('not json').toString('base64url')}.${b64url(goodClaims())}.abc`;
    await expectRefused(auth.authenticate(`Bearer ${garbage}`), 'malformed_token', garbage);
  });

  it('when the token declares an unknown critical header, then 401 malformed_token', async () => {
    // jose refuses to sign this, so sign by hand: EdDSA over `header.payload`
    const input = `${b64url({ alg: 'EdDSA', kid: issuer.kid, crit: ['x-unknown'], 'x-unknown': true })}.${b64url(goodClaims())}`;
    const token = `${input}.${sign(null, Buffer.from(input), devKey).toString('base64url')}`;
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'malformed_token', token);
  });

  describe('scopes and groups', () => {
    const principalOf = async (claims: JWTPayload): Promise<Principal> =>
      auth.authenticate(`Bearer ${await signWithDevKey(goodClaims(claims))}`);

    it('when scope is a space-separated string, then known scopes are kept and unknown ones ignored', async () => {
      const p = await principalOf({ scope: 'openid keystrata:rotate  keystrata:audit:read keystrata:superuser KEYSTRATA:ADMIN' });
      expect([...p.scopes].sort()).toEqual(['keystrata:audit:read', 'keystrata:rotate']);
    });

    it('when scp is an array, then its known scopes are used', async () => {
      const p = await principalOf({ scope: undefined, scp: ['keystrata:keys:read', 'profile', 'keystrata:rotate'] });
      expect([...p.scopes].sort()).toEqual(['keystrata:keys:read', 'keystrata:rotate']);
    });

    it('when both scope and scp are present, then the principal has the union', async () => {
      const p = await principalOf({ scope: 'keystrata:rotate', scp: ['keystrata:audit:read'] });
      expect([...p.scopes].sort()).toEqual(['keystrata:audit:read', 'keystrata:rotate']);
    });

    it('when no scope claim is present, then the principal has no scopes and reaches nothing', async () => {
      const p = await principalOf({ scope: undefined });
      expect(p.scopes.size).toBe(0);
      expect(hasScope(p, 'keystrata:keys:read')).toBe(false);
      expect(canReachGroup(p, 'g1')).toBe(false);
    });

    it('when scope, scp or keystrata_groups have the wrong type, then 401 invalid_claims', async () => {
      for (const bad of [
        { scope: ['keystrata:admin'] },
        { scope: 7 },
        { scp: { admin: true } },
        { scp: ['keystrata:admin', 1] },
        { keystrata_groups: 'g1' },
        { keystrata_groups: ['g1', { id: 'g2' }] },
        { jti: 12 },
      ]) {
        const token = await signWithDevKey(goodClaims(bad as JWTPayload));
        await expectRefused(auth.authenticate(`Bearer ${token}`), 'invalid_claims', token);
      }
    });

    it('when the token has the admin scope, then every scope and every group is implied', async () => {
      const p = await principalOf({ scope: 'keystrata:admin', keystrata_groups: undefined });
      for (const scope of ['keystrata:admin', 'keystrata:keys:read', 'keystrata:rotate', 'keystrata:audit:read'] as Scope[]) {
        expect(hasScope(p, scope)).toBe(true);
      }
      expect(canReachGroup(p, 'any-group')).toBe(true);
    });

    it('when the token has keys:read, then it reaches only the groups in keystrata_groups', async () => {
      const p = await principalOf({ scope: 'keystrata:keys:read', keystrata_groups: ['g1', 'fleet:eu-1'] });
      expect(hasScope(p, 'keystrata:keys:read')).toBe(true);
      expect(hasScope(p, 'keystrata:rotate')).toBe(false);
      expect(hasScope(p, 'keystrata:admin')).toBe(false);
      expect(canReachGroup(p, 'g1')).toBe(true);
      expect(canReachGroup(p, 'fleet:eu-1')).toBe(true);
      expect(canReachGroup(p, 'g2')).toBe(false);
      expect(canReachGroup(p, 'G1')).toBe(false);
      expect(canReachGroup(p, '*')).toBe(false);
    });

    it('when a token names groups but lacks keys:read, then it reaches no group', async () => {
      const p = await principalOf({ scope: 'keystrata:rotate keystrata:audit:read', keystrata_groups: ['g1'] });
      expect(canReachGroup(p, 'g1')).toBe(false);
    });

    it('when keys:read comes without keystrata_groups, then no group is reachable', async () => {
      const p = await principalOf({ scope: 'keystrata:keys:read', keystrata_groups: undefined });
      expect(canReachGroup(p, 'g1')).toBe(false);
    });
  });
});

describe('the development issuer key file', () => {
  it('when loaded twice, then the same key is used and the file is 0600', async () => {
    const dataDir = await tempDir();
    const first = await loadOrCreateDevIssuer(dataDir);
    const second = await loadOrCreateDevIssuer(dataDir);
    expect(second.kid).toBe(first.kid);
    expect(second.publicJwks).toEqual(first.publicJwks);
    const stat = await fs.stat(path.join(dataDir, ISSUER_KEY_FILE));
    if (process.platform !== 'win32') expect(stat.mode & 0o777).toBe(0o600);
    // no temp files are left behind
    expect(await fs.readdir(dataDir)).toEqual([ISSUER_KEY_FILE]);
  });

  it('when a token is minted by one load, then an authenticator built on another load accepts it', async () => {
    const dataDir = await tempDir();
    const minter = await loadOrCreateDevIssuer(dataDir);
    const token = await minter.mintToken({ sub: 'cron', scopes: ['keystrata:rotate'], ttlSeconds: parseTtl('5m'), issuer: ISSUER, audience: AUDIENCE });
    const auth = await createAuthenticator({ jwksUrl: undefined, issuer: ISSUER, audience: AUDIENCE, clockToleranceSeconds: 0, dataDir });
    const p = await auth.authenticate(`Bearer ${token}`);
    expect(p.sub).toBe('cron');
    expect(hasScope(p, 'keystrata:rotate')).toBe(true);
  });

  it('when many loads race on an empty data dir, then they all end up with one key', async () => {
    const dataDir = path.join(await tempDir(), 'nested', 'data');
    const issuers = await Promise.all(Array.from({ length: 16 }, () => loadOrCreateDevIssuer(dataDir)));
    expect(new Set(issuers.map((i) => i.kid)).size).toBe(1);
    expect(await fs.readdir(dataDir)).toEqual([ISSUER_KEY_FILE]);
  });

  it('when several processes race on an empty data dir, then they all print the same key id', async () => {
    const dataDir = await tempDir();
    const moduleUrl = new URL('../../src/auth/dev-issuer.ts', import.meta.url).href;
    const script = `const m = await import(${JSON.stringify(moduleUrl)}); const i = await m.loadOrCreateDevIssuer(${JSON.stringify(dataDir)}); console.log(i.kid);`;
    const cwd = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
    const run = () =>
      promisify(execFile)(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd }).then((r) => r.stdout.trim());
    const kids = await Promise.all([run(), run(), run(), run()]);
    expect(kids[0]).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(new Set(kids).size).toBe(1);
    expect((await loadOrCreateDevIssuer(dataDir)).kid).toBe(kids[0]);
  });

  it('when the key file is readable by others, then loading refuses it without printing the key', async () => {
    if (process.platform === 'win32') return;
    const dataDir = await tempDir();
    await loadOrCreateDevIssuer(dataDir);
    const file = path.join(dataDir, ISSUER_KEY_FILE);
    await fs.chmod(file, 0o644);
    const { d } = JSON.parse(await fs.readFile(file, 'utf8')) as { d: string };
    const error = await loadOrCreateDevIssuer(dataDir).then(
      () => expect.unreachable('the key file was accepted'),
      (e: unknown) => e as Error,
    );
    expect(error).toBeInstanceOf(Error);
    expect(error.message).toMatch(/chmod 600/);
    expect(error.message).not.toContain(d);
  });

  it('when the key file is corrupt, then loading fails without quoting its content', async () => {
    const dataDir = await tempDir();
    const file = path.join(dataDir, ISSUER_KEY_FILE);
    await fs.writeFile(file, '{"kty":"OKP","crv":"Ed25519","d":"SECRETSECRETSECRET', { mode: 0o600 });
    const error = await loadOrCreateDevIssuer(dataDir).then(
      () => expect.unreachable('the key file was accepted'),
      (e: unknown) => e as Error,
    );
    expect(error.message).toMatch(/not valid JSON/);
    expect(error.message).not.toContain('SECRET');
    expect(error.cause).toBeUndefined();
  });

  it('when the stored public key does not match the private key, then loading fails', async () => {
    const dataDir = await tempDir();
    const a = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
    const b = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
    await fs.writeFile(path.join(dataDir, ISSUER_KEY_FILE), JSON.stringify({ ...a, x: b.x }), { mode: 0o600 });
    await expect(loadOrCreateDevIssuer(dataDir)).rejects.toThrow(/does not match/);
  });

  it('when minting with an unknown scope, a bad group id or a bad ttl, then minting refuses', async () => {
    const issuer = await loadOrCreateDevIssuer(await tempDir());
    const base = { sub: 's', scopes: ['keystrata:keys:read'] as Scope[], ttlSeconds: 60, issuer: ISSUER, audience: AUDIENCE };
    await expect(issuer.mintToken({ ...base, scopes: ['keystrata:root' as Scope] })).rejects.toThrow(/scopes/);
    await expect(issuer.mintToken({ ...base, groups: ['bad group'] })).rejects.toThrow(/groups/);
    await expect(issuer.mintToken({ ...base, ttlSeconds: 31 * 86_400 })).rejects.toThrow(/ttlSeconds/);
    await expect(issuer.mintToken({ ...base, ttlSeconds: 0 })).rejects.toThrow(/ttlSeconds/);
    await expect(issuer.mintToken({ ...base, sub: '' })).rejects.toThrow(/sub/);
  });

  it('when parsing TTLs, then units are required and the range is 1 s to 30 d', () => {
    expect(parseTtl('3600s')).toBe(3600);
    expect(parseTtl('30m')).toBe(1800);
    expect(parseTtl('1h')).toBe(3600);
    expect(parseTtl('7d')).toBe(604_800);
    expect(parseTtl('30d')).toBe(2_592_000);
    for (const bad of ['31d', '721h', '0s', '0h', '-1h', '1.5h', '1H', '3600', '', 'h', '1w', '1h30m', '99999999999d']) {
      expect(() => parseTtl(bad), bad).toThrow(RangeError);
    }
  });
});

describe('production: tokens verified against a JWKS URL', () => {
  const IDP = 'https://idp.example';
  let server: http.Server;
  let jwksUrl: string;
  let requests = 0;
  let signingKey: Awaited<ReturnType<typeof generateKeyPair>>['privateKey'];
  let auth: Authenticator;

  const claims = (overrides: JWTPayload = {}): JWTPayload => ({
    iss: IDP,
    aud: AUDIENCE,
    sub: 'ingest-service',
    exp: now() + 600,
    iat: now(),
    scp: ['keystrata:keys:read'],
    keystrata_groups: ['g1'],
    ...overrides,
  });

  beforeAll(async () => {
    const pair = await generateKeyPair('ES256');
    signingKey = pair.privateKey;
    const publicJwk = { ...(await exportJWK(pair.publicKey)), kid: 'k1', alg: 'ES256', use: 'sig' };
    server = http.createServer((req, res) => {
      requests += 1;
      if (req.url !== '/.well-known/jwks.json') {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys: [publicJwk] }));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    jwksUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json`;
    auth = await createAuthenticator({ jwksUrl, issuer: IDP, audience: AUDIENCE, clockToleranceSeconds: 30, dataDir: await tempDir() });
  });
  afterAll(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('when the token is signed by a key in the set, then the principal is returned and the set is fetched once', async () => {
    for (let i = 0; i < 5; i += 1) {
      const token = await new SignJWT(claims()).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(signingKey);
      const p = await auth.authenticate(`Bearer ${token}`);
      expect(p.sub).toBe('ingest-service');
      expect(canReachGroup(p, 'g1')).toBe(true);
      expect(canReachGroup(p, 'g2')).toBe(false);
    }
    expect(requests).toBe(1);
  });

  it('when the token is signed by a key that is not in the set, then 401 unknown_key', async () => {
    const other = await generateKeyPair('ES256');
    const token = await new SignJWT(claims()).setProtectedHeader({ alg: 'ES256', kid: 'k2' }).sign(other.privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'unknown_key', token);
  });

  it('when the token reuses the kid of the set but another key signed it, then 401 bad_signature', async () => {
    const other = await generateKeyPair('ES256');
    const token = await new SignJWT(claims()).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(other.privateKey);
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'bad_signature', token);
  });

  it('when the token is a dev-issuer token (wrong issuer, key not in the set), then 401', async () => {
    const dev = await loadOrCreateDevIssuer(await tempDir());
    const token = await dev.mintToken({ sub: 'x', scopes: ['keystrata:admin'], ttlSeconds: 60, issuer: IDP, audience: AUDIENCE });
    await expectRefused(auth.authenticate(`Bearer ${token}`), 'unknown_key', token);
  });

  it('when the token is HS256 or unsigned, then 401 before the key set is consulted', async () => {
    const hs = await new SignJWT(claims()).setProtectedHeader({ alg: 'HS256', kid: 'k1' }).sign(new Uint8Array(32));
    await expectRefused(auth.authenticate(`Bearer ${hs}`), 'alg_not_allowed', hs);
    const none = `${b64url({ alg: 'none' })}.${b64url(claims())}.`;
    await expectRefused(auth.authenticate(`Bearer ${none}`), 'alg_none', none);
  });

  it('when the audience or issuer is wrong, then 401 with the matching reason', async () => {
    const wrongAud = await new SignJWT(claims({ aud: 'other' })).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(signingKey);
    await expectRefused(auth.authenticate(`Bearer ${wrongAud}`), 'wrong_audience', wrongAud);
    const wrongIss = await new SignJWT(claims({ iss: 'keystrata-dev' })).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(signingKey);
    await expectRefused(auth.authenticate(`Bearer ${wrongIss}`), 'wrong_issuer', wrongIss);
  });

  it('when the JWKS endpoint cannot be reached, then 503 jwks_unavailable, not 401', async () => {
    const closed = http.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const unreachable = await createAuthenticator({
      jwksUrl: `http://127.0.0.1:${port}/jwks.json`,
      issuer: IDP,
      audience: AUDIENCE,
      clockToleranceSeconds: 30,
      dataDir: await tempDir(),
      jwksTimeoutMs: 1000,
    });
    const token = await new SignJWT(claims()).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(signingKey);
    const error = await unreachable.authenticate(`Bearer ${token}`).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(AuthUnavailableError);
    expect(error).toMatchObject({ status: 503, reason: 'jwks_unavailable', retryAfterSeconds: 5 });
  });

  it('when the JWKS endpoint answers with an error status, then 503 jwks_unavailable', async () => {
    const broken = await createAuthenticator({
      jwksUrl: jwksUrl.replace('/.well-known/jwks.json', '/missing'),
      issuer: IDP,
      audience: AUDIENCE,
      clockToleranceSeconds: 30,
      dataDir: await tempDir(),
    });
    const token = await new SignJWT(claims()).setProtectedHeader({ alg: 'ES256', kid: 'k1' }).sign(signingKey);
    await expect(broken.authenticate(`Bearer ${token}`)).rejects.toBeInstanceOf(AuthUnavailableError);
  });
});

describe('verified-token cache', () => {
  it('when a verified token expires, then it is refused even though it was verified (and cached) before', async () => {
    const { mkdtempSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { createAuthenticator } = await import('../../src/auth/authenticator.js');
    const { loadOrCreateDevIssuer } = await import('../../src/auth/dev-issuer.js');
    const dataDir = mkdtempSync(join(tmpdir(), 'ks-auth-cache-'));
    const auth = await createAuthenticator({ jwksUrl: undefined, issuer: 'iss', audience: 'aud', clockToleranceSeconds: 0, dataDir });
    const issuer = await loadOrCreateDevIssuer(dataDir);
    const token = await issuer.mintToken({ sub: 'svc', scopes: ['keystrata:admin'], ttlSeconds: 1, issuer: 'iss', audience: 'aud' });
    expect((await auth.authenticate(`Bearer ${token}`)).sub).toBe('svc');
    expect((await auth.authenticate(`Bearer ${token}`)).sub).toBe('svc'); // served from the cache
    await new Promise((resolve) => setTimeout(resolve, 2100));
    await expect(auth.authenticate(`Bearer ${token}`)).rejects.toMatchObject({ reason: 'expired' });
  });
});
