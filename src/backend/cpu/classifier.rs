//! The classifier: lm_head GEMM fused with softmax cross-entropy, in chunks of rows.
//!
//! Shapes: x `[T, C]`, w `[V, C]`, targets `[T]` (i32; < 0 is the ignore index), losses `[T]`;
//! with gradients dx `[T, C]` (overwritten) and dw `[V, C]` (+=).
//!
//! For each chunk of `CHUNK` rows (the full `[T, V]` logits never exist):
//!   logits = x w^T                                              [CHUNK, V]
//!   losses[t] = logsumexp(logits[t]) - logits[t, targets[t]]    (0 where targets[t] < 0)
//!   dlogits[t] = loss_scale (softmax(logits[t]) - onehot(targets[t]))   (0 where ignored)
//!   dx[chunk] = dlogits w                                       overwritten
//!   dw       += dlogits^T x[chunk]                              chunks in ascending order
//! Each GEMM is split over rows of its output (see `matmul::par_gemm`), so dw is summed over
//! t in a fixed order: bitwise reproducible.

use rayon::prelude::*;

use super::exp::{max_of, sum_of};
use super::matmul::{par_gemm, MatRef};
use super::Real;

/// Rows per chunk.
pub const CHUNK: usize = 256;

/// See the module doc. `targets` must already be checked to be < V.
#[allow(clippy::too_many_arguments)]
pub fn classifier<F: Real>(
    losses: &mut [F],
    mut grads: Option<(&mut [F], &mut [F])>,
    x: &[F],
    w: &[F],
    targets: &[i32],
    loss_scale: F,
    t: usize,
    c: usize,
    v: usize,
) {
    if v == 0 {
        return;
    }
    let mut logits = vec![F::zero(); CHUNK.min(t) * v];
    for r0 in (0..t).step_by(CHUNK) {
        let bt = CHUNK.min(t - r0);
        let xc = &x[r0 * c..(r0 + bt) * c];
        let logits = &mut logits[..bt * v];
        par_gemm(
            bt,
            c,
            v,
            F::one(),
            MatRef::rows(xc, c),
            MatRef::cols(w, c),
            F::zero(),
            logits,
            v,
        );
        let with_grads = grads.is_some();
        logits
            .par_chunks_mut(v)
            .zip(losses[r0..r0 + bt].par_iter_mut())
            .zip(targets[r0..r0 + bt].par_iter())
            .for_each(|((row, loss), &tg)| {
                if tg < 0 {
                    *loss = F::zero();
                    row.fill(F::zero());
                    return;
                }
                let tg = tg as usize;
                let z_tg = row[tg];
                let max = max_of(row);
                for z in row.iter_mut() {
                    *z = (*z - max).fexp();
                }
                let sum = sum_of(row);
                *loss = max + sum.ln() - z_tg;
                if with_grads {
                    // loss_scale softmax = loss_scale exp(z - max) / sum
                    let k = loss_scale / sum;
                    for z in row.iter_mut() {
                        *z = *z * k;
                    }
                    row[tg] = row[tg] - loss_scale;
                }
            });
        if let Some((dx, dw)) = grads.as_mut() {
            // dx[chunk] = dlogits w
            par_gemm(
                bt,
                v,
                c,
                F::one(),
                MatRef::rows(logits, v),
                MatRef::rows(w, c),
                F::zero(),
                &mut dx[r0 * c..],
                c,
            );
            // dw += dlogits^T x[chunk]
            par_gemm(
                v,
                bt,
                c,
                F::one(),
                MatRef::cols(logits, v),
                MatRef::rows(xc, c),
                F::one(),
                dw,
                c,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// T = CHUNK + 37 (two chunks, the second ragged), every 5th target ignored.
    #[test]
    fn classifier_gradients_match_finite_differences() {
        let mut rng = rng(80);
        let (t, c, v) = (CHUNK + 37, 3, 7);
        let x = randn(&mut rng, t * c);
        let w = randn(&mut rng, v * c);
        let targets: Vec<i32> = (0..t)
            .map(|i| if i % 5 == 2 { -100 } else { (i * 3 % v) as i32 })
            .collect();
        let scale = 0.37;
        let f = |x: &[f64], w: &[f64]| {
            let mut losses = vec![0.0; t];
            classifier(&mut losses, None, x, w, &targets, 0.0, t, c, v);
            scale * losses.iter().sum::<f64>()
        };
        let mut losses = vec![f64::NAN; t];
        let mut dx = vec![f64::NAN; t * c];
        let mut dw = vec![0.0; v * c];
        classifier(
            &mut losses,
            Some((&mut dx, &mut dw)),
            &x,
            &w,
            &targets,
            scale,
            t,
            c,
            v,
        );
        // Losses against a direct per-row computation.
        for i in 0..t {
            let logits: Vec<f64> = (0..v)
                .map(|j| dot(&x[i * c..][..c], &w[j * c..][..c]))
                .collect();
            let lse = logits.iter().map(|z| z.exp()).sum::<f64>().ln();
            let want = if targets[i] < 0 {
                0.0
            } else {
                lse - logits[targets[i] as usize]
            };
            assert!(
                (losses[i] - want).abs() < 1e-12,
                "loss {i}: {} vs {want}",
                losses[i]
            );
        }
        for i in (0..t).filter(|i| targets[*i] < 0) {
            assert!(
                dx[i * c..][..c].iter().all(|&g| g == 0.0),
                "dx of ignored row {i}"
            );
        }
        check_grad("classifier dx", &dx, &x, |xp| f(xp, &w));
        check_grad("classifier dw", &dw, &w, |wp| f(&x, wp));
    }
}
