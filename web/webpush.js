// natter Web Push: a Converse.js plugin that lets the user be notified of
// messages while the chat tab is closed. On a click it asks for the
// notification permission, subscribes the service worker (/sw.js) to Web
// Push with natter's VAPID key (/push/vapid-public-key) and registers the
// subscription with natter over XMPP (urn:natter:webpush:0), bound to this
// session's resource: natter pushes when that session is gone. Each login
// registers again (Converse picks a new resource per session).

const NS = 'urn:natter:webpush:0';

const STYLE = `
.natter-webpush { border-bottom: 1px solid #e9edef; padding: .5em .8em; font-size: 13px; color: #667781; display: flex; align-items: center; justify-content: space-between; gap: .5em; }
.natter-webpush button { font: inherit; cursor: pointer; white-space: nowrap; background: var(--natter-green, #128c7e); color: #fff; border: 0; border-radius: 1em; padding: .2em .8em; }
.natter-webpush button.off { background: transparent; color: var(--natter-green-dark, #075e54); border: 1px solid var(--natter-green, #128c7e); }
.natter-webpush .natter-webpush-error { color: #b3261e; }
`;

function b64url(buffer) {
  const s = btoa(String.fromCharCode(...new Uint8Array(buffer)));
  return s.replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function unb64url(text) {
  const s = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

function errorText(e) {
  const text = e?.getElementsByTagName?.('text')[0]?.textContent;
  return text || e?.message || String(e);
}

export function webPushPlugin() {
  return {
    initialize() {
      const { api } = this._converse;
      const { $iq } = window.converse.env;
      const supported = 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window;
      let root = null;
      let vapidKey = null;

      async function worker() {
        await navigator.serviceWorker.register('/sw.js');
        return navigator.serviceWorker.ready;
      }

      function register(sub) {
        const keys = sub.toJSON().keys || {};
        return api.sendIQ($iq({ type: 'set' }).c('enable', {
          xmlns: NS,
          endpoint: sub.endpoint,
          p256dh: keys.p256dh || b64url(sub.getKey('p256dh')),
          auth: keys.auth || b64url(sub.getKey('auth')),
        }));
      }

      async function turnOn() {
        const permission = await Notification.requestPermission();
        if (permission !== 'granted') throw new Error('Notifications are blocked for this page.');
        const reg = await worker();
        const sub = await reg.pushManager.getSubscription()
          || await reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: unb64url(vapidKey) });
        await register(sub);
      }

      async function turnOff() {
        const reg = await worker();
        const sub = await reg.pushManager.getSubscription();
        await api.sendIQ($iq({ type: 'set' }).c('disable', sub ? { xmlns: NS, endpoint: sub.endpoint } : { xmlns: NS }));
        await sub?.unsubscribe();
      }

      async function state() {
        if (Notification.permission !== 'granted') return false;
        const reg = await navigator.serviceWorker.getRegistration('/');
        return Boolean(await reg?.pushManager.getSubscription());
      }

      async function render(error = '') {
        if (!root) return;
        const on = await state().catch(() => false);
        const label = document.createElement('span');
        label.className = 'natter-webpush-state';
        label.textContent = on ? 'Notifications on when this tab is closed' : 'Get notified when this tab is closed';
        const button = document.createElement('button');
        button.type = 'button';
        button.className = on ? 'natter-webpush-off off' : 'natter-webpush-on';
        button.textContent = on ? 'Turn off' : 'Turn on';
        button.onclick = async () => {
          button.disabled = true;
          try {
            await (on ? turnOff() : turnOn());
            await render();
          } catch (e) {
            await render(errorText(e));
          }
        };
        const parts = [label, button];
        if (error) {
          const err = document.createElement('span');
          err.className = 'natter-webpush-error';
          err.setAttribute('role', 'alert');
          err.textContent = error;
          parts.splice(1, 0, err);
        }
        root.replaceChildren(...parts);
      }

      function mount() {
        if (root?.isConnected) return true;
        const pane = document.querySelector('#controlbox .controlbox-pane') || document.querySelector('#controlbox');
        if (!pane) return false;
        if (!document.getElementById('natter-webpush-style')) {
          const style = document.createElement('style');
          style.id = 'natter-webpush-style';
          style.textContent = STYLE;
          document.head.append(style);
        }
        root = document.createElement('section');
        root.className = 'natter-webpush';
        root.setAttribute('aria-label', 'Notifications');
        pane.prepend(root);
        render();
        return true;
      }

      api.listen.on('connected', async () => {
        if (!supported) return;
        const res = await fetch('/push/vapid-public-key').catch(() => null);
        if (!res?.ok) return; // Web Push is off on this server
        vapidKey = (await res.text()).trim();
        const timer = setInterval(() => { if (mount()) clearInterval(timer); }, 200);
        // Already subscribed (an earlier visit): bind it to this session.
        try {
          if (await state()) {
            const reg = await worker();
            await register(await reg.pushManager.getSubscription());
          }
        } catch (e) {
          render(errorText(e));
        }
      });
      window.natterWebPush = { render };
    },
  };
}
