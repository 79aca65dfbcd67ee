//! AdamW and the sum of squares of gradient clipping (kernels and math in `adamw.cu`).

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::elementwise::grid_stride;
use super::need;
use crate::backend::cuda::{drv, launch, CudaBackend, CudaBuf, DType, Ten};
use crate::backend::{adamw_each, AdamWStep, AdamWTensor, BackendError};

/// Most tensors of one multi-tensor launch; must equal `ADAMW_MAX_TENSORS` in `adamw.cu`.
const MAX_TENSORS: usize = 2048;

/// One tensor of `adamw_tensors_vec8`: `struct AdamWDesc` in `adamw.cu`, the same 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamWDesc {
    param: u64,
    m: u64,
    v: u64,
    grad: Ten,
    working: Ten,
    weight_decay: f32,
    pad: i32,
}

// SAFETY: plain old data with the C layout of the kernel's `AdamWDesc`.
unsafe impl DeviceRepr for AdamWDesc {}

/// Threads per block of `sum_squares_partial`.
const SS_THREADS: usize = 256;
/// Most partials (blocks) per buffer of `sum_squares_partial`.
const SS_MAX_BLOCKS: usize = 1024;

/// Blocks of `sum_squares_partial` for a buffer of `n` elements: a function of n only, so
/// the partials (and the host sum) are the same on every run and every GPU.
fn ss_blocks(n: usize) -> usize {
    n.div_ceil(SS_THREADS).min(SS_MAX_BLOCKS)
}

/// `sum_b sum_i b[i]^2` over the leading `len` of each buffer (f32 or bf16): one kernel per
/// buffer writes per-block f64 partials into one scratch array, which is downloaded once (the
/// one host sync) and summed on the host in buffer order, then block order. Bitwise
/// reproducible.
pub fn sum_squares(be: &CudaBackend, bufs: &[(&CudaBuf, usize)]) -> Result<f64, BackendError> {
    const OP: &str = "sum_squares";
    for (i, &(buf, len)) in bufs.iter().enumerate() {
        need(OP, &format!("buffer {i} [len]"), buf.len(), len)?;
    }
    if bufs.len() > 1 && bufs.len() <= MAX_TENSORS && whole_groups(be, bufs) {
        let starts = group_starts(bufs.iter().map(|&(_, len)| len));
        return sum_squares_tensors(be, bufs, &starts);
    }
    let blocks: Vec<usize> = bufs.iter().map(|&(_, len)| ss_blocks(len)).collect();
    let total: usize = blocks.iter().sum();
    if total == 0 {
        return Ok(0.0);
    }
    let mut partials = be.stream.alloc_zeros::<f64>(total).map_err(drv(OP))?;
    let mut off = 0;
    for (&(buf, len), &nb) in bufs.iter().zip(&blocks) {
        if nb == 0 {
            continue;
        }
        let n64 = len as i64;
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, 1, 1),
            block_dim: (SS_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut view = partials.slice_mut(off..off + nb);
        // 16-byte loads when whole vectors cover the buffer (allocations are 256-byte aligned).
        let aligned = be.raw(buf).is_multiple_of(16);
        // The kernel and its count of thread steps (a float4, 8 bf16 or one element each).
        let (name, count) = match (buf.dtype(), aligned) {
            (DType::F32, true) if len.is_multiple_of(4) => ("sum_squares_partial_vec4", n64 / 4),
            (DType::F32, _) => ("sum_squares_partial", n64),
            (DType::Bf16, true) if len.is_multiple_of(8) => ("sum_squares_partial_bf16x8", n64 / 8),
            (DType::Bf16, _) => ("sum_squares_partial_bf16", n64),
        };
        let x = be.raw(buf);
        // Checked: buf holds len; the view holds exactly this launch's nb blocks.
        launch(be, name, cfg, |a| {
            a.arg(&mut view).arg(&x).arg(&count);
        })?;
        off += nb;
    }
    let mut host = vec![0.0f64; total];
    be.stream
        .memcpy_dtoh(&partials, &mut host)
        .map_err(drv(OP))?;
    be.stream.synchronize().map_err(drv(OP))?;
    let mut sum = 0.0f64;
    let mut off = 0;
    for &nb in &blocks {
        sum += host[off..off + nb].iter().sum::<f64>();
        off += nb;
    }
    Ok(sum)
}

