//! Test harness for mirrorblk's multi-process tests.
//!
//! - [`daemon`]: start, stop (SIGTERM), crash (`kill -9`) and restart a
//!   `mirrorblkd` in a temporary directory, learn its port from its log, and
//!   assert on its log lines. Daemons are killed by PID when dropped.
//! - [`tools`]: run the real NBD clients (qemu-io, qemu-img, nbdinfo,
//!   nbdcopy, fio) with a timeout; a missing tool fails with the apt package
//!   that provides it.
//! - [`cluster`]: replicated nodes (primary and replicas, each with its own
//!   files, admin socket and fixed replication port), their admin-socket
//!   status, and byte comparison of their data stores.
//! - [`coordinated`]: nodes whose role etcd decides (`--etcd`, no
//!   `--role`), and the one that serves.
//! - [`writer`]: a FUA writer through whichever node serves, recording
//!   each acknowledged write with the node and the time, and the check that
//!   a node holds them all.
//! - [`kernel`]: a qemu guest whose Linux kernel attaches an export with
//!   its nbd driver and runs a filesystem workload on it.
//! - [`crash_model`]: pipelined versioned writes with FUA and FLUSH, the
//!   versions each block may hold after a crash, and the check against it.
//! - [`volatile_disk`]: an NBD disk with a volatile write cache that loses
//!   its unflushed writes, sector by sector, at a power cut.
//! - [`util`]: seeded randomness, data patterns, polling with a deadline.
//! - [`etcd`]: a real etcd (Debian's `etcd-server`) on loopback ports in
//!   the test's directory, killed and restarted at will, and its keys read
//!   through the JSON gateway.
//! - [`flood`]: crowds of idle and slowloris connections from many
//!   loopback addresses, the open-file limit, a process's thread count.
//! - [`netns`]: two network namespaces joined by a veth pair, for partitions.
//! - [`proxy`]: a TCP proxy adding a fixed delay each way (cross-site links);
//!   also the `delay-proxy` binary, which the benchmarks use.
//!
//! Every test gets its own temporary directory and its own ephemeral port on
//! 127.0.0.1, so tests run in parallel under `cargo nextest`.
//!
//! Environment variables:
//! - `MIRRORBLKD`: the daemon binary to test (default: `target/<profile>/mirrorblkd`
//!   next to the test executable, built if missing or older than the sources).
//! - `MIRRORBLK_TEST_SEED`: replay a randomized test with the seed it printed.
//! - `MIRRORBLK_KEEP_TMP`: keep a failed test's directory (data, journal) for inspection.
//! - `MIRRORBLK_KERNEL_ACCEL`: `kvm` or `tcg` for the kernel tests' guest (default: probed).

#![warn(missing_docs)]

pub mod cluster;
pub mod coordinated;
pub mod crash_model;
pub mod daemon;
pub mod etcd;
pub mod flood;
pub mod kernel;
pub mod netns;
pub mod proxy;
pub mod tools;
pub mod util;
pub mod volatile_disk;
pub mod writer;

pub use daemon::{Daemon, Exited, TestDir};
