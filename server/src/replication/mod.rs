//! Replication: the primary mirrors every journal record to its replicas.
//!
//! [`wire`] is the protocol codec (see `docs/REPLICATION.md`).

pub mod wire;
