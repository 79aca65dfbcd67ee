//! Weights in safetensors under Hugging Face names: the fused `qkv_proj` and `gate_up_proj`
//! are split into `q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` on save and joined on
//! load, so a checkpoint's tensors are those transformers' `LlamaForCausalLM` expects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::config::ModelConfig;

use super::params::ParamLayout;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor {name} is missing")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, the model needs {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name} has dtype {dtype}; supported: F32, BF16, F16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
}

/// A named host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A named tensor whose values are borrowed: what [`save_safetensors_refs`] writes, so a
/// checkpoint goes to disk without copying 13 GB of host memory first (TinyLlama's weights
/// and moments).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl HostTensor {
    pub fn borrowed(&self) -> TensorRef<'_> {
        TensorRef {
            name: self.name.clone(),
            shape: self.shape.clone(),
            data: &self.data,
        }
    }
}

fn split_rows<'a, 'p>(
    pieces: &'p [(String, usize)],
    cols: usize,
    data: &'a [f32],
) -> impl Iterator<Item = TensorRef<'a>> + use<'a, 'p> {
    let mut row = 0;
    pieces.iter().map(move |(piece, rows)| {
        let t = TensorRef {
            name: piece.clone(),
            shape: if cols == 1 {
                vec![*rows]
            } else {
                vec![*rows, cols]
            },
            data: &data[row * cols..(row + rows) * cols],
        };
        row += rows;
        t
    })
}

/// The pieces a fused tensor splits into: (HF name suffix, rows).
fn pieces(cfg: &ModelConfig, fused_name: &str) -> Option<Vec<(String, usize)>> {
    let d = cfg.head_dim();
    let (h, hkv, f) = (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim);
    let (prefix, kind) = fused_name.rsplit_once('.')?; // kind: weight | bias
    if let Some(p) = prefix.strip_suffix("qkv_proj") {
        return Some(vec![
            (format!("{p}q_proj.{kind}"), h * d),
            (format!("{p}k_proj.{kind}"), hkv * d),
            (format!("{p}v_proj.{kind}"), hkv * d),
        ]);
    }
    if let Some(p) = prefix.strip_suffix("gate_up_proj") {
        return Some(vec![
            (format!("{p}gate_proj.{kind}"), f),
            (format!("{p}up_proj.{kind}"), f),
        ]);
    }
    None
}

/// Our tensors (layout order) as HF-named tensors.
pub fn to_hf(layout: &ParamLayout, cfg: &ModelConfig, weights: &[Vec<f32>]) -> Vec<HostTensor> {
    to_hf_refs(layout, cfg, weights)
        .into_iter()
        .map(|t| HostTensor {
            name: t.name,
            shape: t.shape,
            data: t.data.to_vec(),
        })
        .collect()
}

/// [`to_hf`] without copies: a fused tensor's HF pieces are row ranges of it.
pub fn to_hf_refs<'a>(
    layout: &ParamLayout,
    cfg: &ModelConfig,
    weights: &'a [Vec<f32>],
) -> Vec<TensorRef<'a>> {
    let mut out = Vec::new();
    for (spec, data) in layout.specs.iter().zip(weights) {
        match pieces(cfg, &spec.name) {
            Some(ps) => {
                let cols = if spec.shape.len() == 2 {
                    spec.shape[1]
                } else {
                    1
                };
                out.extend(split_rows(&ps, cols, data));
            }
            None => out.push(TensorRef {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                data,
            }),
        }
    }
    out
}

/// A tensor by HF name: `None` when absent, else its (shape, values) or the read error.
pub type TensorLookup<'a> =
    dyn Fn(&str) -> Option<Result<(Vec<usize>, Vec<f32>), WeightsError>> + 'a;

/// Our tensors (layout order) from HF-named ones; `get(name)` gives (shape, values).
pub fn from_hf(
    layout: &ParamLayout,
    cfg: &ModelConfig,
    path: &Path,
    get: &TensorLookup<'_>,
) -> Result<Vec<Vec<f32>>, WeightsError> {
    let fetch = |name: &str, expected: Vec<usize>| -> Result<Vec<f32>, WeightsError> {
        let (shape, data) = get(name).ok_or_else(|| WeightsError::Missing {
            path: path.to_path_buf(),
            name: name.to_string(),
        })??;
        if shape != expected {
            return Err(WeightsError::Shape {
                path: path.to_path_buf(),
                name: name.to_string(),
                found: shape,
                expected,
            });
        }
        Ok(data)
    };
    layout
        .specs
        .iter()
        .map(|spec| match pieces(cfg, &spec.name) {
            Some(ps) => {
                let mut data = Vec::with_capacity(spec.numel());
                for (name, rows) in ps {
                    let shape = if spec.shape.len() == 2 {
                        vec![rows, spec.shape[1]]
                    } else {
                        vec![rows]
                    };
                    data.extend(fetch(&name, shape)?);
                }
                Ok(data)
            }
            None => fetch(&spec.name, spec.shape.clone()),
        })
        .collect()
}

/// Write tensors as one f32 safetensors file, atomically (temporary name, then rename). The
/// tensors' memory goes to the file as it is (little-endian hosts), with no whole-file buffer:
/// a TinyLlama checkpoint is 13 GB, which the copies into one byte vector and then one
/// serialized buffer had tripled in memory.
pub fn save_safetensors(path: &Path, tensors: &[HostTensor]) -> Result<(), WeightsError> {
    let refs: Vec<TensorRef<'_>> = tensors.iter().map(HostTensor::borrowed).collect();
    save_safetensors_refs(path, &refs)
}

