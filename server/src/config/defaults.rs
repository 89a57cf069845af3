//! The default of every node and volume setting that has a fixed one.
//!
//! Each constant is used twice and defined once: by the resolution when a
//! setting is given neither as a flag nor in the file, and by `--help`, which
//! prints it as `[default: …]` (node settings through
//! [`HelpDefault`](super::settings::HelpDefault), volume settings and
//! `--log-format` through clap's `default_value_t`). Settings whose default
//! depends on the machine or on state (node name, cores, size, role, quorum)
//! describe it in their help text instead.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use crate::replication::{Mode, OnReplicaLoss};
use crate::store::Preallocate;
use crate::units::{ByteSize, Interval};

use super::settings::LogFormat;

/// `listen`: the IANA NBD port, loopback only.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10809));
/// `buffer_memory`: I/O buffer memory per core.
pub const BUFFER_MEMORY: ByteSize = ByteSize(128 << 20);
/// `max_connections`.
pub const MAX_CONNECTIONS: usize = 1024;
/// `max_handshakes`: per port.
pub const MAX_HANDSHAKES: usize = 256;
/// `max_handshakes_per_source`.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// `handshake_timeout`: every real client negotiates in milliseconds.
pub const HANDSHAKE_TIMEOUT: Interval = Interval(Duration::from_secs(10));
/// Most bytes a connection may send before its negotiation completes (not a
/// setting: every legitimate negotiation is far below it, and an option
/// bigger than the handshake buffers is skipped, not stored).
pub const HANDSHAKE_MAX_BYTES: usize = 256 << 10;
/// `checkpoint_interval`.
pub const CHECKPOINT_INTERVAL: Interval = Interval(Duration::from_secs(1));
/// `in_place_min`: writes at least this large go in place.
pub const IN_PLACE_MIN: ByteSize = ByteSize(128 << 10);
/// `mode`.
pub const MODE: Mode = Mode::Sync;
/// `durability`: a reply stays a promise that survives a power cut, as it
/// always was (docs/ARCHITECTURE.md, "Durability modes", says why it is not NBD's
/// weaker contract).
pub const DURABILITY: crate::journal::Durability = crate::journal::Durability::PerWrite;
/// `heartbeat_timeout`.
pub const HEARTBEAT_TIMEOUT: Interval = Interval(Duration::from_secs(5));
/// `on_replica_loss`.
pub const ON_REPLICA_LOSS: OnReplicaLoss = OnReplicaLoss::Degrade;
/// `max_lag`: bytes a replica may trail by in async mode.
pub const MAX_LAG: ByteSize = ByteSize(64 << 20);
/// `resync_rate`: bytes per second per replica.
pub const RESYNC_RATE: ByteSize = ByteSize(200 << 20);
/// `lease_ttl`: a dead primary is replaced in about 2 to 3 seconds.
pub const LEASE_TTL: Interval = Interval(Duration::from_secs(2));
/// The shortest `lease_ttl` (etcd's own minimum with its default timing).
pub const MIN_LEASE_TTL: Interval = Interval(Duration::from_secs(2));
/// `log_level`.
pub const LOG_LEVEL: &str = "info";
/// `event_log_max_bytes`: the size at which the event log rotates.
pub const EVENT_LOG_MAX_BYTES: ByteSize = ByteSize(8 << 20);
/// What `event_log` defaults to: the first volume's journal path with this
/// appended.
pub const EVENT_LOG_SUFFIX: &str = ".events.jsonl";
/// `--log-format` (a flag only).
pub const LOG_FORMAT: LogFormat = LogFormat::Text;

/// A volume's `journal_size`.
pub const JOURNAL_SIZE: ByteSize = ByteSize(256 << 20);
/// A volume's `preallocate`.
pub const PREALLOCATE: Preallocate = Preallocate::Full;
/// A volume's `read_cache`.
pub const READ_CACHE: bool = true;

// serde's `default = "…"` takes a function path.

/// [`JOURNAL_SIZE`], for serde.
pub(super) fn journal_size() -> ByteSize {
    JOURNAL_SIZE
}

/// [`PREALLOCATE`], for serde.
pub(super) fn preallocate() -> Preallocate {
    PREALLOCATE
}

/// [`READ_CACHE`], for serde.
pub(super) fn read_cache() -> bool {
    READ_CACHE
}

/// The smallest `buffer_memory`: one request of the largest size must fit.
pub const MIN_BUFFER_MEMORY: ByteSize = ByteSize(48 << 20);
/// The smallest `event_log_max_bytes`: room for a few dozen events.
pub const MIN_EVENT_LOG_MAX_BYTES: ByteSize = ByteSize(16 << 10);
/// The shortest `heartbeat_timeout`.
pub const MIN_HEARTBEAT_TIMEOUT: Interval = Interval(Duration::from_millis(100));
