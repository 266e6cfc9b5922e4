// The web console's browser tests' helpers: Debian's chromium driven by playwright-core, a page
// signed in as an account, and the problems a page had (page errors, console errors such as CSP
// violations, 5xx answers).
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { ROOT } from './helpers.ts';

const CHROMIUM = ['/usr/lib/chromium/chromium', '/usr/bin/chromium'].find((p) => existsSync(p));

export async function launchChromium(): Promise<Browser> {
  assert.ok(CHROMIUM, 'chromium is installed (scripts/setup.sh --test)');
  // As root chromium needs --no-sandbox.
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
}

/** A fresh browser context on the console at `url`, signed in as `name`. */
export async function signedIn(browser: Browser, url: string, name: string, token: string, viewport = { width: 1280, height: 720 }): Promise<{ page: Page; problems: string[]; dialogs: string[] }> {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport });
  const page = await context.newPage();
  const problems: string[] = [];
  const dialogs: string[] = [];
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  // Refused requests show as console errors too (the 401 before sign-in, a test's forged 403): those
  // are counted by status instead, where only a 5xx is a problem.
  page.on('console', (msg) => void (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource') && problems.push(`console error: ${msg.text()}`)));
  page.on('response', (res) => void (res.status() >= 500 && problems.push(`${res.status()} for ${res.url()}`)));
  page.on('dialog', (d) => {
    dialogs.push(d.message());
    void (d.type() === 'confirm' ? d.accept() : d.dismiss());
  });
  await page.goto(url + '/');
  await page.fill('input[name=name]', name);
  await page.fill('input[name=token]', token);
  await page.click('button[type=submit]');
  await page.waitForSelector('[data-testid=vm-count]:not(:has-text("loading"))');
  return { page, problems, dialogs };
}

/**
 * The README's screenshot docs/NAME of the page, refreshed when ORCHARD_SCREENSHOTS is set (each run
 * would otherwise change the checkout: ages and tokens differ every time).
 */
export async function screenshot(page: Page, name: string) {
  if (process.env.ORCHARD_SCREENSHOTS) await page.screenshot({ path: join(ROOT, 'docs', name) });
}

/**
 * A TCP relay to the controller at `url` (TLS passes through): the browser uses `proxy.url`, and
 * `cut()` breaks every connection through it, as a network that drops does. New connections work.
 */
export async function cuttableRelay(url: string): Promise<{ url: string; cut: () => number; close: () => Promise<void> }> {
  const target = new URL(url);
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(Number(target.port), target.hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
      sockets.add(a);
      a.on('close', () => (sockets.delete(a), b.destroy()));
      a.on('error', () => b.destroy());
      a.pipe(b);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return {
    url: `${target.protocol}//127.0.0.1:${port}`,
    cut: () => {
      const n = sockets.size;
      for (const s of sockets) s.destroy();
      return n;
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
