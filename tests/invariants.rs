//! One test per invariant of DESIGN.md, named after it.

mod common;

use common::*;
use packtrain::backend::Backend;
use packtrain::config::{Config, DeviceKind, Leftovers};
use packtrain::data::TokenStore;
use packtrain::dist::SingleProcess;
use packtrain::model::ParamLayout;
use packtrain::packing::{plan_epochs, PackedBatch, PlanParams, IGNORE_INDEX};
use packtrain::train::{self, optimizer::AdamW, TrainOptions};

/// Invariant 1. Tolerance: the packed and per-document runs sum the same f32 terms in a
/// different order (weight gradients over T rows), so they agree to ~1e-6 relative; 1e-5 leaves
/// room without letting any cross-document term (which changes values at the 1e-2 level) pass.
#[test]
fn invariant_1_no_cross_document_attention() {
    let cfg = small_model();
    let lengths = [7, 1, 33, 2, 16, 1, 40];
    let docs = random_docs(&lengths, cfg.vocab_size, 11);
    let store = TokenStore::from_documents(&docs);
    let all: Vec<u32> = (0..docs.len() as u32).collect();
    let cap: usize = lengths.iter().sum();
    let (be, mut model) = cpu_model(&cfg, 5, cap);

    // Packed: every document in one batch.
    let (_, batch) = device_batch(&be, &store, &all, cap);
    model.zero_grads(&be).unwrap();
    let packed_loss = model.forward_backward(&be, &batch, 1.0).unwrap();
    let packed_token_losses = model.token_losses(&be, batch.t).unwrap();
    let packed_grads = model.grads_to_host(&be).unwrap();

    // One by one: gradients accumulate across the calls.
    model.zero_grads(&be).unwrap();
    let mut alone_loss = 0.0;
    let mut alone_token_losses = Vec::new();
    for d in &all {
        let (_, batch) = device_batch(&be, &store, &[*d], cap);
        alone_loss += model.forward_backward(&be, &batch, 1.0).unwrap();
        alone_token_losses.extend(model.token_losses(&be, batch.t).unwrap());
    }
    let alone_grads = model.grads_to_host(&be).unwrap();

    assert!(
        (packed_loss - alone_loss).abs() <= 1e-5 * alone_loss.abs(),
        "{packed_loss} vs {alone_loss}"
    );
    assert!(rel_err(&packed_token_losses, &alone_token_losses) < 1e-5);
    for ((p, a), spec) in packed_grads
        .iter()
        .zip(&alone_grads)
        .zip(&model.layout.specs)
    {
        let e = rel_err(p, a);
        assert!(e < 1e-5, "{}: relative error {e:e}", spec.name);
    }
}

/// Invariant 2: positions count 0.. within each document, and the model reads them. RoPE is
/// relative, so continuing the count across documents changes nothing but rounding (attention
/// never crosses a boundary); positions that do not advance within a document change the loss.
#[test]
fn invariant_2_positions_restart_per_document() {
    let cfg = small_model();
    let docs = random_docs(&[5, 1, 9], cfg.vocab_size, 3);
    let store = TokenStore::from_documents(&docs);
    let (be, mut model) = cpu_model(&cfg, 1, 15);
    let (packed, mut batch) = device_batch(&be, &store, &[0, 1, 2], 15);
    let expect: Vec<i32> = [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8].to_vec();
    assert_eq!(packed.position_ids, expect);
    assert_eq!(
        packtrain::packing::cu_seqlens_from_position_ids(&packed.position_ids),
        packed.cu_seqlens
    );
    let restarted = model.forward(&be, &batch).unwrap();

    let continued: Vec<i32> = (0..15).collect();
    be.upload_idx(&mut batch.positions, &continued).unwrap();
    let shifted = model.forward(&be, &batch).unwrap();
    assert!(
        (restarted - shifted).abs() < 1e-4 * restarted.abs(),
        "{restarted} vs {shifted}"
    );

    be.upload_idx(&mut batch.positions, &[0; 15]).unwrap();
    let frozen = model.forward(&be, &batch).unwrap();
    assert!(
        (restarted - frozen).abs() > 1e-3,
        "RoPE must read position_ids"
    );
}

