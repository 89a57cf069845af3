//! The control plane's messages and routes: what the acceptors, the admin
//! socket and the main thread hand a worker core (connections, questions,
//! opened volumes), which core serves which volume, and the cores' liveness.
//! It is the leaf of the control plane: the node assembly, the cores, the
//! admin socket and the NBD acceptor all use it, and it uses none of them;
//! the engine and replication never use it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mirrorblk_admin::{Request, VolumeStatus};
use nbd::{ExportInfo, Negotiated};
use tokio::sync::mpsc;

use crate::config::VolumeConfig;
use crate::journal::format::Role;
use crate::journal::recovery::OpenedJournal;
use crate::replication::accept::IncomingPrimary;
use crate::store::OpenedStore;

/// What a core receives from the rest of the node.
pub enum CoreMsg {
    /// A negotiated client connection for one of its volumes.
    Conn(NewConn),
    /// An admin question about its volumes.
    Admin(CoreQuery),
    /// A primary connecting to one of its (replica) volumes.
    Replica(IncomingPrimary),
    /// New resync bandwidth (bytes per second), from a reload.
    SetResyncRate(u64),
    /// The coordinator's question or order about one of its volumes.
    Coordinate(CoordQuery),
    /// Live restart: stop every connection at a request boundary, finish
    /// what is in flight, close the volumes durably, and send the
    /// connections here (the core then ends).
    HandOver(std::sync::mpsc::Sender<HandedCore>),
    /// Changed-block tracking: what changed in a volume after an LSN.
    Changes(ChangesQuery),
    /// Create, delete or list point-in-time snapshots.
    Snapshot(SnapshotQuery),
    /// A connection of another core's volume, to serve here as a
    /// satellite (reads from the store, the rest forwarded home).
    Satellite(Box<SatelliteConn>),
}

/// A plain export's connection its volume's home core sends to another
/// core.
pub struct SatelliteConn {
    /// The connection.
    pub conn: NewConn,
    /// What serving it there needs.
    pub seed: crate::export::satellite::SatelliteSeed,
    /// Counts it among the volume's connections on that core.
    pub live: LiveConn,
}

/// The core for a volume's next plain-export connection, given how many
/// of its connections each core serves now (`live`, by core index): the
/// least loaded, the home core first on a tie, then the cores after it in
/// turn. A lone client (fio's nbd engine closes its probing connection
/// before it opens the one it works on) therefore stays home and costs no
/// forwarding; several connections at once spread over the cores.
pub fn connection_core(home: usize, live: &[usize]) -> usize {
    assert!(home < live.len(), "core {home} of {}", live.len());
    (0..live.len())
        .map(|k| (home + k) % live.len())
        .min_by_key(|&c| live[c])
        .unwrap_or(home)
}

/// Counts a connection of a volume on one core (for [`connection_core`]);
/// dropping it uncounts it, on whichever core the connection ended.
pub struct LiveConn(Arc<AtomicUsize>);

impl LiveConn {
    /// Counts one more connection in `count`.
    pub fn new(count: &Arc<AtomicUsize>) -> LiveConn {
        count.fetch_add(1, Ordering::Relaxed);
        LiveConn(count.clone())
    }
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot request (`SnapshotCreate`, `SnapshotDelete`, `SnapshotList`),
/// to every core; each one serving a volume it names answers `Some`.
pub struct SnapshotQuery {
    /// The request.
    pub request: Request,
    /// Where the core answers (None: none of its volumes is concerned).
    pub reply: std::sync::mpsc::SyncSender<Option<Result<Vec<mirrorblk_admin::Snapshot>, String>>>,
}

/// "What changed in `volume` after LSN `since`", to every core; the one
/// serving the volume answers `Some`.
pub struct ChangesQuery {
    /// The volume.
    pub volume: String,
    /// The LSN.
    pub since: u64,
    /// Where the core answers (None: not on this core).
    pub reply: std::sync::mpsc::SyncSender<Option<mirrorblk_admin::Changes>>,
}

/// What a core hands over at a live restart.
pub struct HandedCore {
    /// Its connections, stopped at a request boundary.
    pub conns: Vec<crate::export::Quiesced>,
    /// Whether its volumes were drained and checkpointed within the limit.
    pub clean: bool,
}

/// What the coordinator asks of a volume's core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordRequest {
    /// Where the volume stands on this node.
    Position,
    /// On the primary: the replicas to publish as in sync (pinned from now
    /// on; see `Primary::propose_in_sync`).
    ProposeInSync,
    /// On the primary: `set` is published as the in-sync set.
    Published(Vec<String>),
    /// This node won the election: persist the primary role in `epoch`.
    Promote(crate::units::Epoch),
    /// Another node leads (or this one lost its lease): persist the
    /// replica role; the reason, for the event log.
    Demote(String),
}

