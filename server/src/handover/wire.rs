//! The hand-over message: what a daemon passes to its successor at a live
//! restart besides the descriptors themselves (which travel beside it as
//! `SCM_RIGHTS`, referred to here by their index in arrival order).
//!
//! A small, versioned, little-endian binary encoding: the successor may be
//! another build, so the format says which version it is and every count
//! and length is bounded before anything is allocated. Decoding checks that
//! every descriptor is referred to exactly once.

use std::fmt;

/// Leading bytes of every message.
pub const MAGIC: [u8; 4] = *b"MBHO";
/// The encoding's version. A successor reads this one and every older one
/// it lists in [`READS`], so an upgrade can hand over to a newer binary.
pub const VERSION: u16 = 4;
/// Versions this binary decodes: 1 lacks the etcd lease, 1 and 2 each
/// connection's extended-headers flag (their connections negotiated none),
/// 1 to 3 its dirty-bitmap context (they offered none).
pub const READS: [u16; 4] = [1, 2, 3, 4];
/// Most connections one message carries.
pub const MAX_CONNS: usize = 65_536;
/// Most listeners one message carries.
pub const MAX_LISTENERS: usize = 8;
/// Longest export name (the NBD protocol's limit).
pub const MAX_NAME: usize = 4096;
/// Longest peer address text.
pub const MAX_PEER: usize = 512;
/// Most bytes read past a request boundary that one connection carries (a
/// partial header, or what the handshake read ahead: at most its buffer).
pub const MAX_LEFTOVER: usize = 1 << 20;
/// Longest message.
pub const MAX_MESSAGE: usize = 64 << 20;

/// What a handed-over listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// NBD over TCP.
    Nbd,
    /// NBD over a Unix socket.
    NbdUnix,
    /// The admin socket.
    Admin,
    /// The replication listener (primaries connect to it).
    Replication,
    /// The Prometheus metrics endpoint.
    Metrics,
}

impl ListenerKind {
    fn code(self) -> u8 {
        match self {
            ListenerKind::Nbd => 1,
            ListenerKind::NbdUnix => 2,
            ListenerKind::Admin => 3,
            ListenerKind::Replication => 4,
            ListenerKind::Metrics => 5,
        }
    }

    fn from_code(c: u8) -> Option<ListenerKind> {
        Some(match c {
            1 => ListenerKind::Nbd,
            2 => ListenerKind::NbdUnix,
            3 => ListenerKind::Admin,
            4 => ListenerKind::Replication,
            5 => ListenerKind::Metrics,
            _ => return None,
        })
    }
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Nbd => "NBD TCP",
            ListenerKind::NbdUnix => "NBD Unix",
            ListenerKind::Admin => "admin",
            ListenerKind::Replication => "replication",
            ListenerKind::Metrics => "metrics",
        })
    }
}

/// One NBD connection stopped at a request boundary: its negotiated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnState {
    /// Index of its socket among the message's descriptors.
    pub fd: u32,
    /// A Unix-domain socket (else TCP).
    pub unix: bool,
    /// The export it negotiated.
    pub export: String,
    /// The export size the client was told.
    pub size: u64,
    /// Transmission flags as sent to the client.
    pub transmission_flags: u16,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// Extended (32-byte) headers were negotiated (version 3 on).
    pub extended_headers: bool,
    /// The `base:allocation` context id, if selected.
    pub base_allocation: Option<u32>,
    /// The `qemu:dirty-bitmap:since-LSN` context, if selected (version 4 on).
    pub dirty_bitmap: Option<nbd::DirtyBitmap>,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Bytes read past the last request served.
    pub leftover: Vec<u8>,
    /// Peer address, for logs.
    pub peer: String,
}

