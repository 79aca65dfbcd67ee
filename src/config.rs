//! Every knob of a run: one TOML file, defaults for everything, validated once.
//!
//! Sections mirror the step of DESIGN.md: `[model]`, `[data]` (and `[data.synthetic]`),
//! `[packing]`, `[train]`, `[dist]`. Unknown keys are errors (`deny_unknown_fields`), so a
//! typo never silently falls back to a default. [`Config::validate`] names the key, the bad
//! value and what is allowed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A config error: which file, which key, what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

fn invalid(
    key: &'static str,
    value: impl std::fmt::Display,
    allowed: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when a usable GPU and its libraries are present, else the CPU (with a warning).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name; the default output directory is `runs/<name>`.
    pub name: String,
    /// Seed for weight init, the synthetic corpus and the plan's shuffles.
    pub seed: u64,
    /// `auto` | `cpu` | `cuda`.
    pub device: DeviceKind,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub packing: PackingConfig,
    pub train: TrainConfig,
    pub dist: DistConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "tiny-cpu".into(),
            seed: 1234,
            device: DeviceKind::Auto,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            packing: PackingConfig::default(),
            train: TrainConfig::default(),
            dist: DistConfig::default(),
        }
    }
}

/// The Llama architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size V (embedding rows). Every token id must be < V.
    pub vocab_size: usize,
    /// Model width C.
    pub d_model: usize,
    pub n_layers: usize,
    /// Query heads H; head dim D = d_model / n_heads unless `head_dim` is set.
    pub n_heads: usize,
    /// Key/value heads Hkv (grouped-query attention); must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Head dim D; 0 means d_model / n_heads.
    pub head_dim: usize,
    /// SwiGLU hidden width F.
    pub ffn_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Std of the normal init of matrices (residual projections are scaled by 1/sqrt(2 L)).
    pub init_std: f64,
    /// Biases on the q, k, v projections (Qwen2).
    pub qkv_bias: bool,
    /// RoPE frequency scaling (`[model.rope_scaling]`, Llama 3.1's `llama3` scheme); none if unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// Which RoPE scaling scheme (only Llama 3.1's; transformers' others are refused on load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingKind {
    /// Long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3,
}

/// `[model.rope_scaling]`: transformers' `rope_scaling` of type `llama3`. With wavelength
/// w = 2 pi / f of each base frequency f = theta^(-2j/D), L = `original_max_position_embeddings`:
/// f is kept when w < L / `high_freq_factor`, divided by `factor` when w > L / `low_freq_factor`,
/// and in between blended as (1 - s) f / factor + s f with s = (L / w - low) / (high - low).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// `llama3`.
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    /// Divisor of the low frequencies (>= 1).
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    /// Context length of the pre-scaling model (tokens).
    pub original_max_position_embeddings: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 512,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 0,
            ffn_dim: 384,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
            qkv_bias: false,
            rope_scaling: None,
        }
    }
}

impl ModelConfig {
    /// Head dim D.
    pub fn head_dim(&self) -> usize {
        if self.head_dim == 0 {
            self.d_model / self.n_heads.max(1)
        } else {
            self.head_dim
        }
    }
}

/// What the data files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// The built-in corpus of `[data.synthetic]`; no file.
    Synthetic,
    /// JSONL, one `{"text": ...}` per line, tokenised with `data.tokenizer`.
    Text,
    /// JSONL `{"prompt": ..., "completion": ...}`; prompt tokens are excluded from the loss.
    PromptCompletion,
    /// JSONL `{"input_ids": [...], "labels": [...]?}`; labels of -100 are excluded from the loss.
    Tokens,
    /// JSONL `{"messages": [{"role": ..., "content": ...}, ...]}` rendered by `data.chat_template`;
    /// only assistant turns (content and end marker) are in the loss.
    Chat,
}

