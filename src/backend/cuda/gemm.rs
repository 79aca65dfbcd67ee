//! Row-major GEMMs on cuBLASLt, one plan per shape.
//!
//! cuBLAS is column-major; a row-major `[R, C]` matrix read column-major is its transpose. So
//! row-major `D[M,N] = op(A) op(B) (+ beta C)` is column-major `D^T = op(B)^T op(A)^T`: one
//! call with the operands swapped and the same transpose flags, m = N, n = M.
//!
//! A plan (`lt::Plan`: the matmul and layout descriptors and the algorithm) is built the first
//! time a shape is seen and reused for every later call of that shape; its key holds all that
//! the algorithm depends on (dims, transposes, leading dimensions, batch strides, element
//! types, compute type and the operands' pointer alignment). The algorithm is the fastest of
//! cuBLASLt's first 16 heuristic candidates and plain `cublasGemmEx`, timed on the call's own
//! operands (see `lt.rs`). C and D may be different buffers: that is the epilogue the model uses
//! to add the residual stream inside the Wo and Wdown GEMMs (`D = A B + C`), saving a pass over
//! the activations. A shape that goes to `cublasGemmEx` with C != D has C copied into D first.

use cudarc::cublas::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::buf::{CudaBuf, DType};
use super::lt::{Operands, PlanKey};
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
    pub(crate) fn compute_type(self) -> sys::cublasComputeType_t {
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

pub(crate) fn cuda_type(d: DType) -> sys::cudaDataType_t {
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

pub(crate) fn check(status: sys::cublasStatus_t, what: &'static str) -> Result<(), BackendError> {
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Device {
            op: what,
            message: format!("{status:?}"),
        })
    }
}

/// The compute type of a call, and the checks of its operands: A and B share one element
/// type (bf16 on tensor cores with f32 accumulation into any C; f32 into an f32 C, as `mode`
/// says), and C and D share type, leading dimension and batch stride.
fn compute_type(
    a: &Mat,
    b: &Mat,
    c: &Mat,
    d: &Mat,
    mode: GemmMode,
) -> Result<sys::cublasComputeType_t, BackendError> {
    let shape = |message| BackendError::Shape {
        op: "gemm",
        message,
    };
    if (c.dtype, c.ld, c.stride) != (d.dtype, d.ld, d.stride) {
        return Err(shape(format!(
            "C and D differ in type, leading dimension or batch stride: {c:?} vs {d:?}"
        )));
    }
    match (a.dtype, b.dtype, c.dtype) {
        (DType::Bf16, DType::Bf16, _) => Ok(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F),
        (DType::F32, DType::F32, DType::F32) => Ok(mode.compute_type()),
        other => Err(shape(format!(
            "operand types (A, B, C) = {other:?} are not supported"
        ))),
    }
}

