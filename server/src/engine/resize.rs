//! Online resize: a [`MutationOp::Resize`] record ordered in the journal
//! (and the replication stream) like any write.
//!
//! The order that keeps it exact, on a primary and on a replica alike:
//! - A grow first waits until every earlier record is applied (a pending
//!   shrink's cut of the data file must not land after it), then zeroes
//!   the new part of the store and extends a data file, durably, and only
//!   then reserves the record: once the record exists, the store holds the
//!   new size, so recovery never has to create data.
//! - The record's reservation changes the size (`Engine::reserve`), so
//!   every later record is checked against the new size, and records past
//!   a shrunk end are refused in the same step.
//! - The applier applies it alone (no batch shares it). A shrink records the
//!   new size in the journal superblock durably before cutting a data file,
//!   so the superblock never records more than the store holds; a grow's
//!   size goes into the next checkpoint's superblock. Until the checkpoint
//!   passes the record, recovery replays it.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use super::{Engine, EngineError};
use crate::engine::write::Change;
use crate::journal::Record;
use crate::units::{is_aligned, ByteSize, Lsn, BLOCK};

/// How long a grow waits for the records before it to be applied.
const APPLIED_WAIT: Duration = Duration::from_secs(60);

/// The largest volume size: file offsets are signed 64-bit.
pub const MAX_SIZE: u64 = (i64::MAX as u64) / BLOCK * BLOCK;

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// Not a whole, non-zero number of 4 KiB blocks, or too large.
    #[error("volume size {size} bytes is not a non-zero multiple of 4 KiB at most {max}; choose e.g. {suggest}")]
    BadSize {
        /// The size asked for.
        size: u64,
        /// The largest size allowed.
        max: ByteSize,
        /// A valid size near it.
        suggest: ByteSize,
    },
    /// A shrink without `--force`.
    #[error("shrinking volume '{volume}' from {from} to {to} discards every byte past {to} on the primary and every replica; pass --force if that is what you want")]
    ShrinkRefused {
        /// Volume name.
        volume: String,
        /// Its size now.
        from: ByteSize,
        /// The size asked for.
        to: ByteSize,
    },
    /// The volume is exported read-only.
    #[error("volume '{0}' is read-only on this node; resize it where it is writable")]
    ReadOnly(String),
    /// Another resize has not finished.
    #[error("another resize of volume '{0}' is under way; wait for it and try again")]
    Busy(String),
    /// The engine is stopping.
    #[error("volume '{0}' is shutting down")]
    Stopping(String),
    /// The store could not take the new size.
    #[error("cannot grow the data store of volume '{volume}' to {size}: {source}")]
    Store {
        /// Volume name.
        volume: String,
        /// The size asked for.
        size: ByteSize,
        /// What failed.
        source: std::io::Error,
    },
    /// The engine failed.
    #[error("{0}")]
    Engine(#[from] EngineError),
}

/// Checks a size asked for: a whole, non-zero number of blocks that file
/// offsets can address.
pub fn check_size(size: u64) -> Result<(), ResizeError> {
    if size == 0 || !is_aligned(size) || size > MAX_SIZE {
        return Err(ResizeError::BadSize {
            size,
            max: ByteSize(MAX_SIZE),
            suggest: ByteSize(crate::units::align_up(size.clamp(BLOCK, MAX_SIZE))),
        });
    }
    Ok(())
}

/// Clears the engine's resize flag when the resize ends, however it ends.
struct Resizing<'a>(&'a Cell<bool>);

