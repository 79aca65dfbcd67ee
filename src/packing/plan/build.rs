//! Building a [`Plan`]: the stream, the windows packed by best-fit decreasing, the
//! `Scheduler` that deals whole steps to ranks, and the leftover (steps 1–4 of the module
//! docs of `plan`).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{max_over_mean, Plan};
use crate::packing::bfd::{Bins, WindowPacker};
use crate::packing::{PackingError, PlanParams};

/// A window holds documents for at least this many bins.
const MIN_WINDOW_BINS: usize = 64;
/// Bins are balanced across ranks in batches of at least this many micro-steps.
const MIN_BALANCE_GROUPS: usize = 64;
/// A micro-step whose max/mean tokens over ranks exceeds this is re-dealt (LPT).
const REBALANCE_ABOVE: f64 = 1.01;
/// At most this fraction of a window's bins go back to the pool unfilled.
const MAX_OPEN_DIVISOR: usize = 4;

/// RNG streams of one (seed, epoch) key.
const STREAM_DOCS: u64 = 0;
const STREAM_SCHEDULE: u64 = 1;

impl Plan {
    /// Plan one epoch of `lengths` (document i has `lengths[i]` tokens), starting with the
    /// documents `carried` from the previous epoch. Errors on a document longer than B, an
    /// empty document, an out-of-range carried id or bad params; never panics on input.
    pub fn new(
        lengths: &[u32],
        params: &PlanParams,
        epoch: u64,
        carried: &[u32],
    ) -> Result<Plan, PackingError> {
        params.validate()?;
        let budget = params.tokens_per_micro_batch;
        if lengths.len() > u32::MAX as usize {
            return Err(PackingError::Invalid {
                key: "documents",
                value: lengths.len().to_string(),
                allowed: "at most u32::MAX documents".into(),
            });
        }
        for (doc, &len) in lengths.iter().enumerate() {
            let doc = doc as u32;
            if len == 0 {
                return Err(PackingError::EmptyDocument { doc });
            }
            if len as usize > budget {
                return Err(PackingError::DocTooLong { doc, len, budget });
            }
        }
        if let Some(&doc) = carried.iter().find(|&&d| d as usize >= lengths.len()) {
            return Err(PackingError::DocOutOfRange {
                what: "carried",
                doc,
                num_docs: lengths.len(),
            });
        }

        // 1. The stream: carried documents first, then this epoch's permutation.
        let mut rng = rng_for(params.seed, epoch, STREAM_DOCS);
        let mut stream = Vec::with_capacity(carried.len() + lengths.len());
        stream.extend_from_slice(carried);
        let start = stream.len();
        stream.extend(0..lengths.len() as u32);
        shuffle(&mut stream[start..], &mut rng);

        // 2–4. Pack windows, schedule whole steps, leave the rest over.
        let w = params.world_size;
        let per_step = params.bins_per_step();
        let window_bins = MIN_WINDOW_BINS.max(per_step);
        let balance_bins = round_up(
            MIN_BALANCE_GROUPS.saturating_mul(w).max(window_bins),
            per_step,
        );
        let mut packer = WindowPacker::new(
            lengths,
            budget as u32,
            (window_bins / MAX_OPEN_DIVISOR).max(1),
        );
        let mut scheduler = Scheduler {
            rng: rng_for(params.seed, epoch, STREAM_SCHEDULE),
            world_size: w,
            budget: budget as u64,
            docs: Vec::with_capacity(stream.len()),
            offsets: vec![0],
            scratch: Vec::new(),
        };
        let mut ready = Bins::new();
        let window_tokens = (window_bins as u64).saturating_mul(budget as u64);
        let mut pos = 0;
        loop {
            let from = pos;
            let mut tokens = packer.pool_tokens();
            while pos < stream.len() && tokens < window_tokens {
                tokens += lengths[stream[pos] as usize] as u64;
                pos += 1;
            }
            let last = pos == stream.len();
            packer.pack(&stream[from..pos], last, &mut ready);
            if last {
                break;
            }
            if ready.len() >= balance_bins {
                let batch = ready.split_off_front(ready.len() / per_step * per_step);
                let all: Vec<usize> = (0..batch.len()).collect();
                scheduler.schedule(&batch, &all, lengths);
            }
        }

        // The tail: whole steps of the fullest bins; the rest is leftover.
        let n_left = ready.len() % per_step;
        let mut by_fill: Vec<usize> = (0..ready.len()).collect();
        by_fill.sort_unstable_by_key(|&b| (ready.tokens[b], b));
        let mut keep = by_fill.split_off(n_left);
        keep.sort_unstable();
        scheduler.schedule(&ready, &keep, lengths);
        let mut leftover_bins = by_fill;
        leftover_bins.sort_unstable();
        let leftover: Vec<u32> = leftover_bins
            .iter()
            .flat_map(|&b| ready.bin(b).iter().copied())
            .collect();

        let bins = scheduler.offsets.len() - 1;
        debug_assert_eq!(bins % per_step, 0);
        Ok(Plan {
            epoch,
            world_size: w,
            micro_steps: params.micro_steps,
            tokens_per_micro_batch: budget,
            leftovers: params.leftovers,
            steps: bins / per_step,
            docs: scheduler.docs,
            offsets: scheduler.offsets,
            leftover,
            carried_in: carried.len(),
        })
    }
}

