//! RoPE, in place on the q and k heads of the fused qkv buffer (kernels and math in
//! `rope.cu`); the backward is the inverse rotation.

use cudarc::driver::PushKernelArg;

use super::elementwise::{dim_i32, prod, rows_cols};
use super::need;
use crate::backend::cuda::{launch, CudaBackend, CudaBuf, CudaIdx};
use crate::backend::{AttnDims, BackendError};

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
    // Checked: qkv holds T QKV with QKV = (H + 2 Hkv) D >= (H + Hkv) D, positions T,
    // inv_freq D/2; the kernel touches the first (H + Hkv) D columns of each of T rows.
    let (tq, ti) = (be.ten(qkv), be.ten(inv_freq));
    launch(be, op, rows_cols(op, t, d / 2)?, |a| {
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
    use crate::backend::{AttnDims, Backend};

    /// CUDA against the CPU on a GPU only; positions up to ~1e5 (large angles: the precise
    /// sincosf against libm, both within ~2 ulp of the f32 angle), D = 10 (D/2 = 5 threads).
    /// Tolerance 1e-5 relative.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rope_matches_cpu() {
        let (be, cpu, mut rng) = setup(53);
        let dims = AttnDims {
            t: 301,
            h: 4,
            hkv: 2,
            d: 10,
            n_docs: 1,
            max_seqlen: 301,
        };
        let (t, w) = (dims.t, dims.qkv_width());
        let positions: Vec<i32> = (0..t as i32).map(|i| (i * 331) % 100_003).collect();
        let inv_freq: Vec<f32> = (0..dims.d / 2)
            .map(|j| 10000f32.powf(-2.0 * j as f32 / dims.d as f32))
            .collect();
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
}
