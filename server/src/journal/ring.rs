//! The journal's space and LSN ring: which area bytes and which LSNs are
//! taken, and what a checkpoint gives back. Pure arithmetic, no I/O, so its
//! rules are checked in milliseconds; [`Journal`](super::Journal) is the I/O
//! shell around it.
//!
//! The area is circular. Records are reserved at `head`, in LSN order; a
//! record that does not fit before the end of the area is preceded by a pad
//! to the end and starts at offset 0. `used` counts every byte from the
//! oldest retained record (pads included) to `head`, so a reservation fits
//! exactly when `used` stays within the area, and reservations never
//! overlap. Space comes back only oldest first, by a checkpoint.

use std::collections::VecDeque;

use crate::units::{Lsn, BLOCK};

/// Where a record not yet released sits in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Its LSN.
    pub lsn: Lsn,
    /// Area offset of its header.
    pub pos: u64,
    /// Journal bytes it holds (padding before it included).
    pub reserved: u64,
    /// Volume bytes it changes (`offset`, `length`).
    pub extent: (u64, u64),
    /// A large write that may have gone to the store in place: its payload
    /// may not be in the journal (catch-up cannot read it back).
    pub in_place: bool,
}

/// A record's place in the ring, as reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Its LSN: the one after the previous reservation's.
    pub lsn: Lsn,
    /// Area offset of its header.
    pub pos: u64,
    /// Bytes of padding just before it (up to the end of the area), 0 if none.
    pub pad_before: u64,
    /// Journal bytes of the record itself.
    pub record_len: u64,
}

/// What a checkpoint to some LSN gives back (see [`Ring::plan_release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The oldest record released.
    pub first: Lsn,
    /// Records released.
    pub count: usize,
    /// Journal bytes released (their pads included).
    pub bytes: u64,
    /// Area offset of the oldest record kept (or of the head, if none is):
    /// where recovery starts after this checkpoint.
    pub checkpoint_pos: u64,
}

/// The space and LSN ring of a journal's record area.
#[derive(Debug)]
pub struct Ring {
    area_len: u64,
    /// Next area offset to reserve.
    head: u64,
    /// Reserved, not yet released bytes.
    used: u64,
    /// Next LSN to assign.
    next_lsn: Lsn,
    /// Every record not yet released, oldest first, contiguous in LSN.
    retained: VecDeque<Retained>,
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
            head,
            used: 0,
            next_lsn,
            retained: VecDeque::new(),
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

    /// Takes the next LSN and `record_len` bytes at the head (after a pad
    /// when the record does not fit before the end of the area), or None
    /// when the area has no room. `extent` is the volume range the record
    /// changes; `in_place` marks a write that may bypass the journal.
    pub fn try_reserve(
        &mut self,
        record_len: u64,
        extent: (u64, u64),
        in_place: bool,
    ) -> Option<Reservation> {
        assert!(
            record_len >= BLOCK && record_len % BLOCK == 0,
            "record of {record_len} bytes is not a whole number of blocks"
        );
        assert!(
            record_len <= self.area_len / 2,
            "record larger than half the journal"
        );
        let pad_before = if self.head + record_len > self.area_len {
            self.area_len - self.head
        } else {
            0
        };
        if self.used + pad_before + record_len > self.area_len {
            return None;
        }
        let pos = if pad_before > 0 { 0 } else { self.head };
        let lsn = self.next_lsn;
        if let Some(last) = self.retained.back() {
            assert_eq!(last.lsn.next(), lsn, "retained LSNs have a gap");
        }
        self.next_lsn = lsn.next();
        self.used += pad_before + record_len;
        self.head = (pos + record_len) % self.area_len;
        self.retained.push_back(Retained {
            lsn,
            pos,
            reserved: pad_before + record_len,
            extent,
            in_place,
        });
        assert!(self.used <= self.area_len, "journal space overcommitted");
        Some(Reservation {
            lsn,
            pos,
            pad_before,
            record_len,
        })
    }

