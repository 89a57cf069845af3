//! Replication: the primary mirrors every journal record to its replicas.
//!
//! - [`wire`]: the protocol codec (see `docs/REPLICATION.md`).
//! - [`link`]: the primary's side of one (volume, replica) connection.
//! - [`session`]: the replica's side.
//! - [`frames`]: reading and writing frames on a tokio-uring socket.
//! - [`keepalive`]: the primary's PINGs, also while its send loop waits.
//! - [`accept`]: the replica's listener, routing each primary to its volume's core.

pub mod accept;
pub mod bitmap;
pub mod frames;
pub mod keepalive;
pub mod link;
pub mod plan;
pub mod reader;
pub mod resync;
pub mod session;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

pub use mirrorblk_admin::{Mode, OnReplicaLoss, ReplicaState};

/// Another node, by name and replication address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node name.
    pub name: String,
    /// Its `--replication-listen` address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Peer, String> {
        let (name, addr) = s.split_once('=').ok_or_else(|| {
            format!("peer '{s}' must look like NAME=HOST:PORT, e.g. node2=127.0.0.1:10810")
        })?;
        let addr = addr
            .parse()
            .map_err(|e| format!("peer '{s}': '{addr}' is not HOST:PORT ({e})"))?;
        if name.is_empty() {
            return Err(format!("peer '{s}' has an empty name"));
        }
        Ok(Peer {
            name: name.to_string(),
            addr,
        })
    }
}

/// Validated replication settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Where replicas accept their primary.
    pub listen: Option<SocketAddr>,
    /// The other nodes.
    pub peers: Vec<Peer>,
    /// The shared secret (file contents).
    pub secret: Vec<u8>,
    /// Acknowledgement mode.
    pub mode: Mode,
    /// In `sync` mode, how many replicas must have a write durable (None: all in-sync ones).
    pub min_sync_replicas: Option<usize>,
    /// A silent peer is dead after this long.
    pub heartbeat_timeout: Duration,
    /// Policy when a replica is lost.
    pub on_replica_loss: OnReplicaLoss,
    /// In `async` mode, the most payload bytes a replica may trail by.
    pub max_lag: u64,
    /// Resync bandwidth per replica, bytes per second.
    pub resync_rate: u64,
    /// Mutual TLS on every link (`--replication-tls`).
    pub tls: Option<crate::tls::Material>,
}

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use tokio::sync::Notify;

use crate::engine::ReplicationHooks;
use crate::journal::{Journal, Record};
use crate::units::Lsn;

/// A primary of a newer epoch exists: this node was replaced and must stop
/// acting as primary. Links and sessions return it; the control plane
/// decides what follows (demote and restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The newer epoch seen.
    pub by_epoch: crate::units::Epoch,
}

/// Where a primary's link to one replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not connected yet (or reconnecting).
    Connecting,
    /// Connected, sending records the replica missed from the journal file.
    CatchingUp,
    /// Connected and streaming live records from memory.
    InSync,
    /// Lost (heartbeat timeout, error) or unable to catch up; the reason.
    OutOfSync(String),
}

impl Phase {
    /// Short name for status and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::CatchingUp => "catching-up",
            Phase::InSync => "in-sync",
            Phase::OutOfSync(_) => "out-of-sync",
        }
    }
}

/// The primary's view of one replica of one volume.
pub struct LinkState {
    /// The peer.
    pub peer: Peer,
    /// Where it stands.
    pub phase: RefCell<Phase>,
    /// Next LSN to send.
    pub sent_next: Cell<Lsn>,
    /// Every LSN below this has been received by the replica.
    pub received_next: Cell<Lsn>,
    /// Every LSN below this is durable on the replica.
    pub durable_next: Cell<Lsn>,
    /// Whether the primary keeps journal records the replica has not
    /// acknowledged (dropped when the journal runs short of space).
    pub retain: Cell<bool>,
    /// Last heartbeat round trip, in microseconds.
    pub rtt_us: Cell<u64>,
    /// The resync or verify pass running on the connection, if any.
    pub job: RefCell<Option<resync::Job>>,
    /// Regions the replica may lack that the journal no longer holds (persistent).
    pub oos: RefCell<bitmap::OutOfSync>,
    /// The next LSN when this primary started (its recovery's end).
    pub startup_next: Lsn,
    /// Whether the replica completed a handshake since this primary started.
    pub connected_since_start: Cell<bool>,
    /// Sequence number of the next resync frame on the connection.
    pub resync_seq: Cell<u64>,
    /// A verify asked for by the operator (Some(repair)), started by the send loop.
    pub verify_request: Cell<Option<bool>>,
    /// The outcome of the last verify pass.
    pub last_verify: RefCell<Option<mirrorblk_admin::VerifyStatus>>,
    /// With `--durability flush`: a barrier is asked for every LSN below
    /// this (a FLUSH or FUA write waits on the replica's durable LSN).
    pub barrier_wanted: Cell<Lsn>,
    /// Every LSN below this is covered by a barrier sent on the current
    /// connection (or was durable on the replica when it connected).
    pub barrier_sent: Cell<Lsn>,
    /// Woken when new records can be sent.
    pub wake: Notify,
    /// Its metrics.
    pub metrics: crate::telemetry::ReplicaMetrics,
}

