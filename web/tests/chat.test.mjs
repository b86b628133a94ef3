// Browser end-to-end test: natter's chat page (Converse.js) in headless
// Chromium. Two people register in two browser contexts, add each other,
// see each other online, chat, get delivery receipts, and one reloads the
// page with empty browser storage and finds the conversation again (from the
// server's archive, XEP-0313). Each step leaves a screenshot in
// test-output/browser/.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startNatter, launchChromium, shot, register, addContact, contact } from './harness.mjs';

const STEP = 20000; // ms for any one UI expectation

let natter;
let browser;
const people = {};

before(async () => {
  natter = await startNatter();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  if (natter) {
    await natter.stop();
    if (process.env.WEBTEST_VERBOSE) console.log(natter.log());
  }
});

// After each test, the current state of every page (for failures).
afterEach(async () => {
  for (const [name, p] of Object.entries(people)) {
    await shot(p.page, `zz-last-${name}`).catch(() => {});
  }
});

async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  if (process.env.WEBTEST_FRAMES) {
    page.on('websocket', (ws) => {
      const tag = Math.random().toString(36).slice(2, 6);
      ws.on('framesent', (f) => console.log(`[${tag} >>] ${f.payload}`));
      ws.on('framereceived', (f) => console.log(`[${tag} <<] ${f.payload}`));
    });
  }
  await page.goto(natter.url);
  return { context, page };
}

const online = (page, jid) =>
  page.locator(`#converse-roster li.list-item.current-xmpp-contact[data-status="online"]:has(a[data-jid="${jid}"])`);
const chatbox = (page, jid) => page.locator(`converse-chat[jid="${jid}"], #${CSS_escape(jid)}`).first();
function CSS_escape(s) { return s.replace(/[^a-zA-Z0-9_-]/g, (c) => `\\${c}`); }

test('the page is natter, configured for this server', async () => {
  const { context, page } = await openPage();
  await page.locator('converse-login-form, #converse-login-panel').first().waitFor();
  assert.equal(await page.title(), 'natter');
  const html = await (await fetch(natter.url)).text();
  assert.match(html, /"domain":"localhost"/);
  assert.match(html, /"registration":true/);
  await shot(page, '01-login-page');
  await context.close();
});

for (const [name, step] of [['alice', '02'], ['bob', '03']]) {
  test(`${name} registers in her own browser context and is logged in`, async () => {
    const { context, page } = await openPage();
    await register(page, name, `${name}-secret-pass`, {
      beforeSubmit: () => shot(page, `${step}-${name}-registration-form`),
    });
    await shot(page, `${step}-${name}-logged-in`);
    people[name] = { context, page, jid: `${name}@localhost` };
  });
}

test('alice adds bob, bob accepts, both see each other online', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob, 'registration failed');
  const a = alice.page;
  const b = bob.page;
  await addContact(a, bob.jid, 'Bob', { beforeSubmit: () => shot(a, '04-alice-adds-bob') });

  const request = b.locator('li.requesting-xmpp-contact:has(a[data-jid="alice@localhost"])');
  await request.waitFor();
  await shot(b, '05-bob-sees-contact-request');
  await request.locator('button.dropdown-toggle').click();
  await request.locator('a.accept-xmpp-request').click();
  const modal = b.locator('.modal.show');
  await modal.locator('input[name=name]').fill('Alice');
  await modal.getByRole('button', { name: 'Accept' }).click();

  // Mutual subscription: each sees the other as online (presence).
  await online(a, bob.jid).waitFor();
  await online(b, alice.jid).waitFor();
  await shot(a, '06-alice-sees-bob-online');
  await shot(b, '07-bob-sees-alice-online');
});

async function openChat(page, jid) {
  await contact(page, jid).locator('a.open-chat').first().click();
  const box = chatbox(page, jid);
  await box.locator('textarea.chat-textarea').waitFor();
  return box;
}

async function send(page, jid, text) {
  const box = await openChat(page, jid);
  await box.locator('textarea.chat-textarea').fill(text);
  await box.locator('textarea.chat-textarea').press('Enter');
  await box.locator('.chat-msg__text', { hasText: text }).waitFor();
  return box;
}

const MSG1 = 'Hi Bob! natter in the browser works.';
const MSG2 = 'Hello Alice, got it loud and clear.';

test('alice and bob exchange messages and see delivery receipts', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob, 'earlier steps failed');
  const boxA = await send(alice.page, bob.jid, MSG1);
  await shot(alice.page, '08-alice-sends');

  const boxB = await openChat(bob.page, alice.jid);
  await boxB.locator('.chat-msg__text', { hasText: MSG1 }).waitFor();
  await shot(bob.page, '09-bob-receives');

  // XEP-0184: bob's client acknowledged; alice's message gets its check mark.
  await boxA
    .locator('.chat-msg', { hasText: MSG1 })
    .locator('.chat-msg__receipt, converse-icon.fa-check')
    .first()
    .waitFor();
  await shot(alice.page, '10-alice-sees-receipt');

  await send(bob.page, alice.jid, MSG2);
  await boxA.locator('.chat-msg__text', { hasText: MSG2 }).waitFor();
  await shot(alice.page, '11-alice-receives-reply');
});

test('bob reloads with empty browser storage and sees the history from the archive', async () => {
  const { bob, alice } = people;
  assert.ok(alice && bob, 'earlier steps failed');
  const b = bob.page;
  // Forget everything the browser cached (IndexedDB, localStorage, …), so
  // the messages can only come from the server's archive (XEP-0313).
  const origin = new URL(natter.url).origin;
  await b.goto('about:blank');
  const cdp = await bob.context.newCDPSession(b);
  await cdp.send('Storage.clearDataForOrigin', { origin, storageTypes: 'all' });
  await b.goto(natter.url);
  const login = b.locator('#converse-login-panel form, converse-login-form form').first();
  await login.locator('input[name=username], input[name=jid]').first().fill('bob');
  await login.locator('input[name=password]').fill('bob-secret-pass');
  await login.locator('[type=submit]').click();
  await contact(b, alice.jid).waitFor();
  const box = await openChat(b, alice.jid);
  await shot(b, '12-bob-after-reload');
  await box.locator('.chat-msg__text', { hasText: MSG1 }).waitFor();
  await box.locator('.chat-msg__text', { hasText: MSG2 }).waitFor();
  await shot(b, '13-bob-sees-history');
});
