//! The classifier: lm_head GEMM fused with softmax cross-entropy, in chunks of rows, so the
//! `[T, V]` logits never exist whole.
//!
//! Shapes: x `[T, C]`, w `[V, C]`, targets `[T]` (i32, < 0 = ignore), losses `[T]`; with
//! gradients dx `[T, C]` (overwritten) and dw `[V, C]` (+=).
//!
//! Per chunk of `bt` rows r0..r0+bt (row-major operands for `CudaBackend::gemm`):
//!   logits [bt, V] = x[r0..] [bt, C] w^T            gemm(N, T), beta 0
//!   `classifier_xent_vec4` (the row in registers; V % 4 == 0, V <= 32768) or
//!   `classifier_xent` (one block per row): losses, and with grads dlogits
//!   dx[r0..] [bt, C] = dlogits [bt, V] w [V, C]      gemm(N, N), beta 0
//!   dw [V, C] += dlogits^T x[r0..]                   gemm(T, N), beta 1 (chunks ascending;
//!                                                    beta 0 for the first with GradWrite::Overwrite)
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
use crate::backend::{Backend, BackendError, GradWrite};

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
/// float4 of the row per thread of `classifier_xent_vec4`; must match CLS_VEC4 there.
const VEC4: usize = 16;
/// The largest V whose row fits the registers of `classifier_xent_vec4` (32768).
const VEC4_MAX_V: usize = 4 * VEC4 * THREADS as usize;

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
    dw_write: GradWrite,
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
    to_i32("V", v)?;
    if t == 0 || v == 0 {
        // No rows, or every target ignored (checked above): zero losses and dx; dw gets
        // nothing (it is zeroed when it is to be overwritten).
        be.zero(losses, t)?;
        if let Some((dx, dw)) = grads {
            be.zero(dx, t * c)?;
            if dw_write == GradWrite::Overwrite {
                be.zero(dw, v * c)?;
            }
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
    let gm = grads
        .as_ref()
        .map(|(dx, dw)| (Mat::of(be, dx, c), Mat::of(be, dw, c)));
    let with_grads = gm.is_some();
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
        let dl = dlogits.as_ref().unwrap_or(&logits);
        xent(
            be, &logits, dl, losses, targets, r0, bt, v, loss_scale, with_grads, true,
        )?;
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
            // dw [V, C] += dlogits^T [V, bt] x_chunk [bt, C]; the first chunk overwrites when
            // asked (beta 0: dw is never read).
            let beta = match (dw_write, r0) {
                (GradWrite::Overwrite, 0) => 0.0,
                _ => 1.0,
            };
            be.gemm(true, false, v, c, bt, 1.0, dlg, xc, beta, dwm, 1)?;
        }
    }
    Ok(())
}

