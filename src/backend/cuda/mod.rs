//! The CUDA backend: cudarc loaded at run time (the crate builds with no CUDA installed), one
//! context and one compute stream per rank, kernels compiled by NVRTC from `kernels/*.cu`,
//! GEMMs through cuBLASLt (`gemm.rs`, plans in `lt.rs`).
//!
//! Storage (`buf.rs`): parameters, gradients and optimizer moments are f32; activations
//! (`Backend::alloc_act`) are bf16, or f32 with `PACKTRAIN_ACTIVATIONS=f32`. Every kernel takes
//! either precision per buffer and computes in f32. GEMMs run on bf16 tensor cores with f32
//! accumulation (bf16 operands; f32 operands through `CUBLAS_COMPUTE_32F_FAST_16BF`).
//!
//! `IdxBuf` keeps a host mirror of what was uploaded, so ops that schedule per document
//! (attention) read `cu_seqlens` without a device sync.

mod buf;
mod compile;
mod gemm;
mod lt;
mod ops;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};

use super::{AdamWStep, AdamWTensor, AttnDims, Backend, BackendError, GradWrite};

pub(crate) use buf::Ten;
pub use buf::{CudaBuf, DType};
pub use compile::{arch_name, cache_dir, cuda_include_dir, KernelSource, SOURCES};
pub use gemm::GemmMode;

/// Why CUDA cannot be used, or what failed on it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{what} not found: {hint}")]
    Missing { what: String, hint: String },
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("unsupported GPU: {0}")]
    Unsupported(String),
    #[error("NVRTC could not compile {file}:\n{log}")]
    Compile { file: &'static str, log: String },
    #[error("CUDA driver error in {op}: {message}")]
    Driver { op: &'static str, message: String },
    #[error("kernel {0} not found in any compiled module")]
    NoKernel(String),
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Driver { op, message } => BackendError::Device { op, message },
            other => BackendError::Unavailable {
                backend: "cuda",
                message: other.to_string(),
            },
        }
    }
}

/// Wrap a cudarc driver error (which is only `Debug`) with the op it broke.
pub(crate) fn drv<E: std::fmt::Debug>(op: &'static str) -> impl FnOnce(E) -> BackendError {
    move |e| BackendError::Device {
        op,
        message: format!("{e:?}"),
    }
}

/// i32 buffer on the device plus the host copy of what was last uploaded.
pub struct CudaIdx {
    pub dev: CudaSlice<i32>,
    pub host: Vec<i32>,
}

/// One GPU: context, stream, cuBLAS handle and every compiled kernel.
pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// cuBLASLt and its per-shape plans (`None` where libcublasLt is missing).
    pub(crate) lt: Option<lt::Lt>,
    kernels: HashMap<String, CudaFunction>,
    pub arch: &'static str,
    /// Streaming multiprocessors of the GPU (the flash backward sizes its work split by them).
    pub sm_count: usize,
    pub device_name: String,
    pub gemm_mode: GemmMode,
    /// Storage of `alloc_act` buffers.
    pub act_dtype: DType,
    /// The flash kernels' work lists of the last `cu_seqlens` (ops/flash_attention.rs).
    pub(crate) flash_items: std::sync::Mutex<Option<ops::flash_items::ItemsCache>>,
    /// The warp-specialised flash forward's schedule of the last `cu_seqlens`.
    pub(crate) flash_ws: std::sync::Mutex<Option<ops::flash_items::WsCache>>,
    /// The warp-specialised dK/dV kernel's schedule of the last `cu_seqlens`.
    pub(crate) flash_ws_bwd: std::sync::Mutex<Option<ops::flash_items::WsCache>>,
}

