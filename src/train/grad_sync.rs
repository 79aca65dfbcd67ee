//! Gradients and shards across ranks: the `GradSync` a run picks at startup (host-staged
//! through the communicator for CPU/MPI ranks, NCCL on device buffers for CUDA ranks), the
//! bucketing of the all-reduce, and the ZeRO-1 reduce-scatter / all-gather.

use std::ops::Range;

use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::config::Config;
use crate::dist::nccl::Collective;
use crate::dist::{Comm, DistError};
use crate::model::ParamLayout;

use super::optimizer::{AdamW, HostMoments};
use super::TrainError;

// ------------------------------------------------------------ gradients and shards across ranks
//
// The host path: gradients and weights go through host buffers to the communicator (the CPU
// backend's buffers are host memory already).

/// Elements of each consecutive segment of a layout-order flat buffer, one per shard.
pub(super) fn shard_counts(layout: &ParamLayout, shards: &[Range<usize>]) -> Vec<usize> {
    shards
        .iter()
        .map(|r| layout.specs[r.clone()].iter().map(|s| s.numel()).sum())
        .collect()
}

/// Start of each tensor in a layout-order flat buffer.
pub(super) fn tensor_offsets(layout: &ParamLayout) -> Vec<usize> {
    let mut at = 0;
    layout
        .specs
        .iter()
        .map(|s| {
            let o = at;
            at += s.numel();
            o
        })
        .collect()
}

/// How a step's gradients are summed across ranks (without ZeRO-1), chosen at startup:
/// [`HostStaged`] (any backend: through host buffers and the host [`Comm`]; the CPU, TCP and
/// MPI path) or [`NcclGradSync`] (the CUDA backend: NCCL on the device buffers).
pub trait GradSync<B: Backend> {
    fn name(&self) -> &'static str;
    /// Sum `grads` (layout order) across ranks. May only queue the work on the device; it is
    /// complete once the backend is synchronised.
    fn all_reduce(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        grads: &mut [B::Buf],
    ) -> Result<(), TrainError>;
    /// During the last micro-step's backward: the gradients of tensors `ready_from..` (layout
    /// order) are final, so a sync may start summing them while the backward of the earlier
    /// layers runs. `all_reduce` still follows and completes the rest. The default waits for it.
    fn grads_ready(
        &self,
        _be: &B,
        _layout: &ParamLayout,
        _grads: &mut [B::Buf],
        _ready_from: usize,
    ) -> Result<(), TrainError> {
        Ok(())
    }
    /// ZeRO-1: sum each tensor's gradient into its owner (rank r owns `shards[r]`), completing
    /// what `grads_ready` started; afterwards this rank's gradients of `shards[rank]` are the
    /// global sums (the others are left unspecified). The default goes through host buffers.
    fn reduce_to_owners(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        grads: &mut [B::Buf],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        reduce_scatter_grads(be, comm, layout, grads, shards)
    }
    /// ZeRO-1: every rank's updated shard of the weights to every rank. The default goes
    /// through host buffers.
    fn gather_params(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        params: &mut [B::Buf],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        all_gather_params(be, comm, layout, params, shards)
    }
    /// ZeRO-1, after the update: make every rank's weights equal again for the next forward.
    /// A sync may send only what the forward reads (the working copies of the GEMM matrices,
    /// whose f32 masters then stay stale on the ranks that do not own them until
    /// [`GradSync::masters_current`]), and leave it in flight until
    /// [`GradSync::weights_ready`]. The default is `gather_params` (the masters, waited for),
    /// then every working copy rounded again from its master (which matters on a CUDA run
    /// with `PACKTRAIN_GRAD_SYNC=host`, for the tensors other ranks updated; for its own, the
    /// rounding gives the bits AdamW wrote).
    fn gather_weights(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        params: &mut [B::Buf],
        working: &mut [Option<B::Buf>],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        self.gather_params(be, comm, layout, params, shards)?;
        for ((w, p), spec) in working.iter_mut().zip(params.iter()).zip(&layout.specs) {
            if let Some(w) = w {
                be.copy(w, p, spec.numel())?;
            }
        }
        Ok(())
    }
    /// ZeRO-1: make every rank's f32 masters current and nothing of `gather_weights` still in
    /// flight (before a checkpoint or the final weights read them). A collective: every rank
    /// calls it at the same points. The default's masters are always current.
    fn masters_current(
        &self,
        _be: &B,
        _comm: &dyn Comm,
        _layout: &ParamLayout,
        _params: &mut [B::Buf],
        _shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        Ok(())
    }
    /// Every tensor's AdamW moments on rank 0, `None` on the others (for a checkpoint). Under
    /// ZeRO-1 (`shards`) the owners' moments are gathered, so every rank calls it at the same
    /// point. The default goes through the host communicator.
    fn moments_on_root(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        opt: &AdamW<B>,
        shards: Option<&[Range<usize>]>,
    ) -> Result<Option<HostMoments>, TrainError> {
        moments_on_root(be, comm, layout, opt, shards)
    }
    /// The forward is about to read the weights of forward stage `stage`
    /// ([`ParamLayout::forward_stages`]; `usize::MAX`: all of them): the compute stream must
    /// wait for whatever of them `gather_weights` left in flight. The default has nothing to
    /// wait for.
    fn weights_ready(&self, _be: &B, _stage: usize) -> Result<(), TrainError> {
        Ok(())
    }
    /// The step's compute stream has finished (the backend was synchronised); a ZeRO-1
    /// weight gather may still be in flight.
    fn step_done(&self) {}
    /// The loop is leaving on an error: stop any collective in flight (never waits for peers).
    fn abort(&self) {}
}

