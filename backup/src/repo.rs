//! The repository: its config, its backups (one index each) and its chunks.
//!
//! Layout (on a directory or under an S3 prefix):
//!
//! ```text
//! mirrorblk-backup.json          config: format version, chunk size, compression
//! .chunks/PPPP/DIGEST            one blob per chunk (see chunk), PPPP = DIGEST[..4]
//! indexes/VOLUME/CREATED.fidx    one index per backup (see index), CREATED = ms, 20 digits
//! writers/STARTED-PID-SEQ.json   one record per running backup, for GC
//! ```

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::backend::{open_location, Backend, BackendError};
use crate::check::{ChunkProblem, DamagedRange};
use crate::chunk::{decode_blob, Digest};
use crate::index::{valid_chunk_size, valid_volume_name, BackupIndex, IndexError};
use crate::{
    CHUNK_SIZE_HEADROOM, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_INDEX_ENTRIES,
    PREFERRED_CHUNK_SIZE,
};

/// The directory of chunk blobs.
pub const CHUNK_DIR: &str = ".chunks";
/// The directory of indexes.
pub const INDEX_DIR: &str = "indexes";
/// The directory of running writers' records.
pub const WRITER_DIR: &str = "writers";
/// The config object.
pub const CONFIG_KEY: &str = "mirrorblk-backup.json";
/// The config format version.
const CONFIG_VERSION: u32 = 1;

/// A repository's settings, fixed when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// The config format version.
    pub version: u32,
    /// The chunk size of every backup in the repository.
    pub chunk_size: u32,
    /// Whether chunks are zstd-compressed.
    pub compress: bool,
}

impl Default for RepoConfig {
    fn default() -> RepoConfig {
        RepoConfig {
            version: CONFIG_VERSION,
            chunk_size: DEFAULT_CHUNK_SIZE,
            compress: true,
        }
    }
}

impl RepoConfig {
    /// The config for a repository created for a first volume of
    /// `volume_size` bytes: chunks of [`PREFERRED_CHUNK_SIZE`] (64 KiB),
    /// or the smallest power of two that still fits a volume
    /// [`CHUNK_SIZE_HEADROOM`] times as large in one index
    /// ([`MAX_INDEX_ENTRIES`] chunks): 64 KiB up to 64 GiB, 128 KiB up to
    /// 128 GiB, …, 4 MiB up to 4 TiB (pure).
    pub fn for_volume(volume_size: u64) -> RepoConfig {
        let least = volume_size
            .saturating_mul(CHUNK_SIZE_HEADROOM)
            .div_ceil(MAX_INDEX_ENTRIES);
        let chunk_size = least
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX)
            .clamp(PREFERRED_CHUNK_SIZE.into(), MAX_CHUNK_SIZE.into());
        RepoConfig {
            chunk_size: u32::try_from(chunk_size).expect("clamped to MAX_CHUNK_SIZE"),
            ..RepoConfig::default()
        }
    }

    /// Refuses a chunk size asked for that is not this repository's (none
    /// asked for always fits).
    pub fn check_chunk_size(&self, asked: Option<u32>) -> Result<(), RepoError> {
        match asked {
            Some(asked) if asked != self.chunk_size => Err(RepoError::ChunkSizeMismatch {
                existing: self.chunk_size,
                asked,
            }),
            _ => Ok(()),
        }
    }
}

/// Names one backup: the volume and the creation time in milliseconds,
/// written `VOLUME/CREATED_MS`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId {
    /// The volume's name.
    pub volume: String,
    /// Created, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl BackupId {
    /// The key of this backup's index.
    pub fn key(&self) -> String {
        format!("{INDEX_DIR}/{}/{:020}.fidx", self.volume, self.created_ms)
    }

    /// Parses an index key back into an id; `None` for anything else (a
    /// temporary file, a foreign object).
    pub fn from_key(key: &str) -> Option<BackupId> {
        let rest = key.strip_prefix(INDEX_DIR)?.strip_prefix('/')?;
        let (volume, file) = rest.split_once('/')?;
        let digits = file.strip_suffix(".fidx")?;
        if !valid_volume_name(volume)
            || digits.len() != 20
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Some(BackupId {
            volume: volume.to_owned(),
            created_ms: digits.parse().ok()?,
        })
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.created_ms)
    }
}

