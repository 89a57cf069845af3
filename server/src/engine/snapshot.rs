//! Point-in-time snapshots: the volume exactly as of one LSN, readable
//! while writes go on, by copy-on-write in the applier.
//!
//! A snapshot starting at LSN `from` holds every record below `from` and
//! none at or after it. It is created in one step on the core (no record
//! can be reserved in between), then waits until every record below `from`
//! is applied: from then on the data store holds the snapshot's content
//! except where a record at or after `from` has been applied since. The
//! applier applies records in LSN order, and before it applies a batch of
//! records at or after `from` (a batch never straddles `from`), it copies
//! every 64 KiB region those records will overwrite that is not kept yet
//! to the snapshot's side file (`JOURNAL.snap-NAME`): that is the region's
//! content as of `from`. A snapshot read takes each region from the side
//! file when it is kept there, else from the store.
//!
//! The race between a snapshot read and the applier: a region is marked
//! `Saving` before the copy starts, and the store is overwritten only after
//! it is `Saved`; a reader checks each region's mark after its store read
//! completes, and rereads from the side file any region marked meanwhile.
//!
//! Large writes that would go to the store in place (bypassing the
//! applier) are journaled instead while a snapshot is after them; a shrink
//! below a snapshot's size, a replica's resync (which writes regions
//! directly) and a full side file (its `space` bound) break the snapshot:
//! its reads fail with EIO from then on, the writes go on.
//!
//! Snapshots survive restarts: the side file describes itself (header and
//! map, see [`super::snapshot_file`]), the applier makes a region's kept
//! data and its map entry durable before the store is overwritten there,
//! and start-up loads every side file before the journal replay, which
//! keeps regions for them the same way.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::buffer::PoolBuf;
use nbd::ErrorCode;
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;

use super::snapshot_file::{self, Entry, Header, Loaded, State};
use super::{nbd_error, Engine, EngineError, ReadData};
use crate::buffer::{AlignedBuf, MAX_CHUNK};
use crate::journal::{MutationOp, Record};
use crate::units::{align_down, align_up, Lsn};

/// The copy-on-write granularity: a region is kept aside whole, the first
/// time a record after the snapshot touches it (the changed-block
/// tracking's region size too).
pub const REGION: u64 = super::changes::REGION;

/// The bound on a snapshot's side file when none is given.
pub const DEFAULT_SPACE: u64 = 1 << 30;

/// Most snapshots of one volume at once (each costs a copy per first
/// overwrite of a region).
pub const MAX_SNAPSHOTS: usize = 16;

/// Longest snapshot name.
pub const NAME_MAX: usize = 64;

/// Most regions copied to a side file in one read and one write.
const MAX_RUN: u64 = MAX_CHUNK as u64 / REGION;

/// How long creating a snapshot waits for the records before it to be
/// applied.
const CREATE_WAIT: Duration = Duration::from_secs(20);

/// How long a snapshot read waits for a region the applier is keeping.
const SAVE_WAIT: Duration = Duration::from_secs(10);

/// Most map entries reserved up front (the map grows past it if needed).
const PREALLOCATED_REGIONS: u64 = 1 << 14;

/// Why a snapshot could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The name is not usable in an export name and a file name.
    #[error("snapshot name '{0}' is not 1 to {NAME_MAX} characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// The name is taken.
    #[error(
        "volume '{volume}' already has a snapshot '{name}'; delete it first or choose another name"
    )]
    Exists {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
    /// No such snapshot.
    #[error("volume '{volume}' has no snapshot '{name}'; `mirrorblk snapshot list` lists them")]
    Unknown {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
    /// The volume has [`MAX_SNAPSHOTS`].
    #[error("volume '{0}' has {MAX_SNAPSHOTS} snapshots already (the most); delete one first")]
    TooMany(String),
    /// The space bound cannot hold even one region.
    #[error("snapshot space {0} bytes is below one region ({REGION} bytes)")]
    TooSmall(u64),
    /// The volume cannot take a snapshot now.
    #[error("volume '{volume}' cannot take a snapshot now: {why}")]
    NotNow {
        /// The volume.
        volume: String,
        /// Why.
        why: &'static str,
    },
    /// The side file could not be created.
    #[error("cannot create the snapshot's side file {}: {source}", path.display())]
    SideFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The records before the snapshot were not applied in time.
    #[error("the records before the snapshot were not applied in time: {0}")]
    NotApplied(EngineError),
}

/// Where a region of a snapshot stands in its side file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Being copied to this slot; the store still has it unchanged.
    Saving(u64),
    /// Kept in this slot; the store may hold newer data.
    Saved(u64),
}