/// Calls [`GradSync::abort`] when dropped before the loop finished (an error leaves it).
pub(super) struct AbortOnError<'a, B: Backend> {
    pub(super) sync: &'a dyn GradSync<B>,
    pub(super) finished: bool,
}

impl<B: Backend> Drop for AbortOnError<'_, B> {
    fn drop(&mut self) {
        if !self.finished {
            self.sync.abort();
        }
    }
}

/// Gradients through host buffers: download, [`Comm::all_reduce_sum`] in buckets of
/// `dist.bucket_mb`, upload (the CPU backend's buffers are host memory already).
#[derive(Debug, Clone, Copy)]
pub struct HostStaged {
    bucket_floats: usize,
}

impl HostStaged {
    pub fn new(cfg: &Config) -> Self {
        Self {
            bucket_floats: bucket_floats(cfg),
        }
    }
}

pub(super) fn bucket_floats(cfg: &Config) -> usize {
    ((cfg.dist.bucket_mb << 20) / std::mem::size_of::<f32>()).max(1)
}

impl<B: Backend> GradSync<B> for HostStaged {
    fn name(&self) -> &'static str {
        "host"
    }
    fn all_reduce(
        &self,
        be: &B,
        comm: &dyn Comm,
        layout: &ParamLayout,
        grads: &mut [B::Buf],
    ) -> Result<(), TrainError> {
        all_reduce_grads(be, comm, layout, grads, self.bucket_floats)
    }
}

