//! The wire: every message is a frame, a 24-byte header (magic, [`Op`], sequence number,
//! payload length, little-endian) and the payload; every read and write has a deadline.
//! [`expect_header`] turns a frame from another collective into an error naming both, and an
//! abort frame into [`LinkError::Aborted`].

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5254_4b50; // "PKTR"
/// The version of this protocol, sent in a rank's hello.
pub(super) const PROTOCOL: u32 = 1;
const HEADER: usize = 24;
/// Payload bytes per read or write of a streamed collective.
pub(super) const CHUNK: usize = 1 << 20;
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

    pub(super) fn name(self) -> &'static str {
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

/// A failure on one link, before it is turned into a [`super::DistError`] naming the peer.
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

pub(super) trait GetLe {
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

pub(super) fn read_full(mut s: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
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

pub(super) fn write_full(mut s: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
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

pub(super) fn write_header(
    s: &TcpStream,
    op: Op,
    seq: u64,
    len: u64,
    deadline: Instant,
) -> io::Result<()> {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(op as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..].copy_from_slice(&len.to_le_bytes());
    write_full(s, &h, deadline)
}

pub(super) fn read_header(s: &TcpStream, deadline: Instant) -> Result<(Op, u64, u64), LinkError> {
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
pub(super) fn expect_header(
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

pub(super) fn read_message(
    s: &TcpStream,
    len: u64,
    deadline: Instant,
) -> Result<String, LinkError> {
    if len > MAX_SMALL {
        return Err(LinkError::Protocol(format!("a message of {len} bytes")));
    }
    let mut b = vec![0u8; len as usize];
    read_full(s, &mut b, deadline)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

pub(super) fn send_abort(s: &TcpStream, message: &str) -> io::Result<()> {
    let d = Instant::now() + ABORT_WRITE;
    let m = &message.as_bytes()[..message.len().min(MAX_SMALL as usize)];
    write_header(s, Op::Abort, 0, m.len() as u64, d)?;
    write_full(s, m, d)
}
