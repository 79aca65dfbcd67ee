//! The parameter layout: which tensors a Llama has, their shapes, names and optimizer groups.
//!
//! Internally q, k and v are one fused `[QKV, C]` matrix (one GEMM instead of three) and
//! gate and up one `[2F, C]` matrix; the Hugging Face names of the pieces are kept so
//! checkpoints split them back (see `weights.rs`).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;

/// What one parameter tensor is, for init, weight decay and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    Norm,
    /// A matrix read by a GEMM; `residual` ones write into the residual stream.
    Matrix {
        residual: bool,
    },
    Bias,
}

/// One parameter tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Our name (Hugging Face's, except for the fused `qkv_proj` and `gate_up_proj`).
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Indices into the parameter list of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParams {
    pub ln1: usize,
    pub wqkv: usize,
    pub bqkv: Option<usize>,
    pub wo: usize,
    pub ln2: usize,
    pub wgate_up: usize,
    pub wdown: usize,
}

impl LayerParams {
    /// The smallest index of the layer's tensors (they are consecutive in the layout).
    pub fn first(&self) -> usize {
        [
            self.ln1,
            self.wqkv,
            self.wo,
            self.ln2,
            self.wgate_up,
            self.wdown,
        ]
        .into_iter()
        .chain(self.bqkv)
        .min()
        .unwrap_or(self.ln1)
    }
}

/// The whole layout: specs in a fixed order plus named indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub embed: usize,
    pub layers: Vec<LayerParams>,
    pub ln_f: usize,
    /// The lm_head matrix: `embed` when tied.
    pub lm_head: usize,
}

impl ParamLayout {
    /// Indices of the matrices the GEMMs read (every layer's wqkv, wo, wgate_up, wdown, and
    /// the lm_head), ascending: the ones that get working copies in the activation precision.
    pub fn gemm_weights(&self) -> Vec<usize> {
        let mut ix: Vec<usize> = self
            .layers
            .iter()
            .flat_map(|l| [l.wqkv, l.wo, l.wgate_up, l.wdown])
            .chain(std::iter::once(self.lm_head))
            .collect();
        ix.sort_unstable();
        ix
    }

    /// Per tensor (layout order), the forward stage that first reads it: 0 the embedding,
    /// 1 + l layer l, `layers.len() + 1` the head (final norm, untied lm_head). A tied lm_head
    /// is the embedding (stage 0). The stages of [`crate::model::Llama`]'s weights hook, for
    /// weights that arrive while the forward runs (ZeRO-1's gather).
    pub fn forward_stages(&self) -> Vec<usize> {
        let head = self.layers.len() + 1;
        let mut stage = vec![head; self.specs.len()];
        for (l, p) in self.layers.iter().enumerate() {
            for i in [p.ln1, p.wqkv, p.wo, p.ln2, p.wgate_up, p.wdown]
                .into_iter()
                .chain(p.bqkv)
            {
                stage[i] = l + 1;
            }
        }
        stage[self.embed] = 0;
        stage
    }