/// One snapshot of a volume.
pub struct Snapshot {
    volume: String,
    name: String,
    /// The first LSN not in the snapshot.
    from: Lsn,
    /// The volume's size at `from`.
    size: u64,
    /// Bound on the side file, in bytes.
    space: u64,
    created_ms: u64,
    path: PathBuf,
    /// The side file; gone once the snapshot broke or was deleted (a read
    /// under way keeps its own handle).
    file: RefCell<Option<Rc<tokio_uring::fs::File>>>,
    /// The same file for blocking header writes (a break must be durable
    /// before the write that causes it goes on).
    blocking: RefCell<Option<std::fs::File>>,
    /// Its header as last written (None: none was valid at start-up).
    header: RefCell<Option<Header>>,
    /// The map block holding the next slot's entry, as on disk.
    tail: RefCell<Vec<u8>>,
    /// Region index → where it is kept.
    regions: RefCell<HashMap<u64, Held>>,
    /// Slots used in the side file (one region each).
    slots: Cell<u64>,
    broken: RefCell<Option<String>>,
    /// Woken when a region is saved, or the snapshot breaks.
    changed: Notify,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The last LSN it includes (0: none).
    pub lsn: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The bound on its side file.
    pub space: u64,
    /// Bytes kept in its side file.
    pub used: u64,
    /// Why it broke, if it did.
    pub broken: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

impl Snapshot {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The first LSN not in it.
    pub fn start(&self) -> Lsn {
        self.from
    }

    /// Why it broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.broken.borrow().clone()
    }

    /// How it is listed.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            name: self.name.clone(),
            lsn: self.from.last(),
            size: self.size,
            space: self.space,
            used: self.slots.get() * REGION,
            broken: self.broken(),
            created_ms: self.created_ms,
        }
    }

    fn held(&self, region: u64) -> Option<Held> {
        self.regions.borrow().get(&region).copied()
    }

    fn side_file(&self) -> Option<Rc<tokio_uring::fs::File>> {
        self.file.borrow().clone()
    }
}

/// What the applier must do for a snapshot before applying a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: the record is in the snapshot, or touches nothing of it.
    Nothing,
    /// Keep regions `[first, end)` (indices) aside first.
    Regions(u64, u64),
    /// The record destroys what the snapshot needs and cannot be kept:
    /// break the snapshot.
    Break(&'static str),
}

/// The regions `[first, end)` that bytes `[offset, offset + len)` touch
/// within the first `size` bytes; None when none.
pub fn regions_of(offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return None;
    }
    Some((offset / REGION, end.div_ceil(REGION)))
}

/// The decision for one record (`lsn`, `op` over `[offset, offset + len)`,
/// a resize's new size in `offset`; `in_place`: its payload is already in
/// the store) and a snapshot starting at `from` of `size` bytes.
pub fn before_apply(
    (from, size): (Lsn, u64),
    lsn: Lsn,
    op: MutationOp,
    (offset, len): (u64, u64),
    in_place: bool,
) -> Keep {
    if lsn < from {
        return Keep::Nothing;
    }
    let touched = regions_of(offset, len, size);
    match op {
        MutationOp::Resize if offset < size => {
            Keep::Break("the volume shrank below the snapshot's size")
        }
        MutationOp::Resize => Keep::Nothing,
        MutationOp::Write if in_place && touched.is_some() => {
            Keep::Break("a write went to the data store in place, past the applier")
        }
        MutationOp::Write | MutationOp::Trim | MutationOp::WriteZeroes => {
            touched.map_or(Keep::Nothing, |(a, b)| Keep::Regions(a, b))
        }
    }
}

/// How many of a batch's records (their LSNs, in order) the applier takes
/// at once: never records on both sides of a snapshot's start, so the
/// regions of the records at or after it are kept while the store holds
/// every record before it.
pub fn cut_at_starts(
    lsns: impl Iterator<Item = Lsn>,
    starts: impl Iterator<Item = Lsn> + Clone,
) -> usize {
    let mut first = None;
    let mut n = 0;
    for lsn in lsns {
        let f = *first.get_or_insert(lsn);
        if starts.clone().any(|s| f < s && s <= lsn) {
            break;
        }
        n += 1;
    }
    n
}

/// The next run of regions not kept yet in `[pos, end)`: consecutive, at
/// most `max` long; None when every region is kept.
pub fn next_run(pos: u64, end: u64, kept: impl Fn(u64) -> bool, max: u64) -> Option<(u64, u64)> {
    assert!(max > 0);
    let a = (pos..end).find(|&r| !kept(r))?;
    let b = (a..end.min(a + max))
        .find(|&r| kept(r))
        .unwrap_or(end.min(a + max));
    Some((a, b))
}

/// Whether `more` regions still fit a side file holding `used` regions
/// under the bound of `space` bytes.
pub fn fits(used: u64, more: u64, space: u64) -> bool {
    used.checked_add(more)
        .and_then(|n| n.checked_mul(REGION))
        .is_some_and(|bytes| bytes <= space)
}

/// Whether `name` is a valid snapshot name.
pub fn valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The side file of snapshot `name` of the volume whose journal is `journal`.
pub fn side_path(journal: &Path, name: &str) -> PathBuf {
    let mut p = journal.as_os_str().to_os_string();
    p.push(".snap-");
    p.push(name);
    PathBuf::from(p)
}

