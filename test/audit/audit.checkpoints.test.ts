import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CompactSign, compactVerify, decodeProtectedHeader, exportJWK, generateKeyPair, importJWK } from 'jose';
import { CHECKPOINT_TYP, type CheckpointList } from '../../src/audit/audit.service.js';
import { BadRequestError } from '../../src/http/errors.js';
import { createAuditFixture, type AuditFixture } from './support.js';

/**
 * What an auditor does offline with the JSON of GET /v1/audit/checkpoints and nothing else:
 * import the exported public JWK, verify each JWS, read the signed head.
 */
async function verifyOffline(exported: string): Promise<Array<{ position: number; hash: string; time: string } | 'invalid'>> {
  const { publicKey, items } = JSON.parse(exported) as CheckpointList;
  const key = await importJWK(publicKey, 'Ed25519');
  return Promise.all(
    items.map(async ({ jws }) => {
      try {
        const { payload, protectedHeader } = await compactVerify(jws, key, { algorithms: ['Ed25519'] });
        if (protectedHeader.kid !== publicKey.kid || protectedHeader.typ !== CHECKPOINT_TYP) return 'invalid' as const;
        return JSON.parse(new TextDecoder().decode(payload)) as { position: number; hash: string; time: string };
      } catch {
        return 'invalid' as const;
      }
    }),
  );
}

describe('signed checkpoints', () => {
  let f: AuditFixture;
  beforeAll(async () => {
    f = await createAuditFixture();
    await f.audit.record(f.database.db, [
      { actor: 'alice', action: 'group.create', outcome: 'success', keyId: 'group:g1' },
      { actor: 'alice', action: 'device.enrol', outcome: 'success', keyId: 'device:d1' },
    ]);
  });
  afterAll(async () => f.close());

  it('when a checkpoint is exported, then it verifies offline with only the exported public JWK and names the chain head', async () => {
    const checkpoint = await f.audit.createCheckpoint();
    const exported = JSON.stringify(await f.audit.listCheckpoints());
    const [signed] = await verifyOffline(exported);
    const head = (await f.audit.queryEvents({ order: 'desc' }, undefined, 1)).items[0];
    expect(signed).toEqual({ position: 2, hash: head?.hash, time: checkpoint.time, kekName: 'keystrata-kek' });
    expect(decodeProtectedHeader(checkpoint.jws)).toMatchObject({ alg: 'Ed25519', typ: CHECKPOINT_TYP });
    // the export carries a public key only
    expect(Object.keys(JSON.parse(exported).publicKey).sort()).toEqual(['alg', 'crv', 'kid', 'kty', 'use', 'x']);
  });

  it('when a checkpoint is forged with another key, or its payload altered, then offline verification refuses it', async () => {
    const list = await f.audit.listCheckpoints();
    const genuine = list.items[0]!;
    const mallory = await generateKeyPair('Ed25519');
    const forgedPayload = { position: 99, hash: 'ab'.repeat(32), time: genuine.time, kekName: 'keystrata-kek' };
    const forged = await new CompactSign(new TextEncoder().encode(JSON.stringify(forgedPayload)))
      .setProtectedHeader({ alg: 'Ed25519', typ: CHECKPOINT_TYP, kid: list.publicKey.kid })
      .sign(mallory.privateKey);
    const [header, , signature] = genuine.jws.split('.');
    const altered = `${header}.${Buffer.from(JSON.stringify(forgedPayload)).toString('base64url')}.${signature}`;
    const exported = JSON.stringify({ ...list, items: [{ ...genuine, jws: forged }, { ...genuine, jws: altered }, genuine] });
    expect(await verifyOffline(exported)).toEqual(['invalid', 'invalid', expect.objectContaining({ position: genuine.position })]);

    // and an export whose public key was swapped for mallory's does not verify the genuine checkpoint
    const swapped = JSON.stringify({ ...list, publicKey: { ...(await exportJWK(mallory.publicKey)), kid: list.publicKey.kid, alg: 'Ed25519', use: 'sig' } });
    expect((await verifyOffline(swapped)).every((r) => r === 'invalid')).toBe(true);
  });

  it('when the key is reloaded by another replica, then it exports the same public key', async () => {
    const replica = await f.replica();
    expect((await replica.listCheckpoints()).publicKey).toEqual((await f.audit.listCheckpoints()).publicKey);
  });

  it('when there are more checkpoints than a page, then they come newest first with a cursor', async () => {
    for (let i = 0; i < 3; i++) {
      f.clock.advance(1000);
      await f.audit.createCheckpoint();
    }
    const all = (await f.audit.listCheckpoints({ limit: 100 })).items.map((c) => c.id);
    expect(all.length).toBe(4);
    const paged: number[] = [];
    let cursor: string | undefined;
    do {
      const page = await f.audit.listCheckpoints({ limit: 3, cursor });
      paged.push(...page.items.map((c) => c.id));
      cursor = page.nextCursor;
    } while (cursor !== undefined);
    expect(paged).toEqual(all);
    expect(all).toEqual([...all].sort((a, b) => b - a));
    await expect(f.audit.listCheckpoints({ cursor: 'bm9wZQ' })).rejects.toBeInstanceOf(BadRequestError);
  });

  it('when the chain has not moved since the last checkpoint, then the periodic signer skips it; when it moved, then it signs', async () => {
    expect(await f.audit.checkpointIfChanged()).toBeUndefined();
    await f.audit.recordRead([{ actor: 'bob', action: 'key.deliver', outcome: 'success', keyId: 'device:d1' }]);
    expect(await f.audit.checkpointIfChanged()).toMatchObject({ position: 3 });
  });

  it('when a checkpoint interval is set, then the timer signs the moving head by itself', async () => {
    const timed = await f.replica({ checkpointIntervalMs: 20 });
    await f.audit.recordRead([{ actor: 'bob', action: 'key.deliver', outcome: 'success', keyId: 'device:d1' }]);
    const head = await f.audit.chainLength();
    await expect.poll(async () => (await f.audit.listCheckpoints({ limit: 1 })).items[0]?.position, { timeout: 3000, interval: 20 }).toBe(head);
    await timed.close();
  });

  it('when checkpoints are stored, then they cannot be updated or deleted', async () => {
    await expect(f.database.db.updateTable('audit_checkpoints').set({ kid: 'x' } as never).execute()).rejects.toThrow(/append-only/);
    await expect(f.database.db.deleteFrom('audit_checkpoints').execute()).rejects.toThrow(/append-only/);
  });
});
