//! The training loop, in the order of DESIGN.md's step: plan, batch, forward/backward per
//! micro-step, all-reduce, scale by 1 / global target tokens, clip, AdamW.
//! Logging, metrics and checkpoints sit around it.

pub mod checkpoint;
pub mod grad_sync;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError};
use crate::config::{Config, DeviceKind};
use crate::data::{self, DataError, TokenStore};
use crate::dist::{Comm, DistError};
use crate::model::{DeviceBatch, Llama, ParamLayout};
use crate::packing::{self, PackedBatch, PackingError, Plan, PlanParams};

use checkpoint::{CheckpointError, TrainState};
use grad_sync::{cuda_grad_sync, AbortOnError, GradSync, HostStaged};
use metrics::{MetricsLog, RunSummary, StepMetrics};
use optimizer::{AdamW, HostMoments};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Packing(#[from] PackingError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the plan has no steps: {docs} documents ({tokens} tokens) do not fill one step of \
         {bins} bins of {budget} tokens; lower packing.tokens_per_micro_batch or \
         packing.micro_steps, or add data"
    )]
    EmptyPlan {
        docs: usize,
        tokens: usize,
        bins: usize,
        budget: usize,
    },
    #[error("step {step}: the loss is not finite ({loss}); lower train.lr or check the data")]
    NonFinite { step: u64, loss: f64 },
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error("device = \"cuda\": {0}")]
    NoCuda(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub config: Config,
    /// Receives `config.toml`, `metrics.jsonl`, `checkpoints/`, `loss.png`.
    pub run_dir: PathBuf,
    /// Continue from this checkpoint (or run directory).
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many steps in this invocation, as a preemption
    /// would; the schedule still spans the whole run.
    pub stop_after: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Train on the backend the config asks for: `cuda` needs a usable GPU (the error names what
/// is missing), `auto` takes CUDA when it opens and falls back to the CPU with a warning.
pub fn train(opts: &TrainOptions, comm: &dyn Comm) -> Result<RunSummary, TrainError> {
    let gpu = comm.local_rank();
    match opts.config.device {
        DeviceKind::Cpu => run(&CpuBackend::new(), opts, comm),
        DeviceKind::Cuda => {
            let be = CudaBackend::new(gpu).map_err(|e| TrainError::NoCuda(e.to_string()))?;
            tracing::info!(gpu, device = %be.device_name, arch = be.arch, "CUDA backend");
            run_cuda(&be, opts, comm)
        }
        DeviceKind::Auto => match CudaBackend::new(gpu) {
            Ok(be) => {
                tracing::info!(gpu, device = %be.device_name, arch = be.arch, "CUDA backend");
                run_cuda(&be, opts, comm)
            }
            Err(e) => {
                tracing::warn!("device = \"auto\": CUDA unavailable ({e}); training on the CPU");
                run(&CpuBackend::new(), opts, comm)
            }
        },
    }
}

/// The loop on a GPU, with the gradient sync of [`cuda_grad_sync`].
fn run_cuda(
    be: &CudaBackend,
    opts: &TrainOptions,
    comm: &dyn Comm,
) -> Result<RunSummary, TrainError> {
    let sync = cuda_grad_sync(be, &opts.config, comm)?;
    run_with(be, opts, comm, sync.as_ref())
}

/// Target tokens of every document: positions 1.. whose token is a label.
pub fn doc_target_counts(store: &TokenStore) -> Vec<u32> {
    (0..store.num_docs())
        .map(|d| {
            (1..store.doc_len(d))
                .filter(|&i| store.is_label(d, i))
                .count() as u32
        })
        .collect()
}

/// The plan position of a global step: (epoch, step within it).
fn locate(plans: &[Plan], mut step: usize) -> Option<(usize, usize)> {
    for (e, p) in plans.iter().enumerate() {
        if step < p.num_steps() {
            return Some((e, step));
        }
        step -= p.num_steps();
    }
    None
}

/// The training loop on one backend, gradients summed through host buffers ([`HostStaged`]).
pub fn run<B: Backend>(
    be: &B,
    opts: &TrainOptions,
    comm: &dyn Comm,
) -> Result<RunSummary, TrainError> {
    let sync = HostStaged::new(&opts.config);
    run_with(be, opts, comm, &sync)
}

/// The training loop on one backend, gradients summed across ranks by `sync`.
pub fn run_with<B: Backend>(
    be: &B,
    opts: &TrainOptions,
    comm: &dyn Comm,
    sync: &dyn GradSync<B>,
) -> Result<RunSummary, TrainError> {
    let cfg = &opts.config;
    let (rank, world) = (comm.rank(), comm.world_size());
    let root = comm.is_root();
    let t_start = Instant::now();

    // ------------------------------------------------------------ data and plan
    let store = data::load(cfg)?;
    let lengths = store.lengths();
    let doc_targets = doc_target_counts(&store);
    let plan_params = PlanParams::from_config(cfg, world);
    let t_plan = Instant::now();
    let plans = packing::plan_epochs(&lengths, &plan_params, cfg.train.epochs)?;
    let planned_steps: usize = plans.iter().map(Plan::num_steps).sum();
    if planned_steps == 0 {
        return Err(TrainError::EmptyPlan {
            docs: lengths.len(),
            tokens: lengths.iter().map(|&l| l as usize).sum(),
            bins: world * cfg.packing.micro_steps,
            budget: cfg.packing.tokens_per_micro_batch,
        });
    }
    let total_steps = if cfg.train.max_steps > 0 {
        planned_steps.min(cfg.train.max_steps)
    } else {
        planned_steps
    };
    tracing::info!(
        docs = lengths.len(),
        epochs = plans.len(),
        steps = total_steps,
        planned_steps,
        plan_ms = t_plan.elapsed().as_millis() as u64,
        "planned"
    );

    // ------------------------------------------------------------ model and optimizer
    let layout = ParamLayout::new(&cfg.model);
    let budget = cfg.packing.tokens_per_micro_batch;
    // ZeRO-1: rank r keeps the AdamW moments of, and updates, only the tensors shards[r].
    let shards = (cfg.dist.zero1 && world > 1).then(|| {
        let numels: Vec<usize> = layout.specs.iter().map(|s| s.numel()).collect();
        optimizer::shard_ranges(&numels, world)
    });
    let (weights, mut opt, mut state) = match &opts.resume {
        Some(path) => {
            let ck = checkpoint::load(path, cfg, &layout)?;
            checkpoint::check_compatible(&ck.dir, &ck.state, cfg, world)?;
            tracing::info!(checkpoint = %ck.dir.display(), step = ck.state.step, "resuming");
            let owned = shards
                .as_ref()
                .map_or(0..layout.specs.len(), |s| s[rank].clone());
            let opt = AdamW::from_host_shard(be, &layout, owned, &ck.m, &ck.v, ck.state.adam_step)?;
            (ck.weights, opt, ck.state)
        }
        None => {
            let state = TrainState {
                step: 0,
                epoch: 0,
                step_in_epoch: 0,
                tokens_seen: 0,
                adam_step: 0,
                world_size: world,
                config_toml: cfg.to_toml(),
            };
            (
                layout.init(&cfg.model, cfg.seed),
                match &shards {
                    Some(s) => AdamW::new_shard(be, &layout, s[rank].clone())?,
                    None => AdamW::new(be, &layout)?,
                },
                state,
            )
        }
    };
    let mut model = Llama::new(be, &cfg.model, &weights, budget, cfg.train.recompute)?;
    if cfg.train.bf16_grads && cfg.packing.micro_steps == 1 {
        model = model.with_act_grads(be)?;
    }
    drop(weights);
    let mut batch = DeviceBatch::new(be, budget)?;
    tracing::info!(
        backend = be.name(),
        parameters = layout.numel(),
        rank,
        world,
        grad_sync = sync.name(),
        "model ready"
    );
    // Declared after the model, so dropped before it: an error that leaves the loop aborts the
    // device communicator before any buffer a collective may still use is freed.
    let mut abort_guard = AbortOnError {
        sync,
        finished: false,
    };

    // ------------------------------------------------------------ outputs
    let mut log = None;
    if root {
        std::fs::create_dir_all(&opts.run_dir).map_err(io_err(&opts.run_dir))?;
        let cfg_path = opts.run_dir.join("config.toml");
        std::fs::write(&cfg_path, cfg.to_toml()).map_err(io_err(&cfg_path))?;
        let mpath = opts.run_dir.join("metrics.jsonl");
        log = Some(MetricsLog::open(&mpath, state.step).map_err(io_err(&mpath))?);
    }
    let bar = (opts.progress && root)
        .then(|| crate::cli::progress::start(total_steps as u64, state.step));

    // ------------------------------------------------------------ the loop
    let (g_micro, bins_per_step) = (cfg.packing.micro_steps, world * cfg.packing.micro_steps);
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    let mut timed = (0.0f64, 0u64); // (seconds, tokens) of steps after the first of this invocation
    let mut balance = (0.0f64, 0u64); // (sum of max / mean rank compute time, steps) over those steps
    let mut eff_sum = 0.0;
    let mut steps_here = 0u64;
    let mut tokens_here = 0u64;
    // `PACKTRAIN_OVERLAP=0` starts every gradient bucket after the whole backward (to measure
    // what the overlap buys).
    let overlap_allowed = std::env::var("PACKTRAIN_OVERLAP").as_deref() != Ok("0");
    while (state.step as usize) < total_steps && opts.stop_after.is_none_or(|n| steps_here < n) {
        let Some((epoch, s)) = locate(&plans, state.step as usize) else {
            break;
        };
        let plan = &plans[epoch];
        let t0 = Instant::now();

        // Every rank computes the whole step's counts from the plan, so the normalisation
        // 1 / (global target tokens) is known before the first micro-step (invariant 4).
        let (mut step_tokens, mut step_targets) = (0u64, 0u64);
        for r in 0..world {
            for g in 0..g_micro {
                for &d in plan.bin(s, r, g) {
                    step_tokens += lengths[d as usize] as u64;
                    step_targets += doc_targets[d as usize] as u64;
                }
            }
        }
        let loss_scale = 1.0 / step_targets.max(1) as f32;

        // ---- forward/backward per micro-step; gradients accumulate
        model.zero_grads(be)?;
        let mut loss_sum = 0.0f64;
        for g in 0..g_micro {
            let packed = PackedBatch::assemble(plan.bin(s, rank, g), &store)?;
            batch.upload(be, &packed)?;
            // The last micro-step of a data-parallel step hands each layer's finished
            // gradients to the sync as the backward goes, so the all-reduce overlaps it.
            let overlap = overlap_allowed && world > 1 && g + 1 == g_micro;
            // Under ZeRO-1 on NCCL the previous step's weights may still be arriving: each
            // forward stage waits for its own.
            let mut weights = |stage| sync.weights_ready(be, stage);
            let mut grads = |bufs: &mut [B::Buf], from| match overlap {
                true => sync.grads_ready(be, &layout, bufs, from),
                false => Ok(()),
            };
            loss_sum +=
                model.forward_backward_hooked(be, &batch, loss_scale, &mut weights, &mut grads)?;
        }

        // This rank's forward + backward (the micro-steps end with the loss read back, which
        // waits for this rank's compute stream only, not for the gradient sums), at slot
        // `rank`: summed with the loss, every rank learns every rank's time.
        let mut compute_ms = vec![0.0f64; world];
        compute_ms[rank] = t0.elapsed().as_secs_f64() * 1e3;

        // ---- all-reduce: gradient sums and the loss sum across ranks. `sync` may only queue
        // the gradient sums (NCCL on the device stream); the host sum of the loss comes next, so
        // a dead or stalled peer is named by the host communicator before this rank waits on
        // the device. Under ZeRO-1 each rank receives only its shard's sums (reduce-scatter),
        // so the squared gradient norm of the shards travels with the loss sum and the clip
        // sees the global norm.
        if world > 1 {
            match &shards {
                None => sync.all_reduce(be, comm, &layout, &mut model.grads)?,
                Some(sh) => sync.reduce_to_owners(be, comm, &layout, &mut model.grads, sh)?,
            }
        }
        if world > 1 && shards.is_none() {
            let mut sums = [&[loss_sum][..], &compute_ms].concat();
            comm.all_reduce_sum_f64(&mut sums)?;
            loss_sum = sums[0];
            compute_ms.copy_from_slice(&sums[1..]);
        }
        let owned_grads: Vec<(&B::Buf, usize)> = opt
            .owned
            .clone()
            .map(|i| (&model.grads[i], layout.specs[i].numel()))
            .collect();
        // A rank may own no tensor under ZeRO-1 (more ranks than tensors).
        let owned_sq = match owned_grads.is_empty() {
            true => 0.0,
            false => be.sum_squares(&owned_grads)?,
        };
        let mut sums = [loss_sum, owned_sq];
        drop(owned_grads);
        if world > 1 && shards.is_some() {
            let mut all = [&sums[..], &compute_ms].concat();
            comm.all_reduce_sum_f64(&mut all)?;
            sums.copy_from_slice(&all[..2]);
            compute_ms.copy_from_slice(&all[2..]);
        }
        let (loss_sum, grad_sq) = (sums[0], sums[1]);
        let loss = loss_sum / step_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: state.step + 1,
                loss,
            });
        }

        // ---- clip by the global norm, then AdamW (of this rank's shard under ZeRO-1, whose
        // updated weights every rank then gathers)
        let grad_norm = grad_sq.sqrt();
        let clip = cfg.train.grad_clip;
        let clip_scale = if clip > 0.0 && grad_norm > clip {
            clip / grad_norm
        } else {
            1.0
        };
        let lr = schedule::learning_rate(&cfg.train, state.step as usize, total_steps);
        let (params, working, grads) = model.update_view();
        opt.update(
            be,
            &layout,
            params,
            working,
            grads,
            &cfg.train,
            lr,
            clip_scale as f32,
        )?;
        if let Some(sh) = &shards {
            let (params, working, _) = model.update_view();
            sync.gather_weights(be, comm, &layout, params, working, sh)?;
        }
        be.synchronize()?;
        sync.step_done();

        // ---- bookkeeping
        let secs = t0.elapsed().as_secs_f64();
        let m_max = compute_ms.iter().copied().fold(0.0, f64::max);
        let m_mean = compute_ms.iter().sum::<f64>() / world as f64;
        state.step += 1;
        state.tokens_seen += step_tokens;
        state.adam_step = opt.step;
        let next = locate(&plans, state.step as usize).unwrap_or((plans.len(), 0));
        (state.epoch, state.step_in_epoch) = next;
        steps_here += 1;
        tokens_here += step_tokens;
        if steps_here > 1 {
            timed.0 += secs;
            timed.1 += step_tokens;
            balance.0 += m_max / m_mean.max(1e-12);
            balance.1 += 1;
        }
        let efficiency = step_tokens as f64 / (bins_per_step * budget) as f64;
        eff_sum += efficiency;
        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
        let m = StepMetrics {
            step: state.step,
            epoch,
            loss,
            lr,
            grad_norm,
            tokens: step_tokens,
            targets: step_targets,
            tokens_per_s: step_tokens as f64 / secs.max(1e-9),
            ms: secs * 1e3,
            packing_efficiency: efficiency,
            compute_ms_max: m_max,
            compute_ms_mean: m_mean,
        };
        if root {
            tracing::info!(
                step = m.step,
                loss = format_args!("{:.4}", m.loss),
                lr = format_args!("{:.3e}", m.lr),
                grad_norm = format_args!("{:.3}", m.grad_norm),
                ms = format_args!("{:.1}", m.ms),
                tokens_per_s = format_args!("{:.0}", m.tokens_per_s),
                packing = format_args!("{:.3}", m.packing_efficiency),
            );
            if let Some(log) = log.as_mut() {
                log.write(&m).map_err(io_err(&opts.run_dir))?;
            }
        }
        if let Some(bar) = &bar {
            bar.set_position(state.step);
            bar.set_message(format!("loss {loss:.3}"));
        }
        let every = cfg.train.checkpoint_every as u64;
        if every > 0 && state.step % every == 0 && (state.step as usize) < total_steps {
            // Under ZeRO-1 every rank makes the f32 masters current (the working copies
            // already hold the owners' rounding of them: update_view leaves them as they are)
            // and sends its moments to rank 0, which writes.
            if let Some(sh) = &shards {
                sync.masters_current(be, comm, &layout, model.update_view().0, sh)?;
            }
            if let Some(moments) =
                sync.moments_on_root(be, comm, &layout, &opt, shards.as_deref())?
            {
                save_checkpoint(be, &opts.run_dir, cfg, &model, &moments, &state)?;
            }
        }
    }
    crate::cli::progress::finish();
    // ZeRO-1: the last gather lands (and the masters with it) while an error still aborts the
    // collectives in flight.
    if let Some(sh) = &shards {
        sync.masters_current(be, comm, &layout, model.update_view().0, sh)?;
    }
    abort_guard.finished = true;
    drop(abort_guard);

    // ------------------------------------------------------------ the end of the run
    let final_moments = match steps_here {
        0 => None,
        _ => sync.moments_on_root(be, comm, &layout, &opt, shards.as_deref())?,
    };
    if let Some(moments) = final_moments {
        let dir = save_checkpoint(be, &opts.run_dir, cfg, &model, &moments, &state)?;
        tracing::info!(checkpoint = %dir.display(), "saved");
        // The final weights also as a transformers model directory.
        let hf_dir = opts.run_dir.join("hf");
        let save = crate::model::hf::SaveOptions {
            max_position_embeddings: cfg.data.max_doc_tokens,
            bos_token_id: cfg.data.bos_token_id,
            eos_token_id: cfg.data.eos_token_id,
            tokenizer_dir: cfg
                .data
                .tokenizer
                .as_ref()
                .and_then(|t| t.parent().map(Path::to_path_buf)),
            ..Default::default()
        };
        crate::model::hf::save_dir(&hf_dir, &cfg.model, &model.weights_to_host(be)?, &save)?;
        let mpath = opts.run_dir.join("metrics.jsonl");
        let all = MetricsLog::read_all(&mpath).map_err(io_err(&mpath))?;
        let png = opts.run_dir.join("loss.png");
        if let Err(e) = plot::plot_run(&png, &all, &cfg.name) {
            tracing::warn!(path = %png.display(), error = %e, "could not draw the loss plot");
        }
    }
    Ok(RunSummary {
        run_dir: opts.run_dir.clone(),
        steps: steps_here,
        tokens: tokens_here,
        wall_s: t_start.elapsed().as_secs_f64(),
        first_loss,
        final_loss: last_loss,
        tokens_per_s: if timed.0 > 0.0 {
            timed.1 as f64 / timed.0
        } else {
            f64::NAN
        },
        packing_efficiency: eff_sum / steps_here.max(1) as f64,
        parameters: layout.numel(),
        backend: be.name().to_string(),
        world_size: world,
        rank_balance: if balance.1 > 0 {
            balance.0 / balance.1 as f64
        } else {
            f64::NAN
        },
    })
}

fn save_checkpoint<B: Backend>(
    be: &B,
    run_dir: &Path,
    cfg: &Config,
    model: &Llama<B>,
    (m, v): &HostMoments,
    state: &TrainState,
) -> Result<PathBuf, TrainError> {
    let weights = model.weights_to_host(be)?;
    Ok(checkpoint::save(
        run_dir,
        cfg,
        &model.layout,
        state,
        &weights,
        m,
        v,
    )?)
}
