//! Opening a journal at start-up: create it, or validate it against the
//! volume and replay every valid record after the checkpoint into the data
//! store, stopping at the first invalid one (a torn tail, never acknowledged).
//!
//! This runs before any client is served, with plain synchronous I/O: it is
//! bounded by the journal size and reported in the log.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::format::{
    BatchEntry, BatchHeader, EntryKind, FormatError, HeaderBlock, RecordHeader, Superblock,
    AREA_START, FLAG_NO_HOLE, HEADER_BLOCK, MIN_AREA,
};
use super::mutation::MutationOp;
use crate::units::{align_down, align_up, ByteSize, Epoch, Lsn, BLOCK};

/// Why a journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalOpenError {
    /// An I/O error on the journal or data store.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Replaying the journal into the data store ran out of space.
    #[error("cannot replay journal {path} into the data store: no space left on the data store's filesystem; free space there (or grow it) and start again: the journal keeps every acknowledged write until it is applied")]
    StoreFull {
        /// Journal path.
        path: PathBuf,
    },
    /// The journal belongs to a different volume.
    #[error("journal {path} belongs to volume '{found_name}', not to '{name}'; point --journal at this volume's journal, or delete the file to start a new one (its unapplied writes would be lost)")]
    WrongVolume {
        /// Journal path.
        path: PathBuf,
        /// Volume name in the superblock.
        found_name: String,
        /// The configured volume name.
        name: String,
    },
    /// Neither superblock copy is valid, and the file is not blank.
    #[error("journal {path} has no valid superblock (copy A: {a}; copy B: {b}); it is not a mirrorblk journal or is damaged. Move it away to start a new journal")]
    NoSuperblock {
        /// Journal path.
        path: PathBuf,
        /// Why copy A failed.
        a: FormatError,
        /// Why copy B failed.
        b: FormatError,
    },
    /// The journal is too small to be useful.
    #[error("journal size {0} is too small: use at least {1}")]
    TooSmall(ByteSize, ByteSize),
}

/// What recovery did, for the log and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records replayed into the store.
    pub records: u64,
    /// Payload bytes replayed.
    pub bytes: u64,
    /// Wall time in milliseconds.
    pub millis: u64,
    /// LSN recovery stopped at (the next LSN to assign).
    pub next_lsn: Lsn,
    /// Why the scan stopped (None when the journal was empty past the checkpoint).
    pub stop_reason: Option<String>,
}

/// An open, recovered journal, ready for the runtime appender.
#[derive(Debug)]
pub struct OpenedJournal {
    /// The journal file (`O_DIRECT | O_DSYNC` where supported).
    pub file: File,
    /// With `--durability flush`: the journal opened again without
    /// `O_DSYNC`, for records (made durable by `fdatasync` when asked).
    pub records_file: Option<File>,
    /// When a reply promises durability.
    pub durability: super::Durability,
    /// Path, for messages.
    pub path: PathBuf,
    /// The current superblock (already written with a fresh session).
    pub superblock: Superblock,
    /// What recovery did.
    pub report: RecoveryReport,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> JournalOpenError + 'a {
    move |source| JournalOpenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `len` bytes at `pos` into a block-aligned buffer (works with `O_DIRECT`).
fn read_aligned(f: &File, pos: u64, len: usize) -> io::Result<crate::buffer::AlignedBuf> {
    let mut b = crate::buffer::AlignedBuf::new(align_up(len.max(1) as u64) as usize);
    f.read_exact_at(b.as_mut_slice(), pos)?;
    Ok(b)
}

/// Writes a superblock into slot `generation % 2` and makes it durable.
pub fn write_superblock(f: &File, sb: &Superblock) -> io::Result<()> {
    let mut b = crate::buffer::AlignedBuf::new(HEADER_BLOCK);
    sb.encode(b.as_mut_slice());
    f.write_all_at(b.as_slice(), Superblock::slot_offset(sb.generation % 2))?;
    f.sync_data()
}

/// Reads both superblock copies; returns the valid one with the higher generation.
pub fn read_superblock(f: &File, path: &Path) -> Result<Superblock, JournalOpenError> {
    let b = read_aligned(f, 0, 2 * HEADER_BLOCK).map_err(io_err("cannot read journal", path))?;
    let a = Superblock::decode(&b.as_slice()[..HEADER_BLOCK]);
    let bb = Superblock::decode(&b.as_slice()[HEADER_BLOCK..]);
    match (a, bb) {
        (Ok(x), Ok(y)) => Ok(if y.generation > x.generation { y } else { x }),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(a), Err(b)) => Err(JournalOpenError::NoSuperblock {
            path: path.to_path_buf(),
            a,
            b,
        }),
    }
}

/// Parameters of the volume a journal must belong to.
#[derive(Debug, Clone)]
pub struct JournalSpec<'a> {
    /// Journal path.
    pub path: &'a Path,
    /// Size to create it with if missing.
    pub size: u64,
    /// Volume name.
    pub volume_name: &'a str,
    /// Volume size in bytes to create it with (an existing journal records
    /// its own: a resize changes it).
    pub volume_size: u64,
    /// When a reply promises durability (how records are written).
    pub durability: super::Durability,
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    // getrandom(2) never fails for 16 bytes once the pool is initialised;
    // fall back to time and pid if it somehow does.
    // SAFETY: writes at most 16 bytes into u.
    let n = unsafe { libc::getrandom(u.as_mut_ptr().cast(), u.len(), 0) };
    if n != 16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        u[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    u
}

