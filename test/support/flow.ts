/** Small helpers that walk the API like a newcomer does, through app.inject. */
import { compactDecrypt, exportJWK, generateKeyPair, type CryptoKey } from 'jose';
import { expect } from 'vitest';
import type { KeystrataApp } from '../../src/app.js';

export interface DeliveredJwk {
  kty: 'oct';
  alg: string;
  kid: string;
  k: string;
  state: string;
  version: number;
  deviceId: string;
  field?: string;
  stateUntil: string | null;
}

export async function call(app: KeystrataApp, token: string | undefined, method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, payload?: unknown) {
  const response = await app.inject({
    method,
    url,
    headers: token ? { authorization: `Bearer ${token}` } : {},
    ...(payload !== undefined ? { payload: payload as Record<string, unknown> } : {}),
  });
  return { status: response.statusCode, body: response.body ? (JSON.parse(response.body) as Record<string, unknown>) : {}, headers: response.headers, raw: response.body };
}

export async function newDeliveryKeyPair(crv: 'X25519' | 'P-256' = 'X25519'): Promise<{ publicJwk: Record<string, unknown>; privateKey: CryptoKey }> {
  const { publicKey, privateKey } = await generateKeyPair('ECDH-ES+A256KW', { crv, extractable: true });
  return { publicJwk: (await exportJWK(publicKey)) as Record<string, unknown>, privateKey };
}

export async function decryptKeySet(jwe: string, privateKey: CryptoKey): Promise<DeliveredJwk[]> {
  const { plaintext } = await compactDecrypt(jwe, privateKey);
  const set = JSON.parse(new TextDecoder().decode(plaintext)) as { keys: DeliveredJwk[] };
  return set.keys;
}

export function expectProblem(response: { status: number; body: Record<string, unknown>; headers: Record<string, unknown> }, status: number, code?: string): void {
  expect(response.status, JSON.stringify(response.body)).toBe(status);
  expect(response.headers['content-type']).toMatch(/^application\/problem\+json/);
  expect(response.body).toMatchObject({ status, type: expect.any(String), title: expect.any(String), detail: expect.any(String) });
  if (code) expect(response.body.code).toBe(code);
}
