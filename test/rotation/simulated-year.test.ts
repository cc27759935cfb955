/**
 * A simulated year on a fleet: the manual clock moves day by day and the cron entry runs each
 * day with the default policies (KEK yearly; groups quarterly with 30 days' retention and a
 * 7-day waiting period; device DEKs monthly and field keys weekly through the staggered
 * rollouts cron starts when a level falls due). A few devices are also rotated immediately and
 * one is crypto-shredded. After every run, every stored version with material unwraps
 * (KEK → group → device → field), no primary outlives its rotation period by more than its
 * rollout takes, and the destroyed versions have no material.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call } from '../support/flow.js';
import { createFleet, createGroup, DAY, events, fetchDeviceKeys, runCron, storedDeviceKeys, storedFieldKey, type Fleet } from './support.js';

const GROUPS = ['east', 'west', 'south'];
const DEVICES = 200;

describe('a simulated year', () => {
  let f: Fleet;
  const devices = new Map<string, string[]>();
  beforeAll(async () => {
    f = await createFleet({ readerGroups: GROUPS });
    for (const g of GROUPS) {
      devices.set(g, await createGroup(f, g, DEVICES));
      for (const id of devices.get(g)!.slice(0, 10)) expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/fields`, { field: 'patient_id' })).status).toBe(201);
    }
  });
  afterAll(async () => f.close());

  it('when cron runs every day for a year, then every rotation happens when due, everything live stays readable, and the destroyed is gone', { timeout: 600_000 }, async () => {
    const start = f.clock.now();
    const figures = { rolloutsStarted: 0, rolloutDevices: 0, rolloutFields: 0, maxDevicePrimaryAgeDays: 0, maxFieldPrimaryAgeDays: 0, kekRotations: 0, groupRotations: 0, groupVersionsDestroyed: 0, deviceRotations: 0, childrenRewrapped: 0, graceExpired: 0, destroyed: 0, minDecryptionRaises: 0, runs: 0, runMs: 0, checkMs: 0 };
    const rotationDays: Record<string, number[]> = { kek: [], group: [] };
    const fieldKeyBefore = await storedFieldKey(f, 'east', devices.get('east')![3]!, 'patient_id', 1);
    const began = Date.now();

    for (let day = 1; day <= 366; day++) {
      f.clock.set(new Date(start.getTime() + day * DAY));
      // an immediate rotation now and then (suspected compromise), on top of the rollouts
      if (day % 30 === 15) {
        for (const g of GROUPS) {
          const id = devices.get(g)![day % DEVICES]!;
          if (id === 'west-d00050' && day >= 100) continue;
          expect((await call(f.t.app, f.admin, 'POST', `/v1/devices/${id}/rotate`, {})).status).toBe(200);
          figures.deviceRotations += 1;
        }
      }
      if (day === 100) expect((await call(f.t.app, f.admin, 'DELETE', '/v1/devices/west-d00050')).status).toBe(202);

      const t0 = Date.now();
      const summary = await runCron(f);
      figures.runMs += Date.now() - t0;
      figures.runs += 1;
      expect(summary.errors, `day ${day}`).toEqual([]);
      expect(summary.complete, `day ${day}`).toBe(true);
      if (summary.kek?.rotated) {
        figures.kekRotations += 1;
        rotationDays.kek!.push(day);
      }
      if (summary.kek?.minDecryptionVersion.raised) figures.minDecryptionRaises += 1;
      if (summary.groups.rotated.length > 0) rotationDays.group!.push(day);
      figures.groupRotations += summary.groups.rotated.length;
      figures.groupVersionsDestroyed += summary.groups.retired.filter((r) => r.to === 'destroyed').length;
      figures.childrenRewrapped += summary.groups.children.rewrapped;
      figures.graceExpired += (summary.sweeps.graceExpired?.devices ?? 0) + (summary.sweeps.graceExpired?.fields ?? 0);
      figures.destroyed += (summary.sweeps.destroyed?.devices ?? 0) + (summary.sweeps.destroyed?.fields ?? 0);
      const rollouts = summary.devices.rollouts as 'not_available' | { started: unknown[]; devices: number; fields: number; failed: number };
      expect(rollouts, 'the rollout module runs from the cron entry').not.toBe('not_available');
      if (rollouts !== 'not_available') {
        expect(rollouts.failed, `day ${day}`).toBe(0);
        figures.rolloutsStarted += rollouts.started.length;
        figures.rolloutDevices += rollouts.devices;
        figures.rolloutFields += rollouts.fields;
      }
      // the oldest primary of each level (the shredded device's is erased, not primary)
      const age = async (table: 'device_versions' | 'field_versions') => {
        const row = await f.t.database.db.selectFrom(table).select((eb) => eb.fn.min('created_at').as('oldest')).where('state', '=', 'primary').executeTakeFirstOrThrow();
        return (f.clock.now().getTime() - new Date(row.oldest as unknown as string).getTime()) / DAY;
      };
      figures.maxDevicePrimaryAgeDays = Math.max(figures.maxDevicePrimaryAgeDays, await age('device_versions'));
      figures.maxFieldPrimaryAgeDays = Math.max(figures.maxFieldPrimaryAgeDays, await age('field_versions'));

      // every version with material unwraps from its row (throws otherwise)
      const t1 = Date.now();
      for (const g of GROUPS) await storedDeviceKeys(f, g);
      figures.checkMs += Date.now() - t1;
      if (day % 30 === 0) {
        const stored = await storedDeviceKeys(f, 'east');
        const id = devices.get('east')![199]!;
        expect(Buffer.from((await fetchDeviceKeys(f, id))[0]!.k, 'base64url').equals(stored.get(`${id}:v1`)!)).toBe(true);
        expect((await storedFieldKey(f, 'east', devices.get('east')![3]!, 'patient_id', 1)).equals(fieldKeyBefore)).toBe(true);
      }
    }
    const wallMs = Date.now() - began;

    // KEK: once, on the first run a year after it was created (by the provider, a few ms after
    // the simulation's day 0: so day 366); its old version still decrypts (30 days' grace)
    expect(rotationDays.kek).toEqual([366]);
    expect(figures.minDecryptionRaises).toBe(0);
    // groups: every 90 days; each old version destroyed 30 + 7 days after it was replaced
    expect(rotationDays.group).toEqual([90, 180, 270, 360]);
    expect(figures.groupRotations).toBe(12);
    expect(figures.groupVersionsDestroyed).toBe(9);
    for (const g of GROUPS) {
      const versions = await f.t.database.db.selectFrom('group_versions').select(['version', 'state']).where('group_id', '=', g).orderBy('version').execute();
      expect(versions.map((v) => v.state)).toEqual(['destroyed', 'destroyed', 'destroyed', 'decrypt_only', 'primary']);
    }
    // the shredded device: every version's material erased, not delivered any more
    const shredded = await f.t.database.db.selectFrom('device_versions').select(['state', 'wrapped_key']).where('device_id', '=', 'west-d00050').execute();
    expect(shredded.length).toBeGreaterThan(0);
    for (const v of shredded) expect(v).toEqual({ state: 'destroyed', wrapped_key: null });
    expect((await call(f.t.app, f.reader, 'GET', '/v1/devices/west-d00050/keys')).status).toBe(410);
    // device DEKs: due after 30 days, a rollout at 10 %/day takes 10 more; field keys: 7 days + 5 at 20 %/day
    expect(figures.rolloutDevices).toBeGreaterThan(GROUPS.length * DEVICES * 10);
    expect(figures.maxDevicePrimaryAgeDays).toBeLessThanOrEqual(30 + 11);
    expect(figures.maxFieldPrimaryAgeDays).toBeLessThanOrEqual(7 + 6);
    // every old primary left grace after its grace period
    expect(figures.graceExpired).toBeGreaterThanOrEqual(figures.deviceRotations + figures.rolloutDevices - GROUPS.length * DEVICES);
    expect(figures.destroyed).toBe(shredded.length);
    expect((await events(f, { action: 'group.rotate' })).length).toBe(12);
    expect((await f.t.audit.verify()).ok).toBe(true);

    console.info(
      `simulated year: ${figures.runs} daily runs in ${(wallMs / 1000).toFixed(1)} s wall (cron ${(figures.runMs / 1000).toFixed(1)} s, unwrap checks ${(figures.checkMs / 1000).toFixed(1)} s); ` +
        `KEK rotations ${figures.kekRotations} (day ${rotationDays.kek!.join(', ')}), group rotations ${figures.groupRotations} (days ${rotationDays.group!.join(', ')}), ` +
        `group versions destroyed ${figures.groupVersionsDestroyed}, device versions rewrapped under new group versions ${figures.childrenRewrapped}, ` +
        `rollouts started ${figures.rolloutsStarted}, device DEKs rotated by rollouts ${figures.rolloutDevices}, field key versions by rollouts ${figures.rolloutFields}, ` +
        `oldest primary seen: device ${figures.maxDevicePrimaryAgeDays.toFixed(1)} d, field ${figures.maxFieldPrimaryAgeDays.toFixed(1)} d; ` +
        `immediate device rotations ${figures.deviceRotations}, grace expiries ${figures.graceExpired}, shredded versions destroyed ${figures.destroyed}`,
    );
  });
});
