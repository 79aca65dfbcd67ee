//! Varlen causal flash attention (FlashAttention-2 style) for head dims 64 and 128:
//! `kernels/flash_forward.cu` and `kernels/flash_backward.cu` (their shared helpers in
//! `kernels/flash_common.cuh`), bf16 tensor-core MMAs (`mma.sync m16n8k16`) with f32
//! accumulation, never materialising the scores. On Hopper bf16 attention runs on warpgroup MMAs
//! instead (`kernels/flash_{forward,backward}_wgmma.cu`, helpers in `kernels/flash_wgmma.cuh`:
//! the same items, math and outputs), and at D = 128 on warp-specialised persistent kernels
//! (`flash_ws.rs`). qkv, out, dout and dqkv are all f32 or all
//! bf16 (the kernels' two entry points); lse is f32 ([`native`] says whether a set of buffers
//! fits, else `attention.rs` stages them).
//!
//! Scheduling (`flash_items.rs`): the host walks `cu_seqlens` (its mirror, no device sync)
//! and lists the real (document, 64-row tile) pairs, longest work first, as int4 items
//! `{start, len, tile, 0}`; one block per (item, head), so a batch of short documents costs sum(L^2) work and no
//! block launches only to exit. Forward items are query tiles (work: tile + 1 key tiles, per
//! query head); backward items are key tiles (work: the query tiles from the diagonal to the
//! document's end, times the G query heads of the block's kv head).
//!
//! RoPE's backward can run inside the wgmma backward kernels ([`backward_rope`], behind
//! `Backend::attention_rope_backward`): dQ and dK are rotated back before they are stored.
//!
//! Which path `attention::forward_any`/`backward_any` take: `PACKTRAIN_ATTENTION=flash` or `gemm`
//! forces one (flash only for D in {64, 128}: every other head dim takes the GEMM path); unset,
//! `FLASH_BY_DEFAULT` decides.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::flash_items::{with_items, ItemsCache, Split};
use super::flash_ws::{backward_ws, forward_ws, ws_dkdv, ws_forward};
use super::{need, set_smem};
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, CudaIdx, DType};
use crate::backend::{AttnDims, BackendError};

/// Rows of a tile (query tile forward, key tile backward); must match FA_TILE.
pub(super) const TILE: usize = 64;
/// Threads per block; must match FA_THREADS.
pub(super) const THREADS: u32 = 128;

/// Which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The default: flash for supported head dims when `FLASH_BY_DEFAULT`, else GEMM.
    Auto,
    /// Flash for supported head dims, GEMM otherwise (`PACKTRAIN_ATTENTION=flash`).
    Flash,
    /// Always the GEMM path (`PACKTRAIN_ATTENTION=gemm`).
    Gemm,
}

/// 0: not read yet; 1 + Mode as u8.
static MODE: AtomicU8 = AtomicU8::new(0);

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::Auto => 1,
        Mode::Flash => 2,
        Mode::Gemm => 3,
    }
}

/// The mode: set by `set_mode`, else read once from `PACKTRAIN_ATTENTION`.
pub fn mode() -> Mode {
    let code = match MODE.load(Ordering::Relaxed) {
        0 => {
            let m = match std::env::var("PACKTRAIN_ATTENTION").as_deref() {
                Ok("flash") => Mode::Flash,
                Ok("gemm") => Mode::Gemm,
                _ => Mode::Auto,
            };
            let c = mode_code(m);
            MODE.store(c, Ordering::Relaxed);
            c
        }
        c => c,
    };
    match code {
        2 => Mode::Flash,
        3 => Mode::Gemm,
        _ => Mode::Auto,
    }
}

/// Override the mode for this process (to compare both paths in one run; no caller today:
/// `packtrain attention-bench` compares them by `PACKTRAIN_ATTENTION`).
#[allow(dead_code)]
pub fn set_mode(m: Mode) {
    MODE.store(mode_code(m), Ordering::Relaxed);
}

