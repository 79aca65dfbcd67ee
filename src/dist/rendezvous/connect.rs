//! Joining the job: rank 0 listens and greets every rank's hello ([`Rendezvous::host`]); the
//! others connect, retrying until `dist.timeout_s`, and wait for the welcome
//! ([`Rendezvous::connect`]). A rank that claims a bad rank, world size or protocol version
//! is refused on both sides.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::frame::{
    read_full, read_header, read_message, send_abort, write_full, write_header, GetLe, LinkError,
    Op, PROTOCOL,
};
use super::{secs, Rendezvous};
use crate::dist::DistError;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

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
}
