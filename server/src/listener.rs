//! Accepting clients and negotiating the NBD handshake.
//!
//! One thread ("nbd-accept") runs a single-threaded tokio runtime: it
//! accepts on the TCP and Unix listeners and negotiates every handshake as a
//! task of its own, so the thread count does not grow with the connections.
//! Connections still negotiating sit in an [`admission::Pool`]: a deadline
//! and a byte bound for the whole negotiation, a per-source share, and a full
//! pool drops its most stalled member for a newcomer. Once the client has
//! chosen an export, the socket moves to that volume's core, where all its
//! requests are served (bounded by `--max-connections`).
//!
//! The handshake's I/O goes through [`NegotiationStream`], the one seam a
//! stream upgraded mid-negotiation (STARTTLS) plugs into: [`negotiate`]
//! only needs `AsyncRead + AsyncWrite`.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nbd::{ExportCatalog, ExportInfo, Handshake, Negotiated, Status, TlsPolicy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::admission::{self, DropReason, Source, Ticket};
use crate::control::{ClientStream, ConnGuard, NewConn};

/// The exports this node serves.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// In configuration order; the first is the default export.
    pub exports: Vec<ExportInfo>,
    /// The current size of each export, in the same order (a resize
    /// changes it; new connections are told the current size).
    pub sizes: Vec<crate::units::SharedSize>,
    /// Volumes this node holds as a replica: not served, and a client
    /// asking for one is told so (and to ask the primary).
    pub replicas: Vec<String>,
    /// Snapshot exports (`VOLUME@NAME`, read-only), on a primary and on a
    /// replica alike.
    pub snapshots: crate::control::SnapshotExports,
}

impl Catalog {
    /// The snapshot exports now (a poisoned lock still holds a valid list).
    fn snapshot_exports(&self) -> std::sync::MutexGuard<'_, Vec<ExportInfo>> {
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let i = if name.is_empty() {
            0
        } else {
            match self.exports.iter().position(|e| e.name == name) {
                Some(i) => i,
                None => {
                    return self
                        .snapshot_exports()
                        .iter()
                        .find(|e| e.name == name)
                        .cloned()
                }
            }
        };
        let mut e = self.exports.get(i)?.clone();
        if let Some(s) = self.sizes.get(i) {
            e.size = s.get();
        }
        Some(e)
    }

    fn list(&self) -> Vec<(String, String)> {
        let snapshots = self.snapshot_exports();
        self.exports
            .iter()
            .chain(snapshots.iter())
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    fn refusal(&self, name: &str) -> Option<String> {
        self.replicas.iter().any(|r| r == name).then(|| {
            format!(
                "this node is a replica of volume '{name}' and serves no NBD clients; connect to its primary (`mirrorblk primary` names it)"
            )
        })
    }
}

/// Everything an acceptor needs.
pub struct AcceptContext {
    /// Exports.
    pub catalog: Catalog,
    /// Export name → the sender of its core.
    pub routes: crate::control::Routes,
    /// Live serving connections.
    pub conns: Arc<AtomicUsize>,
    /// Limit on serving connections.
    pub max_connections: usize,
    /// The bounds on connections still negotiating.
    pub handshake: admission::Limits,
    /// Handshakes under way (a hand-over waits for them to finish).
    pub handshaking: Arc<AtomicUsize>,
    /// Set to stop accepting (a hand-over passes the listeners on).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// TLS for TCP clients (`--tls`); the Unix socket stays clear text.
    pub tls: Option<NbdTls>,
}

/// How TCP clients get TLS.
#[derive(Clone)]
pub struct NbdTls {
    /// `on` or `require`.
    pub policy: TlsPolicy,
    /// The server configuration (`--tls-certificates`, `--tls-verify-peer`).
    pub config: Arc<rustls::ServerConfig>,
}

