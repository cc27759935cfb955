/**
 * Requests derived from a route's JSON Schema (TypeBox output, as the route table holds it):
 * a minimal valid value (fixtures fill ids), fast-check arbitraries of valid values, and of
 * malformed ones (wrong types, missing and extra properties, boundary lengths, out-of-range
 * numbers, hostile strings). Used by the fuzz test and by the fault tests' request batteries.
 */
import fc from 'fast-check';
import type { RouteEntry } from '../../src/http/route-table.js';

export type Schema = Record<string, unknown>;

/** Ids the fixtures of a test created, by the property or parameter name that carries them. */
export interface Fixtures {
  groupId: string;
  deviceId: string;
  field: string;
  clientId: string;
  rolloutId: string;
  version: number;
  /** a fresh id each call (new groups, devices) */
  freshId(): string;
}

const FIXTURE_NAMES = new Set(['groupId', 'deviceId', 'field', 'clientId', 'rolloutId', 'version']);

function fixtureFor(name: string, fixtures: Fixtures): unknown {
  switch (name) {
    case 'groupId':
      return fixtures.groupId;
    case 'deviceId':
      return fixtures.deviceId;
    case 'field':
      return fixtures.field;
    case 'clientId':
      return fixtures.clientId;
    case 'rolloutId':
      return fixtures.rolloutId;
    case 'version':
      return fixtures.version;
    default:
      return undefined;
  }
}

const union = (s: Schema) => (s.anyOf ?? s.oneOf) as Schema[] | undefined;

/** A small valid value: fixtures for known names, then examples, defaults, consts, the first branch of a union. */
export function sampleValid(schema: unknown, fixtures: Fixtures, name = ''): unknown {
  const s = (schema ?? {}) as Schema;
  if (FIXTURE_NAMES.has(name) && (s.type === 'string' || s.type === 'integer')) return fixtureFor(name, fixtures);
  if (name === 'id' && s.type === 'string') return fixtures.freshId();
  if (Array.isArray(s.examples) && s.examples.length > 0) return s.examples[0];
  if ('default' in s) return s.default;
  if ('const' in s) return s.const;
  const branches = union(s);
  if (branches?.length) return sampleValid(branches[0], fixtures, name);
  switch (s.type) {
    case 'object': {
      const properties = (s.properties ?? {}) as Record<string, Schema>;
      const required = (s.required ?? []) as string[];
      const keys = required.length > 0 || typeof s.minProperties !== 'number' ? required : Object.keys(properties).slice(0, s.minProperties);
      return Object.fromEntries(keys.map((key) => [key, sampleValid(properties[key], fixtures, key)]));
    }
    case 'array':
      return [sampleValid(s.items, fixtures, name === 'ids' ? 'id' : name)];
    case 'integer':
    case 'number':
      return typeof s.minimum === 'number' ? s.minimum : 1;
    case 'boolean':
      return false;
    case 'string':
      return 'x'.repeat(typeof s.minLength === 'number' ? Math.max(1, s.minLength) : 1);
    default:
      return null;
  }
}

/** The route's URL with its parameters filled from the fixtures (`*` of static routes → a file name). */
export function urlWithParams(route: RouteEntry, fixtures: Fixtures, override: Record<string, string> = {}): string {
  return route.url
    .replace(/:(\w+)/g, (_m, name: string) => override[name] ?? encodeURIComponent(String(fixtureFor(name, fixtures) ?? `x-${name}`)))
    .replace(/\*$/, 'swagger-ui.css');
}

export function schemaOf(route: RouteEntry, part: 'params' | 'querystring' | 'body' | 'headers'): Schema | undefined {
  const schema = route.schema as Record<string, unknown> | undefined;
  return (schema?.[part] as Schema | undefined) ?? undefined;
}

/** A valid request for the route from its schema and the fixtures: URL (with a valid query), and body when it takes one. */
export function validRequest(route: RouteEntry, fixtures: Fixtures): { method: string; url: string; payload?: unknown } {
  const query = schemaOf(route, 'querystring');
  const sample = query ? (sampleValid(query, fixtures) as Record<string, unknown>) : {};
  const search = new URLSearchParams(Object.entries(sample).map(([k, v]): [string, string] => [k, String(v)])).toString();
  const body = schemaOf(route, 'body');
  return { method: route.method, url: urlWithParams(route, fixtures) + (search ? `?${search}` : ''), ...(body ? { payload: sampleValid(body, fixtures) } : {}) };
}

