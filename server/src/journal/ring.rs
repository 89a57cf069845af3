//! The journal's space and LSN ring: which area bytes and which LSNs are
//! taken, how records pack into batches, and what a checkpoint gives back.
//! Pure arithmetic, no I/O, so its rules are checked in milliseconds;
//! [`Journal`](super::Journal) is the I/O shell around it.
//!
//! The area is circular. Records are reserved at `head`, in LSN order, in
//! entries: a batch (one header block, then its records' payloads back to
//! back) or a record with its own header (a write that may go in place).
//! A batchable record joins the open batch (the newest, while the appender
//! has not taken it) when [`place`] says it fits, else opens a new one; an
//! entry that does not fit before the end of the area is preceded by a pad
//! to the end and starts at offset 0. `used` counts every byte from the
//! oldest retained entry (pads included) to `head`, so a reservation fits
//! exactly when `used` stays within the area, and reservations never
//! overlap. Space comes back only oldest first, by a checkpoint, and only
//! in whole entries: a batch's header stays until its last record is
//! released, so a checkpoint's LSN is always the first of an entry.

use std::collections::VecDeque;

use super::format::MAX_BATCH_ENTRIES;
use crate::units::{align_up, Lsn, BLOCK};

/// Where a record not yet released sits in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Its LSN.
    pub lsn: Lsn,
    /// Area offset of its entry's header (its batch's, for a batched record).
    pub pos: u64,
    /// Its index in its batch (0 for a record with its own header): a
    /// record with index 0 starts an entry.
    pub index: u32,
    /// Journal bytes it holds (padding and header before it included).
    pub reserved: u64,
    /// Volume bytes it changes (`offset`, `length`).
    pub extent: (u64, u64),
    /// A large write that may have gone to the store in place: its payload
    /// may not be in the journal (catch-up cannot read it back).
    pub in_place: bool,
}

/// How a record is laid out in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// In a batch, sharing its header; `payload` bytes before padding.
    Batched {
        /// Payload bytes (0 for all but writes).
        payload: u64,
    },
    /// With a header of its own, followed by `record_len - BLOCK` bytes
    /// (a write that may go in place: its slot must take an intent, then
    /// its header, at a fixed place).
    Own {
        /// Journal bytes of the record, header included.
        record_len: u64,
    },
}

/// A record's place in the ring, as reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Its LSN: the one after the previous reservation's.
    pub lsn: Lsn,
    /// Area offset of its entry's header (its batch's, when batched).
    pub pos: u64,
    /// Its index in its batch (0: it starts the entry, and writes its header).
    pub index: u32,
    /// Area offset of its payload (right after its own header, when not batched).
    pub payload_pos: u64,
    /// Bytes of padding just before its entry (up to the end of the area),
    /// 0 if none (always 0 when it joins a batch).
    pub pad_before: u64,
    /// Journal bytes it added at the head: its header block if it starts
    /// an entry, and its padded payload (its own record's length).
    pub len: u64,
}

/// The batch reservations may still join: the newest, not yet taken by
/// the appender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenBatch {
    /// LSN of its first record.
    pub first: Lsn,
    /// Area offset of its header.
    pub pos: u64,
    /// Records in it.
    pub entries: u32,
    /// Its padded payload bytes.
    pub payload: u64,
}

impl OpenBatch {
    /// Area offset just past it.
    fn end(&self) -> u64 {
        self.pos + BLOCK + self.payload
    }
}

/// Where a new record goes (see [`place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Into the open batch, right after its payloads.
    Join,
    /// A new entry at `pos`, after `pad_before` bytes of pad to the end of
    /// the area (then `pos` is 0).
    Open {
        /// Area offset of its header.
        pos: u64,
        /// Bytes of pad before it.
        pad_before: u64,
    },
}

