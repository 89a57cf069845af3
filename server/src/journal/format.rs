//! The journal's on-disk format: the one definition, used by the daemon and by
//! the offline tools (`mirrorblk journal inspect`).
//!
//! Layout of a journal file (or device region), all little-endian:
//!
//! ```text
//! [0, 4096)        superblock copy A
//! [4096, 8192)     superblock copy B
//! [8192, end)      record area (circular), a multiple of 4 KiB
//! ```
//!
//! Superblock copies are written alternately (the one with the higher valid
//! generation wins), so a torn superblock write never loses both.
//!
//! The record area holds two kinds of entries, each starting with a 4 KiB
//! header block, told apart by the header's magic:
//!
//! - A **batch** ([`BatchHeader`], since format version 3): one header block
//!   describing up to [`MAX_BATCH_ENTRIES`] consecutive records (per record
//!   its LSN, op, flags, volume range, xxh3-64 of its payload and where its
//!   payload starts), followed by their payloads back to back, each padded
//!   to 4 KiB so the data stays block-aligned for `O_DIRECT`. A group commit
//!   of n 4 KiB writes costs n + 1 blocks of journal instead of 2n. Every
//!   journaled mutation is written in a batch, a lone one as a batch of one
//!   (the same 8 KiB the old layout costs, and one code path for the writer
//!   and every reader instead of two).
//! - A **record** ([`RecordHeader`]): a header block followed by its own
//!   payload. Versions 1 and 2 wrote every mutation so, and recovery still
//!   reads them. Version 3 writes only pads and large writes that may go to
//!   the data store in place (their slot must take an intent header, then
//!   their own, at a fixed place: see [`EntryKind::WriteInPlace`]) this way.
//!
//! Both headers carry their own xxh3-64 over every header byte before the
//! checksum field, and an xxh3-64 per payload, so headers and payloads are
//! all covered. An entry is valid only if its magic, checksum, session,
//! epoch and LSN continuity all hold. A batch whose header is valid is
//! valid up to (not including) its first record whose payload does not
//! match: the batch went to disk in one write, acknowledged only once that
//! write (and the group commit it is part of) was durable, so a torn batch
//! holds no acknowledged record, and replaying its intact prefix replays
//! only writes that were in flight (which may or may not land). A `Pad`
//! record fills the tail of the area when the next entry does not fit before
//! the end; the entry after it starts at offset 0 of the area.

use super::mutation::MutationOp;
use crate::units::{align_up, Epoch, Lsn, BLOCK};

/// Magic of a superblock copy: "MBLKJSB1".
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"MBLKJSB1");
/// Magic of a record header: "MBLKJREC".
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"MBLKJREC");
/// Magic of a batch header: "MBLKJBAT".
pub const BATCH_MAGIC: u64 = u64::from_le_bytes(*b"MBLKJBAT");
/// The format version this code writes. Version 2 added the resize record
/// ([`MutationOp::Resize`], code 7); version 3 the batch ([`BatchHeader`]).
/// Journals of versions 1 and 2 hold neither batches (and version 1 no
/// resize) and read the same, so all three open. An older build refuses a
/// newer journal by its version instead of taking its first batch for the
/// end of the journal (recovery writes both superblock copies at the
/// current version, so no older copy is left for an older build to pick).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this code reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Size of one superblock copy and of a record header.
pub const HEADER_BLOCK: usize = BLOCK as usize;
/// Where the record area starts in the journal.
pub const AREA_START: u64 = 2 * BLOCK;
/// Longest volume name the superblock holds.
pub const MAX_NAME: usize = 128;
/// The smallest record area we accept (a few maximum-size records must fit).
pub const MIN_AREA: u64 = 4 << 20;

const CHECKSUM_AT: usize = HEADER_BLOCK - 8;

/// Batch header offsets: the fixed fields, then the entries.
const BATCH_COUNT_AT: usize = 32;
const BATCH_LEN_AT: usize = 40;
const BATCH_ENTRIES_AT: usize = 48;
/// Bytes of one entry in a batch header.
pub const BATCH_ENTRY_LEN: usize = 48;
/// Most records one batch header describes: as many entries as fit between
/// the fixed fields and the checksum.
pub const MAX_BATCH_ENTRIES: usize = (CHECKSUM_AT - BATCH_ENTRIES_AT) / BATCH_ENTRY_LEN;

/// Superblock offsets whose relationship the layout depends on.
const SB_NAME_AT: usize = 96;
const SB_INCONSISTENT_AT: usize = 232;

// A header is one block, and the area starts after the two superblock copies.
const _: () = assert!(HEADER_BLOCK as u64 == BLOCK && AREA_START == 2 * BLOCK);
// The longest name ends before the inconsistent flag, which ends before the checksum.
const _: () = assert!(SB_NAME_AT + MAX_NAME <= SB_INCONSISTENT_AT);
const _: () = assert!(SB_INCONSISTENT_AT + 4 <= CHECKSUM_AT);
// The smallest area is whole blocks.
const _: () = assert!(MIN_AREA % BLOCK == 0);
// Every entry of a full batch ends before the checksum, and a batch takes at
// least a queue depth of 32 writes in one header block.
const _: () = assert!(BATCH_ENTRIES_AT + MAX_BATCH_ENTRIES * BATCH_ENTRY_LEN <= CHECKSUM_AT);
const _: () = assert!(MAX_BATCH_ENTRIES >= 32);

