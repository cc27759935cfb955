import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditEventInput } from '../../src/audit/audit.types.js';
import type { AuditEventView, EventQuery } from '../../src/audit/audit.service.js';
import { BadRequestError } from '../../src/http/errors.js';
import { createAuditFixture, type AuditFixture } from './support.js';

describe('audit queries', () => {
  let f: AuditFixture;
  const start = new Date('2026-03-01T12:00:00.000Z');

  beforeAll(async () => {
    f = await createAuditFixture();
    const plan: AuditEventInput[] = [
      { actor: 'alice', action: 'group.create', outcome: 'success', keyId: 'group:g1' },
      { actor: 'alice', action: 'device.enrol', outcome: 'success', keyId: 'device:sensor-1' },
      { actor: 'alice', action: 'field.create', outcome: 'success', keyId: 'field:sensor-1/patient_id' },
      { actor: 'reader', action: 'key.deliver', outcome: 'success', keyId: 'device:sensor-1', details: { versions: [1] } },
      { actor: 'reader', action: 'key.deliver', outcome: 'denied', keyId: 'device:sensor-2', details: { reason: 'group not in token' } },
      { actor: 'anonymous', action: 'auth.failed', outcome: 'denied', details: { reason: 'expired' } },
      { actor: 'system:rotation', action: 'device.rotate', outcome: 'success', keyId: 'device:sensor-1', details: { from: 1, to: 2 } },
      { actor: 'system', action: 'key.unwrap', outcome: 'failure', keyId: 'device:sensor-10' },
      { actor: 'alice', action: 'device.destroy', outcome: 'success', keyId: 'device:sensor_1' },
      { actor: 'alice', action: 'device.destroy', outcome: 'success', keyId: 'device:sensor%1' },
    ];
    for (const e of plan) {
      await f.audit.record(f.database.db, [e]); // one minute apart: position i+1 at start + i min
      f.clock.advance(60_000);
    }
  });
  afterAll(async () => f.close());

  const positions = (items: AuditEventView[]) => items.map((e) => e.position);
  const all = async (filters: EventQuery, limit = 1000) => positions((await f.audit.queryEvents(filters, undefined, limit)).items);

  it('when filtered by actor, action, key id or outcome, then only matching events come back, in chain order', async () => {
    expect(await all({ actor: 'reader' })).toEqual([4, 5]);
    expect(await all({ action: 'key.deliver' })).toEqual([4, 5]);
    expect(await all({ keyId: 'device:sensor-1' })).toEqual([2, 4, 7]);
    expect(await all({ outcome: 'denied' })).toEqual([5, 6]);
    expect(await all({ outcome: 'failure' })).toEqual([8]);
    expect(await all({ actor: 'reader', outcome: 'denied' })).toEqual([5]);
    expect(await all({ actor: 'nobody' })).toEqual([]);
  });

  it('when filtered by key id prefix, then everything about one device comes back, and LIKE wildcards in the prefix are literal', async () => {
    expect(await all({ keyIdPrefix: 'device:sensor-1' })).toEqual([2, 4, 7, 8]);
    expect(await all({ keyIdPrefix: 'field:sensor-1/' })).toEqual([3]);
    expect(await all({ keyIdPrefix: 'device:sensor_' })).toEqual([9]);
    expect(await all({ keyIdPrefix: 'device:sensor%' })).toEqual([10]);
  });

  it('when filtered by time, then from is inclusive and to exclusive', async () => {
    const at = (minutes: number) => new Date(start.getTime() + minutes * 60_000).toISOString();
    expect(await all({ from: at(3), to: at(6) })).toEqual([4, 5, 6]);
    expect(await all({ from: new Date(at(8)) })).toEqual([9, 10]);
    await expect(f.audit.queryEvents({ from: 'yesterday' }, undefined, 10)).rejects.toBeInstanceOf(BadRequestError);
  });

  it('when an event is returned, then it carries its fields, hashes and no database internals', async () => {
    const [event] = (await f.audit.queryEvents({ action: 'device.rotate' }, undefined, 1)).items;
    expect(event).toEqual({
      position: 7,
      time: new Date(start.getTime() + 6 * 60_000).toISOString(),
      actor: 'system:rotation',
      action: 'device.rotate',
      outcome: 'success',
      keyId: 'device:sensor-1',
      details: { from: 1, to: 2 },
      requestId: null,
      prevHash: expect.stringMatching(/^[0-9a-f]{64}$/),
      hash: expect.stringMatching(/^[0-9a-f]{64}$/),
    });
  });

  it('when paged with a cursor, then every event comes exactly once in either order', async () => {
    for (const order of ['asc', 'desc'] as const) {
      const seen: number[] = [];
      let cursor: string | undefined;
      do {
        const page = await f.audit.queryEvents({ order }, cursor, 3);
        expect(page.items.length).toBeLessThanOrEqual(3);
        seen.push(...positions(page.items));
        cursor = page.nextCursor;
      } while (cursor !== undefined);
      expect(seen).toEqual(order === 'asc' ? [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] : [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
    }
    const filtered = await f.audit.queryEvents({ actor: 'alice' }, undefined, 2);
    expect(positions(filtered.items)).toEqual([1, 2]);
    expect(positions((await f.audit.queryEvents({ actor: 'alice' }, filtered.nextCursor, 10)).items)).toEqual([3, 9, 10]);
  });

  it('when the cursor is garbage, or belongs to the other order, or the limit is out of range, then the query is refused', async () => {
    const asc = await f.audit.queryEvents({}, undefined, 2);
    await expect(f.audit.queryEvents({}, 'not-a-cursor', 2)).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.queryEvents({ order: 'desc' }, asc.nextCursor, 2)).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.queryEvents({}, undefined, 0)).rejects.toBeInstanceOf(BadRequestError);
    await expect(f.audit.queryEvents({}, undefined, 1001)).rejects.toBeInstanceOf(BadRequestError);
  });
});
