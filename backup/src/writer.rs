//! Creating a backup: read the volume chunk by chunk (only the changed ones
//! when there is a base), store each new chunk, then write the index.
//!
//! The consistency rule: the index is written, atomically, only after every
//! chunk it names is durable (each chunk put returns only then). A backup
//! interrupted anywhere before leaves no index, only chunks no index
//! references, which garbage collection removes once the writer is gone.
//!
//! While it runs, a writer keeps a record under `writers/` so garbage
//! collection never sweeps a chunk it may use: GC only sweeps chunks last
//! modified before the oldest running writer started, and a writer that
//! reuses a chunk already in the store refreshes its time first.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::backend::LockMode;
use crate::chunk::{encode_blob, Digest};
use crate::index::{chunk_count, valid_volume_name, BackupIndex};
use crate::repo::{now_ms, BackupId, RepoError, Repository, WRITER_DIR};
use crate::MAX_INDEX_ENTRIES;

/// What is being backed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// The volume's UUID; an incremental backup's base must have the same.
    pub volume_uuid: [u8; 16],
    /// The volume's name.
    pub volume_name: String,
    /// The volume's size in bytes.
    pub size: u64,
    /// The snapshot LSN the source is read at.
    pub lsn: u64,
}

/// What a backup did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// The new backup.
    pub id: Option<BackupId>,
    /// Whether unchanged chunks were taken from a base backup.
    pub incremental: bool,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the repository for new chunks (blob sizes).
    pub bytes_stored: u64,
    /// Chunks stored for the first time.
    pub chunks_new: u64,
    /// Chunks read but found in the repository already (deduplicated).
    pub chunks_deduplicated: u64,
    /// Unchanged chunks taken from the base without reading.
    pub chunks_reused: u64,
    /// All-zero chunks (never stored).
    pub chunks_zero: u64,
}

/// The record a running writer keeps under `writers/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriterRecord {
    /// When the writer started, ms since the epoch: GC's sweep cutoff.
    pub started_ms: u64,
    /// The volume being backed up.
    pub volume: String,
    /// The writer's host, so GC on the same host can tell a dead writer.
    pub host: String,
    /// The writer's process.
    pub pid: u32,
}

/// Makes writer record keys unique within this process.
static WRITER_SEQ: AtomicU64 = AtomicU64::new(0);

/// This host's name, for writer records.
pub(crate) fn host_name() -> String {
    nix::unistd::gethostname().map_or_else(|_| String::new(), |h| h.to_string_lossy().into_owned())
}

/// A backup in progress. Call [`BackupWriter::step`] until it returns false,
/// then [`BackupWriter::finish`]; dropping it before leaves no index.
#[derive(Debug)]
pub struct BackupWriter<'r> {
    repo: &'r Repository,
    id: BackupId,
    spec: BackupSpec,
    base: Option<(BackupId, BackupIndex)>,
    /// Sorted, merged changed ranges; `None` reads everything.
    changed: Option<Vec<Range<u64>>>,
    /// Digests known to be in the repository for this backup's lifetime: the
    /// base's (protected by the base's index) and those stored by this writer.
    known: HashSet<Digest>,
    chunks: Vec<Option<Digest>>,
    record_key: String,
    stats: BackupStats,
    buf: Vec<u8>,
    finished: bool,
}

