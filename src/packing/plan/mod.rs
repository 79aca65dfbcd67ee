//! [`Plan`]: one epoch of step → rank → micro-step → [doc ids], the same on every rank.
//!
//! How an epoch is planned (every step deterministic in (lengths, params, epoch, carried)):
//! 1. The stream: the documents carried from the previous epoch, then a permutation of all
//!    documents, shuffled by ChaCha8 keyed on (seed, epoch) (Fisher–Yates written here, so the
//!    plan does not change with the `rand` version).
//! 2. Windows of the stream are packed by best-fit decreasing, long documents spread evenly
//!    over the bins first ([`super::bfd`]); well-filled bins are emitted, the documents of
//!    the others go back to a pool for the next window.
//! 3. Emitted bins are scheduled in batches of whole steps: sorted by attention cost (sum of
//!    L^2), cut into consecutive groups of W (one micro-step: W bins of similar cost), ranks
//!    permuted inside each group, groups shuffled, G consecutive groups per step. A group
//!    whose tokens are uneven across ranks (> 1% max/mean; mostly the part-filled bins at the
//!    end of an epoch) has its documents re-dealt longest-first to the least-loaded rank.
//! 4. At the end of the epoch every remaining bin is emitted; the least-filled bins that
//!    cannot make a whole step (W x G bins) are the leftover, carried into the next epoch
//!    ([`Leftovers::Carry`]) or dropped ([`Leftovers::Drop`]), and counted.
//!
//! With carrying, epoch e plans its carried documents *and* a full permutation of the corpus,
//! so a document can appear twice in one epoch (once late for epoch e - 1, once for epoch e).
//! Every document of that input appears exactly once: in a bin or in the leftover.
//!
//! This file holds the plan and what it answers; [`Plan::new`] in `build.rs` makes it (steps
//! 1–4 above); `tests.rs` checks it end to end.

use serde::Serialize;

use super::{PackingError, PlanParams};
use crate::config::Leftovers;

mod build;
#[cfg(test)]
mod tests;

/// One epoch's plan. Bins are stored flat: step-major, then micro-step, then rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    epoch: u64,
    world_size: usize,
    micro_steps: usize,
    tokens_per_micro_batch: usize,
    leftovers: Leftovers,
    steps: usize,
    docs: Vec<u32>,
    /// Bin i is `docs[offsets[i]..offsets[i + 1]]`, i = (step x G + micro) x W + rank.
    offsets: Vec<usize>,
    leftover: Vec<u32>,
    carried_in: usize,
}

/// max/mean across the W ranks of a micro-step, summarised over micro-steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Imbalance {
    /// Mean over micro-steps (1.0 is perfect).
    pub mean: f64,
    /// Worst micro-step.
    pub max: f64,
}

/// What a plan holds and how well it packs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanStats {
    pub epoch: u64,
    /// Documents in bins (a carried document counts where it is planned).
    pub documents: usize,
    /// Tokens in bins.
    pub tokens: u64,
    pub bins: usize,
    pub steps: usize,
    /// tokens / (bins x B).
    pub efficiency: f64,
    /// Per micro-step, max/mean over ranks of the tokens of their bins.
    pub imbalance_tokens: Imbalance,
    /// Per micro-step, max/mean over ranks of the attention cost (sum of L^2) of their bins.
    pub imbalance_attention: Imbalance,
    /// Documents carried in from the previous epoch.
    pub carried_in_docs: usize,
    /// Documents that could not fill a last whole step (carried or dropped, per the policy).
    pub leftover_docs: usize,
    pub leftover_tokens: u64,
}

impl Plan {
    /// Optimizer steps in this epoch; the same on every rank.
    pub fn num_steps(&self) -> usize {
        self.steps
    }

    /// The doc ids of one micro-batch. Panics if an index is out of range
    /// (`step < num_steps()`, `rank < world_size()`, `micro < micro_steps()`).
    pub fn bin(&self, step: usize, rank: usize, micro: usize) -> &[u32] {
        assert!(
            step < self.steps && rank < self.world_size && micro < self.micro_steps,
            "bin(step {step}, rank {rank}, micro {micro}) outside a plan of {} steps x {} ranks x {} micro-steps",
            self.steps,
            self.world_size,
            self.micro_steps
        );
        self.bin_at((step * self.micro_steps + micro) * self.world_size + rank)
    }

