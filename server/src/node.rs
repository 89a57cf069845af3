//! A node: opening and recovering every volume, binding the listeners, and
//! running one io_uring runtime per worker core.
//!
//! Start-up is synchronous and fails early with one sentence (exit status 2)
//! for anything the operator must fix: a missing device, a journal of another
//! volume, a port in use. Only then do the cores start.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use nbd::ExportInfo;
use tokio::sync::mpsc;

use crate::buffer::PoolConfig;
use crate::config::{Config, VolumeConfig};
use crate::control::{ClientStream, NewConn};
use crate::control::{CoreMsg, Routes, CORE_QUEUE};
pub use crate::control::{Heartbeats, PreparedVolume};
use crate::cores::{run_core, CoreControl};
use crate::engine::{ReplayMarks, Tuning};
use crate::handover::wire::ListenerKind;
use crate::handover::Inherited;
use crate::journal::format::Role;
use crate::journal::recovery::{
    open_and_recover, FileReplay, JournalOpenError, JournalSpec, OpenedJournal, RecoveryReport,
    ReplayTarget,
};
use crate::lease_fence::LeaseFence;
use crate::listener::{adopt, adopted_slot, spawn_acceptors, AcceptContext, Catalog};
use crate::replication::bitmap::OutOfSync;
use crate::store::{open_store, OpenedStore, StoreError};
use crate::units::ByteSize;

/// Why the node could not start; each is something the operator fixes.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A data store problem.
    #[error("volume '{volume}': {source}")]
    Store {
        /// Volume name.
        volume: String,
        /// What went wrong.
        source: StoreError,
    },
    /// A journal problem.
    #[error("volume '{volume}': {source}")]
    Journal {
        /// Volume name.
        volume: String,
        /// What went wrong.
        source: JournalOpenError,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The metrics endpoint could not start.
    #[error("{0}")]
    Metrics(#[from] crate::telemetry::MetricsError),
    /// The role cannot be decided.
    #[error("{0}")]
    Role(String),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// A listening socket could not be duplicated (kept for a hand-over).
    #[error("cannot duplicate a listening socket: {0}")]
    Dup(std::io::Error),
    /// The event log cannot be opened.
    #[error("{0}; choose another --event-log path")]
    Events(#[from] crate::events::EventLogError),
}

fn export_info(cfg: &VolumeConfig, size: u64, journal_area: u64) -> ExportInfo {
    let max_payload = crate::journal::max_payload(journal_area) as u32;
    let rw = !cfg.read_only;
    ExportInfo {
        name: cfg.name.clone(),
        description: cfg.description.clone(),
        size,
        read_only: cfg.read_only,
        can_flush: true,
        can_fua: true,
        can_trim: rw,
        can_write_zeroes: rw,
        can_fast_zero: rw,
        can_cache: true,
        can_df: true,
        // Every reply is durable and every connection sees the same overlay,
        // so FLUSH/FUA on one connection cover all of them.
        can_multi_conn: true,
        can_block_status: true,
        // Every volume keeps its changed-block table.
        can_dirty_bitmap: true,
        min_block: 1,
        preferred_block: 4096,
        max_payload,
    }
}

/// Decides this node's role for a volume: the one asked for, else the one it
/// last had, else primary when nothing replicates.
fn resolve_role(
    asked: Option<Role>,
    persisted: Role,
    replicated: bool,
    volume: &str,
) -> Result<Role, StartError> {
    match (asked, persisted) {
        (Some(r), _) => Ok(r),
        (None, Role::Unset) if !replicated => Ok(Role::Primary),
        (None, Role::Unset) => Err(StartError::Role(format!(
            "volume '{volume}' has never had a role on this node: give --role primary or --role replica on its first start"
        ))),
        (None, r) => Ok(r),
    }
}

/// Replays into the data store and marks every replayed extent in the
/// peers' out-of-sync bitmaps, persisted before recovery moves the journal
/// checkpoint past those records: after a restart no replica can catch up
/// on them from the journal, so a bitmap resync must send their regions.
struct MarkingReplay<'a> {
    inner: FileReplay<'a>,
    bitmaps: Vec<OutOfSync>,
    /// Changed-block tracking: every replayed record is marked.
    changes: ReplayMarks,
    /// The previous process closed the volume cleanly (a live restart): no
    /// in-place write can have been under way, so the journal need not be
    /// swept for their intents (a read of the whole journal).
    closed_cleanly: bool,
    /// The volume's snapshots, loaded from their side files when recovery
    /// begins (before any record is replayed): replay keeps regions for
    /// them as the applier does.
    snapshots: SnapshotReplay,
}

/// Where the snapshots of a volume being recovered are, and the replay's
/// copy-on-write for them.
struct SnapshotReplay {
    journal: PathBuf,
    volume: String,
    keeper: crate::engine::snapshot_file::ReplayKeeper,
}

impl SnapshotReplay {
    /// For `cfg`'s volume; the snapshots are loaded when recovery begins.
    fn new(cfg: &VolumeConfig) -> SnapshotReplay {
        SnapshotReplay {
            journal: cfg.journal.clone(),
            volume: cfg.name.clone(),
            keeper: crate::engine::snapshot_file::ReplayKeeper::new(Vec::new()),
        }
    }
}

impl ReplayTarget for MarkingReplay<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        for b in &mut self.bitmaps {
            b.mark(offset, data.len() as u64);
        }
        let len = data.len() as u64;
        self.snapshots
            .keeper
            .before_write(self.inner.file, offset, len)?;
        self.inner.write(offset, data)
    }

    fn zero(&mut self, offset: u64, len: u64, trim: bool, no_hole: bool) -> std::io::Result<()> {
        for b in &mut self.bitmaps {
            b.mark(offset, len);
        }
        self.snapshots
            .keeper
            .before_write(self.inner.file, offset, len)?;
        self.inner.zero(offset, len, trim, no_hole)
    }

    fn wants_intents(&self) -> bool {
        // Changed-block tracking marks them whether or not there are peers.
        !self.closed_cleanly
    }

    fn placed(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        for b in &mut self.bitmaps {
            b.mark(offset, len);
        }
        self.changes.unrecorded(offset, len);
        // Its data is home already: nothing can be kept of what it replaced.
        self.snapshots.keeper.destroyed(offset, len, None);
        Ok(())
    }

    fn begin(&mut self, sb: &crate::journal::format::Superblock) {
        self.changes.begin(sb);
        let s = &mut self.snapshots;
        let loaded = crate::engine::snapshot_file::load_all(&s.journal, &s.volume, sb.volume_uuid);
        s.keeper = crate::engine::snapshot_file::ReplayKeeper::new(loaded);
    }

    fn record(&mut self, lsn: crate::units::Lsn, offset: u64, len: u64) {
        self.changes.record(lsn, offset, len);
        self.snapshots.keeper.record(lsn);
    }

    fn resize(&mut self, size: u64) -> std::io::Result<()> {
        self.snapshots.keeper.destroyed(0, 0, Some(size));
        self.changes.resize(size);
        for b in &mut self.bitmaps {
            b.resize(size);
        }
        self.inner.resize(size)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync()?;
        for b in &mut self.bitmaps {
            b.persist_if_dirty()?;
        }
        self.changes.save()
    }
}

