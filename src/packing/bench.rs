//! Planner speed and quality at scale, in release:
//! `cargo test --release --lib packing::bench -- --ignored --nocapture`.

use super::testutil::acceptance_lengths;
use super::{Plan, PlanParams};
use crate::config::Leftovers;

#[test]
#[ignore = "release-mode benchmark"]
fn plan_one_million_documents() {
    let lengths = acceptance_lengths(1_000_000, 0);
    for world_size in [1, 8, 64] {
        let params = PlanParams {
            tokens_per_micro_batch: 16384,
            micro_steps: 1,
            world_size,
            seed: 0,
            leftovers: Leftovers::Carry,
        };
        let mut best = f64::INFINITY;
        let mut plan = None;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            plan = Some(Plan::new(&lengths, &params, 0, &[]).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        let s = plan.unwrap().stats(&lengths);
        println!(
            "W={world_size}: {} docs, {} bins, {} steps, efficiency {:.5}, imbalance tokens {:.4}/{:.4} attention {:.4}/{:.4} (mean/max), leftover {} docs, plan {:.3} s",
            s.documents, s.bins, s.steps, s.efficiency,
            s.imbalance_tokens.mean, s.imbalance_tokens.max,
            s.imbalance_attention.mean, s.imbalance_attention.max,
            s.leftover_docs, best
        );
        assert!(s.efficiency >= 0.995, "{s:?}");
        assert!(best < 1.0, "planning took {best} s");
    }
}

/// Other length distributions (no target; shows where windowed packing is harder).
#[test]
#[ignore = "release-mode benchmark"]
fn other_length_distributions() {
    use super::testutil::log_normal_lengths;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let n = 200_000;
    let dists: Vec<(&str, Vec<u32>)> = vec![
        ("log-normal 400, 0.9", acceptance_lengths(n, 9)),
        (
            "log-normal 2000, 0.5",
            log_normal_lengths(n, 2000.0, 0.5, 16, 16384, 2),
        ),
        (
            "log-normal 100, 1.5",
            log_normal_lengths(n, 100.0, 1.5, 2, 16384, 2),
        ),
        (
            "uniform 16..4096",
            (0..n).map(|_| rng.random_range(16..=4096)).collect(),
        ),
        (
            "uniform 1024..4096",
            (0..n).map(|_| rng.random_range(1024..=4096)).collect(),
        ),
        (
            "uniform 3000..9000",
            (0..n).map(|_| rng.random_range(3000..=9000)).collect(),
        ),
    ];
    for (name, lengths) in &dists {
        let params = PlanParams {
            tokens_per_micro_batch: 16384,
            micro_steps: 1,
            world_size: 8,
            seed: 0,
            leftovers: Leftovers::Carry,
        };
        let t = std::time::Instant::now();
        let plan = Plan::new(lengths, &params, 0, &[]).unwrap();
        let dt = t.elapsed().as_secs_f64();
        let s = plan.stats(lengths);
        println!(
            "{name:>22} W=8: efficiency {:.5}, imbalance tokens {:.4}/{:.4} attention {:.4}/{:.4}, leftover {} docs, plan {:.3} s",
            s.efficiency, s.imbalance_tokens.mean, s.imbalance_tokens.max,
            s.imbalance_attention.mean, s.imbalance_attention.max, s.leftover_docs, dt
        );
    }
}
