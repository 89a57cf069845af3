//! Reading replication frames with as few receives as the stream allows.
//!
//! A record is a frame header, a record header and a payload. Read one
//! receive each, that is three trips into the kernel (and three wake-ups)
//! per replicated write. The reader instead receives a payload and, in the
//! same `readv`, whatever has arrived of the next frame's headers, keeping
//! those bytes for the next call: one receive per record while records
//! stream. Payloads still land straight in pool memory; only header bytes
//! that arrived early are kept here (and, after a control frame, at most
//! [`SPILL`] bytes of the next payload are copied out of this buffer).
//! Bytes that have already arrived (records stream in batches) are received
//! directly, not through the ring (`crate::sockio::MAX_BYPASS`): a whole
//! batch of records is then taken in one scheduler round.
//!
//! A stream that carries no payloads (the ACKs a primary reads) is read
//! greedily: every receive takes as much as has arrived, up to [`GREEDY`].

use std::time::Duration;

use super::frames::LinkError;
use super::wire::{self, FrameHeader, FRAME_HEADER_LEN, RECORD_HEADER_LEN};
use crate::buffer::{BufPool, Payload};
use crate::sockio::{read_exact, readv_payload_and_tail, recv_direct, Bypass, ReadFail, Socket};
use tokio_uring::buf::BoundedBuf;

/// Bytes read after a payload, in the same receive: a record's two headers.
pub const SPILL: usize = FRAME_HEADER_LEN + RECORD_HEADER_LEN;

/// Most bytes one greedy receive takes.
pub const GREEDY: usize = 4096;

/// Frames from one socket, with read-ahead.
pub struct FrameReader<'a> {
    sock: &'a Socket,
    /// The socket as a file, for `readv` (tokio-uring has no socket readv).
    file: tokio_uring::fs::File,
    /// Bytes received but not yet consumed: `ahead[start..]`.
    ahead: Vec<u8>,
    start: usize,
    /// Receive as much as has arrived (no payloads on this stream).
    greedy: bool,
    /// Receives served straight from the socket (`sockio::MAX_BYPASS`).
    bypass: Bypass,
}

impl<'a> FrameReader<'a> {
    /// A reader of `sock`. `greedy` only for streams without payloads.
    pub fn new(sock: &'a Socket, greedy: bool) -> Result<FrameReader<'a>, LinkError> {
        Ok(FrameReader {
            sock,
            file: sock.dup_as_file()?,
            ahead: Vec::with_capacity(GREEDY.max(SPILL)),
            start: 0,
            greedy,
            bypass: Bypass::default(),
        })
    }

    fn available(&self) -> usize {
        self.ahead.len() - self.start
    }

    /// Takes `n` buffered bytes (the caller made sure they are there).
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(n <= self.available(), "taking bytes not yet received");
        let s = self.start;
        self.start += n;
        &self.ahead[s..s + n]
    }

