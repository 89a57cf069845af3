//! Where a repository's objects live: one small trait, [`Backend`], with a
//! directory ([`DirBackend`]) and an S3 bucket ([`S3Backend`]) behind it.
//!
//! Keys are relative, `/`-separated paths (`.chunks/ab12/ab12…`,
//! `indexes/vol0/…`). The contract every backend keeps: [`Backend::put`]
//! returns only once the object is durable and whole under its key — a crash
//! or a full disk mid-put leaves the old state or nothing under that key,
//! never part of an object.

pub(crate) mod dir;
#[cfg(feature = "s3")]
mod s3;

use std::path::PathBuf;
use std::time::SystemTime;

use thiserror::Error;

pub use dir::{DirBackend, SyncLevel, SYNC_LEVEL_ENV};
#[cfg(feature = "s3")]
pub use s3::{S3Backend, S3Config};

/// One stored object as a listing or a stat reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written or touched: the clock garbage collection
    /// compares against its cutoff.
    pub modified: SystemTime,
}

/// How a repository-wide lock is taken (see [`Backend::lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Writers refreshing a chunk they reuse; many at once.
    Shared,
    /// Garbage collection's sweep; alone.
    Exclusive,
}

/// A held repository lock; released on drop.
#[derive(Debug)]
pub struct RepoLock {
    _flock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl RepoLock {
    /// A lock that excludes nothing, for backends with no locking.
    pub fn none() -> RepoLock {
        RepoLock { _flock: None }
    }
}

/// Objects [`Backend::stage_batch`] wrote but did not store yet: none is
/// under its key until [`Backend::publish`] stores them all. What each
/// waits as is the backend's own business (the directory backend: a
/// temporary file beside its key's path).
#[derive(Debug, Default)]
#[must_use = "staged objects are stored only once published"]
pub struct Staged {
    /// (temporary path, final path) of each object waiting.
    pub(crate) waiting: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    /// Adds `other`'s waiting objects to these.
    pub fn append(&mut self, mut other: Staged) {
        self.waiting.append(&mut other.waiting);
    }

    /// How many objects wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// A backend failure, with the key it happened on.
#[derive(Debug, Error)]
pub enum BackendError {
    /// A filesystem call failed.
    #[error("{op} {key}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The key (or path) it was done on.
        key: String,
        /// The error.
        source: std::io::Error,
    },
    /// The object store failed.
    #[error("{op} {key}: {message}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The key.
        key: String,
        /// The store's error, rendered.
        message: String,
    },
    /// A key that is not a clean relative path.
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    /// A repository location that cannot be opened.
    #[error("invalid repository location {location:?}: {reason}")]
    InvalidLocation {
        /// The location given.
        location: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The storage a repository lives on. Minimal on purpose: everything else
/// (chunks, indexes, writer records, GC) is built on these calls.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, replacing what was there, atomically and
    /// durably: when this returns, the whole object survives a crash.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), BackendError>;
    /// Stores several objects as [`Backend::put`] stores one: when this
    /// returns `Ok`, every one of them is whole and durable. On an error,
    /// any of them may or may not be stored (each whole or not at all). A
    /// backend overrides this when it can overlap the puts (the directory
    /// backend syncs the files in parallel and each directory once).
    fn put_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<(), BackendError> {
        objects
            .iter()
            .try_for_each(|(key, data)| self.put(key, data))
    }
    /// Writes a batch that [`Backend::publish`] stores later, with every
    /// other batch staged meanwhile, so their durability costs one wait
    /// instead of one per batch. Until published, no staged object is under
    /// its key (a crash leaves at most data GC removes). A backend with
    /// nothing to gain stores the batch now, as [`Backend::put_batch`]
    /// does, and stages nothing: the default.
    fn stage_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<Staged, BackendError> {
        self.put_batch(objects).map(|()| Staged::default())
    }
    /// Stores staged objects: when this returns `Ok`, every one is whole and
    /// durable under its key. On an error none is reported stored (each may
    /// or may not be, whole or not at all), and nothing staged is left
    /// behind.
    fn publish(&self, staged: Staged) -> Result<(), BackendError> {
        assert!(staged.is_empty(), "this backend stages nothing");
        Ok(())
    }
    /// Removes staged objects that will not be published (an interrupted
    /// backup); best effort, as GC removes any left.
    fn discard(&self, staged: Staged) {
        assert!(staged.is_empty(), "this backend stages nothing");
    }
    /// Reads an object; `None` when there is none under `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError>;
    /// Stats an object; `None` when there is none under `key`.
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError>;
    /// Lists every object under the directory-like `prefix`, recursively,
    /// in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;
    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Refreshes an existing object's modification time to now, so garbage
    /// collection treats it as just written. `data` is the object's content
    /// for stores that can only refresh by rewriting. Returns false when the
    /// object does not exist (and then creates nothing). True means the
    /// object is durable under its name, as after [`Backend::put`].
    fn touch(&self, key: &str, data: &[u8]) -> Result<bool, BackendError>;
    /// Refreshes several objects as [`Backend::touch`] refreshes one, and
    /// says which existed; when this returns `Ok`, each of those is durable
    /// under its name. A backend overrides this when it can make the names
    /// durable once for the batch (the directory backend syncs once).
    fn touch_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<Vec<bool>, BackendError> {
        objects
            .iter()
            .map(|(key, data)| self.touch(key, data))
            .collect()
    }
    /// Takes the repository lock that orders chunk refreshes against the
    /// GC sweep (a stat then a delete); a backend that cannot lock returns
    /// [`RepoLock::none`] and documents the window that leaves.
    fn lock(&self, mode: LockMode) -> Result<RepoLock, BackendError>;
    /// How much an object's reported modification time may lag its true
    /// time (coarse timestamps); garbage collection widens its margin by it.
    fn clock_slack(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Checks that a key is a clean relative path: no empty, `.` or `..`
/// component, no leading `/`.
pub(crate) fn check_key(key: &str) -> Result<(), BackendError> {
    let clean = !key.is_empty()
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if clean {
        Ok(())
    } else {
        Err(BackendError::InvalidKey(key.to_owned()))
    }
}

/// Opens the backend a location names: `s3://BUCKET/PREFIX` (credentials,
/// region and endpoint from the usual `AWS_*` environment variables) or a
/// directory path.
pub fn open_location(location: &str) -> Result<Box<dyn Backend>, BackendError> {
    if let Some(rest) = location.strip_prefix("s3://") {
        #[cfg(feature = "s3")]
        return Ok(Box::new(S3Backend::new(S3Config::from_url_and_env(rest)?)?));
        #[cfg(not(feature = "s3"))]
        return Err(BackendError::InvalidLocation {
            location: rest.to_owned(),
            reason: "built without the s3 feature".into(),
        });
    }
    Ok(Box::new(DirBackend::new(location)?))
}
