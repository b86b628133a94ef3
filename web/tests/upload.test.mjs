// Browser end-to-end test of XEP-0363 HTTP File Upload (upload.localhost)
// through Converse.js's own UI, in headless Chromium: alice and bob register
// in two browser contexts and become contacts, alice picks a PNG with the
// chat toolbar's "Choose a file to send" file input, Converse asks natter
// for a slot, PUTs the bytes to natter's /upload/ URL and sends the URL
// (body and XEP-0066 OOB); bob receives it and Converse shows the image
// inline, loaded from natter. Each step leaves a screenshot in
// test-output/browser/upload-*.png.
//
// natter runs with `http.public_url` set to the origin the page is loaded
// from (harness.mjs, startNatter({ publicUrl: true })): with the harness's
// usual port 0, the slot URL would carry port 0.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  startNatter, launchChromium, shot, register, addContact, contact, converseOverrides, solidPng,
} from './harness.mjs';

const STEP = 30000; // ms for any one UI expectation (the machine is slow)
const FILE = 'natter-green.png';

const PNG = solidPng(64, 64, [0x12, 0x8c, 0x7e]); // natter's green

let natter;
let browser;
const people = {};
let uploadUrl;

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
    await shot(p.page, `upload-zz-last-${name}`).catch(() => {});
  }
});

async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await converseOverrides(context);
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  // Every XMPP frame the page sends (to find alice's message stanza).
  const sent = [];
  page.on('websocket', (ws) => {
    const tag = Math.random().toString(36).slice(2, 6);
    ws.on('framesent', (f) => {
      sent.push(String(f.payload));
      if (process.env.WEBTEST_FRAMES) console.log(`[${tag} >>] ${f.payload}`);
    });
    if (process.env.WEBTEST_FRAMES) ws.on('framereceived', (f) => console.log(`[${tag} <<] ${f.payload}`));
  });
  await page.goto(natter.url);
  return { context, page, sent };
}

const online = (page, jid) =>
  page.locator(`#converse-roster li.list-item.current-xmpp-contact[data-status="online"]:has(a[data-jid="${jid}"])`);
const chatbox = (page, jid) => page.locator(`converse-chat[jid="${jid}"]`);

async function openChat(page, jid) {
  await contact(page, jid).locator('a.open-chat').first().click();
  const box = chatbox(page, jid);
  await box.locator('textarea.chat-textarea').waitFor();
  return box;
}

/** Resolves once the <img> at LOCATOR has loaded a picture; its natural size. */
async function loadedImage(locator) {
  await locator.waitFor();
  await locator.evaluate((img) => new Promise((ok, fail) => {
    if (img.complete && img.naturalWidth > 0) return ok();
    img.addEventListener('load', () => ok(), { once: true });
    img.addEventListener('error', () => fail(new Error(`image failed to load: ${img.src}`)), { once: true });
  }));
  return locator.evaluate((img) => ({ width: img.naturalWidth, height: img.naturalHeight, src: img.src }));
}

test('alice and bob register and become contacts', async () => {
  for (const name of ['alice', 'bob']) {
    const { context, page, sent } = await openPage();
    await register(page, name, `${name}-upload-pass`);
    people[name] = { context, page, sent, jid: `${name}@localhost` };
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
  await shot(alice.page, 'upload-01-alice-sees-bob-online');
});

test('alice sends a PNG with the chat toolbar\'s file upload; natter stores it', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob, 'earlier steps failed');
  const a = alice.page;
  const box = await openChat(a, bob.jid);

  // Converse shows the paperclip only once it found upload.localhost
  // (disco#items of localhost, then its disco#info).
  const button = box.locator('converse-chat-toolbar button[title="Choose a file to send"]');
  await button.waitFor();
  await shot(a, 'upload-02-alice-chat-with-upload-button');

  const put = a.waitForResponse((r) => r.request().method() === 'PUT' && r.url().includes('/upload/'), { timeout: STEP });
  // The hidden <input type=file> the paperclip clicks.
  await box.locator('converse-chat-toolbar input.fileupload[type=file]').setInputFiles({
    name: FILE, mimeType: 'image/png', buffer: PNG,
  });
  const response = await put;
  uploadUrl = response.url();
  assert.equal(response.status(), 201, `PUT ${uploadUrl}: ${response.status()}`);
  // The slot URL is on natter's own origin (http.public_url), /upload/<slot>/<name>.
  assert.ok(uploadUrl.startsWith(`${natter.url}upload/`), `${uploadUrl} is not under ${natter.url}upload/`);
  assert.match(new URL(uploadUrl).pathname, new RegExp(`^/upload/[^/]+/${FILE.replace('.', '\\.')}$`));
  const headers = await response.request().allHeaders();
  assert.ok(headers.authorization, 'the PUT carried no Authorization header');
  assert.equal(headers['content-type'], 'image/png');

  // Alice's own message shows the image, from natter.
  const img = box.locator(`.chat-msg img.chat-image[src="${uploadUrl}"]`);
  const size = await loadedImage(img);
  assert.deepEqual([size.width, size.height], [64, 64]);
  await shot(a, 'upload-03-alice-sent-image');

  // The message stanza alice's client sent carries the URL, as body and as OOB.
  const stanza = alice.sent.find((f) => f.startsWith('<message') && f.includes(uploadUrl));
  assert.ok(stanza, 'no message stanza with the upload URL was sent');
  assert.match(stanza, new RegExp(`to="${bob.jid}"`));
  const escaped = uploadUrl.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  assert.match(stanza, new RegExp(`<body>${escaped}</body>`));
  assert.match(stanza, new RegExp(`<x xmlns="jabber:x:oob"><url>${escaped}</url></x>`));

  // natter stored the bytes (content-addressed, under data_dir/blobs).
  const sha = createHash('sha256').update(PNG).digest('hex');
  const blob = join(natter.dataDir, 'blobs', sha.slice(0, 2), sha.slice(2, 4), sha);
  assert.ok(existsSync(blob), `${blob} missing`);
  assert.ok(readFileSync(blob).equals(PNG), 'the stored blob differs from the PNG');
});

test('bob receives the message and Converse shows the image inline', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob && uploadUrl, 'earlier steps failed');
  const box = await openChat(bob.page, alice.jid);
  const msg = box.locator('.chat-msg', { has: bob.page.locator(`img.chat-image[src="${uploadUrl}"]`) });
  await msg.waitFor();
  // From alice.
  assert.match(await msg.getAttribute('data-from'), /^alice@localhost/);
  const size = await loadedImage(msg.locator('img.chat-image'));
  assert.deepEqual([size.width, size.height], [64, 64]);
  await shot(bob.page, 'upload-04-bob-sees-image');
});

test('GET of the upload URL returns exactly the PNG, as image/png', async () => {
  assert.ok(uploadUrl, 'earlier steps failed');
  const res = await fetch(uploadUrl);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'image/png');
  const body = Buffer.from(await res.arrayBuffer());
  assert.equal(body.length, PNG.length);
  assert.ok(body.equals(PNG), 'downloaded bytes differ from the uploaded PNG');
});
