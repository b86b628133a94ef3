//! Abuse limits before authentication: failed-login throttling and the
//! budget of unauthenticated connections.
//!
//! Failed logins throttle the guesser, never the owner: failures are counted
//! per source address (an IPv4 address or an IPv6 /64) and per range (IPv4
//! /24, IPv6 /56); a source or range past its limit is refused new attempts
//! for the window, and every failure reply from a busy source waits longer.
//! Per-account counters only ever delay *failure* replies: a correct
//! password from an address that is not itself throttled always succeeds.
//! Accounts are counted by name whether they exist or not (in a fixed table
//! of hashed names), so an unknown name behaves exactly like a real one.

use parking_lot::Mutex;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The address a limit is counted on: one IPv4 address, or the IPv6 /64 a
/// single host or subscriber usually gets (IPv4-mapped IPv6 counts as IPv4,
/// so a dual-stack listener shares counters with an IPv4 one).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(mask_v6(v6, 64)),
    }
}

/// The wider range a guesser rotating addresses stays inside: IPv4 /24,
/// IPv6 /56.
fn range_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => IpAddr::V6(mask_v6(v6, 56)),
    }
}

fn mask_v6(ip: Ipv6Addr, prefix: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(ip) & (u128::MAX << (128 - prefix)))
}

/// First failure delay once delays start; it doubles with each failure.
const BASE_DELAY: Duration = Duration::from_millis(250);
/// Failures from one source answered without delay (typos).
const FREE_FAILURES_PER_SOURCE: u32 = 3;
/// Slots of the hashed per-account table (8 bytes each). Names that share
/// a slot only share failure delays, never a refusal.
const ACCOUNT_SLOTS: usize = 16 * 1024;
/// Most sources and ranges tracked at once (a few MiB). Past it, failures
/// from untracked addresses get the longest delay instead of a counter.
const MAX_TRACKED: usize = 100_000;

#[derive(Clone, Copy)]
struct Window {
    failures: u32,
    started: Instant,
}

impl Window {
    fn live(&self, now: Instant, window: Duration) -> bool {
        now.duration_since(self.started) < window
    }
}

/// One slot of the per-account table: seconds since `AuthThrottle::epoch`.
#[derive(Clone, Copy, Default)]
struct Slot {
    failures: u32,
    started_secs: u32,
}

/// What a login attempt's source may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The source or its range failed too often: refused until the window ends.
    Refused,
}

pub struct AuthThrottle {
    per_source: u32,
    per_range: u32,
    per_account: u32,
    window: Duration,
    max_delay: Duration,
    epoch: Instant,
    /// Keyed per process, so no one can aim names at one slot.
    hasher: RandomState,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Sources and ranges; a range key is masked, a source key is not (the
    /// bool tells them apart: `1.2.3.0` as an address vs as the /24).
    addrs: HashMap<(IpAddr, bool), Window>,
    /// Sweep expired entries when `addrs` grows past this (amortized).
    sweep_at: usize,
    /// When full, sweep at most once a second (a sweep walks the table).
    last_sweep: Instant,
    accounts: Box<[Slot]>,
}

impl AuthThrottle {
    pub fn new(
        per_source: u32,
        per_range: u32,
        per_account: u32,
        window: Duration,
        max_delay: Duration,
    ) -> Self {
        AuthThrottle {
            per_source,
            per_range,
            per_account,
            window,
            max_delay,
            epoch: Instant::now(),
            hasher: RandomState::new(),
            inner: Mutex::new(Inner {
                addrs: HashMap::new(),
                sweep_at: 1024,
                last_sweep: Instant::now(),
                accounts: vec![Slot::default(); ACCOUNT_SLOTS].into_boxed_slice(),
            }),
        }
    }

    /// May a login attempt from `ip` start? Only the source's own failures
    /// (and its range's) can refuse it; the account named plays no part.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        let now = Instant::now();
        let inner = self.inner.lock();
        let over = |key, limit| {
            inner
                .addrs
                .get(&key)
                .is_some_and(|w| w.live(now, self.window) && w.failures >= limit)
        };
        if over((source_of(ip), false), self.per_source)
            || over((range_of(ip), true), self.per_range)
        {
            Verdict::Refused
        } else {
            Verdict::Allowed
        }
    }

