//! Error values on the wire ([`ErrorCode`]) and ways a peer can break the
//! stream ([`ProtocolError`]).

use crate::consts;

/// An NBD error value, as carried in simple replies and error chunks.
///
/// The spec restricts the error field to this set (numerically equal to the
/// common Linux `errno` values so that old clients stay intelligible).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// `NBD_EPERM`: operation not permitted (e.g. write on a read-only export).
    Perm = 1,
    /// `NBD_EIO`: input/output error.
    Io = 5,
    /// `NBD_ENOMEM`: cannot allocate memory (the spec asks servers to avoid it).
    NoMem = 12,
    /// `NBD_EINVAL`: invalid argument (bad flags, unknown command, bad range).
    Inval = 22,
    /// `NBD_ENOSPC`: no space left (write beyond the end of the export).
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: a `DF` read too large to send in one chunk.
    Overflow = 75,
    /// `NBD_ENOTSUP`: a `FAST_ZERO` write-zeroes that cannot be done fast.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown = 108,
}

impl ErrorCode {
    /// The 32-bit value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error for a wire value, or `None` if the spec does not define it
    /// (clients should then treat it like `EINVAL`).
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        Some(match code {
            consts::EPERM => ErrorCode::Perm,
            consts::EIO => ErrorCode::Io,
            consts::ENOMEM => ErrorCode::NoMem,
            consts::EINVAL => ErrorCode::Inval,
            consts::ENOSPC => ErrorCode::NoSpc,
            consts::EOVERFLOW => ErrorCode::Overflow,
            consts::ENOTSUP => ErrorCode::NotSup,
            consts::ESHUTDOWN => ErrorCode::Shutdown,
            _ => return None,
        })
    }

    /// The spec's symbolic name, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Inval => "EINVAL",
            ErrorCode::NoSpc => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSup => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// A way the peer broke the protocol badly enough that the only safe answer
/// is to drop the connection (the spec's "hard disconnect").
///
/// Server-side parsers produce the first group of variants; the client codec
/// in [`crate::client`] produces the rest when a *server* misbehaves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The client flags had bits this server does not know or did not offer.
    #[error("client flags {0:#010x} set bits the server does not know or did not advertise (known: {known:#x})", known = consts::KNOWN_CLIENT_FLAGS)]
    BadClientFlags(u32),

    /// An option header did not start with `IHAVEOPT`.
    #[error("option header magic was {0:#018x}, expected IHAVEOPT {expected:#018x}", expected = consts::IHAVEOPT)]
    BadOptionMagic(u64),

    /// A transmission request did not start with `NBD_REQUEST_MAGIC`.
    #[error("request magic was {0:#010x}, expected {expected:#010x}", expected = consts::REQUEST_MAGIC)]
    BadRequestMagic(u32),

    /// A READ or WRITE asked for more bytes than the advertised maximum
    /// payload; serving or draining it would let a client make the server
    /// buffer arbitrary amounts.
    #[error("request (command {command}) length {length} exceeds the advertised maximum payload of {max} bytes")]
    RequestTooLong {
        /// Raw command code of the request.
        command: u16,
        /// Length the client asked for (or announced as payload).
        length: u64,
        /// Maximum payload the server advertised.
        max: u32,
    },

    /// A request header handed to the decoder had the wrong size for the
    /// negotiated header style (a caller bug, reported rather than panicking).
    #[error("request header of {got} bytes, expected {want}")]
    BadHeaderLength {
        /// Bytes given.
        got: usize,
        /// Bytes the negotiated style needs.
        want: usize,
    },

    /// The server greeting did not start with `NBDMAGIC` + `IHAVEOPT`.
    #[error("server greeting was {magic:#018x} {option_magic:#018x}, expected NBDMAGIC IHAVEOPT (newstyle)")]
    BadGreeting {
        /// First 8 bytes seen.
        magic: u64,
        /// Second 8 bytes seen.
        option_magic: u64,
    },

    /// The server does not offer fixed newstyle negotiation.
    #[error(
        "server handshake flags {0:#06x} lack FIXED_NEWSTYLE; this client needs fixed newstyle"
    )]
    NotFixedNewstyle(u16),

    /// An option reply did not start with the option reply magic.
    #[error("option reply magic was {0:#018x}, expected {expected:#018x}", expected = consts::REPLY_MAGIC)]
    BadOptionReplyMagic(u64),

    /// An option reply answered a different option than the one in flight.
    #[error("option reply is for option {got}, but option {expected} was sent")]
    OptionReplyMismatch {
        /// Option the client sent.
        expected: u32,
        /// Option the reply names.
        got: u32,
    },

    /// An option reply type that makes no sense for the option in flight.
    #[error("unexpected option reply type {reply_type:#010x} to option {option}")]
    UnexpectedOptionReply {
        /// Option in flight.
        option: u32,
        /// Reply type received.
        reply_type: u32,
    },

    /// A transmission reply started with neither reply magic.
    #[error("reply magic was {0:#010x}, expected simple {simple:#010x} or structured {structured:#010x}", simple = consts::SIMPLE_REPLY_MAGIC, structured = consts::STRUCTURED_REPLY_MAGIC)]
    BadReplyMagic(u32),

    /// A reply named a cookie that has no request in flight.
    #[error("reply for cookie {0:#x}, which has no request in flight")]
    UnknownCookie(u64),

    /// A structured reply chunk had a type that is unknown or invalid for the
    /// request (and is not an error chunk).
    #[error("unexpected structured reply chunk type {chunk_type:#06x} for command {command}")]
    UnexpectedChunk {
        /// Chunk type received.
        chunk_type: u16,
        /// Raw command code of the request it answers.
        command: u16,
    },

    /// A reply (option reply or chunk) announced more data than this side is
    /// willing to buffer.
    #[error("reply announces {length} bytes of data, more than the {max} allowed")]
    ReplyTooLarge {
        /// Announced length.
        length: u64,
        /// Bound it exceeded.
        max: u64,
    },

    /// A reply whose fields are inconsistent with each other or the request.
    #[error("malformed reply: {0}")]
    MalformedReply(&'static str),

    /// A simple reply where the server must use structured replies (READ
    /// after `NBD_OPT_STRUCTURED_REPLY`), or a structured chunk where it was
    /// never negotiated.
    #[error("server used the wrong reply style for cookie {0:#x}")]
    WrongReplyStyle(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        let all = [
            ErrorCode::Perm,
            ErrorCode::Io,
            ErrorCode::NoMem,
            ErrorCode::Inval,
            ErrorCode::NoSpc,
            ErrorCode::Overflow,
            ErrorCode::NotSup,
            ErrorCode::Shutdown,
        ];
        for e in all {
            assert_eq!(ErrorCode::from_code(e.code()), Some(e));
        }
        assert_eq!(ErrorCode::Inval.code(), 22);
        assert_eq!(ErrorCode::Shutdown.code(), 108);
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(2), None);
        assert_eq!(ErrorCode::NoSpc.to_string(), "ENOSPC (28)");
    }

    #[test]
    fn protocol_error_messages_are_sentences() {
        let e = ProtocolError::BadRequestMagic(0xdead_beef);
        assert_eq!(
            e.to_string(),
            "request magic was 0xdeadbeef, expected 0x25609513"
        );
        let e = ProtocolError::RequestTooLong {
            command: 1,
            length: 100,
            max: 10,
        };
        assert!(e.to_string().contains("exceeds the advertised maximum"));
        let e = ProtocolError::BadClientFlags(0x4);
        assert!(e.to_string().contains("0x00000004"));
    }
}