/// Where a record of `layout` goes, given the ring's `head`, the open
/// batch (if any) and `batch_limit`, the most padded payload a batch
/// carries (so no batch is larger than the largest lone record). Pure: the
/// packing rule of group commits. A batched record joins the open batch when
/// it has room for one more entry, its payload stays within the limit and
/// it still ends before the end of the area; anything else opens a new
/// entry at the head, or at 0 after a pad when it does not fit before the
/// end.
pub fn place(
    area_len: u64,
    head: u64,
    open: Option<&OpenBatch>,
    layout: Layout,
    batch_limit: u64,
) -> Place {
    if let (Layout::Batched { payload }, Some(b)) = (layout, open) {
        let padded = align_up(payload);
        if (b.entries as usize) < MAX_BATCH_ENTRIES
            && b.payload + padded <= batch_limit
            && b.end() + padded <= area_len
        {
            return Place::Join;
        }
    }
    let len = entry_len(layout);
    if head + len > area_len {
        Place::Open {
            pos: 0,
            pad_before: area_len - head,
        }
    } else {
        Place::Open {
            pos: head,
            pad_before: 0,
        }
    }
}

/// Journal bytes of a new entry holding only a record of `layout`.
fn entry_len(layout: Layout) -> u64 {
    match layout {
        Layout::Batched { payload } => BLOCK + align_up(payload),
        Layout::Own { record_len } => record_len,
    }
}

/// What a checkpoint to some LSN gives back (see [`Ring::plan_release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The oldest record released.
    pub first: Lsn,
    /// Records released.
    pub count: usize,
    /// Journal bytes released (their pads and headers included).
    pub bytes: u64,
    /// The new checkpoint: the first LSN kept (the first of an entry), or
    /// the next LSN to assign when none is.
    pub checkpoint_lsn: Lsn,
    /// Area offset of the oldest entry kept (or of the head, if none is):
    /// where recovery starts after this checkpoint.
    pub checkpoint_pos: u64,
}

/// The space and LSN ring of a journal's record area.
#[derive(Debug)]
pub struct Ring {
    area_len: u64,
    /// Most padded payload bytes one batch carries.
    batch_limit: u64,
    /// Next area offset to reserve.
    head: u64,
    /// Reserved, not yet released bytes.
    used: u64,
    /// Next LSN to assign.
    next_lsn: Lsn,
    /// Every record not yet released, oldest first, contiguous in LSN.
    retained: VecDeque<Retained>,
    /// The batch new records may join, if any.
    open: Option<OpenBatch>,
}

impl Ring {
    /// An empty ring whose next record goes at `head` with LSN `next_lsn`
    /// (a recovered journal's checkpoint).
    pub fn new(area_len: u64, head: u64, next_lsn: Lsn) -> Ring {
        assert!(
            area_len >= 2 * BLOCK && area_len % BLOCK == 0,
            "record area of {area_len} bytes is not a whole number of blocks (at least 2)"
        );
        assert!(
            head < area_len && head % BLOCK == 0,
            "head {head} is not a block in the area"
        );
        Ring {
            area_len,
            batch_limit: align_up(super::max_payload(area_len)),
            head,
            used: 0,
            next_lsn,
            retained: VecDeque::new(),
            open: None,
        }
    }

    /// Length of the record area.
    pub fn area_len(&self) -> u64 {
        self.area_len
    }

    /// Next area offset to reserve.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Bytes reserved and not yet released.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The next LSN to be assigned.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The batch new records may still join, if any.
    pub fn open_batch(&self) -> Option<OpenBatch> {
        self.open
    }

    /// Takes the next LSN and room for a record of `layout` (see [`place`]),
    /// or None when the area has no room. `extent` is the volume range the
    /// record changes; `in_place` marks a write that may bypass the journal
    /// (only with its own header).
    pub fn try_reserve(
        &mut self,
        layout: Layout,
        extent: (u64, u64),
        in_place: bool,
    ) -> Option<Reservation> {
        if let Layout::Own { record_len } = layout {
            assert!(
                record_len >= BLOCK && record_len % BLOCK == 0,
                "record of {record_len} bytes is not a whole number of blocks"
            );
        }
        assert!(
            !in_place || matches!(layout, Layout::Own { .. }),
            "an in-place write needs its own header"
        );
        assert!(
            entry_len(layout) <= self.area_len / 2,
            "record larger than half the journal"
        );
        let place = place(
            self.area_len,
            self.head,
            self.open.as_ref(),
            layout,
            self.batch_limit,
        );
        let r = self.reservation(place, layout);
        if self.used + r.pad_before + r.len > self.area_len {
            return None;
        }
        if let Some(last) = self.retained.back() {
            assert_eq!(last.lsn.next(), r.lsn, "retained LSNs have a gap");
        }
        self.next_lsn = r.lsn.next();
        self.used += r.pad_before + r.len;
        let end = if r.index == 0 { r.pos } else { r.payload_pos } + r.len;
        self.head = end % self.area_len;
        self.open = self.after(place, layout, &r);
        self.retained.push_back(Retained {
            lsn: r.lsn,
            pos: r.pos,
            index: r.index,
            reserved: r.pad_before + r.len,
            extent,
            in_place,
        });
        assert!(self.used <= self.area_len, "journal space overcommitted");
        Some(r)
    }

