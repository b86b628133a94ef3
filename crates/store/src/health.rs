//! Whether writes succeed, for readiness ([`crate::Lifecycle::writable`]), for every backend.
//!
//! The group-commit writer records the outcome of every transaction, and a readiness
//! check answers from that record while it is fresh: a busy server commits all the time,
//! so checks cost nothing. Otherwise the check writes a probe of its own, because a node
//! that a load balancer took out of rotation after a failure sees no more writes and
//! would stay unready forever after the disk was cleaned up:
//!
//! - after a success, once [`OK_FRESH`] has passed, a small probe (is the writer still
//!   alive: I/O errors, a disk remounted read-only);
//! - after a failure, once [`FAILED_FRESH`] has passed (so at most one a second), a probe
//!   of [`LARGE_PROBE`] bytes, about a busy batch's worth: a full disk where a page or
//!   two still fit in the WAL must not count as healed while messages still fail.
//!
//! Running low on space before writes fail is for the disk-space warning to tell.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::StoreError;

/// How long a successful write answers readiness checks.
pub(crate) const OK_FRESH: Duration = Duration::from_secs(10);
/// How long a failed write answers readiness checks.
pub(crate) const FAILED_FRESH: Duration = Duration::from_secs(1);
/// Bytes written by the probe after a failure.
pub(crate) const LARGE_PROBE: usize = 256 * 1024;
/// A probe that has not committed by then counts as a failed write.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a readiness check should do.
pub(crate) enum Due {
    /// Answer with the recorded outcome.
    No(Result<(), StoreError>),
    /// Write a probe of this many bytes.
    Probe(usize),
}

#[derive(Default)]
pub(crate) struct WriteHealth {
    last: Mutex<Option<Outcome>>,
    /// Held while probing, so concurrent checks share one probe.
    probe: tokio::sync::Mutex<()>,
}

struct Outcome {
    at: Instant,
    /// Since when writes fail, and the latest error; `None` when the write succeeded.
    failing: Option<(Instant, String)>,
}

impl WriteHealth {
    pub fn record_ok(&self) {
        let mut last = self.last.lock();
        if last.as_ref().is_some_and(|o| o.failing.is_some()) {
            tracing::info!("store writes succeed again");
        }
        *last = Some(Outcome {
            at: Instant::now(),
            failing: None,
        });
    }

    pub fn record_err(&self, error: &str) {
        let mut last = self.last.lock();
        let now = Instant::now();
        let since = last
            .as_ref()
            .and_then(|o| o.failing.as_ref())
            .map_or(now, |(since, _)| *since);
        *last = Some(Outcome {
            at: now,
            failing: Some((since, error.to_owned())),
        });
    }

    /// Whether the recorded outcome still answers a readiness check.
    pub fn due(&self) -> Due {
        let last = self.last.lock();
        match last.as_ref() {
            None => Due::Probe(0),
            Some(o) if o.failing.is_none() && o.at.elapsed() < OK_FRESH => Due::No(Ok(())),
            Some(o) if o.failing.is_none() => Due::Probe(0),
            Some(o) if o.at.elapsed() < FAILED_FRESH => Due::No(o.result()),
            Some(_) => Due::Probe(LARGE_PROBE),
        }
    }

    /// A readiness check: the recorded outcome while fresh, else the outcome of
    /// `probe(bytes)`, a real write of about that many bytes through the backend's writer.
    pub async fn check<F>(&self, probe: impl FnOnce(usize) -> F) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<(), StoreError>>,
    {
        // One probe at a time; checks that waited for it reuse its outcome.
        let _probing = self.probe.lock().await;
        let bytes = match self.due() {
            Due::No(recent) => return recent,
            Due::Probe(bytes) => bytes,
        };
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, probe(bytes))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Backend(format!(
                    "a probe write did not finish within {} s",
                    PROBE_TIMEOUT.as_secs()
                )))
            });
        match outcome {
            Ok(()) => self.record_ok(),
            Err(StoreError::Backend(e)) => self.record_err(&e),
            Err(e) => self.record_err(&e.to_string()),
        }
        // With how long writes have been failing.
        self.current()
    }

    /// The latest outcome (Ok if nothing was written yet).
    pub fn current(&self) -> Result<(), StoreError> {
        self.last.lock().as_ref().map_or(Ok(()), Outcome::result)
    }
}

impl Outcome {
    fn result(&self) -> Result<(), StoreError> {
        match &self.failing {
            None => Ok(()),
            Some((since, error)) => Err(StoreError::Backend(format!(
                "writes failing for {} s: {error}",
                since.elapsed().as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_is_reported_with_its_start_until_a_write_succeeds() {
        let h = WriteHealth::default();
        assert!(
            matches!(h.due(), Due::Probe(0)),
            "nothing written yet: small probe"
        );
        h.record_err("disk full");
        h.record_err("still full");
        let Due::No(Err(e)) = h.due() else {
            panic!("a fresh failure answers")
        };
        assert!(
            e.to_string().contains("writes failing for 0 s: still full"),
            "{e}"
        );
        h.last.lock().as_mut().unwrap().at -= FAILED_FRESH;
        assert!(
            matches!(h.due(), Due::Probe(LARGE_PROBE)),
            "stale failure: large probe"
        );
        h.record_ok();
        assert!(matches!(h.due(), Due::No(Ok(()))));
        assert!(h.current().is_ok());
        h.last.lock().as_mut().unwrap().at -= OK_FRESH;
        assert!(
            matches!(h.due(), Due::Probe(0)),
            "stale success: small probe"
        );
    }
}
