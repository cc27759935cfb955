/**
 * The audit log (DESIGN §6): one keyed hash chain in PostgreSQL, written by
 *   - `record(trx, events)`: inside the caller's transaction, so the change and its events commit
 *     together or not at all; one lock on the chain head per transaction, however many events.
 *     Call it as the last step of the transaction: the head lock serialises every writer of every
 *     replica until the caller commits.
 *   - `recordRead(events)`: reads (key deliveries) are group-committed: one in-process writer
 *     gathers the events of concurrent requests for `batchWindowMs`, appends them in one
 *     transaction, and only then resolves each request's promise (rejects them all if the batch
 *     failed: fail closed).
 *
 * Keys, both stored only wrapped by the KEK (context `keystrata:v1|audit-key|<purpose>|1|kek|<KEK name>|-`):
 *   - `hmac`: 32 random bytes, the chain's HMAC-SHA256 key (audit.chain.ts);
 *   - `checkpoint`: an Ed25519 private key (PKCS#8) signing checkpoints as compact JWS.
 * Each is generated on first use, stored with `insert … on conflict do nothing` and read back,
 * so concurrent first uses on several replicas agree on one key. Call `init()` at start-up (after
 * the KEK provider's): then no request waits for the keys, and none fails while they load.
 *
 * Nothing secret reaches an event, a log line or an error: keys stay in KeyObjects, blobs are
 * never logged, and the only event contents are what callers pass (ids, versions, states).
 */
import crypto, { type KeyObject } from 'node:crypto';
import os from 'node:os';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { calculateJwkThumbprint, CompactSign, compactVerify, type JWK } from 'jose';
import type { Kysely } from 'kysely';
import type { Clock } from '../clock.js';
import type { DB, Executor } from '../db/database.js';
import { AppError, BadRequestError, NotFoundError, UnavailableError } from '../http/errors.js';
import { decodeCursor, encodeCursor } from '../http/schemas.js';
import { kekBlobVersion, type KekProvider } from '../kek/kek.types.js';
import {
  canonicalEvent,
  canonicalTime,
  chainHash,
  GENESIS_HASH,
  HASH_BYTES,
  prepareEvent,
  type PreparedEvent,
} from './audit.chain.js';
import * as repo from './audit.repository.js';
import { verifyChainPage, type PageOutcome } from './audit.verify-page.js';
import { startVerifyPool, type VerifyPool } from './audit.verify-pool.js';
import type { AuditKeyPurpose } from './audit.tables.js';
import type { AuditEventInput, AuditOutcome, AuditSink } from './audit.types.js';

/** JWS `alg` of checkpoints (RFC 9864's fully specified name for Ed25519) and their `typ`. */
export const CHECKPOINT_ALG = 'Ed25519';
export const CHECKPOINT_TYP = 'keystrata-audit-checkpoint+jws';

const KEY_VERSION = 1;
const HMAC_KEY_BYTES = 32;
/** How long `record` inside a caller's transaction waits for the HMAC key to load (see hmacKeyFor). */
const KEY_WAIT_IN_TRANSACTION_MS = 1000;
/** Events per INSERT statement of `record` (the next chunk is hashed while the server stores one). */
const WRITE_CHUNK = 2000;
/** Optimistic one-statement appends of a group commit tried before it takes the chain-head lock. */
const OPTIMISTIC_ATTEMPTS = 3;

export interface AuditLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface AuditServiceOptions {
  db: Kysely<DB>;
  kek: Pick<KekProvider, 'keyName' | 'wrap' | 'unwrap' | 'rewrapBatch'>;
  clock: Clock;
  logger?: AuditLogger | undefined;
  /** group-commit window of `recordRead` (default 5 ms) */
  batchWindowMs?: number | undefined;
  /** most events in one group commit (default 5,000) */
  maxBatchEvents?: number | undefined;
  /** sign the chain head every so often when it moved (default: off; on demand only) */
  checkpointIntervalMs?: number | undefined;
  /** events read per query by `verify` (default 5,000) */
  verifyPageSize?: number | undefined;
  /** worker threads recomputing HMACs for `verify` (default: one fewer than the CPUs available, 1 to 4; 0: none) */
  verifyWorkers?: number | undefined;
  /** shortest walk handed to the workers (default 20,000 events; shorter ones run on this thread) */
  verifyParallelMin?: number | undefined;
}

export interface VerifyOptions {
  /** start at this position, trusting the stored hash of the position before it */
  fromPosition?: number | undefined;
  /** start at this checkpoint: its signature is checked, and the event it names must match it */
  fromCheckpoint?: number | undefined;
}