/// Counts a handshake under way while it lives.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn new(n: &Arc<AtomicUsize>) -> Handshaking {
        n.fetch_add(1, Ordering::AcqRel);
        Handshaking(n.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a handshake did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    /// Socket error.
    #[error("socket error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("handshake protocol violation: {0}")]
    Protocol(#[from] nbd::ProtocolError),
    /// The client sent more than a negotiation may.
    #[error("sent more than {0} bytes without finishing the handshake")]
    TooManyBytes(usize),
}

/// A client socket during negotiation, on the acceptor's runtime.
pub enum NegotiationStream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix domain.
    Unix(tokio::net::UnixStream),
    /// Inside TLS, after `NBD_OPT_STARTTLS`.
    Tls(Box<tokio_rustls::server::TlsStream<NegotiationStream>>),
    /// A failed upgrade left nothing to talk over.
    Closed,
}

impl NegotiationStream {
    /// Runs the TLS handshake on the clear socket (STARTTLS was answered).
    pub async fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let clear = std::mem::replace(self, NegotiationStream::Closed);
        if matches!(clear, NegotiationStream::Tls(_) | NegotiationStream::Closed) {
            return Err(io::Error::other(
                "STARTTLS on a stream that is not clear text",
            ));
        }
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(clear)
            .await?;
        *self = NegotiationStream::Tls(Box::new(tls));
        Ok(())
    }

    /// The blocking socket the core takes over, and whether it is the
    /// clear-text end of a TLS relay (see [`crate::tls`]).
    pub fn into_served(self, peer: &str) -> io::Result<(ClientStream, bool)> {
        let NegotiationStream::Tls(tls) = self else {
            return self.into_client_stream().map(|s| (s, false));
        };
        let (inner, conn) = tls.into_inner();
        let sock = inner.into_client_stream()?;
        let plain = crate::tls::relay::spawn(rustls::Connection::Server(conn), sock, peer)?;
        Ok((ClientStream::Unix(plain), true))
    }

    /// The blocking socket the core takes over.
    fn into_client_stream(self) -> io::Result<ClientStream> {
        Ok(match self {
            NegotiationStream::Tcp(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                ClientStream::Tcp(s)
            }
            NegotiationStream::Unix(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                ClientStream::Unix(s)
            }
            NegotiationStream::Tls(_) | NegotiationStream::Closed => {
                return Err(io::Error::other("not a clear-text socket"))
            }
        })
    }
}

impl AsyncRead for NegotiationStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NegotiationStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            NegotiationStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            NegotiationStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            NegotiationStream::Closed => closed(),
        }
    }
}

impl AsyncWrite for NegotiationStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NegotiationStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            NegotiationStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            NegotiationStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            NegotiationStream::Closed => closed(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NegotiationStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            NegotiationStream::Unix(s) => Pin::new(s).poll_flush(cx),
            NegotiationStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            NegotiationStream::Closed => closed(),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NegotiationStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            NegotiationStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            NegotiationStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            NegotiationStream::Closed => closed(),
        }
    }
}

/// What a stream left closed by a failed upgrade answers.
fn closed<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
}

/// Bytes read per call during negotiation (grown only while an option needs
/// more, up to the handshake's own bound).
const READ_CHUNK: usize = 1024;