    /// Count a failed login (`account`: the name tried, existing or not);
    /// returns how long to hold back the failure reply.
    pub fn failure(&self, ip: IpAddr, account: Option<&str>) -> Duration {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let source = self.bump(&mut inner, (source_of(ip), false), now);
        self.bump(&mut inner, (range_of(ip), true), now);
        let mut delay = match source {
            Some(n) => self.backoff(n, FREE_FAILURES_PER_SOURCE),
            None => self.max_delay,
        };
        if let Some(a) = account {
            let n = self.bump_account(&mut inner, a, now);
            delay = delay.max(self.backoff(n, self.per_account));
        }
        delay
    }

    /// `BASE_DELAY` doubling for each failure past `free`, capped.
    fn backoff(&self, failures: u32, free: u32) -> Duration {
        match failures.checked_sub(free + 1) {
            None => Duration::ZERO,
            Some(extra) => BASE_DELAY
                .saturating_mul(1u32 << extra.min(20))
                .min(self.max_delay),
        }
    }

    /// The failure count after this one; `None` when the table is full.
    fn bump(&self, inner: &mut Inner, key: (IpAddr, bool), now: Instant) -> Option<u32> {
        let window = self.window;
        if inner.addrs.len() >= inner.sweep_at && !inner.addrs.contains_key(&key) {
            let full = inner.addrs.len() >= MAX_TRACKED;
            if full && now.duration_since(inner.last_sweep) < Duration::from_secs(1) {
                return None;
            }
            inner.addrs.retain(|_, w| w.live(now, window));
            inner.last_sweep = now;
            inner.sweep_at = (inner.addrs.len() * 2).clamp(1024, MAX_TRACKED);
            if inner.addrs.len() >= MAX_TRACKED {
                return None;
            }
        }
        let w = inner.addrs.entry(key).or_insert(Window {
            failures: 0,
            started: now,
        });
        if !w.live(now, window) {
            *w = Window {
                failures: 0,
                started: now,
            };
        }
        w.failures = w.failures.saturating_add(1);
        Some(w.failures)
    }

    fn bump_account(&self, inner: &mut Inner, account: &str, now: Instant) -> u32 {
        let i = (self.hasher.hash_one(account) % ACCOUNT_SLOTS as u64) as usize;
        let secs = u32::try_from(now.duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX);
        let slot = &mut inner.accounts[i];
        if u64::from(secs - slot.started_secs.min(secs)) >= self.window.as_secs() {
            *slot = Slot {
                failures: 0,
                started_secs: secs,
            };
        }
        slot.failures = slot.failures.saturating_add(1);
        slot.failures
    }
}

/// The budget of unauthenticated connections, one for every transport
/// (TCP, direct TLS, WebSocket). Each such connection's memory is bounded
/// (stanza limit, TLS buffers), so the budget bounds their memory. While
/// less than half of it is in use anyone may connect, however many share
/// an address (a carrier-grade NAT's login storm); past half, an address
/// holding `per_ip` slots already is refused.
pub struct PreauthLimiter {
    total: usize,
    per_ip: usize,
    inner: Mutex<Slots>,
}

struct Slots {
    used: usize,
    /// Per source address (`source_of`); at most `total` entries.
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a new unauthenticated connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PreauthRefused {
    /// The whole budget is in use.
    Full,
    /// The budget is under pressure and this address has its share.
    AddressShare,
}

impl std::fmt::Display for PreauthRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PreauthRefused::Full => "too many unauthenticated connections",
            PreauthRefused::AddressShare => {
                "too many unauthenticated connections from this address"
            }
        })
    }
}

/// Holds one unauthenticated slot; released on drop (at authentication or close).
pub struct PreauthGuard {
    limiter: Arc<PreauthLimiter>,
    ip: IpAddr,
}

