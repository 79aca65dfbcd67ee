//! The TCP rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! (retrying until `dist.timeout_s`) and says who it is; afterwards each rank has one socket to
//! rank 0 (rank 0 one to every rank), over which small messages travel: [`Rendezvous::broadcast`]
//! from rank 0 (the NCCL unique id), [`Rendezvous::gather`] and [`Rendezvous::all_gather`]. The
//! CPU communicator ([`super::TcpComm`]) runs its sums over the same sockets.
//!
//! Every message is a frame: a 24-byte header (magic, operation, sequence number, payload
//! length, little-endian) and the payload. Each collective takes the next sequence number on
//! every rank, so ranks that call different collectives, or the same one with different
//! lengths, get an error naming both instead of garbage.
//!
//! Faults: every read and write has a deadline. Rank 0 waits `dist.timeout_s` for a rank; the
//! others wait a little longer for rank 0, so that when a rank dies or stalls, rank 0 names it
//! first and tells the others (an abort frame carrying its message) before they would time out
//! on rank 0. A closed socket (a rank that exited or was killed) is an error at once.
//!
//! Files: `frame.rs` the wire (frames, [`Op`], deadline-bound reads and writes),
//! `connect.rs` joining the job, this file the [`Rendezvous`] and its collectives.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::DistError;

mod connect;
mod frame;

use frame::{
    expect_header, read_full, send_abort, write_full, write_header, GetLe, LinkError, CHUNK,
};
pub(crate) use frame::{Op, Wire};

/// The connected ranks of one job (module docs).
pub struct Rendezvous {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the socket of rank r at index r (index 0 is `None`). Other ranks: the socket to
    /// rank 0 at index 0.
    links: Vec<Option<TcpStream>>,
    seq: AtomicU64,
    /// After a failure every later collective fails at once with the first error.
    failed: Mutex<Option<String>>,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Rendezvous {
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// `dist.timeout_s`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Send rank 0's `data` to every rank (on the others, `data` is replaced).
    pub fn broadcast(&self, data: &mut Vec<u8>) -> Result<(), DistError> {
        let seq = self.begin()?;
        if self.rank == 0 {
            for peer in 1..self.world {
                let d = self.deadline();
                let s = self.link(peer);
                (|| -> Result<(), LinkError> {
                    write_header(s, Op::Broadcast, seq, data.len() as u64, d)?;
                    Ok(write_full(s, data, d)?)
                })()
                .map_err(|e| self.fail(peer, Op::Broadcast, e))?;
            }
        } else {
            let d = self.deadline();
            let s = self.link(0);
            *data = (|| -> Result<Vec<u8>, LinkError> {
                let len = expect_header(s, Op::Broadcast, seq, None, d)?;
                let mut buf = vec![0u8; len as usize];
                read_full(s, &mut buf, d)?;
                Ok(buf)
            })()
            .map_err(|e| self.fail(0, Op::Broadcast, e))?;
        }
        Ok(())
    }

    /// Every rank's `mine`, in rank order, on rank 0; an empty vector on the others.
    pub fn gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let seq = self.begin()?;
        self.gather_seq(mine, seq, Op::Gather)
    }

