//! Hugging Face interop: a transformers model directory in, one out.
//!
//! Loading, in order (one file per stage):
//! 1. `config`: `config.json` of a `LlamaForCausalLM`, `MistralForCausalLM` or
//!    `Qwen2ForCausalLM` becomes a [`ModelConfig`]; any option we do not implement (another
//!    rope scaling, a sliding window shorter than the longest sequence, attention or MLP
//!    biases in Llama, an activation other than SiLU, quantisation...) is an error naming the
//!    key and value, never a silently different model.
//! 2. `tensors`: `model.safetensors`, or the shards named by `model.safetensors.index.json`,
//!    memory-mapped; F32, BF16 and F16 tensors become f32, and `weights::from_hf` joins q/k/v
//!    and gate/up into our fused layout, checking every name and shape. A tensor we would not
//!    use (an `o_proj.bias`, say) is an error too.
//! 3. `specials`: BOS/EOS ids and whether the tokenizer adds them, from `tokenizer_config.json`,
//!    `generation_config.json`, `config.json` and `tokenizer.json`.
//!
//! Saving ([`save_dir`]) writes `config.json` (architectures, model_type, torch_dtype and every
//! field transformers reads), `generation_config.json`, the weights in F32, BF16 or F16
//! (sharded above `max_shard_bytes`, with the index) and copies of the tokenizer files, into a
//! temporary directory beside the target that is then renamed into place.

mod config;
mod specials;
mod tensors;

pub use config::{read_config, Arch, HfConfig, LoadOptions};
pub use specials::{read_specials, HfSpecials};
pub use tensors::{save_dir, SaveDtype, SaveOptions, DEFAULT_MAX_SHARD_BYTES};

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;

use super::params::ParamLayout;
use super::weights::WeightsError;

/// A failure to read or write a Hugging Face model directory; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} has no config.json: not a Hugging Face model directory")]
    NoConfig { dir: PathBuf },
    #[error("{path}: malformed JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: `{key}` {message}")]
    BadField {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: unsupported architecture {found}; supported: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error(
        "{path}: unsupported rope_scaling type {kind:?}; supported: none, \"default\", \"llama3\""
    )]
    UnsupportedRopeScaling { path: PathBuf, kind: String },
    #[error("{path}: unsupported option {key} = {value}: {why}")]
    UnsupportedOption {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
    #[error("{dir}: no weights: expected model.safetensors or model.safetensors.index.json{hint}")]
    NoWeights { dir: PathBuf, hint: String },
    #[error("{index}: shard {shard} is missing")]
    MissingShard { index: PathBuf, shard: String },
    #[error("{index}: names {name} in shard {shard}, which does not hold it")]
    NotInShard {
        index: PathBuf,
        name: String,
        shard: String,
    },
    #[error("{path}: tensor {name} is not part of a {arch} model with this config{hint}")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        arch: &'static str,
        hint: &'static str,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("cannot save {path}: {message}")]
    Save { path: PathBuf, message: String },
}

impl HfError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        HfError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Read a JSON file into a value; a missing file is `Ok(None)`.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>, HfError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HfError::io(path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| HfError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A loaded model directory.
#[derive(Debug, Clone)]
pub struct HfModel {
    /// Where it was read from.
    pub dir: PathBuf,
    /// The parsed `config.json`.
    pub hf: HfConfig,
    /// Host weights in [`ParamLayout`] order.
    pub weights: Vec<Vec<f32>>,
    /// The dtype of the checkpoint's tensors (the widest one when mixed).
    pub dtype: SaveDtype,
}

impl HfModel {
    /// Our model config.
    pub fn config(&self) -> &ModelConfig {
        &self.hf.model
    }

    /// Options that save this model back as it came (architecture, dtype, extra config fields,
    /// tokenizer files copied from its directory).
    pub fn save_options(&self) -> SaveOptions {
        SaveOptions {
            dtype: self.dtype,
            tokenizer_dir: Some(self.dir.clone()),
            ..SaveOptions::from_hf(&self.hf)
        }
    }
}

/// Load a model directory: `config.json`, then the weights (memory-mapped).
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<HfModel, HfError> {
    let hf = read_config(dir, opts)?;
    let layout = ParamLayout::new(&hf.model);
    let (weights, dtype) = tensors::load_weights(dir, &layout, &hf)?;
    Ok(HfModel {
        dir: dir.to_path_buf(),
        hf,
        weights,
        dtype,
    })
}