/// Whether the environment variable `name` is `value`, read once per process: these switches
/// pick kernels on every attention call (44 per TinyLlama step), so the lookup is not repeated.
pub(super) fn switch_is(cell: &'static OnceLock<bool>, name: &str, value: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).as_deref() == Ok(value))
}

static WGMMA_OFF: OnceLock<bool> = OnceLock::new();
static DQ_ATOMIC: OnceLock<bool> = OnceLock::new();
static SPLIT_OFF: OnceLock<bool> = OnceLock::new();
static ROPE_UNFUSED: OnceLock<bool> = OnceLock::new();

/// Head dims the flash kernels are built for.
pub fn supports(dims: &AttnDims) -> bool {
    matches!(dims.d, 64 | 128)
}

/// Whether `Mode::Auto` takes the flash path: on since `packtrain check --device cuda --only
/// attention` passed on an H100 (2026-11-26, BENCHMARKS.md "Varlen flash attention").
const FLASH_BY_DEFAULT: bool = true;

/// Whether `attention::forward_any`/`backward_any` should take the flash path for these dims.
pub fn use_flash(dims: &AttnDims) -> bool {
    supports(dims)
        && match mode() {
            Mode::Flash => true,
            Mode::Gemm => false,
            Mode::Auto => FLASH_BY_DEFAULT,
        }
}

/// Whether the flash kernels take these buffers as they are: the tensors (qkv, out, and in the
/// backward dout, dqkv) share one element type and lse is f32.
pub fn native(tensors: &[&CudaBuf], lse: &CudaBuf) -> bool {
    lse.dtype() == DType::F32 && tensors.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

/// The flash kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Forward,
    /// dK, dV and dQ by atomics.
    Backward,
    /// dK, dV only.
    BackwardDkDv,
    /// dQ only, no atomics.
    BackwardDq,
}

/// The entry point of `k` for head dim `d` (64 or 128) and element type `e`.
fn entry(k: Kernel, d: usize, e: DType) -> &'static str {
    let names: [&'static str; 4] = match k {
        Kernel::Forward => [
            "flash_fwd_d64",
            "flash_fwd_d128",
            "flash_fwd_d64_bf16",
            "flash_fwd_d128_bf16",
        ],
        Kernel::Backward => [
            "flash_bwd_d64",
            "flash_bwd_d128",
            "flash_bwd_d64_bf16",
            "flash_bwd_d128_bf16",
        ],
        Kernel::BackwardDkDv => [
            "flash_bwd_dkdv_d64",
            "flash_bwd_dkdv_d128",
            "flash_bwd_dkdv_d64_bf16",
            "flash_bwd_dkdv_d128_bf16",
        ],
        Kernel::BackwardDq => [
            "flash_bwd_dq_d64",
            "flash_bwd_dq_d128",
            "flash_bwd_dq_d64_bf16",
            "flash_bwd_dq_d128_bf16",
        ],
    };
    names[usize::from(d != 64) + 2 * usize::from(e == DType::Bf16)]
}

/// Whether bf16 attention runs on Hopper's warpgroup MMA (`flash_forward_wgmma.cu`,
/// `flash_backward_wgmma.cu`): on an sm_90a build unless `PACKTRAIN_FLASH_WGMMA=0` (the
/// mma.sync kernels, to compare the two). The backward's wgmma pair computes dQ in its own
/// kernel, so `PACKTRAIN_FLASH_DQ=atomic` takes the mma.sync backward.
pub(super) fn wgmma(be: &CudaBackend, e: DType) -> bool {
    e == DType::Bf16 && be.arch == "sm_90a" && !switch_is(&WGMMA_OFF, "PACKTRAIN_FLASH_WGMMA", "0")
}

/// Bytes of one 64 x D bf16 tile, 128-byte swizzled (no padding).
pub(super) fn tile_bytes(d: usize) -> usize {
    TILE * d * 2
}

/// The warpgroup kernels align their tiles to 1024 bytes inside the dynamic shared memory.
const ALIGN_SLACK: usize = 1024;

