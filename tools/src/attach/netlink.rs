//! Generic netlink, hand-rolled: message encoding, a bounds-checked
//! attribute parser, and a blocking socket over libc.
//!
//! Why not a crate: `mirrorblk attach` needs four requests of one family
//! (nbd), the control family's family lookup, and one multicast group.
//! That is ~300 lines over `socket(AF_NETLINK)`; the netlink crates
//! (neli, netlink-packet-*) are async-first or pull in macros and a dozen
//! dependencies for a surface we would mostly not use. The wire format is
//! small and stable (`linux/netlink.h`, `linux/genetlink.h`), and the
//! parser here is fuzzed by a property test.
//!
//! Layout (native endian, every part padded to 4 bytes):
//! `nlmsghdr {len u32, type u16, flags u16, seq u32, pid u32}`,
//! `genlmsghdr {cmd u8, version u8, reserved u16}`, then attributes
//! `nlattr {len u16, type u16}` + payload.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `NLMSG_ERROR`: an error or (error 0) an acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multi-part answer.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`: ask for an acknowledgement.
const NLM_F_ACK: u16 = 4;
/// `NLA_F_NESTED`: the attribute holds attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// The attribute type without the nested / byte-order flags.
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// The control family (`GENL_ID_CTRL`).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
/// Largest message read at once (the kernel's default page-sized messages).
const RECV_BUF: usize = 32 * 1024;

/// `SOL_NETLINK` and `NETLINK_ADD_MEMBERSHIP` (not in every libc build).
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic netlink request being built: header, then attributes.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    /// Start offsets of nests not yet closed.
    open: Vec<usize>,
}

impl Message {
    /// A request to `family` running `cmd` (version `version`), asking for
    /// an acknowledgement. The sequence number is set by [`Socket::request`].
    pub fn new(family: u16, cmd: u8, version: u8) -> Message {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message {
            buf,
            open: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        assert!(len <= usize::from(u16::MAX), "netlink attribute too long");
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// A `u8` attribute (what the kernel sends in status answers).
    #[cfg(test)]
    pub fn u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.attr(kind, &[v])
    }

    /// A `u32` attribute.
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A `u64` attribute.
    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b)
    }

    /// Opens a nested attribute; attributes added until [`Message::end_nest`]
    /// go inside it.
    pub fn nest(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }

    /// Closes the innermost open nest (its length now covers its contents).
    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.open.pop().expect("end_nest without nest");
        let len = self.buf.len() - start;
        assert!(len <= usize::from(u16::MAX), "netlink nest too long");
        self.buf[start..start + 2].copy_from_slice(&(len as u16).to_ne_bytes());
        self
    }

    /// The finished message with sequence number `seq`.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        assert!(self.open.is_empty(), "netlink message with an open nest");
        let mut b = self.buf.clone();
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }
}

/// Why a netlink buffer could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A header or attribute runs past the end of its buffer.
    #[error("netlink {what} truncated ({len} bytes left)")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes that were there.
        len: usize,
    },
    /// An attribute's payload is not the size its type needs.
    #[error("netlink attribute {kind} has {len} payload bytes, wanted {want}")]
    BadPayload {
        /// Attribute type.
        kind: u16,
        /// Payload length.
        len: usize,
        /// Expected length.
        want: usize,
    },
}

/// One attribute: its type (flags masked off) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// The type without `NLA_F_NESTED`.
    pub kind: u16,
    /// The payload, padding excluded.
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The payload as a `u32`.
    pub fn u32(&self) -> Result<u32, ParseError> {
        let b: [u8; 4] = self.payload.try_into().map_err(|_| self.bad(4))?;
        Ok(u32::from_ne_bytes(b))
    }

    /// The payload as a `u16`.
    pub fn u16(&self) -> Result<u16, ParseError> {
        let b: [u8; 2] = self.payload.try_into().map_err(|_| self.bad(2))?;
        Ok(u16::from_ne_bytes(b))
    }

    /// The payload as a `u8`.
    pub fn u8(&self) -> Result<u8, ParseError> {
        match self.payload {
            [b] => Ok(*b),
            _ => Err(self.bad(1)),
        }
    }

    /// The payload as a string (up to its first NUL).
    pub fn string(&self) -> String {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }

    /// The attributes nested in this one.
    pub fn nested(&self) -> Result<Vec<Attr<'a>>, ParseError> {
        parse_attrs(self.payload)
    }

    fn bad(&self, want: usize) -> ParseError {
        ParseError::BadPayload {
            kind: self.kind,
            len: self.payload.len(),
            want,
        }
    }
}

