//! A client that writes through whichever node serves and records what was
//! acknowledged, by which node and when: the evidence of the failover tests.
//!
//! [`Writer::start`] runs a thread that finds a serving node among its
//! [`Target`]s (asking each one's admin socket where it serves, then trying
//! the NBD handshake: replicas refuse it), writes fresh patterned regions
//! with FUA, pipelined and paced, and when the connection dies records the
//! writes left unanswered and looks for a serving node again (unless it is
//! pinned to its first node). Every region is written once, at increasing
//! offsets, so a read tells exactly which write it holds.
//!
//! [`check_regions`] then says whether a node holds every acknowledged
//! write, and every unanswered one whole or not at all.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd::{Client, Command, CommandFlags, Request};

use crate::cluster::EXPORT;
use crate::util::{first_difference, pattern, KIB4, MIB};

/// How long a reply may take before the writer gives up on the connection
/// (longer than any hold the tests provoke: a held write is not a failure).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the writer looks for a serving node while it has none.
const FIND_POLL: Duration = Duration::from_millis(20);

/// A node the writer may write through.
#[derive(Debug, Clone)]
pub struct Target {
    /// Node name (recorded with each acknowledgement).
    pub name: String,
    /// Its admin socket, asked where it serves.
    pub admin: PathBuf,
}

/// One write: `len` bytes of `pattern(seed)` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Pattern seed.
    pub seed: u64,
}

/// One acknowledged write.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The write.
    pub region: Region,
    /// The node that acknowledged it.
    pub node: String,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// What the writer saw.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Acknowledged writes, in the order the acknowledgements arrived.
    pub acked: Vec<Ack>,
    /// Writes sent on a connection that died before answering them.
    pub unanswered: Vec<Region>,
    /// Error replies and protocol surprises (a held write is none).
    pub errors: Vec<String>,
    /// Each connection: the node and when its handshake completed.
    pub connections: Vec<(String, Instant)>,
    /// Offset past the last region sent.
    pub end: u64,
}

impl Written {
    /// The first acknowledgement by `node` at or after `after`.
    pub fn first_ack_by(&self, node: &str, after: Instant) -> Option<&Ack> {
        self.acked.iter().find(|a| a.node == node && a.at >= after)
    }

    /// The last acknowledgement by `node`.
    pub fn last_ack_by(&self, node: &str) -> Option<&Ack> {
        self.acked.iter().rev().find(|a| a.node == node)
    }

    /// The first acknowledgement at or after `after` by a node other than `not`.
    pub fn first_ack_not_by(&self, not: &str, after: Instant) -> Option<&Ack> {
        self.acked.iter().find(|a| a.node != not && a.at >= after)
    }
}

/// How the writer writes.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// First offset it writes at.
    pub base: u64,
    /// Bytes past `base` it may use (it stops when they are used up).
    pub room: u64,
    /// Writes in flight.
    pub depth: usize,
    /// At most this many bytes per second (0: unpaced).
    pub bytes_per_second: u64,
    /// Seed of the patterns (each write's seed is derived from it).
    pub seed: u64,
    /// After its connection dies, look for a serving node again (false:
    /// pinned to the first node it reached).
    pub reconnect: bool,
    /// It stops by itself after this long.
    pub limit: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            base: 0,
            room: 128 * MIB,
            depth: 4,
            bytes_per_second: 2 * MIB,
            seed: 0x7772_6974,
            reconnect: true,
            limit: Duration::from_secs(150),
        }
    }
}

