//! RoPE, in place on the q and k heads of the fused qkv buffer (kernels and math in
//! `rope.cu`); the backward is the inverse rotation. D % 16 == 0 with 16-byte aligned buffers
//! takes the `_vec8` kernels (a warp per row, 16-byte accesses), chosen from D and the
//! alignment only; they give bitwise the scalar kernels' results.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::elementwise::{dim_i32, grid_stride, prod, rows_cols, vec8_ok};
use super::need;
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, CudaIdx};
use crate::backend::{AttnDims, BackendError};

/// Warps (rows) per block of the `_vec8` kernels.
const ROW_WARPS: usize = 8;

/// Rotates q and k of qkv `[T, QKV]` in place by `positions[t] inv_freq[j]` (forward) or by
/// its negative (`inverse`: the backward, applied to dqkv).
pub fn apply(
    be: &CudaBackend,
    qkv: &mut CudaBuf,
    positions: &CudaIdx,
    inv_freq: &CudaBuf,
    dims: AttnDims,
    inverse: bool,
) -> Result<(), BackendError> {
    rotate(be, qkv, positions, inv_freq, dims, inverse, true)
}

/// The table of RoPE's cosines and sines for the flash backward that fuses RoPE's backward:
/// `[T, D/2]` (cos, sin) pairs, f32, of the angles `positions[t] inv_freq[j]` (kernel
/// `rope_table`: the values the rotation kernels compute). Allocated on the stream; it lives as
/// long as the caller keeps it (a launch that reads it may still be queued when it drops: the
/// stream-ordered free waits for it).
pub fn table(
    be: &CudaBackend,
    positions: &CudaIdx,
    inv_freq: &CudaBuf,
    dims: AttnDims,
) -> Result<CudaSlice<f32>, BackendError> {
    const OP: &str = "rope_table";
    let AttnDims { t, d, .. } = dims;
    if d == 0 || !d.is_multiple_of(2) {
        return Err(BackendError::Shape {
            op: OP,
            message: format!("head dim D = {d} must be even and non-zero"),
        });
    }
    need(OP, "positions [T]", positions.dev.len(), t)?;
    need(OP, "inv_freq [D/2]", inv_freq.len(), d / 2)?;
    // T D/2 pairs, two floats each.
    let n = prod(OP, &[t, d])?;
    // SAFETY: rope_table writes all T D/2 pairs before any kernel reads them.
    let mut tab = unsafe { be.stream.alloc::<f32>(n.max(2)) }.map_err(drv(OP))?;
    if t == 0 {
        return Ok(tab);
    }
    let (pairs, half) = ((n / 2) as i64, dim_i32(OP, "D/2", d / 2)?);
    let ti = be.ten(inv_freq);
    // Checked: the table holds T D/2 pairs; positions T; inv_freq D/2.
    launch(be, OP, grid_stride(n / 2), |a| {
        a.arg(&mut tab)
            .arg(&positions.dev)
            .arg(&ti)
            .arg(&pairs)
            .arg(&half);
    })?;
    Ok(tab)
}

