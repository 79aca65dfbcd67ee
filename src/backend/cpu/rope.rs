//! Rotary position embedding, Hugging Face "rotate_half" layout, in place on the fused qkv.
//!
//! Shapes: qkv `[T, QKV]` with each row `[q: H D | k: Hkv D | v: Hkv D]`; positions `[T]`;
//! inv_freq `[D/2]`. Each of the H + Hkv q and k heads is rotated; v is untouched.
//!
//! Forward, for each head x (D values) of row t and j in 0..D/2, with
//! a = positions[t] inv_freq[j], on the pair (x1, x2) = (x[j], x[j + D/2]):
//!     x[j]       = x1 cos a - x2 sin a
//!     x[j + D/2] = x2 cos a + x1 sin a
//! Backward: the transpose (a rotation by -a) applied to the pairs of dq and dk in dqkv:
//!     g[j]       = g1 cos a + g2 sin a
//!     g[j + D/2] = g2 cos a - g1 sin a

use rayon::prelude::*;

use super::Real;
use crate::backend::AttnDims;

/// Rows per rayon task.
const ROWS: usize = 64;

/// Rotates the q and k heads of every row by `sign * positions[t] * inv_freq[j]`.
fn rotate<F: Real>(qkv: &mut [F], positions: &[i32], inv_freq: &[F], dims: AttnDims, sign: F) {
    let (d, w) = (dims.d, dims.qkv_width());
    let half = d / 2;
    if half == 0 || w == 0 {
        return;
    }
    let rotated = (dims.h + dims.hkv) * d;
    qkv.par_chunks_mut(ROWS * w)
        .zip(positions.par_chunks(ROWS))
        .for_each(|(rows, pos)| {
            let mut cos = vec![F::zero(); half];
            let mut sin = vec![F::zero(); half];
            for (row, &p) in rows.chunks_exact_mut(w).zip(pos) {
                let p = F::from(p).unwrap();
                for j in 0..half {
                    let (s, c) = (p * inv_freq[j]).sin_cos();
                    cos[j] = c;
                    sin[j] = sign * s;
                }
                for head in row[..rotated].chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * cos[j] - b * sin[j];
                        x2[j] = b * cos[j] + a * sin[j];
                    }
                }
            }
        });
}

/// Rotates q and k of qkv `[T, QKV]` in place.
pub fn rope_forward<F: Real>(qkv: &mut [F], positions: &[i32], inv_freq: &[F], dims: AttnDims) {
    rotate(qkv, positions, inv_freq, dims, F::one());
}

/// Applies the inverse rotation to dq and dk of dqkv `[T, QKV]` in place.
pub fn rope_backward<F: Real>(dqkv: &mut [F], positions: &[i32], inv_freq: &[F], dims: AttnDims) {
    rotate(dqkv, positions, inv_freq, dims, -F::one());
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn rope_gradients_match_finite_differences() {
        let mut rng = rng(40);
        let dims = AttnDims {
            t: ROWS + 3,
            h: 4,
            hkv: 2,
            d: 6,
            n_docs: 1,
            max_seqlen: ROWS + 3,
        };
        let (t, w) = (dims.t, dims.qkv_width());
        let positions: Vec<i32> = (0..t as i32).map(|i| (i * 5) % 23).collect();
        let inv_freq: Vec<f64> = (0..dims.d / 2)
            .map(|j| 10000f64.powf(-2.0 * j as f64 / dims.d as f64))
            .collect();
        let qkv = randn(&mut rng, t * w);
        let g = randn(&mut rng, t * w);
        let mut dqkv = g.clone();
        rope_backward(&mut dqkv, &positions, &inv_freq, dims);
        check_grad("rope dqkv", &dqkv, &qkv, |x| {
            let mut y = x.to_vec();
            rope_forward(&mut y, &positions, &inv_freq, dims);
            dot(&y, &g)
        });
    }

    #[test]
    fn rope_leaves_v_alone_and_matches_rotate_half() {
        let mut rng = rng(41);
        let dims = AttnDims {
            t: 3,
            h: 2,
            hkv: 1,
            d: 4,
            n_docs: 1,
            max_seqlen: 3,
        };
        let w = dims.qkv_width();
        let positions = [0, 1, 7];
        let inv_freq = [1.0, 0.01];
        let qkv = randn(&mut rng, dims.t * w);
        let mut y = qkv.clone();
        rope_forward(&mut y, &positions, &inv_freq, dims);
        for t in 0..dims.t {
            for head in 0..dims.h + 2 * dims.hkv {
                let x = &qkv[t * w + head * 4..][..4];
                let got = &y[t * w + head * 4..][..4];
                let want: Vec<f64> = if head < dims.h + dims.hkv {
                    // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
                    let rh = [-x[2], -x[3], x[0], x[1]];
                    (0..4)
                        .map(|i| {
                            let a = positions[t] as f64 * inv_freq[i % 2];
                            x[i] * a.cos() + rh[i] * a.sin()
                        })
                        .collect()
                } else {
                    x.to_vec()
                };
                assert_close("rope", got, &want, 1e-14);
            }
        }
    }
}