export type VerifyFailure =
  | 'missing_event' // a position is absent (deleted event, or a gap at the tail)
  | 'broken_link' // an event's prev_hash is not its predecessor's hash (reordered or replaced)
  | 'hash_mismatch' // the HMAC does not match the event's contents (changed, forged, reordered)
  | 'head_missing' // the chain-head row is gone
  | 'head_mismatch' // the chain head does not name the last event
  | 'event_after_head' // events exist beyond the chain head (appended around the writer)
  | 'checkpoint_invalid' // a checkpoint's signature or payload does not verify
  | 'checkpoint_mismatch'; // a validly signed checkpoint disagrees with the event at its position

export interface VerifyResult {
  ok: boolean;
  /** events whose hash was recomputed */
  checked: number;
  /** first position walked */
  fromPosition: number;
  /** chain head position when the walk started */
  headPosition: number;
  /** signed checkpoints checked against the chain on the way */
  checkpointsChecked: number;
  firstBadPosition?: number;
  reason?: VerifyFailure;
  detail?: string;
}

export interface CheckpointPayload {
  position: number;
  /** hex */
  hash: string;
  /** ISO 8601, when it was signed */
  time: string;
  kekName: string;
}

export interface Checkpoint {
  id: number;
  position: number;
  hash: string;
  time: string;
  kid: string;
  /** compact JWS; its payload is the CheckpointPayload */
  jws: string;
}

export interface PublicSigningJwk {
  kty: 'OKP';
  crv: 'Ed25519';
  x: string;
  kid: string;
  alg: typeof CHECKPOINT_ALG;
  use: 'sig';
}

export interface CheckpointList {
  /** the key every checkpoint verifies with; pin its `kid` (RFC 7638 thumbprint) out of band */
  publicKey: PublicSigningJwk;
  items: Checkpoint[];
  nextCursor?: string;
}

export interface EventQuery {
  actor?: string | undefined;
  action?: string | undefined;
  keyId?: string | undefined;
  /** e.g. `device:sensor-1` and `field:sensor-1/` together: everything about one device */
  keyIdPrefix?: string | undefined;
  outcome?: AuditOutcome | undefined;
  /** inclusive */
  from?: Date | string | undefined;
  /** exclusive */
  to?: Date | string | undefined;
  /** by position; default `asc` (chain order) */
  order?: 'asc' | 'desc' | undefined;
}

export interface AuditEventView {
  position: number;
  time: string;
  actor: string;
  action: string;
  outcome: AuditOutcome;
  keyId: string | null;
  details: Record<string, unknown>;
  requestId: string | null;
  prevHash: string;
  hash: string;
}

export interface AuditService extends AuditSink {
  /** Create (or load) the audit keys now rather than on first use. */
  init(): Promise<void>;
  verify(options?: VerifyOptions): Promise<VerifyResult>;
  /** Sign the current chain head (on demand). */
  createCheckpoint(): Promise<Checkpoint>;
  /** Sign the chain head unless the latest checkpoint already names it (what the timer runs). */
  checkpointIfChanged(): Promise<Checkpoint | undefined>;
  listCheckpoints(options?: { cursor?: string | undefined; limit?: number | undefined }): Promise<CheckpointList>;
  queryEvents(filters: EventQuery, cursor: string | undefined, limit: number): Promise<{ items: AuditEventView[]; nextCursor?: string }>;
  /** Number of events in the chain (the head position). */
  chainLength(): Promise<number>;
  /** After a KEK rotation: rewrap the audit keys to the latest KEK version (no plaintext leaves the provider). */
  rewrapKeys(): Promise<{ rewrapped: number; failed: number }>;
  /** KEK versions the audit keys are wrapped under (raise min_decryption_version above none of them). */
  kekVersionsInUse(): Promise<number[]>;
  /** Stop the checkpoint timer, refuse new reads, flush the group-commit writer. */
  close(): Promise<void>;
}

interface SigningKey {
  privateKey: KeyObject;
  publicKey: KeyObject;
  publicJwk: PublicSigningJwk;
}

interface Waiter {
  events: PreparedEvent[];
  resolve: () => void;
  reject: (error: unknown) => void;
}

const silentLogger: AuditLogger = { info() {}, warn() {}, error() {} };

export function auditKeyBinding(purpose: AuditKeyPurpose, version: number, kekName: string): string {
  return ['keystrata:v1', 'audit-key', purpose, version, 'kek', kekName, '-'].join('|');
}

function toHmacKey(material: Buffer): KeyObject {
  try {
    if (material.length !== HMAC_KEY_BYTES) throw new Error('The stored audit HMAC key has the wrong length');
    return crypto.createSecretKey(material);
  } finally {
    material.fill(0);
  }
}