/// Why a superblock or record header did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The block does not start with the expected magic.
    #[error("bad magic {found:#018x}")]
    BadMagic {
        /// The eight bytes found, as a little-endian number.
        found: u64,
    },
    /// The stored checksum does not match the contents.
    #[error("checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    BadChecksum {
        /// Checksum in the block.
        stored: u64,
        /// Checksum of the contents.
        computed: u64,
    },
    /// Written by a format version we do not read.
    #[error("unsupported journal format version {0} (this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); run the mirrorblkd that wrote it")]
    BadVersion(u32),
    /// A field holds a value that cannot be right.
    #[error("invalid field: {0}")]
    BadField(&'static str),
}

/// What a journal belongs to and how far it has been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Identity of the volume (random at creation).
    pub volume_uuid: [u8; 16],
    /// The volume's name (export name).
    pub volume_name: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Length of the record area in bytes.
    pub area_len: u64,
    /// Current epoch of this node for the volume.
    pub epoch: Epoch,
    /// First LSN not yet applied to the data store: recovery replays from here.
    pub checkpoint_lsn: Lsn,
    /// Offset within the record area of the record with `checkpoint_lsn`.
    pub checkpoint_pos: u64,
    /// Incremented at every start-up; records carry it, so records left from
    /// an earlier run past the recovered tail can never be replayed.
    pub session: u64,
    /// Incremented at every superblock write; the copy with the higher valid
    /// generation is current.
    pub generation: u64,
    /// The role this node last had for the volume (persisted so a restart
    /// without `--role` resumes safely).
    pub role: Role,
    /// Set while a resync is incomplete: the data store may not match the
    /// primary, so this node must never be promoted.
    pub inconsistent: bool,
}

/// A node's role for a volume (the admin protocol's type; the superblock
/// stores it as a byte code of its own).
pub use mirrorblk_admin::Role;

/// The superblock's code for `role`.
fn role_code(role: Role) -> u32 {
    match role {
        Role::Unset => 0,
        Role::Primary => 1,
        Role::Replica => 2,
    }
}

/// The role stored as superblock code `c`, if it is one.
fn role_from_code(c: u32) -> Option<Role> {
    Some(match c {
        0 => Role::Unset,
        1 => Role::Primary,
        2 => Role::Replica,
        _ => return None,
    })
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn block_checksum(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&b[..CHECKSUM_AT])
}

fn verify_checksum(b: &[u8]) -> Result<(), FormatError> {
    let stored = get_u64(b, CHECKSUM_AT);
    let computed = block_checksum(b);
    if stored != computed {
        return Err(FormatError::BadChecksum { stored, computed });
    }
    Ok(())
}

impl Superblock {
    /// Byte offset in the journal of superblock copy `slot` (0 or 1).
    pub fn slot_offset(slot: u64) -> u64 {
        debug_assert!(slot < 2);
        slot * BLOCK
    }

    /// Encodes into a 4 KiB block.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), HEADER_BLOCK);
        assert!(self.volume_name.len() <= MAX_NAME);
        out.fill(0);
        put_u64(out, 0, SUPERBLOCK_MAGIC);
        put_u32(out, 8, FORMAT_VERSION);
        out[16..32].copy_from_slice(&self.volume_uuid);
        put_u64(out, 32, self.volume_size);
        put_u64(out, 40, self.area_len);
        put_u64(out, 48, self.epoch.0);
        put_u64(out, 56, self.checkpoint_lsn.0);
        put_u64(out, 64, self.checkpoint_pos);
        put_u64(out, 72, self.session);
        put_u64(out, 80, self.generation);
        put_u32(out, 88, self.volume_name.len() as u32);
        put_u32(out, 92, role_code(self.role));
        put_u32(out, SB_INCONSISTENT_AT, u32::from(self.inconsistent));
        out[SB_NAME_AT..SB_NAME_AT + self.volume_name.len()]
            .copy_from_slice(self.volume_name.as_bytes());
        let sum = block_checksum(out);
        put_u64(out, CHECKSUM_AT, sum);
    }

    /// Decodes and validates a 4 KiB block.
    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        if b.len() != HEADER_BLOCK {
            return Err(FormatError::BadField("superblock length"));
        }
        let magic = get_u64(b, 0);
        if magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        verify_checksum(b)?;
        let version = get_u32(b, 8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::BadVersion(version));
        }
        let name_len = get_u32(b, 88) as usize;
        if name_len > MAX_NAME {
            return Err(FormatError::BadField("volume name length"));
        }
        let volume_name = String::from_utf8(b[SB_NAME_AT..SB_NAME_AT + name_len].to_vec())
            .map_err(|_| FormatError::BadField("volume name is not UTF-8"))?;
        let mut volume_uuid = [0u8; 16];
        volume_uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            volume_uuid,
            volume_name,
            volume_size: get_u64(b, 32),
            area_len: get_u64(b, 40),
            epoch: Epoch(get_u64(b, 48)),
            checkpoint_lsn: Lsn(get_u64(b, 56)),
            checkpoint_pos: get_u64(b, 64),
            session: get_u64(b, 72),
            generation: get_u64(b, 80),
            role: role_from_code(get_u32(b, 92)).ok_or(FormatError::BadField("role"))?,
            inconsistent: get_u32(b, SB_INCONSISTENT_AT) != 0,
        };
        if sb.area_len < MIN_AREA || sb.area_len % BLOCK != 0 {
            return Err(FormatError::BadField("record area length"));
        }
        if sb.checkpoint_pos >= sb.area_len || sb.checkpoint_pos % BLOCK != 0 {
            return Err(FormatError::BadField("checkpoint position"));
        }
        if sb.checkpoint_lsn.0 == 0 {
            return Err(FormatError::BadField("checkpoint LSN 0"));
        }
        Ok(sb)
    }
}

