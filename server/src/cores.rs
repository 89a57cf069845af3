//! A worker core: one io_uring runtime thread that owns some volumes and
//! serves the messages routed to it (client connections, primaries
//! connecting to its replica volumes, admin questions, reloads).
//!
//! It is also where the outcomes of the data path become process-level
//! decisions: a link or session that finds this node fenced by a newer
//! primary returns [`Fenced`], and the core demotes the volume and asks for
//! a restart.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::buffer::{BufPool, PoolConfig};
use crate::control::{
    ClientStream, CoordAnswer, CoordQuery, CoordRequest, CoreMsg, CoreQuery, HandedCore,
    Heartbeats, LiveConn, NewConn, Position, PreparedVolume, SatelliteConn, SnapshotQuery,
};
use crate::engine::{Engine, Tuning, VolumeInfo};
use crate::export::satellite::{
    serve_forwarded, Forwarded, Satellite, SatelliteSeed, FORWARD_QUEUE,
};
use crate::export::{serve, Quiesced, Target};
use crate::journal::format::Role;
use crate::journal::Journal;
use crate::lease_fence::LeaseFence;
use crate::replication::accept::IncomingPrimary;
use crate::replication::session::{ReplicaVolume, SessionContext, SessionSlot};
use crate::replication::{Fenced, Primary, ReplicationConfig};
use crate::sockio::Socket;
use crate::store::Store;
use crate::volume::Volume;
use mirrorblk_admin::{Request, VolumeStatus};

/// Submission queue entries of a core's ring.
const RING_ENTRIES: u32 = 1024;

/// How long a core may take to finish in-flight work when stopping.
const STOP_LIMIT: Duration = Duration::from_secs(25);

/// How often a primary refreshes its replicas' lag gauges (a lost replica
/// sends no acks that would move them).
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// How the main thread steers a core.
pub struct CoreControl {
    /// Set to true to stop.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Where the core reports (index, stopped cleanly).
    pub stopped: std::sync::mpsc::Sender<(usize, bool)>,
    /// Write-path knobs.
    pub tuning: Tuning,
    /// Liveness, for the watchdog.
    pub heartbeats: Heartbeats,
    /// Replication settings, if the node replicates.
    pub replication: Option<ReplicationConfig>,
    /// This node's name.
    pub node: String,
    /// The node's lease fence (open without a coordinator).
    pub fence: Arc<LeaseFence>,
    /// The snapshot exports the NBD acceptor offers.
    pub snapshot_exports: crate::control::SnapshotExports,
    /// How long the core polls after a request starts or ends.
    pub busy_poll: Option<std::time::Duration>,
    /// Every core, by index, where plain-export connections spread (weak:
    /// a core's queue still closes once the node drops its senders).
    pub peers: Vec<mpsc::WeakSender<CoreMsg>>,
}

/// A served volume with what its replica sessions share.
struct Served {
    vol: Rc<Volume>,
    slot: Rc<SessionSlot>,
    /// The volume's export, which its snapshots' exports are made from.
    export: nbd::ExportInfo,
    /// Where satellites forward requests (each satellite connection holds
    /// a clone); dropped at a hand-over so the forwarding task can end.
    forward: RefCell<Option<mpsc::Sender<Forwarded>>>,
    /// The task answering satellites, which ends once every satellite
    /// connection of the volume ended.
    forwarding: RefCell<Option<tokio::task::JoinHandle<()>>>,
    /// The volume's plain-export connections each core serves now (by
    /// core index), to spread new ones.
    live: Vec<Arc<std::sync::atomic::AtomicUsize>>,
}

/// One core's volumes.
struct Core {
    index: usize,
    volumes: HashMap<String, Served>,
    session_ctx: Option<Rc<SessionContext>>,
    /// Set to stop every connection at a request boundary (live restart).
    quiesce: tokio::sync::watch::Sender<bool>,
    /// Where each connection's serving task leaves its quiesced socket;
    /// taken (so the channel closes once every task is done) by a hand-over.
    handed: RefCell<Option<mpsc::UnboundedSender<Quiesced>>>,
    handed_rx: RefCell<Option<mpsc::UnboundedReceiver<Quiesced>>>,
    /// The snapshot exports the NBD acceptor offers.
    snapshot_exports: crate::control::SnapshotExports,
    /// This core's buffer pool (satellite connections use it).
    pool: CorePool,
    /// Set when the core stops or hands over: replica sessions end at a
    /// frame boundary (their receiver is in `session_ctx`).
    sessions_stop: tokio::sync::watch::Sender<bool>,
    /// The replica sessions' tasks, awaited before the volumes close.
    sessions: RefCell<Vec<tokio::task::JoinHandle<()>>>,
    /// Every core, by index.
    peers: Vec<mpsc::WeakSender<CoreMsg>>,
}

