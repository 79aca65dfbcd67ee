//! NCCL on device buffers (cudarc's `nccl` bindings, loaded at run time): one communicator
//! per rank, for summing gradients where they live. Its collectives run on a communication
//! stream of their own, ordered after the compute stream's work by an event and before the
//! compute stream's later work by another (so the compute stream may be the legacy default
//! stream, and a collective can later start while the backward of earlier layers runs).
//!
//! - The library is probed first ([`probe`]): a missing `libnccl.so` is an error naming the fix,
//!   not a panic inside cudarc. cudarc looks for `libnccl.so` (not the soname `libnccl.so.2`
//!   that pip's `nvidia-nccl-*` wheels ship); `launch/nccl-env.sh` (sourced by the launchers)
//!   makes a `libnccl.so` link and puts it on `LD_LIBRARY_PATH` when needed.
//! - The unique id travels from rank 0 over the host communicator ([`Comm::broadcast_bytes`]:
//!   the TCP rendezvous, or `MPI_Bcast`).
//! - Faults: a watchdog thread polls `ncclCommGetAsyncError` (every 250 ms) and times the
//!   collectives the trainer arms ([`NcclComm::arm`]). On an asynchronous error, or when armed
//!   work has not finished within `dist.timeout_s`, it aborts the communicator
//!   (`ncclCommAbort`, which also ends the kernels that wait for a peer) and ends the process
//!   with exit code 1 and a message naming this rank and the suspect peer.
//! - Multicast (NVLS) is never asked for; the launchers export `NCCL_NVLS_ENABLE=0` too.
//!
//! The raw communicator is held here, not as cudarc's `Comm` (which is not `Send`), so the
//! watchdog thread can abort it.

use std::ffi::{c_char, CStr};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::sys;

use super::{Comm, DistError};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;
/// How often the watchdog looks at the communicator.
const POLL: Duration = Duration::from_millis(250);

/// Is libnccl loadable? (cudarc panics on the first call into a library it cannot find.)
pub fn probe() -> Result<(), DistError> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(DistError::Unavailable(
        "NCCL not found: no libnccl.so on the library path (pip's nvidia-nccl wheels ship only \
         libnccl.so.2; make a libnccl.so link to it in a directory on LD_LIBRARY_PATH: \
         launch/local.sh and launch/mpirun.sh do this through launch/nccl-env.sh), or set \
         PACKTRAIN_GRAD_SYNC=host to sum device gradients through host buffers instead"
            .into(),
    ))
}

/// The message of an NCCL result code, with the communicator's last error when there is one.
fn describe(code: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any code; ncclGetLastError
    // returns a C string owned by NCCL (or null) and accepts a null communicator.
    unsafe {
        let mut s = format!("{code:?}");
        let p = sys::ncclGetErrorString(code);
        if !p.is_null() {
            s = format!("{s} ({})", CStr::from_ptr(p).to_string_lossy());
        }
        let last = sys::ncclGetLastError(comm);
        if !last.is_null() {
            let last = CStr::from_ptr(last).to_string_lossy();
            if !last.trim().is_empty() {
                s = format!("{s}: {}", last.trim());
            }
        }
        s
    }
}

/// A raw communicator pointer the watchdog may use from its thread: NCCL documents
/// `ncclCommGetAsyncError` and `ncclCommAbort` as callable concurrently with other calls.
#[derive(Clone, Copy)]
struct Raw(sys::ncclComm_t);
// SAFETY: see above; every other use is on the owning thread.
unsafe impl Send for Raw {}

