//! The replication wire format (see `docs/REPLICATION.md`), sans-I/O.
//!
//! Encoders produce bytes; decoders take untrusted bytes and return a typed
//! message or a [`WireError`] naming exactly what was wrong. No decoder
//! panics or allocates more than the frame's bounded body.

use crate::journal::MutationOp;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Frame magic: "MBRP".
pub const MAGIC: u32 = u32::from_le_bytes(*b"MBRP");
/// Protocol version spoken by this build (3: HELLO carries `receipt_acks`).
pub const VERSION: u16 = 3;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest body of a control message.
pub const MAX_CONTROL_BODY: u32 = 64 << 10;
/// Bytes of a record header inside a RECORD body.
pub const RECORD_HEADER_LEN: usize = 56;
/// Largest RECORD body (header + a 32 MiB payload).
pub const MAX_RECORD_BODY: u32 =
    crate::journal::MAX_RECORD_PAYLOAD as u32 + RECORD_HEADER_LEN as u32;
/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Primary's opening.
    Hello = 1,
    /// Replica's answer.
    HelloReply = 2,
    /// Primary's proof and start LSN.
    Auth = 3,
    /// A journal record.
    Record = 4,
    /// Replica's cumulative progress.
    Ack = 5,
    /// Liveness probe.
    Ping = 6,
    /// Liveness answer.
    Pong = 7,
    /// Fatal error; the connection closes.
    Error = 8,
    /// Region data of a resync, ordered in the record stream.
    ResyncData = 9,
    /// End of a resync: the replica is consistent again.
    ResyncDone = 10,
    /// A region's checksum, ordered in the record stream: the replica
    /// compares it with its own copy and answers with REGION_CHECK.
    ResyncCheck = 11,
    /// Replica's answer to RESYNC_CHECK: equal or not.
    RegionCheck = 12,
    /// Flush barrier (only with [`Hello::flush_barriers`]): the replica
    /// makes its journal durable up to the LSN it carries and reports that
    /// in an ACK's durable LSN.
    Barrier = 13,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Auth,
            4 => Kind::Record,
            5 => Kind::Ack,
            6 => Kind::Ping,
            7 => Kind::Pong,
            8 => Kind::Error,
            9 => Kind::ResyncData,
            10 => Kind::ResyncDone,
            11 => Kind::ResyncCheck,
            12 => Kind::RegionCheck,
            13 => Kind::Barrier,
            _ => return None,
        })
    }

    /// The largest body this kind may carry.
    pub fn max_body(self) -> u32 {
        if self == Kind::Record || self == Kind::ResyncData {
            MAX_RECORD_BODY
        } else {
            MAX_CONTROL_BODY
        }
    }
}

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with the magic.
    #[error("bad frame magic {0:#010x} (not a mirrorblk replication peer?)")]
    BadMagic(u32),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// Body longer than its kind allows.
    #[error("{kind:?} body of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The kind.
        kind: Kind,
        /// Its announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// Body shorter than its fields.
    #[error("{0} message truncated")]
    Truncated(&'static str),
    /// A text field is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    BadText(&'static str),
    /// A record header's checksum does not match.
    #[error("record header checksum mismatch (LSN field {lsn})")]
    BadRecordChecksum {
        /// The LSN field as received (not trustworthy).
        lsn: u64,
    },
    /// A field holds an impossible value.
    #[error("invalid {0}")]
    BadField(&'static str),
    /// A RECORD carries an op code this build does not know.
    #[error("record LSN {lsn} has unknown op {code}")]
    UnknownOp {
        /// The record's LSN.
        lsn: u64,
        /// The op code received.
        code: u8,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message kind.
    pub kind: Kind,
    /// Body length.
    pub len: u32,
}

/// Encodes a frame header.
pub fn frame_header(kind: Kind, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = kind as u8;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b
}

/// Decodes and bounds-checks a frame header.
pub fn decode_frame_header(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = Kind::from_u8(b[4]).ok_or(WireError::BadKind(b[4]))?;
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if len > kind.max_body() {
        return Err(WireError::TooLong {
            kind,
            len,
            max: kind.max_body(),
        });
    }
    Ok(FrameHeader { kind, len })
}

/// A whole control frame: header + body.
pub fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    v.extend_from_slice(&frame_header(kind, body.len() as u32));
    v.extend_from_slice(body);
    v
}

/// Reads fields from a body, failing with the message's name when short.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn text(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::BadText(field))
    }
}

