//! The storage engine of one volume on its home core: the journal, the data
//! store, the overlay of unapplied extents, and the applier that moves
//! journaled records home.
//!
//! It is the bottom layer: it imports nothing of replication or of the
//! control plane. What a replicating primary must do at the engine's
//! decision points (a record was reserved, records were applied, the
//! checkpoint is about to release journal space) it does through
//! [`ReplicationHooks`], which the engine calls without knowing who answers.
//!
//! Everything here runs on one core (the volume's), so state is plain
//! `RefCell`s with no locks. The write path (`write`): reserve an LSN and
//! journal space (backpressure when full), record the extent in the overlay
//! so reads see it at once, wait for the group commit to make it durable.
//! The applier (`applier`) then writes records to the store in LSN order,
//! and periodically makes the store durable and advances the journal
//! checkpoint. Reads (`read`) overlay unapplied extents on the store.
//! `region` holds the stream-point operations a replica's resync needs.

mod applier;
pub mod changes;
mod error;
pub mod read;
pub mod read_gate;
mod region;
mod resize;
pub mod snapshot;
pub mod snapshot_file;
mod tracking;
pub mod write;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

pub use applier::{SyncAsk, SyncAsks, FLUSH_MODE_SYNC_INTERVAL};
pub use error::{nbd_error, EngineError};
pub use read::{ReadBuffers, ReadData};
pub use read_gate::{PieceBuffers, ReadGate, ReadRoute, ReadShare, StoreReader};
pub use resize::ResizeError;
pub use snapshot::{Snapshot, SnapshotError, SnapshotInfo};
pub use tracking::{seed_new_volume, ChangeReport, ReplayMarks};

use crate::buffer::{AlignedBuf, BufPool, MAX_CHUNK};
use crate::journal::format::Role;
use crate::journal::{Journal, Record};
use crate::overlay::Overlay;
use crate::store::Store;
use crate::telemetry::VolumeMetrics;
use crate::units::{Epoch, Lsn};

/// Knobs of a volume's write path.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Longest time between checkpoints.
    pub checkpoint_interval: Duration,
    /// Smallest aligned write that goes to the store in place (0: none).
    pub in_place_min: u64,
    /// With `--durability flush`: the longest the applier waits for a sync
    /// it did not ask for ([`FLUSH_MODE_SYNC_INTERVAL`] but in tests).
    pub flush_sync_interval: Duration,
}

/// Static description of a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    /// Export name.
    pub name: String,
    /// Human description for NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Size in bytes now (a resize record changes it when reserved, so
    /// every record after it is checked against the new size).
    pub size: crate::units::SharedSize,
    /// Whether clients may only read.
    pub read_only: bool,
    /// Its journal's path (replica bitmaps live beside it).
    pub journal: std::path::PathBuf,
}

/// Counters of a volume, for logs, metrics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct VolumeStats {
    /// Records applied to the store.
    pub applied: u64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Journal syncs the flush-mode applier asked for itself, by why.
    pub sync_asks: SyncAsks,
}

/// A snapshot of where the engine stands, for status and decisions above it.
#[derive(Debug, Clone)]
pub struct EngineStatus {
    /// The epoch persisted in the journal.
    pub epoch: Epoch,
    /// The next LSN to be reserved.
    pub next_lsn: Lsn,
    /// Every LSN below this is durable in the journal.
    pub durable_next: Lsn,
    /// Every LSN below this is written to the journal (acknowledged).
    pub written_next: Lsn,
    /// When a reply promises durability.
    pub durability: crate::journal::Durability,
    /// Every LSN below this is applied to the store.
    pub applied_next: Lsn,
    /// Journal bytes in use.
    pub journal_used: u64,
    /// Journal area size.
    pub journal_size: u64,
    /// Group commits so far.
    pub journal_batches: u64,
    /// Counters.
    pub stats: VolumeStats,
    /// Why the journal failed, if it did.
    pub journal_error: Option<String>,
    /// Whether the store is marked inconsistent (a resync did not finish).
    pub inconsistent: bool,
}

/// What a replicating primary does at the engine's decision points. The
/// engine calls these on its core; implementations must not block.
pub trait ReplicationHooks {
    /// A record was reserved (LSN order): it may be sent to replicas now.
    fn reserved(&self, rec: &Rc<Record>);
    /// Records below `applied_next` are applied to the store.
    fn applied(&self, applied_next: Lsn, journal: &Journal);
    /// The lowest LSN some replica still needs from the journal, if any:
    /// the checkpoint does not release it.
    fn retention_floor(&self) -> Option<Lsn>;
    /// The checkpoint is about to release the records below `target`:
    /// whatever a replica lacks of them must be recorded durably first.
    fn before_release(&self, target: Lsn, journal: &Journal) -> io::Result<()>;
}

