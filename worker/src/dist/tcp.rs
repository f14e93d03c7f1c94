//! Rendezvous, liveness and an ordered all-reduce over plain TCP.
//!
//! Rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects (retrying
//! until rank 0 is up), says who it is and where its ring listener is, and gets back every rank's
//! ring address plus an opaque payload (NCCL's unique id). Rank 0 names the ranks that did not
//! arrive within the timeout. Each rank then connects to its successor in the ring and accepts its
//! predecessor.
//!
//! Liveness: the rendezvous connections stay open. A watchdog thread reads them; a peer that goes
//! away without saying goodbye ([`Collective::finish`]) makes this process exit with
//! [`exit::PEER_LOST`], even when it is blocked inside a collective that would otherwise never end.
//!
//! The all-reduce adds in one fixed order ([`Collective::sum_in_order`]): the sum starts at rank 0
//! and passes down the ranks, each adding its own parts, then the last rank's total goes round the
//! ring; both passes are pipelined in 1 MiB chunks, each rank sending to its successor while it
//! receives from its predecessor, so every link carries the buffer once each way (a ring
//! all-reduce's 2·(world−1)/world of it, for large buffers). The total is copied verbatim, so every
//! rank ends with bitwise the same values, and because floating-point addition happens in one
//! order, the same parts split over any number of ranks give the same bits. Every message carries
//! its collective's sequence number and length, so ranks that disagree fail loudly instead of
//! mixing.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use pretrain_crd::contract::exit;
use serde::{Deserialize, Serialize};

use super::{Collective, DistError, Result};

/// How to join a gang.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rank 0's rendezvous address, `host:port`.
    pub master: String,
    /// This process's rank.
    pub rank: usize,
    /// Processes in the gang.
    pub world: usize,
    /// What the gang trains (run, stage, config hash): ranks of another gang are turned away.
    pub gang: String,
    /// How long rank 0 waits for everyone, and the others for rank 0.
    pub rendezvous_timeout: Duration,
    /// How long a collective waits for a peer.
    pub timeout: Duration,
    /// Exit the process with [`exit::PEER_LOST`] when a peer disappears.
    pub watchdog: bool,
}

const PROTOCOL: &str = "pretrain-dist/1";
const MAGIC: u32 = 0x7072_6431; // "prd1"

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    protocol: String,
    gang: String,
    rank: usize,
    world: usize,
    /// Port of the ring listener (the host is the address rank 0 sees the connection from).
    ring_port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    /// Ring listener of every rank; rank 0's host is left empty (use `MASTER_ADDR`).
    peers: Vec<String>,
    /// Hex-encoded bytes chosen by rank 0.
    payload: String,
}

/// A gang that met: its ring addresses, rank 0's payload, and the open liveness connections.
#[derive(Debug)]
pub struct Membership {
    /// This process's rank.
    pub rank: usize,
    /// Processes in the gang.
    pub world: usize,
    /// The bytes rank 0 chose (NCCL's unique id).
    pub payload: Vec<u8>,
    peers: Vec<String>,
    ring: TcpListener,
    /// (peer rank, connection): to every other rank on rank 0, to rank 0 elsewhere.
    control: Vec<(usize, TcpStream)>,
}

fn rendezvous_error(options: &Options, reason: impl Into<String>) -> DistError {
    DistError::Rendezvous { master: options.master.clone(), reason: reason.into() }
}

fn master_port(options: &Options) -> Result<u16> {
    options
        .master
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| rendezvous_error(options, "MASTER_ADDR:MASTER_PORT is not host:port"))
}

fn read_line(stream: &TcpStream, limit: Duration) -> std::io::Result<String> {
    stream.set_read_timeout(Some(limit.max(Duration::from_millis(1))))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line)
}

fn write_line(mut stream: &TcpStream, value: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string(value).map_err(std::io::Error::other)?;
    text.push('\n');
    stream.write_all(text.as_bytes())
}

/// Waits for a connection on a listener until `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                return Ok(Some((stream, addr)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr`, retrying (rank 0 or its DNS name may not be up yet) until `deadline`.
fn connect_until(addr: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let mut last = String::from("not tried");
    while Instant::now() < deadline {
        let attempt = addr.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut addrs| {
            let a = addrs.next().ok_or_else(|| "resolves to no address".to_string())?;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            TcpStream::connect_timeout(&a, left.min(Duration::from_secs(5))).map_err(|e| e.to_string())
        });
        match attempt {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last)
}

