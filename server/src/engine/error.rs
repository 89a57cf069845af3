//! The engine's errors, and the one mapping from an I/O error to the NBD
//! error a client is told (nbdkit keeps one such mapping too).

use std::io;
use std::time::Duration;

use nbd::ErrorCode;

use crate::units::Lsn;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The journal failed earlier; nothing more is written.
    #[error("journal failed: {0}")]
    JournalFailed(String),
    /// An I/O operation failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Records were not applied in time.
    #[error("records up to LSN {last} not applied within {limit:?}")]
    NotApplied {
        /// The last LSN waited for.
        last: u64,
        /// How long was waited.
        limit: Duration,
    },
    /// A region or record does not fit the volume.
    #[error("{what} at {offset} does not fit the volume")]
    OutOfRange {
        /// What it was.
        what: &'static str,
        /// Its volume byte offset.
        offset: u64,
    },
    /// A replicated record did not carry the next LSN.
    #[error("record LSN {got} arrived where LSN {want} was expected")]
    OutOfOrder {
        /// The LSN it carried.
        got: u64,
        /// The LSN expected.
        want: Lsn,
    },
    /// A read or write failed with an NBD-visible error.
    #[error("{0:?}")]
    Nbd(ErrorCode),
}

impl EngineError {
    /// The NBD error a client is told.
    pub fn nbd_code(&self) -> ErrorCode {
        match self {
            EngineError::Io { source, .. } => nbd_error(source),
            EngineError::Nbd(code) => *code,
            EngineError::OutOfRange { .. } => ErrorCode::Inval,
            EngineError::JournalFailed(_)
            | EngineError::NotApplied { .. }
            | EngineError::OutOfOrder { .. } => ErrorCode::Io,
        }
    }
}

/// The NBD error for an I/O error: the one place that decides it.
pub fn nbd_error(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorCode::NoSpc,
        Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorCode::Perm,
        Some(libc::EINVAL) => ErrorCode::Inval,
        Some(libc::ENOMEM) => ErrorCode::NoMem,
        Some(libc::ESHUTDOWN) => ErrorCode::Shutdown,
        Some(libc::EOVERFLOW) => ErrorCode::Overflow,
        _ => ErrorCode::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_the_nbd_error_clients_expect() {
        let cases = [
            (libc::ENOSPC, ErrorCode::NoSpc),
            (libc::EDQUOT, ErrorCode::NoSpc),
            (libc::EROFS, ErrorCode::Perm),
            (libc::EINVAL, ErrorCode::Inval),
            (libc::ESHUTDOWN, ErrorCode::Shutdown),
            (libc::EIO, ErrorCode::Io),
            (libc::ENODEV, ErrorCode::Io),
        ];
        for (errno, want) in cases {
            assert_eq!(
                nbd_error(&io::Error::from_raw_os_error(errno)),
                want,
                "{errno}"
            );
        }
        // An error without an errno is an I/O error.
        assert_eq!(nbd_error(&io::Error::other("x")), ErrorCode::Io);
    }
}
