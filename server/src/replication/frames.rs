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
    /// The peer broke the protocol or refused us.
    #[error("{0}")]
    Protocol(String),
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
        return Err(LinkError::Protocol(format!(
            "peer reported an error: {}",
            e.message
        )));
    }
    if h.kind != kind {
        return Err(LinkError::Protocol(format!(
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
