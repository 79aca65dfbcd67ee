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

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::DistError;

const MAGIC: u32 = 0x5254_4b50; // "PKTR"
const PROTOCOL: u32 = 1;
const HEADER: usize = 24;
/// Payload bytes per read or write of a streamed collective.
const CHUNK: usize = 1 << 20;
/// Longest abort message or hello accepted.
const MAX_SMALL: u64 = 1 << 16;
/// How long rank 0 tries to tell the others that the job is over.
const ABORT_WRITE: Duration = Duration::from_secs(2);

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Hello = 1,
    Welcome = 2,
    Abort = 3,
    Broadcast = 4,
    Gather = 5,
    AllGather = 6,
    SumF32 = 7,
    SumF64 = 8,
    ReduceScatterF32 = 9,
    AllGatherF32 = 10,
    GatherF32 = 11,
}

impl Op {
    fn from_u32(v: u32) -> Option<Op> {
        use Op::*;
        [
            Hello,
            Welcome,
            Abort,
            Broadcast,
            Gather,
            AllGather,
            SumF32,
            SumF64,
            ReduceScatterF32,
            AllGatherF32,
            GatherF32,
        ]
        .into_iter()
        .find(|op| *op as u32 == v)
    }

    fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Welcome => "welcome",
            Op::Abort => "abort",
            Op::Broadcast => "broadcast",
            Op::Gather => "gather",
            Op::AllGather => "all_gather",
            Op::SumF32 => "all_reduce_sum",
            Op::SumF64 => "all_reduce_sum_f64",
            Op::ReduceScatterF32 => "reduce_scatter_sum",
            Op::AllGatherF32 => "all_gather",
            Op::GatherF32 => "gather_to_root",
        }
    }
}

/// A failure on one link, before it is turned into a [`DistError`] naming the peer.
#[derive(Debug)]
pub(crate) enum LinkError {
    Io(io::Error),
    /// The peer sent something this rank did not expect.
    Protocol(String),
    /// Rank 0 ended the job and said why.
    Aborted(String),
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

/// A fixed-size number on the wire (little-endian).
pub(crate) trait Wire: Copy + Default {
    const SIZE: usize;
    fn put(self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Self;
}

impl Wire for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Wire for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
}

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
    /// Join the job: rank 0 listens at `addr` (`host:port`; an IP literal is bound as given, a
    /// host name binds every interface on that port), the others connect to it. Returns when
    /// all `world` ranks are connected; errors after `timeout`, naming the address and the
    /// ranks that did not come.
    pub fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<Rendezvous, DistError> {
        let err = |message: String| DistError::Collective {
            rank,
            world,
            message,
        };
        if world == 0 || rank >= world {
            return Err(err(format!("rank {rank} is outside a world of {world}")));
        }
        if rank > 0 {
            return Self::join(rank, world, addr, timeout);
        }
        let bind: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => {
                let port = addr
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .ok_or_else(|| err(format!("{addr:?} is not host:port")))?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
        };
        let listener = TcpListener::bind(bind).map_err(|e| {
            err(format!(
                "cannot listen at {addr} for the rendezvous ({e}); pick another MASTER_PORT"
            ))
        })?;
        Self::host(listener, world, timeout)
    }