struct State {
    /// Null until initialised, and again once aborted.
    comm: Raw,
    /// What the trainer waits for, and until when.
    armed: Option<(Instant, String)>,
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An NCCL communicator on one rank's stream, with its watchdog (module docs).
pub struct NcclComm {
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The compute stream (the backend's).
    stream: Arc<CudaStream>,
    /// Where the collectives run.
    comm_stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    version: i32,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Who to blame when the collective of this rank does not finish.
fn suspects(rank: usize, world: usize) -> String {
    match world {
        2 => format!("rank {}", 1 - rank),
        _ => format!("one of the other {} ranks", world - 1),
    }
}

impl NcclComm {
    /// Join the NCCL communicator of `host`'s ranks on `stream` (of context `ctx`, the GPU of
    /// this rank). Every rank calls this at the same point; blocks until all have joined, at
    /// most `timeout` (the watchdog ends the process after that).
    pub fn new(
        host: &dyn Comm,
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<NcclComm, DistError> {
        let (rank, world) = (host.rank(), host.world_size());
        let err = |message: String| DistError::Collective {
            rank,
            world,
            message,
        };
        // Every rank probes, then they agree, so a rank without NCCL stops all of them at once
        // (instead of the others waiting in ncclCommInitRank).
        let present = probe();
        let mut flags = vec![0.0f64; world];
        flags[rank] = if present.is_ok() { 0.0 } else { 1.0 };
        host.all_reduce_sum_f64(&mut flags)?;
        present?;
        if let Some(r) = flags.iter().position(|&f| f != 0.0) {
            return Err(err(format!("rank {r} cannot load NCCL (its log says why)")));
        }

        let mut id_bytes = Vec::new();
        if rank == 0 {
            let id = cudarc::nccl::result::get_uniqueid().map_err(|e| {
                err(format!(
                    "ncclGetUniqueId: {}",
                    describe(e.0, std::ptr::null_mut())
                ))
            })?;
            id_bytes = id.internal.iter().map(|&c| c as u8).collect();
        }
        host.broadcast_bytes(&mut id_bytes)?;
        if id_bytes.len() != ID_BYTES {
            return Err(err(format!(
                "received an NCCL id of {} bytes, {ID_BYTES} expected",
                id_bytes.len()
            )));
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(&id_bytes) {
            *d = s as c_char;
        }
        let id = sys::ncclUniqueId { internal };

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                comm: Raw(std::ptr::null_mut()),
                armed: None,
                done: false,
            }),
            cv: Condvar::new(),
        });
        // The highest priority: while the backward's kernels fill the GPU, the block scheduler
        // gives SMs that free up to the all-reduce first, so it overlaps instead of queueing
        // behind them.
        let comm_stream = cudarc::driver::result::stream::get_priority_range()
            .and_then(|(_least, greatest)| ctx.new_stream_with_priority(greatest))
            .map_err(|e| err(format!("creating the communication stream: {e:?}")))?;
        spawn_watchdog(shared.clone(), rank, world, timeout)?;
        let mut me = NcclComm {
            shared,
            rank,
            world,
            timeout,
            stream,
            comm_stream,
            ctx,
            version: 0,
        };
        me.ctx
            .bind_to_thread()
            .map_err(|e| err(format!("binding the CUDA context: {e:?}")))?;
        me.arm("ncclCommInitRank");
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL; rank < world.
        let code = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, id, rank as i32) };
        me.disarm();
        if code != sys::ncclResult_t::ncclSuccess {
            return Err(err(format!(
                "ncclCommInitRank: {}",
                describe(code, std::ptr::null_mut())
            )));
        }
        me.shared.lock().comm = Raw(comm);
        me.version = cudarc::nccl::result::get_nccl_version().unwrap_or(0);
        Ok(me)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// NCCL's version code (e.g. 22703 for 2.27.3).
    pub fn version(&self) -> i32 {
        self.version
    }

    fn comm(&self) -> Result<sys::ncclComm_t, DistError> {
        let c = self.shared.lock().comm.0;
        if c.is_null() {
            return Err(self.err("the NCCL communicator was aborted".into()));
        }
        Ok(c)
    }

    fn err(&self, message: String) -> DistError {
        DistError::Collective {
            rank: self.rank,
            world: self.world,
            message,
        }
    }

    /// From now on, `what` must finish within `dist.timeout_s` (until [`NcclComm::disarm`]),
    /// else the watchdog aborts the communicator and ends the process. Re-arming keeps the
    /// earlier deadline.
    pub fn arm(&self, what: &str) {
        let mut s = self.shared.lock();
        if s.armed.is_none() {
            s.armed = Some((Instant::now() + self.timeout, what.to_string()));
        }
        drop(s);
        self.shared.cv.notify_all();
    }

    /// The armed work has finished (the stream was synchronised).
    pub fn disarm(&self) {
        self.shared.lock().armed = None;
    }