/// What to do with a document longer than `data.max_doc_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongDocuments {
    /// Cut into pieces of at most `max_doc_tokens`, each trained as its own document.
    Split,
    /// Keep the first `max_doc_tokens` tokens.
    Truncate,
    /// Leave the document out.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub format: DataFormat,
    /// JSONL files (every format but `synthetic`).
    pub paths: Vec<PathBuf>,
    /// `tokenizer.json` (formats `text` and `prompt-completion`).
    pub tokenizer: Option<PathBuf>,
    /// Per-document token limit; longer documents follow `long_documents`.
    pub max_doc_tokens: usize,
    pub long_documents: LongDocuments,
    /// Prepend this token id to every tokenised document (text formats); none if unset.
    pub bos_token_id: Option<u32>,
    /// Append this token id to every tokenised document (text formats but `chat`); none if unset.
    pub eos_token_id: Option<u32>,
    /// How `chat` conversations become text (see `data::chat`), e.g.
    /// `"{@user}<|user|>\n{content}\n{@assistant}<|assistant|>\n{content}<|end|>\n"`.
    pub chat_template: Option<String>,
    /// Where the tokenised corpus is cached (memory-mapped, keyed by a hash of inputs and settings).
    pub cache_dir: PathBuf,
    pub synthetic: SyntheticConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: DataFormat::Synthetic,
            paths: Vec::new(),
            tokenizer: None,
            max_doc_tokens: 4096,
            long_documents: LongDocuments::Split,
            bos_token_id: None,
            eos_token_id: None,
            chat_template: None,
            cache_dir: PathBuf::from(".packtrain-cache"),
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// Shape of the document-length distribution of the synthetic corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LengthDistribution {
    /// exp(N(ln median, sigma)), clipped to [min_len, max_len].
    LogNormal,
    /// Uniform on [min_len, max_len].
    Uniform,
    /// Every document `median` tokens long.
    Fixed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub num_docs: usize,
    pub lengths: LengthDistribution,
    /// Median document length in tokens.
    pub median_len: f64,
    /// Log-space standard deviation (log-normal only).
    pub sigma: f64,
    pub min_len: usize,
    pub max_len: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            num_docs: 4000,
            lengths: LengthDistribution::LogNormal,
            median_len: 400.0,
            sigma: 0.9,
            min_len: 16,
            max_len: 4096,
        }
    }
}

/// Documents that cannot fill a last whole step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leftovers {
    /// Trained first in the next epoch.
    Carry,
    /// Not trained this epoch (counted).
    Drop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackingConfig {
    /// Per-rank token budget B of one micro-batch.
    pub tokens_per_micro_batch: usize,
    /// Micro-steps G per optimizer step (gradient accumulation).
    pub micro_steps: usize,
    pub leftovers: Leftovers,
}

impl Default for PackingConfig {
    fn default() -> Self {
        Self {
            tokens_per_micro_batch: 16384,
            micro_steps: 1,
            leftovers: Leftovers::Carry,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the corpus.
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run every step of every epoch).
    pub max_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Floor of the decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Apply weight decay to norm weights and embeddings too (off by default).
    pub decay_norms_and_embeddings: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    pub recompute: bool,
    /// Keep the layers' weight gradients in bf16, as the bf16 GEMMs produce them, when a step
    /// has one micro-step and the backend computes in bf16 (CUDA): half the bytes for the
    /// gradient norm, AdamW and the ranks' sum. Off, or with gradient accumulation, they are
    /// f32.
    pub bf16_grads: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: 0,
            lr: 3e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            decay_norms_and_embeddings: false,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            checkpoint_every: 0,
            recompute: false,
            bf16_grads: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// A rank that waits longer than this on a collective or the rendezvous gives up with an error.
    pub timeout_s: u64,
    /// Gradient all-reduce bucket size in MiB.
    pub bucket_mb: usize,
    /// Shard the optimizer state across ranks (ZeRO stage 1).
    pub zero1: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            timeout_s: 300,
            bucket_mb: 32,
            zero1: false,
        }
    }
}

