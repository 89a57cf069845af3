//! The crash model shared by the kill -9 tests (`tests/crash.rs`) and the
//! power-cut tests (`tests/powercut.rs`): pipelined writes of versioned
//! blocks with FUA and FLUSH, the set of versions each block may hold
//! afterwards, and the check of a volume read back against it.
//!
//! Every block's contents name the block and the version (a header, then
//! bytes derived from both), so a lost, stale, foreign or torn block is told
//! apart from an allowed one.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nbd::{Client, Command, CommandFlags, Request};

use crate::util::{pattern, Rng};

/// Block size of the crash model: each block holds one version at a time.
pub const BS: usize = 4096;
/// Blocks the writer uses (8 MiB): small enough that blocks are rewritten
/// many times, so stale versions would show.
pub const BLOCKS: u64 = 2048;
/// Requests in flight at once.
pub const DEPTH: usize = 8;
/// The first word of every block the model writes.
pub const MAGIC: u64 = 0x4d42_4c4b_4352_5348; // "MBLKCRSH"

/// The contents of `block` at `version`: a header (magic, block, version)
/// then bytes derived from both, so any mix-up or tear is visible.
pub fn block_content(block: u64, version: u64) -> Vec<u8> {
    let mut v = pattern(
        block.wrapping_mul(0x1_0000_0001) ^ version.rotate_left(32),
        BS,
    );
    v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    v[8..16].copy_from_slice(&block.to_le_bytes());
    v[16..24].copy_from_slice(&version.to_le_bytes());
    v
}

/// What each block may hold after a crash.
pub struct Model {
    /// Per block: the oldest version it may hold (the newest one made durable).
    pub floor: Vec<u64>,
    /// Per block: every version it may hold (issued since the last baseline).
    pub allowed: Vec<Vec<u64>>,
    /// Versions that are write-zeroes (version 0 is the initial zeroes).
    pub zero_versions: HashSet<u64>,
    /// Next version to issue; versions only grow, so "newer" is ">".
    pub next_version: u64,
}

impl Default for Model {
    fn default() -> Model {
        Model::new()
    }
}

impl Model {
    /// All blocks zero (version 0), nothing written yet.
    pub fn new() -> Model {
        Model {
            floor: vec![0; BLOCKS as usize],
            allowed: vec![vec![0]; BLOCKS as usize],
            zero_versions: HashSet::from([0]),
            next_version: 1,
        }
    }

    /// `w` was made durable: no block it wrote may hold an older version.
    pub fn durable(&mut self, w: &Write) {
        for b in w.first..w.first + w.count {
            let f = &mut self.floor[b as usize];
            *f = (*f).max(w.version);
        }
    }

    /// Which version `data` (block `b` as read back) is, if it is allowed.
    pub fn classify(&self, b: u64, data: &[u8]) -> Result<u64, String> {
        let floor = self.floor[b as usize];
        let allowed = &self.allowed[b as usize];
        if data.iter().all(|&x| x == 0) {
            return allowed
                .iter()
                .copied()
                .filter(|v| self.zero_versions.contains(v) && *v >= floor)
                .max()
                .ok_or_else(|| format!("block {b} reads as zeroes, but version {floor} was made durable (allowed versions {allowed:?})"));
        }
        let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
        let (magic, block, version) = (word(0), word(1), word(2));
        if magic != MAGIC || block != b {
            return Err(format!(
                "block {b} holds foreign data (magic {magic:#x}, block {block}, version {version})"
            ));
        }
        if data != block_content(b, version).as_slice() {
            return Err(format!(
                "block {b} holds a torn or corrupted copy of version {version}"
            ));
        }
        if !allowed.contains(&version) {
            return Err(format!("block {b} holds version {version}, which was never written there since the last check (allowed {allowed:?})"));
        }
        if version < floor {
            return Err(format!("block {b} holds version {version}, older than the durable version {floor}: an acknowledged write was lost"));
        }
        Ok(version)
    }

    /// After a successful check and a FLUSH, what was read is the new truth.
    pub fn rebase(&mut self, seen: &[u64]) {
        for (b, &v) in seen.iter().enumerate() {
            self.floor[b] = v;
            self.allowed[b] = vec![v];
        }
    }
}

/// One write (or write-zeroes) of `count` blocks at `first`.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    /// The first block.
    pub first: u64,
    /// How many blocks.
    pub count: u64,
    /// The version written to each of them.
    pub version: u64,
    /// Sent with FUA.
    pub fua: bool,
}

/// A request awaiting its reply.
enum InFlight {
    Write(Write),
    /// A FLUSH covers the writes acknowledged before it was sent.
    Flush(Vec<Write>),
}

/// What one writer run did.
#[derive(Debug, Default)]
pub struct CycleStats {
    /// Writes sent.
    pub submitted: u64,
    /// Writes acknowledged.
    pub acked: u64,
    /// Writes the model now requires to survive.
    pub made_durable: u64,
    /// FLUSHes sent.
    pub flushes: u64,
    /// Errors the server returned (none is expected before the cut).
    pub server_errors: Vec<String>,
}

