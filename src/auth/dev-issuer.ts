/**
 * The embedded default's token issuer: one Ed25519 key pair kept in `<dataDir>/issuer-key.json`
 * (a private JWK, mode 0600). `keystrata token …` mints development tokens with it and the
 * authenticator verifies them against its public half. Production uses an IdP's JWKS instead.
 *
 * The file is created on first use without a race: the key is written to a private temp file,
 * then hard-linked into place (link(2) fails if the name exists, like O_EXCL), and every
 * process, winner or loser, then reads the file back, so all of them end up with one key.
 *
 * Nothing here puts key material into an error message (JSON.parse quotes its input, so its
 * errors are replaced, never chained).
 */
import { constants, promises as fs } from 'node:fs';
import path from 'node:path';
import { createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, randomUUID, type JsonWebKey, type KeyObject } from 'node:crypto';
import { calculateJwkThumbprint, SignJWT, type JSONWebKeySet, type JWK } from 'jose';
import { GROUP_ID_PATTERN, isScope, type Scope } from './principal.js';

export const ISSUER_KEY_FILE = 'issuer-key.json';
export const MAX_TTL_SECONDS = 30 * 24 * 3600;
const MAX_KEY_FILE_BYTES = 16 * 1024;

export interface MintTokenInput {
  sub: string;
  scopes: readonly Scope[];
  groups?: readonly string[];
  ttlSeconds: number;
  issuer: string;
  audience: string;
}

export interface DevIssuer {
  /** Key id (RFC 7638 thumbprint of the public key), also the tokens' `kid` header. */
  kid: string;
  /** The public half only, as a JWK Set for `createLocalJWKSet`. */
  publicJwks: JSONWebKeySet;
  /** A compact EdDSA JWT: iss, aud, sub, iat, exp, jti, scope (space-separated), keystrata_groups. */
  mintToken(input: MintTokenInput): Promise<string>;
}

interface Ed25519PrivateJwk {
  kty: 'OKP';
  crv: 'Ed25519';
  x: string;
  d: string;
}

export async function loadOrCreateDevIssuer(dataDir: string): Promise<DevIssuer> {
  await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });
  const file = path.join(dataDir, ISSUER_KEY_FILE);
  const stored = await readKeyFile(file) ?? (await createKeyFile(file));
  const { privateKey, publicJwk } = importPrivateJwk(stored);
  const kid = await calculateJwkThumbprint(publicJwk, 'sha256');
  const publicJwks: JSONWebKeySet = deepFreeze({ keys: [{ ...publicJwk, kid, alg: 'EdDSA', use: 'sig' }] });

  return {
    kid,
    publicJwks,
    async mintToken(input) {
      const claims = validateMintInput(input);
      const iat = Math.floor(Date.now() / 1000);
      return new SignJWT({ scope: claims.scopes.join(' '), keystrata_groups: claims.groups })
        .setProtectedHeader({ alg: 'EdDSA', typ: 'JWT', kid })
        .setIssuer(claims.issuer)
        .setAudience(claims.audience)
        .setSubject(claims.sub)
        .setIssuedAt(iat)
        .setExpirationTime(iat + claims.ttlSeconds)
        .setJti(randomUUID())
        .sign(privateKey);
    },
  };
}

/**
 * `'30m'`, `'1h'`, `'3600s'`, `'7d'` → seconds; from 1 s to 30 days. Units are required so a
 * bare `'3600'` is not silently read as either seconds or hours.
 */
export function parseTtl(input: string): number {
  const match = /^([1-9][0-9]{0,7})([smhd])$/.exec(typeof input === 'string' ? input.trim() : '');
  const unit = { s: 1, m: 60, h: 3600, d: 86_400 } as const;
  const seconds = match ? Number(match[1]) * unit[match[2] as keyof typeof unit] : NaN;
  if (!Number.isSafeInteger(seconds) || seconds < 1 || seconds > MAX_TTL_SECONDS) {
    throw new RangeError('TTL must be a positive number with a unit (s, m, h or d), such as 30m, 1h or 7d, and at most 30d');
  }
  return seconds;
}

// ---------------------------------------------------------------------------------------------

function validateMintInput(input: MintTokenInput): Required<MintTokenInput> {
  const { sub, scopes, groups = [], ttlSeconds, issuer, audience } = input;
  // Printable ASCII only: sub lands in audit events and logs.
  if (typeof sub !== 'string' || !/^[\x21-\x7e]{1,256}$/.test(sub)) throw new TypeError('sub must be 1 to 256 printable ASCII characters');
  if (!Array.isArray(scopes) || !scopes.every(isScope)) throw new TypeError('scopes must be known keystrata scopes');
  if (!Array.isArray(groups) || !groups.every((g) => typeof g === 'string' && GROUP_ID_PATTERN.test(g))) {
    throw new TypeError('groups must be group ids matching ^[A-Za-z0-9._:-]{1,128}$');
  }
  if (!Number.isSafeInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_TTL_SECONDS) {
    throw new RangeError(`ttlSeconds must be an integer from 1 to ${MAX_TTL_SECONDS}`);
  }
  if (typeof issuer !== 'string' || issuer === '') throw new TypeError('issuer must be a non-empty string');
  if (typeof audience !== 'string' || audience === '') throw new TypeError('audience must be a non-empty string');
  return { sub, scopes: [...new Set(scopes)], groups: [...new Set(groups)], ttlSeconds, issuer, audience };
}