/// Bytes of C to copy into D before a C != D call on `cublasGemmEx`: only one contiguous
/// `[M, N]` matrix can be copied so.
fn contiguous_bytes(c: &Mat, m: usize, n: usize, batch: usize) -> Result<usize, BackendError> {
    if c.ld != n || batch != 1 {
        return Err(BackendError::Shape {
            op: "gemm",
            message: format!(
                "without cuBLASLt, C != D needs one contiguous matrix (ld {} for N = {n}, batch {batch})",
                c.ld
            ),
        });
    }
    Ok(m * n * c.dtype.size())
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
        self.gemm_into(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, c, batch)
    }

    /// [`CudaBackend::gemm`] with a separate output: `D = alpha op(A) op(B) + beta C`, C only
    /// read (it may be D itself). C and D share type, leading dimension and batch stride.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_into(
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
        d: Mat,
        batch: usize,
    ) -> Result<(), BackendError> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let ct = compute_type(&a, &b, &c, &d, self.gemm_mode)?;
        let key = PlanKey::new(trans_a, trans_b, m, n, k, &a, &b, &c, &d, batch, ct);
        let ops = Operands {
            alpha,
            a,
            b,
            beta,
            c,
            d,
        };
        if let Some(lt) = &self.lt {
            if lt.matmul(self, &key, &ops)? {
                return Ok(());
            }
        }
        if c.ptr != d.ptr {
            self.copy_matrix(&c, &d, m, n, batch)?;
        }
        self.gemm_ex(&key, &ops)
    }

    /// D = C for a contiguous `[M, N]` matrix (the fallback of a C != D call without cuBLASLt).
    fn copy_matrix(
        &self,
        c: &Mat,
        d: &Mat,
        m: usize,
        n: usize,
        batch: usize,
    ) -> Result<(), BackendError> {
        let bytes = contiguous_bytes(c, m, n, batch)?;
        // SAFETY: the callers checked both buffers hold M N elements of this type; same stream.
        unsafe {
            cudarc::driver::sys::cuMemcpyDtoDAsync_v2(d.ptr, c.ptr, bytes, self.stream.cu_stream())
                .result()
        }
        .map_err(super::drv("gemm (copy C to D)"))
    }

    /// The plain cuBLAS call, for shapes where cuBLASLt has no algorithm or its algorithms
    /// timed slower (see `lt.rs`). It reads C from D (`ops.c` is not used: D holds C already).
    pub(super) fn gemm_ex(&self, key: &PlanKey, ops: &Operands) -> Result<(), BackendError> {
        let Operands {
            alpha,
            a,
            b,
            beta,
            d: c,
            ..
        } = *ops;
        let (m, n, k, batch) = (key.m, key.n, key.k, key.batch);
        let ct = key.compute;
        let (ta, tb, tc) = (cuda_type(a.dtype), cuda_type(b.dtype), cuda_type(c.dtype));
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let h = *self.blas.handle();
        // SAFETY: the callers pass pointers into live buffers whose lengths they checked against
        // m, n, k, the leading dimensions and the batch strides; cuBLAS runs on our stream.
        let status = unsafe {
            if batch == 1 {
                sys::cublasGemmEx(
                    h,
                    op(key.trans_b),
                    op(key.trans_a),
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
                    op(key.trans_b),
                    op(key.trans_a),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(dtype: DType, ld: usize) -> Mat {
        Mat {
            ptr: 0x1000,
            dtype,
            ld,
            stride: 0,
        }
    }

    #[test]
    fn operand_types_and_c_d_mismatches_are_errors() {
        let (f, h) = (mat(DType::F32, 8), mat(DType::Bf16, 8));
        fn ok(
            a: &Mat,
            b: &Mat,
            c: &Mat,
            d: &Mat,
        ) -> Result<sys::cublasComputeType_t, BackendError> {
            compute_type(a, b, c, d, GemmMode::Bf16)
        }
        assert!(ok(&h, &h, &f, &f).is_ok());
        assert!(ok(&h, &h, &h, &h).is_ok());
        assert_eq!(
            ok(&f, &f, &f, &f).unwrap(),
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF
        );
        let msg = |r: Result<_, BackendError>| r.unwrap_err().to_string();
        assert!(msg(ok(&h, &f, &f, &f)).contains("not supported"));
        assert!(msg(ok(&f, &f, &h, &h)).contains("not supported"));
        // C and D: another type, another leading dimension, another batch stride.
        assert!(msg(ok(&h, &h, &f, &h)).contains("C and D differ"));
        assert!(msg(ok(&h, &h, &f, &mat(DType::F32, 9))).contains("C and D differ"));
        let strided = Mat { stride: 64, ..f };
        assert!(msg(ok(&h, &h, &f, &strided)).contains("C and D differ"));
    }

    #[test]
    fn only_one_contiguous_matrix_is_copied_into_d() {
        assert_eq!(contiguous_bytes(&mat(DType::Bf16, 8), 3, 8, 1).unwrap(), 48);
        for (ld, batch) in [(9, 1), (8, 2)] {
            let e = contiguous_bytes(&mat(DType::F32, ld), 3, 8, batch).unwrap_err();
            assert!(e.to_string().contains("contiguous"), "{e}");
        }
    }
}
