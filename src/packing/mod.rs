//! The multipack planner and [`PackedBatch`]: which documents go to which rank and micro-step,
//! and how one bin of documents becomes a flat, packed micro-batch.
//!
//! The pipeline (DESIGN.md): `TokenStore::lengths()` → [`Plan`] (one epoch:
//! step → rank → micro-step → doc ids) → [`PackedBatch::assemble`] (tokens, targets,
//! position_ids, cu_seqlens). The plan is a pure function of (lengths, [`PlanParams`], epoch,
//! carried docs), so every rank computes the same plan and knows [`Plan::num_steps`] before
//! step 0. Nothing here knows about devices or communicators.

mod batch;
mod bfd;
pub mod cu_seqlens;
mod plan;

#[cfg(test)]
mod bench;
#[cfg(test)]
pub(crate) mod testutil;

pub use batch::{PackedBatch, IGNORE_INDEX};
pub use cu_seqlens::{cu_seqlens_from_doc_ids, cu_seqlens_from_position_ids};
pub use plan::{plan_epochs, Imbalance, Plan, PlanStats};

use crate::config::{Config, Leftovers};

/// A packing error, with the facts needed to fix the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackingError {
    #[error(
        "document {doc} has {len} tokens, more than the per-rank micro-batch budget \
         packing.tokens_per_micro_batch = {budget} (split, truncate or drop long documents \
         with data.max_doc_tokens / data.long_documents)"
    )]
    DocTooLong { doc: u32, len: u32, budget: usize },
    #[error("document {doc} is empty; every planned document needs at least one token")]
    EmptyDocument { doc: u32 },
    #[error("{what} document id {doc} is out of range: the corpus has {num_docs} documents")]
    DocOutOfRange {
        what: &'static str,
        doc: u32,
        num_docs: usize,
    },
    #[error("token {token} at position {index} of document {doc} does not fit in i32")]
    TokenOutOfRange { doc: u32, index: usize, token: u32 },
    #[error("a packed batch of {tokens} tokens does not fit cu_seqlens (i32)")]
    BatchTooLarge { tokens: usize },
    #[error("{key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

/// The planner's knobs: per-rank budget B, micro-steps G, world size W, seed, leftover policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanParams {
    /// Per-rank token budget B of one micro-batch; every bin holds at most B tokens.
    pub tokens_per_micro_batch: usize,
    /// Micro-steps G per optimizer step.
    pub micro_steps: usize,
    /// Ranks W.
    pub world_size: usize,
    /// Seed of the shuffles (with the epoch).
    pub seed: u64,
    /// What happens to documents that cannot fill a last whole step.
    pub leftovers: Leftovers,
}

impl PlanParams {
    /// The config's `[packing]` section and seed, for `world_size` ranks.
    pub fn from_config(config: &Config, world_size: usize) -> PlanParams {
        PlanParams {
            tokens_per_micro_batch: config.packing.tokens_per_micro_batch,
            micro_steps: config.packing.micro_steps,
            world_size,
            seed: config.seed,
            leftovers: config.packing.leftovers,
        }
    }

    /// Bins per optimizer step: W x G.
    pub fn bins_per_step(&self) -> usize {
        self.world_size * self.micro_steps
    }

    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), PackingError> {
        let invalid = |key, value: usize, allowed: &str| PackingError::Invalid {
            key,
            value: value.to_string(),
            allowed: allowed.into(),
        };
        if self.tokens_per_micro_batch == 0 || self.tokens_per_micro_batch > i32::MAX as usize {
            return Err(invalid(
                "packing.tokens_per_micro_batch",
                self.tokens_per_micro_batch,
                "must be in [1, i32::MAX]",
            ));
        }
        if self.micro_steps == 0 {
            return Err(invalid("packing.micro_steps", 0, "must be >= 1"));
        }
        if self.world_size == 0 {
            return Err(invalid("world_size", 0, "must be >= 1"));
        }
        if self.world_size.checked_mul(self.micro_steps).is_none() {
            return Err(invalid(
                "world_size",
                self.world_size,
                "world_size x packing.micro_steps overflows",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_from_config() {
        let c = Config::default();
        let p = PlanParams::from_config(&c, 4);
        assert_eq!(p.tokens_per_micro_batch, c.packing.tokens_per_micro_batch);
        assert_eq!(p.micro_steps, c.packing.micro_steps);
        assert_eq!(p.world_size, 4);
        assert_eq!(p.seed, c.seed);
        assert_eq!(p.leftovers, Leftovers::Carry);
        assert_eq!(p.bins_per_step(), 4 * c.packing.micro_steps);
    }

    #[test]
    fn bad_params_name_their_key() {
        let ok = PlanParams::from_config(&Config::default(), 1);
        for (p, key) in [
            (
                PlanParams {
                    tokens_per_micro_batch: 0,
                    ..ok.clone()
                },
                "packing.tokens_per_micro_batch",
            ),
            (
                PlanParams {
                    micro_steps: 0,
                    ..ok.clone()
                },
                "packing.micro_steps",
            ),
            (
                PlanParams {
                    world_size: 0,
                    ..ok.clone()
                },
                "world_size",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{key} = ")), "{e}");
        }
    }
}