/// [`apply`], with the `_vec8` kernels allowed or not (tests compare the two layouts).
fn rotate(
    be: &CudaBackend,
    qkv: &mut CudaBuf,
    positions: &CudaIdx,
    inv_freq: &CudaBuf,
    dims: AttnDims,
    inverse: bool,
    allow_vec8: bool,
) -> Result<(), BackendError> {
    let op = if inverse {
        "rope_backward"
    } else {
        "rope_forward"
    };
    let shape = |message: String| BackendError::Shape { op, message };
    let AttnDims { t, h, hkv, d, .. } = dims;
    if h == 0 || hkv == 0 || d == 0 || !h.is_multiple_of(hkv) {
        return Err(shape(format!(
            "H = {h}, Hkv = {hkv}, D = {d}: each must be non-zero and Hkv must divide H"
        )));
    }
    if !d.is_multiple_of(2) {
        return Err(shape(format!("head dim D = {d} must be even")));
    }
    let heads = hkv.checked_mul(2).and_then(|k| k.checked_add(h));
    let heads = heads.ok_or_else(|| shape(format!("H = {h} + 2 Hkv = {hkv} overflows")))?;
    let w = prod(op, &[heads, d])?;
    need(op, "positions [T]", positions.dev.len(), t)?;
    need(op, "inv_freq [D/2]", inv_freq.len(), d / 2)?;
    need(op, "qkv [T, QKV]", qkv.len(), prod(op, &[t, w])?)?;
    if t == 0 {
        return Ok(());
    }
    let t32 = dim_i32(op, "T", t)?;
    let nh32 = dim_i32(op, "H + Hkv", h + hkv)?;
    let w32 = dim_i32(op, "QKV", w)?;
    let d32 = dim_i32(op, "D", d)?;
    // `_vec8`: D/2 % 8 == 0 (so D, QKV and every row and head offset are multiples of 16
    // elements) and 16-byte aligned qkv and inv_freq: each lane's 8 elements of a half are
    // aligned 16-byte accesses in either precision. Never a question of dtype.
    let vec8 = allow_vec8 && vec8_ok(be, d / 2, &[qkv, inv_freq]);
    let (name, cfg) = if vec8 {
        let name = if inverse {
            "rope_backward_vec8"
        } else {
            "rope_forward_vec8"
        };
        // One warp per row; T fits an i32, so the grid fits a u32.
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(ROW_WARPS) as u32, 1, 1),
            block_dim: (32 * ROW_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        (name, cfg)
    } else {
        (op, rows_cols(op, t, d / 2)?)
    };
    // Checked: qkv holds T QKV with QKV = (H + 2 Hkv) D >= (H + Hkv) D, positions T,
    // inv_freq D/2; the kernels touch the first (H + Hkv) D columns of each of T rows (and,
    // for `_vec8`, only the aligned 8-element groups checked above).
    let (tq, ti) = (be.ten(qkv), be.ten(inv_freq));
    launch(be, name, cfg, |a| {
        a.arg(&tq)
            .arg(&positions.dev)
            .arg(&ti)
            .arg(&t32)
            .arg(&nh32)
            .arg(&w32)
            .arg(&d32);
    })
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::gpu_test::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::{CudaBackend, DType};
    use crate::backend::{AttnDims, Backend};

    fn dims(t: usize, h: usize, hkv: usize, d: usize) -> AttnDims {
        AttnDims {
            t,
            h,
            hkv,
            d,
            n_docs: 1,
            max_seqlen: t,
        }
    }

    /// Positions up to ~1e5 (large angles: the precise sincosf against libm, both within ~2
    /// ulp of the f32 angle) and the usual inverse frequencies for D.
    fn angles(t: usize, d: usize) -> (Vec<i32>, Vec<f32>) {
        let positions = (0..t as i32).map(|i| (i * 331) % 100_003).collect();
        let inv_freq = (0..d / 2)
            .map(|j| 10000f32.powf(-2.0 * j as f32 / d as f32))
            .collect();
        (positions, inv_freq)
    }

    /// CUDA against the CPU on a GPU only, D = 10 (D/2 = 5 threads; the scalar kernels).
    /// Tolerance 1e-5 relative.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rope_matches_cpu() {
        let (be, cpu, mut rng) = setup(53);
        let dims = dims(301, 4, 2, 10);
        let (t, w) = (dims.t, dims.qkv_width());
        let (positions, inv_freq) = angles(t, dims.d);
        let qkv = randv(&mut rng, t * w);
        let (pos_g, inv_g) = (up_idx(&be, &positions), up(&be, &inv_freq));
        let mut y_c = qkv.clone();
        cpu.rope_forward(&mut y_c, &positions, &inv_freq, dims)
            .unwrap();
        let mut y_g = up(&be, &qkv);
        be.rope_forward(&mut y_g, &pos_g, &inv_g, dims).unwrap();
        close("rope forward", &down(&be, &y_g, t * w), &y_c, 1e-5);
        cpu.rope_backward(&mut y_c, &positions, &inv_freq, dims)
            .unwrap();
        be.rope_backward(&mut y_g, &pos_g, &inv_g, dims).unwrap();
        close("rope backward", &down(&be, &y_g, t * w), &y_c, 1e-5);
        // Forward then backward is the identity up to rounding (v is never touched).
        close("rope round trip", &down(&be, &y_g, t * w), &qkv, 1e-5);
        let odd = AttnDims { d: 9, ..dims };
        assert!(be.rope_forward(&mut y_g, &pos_g, &inv_g, odd).is_err());
    }

    /// The `_vec8` kernels on a GPU only: bitwise the scalar kernels' results, and the CPU's
    /// within 1e-5 relative (f32 qkv) or 5e-3 (bf16 qkv: one rounding to bf16, 2^-8 relative,
    /// of values up to sqrt 2 times the largest input). Each layout's lane walk is covered:
    /// NH = 10 heads at D = 64 (8 heads side by side: a paired step for lanes of heads 0 and
    /// 1, the single tail for the others) and D = 128 (4 side by side: pairs, then a tail for
    /// heads 8 and 9); the TinyLlama heads (NH = 36) at D = 64; D = 96 (30 of 32 lanes busy);
    /// D = 1056 (66 lanes per head: a lane takes two slots). T = 301 leaves the last block of
    /// 8 rows ragged.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rope_vec8_matches_scalar_and_cpu() {
        let (be, cpu, mut rng) = setup(54);
        for (t, h, hkv, d) in [
            (301, 8, 2, 64),
            (301, 8, 2, 128),
            (37, 32, 4, 64),
            (301, 4, 2, 96),
            (41, 2, 1, 1056),
        ] {
            for dtype in [DType::F32, DType::Bf16] {
                vec8_case(&be, &cpu, &mut rng, dims(t, h, hkv, d), dtype);
            }
        }
    }

    fn vec8_case(
        be: &CudaBackend,
        cpu: &CpuBackend,
        rng: &mut rand_chacha::ChaCha8Rng,
        dims: AttnDims,
        dtype: DType,
    ) {
        let (t, w, d) = (dims.t, dims.qkv_width(), dims.d);
        let what = |pass: &str| format!("rope {pass} D = {d} NH = {} {dtype:?}", dims.h + dims.hkv);
        let tol = if dtype == DType::Bf16 { 5e-3 } else { 1e-5 };
        let (positions, inv_freq) = angles(t, d);
        let (pos_g, inv_g) = (up_idx(be, &positions), up(be, &inv_freq));
        let qkv = randv(rng, t * w);
        let up_as = |x: &[f32]| {
            let mut b = be.alloc_dtype(x.len() + 1, dtype).unwrap();
            be.upload(&mut b, x).unwrap();
            b
        };
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let (mut vec_g, mut sca_g) = (up_as(&qkv), up_as(&qkv));
        // The CPU starts from what the GPU stored (bf16: the rounded inputs); the backward
        // from the stored forward output.
        let x0 = down(be, &vec_g, t * w);
        let mut stored = x0.clone();
        for backward in [false, true] {
            let pass = if backward { "backward" } else { "forward" };
            let mut want = stored.clone();
            if backward {
                cpu.rope_backward(&mut want, &positions, &inv_freq, dims)
                    .unwrap();
                be.rope_backward(&mut vec_g, &pos_g, &inv_g, dims).unwrap();
            } else {
                cpu.rope_forward(&mut want, &positions, &inv_freq, dims)
                    .unwrap();
                be.rope_forward(&mut vec_g, &pos_g, &inv_g, dims).unwrap();
            }
            super::rotate(be, &mut sca_g, &pos_g, &inv_g, dims, backward, false).unwrap();
            let (got_v, got_s) = (down(be, &vec_g, t * w), down(be, &sca_g, t * w));
            assert!(
                bits(&got_v) == bits(&got_s),
                "{}: vec8 != scalar",
                what(pass)
            );
            close(&what(pass), &got_v, &want, tol);
            stored = got_v;
        }
        // Forward then backward is the identity up to two roundings (v is never touched).
        close(&what("round trip"), &stored, &x0, 2.0 * tol);
    }

    /// Timing on a GPU, the TinyLlama shape (T = 16384, H = 32, Hkv = 4, D = 64, bf16):
    /// `cargo test --release --lib cuda_rope_timing -- --ignored --nocapture`. Prints us per
    /// call of each layout and the bytes moved per second (q and k read and written).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rope_timing() {
        let (be, _, _) = setup(55);
        let dims = dims(16384, 32, 4, 64);
        let (t, w, d) = (dims.t, dims.qkv_width(), dims.d);
        // Documents of 2048 tokens, as the TinyLlama run packs them.
        let positions: Vec<i32> = (0..t as i32).map(|i| i % 2048).collect();
        let (_, inv_freq) = angles(t, d);
        let (pos_g, inv_g) = (up_idx(&be, &positions), up(&be, &inv_freq));
        let mut qkv = be.alloc_dtype(t * w, DType::Bf16).unwrap();
        for vec8 in [false, true, false, true] {
            for inverse in [false, true] {
                let mut run = || super::rotate(&be, &mut qkv, &pos_g, &inv_g, dims, inverse, vec8);
                run().unwrap();
                be.synchronize().unwrap();
                let n = 200;
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    run().unwrap();
                }
                be.synchronize().unwrap();
                let us = t0.elapsed().as_secs_f64() / n as f64 * 1e6;
                let bytes = (2 * t * (dims.h + dims.hkv) * d * 2) as f64;
                eprintln!(
                    "rope vec8 {vec8} inverse {inverse}: {us:.1} us ({:.2} TB/s)",
                    bytes / us / 1e6
                );
            }
        }
    }
}
