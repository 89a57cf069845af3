//! Finding the node that serves the export, and the NBD handshake the
//! kernel cannot do itself.
//!
//! Candidates, in order: with `--etcd`, the address in the volume's leader
//! record (the current primary); then every `--server` in the order given.
//! Each is given a bounded TCP connect and a bounded handshake
//! (fixed newstyle, `NBD_OPT_GO`, no structured replies: the kernel's nbd
//! driver reads simple replies only). A replica answers `NBD_OPT_GO` with
//! an error reply that says it is a replica (server/src/listener.rs).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use mirrorblk_etcd::{records, LeaderRecord, VolumeKeys};
use nbd::client::ClientHandshake;
use nbd::{consts, Client, ClientError};

use super::netlink::setsockopt;

/// Bounds of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Each read or write of the handshake.
    pub handshake: Duration,
}

/// A connection in the transmission phase, ready for the kernel.
#[derive(Debug)]
pub struct Negotiated {
    /// The server as named (`HOST:PORT`).
    pub server: String,
    /// The socket.
    pub stream: TcpStream,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The server's minimum block size (1 if it sent none).
    pub min_block: u32,
    /// The server's preferred block size.
    pub preferred_block: u32,
}

/// One candidate that did not work, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    /// `HOST:PORT`, or "etcd" when etcd could not be asked.
    pub server: String,
    /// Why.
    pub why: String,
}

impl std::fmt::Display for Tried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.server, self.why)
    }
}

/// Where to look for the primary.
pub struct Sources {
    /// etcd, when `--etcd` was given.
    pub etcd: Option<mirrorblk_etcd::Client>,
    /// `--server`s in order.
    pub servers: Vec<String>,
    /// The export (= volume) name.
    pub export: String,
    /// Bounds per attempt.
    pub timeouts: Timeouts,
}

impl Sources {
    /// The candidates now: etcd's primary first, then the `--server`s
    /// (each once). An etcd that cannot be asked is reported in `tried`.
    fn candidates(&self, tried: &mut Vec<Tried>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(client) = &self.etcd {
            match leader(client, &self.export) {
                Ok(Some(rec)) => out.push(rec.nbd),
                Ok(None) => tried.push(Tried {
                    server: "etcd".into(),
                    why: format!(
                        "volume '{}' has no primary right now (an election is under way)",
                        self.export
                    ),
                }),
                Err(e) => tried.push(Tried {
                    server: "etcd".into(),
                    why: e,
                }),
            }
        }
        for s in &self.servers {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// Tries every candidate in turn; the first that completes the
    /// handshake (with `size`, when given) wins. Err lists each tried and why.
    pub fn find(&self) -> Result<Negotiated, Vec<Tried>> {
        let mut tried = Vec::new();
        for server in self.candidates(&mut tried) {
            match handshake(&server, &self.export, self.timeouts) {
                Ok(n) => return Ok(n),
                Err(why) => tried.push(Tried { server, why }),
            }
        }
        Err(tried)
    }
}

fn leader(client: &mirrorblk_etcd::Client, volume: &str) -> Result<Option<LeaderRecord>, String> {
    let kv = client
        .get(&VolumeKeys::new(volume).leader())
        .map_err(|e| format!("cannot read the leader record: {e}"))?;
    kv.map(|kv| records::decode(&kv).map_err(|e| format!("bad leader record: {e}")))
        .transpose()
}

fn resolve(server: &str) -> Result<SocketAddr, String> {
    server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_string())
}

/// Connects to `server` and negotiates `export` for the kernel. Err says
/// why in words (refused, timed out, a replica…).
pub fn handshake(server: &str, export: &str, t: Timeouts) -> Result<Negotiated, String> {
    let addr = resolve(server)?;
    let stream = TcpStream::connect_timeout(&addr, t.connect).map_err(|e| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("no TCP connection within {:?}", t.connect)
        }
        _ => format!("cannot connect: {e}"),
    })?;
    let io = |e: std::io::Error| format!("socket setup: {e}");
    stream.set_read_timeout(Some(t.handshake)).map_err(io)?;
    stream.set_write_timeout(Some(t.handshake)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let client = Client::connect(stream, export, false).map_err(|e| describe(&e, export, t))?;
    let info = client.info().clone();
    let flags = client.transmission_flags();
    let stream = client.into_inner();
    // The kernel reads and writes this socket itself: a receive timeout
    // left on it would make an idle device look dead.
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    keepalive(&stream).map_err(io)?;
    Ok(Negotiated {
        server: server.to_string(),
        stream,
        size: info.size,
        flags,
        min_block: info.min_block.max(1),
        preferred_block: info.preferred_block,
    })
}