/// Creates a blank journal: fully written with zeroes (so later `O_DSYNC`
/// writes never wait on extent allocation) and a first superblock.
fn create(spec: &JournalSpec<'_>) -> Result<(), JournalOpenError> {
    let path = spec.path;
    let size = align_down(spec.size);
    if size < AREA_START + MIN_AREA {
        return Err(JournalOpenError::TooSmall(
            ByteSize(spec.size),
            ByteSize(AREA_START + MIN_AREA),
        ));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(io_err("cannot create the folder of journal", path))?;
    }
    let tmp = path.with_extension("creating");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("cannot create journal", &tmp))?;
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], pos)
            .map_err(io_err("cannot write journal", &tmp))?;
        pos += n as u64;
    }
    let sb = Superblock {
        volume_uuid: random_uuid(),
        volume_name: spec.volume_name.to_string(),
        volume_size: spec.volume_size,
        area_len: size - AREA_START,
        epoch: Epoch(1),
        checkpoint_lsn: Lsn(1),
        checkpoint_pos: 0,
        session: 1,
        generation: 1,
        role: super::format::Role::Unset,
        inconsistent: false,
    };
    write_superblock(&f, &sb).map_err(io_err("cannot write journal superblock", &tmp))?;
    f.sync_all().map_err(io_err("cannot sync journal", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot rename journal into place", path))?;
    // The rename is a change to the folder: until the folder is synced a
    // power cut may undo it (ext4 commits it up to 5 s later, and the
    // journal's own O_DSYNC writes do not), and the next start would make a
    // new, empty journal beside acknowledged writes.
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(folder)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync the folder of journal", path))?;
    tracing::info!("created journal {} ({})", path.display(), ByteSize(size));
    Ok(())
}

/// Something that can take replayed records: the data store at start-up.
pub trait ReplayTarget {
    /// Writes `data` at volume offset `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Zeroes `[offset, offset+len)`; `trim` means only whole blocks need to be
    /// discarded (an advisory discard), `no_hole` that the range stays allocated.
    fn zero(&mut self, offset: u64, len: u64, trim: bool, no_hole: bool) -> io::Result<()>;
    /// A write that went to the store in place before the journal recorded
    /// it: its data is home already, nothing to write (a target that tracks
    /// changed ranges notes it).
    fn placed(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether recovery should look for in-place writes that were under way
    /// at the crash (see [`EntryKind::InPlaceIntent`]) and report them
    /// through [`ReplayTarget::placed`]: a target that marks changed ranges
    /// for replicas does.
    fn wants_intents(&self) -> bool {
        false
    }
    /// Recovery is about to replay from `sb`'s checkpoint (the superblock
    /// found, checked to belong to the volume).
    fn begin(&mut self, sb: &Superblock) {
        let _ = sb;
    }
    /// Record `lsn` is replayed over `[offset, offset + len)` (called before
    /// its data, for every record kind that changes the volume).
    fn record(&mut self, lsn: Lsn, offset: u64, len: u64) {
        let _ = (lsn, offset, len);
    }
    /// A resize record: the volume is `size` bytes from here on. Data past
    /// a shrunk end is gone; a grown part was zeroed before the record was
    /// written, so replay only makes sure the store holds it.
    fn resize(&mut self, size: u64) -> io::Result<()> {
        let _ = size;
        Ok(())
    }
    /// Makes everything written durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Sweeps every block of the record area for intents of this session at or
/// past the recovered tail (in-place writes under way at the crash) and
/// calls `found` for each; returns how many. Bounded by the area size.
fn sweep_intents(
    f: &File,
    sb: &Superblock,
    tail: Lsn,
    mut found: impl FnMut(&RecordHeader) -> io::Result<()>,
) -> io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut count = 0;
    let mut pos = 0;
    while pos < sb.area_len {
        let n = (sb.area_len - pos).min(CHUNK);
        let b = read_aligned(f, AREA_START + pos, n as usize)?;
        for blk in b.as_slice()[..n as usize].chunks_exact(HEADER_BLOCK) {
            if let Ok(h) = RecordHeader::decode(blk) {
                if h.kind == EntryKind::InPlaceIntent && h.session == sb.session && h.lsn >= tail {
                    found(&h)?;
                    count += 1;
                }
            }
        }
        pos += n;
    }
    Ok(count)
}

/// The ranges of the in-place writes found past the checkpoint, each byte
/// tagged with the newest such write covering it. A record replayed must
/// skip the bytes a later in-place write covers: that write's data is in
/// the store already, and replaying the older record over it would bring
/// back stale data.
struct InPlace(crate::overlay::Overlay);

impl InPlace {
    fn new() -> InPlace {
        InPlace(crate::overlay::Overlay::new())
    }

    fn note(&mut self, h: &RecordHeader) {
        if h.kind == EntryKind::WriteInPlace {
            self.0.insert(
                h.offset,
                h.offset + h.length,
                h.lsn,
                crate::overlay::Source::Zero,
            );
        }
    }

    /// The parts of `[start, end)` that no in-place write newer than `lsn` covers.
    fn replayable(&self, start: u64, end: u64, lsn: Lsn) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        for piece in self.0.lookup(start, end) {
            if piece.lsn <= lsn {
                continue;
            }
            if piece.start > pos {
                out.push((pos, piece.start));
            }
            pos = pos.max(piece.end);
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }
}

/// One valid record found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Its header. For a record in a batch: its entry in the batch
    /// header, as a record header whose `record_len` counts only its padded
    /// payload (the batch's header block is shared).
    pub header: RecordHeader,
    /// Area offset of its entry's header (its batch's, when batched).
    pub pos: u64,
    /// Area offset of its payload.
    pub payload_pos: u64,
    /// For a record in a batch: its index, and how many records the batch holds.
    pub batch: Option<(u32, u32)>,
}

/// Where a scan is: the next entry's area offset and LSN, and the bytes
/// walked so far (bounded by the area).
struct Cursor {
    pos: u64,
    lsn: Lsn,
    scanned: u64,
}

impl Cursor {
    /// Moves past an entry of `len` bytes at the cursor.
    fn advance(&mut self, len: u64, area_len: u64) {
        self.scanned += len;
        self.pos += len;
        if self.pos == area_len {
            self.pos = 0;
        }
    }
}

/// What scanning one entry found: the scan goes on, or the valid journal
/// ends (cleanly with None, else why).
type Step = Option<Option<String>>;

/// Walks the records after the checkpoint, calling `visit` for each valid one
/// with its payload, and returns (next LSN, head position, why it stopped).
pub fn scan(
    f: &File,
    sb: &Superblock,
    mut visit: impl FnMut(&ScannedRecord, &[u8]) -> io::Result<()>,
) -> io::Result<(Lsn, u64, Option<String>)> {
    let mut cur = Cursor {
        pos: sb.checkpoint_pos,
        lsn: sb.checkpoint_lsn,
        scanned: 0,
    };
    let stop = loop {
        if cur.scanned >= sb.area_len {
            break Some("scanned the whole record area".to_string());
        }
        let hb = read_aligned(f, AREA_START + cur.pos, HEADER_BLOCK)?;
        let step = match HeaderBlock::decode(hb.as_slice()) {
            Ok(HeaderBlock::Record(h)) => scan_record(f, sb, &h, &mut cur, &mut visit)?,
            Ok(HeaderBlock::Batch(b)) => scan_batch(f, sb, &b, &mut cur, &mut visit)?,
            // Not a header at all: zeroes, or data from an earlier lap of
            // the circular area. The journal ends here (a header torn before
            // its magic landed looks the same, and was never acknowledged).
            Err(FormatError::BadMagic { .. }) => Some(None),
            Err(e) => Some(Some(format!(
                "header at area offset {} (expected LSN {}): {e}",
                cur.pos, cur.lsn
            ))),
        };
        if let Some(why) = step {
            break why;
        }
    };
    Ok((cur.lsn, cur.pos, stop))
}

/// Scans a record with its own header at the cursor (or a pad).
fn scan_record(
    f: &File,
    sb: &Superblock,
    h: &RecordHeader,
    cur: &mut Cursor,
    visit: &mut impl FnMut(&ScannedRecord, &[u8]) -> io::Result<()>,
) -> io::Result<Step> {
    match judge(&Facts::of_record(h), sb, cur.pos, cur.lsn) {
        Verdict::End(why) => return Ok(Some(why)),
        Verdict::Pad => {
            cur.scanned += h.record_len;
            cur.pos = 0;
            return Ok(None);
        }
        Verdict::Entry => {}
    }
    let payload = match read_payload(f, h, cur.pos)? {
        Ok(p) => p,
        Err(why) => return Ok(Some(Some(why))),
    };
    let data = payload
        .as_ref()
        .map(|p| &p.as_slice()[..h.payload_len as usize])
        .unwrap_or(&[]);
    let rec = ScannedRecord {
        header: *h,
        pos: cur.pos,
        payload_pos: cur.pos + BLOCK,
        batch: None,
    };
    visit(&rec, data)?;
    cur.lsn = cur.lsn.next();
    cur.advance(h.record_len, sb.area_len);
    Ok(None)
}

/// Scans a batch at the cursor: its records in order, up to the first whose
/// payload does not match its checksum (a torn batch: its write never
/// completed, so none of its records was acknowledged, and the journal
/// ends there). The scan goes on past the batch only when all match.
fn scan_batch(
    f: &File,
    sb: &Superblock,
    b: &BatchHeader,
    cur: &mut Cursor,
    visit: &mut impl FnMut(&ScannedRecord, &[u8]) -> io::Result<()>,
) -> io::Result<Step> {
    if let Verdict::End(why) = judge(&Facts::of_batch(b), sb, cur.pos, cur.lsn) {
        return Ok(Some(why));
    }
    let len = b.batch_len();
    // A batch of trims and zeroes has no payload bytes (and may end at the
    // end of the area: nothing past it is read).
    let payloads = match len > BLOCK {
        true => Some(read_aligned(
            f,
            AREA_START + cur.pos + BLOCK,
            (len - BLOCK) as usize,
        )?),
        false => None,
    };
    let bytes = payloads.as_ref().map_or(&[][..], |p| p.as_slice());
    let count = b.entries.len() as u32;
    for (i, e) in b.entries.iter().enumerate() {
        let at = (e.payload_at - BLOCK) as usize;
        let data = bytes.get(at..at + e.payload_len() as usize).unwrap_or(&[]);
        let rec = ScannedRecord {
            header: entry_header(b, e),
            pos: cur.pos,
            payload_pos: cur.pos + e.payload_at,
            batch: Some((i as u32, count)),
        };
        if !data.is_empty() && xxhash_rust::xxh3::xxh3_64(data) != e.payload_hash {
            // The next session starts past the whole batch.
            cur.advance(len, sb.area_len);
            return Ok(Some(Some(format!(
                "record LSN {} at area offset {} (record {i} of the batch at area offset {}): payload checksum mismatch (torn write)",
                e.lsn, rec.payload_pos, rec.pos
            ))));
        }
        visit(&rec, data)?;
        cur.lsn = cur.lsn.next();
    }
    cur.advance(len, sb.area_len);
    Ok(None)
}

/// A batch entry as a record header (see [`ScannedRecord::header`]).
fn entry_header(b: &BatchHeader, e: &BatchEntry) -> RecordHeader {
    RecordHeader {
        lsn: e.lsn,
        epoch: b.epoch,
        session: b.session,
        kind: EntryKind::Mutation(e.op),
        flags: e.flags,
        offset: e.offset,
        length: e.length,
        payload_len: e.payload_len(),
        record_len: align_up(e.payload_len()),
        payload_hash: e.payload_hash,
    }
}

/// What [`judge`] needs of a header: a record's or a batch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Facts {
    /// Its LSN (a batch's first; a pad's, the entry after it).
    lsn: Lsn,
    epoch: Epoch,
    session: u64,
    shape: Shape,
    /// Journal bytes of the entry, header included.
    len: u64,
}

