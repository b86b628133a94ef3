//! Per-user state that the message path consults on every stanza (block
//! lists, archive preferences), kept in memory so routing a message costs no
//! store read.
//!
//! Staleness is ruled out by the writers: whoever changes the stored value
//! puts the new value in with [`UserCache::set`] after the store write, and a
//! loader only fills a missing entry ([`UserCache::fill`]), so a load that
//! raced a change never overwrites the newer value. Entries of users with no
//! session are dropped when the user's last session closes and, as a bound,
//! when the cache grows past its soft limit.

use crate::router::Routing;
use jid::BareJid;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Entries kept for users with no session once the cache is this big.
const SOFT_LIMIT: usize = 10_000;

pub struct UserCache<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    map: HashMap<BareJid, Arc<T>>,
    /// Size at which the next sweep runs: twice what the last sweep left, so
    /// with many users online sweeps stay rare (amortized O(1) per fill).
    sweep_at: usize,
}

impl<T> Default for UserCache<T> {
    fn default() -> Self {
        UserCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                sweep_at: SOFT_LIMIT,
            }),
        }
    }
}

impl<T> UserCache<T> {
    pub fn get(&self, user: &BareJid) -> Option<Arc<T>> {
        self.inner.lock().map.get(user).cloned()
    }

    /// Put a freshly loaded value in unless a writer got there first;
    /// returns the value now cached.
    pub fn fill(&self, router: &dyn Routing, user: &BareJid, loaded: Arc<T>) -> Arc<T> {
        let mut inner = self.inner.lock();
        if inner.map.len() >= inner.sweep_at {
            inner.map.retain(|u, _| !router.resources(u).is_empty());
            inner.sweep_at = (2 * inner.map.len()).max(SOFT_LIMIT);
        }
        inner.map.entry(user.clone()).or_insert(loaded).clone()
    }

    /// Replace the value after the stored one changed.
    pub fn set(&self, user: &BareJid, value: Arc<T>) {
        self.inner.lock().map.insert(user.clone(), value);
    }

    pub fn forget(&self, user: &BareJid) {
        self.inner.lock().map.remove(user);
    }

    /// Drop `user`'s entry when the closing session `closing` was its last.
    pub fn forget_unless_online(&self, router: &dyn Routing, user: &BareJid, closing: u64) {
        if !router.resources(user).iter().any(|h| h.id != closing) {
            self.forget(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Router;

    fn user(i: usize) -> BareJid {
        BareJid::new(&format!("u{i}@example.org")).unwrap()
    }

    #[test]
    fn fill_keeps_a_writers_value_and_sweeps_offline_users() {
        let router = Router::new();
        let cache = UserCache::<u32>::default();
        cache.set(&user(0), Arc::new(7));
        // A load that raced the write does not replace it.
        assert_eq!(*cache.fill(&router, &user(0), Arc::new(1)), 7);
        for i in 1..SOFT_LIMIT {
            cache.fill(&router, &user(i), Arc::new(0));
        }
        // At the limit the next fill sweeps: nobody here has a session.
        cache.fill(&router, &user(SOFT_LIMIT), Arc::new(3));
        assert!(cache.get(&user(0)).is_none());
        assert_eq!(cache.get(&user(SOFT_LIMIT)).as_deref(), Some(&3));
        cache.forget(&user(SOFT_LIMIT));
        assert!(cache.get(&user(SOFT_LIMIT)).is_none());
    }
}
