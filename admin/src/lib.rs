//! The mirrorblk admin protocol, shared by the daemon (`mirrorblkd`), the
//! admin CLI (`mirrorblk`), the integration tests and the benches.
//!
//! The daemon serves a Unix stream socket (mode 0600) speaking JSON lines:
//! each line a client sends is one [`Request`], answered by one [`Response`]
//! line. States travel as kebab-case words ("in-sync", "primary", "sync")
//! and are typed here as enums, so a client compares variants, not strings.
//!
//! - [`states`]: [`Role`], [`ReplicaState`], [`Mode`], [`OnReplicaLoss`].
//! - [`protocol`]: the request and answer messages.
//! - [`client`]: [`call`], the blocking client.
//! - [`readiness`]: [`probe`], whether a daemon serves, and where.
//! - [`events`]: [`Event`], a line of a node's event log.
//! - [`cluster`]: a node's command line, the shared secret, and a bounded
//!   wait for replicas in sync.
//!
//! This crate depends on no async runtime and not on the daemon, so linking
//! it costs a client only serde and clap.

pub mod client;
pub mod cluster;
pub mod events;
pub mod protocol;
pub mod readiness;
pub mod states;

pub use client::{call, call_within, CallError};
pub use events::{Event, EventKind};
pub use protocol::{
    ByteRange, Changes, CoordinatorStatus, Listening, ReplicaStatus, Request, Response,
    RestartOutcome, Snapshot, VerifyStatus, VolumeStatus,
};
pub use readiness::{probe, Ready};
pub use states::{Durability, Mode, OnReplicaLoss, ReplicaState, Role, UnknownName};