/// Sorts and merges ranges so overlap checks can binary-search.
fn normalize(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether `range` overlaps any of the sorted, merged `ranges`.
fn overlaps(ranges: &[Range<u64>], range: &Range<u64>) -> bool {
    let first = ranges.partition_point(|r| r.end <= range.start);
    ranges.get(first).is_some_and(|r| r.start < range.end)
}

impl Repository {
    /// Starts a backup of `spec`. With a `base` and `changed` ranges, chunks
    /// outside the ranges are taken from the base without reading (the
    /// backup is still full: its index names every chunk); without them,
    /// everything is read.
    pub fn begin_backup(
        &self,
        spec: BackupSpec,
        base: Option<&BackupId>,
        changed: Option<&[Range<u64>]>,
    ) -> Result<BackupWriter<'_>, RepoError> {
        let bad = |reason: String| RepoError::BadSpec {
            volume: spec.volume_name.clone(),
            reason,
        };
        if !valid_volume_name(&spec.volume_name) {
            return Err(bad("invalid volume name".into()));
        }
        let count = chunk_count(spec.size, self.config().chunk_size);
        if count > MAX_INDEX_ENTRIES {
            return Err(bad(format!(
                "{count} chunks exceed the bound of {MAX_INDEX_ENTRIES}"
            )));
        }
        let base = match base {
            Some(id) => Some((id.clone(), self.load_base(&spec, id)?)),
            None => None,
        };
        let mut created_ms = now_ms();
        if let Some(latest) = self.latest(&spec.volume_name)? {
            created_ms = created_ms.max(latest.created_ms + 1);
        }
        let id = BackupId {
            volume: spec.volume_name.clone(),
            created_ms,
        };
        let record_key = self.register_writer(&spec.volume_name)?;
        let known = base
            .iter()
            .flat_map(|(_, index)| index.chunks.iter().flatten().copied())
            .collect();
        Ok(BackupWriter {
            repo: self,
            id,
            changed: changed.filter(|_| base.is_some()).map(normalize),
            stats: BackupStats {
                incremental: base.is_some() && changed.is_some(),
                ..BackupStats::default()
            },
            spec,
            base,
            known,
            chunks: Vec::with_capacity(count as usize),
            record_key,
            buf: Vec::new(),
            finished: false,
        })
    }

    /// Loads a base index and checks that it belongs to the volume.
    fn load_base(&self, spec: &BackupSpec, id: &BackupId) -> Result<BackupIndex, RepoError> {
        let index = self.load_index(id)?;
        let mismatch = |reason: &str| RepoError::BaseMismatch {
            base: id.clone(),
            reason: reason.into(),
        };
        if index.volume_uuid != spec.volume_uuid {
            return Err(mismatch("another volume's UUID"));
        }
        if index.chunk_size != self.config().chunk_size {
            return Err(mismatch("another chunk size"));
        }
        if index.lsn > spec.lsn {
            return Err(mismatch("taken at a later LSN than this backup"));
        }
        Ok(index)
    }

    /// Writes this writer's record, before it touches any chunk.
    fn register_writer(&self, volume: &str) -> Result<String, RepoError> {
        let record = WriterRecord {
            started_ms: now_ms(),
            volume: volume.to_owned(),
            host: host_name(),
            pid: std::process::id(),
        };
        let seq = WRITER_SEQ.fetch_add(1, Ordering::Relaxed);
        let key = format!(
            "{WRITER_DIR}/{:020}-{}-{seq}.json",
            record.started_ms, record.pid
        );
        let text = serde_json::to_vec(&record).expect("a plain struct serializes");
        self.backend().put(&key, &text)?;
        Ok(key)
    }

    /// Backs up `source` in one go: [`Repository::begin_backup`], every
    /// [`BackupWriter::step`], then [`BackupWriter::finish`].
    pub fn backup<R: Read + Seek>(
        &self,
        spec: BackupSpec,
        base: Option<&BackupId>,
        changed: Option<&[Range<u64>]>,
        source: &mut R,
    ) -> Result<BackupStats, RepoError> {
        let mut writer = self.begin_backup(spec, base, changed)?;
        while writer.step(source)? {}
        writer.finish()
    }
}

