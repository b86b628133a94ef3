// Shared pieces of the browser tests: start natter (the debug binary, a temp
// data dir, listeners on 127.0.0.1 port 0) and Debian's Chromium through
// playwright-core.

import { deflateSync, crc32 } from 'node:zlib';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const WEB = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const REPO = resolve(WEB, '..');
export const SHOTS = resolve(REPO, 'test-output', 'browser');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/**
 * Start `natter serve`; resolves once it logged its bound addresses.
 * Options (all optional; without them natter starts as it always did):
 * `env`, extra NATTER_* configuration; `publicUrl: true`, the HTTP listener
 * on a port picked beforehand (not port 0) with `http.public_url` set to
 * `http://127.0.0.1:<port>`, the origin the page is loaded from, so URLs
 * natter hands out (upload slots) point back at it.
 */
export async function startNatter({ env: extra = {}, publicUrl = false } = {}) {
  if (!publicUrl) return startNatterOnce(extra);
  // The picked port could be taken before natter binds it: try again.
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    try {
      return await startNatterOnce({
        NATTER_LISTEN_HTTP: `127.0.0.1:${port}`,
        NATTER_HTTP_PUBLIC_URL: `http://127.0.0.1:${port}`,
        ...extra,
      });
    } catch (e) {
      if (attempt >= 3 || !/in use/i.test(e.message)) throw e;
    }
  }
}

async function startNatterOnce(extra) {
  const bin = process.env.NATTER_BIN || join(REPO, 'target', 'debug', 'natter');
  if (!existsSync(bin)) throw new Error(`${bin} not found: run \`cargo build -p natter\` first`);
  const dataDir = mkdtempSync(join(tmpdir(), 'natter-browser-'));
  // natter reads every NATTER_* variable as configuration: pass only ours.
  const inherited = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('NATTER_')),
  );
  const env = {
    ...inherited,
    NATTER_DATA_DIR: dataDir,
    NATTER_DOMAINS: 'localhost',
    NATTER_LISTEN_C2S: '127.0.0.1:0',
    NATTER_LISTEN_C2S_TLS: '127.0.0.1:0',
    NATTER_LISTEN_HTTP: '127.0.0.1:0',
    NATTER_HTTP_WEB_ROOT: WEB,
    NATTER_LOG_LEVEL: process.env.WEBTEST_LOG || 'info',
    NATTER_LOG_FORMAT: 'text',
    ...extra,
  };
  const proc = spawn(bin, ['serve'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const http = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`natter did not start:\n${log}`)), 30000);
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (chunk) => {
      log += chunk;
      // eslint-disable-next-line no-control-regex
      const m = log.replace(/\x1b\[[0-9;]*m/g, '').match(/HTTP\/WebSocket on (127\.0\.0\.1:\d+)/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); fail(new Error(`natter exited (${code}):\n${log}`)); });
  });
  return {
    url: `http://${http}/`,
    http,
    dataDir,
    log: () => log,
    async stop() {
      if (proc.exitCode === null) {
        const done = new Promise((ok) => proc.on('exit', ok));
        proc.kill('SIGTERM');
        await Promise.race([done, new Promise((ok) => setTimeout(ok, 10000))]);
        if (proc.exitCode === null) proc.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export async function launchChromium() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install chromium`);
  // playwright gives every launch a fresh temporary --user-data-dir of its own
  // (and refuses one in `args`); each context below is isolated as well.
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

export function shotsDir() {
  mkdirSync(SHOTS, { recursive: true });
  return SHOTS;
}

/** Screenshot into test-output/browser/NAME.png. */
export async function shot(page, name) {
  await page.screenshot({ path: join(shotsDir(), `${name}.png`) });
}

/** Register NAME with PASSWORD on the page's registration form; resolves once logged in. */
export async function register(page, name, password, { beforeSubmit } = {}) {
  await page.getByText('Create an account').click();
  const form = page.locator('#converse-register');
  await form.locator('input[name=username]').fill(name);
  await form.locator('input[name=password]').fill(password);
  if (beforeSubmit) await beforeSubmit();
  await form.locator('input[type=submit]').click();
  await page.locator('#converse-roster').waitFor();
  await page.locator('.xmpp-status, converse-user-profile').first().waitFor();
}

/** Ask for JID's presence subscription through the roster's "Add a contact" form. */
export async function addContact(page, jid, name, { beforeSubmit } = {}) {
  await page.locator('converse-dropdown.dropdown--contacts button.dropdown-toggle').click();
  await page.locator('a.add-contact').click();
  const add = page.locator('form.add-xmpp-contact');
  await add.locator('input[name=jid]').fill(jid);
  await add.locator('input[name=name]').fill(name);
  if (beforeSubmit) await beforeSubmit();
  await add.locator('button[type=submit]').click();
}

/** A contact's entry in PAGE's roster. */
export const contact = (page, jid) => page.locator(`#converse-roster li.list-item:has(a[data-jid="${jid}"])`);

/**
 * Before PAGE (or every page of a context) loads: merge SETTINGS into the
 * settings natter's page passes to converse.initialize(), and register a
 * small plugin that exposes Converse's internal `_converse` as
 * `window.natterTest` (for XMPP queries from the test through Converse's
 * own connection: `window.natterTest.api.disco.info(jid)`). The page itself
 * (web/index.html, served by natter) is unchanged.
 */
export async function converseOverrides(pageOrContext, settings = {}) {
  await pageOrContext.addInitScript((extra) => {
    // converse.min.js dispatches 'converse-loaded' before the page's own
    // script calls converse.initialize(), and this listener is added first.
    window.addEventListener('converse-loaded', (ev) => {
      const converse = ev.detail.converse;
      const initialize = converse.initialize;
      converse.plugins.add('natter-test', {
        initialize() { window.natterTest = this._converse; },
      });
      converse.initialize = (s = {}, ...rest) => initialize({
        ...s,
        ...extra,
        whitelisted_plugins: [...(s.whitelisted_plugins || []), ...(extra.whitelisted_plugins || []), 'natter-test'],
      }, ...rest);
    }, { once: true });
  }, settings);
}

/** A WIDTH x HEIGHT PNG of one colour (8-bit RGB, no interlace). */
export function solidPng(width, height, [r, g, b]) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // colour type: RGB
  const row = Buffer.alloc(1 + width * 3); // filter byte 0, then pixels
  for (let x = 0; x < width; x++) row.set([r, g, b], 1 + x * 3);
  const raw = Buffer.concat(Array.from({ length: height }, () => row));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}
