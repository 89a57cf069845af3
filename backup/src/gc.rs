//! Prune and garbage collection.
//!
//! Prune only deletes indexes. Garbage collection then removes the chunks no
//! index references, in PBS's two phases, safe while backups run:
//!
//! 1. **Cutoff and mark.** Note the time GC starts and the start of the
//!    oldest running writer (records under `writers/`; a record of a dead
//!    process on this host, or one older than [`GcOptions::writer_expiry`],
//!    is removed). The cutoff is the earlier of the two, less
//!    [`GcOptions::margin`] and the backend's clock slack. Then read every
//!    index and mark the chunks it names; an index that cannot be read stops
//!    GC (what it references is unknown).
//! 2. **Sweep**, under the exclusive repository lock: delete each unmarked
//!    chunk last modified before the cutoff, and temporary files as old.
//!
//! Why that is safe for a running writer: every chunk it stores or reuses
//! from the store is written or refreshed after it started, so after the
//! cutoff; the chunks it reuses from its base without reading are marked
//! through the base's index, and a writer whose base was pruned meanwhile
//! refuses to write its index ([`RepoError::BaseVanished`]).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::dir::TEMP_MARK;
use crate::backend::{LockMode, ObjectInfo};
use crate::chunk::Digest;
use crate::repo::{BackupId, RepoError, Repository, CHUNK_DIR, INDEX_DIR, WRITER_DIR};
use crate::writer::{host_name, WriterRecord};

/// Garbage collection's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Subtracted from the cutoff, for clocks that disagree (an S3 server's
    /// and this host's). Five minutes by default.
    pub margin: Duration,
    /// A writer record older than this is taken for a crashed writer on
    /// another host and removed. A day by default.
    pub writer_expiry: Duration,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            margin: Duration::from_secs(300),
            writer_expiry: Duration::from_secs(86_400),
        }
    }
}

/// What garbage collection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcStats {
    /// Indexes read in the mark phase.
    pub indexes: usize,
    /// Distinct chunks they reference.
    pub marked: usize,
    /// Running writers that held the cutoff back.
    pub live_writers: usize,
    /// Dead or expired writer records removed.
    pub stale_writers_removed: usize,
    /// Unmarked chunks deleted.
    pub chunks_removed: usize,
    /// Their stored bytes.
    pub bytes_removed: u64,
    /// Unmarked chunks kept because they are newer than the cutoff.
    pub chunks_kept_young: usize,
    /// Leftover temporary files deleted.
    pub temp_removed: usize,
    /// Chunks still stored after the sweep, and their bytes.
    pub chunks_remaining: usize,
    /// Bytes of the chunks still stored.
    pub bytes_remaining: u64,
    /// The sweep's cutoff.
    pub cutoff: SystemTime,
}

impl Repository {
    /// Deletes all but the newest `keep_last` backups of each volume (of
    /// `volume` only, when given). Returns the deleted ids; the chunks stay
    /// until [`Repository::gc`].
    pub fn prune(
        &self,
        volume: Option<&str>,
        keep_last: usize,
    ) -> Result<Vec<BackupId>, RepoError> {
        let mut by_volume: BTreeMap<String, Vec<BackupId>> = BTreeMap::new();
        for id in self.backups()? {
            if volume.is_none_or(|v| v == id.volume) {
                by_volume.entry(id.volume.clone()).or_default().push(id);
            }
        }
        let mut removed = Vec::new();
        for ids in by_volume.values() {
            // `backups` sorts by creation time, oldest first.
            let drop_count = ids.len().saturating_sub(keep_last);
            for id in &ids[..drop_count] {
                self.delete_backup(id)?;
                removed.push(id.clone());
            }
        }
        Ok(removed)
    }

    /// Removes the chunks no backup references; see the module docs for why
    /// this is safe while backups run.
    pub fn gc(&self, options: &GcOptions) -> Result<GcStats, RepoError> {
        let start = SystemTime::now();
        let (oldest_writer, live_writers, stale_writers_removed) =
            self.scan_writers(start, options)?;
        let slack = options.margin + self.backend().clock_slack();
        let cutoff = oldest_writer.map_or(start, |w| w.min(start));
        let cutoff = cutoff.checked_sub(slack).unwrap_or(UNIX_EPOCH);
        let (indexes, marked) = self.mark()?;
        let mut stats = GcStats {
            indexes,
            marked: marked.len(),
            live_writers,
            stale_writers_removed,
            chunks_removed: 0,
            bytes_removed: 0,
            chunks_kept_young: 0,
            temp_removed: 0,
            chunks_remaining: 0,
            bytes_remaining: 0,
            cutoff,
        };
        self.sweep(&marked, &mut stats)?;
        Ok(stats)
    }