fn put_text(v: &mut Vec<u8>, s: &str) {
    // Texts are names and messages; longer ones are cut at a char boundary.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    v.extend_from_slice(&(end as u16).to_le_bytes());
    v.extend_from_slice(&s.as_bytes()[..end]);
}

/// The primary's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Volume name.
    pub volume: String,
    /// Volume UUID on the primary.
    pub uuid: [u8; 16],
    /// Volume size in bytes.
    pub size: u64,
    /// Primary's epoch.
    pub epoch: u64,
    /// Primary's node name.
    pub node: String,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Whether the primary waits on receipt (flush mode): the replica then
    /// ACKs every advance of its received LSN, not only of its durable one.
    /// Otherwise those extra ACKs would cost a send per receive for nothing.
    pub receipt_acks: bool,
    /// Whether the primary runs `--durability flush`: it sends BARRIER
    /// frames for its FLUSH and FUA requests, and the replica's ACKs carry
    /// in `received` the highest LSN *written* to its journal (what a
    /// write is acknowledged on in that mode), not merely received. A
    /// replica that does not know the bit refuses the HELLO.
    pub flush_barriers: bool,
}

/// HELLO flag bit: [`Hello::receipt_acks`].
const HELLO_RECEIPT_ACKS: u8 = 1;
/// HELLO flag bit: [`Hello::flush_barriers`].
const HELLO_FLUSH_BARRIERS: u8 = 2;

impl Hello {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(&self.version.to_le_bytes());
        put_text(&mut v, &self.volume);
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        put_text(&mut v, &self.node);
        v.extend_from_slice(&self.nonce);
        let mut flags = 0;
        if self.receipt_acks {
            flags |= HELLO_RECEIPT_ACKS;
        }
        if self.flush_barriers {
            flags |= HELLO_FLUSH_BARRIERS;
        }
        v.push(flags);
        v
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        let mut r = Reader { b, what: "HELLO" };
        let version = r.u16()?;
        let volume = r.text("volume name")?;
        let uuid = r.array()?;
        let size = r.u64()?;
        let epoch = r.u64()?;
        let node = r.text("node name")?;
        let nonce = r.array()?;
        // Only this version's layout is known past the nonce: any other
        // version decodes this far and the version check then refuses it by
        // name (rather than as a truncated or malformed message).
        let flags = if version == VERSION { r.u8()? } else { 0 };
        if flags & !(HELLO_RECEIPT_ACKS | HELLO_FLUSH_BARRIERS) != 0 {
            return Err(WireError::BadField("HELLO flags"));
        }
        Ok(Hello {
            version,
            volume,
            uuid,
            size,
            epoch,
            node,
            nonce,
            receipt_acks: flags & HELLO_RECEIPT_ACKS != 0,
            flush_barriers: flags & HELLO_FLUSH_BARRIERS != 0,
        })
    }
}

/// Why a replica refuses a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// Proceed.
    Accept = 0,
    /// Protocol version not spoken.
    BadVersion = 1,
    /// No such volume on this node.
    UnknownVolume = 2,
    /// Volume sizes differ.
    SizeMismatch = 3,
    /// The replica's epoch is newer: the sender is a stale primary.
    StaleEpoch = 4,
    /// The replica is itself primary in the same epoch.
    SplitBrain = 5,
    /// The replica is busy with another primary.
    Busy = 6,
}

impl ReplyStatus {
    fn from_u8(v: u8) -> Option<ReplyStatus> {
        Some(match v {
            0 => ReplyStatus::Accept,
            1 => ReplyStatus::BadVersion,
            2 => ReplyStatus::UnknownVolume,
            3 => ReplyStatus::SizeMismatch,
            4 => ReplyStatus::StaleEpoch,
            5 => ReplyStatus::SplitBrain,
            6 => ReplyStatus::Busy,
            _ => return None,
        })
    }
}

