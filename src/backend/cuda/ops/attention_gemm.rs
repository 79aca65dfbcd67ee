//! Varlen causal attention with GQA, the GEMM path: strided-batched cuBLAS GEMMs over heads,
//! one span of documents at a time, with row kernels (`kernels/attention.cu`) for the masked
//! softmax. `attention.rs` dispatches: head dims 64 and 128 go to the flash kernels when
//! `flash_attention::use_flash` says so (see there); this path serves every other shape, on f32
//! buffers (`attention.rs` stages other precisions through f32).
//!
//! Shapes: qkv `[T, W]`, W = (H + 2 Hkv) D, row `[q: H D | k: Hkv D | v: Hkv D]`; out, dout
//! `[T, H D]`; lse `[H, T]`; dqkv `[T, W]`. G = H / Hkv; query head h reads kv head h / G.
//!
//! Spans: the host walks `cu_seqlens` (its mirror `CudaIdx::host`, no device sync) and runs
//! consecutive non-empty documents together into spans of at most `MERGE` rows (a longer
//! document is a span alone), so a batch of short documents costs few launches. Within a span
//! (rows s..s+L) the scores are computed for the whole L x L square and the row kernels zero
//! every entry that is not (same document, key <= query); the GEMMs reading P or dS then add
//! exact zeros for them, so no document sees another.
//!
//! Per-head operands as row-major matrices for `CudaBackend::gemm` (pointer, ld; the batch
//! runs over heads h0..h0+nh, stride D for every qkv-like operand):
//!   Q_h  [L, D]  qkv + s W + h D,      ld W
//!   K_h  [L, D]  kb + s ldkv + h D,    ld ldkv   (G = 1: kb = qkv + H D, ldkv = W;
//!   V_h  [L, D]  vb + s ldkv + h D,    ld ldkv    G > 1: kb, vb = kx, vx [T, H D] expanded
//!                                                 per query head by `attn_expand_kv`, ldkv = H D)
//!   O_h, dO_h [L, D]  out/dout + s HD + h D, ld H D
//!   S_h, P_h, dP_h, dS_h [L, L]  scratch + (h - h0) L^2, ld L (batch stride L^2)
//! Forward:  S = scale Q K^T (alpha = scale);  softmax rows -> P, lse;  O = P V.
//! Backward: S = scale Q K^T;  dP = dO V^T;  row kernel: P = exp(S - lse), dS = P (dP - Di),
//!           Di = dO_i . O_i;  dV = P^T dO;  dQ = scale dS K;  dK = scale dS^T Q.
//!           G = 1: dQ, dK, dV go straight into dqkv (beta 0: every element is written once).
//!           G > 1: dK, dV per query head into dkx, dvx [T, H D], then `attn_reduce_dkv` sums
//!           the G heads of each kv head into dqkv.
//! Scratch: [nh, Lmax, Lmax] f32 (one buffer forward, two backward), Lmax the longest span;
//! heads go in chunks of nh so each buffer stays within `SCRATCH_ELEMS` (always at least one
//! head). G > 1 adds 2 [T, H D] buffers forward and 4 backward. All allocated per call
//! (stream-ordered allocations, freed on the stream when the call returns).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::need;
use crate::backend::cuda::gemm::Mat;
use crate::backend::cuda::{drv, launch, CudaBackend, CudaIdx};
use crate::backend::{AttnDims, BackendError};

/// Consecutive documents are run together into spans of at most this many rows.
const MERGE: usize = 256;
/// Most f32 elements of one scores scratch buffer (2 GiB) unless a single head needs more.
const SCRATCH_ELEMS: usize = 1 << 29;

#[cfg(test)]
thread_local! {
    /// The cap in unit tests: small, so the GPU test runs the head chunking.
    static TEST_SCRATCH: std::cell::Cell<usize> = const { std::cell::Cell::new(1 << 16) };
}

fn scratch_cap() -> usize {
    #[cfg(test)]
    return TEST_SCRATCH.with(|c| c.get());
    #[cfg(not(test))]
    SCRATCH_ELEMS
}
/// Rows (warps) per block of the row kernels; must match ATTN_ROWS_PER_BLOCK.
const ROWS_PER_BLOCK: usize = 4;

fn shape(op: &'static str, message: String) -> BackendError {
    BackendError::Shape { op, message }
}

/// Product of `dims`, or a shape error on overflow.
pub(super) fn prod(op: &'static str, dims: &[usize]) -> Result<usize, BackendError> {
    dims.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| shape(op, format!("sizes {dims:?} overflow")))
}