    fn gather_seq(&self, mine: &[u8], seq: u64, op: Op) -> Result<Vec<Vec<u8>>, DistError> {
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for peer in 1..self.world {
                let d = self.deadline();
                let s = self.link(peer);
                let buf = (|| -> Result<Vec<u8>, LinkError> {
                    let len = expect_header(s, op, seq, None, d)?;
                    let mut buf = vec![0u8; len as usize];
                    read_full(s, &mut buf, d)?;
                    Ok(buf)
                })()
                .map_err(|e| self.fail(peer, op, e))?;
                all.push(buf);
            }
            Ok(all)
        } else {
            let d = self.deadline();
            let s = self.link(0);
            (|| -> Result<(), LinkError> {
                write_header(s, op, seq, mine.len() as u64, d)?;
                Ok(write_full(s, mine, d)?)
            })()
            .map_err(|e| self.fail(0, op, e))?;
            Ok(Vec::new())
        }
    }

    /// Every rank's `mine`, in rank order, on every rank.
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let seq = self.begin()?;
        let all = self.gather_seq(mine, seq, Op::AllGather)?;
        // Rank 0 sends the gathered messages as (u64 length, bytes)*.
        let mut packed = Vec::new();
        if self.rank == 0 {
            for m in &all {
                packed.extend_from_slice(&(m.len() as u64).to_le_bytes());
                packed.extend_from_slice(m);
            }
        }
        self.broadcast(&mut packed)?;
        if self.rank == 0 {
            return Ok(all);
        }
        let mut out = Vec::with_capacity(self.world);
        let mut at = 0;
        while at + 8 <= packed.len() && out.len() < self.world {
            let n = u64::get_le(&packed[at..at + 8]) as usize;
            at += 8;
            if at + n > packed.len() {
                break;
            }
            out.push(packed[at..at + n].to_vec());
            at += n;
        }
        if out.len() != self.world || at != packed.len() {
            return Err(self.fail(
                0,
                Op::AllGather,
                LinkError::Protocol("a malformed all_gather answer".into()),
            ));
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- for the communicators

    /// Start a collective: the next sequence number, or the error of an earlier failure.
    pub(crate) fn begin(&self) -> Result<u64, DistError> {
        if let Some(first) = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(DistError::Collective {
                rank: self.rank,
                world: self.world,
                message: format!("an earlier collective failed: {first}"),
            });
        }
        Ok(self.seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// When a read or write that starts now must be done: rank 0 waits `timeout` for a rank;
    /// the others wait longer for rank 0, which names a dead rank first (module docs).
    pub(crate) fn deadline(&self) -> Instant {
        let grace = if self.rank == 0 {
            Duration::ZERO
        } else {
            self.timeout.min(Duration::from_secs(5))
        };
        Instant::now() + self.timeout + grace
    }

    pub(crate) fn link(&self, peer: usize) -> &TcpStream {
        let i = if self.rank == 0 { peer } else { 0 };
        self.links[i]
            .as_ref()
            .expect("a link to every peer (rank 0) or to rank 0 (the others)")
    }

    /// Send `data` as one frame.
    pub(crate) fn send<T: Wire>(
        &self,
        peer: usize,
        op: Op,
        seq: u64,
        data: &[T],
    ) -> Result<(), DistError> {
        let d = self.deadline();
        let s = self.link(peer);
        (|| -> Result<(), LinkError> {
            write_header(s, op, seq, (data.len() * T::SIZE) as u64, d)?;
            let mut buf = vec![0u8; CHUNK.min(data.len() * T::SIZE)];
            for part in data.chunks(CHUNK / T::SIZE) {
                let bytes = &mut buf[..part.len() * T::SIZE];
                for (x, out) in part.iter().zip(bytes.chunks_exact_mut(T::SIZE)) {
                    x.put(out);
                }
                write_full(s, bytes, d)?;
            }
            Ok(())
        })()
        .map_err(|e| self.fail(peer, op, e))
    }

    /// Receive a frame of exactly `n` values, handing them to `f(offset, values)` in pieces.
    pub(crate) fn recv_with<T: Wire>(
        &self,
        peer: usize,
        op: Op,
        seq: u64,
        n: usize,
        mut f: impl FnMut(usize, &[T]),
    ) -> Result<(), DistError> {
        let d = self.deadline();
        let s = self.link(peer);
        (|| -> Result<(), LinkError> {
            expect_header(s, op, seq, Some((n * T::SIZE) as u64), d)?;
            let per = CHUNK / T::SIZE;
            let mut bytes = vec![0u8; CHUNK.min(n * T::SIZE)];
            let mut vals = vec![T::default(); per.min(n)];
            let mut at = 0;
            while at < n {
                let k = per.min(n - at);
                read_full(s, &mut bytes[..k * T::SIZE], d)?;
                for (v, b) in vals.iter_mut().zip(bytes.chunks_exact(T::SIZE)).take(k) {
                    *v = T::get(b);
                }
                f(at, &vals[..k]);
                at += k;
            }
            Ok(())
        })()
        .map_err(|e| self.fail(peer, op, e))
    }

    /// Turn a link failure into an error naming the peer; remember it, and on rank 0 tell the
    /// other ranks why the job ends.
    pub(crate) fn fail(&self, peer: usize, op: Op, e: LinkError) -> DistError {
        let t = secs(self.timeout);
        let what = op.name();
        let message = match e {
            LinkError::Io(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "rank {peer} did not answer within {t} during {what} (dist.timeout_s): it is \
                     stalled, dead or unreachable"
                ),
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => format!(
                    "rank {peer} closed its connection during {what}: it exited or was killed \
                     (see its log)"
                ),
                _ => format!("talking to rank {peer} during {what}: {e}"),
            },
            LinkError::Protocol(m) => format!("rank {peer} during {what}: {m}"),
            LinkError::Aborted(m) => format!("rank 0 stopped the job: {m}"),
        };
        {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_none() {
                *failed = Some(message.clone());
            }
        }
        if self.rank == 0 {
            // Best effort, the failed rank included (it may be alive and merely out of step).
            for other in 1..self.world {
                let _ = send_abort(self.link(other), &message);
            }
        }
        DistError::Collective {
            rank: self.rank,
            world: self.world,
            message,
        }
    }
}