// ---------------------------------------------------------------------------------------------
// fast-check arbitraries

/** Strings a service should refuse or store verbatim, never choke on. */
export const HOSTILE_STRINGS: readonly string[] = [
  '',
  ' ',
  '../../etc/passwd',
  '..%2f..%2fetc%2fpasswd',
  '%2e%2e%2f%2e%2e',
  '..\\..\\windows',
  'a\u0000b',
  '\u0000',
  'dev\u202Eevil', // RTL override
  '\u202Dleft',
  'раyрal', // Cyrillic homoglyphs
  'ｇｒｏｕｐ', // fullwidth
  'e\u0301\u0301\u0301', // combining marks
  'Z̴̡̛̖͎̘a̶̢̛l̸̨̛g̴o̵', // zalgo
  '\uD800', // lone surrogate
  '\uFEFFbom',
  '😀'.repeat(40),
  'a'.repeat(129),
  'a'.repeat(10_000),
  "'; drop table devices; --",
  '${jndi:ldap://x}',
  '<script>alert(1)</script>',
  '__proto__',
  'constructor',
  'NaN',
  '-1',
  '1e309',
  '\r\nX-Injected: 1',
  'sensor-0001',
];

/** Numbers at and beyond every boundary a route may have. */
export const HOSTILE_NUMBERS: readonly number[] = [0, -1, -0, 1, 0.5, 2_147_483_647, 2_147_483_648, 9_007_199_254_740_991, 9_007_199_254_740_993, 1e21, 1e308, -1e308, Number.MIN_VALUE];

const hostileString = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom(...HOSTILE_STRINGS) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 40 }) },
  { weight: 1, arbitrary: fc.string({ unit: 'grapheme', maxLength: 40 }) },
);

/** Any JSON value (including deep and wide ones). */
export const anyJson: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 4, arbitrary: fc.jsonValue({ maxDepth: 4 }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 2000 }).map((depth) => nested(depth)) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 20_000 }).map((n) => Array.from({ length: n }, (_, i) => i)) },
);

function nested(depth: number): unknown {
  let value: unknown = 'deep';
  for (let i = 0; i < depth; i++) value = i % 2 === 0 ? { a: value } : [value];
  return value;
}

/** A value of the wrong JSON type for the schema. */
function wrongType(s: Schema): fc.Arbitrary<unknown> {
  const all: Array<[string, fc.Arbitrary<unknown>]> = [
    ['string', hostileString],
    ['integer', fc.constantFrom(...HOSTILE_NUMBERS)],
    ['number', fc.constantFrom(...HOSTILE_NUMBERS)],
    ['boolean', fc.boolean()],
    ['object', fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 1 }), { maxKeys: 3 })],
    ['array', fc.array(fc.jsonValue({ maxDepth: 1 }), { maxLength: 3 })],
    ['null', fc.constant(null)],
  ];
  const types = new Set([s.type, ...(union(s) ?? []).map((b) => b.type)].filter((t): t is string => typeof t === 'string'));
  if (types.has('integer')) types.add('number');
  const others = all.filter(([type]) => !types.has(type)).map(([, arb]) => arb);
  return others.length > 0 ? fc.oneof(...others) : fc.constant(undefined);
}

/** A value that breaks the schema's own constraints (length, pattern, range, enum), or a wrong type. */
function brokenConstraint(s: Schema): fc.Arbitrary<unknown> {
  const options: Array<fc.Arbitrary<unknown>> = [wrongType(s)];
  const branches = union(s);
  if (branches?.length) options.push(fc.constantFrom('not-one-of-them', 'ALL', 'Device', ''));
  if (s.type === 'string') {
    options.push(hostileString);
    if (typeof s.maxLength === 'number') options.push(fc.constant('a'.repeat(s.maxLength + 1)));
    if (typeof s.minLength === 'number' && s.minLength > 0) options.push(fc.constant('a'.repeat(s.minLength - 1)));
    if (s.format === 'date-time') options.push(fc.constantFrom('2024-13-01T00:00:00Z', 'yesterday', '2024-01-01', '9999999-01-01T00:00:00Z'));
  }
  if (s.type === 'integer' || s.type === 'number') {
    options.push(fc.constantFrom(...HOSTILE_NUMBERS));
    if (typeof s.minimum === 'number') options.push(fc.constant(s.minimum - 1));
    if (typeof s.maximum === 'number') options.push(fc.constant(s.maximum + 1), fc.constant(s.maximum * 10));
    if (s.type === 'integer') options.push(fc.double({ noNaN: true, noDefaultInfinity: true }).filter((d) => !Number.isInteger(d)));
  }
  if (s.type === 'array') {
    if (typeof s.maxItems === 'number') options.push(fc.constant(Array.from({ length: s.maxItems + 1 }, (_, i) => `x-${i}`)));
    options.push(fc.constant([]), fc.array(fc.jsonValue({ maxDepth: 2 }), { maxLength: 5 }));
  }
  return fc.oneof(...options);
}

