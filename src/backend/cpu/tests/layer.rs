//! One transformer layer end to end on the CPU backend: bitwise determinism across runs and
//! thread counts, and a timing (ignored by default).

use super::super::testutil::*;
use super::*;

/// Sizes of one transformer layer.
struct Layer {
    lens: Vec<usize>,
    c: usize,
    h: usize,
    hkv: usize,
    f: usize,
}

/// Forward and backward of one pre-norm Llama layer (attention + SwiGLU MLP) on `be`,
/// returning every gradient, concatenated: dx, then the weight grads.
fn layer_fwd_bwd(be: &CpuBackend, l: &Layer, seed: u64, timed: bool) -> Vec<f32> {
    let mut rng = rng(seed);
    let (c, h, hkv, f) = (l.c, l.h, l.hkv, l.f);
    let d = c / h;
    let dims = attn_dims(&l.lens, h, hkv, d);
    let (t, qkvw) = (dims.t, dims.qkv_width());
    let cu = cu_of(&l.lens);
    let pos: Vec<i32> = l.lens.iter().flat_map(|&n| 0..n as i32).collect();
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|j| 10000f32.powf(-2.0 * j as f32 / d as f32))
        .collect();
    let x = f32s(&mut rng, t * c);
    let ln1: Vec<f32> = vec![1.0; c];
    let ln2 = ln1.clone();
    let sc = |n: usize| 1.0 / (n as f32).sqrt();
    let wqkv: Vec<f32> = f32s(&mut rng, qkvw * c).iter().map(|v| v * sc(c)).collect();
    let wo: Vec<f32> = f32s(&mut rng, c * c).iter().map(|v| v * sc(c)).collect();
    let wgu: Vec<f32> = f32s(&mut rng, 2 * f * c)
        .iter()
        .map(|v| v * sc(c))
        .collect();
    let wd: Vec<f32> = f32s(&mut rng, c * f).iter().map(|v| v * sc(f)).collect();
    let dy = f32s(&mut rng, t * c);
    let z = |n: usize| vec![0.0f32; n];

    let start = std::time::Instant::now();
    // forward
    let (mut n1, mut r1, mut qkv, mut att, mut lse) =
        (z(t * c), z(t), z(t * qkvw), z(t * c), z(h * t));
    be.rmsnorm_forward(&mut n1, &mut r1, &x, &ln1, t, c, 1e-5)
        .unwrap();
    be.matmul_forward(&mut qkv, &n1, &wqkv, None, t, c, qkvw)
        .unwrap();
    be.rope_forward(&mut qkv, &pos, &inv_freq, dims).unwrap();
    let t_att = std::time::Instant::now();
    be.attention_forward(&mut att, &mut lse, &qkv, &cu, dims)
        .unwrap();
    let t_att_fwd = t_att.elapsed();
    let mut x2 = x.clone();
    let mut ao = z(t * c);
    be.matmul_forward(&mut ao, &att, &wo, None, t, c, c)
        .unwrap();
    be.add_inplace(&mut x2, &ao, t * c).unwrap();
    let (mut n2, mut r2, mut gu, mut sw, mut mo) =
        (z(t * c), z(t), z(t * 2 * f), z(t * f), z(t * c));
    be.rmsnorm_forward(&mut n2, &mut r2, &x2, &ln2, t, c, 1e-5)
        .unwrap();
    be.matmul_forward(&mut gu, &n2, &wgu, None, t, c, 2 * f)
        .unwrap();
    be.swiglu_forward(&mut sw, &gu, t, f).unwrap();
    be.matmul_forward(&mut mo, &sw, &wd, None, t, f, c).unwrap();
    let t_fwd = start.elapsed();
    // backward (dx2 = dy flows through the residual; dx accumulates)
    let (mut dwqkv, mut dwo, mut dwgu, mut dwd, mut dln1, mut dln2) =
        (z(qkvw * c), z(c * c), z(2 * f * c), z(c * f), z(c), z(c));
    let mut dx2 = dy.clone();
    let (mut dsw, mut dgu, mut dn2) = (z(t * f), z(t * 2 * f), z(t * c));
    be.matmul_backward(
        &mut dsw,
        &mut dwd,
        None,
        &dy,
        &sw,
        &wd,
        t,
        f,
        c,
        GradWrite::Add,
    )
    .unwrap();
    be.swiglu_backward(&mut dgu, None, &dsw, &gu, t, f).unwrap();
    be.matmul_backward(
        &mut dn2,
        &mut dwgu,
        None,
        &dgu,
        &n2,
        &wgu,
        t,
        c,
        2 * f,
        GradWrite::Add,
    )
    .unwrap();
    be.rmsnorm_backward(
        &mut dx2,
        None,
        &mut dln2,
        &dn2,
        &x2,
        &ln2,
        &r2,
        t,
        c,
        GradWrite::Add,
    )
    .unwrap();
    let mut dx = dx2.clone();
    let (mut datt, mut dqkv, mut dn1) = (z(t * c), z(t * qkvw), z(t * c));
    be.matmul_backward(
        &mut datt,
        &mut dwo,
        None,
        &dx2,
        &att,
        &wo,
        t,
        c,
        c,
        GradWrite::Add,
    )
    .unwrap();
    let t_att = std::time::Instant::now();
    be.attention_backward(&mut dqkv, &datt, &qkv, &att, &lse, &cu, dims)
        .unwrap();
    let t_att_bwd = t_att.elapsed();
    be.rope_backward(&mut dqkv, &pos, &inv_freq, dims).unwrap();
    be.matmul_backward(
        &mut dn1,
        &mut dwqkv,
        None,
        &dqkv,
        &n1,
        &wqkv,
        t,
        c,
        qkvw,
        GradWrite::Add,
    )
    .unwrap();
    be.rmsnorm_backward(
        &mut dx,
        None,
        &mut dln1,
        &dn1,
        &x,
        &ln1,
        &r1,
        t,
        c,
        GradWrite::Add,
    )
    .unwrap();
    if timed {
        eprintln!(
            "layer T={t} C={c} H={h} Hkv={hkv} F={f} docs={:?}: forward {:.1} ms, forward+backward \
             {:.1} ms (attention forward {:.1} ms, backward {:.1} ms)",
            l.lens,
            t_fwd.as_secs_f64() * 1e3,
            start.elapsed().as_secs_f64() * 1e3,
            t_att_fwd.as_secs_f64() * 1e3,
            t_att_bwd.as_secs_f64() * 1e3
        );
    }
    [dx, dwqkv, dwo, dwgu, dwd, dln1, dln2, mo].concat()
}

