//! The on-disk form of a snapshot: its side file `JOURNAL.snap-NAME`, which
//! describes itself, so a restart (clean, `kill -9`, or a live hand-over)
//! rebuilds the snapshot from the file alone.
//!
//! Layout (little-endian; every offset a multiple of 4 KiB, so the file
//! takes `O_DIRECT` I/O):
//!
//! ```text
//! [0, 4 KiB)        header copy A ┐ the valid copy with the higher
//! [4 KiB, 8 KiB)    header copy B ┘ generation wins (a torn rewrite keeps the other)
//! [8 KiB, D)        map: one 32-byte entry per slot, slot i at 8 KiB + 32 i
//! [D + i·64 KiB)    slot i: the old data of one 64 KiB region
//! ```
//!
//! `D` is the map's end rounded up to a region: the map has room for
//! `space / 64 KiB` slots (the space bound), so slot positions never move.
//!
//! A header holds the format magic and version, a generation, the volume's
//! UUID, the snapshot's name, its start LSN (the first LSN not in it), its
//! size, its space bound, its creation time, a random `nonce`, `sealed` (how
//! many map entries are known durable) and a state (ok, broken with a
//! reason, or deleted), checked by an xxh3 over the block.
//!
//! A map entry is `region, lsn, data_hash, check`: the region kept in that
//! slot, the LSN of the record whose overwrite made it kept, the xxh3 of the
//! kept bytes, and an xxh3 of the rest, the slot index and the file's nonce
//! (so an entry moved, or left from another file, does not check). An
//! all-zero entry is free. Entries are used in slot order.
//!
//! The crash rule: the applier writes a run's old data and its map entries,
//! then `fdatasync`s the side file, and only then lets the batch's records
//! overwrite the store. Before the journal checkpoint moves, the header is
//! rewritten with `sealed` = the slots used (every entry below it is
//! durable, and the records that overwrote those regions may leave the
//! journal). At start-up:
//!
//! - an entry below `sealed` that does not check, or a bad header, a header
//!   of another volume, two entries for one region: the snapshot is broken
//!   (listed, reads fail with EIO, its file kept until `snapshot delete`);
//! - from `sealed` on, entries are kept while they check and their data
//!   matches `data_hash`; the first that does not ends the map (a batch torn
//!   by the crash: its `fdatasync` did not finish, so the store was not
//!   overwritten there, and the records that would have are still in the
//!   journal: replay keeps those regions again). The map past it is zeroed.
//!
//! A broken snapshot's header is rewritten with its reason before anything
//! else happens (so a crash cannot bring it back readable) and its map and
//! data are cut off; a deleted one's header says deleted before the file is
//! removed (a start-up finding such a file removes it).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::snapshot::{valid_name, REGION};
use crate::buffer::AlignedBuf;
use crate::units::{align_up, Lsn};

/// The first bytes of every header copy.
pub const MAGIC: [u8; 8] = *b"MBLKSNAP";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;
/// One header copy.
pub const HEADER_LEN: usize = 4096;
/// Where the map starts (after both header copies).
pub const MAP_START: u64 = 2 * HEADER_LEN as u64;
/// One map entry.
pub const ENTRY_LEN: usize = 32;
/// Map entries in one 4 KiB block.
pub const ENTRIES_PER_BLOCK: u64 = (HEADER_LEN / ENTRY_LEN) as u64;
/// Longest broken reason kept in a header.
pub const REASON_MAX: usize = 512;

const NAME_AT: usize = 96;
const REASON_AT: usize = NAME_AT + super::snapshot::NAME_MAX;
const CHECK_AT: usize = HEADER_LEN - 8;

/// What a header says of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Readable.
    Ok,
    /// Broken, and why.
    Broken(String),
    /// Deleted (the file is about to be removed).
    Deleted,
}

/// A side file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Higher wins between the two copies; copy `generation % 2`.
    pub generation: u64,
    /// The volume's UUID (the journal superblock's).
    pub volume_uuid: [u8; 16],
    /// The snapshot's name.
    pub name: String,
    /// The first LSN not in the snapshot.
    pub from: u64,
    /// The volume's size at `from`.
    pub size: u64,
    /// The bound on kept data, in bytes.
    pub space: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Random per file: seeds the entry checks.
    pub nonce: u64,
    /// Map entries below this are durable.
    pub sealed: u64,
    /// Ok, broken or deleted.
    pub state: State,
}

/// Why a header or an entry cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a side file header at all.
    #[error("no snapshot header magic")]
    BadMagic,
    /// A layout this code does not know.
    #[error("unknown side file version {0}")]
    BadVersion(u32),
    /// Torn or damaged.
    #[error("header checksum mismatch")]
    BadChecksum,
    /// A field out of range.
    #[error("header field {0} is invalid")]
    BadField(&'static str),
}

