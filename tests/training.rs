//! The training loop end to end on the CPU: resume, overfitting, checkpoints, outputs.

mod common;

use common::*;
use packtrain::config::Config;
use packtrain::dist::SingleProcess;
use packtrain::model::weights::load_safetensors;
use packtrain::model::ParamLayout;
use packtrain::train::{self, checkpoint, TrainOptions};

fn opts(
    config: Config,
    run_dir: std::path::PathBuf,
    resume: bool,
    stop_after: Option<u64>,
) -> TrainOptions {
    TrainOptions {
        config,
        resume: resume.then(|| run_dir.clone()),
        run_dir,
        stop_after,
        progress: false,
    }
}

fn final_weights(run_dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let dir = checkpoint::resolve(run_dir).unwrap();
    load_safetensors(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect()
}

/// N steps, stop, resume, N steps: bitwise the weights of 2N uninterrupted steps.
#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small_run_config(&dir.path().join("cache"));
    c.train.max_steps = 8;
    let straight = dir.path().join("straight");
    train::train(
        &opts(c.clone(), straight.clone(), false, None),
        &SingleProcess,
    )
    .unwrap();

    let split = dir.path().join("split");
    let first = train::train(
        &opts(c.clone(), split.clone(), false, Some(4)),
        &SingleProcess,
    )
    .unwrap();
    assert_eq!(first.steps, 4);
    let second = train::train(&opts(c, split.clone(), true, None), &SingleProcess).unwrap();
    assert_eq!(second.steps, 4);

    assert_eq!(
        final_weights(&straight),
        final_weights(&split),
        "weights must match bitwise"
    );
    let curve = |d: &std::path::Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let losses = |s: String| -> Vec<f64> {
        s.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(losses(curve(&straight)), losses(curve(&split)));
}

/// A resume under a config that would train another model is refused, naming the section.
#[test]
fn resume_under_a_different_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small_run_config(&dir.path().join("cache"));
    c.train.max_steps = 2;
    let run = dir.path().join("run");
    train::train(&opts(c.clone(), run.clone(), false, None), &SingleProcess).unwrap();
    c.model.ffn_dim = 96;
    let e = train::train(&opts(c, run, true, None), &SingleProcess)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[model]") || e.contains("shape"), "{e}");
}

/// A handful of documents, many epochs: the model memorises them.
#[test]
fn overfits_a_handful_of_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small_run_config(&dir.path().join("cache"));
    c.data.synthetic.num_docs = 6;
    c.data.synthetic.median_len = 24.0;
    c.data.synthetic.sigma = 0.2;
    c.packing.tokens_per_micro_batch = 256;
    c.packing.micro_steps = 1;
    c.packing.leftovers = packtrain::config::Leftovers::Carry;
    c.train.epochs = 150;
    c.train.lr = 1e-2;
    c.train.weight_decay = 0.0;
    c.train.warmup_steps = 5;
    c.train.min_lr_ratio = 0.5;
    let run = dir.path().join("run");
    let s = train::train(&opts(c, run, false, None), &SingleProcess).unwrap();
    assert!(
        s.first_loss > 3.0,
        "starts near ln(64) = 4.16, got {}",
        s.first_loss
    );
    assert!(s.final_loss < 0.1, "final loss {}", s.final_loss);
}

/// The run directory holds the resolved config, one metrics line per step, a checkpoint and
/// the plot; the loss falls.
#[test]
fn a_run_writes_its_outputs_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = small_run_config(&dir.path().join("cache"));
    c.train.epochs = 3;
    let run = dir.path().join("run");
    let s = train::train(&opts(c.clone(), run.clone(), false, None), &SingleProcess).unwrap();
    assert_eq!(
        Config::load(&run.join("config.toml")).unwrap().model,
        c.model
    );
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count() as u64, s.steps);
    for key in ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"] {
        assert!(
            lines
                .lines()
                .next()
                .unwrap()
                .contains(&format!("\"{key}\"")),
            "{key}"
        );
    }
    assert!(run.join("loss.png").metadata().unwrap().len() > 1000);
    assert!(checkpoint::resolve(&run).is_ok());
    assert!(
        s.final_loss < s.first_loss - 0.5,
        "{} -> {}",
        s.first_loss,
        s.final_loss
    );
}

/// The data-parallel overlap hook: each time `forward_backward_hooked` says the gradients of
/// tensors `from..` are final, they already equal the micro-step's final gradients (so an
/// all-reduce started there sums the right values), `from` only decreases, and the model's
/// tied and untied layouts both end with every tensor reported or left to the final sync.
#[test]
fn grads_ready_reports_only_final_gradients() {
    use packtrain::backend::{Backend, BackendError};
    use packtrain::data::TokenStore;
    for tied in [false, true] {
        let mut cfg = small_model();
        cfg.tie_embeddings = tied;
        let docs = random_docs(&[37, 1, 90, 12], cfg.vocab_size, 5);
        let store = TokenStore::from_documents(&docs);
        let (be, mut model) = cpu_model(&cfg, 3, 256);
        let (_, batch) = device_batch(&be, &store, &[0, 1, 2, 3], 256);
        model.zero_grads(&be).unwrap();
        let mut seen: Vec<(usize, Vec<Vec<f32>>)> = Vec::new();
        let mut hook = |grads: &mut [Vec<f32>], from: usize| -> Result<(), BackendError> {
            let snap = grads[from..]
                .iter()
                .map(|g| be.download(g, g.len()))
                .collect::<Result<_, _>>()?;
            seen.push((from, snap));
            Ok(())
        };
        model
            .forward_backward_hooked(&be, &batch, 0.01, &mut |_| Ok(()), &mut hook)
            .unwrap();
        let last = model.grads_to_host(&be).unwrap();
        assert_eq!(seen.len(), cfg.n_layers + 1, "tied {tied}");
        assert!(seen.windows(2).all(|w| w[0].0 > w[1].0), "from decreases");
        for (from, snap) in &seen {
            for (k, g) in snap.iter().enumerate() {
                let i = from + k;
                if tied && i == model.layout.embed {
                    continue; // the tied lm_head is the embedding: final only at the end
                }
                assert_eq!(
                    g, &last[i],
                    "tensor {i} reported final at {from} but changed later"
                );
            }
        }
    }
}

