//! Hugging Face interop: transformers checkpoints load exactly and give transformers' numbers;
//! our checkpoints load back exactly; every unsupported input is a named error.
//!
//! The fixtures in `tests/fixtures/hf_tiny_*` were written by transformers (`save_pretrained`)
//! with `bench/make_hf_fixtures.py`, which also stored transformers' per-document losses and
//! logits in `expected.json`; so these tests check parity with transformers without Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use packtrain::backend::cpu::CpuBackend;
use packtrain::cli::eval::{document_losses, run, EvalArgs, EvalFormat};
use packtrain::config::{ModelConfig, RopeScaling, RopeScalingKind};
use packtrain::data::{Document, TokenStore};
use packtrain::model::hf::{self, Arch, HfError, LoadOptions, SaveDtype, SaveOptions};
use packtrain::model::weights::{load_safetensors, to_hf, HostTensor};
use packtrain::model::{DeviceBatch, Llama, ParamLayout};
use packtrain::packing::PackedBatch;
use serde_json::Value;

const FIXTURES: [&str; 3] = ["hf_tiny_llama", "hf_tiny_llama3_rope", "hf_tiny_qwen2"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn docs_of(exp: &Value) -> Vec<Vec<u32>> {
    exp["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn load(dir: &Path) -> hf::HfModel {
    hf::load_dir(dir, &LoadOptions::default()).unwrap()
}

/// Every tensor of a directory's safetensors files, by name.
fn files_tensors(dir: &Path) -> BTreeMap<String, HostTensor> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            all.extend(load_safetensors(&p).unwrap());
        }
    }
    all
}

/// A model small enough for every test, with grouped-query heads.
fn small(qkv_bias: bool, tie: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        d_model: 24,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        ffn_dim: 20,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_embeddings: tie,
        init_std: 0.3,
        qkv_bias,
        ..ModelConfig::default()
    }
}

/// log p(v | x_<=t) for every position t and token v, [T * V], through the public model API:
/// V copies of the document in one packed batch, copy v with every target = v, so each token
/// loss is -log softmax(logits)[v].
fn log_probs(be: &CpuBackend, model: &mut Llama<CpuBackend>, tokens: &[u32]) -> Vec<f64> {
    let (t, v) = (tokens.len(), model.config.vocab_size);
    let mut b = PackedBatch::default();
    b.cu_seqlens.push(0);
    for target in 0..v {
        b.tokens.extend_from_slice(tokens);
        b.targets.extend(std::iter::repeat_n(target as i32, t));
        b.position_ids.extend(0..t as i32);
        b.cu_seqlens.push(b.tokens.len() as i32);
        b.doc_ids.push(target as u32);
    }
    b.max_seqlen = t;
    b.num_targets = t * v;
    let mut batch = DeviceBatch::new(be, t * v).unwrap();
    batch.upload(be, &b).unwrap();
    model.forward(be, &batch).unwrap();
    let losses = model.token_losses(be, t * v).unwrap();
    let mut out = vec![0.0; t * v];
    for target in 0..v {
        for pos in 0..t {
            out[pos * v + target] = -(losses[target * t + pos] as f64);
        }
    }
    out
}

/// log_softmax over rows of `v` values, in f64.
fn log_softmax(logits: &[f64], v: usize) -> Vec<f64> {
    logits
        .chunks(v)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row.iter().map(move |x| x - lse)
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

// ---------------------------------------------------------------- transformers' checkpoints

#[test]
fn transformers_checkpoints_load_exactly() {
    for name in FIXTURES {
        let dir = fixture(name);
        let m = load(&dir);
        let layout = ParamLayout::new(m.config());
        let files = files_tensors(&dir);
        // Our layout split back into HF tensors equals the file's tensors value for value.
        let ours = to_hf(&layout, m.config(), &m.weights);
        for t in &ours {
            let f = &files[&t.name];
            assert_eq!(f.shape, t.shape, "{name}: {}", t.name);
            assert!(
                f.data
                    .iter()
                    .zip(&t.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: {} differs",
                t.name
            );
        }
        assert_eq!(ours.len(), files.len(), "{name}: every tensor used");
    }
    let q = load(&fixture("hf_tiny_qwen2"));
    assert_eq!(
        (q.hf.arch, q.config().qkv_bias, q.dtype),
        (Arch::Qwen2, true, SaveDtype::F16)
    );
    let r = load(&fixture("hf_tiny_llama3_rope"));
    assert_eq!(
        (r.config().tie_embeddings, r.dtype),
        (true, SaveDtype::BF16)
    );
    assert_eq!(
        r.config().rope_scaling,
        Some(RopeScaling {
            kind: RopeScalingKind::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32
        })
    );
    let l = load(&fixture("hf_tiny_llama"));
    let c = l.config();
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.tie_embeddings, c.qkv_bias),
        (4, 2, false, false)
    );
}