impl LinkState {
    /// Whether a resync pass runs on the link (it streams live records
    /// meanwhile, but its replica is Inconsistent).
    pub fn resyncing(&self) -> bool {
        self.job
            .borrow()
            .as_ref()
            .is_some_and(|j| matches!(j.kind, resync::JobKind::Resync { .. }))
    }

    /// Whether the link counts toward acknowledgements: in sync and not
    /// resyncing. A replica in resync is Inconsistent and could not be
    /// promoted, so a write it holds is not safe yet.
    pub fn counts_for_ack(&self) -> bool {
        self.replica_state() == ReplicaState::InSync
    }

    /// Where the link stands, as `status` reports it: its phase, except
    /// that an in-sync link with a resync running is `Resyncing`.
    pub fn replica_state(&self) -> ReplicaState {
        match &*self.phase.borrow() {
            Phase::Connecting => ReplicaState::Connecting,
            Phase::CatchingUp => ReplicaState::CatchingUp,
            Phase::InSync if self.resyncing() => ReplicaState::Resyncing,
            Phase::InSync => ReplicaState::InSync,
            Phase::OutOfSync(_) => ReplicaState::OutOfSync,
        }
    }

    /// The `mirrorblk_replica_state` code: 0 connecting, 1 catching-up,
    /// 2 in-sync, 3 out-of-sync, 4 resyncing (streaming live records while
    /// a resync runs). Derived for the gauge only: no decision reads it.
    pub fn state_code(&self) -> f64 {
        match self.replica_state() {
            ReplicaState::Connecting => 0.0,
            ReplicaState::CatchingUp => 1.0,
            ReplicaState::InSync => 2.0,
            ReplicaState::OutOfSync => 3.0,
            ReplicaState::Resyncing => 4.0,
        }
    }
}

/// How many links must hold a write before it is acknowledged.
fn ack_quorum(
    min_sync_replicas: Option<usize>,
    on_loss: OnReplicaLoss,
    counting: usize,
    links: usize,
) -> usize {
    match (min_sync_replicas, on_loss) {
        (Some(n), _) => n,
        (None, OnReplicaLoss::Degrade) => counting,
        (None, OnReplicaLoss::Block) => links,
    }
}

/// The acknowledgement frontier over the marks of the links that count
/// (each an exclusive frontier: the link has every LSN below it): the
/// `needed`-th highest mark, so that many links have every LSN below it.
/// With `needed` 0 everything is acknowledged; with fewer marks than
/// `needed`, nothing is.
fn frontier(mut marks: Vec<Lsn>, needed: usize) -> Lsn {
    if needed == 0 {
        return Lsn(u64::MAX);
    }
    if marks.len() < needed {
        return Lsn(0);
    }
    marks.sort_unstable_by(|a, b| b.cmp(a));
    marks[needed - 1]
}

/// Caps the frontier at every pinned link's mark: a replica named in sync
/// in the coordinator has every acknowledged write, whatever its phase.
fn pinned_frontier(frontier: Lsn, pinned_marks: impl Iterator<Item = Lsn>) -> Lsn {
    pinned_marks.fold(frontier, Lsn::min)
}

/// The replicas that may be named in sync: in async mode none; otherwise
/// those that count toward acknowledgements and hold every LSN below
/// `acked_next` as writes are acknowledged on (durably; with `--durability
/// flush`, written). Each link is (name, counts for ack, that mark).
fn in_sync_proposal<'a>(
    mode: Mode,
    acked_next: Lsn,
    links: impl Iterator<Item = (&'a str, bool, Lsn)>,
) -> Vec<String> {
    if mode == Mode::Async {
        return Vec::new();
    }
    links
        .filter(|&(_, counts, durable)| counts && durable >= acked_next)
        .map(|(name, _, _)| name.to_string())
        .collect()
}

