/**
 * The publisher over TLS with a client certificate (mutual TLS), against a Mosquitto that
 * requires one: it connects and delivers with the configured CA, certificate and key, and
 * never connects without its certificate or with a CA that did not sign the broker's.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connect } from 'mqtt';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startBroker, type TestBroker } from './broker.js';
import type { KeyUpdate } from './device.js';
import { createEnv, enrol, mqttEnv, outboxRows, rotate, waitFor, type Env } from './support.js';

function openssl(dir: string, args: string[]): void {
  const result = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${result.stderr}`);
}

/** A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256, valid one day. */
function makePki(dir: string, name: string): void {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl(dir, ['req', '-x509', ...ec, '-keyout', `${name}-ca.key`, '-out', `${name}-ca.pem`, '-days', '1', '-subj', `/CN=${name} test CA`]);
  fs.writeFileSync(path.join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  fs.writeFileSync(path.join(dir, 'client.ext'), 'extendedKeyUsage=clientAuth\n');
  for (const [who, ext] of [['server', 'server.ext'], ['client', 'client.ext']] as const) {
    openssl(dir, ['req', ...ec, '-keyout', `${name}-${who}.key`, '-out', `${name}-${who}.csr`, '-subj', `/CN=${who === 'server' ? '127.0.0.1' : 'keystrata'}`]);
    openssl(dir, ['x509', '-req', '-in', `${name}-${who}.csr`, '-CA', `${name}-ca.pem`, '-CAkey', `${name}-ca.key`, '-CAcreateserial', '-out', `${name}-${who}.pem`, '-days', '1', '-extfile', ext]);
  }
  for (const file of fs.readdirSync(dir)) fs.chmodSync(path.join(dir, file), 0o644);
}

describe('mutual TLS to the broker', () => {
  let dir: string;
  let broker: TestBroker;
  const envs: Env[] = [];
  const file = (name: string) => path.join(dir, name);

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-pki-'));
    fs.chmodSync(dir, 0o755);
    makePki(dir, 'good');
    makePki(dir, 'other');
    broker = await startBroker({ tls: { caFile: file('good-ca.pem'), certFile: file('good-server.pem'), keyFile: file('good-server.key'), requireClientCert: true } });
  });
  afterAll(async () => {
    for (const e of envs) await e.close();
    await broker?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('when the CA, client certificate and key are configured, then the publisher connects over TLS and delivers', async () => {
    const e = await createEnv({ env: mqttEnv(broker.url, { MQTT_CA_FILE: file('good-ca.pem'), MQTT_CERT_FILE: file('good-client.pem'), MQTT_KEY_FILE: file('good-client.key') }) });
    envs.push(e);
    const watcher = connect(broker.url, { protocolVersion: 5, ca: fs.readFileSync(file('good-ca.pem')), cert: fs.readFileSync(file('good-client.pem')), key: fs.readFileSync(file('good-client.key')), reconnectPeriod: 100 });
    const seen: KeyUpdate[] = [];
    watcher.on('message', (_t, payload) => seen.push(JSON.parse(payload.toString('utf8')) as KeyUpdate));
    await new Promise<void>((resolve, reject) => {
      watcher.once('connect', () => resolve());
      watcher.once('error', reject);
    });
    await watcher.subscribeAsync('keystrata/devices/+/keys', { qos: 2 });
    try {
      await enrol(e, ['t-1']);
      await rotate(e, 't-1');
      await waitFor('the update over TLS', () => seen.find((m) => m.deviceId === 't-1' && m.version === 2));
      expect((await outboxRows(e.t, 't-1')).map((r) => r.status)).toEqual(['published']);
    } finally {
      await watcher.endAsync(true);
    }
  });

  it('when the client certificate is missing, or the CA is not the broker\'s, then the publisher never connects and the update waits in the outbox', async () => {
    const cases: Array<Record<string, string>> = [{ MQTT_CA_FILE: file('good-ca.pem') }, { MQTT_CA_FILE: file('other-ca.pem'), MQTT_CERT_FILE: file('good-client.pem'), MQTT_KEY_FILE: file('good-client.key') }];
    for (const extra of cases) {
      const e = await createEnv({ env: mqttEnv(broker.url, extra) });
      envs.push(e);
      await enrol(e, ['t-2']);
      await rotate(e, 't-2');
      await new Promise((r) => setTimeout(r, 1500));
      const metrics = (await e.t.app.inject({ method: 'GET', url: '/metrics' })).body;
      expect(metrics).toMatch(/^keystrata_mqtt_connected 0$/m);
      expect(metrics).toMatch(/^keystrata_outbox_depth 1$/m);
      expect((await outboxRows(e.t, 't-2')).map((r) => [r.status, r.attempts])).toEqual([['pending', 0]]);
      // the failures are logged, without any secret
      expect(e.t.logs.some((l) => l.includes('MQTT client error') || l.includes('MQTT broker unreachable'))).toBe(true);
    }
  });
});