/**
 * A malformed variant of a valid object: one property (possibly nested) broken, a required one
 * missing, an unknown one added, or the whole thing replaced by anything.
 */
export function malformed(schema: Schema | undefined, valid: unknown): fc.Arbitrary<unknown> {
  const s = schema ?? {};
  const properties = (s.properties ?? {}) as Record<string, Schema>;
  const names = Object.keys(properties);
  const base = (valid ?? {}) as Record<string, unknown>;
  const options: Array<fc.Arbitrary<unknown>> = [
    anyJson,
    wrongType(s),
    fc.record({ key: fc.constantFrom('admin', '__proto__', 'constructor', 'extra', 'ID', 'id ', 'x'.repeat(300)), value: fc.jsonValue({ maxDepth: 2 }) }).map(({ key, value }) => ({ ...base, [key]: value })),
  ];
  if (names.length > 0 && typeof base === 'object' && base !== null && !Array.isArray(base)) {
    options.push(
      fc.constantFrom(...names).chain((name) => brokenConstraint(properties[name]!).map((value) => ({ ...base, [name]: value }))),
      fc.constantFrom(...names).chain((name) => {
        const inner = properties[name]!;
        if (inner.type === 'object' || inner.type === 'array') return malformed(inner.type === 'array' ? (inner.items as Schema) : inner, sampleNested(inner)).map((value) => ({ ...base, [name]: inner.type === 'array' ? [value] : value }));
        return brokenConstraint(inner).map((value) => ({ ...base, [name]: value }));
      }),
    );
    const required = ((s.required ?? []) as string[]).filter((r) => r in base);
    if (required.length > 0) options.push(fc.constantFrom(...required).map((drop) => Object.fromEntries(Object.entries(base).filter(([k]) => k !== drop))));
  }
  return fc.oneof(...options);
}

function sampleNested(s: Schema): unknown {
  const items = s.type === 'array' ? ((s.items ?? {}) as Schema) : s;
  if (items.type !== 'object') return {};
  const properties = (items.properties ?? {}) as Record<string, Schema>;
  return Object.fromEntries(((items.required ?? []) as string[]).map((k) => [k, Array.isArray(properties[k]?.examples) ? (properties[k]!.examples as unknown[])[0] : 'x']));
}

/** Path segments a router and a validator must both survive (already percent-encoded where needed). */
export const HOSTILE_SEGMENTS: readonly string[] = [
  '..',
  '.',
  '%2e%2e',
  '%2E%2E%2F%2E%2E',
  '..%2F..%2Fetc%2Fpasswd',
  '..%5C..%5C',
  '%00',
  'a%00b',
  '%C0%AE%C0%AE', // overlong UTF-8 "."
  '%C0%AF', // overlong "/"
  '%E0%80%AE',
  '%FF%FE',
  '%ED%A0%80', // UTF-8 encoded surrogate
  '%E2%80%AE', // RTL override
  'dev%E2%80%AEevil',
  '%D1%80%D0%B0%D1%83', // Cyrillic
  'e%CC%81%CC%81',
  '%EF%BB%BF',
  '%F0%9F%98%80',
  '%zz',
  '%',
  '%25',
  '%2F',
  'a'.repeat(129),
  'a'.repeat(300),
  '0',
  '-1',
  '00000001',
  '2147483648',
  '99999999999999999999',
  '1e3',
  '1.5',
  'NaN',
  'null',
  '__proto__',
  '~',
  ';',
  '*',
];

/** A path segment: hostile, or random text percent-encoded (any code point, lone surrogates included). */
export const pathSegment: fc.Arbitrary<string> = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom(...HOSTILE_SEGMENTS) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', minLength: 1, maxLength: 40 }).map(percentEncodeLoosely) },
  { weight: 1, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 12 }).map((bytes) => [...bytes].map((b) => `%${b.toString(16).padStart(2, '0')}`).join('')) },
);

