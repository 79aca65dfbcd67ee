//! AdamW, plus the two helpers of gradient clipping: sum of squares and scale.
//!
//! AdamW, per element of param, grad, m, v `[n]` (all but grad updated in place):
//!   g  = grad_scale grad                       (1 / global target count times the clip factor)
//!   m  = beta1 m + (1 - beta1) g               (first moment)
//!   v  = beta2 v + (1 - beta2) g^2             (second moment)
//!   m̂  = m / (1 - beta1^step),  v̂ = v / (1 - beta2^step)    (bias correction, step >= 1)
//!   p -= lr (m̂ / (sqrt(v̂) + eps) + weight_decay p)          (decoupled weight decay)
//! sum_squares: sum_i x[i]^2 in f64, over blocks of `BLOCK` in parallel, partials added in
//! block order (bitwise reproducible).
//! scale: x[i] *= s.

use rayon::prelude::*;

use super::Real;
use crate::backend::AdamWStep;

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

/// One AdamW update of every element of `param`.
pub fn adamw<F: Real>(param: &mut [F], grad: &[F], m: &mut [F], v: &mut [F], hp: AdamWStep) {
    let f = |x: f32| F::from(x).unwrap();
    let (lr, b1, b2, eps, wd, gs) = (
        f(hp.lr),
        f(hp.beta1),
        f(hp.beta2),
        f(hp.eps),
        f(hp.weight_decay),
        f(hp.grad_scale),
    );
    let step = F::from(hp.step).unwrap();
    let one = F::one();
    let bc1 = one - b1.powf(step);
    let bc2 = one - b2.powf(step);
    param
        .par_chunks_mut(BLOCK)
        .zip(grad.par_chunks(BLOCK))
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = gs * g[i];
                m[i] = b1 * m[i] + (one - b1) * g;
                v[i] = b2 * v[i] + (one - b2) * g * g;
                let m_hat = m[i] / bc1;
                let v_hat = v[i] / bc2;
                p[i] = p[i] - lr * (m_hat / (v_hat.sqrt() + eps) + wd * p[i]);
            }
        });
}

/// `sum_i x[i]^2`, accumulated in f64.
pub fn sum_squares<F: Real>(x: &[F]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(BLOCK)
        .map(|b| {
            b.iter().fold(0.0, |acc, &x| {
                let x = x.to_f64().unwrap_or(f64::NAN);
                acc + x * x
            })
        })
        .collect();
    partials.iter().sum()
}

/// `x *= s`.
pub fn scale<F: Real>(x: &mut [F], s: F) {
    x.par_chunks_mut(BLOCK).for_each(|b| {
        for x in b {
            *x = *x * s;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let hp = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_scale: 2.0,
            step: 2,
        };
        // Take hp's f32 values exactly into f64 so the hand computation is exact to rounding.
        let (lr, b1, b2, eps, wd) = (
            hp.lr as f64,
            hp.beta1 as f64,
            hp.beta2 as f64,
            hp.eps as f64,
            hp.weight_decay as f64,
        );
        let mut p = vec![1.0f64, -2.0];
        let grad = vec![0.25f64, -1.0];
        let mut m = vec![0.1f64, 0.0];
        let mut v = vec![0.01f64, 0.04];
        adamw(&mut p, &grad, &mut m, &mut v, hp);
        // Element 0 by hand: g = 0.5, m = 0.9*0.1 + 0.1*0.5 = 0.14, v = 0.99*0.01 + 0.01*0.25.
        let g: f64 = 0.5;
        let m0 = b1 * 0.1 + (1.0 - b1) * g;
        let v0 = b2 * 0.01 + (1.0 - b2) * g * g;
        let p0 =
            1.0 - lr * ((m0 / (1.0 - b1 * b1)) / ((v0 / (1.0 - b2 * b2)).sqrt() + eps) + wd * 1.0);
        assert!((m[0] - m0).abs() < 1e-15 && (v[0] - v0).abs() < 1e-15);
        assert!((p[0] - p0).abs() < 1e-14, "{} vs {p0}", p[0]);
        // And in round numbers (beta's f32 rounding is ~1e-9): m = 0.14, v = 0.0124.
        assert!((m[0] - 0.14).abs() < 1e-8 && (v[0] - 0.0124).abs() < 1e-8);
        // Element 1: g = -2, m = -0.2, v = 0.99*0.04 + 0.01*4 = 0.0796.
        let p1 = -2.0
            - lr * ((-0.2 / (1.0 - b1 * b1)) / ((0.0796 / (1.0 - b2 * b2)).sqrt() + eps)
                + wd * -2.0);
        assert!((p[1] - p1).abs() < 1e-7, "{} vs {p1}", p[1]);
    }

    #[test]
    fn sum_squares_and_scale() {
        let mut x: Vec<f32> = (0..3 * BLOCK + 5).map(|i| (i % 7) as f32 - 3.0).collect();
        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert_eq!(sum_squares(&x), want);
        scale(&mut x, 0.5);
        assert_eq!(sum_squares(&x), want / 4.0);
    }
}
