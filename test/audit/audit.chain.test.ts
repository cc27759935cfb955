import crypto from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  canonicalEvent,
  canonicalJson,
  canonicalTime,
  chainHash,
  chainHashHex,
  chainHashMatchesHex,
  GENESIS_HASH,
  hexDigestsEqual,
  InvalidAuditEventError,
  prepareEvent,
} from '../../src/audit/audit.chain.js';

describe('canonical JSON', () => {
  it('when objects nest, then every level has sorted keys and there is no whitespace', () => {
    expect(canonicalJson({ b: 1, a: { d: [3, { z: null, y: 'x' }], c: true } })).toBe('{"a":{"c":true,"d":[3,{"y":"x","z":null}]},"b":1}');
  });

  it('when keys differ only in case or are non-ASCII, then they sort by UTF-16 code units (RFC 8785)', () => {
    expect(canonicalJson({ b: 1, B: 2, é: 3, a: 4, '\u{1F600}': 5, '\uFB33': 6 })).toBe('{"B":2,"a":4,"b":1,"é":3,"\u{1F600}":5,"\uFB33":6}');
  });

  it('when numbers and strings need escaping, then they are written as JSON.stringify writes them', () => {
    expect(canonicalJson({ n: [1e21, 0.1, -0, 1.5e-7], s: 'quote " backslash \\ tab \t nl \n ctl \u0001' })).toBe(
      '{"n":[1e+21,0.1,0,1.5e-7],"s":"quote \\" backslash \\\\ tab \\t nl \\n ctl \\u0001"}',
    );
  });

  it('when a value is not JSON, then canonicalisation refuses it', () => {
    expect(() => canonicalJson(undefined)).toThrow(TypeError);
    expect(() => canonicalJson(() => 1)).toThrow(TypeError);
  });

  it('when an event is canonicalised, then its members are in sorted order with null for absent ids', () => {
    const text = canonicalEvent({ position: 7, time: '2026-03-01T12:00:00.123000Z', actor: 'alice', action: 'group.create', outcome: 'success', keyId: null, detailsJson: '{"v":1}', requestId: null });
    expect(text).toBe('{"action":"group.create","actor":"alice","details":{"v":1},"keyId":null,"outcome":"success","position":7,"requestId":null,"time":"2026-03-01T12:00:00.123000Z"}');
    const parsed = JSON.parse(text) as Record<string, unknown>;
    expect(canonicalJson(parsed)).toBe(text);
  });

  it('when a time is canonicalised, then it is UTC with microseconds, as PostgreSQL prints it', () => {
    expect(canonicalTime(new Date('2026-03-01T12:00:00.123+02:00'))).toBe('2026-03-01T10:00:00.123000Z');
    expect(() => canonicalTime(new Date('+010000-01-01T00:00:00Z'))).toThrow(RangeError);
  });
});

describe('the keyed chain hash', () => {
  it('when computed, then it is HMAC-SHA256(key, prevHash ‖ UTF-8 canonical JSON), in Buffer and hex forms alike', () => {
    const raw = crypto.randomBytes(32);
    const key = crypto.createSecretKey(raw);
    const prev = crypto.randomBytes(32);
    const canonical = '{"action":"ä","actor":"x"}';
    const expected = crypto.createHmac('sha256', raw).update(Buffer.concat([prev, Buffer.from(canonical, 'utf8')])).digest();
    expect(chainHash(key, prev, canonical).equals(expected)).toBe(true);
    expect(chainHashHex(key, prev.toString('hex'), canonical)).toBe(expected.toString('hex'));
    expect(GENESIS_HASH.equals(Buffer.alloc(32))).toBe(true);
  });
});

describe('checking a stored chain hash', () => {
  const key = crypto.createSecretKey(crypto.randomBytes(32));
  const prev = crypto.randomBytes(32).toString('hex');
  const canonical = '{"action":"key.deliver"}';
  const right = chainHashHex(key, prev, canonical);
  const flipped = (hex: string, at: number) => hex.slice(0, at) + (hex[at] === '0' ? '1' : '0') + hex.slice(at + 1);

  it('when the stored hash is the HMAC, then it matches; when any one digit differs (first, middle, last), or the length, then not', () => {
    expect(chainHashMatchesHex(key, prev, canonical, right)).toBe(true);
    for (const at of [0, 31, 63]) expect(chainHashMatchesHex(key, prev, canonical, flipped(right, at)), `digit ${at}`).toBe(false);
    expect(chainHashMatchesHex(key, prev, canonical, right.slice(0, 62))).toBe(false);
    expect(chainHashMatchesHex(key, prev, canonical, `${right}00`)).toBe(false);
    expect(chainHashMatchesHex(key, prev, canonical, '')).toBe(false);
    expect(chainHashMatchesHex(key, flipped(prev, 5), canonical, right)).toBe(false);
  });

  it('when two strings are compared in constant time, then the answer is that of ===, for any pair', () => {
    const hex = fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength: 0, maxLength: 70 });
    fc.assert(fc.property(hex, hex, (a, b) => hexDigestsEqual(a, b) === (a === b)));
    fc.assert(fc.property(hex, fc.nat(69), (a, at) => hexDigestsEqual(a, at < a.length ? flipped(a, at) : a) === !(at < a.length)));
  });
});

describe('preparing an event', () => {
  const base = { actor: 'alice', action: 'key.deliver', outcome: 'success' } as const;

  it('when details hold undefined members and dates, then they are stored as their JSON round trip', () => {
    const prepared = prepareEvent({ ...base, details: { when: new Date('2026-01-01T00:00:00Z'), gone: undefined, nan: Number.NaN } });
    expect(prepared.detailsJson).toBe('{"nan":null,"when":"2026-01-01T00:00:00.000Z"}');
    expect(prepared.keyId).toBeNull();
    expect(prepared.requestId).toBeNull();
  });

  it('when strings hold NUL or lone surrogates, then those become U+FFFD (PostgreSQL could not store them as hashed)', () => {
    const prepared = prepareEvent({ ...base, actor: 'a\u0000b', keyId: 'k\uD800', details: { ['x\u0000']: 'y\uDC00z', ok: '\u{1F600}' } });
    expect(prepared.actor).toBe('a\uFFFDb');
    expect(prepared.keyId).toBe('k\uFFFD');
    expect(prepared.detailsJson).toBe('{"ok":"\u{1F600}","x\uFFFD":"y\uFFFDz"}');
  });

  it('when a field is missing, too long or of the wrong kind, then the event is refused', () => {
    expect(() => prepareEvent({ ...base, actor: '' })).toThrow(InvalidAuditEventError);
    expect(() => prepareEvent({ ...base, action: 'x'.repeat(129) })).toThrow(InvalidAuditEventError);
    expect(() => prepareEvent({ ...base, outcome: 'maybe' as never })).toThrow(InvalidAuditEventError);
    expect(() => prepareEvent({ ...base, details: [] as never })).toThrow(InvalidAuditEventError);
    expect(() => prepareEvent({ ...base, details: { big: 'x'.repeat(70_000) } })).toThrow(/exceed/);
    expect(() => prepareEvent({ ...base, details: { n: 10n } })).toThrow(/JSON-serialisable/);
  });
});