/// Consecutive tensors in groups whose `sizes` add up to at most `limit` (a larger tensor
/// alone).
pub(super) fn buckets(sizes: &[usize], limit: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sizes.len() {
        let (mut j, mut total) = (i, 0);
        while j < sizes.len() && (j == i || total + sizes[j] <= limit) {
            total += sizes[j];
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// Gradients summed by NCCL on the device, in place, one NCCL group (one launch) per bucket of
/// `dist.bucket_mb`, on NCCL's own stream (no copies, no host round trip). Buckets go from the
/// last tensor of the layout down, each as soon as the backward has finished its layers
/// ([`GradSync::grads_ready`]), so the sums overlap the backward of the earlier layers; the
/// compute stream waits for them only in `all_reduce` (or `reduce_to_owners`), before the norm
/// and the optimizer. Under ZeRO-1 (`dist.zero1`) each tensor is reduced into its owner only
/// (`ncclReduce`, half an all-reduce's traffic), and after the update every owner broadcasts
/// what the next forward reads of its tensors (`gather_weights`: the bf16 working copy of a
/// GEMM matrix, else the f32 master), one NCCL group per forward stage, each followed by an
/// event the forward waits for just before that stage (`weights_ready`): the broadcast of
/// layer l + 1 overlaps the forward of layer l. The watchdog of
/// [`crate::dist::nccl::NcclComm`] times them.
pub struct NcclGradSync {
    nccl: crate::dist::nccl::NcclComm,
    /// `dist.bucket_mb` in bytes (bf16 gradients fit twice the elements of f32 ones).
    bucket_bytes: usize,
    /// ZeRO-1: the rank owning each tensor (the shards of `optimizer::shard_ranges`).
    owners: Option<Vec<usize>>,
    /// Buckets of this step already started, counted from the last one.
    started: std::cell::Cell<usize>,
    /// Element counts of the layout's tensors and their buckets, computed on the first call
    /// (the layout and the gradients' precisions of a run never change; `grads_ready` runs
    /// once per layer per step).
    plan: std::cell::OnceCell<(Vec<usize>, Vec<Range<usize>>)>,
    /// ZeRO-1: the weight broadcasts in flight, (forward stage, event after its group), in
    /// stage order.
    pending: std::cell::RefCell<std::collections::VecDeque<(usize, cudarc::driver::CudaEvent)>>,
    /// ZeRO-1: working copies travelled instead of masters since the masters were last gathered.
    /// The same on every rank (the same calls set and clear it).
    masters_stale: std::cell::Cell<bool>,
}

/// A CUDA buffer as NCCL addresses it.
fn nccl_buf(be: &CudaBackend, b: &crate::backend::cuda::CudaBuf) -> crate::dist::nccl::DeviceBuf {
    use crate::backend::cuda::DType;
    crate::dist::nccl::DeviceBuf {
        ptr: be.raw(b),
        len: b.len(),
        elem: match b.dtype() {
            DType::F32 => crate::dist::nccl::Elem::F32,
            DType::Bf16 => crate::dist::nccl::Elem::Bf16,
        },
    }
}

impl NcclGradSync {
    pub fn new(be: &CudaBackend, cfg: &Config, comm: &dyn Comm) -> Result<Self, TrainError> {
        let timeout = std::time::Duration::from_secs(cfg.dist.timeout_s);
        let nccl =
            crate::dist::nccl::NcclComm::new(comm, be.ctx.clone(), be.stream.clone(), timeout)?;
        let v = nccl.version();
        tracing::info!(
            rank = nccl.rank(),
            world = nccl.world_size(),
            nccl = format_args!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            bucket_mb = cfg.dist.bucket_mb,
            "NCCL communicator"
        );
        let world = comm.world_size();
        let owners = (cfg.dist.zero1 && world > 1).then(|| {
            let layout = ParamLayout::new(&cfg.model);
            let numels: Vec<usize> = layout.specs.iter().map(|s| s.numel()).collect();
            let mut owner = vec![0; numels.len()];
            for (r, range) in super::optimizer::shard_ranges(&numels, world)
                .into_iter()
                .enumerate()
            {
                owner[range].fill(r);
            }
            owner
        });
        Ok(Self {
            nccl,
            bucket_bytes: bucket_floats(cfg) * std::mem::size_of::<f32>(),
            owners,
            started: std::cell::Cell::new(0),
            plan: std::cell::OnceCell::new(),
            pending: Default::default(),
            masters_stale: std::cell::Cell::new(false),
        })
    }

    /// Start every bucket not started yet whose tensors all lie in `ready_from..`, last first.
    fn start_ready(
        &self,
        be: &CudaBackend,
        layout: &ParamLayout,
        grads: &mut [crate::backend::cuda::CudaBuf],
        ready_from: usize,
    ) -> Result<(), TrainError> {
        let (numels, all) = self.plan.get_or_init(|| {
            let numels: Vec<usize> = layout.specs.iter().map(|s| s.numel()).collect();
            let bytes: Vec<usize> = numels
                .iter()
                .zip(grads.iter())
                .map(|(n, g)| n * g.dtype().size())
                .collect();
            let all = buckets(&bytes, self.bucket_bytes);
            (numels, all)
        });
        for b in all.iter().rev().skip(self.started.get()) {
            if b.start < ready_from {
                break;
            }
            let op = |i: usize| match &self.owners {
                None => Collective::AllReduceSum,
                Some(owner) => Collective::ReduceSum { root: owner[i] },
            };
            // f32 gradients, or bf16 ones (`Llama::with_act_grads`), summed in their precision.
            let ops: Vec<_> = grads[b.clone()]
                .iter()
                .zip(b.clone())
                .map(|(g, i)| (nccl_buf(be, g), numels[i], op(i)))
                .collect();
            // SAFETY: the gradients live for the whole run; the compute stream waits for these
            // sums (`wait_for_collectives`) before the norm or AdamW reads the gradients, and
            // the next backward writes them only after that.
            unsafe { self.nccl.group_start_raw(&ops, "the gradient sum")? };
            self.started.set(self.started.get() + 1);
        }
        Ok(())
    }
}

impl GradSync<CudaBackend> for NcclGradSync {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn grads_ready(
        &self,
        be: &CudaBackend,
        layout: &ParamLayout,
        grads: &mut [crate::backend::cuda::CudaBuf],
        ready_from: usize,
    ) -> Result<(), TrainError> {
        self.start_ready(be, layout, grads, ready_from)
    }
    fn all_reduce(
        &self,
        be: &CudaBackend,
        _comm: &dyn Comm,
        layout: &ParamLayout,
        grads: &mut [crate::backend::cuda::CudaBuf],
    ) -> Result<(), TrainError> {
        let started = self.start_ready(be, layout, grads, 0);
        self.started.set(0);
        started?;
        Ok(self.nccl.wait_for_collectives()?)
    }
    fn reduce_to_owners(
        &self,
        be: &CudaBackend,
        comm: &dyn Comm,
        layout: &ParamLayout,
        grads: &mut [crate::backend::cuda::CudaBuf],
        _shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        // The buckets reduce into the owners already (`owners`); finish them.
        self.all_reduce(be, comm, layout, grads)
    }
    fn gather_params(
        &self,
        _be: &CudaBackend,
        _comm: &dyn Comm,
        layout: &ParamLayout,
        params: &mut [crate::backend::cuda::CudaBuf],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        let mut ops = Vec::with_capacity(params.len());
        for (i, p) in params.iter_mut().enumerate() {
            // A tensor in no shard (none: the shards cover the layout) stays as it is.
            let Some(root) = shards.iter().position(|r| r.contains(&i)) else {
                continue;
            };
            let n = layout.specs[i].numel();
            ops.push((
                p.f32_mut("weight broadcast")?,
                n,
                Collective::Broadcast { root },
            ));
        }
        self.nccl.group_start(&mut ops, "the weight broadcast")?;
        Ok(self.nccl.wait_for_collectives()?)
    }
    fn gather_weights(
        &self,
        be: &CudaBackend,
        _comm: &dyn Comm,
        layout: &ParamLayout,
        params: &mut [crate::backend::cuda::CudaBuf],
        working: &mut [Option<crate::backend::cuda::CudaBuf>],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        let stages = layout.forward_stages();
        let n_stages = stages.iter().max().map_or(0, |&s| s + 1);
        let mut pending = self.pending.borrow_mut();
        for stage in 0..n_stages {
            let mut ops = Vec::new();
            for i in (0..params.len()).filter(|&i| stages[i] == stage) {
                // A tensor in no shard (none: the shards cover the layout) stays as it is.
                let Some(root) = shards.iter().position(|r| r.contains(&i)) else {
                    continue;
                };
                // The forward reads the GEMM matrices' working copies, and the f32 masters of
                // everything else: the embedding (also when it is the tied lm_head, which then
                // travels both ways), the norms and biases.
                let n = layout.specs[i].numel();
                let op = Collective::Broadcast { root };
                let w = working.get(i).and_then(Option::as_ref);
                if let Some(w) = w {
                    ops.push((nccl_buf(be, w), n, op));
                }
                if w.is_none() || i == layout.embed {
                    ops.push((nccl_buf(be, &params[i]), n, op));
                } else {
                    self.masters_stale.set(true);
                }
            }
            if ops.is_empty() {
                continue;
            }
            // SAFETY: the model's parameters and working copies live for the whole run; the
            // compute stream waits for a stage's event before anything reads or writes its
            // buffers again (the forward at that stage, `weights_ready`; a checkpoint or the end
            // of the run, `masters_current`), and the optimizer writes them only after that.
            unsafe { self.nccl.group_start_raw(&ops, "the weight broadcast")? };
            pending.push_back((stage, self.nccl.record_done()?));
        }
        Ok(())
    }
    fn masters_current(
        &self,
        be: &CudaBackend,
        comm: &dyn Comm,
        layout: &ParamLayout,
        params: &mut [crate::backend::cuda::CudaBuf],
        shards: &[Range<usize>],
    ) -> Result<(), TrainError> {
        let (pending, stale) = (!self.pending.borrow().is_empty(), self.masters_stale.get());
        if !pending && !stale {
            return Ok(());
        }
        // What the last gather left in flight lands before anything reads it.
        self.weights_ready(be, usize::MAX)?;
        if stale {
            self.gather_params(be, comm, layout, params, shards)?;
        }
        be.synchronize()?;
        self.step_done();
        self.masters_stale.set(false);
        Ok(())
    }
    /// Under ZeRO-1 each moment tensor goes from its owner to rank 0 by `ncclBroadcast` (one
    /// tensor at a time through a scratch buffer of the largest tensor's size on the ranks that
    /// do not own it), and rank 0 downloads it. Why: through the host rendezvous every byte of
    /// the moments (8.8 GB for TinyLlama) crossed the TCP sockets to rank 0, which on a cluster
    /// is the node's network link, not NVLink or InfiniBand.
    fn moments_on_root(
        &self,
        be: &CudaBackend,
        comm: &dyn Comm,
        layout: &ParamLayout,
        opt: &AdamW<CudaBackend>,
        shards: Option<&[Range<usize>]>,
    ) -> Result<Option<HostMoments>, TrainError> {
        let (Some(_), Some(owners)) = (shards, self.owners.as_ref()) else {
            return moments_on_root(be, comm, layout, opt, shards);
        };
        let (rank, root) = (comm.rank(), 0usize);
        let largest = layout.specs.iter().map(|s| s.numel()).max().unwrap_or(0);
        let scratch = be.alloc(largest.max(1))?;
        let mut out: HostMoments = (Vec::new(), Vec::new());
        for (i, spec) in layout.specs.iter().enumerate() {
            let (n, owner) = (spec.numel(), owners[i]);
            let mine = opt.owned.contains(&i);
            for (moments, host) in [(&opt.m, &mut out.0), (&opt.v, &mut out.1)] {
                let own = mine.then(|| &moments[i - opt.owned.start]);
                if owner != root {
                    let buf = nccl_buf(be, own.unwrap_or(&scratch));
                    let op = Collective::Broadcast { root: owner };
                    // SAFETY: `scratch` and the owner's moment live until the end of this call,
                    // which waits for the broadcast (`wait_for_collectives`, then a download or
                    // synchronize on the compute stream) before either is read or freed.
                    unsafe {
                        self.nccl
                            .group_start_raw(&[(buf, n, op)], "the moments' gather")?
                    };
                    self.nccl.wait_for_collectives()?;
                }
                if rank == root {
                    host.push(be.download(own.unwrap_or(&scratch), n)?);
                }
            }
        }
        be.synchronize()?;
        self.nccl.disarm();
        Ok((rank == root).then_some(out))
    }
    fn weights_ready(&self, _be: &CudaBackend, stage: usize) -> Result<(), TrainError> {
        let mut pending = self.pending.borrow_mut();
        while pending.front().is_some_and(|&(s, _)| s <= stage) {
            if let Some((_, event)) = pending.pop_front() {
                self.nccl.compute_waits(&event)?;
            }
        }
        Ok(())
    }
    fn step_done(&self) {
        self.nccl.disarm();
        // The weight broadcasts this step queued (ZeRO-1) are still in flight: time them from
        // now until a later synchronize (the end of the next step, whose forward waits for
        // them; so under ZeRO-1 one deadline covers a whole step, not only its collectives).
        if !self.pending.borrow().is_empty() {
            self.nccl.arm("the weight broadcast");
        }
    }
    fn abort(&self) {
        self.nccl.abort();
    }
}

/// The gradient sync of a CUDA run: NCCL for world > 1 (with ZeRO-1 too), unless
/// `PACKTRAIN_GRAD_SYNC=host` asks for the host path (for comparisons, or where NCCL is
/// missing).
pub fn cuda_grad_sync(
    be: &CudaBackend,
    cfg: &Config,
    comm: &dyn Comm,
) -> Result<Box<dyn GradSync<CudaBackend>>, TrainError> {
    let host = Box::new(HostStaged::new(cfg));
    if comm.world_size() == 1 {
        return Ok(host);
    }
    match std::env::var("PACKTRAIN_GRAD_SYNC").ok().as_deref() {
        Some("host") => {
            tracing::warn!("PACKTRAIN_GRAD_SYNC=host: device gradients go through host buffers");
            Ok(host)
        }
        None | Some("") | Some("nccl") => Ok(Box::new(NcclGradSync::new(be, cfg, comm)?)),
        Some(other) => Err(TrainError::Dist(DistError::Environment(format!(
            "PACKTRAIN_GRAD_SYNC={other:?}: expected \"nccl\" (the default on GPUs) or \"host\""
        )))),
    }
}

/// Sum every gradient across ranks: consecutive tensors share one all-reduce of at most
/// `bucket_floats` elements (`dist.bucket_mb`; a larger tensor goes alone).
pub(super) fn all_reduce_grads<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    layout: &ParamLayout,
    grads: &mut [B::Buf],
    bucket_floats: usize,
) -> Result<(), TrainError> {
    let n = layout.specs.len();
    let mut host = Vec::new();
    let mut i = 0;
    while i < n {
        host.clear();
        let mut j = i;
        while j < n && (j == i || host.len() + layout.specs[j].numel() <= bucket_floats) {
            host.extend(be.download(&grads[j], layout.specs[j].numel())?);
            j += 1;
        }
        comm.all_reduce_sum(&mut host)?;
        let mut at = 0;
        for (grad, spec) in grads[i..j].iter_mut().zip(&layout.specs[i..j]) {
            be.upload(grad, &host[at..at + spec.numel()])?;
            at += spec.numel();
        }
        i = j;
    }
    Ok(())
}

/// ZeRO-1: sum the gradients across ranks into their owners; afterwards this rank's gradients
/// of the tensors `shards[rank]` are the global sums (the others stay local and unused).
pub(super) fn reduce_scatter_grads<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    layout: &ParamLayout,
    grads: &mut [B::Buf],
    shards: &[Range<usize>],
) -> Result<(), TrainError> {
    let mut flat = Vec::with_capacity(layout.numel());
    for (g, s) in grads.iter().zip(&layout.specs) {
        flat.extend(be.download(g, s.numel())?);
    }
    comm.reduce_scatter_sum(&mut flat, &shard_counts(layout, shards))?;
    let off = tensor_offsets(layout);
    for i in shards[comm.rank()].clone() {
        let n = layout.specs[i].numel();
        be.upload(&mut grads[i], &flat[off[i]..off[i] + n])?;
    }
    Ok(())
}

/// ZeRO-1: every rank's updated shard of the weights to every rank.
pub(super) fn all_gather_params<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    layout: &ParamLayout,
    params: &mut [B::Buf],
    shards: &[Range<usize>],
) -> Result<(), TrainError> {
    let off = tensor_offsets(layout);
    let mine = shards[comm.rank()].clone();
    let mut flat = vec![0.0f32; layout.numel()];
    for i in mine.clone() {
        let n = layout.specs[i].numel();
        flat[off[i]..off[i] + n].copy_from_slice(&be.download(&params[i], n)?);
    }
    comm.all_gather(&mut flat, &shard_counts(layout, shards))?;
    for (i, p) in params.iter_mut().enumerate() {
        if !mine.contains(&i) {
            let n = layout.specs[i].numel();
            be.upload(p, &flat[off[i]..off[i] + n])?;
        }
    }
    Ok(())
}