    /// The reservation `place` makes for a record of `layout` (nothing changed yet).
    fn reservation(&self, place: Place, layout: Layout) -> Reservation {
        let lsn = self.next_lsn;
        match (place, layout) {
            (Place::Join, Layout::Batched { payload }) => {
                let b = self.open.expect("joins only an open batch");
                assert_eq!(
                    b.end() % self.area_len,
                    self.head,
                    "the open batch ends at the head"
                );
                Reservation {
                    lsn,
                    pos: b.pos,
                    index: b.entries,
                    payload_pos: b.end(),
                    pad_before: 0,
                    len: align_up(payload),
                }
            }
            (Place::Open { pos, pad_before }, _) => Reservation {
                lsn,
                pos,
                index: 0,
                payload_pos: pos + BLOCK,
                pad_before,
                len: entry_len(layout),
            },
            (Place::Join, Layout::Own { .. }) => {
                unreachable!("a record with its own header joins no batch")
            }
        }
    }

    /// The open batch after reserving `r`: the grown or new batch, or none
    /// after a record with its own header (nothing may join a batch before
    /// it: the area holds records in LSN order).
    fn after(&self, place: Place, layout: Layout, r: &Reservation) -> Option<OpenBatch> {
        match (place, layout) {
            (_, Layout::Own { .. }) => None,
            (Place::Join, Layout::Batched { .. }) => self.open.map(|b| OpenBatch {
                entries: b.entries + 1,
                payload: b.payload + r.len,
                ..b
            }),
            (Place::Open { pos, .. }, Layout::Batched { .. }) => Some(OpenBatch {
                first: r.lsn,
                pos,
                entries: 1,
                payload: r.len - BLOCK,
            }),
        }
    }

    /// The appender took every record up to `last` to write: no record may
    /// join their batches any more.
    pub fn seal_through(&mut self, last: Lsn) {
        if self.open.is_some_and(|b| b.first <= last) {
            self.open = None;
        }
    }

    /// The checkpoint a move to `next` reaches: `next` itself if it starts
    /// an entry (or no retained record has it), else the first LSN of its
    /// batch (a batch is released whole).
    pub fn checkpoint_floor(&self, next: Lsn) -> Lsn {
        match self.retained(next) {
            Some(r) => Lsn(r.lsn.0 - u64::from(r.index)),
            None => next,
        }
    }

    /// What a checkpoint to `next` would release: every retained entry
    /// wholly below it (a batch only with all its records; see
    /// [`Ring::checkpoint_floor`]). None when that is none. Changes nothing:
    /// the caller persists the checkpoint, then calls [`Ring::release`].
    pub fn plan_release(&self, next: Lsn) -> Option<Release> {
        let first = self.retained.front()?.lsn;
        let below = self.retained.iter().take_while(|r| r.lsn < next).count();
        // The first record kept starts its entry: keep the whole batch.
        let count = below - self.retained.get(below).map_or(0, |r| r.index as usize);
        if count == 0 {
            return None;
        }
        assert!(
            next <= self.next_lsn,
            "checkpoint past the last assigned LSN"
        );
        let bytes = self.retained.iter().take(count).map(|r| r.reserved).sum();
        let kept = self.retained.get(count);
        Some(Release {
            first,
            count,
            bytes,
            checkpoint_lsn: kept.map_or(self.next_lsn, |r| r.lsn),
            checkpoint_pos: kept.map_or(self.head, |r| r.pos),
        })
    }

