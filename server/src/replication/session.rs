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
use crate::buffer::OutBuf;
use crate::journal::format::Role;
use crate::sockio::{write_all, Socket};
use crate::units::Lsn;
use crate::volume::Volume;

/// Everything a replica session needs besides the connection.
pub struct SessionContext {
    /// Shared secret.
    pub secret: Vec<u8>,
    /// This node's name.
    pub node: String,
    /// Silence limit.
    pub heartbeat_timeout: Duration,
}

fn refusal(vol: &Volume, status: ReplyStatus, message: String, node: &str) -> HelloReply {
    HelloReply {
        version: wire::VERSION,
        status,
        message,
        node: node.to_string(),
        uuid: vol.journal().volume_uuid(),
        epoch: vol.journal().epoch().0,
        durable: 0,
        role: 0,
        nonce: [0; wire::NONCE_LEN],
        mac: [0; wire::MAC_LEN],
    }
}

/// Serves one primary until it leaves or breaks the protocol.
pub async fn run(
    vol: Rc<Volume>,
    sock: Socket,
    hello: Hello,
    hello_body: Vec<u8>,
    ctx: Rc<SessionContext>,
    peer: String,
) {
    let name = vol.info().name.clone();
    let sock = Rc::new(sock);
    match serve(&vol, &sock, &hello, &hello_body, &ctx).await {
        Ok(()) => tracing::info!(volume = %name, %peer, "primary {} disconnected", hello.node),
        Err(e) => {
            tracing::warn!(volume = %name, %peer, "replication from {} ended: {e}", hello.node)
        }
    }
    sock.shutdown();
}

