//! The blocking client: one request, one answer, over the daemon's admin
//! socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{Request, Response};

/// How long the daemon may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest answer line read (a status of many volumes fits easily).
const MAX_ANSWER: u64 = 16 << 20;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens on the socket (the daemon is down or starting).
    #[error("cannot connect to the admin socket {}: {source}; is mirrorblkd running with --admin-socket {}?", path.display(), path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What connect(2) said.
        source: std::io::Error,
    },
    /// Sending the request failed.
    #[error("admin socket write failed: {0}")]
    Write(std::io::Error),
    /// Reading the answer failed (or timed out).
    #[error("admin socket read failed: {0}")]
    Read(std::io::Error),
    /// The request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(serde_json::Error),
    /// The answer is not a response line.
    #[error("bad answer from the daemon ({source}): {line}")]
    Decode {
        /// Why it did not parse.
        source: serde_json::Error,
        /// The line received.
        line: String,
    },
}

/// Sends one request to the daemon at `path` and reads its answer (waiting
/// at most 30 s for it).
pub fn call(path: &Path, req: &Request) -> Result<Response, CallError> {
    call_within(path, req, ANSWER_TIMEOUT)
}

/// Sends one request to the daemon at `path` and reads its answer, waiting
/// at most `limit` for it.
pub fn call_within(path: &Path, req: &Request, limit: Duration) -> Result<Response, CallError> {
    let stream = UnixStream::connect(path).map_err(|source| CallError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(CallError::Read)?;
    let mut w = stream.try_clone().map_err(CallError::Write)?;
    let mut text = serde_json::to_string(req).map_err(CallError::Encode)?;
    text.push('\n');
    w.write_all(text.as_bytes()).map_err(CallError::Write)?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(MAX_ANSWER)
        .read_line(&mut line)
        .map_err(CallError::Read)?;
    serde_json::from_str(&line).map_err(|source| CallError::Decode { source, line })
}
