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

pub mod attention;
mod report;
mod step;

pub use report::{render, step_flops, summarise, BenchResult, FLOPS_FORMULA};
pub use step::{init_weights, make_batches, run_steps, BatchRecord, BatchesFile, StepTimes};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::backend::cuda::CudaBackend;
use crate::config::Config;
use crate::packing::PackedBatch;

/// H100 SXM dense bf16 tensor-core peak, FLOP/s.
pub const H100_PEAK_FLOPS: f64 = 989e12;

const LLAMA_160M: &str = include_str!("../../../configs/llama-160m.toml");
const TINYLLAMA_1_1B: &str = include_str!("../../../configs/tinyllama-1.1b.toml");

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
        step::write_batches(path, &file)?;
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
    use crate::model::ParamLayout;

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
    fn per_model_paths() {
        assert_eq!(
            per_model(Path::new("out/b.json"), "llama-160m"),
            PathBuf::from("out/b-llama-160m.json")
        );
        assert_eq!(per_model(Path::new("b"), "x"), PathBuf::from("b-x"));
    }
}
