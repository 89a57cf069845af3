//! Encoding transmission-phase replies: simple replies and structured reply
//! chunks.
//!
//! These functions only build headers (and small payloads); bulk read data is
//! written by the caller straight after [`offset_data_header`] or a
//! successful [`simple_reply`], so it is never copied here.

use crate::consts;
use crate::error::ErrorCode;

/// Size of a simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Size of a structured reply chunk header: magic, flags, type, cookie,
/// payload length.
pub const CHUNK_HEADER_LEN: usize = 20;

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
    let msg = bounded(message, MAX_ERROR_MESSAGE_LEN);
    // msg.len() ≤ 4096, so these conversions cannot fail.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let payload_len = 6 + u32::from(msg_len) + if offset.is_some() { 8 } else { 0 };
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + payload_len as usize);
    b.extend_from_slice(&chunk_header(
        cookie,
        done_flag(done),
        chunk_type,
        payload_len,
    ));
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
