/**
 * pino, JSON. Nothing secret may reach a log line: the request's Authorization header, any
 * JWE, JWK `k`/`d`, tokens, wrapped blobs and root keys are censored by property name wherever
 * they appear (any depth up to SCRUB_DEPTH; deeper values are cut), raw bytes are never written,
 * and errors are scrubbed after serialisation. The log test (test/http/logs.test.ts) runs the
 * whole flow and searches the captured output for every secret it handled.
 *
 * The scrubbing is a copy made by `scrubSecrets` in pino's formatters rather than pino's
 * `redact` paths: with wildcard paths at three depths for every secret name, `redact` cost
 * ~10× the rest of a log line (~90 µs a line here, issue 7), and covered fewer depths.
 */
import pino, { type DestinationStream, type Logger } from 'pino';

const SECRET_KEYS = ['authorization', 'cookie', 'jwe', 'k', 'd', 'token', 'accessToken', 'wrapped', 'wrapped_key', 'wrappedKey', 'ciphertext', 'plaintext', 'rootKey', 'root_key', 'key', 'secret', 'password', 'privateKey', 'private_key', 'x-vault-token'];
const SECRET = new Set(SECRET_KEYS.map((k) => k.toLowerCase()));
const CENSOR = '[redacted]';
export const SCRUB_DEPTH = 8;

/**
 * A copy of `value` fit for a log line: properties named like a secret (any case) censored,
 * Buffers and typed arrays replaced (raw bytes may be key material), Errors serialised
 * (message, stack, own properties) and scrubbed too, anything deeper than SCRUB_DEPTH cut.
 */
export function scrubSecrets(value: unknown, depth = 0): unknown {
  if (value === null || typeof value !== 'object') return value;
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) return '[binary]';
  if (depth >= SCRUB_DEPTH) return '[depth limit]';
  if (value instanceof Error) return scrubSecrets(pino.stdSerializers.err(value), depth);
  if (Array.isArray(value)) return value.map((item) => scrubSecrets(item, depth + 1));
  if (typeof (value as { toJSON?: unknown }).toJSON === 'function') return value; // Date, URL: serialised as strings
  const out: Record<string, unknown> = {};
  for (const name of Object.keys(value)) {
    out[name] = SECRET.has(name.toLowerCase()) ? CENSOR : scrubSecrets((value as Record<string, unknown>)[name], depth + 1);
  }
  return out;
}

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'keystrata' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: {
        log: (object) => scrubSecrets(object) as Record<string, unknown>,
        bindings: (bindings) => scrubSecrets(bindings) as Record<string, unknown>,
      },
      // pino applies formatters.bindings to the base bindings only, not to a child's: a child's
      // top-level bindings named like a secret are censored by these plain (wildcard-free, cheap) paths
      redact: { paths: SECRET_KEYS.map((name) => JSON.stringify(name)).map((quoted) => `[${quoted}]`), censor: CENSOR },
      // scrubSecrets already serialised every Error: the default serializer would serialise the copy again
      serializers: { err: (error: unknown) => (error instanceof Error ? scrubSecrets(error) : error) },
    },
    destination,
  );
}
