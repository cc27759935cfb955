/**
 * Shutdown (issue 7): SIGTERM closes everything and exits 0, but never takes longer than
 * SHUTDOWN_TIMEOUT_MS, and a second signal stops at once. The deadline ends in SIGKILL because,
 * measured on Node 20 and 24, a worker thread blocked in native code makes every other way out
 * hang: worker.terminate() never resolves, and process.exit(), process.reallyExit() and the event
 * loop running dry all wait for the thread. The child-process test below builds exactly that
 * thread (a worker opening a FIFO nobody writes to) and checks the process still dies on time.
 */
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';
import { createShutdown } from '../../src/shutdown.js';

function recordingLogger() {
  const lines: { level: string; message: string }[] = [];
  const log = (level: string) => (_object: unknown, message?: string) => void lines.push({ level, message: message ?? '' });
  return { lines, logger: { info: log('info'), error: log('error'), fatal: log('fatal') } };
}

describe('SHUTDOWN_TIMEOUT_MS', () => {
  it('defaults to 8 s (under docker stop\'s 10 s grace period) and refuses values out of 100 ms–10 min', () => {
    expect(loadConfig({}).shutdownTimeoutMs).toBe(8_000);
    expect(loadConfig({ SHUTDOWN_TIMEOUT_MS: '25000' }).shutdownTimeoutMs).toBe(25_000);
    for (const bad of ['0', '99', '600001', 'soon', '1.5']) {
      expect(() => loadConfig({ SHUTDOWN_TIMEOUT_MS: bad }), bad).toThrow(ConfigError);
      expect(() => loadConfig({ SHUTDOWN_TIMEOUT_MS: bad }), bad).toThrow(/SHUTDOWN_TIMEOUT_MS/);
    }
  });
});

describe('createShutdown', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('closes, then exits 0 and clears its deadline', async () => {
    vi.useFakeTimers();
    const { lines, logger } = recordingLogger();
    const exit = vi.fn();
    const kill = vi.fn();
    const close = vi.fn(async () => undefined);
    await createShutdown({ logger, timeoutMs: 1_000, close, exit, kill })('SIGTERM');
    expect(close).toHaveBeenCalledTimes(1);
    expect(exit).toHaveBeenCalledWith(0);
    expect(vi.getTimerCount()).toBe(0);
    await vi.advanceTimersByTimeAsync(5_000);
    expect(kill).not.toHaveBeenCalled();
    expect(lines.map((line) => line.level)).toEqual(['info']);
  });

  it('exits 1 and logs why when closing fails', async () => {
    const { lines, logger } = recordingLogger();
    const exit = vi.fn();
    const kill = vi.fn();
    await createShutdown({ logger, timeoutMs: 1_000, close: async () => Promise.reject(new Error('pool end failed')), exit, kill })('SIGTERM');
    expect(exit).toHaveBeenCalledWith(1);
    expect(kill).not.toHaveBeenCalled();
    expect(lines).toContainEqual({ level: 'error', message: 'shutdown failed' });
  });

  it('kills the process at the deadline when closing never finishes, and never exits normally', async () => {
    vi.useFakeTimers();
    const { lines, logger } = recordingLogger();
    const exit = vi.fn();
    const kill = vi.fn();
    void createShutdown({ logger, timeoutMs: 1_000, close: () => new Promise<void>(() => undefined), exit, kill })('SIGTERM');
    await vi.advanceTimersByTimeAsync(999);
    expect(kill).not.toHaveBeenCalled();
    await vi.advanceTimersByTimeAsync(1);
    expect(kill).toHaveBeenCalledTimes(1);
    expect(exit).not.toHaveBeenCalled();
    expect(lines).toContainEqual({ level: 'fatal', message: 'shutdown did not finish within SHUTDOWN_TIMEOUT_MS: killing the process' });
  });

  it('does not exit after the deadline killed it, should closing finish late', async () => {
    vi.useFakeTimers();
    const { logger } = recordingLogger();
    const exit = vi.fn();
    const kill = vi.fn();
    let finishClose!: () => void;
    const shutdown = createShutdown({ logger, timeoutMs: 1_000, close: () => new Promise<void>((resolve) => (finishClose = resolve)), exit, kill });
    const done = shutdown('SIGTERM');
    await vi.advanceTimersByTimeAsync(1_000);
    finishClose();
    await done;
    expect(kill).toHaveBeenCalledTimes(1);
    expect(exit).not.toHaveBeenCalled();
  });

  it('stops at once on a second signal', async () => {
    vi.useFakeTimers();
    const { lines, logger } = recordingLogger();
    const exit = vi.fn();
    const kill = vi.fn();
    const shutdown = createShutdown({ logger, timeoutMs: 60_000, close: () => new Promise<void>(() => undefined), exit, kill });
    void shutdown('SIGTERM');
    await shutdown('SIGINT');
    expect(kill).toHaveBeenCalledTimes(1);
    expect(lines).toContainEqual({ level: 'fatal', message: 'second signal during shutdown: stopping now' });
    // the deadline firing later must not kill (or log) a second time
    await vi.advanceTimersByTimeAsync(60_000);
    await shutdown('SIGTERM');
    expect(kill).toHaveBeenCalledTimes(1);
    expect(exit).not.toHaveBeenCalled();
  });
});

