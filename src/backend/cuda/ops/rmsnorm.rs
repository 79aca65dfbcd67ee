//! RMSNorm forward and backward (kernels and math in `rmsnorm.cu`). dweight is reduced
//! deterministically: per-block partials into a scratch buffer, then added in a fixed order.
//! The row kernels have `_vec8` twins (8 columns per lane, 16-byte accesses) chosen by
//! C % 8 == 0 and alignment only (see `rmsnorm.cu`, "Row layouts"); the backward's `_vec8`
//! path also writes the dweight partials in its one pass over the rows.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::elementwise::{dim_i32, prod, vec8_ok};
use super::{need, set_smem};
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf};
use crate::backend::{Backend, BackendError, GradWrite};

/// Rows per dweight partial; must equal `RMSNORM_ROWS` in `rmsnorm.cu`.
const ROWS: usize = 256;
/// Warps (rows) per block of the row kernels.
const ROW_WARPS: usize = 8;
/// Threads (columns) per block of the dweight partial kernel.
const COL_THREADS: u32 = 128;
/// The fused backward: warps per block and rows per block; must equal `RMSNORM_FUSED_WARPS`
/// and `RMSNORM_FUSED_ROWS` in `rmsnorm.cu`.
const FUSED_WARPS: usize = 4;
const FUSED_ROWS: usize = 32;
/// Its shared memory (one row of C floats per warp, 96 KB at C = 6144) stays within what
/// every GPU since sm_80 gives a block; wider rows take the two-pass path.
const MAX_SMEM_BYTES: usize = 96 * 1024;
/// The reduce's block: columns x lanes per column; must equal `RMSNORM_REDUCE_COLS` and
/// `RMSNORM_REDUCE_LANES` in `rmsnorm.cu`.
const REDUCE_COLS: usize = 32;
const REDUCE_LANES: u32 = 32;

/// One warp per row: blocks of `ROW_WARPS` warps.
fn warp_per_row(t: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(ROW_WARPS).max(1) as u32, 1, 1),
        block_dim: (32 * ROW_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out `[T, C]` and rstd `[T]` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    rstd: &mut CudaBuf,
    x: &CudaBuf,
    weight: &CudaBuf,
    t: usize,
    c: usize,
    eps: f32,
) -> Result<(), BackendError> {
    const OP: &str = "rmsnorm_forward";
    let n = prod(OP, &[t, c])?;
    need(OP, "out [T, C]", out.len(), n)?;
    need(OP, "rstd [T]", rstd.len(), t)?;
    need(OP, "x [T, C]", x.len(), n)?;
    need(OP, "weight [C]", weight.len(), c)?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    let (t32, c32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "C", c)?);
    // Checked: out and x hold T C, rstd T, weight C.
    let (to, tr, tx, tw) = (be.ten(out), be.ten(rstd), be.ten(x), be.ten(weight));
    // Also checked for `_vec8`: C % 8 == 0 and 16-byte aligned out, x, weight.
    let name = if vec8_ok(be, c, &[out, x, weight]) {
        "rmsnorm_forward_vec8"
    } else {
        "rmsnorm_forward"
    };
    launch(be, name, warp_per_row(t), |a| {
        a.arg(&to)
            .arg(&tr)
            .arg(&tx)
            .arg(&tw)
            .arg(&t32)
            .arg(&c32)
            .arg(&eps);
    })
}