async function toSigningKey(pkcs8: Buffer): Promise<SigningKey> {
  let privateKey: KeyObject;
  try {
    privateKey = crypto.createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' });
  } finally {
    pkcs8.fill(0);
  }
  if (privateKey.asymmetricKeyType !== 'ed25519') throw new Error('The stored checkpoint key is not an Ed25519 key');
  const publicKey = crypto.createPublicKey(privateKey);
  const { x } = publicKey.export({ format: 'jwk' });
  if (typeof x !== 'string') throw new Error('The checkpoint public key could not be exported');
  const kid = await calculateJwkThumbprint({ kty: 'OKP', crv: 'Ed25519', x });
  return { privateKey, publicKey, publicJwk: { kty: 'OKP', crv: 'Ed25519', x, kid, alg: CHECKPOINT_ALG, use: 'sig' } };
}

/** A value loaded once and shared by concurrent callers; after a failure the next call loads again. */
function loadOnce<T>(load: () => Promise<T>): { readonly value: T | undefined; readonly loading: Promise<T> | undefined; get(): Promise<T> } {
  let value: T | undefined;
  let loading: Promise<T> | undefined;
  return {
    get value() {
      return value;
    },
    get loading() {
      return loading;
    },
    get() {
      if (value !== undefined) return Promise.resolve(value);
      loading ??= load()
        .then((loaded) => (value = loaded))
        .finally(() => {
          loading = undefined;
        });
      return loading;
    },
  };
}

