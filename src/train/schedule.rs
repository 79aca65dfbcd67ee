//! The learning-rate schedule: linear warmup, then cosine or linear decay to a floor.

use crate::config::{Schedule, TrainConfig};

/// Learning rate at optimizer step `step` (0-based) of `total_steps`.
///
/// Warmup: lr (step + 1) / warmup for step < warmup. Decay over the remaining steps with
/// progress p in [0, 1]: cosine: floor + (lr - floor) (1 + cos(pi p)) / 2; linear:
/// lr - (lr - floor) p; floor = lr * min_lr_ratio.
pub fn learning_rate(cfg: &TrainConfig, step: usize, total_steps: usize) -> f64 {
    let peak = cfg.lr;
    let floor = cfg.lr * cfg.min_lr_ratio;
    if step < cfg.warmup_steps {
        return peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(cfg.warmup_steps).max(1);
    let p = ((step - cfg.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match cfg.schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak - (peak - floor) * p,
        Schedule::Cosine => floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            schedule,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        let c = cfg(Schedule::Cosine);
        assert!((learning_rate(&c, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 9, 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn decay_ends_at_the_floor_and_never_rises() {
        for s in [Schedule::Cosine, Schedule::Linear] {
            let c = cfg(s);
            let lrs: Vec<f64> = (10..=100).map(|i| learning_rate(&c, i, 100)).collect();
            assert!(lrs.windows(2).all(|w| w[1] <= w[0] + 1e-12), "{s:?}");
            assert!((lrs[lrs.len() - 1] - 0.1).abs() < 1e-12, "{s:?}");
        }
        assert_eq!(learning_rate(&cfg(Schedule::Constant), 50, 100), 1.0);
    }

    #[test]
    fn cosine_is_halfway_at_the_middle() {
        let c = cfg(Schedule::Cosine);
        assert!((learning_rate(&c, 55, 100) - 0.55).abs() < 1e-12);
    }
}
