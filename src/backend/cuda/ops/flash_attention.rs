//! Varlen causal flash attention (FlashAttention-2 style) for head dims 64 and 128:
//! `kernels/flash_forward.cu` and `kernels/flash_backward.cu` (their shared helpers in
//! `kernels/flash_common.cuh`), bf16 tensor-core MMAs (`mma.sync m16n8k16`) with f32
//! accumulation, never materialising the scores. On Hopper bf16 attention runs on warpgroup MMAs
//! instead (`kernels/flash_{forward,backward}_wgmma.cu`, helpers in `kernels/flash_wgmma.cuh`:
//! the same items, math and outputs). qkv, out, dout and dqkv are all f32 or all
//! bf16 (the kernels' two entry points); lse is f32 ([`native`] says whether a set of buffers
//! fits, else `attention.rs` stages them).
//!
//! Scheduling: the host walks `cu_seqlens` (its mirror, no device sync) and lists the real
//! (document, 64-row tile) pairs, longest work first, as int4 items `{start, len, tile, 0}`;
//! one block per (item, head), so a batch of short documents costs sum(L^2) work and no
//! block launches only to exit. Forward items are query tiles (work: tile + 1 key tiles, per
//! query head); backward items are key tiles (work: the query tiles from the diagonal to the
//! document's end, times the G query heads of the block's kv head).
//!
//! Which path `attention::forward_any`/`backward_any` take: `PACKTRAIN_ATTENTION=flash` or `gemm`
//! forces one (flash only for D in {64, 128}: every other head dim takes the GEMM path); unset,
//! `FLASH_BY_DEFAULT` decides.

use std::sync::atomic::{AtomicU8, Ordering};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{need, set_smem};
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, CudaIdx, DType};
use crate::backend::{AttnDims, BackendError};

/// Rows of a tile (query tile forward, key tile backward); must match FA_TILE.
const TILE: usize = 64;
/// Threads per block; must match FA_THREADS.
const THREADS: u32 = 128;

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
fn wgmma(be: &CudaBackend, e: DType) -> bool {
    e == DType::Bf16
        && be.arch == "sm_90a"
        && std::env::var("PACKTRAIN_FLASH_WGMMA").as_deref() != Ok("0")
}

/// Bytes of one 64 x D bf16 tile, 128-byte swizzled (no padding).
fn tile_bytes(d: usize) -> usize {
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
fn dq_atomic() -> bool {
    std::env::var("PACKTRAIN_FLASH_DQ").as_deref() == Ok("atomic")
}

/// Work items `[start, len, tile, 0]` flattened, longest work first. `work(len, tile)` is a
/// tile's cost in key-tile (forward) or query-tile (backward) steps.
fn items(cu: &[i32], work: impl Fn(usize, usize) -> usize) -> Vec<i32> {
    let mut v: Vec<(usize, [i32; 4])> = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0], (w[1] - w[0]) as usize);
        for tile in 0..len.div_ceil(TILE) {
            v.push((work(len, tile), [start, len as i32, tile as i32, 0]));
        }
    }
    // Stable: equal work keeps document order.
    v.sort_by_key(|&(w, _)| std::cmp::Reverse(w));
    v.into_iter().flat_map(|(_, it)| it).collect()
}

fn fwd_items(cu: &[i32]) -> Vec<i32> {
    items(cu, |_, tile| tile + 1)
}

