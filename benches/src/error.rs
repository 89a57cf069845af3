//! The harness's error type: every failure carries a sentence saying what was
//! being done, so a failed run can be diagnosed from its last line.

use std::io;

/// Why the harness (or one measurement) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed while doing `what`.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path or command involved.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// An external tool (fio, a server) misbehaved: bad exit, bad output,
    /// no readiness within its bound.
    #[error("{0}")]
    Tool(String),
    /// The command line or an input value is wrong.
    #[error("{0}")]
    Usage(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches "what was being done" to an `io::Result`, like anyhow's `context`.
pub trait IoContext<T> {
    /// Wraps the error with the sentence `what()` returns (only built on error).
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}
