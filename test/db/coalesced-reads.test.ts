/**
 * Coalesced reads (db/coalesced-reads.ts, issue 7): loads made together go out as one query
 * with every id, each caller gets exactly its own rows (fresh arrays, none of another id's),
 * a failed query fails only the loads it carried, and the id and in-flight limits hold.
 */
import { describe, expect, it } from 'vitest';
import { createCoalescedReader } from '../../src/db/coalesced-reads.js';

interface Row {
  id: string;
  n: number;
}

/** A fake statement: records every call, answers two rows per id except ids starting with "none". */
function fakeRead() {
  const calls: string[][] = [];
  const gates: Array<() => void> = [];
  let hold = false;
  const read = async (ids: string[]): Promise<Row[]> => {
    calls.push(ids);
    if (hold) await new Promise<void>((resolve) => gates.push(resolve));
    if (ids.includes('boom')) throw new Error('database down');
    return ids.filter((id) => !id.startsWith('none')).flatMap((id) => [
      { id, n: 1 },
      { id, n: 2 },
    ]);
  };
  return {
    read,
    calls,
    holdQueries: () => (hold = true),
    releaseAll: () => {
      hold = false;
      for (const open of gates.splice(0)) open();
    },
  };
}

describe('coalesced reads', () => {
  it('when loads are made in the same turn, then one query carries each distinct id once and every caller gets only its own rows', async () => {
    const fake = fakeRead();
    const reader = createCoalescedReader({ read: fake.read, idOf: (row) => row.id });
    const [a, b, a2, none] = await Promise.all([reader.load('a'), reader.load('b'), reader.load('a'), reader.load('none-1')]);
    expect(fake.calls).toEqual([['a', 'b', 'none-1']]);
    expect(a).toEqual([
      { id: 'a', n: 1 },
      { id: 'a', n: 2 },
    ]);
    expect(b.map((row) => row.id)).toEqual(['b', 'b']);
    expect(a2).toEqual(a);
    expect(a2).not.toBe(a); // each caller its own array
    expect(none).toEqual([]);
  });

  it('when loads come in different turns with nothing in flight, then each turn is its own query, sent after the load was made', async () => {
    const fake = fakeRead();
    const reader = createCoalescedReader({ read: fake.read, idOf: (row) => row.id });
    await reader.load('a');
    await reader.load('b');
    expect(fake.calls).toEqual([['a'], ['b']]);
  });

  it('when a query fails, then the loads it carried fail with its error and the next loads are read again', async () => {
    const fake = fakeRead();
    const reader = createCoalescedReader({ read: fake.read, idOf: (row) => row.id });
    const results = await Promise.allSettled([reader.load('boom'), reader.load('a')]);
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect((results[0] as PromiseRejectedResult).reason).toMatchObject({ message: 'database down' });
    await expect(reader.load('a')).resolves.toHaveLength(2);
    expect(fake.calls).toEqual([['boom', 'a'], ['a']]);
  });

  it('when more ids wait than one query may carry, then they are split at maxIds, in arrival order', async () => {
    const fake = fakeRead();
    const reader = createCoalescedReader({ read: fake.read, idOf: (row) => row.id, maxIds: 2, maxInFlight: 10 });
    const loaded = await Promise.all(['a', 'b', 'c', 'd', 'e'].map((id) => reader.load(id)));
    expect(fake.calls).toEqual([['a', 'b'], ['c', 'd'], ['e']]);
    expect(loaded.map((rows) => rows[0]?.id)).toEqual(['a', 'b', 'c', 'd', 'e']);
  });

  it('when maxInFlight queries are on the wire, then later loads wait and go together in the next query', async () => {
    const fake = fakeRead();
    const reader = createCoalescedReader({ read: fake.read, idOf: (row) => row.id, maxInFlight: 1 });
    fake.holdQueries();
    const first = reader.load('a');
    await new Promise((resolve) => setImmediate(resolve)); // the first query is sent and held
    expect(fake.calls).toEqual([['a']]);
    const later = [reader.load('b'), reader.load('c')];
    await new Promise((resolve) => setTimeout(resolve, 5)); // several turns: nothing else may go out
    expect(fake.calls).toEqual([['a']]);
    fake.releaseAll();
    await first;
    await new Promise((resolve) => setImmediate(resolve));
    fake.releaseAll();
    const [b, c] = await Promise.all(later);
    expect(fake.calls).toEqual([['a'], ['b', 'c']]);
    expect(b?.[0]?.id).toBe('b');
    expect(c?.[0]?.id).toBe('c');
  });
});
