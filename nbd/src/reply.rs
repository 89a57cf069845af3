//! Encoding transmission-phase replies: simple replies, structured reply
//! chunks and extended reply chunks.
//!
//! These functions only build headers (and small payloads); bulk read data is
//! written by the caller straight after [`offset_data_header`] or a
//! successful [`simple_reply`] (or [`read_header`]), so it is never copied
//! here.
//!
//! A server that serves every negotiated style goes through the
//! style-aware functions at the end ([`success`], [`failure`],
//! [`read_header`], [`block_status`]): they pick the framing from the
//! session's [`ReplyStyle`] and never produce a reply the spec forbids in
//! that style (a simple reply after extended headers, an `OFFSET_DATA`
//! chunk without data).

use crate::consts;
use crate::error::ErrorCode;
use crate::handshake::Negotiated;
use crate::request::Command;

/// Size of a simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Size of a structured reply chunk header: magic, flags, type, cookie,
/// payload length.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Size of an extended reply chunk header: magic, flags, type, cookie,
/// offset, 64-bit payload length.
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;

/// Largest data length one `OFFSET_DATA` chunk can carry: its payload length
/// field also covers the 8-byte offset. Longer reads must be split.
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// Largest message an error chunk carries; the spec caps strings at 4096
/// bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = consts::MAX_STRING_LEN;

