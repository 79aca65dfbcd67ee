//! The classifier: lm_head GEMM fused with softmax cross-entropy, in chunks of rows, so the
//! `[T, V]` logits never exist whole.
//!
//! Shapes: x `[T, C]`, w `[V, C]`, targets `[T]` (i32, < 0 = ignore), losses `[T]`; with
//! gradients dx `[T, C]` (overwritten) and dw `[V, C]` (+=).
//!
//! Per chunk of `bt` rows r0..r0+bt (row-major operands for `CudaBackend::gemm`):
//!   logits [bt, V] = x[r0..] [bt, C] w^T            gemm(N, T), beta 0
//!   `classifier_xent` (one block per row): losses, and with grads dlogits
//!   dx[r0..] [bt, C] = dlogits [bt, V] w [V, C]      gemm(N, N), beta 0
//!   dw [V, C] += dlogits^T x[r0..]                   gemm(T, N), beta 1 (chunks ascending)
//! The GEMM operands share one precision (bf16 when x or w is; see `matmul::operand`). The
//! logits are f32 whatever it is, so the loss is exact up to the operands' rounding; dlogits
//! are written in the operand precision (in place over the logits when that is f32).
//! Scratch: one `[chunk, V]` f32 buffer (plus a bf16 one for dlogits), chunk =
//! `CHUNK_ELEMS / V` rows (4194 at V = 32000), allocated per call on the stream.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::matmul::operand;
use super::need;
use crate::backend::cuda::gemm::Mat;
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, CudaIdx, DType};
use crate::backend::{Backend, BackendError};

/// Most f32 elements of the logits scratch (512 MiB), at least one row.
const CHUNK_ELEMS: usize = 1 << 27;

#[cfg(test)]
thread_local! {
    /// The cap in unit tests: small, so the GPU test runs many chunks.
    static TEST_CHUNK: std::cell::Cell<usize> = const { std::cell::Cell::new(1 << 12) };
}

fn chunk_cap() -> usize {
    #[cfg(test)]
    return TEST_CHUNK.with(|c| c.get());
    #[cfg(not(test))]
    CHUNK_ELEMS
}
/// Threads per row; must match CLS_THREADS in `classifier.cu`.
const THREADS: u32 = 512;

fn shape(message: String) -> BackendError {
    BackendError::Shape { op: OP, message }
}

const OP: &str = "classifier";

fn prod(a: usize, b: usize) -> Result<usize, BackendError> {
    a.checked_mul(b)
        .ok_or_else(|| shape(format!("{a} x {b} overflows")))
}

fn to_i32(what: &str, x: usize) -> Result<i32, BackendError> {
    i32::try_from(x).map_err(|_| shape(format!("{what} = {x} does not fit in i32")))
}

/// Rows per chunk for a vocabulary of `v`.
fn chunk_rows(t: usize, v: usize, cap: usize) -> usize {
    (cap / v.max(1)).clamp(1, t.max(1))
}

