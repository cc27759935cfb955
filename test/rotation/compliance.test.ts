/**
 * The cryptoperiod report: configured originator- and recipient-usage periods per key type,
 * and every version past them, each judged by its own group's effective policy.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, createGroup, DAY, runCron, type Fleet } from './support.js';

interface Report {
  levels: Array<{ level: string; originatorUsageDays: number; recipientUsageDays: number | null; groupsWithOverrides: number; pastOriginatorUsage: number; pastRecipientUsage: number; overdue: Array<{ keyId: string; version: number; state: string; period: string; endedAt: string }> }>;
}

describe('the cryptoperiod report', () => {
  let f: Fleet;
  let auditor: string;
  beforeAll(async () => {
    f = await createFleet();
    auditor = await f.t.token('keystrata:audit:read', { sub: 'auditor' });
    await createGroup(f, 'pumps', 5);
    await createGroup(f, 'slow', 3);
    expect((await call(f.t.app, f.admin, 'PUT', '/v1/groups/slow/policy', { device: { rotationPeriodDays: 60 } })).status).toBe(200);
  });
  afterAll(async () => f.close());

  const report = async (): Promise<Report> => {
    const response = await call(f.t.app, auditor, 'GET', '/v1/compliance/cryptoperiods');
    expect(response.status, response.raw).toBe(200);
    return response.body as unknown as Report;
  };
  const level = (r: Report, name: string) => r.levels.find((l) => l.level === name)!;

  it('when nothing is old yet, then the configured periods are listed and nothing is overdue', async () => {
    const r = await report();
    expect(r.levels.map((l) => [l.level, l.originatorUsageDays, l.recipientUsageDays, l.groupsWithOverrides, l.pastOriginatorUsage, l.pastRecipientUsage])).toEqual([
      ['kek', 365, 30, 0, 0, 0],
      ['group', 90, 30, 0, 0, 0],
      ['device', 37, null, 1, 0, 0],
      ['field', 9, null, 0, 0, 0],
    ]);
  });

  it('when versions outlive their periods, then each is listed under its own group policy, and rotating them clears the report', async () => {
    expect((await call(f.t.app, f.admin, 'POST', '/v1/kek/rotate', {})).status).toBe(200);
    expect((await call(f.t.app, f.admin, 'POST', '/v1/groups/pumps/rotate', {})).status).toBe(200);
    f.clock.advance(38 * DAY);
    const r = await report();
    // device DEKs of `pumps` are past 30 + 7 days; those of `slow` have 60 + 7
    expect(level(r, 'device')).toMatchObject({ pastOriginatorUsage: 5, pastRecipientUsage: 0 });
    expect(level(r, 'device').overdue.map((o) => o.keyId).sort()).toEqual(['device:pumps-d00000', 'device:pumps-d00001', 'device:pumps-d00002', 'device:pumps-d00003', 'device:pumps-d00004']);
    expect(level(r, 'device').overdue[0]).toMatchObject({ version: 1, state: 'primary', period: 'originator' });
    const ended = new Date(level(r, 'device').overdue[0]!.endedAt).getTime();
    expect(Math.abs(f.clock.now().getTime() - DAY - ended)).toBeLessThan(60_000);
    // the old group version, decrypt_only for 38 days (retention 30), and the KEK version 1, still decryptable 38 days after it was replaced (grace 30)
    expect(level(r, 'group').overdue).toMatchObject([{ keyId: 'group:pumps', version: 1, state: 'decrypt_only', period: 'recipient' }]);
    expect(level(r, 'kek').overdue).toMatchObject([{ keyId: 'kek:keystrata-kek', version: 1, state: 'decrypt_only', period: 'recipient' }]);

    // cron raises the KEK minimum and schedules the group version's destruction
    await runCron(f);
    const after = await report();
    expect(level(after, 'kek').pastRecipientUsage).toBe(0);
    expect(level(after, 'group').pastRecipientUsage).toBe(0);
  });

  it('when the caller may not read audit data, then 403', async () => {
    expectProblem(await call(f.t.app, f.rotator, 'GET', '/v1/compliance/cryptoperiods'), 403);
    expectProblem(await call(f.t.app, auditor, 'GET', '/v1/compliance/cryptoperiods?limit=0'), 400);
  });
});
