/**
 * Bearer JWT verification (DESIGN §5). Keys come from the production IdP's JWKS URL or, in the
 * embedded default, from the local development issuer. Both go through a jose JWK Set, which
 * imports each key once and caches it, so the hot path is one signature check and no I/O
 * (a remote set is refetched only when stale or when an unknown `kid` shows up, at most once
 * per cooldown).
 *
 * Every refusal is an `AuthenticationError` (401) with one generic message; the precise cause
 * is its `reason`, for the audit log. The reason is deliberately not in `extra`: the error
 * handler copies `extra` into the client's problem+json, and telling a caller whether its
 * forgery failed on the signature, the issuer or the audience only helps the forger.
 * An unreachable JWKS endpoint is not the caller's fault: that is a 503 (`AuthUnavailableError`).
 */
import {
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeProtectedHeader,
  jwtVerify,
  type JWTPayload,
  type JWTVerifyGetKey,
  type JWTVerifyOptions,
} from 'jose';
import type { Config } from '../config.js';
import { UnauthorizedError, UnavailableError } from '../http/errors.js';
import { loadOrCreateDevIssuer } from './dev-issuer.js';
import { isScope, type Principal, type Scope } from './principal.js';

/** Asymmetric only: never `none`, never HS* (a shared secret would let every verifier mint). */
export const ALLOWED_ALGORITHMS = Object.freeze(['EdDSA', 'ES256', 'ES384', 'RS256', 'PS256'] as const);

/** Tokens are small; a longer header is refused before any parsing. */
const MAX_AUTHORIZATION_LENGTH = 8192;
const MAX_SUB_LENGTH = 256;
const MAX_GROUPS = 10_000;

export type AuthFailureReason =
  | 'missing_token' // no Authorization header
  | 'malformed_header' // not exactly `Bearer <compact JWS>`
  | 'malformed_token' // undecodable header/payload, bad JSON, unsupported `crit`, …
  | 'alg_none' // unsecured JWT
  | 'alg_not_allowed' // HS*, or any algorithm outside ALLOWED_ALGORITHMS
  | 'unknown_key' // no key in the set matches `kid`/`alg`
  | 'ambiguous_key' // several keys match and the token names none (no `kid`)
  | 'bad_signature'
  | 'expired'
  | 'not_yet_valid' // `nbf` in the future
  | 'wrong_issuer'
  | 'wrong_audience'
  | 'missing_claim' // iss, aud, exp or sub absent
  | 'invalid_claims' // a claim of the wrong type or shape (sub, scope, scp, keystrata_groups, jti, iat…)
  | 'verification_error'; // anything unexpected: still refused

export class AuthenticationError extends UnauthorizedError {
  constructor(readonly reason: AuthFailureReason) {
    super(); // the generic default message: never the token, never the reason
  }
}

export class AuthUnavailableError extends UnavailableError {
  readonly reason = 'jwks_unavailable' as const;
  constructor() {
    super('The identity provider is unavailable', 5);
  }
}

export interface AuthenticatorOptions extends Readonly<Config['auth']> {
  dataDir: string;
  /** Remote JWKS only: one fetch's timeout (default 5 s). */
  jwksTimeoutMs?: number;
  /** Remote JWKS only: least time between refetches caused by unknown `kid`s (default 30 s). */
  jwksCooldownMs?: number;
  /** Remote JWKS only: refetch a set older than this (default 10 min). */
  jwksCacheMaxAgeMs?: number;
  /** Verified tokens remembered (0 turns the cache off); default 10,000. */
  verifiedTokenCacheSize?: number;
}

/**
 * A backend sends the same token with every request until it expires, and verifying its
 * signature is most of the cost of authentication. A token that verified is remembered,
 * keyed by its exact bytes, until the earlier of its `exp` and one minute from now (so a key
 * withdrawn from the JWKS stops being honoured within a minute, as with a JWKS refetch).
 * Only successes are cached; a forged token never matches a cached one byte for byte.
 */
const VERIFIED_TOKEN_MAX_AGE_MS = 60_000;

