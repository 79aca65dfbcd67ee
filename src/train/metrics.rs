//! Per-step metrics: one JSON object per line in `RUN/metrics.jsonl`, and the end-of-run table.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    pub epoch: usize,
    /// Mean loss per target token over the whole step (all ranks, all micro-steps).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step (all ranks).
    pub tokens: u64,
    /// Target tokens in the step (all ranks): the loss denominator.
    pub targets: u64,
    pub tokens_per_s: f64,
    /// Step wall time in milliseconds.
    pub ms: f64,
    /// Real tokens / (bins x token budget) of this step.
    pub packing_efficiency: f64,
    /// Forward + backward wall time of the step's micro-steps on the slowest rank and the mean
    /// over ranks (ms). max / mean is the step's load imbalance: at the gradient sum every rank
    /// waits for the slowest. (0 in files written before these fields existed.)
    #[serde(default)]
    pub compute_ms_max: f64,
    #[serde(default)]
    pub compute_ms_mean: f64,
}

/// Appends metrics to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Open for appending, keeping only lines with `step <= keep_through` (a resumed run
    /// rewrites what came after its checkpoint).
    pub fn open(path: &Path, keep_through: u64) -> std::io::Result<Self> {
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= keep_through)
                })
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut file = std::fs::File::create(path)?;
        for l in kept {
            writeln!(file, "{l}")?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        let line = serde_json::to_string(m).map_err(std::io::Error::other)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every step in the file.
    pub fn read_all(path: &Path) -> std::io::Result<Vec<StepMetrics>> {
        let text = std::fs::read_to_string(path)?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
            .collect()
    }
}

/// What a run did, for the closing table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub tokens: u64,
    pub wall_s: f64,
    pub first_loss: f64,
    pub final_loss: f64,
    /// Mean tokens/s over the steps after the first (the first pays warm-up).
    pub tokens_per_s: f64,
    pub packing_efficiency: f64,
    pub parameters: usize,
    pub backend: String,
    pub world_size: usize,
    /// Mean over the steps after the first of the slowest rank's forward + backward time over
    /// the mean rank's (1 = perfectly balanced; NaN when no step was timed).
    pub rank_balance: f64,
}

impl RunSummary {
    /// A small aligned table.
    pub fn table(&self) -> String {
        let rows = [
            ("run", self.run_dir.display().to_string()),
            ("backend", format!("{} x {}", self.backend, self.world_size)),
            (
                "parameters",
                format!("{:.2} M", self.parameters as f64 / 1e6),
            ),
            ("steps", self.steps.to_string()),
            ("tokens", self.tokens.to_string()),
            ("wall time", format!("{:.1} s", self.wall_s)),
            ("tokens/s", format!("{:.0}", self.tokens_per_s)),
            ("first loss", format!("{:.4}", self.first_loss)),
            ("final loss", format!("{:.4}", self.final_loss)),
            (
                "packing efficiency",
                format!("{:.4}", self.packing_efficiency),
            ),
            (
                "rank balance",
                format!("{:.3} (slowest / mean forward+backward)", self.rank_balance),
            ),
        ];
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut s = String::new();
        for (k, v) in rows {
            s.push_str(&format!("  {k:<w$}  {v}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0,
            loss: 1.0,
            lr: 0.1,
            grad_norm: 1.0,
            tokens: 10,
            targets: 9,
            tokens_per_s: 100.0,
            ms: 1.0,
            packing_efficiency: 1.0,
            compute_ms_max: 0.8,
            compute_ms_mean: 0.7,
        }
    }

    #[test]
    fn the_closing_table_shows_the_rank_balance() {
        let r = RunSummary {
            run_dir: PathBuf::from("runs/x"),
            steps: 3,
            tokens: 30,
            wall_s: 1.0,
            first_loss: 2.0,
            final_loss: 1.0,
            tokens_per_s: 30.0,
            packing_efficiency: 1.0,
            parameters: 1000,
            backend: "cpu".into(),
            world_size: 2,
            rank_balance: 1.0126,
        };
        let t = r.table();
        assert!(t.contains("rank balance") && t.contains("1.013"), "{t}");
    }

    #[test]
    fn lines_without_the_per_rank_times_still_read() {
        let mut v = serde_json::to_value(m(1)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("compute_ms_max");
        o.remove("compute_ms_mean");
        let back: StepMetrics = serde_json::from_value(v).unwrap();
        assert_eq!((back.compute_ms_max, back.compute_ms_mean), (0.0, 0.0));
    }

    #[test]
    fn reopening_keeps_only_steps_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, 0).unwrap();
        for s in 1..=5 {
            log.write(&m(s)).unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(&p, 3).unwrap();
        log.write(&m(4)).unwrap();
        let steps: Vec<u64> = MetricsLog::read_all(&p)
            .unwrap()
            .iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }
}
