//! The replica's side of a replication connection, on the volume's core.
//!
//! Answers the primary's HELLO (proving the shared secret), checks the
//! primary's proof, then journals every record in LSN order — each checked
//! for its header and payload checksums, its LSN and its epoch — and reports
//! progress with cumulative ACKs.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::frames::{self, LinkError};
use super::reader::FrameReader;
use super::wire::{self, Ack, Auth, Hello, HelloReply, Kind, ReplyStatus, RECORD_HEADER_LEN};
use super::Fenced;
use crate::buffer::OutBuf;
use crate::engine::write::Change;
use crate::engine::Engine;
use crate::events::{self, EventKind};
use crate::journal::format::Role;
use crate::sockio::{write_all, Socket};
use crate::units::Lsn;

/// Everything a replica session needs besides the connection.
pub struct SessionContext {
    /// Shared secret.
    pub secret: Vec<u8>,
    /// This node's name.
    pub node: String,
    /// Silence limit.
    pub heartbeat_timeout: Duration,
    /// Turns true when the node stops or hands over: every session ends at
    /// its next frame boundary, so no journal write of this process is in
    /// flight once the volume is closed (a successor then owns the file).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// How a session ended without a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The primary closed the connection.
    PrimaryLeft,
    /// This node stops or hands over; the primary resends what follows the
    /// last record journaled here when it reconnects.
    Stopping,
}

fn refusal(vol: &Engine, status: ReplyStatus, message: String, node: &str) -> HelloReply {
    HelloReply {
        version: wire::VERSION,
        status,
        message,
        node: node.to_string(),
        uuid: vol.journal().volume_uuid(),
        epoch: vol.journal().epoch().0,
        durable: 0,
        flags: wire::ReplyFlags::default(),
        nonce: [0; wire::NONCE_LEN],
        mac: [0; wire::MAC_LEN],
    }
}

/// The one primary connection a replica volume serves at a time.
#[derive(Default)]
pub struct SessionSlot(Cell<bool>);

impl SessionSlot {
    /// Takes the slot; None if a session holds it. Freed when the guard drops.
    pub fn claim(self: &Rc<Self>) -> Option<SlotGuard> {
        (!self.0.replace(true)).then(|| SlotGuard(self.clone()))
    }
}

/// Holds a [`SessionSlot`] until dropped.
pub struct SlotGuard(Rc<SessionSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0 .0.set(false);
    }
}

/// What a replica session needs of its volume.
pub struct ReplicaVolume {
    /// The storage engine.
    pub engine: Rc<Engine>,
    /// This node's role for the volume (a primary refuses, or is fenced).
    pub role: Role,
    /// The one-session slot.
    pub slot: Rc<SessionSlot>,
}

/// Serves one primary until it leaves or breaks the protocol. Returns
/// [`Fenced`] when this node is itself primary and a primary of a newer
/// epoch connected: the control plane then demotes it.
pub async fn run(
    vol: ReplicaVolume,
    sock: Socket,
    hello: Hello,
    hello_body: Vec<u8>,
    ctx: Rc<SessionContext>,
    peer: String,
) -> Option<Fenced> {
    let name = vol.engine.info().name.clone();
    let sock = Rc::new(sock);
    let result = serve(&vol, &sock, &hello, &hello_body, &ctx).await;
    sock.shutdown();
    match result {
        Ok(SessionEnd::PrimaryLeft) => {
            tracing::info!(volume = %name, %peer, "primary {} disconnected", hello.node)
        }
        Ok(SessionEnd::Stopping) => tracing::info!(
            volume = %name, %peer,
            "replication from {} ended at a frame boundary: this node is stopping",
            hello.node
        ),
        Err(LinkError::Fenced(by_epoch)) => return Some(Fenced { by_epoch }),
        Err(e @ LinkError::Auth { .. }) => {
            tracing::warn!(volume = %name, %peer, "replication from {} ended: {e}", hello.node);
            events::emit(EventKind::PeerAuthFailed {
                addr: peer,
                peer: Some(hello.node.clone()),
                reason: "the primary's proof of the shared secret is wrong".into(),
            });
        }
        Err(e) => {
            tracing::warn!(volume = %name, %peer, "replication from {} ended: {e}", hello.node)
        }
    }
    None
}