/// The kinds of header recovery tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Records to replay (a record, or a batch of them).
    Entry,
    /// Padding to the end of the area.
    Pad,
    /// An in-place write that had not finished.
    Intent,
}

impl Facts {
    fn of_record(h: &RecordHeader) -> Facts {
        let shape = match h.kind {
            EntryKind::Pad => Shape::Pad,
            EntryKind::InPlaceIntent => Shape::Intent,
            EntryKind::Mutation(_) | EntryKind::WriteInPlace => Shape::Entry,
        };
        Facts {
            lsn: h.lsn,
            epoch: h.epoch,
            session: h.session,
            shape,
            len: h.record_len,
        }
    }

    fn of_batch(b: &BatchHeader) -> Facts {
        Facts {
            lsn: b.first_lsn(),
            epoch: b.epoch,
            session: b.session,
            shape: Shape::Entry,
            len: b.batch_len(),
        }
    }
}

/// What recovery makes of a decoded header found at area offset `pos`
/// where LSN `lsn` is expected.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The valid records end here: cleanly (None: an older lap, or records
    /// of an earlier session past the head), or at a damaged or never
    /// acknowledged record (the reason).
    End(Option<String>),
    /// Padding to the end of the area: the next entry is at offset 0.
    Pad,
    /// A record or batch to check (payloads) and replay.
    Entry,
}

