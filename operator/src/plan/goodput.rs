//! Goodput: the share of the time the training gangs held their nodes that advanced the model, and
//! where the rest went. Two ledgers meet here. The workers keep one in each checkpoint's
//! `state.json` (`history`: the seconds of training steps, of checkpoints in the step loop, of
//! held-out measurement and of start-up, summed over every attempt the checkpoint descends from).
//! The executor keeps the other in each training stage's [`StageTime`]: the wall time of every
//! attempt, and, when one ends, the part of it that the checkpoints do not account for (what the
//! attempt did past its last checkpoint, pods starting, the failure itself), filed under why it
//! ended. Held time then splits exactly into the checkpoints' ledger, the executor's losses and the
//! running attempt's time since its newest checkpoint. Pure: callers pass the clock.

use pretrain_crd::status::{Goodput, StageTime};
use pretrain_store::artifact::RunHistory;

use super::cluster::{format_time, parse_time};

/// The store key of a run's goodput, which the operator keeps beside the run's stages for
/// `pretrain report`.
pub fn key(run: &str) -> String {
    format!("{run}/goodput.json")
}

/// A training stage's newest checkpoint, as goodput reads it.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// Its `history`.
    pub history: RunHistory,
    /// Unix seconds it was saved.
    pub saved_unix: Option<i64>,
}

/// Seconds a stage's checkpoints account for.
pub fn accounted(ledger: Option<&Ledger>) -> f64 {
    ledger.map_or(0.0, |l| {
        let h = &l.history;
        h.train_seconds + h.checkpoint_seconds + h.eval_seconds + h.startup_seconds
    })
}

/// Why an attempt ended, which decides what its unaccounted time is filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It failed, or the cluster ended it: the next attempt recomputes its steps since the last
    /// checkpoint.
    Failed,
    /// It checkpointed and stopped to make room (preemption or suspension).
    Stopped,
    /// It committed, or a spec change stopped it.
    Other,
}

/// The stage waits to start an attempt, from `now` unless it already did.
pub fn waiting(time: &mut StageTime, now: i64) {
    time.waiting_since.get_or_insert_with(|| format_time(now));
}

/// An attempt starts at `now`, with the stage's checkpoints accounting for `accounted` seconds.
pub fn started(time: &mut StageTime, now: i64, accounted: f64) {
    if let Some(since) = time.waiting_since.take().as_deref().and_then(parse_time) {
        time.queued_seconds += (now - since).max(0) as f64;
    }
    time.ledger_at_start = accounted;
}

/// The attempt that started at `start` ended at `now`, why as said, with the stage's checkpoints
/// accounting for `accounted` seconds. Waiting for the next attempt is the executor's to start
/// ([`waiting`]): a suspended run does not wait for admission.
pub fn ended(time: &mut StageTime, start: i64, now: i64, accounted: f64, why: Ended) {
    let held = (now - start).max(0) as f64;
    let lost = (held - (accounted - time.ledger_at_start)).max(0.0);
    time.held_seconds += held;
    match why {
        Ended::Failed => time.recomputed_seconds += lost,
        Ended::Stopped => time.preempted_seconds += lost,
        Ended::Other => time.other_seconds += lost,
    }
    time.ledger_at_start = accounted;
}

/// One training stage, as [`of`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct StageTimes<'a> {
    /// The executor's record.
    pub time: &'a StageTime,
    /// When its running attempt started, if one runs.
    pub running_since: Option<i64>,
    /// Its newest checkpoint.
    pub ledger: Option<&'a Ledger>,
}

