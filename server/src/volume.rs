//! A volume on its home core: the journal, the data store, the overlay of
//! unapplied extents, and the applier that moves journaled records home.
//!
//! Everything here runs on one core (the volume's), so state is plain
//! `RefCell`s with no locks. The write path: reserve an LSN and journal space
//! (backpressure when full), record the extent in the overlay so reads see it
//! at once, wait for the group commit to make it durable, reply. The applier
//! then writes records to the store in LSN order, and periodically makes the
//! store durable and advances the journal checkpoint.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use nbd::ErrorCode;
use tokio::sync::Notify;
use tokio_uring::buf::fixed::FixedBuf;

use crate::buffer::{AlignedBuf, BufPool, Payload, SharedSlice, MAX_CHUNK};
use crate::journal::format::Role;
use crate::journal::format::FLAG_NO_HOLE;
use crate::journal::MutationOp;
use crate::journal::{Journal, Record};
use crate::overlay::{Overlay, Piece, Source};
use crate::replication::{Mode, Phase, Primary, ReplicationConfig};
use crate::store::{Allocation, Store};
use crate::telemetry::VolumeMetrics;
use crate::units::{align_down, align_up, is_aligned, Epoch, Lsn};
use std::rc::Weak;

/// Most records the applier writes to the store at once.
const APPLY_BATCH: usize = 64;

/// Knobs of a volume's write path.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Longest time between checkpoints.
    pub checkpoint_interval: Duration,
    /// Smallest aligned write that goes to the store in place (0: none).
    pub in_place_min: u64,
}

/// Static description of a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    /// Export name.
    pub name: String,
    /// Human description for NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
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
}

/// Read data ready to send: pool buffers with the `[start, end)` to send of each.
pub struct ReadData {
    /// Buffers in order.
    pub parts: Vec<(FixedBuf, usize, usize)>,
}

impl ReadData {
    /// xxh3-64 of the bytes, in order.
    pub fn xxh3(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (b, s, e) in &self.parts {
            h.update(&b[*s..*e]);
        }
        h.digest()
    }
}

/// A volume bound to its core.
pub struct Volume {
    /// Itself, for the tasks it spawns (in-place writes).
    me: Weak<Volume>,
    info: VolumeInfo,
    metrics: VolumeMetrics,
    /// This node's role for the volume.
    role: Cell<Role>,
    /// Replication state when this node is a replicating primary.
    primary: Option<Rc<Primary>>,
    /// Whether a primary is connected (a replica takes one at a time).
    replica_session: Cell<bool>,
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
    /// Set by `shutdown`: new mutations fail with ESHUTDOWN.
    stopping: Cell<bool>,
    /// The applier's last store write failed for want of space.
    store_full: Cell<bool>,
    /// Set by the applier once everything is applied and checkpointed after `stopping`.
    stopped: Cell<bool>,
    stop_done: Notify,
}

fn io_code(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::NoSpc,
        _ => ErrorCode::Io,
    }
}