/// Everything but the descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The handing-over process.
    pub from_pid: u32,
    /// When it stopped taking requests (ms since the Unix epoch): the pause
    /// clients see runs from here until the successor serves.
    pub paused_at_ms: u64,
    /// Every volume was drained and checkpointed (no write under way).
    pub closed_cleanly: bool,
    /// On a node run with `--etcd`: its etcd lease (the leader key's, on a
    /// primary), which the successor renews and keeps, so a restart is no
    /// failover (version 2 on).
    pub etcd_lease: Option<i64>,
    /// Listening sockets, each with its descriptor index.
    pub listeners: Vec<(ListenerKind, u32)>,
    /// Connections.
    pub conns: Vec<ConnState>,
}

/// Why a message does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// It ends before a field.
    #[error("message ends inside {what} (needs {need} more bytes, has {have})")]
    Short {
        /// The field.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Not a hand-over message.
    #[error("not a hand-over message (bad magic)")]
    Magic,
    /// Another version of the format.
    #[error("hand-over format version {0}; this binary reads versions {READS:?}")]
    Version(u16),
    /// A count over its bound.
    #[error("{count} {what}, more than the {max} allowed")]
    TooMany {
        /// What is counted.
        what: &'static str,
        /// The count.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A length over its bound.
    #[error("{what} of {len} bytes, more than the {max} allowed")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Text that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// An unknown listener kind.
    #[error("unknown listener kind {0}")]
    Kind(u8),
    /// A flag byte that is neither 0 nor 1.
    #[error("{what} is {value}, not 0 or 1")]
    Flag {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// An absent optional value whose bytes are not zero (one encoding
    /// per state: the re-encoded message would differ).
    #[error("{0} is absent but its bytes are not zero")]
    AbsentNotZero(&'static str),
    /// A descriptor index past those received.
    #[error("descriptor index {index}, but {fds} descriptors arrived")]
    FdIndex {
        /// The index.
        index: u32,
        /// Descriptors received.
        fds: usize,
    },
    /// A descriptor referred to twice.
    #[error("descriptor {0} is referred to twice")]
    FdTwice(u32),
    /// Descriptors that nothing refers to.
    #[error("{unused} of {fds} descriptors are not referred to")]
    FdUnused {
        /// How many.
        unused: usize,
        /// Descriptors received.
        fds: usize,
    },
    /// A listener kind given twice.
    #[error("the {0} listener is given twice")]
    ListenerTwice(ListenerKind),
    /// Bytes after the message.
    #[error("{0} bytes after the message")]
    Trailing(usize),
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

impl State {
    /// The message's bytes. Panics if a field exceeds its bound (the
    /// daemon's own state never does; decoding would refuse it).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.listeners.len() <= MAX_LISTENERS && self.conns.len() <= MAX_CONNS);
        let mut out = Vec::with_capacity(64 + self.conns.len() * 96);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.from_pid.to_le_bytes());
        out.extend_from_slice(&self.paused_at_ms.to_le_bytes());
        out.push(self.closed_cleanly as u8);
        out.push(self.etcd_lease.is_some() as u8);
        out.extend_from_slice(&self.etcd_lease.unwrap_or(0).to_le_bytes());
        out.push(self.listeners.len() as u8);
        for (kind, fd) in &self.listeners {
            out.push(kind.code());
            out.extend_from_slice(&fd.to_le_bytes());
        }
        out.extend_from_slice(&(self.conns.len() as u32).to_le_bytes());
        for c in &self.conns {
            assert!(c.export.len() <= MAX_NAME && c.peer.len() <= MAX_PEER);
            assert!(c.leftover.len() <= MAX_LEFTOVER);
            out.extend_from_slice(&c.fd.to_le_bytes());
            out.push(c.unix as u8);
            put_bytes16(&mut out, c.export.as_bytes());
            out.extend_from_slice(&c.size.to_le_bytes());
            out.extend_from_slice(&c.transmission_flags.to_le_bytes());
            out.push(c.structured_replies as u8);
            out.push(c.base_allocation.is_some() as u8);
            out.extend_from_slice(&c.base_allocation.unwrap_or(0).to_le_bytes());
            out.push(c.no_zeroes as u8);
            out.push(c.extended_headers as u8);
            // An absent context is all zero bytes (one encoding per state).
            out.push(c.dirty_bitmap.is_some() as u8);
            let (id, since) = c.dirty_bitmap.map_or((0, 0), |d| (d.id, d.since));
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&since.to_le_bytes());
            out.extend_from_slice(&(c.leftover.len() as u32).to_le_bytes());
            out.extend_from_slice(&c.leftover);
            put_bytes16(&mut out, c.peer.as_bytes());
        }
        out
    }

    /// Decodes a message that arrived with `fds` descriptors.
    pub fn decode(buf: &[u8], fds: usize) -> Result<State, DecodeError> {
        if buf.len() > MAX_MESSAGE {
            return Err(DecodeError::TooLong {
                what: "message",
                len: buf.len(),
                max: MAX_MESSAGE,
            });
        }
        let mut r = Reader { buf, at: 0 };
        if r.take(4, "magic")? != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = r.u16("version")?;
        if !READS.contains(&version) {
            return Err(DecodeError::Version(version));
        }
        let mut fd_seen = FdUse::new(fds);
        let from_pid = r.u32("pid")?;
        let paused_at_ms = r.u64("pause start")?;
        let closed_cleanly = r.flag("closed cleanly")?;
        let etcd_lease = if version >= 2 {
            let some = r.flag("etcd lease present")?;
            let id = i64::from_le_bytes(r.array("etcd lease")?);
            if !some && id != 0 {
                return Err(DecodeError::AbsentNotZero("etcd lease"));
            }
            some.then_some(id)
        } else {
            None
        };
        let listeners = decode_listeners(&mut r, &mut fd_seen)?;
        let n = r.u32("connection count")? as usize;
        if n > MAX_CONNS {
            return Err(DecodeError::TooMany {
                what: "connections",
                count: n,
                max: MAX_CONNS,
            });
        }
        let mut conns = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            conns.push(decode_conn(&mut r, &mut fd_seen, version)?);
        }
        if r.at != buf.len() {
            return Err(DecodeError::Trailing(buf.len() - r.at));
        }
        fd_seen.all_used()?;
        Ok(State {
            from_pid,
            paused_at_ms,
            closed_cleanly,
            etcd_lease,
            listeners,
            conns,
        })
    }
}

