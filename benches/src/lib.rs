//! Benchmark harness of mirrorblk (see benches/README.md).
//!
//! Two parts live in this crate:
//!
//! * `fio-compare` (`src/bin/fio-compare.rs`, built from the modules below):
//!   runs the same fio jobs through fio's nbd engine against `mirrorblkd` and
//!   against peer NBD servers (nbdkit, qemu-nbd), plus fio straight on the
//!   file as the disk's limit, and (with `--replicated`) against a primary
//!   with 1 or 2 replicas on loopback in each replication mode and against
//!   their peer, qemu-storage-daemon's active mirror (`qsd.rs`, set up over
//!   QMP by `qmp.rs`); then writes
//!   a table, a JSON record and an SVG chart under
//!   `benches/results/<UTC timestamp>/`.
//! * criterion micro-benches (`benches/*.rs`): NBD codec, journal record
//!   encoding and checksums, recovery scan rate.
//!
//! The comparison talks to every server only through processes and sockets,
//! so this library does not link the daemon: it keeps building while the
//! daemon is being changed.

pub mod cluster;
pub mod error;
pub mod fio;
pub mod machine;
pub mod proc_stat;
pub mod process;
pub mod qmp;
pub mod qsd;
pub mod report;
pub mod stats;
pub mod svg;
pub mod targets;
