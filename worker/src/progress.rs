//! Progress reports for a runner's progress bars (the stage contract's `PRETRAIN_PROGRESS=json`):
//! `@progress {json}` lines on stdout, at most five a second per process.

use std::io::Write;
use std::time::{Duration, Instant};

use pretrain_crd::contract::{ENV_PROGRESS, PROGRESS_PREFIX, ProgressEvent};

/// Progress of one thing a worker does.
#[derive(Debug)]
pub struct Progress {
    event: ProgressEvent,
    json: bool,
    last: Option<Instant>,
}

impl Progress {
    /// Progress of `label` in `unit`s, out of `total` when known.
    pub fn new(label: impl Into<String>, unit: &str, total: Option<u64>) -> Self {
        let json = std::env::var(ENV_PROGRESS).is_ok_and(|v| v == "json");
        Self {
            event: ProgressEvent { label: label.into(), unit: unit.into(), done: 0, total, message: String::new() },
            json,
            last: None,
        }
    }

    /// Whether a runner draws bars from these reports (then periodic log lines are left out).
    pub fn reporting(&self) -> bool {
        self.json
    }

    /// Reports `done` units and a message (rate-limited; the last unit is always reported).
    pub fn update(&mut self, done: u64, message: impl FnOnce() -> String) {
        if !self.json {
            return;
        }
        let finished = self.event.total == Some(done);
        if !finished && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last = Some(Instant::now());
        self.event.done = done;
        self.event.message = message();
        let line = serde_json::to_string(&self.event).expect("progress serialises");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{PROGRESS_PREFIX}{line}");
        let _ = out.flush();
    }
}