    /// Receives until at least `n` bytes are buffered (n ≤ the buffer's
    /// capacity). Not greedy: asks for exactly the missing bytes, so a
    /// payload behind them is never swallowed into this buffer.
    async fn need(&mut self, n: usize, what: &'static str) -> Result<(), ReadFail> {
        assert!(
            n <= self.ahead.capacity(),
            "{what} larger than the read-ahead buffer"
        );
        while self.available() < n {
            if self.start > 0 {
                self.ahead.drain(..self.start);
                self.start = 0;
            }
            let len = self.ahead.len();
            let end = if self.greedy {
                self.ahead.capacity()
            } else {
                n
            };
            let res = match self.try_recv_direct(len, end) {
                Some(res) => res,
                None => {
                    let buf = std::mem::take(&mut self.ahead);
                    let (res, slice) = self.sock.read(buf.slice(len..end)).await;
                    self.ahead = slice.into_inner();
                    res
                }
            };
            match res {
                Ok(0) if len == 0 => return Err(ReadFail::Eof),
                Ok(0) => {
                    return Err(ReadFail::Truncated {
                        what,
                        got: len,
                        want: n,
                    })
                }
                Ok(_) => {}
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
        Ok(())
    }

    /// Receives into `ahead[len..end]` straight from the socket, if bytes
    /// have arrived and the bypass allows (never on a greedy stream: it
    /// took everything that had arrived, so a direct try would mostly find
    /// nothing). `None`: receive through the ring.
    fn try_recv_direct(&mut self, len: usize, end: usize) -> Option<std::io::Result<usize>> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        if self.greedy {
            return None;
        }
        self.ahead.resize(end, 0);
        // SAFETY: `self.file` owns the descriptor and outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.file.as_raw_fd()) };
        let res = recv_direct(fd, &mut self.ahead[len..end], &self.bypass);
        let got = match &res {
            Some(Ok(n)) => *n,
            _ => 0,
        };
        self.ahead.truncate(len + got);
        res
    }

    /// The next frame header, within `limit`.
    pub async fn header(&mut self, limit: Duration) -> Result<FrameHeader, LinkError> {
        tokio::time::timeout(limit, self.need(FRAME_HEADER_LEN, "frame header"))
            .await
            .map_err(|_| LinkError::Timeout(limit))??;
        let mut a = [0u8; FRAME_HEADER_LEN];
        a.copy_from_slice(self.take(FRAME_HEADER_LEN));
        Ok(wire::decode_frame_header(&a)?)
    }

    /// Fills `out` (a fixed header, at most the read-ahead capacity) within
    /// `limit`, without allocating.
    pub async fn exact(&mut self, out: &mut [u8], limit: Duration) -> Result<(), LinkError> {
        tokio::time::timeout(limit, self.need(out.len(), "fixed header"))
            .await
            .map_err(|_| LinkError::Timeout(limit))??;
        out.copy_from_slice(self.take(out.len()));
        Ok(())
    }

    /// A control body of `len` bytes, within `limit`.
    pub async fn body(&mut self, len: usize, limit: Duration) -> Result<Vec<u8>, LinkError> {
        let have = self.available().min(len);
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(self.take(have));
        if have == len {
            return Ok(out);
        }
        out.resize(len, 0);
        let (res, out) = tokio::time::timeout(
            limit,
            read_exact(self.sock, out, have, len, "message body", false),
        )
        .await
        .map_err(|_| LinkError::Timeout(limit))?;
        res?;
        Ok(out)
    }

    /// A payload of `len` bytes into pool memory, each 1 MiB chunk within
    /// `limit` (a 32 MiB record on a slow link is not one deadline); the
    /// receive of its last chunk also takes what has arrived of the next
    /// frame's headers.
    pub async fn payload(
        &mut self,
        pool: &BufPool,
        len: usize,
        what: &'static str,
        limit: Duration,
    ) -> Result<Payload, LinkError> {
        let fixed = pool.registered();
        let mut p = pool.payload(len).await;
        let chunks = p.take_chunks();
        let last = chunks.len().saturating_sub(1);
        let mut filled = Vec::with_capacity(chunks.len());
        for (i, mut c) in chunks.into_iter().enumerate() {
            let want = p.chunk_len(i);
            let read = async {
                // Bytes of this payload that came in with the last headers
                // (only after a control frame: at most SPILL of them).
                let early = self.available().min(want);
                c[..early].copy_from_slice(self.take(early));
                // (The readv below cannot start mid-buffer: only a chunk
                // with no early bytes takes the next headers along.)
                let c = if i == last && early == 0 {
                    self.last_chunk(c, want, what, fixed).await?
                } else {
                    let (res, c) = read_exact(self.sock, c, early, want, what, fixed).await;
                    res.map_err(|e| match e {
                        ReadFail::Eof => ReadFail::Truncated {
                            what,
                            got: early,
                            want,
                        },
                        e => e,
                    })?;
                    c
                };
                Ok::<_, LinkError>(c)
            };
            let c = tokio::time::timeout(limit, read)
                .await
                .map_err(|_| LinkError::Timeout(limit))??;
            filled.push(c);
        }
        p.put_chunks(filled);
        Ok(p)
    }

    /// Fills `chunk[..want]` and, in the same `readv`, up to [`SPILL`]
    /// bytes of what follows (kept for the next call).
    async fn last_chunk(
        &mut self,
        chunk: crate::buffer::PoolBuf,
        want: usize,
        what: &'static str,
        fixed: bool,
    ) -> Result<crate::buffer::PoolBuf, LinkError> {
        debug_assert_eq!(self.available(), 0, "read-ahead left over before a payload");
        let (res, chunk, spill) =
            readv_payload_and_tail(&self.file, chunk, want, vec![0u8; SPILL], &self.bypass).await;
        let n = match res {
            Ok(0) => return Err(ReadFail::Truncated { what, got: 0, want }.into()),
            Ok(n) => n,
            Err(e) => return Err(ReadFail::Io(e).into()),
        };
        if n >= want {
            let extra = n - want;
            self.ahead.clear();
            self.start = 0;
            self.ahead.extend_from_slice(&spill[..extra]);
            return Ok(chunk);
        }
        let (res, chunk) = read_exact(self.sock, chunk, n, want, what, fixed).await;
        res.map_err(|e| match e {
            ReadFail::Eof => ReadFail::Truncated { what, got: n, want },
            e => e,
        })?;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{PoolConfig, MAX_CHUNK};
    use crate::replication::wire::Kind;
    use std::io::Write;

    /// Deterministic filler bytes.
    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Records (with payloads of one and of several chunks) and control
    /// frames, interleaved, sent in odd-sized pieces with pauses, so the
    /// reader meets every case: headers split across receives, headers
    /// read ahead with a payload, payload bytes read ahead behind a control
    /// frame. Everything must come out exactly as sent, then a clean end.
    #[test]
    fn frames_come_out_as_sent_however_the_stream_is_cut() {
        // (kind, fixed header or control body, payload length)
        let plan: Vec<(Kind, Vec<u8>, usize)> = vec![
            (Kind::Record, bytes(1, RECORD_HEADER_LEN), 4096),
            (Kind::Record, bytes(2, RECORD_HEADER_LEN), 4096),
            (Kind::Ping, bytes(3, 8), 0),
            (Kind::Record, bytes(4, RECORD_HEADER_LEN), 100),
            (Kind::Record, bytes(5, RECORD_HEADER_LEN), MAX_CHUNK + 5000),
            (Kind::Ping, bytes(6, 8), 0),
            (Kind::Ping, bytes(7, 8), 0),
            (Kind::Record, bytes(8, RECORD_HEADER_LEN), 8192),
            (Kind::Record, bytes(9, RECORD_HEADER_LEN), 0),
            (Kind::Record, bytes(10, RECORD_HEADER_LEN), 12288),
            // Its two headers are 8 bytes shorter than a record's: the
            // last payload's receive takes 8 bytes of this payload along.
            (Kind::ResyncData, bytes(11, wire::RESYNC_HEADER_LEN), 4096),
            (Kind::Record, bytes(12, RECORD_HEADER_LEN), 4096),
        ];
        let mut stream = Vec::new();
        for (i, (kind, head, plen)) in plan.iter().enumerate() {
            let len = (head.len() + plen) as u32;
            stream.extend_from_slice(&wire::frame_header(*kind, len));
            stream.extend_from_slice(head);
            stream.extend(bytes(100 + i as u8, *plen));
        }
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let writer = std::thread::spawn(move || {
            let mut a = a;
            let cuts = [1usize, 13, 70, 4000, 3, 68, 9000, 1 << 20, 5, 777];
            let mut pos = 0;
            let mut k = 0;
            while pos < stream.len() {
                let n = cuts[k % cuts.len()].min(stream.len() - pos);
                a.write_all(&stream[pos..pos + n]).expect("write");
                pos += n;
                k += 1;
                if k % 3 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        tokio_uring::start(async {
            let pool = crate::buffer::BufPool::new(&PoolConfig::from_budget(64 << 20));
            let sock = Socket::Unix(tokio_uring::net::UnixStream::from_std(b));
            let limit = Duration::from_secs(10);
            let mut rd = FrameReader::new(&sock, false).expect("reader");
            for (i, (kind, head, plen)) in plan.iter().enumerate() {
                let h = rd.header(limit).await.expect("header");
                assert_eq!(h.kind, *kind, "frame {i}");
                assert_eq!(h.len as usize, head.len() + plen, "frame {i}");
                let got = if *kind == Kind::Record {
                    let mut a = [0u8; RECORD_HEADER_LEN];
                    rd.exact(&mut a, limit).await.expect("record header");
                    a.to_vec()
                } else {
                    rd.body(head.len(), limit).await.expect("body")
                };
                assert_eq!(&got, head, "frame {i}");
                if *plen > 0 {
                    let p = rd
                        .payload(&pool, *plen, "payload", limit)
                        .await
                        .expect("payload");
                    let mut got = vec![0u8; *plen];
                    p.copy_out(0, &mut got);
                    assert!(got == bytes(100 + i as u8, *plen), "payload of frame {i}");
                }
            }
            match rd.header(limit).await {
                Err(LinkError::Read(ReadFail::Eof)) => {}
                other => panic!("expected a clean end, got {other:?}"),
            }
        });
        writer.join().expect("writer thread");
    }

    /// With the whole stream already in the socket, records are received
    /// straight from it, but never more than `MAX_BYPASS` receives in a
    /// row: then one goes through the ring, so the core's thread parks and
    /// submits what other tasks queued.
    #[test]
    fn arrived_records_skip_the_ring_but_not_for_long() {
        use crate::sockio::MAX_BYPASS;
        let records = 100usize;
        let plen = 512usize;
        let mut stream = Vec::new();
        for i in 0..records {
            let head = bytes(i as u8, RECORD_HEADER_LEN);
            stream.extend_from_slice(&wire::frame_header(
                Kind::Record,
                (head.len() + plen) as u32,
            ));
            stream.extend_from_slice(&head);
            stream.extend(bytes(200u8.wrapping_add(i as u8), plen));
        }
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        // Everything arrives before the first receive (~60 KiB: within
        // the socket buffer).
        a.write_all(&stream).expect("write");
        drop(a);
        tokio_uring::start(async {
            let pool = crate::buffer::BufPool::new(&PoolConfig::from_budget(64 << 20));
            let sock = Socket::Unix(tokio_uring::net::UnixStream::from_std(b));
            let limit = Duration::from_secs(10);
            let mut rd = FrameReader::new(&sock, false).expect("reader");
            for i in 0..records {
                let h = rd.header(limit).await.expect("header");
                assert_eq!(h.kind, Kind::Record, "frame {i}");
                let mut a = [0u8; RECORD_HEADER_LEN];
                rd.exact(&mut a, limit).await.expect("record header");
                assert_eq!(&a[..], &bytes(i as u8, RECORD_HEADER_LEN)[..], "frame {i}");
                let p = rd
                    .payload(&pool, plen, "payload", limit)
                    .await
                    .expect("payload");
                let mut got = vec![0u8; plen];
                p.copy_out(0, &mut got);
                assert!(
                    got == bytes(200u8.wrapping_add(i as u8), plen),
                    "payload {i}"
                );
            }
            let (direct, ring) = (rd.bypass.direct.get(), rd.bypass.ring.get());
            let total = direct + ring;
            // One receive for the first headers, then one per record
            // (payload and the next headers together), and the end.
            assert!(
                total >= records as u64,
                "{direct} direct, {ring} through the ring"
            );
            let cycles = total / (u64::from(MAX_BYPASS) + 1);
            assert!(
                ring >= cycles && ring <= cycles + 1,
                "{direct} direct, {ring} through the ring: one in every {} expected",
                MAX_BYPASS + 1
            );
        });
    }
}