/// What a client request waits for on the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaWait {
    /// Nothing.
    Nothing,
    /// Async mode: only the lag bound.
    Lag,
    /// Every counted replica has received the record (with
    /// `--durability flush`: written it to its journal).
    Received,
    /// Every counted replica has it durable; with `barrier`, the primary
    /// must first send a BARRIER for it (`--durability flush`: the replica
    /// syncs only when asked).
    Durable {
        /// Whether a barrier must be sent.
        barrier: bool,
    },
}

/// A client request, as far as replication waits are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A write (trim, write-zeroes) without FUA.
    Write,
    /// A write with FUA.
    Fua,
    /// A FLUSH.
    Flush,
}

/// What `request` waits for on the replicas in replication `mode`, with
/// this node's durability mode (`flush_durability`: `--durability flush`).
/// The table in docs/REPLICATION.md, "Durability".
pub fn replica_wait(mode: Mode, flush_durability: bool, request: Request) -> ReplicaWait {
    use ReplicaWait::*;
    match (mode, flush_durability, request) {
        (Mode::Async, _, Request::Flush) => Nothing,
        (Mode::Async, _, _) => Lag,
        // Per write: sync acknowledges every write durable on the replicas,
        // so a FLUSH finds them durable already.
        (Mode::Sync, false, Request::Flush) => Nothing,
        (Mode::Sync, false, _) => Durable { barrier: false },
        (Mode::Flush, false, Request::Write) => Received,
        (Mode::Flush, false, _) => Durable { barrier: false },
        // NBD's contract on every node: a write once the replicas' disks
        // have it, FLUSH and FUA once it is durable there.
        (_, true, Request::Write) => Received,
        (_, true, _) => Durable { barrier: true },
    }
}

/// Whether the primary stops keeping journal records for a link that is
/// not in sync: a replica that is away may hold at most half the journal;
/// past that it stops being waited for and must resync.
fn stop_retaining(retained: bool, in_sync: bool, journal_fill: f64) -> bool {
    retained && !in_sync && journal_fill > 0.5
}

/// The replication state of a primary volume.
pub struct Primary {
    /// The volume's name, for logs.
    pub volume: String,
    /// Settings.
    pub cfg: ReplicationConfig,
    /// One link per peer.
    pub links: Vec<Rc<LinkState>>,
    /// Woken when any link's acknowledgements or phase change, or the
    /// window shrinks (the async lag bound waits on it).
    pub progress: Notify,
    /// Writers waiting for durability on the replicas, woken in LSN order.
    durable_gate: crate::lsn_gate::LsnGate,
    /// Writers waiting for receipt by the replicas (flush mode).
    received_gate: crate::lsn_gate::LsnGate,
    /// Records from reservation until applied locally and sent to every
    /// in-sync link, oldest first, contiguous in LSN. Live records go to
    /// replicas from here without a copy.
    pub window: RefCell<VecDeque<Rc<Record>>>,
    /// Payload bytes in the window.
    pub window_bytes: Cell<u64>,
    /// Resync bandwidth (bytes per second); SIGHUP can change it.
    pub resync_rate: Cell<u64>,
    /// With a coordinator: the replicas whose acknowledgement every write
    /// needs whatever their phase — the in-sync set published in etcd and
    /// every one proposed since (a proposal may have reached etcd even when
    /// its publication failed). Empty without a coordinator.
    pinned: RefCell<Vec<String>>,
    /// The in-sync set the coordinator last published.
    published: RefCell<Vec<String>>,
    /// One past the highest LSN acknowledged to a client.
    acked_next: Cell<Lsn>,
    /// This node runs `--durability flush`: FLUSH and FUA send barriers,
    /// and replicas report written (not received) LSNs.
    pub flush_barriers: bool,
}

