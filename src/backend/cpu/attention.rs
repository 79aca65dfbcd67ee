//! Causal varlen attention with GQA over packed documents.
//!
//! Shapes: qkv `[T, QKV]`, each row `[q: H D | k: Hkv D | v: Hkv D]`; out, dout `[T, H D]`;
//! lse `[H, T]`; cu_seqlens `[N + 1]` (0 = cu[0] <= ... <= cu[N] = T). Query head h reads kv
//! head g = h / (H / Hkv). Within a document of length L (rows s..s+L), for query i and
//! key j <= i (never a key of another document), with scale = 1 / sqrt(D):
//!
//! Forward:  S[i, j] = scale q_i . k_j,  lse[i] = log sum_{j<=i} exp S[i, j],
//!           P[i, j] = exp(S[i, j] - lse[i]),  out_i = sum_j P[i, j] v_j     out, lse overwritten
//! Backward: P recomputed from lse;  dP[i, j] = dout_i . v_j;  Di = dout_i . out_i;
//!           dS[i, j] = P[i, j] (dP[i, j] - Di);
//!           dq_i = scale sum_j dS[i, j] k_j;   dk_j = scale sum_i dS[i, j] q_i;
//!           dv_j = sum_i P[i, j] dout_i;     dk, dv summed over the H / Hkv query heads of g.
//!                                                                        dqkv overwritten
//!
//! Blocking: queries go in blocks of `QB` rows; a block's scores against keys 0..i1 (i1 the
//! block's end) are one GEMM, masked above the diagonal, so nothing `[L, L]` is ever stored.
//! Parallelism: one rayon task per (document, kv head) owns that document's out/lse/dq of the
//! kv head's query heads and its dk/dv, accumulating in a fixed order (heads ascending, query
//! blocks ascending); the tasks' results are then copied into place in task order. No float
//! is ever added to by two tasks, so the results are bitwise reproducible.
//! k, v and q are read through strided views of qkv: matrixmultiply packs its operands, so
//! gathering them into contiguous buffers first would only add a copy.
//! Cost: the GEMMs (about 2 L^2 D flops per head forward, 2.5x that backward) dominate at
//! D = 32; exp is second (see `exp.rs`).

use rayon::prelude::*;

use super::exp::{max_of, sum_of};
use super::matmul::{gemm, MatRef};
use super::Real;
use crate::backend::AttnDims;

/// Query rows per block.
pub const QB: usize = 64;

/// One unit of work: document rows `start..start + len`, kv head `g`.
#[derive(Clone, Copy)]
struct Task {
    start: usize,
    len: usize,
    g: usize,
}

/// Tasks in (document, kv head) order; empty documents have none.
fn tasks(cu: &[i32], hkv: usize) -> Vec<Task> {
    cu.windows(2)
        .filter(|w| w[1] > w[0])
        .flat_map(|w| {
            let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            (0..hkv).map(move |g| Task { start, len, g })
        })
        .collect()
}

/// Fills `p[r * i1 ..][.. i1]` for query rows i0..i1 of a block with the scaled scores
/// q_i . k_j of keys 0..i1.
#[allow(clippy::too_many_arguments)]
fn scores<F: Real>(
    p: &mut [F],
    q: MatRef<'_, F>,
    kt: MatRef<'_, F>,
    i0: usize,
    i1: usize,
    d: usize,
    scale: F,
) {
    let qb = MatRef {
        data: &q.data[i0 * q.rs..],
        ..q
    };
    gemm(i1 - i0, d, i1, scale, qb, kt, F::zero(), p, i1);
}

