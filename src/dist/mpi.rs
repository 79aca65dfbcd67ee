//! CPU ranks through MPI (the `mpi` cargo feature, Open MPI 4 or any MPI-3 library): sums
//! by `MPI_Allreduce`, gathers by `MPI_Allgatherv`/`MPI_Gatherv`. The library picks the order
//! of the additions, which may differ from the TCP hub's; every rank still gets the same result.
//!
//! MPI calls cannot time out, so a watchdog thread ends the process (exit code 1, a message
//! naming this rank and the collective) when one takes longer than `dist.timeout_s`; `mpirun`
//! then stops the other ranks. A rank that dies is `mpirun`'s to report: it stops the job.
//!
//! Without the feature, [`MpiComm::init`] answers that this build has no MPI.

#[cfg(not(feature = "mpi"))]
mod imp {
    use std::time::Duration;

    use crate::dist::{Comm, DistError};

    /// Built without the `mpi` feature: cannot be made ([`MpiComm::init`] errors).
    #[derive(Debug)]
    pub enum MpiComm {}

    impl MpiComm {
        pub fn init(_timeout: Duration) -> Result<MpiComm, DistError> {
            Err(DistError::Unavailable(
                "this packtrain was built without mpi; rebuild with `cargo build --release \
                 --features mpi` (needs libopenmpi-dev and libclang-dev), or start the ranks \
                 with launch/local.sh or launch/mpirun.sh, which meet over TCP"
                    .into(),
            ))
        }
    }

    impl Comm for MpiComm {
        fn rank(&self) -> usize {
            match *self {}
        }
        fn world_size(&self) -> usize {
            match *self {}
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
            match *self {}
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), DistError> {
            match *self {}
        }
        fn all_gather(&self, _: &mut [f32], _: &[usize]) -> Result<(), DistError> {
            match *self {}
        }
    }
}

#[cfg(feature = "mpi")]
mod imp {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use crate::dist::{check_counts, Comm, DistError};

    /// Elements per MPI call (counts are C ints).
    const MAX_COUNT: usize = 1 << 30;

    /// [`Comm`] over `MPI_COMM_WORLD` (module docs).
    pub struct MpiComm {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        local_rank: usize,
        watchdog: Watchdog,
        // Dropped last: MPI_Finalize.
        _universe: mpi::environment::Universe,
    }

