// Browser end-to-end test of group chats (XEP-0045, conference.localhost)
// through Converse.js's own group chat UI, in headless Chromium: alice
// creates a group in the "Add groupchat" modal, invites bob from the
// participants list's "Invite someone" modal (a XEP-0249 direct invitation,
// which natter turns into membership of the members-only room), bob accepts
// the invitation in Converse's confirmation dialog, picks his nickname and
// joins, and both chat. Each step leaves a screenshot in
// test-output/browser/group-*.png.
//
// Converse runs with natter's page settings unchanged; the test only adds a
// plugin exposing Converse's internals (harness.mjs, converseOverrides) to
// ask the server for the room's disco#info over Converse's own connection.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startNatter, launchChromium, shot, register, converseOverrides } from './harness.mjs';

const STEP = 30000; // ms for any one UI expectation (the machine is slow)

const ROOM_NAME = 'Team Natter';
const ROOM = 'team-natter@conference.localhost'; // Converse's normalised room JID
const MSG_A = 'Hello group, alice here. Welcome, Bob!';
const MSG_B = 'Thanks Alice, bob has joined the group.';

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

afterEach(async () => {
  for (const [name, p] of Object.entries(people)) {
    await shot(p.page, `group-zz-last-${name}`).catch(() => {});
  }
});

async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await converseOverrides(context);
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

/** The room's view in PAGE. */
const roomView = (page) => page.locator(`converse-muc[jid="${ROOM}"]`);
const textarea = (page) => roomView(page).locator('textarea.chat-textarea');
/**
 * NICK's entry in the room's participants list, shown online (joined).
 * (Converse 14 may also list a member from the room's member list as a
 * separate offline entry under their JID, e.g. "bob@localhost": with
 * XEP-0421 occupant ids it matches presences to occupants by id only.)
 */
const occupant = (page, nick) =>
  roomView(page)
    .locator('.occupant-list li.occupant')
    .filter({ has: page.locator('.occupant-nick', { hasText: new RegExp(`^\\s*${nick}\\s*$`) }) })
    .filter({ has: page.locator('converse-icon.chat-status[color="var(--chat-status-online)"]') });

/** Ask (async FN) until DONE(answer) or STEP ms passed; the last answer. */
async function poll(fn, done) {
  const deadline = Date.now() + STEP;
  let answer = await fn();
  while (!done(answer) && Date.now() < deadline) {
    await new Promise((ok) => setTimeout(ok, 250));
    answer = await fn();
  }
  return answer;
}

/** The room's disco#info as seen from PAGE, asked through Converse's connection. */
function discoInfo(page, jid) {
  return page.evaluate(async (jid) => {
    const { api } = window.natterTest;
    const { stx } = window.converse.env;
    const res = await api.sendIQ(
      stx`<iq type="get" to="${jid}" xmlns="jabber:client"><query xmlns="http://jabber.org/protocol/disco#info"/></iq>`,
      20000, false);
    const q = res.querySelector('query');
    return {
      type: res.getAttribute('type'),
      identities: [...(q?.querySelectorAll('identity') ?? [])].map((i) => `${i.getAttribute('category')}/${i.getAttribute('type')}`),
      name: q?.querySelector('identity')?.getAttribute('name') ?? null,
      features: [...(q?.querySelectorAll('feature') ?? [])].map((f) => f.getAttribute('var')),
      error: res.querySelector('error')?.firstElementChild?.localName ?? null,
    };
  }, jid);
}

/** The room's list of AFFILIATION (muc#admin), as PAGE's user may see it: bare JIDs. */
function affiliationList(page, room, affiliation) {
  return page.evaluate(async ([room, affiliation]) => {
    const { api } = window.natterTest;
    const { stx } = window.converse.env;
    const res = await api.sendIQ(
      stx`<iq type="get" to="${room}" xmlns="jabber:client"><query xmlns="http://jabber.org/protocol/muc#admin"><item affiliation="${affiliation}"/></query></iq>`,
      20000, false);
    if (res.getAttribute('type') !== 'result') return { error: res.outerHTML };
    return { jids: [...res.querySelectorAll('item')].map((i) => i.getAttribute('jid')) };
  }, [room, affiliation]);
}

/**
 * PAGE's user tries to enter ROOM as NICK with a bare MUC join presence
 * (outside Converse's UI); resolves to the room's answer: the error
 * condition, or 'joined'.
 */
function tryJoin(page, room, nick) {
  return page.evaluate(([room, nick]) => new Promise((ok) => {
    const { api } = window.natterTest;
    const { stx } = window.converse.env;
    const from = `${room}/${nick}`;
    const conn = api.connection.get();
    const timer = setTimeout(() => ok('no answer'), 20000);
    conn.addHandler((p) => {
      clearTimeout(timer);
      ok(p.getAttribute('type') === 'error'
        ? p.querySelector('error')?.firstElementChild?.localName
        : 'joined');
      return false;
    }, null, 'presence', null, null, from);
    api.send(stx`<presence xmlns="jabber:client" to="${from}"><x xmlns="http://jabber.org/protocol/muc"/></presence>`);
  }), [room, nick]);
}

test('alice and bob register, each in their own browser context', async () => {
  for (const name of ['alice', 'bob']) {
    const { context, page } = await openPage();
    await register(page, name, `${name}-group-pass`);
    await page.waitForFunction(() => window.natterTest?.api?.connection?.connected?.());
    people[name] = { context, page, jid: `${name}@localhost` };
  }
  await shot(people.alice.page, 'group-01-alice-logged-in');
});