/// dx `[T, C]` += (the residual stream), dweight `[C]` += (deterministic; = with
/// `GradWrite::Overwrite`, zeroed first); `dx_copy` `[T, C]`, when given, overwritten with the
/// new dx rounded to its precision, by the same kernel.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dx: &mut CudaBuf,
    dx_copy: Option<&mut CudaBuf>,
    dweight: &mut CudaBuf,
    dout: &CudaBuf,
    x: &CudaBuf,
    weight: &CudaBuf,
    rstd: &CudaBuf,
    t: usize,
    c: usize,
    dweight_write: GradWrite,
) -> Result<(), BackendError> {
    const OP: &str = "rmsnorm_backward";
    let n = prod(OP, &[t, c])?;
    need(OP, "dx [T, C]", dx.len(), n)?;
    if let Some(cp) = dx_copy.as_deref() {
        need(OP, "dx_copy [T, C]", cp.len(), n)?;
    }
    need(OP, "dweight [C]", dweight.len(), c)?;
    need(OP, "dout [T, C]", dout.len(), n)?;
    need(OP, "x [T, C]", x.len(), n)?;
    need(OP, "weight [C]", weight.len(), c)?;
    need(OP, "rstd [T]", rstd.len(), t)?;
    if dweight_write == GradWrite::Overwrite {
        // C floats: the reduce below adds into them.
        be.zero(dweight, c)?;
    }
    if t == 0 || c == 0 {
        return Ok(());
    }
    let (t32, c32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "C", c)?);
    let dx_copy = dx_copy.as_deref();
    // Checked: dx, dx_copy (when given; else a null Ten the kernel skips), dout, x hold T C,
    // weight C, rstd T.
    let (tdx, tcp, tdo, tx) = (be.ten(dx), be.ten_opt(dx_copy), be.ten(dout), be.ten(x));
    let (tw, tr, tdw) = (be.ten(weight), be.ten(rstd), be.ten(dweight));
    // Also checked for `_vec8`: C % 8 == 0 and 16-byte aligned dx, dx_copy, dout, x, weight.
    let vec8 =
        vec8_ok(be, c, &[dx, dout, x, weight]) && dx_copy.is_none_or(|cp| vec8_ok(be, c, &[cp]));
    let fused_smem = FUSED_WARPS * c * std::mem::size_of::<f32>();
    let (partial, blocks) = if vec8 && fused_smem <= MAX_SMEM_BYTES {
        // dx and the dweight partials in one pass (`rmsnorm.cu`, rmsnorm_backward_vec8).
        let blocks = t.div_ceil(FUSED_ROWS);
        let mut partial = unsafe { be.stream.alloc::<f32>(blocks * c) }.map_err(drv(OP))?;
        if fused_smem > 48 * 1024 {
            set_smem(be, "rmsnorm_backward_vec8", fused_smem, OP)?;
        }
        let cfg = LaunchConfig {
            // T fits an i32 (checked above), so T / FUSED_ROWS fits a grid's u32.
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (32 * FUSED_WARPS as u32, 1, 1),
            shared_mem_bytes: fused_smem as u32,
        };
        // Checked: partial holds ceil(T / FUSED_ROWS) C (allocated above; every element
        // written), dx, dx_copy, dout, x T C, weight C, rstd T; C % 8 == 0 and alignment.
        launch(be, "rmsnorm_backward_vec8", cfg, |a| {
            a.arg(&mut partial)
                .arg(&tdx)
                .arg(&tcp)
                .arg(&tdo)
                .arg(&tx)
                .arg(&tw)
                .arg(&tr)
                .arg(&t32)
                .arg(&c32);
        })?;
        (partial, blocks)
    } else {
        let name = if vec8 {
            "rmsnorm_backward_dx_vec8"
        } else {
            "rmsnorm_backward_dx"
        };
        launch(be, name, warp_per_row(t), |a| {
            a.arg(&tdx)
                .arg(&tcp)
                .arg(&tdo)
                .arg(&tx)
                .arg(&tw)
                .arg(&tr)
                .arg(&t32)
                .arg(&c32);
        })?;
        let blocks = t.div_ceil(ROWS);
        if blocks > 65_535 {
            return Err(BackendError::Shape {
                op: OP,
                message: format!(
                    "T = {t} needs {blocks} dweight partials, more than a grid's 65535"
                ),
            });
        }
        let mut partial = unsafe { be.stream.alloc::<f32>(blocks * c) }.map_err(drv(OP))?;
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(COL_THREADS as usize) as u32, blocks as u32, 1),
            block_dim: (COL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // Checked: partial holds ceil(T / ROWS) C (allocated above; every element written),
        // dout and x T C, rstd T.
        launch(be, "rmsnorm_backward_dweight_partial", cfg, |a| {
            a.arg(&mut partial)
                .arg(&tdo)
                .arg(&tx)
                .arg(&tr)
                .arg(&t32)
                .arg(&c32);
        })?;
        (partial, blocks)
    };
    let blocks32 = dim_i32(OP, "dweight partials", blocks)?;
    let cfg = LaunchConfig {
        // C fits an i32 (checked above), so C / REDUCE_COLS fits a grid's u32.
        grid_dim: (c.div_ceil(REDUCE_COLS) as u32, 1, 1),
        block_dim: (REDUCE_COLS as u32, REDUCE_LANES, 1),
        shared_mem_bytes: 0,
    };
    // Checked: dweight holds C, partial `blocks` C.
    launch(be, "rmsnorm_backward_dweight_reduce", cfg, |a| {
        a.arg(&tdw).arg(&partial).arg(&blocks32).arg(&c32);
    })
    // `partial` is freed stream-ordered (cuMemFreeAsync) after the reduce.
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::gpu_test::*;
    use crate::backend::cuda::DType;
    use crate::backend::{Backend, GradWrite};

    /// CUDA against the CPU on a GPU only; T = 2 ROWS + 45 (three two-pass dweight
    /// partials, the last ragged; 18 fused ones, ragged too), C = 100 (the scalar kernels and
    /// the two-pass dweight) and C = 264 (the fused `_vec8` backward, its last 256-column
    /// chunk one lane wide). Tolerance 1e-5 relative: both sum ~100 or ~256 f32 terms in
    /// different orders (warp tree vs sequential), a few ulp each.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rmsnorm_matches_cpu() {
        for c in [100, 264] {
            rmsnorm_matches_cpu(c);
        }
    }

    fn rmsnorm_matches_cpu(c: usize) {
        let (be, cpu, mut rng) = setup(52);
        let (t, eps) = (2 * super::ROWS + 45, 1e-5);
        let (x, w, dout) = (
            randv(&mut rng, t * c),
            randv(&mut rng, c),
            randv(&mut rng, t * c),
        );
        let (dx0, dw0) = (randv(&mut rng, t * c), randv(&mut rng, c));
        let (mut out_c, mut rstd_c) = (vec![0.0; t * c], vec![0.0; t]);
        cpu.rmsnorm_forward(&mut out_c, &mut rstd_c, &x, &w, t, c, eps)
            .unwrap();
        let (xg, wg) = (up(&be, &x), up(&be, &w));
        let (mut out_g, mut rstd_g) =
            (up(&be, &vec![f32::NAN; t * c]), up(&be, &vec![f32::NAN; t]));
        be.rmsnorm_forward(&mut out_g, &mut rstd_g, &xg, &wg, t, c, eps)
            .unwrap();
        close(
            &format!("rmsnorm out (C = {c})"),
            &down(&be, &out_g, t * c),
            &out_c,
            1e-5,
        );
        close(
            &format!("rmsnorm rstd (C = {c})"),
            &down(&be, &rstd_g, t),
            &rstd_c,
            1e-5,
        );
        let (mut dx_c, mut dw_c) = (dx0.clone(), dw0.clone());
        cpu.rmsnorm_backward(
            &mut dx_c,
            None,
            &mut dw_c,
            &dout,
            &x,
            &w,
            &rstd_c,
            t,
            c,
            GradWrite::Add,
        )
        .unwrap();
        let (mut dx_g, mut dw_g) = (up(&be, &dx0), up(&be, &dw0));
        // A bf16 copy of the new dx: the same bits as converting dx afterwards.
        let mut cp_g = be.alloc_dtype(t * c, DType::Bf16).unwrap();
        be.rmsnorm_backward(
            &mut dx_g,
            Some(&mut cp_g),
            &mut dw_g,
            &up(&be, &dout),
            &xg,
            &wg,
            &rstd_g,
            t,
            c,
            GradWrite::Add,
        )
        .unwrap();
        close(
            &format!("rmsnorm dx (C = {c})"),
            &down(&be, &dx_g, t * c),
            &dx_c,
            1e-5,
        );
        close(
            &format!("rmsnorm dweight (C = {c})"),
            &down(&be, &dw_g, c),
            &dw_c,
            1e-5,
        );
        let mut converted = be.alloc_dtype(t * c, DType::Bf16).unwrap();
        be.copy(&mut converted, &dx_g, t * c).unwrap();
        assert_eq!(
            down(&be, &cp_g, t * c),
            down(&be, &converted, t * c),
            "dx copy"
        );
        // dweight is deterministic: the same call again adds bitwise the same amount.
        let once = down(&be, &dw_g, c);
        let mut dw_h = up(&be, &once);
        let mut dw_i = up(&be, &once);
        let dout_g = up(&be, &dout);
        for dw in [&mut dw_h, &mut dw_i] {
            be.rmsnorm_backward(
                &mut dx_g,
                None,
                dw,
                &dout_g,
                &xg,
                &wg,
                &rstd_g,
                t,
                c,
                GradWrite::Add,
            )
            .unwrap();
        }
        assert_eq!(down(&be, &dw_h, c), down(&be, &dw_i, c));
    }
}