/// Parses a run of attributes. Every length is checked against the
/// buffer: a short or overlong attribute is an error, never a panic.
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<Attr<'_>>, ParseError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err(ParseError::Truncated {
                what: "attribute header",
                len: buf.len(),
            });
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(ParseError::Truncated {
                what: "attribute",
                len: buf.len(),
            });
        }
        out.push(Attr {
            kind,
            payload: &buf[4..len],
        });
        // The last attribute may lack its padding.
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// An acknowledgement (error 0) or error (negative errno) for `seq`.
    Ack {
        /// The request's sequence number.
        seq: u32,
        /// 0, or a negative errno.
        error: i32,
    },
    /// A generic netlink message.
    Genl {
        /// Family id (`nlmsg_type`).
        family: u16,
        /// Sequence number (0 for notifications).
        seq: u32,
        /// `genlmsghdr.cmd`.
        cmd: u8,
        /// The attributes' bytes.
        attrs: Vec<u8>,
    },
    /// `NLMSG_DONE` or a type this code does not use.
    Other,
}

/// Splits a datagram into its netlink messages.
pub fn parse_messages(mut buf: &[u8]) -> Result<Vec<Received>, ParseError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(ParseError::Truncated {
                what: "message header",
                len: buf.len(),
            });
        }
        let word = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let len = word(0) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = word(8);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(ParseError::Truncated {
                what: "message",
                len: buf.len(),
            });
        }
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                let b: [u8; 4] =
                    body.get(..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(ParseError::Truncated {
                            what: "error message",
                            len: body.len(),
                        })?;
                Received::Ack {
                    seq,
                    error: i32::from_ne_bytes(b),
                }
            }
            NLMSG_DONE => Received::Other,
            k if k >= GENL_ID_CTRL => {
                if body.len() < GENL_HDRLEN {
                    return Err(ParseError::Truncated {
                        what: "generic netlink header",
                        len: body.len(),
                    });
                }
                Received::Genl {
                    family: k,
                    seq,
                    cmd: body[0],
                    attrs: body[GENL_HDRLEN..].to_vec(),
                }
            }
            _ => Received::Other,
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// A generic netlink family as the kernel's control family describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// Its id (the `nlmsg_type` of its messages).
    pub id: u16,
    /// Its multicast groups: name and id.
    pub groups: Vec<(String, u32)>,
}