/// Invariant 1 against transformers: the per-document losses of one packed batch equal
/// transformers' loss of each document run alone (1e-4 relative, fp32 on the CPU backend).
#[test]
fn packed_document_losses_match_transformers() {
    for name in FIXTURES {
        let exp = expected(name);
        let m = load(&fixture(name));
        let docs = docs_of(&exp);
        let store = TokenStore::from_documents(
            &docs
                .iter()
                .map(|d| Document::new(d.clone()))
                .collect::<Vec<_>>(),
        );
        let be = CpuBackend::new();
        let total: usize = docs.iter().map(Vec::len).sum();
        let mut model = Llama::new(&be, m.config(), &m.weights, total, false).unwrap();
        let got = document_losses(&be, &mut model, &store, total).unwrap();
        assert_eq!(got.len(), docs.len());
        let (sums, means) = (f64s(&exp["doc_loss_sum"]), f64s(&exp["doc_loss_mean"]));
        let targets = f64s(&exp["doc_targets"]);
        let mut worst = 0.0f64;
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.targets as f64, targets[i], "{name} doc {i}");
            assert_eq!(g.tokens, docs[i].len());
            if g.targets == 0 {
                assert_eq!((g.loss_sum, g.loss_mean), (0.0, None));
                continue;
            }
            let rel = (g.loss_sum - sums[i]).abs() / sums[i].abs();
            worst = worst.max(rel);
            assert!(
                rel < 1e-4,
                "{name} doc {i}: {} vs transformers {}",
                g.loss_sum,
                sums[i]
            );
            let rel = (g.loss_mean.unwrap() - means[i]).abs() / means[i].abs();
            assert!(
                rel < 1e-4,
                "{name} doc {i}: mean {:?} vs {}",
                g.loss_mean,
                means[i]
            );
        }
        eprintln!("{name}: max relative difference of document losses {worst:.2e}");
    }
}

/// Logits (as log-probabilities: logits up to the softmax shift) equal transformers'.
#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let exp = expected(name);
        let m = load(&fixture(name));
        let v = m.config().vocab_size;
        let be = CpuBackend::new();
        let docs = docs_of(&exp);
        let longest = docs.iter().map(Vec::len).max().unwrap();
        let mut model = Llama::new(&be, m.config(), &m.weights, longest * v, false).unwrap();
        for (i, logits) in exp["logits"].as_array().unwrap().iter().enumerate() {
            let want = log_softmax(&f64s(logits), v);
            let got = log_probs(&be, &mut model, &docs[i]);
            let d = max_abs_diff(&got, &want);
            assert!(
                d < 1e-5,
                "{name} doc {i}: max |log p - transformers| = {d:e}"
            );
            eprintln!("{name} doc {i}: max |log p - transformers log p| = {d:.2e}");
        }
    }
}