    pub fn new(cfg: &ModelConfig) -> Self {
        let (v, c, f) = (cfg.vocab_size, cfg.d_model, cfg.ffn_dim);
        let d = cfg.head_dim();
        let qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * d;
        let mut specs = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, kind| {
            specs.push(ParamSpec { name, shape, kind });
            specs.len() - 1
        };
        let embed = push(
            "model.embed_tokens.weight".into(),
            vec![v, c],
            ParamKind::Embedding,
        );
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}.");
            let ln1 = push(
                format!("{p}input_layernorm.weight"),
                vec![c],
                ParamKind::Norm,
            );
            let wqkv = push(
                format!("{p}self_attn.qkv_proj.weight"),
                vec![qkv, c],
                ParamKind::Matrix { residual: false },
            );
            let bqkv = cfg.qkv_bias.then(|| {
                push(
                    format!("{p}self_attn.qkv_proj.bias"),
                    vec![qkv],
                    ParamKind::Bias,
                )
            });
            let wo = push(
                format!("{p}self_attn.o_proj.weight"),
                vec![c, cfg.n_heads * d],
                ParamKind::Matrix { residual: true },
            );
            let ln2 = push(
                format!("{p}post_attention_layernorm.weight"),
                vec![c],
                ParamKind::Norm,
            );
            let wgate_up = push(
                format!("{p}mlp.gate_up_proj.weight"),
                vec![2 * f, c],
                ParamKind::Matrix { residual: false },
            );
            let wdown = push(
                format!("{p}mlp.down_proj.weight"),
                vec![c, f],
                ParamKind::Matrix { residual: true },
            );
            layers.push(LayerParams {
                ln1,
                wqkv,
                bqkv,
                wo,
                ln2,
                wgate_up,
                wdown,
            });
        }
        let ln_f = push("model.norm.weight".into(), vec![c], ParamKind::Norm);
        let lm_head = if cfg.tie_embeddings {
            embed
        } else {
            push(
                "lm_head.weight".into(),
                vec![v, c],
                ParamKind::Matrix { residual: false },
            )
        };
        Self {
            specs,
            embed,
            layers,
            ln_f,
            lm_head,
        }
    }

    /// Total parameter count.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Whether AdamW decays this tensor: matrices always, norms and embeddings only when
    /// `decay_norms_and_embeddings`, biases never.
    pub fn decays(&self, index: usize, decay_norms_and_embeddings: bool) -> bool {
        match self.specs[index].kind {
            ParamKind::Matrix { .. } => true,
            ParamKind::Norm | ParamKind::Embedding => decay_norms_and_embeddings,
            ParamKind::Bias => false,
        }
    }

    /// Host values of a fresh model: N(0, std) matrices and embeddings (residual projections
    /// scaled by 1/sqrt(2 L), as GPT-2 and llm.c do), norms 1, biases 0. Deterministic by seed.
    pub fn init(&self, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_1a7a);
        let residual_scale = 1.0 / (2.0 * cfg.n_layers as f64).sqrt();
        self.specs
            .iter()
            .map(|spec| {
                let n = spec.numel();
                let std = match spec.kind {
                    ParamKind::Norm => return vec![1.0; n],
                    ParamKind::Bias => return vec![0.0; n],
                    ParamKind::Embedding | ParamKind::Matrix { residual: false } => cfg.init_std,
                    ParamKind::Matrix { residual: true } => cfg.init_std * residual_scale,
                };
                // Normal::new fails only for a non-finite std, which validation rules out.
                let normal = Normal::new(0.0f64, std)
                    .unwrap_or_else(|_| Normal::new(0.0, 0.02).expect("valid"));
                (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tied_model_has_no_lm_head_tensor() {
        let cfg = ModelConfig::default();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(layout.lm_head, layout.embed);
        assert!(layout.specs.iter().all(|s| s.name != "lm_head.weight"));
        let untied = ParamLayout::new(&ModelConfig {
            tie_embeddings: false,
            ..cfg
        });
        assert_eq!(untied.specs.len(), layout.specs.len() + 1);
    }

    #[test]
    fn forward_stages_follow_the_forward() {
        for tie in [true, false] {
            let cfg = ModelConfig {
                tie_embeddings: tie,
                qkv_bias: true,
                ..ModelConfig::default()
            };
            let layout = ParamLayout::new(&cfg);
            let stages = layout.forward_stages();
            let head = cfg.n_layers + 1;
            assert_eq!(stages.len(), layout.specs.len());
            assert_eq!(stages[layout.embed], 0);
            assert_eq!(stages[layout.ln_f], head);
            assert_eq!(stages[layout.lm_head], if tie { 0 } else { head });
            for (l, p) in layout.layers.iter().enumerate() {
                let mut ix = vec![p.ln1, p.wqkv, p.wo, p.ln2, p.wgate_up, p.wdown];
                ix.extend(p.bqkv);
                assert!(ix.iter().all(|&i| stages[i] == l + 1), "layer {l}");
            }
            // Layout order is forward order: the stages never go back.
            assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
        }
    }

    #[test]
    fn parameter_count_matches_the_formula() {
        let cfg = ModelConfig::default();
        let (v, c, f, l) = (cfg.vocab_size, cfg.d_model, cfg.ffn_dim, cfg.n_layers);
        let d = cfg.head_dim();
        let per_layer =
            2 * c + (cfg.n_heads + 2 * cfg.n_kv_heads) * d * c + c * cfg.n_heads * d + 3 * f * c;
        assert_eq!(ParamLayout::new(&cfg).numel(), v * c + l * per_layer + c);
    }

    #[test]
    fn init_is_deterministic_by_seed() {
        let cfg = ModelConfig::default();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(layout.init(&cfg, 7), layout.init(&cfg, 7));
        assert_ne!(layout.init(&cfg, 7), layout.init(&cfg, 8));
    }
}