impl FromStr for BackupId {
    type Err = RepoError;

    fn from_str(text: &str) -> Result<BackupId, RepoError> {
        let invalid = || RepoError::InvalidId(text.to_owned());
        let (volume, created) = text.rsplit_once('/').ok_or_else(invalid)?;
        if !valid_volume_name(volume) {
            return Err(invalid());
        }
        let created_ms = created.parse().map_err(|_| invalid())?;
        Ok(BackupId {
            volume: volume.to_owned(),
            created_ms,
        })
    }
}

/// What went wrong in a repository operation, with the backup, chunk or byte
/// range it went wrong on.
#[derive(Debug, Error)]
pub enum RepoError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// No config object: not a repository.
    #[error("no repository here (no {CONFIG_KEY})")]
    NotARepository,
    /// Creating a repository where one exists.
    #[error("a repository exists here already")]
    AlreadyExists,
    /// The config object is malformed or out of bounds.
    #[error("repository config: {0}")]
    BadConfig(String),
    /// A chunk size no repository may have.
    #[error("chunk size {0} bytes: not a power of two from 4 KiB to 16 MiB")]
    InvalidChunkSize(u32),
    /// A chunk size asked for that is not the existing repository's (it is
    /// fixed when the repository is created).
    #[error("the repository's chunk size is {existing} bytes, fixed when it was created; {asked} bytes were asked for")]
    ChunkSizeMismatch {
        /// The repository's chunk size.
        existing: u32,
        /// The one asked for.
        asked: u32,
    },
    /// No backup with this id.
    #[error("no backup {0}")]
    NoSuchBackup(BackupId),
    /// A backup's index is malformed.
    #[error("backup {id}: index: {source}")]
    Index {
        /// The backup.
        id: BackupId,
        /// Why its index was refused.
        source: IndexError,
    },
    /// A text that is not a backup id.
    #[error("{0:?} is not a backup id (VOLUME/CREATED_MS)")]
    InvalidId(String),
    /// A backup request that cannot be carried out.
    #[error("backup of {volume}: {reason}")]
    BadSpec {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// A backup finished before every chunk was handled and durable (a
    /// step or run failed): no index was written.
    #[error("backup of {volume}: only {durable} of {count} chunks are handled and durable; no index written")]
    Unfinished {
        /// The volume.
        volume: String,
        /// Chunks handled and durable.
        durable: u64,
        /// Chunks the index would name.
        count: u64,
    },
    /// The base of an incremental backup does not fit the volume.
    #[error("base backup {base}: {reason}")]
    BaseMismatch {
        /// The base backup.
        base: BackupId,
        /// Why it cannot be the base.
        reason: String,
    },
    /// The base backup was pruned while the backup ran; the chunks it shared
    /// may be gone, so no index was written.
    #[error("base backup {0} was pruned while the backup ran; no index written, run it again")]
    BaseVanished(BackupId),
    /// Reading the source failed.
    #[error("reading the source at bytes {}..{}: {source}", range.start, range.end)]
    Source {
        /// The byte range being read.
        range: Range<u64>,
        /// The error.
        source: std::io::Error,
    },
    /// Writing the restore target failed.
    #[error("writing the target at bytes {}..{}: {source}", range.start, range.end)]
    Target {
        /// The byte range being written.
        range: Range<u64>,
        /// The error.
        source: std::io::Error,
    },
    /// Restore could not restore these ranges (every other range was
    /// written and checked); they were left untouched in the target.
    #[error("backup {id}: {} range(s) not restored: {}", ranges.len(), crate::check::describe(ranges))]
    Damaged {
        /// The backup.
        id: BackupId,
        /// The ranges not restored, in order.
        ranges: Vec<DamagedRange>,
    },
    /// Garbage collection refused to sweep.
    #[error("garbage collection refused to sweep: {0}")]
    GcUnsafe(String),
}