/// Warpgroup forward: Q and the two (K, V) pipeline pairs; at D = 128 Q, two K tiles and one
/// V tile (three blocks per SM).
fn shared_bytes_fwd_wgmma(d: usize) -> usize {
    let tiles = if d == 128 { 4 } else { 5 };
    tiles * tile_bytes(d) + ALIGN_SLACK
}

/// Warpgroup dK/dV: K, V, two (Q, dO) pairs, and two lse and two dsum rows (f32).
fn shared_bytes_dkdv_wgmma(d: usize) -> usize {
    6 * tile_bytes(d) + 4 * TILE * 4 + ALIGN_SLACK
}

/// Warpgroup dQ: Q, dO and two (K, V) pairs.
fn shared_bytes_dq_wgmma(d: usize) -> usize {
    6 * tile_bytes(d) + ALIGN_SLACK
}

/// How the backward computes dQ: `PACKTRAIN_FLASH_DQ=atomic` adds each key tile's share with
/// f32 atomics inside the dK/dV kernel; otherwise (the default) a second kernel owns each query
/// tile and writes dQ once (no atomics, deterministic).
pub(super) fn dq_atomic() -> bool {
    switch_is(&DQ_ATOMIC, "PACKTRAIN_FLASH_DQ", "atomic")
}

/// Tile buffers of the software pipeline (`FaPipe` in the kernel): K/V forward and Q/dO
/// backward are double-buffered at D = 64.
fn pipeline_buffers(d: usize) -> usize {
    if d == 64 {
        2
    } else {
        1
    }
}

/// Q, then the K, V tile pairs (bf16, rows of D + 8).
fn shared_bytes_fwd(d: usize) -> usize {
    (1 + 2 * pipeline_buffers(d)) * TILE * (d + 8) * 2
}

/// K, V, the Q, dO tile pairs, dS^T (rows of 64 + 8; only when dQ is atomic), and lse, dsum
/// rows (f32) per buffer.
fn shared_bytes_bwd(d: usize, with_dq: bool) -> usize {
    let nb = pipeline_buffers(d);
    let ds = if with_dq { TILE * (TILE + 8) * 2 } else { 0 };
    (2 + 2 * nb) * TILE * (d + 8) * 2 + ds + 2 * nb * TILE * 4
}

/// The dQ kernel: Q, dO, then the K, V tile pairs.
fn shared_bytes_dq(d: usize) -> usize {
    (2 + 2 * pipeline_buffers(d)) * TILE * (d + 8) * 2
}

fn shape(op: &'static str, message: String) -> BackendError {
    BackendError::Shape { op, message }
}

/// Dims and `cu_seqlens` checks shared by both directions.
fn check(op: &'static str, dims: &AttnDims, cu: &CudaIdx) -> Result<(), BackendError> {
    let AttnDims { t, h, hkv, d, .. } = *dims;
    if h == 0 || hkv == 0 || !h.is_multiple_of(hkv) || !supports(dims) {
        return Err(shape(
            op,
            format!("flash attention needs D in {{64, 128}} and Hkv dividing H, got H = {h}, Hkv = {hkv}, D = {d}"),
        ));
    }
    let n1 = dims.n_docs + 1;
    need(op, "cu_seqlens [N + 1] (uploaded)", cu.host.len(), n1)?;
    need(op, "cu_seqlens [N + 1]", cu.dev.len(), n1)?;
    crate::backend::check_cu_seqlens(op, &cu.host, dims)?;
    let w = dims.qkv_width();
    t.checked_mul(w)
        .filter(|&n| n <= i64::MAX as usize && t <= i32::MAX as usize)
        .ok_or_else(|| shape(op, format!("T = {t} x QKV = {w} overflows")))?;
    Ok(())
}

fn blocks(n_items: usize, heads: usize, op: &'static str) -> Result<u32, BackendError> {
    n_items
        .checked_mul(heads)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n < i32::MAX as u32)
        .ok_or_else(|| {
            shape(
                op,
                format!("{n_items} tiles x {heads} heads is too many blocks"),
            )
        })
}

