/**
 * A delivery JWE never deadlocks its thread (issue 7). On Node 20, exporting a freshly
 * generated key pair's public key as a JWK could deadlock: the export holds the key's mutex
 * while it allocates, and a garbage collection there that frees the finished generation job
 * (which takes the same mutex as it is destroyed) never returns. It hung the server's event
 * loop, or its JWE thread, once in every 5,000–30,000 deliveries. This runs 60,000 encryptions
 * in a child process with a tiny young generation (a scavenge every few hundred JWEs), where
 * the old code hung every time tried; the child must finish within its deadline.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const JWE_MODULE = process.env.JWE_DEADLOCK_MODULE ?? fileURLToPath(new URL('../../src/crypto/jwe.ts', import.meta.url));
const ENCRYPTIONS = 60_000;
const DEADLINE_MS = 60_000;

const CHILD = `
import crypto from 'node:crypto';
const { encryptPayload, importDeliveryKey } = await import(process.env.JWE_MODULE);
const recipients = [];
for (const [type, options] of [['x25519', undefined], ['ec', { namedCurve: 'prime256v1' }]]) {
  const { publicKey } = crypto.generateKeyPairSync(type, options);
  recipients.push(await importDeliveryKey(publicKey.export({ format: 'jwk' })));
}
const payload = Buffer.from('{"keys":[]}');
let count = 0;
for (let i = 0; i < ${ENCRYPTIONS}; i++) if (encryptPayload(recipients[i % 8 === 0 ? 1 : 0], 'kid-1', payload).split('.').length === 5) count++;
process.stdout.write('encrypted ' + count);
`;

function runChild(): Promise<{ finished: boolean; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', '--max-semi-space-size=1', '--input-type=module', '-e', CHILD], {
      env: { ...process.env, JWE_MODULE: JWE_MODULE },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), DEADLINE_MS);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ finished: code === 0 && signal === null, stdout, stderr });
    });
  });
}

describe('delivery JWE encryption under garbage collection', () => {
  it(`finishes ${ENCRYPTIONS.toLocaleString('en')} encryptions (X25519 and P-256) without hanging`, { timeout: DEADLINE_MS + 30_000 }, async () => {
    const result = await runChild();
    expect(result.stderr).toBe('');
    expect(result.finished, 'the encryptions did not finish before the deadline: a deadlocked thread').toBe(true);
    expect(result.stdout).toBe(`encrypted ${ENCRYPTIONS}`);
  });
});
