//! CPU ranks without MPI: the collectives over the rendezvous sockets, rank 0 as the hub.
//!
//! A sum is a reduce to rank 0 then a broadcast: rank 0 adds the ranks' values into its own
//! in rank order (`((x0 + x1) + x2) + …`, element by element, in the element type), and sends the
//! result to every rank, so every rank gets bitwise the same numbers, run after run. Traffic
//! through rank 0 grows with the world size: this is for CPU ranks and tests; GPUs use NCCL.

use super::rendezvous::{Op, Rendezvous, Wire};
use super::{check_counts, Comm, DistError};

/// [`Comm`] over a [`Rendezvous`] (module docs).
#[derive(Debug)]
pub struct TcpComm {
    rv: Rendezvous,
    local_rank: usize,
}

impl TcpComm {
    pub fn new(rv: Rendezvous, local_rank: usize) -> Self {
        Self { rv, local_rank }
    }

    /// The rendezvous underneath (to broadcast small messages).
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rv
    }

    fn sum<T: Wire + std::ops::AddAssign>(&self, data: &mut [T], op: Op) -> Result<(), DistError> {
        let seq = self.rv.begin()?;
        let n = data.len();
        if self.rv.rank() == 0 {
            for peer in 1..self.rv.world_size() {
                self.rv.recv_with(peer, op, seq, n, |at, xs: &[T]| {
                    for (a, &x) in data[at..at + xs.len()].iter_mut().zip(xs) {
                        *a += x;
                    }
                })?;
            }
            for peer in 1..self.rv.world_size() {
                self.rv.send(peer, op, seq, data)?;
            }
        } else {
            self.rv.send(0, op, seq, data)?;
            self.rv.recv_with(0, op, seq, n, |at, xs: &[T]| {
                data[at..at + xs.len()].copy_from_slice(xs)
            })?;
        }
        Ok(())
    }
}

