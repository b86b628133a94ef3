//! Progress of long CLI work (`natter backup`, `natter restore`): a bar on
//! a terminal, an info log line every few seconds otherwise (cron jobs,
//! systemd units and CI logs get a readable trace instead of escape codes).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a log line is written when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often the bar's detail text is rebuilt (it is redrawn at most this often anyway).
const DRAW_EVERY: Duration = Duration::from_millis(100);

/// What the position counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Accounts,
}

pub struct Progress {
    label: &'static str,
    unit: Unit,
    total: u64,
    bar: Option<ProgressBar>,
    last: Instant,
    every: Duration,
}

impl Progress {
    /// A bar when stderr is a terminal, log lines otherwise.
    pub fn new(label: &'static str, unit: Unit, total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(label, unit, total)
        } else {
            Self::logging(label, unit, total, LOG_EVERY)
        }
    }

    /// Log lines every `every` (whatever stderr is).
    pub fn logging(label: &'static str, unit: Unit, total: u64, every: Duration) -> Self {
        Progress {
            label,
            unit,
            total,
            bar: None,
            last: Instant::now(),
            every,
        }
    }

    fn bar(label: &'static str, unit: Unit, total: u64) -> Self {
        let template = match unit {
            Unit::Bytes => "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} (eta {eta})",
            Unit::Accounts => "{prefix} [{bar:30}] {pos}/{len} accounts {msg} (eta {eta})",
        };
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_prefix(label)
            .with_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
        Progress {
            label,
            unit,
            total,
            bar: Some(bar),
            last: Instant::now(),
            every: DRAW_EVERY,
        }
    }

    /// Report the position; `detail` (e.g. "120 accounts, 5000 messages")
    /// is only built when something is shown.
    pub fn update(&mut self, done: u64, detail: impl FnOnce() -> String) {
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        self.show(done, detail());
    }

    fn show(&self, done: u64, detail: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(detail);
            }
            None => {
                let of = match self.unit {
                    Unit::Bytes => format!("{done} of {} bytes", self.total),
                    Unit::Accounts => format!("{done} of {} accounts", self.total),
                };
                let pct = (done * 100).checked_div(self.total).unwrap_or(100);
                tracing::info!("{}: {pct}% ({of}), {detail}", self.label);
            }
        }
    }

    /// Final state: the bar is completed and left on screen; no log line
    /// (the command prints its summary).
    pub fn finish(&self, done: u64, detail: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.finish_with_message(detail());
        }
    }

    /// Remove the bar (on failure, so the error is the last thing shown).
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
