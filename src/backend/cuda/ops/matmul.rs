//! Linear layers: `out = x w^T (+ bias)` and its backward, on cuBLAS (see `gemm.rs`).

use cudarc::driver::PushKernelArg;

use super::need;
use crate::backend::cuda::gemm::Mat;
use crate::backend::cuda::{grid_1d, launch, CudaBackend, CudaBuf, DType};
use crate::backend::BackendError;

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
    let dt = operand_dtype(&[out, x, w]);
    let (xs, ws) = (operand(be, x, t * ic, dt)?, operand(be, w, oc * ic, dt)?);
    let (xm, wm) = (xs.as_ref().unwrap_or(x), ws.as_ref().unwrap_or(w));
    be.gemm(
        false,
        true,
        t,
        oc,
        ic,
        1.0,
        Mat::of(be, xm, ic),
        Mat::of(be, wm, ic),
        0.0,
        Mat::of(be, out, oc),
        1,
    )?;
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

/// dx `[T, IC]` = dout w (overwritten: beta 0, cuBLAS does not read C then); dw `[OC, IC]`
/// += dout^T x; dbias `[OC]` += column sums of dout.
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
) -> Result<(), BackendError> {
    need("matmul_backward", "dx", dx.len(), t * ic)?;
    need("matmul_backward", "dw", dw.len(), oc * ic)?;
    need("matmul_backward", "dout", dout.len(), t * oc)?;
    need("matmul_backward", "x", x.len(), t * ic)?;
    need("matmul_backward", "w", w.len(), oc * ic)?;
    // dx = dout w: operands dout, w.
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
    // dw = dout^T x: operands dout, x (dw is f32 or matches them).
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
        1.0,
        Mat::of(be, dw, ic),
        1,
    )?;
    if let Some(db) = dbias {
        need("matmul_backward", "dbias", db.len(), oc)?;
        let (t32, oc32) = (t as i32, oc as i32);
        let (tdb, tdo) = (be.ten(db), be.ten(dout));
        launch(be, "bias_add_backward", grid_1d(oc, 128), |a| {
            a.arg(&tdb).arg(&tdo).arg(&t32).arg(&oc32);
        })?;
    }
    Ok(())
}
