//! The replication listener: accepts primaries, reads their HELLO (with a
//! timeout, off the cores), and hands the connection to the core of the
//! volume it names, where the session runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::wire::{self, Hello, HelloReply, Kind, ReplyStatus, FRAME_HEADER_LEN};

/// A primary's connection on its way to a volume's core.
pub struct IncomingPrimary {
    /// The socket.
    pub stream: TcpStream,
    /// Its HELLO.
    pub hello: Hello,
    /// The HELLO body bytes (the MACs cover them).
    pub hello_body: Vec<u8>,
    /// Peer address, for logs.
    pub peer: String,
}

fn read_hello(s: &mut TcpStream) -> Result<(Hello, Vec<u8>), String> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut h)
        .map_err(|e| format!("reading HELLO: {e}"))?;
    let fh = wire::decode_frame_header(&h).map_err(|e| e.to_string())?;
    if fh.kind != Kind::Hello {
        return Err(format!("expected HELLO, got {:?}", fh.kind));
    }
    let mut body = vec![0u8; fh.len as usize];
    s.read_exact(&mut body)
        .map_err(|e| format!("reading HELLO: {e}"))?;
    let hello = Hello::decode(&body).map_err(|e| e.to_string())?;
    Ok((hello, body))
}

fn refuse_unknown(s: &mut TcpStream, volume: &str, node: &str) {
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

/// Starts the listener thread. `route` hands each primary to its volume's
/// core, or gives it back when this node has no such volume. It ends once
/// `stop` is set, leaving the listener open (a hand-over passes it on).
pub fn spawn(
    listener: TcpListener,
    route: impl Fn(IncomingPrimary) -> Result<(), Box<IncomingPrimary>> + Send + 'static,
    node: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::os::fd::AsFd;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("repl-accept".into()).spawn(move || {
        while crate::sockio::wait_acceptable(listener.as_fd(), &stop) {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!("replication accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let _ = s.set_nonblocking(false);
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let (hello, hello_body) = match read_hello(&mut s) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%peer, "replication connection refused: {e}");
                    continue;
                }
            };
            let _ = s.set_read_timeout(None);
            if let Err(mut inc) = route(IncomingPrimary { stream: s, hello, hello_body, peer }) {
                tracing::warn!(peer = %inc.peer, "primary {} asked for unknown volume '{}'", inc.hello.node, inc.hello.volume);
                refuse_unknown(&mut inc.stream, &inc.hello.volume, &node);
            }
        }
    })
}
