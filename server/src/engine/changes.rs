//! Changed-block tracking: for every 64 KiB region of a volume, the LSN of
//! the last record that changed it. "What changed since LSN X" is then the
//! regions whose LSN is above X, whichever node asks: LSNs are the same on
//! the primary and on every replica, and the table is keyed by the volume's
//! UUID, so an incremental backup chain goes on after a failover.
//!
//! The table never goes inconsistent: it is persisted (whole, atomically:
//! temporary file, fsync, rename) at a checkpoint, recording the LSN it is
//! complete up to, and the journal is never released past that LSN; after a
//! crash, recovery marks every replayed record again. A table that is
//! missing, damaged or of another volume is replaced by an empty one whose
//! *floor* says which LSNs it cannot answer for: a query older than the
//! floor answers "everything" and says it is not complete. It over-reports
//! (a region is reported when any change may have touched it), never
//! under-reports.
//!
//! This module is the table, its queries and its file format (pure), plus
//! the one function that writes the file durably.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::units::Lsn;

/// Bytes per tracked region: qemu's default dirty-bitmap granularity.
pub const REGION: u64 = 64 << 10;

const MAGIC: &[u8; 8] = b"MBCHANGE";
/// Version 2 adds the flags word ([`FLAG_BORN_ZERO`]); version 1 tables
/// still load (without the flag).
const VERSION: u32 = 2;
const VERSION_1: u32 = 1;
/// Fixed header bytes before the per-region LSNs (version 1).
const HEADER_V1: usize = 8 + 4 + 4 + 16 + 8 + 8 + 8 + 8;
/// Fixed header bytes before the per-region LSNs (version 2: a flags word).
const HEADER: usize = HEADER_V1 + 8;
/// Flags bit: the store read as zeroes everywhere when the table began, so
/// a region no record changed since is known to read as zeroes.
const FLAG_BORN_ZERO: u64 = 1;

/// Why a persisted table cannot be used (the volume then starts a new one,
/// which cannot answer for older LSNs).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    /// No table file (a volume created before changed-block tracking, or
    /// the file was removed).
    #[error("no changed-block table")]
    Missing,
    /// The file could not be read.
    #[error("cannot read the changed-block table: {0}")]
    Io(String),
    /// The file is not a table, is damaged or has an unknown version.
    #[error("the changed-block table is damaged: {0}")]
    Damaged(&'static str),
    /// The table belongs to another volume (another UUID or size).
    #[error("the changed-block table belongs to another volume ({0})")]
    OtherVolume(String),
    /// The journal was released past what the table is complete up to.
    #[error("the changed-block table is complete up to LSN {table} but the journal restarts at LSN {journal}")]
    Behind {
        /// Every record below this LSN is in the table.
        table: u64,
        /// The first record the journal still holds.
        journal: u64,
    },
}

/// The last-changed LSN of every region of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeTable {
    uuid: [u8; 16],
    size: u64,
    /// Per region: the LSN of the last record known to change it (0: none
    /// since the floor).
    last: Vec<u64>,
    /// Changes by records at or below this LSN are unknown: a query since an
    /// older LSN must answer everything.
    floor: u64,
    /// The table began (floor 0) on a store that read as zeroes everywhere
    /// (created by this volume): an unchanged region reads as zeroes.
    born_zero: bool,
}

/// The answer to "what changed since LSN X".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedRanges {
    /// False when X is older than the table's floor: `ranges` is then the
    /// whole volume.
    pub complete: bool,
    /// The oldest X the table answers exactly for.
    pub floor: u64,
    /// Sorted, merged, disjoint `(offset, length)` byte ranges.
    pub ranges: Vec<(u64, u64)>,
}

/// Number of regions covering `size` bytes.
pub fn regions(size: u64) -> usize {
    usize::try_from(size.div_ceil(REGION)).expect("region count fits in memory")
}

/// The regions `[first, end)` touched by `[offset, offset + len)`; empty for
/// an empty range.
pub fn region_span(offset: u64, len: u64) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let first = offset / REGION;
    let end = offset.saturating_add(len).div_ceil(REGION);
    (first as usize, end as usize)
}

impl ChangeTable {
    /// An empty table: nothing changed since `floor`.
    pub fn new(uuid: [u8; 16], size: u64, floor: u64) -> ChangeTable {
        ChangeTable {
            uuid,
            size,
            last: vec![0; regions(size)],
            floor,
            born_zero: false,
        }
    }