/// What a journal entry is: a mutation, or one of the journal's own entries.
/// The codes of mutations are [`MutationOp::code`]; the journal's own kinds
/// take the codes after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A journaled mutation (a write's payload follows its header).
    Mutation(MutationOp),
    /// Filler to the end of the area; the next record is at area offset 0.
    Pad,
    /// A large write whose payload went straight to its home in the data
    /// store (durably) before this header was written: the journal holds
    /// only its metadata. Its range is aligned, and its `payload_hash` is
    /// the data's xxh3. The record still occupies the space a journaled
    /// write would (`record_len`), so it can fall back to one if the
    /// in-place write fails.
    WriteInPlace,
    /// Written (durably) in the slot of a `WriteInPlace` record before its
    /// payload goes to the store, on a primary with replicas; the record's
    /// header replaces it. Never a valid record: recovery stops at it, and
    /// marks its range out of sync for every replica (the store may hold
    /// some of that never-acknowledged data, which the replicas lack).
    InPlaceIntent,
}

const PAD_CODE: u8 = 4;
const WRITE_IN_PLACE_CODE: u8 = 5;
const IN_PLACE_INTENT_CODE: u8 = 6;

// The journal's own kinds must not take a mutation's code.
const _: () = {
    let mut i = 0;
    while i < MutationOp::ALL.len() {
        let c = MutationOp::ALL[i].code();
        assert!(c != PAD_CODE && c != WRITE_IN_PLACE_CODE && c != IN_PLACE_INTENT_CODE);
        i += 1;
    }
};

impl EntryKind {
    /// Its code in a record header.
    pub const fn code(self) -> u8 {
        match self {
            EntryKind::Mutation(op) => op.code(),
            EntryKind::Pad => PAD_CODE,
            EntryKind::WriteInPlace => WRITE_IN_PLACE_CODE,
            EntryKind::InPlaceIntent => IN_PLACE_INTENT_CODE,
        }
    }

    /// The kind with code `c`, if any.
    pub const fn from_code(c: u8) -> Option<EntryKind> {
        if let Some(op) = MutationOp::from_code(c) {
            return Some(EntryKind::Mutation(op));
        }
        Some(match c {
            PAD_CODE => EntryKind::Pad,
            WRITE_IN_PLACE_CODE => EntryKind::WriteInPlace,
            IN_PLACE_INTENT_CODE => EntryKind::InPlaceIntent,
            _ => return None,
        })
    }
}

/// Flag: the write-zeroes must leave the range allocated (NBD NO_HOLE).
pub const FLAG_NO_HOLE: u8 = 1;

/// A record header (the first 4 KiB block of every record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Sequence number (a `Pad` carries the LSN of the record after it).
    pub lsn: Lsn,
    /// Epoch of the primary that ordered it.
    pub epoch: Epoch,
    /// Session of the journal that wrote it (see [`Superblock::session`]).
    pub session: u64,
    /// What it is.
    pub kind: EntryKind,
    /// Op flags ([`FLAG_NO_HOLE`]).
    pub flags: u8,
    /// Volume byte offset.
    pub offset: u64,
    /// Volume bytes affected.
    pub length: u64,
    /// Payload bytes that follow the header (the write's data; 0 otherwise).
    pub payload_len: u64,
    /// Journal bytes this record occupies, header included (a whole number of blocks).
    pub record_len: u64,
    /// xxh3-64 of the payload bytes (0 when there is none).
    pub payload_hash: u64,
}

impl RecordHeader {
    /// Journal bytes of a record with `payload_len` payload bytes.
    pub fn record_len_for(payload_len: u64) -> u64 {
        BLOCK + align_up(payload_len)
    }

