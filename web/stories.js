// natter stories: a Converse.js plugin for 24-hour statuses. A story is an
// Atom entry (XEP-0472 style) published to the user's
// urn:xmpp:pubsub-stories:0 PEP node; its image goes through the upload
// service (XEP-0363) first. The panel at the top of the contacts pane posts
// text or image stories and shows the user's own and their contacts'
// stories; opening a contact's story sends the author a seen receipt
// (urn:natter:stories:0), and opening one's own lists who saw it.
// Everything is built with DOM APIs and textContent: story text is never
// parsed as HTML.

const NODE = 'urn:xmpp:pubsub-stories:0';
const NS_PUBSUB = 'http://jabber.org/protocol/pubsub';
const NS_EVENT = 'http://jabber.org/protocol/pubsub#event';
const NS_STORIES = 'urn:natter:stories:0';
const NS_ATOM = 'http://www.w3.org/2005/Atom';
const NS_UPLOAD = 'urn:xmpp:http:upload:0';

const STYLE = `
.natter-stories { border-bottom: 1px solid #e9edef; padding: .6em .8em; font-size: 14px; color: #111b21; }
.natter-stories header { display: flex; align-items: center; justify-content: space-between; }
.natter-stories h3 { margin: 0; font-size: 15px; font-weight: 500; color: var(--natter-green-dark, #075e54); }
.natter-stories button { font: inherit; cursor: pointer; }
.natter-stories .natter-story-new { background: var(--natter-green, #128c7e); color: #fff; border: 0; border-radius: 1em; padding: .2em .8em; }
.natter-stories .natter-story-rings { display: flex; gap: .5em; overflow-x: auto; padding: .5em 0 .2em; }
.natter-stories .natter-story-ring { border: 2px solid var(--natter-green, #128c7e); border-radius: 1.2em; background: #fff; padding: .2em .7em; white-space: nowrap; color: #111b21; }
.natter-stories .natter-story-ring.mine { border-style: dashed; }
.natter-stories .natter-story-empty { color: #667781; font-size: 13px; }
.natter-stories form { display: grid; gap: .4em; margin-top: .5em; }
.natter-stories textarea { font: inherit; resize: vertical; min-height: 3em; border: 1px solid #d1d7db; border-radius: .4em; padding: .3em; }
.natter-stories form button[type=submit] { background: var(--natter-green, #128c7e); color: #fff; border: 0; border-radius: .4em; padding: .3em; }
.natter-stories .natter-story-error { color: #b3261e; font-size: 13px; }
.natter-story-viewer { position: fixed; inset: 0; background: rgba(7, 94, 84, .92); z-index: 10000; display: flex; align-items: center; justify-content: center; }
.natter-story-viewer .card { background: #fff; border-radius: .8em; padding: 1em 1.2em; max-width: 420px; width: 90%; text-align: center; font-family: inherit; }
.natter-story-viewer .natter-story-author { color: var(--natter-green-dark, #075e54); font-weight: 500; margin-bottom: .5em; }
.natter-story-viewer .natter-story-text { font-size: 20px; margin: .4em 0; white-space: pre-wrap; }
.natter-story-viewer img { max-width: 100%; max-height: 50vh; border-radius: .4em; }
.natter-story-viewer .natter-story-seen { color: #667781; font-size: 13px; margin-top: .5em; }
.natter-story-viewer nav { display: flex; justify-content: space-between; margin-top: .8em; }
.natter-story-viewer nav button { background: var(--natter-green, #128c7e); color: #fff; border: 0; border-radius: .4em; padding: .3em .9em; }
`;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

/** The stories of one items result: [{ id, text, image, published }]. */
function parseItems(iq) {
  return Array.from(iq.getElementsByTagNameNS(NS_PUBSUB, 'item')).map((item) => {
    const entry = item.getElementsByTagNameNS(NS_ATOM, 'entry')[0];
    const link = entry && Array.from(entry.getElementsByTagNameNS(NS_ATOM, 'link'))
      .find((l) => l.getAttribute('rel') === 'enclosure');
    return {
      id: item.getAttribute('id'),
      text: entry?.getElementsByTagNameNS(NS_ATOM, 'title')[0]?.textContent ?? '',
      image: link?.getAttribute('href') ?? null,
    };
  });
}

