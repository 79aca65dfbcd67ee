//! Float buffers of either storage precision, and how kernels see them.
//!
//! Parameters, gradients, optimizer moments and the small per-row statistics (rstd, lse) are
//! f32; activations are bf16 (`Backend::alloc_act`), which halves the bytes every element-wise
//! kernel moves and the activation memory a layer keeps for its backward. The choice is per
//! buffer, at run time: every kernel takes its float tensors as [`Ten`] (pointer + dtype) and
//! converts on load and store (math is always f32), so any op runs on any mix of precisions
//! and the model alone decides what is stored how.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use half::bf16;

use super::CudaBackend;
use crate::backend::BackendError;

/// Storage precision of a [`CudaBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A device buffer of floats, f32 or bf16.
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl CudaBuf {
    /// Length in elements.
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::Bf16(_) => DType::Bf16,
        }
    }

    /// The f32 slice, or an error naming `op` when the buffer is bf16 (NCCL and the optimizer
    /// work on f32 gradients and weights only).
    pub fn f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>, BackendError> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::Bf16(_) => Err(not_f32(op)),
        }
    }

    /// See [`CudaBuf::f32_mut`].
    pub fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>, BackendError> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::Bf16(_) => Err(not_f32(op)),
        }
    }
}

fn not_f32(op: &'static str) -> BackendError {
    BackendError::Shape {
        op,
        message: "needs an f32 buffer, got a bf16 one".into(),
    }
}

/// A float tensor as a kernel argument: `struct Ten { void* p; int bf16; int pad; }` in
/// `kernels/common.cuh` (16 bytes, the same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ten {
    ptr: CUdeviceptr,
    bf16: i32,
    pad: i32,
}

// SAFETY: plain old data with the C layout of the kernels' `Ten`.
unsafe impl DeviceRepr for Ten {}

impl CudaBackend {
    /// Raw device address of a buffer (for cuBLAS and kernel arguments), valid while `b` lives.
    pub(crate) fn raw(&self, b: &CudaBuf) -> CUdeviceptr {
        // Event tracking is off (one stream), so the guards have nothing to record.
        match b {
            CudaBuf::F32(s) => s.device_ptr(&self.stream).0,
            CudaBuf::Bf16(s) => s.device_ptr(&self.stream).0,
        }
    }

    /// The kernel argument for `b`.
    pub(crate) fn ten(&self, b: &CudaBuf) -> Ten {
        Ten {
            ptr: self.raw(b),
            bf16: i32::from(b.dtype() == DType::Bf16),
            pad: 0,
        }
    }

    /// The kernel argument for an optional output: a null pointer (`t.p == nullptr` in the
    /// kernel, which then skips its stores) when absent.
    pub(crate) fn ten_opt(&self, b: Option<&CudaBuf>) -> Ten {
        b.map_or(
            Ten {
                ptr: 0,
                bf16: 0,
                pad: 0,
            },
            |b| self.ten(b),
        )
    }

    /// A zeroed buffer of `len` elements of `dtype` (at least one element).
    pub fn alloc_dtype(&self, len: usize, dtype: DType) -> Result<CudaBuf, BackendError> {
        let op = "alloc";
        Ok(match dtype {
            DType::F32 => CudaBuf::F32(
                self.stream
                    .alloc_zeros::<f32>(len.max(1))
                    .map_err(super::drv(op))?,
            ),
            DType::Bf16 => CudaBuf::Bf16(
                self.stream
                    .alloc_zeros::<bf16>(len.max(1))
                    .map_err(super::drv(op))?,
            ),
        })
    }
}

/// f32 values rounded to bf16 (nearest even), for uploads into bf16 buffers.
pub(crate) fn to_bf16(src: &[f32]) -> Vec<bf16> {
    src.iter().map(|&x| bf16::from_f32(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::gemm::Mat;
    use crate::backend::{AdamWStep, AttnDims, Backend};

    /// The error paths of per-buffer precision, each fed its bad input (GPU only): optimizer
    /// state and NCCL gradients must be f32, a working copy must be long enough, cuBLAS cannot
    /// round f32 products into bf16, and the flash kernels take one element type.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn precision_mismatches_are_errors() {
        let be = CudaBackend::new(0).expect("a CUDA device");
        let n = 64;
        let hp = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_scale: 1.0,
            step: 1,
        };
        let f32_buf = |len| be.alloc(len).unwrap();
        let bf16_buf = |len| be.alloc_dtype(len, DType::Bf16).unwrap();
        let (g, mut m, mut v) = (f32_buf(n), f32_buf(n), f32_buf(n));

        let e = be
            .adamw(&mut bf16_buf(n), &g, &mut m, &mut v, n, hp)
            .unwrap_err();
        assert!(e.to_string().contains("needs an f32 buffer"), "{e}");

        let e = be
            .adamw_with_copy(
                &mut f32_buf(n),
                &g,
                &mut m,
                &mut v,
                &mut bf16_buf(n / 2),
                n,
                hp,
            )
            .unwrap_err();
        assert!(e.to_string().contains("working [n]"), "{e}");

        assert!(bf16_buf(4).f32_mut("all_reduce").is_err());

        let (a, c) = (f32_buf(n), bf16_buf(n));
        let e = be
            .gemm(
                false,
                false,
                8,
                8,
                8,
                1.0,
                Mat::of(&be, &a, 8),
                Mat::of(&be, &a, 8),
                0.0,
                Mat::of(&be, &c, 8),
                1,
            )
            .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");

        let dims = AttnDims {
            t: 8,
            h: 1,
            hkv: 1,
            d: 64,
            n_docs: 1,
            max_seqlen: 8,
        };
        let mut cu = be.alloc_idx(2).unwrap();
        be.upload_idx(&mut cu, &[0, 8]).unwrap();
        let qkv = f32_buf(8 * dims.qkv_width());
        let e = super::super::ops::flash_attention::forward(
            &be,
            &mut bf16_buf(8 * 64),
            &mut f32_buf(8),
            &qkv,
            &cu,
            dims,
        )
        .unwrap_err();
        assert!(e.to_string().contains("one element type"), "{e}");
    }
}
