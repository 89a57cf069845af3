//! The applier: writes durable journal records to their home in the data
//! store in LSN order, then makes the store durable and moves the journal
//! checkpoint so the space is released.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Engine;
use crate::buffer::{AlignedBuf, SharedSlice, MAX_CHUNK};
use crate::journal::format::FLAG_NO_HOLE;
use crate::journal::Record;
use crate::journal::{Durability, MutationOp};
use crate::units::{align_down, align_up, is_aligned, Lsn};

/// Most records the applier writes to the store at once.
const APPLY_BATCH: usize = 64;

/// The most often a checkpoint is taken under journal pressure, so a
/// replica holding space back cannot turn checkpoints into a flush per batch.
const PRESSURE_CHECKPOINT_GAP: Duration = Duration::from_millis(20);

/// Journal fill past which the applier checkpoints before the interval
/// (and, with `--durability flush`, asks for a journal sync at once).
const PRESSURE_FILL: f64 = 0.25;

/// With `--durability flush`: how long the applier waits, once it finds its
/// next batch not yet durable, for a sync a FLUSH or a FUA write asks for,
/// before it asks for one itself (sooner under journal pressure). Meanwhile
/// the records stay in the journal and the overlay, which serves reads.
///
/// Why 100 ms: a client that writes little and never flushes then costs at
/// most 10 journal `fdatasync`s a second (a few percent of the disk's time
/// at ~1–2 ms a flush, instead of syncs back to back); it is a tenth of the
/// default checkpoint interval (1 s), so a checkpoint finds nearly
/// everything applied and releases it; and it bounds how long acknowledged
/// data waits for its home. A busy client may hit pressure first
/// (half the core's buffer pool out, see `Held::pressure`): 100 ms of 4 KiB writes at 20k/s are 2,000 records,
/// just under half the default pool's 4,604 buffers (the pool had 864
/// before its small classes were carved from plain memory, so a sync came
/// every ~430 writes). The engine uses the checkpoint interval instead
/// when that is shorter.
pub const FLUSH_MODE_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// The longest prefix of `spans` (aligned `[start, end)` of queued records,
/// oldest first) that may be applied at once: at most [`APPLY_BATCH`], and
/// ending before the first record that overlaps an earlier one (records
/// touching the same block must be applied in order).
fn batch_len(spans: impl Iterator<Item = (u64, u64)>) -> usize {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for span in spans.take(APPLY_BATCH) {
        if taken.iter().any(|&(a, b)| span.0 < b && a < span.1) {
            break;
        }
        taken.push(span);
    }
    taken.len()
}

/// Whether the journal is under pressure (more than [`PRESSURE_FILL`]
/// full): checkpoints come sooner, and a replica's retention moving wakes
/// the idle applier.
pub(super) fn under_pressure(fill: f64) -> bool {
    fill > PRESSURE_FILL
}

/// Whether to checkpoint now: something can be released, and either the
/// journal is under pressure (not more often than the gap) or the interval
/// has passed.
fn checkpoint_due(behind: bool, fill: f64, since: Duration, interval: Duration) -> bool {
    let pressure = under_pressure(fill) && since >= PRESSURE_CHECKPOINT_GAP;
    behind && (pressure || since >= interval)
}

/// What the applier does with nothing to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleStep {
    /// Checkpoint now.
    Checkpoint,
    /// Wait for work (records, a stop, a replica's retention moving) at
    /// most this long; None: until woken.
    Wait(Option<Duration>),
}

/// With nothing to apply: checkpoint when one is due ([`checkpoint_due`]:
/// under journal pressure after the gap, not only on the interval, since
/// writers may be waiting for the space a replica's acknowledgement just
/// let go), else wait, bounded by when one falls due if anything can be
/// released. Nothing to release: wait until woken.
fn idle_step(behind: bool, fill: f64, since: Duration, interval: Duration) -> IdleStep {
    if checkpoint_due(behind, fill, since, interval) {
        return IdleStep::Checkpoint;
    }
    if !behind {
        return IdleStep::Wait(None);
    }
    let until_interval = interval.saturating_sub(since);
    let until_due = if under_pressure(fill) {
        until_interval.min(PRESSURE_CHECKPOINT_GAP.saturating_sub(since))
    } else {
        until_interval
    };
    IdleStep::Wait(Some(until_due))
}