    /// Gives back the space of a planned release: its records must still be
    /// the oldest retained (releases happen in order, each once).
    pub fn release(&mut self, rel: &Release) {
        assert_eq!(
            self.retained.front().map(|r| r.lsn),
            Some(rel.first),
            "release out of order"
        );
        assert!(
            rel.count <= self.retained.len(),
            "releasing more records than retained"
        );
        assert!(
            rel.bytes <= self.used,
            "releasing more journal space than reserved"
        );
        assert!(
            self.open.is_none_or(|b| b.first >= rel.checkpoint_lsn),
            "releasing a batch the appender has not taken"
        );
        debug_assert!(
            self.retained.get(rel.count).is_none_or(|r| r.index == 0),
            "release splits a batch"
        );
        self.used -= rel.bytes;
        self.retained.drain(..rel.count);
    }

    /// Forgets every record and continues the LSN sequence at `start` from
    /// the current head (a replica taking a full resync).
    pub fn rebase(&mut self, start: Lsn) {
        self.next_lsn = start;
        self.retained.clear();
        self.used = 0;
        self.open = None;
    }

    /// Record `lsn`'s payload is in the journal after all (its in-place
    /// write fell back): catch-up can replay it.
    pub fn mark_journaled(&mut self, lsn: Lsn) {
        let first = self.retained.front().map_or(lsn, |r| r.lsn);
        let Some(i) = lsn.0.checked_sub(first.0) else {
            return;
        };
        if let Some(r) = self.retained.get_mut(i as usize) {
            debug_assert_eq!(r.lsn, lsn, "retained records are contiguous");
            r.in_place = false;
        }
    }

    /// Where record `lsn` sits, if it is still retained.
    pub fn retained(&self, lsn: Lsn) -> Option<Retained> {
        let front = self.retained.front()?;
        let i = lsn.0.checked_sub(front.lsn.0)? as usize;
        let r = *self.retained.get(i)?;
        debug_assert_eq!(r.lsn, lsn, "retained records are contiguous");
        Some(r)
    }

    /// The retained records from LSN `from` on. They are contiguous in LSN,
    /// so this skips straight to `from` instead of scanning.
    pub fn retained_since(&self, from: Lsn) -> impl Iterator<Item = &Retained> {
        let skip = self
            .retained
            .front()
            .map_or(0, |front| from.0.saturating_sub(front.lsn.0) as usize);
        self.retained.iter().skip(skip)
    }

    /// Bytes changed by retained records from LSN `from` on.
    pub fn retained_bytes_from(&self, from: Lsn) -> u64 {
        self.retained_since(from).map(|r| r.extent.1).sum()
    }

