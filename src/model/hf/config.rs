//! `config.json` of a transformers causal LM: read into a [`ModelConfig`], written back.
//!
//! The mapping: vocab_size → V, hidden_size → C, num_hidden_layers → L, num_attention_heads → H,
//! num_key_value_heads → Hkv (default H), head_dim → D (default C / H), intermediate_size → F,
//! rope_theta, rms_norm_eps, tie_word_embeddings, and q/k/v biases for Qwen2. RoPE settings are
//! read from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`, and
//! written in the older form, which both read. Defaults are transformers' own for the
//! architecture, so a key left out means what it means to transformers.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{ModelConfig, RopeScaling, RopeScalingKind};

use super::{read_json, HfError};

/// The architectures we load and save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

pub(crate) const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

impl Arch {
    /// The `architectures` entry.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// The `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    fn from_name(name: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Mistral, Arch::Qwen2]
            .into_iter()
            .find(|a| a.class_name() == name || a.model_type() == name)
    }

    /// transformers' default `max_position_embeddings`.
    fn default_max_positions(self) -> usize {
        match self {
            Arch::Llama => 2048,
            Arch::Mistral => 4096 * 32,
            Arch::Qwen2 => 32768,
        }
    }

    /// The architecture that saves `cfg` as it is: Qwen2 when it has q/k/v biases, else Llama.
    pub fn for_model(cfg: &ModelConfig) -> Arch {
        if cfg.qkv_bias {
            Arch::Qwen2
        } else {
            Arch::Llama
        }
    }
}

/// What the loader needs to know about the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The longest sequence the model will see (a sliding window at least this long is plain
    /// causal attention and is accepted); `max_position_embeddings` when unset.
    pub max_seq_len: Option<usize>,
}

/// A parsed `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The file read.
    pub path: PathBuf,
    pub arch: Arch,
    /// Our config (init_std from `initializer_range`).
    pub model: ModelConfig,
    pub max_position_embeddings: usize,
    /// `bos_token_id` / `eos_token_id` (the first of a list).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Every field as read, so a save can keep the ones we do not own.
    pub raw: Map<String, Value>,
}

