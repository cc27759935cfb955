/**
 * JWEs encrypted on worker threads (crypto/jwe-threads.ts, issue 7): the same construction as
 * jwe.ts on the event loop (jose decrypts every output), each delivery to its own recipient
 * under concurrency, a fresh ephemeral key every time, the payload moved off the event loop,
 * a crashed or stuck thread failing only its deliveries with a retryable 503 and replaced on the next call.
 */
import crypto from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { compactDecrypt, decodeProtectedHeader, exportJWK, generateKeyPair, type CryptoKey } from 'jose';
import { createJweEncryptor, type JweEncryptor } from '../../src/crypto/jwe-threads.js';
import { importDeliveryKey, parseDeliveryJwk, type DeliveredKey, type DeliveryKey } from '../../src/crypto/jwe.js';
import { UnavailableError } from '../../src/http/errors.js';

interface Recipient {
  deliveryKey: DeliveryKey;
  kid: string;
  privateKey: CryptoKey;
}

async function recipient(crv: 'X25519' | 'P-256'): Promise<Recipient> {
  const { publicKey, privateKey } = await generateKeyPair('ECDH-ES+A256KW', { crv, extractable: true });
  const { jwk, kid } = await parseDeliveryJwk((await exportJWK(publicKey)) as Record<string, unknown>);
  return { deliveryKey: await importDeliveryKey(jwk), kid, privateKey };
}

async function decryptSet(jwe: string, privateKey: CryptoKey): Promise<Array<{ kid: string; k: string; state: string }>> {
  const { plaintext } = await compactDecrypt(jwe, privateKey);
  return (JSON.parse(new TextDecoder().decode(plaintext)) as { keys: Array<{ kid: string; k: string; state: string }> }).keys;
}

const keyOf = (n: number): DeliveredKey => ({ kid: `device-${n}:v1`, key: crypto.createHash('sha256').update(String(n)).digest(), meta: { state: 'primary' } });

describe('JWE threads', () => {
  let encryptor: JweEncryptor | undefined;
  afterEach(async () => {
    await encryptor?.close();
    encryptor = undefined;
  });

  for (const threads of [0, 1, 2]) {
    it(`when ${threads} thread(s) encrypt 200 concurrent deliveries to X25519 and P-256 keys, then each decrypts with its recipient's key to exactly its own keys`, async () => {
      encryptor = createJweEncryptor(threads);
      const recipients = [await recipient('X25519'), await recipient('P-256')];
      const jwes = await Promise.all(
        Array.from({ length: 200 }, (_, n) => {
          const to = recipients[n % 2] as Recipient;
          return encryptor!.encrypt(to.deliveryKey, to.kid, [keyOf(n)]);
        }),
      );
      const epks = new Set<string>();
      for (const [n, jwe] of jwes.entries()) {
        const to = recipients[n % 2] as Recipient;
        const header = decodeProtectedHeader(jwe);
        expect(header).toMatchObject({ alg: 'ECDH-ES+A256KW', enc: 'A256GCM', kid: to.kid, cty: 'jwk-set+json' });
        epks.add(JSON.stringify(header.epk));
        const keys = await decryptSet(jwe, to.privateKey);
        expect(keys).toEqual([{ state: 'primary', kty: 'oct', alg: 'A256GCM', kid: `device-${n}:v1`, k: keyOf(n).key.toString('base64url') }]);
        await expect(decryptSet(jwe, (recipients[(n + 1) % 2] as Recipient).privateKey)).rejects.toThrow();
      }
      expect(epks.size).toBe(200); // a fresh ephemeral key for every delivery
    });
  }

  it('when a 1,000-key set goes to a thread, then it decrypts whole, and the keys handed in are left for the caller to zero', async () => {
    encryptor = createJweEncryptor(1);
    const to = await recipient('X25519');
    const keys = Array.from({ length: 1000 }, (_, n) => keyOf(n));
    const jwe = await encryptor.encrypt(to.deliveryKey, to.kid, keys);
    const delivered = await decryptSet(jwe, to.privateKey);
    expect(delivered.map((k) => k.kid)).toEqual(keys.map((k) => k.kid));
    expect(delivered.map((k) => Buffer.from(k.k, 'base64url'))).toEqual(keys.map((k) => k.key));
  });

  it('when the threads crash with deliveries on them, then those fail with a retryable 503 and the next delivery starts a new thread', async () => {
    encryptor = createJweEncryptor(1);
    const to = await recipient('X25519');
    await encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(1)]); // the thread is running
    const inFlight = Array.from({ length: 20 }, (_, n) => encryptor!.encrypt(to.deliveryKey, to.kid, [keyOf(n)]));
    await encryptor.crashThreadsForTest();
    const outcomes = await Promise.allSettled(inFlight);
    const failures = outcomes.filter((o): o is PromiseRejectedResult => o.status === 'rejected');
    expect(failures.length).toBeGreaterThan(0); // some were still on the thread when it stopped
    for (const failure of failures) {
      expect(failure.reason).toBeInstanceOf(UnavailableError);
      expect(failure.reason).toMatchObject({ status: 503 });
    }
    const jwe = await encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(2)]);
    expect((await decryptSet(jwe, to.privateKey))[0]?.kid).toBe('device-2:v1');
  });

  it('when a delivery is held on its thread past the deadline, then the deliveries there fail with a retryable 503 and the next one gets a new thread', async () => {
    encryptor = createJweEncryptor(1, { taskDeadlineMs: 5 });
    const to = await recipient('X25519');
    await encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(1)]); // the thread is running
    // ~10 MB of JWK Set: far more than 5 ms of work for the thread
    const huge = Array.from({ length: 100_000 }, (_, n) => keyOf(n));
    await expect(encryptor.encrypt(to.deliveryKey, to.kid, huge)).rejects.toMatchObject({ status: 503, message: expect.stringMatching(/timed out/) });
    const jwe = await encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(3)]);
    expect((await decryptSet(jwe, to.privateKey))[0]?.kid).toBe('device-3:v1');
  });

  it('when closed, then a delivery is refused with a 503 and the process is not kept alive', async () => {
    encryptor = createJweEncryptor(1);
    const to = await recipient('X25519');
    await encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(1)]);
    await encryptor.close();
    await expect(encryptor.encrypt(to.deliveryKey, to.kid, [keyOf(1)])).rejects.toBeInstanceOf(UnavailableError);
  });
});