/// Opens, validates and recovers one volume; `closed_cleanly` when a live
/// restart's old process drained and checkpointed it.
pub fn prepare_volume(
    cfg: &VolumeConfig,
    role: Option<Role>,
    replicated: bool,
    peers: &[String],
    closed_cleanly: bool,
    durability: crate::journal::Durability,
) -> Result<PreparedVolume, StartError> {
    let recorded = crate::journal::recovery::recorded_volume_size(&cfg.journal);
    let mut store = open_volume_store(cfg, recorded)?;
    // Replay through a buffered handle: records may be unaligned, and one
    // fdatasync at the end makes the whole replay durable.
    let replay_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.data)
        .map_err(|e| store_io_error(cfg, e))?;
    let mut target = MarkingReplay {
        inner: FileReplay {
            file: &replay_file,
            block_device: store.block_device,
        },
        bitmaps: load_bitmaps(cfg, peers, store.size),
        changes: ReplayMarks::new(&cfg.journal, &cfg.name),
        closed_cleanly,
        snapshots: SnapshotReplay::new(cfg),
    };
    let spec = JournalSpec {
        path: &cfg.journal,
        size: cfg.journal_size,
        volume_name: &cfg.name,
        volume_size: store.size,
        durability,
    };
    let mut journal =
        open_and_recover(&spec, &mut target).map_err(|source| StartError::Journal {
            volume: cfg.name.clone(),
            source,
        })?;
    log_recovery(&cfg.name, &journal.report);
    let snapshots = target.snapshots.keeper.into_loaded();
    crate::engine::seed_new_volume(
        &cfg.journal,
        journal.superblock.volume_uuid,
        journal.superblock.volume_size,
        store.created,
        journal.report.next_lsn,
    )
    .map_err(|e| store_io_error(cfg, e))?;
    // The journal records the size (a resize may have been replayed).
    store.size = journal.superblock.volume_size;
    let role = resolve_role(role, journal.superblock.role, replicated, &cfg.name)?;
    record_role(cfg, &mut journal, role)?;
    tracing::info!(volume = %cfg.name, "role {role}, epoch {}", journal.superblock.epoch);
    let export = export_info(cfg, store.size, journal.superblock.area_len);
    log_volume_ready(cfg, &store, &journal, &export);
    let store_size = store.size;
    Ok(PreparedVolume {
        config: cfg.clone(),
        role,
        store,
        journal,
        export,
        size: crate::units::SharedSize::new(store_size),
        snapshots,
    })
}