async fn serve(
    vol: &ReplicaVolume,
    sock: &Rc<Socket>,
    hello: &Hello,
    hello_body: &[u8],
    ctx: &SessionContext,
) -> Result<SessionEnd, LinkError> {
    let engine = &vol.engine;
    fence_or_adopt(vol, sock, hello, ctx).await?;
    let my_epoch = engine.journal().epoch().0;
    let claim = match refusal_for(vol, hello, ctx) {
        Ok(claim) => claim,
        Err(r) => {
            let msg = r.message.clone();
            frames::send(sock, Kind::HelloReply, &r.encode()).await?;
            return Err(LinkError::RefusedPeer(msg));
        }
    };
    let durable = accept(engine, sock, hello, hello_body, ctx).await?;
    tracing::info!(volume = %engine.info().name, "replicating from primary {} (epoch {my_epoch}) from LSN {}", hello.node, durable + 1);
    peer_event(engine, hello, None);

    // Replies (ACK, PONG) go through one writer task.
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let session = ReplicaSession {
        engine: engine.clone(),
        epoch: hello.epoch,
        receipt_acks: hello.receipt_acks,
        barrier: Rc::new(Cell::new(Lsn(0))),
        barrier_work: Rc::new(Notify::new()),
        timeout: ctx.heartbeat_timeout,
        tx,
        received: Rc::new(Cell::new(Lsn(durable))),
        bump: Rc::new(Notify::new()),
        resync: Rc::new(ResyncProgress::default()),
        last_seq: Cell::new(0),
    };
    let writer = {
        let sock = sock.clone();
        tokio_uring::spawn(async move { write_frames(sock, rx).await })
    };
    let tasks = SessionTasks::spawn(&session, hello, ctx);
    let result = session.receive(sock, ctx.stop.clone()).await;
    peer_event(engine, hello, Some(&result));
    tasks.abort();
    drop(session);
    let _ = writer.await;
    drop(claim);
    result
}

/// The tasks that serve a session beside its receive loop: ACKs, resync
/// durability, and journal syncs (barriers, or every write for a per-write
/// primary).
struct SessionTasks {
    acker: tokio::task::JoinHandle<()>,
    syncer: tokio::task::JoinHandle<()>,
    journal_syncer: tokio::task::JoinHandle<()>,
}

impl SessionTasks {
    fn spawn(session: &ReplicaSession, hello: &Hello, ctx: &SessionContext) -> SessionTasks {
        let engine = &session.engine;
        let acker = tokio_uring::spawn(ack_loop(
            engine.clone(),
            session.tx.clone(),
            session.received.clone(),
            session.bump.clone(),
            session.resync.clone(),
            AckFlags {
                receipt: hello.receipt_acks,
                written: hello.flush_barriers,
            },
            ctx.heartbeat_timeout / 3,
        ));
        let syncer = tokio_uring::spawn(resync_syncer(
            engine.clone(),
            session.bump.clone(),
            session.resync.clone(),
        ));
        let journal_syncer = tokio_uring::spawn(journal_syncer(
            engine.clone(),
            session.barrier.clone(),
            session.barrier_work.clone(),
            !hello.flush_barriers,
        ));
        SessionTasks {
            acker,
            syncer,
            journal_syncer,
        }
    }

    fn abort(self) {
        self.acker.abort();
        self.syncer.abort();
        self.journal_syncer.abort();
    }
}