/// Invariant 3: the last token of a document predicts nothing, and masked prompt tokens are
/// never targets.
#[test]
fn invariant_3_targets_never_cross_a_boundary() {
    let docs = random_docs(&[6, 1, 12, 3], 50, 9);
    let store = TokenStore::from_documents(&docs);
    let packed = PackedBatch::assemble(&[0, 1, 2, 3], &store).unwrap();
    let cu = &packed.cu_seqlens;
    for w in cu.windows(2) {
        let (start, end) = (w[0] as usize, w[1] as usize);
        assert_eq!(
            packed.targets[end - 1],
            IGNORE_INDEX,
            "last token of [{start}, {end})"
        );
    }
    let mut pos = 0;
    for (d, doc) in docs.iter().enumerate() {
        for j in 0..doc.len() {
            let t = packed.targets[pos + j];
            if j + 1 < doc.len() && doc.is_label(j + 1) {
                assert_eq!(t, doc.tokens[j + 1] as i32, "doc {d} pos {j}");
            } else {
                assert_eq!(t, IGNORE_INDEX, "doc {d} pos {j}");
            }
        }
        pos += doc.len();
    }
    assert_eq!(
        packed.num_targets,
        packed
            .targets
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count()
    );
}

/// Invariant 4: 4 micro-steps of one bin each, normalised by the step's global target count,
/// give the same gradients and the same AdamW update as the 4 bins as one batch.
#[test]
fn invariant_4_one_global_normalisation() {
    let cfg = small_model();
    let lengths = [9, 14, 1, 30, 6, 22, 3, 17, 11];
    let docs = random_docs(&lengths, cfg.vocab_size, 21);
    let store = TokenStore::from_documents(&docs);
    let bins: [&[u32]; 4] = [&[0, 1], &[2, 3], &[4, 5, 6], &[7, 8]];
    let cap: usize = lengths.iter().sum();
    let layout = ParamLayout::new(&cfg);
    let tcfg = Config::default().train;

    let n_targets: usize = bins
        .iter()
        .map(|b| PackedBatch::assemble(b, &store).unwrap().num_targets)
        .sum();
    let scale = 1.0 / n_targets as f32;

    // Four micro-steps.
    let (be, mut a) = cpu_model(&cfg, 8, cap);
    a.zero_grads(&be).unwrap();
    let mut loss_a = 0.0;
    for bin in bins {
        let (_, batch) = device_batch(&be, &store, bin, cap);
        loss_a += a.forward_backward(&be, &batch, scale).unwrap();
    }
    // One batch of the same documents.
    let (_, mut b) = cpu_model(&cfg, 8, cap);
    let all: Vec<u32> = bins.concat();
    let (_, batch) = device_batch(&be, &store, &all, cap);
    b.zero_grads(&be).unwrap();
    let loss_b = b.forward_backward(&be, &batch, scale).unwrap();
    assert!((loss_a - loss_b).abs() <= 1e-5 * loss_b);
    let (ga, gb) = (a.grads_to_host(&be).unwrap(), b.grads_to_host(&be).unwrap());
    for ((x, y), s) in ga.iter().zip(&gb).zip(&layout.specs) {
        assert!(rel_err(x, y) < 1e-5, "{}", s.name);
    }

    let mut opt_a = AdamW::new(&be, &layout).unwrap();
    let mut opt_b = AdamW::new(&be, &layout).unwrap();
    let (pa, wa, ga) = a.update_view();
    opt_a
        .update(&be, &layout, pa, wa, ga, &tcfg, 1e-3, 1.0)
        .unwrap();
    let (pb, wb, gb) = b.update_view();
    opt_b
        .update(&be, &layout, pb, wb, gb, &tcfg, 1e-3, 1.0)
        .unwrap();
    let (wa, wb) = (
        a.weights_to_host(&be).unwrap(),
        b.weights_to_host(&be).unwrap(),
    );
    for ((x, y), s) in wa.iter().zip(&wb).zip(&layout.specs) {
        // AdamW divides by sqrt(v): a gradient differing at 1e-7 moves the weight by ~lr * 1e-7.
        assert!(rel_err(x, y) < 1e-5, "{}", s.name);
    }
}