/// How many slots a snapshot of `size` bytes with a space bound of
/// `space` bytes can use (never more than it has regions).
pub fn max_slots(space: u64, size: u64) -> u64 {
    (space / REGION).min(size.div_ceil(REGION))
}

/// Where slot 0's data starts.
pub fn data_start(space: u64, size: u64) -> u64 {
    align_up_region(MAP_START + max_slots(space, size) * ENTRY_LEN as u64)
}

fn align_up_region(x: u64) -> u64 {
    x.div_ceil(REGION) * REGION
}

/// Where slot `slot`'s data is.
pub fn slot_offset(space: u64, size: u64, slot: u64) -> u64 {
    data_start(space, size) + slot * REGION
}

fn put(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    /// Encodes into one `HEADER_LEN` block.
    pub fn encode(&self, b: &mut [u8]) {
        assert!(b.len() >= HEADER_LEN);
        assert!(valid_name(&self.name), "snapshot name checked before");
        let b = &mut b[..HEADER_LEN];
        b.fill(0);
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        put(b, 16, self.generation);
        b[24..40].copy_from_slice(&self.volume_uuid);
        put(b, 40, self.from);
        put(b, 48, self.size);
        put(b, 56, self.space);
        put(b, 64, self.created_ms);
        put(b, 72, self.nonce);
        put(b, 80, self.sealed);
        let (state, reason) = match &self.state {
            State::Ok => (0u8, ""),
            State::Broken(why) => (1, why.as_str()),
            State::Deleted => (2, ""),
        };
        let reason = truncate_utf8(reason, REASON_MAX);
        b[88] = state;
        b[89] = self.name.len() as u8;
        b[90..92].copy_from_slice(&(reason.len() as u16).to_le_bytes());
        b[NAME_AT..NAME_AT + self.name.len()].copy_from_slice(self.name.as_bytes());
        b[REASON_AT..REASON_AT + reason.len()].copy_from_slice(reason.as_bytes());
        let check = xxh3_64(&b[..CHECK_AT]);
        put(b, CHECK_AT, check);
    }

    /// Decodes one header copy (untrusted bytes).
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        if b.len() < HEADER_LEN || b[..8] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let b = &b[..HEADER_LEN];
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        if xxh3_64(&b[..CHECK_AT]) != get(b, CHECK_AT) {
            return Err(DecodeError::BadChecksum);
        }
        let name_len = b[89] as usize;
        let reason_len = u16::from_le_bytes([b[90], b[91]]) as usize;
        if name_len > super::snapshot::NAME_MAX {
            return Err(DecodeError::BadField("name length"));
        }
        if reason_len > REASON_MAX {
            return Err(DecodeError::BadField("reason length"));
        }
        let name = std::str::from_utf8(&b[NAME_AT..NAME_AT + name_len])
            .ok()
            .filter(|n| valid_name(n))
            .ok_or(DecodeError::BadField("name"))?
            .to_string();
        let reason = std::str::from_utf8(&b[REASON_AT..REASON_AT + reason_len])
            .map_err(|_| DecodeError::BadField("reason"))?;
        let state = match b[88] {
            0 => State::Ok,
            1 => State::Broken(reason.to_string()),
            2 => State::Deleted,
            _ => return Err(DecodeError::BadField("state")),
        };
        let mut volume_uuid = [0u8; 16];
        volume_uuid.copy_from_slice(&b[24..40]);
        let h = Header {
            generation: get(b, 16),
            volume_uuid,
            name,
            from: get(b, 40),
            size: get(b, 48),
            space: get(b, 56),
            created_ms: get(b, 64),
            nonce: get(b, 72),
            sealed: get(b, 80),
            state,
        };
        if h.space < REGION || h.sealed > max_slots(h.space, h.size) {
            return Err(DecodeError::BadField("space or sealed"));
        }
        Ok(h)
    }

    /// Where this header is written (copy `generation % 2`).
    pub fn offset(&self) -> u64 {
        (self.generation % 2) * HEADER_LEN as u64
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// The newer valid copy of the two header blocks `a` and `b`; else why
/// neither is valid.
pub fn pick_header(a: &[u8], b: &[u8]) -> Result<Header, String> {
    match (Header::decode(a), Header::decode(b)) {
        (Ok(x), Ok(y)) => Ok(if y.generation > x.generation { y } else { x }),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(x), Err(y)) => Err(format!("no valid header (copy A: {x}; copy B: {y})")),
    }
}

/// One map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The region kept in the slot.
    pub region: u64,
    /// The LSN of the record that made it kept.
    pub lsn: u64,
    /// xxh3 of the kept bytes.
    pub data_hash: u64,
}