impl Primary {
    /// State for a primary volume (named `volume`, `size` bytes, in
    /// `epoch`) whose next LSN is `next`, with `durability`; each peer's
    /// out-of-sync bitmap is loaded from beside `journal`.
    pub fn new(
        cfg: ReplicationConfig,
        next: Lsn,
        volume: &str,
        size: u64,
        epoch: u64,
        journal: &std::path::Path,
        durability: crate::journal::Durability,
    ) -> Primary {
        let links = cfg
            .peers
            .iter()
            .map(|p| {
                let path = bitmap::path_for(journal, &p.name);
                let oos = bitmap::OutOfSync::load(path.clone(), size, epoch).unwrap_or_else(|e| {
                    tracing::error!(volume, peer = %p.name, "cannot read the out-of-sync bitmap {}: {e}; the replica will get a full checksum resync", path.display());
                    bitmap::OutOfSync::new(path, size, epoch)
                });
                Rc::new(LinkState {
                    peer: p.clone(),
                    phase: RefCell::new(Phase::Connecting),
                    sent_next: Cell::new(next),
                    received_next: Cell::new(Lsn(0)),
                    durable_next: Cell::new(Lsn(0)),
                    retain: Cell::new(true),
                    rtt_us: Cell::new(0),
                    job: RefCell::new(None),
                    oos: RefCell::new(oos),
                    startup_next: next,
                    connected_since_start: Cell::new(false),
                    resync_seq: Cell::new(1),
                    verify_request: Cell::new(None),
                    last_verify: RefCell::new(None),
                    barrier_wanted: Cell::new(Lsn(0)),
                    barrier_sent: Cell::new(Lsn(0)),
                    wake: Notify::new(),
                    metrics: crate::telemetry::ReplicaMetrics::new(volume, &p.name),
                })
            })
            .collect();
        let resync_rate = Cell::new(cfg.resync_rate);
        Primary {
            volume: volume.to_string(),
            cfg,
            links,
            progress: Notify::new(),
            durable_gate: crate::lsn_gate::LsnGate::new(),
            received_gate: crate::lsn_gate::LsnGate::new(),
            window: RefCell::new(VecDeque::new()),
            window_bytes: Cell::new(0),
            resync_rate,
            pinned: RefCell::new(Vec::new()),
            published: RefCell::new(Vec::new()),
            acked_next: Cell::new(Lsn(0)),
            flush_barriers: durability == crate::journal::Durability::Flush,
        }
    }

    /// What `request` waits for on the replicas (see [`replica_wait`]).
    pub fn wait_for(&self, request: Request) -> ReplicaWait {
        replica_wait(self.cfg.mode, self.flush_barriers, request)
    }

    /// Asks every link for a barrier covering `lsn` (a FLUSH or FUA write
    /// about to wait on the replicas' durable LSN). Synchronous: a waiter
    /// cancelled later leaves at most one barrier nobody waits for.
    pub fn request_barrier(&self, lsn: Lsn) {
        for l in &self.links {
            if l.barrier_wanted.get() <= lsn {
                l.barrier_wanted.set(lsn.next());
                l.wake.notify_one();
            }
        }
    }

    /// Adds a freshly reserved record and wakes the senders.
    pub fn push(&self, rec: &Rc<Record>) {
        let mut w = self.window.borrow_mut();
        if let Some(last) = w.back() {
            debug_assert_eq!(last.lsn.next(), rec.lsn, "window must be contiguous");
        }
        w.push_back(rec.clone());
        self.window_bytes.set(
            self.window_bytes.get() + rec.payload.as_ref().map(|p| p.len() as u64).unwrap_or(0),
        );
        drop(w);
        for l in &self.links {
            l.wake.notify_one();
        }
    }

    /// The record with `lsn`, if it is still in memory.
    pub fn get(&self, lsn: Lsn) -> Option<Rc<Record>> {
        let w = self.window.borrow();
        let front = w.front()?.lsn;
        let i = lsn.0.checked_sub(front.0)? as usize;
        w.get(i).cloned()
    }

    /// Drops records that are applied (below `applied_next`) and sent to
    /// every in-sync link. Runs after each apply, after a link sends
    /// records and when a link leaves the stream: the window's records hold
    /// pool buffers, which clients (and resync reads) may be waiting for
    /// while nothing is applied.
    pub fn trim(&self, applied_next: Lsn) {
        let floor = self
            .links
            .iter()
            .filter(|l| *l.phase.borrow() == Phase::InSync)
            .map(|l| l.sent_next.get())
            .min()
            .unwrap_or(applied_next)
            .min(applied_next);
        let mut w = self.window.borrow_mut();
        while w.front().is_some_and(|r| r.lsn < floor) {
            let r = w.pop_front().expect("front exists");
            self.window_bytes.set(
                self.window_bytes.get() - r.payload.as_ref().map(|p| p.len() as u64).unwrap_or(0),
            );
        }
        drop(w);
        // Writers held by the async lag bound may proceed.
        self.progress.notify_waiters();
    }

    /// The lowest LSN a retained link still needs (the checkpoint must not
    /// release it), or None.
    pub fn retention_floor(&self) -> Option<Lsn> {
        self.links
            .iter()
            .filter(|l| l.retain.get())
            .map(|l| l.durable_next.get().max(Lsn(1)))
            .min()
    }