impl CycleStats {
    /// Adds cycle `cycle`'s figures to these totals; a cycle whose writer
    /// saw server errors before the crash is a failure of the run.
    pub fn add(&mut self, st: &CycleStats, cycle: usize) {
        assert!(
            st.server_errors.is_empty(),
            "cycle {cycle}: server errors before the crash: {:?}",
            st.server_errors
        );
        self.submitted += st.submitted;
        self.acked += st.acked;
        self.made_durable += st.made_durable;
        self.flushes += st.flushes;
    }
}

/// Which acknowledged writes the model requires to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promise {
    /// The NBD contract: FUA writes, and writes acknowledged before a FLUSH
    /// that completed.
    Nbd,
    /// mirrorblkd's own promise (`--help`: "Every write is durable in the
    /// journal ... before it is acknowledged"): every acknowledged write.
    EveryReply,
}

/// How often the writer asks for durability: one request in `flush_one_in`
/// is a FLUSH, one write in `fua_one_in` carries FUA.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// One request in this many is a FLUSH.
    pub flush_one_in: u64,
    /// One write in this many has FUA.
    pub fua_one_in: u64,
}

impl Mix {
    /// The kill -9 tests' mix: a FLUSH in 12 requests, FUA on a write in 4.
    pub const FREQUENT: Mix = Mix {
        flush_one_in: 12,
        fua_one_in: 4,
    };
    /// Rare FLUSH and FUA, so that at a power cut many acknowledged writes
    /// are covered by neither: what tells the NBD contract from per-write
    /// durability.
    pub const RARE: Mix = Mix {
        flush_one_in: 150,
        fua_one_in: 100,
    };
}

/// How long a writer goes on before it records an error, unless a test
/// names its own bound: a safety net, as a kill ends the connection within
/// a second or two.
pub const WRITER_SAFETY_NET: Duration = Duration::from_secs(10);

/// [`writer_with`] in the [`Mix::FREQUENT`] mix, with the safety net
/// [`WRITER_SAFETY_NET`].
pub fn writer(
    c: Client<TcpStream>,
    model: &mut Model,
    rng: &mut Rng,
    promise: Promise,
) -> CycleStats {
    writer_with(c, model, rng, promise, Mix::FREQUENT, WRITER_SAFETY_NET)
}

/// Issues pipelined writes until the connection dies (the daemon was
/// killed), updating the model as replies arrive. Returns what happened;
/// a connection still alive after `safety_net` is a server error (so
/// `safety_net` must exceed the longest the test may take to kill).
pub fn writer_with(
    mut c: Client<TcpStream>,
    model: &mut Model,
    rng: &mut Rng,
    promise: Promise,
    mix: Mix,
    safety_net: Duration,
) -> CycleStats {
    let give_up = Instant::now() + safety_net;
    let mut p = Pipeline::new(promise, mix);
    p.run(&mut c, model, rng, None, give_up);
    p.st
}

/// Issues pipelined writes until `stop`, then waits for every reply: the
/// model then says exactly what each block holds (with
/// [`Promise::EveryReply`], no write left in doubt). Returns what happened;
/// a connection that died shows as the "stopped early" server error.
pub fn writer_until(
    c: &mut Client<TcpStream>,
    model: &mut Model,
    rng: &mut Rng,
    promise: Promise,
    mix: Mix,
    stop: Instant,
) -> CycleStats {
    let give_up = stop + Duration::from_secs(10);
    let mut p = Pipeline::new(promise, mix);
    if !p.run(c, model, rng, Some(stop), give_up) {
        p.st.server_errors
            .push("the connection ended before every reply came".into());
    }
    p.st
}

/// The writer's state: what is in flight, what a FLUSH would cover.
struct Pipeline {
    promise: Promise,
    mix: Mix,
    st: CycleStats,
    inflight: HashMap<u64, InFlight>,
    acked_unflushed: Vec<Write>,
    busy: Vec<bool>,
    flush_inflight: bool,
}

impl Pipeline {
    fn new(promise: Promise, mix: Mix) -> Pipeline {
        Pipeline {
            promise,
            mix,
            st: CycleStats::default(),
            inflight: HashMap::new(),
            acked_unflushed: Vec::new(),
            busy: vec![false; BLOCKS as usize],
            flush_inflight: false,
        }
    }

    /// Submits (until `stop`, if any) and takes replies until the
    /// connection dies (false), or, past `stop`, nothing is in flight
    /// (true). Past `give_up` it records an error and returns true.
    fn run(
        &mut self,
        c: &mut Client<TcpStream>,
        model: &mut Model,
        rng: &mut Rng,
        stop: Option<Instant>,
        give_up: Instant,
    ) -> bool {
        while Instant::now() < give_up {
            let submitting = stop.is_none_or(|s| Instant::now() < s);
            if !submitting && self.inflight.is_empty() {
                return true;
            }
            while submitting && self.inflight.len() < DEPTH {
                match self.submit(c, model, rng) {
                    Some(true) => {}
                    Some(false) => break,
                    None => return false,
                }
            }
            let Ok(r) = c.receive() else { return false };
            self.reply(model, r.cookie, r.error);
        }
        self.st.server_errors.push(
            "the writer was still running at its safety net: nothing ended the connection".into(),
        );
        true
    }

