import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sql } from 'kysely';
import { runAuditVerify } from '../../src/audit/audit.cli.js';
import { createAuditFixture, type AuditFixture } from './support.js';

describe('keystrata audit verify', () => {
  let f: AuditFixture;
  beforeAll(async () => {
    f = await createAuditFixture();
    await f.audit.record(
      f.database.db,
      Array.from({ length: 5 }, (_, i) => ({ actor: 'cli', action: 'test.event', outcome: 'success' as const, details: { i } })),
    );
  });
  afterAll(async () => f.close());

  async function run(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    let stdout = '';
    let stderr = '';
    const code = await runAuditVerify({
      audit: f.audit,
      args,
      stdout: { write: (text: string) => (stdout += text) },
      stderr: { write: (text: string) => (stderr += text) },
    });
    return { code, stdout, stderr };
  }

  it('when the chain is intact, then it prints OK and exits 0', async () => {
    expect(await run()).toEqual({ code: 0, stdout: 'audit chain OK: 5 events verified (positions 1..5), 0 signed checkpoints matched, head matches\n', stderr: '' });
    const json = await run('--json', '--from', '3');
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({ ok: true, checked: 3, fromPosition: 3 });
  });

  it('when the arguments are wrong, then it prints the usage and exits 2', async () => {
    for (const args of [['--from', 'x'], ['--from', '0'], ['--from', '1', '--from-checkpoint', '1'], ['--bogus'], ['extra']]) {
      const result = await run(...args);
      expect(result.code, args.join(' ')).toBe(2);
      expect(result.stderr).toMatch(/usage: keystrata audit verify/);
    }
  });

  it('when verification cannot run, then it says why and exits 2', async () => {
    expect(await run('--from-checkpoint', '77')).toEqual({ code: 2, stdout: '', stderr: 'keystrata audit verify: could not verify: Checkpoint 77 does not exist\n' });
  });

  it('when an event was changed, then it names the first bad position and exits 1', async () => {
    await f.database.db.transaction().execute(async (trx) => {
      await sql`alter table audit_events disable trigger user`.execute(trx);
      await sql`update audit_events set details = '{"i": 40}' where position = 4`.execute(trx);
      await sql`alter table audit_events enable trigger user`.execute(trx);
    });
    const result = await run();
    expect(result.code).toBe(1);
    expect(result.stdout).toMatch(/^audit chain BROKEN at position 4: hash_mismatch/);
  });
});
