//! RMSNorm.
//!
//! Shapes: x, out, dx `[T, C]`; weight, dweight `[C]`; rstd `[T]` (saved for the backward).
//!
//! Forward:  rstd[t]   = 1 / sqrt(mean_c x[t, c]^2 + eps)
//!           out[t, c] = x[t, c] rstd[t] weight[c]                      out, rstd overwritten
//! Backward: with g = dout, gw[c] = g[t, c] weight[c],
//!           dx[t, c]  += rstd[t] gw[c] - rstd[t]^3 x[t, c] (sum_k gw[k] x[t, k]) / C
//!           dweight[c] += sum_t g[t, c] x[t, c] rstd[t]
//!           optionally dx_copy[t, c] = the new dx[t, c]                   overwritten
//!
//! dweight is reduced deterministically: each block of `ROWS` rows sums into its own partial
//! (t ascending), and the partials are added in block order.

use rayon::prelude::*;

use super::Real;

/// Rows per task of the dweight reduction (a fixed number, independent of the thread count).
const ROWS: usize = 256;

/// out `[T, C]` and rstd `[T]` overwritten.
pub fn rmsnorm_forward<F: Real>(
    out: &mut [F],
    rstd: &mut [F],
    x: &[F],
    weight: &[F],
    c: usize,
    eps: F,
) {
    if c == 0 {
        return;
    }
    let inv_c = F::one() / F::from(c).unwrap();
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((o, r), x)| {
            let ms = x.iter().fold(F::zero(), |acc, &v| acc + v * v) * inv_c;
            let rs = F::one() / (ms + eps).sqrt();
            *r = rs;
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = x * rs * w;
            }
        });
}

/// dx `[T, C]` += (the residual stream), dweight `[C]` +=; `dx_copy` `[T, C]`, when given,
/// overwritten with the new dx.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<F: Real>(
    dx: &mut [F],
    dx_copy: Option<&mut [F]>,
    dweight: &mut [F],
    dout: &[F],
    x: &[F],
    weight: &[F],
    rstd: &[F],
    c: usize,
) {
    if c == 0 {
        return;
    }
    let inv_c = F::one() / F::from(c).unwrap();
    // dx, one row per element of the iterator; each row also adds into its block's partial.
    let partials: Vec<Vec<F>> = dx
        .par_chunks_mut(ROWS * c)
        .zip(dout.par_chunks(ROWS * c))
        .zip(x.par_chunks(ROWS * c))
        .zip(rstd.par_chunks(ROWS))
        .map(|(((dx, g), x), rstd)| {
            let mut dw = vec![F::zero(); c];
            for (((dx, g), x), &rs) in dx
                .chunks_exact_mut(c)
                .zip(g.chunks_exact(c))
                .zip(x.chunks_exact(c))
                .zip(rstd)
            {
                // sum_k g[k] w[k] x[k]
                let dot = g
                    .iter()
                    .zip(weight)
                    .zip(x)
                    .fold(F::zero(), |acc, ((&g, &w), &x)| acc + g * w * x);
                let k = rs * rs * rs * dot * inv_c;
                for i in 0..c {
                    dx[i] = dx[i] + rs * g[i] * weight[i] - k * x[i];
                    dw[i] = dw[i] + g[i] * x[i] * rs;
                }
            }
            dw
        })
        .collect();
    for p in &partials {
        for (d, p) in dweight.iter_mut().zip(p) {
            *d = *d + *p;
        }
    }
    // The CPU's buffers are all one precision, so the copy is exact; a second pass here, where
    // the CUDA kernel stores it from registers.
    if let Some(cp) = dx_copy {
        cp.copy_from_slice(dx);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn rmsnorm_gradients_match_finite_differences() {
        let mut rng = rng(20);
        // T = 2 * ROWS + 3: several reduction blocks, the last one ragged.
        let (t, c) = (2 * ROWS + 3, 5);
        let x = randn(&mut rng, t * c);
        let weight = randn(&mut rng, c);
        let g = randn(&mut rng, t * c);
        let eps = 1e-5;
        let f = |x: &[f64], w: &[f64]| {
            let mut out = vec![0.0; t * c];
            let mut rstd = vec![0.0; t];
            rmsnorm_forward(&mut out, &mut rstd, x, w, c, eps);
            dot(&out, &g)
        };
        let mut out = vec![0.0; t * c];
        let mut rstd = vec![0.0; t];
        rmsnorm_forward(&mut out, &mut rstd, &x, &weight, c, eps);
        let mut dx = vec![0.0; t * c];
        let mut dw = vec![0.0; c];
        rmsnorm_backward(&mut dx, None, &mut dw, &g, &x, &weight, &rstd, c);
        check_grad("rmsnorm dx", &dx, &x, |xp| f(xp, &weight));
        check_grad("rmsnorm dweight", &dw, &weight, |wp| f(&x, wp));
    }
}
