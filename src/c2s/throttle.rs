//! Abuse limits before authentication: failed-login throttling per account
//! and per IP, and a cap on unauthenticated connections per IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
struct Window {
    failures: u32,
    started: Instant,
    banned_until: Option<Instant>,
}

/// Past this many tracked keys, expired entries are swept so the map stays small.
const SWEEP_AT: usize = 10_000;

pub struct AuthThrottle {
    per_account: u32,
    per_ip: u32,
    window: Duration,
    entries: Mutex<HashMap<String, Window>>,
}

impl AuthThrottle {
    pub fn new(per_account: u32, per_ip: u32, window: Duration) -> Self {
        AuthThrottle {
            per_account,
            per_ip,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn banned(&self, key: &str, now: Instant) -> bool {
        let map = self.entries.lock().unwrap();
        map.get(key)
            .and_then(|w| w.banned_until)
            .is_some_and(|until| until > now)
    }

    /// May this IP (and account, once known) try to log in now?
    pub fn allowed(&self, ip: IpAddr, account: Option<&str>) -> bool {
        let now = Instant::now();
        !self.banned(&format!("ip:{ip}"), now)
            && !account.is_some_and(|a| self.banned(&format!("acct:{a}"), now))
    }

    fn bump(&self, key: String, limit: u32, now: Instant) {
        let mut map = self.entries.lock().unwrap();
        if map.len() > SWEEP_AT {
            let window = self.window;
            map.retain(|_, w| {
                now.duration_since(w.started) < window || w.banned_until.is_some_and(|u| u > now)
            });
        }
        let w = map.entry(key).or_insert(Window {
            failures: 0,
            started: now,
            banned_until: None,
        });
        if now.duration_since(w.started) >= self.window {
            *w = Window {
                failures: 0,
                started: now,
                banned_until: None,
            };
        }
        w.failures += 1;
        if w.failures >= limit {
            w.banned_until = Some(now + self.window);
        }
    }

    pub fn failure(&self, ip: IpAddr, account: Option<&str>) {
        let now = Instant::now();
        self.bump(format!("ip:{ip}"), self.per_ip, now);
        if let Some(a) = account {
            self.bump(format!("acct:{a}"), self.per_account, now);
        }
    }

    pub fn success(&self, account: &str) {
        self.entries
            .lock()
            .unwrap()
            .remove(&format!("acct:{account}"));
    }
}

/// Counts unauthenticated connections per IP.
pub struct PreauthLimiter {
    max_per_ip: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one unauthenticated slot; released on drop (at authentication or close).
pub struct PreauthGuard {
    limiter: Arc<PreauthLimiter>,
    ip: IpAddr,
}

impl PreauthLimiter {
    pub fn new(max_per_ip: usize) -> Self {
        PreauthLimiter {
            max_per_ip,
            counts: Mutex::new(HashMap::new()),
        }
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PreauthGuard> {
        let mut map = self.counts.lock().unwrap();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(PreauthGuard {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for PreauthGuard {
    fn drop(&mut self) {
        let mut map = self.limiter.counts.lock().unwrap();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
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

    #[test]
    fn bans_after_limit_and_success_clears_account() {
        let t = AuthThrottle::new(2, 100, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(t.allowed(ip, Some("a@x")));
        t.failure(ip, Some("a@x"));
        assert!(t.allowed(ip, Some("a@x")));
        t.failure(ip, Some("a@x"));
        assert!(!t.allowed(ip, Some("a@x")));
        assert!(t.allowed(ip, Some("b@x")));
        t.success("a@x");
        assert!(t.allowed(ip, Some("a@x")));
    }

    #[test]
    fn preauth_slots_are_released() {
        let l = Arc::new(PreauthLimiter::new(1));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let g = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        drop(g);
        assert!(l.try_acquire(ip).is_some());
    }

    #[test]
    fn bucket_asks_for_a_pause_when_empty() {
        let mut b = TokenBucket::new(1000, 1000);
        assert!(b.take(500).is_none());
        let d = b.take(1500).unwrap();
        assert!(d > Duration::from_millis(900) && d <= Duration::from_millis(1000));
    }
}
