//! Linear layers: `out = x w^T (+ bias)` and its backward, on cuBLAS (see `gemm.rs`).

use cudarc::driver::PushKernelArg;

use super::elementwise::{dim_i32, prod};
use super::need;
use crate::backend::cuda::gemm::Mat;
use crate::backend::cuda::{grid_1d, launch, CudaBackend, CudaBuf, DType};
use crate::backend::{Backend, BackendError, GradWrite};

/// The operand precision of a GEMM over these buffers: bf16 when any of them is bf16 (so the
/// f32 ones are converted), else f32.
fn operand_dtype(bufs: &[&CudaBuf]) -> DType {
    if bufs.iter().any(|b| b.dtype() == DType::Bf16) {
        DType::Bf16
    } else {
        DType::F32
    }
}

/// `b` as a GEMM operand of `dtype`: itself, or a converted copy of its leading `n` elements
/// (a weight kept in f32 read by a bf16 GEMM, in tests and checks; the model passes its bf16
/// working copies so this never converts there).
pub(crate) fn operand(
    be: &CudaBackend,
    b: &CudaBuf,
    n: usize,
    dtype: DType,
) -> Result<Option<CudaBuf>, BackendError> {
    if b.dtype() == dtype {
        return Ok(None);
    }
    let mut t = be.alloc_dtype(n, dtype)?;
    super::elementwise::convert(be, &mut t, b, n)?;
    Ok(Some(t))
}

/// out `[T, OC]` = x `[T, IC]` w `[OC, IC]`^T (+ bias `[OC]`), overwritten.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    bias: Option<&CudaBuf>,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    need("matmul_forward", "out", out.len(), t * oc)?;
    need("matmul_forward", "x", x.len(), t * ic)?;
    need("matmul_forward", "w", w.len(), oc * ic)?;
    linear_gemm(be, out, x, w, None, t, ic, oc)?;
    if let Some(b) = bias {
        need("matmul_forward", "bias", b.len(), oc)?;
        let (t32, oc32) = (t as i32, oc as i32);
        let (to, tb) = (be.ten(out), be.ten(b));
        launch(be, "bias_add_forward", grid_1d(t * oc, 256), |a| {
            a.arg(&to).arg(&tb).arg(&t32).arg(&oc32);
        })?;
    }
    Ok(())
}

/// out `[T, OC]` = x w^T + residual `[T, OC]`: the residual is the GEMM's C operand (D = out),
/// so it is added in f32 before the single rounding to out's precision. Buffers of mixed
/// precision (checks and tests only) take the two-pass way: GEMM, then `add_inplace`.
#[allow(clippy::too_many_arguments)]
pub fn forward_residual(
    be: &CudaBackend,
    out: &mut CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    residual: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    const OP: &str = "matmul_forward_residual";
    let n = prod(OP, &[t, oc])?;
    need(OP, "out [T, OC]", out.len(), n)?;
    need(OP, "residual [T, OC]", residual.len(), n)?;
    need(OP, "x [T, IC]", x.len(), prod(OP, &[t, ic])?)?;
    need(OP, "w [OC, IC]", w.len(), prod(OP, &[oc, ic])?)?;
    if residual.dtype() != out.dtype() {
        linear_gemm(be, out, x, w, None, t, ic, oc)?;
        return super::elementwise::add_inplace(be, out, residual, n);
    }
    linear_gemm(be, out, x, w, Some(residual), t, ic, oc)
}

/// out = x w^T (+ residual, the GEMM's C operand, same type as out); lengths checked by the
/// callers.
#[allow(clippy::too_many_arguments)]
fn linear_gemm(
    be: &CudaBackend,
    out: &mut CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    residual: Option<&CudaBuf>,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    let dt = operand_dtype(&[out, x, w]);
    let (xs, ws) = (operand(be, x, t * ic, dt)?, operand(be, w, oc * ic, dt)?);
    let (xm, wm) = (xs.as_ref().unwrap_or(x), ws.as_ref().unwrap_or(w));
    let d = Mat::of(be, out, oc);
    let (beta, c) = match residual {
        Some(r) => (1.0, Mat::of(be, r, oc)),
        None => (0.0, d),
    };
    be.gemm_into(
        false,
        true,
        t,
        oc,
        ic,
        1.0,
        Mat::of(be, xm, ic),
        Mat::of(be, wm, ic),
        beta,
        c,
        d,
        1,
    )
}

/// dx `[T, IC]` = dout w, overwritten (beta 0: cuBLAS does not read C then).
pub fn backward_input(
    be: &CudaBackend,
    dx: &mut CudaBuf,
    dout: &CudaBuf,
    w: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    const OP: &str = "matmul_backward_input";
    need(OP, "dx [T, IC]", dx.len(), prod(OP, &[t, ic])?)?;
    need(OP, "dout [T, OC]", dout.len(), prod(OP, &[t, oc])?)?;
    need(OP, "w [OC, IC]", w.len(), prod(OP, &[oc, ic])?)?;
    input_gemm(be, dx, dout, w, t, ic, oc).map(drop)
}

