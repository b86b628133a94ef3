//! Per-user state that the message path consults on every stanza (block
//! lists, archive preferences), kept in memory so routing a message costs no
//! store read.
//!
//! Staleness is ruled out by generations: every [`UserCache::set`] and
//! [`UserCache::forget`] gives the user's slot a new one, and a loader
//! takes the generation before its store read ([`UserCache::load`]) and
//! fills only if it is unchanged ([`Load::fill`]). So a load that read the
//! old value before a change never caches it — neither over the writer's
//! value nor after the user's last session dropped that value. A slot with
//! a load in flight outlives `forget` (value gone, generation kept) until
//! the load ends. Entries of users with no session are dropped when the
//! user's last session closes and, as a bound, when the cache grows past
//! its soft limit.

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
    /// foldhash with a random seed per cache: a lookup per stanza and
    /// user, on keys (account names) users choose.
    map: HashMap<BareJid, Slot<T>, foldhash::quality::RandomState>,
    /// Where generations come from: cache-wide, so a slot removed and made
    /// again never reuses one a load in flight might hold.
    clock: u64,
    /// Size at which the next sweep runs: twice what the last sweep left, so
    /// with many users online sweeps stay rare (amortized O(1) per fill).
    sweep_at: usize,
}

struct Slot<T> {
    value: Option<Arc<T>>,
    /// Changed by every set and forget of this user.
    generation: u64,
    /// Loads in flight: the slot (and its generation) stays while any is.
    loading: u32,
}

impl<T> Inner<T> {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl<T> Default for UserCache<T> {
    fn default() -> Self {
        UserCache {
            inner: Mutex::new(Inner {
                map: HashMap::default(),
                clock: 0,
                sweep_at: SOFT_LIMIT,
            }),
        }
    }
}

/// A load of one user's value from the store, begun by [`UserCache::load`]
/// before the read.
pub struct Load<'a, T> {
    cache: &'a UserCache<T>,
    user: BareJid,
    generation: u64,
}

impl<T> UserCache<T> {
    pub fn get(&self, user: &BareJid) -> Option<Arc<T>> {
        self.inner.lock().map.get(user)?.value.clone()
    }

    /// Begin loading `user`'s value: call before reading the store.
    pub fn load(&self, user: &BareJid) -> Load<'_, T> {
        let mut inner = self.inner.lock();
        let now = inner.clock;
        let slot = inner.map.entry(user.clone()).or_insert(Slot {
            value: None,
            generation: now,
            loading: 0,
        });
        slot.loading += 1;
        Load {
            cache: self,
            user: user.clone(),
            generation: slot.generation,
        }
    }

    /// Replace the value after the stored one changed.
    pub fn set(&self, user: &BareJid, value: Arc<T>) {
        let mut inner = self.inner.lock();
        let generation = inner.tick();
        let slot = inner.map.entry(user.clone()).or_insert(Slot {
            value: None,
            generation,
            loading: 0,
        });
        slot.value = Some(value);
        slot.generation = generation;
    }

    pub fn forget(&self, user: &BareJid) {
        let mut inner = self.inner.lock();
        let generation = inner.tick();
        if let Some(slot) = inner.map.get_mut(user) {
            if slot.loading == 0 {
                inner.map.remove(user);
            } else {
                slot.value = None;
                slot.generation = generation;
            }
        }
    }

    /// Drop `user`'s entry when the closing session `closing` was its last.
    pub fn forget_unless_online(&self, router: &dyn Routing, user: &BareJid, closing: u64) {
        if !router.resources(user).iter().any(|h| h.id != closing) {
            self.forget(user);
        }
    }
}

impl<T> Load<'_, T> {
    /// Cache what was loaded, unless a writer put a value in first or the
    /// user's value was set or forgotten since the load began (then the
    /// load may be stale: it is returned, not cached). Returns the value
    /// to use.
    pub fn fill(self, router: &dyn Routing, loaded: Arc<T>) -> Arc<T> {
        let mut inner = self.cache.inner.lock();
        if inner.map.len() >= inner.sweep_at {
            inner
                .map
                .retain(|u, s| s.loading > 0 || !router.resources(u).is_empty());
            inner.sweep_at = (2 * inner.map.len()).max(SOFT_LIMIT);
        }
        let Some(slot) = inner.map.get_mut(&self.user) else {
            return loaded;
        };
        if let Some(v) = &slot.value {
            return v.clone();
        }
        if slot.generation == self.generation {
            slot.value = Some(loaded.clone());
        }
        loaded
    }
}

impl<T> Drop for Load<'_, T> {
    fn drop(&mut self) {
        let mut inner = self.cache.inner.lock();
        if let Some(slot) = inner.map.get_mut(&self.user) {
            slot.loading = slot.loading.saturating_sub(1);
            if slot.loading == 0 && slot.value.is_none() {
                inner.map.remove(&self.user);
            }
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
        let raced = cache.load(&user(0));
        cache.set(&user(0), Arc::new(7));
        // A load that raced the write does not replace it.
        assert_eq!(*raced.fill(&router, Arc::new(1)), 7);
        for i in 1..SOFT_LIMIT {
            cache.load(&user(i)).fill(&router, Arc::new(0));
        }
        // At the limit the next fill sweeps: nobody here has a session.
        cache.load(&user(SOFT_LIMIT)).fill(&router, Arc::new(3));
        assert!(cache.get(&user(0)).is_none());
        assert_eq!(cache.get(&user(SOFT_LIMIT)).as_deref(), Some(&3));
        cache.forget(&user(SOFT_LIMIT));
        assert!(cache.get(&user(SOFT_LIMIT)).is_none());
    }

    /// Issue 10: a loader reads the old block list, the user changes it,
    /// the user's last session closes (dropping the entry), then the loader
    /// fills. The old list must not be cached.
    #[test]
    fn a_load_that_read_before_a_change_never_caches_the_old_value() {
        let router = Router::new();
        let cache = UserCache::<u32>::default();
        let u = user(0);
        let load = cache.load(&u);
        let read_from_store = Arc::new(1);
        cache.set(&u, Arc::new(2));
        cache.forget(&u);
        // The loader answers with what it read, without caching it.
        assert_eq!(*load.fill(&router, read_from_store), 1);
        assert!(cache.get(&u).is_none());
        // A forget alone during a load has the same effect.
        let load = cache.load(&u);
        cache.forget(&u);
        load.fill(&router, Arc::new(1));
        assert!(cache.get(&u).is_none());
        // A load with nothing in between fills, and concurrent loaders of
        // the same generation agree on the first value.
        let (first, second) = (cache.load(&u), cache.load(&u));
        assert_eq!(*first.fill(&router, Arc::new(2)), 2);
        assert_eq!(*second.fill(&router, Arc::new(3)), 2);
        assert_eq!(cache.get(&u).as_deref(), Some(&2));
        // A load that ends without filling (a store error) leaves nothing.
        cache.forget(&u);
        drop(cache.load(&u));
        assert!(cache.inner.lock().map.is_empty());
    }
}
