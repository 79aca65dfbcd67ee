//! Row-major GEMMs on cuBLAS.
//!
//! cuBLAS is column-major; a row-major `[R, C]` matrix read column-major is its transpose. So
//! row-major `C[M,N] = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`: one call with the
//! operands swapped and the same transpose flags, m = N, n = M.

use cudarc::cublas::sys;
use cudarc::driver::sys::CUdeviceptr;

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

/// One operand: device pointer (already offset), leading dimension (row stride, elements).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: CUdeviceptr,
    pub ld: usize,
    /// Elements between consecutive matrices of a batch.
    pub stride: usize,
}

impl Mat {
    pub fn new(ptr: CUdeviceptr, ld: usize) -> Self {
        Self { ptr, ld, stride: 0 }
    }
    pub fn batched(ptr: CUdeviceptr, ld: usize, stride: usize) -> Self {
        Self { ptr, ld, stride }
    }
    /// The same matrix `elems` f32 further on.
    pub fn offset(self, elems: usize) -> Self {
        Self {
            ptr: self.ptr + (elems * 4) as u64,
            ..self
        }
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
    /// op(A) is `[M,K]`, op(B) is `[K,N]`.
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
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let ct = self.gemm_mode.compute_type();
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
                    f32t,
                    b.ld as i32,
                    a.ptr as *const _,
                    f32t,
                    a.ld as i32,
                    &beta as *const f32 as *const _,
                    c.ptr as *mut _,
                    f32t,
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
                    f32t,
                    b.ld as i32,
                    b.stride as i64,
                    a.ptr as *const _,
                    f32t,
                    a.ld as i32,
                    a.stride as i64,
                    &beta as *const f32 as *const _,
                    c.ptr as *mut _,
                    f32t,
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
