//! `packtrain bench`: training-step throughput on one GPU.
//!
//! For each model (`configs/llama-160m.toml`, `configs/tinyllama-1.1b.toml`, built into the
//! binary): document lengths from `synthetic_lengths` (log-normal, median 400, sigma 0.9,
//! clipped to [16, 4096]), packed into micro-batches of `--tokens` by the real planner
//! (`plan_epochs`), random token ids; then `--warmup` untimed and `--steps` timed steps, each
//! on its own batch, of exactly what `train::run` does per step with one rank and one
//! micro-step: upload the batch, zero the gradients, forward + backward (`Llama`), global
//! gradient norm (`sum_squares`, clip at `train.grad_clip`), AdamW (`optimizer::AdamW`),
//! synchronize. Reported: step time (median and mean, and its phases), tokens/s and MFU
//! from the median step (mean tokens of a timed step / median step time: steady state, not
//! moved by a one-off slow step) and from all timed steps (timed tokens / timed seconds), and
//! peak memory; as a table and optionally one JSON line per model.
//!
//! FLOPs of one step (the numerator of MFU; recomputation is not counted, as usual):
//! - 6 N T: N = every parameter, embedding and lm_head included; T = tokens of the batch
//!   (forward 2 N T, backward 4 N T);
//! - attention, per document of length L, per layer: the forward is two GEMMs (Q K^T and
//!   P V) of L^2 / 2 (causal) x D x H multiply-adds each, 2 FLOPs per multiply-add, so
//!   2 L^2 D H; the backward is 2.5x the forward (five such GEMMs). Total 7 L^2 D H per layer.
//!
//! MFU = FLOPs of a step / its seconds / `--peak-flops` (989e12: H100 SXM dense bf16), for the
//! mean timed step over the median step time (`mfu`) and over all timed steps (`mfu_all_steps`). Peak memory = the largest `CudaBackend::memory_used()` (device-wide used bytes)
//! sampled after model and optimizer allocation and after each phase of every step, minus the
//! same reading taken before anything was allocated (so the CUDA context is not counted).
//!
//! `--batches FILE` writes the packed batches (cu_seqlens and token ids, plus the model's
//! shapes and the step counts) so `bench/torch_baseline.py` trains on exactly the same
//! batches. It is written before the GPU is opened, so it exists even when our step fails.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError};
use crate::config::{Config, Leftovers, ModelConfig};
use crate::data::{synthetic_lengths, Document, TokenStore};
use crate::model::{DeviceBatch, Llama, ParamKind, ParamLayout};
use crate::packing::{plan_epochs, PackedBatch, PlanParams};
use crate::train::optimizer::AdamW;

/// H100 SXM dense bf16 tensor-core peak, FLOP/s.
pub const H100_PEAK_FLOPS: f64 = 989e12;

const LLAMA_160M: &str = include_str!("../../configs/llama-160m.toml");
const TINYLLAMA_1_1B: &str = include_str!("../../configs/tinyllama-1.1b.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    /// d 768, 12 layers, 12 heads, ffn 2048, vocab 32000, untied.
    #[value(name = "llama-160m")]
    Llama160m,
    /// d 2048, 22 layers, 32 heads / 4 kv heads, ffn 5632, vocab 32000, untied.
    #[value(name = "tinyllama-1.1b")]
    TinyLlama1_1b,
    /// Both, one after the other.
    All,
}

impl BenchModel {
    fn name(self) -> &'static str {
        match self {
            BenchModel::Llama160m => "llama-160m",
            BenchModel::TinyLlama1_1b => "tinyllama-1.1b",
            BenchModel::All => "all",
        }
    }

    /// The built-in config of one model.
    pub fn config(self) -> anyhow::Result<Config> {
        let text = match self {
            BenchModel::Llama160m => LLAMA_160M,
            BenchModel::TinyLlama1_1b => TINYLLAMA_1_1B,
            BenchModel::All => bail!("`all` is not one model"),
        };
        Config::parse(text).with_context(|| format!("the built-in {} config", self.name()))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model to benchmark.
    #[arg(long, value_enum, default_value_t = BenchModel::All)]
    pub model: BenchModel,
    /// Tokens per micro-batch (the packing budget).
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Recompute layer activations in the backward (train.recompute), whatever the config says.
    #[arg(long, conflicts_with = "no_recompute")]
    pub recompute: bool,
    /// Keep every layer's activations, whatever the config says.
    #[arg(long)]
    pub no_recompute: bool,
    /// Write the results, one JSON object per line (with `--model all`, FILE gets the model
    /// name before its extension, one file per model).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the packed batches for `bench/torch_baseline.py` (named as `--json` with `all`).
    #[arg(long, value_name = "FILE")]
    pub batches: Option<PathBuf>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Seed of the lengths, the token ids, the plan and the weights.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Peak FLOP/s for MFU (default: H100 SXM dense bf16).
    #[arg(long, default_value_t = H100_PEAK_FLOPS)]
    pub peak_flops: f64,
}

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