/// Softmax cross-entropy of rows r0..r0+bt, whose logits are `logits[..bt V]`: losses
/// `[r0..r0+bt]` and, `with_grads`, dlogits `[..bt V]` (may be `logits` itself when f32)
/// overwritten (see `classifier.cu`). The row-in-registers `classifier_xent_vec4` runs when
/// `allow_vec4` (tests turn it off to compare), V % 4 == 0, V <= [`VEC4_MAX_V`] and logits and
/// dlogits start 16-byte aligned, else `classifier_xent`. The targets of those rows must be
/// < V (checked by the caller).
#[allow(clippy::too_many_arguments)]
fn xent(
    be: &CudaBackend,
    logits: &CudaBuf,
    dlogits: &CudaBuf,
    losses: &CudaBuf,
    targets: &CudaIdx,
    r0: usize,
    bt: usize,
    v: usize,
    loss_scale: f32,
    with_grads: bool,
    allow_vec4: bool,
) -> Result<(), BackendError> {
    let n = prod(bt, v)?;
    need(OP, "logits [bt, V]", logits.len(), n)?;
    need(OP, "dlogits [bt, V]", dlogits.len(), n)?;
    need(OP, "losses [T]", losses.len(), r0 + bt)?;
    need(OP, "targets [T]", targets.dev.len(), r0 + bt)?;
    if logits.dtype() != DType::F32 {
        return Err(shape("the logits must be f32".into()));
    }
    if bt == 0 {
        return Ok(());
    }
    let (r032, v32, bt32) = (to_i32("r0", r0)?, to_i32("V", v)?, to_i32("bt", bt)?);
    let vec4 = allow_vec4
        && v.is_multiple_of(4)
        && v <= VEC4_MAX_V
        && be.raw(logits).is_multiple_of(16)
        && be.raw(dlogits).is_multiple_of(16);
    let name = if vec4 {
        "classifier_xent_vec4"
    } else {
        "classifier_xent"
    };
    let cfg = LaunchConfig {
        grid_dim: (bt32 as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (pl, tdl, tlosses) = (be.raw(logits), be.ten(dlogits), be.ten(losses));
    let with_grads = i32::from(with_grads);
    // Checked: logits and dlogits hold bt V, losses and targets r0 + bt; block r reads row r
    // and targets[r0 + r] (< V by the caller's check), writes losses[r0 + r] and dlogits row
    // r. `_vec4` also: V = 4 k <= 4 VEC4 THREADS (each thread's float4 q = i + THREADS m,
    // m < VEC4, covers the row) and 16-byte aligned logits and dlogits rows.
    launch(be, name, cfg, |a| {
        a.arg(&pl)
            .arg(&tdl)
            .arg(&tlosses)
            .arg(&targets.dev)
            .arg(&r032)
            .arg(&v32)
            .arg(&loss_scale)
            .arg(&with_grads);
    })
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
    /// V = 500 and 32000 take the register kernel (`classifier_xent_vec4`), V = 501 the
    /// streaming one; dlogits are the f32 logits, in place (the kernels' bf16 dlogits are
    /// checked by `cuda_xent_kernels_match_f64`, free of the GEMMs' rounding).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_classifier_matches_cpu() {
        // T = 301 rows in chunks of 8 (the last ragged); at V = 32000 one row per chunk.
        for (t, v) in [(301, 500), (301, 501), (40, 32000)] {
            classifier_case(t, 64, v);
        }
    }

    fn classifier_case(t: usize, c: usize, v: usize) {
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
        let mut randv =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w, dw0) = (randv(t * c), randv(v * c), randv(v * c));
        // Every 7th target ignored.
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
            GradWrite::Add,
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
            GradWrite::Add,
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
            eprintln!("classifier V = {v} {what}: max err {err:.3e} at {i} (scale {sc:.3})");
            assert!(
                err <= tol * sc,
                "V = {v} {what}[{i}] = {} vs {}",
                got[i],
                want[i]
            );
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
        be.classifier(
            &mut losses2,
            None,
            &x_g,
            &w_g,
            &tg_g,
            scale,
            t,
            c,
            v,
            GradWrite::Add,
        )
        .unwrap();
        cmp("losses (no grads)", &losses2, &losses_c);
        // A target >= V is a shape error.
        let mut bad = targets.clone();
        bad[5] = v as i32;
        be.upload_idx(&mut tg_g, &bad).unwrap();
        let r = be.classifier(
            &mut losses2,
            None,
            &x_g,
            &w_g,
            &tg_g,
            scale,
            t,
            c,
            v,
            GradWrite::Add,
        );
        assert!(matches!(r, Err(BackendError::Shape { .. })), "{r:?}");
    }

    /// Both softmax kernels against an f64 reference, on a GPU only, from the same logits
    /// (uniform in [-8, 8)): losses within 2e-5 relative (at least 1); dlogits within 1e-5
    /// relative plus 1e-6 loss_scale (f32, in place over the logits) or 5e-3 relative (bf16, a
    /// separate buffer: one rounding, 2^-8). Rows start at r0 = 3, so losses[..3] must stay
    /// NaN; ignored rows give exactly 0. V = 32000, 500 and 4 run `classifier_xent_vec4` when
    /// allowed (the last of a thread's float4 slots only partly used; V = 4: one thread
    /// busy); V = 501 and 32772 (over `VEC4_MAX_V`) always the streaming kernel. Targets
    /// include 0 and V - 1.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_xent_kernels_match_f64() {
        use super::super::elementwise::gpu_test::*;
        use crate::backend::Backend;

        let (be, _, mut rng) = setup(10);
        let (r0, bt, scale) = (3usize, 37usize, 0.37f32);
        for v in [32000usize, 500, 4, 501, 32772] {
            let logits: Vec<f32> = randv(&mut rng, bt * v).iter().map(|z| 8.0 * z).collect();
            let mut targets = vec![-100i32; r0];
            targets.extend((0..bt).map(|r| match r % 5 {
                1 => -100,
                2 => 0,
                3 => v as i32 - 1,
                _ => ((r * 7919) % v) as i32,
            }));
            // f64 reference: loss = mx + log sum exp(z - mx) - z_tg, dlogits as the kernels.
            let (mut loss_r, mut dl_r) = (vec![0f64; bt], vec![0f64; bt * v]);
            for r in 0..bt {
                let (tg, z) = (targets[r0 + r], &logits[r * v..][..v]);
                if tg < 0 {
                    continue;
                }
                let mx = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let sum: f64 = z.iter().map(|&x| (x as f64 - mx).exp()).sum();
                loss_r[r] = mx + sum.ln() - z[tg as usize] as f64;
                for (j, &x) in z.iter().enumerate() {
                    let p = (x as f64 - mx).exp() / sum;
                    dl_r[r * v + j] = scale as f64 * (p - f64::from(u8::from(j == tg as usize)));
                }
            }
            let tg_g = up_idx(&be, &targets);
            for allow_vec4 in [true, false] {
                for bf16 in [true, false] {
                    let what = format!("V = {v} vec4 {allow_vec4} bf16 dlogits {bf16}");
                    let lg = up(&be, &logits);
                    let dl = if bf16 {
                        let mut d = be.alloc_dtype(bt * v, DType::Bf16).unwrap();
                        be.upload(&mut d, &vec![f32::NAN; bt * v]).unwrap();
                        Some(d)
                    } else {
                        None
                    };
                    let losses = up(&be, &vec![f32::NAN; r0 + bt]);
                    let dlb = dl.as_ref().unwrap_or(&lg);
                    super::xent(
                        &be, &lg, dlb, &losses, &tg_g, r0, bt, v, scale, true, allow_vec4,
                    )
                    .unwrap();
                    let got_l = down(&be, &losses, r0 + bt);
                    assert!(got_l[..r0].iter().all(|l| l.is_nan()), "{what}: rows < r0");
                    let got_d = down(&be, dlb, bt * v);
                    let rel = if bf16 { 5e-3 } else { 1e-5 };
                    for r in 0..bt {
                        let (l, want) = (got_l[r0 + r], loss_r[r]);
                        if targets[r0 + r] < 0 {
                            assert_eq!(l.to_bits(), 0, "{what}: ignored row {r} loss");
                            let row = &got_d[r * v..][..v];
                            assert!(row.iter().all(|&g| g.to_bits() == 0), "{what}: row {r}");
                            continue;
                        }
                        let err = (l as f64 - want).abs();
                        assert!(
                            err <= 1e-5 * want.abs().max(1.0),
                            "{what}: loss {r} {l} vs {want}"
                        );
                        for j in 0..v {
                            let (g, want) = (got_d[r * v + j] as f64, dl_r[r * v + j]);
                            let ok = (g - want).abs() <= rel * want.abs() + 1e-6 * scale as f64;
                            assert!(ok, "{what}: dlogits[{r}, {j}] = {g} vs {want}");
                        }
                    }
                    // Without grads: the same losses, dlogits untouched.
                    if bf16 {
                        let losses2 = up(&be, &vec![f32::NAN; r0 + bt]);
                        super::xent(
                            &be, &lg, dlb, &losses2, &tg_g, r0, bt, v, scale, false, allow_vec4,
                        )
                        .unwrap();
                        assert_eq!(down(&be, &losses2, r0 + bt)[r0..], got_l[r0..], "{what}");
                        assert_eq!(down(&be, dlb, bt * v), got_d, "{what}: no grads");
                    }
                }
            }
        }
    }

    /// The softmax kernels alone on a GPU, one chunk of the TinyLlama run (4194 rows, V =
    /// 32000, f32 logits, bf16 dlogits): `cargo test --release --lib cuda_xent_timing --
    /// --ignored --nocapture`. Prints us per launch and the bytes moved per second.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_xent_timing() {
        use crate::backend::Backend;
        let be = CudaBackend::new(0).expect("a CUDA device");
        let (bt, v) = (4194usize, 32000usize);
        let mut logits = be.alloc(bt * v).unwrap();
        let host: Vec<f32> = (0..bt * v)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
            .collect();
        be.upload(&mut logits, &host).unwrap();
        let dl = be.alloc_dtype(bt * v, DType::Bf16).unwrap();
        let losses = be.alloc(bt).unwrap();
        let mut tg = be.alloc_idx(bt).unwrap();
        let targets: Vec<i32> = (0..bt).map(|i| (i * 31 % v) as i32).collect();
        be.upload_idx(&mut tg, &targets).unwrap();
        for vec4 in [false, true, false, true] {
            let run = || xent(&be, &logits, &dl, &losses, &tg, 0, bt, v, 1.0, true, vec4).unwrap();
            run();
            be.synchronize().unwrap();
            let n = 50;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                run();
            }
            be.synchronize().unwrap();
            let us = t0.elapsed().as_secs_f64() / n as f64 * 1e6;
            let bytes = (bt * v * (4 + 2)) as f64;
            eprintln!(
                "xent bt {bt} V {v} vec4 {vec4}: {us:.1} us ({:.2} TB/s)",
                bytes / us / 1e6
            );
        }
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
                GradWrite::Add,
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
