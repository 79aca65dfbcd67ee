//! Windowed best-fit decreasing: the bin-packing core of the planner.
//!
//! The shuffled document stream is cut into windows of about `window_bins x B` tokens. Each
//! window, together with the *pool* of documents returned by the previous window, is packed
//! by best-fit decreasing: documents longest first, each into the open bin whose remaining
//! capacity is the smallest that still fits it (an ordered set keyed by remaining capacity,
//! so O(log bins) per document), a new bin when none fits.
//!
//! Plain BFD puts the longest documents together (four 4096-token documents fill a 16384 bin),
//! so bins differ a lot in attention cost (sum of L^2). So each window is also packed a second
//! way: floor(tokens / B) bins are opened up front, documents of at least B / 16 tokens go to
//! the bin with the *most* room (worst fit, spreading them evenly), then the rest best-fit into
//! the gaps. That packing is kept unless it wastes more than 0.1% more of the emitted capacity
//! than plain BFD (it rarely does when short documents are plentiful; it does when most
//! documents are long, e.g. uniform on [3000, 9000] with B = 16384).
//!
//! After packing:
//! - a bin is *closed* (emitted) when its remaining capacity is below
//!   max(shortest document seen, `CLOSE_FRACTION` x B): almost nothing could still fill it;
//! - the documents of the other bins go back to the pool, to be packed with the next window;
//!   at most `max_open` bins are returned (the emptiest), so the pool stays bounded even when
//!   no document could ever close a bin (e.g. every document longer than B/2);
//! - the last window emits every bin.
//!
//! Bins come out in [`Bins`]: flat doc ids plus offsets, with each bin's tokens and attention
//! cost (sum of L^2 over its documents).

use std::collections::BTreeSet;

/// A bin is closed when less than this fraction of B is left (or less than the shortest doc).
const CLOSE_FRACTION: f64 = 0.002;
/// Documents of at least B / SPREAD_DIVISOR tokens are spread over the bins first.
const SPREAD_DIVISOR: u32 = 16;
/// The spread packing may waste this much more of the emitted capacity than plain best fit.
const SPREAD_SLACK: f64 = 0.001;

/// Bins as flat doc ids + offsets, with per-bin tokens and attention cost.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bins {
    docs: Vec<u32>,
    /// `offsets[b]..offsets[b + 1]` indexes `docs`; starts with 0.
    offsets: Vec<usize>,
    /// Tokens of each bin.
    pub tokens: Vec<u64>,
    /// Sum of L^2 over the documents of each bin.
    pub cost: Vec<u64>,
}

impl Bins {
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn bin(&self, b: usize) -> &[u32] {
        &self.docs[self.offsets[b]..self.offsets[b + 1]]
    }

    /// Append one bin (tokens and cost from `lengths`).
    pub fn push(&mut self, docs: &[u32], lengths: &[u32]) {
        let (mut tokens, mut cost) = (0u64, 0u64);
        for &d in docs {
            let l = lengths[d as usize] as u64;
            tokens += l;
            cost += l * l;
        }
        self.docs.extend_from_slice(docs);
        self.offsets.push(self.docs.len());
        self.tokens.push(tokens);
        self.cost.push(cost);
    }

    /// Remove and return the first `k` bins.
    pub fn split_off_front(&mut self, k: usize) -> Bins {
        let cut = self.offsets[k];
        let rest_docs = self.docs.split_off(cut);
        let rest_offsets: Vec<usize> = std::iter::once(0)
            .chain(self.offsets[k + 1..].iter().map(|&o| o - cut))
            .collect();
        self.offsets.truncate(k + 1);
        let front = Bins {
            docs: std::mem::replace(&mut self.docs, rest_docs),
            offsets: std::mem::replace(&mut self.offsets, rest_offsets),
            tokens: self.tokens.drain(..k).collect(),
            cost: self.cost.drain(..k).collect(),
        };
        debug_assert_eq!(front.len(), k);
        front
    }
}

