//! Verify and restore: both read every chunk a backup names and check it
//! against its SHA-256, and both name the exact byte ranges they found
//! damaged. Restore never writes data it could not check.

use std::collections::HashMap;
use std::fmt;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;

use thiserror::Error;

use crate::chunk::{BlobError, Digest};
use crate::index::BackupIndex;
use crate::pipeline::{ordered_map, worker_count, Window};
use crate::repo::{BackupId, RepoError, Repository};

/// Why one chunk could not be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChunkProblem {
    /// No chunk under its name.
    #[error("missing")]
    Missing,
    /// The stored blob fails its checks.
    #[error("corrupt: {0}")]
    Corrupt(BlobError),
    /// The backend failed to read it.
    #[error("unreadable: {0}")]
    Unreadable(String),
}

/// One chunk's byte range in a backup that is damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// The volume bytes the chunk covers.
    pub range: Range<u64>,
    /// The chunk.
    pub digest: Digest,
    /// What is wrong with it.
    pub problem: ChunkProblem,
}

impl fmt::Display for DamagedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bytes {}..{} (chunk {}): {}",
            self.range.start, self.range.end, self.digest, self.problem
        )
    }
}

/// Renders ranges for error messages.
pub(crate) fn describe(ranges: &[DamagedRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One damaged backup as verify found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedBackup {
    /// The backup.
    pub id: BackupId,
    /// Why its index could not be read, if it could not (then `ranges` is
    /// empty: nothing of it is known).
    pub index_error: Option<String>,
    /// Its damaged ranges, in order.
    pub ranges: Vec<DamagedRange>,
}

/// What verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Backups checked.
    pub backups_checked: usize,
    /// Distinct chunks read and hashed.
    pub chunks_checked: usize,
    /// The damaged backups; empty when everything is sound.
    pub damaged: Vec<DamagedBackup>,
}

/// What restore wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Bytes written to the target, zero chunks included.
    pub bytes_written: u64,
    /// Chunks read, checked and written.
    pub chunks_restored: u64,
    /// All-zero chunks written as zeros.
    pub chunks_zero: u64,
}

impl Repository {
    /// Checks that every chunk of backup `id` (or of every backup) is present
    /// and hashes to its name. Each distinct chunk is read once.
    pub fn verify(&self, id: Option<&BackupId>) -> Result<VerifyReport, RepoError> {
        let ids = match id {
            Some(id) => vec![id.clone()],
            None => self.backups()?,
        };
        let mut seen: HashMap<Digest, Option<ChunkProblem>> = HashMap::new();
        let mut report = VerifyReport::default();
        for id in ids {
            report.backups_checked += 1;
            let index = match self.load_index(&id) {
                Ok(index) => index,
                Err(RepoError::NoSuchBackup(id)) => return Err(RepoError::NoSuchBackup(id)),
                Err(e) => {
                    let index_error = Some(e.to_string());
                    report.damaged.push(DamagedBackup {
                        id,
                        index_error,
                        ranges: Vec::new(),
                    });
                    continue;
                }
            };
            let mut ranges = Vec::new();
            for (i, digest) in index.chunks.iter().enumerate() {
                let Some(digest) = digest else { continue };
                let problem = seen
                    .entry(*digest)
                    .or_insert_with(|| self.read_chunk(digest).err())
                    .clone();
                if let Some(problem) = problem {
                    ranges.push(DamagedRange {
                        range: index.chunk_range(i),
                        digest: *digest,
                        problem,
                    });
                }
            }
            if !ranges.is_empty() {
                report.damaged.push(DamagedBackup {
                    id,
                    index_error: None,
                    ranges,
                });
            }
        }
        report.chunks_checked = seen.len();
        Ok(report)
    }

