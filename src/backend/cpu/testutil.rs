//! Shared helpers of the CPU tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1).
pub fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `|got - want| <= rtol * max(1, max |want|)` elementwise.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// Compares `analytic` (d f / d x at `x`) with central differences, eps = 1e-6.
/// Tolerance: 1e-6 relative to max(1, the gradient's largest magnitude). In f64 the
/// truncation error is O(eps^2 f''') ~ 1e-12 and the rounding error ~ 1e-16 |f| / eps
/// ~ 1e-9 for our |f| <~ 10, so 1e-6 is far above the noise and far below any bug.
pub fn check_grad(what: &str, analytic: &[f64], x: &[f64], f: impl Fn(&[f64]) -> f64) {
    const EPS: f64 = 1e-6;
    let mut xp = x.to_vec();
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            xp[i] = x[i] + EPS;
            let up = f(&xp);
            xp[i] = x[i] - EPS;
            let down = f(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * EPS)
        })
        .collect();
    assert_close(what, analytic, &numeric, 1e-6);
}