    fn bin_at(&self, i: usize) -> &[u32] {
        &self.docs[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Documents that could not fill a last whole step (carried or dropped per [`Plan::leftovers`]).
    pub fn leftover(&self) -> &[u32] {
        &self.leftover
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }
    pub fn tokens_per_micro_batch(&self) -> usize {
        self.tokens_per_micro_batch
    }
    /// The leftover policy this plan was made with.
    pub fn leftovers(&self) -> Leftovers {
        self.leftovers
    }
    /// Bins in the plan: steps x W x G.
    pub fn num_bins(&self) -> usize {
        self.offsets.len() - 1
    }
    /// Documents carried in from the previous epoch.
    pub fn carried_in(&self) -> usize {
        self.carried_in
    }

    /// Every planned doc id, step-major then micro-step then rank.
    pub fn planned_docs(&self) -> &[u32] {
        &self.docs
    }

    /// Counts, efficiency and per-rank imbalance, given the lengths the plan was made from.
    pub fn stats(&self, lengths: &[u32]) -> PlanStats {
        let len = |d: u32| lengths[d as usize] as u64;
        let (w, bins) = (self.world_size, self.num_bins());
        let mut tokens = 0u64;
        let (mut tok_sum, mut tok_max, mut att_sum, mut att_max) = (0.0, 1.0f64, 0.0, 1.0f64);
        let mut rank_tokens = vec![0u64; w];
        let mut rank_cost = vec![0u64; w];
        let micro_steps = bins / w;
        for m in 0..micro_steps {
            for r in 0..w {
                let bin = self.bin_at(m * w + r);
                rank_tokens[r] = bin.iter().map(|&d| len(d)).sum();
                rank_cost[r] = bin.iter().map(|&d| len(d) * len(d)).sum();
            }
            tokens += rank_tokens.iter().sum::<u64>();
            let t = max_over_mean(&rank_tokens);
            let a = max_over_mean(&rank_cost);
            tok_sum += t;
            att_sum += a;
            tok_max = tok_max.max(t);
            att_max = att_max.max(a);
        }
        let per_micro = |sum: f64| {
            if micro_steps == 0 {
                1.0
            } else {
                sum / micro_steps as f64
            }
        };
        PlanStats {
            epoch: self.epoch,
            documents: self.docs.len(),
            tokens,
            bins,
            steps: self.steps,
            efficiency: if bins == 0 {
                0.0
            } else {
                tokens as f64 / (bins as f64 * self.tokens_per_micro_batch as f64)
            },
            imbalance_tokens: Imbalance {
                mean: per_micro(tok_sum),
                max: tok_max,
            },
            imbalance_attention: Imbalance {
                mean: per_micro(att_sum),
                max: att_max,
            },
            carried_in_docs: self.carried_in,
            leftover_docs: self.leftover.len(),
            leftover_tokens: self.leftover.iter().map(|&d| len(d)).sum(),
        }
    }
}

/// Plan `epochs` epochs in a row: with [`Leftovers::Carry`] each epoch starts with the
/// previous one's leftover; with [`Leftovers::Drop`] each starts fresh.
pub fn plan_epochs(
    lengths: &[u32],
    params: &PlanParams,
    epochs: usize,
) -> Result<Vec<Plan>, PackingError> {
    let mut plans: Vec<Plan> = Vec::with_capacity(epochs);
    for epoch in 0..epochs {
        let carried = match (params.leftovers, plans.last()) {
            (Leftovers::Carry, Some(prev)) => prev.leftover(),
            _ => &[],
        };
        let plan = Plan::new(lengths, params, epoch as u64, carried)?;
        plans.push(plan);
    }
    Ok(plans)
}

fn max_over_mean(v: &[u64]) -> f64 {
    let sum: u64 = v.iter().sum();
    if sum == 0 {
        return 1.0;
    }
    let max = *v.iter().max().unwrap_or(&0) as f64;
    max * v.len() as f64 / sum as f64
}
