//! The client side of the protocol: encoders for what a client sends,
//! decoders for what a server answers, and a small blocking [`Client`] over
//! any `Read + Write` stream.
//!
//! This exists so tests and tools can talk to an NBD server without a C
//! library; it is deliberately simple (one thread, blocking I/O) but strict:
//! every server reply is validated and every buffer it allocates is bounded
//! by what the client itself asked for.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};

use crate::consts;
use crate::error::{ErrorCode, ProtocolError};
use crate::handshake::ExportInfo;
use crate::reply::{Extent, ExtentExt};
use crate::request::{
    Command, CommandFlags, Request, EXTENDED_REQUEST_HEADER_LEN, REQUEST_HEADER_LEN,
};

/// Largest option reply payload the client accepts. Server replies carry at
/// most a couple of 4096-byte strings, so anything bigger is a broken server.
pub const MAX_OPTION_REPLY_DATA: u32 = 1 << 20;

/// Most replies the client reads for one option before giving up (bounds an
/// endless `NBD_OPT_LIST`).
pub const MAX_OPTION_REPLIES: usize = 1 << 16;

/// Largest payload accepted for structured chunks other than `OFFSET_DATA`
/// (whose bound is the read length).
pub const MAX_CHUNK_PAYLOAD: u32 = 1 << 20;

// ---------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------

/// A request header as the client sends it (payload, if any, follows).
pub fn encode_request(req: &Request) -> [u8; REQUEST_HEADER_LEN] {
    req.encode()
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An option: `IHAVEOPT`, option code, data length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(consts::OPTION_HEADER_LEN.saturating_add(data.len()));
    v.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and the information
/// types requested.
pub fn encode_info_request(name: &str, info_requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    let count = u16::try_from(info_requests.len()).unwrap_or(u16::MAX);
    v.extend_from_slice(&count.to_be_bytes());
    for r in info_requests.iter().take(usize::from(count)) {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export
/// name and queries.
pub fn encode_meta_context_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&len_u32(queries.len()).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&len_u32(q.len()).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

// ---------------------------------------------------------------------------
// Decoders
// ---------------------------------------------------------------------------

/// Reads big-endian integers from a byte slice without fallible indexing.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Cursor<'a> {
        Cursor { rest: b }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.rest.len() {
            return Err(ProtocolError::MalformedReply("field runs past the end"));
        }
        let (h, t) = self.rest.split_at(n);
        self.rest = t;
        Ok(h)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        self.bytes(N)?
            .try_into()
            .map_err(|_| ProtocolError::MalformedReply("field runs past the end"))
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.array().map(u64::from_be_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::MalformedReply("string is not UTF-8"))
}

/// Checks the 18-byte server greeting and returns the handshake flags.
/// Fails unless it is fixed newstyle.
pub fn decode_greeting(greeting: &[u8; consts::GREETING_LEN]) -> Result<u16, ProtocolError> {
    let mut c = Cursor::new(greeting);
    let magic = c.u64()?;
    let option_magic = c.u64()?;
    let flags = c.u16()?;
    if magic != consts::NBDMAGIC || option_magic != consts::IHAVEOPT {
        return Err(ProtocolError::BadGreeting {
            magic,
            option_magic,
        });
    }
    if flags & consts::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// A decoded option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option this answers.
    pub option: u32,
    /// `NBD_REP_*` type.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Whether this is an error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply_type & consts::REP_FLAG_ERROR != 0
    }
}

/// Decodes an option reply header; fails on a wrong magic.
pub fn decode_option_reply(
    header: &[u8; consts::OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtocolError> {
    let mut c = Cursor::new(header);
    let magic = c.u64()?;
    if magic != consts::REPLY_MAGIC {
        return Err(ProtocolError::BadOptionReplyMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: c.u32()?,
        reply_type: c.u32()?,
        length: c.u32()?,
    })
}

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// Error value; zero on success.
    pub error: u32,
    /// Cookie of the request answered.
    pub cookie: u64,
}

/// Decodes a simple reply header; fails on a wrong magic.
pub fn decode_simple_reply(header: &[u8; 16]) -> Result<SimpleReplyHeader, ProtocolError> {
    let mut c = Cursor::new(header);
    let magic = c.u32()?;
    if magic != consts::SIMPLE_REPLY_MAGIC {
        return Err(ProtocolError::BadReplyMagic(magic));
    }
    Ok(SimpleReplyHeader {
        error: c.u32()?,
        cookie: c.u64()?,
    })
}

/// A decoded structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Length of the payload that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk for its cookie.
    pub fn is_done(&self) -> bool {
        self.flags & consts::REPLY_FLAG_DONE != 0
    }

    /// Whether this is an error chunk (bit 15 of the type).
    pub fn is_error(&self) -> bool {
        self.chunk_type & consts::REPLY_TYPE_FLAG_ERROR != 0
    }
}

/// Decodes a structured reply chunk header; fails on a wrong magic.
pub fn decode_chunk_header(header: &[u8; 20]) -> Result<ChunkHeader, ProtocolError> {
    let mut c = Cursor::new(header);
    let magic = c.u32()?;
    if magic != consts::STRUCTURED_REPLY_MAGIC {
        return Err(ProtocolError::BadReplyMagic(magic));
    }
    Ok(ChunkHeader {
        flags: c.u16()?,
        chunk_type: c.u16()?,
        cookie: c.u64()?,
        length: c.u32()?,
    })
}

/// A decoded extended reply chunk header (`NBD_OPT_EXTENDED_HEADERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedChunkHeader {
    /// The fields a structured chunk header has too; `length` is the 64-bit
    /// payload length cut to 32 bits only after [`MAX_CHUNK_PAYLOAD`] was
    /// checked (see [`decode_extended_chunk_header`]).
    pub chunk: ChunkHeader,
    /// The request's offset, echoed.
    pub offset: u64,
}

/// Decodes an extended reply chunk header; fails on a wrong magic or a
/// payload longer than [`MAX_CHUNK_PAYLOAD`] plus a READ's worth
/// (`max_data`), which this client never asks for.
pub fn decode_extended_chunk_header(
    header: &[u8; 32],
    max_data: u64,
) -> Result<ExtendedChunkHeader, ProtocolError> {
    let mut c = Cursor::new(header);
    let magic = c.u32()?;
    if magic != consts::EXTENDED_REPLY_MAGIC {
        return Err(ProtocolError::BadReplyMagic(magic));
    }
    let (flags, chunk_type, cookie, offset) = (c.u16()?, c.u16()?, c.u64()?, c.u64()?);
    let length = c.u64()?;
    let max = max_data.max(u64::from(MAX_CHUNK_PAYLOAD));
    let Some(length) = u32::try_from(length).ok().filter(|l| u64::from(*l) <= max) else {
        return Err(ProtocolError::ReplyTooLarge { length, max });
    };
    Ok(ExtendedChunkHeader {
        chunk: ChunkHeader {
            flags,
            chunk_type,
            cookie,
            length,
        },
        offset,
    })
}

