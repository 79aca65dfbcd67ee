//! Weights of a model directory: memory-mapped safetensors (one file or index + shards) in,
//! sharded safetensors out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorInfo, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::model::params::ParamLayout;
use crate::model::weights::{from_hf, to_hf, HostTensor, WeightsError};

use super::config::{to_json, Arch, HfConfig};
use super::{read_json, HfError};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

// ---------------------------------------------------------------- reading

/// One mapped safetensors file and its header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, HfError> {
        let file = File::open(path).map_err(|e| HfError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; the checkpoint must not
        // be rewritten while it is being loaded (as with any reader of the file).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| HfError::io(path, e))?;
        let (header, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::Format {
                path: path.to_path_buf(),
                message: format!("{e:?}"),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header,
            tensors,
        })
    }

    /// The values of tensor `name` (which must be in this shard) as f32.
    fn read(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>, Dtype), WeightsError> {
        let info = &self.tensors[name];
        let (start, end) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section exactly.
        let raw = &self.mmap[self.data_start + start..self.data_start + end];
        let data = decode(raw, info.dtype).ok_or_else(|| WeightsError::Dtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        Ok((info.shape.clone(), data, info.dtype))
    }
}

/// Little-endian F32, BF16 or F16 bytes as f32 (`None` for any other dtype).
fn decode(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => raw
            .par_chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .par_chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// The mapped files of a checkpoint.
struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    where_is: HashMap<String, usize>,
    /// The path to name in messages about the set as a whole (the index, or the single file).
    path: PathBuf,
}

/// The checkpoint files of `dir` and which one holds each tensor.
fn open_weights(dir: &Path) -> Result<Checkpoint, HfError> {
    let index_path = dir.join(INDEX);
    if let Some(index) = read_json(&index_path)? {
        let bad = |message: &str| HfError::BadField {
            path: index_path.clone(),
            key: "weight_map".into(),
            message: message.into(),
        };
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("is missing or not an object"))?;
        let mut shards: Vec<Shard> = Vec::new();
        let mut by_file: HashMap<&str, usize> = HashMap::new();
        let mut where_is = HashMap::new();
        // Shards in file-name order, so errors come out the same each time.
        let sorted: BTreeMap<&String, &Value> = map.iter().collect();
        for (name, file) in sorted {
            let file = file
                .as_str()
                .ok_or_else(|| bad(&format!("{name} must map to a file name")))?;
            let k = match by_file.get(file) {
                Some(&k) => k,
                None => {
                    let path = dir.join(file);
                    if !path.is_file() {
                        return Err(HfError::MissingShard {
                            index: index_path.clone(),
                            shard: file.to_string(),
                        });
                    }
                    shards.push(Shard::open(&path)?);
                    by_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            if !shards[k].tensors.contains_key(name) {
                return Err(HfError::NotInShard {
                    index: index_path.clone(),
                    name: name.clone(),
                    shard: file.to_string(),
                });
            }
            where_is.insert(name.clone(), k);
        }
        return Ok(Checkpoint {
            shards,
            where_is,
            path: index_path,
        });
    }
    let single = dir.join(SINGLE);
    if !single.is_file() {
        let found: Vec<&str> = [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.pt",
            "consolidated.00.pth",
        ]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect();
        let hint = if found.is_empty() {
            String::new()
        } else {
            format!(
                " (found {}: convert the checkpoint to safetensors first)",
                found.join(", ")
            )
        };
        return Err(HfError::NoWeights {
            dir: dir.to_path_buf(),
            hint,
        });
    }
    let shard = Shard::open(&single)?;
    let where_is = shard.tensors.keys().map(|n| (n.clone(), 0)).collect();
    Ok(Checkpoint {
        shards: vec![shard],
        where_is,
        path: single,
    })
}

/// The HF names of a layout's tensors (q/k/v and gate/up split).
fn hf_names(layout: &ParamLayout) -> Vec<String> {
    let mut names = Vec::new();
    for spec in &layout.specs {
        if spec.name.contains("qkv_proj") {
            for p in ["q_proj", "k_proj", "v_proj"] {
                names.push(spec.name.replace("qkv_proj", p));
            }
        } else if spec.name.contains("gate_up_proj") {
            for p in ["gate_proj", "up_proj"] {
                names.push(spec.name.replace("gate_up_proj", p));
            }
        } else {
            names.push(spec.name.clone());
        }
    }
    names
}

/// Load the weights of `dir` for `hf`'s model, in layout order, and the checkpoint's dtype
/// (F32 if any tensor is F32, else BF16 if any is, else F16).
pub(crate) fn load_weights(
    dir: &Path,
    layout: &ParamLayout,
    hf: &HfConfig,
) -> Result<(Vec<Vec<f32>>, SaveDtype), HfError> {
    let Checkpoint {
        shards,
        where_is,
        path: set_path,
    } = open_weights(dir)?;
    let cfg = &hf.model;

    // Every tensor of the checkpoint must be one the model uses (or harmless).
    let wanted: HashSet<String> = hf_names(layout).into_iter().collect();
    let mut extra: Vec<&String> = where_is
        .keys()
        .filter(|n| !wanted.contains(*n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(cfg.tie_embeddings && n.as_str() == "lm_head.weight"))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        let hint = if name.ends_with(".bias") {
            ": biases other than Qwen2's q/k/v are not implemented"
        } else if name.starts_with("model.layers.") {
            ": does num_hidden_layers match the checkpoint?"
        } else {
            ""
        };
        return Err(HfError::UnexpectedTensor {
            path: shards[where_is[*name]].path.clone(),
            name: name.to_string(),
            arch: hf.arch.class_name(),
            hint,
        });
    }

    let dtypes = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let get = |name: &str| {
        let &k = where_is.get(name)?;
        Some(shards[k].read(name).map(|(shape, data, dtype)| {
            dtypes.borrow_mut().insert(dtype);
            (shape, data)
        }))
    };
    let weights = from_hf(layout, cfg, &set_path, &get)?;
    let dtypes = dtypes.into_inner();
    let dtype = if dtypes.contains(&Dtype::F32) {
        SaveDtype::F32
    } else if dtypes.contains(&Dtype::BF16) {
        SaveDtype::BF16
    } else {
        SaveDtype::F16
    };
    Ok((weights, dtype))
}

// ---------------------------------------------------------------- writing

/// The dtype of saved tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    /// transformers' `torch_dtype` name.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::BF16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }

    fn st(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::BF16 => Dtype::BF16,
            SaveDtype::F16 => Dtype::F16,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::BF16 | SaveDtype::F16 => 2,
        }
    }

    /// Little-endian bytes of `x` in this dtype (round to nearest even).
    fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            SaveDtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SaveDtype::BF16 => x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            SaveDtype::F16 => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::BF16),
            "f16" | "fp16" | "float16" => Ok(SaveDtype::F16),
            _ => Err(format!("unknown dtype {s:?}; use f32, bf16 or f16")),
        }
    }
}

