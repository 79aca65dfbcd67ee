//! The warp-specialised flash kernels of D = 128 on Hopper (`kernels/flash_forward_ws.cu`,
//! `flash_backward_dq_ws.cu`, `flash_backward_ws.cu`): which calls take them, their launches
//! (one persistent block of three warpgroups per SM, tensor maps of the operands from
//! [`tma`](super::tma), the units dealt by `flash_items::ws_schedule`), and the backward's
//! order: dQ first, which also writes dsum, then dK/dV. `flash_attention.rs` decides and
//! checks; this module only launches.

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::flash_attention::{dq_atomic, switch_is, tile_bytes, wgmma, THREADS, TILE};
use super::flash_items::{with_ws_schedule, WsCache, WsKind, WS_ROWS};
use super::{set_smem, tma};
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, DType};
use crate::backend::{AttnDims, BackendError};

static WS_OFF: OnceLock<bool> = OnceLock::new();

/// Whether the forward runs on the warp-specialised kernel (`flash_forward_ws.cu`): bf16 at
/// D = 128 on sm_90a, unless `PACKTRAIN_FLASH_WS=0` (the one-warpgroup wgmma kernel, to
/// compare). At D = 64 the one-warpgroup kernel, four blocks per SM, stayed faster.
pub(super) fn ws_forward(be: &CudaBackend, dims: &AttnDims, e: DType) -> bool {
    dims.d == 128 && wgmma(be, e) && !switch_is(&WS_OFF, "PACKTRAIN_FLASH_WS", "0")
}

/// Shared memory of the warp-specialised forward: two Q buffers of 128 rows and four (K, V)
/// stages (flash_forward_ws.cu's FW_QBUF, FW_STAGES), plus the alignment slack.
fn shared_bytes_fwd_ws(d: usize) -> usize {
    (2 * 2 + 2 * 4) * tile_bytes(d) + 1024
}

/// The forward on the warp-specialised kernel (`flash_forward_ws.cu`): one persistent block
/// of three warpgroups per SM, its units dealt by `flash_items::ws_schedule`, tiles copied by
/// TMA through a tensor map of qkv.
pub(super) fn forward_ws(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    qkv: &CudaBuf,
    cu: &[i32],
    dims: AttnDims,
) -> Result<(), BackendError> {
    const OP: &str = "attention_forward (flash, warp-specialised)";
    let AttnDims { t, h, hkv, d, .. } = dims;
    const NAME: &str = "flash_fwd_ws_d128_bf16";
    let map = tma::bf16_2d(OP, be.raw(qkv), t, dims.qkv_width(), TILE as u32, 64)?;
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let (t32, h32, hkv32) = (t as i32, h as i32, hkv as i32);
    let (po, pl) = (be.raw(out), be.raw(lse));
    let smem = shared_bytes_fwd_ws(d);
    with_ws_launch(be, NAME, smem, cu, WsKind::Forward, h, OP, |cfg, ws| {
        launch(be, NAME, cfg, |a| {
            a.arg(&map)
                .arg(&po)
                .arg(&pl)
                .arg(&ws.items)
                .arg(&ws.sched)
                .arg(&t32)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&scale_log2);
        })
    })
}

/// Whether dK/dV run on the warp-specialised kernel (`flash_backward_ws.cu`): as
/// [`ws_forward`] (bf16, D = 128, sm_90a, unless `PACKTRAIN_FLASH_WS=0`). Its persistent
/// blocks take the place of the split items.
pub(super) fn ws_dkdv(be: &CudaBackend, dims: &AttnDims, e: DType) -> bool {
    ws_forward(be, dims, e) && !dq_atomic()
}

