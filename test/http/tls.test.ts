/**
 * HTTPS served by keystrata itself (issue 8, part 4), over real loopback sockets, with
 * certificates this test makes with the `openssl` CLI (Debian's openssl package): TLS 1.2 is
 * the floor, TLS 1.2 takes only ECDHE + AEAD suites, and with TLS_REQUIRE_CLIENT_CERT only a
 * client holding a certificate from TLS_CLIENT_CA_FILE gets through the handshake.
 * Each refusal is checked on the server's side too (its `tlsClientError`), so a test cannot
 * pass merely because the client declined to speak.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';
import { loadHttpsOptions, TLS12_CIPHERS } from '../../src/http/tls.js';
import { createTestApp, type TestApp } from '../support/app.js';

const OPENSSL = ['/usr/bin/openssl', '/usr/local/bin/openssl'].find((p) => fs.existsSync(p));
if (!OPENSSL) console.warn('\n*** tls.test.ts SKIPPED: no openssl CLI to make test certificates (apt-get install -y openssl)\n');

interface Pki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  rogueClientCert: string;
  rogueClientKey: string;
}

/** A CA, a server certificate for localhost/127.0.0.1, a client certificate from the CA and one from a rogue CA. */
function makePki(): Pki {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-tls-'));
  const file = (name: string) => path.join(dir, name);
  const openssl = (...args: string[]) => execFileSync(OPENSSL!, args, { cwd: dir, stdio: 'pipe' });
  const ecKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const ca = (name: string) => openssl('req', '-x509', ...ecKey, '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2', '-subj', `/CN=${name}`);
  const leaf = (name: string, issuer: string, extensions: string) => {
    fs.writeFileSync(file(`${name}.ext`), extensions);
    openssl('req', ...ecKey, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${issuer}.crt`, '-CAkey', `${issuer}.key`, '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', '-extfile', `${name}.ext`);
  };
  ca('test-ca');
  ca('rogue-ca');
  leaf('server', 'test-ca', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  leaf('backend', 'test-ca', 'extendedKeyUsage=clientAuth\n');
  leaf('intruder', 'rogue-ca', 'extendedKeyUsage=clientAuth\n');
  return {
    dir,
    caCert: file('test-ca.crt'),
    serverCert: file('server.crt'),
    serverKey: file('server.key'),
    clientCert: file('backend.crt'),
    clientKey: file('backend.key'),
    rogueClientCert: file('intruder.crt'),
    rogueClientKey: file('intruder.key'),
  };
}

interface Outcome {
  ok: boolean;
  status?: number;
  protocol?: string | null;
  cipher?: string;
  error?: string;
}

type ClientOptions = Pick<https.RequestOptions, 'minVersion' | 'maxVersion' | 'ciphers' | 'cert' | 'key' | 'headers'> & { path?: string };

function request(port: number, ca: Buffer, options: ClientOptions = {}): Promise<Outcome> {
  return new Promise((resolve) => {
    const req = https.request(
      { host: '127.0.0.1', port, servername: 'localhost', path: options.path ?? '/healthz', ca, agent: false, timeout: 5000, ...options },
      (res) => {
        const socket = res.socket as import('node:tls').TLSSocket;
        const protocol = socket.getProtocol();
        const cipher = socket.getCipher().standardName;
        res.resume();
        res.on('end', () => resolve({ ok: true, status: res.statusCode, protocol, cipher }));
      },
    );
    req.on('error', (error: NodeJS.ErrnoException) => resolve({ ok: false, error: error.code ?? error.message }));
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end();
  });
}

describe.skipIf(!OPENSSL)('TLS', () => {
  let pki: Pki;
  let ca: Buffer;
  beforeAll(() => {
    pki = makePki();
    ca = fs.readFileSync(pki.caCert);
  });
  afterAll(() => {
    if (pki) fs.rmSync(pki.dir, { recursive: true, force: true });
  });

  /** A listening keystrata with these TLS settings, and the handshake errors its server saw. */
  async function serve(env: Record<string, string>): Promise<{ t: TestApp; port: number; serverErrors: string[] }> {
    const t = await createTestApp({ env });
    const serverErrors: string[] = [];
    t.app.server.on('tlsClientError', (error: NodeJS.ErrnoException) => serverErrors.push(error.code ?? error.message));
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    return { t, port: (t.app.server.address() as AddressInfo).port, serverErrors };
  }

  describe('with a certificate (no client certificates)', () => {
    let s: Awaited<ReturnType<typeof serve>>;
    beforeAll(async () => {
      s = await serve({ TLS_CERT_FILE: pki.serverCert, TLS_KEY_FILE: pki.serverKey });
    });
    afterAll(async () => s?.t.close());

    it('when a client speaks TLS 1.3, then it is served over TLS 1.3', async () => {
      const outcome = await request(s.port, ca);
      expect(outcome).toMatchObject({ ok: true, status: 200, protocol: 'TLSv1.3' });
      expect(outcome.cipher).toMatch(/^TLS_(AES_(128|256)_GCM|CHACHA20_POLY1305)_SHA(256|384)$/);
    });

    it('when a client is capped at TLS 1.2, then only ECDHE + AEAD suites are negotiated', async () => {
      const outcome = await request(s.port, ca, { maxVersion: 'TLSv1.2' });
      expect(outcome).toMatchObject({ ok: true, status: 200, protocol: 'TLSv1.2' });
      expect(outcome.cipher).toMatch(/^TLS_ECDHE_ECDSA_WITH_(AES_(128|256)_GCM|CHACHA20_POLY1305)_SHA(256|384)?$/);
      for (const suite of ['ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-ECDSA-CHACHA20-POLY1305']) {
        expect(await request(s.port, ca, { maxVersion: 'TLSv1.2', ciphers: suite }), suite).toMatchObject({ ok: true, status: 200, protocol: 'TLSv1.2' });
      }
    });

    it('when a client offers only TLS 1.1 or 1.0, then the server refuses the handshake', async () => {
      for (const maxVersion of ['TLSv1.1', 'TLSv1'] as const) {
        const before = s.serverErrors.length;
        // SECLEVEL=0 so that this client is willing to offer the old protocol at all
        const outcome = await request(s.port, ca, { minVersion: 'TLSv1', maxVersion, ciphers: 'DEFAULT@SECLEVEL=0' });
        expect(outcome.ok, maxVersion).toBe(false);
        expect(s.serverErrors.slice(before).join()).toMatch(/UNSUPPORTED_PROTOCOL|VERSION_TOO_LOW|unsupported protocol/i);
      }
    });

    it('when a TLS 1.2 client offers only CBC (or SHA-1) suites, then there is no shared cipher', async () => {
      for (const suite of ['ECDHE-ECDSA-AES128-SHA256', 'ECDHE-ECDSA-AES256-SHA384', 'ECDHE-ECDSA-AES128-SHA', 'ECDHE-ECDSA-AES256-SHA']) {
        const before = s.serverErrors.length;
        const outcome = await request(s.port, ca, { maxVersion: 'TLSv1.2', ciphers: suite });
        expect(outcome.ok, suite).toBe(false);
        expect(s.serverErrors.slice(before).join(), suite).toMatch(/NO_SHARED_CIPHER|no shared cipher/i);
      }
    });

    it('when plain HTTP is sent to the TLS port, then nothing is answered in clear text', async () => {
      const http = await import('node:http');
      const outcome = await new Promise<{ status?: number; error?: string }>((resolve) => {
        const req = http.request({ host: '127.0.0.1', port: s.port, path: '/healthz', agent: false, timeout: 3000 }, (res) => {
          res.resume();
          resolve({ status: res.statusCode });
        });
        req.on('error', (e: NodeJS.ErrnoException) => resolve({ error: e.code ?? e.message }));
        req.on('timeout', () => req.destroy(new Error('timeout')));
        req.end();
      });
      expect(outcome.status === undefined || outcome.status >= 400).toBe(true);
      expect(outcome.status).not.toBe(200);
    });

    it('lists exactly the ECDHE AEAD suites for TLS 1.2', () => {
      for (const suite of TLS12_CIPHERS) expect(suite).toMatch(/^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$/);
      const options = loadHttpsOptions(loadConfig({ TLS_CERT_FILE: pki.serverCert, TLS_KEY_FILE: pki.serverKey }).tls)!;
      expect(options.minVersion).toBe('TLSv1.2');
      expect(options.requestCert).toBeUndefined();
    });
  });

  describe('with TLS_REQUIRE_CLIENT_CERT (mTLS)', () => {
    let s: Awaited<ReturnType<typeof serve>>;
    beforeAll(async () => {
      s = await serve({ TLS_CERT_FILE: pki.serverCert, TLS_KEY_FILE: pki.serverKey, TLS_CLIENT_CA_FILE: pki.caCert, TLS_REQUIRE_CLIENT_CERT: 'true' });
    });
    afterAll(async () => s?.t.close());
    /** requests that reached the app (each gets one access log line) */
    const served = () => s.t.logs.filter((l) => l.includes('"request completed"')).length;

    it('when a client has no certificate, then it is refused (TLS 1.3 and 1.2) before any request reaches the app', async () => {
      for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
        const before = { errors: s.serverErrors.length, served: served() };
        const outcome = await request(s.port, ca, { maxVersion });
        expect(outcome.ok, maxVersion).toBe(false);
        await new Promise((r) => setTimeout(r, 20));
        expect(s.serverErrors.slice(before.errors).join(), maxVersion).toMatch(/PEER_DID_NOT_RETURN_A_CERTIFICATE|did not return a certificate/i);
        expect(served(), maxVersion).toBe(before.served);
      }
    });

    it('when a client certificate comes from another CA, then it is refused (TLS 1.3 and 1.2), and no request reaches the app', async () => {
      for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
        const before = { errors: s.serverErrors.length, served: served() };
        const outcome = await request(s.port, ca, { maxVersion, cert: fs.readFileSync(pki.rogueClientCert), key: fs.readFileSync(pki.rogueClientKey) });
        expect(outcome.ok, maxVersion).toBe(false);
        await new Promise((r) => setTimeout(r, 20));
        expect(served(), maxVersion).toBe(before.served);
      }
    });

    it('when a client certificate comes from the CA, then the request is served, and the bearer token is still required', async () => {
      const cert = fs.readFileSync(pki.clientCert);
      const key = fs.readFileSync(pki.clientKey);
      const before = served();
      expect(await request(s.port, ca, { cert, key })).toMatchObject({ ok: true, status: 200, protocol: 'TLSv1.3' });
      // the access line is written once the response has gone out: it may trail the answer
      await vi.waitFor(() => expect(served()).toBe(before + 1));
      expect(await request(s.port, ca, { cert, key, maxVersion: 'TLSv1.2' })).toMatchObject({ ok: true, status: 200, protocol: 'TLSv1.2' });
      expect(await request(s.port, ca, { cert, key, path: '/v1/groups' })).toMatchObject({ ok: true, status: 401 });
      const token = await s.t.token('keystrata:admin');
      expect(await request(s.port, ca, { cert, key, path: '/v1/groups', headers: { authorization: `Bearer ${token}` } })).toMatchObject({ ok: true, status: 200 });
    });
  });

  it('when the TLS settings are incomplete or the files unreadable, then start-up fails naming the setting (never the contents)', () => {
    const problems = (env: Record<string, string>) => {
      try {
        loadConfig(env);
        return '';
      } catch (error) {
        return (error as ConfigError).problems.join('\n');
      }
    };
    expect(problems({ TLS_CERT_FILE: pki.serverCert })).toMatch(/TLS_CERT_FILE and TLS_KEY_FILE must be set together/);
    expect(problems({ TLS_REQUIRE_CLIENT_CERT: 'true' })).toMatch(/need TLS_CERT_FILE/);
    expect(problems({ TLS_CERT_FILE: pki.serverCert, TLS_KEY_FILE: pki.serverKey, TLS_REQUIRE_CLIENT_CERT: 'true' })).toMatch(/TLS_REQUIRE_CLIENT_CERT needs TLS_CLIENT_CA_FILE/);
    expect(loadConfig({}).tls).toBeUndefined();
    const missing = loadConfig({ TLS_CERT_FILE: path.join(pki.dir, 'nope.crt'), TLS_KEY_FILE: pki.serverKey }).tls;
    expect(() => loadHttpsOptions(missing)).toThrow(/^TLS_CERT_FILE: cannot read .*nope\.crt \(ENOENT\)$/);
    let message = '';
    try {
      loadHttpsOptions(loadConfig({ TLS_CERT_FILE: pki.serverCert, TLS_KEY_FILE: path.join(pki.dir, 'absent.key') }).tls);
    } catch (error) {
      message = (error as Error).message;
    }
    expect(message).toMatch(/^TLS_KEY_FILE: cannot read/);
    expect(message).not.toContain('BEGIN');
  });
});