/// Where a volume stands on this node, for the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Every record below this LSN is durable here.
    pub durable_next: crate::units::Lsn,
    /// This node's epoch.
    pub epoch: crate::units::Epoch,
    /// Whether the store is consistent (no resync unfinished).
    pub consistent: bool,
    /// This node's role.
    pub role: Role,
}

/// A core's answer to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordAnswer {
    /// The answer to [`CoordRequest::Position`].
    Position(Position),
    /// The answer to [`CoordRequest::ProposeInSync`].
    Proposal(Vec<String>),
    /// Done.
    Done,
}

/// A coordinator request about `volume`, with where to answer.
pub struct CoordQuery {
    /// The volume.
    pub volume: String,
    /// The request.
    pub request: CoordRequest,
    /// Where the core answers (or says why it could not).
    pub reply: std::sync::mpsc::SyncSender<Result<CoordAnswer, String>>,
}

/// A question to a core, with where to send its answer.
pub struct CoreQuery {
    /// The request.
    pub request: Request,
    /// Where the core answers with its volumes' part (or why it refused).
    pub reply: std::sync::mpsc::SyncSender<Result<Vec<VolumeStatus>, String>>,
}

/// How many messages may wait for a core before senders wait.
pub const CORE_QUEUE: usize = 64;

/// Which core serves each volume.
#[derive(Clone, Default)]
pub struct Routes(HashMap<String, mpsc::Sender<CoreMsg>>);

impl Routes {
    /// Routes `volume` to the core behind `core`.
    pub fn insert(&mut self, volume: String, core: mpsc::Sender<CoreMsg>) {
        let old = self.0.insert(volume, core);
        assert!(old.is_none(), "a volume is routed to one core");
    }

    /// The core of `volume`.
    pub fn get(&self, volume: &str) -> Option<&mpsc::Sender<CoreMsg>> {
        self.0.get(volume)
    }

    /// The core serving export `name`: a volume, or a snapshot export
    /// `VOLUME@SNAPSHOT` (served by its volume's core).
    pub fn of_export(&self, name: &str) -> Option<&mpsc::Sender<CoreMsg>> {
        self.0.get(name).or_else(|| {
            let (volume, _) = split_snapshot_export(name)?;
            self.0.get(volume)
        })
    }
}

/// `VOLUME@SNAPSHOT` as (volume, snapshot); None for any other name.
/// Snapshot names never hold `@`, so the last one separates them.
pub fn split_snapshot_export(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('@')
        .filter(|(v, s)| !v.is_empty() && !s.is_empty())
}

/// The snapshot exports a node serves now, shared by its cores (which add
/// and remove them) and the NBD acceptor (which offers them).
pub type SnapshotExports = std::sync::Arc<std::sync::Mutex<Vec<ExportInfo>>>;

/// An accepted client socket, before it moves to its core.
pub enum ClientStream {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix domain.
    Unix(std::os::unix::net::UnixStream),
}

