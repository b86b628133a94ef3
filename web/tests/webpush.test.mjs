// Browser end-to-end test of Web Push (web/webpush.js and web/sw.js) in
// headless Chromium: alice turns notifications on in the page, closes the
// tab, bob sends her a message, and the push natter sends reaches a
// stand-in push service (an HTTP server in this test) that checks the
// VAPID token and decrypts the RFC 8291 payload with Node's own crypto.
//
// What is real and what is stood in: the page, its plugin, the
// notification permission prompt's outcome (granted by the test), the
// service worker's registration, the XMPP registration of the
// subscription, natter's push, VAPID and encryption are real. Chromium's
// PushManager.subscribe needs Google's push service (FCM), unreachable
// here: the test replaces PushManager.prototype.subscribe/getSubscription
// in the page with a subscription whose endpoint is the stand-in and whose
// keys the test holds. The decrypted payload is then handed to the real
// service worker through Chromium's DevTools protocol
// (ServiceWorker.deliverPushMessage), the way a push service's delivery
// would reach it, and the notification it shows is read back.
// Screenshots: test-output/browser/webpush-*.png.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import crypto from 'node:crypto';
import { startNatter, launchChromium, shot, register, converseOverrides } from './harness.mjs';

const STEP = 30000;
const b64url = (buf) => Buffer.from(buf).toString('base64url');

let natter;
let browser;
let standin;
const pushes = [];
let pushArrived = () => {};

// The browser's side of the subscription: its P-256 key pair and auth secret.
const ua = crypto.createECDH('prime256v1');
ua.generateKeys();
const uaAuth = crypto.randomBytes(16);

before(async () => {
  natter = await startNatter({
    env: { NATTER_PUSH_WEBPUSH_ALLOW_HTTP: 'true', NATTER_PUSH_COALESCE_MS: '300' },
  });
  standin = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      pushes.push({ url: req.url, headers: req.headers, body: Buffer.concat(chunks) });
      pushArrived();
      res.writeHead(201).end();
    });
  });
  await new Promise((ok) => standin.listen(0, '127.0.0.1', ok));
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  standin?.close();
  if (natter) {
    await natter.stop();
    if (process.env.WEBTEST_VERBOSE) console.log(natter.log());
  }
});

const standinBase = () => `http://127.0.0.1:${standin.address().port}`;

function nextPush(timeout = 15000) {
  if (pushes.length) return Promise.resolve(pushes.shift());
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('no push reached the stand-in')), timeout);
    pushArrived = () => { clearTimeout(timer); ok(pushes.shift()); };
  });
}

/** RFC 8292: the token is ES256-signed by KEY for the stand-in's origin. */
function checkVapid(headers, serverKey) {
  const m = /^vapid t=([^,]+), k=(.+)$/.exec(headers.authorization || '');
  assert.ok(m, `VAPID authorization: ${headers.authorization}`);
  const [, token, k] = m;
  assert.equal(k, serverKey);
  const [h, c, s] = token.split('.');
  const point = Buffer.from(k, 'base64url');
  const key = crypto.createPublicKey({
    key: { kty: 'EC', crv: 'P-256', x: b64url(point.subarray(1, 33)), y: b64url(point.subarray(33)) },
    format: 'jwk',
  });
  const ok = crypto.verify('sha256', Buffer.from(`${h}.${c}`), { key, dsaEncoding: 'ieee-p1363' },
    Buffer.from(s, 'base64url'));
  assert.ok(ok, 'the VAPID token verifies');
  const claims = JSON.parse(Buffer.from(c, 'base64url'));
  assert.equal(claims.aud, standinBase());
  assert.ok(claims.exp > Date.now() / 1000);
}

/** RFC 8291 §3.4 / RFC 8188: decrypt one aes128gcm record. */
function decrypt(body) {
  const salt = body.subarray(0, 16);
  const idlen = body[20];
  const asPublic = body.subarray(21, 21 + idlen);
  const record = body.subarray(21 + idlen);
  const ecdhSecret = ua.computeSecret(asPublic);
  const keyInfo = Buffer.concat([Buffer.from('WebPush: info\0'), ua.getPublicKey(), asPublic]);
  const ikm = Buffer.from(crypto.hkdfSync('sha256', ecdhSecret, uaAuth, keyInfo, 32));
  const cek = Buffer.from(crypto.hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: aes128gcm\0'), 16));
  const nonce = Buffer.from(crypto.hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: nonce\0'), 12));
  const decipher = crypto.createDecipheriv('aes-128-gcm', cek, nonce);
  decipher.setAuthTag(record.subarray(record.length - 16));
  let plain = Buffer.concat([decipher.update(record.subarray(0, record.length - 16)), decipher.final()]);
  let end = plain.length;
  while (end > 0 && plain[end - 1] === 0) end--;
  assert.equal(plain[end - 1], 2, 'last-record delimiter');
  plain = plain.subarray(0, end - 1);
  return JSON.parse(plain.toString('utf8'));
}

async function openContext(standinSub) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await converseOverrides(context);
  if (standinSub) {
    await context.grantPermissions(['notifications'], { origin: natter.url.replace(/\/$/, '') });
    // The stand-in subscription (see the top of this file): what
    // PushManager.subscribe would give with a real push service.
    await context.addInitScript((s) => {
      if (typeof PushManager === 'undefined') return;
      const bytes = (t) => Uint8Array.from(atob(t.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0)).buffer;
      const sub = {
        endpoint: s.endpoint,
        expirationTime: null,
        getKey: (name) => bytes(name === 'p256dh' ? s.p256dh : s.auth),
        toJSON: () => ({ endpoint: s.endpoint, expirationTime: null, keys: { p256dh: s.p256dh, auth: s.auth } }),
        unsubscribe: async () => { localStorage.removeItem('standin-subscribed'); return true; },
      };
      PushManager.prototype.subscribe = async function (options) {
        const key = new Uint8Array(options.applicationServerKey);
        localStorage.setItem('standin-subscribed', btoa(String.fromCharCode(...key))
          .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, ''));
        return sub;
      };
      PushManager.prototype.getSubscription = async function () {
        return localStorage.getItem('standin-subscribed') ? sub : null;
      };
    }, standinSub);
  }
  const page = await context.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(natter.url);
  return { context, page };
}