fn write_batches(path: &Path, file: &BatchesFile) -> anyhow::Result<()> {
    let text = serde_json::to_string(file)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------- FLOPs

/// FLOPs of one training step on `batch` (see the module doc): 6 N T + 7 L^2 D H per document
/// and layer.
pub fn step_flops(cfg: &ModelConfig, n_params: usize, cu_seqlens: &[i32]) -> (f64, f64) {
    let t = cu_seqlens.last().copied().unwrap_or(0) as f64;
    let dense = 6.0 * n_params as f64 * t;
    let dh = (cfg.head_dim() * cfg.n_heads) as f64;
    let attn: f64 = cu_seqlens
        .windows(2)
        .map(|w| {
            let l = (w[1] - w[0]) as f64;
            7.0 * l * l * dh * cfg.n_layers as f64
        })
        .sum();
    (dense, attn)
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

// ---------------------------------------------------------------- the benchmark

/// The result of one model's benchmark (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub model: String,
    pub device: String,
    pub params: usize,
    pub recompute: bool,
    /// How cuBLAS multiplies (PACKTRAIN_GEMM).
    pub gemm: String,
    pub attention: &'static str,
    pub tokens_per_micro_batch: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Mean tokens of a timed batch.
    pub tokens_per_step: f64,
    pub docs_per_step: f64,
    pub step_ms_median: f64,
    pub step_ms_mean: f64,
    /// Upload, zero_grad, forward and backward (ends with the loss download).
    pub fwd_bwd_ms_median: f64,
    /// Global gradient norm (`sum_squares`, a host sync).
    pub grad_norm_ms_median: f64,
    /// AdamW over every tensor, then synchronize.
    pub adamw_ms_median: f64,
    /// Mean tokens of a timed step / median step time.
    pub tokens_per_s: f64,
    /// Timed tokens / timed seconds.
    pub tokens_per_s_all_steps: f64,
    /// Mean FLOPs of a timed step: 6 N T and attention.
    pub flops_6nt_per_step: f64,
    pub flops_attn_per_step: f64,
    /// Mean FLOPs of a timed step / median step time / peak.
    pub mfu: f64,
    /// FLOPs of the timed steps / their seconds / peak.
    pub mfu_all_steps: f64,
    pub peak_flops: f64,
    pub peak_mem_bytes: u64,
    pub peak_mem_gib: f64,
    pub peak_mem_method: &'static str,
    pub loss_first: f64,
    pub loss_last: f64,
    pub flops_formula: &'static str,
}

pub const FLOPS_FORMULA: &str = "6*N*T (N = all params incl. embedding and lm_head) + \
    per document and layer 7*L^2*D*H (causal attention forward 2*L^2*D*H, backward 2.5x)";

/// Timings of the steps of one run (seconds), and what they trained on.
pub struct StepTimes {
    pub step: Vec<f64>,
    pub fwd_bwd: Vec<f64>,
    pub grad_norm: Vec<f64>,
    pub adamw: Vec<f64>,
    pub losses: Vec<f64>,
    /// Largest memory reading, minus the baseline (bytes); 0 when there is no probe.
    pub peak_mem: u64,
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
    let mut model = Llama::new(be, &cfg.model, &weights, capacity, recompute)?;
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
        let (params, grads) = model.params_mut_and_grads();
        opt.update(be, &layout, params, grads, tc, tc.lr, clip as f32)?;
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

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Summarise the timed steps (those after `warmup`).
#[allow(clippy::too_many_arguments)]
pub fn summarise(
    model: &str,
    device: &str,
    cfg: &Config,
    recompute: bool,
    batches: &[PackedBatch],
    times: &StepTimes,
    warmup: usize,
    peak_flops: f64,
) -> BenchResult {
    let layout = ParamLayout::new(&cfg.model);
    let n_params = layout.numel();
    let timed = &batches[warmup..];
    let secs: f64 = times.step[warmup..].iter().sum();
    let tokens: usize = timed.iter().map(PackedBatch::num_tokens).sum();
    let (mut dense, mut attn) = (0.0, 0.0);
    for b in timed {
        let (d, a) = step_flops(&cfg.model, n_params, &b.cu_seqlens);
        dense += d;
        attn += a;
    }
    let n = timed.len().max(1) as f64;
    let step_median = median(&times.step[warmup..]);
    BenchResult {
        implementation: "packtrain",
        model: model.to_string(),
        device: device.to_string(),
        params: n_params,
        recompute,
        gemm: std::env::var("PACKTRAIN_GEMM").unwrap_or_else(|_| "bf16".into()),
        attention: "packtrain varlen (cu_seqlens)",
        tokens_per_micro_batch: cfg.packing.tokens_per_micro_batch,
        warmup,
        steps: timed.len(),
        tokens_per_step: tokens as f64 / n,
        docs_per_step: timed.iter().map(|b| b.num_docs() as f64).sum::<f64>() / n,
        step_ms_median: step_median * 1e3,
        step_ms_mean: mean(&times.step[warmup..]) * 1e3,
        fwd_bwd_ms_median: median(&times.fwd_bwd[warmup..]) * 1e3,
        grad_norm_ms_median: median(&times.grad_norm[warmup..]) * 1e3,
        adamw_ms_median: median(&times.adamw[warmup..]) * 1e3,
        tokens_per_s: tokens as f64 / n / step_median,
        tokens_per_s_all_steps: tokens as f64 / secs,
        flops_6nt_per_step: dense / n,
        flops_attn_per_step: attn / n,
        mfu: (dense + attn) / n / step_median / peak_flops,
        mfu_all_steps: (dense + attn) / secs / peak_flops,
        peak_flops,
        peak_mem_bytes: times.peak_mem,
        peak_mem_gib: times.peak_mem as f64 / (1u64 << 30) as f64,
        peak_mem_method: "cuMemGetInfo used bytes, max over samples after allocation and \
            after each phase, minus the reading before allocation",
        loss_first: times.losses.first().copied().unwrap_or(f64::NAN),
        loss_last: times.losses.last().copied().unwrap_or(f64::NAN),
        flops_formula: FLOPS_FORMULA,
    }
}

/// `path` with `-<model>` before its extension (for `--model all`).
fn per_model(path: &Path, model: &str) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{model}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{model}"),
    };
    path.with_file_name(name)
}