    /// Encodes into a 4 KiB block.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), HEADER_BLOCK);
        out.fill(0);
        put_u64(out, 0, RECORD_MAGIC);
        put_u64(out, 8, self.lsn.0);
        put_u64(out, 16, self.epoch.0);
        put_u64(out, 24, self.session);
        out[32] = self.kind.code();
        out[33] = self.flags;
        put_u64(out, 40, self.offset);
        put_u64(out, 48, self.length);
        put_u64(out, 56, self.payload_len);
        put_u64(out, 64, self.record_len);
        put_u64(out, 72, self.payload_hash);
        let sum = block_checksum(out);
        put_u64(out, CHECKSUM_AT, sum);
    }

    /// Decodes a 4 KiB block, checking magic, checksum and internal
    /// consistency (not continuity, which needs context).
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() != HEADER_BLOCK {
            return Err(FormatError::BadField("record header length"));
        }
        let magic = get_u64(b, 0);
        if magic != RECORD_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        verify_checksum(b)?;
        let kind = EntryKind::from_code(b[32]).ok_or(FormatError::BadField("record op"))?;
        let h = RecordHeader {
            lsn: Lsn(get_u64(b, 8)),
            epoch: Epoch(get_u64(b, 16)),
            session: get_u64(b, 24),
            kind,
            flags: b[33],
            offset: get_u64(b, 40),
            length: get_u64(b, 48),
            payload_len: get_u64(b, 56),
            record_len: get_u64(b, 64),
            payload_hash: get_u64(b, 72),
        };
        // No record carries or places more than the largest payload (and
        // its record length would overflow past it).
        let carries_data = matches!(
            kind,
            EntryKind::Mutation(MutationOp::Write)
                | EntryKind::WriteInPlace
                | EntryKind::InPlaceIntent
        );
        if carries_data && h.length > super::MAX_RECORD_PAYLOAD {
            return Err(FormatError::BadField(
                "record length past the largest payload",
            ));
        }
        match kind {
            EntryKind::Mutation(MutationOp::Write) => {
                if h.payload_len != h.length || h.record_len != Self::record_len_for(h.payload_len)
                {
                    return Err(FormatError::BadField("write record lengths"));
                }
            }
            EntryKind::Mutation(MutationOp::Trim | MutationOp::WriteZeroes) => {
                if h.payload_len != 0 || h.record_len != BLOCK {
                    return Err(FormatError::BadField("zero/trim record lengths"));
                }
            }
            EntryKind::Mutation(MutationOp::Resize) => {
                if h.payload_len != 0
                    || h.record_len != BLOCK
                    || h.length != 0
                    || h.offset == 0
                    || h.offset % BLOCK != 0
                {
                    return Err(FormatError::BadField("resize record fields"));
                }
            }
            EntryKind::Pad => {
                if h.payload_len != 0 || h.record_len < BLOCK || h.record_len % BLOCK != 0 {
                    return Err(FormatError::BadField("pad record lengths"));
                }
            }
            EntryKind::WriteInPlace | EntryKind::InPlaceIntent => {
                if h.payload_len != 0
                    || h.length == 0
                    || h.offset % BLOCK != 0
                    || h.length % BLOCK != 0
                    || h.record_len != Self::record_len_for(h.length)
                {
                    return Err(FormatError::BadField("in-place write record lengths"));
                }
            }
        }
        if h.offset.checked_add(h.length).is_none() {
            return Err(FormatError::BadField("record range overflows"));
        }
        Ok(h)
    }
}

/// One record of a batch, as its batch header describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    /// Its LSN (the batch's first LSN plus its index).
    pub lsn: Lsn,
    /// What it does.
    pub op: MutationOp,
    /// Op flags ([`FLAG_NO_HOLE`]).
    pub flags: u8,
    /// Volume byte offset (a resize: the new volume size).
    pub offset: u64,
    /// Volume bytes affected.
    pub length: u64,
    /// Bytes from the batch header to its payload: the header block, then
    /// every earlier payload padded to 4 KiB (where its payload would be,
    /// for an entry without one).
    pub payload_at: u64,
    /// xxh3-64 of its payload (0 when there is none).
    pub payload_hash: u64,
}

impl BatchEntry {
    /// Payload bytes it carries (a write's length; 0 otherwise).
    pub fn payload_len(&self) -> u64 {
        self.op.payload_len(self.length)
    }

    fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.lsn.0);
        out[8] = self.op.code();
        out[9] = self.flags;
        put_u64(out, 16, self.offset);
        put_u64(out, 24, self.length);
        put_u64(out, 32, self.payload_at);
        put_u64(out, 40, self.payload_hash);
    }

    /// Decodes one entry and checks what it can alone (its place in the
    /// batch is checked by [`BatchHeader::decode`]).
    fn decode(b: &[u8]) -> Result<BatchEntry, FormatError> {
        let op = MutationOp::from_code(b[8]).ok_or(FormatError::BadField("batch entry op"))?;
        if b[10..16].iter().any(|&x| x != 0) {
            return Err(FormatError::BadField("batch entry reserved bytes"));
        }
        let e = BatchEntry {
            lsn: Lsn(get_u64(b, 0)),
            op,
            flags: b[9],
            offset: get_u64(b, 16),
            length: get_u64(b, 24),
            payload_at: get_u64(b, 32),
            payload_hash: get_u64(b, 40),
        };
        let fields_ok = match op {
            MutationOp::Write => e.length <= super::MAX_RECORD_PAYLOAD,
            MutationOp::Trim | MutationOp::WriteZeroes => e.payload_hash == 0,
            MutationOp::Resize => {
                e.length == 0 && e.offset != 0 && e.offset % BLOCK == 0 && e.payload_hash == 0
            }
        };
        if !fields_ok || e.offset.checked_add(e.length).is_none() {
            return Err(FormatError::BadField("batch entry fields"));
        }
        Ok(e)
    }
}

/// A batch header: one 4 KiB block describing consecutive records whose
/// payloads follow it back to back, each padded to 4 KiB (see the module
/// docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Epoch of the primary that ordered its records.
    pub epoch: Epoch,
    /// Session of the journal that wrote it (see [`Superblock::session`]).
    pub session: u64,
    /// Its records, in LSN order, LSNs consecutive: 1 to [`MAX_BATCH_ENTRIES`].
    pub entries: Vec<BatchEntry>,
}

impl BatchHeader {
    /// LSN of its first record.
    pub fn first_lsn(&self) -> Lsn {
        self.entries.first().map_or(Lsn(0), |e| e.lsn)
    }

    /// Journal bytes it occupies: its header block and every padded payload.
    pub fn batch_len(&self) -> u64 {
        BLOCK
            + self
                .entries
                .iter()
                .map(|e| align_up(e.payload_len()))
                .sum::<u64>()
    }

    /// Where the payload of the entry after `prev` starts (the first one's
    /// right after the header block).
    pub fn next_payload_at(prev: Option<&BatchEntry>) -> u64 {
        prev.map_or(BLOCK, |e| e.payload_at + align_up(e.payload_len()))
    }

    /// Encodes into a 4 KiB block. The entries must be a valid batch (the
    /// journal's ring and this layout must agree: a mismatch is a bug).
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), HEADER_BLOCK);
        assert!(
            (1..=MAX_BATCH_ENTRIES).contains(&self.entries.len()),
            "batch of {} records",
            self.entries.len()
        );
        out.fill(0);
        put_u64(out, 0, BATCH_MAGIC);
        put_u64(out, 8, self.first_lsn().0);
        put_u64(out, 16, self.epoch.0);
        put_u64(out, 24, self.session);
        put_u32(out, BATCH_COUNT_AT, self.entries.len() as u32);
        put_u64(out, BATCH_LEN_AT, self.batch_len());
        let mut prev: Option<&BatchEntry> = None;
        for (i, e) in self.entries.iter().enumerate() {
            assert_eq!(
                e.lsn.0,
                self.first_lsn().0 + i as u64,
                "batch LSNs not consecutive"
            );
            assert_eq!(
                e.payload_at,
                Self::next_payload_at(prev),
                "batch payloads not back to back"
            );
            let at = BATCH_ENTRIES_AT + i * BATCH_ENTRY_LEN;
            e.encode(&mut out[at..at + BATCH_ENTRY_LEN]);
            prev = Some(e);
        }
        let sum = block_checksum(out);
        put_u64(out, CHECKSUM_AT, sum);
    }

    /// Decodes a 4 KiB block, checking magic, checksum and internal
    /// consistency: consecutive LSNs, payloads back to back, the batch
    /// length, each entry's fields (not continuity with the journal, which
    /// needs context).
    pub fn decode(b: &[u8]) -> Result<BatchHeader, FormatError> {
        if b.len() != HEADER_BLOCK {
            return Err(FormatError::BadField("batch header length"));
        }
        let magic = get_u64(b, 0);
        if magic != BATCH_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        verify_checksum(b)?;
        let count = get_u32(b, BATCH_COUNT_AT) as usize;
        if !(1..=MAX_BATCH_ENTRIES).contains(&count) || get_u32(b, BATCH_COUNT_AT + 4) != 0 {
            return Err(FormatError::BadField("batch entry count"));
        }
        let end = BATCH_ENTRIES_AT + count * BATCH_ENTRY_LEN;
        if b[end..CHECKSUM_AT].iter().any(|&x| x != 0) {
            return Err(FormatError::BadField("bytes after the batch entries"));
        }
        let first = get_u64(b, 8);
        let mut entries: Vec<BatchEntry> = Vec::with_capacity(count);
        for (i, raw) in b[BATCH_ENTRIES_AT..end]
            .chunks_exact(BATCH_ENTRY_LEN)
            .enumerate()
        {
            let e = BatchEntry::decode(raw)?;
            if first.checked_add(i as u64) != Some(e.lsn.0) {
                return Err(FormatError::BadField("batch LSNs not consecutive"));
            }
            if e.payload_at != Self::next_payload_at(entries.last()) {
                return Err(FormatError::BadField("batch payload position"));
            }
            entries.push(e);
        }
        let h = BatchHeader {
            epoch: Epoch(get_u64(b, 16)),
            session: get_u64(b, 24),
            entries,
        };
        if h.batch_len() - BLOCK > super::MAX_RECORD_PAYLOAD {
            return Err(FormatError::BadField("batch payload too large"));
        }
        if get_u64(b, BATCH_LEN_AT) != h.batch_len() {
            return Err(FormatError::BadField("batch length"));
        }
        Ok(h)
    }
}