/// Goodput over `stages` for gangs of `gpus` GPUs (pods without GPUs count as one each), as of the
/// last attempt that ended or checkpoint saved: a running attempt counts up to its newest
/// checkpoint, and a wait only once it ended, so the figures change when something happens, not
/// with the clock. `None` before any attempt started.
pub fn of(stages: &[StageTimes<'_>], gpus: u32) -> Option<Goodput> {
    let mut g = Goodput::default();
    let mut started = false;
    for s in stages {
        let t = s.time;
        started |= t.held_seconds > 0.0 || s.running_since.is_some();
        g.held_seconds += t.held_seconds;
        if let Some(since) = s.running_since {
            let until = s.ledger.and_then(|l| l.saved_unix).unwrap_or(since).max(since);
            let running = (until - since) as f64;
            g.held_seconds += running;
            g.in_flight_seconds += (running - (accounted(s.ledger) - t.ledger_at_start)).max(0.0);
        }
        if let Some(l) = s.ledger.map(|l| &l.history) {
            g.productive_seconds += l.train_seconds;
            g.lost.startup += l.startup_seconds;
            g.lost.checkpoint += l.checkpoint_seconds;
            g.lost.evaluation += l.eval_seconds;
        }
        g.lost.admission += t.queued_seconds;
        g.lost.recomputed += t.recomputed_seconds;
        g.lost.preemption += t.preempted_seconds;
        g.lost.other += t.other_seconds;
    }
    if !started {
        return None;
    }
    // A checkpoint's ledger can run a moment ahead of the executor's clock; goodput is at most 1.
    let settled = (g.held_seconds - g.in_flight_seconds).max(g.productive_seconds);
    g.ratio = if settled > 0.0 { g.productive_seconds / settled } else { 0.0 };
    g.held_gpu_hours = g.held_seconds * f64::from(gpus.max(1)) / 3600.0;
    Some(g)
}

/// One line for people: the ratio, GPU-hours, and the causes that lost time, largest first.
pub fn summary(g: &Goodput) -> String {
    let mut lost: Vec<(&str, f64)> = g.lost.by_cause().into_iter().filter(|(_, s)| *s >= 1.0).collect();
    lost.sort_by(|a, b| b.1.total_cmp(&a.1));
    let lost: Vec<String> =
        lost.iter().map(|(cause, s)| format!("{cause} {}", pretrain_crd::display::duration(*s as u64))).collect();
    format!(
        "goodput {:.1}% of {:.2} GPU-hours held{}",
        100.0 * g.ratio,
        g.held_gpu_hours,
        if lost.is_empty() { String::new() } else { format!("; lost: {}", lost.join(", ")) }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(train: f64, checkpoint: f64, eval: f64, startup: f64, saved: i64) -> Ledger {
        let history = RunHistory {
            train_seconds: train,
            checkpoint_seconds: checkpoint,
            eval_seconds: eval,
            startup_seconds: startup,
            ..RunHistory::default()
        };
        Ledger { history, saved_unix: Some(saved) }
    }

    #[test]
    fn held_time_splits_into_the_ledger_the_losses_and_what_is_in_flight() {
        let mut t = StageTime::default();
        // Queued 100 s, then attempt 1 runs 1,000 s; its last checkpoint accounted 700 s
        // (600 training, 40 checkpoints, 20 evaluation, 40 start-up); then it fails.
        waiting(&mut t, 0);
        started(&mut t, 100, 0.0);
        ended(&mut t, 100, 1_100, 700.0, Ended::Failed);
        waiting(&mut t, 1_100);
        assert_eq!((t.queued_seconds, t.held_seconds, t.recomputed_seconds), (100.0, 1_000.0, 300.0));
        // 50 s of backoff; attempt 2 is preempted after 500 s, its SIGTERM checkpoint keeping 480 s.
        started(&mut t, 1_150, 700.0);
        ended(&mut t, 1_150, 1_650, 1_180.0, Ended::Stopped);
        waiting(&mut t, 1_650);
        assert_eq!((t.queued_seconds, t.preempted_seconds), (150.0, 20.0));
        // Attempt 3 starts at 1,700 and runs; its newest checkpoint, at 2,000, keeps 200 s more.
        started(&mut t, 1_700, 1_180.0);
        let l = ledger(1_200.0, 60.0, 40.0, 80.0, 2_000);
        let times = StageTimes { time: &t, running_since: Some(1_700), ledger: Some(&l) };
        let g = of(&[times], 8).unwrap();
        assert_eq!(g.held_seconds, 1_800.0);
        assert_eq!(g.in_flight_seconds, 100.0);
        let l = &g.lost;
        let kept_or_lost = g.productive_seconds + l.startup + l.recomputed + l.checkpoint + l.preemption + l.evaluation;
        assert_eq!(kept_or_lost + l.other + g.in_flight_seconds, g.held_seconds, "{g:?}");
        assert_eq!((l.admission, l.recomputed, l.preemption), (200.0, 300.0, 20.0));
        assert!((g.ratio - 1_200.0 / 1_700.0).abs() < 1e-12);
        assert!((g.held_gpu_hours - 4.0).abs() < 1e-12);
        let line = summary(&g);
        assert!(line.starts_with("goodput 70.6% of 4.00 GPU-hours held; lost: recomputed 5m"), "{line}");
    }

    #[test]
    fn nothing_before_the_first_attempt_and_a_wait_counts_once_it_ended() {
        let mut t = StageTime::default();
        assert!(of(&[StageTimes { time: &t, running_since: None, ledger: None }], 1).is_none());
        waiting(&mut t, 10);
        waiting(&mut t, 20);
        started(&mut t, 40, 0.0);
        // Before its first checkpoint the running attempt counts nothing yet.
        let g = of(&[StageTimes { time: &t, running_since: Some(40), ledger: None }], 1).unwrap();
        assert_eq!((g.lost.admission, g.held_seconds, g.in_flight_seconds, g.ratio), (30.0, 0.0, 0.0, 0.0));
        let l = ledger(50.0, 0.0, 0.0, 5.0, 100);
        let g = of(&[StageTimes { time: &t, running_since: Some(40), ledger: Some(&l) }], 1).unwrap();
        assert_eq!((g.held_seconds, g.in_flight_seconds), (60.0, 5.0));
        assert!((g.ratio - 50.0 / 55.0).abs() < 1e-12);
    }
}
