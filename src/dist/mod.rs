//! Ranks and collectives. Only this module knows how ranks find each other (MPI, the
//! launcher's environment, the TCP rendezvous); the rest of the trainer sees a [`Comm`] with a
//! rank, a world size and collectives, whose world of one does nothing.
//!
//! [`bootstrap`] picks the communicator, in the order of DESIGN.md:
//! 1. built with the `mpi` feature and started by `mpirun` (or `srun --mpi=pmix`): [`MpiComm`];
//! 2. else the environment ([`env::placement`]: `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, Open MPI's
//!    `OMPI_COMM_WORLD_*`, Slurm's `SLURM_*`): a world of one is [`SingleProcess`], a larger one
//!    meets at `MASTER_ADDR:MASTER_PORT` ([`rendezvous`]) and sums through rank 0 ([`TcpComm`]);
//! 3. no launcher at all: [`SingleProcess`].

pub mod env;
pub mod mpi;
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use std::time::Duration;

use crate::config::DistConfig;

pub use self::mpi::MpiComm;
pub use env::Placement;
pub use rendezvous::Rendezvous;
pub use tcp::TcpComm;

/// A distributed failure names the rank and what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank {rank}/{world}: {message}")]
    Collective {
        rank: usize,
        world: usize,
        message: String,
    },
    /// The launcher's environment is incomplete or malformed; the message names the variable.
    #[error("{0}")]
    Environment(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The collectives the trainer needs. Every rank calls the same collectives in the same order
/// with the same lengths; a rank that fails or stops answering within `dist.timeout_s` turns
/// into an error on every other rank that names it.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Rank within this node: picks the GPU.
    fn local_rank(&self) -> usize {
        0
    }
    /// Sum `data` element-wise across ranks, in place, identically on every rank.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError>;
    /// Sum host scalars (losses, token counts) across ranks.
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError>;
    /// `data` is split into `counts.len() == world_size()` consecutive segments; afterwards this
    /// rank's segment holds the element-wise sum over ranks (identical on every rank); the other
    /// segments are unspecified. The default sums everything.
    fn reduce_scatter_sum(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
        check_counts(self, data.len(), counts, "reduce_scatter_sum")?;
        self.all_reduce_sum(data)
    }
    /// `data` is split into segments as for [`Comm::reduce_scatter_sum`]; each rank fills its
    /// own segment and afterwards every rank holds every rank's segment.
    fn all_gather(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError>;
    /// As [`Comm::all_gather`], but only rank 0 receives the other segments (checkpoints).
    /// The default gathers everywhere.
    fn gather_to_root(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
        self.all_gather(data, counts)
    }
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Send rank 0's bytes to every rank (on the others `data` is replaced): the NCCL unique
    /// id. The default (a communicator that cannot) errors.
    fn broadcast_bytes(&self, _data: &mut Vec<u8>) -> Result<(), DistError> {
        Err(DistError::Unavailable(
            "this communicator cannot broadcast bytes".into(),
        ))
    }
}

/// A `counts` argument must have one entry per rank and cover `len` exactly.
pub(crate) fn check_counts<C: Comm + ?Sized>(
    comm: &C,
    len: usize,
    counts: &[usize],
    op: &str,
) -> Result<(), DistError> {
    let total: usize = counts.iter().sum();
    if counts.len() != comm.world_size() || total != len {
        return Err(DistError::Collective {
            rank: comm.rank(),
            world: comm.world_size(),
            message: format!(
                "{op}: {} segment counts summing to {total} for {len} elements in a world of {}",
                counts.len(),
                comm.world_size()
            ),
        });
    }
    Ok(())
}

/// One process, no communication.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Comm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _data: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, _data: &mut [f32], _counts: &[usize]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather(&self, _data: &mut [f32], _counts: &[usize]) -> Result<(), DistError> {
        Ok(())
    }
    fn gather_to_root(&self, _data: &mut [f32], _counts: &[usize]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast_bytes(&self, _data: &mut Vec<u8>) -> Result<(), DistError> {
        Ok(())
    }
}

/// The communicator of this process, from MPI or the launcher's environment (module docs).
/// Blocks until every rank has joined, for at most `dist.timeout_s`.
pub fn bootstrap(config: &DistConfig) -> Result<Box<dyn Comm>, DistError> {
    bootstrap_from(config, &|k| std::env::var(k).ok())
}

/// [`bootstrap`] reading variables through `get` (tests pass a map).
pub fn bootstrap_from(
    config: &DistConfig,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Box<dyn Comm>, DistError> {
    let timeout = Duration::from_secs(config.timeout_s);
    if env::started_by_mpi(get) && cfg!(feature = "mpi") {
        let comm = MpiComm::init(timeout)?;
        if comm.world_size() == 1 {
            return Ok(Box::new(SingleProcess));
        }
        tracing::info!(
            rank = comm.rank(),
            world = comm.world_size(),
            local_rank = comm.local_rank(),
            "MPI communicator"
        );
        return Ok(Box::new(comm));
    }
    let Some(p) = env::placement(get)? else {
        return Ok(Box::new(SingleProcess));
    };
    if p.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    let addr = env::master_addr(get, &p)?;
    let rv = Rendezvous::connect(p.rank, p.world_size, &addr, timeout)?;
    tracing::info!(
        rank = p.rank,
        world = p.world_size,
        local_rank = p.local_rank,
        from = p.source,
        %addr,
        "TCP communicator"
    );
    Ok(Box::new(TcpComm::new(rv, p.local_rank)))
}

/// `result`, with "rank r/W" in front of its error when there is more than one rank (and the
/// error does not say so already): what `main` prints on every rank.
pub fn tag_rank<T, E>(comm: &dyn Comm, result: Result<T, E>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    result.map_err(|e| {
        let prefix = format!("rank {}/{}", comm.rank(), comm.world_size());
        let tagged = comm.world_size() > 1 && !e.to_string().starts_with(&prefix);
        let e = anyhow::Error::new(e);
        if tagged {
            e.context(prefix)
        } else {
            e
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_launcher_or_a_world_of_one_is_a_single_process() {
        let cfg = DistConfig::default();
        for pairs in [
            vec![],
            vec![("RANK", "0"), ("WORLD_SIZE", "1")],
            vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")],
        ] {
            let m = vars(&pairs);
            let comm = bootstrap_from(&cfg, &|k| m.get(k).cloned()).unwrap();
            assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        }
    }

    #[test]
    fn a_larger_world_without_master_addr_names_the_variable() {
        let m = vars(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        let e = bootstrap_from(&DistConfig::default(), &|k| m.get(k).cloned())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn single_process_collectives_do_nothing() {
        let mut x = [1.0f32, 2.0];
        SingleProcess.all_reduce_sum(&mut x).unwrap();
        SingleProcess.reduce_scatter_sum(&mut x, &[2]).unwrap();
        SingleProcess.all_gather(&mut x, &[2]).unwrap();
        assert_eq!(x, [1.0, 2.0]);
    }
}
