//! mirrorblk's use of etcd: a small blocking client of etcd's v3 JSON
//! gateway ([`client`], over [`http`]) and the records mirrorblk keeps there
//! ([`records`]).
//!
//! Why the JSON gateway and not gRPC: the gateway is part of every etcd
//! since 3.4 (Debian's `etcd-server` included), needs no code generation
//! (so no `protoc` at build time) and no async runtime, and the calls a
//! coordinator makes — grant, keep-alive, read, compare-and-swap — are a
//! handful of small requests per second. Watches are replaced by polling the
//! leader key at a fraction of the lease TTL, which bounds how late a node
//! learns of a change.

#![warn(missing_docs)]

pub mod client;
pub mod http;
pub mod records;

pub use client::{Client, Compare, EtcdError, KeyValue, LeaseId, Op, TxnOutcome};
pub use records::{InSyncRecord, LeaderRecord, MalformedRecord, NodeRecord, VolumeKeys};
