/**
 * Checking one page of the chain, apart from its neighbours: the part of `verify` that can run
 * in worker threads. Every event stores the hash of its predecessor (`prev_hash`), so each
 * page's HMACs can be recomputed without the page before it; the caller walks the outcomes in
 * position order, checks that each page's first `prev_hash` is the previous page's last hash,
 * checks the signed checkpoints, and so reports exactly what a sequential walk would: the
 * first bad position, its reason, and how many events were checked before it.
 *
 * Within a page, position by position (as the sequential walk does): a missing position is
 * `missing_event`; an event whose `prev_hash` is not the hash of the event before it (in this
 * page) is `broken_link`; an event whose HMAC — keyed, over the hash it links to and its
 * canonical JSON — is not its stored hash is `hash_mismatch`.
 */
import type { KeyObject } from 'node:crypto';
import { canonicalEvent, canonicalJson, chainHashMatchesHex } from './audit.chain.js';

/**
 * A page as the repository reads it. `columns`: each column aggregated into one text by the
 * server (JSON arrays; details as JSON texts joined by newlines, which JSON text never holds
 * raw; hashes as one hex string, 64 digits an event: the server vouches that every hash is 32
 * bytes and no details are null, else it sends `rows`). `rows`: one JSON array per event, the
 * general form (see ChainTuple in audit.repository.ts).
 */
export type ChainPageData =
  | {
      kind: 'columns';
      positions: string;
      times: string;
      actors: string;
      actions: string;
      outcomes: string;
      keyIds: string;
      requestIds: string;
      details: string;
      prevHashes: string;
      hashes: string;
    }
  | { kind: 'rows'; json: string }
  | { kind: 'empty' };

export type PageFailureReason = 'missing_event' | 'broken_link' | 'hash_mismatch';

export interface PageOutcome {
  /** `prev_hash` (hex) of the page's first position, when that event exists */
  firstPrev?: string;
  /** hash (hex) of the page's last position, when the whole page checked out */
  lastHash?: string;
  /** the first bad position of the page */
  failure?: { position: number; reason: PageFailureReason };
  /** hashes (hex) at the asked positions before the failure (for signed checkpoints) */
  hashesAt: Record<number, string>;
}

interface Decoded {
  count: number;
  positions: number[];
  times: string[];
  actors: string[];
  actions: string[];
  outcomes: string[];
  keyIds: Array<string | null>;
  requestIds: Array<string | null>;
  /** canonical details text of event i */
  details(i: number): string;
  prev(i: number): string;
  hash(i: number): string;
}

const DETAILS_MEMO_ENTRIES = 1000;
const DETAILS_MEMO_MAX_CHARS = 1024;
/** canonical JSON per stored details text (a pure function of it): runs of events share details */
const detailsMemo = new Map<string, string>();

function canonicalDetailsText(text: string): string {
  let canonical = detailsMemo.get(text);
  if (canonical === undefined) {
    canonical = canonicalJson(JSON.parse(text));
    if (text.length <= DETAILS_MEMO_MAX_CHARS) {
      if (detailsMemo.size >= DETAILS_MEMO_ENTRIES) detailsMemo.clear();
      detailsMemo.set(text, canonical);
    }
  }
  return canonical;
}

function decode(page: ChainPageData): Decoded {
  if (page.kind === 'empty') {
    return { count: 0, positions: [], times: [], actors: [], actions: [], outcomes: [], keyIds: [], requestIds: [], details: () => '', prev: () => '', hash: () => '' };
  }
  if (page.kind === 'rows') {
    // [position, time, actor, action, outcome, keyId, details, requestId, prevHash hex, hash hex]
    const rows = JSON.parse(page.json) as Array<[number, string, string, string, string, string | null, unknown, string | null, string, string]>;
    return {
      count: rows.length,
      positions: rows.map((r) => r[0]),
      times: rows.map((r) => r[1]),
      actors: rows.map((r) => r[2]),
      actions: rows.map((r) => r[3]),
      outcomes: rows.map((r) => r[4]),
      keyIds: rows.map((r) => r[5]),
      requestIds: rows.map((r) => r[7]),
      details: (i) => canonicalJson((rows[i] as (typeof rows)[number])[6]),
      prev: (i) => (rows[i] as (typeof rows)[number])[8],
      hash: (i) => (rows[i] as (typeof rows)[number])[9],
    };
  }
  const positions = JSON.parse(page.positions) as number[];
  const details = page.details.split('\n');
  const count = positions.length;
  const decoded: Decoded = {
    count,
    positions,
    times: JSON.parse(page.times) as string[],
    actors: JSON.parse(page.actors) as string[],
    actions: JSON.parse(page.actions) as string[],
    outcomes: JSON.parse(page.outcomes) as string[],
    keyIds: JSON.parse(page.keyIds) as Array<string | null>,
    requestIds: JSON.parse(page.requestIds) as Array<string | null>,
    details: (i) => canonicalDetailsText(details[i] as string),
    prev: (i) => page.prevHashes.slice(64 * i, 64 * i + 64),
    hash: (i) => page.hashes.slice(64 * i, 64 * i + 64),
  };
  const columns = [decoded.times, decoded.actors, decoded.actions, decoded.outcomes, decoded.keyIds, decoded.requestIds, details];
  if (columns.some((c) => c.length !== count) || page.prevHashes.length !== 64 * count || page.hashes.length !== 64 * count) {
    throw new Error('The audit page columns do not line up');
  }
  return decoded;
}

/** Check positions `from`…`to` of one page (see the header); `hashesAt` asks for hashes at those positions. */
export function verifyChainPage(key: KeyObject, page: ChainPageData, from: number, to: number, hashesAt: readonly number[] = []): PageOutcome {
  const rows = decode(page);
  // rows placed by position: the server does not sort them (positions are consecutive by construction)
  const slot = new Array<number | undefined>(to - from + 1);
  for (let i = 0; i < rows.count; i++) {
    const position = rows.positions[i] as number;
    if (position >= from && position <= to) slot[position - from] = i;
  }
  const wanted = new Set(hashesAt);
  const outcome: PageOutcome = { hashesAt: {} };
  let prevHex = '';
  for (let position = from; position <= to; position++) {
    const i = slot[position - from];
    if (i === undefined) {
      outcome.failure = { position, reason: 'missing_event' };
      return outcome;
    }
    const prev = rows.prev(i);
    if (position === from) outcome.firstPrev = prev;
    else if (prev !== prevHex) {
      outcome.failure = { position, reason: 'broken_link' };
      return outcome;
    }
    const canonical = canonicalEvent({
      position,
      time: rows.times[i] as string,
      actor: rows.actors[i] as string,
      action: rows.actions[i] as string,
      outcome: rows.outcomes[i] as string,
      keyId: rows.keyIds[i] as string | null,
      detailsJson: rows.details(i),
      requestId: rows.requestIds[i] as string | null,
    });
    const hash = rows.hash(i);
    if (!chainHashMatchesHex(key, prev, canonical, hash)) {
      outcome.failure = { position, reason: 'hash_mismatch' };
      return outcome;
    }
    if (wanted.has(position)) outcome.hashesAt[position] = hash;
    prevHex = hash;
  }
  outcome.lastHash = prevHex;
  return outcome;
}