/// Appends scheduled bins to the plan: balanced micro-step groups in shuffled order.
struct Scheduler {
    rng: ChaCha8Rng,
    world_size: usize,
    budget: u64,
    docs: Vec<u32>,
    offsets: Vec<usize>,
    scratch: Vec<u32>,
}

impl Scheduler {
    /// Schedule the bins `which` of `bins` (a multiple of W x G of them).
    fn schedule(&mut self, bins: &Bins, which: &[usize], lengths: &[u32]) {
        let w = self.world_size;
        debug_assert_eq!(which.len() % w, 0);
        // Similar attention cost side by side, then W at a time: one micro-step.
        let mut order = which.to_vec();
        order.sort_unstable_by_key(|&b| (bins.cost[b], bins.tokens[b], b));
        let mut groups: Vec<usize> = (0..order.len() / w).collect();
        shuffle(&mut groups, &mut self.rng);
        for g in groups {
            let group = &mut order[g * w..(g + 1) * w];
            // No rank always gets the cheapest bin of its group.
            shuffle(group, &mut self.rng);
            let start = self.offsets.len() - 1;
            for &b in group.iter() {
                self.docs.extend_from_slice(bins.bin(b));
                self.offsets.push(self.docs.len());
            }
            let tokens: Vec<u64> = group.iter().map(|&b| bins.tokens[b]).collect();
            if max_over_mean(&tokens) > REBALANCE_ABOVE {
                self.rebalance(start, &tokens, lengths);
            }
        }
    }

    /// Re-deal the documents of the W bins from bin `start` on, longest first, each to the
    /// rank with the fewest tokens so far (LPT), if that lowers the largest bin and keeps every
    /// bin within B. Only uneven micro-steps get here (mostly the last, part-filled bins of
    /// an epoch); the documents stay in the same micro-step.
    fn rebalance(&mut self, start: usize, tokens: &[u64], lengths: &[u32]) {
        let w = self.world_size;
        let (lo, hi) = (self.offsets[start], self.offsets[start + w]);
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.docs[lo..hi]);
        self.scratch
            .sort_unstable_by_key(|&d| (std::cmp::Reverse(lengths[d as usize]), d));
        let mut load = vec![0u64; w];
        let mut rank_of = Vec::with_capacity(self.scratch.len());
        for &d in &self.scratch {
            let r = (0..w).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += lengths[d as usize] as u64;
            rank_of.push(r);
        }
        let new_max = load.iter().copied().max().unwrap_or(0);
        if new_max > self.budget || new_max >= tokens.iter().copied().max().unwrap_or(0) {
            return;
        }
        let mut at = lo;
        for r in 0..w {
            for (&d, &rr) in self.scratch.iter().zip(&rank_of) {
                if rr == r {
                    self.docs[at] = d;
                    at += 1;
                }
            }
            self.offsets[start + r + 1] = at;
        }
    }
}

/// The least multiple of `to` that is >= `x` (saturating).
fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to).saturating_mul(to)
}

/// ChaCha8 keyed on (seed, epoch), one stream per use.
fn rng_for(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(b"packtrn1");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// Fisher–Yates; an index below n is the high word of a 64 x 64-bit product (bias < n / 2^64).
fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
}
