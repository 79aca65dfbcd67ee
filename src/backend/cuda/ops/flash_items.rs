//! The flash kernels' work lists: the real (document, 64-row tile) pairs of a `cu_seqlens`,
//! longest work first, as int4 items `{start, len, tile, code}` (one block per item and head),
//! and their device copies, cached per batch on the backend.
//!
//! The dK/dV kernel's block for key tile `kt` of a document of `nq` tiles walks G query heads
//! times `nq - kt` query tiles, so the first tiles of a long document are long serial chains:
//! in TinyLlama's batches (G = 8) the longest chain was 1.4-1.8x a block slot's average share
//! of the kernel's work, and the kernel's time followed the chain. [`Split`] cuts such an item
//! into S parts by query head (`code` = S | part << 4 | slot << 8); each part writes f32
//! partial sums of dK and dV to its slot, and `flash_bwd_dkdv_reduce` adds the S slots of each
//! split item (listed in `splits` as `{start, len, tile, S | first slot << 8}`) in a fixed order.

use cudarc::driver::CudaSlice;

use super::flash_attention::TILE;
use crate::backend::cuda::{drv, CudaBackend};
use crate::backend::BackendError;

/// Work items `[start, len, tile, 0]` with their work, in document order. `work(len, tile)` is
/// a tile's cost in key-tile (forward) or query-tile (backward) steps.
fn items(cu: &[i32], work: impl Fn(usize, usize) -> usize) -> Vec<(usize, [i32; 4])> {
    let mut v: Vec<(usize, [i32; 4])> = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0], (w[1] - w[0]) as usize);
        for tile in 0..len.div_ceil(TILE) {
            v.push((work(len, tile), [start, len as i32, tile as i32, 0]));
        }
    }
    v
}

/// Flattened, longest work first (stable: equal work keeps document order).
fn longest_first(mut v: Vec<(usize, [i32; 4])>) -> Vec<i32> {
    v.sort_by_key(|&(w, _)| std::cmp::Reverse(w));
    v.into_iter().flat_map(|(_, it)| it).collect()
}

pub(super) fn fwd_items(cu: &[i32]) -> Vec<i32> {
    longest_first(items(cu, |_, tile| tile + 1))
}

/// How the dK/dV items are split (see the module doc). `slots` = blocks that run at once (SMs
/// times blocks per SM); 0 or `g` = 1: no split (the mma.sync kernels, or one query head per
/// kv head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Split {
    /// Query heads per kv head.
    pub g: usize,
    pub hkv: usize,
    pub slots: usize,
}

impl Split {
    pub(super) const NONE: Split = Split {
        g: 1,
        hkv: 1,
        slots: 0,
    };
}

/// Most parts of one split item (4 bits of the item code).
const MAX_PARTS: usize = 15;

/// The dK/dV items (work per block: query heads times query tiles) and the split items'
/// list, and the number of partial slots.
pub(super) fn bwd_items(cu: &[i32], split: Split) -> (Vec<i32>, Vec<i32>, usize) {
    let g = split.g.max(1);
    let whole = items(cu, |len, tile| g * (len.div_ceil(TILE) - tile));
    let total: usize = whole.iter().map(|(w, _)| w * split.hkv).sum();
    // A block slot's share of the work: a chain longer than it ends after the others.
    let target = match split.slots {
        0 => usize::MAX,
        n => total.div_ceil(n).max(1),
    };
    let (mut out, mut splits, mut slot) = (Vec::new(), Vec::new(), 0usize);
    for (work, it) in whole {
        let parts = (2..=g.min(MAX_PARTS))
            .find(|&p| g.is_multiple_of(p) && work.div_ceil(p) <= target)
            .or_else(|| (2..=g.min(MAX_PARTS)).rev().find(|&p| g.is_multiple_of(p)));
        match parts {
            Some(p) if work > target && slot < (1 << 22) => {
                let [start, len, tile, _] = it;
                splits.extend([start, len, tile, (p | slot << 8) as i32]);
                for part in 0..p {
                    let code = (p | part << 4 | (slot << 8)) as i32;
                    out.push((work / p, [start, len, tile, code]));
                }
                slot += p;
            }
            _ => out.push((work, it)),
        }
    }
    (longest_first(out), splits, slot)
}