/// Start offsets of the segments.
fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |at, &c| {
            let o = *at;
            *at += c;
            Some(o)
        })
        .collect()
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rv.rank()
    }
    fn world_size(&self) -> usize {
        self.rv.world_size()
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError> {
        self.sum(data, Op::SumF32)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError> {
        self.sum(data, Op::SumF64)
    }

    fn reduce_scatter_sum(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
        check_counts(self, data.len(), counts, "reduce_scatter_sum")?;
        let op = Op::ReduceScatterF32;
        let seq = self.rv.begin()?;
        let n = data.len();
        let off = offsets(counts);
        let me = self.rank();
        if me == 0 {
            for peer in 1..self.world_size() {
                self.rv.recv_with(peer, op, seq, n, |at, xs: &[f32]| {
                    for (a, &x) in data[at..at + xs.len()].iter_mut().zip(xs) {
                        *a += x;
                    }
                })?;
            }
            for peer in 1..self.world_size() {
                let seg = &data[off[peer]..off[peer] + counts[peer]];
                self.rv.send(peer, op, seq, seg)?;
            }
        } else {
            self.rv.send(0, op, seq, data)?;
            let seg = &mut data[off[me]..off[me] + counts[me]];
            self.rv
                .recv_with(0, op, seq, counts[me], |at, xs: &[f32]| {
                    seg[at..at + xs.len()].copy_from_slice(xs)
                })?;
        }
        Ok(())
    }

    fn all_gather(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
        check_counts(self, data.len(), counts, "all_gather")?;
        self.gather(data, counts, Op::AllGatherF32)
    }

    fn gather_to_root(&self, data: &mut [f32], counts: &[usize]) -> Result<(), DistError> {
        check_counts(self, data.len(), counts, "gather_to_root")?;
        self.gather(data, counts, Op::GatherF32)
    }

    fn broadcast_bytes(&self, data: &mut Vec<u8>) -> Result<(), DistError> {
        self.rv.broadcast(data)
    }
}

impl TcpComm {
    /// Segments to rank 0; with [`Op::AllGatherF32`], then the whole buffer back to every rank.
    fn gather(&self, data: &mut [f32], counts: &[usize], op: Op) -> Result<(), DistError> {
        let seq = self.rv.begin()?;
        let off = offsets(counts);
        let me = self.rank();
        let everywhere = op == Op::AllGatherF32;
        if me == 0 {
            for peer in 1..self.world_size() {
                let seg = &mut data[off[peer]..off[peer] + counts[peer]];
                self.rv
                    .recv_with(peer, op, seq, counts[peer], |at, xs: &[f32]| {
                        seg[at..at + xs.len()].copy_from_slice(xs)
                    })?;
            }
            if everywhere {
                for peer in 1..self.world_size() {
                    self.rv.send(peer, op, seq, data)?;
                }
            }
        } else {
            self.rv
                .send(0, op, seq, &data[off[me]..off[me] + counts[me]])?;
            if everywhere {
                let n = data.len();
                self.rv.recv_with(0, op, seq, n, |at, xs: &[f32]| {
                    data[at..at + xs.len()].copy_from_slice(xs)
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::rendezvous::testing::on_threads;
    use super::*;
    use std::time::{Duration, Instant};

    const T: Duration = Duration::from_secs(10);

    /// Values whose f32 sum depends on the order of the additions.
    fn values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + rank * 104729) % 1000) as f32 * 1e-3 + (rank as f32) * 1e4)
            .collect()
    }

    #[test]
    fn sums_are_in_rank_order_and_identical_everywhere() {
        let (world, n) = (3, (1 << 18) + 3); // more than one chunk
        let out = on_threads(world, T, move |rank, rv| {
            let c = TcpComm::new(rv, rank);
            let mut x = values(rank, n);
            c.all_reduce_sum(&mut x).unwrap();
            let mut s = [rank as f64 + 0.5, 1.0];
            c.all_reduce_sum_f64(&mut s).unwrap();
            (x, s)
        });
        let mut expect = values(0, n);
        for r in 1..world {
            for (a, b) in expect.iter_mut().zip(values(r, n)) {
                *a += b;
            }
        }
        for r in out {
            let (x, s) = r.unwrap();
            assert!(x
                .iter()
                .zip(&expect)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(s, [4.5, 3.0]);
        }
    }

    #[test]
    fn reduce_scatter_and_gathers() {
        let world = 3;
        let counts = [4usize, 0, 5];
        let out = on_threads(world, T, move |rank, rv| {
            let c = TcpComm::new(rv, 0);
            let mut x: Vec<f32> = (0..9).map(|i| (i * (rank + 1)) as f32).collect();
            c.reduce_scatter_sum(&mut x, &counts).unwrap();
            let off = [0, 4, 4][rank];
            let mine = x[off..off + counts[rank]].to_vec();
            // Each rank then fills only its own segment.
            let mut y = vec![-1.0f32; 9];
            y[off..off + counts[rank]].copy_from_slice(&mine);
            c.all_gather(&mut y, &counts).unwrap();
            let mut z = vec![-1.0f32; 9];
            z[off..off + counts[rank]].copy_from_slice(&mine);
            c.gather_to_root(&mut z, &counts).unwrap();
            let bad = c.all_gather(&mut z, &[9]).unwrap_err().to_string();
            (mine, y, z, bad)
        });
        let full: Vec<f32> = (0..9).map(|i| (i * 6) as f32).collect();
        for (rank, r) in out.into_iter().enumerate() {
            let (mine, y, z, bad) = r.unwrap();
            let off = [0, 4, 4][rank];
            assert_eq!(mine, full[off..off + counts[rank]]);
            assert_eq!(y, full);
            if rank == 0 {
                assert_eq!(z, full);
            }
            assert!(bad.contains("segment counts"), "{bad}");
        }
    }

    #[test]
    fn a_dead_rank_is_named_at_once_and_the_others_are_told() {
        let t0 = Instant::now();
        let out = on_threads(3, T, |rank, rv| {
            let c = TcpComm::new(rv, 0);
            if rank == 2 {
                return Ok(()); // exits: its socket closes
            }
            let mut x = vec![1.0f32; 8];
            c.all_reduce_sum(&mut x)
        });
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let e0 = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(
            e0.starts_with("rank 0/3: rank 2 closed its connection"),
            "{e0}"
        );
        let e1 = out[1].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e1.contains("rank 0 stopped the job: rank 2 closed"), "{e1}");
    }

    #[test]
    fn a_stalled_rank_is_named_within_the_timeout() {
        let t = Duration::from_millis(500);
        let out = on_threads(2, t, move |rank, rv| {
            let c = TcpComm::new(rv, 0);
            let t0 = Instant::now();
            if rank == 1 {
                std::thread::sleep(Duration::from_secs(2));
                return (Ok(()), t0.elapsed());
            }
            let mut x = vec![1.0f32; 8];
            let r = c.all_reduce_sum(&mut x);
            let waited = t0.elapsed();
            // Later collectives fail at once with the first error.
            let again = c.all_reduce_sum(&mut x).unwrap_err().to_string();
            assert!(again.contains("an earlier collective failed"), "{again}");
            (r, waited)
        });
        let (r, waited) = out[0].as_ref().unwrap();
        let e = r.as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 1 did not answer within 0.5 s"), "{e}");
        assert!(*waited < Duration::from_millis(1500), "{waited:?}");
    }
}
