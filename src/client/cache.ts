/**
 * The client's key cache: delivered versions by kid, bounded (LRU) and fresh for a TTL measured
 * on the injected clock, plus a short negative cache of versions the service refused to
 * deliver, so a device sending unknown versions cannot make every message cost a request.
 * A stale entry is not served but kept until evicted: what the client knew of a version (its
 * grace end) still helps judge it when it comes back as decrypt_only.
 */
import { LRUCache } from 'lru-cache';
import type { MissingReason } from './errors.js';
import { keyNameOf, withEncryptionEnd, type KeyVersion } from './keys.js';

export interface KeyVersionCache {
  /** a fresh entry, or undefined */
  get(kid: string): KeyVersion | undefined;
  /** any entry, fresh or stale, without touching recency */
  peek(kid: string): KeyVersion | undefined;
  set(entry: KeyVersion): KeyVersion;
  delete(kid: string): void;
  /** every cached version (fresh or stale) of `<deviceId>` or `<deviceId>/<field>` */
  versionsOf(keyName: string): KeyVersion[];
  getMissing(kid: string): MissingReason | undefined;
  setMissing(kid: string, reason: MissingReason): void;
  clearMissing(kid: string): void;
  invalidate(deviceId: string, field?: string): void;
  clear(): void;
  readonly size: number;
}

export function createKeyVersionCache(options: { maxEntries: number; ttlMs: number; negativeTtlMs: number; now: () => number }): KeyVersionCache {
  const { ttlMs, negativeTtlMs, now } = options;
  const byKey = new Map<string, Set<string>>();
  const unindex = (entry: KeyVersion) => {
    const name = keyNameOf(entry.deviceId, entry.field);
    const kids = byKey.get(name);
    kids?.delete(entry.kid);
    if (kids?.size === 0) byKey.delete(name);
  };
  const entries = new LRUCache<string, KeyVersion>({
    max: options.maxEntries,
    // on overwrite ('set') the kid stays indexed
    dispose: (entry, _kid, reason) => {
      if (reason !== 'set') unindex(entry);
    },
  });
  const missing = new LRUCache<string, { reason: MissingReason; at: number }>({ max: options.maxEntries });

  const cache: KeyVersionCache = {
    get(kid) {
      const entry = entries.get(kid);
      return entry && now() - entry.fetchedAt < ttlMs ? entry : undefined;
    },
    peek: (kid) => entries.peek(kid),
    set(fresh) {
      // frozen: callers get the cached object itself, and must not be able to change its state
      const entry = Object.freeze(withEncryptionEnd(fresh, entries.peek(fresh.kid)));
      entries.set(entry.kid, entry);
      const name = keyNameOf(entry.deviceId, entry.field);
      let kids = byKey.get(name);
      if (!kids) byKey.set(name, (kids = new Set()));
      kids.add(entry.kid);
      missing.delete(entry.kid);
      return entry;
    },
    delete(kid) {
      entries.delete(kid);
    },
    versionsOf(keyName) {
      const out: KeyVersion[] = [];
      for (const kid of byKey.get(keyName) ?? []) {
        const entry = entries.peek(kid);
        if (entry) out.push(entry);
      }
      return out;
    },
    getMissing(kid) {
      const miss = missing.get(kid);
      return miss && now() - miss.at < negativeTtlMs ? miss.reason : undefined;
    },
    setMissing(kid, reason) {
      if (negativeTtlMs > 0) missing.set(kid, { reason, at: now() });
    },
    clearMissing(kid) {
      missing.delete(kid);
    },
    invalidate(deviceId, field) {
      for (const entry of cache.versionsOf(keyNameOf(deviceId, field))) {
        entries.delete(entry.kid);
        missing.delete(entry.kid);
      }
    },
    clear() {
      entries.clear();
      missing.clear();
      byKey.clear();
    },
    get size() {
      return entries.size;
    },
  };
  return cache;
}
