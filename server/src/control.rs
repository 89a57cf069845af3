//! The control plane's messages and routes: what the acceptors, the admin
//! socket and the main thread send to a worker core, and which core serves
//! which volume. Only control-plane modules ([`crate::node`],
//! [`crate::cores`], [`crate::admin`], [`crate::listener`]) use it; the
//! engine and replication never do.

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::admin::{Request, VolumeStatus};
use crate::listener::NewConn;
use crate::replication::accept::IncomingPrimary;

/// What a core receives from the rest of the node.
pub enum CoreMsg {
    /// A negotiated client connection for one of its volumes.
    Conn(NewConn),
    /// An admin question about its volumes.
    Admin(CoreQuery),
    /// A primary connecting to one of its (replica) volumes.
    Replica(IncomingPrimary),
    /// New resync bandwidth (bytes per second), from a reload.
    SetResyncRate(u64),
}

/// A question to a core, with where to send its answer.
pub struct CoreQuery {
    /// The request.
    pub request: Request,
    /// Where the core answers with its volumes' part (or why it refused).
    pub reply: std::sync::mpsc::SyncSender<Result<Vec<VolumeStatus>, String>>,
}

/// How many messages may wait for a core before senders wait.
pub const CORE_QUEUE: usize = 64;

/// Which core serves each volume.
#[derive(Clone, Default)]
pub struct Routes(HashMap<String, mpsc::Sender<CoreMsg>>);

impl Routes {
    /// Routes `volume` to the core behind `core`.
    pub fn insert(&mut self, volume: String, core: mpsc::Sender<CoreMsg>) {
        let old = self.0.insert(volume, core);
        assert!(old.is_none(), "a volume is routed to one core");
    }

    /// The core of `volume`.
    pub fn get(&self, volume: &str) -> Option<&mpsc::Sender<CoreMsg>> {
        self.0.get(volume)
    }
}
