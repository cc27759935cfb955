/** What the route fuzzer (routes.fuzz.test.ts) found, pinned as plain examples. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/app.js';
import { expectProblem } from '../support/flow.js';

describe('fuzz findings', () => {
  let t: TestApp;
  let admin: string;
  beforeAll(async () => {
    t = await createTestApp({ env: { RATE_LIMIT_ENABLED: 'false' } });
    admin = await t.token('keystrata:admin');
  });
  afterAll(async () => t?.close());

  const get = async (url: string) => {
    const response = await t.app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${admin}` } });
    return { status: response.statusCode, headers: response.headers, body: JSON.parse(response.body) as Record<string, unknown>, raw: response.body };
  };

  it.each([
    ['/v1/groups/%80', 400],
    ['/v1/devices/%C0%AE%C0%AE/keys', 400],
    ['/v1/devices/%FF%FE/distribution', 400],
    ['/v1/rollouts/%zz', 400],
    ['/v1/devices/%/keys', 400],
    [`/v1/groups/${'a'.repeat(300)}/policy`, 414],
  ])('when the URL is %s (not UTF-8, malformed, or a parameter over 200 characters), then %i problem+json with the request id, like every refusal', async (url, status) => {
    const answer = await get(url);
    expectProblem(answer, status);
    expect(answer.headers['x-request-id']).toEqual(expect.any(String));
    expect(answer.body.detail).not.toContain('aaaaaaaaaa'); // the path is not echoed in the message
  });

  it.each([['actor=a%00b'], ['action=%00'], ['keyId=device%3Ax%00'], ['keyIdPrefix=field%3A%00']])(
    'when an audit query filter holds a NUL character (%s), then 400 problem+json, not a 500 from PostgreSQL',
    async (query) => {
      expectProblem(await get(`/v1/audit/events?${query}`), 400, 'unsupported_character');
    },
  );
});