/// What a map entry's bytes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// All zero: never used.
    Free,
    /// Does not check (torn, damaged, moved, or of another file).
    Bad,
    /// A valid entry.
    Used(Entry),
}

impl Entry {
    fn check(&self, slot: u64, nonce: u64) -> u64 {
        let mut b = [0u8; 32];
        put(&mut b, 0, self.region);
        put(&mut b, 8, self.lsn);
        put(&mut b, 16, self.data_hash);
        put(&mut b, 24, slot);
        // Never 0, so a valid entry is never all zero.
        xxh3_64_with_seed(&b, nonce) | 1
    }

    /// Encodes the entry of `slot` in a file with `nonce`.
    pub fn encode(&self, slot: u64, nonce: u64, b: &mut [u8]) {
        put(b, 0, self.region);
        put(b, 8, self.lsn);
        put(b, 16, self.data_hash);
        put(b, 24, self.check(slot, nonce));
    }

    /// Decodes the entry of `slot` (untrusted bytes, `ENTRY_LEN` of them).
    pub fn decode(b: &[u8], slot: u64, nonce: u64) -> Slot {
        if b.len() < ENTRY_LEN {
            return Slot::Bad;
        }
        if b[..ENTRY_LEN].iter().all(|&x| x == 0) {
            return Slot::Free;
        }
        let e = Entry {
            region: get(b, 0),
            lsn: get(b, 8),
            data_hash: get(b, 16),
        };
        if e.check(slot, nonce) == get(b, 24) {
            Slot::Used(e)
        } else {
            Slot::Bad
        }
    }
}

/// What the map of a side file comes to at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapVerdict {
    /// Slots in use (`[0, used)`); past them the map is to be zeroed.
    pub used: u64,
    /// Region → slot.
    pub map: HashMap<u64, u64>,
}

/// Judges the decoded entries (slot order; `data_ok(slot, entry)` tells
/// whether the kept data matches the entry's hash, asked only from
/// `sealed` on) of a snapshot of `size` bytes starting at `from`: the map,
/// or why the snapshot cannot be trusted.
pub fn judge_map(
    slots: &[Slot],
    sealed: u64,
    (from, size): (u64, u64),
    mut data_ok: impl FnMut(u64, &Entry) -> bool,
) -> Result<MapVerdict, String> {
    let regions = size.div_ceil(REGION);
    let mut map = HashMap::new();
    let mut used = 0u64;
    for (i, s) in slots.iter().enumerate() {
        let i = i as u64;
        let entry = match s {
            Slot::Used(e) if i >= sealed && !data_ok(i, e) => None,
            Slot::Used(e) => Some(e),
            Slot::Free | Slot::Bad => None,
        };
        let Some(e) = entry else {
            if i < sealed {
                return Err(format!(
                    "map entry {i} is {} but the header says entries below {sealed} are durable",
                    if *s == Slot::Free {
                        "missing"
                    } else {
                        "damaged (checksum mismatch)"
                    }
                ));
            }
            // A batch torn by the crash: its regions were not overwritten.
            break;
        };
        if e.region >= regions || e.lsn < from {
            return Err(format!(
                "map entry {i} (region {}, LSN {}) is outside the snapshot ({regions} regions, from LSN {from})",
                e.region, e.lsn
            ));
        }
        if let Some(other) = map.insert(e.region, i) {
            return Err(format!(
                "map entries {other} and {i} both keep region {}",
                e.region
            ));
        }
        used = i + 1;
    }
    if used < sealed {
        return Err(format!(
            "the map ends at entry {used} but the header says entries below {sealed} are durable"
        ));
    }
    Ok(MapVerdict { used, map })
}

/// The map blocks that entries for slots `[first, first + entries.len())`
/// go to, as (file offset, bytes): `tail` is the current content of the
/// block holding slot `first` (earlier entries there are written again
/// unchanged). Also returns the new tail: the block holding the next slot.
pub fn map_write(
    tail: &[u8],
    first: u64,
    entries: &[Entry],
    nonce: u64,
) -> (u64, Vec<u8>, Vec<u8>) {
    assert_eq!(tail.len(), HEADER_LEN);
    assert!(!entries.is_empty());
    let end = first + entries.len() as u64;
    let b0 = first / ENTRIES_PER_BLOCK;
    let b1 = (end - 1) / ENTRIES_PER_BLOCK;
    let mut bytes = vec![0u8; ((b1 - b0 + 1) as usize) * HEADER_LEN];
    bytes[..HEADER_LEN].copy_from_slice(tail);
    for (k, e) in entries.iter().enumerate() {
        let slot = first + k as u64;
        let at = ((slot - b0 * ENTRIES_PER_BLOCK) as usize) * ENTRY_LEN;
        e.encode(slot, nonce, &mut bytes[at..at + ENTRY_LEN]);
    }
    let next_block = end / ENTRIES_PER_BLOCK;
    let new_tail = if next_block == b1 {
        bytes[bytes.len() - HEADER_LEN..].to_vec()
    } else {
        vec![0u8; HEADER_LEN]
    };
    (MAP_START + b0 * HEADER_LEN as u64, bytes, new_tail)
}