fn to_i32(op: &'static str, what: &str, x: usize) -> Result<i32, BackendError> {
    i32::try_from(x).map_err(|_| shape(op, format!("{what} = {x} does not fit in i32")))
}

/// Rows s..s+len of the packed batch: documents n_lo..n_hi (cu[n_lo] = s, cu[n_hi] = s + len).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    s: usize,
    len: usize,
    n_lo: usize,
    n_hi: usize,
}

/// Validate the head dims and `cu_seqlens` (as the CPU backend does) and group the non-empty
/// documents into spans.
fn check(op: &'static str, dims: &AttnDims, cu: &CudaIdx) -> Result<Vec<Span>, BackendError> {
    let AttnDims {
        t,
        h,
        hkv,
        d,
        n_docs,
        max_seqlen: _,
    } = *dims;
    if h == 0 || hkv == 0 || d == 0 || !h.is_multiple_of(hkv) {
        return Err(shape(
            op,
            format!("need H, Hkv, D > 0 with Hkv dividing H, got H = {h}, Hkv = {hkv}, D = {d}"),
        ));
    }
    prod(op, &[h + 2 * hkv, d, t.max(1)])?;
    let n1 = n_docs
        .checked_add(1)
        .ok_or_else(|| shape(op, "n_docs overflows".into()))?;
    need(op, "cu_seqlens [N + 1] (uploaded)", cu.host.len(), n1)?;
    need(op, "cu_seqlens [N + 1]", cu.dev.len(), n1)?;
    to_i32(op, "N + 1", n1)?;
    crate::backend::check_cu_seqlens(op, &cu.host, dims)?;
    let cu = &cu.host[..n1];
    Ok(spans(cu))
}

/// Greedy grouping of consecutive non-empty documents into spans of at most `MERGE` rows.
fn spans(cu: &[i32]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (n, w) in cu.windows(2).enumerate() {
        let (a, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(sp) if sp.len + len <= MERGE && sp.s + sp.len == a => {
                sp.len += len;
                sp.n_hi = n + 1;
            }
            _ => out.push(Span {
                s: a,
                len,
                n_lo: n,
                n_hi: n + 1,
            }),
        }
    }
    out
}

/// Heads per chunk and scratch elements per buffer for these spans.
fn head_plan(spans: &[Span], h: usize, cap: usize) -> (usize, usize) {
    let lmax = spans.iter().map(|sp| sp.len).max().unwrap_or(1);
    let l2 = lmax * lmax;
    let hc = (cap / l2).clamp(1, h.min(65535));
    (hc, hc * l2)
}

/// `n` uninitialised f32 on the stream (every use below overwrites before it reads).
fn scratch(be: &CudaBackend, n: usize, what: &'static str) -> Result<CudaSlice<f32>, BackendError> {
    // SAFETY: the memory is written (GEMM with beta 0, or a kernel) before it is read.
    unsafe { be.stream.alloc::<f32>(n.max(1)) }.map_err(drv(what))
}