/// Asks `server` for the size of `export` with `NBD_OPT_INFO`, then ends
/// the handshake with `NBD_OPT_ABORT`: no transmission phase, so the
/// server serves no client for it. How attach notices a `mirrorblk resize`
/// (NBD has no way for a server to tell a connected client). Err says why
/// in words.
pub fn probe_size(server: &str, export: &str, t: Timeouts) -> Result<u64, String> {
    let addr = resolve(server)?;
    let stream =
        TcpStream::connect_timeout(&addr, t.connect).map_err(|e| format!("cannot connect: {e}"))?;
    let io = |e: std::io::Error| format!("socket setup: {e}");
    stream.set_read_timeout(Some(t.handshake)).map_err(io)?;
    stream.set_write_timeout(Some(t.handshake)).map_err(io)?;
    let mut hs = ClientHandshake::start(stream, false).map_err(|e| describe(&e, export, t))?;
    let info = hs.info(export).map_err(|e| describe(&e, export, t))?;
    // A courtesy: the server closes either way, and the size is known.
    let _ = hs.option(consts::OPT_ABORT, &[]);
    Ok(info.size)
}

/// TCP keepalive on the socket the kernel will own, so a peer that
/// vanished without a FIN (power loss, partition) is noticed on an idle
/// device within ~30 s (the kernel then marks the socket dead and tells
/// us), not after the system's two-hour default.
fn keepalive(s: &TcpStream) -> std::io::Result<()> {
    let fd = s.as_raw_fd();
    let on: libc::c_int = 1;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &on)?;
    for (opt, v) in [
        (libc::TCP_KEEPIDLE, 10),
        (libc::TCP_KEEPINTVL, 5),
        (libc::TCP_KEEPCNT, 4),
    ] {
        setsockopt(fd, libc::IPPROTO_TCP, opt, &(v as libc::c_int))?;
    }
    Ok(())
}

fn describe(e: &ClientError, export: &str, t: Timeouts) -> String {
    match e {
        ClientError::OptionRejected {
            reply_type,
            message,
            ..
        } if *reply_type == consts::REP_ERR_UNKNOWN => {
            format!("does not serve export '{export}': {message}")
        }
        ClientError::OptionRejected { message, .. } => {
            format!("refused export '{export}': the server says {message:?}")
        }
        ClientError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!("no NBD handshake within {:?}", t.handshake)
        }
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "closed the connection during the NBD handshake (not serving, or not an NBD server)"
                .into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    const T: Timeouts = Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_millis(300),
    };

    #[test]
    fn silent_server_times_out_in_bounded_time() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let started = std::time::Instant::now();
        let err = handshake(&addr, "vol0", T).unwrap_err();
        assert!(err.contains("no NBD handshake within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(l);
    }

    #[test]
    fn closed_port_and_eof_are_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = handshake(&addr, "vol0", T).unwrap_err();
        assert!(err.starts_with("cannot connect"), "{err}");

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // A greeting cut short, then close.
            s.write_all(b"NBDMAGIC").unwrap();
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        });
        let err = handshake(&addr, "vol0", T).unwrap_err();
        assert!(
            err.contains("closed the connection") || err.contains("no NBD handshake"),
            "{err}"
        );
        t.join().unwrap();
    }

    #[test]
    fn every_candidate_is_reported_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        drop(l);
        let s = Sources {
            etcd: None,
            servers: vec![a.clone(), a.clone(), "no-such-host.invalid:1".into()],
            export: "vol0".into(),
            timeouts: T,
        };
        let tried = s.find().unwrap_err();
        assert_eq!(tried.len(), 2, "{tried:?}");
        assert_eq!(tried[0].server, a);
        assert!(tried[1].why.contains("resolve"), "{tried:?}");
    }
}
