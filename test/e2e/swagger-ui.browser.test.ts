/**
 * The admin's browser (issue 8, part 5): real headless Chromium (Debian's `chromium`, driven
 * by playwright-core) opens Swagger UI on a keystrata listening on loopback, authorizes with a
 * bearer token, creates a group and enrols a device through "Try it out", and reads the
 * answers on the page, all under the page's own Content-Security-Policy (`staticCSP`).
 * Screenshots go to test-artifacts/browser/ (git-ignored).
 *
 * Nothing is installed here: .ci/run installs chromium when it is missing. Without
 * /usr/bin/chromium the test is skipped, loudly.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/app.js';

const CHROMIUM = '/usr/bin/chromium';
const SCREENSHOTS = path.resolve(import.meta.dirname, '../../test-artifacts/browser');
const available = fs.existsSync(CHROMIUM);
if (!available) {
  console.warn(
    `\n${'*'.repeat(100)}\n*** swagger-ui.browser.test.ts SKIPPED: ${CHROMIUM} is missing. ` +
      `Install it with \`apt-get install -y chromium\` (.ci/run does this).\n${'*'.repeat(100)}\n`,
  );
}

describe.skipIf(!available)("the admin's browser: Swagger UI in headless Chromium", () => {
  let t: TestApp;
  let base: string;
  let userDataDir: string;
  let context: BrowserContext;
  let page: Page;
  const consoleErrors: string[] = [];
  const cspViolations: string[] = [];
  const offMachine: string[] = [];

  beforeAll(async () => {
    t = await createTestApp();
    await t.app.listen({ port: 0, host: '127.0.0.1' });
    base = `http://127.0.0.1:${(t.app.server.address() as AddressInfo).port}`;
    fs.mkdirSync(SCREENSHOTS, { recursive: true });
    userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'keystrata-chromium-'));
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-quic',
        '--no-first-run',
        '--disable-component-update',
        '--disable-sync',
      ],
      viewport: { width: 1400, height: 1000 },
    });
    // the page may talk to this keystrata only: anything else is refused and recorded
    await context.route('**/*', (route) => {
      const url = new URL(route.request().url());
      if (url.origin === base || url.protocol === 'data:') return route.continue();
      offMachine.push(route.request().url());
      return route.abort();
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.on('console', (message) => {
      if (message.type() === 'error') consoleErrors.push(message.text());
    });
    page.on('pageerror', (error) => consoleErrors.push(error.message));
    await page.exposeFunction('reportCspViolation', (text: string) => cspViolations.push(text));
    // runs in the page (a string: the test's TypeScript has no DOM types)
    await page.addInitScript({
      content: `document.addEventListener('securitypolicyviolation', (e) =>
        window.reportCspViolation(e.violatedDirective + ' ' + e.blockedURI + ' ' + e.sourceFile + ':' + e.lineNumber + ':' + e.columnNumber));`,
    });
  }, 120_000);

  afterAll(async () => {
    await context?.close();
    if (userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
    await t?.close();
  });

  /** The visible page, or just one operation block (request and the answer read from it). */
  const shot = (name: string, element?: ReturnType<Page['locator']>) =>
    (element ?? page).screenshot({ path: path.join(SCREENSHOTS, `${name}.png`) });

  /** Expand an operation, press "Try it out", fill it, execute, and return the status and body shown on the page. */
  async function tryItOut(operationId: string, tag: string, fill: { params?: Record<string, string>; body?: unknown; headers?: Record<string, string> }) {
    const block = page.locator(`#operations-${tag.replace(/ /g, '_')}-${operationId}`);
    await block.scrollIntoViewIfNeeded();
    if (!(await block.locator('.opblock-body').isVisible())) await block.locator('.opblock-summary').first().click();
    const tryOut = block.locator('button.try-out__btn', { hasText: 'Try it out' });
    if ((await tryOut.count()) > 0) await tryOut.click();
    // an answer from an earlier run is cleared first, so the one read below is this run's
    const clear = block.locator('button.btn-clear');
    if ((await clear.count()) > 0) {
      await clear.click();
      await block.locator('.live-responses-table').waitFor({ state: 'detached' });
    }
    for (const [name, value] of Object.entries({ ...fill.params, ...fill.headers })) {
      await block.locator(`tr[data-param-name="${name}"] input`).fill(value);
    }
    if (fill.body !== undefined) await block.locator('textarea.body-param__text').fill(JSON.stringify(fill.body, null, 2));
    await block.locator('button.execute').click();
    const live = block.locator('.live-responses-table .response').first();
    await live.waitFor({ state: 'visible', timeout: 15_000 });
    const status = Number((await live.locator('.response-col_status').textContent())?.trim());
    const text = (await live.locator('.response-col_description pre.microlight').first().textContent()) ?? '';
    const headers = (await live.locator('.response-col_description .microlight').last().textContent()) ?? '';
    return { status, body: JSON.parse(text) as Record<string, unknown>, headers, block, answer: block.locator('.responses-inner > div').first() };
  }

  it('when an admin authorizes with a bearer token, creates a group and enrols a device through "Try it out", then the page shows the answers', async () => {
    const response = await page.goto(`${base}/docs`, { waitUntil: 'networkidle' });
    expect(response?.ok()).toBe(true);
    await page.locator('.swagger-ui .info .title').waitFor({ timeout: 15_000 });
    expect(await page.locator('.swagger-ui .info .title').textContent()).toContain('keystrata');
    await shot('01-docs');

    // Authorize: the bearer scheme's dialog
    await page.locator('.scheme-container button.authorize').click();
    const dialog = page.locator('.modal-ux');
    await dialog.locator('input[type="text"], input[type="password"]').first().fill(await t.token('keystrata:admin', { sub: 'admin-in-browser' }));
    await dialog.locator('button.auth.authorize', { hasText: 'Authorize' }).click();
    await dialog.locator('button', { hasText: 'Logout' }).waitFor({ timeout: 10_000 });
    await shot('02-authorized');
    await dialog.locator('button.btn-done', { hasText: 'Close' }).click();

    const created = await tryItOut('createGroup', 'groups', {
      body: { id: 'browser-group', deviceType: 'infusion-pump', region: 'eu-west' },
      headers: { 'idempotency-key': 'browser-create-1' },
    });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ id: 'browser-group', deviceType: 'infusion-pump', region: 'eu-west' });
    expect((created.body.versions as Array<{ state: string }>)[0]?.state).toBe('primary');
    await shot('03-group-created', created.answer);

    const enrolled = await tryItOut('enrolDevice', 'devices', { params: { groupId: 'browser-group' }, body: { id: 'browser-device-1' } });
    expect(enrolled.status).toBe(201);
    expect(enrolled.body).toMatchObject({ id: 'browser-device-1', groupId: 'browser-group' });
    await shot('04-device-enrolled', enrolled.answer);

    // the same create, same Idempotency-Key, executed again: the first answer, replayed
    const replayed = await tryItOut('createGroup', 'groups', {
      body: { id: 'browser-group', deviceType: 'infusion-pump', region: 'eu-west' },
      headers: { 'idempotency-key': 'browser-create-1' },
    });
    expect(replayed.status).toBe(201);
    expect(replayed.headers).toMatch(/idempotent-replayed: true/i);
    await shot('05-create-replayed', replayed.answer);

    // what the page showed is what was stored
    const admin = await t.token('keystrata:admin');
    const device = await t.app.inject({ method: 'GET', url: '/v1/devices/browser-device-1', headers: { authorization: `Bearer ${admin}` } });
    expect(device.statusCode).toBe(200);
    expect(device.json()).toMatchObject({ groupId: 'browser-group' });
    const audit = await t.audit.queryEvents({ actor: 'admin-in-browser' }, undefined, 100);
    expect(audit.items.map((e) => e.action)).toEqual(expect.arrayContaining(['group.create', 'device.enrol']));
    expect(audit.items.filter((e) => e.action === 'group.create')).toHaveLength(1);

    // the page worked under its Content-Security-Policy, and talked to nobody else
    const docsPage = await t.app.inject({ method: 'GET', url: '/docs/static/index.html' });
    expect(docsPage.headers['content-security-policy']).toMatch(/script-src/);
    // The one thing the policy blocks is the inline <style> inside Swagger UI's own SVG logo
    // (its two fill colours): no script, no request, nothing the page needs.
    expect(cspViolations.filter((v) => !v.startsWith('style-src-elem inline '))).toEqual([]);
    expect(cspViolations.length).toBeLessThanOrEqual(1);
    expect(consoleErrors.filter((e) => /Content Security Policy|Refused to/i.test(e) && !/inline style/i.test(e))).toEqual([]);
    expect(offMachine).toEqual([]);
    for (const name of ['01-docs', '02-authorized', '03-group-created', '04-device-enrolled', '05-create-replayed']) {
      expect(fs.statSync(path.join(SCREENSHOTS, `${name}.png`)).size).toBeGreaterThan(1000);
    }
  }, 120_000);
});
