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

use crate::backend::{LockMode, Staged};
use crate::chunk::{encode_blob, Digest};
use crate::index::{chunk_count, valid_volume_name, BackupIndex};
use crate::pipeline::{ordered_map, worker_count, Window};
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

/// Bytes of new blobs a pipelined backup stores at once, whatever the chunk
/// size (8 chunks of 4 MiB, 512 of 64 KiB): the directory backend's two
/// filesystem syncs per batch then cost the same per byte at any chunk
/// size, and the memory held back stays bounded.
const BATCH_BYTES: usize = 32 << 20;
/// Most bytes of new chunks staged before they are published: one wait for
/// the disk per this many (two `syncfs` in a directory repository) instead
/// of one per batch, while the list of names waiting stays bounded (16,384
/// at 64 KiB chunks), and so does the data a publish waits for.
const PUBLISH_BYTES: usize = 1 << 30;
/// Bytes read ahead of the store: a batch being stored plus most of the
/// next one being read, hashed and compressed meanwhile.
const WINDOW_BYTES: usize = 48 << 20;
/// The fewest chunks read ahead, for chunks larger than the default.
const MIN_WINDOW: usize = 12;

/// The pipeline's window for chunks of `chunk_size` bytes: about
/// [`WINDOW_BYTES`], at least [`MIN_WINDOW`] chunks.
fn pipeline_window(chunk_size: u32) -> Window {
    Window((WINDOW_BYTES / chunk_size.max(1) as usize).max(MIN_WINDOW))
}
/// Most hashing and compressing threads, whatever the core count: past a
/// few, the source's read speed bounds a backup anyway.
const MAX_WORKERS: usize = 4;

/// One chunk on its way through the pipeline, as the producer hands it to
/// a worker.
enum Job {
    /// Taken from the base without reading: its entry.
    Reused(Option<Digest>),
    /// Read from the source: its plain data.
    Read(Vec<u8>),
    /// Reading it failed; the pipeline stops here.
    Failed(RepoError),
}

/// What a worker made of a chunk.
enum Handled {
    /// Taken from the base without reading.
    Reused(Option<Digest>),
    /// All zero: never stored. Carries the bytes read.
    Zero(u64),
    /// In the repository already for this backup (the base's). Carries the
    /// digest and the bytes read.
    Known(Digest, u64),
    /// To be stored: digest, encoded blob, bytes read.
    New(Digest, Vec<u8>, u64),
    /// Reading it failed.
    Failed(RepoError),
}

/// Hashes, classifies and (when new) encodes one chunk: the workers' part.
fn handle(job: Job, known: &HashSet<Digest>, compress: bool) -> Handled {
    match job {
        Job::Reused(entry) => Handled::Reused(entry),
        Job::Failed(e) => Handled::Failed(e),
        Job::Read(data) => {
            let len = data.len() as u64;
            if data.iter().all(|&b| b == 0) {
                return Handled::Zero(len);
            }
            let digest = Digest::of(&data);
            if known.contains(&digest) {
                Handled::Known(digest, len)
            } else {
                Handled::New(digest, encode_blob(&data, compress), len)
            }
        }
    }
}

/// Stores `blobs`: refreshes those already in the repository (under the
/// shared lock, so GC's sweep cannot delete one between the refresh and
/// the index) and stages the rest as one batch. The refreshed are durable
/// when it returns; the staged once published.
fn store_blobs(
    repo: &Repository,
    blobs: Vec<(Digest, Vec<u8>)>,
    stats: &mut BackupStats,
) -> Result<Staged, RepoError> {
    let backend = repo.backend();
    let blobs: Vec<(String, Vec<u8>)> = blobs.into_iter().map(|(d, b)| (d.key(), b)).collect();
    let found = {
        let _lock = backend.lock(LockMode::Shared)?;
        backend.touch_batch(&blobs)?
    };
    assert_eq!(found.len(), blobs.len(), "one answer per refreshed chunk");
    let mut puts = Vec::with_capacity(blobs.len());
    for (blob, found) in blobs.into_iter().zip(found) {
        if found {
            stats.chunks_deduplicated += 1;
        } else {
            puts.push(blob);
        }
    }
    let staged = backend.stage_batch(&puts)?;
    stats.chunks_new += puts.len() as u64;
    stats.bytes_stored += puts.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    Ok(staged)
}

