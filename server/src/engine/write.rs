//! The write path: one LSN and journal reservation per mutation, the overlay
//! entry that makes it readable at once, in-place placement of large writes,
//! and the wait for local durability. Waiting for replicas is not the
//! engine's business: the caller does it with the LSN returned.

use std::rc::Rc;
use std::time::Duration;

use nbd::ErrorCode;

use super::Engine;
use crate::buffer::{Payload, SharedSlice, MAX_CHUNK};
use crate::journal::format::FLAG_NO_HOLE;
use crate::journal::MutationOp;
use crate::journal::{NewRecord, Record};
use crate::overlay::Source;
use crate::units::{align_down, align_up, is_aligned, Lsn};

use super::EngineError;

/// A change to the volume as a client or the primary asks for it: a
/// [`crate::journal::Mutation`] before it has an LSN and a checksum.
#[derive(Clone)]
pub struct Change {
    /// What it does.
    pub op: MutationOp,
    /// Op flags (see [`FLAG_NO_HOLE`]).
    pub flags: u8,
    /// Volume byte offset.
    pub offset: u64,
    /// Volume bytes affected.
    pub length: u64,
    /// The data of a write.
    pub payload: Option<Rc<Payload>>,
}

impl Change {
    /// A write of `payload` at `offset`.
    pub fn write(offset: u64, payload: Payload) -> Change {
        Change {
            op: MutationOp::Write,
            flags: 0,
            offset,
            length: payload.len() as u64,
            payload: Some(Rc::new(payload)),
        }
    }

    /// A trim of `[offset, offset + length)`.
    pub fn trim(offset: u64, length: u64) -> Change {
        Change {
            op: MutationOp::Trim,
            flags: 0,
            offset,
            length,
            payload: None,
        }
    }

    /// The volume becomes `size` bytes (the record touches no range).
    pub fn resize(size: u64) -> Change {
        Change {
            op: MutationOp::Resize,
            flags: 0,
            offset: size,
            length: 0,
            payload: None,
        }
    }

    /// Zeroes over `[offset, offset + length)`, kept allocated with `no_hole`.
    pub fn write_zeroes(offset: u64, length: u64, no_hole: bool) -> Change {
        Change {
            op: MutationOp::WriteZeroes,
            flags: if no_hole { FLAG_NO_HOLE } else { 0 },
            offset,
            length,
            payload: None,
        }
    }
}

impl Engine {
    fn check_writable(&self) -> Result<(), ErrorCode> {
        if self.info.read_only {
            return Err(ErrorCode::Perm);
        }
        if self.stopping.get() {
            return Err(ErrorCode::Shutdown);
        }
        Ok(())
    }

    /// Writes (and zeroes that must stay allocated) are refused with ENOSPC
    /// while the data store is full: the applier cannot make room in the
    /// journal, and a client gets a clear error instead of waiting forever.
    /// Acknowledged writes stay in the journal and are applied once there is
    /// space (the applier retries every second).
    fn check_space(&self, op: MutationOp) -> Result<(), ErrorCode> {
        if op != MutationOp::Trim && self.store_full.get() {
            return Err(ErrorCode::NoSpc);
        }
        Ok(())
    }

    /// Journals a client's mutation and returns its LSN once it may be
    /// acknowledged: durable locally, or with `--durability flush` written
    /// (see [`Engine::make_durable`]). An empty mutation does nothing and
    /// returns None.
    pub async fn mutate(&self, m: Change) -> Result<Option<Lsn>, ErrorCode> {
        if m.length == 0 {
            return Ok(None);
        }
        self.check_writable()?;
        self.check_space(m.op)?;
        let rec = self.reserve(m).await?;
        self.journal
            .wait_written(rec.lsn)
            .await
            .map_err(|e| self.journal_error(e))?;
        Ok(Some(rec.lsn))
    }

    /// Waits until the record `lsn` is durable locally (a FUA write; at
    /// once unless `--durability flush`).
    pub async fn make_durable(&self, lsn: Lsn) -> Result<(), ErrorCode> {
        self.journal
            .wait_durable(lsn)
            .await
            .map_err(|e| self.journal_error(e))
    }

