//! Ranks and collectives. Only this module knows how ranks find each other; the rest of the
//! trainer sees a [`Comm`] with a rank, a world size and sums, whose world of one does nothing.

/// A distributed failure names the rank and what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rank {rank}/{world}: {message}")]
    Collective {
        rank: usize,
        world: usize,
        message: String,
    },
    #[error("{0}")]
    Unavailable(String),
}

/// The collectives the trainer needs.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum `data` element-wise across ranks, in place, identically on every rank.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError>;
    /// Sum host scalars (losses, token counts) across ranks.
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError>;
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
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
}
