//! The in-memory map of journaled but not yet applied extents.
//!
//! Reads consult it before the data store so they always see the newest
//! acknowledged write. Entries never overlap; a newer record replaces the
//! parts of older entries it covers. An entry is removed when the applier has
//! written its record to the store — only the parts still carrying that
//! record's LSN, since newer records may have replaced the rest.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::buffer::Payload;
use crate::units::Lsn;

/// Where the newest bytes of an extent are.
#[derive(Clone)]
pub enum Source {
    /// In a write's payload, starting at byte `at` of it.
    Data {
        /// The payload.
        payload: Rc<Payload>,
        /// Payload offset of the extent's first byte.
        at: usize,
    },
    /// The extent reads as zeroes (trim or write-zeroes).
    Zero,
}

#[derive(Clone)]
struct Entry {
    end: u64,
    lsn: Lsn,
    src: Source,
}

/// A piece of a lookup: `[start, end)` comes from `src`.
#[derive(Clone)]
pub struct Piece {
    /// Volume offset of the first byte.
    pub start: u64,
    /// Volume offset past the last byte.
    pub end: u64,
    /// The record its bytes come from.
    pub lsn: Lsn,
    /// Where its bytes are.
    pub src: Source,
}

/// Non-overlapping extents keyed by start offset.
#[derive(Default)]
pub struct Overlay {
    map: BTreeMap<u64, Entry>,
    bytes: u64,
}

fn shift(src: &Source, by: u64) -> Source {
    match src {
        Source::Data { payload, at } => Source::Data {
            payload: payload.clone(),
            at: at + by as usize,
        },
        Source::Zero => Source::Zero,
    }
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Overlay {
        Overlay::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Cuts `[start, end)` out of every entry, keeping the parts outside it.
    fn carve(&mut self, start: u64, end: u64) {
        // The entry starting before `start` may reach into the range.
        let mut touched: Vec<u64> = Vec::new();
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                touched.push(s);
            }
        }
        touched.extend(self.map.range(start..end).map(|(&s, _)| s));
        for s in touched {
            let e = self.map.remove(&s).expect("entry exists");
            self.bytes -= e.end - s;
            if s < start {
                self.bytes += start - s;
                self.map.insert(
                    s,
                    Entry {
                        end: start,
                        lsn: e.lsn,
                        src: e.src.clone(),
                    },
                );
            }
            if e.end > end {
                self.bytes += e.end - end;
                self.map.insert(
                    end,
                    Entry {
                        end: e.end,
                        lsn: e.lsn,
                        src: shift(&e.src, end - s),
                    },
                );
            }
        }
    }

    /// Records that `[start, end)` now comes from `src` (a newer LSN than anything present).
    pub fn insert(&mut self, start: u64, end: u64, lsn: Lsn, src: Source) {
        if start >= end {
            return;
        }
        self.carve(start, end);
        self.bytes += end - start;
        self.map.insert(start, Entry { end, lsn, src });
    }

    /// Removes the parts of `[start, end)` that still belong to `lsn`.
    pub fn remove(&mut self, start: u64, end: u64, lsn: Lsn) {
        let mut keys: Vec<u64> = Vec::new();
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if e.end > start && e.lsn == lsn {
                keys.push(s);
            }
        }
        keys.extend(
            self.map
                .range(start..end)
                .filter(|(_, e)| e.lsn == lsn)
                .map(|(&s, _)| s),
        );
        for s in keys {
            // Entries of one record lie inside its range, so no splitting is needed.
            let e = self.map.remove(&s).expect("entry exists");
            debug_assert!(
                s >= start && e.end <= end,
                "entry of LSN {lsn} outside its record"
            );
            self.bytes -= e.end - s;
        }
    }

    /// The pieces overlapping `[start, end)`, clipped to it, in order.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                out.push(Piece {
                    start,
                    end: e.end.min(end),
                    lsn: e.lsn,
                    src: shift(&e.src, start - s),
                });
            }
        }
        for (&s, e) in self.map.range(start..end) {
            out.push(Piece {
                start: s,
                end: e.end.min(end),
                lsn: e.lsn,
                src: e.src.clone(),
            });
        }
        out
    }

    /// The newest LSN of any entry overlapping `[start, end)`, if any.
    pub fn newest(&self, start: u64, end: u64) -> Option<Lsn> {
        if start >= end {
            return None;
        }
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, e)| e.end > start)
            .map(|(_, e)| e.lsn);
        self.map
            .range(start..end)
            .map(|(_, e)| e.lsn)
            .chain(before)
            .max()
    }

    /// Whether any entry overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                return true;
            }
        }
        self.map.range(start..end).next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference model: one Option<(lsn, value-tag)> per byte.
    fn model_apply(m: &mut [Option<(u64, u64)>], s: u64, e: u64, lsn: u64) {
        for (i, slot) in m.iter_mut().enumerate().take(e as usize).skip(s as usize) {
            *slot = Some((lsn, i as u64 - s));
        }
    }

    proptest! {
        #[test]
        fn overlay_matches_byte_model(ops in proptest::collection::vec((0u64..200, 1u64..60, any::<bool>()), 1..60)) {
            let mut ov = Overlay::new();
            let mut model: Vec<Option<(u64, u64)>> = vec![None; 300];
            let mut live: Vec<(u64, u64, u64)> = Vec::new();
            for (i, (s, len, remove_oldest)) in ops.into_iter().enumerate() {
                let lsn = i as u64 + 1;
                let e = s + len;
                ov.insert(s, e, Lsn(lsn), Source::Zero);
                model_apply(&mut model, s, e, lsn);
                live.push((s, e, lsn));
                if remove_oldest && !live.is_empty() {
                    let (rs, re, rl) = live.remove(0);
                    ov.remove(rs, re, Lsn(rl));
                    for slot in model.iter_mut().take(re as usize).skip(rs as usize) {
                        if matches!(slot, Some((l, _)) if *l == rl) { *slot = None; }
                    }
                }
                // Compare coverage byte by byte.
                let mut covered = vec![false; 300];
                for p in ov.lookup(0, 300) {
                    prop_assert!(p.start < p.end);
                    for c in covered.iter_mut().take(p.end as usize).skip(p.start as usize) {
                        prop_assert!(!*c, "overlapping pieces");
                        *c = true;
                    }
                }
                for (b, slot) in model.iter().enumerate() {
                    prop_assert_eq!(covered[b], slot.is_some(), "byte {}", b);
                }
                let total: u64 = model.iter().filter(|x| x.is_some()).count() as u64;
                prop_assert_eq!(ov.bytes(), total);
            }
        }
    }

    #[test]
    fn lookup_clips_and_shifts() {
        let mut ov = Overlay::new();
        ov.insert(100, 200, Lsn(1), Source::Zero);
        ov.insert(150, 160, Lsn(2), Source::Zero);
        let ps = ov.lookup(120, 155);
        assert_eq!(
            ps.iter().map(|p| (p.start, p.end)).collect::<Vec<_>>(),
            vec![(120, 150), (150, 155)]
        );
        ov.remove(100, 200, Lsn(1));
        assert_eq!(
            ov.lookup(0, 1000)
                .iter()
                .map(|p| (p.start, p.end))
                .collect::<Vec<_>>(),
            vec![(150, 160)]
        );
        assert!(ov.overlaps(159, 170));
        assert!(!ov.overlaps(160, 170));
    }
}