/// One volume's durable storage, bound to its core.
pub struct Engine {
    /// Itself, for the tasks it spawns (in-place writes).
    me: Weak<Engine>,
    info: VolumeInfo,
    metrics: VolumeMetrics,
    /// Set once, before any write, on a replicating primary.
    hooks: RefCell<Option<Rc<dyn ReplicationHooks>>>,
    store: Store,
    journal: Journal,
    pool: Rc<BufPool>,
    overlay: RefCell<Overlay>,
    apply_queue: RefCell<VecDeque<Rc<Record>>>,
    apply_work: Notify,
    applied_next: Cell<Lsn>,
    /// Woken whenever `applied_next` moves.
    applied: Notify,
    /// Smallest aligned write that goes to the store in place (0: none).
    in_place_min: u64,
    stats: Cell<VolumeStats>,
    scratch: RefCell<Option<AlignedBuf>>,
    checkpoint_interval: Duration,
    flush_sync_interval: Duration,
    /// Set by `shutdown`: new mutations fail with ESHUTDOWN.
    stopping: Cell<bool>,
    /// The applier's last store write failed for want of space.
    store_full: Cell<bool>,
    /// Set by the applier once everything is applied and checkpointed after `stopping`.
    stopped: Cell<bool>,
    stop_done: Notify,
    /// Changed-block tracking: the last LSN that changed each region.
    changes: RefCell<changes::ChangeTable>,
    /// Where the table is persisted.
    changes_path: std::path::PathBuf,
    /// The persisted table holds every record below this LSN: the journal
    /// checkpoint never moves past it.
    changes_saved: Cell<Lsn>,
    /// When the table was last persisted.
    changes_saved_at: Cell<std::time::Instant>,
    /// One save at a time (the applier's checkpoint, a resync's sync).
    changes_saving: tokio::sync::Mutex<()>,
    /// A resync wrote regions since the table was last persisted.
    resync_marked: Cell<bool>,
    /// A resize is under way (one at a time).
    resizing: Cell<bool>,
    /// Point-in-time snapshots, oldest first.
    snapshots: RefCell<Vec<Rc<snapshot::Snapshot>>>,
    /// Mutations not yet in the store, for reads on other cores.
    read_gate: std::sync::Arc<ReadGate>,
}

impl Engine {
    /// Builds the engine with the snapshots loaded at start-up and starts
    /// its appender and applier tasks on the current core.
    pub fn start(
        info: VolumeInfo,
        store: Store,
        journal: Journal,
        pool: Rc<BufPool>,
        tuning: Tuning,
        snapshots: Vec<snapshot_file::Loaded>,
    ) -> Rc<Engine> {
        let applied_next = journal.next_lsn();
        let (table, saved) = tracking::open_table(&info, &journal);
        let changes_path = changes::table_path(&info.journal);
        let metrics = VolumeMetrics::new(&info.name);
        metrics.journal_size.set(journal.area_len() as f64);
        metrics.volume_size.set(info.size.get() as f64);
        metrics.durability(journal.durability());
        let e = Rc::new_cyclic(|me| Engine {
            me: me.clone(),
            metrics,
            hooks: RefCell::new(None),
            info,
            store,
            journal,
            pool,
            overlay: RefCell::new(Overlay::new()),
            apply_queue: RefCell::new(VecDeque::new()),
            apply_work: Notify::new(),
            applied_next: Cell::new(applied_next),
            applied: Notify::new(),
            in_place_min: tuning.in_place_min,
            stats: Cell::new(VolumeStats::default()),
            scratch: RefCell::new(Some(AlignedBuf::new(MAX_CHUNK))),
            checkpoint_interval: tuning.checkpoint_interval,
            flush_sync_interval: tuning.flush_sync_interval,
            stopping: Cell::new(false),
            store_full: Cell::new(false),
            stopped: Cell::new(false),
            stop_done: Notify::new(),
            changes_path,
            changes: RefCell::new(table),
            changes_saved: Cell::new(saved),
            changes_saved_at: Cell::new(std::time::Instant::now()),
            changes_saving: tokio::sync::Mutex::new(()),
            resync_marked: Cell::new(false),
            resizing: Cell::new(false),
            snapshots: RefCell::new(Vec::new()),
            read_gate: std::sync::Arc::new(ReadGate::default()),
        });
        e.install_loaded(snapshots);
        let a = e.clone();
        tokio_uring::spawn(async move {
            let q = a.clone();
            a.journal
                .run_appender(move |batch, took| q.committed(batch, took))
                .await;
        });
        let b = e.clone();
        tokio_uring::spawn(async move { b.run_applier().await });
        if e.journal.durability() == crate::journal::Durability::Flush {
            let c = e.clone();
            tokio_uring::spawn(async move { c.journal.run_syncer().await });
        }
        e
    }

    /// Installs the replication hooks. Must happen before the first
    /// mutation: a record reserved without them would never reach a replica.
    pub fn set_hooks(&self, hooks: Rc<dyn ReplicationHooks>) {
        assert_eq!(
            self.journal.next_lsn(),
            self.applied_next.get(),
            "hooks installed after mutations were reserved"
        );
        let old = self.hooks.borrow_mut().replace(hooks);
        assert!(old.is_none(), "replication hooks installed twice");
    }

