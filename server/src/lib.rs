//! mirrorblk's daemon as a library: everything `mirrorblkd` is made of, and the
//! one definition of the journal format the admin tools read.
//!
//! The data path reads top to bottom: [`listener`] (accept, NBD handshake) →
//! [`export`] (requests and replies on the volume's core) → [`volume`]
//! (LSN order, overlay, applier) → [`journal`] (group commit) and [`store`]
//! (the data file or device), all on io_uring with buffers from [`buffer`].

#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod buffer;
pub mod busy_poll;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod core_runtime;
pub mod cores;
pub mod engine;
pub mod events;
pub mod export;
pub mod handover;
pub mod journal;
pub mod lease_fence;
pub mod lifecycle;
pub mod listener;
pub mod lsn_gate;
pub mod node;
pub mod notify;
pub mod overlay;
pub mod replication;
pub mod restart;
pub mod sockio;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod volume;
