//! Element-wise ops: the residual add `acc += x` and `buf *= s` (kernels in `elementwise.cu`),
//! plus the launch helpers the other element-wise launchers share (embedding, RMSNorm, RoPE,
//! SwiGLU, AdamW).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::need;
use crate::backend::cuda::{launch, CudaBackend, CudaBuf};
use crate::backend::BackendError;

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;
/// Most blocks a grid-stride kernel is launched with (each thread then loops).
const MAX_BLOCKS: usize = 1 << 16;

/// The product of `dims`, or a shape error if it overflows (so a length check cannot wrap).
pub(crate) fn prod(op: &'static str, dims: &[usize]) -> Result<usize, BackendError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| BackendError::Shape {
            op,
            message: format!("dims {dims:?} overflow usize"),
        })
}

/// A dim as the i32 a kernel takes, or a shape error naming it.
pub(crate) fn dim_i32(op: &'static str, what: &str, v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| BackendError::Shape {
        op,
        message: format!("{what} = {v} does not fit the kernel's i32"),
    })
}

/// One thread per (row, col): grid `(rows, ceil(cols / threads))`, `threads` = cols rounded
/// up to a warp, at most 256, so a warp covers 32 consecutive columns of one row and the
/// kernel reads the row from `blockIdx.x` without a division. `rows` must fit an i32.
pub(crate) fn rows_cols(
    op: &'static str,
    rows: usize,
    cols: usize,
) -> Result<LaunchConfig, BackendError> {
    let threads = cols.div_ceil(32).clamp(1, 8) * 32;
    let col_blocks = cols.div_ceil(threads).max(1);
    if rows > i32::MAX as usize || col_blocks > 65_535 {
        return Err(BackendError::Shape {
            op,
            message: format!("a grid of {rows} rows by {cols} columns exceeds the launch limits"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, col_blocks as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid-stride launch over `n` elements: 256 threads, at most 65536 blocks.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether the `_vec8` kernels may run: `width` (the row length, or n) is a multiple of 8 and
/// every buffer starts 16-byte aligned, so each group of 8 elements is one aligned 16-byte
/// (bf16) or two (f32) accesses. Allocations are 256-byte aligned, so in practice this is
/// `width % 8 == 0`; the pointer test keeps a future sub-buffer view from faulting.
pub(crate) fn vec8_ok(be: &CudaBackend, width: usize, bufs: &[&CudaBuf]) -> bool {
    width.is_multiple_of(8) && bufs.iter().all(|b| be.raw(b).is_multiple_of(16))
}

/// `acc[..n] += x[..n]` (the residual stream).
pub fn add_inplace(
    be: &CudaBackend,
    acc: &mut CudaBuf,
    x: &CudaBuf,
    n: usize,
) -> Result<(), BackendError> {
    need("add_inplace", "acc [n]", acc.len(), n)?;
    need("add_inplace", "x [n]", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (ta, tx) = (be.ten(acc), be.ten(x));
    if vec8_ok(be, n, &[acc, x]) {
        let n8 = (n / 8) as i64;
        // Checked: acc and x hold n = 8 n8 and are 16-byte aligned; the kernel touches
        // groups g < n8, elements 8 g .. 8 g + 8.
        return launch(be, "add_inplace_vec8", grid_stride(n / 8), |a| {
            a.arg(&ta).arg(&tx).arg(&n8);
        });
    }
    let n64 = n as i64;
    // Checked: acc and x hold n; the kernel touches i < n.
    launch(be, "add_inplace", grid_stride(n), |a| {
        a.arg(&ta).arg(&tx).arg(&n64);
    })
}

/// `dst[..n] = src[..n]` between precisions (f32 to bf16 rounds to nearest even).
pub fn convert(
    be: &CudaBackend,
    dst: &mut CudaBuf,
    src: &CudaBuf,
    n: usize,
) -> Result<(), BackendError> {
    need("convert", "dst [n]", dst.len(), n)?;
    need("convert", "src [n]", src.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as i64;
    let (td, ts) = (be.ten(dst), be.ten(src));
    // Checked: dst and src hold n; the kernel touches i < n.
    launch(be, "convert", grid_stride(n), |a| {
        a.arg(&td).arg(&ts).arg(&n64);
    })
}

/// `buf[..n] *= s`.
pub fn scale(be: &CudaBackend, buf: &mut CudaBuf, n: usize, s: f32) -> Result<(), BackendError> {
    need("scale", "buf [n]", buf.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as i64;
    let tb = be.ten(buf);
    // Checked: buf holds n; the kernel touches i < n.
    launch(be, "scale_inplace", grid_stride(n), |a| {
        a.arg(&tb).arg(&n64).arg(&s);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    #[test]
    fn rows_cols_covers_every_column_with_warp_sized_blocks() {
        for (rows, cols, threads, col_blocks) in [
            (5, 1, 32, 1),
            (3, 64, 64, 1),
            (7, 100, 128, 1),
            (2, 2048, 256, 8),
            (1, 257, 256, 2),
        ] {
            let cfg = rows_cols("test", rows, cols).unwrap();
            assert_eq!(cfg.grid_dim, (rows as u32, col_blocks, 1), "cols {cols}");
            assert_eq!(cfg.block_dim, (threads, 1, 1), "cols {cols}");
            assert!((cfg.grid_dim.1 * cfg.block_dim.0) as usize >= cols);
        }
        assert!(rows_cols("test", i32::MAX as usize + 1, 1).is_err());
        assert!(rows_cols("test", 1, 256 * 65_536).is_err());
    }

    #[test]
    fn grid_stride_is_capped() {
        assert_eq!(grid_stride(1).grid_dim.0, 1);
        assert_eq!(grid_stride(257).grid_dim.0, 2);
        assert_eq!(grid_stride(usize::MAX / 2).grid_dim.0, MAX_BLOCKS as u32);
    }

    #[test]
    fn dims_that_overflow_are_errors() {
        assert_eq!(prod("test", &[3, 4, 5]).unwrap(), 60);
        assert!(prod("test", &[usize::MAX, 2]).is_err());
        assert_eq!(dim_i32("test", "T", 7).unwrap(), 7);
        assert!(dim_i32("test", "T", 1 << 31).is_err());
    }

    /// CUDA against the CPU on a GPU only; n = 100003 (scalar add) and 100000 (`_vec8` add).
    /// Tolerance 1e-6 relative: both sides do one f32 add or multiply per element, so they
    /// agree to the last bit but for FMA contraction.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_add_and_scale_match_cpu() {
        for n in [100_003, 100_000] {
            add_and_scale_case(n);
        }
    }

    fn add_and_scale_case(n: usize) {
        use super::gpu_test::*;
        let (be, cpu, mut rng) = setup(50);
        let (acc, x) = (randv(&mut rng, n), randv(&mut rng, n));
        let (mut acc_c, mut acc_g) = (acc.clone(), up(&be, &acc));
        cpu.add_inplace(&mut acc_c, &x, n).unwrap();
        be.add_inplace(&mut acc_g, &up(&be, &x), n).unwrap();
        close("add_inplace", &down(&be, &acc_g, n), &acc_c, 1e-6);
        cpu.scale(&mut acc_c, n - 1, 0.3).unwrap();
        be.scale(&mut acc_g, n - 1, 0.3).unwrap();
        close("scale", &down(&be, &acc_g, n), &acc_c, 1e-6);
        // Length 0 is a no-op; a short buffer is an error.
        be.add_inplace(&mut acc_g, &up(&be, &x), 0).unwrap();
        assert!(be.scale(&mut acc_g, n + 2, 1.0).is_err());
    }
}

/// Helpers of the CUDA-against-CPU tests of this directory's ops (run on a GPU only, with
/// `cargo test --lib cuda_ -- --ignored`).
#[cfg(test)]
pub(crate) mod gpu_test {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::{CudaBackend, CudaBuf, CudaIdx};
    use crate::backend::Backend;

    pub fn setup(seed: u64) -> (CudaBackend, CpuBackend, ChaCha8Rng) {
        let be = CudaBackend::new(0).expect("a CUDA device");
        (be, CpuBackend::new(), ChaCha8Rng::seed_from_u64(seed))
    }

    /// `n` values uniform in [-1, 1).
    pub fn randv(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// A device copy of `x` with one spare element (ops must touch only the leading ones).
    pub fn up(be: &CudaBackend, x: &[f32]) -> CudaBuf {
        let mut b = be.alloc(x.len() + 1).unwrap();
        be.upload(&mut b, x).unwrap();
        b
    }

    pub fn up_idx(be: &CudaBackend, x: &[i32]) -> CudaIdx {
        let mut b = be.alloc_idx(x.len() + 1).unwrap();
        be.upload_idx(&mut b, x).unwrap();
        b
    }

    pub fn down(be: &CudaBackend, b: &CudaBuf, n: usize) -> Vec<f32> {
        be.download(b, n).unwrap()
    }

    /// `|got - want| <= tol max(1, max |want|)` elementwise.
    pub fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1.0f32, |m, w| m.max(w.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }
}
