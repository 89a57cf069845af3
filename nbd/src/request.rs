//! Transmission-phase requests: decoding the 28-byte compact header or the
//! 32-byte extended one and deciding, from the negotiated export alone,
//! whether a request may be served.
//!
//! The server reads [`header_len`] bytes (28, or 32 once extended headers
//! are negotiated), calls [`decode_header`], then [`check_request`]. A [`Verdict::Reject`] is answered with an error
//! reply and the session goes on; a [`Verdict::Close`] means the stream can no
//! longer be trusted and the connection must be dropped.

use crate::consts;
use crate::error::{ErrorCode, ProtocolError};
use crate::handshake::Negotiated;

/// Size of a compact request header on the wire: magic, flags, type,
/// cookie, offset, 32-bit length.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Size of an extended request header (`NBD_OPT_EXTENDED_HEADERS`): magic,
/// flags, type, cookie, offset, 64-bit length.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;

/// Length of the request headers of a session: extended or compact.
pub fn header_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_HEADER_LEN
    } else {
        REQUEST_HEADER_LEN
    }
}

/// The command a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`; `length` payload bytes follow the header.
    Write,
    /// `NBD_CMD_DISC`; no reply, the server finishes in-flight work and closes.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other command code. Holding the raw code lets the server log it
    /// and answer `EINVAL` instead of dropping the connection.
    Unknown(u16),
}

impl Command {
    /// The command for a wire code; codes this crate does not serve map to
    /// [`Command::Unknown`].
    pub fn from_code(code: u16) -> Command {
        match code {
            consts::CMD_READ => Command::Read,
            consts::CMD_WRITE => Command::Write,
            consts::CMD_DISC => Command::Disc,
            consts::CMD_FLUSH => Command::Flush,
            consts::CMD_TRIM => Command::Trim,
            consts::CMD_CACHE => Command::Cache,
            consts::CMD_WRITE_ZEROES => Command::WriteZeroes,
            consts::CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire code. `Unknown(c)` encodes as `c` as given, even if `c` is a
    /// known code, so callers can craft arbitrary headers.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => consts::CMD_READ,
            Command::Write => consts::CMD_WRITE,
            Command::Disc => consts::CMD_DISC,
            Command::Flush => consts::CMD_FLUSH,
            Command::Trim => consts::CMD_TRIM,
            Command::Cache => consts::CMD_CACHE,
            Command::WriteZeroes => consts::CMD_WRITE_ZEROES,
            Command::BlockStatus => consts::CMD_BLOCK_STATUS,
            Command::Unknown(c) => c,
        }
    }
}

impl From<u16> for Command {
    fn from(code: u16) -> Command {
        Command::from_code(code)
    }
}

/// The 16-bit command flags field of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// Force unit access: reply only once the written data is durable.
    pub const FUA: CommandFlags = CommandFlags(consts::CMD_FLAG_FUA);
    /// WRITE_ZEROES must leave the range allocated.
    pub const NO_HOLE: CommandFlags = CommandFlags(consts::CMD_FLAG_NO_HOLE);
    /// READ must be answered with at most one content chunk.
    pub const DF: CommandFlags = CommandFlags(consts::CMD_FLAG_DF);
    /// BLOCK_STATUS needs only one extent.
    pub const REQ_ONE: CommandFlags = CommandFlags(consts::CMD_FLAG_REQ_ONE);
    /// WRITE_ZEROES must fail with `ENOTSUP` unless it is fast.
    pub const FAST_ZERO: CommandFlags = CommandFlags(consts::CMD_FLAG_FAST_ZERO);
    /// Extended headers only: `length` counts payload bytes that follow.
    pub const PAYLOAD_LEN: CommandFlags = CommandFlags(consts::CMD_FLAG_PAYLOAD_LEN);

    /// No flags.
    pub const fn empty() -> CommandFlags {
        CommandFlags(0)
    }

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: CommandFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits this crate does not know; a request carrying any is invalid.
    pub fn unknown_bits(self) -> u16 {
        self.0 & !consts::KNOWN_CMD_FLAGS
    }
}