/// The recovery rule for one header (pure: payloads are checked after).
fn judge(h: &Facts, sb: &Superblock, pos: u64, lsn: Lsn) -> Verdict {
    let end = |why: String| Verdict::End(Some(why));
    if h.session != sb.session {
        return match h.lsn == lsn {
            true => end(format!(
                "record LSN {lsn} at area offset {pos} is from journal session {}, not {}",
                h.session, sb.session
            )),
            false => Verdict::End(None),
        };
    }
    if h.lsn < lsn {
        return Verdict::End(None);
    }
    if h.lsn > lsn {
        return end(format!(
            "LSN gap at area offset {pos}: found {}, expected {lsn}",
            h.lsn
        ));
    }
    if h.epoch > sb.epoch {
        return end(format!(
            "record LSN {lsn} has epoch {} newer than the journal's {}",
            h.epoch, sb.epoch
        ));
    }
    match h.shape {
        Shape::Intent => end(format!(
            "record LSN {lsn} at area offset {pos} is an in-place write that had not finished (never acknowledged)"
        )),
        Shape::Pad if pos + h.len != sb.area_len => end(format!(
            "pad record at area offset {pos} does not reach the end of the area"
        )),
        Shape::Pad => Verdict::Pad,
        Shape::Entry if pos + h.len > sb.area_len => end(format!(
            "record LSN {lsn} at area offset {pos} runs past the end of the area"
        )),
        Shape::Entry => Verdict::Entry,
    }
}

/// Reads and checks a record's payload: None without one, Err(why) when
/// its checksum does not match (a torn write: the journal ends there).
fn read_payload(
    f: &File,
    h: &RecordHeader,
    pos: u64,
) -> io::Result<Result<Option<crate::buffer::AlignedBuf>, String>> {
    if h.payload_len == 0 {
        return Ok(Ok(None));
    }
    let p = read_aligned(f, AREA_START + pos + BLOCK, h.payload_len as usize)?;
    let hash = xxhash_rust::xxh3::xxh3_64(&p.as_slice()[..h.payload_len as usize]);
    if hash != h.payload_hash {
        return Ok(Err(format!(
            "record LSN {} at area offset {pos}: payload checksum mismatch (torn write)",
            h.lsn
        )));
    }
    Ok(Ok(Some(p)))
}