/// Decodes the control family's answer to `CTRL_CMD_GETFAMILY`.
pub fn decode_family(attrs: &[u8]) -> Result<Option<Family>, ParseError> {
    let mut id = None;
    let mut groups = Vec::new();
    for a in parse_attrs(attrs)? {
        match a.kind {
            CTRL_ATTR_FAMILY_ID => id = Some(a.u16()?),
            CTRL_ATTR_MCAST_GROUPS => {
                for g in a.nested()? {
                    let mut name = None;
                    let mut gid = None;
                    for f in g.nested()? {
                        match f.kind {
                            CTRL_ATTR_MCAST_GRP_NAME => name = Some(f.string()),
                            CTRL_ATTR_MCAST_GRP_ID => gid = Some(f.u32()?),
                            _ => {}
                        }
                    }
                    if let (Some(n), Some(i)) = (name, gid) {
                        groups.push((n, i));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(id.map(|id| Family { id, groups }))
}

/// A `NETLINK_GENERIC` socket (blocking, with a receive timeout).
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens and binds a generic netlink socket.
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a socket we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is "kernel assigns the port".
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 1 })
    }

    /// Sets how long a receive may block (None: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = timeout.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |d| libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: libc::suseconds_t::from(d.subsec_micros().max(1)),
            },
        );
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv,
        )
    }

    /// Joins multicast group `group`.
    pub fn join(&self, group: u32) -> io::Result<()> {
        setsockopt(
            self.fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            &group,
        )
    }

    /// Sends `msg` and reads until its acknowledgement; returns the
    /// generic netlink answers that came before it. A negative errno in
    /// the acknowledgement is an `io::Error` of that errno.
    pub fn request(&mut self, msg: &Message) -> io::Result<Vec<Received>> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: bytes is a valid buffer of the length passed; the socket
        // is connected to the kernel by bind (destination 0 by default).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answers = Vec::new();
        // Bounded: the kernel answers a request with a few messages at most.
        for _ in 0..64 {
            for m in self.recv()? {
                match m {
                    Received::Ack { seq: s, error } if s == seq => {
                        return if error == 0 {
                            Ok(answers)
                        } else {
                            Err(io::Error::from_raw_os_error(-error))
                        };
                    }
                    Received::Genl { seq: s, .. } if s == seq => answers.push(m),
                    _ => {}
                }
            }
        }
        Err(io::Error::other(
            "no netlink acknowledgement after 64 messages",
        ))
    }

    /// Receives one datagram (blocking up to the timeout) and parses it.
    /// A timeout is `ErrorKind::WouldBlock`; an overrun (`ENOBUFS`: the
    /// kernel dropped messages) is returned as is.
    pub fn recv(&self) -> io::Result<Vec<Received>> {
        let mut buf = vec![0u8; RECV_BUF];
        // SAFETY: buf is a valid writable buffer of the length passed.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        parse_messages(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Looks `name` up in the control family; None when the kernel has no
    /// such family (its module is not loaded).
    pub fn resolve(&mut self, name: &str) -> io::Result<Option<Family>> {
        let mut m = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        m.string(CTRL_ATTR_FAMILY_NAME, name);
        match self.request(&m) {
            Ok(answers) => {
                for a in answers {
                    if let Received::Genl { attrs, .. } = a {
                        return decode_family(&attrs)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Ok(None)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// setsockopt(2) with a value of type `T`.
pub fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(v).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn message_layout_matches_the_kernel_headers() {
        let mut m = Message::new(0x1c, 3, 1);
        m.u32(1, 7)
            .u64(2, 1 << 33)
            .nest(7)
            .nest(1)
            .u32(1, 9)
            .end_nest()
            .end_nest();
        let b = m.finish(42);
        assert_eq!(b.len(), 16 + 4 + 8 + 12 + 4 + 4 + 8);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x1c);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        assert_eq!(&b[16..20], &[3, 1, 0, 0]);
        let attrs = parse_attrs(&b[20..]).unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0].u32().unwrap(), 7);
        assert_eq!(attrs[1].payload, &(1u64 << 33).to_ne_bytes());
        // The nest: flag set on the wire, masked in the parse, length covers the inner item.
        assert_eq!(u16::from_ne_bytes([b[42], b[43]]), 7 | NLA_F_NESTED);
        assert_eq!(attrs[2].kind, 7);
        let items = attrs[2].nested().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].nested().unwrap()[0].u32().unwrap(), 9);
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let mut m = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        m.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let b = m.finish(1);
        // header 16 + genl 4 + attr 4 + "nbd\0" (4, already aligned).
        assert_eq!(b.len(), 28);
        let a = parse_attrs(&b[20..]).unwrap();
        assert_eq!(a[0].payload, b"nbd\0");
        assert_eq!(a[0].string(), "nbd");
    }

    /// A control-family answer as the kernel builds one.
    fn family_answer() -> Vec<u8> {
        let mut m = Message::new(GENL_ID_CTRL, 1, 2);
        m.string(CTRL_ATTR_FAMILY_NAME, "nbd")
            .attr(CTRL_ATTR_FAMILY_ID, &[0x1d, 0, 0, 0][..2])
            .nest(CTRL_ATTR_MCAST_GROUPS)
            .nest(1)
            .string(CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
            .u32(CTRL_ATTR_MCAST_GRP_ID, 0x1d)
            .end_nest()
            .end_nest();
        m.finish(5)
    }

    #[test]
    fn family_answer_decodes() {
        let msgs = parse_messages(&family_answer()).unwrap();
        let Received::Genl { attrs, seq, .. } = &msgs[0] else {
            panic!("not a genl message: {msgs:?}")
        };
        assert_eq!(*seq, 5);
        let f = decode_family(attrs).unwrap().unwrap();
        assert_eq!(f.id, u16::from_ne_bytes([0x1d, 0]));
        assert_eq!(f.groups, vec![("nbd_mc_group".to_string(), 0x1d)]);
    }

    #[test]
    fn acks_and_errors_decode() {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&9u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
        b.extend_from_slice(&[0; 16]); // the echoed request header
        assert_eq!(
            parse_messages(&b).unwrap(),
            vec![Received::Ack {
                seq: 9,
                error: -libc::EBUSY
            }]
        );
        // Cut short: an error, not a panic.
        assert!(parse_messages(&b[..18]).is_err());
    }

    #[test]
    fn short_and_overlong_attributes_are_errors() {
        assert!(parse_attrs(&[8, 0, 1]).is_err());
        assert!(parse_attrs(&[3, 0, 1, 0]).is_err());
        assert!(parse_attrs(&[12, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(Attr {
            kind: 1,
            payload: &[1, 2]
        }
        .u32()
        .is_err());
    }

    proptest! {
        /// Any bytes: the parsers return, and what they return stays
        /// inside the input.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(attrs) = parse_attrs(&bytes) {
                let total: usize = attrs.iter().map(|a| a.payload.len() + 4).sum();
                prop_assert!(total <= bytes.len());
                for a in attrs {
                    let _ = a.nested();
                    let _ = a.u32();
                }
            }
            let _ = parse_messages(&bytes);
            let _ = decode_family(&bytes);
        }

        /// Attributes written by Message parse back to what was written.
        #[test]
        fn encoded_attributes_round_trip(vals in proptest::collection::vec((1u16..0x3fff, any::<u64>()), 0..20)) {
            let mut m = Message::new(0x20, 1, 1);
            for (k, v) in &vals {
                if v % 2 == 0 { m.u64(*k, *v); } else { m.u32(*k, *v as u32); }
            }
            let b = m.finish(1);
            let attrs = parse_attrs(&b[20..]).unwrap();
            prop_assert_eq!(attrs.len(), vals.len());
            for (a, (k, v)) in attrs.iter().zip(&vals) {
                prop_assert_eq!(a.kind, *k);
                if v % 2 == 0 {
                    prop_assert_eq!(a.payload, &v.to_ne_bytes()[..]);
                } else {
                    prop_assert_eq!(a.u32().unwrap(), *v as u32);
                }
            }
        }
    }
}