/// Typed, named access to the fields of one JSON object.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
    /// Prefix of key names in messages (`rope_scaling.`).
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn bad(&self, key: &str, message: impl Into<String>) -> HfError {
        HfError::BadField {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
            message: message.into(),
        }
    }

    /// The value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, HfError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        self.bad(key, format!("must be a non-negative integer, found {v}"))
                    })
            })
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize, HfError> {
        self.usize(key)?.ok_or_else(|| self.bad(key, "is missing"))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, HfError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.bad(key, format!("must be a number, found {v}")))
            })
            .transpose()
    }

    fn required_f64(&self, key: &str) -> Result<f64, HfError> {
        self.f64(key)?.ok_or_else(|| self.bad(key, "is missing"))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, HfError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.bad(key, format!("must be true or false, found {v}")))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, HfError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.bad(key, format!("must be a string, found {v}")))
            })
            .transpose()
    }

    /// A token id, or the first of a list of them.
    fn token_id(&self, key: &str) -> Result<Option<u32>, HfError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let first = match v {
            Value::Array(items) => match items.first() {
                None => return Ok(None),
                Some(x) => x,
            },
            x => x,
        };
        first
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                self.bad(
                    key,
                    format!("must be a token id or a list of them, found {v}"),
                )
            })
    }

    fn unsupported(
        &self,
        key: &str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> HfError {
        HfError::UnsupportedOption {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// Read and check `dir/config.json`.
pub fn read_config(dir: &Path, opts: &LoadOptions) -> Result<HfConfig, HfError> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(HfError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
        ));
    }
    let value = read_json(&path)?.ok_or_else(|| HfError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    let Value::Object(raw) = value else {
        return Err(HfError::Json {
            path,
            message: "expected a JSON object".into(),
        });
    };
    parse(&path, raw, opts)
}

/// Parse a config object (`path` is for messages).
pub(crate) fn parse(
    path: &Path,
    raw: Map<String, Value>,
    opts: &LoadOptions,
) -> Result<HfConfig, HfError> {
    let f = Fields {
        path,
        map: &raw,
        prefix: "",
    };

    // ---- architecture
    let name = match f.get("architectures") {
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() > 1 {
                return Err(f.unsupported(
                    "architectures",
                    Value::Array(list.clone()),
                    "a checkpoint of one architecture is needed",
                ));
            }
            list[0]
                .as_str()
                .ok_or_else(|| f.bad("architectures", "must be a list of class names"))?
                .to_string()
        }
        Some(v) if !v.is_array() => {
            return Err(f.bad("architectures", "must be a list of class names"))
        }
        _ => f
            .str("model_type")?
            .ok_or_else(|| f.bad("architectures", "is missing (and so is model_type)"))?
            .to_string(),
    };
    let arch = Arch::from_name(&name).ok_or_else(|| HfError::UnsupportedArchitecture {
        path: path.to_path_buf(),
        found: name.clone(),
        supported: SUPPORTED,
    })?;
    if let Some(mt) = f.str("model_type")? {
        if Arch::from_name(mt) != Some(arch) {
            return Err(HfError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: format!("{name} with model_type {mt:?}"),
                supported: SUPPORTED,
            });
        }
    }

    // ---- options we refuse rather than ignore
    for key in ["hidden_act", "hidden_activation"] {
        if let Some(act) = f.str(key)? {
            if act != "silu" && act != "swish" {
                return Err(f.unsupported(
                    key,
                    format!("{act:?}"),
                    "only SiLU (SwiGLU MLP) is implemented",
                ));
            }
        }
    }
    if let Some(q) = f.get("quantization_config") {
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
        return Err(f.unsupported(
            "quantization_config",
            format!("{{quant_method: {method:?}}}"),
            "quantised checkpoints are not supported; use an unquantised one",
        ));
    }
    if arch == Arch::Llama {
        if f.bool("attention_bias")? == Some(true) {
            return Err(f.unsupported(
                "attention_bias",
                true,
                "Llama with biases on q/k/v/o is not implemented (only Qwen2-style q/k/v biases)",
            ));
        }
        if f.bool("mlp_bias")? == Some(true) {
            return Err(f.unsupported("mlp_bias", true, "MLP biases are not implemented"));
        }
    }

    // ---- sizes
    let vocab_size = f.required_usize("vocab_size")?;
    let d_model = f.required_usize("hidden_size")?;
    let n_layers = f.required_usize("num_hidden_layers")?;
    let n_heads = f.required_usize("num_attention_heads")?;
    let n_kv_heads = f.usize("num_key_value_heads")?.unwrap_or(n_heads);
    let ffn_dim = f.required_usize("intermediate_size")?;
    for (key, v) in [
        ("vocab_size", vocab_size),
        ("hidden_size", d_model),
        ("num_hidden_layers", n_layers),
        ("num_attention_heads", n_heads),
        ("intermediate_size", ffn_dim),
    ] {
        if v == 0 {
            return Err(f.bad(key, "must be > 0"));
        }
    }
    if vocab_size > i32::MAX as usize {
        return Err(f.bad("vocab_size", format!("{vocab_size} does not fit in i32")));
    }
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(f.bad(
            "num_key_value_heads",
            format!("= {n_kv_heads} must be > 0 and divide num_attention_heads = {n_heads}"),
        ));
    }
    let head_dim = match f.usize("head_dim")? {
        Some(d) => d,
        None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
        None => {
            return Err(f.bad(
                "hidden_size",
                format!("= {d_model} is not a multiple of num_attention_heads = {n_heads} and head_dim is unset"),
            ))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(f.bad(
            "head_dim",
            format!("= {head_dim} must be even and > 0 (RoPE rotates pairs)"),
        ));
    }
    let max_position_embeddings = f
        .usize("max_position_embeddings")?
        .unwrap_or(arch.default_max_positions());

    // ---- RoPE
    let (rope_theta, rope_scaling) = parse_rope(&f)?;
    let partial = f.f64("partial_rotary_factor")?;
    if let Some(p) = partial.filter(|&p| p != 1.0) {
        return Err(f.unsupported(
            "partial_rotary_factor",
            p,
            "RoPE on part of each head is not implemented",
        ));
    }

    // ---- sliding windows (Mistral; Qwen2 when use_sliding_window)
    let window = match arch {
        Arch::Llama => None,
        // transformers' MistralConfig defaults to a 4096 window when the key is absent.
        Arch::Mistral => match raw.get("sliding_window") {
            None => Some(4096),
            Some(_) => f.usize("sliding_window")?,
        },
        Arch::Qwen2 => {
            let by_layer = match f.get("layer_types") {
                Some(Value::Array(t)) => t.iter().any(|x| x.as_str() != Some("full_attention")),
                _ => false,
            };
            if f.bool("use_sliding_window")?.unwrap_or(false) || by_layer {
                Some(f.usize("sliding_window")?.unwrap_or(4096))
            } else {
                None
            }
        }
    };
    if let Some(w) = window {
        let (limit, what) = match opts.max_seq_len {
            Some(n) => (n, "the longest sequence of this run"),
            None => (max_position_embeddings, "max_position_embeddings"),
        };
        if w < limit {
            return Err(f.unsupported(
                "sliding_window",
                w,
                format!(
                    "sliding-window attention is not implemented, and {what} = {limit} is longer \
                     than the window (the model is exact only for sequences of at most {w} tokens)"
                ),
            ));
        }
    }

    let d_default = d_model / n_heads;
    let model = ModelConfig {
        vocab_size,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim: if head_dim == d_default && d_model.is_multiple_of(n_heads) {
            0
        } else {
            head_dim
        },
        ffn_dim,
        rope_theta,
        rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
        tie_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        init_std: f
            .f64("initializer_range")?
            .filter(|&x| x > 0.0)
            .unwrap_or(0.02),
        qkv_bias: arch == Arch::Qwen2,
        rope_scaling,
    };
    if !(model.rms_norm_eps.is_finite() && model.rms_norm_eps > 0.0) {
        return Err(f.bad(
            "rms_norm_eps",
            format!("= {} must be > 0", model.rms_norm_eps),
        ));
    }
    Ok(HfConfig {
        path: path.to_path_buf(),
        arch,
        model,
        max_position_embeddings,
        bos_token_id: f.token_id("bos_token_id")?,
        eos_token_id: f.token_id("eos_token_id")?,
        raw: raw.clone(),
    })
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5) or `rope_theta` +
/// `rope_scaling` (earlier).
fn parse_rope(f: &Fields<'_>) -> Result<(f64, Option<RopeScaling>), HfError> {
    let (params, prefix) = match f.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters."),
        Some(v) => return Err(f.bad("rope_parameters", format!("must be an object, found {v}"))),
        None => match f.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling."),
            Some(v) => {
                return Err(f.bad(
                    "rope_scaling",
                    format!("must be an object or null, found {v}"),
                ))
            }
            None => (None, ""),
        },
    };
    let inner = params.map(|map| Fields {
        path: f.path,
        map,
        prefix,
    });
    let theta = match inner
        .as_ref()
        .map(|p| p.f64("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => f.f64("rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(f.bad(
            "rope_theta",
            format!("= {theta} must be a finite number > 1"),
        ));
    }
    let Some(p) = inner else {
        return Ok((theta, None));
    };
    let kind = match p.str("rope_type")? {
        Some(k) => Some(k),
        None => p.str("type")?,
    };
    if let Some(x) = p.f64("partial_rotary_factor")?.filter(|&x| x != 1.0) {
        return Err(p.unsupported(
            "partial_rotary_factor",
            x,
            "RoPE on part of each head is not implemented",
        ));
    }
    match kind.unwrap_or("default") {
        "default" => Ok((theta, None)),
        "llama3" => {
            if let Some(a) = p.f64("attention_factor")?.filter(|&a| a != 1.0) {
                return Err(p.unsupported(
                    "attention_factor",
                    a,
                    "only 1.0 is implemented for llama3 scaling",
                ));
            }
            let r = RopeScaling {
                kind: RopeScalingKind::Llama3,
                factor: p.required_f64("factor")?,
                low_freq_factor: p.required_f64("low_freq_factor")?,
                high_freq_factor: p.required_f64("high_freq_factor")?,
                original_max_position_embeddings: p
                    .required_usize("original_max_position_embeddings")?,
            };
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return Err(p.bad("factor", format!("= {} must be >= 1", r.factor)));
            }
            if !(r.low_freq_factor > 0.0 && r.high_freq_factor > r.low_freq_factor) {
                return Err(p.bad(
                    "high_freq_factor",
                    format!(
                        "= {} must be > low_freq_factor = {} > 0",
                        r.high_freq_factor, r.low_freq_factor
                    ),
                ));
            }
            if r.original_max_position_embeddings == 0 {
                return Err(p.bad("original_max_position_embeddings", "must be > 0"));
            }
            Ok((theta, Some(r)))
        }
        other => Err(HfError::UnsupportedRopeScaling {
            path: f.path.to_path_buf(),
            kind: other.to_string(),
        }),
    }
}

