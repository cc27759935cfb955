/**
 * Unwrapped parent keys (group and device DEKs) kept in memory with a TTL and a size bound,
 * so a key fetch does not cost a KEK round trip per request. Entries are zeroed when they
 * leave the cache. Callers must invalidate on every state change of a version (disable,
 * destroy); other replicas' entries expire by TTL, and delivery always re-reads the version's
 * state from the database, so a cached parent never makes a revoked version deliverable.
 */
import { LRUCache } from 'lru-cache';

export interface KeyCache {
  get(kind: 'group' | 'device', id: string, version: number): Buffer | undefined;
  /** presence only: no copy, no hit/miss counted */
  has(kind: 'group' | 'device', id: string, version: number): boolean;
  set(kind: 'group' | 'device', id: string, version: number, key: Buffer): void;
  invalidate(kind: 'group' | 'device', id: string, version?: number): void;
  stats(): { hits: number; misses: number; size: number };
  clear(): void;
}

export function createKeyCache(options: { ttlSeconds: number; maxEntries: number }): KeyCache {
  const cache = new LRUCache<string, Buffer>({
    max: options.maxEntries,
    ttl: options.ttlSeconds * 1000,
    ttlAutopurge: false,
    dispose: (value) => value.fill(0),
  });
  // versions cached per key, so invalidating a whole key does not scan the cache
  const versionsByKey = new Map<string, Set<number>>();
  let hits = 0;
  let misses = 0;
  const entry = (kind: string, id: string, version: number) => `${kind}\u0000${id}\u0000${version}`;

  return {
    get(kind, id, version) {
      const value = cache.get(entry(kind, id, version));
      if (!value) {
        misses++;
        return undefined;
      }
      hits++;
      // a copy: an eviction zeroes the cached buffer, which must never hit a key in use
      return Buffer.from(value);
    },
    has: (kind, id, version) => cache.has(entry(kind, id, version)),
    set(kind, id, version, key) {
      // the cache owns its copy: a caller zeroing its buffer must not corrupt the cache
      cache.set(entry(kind, id, version), Buffer.from(key));
      const keyName = `${kind}\u0000${id}`;
      let versions = versionsByKey.get(keyName);
      if (!versions) versionsByKey.set(keyName, (versions = new Set()));
      versions.add(version);
      if (versionsByKey.size > options.maxEntries * 2) pruneIndex();
    },
    invalidate(kind, id, version) {
      const keyName = `${kind}\u0000${id}`;
      const versions = version === undefined ? versionsByKey.get(keyName) : new Set([version]);
      for (const v of versions ?? []) cache.delete(entry(kind, id, v));
      if (version === undefined) versionsByKey.delete(keyName);
      else versionsByKey.get(keyName)?.delete(version);
    },
    stats: () => ({ hits, misses, size: cache.size }),
    clear() {
      cache.clear();
      versionsByKey.clear();
    },
  };

  function pruneIndex(): void {
    for (const [keyName, versions] of versionsByKey) {
      for (const v of versions) if (!cache.has(`${keyName}\u0000${v}`)) versions.delete(v);
      if (versions.size === 0) versionsByKey.delete(keyName);
    }
  }
}