/// Why the flush-mode applier asked for a journal sync itself (counted in
/// [`super::VolumeStats::sync_asks`] and the `mirrorblk_applier_sync_asks_total`
/// metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAsk {
    /// A graceful stop applies everything.
    Stop,
    /// The journal is a quarter full.
    Journal,
    /// Half the pool's buffers are out.
    Buffers,
    /// A request waits for a buffer.
    Starved,
    /// [`FLUSH_MODE_SYNC_INTERVAL`] passed without a FLUSH or FUA write.
    Interval,
}

impl SyncAsk {
    /// Every reason, in the order of [`SyncAsks::count`]'s array.
    pub const ALL: [SyncAsk; 5] = [
        SyncAsk::Stop,
        SyncAsk::Journal,
        SyncAsk::Buffers,
        SyncAsk::Starved,
        SyncAsk::Interval,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        crate::telemetry::SYNC_ASK_REASONS[self as usize]
    }
}

/// Journal syncs the flush-mode applier asked for, by [`SyncAsk`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncAsks {
    /// Counts in the order of [`SyncAsk::ALL`].
    pub count: [u64; 5],
}

impl SyncAsks {
    /// Asks for `why`.
    pub fn of(&self, why: SyncAsk) -> u64 {
        self.count[why as usize]
    }

    fn add(&mut self, why: SyncAsk) {
        self.count[why as usize] += 1;
    }
}

/// What is held unapplied, which the flush-mode applier weighs before it
/// asks for a journal sync itself.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Journal fill ([`crate::journal::Journal::fill_ratio`]).
    fill: f64,
    /// Buffers out of the core's pool. Under writes, unapplied records
    /// hold most of them (each write its payload's chunks, in the
    /// overlay, until it is applied); reads and replication sends hold
    /// theirs briefly.
    in_use: usize,
    /// Buffers in the core's pool: the memory bound of unapplied data.
    buffers: usize,
    /// Some request is waiting for a buffer now.
    starved: bool,
}

impl Held {
    /// Journal or buffer pressure: the journal past [`PRESSURE_FILL`]
    /// (only applied records can be released, and writers wait for space
    /// once it is full), a request already waiting for a buffer, or half
    /// the pool's buffers out. Half, because the rest must carry the writes
    /// that arrive during the sync and while the backlog is applied (at
    /// 20k writes/s, ~30 during a 1.5 ms sync, a few hundred while 2,000
    /// records are applied). It counts buffers, not bytes: a 4 KiB write
    /// may borrow any class, so every buffer is one it may use. Writes of
    /// 1 MiB and more use only the 1 MiB class and reach half of all
    /// buffers rarely; for them a request waiting (starved) is the signal,
    /// as before. A byte rule would catch them sooner but would also fire
    /// under large reads, which a sync does not release.
    fn pressure(&self) -> Option<SyncAsk> {
        if self.fill > PRESSURE_FILL {
            Some(SyncAsk::Journal)
        } else if self.starved {
            Some(SyncAsk::Starved)
        } else if self.in_use.saturating_mul(2) >= self.buffers {
            Some(SyncAsk::Buffers)
        } else {
            None
        }
    }
}

/// With `--durability flush`: whether (and why) the applier asks for a
/// journal sync now instead of waiting for one a FLUSH or FUA write asks
/// for: when stopping (a graceful stop applies everything), under pressure
/// ([`Held::pressure`]), or once it has waited `interval`.
fn apply_sync_due(
    stopping: bool,
    held: Held,
    waited: Duration,
    interval: Duration,
) -> Option<SyncAsk> {
    if stopping {
        return Some(SyncAsk::Stop);
    }
    held.pressure()
        .or((waited >= interval).then_some(SyncAsk::Interval))
}