#[test]
fn eval_command_writes_transformers_losses() {
    let exp = expected("hf_tiny_llama");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("docs.jsonl");
    let lines: Vec<String> = docs_of(&exp)
        .iter()
        .map(|d| serde_json::json!({ "input_ids": d }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = tmp.path().join("losses.jsonl");
    let saved = tmp.path().join("resaved");
    let args = EvalArgs {
        model: fixture("hf_tiny_llama"),
        data: vec![data],
        format: EvalFormat::Auto,
        chat_template: None,
        tokens_per_batch: 16, // several batches
        max_doc_tokens: None,
        out: Some(out.clone()),
        save: Some(saved.clone()),
        save_dtype: None,
        save_max_shard_size: 5_000_000_000,
        device: packtrain::cli::eval::EvalDevice::Cpu,
        gpu: 0,
    };
    run(&args).unwrap();
    let got: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sums = f64s(&exp["doc_loss_sum"]);
    assert_eq!(got.len(), sums.len());
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g["doc"].as_u64(), Some(i as u64));
        assert_eq!(g["tokens"].as_u64(), Some(docs_of(&exp)[i].len() as u64));
        let s = g["loss_sum"].as_f64().unwrap();
        assert!(
            (s - sums[i]).abs() <= 1e-4 * sums[i].abs(),
            "doc {i}: {s} vs {}",
            sums[i]
        );
        if g["targets"] == 0 {
            assert!(g["loss_mean"].is_null());
        }
    }
    // --save wrote the same model back (f32, like the source).
    let a = load(&fixture("hf_tiny_llama"));
    let b = load(&saved);
    assert_eq!((a.config(), &a.weights), (b.config(), &b.weights));
}

// ---------------------------------------------------------------- our writer

#[test]
fn our_checkpoints_load_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (cfg, opts) in [
        // Qwen2 biases, untied, f32, sharded into several files.
        (
            small(true, false),
            SaveOptions {
                max_shard_bytes: 8_000,
                ..SaveOptions::default()
            },
        ),
        // Tied Llama with llama3 rope scaling, one file.
        (
            ModelConfig {
                rope_scaling: Some(RopeScaling {
                    kind: RopeScalingKind::Llama3,
                    factor: 4.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 2.0,
                    original_max_position_embeddings: 16,
                }),
                ..small(false, true)
            },
            SaveOptions::default(),
        ),
        // No biases saved as Qwen2 (zero biases), Mistral with an explicit head_dim.
        (
            small(false, false),
            SaveOptions {
                arch: Some(Arch::Qwen2),
                ..SaveOptions::default()
            },
        ),
        (
            ModelConfig {
                head_dim: 12,
                ..small(false, false)
            },
            SaveOptions {
                arch: Some(Arch::Mistral),
                ..SaveOptions::default()
            },
        ),
    ] {
        let layout = ParamLayout::new(&cfg);
        let w = layout.init(&cfg, 11);
        let dir = tmp.path().join("out");
        hf::save_dir(&dir, &cfg, &w, &opts).unwrap();
        let m = load(&dir);
        let arch = opts.arch.unwrap_or(Arch::for_model(&cfg));
        assert_eq!(m.hf.arch, arch);
        if arch == Arch::Qwen2 && !cfg.qkv_bias {
            // Zero biases: the same model, now with bias tensors.
            let c = ModelConfig {
                qkv_bias: true,
                ..cfg.clone()
            };
            assert_eq!(m.config(), &c);
            let with_bias = ParamLayout::new(&c);
            let bias = with_bias.layers[0].bqkv.unwrap();
            assert!(m.weights[bias].iter().all(|&x| x == 0.0));
            continue;
        }
        assert_eq!(m.config(), &cfg);
        assert_eq!(m.weights, w, "weights differ after a round trip");
        let sharded = dir.join("model.safetensors.index.json").is_file();
        assert_eq!(sharded, opts.max_shard_bytes < 100_000);
        assert!(!tmp.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".out.")));
    }
}

#[test]
fn half_precision_saves_round_to_nearest() {
    let cfg = small(true, false);
    let layout = ParamLayout::new(&cfg);
    let w = layout.init(&cfg, 5);
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, round) in [
        (
            SaveDtype::BF16,
            (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (SaveDtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        let dir = tmp.path().join(dtype.torch_name());
        let opts = SaveOptions {
            dtype,
            ..SaveOptions::default()
        };
        hf::save_dir(&dir, &cfg, &w, &opts).unwrap();
        let m = load(&dir);
        assert_eq!(m.dtype, dtype);
        let want: Vec<Vec<f32>> = w
            .iter()
            .map(|t| t.iter().map(|&x| round(x)).collect())
            .collect();
        assert_eq!(m.weights, want);
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], dtype.torch_name());
    }
}

