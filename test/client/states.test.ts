/** The state rule (DESIGN §2) and Retry-After parsing, as pure functions. */
import crypto from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { judge, parseRetryAfter, type KeyVersion } from '../../src/client/index.js';
import { withEncryptionEnd } from '../../src/client/keys.js';

const T = Date.UTC(2026, 0, 1);
function version(overrides: Partial<KeyVersion>): KeyVersion {
  return {
    kid: 'd/f:v1',
    deviceId: 'd',
    field: 'f',
    version: 1,
    state: 'primary',
    stateChangedAt: T,
    stateUntil: null,
    createdAt: T - 1000,
    key: crypto.createSecretKey(crypto.randomBytes(32)),
    fetchedAt: T + 10_000,
    ...overrides,
  };
}

describe('the state rule', () => {
  it('when the version is primary, then any message is accepted', () => {
    expect(judge(version({}), T + 1e9)).toEqual({ ok: true });
  });

  it('when the version is in grace, then messages up to the end of grace are accepted and later ones refused', () => {
    const grace = version({ state: 'grace', stateUntil: T + 5000 });
    expect(judge(grace, T + 5000)).toEqual({ ok: true });
    expect(judge(grace, T + 5001)).toMatchObject({ ok: false, refresh: false, error: { code: 'key_decrypt_only' } });
    expect(judge(version({ state: 'grace', stateUntil: null }), T + 1e9)).toEqual({ ok: true });
  });

  it('when the version is decrypt_only with stateChangedAt, then messages stamped after it are refused', () => {
    const entry = withEncryptionEnd(version({ state: 'decrypt_only', stateChangedAt: T }), undefined);
    expect(entry.encryptionEnd).toEqual({ at: T, source: 'server' });
    expect(judge(entry, T)).toEqual({ ok: true });
    expect(judge(entry, T + 1)).toMatchObject({ ok: false, error: { code: 'key_decrypt_only', kid: 'd/f:v1', state: 'decrypt_only' } });
  });

  it('when stateChangedAt is absent, then the grace end seen earlier is used, else the time the client first saw decrypt_only', () => {
    const earlierGrace = version({ state: 'grace', stateUntil: T + 3000 });
    const fromGrace = withEncryptionEnd(version({ state: 'decrypt_only', stateChangedAt: undefined }), earlierGrace);
    expect(fromGrace.encryptionEnd).toEqual({ at: T + 3000, source: 'grace_end' });
    expect(judge(fromGrace, T + 3001).ok).toBe(false);

    const observed = withEncryptionEnd(version({ state: 'decrypt_only', stateChangedAt: undefined, fetchedAt: T + 7000 }), undefined);
    expect(observed.encryptionEnd).toEqual({ at: T + 7000, source: 'observed' });
    expect(judge(observed, T + 7000).ok).toBe(true);
    expect(judge(observed, T + 7001).ok).toBe(false);
    // a re-fetch keeps the earliest bound it learnt
    const again = withEncryptionEnd(version({ state: 'decrypt_only', stateChangedAt: undefined, fetchedAt: T + 99_000 }), observed);
    expect(again.encryptionEnd).toEqual({ at: T + 7000, source: 'observed' });
  });

  it('when the version is pending, then it is refused with a hint to re-read it; disabled and destroyed states are refused outright', () => {
    expect(judge(version({ state: 'pending' }), T)).toMatchObject({ ok: false, refresh: true, error: { code: 'key_pending' } });
    for (const state of ['disabled', 'destroy_scheduled', 'destroyed'] as const) {
      expect(judge(version({ state }), T)).toMatchObject({ ok: false, refresh: false, error: { code: 'key_disabled' } });
    }
  });
});

describe('Retry-After', () => {
  it('when given as seconds or as an HTTP-date, then it becomes milliseconds from now; nonsense is ignored', () => {
    expect(parseRetryAfter('5', T)).toBe(5000);
    expect(parseRetryAfter(' 0 ', T)).toBe(0);
    expect(parseRetryAfter(new Date(T + 3000).toUTCString(), T)).toBe(3000);
    expect(parseRetryAfter(new Date(T - 3000).toUTCString(), T)).toBe(0);
    expect(parseRetryAfter('soon', T)).toBeUndefined();
    expect(parseRetryAfter('-1', T)).toBeUndefined();
    expect(parseRetryAfter(null, T)).toBeUndefined();
  });
});