/// Which kind of transmission reply starts with a given magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// 16-byte simple reply.
    Simple,
    /// 20-byte structured chunk header.
    Structured,
    /// 32-byte extended chunk header.
    Extended,
}

/// Classifies the first four bytes of a transmission reply.
pub fn reply_kind(magic: [u8; 4]) -> Result<ReplyKind, ProtocolError> {
    match u32::from_be_bytes(magic) {
        consts::SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        consts::STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        consts::EXTENDED_REPLY_MAGIC => Ok(ReplyKind::Extended),
        other => Err(ProtocolError::BadReplyMagic(other)),
    }
}

/// Splits an `OFFSET_DATA` payload into offset and data (at least one byte).
pub fn decode_offset_data(payload: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    let mut c = Cursor::new(payload);
    let offset = c.u64()?;
    let data = c.rest();
    if data.is_empty() {
        return Err(ProtocolError::MalformedReply(
            "OFFSET_DATA chunk without data",
        ));
    }
    Ok((offset, data))
}

/// Decodes an `OFFSET_HOLE` payload (exactly 12 bytes, non-zero length).
pub fn decode_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if payload.len() != 12 {
        return Err(ProtocolError::MalformedReply(
            "OFFSET_HOLE payload is not 12 bytes",
        ));
    }
    let mut c = Cursor::new(payload);
    let offset = c.u64()?;
    let len = c.u32()?;
    if len == 0 {
        return Err(ProtocolError::MalformedReply("OFFSET_HOLE of length zero"));
    }
    Ok((offset, len))
}

/// The contents of an error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// Error value (non-zero).
    pub code: u32,
    /// Human-readable message (lossily decoded).
    pub message: String,
    /// Failing offset, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Decodes the payload of an error chunk of type `chunk_type` (any type with
/// bit 15 set; unknown ones are read as far as the common prefix goes).
pub fn decode_error_chunk(chunk_type: u16, payload: &[u8]) -> Result<ChunkError, ProtocolError> {
    let mut c = Cursor::new(payload);
    let code = c.u32()?;
    let msg_len = c.u16()?;
    let message = c.bytes(usize::from(msg_len))?;
    if code == 0 {
        return Err(ProtocolError::MalformedReply(
            "error chunk with error value zero",
        ));
    }
    let offset = if chunk_type == consts::REPLY_TYPE_ERROR_OFFSET {
        let offset = c.u64()?;
        if !c.rest().is_empty() {
            return Err(ProtocolError::MalformedReply("ERROR_OFFSET chunk too long"));
        }
        Some(offset)
    } else {
        if chunk_type == consts::REPLY_TYPE_ERROR && !c.rest().is_empty() {
            return Err(ProtocolError::MalformedReply("ERROR chunk too long"));
        }
        None
    };
    Ok(ChunkError {
        code,
        message: String::from_utf8_lossy(message).into_owned(),
        offset,
    })
}

/// Decodes a `BLOCK_STATUS` payload into its context id and extents (at
/// least one, none of length zero).
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<Extent>), ProtocolError> {
    let mut c = Cursor::new(payload);
    let id = c.u32()?;
    let rest = c.rest();
    if rest.is_empty() || rest.len() % 8 != 0 {
        return Err(ProtocolError::MalformedReply(
            "BLOCK_STATUS payload is not 4 + a positive multiple of 8 bytes",
        ));
    }
    let mut extents = Vec::with_capacity(rest.len() / 8);
    let mut c = Cursor::new(rest);
    while !c.rest.is_empty() {
        let length = c.u32()?;
        let flags = c.u32()?;
        if length == 0 {
            return Err(ProtocolError::MalformedReply("extent of length zero"));
        }
        extents.push(Extent { length, flags });
    }
    Ok((id, extents))
}

/// Decodes a `BLOCK_STATUS_EXT` payload into its context id and extents (at
/// least one, none of length zero, as many as the count field says).
pub fn decode_block_status_ext(payload: &[u8]) -> Result<(u32, Vec<ExtentExt>), ProtocolError> {
    let mut c = Cursor::new(payload);
    let id = c.u32()?;
    let count = c.u32()?;
    let rest = c.rest();
    if count == 0 || rest.len() % 16 != 0 || rest.len() / 16 != count as usize {
        return Err(ProtocolError::MalformedReply(
            "BLOCK_STATUS_EXT payload is not 8 + 16 × its non-zero descriptor count",
        ));
    }
    let mut extents = Vec::with_capacity(rest.len() / 16);
    let mut c = Cursor::new(rest);
    while !c.rest.is_empty() {
        let length = c.u64()?;
        let flags = c.u64()?;
        if length == 0 {
            return Err(ProtocolError::MalformedReply("extent of length zero"));
        }
        extents.push(ExtentExt { length, flags });
    }
    Ok((id, extents))
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// An information type this client does not know (to be ignored).
    Unknown(u16),
}