/// Runs the server side of the handshake over `s`. Returns the negotiation
/// and any bytes read past it, or None if the client ended the handshake
/// (ABORT, disconnect, unknown export with EXPORT_NAME). Each completed
/// message counts as progress on `ticket`, and every byte read against its
/// bound; the caller bounds the time. With `tls`, a client's STARTTLS
/// upgrades `s` in place.
pub async fn negotiate(
    s: &mut NegotiationStream,
    catalog: &dyn ExportCatalog,
    ticket: &Ticket,
    tls: Option<&NbdTls>,
) -> Result<Option<(Negotiated, Vec<u8>)>, HandshakeFailure> {
    let mut hs = Handshake::with_tls(tls.map_or(TlsPolicy::Off, |t| t.policy));
    // Empty until the client sends something: an idle connection costs no
    // buffer.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if !hs.output().is_empty() {
            s.write_all(hs.output()).await?;
            s.flush().await?;
            let n = hs.output().len();
            hs.consume_output(n);
            ticket.progress();
        }
        match hs.status() {
            Status::Ready => return Ok(hs.into_negotiated().map(|n| (n, buf))),
            Status::Closed => {
                tracing::debug!(
                    "handshake closed: {}",
                    hs.close_reason().unwrap_or("client left")
                );
                return Ok(None);
            }
            Status::InProgress => {}
            Status::StartTls => {
                if !start_tls(s, tls, &buf).await? {
                    return Ok(None);
                }
                hs.tls_established();
                ticket.progress();
                continue;
            }
        }
        if !buf.is_empty() {
            let used = hs.receive(&buf, catalog)?;
            if used > 0 {
                buf.drain(..used);
                ticket.progress();
                continue;
            }
        }
        // The protocol crate consumes every complete message and buffers at
        // most one option: more unconsumed input than that is its bug.
        if buf.len() > nbd::handshake::MAX_BUFFERED_INPUT {
            return Err(io::Error::other("handshake input not consumed").into());
        }
        buf.reserve(READ_CHUNK);
        let n = s.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if !ticket.read(n) {
            return Err(HandshakeFailure::TooManyBytes(
                ticket.pool().limits().max_bytes,
            ));
        }
    }
}

/// Upgrades `s` to TLS after the client's NBD_OPT_STARTTLS was answered.
/// False when the connection must close instead: no TLS configured (the
/// handshake offers STARTTLS only with it), or the client sent clear text
/// after STARTTLS before the TLS handshake, which could be injected (the
/// spec forbids sending it).
async fn start_tls(
    s: &mut NegotiationStream,
    tls: Option<&NbdTls>,
    buffered: &[u8],
) -> Result<bool, HandshakeFailure> {
    let Some(t) = tls else { return Ok(false) };
    if !buffered.is_empty() {
        tracing::info!("client sent data after NBD_OPT_STARTTLS before the TLS handshake; closing");
        return Ok(false);
    }
    s.start_tls(t.config.clone())
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    Ok(true)
}

/// Negotiates with one client under the pool's deadline, then routes it to
/// its volume's core.
async fn handshake_and_route(
    ctx: &'static AcceptContext,
    mut stream: NegotiationStream,
    peer: String,
    ticket: Ticket,
) {
    let deadline = ticket.pool().limits().deadline;
    let tls = match stream {
        NegotiationStream::Tcp(_) => ctx.tls.as_ref(),
        _ => None,
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(deadline, negotiate(&mut stream, &ctx.catalog, &ticket, tls)) => r,
        () = ticket.evicted() => return,
    };
    let (neg, leftover) = match outcome {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(HandshakeFailure::TooManyBytes(_))) => {
            return ticket.pool().report(&peer, DropReason::TooManyBytes)
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, "handshake failed: {e}");
            return;
        }
        Err(_) => return ticket.pool().report(&peer, DropReason::Deadline),
    };
    let n = ctx.conns.fetch_add(1, Ordering::Relaxed);
    let guard = ConnGuard::new(ctx.conns.clone());
    if n >= ctx.max_connections {
        return ticket.pool().report(&peer, DropReason::ServingFull);
    }
    drop(ticket);
    let Some(route) = ctx.routes.of_export(&neg.export.name) else {
        tracing::error!(%peer, "negotiated export '{}' has no core", neg.export.name);
        return;
    };
    let (stream, tls) = match stream.into_served(&peer) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, "cannot hand the socket to its core: {e}");
            return;
        }
    };
    tracing::debug!(%peer, export = %neg.export.name, structured = neg.structured_replies, tls, "client attached");
    let msg = crate::control::CoreMsg::Conn(NewConn {
        stream,
        neg,
        leftover,
        peer: peer.clone(),
        guard,
        handed_over: false,
        tls,
    });
    if route.send(msg).await.is_err() {
        tracing::warn!(%peer, "core is gone; dropping connection");
    }
}