/// A volume's data store, reading through the page cache if asked and safe.
/// Its size is the one its journal records (`recorded`, which a resize
/// changes) or, for a new volume, the configured one.
fn open_volume_store(cfg: &VolumeConfig, recorded: Option<u64>) -> Result<OpenedStore, StartError> {
    if let (Some(r), Some(c)) = (recorded, cfg.size) {
        if r != c {
            tracing::warn!(volume = %cfg.name, "the journal records a volume size of {} ({r} bytes), not the configured {} ({c} bytes): it was resized (mirrorblk resize); --size only sizes a new volume, so update the configuration to match", ByteSize(r), ByteSize(c));
        }
    }
    let mut store =
        open_store(&cfg.data, recorded.or(cfg.size), false, cfg.preallocate).map_err(|source| {
            StartError::Store {
                volume: cfg.name.clone(),
                source,
            }
        })?;
    // On a block device the kernel drops cached pages only before an
    // asynchronous direct write, not after it: a read racing the write
    // could leave stale pages behind. Files (iomap filesystems) drop them
    // after the write too.
    if cfg.read_cache && store.block_device {
        tracing::info!(volume = %cfg.name, "reads stay O_DIRECT on block device {}: its page cache is not kept coherent with asynchronous direct writes", cfg.data.display());
    } else if cfg.read_cache {
        store.cache_reads().map_err(|e| store_io_error(cfg, e))?;
    }
    Ok(store)
}

fn store_io_error(cfg: &VolumeConfig, e: std::io::Error) -> StartError {
    StartError::Store {
        volume: cfg.name.clone(),
        source: StoreError::Io {
            path: cfg.data.clone(),
            source: e,
        },
    }
}

/// The out-of-sync bitmaps the volume's peers left behind; one that cannot
/// be read is skipped, and its peer gets a full checksum resync.
fn load_bitmaps(cfg: &VolumeConfig, peers: &[String], volume_size: u64) -> Vec<OutOfSync> {
    let mut bitmaps = Vec::new();
    for peer in peers {
        let path = crate::replication::bitmap::path_for(&cfg.journal, peer);
        match OutOfSync::load_existing(path.clone(), volume_size) {
            Ok(Some(b)) => bitmaps.push(b),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume = %cfg.name, "cannot read the out-of-sync bitmap {}: {e}; {peer} will get a full checksum resync", path.display())
            }
        }
    }
    bitmaps
}

fn log_recovery(volume: &str, r: &RecoveryReport) {
    match &r.stop_reason {
        Some(why) => tracing::warn!(
            volume = %volume,
            "journal recovery replayed {} records ({} bytes) in {} ms and stopped at LSN {}: {} (a torn tail: those writes were never acknowledged)",
            r.records, r.bytes, r.millis, r.next_lsn, why
        ),
        None => tracing::info!(
            volume = %volume,
            "journal recovery replayed {} records ({} bytes) in {} ms; next LSN {}",
            r.records, r.bytes, r.millis, r.next_lsn
        ),
    }
}

/// Writes a changed role into the journal's superblock, with a new
/// generation.
fn record_role(
    cfg: &VolumeConfig,
    journal: &mut OpenedJournal,
    role: Role,
) -> Result<(), StartError> {
    let from = journal.superblock.role;
    if role == from {
        return Ok(());
    }
    journal.superblock.role = role;
    journal.superblock.generation += 1;
    crate::journal::recovery::write_superblock(&journal.file, &journal.superblock).map_err(
        |e| StartError::Journal {
            volume: cfg.name.clone(),
            source: JournalOpenError::Io {
                what: "cannot record the role in journal",
                path: cfg.journal.clone(),
                source: e,
            },
        },
    )?;
    if from != Role::Unset {
        crate::events::emit(crate::events::EventKind::RoleChange {
            volume: cfg.name.clone(),
            from,
            to: role,
            epoch: journal.superblock.epoch.0,
            reason: format!("started as {role}"),
        });
    }
    Ok(())
}