/// A snapshot as loaded from its side file at start-up (or made by the
/// replay), handed to the engine.
#[derive(Debug)]
pub struct Loaded {
    /// The side file.
    pub path: PathBuf,
    /// Its name (from the header, or the file name if the header is bad).
    pub name: String,
    /// Its header (None when none was valid).
    pub header: Option<Header>,
    /// Region → slot.
    pub map: HashMap<u64, u64>,
    /// Slots in use.
    pub used: u64,
    /// The map block holding slot `used`.
    pub tail: Vec<u8>,
    /// Why it cannot be read, if so.
    pub broken: Option<String>,
    /// Open for the replay's copy-on-write (None once broken).
    file: Option<File>,
}

impl Loaded {
    /// The first LSN not in it and its size (None when broken).
    pub fn readable(&self) -> Option<(Lsn, u64, u64)> {
        match (&self.broken, &self.header) {
            (None, Some(h)) => Some((Lsn(h.from), h.size, h.space)),
            _ => None,
        }
    }
}

/// Reads `len` bytes at `pos` (0s past the end of the file).
fn read_at(f: &File, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut b[done..], pos + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(b)
}

/// Writes `data` at `pos` through a 4 KiB-aligned buffer (the handle may
/// be `O_DIRECT`).
pub fn write_aligned(f: &File, pos: u64, data: &[u8]) -> io::Result<()> {
    let mut b = AlignedBuf::new(align_up(data.len() as u64) as usize);
    b.as_mut_slice()[..data.len()].copy_from_slice(data);
    f.write_all_at(&b.as_slice()[..data.len()], pos)
}

/// Writes `h` into its copy and makes it durable (blocking).
pub fn write_header(f: &File, h: &Header) -> io::Result<()> {
    let mut b = vec![0u8; HEADER_LEN];
    h.encode(&mut b);
    write_aligned(f, h.offset(), &b)?;
    f.sync_data()
}

/// The side files beside `journal`: (snapshot name, path), by name.
pub fn side_files(journal: &Path) -> Vec<(String, PathBuf)> {
    let (Some(dir), Some(base)) = (journal.parent(), journal.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut prefix = base.to_os_string();
    prefix.push(".snap-");
    let Some(prefix) = prefix.to_str() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix(prefix)?.to_string();
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Syncs the folder holding `path` (a created or removed file stays so).
pub fn sync_folder(path: &Path) -> io::Result<()> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(folder)?.sync_all()
}

/// Loads every snapshot side file beside `journal` of the volume
/// `volume_uuid` (start-up, before the journal replay). Files of deleted
/// snapshots are removed; anything untrustworthy loads broken.
pub fn load_all(journal: &Path, volume: &str, volume_uuid: [u8; 16]) -> Vec<Loaded> {
    let mut out = Vec::new();
    for (name, path) in side_files(journal) {
        if !valid_name(&name) {
            tracing::warn!(volume, "ignoring {}: not a snapshot name", path.display());
            continue;
        }
        match load_one(&path, &name, volume_uuid) {
            Ok(Some(l)) => {
                match &l.broken {
                    Some(why) => tracing::error!(
                        volume,
                        "snapshot '{name}' ({}) is broken: {why}; reads of export {volume}@{name} fail with EIO; delete it and take a new one",
                        path.display()
                    ),
                    None => tracing::info!(
                        volume,
                        "snapshot '{name}' loaded from {}: {} regions kept",
                        path.display(),
                        l.used
                    ),
                }
                out.push(l);
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("its side file {} cannot be read: {e}", path.display());
                tracing::error!(volume, "snapshot '{name}' is broken: {why}");
                out.push(broken(path, name, None, why));
            }
        }
    }
    out
}

fn broken(path: PathBuf, name: String, header: Option<Header>, why: String) -> Loaded {
    Loaded {
        path,
        name,
        header,
        map: HashMap::new(),
        used: 0,
        tail: vec![0u8; HEADER_LEN],
        broken: Some(why),
        file: None,
    }
}

/// Loads one side file; None when it was a deleted snapshot's (removed).
fn load_one(path: &Path, name: &str, uuid: [u8; 16]) -> io::Result<Option<Loaded>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let hb = read_at(&f, 0, 2 * HEADER_LEN)?;
    let header = match pick_header(&hb[..HEADER_LEN], &hb[HEADER_LEN..]) {
        Ok(h) => h,
        Err(why) => return Ok(Some(broken(path.into(), name.into(), None, why))),
    };
    let mismatch = if header.volume_uuid != uuid {
        Some("it belongs to another volume (its volume UUID differs from the journal's)".into())
    } else if header.name != name {
        Some(format!("its header names snapshot '{}'", header.name))
    } else {
        None
    };
    match (&header.state, mismatch) {
        (State::Deleted, None) => {
            drop(f);
            std::fs::remove_file(path)?;
            sync_folder(path)?;
            tracing::info!("removed {}: its snapshot was deleted", path.display());
            return Ok(None);
        }
        (_, Some(why)) => {
            return Ok(Some(broken(path.into(), name.into(), Some(header), why)));
        }
        (State::Broken(why), None) => {
            let why = why.clone();
            return Ok(Some(broken(path.into(), name.into(), Some(header), why)));
        }
        (State::Ok, None) => {}
    }
    let slots = read_map(&f, &header)?;
    let verdict = judge_map(&slots, header.sealed, (header.from, header.size), |i, e| {
        data_matches(&f, &header, i, e)
    });
    let v = match verdict {
        Ok(v) => v,
        Err(why) => return Ok(Some(broken(path.into(), name.into(), Some(header), why))),
    };
    let tail = clear_map_past(&f, &header, v.used, slots.len() as u64)?;
    Ok(Some(Loaded {
        path: path.into(),
        name: name.into(),
        header: Some(header),
        map: v.map,
        used: v.used,
        tail,
        broken: None,
        file: Some(f),
    }))
}

