//! Test helpers: the log-normal corpus of the acceptance criteria.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

/// `n` lengths from exp(N(ln median, sigma)), rounded and clipped to [lo, hi].
pub(crate) fn log_normal_lengths(
    n: usize,
    median: f64,
    sigma: f64,
    lo: u32,
    hi: u32,
    seed: u64,
) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dist = LogNormal::new(median.ln(), sigma).expect("valid log-normal");
    (0..n)
        .map(|_| (dist.sample(&mut rng).round() as u32).clamp(lo, hi))
        .collect()
}

/// The acceptance corpus: median 400, sigma 0.9, clipped to [16, 4096].
pub(crate) fn acceptance_lengths(n: usize, seed: u64) -> Vec<u32> {
    log_normal_lengths(n, 400.0, 0.9, 16, 4096, seed)
}
