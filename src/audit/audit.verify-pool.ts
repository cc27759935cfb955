/**
 * Worker threads that recompute the chain's HMACs for `verify` (pages are independent: see
 * audit.verify-page.ts). The HMAC key reaches each worker as a KeyObject (structured clone of
 * the key handle, never its bytes in JavaScript). Workers are unref'd while idle, so a pool
 * never keeps the process alive, and are terminated by `close()`.
 *
 * Under tsx or vitest the worker is the TypeScript file, loaded through tsx; in the compiled
 * image, the JavaScript next to this module.
 */
import type { KeyObject } from 'node:crypto';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker, type WorkerOptions } from 'node:worker_threads';
import type { ChainPageData, PageOutcome } from './audit.verify-page.js';
import type { VerifyWorkerRequest } from './audit.verify.worker.js';

interface Slot {
  worker: Worker;
  inFlight: number;
}

export interface VerifyPool {
  readonly size: number;
  run(page: ChainPageData, from: number, to: number, hashesAt: number[]): Promise<PageOutcome>;
  close(): Promise<void>;
}

function workerEntry(): { url: URL; options: WorkerOptions } {
  if (!import.meta.url.endsWith('.ts')) return { url: new URL('./audit.verify.worker.js', import.meta.url), options: {} };
  // TypeScript source (tsx, vitest): a bootstrap module registers tsx in the worker, then loads it
  const api = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/index\.cjs$/, 'index.mjs')).href;
  const worker = new URL('./audit.verify.worker.ts', import.meta.url).href;
  const boot = `import { register } from ${JSON.stringify(api)}; register(); await import(${JSON.stringify(worker)});`;
  return { url: new URL(`data:text/javascript,${encodeURIComponent(boot)}`), options: { execArgv: [] } };
}

/** Start `size` workers holding `key`; resolves once every one is running. */
export async function startVerifyPool(size: number, key: KeyObject): Promise<VerifyPool> {
  const { url, options } = workerEntry();
  const slots: Slot[] = [];
  const pending = new Map<number, { resolve: (outcome: PageOutcome) => void; reject: (error: Error) => void; slot: Slot }>();
  let nextId = 1;
  let closed = false;

  const failAll = (error: Error) => {
    for (const [id, task] of pending) {
      pending.delete(id);
      task.reject(error);
    }
  };

  try {
    await Promise.all(
      Array.from({ length: size }, async () => {
        const worker = new Worker(url, options);
        const slot: Slot = { worker, inFlight: 0 };
        slots.push(slot);
        await new Promise<void>((resolve, reject) => {
          worker.once('online', resolve);
          worker.once('error', reject);
        });
        worker.on('message', (message: { id: number; outcome?: PageOutcome; error?: string }) => {
          const task = pending.get(message.id);
          if (!task) return;
          pending.delete(message.id);
          task.slot.inFlight -= 1;
          if (task.slot.inFlight === 0) task.slot.worker.unref();
          if (message.outcome) task.resolve(message.outcome);
          else task.reject(new Error(`audit verify worker: ${message.error ?? 'no result'}`));
        });
        worker.on('error', (error) => failAll(error));
        worker.on('exit', () => {
          if (!closed) failAll(new Error('An audit verify worker exited'));
        });
        worker.postMessage({ type: 'key', key } satisfies VerifyWorkerRequest);
        worker.unref();
      }),
    );
  } catch (error) {
    closed = true;
    await Promise.allSettled(slots.map((s) => s.worker.terminate()));
    throw error;
  }

  return {
    size,
    run(page, from, to, hashesAt) {
      if (closed) return Promise.reject(new Error('The audit verify pool is closed'));
      let slot = slots[0] as Slot;
      for (const s of slots) if (s.inFlight < slot.inFlight) slot = s;
      const id = nextId++;
      return new Promise<PageOutcome>((resolve, reject) => {
        pending.set(id, { resolve, reject, slot });
        if (slot.inFlight === 0) slot.worker.ref();
        slot.inFlight += 1;
        slot.worker.postMessage({ type: 'page', id, page, from, to, hashesAt } satisfies VerifyWorkerRequest);
      });
    },
    async close() {
      closed = true;
      failAll(new Error('The audit verify pool is closed'));
      await Promise.allSettled(slots.map((s) => s.worker.terminate()));
    },
  };
}
