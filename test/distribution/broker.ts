/**
 * A real Mosquitto for one test file: its own process on a free loopback port with a temp
 * config, so a test can stop and restart it. Persistence is on (saved at shutdown), so device
 * sessions with clean start off and the messages queued for them survive a restart, as they
 * would on a production broker.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface TestBroker {
  url: string;
  port: number;
  /** SIGTERM and wait for the exit (Mosquitto saves its persistence file) */
  stop(): Promise<void>;
  /** start again on the same port, with the saved state */
  start(): Promise<void>;
  /** SIGSTOP: connections stay open, nothing is answered (messages sent now stay in flight) */
  freeze(): void;
  /** SIGKILL: a crash; nothing is saved since the last clean stop */
  kill(): Promise<void>;
  close(): Promise<void>;
}

function mosquittoBinary(): string {
  for (const candidate of [process.env.MOSQUITTO_BIN, '/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto']) {
    if (candidate && fs.existsSync(candidate)) return candidate;
  }
  const which = spawnSync('sh', ['-c', 'command -v mosquitto'], { encoding: 'utf8' });
  if (which.status === 0 && which.stdout.trim() !== '') return which.stdout.trim();
  throw new Error('mosquitto is not installed: the distribution tests need a real broker (apt-get install mosquitto, or set MOSQUITTO_BIN)');
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

async function waitForPort(port: number, open: boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const isOpen = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ port, host: '127.0.0.1' });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (isOpen === open) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`mosquitto port ${port} did not become ${open ? 'open' : 'closed'} within ${timeoutMs} ms`);
}

export interface BrokerTls {
  caFile: string;
  certFile: string;
  keyFile: string;
  /** mutual TLS: refuse clients without a certificate from caFile */
  requireClientCert: boolean;
}

export async function startBroker(options: { tls?: BrokerTls } = {}): Promise<TestBroker> {
  const binary = mosquittoBinary();
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-mosquitto-'));
  // run as root, Mosquitto drops to its own user: the state directory must be writable for it
  fs.chmodSync(dir, 0o777);
  const config = path.join(dir, 'mosquitto.conf');
  const tls = options.tls;
  fs.writeFileSync(
    config,
    [
      `listener ${port} 127.0.0.1`,
      ...(tls
        ? [`cafile ${tls.caFile}`, `certfile ${tls.certFile}`, `keyfile ${tls.keyFile}`, `require_certificate ${tls.requireClientCert}`, 'tls_version tlsv1.2']
        : []),
      'allow_anonymous true',
      'persistence true',
      `persistence_location ${dir}/`,
      'persistence_file mosquitto.db',
      'autosave_interval 0',
      'max_queued_messages 10000',
      'log_dest stderr',
      'log_type error',
      'log_type warning',
      '',
    ].join('\n'),
    { mode: 0o644 },
  );
  let child: ChildProcess | undefined;
  const stderr: string[] = [];

  async function start(): Promise<void> {
    if (child) return;
    const proc = spawn(binary, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] });
    proc.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk.toString('utf8')));
    child = proc;
    proc.once('exit', () => {
      if (child === proc) child = undefined;
    });
    try {
      await waitForPort(port, true, 10_000);
    } catch (error) {
      throw new Error(`${(error as Error).message}; mosquitto said: ${stderr.join('').slice(-2000)}`);
    }
  }

  async function stop(): Promise<void> {
    const proc = child;
    if (!proc) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGKILL');
      await exited;
    }
    child = undefined;
    await waitForPort(port, false, 5000);
  }

  async function kill(): Promise<void> {
    const proc = child;
    if (!proc) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill('SIGKILL');
    await exited;
    child = undefined;
    await waitForPort(port, false, 5000);
  }

  await start();
  return {
    url: `${tls ? 'mqtts' : 'mqtt'}://127.0.0.1:${port}`,
    port,
    start,
    stop,
    kill,
    freeze: () => void child?.kill('SIGSTOP'),
    async close() {
      await stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