    impl std::fmt::Debug for MpiComm {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MpiComm")
                .field("rank", &self.rank)
                .field("size", &self.size)
                .field("local_rank", &self.local_rank)
                .finish_non_exhaustive()
        }
    }

    impl MpiComm {
        /// `MPI_Init`; collectives that take longer than `timeout` end the process.
        pub fn init(timeout: Duration) -> Result<MpiComm, DistError> {
            let universe = mpi::initialize().ok_or_else(|| {
                DistError::Unavailable("MPI is already initialised in this process".into())
            })?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let local_rank = [
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ]
            .iter()
            .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
            .unwrap_or(0);
            Ok(MpiComm {
                world,
                rank,
                size,
                local_rank,
                watchdog: Watchdog::new(rank, size, timeout),
                _universe: universe,
            })
        }
    }

    impl Comm for MpiComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn local_rank(&self) -> usize {
            self.local_rank
        }

        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError> {
            let _armed = self.watchdog.arm("MPI_Allreduce");
            for part in data.chunks_mut(MAX_COUNT) {
                let send = part.to_vec();
                self.world
                    .all_reduce_into(&send[..], part, SystemOperation::sum());
            }
            Ok(())
        }

        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError> {
            let _armed = self.watchdog.arm("MPI_Allreduce");
            for part in data.chunks_mut(MAX_COUNT) {
                let send = part.to_vec();
                self.world
                    .all_reduce_into(&send[..], part, SystemOperation::sum());
            }
            Ok(())
        }

        fn all_gather(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
            check_counts(self, data.len(), counts, "all_gather")?;
            let (c, d) = self.partition(data.len(), counts)?;
            let me = self.rank;
            let send = data[d[me] as usize..d[me] as usize + counts[me]].to_vec();
            let _armed = self.watchdog.arm("MPI_Allgatherv");
            let mut recv = PartitionMut::new(data, &c[..], &d[..]);
            self.world.all_gather_varcount_into(&send[..], &mut recv);
            Ok(())
        }

        fn gather_to_root(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
            check_counts(self, data.len(), counts, "gather_to_root")?;
            let (c, d) = self.partition(data.len(), counts)?;
            let me = self.rank;
            let send = data[d[me] as usize..d[me] as usize + counts[me]].to_vec();
            let _armed = self.watchdog.arm("MPI_Gatherv");
            let root = self.world.process_at_rank(0);
            if me == 0 {
                let mut recv = PartitionMut::new(data, &c[..], &d[..]);
                root.gather_varcount_into_root(&send[..], &mut recv);
            } else {
                root.gather_varcount_into(&send[..]);
            }
            Ok(())
        }

        fn broadcast_bytes(&self, data: &mut Vec<u8>) -> Result<(), DistError> {
            let root = self.world.process_at_rank(0);
            let _armed = self.watchdog.arm("MPI_Bcast");
            let mut len = data.len() as u64;
            root.broadcast_into(&mut len);
            if self.rank != 0 {
                data.clear();
                data.resize(len as usize, 0);
            }
            root.broadcast_into(&mut data[..]);
            Ok(())
        }
    }

    impl MpiComm {
        /// Counts and displacements as C ints.
        fn partition(
            &self,
            len: usize,
            counts: &[usize],
        ) -> Result<(Vec<mpi::Count>, Vec<mpi::Count>), DistError> {
            if len > i32::MAX as usize {
                return Err(DistError::Collective {
                    rank: self.rank,
                    world: self.size,
                    message: format!("a gather of {len} elements exceeds MPI's int counts"),
                });
            }
            let c: Vec<mpi::Count> = counts.iter().map(|&n| n as mpi::Count).collect();
            let d: Vec<mpi::Count> = c
                .iter()
                .scan(0, |at, &n| {
                    let o = *at;
                    *at += n;
                    Some(o)
                })
                .collect();
            Ok((c, d))
        }
    }

    enum Watch {
        Idle,
        Armed(Instant, &'static str),
        Done,
    }

    /// Ends the process when an armed collective passes its deadline.
    struct Watchdog {
        state: Arc<(Mutex<Watch>, Condvar)>,
        timeout: Duration,
    }

    struct Armed<'a>(&'a Watchdog);

    impl Drop for Armed<'_> {
        fn drop(&mut self) {
            self.0.set(Watch::Idle);
        }
    }

    impl Watchdog {
        fn new(rank: usize, size: usize, timeout: Duration) -> Watchdog {
            let state = Arc::new((Mutex::new(Watch::Idle), Condvar::new()));
            let s = state.clone();
            std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || {
                    let (lock, cv) = &*s;
                    let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        w = match *w {
                            Watch::Done => return,
                            Watch::Idle => cv.wait(w).unwrap_or_else(|p| p.into_inner()),
                            Watch::Armed(deadline, op) => {
                                let now = Instant::now();
                                if now >= deadline {
                                    eprintln!(
                                        "error: rank {rank}/{size}: {op} did not complete within \
                                         {} s (dist.timeout_s): another rank is dead or stalled",
                                        timeout.as_secs_f64()
                                    );
                                    std::process::exit(1);
                                }
                                cv.wait_timeout(w, deadline - now)
                                    .unwrap_or_else(|p| p.into_inner())
                                    .0
                            }
                        };
                    }
                })
                .expect("a watchdog thread");
            Watchdog { state, timeout }
        }

        fn set(&self, to: Watch) {
            let (lock, cv) = &*self.state;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = to;
            cv.notify_all();
        }

        fn arm(&self, op: &'static str) -> Armed<'_> {
            self.set(Watch::Armed(Instant::now() + self.timeout, op));
            Armed(self)
        }
    }

    impl Drop for Watchdog {
        fn drop(&mut self) {
            self.set(Watch::Done);
        }
    }
}

pub use imp::MpiComm;