/// Why a core's message loop ended.
enum Ending {
    /// Stop (signal, or every sender gone).
    Stop,
    /// Hand the connections over; where to send them.
    HandOver(std::sync::mpsc::Sender<HandedCore>),
}

/// Runs core `index` with `vols` until told to stop; then drains them.
pub fn run_core(
    index: usize,
    vols: Vec<PreparedVolume>,
    rx: mpsc::Receiver<CoreMsg>,
    pool_cfg: PoolConfig,
    ctl: CoreControl,
) {
    // The runtime outlives the core: see `core_runtime`.
    let busy_poll = ctl.busy_poll;
    let run = crate::core_runtime::run_to_process_end(RING_ENTRIES, busy_poll, async move {
        let core = Core::open(index, vols, CorePool::new(pool_cfg), &ctl);
        tracing::debug!(
            "core {index} serving {} volume(s); buffer pool {}",
            core.volumes.len(),
            if core.pool.made() {
                "made"
            } else {
                "made at the first satellite connection"
            }
        );
        spawn_heartbeat(&ctl.heartbeats);
        let mut ctl = ctl;
        let ending = core.serve(rx, &mut ctl.stop).await;
        let conns = match ending {
            Ending::HandOver(_) => core.quiesce().await,
            Ending::Stop => Vec::new(),
        };
        let clean = core.shutdown().await;
        if let Ending::HandOver(to) = ending {
            let _ = to.send(HandedCore { conns, clean });
        }
        let _ = ctl.stopped.send((index, clean));
    });
    if let Err(e) = run {
        // The node sees no `stopped` from this core and reports it unclean.
        tracing::error!("core {index}: cannot start its io_uring runtime: {e}");
    }
}

/// A core's buffer pool, made on first use. A core that serves no volume
/// of its own (there are as many cores as CPUs by default) allocates and
/// registers nothing until its first satellite connection: an idle one
/// would otherwise hold a whole `--buffer-memory` of pinned memory.
struct CorePool {
    cfg: PoolConfig,
    pool: OnceCell<Rc<BufPool>>,
}

impl CorePool {
    fn new(cfg: PoolConfig) -> CorePool {
        CorePool {
            cfg,
            pool: OnceCell::new(),
        }
    }

    /// The pool, made now if this is the first use (inside the core's
    /// runtime: registering needs its ring).
    fn get(&self) -> Rc<BufPool> {
        self.pool
            .get_or_init(|| Rc::new(BufPool::new(&self.cfg)))
            .clone()
    }

    /// Whether the pool has been made.
    fn made(&self) -> bool {
        self.pool.get().is_some()
    }
}

