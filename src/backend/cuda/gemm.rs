//! Row-major GEMMs on cuBLAS.
//!
//! cuBLAS is column-major; a row-major `[R, C]` matrix read column-major is its transpose. So
//! row-major `C[M,N] = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`: one call with the
//! operands swapped and the same transpose flags, m = N, n = M.

use cudarc::cublas::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::buf::{CudaBuf, DType};
use super::CudaBackend;
use crate::backend::BackendError;

/// How cuBLAS multiplies f32 buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmMode {
    /// bf16 tensor cores, f32 accumulation (`CUBLAS_COMPUTE_32F_FAST_16BF`): the default.
    Bf16,
    /// tf32 tensor cores.
    Tf32,
    /// Plain f32 (exact reference, slow).
    F32,
}

impl GemmMode {
    /// `PACKTRAIN_GEMM=bf16|tf32|f32` (default bf16).
    pub fn from_env() -> Self {
        match std::env::var("PACKTRAIN_GEMM").as_deref() {
            Ok("tf32") => GemmMode::Tf32,
            Ok("f32") => GemmMode::F32,
            _ => GemmMode::Bf16,
        }
    }
    fn compute_type(self) -> sys::cublasComputeType_t {
        match self {
            GemmMode::Bf16 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            GemmMode::Tf32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            GemmMode::F32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        }
    }
}

/// One operand: device pointer (already offset), element type, leading dimension (row
/// stride, elements).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: CUdeviceptr,
    pub dtype: DType,
    pub ld: usize,
    /// Elements between consecutive matrices of a batch.
    pub stride: usize,
}

impl Mat {
    /// The matrix at the start of `buf`, rows `ld` elements apart.
    pub fn of(be: &CudaBackend, buf: &CudaBuf, ld: usize) -> Self {
        Self {
            ptr: be.raw(buf),
            dtype: buf.dtype(),
            ld,
            stride: 0,
        }
    }
    /// An f32 matrix at a raw address.
    pub fn new(ptr: CUdeviceptr, ld: usize) -> Self {
        Self {
            ptr,
            dtype: DType::F32,
            ld,
            stride: 0,
        }
    }
    /// f32 matrices of a batch, `stride` elements apart.
    pub fn batched(ptr: CUdeviceptr, ld: usize, stride: usize) -> Self {
        Self {
            stride,
            ..Self::new(ptr, ld)
        }
    }
    /// The same matrix `elems` elements further on.
    pub fn offset(self, elems: usize) -> Self {
        Self {
            ptr: self.ptr + (elems * self.dtype.size()) as u64,
            ..self
        }
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType_t {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn op(t: bool) -> sys::cublasOperation_t {
    if t {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn check(status: sys::cublasStatus_t, what: &'static str) -> Result<(), BackendError> {
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Device {
            op: what,
            message: format!("{status:?}"),
        })
    }
}

impl CudaBackend {
    /// Row-major `C[M,N] = alpha op(A) op(B) + beta C` over `batch` matrices (strides in `Mat`).
    /// op(A) is `[M,K]`, op(B) is `[K,N]`. A and B share one element type: bf16 operands run
    /// on bf16 tensor cores with f32 accumulation into an f32 or bf16 C; f32 operands (into an
    /// f32 C) run as [`GemmMode`] says. Other mixes are errors (`ops::matmul` converts first).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        c: Mat,
        batch: usize,
    ) -> Result<(), BackendError> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let ct = match (a.dtype, b.dtype, c.dtype) {
            (DType::Bf16, DType::Bf16, _) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            (DType::F32, DType::F32, DType::F32) => self.gemm_mode.compute_type(),
            other => {
                return Err(BackendError::Shape {
                    op: "gemm",
                    message: format!("operand types (A, B, C) = {other:?} are not supported"),
                })
            }
        };
        let (ta, tb, tc) = (cuda_type(a.dtype), cuda_type(b.dtype), cuda_type(c.dtype));
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let h = *self.blas.handle();
        // SAFETY: the callers pass pointers into live buffers whose lengths they checked against
        // m, n, k, the leading dimensions and the batch strides; cuBLAS runs on our stream.
        let status = unsafe {
            if batch == 1 {
                sys::cublasGemmEx(
                    h,
                    op(trans_b),
                    op(trans_a),
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    b.ptr as *const _,
                    tb,
                    b.ld as i32,
                    a.ptr as *const _,
                    ta,
                    a.ld as i32,
                    &beta as *const f32 as *const _,
                    c.ptr as *mut _,
                    tc,
                    c.ld as i32,
                    ct,
                    algo,
                )
            } else {
                sys::cublasGemmStridedBatchedEx(
                    h,
                    op(trans_b),
                    op(trans_a),
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    b.ptr as *const _,
                    tb,
                    b.ld as i32,
                    b.stride as i64,
                    a.ptr as *const _,
                    ta,
                    a.ld as i32,
                    a.stride as i64,
                    &beta as *const f32 as *const _,
                    c.ptr as *mut _,
                    tc,
                    c.ld as i32,
                    c.stride as i64,
                    batch as i32,
                    ct,
                    algo,
                )
            }
        };
        check(status, "cublasGemmEx")
    }
}
