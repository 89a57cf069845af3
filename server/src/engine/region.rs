//! Whole-region operations at a point of the record stream, which a
//! replica's resync needs: write a region as the primary had it after some
//! LSN, hash a region as of that point, rebase the journal, make it all
//! durable and clear the inconsistent mark.

use std::rc::Rc;
use std::time::Duration;

use super::{Engine, EngineError};
use crate::buffer::{Payload, SharedSlice, MAX_CHUNK};
use crate::units::{align_up, is_aligned, Lsn};

/// How long a resync operation waits for the records before its stream
/// point to be applied.
const STREAM_POINT_WAIT: Duration = Duration::from_secs(60);

impl Engine {
    /// Whether `[offset, offset + len)` is an aligned range of the volume.
    fn region_fits(&self, offset: u64, len: u64) -> bool {
        is_aligned(offset)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.size())
    }

    /// Prepares a full resync: everything received so far is applied, then
    /// the journal continues at `start` and the store is marked inconsistent
    /// (persisted: a crash mid-resync restarts it). The volume takes the
    /// primary's `size`: a resize this replica missed is not in the stream.
    pub async fn rebase(
        &self,
        start: Lsn,
        volume_uuid: [u8; 16],
        size: u64,
    ) -> Result<(), EngineError> {
        self.break_snapshots("a full resync rebased the volume");
        let reserved = self.journal.next_lsn();
        self.wait_applied(reserved, STREAM_POINT_WAIT).await?;
        self.journal
            .rebase(start, volume_uuid)
            .await
            .map_err(|source| EngineError::Io {
                what: "rebasing the journal",
                source,
            })?;
        self.applied_next.set(start);
        self.rebase_changes(start, volume_uuid)
            .await
            .map_err(|source| EngineError::Io {
                what: "saving the changed-block table",
                source,
            })?;
        self.adopt_size(size).await
    }

    /// Writes one region, which is the primary's data as of after `after`;
    /// waits until every record up to it is applied so the region never
    /// overwrites a newer record.
    pub async fn write_region(
        &self,
        after: Lsn,
        offset: u64,
        data: Payload,
    ) -> Result<(), EngineError> {
        if !self.region_fits(offset, data.len() as u64) {
            return Err(EngineError::OutOfRange {
                what: "resync region",
                offset,
            });
        }
        // The region is written past the applier: no snapshot can keep
        // its old data.
        self.break_snapshots("a resync writes regions directly");
        self.wait_applied(after.next(), STREAM_POINT_WAIT).await?;
        let data = Rc::new(data);
        let writes = (0..data.chunk_count()).map(|i| {
            let len = align_up(data.chunk_len(i) as u64) as usize;
            let slice = SharedSlice::new(data.clone(), i, 0, len);
            self.store.write_all(slice, offset + (i * MAX_CHUNK) as u64)
        });
        let len = data.len() as u64;
        for (res, _) in futures_util::future::join_all(writes).await {
            res.map_err(|source| EngineError::Io {
                what: "writing a resync region",
                source,
            })?;
        }
        self.mark_resynced(offset, len);
        Ok(())
    }

    /// The xxh3 of `[offset, offset + len)` as of after record `after`
    /// (waits until every record up to it is applied, like
    /// [`Engine::write_region`], so both sides hash the same moment of the
    /// stream).
    pub async fn region_hash(&self, after: Lsn, offset: u64, len: u64) -> Result<u64, EngineError> {
        if !self.region_fits(offset, len) {
            return Err(EngineError::OutOfRange {
                what: "resync check",
                offset,
            });
        }
        self.wait_applied(after.next(), STREAM_POINT_WAIT).await?;
        let data = self.read(offset, len).await.map_err(EngineError::Nbd)?;
        Ok(data.xxh3())
    }

    /// Makes every region written so far durable, and their marks in the
    /// changed-block table.
    pub async fn sync_store(&self) -> Result<(), EngineError> {
        self.store.sync().await.map_err(|source| EngineError::Io {
            what: "syncing the store",
            source,
        })?;
        self.save_resync_marks()
            .await
            .map_err(|source| EngineError::Io {
                what: "saving the changed-block table",
                source,
            })
    }

    /// The resync is complete: make it durable and clear the mark.
    pub async fn finish_resync(&self) -> Result<(), EngineError> {
        self.sync_store().await?;
        self.journal
            .set_inconsistent(false)
            .await
            .map_err(|source| EngineError::Io {
                what: "clearing the inconsistent mark",
                source,
            })
    }
}
