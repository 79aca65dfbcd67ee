//! Launchers: one file per op, forward and backward side by side, each checking the lengths of
//! its buffers against the dims before it launches.

pub mod adamw;
pub mod attention;
pub mod attention_gemm;
pub mod classifier;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub(crate) mod staging;
pub mod swiglu;

use crate::backend::BackendError;

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