fn log_volume_ready(
    cfg: &VolumeConfig,
    store: &OpenedStore,
    journal: &OpenedJournal,
    export: &ExportInfo,
) {
    tracing::info!(
        volume = %cfg.name,
        "volume ready: {} ({} bytes) on {}{}, journal {} ({}), max request {}",
        ByteSize(store.size), store.size, store.path.display(),
        match (store.direct, store.cached_file.is_some()) {
            (true, false) => " (O_DIRECT)",
            (true, true) => " (O_DIRECT writes, reads through the page cache)",
            (false, _) => " (buffered)",
        },
        cfg.journal.display(), ByteSize(journal.superblock.area_len),
        ByteSize(export.max_payload as u64)
    );
}

fn bind_tcp(cfg: &Config) -> Result<TcpListener, StartError> {
    TcpListener::bind(cfg.listen).map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; another process uses that port: stop it or choose another --listen"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "; that address is not on this machine: choose another --listen"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need privileges: choose another --listen"
            }
            _ => "",
        };
        StartError::Bind {
            addr: cfg.listen.to_string(),
            source,
            hint,
        }
    })
}

fn bind_unix(path: &PathBuf) -> Result<UnixListener, StartError> {
    // Replace a stale socket from an earlier run, never any other file.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| StartError::Bind {
        addr: path.display().to_string(),
        source,
        hint: "; remove the file or choose another --unix path",
    })
}

/// A started node.
pub struct RunningNode {
    /// The TCP address actually bound (useful with port 0).
    pub listen: std::net::SocketAddr,
    /// Duplicates of every listening socket, for a hand-over.
    listeners: Vec<(ListenerKind, OwnedFd)>,
    /// The accept threads, and the flag that ends them.
    acceptors: Vec<std::thread::JoinHandle<()>>,
    accept_stop: Arc<AtomicBool>,
    /// Handshakes under way.
    handshaking: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    stopped: std::sync::mpsc::Receiver<(usize, bool)>,
    cores: usize,
    heartbeats: Heartbeats,
    core_senders: Vec<mpsc::Sender<CoreMsg>>,
    /// The coordinator, on a node run with `--etcd`.
    coordinator: Option<Arc<crate::coordinator::Handle>>,
}

impl RunningNode {
    /// Applies a new resync bandwidth on every core.
    pub fn set_resync_rate(&self, rate: u64) {
        for c in &self.core_senders {
            let _ = c.try_send(CoreMsg::SetResyncRate(rate));
        }
    }

    /// Core liveness, for the systemd watchdog.
    pub fn heartbeats(&self) -> Heartbeats {
        self.heartbeats.clone()
    }

    /// Live restart, the old process's part: stops accepting (the listeners
    /// stay open), lets handshakes under way finish, then has every core stop
    /// its connections at a request boundary, finish what is in flight and
    /// close its volumes durably. Answers the listeners and connections to
    /// pass on.
    pub fn hand_over(self) -> HandOff {
        // First, so no campaign or step-down starts while the cores stop.
        let etcd_lease = self
            .coordinator
            .as_ref()
            .and_then(|c| c.hand_over())
            .map(|id| id.0);
        self.accept_stop
            .store(true, std::sync::atomic::Ordering::Release);
        for t in self.acceptors {
            let _ = t.join();
        }
        let deadline = std::time::Instant::now() + HANDSHAKE_WAIT;
        while self.handshaking.load(std::sync::atomic::Ordering::Acquire) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut asked = 0;
        for c in &self.core_senders {
            if c.blocking_send(CoreMsg::HandOver(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut off = HandOff {
            listeners: self.listeners,
            conns: Vec::new(),
            clean: asked == self.core_senders.len(),
            etcd_lease,
        };
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(h) => {
                    off.conns.extend(h.conns);
                    off.clean &= h.clean;
                }
                Err(_) => {
                    off.clean = false;
                    break;
                }
            }
        }
        off
    }

    /// Graceful stop: every core refuses new mutations, finishes what is in
    /// flight, applies and checkpoints its volumes. Returns whether all did
    /// so within `limit`.
    pub fn stop(self, limit: Duration) -> bool {
        let _ = self.stop.send(true);
        let deadline = std::time::Instant::now() + limit;
        let mut clean = true;
        for _ in 0..self.cores {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stopped.recv_timeout(left) {
                Ok((_, ok)) => clean &= ok,
                Err(_) => return false,
            }
        }
        clean
    }
}

/// Duplicates of the listening sockets, kept for a hand-over.
type Kept = Vec<(ListenerKind, OwnedFd)>;
/// The accept threads.
type Threads = Vec<std::thread::JoinHandle<()>>;

/// How long a hand-over waits for handshakes under way to finish.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(3);

/// What a node hands over at a live restart.
pub struct HandOff {
    /// Its listening sockets.
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
    /// Its NBD connections, stopped at a request boundary.
    pub conns: Vec<crate::export::Quiesced>,
    /// Whether every core drained and checkpointed in time.
    pub clean: bool,
    /// The coordinator's etcd lease, for the successor to keep.
    pub etcd_lease: Option<i64>,
}

/// The listener of `kind` handed over by the old process, if any.
fn inherited_listener(inh: &mut Option<Inherited>, kind: ListenerKind) -> Option<OwnedFd> {
    let inh = inh.as_mut()?;
    let index = inh
        .state
        .listeners
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, i)| *i)?;
    inh.take_fd(index)
}