fn spawn_heartbeat(heartbeats: &Heartbeats) {
    let hb = heartbeats.clone();
    let slot = hb.register();
    tokio_uring::spawn(async move {
        loop {
            hb.beat(slot);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Starts one volume: its engine and, on a primary with peers, its
/// replication role and links.
fn start_volume(v: PreparedVolume, pool: &Rc<BufPool>, ctl: &CoreControl) -> Rc<Volume> {
    let info = VolumeInfo {
        journal: v.config.journal.clone(),
        name: v.config.name.clone(),
        description: v.config.description.clone(),
        size: v.size.clone(),
        read_only: v.config.read_only,
    };
    let (records, millis) = (v.journal.report.records, v.journal.report.millis);
    let journal = Journal::new(v.journal);
    let primary = match &ctl.replication {
        Some(cfg) if v.role == Role::Primary && !cfg.peers.is_empty() => {
            Some(Rc::new(Primary::new(
                cfg.clone(),
                journal.next_lsn(),
                &info.name,
                info.size.get(),
                journal.epoch().0,
                &info.journal,
                journal.durability(),
            )))
        }
        _ => None,
    };
    let engine = Engine::start(
        info,
        Store::new(v.store),
        journal,
        pool.clone(),
        ctl.tuning,
        v.snapshots,
    );
    engine.metrics().recovery(records, millis);
    let vol = Rc::new(Volume::new(engine, v.role, primary, ctl.fence.clone()));
    if let Some(p) = vol.primary() {
        for link in &p.links {
            let run = crate::replication::link::run(
                vol.engine().clone(),
                p.clone(),
                link.clone(),
                ctl.node.clone(),
            );
            let vol = vol.clone();
            tokio_uring::spawn(async move { fence(&vol, run.await).await });
        }
        let (p, e) = (p.clone(), vol.engine().clone());
        tokio_uring::spawn(async move {
            while !e.stopped() {
                p.refresh_gauges(e.journal());
                tokio::time::sleep(GAUGE_REFRESH).await;
            }
        });
    }
    vol
}

/// The space bound of a snapshot created without one.
const DEFAULT_SNAPSHOT_SPACE: u64 = crate::engine::snapshot::DEFAULT_SPACE;

/// The snapshot exports, locked (a poisoned lock still holds a valid list).
fn lock_exports(
    exports: &crate::control::SnapshotExports,
) -> std::sync::MutexGuard<'_, Vec<nbd::ExportInfo>> {
    exports
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates snapshot `name` of `vol` and offers its export (read-only,
/// made from the volume's export `base`).
async fn create_snapshot(
    vol: &Volume,
    base: &nbd::ExportInfo,
    exports: &crate::control::SnapshotExports,
    name: &str,
    space: u64,
) -> Result<Vec<mirrorblk_admin::Snapshot>, String> {
    let engine = vol.engine();
    let snap = engine
        .create_snapshot(name, space)
        .await
        .map_err(|e| e.to_string())?;
    if !engine.snapshot(name).is_some_and(|s| Rc::ptr_eq(&s, &snap)) {
        return Err(format!(
            "snapshot '{name}' was deleted while it was being created"
        ));
    }
    lock_exports(exports).push(snapshot_export(base, &vol.info().name, &snap.info()));
    Ok(vec![crate::status::snapshot(vol, &snap.info())])
}

/// The read-only export of a snapshot of volume `volume`, made from the
/// volume's export `base`.
fn snapshot_export(
    base: &nbd::ExportInfo,
    volume: &str,
    snap: &crate::engine::SnapshotInfo,
) -> nbd::ExportInfo {
    let mut e = base.clone();
    e.name = format!("{volume}@{}", snap.name);
    e.description = format!(
        "snapshot '{}' of {volume} as of LSN {}",
        snap.name, snap.lsn
    );
    e.size = snap.size;
    e.read_only = true;
    e.can_fua = false;
    e.can_trim = false;
    e.can_write_zeroes = false;
    e.can_fast_zero = false;
    e
}

/// Records in the event log that `vol` changed role (persisted; the node
/// restarts into it).
fn role_changed(vol: &Volume, from: Role, to: Role, reason: &str) {
    crate::events::emit(crate::events::EventKind::RoleChange {
        volume: vol.info().name.clone(),
        from,
        to,
        epoch: vol.engine().journal().epoch().0,
        reason: reason.to_string(),
    });
}

/// A newer primary exists: demote this volume and restart as a replica.
async fn fence(vol: &Volume, f: Fenced) {
    tracing::error!(volume = %vol.info().name, "a primary of epoch {} exists: this node was replaced; demoting to replica", f.by_epoch);
    match vol.demote().await {
        Ok(()) => {
            let why = format!("fenced: a primary of epoch {} exists", f.by_epoch);
            role_changed(vol, Role::Primary, Role::Replica, &why);
            crate::lifecycle::request_restart(Role::Replica)
        }
        Err(e) => {
            tracing::error!(volume = %vol.info().name, "demoting after being fenced failed: {e}")
        }
    }
}

/// Carries out a coordinator request on `vol`.
async fn coordinate(vol: &Volume, request: &CoordRequest) -> Result<CoordAnswer, String> {
    let journal = vol.engine().journal();
    match request {
        CoordRequest::Position => Ok(CoordAnswer::Position(Position {
            durable_next: journal.durable_next(),
            epoch: journal.epoch(),
            consistent: !journal.inconsistent(),
            role: vol.role(),
        })),
        CoordRequest::ProposeInSync => Ok(CoordAnswer::Proposal(
            vol.primary()
                .map(|p| p.propose_in_sync())
                .unwrap_or_default(),
        )),
        CoordRequest::Published(set) => {
            if let Some(p) = vol.primary() {
                p.set_published(set.clone());
            }
            Ok(CoordAnswer::Done)
        }
        CoordRequest::Promote(epoch) => {
            vol.promote(false, Some(*epoch))
                .await
                .map_err(|e| e.to_string())?;
            let why = format!("elected by etcd in epoch {epoch}");
            role_changed(vol, Role::Replica, Role::Primary, &why);
            Ok(CoordAnswer::Done)
        }
        CoordRequest::Demote(why) => {
            vol.demote().await.map_err(|e| e.to_string())?;
            role_changed(vol, Role::Primary, Role::Replica, why);
            Ok(CoordAnswer::Done)
        }
    }
}

impl Core {
    fn open(index: usize, vols: Vec<PreparedVolume>, pool: CorePool, ctl: &CoreControl) -> Core {
        let volumes: HashMap<String, Served> = vols
            .into_iter()
            .map(|v| {
                let name = v.config.name.clone();
                let export = v.export.clone();
                let vol = start_volume(v, &pool.get(), ctl);
                // Snapshots kept across the restart are served again.
                let mut exports = lock_exports(&ctl.snapshot_exports);
                for snap in vol.engine().snapshot_list() {
                    let e = snapshot_export(&export, &name, &snap);
                    exports.retain(|x| x.name != e.name);
                    exports.push(e);
                }
                drop(exports);
                let (forward, rx) = mpsc::channel(FORWARD_QUEUE);
                let forwarding = tokio_uring::spawn(serve_forwarded(vol.clone(), rx));
                let served = Served {
                    vol,
                    slot: Rc::new(SessionSlot::default()),
                    export,
                    forward: RefCell::new(Some(forward)),
                    forwarding: RefCell::new(Some(forwarding)),
                    live: (0..ctl.peers.len().max(1))
                        .map(|_| Arc::default())
                        .collect(),
                };
                (name, served)
            })
            .collect();
        let sessions_stop = tokio::sync::watch::channel(false).0;
        let session_ctx = ctl.replication.as_ref().map(|r| {
            Rc::new(SessionContext {
                secret: r.secret.clone(),
                node: ctl.node.clone(),
                heartbeat_timeout: r.heartbeat_timeout,
                stop: sessions_stop.subscribe(),
            })
        });
        let (handed, handed_rx) = mpsc::unbounded_channel();
        Core {
            index,
            volumes,
            session_ctx,
            quiesce: tokio::sync::watch::channel(false).0,
            handed: RefCell::new(Some(handed)),
            handed_rx: RefCell::new(Some(handed_rx)),
            snapshot_exports: ctl.snapshot_exports.clone(),
            pool,
            peers: ctl.peers.clone(),
            sessions_stop,
            sessions: RefCell::new(Vec::new()),
        }
    }

    /// Stops every connection at a request boundary once its in-flight
    /// requests are answered, and collects them (those that end otherwise
    /// are not); bounded by the stop limit.
    async fn quiesce(&self) -> Vec<Quiesced> {
        drop(self.handed.borrow_mut().take());
        self.quiesce.send_replace(true);
        let Some(mut rx) = self.handed_rx.borrow_mut().take() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let all = async {
            while let Some(q) = rx.recv().await {
                out.push(q);
            }
        };
        let satellites = self.satellites_ended();
        let both = async {
            all.await;
            satellites.await;
        };
        if tokio::time::timeout(STOP_LIMIT, both).await.is_err() {
            tracing::error!(
                "core {}: some connections did not reach a request boundary within {} s; they are closed",
                self.index,
                STOP_LIMIT.as_secs()
            );
        }
        out
    }

    /// Resolves once every satellite connection of this core's volumes
    /// ended (they stop at a request boundary on their own cores, and need
    /// this core to answer what they forwarded until then).
    fn satellites_ended(&self) -> impl std::future::Future<Output = ()> {
        let tasks: Vec<_> = self
            .volumes
            .values()
            .filter_map(|s| {
                drop(s.forward.borrow_mut().take());
                s.forwarding.borrow_mut().take()
            })
            .collect();
        async move {
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    /// Serves messages until the stop signal or until every sender is gone.
    async fn serve(
        &self,
        mut rx: mpsc::Receiver<CoreMsg>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Ending {
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                _ = stop.wait_for(|s| *s) => None,
            };
            match msg {
                None => return Ending::Stop,
                Some(CoreMsg::HandOver(to)) => return Ending::HandOver(to),
                Some(CoreMsg::Admin(q)) => self.on_admin(q).await,
                Some(CoreMsg::Replica(inc)) => self.on_primary(inc),
                Some(CoreMsg::SetResyncRate(rate)) => self.set_resync_rate(rate),
                Some(CoreMsg::Conn(nc)) => self.on_client(nc),
                Some(CoreMsg::Coordinate(q)) => self.on_coordinator(q).await,
                Some(CoreMsg::Changes(q)) => {
                    let answer = self
                        .volumes
                        .get(&q.volume)
                        .map(|s| crate::status::changes(&s.vol, q.since));
                    let _ = q.reply.send(answer);
                }
                Some(CoreMsg::Snapshot(q)) => self.on_snapshot(q),
                Some(CoreMsg::Satellite(sc)) => self.on_satellite(sc),
            }
        }
    }

    async fn on_admin(&self, q: CoreQuery) {
        let answer = self.admin(&q.request).await;
        let _ = q.reply.send(answer);
    }

    /// Carries out an admin request on every volume of this core, and
    /// answers with their status (or the first refusal).
    async fn admin(&self, request: &Request) -> Result<Vec<VolumeStatus>, String> {
        for s in self.volumes.values() {
            let vol = &s.vol;
            let r = match *request {
                Request::Status => Ok(()),
                Request::Promote { force } => vol.promote(force, None).await.map(|_| {
                    role_changed(vol, Role::Replica, Role::Primary, "admin command promote")
                }),
                Request::Demote => vol.demote().await.map(|()| {
                    role_changed(vol, Role::Primary, Role::Replica, "admin command demote")
                }),
                Request::SetResyncRate { rate } => {
                    self.set_resync_rate(rate);
                    Ok(())
                }
                Request::Verify { repair } => vol.request_verify(repair),
                Request::Resize {
                    ref volume,
                    size,
                    force,
                } if *volume == vol.info().name => vol.resize(size, force).await.map(|_| ()),
                Request::Resize { .. } => Ok(()),
                // The admin thread and the main thread carry it out, or
                // they come as their own messages.
                Request::Restart { .. }
                | Request::Changes { .. }
                | Request::SnapshotCreate { .. }
                | Request::SnapshotDelete { .. }
                | Request::SnapshotList { .. } => Ok(()),
            };
            r.map_err(|e| e.to_string())?;
        }
        let mut v: Vec<_> = self
            .volumes
            .values()
            .map(|s| crate::status::volume_status(&s.vol))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Answers the coordinator about one volume.
    async fn on_coordinator(&self, q: CoordQuery) {
        let answer = match self.volumes.get(&q.volume) {
            Some(s) => coordinate(&s.vol, &q.request).await,
            None => Err(format!(
                "volume '{}' is not on core {}",
                q.volume, self.index
            )),
        };
        let _ = q.reply.send(answer);
    }

    fn set_resync_rate(&self, rate: u64) {
        for s in self.volumes.values() {
            if let Some(p) = s.vol.primary() {
                p.resync_rate.set(rate);
            }
        }
    }

    /// A primary connected to one of this core's volumes.
    fn on_primary(&self, inc: IncomingPrimary) {
        let (Some(s), Some(ctx)) = (self.volumes.get(&inc.hello.volume), &self.session_ctx) else {
            tracing::error!(
                "replication connection for '{}' reached core {} without its volume",
                inc.hello.volume,
                self.index
            );
            return;
        };
        let sock = inc.stream.into_socket();
        let target = ReplicaVolume {
            engine: s.vol.engine().clone(),
            role: s.vol.role(),
            slot: s.slot.clone(),
        };
        let vol = s.vol.clone();
        let run = crate::replication::session::run(
            target,
            sock,
            inc.hello,
            inc.hello_body,
            ctx.clone(),
            inc.peer,
        );
        let task = tokio_uring::spawn(async move {
            if let Some(f) = run.await {
                fence(&vol, f).await;
            }
        });
        let mut sessions = self.sessions.borrow_mut();
        sessions.retain(|t| !t.is_finished());
        sessions.push(task);
    }

    /// Creates, deletes or lists snapshots of this core's volumes.
    fn on_snapshot(&self, q: SnapshotQuery) {
        let answer = match &q.request {
            Request::SnapshotList { volume } => self.list_snapshots(volume.as_deref()),
            Request::SnapshotDelete { volume, name } => self.volumes.get(volume).map(|s| {
                let info = s
                    .vol
                    .engine()
                    .delete_snapshot(name)
                    .map_err(|e| e.to_string())?;
                let export = format!("{volume}@{name}");
                lock_exports(&self.snapshot_exports).retain(|e| e.name != export);
                Ok(vec![crate::status::snapshot(&s.vol, &info)])
            }),
            Request::SnapshotCreate {
                volume,
                name,
                space,
            } => {
                let Some(s) = self.volumes.get(volume) else {
                    let _ = q.reply.send(None);
                    return;
                };
                let (vol, base) = (s.vol.clone(), s.export.clone());
                let exports = self.snapshot_exports.clone();
                let (name, space) = (name.clone(), space.unwrap_or(DEFAULT_SNAPSHOT_SPACE));
                // It waits for the records before it to be applied: not on
                // the core's message loop.
                tokio_uring::spawn(async move {
                    let res = create_snapshot(&vol, &base, &exports, &name, space).await;
                    let _ = q.reply.send(Some(res));
                });
                return;
            }
            _ => None,
        };
        let _ = q.reply.send(answer);
    }

    /// The snapshots of `volume` (of every volume of this core when None);
    /// None when the volume is not on this core.
    fn list_snapshots(
        &self,
        volume: Option<&str>,
    ) -> Option<Result<Vec<mirrorblk_admin::Snapshot>, String>> {
        if volume.is_some_and(|v| !self.volumes.contains_key(v)) {
            return None;
        }
        let mut list: Vec<mirrorblk_admin::Snapshot> = self
            .volumes
            .values()
            .filter(|s| volume.is_none_or(|v| v == s.vol.info().name))
            .flat_map(|s| {
                let vol = &s.vol;
                vol.engine()
                    .snapshot_list()
                    .into_iter()
                    .map(|i| crate::status::snapshot(vol, &i))
                    .collect::<Vec<_>>()
            })
            .collect();
        list.sort_by(|a, b| (&a.volume, a.created_ms).cmp(&(&b.volume, b.created_ms)));
        Some(Ok(list))
    }

    /// The volume (and snapshot) export `name` names on this core.
    fn export_target(&self, name: &str) -> Option<(&Served, Option<Rc<crate::engine::Snapshot>>)> {
        if let Some(s) = self.volumes.get(name) {
            return Some((s, None));
        }
        let (volume, snap) = crate::control::split_snapshot_export(name)?;
        let s = self.volumes.get(volume)?;
        Some((s, Some(s.vol.engine().snapshot(snap)?)))
    }

    /// A negotiated NBD client for one of this core's volumes (or one of
    /// their snapshots). A plain export's connections spread over the
    /// cores (the least loaded first); snapshot exports stay here.
    fn on_client(&self, nc: NewConn) {
        let Some((s, snap)) = self.export_target(&nc.neg.export.name) else {
            tracing::warn!(
                peer = %nc.peer,
                "connection for export '{}' reached core {}, which serves no such volume or snapshot (deleted meanwhile?); closing it",
                nc.neg.export.name,
                self.index
            );
            return;
        };
        if snap.is_none() {
            if let Some(nc) = self.spread(s, nc) {
                let live = s.live.get(self.index).map(LiveConn::new);
                let target = Target::Home {
                    vol: s.vol.clone(),
                    snap: None,
                };
                self.serve_conn(nc, target, live);
            }
            return;
        }
        let target = Target::Home {
            vol: s.vol.clone(),
            snap,
        };
        self.serve_conn(nc, target, None);
    }

    /// Sends a plain export's connection to the least loaded core; gives
    /// it back when that is this core or the other cannot take it.
    fn spread(&self, s: &Served, nc: NewConn) -> Option<NewConn> {
        let live: Vec<usize> = s
            .live
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        if self.index >= live.len() {
            return Some(nc);
        }
        let to = crate::control::connection_core(self.index, &live);
        if to == self.index {
            return Some(nc);
        }
        let (Some(peer), Some(forward)) = (
            self.peers.get(to).and_then(mpsc::WeakSender::upgrade),
            s.forward.borrow().clone(),
        ) else {
            return Some(nc);
        };
        let seed = match SatelliteSeed::new(&s.vol, forward) {
            Ok(seed) => seed,
            Err(e) => {
                tracing::warn!(peer = %nc.peer, "cannot share volume '{}' with core {to}: {e}; serving the connection on its home core", s.vol.info().name);
                return Some(nc);
            }
        };
        let live = LiveConn::new(&s.live[to]);
        let msg = CoreMsg::Satellite(Box::new(SatelliteConn {
            conn: nc,
            seed,
            live,
        }));
        match peer.try_send(msg) {
            Ok(()) => None,
            // A full or closed queue: serving it here is never wrong.
            Err(e) => match e.into_inner() {
                CoreMsg::Satellite(sc) => Some(sc.conn),
                _ => None,
            },
        }
    }

    /// A connection of another core's volume, served here as a satellite.
    fn on_satellite(&self, sc: Box<SatelliteConn>) {
        let sc = *sc;
        let name = sc.seed.volume().to_string();
        tracing::debug!(peer = %sc.conn.peer, "core {} serves a connection of volume '{name}' as a satellite", self.index);
        let sat = Satellite::new(sc.seed, self.pool.get());
        self.serve_conn(sc.conn, Target::Satellite(Box::new(sat)), Some(sc.live));
    }

    /// Serves a connection here until it ends or is stopped for a
    /// hand-over (counted in `live` meanwhile).
    fn serve_conn(&self, nc: NewConn, target: Target, live: Option<LiveConn>) {
        let snapshot = matches!(target, Target::Home { snap: Some(_), .. });
        let sock = match nc.stream {
            ClientStream::Tcp(s) => Socket::Tcp(tokio_uring::net::TcpStream::from_std(s)),
            ClientStream::Unix(s) => Socket::Unix(tokio_uring::net::UnixStream::from_std(s)),
        };
        let guard = nc.guard;
        let handed = self.handed.borrow().clone();
        let quiesce = self.quiesce.subscribe();
        let tls = nc.tls;
        tokio_uring::spawn(async move {
            let attach = !nc.handed_over;
            let peer = nc.peer.clone();
            let q = serve(
                sock,
                nc.neg,
                target,
                nc.leftover,
                nc.peer,
                (quiesce, attach),
            )
            .await;
            match (q, handed) {
                // The new process reloads the snapshot from its side file;
                // the connection (its reads in this engine) is not handed
                // over: the client reconnects.
                (Some(_), Some(_)) if snapshot => tracing::warn!(
                    %peer,
                    "closing a snapshot export's connection at the live restart (the new process serves the snapshot again); the client must reconnect"
                ),
                // A rustls session lives in this process's relay thread: its
                // socket cannot be handed over. Stopped at a request boundary
                // with nothing in flight, it is closed (the relay sends
                // close_notify) and the client reconnects (docs/RESTART.md).
                (Some(_), Some(_)) if tls => tracing::warn!(
                    %peer,
                    "closing a TLS connection at the live restart (a TLS session cannot be handed over); the client must reconnect"
                ),
                (Some(q), Some(to)) => {
                    let _ = to.send(q);
                }
                _ => {}
            }
            drop(guard);
            drop(live);
        });
    }

    /// Drains every volume; whether all finished within the limit.
    async fn shutdown(&self) -> bool {
        let mut clean = self.end_sessions().await;
        for s in self.volumes.values() {
            clean &= s.vol.shutdown(STOP_LIMIT).await;
        }
        clean
    }

    /// Ends every replica session at its next frame boundary and waits for
    /// them: afterwards no task of this process writes the journals (at a
    /// hand-over the successor opens them next). False if one did not end
    /// within the bound.
    async fn end_sessions(&self) -> bool {
        self.sessions_stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.sessions.borrow_mut());
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        let ended = tokio::time::timeout(STOP_LIMIT, all).await.is_ok();
        if !ended {
            tracing::error!(
                "core {}: a replica session did not end within {} s",
                self.index,
                STOP_LIMIT.as_secs()
            );
        }
        ended
    }
}