/// A decoded header block of the record area: a record's or a batch's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderBlock {
    /// A record with its own header (versions 1 and 2; pads and in-place writes since).
    Record(RecordHeader),
    /// A batch of records sharing one header (version 3).
    Batch(BatchHeader),
}

impl HeaderBlock {
    /// Decodes a 4 KiB block of the record area as whichever header its
    /// magic names ([`FormatError::BadMagic`] for neither: the journal ends).
    pub fn decode(b: &[u8]) -> Result<HeaderBlock, FormatError> {
        if b.len() != HEADER_BLOCK {
            return Err(FormatError::BadField("header block length"));
        }
        match get_u64(b, 0) {
            RECORD_MAGIC => RecordHeader::decode(b).map(HeaderBlock::Record),
            BATCH_MAGIC => BatchHeader::decode(b).map(HeaderBlock::Batch),
            found => Err(FormatError::BadMagic { found }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::Mutation(MutationOp::Write)),
            Just(EntryKind::Mutation(MutationOp::Trim)),
            Just(EntryKind::Mutation(MutationOp::WriteZeroes)),
            Just(EntryKind::Mutation(MutationOp::Resize)),
            Just(EntryKind::Pad),
            Just(EntryKind::WriteInPlace),
            Just(EntryKind::InPlaceIntent)
        ]
    }