fn need_native(op: &'static str, tensors: &[&CudaBuf], lse: &CudaBuf) -> Result<(), BackendError> {
    if native(tensors, lse) {
        return Ok(());
    }
    Err(shape(
        op,
        "the flash kernels need qkv, out, dout, dqkv of one element type and an f32 lse".into(),
    ))
}

/// out `[T, H D]` and lse `[H, T]` overwritten.
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_forward (flash)";
    check(OP, &dims, cu_seqlens)?;
    need_native(OP, &[qkv, out], lse)?;
    let AttnDims { t, h, d, .. } = dims;
    need(OP, "out [T, H D]", out.len(), t * h * d)?;
    need(OP, "lse [H, T]", lse.len(), h * t)?;
    need(OP, "qkv [T, QKV]", qkv.len(), t * dims.qkv_width())?;
    let cu = &cu_seqlens.host[..=dims.n_docs];
    // The backward's split, so the cached lists serve both directions.
    let split = split_for(be, &dims, qkv.dtype());
    if ws_forward(be, &dims, qkv.dtype()) {
        return forward_ws(be, out, lse, qkv, cu, dims);
    }
    with_items(be, cu, split, OP, |lists| {
        forward_launch(be, out, lse, qkv, dims, &lists.fwd.0, lists.fwd.1)
    })
}

/// Blocks of the wgmma dK/dV kernel on one SM (its `__launch_bounds__`).
fn dkdv_blocks_per_sm(d: usize) -> usize {
    if d == 64 {
        3
    } else {
        2
    }
}

/// How the dK/dV items are split (`flash_items::Split`): on the wgmma path, by the block slots
/// of the GPU, unless `PACKTRAIN_FLASH_SPLIT=0` (whole items, to compare).
fn split_for(be: &CudaBackend, dims: &AttnDims, e: DType) -> Split {
    if dq_atomic()
        || !wgmma(be, e)
        || ws_dkdv(be, dims, e)
        || switch_is(&SPLIT_OFF, "PACKTRAIN_FLASH_SPLIT", "0")
    {
        return Split::NONE;
    }
    Split {
        g: dims.h / dims.hkv.max(1),
        hkv: dims.hkv,
        slots: be.sm_count * dkdv_blocks_per_sm(dims.d),
    }
}

/// Whether `Backend::attention_rope_backward` runs fused on these buffers: the wgmma kernels
/// take them as they are (bf16 tensors, f32 lse, on sm_90a, dQ not atomic) and inv_freq is
/// f32, unless `PACKTRAIN_ROPE_FUSED=0` (the separate RoPE pass, to compare).
pub fn fuses_rope(
    be: &CudaBackend,
    dims: &AttnDims,
    tensors: &[&CudaBuf],
    lse: &CudaBuf,
    inv_freq: &CudaBuf,
) -> bool {
    use_flash(dims)
        && native(tensors, lse)
        && tensors.first().is_some_and(|b| wgmma(be, b.dtype()))
        && !dq_atomic()
        && inv_freq.dtype() == DType::F32
        && !switch_is(&ROPE_UNFUSED, "PACKTRAIN_ROPE_FUSED", "0")
}

fn forward_launch(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    dims: AttnDims,
    items_g: &CudaSlice<i32>,
    n_items: usize,
) -> Result<(), BackendError> {
    const OP: &str = "attention_forward (flash)";
    let AttnDims { t, h, hkv, d, .. } = dims;
    if n_items == 0 {
        return Ok(());
    }
    let (name, smem) = if wgmma(be, qkv.dtype()) {
        let name = if d == 64 {
            "flash_fwd_wg_d64_bf16"
        } else {
            "flash_fwd_wg_d128_bf16"
        };
        (name, shared_bytes_fwd_wgmma(d))
    } else {
        (entry(Kernel::Forward, d, qkv.dtype()), shared_bytes_fwd(d))
    };
    set_smem(be, name, smem, OP)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(n_items, h, OP)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let (t32, h32, hkv32) = (t as i32, h as i32, hkv as i32);
    let (po, pl, pq) = (be.raw(out), be.raw(lse), be.raw(qkv));
    launch(be, name, cfg, |a| {
        a.arg(&po)
            .arg(&pl)
            .arg(&pq)
            .arg(items_g)
            .arg(&t32)
            .arg(&h32)
            .arg(&hkv32)
            .arg(&scale_log2);
    })
}

