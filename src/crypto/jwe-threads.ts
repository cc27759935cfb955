/**
 * Key-set JWEs encrypted on worker threads (DELIVERY_JWE_THREADS, default 1; 0: on the event loop).
 *
 * Why: the ephemeral X25519 key pair and the key agreement of every delivery cost about 120 µs
 * of the ~550 µs of event-loop time of a single key fetch (issue 7), and with one event loop
 * the server used one of the machine's cores. On a thread the event loop pays about 40 µs to
 * hand a payload over and take the JWE back. The construction is jwe.ts's, unchanged: a fresh
 * ephemeral key for every JWE.
 *
 * The payload (the JWK Set, plaintext keys inside) is moved to the thread, not copied, and
 * zeroed there. A thread that dies, or holds a delivery past TASK_DEADLINE_MS, fails the
 * deliveries it held (503, retryable) and is replaced on the next call: a stuck thread must not
 * hold every request that reaches it (the replies that never came in issue 7's benchmark were a
 * thread deadlocked in Node's JWK export, fixed in jwe.ts generateEphemeralKeyPair; the
 * deadline stays as the guard against the next such fault). Threads are unref'd once, at
 * start, so they never keep the process alive (a server is kept alive by its listening socket).
 * Under tsx or vitest the thread loads the TypeScript source through tsx; compiled, the
 * JavaScript next to this module.
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker, type WorkerOptions } from 'node:worker_threads';
import { UnavailableError } from '../http/errors.js';
import { encryptKeySet, keySetPayload, type DeliveredKey, type DeliveryKey } from './jwe.js';
import type { JweWorkerReply, JweWorkerRequest } from './jwe.worker.js';

export interface JweEncryptor {
  /** The JWK Set of `keys` as one compact JWE to the delivery key (jwe.ts encryptKeySet). */
  encrypt(deliveryKey: DeliveryKey, deliveryKid: string, keys: ReadonlyArray<DeliveredKey>): Promise<string>;
  /** Stop the threads; deliveries still on them fail. */
  close(): Promise<void>;
  /** Fault tests: stop the running threads as a crash would (their deliveries fail; the next call starts new ones). */
  crashThreadsForTest(): Promise<void>;
}

interface Task {
  resolve(jwe: string): void;
  reject(error: Error): void;
  sentAt: number;
}

/** A JWE takes well under a millisecond; one held this long (once its thread runs) means the thread is stuck. */
const TASK_DEADLINE_MS = 60000;
/** A thread that has not started after this long is given up (it loads a few modules). */
const START_DEADLINE_MS = 30_000;

interface Thread {
  worker: Worker;
  tasks: Map<number, Task>;
  watchdog: NodeJS.Timeout;
  startedAt: number;
  /** when its message handler was installed: deliveries sent before count from here */
  onlineAt: number | undefined;
}

function workerEntry(): { url: URL; options: WorkerOptions } {
  if (!import.meta.url.endsWith('.ts')) return { url: new URL('./jwe.worker.js', import.meta.url), options: {} };
  // TypeScript source (tsx, vitest): a bootstrap module registers tsx in the thread, then loads it
  const api = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/index\.cjs$/, 'index.mjs')).href;
  const worker = new URL('./jwe.worker.ts', import.meta.url).href;
  const boot = `import { register } from ${JSON.stringify(api)}; register(); await import(${JSON.stringify(worker)});`;
  return { url: new URL(`data:text/javascript,${encodeURIComponent(boot)}`), options: { execArgv: [] } };
}

export function createJweEncryptor(threadCount: number, settings: { taskDeadlineMs?: number } = {}): JweEncryptor {
  const deadlineMs = settings.taskDeadlineMs ?? TASK_DEADLINE_MS;
  if (threadCount <= 0) {
    return { encrypt: encryptKeySet, close: async () => {}, crashThreadsForTest: async () => {} };
  }
  const threads: Thread[] = [];
  let nextId = 1;
  let closed = false;

  function fail(thread: Thread, error: Error): void {
    const index = threads.indexOf(thread);
    if (index >= 0) threads.splice(index, 1);
    clearInterval(thread.watchdog);
    for (const task of thread.tasks.values()) task.reject(error);
    thread.tasks.clear();
  }

  function startThread(): Thread {
    const { url, options } = workerEntry();
    const worker = new Worker(url, options);
    const thread: Thread = {
      worker,
      tasks: new Map(),
      startedAt: performance.now(),
      onlineAt: undefined,
      watchdog: setInterval(() => {
        const oldest = thread.tasks.values().next();
        if (oldest.done) return;
        const now = performance.now();
        const held = thread.onlineAt === undefined ? now - thread.startedAt < START_DEADLINE_MS : now - Math.max(oldest.value.sentAt, thread.onlineAt) < deadlineMs;
        if (held) return;
        fail(thread, new UnavailableError('Key delivery timed out on a JWE thread; retry', 1));
        void worker.terminate();
      }, Math.max(10, Math.floor(deadlineMs / 4))),
    };

    thread.watchdog.unref();
    worker.unref();
    worker.on('message', (reply: JweWorkerReply) => {
      if ('ready' in reply) {
        thread.onlineAt = performance.now();
        return;
      }
      const task = thread.tasks.get(reply.id);
      if (!task) return;
      thread.tasks.delete(reply.id);
      if ('jwe' in reply) task.resolve(reply.jwe);
      else task.reject(new Error(`JWE thread: ${reply.error}`));
    });
    worker.on('error', () => fail(thread, new UnavailableError('Key delivery failed on a JWE thread; retry', 1)));
    worker.on('exit', () => fail(thread, new UnavailableError('A JWE thread stopped; retry', 1)));
    threads.push(thread);
    return thread;
  }

  function leastBusyThread(): Thread {
    if (threads.length < threadCount) return startThread();
    let chosen = threads[0] as Thread;
    for (const thread of threads) if (thread.tasks.size < chosen.tasks.size) chosen = thread;
    return chosen;
  }

  return {
    encrypt(deliveryKey, deliveryKid, keys) {
      if (closed) return Promise.reject(new UnavailableError('Key delivery is shutting down'));
      const payload = keySetPayload(keys);
      const thread = leastBusyThread();
      const id = nextId++;
      return new Promise<string>((resolve, reject) => {
        thread.tasks.set(id, { resolve, reject, sentAt: performance.now() });
        try {
          const request: JweWorkerRequest = { id, jwk: deliveryKey.jwk, kid: deliveryKid, payload: payload.buffer as ArrayBuffer };
          thread.worker.postMessage(request, [request.payload]); // moved: `payload` is empty from here on
        } catch (error) {
          payload.fill(0);
          thread.tasks.delete(id);
          reject(error instanceof Error ? error : new Error('JWE thread: the payload could not be sent'));
        }
      });
    },
    async close() {
      closed = true;
      const running = threads.map((thread) => thread.worker);
      for (const thread of [...threads]) fail(thread, new UnavailableError('Key delivery is shutting down'));
      await Promise.allSettled(running.map((worker) => worker.terminate()));
    },
    async crashThreadsForTest() {
      await Promise.allSettled(threads.map((thread) => thread.worker.terminate()));
    },
  };
}
