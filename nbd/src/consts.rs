//! Protocol numbers of NBD, named after the spec with the `NBD_` prefix
//! dropped (`NBD_OPT_GO` is [`OPT_GO`], `NBD_CMD_FLAG_FUA` is
//! [`CMD_FLAG_FUA`]).
//!
//! Every value is sent big-endian on the wire. The Rust type of each constant
//! is the width of the field it travels in, so a mismatched field width is a
//! compile error rather than a silent truncation.

// ---------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------

/// `NBDMAGIC`: first 8 bytes the server sends on a new connection.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows [`NBDMAGIC`] in the newstyle greeting and starts every
/// option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic that starts every fixed-newstyle option reply from the server.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every transmission-phase request from the client.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts a simple reply (called `NBD_REPLY_MAGIC` in old texts).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic that starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic that starts every 32-byte request once extended headers are
/// negotiated (`NBD_EXTENDED_REQUEST_MAGIC`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic that starts every 32-byte reply chunk once extended headers are
/// negotiated (`NBD_EXTENDED_REPLY_MAGIC`).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------
// Handshake flags (server → client, 16 bits)
// ---------------------------------------------------------------------------

/// Handshake flag: the server speaks fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME` if the client asks for it.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---------------------------------------------------------------------------
// Client flags (client → server, 32 bits)
// ---------------------------------------------------------------------------

/// Client flag: the client speaks fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this crate understands; any other bit set by a client is
/// a protocol violation the server must hang up on.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags (server → client, 16 bits)
// ---------------------------------------------------------------------------

/// Transmission flag: always set; tells the client the other bits mean something.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: the server accepts `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server accepts `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`).
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server honours `NBD_CMD_FLAG_DF` on reads
/// (only meaningful once structured replies are negotiated).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA effects are visible across all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the experimental resize extension is available.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: the server understands `NBD_CMD_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Short alias of [`FLAG_HAS_FLAGS`] (the name API.md uses).
pub const HAS_FLAGS: u16 = FLAG_HAS_FLAGS;
/// Short alias of [`FLAG_READ_ONLY`].
pub const READ_ONLY: u16 = FLAG_READ_ONLY;
/// Short alias of [`FLAG_SEND_FLUSH`].
pub const SEND_FLUSH: u16 = FLAG_SEND_FLUSH;
/// Short alias of [`FLAG_SEND_FUA`].
pub const SEND_FUA: u16 = FLAG_SEND_FUA;
/// Short alias of [`FLAG_ROTATIONAL`].
pub const ROTATIONAL: u16 = FLAG_ROTATIONAL;
/// Short alias of [`FLAG_SEND_TRIM`].
pub const SEND_TRIM: u16 = FLAG_SEND_TRIM;
/// Short alias of [`FLAG_SEND_WRITE_ZEROES`].
pub const SEND_WRITE_ZEROES: u16 = FLAG_SEND_WRITE_ZEROES;
/// Short alias of [`FLAG_SEND_DF`].
pub const SEND_DF: u16 = FLAG_SEND_DF;
/// Short alias of [`FLAG_CAN_MULTI_CONN`].
pub const CAN_MULTI_CONN: u16 = FLAG_CAN_MULTI_CONN;
/// Short alias of [`FLAG_SEND_RESIZE`].
pub const SEND_RESIZE: u16 = FLAG_SEND_RESIZE;
/// Short alias of [`FLAG_SEND_CACHE`].
pub const SEND_CACHE: u16 = FLAG_SEND_CACHE;
/// Short alias of [`FLAG_SEND_FAST_ZERO`].
pub const SEND_FAST_ZERO: u16 = FLAG_SEND_FAST_ZERO;

// ---------------------------------------------------------------------------
// Option codes (client → server, 32 bits)
// ---------------------------------------------------------------------------

/// Option: pick an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up negotiating (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: withdrawn `PEEK_EXPORT` extension; never valid.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: upgrade to TLS (see `handshake::TlsPolicy`).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission on success.
pub const OPT_GO: u32 = 7;
/// Option: switch the transmission phase to structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers: 32-byte request and reply headers and
/// 64-bit effect lengths (the `EXTENDED_HEADERS` extension).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types (server → client, 32 bits)
// ---------------------------------------------------------------------------