/// The replica's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Protocol version.
    pub version: u16,
    /// Accept, or why not.
    pub status: ReplyStatus,
    /// Human explanation of a refusal.
    pub message: String,
    /// Replica's node name.
    pub node: String,
    /// Volume UUID on the replica (zero if it has none yet).
    pub uuid: [u8; 16],
    /// Replica's epoch.
    pub epoch: u64,
    /// Highest LSN durable in the replica's journal.
    pub durable: u64,
    /// The replica's state flags (the byte once documented as its role).
    pub flags: ReplyFlags,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Proof of the secret.
    pub mac: [u8; MAC_LEN],
}

/// The flags byte of a HELLO_REPLY. Kept as the raw byte: the primary
/// checks the replica's MAC over the re-encoded body, so bits this version
/// does not know must survive decoding unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyFlags(u8);

impl ReplyFlags {
    /// Bit 1: the replica's last resync did not finish (it is Inconsistent).
    pub const INCONSISTENT: u8 = 1 << 1;

    /// The flags of a replica that is, or is not, Inconsistent.
    pub fn new(inconsistent: bool) -> ReplyFlags {
        ReplyFlags(if inconsistent { Self::INCONSISTENT } else { 0 })
    }

    /// The flags as they are on the wire.
    pub fn from_bits(bits: u8) -> ReplyFlags {
        ReplyFlags(bits)
    }

    /// The byte on the wire.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The replica's last resync did not finish.
    pub fn inconsistent(self) -> bool {
        self.0 & Self::INCONSISTENT != 0
    }
}

impl HelloReply {
    /// The body without the MAC (what the MAC covers).
    pub fn unsigned(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(160);
        v.extend_from_slice(&self.version.to_le_bytes());
        v.push(self.status as u8);
        put_text(&mut v, &self.message);
        put_text(&mut v, &self.node);
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.durable.to_le_bytes());
        v.push(self.flags.bits());
        v.extend_from_slice(&self.nonce);
        v
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.unsigned();
        v.extend_from_slice(&self.mac);
        v
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<HelloReply, WireError> {
        let mut r = Reader {
            b,
            what: "HELLO_REPLY",
        };
        let version = r.u16()?;
        let status = ReplyStatus::from_u8(r.u8()?).ok_or(WireError::BadField("reply status"))?;
        Ok(HelloReply {
            version,
            status,
            message: r.text("refusal message")?,
            node: r.text("node name")?,
            uuid: r.array()?,
            epoch: r.u64()?,
            durable: r.u64()?,
            flags: ReplyFlags::from_bits(r.u8()?),
            nonce: r.array()?,
            mac: r.array()?,
        })
    }
}

/// The primary's proof and where the stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Proof of the secret.
    pub mac: [u8; MAC_LEN],
    /// First LSN the primary sends.
    pub start_lsn: u64,
    /// The replica cannot catch up from the journal: it must rebase its LSN
    /// sequence at `start_lsn` and take a full resync (it is Inconsistent
    /// until RESYNC_DONE).
    pub resync: bool,
}

impl Auth {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.mac.to_vec();
        v.extend_from_slice(&self.start_lsn.to_le_bytes());
        v.push(u8::from(self.resync));
        v
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<Auth, WireError> {
        let mut r = Reader { b, what: "AUTH" };
        Ok(Auth {
            mac: r.array()?,
            start_lsn: r.u64()?,
            resync: r.u8()? != 0,
        })
    }
}

/// Header of a RESYNC_DATA body (`length` data bytes follow) and the whole
/// body of a RESYNC_CHECK (no data: `hash` is the primary's checksum of the
/// region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncHeader {
    /// The region's data is the primary's as of after this LSN: the replica
    /// writes it once every record up to it is applied.
    pub after_lsn: u64,
    /// Volume byte offset (block aligned).
    pub offset: u64,
    /// Bytes (block aligned, at most 4 MiB).
    pub length: u64,
    /// xxh3-64 of the data.
    pub hash: u64,
    /// Sequence number of this resync frame on the connection (from 1): the
    /// replica reports the highest one whose effect is durable in its ACKs.
    pub seq: u64,
}

/// Bytes of a resync header.
pub const RESYNC_HEADER_LEN: usize = 48;