/// dqkv `[T, QKV]` overwritten; dk, dv summed over the G query heads of each kv head.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward (flash)";
    backward_any_rope(be, OP, dqkv, dout, qkv, out, lse, None, cu_seqlens, dims)
}

/// The attention backward, then RoPE's backward, in the wgmma kernels ([`fuses_rope`] must
/// hold): dK and dQ are rotated back before their one rounding to bf16. dqkv `[T, QKV]`
/// overwritten with the gradient with respect to the unrotated qkv.
#[allow(clippy::too_many_arguments)]
pub fn backward_rope(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    positions: &CudaIdx,
    inv_freq: &CudaBuf,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_rope_backward (flash)";
    let rope = Some((positions, inv_freq));
    backward_any_rope(be, OP, dqkv, dout, qkv, out, lse, rope, cu_seqlens, dims)
}

/// The checks and work lists of both backward entry points; `rope`: positions and inv_freq
/// when RoPE's backward is fused (wgmma kernels only).
#[allow(clippy::too_many_arguments)]
fn backward_any_rope(
    be: &CudaBackend,
    op: &'static str,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    rope: Option<(&CudaIdx, &CudaBuf)>,
    cu_seqlens: &CudaIdx,
    dims: AttnDims,
) -> Result<(), BackendError> {
    check(op, &dims, cu_seqlens)?;
    need_native(op, &[dqkv, dout, qkv, out], lse)?;
    let AttnDims { t, h, d, .. } = dims;
    let w = dims.qkv_width();
    need(op, "dqkv [T, QKV]", dqkv.len(), t * w)?;
    need(op, "dout [T, H D]", dout.len(), t * h * d)?;
    need(op, "qkv [T, QKV]", qkv.len(), t * w)?;
    need(op, "out [T, H D]", out.len(), t * h * d)?;
    need(op, "lse [H, T]", lse.len(), h * t)?;
    let table = match rope {
        Some(_) if dq_atomic() || !wgmma(be, qkv.dtype()) => {
            return Err(shape(
                op,
                "RoPE is fused into the wgmma kernels only".into(),
            ));
        }
        Some((positions, inv_freq)) => Some(super::rope::table(be, positions, inv_freq, dims)?),
        None => None,
    };
    let table_ptr = table.as_ref().map(|t| be.ptr(t));
    let cu = &cu_seqlens.host[..=dims.n_docs];
    let split = split_for(be, &dims, qkv.dtype());
    with_items(be, cu, split, op, |lists| {
        backward_launch(be, dqkv, dout, qkv, out, lse, dims, cu, lists, table_ptr)
    })
}

