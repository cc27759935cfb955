/**
 * Regression: GET /metrics answered 503 while PostgreSQL was away (the audit chain length gauge
 * reads the database, and its failure failed the whole scrape), so every metric, the KEK circuit
 * state and the 503 counts included, vanished exactly when an operator needed them; under a
 * partition the scrape would have waited for the query deadline.
 */
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createFaultFleet, startTcpProxy, type FaultFleet, type TcpProxy } from './support.js';

const setup = inject('testDb');

describe.skipIf(setup.mode !== 'postgres')('metrics while PostgreSQL is away', () => {
  let proxy: TcpProxy;
  let f: FaultFleet;
  beforeAll(async () => {
    const admin = new URL(setup.mode === 'postgres' ? setup.adminUrl : 'postgres://127.0.0.1:5432');
    proxy = await startTcpProxy({ host: admin.hostname, port: Number(admin.port || 5432) });
    f = await createFaultFleet({ databaseUrl: (url) => proxy.urlFor(url), env: { DATABASE_QUERY_TIMEOUT_MS: '5000' } });
  });
  afterAll(async () => {
    proxy?.restore();
    await f?.close();
    await proxy?.close();
  });

  const text = async () => {
    const response = await f.t.app.inject({ method: 'GET', url: '/metrics' });
    return { status: response.statusCode, body: response.body };
  };

  it('when the database is cut or partitioned, then /metrics still answers 200 at once, with the last audit chain length and the 503s counted', async () => {
    const before = await text();
    expect(before.status).toBe(200);
    const length = /^keystrata_audit_chain_length (\d+)$/m.exec(before.body)?.[1];
    expect(length).toBeDefined();

    proxy.cut();
    expect((await f.t.app.inject({ method: 'GET', url: '/v1/groups', headers: { authorization: `Bearer ${f.admin}` } })).statusCode).toBe(503);
    const during = await text();
    expect(during.status).toBe(200);
    expect(during.body).toMatch(new RegExp(`^keystrata_audit_chain_length ${length}$`, 'm'));
    expect(during.body).toMatch(/^keystrata_http_requests_total\{method="GET",route="\/v1\/groups",status="503"\} 1$/m);

    proxy.restore();
    await f.t.app.inject({ method: 'GET', url: '/v1/groups', headers: { authorization: `Bearer ${f.admin}` } }); // reconnect
    proxy.blackhole();
    const started = performance.now();
    const partitioned = await text();
    expect(partitioned.status).toBe(200);
    expect(performance.now() - started).toBeLessThan(2000);
  });
});
