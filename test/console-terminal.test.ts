// The web console's terminal on a real QEMU VM (debian-dev), in Debian's chromium: xterm.js over the
// exec WebSocket with a PTY; `uname -a` answers; resizing the page resizes the PTY (stty size); a
// connection that breaks while a command still prints is made again and the missed output is
// replayed, once. The screen: noVNC over the port-forward to the VM's VNC server draws its console,
// and draws it again after the network drops its WebSocket.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { Browser, Page } from 'playwright-core';
import { ADMIN_TOKEN, heavyFile, qemuCluster } from './helpers.ts';
import { cuttableRelay, launchChromium, screenshot, signedIn } from './console-page.ts';

await heavyFile(); // boots VMs

/** What the page functions below use of the browser's globals (this file is type-checked without the DOM's types). */
interface Browserish {
  document: { querySelector(selector: string): { innerText: string } | null };
}

let c: Awaited<ReturnType<typeof qemuCluster>>;
let browser: Browser;

before(async () => {
  c = await qemuCluster();
  browser = await launchChromium();
});
after(async () => {
  await browser?.close();
  await c?.close();
});

const screen = (page: Page) => page.locator('[data-testid=terminal] .xterm-rows').innerText();
const waitForScreen = (page: Page, re: RegExp, timeout = 30_000) =>
  page.waitForFunction(([src, flags]) => new RegExp(src, flags).test((globalThis as unknown as Browserish).document.querySelector('[data-testid=terminal] .xterm-rows')?.innerText ?? ''), [re.source, re.flags], { timeout });

test('a terminal in the browser: uname -a, resize, and reconnection with replay', { timeout: 300_000 }, async () => {
  await c.runningVM('term-1');
  const { page, problems } = await signedIn(browser, c.ctl.url, 'bootstrap-admin', ADMIN_TOKEN);
  // The test's handle on the page's WebSockets, to break one (the page itself keeps none in reach).
  await page.addInitScript(() => {
    const g = globalThis as unknown as { WebSocket: new (url: string) => object; testSockets: object[] };
    const Original = g.WebSocket;
    g.testSockets = [];
    g.WebSocket = class extends Original {
      constructor(url: string) {
        super(url);
        g.testSockets.push(this);
      }
    };
  });
  await page.goto(c.ctl.url + '/#/vms/term-1');
  await page.reload();
  await page.click('a:has-text("Terminal")');
  await page.locator('[data-testid=terminal-state]:has-text("connected")').waitFor({ timeout: 60_000 });
  await page.click('[data-testid=terminal]');
  await page.keyboard.type('uname -a\n');
  await waitForScreen(page, /Linux \S+ \d\S* .*GNU\/Linux/);
  await screenshot(page, 'console-terminal.png');

  // The PTY follows the page's size.
  await page.keyboard.type('clear; stty size\n');
  const size = async () => {
    await waitForScreen(page, /^\s*\d+ \d+\s*$/m);
    return (await screen(page)).match(/^\s*(\d+) (\d+)\s*$/m)!.slice(1).map(Number);
  };
  const [rows, cols] = await size();
  await page.setViewportSize({ width: 800, height: 500 });
  await page.keyboard.type('clear; stty size\n');
  await page.waitForFunction(([r, k]) => {
    const m = /^\s*(\d+) (\d+)\s*$/m.exec((globalThis as unknown as Browserish).document.querySelector('[data-testid=terminal] .xterm-rows')?.innerText ?? '');
    return m !== null && (Number(m[1]) !== r || Number(m[2]) !== k);
  }, [rows, cols]);
  const [rows2, cols2] = await size();
  assert.ok(rows2 < rows && cols2 < cols, `${rows}x${cols} → ${rows2}x${cols2}`);

  // A break while a command prints: what it printed meanwhile is replayed, once and in order.
  await page.keyboard.type('clear; for i in $(seq 1 30); do printf "n$i "; sleep 0.1; done; echo; echo done-$((6*7))\n');
  await waitForScreen(page, /n5 /);
  await page.evaluate(() => (globalThis as unknown as { testSockets: { close(code: number): void }[] }).testSockets.at(-1)!.close(4000));
  await page.locator('[data-testid=terminal-state]:has-text("reconnecting")').waitFor({ timeout: 30_000 });
  await page.locator('[data-testid=terminal-state]:text-is("connected")').waitFor({ timeout: 30_000 });
  await waitForScreen(page, /^done-42/m);
  const printed = (await screen(page)).replace(/\n/g, '').match(/(n\d+ )+/)?.[0].trim();
  assert.equal(printed, Array.from({ length: 30 }, (_, i) => `n${i + 1}`).join(' '));
  assert.deepEqual(problems, []);
  await page.context().close();
});

test("a VM's screen in the browser: noVNC over the port-forward shows the guest's console, and again after its connection breaks", { timeout: 300_000 }, async () => {
  await c.runningVM('screen-1');
  // Through a relay that can break every connection, as a network does.
  const relay = await cuttableRelay(c.ctl.url);
  const { page, problems } = await signedIn(browser, relay.url, 'bootstrap-admin', ADMIN_TOKEN);
  try {
    await page.goto(relay.url + '/#/vms/screen-1');
    await page.click('a:has-text("Screen")');
    const state = page.locator('[data-testid=screen-state]');
    await page.locator('[data-testid=screen-state]:text-is("connected")').waitFor({ timeout: 60_000 });
    // Not blank: the guest's text console draws more than one colour.
    const drawn = () =>
      page.waitForFunction(() => {
        const canvas = (globalThis as unknown as { document: { querySelector(s: string): CanvasLike | null } }).document.querySelector('[data-testid=screen] canvas');
        if (!canvas || canvas.width < 100 || canvas.height < 100) return false;
        const data = canvas.getContext('2d')!.getImageData(0, 0, canvas.width, canvas.height).data;
        const colours = new Set<number>();
        for (let i = 0; i < data.length && colours.size < 2; i += 4) colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        return colours.size >= 2;
      }, undefined, { timeout: 60_000 });
    await drawn();
    await screenshot(page, 'console-screen.png');

    // The network drops the WebSocket: the page says so, connects again by itself and draws the console.
    // (It waits a second before connecting again, so the state is there to be seen.)
    assert.ok(relay.cut() > 0);
    await page.locator('[data-testid=screen-state]:has-text("reconnecting")').waitFor({ timeout: 30_000 });
    // (noVNC counts a connection closed under it as a clean end, so the page says no more than this.)
    assert.match((await state.textContent()) ?? '', /^disconnected( \(connection lost\))?; reconnecting…$/);
    await page.locator('[data-testid=screen-state]:text-is("connected")').waitFor({ timeout: 60_000 });
    await drawn();
    assert.equal(await state.textContent(), 'connected');
    assert.equal(await page.locator('[data-testid=screen] canvas').count(), 1, 'one screen drawn, not one per connection');
    assert.deepEqual(problems, []);
  } finally {
    await page.context().close();
    await relay.close();
  }
});

/** The canvas calls the screen test makes in the page. */
interface CanvasLike {
  width: number;
  height: number;
  getContext(kind: '2d'): { getImageData(x: number, y: number, w: number, h: number): { data: Uint8ClampedArray } } | null;
}
