//! The replication listener: accepts primaries, reads their HELLO (under a
//! deadline, in a bounded pool of connections on probation, off the cores),
//! and hands the connection to the core of the volume it names, where the
//! session runs.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::{DropReason, Limits, Pool, Source, Ticket};

use super::wire::{self, Hello, HelloReply, Kind, ReplyStatus, FRAME_HEADER_LEN};

/// A primary's connection on its way to a volume's core.
pub struct IncomingPrimary {
    /// The socket.
    pub stream: PeerStream,
    /// Its HELLO.
    pub hello: Hello,
    /// The HELLO body bytes (the MACs cover them).
    pub hello_body: Vec<u8>,
    /// Peer address, for logs.
    pub peer: String,
}

/// A primary's socket: TCP, or the clear-text end of the relay of its
/// mutual-TLS session (`--replication-tls`).
pub enum PeerStream {
    /// Clear text.
    Tcp(TcpStream),
    /// Inside TLS.
    Tls(UnixStream),
}

impl PeerStream {
    /// The socket on a core's ring.
    pub fn into_socket(self) -> crate::sockio::Socket {
        use crate::sockio::Socket;
        match self {
            PeerStream::Tcp(s) => Socket::Tcp(tokio_uring::net::TcpStream::from_std(s)),
            PeerStream::Tls(s) => Socket::Unix(tokio_uring::net::UnixStream::from_std(s)),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => s.write(buf),
            PeerStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn refuse_unknown(s: &mut PeerStream, volume: &str, node: &str) {
    let r = HelloReply {
        version: wire::VERSION,
        status: ReplyStatus::UnknownVolume,
        message: format!("node {node} has no volume '{volume}'"),
        node: node.to_string(),
        uuid: [0; 16],
        epoch: 0,
        durable: 0,
        flags: wire::ReplyFlags::default(),
        nonce: [0; wire::NONCE_LEN],
        mac: [0; wire::MAC_LEN],
    };
    let _ = s.write_all(&wire::frame(Kind::HelloReply, &r.encode()));
}

/// Reads a HELLO on the acceptor's runtime: bounded by the frame's own
/// limit on its length.
async fn read_hello_async<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(Hello, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut h)
        .await
        .map_err(|e| format!("reading HELLO: {e}"))?;
    let fh = wire::decode_frame_header(&h).map_err(|e| e.to_string())?;
    if fh.kind != Kind::Hello {
        return Err(format!("expected HELLO, got {:?}", fh.kind));
    }
    let mut body = vec![0u8; fh.len as usize];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("reading HELLO: {e}"))?;
    let hello = Hello::decode(&body).map_err(|e| e.to_string())?;
    Ok((hello, body))
}

/// Blocking mode for the core that takes `s` over.
fn blocking_std(s: tokio::net::TcpStream) -> Result<TcpStream, String> {
    s.into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
        .map_err(|e| format!("cannot hand a replication socket on: {e}"))
}

/// The HELLO, read in clear text or, with `tls`, after a mutual-TLS
/// handshake: a primary without a certificate the cluster CA signed (or
/// with an expired or revoked one) is refused here, before any frame, with
/// a log line and a `peer-auth-failed` event.
async fn hello_in(
    mut s: tokio::net::TcpStream,
    peer: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(PeerStream, Hello, Vec<u8>), String> {
    let Some(config) = tls else {
        let (hello, body) = read_hello_async(&mut s).await?;
        return Ok((PeerStream::Tcp(blocking_std(s)?), hello, body));
    };
    let mut t = match tokio_rustls::TlsAcceptor::from(config).accept(s).await {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("TLS handshake: {e}");
            crate::events::emit(crate::events::EventKind::PeerAuthFailed {
                addr: peer.to_string(),
                peer: None,
                reason: reason.clone(),
            });
            return Err(reason);
        }
    };
    let (hello, body) = read_hello_async(&mut t).await?;
    let (s, conn) = t.into_inner();
    let plain = crate::tls::relay::spawn(rustls::Connection::Server(conn), blocking_std(s)?, peer)
        .map_err(|e| format!("cannot start the TLS relay: {e}"))?;
    Ok((PeerStream::Tls(plain), hello, body))
}

/// Waits for one connection's HELLO in the pool (deadline, eviction), then
/// passes it to the routing thread.
async fn probation(
    s: tokio::net::TcpStream,
    peer: String,
    ticket: Ticket,
    to_route: std::sync::mpsc::Sender<IncomingPrimary>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let deadline = ticket.pool().limits().deadline;
    let r = tokio::select! {
        r = tokio::time::timeout(deadline, hello_in(s, &peer, tls)) => r,
        () = ticket.evicted() => return,
    };
    let (stream, hello, hello_body) = match r {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return tracing::warn!(%peer, "replication connection refused: {e}"),
        Err(_) => return ticket.pool().report(&peer, DropReason::Deadline),
    };
    drop(ticket);
    let _ = to_route.send(IncomingPrimary {
        stream,
        hello,
        hello_body,
        peer,
    });
}

/// Accepts until `stop` is set, each connection a task on probation.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    limits: Limits,
    to_route: std::sync::mpsc::Sender<IncomingPrimary>,
    stop: &std::sync::atomic::AtomicBool,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let pool = Pool::new("replication", limits);
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    let ticket = pool.admit(Source::Ip(addr.ip()), addr.to_string());
                    tokio::task::spawn_local(probation(s, addr.to_string(), ticket, to_route.clone(), tls.clone()));
                }
                Err(e) => {
                    tracing::warn!("replication accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Starts the listener: one thread runs a single-threaded runtime where
/// every connection waits for its HELLO as a task in a bounded
/// [`Pool`] (a flood of connections that never authenticate cannot delay
/// the primary's), and one thread hands each primary to its volume's core
/// with `route`, or refuses it when this node has no such volume. It ends
/// once `stop` is set, leaving the listener open (a hand-over passes it on).
pub fn spawn(
    listener: TcpListener,
    limits: Limits,
    route: impl Fn(IncomingPrimary) -> Result<(), Box<IncomingPrimary>> + Send + 'static,
    node: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let (tx, rx) = std::sync::mpsc::channel::<IncomingPrimary>();
    std::thread::Builder::new()
        .name("repl-route".into())
        .spawn(move || {
            // Ends when the accept thread (the only sender) is gone.
            for inc in rx {
                if let Err(mut inc) = route(inc) {
                    tracing::warn!(peer = %inc.peer, "primary {} asked for unknown volume '{}'", inc.hello.node, inc.hello.volume);
                    refuse_unknown(&mut inc.stream, &inc.hello.volume, &node);
                }
            }
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("repl-accept".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, limits, tx, &stop, tls).await,
                    Err(e) => tracing::error!("cannot accept on the replication port: {e}"),
                }
            });
        })
}