/// dw `[OC, IC]` += dout^T x; dbias `[OC]` += column sums of dout (both = with
/// `GradWrite::Overwrite`: beta 0, so cuBLAS never reads dw).
#[allow(clippy::too_many_arguments)]
pub fn backward_weight(
    be: &CudaBackend,
    dw: &mut CudaBuf,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    x: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
    write: GradWrite,
) -> Result<(), BackendError> {
    const OP: &str = "matmul_backward_weight";
    need(OP, "dw [OC, IC]", dw.len(), prod(OP, &[oc, ic])?)?;
    if let Some(db) = dbias.as_deref() {
        need(OP, "dbias [OC]", db.len(), oc)?;
    }
    need(OP, "dout [T, OC]", dout.len(), prod(OP, &[t, oc])?)?;
    need(OP, "x [T, IC]", x.len(), prod(OP, &[t, ic])?)?;
    weight_gemm(be, dw, dbias, dout, None, x, t, ic, oc, write)
}

/// Both halves, [`backward_input`] then [`backward_weight`], converting an f32 dout to the
/// operand precision once for the two GEMMs instead of twice.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dx: &mut CudaBuf,
    dw: &mut CudaBuf,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
    write: GradWrite,
) -> Result<(), BackendError> {
    const OP: &str = "matmul_backward";
    need(OP, "dx [T, IC]", dx.len(), prod(OP, &[t, ic])?)?;
    need(OP, "dw [OC, IC]", dw.len(), prod(OP, &[oc, ic])?)?;
    if let Some(db) = dbias.as_deref() {
        need(OP, "dbias [OC]", db.len(), oc)?;
    }
    need(OP, "dout [T, OC]", dout.len(), prod(OP, &[t, oc])?)?;
    need(OP, "x [T, IC]", x.len(), prod(OP, &[t, ic])?)?;
    need(OP, "w [OC, IC]", w.len(), prod(OP, &[oc, ic])?)?;
    let ds = input_gemm(be, dx, dout, w, t, ic, oc)?;
    weight_gemm(be, dw, dbias, dout, ds, x, t, ic, oc, write)
}

/// dx = dout w with beta 0 (lengths checked by the caller). Returns the converted copy of
/// dout it made, if any, for [`weight_gemm`] to reuse.
fn input_gemm(
    be: &CudaBackend,
    dx: &mut CudaBuf,
    dout: &CudaBuf,
    w: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<Option<CudaBuf>, BackendError> {
    // Operands dout, w; bf16 when any of dx, dout, w is.
    let dt = operand_dtype(&[dx, dout, w]);
    let (ds, ws) = (operand(be, dout, t * oc, dt)?, operand(be, w, oc * ic, dt)?);
    be.gemm(
        false,
        false,
        t,
        ic,
        oc,
        1.0,
        Mat::of(be, ds.as_ref().unwrap_or(dout), oc),
        Mat::of(be, ws.as_ref().unwrap_or(w), ic),
        0.0,
        Mat::of(be, dx, ic),
        1,
    )?;
    Ok(ds)
}

/// dw += dout^T x and dbias += (= with `GradWrite::Overwrite`; lengths checked by the caller);
/// `ds` is a converted copy of
/// dout already made by [`input_gemm`], used when it has the precision this GEMM needs.
#[allow(clippy::too_many_arguments)]
fn weight_gemm(
    be: &CudaBackend,
    dw: &mut CudaBuf,
    dbias: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    ds: Option<CudaBuf>,
    x: &CudaBuf,
    t: usize,
    ic: usize,
    oc: usize,
    write: GradWrite,
) -> Result<(), BackendError> {
    // Operands dout, x (dw is f32 or matches them).
    let dt = operand_dtype(&[dw, dout, x]);
    let ds = if ds.as_ref().map(CudaBuf::dtype) == Some(dt) {
        ds
    } else {
        operand(be, dout, t * oc, dt)?
    };
    let xs = operand(be, x, t * ic, dt)?;
    be.gemm(
        true,
        false,
        oc,
        ic,
        t,
        1.0,
        Mat::of(be, ds.as_ref().unwrap_or(dout), oc),
        Mat::of(be, xs.as_ref().unwrap_or(x), ic),
        match write {
            GradWrite::Add => 1.0,
            GradWrite::Overwrite => 0.0,
        },
        Mat::of(be, dw, ic),
        1,
    )?;
    if let Some(db) = dbias {
        if write == GradWrite::Overwrite {
            // OC floats: bias_add_backward adds into them.
            be.zero(db, oc)?;
        }
        let (t32, oc32) = (
            dim_i32("matmul_backward_weight", "T", t)?,
            dim_i32("matmul_backward_weight", "OC", oc)?,
        );
        let (tdb, tdo) = (be.ten(db), be.ten(dout));
        // Checked by the caller: dbias holds OC, dout T OC.
        launch(be, "bias_add_backward", grid_1d(oc, 128), |a| {
            a.arg(&tdb).arg(&tdo).arg(&t32).arg(&oc32);
        })?;
    }
    Ok(())
}
