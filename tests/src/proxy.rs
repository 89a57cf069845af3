//! A TCP proxy that delays every byte by a fixed time in each direction:
//! what a cross-site link looks like to the replication stream (this
//! kernel has no `tc netem`). Each direction of each connection has a
//! reader thread that stamps what it reads with its due time and a writer
//! thread that sends it once due, so order is kept and the delay adds to
//! (rather than limits) the throughput, like a long pipe.
//!
//! Bounded: at most [`MAX_CHUNKS`] chunks of at most 64 KiB wait per
//! direction (a slow receiver slows the sender, as TCP would), and the
//! proxy stops accepting when dropped. [`DelayProxy::hold_forward`] stalls
//! the client's direction (a link that stops moving without closing). It only ever listens on and
//! connects to the addresses it is given (loopback in the tests).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most chunks in flight per direction.
pub const MAX_CHUNKS: usize = 1024;
const CHUNK: usize = 64 << 10;

/// A running proxy; stops accepting (and lets its threads end) when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Set by [`DelayProxy::cut`]: nothing more is delivered.
    cut: Arc<AtomicBool>,
    /// Set by [`DelayProxy::hold_forward`]: nothing more is read from clients.
    hold: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0: any free port) and relays each
    /// connection to `target`, `delay` late in each direction.
    pub fn start(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<DelayProxy> {
        DelayProxy::start_corrupting(listen, target, delay, None)
    }

    /// Like [`DelayProxy::start`], and on the first connection flips every
    /// bit of the byte at offset `flip_at` of what the client sends (a
    /// corrupted link, to prove the receiver's checksums catch it).
    pub fn start_corrupting(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
        flip_at: Option<u64>,
    ) -> std::io::Result<DelayProxy> {
        let l = TcpListener::bind(listen)?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let links = Links {
            cut: cut.clone(),
            hold: hold.clone(),
        };
        let s = stop.clone();
        std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || accept_loop(l, target, delay, flip_at, &s, &links))?;
        Ok(DelayProxy {
            addr,
            stop,
            cut,
            hold,
        })
    }

    /// With `on`, stops reading what clients send (every connection, new
    /// ones too) until called again with false: the target hears nothing
    /// more, the client's sends block once the socket buffers are full,
    /// and the other direction goes on. A stalled link, not a closed one.
    pub fn hold_forward(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// The link dies at once, as with the machine on one end: what is in
    /// flight (sent, not yet delivered) is lost, both directions close and
    /// no new connection is relayed.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the process is killed (for the binary).
    pub fn run_forever(self) -> ! {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A held direction must not keep its thread forever.
        self.hold.store(false, Ordering::SeqCst);
    }
}

/// The switches every relayed connection obeys.
#[derive(Clone)]
struct Links {
    /// Nothing more is delivered.
    cut: Arc<AtomicBool>,
    /// Nothing more is read from the client while set.
    hold: Arc<AtomicBool>,
}

fn accept_loop(
    l: TcpListener,
    target: SocketAddr,
    delay: Duration,
    mut flip_at: Option<u64>,
    stop: &AtomicBool,
    links: &Links,
) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(server) => {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        relay(client, server, delay, flip_at.take(), links);
                    }
                    Err(_) => {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Relays both directions of one connection (only the client's, `a` to
/// `b`, obeys the hold).
fn relay(a: TcpStream, b: TcpStream, delay: Duration, flip_at: Option<u64>, links: &Links) {
    let forward = Some(links.hold.clone());
    for (from, to, flip, hold) in [(&a, &b, flip_at, forward), (&b, &a, None, None)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(MAX_CHUNKS);
        let side = ReadSide { delay, flip, hold };
        let _ = std::thread::Builder::new()
            .name("proxy-read".into())
            .spawn(move || read_side(from, tx, side));
        let cut = links.cut.clone();
        let _ = std::thread::Builder::new()
            .name("proxy-write".into())
            .spawn(move || write_side(to, rx, &cut));
    }
}

/// How one direction reads.
struct ReadSide {
    delay: Duration,
    /// Flip the byte at this offset.
    flip: Option<u64>,
    /// Forward nothing (and read no more) while set.
    hold: Option<Arc<AtomicBool>>,
}

fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, side: ReadSide) {
    let ReadSide {
        delay,
        flip: flip_at,
        hold,
    } = side;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Held (by a test, for a bounded time; dropping the proxy
                // releases it): what was just read waits, and nothing more
                // is read, so the client's sends block.
                while hold.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if let Some(at) = flip_at.filter(|&at| at >= pos && at < pos + n as u64) {
                    buf[(at - pos) as usize] ^= 0xff;
                }
                pos += n as u64;
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    // Dropping `tx` tells the writer to pass the end on once it is due.
}

fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>, cut: &AtomicBool) {
    while let Ok((due, bytes)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if cut.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP server on loopback that echoes one connection back; its address.
    fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut b = [0u8; 1000];
            loop {
                let n = s.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&b[..n]).unwrap();
            }
        });
        target
    }

    #[test]
    fn relays_in_order_and_late() {
        let target = echo_server();
        let p = DelayProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            Duration::from_millis(20),
        )
        .unwrap();
        let mut c = TcpStream::connect(p.addr()).unwrap();
        let started = Instant::now();
        let msg: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        c.write_all(&msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "a round trip through the proxy took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_held_forward_direction_delivers_nothing_until_released() {
        let target = echo_server();
        let p = DelayProxy::start("127.0.0.1:0".parse().unwrap(), target, Duration::ZERO).unwrap();
        let mut c = TcpStream::connect(p.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.write_all(b"before").unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"before");
        p.hold_forward(true);
        c.write_all(b"held").unwrap();
        let mut one = [0u8; 1];
        let err = c.read_exact(&mut one).expect_err("a held link delivered");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        p.hold_forward(false);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"held", "released: delivered in order");
    }
}
