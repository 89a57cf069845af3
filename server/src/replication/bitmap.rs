//! The persistent out-of-sync bitmap a primary keeps for each replica.
//!
//! One bit per [`REGION`] of the volume: set when the replica may lack a
//! write in that region that the primary's journal no longer holds (so
//! catch-up from the journal cannot deliver it). Bits are set *before* the
//! journal lets go of the records (checkpoint, start-up replay) and cleared
//! only after the replica reports the region durable, so a crash of either
//! side can cost extra resync work but never a missed region.
//!
//! A bitmap is only trusted for the epoch it was written in (`epoch`) and
//! only once it is `valid`: it was based on a handshake that knew the
//! replica's state (a full resync sets every bit, a consistent replica that
//! could catch up clears them all). A new primary (new epoch) starts with an
//! invalid bitmap, and an invalid bitmap means "resync everything by
//! checksum".
//!
//! On disk: `<journal>.oos-<peer>`, two slots of whole 4 KiB blocks, written
//! alternately (a torn write leaves the other slot intact), each
//!
//! ```text
//! 0   magic "MBOOSBM1"     8
//! 8   generation  u64      higher wins
//! 16  epoch       u64
//! 24  volume size u64
//! 32  region size u64
//! 40  regions     u64
//! 48  flags       u64      bit 0: valid
//! 56  xxh3-64 of bytes 0..56 and the bits
//! 64  bits, little-endian u64 words
//! ```

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of volume one bit stands for.
pub const REGION: u64 = 1 << 20;

const MAGIC: &[u8; 8] = b"MBOOSBM1";
const HEADER: usize = 64;
const BLOCK: usize = 4096;

/// A replica's out-of-sync regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSync {
    path: PathBuf,
    volume_size: u64,
    epoch: u64,
    valid: bool,
    words: Vec<u64>,
    regions: usize,
    generation: u64,
    /// The in-memory bits differ from the newest slot on disk.
    dirty: bool,
}

/// Where the bitmap of `peer` for the volume whose journal is `journal` lives.
pub fn path_for(journal: &Path, peer: &str) -> PathBuf {
    let mut name = journal.as_os_str().to_os_string();
    name.push(".oos-");
    name.push(peer);
    PathBuf::from(name)
}

/// Number of regions of a volume of `size` bytes.
pub fn regions_of(size: u64) -> usize {
    size.div_ceil(REGION) as usize
}

impl OutOfSync {
    /// An empty, not yet valid bitmap for a volume of `volume_size` bytes in
    /// `epoch`, to be stored at `path`.
    pub fn new(path: PathBuf, volume_size: u64, epoch: u64) -> OutOfSync {
        let regions = regions_of(volume_size);
        OutOfSync {
            path,
            volume_size,
            epoch,
            valid: false,
            words: vec![0; regions.div_ceil(64)],
            regions,
            generation: 0,
            dirty: false,
        }
    }

    /// Loads the bitmap at `path`. A missing file, one of another epoch or
    /// volume size, or one whose slots are both damaged gives an empty,
    /// invalid bitmap (the safe answer: the next handshake resyncs by
    /// checksum); only I/O errors other than "not found" fail.
    pub fn load(path: PathBuf, volume_size: u64, epoch: u64) -> io::Result<OutOfSync> {
        OutOfSync::load_inner(path, volume_size, Some(epoch)).map(|(b, _)| b)
    }

    /// Loads the bitmap at `path` whatever its epoch (start-up replay marks
    /// before the epoch is known); None when there is no readable bitmap.
    pub fn load_existing(path: PathBuf, volume_size: u64) -> io::Result<Option<OutOfSync>> {
        OutOfSync::load_inner(path, volume_size, None).map(|(b, found)| found.then_some(b))
    }

    fn load_inner(
        path: PathBuf,
        volume_size: u64,
        epoch: Option<u64>,
    ) -> io::Result<(OutOfSync, bool)> {
        let mut fresh = OutOfSync::new(path, volume_size, epoch.unwrap_or(0));
        let file = match std::fs::File::open(&fresh.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((fresh, false)),
            Err(e) => return Err(e),
        };
        let slot = fresh.slot_len();
        let mut best: Option<(u64, u64, bool, Vec<u64>)> = None;
        for i in 0..2u64 {
            let mut buf = vec![0u8; slot];
            if file.read_exact_at(&mut buf, i * slot as u64).is_err() {
                continue;
            }
            if let Some((generation, e, valid, words)) = fresh.decode(&buf) {
                if epoch.is_none_or(|want| want == e)
                    && best.as_ref().is_none_or(|b| generation > b.0)
                {
                    best = Some((generation, e, valid, words));
                }
                fresh.generation = fresh.generation.max(generation);
            }
        }
        let found = best.is_some();
        if let Some((_, e, valid, words)) = best {
            fresh.epoch = e;
            fresh.valid = valid;
            fresh.words = words;
        }
        Ok((fresh, found))
    }