/// One way of filling the bins of a window.
#[derive(Debug, Default)]
struct Fill {
    /// Room left in each bin.
    room: Vec<u32>,
    /// The bin of each document of the window, longest first.
    assign: Vec<u32>,
    /// Whether each bin is emitted (else its documents go back to the pool).
    closed: Vec<bool>,
    /// Tokens and free room of the closed bins.
    closed_tokens: u64,
    closed_room: u64,
}

impl Fill {
    /// Free room per emitted token slot (0 is perfect).
    fn waste(&self) -> f64 {
        let cap = self.closed_tokens + self.closed_room;
        if cap == 0 {
            0.0
        } else {
            self.closed_room as f64 / cap as f64
        }
    }
}

/// Packs windows of the document stream; keeps the pool between windows.
pub(crate) struct WindowPacker<'a> {
    lengths: &'a [u32],
    budget: u32,
    /// A bin with less room than this is closed regardless of the shortest document.
    close_below: u32,
    /// At most this many not-yet-full bins go back to the pool.
    max_open: usize,
    /// Shortest document seen so far.
    min_len_seen: u32,
    pool: Vec<u32>,
    pool_tokens: u64,
    // Scratch, reused across windows.
    items: Vec<u32>,
    keys: Vec<u64>,
    sorted_lens: Vec<u32>,
    open: BTreeSet<(u32, u32)>,
    fills: [Fill; 2],
    counts: Vec<usize>,
    placed: Vec<u32>,
}

impl<'a> WindowPacker<'a> {
    /// `budget` <= u32::MAX; every length must be in [1, budget] (checked by the caller).
    pub fn new(lengths: &'a [u32], budget: u32, max_open: usize) -> Self {
        let close_below = ((budget as f64 * CLOSE_FRACTION).ceil() as u32).max(1);
        Self {
            lengths,
            budget,
            close_below,
            max_open,
            min_len_seen: u32::MAX,
            pool: Vec::new(),
            pool_tokens: 0,
            items: Vec::new(),
            keys: Vec::new(),
            sorted_lens: Vec::new(),
            open: BTreeSet::new(),
            fills: Default::default(),
            counts: Vec::new(),
            placed: Vec::new(),
        }
    }

    /// Tokens waiting in the pool.
    pub fn pool_tokens(&self) -> u64 {
        self.pool_tokens
    }

