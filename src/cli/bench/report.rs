//! What `packtrain bench` reports: the FLOPs of a step, the summary of the timed steps (one
//! JSON line per model) and the table.

use serde::Serialize;

use super::step::StepTimes;
use crate::config::{Config, ModelConfig};
use crate::model::ParamLayout;
use crate::packing::PackedBatch;

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
    /// The precision of the layers' weight gradients (`train.bf16_grads`).
    pub weight_grads: &'static str,
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
pub(crate) fn median(v: &[f64]) -> f64 {
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

pub(crate) fn mean(v: &[f64]) -> f64 {
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
        weight_grads: times.weight_grads,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