/// Rank 0's side of the rendezvous: accepts every other rank of the gang before `deadline`, turning
/// away connections that are not of this gang; each arrived rank's control stream and ring address.
fn gather(options: &Options, listener: &TcpListener, deadline: Instant) -> Result<Vec<Option<(TcpStream, String)>>> {
    let world = options.world;
    let io = |what: &str, e: std::io::Error| rendezvous_error(options, format!("{what}: {e}"));
    let mut arrived: Vec<Option<(TcpStream, String)>> = (0..world).map(|_| None).collect();
    let mut missing = world - 1;
    while missing > 0 {
        let Some((stream, addr)) = accept_until(listener, deadline).map_err(|e| io("accept", e))? else {
            let absent: Vec<String> = (1..world).filter(|r| arrived[*r].is_none()).map(|r| r.to_string()).collect();
            return Err(rendezvous_error(
                options,
                format!(
                    "rank{} {} of {world} did not arrive within {:.0} s (set {} to wait longer)",
                    if absent.len() == 1 { "" } else { "s" },
                    absent.join(", "),
                    options.rendezvous_timeout.as_secs_f64(),
                    super::ENV_RENDEZVOUS_TIMEOUT
                ),
            ));
        };
        let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(10));
        let Ok(hello) = read_line(&stream, left).map(|l| serde_json::from_str::<Hello>(&l)) else {
            continue; // Not one of ours (a port scan, a health check): keep waiting.
        };
        let Ok(hello) = hello else { continue };
        if hello.protocol != PROTOCOL || hello.gang != options.gang || hello.world != world {
            eprintln!(
                "rendezvous: turned away {addr}: it is rank {} of {} in gang {:?} ({}), this is a gang of {world} for {:?} ({PROTOCOL})",
                hello.rank, hello.world, hello.gang, hello.protocol, options.gang
            );
            continue;
        }
        if hello.rank == 0 || hello.rank >= world || arrived[hello.rank].is_some() {
            return Err(rendezvous_error(
                options,
                format!("rank {} arrived twice or is out of range (from {addr})", hello.rank),
            ));
        }
        arrived[hello.rank] = Some((stream, format!("{}:{}", addr.ip(), hello.ring_port)));
        missing -= 1;
    }
    Ok(arrived)
}

/// Meets the gang: on rank 0 `payload` is called once and its bytes reach every rank.
pub fn rendezvous(options: &Options, payload: impl FnOnce() -> Result<Vec<u8>>) -> Result<Membership> {
    let (rank, world) = (options.rank, options.world);
    if world == 0 || rank >= world {
        return Err(rendezvous_error(options, format!("rank {rank} is not below the world size {world}")));
    }
    let deadline = Instant::now() + options.rendezvous_timeout;
    let ring =
        TcpListener::bind(("0.0.0.0", 0)).map_err(|e| rendezvous_error(options, format!("ring listener: {e}")))?;
    let ring_port = ring.local_addr().map_err(|e| rendezvous_error(options, e.to_string()))?.port();
    let io = |what: &str, e: std::io::Error| rendezvous_error(options, format!("{what}: {e}"));

    if rank == 0 {
        let port = master_port(options)?;
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| io(&format!("listening on port {port}"), e))?;
        let arrived = gather(options, &listener, deadline)?;
        let bytes = payload()?;
        let mut peers = vec![format!(":{ring_port}")];
        peers.extend(arrived.iter().skip(1).map(|a| a.as_ref().expect("all arrived").1.clone()));
        let welcome = Welcome { peers: peers.clone(), payload: hex::encode(&bytes) };
        let mut control = Vec::new();
        for (r, slot) in arrived.into_iter().enumerate().skip(1) {
            let (stream, _) = slot.expect("all arrived");
            write_line(&stream, &welcome).map_err(|e| io(&format!("welcoming rank {r}"), e))?;
            control.push((r, stream));
        }
        let peers = peers.into_iter().map(|p| with_host(&p, options)).collect();
        return Ok(Membership { rank, world, payload: bytes, peers, ring, control });
    }

    let stream = connect_until(&options.master, deadline).map_err(|e| {
        rendezvous_error(
            options,
            format!("rank 0 did not answer within {:.0} s: {e}", options.rendezvous_timeout.as_secs_f64()),
        )
    })?;
    let hello = Hello { protocol: PROTOCOL.into(), gang: options.gang.clone(), rank, world, ring_port };
    write_line(&stream, &hello).map_err(|e| io("hello", e))?;
    let line = read_line(&stream, deadline.saturating_duration_since(Instant::now())).map_err(|e| {
        rendezvous_error(options, format!("rank 0 accepted rank {rank} but the gang did not complete in time: {e}"))
    })?;
    let welcome: Welcome =
        serde_json::from_str(&line).map_err(|e| rendezvous_error(options, format!("rank 0's answer: {e}")))?;
    let payload = hex::decode(&welcome.payload).map_err(|e| rendezvous_error(options, format!("payload: {e}")))?;
    if welcome.peers.len() != world {
        return Err(rendezvous_error(options, format!("rank 0 listed {} ranks, not {world}", welcome.peers.len())));
    }
    let peers = welcome.peers.iter().map(|p| with_host(p, options)).collect();
    Ok(Membership { rank, world, payload, peers, ring, control: vec![(0, stream)] })
}

