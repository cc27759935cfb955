/**
 * A verify worker thread (audit.verify-pool.ts): receives the HMAC key once, as a KeyObject
 * (cloned between threads, never exported as bytes), then checks pages of the chain.
 */
import type { KeyObject } from 'node:crypto';
import { parentPort } from 'node:worker_threads';
import { verifyChainPage, type ChainPageData } from './audit.verify-page.js';

export type VerifyWorkerRequest =
  | { type: 'key'; key: KeyObject }
  | { type: 'page'; id: number; page: ChainPageData; from: number; to: number; hashesAt: number[] };

let key: KeyObject | undefined;
parentPort?.on('message', (message: VerifyWorkerRequest) => {
  if (message.type === 'key') {
    key = message.key;
    return;
  }
  try {
    if (key === undefined) throw new Error('The verify worker has no key');
    parentPort?.postMessage({ id: message.id, outcome: verifyChainPage(key, message.page, message.from, message.to, message.hashesAt) });
  } catch (error) {
    parentPort?.postMessage({ id: message.id, error: error instanceof Error ? error.message : 'verify worker failure' });
  }
});
