/**
 * The logger's scrubbing (src/logger.ts): whatever object a log call is given, values under a
 * secret-like name (any depth, any case), raw bytes, and secrets inside Errors never reach the
 * line; ordinary fields do. test/http/logs.test.ts checks the same end to end over a whole flow.
 */
import { describe, expect, it } from 'vitest';
import { createLogger, SCRUB_DEPTH, scrubSecrets } from '../../src/logger.js';

function capture() {
  const lines: string[] = [];
  const logger = createLogger('debug', { write: (line: string) => void lines.push(line) } as never);
  return { logger, text: () => lines.join('') };
}

describe('log scrubbing', () => {
  it('when secrets sit at any depth, in any case, in Errors, child bindings or bytes, then none is written and ordinary fields are', () => {
    const { logger, text } = capture();
    const error = Object.assign(new Error('vault said no'), { token: 'S-ERRTOKEN', response: { headers: { 'X-Vault-Token': 'S-VAULTTOKEN' } } });
    logger.error({ err: error, deviceId: 'dev-1' }, 'failed');
    logger.warn(error, 'bare error');
    logger.info({ l1: { l2: { l3: { l4: { l5: { jwe: 'S-DEEPJWE', status: 'kept-1' } } } } } }, 'deep');
    logger.info({ Authorization: 'Bearer S-AUTH', headers: { cookie: 'S-COOKIE' }, wrappedKey: 'S-WRAPPED', PRIVATEKEY: 'S-PRIV' }, 'names');
    logger.info({ list: [{ k: 'S-JWKK', kid: 'kept-2' }], raw: Buffer.from('S-RAWBYTES'), view: new Uint8Array([1, 2, 3]) }, 'arrays');
    logger.child({ token: 'S-CHILDTOKEN', component: 'kept-3' }).info({ when: new Date('2026-01-02T03:04:05Z') }, 'child');
    const written = text();
    for (const secret of ['S-ERRTOKEN', 'S-VAULTTOKEN', 'S-DEEPJWE', 'S-AUTH', 'S-COOKIE', 'S-WRAPPED', 'S-PRIV', 'S-JWKK', 'S-RAWBYTES', 'S-CHILDTOKEN']) {
      expect(written).not.toContain(secret);
    }
    expect(Buffer.from('S-RAWBYTES').toString('base64').length).toBeGreaterThan(8);
    expect(written).not.toContain(Buffer.from('S-RAWBYTES').toString('base64'));
    for (const kept of ['kept-1', 'kept-2', 'kept-3', 'dev-1', 'vault said no', '2026-01-02T03:04:05.000Z', '"type":"Error"']) expect(written).toContain(kept);
  });

  it('when an object nests deeper than the limit or refers to itself, then it is cut, not followed', () => {
    type Node = { next?: Node; token?: string };
    const loop: Node = { token: 'S-LOOP' };
    loop.next = loop;
    const scrubbed = JSON.stringify(scrubSecrets({ loop }));
    expect(scrubbed).not.toContain('S-LOOP');
    expect(scrubbed).toContain('[depth limit]');
    expect(scrubbed.split('"next"').length - 1).toBeLessThanOrEqual(SCRUB_DEPTH);
  });
});
