//! Launchers: one file per op, forward and backward side by side, each checking the lengths of
//! its buffers against the dims before it launches.

pub mod adamw;
pub mod attention;
pub mod attention_gemm;
pub mod classifier;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub(crate) mod flash_items;
mod flash_ws;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub(crate) mod staging;
pub mod swiglu;
mod tma;

use cudarc::driver::sys::CUfunction_attribute_enum;

use crate::backend::cuda::{drv, CudaBackend};
use crate::backend::BackendError;

/// Lets kernel `name` take `bytes` of dynamic shared memory (past the default 48 KB).
pub(crate) fn set_smem(
    be: &CudaBackend,
    name: &str,
    bytes: usize,
    op: &'static str,
) -> Result<(), BackendError> {
    be.kernel(name)?
        .set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(drv(op))
}

/// `have >= need`, else a shape error naming the op and the buffer.
pub(crate) fn need(
    op: &'static str,
    what: &str,
    have: usize,
    need: usize,
) -> Result<(), BackendError> {
    if have < need {
        return Err(BackendError::Shape {
            op,
            message: format!("{what} holds {have} elements, {need} needed"),
        });
    }
    Ok(())
}

/// The error of an op this backend does not have yet.
#[allow(dead_code)]
pub(crate) fn unsupported(op: &'static str) -> BackendError {
    BackendError::Unsupported {
        op,
        backend: "cuda",
    }
}
