//! The hand-over channel: a `SOCK_SEQPACKET` Unix socket pair between a
//! daemon and its successor. Each frame is one packet (boundaries kept, so
//! descriptors arrive with the frame they were sent with) that starts with a
//! tag byte.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// Largest frame.
pub const MAX_FRAME: usize = 60 << 10;
/// Most descriptors in one frame (the kernel allows 253).
pub const MAX_FDS_PER_FRAME: usize = 64;

/// The successor is up and has parsed its configuration: `pid` (u32).
pub const HELLO: u8 = b'H';
/// A piece of the state message.
pub const STATE: u8 = b'S';
/// Descriptors (no payload).
pub const FDS: u8 = b'F';
/// End of the state: its length (u64) and the descriptor count (u32).
pub const END: u8 = b'E';
/// The successor serves: its `pid` (u32).
pub const SERVING: u8 = b'R';
/// The successor gives up: why (UTF-8).
pub const FAILED: u8 = b'X';

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
}

/// A frame received: its tag, payload and descriptors.
#[derive(Debug)]
pub struct Frame {
    /// The tag byte.
    pub tag: u8,
    /// What follows the tag.
    pub body: Vec<u8>,
    /// Descriptors sent with it (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    /// A connected pair, both ends close-on-exec: ours, and the successor's
    /// (its close-on-exec flag is cleared in the child only).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { sock: a }, b))
    }

    /// The channel on an inherited descriptor.
    pub fn from_fd(sock: OwnedFd) -> Channel {
        Channel { sock }
    }

    /// Sends one frame with `fds` attached.
    pub fn send(&self, tag: u8, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        assert!(body.len() < MAX_FRAME && fds.len() <= MAX_FDS_PER_FRAME);
        let mut frame = Vec::with_capacity(body.len() + 1);
        frame.push(tag);
        frame.extend_from_slice(body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [io::IoSlice::new(&frame)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        loop {
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits up to `limit` for a frame; `Ok(None)` when the other end
    /// closed.
    pub fn recv(&self, limit: Duration) -> io::Result<Option<Frame>> {
        if !self.wait_readable(limit)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing arrived within {} ms", limit.as_millis()),
            ));
        }
        let mut buf = vec![0u8; MAX_FRAME];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_FRAME]);
        let (n, flags, fds) = loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    for c in m.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these
                            // descriptors in this process; nothing else owns them.
                            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                        }
                    }
                    break (m.bytes, m.flags, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a hand-over frame or its descriptors were truncated",
            ));
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        let tag = buf.remove(0);
        Ok(Some(Frame {
            tag,
            body: buf,
            fds,
        }))
    }

    /// Whether a frame (or the end) arrived within `limit`.
    fn wait_readable(&self, limit: Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if left.is_zero() => return Ok(false),
                Ok(0) => continue,
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_descriptors() {
        let (a, b) = Channel::pair().expect("pair");
        let b = Channel::from_fd(b);
        let (r, w) = nix::unistd::pipe().expect("pipe");
        a.send(FDS, b"", &[r.as_fd(), w.as_fd()]).expect("send");
        a.send(HELLO, &7u32.to_le_bytes(), &[]).expect("send");
        let f = b
            .recv(Duration::from_secs(1))
            .expect("recv")
            .expect("a frame");
        assert_eq!((f.tag, f.body.len(), f.fds.len()), (FDS, 0, 2));
        nix::unistd::write(&f.fds[1], b"x").expect("write through the passed pipe");
        let mut got = [0u8; 1];
        nix::unistd::read(r.as_raw_fd(), &mut got).expect("read");
        assert_eq!(&got, b"x");
        let f = b
            .recv(Duration::from_secs(1))
            .expect("recv")
            .expect("a frame");
        assert_eq!((f.tag, f.body), (HELLO, 7u32.to_le_bytes().to_vec()));
        drop(a);
        assert!(b.recv(Duration::from_secs(1)).expect("recv").is_none());
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = Channel::pair().expect("pair");
        let b = Channel::from_fd(b);
        let e = b.recv(Duration::from_millis(50)).expect_err("times out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