/// Recomputing the layers in the backward (`train.recompute`) gives bitwise the gradients and
/// loss of keeping every layer's activations.
#[test]
fn recompute_gives_the_same_gradients() {
    use packtrain::data::TokenStore;
    use packtrain::model::{Llama, ParamLayout};
    let cfg = small_model();
    let docs = random_docs(&[37, 1, 90, 12, 64], cfg.vocab_size, 9);
    let store = TokenStore::from_documents(&docs);
    let weights = ParamLayout::new(&cfg).init(&cfg, 4);
    let run = |recompute: bool| {
        let be = packtrain::backend::cpu::CpuBackend::new();
        let mut model = Llama::new(&be, &cfg, &weights, 256, recompute).unwrap();
        let (_, batch) = device_batch(&be, &store, &[0, 1, 2, 3, 4], 256);
        model.zero_grads(&be).unwrap();
        let loss = model.forward_backward(&be, &batch, 0.01).unwrap();
        (loss, model.grads_to_host(&be).unwrap())
    };
    let (loss_a, grads_a) = run(false);
    let (loss_b, grads_b) = run(true);
    assert_eq!(loss_a.to_bits(), loss_b.to_bits());
    assert_eq!(grads_a, grads_b);
}

/// The weights hook of a data-parallel step: it sees every forward stage once, in order
/// (ZeRO-1 waits there for the weights other ranks are still sending), the stages are the ones
/// `ParamLayout::forward_stages` assigns, and the hook changes nothing: bitwise the loss and
/// gradients of the plain call.
#[test]
fn weights_ready_sees_every_forward_stage_in_order() {
    use packtrain::backend::BackendError;
    use packtrain::data::TokenStore;
    let cfg = small_model();
    let lengths = [7, 12, 5];
    let docs = random_docs(&lengths, cfg.vocab_size, 4);
    let store = TokenStore::from_documents(&docs);
    let cap: usize = lengths.iter().sum();
    let (be, mut plain) = cpu_model(&cfg, 3, cap);
    let (_, batch) = device_batch(&be, &store, &[0, 1, 2], cap);
    plain.zero_grads(&be).unwrap();
    let want = plain.forward_backward(&be, &batch, 0.5).unwrap();

    let (_, mut hooked) = cpu_model(&cfg, 3, cap);
    hooked.zero_grads(&be).unwrap();
    let mut stages = Vec::new();
    let got = hooked
        .forward_backward_hooked(
            &be,
            &batch,
            0.5,
            &mut |s| {
                stages.push(s);
                Ok::<(), BackendError>(())
            },
            &mut |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(got.to_bits(), want.to_bits());
    assert_eq!(stages, (0..=cfg.n_layers + 1).collect::<Vec<_>>());
    let assigned = ParamLayout::new(&cfg).forward_stages();
    assert_eq!(assigned.iter().max(), stages.last());
    assert_eq!(
        hooked.grads_to_host(&be).unwrap(),
        plain.grads_to_host(&be).unwrap()
    );
}

/// `Llama::with_act_grads` (`train.bf16_grads`): the gradients of one micro-step are those of
/// the plain model (bitwise on the CPU, whose activations are f32), and a second backward
/// without `zero_grads`, which would add into gradients rounded once already, is refused
/// with an error that names the fix.
#[test]
fn act_grads_hold_one_micro_step() {
    use packtrain::data::TokenStore;
    use packtrain::model::Llama;
    let cfg = small_model();
    let lengths = [9, 20, 3];
    let docs = random_docs(&lengths, cfg.vocab_size, 6);
    let store = TokenStore::from_documents(&docs);
    let cap: usize = lengths.iter().sum();
    let (be, mut plain) = cpu_model(&cfg, 5, cap);
    let (_, batch) = device_batch(&be, &store, &[0, 1, 2], cap);
    plain.zero_grads(&be).unwrap();
    let want = plain.forward_backward(&be, &batch, 0.25).unwrap();

    let (_, model) = cpu_model(&cfg, 5, cap);
    let mut act: Llama<_> = model.with_act_grads(&be).unwrap();
    for _ in 0..2 {
        act.zero_grads(&be).unwrap();
        let got = act.forward_backward(&be, &batch, 0.25).unwrap();
        assert_eq!(got.to_bits(), want.to_bits());
    }
    assert_eq!(
        act.grads_to_host(&be).unwrap(),
        plain.grads_to_host(&be).unwrap()
    );
    let err = act.forward_backward(&be, &batch, 0.25).unwrap_err();
    assert!(err.to_string().contains("zero_grads"), "{err}");
}
