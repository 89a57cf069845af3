//! Accepting clients and negotiating the NBD handshake.
//!
//! Each accepted socket gets a short-lived thread that runs the option
//! haggling with blocking I/O and a timeout (the handshake is not the hot
//! path, and a slow or hostile client there cannot stall any core). Once the
//! client has chosen an export, the socket moves to that volume's core, where
//! all its requests are served.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbd::{ExportCatalog, ExportInfo, Handshake, Negotiated, Status};

use crate::control::{ClientStream, ConnGuard, NewConn};

/// How long a client may take over the whole handshake's each read.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The exports this node serves.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// In configuration order; the first is the default export.
    pub exports: Vec<ExportInfo>,
    /// Volumes this node holds as a replica: not served, and a client
    /// asking for one is told so (and to ask the primary).
    pub replicas: Vec<String>,
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    fn list(&self) -> Vec<(String, String)> {
        self.exports
            .iter()
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
    /// Live connections.
    pub conns: Arc<AtomicUsize>,
    /// Limit on live connections.
    pub max_connections: usize,
    /// Handshakes under way (a hand-over waits for them to finish).
    pub handshaking: Arc<AtomicUsize>,
    /// Set to stop accepting (a hand-over passes the listeners on).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Counts a handshake under way while it lives.
struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a handshake did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    /// Socket error or timeout.
    #[error("socket error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("handshake protocol violation: {0}")]
    Protocol(#[from] nbd::ProtocolError),
}

/// Runs the server side of the handshake over a blocking stream. Returns the
/// negotiation and any bytes read past it, or None if the client ended the
/// handshake (ABORT, disconnect, unknown export with EXPORT_NAME).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    catalog: &dyn ExportCatalog,
) -> Result<Option<(Negotiated, Vec<u8>)>, HandshakeFailure> {
    let mut hs = Handshake::new();
    let mut buf = vec![0u8; 16 << 10];
    let mut have = 0usize;
    loop {
        while !hs.output().is_empty() {
            let n = s.write(hs.output())?;
            if n == 0 {
                return Err(
                    io::Error::new(io::ErrorKind::WriteZero, "client stopped reading").into(),
                );
            }
            hs.consume_output(n);
        }
        match hs.status() {
            Status::Ready => {
                let leftover = buf[..have].to_vec();
                return Ok(hs.into_negotiated().map(|n| (n, leftover)));
            }
            Status::Closed => {
                tracing::debug!(
                    "handshake closed: {}",
                    hs.close_reason().unwrap_or("client left")
                );
                return Ok(None);
            }
            Status::InProgress => {}
            // Not offered by `Handshake::new()` (TLS off).
            Status::StartTls => return Ok(None),
        }
        if have > 0 {
            let used = hs.receive(&buf[..have], catalog)?;
            if used > 0 {
                buf.copy_within(used..have, 0);
                have -= used;
                continue;
            }
        }
        if have == buf.len() {
            // The protocol crate bounds what it buffers; this cannot grow.
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(None);
        }
        have += n;
        let used = hs.receive(&buf[..have], catalog)?;
        buf.copy_within(used..have, 0);
        have -= used;
    }
}

fn admit(ctx: &'static AcceptContext, stream: ClientStream, peer: String) {
    let n = ctx.conns.fetch_add(1, Ordering::Relaxed);
    let guard = ConnGuard::new(ctx.conns.clone());
    if n >= ctx.max_connections {
        tracing::warn!(%peer, "refusing connection: {} connections already open (--max-connections)", n);
        return;
    }
    ctx.handshaking.fetch_add(1, Ordering::AcqRel);
    let busy = Handshaking(ctx.handshaking.clone());
    let spawned = std::thread::Builder::new()
        .name("nbd-handshake".into())
        .spawn(move || {
            handshake_and_route(ctx, stream, peer, guard);
            drop(busy);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a handshake thread: {e}");
    }
}

fn handshake_and_route(
    ctx: &'static AcceptContext,
    mut stream: ClientStream,
    peer: String,
    guard: ConnGuard,
) {
    if let Err(e) = stream.set_timeout(Some(HANDSHAKE_TIMEOUT)) {
        tracing::debug!(%peer, "cannot set handshake timeout: {e}");
        return;
    }
    let (neg, leftover) = match negotiate(&mut stream, &ctx.catalog) {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(%peer, "handshake failed: {e}");
            return;
        }
    };
    if stream.set_timeout(None).is_err() {
        return;
    }
    let Some(route) = ctx.routes.get(&neg.export.name) else {
        tracing::error!(%peer, "negotiated export '{}' has no core", neg.export.name);
        return;
    };
    tracing::debug!(%peer, export = %neg.export.name, structured = neg.structured_replies, "client attached");
    if route
        .blocking_send(crate::control::CoreMsg::Conn(NewConn {
            stream,
            neg,
            leftover,
            peer: peer.clone(),
            guard,
            handed_over: false,
        }))
        .is_err()
    {
        tracing::warn!(%peer, "core is gone; dropping connection");
    }
}

/// Starts the accept threads; they end once `ctx.stop` is set (their
/// listeners stay open for a hand-over).
pub fn spawn_acceptors(
    ctx: &'static AcceptContext,
    tcp: TcpListener,
    unix: Option<UnixListener>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    use std::os::fd::AsFd;
    tcp.set_nonblocking(true)?;
    let mut threads = vec![std::thread::Builder::new()
        .name("nbd-accept-tcp".into())
        .spawn(move || {
            while crate::sockio::wait_acceptable(tcp.as_fd(), &ctx.stop) {
                match tcp.accept() {
                    Ok((s, addr)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_nodelay(true);
                        admit(ctx, ClientStream::Tcp(s), addr.to_string());
                    }
                    Err(e) => accept_failed(e),
                }
            }
        })?];
    if let Some(u) = unix {
        u.set_nonblocking(true)?;
        threads.push(
            std::thread::Builder::new()
                .name("nbd-accept-unix".into())
                .spawn(move || {
                    while crate::sockio::wait_acceptable(u.as_fd(), &ctx.stop) {
                        match u.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nonblocking(false);
                                admit(ctx, ClientStream::Unix(s), "unix".into())
                            }
                            Err(e) => accept_failed(e),
                        }
                    }
                })?,
        );
    }
    Ok(threads)
}

/// Logs a failed accept (not a connection another process took first) and
/// backs off.
fn accept_failed(e: io::Error) {
    if e.kind() != io::ErrorKind::WouldBlock {
        tracing::warn!("accept failed: {e}");
        std::thread::sleep(Duration::from_millis(50));
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