/// transformers' default shard size (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// How to save.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    /// Class to save as; `None`: Qwen2 for a model with q/k/v biases, else Llama.
    pub arch: Option<Arch>,
    pub dtype: SaveDtype,
    /// Start a new shard before one would pass this size (a single larger tensor gets its own).
    pub max_shard_bytes: u64,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Copy tokenizer files and `generation_config.json` from here (usually the source model).
    pub tokenizer_dir: Option<PathBuf>,
    /// Fields of a source `config.json` to keep (ours overwrite theirs).
    pub base_config: Option<Map<String, Value>>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            arch: None,
            dtype: SaveDtype::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            max_position_embeddings: 4096,
            bos_token_id: None,
            eos_token_id: None,
            tokenizer_dir: None,
            base_config: None,
        }
    }
}

impl SaveOptions {
    /// Options that keep what a loaded `config.json` said.
    pub fn from_hf(hf: &HfConfig) -> Self {
        Self {
            arch: Some(hf.arch),
            max_position_embeddings: hf.max_position_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_id: hf.eos_token_id,
            base_config: Some(hf.raw.clone()),
            ..Self::default()
        }
    }
}

/// Tokenizer files a model directory may hold, copied as they are.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Save a model (weights in [`ParamLayout`] order) as a transformers directory `dir`, written
/// into a temporary sibling and renamed into place. An existing `dir` is replaced only if it is
/// empty or a model directory (holds `config.json`).
pub fn save_dir(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &[Vec<f32>],
    opts: &SaveOptions,
) -> Result<(), HfError> {
    let fail = |message: String| HfError::Save {
        path: dir.to_path_buf(),
        message,
    };
    let arch = opts.arch.unwrap_or(Arch::for_model(cfg));
    if cfg.qkv_bias && arch != Arch::Qwen2 {
        return Err(fail(format!(
            "{} has no q/k/v biases; save a model with model.qkv_bias as Qwen2ForCausalLM",
            arch.class_name()
        )));
    }
    let layout = ParamLayout::new(cfg);
    if weights.len() != layout.specs.len() {
        return Err(fail(format!(
            "{} weight tensors given, the model has {}",
            weights.len(),
            layout.specs.len()
        )));
    }
    for (spec, w) in layout.specs.iter().zip(weights) {
        if w.len() != spec.numel() {
            return Err(fail(format!(
                "{} has {} values, shape {:?} needs {}",
                spec.name,
                w.len(),
                spec.shape,
                spec.numel()
            )));
        }
    }
    if opts.max_shard_bytes == 0 {
        return Err(fail("max_shard_bytes must be > 0".into()));
    }
    if dir.is_file() {
        return Err(fail("a file is in the way".into()));
    }
    if dir.is_dir() && !dir.join("config.json").is_file() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| HfError::io(dir, e))?
            .next()
            .is_none();
        if !empty {
            return Err(fail(
                "the directory exists and is not a model directory (no config.json); \
                 refusing to replace it"
                    .into(),
            ));
        }
    }

    let mut tensors = to_hf(&layout, cfg, weights);
    if arch == Arch::Qwen2 && !cfg.qkv_bias {
        // Qwen2 always has q/k/v biases: zeros are the same model.
        let d = cfg.head_dim();
        for l in 0..cfg.n_layers {
            for (p, rows) in [
                ("q_proj", cfg.n_heads * d),
                ("k_proj", cfg.n_kv_heads * d),
                ("v_proj", cfg.n_kv_heads * d),
            ] {
                tensors.push(HostTensor {
                    name: format!("model.layers.{l}.self_attn.{p}.bias"),
                    shape: vec![rows],
                    data: vec![0.0; rows],
                });
            }
        }
    }

    let name = dir
        .file_name()
        .ok_or_else(|| fail("the path has no final component".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| HfError::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    let written = write_contents(&tmp, cfg, arch, &tensors, opts);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    // Swap into place: an old directory is moved aside first (rename cannot replace a
    // non-empty directory), then removed.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| HfError::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(HfError::io(dir, e));
    }
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| HfError::io(&old, e))?;
    }
    Ok(())
}