/// The consumer end of a pipelined backup: collects handled chunks in
/// order and stages them a batch at a time, publishing what is staged
/// every [`PUBLISH_BYTES`] and at the end. A chunk's entry reaches the
/// writer's list only once it is published (durable), so the index can
/// never name a chunk that is not (see [`BackupWriter::finish`]); dropped
/// unpublished, the staged chunks are discarded.
struct Storer<'w> {
    repo: &'w Repository,
    chunks: &'w mut Vec<Option<Digest>>,
    stats: &'w mut BackupStats,
    /// Digests stored or refreshed by this run.
    stored: HashSet<Digest>,
    /// Entries since the last durable batch, in chunk order.
    entries: Vec<Option<Digest>>,
    /// The new blobs those entries need.
    blobs: Vec<(Digest, Vec<u8>)>,
    /// Their bytes.
    blob_bytes: usize,
    /// Chunks staged and not published yet.
    staged: Staged,
    /// The entries of the staged batches, in chunk order.
    staged_entries: Vec<Option<Digest>>,
    /// Bytes staged since the last publish.
    staged_bytes: usize,
}

impl<'w> Storer<'w> {
    fn new(
        repo: &'w Repository,
        chunks: &'w mut Vec<Option<Digest>>,
        stats: &'w mut BackupStats,
    ) -> Storer<'w> {
        Storer {
            repo,
            chunks,
            stats,
            stored: HashSet::new(),
            entries: Vec::new(),
            blobs: Vec::new(),
            blob_bytes: 0,
            staged: Staged::default(),
            staged_entries: Vec::new(),
            staged_bytes: 0,
        }
    }

    fn accept(&mut self, handled: Handled) -> Result<(), RepoError> {
        let entry = match handled {
            Handled::Failed(e) => return Err(e),
            Handled::Reused(entry) => {
                self.stats.chunks_reused += 1;
                entry
            }
            Handled::Zero(read) => {
                self.stats.bytes_read += read;
                self.stats.chunks_zero += 1;
                None
            }
            Handled::Known(digest, read) => {
                self.stats.bytes_read += read;
                self.stats.chunks_deduplicated += 1;
                Some(digest)
            }
            Handled::New(digest, blob, read) => {
                self.stats.bytes_read += read;
                if self.stored.insert(digest) {
                    self.blob_bytes += blob.len();
                    self.blobs.push((digest, blob));
                } else {
                    // The same data twice in this backup.
                    self.stats.chunks_deduplicated += 1;
                }
                Some(digest)
            }
        };
        self.entries.push(entry);
        if self.blob_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Stages the pending blobs; publishes once [`PUBLISH_BYTES`] wait.
    fn flush(&mut self) -> Result<(), RepoError> {
        self.staged_bytes += std::mem::take(&mut self.blob_bytes);
        let staged = store_blobs(self.repo, std::mem::take(&mut self.blobs), self.stats)?;
        self.staged.append(staged);
        self.staged_entries.append(&mut self.entries);
        if self.staged_bytes >= PUBLISH_BYTES {
            self.publish()?;
        }
        Ok(())
    }

    /// Stages what is pending and publishes every staged chunk; only then
    /// are their entries recorded.
    fn finish(&mut self) -> Result<(), RepoError> {
        self.flush()?;
        self.publish()
    }

    fn publish(&mut self) -> Result<(), RepoError> {
        self.staged_bytes = 0;
        self.repo
            .backend()
            .publish(std::mem::take(&mut self.staged))?;
        self.chunks.append(&mut self.staged_entries);
        Ok(())
    }
}

impl Drop for Storer<'_> {
    fn drop(&mut self) {
        // An error stopped the run: nothing will publish these.
        self.repo
            .backend()
            .discard(std::mem::take(&mut self.staged));
    }
}

/// The base's entry for chunk `i` when the chunk is outside every changed
/// range and covers the same bytes in the base.
fn unchanged_base_entry(
    base: Option<&(BackupId, BackupIndex)>,
    changed: Option<&Vec<Range<u64>>>,
    i: usize,
    range: &Range<u64>,
) -> Option<Option<Digest>> {
    let (_, base) = base?;
    let changed = changed?;
    let same_extent = i < base.chunks.len() && base.chunk_range(i) == *range;
    (same_extent && !overlaps(changed, range)).then(|| base.chunks[i])
}