impl Engine {
    /// The applier, forever (until a graceful stop ends it).
    pub(super) async fn run_applier(self: Rc<Self>) {
        let mut last_checkpoint = Instant::now();
        loop {
            let batch = self.take_apply_batch();
            self.metrics.journal_syncs.absolute(self.journal.syncs());
            self.metrics
                .journal_written
                .absolute(self.journal.bytes_written());
            if batch.is_empty() {
                if self.stopping.get() && self.finish_stop().await {
                    return;
                }
                self.idle(&mut last_checkpoint).await;
                continue;
            }
            if !self.wait_batch_durable(&batch).await {
                continue;
            }
            self.apply_batch(&batch).await;
            self.metrics
                .apply_lag
                .set(self.apply_queue.borrow().len() as f64);
            self.metrics.journal_used.set(self.journal.used() as f64);
            if let Some(h) = self.hooks() {
                h.applied(self.applied_next.get(), &self.journal);
            }
            let since = last_checkpoint.elapsed();
            let fill = self.journal.fill_ratio();
            if checkpoint_due(
                self.checkpoint_behind(),
                fill,
                since,
                self.checkpoint_interval,
            ) {
                self.checkpoint().await;
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Stopping with nothing queued: once everything reserved is applied,
    /// checkpoint and report the stop. Returns whether the applier ends.
    async fn finish_stop(&self) -> bool {
        if self.applied_next.get() < self.journal.next_lsn() {
            return false;
        }
        if self.checkpoint_behind() {
            self.checkpoint().await;
        }
        if self.checkpoint_behind() && self.journal.failed().is_none() {
            return false;
        }
        tracing::info!(
            volume = %self.info.name,
            "stopped: all {} records applied and checkpointed",
            self.stats.get().applied
        );
        self.stopped.set(true);
        self.stop_done.notify_waiters();
        true
    }

    /// Nothing to apply: checkpoint once one is due ([`idle_step`]: on the
    /// interval, so a quiet volume's journal empties and restarts replay
    /// little, or soon under journal pressure), else wait for work, bounded
    /// by when the checkpoint falls due. A replica's retention moving wakes
    /// it too ([`Engine::retention_moved`]): with the journal full, writers
    /// wait for the space, so no record comes to wake it.
    async fn idle(&self, last_checkpoint: &mut Instant) {
        let step = idle_step(
            self.checkpoint_behind(),
            self.journal.fill_ratio(),
            last_checkpoint.elapsed(),
            self.checkpoint_interval,
        );
        if step == IdleStep::Checkpoint {
            self.checkpoint().await;
            *last_checkpoint = Instant::now();
            return;
        }
        let notified = self.apply_work.notified();
        if !self.apply_queue.borrow().is_empty() {
            return;
        }
        if self.stopping.get() {
            let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
        } else if let IdleStep::Wait(Some(due)) = step {
            let _ = tokio::time::timeout(due, notified).await;
        } else {
            notified.await;
        }
    }

    /// Waits until a batch is durable in the journal (at once but for
    /// `--durability flush`, where records come here once written): the
    /// store never holds a record the journal could lose, so recovery,
    /// which stops at the first torn record, never leaves a later record's
    /// data in the store without an earlier one. False (the batch back in
    /// the queue, after a pause) when the journal failed first.
    async fn wait_batch_durable(&self, batch: &[Rc<Record>]) -> bool {
        let last = batch.last().expect("a batch is never empty").lsn;
        if self.journal.durability() == Durability::Flush {
            self.wait_sync_due(last).await;
        }
        match self.journal.wait_durable(last).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(volume = %self.info.name, "{e}: records from LSN {} are not applied", batch[0].lsn);
                {
                    let mut q = self.apply_queue.borrow_mut();
                    for rec in batch.iter().rev() {
                        q.push_front(rec.clone());
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        }
    }

    /// With `--durability flush`: waits until the record `last` is durable
    /// through a sync someone else asked for, or until the applier must ask
    /// for one itself ([`apply_sync_due`]), so that records accumulate
    /// (in the journal and the overlay) instead of each batch costing an
    /// `fdatasync`. Wakes for new records (the journal fills), a stop, and
    /// the end of the interval.
    async fn wait_sync_due(&self, last: Lsn) {
        let began = Instant::now();
        let interval = self.flush_sync_interval.min(self.checkpoint_interval);
        loop {
            if self.journal.durable_next() > last || self.journal.failed().is_some() {
                return;
            }
            let waited = began.elapsed();
            let held = Held {
                fill: self.journal.fill_ratio(),
                in_use: self.pool.in_use(),
                buffers: self.pool.buffers(),
                starved: self.pool.starved(),
            };
            if let Some(why) = apply_sync_due(self.stopping.get(), held, waited, interval) {
                self.sync_asked(why);
                return;
            }
            let more = self.apply_work.notified();
            let starved = self.pool.wait_starved();
            tokio::select! {
                _ = self.journal.wait_durable_unasked(last) => return,
                _ = more => {}
                _ = starved => {}
                _ = tokio::time::sleep(interval.saturating_sub(waited)) => {}
            }
        }
    }

    /// Counts a sync the applier asks for, by why.
    fn sync_asked(&self, why: SyncAsk) {
        let mut s = self.stats.get();
        s.sync_asks.add(why);
        self.stats.set(s);
        self.metrics.sync_asked(why as usize);
    }

    /// Applies one batch. On a failure the failed record and those after it
    /// go back to the queue (they stay in the journal, so a restart replays
    /// them; until then the overlay keeps serving their data) and the
    /// applier pauses a second.
    async fn apply_batch(&self, batch: &[Rc<Record>]) {
        let last = batch.last().map_or(Lsn(0), |r| r.lsn);
        assert!(
            last < self.journal.durable_next(),
            "applying LSN {last:?}, which is not durable in the journal"
        );
        // Old data a snapshot needs goes aside before it is overwritten.
        self.keep_for_snapshots(batch).await;
        let results =
            futures_util::future::join_all(batch.iter().map(|r| self.apply_record(r))).await;
        for (r, res) in batch.iter().zip(results) {
            if let Err(e) = res {
                self.apply_failed(batch, r, &e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
            self.applied_one(r);
        }
    }

    fn apply_failed(&self, batch: &[Rc<Record>], r: &Record, e: &io::Error) {
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
        let mut q = self.apply_queue.borrow_mut();
        for rec in batch.iter().rev().filter(|x| x.lsn >= r.lsn) {
            q.push_front(rec.clone());
        }
    }

    fn applied_one(&self, r: &Record) {
        self.overlay
            .borrow_mut()
            .remove(r.offset, r.offset + r.length, r.lsn);
        assert_eq!(
            self.applied_next.get(),
            r.lsn,
            "records applied out of LSN order"
        );
        self.applied_next.set(r.lsn.next());
        // After the store write completed and the size changed (resize).
        self.read_gate.applied();
        self.applied.notify_waiters();
        if self.store_full.replace(false) {
            tracing::warn!(volume = %self.info.name, "the data store has space again: writes are accepted");
        }
        let mut s = self.stats.get();
        s.applied += 1;
        self.stats.set(s);
    }

    /// The LSN the checkpoint may advance to: everything below is applied,
    /// and no replica the hooks keep records for needs it; the first of its
    /// batch when it falls inside one (the journal releases whole batches).
    fn checkpoint_target(&self) -> Lsn {
        let applied = self.applied_next.get();
        let target = match self.hooks().and_then(|h| h.retention_floor()) {
            Some(floor) => applied.min(floor),
            None => applied,
        };
        self.journal.checkpoint_floor(target)
    }

    /// Whether the checkpoint can move forward.
    fn checkpoint_behind(&self) -> bool {
        self.checkpoint_target() > self.journal.checkpoint_lsn()
    }

    fn take_apply_batch(&self) -> Vec<Rc<Record>> {
        let mut q = self.apply_queue.borrow_mut();
        // A resize overlaps everything: it is applied alone, after every
        // record before it and before any after it.
        let n = batch_len(q.iter().map(|r| match r.op {
            MutationOp::Resize => (0, u64::MAX),
            _ => (align_down(r.offset), align_up(r.offset + r.length)),
        }));
        let snaps = self.snapshots.borrow();
        let n = if snaps.is_empty() {
            n
        } else {
            let starts = snaps.iter().map(|s| s.start());
            super::snapshot::cut_at_starts(q.iter().take(n).map(|r| r.lsn), starts)
        };
        drop(snaps);
        q.drain(..n).collect()
    }

    /// Makes the store durable, then moves the journal checkpoint to the
    /// target and releases the space.
    async fn checkpoint(&self) {
        let pressure = self.journal.fill_ratio() > PRESSURE_FILL;
        let allowed = self.changes_allow(self.checkpoint_target(), pressure).await;
        // Exactly what the journal will release, so the hooks mark no more.
        let target = self.journal.checkpoint_floor(allowed);
        if let Err(e) = self.store.sync().await {
            tracing::error!(volume = %self.info.name, "syncing the data store failed: {e}; checkpoint postponed");
            return;
        }
        // The snapshots' map entries so far are durable: a restart must not
        // take a damaged one for a torn batch once the records that
        // overwrote its region leave the journal.
        self.seal_snapshots().await;
        if let Some(h) = self.hooks() {
            if let Err(e) = h.before_release(target, &self.journal) {
                tracing::error!(volume = %self.info.name, "writing an out-of-sync bitmap failed: {e}; checkpoint postponed");
                return;
            }
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
            MutationOp::Write => self.apply_write(r).await,
            MutationOp::Trim => {
                let (a, b) = (align_up(start), align_down(end));
                if b > a {
                    self.store.zero(a, b - a, true).await?;
                }
                Ok(())
            }
            MutationOp::WriteZeroes => {
                let punch = r.flags & FLAG_NO_HOLE == 0;
                self.apply_zeroes(start, end, punch).await
            }
            MutationOp::Resize => self.apply_resize(r.offset, r.lsn).await,
        }
    }

    async fn apply_write(&self, r: &Record) -> io::Result<()> {
        let (start, end) = (r.offset, r.offset + r.length);
        // A write of no bytes (from a peer) carries no payload.
        let Some(p) = r.payload.as_ref() else {
            return Ok(());
        };
        if !(is_aligned(start) && is_aligned(r.length)) {
            return self
                .read_modify_write(start, end, |dst, vol_off| {
                    p.copy_out((vol_off - start) as usize, dst)
                })
                .await;
        }
        let writes = (0..p.chunk_count()).map(|i| {
            let slice = SharedSlice::new(p.clone(), i, 0, p.chunk_len(i));
            self.store.write_all(slice, start + (i * MAX_CHUNK) as u64)
        });
        for (res, _) in futures_util::future::join_all(writes).await {
            res?;
        }
        Ok(())
    }

    /// Zeroes `[start, end)`: whole blocks through the store's zeroing
    /// (punching holes when `punch`), partial blocks at either end by
    /// read-modify-write.
    async fn apply_zeroes(&self, start: u64, end: u64, punch: bool) -> io::Result<()> {
        let (a, b) = (align_up(start), align_down(end));
        if b <= a {
            return self.read_modify_write(start, end, |d, _| d.fill(0)).await;
        }
        self.store.zero(a, b - a, punch).await?;
        if start < a {
            self.read_modify_write(start, a, |d, _| d.fill(0)).await?;
        }
        if b < end {
            self.read_modify_write(b, end, |d, _| d.fill(0)).await?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_ends_at_the_first_overlap_or_the_bound() {
        let b = 4096;
        // Disjoint: all of them.
        assert_eq!(
            batch_len([(0, b), (b, 2 * b), (4 * b, 5 * b)].into_iter()),
            3
        );
        // The third touches the first's block: the batch ends before it.
        assert_eq!(batch_len([(0, b), (b, 2 * b), (0, b)].into_iter()), 2);
        assert_eq!(batch_len([(0, 2 * b), (b, 2 * b)].into_iter()), 1);
        // Never more than the bound.
        let many = (0..1000u64).map(|i| (i * b, (i + 1) * b));
        assert_eq!(batch_len(many), APPLY_BATCH);
        assert_eq!(batch_len(std::iter::empty()), 0);
    }

    #[test]
    fn checkpoints_fall_due_on_pressure_or_interval_never_when_nothing_to_release() {
        let interval = Duration::from_secs(5);
        let ms = Duration::from_millis;
        // Nothing to release: never.
        assert!(!checkpoint_due(false, 0.9, interval * 2, interval));
        // Quiet journal: on the interval only.
        assert!(!checkpoint_due(true, 0.1, ms(4999), interval));
        assert!(checkpoint_due(true, 0.1, interval, interval));
        // Pressure: soon, but not more often than the gap.
        assert!(!checkpoint_due(true, 0.5, ms(19), interval));
        assert!(checkpoint_due(true, 0.5, ms(20), interval));
        assert!(!checkpoint_due(true, 0.25, ms(100), interval));
    }

    #[test]
    fn an_idle_applier_checkpoints_when_due_and_waits_at_most_until_then() {
        use IdleStep::*;
        let interval = Duration::from_secs(1);
        let ms = Duration::from_millis;
        // (behind, fill, since the last checkpoint, step)
        let table = [
            // Nothing to release: wait for work, however full.
            (false, 0.1, ms(0), Wait(None)),
            (false, 1.0, interval * 3, Wait(None)),
            // Quiet journal: on the interval.
            (true, 0.1, ms(300), Wait(Some(ms(700)))),
            (true, 0.1, interval, Checkpoint),
            // Pressure (a full journal whose writers wait): after the gap.
            (true, 1.0, ms(5), Wait(Some(ms(15)))),
            (true, 1.0, ms(20), Checkpoint),
            (true, 0.26, ms(500), Checkpoint),
        ];
        for (behind, fill, since, want) in table {
            assert_eq!(
                idle_step(behind, fill, since, interval),
                want,
                "{behind} {fill} {since:?}"
            );
        }
    }

    #[test]
    fn flush_mode_asks_for_a_sync_on_pressure_interval_or_stop_only() {
        use SyncAsk::*;
        let i = FLUSH_MODE_SYNC_INTERVAL;
        let ms = Duration::from_millis;
        let held = |fill, in_use, starved| Held {
            fill,
            in_use,
            buffers: 800,
            starved,
        };
        // (stopping, what is held, waited, asked for and why)
        let table = [
            // Quiet: wait for a FLUSH or FUA write to sync.
            (false, held(0.0, 0, false), ms(0), None),
            (false, held(0.25, 399, false), i - ms(1), None),
            // The interval has passed.
            (false, held(0.0, 1, false), i, Some(Interval)),
            (false, held(0.1, 1, false), i * 3, Some(Interval)),
            // Journal pressure: at once.
            (false, held(0.26, 1, false), ms(0), Some(Journal)),
            (false, held(0.26, 400, true), i, Some(Journal)),
            // Half the buffers out, or a request waits for one: at once.
            (false, held(0.0, 400, false), ms(0), Some(Buffers)),
            (false, held(0.0, 800, false), i, Some(Buffers)),
            (false, held(0.0, 3, true), ms(0), Some(Starved)),
            // A graceful stop applies everything: at once.
            (true, held(0.0, 0, false), ms(0), Some(Stop)),
            (true, held(0.9, 800, true), i, Some(Stop)),
        ];
        for (stopping, h, waited, want) in table {
            assert_eq!(
                apply_sync_due(stopping, h, waited, i),
                want,
                "{stopping} {h:?} {waited:?}"
            );
        }
    }

    #[test]
    fn each_reason_has_its_own_count_and_label() {
        let mut asks = SyncAsks::default();
        for (n, why) in SyncAsk::ALL.iter().enumerate() {
            for _ in 0..=n {
                asks.add(*why);
            }
        }
        for (n, why) in SyncAsk::ALL.iter().enumerate() {
            assert_eq!(asks.of(*why), n as u64 + 1, "{why:?}");
        }
        let labels: Vec<_> = SyncAsk::ALL.iter().map(|w| w.label()).collect();
        assert_eq!(
            labels,
            ["stop", "journal", "buffers", "starved", "interval"],
            "labels in the order of the reasons"
        );
    }
}