    /// Sum every buffer across ranks, in place, as one NCCL group (one launch); `bufs[i].1`
    /// elements of each. It starts once the compute stream's work queued so far is done, and
    /// the compute stream's later work waits for it. Asynchronous: arms the watchdog; the
    /// caller disarms once the compute stream is synchronised.
    pub fn all_reduce_sum_group(
        &self,
        bufs: &mut [(&mut CudaSlice<f32>, usize)],
    ) -> Result<(), DistError> {
        self.all_reduce_sum_group_start(bufs)?;
        self.wait_for_collectives()
    }

    /// [`NcclComm::all_reduce_sum_group`] without the compute stream waiting for it: the
    /// compute stream's later work (the backward of earlier layers) overlaps the sum, so it
    /// must not touch `bufs` until [`NcclComm::wait_for_collectives`].
    pub fn all_reduce_sum_group_start(
        &self,
        bufs: &mut [(&mut CudaSlice<f32>, usize)],
    ) -> Result<(), DistError> {
        let mut ops: Vec<_> = bufs
            .iter_mut()
            .map(|(b, n)| (&mut **b, *n, Collective::AllReduceSum))
            .collect();
        self.group_start(&mut ops, "the gradient all-reduce")
    }

    /// One NCCL group of `ops` (buffer, elements, collective; all in place), started once the
    /// compute stream's work queued so far is done; like
    /// [`NcclComm::all_reduce_sum_group_start`], the compute stream does not wait for it until
    /// [`NcclComm::wait_for_collectives`]. Arms the watchdog with `what`.
    pub fn group_start(
        &self,
        ops: &mut [(&mut CudaSlice<f32>, usize, Collective)],
        what: &str,
    ) -> Result<(), DistError> {
        let raw: Vec<(DeviceBuf, usize, Collective)> = ops
            .iter_mut()
            .map(|(buf, n, op)| {
                use cudarc::driver::DevicePtrMut;
                let len = buf.len();
                let (ptr, _guard) = buf.device_ptr_mut(&self.comm_stream);
                let b = DeviceBuf {
                    ptr,
                    len,
                    elem: Elem::F32,
                };
                (b, *n, *op)
            })
            .collect();
        // SAFETY: the slices are borrowed for this call and, as this function's contract says,
        // not touched again until the compute stream has waited for the collectives.
        unsafe { self.group_start_raw(&raw, what) }
    }

    /// [`NcclComm::group_start`] over buffers given by address and element type.
    ///
    /// # Safety
    /// Each `DeviceBuf` must address `len` elements of its type on this communicator's GPU,
    /// and stay allocated and untouched by other work until the compute stream has waited for
    /// these collectives ([`NcclComm::wait_for_collectives`], or an event of
    /// [`NcclComm::record_done`] recorded after them).
    pub unsafe fn group_start_raw(
        &self,
        ops: &[(DeviceBuf, usize, Collective)],
        what: &str,
    ) -> Result<(), DistError> {
        let comm = self.comm()?;
        self.poll()?;
        self.arm(what);
        self.comm_stream
            .join(&self.stream)
            .map_err(|e| self.err(format!("ordering {what} after the compute stream: {e:?}")))?;
        // SAFETY: the caller's contract.
        unsafe { self.group(comm, ops) }
    }

    /// An event completing when every collective queued so far has.
    pub fn record_done(&self) -> Result<cudarc::driver::CudaEvent, DistError> {
        self.comm_stream
            .record_event(None)
            .map_err(|e| self.err(format!("recording an event after the collectives: {e:?}")))
    }

    /// The compute stream's later work waits for `event` (of [`NcclComm::record_done`]).
    pub fn compute_waits(&self, event: &cudarc::driver::CudaEvent) -> Result<(), DistError> {
        self.stream.wait(event).map_err(|e| {
            self.err(format!(
                "ordering the compute stream after a collective: {e:?}"
            ))
        })
    }

    /// The compute stream's later work waits for every collective queued so far.
    pub fn wait_for_collectives(&self) -> Result<(), DistError> {
        self.stream.join(&self.comm_stream).map_err(|e| {
            self.err(format!(
                "ordering the compute stream after the all-reduce: {e:?}"
            ))
        })
    }