/** Percent-encode what an HTTP request line cannot carry; lone surrogates as raw invalid bytes. */
function percentEncodeLoosely(text: string): string {
  let out = '';
  for (const ch of text) {
    const code = ch.codePointAt(0)!;
    if (code >= 0xd800 && code <= 0xdfff) out += '%ED%A0%80';
    else if (/[A-Za-z0-9._~-]/.test(ch)) out += ch;
    else out += encodeURIComponent(ch);
  }
  return out;
}

/** Query values, raw (URLSearchParams encodes them). */
export const queryValue: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(...HOSTILE_STRINGS.filter((s) => s.length < 1000)),
  fc.constantFrom(...HOSTILE_NUMBERS.map(String)),
  fc.constantFrom('all', 'ALL', 'true', '[]', '{}', '1,2', ''),
  fc.string({ maxLength: 30 }),
);

/**
 * Valid values of a schema: fixtures (or fresh values) for id-like names, patterns through
 * fast-check's stringMatching, ranges, unions, objects with their required properties and some
 * optional ones, short arrays. Formats other than date-time are not generated.
 */
export function arbitraryValid(schema: unknown, fixtures: Fixtures, name = ''): fc.Arbitrary<unknown> {
  const s = (schema ?? {}) as Schema;
  const known = FIXTURE_NAMES.has(name) ? fixtureFor(name, fixtures) : undefined;
  if ('const' in s) return fc.constant(s.const);
  const branches = union(s);
  if (branches?.length) return fc.oneof(...branches.map((b) => arbitraryValid(b, fixtures, name)));
  switch (s.type) {
    case 'string': {
      let arb: fc.Arbitrary<string>;
      if (s.format === 'date-time') arb = fc.date({ min: new Date('2000-01-01T00:00:00Z'), max: new Date('2100-01-01T00:00:00Z'), noInvalidDate: true }).map((d) => d.toISOString());
      else if (typeof s.pattern === 'string') arb = fc.stringMatching(new RegExp(s.pattern));
      else arb = fc.string({ minLength: typeof s.minLength === 'number' ? s.minLength : 0, maxLength: Math.min(typeof s.maxLength === 'number' ? s.maxLength : 40, 40) });
      const min = typeof s.minLength === 'number' ? s.minLength : 0;
      const max = typeof s.maxLength === 'number' ? s.maxLength : Infinity;
      arb = arb.filter((v) => v.length >= min && v.length <= max);
      return typeof known === 'string' ? fc.oneof({ weight: 3, arbitrary: fc.constant(known) }, { weight: 1, arbitrary: arb }) : arb;
    }
    case 'integer': {
      const min = typeof s.minimum === 'number' ? s.minimum : -1_000_000;
      const max = typeof s.maximum === 'number' ? s.maximum : 1_000_000;
      const arb = fc.oneof(fc.integer({ min, max: Math.min(max, min + 100) }), fc.constantFrom(min, max));
      return typeof known === 'number' ? fc.oneof(fc.constant(known), arb) : arb;
    }
    case 'number':
      return fc.double({ min: typeof s.minimum === 'number' ? s.minimum : -1e6, max: typeof s.maximum === 'number' ? s.maximum : 1e6, noNaN: true, noDefaultInfinity: true });
    case 'boolean':
      return fc.boolean();
    case 'array': {
      const minLength = typeof s.minItems === 'number' ? s.minItems : 0;
      const maxLength = Math.max(minLength, Math.min(typeof s.maxItems === 'number' ? s.maxItems : 5, 5));
      const items = arbitraryValid(s.items, fixtures, name === 'ids' ? 'id' : name);
      return fc.array(items, { minLength, maxLength });
    }
    case 'object': {
      const properties = (s.properties ?? {}) as Record<string, Schema>;
      if (Object.keys(properties).length === 0) return fc.constant({});
      const required = (s.required ?? []) as string[];
      const record = fc.record(Object.fromEntries(Object.entries(properties).map(([key, value]) => [key, arbitraryValid(value, fixtures, key)])), { requiredKeys: required as never[] });
      return typeof s.minProperties === 'number' ? record.filter((r) => Object.keys(r as object).length >= (s.minProperties as number)) : record;
    }
    default:
      return fc.constant(sampleValid(s, fixtures, name));
  }
}