/// Reads `range` of `source` into a fresh buffer.
fn read_range<R: Read + Seek>(source: &mut R, range: &Range<u64>) -> Result<Vec<u8>, RepoError> {
    let source_err = |source| RepoError::Source {
        range: range.clone(),
        source,
    };
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    source
        .seek(SeekFrom::Start(range.start))
        .map_err(source_err)?;
    source.read_exact(&mut buf).map_err(source_err)?;
    Ok(buf)
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

    /// Backs up `source` in one go: [`Repository::begin_backup`],
    /// [`BackupWriter::run`], then [`BackupWriter::finish`].
    pub fn backup<R: Read + Seek + Send>(
        &self,
        spec: BackupSpec,
        base: Option<&BackupId>,
        changed: Option<&[Range<u64>]>,
        source: &mut R,
    ) -> Result<BackupStats, RepoError> {
        let mut writer = self.begin_backup(spec, base, changed)?;
        writer.run(source)?;
        writer.finish()
    }
}

impl BackupWriter<'_> {
    /// The id the backup will have.
    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// The byte range of chunk `i`.
    fn chunk_range(&self, i: usize) -> Range<u64> {
        let chunk_size = u64::from(self.repo.config().chunk_size);
        i as u64 * chunk_size..((i as u64 + 1) * chunk_size).min(self.spec.size)
    }

    /// The byte ranges the remaining chunks will be read from, in the order
    /// they will be read: a source can read them ahead.
    pub fn ranges_to_read(&self) -> Vec<Range<u64>> {
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size) as usize;
        (self.chunks.len()..count)
            .map(|i| (i, self.chunk_range(i)))
            .filter(|(i, r)| {
                unchanged_base_entry(self.base.as_ref(), self.changed.as_ref(), *i, r).is_none()
            })
            .map(|(_, r)| r)
            .collect()
    }

    /// Handles every remaining chunk, overlapping the source's reads with
    /// hashing and compressing on worker threads and with storing batches
    /// of new chunks. Returns once every chunk is handled and durable; on an
    /// error, the chunks stored so far are durable but the backup cannot be
    /// finished.
    pub fn run<R: Read + Seek + Send>(&mut self, source: &mut R) -> Result<(), RepoError> {
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size) as usize;
        let ranges: Vec<Range<u64>> = (self.chunks.len()..count)
            .map(|i| self.chunk_range(i))
            .collect();
        let first = self.chunks.len();
        let (base, changed) = (self.base.as_ref(), self.changed.as_ref());
        let mut failed = false;
        let jobs = ranges.iter().enumerate().map_while(|(n, range)| {
            if failed {
                return None;
            }
            Some(
                match unchanged_base_entry(base, changed, first + n, range) {
                    Some(entry) => Job::Reused(entry),
                    None => read_range(source, range).map_or_else(
                        |e| {
                            failed = true;
                            Job::Failed(e)
                        },
                        Job::Read,
                    ),
                },
            )
        });
        let compress = self.repo.config().compress;
        let known = &self.known;
        let mut storer = Storer::new(self.repo, &mut self.chunks, &mut self.stats);
        let workers = worker_count(MAX_WORKERS);
        let work = |job| handle(job, known, compress);
        let window = pipeline_window(self.repo.config().chunk_size);
        ordered_map(jobs, workers, window, work, |h| storer.accept(h))?;
        storer.finish()?;
        let stored = std::mem::take(&mut storer.stored);
        self.known.extend(stored);
        Ok(())
    }

    /// Handles the next chunk: takes it from the base when unchanged, else
    /// reads it and stores it unless it is all zero or already stored.
    /// Returns false when every chunk has been handled. One chunk at a time,
    /// stored before it returns; [`BackupWriter::run`] overlaps the work.
    pub fn step<R: Read + Seek>(&mut self, source: &mut R) -> Result<bool, RepoError> {
        let i = self.chunks.len();
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size) as usize;
        if i == count {
            return Ok(false);
        }
        let range = self.chunk_range(i);
        let job = match unchanged_base_entry(self.base.as_ref(), self.changed.as_ref(), i, &range) {
            Some(entry) => Job::Reused(entry),
            None => Job::Read(read_range(source, &range)?),
        };
        let compress = self.repo.config().compress;
        let mut storer = Storer::new(self.repo, &mut self.chunks, &mut self.stats);
        storer.accept(handle(job, &self.known, compress))?;
        storer.finish()?;
        let stored = std::mem::take(&mut storer.stored);
        self.known.extend(stored);
        Ok(true)
    }

    /// Writes the index, now that every chunk it names is durable, and
    /// retires the writer record.
    pub fn finish(mut self) -> Result<BackupStats, RepoError> {
        let count = chunk_count(self.spec.size, self.repo.config().chunk_size);
        // A failed run leaves chunks unhandled (or not durable): never
        // write an index then.
        if self.chunks.len() as u64 != count {
            return Err(RepoError::Unfinished {
                volume: self.spec.volume_name.clone(),
                durable: self.chunks.len() as u64,
                count,
            });
        }
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

#[cfg(test)]
mod durability_tests {
    use super::*;
    use crate::backend::DirBackend;
    use crate::repo::RepoConfig;
    use std::fs::File;
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    const CHUNK: u32 = 4 << 10;

    fn spec(size: u64) -> BackupSpec {
        BackupSpec {
            volume_uuid: [1; 16],
            volume_name: "vol0".into(),
            size,
            lsn: 1,
        }
    }

    /// Distinct, incompressible non-zero data: every chunk is new, and its
    /// blob as large as the chunk (so batches fill as on a real volume).
    fn data(chunks: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..chunks * CHUNK as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 255) as u8 + 1
            })
            .collect()
    }

    /// A 4 KiB-chunk repository whose filesystem syncs fail from call
    /// `fail_from` on (1-based; 0 never) and log whether an index existed.
    fn repo(root: &std::path::Path, fail_from: usize) -> (Repository, Arc<Mutex<Vec<bool>>>) {
        let log: Arc<Mutex<Vec<bool>>> = Arc::default();
        let (seen, dir) = (Arc::clone(&log), root.to_path_buf());
        let sync = Arc::new(move |fd: &File| {
            let mut seen = seen.lock().unwrap();
            seen.push(dir.join("indexes").exists());
            if fail_from != 0 && seen.len() >= fail_from {
                return Err(std::io::Error::other("injected sync failure"));
            }
            nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(fd)).map_err(Into::into)
        });
        let backend = DirBackend::new(root).unwrap().with_fs_sync(sync);
        let config = RepoConfig {
            chunk_size: CHUNK,
            ..RepoConfig::default()
        };
        (Repository::create(Box::new(backend), config).unwrap(), log)
    }

    #[test]
    fn the_batches_of_a_backup_share_one_publish_before_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, log) = repo(dir.path(), 0);
        // A batch and a quarter of new chunks.
        let chunks = BATCH_BYTES * 5 / 4 / CHUNK as usize;
        let source = data(chunks);
        let stats = repo
            .backup(
                spec(source.len() as u64),
                None,
                None,
                &mut Cursor::new(source),
            )
            .unwrap();
        assert_eq!(stats.chunks_new as usize, chunks);
        assert_eq!(
            *log.lock().unwrap(),
            vec![false, false],
            "the data sync and the name sync, both before the index"
        );
        assert_eq!(repo.backups().unwrap().len(), 1);
    }

    #[test]
    fn a_run_that_fails_after_staging_leaves_no_chunk_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, log) = repo(dir.path(), 0);
        let chunks = BATCH_BYTES * 5 / 4 / CHUNK as usize;
        let source = data(chunks);
        let mut writer = repo
            .begin_backup(spec(source.len() as u64 + 8192), None, None)
            .unwrap();
        // The source ends early: reading its last chunk fails.
        assert!(writer.run(&mut Cursor::new(source)).is_err());
        drop(writer);
        assert!(log.lock().unwrap().is_empty(), "nothing was published");
        let left = repo.backend().list(".chunks").unwrap();
        assert!(left.is_empty(), "{} files left", left.len());
    }

    #[test]
    fn a_failed_batch_sync_leaves_no_index() {
        // The data sync (call 1) and the name sync (call 2) each fail once.
        for fail_from in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (repo, _) = repo(dir.path(), fail_from);
            let source = data(10);
            let mut writer = repo
                .begin_backup(spec(source.len() as u64), None, None)
                .unwrap();
            assert!(writer.run(&mut Cursor::new(source)).is_err());
            assert!(
                matches!(
                    writer.finish(),
                    Err(RepoError::Unfinished { durable: 0, .. })
                ),
                "sync {fail_from} failed"
            );
            assert!(repo.backups().unwrap().is_empty(), "an index was written");
        }
    }
}