    /// Pack the pool plus `chunk`; append the closed bins to `out` (every bin when `last`).
    pub fn pack(&mut self, chunk: &[u32], last: bool, out: &mut Bins) {
        let lengths = self.lengths;
        self.items.clear();
        self.items.append(&mut self.pool);
        self.items.extend_from_slice(chunk);
        self.pool_tokens = 0;
        if self.items.is_empty() {
            return;
        }

        // Longest first; ties by position in the window (deterministic).
        self.keys.clear();
        self.keys.extend(
            self.items
                .iter()
                .enumerate()
                .map(|(k, &d)| (((u32::MAX - lengths[d as usize]) as u64) << 32) | k as u64),
        );
        self.keys.sort_unstable();
        self.sorted_lens.clear();
        self.sorted_lens
            .extend(self.keys.iter().map(|&k| u32::MAX - (k >> 32) as u32));
        let total: u64 = self.sorted_lens.iter().map(|&l| l as u64).sum();
        self.min_len_seen = self
            .min_len_seen
            .min(self.sorted_lens[self.sorted_lens.len() - 1]);

        // Plain best fit, and best fit after spreading the long documents; the spread one
        // wins unless it wastes noticeably more room.
        let big = (self.budget / SPREAD_DIVISOR).max(1);
        let spread_bins = (total / self.budget as u64) as usize;
        let try_spread = spread_bins > 1 && self.sorted_lens[0] >= big;
        let rule = CloseRule {
            budget: self.budget,
            threshold: self.min_len_seen.max(self.close_below),
            max_open: self.max_open,
            last,
        };
        let [plain, spread] = &mut self.fills;
        best_fit(&self.sorted_lens, self.budget, None, &mut self.open, plain);
        rule.close(plain);
        let use_spread = try_spread && {
            best_fit(
                &self.sorted_lens,
                self.budget,
                Some((big, spread_bins)),
                &mut self.open,
                spread,
            );
            rule.close(spread);
            spread.waste() <= plain.waste() + SPREAD_SLACK
        };
        let fill = &self.fills[use_spread as usize];

        // Group documents by bin (counting sort, keeping the longest-first order).
        let n_bins = fill.room.len();
        self.counts.clear();
        self.counts.resize(n_bins + 1, 0);
        for &b in &fill.assign {
            self.counts[b as usize + 1] += 1;
        }
        for b in 0..n_bins {
            self.counts[b + 1] += self.counts[b];
        }
        self.placed.clear();
        self.placed.resize(fill.assign.len(), 0);
        let mut next = self.counts.clone();
        for (&key, &b) in self.keys.iter().zip(&fill.assign) {
            self.placed[next[b as usize]] = self.items[key as u32 as usize];
            next[b as usize] += 1;
        }
        for b in 0..n_bins {
            let docs = &self.placed[self.counts[b]..self.counts[b + 1]];
            if docs.is_empty() {
                continue;
            }
            if fill.closed[b] {
                out.push(docs, lengths);
            } else {
                self.pool.extend_from_slice(docs);
                self.pool_tokens += (self.budget - fill.room[b]) as u64;
            }
        }
    }
}

/// When a bin of a window is emitted.
struct CloseRule {
    budget: u32,
    /// Bins with less room than this close.
    threshold: u32,
    /// At most this many other bins go back to the pool.
    max_open: usize,
    /// The last window: everything closes.
    last: bool,
}

impl CloseRule {
    /// Which bins close: little room left, or the last window. Of the rest, the fullest
    /// beyond `max_open` close too. Empty bins (room = B) are neither.
    fn close(&self, fill: &mut Fill) {
        let budget = self.budget;
        fill.closed.clear();
        fill.closed.extend(
            fill.room
                .iter()
                .map(|&room| self.last || room < self.threshold),
        );
        let mut returned: Vec<u32> = (0..fill.room.len() as u32)
            .filter(|&b| !fill.closed[b as usize] && fill.room[b as usize] < budget)
            .collect();
        if returned.len() > self.max_open {
            returned.sort_unstable_by_key(|&b| (fill.room[b as usize], b));
            let extra = returned.len() - self.max_open;
            for &b in &returned[..extra] {
                fill.closed[b as usize] = true;
            }
        }
        (fill.closed_tokens, fill.closed_room) = (0, 0);
        for (&room, &closed) in fill.room.iter().zip(&fill.closed) {
            if closed && room < budget {
                fill.closed_tokens += (budget - room) as u64;
                fill.closed_room += room as u64;
            }
        }
    }
}