/// Benchmark one model; the error names the model.
fn bench_one(args: &BenchArgs, which: BenchModel, paths: &Paths) -> anyhow::Result<BenchResult> {
    let name = which.name();
    let mut cfg = which.config()?;
    cfg.packing.tokens_per_micro_batch = args.tokens;
    let recompute = !args.no_recompute && (args.recompute || cfg.train.recompute);
    cfg.train.recompute = recompute;
    let n = args.warmup + args.steps;
    let t_plan = Instant::now();
    let batches = make_batches(&cfg, args.tokens, n, args.seed)?;
    tracing::info!(
        model = name,
        batches = n,
        tokens = batches.iter().map(PackedBatch::num_tokens).sum::<usize>(),
        ms = t_plan.elapsed().as_millis() as u64,
        "batches planned"
    );
    if let Some(path) = &paths.batches {
        let file = BatchesFile {
            model: name.to_string(),
            config: cfg.model.clone(),
            recompute,
            tokens_per_micro_batch: args.tokens,
            warmup: args.warmup,
            steps: args.steps,
            seed: args.seed,
            peak_flops: args.peak_flops,
            targets: "next token within the document; -100 at each document's last token",
            batches: batches
                .iter()
                .map(|b| BatchRecord {
                    cu_seqlens: b.cu_seqlens.clone(),
                    tokens: b.tokens.clone(),
                })
                .collect(),
        };
        write_batches(path, &file)?;
        tracing::info!(path = %path.display(), "batches written");
    }

    let be = CudaBackend::new(args.gpu)
        .map_err(|e| anyhow::anyhow!("packtrain bench needs a CUDA GPU (GPU {}): {e}", args.gpu))?;
    let device = format!("{} ({})", be.device_name, be.arch);
    tracing::info!(model = name, device = %device, recompute, "benchmarking");
    let mem = || be.memory_used();
    let times = run_steps(&be, &cfg, &batches, recompute, args.seed, &mem)
        .with_context(|| format!("{name}: training step on {device}"))?;
    Ok(summarise(
        name,
        &device,
        &cfg,
        recompute,
        &batches,
        &times,
        args.warmup,
        args.peak_flops,
    ))
}

struct Paths {
    json: Option<PathBuf>,
    batches: Option<PathBuf>,
}