/// The map's entries up to the first all-zero block (or the map's end).
fn read_map(f: &File, h: &Header) -> io::Result<Vec<Slot>> {
    let max = max_slots(h.space, h.size);
    let mut out = Vec::new();
    let mut block = 0u64;
    while block * ENTRIES_PER_BLOCK < max {
        let b = read_at(f, MAP_START + block * HEADER_LEN as u64, HEADER_LEN)?;
        if b.iter().all(|&x| x == 0) {
            break;
        }
        for k in 0..ENTRIES_PER_BLOCK.min(max - block * ENTRIES_PER_BLOCK) {
            let at = k as usize * ENTRY_LEN;
            let slot = block * ENTRIES_PER_BLOCK + k;
            out.push(Entry::decode(&b[at..at + ENTRY_LEN], slot, h.nonce));
        }
        block += 1;
    }
    Ok(out)
}

/// The bytes a slot keeps for `region` (the last region may be short).
fn kept_len(h: &Header, region: u64) -> usize {
    ((region * REGION + REGION).min(h.size) - region * REGION) as usize
}

fn data_matches(f: &File, h: &Header, slot: u64, e: &Entry) -> bool {
    if e.region >= h.size.div_ceil(REGION) {
        return false;
    }
    read_at(f, slot_offset(h.space, h.size, slot), kept_len(h, e.region))
        .is_ok_and(|d| xxh3_64(&d) == e.data_hash)
}

/// Zeroes the map from slot `used` on (`read` entries were read) and makes
/// it durable; returns the block holding slot `used`, as now on disk.
fn clear_map_past(f: &File, h: &Header, used: u64, read: u64) -> io::Result<Vec<u8>> {
    let b0 = used / ENTRIES_PER_BLOCK;
    let mut tail = read_at(f, MAP_START + b0 * HEADER_LEN as u64, HEADER_LEN)?;
    if read <= used {
        punch_map_past(f, h, b0 + 1);
        f.sync_data()?;
        return Ok(tail);
    }
    let keep = ((used - b0 * ENTRIES_PER_BLOCK) as usize) * ENTRY_LEN;
    tail[keep..].fill(0);
    write_aligned(f, MAP_START + b0 * HEADER_LEN as u64, &tail)?;
    let last = read.div_ceil(ENTRIES_PER_BLOCK);
    let zero = vec![0u8; HEADER_LEN];
    for b in b0 + 1..last {
        write_aligned(f, MAP_START + b * HEADER_LEN as u64, &zero)?;
    }
    punch_map_past(f, h, last);
    f.sync_data()?;
    tracing::info!(
        "{}: dropped map entries {used} to {read} (a batch the crash tore; replay keeps those regions again)",
        h.name
    );
    Ok(tail)
}