/// Bitwise the same run to run and whatever the number of threads.
#[test]
fn layer_is_bitwise_deterministic_across_runs_and_thread_counts() {
    let be = CpuBackend::new();
    let l = Layer {
        lens: vec![1, 300, 77, 1, 530],
        c: 32,
        h: 4,
        hkv: 2,
        f: 96,
    };
    let a = layer_fwd_bwd(&be, &l, 7, false);
    let b = layer_fwd_bwd(&be, &l, 7, false);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let c1 = one.install(|| layer_fwd_bwd(&be, &l, 7, false));
    let c3 = three.install(|| layer_fwd_bwd(&be, &l, 7, false));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(bits(&a), bits(&b), "run to run");
    assert_eq!(bits(&a), bits(&c1), "1 thread");
    assert_eq!(bits(&a), bits(&c3), "3 threads");
}

/// Timing of one layer at the default run's size:
/// `cargo test --release --lib backend::cpu::tests::layer::bench_layer -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_layer_t8192() {
    let be = CpuBackend::new();
    for lens in [vec![2048; 4], vec![4096, 4096], vec![512; 16], {
        let mut v = vec![1, 3000, 700, 17, 1200, 2900];
        v.push(8192 - v.iter().sum::<usize>());
        v
    }] {
        let l = Layer {
            lens,
            c: 128,
            h: 4,
            hkv: 2,
            f: 384,
        };
        layer_fwd_bwd(&be, &l, 1, false); // warm-up
        for _ in 0..3 {
            layer_fwd_bwd(&be, &l, 1, true);
        }
    }
}
