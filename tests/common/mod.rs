//! Helpers shared by the integration tests: small models, random documents, comparisons.

#![allow(dead_code)]

use packtrain::backend::cpu::CpuBackend;
use packtrain::config::{Config, ModelConfig};
use packtrain::data::{Document, TokenStore};
use packtrain::model::{DeviceBatch, Llama, ParamLayout};
use packtrain::packing::PackedBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A model small enough for exact comparisons in debug builds, with grouped-query heads.
pub fn small_model() -> ModelConfig {
    ModelConfig {
        vocab_size: 61,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 0,
        ffn_dim: 48,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.1,
        qkv_bias: true,
        rope_scaling: None,
    }
}

/// Random documents of the given lengths (tokens < vocab), some prompt tokens masked.
pub fn random_docs(lengths: &[usize], vocab: usize, seed: u64) -> Vec<Document> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    lengths
        .iter()
        .map(|&n| {
            let tokens = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
            let prompt = if n > 4 { rng.random_range(0..n / 2) } else { 0 };
            Document {
                tokens,
                labels: Some((0..n).map(|i| i >= prompt).collect()),
            }
        })
        .collect()
}

/// A model on the CPU with seeded random weights, for batches of up to `capacity` tokens.
pub fn cpu_model(cfg: &ModelConfig, seed: u64, capacity: usize) -> (CpuBackend, Llama<CpuBackend>) {
    let be = CpuBackend::new();
    let layout = ParamLayout::new(cfg);
    let weights = layout.init(cfg, seed);
    let model = Llama::new(&be, cfg, &weights, capacity, false).expect("model");
    (be, model)
}

/// Upload a packed batch of these documents of `store`.
pub fn device_batch(
    be: &CpuBackend,
    store: &TokenStore,
    docs: &[u32],
    capacity: usize,
) -> (PackedBatch, DeviceBatch<CpuBackend>) {
    let packed = PackedBatch::assemble(docs, store).expect("assemble");
    let mut batch = DeviceBatch::new(be, capacity).expect("batch buffers");
    batch.upload(be, &packed).expect("upload");
    (packed, batch)
}

/// ‖a − b‖ / max(‖b‖, tiny).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// A config that trains the small model on a small synthetic corpus in a second or two.
pub fn small_run_config(cache_dir: &std::path::Path) -> Config {
    let mut c = Config {
        name: "test".into(),
        device: packtrain::config::DeviceKind::Cpu,
        ..Config::default()
    };
    c.model = ModelConfig {
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_dim: 64,
        tie_embeddings: true,
        qkv_bias: false,
        ..small_model()
    };
    c.data.max_doc_tokens = 256;
    c.data.cache_dir = cache_dir.to_path_buf();
    c.data.synthetic.num_docs = 120;
    c.data.synthetic.median_len = 40.0;
    c.data.synthetic.min_len = 4;
    c.data.synthetic.max_len = 256;
    c.packing.tokens_per_micro_batch = 512;
    c.packing.micro_steps = 2;
    c.train.lr = 3e-3;
    c.train.warmup_steps = 2;
    c.train.epochs = 2;
    c
}