fn bwd_items(cu: &[i32]) -> Vec<i32> {
    items(cu, |len, tile| len.div_ceil(TILE) - tile)
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

/// The work lists of one `cu_seqlens` on the device: every layer of a micro-batch (forward,
/// backward, recompute) attends over the same documents, so the lists are built and uploaded
/// once per batch instead of three times per layer (a pageable host-to-device copy each).
pub struct ItemsCache {
    cu: Vec<i32>,
    /// Query-tile items (forward and dQ) and key-tile items (dK/dV), and their counts.
    fwd: (CudaSlice<i32>, usize),
    bwd: (CudaSlice<i32>, usize),
}

/// Run `f` with the device work lists of `cu` (from the backend's cache when `cu` is the batch
/// they were built for).
fn with_items<R>(
    be: &CudaBackend,
    cu: &[i32],
    op: &'static str,
    f: impl FnOnce(&ItemsCache) -> Result<R, BackendError>,
) -> Result<R, BackendError> {
    let mut cache = be
        .flash_items
        .lock()
        .map_err(|_| shape(op, "work-list cache poisoned by an earlier panic".into()))?;
    if cache.as_ref().is_none_or(|c| c.cu != cu) {
        let upload = |list: Vec<i32>| -> Result<(CudaSlice<i32>, usize), BackendError> {
            let n = list.len() / 4;
            // An empty list still gets a (one-element) buffer; its count says there is no work.
            let dev = be
                .stream
                .clone_htod(if list.is_empty() { &[0][..] } else { &list[..] })
                .map_err(drv(op))?;
            Ok((dev, n))
        };
        *cache = Some(ItemsCache {
            cu: cu.to_vec(),
            fwd: upload(fwd_items(cu))?,
            bwd: upload(bwd_items(cu))?,
        });
    }
    let c = cache
        .as_ref()
        .ok_or_else(|| shape(op, "work-list cache empty".into()))?;
    f(c)
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
    with_items(be, cu, OP, |lists| {
        forward_launch(be, out, lse, qkv, dims, &lists.fwd.0, lists.fwd.1)
    })
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
    check(OP, &dims, cu_seqlens)?;
    need_native(OP, &[dqkv, dout, qkv, out], lse)?;
    let AttnDims { t, h, d, .. } = dims;
    let w = dims.qkv_width();
    need(OP, "dqkv [T, QKV]", dqkv.len(), t * w)?;
    need(OP, "dout [T, H D]", dout.len(), t * h * d)?;
    need(OP, "qkv [T, QKV]", qkv.len(), t * w)?;
    need(OP, "out [T, H D]", out.len(), t * h * d)?;
    need(OP, "lse [H, T]", lse.len(), h * t)?;
    let cu = &cu_seqlens.host[..=dims.n_docs];
    with_items(be, cu, OP, |lists| {
        backward_launch(be, dqkv, dout, qkv, out, lse, dims, lists)
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
    lists: &ItemsCache,
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
    let scale = 1.0 / (d as f32).sqrt();
    let scale_log2 = std::f32::consts::LOG2_E * scale;
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
    })?;
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
        })?;
    }
    // dq_scratch is freed stream-ordered after the kernels that use it.
    drop(dq_scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_lists_cover_every_tile_longest_first() {
        let cu = [0, 1, 1, 130, 194, 600];
        let f = fwd_items(&cu);
        let b = bwd_items(&cu);
        // Tiles: 1 + 0 + 3 (129 rows) + 1 (64) + 7 (406) = 12.
        assert_eq!(f.len(), 12 * 4);
        assert_eq!(b.len(), 12 * 4);
        let fw: Vec<i32> = f.chunks(4).map(|c| c[2] + 1).collect();
        assert!(fw.windows(2).all(|w| w[0] >= w[1]), "{fw:?}");
        assert_eq!(&f[..4], &[194, 406, 6, 0]);
        let bw: Vec<i32> = b
            .chunks(4)
            .map(|c| (c[1] as usize).div_ceil(TILE) as i32 - c[2])
            .collect();
        assert!(bw.windows(2).all(|w| w[0] >= w[1]), "{bw:?}");
        assert_eq!(&b[..4], &[194, 406, 0, 0]);
        // Every (document, tile) exactly once, no empty document.
        let mut seen: Vec<(i32, i32)> = f.chunks(4).map(|c| (c[0], c[2])).collect();
        seen.sort();
        let mut want = vec![(0, 0)];
        want.extend((0..3).map(|t| (1, t)));
        want.push((130, 0));
        want.extend((0..7).map(|t| (194, t)));
        assert_eq!(seen, want);
        assert!(fwd_items(&[0, 0, 0]).is_empty());
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