#[allow(clippy::too_many_arguments)]
fn backward_launch(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    dims: AttnDims,
    cu: &[i32],
    lists: &ItemsCache,
    rope: Option<u64>,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward (flash)";
    let AttnDims { t, h, hkv, d, .. } = dims;
    let w = dims.qkv_width();
    let (items_g, n_items) = (&lists.bwd.0, lists.bwd.1);
    if n_items == 0 {
        return Ok(());
    }
    let (t32, h32, hkv32, d32) = (t as i32, h as i32, hkv as i32, d as i32);
    let e = qkv.dtype();
    let atomic = dq_atomic();
    // Atomic dQ accumulates in f32: into dqkv's q columns (row stride W) when it is f32, else
    // into an f32 [T, H D] scratch rounded into dqkv by flash_bwd_post_bf16. A null dqacc
    // tells flash_bwd_pre there is nothing to zero.
    let dq_scratch = match (atomic, e) {
        (true, DType::Bf16) => {
            // SAFETY: flash_bwd_pre zeroes every element before the main kernel adds into it.
            Some(unsafe { be.stream.alloc::<f32>(t * h * d) }.map_err(drv(OP))?)
        }
        _ => None,
    };
    let (pdqacc, ldq) = match (&dq_scratch, atomic) {
        (Some(s), _) => (be.ptr(s), (h * d) as i64),
        (None, true) => (be.raw(dqkv), w as i64),
        (None, false) => (0, 0),
    };
    let (pdqkv, pdo, pq, po, pl) = (
        be.raw(dqkv),
        be.raw(dout),
        be.raw(qkv),
        be.raw(out),
        be.raw(lse),
    );
    // RoPE's table for the wgmma kernels (null: dK and dQ stored unrotated).
    let pr = rope.unwrap_or(0);
    if !atomic && wgmma(be, e) && ws_dkdv(be, &dims, e) {
        return backward_ws(be, dqkv, dout, qkv, out, lse, cu, dims, pr);
    }
    // dsum [H, T] = rowsum(dO * O); dqacc zeroed.
    // SAFETY: flash_bwd_pre writes every element of dsum before the main kernel reads it.
    let mut dsum = unsafe { be.stream.alloc::<f32>(h * t) }.map_err(drv(OP))?;
    // D / 8 threads per (t, h) row (flash_bwd_pre), 256 threads per block.
    let threads = t * h * (d / 8);
    let pre = LaunchConfig {
        grid_dim: (
            u32::try_from(threads.div_ceil(256)).map_err(|_| shape(OP, "T H too large".into()))?,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let pre_name = match e {
        DType::F32 => "flash_bwd_pre_f32",
        DType::Bf16 => "flash_bwd_pre_bf16",
    };
    launch(be, pre_name, pre, |a| {
        a.arg(&pdqacc)
            .arg(&ldq)
            .arg(&mut dsum)
            .arg(&pdo)
            .arg(&po)
            .arg(&t32)
            .arg(&h32)
            .arg(&d32);
    })?;
    let wg = !atomic && wgmma(be, e);
    let scale = 1.0 / (d as f32).sqrt();
    let scale_log2 = std::f32::consts::LOG2_E * scale;
    // f32 partial dK, dV of the split items (flash_items.rs): slots x Hkv x [2][64][D].
    let (splits_g, n_splits, n_slots) = (&lists.splits.0, lists.splits.1, lists.splits.2);
    let part = match n_slots {
        0 => None,
        // SAFETY: each split part writes its slot's valid rows before the reduce reads them.
        n => Some(unsafe { be.stream.alloc::<f32>(n * hkv * 2 * TILE * d) }.map_err(drv(OP))?),
    };
    let ppart = part.as_ref().map_or(0, |p| be.ptr(p));
    let (name, smem) = match (wg, atomic, d) {
        (true, _, 64) => ("flash_bwd_dkdv_wg_d64_bf16", shared_bytes_dkdv_wgmma(d)),
        (true, _, _) => ("flash_bwd_dkdv_wg_d128_bf16", shared_bytes_dkdv_wgmma(d)),
        (false, true, _) => (entry(Kernel::Backward, d, e), shared_bytes_bwd(d, true)),
        (false, false, _) => (
            entry(Kernel::BackwardDkDv, d, e),
            shared_bytes_bwd(d, false),
        ),
    };
    set_smem(be, name, smem, OP)?;
    let cfg = LaunchConfig {
        grid_dim: (blocks(n_items, hkv, OP)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    launch(be, name, cfg, |a| {
        a.arg(&pdqkv)
            .arg(&pdqacc)
            .arg(&ldq)
            .arg(&pdo)
            .arg(&pq)
            .arg(&pl)
            .arg(&dsum)
            .arg(items_g)
            .arg(&t32)
            .arg(&h32)
            .arg(&hkv32)
            .arg(&scale)
            .arg(&scale_log2);
        if wg {
            a.arg(&pr).arg(&ppart);
        }
    })?;
    if n_splits > 0 {
        let cfg = LaunchConfig {
            grid_dim: (blocks(n_splits, hkv, OP)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(be, "flash_bwd_dkdv_reduce", cfg, |a| {
            a.arg(&pdqkv)
                .arg(&ppart)
                .arg(splits_g)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&d32);
        })?;
    }
    drop(part);
    if dq_scratch.is_some() {
        // 8 elements per thread (flash_bwd_post_bf16).
        let n = t * h * d / 8;
        launch(
            be,
            "flash_bwd_post_bf16",
            crate::backend::cuda::grid_1d(n, 256),
            |a| {
                a.arg(&pdqkv)
                    .arg(&pdqacc)
                    .arg(&t32)
                    .arg(&h32)
                    .arg(&hkv32)
                    .arg(&d32);
            },
        )?;
    }
    if !atomic {
        let (items_q, n_items) = (&lists.fwd.0, lists.fwd.1);
        let (name, smem) = match (wg, d) {
            (true, 64) => ("flash_bwd_dq_wg_d64_bf16", shared_bytes_dq_wgmma(d)),
            (true, _) => ("flash_bwd_dq_wg_d128_bf16", shared_bytes_dq_wgmma(d)),
            (false, _) => (entry(Kernel::BackwardDq, d, e), shared_bytes_dq(d)),
        };
        set_smem(be, name, smem, OP)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(n_items, h, OP)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launch(be, name, cfg, |a| {
            a.arg(&pdqkv)
                .arg(&pdo)
                .arg(&pq)
                .arg(&pl)
                .arg(&dsum)
                .arg(items_q)
                .arg(&t32)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&scale)
                .arg(&scale_log2);
            if wg {
                a.arg(&pr);
            }
        })?;
    }
    // dq_scratch is freed stream-ordered after the kernels that use it.
    drop(dq_scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RoPE's backward fused into the wgmma kernels against the separate passes, on a GPU
    /// with sm_90a only: dqkv within 1e-2 (the fused kernels round dq and dk once, the
    /// separate passes twice), every element written.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_fused_rope_backward_matches_separate_passes() {
        use super::super::elementwise::gpu_test::*;
        use crate::backend::Backend;
        let (be, _cpu, mut rng) = setup(71);
        let lens = [300usize, 1, 64, 500, 135];
        let cu: Vec<i32> = std::iter::once(0)
            .chain(lens.iter().scan(0, |a, &l| {
                *a += l as i32;
                Some(*a)
            }))
            .collect();
        // Positions from 0 in even documents, from 7000 in odd ones.
        let positions: Vec<i32> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| (0..l as i32).map(move |p| p + 7000 * (i as i32 % 2)))
            .collect();
        for (h, hkv, d) in [(8usize, 2usize, 64usize), (4, 1, 128)] {
            let t: usize = lens.iter().sum();
            let dims = AttnDims {
                t,
                h,
                hkv,
                d,
                n_docs: lens.len(),
                max_seqlen: 500,
            };
            let w = dims.qkv_width();
            let bf = |x: &[f32]| {
                let mut b = be.alloc_dtype(x.len(), DType::Bf16).unwrap();
                be.upload(&mut b, x).unwrap();
                b
            };
            let inv: Vec<f32> = (0..d / 2)
                .map(|j| 10000f32.powf(-2.0 * j as f32 / d as f32))
                .collect();
            let (cu_g, pos_g, inv_g) = (up_idx(&be, &cu), up_idx(&be, &positions), up(&be, &inv));
            let qkv = bf(&randv(&mut rng, t * w));
            let mut out = bf(&vec![0.0; t * h * d]);
            let mut lse = up(&be, &vec![0.0; h * t]);
            if !fuses_rope(&be, &dims, &[&qkv, &out], &lse, &inv_g) {
                eprintln!("skipped: RoPE is not fused on this GPU ({})", be.arch);
                return;
            }
            be.attention_forward(&mut out, &mut lse, &qkv, &cu_g, dims)
                .unwrap();
            let dout = bf(&randv(&mut rng, t * h * d));
            let (mut ga, mut gb) = (bf(&vec![f32::NAN; t * w]), bf(&vec![f32::NAN; t * w]));
            be.attention_backward(&mut ga, &dout, &qkv, &out, &lse, &cu_g, dims)
                .unwrap();
            be.rope_backward(&mut ga, &pos_g, &inv_g, dims).unwrap();
            backward_rope(
                &be, &mut gb, &dout, &qkv, &out, &lse, &pos_g, &inv_g, &cu_g, dims,
            )
            .unwrap();
            let got = down(&be, &gb, t * w);
            assert!(
                got.iter().all(|x| !x.is_nan()),
                "dqkv fully written, D = {d}"
            );
            close("dqkv", &got, &down(&be, &ga, t * w), 1e-2);
        }
    }

    /// The fused RoPE backward's error paths, on a GPU: f32 buffers (never the wgmma path)
    /// are refused by name, and the cos/sin table refuses an odd head dim and positions or
    /// inv_freq shorter than the dims say.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_fused_rope_backward_rejects_bad_inputs() {
        use super::super::elementwise::gpu_test::*;
        let (be, _cpu, _rng) = setup(72);
        let (t, h, hkv, d) = (100usize, 4usize, 1usize, 64usize);
        let dims = AttnDims {
            t,
            h,
            hkv,
            d,
            n_docs: 1,
            max_seqlen: t,
        };
        let w = dims.qkv_width();
        let z = |n: usize| up(&be, &vec![0.0; n]);
        let (cu, pos) = (up_idx(&be, &[0, t as i32]), up_idx(&be, &vec![0; t]));
        let inv = z(d / 2);
        let (mut dqkv, dout, qkv, out, lse) =
            (z(t * w), z(t * h * d), z(t * w), z(t * h * d), z(h * t));
        let e = backward_rope(
            &be, &mut dqkv, &dout, &qkv, &out, &lse, &pos, &inv, &cu, dims,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("attention_rope_backward") && e.contains("wgmma"),
            "{e}"
        );
        let table = |dims: AttnDims, pos: &CudaIdx, inv: &CudaBuf| {
            super::super::rope::table(&be, pos, inv, dims)
                .unwrap_err()
                .to_string()
        };
        let e = table(AttnDims { d: 63, ..dims }, &pos, &inv);
        assert!(e.contains("rope_table") && e.contains("D = 63"), "{e}");
        // (`up_idx` and `up` allocate one element more than they are given.)
        let e = table(dims, &up_idx(&be, &vec![0; t - 2]), &inv);
        assert!(e.contains("positions [T]"), "{e}");
        let e = table(dims, &pos, &z(d / 2 - 2));
        assert!(e.contains("inv_freq [D/2]"), "{e}");
    }

    #[test]
    fn shared_memory_fits_hopper_and_ampere() {
        for d in [64, 128] {
            assert!(shared_bytes_fwd(d) <= 99 * 1024);
            assert!(shared_bytes_bwd(d, true) <= 99 * 1024);
            assert!(shared_bytes_bwd(d, false) <= 99 * 1024);
            assert!(shared_bytes_dq(d) <= 99 * 1024);
        }
        assert_eq!(shared_bytes_bwd(128, true), 79360);
        // The warpgroup kernels (Hopper: 227 KB per SM): at D = 128 three forward blocks per SM and two of each backward kernel;
        // at D = 64 four forward, three dK/dV and four dQ blocks.
        assert_eq!(shared_bytes_dkdv_wgmma(128), 6 * 16384 + 1024 + 1024);
        for (d, fwd, dkdv, dq) in [(128, 3, 2, 2), (64, 4, 3, 4)] {
            assert!(fwd * shared_bytes_fwd_wgmma(d) <= 227 * 1024, "{d}");
            assert!(dkdv * shared_bytes_dkdv_wgmma(d) <= 227 * 1024, "{d}");
            assert!(dq * shared_bytes_dq_wgmma(d) <= 227 * 1024, "{d}");
        }
        // D = 64 at three blocks per SM (227 KB of shared memory on Hopper).
        assert!(3 * (shared_bytes_bwd(64, true) + 1024) <= 227 * 1024);
        assert!(3 * (shared_bytes_dq(64) + 1024) <= 227 * 1024);
    }
}