/// Rank 0's ring address has no host in the welcome: it is `MASTER_ADDR`'s.
fn with_host(peer: &str, options: &Options) -> String {
    match peer.strip_prefix(':') {
        Some(port) => {
            let host = options.master.rsplit_once(':').map_or(options.master.as_str(), |(h, _)| h);
            format!("{host}:{port}")
        }
        None => peer.to_string(),
    }
}

const BYE: &str = "bye";

impl Membership {
    /// Starts one thread per liveness connection: a peer that closes it without a goodbye ends this
    /// process with [`exit::PEER_LOST`].
    pub fn watch(&self) -> Result<()> {
        for (peer, stream) in &self.control {
            let (peer, rank) = (*peer, self.rank);
            let stream = stream
                .try_clone()
                .map_err(|e| DistError::Backend(format!("liveness connection to rank {peer}: {e}")))?;
            std::thread::Builder::new()
                .name(format!("watch-rank-{peer}"))
                .spawn(move || {
                    let _ = stream.set_read_timeout(None);
                    let mut line = String::new();
                    let said = BufReader::new(&stream).read_line(&mut line);
                    if matches!(said, Ok(n) if n > 0) && line.trim() == BYE {
                        return;
                    }
                    let why = match said {
                        Ok(_) => "closed its connection without finishing".to_string(),
                        Err(e) => e.to_string(),
                    };
                    eprintln!(
                        "rank {rank}: rank {peer} is gone ({why}); stopping so the gang restarts from its last checkpoint"
                    );
                    std::process::exit(exit::PEER_LOST);
                })
                .map_err(|e| DistError::Backend(format!("watchdog thread: {e}")))?;
        }
        Ok(())
    }

    /// Says goodbye on the liveness connections.
    pub fn finish(&mut self) {
        for (_, stream) in self.control.drain(..) {
            let _ = (&stream).write_all(format!("{BYE}\n").as_bytes());
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

/// The ring all-reduce's connections.
#[derive(Debug)]
pub struct Ring {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
    seq: u64,
    timeout: Duration,
    membership: Membership,
}

const OP_SUM: u32 = 1;
const OP_BROADCAST: u32 = 2;
const OP_RESULT: u32 = 3;

/// Values per message of the ordered sum's pipeline (1 MiB).
const CHUNK: usize = 1 << 18;

fn op_name(op: u32) -> &'static str {
    match op {
        OP_BROADCAST => "broadcast",
        OP_RESULT => "all-reduce (result)",
        _ => "all-reduce",
    }
}

impl Ring {
    /// Meets the gang and closes the ring.
    pub fn connect(options: &Options) -> Result<Self> {
        let membership = rendezvous(options, || Ok(Vec::new()))?;
        Self::from_membership(membership, options)
    }

    /// Closes the ring of a gang that met.
    pub fn from_membership(membership: Membership, options: &Options) -> Result<Self> {
        let (rank, world) = (membership.rank, membership.world);
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + options.rendezvous_timeout;
        let fail = |reason: String| rendezvous_error(options, reason);
        let next = connect_until(&membership.peers[next_rank], deadline).map_err(|e| {
            fail(format!("ring connection to rank {next_rank} at {}: {e}", membership.peers[next_rank]))
        })?;
        (&next)
            .write_all(&[MAGIC.to_le_bytes(), (rank as u32).to_le_bytes()].concat())
            .map_err(|e| fail(format!("ring hello to rank {next_rank}: {e}")))?;
        let prev = loop {
            let Some((stream, addr)) =
                accept_until(&membership.ring, deadline).map_err(|e| fail(format!("ring accept: {e}")))?
            else {
                return Err(fail(format!("rank {prev_rank} did not join the ring in time")));
            };
            let mut hello = [0u8; 8];
            stream
                .set_read_timeout(Some(
                    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                ))
                .map_err(|e| fail(e.to_string()))?;
            if (&stream).read_exact(&mut hello).is_err()
                || hello[..4] != MAGIC.to_le_bytes()
                || u32::from_le_bytes(hello[4..].try_into().expect("4 bytes")) as usize != prev_rank
            {
                eprintln!("ring: ignored a connection from {addr} that is not rank {prev_rank}");
                continue;
            }
            break stream;
        };
        prev.set_read_timeout(Some(options.timeout)).map_err(|e| fail(e.to_string()))?;
        next.set_write_timeout(Some(options.timeout)).map_err(|e| fail(e.to_string()))?;
        if options.watchdog {
            membership.watch()?;
        }
        Ok(Self { rank, world, next, prev, seq: 0, timeout: options.timeout, membership })
    }

    fn peer_error(&self, op: u32, peer: usize, e: &std::io::Error) -> DistError {
        let reason = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "nothing for {:.0} s (stalled or unreachable; {} sets the limit)",
                self.timeout.as_secs_f64(),
                super::ENV_TIMEOUT
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                format!("connection lost ({e}): the rank exited or crashed")
            }
            _ => e.to_string(),
        };
        DistError::Peer { op: op_name(op), seq: self.seq, peer, reason }
    }

