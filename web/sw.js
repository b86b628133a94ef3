// natter's service worker: shows a notification for each Web Push natter
// sends while the chat tab is closed (the push is {sender, count[, body]},
// decrypted by the browser), and brings the chat back on a click. Served
// at the origin's root (/sw.js) so its scope is the whole page.

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    // Not natter's JSON: still say that something came.
  }
  const count = Number.isInteger(data.count) && data.count > 0 ? data.count : 1;
  const sender = typeof data.sender === 'string' ? data.sender : '';
  const summary = count > 1 ? `${count} new messages` : 'New message';
  const body = typeof data.body === 'string' && data.body ? data.body : summary;
  event.waitUntil(self.registration.showNotification(sender || 'natter', {
    body,
    // One notification for the chat, replaced by the newest count.
    tag: 'natter-messages',
    renotify: true,
    data: { sender, count },
  }));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
    const tab = tabs.find((c) => new URL(c.url).origin === self.location.origin);
    if (tab) return tab.focus();
    return self.clients.openWindow('/');
  })());
});