/// A backup repository on some [`Backend`].
#[derive(Debug)]
pub struct Repository {
    backend: Box<dyn Backend>,
    config: RepoConfig,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Repository {
    /// Creates a repository on an empty backend.
    pub fn create(backend: Box<dyn Backend>, config: RepoConfig) -> Result<Repository, RepoError> {
        if !valid_chunk_size(config.chunk_size) {
            return Err(RepoError::InvalidChunkSize(config.chunk_size));
        }
        if config.version != CONFIG_VERSION {
            return Err(RepoError::BadConfig(format!("{config:?} out of bounds")));
        }
        if backend.head(CONFIG_KEY)?.is_some() {
            return Err(RepoError::AlreadyExists);
        }
        let text = serde_json::to_vec_pretty(&config).expect("a plain struct serializes");
        backend.put(CONFIG_KEY, &text)?;
        Ok(Repository { backend, config })
    }

    /// Opens an existing repository.
    pub fn open(backend: Box<dyn Backend>) -> Result<Repository, RepoError> {
        let text = backend.get(CONFIG_KEY)?.ok_or(RepoError::NotARepository)?;
        let config: RepoConfig =
            serde_json::from_slice(&text).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        if config.version != CONFIG_VERSION || !valid_chunk_size(config.chunk_size) {
            return Err(RepoError::BadConfig(format!("{config:?} not supported")));
        }
        Ok(Repository { backend, config })
    }

    /// Opens the repository at a location: a directory or `s3://BUCKET/PREFIX`.
    pub fn open_location(location: &str) -> Result<Repository, RepoError> {
        Repository::open(open_location(location)?)
    }

    /// Opens the repository at `location`, or creates it there when there
    /// is none: with `chunk_size` when given, else as
    /// [`RepoConfig::for_volume`] picks for a first volume of `volume_size`
    /// bytes. A `chunk_size` that differs from an existing repository's is
    /// refused ([`RepoError::ChunkSizeMismatch`]): chunks only deduplicate
    /// within one size, so it is fixed at creation. Returns whether it was
    /// created.
    pub fn open_or_create(
        location: &str,
        chunk_size: Option<u32>,
        volume_size: u64,
    ) -> Result<(Repository, bool), RepoError> {
        if let Some(asked) = chunk_size.filter(|&c| !valid_chunk_size(c)) {
            return Err(RepoError::InvalidChunkSize(asked));
        }
        match Repository::open_location(location) {
            Ok(repo) => {
                repo.config().check_chunk_size(chunk_size)?;
                Ok((repo, false))
            }
            Err(RepoError::NotARepository) => {
                let mut config = RepoConfig::for_volume(volume_size);
                if let Some(asked) = chunk_size {
                    config.chunk_size = asked;
                }
                Ok((Repository::create(open_location(location)?, config)?, true))
            }
            Err(e) => Err(e),
        }
    }

    /// The repository's settings.
    pub fn config(&self) -> RepoConfig {
        self.config
    }

    /// The backend it lives on.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Every backup, ordered by volume then creation time.
    pub fn backups(&self) -> Result<Vec<BackupId>, RepoError> {
        let mut ids: Vec<BackupId> = self
            .backend
            .list(INDEX_DIR)?
            .iter()
            .filter_map(|info| BackupId::from_key(&info.key))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The newest backup of `volume`.
    pub fn latest(&self, volume: &str) -> Result<Option<BackupId>, RepoError> {
        Ok(self.backups()?.into_iter().rfind(|id| id.volume == volume))
    }

    /// Reads and decodes one backup's index.
    pub fn load_index(&self, id: &BackupId) -> Result<BackupIndex, RepoError> {
        let bytes = self
            .backend
            .get(&id.key())?
            .ok_or_else(|| RepoError::NoSuchBackup(id.clone()))?;
        let index = BackupIndex::decode(&bytes).map_err(|source| RepoError::Index {
            id: id.clone(),
            source,
        })?;
        if index.volume_name != id.volume || index.created_ms != id.created_ms {
            return Err(RepoError::BadConfig(format!(
                "index {} names {}/{}",
                id.key(),
                index.volume_name,
                index.created_ms
            )));
        }
        Ok(index)
    }

    /// Reads one chunk and checks it against its name.
    pub fn read_chunk(&self, digest: &Digest) -> Result<Vec<u8>, ChunkProblem> {
        match self.backend.get(&digest.key()) {
            Ok(Some(blob)) => decode_blob(digest, &blob).map_err(ChunkProblem::Corrupt),
            Ok(None) => Err(ChunkProblem::Missing),
            Err(e) => Err(ChunkProblem::Unreadable(e.to_string())),
        }
    }

    /// Deletes one backup's index; its chunks stay until garbage collection.
    pub fn delete_backup(&self, id: &BackupId) -> Result<(), RepoError> {
        Ok(self.backend.delete(&id.key())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_keys_and_text() {
        let id = BackupId {
            volume: "vol.a".into(),
            created_ms: 1234,
        };
        assert_eq!(id.key(), "indexes/vol.a/00000000000000001234.fidx");
        assert_eq!(BackupId::from_key(&id.key()), Some(id.clone()));
        assert_eq!(id.to_string().parse::<BackupId>().unwrap(), id);
        assert_eq!(
            BackupId::from_key("indexes/vol.a/00000000000000001234.fidx.tmp-1-0"),
            None
        );
        assert!("noslash".parse::<BackupId>().is_err());
    }

    #[test]
    fn a_chunk_size_is_chosen_at_creation_and_refused_if_it_differs_after() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("repo").to_string_lossy().into_owned();
        assert!(matches!(
            Repository::open_or_create(&at, Some(3 << 10), 0),
            Err(RepoError::InvalidChunkSize(3072))
        ));
        assert!(matches!(
            Repository::open_or_create(&at, Some(32 << 20), 0),
            Err(RepoError::InvalidChunkSize(_))
        ));
        assert!(
            Repository::open_location(&at).is_err(),
            "a refused size creates nothing"
        );
        let (repo, created) = Repository::open_or_create(&at, Some(64 << 10), 1 << 40).unwrap();
        assert!(created);
        assert_eq!(repo.config().chunk_size, 64 << 10);
        // The same size, or none, opens it as it is.
        for asked in [Some(64 << 10), None] {
            let (repo, created) = Repository::open_or_create(&at, asked, 1 << 40).unwrap();
            assert!(!created);
            assert_eq!(repo.config().chunk_size, 64 << 10);
        }
        match Repository::open_or_create(&at, Some(DEFAULT_CHUNK_SIZE), 0) {
            Err(RepoError::ChunkSizeMismatch { existing, asked }) => {
                assert_eq!((existing, asked), (64 << 10, DEFAULT_CHUNK_SIZE));
            }
            other => panic!("a different chunk size was not refused: {other:?}"),
        }
        let other = dir.path().join("other").to_string_lossy().into_owned();
        let (repo, _) = Repository::open_or_create(&other, None, 1 << 30).unwrap();
        assert_eq!(repo.config().chunk_size, PREFERRED_CHUNK_SIZE);
    }

    #[test]
    fn a_new_repository_gets_small_chunks_unless_its_first_volume_is_large() {
        const GIB: u64 = 1 << 30;
        let table = [
            (0, 64 << 10),
            (GIB, 64 << 10),
            (64 * GIB, 64 << 10),
            (64 * GIB + 1, 128 << 10),
            (100 * GIB, 128 << 10),
            (1024 * GIB, 1 << 20),
            (4096 * GIB, 4 << 20),
            (16384 * GIB, 16 << 20),
            (u64::MAX, 16 << 20),
        ];
        for (size, chunk) in table {
            let config = RepoConfig::for_volume(size);
            assert_eq!(config.chunk_size, chunk, "a volume of {size} bytes");
            if size <= 16384 * GIB {
                // The headroom holds: four such volumes fit one index.
                let entries = (size * CHUNK_SIZE_HEADROOM).div_ceil(chunk.into());
                assert!(entries <= MAX_INDEX_ENTRIES, "{size}");
            }
        }
    }
}