/// Keeps a duplicate of a listener for a later hand-over.
fn keep(
    kept: &mut Vec<(ListenerKind, OwnedFd)>,
    kind: ListenerKind,
    fd: BorrowedFd<'_>,
) -> Result<(), StartError> {
    let dup = fd.try_clone_to_owned().map_err(StartError::Dup)?;
    kept.push((kind, dup));
    Ok(())
}

/// With a coordinator: the node's starting role, decided with etcd (one
/// volume per node: the role is the node's).
fn coordinated_start(
    cfg: &Config,
    fence: &LeaseFence,
    live: Option<i64>,
) -> Result<Option<crate::coordinator::Startup>, StartError> {
    let Some(c) = &cfg.coordinator else {
        return Ok(None);
    };
    let [v] = cfg.volumes.as_slice() else {
        return Err(StartError::Role(format!(
            "--etcd coordinates one volume per node, and this node has {}: run one mirrorblkd per volume",
            cfg.volumes.len()
        )));
    };
    crate::lifecycle::set_coordinated();
    Ok(Some(crate::coordinator::starting_role(
        c,
        &cfg.node,
        &v.name,
        fence,
        live.map(mirrorblk_etcd::LeaseId),
    )))
}

/// Starts the coordinator thread, when configured.
fn spawn_coordinator(
    cfg: &Config,
    start: Option<crate::coordinator::Startup>,
    wiring: (
        &Routes,
        &Arc<LeaseFence>,
        &Arc<crate::admin::Readiness>,
        SocketAddr,
    ),
) -> Result<Option<Arc<crate::coordinator::Handle>>, StartError> {
    let (Some(c), Some(start)) = (&cfg.coordinator, start) else {
        return Ok(None);
    };
    let (routes, fence, readiness, nbd) = wiring;
    let volume = cfg.volumes[0].name.clone();
    let core = routes
        .get(&volume)
        .cloned()
        .expect("the coordinated volume has a core");
    let w = crate::coordinator::Wiring {
        cfg: c.clone(),
        node: cfg.node.clone(),
        volume,
        // What clients are told: the advertised address, else the bound one.
        nbd: cfg.advertise.clone().unwrap_or_else(|| nbd.to_string()),
        core,
        fence: fence.clone(),
        readiness: readiness.clone(),
    };
    crate::coordinator::spawn(w, start)
        .map(Some)
        .map_err(StartError::Thread)
}

/// Opens everything, binds the listeners, starts cores and acceptors.
pub fn start(cfg: &Config) -> Result<RunningNode, StartError> {
    start_with(cfg, None)
}