/// A simple reply header. For a successful READ the `length` data bytes
/// follow; for an error nothing follows.
pub fn simple_reply(cookie: u64, error: Option<ErrorCode>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&consts::SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.map_or(0, ErrorCode::code).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header with an arbitrary type and flags; the
/// specific helpers below are built on it.
pub fn chunk_header(
    cookie: u64,
    flags: u16,
    chunk_type: u16,
    payload_len: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&consts::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// An extended reply chunk header (`NBD_OPT_EXTENDED_HEADERS`): `offset`
/// echoes the request's offset, whatever the chunk describes.
pub fn extended_chunk_header(
    cookie: u64,
    offset: u64,
    flags: u16,
    chunk_type: u16,
    payload_len: u64,
) -> [u8; EXTENDED_CHUNK_HEADER_LEN] {
    let mut b = [0u8; EXTENDED_CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&consts::EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&payload_len.to_be_bytes());
    b
}

fn done_flag(done: bool) -> u16 {
    if done {
        consts::REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Header of an `OFFSET_DATA` chunk including its 8-byte offset; the caller
/// writes `data_len` bytes of data right after it.
///
/// `data_len` must be at most [`MAX_OFFSET_DATA_LEN`] (a longer read has to
/// be split into several chunks); larger values are clamped so nothing
/// panics, but the stream would then be corrupt. The spec also requires
/// `data_len` ≥ 1.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    let payload_len = data_len.min(MAX_OFFSET_DATA_LEN) + 8;
    let mut b = [0u8; 28];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        consts::REPLY_TYPE_OFFSET_DATA,
        payload_len,
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A complete `OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as
/// zeroes (the spec requires `hole_len` ≥ 1).
pub fn offset_hole_chunk(cookie: u64, offset: u64, hole_len: u32, done: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        consts::REPLY_TYPE_OFFSET_HOLE,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&hole_len.to_be_bytes());
    b
}

/// A `NONE` chunk with `DONE` set: ends a structured reply (success unless an
/// error chunk came before).
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(cookie, consts::REPLY_FLAG_DONE, consts::REPLY_TYPE_NONE, 0)
}

/// Cuts `s` to at most `max` bytes on a character boundary so the message
/// stays valid UTF-8.
fn bounded(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.as_bytes().get(..end).unwrap_or(&[])
}

/// A complete `ERROR` chunk. `message` (for humans) is cut to
/// [`MAX_ERROR_MESSAGE_LEN`] bytes on a character boundary.
pub fn error_chunk(cookie: u64, error: ErrorCode, message: &str, done: bool) -> Vec<u8> {
    error_chunk_inner(cookie, consts::REPLY_TYPE_ERROR, error, message, None, done)
}

/// A complete `ERROR_OFFSET` chunk: the error happened at `offset` (which
/// must lie inside the request), letting a client salvage the rest of a read.
pub fn error_offset_chunk(
    cookie: u64,
    error: ErrorCode,
    message: &str,
    offset: u64,
    done: bool,
) -> Vec<u8> {
    error_chunk_inner(
        cookie,
        consts::REPLY_TYPE_ERROR_OFFSET,
        error,
        message,
        Some(offset),
        done,
    )
}

fn error_chunk_inner(
    cookie: u64,
    chunk_type: u16,
    error: ErrorCode,
    message: &str,
    offset: Option<u64>,
    done: bool,
) -> Vec<u8> {
    let payload = error_payload(error, message, offset);
    // Bounded by 6 + 4096 + 8 bytes.
    let payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    b.extend_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        chunk_type,
        payload_len,
    ));
    b.extend_from_slice(&payload);
    b
}

/// The payload every error chunk type starts with: error, message length,
/// message (cut to [`MAX_ERROR_MESSAGE_LEN`]), then `offset` if given.
fn error_payload(error: ErrorCode, message: &str, offset: Option<u64>) -> Vec<u8> {
    let msg = bounded(message, MAX_ERROR_MESSAGE_LEN);
    // msg.len() ≤ 4096, so this conversion cannot fail.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let mut b = Vec::with_capacity(6 + msg.len() + 8);
    b.extend_from_slice(&error.code().to_be_bytes());
    b.extend_from_slice(&msg_len.to_be_bytes());
    b.extend_from_slice(msg.get(..usize::from(msg_len)).unwrap_or(&[]));
    if let Some(offset) = offset {
        b.extend_from_slice(&offset.to_be_bytes());
    }
    b
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (the spec requires it to be non-zero).
    pub length: u32,
    /// Status flags; for `base:allocation` a mix of
    /// [`consts::STATE_HOLE`] and [`consts::STATE_ZERO`].
    pub flags: u32,
}

/// Most extents one `BLOCK_STATUS` chunk can carry before its 32-bit length
/// field would overflow; extra extents are dropped (a server may legally
/// describe less than was asked).
pub const MAX_EXTENTS_PER_CHUNK: usize = ((u32::MAX - 4) / 8) as usize;

/// A complete `BLOCK_STATUS` chunk for one metadata context. The spec
/// requires at least one extent; an empty slice produces a chunk the client
/// will reject, so callers must not pass one.
pub fn block_status_chunk(cookie: u64, context_id: u32, extents: &[Extent], done: bool) -> Vec<u8> {
    let extents = extents.get(..MAX_EXTENTS_PER_CHUNK).unwrap_or(extents);
    // Bounded by MAX_EXTENTS_PER_CHUNK, so this fits in a u32; computed in
    // u64 so it cannot overflow on 32-bit targets either.
    let count = u64::try_from(extents.len()).unwrap_or(u64::MAX);
    let payload_len = u32::try_from(count.saturating_mul(8).saturating_add(4)).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN.saturating_add(payload_len as usize));
    b.extend_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        consts::REPLY_TYPE_BLOCK_STATUS,
        payload_len,
    ));
    b.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

/// One extended block status descriptor (`NBD_REPLY_TYPE_BLOCK_STATUS_EXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentExt {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Status flags; `base:allocation` uses only the low 32 bits.
    pub flags: u64,
}

/// Most extents one reply chunk carries, in either style: the spec asks
/// servers not to send more than 2^20 descriptors per chunk.
pub const MAX_EXTENTS_PER_REPLY: usize = 1 << 20;

/// A complete `BLOCK_STATUS_EXT` chunk (extended headers only) for one
/// metadata context; at most [`MAX_EXTENTS_PER_REPLY`] extents are sent.
/// The spec requires at least one extent.
pub fn block_status_ext_chunk(
    cookie: u64,
    offset: u64,
    context_id: u32,
    extents: &[ExtentExt],
    done: bool,
) -> Vec<u8> {
    let extents = extents.get(..MAX_EXTENTS_PER_REPLY).unwrap_or(extents);
    // Bounded by MAX_EXTENTS_PER_REPLY, so it fits in a u32.
    let count = u32::try_from(extents.len()).unwrap_or(u32::MAX);
    let payload_len = 8 + 16 * u64::from(count);
    let mut b = Vec::with_capacity(EXTENDED_CHUNK_HEADER_LEN + 8 + 16 * extents.len());
    b.extend_from_slice(&extended_chunk_header(
        cookie,
        offset,
        done_flag(done),
        consts::REPLY_TYPE_BLOCK_STATUS_EXT,
        payload_len,
    ));
    b.extend_from_slice(&context_id.to_be_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

// ---------------------------------------------------------------------------
// Replies in the session's negotiated style
// ---------------------------------------------------------------------------

/// How a session's replies are framed, from what was negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Neither structured replies nor extended headers: 16-byte simple
    /// replies only.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte chunks (simple replies allowed
    /// where nothing but an error value is sent, except for READ).
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte chunks for every reply.
    Extended,
}

impl ReplyStyle {
    /// The style a negotiated session uses.
    pub fn of(neg: &Negotiated) -> ReplyStyle {
        if neg.extended_headers {
            ReplyStyle::Extended
        } else if neg.structured_replies {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }
}

/// The request a reply answers: its cookie, and its offset (which extended
/// headers echo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Cookie of the request.
    pub cookie: u64,
    /// Offset of the request.
    pub offset: u64,
}

/// A complete successful reply that carries no data (any command but a
/// READ of more than zero bytes and BLOCK_STATUS): a simple reply, or with
/// extended headers a `NONE` chunk with `DONE`.
pub fn success(style: ReplyStyle, to: ReplyTo) -> Vec<u8> {
    match style {
        ReplyStyle::Simple | ReplyStyle::Structured => simple_reply(to.cookie, None).to_vec(),
        ReplyStyle::Extended => extended_chunk_header(
            to.cookie,
            to.offset,
            consts::REPLY_FLAG_DONE,
            consts::REPLY_TYPE_NONE,
            0,
        )
        .to_vec(),
    }
}

/// A complete error reply to `command`. Structured sessions get an `ERROR`
/// chunk for READ and BLOCK_STATUS (which must be answered in chunks) and a
/// simple reply otherwise; extended sessions always get an `ERROR` chunk.
pub fn failure(
    style: ReplyStyle,
    to: ReplyTo,
    command: Command,
    error: ErrorCode,
    message: &str,
) -> Vec<u8> {
    match style {
        ReplyStyle::Structured if matches!(command, Command::Read | Command::BlockStatus) => {
            error_chunk(to.cookie, error, message, true)
        }
        ReplyStyle::Simple | ReplyStyle::Structured => {
            simple_reply(to.cookie, Some(error)).to_vec()
        }
        ReplyStyle::Extended => {
            let payload = error_payload(error, message, None);
            let mut b = Vec::with_capacity(EXTENDED_CHUNK_HEADER_LEN + payload.len());
            b.extend_from_slice(&extended_chunk_header(
                to.cookie,
                to.offset,
                consts::REPLY_FLAG_DONE,
                consts::REPLY_TYPE_ERROR,
                payload.len() as u64,
            ));
            b.extend_from_slice(&payload);
            b
        }
    }
}

/// The header of a successful READ of `len` bytes at `to.offset`; the
/// caller sends exactly `len` data bytes after it. A READ of zero bytes
/// gets a complete reply with no data: under structured or extended replies
/// a lone `NONE` chunk, since an `OFFSET_DATA` chunk must carry at least
/// one byte. `len` must not exceed [`MAX_OFFSET_DATA_LEN`] (the advertised
/// maximum payload keeps it far below).
pub fn read_header(style: ReplyStyle, to: ReplyTo, len: u32) -> Vec<u8> {
    match style {
        ReplyStyle::Simple => simple_reply(to.cookie, None).to_vec(),
        ReplyStyle::Structured if len == 0 => none_chunk(to.cookie).to_vec(),
        ReplyStyle::Structured => offset_data_header(to.cookie, to.offset, len, true).to_vec(),
        ReplyStyle::Extended if len == 0 => success(style, to),
        ReplyStyle::Extended => {
            let mut b = Vec::with_capacity(EXTENDED_CHUNK_HEADER_LEN + 8);
            b.extend_from_slice(&extended_chunk_header(
                to.cookie,
                to.offset,
                consts::REPLY_FLAG_DONE,
                consts::REPLY_TYPE_OFFSET_DATA,
                8 + u64::from(len),
            ));
            b.extend_from_slice(&to.offset.to_be_bytes());
            b
        }
    }
}

/// A complete successful BLOCK_STATUS reply for one context: a
/// `BLOCK_STATUS_EXT` chunk with extended headers, else a `BLOCK_STATUS`
/// chunk, whose 32-bit lengths end the list at the first extent that does
/// not fit (cut to the largest block-aligned length that does; later
/// extents would be misplaced). `extents` must hold at least one non-empty
/// extent; `align` is the export's minimum block size. A simple session
/// cannot carry block status (BLOCK_STATUS is refused there): it gets
/// `EINVAL`.
pub fn block_status(
    style: ReplyStyle,
    to: ReplyTo,
    context_id: u32,
    extents: &[ExtentExt],
    align: u32,
) -> Vec<u8> {
    block_status_part(style, to, context_id, extents, align, true)
}

/// One context's chunk of a BLOCK_STATUS reply that carries several (one
/// chunk per selected context, the last with `done`); otherwise as
/// [`block_status`].
pub fn block_status_part(
    style: ReplyStyle,
    to: ReplyTo,
    context_id: u32,
    extents: &[ExtentExt],
    align: u32,
    done: bool,
) -> Vec<u8> {
    match style {
        ReplyStyle::Simple => simple_reply(to.cookie, Some(ErrorCode::Inval)).to_vec(),
        ReplyStyle::Extended => {
            block_status_ext_chunk(to.cookie, to.offset, context_id, extents, done)
        }
        ReplyStyle::Structured => {
            let max = u64::from(u32::MAX) - u64::from(u32::MAX) % u64::from(align.max(1));
            let mut compact = Vec::with_capacity(extents.len().min(MAX_EXTENTS_PER_REPLY));
            for e in extents.iter().take(MAX_EXTENTS_PER_REPLY) {
                let length = e.length.min(max);
                compact.push(Extent {
                    length: u32::try_from(length).unwrap_or(u32::MAX),
                    flags: u32::try_from(e.flags & u64::from(u32::MAX)).unwrap_or(0),
                });
                if length < e.length {
                    break;
                }
            }
            block_status_chunk(to.cookie, context_id, &compact, done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let b = simple_reply(0x0102_0304_0506_0708, Some(ErrorCode::Io));
        assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&b[4..8], &[0, 0, 0, 5]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&simple_reply(1, None)[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn data_header_layout() {
        let b = offset_data_header(9, 4096, 512, true);
        assert_eq!(&b[0..4], &consts::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[16..20], &520u32.to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
        // Clamped instead of overflowing.
        let b = offset_data_header(9, 0, u32::MAX, false);
        assert_eq!(&b[16..20], &u32::MAX.to_be_bytes());
        assert_eq!(&b[4..6], &[0, 0]);
    }

    #[test]
    fn hole_and_none() {
        let b = offset_hole_chunk(1, 2, 3, false);
        assert_eq!(&b[6..8], &[0, 2]);
        assert_eq!(&b[16..20], &12u32.to_be_bytes());
        assert_eq!(&b[28..32], &3u32.to_be_bytes());
        let b = none_chunk(5);
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[16..20], &[0, 0, 0, 0]);
    }

    #[test]
    fn error_message_is_bounded() {
        let long = "é".repeat(3000); // 6000 bytes
        let b = error_chunk(1, ErrorCode::Inval, &long, true);
        let msg_len = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(msg_len <= MAX_ERROR_MESSAGE_LEN);
        assert_eq!(msg_len % 2, 0, "cut on a char boundary");
        assert_eq!(b.len(), 20 + 6 + msg_len);
        assert_eq!(
            u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize,
            6 + msg_len
        );
        let b = error_offset_chunk(1, ErrorCode::Io, "x", 77, false);
        assert_eq!(b.len(), 20 + 6 + 1 + 8);
        assert_eq!(&b[6..8], &consts::REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
    }

    #[test]
    fn styled_replies_are_valid_in_every_mode() {
        let to = ReplyTo {
            cookie: 9,
            offset: 4096,
        };
        // Zero-length READ: never an OFFSET_DATA chunk without data.
        assert_eq!(
            read_header(ReplyStyle::Simple, to, 0),
            simple_reply(9, None)
        );
        assert_eq!(read_header(ReplyStyle::Structured, to, 0), none_chunk(9));
        let b = read_header(ReplyStyle::Extended, to, 0);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], &consts::EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[4..8], &[0, 1, 0, 0], "DONE, NONE");
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..32], &[0; 8]);
        // A READ with data.
        let b = read_header(ReplyStyle::Extended, to, 512);
        assert_eq!(b.len(), 40);
        assert_eq!(&b[6..8], &consts::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&b[24..32], &520u64.to_be_bytes());
        assert_eq!(&b[32..40], &4096u64.to_be_bytes());
        // Success and failure: never a simple reply in extended mode.
        assert_eq!(
            success(ReplyStyle::Extended, to),
            read_header(ReplyStyle::Extended, to, 0)
        );
        let e = failure(
            ReplyStyle::Extended,
            to,
            Command::Trim,
            ErrorCode::Inval,
            "no",
        );
        assert_eq!(&e[0..4], &consts::EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&e[6..8], &consts::REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[24..32], &8u64.to_be_bytes());
        assert_eq!(e.len(), 32 + 8);
        let e = failure(
            ReplyStyle::Structured,
            to,
            Command::Trim,
            ErrorCode::Inval,
            "no",
        );
        assert_eq!(e, simple_reply(9, Some(ErrorCode::Inval)));
        let e = failure(
            ReplyStyle::Structured,
            to,
            Command::Read,
            ErrorCode::Io,
            "no",
        );
        assert_eq!(&e[0..4], &consts::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn block_status_in_both_chunk_types() {
        let to = ReplyTo {
            cookie: 3,
            offset: 0,
        };
        let ext = [
            ExtentExt {
                length: 6 << 30,
                flags: 3,
            },
            ExtentExt {
                length: 4096,
                flags: 0,
            },
        ];
        let b = block_status(ReplyStyle::Extended, to, 1, &ext, 512);
        assert_eq!(b.len(), 32 + 8 + 32);
        assert_eq!(&b[6..8], &consts::REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&b[24..32], &40u64.to_be_bytes());
        assert_eq!(&b[36..40], &2u32.to_be_bytes());
        assert_eq!(&b[40..48], &(6u64 << 30).to_be_bytes());
        // Compact: the 6 GiB extent is cut to an aligned 32-bit length and
        // ends the list (the next extent would be misplaced).
        let b = block_status(ReplyStyle::Structured, to, 1, &ext, 512);
        assert_eq!(b.len(), 20 + 4 + 8);
        let len = u32::from_be_bytes(b[24..28].try_into().unwrap());
        assert_eq!(len, u32::MAX - 511);
    }

    #[test]
    fn block_status_layout() {
        let ext = [
            Extent {
                length: 4096,
                flags: consts::STATE_HOLE | consts::STATE_ZERO,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let b = block_status_chunk(3, 1, &ext, true);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
        assert_eq!(&b[20..24], &1u32.to_be_bytes());
        assert_eq!(&b[24..28], &4096u32.to_be_bytes());
        assert_eq!(&b[28..32], &3u32.to_be_bytes());
    }
}