/// Grid-stride launch over `n` items.
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per (span row, head): grid (ceil(L / 4), nh), 128 threads.
fn rows_cfg(len: usize, nh: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (len.div_ceil(ROWS_PER_BLOCK) as u32, nh as u32, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// kx, vx `[T, H D]`: k and v repeated for each of the G query heads of a kv head.
fn expand_kv(
    be: &CudaBackend,
    qkv: &CudaSlice<f32>,
    dims: &AttnDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), BackendError> {
    let n = dims.t * dims.h * dims.d;
    let mut kx = scratch(be, n, "attention kx")?;
    let mut vx = scratch(be, n, "attention vx")?;
    let (t32, h32, hkv32, d32) = (dims.t as i32, dims.h as i32, dims.hkv as i32, dims.d as i32);
    launch(be, "attn_expand_kv", grid_stride(n), |a| {
        a.arg(&mut kx)
            .arg(&mut vx)
            .arg(qkv)
            .arg(&t32)
            .arg(&h32)
            .arg(&hkv32)
            .arg(&d32);
    })?;
    Ok((kx, vx))
}

/// The GEMM path on f32 buffers: out `[T, H D]` and lse `[H, T]` overwritten.
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    qkv: &CudaSlice<f32>,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_forward";
    let spans = check(OP, &dims, cu_seqlens)?;
    let AttnDims { t, h, hkv, d, .. } = dims;
    let (w, hd, g) = (dims.qkv_width(), h * d, h / hkv);
    need(OP, "out [T, H D]", out.len(), prod(OP, &[t, hd])?)?;
    need(OP, "lse [H, T]", lse.len(), prod(OP, &[h, t])?)?;
    need(OP, "qkv [T, QKV]", qkv.len(), prod(OP, &[t, w])?)?;
    if spans.is_empty() {
        return Ok(());
    }
    let scale = 1.0 / (d as f32).sqrt();
    let expanded = if g > 1 {
        Some(expand_kv(be, qkv, &dims)?)
    } else {
        None
    };
    let pq = be.ptr(qkv);
    // K_h row r at kb + r ldkv + h D (see the module doc).
    let (kb, vb, ldkv) = match &expanded {
        Some((kx, vx)) => (be.ptr(kx), be.ptr(vx), hd),
        None => {
            let m = Mat::new(pq, w);
            (m.offset(h * d).ptr, m.offset((h + hkv) * d).ptr, w)
        }
    };
    let (hc, elems) = head_plan(&spans, h, scratch_cap());
    let mut sc = scratch(be, elems, "attention scores")?;
    let (psc, po) = (be.ptr(&sc), be.ptr(out));
    let t32 = t as i32;
    for sp in &spans {
        let (s, ls) = (sp.s, sp.len);
        let l2 = ls * ls;
        let (n_lo, n_hi, s32, l32) = (sp.n_lo as i32, sp.n_hi as i32, s as i32, ls as i32);
        for h0 in (0..h).step_by(hc) {
            let nh = hc.min(h - h0);
            let q = Mat::batched(pq, w, d).offset(s * w + h0 * d);
            let k = Mat::batched(kb, ldkv, d).offset(s * ldkv + h0 * d);
            let v = Mat::batched(vb, ldkv, d).offset(s * ldkv + h0 * d);
            let o = Mat::batched(po, hd, d).offset(s * hd + h0 * d);
            let p = Mat::batched(psc, ls, l2);
            // S_h [L, L] = scale Q_h [L, D] K_h^T
            be.gemm(false, true, ls, ls, d, scale, q, k, 0.0, p, nh)?;
            let h032 = h0 as i32;
            launch(be, "attn_softmax_fwd", rows_cfg(ls, nh), |a| {
                a.arg(&mut sc)
                    .arg(&mut *lse)
                    .arg(&cu_seqlens.dev)
                    .arg(&n_lo)
                    .arg(&n_hi)
                    .arg(&s32)
                    .arg(&l32)
                    .arg(&h032)
                    .arg(&t32);
            })?;
            // O_h [L, D] = P_h [L, L] V_h [L, D]
            be.gemm(false, false, ls, d, ls, 1.0, p, v, 0.0, o, nh)?;
        }
    }
    Ok(())
}

/// The GEMM path on f32 buffers: dqkv `[T, QKV]` overwritten; dk, dv summed over the G query
/// heads of each kv head.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dqkv: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    qkv: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward";
    let spans = check(OP, &dims, cu_seqlens)?;
    let AttnDims { t, h, hkv, d, .. } = dims;
    let (w, hd, g) = (dims.qkv_width(), h * d, h / hkv);
    need(OP, "dqkv [T, QKV]", dqkv.len(), prod(OP, &[t, w])?)?;
    need(OP, "dout [T, H D]", dout.len(), prod(OP, &[t, hd])?)?;
    need(OP, "qkv [T, QKV]", qkv.len(), prod(OP, &[t, w])?)?;
    need(OP, "out [T, H D]", out.len(), prod(OP, &[t, hd])?)?;
    need(OP, "lse [H, T]", lse.len(), prod(OP, &[h, t])?)?;
    if spans.is_empty() {
        return Ok(());
    }
    let scale = 1.0 / (d as f32).sqrt();
    let (pq, pdq) = (be.ptr(qkv), be.ptr(dqkv));
    let expanded = if g > 1 {
        Some(expand_kv(be, qkv, &dims)?)
    } else {
        None
    };
    // Per-query-head dk, dv (G > 1 only), written by the GEMMs, summed by attn_reduce_dkv.
    let dkv_x = if g > 1 {
        let n = t * hd;
        Some((
            scratch(be, n, "attention dkx")?,
            scratch(be, n, "attention dvx")?,
        ))
    } else {
        None
    };
    let (kb, vb, ldkv) = match &expanded {
        Some((kx, vx)) => (be.ptr(kx), be.ptr(vx), hd),
        None => {
            let m = Mat::new(pq, w);
            (m.offset(h * d).ptr, m.offset((h + hkv) * d).ptr, w)
        }
    };
    // dK_h row r at dkb + r lddkv + h D (G = 1: dqkv's k columns; G > 1: dkx).
    let (dkb, dvb, lddkv) = match &dkv_x {
        Some((dkx, dvx)) => (be.ptr(dkx), be.ptr(dvx), hd),
        None => {
            let m = Mat::new(pdq, w);
            (m.offset(h * d).ptr, m.offset((h + hkv) * d).ptr, w)
        }
    };
    let (hc, elems) = head_plan(&spans, h, scratch_cap());
    let mut sa = scratch(be, elems, "attention scores")?;
    let mut sb = scratch(be, elems, "attention dscores")?;
    let (pa, pb, pdo) = (be.ptr(&sa), be.ptr(&sb), be.ptr(dout));
    let (t32, h32, d32) = (t as i32, h as i32, d as i32);
    for sp in &spans {
        let (s, ls) = (sp.s, sp.len);
        let l2 = ls * ls;
        let (n_lo, n_hi, s32, l32) = (sp.n_lo as i32, sp.n_hi as i32, s as i32, ls as i32);
        for h0 in (0..h).step_by(hc) {
            let nh = hc.min(h - h0);
            let q = Mat::batched(pq, w, d).offset(s * w + h0 * d);
            let k = Mat::batched(kb, ldkv, d).offset(s * ldkv + h0 * d);
            let v = Mat::batched(vb, ldkv, d).offset(s * ldkv + h0 * d);
            let d_o = Mat::batched(pdo, hd, d).offset(s * hd + h0 * d);
            let dq = Mat::batched(pdq, w, d).offset(s * w + h0 * d);
            let dk = Mat::batched(dkb, lddkv, d).offset(s * lddkv + h0 * d);
            let dv = Mat::batched(dvb, lddkv, d).offset(s * lddkv + h0 * d);
            let a_p = Mat::batched(pa, ls, l2);
            let b_ds = Mat::batched(pb, ls, l2);
            // S_h [L, L] = scale Q_h K_h^T;  dP_h [L, L] = dO_h [L, D] V_h^T
            be.gemm(false, true, ls, ls, d, scale, q, k, 0.0, a_p, nh)?;
            be.gemm(false, true, ls, ls, d, 1.0, d_o, v, 0.0, b_ds, nh)?;
            let h032 = h0 as i32;
            launch(be, "attn_softmax_bwd", rows_cfg(ls, nh), |a| {
                a.arg(&mut sa)
                    .arg(&mut sb)
                    .arg(lse)
                    .arg(out)
                    .arg(dout)
                    .arg(&cu_seqlens.dev)
                    .arg(&n_lo)
                    .arg(&n_hi)
                    .arg(&s32)
                    .arg(&l32)
                    .arg(&h032)
                    .arg(&t32)
                    .arg(&h32)
                    .arg(&d32);
            })?;
            // dV_h [L, D] = P_h^T dO_h;  dQ_h = scale dS_h K_h;  dK_h = scale dS_h^T Q_h
            be.gemm(true, false, ls, d, ls, 1.0, a_p, d_o, 0.0, dv, nh)?;
            be.gemm(false, false, ls, d, ls, scale, b_ds, k, 0.0, dq, nh)?;
            be.gemm(true, false, ls, d, ls, scale, b_ds, q, 0.0, dk, nh)?;
        }
    }
    if let Some((dkx, dvx)) = &dkv_x {
        let hkv32 = hkv as i32;
        launch(be, "attn_reduce_dkv", grid_stride(t * hkv * d), |a| {
            a.arg(&mut *dqkv)
                .arg(dkx)
                .arg(dvx)
                .arg(&t32)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&d32);
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_short_documents_and_skip_empty_ones() {
        let cu = [0, 1, 1, 101, 400, 450, 450, 500, 760];
        let got = spans(&cu);
        let want = [
            Span {
                s: 0,
                len: 101,
                n_lo: 0,
                n_hi: 3,
            },
            Span {
                s: 101,
                len: 299,
                n_lo: 3,
                n_hi: 4,
            },
            Span {
                s: 400,
                len: 100,
                n_lo: 4,
                n_hi: 7,
            },
            Span {
                s: 500,
                len: 260,
                n_lo: 7,
                n_hi: 8,
            },
        ];
        assert_eq!(got, want);
        for sp in &got {
            assert_eq!(cu[sp.n_lo] as usize, sp.s);
            assert_eq!(cu[sp.n_hi] as usize, sp.s + sp.len);
        }
        assert!(spans(&[0]).is_empty());
        assert!(spans(&[0, 0, 0]).is_empty());
    }

    #[test]
    fn head_chunks_bound_the_scratch() {
        let one = |len| {
            [Span {
                s: 0,
                len,
                n_lo: 0,
                n_hi: 1,
            }]
        };
        let cap = SCRATCH_ELEMS;
        assert_eq!(head_plan(&one(4096), 32, cap), (32, 32 * 4096 * 4096));
        assert_eq!(head_plan(&one(8192), 32, cap), (8, 8 * 8192 * 8192));
        assert_eq!(head_plan(&one(40000), 4, cap), (1, 40000 * 40000));
        assert_eq!(head_plan(&one(1), 12, cap), (12, 12));
        assert_eq!(head_plan(&one(100), 8, 1 << 16), (6, 6 * 100 * 100));
    }

    /// CUDA against the CPU reference, on a GPU only:
    /// `cargo test --lib cuda_attention -- --ignored` (with `PACKTRAIN_GEMM=f32` the
    /// tolerance is tight; bf16 GEMMs get a loose one). Outputs start as NaN, so every element
    /// must be written.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_attention_matches_cpu() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::cuda::{CudaBuf, GemmMode};
        use crate::backend::Backend;
        use rand::{Rng, SeedableRng};

        let be = CudaBackend::new(0).expect("a CUDA device");
        let cpu = CpuBackend::new();
        let tol = if be.gemm_mode == GemmMode::F32 {
            2e-4
        } else {
            3e-2
        };
        let cases: [(&[usize], usize, usize, usize); 4] = [
            // merged spans, an empty document, a 300-row span (1 head per chunk here), G = 4
            (&[1, 70, 5, 0, 1, 23, 300, 33, 2, 0], 8, 2, 64),
            (&[17], 4, 4, 32),
            // one 98-row span: heads in chunks of 6 and 2, G = 8, D not a power of two
            (&[90, 1, 7], 8, 1, 48),
            (&[1], 2, 1, 8),
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut randv =
            |n: usize, a: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-a..a)).collect() };
        for (lens, h, hkv, d) in cases {
            let mut cu = vec![0i32];
            for &l in lens {
                cu.push(cu.last().unwrap() + l as i32);
            }
            let t = *cu.last().unwrap() as usize;
            let dims = AttnDims {
                t,
                h,
                hkv,
                d,
                n_docs: lens.len(),
                max_seqlen: lens.iter().copied().max().unwrap(),
            };
            let w = dims.qkv_width();
            let qkv = randv(t * w, 2.0);
            let dout = randv(t * h * d, 1.0);
            // CPU reference.
            let mut out_c = vec![0f32; t * h * d];
            let mut lse_c = vec![0f32; h * t];
            let mut dqkv_c = vec![0f32; t * w];
            cpu.attention_forward(&mut out_c, &mut lse_c, &qkv, &cu, dims)
                .unwrap();
            cpu.attention_backward(&mut dqkv_c, &dout, &qkv, &out_c, &lse_c, &cu, dims)
                .unwrap();
            // CUDA.
            let up = |x: &[f32]| {
                let mut b = be.alloc(x.len()).unwrap();
                be.upload(&mut b, x).unwrap();
                b
            };
            let nan = |n: usize| up(&vec![f32::NAN; n]);
            let (qkv_g, dout_g) = (up(&qkv), up(&dout));
            let mut cu_g = be.alloc_idx(cu.len()).unwrap();
            be.upload_idx(&mut cu_g, &cu).unwrap();
            let (mut out_g, mut lse_g, mut dqkv_g) = (nan(t * h * d), nan(h * t), nan(t * w));
            be.attention_forward(&mut out_g, &mut lse_g, &qkv_g, &cu_g, dims)
                .unwrap();
            be.attention_backward(&mut dqkv_g, &dout_g, &qkv_g, &out_g, &lse_g, &cu_g, dims)
                .unwrap();
            let case = format!("lens {lens:?} H {h} Hkv {hkv} D {d}");
            let cmp = |what: &str, g: &CudaBuf, want: &[f32]| {
                let got = be.download(g, want.len()).unwrap();
                let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
                let (i, err) = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| {
                        if a.is_finite() {
                            (a - b).abs()
                        } else {
                            f32::INFINITY
                        }
                    })
                    .enumerate()
                    .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
                eprintln!("{case}: {what} max err {err:.3e} at {i} (scale {scale:.3})");
                assert!(
                    err <= tol * scale,
                    "{case}: {what}[{i}] = {} vs {}",
                    got[i],
                    want[i]
                );
            };
            cmp("out", &out_g, &out_c);
            cmp("lse", &lse_g, &lse_c);
            cmp("dqkv", &dqkv_g, &dqkv_c);
        }
        // Bad cu_seqlens are shape errors.
        let dims = AttnDims {
            t: 4,
            h: 2,
            hkv: 1,
            d: 8,
            n_docs: 2,
            max_seqlen: 3,
        };
        let qkv_g = be.alloc(4 * dims.qkv_width()).unwrap();
        let (mut out_g, mut lse_g) = (be.alloc(4 * 16).unwrap(), be.alloc(8).unwrap());
        for bad in [[0, 1, 3], [0, 4, 4], [1, 2, 4], [0, 3, 2]] {
            let mut cu_g = be.alloc_idx(3).unwrap();
            be.upload_idx(&mut cu_g, &bad).unwrap();
            let r = be.attention_forward(&mut out_g, &mut lse_g, &qkv_g, &cu_g, dims);
            assert!(
                matches!(r, Err(BackendError::Shape { .. })),
                "{bad:?}: {r:?}"
            );
        }
    }

    /// Timing on a GPU: `cargo test --lib cuda_attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_attention_timing() {
        use crate::backend::Backend;
        TEST_SCRATCH.with(|c| c.set(SCRATCH_ELEMS));
        let be = CudaBackend::new(0).expect("a CUDA device");
        let t = 16384usize;
        let cases: [(&str, Vec<usize>, usize, usize, usize); 4] = [
            ("4 x 4096, H 16/4, D 128", vec![4096; 4], 16, 4, 128),
            ("2 x 8192, H 16/4, D 128", vec![8192; 2], 16, 4, 128),
            (
                "~100-token docs, H 16/4, D 128",
                (0..t / 100).map(|_| 100).chain([t % 100]).collect(),
                16,
                4,
                128,
            ),
            ("16 x 1024, H 32/32, D 64", vec![1024; 16], 32, 32, 64),
        ];
        for (name, lens, h, hkv, d) in cases {
            let mut cu = vec![0i32];
            for &l in &lens {
                cu.push(cu.last().unwrap() + l as i32);
            }
            let dims = AttnDims {
                t,
                h,
                hkv,
                d,
                n_docs: lens.len(),
                max_seqlen: *lens.iter().max().unwrap(),
            };
            let w = dims.qkv_width();
            let x: Vec<f32> = (0..t * w)
                .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut qkv = be.alloc(t * w).unwrap();
            be.upload(&mut qkv, &x).unwrap();
            let mut cu_g = be.alloc_idx(cu.len()).unwrap();
            be.upload_idx(&mut cu_g, &cu).unwrap();
            let (mut out, mut lse) = (be.alloc(t * h * d).unwrap(), be.alloc(h * t).unwrap());
            let mut dqkv = be.alloc(t * w).unwrap();
            let dout = be.alloc(t * h * d).unwrap();
            let time = |f: &mut dyn FnMut()| {
                f();
                be.synchronize().unwrap();
                let t0 = std::time::Instant::now();
                for _ in 0..5 {
                    f();
                }
                be.synchronize().unwrap();
                t0.elapsed().as_secs_f64() / 5.0 * 1e3
            };
            let fwd = time(&mut || {
                be.attention_forward(&mut out, &mut lse, &qkv, &cu_g, dims)
                    .unwrap()
            });
            let bwd = time(&mut || {
                be.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cu_g, dims)
                    .unwrap()
            });
            // Useful (causal) flops: fwd 2 GEMMs, bwd 5, each L^2/2 D per head.
            let l2: f64 = lens.iter().map(|&l| (l * l) as f64).sum();
            let unit = l2 / 2.0 * d as f64 * h as f64 * 2.0;
            eprintln!(
                "{name}: fwd {fwd:.2} ms ({:.0} TFLOP/s), bwd {bwd:.2} ms ({:.0} TFLOP/s)",
                2.0 * unit / fwd / 1e9,
                5.0 * unit / bwd / 1e9
            );
        }
    }
}