/// Check that the driver and cuBLAS libraries can be loaded, naming the first that cannot.
pub fn probe_libraries() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen the libraries.
    let checks: [(&str, bool); 3] = unsafe {
        [
            (
                "the CUDA driver (libcuda.so)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "cuBLAS (libcublas.so)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "NVRTC (libnvrtc.so)",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
        ]
    };
    for (what, present) in checks {
        if !present {
            return Err(CudaError::Missing {
                what: what.into(),
                hint: "install the NVIDIA driver and CUDA 13 toolkit, or put their lib directories on LD_LIBRARY_PATH"
                    .into(),
            });
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Open GPU `ordinal`, compile (or load from the cache) every kernel.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        probe_libraries()?;
        let d = |op| {
            move |e: cudarc::driver::DriverError| CudaError::Driver {
                op,
                message: format!("{e:?}"),
            }
        };
        let count =
            CudaContext::device_count().map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
        if ordinal as i32 >= count {
            return Err(CudaError::NoDevice(format!(
                "GPU {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(d("cuCtxCreate"))?;
        // One stream does all the work, so cudarc's cross-stream event tracking is not needed.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_freed_memory(&ctx).map_err(d("cuMemPoolSetAttribute"))?;
        let (major, minor) = ctx.compute_capability().map_err(d("compute_capability"))?;
        let arch = arch_name(major, minor)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(d("multiprocessor count"))?
            .max(1) as usize;
        let device_name = ctx.name().map_err(d("device name"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver {
            op: "cublasCreate",
            message: format!("{e:?}"),
        })?;
        ctx.bind_to_thread().map_err(d("cuCtxSetCurrent"))?;
        let lt = lt::Lt::new(&stream).map_err(|e| CudaError::Driver {
            op: "cublasLtCreate",
            message: e.to_string(),
        })?;
        let mut kernels = HashMap::new();
        for file in SOURCES.iter().filter(|f| f.file.ends_with(".cu")) {
            let ptx = compile::compile(file, arch)?;
            let names: Vec<String> = ptx
                .to_src()
                .lines()
                .filter_map(|l| l.split(".entry ").nth(1))
                .map(|rest| rest.trim_end_matches(['(', ' ']).to_string())
                .collect();
            let module = ctx.load_module(ptx).map_err(d("cuModuleLoadData"))?;
            for name in names {
                let f = module
                    .load_function(&name)
                    .map_err(d("cuModuleGetFunction"))?;
                kernels.insert(name, f);
            }
        }
        Ok(Self {
            ctx,
            stream,
            blas,
            lt,
            kernels,
            arch,
            sm_count,
            device_name,
            gemm_mode: GemmMode::from_env(),
            act_dtype: match std::env::var("PACKTRAIN_ACTIVATIONS").as_deref() {
                Ok("f32") => DType::F32,
                _ => DType::Bf16,
            },
            flash_items: std::sync::Mutex::new(None),
            flash_ws: std::sync::Mutex::new(None),
            flash_ws_bwd: std::sync::Mutex::new(None),
        })
    }

    /// A compiled kernel by its `extern "C"` name.
    pub(crate) fn kernel(&self, name: &str) -> Result<&CudaFunction, BackendError> {
        self.kernels
            .get(name)
            .ok_or_else(|| CudaError::NoKernel(name.to_string()).into())
    }

    /// Bytes of device memory in use on this GPU (all processes), for peak-memory reports.
    pub fn memory_used(&self) -> Result<usize, BackendError> {
        let (free, total) = self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?;
        Ok(total - free)
    }
}

/// cudarc allocates from the device's default memory pool, stream-ordered
/// (`cuMemAllocAsync`). That pool's release threshold starts at 0: at every synchronize it
/// hands all freed memory back to the driver, so the per-call scratch of the next step
/// (attention staging, norms' partials, conversions: hundreds of MB per layer) has to be
/// mapped again, several times per step. Keeping it makes a steady-state step allocate
/// nothing new; the memory stays this process's, so `memory_used` reports the true peak.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` and `threshold` outlive the calls; the device belongs to `ctx`.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
    }
}

/// Blocks of `threads` covering `n` items.
pub(crate) fn grid_1d(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch `name` over `cfg` with the arguments `push` adds, then check the launch.
pub(crate) fn launch<'a>(
    be: &'a CudaBackend,
    name: &'static str,
    cfg: LaunchConfig,
    push: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
) -> Result<(), BackendError> {
    let f = be.kernel(name)?;
    let mut b = be.stream.launch_builder(f);
    push(&mut b);
    // SAFETY: every launcher checks its buffers' lengths against the dims it passes before
    // calling here, and the kernels index only within those dims.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(drv(name))
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type IdxBuf = CudaIdx;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, len: usize) -> Result<Self::Buf, BackendError> {
        self.alloc_dtype(len, DType::F32)
    }
    fn alloc_act(&self, len: usize) -> Result<Self::Buf, BackendError> {
        self.alloc_dtype(len, self.act_dtype)
    }
    fn activations_are_f32(&self) -> bool {
        self.act_dtype == DType::F32
    }
    fn alloc_idx(&self, len: usize) -> Result<Self::IdxBuf, BackendError> {
        Ok(CudaIdx {
            dev: self
                .stream
                .alloc_zeros::<i32>(len.max(1))
                .map_err(drv("alloc_idx"))?,
            host: Vec::new(),
        })
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        buf.len()
    }
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<(), BackendError> {
        ops::need("upload", "destination", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let n = src.len();
        match dst {
            CudaBuf::F32(d) => self.stream.memcpy_htod(src, &mut d.slice_mut(..n)),
            CudaBuf::Bf16(d) => {
                let host = buf::to_bf16(src);
                self.stream
                    .memcpy_htod(&host, &mut d.slice_mut(..n))
                    .and_then(|_| self.stream.synchronize())
            }
        }
        .map_err(drv("upload"))
    }
    fn upload_idx(&self, dst: &mut Self::IdxBuf, src: &[i32]) -> Result<(), BackendError> {
        ops::need("upload_idx", "destination", dst.dev.len(), src.len())?;
        dst.host.clear();
        dst.host.extend_from_slice(src);
        if src.is_empty() {
            return Ok(());
        }
        let mut view = dst.dev.slice_mut(..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(drv("upload_idx"))
    }
    fn download(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>, BackendError> {
        ops::need("download", "source", src.len(), len)?;
        let mut out = vec![0.0f32; len];
        match src {
            CudaBuf::F32(s) if len > 0 => self
                .stream
                .memcpy_dtoh(&s.slice(..len), &mut out)
                .map_err(drv("download"))?,
            CudaBuf::Bf16(s) if len > 0 => {
                let mut host = vec![half::bf16::ZERO; len];
                self.stream
                    .memcpy_dtoh(&s.slice(..len), &mut host)
                    .map_err(drv("download"))?;
                self.stream.synchronize().map_err(drv("download"))?;
                for (o, h) in out.iter_mut().zip(&host) {
                    *o = h.to_f32();
                }
                return Ok(out);
            }
            _ => {}
        }
        self.stream.synchronize().map_err(drv("download"))?;
        Ok(out)
    }
    fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<(), BackendError> {
        ops::need("zero", "buffer", buf.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        match buf {
            CudaBuf::F32(b) => self.stream.memset_zeros(&mut b.slice_mut(..len)),
            CudaBuf::Bf16(b) => self.stream.memset_zeros(&mut b.slice_mut(..len)),
        }
        .map_err(drv("zero"))
    }
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<(), BackendError> {
        ops::need("copy", "destination", dst.len(), len)?;
        ops::need("copy", "source", src.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        match (dst, src) {
            (CudaBuf::F32(d), CudaBuf::F32(s)) => self
                .stream
                .memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len))
                .map_err(drv("copy")),
            (CudaBuf::Bf16(d), CudaBuf::Bf16(s)) => self
                .stream
                .memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len))
                .map_err(drv("copy")),
            (dst, src) => ops::elementwise::convert(self, dst, src, len),
        }
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &CudaIdx,
        wte: &Self::Buf,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        ops::embedding::forward(self, out, tokens, wte, t, c)
    }
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dout: &Self::Buf,
        tokens: &CudaIdx,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        ops::embedding::backward(self, dwte, dout, tokens, t, c)
    }
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        t: usize,
        c: usize,
        eps: f32,
    ) -> Result<(), BackendError> {
        ops::rmsnorm::forward(self, out, rstd, x, weight, t, c, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dx_copy: Option<&mut Self::Buf>,
        dweight: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        t: usize,
        c: usize,
        dweight_write: GradWrite,
    ) -> Result<(), BackendError> {
        ops::rmsnorm::backward(
            self,
            dx,
            dx_copy,
            dweight,
            dout,
            x,
            weight,
            rstd,
            t,
            c,
            dweight_write,
        )
    }
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        ops::matmul::forward(self, out, x, w, bias, t, ic, oc)
    }
    fn matmul_forward_residual(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        residual: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        ops::matmul::forward_residual(self, out, x, w, residual, t, ic, oc)
    }
    fn matmul_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
        write: GradWrite,
    ) -> Result<(), BackendError> {
        ops::matmul::backward(self, dx, dw, dbias, dout, x, w, t, ic, oc, write)
    }
    fn matmul_backward_input(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        w: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        ops::matmul::backward_input(self, dx, dout, w, t, ic, oc)
    }
    fn matmul_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        x: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
        write: GradWrite,
    ) -> Result<(), BackendError> {
        ops::matmul::backward_weight(self, dw, dbias, dout, x, t, ic, oc, write)
    }
    fn rope_forward(
        &self,
        qkv: &mut Self::Buf,
        positions: &CudaIdx,
        inv_freq: &Self::Buf,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        ops::rope::apply(self, qkv, positions, inv_freq, dims, false)
    }
    fn rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        positions: &CudaIdx,
        inv_freq: &Self::Buf,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        ops::rope::apply(self, dqkv, positions, inv_freq, dims, true)
    }
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        cu_seqlens: &CudaIdx,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        ops::attention::forward_any(self, out, lse, qkv, cu_seqlens, dims)
    }
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        cu_seqlens: &CudaIdx,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        ops::attention::backward_any(self, dqkv, dout, qkv, out, lse, cu_seqlens, dims)
    }
    fn attention_rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        positions: &CudaIdx,
        inv_freq: &Self::Buf,
        cu_seqlens: &CudaIdx,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        use ops::flash_attention::{backward_rope, fuses_rope};
        if fuses_rope(self, &dims, &[dqkv, dout, qkv, out], lse, inv_freq) {
            return backward_rope(
                self, dqkv, dout, qkv, out, lse, positions, inv_freq, cu_seqlens, dims,
            );
        }
        self.attention_backward(dqkv, dout, qkv, out, lse, cu_seqlens, dims)?;
        self.rope_backward(dqkv, positions, inv_freq, dims)
    }
    fn swiglu_forward(
        &self,
        out: &mut Self::Buf,
        gate_up: &Self::Buf,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError> {
        ops::swiglu::forward(self, out, gate_up, t, f)
    }
    fn swiglu_backward(
        &self,
        dgate_up: &mut Self::Buf,
        s: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        gate_up: &Self::Buf,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError> {
        ops::swiglu::backward(self, dgate_up, s, dout, gate_up, t, f)
    }
    fn add_inplace(
        &self,
        acc: &mut Self::Buf,
        x: &Self::Buf,
        n: usize,
    ) -> Result<(), BackendError> {
        ops::elementwise::add_inplace(self, acc, x, n)
    }
    fn classifier(
        &self,
        losses: &mut Self::Buf,
        grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
        x: &Self::Buf,
        w: &Self::Buf,
        targets: &CudaIdx,
        loss_scale: f32,
        t: usize,
        c: usize,
        v: usize,
        dw_write: GradWrite,
    ) -> Result<(), BackendError> {
        ops::classifier::forward_backward(
            self, losses, grads, x, w, targets, loss_scale, t, c, v, dw_write,
        )
    }
    fn sum_squares(&self, bufs: &[(&Self::Buf, usize)]) -> Result<f64, BackendError> {
        ops::adamw::sum_squares(self, bufs)
    }
    fn scale(&self, buf: &mut Self::Buf, n: usize, s: f32) -> Result<(), BackendError> {
        ops::elementwise::scale(self, buf, n, s)
    }
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        const OP: &str = "adamw";
        let (p, m, v) = (param.f32_mut(OP)?, m.f32_mut(OP)?, v.f32_mut(OP)?);
        ops::adamw::step(self, p, grad, m, v, None, n, hp)
    }
    fn adamw_with_copy(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        working: &mut Self::Buf,
        n: usize,
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        const OP: &str = "adamw";
        let (p, m, v) = (param.f32_mut(OP)?, m.f32_mut(OP)?, v.f32_mut(OP)?);
        ops::adamw::step(self, p, grad, m, v, Some(working), n, hp)
    }
    fn adamw_tensors(
        &self,
        tensors: &mut [AdamWTensor<'_, Self::Buf>],
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        ops::adamw::step_tensors(self, tensors, hp)
    }
}

impl CudaBackend {
    /// Raw device address of a buffer (for cuBLAS), valid while `b` lives.
    pub(crate) fn ptr<T>(&self, b: &CudaSlice<T>) -> cudarc::driver::sys::CUdeviceptr {
        use cudarc::driver::DevicePtr;
        // Event tracking is off (one stream), so the guard has nothing to record.
        let (p, _guard) = b.device_ptr(&self.stream);
        p
    }
}