impl Config {
    /// Read, parse and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // Relative data paths are relative to the config file, so a config runs from anywhere.
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Parse and validate TOML text (paths left as written).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative()
                && !dir.as_os_str().is_empty()
                && !p.exists()
                && dir.join(&*p).exists()
            {
                *p = dir.join(&*p);
            }
        };
        self.data.paths.iter_mut().for_each(fix);
        if let Some(t) = self.data.tokenizer.as_mut() {
            fix(t);
        }
    }

    /// The resolved config as TOML (written next to every run).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# could not serialise config: {e}\n"))
    }

    /// Check every value; the error names the key, the value and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        if m.vocab_size < 4 {
            return Err(invalid("model.vocab_size", m.vocab_size, "must be >= 4"));
        }
        if m.vocab_size > i32::MAX as usize {
            return Err(invalid("model.vocab_size", m.vocab_size, "must fit in i32"));
        }
        if m.d_model == 0 {
            return Err(invalid("model.d_model", 0, "must be > 0"));
        }
        if m.n_layers == 0 {
            return Err(invalid("model.n_layers", 0, "must be > 0"));
        }
        if m.n_heads == 0 {
            return Err(invalid("model.n_heads", 0, "must be > 0"));
        }
        if m.n_kv_heads == 0 || !m.n_heads.is_multiple_of(m.n_kv_heads) {
            return Err(invalid(
                "model.n_kv_heads",
                m.n_kv_heads,
                format!("must be > 0 and divide model.n_heads = {}", m.n_heads),
            ));
        }
        if m.head_dim == 0 && !m.d_model.is_multiple_of(m.n_heads) {
            return Err(invalid(
                "model.d_model",
                m.d_model,
                format!(
                    "must be a multiple of model.n_heads = {} (or set model.head_dim)",
                    m.n_heads
                ),
            ));
        }
        if !m.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "model.head_dim",
                m.head_dim(),
                "must be even (RoPE rotates pairs)",
            ));
        }
        if m.ffn_dim == 0 {
            return Err(invalid("model.ffn_dim", 0, "must be > 0"));
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 1.0) {
            return Err(invalid(
                "model.rope_theta",
                m.rope_theta,
                "must be a finite number > 1",
            ));
        }
        if !(m.rms_norm_eps.is_finite() && m.rms_norm_eps > 0.0) {
            return Err(invalid("model.rms_norm_eps", m.rms_norm_eps, "must be > 0"));
        }
        if !(m.init_std.is_finite() && m.init_std > 0.0) {
            return Err(invalid("model.init_std", m.init_std, "must be > 0"));
        }
        if let Some(r) = &m.rope_scaling {
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return Err(invalid(
                    "model.rope_scaling.factor",
                    r.factor,
                    "must be a finite number >= 1",
                ));
            }
            if !(r.low_freq_factor.is_finite() && r.low_freq_factor > 0.0) {
                return Err(invalid(
                    "model.rope_scaling.low_freq_factor",
                    r.low_freq_factor,
                    "must be > 0",
                ));
            }
            if !(r.high_freq_factor.is_finite() && r.high_freq_factor > r.low_freq_factor) {
                return Err(invalid(
                    "model.rope_scaling.high_freq_factor",
                    r.high_freq_factor,
                    format!(
                        "must be > model.rope_scaling.low_freq_factor = {}",
                        r.low_freq_factor
                    ),
                ));
            }
            if r.original_max_position_embeddings == 0 {
                return Err(invalid(
                    "model.rope_scaling.original_max_position_embeddings",
                    0,
                    "must be > 0",
                ));
            }
        }

        let d = &self.data;
        if d.max_doc_tokens < 2 {
            return Err(invalid(
                "data.max_doc_tokens",
                d.max_doc_tokens,
                "must be >= 2 (a document needs a token and its target)",
            ));
        }
        match d.format {
            DataFormat::Synthetic => {}
            _ if d.paths.is_empty() => {
                return Err(invalid(
                    "data.paths",
                    "[]",
                    format!(
                        "needs at least one JSONL file for data.format = {:?}",
                        d.format
                    ),
                ))
            }
            DataFormat::Text | DataFormat::PromptCompletion | DataFormat::Chat
                if d.tokenizer.is_none() =>
            {
                return Err(invalid(
                    "data.tokenizer",
                    "(unset)",
                    "needs a tokenizer.json path for text formats",
                ))
            }
            DataFormat::Chat => match &d.chat_template {
                None => {
                    return Err(invalid(
                        "data.chat_template",
                        "(unset)",
                        "data.format = chat needs a template, e.g. \
                         \"{@user}<|user|>\\n{content}\\n{@assistant}<|assistant|>\\n{content}<|end|>\\n\"",
                    ))
                }
                Some(t) => {
                    if let Err(e) = crate::data::chat::ChatTemplate::parse(t) {
                        return Err(invalid("data.chat_template", format!("{t:?}"), e.to_string()));
                    }
                }
            },
            _ => {}
        }
        for (key, id) in [
            ("data.bos_token_id", d.bos_token_id),
            ("data.eos_token_id", d.eos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= m.vocab_size {
                    return Err(invalid(
                        key,
                        id,
                        format!("must be < model.vocab_size = {}", m.vocab_size),
                    ));
                }
            }
        }
        let s = &d.synthetic;
        if d.format == DataFormat::Synthetic {
            if s.num_docs == 0 {
                return Err(invalid("data.synthetic.num_docs", 0, "must be > 0"));
            }
            if s.min_len < 2 {
                return Err(invalid("data.synthetic.min_len", s.min_len, "must be >= 2"));
            }
            if s.max_len < s.min_len {
                return Err(invalid(
                    "data.synthetic.max_len",
                    s.max_len,
                    format!("must be >= data.synthetic.min_len = {}", s.min_len),
                ));
            }
            if !(s.median_len.is_finite() && s.median_len >= 1.0) {
                return Err(invalid(
                    "data.synthetic.median_len",
                    s.median_len,
                    "must be >= 1",
                ));
            }
            if !(s.sigma.is_finite() && s.sigma >= 0.0) {
                return Err(invalid("data.synthetic.sigma", s.sigma, "must be >= 0"));
            }
            if m.vocab_size < 16 {
                return Err(invalid(
                    "model.vocab_size",
                    m.vocab_size,
                    "the synthetic corpus needs a vocabulary of at least 16",
                ));
            }
        }

        let p = &self.packing;
        if p.tokens_per_micro_batch < d.max_doc_tokens {
            return Err(invalid(
                "packing.tokens_per_micro_batch",
                p.tokens_per_micro_batch,
                format!(
                    "must be >= the longest document budget data.max_doc_tokens = {}",
                    d.max_doc_tokens
                ),
            ));
        }
        if p.tokens_per_micro_batch > i32::MAX as usize {
            return Err(invalid(
                "packing.tokens_per_micro_batch",
                p.tokens_per_micro_batch,
                "must fit in i32",
            ));
        }
        if p.micro_steps == 0 {
            return Err(invalid("packing.micro_steps", 0, "must be >= 1"));
        }

        let t = &self.train;
        if t.epochs == 0 {
            return Err(invalid("train.epochs", 0, "must be >= 1"));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(invalid("train.lr", t.lr, "must be a finite number > 0"));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(invalid(
                "train.min_lr_ratio",
                t.min_lr_ratio,
                "must be in [0, 1]",
            ));
        }
        if !(0.0..1.0).contains(&t.beta1) {
            return Err(invalid("train.beta1", t.beta1, "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&t.beta2) {
            return Err(invalid("train.beta2", t.beta2, "must be in [0, 1)"));
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(invalid("train.eps", t.eps, "must be > 0"));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(invalid(
                "train.weight_decay",
                t.weight_decay,
                "must be >= 0",
            ));
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return Err(invalid(
                "train.grad_clip",
                t.grad_clip,
                "must be >= 0 (0 turns clipping off)",
            ));
        }

        let ds = &self.dist;
        if ds.timeout_s == 0 {
            return Err(invalid("dist.timeout_s", 0, "must be >= 1"));
        }
        if ds.bucket_mb == 0 {
            return Err(invalid("dist.bucket_mb", 0, "must be >= 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn default_round_trips_through_toml() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = err("[train]\nlearning_rate = 0.1\n");
        assert!(e.contains("learning_rate"), "{e}");
        let e = err("colour = 'red'\n");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let e = err("[packing]\ntokens_per_micro_batch = 'many'\n");
        assert!(e.contains("tokens_per_micro_batch"), "{e}");
    }

    #[test]
    fn micro_batch_smaller_than_document_budget() {
        let e = err("[packing]\ntokens_per_micro_batch = 0\n");
        assert_eq!(
            e,
            "packing.tokens_per_micro_batch = 0: must be >= the longest document budget data.max_doc_tokens = 4096"
        );
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let e = err("[model]\nn_heads = 4\nn_kv_heads = 3\n");
        assert!(e.starts_with("model.n_kv_heads = 3:"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[model]\nd_model = 0\n", "model.d_model"),
            ("[model]\nn_layers = 0\n", "model.n_layers"),
            ("[model]\nd_model = 130\nn_heads = 4\n", "model.d_model"),
            ("[model]\nrope_theta = -1.0\n", "model.rope_theta"),
            ("[data]\nmax_doc_tokens = 1\n", "data.max_doc_tokens"),
            ("[data]\nformat = 'text'\n", "data.paths"),
            (
                "[data]\nformat = 'text'\npaths = ['a.jsonl']\n",
                "data.tokenizer",
            ),
            ("[data]\nbos_token_id = 100000\n", "data.bos_token_id"),
            (
                "[data.synthetic]\nnum_docs = 0\n",
                "data.synthetic.num_docs",
            ),
            (
                "[data.synthetic]\nmin_len = 100\nmax_len = 10\n",
                "data.synthetic.max_len",
            ),
            ("[packing]\nmicro_steps = 0\n", "packing.micro_steps"),
            ("[train]\nlr = 0.0\n", "train.lr"),
            ("[train]\nbeta2 = 1.0\n", "train.beta2"),
            ("[train]\nmin_lr_ratio = 2.0\n", "train.min_lr_ratio"),
            ("[train]\nepochs = 0\n", "train.epochs"),
            ("[dist]\ntimeout_s = 0\n", "dist.timeout_s"),
        ] {
            let e = err(text);
            assert!(e.starts_with(&format!("{key} = ")), "{text:?} gave {e}");
        }
    }

    #[test]
    fn rope_scaling_parses_round_trips_and_is_validated() {
        let text = "[model.rope_scaling]\ntype = 'llama3'\nfactor = 8.0\nlow_freq_factor = 1.0\n\
                    high_freq_factor = 4.0\noriginal_max_position_embeddings = 8192\n";
        let c = Config::parse(text).unwrap();
        let r = c.model.rope_scaling.clone().unwrap();
        assert_eq!(
            (r.kind, r.factor, r.original_max_position_embeddings),
            (RopeScalingKind::Llama3, 8.0, 8192)
        );
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
        assert!(!Config::default().to_toml().contains("rope_scaling"));
        for (bad, key) in [
            ("factor = 8.0", "factor = 0.5"),
            ("high_freq_factor = 4.0", "high_freq_factor = 1.0"),
            (
                "original_max_position_embeddings = 8192",
                "original_max_position_embeddings = 0",
            ),
        ] {
            let e = err(&text.replace(bad, key));
            let name = key.split(' ').next().unwrap();
            assert!(
                e.starts_with(&format!("model.rope_scaling.{name} = ")),
                "{e}"
            );
        }
        let e = err(&text.replace("'llama3'", "'yarn'"));
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
    }

    #[test]
    fn chat_format_needs_a_valid_template() {
        let base = "[data]\nformat = 'chat'\npaths = ['c.jsonl']\ntokenizer = 'tokenizer.json'\n";
        let e = err(base);
        assert!(e.starts_with("data.chat_template = (unset):"), "{e}");
        let e = err(&format!("{base}chat_template = '{{@user}}{{content}}'\n"));
        assert!(
            e.starts_with("data.chat_template = ") && e.contains("assistant"),
            "{e}"
        );
        let ok = format!(
            "{base}chat_template = '{{@user}}U: {{content}}\\n{{@assistant}}A: {{content}}</s>'\n"
        );
        let c = Config::parse(&ok).unwrap();
        assert_eq!(c.data.format, DataFormat::Chat);
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn bad_enum_value_lists_the_choices() {
        let e = err("[data]\nlong_documents = 'fold'\n");
        assert!(
            e.contains("split") && e.contains("truncate") && e.contains("drop"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }
}