    /// # Safety
    /// [`NcclComm::group_start_raw`]'s contract.
    unsafe fn group(
        &self,
        comm: sys::ncclComm_t,
        bufs: &[(DeviceBuf, usize, Collective)],
    ) -> Result<(), DistError> {
        let stream = self.comm_stream.cu_stream() as sys::cudaStream_t;
        let check = |what: &str, code: sys::ncclResult_t| -> Result<(), DistError> {
            match code {
                sys::ncclResult_t::ncclSuccess => Ok(()),
                c => Err(self.err(format!("{what}: {}", describe(c, comm)))),
            }
        };
        // SAFETY: each pointer addresses at least `n` elements on this communicator's GPU
        // (checked against `len` below; the rest is the caller's contract), and the stream
        // belongs to the context NCCL was initialised on.
        unsafe {
            check("ncclGroupStart", sys::ncclGroupStart())?;
            let mut first = None;
            for &(buf, n, op) in bufs {
                if n == 0 {
                    continue;
                }
                if let Err(m) = op.check(buf, n, self.world_size()) {
                    first.get_or_insert_with(|| self.err(m));
                    continue;
                }
                let p = buf.ptr as *mut std::ffi::c_void;
                let (ty, sum) = (buf.elem.nccl(), sys::ncclRedOp_t::ncclSum);
                let code = match op {
                    Collective::AllReduceSum => sys::ncclAllReduce(p, p, n, ty, sum, comm, stream),
                    Collective::ReduceSum { root } => {
                        sys::ncclReduce(p, p, n, ty, sum, root as i32, comm, stream)
                    }
                    Collective::Broadcast { root } => {
                        sys::ncclBroadcast(p, p, n, ty, root as i32, comm, stream)
                    }
                };
                if code != sys::ncclResult_t::ncclSuccess && first.is_none() {
                    first = Some(self.err(format!("{op:?}: {}", describe(code, comm))));
                }
            }
            check("ncclGroupEnd", sys::ncclGroupEnd())?;
            if let Some(e) = first {
                return Err(e);
            }
        }
        Ok(())
    }

    /// An asynchronous NCCL error, if one happened.
    pub fn poll(&self) -> Result<(), DistError> {
        let comm = self.comm()?;
        match async_error(comm) {
            None => Ok(()),
            Some(m) => Err(self.err(m)),
        }
    }

    /// Abort the communicator now (an error elsewhere ends the job): kernels waiting for a
    /// peer end. Idempotent.
    pub fn abort(&self) {
        let mut s = self.shared.lock();
        let c = std::mem::replace(&mut s.comm, Raw(std::ptr::null_mut()));
        s.armed = None;
        drop(s);
        if !c.0.is_null() {
            // SAFETY: a communicator made by ncclCommInitRank, aborted once (nulled above).
            unsafe {
                let _ = sys::ncclCommAbort(c.0);
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        {
            let mut s = self.shared.lock();
            s.done = true;
        }
        self.shared.cv.notify_all();
        // Abort rather than destroy: it never waits for peers, and frees the same resources.
        self.abort();
    }
}

/// Element types of the buffers NCCL moves here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            Elem::F32 => sys::ncclDataType_t::ncclFloat32,
            Elem::Bf16 => sys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// A device buffer of a group by address ([`NcclComm::group_start_raw`]): `len` elements of
/// `elem` at `ptr`, on this communicator's GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBuf {
    pub ptr: cudarc::driver::sys::CUdeviceptr,
    pub len: usize,
    pub elem: Elem,
}

/// One in-place collective of an NCCL group ([`NcclComm::group_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// Every rank ends with the sum.
    AllReduceSum,
    /// Rank `root` ends with the sum; the others' buffers are only read.
    ReduceSum { root: usize },
    /// Every rank ends with rank `root`'s buffer.
    Broadcast { root: usize },
}

impl Collective {
    /// Why this collective of `n` elements in place on `buf` cannot run among `world` ranks: a
    /// buffer shorter than `n`, or a root outside the world.
    fn check(self, buf: DeviceBuf, n: usize, world: usize) -> Result<(), String> {
        if buf.len < n {
            return Err(format!(
                "{self:?} of {n} elements from a buffer of {}",
                buf.len
            ));
        }
        self.root(world).map(|_| ())
    }