fn decode_listeners(
    r: &mut Reader<'_>,
    fd_seen: &mut FdUse,
) -> Result<Vec<(ListenerKind, u32)>, DecodeError> {
    let n = r.u8("listener count")? as usize;
    if n > MAX_LISTENERS {
        return Err(DecodeError::TooMany {
            what: "listeners",
            count: n,
            max: MAX_LISTENERS,
        });
    }
    let mut out: Vec<(ListenerKind, u32)> = Vec::with_capacity(n);
    for _ in 0..n {
        let code = r.u8("listener kind")?;
        let kind = ListenerKind::from_code(code).ok_or(DecodeError::Kind(code))?;
        if out.iter().any(|(k, _)| *k == kind) {
            return Err(DecodeError::ListenerTwice(kind));
        }
        let fd = r.u32("listener descriptor")?;
        fd_seen.mark(fd)?;
        out.push((kind, fd));
    }
    Ok(out)
}

fn decode_conn(
    r: &mut Reader<'_>,
    fd_seen: &mut FdUse,
    version: u16,
) -> Result<ConnState, DecodeError> {
    let fd = r.u32("connection descriptor")?;
    fd_seen.mark(fd)?;
    let unix = r.flag("socket family")?;
    let export = r.text("export name", MAX_NAME)?;
    let size = r.u64("export size")?;
    let transmission_flags = r.u16("transmission flags")?;
    let structured_replies = r.flag("structured replies")?;
    let has_ctx = r.flag("base:allocation flag")?;
    let ctx = r.u32("base:allocation id")?;
    if !has_ctx && ctx != 0 {
        return Err(DecodeError::AbsentNotZero("base:allocation id"));
    }
    let no_zeroes = r.flag("no-zeroes")?;
    let extended_headers = version >= 3 && r.flag("extended headers")?;
    let dirty_bitmap = if version >= 4 {
        decode_dirty_bitmap(r)?
    } else {
        None
    };
    if extended_headers && !structured_replies {
        // Extended headers imply chunked replies; the predecessor never
        // sends one without the other.
        return Err(DecodeError::Flag {
            what: "structured replies (extended headers need them)",
            value: 0,
        });
    }
    let len = r.u32("leftover length")? as usize;
    if len > MAX_LEFTOVER {
        return Err(DecodeError::TooLong {
            what: "leftover",
            len,
            max: MAX_LEFTOVER,
        });
    }
    let leftover = r.take(len, "leftover")?.to_vec();
    let peer = r.text("peer", MAX_PEER)?;
    Ok(ConnState {
        fd,
        unix,
        export,
        size,
        transmission_flags,
        structured_replies,
        extended_headers,
        base_allocation: has_ctx.then_some(ctx),
        dirty_bitmap,
        no_zeroes,
        leftover,
        peer,
    })
}