function createVerifiedTokenCache(maxEntries: number) {
  const entries = new Map<string, { principal: Principal; until: number }>();
  return {
    get(token: string): Principal | undefined {
      const entry = entries.get(token);
      if (!entry) return undefined;
      if (entry.until <= Date.now()) {
        entries.delete(token);
        return undefined;
      }
      return entry.principal;
    },
    set(token: string, principal: Principal, exp: number): void {
      if (maxEntries <= 0) return;
      if (entries.size >= maxEntries) {
        // oldest first: Map keeps insertion order
        const oldest = entries.keys().next();
        if (!oldest.done) entries.delete(oldest.value);
      }
      entries.set(token, { principal, until: Math.min(exp * 1000, Date.now() + VERIFIED_TOKEN_MAX_AGE_MS) });
    },
  };
}

export interface Authenticator {
  authenticate(authorizationHeader: string | undefined): Promise<Principal>;
}

export async function createAuthenticator(options: AuthenticatorOptions): Promise<Authenticator> {
  const { jwksUrl, issuer, audience, clockToleranceSeconds, dataDir } = options;
  if (typeof issuer !== 'string' || issuer === '') throw new TypeError('auth.issuer must be a non-empty string');
  if (typeof audience !== 'string' || audience === '') throw new TypeError('auth.audience must be a non-empty string');
  if (!Number.isInteger(clockToleranceSeconds) || clockToleranceSeconds < 0 || clockToleranceSeconds > 600) {
    throw new TypeError('auth.clockToleranceSeconds must be an integer from 0 to 600');
  }

  let keySet: JWTVerifyGetKey;
  let algorithms: readonly string[];
  if (jwksUrl !== undefined) {
    const url = new URL(jwksUrl);
    if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new TypeError('auth.jwksUrl must be an http(s) URL');
    keySet = createRemoteJWKSet(url, {
      timeoutDuration: options.jwksTimeoutMs ?? 5_000,
      cooldownDuration: options.jwksCooldownMs ?? 30_000,
      cacheMaxAge: options.jwksCacheMaxAgeMs ?? 600_000,
    });
    algorithms = ALLOWED_ALGORITHMS;
  } else {
    const devIssuer = await loadOrCreateDevIssuer(dataDir);
    keySet = createLocalJWKSet(devIssuer.publicJwks);
    algorithms = ['EdDSA']; // the only key there is
  }

  const verifyOptions: JWTVerifyOptions = {
    algorithms: [...algorithms],
    issuer,
    audience,
    requiredClaims: ['iss', 'aud', 'exp', 'sub'],
    clockTolerance: clockToleranceSeconds,
  };
  const getKey = markUnavailability(keySet);
  const verified = createVerifiedTokenCache(options.verifiedTokenCacheSize ?? 10_000);

  return {
    async authenticate(authorizationHeader) {
      const token = parseBearer(authorizationHeader);
      const cached = verified.get(token);
      if (cached) return cached;
      let payload: JWTPayload;
      try {
        ({ payload } = await jwtVerify(token, getKey, verifyOptions));
      } catch (error) {
        throw classify(error, token);
      }
      const principal = toPrincipal(payload);
      verified.set(token, principal, payload.exp as number);
      return principal;
    },
  };
}

// ---------------------------------------------------------------------------------------------

const BEARER = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)$/i;

/** `Bearer <compact JWS>`: scheme case-insensitive, exactly one space, nothing else. */
function parseBearer(header: string | undefined): string {
  if (header === undefined || header === '') throw new AuthenticationError('missing_token');
  if (typeof header !== 'string' || header.length > MAX_AUTHORIZATION_LENGTH) throw new AuthenticationError('malformed_header');
  const match = BEARER.exec(header);
  if (match === null) throw new AuthenticationError('malformed_header');
  return match[1] as string;
}

/** Wraps key-set failures that mean "the JWKS could not be had" so they can become a 503. */
class KeySetUnavailable extends Error {}
const KEY_LOOKUP_CODES = new Set(['ERR_JWKS_NO_MATCHING_KEY', 'ERR_JWKS_MULTIPLE_MATCHING_KEYS', 'ERR_JOSE_NOT_SUPPORTED']);