    fn journal_error(&self, e: crate::journal::JournalFailed) -> ErrorCode {
        tracing::error!(volume = %self.info.name, "{e}");
        ErrorCode::Io
    }

    /// On a replica: journals a record received from the primary, which must
    /// carry exactly the next LSN (invariant: never out of order). Waits for
    /// journal space (backpressure on the stream), not for durability.
    pub async fn append_replicated(&self, lsn: Lsn, m: Change) -> Result<Lsn, EngineError> {
        let want = self.journal.next_lsn();
        if lsn != want {
            return Err(EngineError::OutOfOrder { got: lsn.0, want });
        }
        if m.op == MutationOp::Resize {
            let rec = self.journal_resize(m.offset).await?;
            assert_eq!(rec.lsn, lsn, "replica journal assigned a different LSN");
            return Ok(rec.lsn);
        }
        if m.offset
            .checked_add(m.length)
            .is_none_or(|end| end > self.size())
        {
            return Err(EngineError::OutOfRange {
                what: "record",
                offset: m.offset,
            });
        }
        let rec = self.reserve(m).await.map_err(EngineError::Nbd)?;
        assert_eq!(rec.lsn, lsn, "replica journal assigned a different LSN");
        Ok(rec.lsn)
    }

    /// Whether `m` goes to the store in place (a large aligned write).
    fn goes_in_place(&self, m: &Change) -> bool {
        self.in_place_min > 0
            && self.snapshots.borrow().is_empty()
            && m.op == MutationOp::Write
            && m.payload.is_some()
            && m.length >= self.in_place_min
            && is_aligned(m.offset)
            && is_aligned(m.length)
    }

    /// Reserves an LSN and journal space for a mutation and records it in
    /// the overlay (and, on a primary, hands it to replication), in one
    /// step, so LSN order, journal order and overlay order agree. A
    /// mutation past the volume's end (a connection negotiated before a
    /// shrink) is refused in that same step; a resize changes the size in
    /// it, so every later record is checked against the new size.
    pub(super) async fn reserve(&self, m: Change) -> Result<Rc<Record>, ErrorCode> {
        let in_place = self.goes_in_place(&m);
        let (offset, length) = (m.offset, m.length);
        let new_size = (m.op == MutationOp::Resize).then_some(offset);
        let beyond_end = match m.op {
            MutationOp::Trim => ErrorCode::Inval,
            _ => ErrorCode::NoSpc,
        };
        let fits = || {
            new_size.is_some()
                || offset
                    .checked_add(length)
                    .is_some_and(|end| end <= self.size())
        };
        let new = NewRecord {
            op: m.op,
            flags: m.flags,
            offset,
            length,
            payload: m.payload,
            in_place,
        };
        let hooks = self.hooks();
        self.journal
            .reserve(new, fits, |rec| {
                // Counted in the step that makes it visible here, so no
                // other core reads the store past it until it is applied;
                // before a resize's new size, so a core that sees the new
                // size sees the count too.
                self.read_gate.reserved();
                if let Some(size) = new_size {
                    self.info.size.set(size);
                    self.resize_changes(size, rec.lsn);
                }
                self.mark_changed(rec.offset, rec.length, rec.lsn);
                self.enter_overlay(rec, in_place);
                if let Some(h) = &hooks {
                    h.reserved(rec);
                }
            })
            .await
            .map_err(|e| {
                tracing::error!(volume = %self.info.name, "{e}");
                ErrorCode::Io
            })?
            .ok_or(beyond_end)
    }