    /// Reads the writer records: returns the oldest live writer's start, the
    /// number of live writers and of stale records removed.
    fn scan_writers(
        &self,
        now: SystemTime,
        options: &GcOptions,
    ) -> Result<(Option<SystemTime>, usize, usize), RepoError> {
        let expired_before = now.checked_sub(options.writer_expiry).unwrap_or(UNIX_EPOCH);
        let host = host_name();
        let (mut oldest, mut live, mut stale) = (None::<SystemTime>, 0, 0);
        for info in self.backend().list(WRITER_DIR)? {
            let record = self.backend().get(&info.key)?;
            let record: Option<WriterRecord> = record.and_then(|r| serde_json::from_slice(&r).ok());
            // An unreadable record still holds the cutoff back, from when it
            // was written.
            let started = record
                .as_ref()
                .map_or(info.modified, |r| {
                    UNIX_EPOCH + Duration::from_millis(r.started_ms)
                })
                .min(info.modified);
            let dead = record
                .as_ref()
                .is_some_and(|r| r.host == host && !process_alive(r.pid));
            if dead || started < expired_before || info.key.contains(TEMP_MARK) {
                self.backend().delete(&info.key)?;
                stale += 1;
                continue;
            }
            live += 1;
            oldest = Some(oldest.map_or(started, |o: SystemTime| o.min(started)));
        }
        Ok((oldest, live, stale))
    }

    /// Phase 1: every chunk any index references.
    fn mark(&self) -> Result<(usize, HashSet<Digest>), RepoError> {
        let ids = self.backups()?;
        let mut marked = HashSet::new();
        for id in &ids {
            let index = self
                .load_index(id)
                .map_err(|e| RepoError::GcUnsafe(format!("cannot mark the chunks of {id}: {e}")))?;
            marked.extend(index.chunks.iter().flatten().copied());
        }
        Ok((ids.len(), marked))
    }

    /// Phase 2: delete unmarked chunks and temporary files older than the
    /// cutoff, holding the exclusive lock so no writer refreshes a chunk
    /// between its stat here and its delete.
    fn sweep(&self, marked: &HashSet<Digest>, stats: &mut GcStats) -> Result<(), RepoError> {
        let backend = self.backend();
        let _lock = backend.lock(LockMode::Exclusive)?;
        for info in backend.list(CHUNK_DIR)? {
            let name = info.key.rsplit('/').next().unwrap_or_default();
            match Digest::from_hex(name) {
                Some(digest) if marked.contains(&digest) => keep(stats, &info),
                Some(_) if info.modified < stats.cutoff => {
                    backend.delete(&info.key)?;
                    stats.chunks_removed += 1;
                    stats.bytes_removed += info.size;
                }
                Some(_) => {
                    stats.chunks_kept_young += 1;
                    keep(stats, &info);
                }
                None => self.sweep_temp(&info, stats)?,
            }
        }
        for info in backend.list(INDEX_DIR)? {
            self.sweep_temp(&info, stats)?;
        }
        Ok(())
    }

    /// Deletes a leftover temporary file older than the cutoff.
    fn sweep_temp(&self, info: &ObjectInfo, stats: &mut GcStats) -> Result<(), RepoError> {
        if info.key.contains(TEMP_MARK) && info.modified < stats.cutoff {
            self.backend().delete(&info.key)?;
            stats.temp_removed += 1;
        }
        Ok(())
    }
}

fn keep(stats: &mut GcStats, info: &ObjectInfo) {
    stats.chunks_remaining += 1;
    stats.bytes_remaining += info.size;
}

/// Whether a process of this host is alive (a zombie counts as alive until
/// it is reaped, which errs on keeping chunks).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists, owned by someone else.
        Err(_) => true,
    }
}
