//! Learning-rate schedules: pure functions of the step.

use pretrain_crd::spec::{Optimizer, Schedule, ScheduleKind};

/// Learning rate of optimizer step `step` (0-based) out of `total`.
///
/// - warmup: linear from `lr / warmup` at step 0 to `lr` at the end of warmup;
/// - `cosine`: from `lr` down to `minLr` along half a cosine over the remaining steps;
/// - `wsd` (MiniCPM): `lr` until the last `decayFraction` of the steps, then linear down to `minLr`;
/// - `constant`: `lr` after warmup.
pub fn learning_rate(step: u64, total: u64, schedule: &Schedule, optimizer: &Optimizer) -> f64 {
    let (peak, floor) = (optimizer.lr, optimizer.min_lr.min(optimizer.lr));
    let warmup = schedule.warmup_steps.min(total.saturating_sub(1));
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let last = total.saturating_sub(1).max(warmup);
    match schedule.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Cosine => {
            let span = (last - warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        ScheduleKind::Wsd => {
            let decay_steps = ((total as f64 * schedule.decay_fraction).round() as u64).min(last - warmup);
            let decay_start = last - decay_steps;
            if step <= decay_start || decay_steps == 0 {
                peak
            } else {
                let progress = ((step - decay_start) as f64 / decay_steps as f64).min(1.0);
                peak + (floor - peak) * progress
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(kind: ScheduleKind, step: u64) -> f64 {
        let schedule = Schedule { kind, warmup_steps: 10, decay_fraction: 0.2 };
        let optimizer = Optimizer { lr: 1.0, min_lr: 0.1, ..Optimizer::default() };
        learning_rate(step, 110, &schedule, &optimizer)
    }

    #[test]
    fn warmup_then_each_shape() {
        for kind in [ScheduleKind::Cosine, ScheduleKind::Wsd, ScheduleKind::Constant] {
            assert!((at(kind, 0) - 0.1).abs() < 1e-12);
            assert!((at(kind, 4) - 0.5).abs() < 1e-12);
            assert!((at(kind, 10) - 1.0).abs() < 1e-12, "{kind:?}");
        }
        // Cosine: halfway is the midpoint, the last step is the floor, monotone in between.
        assert!((at(ScheduleKind::Cosine, 59) - 0.55).abs() < 0.02);
        assert!((at(ScheduleKind::Cosine, 109) - 0.1).abs() < 1e-12);
        assert!((10..109).all(|s| at(ScheduleKind::Cosine, s + 1) <= at(ScheduleKind::Cosine, s)));
        // WSD: stable until the last 22 steps, then linear to the floor.
        assert_eq!(at(ScheduleKind::Wsd, 87), 1.0);
        assert!((at(ScheduleKind::Wsd, 98) - 0.55).abs() < 1e-12);
        assert!((at(ScheduleKind::Wsd, 109) - 0.1).abs() < 1e-12);
        assert_eq!(at(ScheduleKind::Constant, 109), 1.0);
    }

    #[test]
    fn degenerate_budgets_stay_finite() {
        let schedule = Schedule { kind: ScheduleKind::Cosine, warmup_steps: 100, decay_fraction: 0.5 };
        for total in [1, 2, 5] {
            for step in 0..total {
                let lr = learning_rate(step, total, &schedule, &Optimizer::default());
                assert!(lr.is_finite() && lr > 0.0, "{total} {step} {lr}");
            }
        }
    }
}