    /// Stops keeping journal records for every link that is away while
    /// the journal is more than half full (`stop_retaining`); what they
    /// lack is marked in their bitmaps as the checkpoint releases it.
    /// Returns whether any link was dropped (the retention floor moved).
    /// Runs after each apply and when a link leaves the stream: with the
    /// journal full no apply comes (writers wait for the space), so a link
    /// lost then would otherwise pin the journal until it came back.
    pub fn drop_retention(&self, journal_fill: f64) -> bool {
        let mut dropped = false;
        for l in &self.links {
            let in_sync = *l.phase.borrow() == Phase::InSync;
            if stop_retaining(l.retain.get(), in_sync, journal_fill) {
                l.retain.set(false);
                l.metrics.retention_dropped.increment(1);
                dropped = true;
                tracing::warn!(volume = %self.volume, peer = %l.peer.name, "journal {:.0}% full: no longer keeping records for replica {}; it will need a resync", journal_fill * 100.0, l.peer.name);
                crate::events::emit(crate::events::EventKind::RetentionDropped {
                    volume: self.volume.clone(),
                    peer: l.peer.name.clone(),
                    journal_percent: (journal_fill * 100.0).clamp(0.0, 100.0) as u8,
                });
            }
        }
        dropped
    }

    /// Whether a write with `lsn` may be acknowledged: `durable` asks for
    /// durability on the replicas (sync mode, or FUA/FLUSH in flush mode),
    /// otherwise receipt is enough.
    pub fn acked(&self, lsn: Lsn, durable: bool) -> bool {
        lsn < self.ack_frontier(durable)
    }

    /// The acknowledgement frontier: a write is acknowledged (see
    /// [`Primary::acked`]) exactly when its LSN is below it. It is the
    /// `needed`-th highest mark among the in-sync links (that many links
    /// have every LSN below it), and no higher than any pinned link's mark.
    pub fn ack_frontier(&self, durable: bool) -> Lsn {
        let mark = |l: &LinkState| {
            if durable {
                l.durable_next.get()
            } else {
                l.received_next.get()
            }
        };
        let counting: Vec<Lsn> = self
            .links
            .iter()
            .filter(|l| l.counts_for_ack())
            .map(|l| mark(l))
            .collect();
        let pinned = self.pinned.borrow();
        let pinned_marks = self
            .links
            .iter()
            .filter(|l| pinned.contains(&l.peer.name))
            .map(|l| mark(l));
        let needed = ack_quorum(
            self.cfg.min_sync_replicas,
            self.cfg.on_replica_loss,
            counting.len(),
            self.links.len(),
        );
        pinned_frontier(frontier(counting, needed), pinned_marks)
    }

    /// Notes that the write with `lsn` is being acknowledged to a client.
    pub fn note_acked(&self, lsn: Lsn) {
        self.acked_next.set(self.acked_next.get().max(lsn.next()));
    }

    /// With a coordinator: the replicas that have every write acknowledged
    /// so far and count toward acknowledgements, which the coordinator is
    /// about to publish as the in-sync set. From now on every write waits
    /// for them too (and for the published ones, until the new set is
    /// published): a replica is never named in sync in etcd while a write
    /// it lacks can be acknowledged. In async mode no replica has every
    /// acknowledged write, so none is ever proposed.
    pub fn propose_in_sync(&self) -> Vec<String> {
        let proposal = in_sync_proposal(
            self.cfg.mode,
            self.acked_next.get(),
            self.links.iter().map(|l| {
                let mark = if self.flush_barriers {
                    l.received_next.get()
                } else {
                    l.durable_next.get()
                };
                (l.peer.name.as_str(), l.counts_for_ack(), mark)
            }),
        );
        // Pinned sets only grow until a publication is confirmed: a
        // publication that timed out may still have reached etcd.
        let mut pinned = self.pinned.borrow_mut();
        for p in &proposal {
            if !pinned.contains(p) {
                pinned.push(p.clone());
            }
        }
        drop(pinned);
        proposal
    }

    /// The coordinator published `set` as the in-sync set: writes stop
    /// waiting for the replicas outside it that are not in sync.
    pub fn set_published(&self, set: Vec<String>) {
        *self.pinned.borrow_mut() = set.clone();
        *self.published.borrow_mut() = set;
        self.changed();
    }

    /// The in-sync set last published (empty without a coordinator).
    pub fn published(&self) -> Vec<String> {
        self.published.borrow().clone()
    }