/// Query rows of one warp-specialised forward unit (`flash_forward_ws.cu`: two consumer
/// warpgroups of 64 rows share each K and V tile).
pub(super) const WS_ROWS: usize = 2 * TILE;

/// The warp-specialised forward's 128-row query-tile items `[start, len, tile, 0]` with their
/// cost: the unit's key tiles (query tile i reads 64-key tiles 0 ..= 2 i + 1, or 2 i when its
/// second half is past the document), plus one for loading Q and storing O.
fn ws_items(cu: &[i32]) -> Vec<(usize, [i32; 4])> {
    let mut v = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0], (w[1] - w[0]) as usize);
        let key_tiles = len.div_ceil(TILE);
        for tile in 0..len.div_ceil(WS_ROWS) {
            let last = (2 * tile + 1).min(key_tiles - 1);
            v.push((last + 2, [start, len as i32, tile as i32, 0]));
        }
    }
    v
}

/// The warp-specialised dK/dV kernel's 128-row key-tile items `[start, len, tile, 0]` with their
/// cost: the steps of consumer 0, G query heads times the query tiles from its diagonal
/// (64-row tile 2 j) on, plus one for loading K and V and storing dK and dV.
fn ws_key_items(cu: &[i32], g: usize) -> Vec<(usize, [i32; 4])> {
    let mut v = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0], (w[1] - w[0]) as usize);
        let query_tiles = len.div_ceil(TILE);
        for tile in 0..len.div_ceil(WS_ROWS) {
            v.push((
                g * (query_tiles - 2 * tile) + 1,
                [start, len as i32, tile as i32, 0],
            ));
        }
    }
    v
}

/// A persistent warp-specialised kernel's schedule for `blocks` blocks: its items (int4,
/// longest first) and `sched` = `blocks + 1` offsets, then the units (`item * heads + head`).
/// Units are dealt longest first onto the least loaded block (LPT), so each block's list ends
/// near the same time; a block's units are in the order dealt.
fn lpt_schedule(
    mut items: Vec<(usize, [i32; 4])>,
    heads: usize,
    blocks: usize,
) -> (Vec<i32>, Vec<i32>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    items.sort_by_key(|&(w, _)| Reverse(w));
    let blocks = blocks.max(1);
    let mut load: BinaryHeap<Reverse<(usize, usize)>> =
        (0..blocks).map(|b| Reverse((0, b))).collect();
    let mut lists = vec![Vec::new(); blocks];
    for (i, &(work, _)) in items.iter().enumerate() {
        for h in 0..heads {
            if let Some(Reverse((l, b))) = load.pop() {
                lists[b].push((i * heads + h) as i32);
                load.push(Reverse((l + work, b)));
            }
        }
    }
    let mut sched = Vec::with_capacity(blocks + 1 + items.len() * heads);
    let mut off = 0i32;
    sched.push(0);
    for l in &lists {
        off += l.len() as i32;
        sched.push(off);
    }
    sched.extend(lists.into_iter().flatten());
    (items.into_iter().flat_map(|(_, it)| it).collect(), sched)
}

/// Which warp-specialised kernel a schedule is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WsKind {
    /// The forward: 128-row query tiles, one unit per query head.
    Forward,
    /// dK/dV: 128-row key tiles, one unit per kv head, `g` query heads each.
    DkDv { g: usize },
}

/// The schedule of `kind` for `heads` (query heads forward, kv heads for dK/dV).
pub(super) fn ws_schedule(
    cu: &[i32],
    kind: WsKind,
    heads: usize,
    blocks: usize,
) -> (Vec<i32>, Vec<i32>) {
    let items = match kind {
        WsKind::Forward => ws_items(cu),
        WsKind::DkDv { g } => ws_key_items(cu, g),
    };
    lpt_schedule(items, heads, blocks)
}

/// A warp-specialised kernel's schedule on the device, cached like [`ItemsCache`] for the last
/// (`cu_seqlens`, kind, heads, blocks); the forward and dK/dV have a cache each, since a
/// training step alternates them.
pub struct WsCache {
    cu: Vec<i32>,
    kind: WsKind,
    heads: usize,
    blocks: usize,
    pub(super) items: CudaSlice<i32>,
    pub(super) sched: CudaSlice<i32>,
}