impl ResyncHeader {
    /// Encodes.
    pub fn encode(&self) -> [u8; RESYNC_HEADER_LEN] {
        let mut b = [0u8; RESYNC_HEADER_LEN];
        b[0..8].copy_from_slice(&self.after_lsn.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..32].copy_from_slice(&self.hash.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        // 40..48 reserved, zero.
        b
    }

    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<ResyncHeader, WireError> {
        let mut r = Reader {
            b,
            what: "RESYNC_DATA",
        };
        let h = ResyncHeader {
            after_lsn: r.u64()?,
            offset: r.u64()?,
            length: r.u64()?,
            hash: r.u64()?,
            seq: r.u64()?,
        };
        if r.u64()? != 0 {
            return Err(WireError::BadField("resync header reserved bytes"));
        }
        if !crate::units::is_aligned(h.offset)
            || !crate::units::is_aligned(h.length)
            || h.length > 4 << 20
        {
            return Err(WireError::BadField("resync region"));
        }
        Ok(h)
    }
}

/// HMAC-SHA256 of `label ‖ parts…` under `secret`.
pub fn mac(secret: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks a MAC in constant time.
pub fn verify_mac(secret: &[u8], label: &[u8], parts: &[&[u8]], tag: &[u8; MAC_LEN]) -> bool {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// Label of the replica's MAC.
pub const REPLICA_LABEL: &[u8] = b"mirrorblk-replica";
/// Label of the primary's MAC.
pub const PRIMARY_LABEL: &[u8] = b"mirrorblk-primary";

/// The header of a RECORD body; the payload follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Sequence number.
    pub lsn: u64,
    /// Epoch of the primary that ordered it.
    pub epoch: u64,
    /// What it does (its [`MutationOp::code`] on the wire).
    pub op: MutationOp,
    /// Op flags (journal flags).
    pub flags: u8,
    /// Volume byte offset.
    pub offset: u64,
    /// Volume bytes affected (and payload bytes, for a write).
    pub length: u64,
    /// xxh3-64 of the payload (0 without one).
    pub payload_hash: u64,
}

impl RecordHeader {
    /// Payload bytes that follow this header.
    pub fn payload_len(&self) -> u64 {
        self.op.payload_len(self.length)
    }

    /// Encodes, with the header checksum.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..8].copy_from_slice(&self.lsn.to_le_bytes());
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16] = self.op.code();
        b[17] = self.flags;
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_hash.to_le_bytes());
        let h = xxhash_rust::xxh3::xxh3_64(&b[..48]);
        b[48..56].copy_from_slice(&h.to_le_bytes());
        b
    }

    /// Decodes and verifies the header checksum and fields.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, WireError> {
        let mut r = Reader { b, what: "RECORD" };
        let lsn = r.u64()?;
        let epoch = r.u64()?;
        let op_code = r.u8()?;
        let flags = r.u8()?;
        r.take(6)?;
        let offset = r.u64()?;
        let length = r.u64()?;
        let payload_hash = r.u64()?;
        let stored = r.u64()?;
        if stored != xxhash_rust::xxh3::xxh3_64(&b[..48]) {
            return Err(WireError::BadRecordChecksum { lsn });
        }
        let op =
            MutationOp::from_code(op_code).ok_or(WireError::UnknownOp { lsn, code: op_code })?;
        if offset.checked_add(length).is_none() {
            return Err(WireError::BadField("record range"));
        }
        let h = RecordHeader {
            lsn,
            epoch,
            op,
            flags,
            offset,
            length,
            payload_hash,
        };
        if h.payload_len() > (MAX_RECORD_BODY as u64 - RECORD_HEADER_LEN as u64) {
            return Err(WireError::BadField("record payload length"));
        }
        Ok(h)
    }
}

/// Replica progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Highest LSN received and journaled in order (maybe not durable yet);
    /// with [`Hello::flush_barriers`], highest LSN whose journal write
    /// completed.
    pub received: u64,
    /// Highest LSN durable in the replica's journal.
    pub durable: u64,
    /// Highest resync frame sequence number whose effect (region written,
    /// or found equal) is durable in the replica's store (0: none).
    pub resync_durable: u64,
}

/// Bytes of an ACK body.
pub const ACK_LEN: usize = 24;