    /// Waits until `acked(lsn, durable)` holds.
    pub async fn wait_acked(&self, lsn: Lsn, durable: bool) {
        let gate = if durable {
            &self.durable_gate
        } else {
            &self.received_gate
        };
        loop {
            if self.acked(lsn, durable) {
                return;
            }
            gate.wait(lsn).await;
        }
    }

    /// Acknowledgements or a link's phase changed: wakes the writers that
    /// are now acknowledged, and everyone on `progress`.
    pub fn changed(&self) {
        self.progress.notify_waiters();
        self.durable_gate.release_below(self.ack_frontier(true));
        self.received_gate.release_below(self.ack_frontier(false));
    }

    /// In async mode: waits while the replicas trail by more than `max_lag`.
    pub async fn wait_lag(&self) {
        loop {
            let notified = self.progress.notified();
            if self.window_bytes.get() <= self.cfg.max_lag {
                return;
            }
            notified.await;
        }
    }

    /// Marks a link's phase and wakes everyone who waits on acknowledgements.
    pub fn set_phase(&self, link: &LinkState, phase: Phase) {
        let changed = *link.phase.borrow() != phase;
        if changed {
            match &phase {
                Phase::OutOfSync(why) => {
                    tracing::warn!(peer = %link.peer.name, "replica out of sync: {why}")
                }
                p => tracing::info!(peer = %link.peer.name, "replica {}", p.name()),
            }
        }
        *link.phase.borrow_mut() = phase;
        link.metrics.state.set(link.state_code());
        self.changed();
    }
}

impl Primary {
    /// Sets each replica's lag and out-of-sync gauges from the current
    /// state (a lost replica sends no acks, so a timer calls this too).
    pub fn refresh_gauges(&self, journal: &Journal) {
        let next = journal.next_lsn();
        for l in &self.links {
            if *l.phase.borrow() == Phase::InSync {
                l.metrics.state.set(l.state_code());
            }
            let durable = l.durable_next.get();
            l.metrics
                .lag_lsn
                .set(next.0.saturating_sub(durable.0) as f64);
            l.metrics
                .lag_bytes
                .set(journal.retained_bytes_from(durable) as f64);
            l.metrics.out_of_sync.set(l.oos.borrow().bytes() as f64);
        }
    }

    /// Why a verify cannot start now (a replica not in sync, or busy with a
    /// pass), one phrase per replica; empty when every one is ready.
    pub fn verify_blockers(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| *l.phase.borrow() != Phase::InSync || l.job.borrow().is_some())
            .map(|l| {
                let state = if l.job.borrow().is_some() {
                    "busy resyncing"
                } else {
                    l.phase.borrow().name()
                };
                format!("{} is {state}", l.peer.name)
            })
            .collect()
    }

    /// Why a resize cannot start now: a resync or verify pass runs (or is
    /// asked for) on some link, and passes are planned over the volume's
    /// regions as of their start. One phrase per such replica.
    pub fn resize_blockers(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| l.job.borrow().is_some() || l.verify_request.get().is_some())
            .map(|l| {
                let what = match l.job.borrow().as_ref().map(|j| j.kind) {
                    Some(resync::JobKind::Verify { .. }) | None => "verify",
                    Some(resync::JobKind::Resync { .. }) => "resync",
                };
                format!("a {what} of {} is running", l.peer.name)
            })
            .collect()
    }

    /// Asks each link to run a verify pass of a volume of `size` bytes
    /// (the send loop starts it); the caller checked
    /// [`Primary::verify_blockers`].
    pub fn start_verify(&self, repair: bool, size: u64) {
        for l in &self.links {
            // Shown as running until the send loop starts (and then ends) the pass.
            *l.last_verify.borrow_mut() = Some(mirrorblk_admin::VerifyStatus {
                running: true,
                repair,
                done_bytes: 0,
                total_bytes: size,
                differing: Vec::new(),
                busy: Vec::new(),
                region_bytes: bitmap::REGION,
                aborted: None,
                seconds: 0.0,
            });
            l.verify_request.set(Some(repair));
            l.wake.notify_one();
        }
    }
}

impl ReplicationHooks for Primary {
    fn reserved(&self, rec: &Rc<Record>) {
        if let Some(size) = rec.new_size() {
            // Every record after this one may touch the new regions: each
            // replica's bitmap must cover them before any is released.
            for l in &self.links {
                l.oos.borrow_mut().resize(size);
            }
        }
        self.push(rec);
    }

    fn applied(&self, applied_next: Lsn, journal: &Journal) {
        self.trim(applied_next);
        self.drop_retention(journal.fill_ratio());
    }