impl BackupWriter<'_> {
    /// The id the backup will have.
    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// Handles the next chunk: takes it from the base when unchanged, else
    /// reads it and stores it unless it is all zero or already stored.
    /// Returns false when every chunk has been handled.
    pub fn step<R: Read + Seek>(&mut self, source: &mut R) -> Result<bool, RepoError> {
        let i = self.chunks.len();
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size) as usize;
        if i == count {
            return Ok(false);
        }
        let chunk_size = u64::from(self.repo.config().chunk_size);
        let range = i as u64 * chunk_size..((i as u64 + 1) * chunk_size).min(self.spec.size);
        if let Some(entry) = self.unchanged_base_entry(i, &range) {
            self.chunks.push(entry);
            self.stats.chunks_reused += 1;
            return Ok(true);
        }
        self.read(source, &range)?;
        let entry = if self.buf.iter().all(|&b| b == 0) {
            self.stats.chunks_zero += 1;
            None
        } else {
            let digest = Digest::of(&self.buf);
            if self.known.contains(&digest) {
                self.stats.chunks_deduplicated += 1;
            } else {
                self.store(digest)?;
            }
            Some(digest)
        };
        self.chunks.push(entry);
        Ok(true)
    }

    /// The base's entry for chunk `i` when the chunk is outside every changed
    /// range and covers the same bytes in the base.
    fn unchanged_base_entry(&self, i: usize, range: &Range<u64>) -> Option<Option<Digest>> {
        let (_, base) = self.base.as_ref()?;
        let changed = self.changed.as_ref()?;
        let same_extent = i < base.chunks.len() && base.chunk_range(i) == *range;
        (same_extent && !overlaps(changed, range)).then(|| base.chunks[i])
    }

    fn read<R: Read + Seek>(
        &mut self,
        source: &mut R,
        range: &Range<u64>,
    ) -> Result<(), RepoError> {
        let len = (range.end - range.start) as usize;
        self.buf.resize(len, 0);
        let source_err = |source| RepoError::Source {
            range: range.clone(),
            source,
        };
        source
            .seek(SeekFrom::Start(range.start))
            .map_err(source_err)?;
        source.read_exact(&mut self.buf).map_err(source_err)?;
        self.stats.bytes_read += len as u64;
        Ok(())
    }

    /// Stores the chunk in `buf` under `digest`. An existing copy is only
    /// refreshed (under the shared repository lock, so GC's sweep cannot
    /// delete it between the refresh and this backup's index).
    fn store(&mut self, digest: Digest) -> Result<(), RepoError> {
        let blob = encode_blob(&self.buf, self.repo.config().compress);
        let backend = self.repo.backend();
        let key = digest.key();
        let refreshed = {
            let _lock = backend.lock(LockMode::Shared)?;
            backend.touch(&key, &blob)?
        };
        if refreshed {
            self.stats.chunks_deduplicated += 1;
        } else {
            backend.put(&key, &blob)?;
            self.stats.chunks_new += 1;
            self.stats.bytes_stored += blob.len() as u64;
        }
        self.known.insert(digest);
        Ok(())
    }

    /// Writes the index, now that every chunk it names is durable, and
    /// retires the writer record.
    pub fn finish(mut self) -> Result<BackupStats, RepoError> {
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size) as usize;
        assert_eq!(
            self.chunks.len(),
            count,
            "finish before every chunk was handled"
        );
        let backend = self.repo.backend();
        if let Some((base_id, _)) = &self.base {
            // The base's chunks were protected by the base's index; if it was
            // pruned meanwhile, GC may have swept them.
            if backend.head(&base_id.key())?.is_none() {
                return Err(RepoError::BaseVanished(base_id.clone()));
            }
        }
        let index = BackupIndex {
            volume_uuid: self.spec.volume_uuid,
            volume_name: self.spec.volume_name.clone(),
            size: self.spec.size,
            chunk_size: self.repo.config().chunk_size,
            lsn: self.spec.lsn,
            created_ms: self.id.created_ms,
            chunks: std::mem::take(&mut self.chunks),
        };
        backend.put(&self.id.key(), &index.encode())?;
        self.finished = true;
        backend.delete(&self.record_key)?;
        self.stats.id = Some(self.id.clone());
        Ok(std::mem::take(&mut self.stats))
    }
}

impl Drop for BackupWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Interrupted: no index was written. Retire the record so GC can
            // sweep the chunks stored so far; if this fails, GC finds the
            // record stale later.
            let _ = self.repo.backend().delete(&self.record_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_merge_and_overlap() {
        let ranges = normalize(&[10..20, 0..5, 15..30, 40..40]);
        assert_eq!(ranges, vec![0..5, 10..30]);
        assert!(overlaps(&ranges, &(4..6)));
        assert!(!overlaps(&ranges, &(5..10)));
        assert!(overlaps(&ranges, &(29..100)));
        assert!(!overlaps(&ranges, &(30..100)));
    }
}