    /// An empty table for a volume whose store was just created (all
    /// zeroes) and whose journal holds no record yet.
    pub fn born_zero(uuid: [u8; 16], size: u64) -> ChangeTable {
        ChangeTable {
            born_zero: true,
            ..ChangeTable::new(uuid, size, 0)
        }
    }

    /// Calls `extent(offset, length, never_written)` for maximal runs of
    /// `[offset, offset + len)` (clipped to the volume); `never_written`
    /// runs are known to read as zeroes (no record ever changed them on a
    /// store born zero). Without that knowledge every run is `false`.
    pub fn walk_never_written(
        &self,
        offset: u64,
        len: u64,
        mut extent: impl FnMut(u64, u64, bool),
    ) {
        if !self.born_zero || self.floor != 0 {
            let end = offset.saturating_add(len).min(self.size);
            if end > offset {
                extent(offset, end - offset, false);
            }
            return;
        }
        self.walk(0, offset, len, |o, l, changed| extent(o, l, !changed));
    }

    /// The volume UUID it belongs to.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Changes at or below this LSN are unknown.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Record `lsn` changed `[offset, offset + len)`. Never lowers a
    /// region's LSN (recovery replays records the persisted table may
    /// already hold newer ones for). Bytes past the volume's end are ignored.
    pub fn mark(&mut self, offset: u64, len: u64, lsn: Lsn) {
        let (a, b) = region_span(offset, len);
        let b = b.min(self.last.len());
        for r in self.last.iter_mut().take(b).skip(a) {
            *r = (*r).max(lsn.0);
        }
    }

    /// The volume is `size` bytes from record `lsn` on (a resize): regions
    /// past a shrunk end are dropped; the grown part (and a partial last
    /// region) counts as changed by `lsn`, so a backup copies it.
    pub fn resize(&mut self, size: u64, lsn: Lsn) {
        let old = self.size;
        self.last.resize(regions(size), lsn.0);
        self.size = size;
        if size > old {
            self.mark(old, size - old, lsn);
        }
    }

    /// Starts over for another volume (a full resync from a primary of
    /// another UUID): nothing known before `floor`.
    pub fn reset(&mut self, uuid: [u8; 16], floor: u64) {
        // A table no record ever marked still describes a zero store.
        let pristine = self.floor == 0 && self.last.iter().all(|&l| l == 0);
        self.born_zero &= pristine;
        self.uuid = uuid;
        self.floor = floor;
        self.last.fill(0);
    }

    /// Whether region `i` changed after LSN `since` (true past the floor).
    fn region_changed(&self, i: usize, since: u64) -> bool {
        since < self.floor || self.last.get(i).is_some_and(|&l| l > since)
    }

    /// The byte ranges changed by records after LSN `since`, merged.
    pub fn changed_since(&self, since: u64) -> ChangedRanges {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        self.walk(since, 0, self.size, |off, len, dirty| {
            if dirty {
                ranges.push((off, len));
            }
        });
        ChangedRanges {
            complete: since >= self.floor,
            floor: self.floor,
            ranges,
        }
    }