    /// Checks every invariant, at a cost linear in the retained records
    /// (tests call it after each step).
    #[cfg(test)]
    fn check(&self) {
        assert!(self.used <= self.area_len, "used exceeds the area");
        assert!(self.head < self.area_len && self.head % BLOCK == 0);
        let sum: u64 = self.retained.iter().map(|r| r.reserved).sum();
        assert_eq!(sum, self.used, "used is not the retained bytes");
        let mut lsn = self.retained.front().map(|r| r.lsn);
        let mut prev: Option<&Retained> = None;
        for r in &self.retained {
            assert_eq!(Some(r.lsn), lsn, "retained LSNs have a gap");
            assert!(r.pos % BLOCK == 0 && r.reserved % BLOCK == 0);
            match prev {
                None => assert_eq!(r.index, 0, "the oldest record kept starts its entry"),
                Some(p) if r.index > 0 => {
                    assert_eq!(
                        (r.pos, r.index),
                        (p.pos, p.index + 1),
                        "a batch is consecutive"
                    );
                    assert!(!r.in_place, "an in-place write is never batched");
                }
                Some(_) => {}
            }
            assert!((r.index as usize) < MAX_BATCH_ENTRIES);
            prev = Some(r);
            lsn = Some(r.lsn.next());
        }
        if let Some(next) = lsn {
            assert_eq!(next, self.next_lsn, "the newest record is not the last LSN");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AREA: u64 = 16 * BLOCK;

    fn own(blocks: u64) -> Layout {
        Layout::Own {
            record_len: blocks * BLOCK,
        }
    }

    fn batched(blocks: u64) -> Layout {
        Layout::Batched {
            payload: blocks * BLOCK,
        }
    }

    #[test]
    fn place_packs_records_into_batches() {
        const A: u64 = 64 * BLOCK;
        let open = |pos: u64, entries: u32, payload_blocks: u64| OpenBatch {
            first: Lsn(1),
            pos: pos * BLOCK,
            entries,
            payload: payload_blocks * BLOCK,
        };
        let at = |pos: u64| Place::Open {
            pos: pos * BLOCK,
            pad_before: 0,
        };
        let full = MAX_BATCH_ENTRIES as u32;
        let limit = 16 * BLOCK;
        // (head, open batch, layout) → place
        let table: &[(u64, Option<OpenBatch>, Layout, Place)] = &[
            // Nothing open: a new batch at the head.
            (3, None, batched(1), at(3)),
            // Room in the open batch: join it, payload or none.
            (5, Some(open(3, 1, 1)), batched(1), Place::Join),
            (5, Some(open(3, 1, 1)), batched(0), Place::Join),
            // A sub-block payload takes a whole block, and fits exactly.
            (
                5,
                Some(open(3, 1, 1)),
                Layout::Batched { payload: 1 },
                Place::Join,
            ),
            // The open batch is full: a new one.
            (5, Some(open(3, full, 1)), batched(1), at(5)),
            (5, Some(open(3, full, 1)), batched(0), at(5)),
            // The payload limit: exactly reached joins, past it opens.
            (19, Some(open(3, 2, 15)), batched(1), Place::Join),
            (19, Some(open(3, 2, 15)), batched(2), at(19)),
            // A record with its own header never joins.
            (5, Some(open(3, 1, 1)), own(2), at(5)),
            // Past the end of the area: a new batch at 0 after a pad, even
            // with room in the open one.
            (
                62,
                Some(open(60, 1, 1)),
                batched(3),
                Place::Open {
                    pos: 0,
                    pad_before: 2 * BLOCK,
                },
            ),
            (
                62,
                None,
                own(3),
                Place::Open {
                    pos: 0,
                    pad_before: 2 * BLOCK,
                },
            ),
            // Ending exactly at the end joins; a batch ending at the end
            // still takes an entry without payload (it needs no bytes).
            (62, Some(open(60, 1, 1)), batched(2), Place::Join),
            (0, Some(open(62, 1, 1)), batched(0), Place::Join),
            (0, Some(open(62, 1, 1)), batched(1), at(0)),
        ];
        for (i, &(head, b, layout, want)) in table.iter().enumerate() {
            assert_eq!(
                place(A, head * BLOCK, b.as_ref(), layout, limit),
                want,
                "case {i}: head {head}, {b:?}, {layout:?}"
            );
        }
    }

    #[test]
    fn a_record_that_does_not_fit_before_the_end_wraps_after_a_pad() {
        let mut ring = Ring::new(AREA, 13 * BLOCK, Lsn(5));
        let r = ring.try_reserve(own(4), (0, 1), false).unwrap();
        assert_eq!((r.lsn, r.pos, r.pad_before), (Lsn(5), 0, 3 * BLOCK));
        assert_eq!((ring.used(), ring.head()), (7 * BLOCK, 4 * BLOCK));
        ring.check();
    }

    #[test]
    fn a_record_ending_at_the_end_of_the_area_moves_the_head_to_0() {
        let mut ring = Ring::new(AREA, 12 * BLOCK, Lsn(1));
        let r = ring.try_reserve(own(4), (0, 1), false).unwrap();
        assert_eq!((r.pos, r.pad_before, ring.head()), (12 * BLOCK, 0, 0));
        ring.check();
    }

    #[test]
    fn batched_records_share_a_header_until_sealed() {
        let mut ring = Ring::new(AREA, 2 * BLOCK, Lsn(1));
        let a = ring.try_reserve(batched(1), (0, 4096), false).unwrap();
        let b = ring.try_reserve(batched(2), (0, 8192), false).unwrap();
        let c = ring.try_reserve(batched(0), (0, 4096), false).unwrap();
        assert_eq!(
            (a.pos, a.index, a.payload_pos, a.len),
            (2 * BLOCK, 0, 3 * BLOCK, 2 * BLOCK)
        );
        assert_eq!(
            (b.pos, b.index, b.payload_pos, b.len),
            (2 * BLOCK, 1, 4 * BLOCK, 2 * BLOCK)
        );
        assert_eq!(
            (c.pos, c.index, c.payload_pos, c.len),
            (2 * BLOCK, 2, 6 * BLOCK, 0)
        );
        assert_eq!((ring.used(), ring.head()), (4 * BLOCK, 6 * BLOCK));
        ring.seal_through(Lsn(3));
        let d = ring.try_reserve(batched(1), (0, 4096), false).unwrap();
        assert_eq!((d.pos, d.index, d.len), (6 * BLOCK, 0, 2 * BLOCK));
        ring.check();
    }

    #[test]
    fn a_checkpoint_releases_only_whole_batches() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        for _ in 0..3 {
            ring.try_reserve(batched(1), (0, 4096), false).unwrap();
        }
        ring.seal_through(Lsn(3));
        ring.try_reserve(batched(1), (0, 4096), false).unwrap();
        ring.seal_through(Lsn(4));
        // LSN 3 is in the middle of the first batch: nothing to release.
        assert_eq!(ring.checkpoint_floor(Lsn(3)), Lsn(1));
        assert_eq!(ring.plan_release(Lsn(3)), None);
        assert_eq!(ring.checkpoint_floor(Lsn(4)), Lsn(4));
        let rel = ring.plan_release(Lsn(4)).unwrap();
        assert_eq!(
            (rel.count, rel.bytes, rel.checkpoint_lsn, rel.checkpoint_pos),
            (3, 4 * BLOCK, Lsn(4), 4 * BLOCK)
        );
        ring.release(&rel);
        ring.check();
        assert_eq!(ring.checkpoint_floor(Lsn(5)), Lsn(5));
        let rel = ring.plan_release(Lsn(5)).unwrap();
        assert_eq!(
            (rel.checkpoint_lsn, rel.checkpoint_pos),
            (Lsn(5), 6 * BLOCK)
        );
    }

    #[test]
    #[should_panic(expected = "releasing a batch the appender has not taken")]
    fn an_open_batch_is_never_released() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        ring.try_reserve(batched(1), (0, 4096), false).unwrap();
        let rel = ring.plan_release(Lsn(2)).unwrap();
        ring.release(&rel);
    }

