//! The NBD protocol, sans-I/O.
//!
//! This crate knows the bytes of the Network Block Device protocol
//! (`doc/proto.md` of the NBD project) and nothing about sockets, runtimes or
//! storage. A server drives it like this:
//!
//! 1. **Handshake** ([`handshake::Handshake`]): feed it the bytes the client
//!    sent, write out the bytes it queues, until it reports
//!    [`handshake::Status::Ready`] with the [`handshake::Negotiated`] result (or
//!    the client aborts/disconnects).
//! 2. **Transmission**: decode each 28-byte request header with
//!    [`request::decode_request`], check it against the negotiated export with
//!    [`request::check_request`], and encode replies with [`reply`].
//!
//! The [`client`] module holds the client side of the same codec (option and
//! request encoding, reply decoding); tests and tools use it to talk to a
//! server without a C library.
//!
//! Every parser here takes untrusted input: none panics on any byte sequence,
//! and every buffer it grows is bounded (see [`handshake::MAX_OPTION_DATA`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod consts;
pub mod error;
pub mod handshake;
pub mod meta;
pub mod reply;
pub mod request;

pub use error::{ErrorCode, ProtocolError};
pub use handshake::{
    DirtyBitmap, ExportCatalog, ExportInfo, Handshake, Negotiated, Status, TlsPolicy,
};
pub use request::{Command, CommandFlags, Request, Verdict};

// Convenience re-exports beyond the contract: the reply extent type and the
// test client, which tests reach for most often.
pub use client::{Client, ClientError, Response};
pub use reply::Extent;