/// Records in the event log that the primary connected (`ended` None) or
/// that its session ended.
fn peer_event(engine: &Engine, hello: &Hello, ended: Option<&Result<SessionEnd, LinkError>>) {
    let (volume, peer) = (engine.info().name.clone(), hello.node.clone());
    events::emit(match ended {
        None => EventKind::PeerConnect {
            volume,
            peer,
            peer_role: mirrorblk_admin::Role::Primary,
        },
        Some(result) => EventKind::PeerDisconnect {
            volume,
            peer,
            reason: match result {
                Ok(SessionEnd::PrimaryLeft) => "the primary disconnected".into(),
                Ok(SessionEnd::Stopping) => "this node is stopping".into(),
                Err(e) => e.to_string(),
            },
        },
    });
}

/// Fencing: a newer primary's epoch wins. A stale primary is fenced (the
/// control plane demotes it and it comes back as a replica); a replica
/// adopts the epoch and takes a full resync, discarding whatever the new
/// primary never had.
async fn fence_or_adopt(
    vol: &ReplicaVolume,
    sock: &Socket,
    hello: &Hello,
    ctx: &SessionContext,
) -> Result<(), LinkError> {
    let engine = &vol.engine;
    let newer = hello.epoch > engine.journal().epoch().0 && hello.version == wire::VERSION;
    if !newer {
        return Ok(());
    }
    let epoch = crate::units::Epoch(hello.epoch);
    if vol.role == Role::Primary {
        tracing::error!(
            volume = %engine.info().name,
            "primary {} has epoch {}, newer than this node's {}: this node was replaced; demoting to replica",
            hello.node, hello.epoch, engine.journal().epoch()
        );
        let r = refusal(
            engine,
            ReplyStatus::StaleEpoch,
            "this node is demoting itself to replica; connect again shortly".into(),
            &ctx.node,
        );
        let _ = frames::send(sock, Kind::HelloReply, &r.encode()).await;
        return Err(LinkError::Fenced(epoch));
    }
    engine.persist_role(Role::Replica, epoch, true).await?;
    tracing::warn!(volume = %engine.info().name, "adopted epoch {epoch} from a new primary; resyncing");
    Ok(())
}

/// Checks a HELLO against this node: the refusal to send, or the claimed
/// session slot.
fn refusal_for(
    vol: &ReplicaVolume,
    hello: &Hello,
    ctx: &SessionContext,
) -> Result<SlotGuard, Box<HelloReply>> {
    let engine = &vol.engine;
    let my_epoch = engine.journal().epoch().0;
    let refuse = |status, msg: String| Err(Box::new(refusal(engine, status, msg, &ctx.node)));
    if hello.version != wire::VERSION {
        return refuse(
            ReplyStatus::BadVersion,
            format!(
                "protocol version {} not spoken (this node speaks {})",
                hello.version,
                wire::VERSION
            ),
        );
    }
    // A size that differs is a resize one of the two has not seen yet: a
    // replica that catches up gets its record in the stream, one that is
    // resynced takes the primary's size as it rebases.
    if hello.size == 0 || hello.size % crate::units::BLOCK != 0 {
        return refuse(
            ReplyStatus::SizeMismatch,
            format!(
                "volume size {} is not a non-zero multiple of 4 KiB",
                hello.size
            ),
        );
    }
    if vol.role == Role::Primary {
        let status = if hello.epoch == my_epoch {
            ReplyStatus::SplitBrain
        } else {
            ReplyStatus::StaleEpoch
        };
        return refuse(status, format!(
            "this node ({}) is itself primary for '{}' in epoch {my_epoch} (you: epoch {}); two primaries must never both write: demote one (mirrorblk demote) and let it resync",
            ctx.node, hello.volume, hello.epoch
        ));
    }
    if hello.epoch < my_epoch {
        return refuse(ReplyStatus::StaleEpoch, format!("your epoch {} is older than this node's {my_epoch}: you are a stale primary and must not write; you will demote yourself", hello.epoch));
    }
    vol.slot.claim().ok_or_else(|| {
        Box::new(refusal(
            engine,
            ReplyStatus::Busy,
            "another primary connection is active for this volume".into(),
            &ctx.node,
        ))
    })
}