    fn any_header() -> impl Strategy<Value = RecordHeader> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any_kind(),
            any::<u8>(),
            0u64..1 << 50,
            0u64..=crate::journal::MAX_RECORD_PAYLOAD,
            any::<u64>(),
            1u64..1000,
        )
            .prop_map(
                |(lsn, epoch, session, kind, flags, offset, len, hash, pad_blocks)| {
                    let (length, payload_len, record_len) = match kind {
                        EntryKind::Mutation(MutationOp::Write) => {
                            (len, len, RecordHeader::record_len_for(len))
                        }
                        EntryKind::Mutation(MutationOp::Trim | MutationOp::WriteZeroes) => {
                            (len, 0, BLOCK)
                        }
                        EntryKind::Mutation(MutationOp::Resize) => (0, 0, BLOCK),
                        EntryKind::Pad => (0, 0, pad_blocks * BLOCK),
                        EntryKind::WriteInPlace | EntryKind::InPlaceIntent => {
                            let len = (len / BLOCK).max(1) * BLOCK;
                            (len, 0, RecordHeader::record_len_for(len))
                        }
                    };
                    let offset = match kind {
                        EntryKind::WriteInPlace | EntryKind::InPlaceIntent => {
                            offset / BLOCK * BLOCK
                        }
                        EntryKind::Mutation(MutationOp::Resize) => (offset / BLOCK).max(1) * BLOCK,
                        _ => offset,
                    };
                    RecordHeader {
                        lsn: Lsn(lsn),
                        epoch: Epoch(epoch),
                        session,
                        kind,
                        flags,
                        offset,
                        length,
                        payload_len,
                        record_len,
                        payload_hash: hash,
                    }
                },
            )
    }

    #[test]
    fn entry_codes_are_the_published_ones_and_distinct() {
        let kinds = [
            EntryKind::Mutation(MutationOp::Write),
            EntryKind::Mutation(MutationOp::Trim),
            EntryKind::Mutation(MutationOp::WriteZeroes),
            EntryKind::Pad,
            EntryKind::WriteInPlace,
            EntryKind::InPlaceIntent,
            EntryKind::Mutation(MutationOp::Resize),
        ];
        // Existing journals depend on these bytes (format version 1; 7 since version 2).
        let codes: Vec<u8> = kinds.iter().map(|k| k.code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7]);
        for k in kinds {
            assert_eq!(EntryKind::from_code(k.code()), Some(k));
        }
        let known = (0..=u8::MAX)
            .filter(|&c| EntryKind::from_code(c).is_some())
            .count();
        assert_eq!(known, kinds.len());
    }

    proptest! {
        #[test]
        fn record_header_round_trips(h in any_header()) {
            let mut b = vec![0u8; HEADER_BLOCK];
            h.encode(&mut b);
            prop_assert_eq!(RecordHeader::decode(&b), Ok(h));
        }

        #[test]
        fn any_flipped_bit_is_detected(h in any_header(), bit in 0usize..HEADER_BLOCK * 8) {
            let mut b = vec![0u8; HEADER_BLOCK];
            h.encode(&mut b);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(RecordHeader::decode(&b).is_err());
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), HEADER_BLOCK)) {
            let _ = RecordHeader::decode(&b);
            let _ = Superblock::decode(&b);
        }

        #[test]
        fn superblock_round_trips(uuid in any::<[u8; 16]>(), name in "[a-z0-9_-]{0,128}", size in any::<u64>(),
                                  area_blocks in 1024u64..1 << 20, epoch in any::<u64>(), lsn in 1u64..u64::MAX,
                                  pos_block in 0u64..1024, session in any::<u64>(), generation in any::<u64>()) {
            let sb = Superblock { volume_uuid: uuid, volume_name: name, volume_size: size, area_len: area_blocks * BLOCK,
                                  epoch: Epoch(epoch), checkpoint_lsn: Lsn(lsn), checkpoint_pos: pos_block * BLOCK,
                                  session, generation, role: Role::Replica, inconsistent: true };
            let mut b = vec![0u8; HEADER_BLOCK];
            sb.encode(&mut b);
            prop_assert_eq!(Superblock::decode(&b), Ok(sb));
        }
    }

    #[test]
    fn version_1_superblocks_still_open_and_unknown_versions_are_named() {
        let sb = Superblock {
            volume_uuid: [7; 16],
            volume_name: "v".into(),
            volume_size: 1 << 30,
            area_len: MIN_AREA,
            epoch: Epoch(1),
            checkpoint_lsn: Lsn(1),
            checkpoint_pos: 0,
            session: 1,
            generation: 1,
            role: Role::Primary,
            inconsistent: false,
        };
        let with_version = |v: u32| {
            let mut b = vec![0u8; HEADER_BLOCK];
            sb.encode(&mut b);
            put_u32(&mut b, 8, v);
            let sum = block_checksum(&b);
            put_u64(&mut b, CHECKSUM_AT, sum);
            b
        };
        assert_eq!(Superblock::decode(&with_version(1)), Ok(sb.clone()));
        assert_eq!(Superblock::decode(&with_version(2)), Ok(sb.clone()));
        assert_eq!(Superblock::decode(&with_version(3)), Ok(sb.clone()));
        assert_eq!(
            Superblock::decode(&with_version(4)),
            Err(FormatError::BadVersion(4))
        );
    }

    fn any_op() -> impl Strategy<Value = MutationOp> {
        prop_oneof![
            Just(MutationOp::Write),
            Just(MutationOp::Trim),
            Just(MutationOp::WriteZeroes),
            Just(MutationOp::Resize)
        ]
    }

    /// A valid batch: 1 to [`MAX_BATCH_ENTRIES`] records of any op, with
    /// payloads small enough to stay within the batch payload bound.
    fn any_batch() -> impl Strategy<Value = BatchHeader> {
        let entry = (
            any_op(),
            any::<u8>(),
            0u64..1 << 50,
            0u64..300_000,
            any::<u64>(),
        );
        (
            any::<u64>(),
            any::<u64>(),
            0u64..u64::MAX / 2,
            proptest::collection::vec(entry, 1..=MAX_BATCH_ENTRIES),
        )
            .prop_map(|(epoch, session, first, raw)| {
                let mut entries: Vec<BatchEntry> = Vec::new();
                for (i, (op, flags, offset, len, hash)) in raw.into_iter().enumerate() {
                    let (offset, length, payload_hash) = match op {
                        MutationOp::Write => (offset, len, hash),
                        MutationOp::Trim | MutationOp::WriteZeroes => (offset, len, 0),
                        MutationOp::Resize => ((offset / BLOCK).max(1) * BLOCK, 0, 0),
                    };
                    let e = BatchEntry {
                        lsn: Lsn(first + i as u64),
                        op,
                        flags,
                        offset,
                        length,
                        payload_at: BatchHeader::next_payload_at(entries.last()),
                        payload_hash,
                    };
                    entries.push(e);
                }
                BatchHeader {
                    epoch: Epoch(epoch),
                    session,
                    entries,
                }
            })
    }

    proptest! {
        #[test]
        fn batch_header_round_trips(b in any_batch()) {
            let mut blk = vec![0u8; HEADER_BLOCK];
            b.encode(&mut blk);
            prop_assert_eq!(HeaderBlock::decode(&blk), Ok(HeaderBlock::Batch(b.clone())));
            prop_assert_eq!(BatchHeader::decode(&blk), Ok(b));
        }

        #[test]
        fn any_flipped_bit_of_a_batch_header_is_detected(b in any_batch(), bit in 0usize..HEADER_BLOCK * 8) {
            let mut blk = vec![0u8; HEADER_BLOCK];
            b.encode(&mut blk);
            blk[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(HeaderBlock::decode(&blk).is_err());
        }

        /// Fields that contradict each other are refused even under a valid
        /// checksum (a bug, or a forged header): each such change once.
        #[test]
        fn an_inconsistent_batch_is_refused_under_a_valid_checksum(b in any_batch(), which in 0usize..6) {
            let mut blk = vec![0u8; HEADER_BLOCK];
            b.encode(&mut blk);
            let n = b.entries.len();
            let last = BATCH_ENTRIES_AT + (n - 1) * BATCH_ENTRY_LEN;
            match which {
                // The count past what fits, or short of the entries written.
                0 => put_u32(&mut blk, BATCH_COUNT_AT, MAX_BATCH_ENTRIES as u32 + 1),
                1 => put_u32(&mut blk, BATCH_COUNT_AT, 0),
                // The last entry's LSN out of sequence.
                2 => { let v = get_u64(&blk, last); put_u64(&mut blk, last, v + 1) },
                // Its payload position off by a block.
                3 => { let v = get_u64(&blk, last + 32); put_u64(&mut blk, last + 32, v + BLOCK) },
                // The batch length off by a block.
                4 => { let v = get_u64(&blk, BATCH_LEN_AT); put_u64(&mut blk, BATCH_LEN_AT, v + BLOCK) },
                // An unknown op.
                _ => blk[last + 8] = PAD_CODE,
            }
            let sum = block_checksum(&blk);
            put_u64(&mut blk, CHECKSUM_AT, sum);
            prop_assert!(matches!(BatchHeader::decode(&blk), Err(FormatError::BadField(_))), "case {}", which);
        }

        #[test]
        fn garbage_never_panics_as_a_batch(b in proptest::collection::vec(any::<u8>(), HEADER_BLOCK), valid_sum in any::<bool>()) {
            let mut b = b;
            put_u64(&mut b, 0, BATCH_MAGIC);
            if valid_sum {
                let sum = block_checksum(&b);
                put_u64(&mut b, CHECKSUM_AT, sum);
            }
            let _ = HeaderBlock::decode(&b);
        }
    }

    #[test]
    fn batch_layout_is_the_published_one() {
        // Existing journals depend on these (format version 3).
        assert_eq!(BATCH_MAGIC.to_le_bytes(), *b"MBLKJBAT");
        assert_eq!(MAX_BATCH_ENTRIES, 84);
        let b = BatchHeader {
            epoch: Epoch(2),
            session: 3,
            entries: vec![
                BatchEntry {
                    lsn: Lsn(10),
                    op: MutationOp::Write,
                    flags: 0,
                    offset: 4096,
                    length: 5000,
                    payload_at: BLOCK,
                    payload_hash: 77,
                },
                BatchEntry {
                    lsn: Lsn(11),
                    op: MutationOp::Trim,
                    flags: 0,
                    offset: 0,
                    length: 1 << 20,
                    payload_at: 3 * BLOCK,
                    payload_hash: 0,
                },
            ],
        };
        assert_eq!(b.batch_len(), 3 * BLOCK);
        let mut blk = vec![0u8; HEADER_BLOCK];
        b.encode(&mut blk);
        assert_eq!(get_u64(&blk, 8), 10);
        assert_eq!(get_u32(&blk, BATCH_COUNT_AT), 2);
        assert_eq!(get_u64(&blk, BATCH_LEN_AT), 3 * BLOCK);
        assert_eq!(
            get_u64(&blk, BATCH_ENTRIES_AT + BATCH_ENTRY_LEN + 32),
            3 * BLOCK
        );
    }

    #[test]
    fn a_record_longer_than_the_largest_payload_is_refused() {
        // Found by fuzzing: its record length overflowed while being checked.
        let mut b = vec![0u8; HEADER_BLOCK];
        for kind in [
            EntryKind::Mutation(MutationOp::Write),
            EntryKind::WriteInPlace,
        ] {
            let h = RecordHeader {
                lsn: Lsn(1),
                epoch: Epoch(1),
                session: 1,
                kind,
                flags: 0,
                offset: 0,
                length: u64::MAX - 100,
                payload_len: 0,
                record_len: 0,
                payload_hash: 0,
            };
            h.encode(&mut b);
            assert_eq!(
                RecordHeader::decode(&b),
                Err(FormatError::BadField(
                    "record length past the largest payload"
                ))
            );
        }
    }

    #[test]
    fn a_resize_record_carries_an_aligned_nonzero_size_and_no_range() {
        let h = RecordHeader {
            lsn: Lsn(9),
            epoch: Epoch(1),
            session: 1,
            kind: EntryKind::Mutation(MutationOp::Resize),
            flags: 0,
            offset: 2 << 30,
            length: 0,
            payload_len: 0,
            record_len: BLOCK,
            payload_hash: 0,
        };
        let mut b = vec![0u8; HEADER_BLOCK];
        h.encode(&mut b);
        assert_eq!(RecordHeader::decode(&b), Ok(h));
        for bad in [
            RecordHeader { offset: 0, ..h },
            RecordHeader { offset: 4097, ..h },
            RecordHeader { length: 4096, ..h },
        ] {
            bad.encode(&mut b);
            assert_eq!(
                RecordHeader::decode(&b),
                Err(FormatError::BadField("resize record fields"))
            );
        }
    }
}
