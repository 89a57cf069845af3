//! Frames on a core's socket: bounded reads with deadlines, and sends.

use std::io;
use std::time::Duration;

use super::wire::{self, FrameHeader, Kind, WireError, FRAME_HEADER_LEN};
use crate::buffer::OutBuf;
use crate::sockio::{read_exact, write_all, ReadFail, Socket};

/// Why a replication connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Reading failed or the peer left.
    #[error("{0}")]
    Read(#[from] ReadFail),
    /// Writing failed.
    #[error("send failed: {0}")]
    Io(#[from] io::Error),
    /// The peer sent malformed bytes.
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    /// The peer could not be reached.
    #[error("cannot connect to {peer} at {addr}: {source}")]
    Connect {
        /// The peer's node name.
        peer: String,
        /// Its replication address.
        addr: std::net::SocketAddr,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The peer refused our HELLO.
    #[error("{peer} refused: {message}")]
    Refused {
        /// The peer's node name.
        peer: String,
        /// Its explanation.
        message: String,
    },
    /// This node refused the peer's HELLO (the message it was sent).
    #[error("refused: {0}")]
    RefusedPeer(String),
    /// The TLS handshake with the peer failed (its certificate is not
    /// signed by the cluster CA, expired or revoked; or it speaks no TLS).
    #[error("TLS with {peer} at {addr} failed: {reason}")]
    Tls {
        /// The peer's node name.
        peer: String,
        /// Its replication address.
        addr: std::net::SocketAddr,
        /// rustls's reason.
        reason: String,
    },
    /// The peer's MAC does not prove the shared secret.
    #[error(
        "{peer} failed authentication: wrong shared secret (check --secret-file on both nodes)"
    )]
    Auth {
        /// Who failed it, as logged ("b", "primary a").
        peer: String,
    },
    /// The peer sent an ERROR frame.
    #[error("{context}: {message}")]
    Reported {
        /// Where it came in ("replica reported", ...).
        context: &'static str,
        /// The peer's message.
        message: String,
    },
    /// The peer broke the protocol.
    #[error("{0}")]
    Violation(String),
    /// This node told the peer why the session ends (an ERROR frame).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The out-of-sync bitmap could not be written.
    #[error("cannot write the out-of-sync bitmap {}: {source}", path.display())]
    Bitmap {
        /// The bitmap's file.
        path: std::path::PathBuf,
        /// Why writing failed.
        source: io::Error,
    },
    /// A local read or wait this link needed failed.
    #[error("{0}")]
    Local(String),
    /// The peer was silent too long.
    #[error("peer silent for {0:?} (heartbeat timeout)")]
    Timeout(Duration),
    /// A primary of a newer epoch exists: this node must stop acting as
    /// primary (the control plane demotes it).
    #[error("a primary of epoch {0} exists: this node was replaced")]
    Fenced(crate::units::Epoch),
    /// The local storage engine failed.
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
}

/// Reads one frame header within `limit`.
pub async fn read_header(sock: &Socket, limit: Duration) -> Result<FrameHeader, LinkError> {
    let buf = vec![0u8; FRAME_HEADER_LEN];
    let (res, buf) = tokio::time::timeout(
        limit,
        read_exact(sock, buf, 0, FRAME_HEADER_LEN, "frame header", false),
    )
    .await
    .map_err(|_| LinkError::Timeout(limit))?;
    res?;
    let mut a = [0u8; FRAME_HEADER_LEN];
    a.copy_from_slice(&buf);
    Ok(wire::decode_frame_header(&a)?)
}

/// Reads a body of `len` bytes (control messages are at most 64 KiB).
pub async fn read_body(sock: &Socket, len: u32, limit: Duration) -> Result<Vec<u8>, LinkError> {
    let buf = vec![0u8; len as usize];
    let (res, buf) = tokio::time::timeout(
        limit,
        read_exact(sock, buf, 0, len as usize, "message body", false),
    )
    .await
    .map_err(|_| LinkError::Timeout(limit))?;
    res?;
    Ok(buf)
}

/// Reads one whole control frame of the expected kind.
pub async fn expect(sock: &Socket, kind: Kind, limit: Duration) -> Result<Vec<u8>, LinkError> {
    let h = read_header(sock, limit).await?;
    let body = read_body(sock, h.len, limit).await?;
    if h.kind == Kind::Error {
        let e = wire::ErrorMsg::decode(&body)?;
        return Err(LinkError::Reported {
            context: "peer reported an error",
            message: e.message,
        });
    }
    if h.kind != kind {
        return Err(LinkError::Violation(format!(
            "expected {kind:?}, got {:?}",
            h.kind
        )));
    }
    Ok(body)
}

/// Sends one control frame.
pub async fn send(sock: &Socket, kind: Kind, body: &[u8]) -> io::Result<()> {
    write_all(sock, vec![OutBuf::Bytes(wire::frame(kind, body), 0)]).await
}

/// Fresh random bytes for a nonce.
pub fn nonce() -> [u8; wire::NONCE_LEN] {
    let mut n = [0u8; wire::NONCE_LEN];
    // SAFETY: getrandom writes at most n.len() bytes into n.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    assert_eq!(
        got,
        n.len() as isize,
        "getrandom failed; no randomness for the handshake"
    );
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed errors log the texts the untyped ones did (tests and
    /// operators grep for them).
    #[test]
    fn link_error_texts() {
        let io = || io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let refused = io().to_string();
        let cases = [
            (
                LinkError::Connect {
                    peer: "b".into(),
                    addr: "127.0.0.1:7001".parse().unwrap(),
                    source: io(),
                },
                format!("cannot connect to b at 127.0.0.1:7001: {refused}"),
            ),
            (
                LinkError::Refused { peer: "b".into(), message: "no".into() },
                "b refused: no".into(),
            ),
            (LinkError::RefusedPeer("no".into()), "refused: no".into()),
            (
                LinkError::Auth { peer: "primary a".into() },
                "primary a failed authentication: wrong shared secret (check --secret-file on both nodes)".into(),
            ),
            (
                LinkError::Reported { context: "replica reported", message: "x".into() },
                "replica reported: x".into(),
            ),
            (LinkError::Violation("v".into()), "v".into()),
            (LinkError::Rejected("r".into()), "rejected: r".into()),
            (
                LinkError::Bitmap { path: "/j/b.oos".into(), source: io() },
                format!("cannot write the out-of-sync bitmap /j/b.oos: {refused}"),
            ),
            (LinkError::Local("l".into()), "l".into()),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