/// Every tensor's AdamW moments on rank 0, `None` on the others. Under ZeRO-1 the shards are
/// gathered, so every rank must call this at the same point.
pub(super) fn moments_on_root<B: Backend>(
    be: &B,
    comm: &dyn Comm,
    layout: &ParamLayout,
    opt: &AdamW<B>,
    shards: Option<&[Range<usize>]>,
) -> Result<Option<HostMoments>, TrainError> {
    let Some(shards) = shards else {
        return Ok(if comm.is_root() {
            Some(opt.to_host(be, layout)?)
        } else {
            None
        });
    };
    let (m, v) = opt.to_host(be, layout)?;
    let (off, counts) = (tensor_offsets(layout), shard_counts(layout, shards));
    let gather = |part: Vec<Vec<f32>>| -> Result<Vec<Vec<f32>>, TrainError> {
        let mut flat = vec![0.0f32; layout.numel()];
        for i in opt.owned.clone() {
            flat[off[i]..off[i] + part[i].len()].copy_from_slice(&part[i]);
        }
        comm.gather_to_root(&mut flat, &counts)?;
        Ok(layout
            .specs
            .iter()
            .zip(&off)
            .map(|(s, &o)| flat[o..o + s.numel()].to_vec())
            .collect())
    };
    let (m, v) = (gather(m)?, gather(v)?);
    Ok(comm.is_root().then_some((m, v)))
}

#[cfg(test)]
mod tests {
    use super::buckets;

    #[test]
    fn buckets_group_consecutive_tensors_and_a_large_one_goes_alone() {
        assert_eq!(
            buckets(&[3, 3, 3, 10, 1, 1], 6),
            vec![0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(buckets(&[], 6), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(buckets(&[7], 6), vec![0..1]);
    }
}