/// [`save_safetensors`] of borrowed tensors.
pub fn save_safetensors_refs(path: &Path, tensors: &[TensorRef<'_>]) -> Result<(), WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes: Vec<std::borrow::Cow<'_, [u8]>> = tensors.iter().map(|t| le_bytes(t.data)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| WeightsError::Format {
                    path: path.to_path_buf(),
                    message: format!("{}: {e}", t.name),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| WeightsError::Format {
        path: tmp.clone(),
        message: format!("writing: {e}"),
    })?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The little-endian bytes of `x`: its own memory on a little-endian host, else a converted
/// copy.
fn le_bytes(x: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: the slice covers exactly x's memory (f32 has no padding), u8 has no validity
        // or alignment requirement, and it borrows x, so it cannot outlive it.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x))
        })
    }
    #[cfg(not(target_endian = "little"))]
    std::borrow::Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Read every tensor of a safetensors file (F32, BF16 or F16) as f32.
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightsError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(
            name.clone(),
            HostTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Save a model's weights (layout order) under HF names.
pub fn save_model(
    path: &Path,
    layout: &ParamLayout,
    cfg: &ModelConfig,
    weights: &[Vec<f32>],
) -> Result<(), WeightsError> {
    save_safetensors_refs(path, &to_hf_refs(layout, cfg, weights))
}

/// Load a model's weights (layout order) from HF-named safetensors.
pub fn load_model(
    path: &Path,
    layout: &ParamLayout,
    cfg: &ModelConfig,
) -> Result<Vec<Vec<f32>>, WeightsError> {
    let tensors = load_safetensors(path)?;
    from_hf(layout, cfg, path, &|name| {
        tensors
            .get(name)
            .map(|t| Ok((t.shape.clone(), t.data.clone())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_exactly() {
        let cfg = ModelConfig {
            qkv_bias: true,
            tie_embeddings: false,
            ..ModelConfig::default()
        };
        let layout = ParamLayout::new(&cfg);
        let w = layout.init(&cfg, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_model(&path, &layout, &cfg, &w).unwrap();
        let names: Vec<String> = load_safetensors(&path).unwrap().into_keys().collect();
        assert!(names.contains(&"model.layers.0.self_attn.k_proj.weight".to_string()));
        assert!(names.contains(&"model.layers.3.mlp.up_proj.weight".to_string()));
        assert!(names.contains(&"model.layers.1.self_attn.v_proj.bias".to_string()));
        assert!(names.contains(&"lm_head.weight".to_string()));
        assert_eq!(load_model(&path, &layout, &cfg).unwrap(), w);
    }

    /// The borrowed HF tensors are the owned ones, and a fused tensor's pieces are row ranges
    /// of its own memory (nothing copied).
    #[test]
    fn hf_refs_borrow_the_fused_tensors() {
        let cfg = ModelConfig {
            qkv_bias: true,
            ..ModelConfig::default()
        };
        let layout = ParamLayout::new(&cfg);
        let w = layout.init(&cfg, 5);
        let refs = to_hf_refs(&layout, &cfg, &w);
        let owned = to_hf(&layout, &cfg, &w);
        assert_eq!(refs.len(), owned.len());
        for (r, o) in refs.iter().zip(&owned) {
            assert_eq!(r, &o.borrowed());
        }
        let qkv = layout
            .specs
            .iter()
            .position(|s| s.name == "model.layers.0.self_attn.qkv_proj.weight")
            .unwrap();
        let k = refs
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        let at = cfg.n_heads * cfg.head_dim() * cfg.d_model;
        assert!(std::ptr::eq(k.data.as_ptr(), w[qkv][at..].as_ptr()));
    }

    #[test]
    fn missing_tensor_and_wrong_shape_are_named() {
        let cfg = ModelConfig::default();
        let layout = ParamLayout::new(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut t = to_hf(&layout, &cfg, &layout.init(&cfg, 1));
        t.retain(|x| x.name != "model.norm.weight");
        save_safetensors(&path, &t).unwrap();
        let e = load_model(&path, &layout, &cfg).unwrap_err().to_string();
        assert!(
            e.contains("model.norm.weight") && e.contains("missing"),
            "{e}"
        );

        let bigger = ModelConfig {
            d_model: 256,
            ..cfg.clone()
        };
        let e = load_model(&path, &ParamLayout::new(&bigger), &bigger)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
    }

    /// Writing where no file can be created (a missing directory), and a tensor whose data
    /// does not fill its shape: errors naming the path, and no file left behind.
    #[test]
    fn unwritable_path_and_short_tensor_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let t = |n: usize| HostTensor {
            name: "w".into(),
            shape: vec![2, 3],
            data: vec![1.0; n],
        };
        let path = dir.path().join("missing").join("m.safetensors");
        let e = save_safetensors(&path, &[t(6)]).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("writing"), "{e}");
        let path = dir.path().join("m.safetensors");
        let e = save_safetensors(&path, &[t(5)]).unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains('w'), "{e}");
        assert!(!path.exists());
        save_safetensors(&path, &[t(6)]).unwrap();
        assert_eq!(load_safetensors(&path).unwrap()["w"].data, vec![1.0; 6]);
    }

    #[test]
    fn not_a_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            load_safetensors(&path),
            Err(WeightsError::Format { .. })
        ));
    }
}