    fn slot_len(&self) -> usize {
        (HEADER + self.words.len() * 8).div_ceil(BLOCK) * BLOCK
    }

    fn decode(&self, b: &[u8]) -> Option<(u64, u64, bool, Vec<u64>)> {
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC
            || u(24) != self.volume_size
            || u(32) != REGION
            || u(40) != self.regions as u64
        {
            return None;
        }
        let end = HEADER + self.words.len() * 8;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&b[0..56]);
        h.update(&b[HEADER..end]);
        if h.digest() != u(56) {
            return None;
        }
        let words = (0..self.words.len()).map(|w| u(HEADER + w * 8)).collect();
        Some((u(8), u(16), u(48) & 1 == 1, words))
    }

    /// The next slot image to write (generation + 1) and where it goes.
    fn encode_next(&mut self) -> (Vec<u8>, u64) {
        self.generation += 1;
        let mut b = vec![0u8; self.slot_len()];
        b[0..8].copy_from_slice(MAGIC);
        for (i, v) in [
            self.generation,
            self.epoch,
            self.volume_size,
            REGION,
            self.regions as u64,
            u64::from(self.valid),
        ]
        .into_iter()
        .enumerate()
        {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        for (i, w) in self.words.iter().enumerate() {
            b[HEADER + i * 8..HEADER + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&b[0..56]);
        h.update(&b[HEADER..HEADER + self.words.len() * 8]);
        b[56..64].copy_from_slice(&h.digest().to_le_bytes());
        let pos = (self.generation % 2) * self.slot_len() as u64;
        self.dirty = false;
        (b, pos)
    }

    /// Writes the bitmap durably (write + fdatasync of one slot). Blocking:
    /// used at start-up, and on a core for a few KiB at handshakes and
    /// checkpoints of a volume whose replica is away.
    pub fn persist(&mut self) -> io::Result<()> {
        let (image, pos) = self.encode_next();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)?;
        let r = f.write_all_at(&image, pos).and_then(|()| f.sync_data());
        if r.is_err() {
            self.dirty = true;
        }
        r
    }

    /// Persists only if something changed since the last write.
    pub fn persist_if_dirty(&mut self) -> io::Result<()> {
        if self.dirty {
            self.persist()
        } else {
            Ok(())
        }
    }

    /// Where the bitmap lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the bits can be trusted (see the module docs).
    pub fn is_valid(&self) -> bool {
        self.valid
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.regions
    }

    /// Whether region `i` is set.
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.regions, "region {i} beyond {}", self.regions);
        self.words[i / 64] >> (i % 64) & 1 == 1
    }

    /// Sets region `i`; true if it was clear.
    pub fn set(&mut self, i: usize) -> bool {
        assert!(i < self.regions, "region {i} beyond {}", self.regions);
        let was = self.get(i);
        self.words[i / 64] |= 1 << (i % 64);
        self.dirty |= !was;
        !was
    }

    /// Clears region `i`.
    pub fn clear(&mut self, i: usize) {
        assert!(i < self.regions, "region {i} beyond {}", self.regions);
        if self.get(i) {
            self.words[i / 64] &= !(1 << (i % 64));
            self.dirty = true;
        }
    }

    /// Sets every region `[offset, offset + len)` touches; true if any was clear.
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut changed = false;
        for i in self.regions_touched(offset, len) {
            changed |= self.set(i);
        }
        changed
    }

    /// The regions `[offset, offset + len)` touches (none past the volume).
    pub fn regions_touched(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.volume_size {
            return 0..0;
        }
        let first = (offset / REGION) as usize;
        let last = ((offset + len - 1).min(self.volume_size - 1) / REGION) as usize;
        first..last + 1
    }

    /// The volume is `volume_size` bytes from now on (a resize record):
    /// regions past a shrunk end are dropped, new ones start clear (a grow
    /// zeroes its new part on every node before its record is written, and
    /// every write after it is marked as usual). The next persist writes the
    /// new layout; until then a crash leaves a bitmap of the old size,
    /// which loads as invalid (a full checksum resync: safe).
    pub fn resize(&mut self, volume_size: u64) {
        if volume_size == self.volume_size {
            return;
        }
        let regions = regions_of(volume_size);
        let mut words = vec![0u64; regions.div_ceil(64)];
        for i in 0..regions.min(self.regions) {
            if self.words[i / 64] & (1 << (i % 64)) != 0 {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        self.words = words;
        self.regions = regions;
        self.volume_size = volume_size;
        self.dirty = true;
    }

    /// Every region out of sync, valid from now on (a full resync).
    pub fn set_all(&mut self) {
        for i in 0..self.regions {
            self.set(i);
        }
        if !self.valid {
            self.valid = true;
            self.dirty = true;
        }
    }

    /// No region out of sync, valid from now on (the replica is exact).
    pub fn clear_all(&mut self) {
        for i in 0..self.regions {
            self.clear(i);
        }
        if !self.valid {
            self.valid = true;
            self.dirty = true;
        }
    }

    /// The first set region at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        let mut i = from;
        while i < self.regions {
            let w = self.words[i / 64] >> (i % 64);
            if w != 0 {
                let j = i + w.trailing_zeros() as usize;
                return (j < self.regions).then_some(j);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Number of set regions.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Bytes of the volume in set regions.
    pub fn bytes(&self) -> u64 {
        let Some(last) = self.regions.checked_sub(1) else {
            return 0;
        };
        let short = if self.get(last) {
            REGION - self.region_len(last)
        } else {
            0
        };
        self.count() as u64 * REGION - short
    }

    /// Length of region `i` (the last one may be short).
    pub fn region_len(&self, i: usize) -> u64 {
        REGION.min(self.volume_size - i as u64 * REGION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mirrorblk-oos-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn marks_cover_every_touched_region() {
        let mut b = OutOfSync::new(tmp("marks"), 10 * REGION + 4096, 1);
        assert_eq!(b.regions(), 11);
        assert!(b.mark(REGION - 512, 1024));
        assert!(b.get(0) && b.get(1) && !b.get(2));
        assert!(!b.mark(REGION, 10), "already set");
        assert!(b.mark(10 * REGION, 4096));
        assert_eq!(b.next_set(2), Some(10));
        assert_eq!(b.region_len(10), 4096);
        assert_eq!(b.bytes(), 2 * REGION + 4096);
        assert!(!b.mark(11 * REGION, 10), "beyond the volume");
        b.clear(1);
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn a_resize_keeps_the_marks_inside_both_sizes_and_persists_the_new_layout() {
        let p = tmp("resize");
        let mut b = OutOfSync::new(p.clone(), 100 * REGION, 2);
        b.clear_all();
        b.mark(3 * REGION, 1);
        b.mark(99 * REGION, 1);
        b.resize(300 * REGION);
        assert_eq!(b.regions(), 300);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(99));
        assert_eq!(b.next_set(100), None, "grown regions start clear");
        assert!(b.mark(250 * REGION, 1), "the grown part can be marked");
        b.persist().unwrap();
        let loaded = OutOfSync::load(p.clone(), 300 * REGION, 2).unwrap();
        assert!(loaded.is_valid());
        assert_eq!(loaded.next_set(100), Some(250));
        assert!(
            !OutOfSync::load(p.clone(), 100 * REGION, 2)
                .unwrap()
                .is_valid(),
            "a bitmap of another size is not trusted"
        );
        b.resize(50 * REGION);
        assert_eq!(b.regions(), 50);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), None, "regions past a shrunk end are gone");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn survives_a_restart_and_a_torn_slot() {
        let p = tmp("persist");
        let mut b = OutOfSync::new(p.clone(), 200 * REGION, 3);
        b.clear_all();
        b.mark(5 * REGION, 1);
        b.persist().unwrap();
        b.mark(150 * REGION, 1);
        b.persist().unwrap();
        let loaded = OutOfSync::load(p.clone(), 200 * REGION, 3).unwrap();
        assert!(loaded.is_valid());
        assert_eq!(loaded.next_set(0), Some(5));
        assert_eq!(loaded.next_set(6), Some(150));
        // Tear the newest slot: the older one (without region 150) wins.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let slot = loaded.slot_len() as u64;
        f.write_all_at(&[0xff; 16], (b.generation % 2) * slot + 64)
            .unwrap();
        let older = OutOfSync::load(p.clone(), 200 * REGION, 3).unwrap();
        assert_eq!(older.count(), 1);
        // The next write replaces the torn slot and is the newest.
        let mut again = older;
        again.mark(7 * REGION, 1);
        again.persist().unwrap();
        let newest = OutOfSync::load(p.clone(), 200 * REGION, 3).unwrap();
        assert_eq!(
            newest,
            OutOfSync {
                dirty: false,
                ..again
            }
        );
        // Another epoch's bitmap is not trusted.
        let other = OutOfSync::load(p.clone(), 200 * REGION, 4).unwrap();
        assert!(!other.is_valid() && other.count() == 0);
        let _ = std::fs::remove_file(&p);
    }

    proptest! {
        #[test]
        fn next_set_finds_exactly_the_set_bits(bits in proptest::collection::btree_set(0usize..300, 0..40)) {
            let mut b = OutOfSync::new(tmp("prop"), 300 * REGION, 1);
            for &i in &bits {
                b.set(i);
            }
            let mut found = Vec::new();
            let mut i = 0;
            while let Some(j) = b.next_set(i) {
                found.push(j);
                i = j + 1;
            }
            prop_assert_eq!(found, bits.into_iter().collect::<Vec<_>>());
        }
    }
}