#[test]
fn saved_config_has_what_transformers_needs() {
    let cfg = small(false, false);
    let w = ParamLayout::new(&cfg).init(&cfg, 1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tok_src = tmp.path().join("src");
    std::fs::create_dir(&tok_src).unwrap();
    std::fs::write(tok_src.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(tok_src.join("tokenizer_config.json"), "{}").unwrap();
    let opts = SaveOptions {
        max_position_embeddings: 512,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        tokenizer_dir: Some(tok_src),
        ..SaveOptions::default()
    };
    hf::save_dir(&dir, &cfg, &w, &opts).unwrap();
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for key in [
        "architectures",
        "model_type",
        "torch_dtype",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert!(c.get(key).is_some(), "config.json lacks {key}");
    }
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["max_position_embeddings"], 512);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // Saving again replaces the model directory.
    hf::save_dir(&dir, &cfg, &w, &opts).unwrap();
    assert_eq!(load(&dir).weights, w);
}

#[test]
fn save_refuses_to_replace_a_directory_that_is_not_a_model() {
    let cfg = small(false, true);
    let w = ParamLayout::new(&cfg).init(&cfg, 1);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "keep me").unwrap();
    let e = hf::save_dir(tmp.path(), &cfg, &w, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a model directory"), "{e}");
    assert!(tmp.path().join("notes.txt").is_file());
    let e = hf::save_dir(
        &tmp.path().join("x"),
        &small(true, false),
        &w,
        &SaveOptions {
            arch: Some(Arch::Llama),
            ..SaveOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Qwen2ForCausalLM"), "{e}");
}

// ---------------------------------------------------------------- errors

/// A saved model directory in `tmp/name` to break.
fn saved(tmp: &Path, name: &str, opts: &SaveOptions) -> PathBuf {
    let cfg = small(false, false);
    let w = ParamLayout::new(&cfg).init(&cfg, 2);
    let dir = tmp.join(name);
    hf::save_dir(&dir, &cfg, &w, opts).unwrap();
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
}

fn load_err(dir: &Path) -> HfError {
    hf::load_dir(dir, &LoadOptions::default()).unwrap_err()
}

#[test]
fn unsupported_architecture_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        c["model_type"] = "gpt_neox".into();
    });
    let e = load_err(&dir);
    assert!(
        matches!(e, HfError::UnsupportedArchitecture { .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("GPTNeoXForCausalLM") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn unsupported_rope_scaling_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    edit_config(&dir, |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32});
    });
    let e = load_err(&dir);
    assert!(
        matches!(e, HfError::UnsupportedRopeScaling { ref kind, .. } if kind == "yarn"),
        "{e:?}"
    );
}

#[test]
fn unsupported_options_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    for (key, value) in [
        ("attention_bias", serde_json::json!(true)),
        ("hidden_act", serde_json::json!("gelu_pytorch_tanh")),
    ] {
        let original = std::fs::read_to_string(dir.join("config.json")).unwrap();
        edit_config(&dir, |c| c[key] = value);
        let e = load_err(&dir);
        assert!(
            matches!(e, HfError::UnsupportedOption { key: ref k, .. } if k == key),
            "{e:?}"
        );
        std::fs::write(dir.join("config.json"), original).unwrap();
    }
    // Mistral with a window shorter than max_position_embeddings, unless the run is short.
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["model_type"] = "mistral".into();
        c["sliding_window"] = 256.into();
    });
    let e = load_err(&dir).to_string();
    assert!(e.contains("sliding_window = 256"), "{e}");
    let short = LoadOptions {
        max_seq_len: Some(256),
    };
    hf::load_dir(&dir, &short).unwrap();
}

/// The shard file names of a sharded directory, in order.
fn shard_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    names
}