/// Refuses a journal that belongs to another volume. Its size is not part
/// of its identity: a resize changes it, and the journal is where the
/// current size is recorded.
fn check_volume(sb: &Superblock, spec: &JournalSpec<'_>) -> Result<(), JournalOpenError> {
    if sb.volume_name == spec.volume_name {
        return Ok(());
    }
    Err(JournalOpenError::WrongVolume {
        path: spec.path.to_path_buf(),
        found_name: sb.volume_name.clone(),
        name: spec.volume_name.to_string(),
    })
}

/// The volume size an existing journal records (None without a journal or
/// a readable superblock): the store is opened at this size, which a
/// replayed resize may then change.
pub fn recorded_volume_size(path: &Path) -> Option<u64> {
    let f = File::open(path).ok()?;
    read_superblock(&f, path).ok().map(|sb| sb.volume_size)
}

/// Replays `[a, b)` of record `h` (whose payload is `data`) into `target`.
fn replay_part(
    target: &mut dyn ReplayTarget,
    h: &RecordHeader,
    data: &[u8],
    a: u64,
    b: u64,
) -> io::Result<()> {
    match h.kind {
        EntryKind::Mutation(MutationOp::Write) => {
            let at = (a - h.offset) as usize..(b - h.offset) as usize;
            target.write(a, &data[at])
        }
        EntryKind::Mutation(MutationOp::Trim) => target.zero(a, b - a, true, false),
        EntryKind::Mutation(MutationOp::WriteZeroes) => {
            target.zero(a, b - a, false, h.flags & FLAG_NO_HOLE != 0)
        }
        EntryKind::WriteInPlace => target.placed(a, b - a),
        // Touches no range: `open_and_recover` replays it.
        EntryKind::Mutation(MutationOp::Resize) => Ok(()),
        // Never visited: the scan stops at an intent.
        EntryKind::Pad | EntryKind::InPlaceIntent => Ok(()),
    }
}

/// Tells `target` the ranges of in-place writes that were under way at the
/// crash (past the recovered tail): the replicas may lack what the store holds.
fn mark_intents(
    file: &File,
    sb: &Superblock,
    next_lsn: Lsn,
    target: &mut dyn ReplayTarget,
) -> io::Result<()> {
    let n = sweep_intents(file, sb, next_lsn, |h| target.placed(h.offset, h.length))?;
    if n > 0 {
        tracing::warn!(
            "{n} in-place write(s) were under way at the crash (never acknowledged): their regions are marked changed (for incremental backups and every replica's resync)"
        );
    }
    Ok(())
}

/// Tells `target` a record is replayed (and a resize what size it sets)
/// before its data.
fn announce(target: &mut dyn ReplayTarget, h: &RecordHeader, size: &mut u64) -> io::Result<()> {
    if matches!(h.kind, EntryKind::Mutation(_) | EntryKind::WriteInPlace) {
        target.record(h.lsn, h.offset, h.length);
    }
    if h.kind == EntryKind::Mutation(MutationOp::Resize) {
        target.resize(h.offset)?;
        *size = h.offset;
    }
    Ok(())
}

/// Records in the superblock the size the replayed resize records left.
fn note_size(path: &Path, sb: &mut Superblock, volume_size: u64) {
    if volume_size != sb.volume_size {
        tracing::info!(
            "journal {} resized the volume from {} to {} bytes",
            path.display(),
            sb.volume_size,
            volume_size
        );
        sb.volume_size = volume_size;
    }
}

/// Opens (or creates) the journal of a volume, checks that it belongs to it,
/// replays it into `target`, and starts a new session. The returned journal's
/// superblock has its checkpoint at the recovered head.
pub fn open_and_recover(
    spec: &JournalSpec<'_>,
    target: &mut dyn ReplayTarget,
) -> Result<OpenedJournal, JournalOpenError> {
    let path = spec.path;
    if !path.exists() {
        create(spec)?;
    }
    let (file, _direct) = crate::store::open_direct(path, false, libc::O_DSYNC)
        .map_err(io_err("cannot open journal", path))?;
    let mut sb = read_superblock(&file, path)?;
    check_volume(&sb, spec)?;
    target.begin(&sb);
    let start = Instant::now();
    let mut report = RecoveryReport::default();
    let mut volume_size = sb.volume_size;
    let (next_lsn, head, stop) = replay(&file, &sb, path, target, &mut report, &mut volume_size)?;
    if target.wants_intents() {
        mark_intents(&file, &sb, next_lsn, target).map_err(io_err("cannot read journal", path))?;
    }
    target.sync().map_err(io_err(
        "cannot sync the data store after replaying journal",
        path,
    ))?;
    note_size(path, &mut sb, volume_size);
    report.next_lsn = next_lsn;
    report.stop_reason = stop;
    // New session: records of the old one past the head can never be replayed.
    sb.checkpoint_lsn = next_lsn;
    sb.checkpoint_pos = head;
    sb.session += 1;
    // Both copies, each durable before the next: both then carry this
    // build's format version, so an older build that cannot read what this
    // one writes refuses the journal by its version instead of opening the
    // other, older copy (and scanning past records it cannot read).
    for _ in 0..2 {
        sb.generation += 1;
        write_superblock(&file, &sb).map_err(io_err("cannot write journal superblock", path))?;
    }
    report.millis = start.elapsed().as_millis() as u64;
    Ok(OpenedJournal {
        file,
        records_file: records_file(path, spec.durability)?,
        durability: spec.durability,
        path: path.to_path_buf(),
        superblock: sb,
        report,
    })
}