/// Helpers for tests (in-process ranks on threads).
#[doc(hidden)]
pub mod testing {
    use super::*;
    use std::net::TcpListener;

    /// Join `world` ranks on threads on a free loopback port; `f(rank, rendezvous)` on each.
    /// Returns each rank's result, in rank order.
    pub fn on_threads<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(usize, Rendezvous) -> T + Send + Sync + 'static,
    ) -> Vec<Result<T, DistError>> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("its address").to_string();
        let f = std::sync::Arc::new(f);
        let mut handles = Vec::new();
        let mut listener = Some(listener);
        for rank in 0..world {
            let (f, addr) = (f.clone(), addr.clone());
            let l = if rank == 0 { listener.take() } else { None };
            handles.push(std::thread::spawn(move || {
                let rv = match l {
                    Some(l) => Rendezvous::host(l, world, timeout),
                    None => Rendezvous::connect(rank, world, &addr, timeout),
                }?;
                Ok(f(rank, rv))
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank thread panicked"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::on_threads;
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn broadcast_gather_all_gather() {
        let out = on_threads(3, T, |rank, rv| {
            let mut id = if rank == 0 {
                b"nccl-id".to_vec()
            } else {
                Vec::new()
            };
            rv.broadcast(&mut id).unwrap();
            let mine = vec![rank as u8; rank + 1];
            let g = rv.gather(&mine).unwrap();
            let a = rv.all_gather(&mine).unwrap();
            (id, g, a)
        });
        let expect: Vec<Vec<u8>> = (0..3).map(|r| vec![r as u8; r + 1]).collect();
        for (rank, r) in out.into_iter().enumerate() {
            let (id, g, a) = r.unwrap();
            assert_eq!(id, b"nccl-id");
            assert_eq!(a, expect);
            assert_eq!(g, if rank == 0 { expect.clone() } else { vec![] });
        }
    }

    #[test]
    fn different_collectives_are_an_error_not_garbage() {
        let out = on_threads(2, T, |rank, rv| {
            if rank == 0 {
                rv.gather(b"x").map(|_| ())
            } else {
                rv.all_gather(b"y").map(|_| ())
            }
        });
        let e = out[0].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("all_gather") && e.contains("(gather"), "{e}");
        // Rank 1 hears why from rank 0 instead of waiting for its timeout.
        let e = out[1].as_ref().unwrap().as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 0 stopped the job"), "{e}");
    }
}