/// Frees the map past block `block` (a torn batch may have left entries
/// beyond the first zero block the load stopped at); where the
/// filesystem cannot, the map blocks written later overwrite them whole.
fn punch_map_past(f: &File, h: &Header, block: u64) {
    use std::os::fd::AsRawFd;
    let start = MAP_START + block * HEADER_LEN as u64;
    let end = data_start(h.space, h.size);
    if end <= start {
        return;
    }
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as i64,
            (end - start) as i64,
        )
    };
    if r != 0 {
        tracing::debug!(
            "{}: cannot free the map's end: {}",
            h.name,
            io::Error::last_os_error()
        );
    }
}

/// Replay's copy-on-write into the loaded snapshots (start-up, blocking):
/// before a record at or after a snapshot's start overwrites a region it
/// has not kept, the region's old data goes to the side file, durably.
pub struct ReplayKeeper {
    /// The snapshots, as loaded.
    pub snaps: Vec<Loaded>,
    /// The record being replayed.
    lsn: Lsn,
}

impl ReplayKeeper {
    /// Over the loaded snapshots.
    pub fn new(snaps: Vec<Loaded>) -> ReplayKeeper {
        ReplayKeeper { snaps, lsn: Lsn(0) }
    }

    /// Record `lsn` is replayed next.
    pub fn record(&mut self, lsn: Lsn) {
        self.lsn = lsn;
    }

    /// Keeps what `[offset, offset + len)` of `store` is about to lose.
    pub fn before_write(&mut self, store: &File, offset: u64, len: u64) -> io::Result<()> {
        let lsn = self.lsn;
        for s in &mut self.snaps {
            let Some((from, size, space)) = s.readable() else {
                continue;
            };
            if lsn < from {
                continue;
            }
            let Some((a, b)) = super::snapshot::regions_of(offset, len, size) else {
                continue;
            };
            if let Err(why) = keep_sync(s, store, (a, b), (lsn, size, space)) {
                break_loaded(s, why);
            }
        }
        Ok(())
    }

    /// A write went to the store in place (its data is home already), or
    /// the volume is resized to `new_size`: snapshots after it break.
    pub fn destroyed(&mut self, offset: u64, len: u64, new_size: Option<u64>) {
        let lsn = self.lsn;
        for s in &mut self.snaps {
            let Some((from, size, _)) = s.readable() else {
                continue;
            };
            if lsn < from {
                continue;
            }
            let why = match new_size {
                Some(n) if n < size => "the volume shrank below the snapshot's size",
                Some(_) => continue,
                None if super::snapshot::regions_of(offset, len, size).is_some() => {
                    "a write went to the data store in place, past the applier"
                }
                None => continue,
            };
            break_loaded(s, format!("{why} (LSN {lsn}, found replaying the journal)"));
        }
    }

    /// The snapshots, for the engine.
    pub fn into_loaded(self) -> Vec<Loaded> {
        self.snaps
    }
}

/// Keeps regions `[a, b)` of `store` not kept yet in `s` (record `lsn`),
/// durably.
fn keep_sync(
    s: &mut Loaded,
    store: &File,
    (a, b): (u64, u64),
    (lsn, size, space): (Lsn, u64, u64),
) -> Result<(), String> {
    let Some(h) = s.header.clone() else {
        return Err("no header".into());
    };
    let mut entries = Vec::new();
    let first = s.used;
    for r in a..b {
        if s.map.contains_key(&r) {
            continue;
        }
        if !super::snapshot::fits(s.used + entries.len() as u64, 1, space) {
            return Err(format!(
                "its space bound of {space} bytes is reached (replaying the journal)"
            ));
        }
        let n = kept_len(&h, r);
        debug_assert!(r * REGION < size);
        let data = read_at(store, r * REGION, n).map_err(|e| format!("reading the store: {e}"))?;
        let slot = first + entries.len() as u64;
        let f = s.file.as_ref().ok_or("the side file is closed")?;
        write_aligned(f, slot_offset(space, size, slot), &data)
            .map_err(|e| format!("keeping old data failed: {e}"))?;
        entries.push(Entry {
            region: r,
            lsn: lsn.0,
            data_hash: xxh3_64(&data),
        });
    }
    if entries.is_empty() {
        return Ok(());
    }
    let f = s.file.as_ref().ok_or("the side file is closed")?;
    let (pos, bytes, tail) = map_write(&s.tail, first, &entries, h.nonce);
    write_aligned(f, pos, &bytes).map_err(|e| format!("writing the map failed: {e}"))?;
    // The crash rule: durable before the replay overwrites the store.
    f.sync_data()
        .map_err(|e| format!("syncing the side file failed: {e}"))?;
    for (k, e) in entries.iter().enumerate() {
        s.map.insert(e.region, first + k as u64);
    }
    s.used = first + entries.len() as u64;
    s.tail = tail;
    Ok(())
}

