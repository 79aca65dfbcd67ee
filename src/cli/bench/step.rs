//! The training steps of `packtrain bench`: the packed batches (and the `--batches` file for
//! `bench/torch_baseline.py`), fresh weights, and the timed loop of `train::run`'s step.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{Backend, BackendError};
use crate::config::{Config, Leftovers, ModelConfig};
use crate::data::{synthetic_lengths, Document, TokenStore};
use crate::model::{DeviceBatch, Llama, ParamKind, ParamLayout};
use crate::packing::{plan_epochs, PackedBatch, PlanParams};
use crate::train::optimizer::AdamW;

// ---------------------------------------------------------------- batches

/// The batches of one benchmark, as written by `--batches`.
#[derive(Debug, Clone, Serialize)]
pub struct BatchesFile {
    pub model: String,
    /// The model's shapes (as in the TOML `[model]` section).
    pub config: ModelConfig,
    pub recompute: bool,
    pub tokens_per_micro_batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    pub peak_flops: f64,
    /// How targets are made: token i predicts token i + 1 of its document; the last token of
    /// each document predicts nothing (every token is a label).
    pub targets: &'static str,
    /// `warmup + steps` batches, step i trains on batch i.
    pub batches: Vec<BatchRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchRecord {
    pub cu_seqlens: Vec<i32>,
    pub tokens: Vec<u32>,
}

/// `n` packed batches of at most `tokens` tokens: synthetic log-normal lengths (the
/// `[data.synthetic]` section of `cfg`, clipped to the budget), packed by the planner, with
/// uniformly random token ids in `0..vocab`.
pub fn make_batches(
    cfg: &Config,
    tokens: usize,
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<PackedBatch>> {
    let mut syn = cfg.data.synthetic.clone();
    syn.max_len = syn.max_len.min(tokens).max(syn.min_len.max(2));
    let params = PlanParams {
        tokens_per_micro_batch: tokens,
        micro_steps: 1,
        world_size: 1,
        seed,
        leftovers: Leftovers::Drop,
    };
    // Enough documents for at least 80 bins, so the planner works as it does on a corpus.
    let mean_len = synthetic_lengths(&syn, 4096, seed)
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / 4096.0;
    let mut num_docs = ((n.max(80) * tokens) as f64 / mean_len * 1.2) as usize + 64;
    loop {
        let lengths = synthetic_lengths(&syn, num_docs, seed);
        let plans = plan_epochs(&lengths, &params, 1)?;
        let plan = &plans[0];
        if plan.num_steps() >= n {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x70_6b_65_6e);
            let vocab = cfg.model.vocab_size as u32;
            let docs: Vec<Document> = lengths
                .iter()
                .map(|&l| Document::new((0..l).map(|_| rng.random_range(0..vocab)).collect()))
                .collect();
            let store = TokenStore::from_documents(&docs);
            return (0..n)
                .map(|s| Ok(PackedBatch::assemble(plan.bin(s, 0, 0), &store)?))
                .collect();
        }
        num_docs *= 2;
    }
}

pub(super) fn write_batches(path: &Path, file: &BatchesFile) -> anyhow::Result<()> {
    let text = serde_json::to_string(file)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------- weights

/// Fresh weights with [`ParamLayout::init`]'s distributions (norms 1, biases 0, matrices and
/// embeddings N(0, init_std), residual projections scaled by 1/sqrt(2 L)), drawn in parallel:
/// chunk k of tensor i from its own ChaCha8 stream. Values differ from `init`'s, which is
/// single-threaded and too slow for a billion parameters.
pub fn init_weights(layout: &ParamLayout, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    const CHUNK: usize = 1 << 20;
    let residual_scale = 1.0 / (2.0 * cfg.n_layers as f64).sqrt();
    layout
        .specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let n = spec.numel();
            let std = match spec.kind {
                ParamKind::Norm => return vec![1.0; n],
                ParamKind::Bias => return vec![0.0; n],
                ParamKind::Embedding | ParamKind::Matrix { residual: false } => cfg.init_std,
                ParamKind::Matrix { residual: true } => cfg.init_std * residual_scale,
            };
            let normal = Normal::new(0.0f32, std as f32).unwrap_or_else(|_| {
                Normal::new(0.0, 0.02).unwrap_or_else(|_| unreachable!("valid std"))
            });
            let mut w = vec![0.0f32; n];
            w.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(((i as u64) << 32) | k as u64);
                for x in chunk {
                    *x = normal.sample(&mut rng);
                }
            });
            w
        })
        .collect()
}

// ---------------------------------------------------------------- the steps

/// Timings of the steps of one run (seconds), and what they trained on.
pub struct StepTimes {
    pub step: Vec<f64>,
    pub fwd_bwd: Vec<f64>,
    pub grad_norm: Vec<f64>,
    pub adamw: Vec<f64>,
    pub losses: Vec<f64>,
    /// Largest memory reading, minus the baseline (bytes); 0 when there is no probe.
    pub peak_mem: u64,
    /// The precision of the layers' weight gradients (`train.bf16_grads`, on a backend that
    /// computes in bf16).
    pub weight_grads: &'static str,
}