/// Takes one accepted socket into the pool and starts its handshake.
fn admit(
    ctx: &'static AcceptContext,
    pool: &Arc<admission::Pool>,
    stream: NegotiationStream,
    source: Source,
    peer: String,
) {
    let ticket = pool.admit(source, peer.clone());
    let busy = Handshaking::new(&ctx.handshaking);
    tokio::task::spawn_local(async move {
        handshake_and_route(ctx, stream, peer, ticket).await;
        drop(busy);
    });
}

/// How often the accept loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How long handshakes under way may finish once accepting stopped (a
/// hand-over); the rest are closed, and their clients reconnect.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// Accepts on both listeners until `ctx.stop` is set.
async fn accept_loop(
    ctx: &'static AcceptContext,
    tcp: tokio::net::TcpListener,
    unix: Option<tokio::net::UnixListener>,
) {
    let pool = admission::Pool::new("nbd", ctx.handshake);
    while !ctx.stop.load(Ordering::Acquire) {
        let unix_accept = async {
            match &unix {
                Some(u) => u.accept().await.map(|(s, _)| s),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tcp.accept() => match r {
                Ok((s, addr)) => {
                    let _ = s.set_nodelay(true);
                    admit(ctx, &pool, NegotiationStream::Tcp(s), Source::Ip(addr.ip()), addr.to_string());
                }
                Err(e) => accept_failed(e).await,
            },
            r = unix_accept => match r {
                Ok(s) => admit(ctx, &pool, NegotiationStream::Unix(s), Source::Local, "unix".into()),
                Err(e) => accept_failed(e).await,
            },
            () = tokio::time::sleep(STOP_POLL) => {}
        }
    }
    let until = Instant::now() + HANDSHAKE_GRACE;
    while ctx.handshaking.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the accept thread; it ends once `ctx.stop` is set (its listeners
/// stay open for a hand-over) and the handshakes under way finished or
/// [`HANDSHAKE_GRACE`] passed.
pub fn spawn_acceptors(
    ctx: &'static AcceptContext,
    tcp: TcpListener,
    unix: Option<UnixListener>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    tcp.set_nonblocking(true)?;
    if let Some(u) = &unix {
        u.set_nonblocking(true)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let tcp = match tokio::net::TcpListener::from_std(tcp) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("cannot accept on the NBD port: {e}"),
                };
                let unix = match unix.map(tokio::net::UnixListener::from_std).transpose() {
                    Ok(u) => u,
                    Err(e) => return tracing::error!("cannot accept on the NBD socket: {e}"),
                };
                accept_loop(ctx, tcp, unix).await;
            });
        })?;
    Ok(vec![thread])
}

/// Logs a failed accept (not a connection another process took first) and
/// backs off.
async fn accept_failed(e: io::Error) {
    if e.kind() != io::ErrorKind::WouldBlock {
        tracing::warn!("accept failed: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Routes a connection handed over by the old daemon process to its
/// volume's core, as if its handshake had just ended here.
pub fn adopt(ctx: &'static AcceptContext, nc: NewConn) -> Result<(), String> {
    let route = ctx
        .routes
        .get(&nc.neg.export.name)
        .ok_or_else(|| format!("export '{}' is not served here", nc.neg.export.name))?;
    route
        .blocking_send(crate::control::CoreMsg::Conn(nc))
        .map_err(|_| "its core is gone".to_string())
}

/// A slot for a connection handed over by the old process (counted like an
/// accepted one; the limit does not refuse it: it was admitted already).
pub fn adopted_slot(ctx: &AcceptContext) -> ConnGuard {
    ctx.conns.fetch_add(1, Ordering::Relaxed);
    ConnGuard::new(ctx.conns.clone())
}