/// Run `f` with the device schedule of `kind`.
pub(super) fn with_ws_schedule<R>(
    be: &CudaBackend,
    cu: &[i32],
    kind: WsKind,
    heads: usize,
    blocks: usize,
    op: &'static str,
    f: impl FnOnce(&WsCache) -> Result<R, BackendError>,
) -> Result<R, BackendError> {
    let slot = match kind {
        WsKind::Forward => &be.flash_ws,
        WsKind::DkDv { .. } => &be.flash_ws_bwd,
    };
    let mut cache = slot
        .lock()
        .map_err(|_| shape(op, "schedule cache poisoned by an earlier panic".into()))?;
    if cache
        .as_ref()
        .is_none_or(|c| c.cu != cu || c.kind != kind || c.heads != heads || c.blocks != blocks)
    {
        let (items, sched) = ws_schedule(cu, kind, heads, blocks);
        let upload = |list: &[i32]| {
            be.stream
                .clone_htod(if list.is_empty() { &[0][..] } else { list })
                .map_err(drv(op))
        };
        *cache = Some(WsCache {
            cu: cu.to_vec(),
            kind,
            heads,
            blocks,
            items: upload(&items)?,
            sched: upload(&sched)?,
        });
    }
    let c = cache
        .as_ref()
        .ok_or_else(|| shape(op, "schedule cache empty".into()))?;
    f(c)
}

/// The work lists of one `cu_seqlens` on the device: every layer of a micro-batch (forward,
/// backward, recompute) attends over the same documents, so the lists are built and uploaded
/// once per batch instead of three times per layer (a pageable host-to-device copy each).
pub struct ItemsCache {
    cu: Vec<i32>,
    split: Split,
    /// Query-tile items (forward and dQ) and key-tile items (dK/dV), and their counts.
    pub(super) fwd: (CudaSlice<i32>, usize),
    pub(super) bwd: (CudaSlice<i32>, usize),
    /// The split dK/dV items, their count and the partial slots they use.
    pub(super) splits: (CudaSlice<i32>, usize, usize),
}

/// Run `f` with the device work lists of `cu` and `split` (from the backend's cache when they
/// are the ones it was built for).
pub(super) fn with_items<R>(
    be: &CudaBackend,
    cu: &[i32],
    split: Split,
    op: &'static str,
    f: impl FnOnce(&ItemsCache) -> Result<R, BackendError>,
) -> Result<R, BackendError> {
    let mut cache = be
        .flash_items
        .lock()
        .map_err(|_| shape(op, "work-list cache poisoned by an earlier panic".into()))?;
    if cache
        .as_ref()
        .is_none_or(|c| c.cu != cu || c.split != split)
    {
        let upload = |list: Vec<i32>| -> Result<(CudaSlice<i32>, usize), BackendError> {
            let n = list.len() / 4;
            // An empty list still gets a (one-element) buffer; its count says there is no work.
            let dev = be
                .stream
                .clone_htod(if list.is_empty() { &[0][..] } else { &list[..] })
                .map_err(drv(op))?;
            Ok((dev, n))
        };
        let (bwd, splits, slots) = bwd_items(cu, split);
        let (splits_dev, n_splits) = upload(splits)?;
        *cache = Some(ItemsCache {
            cu: cu.to_vec(),
            split,
            fwd: upload(fwd_items(cu))?,
            bwd: upload(bwd)?,
            splits: (splits_dev, n_splits, slots),
        });
    }
    let c = cache
        .as_ref()
        .ok_or_else(|| shape(op, "work-list cache empty".into()))?;
    f(c)
}