/// out `[T, H D]` and lse `[H, T]` overwritten. `cu` must be validated.
pub fn attention_forward<F: Real>(
    out: &mut [F],
    lse: &mut [F],
    qkv: &[F],
    cu: &[i32],
    dims: AttnDims,
) {
    let AttnDims { t, h, hkv, d, .. } = dims;
    let (w, hd, hpg) = (dims.qkv_width(), h * d, h / hkv);
    let scale = F::one() / F::from(d).unwrap().sqrt();
    let tasks = tasks(cu, hkv);
    let results: Vec<(Vec<F>, Vec<F>)> = tasks
        .par_iter()
        .map(|&Task { start, len: l, g }| {
            let rows = &qkv[start * w..(start + l) * w];
            let kt = MatRef::cols(&rows[(h + g) * d..], w);
            let v = MatRef::rows(&rows[(h + hkv + g) * d..], w);
            let mut o = vec![F::zero(); hpg * l * d];
            let mut lse = vec![F::zero(); hpg * l];
            let mut p = vec![F::zero(); QB.min(l) * l];
            for hh in 0..hpg {
                let q = MatRef::rows(&rows[(g * hpg + hh) * d..], w);
                for i0 in (0..l).step_by(QB) {
                    let i1 = (i0 + QB).min(l);
                    scores(&mut p, q, kt, i0, i1, d, scale);
                    // Row softmax over keys 0..=i, zero beyond the diagonal.
                    for (r, row) in p[..(i1 - i0) * i1].chunks_exact_mut(i1).enumerate() {
                        let i = i0 + r;
                        let (seen, masked) = row.split_at_mut(i + 1);
                        let max = max_of(seen);
                        for s in seen.iter_mut() {
                            *s = (*s - max).fexp();
                        }
                        let sum = sum_of(seen);
                        let inv = F::one() / sum;
                        for s in seen.iter_mut() {
                            *s = *s * inv;
                        }
                        masked.fill(F::zero());
                        lse[hh * l + i] = max + sum.ln();
                    }
                    // out block = P v
                    gemm(
                        i1 - i0,
                        i1,
                        d,
                        F::one(),
                        MatRef::rows(&p, i1),
                        v,
                        F::zero(),
                        &mut o[(hh * l + i0) * d..],
                        d,
                    );
                }
            }
            (o, lse)
        })
        .collect();
    for (&Task { start, len: l, g }, (o, ls)) in tasks.iter().zip(&results) {
        for hh in 0..hpg {
            let hq = g * hpg + hh;
            for i in 0..l {
                out[(start + i) * hd + hq * d..][..d].copy_from_slice(&o[(hh * l + i) * d..][..d]);
            }
            lse[hq * t + start..][..l].copy_from_slice(&ls[hh * l..][..l]);
        }
    }
}