#[test]
fn missing_shard_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        max_shard_bytes: 8_000,
        ..SaveOptions::default()
    };
    let dir = saved(tmp.path(), "m", &opts);
    let second = shard_files(&dir)[1].clone();
    std::fs::remove_file(dir.join(&second)).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, HfError::MissingShard { ref shard, .. } if *shard == second),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn index_naming_the_wrong_shard_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        max_shard_bytes: 8_000,
        ..SaveOptions::default()
    };
    let dir = saved(tmp.path(), "m", &opts);
    let p = dir.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let wrong = shard_files(&dir)
        .into_iter()
        .find(|f| *f != index["weight_map"]["model.norm.weight"])
        .unwrap();
    index["weight_map"]["model.norm.weight"] = wrong.into();
    std::fs::write(&p, index.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, HfError::NotInShard { ref name, .. } if name == "model.norm.weight"),
        "{e:?}"
    );
}

#[test]
fn shape_mismatch_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    edit_config(&dir, |c| c["intermediate_size"] = 24.into());
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("mlp.gate_proj.weight")
            && msg.contains("[20, 24]")
            && msg.contains("[24, 24]"),
        "{msg}"
    );
}

#[test]
fn bad_dtype_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    // Rewrite the file with model.norm.weight as F64.
    let path = dir.join("model.safetensors");
    let tensors = load_safetensors(&path).unwrap();
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .values()
        .map(|t| {
            if t.name == "model.norm.weight" {
                let b = t
                    .data
                    .iter()
                    .flat_map(|&x| (x as f64).to_le_bytes())
                    .collect();
                (t.name.clone(), t.shape.clone(), safetensors::Dtype::F64, b)
            } else {
                let b = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (t.name.clone(), t.shape.clone(), safetensors::Dtype::F32, b)
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("F64") && msg.contains("BF16"),
        "{msg}"
    );
}

#[test]
fn stray_tensor_no_weights_and_no_config_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "m", &SaveOptions::default());
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<HostTensor> = load_safetensors(&path).unwrap().into_values().collect();
    tensors.push(HostTensor {
        name: "model.layers.0.self_attn.o_proj.bias".into(),
        shape: vec![24],
        data: vec![0.5; 24],
    });
    packtrain::model::weights::save_safetensors(&path, &tensors).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, HfError::UnexpectedTensor { ref name, .. } if name == "model.layers.0.self_attn.o_proj.bias"),
        "{e:?}"
    );

    std::fs::remove_file(&path).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("no weights") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );

    let e = load_err(tmp.path());
    assert!(matches!(e, HfError::NoConfig { .. }), "{e:?}");
}

#[test]
fn llama3_inv_freq_matches_transformers_fixture() {
    // transformers' inv_freq for the llama3 fixture, recomputed from its formula by hand for the
    // bands: j = 0 kept, j = 1, 2 blended, j >= 3 divided by the factor.
    let m = load(&fixture("hf_tiny_llama3_rope"));
    let got = packtrain::model::rope_inv_freq_for(m.config());
    let base = packtrain::model::rope_inv_freq(500.0, 16);
    assert_eq!(got[0], base[0]);
    for j in 3..8 {
        assert!((got[j] - base[j] / 8.0).abs() <= 1e-7 * base[j], "j = {j}");
    }
    for j in 1..3 {
        assert!(got[j] < base[j] && got[j] > base[j] / 8.0, "j = {j}");
    }
}

/// `eval --device cuda` where CUDA cannot be used is an error naming what is missing, not a
/// panic. (Skipped, loudly, on a machine where the CUDA libraries do load.)
#[test]
fn eval_on_cuda_without_cuda_is_a_clear_error() {
    if packtrain::backend::cuda::probe_libraries().is_ok() {
        eprintln!(
            "SKIPPED eval_on_cuda_without_cuda_is_a_clear_error: CUDA libraries are present here"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("docs.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
    let args = EvalArgs {
        model: fixture("hf_tiny_llama"),
        data: vec![data],
        format: EvalFormat::Auto,
        chat_template: None,
        tokens_per_batch: 16,
        max_doc_tokens: None,
        out: Some(tmp.path().join("out.jsonl")),
        save: None,
        save_dtype: None,
        save_max_shard_size: 5_000_000_000,
        device: packtrain::cli::eval::EvalDevice::Cuda,
        gpu: 0,
    };
    let e = format!("{:#}", run(&args).unwrap_err());
    assert!(e.contains("not found") && e.contains("lib"), "{e}");
}