    /// What a checkpoint to `next` would release: every retained record
    /// below it. None when that is none. Changes nothing: the caller
    /// persists the checkpoint, then calls [`Ring::release`].
    pub fn plan_release(&self, next: Lsn) -> Option<Release> {
        let first = self.retained.front()?.lsn;
        let count = self.retained.iter().take_while(|r| r.lsn < next).count();
        if count == 0 {
            return None;
        }
        assert!(
            next <= self.next_lsn,
            "checkpoint past the last assigned LSN"
        );
        let bytes = self.retained.iter().take(count).map(|r| r.reserved).sum();
        let checkpoint_pos = self.retained.get(count).map_or(self.head, |r| r.pos);
        Some(Release {
            first,
            count,
            bytes,
            checkpoint_pos,
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
        self.used -= rel.bytes;
        self.retained.drain(..rel.count);
    }

    /// Forgets every record and continues the LSN sequence at `start` from
    /// the current head (a replica taking a full resync).
    pub fn rebase(&mut self, start: Lsn) {
        self.next_lsn = start;
        self.retained.clear();
        self.used = 0;
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
        for r in &self.retained {
            assert_eq!(Some(r.lsn), lsn, "retained LSNs have a gap");
            assert!(r.pos % BLOCK == 0 && r.reserved % BLOCK == 0);
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

    #[test]
    fn a_record_that_does_not_fit_before_the_end_wraps_after_a_pad() {
        let mut ring = Ring::new(AREA, 13 * BLOCK, Lsn(5));
        let r = ring.try_reserve(4 * BLOCK, (0, 1), false).unwrap();
        assert_eq!((r.lsn, r.pos, r.pad_before), (Lsn(5), 0, 3 * BLOCK));
        assert_eq!((ring.used(), ring.head()), (7 * BLOCK, 4 * BLOCK));
        ring.check();
    }

    #[test]
    fn a_record_ending_at_the_end_of_the_area_moves_the_head_to_0() {
        let mut ring = Ring::new(AREA, 12 * BLOCK, Lsn(1));
        let r = ring.try_reserve(4 * BLOCK, (0, 1), false).unwrap();
        assert_eq!((r.pos, r.pad_before, ring.head()), (12 * BLOCK, 0, 0));
        ring.check();
    }

    #[test]
    fn a_full_ring_refuses_until_a_release() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        for _ in 0..2 {
            ring.try_reserve(8 * BLOCK, (0, 1), false).unwrap();
        }
        assert_eq!(ring.try_reserve(BLOCK, (0, 1), false), None);
        let rel = ring.plan_release(Lsn(2)).unwrap();
        assert_eq!(
            (rel.count, rel.bytes, rel.checkpoint_pos),
            (1, 8 * BLOCK, 8 * BLOCK)
        );
        ring.release(&rel);
        assert_eq!(ring.try_reserve(BLOCK, (0, 1), false).unwrap().lsn, Lsn(3));
        ring.check();
    }

    #[test]
    #[should_panic(expected = "release out of order")]
    fn a_release_twice_is_refused() {
        let mut ring = Ring::new(AREA, 0, Lsn(1));
        ring.try_reserve(BLOCK, (0, 1), false).unwrap();
        ring.try_reserve(BLOCK, (0, 1), false).unwrap();
        let rel = ring.plan_release(Lsn(2)).unwrap();
        ring.release(&rel);
        ring.release(&rel);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Reserve a record of this many blocks.
        Reserve(u64),
        /// Checkpoint past this many of the oldest live records.
        Release(usize),
        /// A replica's rebase (only when nothing is live).
        Rebase,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u64..=AREA / BLOCK / 2).prop_map(Step::Reserve),
            2 => (0usize..6).prop_map(Step::Release),
            1 => Just(Step::Rebase),
        ]
    }

    /// Area bytes a reservation covers: its pad, then the record.
    fn spans(r: &Reservation) -> Vec<(u64, u64)> {
        let mut v = vec![(r.pos, r.pos + r.record_len)];
        if r.pad_before > 0 {
            v.push((AREA - r.pad_before, AREA));
        }
        v
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
                    Step::Reserve(blocks) => {
                        let Some(r) = ring.try_reserve(blocks * BLOCK, (0, blocks), false) else {
                            // Refused only when the record and its pad do not fit.
                            let pad = if ring.head() + blocks * BLOCK > AREA { AREA - ring.head() } else { 0 };
                            prop_assert!(ring.used() + pad + blocks * BLOCK > AREA);
                            continue;
                        };
                        prop_assert_eq!(r.lsn, next_lsn, "LSNs are gap-free");
                        next_lsn = next_lsn.next();
                        prop_assert!(r.pos % BLOCK == 0 && r.pos + r.record_len <= AREA);
                        for (a, b) in spans(&r) {
                            for old in &live {
                                for (c, d) in spans(old) {
                                    prop_assert!(b <= c || d <= a, "{:?} overlaps {:?}", r, old);
                                }
                            }
                        }
                        live.push_back(r);
                    }
                    Step::Release(n) => {
                        let n = n.min(live.len());
                        let to = live.get(n).map_or(ring.next_lsn(), |r| r.lsn);
                        let Some(rel) = ring.plan_release(to) else {
                            prop_assert_eq!(n, 0);
                            continue;
                        };
                        let freed: Vec<_> = live.drain(..n).collect();
                        prop_assert_eq!(rel.count, freed.len());
                        prop_assert_eq!(rel.first, freed[0].lsn);
                        let bytes: u64 = freed.iter().map(|r| r.pad_before + r.record_len).sum();
                        prop_assert_eq!(rel.bytes, bytes);
                        prop_assert_eq!(rel.checkpoint_pos, live.front().map_or(ring.head(), |r| r.pos));
                        ring.release(&rel);
                    }
                    Step::Rebase => {
                        if live.is_empty() {
                            next_lsn = Lsn(next_lsn.0 + 10);
                            ring.rebase(next_lsn);
                        }
                    }
                }
                let live_bytes: u64 = live.iter().map(|r| r.pad_before + r.record_len).sum();
                prop_assert_eq!(ring.used(), live_bytes);
                prop_assert!(ring.used() <= AREA);
                ring.check();
            }
        }
    }
}
