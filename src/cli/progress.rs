//! Progress of long CLI jobs (`fsck`, `gc run`, delete previews): a spinner with a message on a terminal; plain
//! lines on standard error otherwise (at most one every few seconds, and one at the end), so a
//! job under cron or CI still shows that it moves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// A job's progress.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    /// Starts showing progress.
    pub(super) fn start() -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let now = Instant::now();
        Progress {
            bar: terminal.then(indicatif::ProgressBar::new_spinner),
            started: now,
            last_line: Mutex::new(now),
        }
    }

    /// Says where the job stands (cheap to call often).
    pub(super) fn update(&self, message: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(message());
                bar.tick();
            }
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    eprintln!("{} ({:.0} s)", message(), self.started.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Says where a job with a known amount of work stands: on a terminal a bar of `done` out of
    /// `total` with `message` beside it; otherwise as [`Progress::update`].
    pub(super) fn update_counted(&self, done: u64, total: u64, message: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                if bar.length() != Some(total) {
                    bar.set_length(total);
                    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}") {
                        bar.set_style(style);
                    }
                }
                bar.set_position(done);
                bar.set_message(message());
            }
            None => self.update(message),
        }
    }

    /// Shows `message` while one long step runs (the spinner turns by itself).
    pub(super) fn waiting(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message);
            bar.enable_steady_tick(Duration::from_millis(120));
        }
    }

    /// Ends the display with a last line saying what was done.
    pub(super) fn finish(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{message} in {:.1} s", self.started.elapsed().as_secs_f64());
    }
}