    /// Sends `send` to the successor while receiving `len` values from the predecessor.
    fn exchange(&mut self, op: u32, send: Option<&[f32]>, len: Option<usize>) -> Result<Vec<f32>> {
        let (next_rank, prev_rank) = ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world);
        let header = |n: usize| {
            let mut h = Vec::with_capacity(24 + 4 * n);
            h.extend_from_slice(&MAGIC.to_le_bytes());
            h.extend_from_slice(&op.to_le_bytes());
            h.extend_from_slice(&self.seq.to_le_bytes());
            h.extend_from_slice(&(n as u64).to_le_bytes());
            h
        };
        let message = send.map(|values| {
            let mut m = header(values.len());
            for v in values {
                m.extend_from_slice(&v.to_le_bytes());
            }
            m
        });
        let seq = self.seq;
        let (next, prev) = (&self.next, &self.prev);
        let (sent, received) = std::thread::scope(|s| {
            let writer = message.map(|m| s.spawn(move || (&*next).write_all(&m)));
            let received = len.map(|n| -> std::io::Result<std::result::Result<Vec<f32>, String>> {
                let mut h = [0u8; 24];
                (&*prev).read_exact(&mut h)?;
                let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
                let long = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
                if word(0) != MAGIC || word(4) != op || long(8) != seq || long(16) != n as u64 {
                    return Ok(Err(format!(
                        "out of step: sent {} #{} of {} values, expected {} #{seq} of {n}",
                        op_name(word(4)),
                        long(8),
                        long(16),
                        op_name(op)
                    )));
                }
                let mut bytes = vec![0u8; 4 * n];
                (&*prev).read_exact(&mut bytes)?;
                Ok(Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()))
            });
            let sent = writer.map(|w| w.join().expect("the ring writer does not panic"));
            (sent, received)
        });
        if let Some(Err(e)) = sent {
            return Err(self.peer_error(op, next_rank, &e));
        }
        match received {
            None => Ok(Vec::new()),
            Some(Ok(Ok(values))) => Ok(values),
            Some(Ok(Err(reason))) => Err(DistError::Peer { op: op_name(op), seq, peer: prev_rank, reason }),
            Some(Err(e)) => Err(self.peer_error(op, prev_rank, &e)),
        }
    }

    /// Passes `data` down the chain of ranks in the order of `position` (0 first), pipelined in
    /// chunks of [`CHUNK`] values: at step `s` the rank at position `p` sends chunk `s - p` to its
    /// successor while it receives chunk `s - p + 1` from its predecessor, which it stores in `data`
    /// and hands to `arrived` (its range) before passing it on. The last position sends nothing.
    fn relay(
        &mut self,
        op: u32,
        position: usize,
        data: &mut [f32],
        mut arrived: impl FnMut(&mut [f32], std::ops::Range<usize>),
    ) -> Result<()> {
        let (w, n) = (self.world, data.len());
        let chunks = n.div_ceil(CHUNK).max(1);
        let bounds = |k: usize| (k * CHUNK).min(n)..((k + 1) * CHUNK).min(n);
        for s in 0..chunks + w - 2 {
            let send = s.checked_sub(position).filter(|k| *k < chunks && position + 1 < w);
            let recv = (s + 1).checked_sub(position).filter(|k| *k < chunks && position > 0);
            if send.is_none() && recv.is_none() {
                continue;
            }
            let incoming = self.exchange(op, send.map(|k| &data[bounds(k)]), recv.map(|k| bounds(k).len()))?;
            if let Some(k) = recv {
                data[bounds(k)].copy_from_slice(&incoming);
                arrived(data, bounds(k));
            }
        }
        Ok(())
    }

    /// The ordered sum: rank 0 adds its parts and passes the sum down the ranks, each adding its
    /// own parts in order as the chunks arrive; the last rank's total then goes round the ring to
    /// every other rank. Pipelined, each link carries the data once each way, as a ring all-reduce's
    /// does, and the additions happen in one order whatever the number of ranks.
    fn chain_sum(&mut self, parts: &[Vec<f32>]) -> Result<Vec<f32>> {
        let (w, r) = (self.world, self.rank);
        let n = parts.first().map_or(0, Vec::len);
        if parts.is_empty() || parts.iter().any(|p| p.len() != n) {
            return Err(DistError::Backend(format!("rank {r}: an ordered sum needs parts of one length")));
        }
        let add = |data: &mut [f32], range: std::ops::Range<usize>, parts: &[Vec<f32>]| {
            for part in parts {
                for (d, v) in data[range.clone()].iter_mut().zip(&part[range.clone()]) {
                    *d += v;
                }
            }
        };
        let mut data = if r == 0 {
            let mut data = parts[0].clone();
            add(&mut data, 0..n, &parts[1..]);
            data
        } else {
            vec![0f32; n]
        };
        if w > 1 {
            self.relay(OP_SUM, r, &mut data, |data, range| add(data, range, parts))?;
            self.relay(OP_RESULT, (r + 1) % w, &mut data, |_, _| {})?;
        }
        self.seq += 1;
        Ok(data)
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn sum_in_order(&mut self, parts: &[Tensor]) -> Result<Tensor> {
        let device = parts.first().map_or(Device::Cpu, |p| p.device().clone());
        let parts =
            parts.iter().map(|p| p.to_dtype(DType::F32)?.to_vec1::<f32>()).collect::<candle_core::Result<Vec<_>>>()?;
        let sum = self.chain_sum(&parts)?;
        let n = sum.len();
        Ok(Tensor::from_vec(sum, n, &device)?)
    }

    fn broadcast(&mut self, flat: &Tensor, root: usize) -> Result<Tensor> {
        let n = flat.elem_count();
        let next = (self.rank + 1) % self.world;
        let out = if self.rank == root {
            let data = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            self.exchange(OP_BROADCAST, Some(&data), None)?;
            data
        } else {
            let data = self.exchange(OP_BROADCAST, None, Some(n))?;
            if next != root {
                self.exchange(OP_BROADCAST, Some(&data), None)?;
            }
            data
        };
        self.seq += 1;
        Ok(Tensor::from_vec(out, n, flat.device())?)
    }

    fn barrier(&mut self) -> Result<()> {
        // Nobody has the sum before every rank has added to it.
        self.chain_sum(&[vec![0.0]]).map(drop)
    }

    fn finish(&mut self) -> Result<()> {
        self.barrier()?;
        self.membership.finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn options(port: u16, rank: usize, world: usize) -> Options {
        Options {
            master: format!("127.0.0.1:{port}"),
            rank,
            world,
            gang: "test".into(),
            rendezvous_timeout: Duration::from_secs(20),
            timeout: Duration::from_secs(20),
            watchdog: false,
        }
    }

    /// Runs `f` on `world` ranks (threads), each with its own ring.
    fn gang<T: Send>(world: usize, f: impl Fn(&mut Ring) -> T + Sync) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let mut ring = Ring::connect(&options(port, rank, world)).unwrap();
                        let out = f(&mut ring);
                        ring.finish().unwrap();
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Part `g` of 8: values of very different sizes, so that the order of the additions shows.
    fn part(g: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + g * 13) % 11) as f32 * 10f32.powi(((i + 3 * g) % 9) as i32 - 4) - 0.3 * g as f32)
            .collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn the_ordered_sum_gives_the_same_bits_for_any_split_over_any_number_of_ranks() {
        const GROUPS: usize = 8;
        // Lengths of one value, of a part of a chunk, and of three chunks (the last one short).
        for n in [1, 1001, 2 * CHUNK + 5] {
            let parts: Vec<Vec<f32>> = (0..GROUPS).map(|g| part(g, n)).collect();
            let mut expected = parts[0].clone();
            for p in &parts[1..] {
                for (e, v) in expected.iter_mut().zip(p) {
                    *e += v;
                }
            }
            // The order matters for these values: adding them in pairs gives other bits.
            let pairs: Vec<f32> = (0..n)
                .map(|i| {
                    ((parts[0][i] + parts[1][i]) + (parts[2][i] + parts[3][i]))
                        + ((parts[4][i] + parts[5][i]) + (parts[6][i] + parts[7][i]))
                })
                .collect();
            assert!(n == 1 || bits(&pairs) != bits(&expected), "n {n}: a test whose order cannot show");
            for world in [2, 3, 5, 8] {
                let results = gang(world, |ring| {
                    let rank = ring.rank();
                    let own: Vec<Tensor> = (rank * GROUPS / world..(rank + 1) * GROUPS / world)
                        .map(|g| Tensor::from_vec(parts[g].clone(), n, &Device::Cpu).unwrap())
                        .collect();
                    ring.sum_in_order(&own).unwrap().to_vec1::<f32>().unwrap()
                });
                for (rank, got) in results.iter().enumerate() {
                    assert!(bits(got) == bits(&expected), "n {n}, world {world}, rank {rank}: other bits");
                }
            }
        }
    }

    #[test]
    fn broadcast_copies_the_root_and_barrier_returns() {
        let results = gang(3, |ring| {
            let rank = ring.rank();
            let t = Tensor::from_vec(vec![rank as f32; 5], 5, &candle_core::Device::Cpu).unwrap();
            let from_1 = ring.broadcast(&t, 1).unwrap().to_vec1::<f32>().unwrap();
            ring.barrier().unwrap();
            let from_0 = ring.broadcast(&t, 0).unwrap().to_vec1::<f32>().unwrap();
            (from_1, from_0)
        });
        for (from_1, from_0) in results {
            assert_eq!(from_1, vec![1.0; 5]);
            assert_eq!(from_0, vec![0.0; 5]);
        }
    }

    #[test]
    fn rendezvous_names_the_ranks_that_did_not_arrive() {
        let port = free_port();
        let mut rank0 = options(port, 0, 4);
        rank0.rendezvous_timeout = Duration::from_millis(500);
        let joiner = std::thread::spawn(move || {
            let mut o = options(port, 2, 4);
            o.rendezvous_timeout = Duration::from_secs(3);
            rendezvous(&o, || Ok(Vec::new()))
        });
        let err = rendezvous(&rank0, || Ok(Vec::new())).unwrap_err().to_string();
        assert!(err.contains("ranks 1, 3 of 4 did not arrive"), "{err}");
        let err = joiner.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("did not complete"), "{err}");
    }

    #[test]
    fn a_rank_of_another_gang_is_turned_away() {
        let port = free_port();
        let mut rank0 = options(port, 0, 2);
        rank0.rendezvous_timeout = Duration::from_millis(800);
        let stranger = std::thread::spawn(move || {
            let mut o = options(port, 1, 2);
            o.gang = "another run".into();
            o.rendezvous_timeout = Duration::from_secs(2);
            rendezvous(&o, || Ok(Vec::new()))
        });
        let err = rendezvous(&rank0, || Ok(Vec::new())).unwrap_err().to_string();
        assert!(err.contains("rank 1 of 2 did not arrive"), "{err}");
        assert!(stranger.join().unwrap().is_err());
    }

    #[test]
    fn a_rank_that_dies_fails_its_neighbours_instead_of_hanging() {
        let port = free_port();
        let results: Vec<Result<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let mut ring = Ring::connect(&options(port, rank, 3))?;
                        let t = Tensor::zeros(64, DType::F32, &candle_core::Device::Cpu)?;
                        ring.sum_in_order(std::slice::from_ref(&t))?;
                        if rank == 2 {
                            // Dies: its sockets close without a goodbye.
                            return Err(DistError::Backend("rank 2 died".into()));
                        }
                        ring.sum_in_order(&[t])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, r) in results.iter().enumerate().take(2) {
            let err = r.as_ref().unwrap_err().to_string();
            assert!(err.starts_with("all-reduce") && err.contains(" #1: rank"), "rank {rank}: {err}");
        }
    }
}