/// Run `batches.len()` training steps of `cfg` on `be`, each on its own batch; `mem` reads
/// the device memory in use (sampled after allocation and after each phase).
pub fn run_steps<B: Backend>(
    be: &B,
    cfg: &Config,
    batches: &[PackedBatch],
    recompute: bool,
    seed: u64,
    mem: &dyn Fn() -> Result<usize, BackendError>,
) -> Result<StepTimes, BackendError> {
    let base = mem()?;
    let mut peak = base;
    let sample = |peak: &mut usize| -> Result<(), BackendError> {
        *peak = (*peak).max(mem()?);
        Ok(())
    };
    let layout = ParamLayout::new(&cfg.model);
    let capacity = batches
        .iter()
        .map(PackedBatch::num_tokens)
        .max()
        .unwrap_or(1);
    let weights = init_weights(&layout, &cfg.model, seed);
    // One micro-step per step: the weight gradients are bf16 where the backend computes in bf16
    // (`train.bf16_grads`, on by default).
    let mut model = Llama::new(be, &cfg.model, &weights, capacity, recompute)?;
    if cfg.train.bf16_grads {
        model = model.with_act_grads(be)?;
    }
    drop(weights);
    let mut opt = AdamW::new(be, &layout)?;
    let mut batch = DeviceBatch::new(be, capacity)?;
    be.synchronize()?;
    sample(&mut peak)?;

    let mut times = StepTimes {
        step: Vec::new(),
        fwd_bwd: Vec::new(),
        grad_norm: Vec::new(),
        adamw: Vec::new(),
        losses: Vec::new(),
        peak_mem: 0,
        weight_grads: match cfg.train.bf16_grads && !be.activations_are_f32() {
            true => "bf16",
            false => "f32",
        },
    };
    let tc = &cfg.train;
    for packed in batches {
        let t0 = Instant::now();
        batch.upload(be, packed)?;
        model.zero_grads(be)?;
        let scale = 1.0 / packed.num_targets.max(1) as f32;
        // forward_backward downloads the losses: it ends synchronized.
        let loss_sum = model.forward_backward(be, &batch, scale)?;
        let t1 = Instant::now();
        sample(&mut peak)?;
        let t1b = Instant::now();
        let norms: Vec<(&B::Buf, usize)> = model
            .grads
            .iter()
            .zip(&layout.specs)
            .map(|(g, s)| (g, s.numel()))
            .collect();
        let grad_norm = be.sum_squares(&norms)?.sqrt();
        let t1c = Instant::now();
        let clip = if tc.grad_clip > 0.0 && grad_norm > tc.grad_clip {
            tc.grad_clip / grad_norm
        } else {
            1.0
        };
        let (params, working, grads) = model.update_view();
        opt.update(be, &layout, params, working, grads, tc, tc.lr, clip as f32)?;
        be.synchronize()?;
        let t2 = Instant::now();
        sample(&mut peak)?;
        // The memory sample between the phases is not timed.
        let fb = (t1 - t0).as_secs_f64();
        let (gn, aw) = ((t1c - t1b).as_secs_f64(), (t2 - t1c).as_secs_f64());
        times.fwd_bwd.push(fb);
        times.grad_norm.push(gn);
        times.adamw.push(aw);
        times.step.push(fb + gn + aw);
        times
            .losses
            .push(loss_sum / packed.num_targets.max(1) as f64);
    }
    times.peak_mem = (peak - base) as u64;
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::cli::bench::{summarise, BenchModel};

    #[test]
    fn batches_are_packed_by_the_planner_and_reproducible() {
        let cfg = BenchModel::Llama160m.config().unwrap();
        let b = make_batches(&cfg, 16384, 5, 7).unwrap();
        assert_eq!(b.len(), 5);
        for x in &b {
            assert!(
                x.num_tokens() <= 16384 && x.num_tokens() > 15000,
                "{}",
                x.num_tokens()
            );
            assert!(x.tokens.iter().all(|&t| t < 32000));
            assert!(x.max_seqlen <= 4096);
            assert_eq!(x.num_targets, x.num_tokens() - x.num_docs());
        }
        assert_eq!(b, make_batches(&cfg, 16384, 5, 7).unwrap());
    }

    #[test]
    fn steps_run_on_the_cpu_and_summarise() {
        let mut cfg = Config::default();
        cfg.model.n_layers = 1;
        cfg.data.synthetic.max_len = 256;
        let batches = make_batches(&cfg, 512, 3, 1).unwrap();
        let cpu = CpuBackend::new();
        let mem = || Ok(0usize);
        let times = run_steps(&cpu, &cfg, &batches, true, 1, &mem).unwrap();
        assert_eq!(times.step.len(), 3);
        assert!(times.losses.iter().all(|l| l.is_finite()));
        let r = summarise("tiny", "cpu", &cfg, true, &batches, &times, 1, 1e12);
        assert_eq!(r.steps, 2);
        assert!(r.tokens_per_s > 0.0 && r.mfu > 0.0 && r.mfu_all_steps > 0.0);
        assert_eq!(
            times.step[1],
            times.fwd_bwd[1] + times.grad_norm[1] + times.adamw[1]
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["impl"], "packtrain");
        // The CPU computes in f32, so its gradients stay f32 whatever train.bf16_grads says.
        assert!(cfg.train.bf16_grads);
        assert_eq!(json["weight_grads"], "f32");
        // init_weights follows the layout and is deterministic.
        let layout = ParamLayout::new(&cfg.model);
        let w = init_weights(&layout, &cfg.model, 3);
        assert_eq!(w.len(), layout.specs.len());
        assert_eq!(w, init_weights(&layout, &cfg.model, 3));
    }
}