/// Answers an acceptable HELLO with this replica's durable LSN and its
/// proof of the secret, checks the primary's proof, and rebases when the
/// primary asks for a resync. Returns the last LSN this replica has.
async fn accept(
    engine: &Rc<Engine>,
    sock: &Socket,
    hello: &Hello,
    hello_body: &[u8],
    ctx: &SessionContext,
) -> Result<u64, LinkError> {
    // Records of an earlier session may still be on their way to disk: the
    // LSN we report must be durable.
    let journal = engine.journal();
    let target = journal.next_lsn();
    if target.0 > 1 {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            journal.wait_durable(Lsn(target.last())),
        )
        .await;
    }
    let durable = journal.durable_next().last();
    let mut reply = HelloReply {
        version: wire::VERSION,
        status: ReplyStatus::Accept,
        message: String::new(),
        node: ctx.node.clone(),
        uuid: journal.volume_uuid(),
        epoch: journal.epoch().0,
        durable,
        flags: wire::ReplyFlags::new(journal.inconsistent()),
        nonce: frames::nonce(),
        mac: [0; wire::MAC_LEN],
    };
    let unsigned = reply.unsigned();
    reply.mac = wire::mac(&ctx.secret, wire::REPLICA_LABEL, &[hello_body, &unsigned]);
    let reply_body = reply.encode();
    frames::send(sock, Kind::HelloReply, &reply_body).await?;

    let auth = Auth::decode(&frames::expect(sock, Kind::Auth, ctx.heartbeat_timeout).await?)?;
    if !wire::verify_mac(
        &ctx.secret,
        wire::PRIMARY_LABEL,
        &[hello_body, &reply_body],
        &auth.mac,
    ) {
        return Err(LinkError::Auth {
            peer: format!("primary {}", hello.node),
        });
    }
    if auth.resync {
        engine
            .rebase(Lsn(auth.start_lsn), hello.uuid, hello.size)
            .await?;
        tracing::warn!(volume = %engine.info().name, "resyncing from the primary, whose stream continues at LSN {}: this node is Inconsistent until the resync completes", auth.start_lsn);
        return Ok(auth.start_lsn.saturating_sub(1));
    }
    if auth.start_lsn != durable + 1 {
        return Err(LinkError::Violation(format!(
            "primary wants to start at LSN {}, but this replica needs {}",
            auth.start_lsn,
            durable + 1
        )));
    }
    Ok(durable)
}

async fn write_frames(sock: Rc<Socket>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(first) = rx.recv().await {
        let mut bufs = vec![OutBuf::Bytes(first, 0)];
        while let Ok(more) = rx.try_recv() {
            bufs.push(OutBuf::Bytes(more, 0));
        }
        if write_all(&sock, bufs).await.is_err() {
            return;
        }
    }
}

/// Resync frames handled, and how many of them are durable in the store.
#[derive(Default)]
struct ResyncProgress {
    /// Highest resync frame sequence number handled (written or compared).
    processed: Cell<u64>,
    /// Highest one whose effect is durable (the store was synced after it).
    durable: Cell<u64>,
    /// Woken when `processed` moves.
    work: Notify,
}