test('alice creates a group chat in the "Add groupchat" modal', async () => {
  const a = people.alice?.page;
  assert.ok(a, 'registration failed');
  await a.locator('.controlbox-heading--groupchats').waitFor();
  await a.locator('converse-rooms-list converse-dropdown button.dropdown-toggle').click();
  await a.locator('a.show-add-muc-modal').click();
  const form = a.locator('form.add-chatroom');
  await form.locator('input[name=chatroom]').fill(ROOM_NAME);
  await form.locator('input[name=nickname]').fill('alice');
  await shot(a, 'group-02-alice-add-groupchat');
  await form.locator('input[type=submit][name=join]').click();

  // The room opens, alice is in it (her own nick in the participants list).
  await textarea(a).waitFor();
  await occupant(a, 'alice').waitFor();
  await shot(a, 'group-03-alice-in-new-room');

  // natter has it: a members-only, persistent, non-anonymous room. Converse
  // submits the config form right after the 201 self-presence; wait for the name.
  const info = await poll(() => discoInfo(a, ROOM), (i) => i.name === ROOM_NAME);
  assert.equal(info.type, 'result', `disco#info of ${ROOM}: ${JSON.stringify(info)}`);
  assert.ok(info.identities.includes('conference/text'), JSON.stringify(info));
  // Converse submitted the (unlocked) room's config form with the name typed in.
  assert.equal(info.name, ROOM_NAME);
  for (const f of ['http://jabber.org/protocol/muc', 'muc_membersonly', 'muc_persistent', 'muc_nonanonymous']) {
    assert.ok(info.features.includes(f), `${f} missing from ${JSON.stringify(info.features)}`);
  }
  // Alice is its owner (Converse learnt it from her self-presence).
  const aff = await a.evaluate((jid) => window.natterTest.api.rooms.get(jid).then((m) => m.getOwnAffiliation()), ROOM);
  assert.equal(aff, 'owner');
});

test('alice invites bob from the participants list', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob, 'earlier steps failed');
  const a = alice.page;
  // Members-only: before the invitation, natter turns bob away.
  assert.equal(await tryJoin(bob.page, ROOM, 'bob-uninvited'), 'registration-required');
  assert.ok(!(await affiliationList(a, ROOM, 'member')).jids?.includes(bob.jid));

  await roomView(a).locator('.occupants-header converse-dropdown button.dropdown-toggle').click();
  await roomView(a).locator('a.open-invite-modal').click();
  const modal = a.locator('converse-muc-invite-modal');
  await modal.locator('input[name=invitee_jids]').fill(bob.jid);
  await modal.locator('textarea[name=reason]').fill('Our team room');
  await shot(a, 'group-04-alice-invites-bob');
  await modal.locator('input[type=submit]').click();
  await modal.locator('form').waitFor({ state: 'hidden' });

  // bob is a member of the room now (as natter's member list says).
  const members = await poll(() => affiliationList(a, ROOM, 'member'), (m) => m.jids?.includes(bob.jid));
  assert.ok(members.jids?.includes(bob.jid), `member list: ${JSON.stringify(members)}`);
});

test('bob accepts the invitation, picks his nickname and joins', async () => {
  const b = people.bob?.page;
  assert.ok(b, 'earlier steps failed');
  const confirm = b.locator('.modal.show', { hasText: 'Invitation to a groupchat' });
  await confirm.waitFor();
  const text = await confirm.innerText();
  assert.ok(text.includes(`alice@localhost has invited you to join the groupchat "${ROOM}"`), text);
  assert.ok(text.includes('Our team room'), text);
  await shot(b, 'group-05-bob-sees-invitation');
  await confirm.getByRole('button', { name: 'Confirm' }).click();

  const nick = roomView(b).locator('.muc-nickname-form input[name=nick]');
  const entered = textarea(b);
  // Converse asks for a nickname unless it found one reserved for bob.
  await nick.or(entered).first().waitFor();
  if (await nick.isVisible()) {
    await nick.fill('bob');
    await shot(b, 'group-06-bob-picks-nickname');
    await roomView(b).locator('.muc-nickname-form input[type=submit]').click();
  }
  await entered.waitFor();
  await occupant(b, 'bob').waitFor();
  await occupant(b, 'alice').waitFor();
  await shot(b, 'group-07-bob-in-room');

  // And alice sees him arrive in her participants list.
  await occupant(people.alice.page, 'bob').waitFor();
  await shot(people.alice.page, 'group-08-alice-sees-bob-joined');
});

async function say(page, text) {
  await textarea(page).fill(text);
  await textarea(page).press('Enter');
  await roomView(page).locator('.chat-msg__text', { hasText: text }).waitFor();
}

test('alice and bob chat in the room, each sees the other\'s message', async () => {
  const { alice, bob } = people;
  assert.ok(alice && bob, 'earlier steps failed');
  await say(alice.page, MSG_A);
  await roomView(bob.page).locator('.chat-msg', { hasText: MSG_A }).locator('.chat-msg__text').waitFor();
  await shot(bob.page, 'group-09-bob-receives');

  await say(bob.page, MSG_B);
  const got = roomView(alice.page).locator('.chat-msg', { hasText: MSG_B });
  await got.locator('.chat-msg__text').waitFor();
  // Shown as bob's message (his nickname as the author).
  assert.match(await got.locator('.chat-msg__author').first().innerText(), /bob/);
  await shot(alice.page, 'group-10-alice-receives-reply');
  await shot(bob.page, 'group-11-bob-conversation');
});