/// Creates (empty) a side file with its header, durably (the file and its
/// folder entry), and opens it, `O_DIRECT` where the filesystem allows it:
/// the handle for the applier's copies and a blocking one for header
/// rewrites. Blocking: the caller must not await between choosing the
/// header's start LSN and installing the snapshot.
fn create_side_file(
    path: &Path,
    header: &Header,
) -> io::Result<(tokio_uring::fs::File, std::fs::File)> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let (f, _direct) = crate::store::open_direct(path, false, 0)?;
    // Copy B stays zero (invalid) until the first rewrite.
    snapshot_file::write_header(&f, header)?;
    snapshot_file::sync_folder(path)?;
    let blocking = f.try_clone()?;
    Ok((tokio_uring::fs::File::from_std(f), blocking))
}

/// A value no other side file is likely to have: seeds its entry checks.
fn nonce(name: &str) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = t ^ u64::from(std::process::id()).rotate_left(32);
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

/// Opens a loaded side file for the engine (None: broken, or it cannot be
/// opened, then why).
fn open_loaded(l: &Loaded) -> Result<Option<(tokio_uring::fs::File, std::fs::File)>, String> {
    if l.broken.is_some() {
        return Ok(None);
    }
    let (f, _direct) = crate::store::open_direct(&l.path, false, 0)
        .map_err(|e| format!("its side file {} cannot be opened: {e}", l.path.display()))?;
    let blocking = f
        .try_clone()
        .map_err(|e| format!("its side file {} cannot be opened: {e}", l.path.display()))?;
    Ok(Some((tokio_uring::fs::File::from_std(f), blocking)))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Snapshot {
    /// A snapshot loaded from its side file at start-up; broken (with the
    /// reason) when it cannot be trusted or opened.
    fn from_loaded(volume: &str, l: Loaded) -> Snapshot {
        let files = open_loaded(&l);
        let h = l.header.clone();
        let (from, size, space, created_ms) = h
            .as_ref()
            .map_or((0, 0, 0, 0), |h| (h.from, h.size, h.space, h.created_ms));
        let (file, blocking, broken) = match files {
            Ok(Some((f, b))) => (Some(Rc::new(f)), Some(b), None),
            Ok(None) => (None, None, l.broken.clone()),
            Err(why) => (None, None, Some(why)),
        };
        let kept = match &broken {
            None => l.map.iter().map(|(&r, &s)| (r, Held::Saved(s))).collect(),
            Some(_) => HashMap::new(),
        };
        Snapshot {
            volume: volume.to_string(),
            name: l.name.clone(),
            from: Lsn(from),
            size,
            space,
            created_ms,
            path: l.path.clone(),
            file: RefCell::new(file),
            blocking: RefCell::new(blocking),
            header: RefCell::new(h),
            tail: RefCell::new(l.tail.clone()),
            slots: Cell::new(if broken.is_none() { l.used } else { 0 }),
            regions: RefCell::new(kept),
            broken: RefCell::new(broken),
            changed: Notify::new(),
        }
    }
}

impl Engine {
    /// Installs the snapshots loaded at start-up (before any record is
    /// applied); the broken ones are reported as such.
    pub(super) fn install_loaded(&self, loaded: Vec<Loaded>) {
        for l in loaded {
            let snap = Rc::new(Snapshot::from_loaded(&self.info.name, l));
            self.metrics.snapshots.increment(1.0);
            self.metrics
                .snapshot_space_used
                .increment((snap.slots.get() * REGION) as f64);
            if let Some(why) = snap.broken() {
                self.metrics.snapshot_broken.increment(1);
                crate::events::emit(crate::events::EventKind::SnapshotBroken {
                    volume: self.info.name.clone(),
                    name: snap.name.clone(),
                    reason: why,
                });
            } else {
                tracing::info!(volume = %self.info.name, "snapshot '{}' as of LSN {} kept across the restart ({} regions kept)", snap.name, snap.from.last(), snap.slots.get());
            }
            self.snapshots.borrow_mut().push(snap);
        }
    }

    /// The snapshot `name`, if it exists.
    pub fn snapshot(&self, name: &str) -> Option<Rc<Snapshot>> {
        self.snapshots
            .borrow()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Every snapshot, oldest first.
    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        self.snapshots.borrow().iter().map(|s| s.info()).collect()
    }

    /// Whether a snapshot needs the records from `lsn` on to pass the
    /// applier (so a large write must not go to the store in place).
    pub(super) fn snapshot_after(&self, lsn: Lsn) -> bool {
        self.snapshots
            .borrow()
            .iter()
            .any(|s| s.from <= lsn && s.broken.borrow().is_none())
    }

    /// Takes a snapshot of the volume as of now (every record reserved so
    /// far), bounded to `space` bytes of kept data; returns once it can be
    /// read.
    pub async fn create_snapshot(
        &self,
        name: &str,
        space: u64,
    ) -> Result<Rc<Snapshot>, SnapshotError> {
        self.check_new_snapshot(name, space)?;
        let path = side_path(&self.info.journal, name);
        let size = self.size();
        let expected = (size.div_ceil(REGION))
            .min(space / REGION)
            .min(PREALLOCATED_REGIONS);
        // No await between reading the next LSN and installing the
        // snapshot: every record reserved after it is kept aside for it.
        // The header is durable (blocking) before any copy can start.
        let header = Header {
            generation: 0,
            volume_uuid: self.journal.volume_uuid(),
            name: name.to_string(),
            from: self.journal.next_lsn().0,
            size,
            space,
            created_ms: now_ms(),
            nonce: nonce(name),
            sealed: 0,
            state: State::Ok,
        };
        let (file, blocking) =
            create_side_file(&path, &header).map_err(|source| SnapshotError::SideFile {
                path: path.clone(),
                source,
            })?;
        let snap = Rc::new(Snapshot {
            volume: self.info.name.clone(),
            name: name.to_string(),
            from: Lsn(header.from),
            size,
            space,
            created_ms: header.created_ms,
            path,
            file: RefCell::new(Some(Rc::new(file))),
            blocking: RefCell::new(Some(blocking)),
            header: RefCell::new(Some(header)),
            tail: RefCell::new(vec![0u8; snapshot_file::HEADER_LEN]),
            regions: RefCell::new(HashMap::with_capacity(expected as usize)),
            slots: Cell::new(0),
            broken: RefCell::new(None),
            changed: Notify::new(),
        });
        self.snapshots.borrow_mut().push(snap.clone());
        self.metrics.snapshots.increment(1.0);
        if let Err(e) = self.wait_applied(snap.from, CREATE_WAIT).await {
            self.remove_snapshot(&snap, "its creation failed");
            return Err(SnapshotError::NotApplied(e));
        }
        tracing::info!(volume = %self.info.name, "snapshot '{name}' created as of LSN {} ({size} bytes, space {space})", snap.from.last());
        crate::events::emit(crate::events::EventKind::SnapshotCreated {
            volume: self.info.name.clone(),
            name: name.to_string(),
            lsn: snap.from.last(),
            space,
        });
        Ok(snap)
    }

    fn check_new_snapshot(&self, name: &str, space: u64) -> Result<(), SnapshotError> {
        let volume = || self.info.name.clone();
        if !valid_name(name) {
            return Err(SnapshotError::BadName(name.to_string()));
        }
        if space < REGION {
            return Err(SnapshotError::TooSmall(space));
        }
        let why = if self.stopping.get() {
            Some("it is stopping")
        } else if self.journal.failed().is_some() {
            Some("its journal failed")
        } else if self.journal.inconsistent() {
            Some("its store is inconsistent until a resync finishes")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(SnapshotError::NotNow {
                volume: volume(),
                why,
            });
        }
        let snaps = self.snapshots.borrow();
        if snaps.iter().any(|s| s.name == name) {
            return Err(SnapshotError::Exists {
                volume: volume(),
                name: name.to_string(),
            });
        }
        if snaps.len() >= MAX_SNAPSHOTS {
            return Err(SnapshotError::TooMany(volume()));
        }
        Ok(())
    }

    /// Deletes snapshot `name`: its export's reads fail from now on and its
    /// side file is removed. Answers how it was just before.
    pub fn delete_snapshot(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let Some(snap) = self.snapshot(name) else {
            return Err(SnapshotError::Unknown {
                volume: self.info.name.clone(),
                name: name.to_string(),
            });
        };
        let info = snap.info();
        self.remove_snapshot(&snap, "it was deleted");
        tracing::info!(volume = %self.info.name, "snapshot '{name}' deleted");
        crate::events::emit(crate::events::EventKind::SnapshotDeleted {
            volume: self.info.name.clone(),
            name: name.to_string(),
        });
        Ok(info)
    }

    /// Removes `snap` and its side file. Its header says deleted (durably)
    /// before the file goes, so a crash in between cannot bring it back
    /// readable after writes it no longer kept regions for.
    fn remove_snapshot(&self, snap: &Rc<Snapshot>, why: &str) {
        self.snapshots.borrow_mut().retain(|s| !Rc::ptr_eq(s, snap));
        self.metrics.snapshots.decrement(1.0);
        if snap.broken.borrow().is_none() {
            *snap.broken.borrow_mut() = Some(why.to_string());
        }
        self.persist_state(snap, State::Deleted);
        self.release_side_file(snap);
        let removed =
            std::fs::remove_file(&snap.path).and_then(|()| snapshot_file::sync_folder(&snap.path));
        if let Err(e) = removed {
            tracing::warn!(volume = %self.info.name, "cannot remove snapshot side file {}: {e}", snap.path.display());
        }
    }

    /// Rewrites `snap`'s header with `state` and makes it durable
    /// (blocking: it must hold before the write that broke the snapshot
    /// goes on); a broken snapshot's map and kept data are cut off. Once:
    /// the blocking handle goes with it.
    fn persist_state(&self, snap: &Snapshot, state: State) {
        let Some(f) = snap.blocking.borrow_mut().take() else {
            return;
        };
        let mut header = snap.header.borrow_mut();
        let Some(h) = header.as_mut() else {
            return;
        };
        h.generation += 1;
        let cut = matches!(state, State::Broken(_));
        h.state = state;
        let res = snapshot_file::write_header(&f, h).and_then(|()| match cut {
            true => f.set_len(snapshot_file::MAP_START),
            false => Ok(()),
        });
        if let Err(e) = res {
            tracing::error!(volume = %self.info.name, "cannot record the state of snapshot '{}' in {}: {e}", snap.name, snap.path.display());
        }
    }

    /// Drops the side file (a read under way keeps its handle until done)
    /// and its kept regions; wakes the readers waiting on a region.
    fn release_side_file(&self, snap: &Snapshot) {
        if snap.file.borrow_mut().take().is_some() {
            self.metrics
                .snapshot_space_used
                .decrement((snap.slots.get() * REGION) as f64);
        }
        // Nothing is kept any more (a copy under way finds the mark gone).
        snap.slots.set(0);
        snap.regions.borrow_mut().clear();
        snap.changed.notify_waiters();
    }

    /// Breaks `snap` (once): its reads fail with EIO from now on; the
    /// writes go on. Its side file says so before this returns.
    pub(super) fn break_snapshot(&self, snap: &Snapshot, why: String) {
        if snap.broken.borrow().is_some() {
            return;
        }
        tracing::error!(
            volume = %self.info.name,
            "snapshot '{}' is broken: {why}; reads of export {}@{} fail with EIO from now on (writes go on); delete it and take a new one",
            snap.name, snap.volume, snap.name
        );
        *snap.broken.borrow_mut() = Some(why.clone());
        self.metrics.snapshot_broken.increment(1);
        self.persist_state(snap, State::Broken(why.clone()));
        self.release_side_file(snap);
        crate::events::emit(crate::events::EventKind::SnapshotBroken {
            volume: self.info.name.clone(),
            name: snap.name.clone(),
            reason: why,
        });
    }

    /// Breaks every snapshot (a resync writes regions directly).
    pub(super) fn break_snapshots(&self, why: &str) {
        let all: Vec<Rc<Snapshot>> = self.snapshots.borrow().clone();
        for s in all {
            self.break_snapshot(&s, why.to_string());
        }
    }

    /// Before a batch is applied: for every snapshot the batch is after,
    /// keeps aside the regions its records will overwrite, durably (the
    /// crash rule: a region's old data and map entry are synced before the
    /// store can be overwritten there).
    pub(super) async fn keep_for_snapshots(&self, batch: &[Rc<Record>]) {
        if self.snapshots.borrow().is_empty() {
            return;
        }
        let snaps: Vec<Rc<Snapshot>> = self.snapshots.borrow().clone();
        for snap in &snaps {
            let mut runs = Vec::new();
            for r in batch {
                if snap.broken.borrow().is_some() {
                    break;
                }
                let op = r.op;
                let keep = before_apply(
                    (snap.from, snap.size),
                    r.lsn,
                    op,
                    (r.offset, r.length),
                    r.in_place(),
                );
                match keep {
                    Keep::Nothing => {}
                    Keep::Break(why) => self.break_snapshot(snap, format!("{why} (LSN {})", r.lsn)),
                    Keep::Regions(a, b) => self.keep_regions(snap, (a, b), r.lsn, &mut runs).await,
                }
            }
            self.seal_runs(snap, &runs).await;
        }
    }

    /// Makes the runs just copied durable, then marks them kept.
    async fn seal_runs(&self, snap: &Snapshot, runs: &[(u64, u64, u64)]) {
        if runs.is_empty() || snap.broken.borrow().is_some() {
            return;
        }
        let Some(file) = snap.side_file() else {
            return;
        };
        if let Err(e) = file.sync_data().await {
            return self.break_snapshot(snap, format!("syncing its side file failed: {e}"));
        }
        if snap.broken.borrow().is_some() {
            return;
        }
        let mut map = snap.regions.borrow_mut();
        for &(a, b, used) in runs {
            for r in a..b {
                map.insert(r, Held::Saved(used + (r - a)));
            }
        }
        drop(map);
        snap.changed.notify_waiters();
    }

    /// Copies the regions of `[first, end)` not kept yet to the side file
    /// (for record `lsn`), with their map entries; notes each run copied
    /// (first, end, first slot) in `runs`, not yet durable.
    async fn keep_regions(
        &self,
        snap: &Snapshot,
        (first, end): (u64, u64),
        lsn: Lsn,
        runs: &mut Vec<(u64, u64, u64)>,
    ) {
        let mut pos = first;
        while let Some((a, b)) = next_run(pos, end, |r| snap.held(r).is_some(), MAX_RUN) {
            pos = b;
            let used = snap.slots.get();
            if !fits(used, b - a, snap.space) {
                let why = format!(
                    "its space bound of {} bytes is reached ({} bytes of old data kept)",
                    snap.space,
                    used * REGION
                );
                return self.break_snapshot(snap, why);
            }
            snap.slots.set(used + (b - a));
            // Counted with the slots, so a release takes back exactly this.
            self.metrics
                .snapshot_space_used
                .increment(((b - a) * REGION) as f64);
            {
                let mut map = snap.regions.borrow_mut();
                for r in a..b {
                    map.insert(r, Held::Saving(used + (r - a)));
                }
            }
            if let Err(e) = self.copy_to_side(snap, (a, b), used, lsn).await {
                return self.break_snapshot(snap, format!("keeping old data failed: {e}"));
            }
            if snap.broken.borrow().is_some() {
                return;
            }
            runs.push((a, b, used));
        }
    }

    /// Copies regions `[a, b)` of the store (clipped to the snapshot's
    /// size) into the side file from slot `slot` on, then their map
    /// entries (not synced).
    async fn copy_to_side(
        &self,
        snap: &Snapshot,
        (a, b): (u64, u64),
        slot: u64,
        lsn: Lsn,
    ) -> io::Result<()> {
        assert!(b > a && b - a <= MAX_RUN);
        let Some(file) = snap.side_file() else {
            return Err(io::Error::other("the side file is gone"));
        };
        let start = a * REGION;
        let n = ((b * REGION).min(snap.size) - start) as usize;
        let buf = self
            .scratch
            .borrow_mut()
            .take()
            .unwrap_or_else(|| AlignedBuf::new(MAX_CHUNK));
        let (mut res, mut buf) = self.store.read_into(buf, start, n).await;
        let mut entries = Vec::new();
        if res.is_ok() {
            entries = buf.as_slice()[..n]
                .chunks(REGION as usize)
                .zip(a..b)
                .map(|(data, region)| Entry {
                    region,
                    lsn: lsn.0,
                    data_hash: xxhash_rust::xxh3::xxh3_64(data),
                })
                .collect();
            let at = snapshot_file::slot_offset(snap.space, snap.size, slot);
            let (r, slice) = file.write_all_at(buf.slice(0..n), at).await;
            res = r;
            buf = slice.into_inner();
        }
        *self.scratch.borrow_mut() = Some(buf);
        res?;
        self.write_entries(snap, &file, slot, &entries).await
    }

    /// Writes the map entries of slots `[slot, slot + entries.len())`.
    async fn write_entries(
        &self,
        snap: &Snapshot,
        file: &tokio_uring::fs::File,
        slot: u64,
        entries: &[Entry],
    ) -> io::Result<()> {
        let nonce = match snap.header.borrow().as_ref() {
            Some(h) => h.nonce,
            None => return Err(io::Error::other("the side file has no header")),
        };
        let (pos, bytes, tail) =
            snapshot_file::map_write(&snap.tail.borrow(), slot, entries, nonce);
        let mut buf = AlignedBuf::new(bytes.len());
        buf.as_mut_slice().copy_from_slice(&bytes);
        // The next run's entries start from this tail (runs are sequential:
        // one applier).
        *snap.tail.borrow_mut() = tail;
        let (res, _) = file.write_all_at(buf.slice(0..bytes.len()), pos).await;
        res
    }

    /// Before the journal checkpoint moves: records in each snapshot's
    /// header that its map entries so far are durable (they were synced
    /// before their regions were overwritten), so a start-up finding one
    /// damaged breaks the snapshot instead of taking it for a torn batch.
    /// A snapshot whose header cannot be written breaks (the checkpoint,
    /// and the writes, go on).
    pub(super) async fn seal_snapshots(&self) {
        let snaps: Vec<Rc<Snapshot>> = self.snapshots.borrow().clone();
        for snap in snaps {
            if let Err(e) = self.seal(&snap).await {
                self.break_snapshot(&snap, format!("sealing its side file failed: {e}"));
            }
        }
    }

    async fn seal(&self, snap: &Snapshot) -> io::Result<()> {
        let Some(file) = snap.side_file() else {
            return Ok(());
        };
        let slots = snap.slots.get();
        let header = {
            let mut h = snap.header.borrow_mut();
            match h.as_mut() {
                Some(h) if h.sealed < slots && snap.broken.borrow().is_none() => {
                    h.generation += 1;
                    h.sealed = slots;
                    h.clone()
                }
                _ => return Ok(()),
            }
        };
        let mut buf = AlignedBuf::new(snapshot_file::HEADER_LEN);
        header.encode(buf.as_mut_slice());
        let (res, _) = file
            .write_all_at(buf.slice(0..snapshot_file::HEADER_LEN), header.offset())
            .await;
        res?;
        file.sync_data().await
    }

    /// Reads `[offset, offset + len)` of snapshot `snap`.
    pub async fn read_snapshot(
        &self,
        snap: &Snapshot,
        offset: u64,
        len: u64,
    ) -> Result<ReadData, ErrorCode> {
        let mut parts = Vec::new();
        if len == 0 {
            return Ok(ReadData { parts });
        }
        if offset.checked_add(len).is_none_or(|end| end > snap.size) {
            return Err(ErrorCode::Inval);
        }
        self.snapshot_readable(snap)?;
        let pieces = super::read::pieces(offset, offset + len);
        let bufs = self.piece_buffers(&pieces).await;
        let reads = pieces
            .into_iter()
            .zip(bufs)
            .map(|((p0, p1), buf)| self.read_snapshot_piece(snap, p0, p1, buf));
        for r in futures_util::future::join_all(reads).await {
            parts.push(r?);
        }
        // Broken while reading: what was read may mix in newer data.
        self.snapshot_readable(snap)?;
        Ok(ReadData { parts })
    }

    fn snapshot_readable(&self, snap: &Snapshot) -> Result<(), ErrorCode> {
        match snap.broken() {
            Some(why) => {
                tracing::debug!(volume = %self.info.name, "read of broken snapshot '{}' refused: {why}", snap.name);
                Err(ErrorCode::Io)
            }
            None => Ok(()),
        }
    }

    async fn read_snapshot_piece(
        &self,
        snap: &Snapshot,
        p0: u64,
        p1: u64,
        buf: PoolBuf,
    ) -> Result<(PoolBuf, usize, usize), ErrorCode> {
        // A snapshot is read once, by a backup: past the page cache.
        let read_store = |buf: PoolBuf, at: u64, n: usize| self.store.read_direct(buf, at, n);
        self.snapshot_piece_via(snap, (p0, p1), buf, read_store)
            .await
    }

    /// [`Engine::read_snapshot_piece`] with the data store read by
    /// `read_store(buf, offset, len)`: a parameter so that a test can hold
    /// the read while the applier keeps and overwrites a region, the
    /// interleaving the order below exists for.
    pub(super) async fn snapshot_piece_via<R, F>(
        &self,
        snap: &Snapshot,
        (p0, p1): (u64, u64),
        buf: PoolBuf,
        read_store: R,
    ) -> Result<(PoolBuf, usize, usize), ErrorCode>
    where
        R: FnOnce(PoolBuf, u64, usize) -> F,
        F: std::future::Future<Output = (io::Result<()>, PoolBuf)>,
    {
        let (a0, a1) = (align_down(p0), align_up(p1));
        let (res, mut buf) = read_store(buf, a0, (a1 - a0) as usize).await;
        res.map_err(|e| {
            tracing::error!(volume = %self.info.name, "snapshot read of the data store at {a0} failed: {e}");
            nbd_error(&e)
        })?;
        // Checked after the store read completed: a region not marked now
        // was not being overwritten while it was read (a region is marked
        // before its copy starts, and the store is overwritten only once
        // it is saved).
        for r in a0 / REGION..a1.div_ceil(REGION) {
            let Some(slot) = self.wait_saved(snap, r).await? else {
                continue;
            };
            let (x0, x1) = (a0.max(r * REGION), a1.min((r + 1) * REGION));
            let file = snap.side_file().ok_or(ErrorCode::Io)?;
            let dst = buf.slice((x0 - a0) as usize..(x1 - a0) as usize);
            let (res, slice) = file
                .read_exact_at(
                    dst,
                    snapshot_file::slot_offset(snap.space, snap.size, slot) + (x0 - r * REGION),
                )
                .await;
            buf = slice.into_inner();
            res.map_err(|e| {
                tracing::error!(volume = %self.info.name, "read of snapshot '{}' side file failed: {e}", snap.name);
                nbd_error(&e)
            })?;
        }
        Ok((buf, (p0 - a0) as usize, (p1 - a0) as usize))
    }

    /// Where region `r` is kept (None: not kept, the store has it as of the
    /// snapshot); waits while it is being kept.
    async fn wait_saved(&self, snap: &Snapshot, r: u64) -> Result<Option<u64>, ErrorCode> {
        let deadline = tokio::time::Instant::now() + SAVE_WAIT;
        loop {
            let changed = snap.changed.notified();
            self.snapshot_readable(snap)?;
            match snap.held(r) {
                None => return Ok(None),
                Some(Held::Saved(slot)) => return Ok(Some(slot)),
                Some(Held::Saving(_)) => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::error!(volume = %self.info.name, "snapshot '{}': region {r} not kept within {SAVE_WAIT:?}", snap.name);
                return Err(ErrorCode::Io);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = REGION;

    #[test]
    fn regions_cover_the_touched_bytes_within_the_size() {
        assert_eq!(regions_of(0, 1, 10 * R), Some((0, 1)));
        assert_eq!(regions_of(R - 1, 2, 10 * R), Some((0, 2)));
        assert_eq!(regions_of(R, R, 10 * R), Some((1, 2)));
        assert_eq!(regions_of(3 * R + 5, 4 * R, 10 * R), Some((3, 8)));
        // Clipped to the snapshot's size; past it nothing.
        assert_eq!(regions_of(9 * R, 4 * R, 10 * R), Some((9, 10)));
        assert_eq!(regions_of(10 * R, R, 10 * R), None);
        assert_eq!(regions_of(5, 0, 10 * R), None);
        // A size that ends inside a region still has that region.
        assert_eq!(regions_of(R, 10 * R, R + 4096), Some((1, 2)));
    }

    #[test]
    fn records_at_or_after_the_start_keep_their_regions() {
        let snap = (Lsn(10), 8 * R);
        let w = MutationOp::Write;
        assert_eq!(before_apply(snap, Lsn(9), w, (0, R), false), Keep::Nothing);
        assert_eq!(
            before_apply(snap, Lsn(10), w, (0, R), false),
            Keep::Regions(0, 1)
        );
        assert_eq!(
            before_apply(snap, Lsn(11), MutationOp::Trim, (R, 2 * R), false),
            Keep::Regions(1, 3)
        );
        assert_eq!(
            before_apply(
                snap,
                Lsn(11),
                MutationOp::WriteZeroes,
                (7 * R, 4 * R),
                false
            ),
            Keep::Regions(7, 8)
        );
        // Past the snapshot's end (after a grow): nothing to keep.
        assert_eq!(
            before_apply(snap, Lsn(12), w, (8 * R, R), false),
            Keep::Nothing
        );
        // In place: its data is already home, nothing can be kept.
        assert!(matches!(
            before_apply(snap, Lsn(12), w, (0, R), true),
            Keep::Break(_)
        ));
        assert_eq!(before_apply(snap, Lsn(9), w, (0, R), true), Keep::Nothing);
        // A shrink below the size breaks it; a grow or a shrink above it does not.
        let resize = MutationOp::Resize;
        assert!(matches!(
            before_apply(snap, Lsn(12), resize, (4 * R, 0), false),
            Keep::Break(_)
        ));
        assert_eq!(
            before_apply(snap, Lsn(12), resize, (8 * R, 0), false),
            Keep::Nothing
        );
        assert_eq!(
            before_apply(snap, Lsn(12), resize, (16 * R, 0), false),
            Keep::Nothing
        );
        assert_eq!(
            before_apply(snap, Lsn(9), resize, (R, 0), false),
            Keep::Nothing
        );
    }

    #[test]
    fn a_batch_never_straddles_a_snapshot_start() {
        let lsns = |a: u64, b: u64| (a..b).map(Lsn);
        assert_eq!(cut_at_starts(lsns(5, 15), [].into_iter()), 10);
        // Ends before the start...
        assert_eq!(cut_at_starts(lsns(5, 15), [Lsn(8)].into_iter()), 3);
        // ...and a batch beginning at it goes on.
        assert_eq!(cut_at_starts(lsns(8, 15), [Lsn(8)].into_iter()), 7);
        assert_eq!(cut_at_starts(lsns(9, 15), [Lsn(8)].into_iter()), 6);
        // The earliest start inside the batch wins.
        assert_eq!(cut_at_starts(lsns(5, 15), [Lsn(12), Lsn(7)].into_iter()), 2);
        assert_eq!(cut_at_starts(lsns(5, 5), [Lsn(7)].into_iter()), 0);
    }

    #[test]
    fn runs_are_the_regions_not_kept_and_bounded() {
        let kept = |r: u64| [2, 3, 7].contains(&r);
        assert_eq!(next_run(0, 10, kept, 16), Some((0, 2)));
        assert_eq!(next_run(2, 10, kept, 16), Some((4, 7)));
        assert_eq!(next_run(7, 10, kept, 16), Some((8, 10)));
        assert_eq!(next_run(10, 10, kept, 16), None);
        assert_eq!(next_run(2, 4, kept, 16), None);
        assert_eq!(next_run(0, 100, |_| false, 16), Some((0, 16)));
        assert_eq!(next_run(16, 20, |_| false, 16), Some((16, 20)));
    }

    #[test]
    fn the_space_bound_counts_whole_regions() {
        assert!(fits(0, 1, R));
        assert!(!fits(0, 2, R));
        assert!(fits(3, 1, 4 * R));
        assert!(!fits(4, 1, 4 * R));
        assert!(!fits(0, 1, R - 1));
        assert!(!fits(u64::MAX, 1, u64::MAX));
        assert!(fits(0, 0, 0));
    }

    #[test]
    fn names_fit_an_export_and_a_file_name() {
        for ok in ["b1", "nightly-2026.12.06_01", &"x".repeat(NAME_MAX)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a@b",
            "..\u{e9}",
            "a b",
            &"x".repeat(NAME_MAX + 1),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(
            side_path(Path::new("/d/vol0.journal"), "b1"),
            PathBuf::from("/d/vol0.journal.snap-b1")
        );
    }
}