/// A connection's dirty-bitmap context: a flag, then id and LSN (zero when
/// absent).
fn decode_dirty_bitmap(r: &mut Reader<'_>) -> Result<Option<nbd::DirtyBitmap>, DecodeError> {
    let has = r.flag("dirty-bitmap flag")?;
    let id = r.u32("dirty-bitmap id")?;
    let since = r.u64("dirty-bitmap LSN")?;
    if !has && (id != 0 || since != 0) {
        return Err(DecodeError::AbsentNotZero("dirty-bitmap context"));
    }
    Ok(has.then_some(nbd::DirtyBitmap { id, since }))
}

/// Which descriptors the message referred to.
struct FdUse {
    seen: Vec<bool>,
}

impl FdUse {
    fn new(fds: usize) -> FdUse {
        FdUse {
            seen: vec![false; fds],
        }
    }

    fn mark(&mut self, index: u32) -> Result<(), DecodeError> {
        let fds = self.seen.len();
        let slot = self
            .seen
            .get_mut(index as usize)
            .ok_or(DecodeError::FdIndex { index, fds })?;
        if *slot {
            return Err(DecodeError::FdTwice(index));
        }
        *slot = true;
        Ok(())
    }

    fn all_used(&self) -> Result<(), DecodeError> {
        let unused = self.seen.iter().filter(|s| !**s).count();
        if unused > 0 {
            return Err(DecodeError::FdUnused {
                unused,
                fds: self.seen.len(),
            });
        }
        Ok(())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let have = self.buf.len() - self.at;
        if n > have {
            return Err(DecodeError::Short {
                what,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::Flag { what, value }),
        }
    }

    fn text(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = self.u16(what)? as usize;
        if len > max {
            return Err(DecodeError::TooLong { what, len, max });
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> State {
        State {
            from_pid: 4242,
            paused_at_ms: 1_764_900_000_123,
            closed_cleanly: true,
            etcd_lease: Some(0x7a3f_0011_2233),
            listeners: vec![(ListenerKind::Nbd, 0), (ListenerKind::Admin, 1)],
            conns: vec![ConnState {
                fd: 2,
                unix: false,
                export: "vol0".into(),
                size: 1 << 30,
                transmission_flags: 0x1ff,
                structured_replies: true,
                extended_headers: false,
                base_allocation: Some(1),
                dirty_bitmap: None,
                no_zeroes: true,
                leftover: vec![0x25, 0x60, 0x95],
                peer: "127.0.0.1:5555".into(),
            }],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let s = sample();
        assert_eq!(State::decode(&s.encode(), 3), Ok(s));
    }

    /// A version-1 message (an older daemon handing over to this one) has no
    /// lease field and still decodes.
    /// `s` (one connection, no dirty bitmap) as a version-3 daemon encodes
    /// it: without the dirty-bitmap fields, counted from the end (past the
    /// peer, the leftover and its length).
    fn version_3(s: &State) -> Vec<u8> {
        let c = &s.conns[0];
        assert!(s.conns.len() == 1 && c.dirty_bitmap.is_none());
        let mut b = s.encode();
        b[4..6].copy_from_slice(&3u16.to_le_bytes());
        let at = b.len() - (2 + c.peer.len()) - c.leftover.len() - 4 - 13;
        assert!(b.drain(at..at + 13).all(|x| x == 0));
        b
    }

    /// A version-3 message has no dirty-bitmap context and still decodes;
    /// version 4 carries it, and an absent one must be zero bytes.
    #[test]
    fn dirty_bitmaps_travel_from_version_4() {
        let mut s = sample();
        assert_eq!(State::decode(&version_3(&s), 3), Ok(s.clone()));
        s.conns[0].dirty_bitmap = Some(nbd::DirtyBitmap { id: 2, since: 1234 });
        assert_eq!(State::decode(&s.encode(), 3), Ok(s.clone()));
        s.conns[0].dirty_bitmap = None;
        let mut b = s.encode();
        let c = &s.conns[0];
        let since_at = b.len() - (2 + c.peer.len()) - c.leftover.len() - 4 - 8;
        b[since_at] = 7;
        assert_eq!(
            State::decode(&b, 3),
            Err(DecodeError::AbsentNotZero("dirty-bitmap context"))
        );
    }

    #[test]
    fn a_version_1_message_decodes_without_a_lease() {
        let mut s = sample();
        s.etcd_lease = None;
        let v2 = version_3(&s);
        let mut v1 = v2.clone();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let lease_at = 4 + 2 + 4 + 8 + 1;
        v1.drain(lease_at..lease_at + 9);
        // Nor the connection's extended-headers flag (version 3): counted
        // from the end, past the peer and the leftover.
        let c = &s.conns[0];
        let flag_at = v1.len() - (2 + c.peer.len()) - c.leftover.len() - 4 - 1;
        assert_eq!(v1.remove(flag_at), 0);
        assert_eq!(State::decode(&v1, 3), Ok(s));
    }

    /// Found by the fuzzer: an absent lease with non-zero bytes decoded,
    /// and re-encoded to other bytes. It is refused: one encoding per state.
    #[test]
    fn an_absent_lease_with_bytes_is_refused() {
        let mut s = sample();
        s.etcd_lease = None;
        let mut buf = s.encode();
        let lease_at = 4 + 2 + 4 + 8 + 1;
        assert_eq!(buf[lease_at], 0);
        buf[lease_at + 1] = 0x4d;
        assert_eq!(
            State::decode(&buf, 3),
            Err(DecodeError::AbsentNotZero("etcd lease"))
        );
    }

    /// A version-2 message (from a daemon built before extended headers)
    /// has no extended-headers flag and still decodes; version 3 carries it.
    #[test]
    fn extended_headers_travel_from_version_3() {
        let mut s = sample();
        s.conns[0].extended_headers = true;
        let v3 = version_3(&s);
        assert_eq!(State::decode(&v3, 3), Ok(s.clone()));
        s.conns[0].extended_headers = false;
        let v3 = version_3(&s);
        let mut v2 = v3.clone();
        v2[4..6].copy_from_slice(&2u16.to_le_bytes());
        // Counted from the end: the flag, the leftover's length and bytes,
        // the peer's length and text.
        let flag_at = v3.len() - (2 + s.conns[0].peer.len()) - s.conns[0].leftover.len() - 4 - 1;
        assert_eq!(v2.remove(flag_at), 0);
        assert_eq!(State::decode(&v2, 3), Ok(s.clone()));
        // Extended without structured is refused.
        s.conns[0].extended_headers = true;
        s.conns[0].structured_replies = false;
        assert!(matches!(
            State::decode(&s.encode(), 3),
            Err(DecodeError::Flag { .. })
        ));
    }

    #[test]
    fn descriptors_must_match_the_references() {
        let b = sample().encode();
        assert_eq!(
            State::decode(&b, 2),
            Err(DecodeError::FdIndex { index: 2, fds: 2 })
        );
        assert_eq!(
            State::decode(&b, 4),
            Err(DecodeError::FdUnused { unused: 1, fds: 4 })
        );
        let mut s = sample();
        s.conns[0].fd = 1;
        assert_eq!(State::decode(&s.encode(), 3), Err(DecodeError::FdTwice(1)));
    }

    #[test]
    fn bad_headers_and_bounds_are_refused() {
        let mut b = sample().encode();
        b[4] = 9;
        assert_eq!(State::decode(&b, 3), Err(DecodeError::Version(9)));
        assert_eq!(State::decode(b"XXXX", 0), Err(DecodeError::Magic));
        let mut b = sample().encode();
        b.push(0);
        assert_eq!(State::decode(&b, 3), Err(DecodeError::Trailing(1)));
        let b = sample().encode();
        assert!(matches!(
            State::decode(&b[..b.len() - 1], 3),
            Err(DecodeError::Short { .. })
        ));
        let mut b = sample().encode();
        // The connection count sits after the header and two listeners.
        let at = 4 + 2 + 4 + 8 + 1 + 9 + 1 + 2 * 5;
        b[at..at + 4].copy_from_slice(&(MAX_CONNS as u32 + 1).to_le_bytes());
        assert!(matches!(
            State::decode(&b, 3),
            Err(DecodeError::TooMany {
                what: "connections",
                ..
            })
        ));
    }

    fn kind() -> impl Strategy<Value = ListenerKind> {
        prop_oneof![
            Just(ListenerKind::Nbd),
            Just(ListenerKind::NbdUnix),
            Just(ListenerKind::Admin),
            Just(ListenerKind::Replication),
            Just(ListenerKind::Metrics),
        ]
    }

    fn conn() -> impl Strategy<Value = ConnState> {
        (
            any::<bool>(),
            "[a-z0-9]{0,20}",
            any::<u64>(),
            any::<u16>(),
            any::<(bool, bool, Option<u32>, bool, Option<(u32, u64)>)>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            "[0-9.:]{0,30}",
        )
            .prop_map(
                |(unix, export, size, tf, (sr, eh, ba, nz, db), leftover, peer)| ConnState {
                    fd: 0,
                    unix,
                    export,
                    size,
                    transmission_flags: tf,
                    structured_replies: sr || eh,
                    extended_headers: eh,
                    base_allocation: ba,
                    dirty_bitmap: db.map(|(id, since)| nbd::DirtyBitmap { id, since }),
                    no_zeroes: nz,
                    leftover,
                    peer,
                },
            )
    }

    proptest! {
        #[test]
        fn any_state_round_trips(
            pid in any::<u32>(),
            at in any::<u64>(),
            clean in any::<bool>(),
            lease in any::<Option<i64>>(),
            kinds in proptest::collection::hash_set(kind().prop_map(|k| k.code()), 0..5),
            mut conns in proptest::collection::vec(conn(), 0..8),
        ) {
            let mut next = 0u32;
            let mut listeners = Vec::new();
            for code in kinds {
                listeners.push((ListenerKind::from_code(code).expect("a known code"), next));
                next += 1;
            }
            for c in &mut conns {
                c.fd = next;
                next += 1;
            }
            let s = State { from_pid: pid, paused_at_ms: at, closed_cleanly: clean, etcd_lease: lease, listeners, conns };
            let b = s.encode();
            prop_assert_eq!(State::decode(&b, next as usize), Ok(s));
            // Every strict prefix is refused, never accepted or a panic.
            for cut in 0..b.len() {
                prop_assert!(State::decode(&b[..cut], next as usize).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256), fds in 0usize..8) {
            let _ = State::decode(&b, fds);
        }
    }
}