/// The results table (times are medians over the timed steps, tokens/s and MFU from them).
pub fn render(results: &[BenchResult]) -> String {
    let mut s = format!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9} {:>9}\n",
        "model",
        "params",
        "step ms",
        "mean ms",
        "fwd+bwd",
        "gradnorm",
        "adamw",
        "tokens/s",
        "MFU",
        "peak GiB",
        "recompute"
    );
    for r in results {
        s += &format!(
            "{:<16} {:>8.1}M {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>6.1}% {:>9.2} {:>9}\n",
            r.model,
            r.params as f64 / 1e6,
            r.step_ms_median,
            r.step_ms_mean,
            r.fwd_bwd_ms_median,
            r.grad_norm_ms_median,
            r.adamw_ms_median,
            r.tokens_per_s,
            r.mfu * 100.0,
            r.peak_mem_gib,
            r.recompute
        );
    }
    s
}

/// Run `packtrain bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 {
        bail!("--steps must be >= 1");
    }
    if args.tokens < 16 {
        bail!("--tokens must be >= 16");
    }
    let models: &[BenchModel] = match args.model {
        BenchModel::All => &[BenchModel::Llama160m, BenchModel::TinyLlama1_1b],
        BenchModel::Llama160m => &[BenchModel::Llama160m],
        BenchModel::TinyLlama1_1b => &[BenchModel::TinyLlama1_1b],
    };
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for &which in models {
        let name = which.name();
        let pick = |p: &Option<PathBuf>| match (p, args.model) {
            (Some(p), BenchModel::All) => Some(per_model(p, name)),
            (p, _) => p.clone(),
        };
        let paths = Paths {
            json: pick(&args.json),
            batches: pick(&args.batches),
        };
        let outcome = bench_one(args, which, &paths);
        let line = match &outcome {
            Ok(r) => serde_json::to_string(r)?,
            Err(e) => serde_json::json!({
                "impl": "packtrain",
                "model": name,
                "error": format!("{e:#}"),
            })
            .to_string(),
        };
        println!("{line}");
        if let Some(path) = &paths.json {
            std::fs::write(path, format!("{line}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        match outcome {
            Ok(r) => results.push(r),
            Err(e) => errors.push(format!("{name}: {e:#}")),
        }
    }
    if !results.is_empty() {
        println!("\n{}", render(&results));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn built_in_configs_have_the_issue_shapes() {
        let m = BenchModel::Llama160m.config().unwrap().model;
        assert_eq!(
            (
                m.d_model,
                m.n_layers,
                m.n_heads,
                m.n_kv_heads,
                m.ffn_dim,
                m.vocab_size
            ),
            (768, 12, 12, 12, 2048, 32000)
        );
        assert!(!m.tie_embeddings);
        let c = BenchModel::TinyLlama1_1b.config().unwrap();
        let m = &c.model;
        assert_eq!(
            (
                m.d_model,
                m.n_layers,
                m.n_heads,
                m.n_kv_heads,
                m.ffn_dim,
                m.vocab_size
            ),
            (2048, 22, 32, 4, 5632, 32000)
        );
        assert!(!m.tie_embeddings && !c.train.recompute);
        // TinyLlama's published parameter count.
        let n = ParamLayout::new(m).numel();
        assert!((1_090_000_000..1_110_000_000).contains(&n), "{n}");
        for cfg in [BenchModel::Llama160m.config().unwrap(), c] {
            let s = &cfg.data.synthetic;
            assert_eq!(
                (s.median_len, s.sigma, s.min_len, s.max_len),
                (400.0, 0.9, 16, 4096)
            );
            assert_eq!(cfg.packing.tokens_per_micro_batch, 16384);
        }
    }

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
    fn flops_formula() {
        let cfg = ModelConfig {
            n_layers: 2,
            n_heads: 4,
            d_model: 64,
            ..ModelConfig::default()
        };
        // Two documents of 10 and 20 tokens; D H = 64.
        let (dense, attn) = step_flops(&cfg, 1000, &[0, 10, 30]);
        assert_eq!(dense, 6.0 * 1000.0 * 30.0);
        assert_eq!(attn, 7.0 * (100.0 + 400.0) * 64.0 * 2.0);
    }

    #[test]
    fn per_model_paths() {
        assert_eq!(
            per_model(Path::new("out/b.json"), "llama-160m"),
            PathBuf::from("out/b-llama-160m.json")
        );
        assert_eq!(per_model(Path::new("b"), "x"), PathBuf::from("b-x"));
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
        // init_weights follows the layout and is deterministic.
        let layout = ParamLayout::new(&cfg.model);
        let w = init_weights(&layout, &cfg.model, 3);
        assert_eq!(w.len(), layout.specs.len());
        assert_eq!(w, init_weights(&layout, &cfg.model, 3));
    }
}
