// Browser end-to-end test of stories (web/stories.js, natter's Converse.js
// plugin) in headless Chromium: alice and bob register and become
// contacts; alice posts a text story and an image story (the PNG goes
// through natter's XEP-0363 upload); bob sees alice's stories in the
// panel, opens them (text, then the image loaded from natter), which sends
// alice a seen receipt; alice opens her own story and reads "Seen by bob".
// Screenshots: test-output/browser/stories-*.png.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNatter, launchChromium, shot, register, addContact, converseOverrides, solidPng,
} from './harness.mjs';

const STEP = 30000;

const PNG = solidPng(48, 48, [0x25, 0xd3, 0x66]);

let natter;
let browser;
const people = {};

before(async () => {
  natter = await startNatter({ publicUrl: true });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  if (natter) {
    await natter.stop();
    if (process.env.WEBTEST_VERBOSE) console.log(natter.log());
  }
});

afterEach(async () => {
  for (const [name, p] of Object.entries(people)) {
    await shot(p.page, `stories-zz-last-${name}`).catch(() => {});
  }
});

async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await converseOverrides(context);
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(natter.url);
  return { context, page };
}

const online = (page, jid) =>
  page.locator(`#converse-roster li.list-item.current-xmpp-contact[data-status="online"]:has(a[data-jid="${jid}"])`);
const ring = (page, jid) => page.locator(`.natter-stories .natter-story-ring[data-jid="${jid}"]`);

test('alice and bob register and become contacts', async () => {
  for (const name of ['alice', 'bob']) {
    const { context, page } = await openPage();
    await register(page, name, `${name}-stories-pass`);
    people[name] = { context, page, jid: `${name}@localhost` };
  }
  const { alice, bob } = people;
  await addContact(alice.page, bob.jid, 'Bob');
  const request = bob.page.locator(`li.requesting-xmpp-contact:has(a[data-jid="${alice.jid}"])`);
  await request.waitFor();
  await request.locator('button.dropdown-toggle').click();
  await request.locator('a.accept-xmpp-request').click();
  const modal = bob.page.locator('.modal.show');
  await modal.locator('input[name=name]').fill('Alice');
  await modal.getByRole('button', { name: 'Accept' }).click();
  await online(alice.page, bob.jid).waitFor();
  await online(bob.page, alice.jid).waitFor();
  // The stories panel is on both pages, empty so far.
  await alice.page.locator('.natter-stories .natter-story-empty').waitFor();
  await shot(alice.page, 'stories-01-panel');
});

test('alice posts a text story and an image story', async () => {
  const { alice } = people;
  assert.ok(alice, 'earlier steps failed');
  const a = alice.page;
  await a.locator('.natter-stories .natter-story-new').click();
  await a.locator('.natter-stories textarea[name=story-text]').fill('Hello from natter');
  await shot(a, 'stories-02-compose-text');
  await a.locator('.natter-stories form button[type=submit]').click();
  await ring(a, alice.jid).filter({ hasText: '1' }).waitFor();

  await a.locator('.natter-stories .natter-story-new').click();
  await a.locator('.natter-stories textarea[name=story-text]').fill('Green');
  const put = a.waitForResponse((r) => r.request().method() === 'PUT' && r.url().includes('/upload/'));
  await a.locator('.natter-stories input[name=story-image]').setInputFiles({
    name: 'green.png', mimeType: 'image/png', buffer: PNG,
  });
  await a.locator('.natter-stories form button[type=submit]').click();
  const response = await put;
  assert.equal(response.status(), 201);
  alice.imageUrl = response.url();
  await ring(a, alice.jid).filter({ hasText: '2' }).waitFor();
  await shot(a, 'stories-03-alice-posted');
});

test('bob sees alice\'s stories, text and image, and alice sees that he did', async () => {
  const { alice, bob } = people;
  assert.ok(alice?.imageUrl, 'earlier steps failed');
  const b = bob.page;
  // Live (PEP notification) or on the next refresh.
  const r = ring(b, alice.jid);
  await r.waitFor({ timeout: 5000 }).catch(() => b.evaluate(() => window.natterStories.refresh()));
  await r.filter({ hasText: '2' }).waitFor();
  await shot(b, 'stories-04-bob-sees-alices-ring');
  await r.click();
  const viewer = b.locator('.natter-story-viewer');
  await viewer.locator('.natter-story-text', { hasText: 'Hello from natter' }).waitFor();
  await shot(b, 'stories-05-bob-views-text');
  await viewer.locator('.natter-story-next').click();
  const img = viewer.locator(`img.natter-story-image[src="${alice.imageUrl}"]`);
  await img.waitFor();
  const size = await img.evaluate((i) => new Promise((ok, fail) => {
    const done = () => ok([i.naturalWidth, i.naturalHeight]);
    if (i.complete && i.naturalWidth) done();
    else { i.onload = done; i.onerror = () => fail(new Error(`image failed: ${i.src}`)); }
  }));
  assert.deepEqual(size, [48, 48]);
  await viewer.locator('.natter-story-text', { hasText: 'Green' }).waitFor();
  await shot(b, 'stories-06-bob-views-image');
  await viewer.locator('.natter-story-close').click();

  // Alice opens her own first story: bob is listed as having seen it.
  const a = alice.page;
  await ring(a, alice.jid).click();
  await a.locator('.natter-story-viewer .natter-story-seen', { hasText: `Seen by ${bob.jid}` }).waitFor();
  await shot(a, 'stories-07-alice-sees-who-saw');
});