    /// Calls `extent(offset, length, changed)` for maximal runs of
    /// `[offset, offset + len)` (clipped to the volume) that did or did not
    /// change after `since`, in order, adjacent, covering the whole range.
    pub fn walk(&self, since: u64, offset: u64, len: u64, mut extent: impl FnMut(u64, u64, bool)) {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let dirty = self.region_changed((pos / REGION) as usize, since);
            let mut next = (pos / REGION + 1) * REGION;
            while next < end && self.region_changed((next / REGION) as usize, since) == dirty {
                next += REGION;
            }
            let stop = next.min(end);
            extent(pos, stop - pos, dirty);
            pos = stop;
        }
    }

    /// The file image: the header, the per-region LSNs, an xxh3 of both.
    /// `complete_next`: every record below this LSN is in the table.
    pub fn encode(&self, complete_next: Lsn) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.last.len() * 8 + 8);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(REGION.trailing_zeros()).to_le_bytes());
        b.extend_from_slice(&self.uuid);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.floor.to_le_bytes());
        b.extend_from_slice(&complete_next.0.to_le_bytes());
        b.extend_from_slice(&(self.last.len() as u64).to_le_bytes());
        let flags = if self.born_zero { FLAG_BORN_ZERO } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        for l in &self.last {
            b.extend_from_slice(&l.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads a file image; returns the table and the LSN it is complete up
    /// to (exclusive). Checks everything before allocating.
    pub fn decode(b: &[u8]) -> Result<(ChangeTable, Lsn), LoadError> {
        let field = |at: usize| -> u64 {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        if b.len() < HEADER_V1 + 8 || &b[..8] != MAGIC {
            return Err(LoadError::Damaged("not a changed-block table"));
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let header = match word(8) {
            VERSION_1 => HEADER_V1,
            VERSION if b.len() >= HEADER + 8 => HEADER,
            _ => return Err(LoadError::Damaged("unknown version or region size")),
        };
        if u64::from(word(12)) != u64::from(REGION.trailing_zeros()) {
            return Err(LoadError::Damaged("unknown version or region size"));
        }
        let body = b.len() - 8;
        if xxhash_rust::xxh3::xxh3_64(&b[..body]) != field(body) {
            return Err(LoadError::Damaged("checksum mismatch"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let (size, floor, complete, count) = (field(32), field(40), field(48), field(56));
        let want = u64::try_from(regions(size.min(1 << 56))).unwrap_or(u64::MAX);
        if count != want || (body - header) as u64 != count * 8 {
            return Err(LoadError::Damaged("region count does not match its size"));
        }
        let flags = if header == HEADER {
            field(HEADER_V1)
        } else {
            0
        };
        let last = b[header..body]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let t = ChangeTable {
            uuid,
            size,
            last,
            floor,
            born_zero: flags & FLAG_BORN_ZERO != 0 && floor == 0,
        };
        Ok((t, Lsn(complete)))
    }
}

/// Where a volume's table lives: beside its journal.
pub fn table_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".changes");
    PathBuf::from(p)
}

/// Reads the table at `path`.
pub fn load(path: &Path) -> Result<(ChangeTable, Lsn), LoadError> {
    match std::fs::read(path) {
        Ok(b) => ChangeTable::decode(&b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LoadError::Missing),
        Err(e) => Err(LoadError::Io(format!("{}: {e}", path.display()))),
    }
}

/// The table a volume starts with: the persisted one when it belongs to this
/// volume (`uuid`, `size`) and is complete up to where the journal's replay
/// begins (`replay_from`), else an empty one that cannot answer for LSNs
/// before the replay, with the reason. A journal that starts at LSN 1 has
/// lost nothing, so its empty table answers for everything.
pub fn adopt(
    loaded: Result<(ChangeTable, Lsn), LoadError>,
    uuid: [u8; 16],
    size: u64,
    replay_from: Lsn,
) -> (ChangeTable, Lsn, Option<LoadError>) {
    let why = match loaded {
        Ok((t, _)) if t.uuid != uuid => LoadError::OtherVolume("its volume UUID differs".into()),
        Ok((t, _)) if t.size != size => {
            LoadError::OtherVolume(format!("its size is {} bytes, the volume's {size}", t.size))
        }
        Ok((_, complete)) if complete < replay_from => LoadError::Behind {
            table: complete.0,
            journal: replay_from.0,
        },
        Ok((t, complete)) => return (t, complete, None),
        Err(e) => e,
    };
    let fresh = ChangeTable::new(uuid, size, replay_from.last());
    (fresh, Lsn(0), Some(why))
}

/// Writes `image` to `path` durably and atomically: a temporary file beside
/// it, fsync, rename over, fsync of the directory. A crash leaves the old
/// table or the new one, never a mix.
pub fn write_durably(path: &Path, image: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(image)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: [u8; 16] = [7; 16];

    #[test]
    fn a_resize_reports_the_grown_part_changed_and_forgets_a_shrunk_one() {
        let r = REGION;
        let mut t = ChangeTable::new(U, 4 * r, 0);
        t.mark(r, 1, Lsn(5));
        t.resize(8 * r + 4096, Lsn(9));
        assert_eq!(t.size(), 8 * r + 4096);
        let c = t.changed_since(5);
        assert_eq!(
            c.ranges,
            vec![(4 * r, 4 * r + 4096)],
            "the grown part changed at LSN 9"
        );
        assert_eq!(t.changed_since(4).ranges[0], (r, r));
        t.resize(2 * r, Lsn(10));
        assert_eq!(
            t.changed_since(0).ranges,
            vec![(r, r)],
            "nothing past a shrunk end"
        );
    }

    #[test]
    fn region_spans_cover_exactly_the_touched_regions() {
        let r = REGION;
        for (off, len, want) in [
            (0, 0, (0, 0)),
            (0, 1, (0, 1)),
            (0, r, (0, 1)),
            (r - 1, 2, (0, 2)),
            (r, r, (1, 2)),
            (3 * r + 5, 10, (3, 4)),
            (r, 3 * r + 1, (1, 5)),
        ] {
            assert_eq!(region_span(off, len), want, "{off} {len}");
        }
        assert_eq!(regions(0), 0);
        assert_eq!(regions(1), 1);
        assert_eq!(regions(r), 1);
        assert_eq!(regions(r + 1), 2);
    }

    #[test]
    fn changed_since_reports_regions_after_the_lsn_merged() {
        let r = REGION;
        let mut t = ChangeTable::new(U, 10 * r + 100, 0);
        t.mark(0, 1, Lsn(1));
        t.mark(r + 10, 2 * r, Lsn(2)); // regions 1..=3
        t.mark(5 * r, r, Lsn(3));
        t.mark(10 * r, 50, Lsn(4)); // the short last region
        t.mark(2 * r, 1, Lsn(1)); // older: never lowers region 2
        let c = t.changed_since(0);
        assert!(c.complete);
        assert_eq!(c.ranges, vec![(0, 4 * r), (5 * r, r), (10 * r, 100)]);
        assert_eq!(
            t.changed_since(1).ranges,
            vec![(r, 3 * r), (5 * r, r), (10 * r, 100)]
        );
        assert_eq!(t.changed_since(2).ranges, vec![(5 * r, r), (10 * r, 100)]);
        assert_eq!(t.changed_since(4).ranges, vec![]);
        // Past the end: ignored.
        t.mark(100 * r, r, Lsn(9));
        assert_eq!(t.changed_since(4).ranges, vec![]);
    }

    #[test]
    fn a_query_older_than_the_floor_answers_everything_incomplete() {
        let r = REGION;
        let mut t = ChangeTable::new(U, 4 * r, 10);
        t.mark(r, 1, Lsn(11));
        let old = t.changed_since(9);
        assert!(!old.complete);
        assert_eq!(old.ranges, vec![(0, 4 * r)]);
        let exact = t.changed_since(10);
        assert!(exact.complete);
        assert_eq!(exact.ranges, vec![(r, r)]);
    }

    #[test]
    fn walk_covers_a_range_with_adjacent_runs() {
        let r = REGION;
        let mut t = ChangeTable::new(U, 8 * r, 0);
        t.mark(2 * r, 2 * r, Lsn(5));
        let mut seen = Vec::new();
        t.walk(3, r / 2, 4 * r, |o, l, d| seen.push((o, l, d)));
        assert_eq!(
            seen,
            vec![
                (r / 2, r + r / 2, false),
                (2 * r, 2 * r, true),
                (4 * r, r / 2, false)
            ]
        );
        // Clipped to the volume's end.
        seen.clear();
        t.walk(3, 7 * r, 10 * r, |o, l, d| seen.push((o, l, d)));
        assert_eq!(seen, vec![(7 * r, r, false)]);
    }

    #[test]
    fn only_a_table_born_zero_knows_never_written_regions() {
        let r = REGION;
        let runs = |t: &ChangeTable| {
            let mut seen = Vec::new();
            t.walk_never_written(0, 4 * r, |o, l, z| seen.push((o, l, z)));
            seen
        };
        let mut t = ChangeTable::born_zero(U, 4 * r);
        assert_eq!(runs(&t), vec![(0, 4 * r, true)]);
        t.mark(r + 7, 1, Lsn(3));
        assert_eq!(
            runs(&t),
            vec![(0, r, true), (r, r, false), (2 * r, 2 * r, true)]
        );
        // The flag survives the file image (and a version-1 image has none).
        let (back, _) = ChangeTable::decode(&t.encode(Lsn(4))).unwrap();
        assert_eq!(back, t);
        // A table not born zero, or one starting over on another volume
        // after a mark, knows nothing about zeroes.
        let plain = ChangeTable::new(U, 4 * r, 0);
        assert_eq!(runs(&plain), vec![(0, 4 * r, false)]);
        t.reset([9; 16], 0);
        assert_eq!(runs(&t), vec![(0, 4 * r, false)]);
        // A pristine one (a fresh replica's first resync) keeps it.
        let mut fresh = ChangeTable::born_zero(U, 4 * r);
        fresh.reset([9; 16], 0);
        assert_eq!(runs(&fresh), vec![(0, 4 * r, true)]);
    }

    #[test]
    fn a_version_1_image_loads_without_the_zero_flag() {
        let t = ChangeTable::born_zero(U, 2 * REGION);
        let mut v1 = t.encode(Lsn(1));
        // Drop the flags word and the checksum, re-stamp as version 1.
        v1.truncate(v1.len() - 8);
        v1.drain(HEADER_V1..HEADER);
        v1[8..12].copy_from_slice(&VERSION_1.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        let (back, complete) = ChangeTable::decode(&v1).unwrap();
        assert_eq!(complete, Lsn(1));
        assert_eq!(back, ChangeTable::new(U, 2 * REGION, 0));
    }

    #[test]
    fn the_file_image_round_trips_and_refuses_damage() {
        let mut t = ChangeTable::new(U, 3 * REGION + 1, 4);
        t.mark(REGION, 1, Lsn(6));
        let img = t.encode(Lsn(7));
        assert_eq!(ChangeTable::decode(&img), Ok((t.clone(), Lsn(7))));
        let mut bad = img.clone();
        bad[HEADER + 3] ^= 1;
        assert_eq!(
            ChangeTable::decode(&bad),
            Err(LoadError::Damaged("checksum mismatch"))
        );
        assert!(ChangeTable::decode(&img[..img.len() - 1]).is_err());
        assert!(ChangeTable::decode(&img[..10]).is_err());
        assert!(ChangeTable::decode(b"").is_err());
    }

    #[test]
    fn persisting_survives_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = table_path(&dir.path().join("vol.journal"));
        assert_eq!(load(&path), Err(LoadError::Missing));
        let mut t = ChangeTable::new(U, 5 * REGION, 0);
        t.mark(4 * REGION, 9, Lsn(3));
        write_durably(&path, &t.encode(Lsn(4))).expect("write");
        assert_eq!(load(&path), Ok((t, Lsn(4))));
    }

    #[test]
    fn adopting_refuses_another_volume_or_a_stale_table_and_never_under_reports() {
        let size = 4 * REGION;
        let mut own = ChangeTable::new(U, size, 0);
        own.mark(0, 1, Lsn(5));
        // Ours, complete past where replay starts: kept.
        let (t, saved, why) = adopt(Ok((own.clone(), Lsn(8))), U, size, Lsn(6));
        assert_eq!((t, saved, why), (own.clone(), Lsn(8), None));
        // Another UUID: an empty table that answers only after the replay start.
        let (t, saved, why) = adopt(Ok((own.clone(), Lsn(8))), [1; 16], size, Lsn(6));
        assert!(matches!(why, Some(LoadError::OtherVolume(_))));
        assert_eq!((t.floor(), t.uuid(), saved), (5, [1; 16], Lsn(0)));
        assert!(!t.changed_since(4).complete);
        // Another size.
        let (_, _, why) = adopt(Ok((own.clone(), Lsn(8))), U, size * 2, Lsn(6));
        assert!(matches!(why, Some(LoadError::OtherVolume(_))));
        // Complete only up to LSN 5 while the journal restarts at 6: record
        // 5 may be gone.
        let (t, _, why) = adopt(Ok((own.clone(), Lsn(5))), U, size, Lsn(6));
        assert_eq!(
            why,
            Some(LoadError::Behind {
                table: 5,
                journal: 6
            })
        );
        assert_eq!(t.floor(), 5);
        // Missing: nothing known before the replay; from LSN 1, everything.
        let (t, _, why) = adopt(Err(LoadError::Missing), U, size, Lsn(9));
        assert_eq!((t.floor(), why), (8, Some(LoadError::Missing)));
        let (t, _, _) = adopt(Err(LoadError::Missing), U, size, Lsn(1));
        assert_eq!(t.floor(), 0);
        assert!(t.changed_since(0).complete);
    }
}
