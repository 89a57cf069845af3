//! Verify and restore: both read every chunk a backup names and check it
//! against its SHA-256, and both name the exact byte ranges they found
//! damaged. Restore never writes data it could not check.

use std::collections::HashMap;
use std::fmt;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;

use thiserror::Error;

use crate::chunk::{BlobError, Digest};
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
    pub fn restore<W: Write + Seek>(
        &self,
        id: &BackupId,
        target: &mut W,
    ) -> Result<RestoreStats, RepoError> {
        let index = self.load_index(id)?;
        let zeros = vec![0u8; index.chunk_size as usize];
        let mut stats = RestoreStats::default();
        let mut damaged = Vec::new();
        for (i, digest) in index.chunks.iter().enumerate() {
            let range = index.chunk_range(i);
            let len = (range.end - range.start) as usize;
            match digest {
                None => {
                    write_at(target, &range, &zeros[..len])?;
                    stats.chunks_zero += 1;
                }
                Some(digest) => match self
                    .read_chunk(digest)
                    .and_then(|data| of_length(data, len))
                {
                    Ok(data) => {
                        write_at(target, &range, &data)?;
                        stats.chunks_restored += 1;
                    }
                    Err(problem) => {
                        damaged.push(DamagedRange {
                            range,
                            digest: *digest,
                            problem,
                        });
                        continue;
                    }
                },
            }
            stats.bytes_written += len as u64;
        }
        target.flush().map_err(|source| RepoError::Target {
            range: 0..index.size,
            source,
        })?;
        if damaged.is_empty() {
            Ok(stats)
        } else {
            Err(RepoError::Damaged {
                id: id.clone(),
                ranges: damaged,
            })
        }
    }
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
