/**
 * A JWE thread (jwe-threads.ts): encrypts key-set payloads to delivery keys off the event loop.
 * The payload's bytes are moved here (transferred, not copied) and zeroed once encrypted.
 */
import crypto from 'node:crypto';
import { parentPort } from 'node:worker_threads';
import { encryptPayload, type DeliveryJwk, type DeliveryKey } from './jwe.js';

export interface JweWorkerRequest {
  id: number;
  jwk: DeliveryJwk;
  kid: string;
  payload: ArrayBuffer;
}

export type JweWorkerReply = { id: number; jwe: string } | { id: number; error: string } | { ready: true };

/** Delivery keys imported once per thread: a backend keeps its key for months. Public keys only. */
const MAX_IMPORTED_KEYS = 1000;
const imported = new Map<string, DeliveryKey>();

function deliveryKeyFor(jwk: DeliveryJwk, kid: string): DeliveryKey {
  const id = `${kid}.${jwk.x}.${jwk.kty === 'EC' ? jwk.y : ''}`;
  let key = imported.get(id);
  if (key === undefined) {
    if (imported.size >= MAX_IMPORTED_KEYS) imported.clear();
    key = { jwk, publicKey: crypto.createPublicKey({ key: jwk, format: 'jwk' }) };
    imported.set(id, key);
  }
  return key;
}

parentPort?.on('message', (request: JweWorkerRequest) => {
  const payload = Buffer.from(request.payload);
  let reply: JweWorkerReply;
  try {
    reply = { id: request.id, jwe: encryptPayload(deliveryKeyFor(request.jwk, request.kid), request.kid, payload) };
  } catch (error) {
    reply = { id: request.id, error: error instanceof Error ? error.message : 'JWE thread failure' };
  } finally {
    payload.fill(0);
  }
  parentPort?.postMessage(reply);
});

// the thread counts its deliveries' deadline from here, not from its (slower) start
parentPort?.postMessage({ ready: true } satisfies JweWorkerReply);