/// Whether one multi-tensor launch may cover these buffers: each holds its `len`, a multiple of
/// 8, and starts 16-byte aligned (else the per-tensor kernels run).
fn whole_groups(be: &CudaBackend, bufs: &[(&CudaBuf, usize)]) -> bool {
    bufs.iter()
        .all(|&(b, len)| len.is_multiple_of(8) && b.len() >= len && be.raw(b).is_multiple_of(16))
}

/// The 8-element group each of `lens` starts at when they are numbered one after the other,
/// and the total at the end.
fn group_starts(lens: impl Iterator<Item = usize>) -> Vec<i64> {
    let mut starts = vec![0i64];
    let mut at = 0i64;
    for len in lens {
        at += (len / 8) as i64;
        starts.push(at);
    }
    starts
}

/// Bias corrections 1 - beta^step, in f64 on the host and passed as f32.
fn bias_corrections(hp: &AdamWStep, op: &'static str) -> Result<(f32, f32), BackendError> {
    if hp.step == 0 {
        return Err(BackendError::Shape {
            op,
            message: "step is 1-based, got 0".into(),
        });
    }
    let step = hp.step as f64;
    Ok((
        (1.0 - (hp.beta1 as f64).powf(step)) as f32,
        (1.0 - (hp.beta2 as f64).powf(step)) as f32,
    ))
}