/// Best fit of `lens` (longest first) into bins of `budget`: each document goes to the open bin
/// with the least room that still fits it, else a new bin. With `spread = Some((big, n))`,
/// `n` empty bins are opened first and every document of at least `big` tokens goes to the
/// bin with the *most* room instead (worst fit), so long documents, and with them attention
/// cost (sum of L^2), are spread evenly before the short ones fill the gaps.
fn best_fit(
    lens: &[u32],
    budget: u32,
    spread: Option<(u32, usize)>,
    open: &mut BTreeSet<(u32, u32)>,
    fill: &mut Fill,
) {
    open.clear();
    fill.room.clear();
    fill.assign.clear();
    let (big, n_pre) = spread.unwrap_or((u32::MAX, 0));
    for b in 0..n_pre {
        fill.room.push(budget);
        open.insert((budget, b as u32));
    }
    // A bin with less room than the shortest document can take nothing more: out of the set.
    let shortest = lens[lens.len() - 1];
    for &len in lens {
        let found = if len >= big {
            open.last().copied().filter(|&(room, _)| room >= len)
        } else {
            open.range((len, 0)..).next().copied()
        };
        let b = match found {
            Some((room, b)) => {
                open.remove(&(room, b));
                fill.room[b as usize] = room - len;
                b
            }
            None => {
                fill.room.push(budget - len);
                (fill.room.len() - 1) as u32
            }
        };
        let room = fill.room[b as usize];
        if room >= shortest {
            open.insert((room, b));
        }
        fill.assign.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_off_front_keeps_both_halves() {
        let lengths = [1, 2, 3, 4, 5];
        let mut bins = Bins::new();
        bins.push(&[0, 1], &lengths);
        bins.push(&[2], &lengths);
        bins.push(&[3, 4], &lengths);
        let front = bins.split_off_front(2);
        assert_eq!(front.len(), 2);
        assert_eq!(front.bin(0), &[0, 1]);
        assert_eq!(front.bin(1), &[2]);
        assert_eq!(front.tokens, vec![3, 3]);
        assert_eq!(front.cost, vec![5, 9]);
        assert_eq!(bins.len(), 1);
        assert_eq!(bins.bin(0), &[3, 4]);
        assert_eq!(bins.tokens, vec![9]);
    }

    #[test]
    fn best_fit_fills_exactly() {
        // 6+4, 7+3, 5+5 fill three bins of 10 exactly.
        let lengths = [6, 4, 7, 3, 5, 5];
        let mut p = WindowPacker::new(&lengths, 10, 4);
        let mut out = Bins::new();
        p.pack(&[0, 1, 2, 3, 4, 5], false, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.tokens.iter().all(|&t| t == 10));
        assert_eq!(p.pool_tokens(), 0);
    }

    #[test]
    fn underfilled_bins_return_to_the_pool_until_the_last_window() {
        // Window 1: 6+3 closes (room 1 < shortest 3), the lone 6 (room 4) goes back.
        let lengths = [6, 6, 3, 4];
        let mut p = WindowPacker::new(&lengths, 10, 4);
        let mut out = Bins::new();
        p.pack(&[0, 1, 2], false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out.bin(0), &[0, 2]);
        assert_eq!(p.pool_tokens(), 6);
        p.pack(&[3], true, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out.bin(1), &[1, 3]);
        assert_eq!(out.tokens, vec![9, 10]);
    }

    #[test]
    fn long_documents_are_spread_over_the_bins() {
        // Four 4096-token documents and 192 of 256 tokens: exactly four full bins of 16384.
        // Plain BFD would put the four long ones together; spread, each bin gets one.
        let mut lengths = vec![4096u32; 4];
        lengths.extend(std::iter::repeat_n(256, 192));
        let ids: Vec<u32> = (0..lengths.len() as u32).rev().collect();
        let mut p = WindowPacker::new(&lengths, 16384, 4);
        let mut out = Bins::new();
        p.pack(&ids, false, &mut out);
        assert_eq!(out.len(), 4);
        for b in 0..4 {
            assert_eq!(out.tokens[b], 16384);
            assert_eq!(out.bin(b).iter().filter(|&&d| d < 4).count(), 1);
        }
        assert!(out.cost.iter().all(|&c| c == out.cost[0]));
    }

    #[test]
    fn the_pool_is_bounded() {
        // Every document is longer than B/2: no bin ever closes by filling up.
        let lengths = vec![6u32; 100];
        let ids: Vec<u32> = (0..100).collect();
        let mut p = WindowPacker::new(&lengths, 10, 3);
        let mut out = Bins::new();
        for chunk in ids.chunks(10) {
            p.pack(chunk, false, &mut out);
            assert!(p.pool_tokens() <= 3 * 6);
        }
        p.pack(&[], true, &mut out);
        assert_eq!(out.len(), 100);
    }
}