/// Both passes of recovery over the records after `sb`'s checkpoint: the
/// first finds where the valid records end and which ranges in-place writes
/// cover, the second replays, in LSN order, what no later in-place write
/// covers. Returns the next LSN, the head and why the scan stopped.
fn replay(
    file: &File,
    sb: &Superblock,
    path: &Path,
    target: &mut dyn ReplayTarget,
    report: &mut RecoveryReport,
    volume_size: &mut u64,
) -> Result<(Lsn, u64, Option<String>), JournalOpenError> {
    // Both passes need every record checked, payloads included.
    let mut in_place = InPlace::new();
    scan(file, sb, |rec, _| {
        in_place.note(&rec.header);
        Ok(())
    })
    .map_err(io_err("cannot read journal", path))?;
    scan(file, sb, |rec, data| {
        let h = &rec.header;
        announce(target, h, volume_size)?;
        for (a, b) in in_place.replayable(h.offset, h.offset + h.length, h.lsn) {
            replay_part(target, h, data, a, b)?;
        }
        report.records += 1;
        report.bytes += h.length;
        Ok(())
    })
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => JournalOpenError::StoreFull {
            path: path.to_path_buf(),
        },
        _ => io_err("cannot replay journal", path)(e),
    })
}

/// The handle records are written through in flush mode: a second one
/// without `O_DSYNC` (superblocks and intents keep the `O_DSYNC` one).
/// None in per-write mode, where both are the same.
fn records_file(
    path: &Path,
    durability: super::Durability,
) -> Result<Option<File>, JournalOpenError> {
    match durability {
        super::Durability::PerWrite => Ok(None),
        super::Durability::Flush => crate::store::open_direct(path, false, 0)
            .map(|(f, _)| Some(f))
            .map_err(io_err("cannot open journal", path)),
    }
}

/// Replays into a plain (buffered) file: the data store at start-up.
pub struct FileReplay<'a> {
    /// The data file, opened without `O_DIRECT` for arbitrary offsets.
    pub file: &'a File,
    /// Whether it is a block device (no hole punching).
    pub block_device: bool,
}