const SHUTDOWN_MODULE = fileURLToPath(new URL('../../src/shutdown.ts', import.meta.url));
const TIMEOUT_MS = 300;

// A process whose close waits for a worker thread stuck in open(2) on a FIFO with no writer:
// the shape of the JWE thread deadlock, as no JS can interrupt it and terminate() cannot end it.
const CHILD = `
import { Worker } from 'node:worker_threads';
import { writeSync } from 'node:fs';
const { createShutdown } = await import(process.env.SHUTDOWN_MODULE);
const write = (level) => (_object, message) => writeSync(1, JSON.stringify({ level, msg: message }) + '\\n');
const worker = new Worker(
  "const { parentPort } = await import('node:worker_threads'); const { openSync } = await import('node:fs'); parentPort.postMessage('opening'); openSync(process.env.FIFO, 'r');",
  { eval: true },
);
const shutdown = createShutdown({
  logger: { info: write('info'), error: write('error'), fatal: write('fatal') },
  timeoutMs: ${TIMEOUT_MS},
  close: async () => { await worker.terminate(); writeSync(1, 'terminated\\n'); },
});
process.on('SIGTERM', () => void shutdown('SIGTERM'));
worker.once('message', () => setTimeout(() => writeSync(1, 'ready\\n'), 100));
`;

describe('shutdown with a worker thread stuck in native code', () => {
  it(`the process still dies, by SIGKILL, at the deadline (${TIMEOUT_MS} ms)`, { timeout: 30_000 }, async () => {
    const directory = mkdtempSync(join(tmpdir(), 'keystrata-shutdown-'));
    try {
      const fifo = join(directory, 'fifo');
      execFileSync('mkfifo', [fifo]);
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', CHILD], {
        env: { ...process.env, SHUTDOWN_MODULE, FIFO: fifo },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      let signalledAt = 0;
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      child.stdout.on('data', (chunk: Buffer) => {
        stdout += chunk.toString();
        if (signalledAt === 0 && stdout.includes('ready\n')) {
          signalledAt = Date.now();
          child.kill('SIGTERM');
        }
      });
      // the test's own backstop: a hung child is a failure, not a hung test run
      const backstop = setTimeout(() => child.kill('SIGKILL'), 20_000);
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
      clearTimeout(backstop);
      const elapsed = Date.now() - signalledAt;

      expect(stderr).toBe('');
      expect(signalledAt, 'the child never got ready').toBeGreaterThan(0);
      expect([code, signal]).toEqual([null, 'SIGKILL']);
      expect(stdout).toContain('"level":"info","msg":"shutting down"');
      expect(stdout).toContain('"level":"fatal","msg":"shutdown did not finish within SHUTDOWN_TIMEOUT_MS: killing the process"');
      // the stuck thread really did hold the shutdown: terminate() never finished
      expect(stdout).not.toContain('terminated');
      expect(elapsed).toBeGreaterThanOrEqual(TIMEOUT_MS);
      expect(elapsed, 'the backstop, not the deadline, ended the child').toBeLessThan(15_000);
    } finally {
      rmSync(directory, { recursive: true, force: true });
    }
  });
});