    fn retention_floor(&self) -> Option<Lsn> {
        Primary::retention_floor(self)
    }

    /// Every replica that does not have the released records durably gets
    /// their regions marked in its out-of-sync bitmap, persisted first (a
    /// later bitmap resync sends them).
    fn before_release(&self, target: Lsn, journal: &Journal) -> std::io::Result<()> {
        let from_all = journal.checkpoint_lsn();
        for l in &self.links {
            let from = l.durable_next.get().max(from_all);
            if from >= target {
                continue;
            }
            let mut oos = l.oos.borrow_mut();
            let mut job = l.job.borrow_mut();
            for (offset, len) in journal.retained_extents(from, target) {
                oos.mark(offset, len);
                if let Some(j) = job.as_mut() {
                    for r in oos.regions_touched(offset, len) {
                        j.on_mark(r);
                    }
                }
            }
            oos.persist_if_dirty()?;
            l.metrics.out_of_sync.set(oos.bytes() as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_is_the_needed_th_highest_mark() {
        let l = |v: &[u64]| v.iter().map(|&x| Lsn(x)).collect::<Vec<_>>();
        // (marks of the links that count, needed, frontier)
        let table: &[(&[u64], usize, u64)] = &[
            (&[], 0, u64::MAX),
            (&[5], 0, u64::MAX),
            (&[], 1, 0),
            (&[7], 1, 7),
            (&[7, 3], 1, 7),
            (&[7, 3], 2, 3),
            (&[3, 9, 7], 2, 7),
            (&[3, 9, 7], 3, 3),
            (&[3, 9], 3, 0),
        ];
        for &(marks, needed, want) in table {
            assert_eq!(
                frontier(l(marks), needed),
                Lsn(want),
                "{marks:?} needed {needed}"
            );
        }
    }

    #[test]
    fn the_quorum_follows_the_settings() {
        use OnReplicaLoss::{Block, Degrade};
        // (min_sync_replicas, on loss, links counting, links, needed)
        let table = [
            (None, Degrade, 2, 2, 2),
            (None, Degrade, 1, 2, 1),
            (None, Degrade, 0, 2, 0),
            (None, Block, 1, 2, 2),
            (None, Block, 0, 1, 1),
            (Some(1), Degrade, 0, 2, 1),
            (Some(1), Block, 2, 2, 1),
            (Some(0), Block, 0, 2, 0),
        ];
        for (min, on_loss, counting, links, want) in table {
            assert_eq!(
                ack_quorum(min, on_loss, counting, links),
                want,
                "{min:?} {on_loss:?} {counting}/{links}"
            );
        }
    }

    #[test]
    fn a_pinned_link_caps_the_frontier() {
        assert_eq!(pinned_frontier(Lsn(9), [].into_iter()), Lsn(9));
        assert_eq!(
            pinned_frontier(Lsn(9), [Lsn(4), Lsn(12)].into_iter()),
            Lsn(4)
        );
        assert_eq!(pinned_frontier(Lsn(u64::MAX), [Lsn(7)].into_iter()), Lsn(7));
    }

    #[test]
    fn only_counting_replicas_with_every_acknowledged_write_are_proposed() {
        // (mode, acked_next, links (name, counts, durable_next), proposal)
        type Row = (
            Mode,
            u64,
            &'static [(&'static str, bool, u64)],
            &'static [&'static str],
        );
        let table: &[Row] = &[
            (
                Mode::Sync,
                10,
                &[("a", true, 10), ("b", true, 12)],
                &["a", "b"],
            ),
            (Mode::Sync, 10, &[("a", true, 9), ("b", true, 12)], &["b"]),
            (Mode::Sync, 10, &[("a", false, 20)], &[]),
            (Mode::Flush, 0, &[("a", true, 0)], &["a"]),
            (Mode::Async, 0, &[("a", true, 50)], &[]),
        ];
        for &(mode, acked, links, want) in table {
            let got = in_sync_proposal(
                mode,
                Lsn(acked),
                links.iter().map(|&(n, c, d)| (n, c, Lsn(d))),
            );
            assert_eq!(got, want, "{mode:?} acked {acked} {links:?}");
        }
    }

