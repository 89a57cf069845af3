//! The engine's side of changed-block tracking (the table itself is
//! `changes`): mark every record when it gets its LSN (on the primary and,
//! with the same LSN, on a replica) and every region a resync writes; keep
//! the journal checkpoint from passing what the persisted table holds; and
//! answer "what changed since LSN X".

use std::io;
use std::time::Duration;

use super::changes::{self, ChangeTable, ChangedRanges};
use super::{Engine, VolumeInfo};
use crate::journal::Journal;
use crate::units::Lsn;

/// How long the table may go unsaved while the journal holds what it lacks:
/// the journal keeps (at most) this much more history, in exchange for
/// writing the table only this often. Under journal pressure, and at a
/// stop, it is saved at once.
const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// What changed since an LSN, as a volume answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeReport {
    /// The volume's UUID (the table's key, the same on every node).
    pub uuid: [u8; 16],
    /// The last LSN the answer covers (every record up to it is included).
    pub lsn: u64,
    /// The ranges, and whether they are exact.
    pub changed: ChangedRanges,
}

/// The table a volume starts with, and the LSN its persisted copy is
/// complete up to (0: not persisted yet). Recovery (`node`) has already
/// marked and persisted the replayed records; a table that cannot be used
/// is replaced by one that answers only from the journal's checkpoint on.
pub(super) fn open_table(info: &VolumeInfo, journal: &Journal) -> (ChangeTable, Lsn) {
    let path = changes::table_path(&info.journal);
    let from = journal.checkpoint_lsn();
    let (table, saved, why) = changes::adopt(
        changes::load(&path),
        journal.volume_uuid(),
        info.size.get(),
        from,
    );
    if let Some(why) = why.filter(|_| from.0 > 1) {
        tracing::warn!(
            volume = %info.name,
            "{why}: changed-block tracking starts over and knows only changes after LSN {}; the next incremental backup is a full one",
            from.last()
        );
    }
    (table, saved)
}

/// A volume whose store was created in this start (all zeroes) and whose
/// journal has never held a record starts a table that knows it: regions no
/// record changes keep reading as zeroes, which BLOCK_STATUS reports as
/// holes. (Recovery has just saved an empty table; with no record and a
/// new store it cannot know more than this one.)
pub fn seed_new_volume(
    journal: &std::path::Path,
    uuid: [u8; 16],
    size: u64,
    store_created: bool,
    next_lsn: Lsn,
) -> io::Result<()> {
    let path = changes::table_path(journal);
    if !store_created || next_lsn > Lsn(1) {
        return Ok(());
    }
    let image = ChangeTable::born_zero(uuid, size).encode(next_lsn);
    changes::write_durably(&path, &image)
}

impl Engine {
    /// Record `lsn` (just reserved) changed `[offset, offset + len)`.
    pub(super) fn mark_changed(&self, offset: u64, len: u64, lsn: Lsn) {
        self.changes.borrow_mut().mark(offset, len, lsn);
    }

    /// Record `lsn` (just reserved) resized the volume to `size` bytes.
    pub(super) fn resize_changes(&self, size: u64, lsn: Lsn) {
        self.changes.borrow_mut().resize(size, lsn);
    }

    /// A resync wrote `[offset, offset + len)`: marked with the next LSN, at
    /// or after anything the region can hold (over-reporting is safe); the
    /// table is persisted at the next store sync, before the resync's
    /// acknowledgement lets the primary forget the region.
    pub(super) fn mark_resynced(&self, offset: u64, len: u64) {
        let lsn = self.journal.next_lsn();
        self.changes.borrow_mut().mark(offset, len, lsn);
        self.resync_marked.set(true);
    }

    /// What changed after LSN `since`, merged into byte ranges.
    pub fn changed_since(&self, since: u64) -> ChangeReport {
        let t = self.changes.borrow();
        ChangeReport {
            uuid: t.uuid(),
            lsn: self.journal.next_lsn().last(),
            changed: t.changed_since(since),
        }
    }

    /// The volume's UUID (the journal superblock's, the same on every node).
    pub fn volume_uuid(&self) -> [u8; 16] {
        self.changes.borrow().uuid()
    }

    /// Calls `extent(offset, length, changed)` for the runs of
    /// `[offset, offset + len)` that did or did not change after `since`.
    pub fn changed_extents(
        &self,
        since: u64,
        offset: u64,
        len: u64,
        extent: impl FnMut(u64, u64, bool),
    ) {
        self.changes.borrow().walk(since, offset, len, extent);
    }