    #[test]
    fn a_full_ring_refuses_until_a_release() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        for _ in 0..2 {
            ring.try_reserve(own(8), (0, 1), false).unwrap();
        }
        assert_eq!(ring.try_reserve(own(1), (0, 1), false), None);
        let rel = ring.plan_release(Lsn(2)).unwrap();
        assert_eq!(
            (rel.count, rel.bytes, rel.checkpoint_pos),
            (1, 8 * BLOCK, 8 * BLOCK)
        );
        ring.release(&rel);
        assert_eq!(ring.try_reserve(own(1), (0, 1), false).unwrap().lsn, Lsn(3));
        ring.check();
    }

    #[test]
    #[should_panic(expected = "release out of order")]
    fn a_release_twice_is_refused() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        ring.try_reserve(own(1), (0, 1), false).unwrap();
        ring.try_reserve(own(1), (0, 1), false).unwrap();
        let rel = ring.plan_release(Lsn(2)).unwrap();
        ring.release(&rel);
        ring.release(&rel);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Reserve a record of this many blocks, batched or with its own header.
        Reserve(u64, bool),
        /// The appender takes everything reserved.
        Seal,
        /// Checkpoint past this many of the oldest live records (after the
        /// appender took everything).
        Release(usize),
        /// A replica's rebase (only when nothing is live).
        Rebase,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..=AREA / BLOCK / 4, any::<bool>()).prop_map(|(b, batched)| Step::Reserve(b, batched)),
            1 => Just(Step::Seal),
            2 => (0usize..6).prop_map(Step::Release),
            1 => Just(Step::Rebase),
        ]
    }

    /// Area bytes a reservation covers: its pad, then its header and payload.
    fn spans(r: &Reservation) -> Vec<(u64, u64)> {
        let start = if r.index == 0 { r.pos } else { r.payload_pos };
        let mut v = vec![(start, start + r.len)];
        if r.pad_before > 0 {
            v.push((AREA - r.pad_before, AREA));
        }
        v
    }

    fn layout(blocks: u64, batched: bool) -> Layout {
        match batched {
            true => Layout::Batched {
                payload: blocks * BLOCK,
            },
            false => Layout::Own {
                record_len: (blocks + 1) * BLOCK,
            },
        }
    }

    /// Checks a new reservation against the live ones, and adds it.
    fn check_reserved(
        r: Reservation,
        live: &mut VecDeque<Reservation>,
    ) -> Result<(), TestCaseError> {
        prop_assert!(r.pos % BLOCK == 0 && r.payload_pos % BLOCK == 0);
        for (a, b) in spans(&r) {
            prop_assert!(b <= AREA);
            for old in live.iter() {
                for (c, d) in spans(old) {
                    prop_assert!(
                        b <= c || d <= a || a == b || c == d,
                        "{:?} overlaps {:?}",
                        r,
                        old
                    );
                }
            }
        }
        if r.index > 0 {
            let prev = live.back().expect("a batch has a first record");
            prop_assert_eq!((r.pos, r.index), (prev.pos, prev.index + 1));
        }
        live.push_back(r);
        Ok(())
    }

    /// A planned release matches the live records it frees, whole entries only.
    fn check_release(
        ring: &mut Ring,
        n: usize,
        live: &mut VecDeque<Reservation>,
    ) -> Result<(), TestCaseError> {
        let n = n.min(live.len());
        let to = live.get(n).map_or(ring.next_lsn(), |r| r.lsn);
        let whole = n - live.get(n).map_or(0, |r| r.index as usize);
        let Some(rel) = ring.plan_release(to) else {
            prop_assert_eq!(whole, 0);
            return Ok(());
        };
        let freed: Vec<_> = live.drain(..whole).collect();
        prop_assert_eq!(rel.count, freed.len());
        prop_assert_eq!(rel.first, freed[0].lsn);
        let bytes: u64 = freed.iter().map(|r| r.pad_before + r.len).sum();
        prop_assert_eq!(rel.bytes, bytes);
        prop_assert_eq!(
            rel.checkpoint_pos,
            live.front().map_or(ring.head(), |r| r.pos)
        );
        prop_assert_eq!(
            rel.checkpoint_lsn,
            live.front().map_or(ring.next_lsn(), |r| r.lsn)
        );
        prop_assert_eq!(ring.checkpoint_floor(to), rel.checkpoint_lsn);
        ring.release(&rel);
        Ok(())
    }

    proptest! {
        #[test]
        fn reservations_never_overlap_and_releases_match(
            head in 0u64..AREA / BLOCK,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut ring = Ring::new(AREA, head * BLOCK, Lsn(1));
            let mut live: VecDeque<Reservation> = VecDeque::new();
            let mut next_lsn = Lsn(1);
            for s in steps {
                match s {
                    Step::Reserve(blocks, batched) => {
                        let l = layout(blocks, batched);
                        let Some(r) = ring.try_reserve(l, (0, blocks), false) else {
                            // Refused only when the record (and its pad and header) do not fit.
                            let need = match place(AREA, ring.head(), ring.open_batch().as_ref(), l, ring.batch_limit) {
                                Place::Join => align_up(blocks * BLOCK),
                                Place::Open { pad_before, .. } => pad_before + entry_len(l),
                            };
                            prop_assert!(ring.used() + need > AREA);
                            continue;
                        };
                        prop_assert_eq!(r.lsn, next_lsn, "LSNs are gap-free");
                        next_lsn = next_lsn.next();
                        check_reserved(r, &mut live)?;
                    }
                    Step::Seal => ring.seal_through(Lsn(next_lsn.0.saturating_sub(1))),
                    Step::Release(n) => {
                        ring.seal_through(Lsn(next_lsn.0.saturating_sub(1)));
                        check_release(&mut ring, n, &mut live)?;
                    }
                    Step::Rebase => {
                        if live.is_empty() {
                            next_lsn = Lsn(next_lsn.0 + 10);
                            ring.rebase(next_lsn);
                        }
                    }
                }
                let live_bytes: u64 = live.iter().map(|r| r.pad_before + r.len).sum();
                prop_assert_eq!(ring.used(), live_bytes);
                prop_assert!(ring.used() <= AREA);
                ring.check();
            }
        }
    }
}