/// [`start`], taking over the listeners and connections a live restart
/// handed over (`inherited`) instead of binding.
pub fn start_with(
    cfg: &Config,
    mut inherited: Option<Inherited>,
) -> Result<RunningNode, StartError> {
    let took_over = inherited.as_ref().map(|i| i.state.from_pid);
    let mut kept = Vec::new();
    // Bind first: a port in use must fail before any file is created.
    let tcp = match inherited_listener(&mut inherited, ListenerKind::Nbd) {
        Some(fd) => TcpListener::from(fd),
        None => bind_tcp(cfg)?,
    };
    keep(&mut kept, ListenerKind::Nbd, tcp.as_fd())?;
    open_event_log(cfg, took_over)?;
    let fence = Arc::new(match cfg.coordinator {
        Some(_) => LeaseFence::closed(),
        None => LeaseFence::open(),
    });
    let live_lease = inherited.as_ref().and_then(|i| i.state.etcd_lease);
    let startup = coordinated_start(cfg, &fence, live_lease)?;
    let clean = inherited.as_ref().is_some_and(|i| i.state.closed_cleanly);
    let prepared = prepare_volumes(cfg, startup.map(|s| s.role).or(cfg.role), clean)?;
    serve_metrics(cfg, &mut inherited, &mut kept)?;
    let listen = tcp.local_addr().map_err(|e| StartError::Bind {
        addr: cfg.listen.to_string(),
        source: e,
        hint: "",
    })?;
    let unix = unix_listener(cfg, &mut inherited, &mut kept)?;
    let catalog = primary_catalog(&prepared);
    let cores = spawn_cores(cfg, prepared, &fence, &catalog.snapshots)?;
    let accept_stop = Arc::new(AtomicBool::new(false));
    let ctx = accept_context(cfg, catalog, &cores.routes, &accept_stop);
    let mut acceptors = Vec::new();
    let repl = inherited_listener(&mut inherited, ListenerKind::Replication);
    let replication_listen = accept_replication(
        cfg,
        &cores.routes,
        repl,
        (&accept_stop, &mut acceptors, &mut kept),
    )?;
    let readiness = Arc::new(crate::admin::Readiness::new());
    if let Some(path) = &cfg.admin_socket {
        let admin_fd = inherited_listener(&mut inherited, ListenerKind::Admin);
        let t = serve_admin(
            cfg,
            path,
            admin_fd,
            (&cores, &readiness, &accept_stop),
            &mut kept,
        )?;
        acceptors.push(t);
        tracing::info!("admin socket on {}", path.display());
    }
    acceptors.extend(spawn_acceptors(ctx, tcp, unix).map_err(StartError::Thread)?);
    if let Some(inh) = inherited {
        take_over_conns(ctx, inh);
    }
    log_serving(cfg, listen);
    readiness.serving(crate::admin::Listening {
        nbd: listen,
        unix: cfg.unix.clone(),
        replication: replication_listen,
    });
    let coordinator = spawn_coordinator(cfg, startup, (&cores.routes, &fence, &readiness, listen))?;
    Ok(RunningNode {
        coordinator,
        listen,
        listeners: kept,
        acceptors,
        accept_stop,
        handshaking: ctx.handshaking.clone(),
        stop: cores.stop,
        stopped: cores.stopped,
        cores: cores.running,
        heartbeats: cores.heartbeats,
        core_senders: cores.senders,
    })
}

/// Binds (or takes over) the Prometheus listener and serves metrics on it,
/// when configured.
fn serve_metrics(
    cfg: &Config,
    inherited: &mut Option<Inherited>,
    kept: &mut Vec<(ListenerKind, OwnedFd)>,
) -> Result<(), StartError> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(());
    };
    let l = match inherited_listener(inherited, ListenerKind::Metrics) {
        Some(fd) => TcpListener::from(fd),
        None => crate::telemetry::bind(addr)?,
    };
    keep(kept, ListenerKind::Metrics, l.as_fd())?;
    crate::telemetry::install(l, addr)?;
    tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
    Ok(())
}

/// The NBD Unix-socket listener, bound or taken over, when configured.
fn unix_listener(
    cfg: &Config,
    inherited: &mut Option<Inherited>,
    kept: &mut Vec<(ListenerKind, OwnedFd)>,
) -> Result<Option<UnixListener>, StartError> {
    let unix = match inherited_listener(inherited, ListenerKind::NbdUnix) {
        Some(fd) => Some(UnixListener::from(fd)),
        None => cfg.unix.as_ref().map(bind_unix).transpose()?,
    };
    if let Some(u) = &unix {
        keep(kept, ListenerKind::NbdUnix, u.as_fd())?;
    }
    Ok(unix)
}

/// What every acceptor and connection shares; it lives as long as the
/// process (acceptor threads are detached and may outlive `RunningNode`).
fn accept_context(
    cfg: &Config,
    catalog: Catalog,
    routes: &Routes,
    stop: &Arc<AtomicBool>,
) -> &'static AcceptContext {
    Box::leak(Box::new(AcceptContext {
        catalog,
        routes: routes.clone(),
        conns: Arc::new(AtomicUsize::new(0)),
        max_connections: cfg.max_connections,
        handshake: cfg.handshake,
        handshaking: Arc::new(AtomicUsize::new(0)),
        stop: stop.clone(),
        tls: cfg.tls.as_ref().map(|t| crate::listener::NbdTls {
            policy: t.policy,
            config: t.material.nbd.clone(),
        }),
    }))
}

/// Logs where NBD is served.
fn log_serving(cfg: &Config, listen: SocketAddr) {
    tracing::info!(
        "serving NBD on {listen}{}",
        cfg.unix
            .as_ref()
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default()
    );
}

/// Opens the event log and records this start in it.
fn open_event_log(cfg: &Config, took_over_from: Option<u32>) -> Result<(), StartError> {
    crate::events::init(cfg.event_log_config())?;
    tracing::info!("event log {}", cfg.event_log.display());
    crate::events::emit(crate::events::EventKind::DaemonStart {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        volumes: cfg.volumes.iter().map(|v| v.name.clone()).collect(),
        took_over_from,
    });
    Ok(())
}

