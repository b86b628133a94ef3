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

use crate::router::Router;
use jid::BareJid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Entries kept for users with no session once the cache is this big.
const SOFT_LIMIT: usize = 10_000;

pub struct UserCache<T> {
    map: Mutex<HashMap<BareJid, Arc<T>>>,
}

impl<T> Default for UserCache<T> {
    fn default() -> Self {
        UserCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> UserCache<T> {
    pub fn get(&self, user: &BareJid) -> Option<Arc<T>> {
        self.map.lock().unwrap().get(user).cloned()
    }

    /// Put a freshly loaded value in unless a writer got there first;
    /// returns the value now cached.
    pub fn fill(&self, router: &Router, user: &BareJid, loaded: Arc<T>) -> Arc<T> {
        let mut map = self.map.lock().unwrap();
        if map.len() >= SOFT_LIMIT {
            map.retain(|u, _| !router.resources(u).is_empty());
        }
        map.entry(user.clone()).or_insert(loaded).clone()
    }

    /// Replace the value after the stored one changed.
    pub fn set(&self, user: &BareJid, value: Arc<T>) {
        self.map.lock().unwrap().insert(user.clone(), value);
    }

    pub fn forget(&self, user: &BareJid) {
        self.map.lock().unwrap().remove(user);
    }

    /// Drop `user`'s entry when the closing session `closing` was its last.
    pub fn forget_unless_online(&self, router: &Router, user: &BareJid, closing: u64) {
        if !router.resources(user).iter().any(|h| h.id != closing) {
            self.forget(user);
        }
    }
}