/// Decodes the data of an `NBD_REP_INFO` reply.
pub fn decode_info_reply(data: &[u8]) -> Result<InfoReply, ProtocolError> {
    let mut c = Cursor::new(data);
    let info_type = c.u16()?;
    let info = match info_type {
        consts::INFO_EXPORT => {
            let size = c.u64()?;
            let flags = c.u16()?;
            InfoReply::Export { size, flags }
        }
        consts::INFO_NAME => return Ok(InfoReply::Name(utf8(c.rest())?)),
        consts::INFO_DESCRIPTION => return Ok(InfoReply::Description(utf8(c.rest())?)),
        consts::INFO_BLOCK_SIZE => InfoReply::BlockSize {
            min: c.u32()?,
            preferred: c.u32()?,
            max: c.u32()?,
        },
        other => return Ok(InfoReply::Unknown(other)),
    };
    if !c.rest().is_empty() {
        return Err(ProtocolError::MalformedReply("NBD_REP_INFO item too long"));
    }
    Ok(info)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Reading from or writing to the stream failed (including the server
    /// closing the connection).
    #[error("I/O error talking to the NBD server: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD server broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server answered a transmission request with this error value.
    #[error("NBD server replied with error {}", describe_error(*.0))]
    Server(u32),
    /// The server answered an option with an error reply.
    #[error("NBD server rejected option {option} with reply type {reply_type:#010x}: {message:?}")]
    OptionRejected {
        /// Option sent.
        option: u32,
        /// `NBD_REP_ERR_*` received.
        reply_type: u32,
        /// Message the server attached (may be empty).
        message: String,
    },
}

fn describe_error(code: u32) -> String {
    match ErrorCode::from_code(code) {
        Some(e) => e.to_string(),
        None => format!("{code} (not defined by the spec)"),
    }
}

impl ClientError {
    /// The transmission error value, if this is a [`ClientError::Server`].
    pub fn server_code(&self) -> Option<u32> {
        match self {
            ClientError::Server(code) => Some(*code),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// One option reply, header type plus data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// `NBD_REP_*` type.
    pub reply_type: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & consts::REP_FLAG_ERROR != 0
    }
}

/// Builds the client's view of an export from what the server sent.
fn export_from_wire(
    name: String,
    description: String,
    size: u64,
    flags: u16,
    (min_block, preferred_block, max_payload): (u32, u32, u32),
    block_status: bool,
) -> ExportInfo {
    let has = |f: u16| flags & f != 0;
    ExportInfo {
        name,
        description,
        size,
        read_only: has(consts::FLAG_READ_ONLY),
        can_flush: has(consts::FLAG_SEND_FLUSH),
        can_fua: has(consts::FLAG_SEND_FUA),
        can_trim: has(consts::FLAG_SEND_TRIM),
        can_write_zeroes: has(consts::FLAG_SEND_WRITE_ZEROES),
        can_fast_zero: has(consts::FLAG_SEND_FAST_ZERO),
        can_cache: has(consts::FLAG_SEND_CACHE),
        can_df: has(consts::FLAG_SEND_DF),
        can_multi_conn: has(consts::FLAG_CAN_MULTI_CONN),
        can_block_status: block_status,
        can_dirty_bitmap: false,
        min_block,
        preferred_block,
        max_payload,
    }
}

/// The spec's defaults when a server sends no `NBD_INFO_BLOCK_SIZE`.
const DEFAULT_BLOCK_SIZES: (u32, u32, u32) = (1, 4096, u32::MAX);

/// Option haggling from the client side. Start it with
/// [`ClientHandshake::start`], send any options, then finish with
/// [`ClientHandshake::go`], [`ClientHandshake::export_name`] or
/// [`ClientHandshake::abort`].
#[derive(Debug)]
pub struct ClientHandshake<S: Read + Write> {
    stream: S,
    server_flags: u16,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export name and context id of the last `base:allocation` selection.
    meta: Option<(String, u32)>,
}

impl<S: Read + Write> ClientHandshake<S> {
    /// Reads the greeting and answers with `FIXED_NEWSTYLE`, plus `NO_ZEROES`
    /// if requested and offered by the server.
    pub fn start(mut stream: S, no_zeroes: bool) -> Result<Self, ClientError> {
        let server_flags = read_greeting(&mut stream)?;
        let mut flags = consts::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes && server_flags & consts::FLAG_NO_ZEROES != 0 {
            flags |= consts::FLAG_C_NO_ZEROES;
        }
        Self::send_flags(stream, server_flags, flags)
    }

    /// Reads the greeting and answers with exactly `client_flags` (for tests
    /// that need to send invalid flags).
    pub fn start_with_flags(mut stream: S, client_flags: u32) -> Result<Self, ClientError> {
        let server_flags = read_greeting(&mut stream)?;
        Self::send_flags(stream, server_flags, client_flags)
    }

    fn send_flags(mut stream: S, server_flags: u16, flags: u32) -> Result<Self, ClientError> {
        stream.write_all(&flags.to_be_bytes())?;
        stream.flush()?;
        Ok(ClientHandshake {
            stream,
            server_flags,
            no_zeroes: flags & consts::FLAG_C_NO_ZEROES != 0,
            structured: false,
            extended: false,
            meta: None,
        })
    }

    /// Handshake flags the server sent.
    pub fn server_flags(&self) -> u16 {
        self.server_flags
    }

    /// Whether `NO_ZEROES` was negotiated.
    pub fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    /// Sends any option and reads replies up to and including the final one
    /// (`ACK` or an error). Replies for a different option are a protocol
    /// error.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Result<Vec<OptionReply>, ClientError> {
        self.stream.write_all(&encode_option(option, data))?;
        self.stream.flush()?;
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; consts::OPTION_REPLY_HEADER_LEN];
            self.stream.read_exact(&mut h)?;
            let h = decode_option_reply(&h)?;
            if h.option != option {
                return Err(ProtocolError::OptionReplyMismatch {
                    expected: option,
                    got: h.option,
                }
                .into());
            }
            if h.length > MAX_OPTION_REPLY_DATA {
                return Err(ProtocolError::ReplyTooLarge {
                    length: u64::from(h.length),
                    max: u64::from(MAX_OPTION_REPLY_DATA),
                }
                .into());
            }
            let mut data = vec![0u8; usize::try_from(h.length).unwrap_or(0)];
            self.stream.read_exact(&mut data)?;
            let last = h.reply_type == consts::REP_ACK || h.is_error();
            replies.push(OptionReply {
                reply_type: h.reply_type,
                data,
            });
            if last {
                return Ok(replies);
            }
            if replies.len() >= MAX_OPTION_REPLIES {
                return Err(ProtocolError::MalformedReply("too many replies to one option").into());
            }
        }
    }

    /// Splits replies into the intermediate ones and checks that the final
    /// one is an `ACK` (turning an error into [`ClientError::OptionRejected`]).
    fn expect_ack(
        option: u32,
        mut replies: Vec<OptionReply>,
    ) -> Result<Vec<OptionReply>, ClientError> {
        match replies.pop() {
            Some(r) if r.reply_type == consts::REP_ACK => Ok(replies),
            Some(r) if r.is_error() => Err(ClientError::OptionRejected {
                option,
                reply_type: r.reply_type,
                message: String::from_utf8_lossy(&r.data).into_owned(),
            }),
            Some(r) => Err(ProtocolError::UnexpectedOptionReply {
                option,
                reply_type: r.reply_type,
            }
            .into()),
            None => Err(ProtocolError::MalformedReply("no reply to option").into()),
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: `true` if acknowledged, `false` if the
    /// server does not support it.
    pub fn structured_reply(&mut self) -> Result<bool, ClientError> {
        let option = consts::OPT_STRUCTURED_REPLY;
        let replies = self.option(option, &[])?;
        if replies.len() == 1
            && replies.first().map(|r| r.reply_type) == Some(consts::REP_ERR_UNSUP)
        {
            return Ok(false);
        }
        let rest = Self::expect_ack(option, replies)?;
        if let Some(r) = rest.first() {
            return Err(ProtocolError::UnexpectedOptionReply {
                option,
                reply_type: r.reply_type,
            }
            .into());
        }
        self.structured = true;
        Ok(true)
    }

    /// `NBD_OPT_EXTENDED_HEADERS`: `true` if acknowledged (then requests and
    /// replies use 32-byte headers and chunked replies are on), `false` if
    /// the server does not support it.
    pub fn extended_headers(&mut self) -> Result<bool, ClientError> {
        let option = consts::OPT_EXTENDED_HEADERS;
        let replies = self.option(option, &[])?;
        if replies.len() == 1
            && replies.first().map(|r| r.reply_type) == Some(consts::REP_ERR_UNSUP)
        {
            return Ok(false);
        }
        let rest = Self::expect_ack(option, replies)?;
        if let Some(r) = rest.first() {
            return Err(ProtocolError::UnexpectedOptionReply {
                option,
                reply_type: r.reply_type,
            }
            .into());
        }
        self.extended = true;
        self.structured = true;
        Ok(true)
    }

    /// `NBD_OPT_LIST`: `(name, description)` of every export.
    pub fn list(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        let option = consts::OPT_LIST;
        let replies = Self::expect_ack(option, self.option(option, &[])?)?;
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            if r.reply_type != consts::REP_SERVER {
                return Err(ProtocolError::UnexpectedOptionReply {
                    option,
                    reply_type: r.reply_type,
                }
                .into());
            }
            let mut c = Cursor::new(&r.data);
            let len = usize::try_from(c.u32()?).unwrap_or(usize::MAX);
            let name = utf8(c.bytes(len)?)?;
            let description = utf8(c.rest())?;
            out.push((name, description));
        }
        Ok(out)
    }

    fn info_request(&mut self, option: u32, name: &str) -> Result<(ExportInfo, u16), ClientError> {
        let data = encode_info_request(
            name,
            &[
                consts::INFO_NAME,
                consts::INFO_DESCRIPTION,
                consts::INFO_BLOCK_SIZE,
            ],
        );
        let replies = Self::expect_ack(option, self.option(option, &data)?)?;
        let mut export = None;
        let mut canonical = None;
        let mut description = String::new();
        let mut sizes = DEFAULT_BLOCK_SIZES;
        for r in replies {
            if r.reply_type != consts::REP_INFO {
                return Err(ProtocolError::UnexpectedOptionReply {
                    option,
                    reply_type: r.reply_type,
                }
                .into());
            }
            match decode_info_reply(&r.data)? {
                InfoReply::Export { size, flags } => export = Some((size, flags)),
                InfoReply::Name(n) => canonical = Some(n),
                InfoReply::Description(d) => description = d,
                InfoReply::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = (min, preferred, max),
                InfoReply::Unknown(_) => {}
            }
        }
        let Some((size, flags)) = export else {
            return Err(
                ProtocolError::MalformedReply("no NBD_INFO_EXPORT before NBD_REP_ACK").into(),
            );
        };
        let block_status = self.base_allocation_for(name).is_some();
        let info = export_from_wire(
            canonical.unwrap_or_else(|| name.to_string()),
            description,
            size,
            flags,
            sizes,
            block_status,
        );
        Ok((info, flags))
    }

    /// `NBD_OPT_INFO`: what the server says about `name` (`""` is the
    /// default export). `can_block_status` reflects this session's
    /// `SET_META_CONTEXT` selection for that name.
    pub fn info(&mut self, name: &str) -> Result<ExportInfo, ClientError> {
        self.info_request(consts::OPT_INFO, name)
            .map(|(info, _)| info)
    }

    fn meta_request(
        &mut self,
        option: u32,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, ClientError> {
        let data = encode_meta_context_request(name, queries);
        let replies = Self::expect_ack(option, self.option(option, &data)?)?;
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            if r.reply_type != consts::REP_META_CONTEXT {
                return Err(ProtocolError::UnexpectedOptionReply {
                    option,
                    reply_type: r.reply_type,
                }
                .into());
            }
            let mut c = Cursor::new(&r.data);
            let id = c.u32()?;
            out.push((id, utf8(c.rest())?));
        }
        Ok(out)
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: `(id, name)` of matching contexts.
    pub fn list_meta_context(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, ClientError> {
        self.meta_request(consts::OPT_LIST_META_CONTEXT, name, queries)
    }

    /// `NBD_OPT_SET_META_CONTEXT`: selects contexts for export `name` and
    /// returns `(id, name)` of those the server selected.
    pub fn set_meta_context(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, ClientError> {
        // Any SET replaces the earlier selection, even a failing one.
        self.meta = None;
        let contexts = self.meta_request(consts::OPT_SET_META_CONTEXT, name, queries)?;
        if let Some((id, _)) = contexts
            .iter()
            .find(|(_, n)| n == consts::META_BASE_ALLOCATION)
        {
            self.meta = Some((name.to_string(), *id));
        }
        Ok(contexts)
    }

    fn base_allocation_for(&self, name: &str) -> Option<u32> {
        match &self.meta {
            Some((n, id)) if n == name && self.structured => Some(*id),
            _ => None,
        }
    }

    /// `NBD_OPT_ABORT`: ends the session. A server that closes without
    /// acknowledging is accepted too (older servers did).
    pub fn abort(mut self) -> Result<(), ClientError> {
        match self.option(consts::OPT_ABORT, &[]) {
            Ok(replies) => {
                Self::expect_ack(consts::OPT_ABORT, replies)?;
                Ok(())
            }
            Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `NBD_OPT_GO`: enters transmission on export `name`.
    pub fn go(mut self, name: &str) -> Result<Client<S>, ClientError> {
        let (info, flags) = self.info_request(consts::OPT_GO, name)?;
        let base_allocation = self.base_allocation_for(name);
        let style = Style {
            structured: self.structured,
            extended: self.extended,
        };
        Ok(Client::new(
            self.stream,
            info,
            flags,
            style,
            base_allocation,
        ))
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission on export `name`. The
    /// server closes the connection if it has no such export, which shows up
    /// as an I/O error.
    pub fn export_name(mut self, name: &str) -> Result<Client<S>, ClientError> {
        self.stream
            .write_all(&encode_option(consts::OPT_EXPORT_NAME, name.as_bytes()))?;
        self.stream.flush()?;
        let mut b = [0u8; 10];
        self.stream.read_exact(&mut b)?;
        let mut c = Cursor::new(&b);
        let size = c.u64()?;
        let flags = c.u16()?;
        if !self.no_zeroes {
            let mut zeroes = [0u8; consts::EXPORT_NAME_ZEROES];
            self.stream.read_exact(&mut zeroes)?;
        }
        let base_allocation = self.base_allocation_for(name);
        let info = export_from_wire(
            name.to_string(),
            String::new(),
            size,
            flags,
            DEFAULT_BLOCK_SIZES,
            base_allocation.is_some(),
        );
        let style = Style {
            structured: self.structured,
            extended: self.extended,
        };
        Ok(Client::new(
            self.stream,
            info,
            flags,
            style,
            base_allocation,
        ))
    }
}

fn read_greeting<S: Read>(stream: &mut S) -> Result<u16, ClientError> {
    let mut g = [0u8; consts::GREETING_LEN];
    stream.read_exact(&mut g)?;
    Ok(decode_greeting(&g)?)
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// The complete answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Cookie of the request.
    pub cookie: u64,
    /// Error value, if the server reported one (the first one, for
    /// structured replies).
    pub error: Option<u32>,
    /// Data read (READ only; empty on error).
    pub data: Vec<u8>,
    /// `base:allocation` extents (BLOCK_STATUS only), from either chunk
    /// type (compact ones widened to 64 bits).
    pub extents: Vec<ExtentExt>,
}

/// What the client remembers about a request until its reply is complete.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    command: Command,
    offset: u64,
    length: u64,
}

/// Reply framing negotiated in the handshake.
#[derive(Debug, Clone, Copy)]
struct Style {
    structured: bool,
    extended: bool,
}

/// A connected client in the transmission phase.
///
/// Requests can be pipelined with [`Client::submit`] / [`Client::receive`];
/// the convenience methods (`read`, `write`, …) send one request and wait for
/// its answer, queueing any other answers that arrive first.
pub struct Client<S: Read + Write> {
    stream: S,
    info: ExportInfo,
    flags: u16,
    structured: bool,
    extended: bool,
    base_allocation: Option<u32>,
    next_cookie: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Structured replies still missing their `DONE` chunk.
    partial: HashMap<u64, Partial>,
    /// Complete responses read while waiting for a different cookie.
    ready: VecDeque<Response>,
    /// READ buffers handed back by [`Client::recycle`], for the next READs.
    spare: Vec<Vec<u8>>,
}

/// Most buffers [`Client::recycle`] keeps.
const MAX_SPARE_BUFFERS: usize = 8;
/// Largest buffer [`Client::recycle`] keeps (a backup reads 4 MiB pieces).
const MAX_SPARE_BYTES: usize = 32 << 20;

/// A structured reply being assembled.
#[derive(Debug)]
struct Partial {
    resp: Response,
    /// READ bytes the content chunks so far described (data or hole): a
    /// successful READ must describe each byte once (the spec forbids
    /// overlapping chunks), so at `DONE` this must equal the length. The
    /// buffer may be a recycled one, so a byte no chunk described would
    /// hold an older read's data, never returned.
    covered: u64,
}

impl<S: Read + Write> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .field("flags", &self.flags)
            .field("structured", &self.structured)
            .field("extended", &self.extended)
            .field("base_allocation", &self.base_allocation)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl<S: Read + Write> Client<S> {
    fn new(
        stream: S,
        info: ExportInfo,
        flags: u16,
        style: Style,
        base_allocation: Option<u32>,
    ) -> Self {
        Client {
            stream,
            info,
            flags,
            structured: style.structured,
            extended: style.extended,
            base_allocation,
            next_cookie: 1,
            in_flight: HashMap::new(),
            partial: HashMap::new(),
            ready: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Hands a READ response's buffer back for reuse by later READs, so a
    /// stream of large reads neither allocates nor zeroes memory per read.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if self.spare.len() < MAX_SPARE_BUFFERS && cap > 0 && cap <= MAX_SPARE_BYTES {
            self.spare.push(buf);
        }
    }

    /// A buffer of `len` bytes for a READ's data: a recycled one when one is
    /// large enough (its bytes are stale until the reply overwrites them
    /// all), else a fresh zeroed one.
    fn read_buffer(&mut self, len: u64) -> Vec<u8> {
        let len = usize::try_from(len).unwrap_or(0);
        match self.spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.spare.swap_remove(i);
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Fixed newstyle handshake with `NO_ZEROES`; if `structured`, also
    /// `STRUCTURED_REPLY` and `SET_META_CONTEXT base:allocation`; then `GO`
    /// on `export`.
    pub fn connect(stream: S, export: &str, structured: bool) -> Result<Client<S>, ClientError> {
        let mut hs = ClientHandshake::start(stream, true)?;
        if structured && hs.structured_reply()? {
            hs.set_meta_context(export, &[consts::META_BASE_ALLOCATION])?;
        }
        hs.go(export)
    }

    /// Like [`Client::connect`] with `structured`, but asks for extended
    /// headers first (structured replies if the server refuses them).
    pub fn connect_extended(stream: S, export: &str) -> Result<Client<S>, ClientError> {
        let mut hs = ClientHandshake::start(stream, true)?;
        if hs.extended_headers()? || hs.structured_reply()? {
            hs.set_meta_context(export, &[consts::META_BASE_ALLOCATION])?;
        }
        hs.go(export)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// The export as the server described it (`can_block_status` is whether
    /// `base:allocation` was negotiated).
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether structured replies (or extended headers) were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Context id of `base:allocation`, if negotiated.
    pub fn base_allocation(&self) -> Option<u32> {
        self.base_allocation
    }

    /// A fresh cookie for [`Client::submit`].
    pub fn next_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// Number of requests sent whose answer is not yet complete.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably (e.g. to send deliberately broken
    /// bytes in a test).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends a request header (32-byte once extended headers are on) and its
    /// payload as given (no validation, so tests can send invalid requests)
    /// and remembers it for [`Client::receive`]. `DISC` is not remembered:
    /// it has no reply.
    pub fn submit(&mut self, req: &Request, payload: Option<&[u8]>) -> io::Result<()> {
        let payload = payload.unwrap_or(&[]);
        let mut header = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        let n = if self.extended {
            header = req.encode_extended();
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            header[..REQUEST_HEADER_LEN].copy_from_slice(&encode_request(req));
            REQUEST_HEADER_LEN
        };
        if payload.len() < COPY_PAYLOAD_BELOW {
            // One send for header and payload.
            let mut buf = Vec::with_capacity(n + payload.len());
            buf.extend_from_slice(&header[..n]);
            buf.extend_from_slice(payload);
            self.stream.write_all(&buf)?;
        } else {
            // Large: send it from where it is instead of copying it.
            write_all_vectored(&mut self.stream, &header[..n], payload)?;
        }
        self.stream.flush()?;
        if req.command != Command::Disc {
            self.in_flight.insert(
                req.cookie,
                InFlight {
                    command: req.command,
                    offset: req.offset,
                    length: req.length,
                },
            );
        }
        Ok(())
    }

    /// The next complete response, in the order the server finishes them.
    pub fn receive(&mut self) -> Result<Response, ClientError> {
        if let Some(r) = self.ready.pop_front() {
            return Ok(r);
        }
        self.read_response()
    }

    /// Waits for the response to `cookie`, queueing others for
    /// [`Client::receive`].
    pub fn wait_for(&mut self, cookie: u64) -> Result<Response, ClientError> {
        if let Some(i) = self.ready.iter().position(|r| r.cookie == cookie) {
            if let Some(r) = self.ready.remove(i) {
                return Ok(r);
            }
        }
        loop {
            let r = self.read_response()?;
            if r.cookie == cookie {
                return Ok(r);
            }
            self.ready.push_back(r);
        }
    }

    /// Sends one request with a fresh cookie and waits for its response. The
    /// server's error value, if any, is in [`Response::error`].
    pub fn execute(
        &mut self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let cookie = self.next_cookie();
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.submit(&req, payload)?;
        self.wait_for(cookie)
    }

    fn execute_ok(
        &mut self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let r = self.execute(command, flags, offset, length, payload)?;
        match r.error {
            Some(code) => Err(ClientError::Server(code)),
            None => Ok(r),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.execute_ok(
            Command::Read,
            CommandFlags::empty(),
            offset,
            u64::from(len),
            None,
        )
        .map(|r| r.data)
    }

    /// Writes `data` at `offset`, with `FUA` if asked.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write larger than 4 GiB"))?;
        let mut flags = if fua {
            CommandFlags::FUA
        } else {
            CommandFlags::empty()
        };
        if self.extended {
            flags |= CommandFlags::PAYLOAD_LEN;
        }
        self.execute_ok(Command::Write, flags, offset, u64::from(len), Some(data))
            .map(drop)
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.execute_ok(Command::Flush, CommandFlags::empty(), 0, 0, None)
            .map(drop)
    }

    /// Trims `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.execute_ok(Command::Trim, CommandFlags::empty(), offset, len, None)
            .map(drop)
    }

    /// Asks the server to cache `len` bytes at `offset`.
    pub fn cache(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.execute_ok(Command::Cache, CommandFlags::empty(), offset, len, None)
            .map(drop)
    }

    /// Zeroes `len` bytes at `offset` with the given flags (`NO_HOLE`,
    /// `FAST_ZERO`, `FUA`).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        flags: CommandFlags,
    ) -> Result<(), ClientError> {
        self.execute_ok(Command::WriteZeroes, flags, offset, len, None)
            .map(drop)
    }

    /// `base:allocation` extents for `len` bytes at `offset`.
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Vec<ExtentExt>, ClientError> {
        self.execute_ok(
            Command::BlockStatus,
            CommandFlags::empty(),
            offset,
            len,
            None,
        )
        .map(|r| r.extents)
    }

    /// Sends `NBD_CMD_DISC`. The server closes the connection after
    /// finishing in-flight requests; nothing else may be sent.
    pub fn disconnect(&mut self) -> Result<(), ClientError> {
        let cookie = self.next_cookie();
        let req = Request {
            flags: CommandFlags::empty(),
            command: Command::Disc,
            cookie,
            offset: 0,
            length: 0,
        };
        self.submit(&req, None)?;
        Ok(())
    }

    /// Reads chunks until some response is complete.
    fn read_response(&mut self) -> Result<Response, ClientError> {
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic)?;
            let done = match reply_kind(magic)? {
                ReplyKind::Simple => return self.read_simple(magic),
                ReplyKind::Structured => self.read_chunk(magic)?,
                ReplyKind::Extended => self.read_extended_chunk(magic)?,
            };
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    fn read_simple(&mut self, magic: [u8; 4]) -> Result<Response, ClientError> {
        let mut h = [0u8; 16];
        let (head, tail) = h.split_at_mut(4);
        head.copy_from_slice(&magic);
        self.stream.read_exact(tail)?;
        let h = decode_simple_reply(&h)?;
        let Some(req) = self.in_flight.remove(&h.cookie) else {
            return Err(ProtocolError::UnknownCookie(h.cookie).into());
        };
        if (self.structured && req.command == Command::Read)
            || self.extended
            || self.partial.contains_key(&h.cookie)
        {
            return Err(ProtocolError::WrongReplyStyle(h.cookie).into());
        }
        let mut data = Vec::new();
        if req.command == Command::Read && h.error == 0 {
            data = self.read_buffer(req.length);
            self.stream.read_exact(&mut data)?;
        }
        Ok(Response {
            cookie: h.cookie,
            error: (h.error != 0).then_some(h.error),
            data,
            extents: Vec::new(),
        })
    }

    /// Reads one structured chunk; returns the response if it was the last.
    fn read_chunk(&mut self, magic: [u8; 4]) -> Result<Option<Response>, ClientError> {
        let mut h = [0u8; 20];
        let (head, tail) = h.split_at_mut(4);
        head.copy_from_slice(&magic);
        self.stream.read_exact(tail)?;
        let h = decode_chunk_header(&h)?;
        if !self.structured || self.extended {
            return Err(ProtocolError::WrongReplyStyle(h.cookie).into());
        }
        let Some(req) = self.in_flight.get(&h.cookie).copied() else {
            return Err(ProtocolError::UnknownCookie(h.cookie).into());
        };
        check_chunk_length(&h, &req)?;
        self.finish_chunk(h, req)
    }

    /// Reads one extended chunk; returns the response if it was the last.
    fn read_extended_chunk(&mut self, magic: [u8; 4]) -> Result<Option<Response>, ClientError> {
        let mut h = [0u8; 32];
        let (head, tail) = h.split_at_mut(4);
        head.copy_from_slice(&magic);
        self.stream.read_exact(tail)?;
        let x = decode_extended_chunk_header(&h, u64::from(u32::MAX))?;
        let h = x.chunk;
        if !self.extended {
            return Err(ProtocolError::WrongReplyStyle(h.cookie).into());
        }
        let Some(req) = self.in_flight.get(&h.cookie).copied() else {
            return Err(ProtocolError::UnknownCookie(h.cookie).into());
        };
        if x.offset != req.offset {
            return Err(ProtocolError::MalformedReply(
                "extended reply offset differs from the request's",
            )
            .into());
        }
        check_chunk_length(&h, &req)?;
        self.finish_chunk(h, req)
    }

    /// Reads a chunk's payload and folds it into its response; returns the
    /// response if the chunk was the last.
    fn finish_chunk(
        &mut self,
        h: ChunkHeader,
        req: InFlight,
    ) -> Result<Option<Response>, ClientError> {
        if !self.partial.contains_key(&h.cookie) {
            let data = match req.command {
                Command::Read => self.read_buffer(req.length),
                _ => Vec::new(),
            };
            let resp = Response {
                cookie: h.cookie,
                error: None,
                data,
                extents: Vec::new(),
            };
            self.partial.insert(h.cookie, Partial { resp, covered: 0 });
        }
        if h.chunk_type == consts::REPLY_TYPE_OFFSET_DATA && req.command == Command::Read {
            self.read_data_chunk(&h, &req)?;
        } else {
            let mut payload = vec![0u8; usize::try_from(h.length).unwrap_or(0)];
            self.stream.read_exact(&mut payload)?;
            let base_allocation = self.base_allocation;
            let part = self.partial.get_mut(&h.cookie).expect("inserted above");
            part.covered += apply_chunk(&h, &payload, &req, base_allocation, &mut part.resp)?;
        }
        if !h.is_done() {
            return Ok(None);
        }
        self.in_flight.remove(&h.cookie);
        let Some(Partial { mut resp, covered }) = self.partial.remove(&h.cookie) else {
            return Ok(None);
        };
        if resp.error.is_some() {
            // Data of a failed read must not be trusted.
            resp.data.clear();
        } else if req.command == Command::Read && covered != req.length {
            return Err(ProtocolError::MalformedReply(
                "READ reply did not describe every byte exactly once",
            )
            .into());
        }
        Ok(Some(resp))
    }

    /// Reads an `OFFSET_DATA` chunk of a READ straight into its response's
    /// buffer (no intermediate copy: a backup reads gigabytes this way).
    fn read_data_chunk(&mut self, h: &ChunkHeader, req: &InFlight) -> Result<(), ClientError> {
        let mut at = [0u8; 8];
        let len = u64::from(h.length)
            .checked_sub(8)
            .filter(|n| *n > 0)
            .ok_or(ProtocolError::MalformedReply(
                "OFFSET_DATA chunk without data",
            ))?;
        self.stream.read_exact(&mut at)?;
        let (start, end) = content_range(req, u64::from_be_bytes(at), len)?;
        let part = self
            .partial
            .get_mut(&h.cookie)
            .expect("created by finish_chunk");
        let dst = part
            .resp
            .data
            .get_mut(start..end)
            .ok_or(ProtocolError::MalformedReply(
                "content chunk past the request",
            ))?;
        self.stream.read_exact(dst)?;
        part.covered += len;
        Ok(())
    }
}

/// Payloads from this size on are sent with the request header in one
/// vectored write rather than copied behind it.
const COPY_PAYLOAD_BELOW: usize = 64 << 10;

/// Writes `head` then `body` with vectored writes until both are sent.
fn write_all_vectored<W: Write>(w: &mut W, head: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        let n = match w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    Ok(())
}

/// Bounds a chunk's payload by what its request can legitimately produce.
fn check_chunk_length(h: &ChunkHeader, req: &InFlight) -> Result<(), ProtocolError> {
    let max = if h.chunk_type == consts::REPLY_TYPE_OFFSET_DATA {
        req.length.saturating_add(8)
    } else {
        u64::from(MAX_CHUNK_PAYLOAD)
    };
    if u64::from(h.length) > max {
        return Err(ProtocolError::ReplyTooLarge {
            length: u64::from(h.length),
            max,
        });
    }
    Ok(())
}

/// Folds one structured chunk into the response it belongs to; returns
/// how many READ bytes it described (data or hole).
fn apply_chunk(
    h: &ChunkHeader,
    payload: &[u8],
    req: &InFlight,
    base_allocation: Option<u32>,
    resp: &mut Response,
) -> Result<u64, ProtocolError> {
    let unexpected = || ProtocolError::UnexpectedChunk {
        chunk_type: h.chunk_type,
        command: req.command.code(),
    };
    match h.chunk_type {
        consts::REPLY_TYPE_NONE => {
            if h.length != 0 || !h.is_done() {
                return Err(ProtocolError::MalformedReply(
                    "NONE chunk with payload or without DONE",
                ));
            }
        }
        consts::REPLY_TYPE_OFFSET_DATA => {
            if req.command != Command::Read {
                return Err(unexpected());
            }
            let (offset, data) = decode_offset_data(payload)?;
            let (start, end) = content_range(req, offset, data.len() as u64)?;
            if let Some(dst) = resp.data.get_mut(start..end) {
                dst.copy_from_slice(data);
            }
            return Ok(data.len() as u64);
        }
        consts::REPLY_TYPE_OFFSET_HOLE => {
            if req.command != Command::Read {
                return Err(unexpected());
            }
            let (offset, len) = decode_offset_hole(payload)?;
            let (start, end) = content_range(req, offset, u64::from(len))?;
            if let Some(dst) = resp.data.get_mut(start..end) {
                dst.fill(0);
            }
            return Ok(u64::from(len));
        }
        consts::REPLY_TYPE_BLOCK_STATUS => {
            if req.command != Command::BlockStatus {
                return Err(unexpected());
            }
            let (id, extents) = decode_block_status(payload)?;
            if Some(id) == base_allocation {
                resp.extents.extend(extents.into_iter().map(|e| ExtentExt {
                    length: u64::from(e.length),
                    flags: u64::from(e.flags),
                }));
            }
        }
        consts::REPLY_TYPE_BLOCK_STATUS_EXT => {
            if req.command != Command::BlockStatus {
                return Err(unexpected());
            }
            let (id, extents) = decode_block_status_ext(payload)?;
            if Some(id) == base_allocation {
                resp.extents.extend(extents);
            }
        }
        t if t & consts::REPLY_TYPE_FLAG_ERROR != 0 => {
            let e = decode_error_chunk(t, payload)?;
            resp.error.get_or_insert(e.code);
        }
        _ => return Err(unexpected()),
    }
    Ok(0)
}

/// Where a content chunk lands inside the response buffer, if it lies
/// entirely within the request.
fn content_range(req: &InFlight, offset: u64, len: u64) -> Result<(usize, usize), ProtocolError> {
    let start = offset
        .checked_sub(req.offset)
        .ok_or(ProtocolError::MalformedReply(
            "content chunk before the request",
        ))?;
    let end = start
        .checked_add(len)
        .filter(|end| *end <= req.length)
        .ok_or(ProtocolError::MalformedReply(
            "content chunk past the request",
        ))?;
    Ok((
        usize::try_from(start).unwrap_or(usize::MAX),
        usize::try_from(end).unwrap_or(usize::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply;

    #[test]
    fn option_encoding() {
        let b = encode_option(7, b"ab");
        assert_eq!(&b[0..8], b"IHAVEOPT");
        assert_eq!(&b[8..12], &7u32.to_be_bytes());
        assert_eq!(&b[12..16], &2u32.to_be_bytes());
        assert_eq!(&b[16..], b"ab");
        let d = encode_info_request("x", &[3]);
        assert_eq!(d, vec![0, 0, 0, 1, b'x', 0, 1, 0, 3]);
        let d = encode_meta_context_request("x", &["base:"]);
        assert_eq!(
            d,
            vec![0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 5, b'b', b'a', b's', b'e', b':']
        );
    }

    #[test]
    fn decoders_reject_bad_magic() {
        assert!(matches!(
            decode_simple_reply(&[0; 16]),
            Err(ProtocolError::BadReplyMagic(0))
        ));
        assert!(matches!(
            decode_chunk_header(&[0; 20]),
            Err(ProtocolError::BadReplyMagic(0))
        ));
        assert!(matches!(
            decode_option_reply(&[0; 20]),
            Err(ProtocolError::BadOptionReplyMagic(0))
        ));
        assert!(reply_kind([1, 2, 3, 4]).is_err());
        assert!(matches!(
            decode_greeting(&[0; 18]),
            Err(ProtocolError::BadGreeting { .. })
        ));
    }

    #[test]
    fn payload_decoders() {
        let b = reply::error_offset_chunk(1, ErrorCode::Io, "bad", 99, true);
        let h = decode_chunk_header(b[..20].try_into().unwrap()).unwrap();
        assert!(h.is_error() && h.is_done());
        let e = decode_error_chunk(h.chunk_type, &b[20..]).unwrap();
        assert_eq!(
            e,
            ChunkError {
                code: 5,
                message: "bad".into(),
                offset: Some(99)
            }
        );
        assert!(decode_error_chunk(consts::REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, 1]).is_err());
        assert!(decode_offset_hole(&[0; 12]).is_err());
        assert!(decode_offset_data(&[0; 8]).is_err());
        assert!(decode_block_status(&[0, 0, 0, 1]).is_err());
        assert!(decode_block_status(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(
            decode_info_reply(&[0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 255, 255, 255, 255]).unwrap(),
            InfoReply::BlockSize {
                min: 1,
                preferred: 4096,
                max: u32::MAX
            }
        );
        assert_eq!(
            decode_info_reply(&[0, 9, 1, 2]).unwrap(),
            InfoReply::Unknown(9)
        );
        assert!(decode_info_reply(&[0, 0, 1]).is_err());
    }

    /// A stream that plays back a server's bytes and swallows the client's.
    struct Scripted {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A structured-reply client whose server will send `replies`.
    fn scripted(replies: Vec<u8>) -> Client<Scripted> {
        let stream = Scripted {
            input: io::Cursor::new(replies),
            output: Vec::new(),
        };
        let style = Style {
            structured: true,
            extended: false,
        };
        Client::new(stream, ExportInfo::new("x", 1 << 20), 0, style, None)
    }

    /// A READ at 0 answered by a data chunk and then a hole after it.
    fn data_then_hole(cookie: u64, data: &[u8], hole: u32) -> Vec<u8> {
        let mut b = reply::offset_data_header(cookie, 0, data.len() as u32, false).to_vec();
        b.extend_from_slice(data);
        b.extend_from_slice(&reply::offset_hole_chunk(
            cookie,
            data.len() as u64,
            hole,
            true,
        ));
        b
    }

    #[test]
    fn a_recycled_buffer_never_shows_an_older_reads_bytes() {
        // The first read fills the buffer with 0xAA; the second, into the
        // same (recycled) buffer, is data then a hole: the hole reads zero.
        let mut replies = reply::offset_data_header(1, 0, 8192, true).to_vec();
        replies.extend_from_slice(&[0xAA; 8192]);
        replies.extend_from_slice(&data_then_hole(2, &[0x55; 4096], 4096));
        let mut c = scripted(replies);
        let first = c.read(0, 8192).expect("first read");
        assert_eq!(first, vec![0xAA; 8192]);
        let ptr = first.as_ptr();
        c.recycle(first);
        let second = c.read(0, 8192).expect("second read");
        assert_eq!(second.as_ptr(), ptr, "the recycled buffer is reused");
        assert_eq!(&second[..4096], &[0x55; 4096][..]);
        assert_eq!(&second[4096..], &[0u8; 4096][..], "the hole reads zero");
    }

    #[test]
    fn a_read_reply_that_leaves_bytes_undescribed_is_refused() {
        // Data for the first half only, then DONE: the second half was never
        // described, and must not be returned as zeroes or stale bytes.
        let mut replies = reply::offset_data_header(1, 0, 4096, false).to_vec();
        replies.extend_from_slice(&[7; 4096]);
        replies.extend_from_slice(&reply::none_chunk(1));
        let mut c = scripted(replies);
        let e = c.read(0, 8192).expect_err("a gap in the reply");
        assert!(e.to_string().contains("every byte"), "{e}");
    }

    #[test]
    fn a_large_write_is_sent_whole_without_a_copy() {
        let mut c = scripted(reply::simple_reply(1, None).to_vec());
        let payload: Vec<u8> = (0..(1u32 << 17)).map(|i| i as u8).collect();
        c.write(4096, &payload, false).expect("write");
        let sent = &c.get_ref().output;
        assert_eq!(sent.len(), REQUEST_HEADER_LEN + payload.len());
        assert_eq!(&sent[REQUEST_HEADER_LEN..], &payload[..]);
        let req =
            crate::request::decode_request(sent[..REQUEST_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((req.offset, req.length), (4096, payload.len() as u64));
    }

    #[test]
    fn client_error_display() {
        assert_eq!(
            ClientError::Server(28).to_string(),
            "NBD server replied with error ENOSPC (28)"
        );
        assert_eq!(ClientError::Server(28).server_code(), Some(28));
        assert!(ClientError::Server(3).to_string().contains("not defined"));
    }
}
