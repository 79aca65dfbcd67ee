//! cuBLASLt plans: one matmul descriptor, four layouts and an algorithm per GEMM shape, built
//! the first time the shape is seen and reused after (the layer GEMMs of a model repeat the
//! same handful of shapes every layer and step, so planning costs nothing in steady state).
//!
//! The algorithm is tuned on the first use of a shape's bucket (M, N, K rounded up to 1/16 of
//! their power of two, so the token counts of successive packed batches share one tuning;
//! default, `PACKTRAIN_GEMM_TUNE=0` takes cuBLASLt's first heuristic result instead): the first [`TUNE_CANDIDATES`] heuristic results, and for C = D
//! calls plain `cublasGemmEx` too, are each timed ([`TUNE_RUNS`] runs after one warm-up, CUDA
//! events, on the call's own operands) and the fastest kept. Why: the heuristic ranks by a model
//! of the kernel, and on an H100 its first choice was up to 10 % slower than the best of its
//! own list on TinyLlama's shapes, and for some shapes (a weight gradient with K = 16384)
//! cuBLAS's own pick beat all of them. Timing an accumulating call (`beta != 0` with C = D)
//! writes into a zeroed scratch D, so tuning never changes a result. The choice is per process:
//! ranks may pick different algorithms for one shape, which changes rounding, not the
//! all-reduced gradients every rank applies.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublas::sys::cublasComputeType_t as ComputeType;
use cudarc::cublaslt::sys as lsys;
use cudarc::driver::CudaSlice;

use super::buf::DType;
use super::gemm::Mat;
use super::{drv, CudaBackend};
use crate::backend::BackendError;

/// Workspace given to every cuBLASLt call (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;
/// Heuristic results timed per shape when tuning.
const TUNE_CANDIDATES: usize = 16;
/// Timed runs per candidate.
const TUNE_RUNS: usize = 3;

/// What a plan depends on. Rows of `a`/`b`/`d` are the row-major operands of
/// `CudaBackend::gemm_into` (not yet swapped for column-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub compute: ComputeType,
    ld: [usize; 3],
    stride: [usize; 3],
    dtype: [DType; 3],
    /// Largest power of two (at most 256) dividing each operand's address (C and D together).
    align: [u32; 3],
}

fn alignment(ptrs: &[u64]) -> u32 {
    ptrs.iter()
        .map(|p| 1u32 << p.trailing_zeros().min(8))
        .min()
        .unwrap_or(256)
}

/// `x` rounded up to a multiple of 1/16 of its power of two (at least 256): the token count of
/// a packed batch changes a little from step to step, and those shapes share one tuning.
fn bucket(x: usize) -> usize {
    let step = (x.next_power_of_two() / 16).max(256);
    x.div_ceil(step) * step
}

impl PlanKey {
    /// The key of the tuning this shape shares with its neighbours: M, N, K bucketed.
    fn tuning(&self) -> Self {
        Self {
            m: bucket(self.m),
            n: bucket(self.n),
            k: bucket(self.k),
            ..*self
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &Mat,
        b: &Mat,
        c: &Mat,
        d: &Mat,
        batch: usize,
        compute: ComputeType,
    ) -> Self {
        Self {
            trans_a,
            trans_b,
            m,
            n,
            k,
            batch,
            compute,
            ld: [a.ld, b.ld, d.ld],
            stride: [a.stride, b.stride, d.stride],
            dtype: [a.dtype, b.dtype, d.dtype],
            align: [
                alignment(&[a.ptr]),
                alignment(&[b.ptr]),
                alignment(&[c.ptr, d.ptr]),
            ],
        }
    }

    /// Bytes from D's first element to one past its last.
    fn d_bytes(&self) -> usize {
        let elems = (self.batch - 1) * self.stride[2] + (self.m - 1) * self.ld[2] + self.n;
        elems * self.dtype[2].size()
    }
}

/// The operands of one `D = alpha op(A) op(B) + beta C` call (C may be D itself).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operands {
    pub alpha: f32,
    pub a: Mat,
    pub b: Mat,
    pub beta: f32,
    pub c: Mat,
    pub d: Mat,
}

fn poisoned(what: &str) -> BackendError {
    BackendError::Device {
        op: "gemm",
        message: format!("cuBLASLt {what} cache poisoned by an earlier panic"),
    }
}

