//! Checkpoints: weights (safetensors, Hugging Face names), AdamW moments, and the training
//! state (step, plan position, tokens seen), in `RUN/checkpoints/step-NNNNNNNN/`.
//!
//! A checkpoint is written into a hidden temporary directory and renamed into place, then
//! `RUN/checkpoints/latest` (the name of the newest) is replaced the same way, so a crash at
//! any moment leaves either the old checkpoint or the new one, never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::model::weights::{self, TensorRef, WeightsError};
use crate::model::ParamLayout;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: bad state.json: {message}")]
    State { path: PathBuf, message: String },
    #[error("{path}: no checkpoint found (expected checkpoints/latest or a step-* directory)")]
    NotFound { path: PathBuf },
    #[error("cannot resume from {path}: its {what} differs from this run's config")]
    ConfigMismatch { path: PathBuf, what: &'static str },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the next step.
    pub epoch: usize,
    /// Step within that epoch's plan of the next step.
    pub step_in_epoch: usize,
    /// Tokens trained on so far (all ranks).
    pub tokens_seen: u64,
    /// AdamW's step count (bias correction).
    pub adam_step: u64,
    pub world_size: usize,
    /// The config the run was started with (TOML), to refuse a resume under a different one.
    pub config_toml: String,
}

/// A checkpoint loaded back to the host.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    /// Parameters in layout order.
    pub weights: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const LATEST: &str = "latest";

/// Write a checkpoint of `run_dir` atomically; returns its directory.
pub fn save(
    run_dir: &Path,
    config: &Config,
    layout: &ParamLayout,
    state: &TrainState,
    weights: &[Vec<f32>],
    m: &[Vec<f32>],
    v: &[Vec<f32>],
) -> Result<PathBuf, CheckpointError> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dir = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    weights::save_model(&tmp.join(MODEL), layout, &config.model, weights)?;
    let moments: Vec<TensorRef<'_>> = layout
        .specs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            [("m", &m[i]), ("v", &v[i])].map(|(k, data)| TensorRef {
                name: format!("{k}.{}", s.name),
                shape: s.shape.clone(),
                data,
            })
        })
        .collect();
    weights::save_safetensors_refs(&tmp.join(OPTIMIZER), &moments)?;
    let state_path = tmp.join(STATE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::State {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&state_path, json).map_err(io(&state_path))?;

    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(io(&latest_tmp))?;
    let latest = root.join(LATEST);
    std::fs::rename(&latest_tmp, &latest).map_err(io(&latest))?;
    Ok(dir)
}

/// The checkpoint directory `path` names: a checkpoint itself, or a run directory whose
/// `checkpoints/latest` points to one.
pub fn resolve(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join(LATEST);
    let name = std::fs::read_to_string(&latest).map_err(|_| CheckpointError::NotFound {
        path: path.to_path_buf(),
    })?;
    let dir = path.join("checkpoints").join(name.trim());
    if dir.join(STATE).is_file() {
        Ok(dir)
    } else {
        Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
        })
    }
}

/// Load a checkpoint (see [`resolve`]) for a model of `layout`.
pub fn load(
    path: &Path,
    config: &Config,
    layout: &ParamLayout,
) -> Result<Checkpoint, CheckpointError> {
    let dir = resolve(path)?;
    let state_path = dir.join(STATE);
    let bytes = std::fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::State {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    let weights = weights::load_model(&dir.join(MODEL), layout, &config.model)?;
    let opt_path = dir.join(OPTIMIZER);
    let moments = weights::load_safetensors(&opt_path)?;
    let get = |k: &str| -> Result<Vec<Vec<f32>>, CheckpointError> {
        layout
            .specs
            .iter()
            .map(|s| {
                let name = format!("{k}.{}", s.name);
                match moments.get(&name) {
                    Some(t) if t.shape == s.shape => Ok(t.data.clone()),
                    Some(t) => Err(WeightsError::Shape {
                        path: opt_path.clone(),
                        name,
                        found: t.shape.clone(),
                        expected: s.shape.clone(),
                    }
                    .into()),
                    None => Err(WeightsError::Missing {
                        path: opt_path.clone(),
                        name,
                    }
                    .into()),
                }
            })
            .collect()
    };
    let (m, v) = (get("m")?, get("v")?);
    Ok(Checkpoint {
        dir,
        state,
        weights,
        m,
        v,
    })
}

/// Refuse to resume under a config that would train a different model or data order.
pub fn check_compatible(
    dir: &Path,
    saved: &TrainState,
    config: &Config,
    world_size: usize,
) -> Result<(), CheckpointError> {
    let old = Config::parse(&saved.config_toml).map_err(|e| CheckpointError::State {
        path: dir.to_path_buf(),
        message: format!("saved config: {e}"),
    })?;
    let mismatch = |what| CheckpointError::ConfigMismatch {
        path: dir.to_path_buf(),
        what,
    };
    if old.model != config.model {
        return Err(mismatch("[model]"));
    }
    if old.data != config.data {
        return Err(mismatch("[data]"));
    }
    if old.packing != config.packing {
        return Err(mismatch("[packing]"));
    }
    if old.seed != config.seed {
        return Err(mismatch("seed"));
    }
    if saved.world_size != world_size {
        return Err(mismatch("world size"));
    }
    Ok(())
}