fn shape(op: &'static str, message: String) -> BackendError {
    BackendError::Shape { op, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_lists_cover_every_tile_longest_first() {
        let cu = [0, 1, 1, 130, 194, 600];
        let f = fwd_items(&cu);
        let (b, splits, slots) = bwd_items(&cu, Split::NONE);
        assert!(splits.is_empty() && slots == 0);
        // Tiles: 1 + 0 + 3 (129 rows) + 1 (64) + 7 (406) = 12.
        assert_eq!(f.len(), 12 * 4);
        assert_eq!(b.len(), 12 * 4);
        let fw: Vec<i32> = f.chunks(4).map(|c| c[2] + 1).collect();
        assert!(fw.windows(2).all(|w| w[0] >= w[1]), "{fw:?}");
        assert_eq!(&f[..4], &[194, 406, 6, 0]);
        let bw: Vec<i32> = b
            .chunks(4)
            .map(|c| (c[1] as usize).div_ceil(TILE) as i32 - c[2])
            .collect();
        assert!(bw.windows(2).all(|w| w[0] >= w[1]), "{bw:?}");
        assert_eq!(&b[..4], &[194, 406, 0, 0]);
        // Every (document, tile) exactly once, no empty document.
        let mut seen: Vec<(i32, i32)> = f.chunks(4).map(|c| (c[0], c[2])).collect();
        seen.sort();
        let mut want = vec![(0, 0)];
        want.extend((0..3).map(|t| (1, t)));
        want.push((130, 0));
        want.extend((0..7).map(|t| (194, t)));
        assert_eq!(seen, want);
        assert!(fwd_items(&[0, 0, 0]).is_empty());
    }

    /// The warp-specialised kernels' schedules (forward, dK/dV): every (128-row tile, head) unit once,
    /// on exactly one block; the items cover every query tile of every document, longest
    /// first; and dealing longest first onto the least loaded block leaves no block more than
    /// one unit's cost above another (the LPT bound).
    #[test]
    fn ws_schedule_deals_every_unit_once_and_balanced() {
        let lens = [4096usize, 300, 1, 700, 64, 2000, 90, 129, 128];
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let kinds = [
            WsKind::Forward,
            WsKind::DkDv { g: 4 },
            WsKind::DkDv { g: 1 },
        ];
        for (kind, heads, blocks) in kinds
            .into_iter()
            .flat_map(|k| [(16usize, 132usize), (32, 7), (1, 1), (4, 1000)].map(|(h, b)| (k, h, b)))
        {
            let (items, sched) = ws_schedule(&cu, kind, heads, blocks);
            let n_items = items.len() / 4;
            let want: usize = lens.iter().map(|l| l.div_ceil(WS_ROWS)).sum();
            assert_eq!(n_items, want);
            // Forward: key tiles 0 ..= 2 i + 1 (2 i when the tile's second half is past the
            // document), plus one; dK/dV: G x query tiles from 2 i on, plus one.
            let cost = |i: usize| {
                let (len, tile) = (items[4 * i + 1] as usize, items[4 * i + 2] as usize);
                match kind {
                    WsKind::Forward => (2 * tile + 1).min(len.div_ceil(TILE) - 1) + 2,
                    WsKind::DkDv { g } => g * (len.div_ceil(TILE) - 2 * tile) + 1,
                }
            };
            assert!((1..n_items).all(|i| cost(i - 1) >= cost(i)));
            let mut tiles: Vec<(i32, i32)> = items.chunks(4).map(|c| (c[0], c[2])).collect();
            tiles.sort();
            tiles.dedup();
            assert_eq!(tiles.len(), n_items);
            let (off, units) = sched.split_at(blocks + 1);
            assert_eq!(off[0], 0);
            assert!(off.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(off[blocks] as usize, units.len());
            let mut seen = units.to_vec();
            seen.sort();
            assert_eq!(seen, (0..(n_items * heads) as i32).collect::<Vec<_>>());
            let loads: Vec<usize> = off
                .windows(2)
                .map(|w| {
                    units[w[0] as usize..w[1] as usize]
                        .iter()
                        .map(|&u| cost(u as usize / heads))
                        .sum()
                })
                .collect();
            let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(
                hi - lo <= cost(0),
                "heads {heads} blocks {blocks}: {lo} .. {hi}"
            );
        }
        let (items, sched) = ws_schedule(&[0, 0], WsKind::Forward, 8, 4);
        assert!(items.is_empty() && sched == [0, 0, 0, 0, 0]);
    }

    /// Split dK/dV items: every (document, key tile) is one whole item or S parts (S dividing
    /// G) numbered 0..S that share one first slot, so their query heads (part p: p G/S ..
    /// (p + 1) G/S) cover 0..G once and their slots are theirs alone; the split list names
    /// exactly those tiles with their S and first slot, slots in order; no block's work
    /// exceeds a block slot's share (here S = G always gets there); longest first.
    #[test]
    fn split_items_cover_every_head_once() {
        use std::collections::BTreeMap;
        // One long document among short ones, as TinyLlama's batches have them.
        let lens = [4096usize, 300, 1, 700, 64, 2000, 90];
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        for (g, hkv, slots) in [
            (8usize, 4usize, 396usize),
            (4, 4, 264),
            (8, 4, 4000),
            (1, 32, 396),
            (8, 4, 0),
        ] {
            let split = Split { g, hkv, slots };
            let (b, splits, n_slots) = bwd_items(&cu, split);
            let tiles: usize = lens.iter().map(|l| l.div_ceil(TILE)).sum();
            // (start, tile) -> (len, [(S, part, first slot)]) over the blocks' items.
            let mut seen = BTreeMap::<(i32, i32), (i32, Vec<(usize, usize, usize)>)>::new();
            let mut per_block = Vec::new();
            for c in b.chunks(4) {
                let (start, len, tile, code) = (c[0], c[1], c[2], c[3] as usize);
                let span = (len as usize).div_ceil(TILE) - tile as usize;
                let (parts, part, slot) = match code {
                    0 => (1, 0, usize::MAX),
                    _ => (code & 15, (code >> 4) & 15, code >> 8),
                };
                assert!(parts >= 1 && g.is_multiple_of(parts), "{code:#x}");
                per_block.push(g / parts * span);
                let e = seen.entry((start, tile)).or_insert((len, Vec::new()));
                assert_eq!(e.0, len);
                e.1.push((parts, part, slot));
            }
            assert_eq!(seen.len(), tiles, "G {g}");
            let mut listed = BTreeMap::new();
            for c in splits.chunks(4) {
                listed.insert(
                    (c[0], c[2]),
                    (c[1], (c[3] & 255) as usize, (c[3] >> 8) as usize),
                );
            }
            let mut used = vec![0usize; n_slots];
            for (&key, (len, ps)) in &seen {
                let s = ps[0].0;
                let mut idx: Vec<usize> = ps.iter().map(|p| p.1).collect();
                idx.sort();
                assert_eq!(
                    idx,
                    (0..s).collect::<Vec<_>>(),
                    "G {g} {key:?}: parts {ps:?}"
                );
                assert!(ps.iter().all(|p| p.0 == s && p.2 == ps[0].2), "{ps:?}");
                if s > 1 {
                    assert_eq!(listed.get(&key), Some(&(*len, s, ps[0].2)), "G {g} {key:?}");
                    for p in ps {
                        used[p.2 + p.1] += 1;
                    }
                } else {
                    assert!(!listed.contains_key(&key));
                }
            }
            assert_eq!(listed.len(), seen.values().filter(|v| v.1[0].0 > 1).count());
            assert!(used.iter().all(|&u| u == 1), "G {g}: slots {used:?}");
            assert!(per_block.windows(2).all(|w| w[0] >= w[1]));
            let total: usize = seen
                .iter()
                .map(|(&(_, tile), (len, _))| {
                    g * ((*len as usize).div_ceil(TILE) - tile as usize) * hkv
                })
                .sum();
            match slots {
                n if n > 0 && g > 1 => {
                    assert!(
                        !splits.is_empty(),
                        "G {g}: the 4096 document's first tiles split"
                    );
                    // With 4000 slots the share is ~20 steps: the 4096 document's first tile
                    // (512 steps) is cut into 8 parts of 64, above it: S = G is the most there is.
                    let share = total.div_ceil(n);
                    let floor = seen
                        .iter()
                        .map(|(&(_, tile), (len, _))| {
                            (*len as usize).div_ceil(TILE) - tile as usize
                        })
                        .max()
                        .unwrap_or(0);
                    assert!(
                        per_block[0] <= share.max(floor),
                        "{} > {share}",
                        per_block[0]
                    );
                }
                _ => assert!(splits.is_empty() && n_slots == 0),
            }
            // The split list's slots come in order.
            let mut next = 0;
            for c in splits.chunks(4) {
                let (parts, first) = ((c[3] & 255) as usize, (c[3] >> 8) as usize);
                assert_eq!(first, next);
                next += parts;
            }
            assert_eq!(next, n_slots);
        }
    }
}
