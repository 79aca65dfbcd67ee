//! Varlen causal attention with GQA: the precision dispatch behind `Backend::attention_forward`
//! and `attention_backward`. Head dims 64 and 128 go to the flash kernels (`flash_attention.rs`)
//! when `flash_attention::use_flash` says so, taking f32 or bf16 tensors as they are
//! (`flash_attention::native`); every other shape takes the GEMM path (`attention_gemm.rs`,
//! re-exported here as `forward`/`backward`), which runs on f32 buffers. Whatever a path cannot
//! take as it is (mixed precisions, bf16 on the GEMM path) is staged through f32
//! (`staging.rs`).
//!
//! Shapes: qkv `[T, W]`, W = (H + 2 Hkv) D, row `[q: H D | k: Hkv D | v: Hkv D]`; out, dout
//! `[T, H D]`; lse `[H, T]`; dqkv `[T, W]`.

use super::attention_gemm::prod;
pub use super::attention_gemm::{backward, forward};
use super::{need, staging};
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaIdx};
use crate::backend::{AttnDims, BackendError};

/// Attention forward on buffers of any precision: the flash kernels take f32 or bf16 tensors
/// as they are; anything else (the GEMM path, mixed precisions) is staged through f32
/// (`staging.rs`).
pub fn forward_any(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_forward";
    let flash = super::flash_attention::use_flash(&dims);
    if flash && super::flash_attention::native(&[qkv, out], lse) {
        return super::flash_attention::forward(be, out, lse, qkv, cu_seqlens, dims);
    }
    let (n_qkv, n_out, n_lse) = staged_sizes(OP, &dims)?;
    need(OP, "out [T, H D]", out.len(), n_out)?;
    need(OP, "lse [H, T]", lse.len(), n_lse)?;
    need(OP, "qkv [T, QKV]", qkv.len(), n_qkv)?;
    let q = staging::input(be, qkv, n_qkv)?;
    let mut o = staging::output(be, out, n_out, false)?;
    let mut l = staging::output(be, lse, n_lse, false)?;
    {
        let qb = q.as_ref().unwrap_or(qkv);
        let ob = staging::buf_mut(&mut o, out);
        let lb = staging::buf_mut(&mut l, lse);
        if flash {
            super::flash_attention::forward(be, ob, lb, qb, cu_seqlens, dims)?;
        } else {
            forward(
                be,
                ob.f32_mut(OP)?,
                lb.f32_mut(OP)?,
                qb.f32(OP)?,
                cu_seqlens,
                dims,
            )?;
        }
    }
    staging::finish(be, o, out, n_out)?;
    staging::finish(be, l, lse, n_lse)
}

/// Attention backward on buffers of any precision (see [`forward_any`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_any(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward";
    let flash = super::flash_attention::use_flash(&dims);
    if flash && super::flash_attention::native(&[dqkv, dout, qkv, out], lse) {
        return super::flash_attention::backward(be, dqkv, dout, qkv, out, lse, cu_seqlens, dims);
    }
    let (n_qkv, n_out, n_lse) = staged_sizes(OP, &dims)?;
    need(OP, "dqkv [T, QKV]", dqkv.len(), n_qkv)?;
    need(OP, "dout [T, H D]", dout.len(), n_out)?;
    need(OP, "qkv [T, QKV]", qkv.len(), n_qkv)?;
    need(OP, "out [T, H D]", out.len(), n_out)?;
    need(OP, "lse [H, T]", lse.len(), n_lse)?;
    let (sdo, sq) = (
        staging::input(be, dout, n_out)?,
        staging::input(be, qkv, n_qkv)?,
    );
    let (so, sl) = (
        staging::input(be, out, n_out)?,
        staging::input(be, lse, n_lse)?,
    );
    let mut sdq = staging::output(be, dqkv, n_qkv, false)?;
    {
        let (dob, qb) = (sdo.as_ref().unwrap_or(dout), sq.as_ref().unwrap_or(qkv));
        let (ob, lb) = (so.as_ref().unwrap_or(out), sl.as_ref().unwrap_or(lse));
        let dqb = staging::buf_mut(&mut sdq, dqkv);
        if flash {
            super::flash_attention::backward(be, dqb, dob, qb, ob, lb, cu_seqlens, dims)?;
        } else {
            backward(
                be,
                dqb.f32_mut(OP)?,
                dob.f32(OP)?,
                qb.f32(OP)?,
                ob.f32(OP)?,
                lb.f32(OP)?,
                cu_seqlens,
                dims,
            )?;
        }
    }
    staging::finish(be, sdq, dqkv, n_qkv)
}

/// Elements of qkv `[T, QKV]`, out `[T, H D]` and lse `[H, T]`.
fn staged_sizes(op: &'static str, dims: &AttnDims) -> Result<(usize, usize, usize), BackendError> {
    let AttnDims { t, h, hkv, d, .. } = *dims;
    let w = prod(op, &[h + 2 * hkv, d])?;
    Ok((
        prod(op, &[t, w])?,
        prod(op, &[t, h, d])?,
        prod(op, &[h, t])?,
    ))
}