fn status(s: lsys::cublasStatus_t, what: &'static str) -> Result<(), BackendError> {
    if s == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Device {
            op: what,
            message: format!("{s:?}"),
        })
    }
}

fn data_type(d: DType) -> lsys::cudaDataType_t {
    match d {
        DType::F32 => lsys::cudaDataType_t::CUDA_R_32F,
        DType::Bf16 => lsys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn compute_type(c: ComputeType) -> lsys::cublasComputeType_t {
    use lsys::cublasComputeType_t as L;
    match c {
        ComputeType::CUBLAS_COMPUTE_32F_FAST_16BF => L::CUBLAS_COMPUTE_32F_FAST_16BF,
        ComputeType::CUBLAS_COMPUTE_32F_FAST_TF32 => L::CUBLAS_COMPUTE_32F_FAST_TF32,
        _ => L::CUBLAS_COMPUTE_32F,
    }
}

/// Set one attribute of a layout to `value` (its C type is `T`).
///
/// # Safety
/// `l` is a live layout and `T` the attribute's type.
unsafe fn set_layout_attr<T>(
    l: lsys::cublasLtMatrixLayout_t,
    attr: lsys::cublasLtMatrixLayoutAttribute_t,
    value: T,
) -> Result<(), BackendError> {
    status(
        lsys::cublasLtMatrixLayoutSetAttribute(
            l,
            attr,
            &value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        ),
        "cublasLtMatrixLayoutSetAttribute",
    )
}

/// A column-major layout of `rows x cols`, `ld` apart, `batch` matrices `stride` apart.
fn layout(
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
) -> Result<lsys::cublasLtMatrixLayout_t, BackendError> {
    let mut l: lsys::cublasLtMatrixLayout_t = std::ptr::null_mut();
    // SAFETY: `l` is written by the call; the attribute values outlive their calls.
    unsafe {
        status(
            lsys::cublasLtMatrixLayoutCreate(
                &mut l,
                data_type(dtype),
                rows as u64,
                cols as u64,
                ld as i64,
            ),
            "cublasLtMatrixLayoutCreate",
        )?;
        if batch > 1 {
            use lsys::cublasLtMatrixLayoutAttribute_t as A;
            set_layout_attr(l, A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, batch as i32)?;
            set_layout_attr(
                l,
                A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                stride as i64,
            )?;
        }
    }
    Ok(l)
}

/// Descriptors and the chosen algorithm of one shape (column-major: A is our B, B our A).
struct Plan {
    desc: lsys::cublasLtMatmulDesc_t,
    /// Layouts of cuBLASLt's A, B and C = D.
    layouts: [lsys::cublasLtMatrixLayout_t; 3],
    algo: lsys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new`, destroyed once; errors at teardown are ignored.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    lsys::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                lsys::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

/// The descriptors of `key` with an empty algorithm (filled by [`Lt::choose`]).
fn describe(key: &PlanKey) -> Result<Plan, BackendError> {
    let mut plan = Plan {
        desc: std::ptr::null_mut(),
        layouts: [std::ptr::null_mut(); 3],
        algo: lsys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    // SAFETY: `plan.desc` is written by the call; attribute values outlive their calls.
    unsafe {
        status(
            lsys::cublasLtMatmulDescCreate(
                &mut plan.desc,
                compute_type(key.compute),
                lsys::cudaDataType_t::CUDA_R_32F,
            ),
            "cublasLtMatmulDescCreate",
        )?;
        use lsys::cublasLtMatmulDescAttributes_t as A;
        // cublasOperation_t: 0 = N, 1 = T. Column-major A is our B, B is our A.
        for (attr, t) in [
            (A::CUBLASLT_MATMUL_DESC_TRANSA, key.trans_b),
            (A::CUBLASLT_MATMUL_DESC_TRANSB, key.trans_a),
        ] {
            let v = t as i32;
            status(
                lsys::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    attr,
                    &v as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                ),
                "cublasLtMatmulDescSetAttribute",
            )?;
        }
    }
    let (m, n, k) = (key.m, key.n, key.k);
    // Column-major A (our B) is op^-1 of [N, K]; B (our A) op^-1 of [K, M]; D is [N, M].
    let (a_rows, a_cols) = if key.trans_b { (k, n) } else { (n, k) };
    let (b_rows, b_cols) = if key.trans_a { (m, k) } else { (k, m) };
    plan.layouts = [
        layout(
            key.dtype[1],
            a_rows,
            a_cols,
            key.ld[1],
            key.batch,
            key.stride[1],
        )?,
        layout(
            key.dtype[0],
            b_rows,
            b_cols,
            key.ld[0],
            key.batch,
            key.stride[0],
        )?,
        layout(key.dtype[2], n, m, key.ld[2], key.batch, key.stride[2])?,
    ];
    Ok(plan)
}

/// The cuBLASLt handle, its workspace and the plans of every shape seen so far.
pub(crate) struct Lt {
    handle: lsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// `None`: cuBLAS's `cublasGemmEx` for that shape (no cuBLASLt algorithm, or it timed
    /// faster).
    plans: Mutex<HashMap<PlanKey, Option<Plan>>>,
    /// The tuned choice per bucketed shape ([`PlanKey::tuning`]): an exact shape first seen
    /// after its bucket was tuned reuses the choice (checked with `cublasLtMatmulAlgoCheck`)
    /// instead of timing again. `None`: `cublasGemmEx`.
    tuned: Mutex<HashMap<PlanKey, Option<lsys::cublasLtMatmulAlgo_t>>>,
    tune: bool,
}

// SAFETY: the handle and every plan are only used while `plans` is locked, on the backend's
// one stream; cuBLASLt handles may move between threads.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(plans) = self.plans.get_mut() {
            plans.clear();
        }
        // SAFETY: created in `Lt::new`, destroyed once.
        unsafe {
            lsys::cublasLtDestroy(self.handle);
        }
    }
}

impl Lt {
    /// A handle and workspace on `be`'s stream, or `None` when libcublasLt cannot be loaded
    /// (every GEMM then goes through cuBLAS).
    pub fn new(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Option<Self>, BackendError> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { lsys::is_culib_present() } {
            tracing::warn!("libcublasLt not found: GEMMs go through cublasGemmEx, without the fused residual add");
            return Ok(None);
        }
        let mut handle: lsys::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: `handle` is written by the call.
        status(
            unsafe { lsys::cublasLtCreate(&mut handle) },
            "cublasLtCreate",
        )?;
        // SAFETY: the workspace is only handed to cuBLASLt, which never reads it uninitialised.
        let workspace =
            unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(drv("cublasLt workspace"))?;
        let tune = !matches!(std::env::var("PACKTRAIN_GEMM_TUNE").as_deref(), Ok("0"));
        Ok(Some(Self {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            tuned: Mutex::new(HashMap::new()),
            tune,
        }))
    }

    /// Run the call with the plan of `key` (built on first use). `Ok(false)`: this shape goes
    /// to `cublasGemmEx` (nothing was queued).
    pub fn matmul(
        &self,
        be: &CudaBackend,
        key: &PlanKey,
        ops: &Operands,
    ) -> Result<bool, BackendError> {
        let mut plans = self.plans.lock().map_err(|_| poisoned("plan"))?;
        be.ctx.bind_to_thread().map_err(drv("gemm"))?;
        let plan = match plans.entry(*key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.choose(be, key, ops)?),
        };
        match plan {
            Some(plan) => {
                self.run(be, plan, &plan.algo, ops)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// `ops` with `plan` and `algo` on the backend's stream.
    fn run(
        &self,
        be: &CudaBackend,
        plan: &Plan,
        algo: &lsys::cublasLtMatmulAlgo_t,
        ops: &Operands,
    ) -> Result<(), BackendError> {
        let ws = self.workspace_ptr(be);
        // SAFETY: the callers checked every operand's extent against the plan's dims, leading
        // dimensions and strides; the workspace holds WORKSPACE_BYTES; our stream.
        let s = unsafe {
            lsys::cublasLtMatmul(
                self.handle,
                plan.desc,
                &ops.alpha as *const f32 as *const c_void,
                ops.b.ptr as *const c_void,
                plan.layouts[0],
                ops.a.ptr as *const c_void,
                plan.layouts[1],
                &ops.beta as *const f32 as *const c_void,
                ops.c.ptr as *const c_void,
                plan.layouts[2],
                ops.d.ptr as *mut c_void,
                plan.layouts[2],
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                be.stream.cu_stream() as lsys::cudaStream_t,
            )
        };
        status(s, "cublasLtMatmul")
    }

    fn workspace_ptr(&self, be: &CudaBackend) -> u64 {
        use cudarc::driver::DevicePtr;
        let (p, _sync) = self.workspace.device_ptr(&be.stream);
        p
    }

    /// The plan of `key`: its descriptors and the heuristic's first algorithm, or when tuning
    /// the fastest of its first candidates and `cublasGemmEx`. `None`: use `cublasGemmEx`.
    fn choose(
        &self,
        be: &CudaBackend,
        key: &PlanKey,
        ops: &Operands,
    ) -> Result<Option<Plan>, BackendError> {
        let mut plan = describe(key)?;
        let want = if self.tune { TUNE_CANDIDATES } else { 1 };
        let found = self.heuristic(key, &plan, want)?;
        let Some(first) = found.first() else {
            tracing::debug!(?key, "cuBLASLt offers no algorithm; using cublasGemmEx");
            return Ok(None);
        };
        plan.algo = first.algo;
        if !self.tune {
            return Ok(Some(plan));
        }
        let bucket = key.tuning();
        let known = self
            .tuned
            .lock()
            .map_err(|_| poisoned("tuning"))?
            .get(&bucket)
            .copied();
        let choice = match known {
            Some(None) if ops.c.ptr == ops.d.ptr => return Ok(None),
            Some(Some(algo)) if self.algo_fits(&plan, &algo) => Some(algo),
            // The bucket's choice does not apply to this exact shape: the heuristic's first.
            Some(_) => Some(first.algo),
            None => {
                let best = self.fastest(be, key, &plan, &found, ops)?;
                self.tuned
                    .lock()
                    .map_err(|_| poisoned("tuning"))?
                    .insert(bucket, best);
                best
            }
        };
        Ok(choice.map(|algo| {
            plan.algo = algo;
            plan
        }))
    }

    /// Whether `algo` (tuned on a neighbouring shape) runs this plan's exact shape within the
    /// workspace.
    fn algo_fits(&self, plan: &Plan, algo: &lsys::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: descriptors from `describe`; `result` is written by the call.
        unsafe {
            let mut result: lsys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let s = lsys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                algo,
                &mut result,
            );
            s == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.workspaceSize <= WORKSPACE_BYTES
        }
    }

    fn heuristic(
        &self,
        key: &PlanKey,
        plan: &Plan,
        want: usize,
    ) -> Result<Vec<lsys::cublasLtMatmulHeuristicResult_t>, BackendError> {
        let mut pref: lsys::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: `pref` is written by the create call and destroyed below; the results
        // array holds `want` entries.
        unsafe {
            status(
                lsys::cublasLtMatmulPreferenceCreate(&mut pref),
                "cublasLtMatmulPreferenceCreate",
            )?;
            let result = (|| {
                use lsys::cublasLtMatmulPreferenceAttributes_t as P;
                let ws = WORKSPACE_BYTES as u64;
                status(
                    lsys::cublasLtMatmulPreferenceSetAttribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws as *const u64 as *const c_void,
                        std::mem::size_of::<u64>(),
                    ),
                    "cublasLtMatmulPreferenceSetAttribute",
                )?;
                // cuBLASLt's A is our B.
                let [al_a, al_b, al_cd] = key.align;
                for (attr, v) in [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_b),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_a),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_cd),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_cd),
                ] {
                    status(
                        lsys::cublasLtMatmulPreferenceSetAttribute(
                            pref,
                            attr,
                            &v as *const u32 as *const c_void,
                            std::mem::size_of::<u32>(),
                        ),
                        "cublasLtMatmulPreferenceSetAttribute",
                    )?;
                }
                let mut results: Vec<lsys::cublasLtMatmulHeuristicResult_t> =
                    vec![std::mem::zeroed(); want];
                let mut count = 0i32;
                let s = lsys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    want as i32,
                    results.as_mut_ptr(),
                    &mut count,
                );
                if s != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    // NOT_SUPPORTED: no algorithm for this problem.
                    return Ok(Vec::new());
                }
                results.truncate(count.max(0) as usize);
                results.retain(|r| {
                    r.state == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                        && r.workspaceSize <= WORKSPACE_BYTES
                });
                Ok(results)
            })();
            lsys::cublasLtMatmulPreferenceDestroy(pref);
            result
        }
    }

    /// Time each candidate (and `cublasGemmEx` where C = D) on the call's operands: the
    /// fastest algorithm, `None` for `cublasGemmEx`.
    fn fastest(
        &self,
        be: &CudaBackend,
        key: &PlanKey,
        plan: &Plan,
        found: &[lsys::cublasLtMatmulHeuristicResult_t],
        ops: &Operands,
    ) -> Result<Option<lsys::cublasLtMatmulAlgo_t>, BackendError> {
        use cudarc::driver::sys::CUevent_flags;
        const OP: &str = "gemm tuning";
        // An accumulating call reads D: time it into a zeroed scratch D so D is not changed.
        let in_place = ops.c.ptr == ops.d.ptr;
        let scratch = if ops.beta != 0.0 && in_place {
            Some(
                be.stream
                    .alloc_zeros::<u8>(key.d_bytes())
                    .map_err(drv(OP))?,
            )
        } else {
            None
        };
        let d_run = match &scratch {
            Some(s) => {
                use cudarc::driver::DevicePtr;
                Mat {
                    ptr: s.device_ptr(&be.stream).0,
                    ..ops.d
                }
            }
            None => ops.d,
        };
        // With C = D the timed runs read what they write: C follows D into the scratch.
        let timed = Operands {
            c: if in_place { d_run } else { ops.c },
            d: d_run,
            ..*ops
        };
        let ev = || be.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let (start, end) = (ev().map_err(drv(OP))?, ev().map_err(drv(OP))?);
        // Mean time of TUNE_RUNS runs of `f` after one warm-up; None if it fails to launch.
        let time = |f: &dyn Fn() -> Result<(), BackendError>| -> Result<Option<f32>, BackendError> {
            if f().is_err() {
                return Ok(None);
            }
            start.record(&be.stream).map_err(drv(OP))?;
            for _ in 0..TUNE_RUNS {
                f()?;
            }
            end.record(&be.stream).map_err(drv(OP))?;
            Ok(Some(
                start.elapsed_ms(&end).map_err(drv(OP))? / TUNE_RUNS as f32,
            ))
        };
        let mut best: (f32, Option<lsys::cublasLtMatmulAlgo_t>) = (f32::INFINITY, None);
        let mut heuristic_ms = f32::NAN;
        for (i, cand) in found.iter().enumerate() {
            let run = || self.run(be, plan, &cand.algo, &timed);
            if let Some(ms) = time(&run)? {
                if i == 0 {
                    heuristic_ms = ms;
                }
                if ms < best.0 {
                    best = (ms, Some(cand.algo));
                }
            }
        }
        let mut gemm_ex_ms = f32::NAN;
        if in_place {
            if let Some(ms) = time(&|| be.gemm_ex(key, &timed))? {
                gemm_ex_ms = ms;
                if ms < best.0 {
                    best = (ms, None);
                }
            }
        }
        if best.0.is_infinite() {
            return Err(BackendError::Device {
                op: OP,
                message: format!("no GEMM algorithm ran for {key:?}"),
            });
        }
        tracing::debug!(
            m = key.m,
            n = key.n,
            k = key.k,
            batch = key.batch,
            candidates = found.len(),
            heuristic_us = heuristic_ms * 1e3,
            gemm_ex_us = gemm_ex_ms * 1e3,
            best_us = best.0 * 1e3,
            lt = best.1.is_some(),
            "cuBLASLt algorithm tuned"
        );
        Ok(best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn token_counts_of_full_batches_share_a_bucket() {
        // Packed batches of a 16384-token budget hold 16100..=16384 tokens.
        assert!((16129..=16384).all(|t| bucket(t) == 16384));
        assert_eq!(bucket(2048), 2048);
        assert_eq!(bucket(2049), 2304);
        assert_eq!(bucket(1), 256);
        assert_eq!(bucket(4194), 4608);
        // Never smaller than the shape, and idempotent.
        for x in [1, 255, 257, 3789, 11264, 32000, 65537] {
            assert!(bucket(x) >= x);
            assert_eq!(bucket(bucket(x)), bucket(x));
        }
    }
}
