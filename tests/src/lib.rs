//! Test harness for mirrorblk's multi-process tests.
//!
//! - [`daemon`]: start, stop (SIGTERM), crash (`kill -9`) and restart a
//!   `mirrorblkd` in a temporary directory, learn its port from its log, and
//!   assert on its log lines. Daemons are killed by PID when dropped.
//! - [`tools`]: run the real NBD clients (qemu-io, qemu-img, nbdinfo,
//!   nbdcopy, fio) with a timeout; a missing tool fails with the apt package
//!   that provides it.
//! - [`util`]: seeded randomness, data patterns, polling with a deadline.
//!
//! Every test gets its own temporary directory and its own ephemeral port on
//! 127.0.0.1, so tests run in parallel under `cargo nextest`.

#![warn(missing_docs)]

pub mod daemon;
pub mod tools;
pub mod util;

pub use daemon::{Daemon, Exited, TestDir};
