//! Replication: the primary mirrors every journal record to its replicas.
//!
//! - [`wire`]: the protocol codec (see `docs/REPLICATION.md`).
//! - [`link`]: the primary's side of one (volume, replica) connection.
//! - [`session`]: the replica's side.
//! - [`frames`]: reading and writing frames on a tokio-uring socket.
//! - [`accept`]: the replica's listener, routing each primary to its volume's core.

pub mod accept;
pub mod bitmap;
pub mod frames;
pub mod link;
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
}

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use tokio::sync::Notify;

use crate::journal::Record;
use crate::units::Lsn;

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
    /// Woken when new records can be sent.
    pub wake: Notify,
    /// Its metrics.
    pub metrics: crate::telemetry::ReplicaMetrics,
}

impl LinkState {
    /// Where the link stands, as `status` reports it: its phase, except
    /// that an in-sync link with a resync running is `Resyncing`.
    pub fn replica_state(&self) -> ReplicaState {
        let resyncing = self
            .job
            .borrow()
            .as_ref()
            .is_some_and(|j| matches!(j.kind, resync::JobKind::Resync { .. }));
        match &*self.phase.borrow() {
            Phase::Connecting => ReplicaState::Connecting,
            Phase::CatchingUp => ReplicaState::CatchingUp,
            Phase::InSync if resyncing => ReplicaState::Resyncing,
            Phase::InSync => ReplicaState::InSync,
            Phase::OutOfSync(_) => ReplicaState::OutOfSync,
        }
    }

    /// The `mirrorblk_replica_state` code: 0 connecting, 1 catching-up,
    /// 2 in-sync, 3 out-of-sync, 4 resyncing (streaming live records while
    /// a resync runs).
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

/// The replication state of a primary volume.
pub struct Primary {
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
}

impl Primary {
    /// State for a primary volume (named `volume`, `size` bytes, in
    /// `epoch`) whose next LSN is `next`; each peer's out-of-sync bitmap is
    /// loaded from beside `journal`.
    pub fn new(
        cfg: ReplicationConfig,
        next: Lsn,
        volume: &str,
        size: u64,
        epoch: u64,
        journal: &std::path::Path,
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
                    wake: Notify::new(),
                    metrics: crate::telemetry::ReplicaMetrics::new(volume, &p.name),
                })
            })
            .collect();
        let resync_rate = Cell::new(cfg.resync_rate);
        Primary {
            cfg,
            links,
            progress: Notify::new(),
            durable_gate: crate::lsn_gate::LsnGate::new(),
            received_gate: crate::lsn_gate::LsnGate::new(),
            window: RefCell::new(VecDeque::new()),
            window_bytes: Cell::new(0),
            resync_rate,
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
    /// every in-sync link.
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

    /// Whether a write with `lsn` may be acknowledged: `durable` asks for
    /// durability on the replicas (sync mode, or FUA/FLUSH in flush mode),
    /// otherwise receipt is enough.
    pub fn acked(&self, lsn: Lsn, durable: bool) -> bool {
        lsn < self.ack_frontier(durable)
    }

    /// The acknowledgement frontier: a write is acknowledged (see
    /// [`Primary::acked`]) exactly when its LSN is below it. It is the
    /// `needed`-th highest mark among the in-sync links: that many links
    /// have every LSN below it.
    pub fn ack_frontier(&self, durable: bool) -> Lsn {
        // A link that streams live records while a resync runs does not
        // count: its replica is Inconsistent and could not be promoted.
        let mut marks: Vec<Lsn> = self
            .links
            .iter()
            .filter(|l| l.state_code() == 2.0)
            .map(|l| {
                if durable {
                    l.durable_next.get()
                } else {
                    l.received_next.get()
                }
            })
            .collect();
        let needed = match (self.cfg.min_sync_replicas, self.cfg.on_replica_loss) {
            (Some(n), _) => n,
            (None, OnReplicaLoss::Degrade) => marks.len(),
            (None, OnReplicaLoss::Block) => self.links.len(),
        };
        if needed == 0 {
            return Lsn(u64::MAX);
        }
        if marks.len() < needed {
            return Lsn(0);
        }
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks[needed - 1]
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