    /// Persists the table (every record reserved so far is in it).
    pub(super) async fn save_changes(&self) -> io::Result<()> {
        let _one = self.changes_saving.lock().await;
        let next = self.journal.next_lsn();
        let image = self.changes.borrow().encode(next);
        self.resync_marked.set(false);
        let path = self.changes_path.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Off the core: a large volume's table is megabytes.
        std::thread::Builder::new()
            .name("changes-save".into())
            .spawn(move || {
                let _ = tx.send(changes::write_durably(&path, &image));
            })?;
        let res = rx
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the table writer ended")));
        match res {
            Ok(()) => {
                self.changes_saved.set(self.changes_saved.get().max(next));
                self.changes_saved_at.set(std::time::Instant::now());
                Ok(())
            }
            Err(e) => {
                self.resync_marked.set(true);
                Err(e)
            }
        }
    }

    /// Persists the table if a resync marked regions since the last save.
    pub(super) async fn save_resync_marks(&self) -> io::Result<()> {
        if self.resync_marked.get() {
            self.save_changes().await?;
        }
        Ok(())
    }

    /// How far the checkpoint may release the journal: never past what the
    /// persisted table holds (recovery rebuilds the rest from the journal).
    /// Saves the table first when it is due, under `pressure`, or stopping.
    pub(super) async fn changes_allow(&self, target: Lsn, pressure: bool) -> Lsn {
        if self.changes_saved.get() >= target {
            return target;
        }
        let due = pressure
            || self.stopping.get()
            || self.changes_saved_at.get().elapsed() >= SAVE_INTERVAL;
        if due {
            if let Err(e) = self.save_changes().await {
                tracing::error!(volume = %self.info.name, "saving the changed-block table failed: {e}; the journal keeps the records it lacks");
            }
        }
        target.min(self.changes_saved.get())
    }

    /// A full resync from a primary continues the journal at `start`: a
    /// table of another volume starts over, knowing nothing before it.
    /// Persisted at once, so recovery never finds it behind the journal.
    pub(super) async fn rebase_changes(&self, start: Lsn, uuid: [u8; 16]) -> io::Result<()> {
        {
            let mut t = self.changes.borrow_mut();
            if t.uuid() != uuid {
                tracing::warn!(volume = %self.info.name, "changed-block tracking starts over at LSN {start}: this node resyncs from a primary of another volume UUID");
                t.reset(uuid, start.last());
            }
        }
        // The journal may now start lower than before.
        self.changes_saved.set(Lsn(0));
        self.save_changes().await
    }
}

/// Changed-block tracking during start-up recovery: adopts the persisted
/// table (or starts one), marks every replayed record, and persists the
/// result before recovery moves the journal checkpoint past those records.
pub struct ReplayMarks {
    path: std::path::PathBuf,
    volume: String,
    table: Option<ChangeTable>,
    /// The next LSN after everything replayed so far.
    next: Lsn,
}

impl ReplayMarks {
    /// For the volume whose journal is at `journal`.
    pub fn new(journal: &std::path::Path, volume: &str) -> ReplayMarks {
        ReplayMarks {
            path: changes::table_path(journal),
            volume: volume.to_string(),
            table: None,
            next: Lsn(0),
        }
    }

    /// Replay starts at `sb`'s checkpoint.
    pub fn begin(&mut self, sb: &crate::journal::format::Superblock) {
        let from = sb.checkpoint_lsn;
        let loaded = changes::load(&self.path);
        let (table, _, why) = changes::adopt(loaded, sb.volume_uuid, sb.volume_size, from);
        if let Some(why) = why.filter(|_| from.0 > 1) {
            tracing::warn!(
                volume = %self.volume,
                "{why}: changed-block tracking starts over and knows only changes after LSN {}; the next incremental backup is a full one",
                from.last()
            );
        }
        self.table = Some(table);
        self.next = from;
    }

    /// Record `lsn` is replayed over `[offset, offset + len)`.
    pub fn record(&mut self, lsn: Lsn, offset: u64, len: u64) {
        if let Some(t) = &mut self.table {
            t.mark(offset, len, lsn);
        }
        self.next = self.next.max(lsn.next());
    }

    /// The record replayed last resized the volume to `size` bytes.
    pub fn resize(&mut self, size: u64) {
        let lsn = Lsn(self.next.0.saturating_sub(1));
        if let Some(t) = &mut self.table {
            t.resize(size, lsn);
        }
    }

    /// A range changed with no record (an in-place write under way at the
    /// crash): marked with the next LSN, after everything replayed.
    pub fn unrecorded(&mut self, offset: u64, len: u64) {
        let next = self.next;
        if let Some(t) = &mut self.table {
            t.mark(offset, len, next);
        }
    }

    /// Persists the table, complete up to everything replayed.
    pub fn save(&self) -> io::Result<()> {
        match &self.table {
            Some(t) => changes::write_durably(&self.path, &t.encode(self.next)),
            None => Ok(()),
        }
    }
}