impl ReplayTarget for FileReplay<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64, trim: bool, no_hole: bool) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (start, end) = if trim {
            (align_up(offset), align_down(offset + len))
        } else {
            (offset, offset + len)
        };
        if end <= start {
            return Ok(());
        }
        let mode = if no_hole || self.block_device {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                start as i64,
                (end - start) as i64,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Fall back to writing zeroes where fallocate modes are unsupported.
        let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn resize(&mut self, size: u64) -> io::Result<()> {
        let actual = if self.block_device {
            crate::store::block_device_size(self.file)?
        } else {
            self.file.metadata()?.len()
        };
        if actual >= size {
            return Ok(());
        }
        if self.block_device {
            return Err(io::Error::other(format!(
                "the volume was resized to {size} bytes but its data device holds only {actual}: give it a device at least that large"
            )));
        }
        // The grow zeroed and extended the file before its record was
        // written; a later shrink may have cut it since.
        self.file.set_len(size)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_ends_at_the_first_header_that_does_not_continue_the_journal() {
        const AREA: u64 = 1 << 20;
        let sb = Superblock {
            volume_uuid: [0; 16],
            volume_name: "v".into(),
            volume_size: 1 << 30,
            area_len: AREA,
            epoch: Epoch(3),
            checkpoint_lsn: Lsn(10),
            checkpoint_pos: 0,
            session: 7,
            generation: 1,
            role: super::super::format::Role::Primary,
            inconsistent: false,
        };
        let h =
            |lsn: u64, session: u64, epoch: u64, kind: EntryKind, record_len: u64| RecordHeader {
                lsn: Lsn(lsn),
                epoch: Epoch(epoch),
                session,
                kind,
                flags: 0,
                offset: 0,
                length: 4096,
                payload_len: 0,
                record_len,
                payload_hash: 0,
            };
        let write = EntryKind::Mutation(MutationOp::Write);
        let damaged = |v: Verdict| matches!(v, Verdict::End(Some(_)));
        // (header, position, expected LSN 10) → verdict
        assert_eq!(
            judge(
                &Facts::of_record(&h(10, 7, 3, write, 8192)),
                &sb,
                0,
                Lsn(10)
            ),
            Verdict::Entry
        );
        // An older lap, or an older session's record past the head: a clean end.
        assert_eq!(
            judge(&Facts::of_record(&h(9, 7, 3, write, 8192)), &sb, 0, Lsn(10)),
            Verdict::End(None)
        );
        assert_eq!(
            judge(&Facts::of_record(&h(4, 6, 3, write, 8192)), &sb, 0, Lsn(10)),
            Verdict::End(None)
        );
        // The expected LSN from another session, a gap, a newer epoch, an
        // unfinished in-place write, a record past the end: damaged.
        assert!(damaged(judge(
            &Facts::of_record(&h(10, 6, 3, write, 8192)),
            &sb,
            0,
            Lsn(10)
        )));
        assert!(damaged(judge(
            &Facts::of_record(&h(11, 7, 3, write, 8192)),
            &sb,
            0,
            Lsn(10)
        )));
        assert!(damaged(judge(
            &Facts::of_record(&h(10, 7, 4, write, 8192)),
            &sb,
            0,
            Lsn(10)
        )));
        let intent = EntryKind::InPlaceIntent;
        assert!(damaged(judge(
            &Facts::of_record(&h(10, 7, 3, intent, 4096)),
            &sb,
            0,
            Lsn(10)
        )));
        assert!(damaged(judge(
            &Facts::of_record(&h(10, 7, 3, write, 8192)),
            &sb,
            AREA - 4096,
            Lsn(10)
        )));
        // A pad must reach exactly the end of the area.
        let pad = EntryKind::Pad;
        assert_eq!(
            judge(
                &Facts::of_record(&h(10, 7, 3, pad, 4096)),
                &sb,
                AREA - 4096,
                Lsn(10)
            ),
            Verdict::Pad
        );
        assert!(damaged(judge(
            &Facts::of_record(&h(10, 7, 3, pad, 4096)),
            &sb,
            AREA - 8192,
            Lsn(10)
        )));
    }

    fn in_place(lsn: u64, offset: u64, length: u64) -> RecordHeader {
        RecordHeader {
            lsn: Lsn(lsn),
            epoch: Epoch(1),
            session: 1,
            kind: EntryKind::WriteInPlace,
            flags: 0,
            offset,
            length,
            payload_len: 0,
            record_len: RecordHeader::record_len_for(length),
            payload_hash: 0,
        }
    }

    #[test]
    fn older_records_skip_what_later_in_place_writes_cover() {
        let mut m = InPlace::new();
        m.note(&in_place(10, 8192, 8192));
        m.note(&in_place(20, 12288, 8192));
        // Older than both: only the bytes neither covers.
        assert_eq!(
            m.replayable(0, 32768, Lsn(5)),
            vec![(0, 8192), (20480, 32768)]
        );
        // Between them: only the newer one hides bytes.
        assert_eq!(
            m.replayable(0, 32768, Lsn(15)),
            vec![(0, 12288), (20480, 32768)]
        );
        // Newer than both: everything replays.
        assert_eq!(m.replayable(100, 30000, Lsn(25)), vec![(100, 30000)]);
        // The in-place record itself keeps the part no later one covers.
        assert_eq!(m.replayable(8192, 16384, Lsn(10)), vec![(8192, 12288)]);
        // Entirely hidden.
        assert!(m.replayable(13000, 14000, Lsn(11)).is_empty());
    }

    /// A journal file with an old-layout write (LSN 10) and a pad at the
    /// end of its area, then two batches from offset 0: LSNs 11-13 (writes)
    /// and 14-17 (write, write, trim, write). Returns the file, its
    /// superblock and where the second batch starts and ends.
    fn journal_with_batches(dir: &Path) -> (File, Superblock, u64, u64) {
        let area = MIN_AREA;
        let sb = Superblock {
            volume_uuid: [1; 16],
            volume_name: "v".into(),
            volume_size: 1 << 30,
            area_len: area,
            epoch: Epoch(2),
            checkpoint_lsn: Lsn(10),
            checkpoint_pos: area - 3 * BLOCK,
            session: 5,
            generation: 1,
            role: super::super::format::Role::Primary,
            inconsistent: false,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("j"))
            .unwrap();
        f.set_len(AREA_START + area).unwrap();
        write_superblock(&f, &sb).unwrap();
        let at = |pos: u64| AREA_START + pos;
        let mut blk = vec![0u8; HEADER_BLOCK];
        let data = |lsn: u64, len: usize| vec![lsn as u8; len];
        let old = data(10, 4096);
        RecordHeader {
            lsn: Lsn(10),
            epoch: Epoch(2),
            session: 5,
            kind: EntryKind::Mutation(MutationOp::Write),
            flags: 0,
            offset: 0,
            length: 4096,
            payload_len: 4096,
            record_len: 2 * BLOCK,
            payload_hash: xxhash_rust::xxh3::xxh3_64(&old),
        }
        .encode(&mut blk);
        f.write_all_at(&blk, at(area - 3 * BLOCK)).unwrap();
        f.write_all_at(&old, at(area - 2 * BLOCK)).unwrap();
        RecordHeader {
            lsn: Lsn(11),
            epoch: Epoch(2),
            session: 5,
            kind: EntryKind::Pad,
            flags: 0,
            offset: 0,
            length: 0,
            payload_len: 0,
            record_len: BLOCK,
            payload_hash: 0,
        }
        .encode(&mut blk);
        f.write_all_at(&blk, at(area - BLOCK)).unwrap();
        let ops = [
            (MutationOp::Write, 4096),
            (MutationOp::Write, 5000),
            (MutationOp::Write, 100),
        ];
        let end1 = write_batch(&f, 0, 11, &ops, data);
        let ops = [
            (MutationOp::Write, 8192),
            (MutationOp::Write, 1),
            (MutationOp::Trim, 65536),
            (MutationOp::Write, 4096),
        ];
        let end2 = write_batch(&f, end1, 14, &ops, data);
        (f, sb, end1, end2)
    }

    /// Writes a batch of `ops` (op, length) from LSN `first` at area offset
    /// `pos`, each write's payload `data(lsn, length)`; returns its end.
    fn write_batch(
        f: &File,
        pos: u64,
        first: u64,
        ops: &[(MutationOp, u64)],
        data: impl Fn(u64, usize) -> Vec<u8>,
    ) -> u64 {
        let mut entries: Vec<BatchEntry> = Vec::new();
        for (i, &(op, length)) in ops.iter().enumerate() {
            let lsn = first + i as u64;
            let payload = data(lsn, op.payload_len(length) as usize);
            let e = BatchEntry {
                lsn: Lsn(lsn),
                op,
                flags: 0,
                offset: lsn << 20,
                length,
                payload_at: BatchHeader::next_payload_at(entries.last()),
                payload_hash: if payload.is_empty() {
                    0
                } else {
                    xxhash_rust::xxh3::xxh3_64(&payload)
                },
            };
            f.write_all_at(&payload, AREA_START + pos + e.payload_at)
                .unwrap();
            entries.push(e);
        }
        let b = BatchHeader {
            epoch: Epoch(2),
            session: 5,
            entries,
        };
        let mut blk = vec![0u8; HEADER_BLOCK];
        b.encode(&mut blk);
        f.write_all_at(&blk, AREA_START + pos).unwrap();
        pos + b.batch_len()
    }

    /// The LSNs a scan visits (checking each payload is its record's), and
    /// what it returns.
    fn scanned(f: &File, sb: &Superblock) -> (Vec<u64>, Lsn, u64, Option<String>) {
        let mut lsns = Vec::new();
        let (next, head, stop) = scan(f, sb, |r, data| {
            let h = &r.header;
            assert_eq!(data.len() as u64, h.payload_len);
            assert!(
                data.iter().all(|&b| b == h.lsn.0 as u8),
                "LSN {} payload",
                h.lsn
            );
            lsns.push(h.lsn.0);
            Ok(())
        })
        .unwrap();
        (lsns, next, head, stop)
    }

    #[test]
    fn batches_replay_after_old_records_and_a_pad() {
        let dir = tempfile::tempdir().unwrap();
        let (f, sb, _, end2) = journal_with_batches(dir.path());
        assert_eq!(scanned(&f, &sb), ((10..=17).collect(), Lsn(18), end2, None));
    }

    #[test]
    fn a_torn_batch_keeps_only_the_records_before_the_first_damaged_payload() {
        let dir = tempfile::tempdir().unwrap();
        // Record k of the second batch (LSN 14 + k; k = 2 is a trim, no payload).
        for k in [0u64, 1, 3] {
            let (f, sb, end1, end2) = journal_with_batches(dir.path());
            let mut blk = vec![0u8; HEADER_BLOCK];
            f.read_exact_at(&mut blk, AREA_START + end1).unwrap();
            let Ok(HeaderBlock::Batch(b)) = HeaderBlock::decode(&blk) else {
                panic!("no batch at {end1}");
            };
            let e = b.entries[k as usize];
            let last = AREA_START + end1 + e.payload_at + e.payload_len() - 1;
            f.write_all_at(&[0xEE], last).unwrap();
            let (lsns, next, head, stop) = scanned(&f, &sb);
            assert_eq!(lsns, (10..14 + k).collect::<Vec<_>>(), "damaged record {k}");
            assert_eq!((next, head), (Lsn(14 + k), end2), "damaged record {k}");
            let why = stop.unwrap_or_default();
            assert!(
                why.contains(&format!("record LSN {} ", 14 + k))
                    && why.contains("payload checksum mismatch"),
                "damaged record {k}: {why}"
            );
        }
    }

    #[test]
    fn a_damaged_batch_header_ends_the_journal_before_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (f, sb, end1, _) = journal_with_batches(dir.path());
        f.write_all_at(&[0xEE], AREA_START + end1 + 100).unwrap();
        let (lsns, next, head, stop) = scanned(&f, &sb);
        assert_eq!((lsns, next, head), ((10..14).collect(), Lsn(14), end1));
        assert!(stop.unwrap_or_default().contains("checksum mismatch"));
    }

    #[test]
    fn a_recovered_journal_has_both_superblock_copies_at_this_version() {
        let dir = tempfile::tempdir().unwrap();
        let data = File::create(dir.path().join("data")).unwrap();
        let spec = JournalSpec {
            path: &dir.path().join("journal"),
            size: AREA_START + MIN_AREA,
            volume_name: "v",
            volume_size: 1 << 20,
            durability: super::super::Durability::PerWrite,
        };
        for start in 1..=2 {
            let opened = open_and_recover(
                &spec,
                &mut FileReplay {
                    file: &data,
                    block_device: false,
                },
            )
            .unwrap();
            drop(opened);
            let raw = std::fs::read(spec.path).unwrap();
            for slot in 0..2 {
                let at = Superblock::slot_offset(slot) as usize;
                let blk = &raw[at..at + HEADER_BLOCK];
                let sb = Superblock::decode(blk).unwrap();
                // An older build refuses the journal only if no copy is older.
                let version = u32::from_le_bytes(blk[8..12].try_into().unwrap());
                assert_eq!(
                    (version, sb.session),
                    (super::super::format::FORMAT_VERSION, 1 + start),
                    "start {start}, copy {slot}"
                );
            }
        }
    }
}