impl std::ops::BitOr for CommandFlags {
    type Output = CommandFlags;
    fn bitor(self, rhs: CommandFlags) -> CommandFlags {
        CommandFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for CommandFlags {
    fn bitor_assign(&mut self, rhs: CommandFlags) {
        self.0 |= rhs.0;
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags as sent (not yet validated).
    pub flags: CommandFlags,
    /// The command.
    pub command: Command,
    /// Opaque value the reply must echo (the spec's "handle").
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length of the range (and of the payload, for writes). Compact
    /// headers carry 32 bits of it; extended headers all 64.
    pub length: u64,
}

impl Request {
    /// Number of payload bytes that follow this header on the wire. The
    /// server must consume exactly this many bytes before the next header,
    /// even when it rejects the request.
    ///
    /// Compact headers: `length` for WRITE, zero for everything else.
    /// Extended headers: `length` for WRITE and for any command with
    /// `PAYLOAD_LEN`, else zero. The spec has clients set `PAYLOAD_LEN` on
    /// every extended WRITE, but qemu 10 does not (observed: its extended
    /// WRITEs carry only `FUA`), and a WRITE's length can only mean its
    /// payload, so a WRITE is read the same with or without the flag.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let has_payload = self.command == Command::Write
            || (extended && self.flags.contains(CommandFlags::PAYLOAD_LEN));
        if has_payload {
            self.length
        } else {
            0
        }
    }

    /// Encodes the compact header as a client sends it. A `length` above
    /// `u32::MAX` does not fit and is sent as `u32::MAX` (a compact client
    /// cannot ask for more).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        let length = u32::try_from(self.length).unwrap_or(u32::MAX);
        b[0..4].copy_from_slice(&consts::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    /// Encodes the extended (32-byte) header as a client sends it, flags
    /// as given (a WRITE needs `PAYLOAD_LEN`).
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_HEADER_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&consts::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Splits a fixed-size array into a fixed-size head and the rest, without any
/// fallible indexing.
fn take<const N: usize>(bytes: &[u8]) -> ([u8; N], &[u8]) {
    let mut head = [0u8; N];
    let n = N.min(bytes.len());
    let (h, rest) = bytes.split_at(n);
    head[..n].copy_from_slice(h);
    (head, rest)
}

/// Decodes a compact request header. The only failure is a wrong magic
/// number, after which the stream is out of sync and must be dropped; every
/// other oddity is left to [`check_request`] so it can be answered with an
/// error reply.
pub fn decode_request(header: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtocolError> {
    let (head, rest) = decode_common(header, consts::REQUEST_MAGIC)?;
    let (length, _) = take::<4>(rest);
    Ok(Request {
        length: u64::from(u32::from_be_bytes(length)),
        ..head
    })
}

/// Decodes an extended (32-byte) request header; like [`decode_request`],
/// only a wrong magic fails.
pub fn decode_extended_request(
    header: &[u8; EXTENDED_REQUEST_HEADER_LEN],
) -> Result<Request, ProtocolError> {
    let (head, rest) = decode_common(header, consts::EXTENDED_REQUEST_MAGIC)?;
    let (length, _) = take::<8>(rest);
    Ok(Request {
        length: u64::from_be_bytes(length),
        ..head
    })
}

/// Decodes the header of a session that did (`extended`) or did not
/// negotiate extended headers. `header` must hold [`header_len`] bytes;
/// fewer (or more) is a [`ProtocolError::BadHeaderLength`].
pub fn decode_header(header: &[u8], extended: bool) -> Result<Request, ProtocolError> {
    let bad = || ProtocolError::BadHeaderLength {
        got: header.len(),
        want: header_len(extended),
    };
    if extended {
        decode_extended_request(header.try_into().map_err(|_| bad())?)
    } else {
        decode_request(header.try_into().map_err(|_| bad())?)
    }
}

/// The fields both header forms share, and the bytes after them (the
/// length field). Fails on a magic other than `magic`.
fn decode_common(header: &[u8], magic: u32) -> Result<(Request, &[u8]), ProtocolError> {
    let (got, rest) = take::<4>(header);
    let (flags, rest) = take::<2>(rest);
    let (command, rest) = take::<2>(rest);
    let (cookie, rest) = take::<8>(rest);
    let (offset, rest) = take::<8>(rest);
    let got = u32::from_be_bytes(got);
    if got != magic {
        return Err(ProtocolError::BadRequestMagic(got));
    }
    let req = Request {
        flags: CommandFlags(u16::from_be_bytes(flags)),
        command: Command::from_code(u16::from_be_bytes(command)),
        cookie: u64::from_be_bytes(cookie),
        offset: u64::from_be_bytes(offset),
        length: 0,
    };
    Ok((req, rest))
}

/// What the server should do with a decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The request is valid for this export: perform it.
    Serve,
    /// Answer with this error and carry on. For a WRITE the payload
    /// ([`Request::payload_len`] bytes) is still on the wire and must be
    /// drained first.
    Reject(ErrorCode),
    /// Drop the connection: the request cannot be answered safely.
    Close(ProtocolError),
}

/// Applies the spec's validity rules to a request, given what was negotiated.
///
/// Checks, in this order (the first failing one decides):
///
/// 1. Unknown command → `Reject(EINVAL)`. `DISC` → `Serve` whatever its
///    fields, because it gets no reply and the server closes anyway.
/// 2. READ/WRITE longer than the maximum payload, or (extended headers) any
///    `PAYLOAD_LEN` payload longer than it → `Close`: the spec lets a server
///    treat oversized payloads as denial of service, and checking this first
///    guarantees a rejected request never has more than the maximum payload
///    left to drain.
/// 3. Unknown flag bits → `Reject(EINVAL)`.
/// 4. A command the transmission flags did not expose (FLUSH, TRIM,
///    WRITE_ZEROES, CACHE) or BLOCK_STATUS without a negotiated
///    `base:allocation` → `Reject(EINVAL)`.
/// 5. A flag that does not fit: `FUA` without `SEND_FUA`; `NO_HOLE` or
///    `FAST_ZERO` off WRITE_ZEROES; `DF` off READ or without `SEND_DF`;
///    `REQ_ONE` off BLOCK_STATUS; `PAYLOAD_LEN` off WRITE or without
///    extended headers → `Reject(EINVAL)` (a payload announced with it is
///    drained first: [`Request::payload_len`]). `FAST_ZERO` on
///    WRITE_ZEROES when `SEND_FAST_ZERO` was not advertised →
///    `Reject(ENOTSUP)`. `FUA` is accepted on every command once `SEND_FUA`
///    is advertised, as the spec requires.
/// 6. WRITE, TRIM, WRITE_ZEROES on a read-only export → `Reject(EPERM)`.
/// 7. FLUSH → `Serve` (its offset and length are reserved; they are ignored
///    rather than rejected so sloppy clients keep working).
/// 8. A range past the end of the export (overflow-safe) → `Reject(ENOSPC)`
///    for WRITE/WRITE_ZEROES, `Reject(EINVAL)` for READ, TRIM, CACHE,
///    BLOCK_STATUS.
/// 9. Offset or length not a multiple of the minimum block size →
///    `Reject(EINVAL)`.
/// 10. Zero-length BLOCK_STATUS → `Reject(EINVAL)` (no valid reply exists:
///     every extent must be non-empty). Other zero-length requests are
///     served as no-ops, since the spec asks servers not to disconnect (a
///     zero-length READ under structured or extended replies is answered
///     with a lone `NONE` chunk: an `OFFSET_DATA` chunk must carry data).
///
/// Lengths of TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS are not held to the
/// maximum payload: they carry no payload, and Linux clients send
/// multi-gigabyte discards and zeroing requests regardless of advertised
/// limits. With extended headers they are 64-bit effect lengths.
pub fn check_request(req: &Request, neg: &Negotiated) -> Verdict {
    check_request_at(req, neg, neg.export.size)
}

/// [`check_request`] against the export's size now, `size`, rather than
/// the size negotiated: after an online resize a server serves a
/// connection's requests up to the new end (a kernel client learns the new
/// size without a new handshake) and refuses those past a shrunk one.
pub fn check_request_at(req: &Request, neg: &Negotiated, size: u64) -> Verdict {
    let checks = check_command(req, neg)
        .and_then(|()| check_permission(req, neg))
        .and_then(|()| check_exposed(req, neg))
        .and_then(|()| check_command_flags(req, neg));
    if let Err(verdict) = checks {
        return verdict;
    }
    // 7. FLUSH has no range.
    if req.command == Command::Flush {
        return Verdict::Serve;
    }
    match check_range(req, &neg.export, size) {
        Ok(()) => Verdict::Serve,
        Err(verdict) => verdict,
    }
}

/// Steps 1 to 3 of [`check_request`]: commands that never get further, then
/// flags nobody defined. `Err` carries the final verdict.
fn check_command(req: &Request, neg: &Negotiated) -> Result<(), Verdict> {
    let (_, _, max_payload) = neg.export.block_sizes();
    let cmd = req.command;
    let payload = req.payload_len(neg.extended_headers);
    let too_long = |length| {
        Err(Verdict::Close(ProtocolError::RequestTooLong {
            command: cmd.code(),
            length,
            max: max_payload,
        }))
    };
    // 1 + 2: commands that never get further.
    match cmd {
        Command::Disc => return Err(Verdict::Serve),
        _ if payload > u64::from(max_payload) => return too_long(payload),
        Command::Unknown(_) => return Err(Verdict::Reject(ErrorCode::Inval)),
        Command::Read | Command::Write if req.length > u64::from(max_payload) => {
            return too_long(req.length)
        }
        _ => {}
    }
    // 3. Flags nobody defined.
    if req.flags.unknown_bits() != 0 {
        return Err(Verdict::Reject(ErrorCode::Inval));
    }
    Ok(())
}

/// Step 6 of [`check_request`], checked before 4: modifications of a
/// read-only export are EPERM, whether or not trim and zeroes were
/// advertised: the spec's read-only rule is the one a client (and its user)
/// can act on.
fn check_permission(req: &Request, neg: &Negotiated) -> Result<(), Verdict> {
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    let read_only = neg.export.read_only || neg.transmission_flags & consts::FLAG_READ_ONLY != 0;
    if writes && read_only {
        return Err(Verdict::Reject(ErrorCode::Perm));
    }
    Ok(())
}

/// Step 4 of [`check_request`]: commands the client was never told it could
/// use.
fn check_exposed(req: &Request, neg: &Negotiated) -> Result<(), Verdict> {
    let has = |flag: u16| neg.transmission_flags & flag != 0;
    let exposed = match req.command {
        Command::Read | Command::Write => true,
        Command::Flush => has(consts::FLAG_SEND_FLUSH),
        Command::Trim => has(consts::FLAG_SEND_TRIM),
        Command::WriteZeroes => has(consts::FLAG_SEND_WRITE_ZEROES),
        Command::Cache => has(consts::FLAG_SEND_CACHE),
        Command::BlockStatus => {
            neg.structured_replies && (neg.base_allocation.is_some() || neg.dirty_bitmap.is_some())
        }
        // Handled by check_command; listed so a new variant forces a
        // decision here.
        Command::Disc | Command::Unknown(_) => true,
    };
    if !exposed {
        return Err(Verdict::Reject(ErrorCode::Inval));
    }
    Ok(())
}

/// Step 5 of [`check_request`]: flags that do not belong to this command or
/// were not advertised.
fn check_command_flags(req: &Request, neg: &Negotiated) -> Result<(), Verdict> {
    let has = |flag: u16| neg.transmission_flags & flag != 0;
    let (cmd, flags) = (req.command, req.flags);
    let inval = Err(Verdict::Reject(ErrorCode::Inval));
    if flags.contains(CommandFlags::FUA) && !has(consts::FLAG_SEND_FUA) {
        return inval;
    }
    if flags.contains(CommandFlags::NO_HOLE) && cmd != Command::WriteZeroes {
        return inval;
    }
    if flags.contains(CommandFlags::DF) && (cmd != Command::Read || !has(consts::FLAG_SEND_DF)) {
        return inval;
    }
    if flags.contains(CommandFlags::REQ_ONE) && cmd != Command::BlockStatus {
        return inval;
    }
    if flags.contains(CommandFlags::PAYLOAD_LEN) && (cmd != Command::Write || !neg.extended_headers)
    {
        return inval;
    }
    if flags.contains(CommandFlags::FAST_ZERO) {
        if cmd != Command::WriteZeroes {
            return inval;
        }
        if !has(consts::FLAG_SEND_FAST_ZERO) {
            return Err(Verdict::Reject(ErrorCode::NotSup));
        }
    }
    Ok(())
}

/// Steps 8 to 10 of [`check_request`]: the range of a command that has one.
fn check_range(
    req: &Request,
    export: &crate::handshake::ExportInfo,
    size: u64,
) -> Result<(), Verdict> {
    let cmd = req.command;
    // 8. Range within the export; checked_add so a huge offset cannot wrap
    //    around into range.
    let in_bounds = req
        .offset
        .checked_add(req.length)
        .is_some_and(|end| end <= size);
    if !in_bounds {
        return Err(Verdict::Reject(match cmd {
            Command::Write | Command::WriteZeroes => ErrorCode::NoSpc,
            _ => ErrorCode::Inval,
        }));
    }
    // 9. Alignment to the advertised minimum block size (never zero).
    let (min_block, _, _) = export.block_sizes();
    let min = u64::from(min_block.max(1));
    if req.offset % min != 0 || req.length % min != 0 {
        return Err(Verdict::Reject(ErrorCode::Inval));
    }
    // 10. An empty BLOCK_STATUS cannot be answered with a valid extent.
    if cmd == Command::BlockStatus && req.length == 0 {
        return Err(Verdict::Reject(ErrorCode::Inval));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::ExportInfo;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 1 << 20,
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: false,
            can_cache: false,
            can_df: true,
            can_multi_conn: false,
            can_block_status: true,
            can_dirty_bitmap: true,
            min_block: 512,
            preferred_block: 4096,
            max_payload: 64 * 1024,
        }
    }

    fn neg_with(export: ExportInfo, structured: bool) -> Negotiated {
        let mut flags = export.transmission_flags();
        if !structured {
            flags &= !consts::FLAG_SEND_DF;
        }
        Negotiated {
            transmission_flags: flags,
            structured_replies: structured,
            extended_headers: false,
            base_allocation: structured.then_some(1),
            dirty_bitmap: None,
            no_zeroes: true,
            export,
        }
    }

    fn extended(export: ExportInfo) -> Negotiated {
        Negotiated {
            extended_headers: true,
            ..neg_with(export, true)
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags: CommandFlags(flags),
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn decode_round_trip_and_bad_magic() {
        let r = req(Command::Write, 1, 4096, 512);
        let mut bytes = r.encode();
        assert_eq!(decode_request(&bytes), Ok(r));
        bytes[0] ^= 1;
        assert!(matches!(
            decode_request(&bytes),
            Err(ProtocolError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn unknown_command_code_is_kept() {
        let r = req(Command::Unknown(99), 0, 0, 0);
        let decoded = decode_request(&r.encode()).unwrap();
        assert_eq!(decoded.command, Command::Unknown(99));
        assert_eq!(Command::from_code(8), Command::Unknown(8));
    }

    #[test]
    fn payload_len_only_for_writes() {
        assert_eq!(req(Command::Write, 0, 0, 512).payload_len(false), 512);
        assert_eq!(req(Command::Read, 0, 0, 512).payload_len(false), 0);
        assert_eq!(req(Command::WriteZeroes, 0, 0, 512).payload_len(false), 0);
        // Compact headers ignore PAYLOAD_LEN; extended ones follow only it.
        let p = consts::CMD_FLAG_PAYLOAD_LEN;
        assert_eq!(req(Command::Read, p, 0, 512).payload_len(false), 0);
        assert_eq!(req(Command::Read, p, 0, 512).payload_len(true), 512);
        assert_eq!(req(Command::Write, p, 0, 512).payload_len(true), 512);
        assert_eq!(req(Command::Write, 0, 0, 512).payload_len(true), 512);
    }

    #[test]
    fn extended_header_round_trip_and_dispatch() {
        let r = req(Command::WriteZeroes, 0, 4096, 5 << 30);
        let b = r.encode_extended();
        assert_eq!(&b[0..4], &consts::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&b[24..32], &(5u64 << 30).to_be_bytes());
        assert_eq!(decode_extended_request(&b), Ok(r));
        assert_eq!(decode_header(&b, true), Ok(r));
        // Each style refuses the other's magic and size.
        assert!(matches!(
            decode_request(&b[..28].try_into().unwrap()),
            Err(ProtocolError::BadRequestMagic(_))
        ));
        assert!(matches!(
            decode_header(&b, false),
            Err(ProtocolError::BadHeaderLength { got: 32, want: 28 })
        ));
        let compact = req(Command::Read, 0, 0, 512).encode();
        assert!(matches!(
            decode_header(&compact, true),
            Err(ProtocolError::BadHeaderLength { got: 28, want: 32 })
        ));
        assert_eq!(header_len(false), 28);
        assert_eq!(header_len(true), 32);
    }

    #[test]
    fn ranges_follow_the_size_now_after_a_resize() {
        use ErrorCode::*;
        let mut e = export();
        e.size = 1 << 20;
        let n = neg_with(e, true);
        let past = req(Command::Read, 0, 1 << 20, 4096);
        let write_past = req(Command::Write, 0, 1 << 20, 4096);
        assert_eq!(check_request(&past, &n), Verdict::Reject(Inval));
        // Grown: past the negotiated end, inside the new one.
        assert_eq!(check_request_at(&past, &n, 2 << 20), Verdict::Serve);
        assert_eq!(check_request_at(&write_past, &n, 2 << 20), Verdict::Serve);
        assert_eq!(
            check_request_at(&req(Command::Read, 0, 2 << 20, 4096), &n, 2 << 20),
            Verdict::Reject(Inval)
        );
        // Shrunk: inside the negotiated end, past the new one.
        let tail = req(Command::Write, 0, (1 << 20) - 4096, 4096);
        assert_eq!(check_request(&tail, &n), Verdict::Serve);
        assert_eq!(
            check_request_at(&tail, &n, 512 << 10),
            Verdict::Reject(NoSpc)
        );
    }

    #[test]
    fn extended_rules() {
        use ErrorCode::*;
        let mut e = export();
        e.size = 16 << 30;
        let n = extended(e.clone());
        let p = consts::CMD_FLAG_PAYLOAD_LEN;
        // 64-bit effect lengths for commands without payload.
        for r in [
            req(Command::Trim, 0, 0, 8 << 30),
            req(Command::WriteZeroes, 0, 0, 8 << 30),
            req(Command::BlockStatus, 0, 0, 8 << 30),
            req(Command::Write, p, 0, 4096),
            req(Command::Write, 0, 0, 0),
            req(Command::Read, 0, 0, 0),
        ] {
            assert_eq!(check_request(&r, &n), Verdict::Serve, "{r:?}");
        }
        // READ and WRITE stay bounded by the maximum payload.
        for r in [
            req(Command::Read, 0, 0, 8 << 30),
            req(Command::Write, p, 0, 128 * 1024),
            req(Command::Trim, p, 0, 128 * 1024),
        ] {
            assert!(
                matches!(
                    check_request(&r, &n),
                    Verdict::Close(ProtocolError::RequestTooLong { .. })
                ),
                "{r:?}"
            );
        }
        // A WRITE without PAYLOAD_LEN (qemu 10 sends them) still has its
        // payload.
        assert_eq!(
            check_request(&req(Command::Write, 0, 0, 4096), &n),
            Verdict::Serve
        );
        // PAYLOAD_LEN where no payload form exists, or in compact mode.
        assert_eq!(
            check_request(&req(Command::BlockStatus, p, 0, 512), &n),
            Verdict::Reject(Inval)
        );
        assert_eq!(
            check_request(&req(Command::Write, p, 0, 512), &neg_with(e.clone(), true)),
            Verdict::Reject(Inval)
        );
        // Ranges are still checked with 64-bit lengths, overflow-safe.
        assert_eq!(
            check_request(&req(Command::WriteZeroes, 0, 0, 17 << 30), &n),
            Verdict::Reject(NoSpc)
        );
        assert_eq!(
            check_request(&req(Command::Trim, 0, 4096, u64::MAX - 511), &n),
            Verdict::Reject(Inval)
        );
    }

    #[test]
    fn flags_contains() {
        let f = CommandFlags::FUA | CommandFlags::DF;
        assert!(f.contains(CommandFlags::FUA));
        assert!(f.contains(CommandFlags::DF));
        assert!(!f.contains(CommandFlags::REQ_ONE));
        assert!(f.contains(CommandFlags::empty()));
        assert_eq!(CommandFlags(0x8000).unknown_bits(), 0x8000);
    }

    #[test]
    fn valid_requests_are_served() {
        let n = neg_with(export(), true);
        for r in [
            req(Command::Read, 0, 0, 4096),
            req(Command::Read, consts::CMD_FLAG_DF, 0, 4096),
            req(Command::Read, consts::CMD_FLAG_FUA, 0, 4096),
            req(Command::Write, consts::CMD_FLAG_FUA, (1 << 20) - 512, 512),
            req(Command::Flush, 0, 0, 0),
            req(Command::Flush, 0, 123, 45),
            req(Command::Trim, 0, 0, 1 << 20),
            req(Command::WriteZeroes, consts::CMD_FLAG_NO_HOLE, 0, 1 << 20),
            req(Command::BlockStatus, consts::CMD_FLAG_REQ_ONE, 0, 1 << 20),
            req(Command::Disc, 0xffff, 1, 1),
            req(Command::Read, 0, 1 << 20, 0),
        ] {
            assert_eq!(check_request(&r, &n), Verdict::Serve, "{r:?}");
        }
    }

    #[test]
    fn oversized_read_write_close() {
        let n = neg_with(export(), true);
        for c in [Command::Read, Command::Write] {
            assert!(matches!(
                check_request(&req(c, 0, 0, 128 * 1024), &n),
                Verdict::Close(ProtocolError::RequestTooLong { .. })
            ));
        }
        // No payload: not a denial of service, so not bounded.
        assert_eq!(
            check_request(&req(Command::Trim, 0, 0, 1 << 20), &n),
            Verdict::Serve
        );
    }

    #[test]
    fn rejections() {
        use ErrorCode::*;
        let n = neg_with(export(), true);
        let cases = [
            (req(Command::Unknown(42), 0, 0, 0), Inval),
            (req(Command::Read, 0x20, 0, 512), Inval),
            (req(Command::Cache, 0, 0, 512), Inval),
            (req(Command::Read, consts::CMD_FLAG_NO_HOLE, 0, 512), Inval),
            (req(Command::Write, consts::CMD_FLAG_DF, 0, 512), Inval),
            (req(Command::Read, consts::CMD_FLAG_REQ_ONE, 0, 512), Inval),
            (
                req(Command::Trim, consts::CMD_FLAG_FAST_ZERO, 0, 512),
                Inval,
            ),
            (
                req(Command::WriteZeroes, consts::CMD_FLAG_FAST_ZERO, 0, 512),
                NotSup,
            ),
            (req(Command::Write, 0, 1 << 20, 512), NoSpc),
            (req(Command::WriteZeroes, 0, 1 << 20, 512), NoSpc),
            (req(Command::Read, 0, 1 << 20, 512), Inval),
            (req(Command::Trim, 0, u64::MAX - 100, 512), Inval),
            (req(Command::Write, 0, u64::MAX - 100, 512), NoSpc),
            (req(Command::BlockStatus, 0, 1 << 20, 512), Inval),
            (req(Command::Read, 0, 100, 512), Inval),
            (req(Command::Write, 0, 0, 100), Inval),
            (req(Command::BlockStatus, 0, 0, 0), Inval),
        ];
        for (r, e) in cases {
            assert_eq!(check_request(&r, &n), Verdict::Reject(e), "{r:?}");
        }
    }

    #[test]
    fn negotiation_dependent_rules() {
        use ErrorCode::*;
        // Without structured replies there is no DF and no BLOCK_STATUS.
        let n = neg_with(export(), false);
        assert_eq!(
            check_request(&req(Command::Read, consts::CMD_FLAG_DF, 0, 512), &n),
            Verdict::Reject(Inval)
        );
        assert_eq!(
            check_request(&req(Command::BlockStatus, 0, 0, 512), &n),
            Verdict::Reject(Inval)
        );

        // Read-only export.
        let mut e = export();
        e.read_only = true;
        let n = neg_with(e, true);
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(check_request(&req(c, 0, 0, 512), &n), Verdict::Reject(Perm));
        }
        assert_eq!(
            check_request(&req(Command::Read, 0, 0, 512), &n),
            Verdict::Serve
        );

        // Nothing optional advertised.
        let mut e = export();
        e.can_flush = false;
        e.can_fua = false;
        e.can_trim = false;
        e.can_write_zeroes = false;
        e.can_fast_zero = true; // meaningless without write zeroes
        let n = neg_with(e, true);
        for r in [
            req(Command::Flush, 0, 0, 0),
            req(Command::Trim, 0, 0, 512),
            req(Command::WriteZeroes, 0, 0, 512),
            req(Command::Write, consts::CMD_FLAG_FUA, 0, 512),
        ] {
            assert_eq!(check_request(&r, &n), Verdict::Reject(Inval), "{r:?}");
        }

        // Fast zero advertised.
        let mut e = export();
        e.can_fast_zero = true;
        let n = neg_with(e, true);
        assert_eq!(
            check_request(
                &req(Command::WriteZeroes, consts::CMD_FLAG_FAST_ZERO, 0, 512),
                &n
            ),
            Verdict::Serve
        );
    }

    #[test]
    fn zero_block_sizes_do_not_divide_by_zero() {
        let mut e = export();
        e.min_block = 0;
        e.max_payload = 0;
        let n = neg_with(e, true);
        assert_eq!(
            check_request(&req(Command::Read, 0, 3, 5), &n),
            Verdict::Serve
        );
    }
}