/// The `config.json` object of a model saved as `arch`: `base` (the fields of a loaded config,
/// kept where we do not own them) with every field transformers needs set from `cfg`.
pub(crate) fn to_json(
    cfg: &ModelConfig,
    arch: Arch,
    max_position_embeddings: usize,
    torch_dtype: &str,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    base: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut out = base.cloned().unwrap_or_default();
    // Ours now: drop transformers 5's rope form and version stamps.
    for key in [
        "rope_parameters",
        "transformers_version",
        "dtype",
        "layer_types",
    ] {
        out.remove(key);
    }
    let rope_scaling = match &cfg.rope_scaling {
        None => Value::Null,
        Some(r) => json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }),
    };
    let fields = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": true,
        "torch_dtype": torch_dtype,
    });
    if let Value::Object(m) = fields {
        out.extend(m);
    }
    // Token ids: a base list whose first id is ours (several EOS ids) is kept as it is.
    for (key, id) in [
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
    ] {
        let kept = match out.get(key) {
            Some(Value::Array(list)) => list.first().and_then(Value::as_u64) == id.map(u64::from),
            _ => false,
        };
        if !kept {
            out.insert(key.into(), json!(id));
        }
    }
    match arch {
        Arch::Llama => {
            out.insert("attention_bias".into(), json!(false));
            out.insert("mlp_bias".into(), json!(false));
            out.insert("pretraining_tp".into(), json!(1));
        }
        Arch::Mistral => {
            out.insert("sliding_window".into(), Value::Null);
        }
        Arch::Qwen2 => {
            out.insert("use_sliding_window".into(), json!(false));
            out.insert("sliding_window".into(), Value::Null);
            out.insert("max_window_layers".into(), json!(cfg.n_layers));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
            "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": [2, 3],
        })
    }

    fn parse_value(v: Value, opts: &LoadOptions) -> Result<HfConfig, HfError> {
        let Value::Object(m) = v else { unreachable!() };
        parse(Path::new("m/config.json"), m, opts)
    }

    fn with(mut v: Value, key: &str, x: Value) -> Value {
        v[key] = x;
        v
    }

    fn err(v: Value) -> String {
        parse_value(v, &LoadOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn llama_maps_onto_model_config() {
        let c = parse_value(llama(), &LoadOptions::default()).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        let m = &c.model;
        assert_eq!(
            (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads),
            (64, 32, 2, 4, 2)
        );
        assert_eq!((m.head_dim, m.head_dim(), m.ffn_dim), (0, 8, 48));
        assert_eq!(
            (m.rope_theta, m.rms_norm_eps, m.tie_embeddings, m.qkv_bias),
            (500000.0, 1e-5, true, false)
        );
        assert_eq!(
            (c.bos_token_id, c.eos_token_id, c.max_position_embeddings),
            (Some(1), Some(2), 128)
        );
        // Defaults: no num_key_value_heads means H; an explicit head_dim is kept.
        let mut v = llama();
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        v["head_dim"] = json!(16);
        let m = parse_value(v, &LoadOptions::default()).unwrap().model;
        assert_eq!((m.n_kv_heads, m.head_dim), (4, 16));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_window_can_be_long_enough() {
        let q = with(
            with(llama(), "architectures", json!(["Qwen2ForCausalLM"])),
            "model_type",
            json!("qwen2"),
        );
        let c = parse_value(
            with(q.clone(), "use_sliding_window", json!(false)),
            &LoadOptions::default(),
        )
        .unwrap();
        assert!(c.model.qkv_bias);
        let e = err(with(
            with(q, "use_sliding_window", json!(true)),
            "sliding_window",
            json!(64),
        ));
        assert!(
            e.contains("sliding_window = 64") && e.contains("max_position_embeddings = 128"),
            "{e}"
        );

        let m = with(
            with(llama(), "architectures", json!(["MistralForCausalLM"])),
            "model_type",
            json!("mistral"),
        );
        // Absent means transformers' 4096, longer than max_position_embeddings = 128: fine.
        assert!(
            !parse_value(m.clone(), &LoadOptions::default())
                .unwrap()
                .model
                .qkv_bias
        );
        let e = err(with(m.clone(), "sliding_window", json!(100)));
        assert!(e.contains("unsupported option sliding_window = 100"), "{e}");
        // ...unless the run's sequences fit the window.
        let short = LoadOptions {
            max_seq_len: Some(100),
        };
        parse_value(with(m.clone(), "sliding_window", json!(100)), &short).unwrap();
        parse_value(
            with(m, "sliding_window", Value::Null),
            &LoadOptions::default(),
        )
        .unwrap();
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let e = err(with(llama(), "architectures", json!(["GPT2LMHeadModel"])));
        assert!(
            e.contains("unsupported architecture GPT2LMHeadModel")
                && e.contains("LlamaForCausalLM"),
            "{e}"
        );
        let mut v = llama();
        v.as_object_mut().unwrap().remove("architectures");
        v["model_type"] = json!("gemma");
        assert!(err(v).contains("unsupported architecture gemma"));
    }

    #[test]
    fn llama3_rope_scaling_both_spellings() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let c = parse_value(
            with(llama(), "rope_scaling", scaling.clone()),
            &LoadOptions::default(),
        )
        .unwrap();
        let r = c.model.rope_scaling.clone().unwrap();
        assert_eq!((r.factor, r.original_max_position_embeddings), (8.0, 64));
        // transformers 5: theta inside rope_parameters.
        let mut v5 = llama();
        v5.as_object_mut().unwrap().remove("rope_theta");
        let mut p = scaling.clone();
        p["rope_theta"] = json!(250000.0);
        let c5 = parse_value(with(v5, "rope_parameters", p), &LoadOptions::default()).unwrap();
        assert_eq!(c5.model.rope_theta, 250000.0);
        assert_eq!(c5.model.rope_scaling, Some(r));
        // "type" is the old key; "default" means none.
        let d = parse_value(
            with(llama(), "rope_scaling", json!({"type": "default"})),
            &LoadOptions::default(),
        );
        assert_eq!(d.unwrap().model.rope_scaling, None);
    }

    #[test]
    fn unsupported_rope_scaling_is_named() {
        for kind in ["yarn", "linear", "dynamic", "longrope"] {
            let e = err(with(
                llama(),
                "rope_scaling",
                json!({"type": kind, "factor": 4.0}),
            ));
            assert!(
                e.contains(&format!("unsupported rope_scaling type \"{kind}\"")),
                "{e}"
            );
        }
        let e = err(with(llama(), "partial_rotary_factor", json!(0.5)));
        assert!(e.contains("partial_rotary_factor = 0.5"), "{e}");
    }

    #[test]
    fn refused_options_name_key_and_value() {
        for (key, value, want) in [
            ("attention_bias", json!(true), "attention_bias = true"),
            ("mlp_bias", json!(true), "mlp_bias = true"),
            ("hidden_act", json!("gelu"), "hidden_act = \"gelu\""),
            (
                "quantization_config",
                json!({"quant_method": "gptq"}),
                "quantization_config",
            ),
        ] {
            let e = err(with(llama(), key, value));
            assert!(e.contains(&format!("unsupported option {want}")), "{e}");
        }
    }

    #[test]
    fn bad_fields_name_the_key() {
        for (key, value, want) in [
            (
                "hidden_size",
                json!("big"),
                "`hidden_size` must be a non-negative integer",
            ),
            (
                "num_key_value_heads",
                json!(3),
                "`num_key_value_heads` = 3 must be > 0 and divide",
            ),
            ("head_dim", json!(7), "`head_dim` = 7 must be even"),
            ("vocab_size", Value::Null, "`vocab_size` is missing"),
            (
                "rope_scaling",
                json!("llama3"),
                "`rope_scaling` must be an object",
            ),
        ] {
            let e = err(with(llama(), key, value));
            assert!(e.starts_with("m/config.json: ") && e.contains(want), "{e}");
        }
        let e = err(with(
            llama(),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
        ));
        assert!(
            e.contains("`rope_scaling.low_freq_factor` is missing"),
            "{e}"
        );
    }

    #[test]
    fn written_config_reads_back_the_same_model() {
        let c = parse_value(with(llama(), "rope_scaling", json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
            &LoadOptions::default()).unwrap();
        for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2] {
            let model = ModelConfig {
                qkv_bias: arch == Arch::Qwen2,
                ..c.model.clone()
            };
            let out = to_json(&model, arch, 128, "float32", Some(1), Some(2), Some(&c.raw));
            let back = parse(Path::new("x"), out, &LoadOptions::default()).unwrap();
            assert_eq!(back.arch, arch);
            assert_eq!(
                back.model,
                ModelConfig {
                    init_std: 0.02,
                    ..model
                }
            );
            assert_eq!((back.bos_token_id, back.eos_token_id), (Some(1), Some(2)));
        }
    }
}