function markUnavailability(keySet: JWTVerifyGetKey): JWTVerifyGetKey {
  return async (protectedHeader, token) => {
    try {
      return await keySet(protectedHeader, token);
    } catch (error) {
      // Key lookups that failed because of the token stay as they are; everything else
      // (timeout, connection refused, non-200, malformed JWKS) is the IdP's side.
      if (KEY_LOOKUP_CODES.has(codeOf(error))) throw error;
      throw new KeySetUnavailable();
    }
  };
}

function codeOf(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : '';
}

function classify(error: unknown, token: string): AuthenticationError | AuthUnavailableError {
  if (error instanceof KeySetUnavailable) return new AuthUnavailableError();
  switch (codeOf(error)) {
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
      return new AuthenticationError(isAlgNone(token) ? 'alg_none' : 'alg_not_allowed');
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return new AuthenticationError('bad_signature');
    case 'ERR_JWKS_NO_MATCHING_KEY':
      return new AuthenticationError('unknown_key');
    case 'ERR_JWKS_MULTIPLE_MATCHING_KEYS':
      return new AuthenticationError('ambiguous_key');
    case 'ERR_JWT_EXPIRED':
      return new AuthenticationError('expired');
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      return new AuthenticationError(claimFailure(error as { claim?: unknown; reason?: unknown }));
    case 'ERR_JWS_INVALID':
    case 'ERR_JWT_INVALID':
    case 'ERR_JOSE_NOT_SUPPORTED':
      return new AuthenticationError('malformed_token');
    default:
      return new AuthenticationError('verification_error');
  }
}

function claimFailure({ claim, reason }: { claim?: unknown; reason?: unknown }): AuthFailureReason {
  if (reason === 'missing') return 'missing_claim';
  if (reason === 'check_failed') {
    if (claim === 'iss') return 'wrong_issuer';
    if (claim === 'aud') return 'wrong_audience';
    if (claim === 'nbf') return 'not_yet_valid';
  }
  return 'invalid_claims';
}

function isAlgNone(token: string): boolean {
  try {
    const { alg } = decodeProtectedHeader(token);
    return typeof alg === 'string' && alg.toLowerCase() === 'none';
  } catch {
    return false;
  }
}

/** Claims already verified by jose (iss, aud, exp, nbf, iat); here only keystrata's own. */
function toPrincipal(payload: JWTPayload): Principal {
  const { sub, jti } = payload;
  if (typeof sub !== 'string' || sub.length === 0 || sub.length > MAX_SUB_LENGTH) throw new AuthenticationError('invalid_claims');
  if (jti !== undefined && typeof jti !== 'string') throw new AuthenticationError('invalid_claims');
  const principal: Principal = { sub, scopes: readScopes(payload), groups: readGroups(payload) };
  if (jti !== undefined) principal.tokenId = jti;
  return principal;
}

/** `scope` (OAuth: one space-separated string) and/or `scp` (array, or string as some IdPs send). */
function readScopes(payload: JWTPayload): ReadonlySet<Scope> {
  const scopes = new Set<Scope>();
  const add = (value: unknown): void => {
    if (isScope(value)) scopes.add(value); // unknown scopes are ignored
  };
  const { scope, scp } = payload as { scope?: unknown; scp?: unknown };
  if (scope !== undefined) {
    if (typeof scope !== 'string') throw new AuthenticationError('invalid_claims');
    scope.split(' ').forEach(add);
  }
  if (scp !== undefined) {
    if (typeof scp === 'string') scp.split(' ').forEach(add);
    else if (Array.isArray(scp) && scp.every((s) => typeof s === 'string')) scp.forEach(add);
    else throw new AuthenticationError('invalid_claims');
  }
  return scopes;
}

function readGroups(payload: JWTPayload): ReadonlySet<string> {
  const groups = (payload as { keystrata_groups?: unknown }).keystrata_groups;
  if (groups === undefined) return new Set();
  if (!Array.isArray(groups) || groups.length > MAX_GROUPS || !groups.every((g) => typeof g === 'string')) {
    throw new AuthenticationError('invalid_claims');
  }
  return new Set(groups);
}
