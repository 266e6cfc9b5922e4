// The web console in a real browser (Debian's chromium, headless, driven by playwright-core): sign
// in, create a synthetic VM and see it turn running without a reload, its page, delete it; an
// account with compute:read only finds no create or delete buttons and the controller refuses its
// forged request; a VM's hostile script and events show as characters, never as markup. No page
// error and no CSP violation anywhere. Takes the README's screenshots
// (docs/console-*.png) when ORCHARD_SCREENSHOTS is set.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { Browser } from 'playwright-core';
import { ADMIN_TOKEN, inProcessController, waitFor } from './helpers.ts';
import { syntheticWorker } from './security/attack.ts';
import { cuttableRelay, launchChromium, screenshot, signedIn as signedInAs } from './console-page.ts';
import { RESOURCE_TART_VMS } from '../src/api/schemas.ts';

const HOSTILE = '<img src=x onerror=alert(1)>';

describe('web console in chromium', () => {
  let h: Awaited<ReturnType<typeof inProcessController>>;
  let worker: ReturnType<typeof syntheticWorker>;
  let browser: Browser;

  before(async () => {
    h = await inProcessController();
    // VM labels are placement constraints: this worker has the one the test's VM asks for.
    worker = syntheticWorker(h.admin, 'syn-1', { team: 'web' });
    await worker.start();
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
    await worker?.stop();
    await h?.close();
    h?.cleanup();
  });

  const signedIn = (name: string, token: string) => signedInAs(browser, h.ctl.url, name, token);

  test('sign in, create a synthetic VM, see it run without a reload, open it, delete it', async () => {
    const { page, problems } = await signedIn('bootstrap-admin', ADMIN_TOKEN);
    await page.evaluate(() => ((globalThis as unknown as { marker: number }).marker = 42));
    await page.click('text=Create VM');
    await page.fill('form.create input[name=name]', 'web-1');
    await page.fill('form.create input[name=image]', 'synthetic');
    await page.fill('form.create input[name=cpu]', '2');
    await page.fill('form.create input[name=labels]', 'team=web');
    await page.click('form.create button[type=submit]');
    const row = page.locator('[data-vm="web-1"]');
    await row.locator('[data-testid=status]:has-text("running")').waitFor({ timeout: 15_000 });
    assert.equal(await row.locator('span').nth(2).textContent(), 'syn-1');
    assert.match((await row.textContent()) ?? '', /team=web/);
    assert.equal(await page.evaluate(() => (globalThis as unknown as { marker?: number }).marker), 42, 'the page was not reloaded');
    await screenshot(page, 'console-vms.png');

    // Search narrows the list; the count says so.
    await h.admin.createVM({ name: 'other-1', image: 'synthetic' });
    await page.locator('[data-vm="other-1"]').waitFor();
    await page.fill('input[type=search]', 'team=web');
    await page.locator('[data-vm="other-1"]').waitFor({ state: 'detached' });
    assert.match((await page.textContent('[data-testid=vm-count]')) ?? '', /^1 of 2 VMs$/);
    await page.fill('input[type=search]', '');

    await row.locator('a').click();
    await page.locator('section.vm h2:has-text("web-1")').waitFor();
    await page.locator('section.vm [data-testid=status]:has-text("running")').waitFor();
    assert.match((await page.textContent('section.vm')) ?? '', /cpu2/);
    await screenshot(page, 'console-vm.png');
    await page.click('section.vm button.danger');
    await page.locator('[data-vm="web-1"]').waitFor({ state: 'detached', timeout: 15_000 });
    await waitFor('web-1 deleted', async () => !(await h.admin.listVMs()).some((v) => v.name === 'web-1'));
    assert.deepEqual(problems, []);
    await page.context().close();
  });

  test('a compute:read account sees no create or delete button, and its forged create gets 403', async () => {
    await h.admin.createServiceAccount({ name: 'viewer', token: 'viewer-token', roles: ['compute:read'] });
    await h.admin.createVM({ name: 'seen-1', image: 'synthetic' });
    const { page, problems } = await signedIn('viewer', 'viewer-token');
    await page.locator('[data-vm="seen-1"]').waitFor();
    assert.equal(await page.locator('text=Create VM').count(), 0);
    assert.equal(await page.locator('button.danger').count(), 0);
    // What a page could send anyway, with the session's own CSRF token: the controller refuses it.
    const forged = await page.evaluate(async () => {
      const { csrf } = (await (await fetch('/console/session')).json()) as { csrf: string };
      const res = await fetch('/v1/vms', { method: 'POST', headers: { 'content-type': 'application/json', 'x-orchard-csrf': csrf }, body: JSON.stringify({ name: 'forged', image: 'synthetic' }) });
      return { status: res.status, body: await res.text() };
    });
    assert.equal(forged.status, 403, forged.body);
    assert.match(forged.body, /compute:write/);
    assert.equal((await h.admin.listVMs()).some((v) => v.name === 'forged'), false);
    assert.deepEqual(problems, []);
    await page.context().close();
  });

  test('a compute:connect account may open terminals and screens but change nothing', async () => {
    await h.admin.createServiceAccount({ name: 'operator', token: 'operator-token', roles: ['compute:read', 'compute:connect'] });
    await h.admin.createVM({ name: 'ops-1', image: 'synthetic', labels: { team: 'web' } });
    await waitFor('ops-1 running', async () => (await h.admin.getVM('ops-1')).status === 'running', 15_000);
    const { page, problems } = await signedIn('operator', 'operator-token');
    await page.locator('[data-vm="ops-1"]').waitFor();
    assert.equal(await page.locator('text=Create VM').count(), 0);
    await page.locator('[data-vm="ops-1"] a').click();
    await page.locator('section.vm a:has-text("Terminal")').waitFor();
    assert.equal(await page.locator('section.vm a:has-text("Screen")').count(), 1);
    assert.equal(await page.locator('section.vm button.danger').count(), 0);
    const forged = await page.evaluate(async () => {
      const { csrf } = (await (await fetch('/console/session')).json()) as { csrf: string };
      const res = await fetch('/v1/vms/ops-1', { method: 'DELETE', headers: { 'x-orchard-csrf': csrf } });
      return res.status;
    });
    assert.equal(forged, 403);
    assert.equal((await h.admin.getVM('ops-1')).name, 'ops-1');
    assert.deepEqual(problems, []);
    await page.context().close();
  });

  test('hostile script and event text shows as characters, never as markup', async () => {
    await h.admin.createVM({ name: 'hostile-1', image: 'synthetic', startup_script: { script_content: `echo '${HOSTILE}'` } });
    await waitFor('hostile-1 running', async () => (await h.admin.getVM('hostile-1')).status === 'running', 15_000);
    const { page, problems, dialogs } = await signedIn('bootstrap-admin', ADMIN_TOKEN);
    await page.goto(h.ctl.url + '/#/vms/hostile-1');
    await page.locator('section.vm h2:has-text("hostile-1")').waitFor();
    // The worker (this account) reports what the script printed; the page follows it live.
    await h.admin.appendEvents('hostile-1', [{ kind: 'script', timestamp: Math.floor(Date.now() / 1000), payload: `${HOSTILE}\n<script>alert(2)</script>` }]);
    await page.locator('[data-testid=events] pre:has-text("onerror=alert(1)")').waitFor({ timeout: 10_000 });
    assert.equal(await page.locator('[data-testid=events] pre').last().textContent(), `${HOSTILE}\n<script>alert(2)</script>`);
    assert.equal(await page.locator('pre.script').textContent(), `echo '${HOSTILE}'`);
    assert.equal(await page.locator('img').count(), 0, 'no element was made of the text');
    assert.equal(await page.locator('section.vm script').count(), 0);
    assert.deepEqual(dialogs, [], 'no script ran');
    assert.deepEqual(problems, []);
    await page.context().close();
  });

  test("a VM's page follows its events from the controller's watch: no polling, no duplicate after the watch breaks", async () => {
    await h.admin.createVM({ name: 'chatty-1', image: 'synthetic', labels: { team: 'web' } });
    await waitFor('chatty-1 running', async () => (await h.admin.getVM('chatty-1')).status === 'running', 15_000);
    const at = () => Math.floor(Date.now() / 1000);
    await h.admin.appendEvents('chatty-1', [{ kind: 'script', timestamp: at(), payload: 'before the page' }]);
    // Through a relay that can break the connections, as a network does.
    const relay = await cuttableRelay(h.ctl.url);
    const { page, problems } = await signedInAs(browser, relay.url, 'bootstrap-admin', ADMIN_TOKEN);
    try {
      const eventRequests: string[] = [];
      page.on('request', (r) => {
        if (/\/v1\/vms\/chatty-1\/events/.test(r.url())) eventRequests.push(r.url().replace(/^.*\/v1\//, '/v1/'));
      });
      await page.goto(relay.url + '/#/vms/chatty-1');
      await page.locator('[data-testid=events] pre:has-text("before the page")').waitFor();
      await h.admin.appendEvents('chatty-1', [{ kind: 'script', timestamp: at(), payload: 'while watching' }]);
      await page.locator('[data-testid=events] pre:has-text("while watching")').waitFor({ timeout: 10_000 });
      assert.deepEqual(eventRequests, ['/v1/vms/chatty-1/events?watch=true'], 'one watch, no page of events asked for');

      // The connection breaks; the page watches again from the last event it shows.
      const shown = () => page.locator('[data-testid=events] pre').allTextContents();
      const before = await shown();
      assert.ok(relay.cut() > 0);
      await h.admin.appendEvents('chatty-1', [{ kind: 'script', timestamp: at(), payload: 'after the break' }]);
      await page.locator('[data-testid=events] pre:has-text("after the break")').waitFor({ timeout: 15_000 });
      assert.deepEqual(await shown(), [...before, 'after the break'], 'every event once, in order');
      assert.equal(eventRequests.length, 2);
      assert.match(eventRequests[1], /^\/v1\/vms\/chatty-1\/events\?watch=true&cursor=\d+$/);
      assert.deepEqual(problems, []);
    } finally {
      await page.context().close();
      await relay.close();
    }
  });

  test('workers: capacity used and free per resource, labels, pause and resume; a compute:read account cannot pause', async () => {
    const { page, problems } = await signedIn('bootstrap-admin', ADMIN_TOKEN);
    await page.click('nav >> text=Workers');
    const row = page.locator('[data-worker="syn-1"]');
    await row.waitFor();
    const placed = (await h.admin.listVMs()).filter((v) => v.worker === 'syn-1' && v.status !== 'failed').length;
    assert.ok(placed > 0);
    const slots = row.locator(`[data-resource="${RESOURCE_TART_VMS}"]`);
    await slots.locator(`text=${placed} / 10, ${10 - placed} free`).waitFor();
    assert.match((await row.textContent()) ?? '', /team=web/);
    // A VM placed now shows at once.
    await h.admin.createVM({ name: 'one-more', image: 'synthetic' });
    await slots.locator(`text=${placed + 1} / 10, ${10 - placed - 1} free`).waitFor();
    await screenshot(page, 'console-workers.png');
    await row.locator('button:has-text("Pause")').click();
    await row.locator('[data-testid=scheduling]:has-text("paused")').waitFor();
    assert.equal((await h.admin.getWorker('syn-1')).scheduling_paused, true);
    await row.locator('button:has-text("Resume")').click();
    await row.locator('[data-testid=scheduling]:has-text("active")').waitFor();
    assert.equal((await h.admin.getWorker('syn-1')).scheduling_paused, false);
    assert.deepEqual(problems, []);
    await page.context().close();

    const viewer = await signedIn('viewer', 'viewer-token');
    await viewer.page.click('nav >> text=Workers');
    await viewer.page.locator('[data-worker="syn-1"]').waitFor();
    assert.equal(await viewer.page.locator('[data-worker="syn-1"] button').count(), 0);
    assert.deepEqual(viewer.problems, []);
    await viewer.page.context().close();
  });

  test('service accounts and cluster settings: an admin creates, changes and deletes; others see no page and are refused', async () => {
    const { page, problems } = await signedIn('bootstrap-admin', ADMIN_TOKEN);
    await page.click('nav >> text=Accounts & settings');
    await page.locator('[data-account="bootstrap-admin"]').waitFor();
    await page.fill('input[name=account-name]', 'made-here');
    await page.check('form.create-account input[name="compute:connect"]');
    await page.click('form.create-account button[type=submit]');
    const token = (await page.locator('[data-testid=created-token] code').textContent()) ?? '';
    assert.match(token, /^\S{16,}$/);
    assert.deepEqual((await h.admin.getServiceAccount('made-here')).roles.sort(), ['compute:connect', 'compute:read']);
    assert.equal((await h.client('made-here', token).listVMs()).length > 0, true, 'the token shown works');
    const row = page.locator('[data-account="made-here"]');
    await row.locator('input[name="compute:write"]').check();
    await row.locator('button:has-text("Save")').click();
    await row.locator('button:has-text("Save")').waitFor({ state: 'detached' });
    assert.ok((await h.admin.getServiceAccount('made-here')).roles.includes('compute:write'));
    await page.selectOption('select[name=schedulerProfile]', 'distribute-load');
    await page.fill('textarea[name=hostDirPolicies]', '/srv/data ro\n/scratch');
    await page.click('text=Save settings');
    await page.locator('[data-testid=settings-saved]').waitFor();
    assert.deepEqual(await h.admin.getClusterSettings(), { schedulerProfile: 'distribute-load', hostDirPolicies: [{ pathPrefix: '/srv/data', ro: true }, { pathPrefix: '/scratch' }] });
    await screenshot(page, 'console-admin.png');
    await row.locator('button.danger').click();
    await row.waitFor({ state: 'detached' });
    await assert.rejects(h.admin.getServiceAccount('made-here'), /not found/);
    assert.equal(await page.locator('[data-account="bootstrap-admin"] button.danger').count(), 0, 'no deleting oneself');
    assert.deepEqual(problems, []);
    await page.context().close();

    const viewer = await signedIn('viewer', 'viewer-token');
    assert.equal(await viewer.page.locator('nav >> text=Accounts & settings').count(), 0);
    const listed = await viewer.page.evaluate(async () => (await fetch('/v1/service-accounts')).status);
    assert.equal(listed, 403);
    await viewer.page.context().close();
  });

  test('sign-out, and a session ended by the controller, bring the sign-in back without a reload', async () => {
    await h.admin.createServiceAccount({ name: 'leaver', token: 'leaver-token', roles: ['compute:read'] });
    const { page, problems } = await signedIn('leaver', 'leaver-token');
    await h.admin.updateServiceAccount({ name: 'leaver', token: 'leaver-new-token', roles: ['compute:read'] });
    // The controller ends the session's watch; the page's next request learns the session is gone.
    await page.locator('input[name=token]').waitFor({ timeout: 15_000 });
    await page.fill('input[name=name]', 'leaver');
    await page.fill('input[name=token]', 'leaver-new-token');
    await page.click('button[type=submit]');
    await page.locator('[data-testid=vm-count]:not(:has-text("loading"))').waitFor();
    await page.click('button.signout');
    await page.locator('input[name=token]').waitFor();
    assert.equal(await page.evaluate(async () => (await fetch('/console/session')).status), 401);
    await screenshot(page, 'console-sign-in.png');
    assert.deepEqual(problems, []);
    await page.context().close();
  });
});