test('a closed tab is notified: the stand-in push service decrypts the push', async () => {
  const vapid = await (await fetch(`${natter.url}push/vapid-public-key`)).text();
  const alice = await openContext({
    endpoint: `${standinBase()}/push/alice-tab`,
    p256dh: b64url(ua.getPublicKey()),
    auth: b64url(uaAuth),
  });
  await register(alice.page, 'alice', 'alice-webpush-pass');
  const bar = alice.page.locator('.natter-webpush');
  await bar.locator('button.natter-webpush-on').waitFor();
  await shot(alice.page, 'webpush-01-offer');
  await bar.locator('button.natter-webpush-on').click();
  await bar.getByText('Notifications on when this tab is closed').waitFor();
  await shot(alice.page, 'webpush-02-on');
  // The page subscribed with natter's VAPID key, through its real service worker.
  assert.equal(await alice.page.evaluate(() => localStorage.getItem('standin-subscribed')), vapid);
  const worker = await alice.page.evaluate(async () => (await navigator.serviceWorker.getRegistration('/'))?.active?.scriptURL);
  assert.match(worker || '', /\/sw\.js$/);

  // The tab is closed; its session ends.
  await alice.page.close();
  await new Promise((ok) => setTimeout(ok, 1500));
  assert.equal(pushes.length, 0, 'nothing pushed while the tab was open');

  const bob = await openContext(null);
  await register(bob.page, 'bob', 'bob-webpush-pass');
  await bob.page.evaluate(() => {
    const { $msg } = window.converse.env;
    window.natterTest.api.send($msg({ to: 'alice@localhost', type: 'chat' }).c('body').t('are you there?'));
  });
  const push = await nextPush();
  assert.equal(push.url, '/push/alice-tab');
  assert.equal(push.headers['content-encoding'], 'aes128gcm');
  checkVapid(push.headers, vapid);
  const payload = decrypt(push.body);
  assert.deepEqual(payload, { count: 1, sender: 'bob@localhost' }, 'sender and count, no body');
  await shot(bob.page, 'webpush-03-bob-sent');

  // The decrypted push, delivered to alice's real service worker as her
  // push service would: it shows the notification.
  const page = await alice.context.newPage();
  page.setDefaultTimeout(STEP);
  await page.goto(`${natter.url}sw.js`);
  const cdp = await alice.context.newCDPSession(page);
  const registration = new Promise((ok) => cdp.on('ServiceWorker.workerRegistrationUpdated', ({ registrations }) => {
    const r = registrations.find((x) => !x.isDeleted && x.scopeURL === natter.url);
    if (r) ok(r);
  }));
  await cdp.send('ServiceWorker.enable');
  const { registrationId } = await registration;
  await cdp.send('ServiceWorker.deliverPushMessage', {
    origin: natter.url.replace(/\/$/, ''), registrationId, data: JSON.stringify(payload),
  });
  const shown = await page.evaluate(async () => {
    const reg = await navigator.serviceWorker.getRegistration('/');
    for (let i = 0; i < 50; i++) {
      const list = await reg.getNotifications();
      if (list.length) return list.map((n) => ({ title: n.title, body: n.body, tag: n.tag }));
      await new Promise((ok) => setTimeout(ok, 100));
    }
    return [];
  });
  assert.deepEqual(shown, [{ title: 'bob@localhost', body: 'New message', tag: 'natter-messages' }]);
  await page.evaluate((n) => {
    document.body.innerHTML = '';
    const card = document.createElement('div');
    card.style.cssText = 'font-family:sans-serif;margin:3em auto;max-width:26em;border-radius:.6em;box-shadow:0 2px 8px #0003;padding:1em 1.2em;border-left:6px solid #128c7e';
    card.innerHTML = '<div style="color:#667781;font-size:13px">natter · notification shown by the service worker</div>';
    const t = document.createElement('div'); t.style.cssText = 'font-weight:600;margin-top:.4em'; t.textContent = n.title;
    const b = document.createElement('div'); b.textContent = n.body;
    card.append(t, b);
    document.body.append(card);
  }, shown[0]);
  await shot(page, 'webpush-04-notification');
});
