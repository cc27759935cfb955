/**
 * Concurrent reads by id through one statement that takes an id array: loads that arrive while
 * the event loop is busy are sent as ONE query, and each caller gets the rows of its own id.
 *
 * Why: a single key fetch reads one device, and at a thousand fetches a second the round trip
 * (a socket write that wakes a backend, a statement's parse/bind/execute overhead in
 * PostgreSQL) cost more than the read itself: about a fifth of the server's CPU went to the
 * `writev` of those queries (issue 7). Nothing is cached: every load is answered by a query
 * sent after it was asked, so a key revoked before the request came is never delivered.
 */
export interface CoalescedReader<Row> {
  load(id: string): Promise<Row[]>;
}

interface Waiter<Row> {
  resolve(rows: Row[]): void;
  reject(error: unknown): void;
}

export function createCoalescedReader<Row>(options: {
  /** one query for all these (distinct) ids */
  read: (ids: string[]) => Promise<Row[]>;
  idOf: (row: Row) => string;
  /** most ids in one query (default 1,000) */
  maxIds?: number;
  /**
   * Most queries of this reader on the wire at once (default 2). While they run, new loads
   * wait and then go together; one more query instead would go out with a single id.
   */
  maxInFlight?: number;
}): CoalescedReader<Row> {
  const { read, idOf } = options;
  const maxIds = options.maxIds ?? 1000;
  const maxInFlight = options.maxInFlight ?? 2;
  let pending = new Map<string, Array<Waiter<Row>>>();
  let scheduled = false;
  let inFlight = 0;

  function schedule(): void {
    if (scheduled || inFlight >= maxInFlight || pending.size === 0) return;
    scheduled = true;
    // after this turn's I/O callbacks: every request parsed in this turn joins the query
    setImmediate(flush);
  }

  function flush(): void {
    scheduled = false;
    if (inFlight >= maxInFlight || pending.size === 0) return;
    let batch: Map<string, Array<Waiter<Row>>>;
    if (pending.size <= maxIds) {
      batch = pending;
      pending = new Map();
    } else {
      batch = new Map();
      for (const [id, waiters] of pending) {
        if (batch.size === maxIds) break;
        batch.set(id, waiters);
        pending.delete(id);
      }
    }
    inFlight += 1;
    read([...batch.keys()])
      .then(
        (rows) => {
          const byId = new Map<string, Row[]>();
          for (const row of rows) {
            const id = idOf(row);
            const list = byId.get(id);
            if (list) list.push(row);
            else byId.set(id, [row]);
          }
          for (const [id, waiters] of batch) {
            const own = byId.get(id) ?? [];
            for (const waiter of waiters) waiter.resolve(own.slice());
          }
        },
        (error: unknown) => {
          for (const waiters of batch.values()) for (const waiter of waiters) waiter.reject(error);
        },
      )
      .finally(() => {
        inFlight -= 1;
        schedule();
      });
    schedule();
  }

  return {
    load(id) {
      return new Promise<Row[]>((resolve, reject) => {
        const waiters = pending.get(id);
        if (waiters) waiters.push({ resolve, reject });
        else pending.set(id, [{ resolve, reject }]);
        schedule();
      });
    },
  };
}