impl ClientStream {
    /// Sets the read and write timeouts (the handshake's bound).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            ClientStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            ClientStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl std::os::fd::AsFd for ClientStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ClientStream::Tcp(s) => s.as_fd(),
            ClientStream::Unix(s) => s.as_fd(),
        }
    }
}

impl crate::tls::Transport for ClientStream {
    fn set_blocking(&self, blocking: bool, t: Option<Duration>) -> io::Result<()> {
        match self {
            ClientStream::Tcp(s) => s.set_blocking(blocking, t),
            ClientStream::Unix(s) => s.set_blocking(blocking, t),
        }
    }
    fn shutdown_both(&self) {
        match self {
            ClientStream::Tcp(s) => s.shutdown_both(),
            ClientStream::Unix(s) => s.shutdown_both(),
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => s.read(buf),
            ClientStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => s.write(buf),
            ClientStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts a live connection; dropping it frees the slot.
pub struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    /// A slot counted in `live`, which the acceptor already incremented.
    pub fn new(live: Arc<AtomicUsize>) -> ConnGuard {
        ConnGuard(live)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A negotiated connection on its way to its volume's core.
pub struct NewConn {
    /// The socket.
    pub stream: ClientStream,
    /// What was negotiated.
    pub neg: Negotiated,
    /// Bytes the client sent past the handshake.
    pub leftover: Vec<u8>,
    /// Peer address, for logs.
    pub peer: String,
    /// The connection's slot.
    pub guard: ConnGuard,
    /// Handed over by the old process at a live restart (the client
    /// attached before; no new attach to record).
    pub handed_over: bool,
    /// The client speaks TLS: `stream` is the clear-text end of its relay
    /// (such a connection cannot be handed over at a live restart).
    pub tls: bool,
}

/// A volume opened and recovered, waiting for its core.
pub struct PreparedVolume {
    /// Its configuration.
    pub config: VolumeConfig,
    /// This node's role for it.
    pub role: Role,
    /// The data store.
    pub store: OpenedStore,
    /// The recovered journal.
    pub journal: OpenedJournal,
    /// What clients are told about it (its size as of start-up: `size`
    /// is the current one).
    pub export: ExportInfo,
    /// The volume's size, which a resize changes.
    pub size: crate::units::SharedSize,
    /// Its snapshots, loaded from their side files (and kept up to date by
    /// the replay).
    pub snapshots: Vec<crate::engine::snapshot_file::Loaded>,
}

/// Per-core liveness: each core stores the time of its latest tick.
#[derive(Clone, Default)]
pub struct Heartbeats(Arc<std::sync::Mutex<Vec<std::time::Instant>>>);

impl Heartbeats {
    pub(crate) fn register(&self) -> usize {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.push(std::time::Instant::now());
        v.len() - 1
    }

    pub(crate) fn beat(&self, core: usize) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = v.get_mut(core) {
            *t = std::time::Instant::now();
        }
    }

    /// Whether every core ticked within `max_age` (a stuck core fails this).
    pub fn all_fresh(&self, max_age: Duration) -> bool {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().all(|t| t.elapsed() <= max_age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_loaded_core_home_first_on_a_tie() {
        // (home, live connections per core, core)
        let cases: [(usize, &[usize], usize); 9] = [
            (0, &[0], 0),
            (0, &[5], 0),
            (0, &[0, 0], 0),
            (0, &[1, 0], 1),
            (0, &[1, 1], 0),
            (1, &[0, 0], 1),
            (1, &[0, 1], 0),
            (2, &[1, 1, 1, 1], 2),
            (2, &[0, 1, 1, 0], 3),
        ];
        for (home, live, want) in cases {
            assert_eq!(
                connection_core(home, live),
                want,
                "home {home}, live {live:?}"
            );
        }
    }

    #[test]
    fn a_live_connection_counts_until_dropped() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = LiveConn::new(&count);
        let b = LiveConn::new(&count);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(count.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