async fn serve(
    vol: &Rc<Volume>,
    sock: &Rc<Socket>,
    hello: &Hello,
    hello_body: &[u8],
    ctx: &SessionContext,
) -> Result<(), LinkError> {
    // Fencing: a newer primary's epoch wins. A stale primary demotes
    // itself (and comes back as a replica); a replica adopts the epoch and
    // takes a full resync, discarding whatever the new primary never had.
    if hello.epoch > vol.journal().epoch().0
        && hello.version == wire::VERSION
        && hello.size == vol.info().size
    {
        if vol.role() == Role::Primary {
            tracing::error!(
                volume = %vol.info().name,
                "primary {} has epoch {}, newer than this node's {}: this node was replaced; demoting to replica",
                hello.node, hello.epoch, vol.journal().epoch()
            );
            let r = refusal(
                vol,
                ReplyStatus::StaleEpoch,
                "this node is demoting itself to replica; connect again shortly".into(),
                &ctx.node,
            );
            let _ = frames::send(sock, Kind::HelloReply, &r.encode()).await;
            if vol.demote().await.is_ok() {
                crate::lifecycle::request_restart(Role::Replica);
            }
            return Err(LinkError::Protocol("stale primary: demoted".into()));
        }
        vol.adopt_epoch(crate::units::Epoch(hello.epoch))
            .await
            .map_err(LinkError::Protocol)?;
    }
    let my_epoch = vol.journal().epoch().0;
    let refuse = |status, msg: String| refusal(vol, status, msg, &ctx.node);
    let problem = if hello.version != wire::VERSION {
        Some(refuse(
            ReplyStatus::BadVersion,
            format!(
                "protocol version {} not spoken (this node speaks {})",
                hello.version,
                wire::VERSION
            ),
        ))
    } else if hello.size != vol.info().size {
        Some(refuse(
            ReplyStatus::SizeMismatch,
            format!(
                "volume size {} differs from this node's {}",
                hello.size,
                vol.info().size
            ),
        ))
    } else if vol.role() == Role::Primary {
        let status = if hello.epoch == my_epoch {
            ReplyStatus::SplitBrain
        } else {
            ReplyStatus::StaleEpoch
        };
        Some(refuse(
            status,
            format!(
                "this node ({}) is itself primary for '{}' in epoch {my_epoch} (you: epoch {}); two primaries must never both write: demote one (mirrorblk demote) and let it resync",
                ctx.node, hello.volume, hello.epoch
            ),
        ))
    } else if hello.epoch < my_epoch {
        Some(refuse(ReplyStatus::StaleEpoch, format!("your epoch {} is older than this node's {my_epoch}: you are a stale primary and must not write; you will demote yourself", hello.epoch)))
    } else if !vol.claim_replica_session() {
        Some(refuse(
            ReplyStatus::Busy,
            "another primary connection is active for this volume".into(),
        ))
    } else {
        None
    };
    if let Some(r) = problem {
        let msg = r.message.clone();
        frames::send(sock, Kind::HelloReply, &r.encode()).await?;
        return Err(LinkError::Protocol(format!("refused: {msg}")));
    }
    let _claim = ClaimGuard(vol.clone());

    // Records of an earlier session may still be on their way to disk: the
    // LSN we report must be durable.
    for _ in 0..1000 {
        if vol.journal().durable_next() >= vol.journal().next_lsn()
            || vol.journal().failed().is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let durable = vol.journal().durable_next().0.saturating_sub(1);
    let mut reply = HelloReply {
        version: wire::VERSION,
        status: ReplyStatus::Accept,
        message: String::new(),
        node: ctx.node.clone(),
        uuid: vol.journal().volume_uuid(),
        epoch: my_epoch,
        durable,
        // Bit 1: this replica's last resync did not finish.
        role: if vol.journal().inconsistent() { 2 } else { 0 },
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
        return Err(LinkError::Protocol(format!("primary {} failed authentication: wrong shared secret (check --secret-file on both nodes)", hello.node)));
    }
    let mut durable = durable;
    if auth.resync {
        vol.rebase_for_resync(Lsn(auth.start_lsn), hello.uuid)
            .await
            .map_err(LinkError::Protocol)?;
        durable = auth.start_lsn.saturating_sub(1);
    } else if auth.start_lsn != durable + 1 {
        return Err(LinkError::Protocol(format!(
            "primary wants to start at LSN {}, but this replica needs {}",
            auth.start_lsn,
            durable + 1
        )));
    }
    tracing::info!(volume = %vol.info().name, "replicating from primary {} (epoch {my_epoch}) from LSN {}", hello.node, auth.start_lsn);

    // Replies (ACK, PONG) go through one writer task.
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let received = Rc::new(Cell::new(Lsn(durable)));
    let bump = Rc::new(Notify::new());
    let resync = Rc::new(ResyncProgress::default());
    let writer = {
        let sock = sock.clone();
        tokio_uring::spawn(async move { write_frames(sock, rx).await })
    };
    let acker = {
        let vol = vol.clone();
        let tx = tx.clone();
        let received = received.clone();
        let bump = bump.clone();
        let resync = resync.clone();
        let keepalive = ctx.heartbeat_timeout / 3;
        let receipt_acks = hello.receipt_acks;
        tokio_uring::spawn(async move {
            ack_loop(vol, tx, received, bump, resync, receipt_acks, keepalive).await
        })
    };
    let syncer = {
        let vol = vol.clone();
        let bump = bump.clone();
        let resync = resync.clone();
        tokio_uring::spawn(async move { resync_syncer(vol, bump, resync).await })
    };
    let result = receive(vol, sock, hello, ctx, &tx, &received, &bump, &resync).await;
    acker.abort();
    syncer.abort();
    drop(tx);
    let _ = writer.await;
    result
}

/// Releases the one-session claim.
struct ClaimGuard(Rc<Volume>);

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.release_replica_session();
    }
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
async fn resync_syncer(vol: Rc<Volume>, bump: Rc<Notify>, resync: Rc<ResyncProgress>) {
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

/// Sends an ACK whenever what is durable moves (or what is received, when
/// the primary asked for `receipt_acks`), and at least every third of the
/// heartbeat timeout: the receive loop may be waiting (for its applier,
/// before a resync region) and not answer PINGs, and the primary must still
/// hear that this replica is alive. Every ACK carries the current received
/// LSN either way.
async fn ack_loop(
    vol: Rc<Volume>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    received: Rc<Cell<Lsn>>,
    bump: Rc<Notify>,
    resync: Rc<ResyncProgress>,
    receipt_acks: bool,
    keepalive: Duration,
) {
    let mut progress = vol.journal().subscribe();
    let mut last: Option<Ack> = None;
    // A fixed deadline from the last ACK sent: received-only progress (no
    // ACK without receipt_acks) must not keep pushing the keepalive away.
    let mut sent_at = tokio::time::Instant::now();
    loop {
        let ack = Ack {
            received: received.get().0,
            durable: vol.journal().durable_next().0.saturating_sub(1),
            resync_durable: resync.durable.get(),
        };
        if ack_due(last.as_ref(), &ack, receipt_acks) {
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

#[allow(clippy::too_many_arguments)]
async fn receive(
    vol: &Rc<Volume>,
    sock: &Socket,
    hello: &Hello,
    ctx: &SessionContext,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    received: &Cell<Lsn>,
    bump: &Notify,
    resync: &ResyncProgress,
) -> Result<(), LinkError> {
    let mut last_seq = 0u64;
    // Resync frames are numbered 1, 2, … on a connection, in stream order.
    let mut next_seq = |seq: u64, tx: &mpsc::UnboundedSender<Vec<u8>>| {
        if seq != last_seq + 1 {
            return Err(reject_err(
                tx,
                format!(
                    "resync frame {seq} out of order (expected {})",
                    last_seq + 1
                ),
            ));
        }
        last_seq = seq;
        Ok(())
    };
    let mut rd = FrameReader::new(sock, false)?;
    loop {
        let h = match rd.header(ctx.heartbeat_timeout).await {
            Ok(h) => h,
            Err(LinkError::Read(crate::sockio::ReadFail::Eof)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match h.kind {
            Kind::Record => {
                if (h.len as usize) < RECORD_HEADER_LEN {
                    return Err(LinkError::Protocol(
                        "record frame shorter than its header".into(),
                    ));
                }
                let mut a = [0u8; RECORD_HEADER_LEN];
                rd.exact(&mut a, ctx.heartbeat_timeout).await?;
                let rh =
                    wire::RecordHeader::decode(&a).inspect_err(|e| reject(tx, e.to_string()))?;
                if rh.payload_len() != h.len as u64 - RECORD_HEADER_LEN as u64 {
                    return Err(reject_err(
                        tx,
                        format!(
                            "record LSN {}: frame length does not match its payload",
                            rh.lsn
                        ),
                    ));
                }
                if rh.epoch != hello.epoch {
                    return Err(reject_err(
                        tx,
                        format!(
                            "record LSN {} has epoch {}, not the session's {}",
                            rh.lsn, rh.epoch, hello.epoch
                        ),
                    ));
                }
                let payload = if rh.payload_len() > 0 {
                    let p = rd
                        .payload(
                            vol.pool(),
                            rh.payload_len() as usize,
                            "record payload",
                            ctx.heartbeat_timeout,
                        )
                        .await?;
                    if p.xxh3() != rh.payload_hash {
                        return Err(reject_err(
                            tx,
                            format!("record LSN {}: payload checksum mismatch", rh.lsn),
                        ));
                    }
                    Some(p)
                } else {
                    None
                };
                match vol.accept_replicated(&rh, payload).await {
                    Ok(lsn) => {
                        received.set(lsn);
                        // Receipt alone is news only to a primary that
                        // acknowledges on it; otherwise durability wakes
                        // the ACK loop (one task wake-up per record less).
                        if hello.receipt_acks {
                            bump.notify_one();
                        }
                    }
                    Err(why) => return Err(reject_err(tx, why)),
                }
            }
            Kind::ResyncData => {
                if (h.len as usize) < wire::RESYNC_HEADER_LEN {
                    return Err(LinkError::Protocol(
                        "resync frame shorter than its header".into(),
                    ));
                }
                let hb = rd
                    .body(wire::RESYNC_HEADER_LEN, ctx.heartbeat_timeout)
                    .await?;
                let rh =
                    wire::ResyncHeader::decode(&hb).inspect_err(|e| reject(tx, e.to_string()))?;
                if rh.length != h.len as u64 - wire::RESYNC_HEADER_LEN as u64 || rh.length == 0 {
                    return Err(reject_err(
                        tx,
                        format!(
                            "resync region at {}: frame length does not match",
                            rh.offset
                        ),
                    ));
                }
                let p = rd
                    .payload(
                        vol.pool(),
                        rh.length as usize,
                        "resync data",
                        ctx.heartbeat_timeout,
                    )
                    .await?;
                if p.xxh3() != rh.hash {
                    return Err(reject_err(
                        tx,
                        format!("resync region at {}: checksum mismatch", rh.offset),
                    ));
                }
                next_seq(rh.seq, tx)?;
                at_stream_point(vol, &rh, tx)?;
                vol.write_resync_region(Lsn(rh.after_lsn), rh.offset, p)
                    .await
                    .map_err(|e| reject_err(tx, e))?;
                resync.processed.set(rh.seq);
                resync.work.notify_one();
            }
            Kind::ResyncCheck => {
                if h.len as usize != wire::RESYNC_HEADER_LEN {
                    return Err(LinkError::Protocol(
                        "resync check frame is not one resync header".into(),
                    ));
                }
                let hb = rd
                    .body(wire::RESYNC_HEADER_LEN, ctx.heartbeat_timeout)
                    .await?;
                let rh =
                    wire::ResyncHeader::decode(&hb).inspect_err(|e| reject(tx, e.to_string()))?;
                next_seq(rh.seq, tx)?;
                at_stream_point(vol, &rh, tx)?;
                let mine = vol
                    .region_hash(Lsn(rh.after_lsn), rh.offset, rh.length)
                    .await
                    .map_err(|e| reject_err(tx, e))?;
                let answer = wire::RegionCheck {
                    seq: rh.seq,
                    offset: rh.offset,
                    equal: mine == rh.hash,
                };
                let _ = tx.send(wire::frame(Kind::RegionCheck, &answer.encode()));
                resync.processed.set(rh.seq);
                resync.work.notify_one();
            }
            Kind::ResyncDone => {
                let _ = rd.body(h.len as usize, ctx.heartbeat_timeout).await?;
                vol.finish_resync().await.map_err(|e| reject_err(tx, e))?;
            }
            Kind::Ping => {
                let body = rd.body(h.len as usize, ctx.heartbeat_timeout).await?;
                let _ = tx.send(wire::frame(Kind::Pong, &body));
            }
            Kind::Error => {
                let body = rd.body(h.len as usize, ctx.heartbeat_timeout).await?;
                let e = wire::ErrorMsg::decode(&body)?;
                return Err(LinkError::Protocol(format!(
                    "primary reported: {}",
                    e.message
                )));
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected {other:?} in the record stream"
                )))
            }
        }
    }
}

/// A resync frame describes the primary's data right after the last record
/// sent before it: its `after_lsn` must be exactly the last record this
/// replica received.
fn at_stream_point(
    vol: &Volume,
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
    LinkError::Protocol(format!("rejected: {why}"))
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