/// The D = 128 backward on the warp-specialised kernels: dQ first (it also computes dsum, so no
/// `flash_bwd_pre` pass), then dK/dV.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_ws(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    cu: &[i32],
    dims: AttnDims,
    rope: u64,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward (flash dQ, warp-specialised)";
    let AttnDims { t, h, hkv, d, .. } = dims;
    // SAFETY: the dQ kernel writes dsum for every (row, head) of every document (one unit per
    // 128-row query tile and head) before the dK/dV kernel reads it.
    let mut dsum = unsafe { be.stream.alloc::<f32>(h * t) }.map_err(drv(OP))?;
    const NAME: &str = "flash_bwd_dq_ws_d128_bf16";
    // Q, dO and O (two 64-row tiles each) and four (K, V) stages, plus the alignment slack.
    let smem = (6 + 2 * 4) * tile_bytes(d) + 1024;
    let map_qkv = tma::bf16_2d(OP, be.raw(qkv), t, dims.qkv_width(), TILE as u32, 64)?;
    let map_do = tma::bf16_2d(OP, be.raw(dout), t, h * d, TILE as u32, 64)?;
    let map_out = tma::bf16_2d(OP, be.raw(out), t, h * d, TILE as u32, 64)?;
    let scale = 1.0 / (d as f32).sqrt();
    let scale_log2 = std::f32::consts::LOG2_E * scale;
    let (t32, h32, hkv32) = (t as i32, h as i32, hkv as i32);
    let (pdq, pl) = (be.raw(dqkv), be.raw(lse));
    with_ws_launch(be, NAME, smem, cu, WsKind::Forward, h, OP, |cfg, ws| {
        launch(be, NAME, cfg, |a| {
            a.arg(&map_qkv)
                .arg(&map_do)
                .arg(&map_out)
                .arg(&pdq)
                .arg(&pl)
                .arg(&mut dsum)
                .arg(&ws.items)
                .arg(&ws.sched)
                .arg(&t32)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&scale)
                .arg(&scale_log2)
                .arg(&rope);
        })
    })?;
    dkdv_ws(be, dqkv, dout, qkv, lse, &dsum, cu, dims, rope)
}

/// dK and dV on the warp-specialised kernel: units (128-key tile, kv head) dealt by
/// `flash_items::ws_schedule`, Q, dO, lse and dsum copied by TMA.
#[allow(clippy::too_many_arguments)]
fn dkdv_ws(
    be: &CudaBackend,
    dqkv: &mut CudaBuf,
    dout: &CudaBuf,
    qkv: &CudaBuf,
    lse: &CudaBuf,
    dsum: &CudaSlice<f32>,
    cu: &[i32],
    dims: AttnDims,
    rope: u64,
) -> Result<(), BackendError> {
    const OP: &str = "attention_backward (flash dK/dV, warp-specialised)";
    let AttnDims { t, h, hkv, d, .. } = dims;
    const NAME: &str = "flash_bwd_dkdv_ws_d128_bf16";
    // K and V of both consumers, four stages of (Q, dO, lse and dsum rows), alignment slack.
    let smem = (4 + 2 * 4) * tile_bytes(d) + 4 * 2 * TILE * 4 + 1024;
    let map_qkv = tma::bf16_2d(OP, be.raw(qkv), t, dims.qkv_width(), TILE as u32, 64)?;
    let map_do = tma::bf16_2d(OP, be.raw(dout), t, h * d, TILE as u32, 64)?;
    let scale = 1.0 / (d as f32).sqrt();
    let scale_log2 = std::f32::consts::LOG2_E * scale;
    let (t32, h32, hkv32) = (t as i32, h as i32, hkv as i32);
    let (pdq, pl, pd) = (be.raw(dqkv), be.raw(lse), be.ptr(dsum));
    let kind = WsKind::DkDv { g: h / hkv.max(1) };
    with_ws_launch(be, NAME, smem, cu, kind, hkv, OP, |cfg, ws| {
        launch(be, NAME, cfg, |a| {
            a.arg(&map_qkv)
                .arg(&map_do)
                .arg(&pl)
                .arg(&pd)
                .arg(&pdq)
                .arg(&ws.items)
                .arg(&ws.sched)
                .arg(&t32)
                .arg(&h32)
                .arg(&hkv32)
                .arg(&scale)
                .arg(&scale_log2)
                .arg(&rope);
        })
    })
}

/// Launch the persistent warp-specialised kernel `name` with `smem` bytes of shared memory: one
/// block of three warpgroups per SM (at most one per unit), its schedule of `kind` for `heads`;
/// `f` pushes the arguments and launches. Nothing runs without units.
#[allow(clippy::too_many_arguments)]
fn with_ws_launch(
    be: &CudaBackend,
    name: &'static str,
    smem: usize,
    cu: &[i32],
    kind: WsKind,
    heads: usize,
    op: &'static str,
    f: impl FnOnce(LaunchConfig, &WsCache) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let units = ws_units(cu, heads);
    if units == 0 {
        return Ok(());
    }
    let grid = be.sm_count.min(units).max(1);
    set_smem(be, name, smem, op)?;
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (3 * THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    with_ws_schedule(be, cu, kind, heads, grid, op, |ws| f(cfg, ws))
}

/// Units (128-row tile, head) of the warp-specialised kernels.
fn ws_units(cu: &[i32], heads: usize) -> usize {
    cu.windows(2)
        .map(|w| ((w[1] - w[0]) as usize).div_ceil(WS_ROWS))
        .sum::<usize>()
        * heads
}