/// A TCP or Unix connection to a node.
#[derive(Debug)]
pub enum Stream {
    /// To the NBD TCP address.
    Tcp(TcpStream),
    /// To the NBD Unix socket.
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An NBD client of `target` if it serves the export now (its Unix socket
/// when it has one, else its TCP address); None if it is down or refuses.
pub fn connect(target: &Target) -> Option<Client<Stream>> {
    let ready = mirrorblk_admin::probe(&target.admin)?;
    let stream = match &ready.listen.unix {
        Some(path) => {
            let s = UnixStream::connect(path).ok()?;
            s.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
            s.set_write_timeout(Some(REPLY_TIMEOUT)).ok()?;
            Stream::Unix(s)
        }
        None => {
            let s = TcpStream::connect_timeout(&ready.listen.nbd, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
            s.set_write_timeout(Some(REPLY_TIMEOUT)).ok()?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    };
    Client::connect(stream, EXPORT, false).ok()
}

/// The shared state of a running writer.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    written: Mutex<Written>,
    /// A clone of the current connection, to cut it when stopping.
    current: Mutex<Option<Stream>>,
}

/// A running writer (stopped and joined by [`Writer::finish`], or stopped
/// when dropped).
pub struct Writer {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing through whichever of `targets` serves.
    pub fn start(targets: Vec<Target>, config: WriterConfig) -> Writer {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let handle = std::thread::spawn(move || run(&targets, &config, &s));
        Writer {
            shared,
            handle: Some(handle),
        }
    }

    /// A copy of what it saw so far.
    pub fn snapshot(&self) -> Written {
        self.written().clone()
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Written> {
        self.shared
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledged writes so far.
    pub fn acked_count(&self) -> usize {
        self.written().acked.len()
    }

    /// Whether the thread has ended (pinned and cut off, out of room, or
    /// past its limit).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits (polling every 10 ms, at most `timeout`) until `ok` holds for
    /// what it saw, and returns that; None at the deadline.
    pub fn wait_until(&self, timeout: Duration, ok: impl Fn(&Written) -> bool) -> Option<Written> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let w = self.written();
                if ok(&w) {
                    return Some(w.clone());
                }
            }
            if Instant::now() >= deadline || self.is_finished() {
                let w = self.written();
                return ok(&w).then(|| w.clone());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most `limit`) until it has used up its room and every
    /// write is answered, and returns what it saw (stopping it at `limit`).
    pub fn finish_when_out_of_room(self, limit: Duration) -> Written {
        let deadline = Instant::now() + limit;
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.finish(Duration::from_secs(1))
    }

    /// Stops sending, waits up to `grace` for the writes in flight to be
    /// answered, then cuts the connection; returns what it saw.
    pub fn finish(mut self, grace: Duration) -> Written {
        self.stop_and_join(grace);
        self.snapshot()
    }

    fn stop_and_join(&mut self, grace: Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let Some(handle) = self.handle.take() else {
            return;
        };
        let deadline = Instant::now() + grace;
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(s) = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            s.shutdown();
        }
        if handle.join().is_err() {
            self.written()
                .errors
                .push("the writer thread panicked".into());
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop_and_join(Duration::ZERO);
    }
}

/// The writer thread: find a node, write until the connection dies, again.
fn run(targets: &[Target], config: &WriterConfig, shared: &Shared) {
    let started = Instant::now();
    let mut plan = Plan::new(config);
    while !shared.stop.load(Ordering::Relaxed) && started.elapsed() < config.limit {
        let Some((name, client)) = find_serving(targets, shared, started, config.limit) else {
            return;
        };
        if let Some(clone) = client_stream_clone(&client) {
            *shared.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
        }
        record(shared, |w| {
            w.connections.push((name.clone(), Instant::now()))
        });
        let more = write_on(client, &name, &mut plan, config, shared, started);
        if !more || !config.reconnect {
            return;
        }
    }
}

fn client_stream_clone(client: &Client<Stream>) -> Option<Stream> {
    client.get_ref().try_clone().ok()
}

fn record(shared: &Shared, f: impl FnOnce(&mut Written)) {
    f(&mut shared.written.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Polls `targets` in turn until one serves; None when told to stop or past
/// the limit.
fn find_serving(
    targets: &[Target],
    shared: &Shared,
    started: Instant,
    limit: Duration,
) -> Option<(String, Client<Stream>)> {
    while !shared.stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        for t in targets {
            if let Some(c) = connect(t) {
                return Some((t.name.clone(), c));
            }
        }
        std::thread::sleep(FIND_POLL);
    }
    None
}

/// The next regions to write: 4-16 KiB each, one after the other.
struct Plan {
    next: u64,
    limit: u64,
    index: u64,
    seed: u64,
    sent_bytes: u64,
}

impl Plan {
    fn new(config: &WriterConfig) -> Plan {
        Plan {
            next: config.base,
            limit: config.base + config.room,
            index: 0,
            seed: config.seed,
            sent_bytes: 0,
        }
    }

    /// The next region, None when the room is used up.
    fn take(&mut self) -> Option<Region> {
        // Lengths cycle 4, 8, 12, 16 KiB: varied, and replayable without a generator.
        let len = (self.index % 4 + 1) * KIB4;
        if self.next + len > self.limit {
            return None;
        }
        let r = Region {
            offset: self.next,
            len: len as u32,
            seed: self.seed ^ (self.index << 20),
        };
        self.index += 1;
        self.next += len;
        self.sent_bytes += len;
        Some(r)
    }
}

/// Writes on one connection until it dies (true: look for another node),
/// the room is used up, or the writer is stopped or past its limit (false).
fn write_on(
    mut c: Client<Stream>,
    name: &str,
    plan: &mut Plan,
    config: &WriterConfig,
    shared: &Shared,
    started: Instant,
) -> bool {
    let mut inflight: std::collections::HashMap<u64, Region> = std::collections::HashMap::new();
    let mut out_of_room = false;
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed) || started.elapsed() >= config.limit;
        while !stopping
            && !out_of_room
            && inflight.len() < config.depth
            && paced(plan, config, started)
        {
            let Some(r) = plan.take() else {
                out_of_room = true;
                break;
            };
            record(shared, |w| w.end = plan.next);
            let req = Request {
                flags: CommandFlags::FUA,
                command: Command::Write,
                cookie: c.next_cookie(),
                offset: r.offset,
                length: u64::from(r.len),
            };
            inflight.insert(req.cookie, r);
            if c.submit(&req, Some(&pattern(r.seed, r.len as usize)))
                .is_err()
            {
                return lost(shared, inflight);
            }
        }
        if inflight.is_empty() {
            if stopping || out_of_room {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let Ok(reply) = c.receive() else {
            return lost(shared, inflight);
        };
        let at = Instant::now();
        match (inflight.remove(&reply.cookie), reply.error) {
            (Some(region), None) => record(shared, |w| {
                w.acked.push(Ack {
                    region,
                    node: name.to_string(),
                    at,
                })
            }),
            (Some(region), Some(code)) => record(shared, |w| {
                w.errors.push(format!(
                    "{name}: write {region:?} failed with NBD error {code}"
                ))
            }),
            (None, _) => record(shared, |w| {
                w.errors
                    .push(format!("{name}: reply for unknown cookie {}", reply.cookie))
            }),
        }
    }
}

/// Whether pacing lets another write go now.
fn paced(plan: &Plan, config: &WriterConfig, started: Instant) -> bool {
    config.bytes_per_second == 0
        || plan.sent_bytes as f64
            <= started.elapsed().as_secs_f64() * config.bytes_per_second as f64
}

/// Records the writes in flight on a dead connection; true (look again).
fn lost(shared: &Shared, inflight: std::collections::HashMap<u64, Region>) -> bool {
    record(shared, |w| w.unanswered.extend(inflight.into_values()));
    true
}

/// Checks `read(offset, len)` for every region: acknowledged ones hold
/// exactly their data; unanswered ones hold their data or zeroes (a
/// replicated record is whole or absent); 1 MiB past the end (or up to
/// `limit`) is zeroes. Returns the violations, each naming `what`.
pub fn check_regions(
    what: &str,
    w: &Written,
    limit: u64,
    mut read: impl FnMut(u64, u32) -> Vec<u8>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for a in &w.acked {
        let r = a.region;
        let want = pattern(r.seed, r.len as usize);
        if let Some(d) = first_difference(r.offset, &want, &read(r.offset, r.len)) {
            bad.push(format!(
                "{what}: write {r:?} acknowledged by {} is lost: {d}",
                a.node
            ));
        }
    }
    for r in &w.unanswered {
        let got = read(r.offset, r.len);
        let want = pattern(r.seed, r.len as usize);
        if !got.iter().all(|&b| b == 0) && got != want {
            let d = first_difference(r.offset, &want, &got).unwrap_or_default();
            bad.push(format!(
                "{what}: unanswered write {r:?} is neither absent nor whole: {d}"
            ));
        }
    }
    let tail_len = MIB.min(limit.saturating_sub(w.end));
    if tail_len > 0 {
        let tail = read(w.end, tail_len as u32);
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            bad.push(format!(
                "{what}: byte {} past every write is {:#04x}, not zero",
                w.end + i as u64,
                tail[i]
            ));
        }
    }
    bad
}

/// Reads every region of `w` back through `client` and returns the
/// violations of [`check_regions`]; a read that fails is one too.
pub fn check_through<S: Read + Write>(
    what: &str,
    w: &Written,
    limit: u64,
    client: &mut Client<S>,
) -> Vec<String> {
    let mut failed = Vec::new();
    let mut bad = check_regions(what, w, limit, |off, len| {
        client.read(off, len).unwrap_or_else(|e| {
            failed.push(format!("{what}: read of {len} bytes at {off} failed: {e}"));
            Vec::new()
        })
    });
    bad.extend(failed);
    bad
}
