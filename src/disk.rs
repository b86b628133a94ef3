//! Free space on the filesystem that holds the database: the `natter_disk_free_bytes`
//! and `natter_disk_size_bytes` gauges (sampled at each scrape and every
//! [`CHECK_EVERY`]) and a warning in the log while less than
//! `store.disk_free_warn_percent` of it is free. A full disk makes every message fail
//! (`/ready` then answers 503), so the operator should hear of it before.

use crate::config::Config;
use crate::state::ServerState;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the watcher samples free space.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often the warning repeats while space stays low.
const WARN_AGAIN: Duration = Duration::from_secs(600);

/// Space on one filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Free for natter (without the blocks reserved for root).
    pub free: u64,
    pub size: u64,
}

impl Space {
    /// Less than `percent` of the filesystem is free (never when `percent` is 0).
    pub fn low(&self, percent: u8) -> bool {
        u128::from(self.free) * 100 < u128::from(self.size) * u128::from(percent)
    }
}

/// Space on the filesystem holding `dir`.
pub fn space(dir: &Path) -> std::io::Result<Space> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(Space {
        free: s.f_bavail.saturating_mul(s.f_frsize),
        size: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// The directory of the database file (`data_dir` unless `store.path` moves it).
pub fn store_dir(config: &Config) -> PathBuf {
    match config.store_path().parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Samples the store's filesystem into the gauges; `None` if it can't be read.
pub fn refresh(state: &ServerState) -> Option<Space> {
    let s = space(&store_dir(&state.config)).ok()?;
    state.metrics.disk_space(s);
    Some(s)
}

/// Samples every [`CHECK_EVERY`] until shutdown, warning while space is low.
pub async fn watch(state: ServerState) {
    let percent = state.config.store.disk_free_warn_percent;
    let mut warned: Option<Instant> = None;
    loop {
        if let Some(s) = refresh(&state) {
            if !s.low(percent) {
                if warned.take().is_some() {
                    tracing::info!(
                        free_bytes = s.free,
                        "disk space for the store is fine again"
                    );
                }
            } else if warned.is_none_or(|at| at.elapsed() >= WARN_AGAIN) {
                warned = Some(Instant::now());
                tracing::warn!(
                    dir = %store_dir(&state.config).display(),
                    free_bytes = s.free,
                    size_bytes = s.size,
                    threshold_percent = percent,
                    "disk space for the store is low; when it runs out, messages fail \
                     and /ready answers 503"
                );
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_is_below_the_percentage_of_the_size() {
        let s = Space { free: 9, size: 100 };
        assert!(s.low(10));
        assert!(!s.low(9));
        assert!(!s.low(0), "0 disables the warning");
        let huge = Space {
            free: u64::MAX / 2,
            size: u64::MAX,
        };
        assert!(!huge.low(10), "no overflow");
    }

    #[test]
    fn space_of_a_real_directory() {
        let s = space(Path::new(".")).unwrap();
        assert!(s.size > 0 && s.free <= s.size, "{s:?}");
    }
}