impl Volume {
    /// Builds the volume and starts its appender and applier tasks on the
    /// current core.
    pub fn start(
        info: VolumeInfo,
        store: Store,
        journal: Journal,
        pool: Rc<BufPool>,
        tuning: Tuning,
        role: Role,
        replication: Option<ReplicationConfig>,
    ) -> Rc<Volume> {
        let applied_next = journal.next_lsn();
        let metrics = VolumeMetrics::new(&info.name);
        metrics.journal_size.set(journal.area_len() as f64);
        let primary = match (role, replication) {
            (Role::Primary, Some(cfg)) if !cfg.peers.is_empty() => Some(Rc::new(Primary::new(
                cfg,
                journal.next_lsn(),
                &info.name,
                info.size,
                journal.epoch().0,
                &info.journal,
            ))),
            _ => None,
        };
        let v = Rc::new_cyclic(|me| Volume {
            me: me.clone(),
            metrics,
            role: Cell::new(role),
            primary,
            replica_session: Cell::new(false),
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
            stopping: Cell::new(false),
            store_full: Cell::new(false),
            stopped: Cell::new(false),
            stop_done: Notify::new(),
        });
        let a = v.clone();
        tokio_uring::spawn(async move {
            let q = a.clone();
            a.journal
                .run_appender(move |batch, took| {
                    q.metrics.journal_commit.record(took.as_secs_f64());
                    q.metrics.journal_batch.record(batch.len() as f64);
                    q.apply_queue.borrow_mut().extend(batch);
                    q.metrics.apply_lag.set(q.apply_queue.borrow().len() as f64);
                    q.apply_work.notify_one();
                })
                .await;
        });
        let b = v.clone();
        tokio_uring::spawn(async move { b.run_applier().await });
        if v.primary.is_some() {
            let g = v.clone();
            tokio_uring::spawn(async move {
                // Lag and bitmap gauges move with acks, but a lost replica
                // sends none: refresh them on a timer too.
                while !g.stopped.get() {
                    g.refresh_replica_gauges();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
        v
    }

    /// Sets each replica's lag and out-of-sync gauges from the current state.
    fn refresh_replica_gauges(&self) {
        let Some(p) = &self.primary else { return };
        let next = self.journal.next_lsn();
        for l in &p.links {
            if *l.phase.borrow() == Phase::InSync {
                l.metrics.state.set(l.state_code());
            }
            let durable = l.durable_next.get();
            l.metrics
                .lag_lsn
                .set(next.0.saturating_sub(durable.0) as f64);
            l.metrics
                .lag_bytes
                .set(self.journal.retained_bytes_from(durable) as f64);
            l.metrics.out_of_sync.set(l.oos.borrow().bytes() as f64);
        }
    }

    /// What `mirrorblk status` shows.
    pub fn status(&self) -> crate::admin::VolumeStatus {
        let stats = self.stats.get();
        crate::admin::VolumeStatus {
            name: self.info.name.clone(),
            size: self.info.size,
            read_only: self.info.read_only,
            role: self.role.get(),
            epoch: self.journal.epoch().0,
            last_lsn: self.journal.next_lsn().0.saturating_sub(1),
            durable_lsn: self.journal.durable_next().0.saturating_sub(1),
            applied_lsn: self.applied_next.get().0.saturating_sub(1),
            journal_used: self.journal.used(),
            journal_size: self.journal.area_len(),
            journal_batches: self.journal.batches(),
            checkpoints: stats.checkpoints,
            journal_error: self.journal.failed(),
            inconsistent: self.journal.inconsistent(),
            replicas: self
                .primary
                .iter()
                .flat_map(|p| p.links.iter())
                .map(|l| crate::admin::ReplicaStatus {
                    peer: l.peer.name.clone(),
                    state: l.replica_state(),
                    reason: match &*l.phase.borrow() {
                        Phase::OutOfSync(r) => Some(r.clone()),
                        _ => None,
                    },
                    durable_lsn: l.durable_next.get().0.saturating_sub(1),
                    lag_lsn: self
                        .journal
                        .next_lsn()
                        .0
                        .saturating_sub(l.durable_next.get().0),
                    lag_bytes: self.journal.retained_bytes_from(l.durable_next.get()),
                    resync: l.job.borrow().as_ref().and_then(|j| {
                        matches!(j.kind, crate::replication::resync::JobKind::Resync { .. })
                            .then(|| j.progress())
                    }),
                    out_of_sync_bytes: l.oos.borrow().bytes(),
                    verify: l
                        .job
                        .borrow()
                        .as_ref()
                        .and_then(|j| match j.kind {
                            crate::replication::resync::JobKind::Verify { repair } => {
                                Some(crate::admin::verify_running(j, repair))
                            }
                            _ => None,
                        })
                        .or_else(|| l.last_verify.borrow().clone()),
                    rtt_us: l.rtt_us.get(),
                })
                .collect(),
        }
    }

    /// Waits (bounded) until every record below `next` is applied.
    async fn wait_applied(&self, next: Lsn, limit: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + limit;
        while self.applied_next.get() < next {
            if self.journal.failed().is_some() {
                return Err("journal failed".into());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "records up to LSN {} not applied within {limit:?}",
                    next.0.saturating_sub(1)
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// On a replica: prepares a full resync. Everything received so far is
    /// applied, then the journal continues at `start` and the store is marked
    /// inconsistent (persisted: a crash mid-resync restarts it).
    pub async fn rebase_for_resync(&self, start: Lsn, volume_uuid: [u8; 16]) -> Result<(), String> {
        let reserved = self.journal.next_lsn();
        self.wait_applied(reserved, Duration::from_secs(60)).await?;
        self.journal
            .rebase(start, volume_uuid)
            .await
            .map_err(|e| format!("rebasing the journal failed: {e}"))?;
        self.applied_next.set(start);
        tracing::warn!(volume = %self.info.name, "resyncing from the primary, whose stream continues at LSN {start}: this node is Inconsistent until the resync completes");
        Ok(())
    }

    /// On a replica: writes one resync region, which is the primary's data
    /// as of after `after`; waits until every record up to it is applied so
    /// the region never overwrites a newer record.
    pub async fn write_resync_region(
        &self,
        after: Lsn,
        offset: u64,
        data: Payload,
    ) -> Result<(), String> {
        if !is_aligned(offset)
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > self.info.size)
        {
            return Err(format!("resync region at {offset} does not fit the volume"));
        }
        self.wait_applied(after.next(), Duration::from_secs(60))
            .await?;
        let data = Rc::new(data);
        let writes = (0..data.chunk_count()).map(|i| {
            let len = align_up(data.chunk_len(i) as u64) as usize;
            let slice = SharedSlice::new(data.clone(), i, 0, len);
            self.store.write_all(slice, offset + (i * MAX_CHUNK) as u64)
        });
        for (res, _) in futures_util::future::join_all(writes).await {
            res.map_err(|e| format!("resync write at {offset} failed: {e}"))?;
        }
        Ok(())
    }

    /// On a replica: the xxh3 of `[offset, offset + len)` as of after record
    /// `after` (waits until every record up to it is applied, like
    /// [`Volume::write_resync_region`], so both sides hash the same moment
    /// of the stream).
    pub async fn region_hash(&self, after: Lsn, offset: u64, len: u64) -> Result<u64, String> {
        if !is_aligned(offset) || offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(format!("resync check at {offset} does not fit the volume"));
        }
        self.wait_applied(after.next(), Duration::from_secs(60))
            .await?;
        let data = self
            .read(offset, len)
            .await
            .map_err(|e| format!("reading region at {offset} failed: {e:?}"))?;
        Ok(data.xxh3())
    }

    /// On a replica: makes every resync region written so far durable.
    pub async fn sync_store(&self) -> Result<(), String> {
        self.store
            .sync()
            .await
            .map_err(|e| format!("syncing the store failed: {e}"))
    }

    /// On a replica: the resync is complete; make it durable and clear the mark.
    pub async fn finish_resync(&self) -> Result<(), String> {
        self.store
            .sync()
            .await
            .map_err(|e| format!("syncing the store failed: {e}"))?;
        self.journal
            .set_inconsistent(false)
            .await
            .map_err(|e| format!("clearing the inconsistent mark failed: {e}"))?;
        tracing::info!(volume = %self.info.name, "resync complete: this node is consistent");
        Ok(())
    }

    /// Makes this replica the primary: persists epoch + 1 and the role. The
    /// caller then restarts the node, which comes up serving NBD and
    /// connecting to its peers as their primary. Refused while the store is
    /// inconsistent unless `force`.
    pub async fn promote(&self, force: bool) -> Result<Epoch, String> {
        if self.role.get() == Role::Primary {
            return Err(format!(
                "volume '{}' is already primary on this node",
                self.info.name
            ));
        }
        let inconsistent = self.journal.inconsistent();
        if inconsistent && !force {
            return Err(format!(
                "volume '{}' is Inconsistent (a resync did not finish): promoting it would serve stale data; promote a consistent replica, or pass --force if this is the only copy left",
                self.info.name
            ));
        }
        if inconsistent {
            tracing::error!(volume = %self.info.name, "FORCED promotion of an Inconsistent replica: data written since its last complete resync may be missing");
        }
        // Everything received must be journaled before the new epoch starts.
        let _ = self
            .wait_applied(self.journal.next_lsn(), Duration::from_secs(30))
            .await;
        let epoch = Epoch(self.journal.epoch().0 + 1);
        self.journal
            .set_role_epoch(Role::Primary, epoch, false)
            .await
            .map_err(|e| format!("persisting the promotion failed: {e}"))?;
        tracing::warn!(volume = %self.info.name, "promoted to primary in epoch {epoch}");
        Ok(epoch)
    }

    /// Makes this node a replica (it will resync from the primary that
    /// connects to it). Persists the role; the caller restarts the node.
    pub async fn demote(&self) -> Result<(), String> {
        if self.role.get() == Role::Replica {
            return Err(format!(
                "volume '{}' is already a replica on this node",
                self.info.name
            ));
        }
        self.journal
            .set_role_epoch(
                Role::Replica,
                self.journal.epoch(),
                self.journal.inconsistent(),
            )
            .await
            .map_err(|e| format!("persisting the demotion failed: {e}"))?;
        tracing::warn!(volume = %self.info.name, "demoted to replica");
        Ok(())
    }

    /// On a replica: a primary of a newer epoch connected. Adopt its epoch
    /// and mark the store inconsistent, so it takes a full resync (any
    /// records this node has that the new primary never had are discarded).
    pub async fn adopt_epoch(&self, epoch: Epoch) -> Result<(), String> {
        self.journal
            .set_role_epoch(Role::Replica, epoch, true)
            .await
            .map_err(|e| format!("persisting epoch {epoch} failed: {e}"))?;
        tracing::warn!(volume = %self.info.name, "adopted epoch {epoch} from a new primary; resyncing");
        Ok(())
    }

    /// On a primary: asks each in-sync link to run a verify pass (see
    /// [`crate::admin::Request::Verify`]). Refused when the volume is not
    /// primary, has no replicas, or a replica is not in sync.
    pub fn request_verify(&self, repair: bool) -> Result<(), String> {
        let Some(p) = &self.primary else {
            return Err(format!(
                "volume '{}' is not a replicated primary on this node: run verify on the primary",
                self.info.name
            ));
        };
        let not_ready: Vec<String> = p
            .links
            .iter()
            .filter(|l| *l.phase.borrow() != Phase::InSync || l.job.borrow().is_some())
            .map(|l| {
                let busy = l.job.borrow().is_some();
                format!(
                    "{} is {}",
                    l.peer.name,
                    if busy {
                        "busy resyncing"
                    } else {
                        l.phase.borrow().name()
                    }
                )
            })
            .collect();
        if !not_ready.is_empty() {
            return Err(format!(
                "cannot verify volume '{}' now: {}; wait until every replica is in sync (mirrorblk status) and try again",
                self.info.name,
                not_ready.join(", ")
            ));
        }
        for l in &p.links {
            // Shown as running until the send loop starts (and then ends) the pass.
            *l.last_verify.borrow_mut() = Some(crate::admin::VerifyStatus {
                running: true,
                repair,
                done_bytes: 0,
                total_bytes: self.info.size,
                differing: Vec::new(),
                busy: Vec::new(),
                region_bytes: crate::replication::bitmap::REGION,
                aborted: None,
                seconds: 0.0,
            });
            l.verify_request.set(Some(repair));
            l.wake.notify_one();
        }
        Ok(())
    }

    /// Takes the volume's single replica-session slot (false if taken).
    pub fn claim_replica_session(&self) -> bool {
        !self.replica_session.replace(true)
    }

    /// Frees the replica-session slot.
    pub fn release_replica_session(&self) {
        self.replica_session.set(false);
    }

    /// This node's role for the volume.
    pub fn role(&self) -> Role {
        self.role.get()
    }

    /// Replication state, on a replicating primary.
    pub fn primary(&self) -> Option<&Rc<Primary>> {
        self.primary.as_ref()
    }

    /// Metric handles.
    pub fn metrics(&self) -> &VolumeMetrics {
        &self.metrics
    }

    /// Static description.
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// The core's buffer pool.
    pub fn pool(&self) -> &Rc<BufPool> {
        &self.pool
    }

    /// Counters.
    pub fn stats(&self) -> VolumeStats {
        self.stats.get()
    }

    /// The journal (for status reporting).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Largest payload a client may send in one request.
    pub fn max_payload(&self) -> u32 {
        self.journal
            .max_payload()
            .min(crate::journal::MAX_RECORD_PAYLOAD) as u32
    }

    fn check_writable(&self) -> Result<(), ErrorCode> {
        if self.info.read_only {
            return Err(ErrorCode::Perm);
        }
        if self.stopping.get() {
            return Err(ErrorCode::Shutdown);
        }
        Ok(())
    }

    /// Writes (and zeroes that must stay allocated) are refused with ENOSPC
    /// while the data store is full: the applier cannot make room in the
    /// journal, and a client gets a clear error instead of waiting forever.
    /// Acknowledged writes stay in the journal and are applied once there is
    /// space (the applier retries every second).
    fn check_space(&self) -> Result<(), ErrorCode> {
        if self.store_full.get() {
            return Err(ErrorCode::NoSpc);
        }
        Ok(())
    }

    /// Graceful stop: refuse new mutations (ESHUTDOWN), let every reserved
    /// record become durable and be applied, checkpoint, and return. A
    /// restart after this replays nothing. Bounded by `limit`; returns
    /// whether it finished in time.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.stopping.set(true);
        let done = self.stop_done.notified();
        self.apply_work.notify_one();
        if self.stopped.get() {
            return true;
        }
        tokio::time::timeout(limit, done).await.is_ok()
    }

    /// Reserves an LSN and journal space for a mutation and records it in
    /// the overlay (and, on a primary, in the replication window), in one
    /// step, so LSN order, journal order and overlay order agree.
    async fn reserve(
        &self,
        op: MutationOp,
        flags: u8,
        offset: u64,
        length: u64,
        payload: Option<Rc<Payload>>,
    ) -> Result<Rc<Record>, ErrorCode> {
        let in_place = self.in_place_min > 0
            && op == MutationOp::Write
            && payload.is_some()
            && length >= self.in_place_min
            && is_aligned(offset)
            && is_aligned(length);
        let new = crate::journal::NewRecord {
            op,
            flags,
            offset,
            length,
            payload,
            in_place,
        };
        self.journal
            .reserve(new, |rec| {
                let mut ov = self.overlay.borrow_mut();
                if in_place {
                    // The newest unapplied record under this range: the
                    // in-place write waits until it is applied, so no older
                    // record is written to the store over it afterwards.
                    let after = ov.newest(offset, offset + length);
                    if let Some(v) = self.me.upgrade() {
                        tokio_uring::spawn(v.place(rec.clone(), after));
                    }
                }
                match (rec.op, &rec.payload) {
                    (MutationOp::Write, Some(p)) => ov.insert(
                        offset,
                        offset + length,
                        rec.lsn,
                        Source::Data {
                            payload: p.clone(),
                            at: 0,
                        },
                    ),
                    (MutationOp::WriteZeroes, _) => {
                        ov.insert(offset, offset + length, rec.lsn, Source::Zero)
                    }
                    // A trim only promises zeroes for the whole blocks inside it.
                    (MutationOp::Trim, _) => ov.insert(
                        align_up(offset),
                        align_down(offset + length),
                        rec.lsn,
                        Source::Zero,
                    ),
                    // A write of no bytes (no payload) changes nothing.
                    (MutationOp::Write, None) => {}
                }
                drop(ov);
                if let Some(p) = &self.primary {
                    p.push(rec);
                }
            })
            .await
            .map_err(|e| {
                tracing::error!(volume = %self.info.name, "{e}");
                ErrorCode::Io
            })
    }

    /// Writes a large record's payload to its home in the data store,
    /// durably, then lets the journal write its header: in place when that
    /// worked, or with the payload (the usual double write) when it failed.
    /// Waits first until `after` (the newest older record overlapping it)
    /// is applied. Records reach the applier only once durable, so every
    /// record applied after this write starts is newer than it, and the
    /// store ends with the newest data.
    async fn place(self: Rc<Self>, rec: Rc<Record>, after: Option<Lsn>) {
        // Give up on going in place (the payload is journaled instead, which
        // needs no wait: the applier orders it) when the journal failed, or
        // the store is full: the applier cannot apply `after` then, and every
        // record behind this one, trims that would free space included,
        // would wait with it.
        let mut go = true;
        if let Some(after) = after {
            while self.applied_next.get() <= after {
                let applied = self.applied.notified();
                if self.journal.failed().is_some() || self.store_full.get() {
                    go = false;
                    break;
                }
                // Bounded wait: either may change meanwhile (checked above).
                let _ = tokio::time::timeout(Duration::from_millis(100), applied).await;
            }
        }
        // With replicas, the intent goes first: a crash between the payload
        // write and the record's header must still tell recovery which
        // range to resync (the replicas may not have it).
        let intent_ok = go
            && (self.primary.is_none()
                || self.journal.failed().is_some()
                || match self.journal.write_intent(&rec).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(volume = %self.info.name, "writing the intent of in-place LSN {} failed: {e}; journaling its data instead", rec.lsn);
                        false
                    }
                });
        let durable = if self.journal.failed().is_some() || !intent_ok {
            false
        } else {
            let p = rec
                .payload
                .as_ref()
                .expect("in-place records carry a payload");
            let writes = (0..p.chunk_count()).map(|i| {
                let slice = SharedSlice::new(p.clone(), i, 0, p.chunk_len(i));
                self.store
                    .write_all_durable(slice, rec.offset + (i * MAX_CHUNK) as u64)
            });
            let mut result = Ok(());
            for (res, _) in futures_util::future::join_all(writes).await {
                result = result.and(res);
            }
            match result {
                Ok(()) => {
                    self.metrics.in_place_bytes.increment(rec.length);
                    true
                }
                Err(e) => {
                    tracing::warn!(
                        volume = %self.info.name,
                        "in-place write of LSN {} ({} bytes at {}) failed: {e}; journaling its data instead",
                        rec.lsn, rec.length, rec.offset
                    );
                    self.metrics.in_place_fallbacks.increment(1);
                    false
                }
            }
        };
        self.journal.placed(&rec, durable);
    }

    async fn journal_and_wait(
        &self,
        op: MutationOp,
        flags: u8,
        offset: u64,
        length: u64,
        payload: Option<Rc<Payload>>,
        fua: bool,
    ) -> Result<(), ErrorCode> {
        self.check_writable()?;
        if op != MutationOp::Trim {
            self.check_space()?;
        }
        let rec = self.reserve(op, flags, offset, length, payload).await?;
        self.journal.wait_durable(rec.lsn).await.map_err(|e| {
            tracing::error!(volume = %self.info.name, "{e}");
            ErrorCode::Io
        })?;
        if let Some(p) = &self.primary {
            let t = std::time::Instant::now();
            match p.cfg.mode {
                Mode::Sync => p.wait_acked(rec.lsn, true).await,
                Mode::Flush => p.wait_acked(rec.lsn, fua).await,
                Mode::Async => p.wait_lag().await,
            }
            self.metrics.replica_wait.record(t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// On a replica: journals a record received from the primary, which must
    /// carry exactly the next LSN (invariant: never out of order). Waits for
    /// journal space (backpressure on the stream), not for durability.
    pub async fn accept_replicated(
        &self,
        h: &crate::replication::wire::RecordHeader,
        payload: Option<Payload>,
    ) -> Result<Lsn, String> {
        let want = self.journal.next_lsn();
        if h.lsn != want.0 {
            return Err(format!(
                "record LSN {} arrived where LSN {want} was expected",
                h.lsn
            ));
        }
        if h.offset
            .checked_add(h.length)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(format!(
                "record LSN {} reaches past the end of the volume",
                h.lsn
            ));
        }
        let rec = self
            .reserve(h.op, h.flags, h.offset, h.length, payload.map(Rc::new))
            .await
            .map_err(|_| "journal failed".to_string())?;
        assert_eq!(rec.lsn.0, h.lsn, "replica journal assigned a different LSN");
        Ok(rec.lsn)
    }

    /// Writes a payload at `offset`; returns once it is durable.
    pub async fn write(&self, offset: u64, payload: Payload, fua: bool) -> Result<(), ErrorCode> {
        let len = payload.len() as u64;
        if len == 0 {
            return Ok(());
        }
        self.journal_and_wait(
            MutationOp::Write,
            0,
            offset,
            len,
            Some(Rc::new(payload)),
            fua,
        )
        .await
    }

    /// Discards `[offset, offset+len)`; returns once durable.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ErrorCode> {
        if len == 0 {
            return Ok(());
        }
        self.journal_and_wait(MutationOp::Trim, 0, offset, len, None, false)
            .await
    }

    /// Zeroes `[offset, offset+len)`; returns once durable.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), ErrorCode> {
        if len == 0 {
            return Ok(());
        }
        let flags = if no_hole { FLAG_NO_HOLE } else { 0 };
        self.journal_and_wait(MutationOp::WriteZeroes, flags, offset, len, None, false)
            .await
    }

    /// Every write acknowledged so far is already durable (each is journaled
    /// with O_DSYNC before its reply), so a flush only has to report journal
    /// failure.
    pub async fn flush(&self) -> Result<(), ErrorCode> {
        if self.journal.failed().is_some() {
            return Err(ErrorCode::Io);
        }
        // In flush mode writes were acknowledged once received by the
        // replicas; a FLUSH waits until all of them are durable there.
        if let Some(p) = &self.primary {
            if p.cfg.mode == Mode::Flush {
                let last = Lsn(self.journal.next_lsn().0.saturating_sub(1));
                if last.0 > 0 {
                    p.wait_acked(last, true).await;
                }
            }
        }
        Ok(())
    }

    /// Reads `[offset, offset+len)`: the store, overlaid with unapplied extents.
    pub async fn read(&self, offset: u64, len: u64) -> Result<ReadData, ErrorCode> {
        let mut parts = Vec::new();
        if len == 0 {
            return Ok(ReadData { parts });
        }
        let end = offset + len;
        // Split at MAX_CHUNK-aligned volume offsets so each piece's aligned
        // span fits one buffer. Buffers for a multi-piece read are taken at
        // once (the pool serialises large takes, so two big requests never
        // hold half each and wait for each other).
        let span_of = |p0: u64| -> (u64, u64) {
            let p1 =
                (align_down(p0 / MAX_CHUNK as u64 * MAX_CHUNK as u64) + MAX_CHUNK as u64).min(end);
            (p0, p1)
        };
        let mut pieces = Vec::new();
        let mut p0 = offset;
        while p0 < end {
            let (a, b) = span_of(p0);
            pieces.push((a, b));
            p0 = b;
        }
        let sizes: Vec<usize> = pieces
            .iter()
            .map(|&(a, b)| (align_up(b) - align_down(a)) as usize)
            .collect();
        let bufs = self.pool.take_many(&sizes).await;
        let reads = pieces
            .into_iter()
            .zip(bufs)
            .map(|((p0, p1), buf)| self.read_piece(p0, p1, buf));
        for r in futures_util::future::join_all(reads).await {
            parts.push(r?);
        }
        Ok(ReadData { parts })
    }

    async fn read_piece(
        &self,
        p0: u64,
        p1: u64,
        mut buf: FixedBuf,
    ) -> Result<(FixedBuf, usize, usize), ErrorCode> {
        let a0 = align_down(p0);
        let a1 = align_up(p1);
        let overlay: Vec<Piece> = self.overlay.borrow().lookup(p0, p1);
        let covered: u64 = overlay.iter().map(|p| p.end - p.start).sum();
        if covered < p1 - p0 {
            let (res, b) = self.store.read_into(buf, a0, (a1 - a0) as usize).await;
            buf = b;
            res.map_err(|e| {
                tracing::error!(volume = %self.info.name, "read of the data store at {a0} failed: {e}");
                io_code(&e)
            })?;
        }
        for piece in overlay {
            let dst = &mut buf[(piece.start - a0) as usize..(piece.end - a0) as usize];
            match &piece.src {
                Source::Data { payload, at } => payload.copy_out(*at, dst),
                Source::Zero => dst.fill(0),
            }
        }
        Ok((buf, (p0 - a0) as usize, (p1 - a0) as usize))
    }

    /// Allocation of `[offset, offset+len)`: (length, hole) runs. Unapplied
    /// extents count as data (always a safe answer).
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Allocation> {
        let end = offset + len;
        let pending = self.overlay.borrow().lookup(offset, end);
        if pending.is_empty() {
            return self.store.allocation(offset, len);
        }
        // Conservative: the first extent up to the first pending byte from
        // the store, the rest as data.
        let first = pending[0].start;
        let mut out = if first > offset {
            self.store.allocation(offset, first - offset)
        } else {
            Vec::new()
        };
        out.push(Allocation {
            length: end - first,
            hole: false,
        });
        out
    }

    // ---- applier ----

    async fn run_applier(self: Rc<Self>) {
        let mut last_checkpoint = std::time::Instant::now();
        loop {
            let batch = self.take_apply_batch();
            if batch.is_empty()
                && self.stopping.get()
                && self.applied_next.get() >= self.journal.next_lsn()
            {
                if self.checkpoint_behind() {
                    self.checkpoint().await;
                }
                if !self.checkpoint_behind() || self.journal.failed().is_some() {
                    tracing::info!(
                        volume = %self.info.name,
                        "stopped: all {} records applied and checkpointed",
                        self.stats.get().applied
                    );
                    self.stopped.set(true);
                    self.stop_done.notify_waiters();
                    return;
                }
            }
            if batch.is_empty() {
                // Idle: checkpoint once the interval has passed, so a quiet
                // volume's journal empties and restarts replay little.
                let due = self
                    .checkpoint_interval
                    .saturating_sub(last_checkpoint.elapsed());
                let behind = self.checkpoint_behind();
                if behind && due.is_zero() {
                    self.checkpoint().await;
                    last_checkpoint = std::time::Instant::now();
                    continue;
                }
                let notified = self.apply_work.notified();
                if !self.apply_queue.borrow().is_empty() {
                    continue;
                }
                if self.stopping.get() {
                    let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
                } else if behind {
                    let _ = tokio::time::timeout(due, notified).await;
                } else {
                    notified.await;
                }
                continue;
            }
            let results =
                futures_util::future::join_all(batch.iter().map(|r| self.apply_record(r))).await;
            for (r, res) in batch.iter().zip(results) {
                if let Err(e) = res {
                    // The record stays in the journal, so a restart replays it;
                    // until then the overlay keeps serving its data.
                    let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
                    if full && !self.store_full.replace(true) {
                        tracing::error!(
                            volume = %self.info.name,
                            "the data store is full: new writes are refused with ENOSPC until space is freed on its filesystem (acknowledged writes are kept in the journal)"
                        );
                    }
                    tracing::error!(
                        volume = %self.info.name,
                        "applying LSN {} to the data store failed: {e}; retrying in 1 s",
                        r.lsn
                    );
                    {
                        let mut q = self.apply_queue.borrow_mut();
                        for rec in batch.iter().rev().filter(|x| x.lsn >= r.lsn) {
                            q.push_front(rec.clone());
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                self.overlay
                    .borrow_mut()
                    .remove(r.offset, r.offset + r.length, r.lsn);
                assert_eq!(
                    self.applied_next.get(),
                    r.lsn,
                    "records applied out of LSN order"
                );
                self.applied_next.set(r.lsn.next());
                self.applied.notify_waiters();
                if self.store_full.replace(false) {
                    tracing::warn!(volume = %self.info.name, "the data store has space again: writes are accepted");
                }
                let mut s = self.stats.get();
                s.applied += 1;
                self.stats.set(s);
            }
            self.metrics
                .apply_lag
                .set(self.apply_queue.borrow().len() as f64);
            self.metrics.journal_used.set(self.journal.used() as f64);
            if let Some(p) = &self.primary {
                p.trim(self.applied_next.get());
                // A replica that is away may hold at most half the journal;
                // past that it stops being waited for and must resync.
                if self.journal.fill_ratio() > 0.5 {
                    for l in p
                        .links
                        .iter()
                        .filter(|l| l.retain.get() && *l.phase.borrow() != Phase::InSync)
                    {
                        l.retain.set(false);
                        tracing::warn!(volume = %self.info.name, peer = %l.peer.name, "journal half full: no longer keeping records for replica {}; it will need a resync", l.peer.name);
                    }
                }
            }
            // Checkpoint when a quarter of the journal is in use (at most
            // every 20 ms, so a replica holding space back cannot turn this
            // into a flush per batch), or on the interval.
            let since = last_checkpoint.elapsed();
            let pressure = self.journal.fill_ratio() > 0.25 && since >= Duration::from_millis(20);
            if self.checkpoint_behind() && (pressure || since >= self.checkpoint_interval) {
                self.checkpoint().await;
                last_checkpoint = std::time::Instant::now();
            }
        }
    }

    /// The LSN the checkpoint may advance to: everything below is applied.
    fn checkpoint_target(&self) -> Lsn {
        let applied = self.applied_next.get();
        match self.primary.as_ref().and_then(|p| p.retention_floor()) {
            Some(floor) => applied.min(floor),
            None => applied,
        }
    }

    /// Before the checkpoint releases records below `target`: every replica
    /// that does not have them durably gets their regions marked in its
    /// out-of-sync bitmap, persisted first (a later bitmap resync sends them).
    fn mark_released(&self, target: Lsn) -> std::io::Result<()> {
        let Some(p) = &self.primary else {
            return Ok(());
        };
        let from_all = self.journal.checkpoint_lsn();
        for l in &p.links {
            let from = l.durable_next.get().max(from_all);
            if from >= target {
                continue;
            }
            let mut oos = l.oos.borrow_mut();
            let mut job = l.job.borrow_mut();
            for (offset, len) in self.journal.retained_extents(from, target) {
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

    /// Whether the checkpoint can move forward.
    fn checkpoint_behind(&self) -> bool {
        self.checkpoint_target() > self.journal.checkpoint_lsn()
    }

    fn take_apply_batch(&self) -> Vec<Rc<Record>> {
        let mut q = self.apply_queue.borrow_mut();
        let mut batch: Vec<Rc<Record>> = Vec::new();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        while let Some(r) = q.front() {
            if batch.len() >= APPLY_BATCH {
                break;
            }
            let span = (align_down(r.offset), align_up(r.offset + r.length));
            // Records touching the same block must be applied in order: end
            // the batch at the first overlap.
            if spans.iter().any(|&(a, b)| span.0 < b && a < span.1) {
                break;
            }
            spans.push(span);
            batch.push(q.pop_front().expect("front exists"));
        }
        batch
    }

    /// Makes the store durable, then moves the journal checkpoint to the
    /// target and releases the space.
    async fn checkpoint(&self) {
        let target = self.checkpoint_target();
        if let Err(e) = self.store.sync().await {
            tracing::error!(volume = %self.info.name, "syncing the data store failed: {e}; checkpoint postponed");
            return;
        }
        if let Err(e) = self.mark_released(target) {
            tracing::error!(volume = %self.info.name, "writing an out-of-sync bitmap failed: {e}; checkpoint postponed");
            return;
        }
        match self.journal.checkpoint_to(target).await {
            Ok(true) => {
                let mut s = self.stats.get();
                s.checkpoints += 1;
                self.stats.set(s);
                self.metrics.checkpoints.increment(1);
                self.metrics.journal_used.set(self.journal.used() as f64);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(volume = %self.info.name, "writing the journal checkpoint failed: {e}")
            }
        }
    }

    async fn apply_record(&self, r: &Rc<Record>) -> io::Result<()> {
        let (start, end) = (r.offset, r.offset + r.length);
        match r.op {
            // Already home, durably, before the record was journaled.
            MutationOp::Write if r.in_place() => Ok(()),
            MutationOp::Write => {
                // A write of no bytes (from a peer) carries no payload.
                let Some(p) = r.payload.as_ref() else {
                    return Ok(());
                };
                if is_aligned(start) && is_aligned(r.length) {
                    let writes = (0..p.chunk_count()).map(|i| {
                        let slice = SharedSlice::new(p.clone(), i, 0, p.chunk_len(i));
                        self.store.write_all(slice, start + (i * MAX_CHUNK) as u64)
                    });
                    for (res, _) in futures_util::future::join_all(writes).await {
                        res?;
                    }
                    Ok(())
                } else {
                    self.read_modify_write(start, end, |dst, vol_off| {
                        p.copy_out((vol_off - start) as usize, dst)
                    })
                    .await
                }
            }
            MutationOp::Trim => {
                let (a, b) = (align_up(start), align_down(end));
                if b > a {
                    self.store.zero(a, b - a, true).await?;
                }
                Ok(())
            }
            MutationOp::WriteZeroes => {
                let punch = r.flags & FLAG_NO_HOLE == 0;
                let (a, b) = (align_up(start), align_down(end));
                if b > a {
                    self.store.zero(a, b - a, punch).await?;
                    if start < a {
                        self.read_modify_write(start, a, |d, _| d.fill(0)).await?;
                    }
                    if b < end {
                        self.read_modify_write(b, end, |d, _| d.fill(0)).await?;
                    }
                    Ok(())
                } else {
                    self.read_modify_write(start, end, |d, _| d.fill(0)).await
                }
            }
        }
    }

    /// Patches `[start, end)` of the store through the applier's scratch
    /// buffer, a chunk at a time: read the aligned span, let `fill` write the
    /// new bytes for (destination, volume offset), write the span back.
    async fn read_modify_write(
        &self,
        start: u64,
        end: u64,
        fill: impl Fn(&mut [u8], u64),
    ) -> io::Result<()> {
        let mut buf = self
            .scratch
            .borrow_mut()
            .take()
            .unwrap_or_else(|| AlignedBuf::new(MAX_CHUNK));
        let mut result = Ok(());
        let mut pos = start;
        while pos < end {
            let a0 = align_down(pos);
            let a1 = align_up(end).min(a0 + MAX_CHUNK as u64);
            let piece_end = end.min(a1);
            let n = (a1 - a0) as usize;
            let (res, b) = self.store.read_into(buf, a0, n).await;
            buf = b;
            if let Err(e) = res {
                result = Err(e);
                break;
            }
            fill(
                &mut buf.as_mut_slice()[(pos - a0) as usize..(piece_end - a0) as usize],
                pos,
            );
            let (res, slice) = self
                .store
                .write_all(tokio_uring::buf::BoundedBuf::slice(buf, 0..n), a0)
                .await;
            buf = slice.into_inner();
            if let Err(e) = res {
                result = Err(e);
                break;
            }
            pos = piece_end;
        }
        *self.scratch.borrow_mut() = Some(buf);
        result
    }
}