impl PreauthLimiter {
    pub fn new(total: usize, per_ip: usize) -> Self {
        PreauthLimiter {
            total,
            per_ip,
            inner: Mutex::new(Slots {
                used: 0,
                per_ip: HashMap::new(),
            }),
        }
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<PreauthGuard, PreauthRefused> {
        let ip = source_of(ip);
        let mut s = self.inner.lock();
        if s.used >= self.total {
            return Err(PreauthRefused::Full);
        }
        let under_pressure = s.used * 2 >= self.total;
        let held = s.per_ip.get(&ip).copied().unwrap_or(0);
        if under_pressure && held >= self.per_ip {
            return Err(PreauthRefused::AddressShare);
        }
        s.used += 1;
        s.per_ip.insert(ip, held + 1);
        Ok(PreauthGuard {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for PreauthGuard {
    fn drop(&mut self) {
        let mut s = self.limiter.inner.lock();
        s.used -= 1;
        if let Some(n) = s.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Token bucket on bytes read from a client (the stanza rate limit).
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u64, burst: u64) -> Self {
        TokenBucket {
            rate: rate_per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// Take `n` bytes; returns how long to pause reading to pay the debt.
    pub fn take(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(6, 10, 2, Duration::from_secs(60), Duration::from_secs(4))
    }

    #[test]
    fn account_failures_only_delay_and_never_refuse() {
        let t = throttle();
        // Failures on one account from many addresses.
        let mut delays = Vec::new();
        for i in 0..20 {
            delays.push(t.failure(ip(&format!("10.{i}.0.1")), Some("victim@x")));
        }
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[2], BASE_DELAY);
        assert_eq!(delays[3], BASE_DELAY * 2);
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(4));
        // A fresh address may still try (and the owner's password works).
        assert_eq!(t.check(ip("10.99.0.1")), Verdict::Allowed);
    }

    #[test]
    fn guessing_source_is_slowed_then_refused() {
        let t = throttle();
        let guesser = ip("192.0.2.7");
        let delays: Vec<_> = (0..6).map(|_| t.failure(guesser, None)).collect();
        assert_eq!(&delays[..3], &[Duration::ZERO; 3]);
        assert!(delays[3] > Duration::ZERO && delays[4] > delays[3]);
        assert_eq!(t.check(guesser), Verdict::Refused);
        // Its neighbour is not refused until the /24 reaches its limit.
        let neighbour = ip("192.0.2.8");
        assert_eq!(t.check(neighbour), Verdict::Allowed);
        for _ in 0..4 {
            t.failure(neighbour, None);
        }
        assert_eq!(t.check(ip("192.0.2.9")), Verdict::Refused);
        assert_eq!(t.check(ip("192.0.3.9")), Verdict::Allowed);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_of(ip("2001:db8:1:2:aaaa::1")),
            source_of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:2::1")),
            source_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            range_of(ip("2001:db8:1:2::1")),
            range_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn preauth_budget_applies_address_share_only_under_pressure() {
        let l = Arc::new(PreauthLimiter::new(8, 2));
        let nat = ip("10.0.0.1");
        // Idle server: one address takes half the budget.
        let mut held: Vec<_> = (0..4).map(|_| l.try_acquire(nat).unwrap()).collect();
        // Now under pressure: that address has more than its share ...
        assert_eq!(l.try_acquire(nat).err(), Some(PreauthRefused::AddressShare));
        // ... while others get theirs, until the budget is spent.
        for i in 0..4 {
            held.push(l.try_acquire(ip(&format!("10.0.1.{i}"))).unwrap());
        }
        assert_eq!(
            l.try_acquire(ip("10.0.2.1")).err(),
            Some(PreauthRefused::Full)
        );
        held.clear();
        assert!(l.try_acquire(nat).is_ok());
        assert!(l.inner.lock().per_ip.len() <= 1);
    }

    #[test]
    fn bucket_asks_for_a_pause_when_empty() {
        let mut b = TokenBucket::new(1000, 1000);
        assert!(b.take(500).is_none());
        let d = b.take(1500).unwrap();
        assert!(d > Duration::from_millis(900) && d <= Duration::from_millis(1000));
    }
}
