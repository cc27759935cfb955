/**
 * Controlling a rollout: pause stops new chunks (and a chunk in flight rolls back whole), resume
 * continues and moves the schedule by the time paused, cancel leaves every device on a readable
 * primary; illegal controls are 409, unknown rollouts 404; the start's contract (defaults from
 * the group's policy, one active rollout per group and level, bad input named) and the listing.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { enqueueKeyUpdates } from '../../src/distribution/index.js';
import { call, expectProblem } from '../support/flow.js';
import { control, createFleet, createGroup, deviceStates, events, fetchDeviceKeys, getRollout, items, runner, startRollout, storedDeviceKeys, type Fleet, type RolloutView } from './support.js';

describe('pause, resume and cancel', () => {
  let f: Fleet;
  let ids: string[];
  beforeAll(async () => {
    f = await createFleet({ readerGroups: ['pumps'] });
    ids = await createGroup(f, 'pumps', 1000);
  });
  afterAll(async () => f.close());

  it('when a rollout is paused mid-wave, then no new chunk starts and a chunk in flight lands nothing; resumed, it continues; cancelled, every device keeps one readable primary', async () => {
    const rollout = await startRollout(f, { groupId: 'pumps', percentPerDay: 100, waveIntervalSeconds: 60 });
    const start = f.clock.now();

    // paused by an admin right after the second chunk
    let chunks = 0;
    const pausing = runner(f, {
      chunkSize: 100,
      workers: 1,
      hooks: {
        afterChunk: async () => {
          chunks += 1;
          if (chunks === 2) expect((await control(f, rollout.id, 'pause')).status).toBe(200);
        },
      },
    });
    expect(await pausing.run()).toMatchObject({ devices: 200, errors: [] });
    let view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'paused', waves: [{ state: 'running', done: 200, pending: 800 }, { state: 'scheduled' }] });
    expect((await runner(f).run()).devices).toBe(0);
    expectProblem(await control(f, rollout.id, 'pause'), 409, 'illegal_rollout_transition');

    // resumed 30 s later: the schedule moves by 30 s
    f.clock.advance(30_000);
    const resumed = await control(f, rollout.id, 'resume');
    expect(resumed.status, resumed.raw).toBe(200);
    expect((resumed.body as unknown as RolloutView).waves[1]!.dueAt).toBe(new Date(start.getTime() + 30_000).toISOString());
    expectProblem(await control(f, rollout.id, 'resume'), 409, 'illegal_rollout_transition');

    // paused again while a chunk is in flight (after its version rows were written): that chunk rolls back whole
    const inFlight = runner(f, {
      chunkSize: 100,
      workers: 1,
      enqueue: async (trx, updates) => {
        expect((await control(f, rollout.id, 'pause')).status).toBe(200);
        return enqueueKeyUpdates(trx, updates);
      },
    });
    expect(await inFlight.run()).toMatchObject({ devices: 0, errors: [] });
    view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'paused', waves: [{ done: 200, pending: 800 }, {}] });
    expect([...(await deviceStates(f, 'pumps')).values()].filter((s) => s.primary === 2)).toHaveLength(200);

    // resumed, then cancelled by an admin after one more chunk
    expect((await control(f, rollout.id, 'resume')).status).toBe(200);
    const cancelling = runner(f, {
      chunkSize: 100,
      workers: 1,
      hooks: { afterChunk: async () => void expect((await control(f, rollout.id, 'cancel')).status).toBe(200) },
    });
    expect(await cancelling.run()).toMatchObject({ devices: 100, errors: [] });
    view = await getRollout(f, rollout.id);
    expect(view).toMatchObject({ state: 'cancelled', currentWave: null, waves: [{ state: 'cancelled', done: 300, pending: 700 }, { state: 'cancelled' }] });
    expect((await runner(f).run()).devices).toBe(0);

    // every device: exactly one primary, and it unwraps (rotated or not); delivery agrees
    const stored = await storedDeviceKeys(f, 'pumps');
    const states = await deviceStates(f, 'pumps');
    for (const id of ids) {
      const s = states.get(id)!;
      expect(s.versions.filter((v) => v.state === 'primary'), id).toHaveLength(1);
      expect(stored.has(`${id}:v${s.primary}`), id).toBe(true);
    }
    const rotated = [...(await items(f, rollout.id))].filter(([, i]) => i.status === 'done').map(([id]) => id);
    expect(rotated).toHaveLength(300);
    for (const id of [rotated[0]!, ids.find((x) => !rotated.includes(x))!]) {
      const delivered = await fetchDeviceKeys(f, id);
      const primary = delivered.find((k) => k.state === 'primary')!;
      expect(Buffer.from(primary.k, 'base64url').equals(stored.get(primary.kid)!)).toBe(true);
    }
    for (const action of ['pause', 'resume', 'cancel'] as const) {
      expectProblem(await control(f, rollout.id, action), 409, 'illegal_rollout_transition');
      expect(await events(f, { action: `rollout.${action}` })).toHaveLength(action === 'cancel' ? 1 : 2);
    }
    expect((await events(f, { action: 'rollout.pause' }))[0]).toMatchObject({ actor: 'alice', keyId: 'group:pumps', details: { rolloutId: rollout.id, from: 'running', to: 'paused' } });
  });

  it('when a control names an unknown or malformed rollout, or comes without the admin scope, then 404, 400, 403', async () => {
    expectProblem(await control(f, 'ro-00000000-0000-4000-8000-000000000000', 'pause'), 404);
    expectProblem(await call(f.t.app, f.admin, 'GET', '/v1/rollouts/ro-00000000-0000-4000-8000-000000000000'), 404);
    expectProblem(await control(f, 'not-a-rollout', 'cancel'), 400);
    expectProblem(await call(f.t.app, f.rotator, 'POST', '/v1/rollouts', { groupId: 'pumps', level: 'device' }), 403);
    expectProblem(await call(f.t.app, f.reader, 'GET', '/v1/rollouts'), 403);
  });
});

describe('starting and listing rollouts', () => {
  let f: Fleet;
  beforeAll(async () => {
    f = await createFleet();
    await createGroup(f, 'north', 20);
    await createGroup(f, 'south', 20);
  });
  afterAll(async () => f.close());

  it('when settings are left out, then they come from the group policy, else the built-in defaults', async () => {
    const put = await call(f.t.app, f.admin, 'PUT', '/v1/groups/north/policy', { device: { percentPerDay: 25, haltThreshold: 0.05 } });
    expect(put.status, put.raw).toBe(200);
    f.clock.advance(1000); // (each start a second later: the listing is newest first)
    const north = await startRollout(f, { groupId: 'north' });
    expect(north).toMatchObject({ level: 'device', field: null, percentPerDay: 25, haltThreshold: 0.05, waveIntervalSeconds: 86_400, canaryPercent: null, rollbackOnHalt: false, waveCount: 4, createdBy: 'alice' });
    f.clock.advance(1000);
    const south = await startRollout(f, { groupId: 'south', level: 'field', field: 'patient_id', canaryPercent: 2 });
    expect(south).toMatchObject({ level: 'field', field: 'patient_id', percentPerDay: 20, haltThreshold: 0.01, canaryPercent: 2, waveCount: 6 });
    expect(await events(f, { action: 'rollout.start' })).toHaveLength(2);
  });

  it('when a group already has an active rollout of the level, then 409; another level may run beside it', async () => {
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/rollouts', { groupId: 'north', level: 'device' }), 409, 'rollout_active');
    f.clock.advance(1000);
    const field = await startRollout(f, { groupId: 'north', level: 'field' });
    expect(field.field).toBeNull();
    // two at once: one wins
    await control(f, field.id, 'cancel');
    f.clock.advance(1000);
    const [a, b] = await Promise.all([1, 2].map(() => call(f.t.app, f.admin, 'POST', '/v1/rollouts', { groupId: 'north', level: 'field' })));
    expect([a!.status, b!.status].sort()).toEqual([201, 409]);
  });

  it('when the body is wrong, then 400 naming the field; an unknown group is 404', async () => {
    const bad = async (body: Record<string, unknown>, field: string) => {
      const response = await call(f.t.app, f.admin, 'POST', '/v1/rollouts', body);
      expectProblem(response, 400);
      expect(JSON.stringify(response.body), JSON.stringify(body)).toContain(field);
    };
    await bad({ groupId: 'south', level: 'device', field: 'patient_id' }, 'body.field');
    await bad({ groupId: 'south', level: 'group' }, 'level');
    await bad({ groupId: 'south', level: 'device', percentPerDay: 0 }, 'percentPerDay');
    await bad({ groupId: 'south', level: 'device', canaryPercent: 60 }, 'canaryPercent');
    await bad({ groupId: 'south', level: 'device', haltThreshold: 2 }, 'haltThreshold');
    await bad({ groupId: 'south', level: 'device', waveIntervalSeconds: 0 }, 'waveIntervalSeconds');
    await bad({ groupId: 'south', level: 'device', now: '2030-01-01' }, 'now');
    expectProblem(await call(f.t.app, f.admin, 'POST', '/v1/rollouts', { groupId: 'nowhere', level: 'device' }), 404);
  });

  it('when listed, then newest first, a page at a time, filtered by group and state', async () => {
    const all = await call(f.t.app, f.admin, 'GET', '/v1/rollouts');
    expect(all.status).toBe(200);
    const list = all.body.items as Array<{ id: string; groupId: string; level: string; state: string; totals: { devices: number } }>;
    expect(list.map((r) => `${r.groupId}/${r.level}/${r.state}`)).toEqual(['north/field/running', 'north/field/cancelled', 'south/field/running', 'north/device/running']);
    const ids: string[] = [];
    let cursor: string | undefined;
    do {
      const page = await call(f.t.app, f.admin, 'GET', `/v1/rollouts?limit=1${cursor ? `&cursor=${cursor}` : ''}`);
      expect(page.status, page.raw).toBe(200);
      ids.push(...(page.body.items as Array<{ id: string }>).map((r) => r.id));
      cursor = page.body.nextCursor as string | undefined;
    } while (cursor !== undefined);
    expect(ids).toEqual(list.map((r) => r.id));
    const filtered = await call(f.t.app, f.admin, 'GET', '/v1/rollouts?groupId=north&state=running');
    expect((filtered.body.items as unknown[]).length).toBe(2);
    expectProblem(await call(f.t.app, f.admin, 'GET', '/v1/rollouts?cursor=bm9wZQ'), 400);
    expectProblem(await call(f.t.app, f.admin, 'GET', '/v1/rollouts?state=sleeping'), 400);
  });
});