    /// Sends one FLUSH or write: Some(true) sent, Some(false) no block was
    /// free, None the connection is gone.
    fn submit(
        &mut self,
        c: &mut Client<TcpStream>,
        model: &mut Model,
        rng: &mut Rng,
    ) -> Option<bool> {
        if !self.flush_inflight && rng.chance(1, self.mix.flush_one_in) {
            return self.submit_flush(c);
        }
        let cookie = c.next_cookie();
        // Never two writes in flight on one block: their order would be
        // undefined, and the model could not say which must win.
        let count = rng.range(1, 4);
        let Some(first) = (0..8)
            .map(|_| rng.below(BLOCKS - count + 1))
            .find(|&f| (f..f + count).all(|b| !self.busy[b as usize]))
        else {
            return Some(false);
        };
        let version = model.next_version;
        model.next_version += 1;
        let zero = rng.chance(1, 10);
        let w = Write {
            first,
            count,
            version,
            fua: rng.chance(1, self.mix.fua_one_in),
        };
        // Allowed from the moment it may reach the server.
        for b in first..first + count {
            model.allowed[b as usize].push(version);
            self.busy[b as usize] = true;
        }
        let flags = if w.fua {
            CommandFlags::FUA
        } else {
            CommandFlags::empty()
        };
        let (command, payload) = if zero {
            model.zero_versions.insert(version);
            (Command::WriteZeroes, None)
        } else {
            let mut p = Vec::with_capacity(count as usize * BS);
            for b in first..first + count {
                p.extend(block_content(b, version));
            }
            (Command::Write, Some(p))
        };
        let req = Request {
            flags,
            command,
            cookie,
            offset: first * BS as u64,
            length: (count as usize * BS) as u64,
        };
        self.st.submitted += 1;
        c.submit(&req, payload.as_deref()).ok()?;
        self.inflight.insert(cookie, InFlight::Write(w));
        Some(true)
    }

    /// Sends a FLUSH covering the writes answered so far: Some(true) sent,
    /// None the connection is gone.
    fn submit_flush(&mut self, c: &mut Client<TcpStream>) -> Option<bool> {
        let req = Request {
            flags: CommandFlags::empty(),
            command: Command::Flush,
            cookie: c.next_cookie(),
            offset: 0,
            length: 0,
        };
        c.submit(&req, None).ok()?;
        let covered = std::mem::take(&mut self.acked_unflushed);
        self.inflight.insert(req.cookie, InFlight::Flush(covered));
        self.flush_inflight = true;
        self.st.flushes += 1;
        Some(true)
    }

    /// The reply for `cookie` came, with `error` if the server refused.
    fn reply(&mut self, model: &mut Model, cookie: u64, error: Option<u32>) {
        let st = &mut self.st;
        match self.inflight.remove(&cookie) {
            Some(InFlight::Write(w)) => {
                for b in w.first..w.first + w.count {
                    self.busy[b as usize] = false;
                }
                if let Some(code) = error {
                    st.server_errors
                        .push(format!("write {w:?} failed with NBD error {code}"));
                    return;
                }
                st.acked += 1;
                if w.fua || self.promise == Promise::EveryReply {
                    model.durable(&w);
                    st.made_durable += 1;
                } else {
                    self.acked_unflushed.push(w);
                }
            }
            Some(InFlight::Flush(covered)) => {
                self.flush_inflight = false;
                if let Some(code) = error {
                    st.server_errors
                        .push(format!("FLUSH failed with NBD error {code}"));
                    return;
                }
                for w in &covered {
                    model.durable(w);
                }
                st.made_durable += covered.len() as u64;
            }
            None => st
                .server_errors
                .push(format!("reply for unknown cookie {cookie}")),
        }
    }
}

/// Reads every block and checks it against the model; returns the version
/// seen in each block, or the list of violations.
pub fn verify(c: &mut Client<TcpStream>, model: &Model) -> Result<Vec<u64>, Vec<String>> {
    let mut seen = Vec::with_capacity(BLOCKS as usize);
    let mut errors = Vec::new();
    let per_read = 256u64;
    for first in (0..BLOCKS).step_by(per_read as usize) {
        let data = c
            .read(first * BS as u64, (per_read as usize * BS) as u32)
            .expect("read after restart");
        for (i, blk) in data.chunks(BS).enumerate() {
            let b = first + i as u64;
            match model.classify(b, blk) {
                Ok(v) => seen.push(v),
                Err(e) => {
                    errors.push(e);
                    seen.push(0);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(seen)
    } else {
        Err(errors)
    }
}