/// [`crate::backend::Backend::adamw_tensors`]: every tensor in one launch of
/// `adamw_tensors_vec8` when all qualify (`whole_groups`: whole 8-element groups, aligned; f32
/// param and moments; at most `MAX_TENSORS`), else one launch per tensor. The same math per element either way
/// (`adamw_math`), so the same results.
pub fn step_tensors(
    be: &CudaBackend,
    tensors: &mut [AdamWTensor<'_, CudaBuf>],
    hp: AdamWStep,
) -> Result<(), BackendError> {
    const OP: &str = "adamw_tensors";
    let (bc1, bc2) = bias_corrections(&hp, OP)?;
    let mut bufs: Vec<(&CudaBuf, usize)> = Vec::with_capacity(4 * tensors.len());
    let mut f32_state = true;
    for t in tensors.iter() {
        bufs.extend([(&*t.param, t.n), (t.grad, t.n), (&*t.m, t.n), (&*t.v, t.n)]);
        if let Some(w) = t.working.as_deref() {
            bufs.push((w, t.n));
        }
        f32_state &= [&*t.param, &*t.m, &*t.v]
            .iter()
            .all(|b| b.dtype() == DType::F32);
    }
    let one_launch =
        f32_state && !tensors.is_empty() && tensors.len() <= MAX_TENSORS && whole_groups(be, &bufs);
    drop(bufs);
    if !one_launch {
        return adamw_each(be, tensors, hp);
    }
    let starts = group_starts(tensors.iter().map(|t| t.n));
    let descs: Vec<AdamWDesc> = tensors
        .iter()
        .map(|t| AdamWDesc {
            param: be.raw(t.param),
            m: be.raw(t.m),
            v: be.raw(t.v),
            grad: be.ten(t.grad),
            working: be.ten_opt(t.working.as_deref()),
            weight_decay: t.weight_decay,
            pad: 0,
        })
        .collect();
    let total8 = *starts.last().unwrap_or(&0) as usize;
    if total8 == 0 {
        return Ok(());
    }
    let d_descs = be.stream.clone_htod(&descs).map_err(drv(OP))?;
    let d_starts = be.stream.clone_htod(&starts).map_err(drv(OP))?;
    let count = tensors.len() as i32;
    let AdamWStep {
        lr,
        beta1,
        beta2,
        eps,
        grad_scale,
        ..
    } = hp;
    // Checked (whole_groups): every tensor's buffers hold its n = 8 (starts[k + 1] - starts[k])
    // elements and are 16-byte aligned; param, m and v are f32.
    launch(be, "adamw_tensors_vec8", grid_stride(total8), |a| {
        a.arg(&d_descs).arg(&d_starts).arg(&count);
        a.arg(&lr).arg(&beta1).arg(&beta2).arg(&eps);
        a.arg(&grad_scale).arg(&bc1).arg(&bc2);
    })
}

/// `sum_squares` of buffers that all qualify for one launch (`whole_groups`): one partial per
/// block of `sum_squares_tensors`, the grid a function of the sizes only, summed on the host in
/// block order.
fn sum_squares_tensors(
    be: &CudaBackend,
    bufs: &[(&CudaBuf, usize)],
    starts: &[i64],
) -> Result<f64, BackendError> {
    const OP: &str = "sum_squares";
    let total8 = *starts.last().unwrap_or(&0) as usize;
    let blocks = ss_blocks(total8);
    if blocks == 0 {
        return Ok(0.0);
    }
    let tens: Vec<Ten> = bufs.iter().map(|&(b, _)| be.ten(b)).collect();
    let d_tens = be.stream.clone_htod(&tens).map_err(drv(OP))?;
    let d_starts = be.stream.clone_htod(starts).map_err(drv(OP))?;
    let mut partials = unsafe { be.stream.alloc::<f64>(blocks) }.map_err(drv(OP))?;
    let count = bufs.len() as i32;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (SS_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // Checked (whole_groups): buffer k holds 8 (starts[k + 1] - starts[k]) elements, 16-byte
    // aligned; every block writes its partial.
    launch(be, "sum_squares_tensors", cfg, |a| {
        a.arg(&mut partials).arg(&d_tens).arg(&d_starts).arg(&count);
    })?;
    let mut host = vec![0.0f64; blocks];
    be.stream
        .memcpy_dtoh(&partials, &mut host)
        .map_err(drv(OP))?;
    be.stream.synchronize().map_err(drv(OP))?;
    Ok(host.iter().sum())
}

/// One AdamW update of `n` elements of param, m, v (in place) from grad (f32 or bf16); with
/// `working`, the new param is also stored there (rounded to its precision) by the same kernel.
#[allow(clippy::too_many_arguments)]
pub fn step(
    be: &CudaBackend,
    param: &mut CudaSlice<f32>,
    grad: &CudaBuf,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    working: Option<&mut CudaBuf>,
    n: usize,
    hp: AdamWStep,
) -> Result<(), BackendError> {
    const OP: &str = "adamw";
    if let Some(w) = working.as_ref() {
        need(OP, "working [n]", w.len(), n)?;
    }
    need(OP, "param [n]", param.len(), n)?;
    need(OP, "grad [n]", grad.len(), n)?;
    need(OP, "m [n]", m.len(), n)?;
    need(OP, "v [n]", v.len(), n)?;
    let (bc1, bc2) = bias_corrections(&hp, OP)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as i64;
    let AdamWStep {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_scale,
        ..
    } = hp;
    let aligned = [be.ptr(&*param), be.raw(grad), be.ptr(&*m), be.ptr(&*v)]
        .iter()
        .all(|p| p.is_multiple_of(16))
        && working
            .as_deref()
            .is_none_or(|w| be.raw(w).is_multiple_of(16));
    if n.is_multiple_of(8) && aligned {
        let (tg, tw) = (be.ten(grad), be.ten_opt(working.as_deref()));
        let n8 = n64 / 8;
        // Checked: every buffer holds n = 8 n8 and is 16-byte aligned.
        return launch(be, "adamw_step_vec8", grid_stride(n / 8), |a| {
            a.arg(param).arg(&tg).arg(m).arg(v).arg(&tw).arg(&n8);
            a.arg(&lr).arg(&beta1).arg(&beta2).arg(&eps);
            a.arg(&weight_decay).arg(&grad_scale).arg(&bc1).arg(&bc2);
        });
    }
    let (tg, tw) = (be.ten(grad), working.map(|w| be.ten(w)));
    let name = if tw.is_some() {
        "adamw_step_copy"
    } else {
        "adamw_step"
    };
    // Checked: param, grad, m, v (and working) hold n; the kernel touches i < n.
    launch(be, name, grid_stride(n), |a| {
        a.arg(param).arg(&tg).arg(m).arg(v);
        if let Some(tw) = &tw {
            a.arg(tw);
        }
        a.arg(&n64);
        a.arg(&lr).arg(&beta1).arg(&beta2).arg(&eps);
        a.arg(&weight_decay).arg(&grad_scale).arg(&bc1).arg(&bc2);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_blocks_depend_on_n_only() {
        assert_eq!(ss_blocks(0), 0);
        assert_eq!(ss_blocks(1), 1);
        assert_eq!(ss_blocks(SS_THREADS + 1), 2);
        assert_eq!(ss_blocks(1 << 30), SS_MAX_BLOCKS);
    }

    /// CUDA against the CPU on a GPU only. AdamW: 1e-6 relative (the same f32 steps; only
    /// the bias corrections differ: f64 on the host here, f32 powf on the CPU, ~1 ulp), over
    /// three steps. sum_squares: both are f64 sums of exact f64 squares in different orders,
    /// so 1e-12 relative; and bitwise reproducible run to run.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_adamw_and_sum_squares_match_cpu() {
        // Odd n: the scalar kernels; a multiple of 8: adamw_step_vec8, sum_squares_partial_vec4.
        for n in [300_007, 300_000] {
            adamw_and_sum_squares_match_cpu(n);
        }
    }

    fn adamw_and_sum_squares_match_cpu(n: usize) {
        use super::super::elementwise::gpu_test::*;
        use crate::backend::Backend;
        let (be, cpu, mut rng) = setup(55);
        let (p, m0) = (randv(&mut rng, n), randv(&mut rng, n));
        let v0: Vec<f32> = randv(&mut rng, n).iter().map(|x| x * x).collect();
        let (mut p_c, mut m_c, mut v_c) = (p.clone(), m0.clone(), v0.clone());
        let (mut p_g, mut m_g, mut v_g) = (up(&be, &p), up(&be, &m0), up(&be, &v0));
        for step in 1..=3 {
            let grad = randv(&mut rng, n);
            let hp = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: 0.5,
                step,
            };
            cpu.adamw(&mut p_c, &grad, &mut m_c, &mut v_c, n, hp)
                .unwrap();
            be.adamw(&mut p_g, &up(&be, &grad), &mut m_g, &mut v_g, n, hp)
                .unwrap();
        }
        close("adamw m", &down(&be, &m_g, n), &m_c, 1e-6);
        close("adamw v", &down(&be, &v_g, n), &v_c, 1e-6);
        close("adamw param", &down(&be, &p_g, n), &p_c, 1e-6);

        // sum_squares of the same values on both (the AdamW results above differ by ~1 ulp,
        // which moves a sum of 3e5 squares by far more than 1e-12).
        let (p_s, m_s, v_s) = (up(&be, &p_c), up(&be, &m_c), up(&be, &v_c));
        let bufs_c: Vec<(&Vec<f32>, usize)> = vec![(&p_c, n), (&m_c, 0), (&v_c, 1000)];
        let bufs_g: Vec<(&crate::backend::cuda::CudaBuf, usize)> =
            vec![(&p_s, n), (&m_s, 0), (&v_s, 1000)];
        let want = cpu.sum_squares(&bufs_c).unwrap();
        let got = be.sum_squares(&bufs_g).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        assert_eq!(got.to_bits(), be.sum_squares(&bufs_g).unwrap().to_bits());
        assert_eq!(be.sum_squares(&[]).unwrap(), 0.0);
    }
}
