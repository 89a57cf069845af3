//! The primary's PINGs on a replication connection.
//!
//! A replica ends a connection that stays silent for its heartbeat timeout,
//! so the primary's send loop puts something on the wire at least every
//! third of its own: records, resync frames, barriers, or a PING when it
//! has nothing else. Liveness must not depend on which await the loop
//! happens to be in: while it waits for something that does not write to
//! the socket (a resync region's read, the journal's durability before a
//! region goes out, a record read back from the journal for catch-up), it
//! waits through [`Keepalive::during`], which pings whenever one falls due.
//! Before, the loop pinged only when idle, and one slow region read
//! (seconds, on a loaded disk or a starved buffer pool) ended the session
//! and the resync's unreported work with it.

use std::future::Future;
use std::time::{Duration, Instant};

use super::frames::{self, LinkError};
use super::wire::Kind;
use crate::sockio::Socket;

/// How long until a PING is due, `since_send` after the last bytes went
/// out, with one due `every` at the latest; zero when one is due now.
pub fn ping_due_in(since_send: Duration, every: Duration) -> Duration {
    every.saturating_sub(since_send)
}

/// Microseconds since the epoch: a PING's body, which its PONG echoes for
/// the round-trip time.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// When the connection last carried something, and how often it must.
pub struct Keepalive {
    every: Duration,
    last_send: Instant,
}

impl Keepalive {
    /// Pings at least `every` (a third of the heartbeat timeout).
    pub fn new(every: Duration) -> Keepalive {
        assert!(!every.is_zero(), "a keepalive needs a period");
        Keepalive {
            every,
            last_send: Instant::now(),
        }
    }

    /// Something went out on the connection just now.
    pub fn sent(&mut self) {
        self.last_send = Instant::now();
    }

    /// How long until a PING is due (zero: now).
    pub fn due_in(&self) -> Duration {
        ping_due_in(self.last_send.elapsed(), self.every)
    }

    /// Sends a PING now.
    pub async fn ping(&mut self, sock: &Socket) -> Result<(), LinkError> {
        frames::send(sock, Kind::Ping, &now_us().to_le_bytes()).await?;
        self.sent();
        Ok(())
    }

    /// Runs `work` to its end, sending a PING whenever one falls due
    /// meanwhile. `work` must not write to `sock` (frames would interleave).
    pub async fn during<F: Future>(
        &mut self,
        sock: &Socket,
        work: F,
    ) -> Result<F::Output, LinkError> {
        tokio::pin!(work);
        loop {
            let due = self.due_in();
            tokio::select! {
                biased;
                out = &mut work => return Ok(out),
                _ = tokio::time::sleep(due) => self.ping(sock).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::wire::{self, FRAME_HEADER_LEN};
    use std::io::Read;

    #[test]
    fn a_ping_falls_due_a_period_after_the_last_send() {
        let ms = Duration::from_millis;
        // (since the last send, period, due in)
        let table = [
            (ms(0), ms(600), ms(600)),
            (ms(100), ms(600), ms(500)),
            (ms(599), ms(600), ms(1)),
            (ms(600), ms(600), ms(0)),
            // Long silent (a wait that outlasted it): due now, not later.
            (ms(7000), ms(600), ms(0)),
        ];
        for (since, every, want) in table {
            assert_eq!(ping_due_in(since, every), want, "{since:?} {every:?}");
        }
    }

    /// Reads frames from `s` until it closes; returns their kinds.
    fn frame_kinds(mut s: std::os::unix::net::UnixStream) -> Vec<Kind> {
        let mut kinds = Vec::new();
        let mut h = [0u8; FRAME_HEADER_LEN];
        while s.read_exact(&mut h).is_ok() {
            let Ok(fh) = wire::decode_frame_header(&h) else {
                break;
            };
            let mut body = vec![0u8; fh.len as usize];
            if s.read_exact(&mut body).is_err() {
                break;
            }
            kinds.push(fh.kind);
        }
        kinds
    }

    /// A wait of 3.5 periods in [`Keepalive::during`] sends a PING each
    /// period (3; 2 to 4 on a loaded machine's timers): the replica hears
    /// the primary throughout. A short one right after sends none.
    #[test]
    fn pings_go_out_while_a_long_wait_is_pending() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let reader = std::thread::spawn(move || frame_kinds(a));
        tokio_uring::start(async {
            let sock = Socket::Unix(tokio_uring::net::UnixStream::from_std(b));
            let every = Duration::from_millis(100);
            let mut alive = Keepalive::new(every);
            let out = alive
                .during(&sock, async {
                    tokio::time::sleep(every * 7 / 2).await;
                    7
                })
                .await
                .expect("pings sent");
            assert_eq!(out, 7, "the work's output comes back");
            let quick = alive.during(&sock, async { 8 }).await.expect("no ping");
            assert_eq!(quick, 8);
            sock.shutdown();
        });
        let kinds = reader.join().expect("reader thread");
        assert!(
            (2..=4).contains(&kinds.len()) && kinds.iter().all(|k| *k == Kind::Ping),
            "want a PING per period waited: {kinds:?}"
        );
    }
}