/// Option reply: success / end of a list. No data.
pub const REP_ACK: u32 = 1;
/// Option reply: one export in an `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export (INFO/GO).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context (LIST/SET_META_CONTEXT).
pub const REP_META_CONTEXT: u32 = 4;

/// Bit set in every option reply type that denotes an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: the option is unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: known and valid, but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: known, but syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: the named export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE` first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the request or its reply is too large to process.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Option error: extended headers are required (also the answer to
/// `NBD_OPT_STRUCTURED_REPLY` once extended headers are on).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------
// Information types inside NBD_REP_INFO (16 bits)
// ---------------------------------------------------------------------------

/// Info: export size (u64) and transmission flags (u16). Mandatory.
pub const INFO_EXPORT: u16 = 0;
/// Info: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info: human-readable export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info: minimum, preferred and maximum block sizes (3 × u32).
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands (client → server, 16 bits)
// ---------------------------------------------------------------------------

/// Command: read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Command: write the `length` payload bytes that follow the header.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect after finishing in-flight requests (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: make all acknowledged writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: the range is no longer needed (discard hint).
pub const CMD_TRIM: u16 = 4;
/// Command: the client plans to access the range soon.
pub const CMD_CACHE: u16 = 5;
/// Command: zero the range without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: report metadata (allocation status) for the range.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: experimental resize extension (not supported here).
pub const CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------
// Command flags (client → server, 16 bits)
// ---------------------------------------------------------------------------

/// Command flag: force unit access; reply only once the data is durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole, keep it allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent per context is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail with `ENOTSUP` unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers only): *length* is the length of a
/// payload that follows the header, not an effect length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Every command flag this crate knows; other bits are rejected with `EINVAL`.
pub const KNOWN_CMD_FLAGS: u16 = CMD_FLAG_FUA
    | CMD_FLAG_NO_HOLE
    | CMD_FLAG_DF
    | CMD_FLAG_REQ_ONE
    | CMD_FLAG_FAST_ZERO
    | CMD_FLAG_PAYLOAD_LEN;

// ---------------------------------------------------------------------------
// Structured replies (server → client)
// ---------------------------------------------------------------------------

/// Structured reply flag: this is the last chunk for the cookie.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Chunk type: no payload; only valid as the final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: u64 offset followed by data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: u64 offset and u32 length of a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: u32 context id followed by (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type (extended headers only): u32 context id, u32 descriptor
/// count, then (u64 length, u64 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk type: like [`REPLY_TYPE_ERROR`] plus the u64 offset that failed.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------
// Metadata contexts
// ---------------------------------------------------------------------------

/// Name of the one metadata context the spec defines.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status bit: the extent is a hole (unallocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// Namespace and leaf prefix of qemu's dirty-bitmap contexts
/// (`qemu:dirty-bitmap:NAME`).
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `qemu:dirty-bitmap:*` status bit: the extent is dirty (changed).
pub const STATE_DIRTY: u32 = 1 << 0;

// ---------------------------------------------------------------------------
// Errors (transmission phase, 32 bits) — see also [`crate::ErrorCode`]
// ---------------------------------------------------------------------------

/// Error value: operation not permitted (e.g. write to a read-only export).
pub const EPERM: u32 = 1;
/// Error value: input/output error.
pub const EIO: u32 = 5;
/// Error value: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const EINVAL: u32 = 22;
/// Error value: no space left (e.g. write beyond the end of the export).
pub const ENOSPC: u32 = 28;
/// Error value: value too large (a `DF` read that cannot be sent whole).
pub const EOVERFLOW: u32 = 75;
/// Error value: operation not supported (a `FAST_ZERO` that is not fast).
pub const ENOTSUP: u32 = 95;
/// Error value: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

/// The spec's upper bound on any string (export names, messages, queries).
pub const MAX_STRING_LEN: usize = 4096;
/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Number of zero bytes after an `NBD_OPT_EXPORT_NAME` answer unless
/// `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES: usize = 124;
