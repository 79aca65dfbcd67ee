//! Linear layers: `out = x w^T (+ bias)` and its backward, on cuBLAS (see `gemm.rs`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::need;
use crate::backend::cuda::gemm::Mat;
use crate::backend::cuda::{grid_1d, launch, CudaBackend};
use crate::backend::BackendError;

/// out `[T, OC]` = x `[T, IC]` w `[OC, IC]`^T (+ bias `[OC]`), overwritten.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    need("matmul_forward", "out", out.len(), t * oc)?;
    need("matmul_forward", "x", x.len(), t * ic)?;
    need("matmul_forward", "w", w.len(), oc * ic)?;
    let (po, px, pw) = (be.ptr(out), be.ptr(x), be.ptr(w));
    be.gemm(
        false,
        true,
        t,
        oc,
        ic,
        1.0,
        Mat::new(px, ic),
        Mat::new(pw, ic),
        0.0,
        Mat::new(po, oc),
        1,
    )?;
    if let Some(b) = bias {
        need("matmul_forward", "bias", b.len(), oc)?;
        let (t32, oc32) = (t as i32, oc as i32);
        launch(be, "bias_add_forward", grid_1d(t * oc, 256), |a| {
            a.arg(out).arg(b).arg(&t32).arg(&oc32);
        })?;
    }
    Ok(())
}

/// dx `[T, IC]` += dout w; dw `[OC, IC]` += dout^T x; dbias `[OC]` += column sums of dout.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dx: &mut CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
    dbias: Option<&mut CudaSlice<f32>>,
    dout: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    t: usize,
    ic: usize,
    oc: usize,
) -> Result<(), BackendError> {
    need("matmul_backward", "dx", dx.len(), t * ic)?;
    need("matmul_backward", "dw", dw.len(), oc * ic)?;
    need("matmul_backward", "dout", dout.len(), t * oc)?;
    need("matmul_backward", "x", x.len(), t * ic)?;
    need("matmul_backward", "w", w.len(), oc * ic)?;
    let (pdx, pdw, pdo, px, pw) = (be.ptr(dx), be.ptr(dw), be.ptr(dout), be.ptr(x), be.ptr(w));
    be.gemm(
        false,
        false,
        t,
        ic,
        oc,
        1.0,
        Mat::new(pdo, oc),
        Mat::new(pw, ic),
        1.0,
        Mat::new(pdx, ic),
        1,
    )?;
    be.gemm(
        true,
        false,
        oc,
        ic,
        t,
        1.0,
        Mat::new(pdo, oc),
        Mat::new(px, ic),
        1.0,
        Mat::new(pdw, ic),
        1,
    )?;
    if let Some(db) = dbias {
        need("matmul_backward", "dbias", db.len(), oc)?;
        let (t32, oc32) = (t as i32, oc as i32);
        launch(be, "bias_add_backward", grid_1d(oc, 128), |a| {
            a.arg(db).arg(dout).arg(&t32).arg(&oc32);
        })?;
    }
    Ok(())
}
