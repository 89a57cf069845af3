//! The primary's side of one (volume, replica) connection, on the volume's core.
//!
//! Connects (with backoff), proves the shared secret and checks the
//! replica's proof, decides where the stream starts (the replica's durable
//! LSN + 1), then sends records in LSN order: from the in-memory window when
//! they are still there (the payload buffers the client's data was read into:
//! no copy), otherwise read back from the journal file (catch-up). Acks move
//! the link's progress; silence past the heartbeat timeout ends the link.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::frames::{self, LinkError};
use super::wire::{self, Ack, Auth, Hello, HelloReply, Kind, ReplyStatus};
use super::{LinkState, Phase, Primary};
use crate::buffer::{OutBuf, SharedSlice};
use crate::journal::format::RecordOp;
use crate::journal::Record;
use crate::sockio::{write_all, Socket};
use crate::units::Lsn;
use crate::volume::Volume;

/// Most records in one vectored send.
const SEND_BATCH: usize = 64;

/// Keeps one replica connected for as long as the volume is primary.
pub async fn run(vol: Rc<Volume>, primary: Rc<Primary>, link: Rc<LinkState>, node: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let result = connect_and_stream(&vol, &primary, &link, &node).await;
        let reason = match result {
            Ok(()) => "connection closed".to_string(),
            Err(e) => e.to_string(),
        };
        primary.set_phase(&link, Phase::OutOfSync(reason));
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn op_code(op: RecordOp) -> u8 {
    match op {
        RecordOp::Write => 1,
        RecordOp::Trim => 2,
        RecordOp::WriteZeroes => 3,
        RecordOp::Pad => unreachable!("pads are never replicated"),
    }
}

async fn connect_and_stream(
    vol: &Rc<Volume>,
    primary: &Rc<Primary>,
    link: &Rc<LinkState>,
    node: &str,
) -> Result<(), LinkError> {
    let hb = primary.cfg.heartbeat_timeout;
    let stream = tokio::time::timeout(hb, tokio_uring::net::TcpStream::connect(link.peer.addr))
        .await
        .map_err(|_| LinkError::Timeout(hb))?
        .map_err(|e| {
            LinkError::Protocol(format!(
                "cannot connect to {} at {}: {e}",
                link.peer.name, link.peer.addr
            ))
        })?;
    let _ = stream.set_nodelay(true);
    let sock = Rc::new(Socket::Tcp(stream));
    let hello = Hello {
        version: wire::VERSION,
        volume: vol.info().name.clone(),
        uuid: vol.journal().volume_uuid(),
        size: vol.info().size,
        epoch: vol.journal().epoch().0,
        node: node.to_string(),
        nonce: frames::nonce(),
    };
    let hello_body = hello.encode();
    frames::send(&sock, Kind::Hello, &hello_body).await?;
    let reply_body = frames::expect(&sock, Kind::HelloReply, hb).await?;
    let reply = HelloReply::decode(&reply_body)?;
    if matches!(
        reply.status,
        ReplyStatus::StaleEpoch | ReplyStatus::SplitBrain
    ) && reply.epoch > vol.journal().epoch().0
    {
        tracing::error!(
            volume = %vol.info().name,
            "{} is in epoch {}, newer than this primary's {}: this node was replaced; demoting to replica",
            link.peer.name, reply.epoch, vol.journal().epoch()
        );
        if vol.demote().await.is_ok() {
            crate::lifecycle::request_restart(crate::journal::format::Role::Replica);
        }
        return Err(LinkError::Protocol("stale primary: demoting".into()));
    }
    if reply.status == ReplyStatus::SplitBrain {
        tracing::error!(
            volume = %vol.info().name,
            "SPLIT BRAIN: {} is also primary in epoch {}; refusing to replicate. Run `mirrorblk --admin-socket PATH demote` on the node whose data should be discarded",
            link.peer.name, reply.epoch
        );
    }
    if reply.status != ReplyStatus::Accept {
        return Err(LinkError::Protocol(format!(
            "{} refused: {}",
            link.peer.name, reply.message
        )));
    }
    let unsigned = reply.unsigned();
    if !wire::verify_mac(
        &primary.cfg.secret,
        wire::REPLICA_LABEL,
        &[&hello_body, &unsigned],
        &reply.mac,
    ) {
        return Err(LinkError::Protocol(format!(
            "{} failed authentication: wrong shared secret (check --secret-file on both nodes)",
            link.peer.name
        )));
    }
    let next = vol.journal().next_lsn();
    let mut start = Lsn(reply.durable + 1);
    let inconsistent = reply.role & 2 != 0;
    let catchable = start <= next
        && (start == next
            || primary.get(start).is_some()
            || vol.journal().retained(start).is_some());
    // A replica whose volume UUID differs was never a copy of this volume:
    // new, or re-created. Its data is unknown, whatever its LSN says.
    let unknown = reply.uuid != vol.journal().volume_uuid();
    let resync = inconsistent || unknown || !catchable;
    if resync {
        let why = if unknown {
            "it is new (or its volume was re-created): its data is unknown".to_string()
        } else if inconsistent {
            "its last resync did not finish".to_string()
        } else if start > next {
            format!("it has records up to LSN {}, beyond this primary's {} (it followed another primary)", reply.durable, next.0.saturating_sub(1))
        } else {
            format!(
                "it is at LSN {}, but this primary's journal now starts at LSN {}",
                reply.durable,
                vol.journal().checkpoint_lsn()
            )
        };
        tracing::warn!(volume = %vol.info().name, peer = %link.peer.name, "full resync of {}: {why}", link.peer.name);
        start = next;
    }
    let auth = Auth {
        mac: wire::mac(
            &primary.cfg.secret,
            wire::PRIMARY_LABEL,
            &[&hello_body, &reply_body],
        ),
        start_lsn: start.0,
        resync,
    };
    frames::send(&sock, Kind::Auth, &auth.encode()).await?;
    link.sent_next.set(start);
    link.received_next.set(start);
    link.durable_next.set(start);
    link.retain.set(true);
    link.resync.set(resync.then_some((0, vol.info().size)));
    primary.set_phase(link, Phase::CatchingUp);
    tracing::info!(volume = %vol.info().name, peer = %link.peer.name, "replica connected at LSN {}; sending from {start}", reply.durable);

    let receiver = {
        let sock = sock.clone();
        let primary = primary.clone();
        let link = link.clone();
        tokio_uring::spawn(async move { receive_acks(&sock, &primary, &link, hb).await })
    };
    let sent = send_loop(vol, primary, link, &sock, hb);
    tokio::pin!(sent);
    let mut receiver = receiver;
    let result = tokio::select! {
        r = &mut sent => r,
        r = &mut receiver => match r {
            Ok(r) => r,
            Err(e) => Err(LinkError::Protocol(format!("ack receiver failed: {e}"))),
        },
    };
    receiver.abort();
    sock.shutdown();
    result
}

async fn receive_acks(
    sock: &Socket,
    primary: &Primary,
    link: &LinkState,
    hb: Duration,
) -> Result<(), LinkError> {
    loop {
        let h = frames::read_header(sock, hb).await?;
        let body = frames::read_body(sock, h.len, hb).await?;
        match h.kind {
            Kind::Ack => {
                let a = Ack::decode(&body)?;
                let received = Lsn(a.received + 1);
                let durable = Lsn(a.durable + 1);
                if received > link.sent_next.get() || durable > received {
                    return Err(LinkError::Protocol(format!(
                        "replica acknowledged LSN {}/{} beyond what was sent ({})",
                        a.received,
                        a.durable,
                        link.sent_next.get()
                    )));
                }
                link.received_next
                    .set(link.received_next.get().max(received));
                link.durable_next.set(link.durable_next.get().max(durable));
                link.metrics.lag_lsn.set(
                    link.sent_next
                        .get()
                        .0
                        .saturating_sub(link.durable_next.get().0) as f64,
                );
                primary.progress.notify_waiters();
            }
            Kind::Pong => {
                let sent = wire::decode_stamp(&body)?;
                link.rtt_us.set(now_us().saturating_sub(sent));
                link.metrics.rtt.set(link.rtt_us.get() as f64 / 1e6);
            }
            Kind::Error => {
                let e = wire::ErrorMsg::decode(&body)?;
                return Err(LinkError::Protocol(format!(
                    "replica reported: {}",
                    e.message
                )));
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected {other:?} from the replica"
                )))
            }
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The frame header and record header of a record, as one small buffer.
fn record_head(r: &Record, epoch: u64) -> Vec<u8> {
    let payload_len = if r.op == RecordOp::Write { r.length } else { 0 };
    let rh = wire::RecordHeader {
        lsn: r.lsn.0,
        epoch,
        op: op_code(r.op),
        flags: r.flags,
        offset: r.offset,
        length: r.length,
        payload_hash: r.payload_hash,
    };
    let mut v = Vec::with_capacity(wire::FRAME_HEADER_LEN + wire::RECORD_HEADER_LEN);
    v.extend_from_slice(&wire::frame_header(
        Kind::Record,
        (wire::RECORD_HEADER_LEN as u64 + payload_len) as u32,
    ));
    v.extend_from_slice(&rh.encode());
    v
}

fn push_record(out: &mut Vec<OutBuf>, r: &Record, epoch: u64) {
    out.push(OutBuf::Bytes(record_head(r, epoch), 0));
    if let Some(p) = &r.payload {
        for i in 0..p.chunk_count() {
            out.push(OutBuf::Shared(SharedSlice::new(
                p.clone(),
                i,
                0,
                p.chunk_len(i),
            )));
        }
    }
}

/// Size of one resync region.
const REGION: u64 = 1 << 20;

/// Sends one resync region: the primary's data as of after the last record
/// sent. Runs inside the send loop, so no record can slip between the
/// snapshot and its place in the stream; records reserved during the read
/// are sent after it and re-applied by the replica (idempotent).
async fn resync_step(
    vol: &Volume,
    link: &LinkState,
    sock: &Socket,
    offset: u64,
) -> Result<u64, LinkError> {
    let len = REGION.min(vol.info().size - offset);
    let after = link.sent_next.get().0.saturating_sub(1);
    let data = vol
        .read(offset, len)
        .await
        .map_err(|e| LinkError::Protocol(format!("resync read at {offset} failed: {e:?}")))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (b, s, e) in &data.parts {
        h.update(&b[*s..*e]);
    }
    let rh = wire::ResyncHeader {
        after_lsn: after,
        offset,
        length: len,
        hash: h.digest(),
    };
    let mut head = wire::frame_header(
        Kind::ResyncData,
        (wire::RESYNC_HEADER_LEN as u64 + len) as u32,
    )
    .to_vec();
    head.extend_from_slice(&rh.encode());
    let mut out = vec![OutBuf::Bytes(head, 0)];
    out.extend(
        data.parts
            .into_iter()
            .map(|(b, s, e)| OutBuf::Fixed(b, s, e)),
    );
    write_all(sock, out).await?;
    Ok(offset + len)
}

async fn send_loop(
    vol: &Rc<Volume>,
    primary: &Rc<Primary>,
    link: &Rc<LinkState>,
    sock: &Rc<Socket>,
    hb: Duration,
) -> Result<(), LinkError> {
    let epoch = vol.journal().epoch().0;
    let ping_every = hb / 3;
    let mut last_send = Instant::now();
    let resync_started = Instant::now();
    loop {
        if let Some((done, total)) = link.resync.get() {
            // Rate-limited: a region whenever the budget allows, live records in between.
            let rate = primary.resync_rate.get().max(1 << 20);
            let allowed = (resync_started.elapsed().as_secs_f64() * rate as f64) as u64 + REGION;
            if done < total && done < allowed {
                let next = resync_step(vol, link, sock, done).await?;
                link.resync.set(Some((next, total)));
                link.metrics.resync_remaining.set((total - next) as f64);
                last_send = Instant::now();
                continue;
            }
            if done >= total {
                frames::send(sock, Kind::ResyncDone, &[]).await?;
                link.resync.set(None);
                tracing::info!(
                    volume = %vol.info().name,
                    peer = %link.peer.name,
                    "resync of {} sent ({} bytes in {:.1?})",
                    link.peer.name,
                    total,
                    resync_started.elapsed()
                );
                continue;
            }
        }
        let cursor = link.sent_next.get();
        let wake = link.wake.notified();
        if let Some(first) = primary.get(cursor) {
            // Live: from memory, zero-copy, many records per send.
            if *link.phase.borrow() != Phase::InSync {
                primary.set_phase(link, Phase::InSync);
            }
            let mut out = Vec::new();
            push_record(&mut out, &first, epoch);
            let mut next = cursor.next();
            let mut n = 1;
            while n < SEND_BATCH {
                match primary.get(next) {
                    Some(r) => {
                        push_record(&mut out, &r, epoch);
                        next = next.next();
                        n += 1;
                    }
                    None => break,
                }
            }
            // Counted as sent before the write completes: the window keeps
            // these records until the send is done, because `out` holds them.
            link.sent_next.set(next);
            write_all(sock, out).await?;
            last_send = Instant::now();
            continue;
        }
        if cursor < vol.journal().next_lsn() {
            // Catch-up: no longer in memory, read it back from the journal.
            let (h, payload) = vol
                .journal()
                .read_record(cursor, vol.pool())
                .await
                .map_err(|e| {
                    LinkError::Protocol(format!("catch-up read of LSN {cursor} failed: {e}"))
                })?;
            let rec = Record {
                lsn: h.lsn,
                op: h.op,
                flags: h.flags,
                offset: h.offset,
                length: h.length,
                payload: payload.map(Rc::new),
                payload_hash: h.payload_hash,
                pos: 0,
                pad_before: 0,
                record_len: 0,
            };
            let mut out = Vec::new();
            push_record(&mut out, &rec, epoch);
            link.sent_next.set(cursor.next());
            write_all(sock, out).await?;
            last_send = Instant::now();
            continue;
        }
        if *link.phase.borrow() != Phase::InSync {
            primary.set_phase(link, Phase::InSync);
        }
        // Idle: wait for records, pinging so the replica knows we live.
        let mut left = ping_every.saturating_sub(last_send.elapsed());
        if link.resync.get().is_some() {
            left = left.min(Duration::from_millis(10));
        }
        if ping_every.saturating_sub(last_send.elapsed()).is_zero() {
            frames::send(sock, Kind::Ping, &now_us().to_le_bytes()).await?;
            last_send = Instant::now();
            continue;
        }
        let _ = tokio::time::timeout(left, wake).await;
    }
}
