//! f32 staging for kernels that read and write f32 buffers only (today: both attention
//! paths). A bf16 argument is converted into an f32 temporary before the kernel and, for
//! outputs, converted back after it; f32 arguments pass through untouched. This costs one
//! extra pass over each staged buffer, which the native-bf16 kernels will remove.

use super::elementwise::convert;
use crate::backend::cuda::{CudaBackend, CudaBuf, DType};
use crate::backend::BackendError;

/// An input as f32: `None` when `b` is already f32 (use it), else an f32 copy of its leading `n`.
pub(crate) fn input(
    be: &CudaBackend,
    b: &CudaBuf,
    n: usize,
) -> Result<Option<CudaBuf>, BackendError> {
    if b.dtype() == DType::F32 {
        return Ok(None);
    }
    let mut t = be.alloc_dtype(n, DType::F32)?;
    convert(be, &mut t, b, n)?;
    Ok(Some(t))
}

/// An output as f32: `None` when `b` is already f32, else an f32 temporary of `n` elements
/// (copied in when `keep` says the kernel reads or accumulates into the output).
pub(crate) fn output(
    be: &CudaBackend,
    b: &CudaBuf,
    n: usize,
    keep: bool,
) -> Result<Option<CudaBuf>, BackendError> {
    if b.dtype() == DType::F32 {
        return Ok(None);
    }
    let mut t = be.alloc_dtype(n, DType::F32)?;
    if keep {
        convert(be, &mut t, b, n)?;
    }
    Ok(Some(t))
}

/// The buffer to hand the kernel: the staged copy if there is one, else the buffer itself.
pub(crate) fn buf_mut<'a>(staged: &'a mut Option<CudaBuf>, b: &'a mut CudaBuf) -> &'a mut CudaBuf {
    match staged {
        Some(t) => t,
        None => b,
    }
}

/// Write a staged output back into its bf16 buffer (nothing when it was not staged).
pub(crate) fn finish(
    be: &CudaBackend,
    staged: Option<CudaBuf>,
    b: &mut CudaBuf,
    n: usize,
) -> Result<(), BackendError> {
    match staged {
        Some(t) => convert(be, b, &t, n),
        None => Ok(()),
    }
}