/// dqkv `[T, QKV]` overwritten. `cu` must be validated.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    cu: &[i32],
    dims: AttnDims,
) {
    let AttnDims { t, h, hkv, d, .. } = dims;
    let (w, hd, hpg) = (dims.qkv_width(), h * d, h / hkv);
    let scale = F::one() / F::from(d).unwrap().sqrt();
    let tasks = tasks(cu, hkv);
    // Per task: dq of its query heads [hpg, L, D], then dk [L, D], then dv [L, D].
    let results: Vec<Vec<F>> = tasks
        .par_iter()
        .map(|&Task { start, len: l, g }| {
            let rows = &qkv[start * w..(start + l) * w];
            let k = MatRef::rows(&rows[(h + g) * d..], w);
            let kt = MatRef::cols(&rows[(h + g) * d..], w);
            let vt = MatRef::cols(&rows[(h + hkv + g) * d..], w);
            let mut grads = vec![F::zero(); (hpg + 2) * l * d];
            let (dq, dkv) = grads.split_at_mut(hpg * l * d);
            let (dk, dv) = dkv.split_at_mut(l * d);
            let mut p = vec![F::zero(); QB.min(l) * l];
            let mut ds = vec![F::zero(); QB.min(l) * l];
            for hh in 0..hpg {
                let hq = g * hpg + hh;
                let q = MatRef::rows(&rows[hq * d..], w);
                let doh = &dout[start * hd + hq * d..];
                let oh = &out[start * hd + hq * d..];
                let lse_h = &lse[hq * t + start..][..l];
                for i0 in (0..l).step_by(QB) {
                    let i1 = (i0 + QB).min(l);
                    let bq = i1 - i0;
                    let do_blk = MatRef::rows(&doh[i0 * hd..], hd);
                    // P = exp(S - lse), zero beyond the diagonal.
                    scores(&mut p, q, kt, i0, i1, d, scale);
                    for (r, row) in p[..bq * i1].chunks_exact_mut(i1).enumerate() {
                        let i = i0 + r;
                        let (seen, masked) = row.split_at_mut(i + 1);
                        for s in seen.iter_mut() {
                            *s = (*s - lse_h[i]).fexp();
                        }
                        masked.fill(F::zero());
                    }
                    // dP = dout v^T, then dS = P (dP - Di) in place.
                    gemm(bq, d, i1, F::one(), do_blk, vt, F::zero(), &mut ds, i1);
                    for (r, (dsr, pr)) in ds[..bq * i1]
                        .chunks_exact_mut(i1)
                        .zip(p.chunks_exact(i1))
                        .enumerate()
                    {
                        let i = i0 + r;
                        let di = doh[i * hd..][..d]
                            .iter()
                            .zip(&oh[i * hd..][..d])
                            .fold(F::zero(), |acc, (&a, &b)| acc + a * b);
                        let (seen, masked) = dsr.split_at_mut(i + 1);
                        for (s, &pv) in seen.iter_mut().zip(pr) {
                            *s = pv * (*s - di);
                        }
                        masked.fill(F::zero());
                    }
                    // dq block = scale dS k (overwrite); dk += scale dS^T q; dv += P^T dout.
                    gemm(
                        bq,
                        i1,
                        d,
                        scale,
                        MatRef::rows(&ds, i1),
                        k,
                        F::zero(),
                        &mut dq[(hh * l + i0) * d..],
                        d,
                    );
                    let q_blk = MatRef::rows(&q.data[i0 * w..], w);
                    gemm(
                        i1,
                        bq,
                        d,
                        scale,
                        MatRef::cols(&ds, i1),
                        q_blk,
                        F::one(),
                        dk,
                        d,
                    );
                    gemm(
                        i1,
                        bq,
                        d,
                        F::one(),
                        MatRef::cols(&p, i1),
                        do_blk,
                        F::one(),
                        dv,
                        d,
                    );
                }
            }
            grads
        })
        .collect();
    for (&Task { start, len: l, g }, grads) in tasks.iter().zip(&results) {
        let (dq, dkv) = grads.split_at(hpg * l * d);
        let (dk, dv) = dkv.split_at(l * d);
        for i in 0..l {
            let row = &mut dqkv[(start + i) * w..][..w];
            for hh in 0..hpg {
                row[(g * hpg + hh) * d..][..d].copy_from_slice(&dq[(hh * l + i) * d..][..d]);
            }
            row[(h + g) * d..][..d].copy_from_slice(&dk[i * d..][..d]);
            row[(h + hkv + g) * d..][..d].copy_from_slice(&dv[i * d..][..d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn dims_for(lens: &[usize], h: usize, hkv: usize, d: usize) -> (AttnDims, Vec<i32>) {
        let mut cu = vec![0i32];
        for &l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let dims = AttnDims {
            t: lens.iter().sum(),
            h,
            hkv,
            d,
            n_docs: lens.len(),
            max_seqlen: lens.iter().copied().max().unwrap_or(0),
        };
        (dims, cu)
    }

    /// Dense reference: full [T, T] scores with a block-diagonal causal mask.
    fn dense(qkv: &[f64], cu: &[i32], dims: AttnDims) -> (Vec<f64>, Vec<f64>) {
        let AttnDims { t, h, hkv, d, .. } = dims;
        let w = dims.qkv_width();
        let doc = |i: usize| cu.iter().rposition(|&c| c as usize <= i).unwrap();
        let mut out = vec![0.0; t * h * d];
        let mut lse = vec![0.0; h * t];
        for hq in 0..h {
            let g = hq / (h / hkv);
            for i in 0..t {
                let q = &qkv[i * w + hq * d..][..d];
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        if j <= i && doc(j) == doc(i) {
                            let k = &qkv[j * w + (h + g) * d..][..d];
                            dot(q, k) / (d as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[hq * t + i] = m + z.ln();
                for (j, sj) in s.iter().enumerate() {
                    let pj = (sj - m).exp() / z;
                    for c in 0..d {
                        out[i * h * d + hq * d + c] += pj * qkv[j * w + (h + hkv + g) * d + c];
                    }
                }
            }
        }
        (out, lse)
    }

    /// Ragged documents: a length-1 document, one longer than a query block, T = 89.
    const LENS: [usize; 5] = [1, QB + 6, 5, 1, 12];

    #[test]
    fn attention_matches_dense_reference_with_gqa() {
        for &(h, hkv) in &[(4, 2), (4, 4), (3, 1)] {
            let mut rng = rng(50 + h as u64 * 10 + hkv as u64);
            let (dims, cu) = dims_for(&LENS, h, hkv, 4);
            let qkv = randn(&mut rng, dims.t * dims.qkv_width());
            let mut out = vec![f64::NAN; dims.t * h * dims.d];
            let mut lse = vec![f64::NAN; h * dims.t];
            attention_forward(&mut out, &mut lse, &qkv, &cu, dims);
            let (want_out, want_lse) = dense(&qkv, &cu, dims);
            assert_close("attention out", &out, &want_out, 1e-12);
            assert_close("attention lse", &lse, &want_lse, 1e-12);
        }
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        for &(h, hkv) in &[(4, 2), (2, 2)] {
            let mut rng = rng(60 + h as u64 * 10 + hkv as u64);
            let (dims, cu) = dims_for(&LENS, h, hkv, 4);
            let (t, w) = (dims.t, dims.qkv_width());
            let qkv = randn(&mut rng, t * w);
            let g = randn(&mut rng, t * h * dims.d);
            let f = |x: &[f64]| {
                let mut out = vec![0.0; t * h * dims.d];
                let mut lse = vec![0.0; h * t];
                attention_forward(&mut out, &mut lse, x, &cu, dims);
                dot(&out, &g)
            };
            let mut out = vec![0.0; t * h * dims.d];
            let mut lse = vec![0.0; h * t];
            attention_forward(&mut out, &mut lse, &qkv, &cu, dims);
            let mut dqkv = vec![f64::NAN; t * w];
            attention_backward(&mut dqkv, &g, &qkv, &out, &lse, &cu, dims);
            check_grad("attention dqkv", &dqkv, &qkv, f);
        }
    }

    /// No cross-document leakage: the packed batch gives, bitwise, what each document gives
    /// when run alone (f32, the precision the backend trains in).
    #[test]
    fn attention_packed_equals_documents_alone() {
        let mut rng = rng(70);
        let (dims, cu) = dims_for(&LENS, 4, 2, 8);
        let (t, w, hd) = (dims.t, dims.qkv_width(), 4 * 8);
        let qkv: Vec<f32> = randn(&mut rng, t * w).iter().map(|&x| x as f32).collect();
        let dout: Vec<f32> = randn(&mut rng, t * hd).iter().map(|&x| x as f32).collect();
        let mut out = vec![0f32; t * hd];
        let mut lse = vec![0f32; 4 * t];
        attention_forward(&mut out, &mut lse, &qkv, &cu, dims);
        let mut dqkv = vec![0f32; t * w];
        attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cu, dims);
        for (n, &l) in LENS.iter().enumerate() {
            let s = cu[n] as usize;
            let (one, cu1) = dims_for(&[l], 4, 2, 8);
            let q1 = &qkv[s * w..(s + l) * w];
            let do1 = &dout[s * hd..(s + l) * hd];
            let mut o1 = vec![0f32; l * hd];
            let mut lse1 = vec![0f32; 4 * l];
            attention_forward(&mut o1, &mut lse1, q1, &cu1, one);
            let mut dq1 = vec![0f32; l * w];
            attention_backward(&mut dq1, do1, q1, &o1, &lse1, &cu1, one);
            assert_eq!(&out[s * hd..(s + l) * hd], &o1[..], "out of document {n}");
            assert_eq!(&dqkv[s * w..(s + l) * w], &dq1[..], "dqkv of document {n}");
            for hq in 0..4 {
                assert_eq!(
                    &lse[hq * t + s..][..l],
                    &lse1[hq * l..][..l],
                    "lse of document {n}"
                );
            }
        }
    }
}
