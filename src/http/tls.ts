/**
 * HTTPS for the API itself (DESIGN §5): TLS 1.2 as the floor, and on TLS 1.2 only ECDHE key
 * exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305): no CBC, no static-RSA key exchange,
 * no SHA-1 MACs. TLS 1.3's own suites are all AEAD and stay at Node's defaults.
 *
 * With TLS_CLIENT_CA_FILE, clients are asked for a certificate and it is verified against that
 * CA; with TLS_REQUIRE_CLIENT_CERT, a connection without a valid one fails in the handshake
 * (mTLS for backend services). The bearer token is still required on top: the certificate
 * proves which machine is calling, the token what it may do.
 *
 * The files are read once at start-up; rotating a certificate means restarting the replica.
 */
import fs from 'node:fs';
import type { ServerOptions } from 'node:https';
import type { Config } from '../config.js';

export const TLS_MIN_VERSION = 'TLSv1.2';

/** OpenSSL names of the TLS 1.2 suites we accept: forward secrecy and AEAD, nothing else. */
export const TLS12_CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305',
] as const;

/** Node's options for `https.createServer`, or undefined when no certificate is configured. */
export function loadHttpsOptions(tls: Config['tls']): ServerOptions | undefined {
  if (tls === undefined) return undefined;
  const read = (setting: string, file: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (error) {
      // the path is configuration, not a secret; the contents never reach a message
      throw new Error(`${setting}: cannot read ${file} (${(error as NodeJS.ErrnoException).code ?? 'error'})`);
    }
  };
  const options: ServerOptions = {
    cert: read('TLS_CERT_FILE', tls.certFile),
    key: read('TLS_KEY_FILE', tls.keyFile),
    minVersion: TLS_MIN_VERSION,
    // TLS 1.3 suites are configured apart from this list (Node keeps its AEAD defaults)
    ciphers: TLS12_CIPHERS.join(':'),
    honorCipherOrder: true,
  };
  if (tls.clientCaFile !== undefined) {
    options.ca = read('TLS_CLIENT_CA_FILE', tls.clientCaFile);
    options.requestCert = true;
    options.rejectUnauthorized = tls.requireClientCert;
  }
  return options;
}