/// Everything of a model directory, into `tmp`.
fn write_contents(
    tmp: &Path,
    cfg: &ModelConfig,
    arch: Arch,
    tensors: &[HostTensor],
    opts: &SaveOptions,
) -> Result<(), HfError> {
    // ---- shards: greedy in layout order
    let size = opts.dtype.size() as u64;
    let mut shards: Vec<Vec<&HostTensor>> = vec![Vec::new()];
    let mut fill = 0u64;
    for t in tensors {
        let bytes = t.data.len() as u64 * size;
        let current = shards.last_mut().expect("one shard");
        if !current.is_empty() && fill + bytes > opts.max_shard_bytes {
            shards.push(vec![t]);
            fill = bytes;
        } else {
            current.push(t);
            fill += bytes;
        }
    }
    let n = shards.len();
    let file_name = |k: usize| {
        if n == 1 {
            SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        }
    };
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let path = tmp.join(file_name(k));
        let bytes: Vec<Vec<u8>> = shard
            .par_iter()
            .map(|t| opts.dtype.encode(&t.data))
            .collect();
        let views = shard
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                total += b.len() as u64;
                weight_map.insert(t.name.clone(), file_name(k));
                TensorView::new(opts.dtype.st(), t.shape.clone(), b)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| WeightsError::Format {
                        path: path.clone(),
                        message: format!("{}: {e:?}", t.name),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
            WeightsError::Format {
                path: path.clone(),
                message: format!("{e:?}"),
            }
        })?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&tmp.join(INDEX), &index)?;
    }

    // ---- config.json
    let config = to_json(
        cfg,
        arch,
        opts.max_position_embeddings,
        opts.dtype.torch_name(),
        opts.bos_token_id,
        opts.eos_token_id,
        opts.base_config.as_ref(),
    );
    write_json(&tmp.join("config.json"), &Value::Object(config))?;

    // ---- tokenizer files and generation config
    if let Some(src) = &opts.tokenizer_dir {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(|e| HfError::io(&from, e))?;
            }
        }
    }
    let generation = tmp.join("generation_config.json");
    if !generation.exists() && (opts.bos_token_id.is_some() || opts.eos_token_id.is_some()) {
        let g = json!({
            "_from_model_config": true,
            "bos_token_id": opts.bos_token_id,
            "eos_token_id": opts.eos_token_id,
        });
        write_json(&generation, &g)?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<(), HfError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| HfError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| HfError::io(path, e))
}
