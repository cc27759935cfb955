/**
 * Rotation policies: built-in defaults per level, stored defaults (PUT /v1/policies, partial,
 * validated, audited), per-group partial overrides with maintenance windows, the effective
 * policy the device lifecycle reads, and the window arithmetic.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inMaintenanceWindow, isInWindow } from '../../src/rotation/maintenance-window.js';
import { call, expectProblem } from '../support/flow.js';
import { createFleet, createGroup, DAY, events, type Fleet } from './support.js';

describe('rotation policies', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await createGroup(f, 'pumps', 2);
  });
  afterAll(async () => f.close());

  it('when nothing was stored, then GET /v1/policies answers the built-in defaults of DESIGN §3', async () => {
    const response = await call(f.t.app, f.admin, 'GET', '/v1/policies');
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toEqual({
      kek: { rotationPeriodDays: 365, gracePeriodDays: 30, retentionDays: null, destructionWaitDays: 7, percentPerDay: null, haltThreshold: null, graceRequiresAck: null, graceAckMaxHoldDays: null, source: 'built-in', updatedAt: null, updatedBy: null },
      group: { rotationPeriodDays: 90, gracePeriodDays: 0, retentionDays: 30, destructionWaitDays: 7, percentPerDay: null, haltThreshold: null, graceRequiresAck: null, graceAckMaxHoldDays: null, source: 'built-in', updatedAt: null, updatedBy: null },
      device: { rotationPeriodDays: 30, gracePeriodDays: 7, retentionDays: null, destructionWaitDays: 7, percentPerDay: 10, haltThreshold: 0.01, graceRequiresAck: true, graceAckMaxHoldDays: 30, source: 'built-in', updatedAt: null, updatedBy: null },
      field: { rotationPeriodDays: 7, gracePeriodDays: 2, retentionDays: null, destructionWaitDays: 7, percentPerDay: 20, haltThreshold: 0.01, graceRequiresAck: true, graceAckMaxHoldDays: 30, source: 'built-in', updatedAt: null, updatedBy: null },
    });
  });

  it('when an admin changes some fields of a level, then only those change, the row is stored, and the change is audited with before and after', async () => {
    const response = await call(f.t.app, f.admin, 'PUT', '/v1/policies', { device: { rotationPeriodDays: 60, retentionDays: 400 } });
    expect(response.status, response.raw).toBe(200);
    expect(response.body).toMatchObject({
      device: { rotationPeriodDays: 60, gracePeriodDays: 7, retentionDays: 400, percentPerDay: 10, source: 'stored', updatedBy: 'alice' },
      group: { source: 'built-in' },
    });
    const stored = await f.t.database.db.withTables<{ rotation_policies: { level: string; rotation_period_days: number } }>().selectFrom('rotation_policies').select(['level', 'rotation_period_days']).execute();
    expect(stored).toEqual([{ level: 'device', rotation_period_days: 60 }]);
    const [change] = await events(f, { action: 'policy.change' });
    expect(change).toMatchObject({
      actor: 'alice',
      outcome: 'success',
      details: { scope: 'default', before: { device: { rotationPeriodDays: 30, retentionDays: null } }, after: { device: { rotationPeriodDays: 60, retentionDays: 400 } } },
    });
  });

  it.each([
    [{ group: { gracePeriodDays: 3 } }, 'body.group.gracePeriodDays'],
    [{ device: { gracePeriodDays: 60 } }, 'body.device.gracePeriodDays'],
    [{ device: { percentPerDay: null } }, 'body.device.percentPerDay'],
    [{ kek: { percentPerDay: 10 } }, 'body.kek.percentPerDay'],
    [{ field: { destructionWaitDays: 31 } }, 'body.field.destructionWaitDays'],
    [{ field: { destructionWaitDays: 0 } }, 'body.field.destructionWaitDays'],
    [{ group: { rotationPeriodDays: 0 } }, 'body.group.rotationPeriodDays'],
    [{ group: { rotationPeriodDays: '90' } }, 'body.group.rotationPeriodDays'],
    [{ device: { haltThreshold: 2 } }, 'body.device.haltThreshold'],
    [{ device: { graceRequiresAck: null } }, 'body.device.graceRequiresAck'],
    [{ group: { graceRequiresAck: true } }, 'body.group.graceRequiresAck'],
    [{ field: { graceAckMaxHoldDays: 0 } }, 'body.field.graceAckMaxHoldDays'],
    [{ device: { rotationPeriod: 30 } }, 'body.device.rotationPeriod'],
    [{ device: {} }, 'body.device'],
    [{}, 'body'],
  ])('when the body is %j, then 400 naming %s and nothing changes', async (body, field) => {
    const before = await call(f.t.app, f.admin, 'GET', '/v1/policies');
    const response = await call(f.t.app, f.admin, 'PUT', '/v1/policies', body);
    expectProblem(response, 400);
    expect(String(response.body.field)).toContain(field);
    expect((await call(f.t.app, f.admin, 'GET', '/v1/policies')).body).toEqual(before.body);
  });

  it('when a group gets a partial override, then its effective policy merges it over the defaults, and the device lifecycle uses it', async () => {
    const put = await call(f.t.app, f.admin, 'PUT', '/v1/groups/pumps/policy', {
      device: { gracePeriodDays: 3 },
      maintenanceWindows: [{ days: [6, 7], start: '22:00', end: '04:00', tz: 'Europe/Berlin' }],
    });
    expect(put.status, put.raw).toBe(200);
    expect(put.body).toMatchObject({
      groupId: 'pumps',
      overrides: { device: { gracePeriodDays: 3 } },
      maintenanceWindows: [{ days: [6, 7], start: '22:00', end: '04:00', tz: 'Europe/Berlin' }],
      effective: { device: { rotationPeriodDays: 60, gracePeriodDays: 3, retentionDays: 400 }, group: { rotationPeriodDays: 90 } },
      updatedBy: 'alice',
    });
    expect((await call(f.t.app, f.admin, 'GET', '/v1/groups/pumps/policy')).body).toEqual(put.body);
    expect(await events(f, { action: 'policy.change', keyId: 'group:pumps' })).toHaveLength(1);

    // an immediate device rotation keeps the old primary in grace for the group's 3 days
    expect((await call(f.t.app, f.admin, 'POST', '/v1/devices/pumps-d00000/rotate', {})).status).toBe(200);
    const old = await f.t.database.db.selectFrom('device_versions').select(['state', 'state_until', 'state_changed_at']).where('device_id', '=', 'pumps-d00000').where('version', '=', 1).executeTakeFirstOrThrow();
    expect(old.state).toBe('grace');
    expect(old.state_until!.getTime() - old.state_changed_at.getTime()).toBe(3 * DAY);

    const cleared = await call(f.t.app, f.admin, 'PUT', '/v1/groups/pumps/policy', {});
    expect(cleared.body).toMatchObject({ overrides: {}, maintenanceWindows: [], effective: { device: { gracePeriodDays: 7 } }, updatedAt: null });
  });

  it('when a group override is invalid or the group unknown, then 400 / 404', async () => {
    const bad = async (body: unknown, field: string) => {
      const response = await call(f.t.app, f.admin, 'PUT', '/v1/groups/pumps/policy', body);
      expectProblem(response, 400);
      expect(String(response.body.field)).toContain(field);
    };
    await bad({ maintenanceWindows: [{ days: [1], start: '02:00', end: '05:00', tz: 'Mars/Olympus' }] }, 'body.maintenanceWindows.0.tz');
    await bad({ maintenanceWindows: [{ days: [1], start: '02:00', end: '02:00', tz: 'UTC' }] }, 'body.maintenanceWindows.0.end');
    await bad({ maintenanceWindows: [{ days: [0], start: '02:00', end: '05:00', tz: 'UTC' }] }, 'body.maintenanceWindows.0.days.0');
    await bad({ maintenanceWindows: [{ days: [1], start: '24:00', end: '05:00', tz: 'UTC' }] }, 'body.maintenanceWindows.0.start');
    await bad({ kek: { rotationPeriodDays: 30 } }, 'body.kek');
    await bad({ device: { gracePeriodDays: 90 } }, 'body.device.gracePeriodDays');
    expectProblem(await call(f.t.app, f.admin, 'PUT', '/v1/groups/nope/policy', {}), 404);
    expectProblem(await call(f.t.app, f.admin, 'GET', '/v1/groups/nope/policy'), 404);
    expectProblem(await call(f.t.app, f.rotator, 'GET', '/v1/policies'), 403);
  });
});

describe('maintenance windows', () => {
  const at = (iso: string) => new Date(iso);
  it('when a window runs within a day, then it is open from start (inclusive) to end (exclusive) on its days', () => {
    const w = { days: [1, 2, 3], start: '02:00', end: '05:00', tz: 'UTC' };
    expect(isInWindow(w, at('2026-11-23T01:59:59Z'))).toBe(false); // Monday
    expect(isInWindow(w, at('2026-11-23T02:00:00Z'))).toBe(true);
    expect(isInWindow(w, at('2026-11-23T04:59:00Z'))).toBe(true);
    expect(isInWindow(w, at('2026-11-23T05:00:00Z'))).toBe(false);
    expect(isInWindow(w, at('2026-11-26T03:00:00Z'))).toBe(false); // Thursday
  });
  it('when a window runs past midnight, then the morning belongs to the previous day', () => {
    const w = { days: [7], start: '22:00', end: '04:00', tz: 'UTC' }; // Sunday night
    expect(isInWindow(w, at('2026-11-22T23:00:00Z'))).toBe(true); // Sunday 23:00
    expect(isInWindow(w, at('2026-11-23T03:00:00Z'))).toBe(true); // Monday 03:00
    expect(isInWindow(w, at('2026-11-22T03:00:00Z'))).toBe(false); // Sunday 03:00 (Saturday night is not in it)
  });
  it('when the window names a time zone, then local time counts, daylight saving included', () => {
    const w = { days: [1, 2, 3, 4, 5, 6, 7], start: '02:00', end: '03:00', tz: 'Europe/Berlin' };
    expect(isInWindow(w, at('2026-01-15T01:30:00Z'))).toBe(true); // 02:30 CET
    expect(isInWindow(w, at('2026-07-15T00:30:00Z'))).toBe(true); // 02:30 CEST
    expect(isInWindow(w, at('2026-07-15T01:30:00Z'))).toBe(false); // 03:30 CEST
  });
  it('when there are no windows, then any time is allowed', () => {
    expect(inMaintenanceWindow([], new Date())).toBe(true);
  });
});