/// Invariant 5: the plan is a pure function of its inputs, every rank sees the same number of
/// steps, and it is known before step 0.
#[test]
fn invariant_5_every_rank_runs_the_same_known_number_of_steps() {
    let lengths = packtrain::data::synthetic_lengths(&Config::default().data.synthetic, 5000, 3);
    for world in [1, 2, 8] {
        let params = PlanParams {
            tokens_per_micro_batch: 16384,
            micro_steps: 2,
            world_size: world,
            seed: 7,
            leftovers: Leftovers::Carry,
        };
        let a = plan_epochs(&lengths, &params, 2).unwrap();
        let b = plan_epochs(&lengths, &params, 2).unwrap();
        for (pa, pb) in a.iter().zip(&b) {
            assert!(pa.num_steps() > 0);
            assert_eq!(pa.num_steps(), pb.num_steps());
            for s in 0..pa.num_steps() {
                for r in 0..world {
                    for g in 0..2 {
                        assert_eq!(pa.bin(s, r, g), pb.bin(s, r, g));
                        assert!(!pa.bin(s, r, g).is_empty(), "no dummy batches");
                    }
                }
            }
        }
    }
}

fn run_small(
    dir: &std::path::Path,
    config: Config,
    stop_after: Option<u64>,
    resume: bool,
) -> Vec<f64> {
    let opts = TrainOptions {
        config,
        run_dir: dir.join("run"),
        resume: resume.then(|| dir.join("run")),
        stop_after,
        progress: false,
    };
    train::train(&opts, &SingleProcess).expect("training");
    let text = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Invariant 6: same config, seed and world size: the same loss curve, bitwise (CPU).
#[test]
fn invariant_6_deterministic() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c = small_run_config(&d1.path().join("cache"));
    c.train.max_steps = 6;
    let a = run_small(d1.path(), c.clone(), None, false);
    c.data.cache_dir = d2.path().join("cache");
    let b = run_small(d2.path(), c, None, false);
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "bitwise equal loss curves");
}

/// Invariant 7: bad input gets a clear error, never a panic or a hang.
#[test]
fn invariant_7_bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A wrong config.
    let e = Config::parse("[model]\nn_kv_heads = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.n_kv_heads = 3"), "{e}");
    // Malformed data.
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 3]}\n{not json\n").unwrap();
    let mut c = small_run_config(&dir.path().join("cache"));
    c.data.format = packtrain::config::DataFormat::Tokens;
    c.data.paths = vec![data.clone()];
    let opts = TrainOptions {
        config: c.clone(),
        run_dir: dir.path().join("run"),
        resume: None,
        stop_after: None,
        progress: false,
    };
    let e = train::train(&opts, &SingleProcess).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains('2'), "{e}");
    // A document longer than the budget is a counted policy, not a crash: dropped here.
    std::fs::write(
        &data,
        format!(
            "{{\"input_ids\": {:?}}}\n{{\"input_ids\": [1, 2]}}\n",
            vec![5u32; 300]
        ),
    )
    .unwrap();
    let mut c2 = c.clone();
    c2.data.long_documents = packtrain::config::LongDocuments::Drop;
    let store = packtrain::data::load(&c2).unwrap();
    assert_eq!(store.report().dropped, 1);
    // A missing library: this build has no CUDA backend.
    let mut c3 = small_run_config(&dir.path().join("cache"));
    c3.device = DeviceKind::Cuda;
    let opts = TrainOptions {
        config: c3,
        run_dir: dir.path().join("run3"),
        resume: None,
        stop_after: None,
        progress: false,
    };
    let e = train::train(&opts, &SingleProcess).unwrap_err().to_string();
    assert!(e.contains("cuda"), "{e}");
}