/// See the module doc. losses `[T]` overwritten; a target >= V is a shape error.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    be: &CudaBackend,
    losses: &mut CudaBuf,
    grads: Option<(&mut CudaBuf, &mut CudaBuf)>,
    x: &CudaBuf,
    w: &CudaBuf,
    targets: &CudaIdx,
    loss_scale: f32,
    t: usize,
    c: usize,
    v: usize,
) -> Result<(), BackendError> {
    need(OP, "losses [T]", losses.len(), t)?;
    need(OP, "x [T, C]", x.len(), prod(t, c)?)?;
    need(OP, "w [V, C]", w.len(), prod(v, c)?)?;
    need(OP, "targets [T] (uploaded)", targets.host.len(), t)?;
    need(OP, "targets [T]", targets.dev.len(), t)?;
    if let Some((i, &tg)) = targets.host[..t]
        .iter()
        .enumerate()
        .find(|&(_, &tg)| tg >= 0 && tg as usize >= v)
    {
        return Err(shape(format!("targets[{i}] = {tg} is not < V = {v}")));
    }
    if let Some((dx, dw)) = grads.as_ref() {
        need(OP, "dx [T, C]", dx.len(), prod(t, c)?)?;
        need(OP, "dw [V, C]", dw.len(), prod(v, c)?)?;
    }
    to_i32("T", t)?;
    to_i32("C", c)?;
    let v32 = to_i32("V", v)?;
    if t == 0 {
        return Ok(());
    }
    if v == 0 {
        // Every target is ignored (checked above): zero losses and dx; dw gets nothing.
        be.zero(losses, t)?;
        if let Some((dx, _)) = grads {
            be.zero(dx, t * c)?;
        }
        return Ok(());
    }
    let dx_bf16 = grads.as_ref().map(|(dx, _)| dx.dtype()) == Some(DType::Bf16);
    let dt = if x.dtype() == DType::Bf16 || w.dtype() == DType::Bf16 || dx_bf16 {
        DType::Bf16
    } else {
        DType::F32
    };
    let (xs, ws) = (operand(be, x, t * c, dt)?, operand(be, w, v * c, dt)?);
    let (x, w) = (xs.as_ref().unwrap_or(x), ws.as_ref().unwrap_or(w));
    let chunk = chunk_rows(t, v, chunk_cap());
    let mut logits = be.alloc_dtype(chunk * v, DType::F32)?;
    // dlogits: a separate operand-precision buffer, or the logits themselves (f32, in place).
    let dlogits = match (&grads, dt) {
        (Some(_), DType::Bf16) => Some(be.alloc_dtype(chunk * v, DType::Bf16)?),
        _ => None,
    };
    let lg = Mat::of(be, &logits, v);
    let dlg = dlogits.as_ref().map_or(lg, |d| Mat::of(be, d, v));
    let (tdl, tlosses) = (be.ten(dlogits.as_ref().unwrap_or(&logits)), be.ten(losses));
    let pl = be.raw(&logits);
    let gm = grads
        .as_ref()
        .map(|(dx, dw)| (Mat::of(be, dx, c), Mat::of(be, dw, c)));
    let with_grads = i32::from(gm.is_some());
    for r0 in (0..t).step_by(chunk) {
        let bt = chunk.min(t - r0);
        let xc = Mat::of(be, x, c).offset(r0 * c);
        if c == 0 {
            be.stream
                .memset_zeros(&mut logits.f32_mut(OP)?.slice_mut(..bt * v))
                .map_err(drv(OP))?;
        } else {
            // logits [bt, V] = x_chunk [bt, C] w^T   (w [V, C])
            be.gemm(
                false,
                true,
                bt,
                v,
                c,
                1.0,
                xc,
                Mat::of(be, w, c),
                0.0,
                lg,
                1,
            )?;
        }
        let r032 = r0 as i32;
        let cfg = LaunchConfig {
            grid_dim: (bt as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(be, "classifier_xent", cfg, |a| {
            a.arg(&pl)
                .arg(&tdl)
                .arg(&tlosses)
                .arg(&targets.dev)
                .arg(&r032)
                .arg(&v32)
                .arg(&loss_scale)
                .arg(&with_grads);
        })?;
        if let Some((dxm, dwm)) = gm {
            // dx_chunk [bt, C] = dlogits [bt, V] w [V, C]
            let dxc = dxm.offset(r0 * c);
            be.gemm(
                false,
                false,
                bt,
                c,
                v,
                1.0,
                dlg,
                Mat::of(be, w, c),
                0.0,
                dxc,
                1,
            )?;
            // dw [V, C] += dlogits^T [V, bt] x_chunk [bt, C]
            be.gemm(true, false, v, c, bt, 1.0, dlg, xc, 1.0, dwm, 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_bound_the_logits() {
        let cap = CHUNK_ELEMS;
        assert_eq!(chunk_rows(16384, 32000, cap), 4194);
        assert_eq!(chunk_rows(100, 32000, cap), 100);
        assert_eq!(chunk_rows(16384, 1 << 28, cap), 1);
        assert_eq!(chunk_rows(5, 0, cap), 5);
        assert_eq!(chunk_rows(16384, 500, 1 << 12), 8);
    }

    /// CUDA against the CPU reference, on a GPU only:
    /// `cargo test --lib cuda_classifier -- --ignored` (`PACKTRAIN_GEMM=f32` for a tight
    /// tolerance). losses and dx start as NaN; dw starts random (it is accumulated into).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_classifier_matches_cpu() {
        use crate::backend::cpu::CpuBackend;
        use crate::backend::cuda::GemmMode;
        use crate::backend::Backend;
        use rand::{Rng, SeedableRng};

        let be = CudaBackend::new(0).expect("a CUDA device");
        let cpu = CpuBackend::new();
        let tol = if be.gemm_mode == GemmMode::F32 {
            2e-4
        } else {
            3e-2
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // T = 301 rows in chunks of 8 (the last ragged), every 7th target ignored.
        let (t, c, v) = (301usize, 64usize, 500usize);
        let mut randv =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w, dw0) = (randv(t * c), randv(v * c), randv(v * c));
        let targets: Vec<i32> = (0..t)
            .map(|i| {
                if i % 7 == 3 {
                    -100
                } else {
                    (i * 37 % v) as i32
                }
            })
            .collect();
        let scale = 0.37f32;
        let mut losses_c = vec![0f32; t];
        let (mut dx_c, mut dw_c) = (vec![0f32; t * c], dw0.clone());
        cpu.classifier(
            &mut losses_c,
            Some((&mut dx_c, &mut dw_c)),
            &x,
            &w,
            &targets,
            scale,
            t,
            c,
            v,
        )
        .unwrap();
        let up = |x: &[f32]| {
            let mut b = be.alloc(x.len()).unwrap();
            be.upload(&mut b, x).unwrap();
            b
        };
        let (x_g, w_g) = (up(&x), up(&w));
        let mut tg_g = be.alloc_idx(t).unwrap();
        be.upload_idx(&mut tg_g, &targets).unwrap();
        let mut losses_g = up(&vec![f32::NAN; t]);
        let mut dx_g = up(&vec![f32::NAN; t * c]);
        let mut dw_g = up(&dw0);
        be.classifier(
            &mut losses_g,
            Some((&mut dx_g, &mut dw_g)),
            &x_g,
            &w_g,
            &tg_g,
            scale,
            t,
            c,
            v,
        )
        .unwrap();
        let cmp = |what: &str, g: &CudaBuf, want: &[f32]| {
            let got = be.download(g, want.len()).unwrap();
            let sc = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let (i, err) = got
                .iter()
                .zip(want)
                .map(|(a, b)| {
                    if a.is_finite() {
                        (a - b).abs()
                    } else {
                        f32::INFINITY
                    }
                })
                .enumerate()
                .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
            eprintln!("classifier {what}: max err {err:.3e} at {i} (scale {sc:.3})");
            assert!(err <= tol * sc, "{what}[{i}] = {} vs {}", got[i], want[i]);
        };
        cmp("losses", &losses_g, &losses_c);
        cmp("dx", &dx_g, &dx_c);
        cmp("dw", &dw_g, &dw_c);
        // Ignored rows of dx are exactly 0.
        let dx = be.download(&dx_g, t * c).unwrap();
        for i in (0..t).filter(|&i| targets[i] < 0) {
            assert!(dx[i * c..][..c].iter().all(|&g| g == 0.0), "dx row {i}");
        }
        // Without gradients: the same losses.
        let mut losses2 = up(&vec![f32::NAN; t]);
        be.classifier(&mut losses2, None, &x_g, &w_g, &tg_g, scale, t, c, v)
            .unwrap();
        cmp("losses (no grads)", &losses2, &losses_c);
        // A target >= V is a shape error.
        let mut bad = targets.clone();
        bad[5] = v as i32;
        be.upload_idx(&mut tg_g, &bad).unwrap();
        let r = be.classifier(&mut losses2, None, &x_g, &w_g, &tg_g, scale, t, c, v);
        assert!(matches!(r, Err(BackendError::Shape { .. })), "{r:?}");
    }

    /// Timing on a GPU: `cargo test --lib cuda_classifier_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_classifier_timing() {
        use crate::backend::Backend;
        TEST_CHUNK.with(|c| c.set(CHUNK_ELEMS));
        let be = CudaBackend::new(0).expect("a CUDA device");
        let (t, c, v) = (16384usize, 2048usize, 32000usize);
        let x = be.alloc(t * c).unwrap();
        let w = be.alloc(v * c).unwrap();
        let (mut dx, mut dw, mut losses) = (
            be.alloc(t * c).unwrap(),
            be.alloc(v * c).unwrap(),
            be.alloc(t).unwrap(),
        );
        let mut tg = be.alloc_idx(t).unwrap();
        let targets: Vec<i32> = (0..t).map(|i| (i * 31 % v) as i32).collect();
        be.upload_idx(&mut tg, &targets).unwrap();
        let mut run = || {
            be.classifier(
                &mut losses,
                Some((&mut dx, &mut dw)),
                &x,
                &w,
                &tg,
                1.0,
                t,
                c,
                v,
            )
            .unwrap()
        };
        run();
        be.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..5 {
            run();
        }
        be.synchronize().unwrap();
        let ms = t0.elapsed().as_secs_f64() / 5.0 * 1e3;
        let flops = 3.0 * 2.0 * (t * c * v) as f64;
        eprintln!(
            "classifier T {t} C {c} V {v} with grads: {ms:.2} ms ({:.0} TFLOP/s)",
            flops / ms / 1e9
        );
    }
}