impl Drop for Resizing<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl Engine {
    /// Resizes the volume to `size` bytes on this node (the primary): the
    /// record's LSN once it is durable locally (the caller waits for the
    /// replicas as for a write), or None when the volume already has that
    /// size. A shrink needs `force`: it discards the data past `size`.
    pub async fn resize(&self, size: u64, force: bool) -> Result<Option<Lsn>, ResizeError> {
        check_size(size)?;
        let name = &self.info.name;
        if self.info.read_only {
            return Err(ResizeError::ReadOnly(name.clone()));
        }
        if self.stopping.get() {
            return Err(ResizeError::Stopping(name.clone()));
        }
        let old = self.size();
        if size == old {
            return Ok(None);
        }
        if size < old && !force {
            return Err(ResizeError::ShrinkRefused {
                volume: name.clone(),
                from: ByteSize(old),
                to: ByteSize(size),
            });
        }
        if self.resizing.replace(true) {
            return Err(ResizeError::Busy(name.clone()));
        }
        let _resizing = Resizing(&self.resizing);
        let rec = self.journal_resize(size).await.map_err(|e| match e {
            EngineError::Io { source, .. } => ResizeError::Store {
                volume: name.clone(),
                size: ByteSize(size),
                source,
            },
            e => ResizeError::Engine(e),
        })?;
        self.journal
            .wait_durable(rec.lsn)
            .await
            .map_err(|e| EngineError::JournalFailed(e.0))?;
        Ok(Some(rec.lsn))
    }

    /// Readies the store for a grow, then reserves the resize record (on a
    /// primary and on a replica alike; see the module comment).
    pub(super) async fn journal_resize(&self, size: u64) -> Result<Rc<Record>, EngineError> {
        if check_size(size).is_err() {
            return Err(EngineError::OutOfRange {
                what: "resize",
                offset: size,
            });
        }
        let old = self.size();
        if size > old {
            self.wait_applied(self.journal.next_lsn(), APPLIED_WAIT)
                .await?;
            self.store
                .grow(old, size)
                .await
                .map_err(|source| EngineError::Io {
                    what: "growing the data store",
                    source,
                })?;
        }
        let rec = self
            .reserve(Change::resize(size))
            .await
            .map_err(EngineError::Nbd)?;
        tracing::info!(volume = %self.info.name, "resize from {} to {} bytes is LSN {}", old, size, rec.lsn);
        Ok(rec)
    }

    /// The applier reached a resize record: the superblock records the new
    /// size (durably first, for a shrink) and a shrunk data file is cut.
    pub(super) async fn apply_resize(&self, size: u64, lsn: Lsn) -> std::io::Result<()> {
        let from = self.journal.volume_size();
        let shrink = size < self.store.size();
        self.journal.set_volume_size(size, shrink).await?;
        if shrink {
            self.store.shrink(size)?;
        }
        self.metrics.volume_size.set(size as f64);
        self.metrics.resizes.increment(1);
        tracing::info!(volume = %self.info.name, "volume resized from {from} to {size} bytes (LSN {lsn})");
        crate::events::emit(crate::events::EventKind::Resize {
            volume: self.info.name.clone(),
            from,
            to: size,
            lsn: lsn.0,
        });
        Ok(())
    }

    /// On a replica taking a resync from a primary of `size` bytes: every
    /// record is applied (the caller rebased), so the store simply takes
    /// that size, as a resize would.
    pub(super) async fn adopt_size(&self, size: u64) -> Result<(), EngineError> {
        let old = self.size();
        if size == old {
            return Ok(());
        }
        check_size(size).map_err(|_| EngineError::OutOfRange {
            what: "the primary's volume size",
            offset: size,
        })?;
        let io = |what| move |source| EngineError::Io { what, source };
        if size > old {
            self.store
                .grow(old, size)
                .await
                .map_err(io("growing the data store"))?;
            self.journal
                .set_volume_size(size, true)
                .await
                .map_err(io("recording the volume size"))?;
        } else {
            self.journal
                .set_volume_size(size, true)
                .await
                .map_err(io("recording the volume size"))?;
            self.store
                .shrink(size)
                .map_err(io("shrinking the data store"))?;
        }
        self.info.size.set(size);
        self.resize_changes(size, self.journal.next_lsn());
        self.metrics.volume_size.set(size as f64);
        tracing::warn!(volume = %self.info.name, "took the primary's volume size of {} ({size} bytes) for the resync (was {old} bytes)", ByteSize(size));
        crate::events::emit(crate::events::EventKind::Resize {
            volume: self.info.name.clone(),
            from: old,
            to: size,
            lsn: 0,
        });
        Ok(())
    }
}