impl Ack {
    /// Encodes the body.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[..8].copy_from_slice(&self.received.to_le_bytes());
        b[8..16].copy_from_slice(&self.durable.to_le_bytes());
        b[16..].copy_from_slice(&self.resync_durable.to_le_bytes());
        b
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<Ack, WireError> {
        let mut r = Reader { b, what: "ACK" };
        Ok(Ack {
            received: r.u64()?,
            durable: r.u64()?,
            resync_durable: r.u64()?,
        })
    }
}

/// A flush barrier: every LSN up to `lsn` must become durable on the
/// replica (primary → replica, only with [`Hello::flush_barriers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    /// The highest LSN the barrier covers (sent after its record).
    pub lsn: u64,
}

/// Bytes of a BARRIER body.
pub const BARRIER_LEN: usize = 8;

impl Barrier {
    /// Encodes the body.
    pub fn encode(&self) -> [u8; BARRIER_LEN] {
        self.lsn.to_le_bytes()
    }

    /// Decodes a body: exactly one u64, an LSN of at least 1.
    pub fn decode(b: &[u8]) -> Result<Barrier, WireError> {
        if b.len() > BARRIER_LEN {
            return Err(WireError::BadField("BARRIER length"));
        }
        let lsn = Reader { b, what: "BARRIER" }.u64()?;
        if lsn == 0 {
            return Err(WireError::BadField("BARRIER LSN 0"));
        }
        Ok(Barrier { lsn })
    }
}

/// The replica's answer to one RESYNC_CHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionCheck {
    /// The check's sequence number.
    pub seq: u64,
    /// Its region's offset.
    pub offset: u64,
    /// Whether the replica's copy has the same checksum.
    pub equal: bool,
}

/// Bytes of a REGION_CHECK body.
pub const REGION_CHECK_LEN: usize = 24;

impl RegionCheck {
    /// Encodes the body.
    pub fn encode(&self) -> [u8; REGION_CHECK_LEN] {
        let mut b = [0u8; REGION_CHECK_LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16] = u8::from(self.equal);
        b
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<RegionCheck, WireError> {
        let mut r = Reader {
            b,
            what: "REGION_CHECK",
        };
        let seq = r.u64()?;
        let offset = r.u64()?;
        let flags = r.u64()?;
        if flags > 1 {
            return Err(WireError::BadField("region check flags"));
        }
        Ok(RegionCheck {
            seq,
            offset,
            equal: flags == 1,
        })
    }
}

/// Decodes a PING or PONG body.
pub fn decode_stamp(b: &[u8]) -> Result<u64, WireError> {
    Reader {
        b,
        what: "PING/PONG",
    }
    .u64()
}

/// A fatal error report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Machine-readable code (a [`ReplyStatus`] value or 100+ for stream errors).
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

impl ErrorMsg {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.code.to_le_bytes().to_vec();
        put_text(&mut v, &self.message);
        v
    }