    /// Rank 0 on an already bound listener: wait for ranks 1..world to connect.
    pub fn host(
        listener: TcpListener,
        world: usize,
        timeout: Duration,
    ) -> Result<Rendezvous, DistError> {
        let shown = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let err = |message: String| DistError::Collective {
            rank: 0,
            world,
            message,
        };
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("listening at {shown}: {e}")))?;
        while links.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    match Self::greet(&stream, world, deadline) {
                        Ok(r) if r > 0 && r < world && links[r].is_none() => {
                            links[r] = Some(stream)
                        }
                        Ok(r) => {
                            let why = if r == 0 || r >= world {
                                format!("a peer at {from} says it is rank {r} of {world}")
                            } else {
                                format!(
                                    "two processes say they are rank {r} (the second from {from})"
                                )
                            };
                            let _ = send_abort(&stream, &why);
                            return Err(err(why));
                        }
                        Err(LinkError::Protocol(why)) => {
                            let _ = send_abort(&stream, &why);
                            return Err(err(format!("{from}: {why}")));
                        }
                        // Not a packtrain rank (a port probe) or one that gave up: ignore it.
                        Err(e) => tracing::warn!(%from, error = ?e, "ignoring a connection"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| links[r].is_none()).collect();
                        return Err(err(format!(
                            "ranks {missing:?} did not connect to {shown} within {} \
                             (dist.timeout_s); are they running, with the same MASTER_ADDR and \
                             MASTER_PORT?",
                            secs(timeout)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(format!("accepting at {shown}: {e}"))),
            }
        }
        let rv = Rendezvous {
            rank: 0,
            world,
            timeout,
            links,
            seq: AtomicU64::new(0),
            failed: Mutex::new(None),
        };
        for peer in 1..world {
            let d = Instant::now() + timeout;
            let s = rv.link(peer);
            write_header(s, Op::Welcome, 0, 0, d)
                .map_err(|e| rv.fail(peer, Op::Welcome, e.into()))?;
        }
        Ok(rv)
    }

    /// Read a rank's hello; returns the rank it claims.
    fn greet(stream: &TcpStream, world: usize, deadline: Instant) -> Result<usize, LinkError> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let d = deadline.min(Instant::now() + Duration::from_secs(10));
        let (op, _, len) = read_header(stream, d)?;
        if op != Op::Hello || len != 20 {
            return Err(LinkError::Protocol(format!(
                "expected a hello, got {} of {len} bytes",
                op.name()
            )));
        }
        let mut b = [0u8; 20];
        read_full(stream, &mut b, d)?;
        let proto = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let rank = u64::get_le(&b[4..12]) as usize;
        let their_world = u64::get_le(&b[12..20]) as usize;
        if proto != PROTOCOL {
            return Err(LinkError::Protocol(format!(
                "rank {rank} speaks protocol {proto}, rank 0 speaks {PROTOCOL}: mixed packtrain \
                 versions"
            )));
        }
        if their_world != world {
            return Err(LinkError::Protocol(format!(
                "rank {rank} says the world has {their_world} ranks, rank 0 says {world}"
            )));
        }
        Ok(rank)
    }

    /// Ranks 1..: connect to rank 0 at `addr`, retrying until `timeout`.
    fn join(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<Rendezvous, DistError> {
        let err = |message: String| DistError::Collective {
            rank,
            world,
            message,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let last = match Self::try_join(rank, world, addr, deadline) {
                Ok(stream) => {
                    return Ok(Rendezvous {
                        rank,
                        world,
                        timeout,
                        links: vec![Some(stream)],
                        seq: AtomicU64::new(0),
                        failed: Mutex::new(None),
                    })
                }
                Err(LinkError::Aborted(why)) | Err(LinkError::Protocol(why)) => {
                    return Err(err(format!("rank 0 at {addr} refused this rank: {why}")))
                }
                Err(LinkError::Io(e)) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "could not reach rank 0 at {addr} within {} (dist.timeout_s; last error: \
                     {last}); is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same \
                     on every rank?",
                    secs(timeout)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_join(
        rank: usize,
        world: usize,
        addr: &str,
        deadline: Instant,
    ) -> Result<TcpStream, LinkError> {
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to nothing"),
        );
        for a in addr.to_socket_addrs()? {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.clamp(Duration::from_millis(1), Duration::from_secs(2));
            let stream = match TcpStream::connect_timeout(&a, attempt) {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            stream.set_nodelay(true)?;
            let mut hello = [0u8; 20];
            hello[..4].copy_from_slice(&PROTOCOL.to_le_bytes());
            hello[4..12].copy_from_slice(&(rank as u64).to_le_bytes());
            hello[12..].copy_from_slice(&(world as u64).to_le_bytes());
            write_header(&stream, Op::Hello, 0, 20, deadline)?;
            write_full(&stream, &hello, deadline)?;
            let (op, _, len) = read_header(&stream, deadline)?;
            match op {
                Op::Welcome => return Ok(stream),
                Op::Abort => return Err(LinkError::Aborted(read_message(&stream, len, deadline)?)),
                other => {
                    return Err(LinkError::Protocol(format!(
                        "expected a welcome, got {}",
                        other.name()
                    )))
                }
            }
        }
        Err(last.into())
    }

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

trait GetLe {
    fn get_le(b: &[u8]) -> Self;
}
impl GetLe for u64 {
    fn get_le(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_le_bytes(a)
    }
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(d)
    }
}

fn read_full(mut s: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        s.set_read_timeout(Some(left(deadline)?))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_full(mut s: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        s.set_write_timeout(Some(left(deadline)?))?;
        match s.write(&buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_header(s: &TcpStream, op: Op, seq: u64, len: u64, deadline: Instant) -> io::Result<()> {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(op as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..].copy_from_slice(&len.to_le_bytes());
    write_full(s, &h, deadline)
}

fn read_header(s: &TcpStream, deadline: Instant) -> Result<(Op, u64, u64), LinkError> {
    let mut h = [0u8; HEADER];
    read_full(s, &mut h, deadline)?;
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let op = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let (seq, len) = (u64::get_le(&h[8..16]), u64::get_le(&h[16..]));
    match (magic == MAGIC).then(|| Op::from_u32(op)).flatten() {
        Some(op) => Ok((op, seq, len)),
        None => Err(LinkError::Protocol("not a packtrain frame".into())),
    }
}

/// Read a header and check it is collective `seq` of kind `op` (and `len` bytes when given);
/// an abort frame becomes [`LinkError::Aborted`]. Returns the payload length.
fn expect_header(
    s: &TcpStream,
    op: Op,
    seq: u64,
    len: Option<u64>,
    deadline: Instant,
) -> Result<u64, LinkError> {
    let (got, got_seq, got_len) = read_header(s, deadline)?;
    if got == Op::Abort {
        return Err(LinkError::Aborted(read_message(s, got_len, deadline)?));
    }
    if got != op || got_seq != seq || len.is_some_and(|l| l != got_len) {
        let want_len = len.map_or(String::new(), |l| format!(" of {l} bytes"));
        return Err(LinkError::Protocol(format!(
            "it is at collective #{got_seq} ({} of {got_len} bytes) while this rank is at \
             #{seq} ({}{want_len}): the ranks run different code, configs or data",
            got.name(),
            op.name()
        )));
    }
    Ok(got_len)
}

fn read_message(s: &TcpStream, len: u64, deadline: Instant) -> Result<String, LinkError> {
    if len > MAX_SMALL {
        return Err(LinkError::Protocol(format!("a message of {len} bytes")));
    }
    let mut b = vec![0u8; len as usize];
    read_full(s, &mut b, deadline)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn send_abort(s: &TcpStream, message: &str) -> io::Result<()> {
    let d = Instant::now() + ABORT_WRITE;
    let m = &message.as_bytes()[..message.len().min(MAX_SMALL as usize)];
    write_header(s, Op::Abort, 0, m.len() as u64, d)?;
    write_full(s, m, d)
}

/// Helpers for tests (in-process ranks on threads).
#[doc(hidden)]
pub mod testing {
    use super::*;

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
    fn nobody_listening_names_the_address_after_the_timeout() {
        // A port that was free a moment ago; nothing listens on it now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        let e = Rendezvous::connect(1, 2, &addr, Duration::from_millis(600))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(e.contains(&addr) && e.contains("rank 1/2"), "{e}");
    }

    #[test]
    fn missing_ranks_are_named_by_rank_0() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = Rendezvous::host(l, 3, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks [1, 2] did not connect"), "{e}");
    }

    #[test]
    fn a_world_size_mismatch_is_refused_on_both_sides() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let host = std::thread::spawn(move || Rendezvous::host(l, 2, T));
        let e = Rendezvous::connect(1, 3, &addr, T).unwrap_err().to_string();
        assert!(e.contains("says the world has 3 ranks"), "{e}");
        let e = host.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("says the world has 3 ranks"), "{e}");
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