/** The stored key, or undefined when the file does not exist yet. */
async function readKeyFile(file: string): Promise<Ed25519PrivateJwk | undefined> {
  let handle: fs.FileHandle;
  try {
    // O_NOFOLLOW: a symlink planted in the data dir must not redirect us to another file.
    handle = await fs.open(file, constants.O_RDONLY | (constants.O_NOFOLLOW ?? 0));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`Cannot open the local issuer key file ${file} (${(error as NodeJS.ErrnoException).code ?? 'error'})`);
  }
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new Error(`The local issuer key file ${file} is not a regular file`);
    if (process.platform !== 'win32' && (stat.mode & 0o077) !== 0) {
      throw new Error(`The local issuer key file ${file} is readable by others: run chmod 600 on it (and treat the key as leaked)`);
    }
    if (stat.size > MAX_KEY_FILE_BYTES) throw new Error(`The local issuer key file ${file} is too large to be a key`);
    return parseKeyFile(await handle.readFile('utf8'), file);
  } finally {
    await handle.close();
  }
}

async function createKeyFile(file: string): Promise<Ed25519PrivateJwk> {
  // exported by the generation itself: a later export of a generated key can deadlock on Node 20 (crypto/jwe.ts generateEphemeralKeyPair)
  const jwk = generateKeyPairSync('ed25519', { privateKeyEncoding: { format: 'jwk' } as never }).privateKey as unknown as JsonWebKey;
  const tmp = `${file}.${process.pid}.${randomBytes(8).toString('hex')}.tmp`;
  const handle = await fs.open(tmp, 'wx', 0o600);
  try {
    await handle.writeFile(`${JSON.stringify({ kty: jwk.kty, crv: jwk.crv, x: jwk.x, d: jwk.d })}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await fs.link(tmp, file);
    await syncDirectory(path.dirname(file));
  } catch (error) {
    // EEXIST: another process created the key first; we use theirs (read back below).
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  } finally {
    await fs.unlink(tmp).catch(() => {});
  }
  const stored = await readKeyFile(file);
  if (stored === undefined) throw new Error(`The local issuer key file ${file} vanished while it was being created`);
  return stored;
}

async function syncDirectory(dir: string): Promise<void> {
  // Best effort: makes the new name durable on POSIX file systems; not possible on Windows.
  const handle = await fs.open(dir, 'r').catch(() => undefined);
  if (handle === undefined) return;
  try {
    await handle.sync();
  } catch {
    // some file systems refuse fsync on a directory
  } finally {
    await handle.close();
  }
}

function parseKeyFile(text: string, file: string): Ed25519PrivateJwk {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new Error(`The local issuer key file ${file} is not valid JSON`);
  }
  const jwk = parsed as Partial<Record<keyof Ed25519PrivateJwk, unknown>> | null;
  const b64url = /^[A-Za-z0-9_-]{43}$/; // 32 bytes
  if (
    jwk === null ||
    typeof jwk !== 'object' ||
    jwk.kty !== 'OKP' ||
    jwk.crv !== 'Ed25519' ||
    typeof jwk.x !== 'string' ||
    typeof jwk.d !== 'string' ||
    !b64url.test(jwk.x) ||
    !b64url.test(jwk.d)
  ) {
    throw new Error(`The local issuer key file ${file} does not hold an Ed25519 private JWK`);
  }
  return { kty: 'OKP', crv: 'Ed25519', x: jwk.x, d: jwk.d };
}

/** Imports the private key and derives the public key from it (never trusting the stored `x`). */
function importPrivateJwk(jwk: Ed25519PrivateJwk): { privateKey: KeyObject; publicJwk: JWK } {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: { ...jwk }, format: 'jwk' });
  } catch {
    throw new Error('The local issuer key is not a valid Ed25519 private key');
  }
  const derived = createPublicKey(privateKey).export({ format: 'jwk' });
  if (derived.x !== jwk.x) throw new Error('The local issuer key file is corrupt: its public key does not match its private key');
  return { privateKey, publicJwk: { kty: 'OKP', crv: 'Ed25519', x: derived.x } };
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const inner of Object.values(value)) deepFreeze(inner);
    Object.freeze(value);
  }
  return value;
}