function errorText(e) {
  const text = e?.getElementsByTagName?.('text')[0]?.textContent;
  return text || e?.message || String(e);
}

export function storiesPlugin(natter) {
  return {
    initialize() {
      const _converse = this._converse;
      const { api } = _converse;
      const { $iq, $msg, $build } = window.converse.env;
      const stories = new Map(); // bare JID → [story]
      const seenSent = new Set();
      let root = null;

      const me = () => api.connection.get()?.jid?.split('/')[0];

      // Ask for notifications of contacts' new stories (XEP-0163 +notify).
      api.listen.on('addClientFeatures', () => api.disco.own.features.add(`${NODE}+notify`));

      async function fetchStories(jid) {
        try {
          const res = await api.sendIQ(
            $iq({ type: 'get', to: jid }).c('pubsub', { xmlns: NS_PUBSUB }).c('items', { node: NODE }),
          );
          stories.set(jid, parseItems(res));
        } catch {
          stories.delete(jid); // none, or not ours to see
        }
      }

      async function refresh() {
        const self = me();
        if (!self) return;
        const contacts = await api.contacts.get();
        const authors = [self, ...(contacts || [])
          .filter((c) => ['to', 'both'].includes(c.get('subscription')))
          .map((c) => c.get('jid'))];
        await Promise.all(authors.map(fetchStories));
        render();
      }

      async function upload(file) {
        const entities = await api.disco.features.get(NS_UPLOAD, natter.domain).catch(() => []);
        const service = entities?.[0]?.get?.('jid') || `upload.${natter.domain}`;
        const res = await api.sendIQ($iq({ type: 'get', to: service }).c('request', {
          xmlns: NS_UPLOAD, filename: file.name, size: file.size, 'content-type': file.type,
        }));
        const slot = res.getElementsByTagNameNS(NS_UPLOAD, 'slot')[0];
        const put = slot.getElementsByTagNameNS(NS_UPLOAD, 'put')[0];
        const headers = { 'Content-Type': file.type };
        for (const h of put.getElementsByTagNameNS(NS_UPLOAD, 'header')) {
          headers[h.getAttribute('name')] = h.textContent;
        }
        const r = await fetch(put.getAttribute('url'), { method: 'PUT', headers, body: file });
        if (!r.ok) throw new Error(`upload failed (${r.status}): ${await r.text()}`);
        return slot.getElementsByTagNameNS(NS_UPLOAD, 'get')[0].getAttribute('url');
      }

      async function post(text, file) {
        const image = file ? await upload(file) : null;
        const entry = $build('entry', { xmlns: NS_ATOM })
          .c('title').t(text).up()
          .c('published').t(new Date().toISOString()).up();
        if (image) entry.c('link', { rel: 'enclosure', href: image, type: file.type }).up();
        const id = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
        await api.sendIQ($iq({ type: 'set' }).c('pubsub', { xmlns: NS_PUBSUB })
          .c('publish', { node: NODE }).c('item', { id }).cnode(entry.tree()));
        await fetchStories(me());
        render();
      }

      function composer() {
        const text = el('textarea', { name: 'story-text', placeholder: 'What\'s new? (gone in 24 hours)' });
        const file = el('input', { type: 'file', name: 'story-image', accept: 'image/*' });
        const error = el('div', { class: 'natter-story-error', role: 'alert' });
        const form = el('form', { class: 'natter-story-form' }, text, file,
          el('button', { type: 'submit', text: 'Post story' }), error);
        form.addEventListener('submit', async (ev) => {
          ev.preventDefault();
          error.textContent = '';
          const picked = file.files?.[0] ?? null;
          if (!text.value.trim() && !picked) {
            error.textContent = 'Write something or pick an image.';
            return;
          }
          try {
            await post(text.value.trim(), picked);
            form.remove();
          } catch (e) {
            error.textContent = errorText(e);
          }
        });
        return form;
      }

      async function seenBy(id) {
        const res = await api.sendIQ($iq({ type: 'get' }).c('query', { xmlns: NS_STORIES, item: id }));
        return Array.from(res.getElementsByTagNameNS(NS_STORIES, 'seen')).map((s) => s.getAttribute('jid'));
      }

      function view(jid, index = 0) {
        document.querySelector('.natter-story-viewer')?.remove();
        const list = stories.get(jid) || [];
        const story = list[index];
        if (!story) return;
        const mine = jid === me();
        const card = el('div', { class: 'card', 'data-jid': jid, 'data-item': story.id },
          el('div', { class: 'natter-story-author', text: mine ? 'My story' : jid }));
        if (story.text) card.append(el('div', { class: 'natter-story-text', text: story.text }));
        if (story.image) card.append(el('img', { class: 'natter-story-image', src: story.image, alt: story.text || 'story image' }));
        const seen = el('div', { class: 'natter-story-seen' });
        card.append(seen);
        const nav = el('nav');
        const prev = el('button', { type: 'button', class: 'natter-story-prev', text: '‹' });
        const close = el('button', { type: 'button', class: 'natter-story-close', text: 'Close' });
        const next = el('button', { type: 'button', class: 'natter-story-next', text: '›' });
        prev.disabled = index === 0;
        next.disabled = index >= list.length - 1;
        prev.onclick = () => view(jid, index - 1);
        next.onclick = () => view(jid, index + 1);
        nav.append(prev, close, next);
        card.append(nav);
        const overlay = el('div', { class: 'natter-story-viewer', role: 'dialog' }, card);
        close.onclick = () => overlay.remove();
        document.body.append(overlay);
        if (mine) {
          seenBy(story.id).then((who) => {
            seen.textContent = who.length ? `Seen by ${who.join(', ')}` : 'Not seen yet';
          }).catch(() => {});
        } else if (!seenSent.has(`${jid} ${story.id}`)) {
          // The receipt goes to the author only (the server never routes it on).
          seenSent.add(`${jid} ${story.id}`);
          api.send($msg({ to: jid, type: 'headline' })
            .c('seen', { xmlns: NS_STORIES, node: NODE, item: story.id }));
        }
      }

      function render() {
        if (!root) return;
        const rings = root.querySelector('.natter-story-rings');
        rings.replaceChildren();
        const self = me();
        for (const [jid, list] of stories) {
          if (!list.length) continue;
          const label = jid === self ? 'My story' : (jid.split('@')[0]);
          const ring = el('button', {
            type: 'button', class: `natter-story-ring${jid === self ? ' mine' : ''}`, 'data-jid': jid,
            text: `${label} · ${list.length}`,
          });
          ring.onclick = () => view(jid);
          if (jid === self) rings.prepend(ring);
          else rings.append(ring);
        }
        if (!rings.children.length) {
          rings.append(el('span', { class: 'natter-story-empty', text: 'No stories in the last 24 hours.' }));
        }
      }

      function mount() {
        if (root?.isConnected) return;
        if (!document.getElementById('natter-stories-style')) {
          document.head.append(el('style', { id: 'natter-stories-style', text: STYLE }));
        }
        const pane = document.querySelector('#controlbox .controlbox-pane') || document.querySelector('#controlbox');
        if (!pane) return;
        const add = el('button', { type: 'button', class: 'natter-story-new', text: '+ New story' });
        root = el('section', { class: 'natter-stories', 'aria-label': 'Stories' },
          el('header', {}, el('h3', { text: 'Stories' }), add),
          el('div', { class: 'natter-story-rings' }));
        // A fresh form each time (a posted one may still be finishing).
        add.onclick = () => {
          root.querySelector('form')?.remove();
          root.append(composer());
        };
        pane.prepend(root);
        render();
      }

      // PEP events: a contact's new or retracted story refreshes their ring.
      function onEvent(stanza) {
        const items = stanza.getElementsByTagNameNS(NS_EVENT, 'items')[0];
        if (items?.getAttribute('node') === NODE) {
          const from = stanza.getAttribute('from')?.split('/')[0];
          if (from) fetchStories(from).then(render);
        }
        return true;
      }

      api.listen.on('connected', async () => {
        api.connection.get().addHandler(onEvent, NS_EVENT, 'message');
        const timer = setInterval(() => {
          mount();
          if (root?.isConnected) clearInterval(timer);
        }, 200);
        await api.waitUntil('rosterContactsFetched').catch(() => {});
        await refresh();
      });
      api.listen.on('rosterContactsFetched', () => refresh());
      // Expired stories drop off even without events.
      setInterval(() => { if (me()) refresh(); }, 60000);
      window.natterStories = { refresh };
    },
  };
}
