/**
 * pino, JSON. Nothing secret may reach a log line: the request's Authorization header, any
 * JWE, JWK `k`/`d`, tokens, wrapped blobs and root keys are censored by path wherever they
 * appear up to a few levels deep. The log test (test/http/logs.test.ts) runs the whole
 * flow and searches the captured output for every secret it handled.
 */
import pino, { type DestinationStream, type Logger } from 'pino';

const SECRET_KEYS = ['authorization', 'cookie', 'jwe', 'k', 'd', 'token', 'accessToken', 'wrapped', 'wrapped_key', 'wrappedKey', 'ciphertext', 'plaintext', 'rootKey', 'root_key', 'key', 'secret', 'password', 'privateKey', 'private_key'];

export const REDACT_PATHS = [
  ...SECRET_KEYS,
  ...SECRET_KEYS.map((k) => `*.${k}`),
  ...SECRET_KEYS.map((k) => `*.*.${k}`),
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["x-vault-token"]',
];

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      base: { service: 'keystrata' },
      timestamp: pino.stdTimeFunctions.isoTime,
      serializers: { err: pino.stdSerializers.err },
    },
    destination,
  );
}