    /// Makes a freshly reserved record visible to reads (and starts its
    /// in-place write, which must wait for the newest older record under it).
    fn enter_overlay(&self, rec: &Rc<Record>, in_place: bool) {
        let (offset, end) = (rec.offset, rec.offset + rec.length);
        let mut ov = self.overlay.borrow_mut();
        if in_place {
            // The in-place write waits until this one is applied, so no
            // older record is written to the store over it afterwards.
            let after = ov.newest(offset, end);
            if let Some(e) = self.me.upgrade() {
                tokio_uring::spawn(e.place(rec.clone(), after));
            }
        }
        match (rec.op, &rec.payload) {
            (MutationOp::Write, Some(p)) => ov.insert(
                offset,
                end,
                rec.lsn,
                Source::Data {
                    payload: p.clone(),
                    at: 0,
                },
            ),
            (MutationOp::WriteZeroes, _) => ov.insert(offset, end, rec.lsn, Source::Zero),
            // A trim only promises zeroes for the whole blocks inside it.
            (MutationOp::Trim, _) => {
                ov.insert(align_up(offset), align_down(end), rec.lsn, Source::Zero)
            }
            // A write of no bytes (no payload) changes nothing; a resize
            // touches no range.
            (MutationOp::Write, None) | (MutationOp::Resize, _) => {}
        }
    }

    /// Waits until `after` (the newest older record overlapping an in-place
    /// write) is applied. Returns false to give up going in place: when the
    /// journal failed or the store is full the applier cannot apply `after`,
    /// and every record behind this one, trims that would free space
    /// included, would wait with it.
    async fn wait_for_older(&self, after: Option<Lsn>) -> bool {
        let Some(after) = after else { return true };
        while self.applied_next.get() <= after {
            let applied = self.applied.notified();
            if self.journal.failed().is_some() || self.store_full.get() {
                return false;
            }
            // Bounded wait: either may change meanwhile (checked above).
            let _ = tokio::time::timeout(Duration::from_millis(100), applied).await;
        }
        true
    }

    /// Writes a large record's payload to its home in the data store,
    /// durably, then lets the journal write its header: in place when that
    /// worked, or with the payload (the usual double write) when it failed.
    /// Waits first until `after` (the newest older record overlapping it)
    /// is applied. Records reach the applier only once durable, so every
    /// record applied after this write starts is newer than it, and the
    /// store ends with the newest data.
    async fn place(self: Rc<Self>, rec: Rc<Record>, after: Option<Lsn>) {
        // A snapshot created since the choice needs the old data first:
        // the applier keeps it, so the record goes through the journal.
        let go = !self.snapshot_after(rec.lsn) && self.wait_for_older(after).await;
        // The intent goes first: a crash between the payload write and the
        // record's header must still tell recovery which range changed, so
        // changed-block tracking (incremental backups) and the replicas'
        // resync include data no record names.
        let intent_ok = go
            && (self.journal.failed().is_some()
                || match self.journal.write_intent(&rec).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(volume = %self.info.name, "writing the intent of in-place LSN {} failed: {e}; journaling its data instead", rec.lsn);
                        false
                    }
                });
        let durable = self.journal.failed().is_none() && intent_ok && self.write_home(&rec).await;
        self.journal.placed(&rec, durable);
    }

    /// Writes an in-place record's payload durably to the store; false
    /// (logged) when that failed and the journal must take the payload.
    async fn write_home(&self, rec: &Record) -> bool {
        let p = rec
            .payload
            .as_ref()
            .expect("in-place records carry a payload");
        let writes = (0..p.chunk_count()).map(|i| {
            let slice = SharedSlice::new(p.clone(), i, 0, p.chunk_len(i));
            self.store
                .write_all_durable(slice, rec.offset + (i * MAX_CHUNK) as u64)
        });
        let mut result = Ok(());
        for (res, _) in futures_util::future::join_all(writes).await {
            result = result.and(res);
        }
        match result {
            Ok(()) => {
                self.metrics.in_place_bytes.increment(rec.length);
                true
            }
            Err(e) => {
                tracing::warn!(
                    volume = %self.info.name,
                    "in-place write of LSN {} ({} bytes at {}) failed: {e}; journaling its data instead",
                    rec.lsn, rec.length, rec.offset
                );
                self.metrics.in_place_fallbacks.increment(1);
                false
            }
        }
    }

    /// Completes once every write acknowledged so far, on any connection,
    /// is durable locally. Per write they already are (each is journaled
    /// with O_DSYNC before its reply), so this only reports journal
    /// failure; with `--durability flush` it waits for a group flush.
    pub async fn flush(&self) -> Result<(), ErrorCode> {
        self.journal
            .sync_written()
            .await
            .map_err(|e| self.journal_error(e))
    }
}