    /// Restores backup `id` into `target` (at offset 0), checking every chunk
    /// against its name before writing it. A chunk that is missing or fails
    /// its checks is not written — its range is left untouched — and the
    /// call then fails with [`RepoError::Damaged`] naming every such range;
    /// all other ranges are restored. Never writes unchecked data.
    ///
    /// Chunks are fetched, checked and decompressed on worker threads, about
    /// 32 MiB (`RESTORE_WINDOW_BYTES`, at least 8 chunks) ahead, while this
    /// thread writes them in order.
    pub fn restore<W: Write + Seek>(
        &self,
        id: &BackupId,
        target: &mut W,
    ) -> Result<RestoreStats, RepoError> {
        let index = self.load_index(id)?;
        let zeros = vec![0u8; index.chunk_size as usize];
        let mut placed = Placed::default();
        let fetch = |(i, digest): (usize, Option<Digest>)| {
            let len = chunk_len(&index, i);
            let data = digest.map(|d| self.read_chunk(&d).and_then(|data| of_length(data, len)));
            (i, data)
        };
        let jobs = index.chunks.iter().copied().enumerate();
        let workers = restore_workers(index.chunk_size);
        let window = restore_window(index.chunk_size);
        ordered_map(jobs, workers, window, fetch, |(i, data)| {
            let range = index.chunk_range(i);
            match data {
                None => placed.write(target, range, &zeros[..chunk_len(&index, i)], true),
                Some(Ok(data)) => placed.write(target, range, &data, false),
                Some(Err(problem)) => {
                    let digest = index.chunks[i].expect("a fetched chunk has a digest");
                    placed.damaged.push(DamagedRange {
                        range,
                        digest,
                        problem,
                    });
                    Ok(())
                }
            }
        })?;
        target.flush().map_err(|source| RepoError::Target {
            range: 0..index.size,
            source,
        })?;
        if placed.damaged.is_empty() {
            Ok(placed.stats)
        } else {
            Err(RepoError::Damaged {
                id: id.clone(),
                ranges: placed.damaged,
            })
        }
    }
}

/// Bytes a restore fetches, checks and decompresses ahead of the target's
/// writes, whatever the chunk size: enough to cover a slow fetch.
const RESTORE_WINDOW_BYTES: usize = 32 << 20;
/// The fewest chunks fetched ahead, for chunks larger than the default.
const MIN_RESTORE_WINDOW: usize = 8;

/// The restore pipeline's window for chunks of `chunk_size` bytes.
fn restore_window(chunk_size: u32) -> Window {
    Window((RESTORE_WINDOW_BYTES / chunk_size.max(1) as usize).max(MIN_RESTORE_WINDOW))
}
/// Most fetching threads, whatever the core count.
const MAX_RESTORE_WORKERS: usize = 4;
/// Fetching threads for chunks under [`SMALL_CHUNK`]: fetching a small
/// chunk from a cold directory repository is a few dependent disk reads
/// (directory, inode, data) for little CPU, so more reads in flight than
/// cores pay.
const SMALL_CHUNK_RESTORE_WORKERS: usize = 8;
/// Chunks smaller than this are fetched on [`SMALL_CHUNK_RESTORE_WORKERS`].
const SMALL_CHUNK: u32 = 1 << 20;

/// How many threads fetch, check and decompress chunks of `chunk_size`.
fn restore_workers(chunk_size: u32) -> usize {
    if chunk_size < SMALL_CHUNK {
        SMALL_CHUNK_RESTORE_WORKERS
    } else {
        worker_count(MAX_RESTORE_WORKERS)
    }
}

/// What a restore has written and what it could not.
#[derive(Default)]
struct Placed {
    stats: RestoreStats,
    damaged: Vec<DamagedRange>,
}

impl Placed {
    /// Writes one checked chunk (or zeros) at its range.
    fn write<W: Write + Seek>(
        &mut self,
        target: &mut W,
        range: Range<u64>,
        data: &[u8],
        zero: bool,
    ) -> Result<(), RepoError> {
        write_at(target, &range, data)?;
        if zero {
            self.stats.chunks_zero += 1;
        } else {
            self.stats.chunks_restored += 1;
        }
        self.stats.bytes_written += data.len() as u64;
        Ok(())
    }
}

/// The length of chunk `i` of `index`.
fn chunk_len(index: &BackupIndex, i: usize) -> usize {
    let range = index.chunk_range(i);
    (range.end - range.start) as usize
}

/// Checks that a chunk's data fills exactly the range the index gives it.
fn of_length(data: Vec<u8>, len: usize) -> Result<Vec<u8>, ChunkProblem> {
    if data.len() == len {
        Ok(data)
    } else {
        Err(ChunkProblem::Corrupt(BlobError::LengthMismatch {
            expected: len as u32,
            got: data.len(),
        }))
    }
}

fn write_at<W: Write + Seek>(
    target: &mut W,
    range: &Range<u64>,
    data: &[u8],
) -> Result<(), RepoError> {
    let target_err = |source| RepoError::Target {
        range: range.clone(),
        source,
    };
    target
        .seek(SeekFrom::Start(range.start))
        .map_err(target_err)?;
    target.write_all(data).map_err(target_err)
}