/// Makes handled resync regions durable (one store sync covers every
/// region handled before it) and lets the ACKs report them.
async fn resync_syncer(vol: Rc<Engine>, bump: Rc<Notify>, resync: Rc<ResyncProgress>) {
    loop {
        let notified = resync.work.notified();
        let target = resync.processed.get();
        if target > resync.durable.get() {
            match vol.sync_store().await {
                Ok(()) => {
                    resync.durable.set(target);
                    bump.notify_one();
                }
                Err(e) => {
                    tracing::error!(volume = %vol.info().name, "{e}; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        notified.await;
    }
}

/// What the primary negotiated about ACKs in its HELLO.
#[derive(Clone, Copy)]
struct AckFlags {
    /// ACK every advance of the received LSN (`receipt_acks`).
    receipt: bool,
    /// Report the written LSN as received (`flush_barriers`).
    written: bool,
}

/// With this node's `--durability flush` (its journal written without
/// `O_DSYNC`, durable only when synced): the LSN up to which the journal
/// must be made durable now, if it is not yet. For a primary that sends
/// barriers, up to the highest barrier received; for one that does not
/// (`every_write`: it runs per write and counts on the replica's durable
/// LSN for every write), everything written, in group syncs.
fn sync_target(
    every_write: bool,
    barrier: Lsn,
    written_next: Lsn,
    durable_next: Lsn,
) -> Option<Lsn> {
    if every_write {
        (written_next > durable_next).then(|| Lsn(written_next.0 - 1))
    } else {
        (barrier.0 > 0 && barrier >= durable_next).then_some(barrier)
    }
}

/// With this node's `--durability flush`: makes the journal durable as
/// [`sync_target`] says, one group sync at a time (the journal's syncer
/// runs it; the ACK loop reports the durable LSN as it moves). Ends when
/// the journal fails: the primary then hears no progress and its
/// heartbeat and degrade rules apply.
async fn journal_syncer(
    vol: Rc<Engine>,
    barrier: Rc<Cell<Lsn>>,
    work: Rc<Notify>,
    every_write: bool,
) {
    let journal = vol.journal();
    if journal.durability() == crate::journal::Durability::PerWrite {
        // Every record is durable once written: nothing to ask for.
        return;
    }
    let mut progress = journal.subscribe();
    loop {
        let asked = work.notified();
        let target = sync_target(
            every_write,
            barrier.get(),
            journal.written_next(),
            journal.durable_next(),
        );
        if let Some(lsn) = target {
            if let Err(e) = journal.wait_durable(lsn).await {
                tracing::error!(volume = %vol.info().name, "{e}");
                return;
            }
            continue;
        }
        tokio::select! {
            _ = asked => {}
            r = progress.changed(), if every_write => if r.is_err() { return },
        }
    }
}

/// Sends an ACK whenever what is durable moves (or what is received, when
/// the primary asked for `receipt_acks`), and at least every third of the
/// heartbeat timeout: the receive loop may be waiting (for its applier,
/// before a resync region) and not answer PINGs, and the primary must still
/// hear that this replica is alive. Every ACK carries the current received
/// LSN either way (the written one, with flush barriers).
async fn ack_loop(
    vol: Rc<Engine>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    received: Rc<Cell<Lsn>>,
    bump: Rc<Notify>,
    resync: Rc<ResyncProgress>,
    flags: AckFlags,
    keepalive: Duration,
) {
    let mut progress = vol.journal().subscribe();
    let mut last: Option<Ack> = None;
    // A fixed deadline from the last ACK sent: received-only progress (no
    // ACK without receipt_acks) must not keep pushing the keepalive away.
    let mut sent_at = tokio::time::Instant::now();
    loop {
        let journal = vol.journal();
        let ack = Ack {
            received: if flags.written {
                journal.written_next().0.saturating_sub(1)
            } else {
                received.get().0
            },
            durable: journal.durable_next().0.saturating_sub(1),
            resync_durable: resync.durable.get(),
        };
        if ack_due(last.as_ref(), &ack, flags.receipt) {
            let frame = wire::frame(Kind::Ack, &ack.encode());
            last = Some(ack);
            sent_at = tokio::time::Instant::now();
            if tx.send(frame).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = bump.notified() => {}
            r = progress.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(sent_at + keepalive) => last = None,
        }
    }
}

/// Whether `now` must be sent, after `last` was (None: nothing yet, or the
/// keepalive is due). A received LSN that moved alone is news only to a
/// primary that acknowledges writes on receipt.
fn ack_due(last: Option<&Ack>, now: &Ack, receipt_acks: bool) -> bool {
    match last {
        None => true,
        Some(l) => {
            l.durable != now.durable
                || l.resync_durable != now.resync_durable
                || (receipt_acks && l.received != now.received)
        }
    }
}

/// One replica session's receiving side: a handler per frame kind, as
/// DRBD's receiver dispatches through its command table.
struct ReplicaSession {
    engine: Rc<Engine>,
    /// The session's epoch: every record must carry it.
    epoch: u64,
    /// Whether the primary acknowledges writes on receipt (flush mode).
    receipt_acks: bool,
    /// The highest LSN a BARRIER asked to be durable.
    barrier: Rc<Cell<Lsn>>,
    /// Wakes the journal syncer on a new barrier.
    barrier_work: Rc<Notify>,
    /// Silence limit.
    timeout: Duration,
    /// Replies, through the writer task.
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// The last LSN received.
    received: Rc<Cell<Lsn>>,
    /// Wakes the ACK loop.
    bump: Rc<Notify>,
    resync: Rc<ResyncProgress>,
    /// The last resync frame's sequence number (they run 1, 2, … in stream order).
    last_seq: Cell<u64>,
}

impl ReplicaSession {
    /// Serves frames until the primary leaves, a fault, or `stop` turns
    /// true; stopping is checked only between frames, so a record being
    /// received is journaled whole before the session ends.
    async fn receive(
        &self,
        sock: &Socket,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<SessionEnd, LinkError> {
        let mut rd = FrameReader::new(sock, false)?;
        loop {
            let header = tokio::select! {
                biased;
                () = stop_signalled(&mut stop) => return Ok(SessionEnd::Stopping),
                h = rd.header(self.timeout) => h,
            };
            let h = match header {
                Ok(h) => h,
                Err(LinkError::Read(crate::sockio::ReadFail::Eof)) => {
                    return Ok(SessionEnd::PrimaryLeft)
                }
                Err(e) => return Err(e),
            };
            match h.kind {
                Kind::Record => self.on_record(&mut rd, h.len).await?,
                Kind::ResyncData => self.on_resync_data(&mut rd, h.len).await?,
                Kind::ResyncCheck => self.on_resync_check(&mut rd, h.len).await?,
                Kind::ResyncDone => {
                    let _ = rd.body(h.len as usize, self.timeout).await?;
                    self.on_resync_done().await?;
                }
                Kind::Ping => {
                    let body = rd.body(h.len as usize, self.timeout).await?;
                    let _ = self.tx.send(wire::frame(Kind::Pong, &body));
                }
                Kind::Barrier => {
                    let body = rd.body(h.len as usize, self.timeout).await?;
                    self.on_barrier(&body)?;
                }
                Kind::Error => {
                    let body = rd.body(h.len as usize, self.timeout).await?;
                    let e = wire::ErrorMsg::decode(&body)?;
                    return Err(LinkError::Reported {
                        context: "primary reported",
                        message: e.message,
                    });
                }
                other => {
                    return Err(LinkError::Violation(format!(
                        "unexpected {other:?} in the record stream"
                    )))
                }
            }
        }
    }

    /// Tells the primary why the session ends, and ends it.
    fn reject(&self, why: String) -> LinkError {
        reject_err(&self.tx, why)
    }

    async fn on_record(&self, rd: &mut FrameReader<'_>, len: u32) -> Result<(), LinkError> {
        if (len as usize) < RECORD_HEADER_LEN {
            return Err(LinkError::Violation(
                "record frame shorter than its header".into(),
            ));
        }
        let mut a = [0u8; RECORD_HEADER_LEN];
        rd.exact(&mut a, self.timeout).await?;
        let rh = wire::RecordHeader::decode(&a).inspect_err(|e| reject(&self.tx, e.to_string()))?;
        if rh.payload_len() != len as u64 - RECORD_HEADER_LEN as u64 {
            return Err(self.reject(format!(
                "record LSN {}: frame length does not match its payload",
                rh.lsn
            )));
        }
        if rh.epoch != self.epoch {
            return Err(self.reject(format!(
                "record LSN {} has epoch {}, not the session's {}",
                rh.lsn, rh.epoch, self.epoch
            )));
        }
        let payload = if rh.payload_len() > 0 {
            let p = rd
                .payload(
                    self.engine.pool(),
                    rh.payload_len() as usize,
                    "record payload",
                    self.timeout,
                )
                .await?;
            if p.xxh3() != rh.payload_hash {
                return Err(
                    self.reject(format!("record LSN {}: payload checksum mismatch", rh.lsn))
                );
            }
            Some(Rc::new(p))
        } else {
            None
        };
        let m = Change {
            op: rh.op,
            flags: rh.flags,
            offset: rh.offset,
            length: rh.length,
            payload,
        };
        let lsn = self
            .engine
            .append_replicated(Lsn(rh.lsn), m)
            .await
            .map_err(|e| self.reject(e.to_string()))?;
        self.received.set(lsn);
        // Receipt alone is news only to a primary that acknowledges on it;
        // otherwise durability wakes the ACK loop (one task wake-up per
        // record less).
        if self.receipt_acks {
            self.bump.notify_one();
        }
        Ok(())
    }

    /// A BARRIER: every record up to its LSN (all received: it follows
    /// them in the stream) is to be made durable; the journal syncer does
    /// it and the ACK loop reports it. Never waits: records keep flowing.
    fn on_barrier(&self, body: &[u8]) -> Result<(), LinkError> {
        let b = wire::Barrier::decode(body).inspect_err(|e| reject(&self.tx, e.to_string()))?;
        let received = self.received.get();
        if b.lsn > received.0 {
            return Err(self.reject(format!(
                "barrier for LSN {} beyond the last record received ({})",
                b.lsn, received.0
            )));
        }
        if Lsn(b.lsn) > self.barrier.get() {
            self.barrier.set(Lsn(b.lsn));
            self.barrier_work.notify_one();
        }
        Ok(())
    }

    /// Resync frames are numbered 1, 2, … on a connection, in stream order.
    fn next_seq(&self, seq: u64) -> Result<(), LinkError> {
        let want = self.last_seq.get() + 1;
        if seq != want {
            return Err(self.reject(format!("resync frame {seq} out of order (expected {want})")));
        }
        self.last_seq.set(seq);
        Ok(())
    }

    /// Reads a resync header, checks its sequence number and stream point.
    async fn resync_header(
        &self,
        rd: &mut FrameReader<'_>,
    ) -> Result<wire::ResyncHeader, LinkError> {
        let hb = rd.body(wire::RESYNC_HEADER_LEN, self.timeout).await?;
        wire::ResyncHeader::decode(&hb).map_err(|e| {
            reject(&self.tx, e.to_string());
            LinkError::Wire(e)
        })
    }

    fn resync_handled(&self, seq: u64) {
        self.resync.processed.set(seq);
        self.resync.work.notify_one();
    }

    async fn on_resync_data(&self, rd: &mut FrameReader<'_>, len: u32) -> Result<(), LinkError> {
        if (len as usize) < wire::RESYNC_HEADER_LEN {
            return Err(LinkError::Violation(
                "resync frame shorter than its header".into(),
            ));
        }
        let rh = self.resync_header(rd).await?;
        if rh.length != len as u64 - wire::RESYNC_HEADER_LEN as u64 || rh.length == 0 {
            return Err(self.reject(format!(
                "resync region at {}: frame length does not match",
                rh.offset
            )));
        }
        let p = rd
            .payload(
                self.engine.pool(),
                rh.length as usize,
                "resync data",
                self.timeout,
            )
            .await?;
        if p.xxh3() != rh.hash {
            return Err(self.reject(format!("resync region at {}: checksum mismatch", rh.offset)));
        }
        self.next_seq(rh.seq)?;
        at_stream_point(&self.engine, &rh, &self.tx)?;
        self.engine
            .write_region(Lsn(rh.after_lsn), rh.offset, p)
            .await
            .map_err(|e| self.reject(e.to_string()))?;
        self.resync_handled(rh.seq);
        Ok(())
    }

    async fn on_resync_check(&self, rd: &mut FrameReader<'_>, len: u32) -> Result<(), LinkError> {
        if len as usize != wire::RESYNC_HEADER_LEN {
            return Err(LinkError::Violation(
                "resync check frame is not one resync header".into(),
            ));
        }
        let rh = self.resync_header(rd).await?;
        self.next_seq(rh.seq)?;
        at_stream_point(&self.engine, &rh, &self.tx)?;
        let mine = self
            .engine
            .region_hash(Lsn(rh.after_lsn), rh.offset, rh.length)
            .await
            .map_err(|e| self.reject(e.to_string()))?;
        let answer = wire::RegionCheck {
            seq: rh.seq,
            offset: rh.offset,
            equal: mine == rh.hash,
        };
        let _ = self
            .tx
            .send(wire::frame(Kind::RegionCheck, &answer.encode()));
        self.resync_handled(rh.seq);
        Ok(())
    }

    async fn on_resync_done(&self) -> Result<(), LinkError> {
        self.engine
            .finish_resync()
            .await
            .map_err(|e| self.reject(e.to_string()))?;
        tracing::info!(volume = %self.engine.info().name, "resync complete: this node is consistent");
        Ok(())
    }
}

/// A resync frame describes the primary's data right after the last record
/// sent before it: its `after_lsn` must be exactly the last record this
/// replica received.
fn at_stream_point(
    vol: &Engine,
    rh: &wire::ResyncHeader,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
) -> Result<(), LinkError> {
    let next = vol.journal().next_lsn().0;
    if rh.after_lsn.checked_add(1) != Some(next) {
        return Err(reject_err(
            tx,
            format!(
                "resync frame {} is for the stream after LSN {}, but this replica received up to LSN {}",
                rh.seq,
                rh.after_lsn,
                next.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// Resolves once `stop` is true; never, when its sender is gone (the core
/// outlives its sessions, so that only happens while the core ends).
async fn stop_signalled(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn reject(tx: &mpsc::UnboundedSender<Vec<u8>>, why: String) {
    let _ = tx.send(wire::frame(
        Kind::Error,
        &wire::ErrorMsg {
            code: 100,
            message: why,
        }
        .encode(),
    ));
}

fn reject_err(tx: &mpsc::UnboundedSender<Vec<u8>>, why: String) -> LinkError {
    reject(tx, why.clone());
    LinkError::Rejected(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(received: u64, durable: u64, resync_durable: u64) -> Ack {
        Ack {
            received,
            durable,
            resync_durable,
        }
    }

    #[test]
    fn a_flush_durability_replica_syncs_what_its_primary_counts_on() {
        let l = |n| Lsn(n);
        // (every write, barrier, written next, durable next, target)
        let table = [
            // With barriers: only up to the highest barrier not yet durable.
            (false, l(0), l(10), l(1), None),
            (false, l(5), l(10), l(3), Some(l(5))),
            (false, l(5), l(10), l(5), Some(l(5))),
            (false, l(5), l(10), l(6), None),
            (false, l(5), l(10), l(10), None),
            // A per-write primary sends none: everything written, always.
            (true, l(0), l(10), l(3), Some(l(9))),
            (true, l(0), l(10), l(10), None),
            (true, l(7), l(1), l(1), None),
        ];
        for (every, barrier, written, durable, want) in table {
            assert_eq!(
                sync_target(every, barrier, written, durable),
                want,
                "{every} {barrier:?} {written:?} {durable:?}"
            );
        }
    }

    #[test]
    fn receipt_alone_is_acked_only_when_the_primary_waits_on_it() {
        let last = ack(10, 8, 0);
        // Nothing sent yet, or the keepalive: always.
        assert!(ack_due(None, &last, false));
        // Only the received LSN moved.
        assert!(!ack_due(Some(&last), &ack(12, 8, 0), false));
        assert!(ack_due(Some(&last), &ack(12, 8, 0), true));
        // Durability or resync progress moved: always.
        assert!(ack_due(Some(&last), &ack(12, 9, 0), false));
        assert!(ack_due(Some(&last), &ack(10, 8, 1), false));
        // Nothing moved: never.
        assert!(!ack_due(Some(&last), &ack(10, 8, 0), true));
    }
}
