// Browser tests: the chat page belongs to the server it is served from.
// It makes no request to any other host (issue 9: Converse's footer loaded
// sponsor logos from conversejs.org), links nowhere else, carries natter's
// footer, and does not list the user's own account among their contacts.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startNatter, launchChromium, shot, register, addContact, contact } from './harness.mjs';

const STEP = 20000; // ms for any one UI expectation

let natter;
let browser;

before(async () => {
  natter = await startNatter();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await natter?.stop();
});

/** A fresh page that records every URL it requests (HTTP and WebSocket). */
async function recordingPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  const requested = [];
  page.on('request', (r) => requested.push(r.url()));
  page.on('websocket', (ws) => requested.push(ws.url()));
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(natter.url);
  return { context, page, requested };
}

/** The requests that left this server (data: and blob: URLs are not requests). */
function offServer(requested) {
  const host = new URL(natter.url).host;
  return requested.filter((u) => {
    const url = new URL(u);
    if (url.protocol === 'data:' || url.protocol === 'blob:') return false;
    return !(['http:', 'ws:'].includes(url.protocol) && url.host === host);
  });
}

/** Links on the page that point to another site. */
const offSiteLinks = (page) =>
  page.evaluate(() =>
    [...document.querySelectorAll('a[href]')]
      .map((a) => a.href)
      .filter((href) => /^(https?|wss?):/.test(href) && new URL(href).host !== location.host),
  );

// Let late requests (images, fonts, lazy chunks) happen before judging.
async function settle(page) {
  await page.waitForLoadState('networkidle');
  await page.waitForTimeout(500);
}

test('the page makes no request off the server and carries natter\'s footer', async () => {
  const { context, page, requested } = await recordingPage();
  await page.locator('converse-login-form, #converse-login-panel').first().waitFor();
  await page.locator('converse-footer footer').waitFor();
  await settle(page);
  await shot(page, 'self-hosted-01-login-page');
  assert.deepEqual(offServer(requested), [], 'requests that left the server');

  const footer = await page.locator('converse-footer').innerText();
  assert.match(footer, /natter/);
  assert.match(footer, /localhost/);
  assert.doesNotMatch(footer, /sponsor|Opkode|Patreon/i);
  assert.deepEqual(await offSiteLinks(page), [], 'links off the server on the login page');

  // Logged in: roster, profile, avatars, emoji data all come from here too.
  await register(page, 'dana', 'dana-secret-pass');
  await settle(page);
  await shot(page, 'self-hosted-02-logged-in');
  assert.deepEqual(await offSiteLinks(page), [], 'links off the server once logged in');

  assert.ok(requested.some((u) => u.startsWith('ws://')), `no WebSocket among ${requested.join(' ')}`);
  assert.deepEqual(offServer(requested), [], 'requests that left the server');
  await context.close();
});

test('the user\'s own account is not listed among their contacts', async () => {
  const frank = await recordingPage();
  await register(frank.page, 'frank', 'frank-secret-pass');
  const { context, page } = await recordingPage();
  await register(page, 'erin', 'erin-secret-pass');
  // A contact in the roster (pending): the list has rendered once it shows.
  await addContact(page, 'frank@localhost', 'Frank');
  await contact(page, 'frank@localhost').waitFor();
  await settle(page);
  await shot(page, 'self-hosted-03-roster');
  assert.equal(await page.locator('#converse-roster [data-jid="erin@localhost"]').count(), 0, 'erin is listed as her own contact');
  assert.doesNotMatch(await page.locator('#converse-roster').innerText(), /erin@localhost|\(me\)/);
  await context.close();
  await frank.context.close();
});
