//! When to checkpoint: every `checkpoint.everySteps` steps, or with `checkpoint.every: auto` at
//! Young/Daly's interval, sqrt(2 x C x M): C the time a checkpoint costs the step loop (measured at
//! each checkpoint), M the gang's mean time between failures. Checkpointing more often than that
//! loses more to checkpoints, less often more to the steps a failure makes recompute (Young 1974,
//! Daly 2006).
//!
//! M starts from a prior, `mtbfHours` or Llama 3's interruption rate per GPU over the gang's GPUs,
//! and moves towards what the stage observes: (prior + training time) / (1 + failures survived),
//! both carried in the checkpoints' [`RunHistory`]. Before the first checkpoint is measured, C is
//! taken as one step's time.

use pretrain_crd::spec::{CheckpointEvery, Checkpointing};
use pretrain_store::artifact::RunHistory;

/// GPU-hours per interruption in Llama 3's pretraining: 466 interruptions in 54 days on 16,384 GPUs
/// (Dubey et al. 2024, section 3.3.4).
pub const LLAMA3_GPU_HOURS_PER_INTERRUPTION: f64 = 54.0 * 24.0 * 16_384.0 / 466.0;

/// Young/Daly's optimal seconds between checkpoints.
pub fn young_daly(cost_seconds: f64, mtbf_seconds: f64) -> f64 {
    (2.0 * cost_seconds * mtbf_seconds).sqrt()
}

/// The checkpoint schedule of one attempt.
#[derive(Debug, Clone)]
pub struct Interval {
    every: CheckpointEvery,
    max_steps: u64,
    prior_mtbf_seconds: f64,
    /// Seconds the last checkpoint held the step loop, once one was taken.
    cost: Option<f64>,
    /// Mean seconds of a step (exponentially weighted).
    step_seconds: Option<f64>,
    /// The step of the last checkpoint.
    last: u64,
}

impl Interval {
    /// The schedule for a gang of `gpus` (CPU pods count one each), starting after `step`.
    pub fn new(spec: &Checkpointing, gpus: u32, step: u64) -> Self {
        let prior_hours = spec.mtbf_hours.unwrap_or(LLAMA3_GPU_HOURS_PER_INTERRUPTION / f64::from(gpus.max(1)));
        Self {
            every: spec.every,
            max_steps: spec.every_steps.max(1),
            prior_mtbf_seconds: prior_hours * 3600.0,
            cost: None,
            step_seconds: None,
            last: step,
        }
    }

    /// The gang's mean time between failures, in seconds, after `history`.
    pub fn mtbf_seconds(&self, history: &RunHistory) -> f64 {
        (self.prior_mtbf_seconds + history.train_seconds) / f64::from(1 + history.failures)
    }

    /// Steps between checkpoints now.
    pub fn steps(&self, history: &RunHistory) -> u64 {
        match (self.every, self.step_seconds) {
            (CheckpointEvery::Steps, _) | (CheckpointEvery::Auto, None) => self.max_steps,
            (CheckpointEvery::Auto, Some(step)) => {
                let cost = self.cost.unwrap_or(step);
                let seconds = young_daly(cost, self.mtbf_seconds(history));
                ((seconds / step).round() as u64).clamp(1, self.max_steps)
            }
        }
    }

    /// A step of `seconds` finished.
    pub fn step_done(&mut self, seconds: f64) {
        self.step_seconds = Some(self.step_seconds.map_or(seconds, |s| 0.9 * s + 0.1 * seconds));
    }

    /// Whether `step` is due for a checkpoint: a multiple of `everySteps`, or with `auto` the
    /// current interval past the last one.
    pub fn due(&self, step: u64, history: &RunHistory) -> bool {
        match self.every {
            CheckpointEvery::Steps => step.is_multiple_of(self.max_steps),
            CheckpointEvery::Auto => step >= self.last + self.steps(history),
        }
    }

    /// Seconds the last checkpoint held the step loop.
    pub fn cost(&self) -> Option<f64> {
        self.cost
    }

    /// The step after the last checkpoint waited `seconds` for its copy to finish: that is part of
    /// the checkpoint's cost.
    pub fn stalled(&mut self, seconds: f64) {
        if let Some(cost) = &mut self.cost {
            *cost += seconds;
        }
    }

    /// A checkpoint of `step` held the step loop for `seconds`.
    pub fn checkpointed(&mut self, step: u64, seconds: f64) {
        self.last = step;
        self.cost = Some(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(every: CheckpointEvery, mtbf_hours: Option<f64>) -> Checkpointing {
        Checkpointing { every, every_steps: 1000, mtbf_hours, keep: 3 }
    }

    #[test]
    fn young_daly_spaces_checkpoints_by_cost_and_failure_rate() {
        // 2 s checkpoints, a failure every 3 hours (Llama 3's whole-job rate): about every 3.5 min.
        assert!((young_daly(2.0, 3.0 * 3600.0) - 207.8).abs() < 0.1);
        // The Llama 3 prior for its own 16,384 GPUs is its observed job MTBF of about 2.8 hours.
        let gang = Interval::new(&spec(CheckpointEvery::Auto, None), 16_384, 0);
        assert!((gang.mtbf_seconds(&RunHistory::default()) / 3600.0 - 2.78).abs() < 0.01);

        let mut auto = Interval::new(&spec(CheckpointEvery::Auto, Some(2.0)), 8, 0);
        assert_eq!(auto.steps(&RunHistory::default()), 1000, "no step timed yet: the most");
        auto.step_done(0.5);
        // Cost unmeasured: one step (0.5 s); MTBF 7,200 s: sqrt(2 x 0.5 x 7200) = 84.9 s = 170 steps.
        assert_eq!(auto.steps(&RunHistory::default()), 170);
        auto.checkpointed(170, 2.0);
        // A 2 s checkpoint: sqrt(2 x 2 x 7200) = 169.7 s = 339 steps.
        assert_eq!(auto.steps(&RunHistory::default()), 339);
        assert!(!auto.due(170 + 338, &RunHistory::default()) && auto.due(170 + 339, &RunHistory::default()));
        // Three failures in 2 hours of training: MTBF (2 h + 2 h) / 4 = 1 h, checkpoints closer.
        let failing = RunHistory { failures: 3, train_seconds: 7200.0, ..RunHistory::default() };
        assert_eq!(auto.steps(&failing), 240);
        // Capped at everySteps, and at least every step.
        let mut rare = Interval::new(&spec(CheckpointEvery::Auto, Some(1e9)), 1, 0);
        rare.step_done(1.0);
        assert_eq!(rare.steps(&RunHistory::default()), 1000);
        let mut often = Interval::new(&spec(CheckpointEvery::Auto, Some(1e-9)), 1, 0);
        often.step_done(1.0);
        assert_eq!(often.steps(&RunHistory::default()), 1);
    }

    #[test]
    fn fixed_steps_keep_the_multiples() {
        let mut fixed = Interval::new(&spec(CheckpointEvery::Steps, None), 1, 0);
        fixed.step_done(5.0);
        fixed.checkpointed(7, 100.0);
        assert!(fixed.due(2000, &RunHistory::default()) && !fixed.due(1007, &RunHistory::default()));
    }
}