    /// The root rank (0 for an all-reduce, which has none), or why it is not one of `world`.
    fn root(self, world: usize) -> Result<usize, String> {
        match self {
            Collective::AllReduceSum => Ok(0),
            Collective::ReduceSum { root } | Collective::Broadcast { root } if root < world => {
                Ok(root)
            }
            Collective::ReduceSum { root } | Collective::Broadcast { root } => {
                Err(format!("{self:?}: root {root} of {world} ranks"))
            }
        }
    }
}

/// `Some(message)` when NCCL reports an asynchronous error on `comm`.
fn async_error(comm: sys::ncclComm_t) -> Option<String> {
    let mut e = sys::ncclResult_t::ncclSuccess;
    // SAFETY: a live communicator; `e` is written by NCCL.
    let code = unsafe { sys::ncclCommGetAsyncError(comm, &mut e) };
    if code != sys::ncclResult_t::ncclSuccess {
        return Some(format!("ncclCommGetAsyncError: {}", describe(code, comm)));
    }
    match e {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => None,
        e => Some(format!(
            "NCCL reported an asynchronous error: {}",
            describe(e, comm)
        )),
    }
}

fn spawn_watchdog(
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<(), DistError> {
    std::thread::Builder::new()
        .name("nccl-watchdog".into())
        .spawn(move || {
            let mut s = shared.lock();
            loop {
                if s.done {
                    return;
                }
                let now = Instant::now();
                let failure = if !s.comm.0.is_null() {
                    async_error(s.comm.0)
                } else {
                    None
                }
                .map(|m| format!("{m}; {} may have died", suspects(rank, world)))
                .or_else(|| match &s.armed {
                    Some((deadline, what)) if now >= *deadline => Some(format!(
                        "{what} did not complete within {} s (dist.timeout_s): {} is dead or \
                         stalled",
                        timeout.as_secs_f64(),
                        suspects(rank, world)
                    )),
                    _ => None,
                });
                if let Some(message) = failure {
                    let c = std::mem::replace(&mut s.comm, Raw(std::ptr::null_mut()));
                    let aborted = !c.0.is_null();
                    if aborted {
                        // SAFETY: a live communicator, aborted once (nulled above).
                        unsafe {
                            let _ = sys::ncclCommAbort(c.0);
                        }
                    }
                    eprintln!(
                        "error: rank {rank}/{world}: {message}{}",
                        if aborted {
                            "; aborted the NCCL communicator"
                        } else {
                            ""
                        }
                    );
                    std::process::exit(1);
                }
                s = shared
                    .cv
                    .wait_timeout(s, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        })
        .map(|_| ())
        .map_err(|e| DistError::Unavailable(format!("cannot start the NCCL watchdog: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_shorter_than_its_collective_is_an_error() {
        let buf = DeviceBuf {
            ptr: 0,
            len: 4,
            elem: Elem::Bf16,
        };
        let op = Collective::Broadcast { root: 1 };
        assert_eq!(op.check(buf, 4, 2), Ok(()));
        let e = op.check(buf, 10, 2).unwrap_err();
        assert!(e.contains("of 10 elements from a buffer of 4"), "{e}");
        // Long enough, but the root is not a rank.
        assert!(op
            .check(buf, 4, 1)
            .unwrap_err()
            .contains("root 1 of 1 ranks"));
    }

    #[test]
    fn a_root_outside_the_world_is_an_error() {
        assert_eq!(Collective::AllReduceSum.root(2), Ok(0));
        assert_eq!(Collective::ReduceSum { root: 1 }.root(2), Ok(1));
        let e = Collective::Broadcast { root: 2 }.root(2).unwrap_err();
        assert!(e.contains("root 2 of 2 ranks"), "{e}");
        assert!(Collective::ReduceSum { root: 5 }.root(4).is_err());
    }

    #[test]
    fn suspects_name_the_peer_of_two() {
        assert_eq!(suspects(0, 2), "rank 1");
        assert_eq!(suspects(1, 2), "rank 0");
        assert_eq!(suspects(0, 4), "one of the other 3 ranks");
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        // On a machine with NCCL this passes trivially; without it, probe must say how to fix it.
        if let Err(e) = probe() {
            let m = e.to_string();
            assert!(
                m.contains("libnccl.so") && m.contains("PACKTRAIN_GRAD_SYNC"),
                "{m}"
            );
        }
    }
}