/// Breaks a loaded snapshot: its header says so (durably) before the
/// store is touched, and its kept data is dropped.
fn break_loaded(s: &mut Loaded, why: String) {
    tracing::error!(
        "snapshot '{}' is broken: {why}; its reads fail with EIO; delete it and take a new one",
        s.name
    );
    if let (Some(f), Some(h)) = (s.file.take(), s.header.as_mut()) {
        h.generation += 1;
        h.state = State::Broken(why.clone());
        if let Err(e) = write_header(&f, h).and_then(|()| f.set_len(MAP_START)) {
            tracing::error!("cannot mark {} broken: {e}", s.path.display());
        }
    }
    s.map.clear();
    s.used = 0;
    s.broken = Some(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            generation: 3,
            volume_uuid: [7; 16],
            name: "b1".into(),
            from: 42,
            size: 10 * REGION + 512,
            space: 1 << 30,
            created_ms: 1_700_000_000_000,
            nonce: 99,
            sealed: 2,
            state: State::Ok,
        }
    }

    fn entry(region: u64, lsn: u64) -> Slot {
        Slot::Used(Entry {
            region,
            lsn,
            data_hash: region,
        })
    }

    proptest! {
        #[test]
        fn headers_round_trip(
            generation in any::<u64>(), uuid in any::<[u8; 16]>(),
            name in "[A-Za-z0-9._-]{1,64}", from in any::<u64>(), size in any::<u64>(),
            space in REGION..u64::MAX, created in any::<u64>(), nonce in any::<u64>(),
            state in 0u8..3, reason in ".{0,600}",
        ) {
            let state = match state { 0 => State::Ok, 1 => State::Broken(truncate_utf8(&reason, REASON_MAX).to_string()), _ => State::Deleted };
            let h = Header { generation, volume_uuid: uuid, name, from, size, space, created_ms: created, nonce, sealed: max_slots(space, size) / 2, state };
            let mut b = vec![0u8; HEADER_LEN];
            h.encode(&mut b);
            prop_assert_eq!(Header::decode(&b), Ok(h));
        }

        #[test]
        fn entries_round_trip_only_in_their_slot(region in any::<u64>(), lsn in any::<u64>(), hash in any::<u64>(), slot in 0u64..1 << 40, nonce in any::<u64>()) {
            let e = Entry { region, lsn, data_hash: hash };
            let mut b = [0u8; ENTRY_LEN];
            e.encode(slot, nonce, &mut b);
            prop_assert_eq!(Entry::decode(&b, slot, nonce), Slot::Used(e));
            prop_assert_eq!(Entry::decode(&b, slot + 1, nonce), Slot::Bad);
            prop_assert_eq!(Entry::decode(&b, slot, nonce ^ 1), Slot::Bad);
        }

        #[test]
        fn header_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Header::decode(&bytes);
            let _ = Entry::decode(&bytes, 0, 0);
        }
    }

    #[test]
    fn a_damaged_header_copy_falls_back_to_the_other() {
        let mut a = vec![0u8; HEADER_LEN];
        let mut b = vec![0u8; HEADER_LEN];
        let mut h = header();
        h.encode(&mut a);
        h.generation += 1;
        h.sealed = 5;
        h.encode(&mut b);
        assert_eq!(pick_header(&a, &b), Ok(h.clone()));
        b[100] ^= 1;
        assert_eq!(pick_header(&a, &b).map(|x| x.sealed), Ok(2));
        a[8] = 9;
        assert!(pick_header(&a, &b).is_err());
    }

    #[test]
    fn sealed_entries_must_all_check_and_a_torn_tail_is_dropped() {
        let snap = (10, 8 * REGION);
        let ok = |_: u64, _: &Entry| true;
        let slots = [entry(3, 10), entry(1, 11), Slot::Bad, entry(5, 12)];
        // The tail past `sealed` ends at the first bad entry.
        let v = judge_map(&slots, 2, snap, ok).expect("trusted");
        assert_eq!(v.used, 2);
        assert_eq!(v.map, HashMap::from([(3, 0), (1, 1)]));
        // Below `sealed` a bad or missing entry breaks it.
        assert!(judge_map(&slots, 3, snap, ok)
            .unwrap_err()
            .contains("damaged"));
        assert!(
            judge_map(&slots[..1], 2, snap, ok)
                .unwrap_err()
                .contains("missing")
                || judge_map(&slots[..1], 2, snap, ok)
                    .unwrap_err()
                    .contains("ends at")
        );
        // Data not matching its hash past `sealed` ends the map too...
        let v = judge_map(&slots, 1, snap, |i, _| i != 1).expect("trusted");
        assert_eq!(v.used, 1);
        // ...but below it is never asked.
        let v = judge_map(&slots, 2, snap, |i, _| i >= 2).expect("trusted");
        assert_eq!(v.used, 2);
        // Duplicates, regions past the size and LSNs before the start break it.
        let dup = [entry(3, 10), entry(3, 11)];
        assert!(judge_map(&dup, 0, snap, ok).is_err());
        assert!(judge_map(&[entry(8, 10)], 0, snap, ok).is_err());
        assert!(judge_map(&[entry(1, 9)], 0, snap, ok).is_err());
        assert_eq!(judge_map(&[], 0, snap, ok).map(|v| v.used), Ok(0));
    }

    /// Replay keeps a region only for records at or after the start, and
    /// what it keeps is durable in the file: a second load finds it.
    #[test]
    fn replay_keeps_regions_for_records_from_the_start_on_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = dir.path().join("v.journal");
        let store_path = dir.path().join("v.data");
        let size = 4 * REGION;
        let old: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
        std::fs::write(&store_path, &old).expect("store");
        let store = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&store_path)
            .expect("open store");
        let mut h = header();
        h.size = size;
        h.sealed = 0;
        h.from = 10;
        let side = dir.path().join("v.journal.snap-b1");
        let f = File::create(&side).expect("side");
        write_header(&f, &h).expect("header");
        let mut k = ReplayKeeper::new(load_all(&journal, "v", h.volume_uuid));
        assert_eq!(k.snaps.len(), 1);
        assert!(k.snaps[0].broken.is_none(), "{:?}", k.snaps[0].broken);
        // Below the start: in the snapshot, not kept.
        k.record(Lsn(9));
        k.before_write(&store, 0, 10).expect("replay");
        store.write_all_at(&[0xff; 10], 0).expect("write");
        // From the start on: regions 1 and 2 kept with their old data.
        k.record(Lsn(10));
        k.before_write(&store, REGION + 5, REGION).expect("replay");
        store
            .write_all_at(&vec![0xee; REGION as usize], REGION + 5)
            .expect("write");
        k.record(Lsn(11));
        k.before_write(&store, 0, 1).expect("replay");
        let l = &k.into_loaded()[0];
        assert_eq!(l.map, HashMap::from([(1, 0), (2, 1), (0, 2)]));
        // Loaded again from the file alone (nothing sealed: data checked).
        let again = load_all(&journal, "v", h.volume_uuid);
        assert_eq!(again[0].map, l.map);
        assert!(again[0].broken.is_none());
        let kept = read_at(
            again[0].file.as_ref().expect("open"),
            slot_offset(h.space, size, 0),
            REGION as usize,
        )
        .expect("read");
        assert_eq!(kept, old[REGION as usize..2 * REGION as usize]);
        let kept0 = read_at(
            again[0].file.as_ref().expect("open"),
            slot_offset(h.space, size, 2),
            10,
        )
        .expect("read");
        assert_eq!(
            kept0,
            vec![0xff; 10],
            "region 0 as of the start: the record below it applied"
        );
        // Another volume's journal: broken.
        let other = load_all(&journal, "v", [1; 16]);
        assert!(other[0]
            .broken
            .as_deref()
            .is_some_and(|w| w.contains("another volume")));
    }

    #[test]
    fn map_writes_rewrite_the_tail_block_and_roll_over() {
        let nonce = 5;
        let e = |r| Entry {
            region: r,
            lsn: 1,
            data_hash: 0,
        };
        let tail = vec![0u8; HEADER_LEN];
        let (pos, bytes, tail) = map_write(&tail, 0, &[e(0), e(1)], nonce);
        assert_eq!((pos, bytes.len()), (MAP_START, HEADER_LEN));
        assert_eq!(tail, bytes);
        // Straddling a block boundary: two blocks, the tail is the second.
        let last = ENTRIES_PER_BLOCK - 1;
        let (pos, bytes, tail2) = map_write(&tail, last, &[e(2), e(3)], nonce);
        assert_eq!((pos, bytes.len()), (MAP_START, 2 * HEADER_LEN));
        assert_eq!(&bytes[..ENTRY_LEN * 2], &tail[..ENTRY_LEN * 2]);
        assert_eq!(
            Entry::decode(&bytes[HEADER_LEN..], ENTRIES_PER_BLOCK, nonce),
            Slot::Used(e(3))
        );
        assert_eq!(tail2, bytes[HEADER_LEN..].to_vec());
        // Filling a block exactly: the next tail is a fresh block.
        let (_, _, tail3) = map_write(&tail, last, &[e(2)], nonce);
        assert_eq!(tail3, vec![0u8; HEADER_LEN]);
        assert_eq!(
            data_start(1 << 30, 1 << 40),
            align_up_region(MAP_START + (1 << 14) * 32)
        );
        assert_eq!(data_start(1 << 40, 3 * REGION), REGION);
    }
}
