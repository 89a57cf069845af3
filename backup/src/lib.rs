//! mirrorblk's backup repository: fixed-size chunks named by the SHA-256 of
//! their plain data, deduplicated across backups and volumes and optionally
//! zstd-compressed, plus one full index per backup. Every backup is logically
//! full (its index names every chunk of the volume) while only the changed
//! chunks are read and stored, so any backup can be pruned without breaking
//! another. The layout follows Proxmox Backup Server's fixed-size chunk store;
//! docs/BACKUP.md describes it, the index format and the rules that keep the
//! repository consistent.
//!
//! The layers, bottom up: [`backend`] (a directory or S3: put atomically, get,
//! list, delete), [`chunk`] (the blob format of one stored chunk), [`index`]
//! (the binary index of one backup), `pipeline` (the bounded ordered
//! parallel map backup and restore overlap their work with), [`repo`] (the repository: config,
//! backups, chunks), [`writer`] (creating a backup), [`check`] (verify and
//! restore), [`gc`] (prune and garbage collection).
//!
//! Everything is blocking; the S3 backend keeps its async runtime inside.

#![warn(missing_docs)]

pub mod backend;
pub mod check;
pub mod chunk;
pub mod gc;
pub mod index;
mod pipeline;
pub mod repo;
pub mod writer;

pub use backend::{Backend, BackendError, DirBackend};
pub use check::{ChunkProblem, DamagedBackup, DamagedRange, RestoreStats, VerifyReport};
pub use chunk::Digest;
pub use gc::{GcOptions, GcStats};
pub use index::{BackupIndex, IndexError};
pub use repo::{BackupId, RepoConfig, RepoError, Repository};
pub use writer::{BackupSpec, BackupStats, BackupWriter};

/// The chunk size of [`RepoConfig::default`]: 4 MiB, PBS's fixed-index
/// default. A repository records its chunk size when created (see
/// [`RepoConfig`]); every backup in it uses that size, which is what lets
/// chunks deduplicate. `mirrorblk backup create` creates repositories with
/// [`RepoConfig::for_volume`] instead (64 KiB for volumes up to 64 GiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;

/// The smallest chunk size [`RepoConfig::for_volume`] picks: 64 KiB, the
/// server's changed-block region, so an incremental reads and stores just
/// the regions that changed (docs/BACKUP.md, "Choosing the chunk size").
pub const PREFERRED_CHUNK_SIZE: u32 = 64 << 10;

/// How many times its first volume's size a repository created by
/// [`RepoConfig::for_volume`] can back up in one index, at least.
pub const CHUNK_SIZE_HEADROOM: u64 = 4;

/// The smallest chunk size a repository or an index may have.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;

/// The largest chunk size a repository or an index may have; also the bound on
/// a chunk's plain length when decoding a stored blob, so a corrupt length can
/// never make a decoder allocate more.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// The most chunks one index may name: 2^22 chunks, 16 TiB at the default
/// chunk size, an index of 128 MiB. A decoder refuses larger counts before it
/// allocates.
pub const MAX_INDEX_ENTRIES: u64 = 1 << 22;