export function createAuditService(options: AuditServiceOptions): AuditService {
  const { db, kek, clock } = options;
  const logger = options.logger ?? silentLogger;
  const batchWindowMs = options.batchWindowMs ?? 5;
  const maxBatchEvents = options.maxBatchEvents ?? 5000;
  const verifyPageSize = options.verifyPageSize ?? 5000;
  // one CPU left to this thread (it reads the pages and hands them over) and PostgreSQL: on 2
  // CPUs, 2 workers made PostgreSQL spend ~2.5x the CPU per event and verify ran slower (issue 7)
  const verifyWorkers = options.verifyWorkers ?? Math.max(1, Math.min(os.availableParallelism() - 1, 4));
  const verifyParallelMin = options.verifyParallelMin ?? 20_000;

  // ---- keys ----

  /** The plaintext of a key, from its row; creates the row (race-free) if there is none yet. */
  async function loadOrCreateKey(purpose: AuditKeyPurpose, generate: () => Buffer): Promise<Buffer> {
    const binding = auditKeyBinding(purpose, KEY_VERSION, kek.keyName);
    let row = await repo.findKey(db, purpose, KEY_VERSION);
    if (!row) {
      const material = generate();
      try {
        const wrappedKey = await kek.wrap(material, binding);
        await repo.insertKeyIfAbsent(db, { purpose, version: KEY_VERSION, wrappedKey, kekVersion: kekBlobVersion(wrappedKey), createdAt: clock.now() });
      } finally {
        material.fill(0);
      }
      // whoever won the insert, everyone uses the stored key
      row = await repo.findKey(db, purpose, KEY_VERSION);
      if (!row) throw new Error(`The audit ${purpose} key could not be stored`);
      logger.info({ purpose, version: KEY_VERSION }, 'audit key ready');
    }
    return kek.unwrap(row.wrappedKey, binding);
  }

  const hmacKey = loadOnce(async () => toHmacKey(await loadOrCreateKey('hmac', () => crypto.randomBytes(HMAC_KEY_BYTES))));
  const signingKey = loadOnce(async () =>
    toSigningKey(await loadOrCreateKey('checkpoint', () => crypto.generateKeyPairSync('ed25519').privateKey.export({ format: 'der', type: 'pkcs8' }))),
  );

  /**
   * The HMAC key for a write on `executor`. Outside a transaction: load it (creating it on first
   * use). Inside the caller's transaction the key is loaded the same way, through `db` and so
   * another connection, autocommitted, so a created key exists whether or not the caller
   * commits. That connection may not come while the callers' transactions hold them all (a burst
   * of first writes on a full pool, or single-connection PGlite), so the wait is bounded and the
   * caller fails closed (503, retryable) while the key finishes loading. `init()` at start-up
   * keeps every request off this path.
   */
  async function hmacKeyFor(executor: Executor): Promise<KeyObject> {
    if (hmacKey.value) return hmacKey.value;
    const loading = hmacKey.get();
    if (!executor.isTransaction) return loading;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new UnavailableError('The audit log is starting; retry', 1)), KEY_WAIT_IN_TRANSACTION_MS);
    });
    try {
      return await Promise.race([loading, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- appending ----

  /**
   * Append prepared events under the chain-head lock of `trx`: one lock, one head update, and one
   * set-based INSERT per `WRITE_CHUNK` events. The INSERTs are pipelined: while the server
   * stores one chunk, the next one is hashed (the chain is sequential, so the hashing is not).
   */
  async function append(trx: Executor, key: KeyObject, events: ReadonlyArray<PreparedEvent>): Promise<repo.ChainHead> {
    const head = await repo.lockHead(trx);
    // read the clock under the lock, so time never goes backwards along the chain of one process
    const occurredAt = clock.now();
    const count = events.length;
    let prevHash = head.hash;
    let failure: { error: unknown } | undefined;
    const inserts: Array<Promise<void>> = [];
    for (let start = 0; start < count && failure === undefined; start += WRITE_CHUNK) {
      const end = Math.min(start + WRITE_CHUNK, count);
      const chunk = hashEvents(key, { position: head.position + start, hash: prevHash }, occurredAt, events.slice(start, end));
      prevHash = Buffer.from(chunk.chain.subarray(HASH_BYTES * (end - start)));
      inserts.push(
        repo.insertEvents(trx, chunk).catch((error: unknown) => {
          failure ??= { error }; // the first failure; the later INSERTs then fail on the aborted transaction
        }),
      );
      // let this INSERT reach the server before hashing the next chunk
      if (end < count) await yieldToEventLoop();
    }
    await Promise.all(inserts);
    if (failure !== undefined) throw failure.error;
    const newHead = { position: head.position + count, hash: prevHash };
    await repo.updateHead(trx, newHead);
    return newHead;
  }

  /** `events` as the rows that follow `after`: each event's canonical JSON hashed onto the one before. */
  function hashEvents(key: KeyObject, after: repo.ChainHead, occurredAt: Date, events: ReadonlyArray<PreparedEvent>): repo.NewAuditEvents {
    const time = canonicalTime(occurredAt);
    const size = events.length;
    const chunk: repo.NewAuditEvents = {
      firstPosition: after.position + 1,
      occurredAt,
      actors: new Array<string>(size),
      actions: new Array<string>(size),
      outcomes: new Array<AuditOutcome>(size),
      keyIds: new Array<string | null>(size),
      details: new Array<string>(size),
      requestIds: new Array<string | null>(size),
      chain: Buffer.alloc(HASH_BYTES * (size + 1)),
    };
    after.hash.copy(chunk.chain, 0);
    for (let i = 0; i < size; i++) {
      const event = events[i] as PreparedEvent;
      const canonical = canonicalEvent({
        position: chunk.firstPosition + i,
        time,
        actor: event.actor,
        action: event.action,
        outcome: event.outcome,
        keyId: event.keyId,
        detailsJson: event.detailsJson,
        requestId: event.requestId,
      });
      chainHash(key, chunk.chain.subarray(HASH_BYTES * i, HASH_BYTES * (i + 1)), canonical).copy(chunk.chain, HASH_BYTES * (i + 1));
      chunk.actors[i] = event.actor;
      chunk.actions[i] = event.action;
      chunk.outcomes[i] = event.outcome;
      chunk.keyIds[i] = event.keyId;
      chunk.details[i] = event.detailsJson;
      chunk.requestIds[i] = event.requestId;
    }
    return chunk;
  }

  async function record(executor: Executor, events: ReadonlyArray<AuditEventInput>): Promise<void> {
    const prepared = events.map(prepareEvent);
    if (prepared.length === 0) return;
    if (!executor.isTransaction) {
      // a lock outside a transaction would be released at once: give the events their own
      const key = await hmacKeyFor(executor); // before taking a connection for the transaction
      await (executor as Kysely<DB>).transaction().execute((trx) => append(trx, key, prepared));
      return;
    }
    await append(executor, await hmacKeyFor(executor), prepared);
  }

  // ---- group commit of reads ----

  const queue: Waiter[] = [];
  let batchTimer: NodeJS.Timeout | undefined;
  let writing: Promise<void> | undefined;
  let closed = false;

  function recordRead(events: ReadonlyArray<AuditEventInput>): Promise<void> {
    if (closed) return Promise.reject(new UnavailableError('The audit log is shutting down'));
    let prepared: PreparedEvent[];
    try {
      prepared = events.map(prepareEvent); // a bad event fails its own request, never the batch
    } catch (error) {
      return Promise.reject(error);
    }
    if (prepared.length === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      queue.push({ events: prepared, resolve, reject });
      if (batchTimer === undefined && writing === undefined) {
        batchTimer = setTimeout(startWriter, batchWindowMs);
      }
    });
  }

  /** One writer: drains the queue batch after batch (what arrives during a commit forms the next batch). */
  function startWriter(): void {
    batchTimer = undefined;
    // with an empty queue the function below would clear `writing` before it is assigned
    if (writing !== undefined || queue.length === 0) return;
    writing = (async () => {
      try {
        while (queue.length > 0) await commitBatch(takeBatch());
      } finally {
        // cleared in the same turn as the last queue check: with a `.finally` callback (a later
        // microtask) a recordRead in between saw a writer still running, started none, and its
        // event waited until some later event started a writer
        writing = undefined;
      }
    })();
  }

  function takeBatch(): Waiter[] {
    let count = 0;
    let n = 0;
    while (n < queue.length && (n === 0 || count + (queue[n] as Waiter).events.length <= maxBatchEvents)) {
      count += (queue[n] as Waiter).events.length;
      n += 1;
    }
    return queue.splice(0, n);
  }

  async function commitBatch(batch: Waiter[]): Promise<void> {
    try {
      const key = await hmacKey.get();
      await appendReads(key, batch.flatMap((w) => w.events));
      for (const waiter of batch) waiter.resolve();
    } catch (error) {
      knownHead = undefined; // a failed statement may or may not have committed: read the head again
      logger.error({ err: error, requests: batch.length }, 'audit group commit failed: its requests fail closed');
      const failure = error instanceof AppError ? error : new UnavailableError('The audit log could not be written');
      for (const waiter of batch) waiter.reject(failure);
    }
  }

  /**
   * The chain head as this process's group commit left it: the next batch is hashed onto it and
   * appended in one statement (repo.appendIfHead) instead of BEGIN, lock, INSERT, update, COMMIT.
   * Only when the head moved meanwhile (another process or a change's `record`) is the batch
   * hashed again, onto the head the statement returned, with the clock read again; after
   * OPTIMISTIC_ATTEMPTS such misses, or with no head known yet, it takes the lock first.
   */
  let knownHead: repo.ChainHead | undefined;

  async function appendReads(key: KeyObject, events: ReadonlyArray<PreparedEvent>): Promise<void> {
    if (events.length <= WRITE_CHUNK) {
      for (let attempt = 0; attempt < OPTIMISTIC_ATTEMPTS && knownHead !== undefined; attempt++) {
        const result = await repo.appendIfHead(db, knownHead, hashEvents(key, knownHead, clock.now(), events));
        knownHead = result.head;
        if (result.appended) return;
      }
    }
    knownHead = await db.transaction().execute((trx) => append(trx, key, events));
  }

  // ---- checkpoints ----

  function toCheckpoint(row: repo.CheckpointRow): Checkpoint {
    return { id: row.id, position: row.position, hash: row.hash.toString('hex'), time: row.signedAt.toISOString(), kid: row.kid, jws: row.jws };
  }

  async function createCheckpoint(): Promise<Checkpoint> {
    const signer = await signingKey.get();
    const head = await repo.readHead(db);
    if (!head) throw new Error('The audit chain head row is missing');
    const signedAt = clock.now();
    const payload: CheckpointPayload = { position: head.position, hash: head.hash.toString('hex'), time: signedAt.toISOString(), kekName: kek.keyName };
    const jws = await new CompactSign(Buffer.from(JSON.stringify(payload), 'utf8'))
      .setProtectedHeader({ alg: CHECKPOINT_ALG, typ: CHECKPOINT_TYP, kid: signer.publicJwk.kid })
      .sign(signer.privateKey);
    const row = { position: head.position, hash: head.hash, signedAt, kid: signer.publicJwk.kid, jws };
    const id = await repo.insertCheckpoint(db, row);
    logger.info({ checkpoint: id, position: head.position }, 'audit checkpoint signed');
    return toCheckpoint({ id, ...row });
  }

  async function checkpointIfChanged(): Promise<Checkpoint | undefined> {
    const [head, latest] = await Promise.all([repo.readHead(db), repo.latestCheckpoint(db)]);
    if (!head || head.position === 0 || (latest && latest.position === head.position)) return undefined;
    return createCheckpoint();
  }

  /** A stored checkpoint is valid when its JWS verifies with our key and its payload is the row. */
  async function checkCheckpoint(row: repo.CheckpointRow, signer: SigningKey): Promise<string | undefined> {
    try {
      const { payload, protectedHeader } = await compactVerify(row.jws, signer.publicKey, { algorithms: [CHECKPOINT_ALG] });
      const claims = JSON.parse(Buffer.from(payload).toString('utf8')) as Partial<CheckpointPayload>;
      if (protectedHeader.kid !== signer.publicJwk.kid || protectedHeader.typ !== CHECKPOINT_TYP) return 'signed with another key or type';
      if (claims.position !== row.position || claims.hash !== row.hash.toString('hex')) return 'the signed position or hash differs from the stored one';
      return undefined;
    } catch {
      return 'the signature does not verify';
    }
  }

  // ---- verify ----

  let verifyPoolStart: Promise<VerifyPool | undefined> | undefined;
  /** The worker pool, started on the first long walk (undefined: verify on this thread). */
  function verifyPool(key: KeyObject): Promise<VerifyPool | undefined> {
    if (verifyWorkers <= 0 || closed) return Promise.resolve(undefined);
    verifyPoolStart ??= startVerifyPool(verifyWorkers, key).catch((error: unknown) => {
      logger.warn({ err: error }, 'audit verify workers could not start: verifying on the main thread');
      return undefined;
    });
    return verifyPoolStart;
  }

  async function verify(verifyOptions: VerifyOptions = {}): Promise<VerifyResult> {
    const { fromPosition, fromCheckpoint } = verifyOptions;
    if (fromPosition !== undefined && fromCheckpoint !== undefined) throw new BadRequestError('Give fromPosition or fromCheckpoint, not both');
    if (fromPosition !== undefined && (!Number.isSafeInteger(fromPosition) || fromPosition < 1)) {
      throw new BadRequestError('fromPosition must be an integer ≥ 1', { field: 'fromPosition' });
    }
    const [key, signer] = await Promise.all([hmacKey.get(), signingKey.get()]);
    const head = await repo.readHead(db);
    const base = { checked: 0, checkpointsChecked: 0, headPosition: head?.position ?? 0 };
    if (!head) return { ...base, ok: false, fromPosition: 1, firstBadPosition: 1, reason: 'head_missing', detail: 'the chain-head row is missing' };

    let start = fromPosition ?? 1;
    if (fromCheckpoint !== undefined) {
      const anchor = await repo.findCheckpoint(db, fromCheckpoint);
      if (!anchor) throw new NotFoundError(`Checkpoint ${fromCheckpoint} does not exist`);
      const problem = await checkCheckpoint(anchor, signer);
      if (problem !== undefined) {
        return { ...base, ok: false, fromPosition: anchor.position, firstBadPosition: anchor.position, reason: 'checkpoint_invalid', detail: `checkpoint ${anchor.id}: ${problem}` };
      }
      if (anchor.position > head.position) {
        return { ...base, ok: false, fromPosition: anchor.position, firstBadPosition: head.position + 1, reason: 'missing_event', detail: `checkpoint ${anchor.id} names event ${anchor.position}, beyond the chain head` };
      }
      start = Math.max(anchor.position, 1);
    } else if (fromPosition !== undefined && fromPosition > Math.max(head.position, 1)) {
      throw new BadRequestError(`fromPosition is beyond the chain head (${head.position})`, { field: 'fromPosition' });
    }
    const result = { ...base, fromPosition: start };
    const broken = (position: number, reason: VerifyFailure, detail: string): VerifyResult => ({ ...result, ok: false, firstBadPosition: position, reason, detail });

    let prevHex = GENESIS_HASH.toString('hex');
    if (start > 1) {
      const before = await repo.hashAt(db, start - 1);
      if (!before) return broken(start - 1, 'missing_event', `event ${start - 1} (before the starting point) is missing`);
      prevHex = before.toString('hex');
    }

    // signed checkpoints on the way must match the events they name; one beyond the head means a truncated chain
    const checkpoints = new Map<number, repo.CheckpointRow[]>();
    const beyondHead: repo.CheckpointRow[] = [];
    for (const cp of await repo.checkpointsFrom(db, start)) {
      if (cp.position > head.position) {
        beyondHead.push(cp);
        continue;
      }
      const list = checkpoints.get(cp.position) ?? [];
      list.push(cp);
      checkpoints.set(cp.position, list);
    }

    // Pages are checked apart (each event stores the hash it links to), in worker threads when
    // the walk is long, and their outcomes are walked here in position order: the boundary link
    // between pages, then the signed checkpoints, then the page's own first failure.
    const pool = head.position - start + 1 >= verifyParallelMin ? await verifyPool(key) : undefined;
    const checkpointPositions = [...checkpoints.keys()].sort((x, y) => x - y);
    const checkPage = async (from: number, to: number): Promise<PageOutcome> => {
      const page = await repo.selectChainColumns(db, from, to);
      const hashesAt = checkpointPositions.filter((p) => p >= from && p <= to);
      if (pool) return pool.run(page, from, to, hashesAt);
      await yieldToEventLoop(); // a page of HMACs on this thread: let other requests in between pages
      return verifyChainPage(key, page, from, to, hashesAt);
    };
    const inFlight: Array<{ from: number; to: number; outcome: Promise<PageOutcome> }> = [];
    let nextFrom = start;
    const fill = () => {
      // every worker busy plus one page ready; without workers, the next page is fetched while this one is hashed
      while (nextFrom <= head.position && inFlight.length < (pool ? pool.size + 1 : 2)) {
        const from = nextFrom;
        const to = Math.min(from + verifyPageSize - 1, head.position);
        const outcome = checkPage(from, to);
        outcome.catch(() => {}); // awaited below, or abandoned if the walk stops first
        inFlight.push({ from, to, outcome });
        nextFrom = to + 1;
      }
    };
    let expected = start;
    fill();
    while (inFlight.length > 0) {
      const { from, to, outcome: pending } = inFlight.shift() as (typeof inFlight)[number];
      const outcome = await pending;
      fill();
      const failure = outcome.failure;
      if (failure?.position === from && failure.reason === 'missing_event') return broken(from, 'missing_event', `event ${from} is missing`);
      if (outcome.firstPrev !== prevHex) return broken(from, 'broken_link', `event ${from} does not link to event ${from - 1}`);
      const failedAt = failure?.position ?? to + 1;
      for (const position of checkpointPositions) {
        if (position < from || position >= failedAt) continue;
        result.checked = position - start;
        for (const cp of checkpoints.get(position) ?? []) {
          const problem = await checkCheckpoint(cp, signer);
          if (problem !== undefined) return broken(position, 'checkpoint_invalid', `checkpoint ${cp.id}: ${problem}`);
          if (cp.hash.toString('hex') !== outcome.hashesAt[position]) return broken(position, 'checkpoint_mismatch', `checkpoint ${cp.id} signed another hash for event ${position}`);
          result.checkpointsChecked += 1;
        }
      }
      result.checked = failedAt - start;
      if (failure !== undefined) {
        const detail =
          failure.reason === 'missing_event'
            ? `event ${failure.position} is missing`
            : failure.reason === 'broken_link'
              ? `event ${failure.position} does not link to event ${failure.position - 1}`
              : `event ${failure.position} does not match its hash (changed, forged or moved)`;
        return broken(failure.position, failure.reason, detail);
      }
      prevHex = outcome.lastHash as string;
      expected = to + 1;
    }
    if (expected <= head.position) return broken(expected, 'missing_event', `event ${expected} is missing`);
    if (head.hash.toString('hex') !== prevHex) return broken(head.position, 'head_mismatch', `the chain head does not match event ${head.position}`);
    for (const cp of beyondHead) {
      const problem = await checkCheckpoint(cp, signer);
      if (problem !== undefined) return broken(head.position + 1, 'checkpoint_invalid', `checkpoint ${cp.id}: ${problem}`);
      return broken(head.position + 1, 'missing_event', `checkpoint ${cp.id} signed event ${cp.position}, beyond the chain head: events were removed`);
    }
    // Anything committed beyond the head was written around the writer: max first, then the head
    // (a legitimate writer commits its events and the head together, so head >= max then).
    const max = await repo.maxPosition(db);
    const headNow = await repo.readHead(db);
    if (!headNow) return broken(head.position, 'head_missing', 'the chain-head row is missing');
    if (max > headNow.position) return broken(headNow.position + 1, 'event_after_head', `event ${headNow.position + 1} lies beyond the chain head`);
    return { ...result, ok: true };
  }

  // ---- queries ----

  interface EventCursor {
    p: number;
    o: 'asc' | 'desc';
  }
  const isEventCursor = (value: unknown): value is EventCursor =>
    typeof value === 'object' && value !== null &&
    Number.isSafeInteger((value as EventCursor).p) && (value as EventCursor).p >= 0 &&
    ((value as EventCursor).o === 'asc' || (value as EventCursor).o === 'desc');

  function toDate(value: Date | string | undefined, field: string): Date | undefined {
    if (value === undefined) return undefined;
    const date = value instanceof Date ? value : new Date(value);
    if (Number.isNaN(date.getTime())) throw new BadRequestError(`${field} must be a date-time`, { field });
    return date;
  }

  async function queryEvents(filters: EventQuery, cursor: string | undefined, limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > 1000) throw new BadRequestError('limit must be between 1 and 1000', { field: 'limit' });
    const order = filters.order ?? 'asc';
    const after = decodeCursor(cursor, isEventCursor);
    if (cursor !== undefined && (after === undefined || after.o !== order)) throw new BadRequestError('The cursor is invalid for this query', { field: 'cursor' });
    const rows = await repo.queryEvents(
      db,
      { ...filters, from: toDate(filters.from, 'from'), to: toDate(filters.to, 'to') },
      after?.p,
      order,
      limit + 1,
    );
    const more = rows.length > limit;
    const items = rows.slice(0, limit).map(
      (r): AuditEventView => ({
        position: r.position,
        time: r.occurredAt.toISOString(),
        actor: r.actor,
        action: r.action,
        outcome: r.outcome,
        keyId: r.keyId,
        details: r.details,
        requestId: r.requestId,
        prevHash: r.prevHash.toString('hex'),
        hash: r.hash.toString('hex'),
      }),
    );
    const last = items.at(-1);
    return more && last ? { items, nextCursor: encodeCursor({ p: last.position, o: order } satisfies EventCursor) } : { items };
  }

  async function listCheckpoints(listOptions: { cursor?: string | undefined; limit?: number | undefined } = {}): Promise<CheckpointList> {
    const limit = listOptions.limit ?? 100;
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > 1000) throw new BadRequestError('limit must be between 1 and 1000', { field: 'limit' });
    const isBefore = (v: unknown): v is { before: number } =>
      typeof v === 'object' && v !== null && Number.isSafeInteger((v as { before: number }).before);
    const before = decodeCursor(listOptions.cursor, isBefore);
    if (listOptions.cursor !== undefined && before === undefined) throw new BadRequestError('The cursor is invalid', { field: 'cursor' });
    // the exported key is derived from the unwrapped private key, never read from a table
    const signer = await signingKey.get();
    const rows = await repo.listCheckpoints(db, before?.before, limit + 1);
    const items = rows.slice(0, limit).map(toCheckpoint);
    const last = items.at(-1);
    const page: CheckpointList = { publicKey: { ...signer.publicJwk }, items };
    if (rows.length > limit && last) page.nextCursor = encodeCursor({ before: last.id });
    return page;
  }

  // ---- KEK rotation support ----

  async function rewrapKeys(): Promise<{ rewrapped: number; failed: number }> {
    const keys = await repo.listKeys(db);
    const results = await kek.rewrapBatch(keys.map((k) => ({ blob: k.wrappedKey, context: auditKeyBinding(k.purpose, k.version, kek.keyName) })));
    let rewrapped = 0;
    let failed = 0;
    for (const [i, k] of keys.entries()) {
      const result = results[i];
      if (!result || !result.ok) {
        failed += 1;
        logger.error({ purpose: k.purpose, version: k.version }, 'audit key rewrap failed');
        continue;
      }
      if (result.blob === k.wrappedKey) continue;
      const replaced = await repo.replaceKeyBlob(db, { purpose: k.purpose, version: k.version, oldWrappedKey: k.wrappedKey, wrappedKey: result.blob, kekVersion: kekBlobVersion(result.blob) });
      if (replaced) rewrapped += 1;
    }
    return { rewrapped, failed };
  }

  async function kekVersionsInUse(): Promise<number[]> {
    return [...new Set((await repo.listKeys(db)).map((k) => k.kekVersion))].sort((a, b) => a - b);
  }

  // ---- periodic checkpoints and shutdown ----

  let checkpointTimer: NodeJS.Timeout | undefined;
  let checkpointRunning: Promise<unknown> | undefined;
  if (options.checkpointIntervalMs !== undefined && options.checkpointIntervalMs > 0) {
    checkpointTimer = setInterval(() => {
      if (checkpointRunning !== undefined) return;
      checkpointRunning = checkpointIfChanged()
        .catch((error: unknown) => logger.error({ err: error }, 'periodic audit checkpoint failed'))
        .finally(() => {
          checkpointRunning = undefined;
        });
    }, options.checkpointIntervalMs);
    checkpointTimer.unref();
  }

  async function close(): Promise<void> {
    closed = true;
    if (checkpointTimer !== undefined) clearInterval(checkpointTimer);
    checkpointTimer = undefined;
    if (batchTimer !== undefined) {
      clearTimeout(batchTimer);
      startWriter();
    }
    await writing;
    await checkpointRunning;
    await (await verifyPoolStart)?.close();
    // a key still loading holds a database query: let it finish before the database closes
    await Promise.allSettled([hmacKey.loading, signingKey.loading]);
  }

  return {
    record,
    recordRead,
    async init() {
      await Promise.all([hmacKey.get(), signingKey.get()]);
    },
    verify,
    createCheckpoint,
    checkpointIfChanged,
    listCheckpoints,
    queryEvents,
    async chainLength() {
      return (await repo.readHead(db))?.position ?? 0;
    },
    rewrapKeys,
    kekVersionsInUse,
    close,
  };
}