    /// The hooks, if a replicating primary installed them.
    fn hooks(&self) -> Option<Rc<dyn ReplicationHooks>> {
        self.hooks.borrow().clone()
    }

    /// A group commit completed: its records go to the applier.
    fn committed(&self, batch: Vec<Rc<Record>>, took: Duration) {
        self.metrics.journal_commit.record(took.as_secs_f64());
        self.metrics.journal_batch.record(batch.len() as f64);
        self.apply_queue.borrow_mut().extend(batch);
        self.metrics
            .apply_lag
            .set(self.apply_queue.borrow().len() as f64);
        self.apply_work.notify_one();
    }

    /// Where the engine stands now.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            epoch: self.journal.epoch(),
            next_lsn: self.journal.next_lsn(),
            durable_next: self.journal.durable_next(),
            written_next: self.journal.written_next(),
            durability: self.journal.durability(),
            applied_next: self.applied_next.get(),
            journal_used: self.journal.used(),
            journal_size: self.journal.area_len(),
            journal_batches: self.journal.batches(),
            stats: self.stats.get(),
            journal_error: self.journal.failed(),
            inconsistent: self.journal.inconsistent(),
        }
    }

    /// Waits (bounded) until every record below `next` is applied.
    pub async fn wait_applied(&self, next: Lsn, limit: Duration) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.applied_next.get() < next {
            let applied = self.applied.notified();
            if let Some(why) = self.journal.failed() {
                return Err(EngineError::JournalFailed(why));
            }
            if self.applied_next.get() >= next {
                break;
            }
            // The applier gives up on a failed journal without applying:
            // wake now and then to see it.
            let slice = deadline.min(tokio::time::Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(slice, applied).await.is_err()
                && tokio::time::Instant::now() >= deadline
                && self.applied_next.get() < next
            {
                return Err(EngineError::NotApplied {
                    last: next.last(),
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Persists `role` and `epoch` (and the inconsistent mark) in the
    /// journal superblock.
    pub async fn persist_role(
        &self,
        role: Role,
        epoch: Epoch,
        inconsistent: bool,
    ) -> Result<(), EngineError> {
        self.journal
            .set_role_epoch(role, epoch, inconsistent)
            .await
            .map_err(|source| EngineError::Io {
                what: "persisting the role and epoch",
                source,
            })
    }

    /// Metric handles.
    pub fn metrics(&self) -> &VolumeMetrics {
        &self.metrics
    }

    /// Static description.
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// The volume's size in bytes now.
    pub fn size(&self) -> u64 {
        self.info.size.get()
    }

    /// The core's buffer pool.
    pub fn pool(&self) -> &Rc<BufPool> {
        &self.pool
    }

    /// Every LSN below this is applied to the store.
    pub fn applied_next(&self) -> Lsn {
        self.applied_next.get()
    }

    /// The journal: the LSN frontiers, the retained records replication
    /// catches up from, and durability waits.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// What another core needs to read the store while nothing is pending
    /// (see [`read_gate`]): the gate, the size, and a duplicate of the
    /// descriptor plain-export reads use.
    pub fn read_share(&self) -> io::Result<ReadShare> {
        Ok(ReadShare {
            gate: self.read_gate.clone(),
            size: self.info.size.clone(),
            fd: self.store.dup_read_fd()?,
            volume: self.info.name.clone(),
        })
    }

    /// From now on other cores forward every read here (the volume is no
    /// longer this node's to serve as primary).
    pub fn close_read_gate(&self) {
        self.read_gate.close();
    }

    /// A replica's hold on the journal moved (the lowest LSN a retained
    /// replica still needs rose): under journal pressure the applier looks
    /// again whether the checkpoint can release space. Writers waiting for
    /// journal space wait on that checkpoint, and with nothing to apply no
    /// record would wake the applier: the journal stayed full for good once
    /// a stalled link moved again. Without pressure no writer waits for
    /// space and the next record wakes it, so an ACK costs no wake-up.
    pub fn retention_moved(&self) {
        if applier::under_pressure(self.journal.fill_ratio()) {
            self.apply_work.notify_one();
        }
    }

    /// Whether the engine has stopped (after [`Engine::shutdown`]).
    pub fn stopped(&self) -> bool {
        self.stopped.get()
    }

    /// Graceful stop: refuse new mutations (ESHUTDOWN), let every reserved
    /// record become durable and be applied, checkpoint, and return. A
    /// restart after this replays nothing. Bounded by `limit`; returns
    /// whether it finished in time.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.stopping.set(true);
        self.read_gate.close();
        let done = self.stop_done.notified();
        self.apply_work.notify_one();
        if self.stopped.get() {
            return true;
        }
        tokio::time::timeout(limit, done).await.is_ok()
    }
}

#[cfg(test)]
mod flush_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