/// Serves the admin socket on the handed-over listener, or binds it.
fn serve_admin(
    cfg: &Config,
    path: &std::path::Path,
    inherited: Option<OwnedFd>,
    (cores, readiness, stop): (&Cores, &Arc<crate::admin::Readiness>, &Arc<AtomicBool>),
    kept: &mut Vec<(ListenerKind, OwnedFd)>,
) -> Result<std::thread::JoinHandle<()>, StartError> {
    let bind_err = |source| StartError::Bind {
        addr: path.display().to_string(),
        source,
        hint: "; choose another --admin-socket path",
    };
    let l = match inherited {
        Some(fd) => UnixListener::from(fd),
        None => crate::admin::bind(path).map_err(bind_err)?,
    };
    keep(kept, ListenerKind::Admin, l.as_fd())?;
    crate::admin::spawn(
        l,
        path,
        cfg.node.clone(),
        cores.senders.clone(),
        readiness.clone(),
        stop.clone(),
    )
    .map_err(bind_err)
}

/// Routes every connection the old process handed over to its core, and
/// records the hand-over with the pause clients saw.
fn take_over_conns(ctx: &'static AcceptContext, mut inh: Inherited) {
    let conns = std::mem::take(&mut inh.state.conns);
    let total = conns.len();
    let mut adopted = 0;
    for c in conns {
        let Some(fd) = inh.take_fd(c.fd) else {
            continue;
        };
        let Some(export) = ctx
            .catalog
            .exports
            .iter()
            .find(|e| e.name == c.export)
            .cloned()
        else {
            tracing::error!(peer = %c.peer, "a handed-over connection uses export '{}', which this configuration does not serve as primary; closing it", c.export);
            continue;
        };
        let mut export = export;
        if export.size != c.size {
            // NBD cannot tell a client its export changed size: the
            // connection keeps what it negotiated (the engine refuses what
            // lies past a shrunk end).
            tracing::info!(peer = %c.peer, "export '{}' is {} bytes now; the handed-over connection keeps the {} it negotiated", c.export, export.size, c.size);
            export.size = c.size;
        }
        let stream = if c.unix {
            ClientStream::Unix(std::os::unix::net::UnixStream::from(fd))
        } else {
            ClientStream::Tcp(std::net::TcpStream::from(fd))
        };
        let nc = NewConn {
            stream,
            neg: nbd::Negotiated {
                export,
                transmission_flags: c.transmission_flags,
                structured_replies: c.structured_replies,
                extended_headers: c.extended_headers,
                base_allocation: c.base_allocation,
                dirty_bitmap: c.dirty_bitmap,
                no_zeroes: c.no_zeroes,
            },
            leftover: c.leftover,
            peer: c.peer.clone(),
            guard: adopted_slot(ctx),
            handed_over: true,
            tls: false,
        };
        match adopt(ctx, nc) {
            Ok(()) => adopted += 1,
            Err(e) => tracing::error!(peer = %c.peer, "cannot take over a connection: {e}"),
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let pause_ms = now_ms.saturating_sub(inh.state.paused_at_ms);
    crate::telemetry::restart_pause(pause_ms);
    tracing::info!(
        "took over from pid {}: {adopted} of {total} NBD connections, clients paused {pause_ms} ms",
        inh.state.from_pid
    );
    crate::events::emit(crate::events::EventKind::HandedOver {
        from_pid: inh.state.from_pid,
        connections: adopted,
        pause_ms,
    });
}

/// Opens and recovers every configured volume, in order, as `role` (None:
/// each as it last was); `clean` after a live restart whose old process
/// closed them all cleanly.
fn prepare_volumes(
    cfg: &Config,
    role: Option<Role>,
    clean: bool,
) -> Result<Vec<PreparedVolume>, StartError> {
    let mut prepared = Vec::new();
    for v in &cfg.volumes {
        let peers: Vec<String> = cfg
            .replication
            .iter()
            .flat_map(|r| r.peers.iter().map(|p| p.name.clone()))
            .collect();
        prepared.push(prepare_volume(
            v,
            role,
            cfg.replication.is_some(),
            &peers,
            clean,
            cfg.durability,
        )?);
    }
    Ok(prepared)
}

/// The exports NBD clients may ask for: only primaries serve NBD clients; a
/// replica's export is unknown to them.
fn primary_catalog(prepared: &[PreparedVolume]) -> Catalog {
    Catalog {
        exports: prepared
            .iter()
            .filter(|p| p.role == Role::Primary)
            .map(|p| p.export.clone())
            .collect(),
        sizes: prepared
            .iter()
            .filter(|p| p.role == Role::Primary)
            .map(|p| p.size.clone())
            .collect(),
        replicas: prepared
            .iter()
            .filter(|p| p.role != Role::Primary)
            .map(|p| p.export.name.clone())
            .collect(),
        snapshots: crate::control::SnapshotExports::default(),
    }
}

/// The running cores, as the main thread holds them.
struct Cores {
    /// Each volume's core.
    routes: Routes,
    senders: Vec<mpsc::Sender<CoreMsg>>,
    running: usize,
    stop: tokio::sync::watch::Sender<bool>,
    stopped: std::sync::mpsc::Receiver<(usize, bool)>,
    heartbeats: Heartbeats,
}

/// Deals the volumes round-robin over `cfg.cores` cores and starts a thread
/// for each core (those without a volume serve other cores' connections).
fn spawn_cores(
    cfg: &Config,
    prepared: Vec<PreparedVolume>,
    fence: &Arc<LeaseFence>,
    snapshot_exports: &crate::control::SnapshotExports,
) -> Result<Cores, StartError> {
    let mut per_core: Vec<Vec<PreparedVolume>> = (0..cfg.cores).map(|_| Vec::new()).collect();
    for (i, p) in prepared.into_iter().enumerate() {
        per_core[i % cfg.cores].push(p);
    }
    let pool_cfg = PoolConfig::from_budget(cfg.buffer_memory);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
    let mut cores = Cores {
        routes: Routes::default(),
        senders: Vec::new(),
        running: 0,
        stop: stop_tx,
        stopped: stopped_rx,
        heartbeats: Heartbeats::default(),
    };
    // Every core runs, those without a volume too: plain-export
    // connections spread over all of them.
    let channels: Vec<_> = (0..cfg.cores)
        .map(|_| mpsc::channel::<CoreMsg>(CORE_QUEUE))
        .collect();
    let peers: Vec<_> = channels.iter().map(|(tx, _)| tx.downgrade()).collect();
    for (i, (vols, (tx, rx))) in per_core.into_iter().zip(channels).enumerate() {
        for v in &vols {
            cores.routes.insert(v.config.name.clone(), tx.clone());
        }
        cores.senders.push(tx);
        let pool_cfg = pool_cfg.clone();
        let ctl = CoreControl {
            stop: stop_rx.clone(),
            stopped: stopped_tx.clone(),
            tuning: Tuning {
                checkpoint_interval: cfg.checkpoint_interval,
                in_place_min: cfg.in_place_min,
                flush_sync_interval: crate::engine::FLUSH_MODE_SYNC_INTERVAL,
            },
            heartbeats: cores.heartbeats.clone(),
            replication: cfg.replication.clone(),
            node: cfg.node.clone(),
            fence: fence.clone(),
            snapshot_exports: snapshot_exports.clone(),
            peers: peers.clone(),
            busy_poll: cfg.busy_poll,
        };
        std::thread::Builder::new()
            .name(format!("core{i}"))
            .spawn(move || run_core(i, vols, rx, pool_cfg, ctl))
            .map_err(StartError::Thread)?;
        cores.running += 1;
    }
    Ok(cores)
}

/// Binds the replication listener (or takes the handed-over one), if
/// configured, and hands each primary connecting on it to its volume's
/// core; returns the bound address.
fn accept_replication(
    cfg: &Config,
    routes: &Routes,
    inherited: Option<OwnedFd>,
    (stop, threads, kept): (&Arc<AtomicBool>, &mut Threads, &mut Kept),
) -> Result<Option<std::net::SocketAddr>, StartError> {
    let Some(addr) = cfg.replication.as_ref().and_then(|r| r.listen) else {
        return Ok(None);
    };
    let l = match inherited {
        Some(fd) => TcpListener::from(fd),
        None => TcpListener::bind(addr).map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
            hint: "; another process uses that port: choose another --replication-listen",
        })?,
    };
    keep(kept, ListenerKind::Replication, l.as_fd())?;
    let bound = l.local_addr().unwrap_or(addr);
    let to_core = routes.clone();
    let route = move |inc: crate::replication::accept::IncomingPrimary| {
        let Some(core) = to_core.get(&inc.hello.volume) else {
            return Err(Box::new(inc));
        };
        if core.blocking_send(CoreMsg::Replica(inc)).is_err() {
            tracing::warn!("core is gone; dropping a replication connection");
        }
        Ok(())
    };
    let t = crate::replication::accept::spawn(
        l,
        cfg.handshake,
        route,
        cfg.node.clone(),
        stop.clone(),
        cfg.replication
            .as_ref()
            .and_then(|r| r.tls.as_ref())
            .map(|m| m.peer_server.clone()),
    )
    .map_err(StartError::Thread)?;
    threads.push(t);
    tracing::info!("accepting replication on {addr}");
    Ok(Some(bound))
}
