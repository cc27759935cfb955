/**
 * The only place that reads process.env. Every setting is described, typed and (except
 * secrets) defaulted; `loadConfig` collects every problem before failing so an operator fixes
 * them all in one go.
 */
import net from 'node:net';
import path from 'node:path';
import { loadMqttConfig, MQTT_SETTINGS, type MqttConfig } from './distribution/mqtt.config.js';

export interface Config {
  port: number;
  host: string;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  dataDir: string;
  databaseUrl: string | undefined;
  databasePoolSize: number;
  /** HTTP worker processes (node:cluster); more than 1 needs PostgreSQL (server.ts) */
  workers: number;
  /** how long a client's imported delivery key is reused before the row is read again (0: every request) */
  deliveryKeyCacheSeconds: number;
  /** worker threads that encrypt delivery JWEs (0: on the event loop); see crypto/jwe-threads.ts */
  deliveryJweThreads: number;
  /** every PostgreSQL query's deadline in ms (0: none); see db/database.ts */
  databaseQueryTimeoutMs: number;
  /** the longest a SIGTERM/SIGINT shutdown may take before the process kills itself; see shutdown.ts */
  shutdownTimeoutMs: number;
  migrateOnStart: boolean;
  rootKey: Buffer | undefined;
  vault:
    | {
        addr: string;
        token: string;
        namespace: string | undefined;
        transitMount: string;
        requestTimeoutMs: number;
      }
    | undefined;
  kekName: string;
  /** retries and circuit breaker around the KEK provider (kek/circuit-breaker.ts) */
  kekResilience: { breakerFailures: number; breakerCooldownMs: number; retryAttempts: number };
  auth: {
    jwksUrl: string | undefined;
    issuer: string;
    audience: string;
    clockToleranceSeconds: number;
  };
  keyCache: { ttlSeconds: number; maxEntries: number };
  bodyLimitBytes: number;
  auditCheckpointIntervalSeconds: number;
  /** per-IP (unauthenticated) and per-client (token `sub`) request budgets; see http/rate-limit.ts */
  rateLimit: { enabled: boolean; windowSeconds: number; perIpMax: number; perClientMax: number };
  /** Fastify `trustProxy`: false, true, or the proxies' addresses/CIDRs */
  trustProxy: boolean | string[];
  /** how long a stored Idempotency-Key answer is replayed; see http/idempotency.ts */
  idempotencyTtlSeconds: number;
  /** HTTPS (and optional mTLS) when a certificate is configured; see http/tls.ts */
  tls: { certFile: string; keyFile: string; clientCaFile: string | undefined; requireClientCert: boolean } | undefined;
  /** MQTT key distribution (distribution/mqtt.config.ts); undefined: publisher off, outbox waits */
  mqtt: MqttConfig | undefined;
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

/** Documented settings: used by the README table and by `keystrata --help`. */
export const SETTINGS: ReadonlyArray<{ name: string; default: string; meaning: string }> = [
  { name: 'PORT', default: '8080', meaning: 'TCP port the API listens on' },
  { name: 'HOST', default: '127.0.0.1', meaning: 'address the API listens on (0.0.0.0 in containers)' },
  { name: 'LOG_LEVEL', default: 'info', meaning: 'pino level: fatal, error, warn, info, debug, trace, silent' },
  { name: 'KEYSTRATA_DATA_DIR', default: './data', meaning: 'PGlite files, local root key, local token issuer key' },
  { name: 'DATABASE_URL', default: 'unset → embedded PGlite', meaning: 'PostgreSQL connection string' },
  { name: 'DATABASE_POOL_SIZE', default: '10', meaning: 'maximum PostgreSQL connections per process' },
  { name: 'KEYSTRATA_WORKERS', default: '1', meaning: 'HTTP worker processes (node:cluster) sharing the port; more than 1 needs DATABASE_URL (PGlite is single-process). Pools and rate limits are per worker' },
  { name: 'DATABASE_QUERY_TIMEOUT_MS', default: '30000', meaning: 'deadline of one PostgreSQL query (0: none); past it the request gets a 503 and the connection is dropped (a network partition would otherwise hold it forever). Migrations at start-up run under it too: raise it for a long one' },
  { name: 'SHUTDOWN_TIMEOUT_MS', default: '8000', meaning: 'the longest a shutdown (SIGTERM, SIGINT) may take: past it, or on a second signal, the process kills itself with SIGKILL (a worker thread stuck in native code would otherwise keep it, and its port, forever). Keep it below the orchestrator\'s grace period (docker stop: 10 s, Kubernetes: 30 s)' },
  { name: 'KEYSTRATA_MIGRATE_ON_START', default: 'true', meaning: 'apply pending migrations at start-up' },
  { name: 'KEYSTRATA_ROOT_KEY', default: 'unset → key file in the data dir', meaning: 'base64 32-byte root key of the local KEK provider' },
  { name: 'VAULT_ADDR', default: 'unset → local KEK provider', meaning: 'Vault or OpenBao address' },
  { name: 'VAULT_TOKEN', default: '(secret, required with VAULT_ADDR)', meaning: 'Vault token allowed to use the transit key' },
  { name: 'VAULT_NAMESPACE', default: 'unset', meaning: 'Vault Enterprise / OpenBao namespace' },
  { name: 'VAULT_TRANSIT_MOUNT', default: 'transit', meaning: 'mount path of the transit engine' },
  { name: 'VAULT_REQUEST_TIMEOUT_MS', default: '5000', meaning: 'timeout of one Vault request' },
  { name: 'KEYSTRATA_KEK_NAME', default: 'keystrata-kek', meaning: 'name of the KEK (transit key)' },
  { name: 'KEK_BREAKER_FAILURES', default: '5', meaning: 'KEK provider unavailability failures in a row that open its circuit (calls then fail fast with 503 + Retry-After)' },
  { name: 'KEK_BREAKER_COOLDOWN_MS', default: '10000', meaning: 'how long the KEK circuit stays open before one probe call is let through' },
  { name: 'KEK_RETRY_ATTEMPTS', default: '3', meaning: 'attempts in all for an idempotent KEK call (wrap, unwrap, rewrap, info) that found the provider unavailable; backoff doubles from 50 ms, with jitter' },
  { name: 'AUTH_JWKS_URL', default: 'unset → local development issuer', meaning: 'JWKS URL of the production identity provider' },
  { name: 'AUTH_ISSUER', default: 'keystrata-dev (local issuer)', meaning: 'required `iss` of bearer tokens' },
  { name: 'AUTH_AUDIENCE', default: 'keystrata', meaning: 'required `aud` of bearer tokens' },
  { name: 'AUTH_CLOCK_TOLERANCE_SECONDS', default: '30', meaning: 'allowed clock skew when checking exp/nbf' },
  { name: 'KEY_CACHE_TTL_SECONDS', default: '3600', meaning: 'how long unwrapped parent keys stay in memory' },
  { name: 'DELIVERY_KEY_CACHE_SECONDS', default: '5', meaning: "how long a client's (public) delivery key is reused without reading it again (0: read on every fetch). A change made through this process applies at once; other replicas and workers see it within this time" },
  { name: 'DELIVERY_JWE_THREADS', default: '1', meaning: 'worker threads that encrypt key deliveries (the ephemeral key agreement of every JWE) beside the event loop; 0: on the event loop' },
  { name: 'KEY_CACHE_MAX_ENTRIES', default: '100000', meaning: 'size bound of the unwrapped parent key cache' },
  { name: 'AUDIT_CHECKPOINT_INTERVAL_SECONDS', default: '3600', meaning: 'how often the server signs an audit checkpoint (only when the chain grew)' },
  { name: 'BODY_LIMIT_BYTES', default: '1048576', meaning: 'largest accepted request body' },
  { name: 'RATE_LIMIT_ENABLED', default: 'true', meaning: 'answer 429 beyond the per-IP and per-client budgets (in memory: each replica counts on its own)' },
  { name: 'RATE_LIMIT_WINDOW_SECONDS', default: '60', meaning: 'length of one rate-limit window' },
  { name: 'RATE_LIMIT_PER_IP_MAX', default: '600', meaning: 'requests per window per client IP without a valid token (anonymous, failed authentication, unknown routes, /docs)' },
  { name: 'RATE_LIMIT_PER_CLIENT_MAX', default: '6000', meaning: 'requests per window per authenticated client (token `sub`)' },
  { name: 'TRUST_PROXY', default: 'false', meaning: 'take the client IP from X-Forwarded-For when the peer is one of these comma-separated proxy addresses/CIDRs (or true: any peer)' },
  { name: 'IDEMPOTENCY_TTL_SECONDS', default: '86400', meaning: 'how long the answer to a POST with an Idempotency-Key is replayed' },
  { name: 'TLS_CERT_FILE', default: 'unset → plain HTTP', meaning: 'PEM certificate chain: serve HTTPS (TLS 1.2+, AEAD suites only)' },
  { name: 'TLS_KEY_FILE', default: '(required with TLS_CERT_FILE)', meaning: 'PEM private key of the certificate' },
  { name: 'TLS_CLIENT_CA_FILE', default: 'unset', meaning: 'PEM CA bundle that client certificates (mTLS) are verified against' },
  { name: 'TLS_REQUIRE_CLIENT_CERT', default: 'false', meaning: 'refuse TLS connections without a client certificate from TLS_CLIENT_CA_FILE' },
  ...MQTT_SETTINGS,
];

type Env = Record<string, string | undefined>;

export function loadConfig(env: Env = process.env): Readonly<Config> {
  const problems: string[] = [];
  const read = (name: string): string | undefined => {
    const value = env[name];
    return value === undefined || value === '' ? undefined : value;
  };
  const int = (name: string, fallback: number, min: number, max: number): number => {
    const raw = read(name);
    if (raw === undefined) return fallback;
    const value = Number(raw);
    if (!/^\d+$/.test(raw) || value < min || value > max) {
      problems.push(`${name} must be an integer from ${min} to ${max} (got "${raw}")`);
      return fallback;
    }
    return value;
  };
  const bool = (name: string, fallback: boolean): boolean => {
    const raw = read(name);
    if (raw === undefined) return fallback;
    if (raw === 'true' || raw === '1') return true;
    if (raw === 'false' || raw === '0') return false;
    problems.push(`${name} must be true or false (got "${raw}")`);
    return fallback;
  };
  const url = (name: string, protocols: string[]): string | undefined => {
    const raw = read(name);
    if (raw === undefined) return undefined;
    try {
      const parsed = new URL(raw);
      if (!protocols.includes(parsed.protocol)) throw new Error('protocol');
      return raw;
    } catch {
      // The value itself may carry credentials (DATABASE_URL): never echo it.
      problems.push(`${name} must be a ${protocols.join(' or ')} URL`);
      return undefined;
    }
  };

  const levels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
  const logLevelRaw = read('LOG_LEVEL') ?? 'info';
  const logLevel = (levels as readonly string[]).includes(logLevelRaw)
    ? (logLevelRaw as Config['logLevel'])
    : (problems.push(`LOG_LEVEL must be one of ${levels.join(', ')} (got "${logLevelRaw}")`), 'info' as const);

  let rootKey: Buffer | undefined;
  const rootKeyRaw = read('KEYSTRATA_ROOT_KEY');
  if (rootKeyRaw !== undefined) {
    const decoded = Buffer.from(rootKeyRaw, 'base64');
    if (decoded.length !== 32 || decoded.toString('base64') !== rootKeyRaw.replace(/\s/g, '')) {
      problems.push('KEYSTRATA_ROOT_KEY must be exactly 32 bytes, base64-encoded');
    } else {
      rootKey = decoded;
    }
  }

  const vaultAddr = url('VAULT_ADDR', ['http:', 'https:']);
  const vaultToken = read('VAULT_TOKEN');
  if (read('VAULT_ADDR') !== undefined && vaultToken === undefined) problems.push('VAULT_TOKEN is required when VAULT_ADDR is set');
  const transitMount = read('VAULT_TRANSIT_MOUNT') ?? 'transit';
  if (!/^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/.test(transitMount)) problems.push('VAULT_TRANSIT_MOUNT must be a mount path such as "transit"');
  const kekName = read('KEYSTRATA_KEK_NAME') ?? 'keystrata-kek';
  if (!/^[A-Za-z0-9_.-]{1,128}$/.test(kekName)) problems.push('KEYSTRATA_KEK_NAME must match ^[A-Za-z0-9_.-]{1,128}$');
  const vaultTimeout = int('VAULT_REQUEST_TIMEOUT_MS', 5000, 100, 120_000);

  const jwksUrl = url('AUTH_JWKS_URL', ['http:', 'https:']);
  const config: Config = {
    port: int('PORT', 8080, 0, 65535),
    host: read('HOST') ?? '127.0.0.1',
    logLevel,
    dataDir: path.resolve(read('KEYSTRATA_DATA_DIR') ?? './data'),
    databaseUrl: url('DATABASE_URL', ['postgres:', 'postgresql:']),
    databasePoolSize: int('DATABASE_POOL_SIZE', 10, 1, 500),
    workers: int('KEYSTRATA_WORKERS', 1, 1, 64),
    deliveryKeyCacheSeconds: int('DELIVERY_KEY_CACHE_SECONDS', 5, 0, 300),
    deliveryJweThreads: int('DELIVERY_JWE_THREADS', 1, 0, 16),
    databaseQueryTimeoutMs: int('DATABASE_QUERY_TIMEOUT_MS', 30_000, 0, 3_600_000),
    shutdownTimeoutMs: int('SHUTDOWN_TIMEOUT_MS', 8_000, 100, 600_000),
    migrateOnStart: bool('KEYSTRATA_MIGRATE_ON_START', true),
    rootKey,
    vault:
      vaultAddr && vaultToken
        ? { addr: vaultAddr, token: vaultToken, namespace: read('VAULT_NAMESPACE'), transitMount, requestTimeoutMs: vaultTimeout }
        : undefined,
    kekName,
    kekResilience: {
      breakerFailures: int('KEK_BREAKER_FAILURES', 5, 1, 1000),
      breakerCooldownMs: int('KEK_BREAKER_COOLDOWN_MS', 10_000, 100, 600_000),
      retryAttempts: int('KEK_RETRY_ATTEMPTS', 3, 1, 10),
    },
    auth: {
      jwksUrl,
      issuer: read('AUTH_ISSUER') ?? 'keystrata-dev',
      audience: read('AUTH_AUDIENCE') ?? 'keystrata',
      clockToleranceSeconds: int('AUTH_CLOCK_TOLERANCE_SECONDS', 30, 0, 600),
    },
    keyCache: {
      ttlSeconds: int('KEY_CACHE_TTL_SECONDS', 3600, 1, 86_400),
      maxEntries: int('KEY_CACHE_MAX_ENTRIES', 100_000, 1, 10_000_000),
    },
    bodyLimitBytes: int('BODY_LIMIT_BYTES', 1_048_576, 1024, 64 * 1_048_576),
    auditCheckpointIntervalSeconds: int('AUDIT_CHECKPOINT_INTERVAL_SECONDS', 3600, 10, 7 * 86_400),
    rateLimit: {
      enabled: bool('RATE_LIMIT_ENABLED', true),
      windowSeconds: int('RATE_LIMIT_WINDOW_SECONDS', 60, 1, 86_400),
      perIpMax: int('RATE_LIMIT_PER_IP_MAX', 600, 1, 10_000_000),
      perClientMax: int('RATE_LIMIT_PER_CLIENT_MAX', 6000, 1, 10_000_000),
    },
    trustProxy: trustProxy(read('TRUST_PROXY'), problems),
    idempotencyTtlSeconds: int('IDEMPOTENCY_TTL_SECONDS', 86_400, 60, 30 * 86_400),
    tls: undefined,
    mqtt: loadMqttConfig({ read, int, bool, problems }),
  };
  const certFile = read('TLS_CERT_FILE');
  const keyFile = read('TLS_KEY_FILE');
  const clientCaFile = read('TLS_CLIENT_CA_FILE');
  const requireClientCert = bool('TLS_REQUIRE_CLIENT_CERT', false);
  if ((certFile === undefined) !== (keyFile === undefined)) problems.push('TLS_CERT_FILE and TLS_KEY_FILE must be set together');
  if (certFile === undefined && (clientCaFile !== undefined || requireClientCert)) problems.push('TLS_CLIENT_CA_FILE and TLS_REQUIRE_CLIENT_CERT need TLS_CERT_FILE and TLS_KEY_FILE');
  if (requireClientCert && clientCaFile === undefined) problems.push('TLS_REQUIRE_CLIENT_CERT needs TLS_CLIENT_CA_FILE');
  if (certFile !== undefined && keyFile !== undefined) config.tls = { certFile: path.resolve(certFile), keyFile: path.resolve(keyFile), clientCaFile: clientCaFile && path.resolve(clientCaFile), requireClientCert };
  if (jwksUrl !== undefined && read('AUTH_ISSUER') === undefined) problems.push('AUTH_ISSUER is required when AUTH_JWKS_URL is set');
  // Whoever can tamper with the JWKS fetch can mint admin tokens: plain http only on loopback.
  if (jwksUrl !== undefined && new URL(jwksUrl).protocol === 'http:' && !['127.0.0.1', 'localhost', '[::1]'].includes(new URL(jwksUrl).hostname)) {
    problems.push('AUTH_JWKS_URL must use https (plain http is allowed only on loopback)');
  }
  if (config.workers > 1 && config.databaseUrl === undefined) problems.push('KEYSTRATA_WORKERS above 1 needs DATABASE_URL: embedded PGlite lives in one process');
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(config);
}

/**
 * TRUST_PROXY: unset/false, true (any peer: only behind a proxy that overwrites X-Forwarded-For),
 * or the proxies' addresses/CIDRs (Fastify ignores a bare hop count: it cannot check the peer).
 */
function trustProxy(raw: string | undefined, problems: string[]): boolean | string[] {
  if (raw === undefined || raw === 'false') return false;
  if (raw === 'true') return true;
  const entries = raw.split(',').map((e) => e.trim()).filter((e) => e !== '');
  const isAddress = (entry: string): boolean => {
    const [address = '', prefix] = entry.split('/');
    const family = net.isIP(address);
    return family !== 0 && (prefix === undefined || (/^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128)));
  };
  if (entries.length === 0 || !entries.every(isAddress)) {
    problems.push('TRUST_PROXY must be true, false, or comma-separated IP addresses/CIDRs');
    return false;
  }
  return entries;
}