    /// Decodes a body.
    pub fn decode(b: &[u8]) -> Result<ErrorMsg, WireError> {
        let mut r = Reader { b, what: "ERROR" };
        Ok(ErrorMsg {
            code: r.u16()?,
            message: r.text("error message")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A RECORD header carrying op code `code`, with a valid checksum.
    fn record_with_op_code(code: u8) -> [u8; RECORD_HEADER_LEN] {
        let h = RecordHeader {
            lsn: 7,
            epoch: 2,
            op: MutationOp::Trim,
            flags: 0,
            offset: 4096,
            length: 4096,
            payload_hash: 0,
        };
        let mut b = h.encode();
        b[16] = code;
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..48]);
        b[48..56].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The Inconsistent flag is bit 1 of the byte after the durable LSN,
    /// as replicas of earlier versions send it.
    #[test]
    fn reply_flags_inconsistent_is_bit_1_after_durable() {
        let reply = |inconsistent| HelloReply {
            version: VERSION,
            status: ReplyStatus::Accept,
            message: String::new(),
            node: "b".into(),
            uuid: [0; 16],
            epoch: 0,
            durable: 0,
            flags: ReplyFlags::new(inconsistent),
            nonce: [0; NONCE_LEN],
            mac: [0; MAC_LEN],
        };
        // version, status, message "", node "b", uuid, epoch, durable
        let at = 2 + 1 + 2 + (2 + 1) + 16 + 8 + 8;
        assert_eq!(reply(true).encode()[at], 0b10);
        assert_eq!(reply(false).encode()[at], 0);
        let mut body = reply(false).encode();
        body[at] = 0b10;
        assert!(HelloReply::decode(&body).unwrap().flags.inconsistent());
        body[at] = 0b01;
        assert!(!HelloReply::decode(&body).unwrap().flags.inconsistent());
    }

    #[test]
    fn unknown_record_ops_are_rejected_at_decode() {
        for code in 0..=u8::MAX {
            let got = RecordHeader::decode(&record_with_op_code(code));
            match MutationOp::from_code(code) {
                Some(op) => assert_eq!(got.map(|h| h.op), Ok(op)),
                None => assert_eq!(got, Err(WireError::UnknownOp { lsn: 7, code })),
            }
        }
        // The journal's own entry kinds (pad, in-place) never travel.
        assert_eq!(
            RecordHeader::decode(&record_with_op_code(4)),
            Err(WireError::UnknownOp { lsn: 7, code: 4 })
        );
    }

    proptest! {
        #[test]
        fn record_header_round_trips(lsn in any::<u64>(), epoch in any::<u64>(), op in proptest::sample::select(MutationOp::ALL.to_vec()), flags in any::<u8>(),
                                     offset in 0u64..1 << 50, length in 0u64..1 << 24, hash in any::<u64>()) {
            let h = RecordHeader { lsn, epoch, op, flags, offset, length, payload_hash: hash };
            prop_assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn record_header_bit_flips_are_caught(bit in 0usize..RECORD_HEADER_LEN * 8) {
            let h = RecordHeader { lsn: 7, epoch: 2, op: MutationOp::Write, flags: 0, offset: 4096, length: 4096, payload_hash: 99 };
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            // Flipping a reserved byte keeps the fields but breaks the checksum too.
            prop_assert!(RecordHeader::decode(&b).is_err());
        }

        #[test]
        fn hello_round_trips(volume in "[a-z0-9]{1,40}", node in "[a-z0-9-]{0,40}", uuid in any::<[u8; 16]>(),
                             size in any::<u64>(), epoch in any::<u64>(), nonce in any::<[u8; 32]>(),
                             receipt_acks in any::<bool>(), flush_barriers in any::<bool>()) {
            let h = Hello { version: VERSION, volume, uuid, size, epoch, node, nonce, receipt_acks, flush_barriers };
            prop_assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn hello_reply_round_trips(node in "[a-z]{0,20}", message in ".{0,60}", durable in any::<u64>(), flags in any::<u8>(),
                                   status in 0u8..7, nonce in any::<[u8; 32]>(), mac in any::<[u8; 32]>()) {
            let r = HelloReply { version: VERSION, status: ReplyStatus::from_u8(status).unwrap(), message, node,
                                 uuid: [3; 16], epoch: 5, durable, flags: ReplyFlags::from_bits(flags), nonce, mac };
            prop_assert_eq!(HelloReply::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn barrier_round_trips(lsn in 1u64..) {
            let b = Barrier { lsn };
            prop_assert_eq!(Barrier::decode(&b.encode()), Ok(b));
            let mut framed = frame(Kind::Barrier, &b.encode());
            let h = decode_frame_header(framed[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
            prop_assert_eq!((h.kind, h.len as usize), (Kind::Barrier, BARRIER_LEN));
            prop_assert_eq!(Barrier::decode(&framed.split_off(FRAME_HEADER_LEN)), Ok(b));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Hello::decode(&b);
            let _ = HelloReply::decode(&b);
            let _ = Auth::decode(&b);
            let _ = Ack::decode(&b);
            let _ = Barrier::decode(&b);
            let _ = RegionCheck::decode(&b);
            let _ = ResyncHeader::decode(&b);
            let _ = ErrorMsg::decode(&b);
            let _ = decode_stamp(&b);
            if b.len() >= RECORD_HEADER_LEN {
                let mut a = [0u8; RECORD_HEADER_LEN];
                a.copy_from_slice(&b[..RECORD_HEADER_LEN]);
                let _ = RecordHeader::decode(&a);
            }
            if b.len() >= FRAME_HEADER_LEN {
                let mut a = [0u8; FRAME_HEADER_LEN];
                a.copy_from_slice(&b[..FRAME_HEADER_LEN]);
                let _ = decode_frame_header(&a);
            }
        }
    }

    proptest! {
        #[test]
        fn resync_header_round_trips(after in any::<u64>(), block in 0u64..1 << 40, blocks in 1u64..=1024,
                                     hash in any::<u64>(), seq in any::<u64>()) {
            let h = ResyncHeader { after_lsn: after, offset: block * 4096, length: blocks * 4096, hash, seq };
            prop_assert_eq!(ResyncHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn ack_and_region_check_round_trip(a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), equal in any::<bool>()) {
            let ack = Ack { received: a, durable: b, resync_durable: c };
            prop_assert_eq!(Ack::decode(&ack.encode()), Ok(ack));
            let rc = RegionCheck { seq: a, offset: b, equal };
            prop_assert_eq!(RegionCheck::decode(&rc.encode()), Ok(rc));
        }
    }

    #[test]
    fn frame_header_bounds() {
        assert_eq!(
            decode_frame_header(&frame_header(Kind::Ack, 16)),
            Ok(FrameHeader {
                kind: Kind::Ack,
                len: 16
            })
        );
        assert!(matches!(
            decode_frame_header(&frame_header(Kind::Ack, MAX_CONTROL_BODY + 1)),
            Err(WireError::TooLong { .. })
        ));
        assert!(decode_frame_header(&frame_header(Kind::Record, MAX_RECORD_BODY)).is_ok());
        let mut b = frame_header(Kind::Ping, 8);
        b[0] ^= 1;
        assert!(matches!(
            decode_frame_header(&b),
            Err(WireError::BadMagic(_))
        ));
        b = frame_header(Kind::Ping, 8);
        b[4] = 99;
        assert_eq!(decode_frame_header(&b), Err(WireError::BadKind(99)));
    }

    #[test]
    fn macs_bind_secret_and_transcript() {
        let t = mac(b"secret", REPLICA_LABEL, &[b"hello", b"reply"]);
        assert!(verify_mac(
            b"secret",
            REPLICA_LABEL,
            &[b"hello", b"reply"],
            &t
        ));
        assert!(!verify_mac(
            b"other",
            REPLICA_LABEL,
            &[b"hello", b"reply"],
            &t
        ));
        assert!(!verify_mac(
            b"secret",
            PRIMARY_LABEL,
            &[b"hello", b"reply"],
            &t
        ));
        assert!(!verify_mac(
            b"secret",
            REPLICA_LABEL,
            &[b"hellO", b"reply"],
            &t
        ));
    }

    #[test]
    fn hello_of_another_version_decodes_for_a_refusal_by_name() {
        let h = Hello {
            version: VERSION,
            volume: "vol0".into(),
            uuid: [1; 16],
            size: 1 << 30,
            epoch: 3,
            node: "n1".into(),
            nonce: [2; NONCE_LEN],
            receipt_acks: true,
            flush_barriers: false,
        };
        let v3 = h.encode();
        // A version 2 primary sends no flags byte.
        let mut v2 = v3[..v3.len() - 1].to_vec();
        v2[..2].copy_from_slice(&2u16.to_le_bytes());
        let d = Hello::decode(&v2).expect("decodes far enough to refuse");
        assert_eq!((d.version, d.receipt_acks), (2, false));
        // A later version may put anything after the nonce.
        let mut v4 = v3.clone();
        v4[..2].copy_from_slice(&4u16.to_le_bytes());
        *v4.last_mut().expect("flags byte") = 0xff;
        v4.extend_from_slice(b"future fields");
        assert_eq!(Hello::decode(&v4).map(|d| d.version), Ok(4));
        // This version with an unknown flag, or cut before its flags: refused.
        let mut bad = v3.clone();
        *bad.last_mut().expect("flags byte") = 0x04;
        assert_eq!(Hello::decode(&bad), Err(WireError::BadField("HELLO flags")));
        assert_eq!(
            Hello::decode(&v3[..v3.len() - 1]),
            Err(WireError::Truncated("HELLO"))
        );
    }
}