    /// A primary of a 1 MiB volume with replicas "a" and "b", both in sync
    /// with every LSN below 10 durable.
    fn two_replica_primary(dir: &std::path::Path) -> Primary {
        let peer = |n: &str| Peer {
            name: n.into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
        };
        let cfg = ReplicationConfig {
            listen: None,
            peers: vec![peer("a"), peer("b")],
            secret: vec![0; 16],
            mode: Mode::Sync,
            min_sync_replicas: None,
            heartbeat_timeout: Duration::from_secs(5),
            on_replica_loss: OnReplicaLoss::Degrade,
            max_lag: 0,
            resync_rate: 1,
            tls: None,
        };
        let p = Primary::new(
            cfg,
            Lsn(10),
            "v",
            1 << 20,
            1,
            &dir.join("journal"),
            crate::journal::Durability::PerWrite,
        );
        for l in &p.links {
            *l.phase.borrow_mut() = Phase::InSync;
            l.durable_next.set(Lsn(10));
        }
        p
    }

    #[test]
    fn a_replica_named_in_sync_caps_acknowledgements_until_a_set_without_it_is_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = two_replica_primary(dir.path());
        let (a, b) = (&p.links[0], &p.links[1]);
        p.note_acked(Lsn(9));
        assert_eq!(p.propose_in_sync(), ["a", "b"]);
        p.set_published(vec!["a".into(), "b".into()]);
        // b is lost; a moves on.
        *b.phase.borrow_mut() = Phase::OutOfSync("lost".into());
        a.durable_next.set(Lsn(20));
        assert_eq!(p.ack_frontier(true), Lsn(10), "b is still named in sync");
        assert_eq!(p.propose_in_sync(), ["a"]);
        assert_eq!(p.ack_frontier(true), Lsn(10), "not published yet");
        p.set_published(vec!["a".into()]);
        assert_eq!(p.ack_frontier(true), Lsn(20));
    }

    #[test]
    fn a_proposal_stays_pinned_until_a_later_publication_is_confirmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = two_replica_primary(dir.path());
        let (a, b) = (&p.links[0], &p.links[1]);
        // Only a is proposed; its publication fails (it may have landed).
        *b.phase.borrow_mut() = Phase::Connecting;
        assert_eq!(p.propose_in_sync(), ["a"]);
        // Then a is lost before the next proposal.
        *a.phase.borrow_mut() = Phase::OutOfSync("lost".into());
        b.durable_next.set(Lsn(30));
        *b.phase.borrow_mut() = Phase::InSync;
        assert_eq!(p.propose_in_sync(), ["b"]);
        assert_eq!(p.ack_frontier(true), Lsn(10), "a may be named in etcd");
        p.set_published(vec!["b".into()]);
        assert_eq!(p.ack_frontier(true), Lsn(30));
    }

    #[test]
    fn each_request_waits_for_what_the_modes_promise() {
        use ReplicaWait::*;
        use Request::{Flush, Fua, Write};
        let durable = Durable { barrier: false };
        let barrier = Durable { barrier: true };
        // (replication mode, --durability flush, request, wait)
        let table = [
            (Mode::Sync, false, Write, durable),
            (Mode::Sync, false, Fua, durable),
            (Mode::Sync, false, Flush, Nothing),
            (Mode::Flush, false, Write, Received),
            (Mode::Flush, false, Fua, durable),
            (Mode::Flush, false, Flush, durable),
            (Mode::Async, false, Write, Lag),
            (Mode::Async, false, Fua, Lag),
            (Mode::Async, false, Flush, Nothing),
            (Mode::Sync, true, Write, Received),
            (Mode::Sync, true, Fua, barrier),
            (Mode::Sync, true, Flush, barrier),
            (Mode::Flush, true, Write, Received),
            (Mode::Flush, true, Fua, barrier),
            (Mode::Flush, true, Flush, barrier),
            (Mode::Async, true, Write, Lag),
            (Mode::Async, true, Fua, Lag),
            (Mode::Async, true, Flush, Nothing),
        ];
        for (mode, flush, request, want) in table {
            assert_eq!(
                replica_wait(mode, flush, request),
                want,
                "{mode:?} flush durability {flush} {request:?}"
            );
        }
    }

    #[test]
    fn a_barrier_request_only_raises_each_links_frontier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = two_replica_primary(dir.path());
        p.request_barrier(Lsn(12));
        p.request_barrier(Lsn(7));
        for l in &p.links {
            assert_eq!(l.barrier_wanted.get(), Lsn(13));
        }
    }

    #[test]
    fn retention_stops_only_for_an_absent_replica_past_half_the_journal() {
        assert!(stop_retaining(true, false, 0.51));
        assert!(!stop_retaining(true, false, 0.5));
        assert!(
            !stop_retaining(true, true, 0.9),
            "an in-sync replica is kept"
        );
        assert!(!stop_retaining(false, false, 0.9), "already dropped");
    }
}
