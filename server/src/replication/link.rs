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

use super::bitmap::{OutOfSync, REGION};
use super::frames::{self, LinkError};
use super::keepalive::{now_us, Keepalive};
use super::plan::{self, Plan, PlanInputs};
use super::reader::FrameReader;
use super::resync::{Job, JobKind, Step};
use super::wire::{self, Ack, Auth, Hello, HelloReply, Kind, RegionCheck, ReplyStatus};
use super::{Fenced, LinkState, Phase, Primary};
use crate::buffer::{OutBuf, SharedSlice};
use crate::engine::{Engine, ReadBuffers, ReadData};
use crate::events::{self, EventKind};
use crate::journal::{Mutation, ReadBack};
use crate::sockio::{write_all, Socket};
use crate::units::Lsn;

/// Most records in one vectored send.
const SEND_BATCH: usize = 64;

/// Keeps one replica connected for as long as the volume is primary.
/// Returns only when the replica reports a newer primary: then this node
/// was replaced, and the control plane demotes it.
pub async fn run(
    vol: Rc<Engine>,
    primary: Rc<Primary>,
    link: Rc<LinkState>,
    node: String,
) -> Fenced {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let result = connect_and_stream(&vol, &primary, &link, &node).await;
        if let Err(LinkError::Fenced(epoch)) = result {
            primary.set_phase(
                &link,
                Phase::OutOfSync(format!(
                    "{} follows a newer primary (epoch {epoch})",
                    link.peer.name
                )),
            );
            return Fenced { by_epoch: epoch };
        }
        let reason = match result {
            Ok(()) => "connection closed".to_string(),
            Err(e) => e.to_string(),
        };
        primary.set_phase(&link, Phase::OutOfSync(reason));
        // Out of the stream, the link no longer keeps records in memory:
        // release them now, not at the next apply (there may be none while
        // clients wait for the buffers those records hold).
        primary.trim(vol.applied_next());
        // Nor, past half the journal, records in the journal: decided now,
        // not at the next apply, which never comes while writers wait for
        // the journal space this link pins.
        if primary.drop_retention(vol.journal().fill_ratio()) {
            vol.retention_moved();
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect_and_stream(
    vol: &Rc<Engine>,
    primary: &Rc<Primary>,
    link: &Rc<LinkState>,
    node: &str,
) -> Result<(), LinkError> {
    let hb = primary.cfg.heartbeat_timeout;
    let sock = match &primary.cfg.tls {
        Some(m) => connect_tls(link, hb, m).await?,
        None => connect(link, hb).await?,
    };
    let hello = hello(vol, primary, node);
    let hello_body = hello.encode();
    frames::send(&sock, Kind::Hello, &hello_body).await?;
    let reply_body = frames::expect(&sock, Kind::HelloReply, hb).await?;
    let reply = HelloReply::decode(&reply_body)?;
    check_reply(vol, primary, link, &reply, &hello_body)?;
    if vol.size() != hello.size {
        // A resync would rebase the replica to the size HELLO told it, and
        // stream from after the resize record: connect again instead.
        return Err(LinkError::Local(format!(
            "the volume was resized to {} bytes during the handshake; connecting again",
            vol.size()
        )));
    }
    let (start, resync) = plan_start(vol, primary, link, &reply)?;
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
    // From now on the replica's LSNs are this run's (it rebased or follows).
    link.connected_since_start.set(true);
    link.sent_next.set(start);
    link.received_next.set(start);
    link.durable_next.set(start);
    // Everything below `start` is durable on the replica; a barrier asked
    // for beyond it goes on this connection once its records are sent.
    link.barrier_sent.set(start);
    link.retain.set(true);
    primary.set_phase(link, Phase::CatchingUp);
    tracing::info!(volume = %vol.info().name, peer = %link.peer.name, "replica connected at LSN {}; sending from {start}", reply.durable);
    events::emit(EventKind::PeerConnect {
        volume: vol.info().name.clone(),
        peer: link.peer.name.clone(),
        peer_role: mirrorblk_admin::Role::Replica,
    });
    if let Some(job) = link.job.borrow().as_ref() {
        job_started(vol, link, job);
    }
    let result = stream(vol, primary, link, &sock, hb).await;
    sock.shutdown();
    end_job(vol, link, &result);
    events::emit(EventKind::PeerDisconnect {
        volume: vol.info().name.clone(),
        peer: link.peer.name.clone(),
        reason: ended_because(&result),
    });
    result
}

/// Why a connection ended, for the log and the event log.
fn ended_because(result: &Result<(), LinkError>) -> String {
    match result {
        Ok(()) => "the replica disconnected".to_string(),
        Err(e) => e.to_string(),
    }
}

/// Records in the event log that a resync or verify pass starts.
fn job_started(vol: &Engine, link: &LinkState, job: &Job) {
    let (volume, peer) = (vol.info().name.clone(), link.peer.name.clone());
    events::emit(match job.kind {
        JobKind::Resync { .. } => EventKind::ResyncStart {
            volume,
            peer,
            total_bytes: job.total_bytes,
        },
        JobKind::Verify { repair } => EventKind::VerifyStart {
            volume,
            peer,
            repair,
        },
    });
}

/// Records in the event log that a resync or verify pass ended, finished
/// or (with the reason) `aborted`.
fn job_ended(vol: &Engine, link: &LinkState, job: &Job, aborted: Option<String>) {
    let (volume, peer) = (vol.info().name.clone(), link.peer.name.clone());
    events::emit(match job.kind {
        JobKind::Resync { .. } => EventKind::ResyncEnd {
            volume,
            peer,
            completed: aborted.is_none(),
            sent_bytes: job.sent_bytes,
            ms: job.started.elapsed().as_millis() as u64,
            aborted,
        },
        JobKind::Verify { .. } => EventKind::VerifyEnd {
            volume,
            peer,
            differing: job.differing.len() as u64,
            aborted,
        },
    });
}

/// Opens the connection to the replica, within the heartbeat timeout.
async fn connect(link: &LinkState, hb: Duration) -> Result<Rc<Socket>, LinkError> {
    let stream = tokio::time::timeout(hb, tokio_uring::net::TcpStream::connect(link.peer.addr))
        .await
        .map_err(|_| LinkError::Timeout(hb))?
        .map_err(|source| LinkError::Connect {
            peer: link.peer.name.clone(),
            addr: link.peer.addr,
            source,
        })?;
    let _ = stream.set_nodelay(true);
    Ok(Rc::new(Socket::Tcp(stream)))
}

/// Opens the connection to the replica inside mutual TLS: connect and
/// handshake on a thread of their own (blocking, bounded by the heartbeat
/// timeout), then the core talks to the session's relay. The replica's
/// certificate must be signed by the cluster CA and name the address
/// dialled; a refusal is logged and recorded before any record flows.
async fn connect_tls(
    link: &LinkState,
    hb: Duration,
    m: &crate::tls::Material,
) -> Result<Rc<Socket>, LinkError> {
    let (addr, name, config) = (
        link.peer.addr,
        link.peer.name.clone(),
        m.peer_client.clone(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let who = name.clone();
    std::thread::Builder::new()
        .name("repl-tls-connect".into())
        .spawn(move || {
            let r = (|| {
                let s = std::net::TcpStream::connect_timeout(&addr, hb).map_err(|e| (true, e))?;
                let _ = s.set_nodelay(true);
                crate::tls::Transport::set_blocking(&s, true, Some(hb)).map_err(|e| (true, e))?;
                let server = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let session =
                    crate::tls::Session::connect(config, server, s).map_err(|e| (false, e))?;
                session.into_relay(&who).map_err(|e| (false, e))
            })();
            let _ = tx.send(r);
        })
        .map_err(LinkError::Io)?;
    let r = tokio::time::timeout(hb * 2, rx)
        .await
        .map_err(|_| LinkError::Timeout(hb))?
        .map_err(|_| LinkError::Io(std::io::Error::other("the TLS connect thread died")))?;
    match r {
        Ok(plain) => Ok(Rc::new(Socket::Unix(
            tokio_uring::net::UnixStream::from_std(plain),
        ))),
        Err((true, source)) => Err(LinkError::Connect {
            peer: name,
            addr,
            source,
        }),
        Err((false, e)) => {
            let reason = format!("TLS handshake: {e}");
            tracing::warn!(peer = %name, %addr, "replication peer refused: {reason}");
            events::emit(EventKind::PeerAuthFailed {
                addr: addr.to_string(),
                peer: Some(name.clone()),
                reason: reason.clone(),
            });
            Err(LinkError::Tls {
                peer: name,
                addr,
                reason,
            })
        }
    }
}

/// This primary's HELLO.
fn hello(vol: &Engine, primary: &Primary, node: &str) -> Hello {
    Hello {
        version: wire::VERSION,
        volume: vol.info().name.clone(),
        uuid: vol.journal().volume_uuid(),
        size: vol.size(),
        epoch: vol.journal().epoch().0,
        node: node.to_string(),
        nonce: frames::nonce(),
        // Plain writes wait on receipt (written, with flush barriers) only
        // in flush mode, or in sync mode with `--durability flush`.
        receipt_acks: primary.wait_for(super::Request::Write) == super::ReplicaWait::Received,
        flush_barriers: primary.flush_barriers,
    }
}

/// Checks the replica's answer: a newer epoch fences this primary, a
/// refusal ends the attempt (loudly for a split brain), and the replica
/// must prove the shared secret.
fn check_reply(
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    reply: &HelloReply,
    hello_body: &[u8],
) -> Result<(), LinkError> {
    let refused = matches!(
        reply.status,
        ReplyStatus::StaleEpoch | ReplyStatus::SplitBrain
    );
    if refused && reply.epoch > vol.journal().epoch().0 {
        tracing::error!(
            volume = %vol.info().name,
            "{} is in epoch {}, newer than this primary's {}: this node was replaced; demoting to replica",
            link.peer.name, reply.epoch, vol.journal().epoch()
        );
        return Err(LinkError::Fenced(crate::units::Epoch(reply.epoch)));
    }
    if reply.status == ReplyStatus::SplitBrain {
        tracing::error!(
            volume = %vol.info().name,
            "SPLIT BRAIN: {} is also primary in epoch {}; refusing to replicate. Run `mirrorblk --admin-socket PATH demote` on the node whose data should be discarded",
            link.peer.name, reply.epoch
        );
    }
    if reply.status != ReplyStatus::Accept {
        return Err(LinkError::Refused {
            peer: link.peer.name.clone(),
            message: reply.message.clone(),
        });
    }
    let unsigned = reply.unsigned();
    if !wire::verify_mac(
        &primary.cfg.secret,
        wire::REPLICA_LABEL,
        &[hello_body, &unsigned],
        &reply.mac,
    ) {
        events::emit(EventKind::PeerAuthFailed {
            addr: link.peer.addr.to_string(),
            peer: Some(link.peer.name.clone()),
            reason: "the replica's proof of the shared secret is wrong".into(),
        });
        return Err(LinkError::Auth {
            peer: link.peer.name.clone(),
        });
    }
    Ok(())
}

/// Streams records (and resync frames) while a task reads the ACKs; ends
/// with whichever side stops first.
async fn stream(
    vol: &Rc<Engine>,
    primary: &Rc<Primary>,
    link: &Rc<LinkState>,
    sock: &Rc<Socket>,
    hb: Duration,
) -> Result<(), LinkError> {
    let mut receiver = {
        let sock = sock.clone();
        let (vol, primary, link) = (vol.clone(), primary.clone(), link.clone());
        tokio_uring::spawn(async move { receive_acks(&sock, &vol, &primary, &link, hb).await })
    };
    let sent = send_loop(vol, primary, link, sock, hb);
    tokio::pin!(sent);
    let result = tokio::select! {
        r = &mut sent => r,
        r = &mut receiver => match r {
            Ok(r) => r,
            Err(e) => Err(LinkError::Local(format!("ack receiver failed: {e}"))),
        },
    };
    receiver.abort();
    result
}

/// The plain values [`plan::plan`] decides from.
fn plan_inputs(
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    reply: &HelloReply,
    oos: &OutOfSync,
) -> PlanInputs {
    let journal = vol.journal();
    let from = Lsn(reply.durable + 1);
    PlanInputs {
        replica_durable: Lsn(reply.durable),
        inconsistent: reply.flags.inconsistent(),
        uuid_equal: reply.uuid == journal.volume_uuid(),
        next: journal.next_lsn(),
        checkpoint: journal.checkpoint_lsn(),
        retained: journal.retained(from).is_some(),
        in_memory: primary.get(from).is_some(),
        in_place_since: journal.in_place_since(from),
        bitmap_valid: oos.is_valid(),
        bitmap_bytes: oos.bytes(),
        connected_since_start: link.connected_since_start.get(),
        startup_next: link.startup_next,
        epoch: journal.epoch(),
    }
}

/// Decides where the stream starts and which resync (if any) runs, updates
/// the link's out-of-sync bitmap (persisted before the replica is told) and
/// sets up the job. Returns (first LSN to send, whether the replica must
/// rebase its journal there).
fn plan_start(
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    reply: &HelloReply,
) -> Result<(Lsn, bool), LinkError> {
    let next = vol.journal().next_lsn();
    let from = Lsn(reply.durable + 1);
    let mut oos = link.oos.borrow_mut();
    let (plan, why) = plan::plan(&plan_inputs(vol, primary, link, reply, &oos));
    let (start, rebase, kind) = match plan {
        Plan::Stream if oos.is_valid() && oos.count() > 0 => {
            // Consistent and every later record is at hand, yet regions are
            // marked (a repair that did not finish, or marks whose clearing
            // was not persisted): compare them, sending what differs.
            (from, false, Some(JobKind::Resync { checksum: true }))
        }
        Plan::Stream => {
            // Consistent, nothing marked, every later record at hand: exact.
            oos.clear_all();
            (from, false, None)
        }
        Plan::Resume => (from, false, Some(JobKind::Resync { checksum: true })),
        Plan::Bitmap => {
            for (offset, len) in vol.journal().retained_extents(Lsn(0), next) {
                oos.mark(offset, len);
            }
            (next, true, Some(JobKind::Resync { checksum: false }))
        }
        Plan::Full => {
            oos.set_all();
            (next, true, Some(JobKind::Resync { checksum: true }))
        }
    };
    oos.persist_if_dirty().map_err(|source| LinkError::Bitmap {
        path: oos.path().to_path_buf(),
        source,
    })?;
    link.metrics.out_of_sync.set(oos.bytes() as f64);
    if plan != Plan::Stream {
        tracing::warn!(
            volume = %vol.info().name, peer = %link.peer.name,
            "{} resync of {} ({} in {} regions): {why}",
            match plan { Plan::Full => "full checksum", Plan::Bitmap => "bitmap", _ => "resumed" },
            link.peer.name,
            crate::units::ByteSize(oos.bytes()),
            oos.count()
        );
    }
    link.resync_seq.set(1);
    *link.job.borrow_mut() = kind.map(|k| Job::new(k, &oos, vol.size(), 1));
    Ok((start, rebase))
}

/// The connection ended: drop its pass (a resync is rebuilt from the
/// bitmap at the next handshake; a verify is reported as aborted) and
/// persist the bitmap's cleared bits.
fn end_job(vol: &Engine, link: &LinkState, result: &Result<(), LinkError>) {
    let job = link.job.borrow_mut().take();
    if let Some(job) = &job {
        job_ended(vol, link, job, Some(ended_because(result)));
    }
    let verifying = matches!(job.as_ref().map(|j| j.kind), Some(JobKind::Verify { .. }));
    if verifying || link.verify_request.take().is_some() {
        let why = ended_because(result);
        let mut last = link.last_verify.borrow_mut();
        if let Some(v) = last.as_mut() {
            v.running = false;
            v.aborted = Some(why);
        }
    }
    if let Err(e) = link.oos.borrow_mut().persist_if_dirty() {
        tracing::error!(volume = %vol.info().name, peer = %link.peer.name, "cannot write the out-of-sync bitmap: {e}");
    }
    link.metrics.resync_remaining.set(0.0);
}

/// An ACK moved the replica's received and durable LSNs (and perhaps its
/// resync's durable frames): wake the writers it now acknowledges.
fn on_ack(primary: &Primary, link: &LinkState, a: &Ack) -> Result<(), LinkError> {
    let received = Lsn(a.received + 1);
    let durable = Lsn(a.durable + 1);
    if received > link.sent_next.get() || durable > received {
        return Err(LinkError::Violation(format!(
            "replica acknowledged LSN {}/{} beyond what was sent ({})",
            a.received,
            a.durable,
            link.sent_next.get()
        )));
    }
    link.received_next
        .set(link.received_next.get().max(received));
    link.durable_next.set(link.durable_next.get().max(durable));
    if a.resync_durable > 0 {
        if let Some(job) = link.job.borrow_mut().as_mut() {
            let mut oos = link.oos.borrow_mut();
            job.on_durable(a.resync_durable, &mut oos);
            link.metrics.out_of_sync.set(oos.bytes() as f64);
        }
        link.wake.notify_one();
    }
    primary.changed();
    Ok(())
}

/// The replica's answer to a region checksum: a difference is marked.
fn on_region_check(link: &LinkState, c: &RegionCheck) -> Result<(), LinkError> {
    let mut job = link.job.borrow_mut();
    let Some(j) = job.as_mut() else {
        return Err(LinkError::Violation(
            "region check answer without a resync or verify".into(),
        ));
    };
    if let Some(region) = j.on_check(c.seq, c.equal).map_err(LinkError::Violation)? {
        // Persisted now: a difference found must outlive a drop of this
        // connection or a restart of either side.
        let mut oos = link.oos.borrow_mut();
        oos.set(region);
        oos.persist_if_dirty()?;
    }
    drop(job);
    link.wake.notify_one();
    Ok(())
}

async fn receive_acks(
    sock: &Socket,
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    hb: Duration,
) -> Result<(), LinkError> {
    // Only small control frames come back: read greedily, one receive for
    // as many ACKs as have arrived.
    let mut rd = FrameReader::new(sock, true)?;
    loop {
        let h = rd.header(hb).await?;
        let body = rd.body(h.len as usize, hb).await?;
        match h.kind {
            Kind::Ack => {
                let floor = primary.retention_floor();
                on_ack(primary, link, &Ack::decode(&body)?)?;
                if primary.retention_floor() != floor {
                    // The checkpoint may release more: writers waiting
                    // for journal space wait on it, and no new record
                    // wakes the applier while they wait.
                    vol.retention_moved();
                }
            }
            Kind::RegionCheck => on_region_check(link, &RegionCheck::decode(&body)?)?,
            Kind::Pong => {
                let sent = wire::decode_stamp(&body)?;
                link.rtt_us.set(now_us().saturating_sub(sent));
                link.metrics.rtt.set(link.rtt_us.get() as f64 / 1e6);
            }
            Kind::Error => {
                let e = wire::ErrorMsg::decode(&body)?;
                return Err(LinkError::Reported {
                    context: "replica reported",
                    message: e.message,
                });
            }
            other => {
                return Err(LinkError::Violation(format!(
                    "unexpected {other:?} from the replica"
                )))
            }
        }
    }
}

/// The frame header and record header of a record, as one small buffer.
fn record_head(r: &Mutation, epoch: u64) -> Vec<u8> {
    let payload_len = r.payload_len();
    let rh = wire::RecordHeader {
        lsn: r.lsn.0,
        epoch,
        op: r.op,
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

fn push_record(out: &mut Vec<OutBuf>, r: &Mutation, epoch: u64) {
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

/// The LSN a BARRIER sent now would cover, if one is due: asked for
/// (every LSN below `wanted`), not covered by one sent (below `sent`), and
/// every record it covers already sent (below `sent_next`), since the
/// replica can only sync what it has.
fn barrier_due(wanted: Lsn, sent: Lsn, sent_next: Lsn) -> Option<Lsn> {
    (wanted > sent && wanted <= sent_next).then(|| Lsn(wanted.0 - 1))
}

/// Appends the BARRIER that is due on `link`, if any, after the records in
/// `out`, and notes it sent.
fn push_barrier(out: &mut Vec<OutBuf>, link: &LinkState) {
    let wanted = link.barrier_wanted.get();
    if let Some(lsn) = barrier_due(wanted, link.barrier_sent.get(), link.sent_next.get()) {
        let body = wire::Barrier { lsn: lsn.0 }.encode();
        out.push(OutBuf::Bytes(wire::frame(Kind::Barrier, &body), 0));
        link.barrier_sent.set(wanted);
    }
}

/// Whether a record reserved but not yet sent to the replica (LSNs from
/// `sent_next` to `next`, all in the window: checks only run while the link
/// streams live records) touches `[offset, offset + len)`: a checksum taken
/// now would not match the replica's moment of the stream.
fn unsent_record_touches(
    primary: &Primary,
    sent_next: Lsn,
    next: Lsn,
    offset: u64,
    len: u64,
) -> bool {
    let front = primary
        .window
        .borrow()
        .front()
        .map(|r| r.lsn)
        .unwrap_or(next);
    let mut lsn = sent_next.max(front);
    while lsn < next {
        if let Some(r) = primary.get(lsn) {
            if r.offset < offset + len && offset < r.offset + r.length.max(1) {
                return true;
            }
        }
        lsn = lsn.next();
    }
    false
}

/// Starts the verify the operator asked for, once the replica streams live
/// (it compares the same moment of the stream on both sides, so writes may
/// go on). Returns whether a pass now runs.
fn start_requested_verify(vol: &Engine, link: &LinkState) -> bool {
    let ready = *link.phase.borrow() == Phase::InSync;
    let Some(repair) = link.verify_request.get().filter(|_| ready) else {
        return false;
    };
    link.verify_request.set(None);
    let job = Job::new(
        JobKind::Verify { repair },
        &link.oos.borrow(),
        vol.size(),
        link.resync_seq.get(),
    );
    tracing::info!(volume = %vol.info().name, peer = %link.peer.name, "verify of {} started{}", link.peer.name, if repair { " (repairing differences)" } else { "" });
    job_started(vol, link, &job);
    *link.job.borrow_mut() = Some(job);
    true
}

/// Where region `region` lies in the volume. Resizes wait for passes to
/// end; a pass outliving one ends here, and the next handshake plans with
/// the new size.
fn region_extent(vol: &Engine, region: usize) -> Result<(u64, u64), LinkError> {
    let offset = region as u64 * REGION;
    match REGION.min(vol.size().saturating_sub(offset)) {
        0 => Err(LinkError::Local(format!(
            "resync region at {offset} is past the volume's end (it was resized)"
        ))),
        len => Ok((offset, len)),
    }
}

// A region starts at a chunk boundary, as buffers taken ahead for a read
// of a region's length require.
const _: () = assert!(REGION % crate::buffer::MAX_CHUNK as u64 == 0);

/// One region of a resync or verify pass to put in the stream, with the
/// pool buffers its read goes into (taken before the step was chosen).
struct RegionStep {
    region: usize,
    /// RESYNC_CHECK (its checksum) rather than RESYNC_DATA.
    check: bool,
    bufs: ReadBuffers,
}

/// Sends one resync region (RESYNC_DATA) or its checksum (RESYNC_CHECK):
/// the primary's data as of after the last record sent. Runs inside the
/// send loop, so no record can slip between the snapshot and its place in
/// the stream. A data snapshot may already hold records reserved during the
/// read; they follow it in the stream and the replica re-applies them
/// (idempotent). A checksum must match exactly that moment, so when such a
/// record touches the region the check is deferred (returns false, nothing
/// sent). The frame's sequence number is taken from the link's job. The
/// read and the journal wait write nothing to the socket: the replica
/// hears PINGs meanwhile.
async fn resync_frame(
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    sock: &Socket,
    step: RegionStep,
    alive: &mut Keepalive,
) -> Result<bool, LinkError> {
    let RegionStep {
        region,
        check,
        bufs,
    } = step;
    let (offset, len) = region_extent(vol, region)?;
    let sent_next = link.sent_next.get();
    let after = sent_next.0.saturating_sub(1);
    let (data, next) = alive
        .during(sock, region_snapshot(vol, offset, len, check, bufs))
        .await??;
    if check && unsent_record_touches(primary, sent_next, next, offset, len) {
        if let Some(j) = link.job.borrow_mut().as_mut() {
            j.recheck(region);
        }
        return Ok(false);
    }
    let seq = match link.job.borrow_mut().as_mut() {
        Some(j) => j.sent(region, check),
        None => return Ok(false),
    };
    let rh = wire::ResyncHeader {
        after_lsn: after,
        offset,
        length: len,
        hash: data.xxh3(),
        seq,
    };
    let (kind, body) = if check {
        (Kind::ResyncCheck, wire::RESYNC_HEADER_LEN as u64)
    } else {
        (Kind::ResyncData, wire::RESYNC_HEADER_LEN as u64 + len)
    };
    let mut head = wire::frame_header(kind, body as u32).to_vec();
    head.extend_from_slice(&rh.encode());
    let mut out = vec![OutBuf::Bytes(head, 0)];
    if check {
        link.metrics.resync_checked.increment(len);
    } else {
        link.metrics.resync_sent.increment(len);
        out.extend(
            data.parts
                .into_iter()
                .map(|(b, s, e)| OutBuf::Pooled(b, s, e)),
        );
    }
    write_all(sock, out).await?;
    Ok(true)
}

/// Reads `[offset, offset + len)` into `bufs` for a resync frame. Returns
/// the data and the next LSN as of the read (taken with no await after
/// it: the records a check must not overlap are those reserved before).
/// A data snapshot may hold records not yet durable here: it goes out only
/// once they are, or a crash of this node could leave the replica with
/// writes this node then never had.
async fn region_snapshot(
    vol: &Engine,
    offset: u64,
    len: u64,
    check: bool,
    bufs: ReadBuffers,
) -> Result<(ReadData, Lsn), LinkError> {
    let data = vol
        .read_with(offset, len, bufs)
        .await
        .map_err(|e| LinkError::Local(format!("resync read at {offset} failed: {e:?}")))?;
    let next = vol.journal().next_lsn();
    if !check && next.0 > 1 {
        vol.journal()
            .wait_durable(Lsn(next.0 - 1))
            .await
            .map_err(|e| LinkError::Local(format!("journal failed: {e}")))?;
    }
    Ok((data, next))
}

/// The link's resync or verify pass ended: the link counts for
/// acknowledgements again, the bitmap's cleared bits are persisted, and
/// the outcome is logged (and kept for status, for a verify).
fn finish_job(vol: &Engine, primary: &Primary, link: &LinkState) {
    let Some(job) = link.job.borrow_mut().take() else {
        return;
    };
    // The link counts for acknowledgements again (its state code
    // leaves "resyncing"): writers it was holding may go.
    primary.changed();
    link.resync_seq.set(job.next_seq());
    if let Err(e) = link.oos.borrow_mut().persist_if_dirty() {
        tracing::error!(volume = %vol.info().name, peer = %link.peer.name, "cannot write the out-of-sync bitmap: {e}");
    }
    link.metrics.resync_remaining.set(0.0);
    job_ended(vol, link, &job, None);
    match job.kind {
        JobKind::Resync { checksum } => tracing::info!(
            volume = %vol.info().name, peer = %link.peer.name,
            "resync of {} complete: {} bytes of region data sent{} in {:.1?}",
            link.peer.name,
            job.sent_bytes,
            if checksum { format!(", {} bytes compared by checksum", job.total_bytes) } else { String::new() },
            job.started.elapsed()
        ),
        JobKind::Verify { repair } => {
            let status = job.verify_status(repair);
            tracing::info!(
                volume = %vol.info().name, peer = %link.peer.name,
                "verify of {} complete: {} differing region(s){} in {:.1?}",
                link.peer.name,
                job.differing.len(),
                if repair && !job.differing.is_empty() { ", repaired" } else { "" },
                job.started.elapsed()
            );
            *link.last_verify.borrow_mut() = Some(mirrorblk_admin::VerifyStatus {
                running: false,
                ..status
            });
        }
    }
}

/// One step of the link's resync or verify pass, if one runs and may send
/// now. Returns whether it put something in the stream.
///
/// A region's buffers are taken before its step, without waiting: the
/// records this link has yet to send hold pool buffers in the window, and
/// only this loop sending them releases those. A region read that waited
/// for a buffer could wait for ever (the loop stuck, the window full,
/// clients waiting for buffers too, nothing applied, nothing trimmed):
/// without free buffers the pass waits and the loop streams records.
async fn job_step(
    vol: &Engine,
    primary: &Primary,
    link: &LinkState,
    sock: &Socket,
    budget: &mut Budget,
    alive: &mut Keepalive,
) -> Result<bool, LinkError> {
    if link.job.borrow().is_none() {
        if !start_requested_verify(vol, link) {
            return Ok(false);
        }
        *budget = Budget::new();
    }
    let bufs = if budget.allows(primary.resync_rate.get()) {
        vol.try_read_buffers(REGION)
    } else {
        None
    };
    let may = bufs.is_some();
    let step = {
        let mut job = link.job.borrow_mut();
        let j = job.as_mut().expect("checked above");
        let live = *link.phase.borrow() == Phase::InSync;
        let step = j.next_step(&link.oos.borrow(), may, live);
        let (done, total) = j.progress();
        link.metrics.resync_remaining.set((total - done) as f64);
        step
    };
    match step {
        Step::Check(r) | Step::Data(r) => {
            let check = matches!(step, Step::Check(_));
            // A check moves 48 bytes but costs a region read on each side:
            // it spends a sixteenth of a region of the budget.
            let len = REGION.min(vol.size().saturating_sub(r as u64 * REGION));
            budget.spend(if check { len / 16 } else { len });
            let bufs = bufs.expect("a region step is only given with its buffers in hand");
            let step = RegionStep {
                region: r,
                check,
                bufs,
            };
            resync_frame(vol, primary, link, sock, step, alive).await
        }
        Step::Done | Step::Finished => {
            if step == Step::Done {
                frames::send(sock, Kind::ResyncDone, &[]).await?;
            }
            finish_job(vol, primary, link);
            Ok(true)
        }
        Step::Wait => Ok(false),
    }
}

/// The resync rate limiter: bytes allowed so far at `rate` per second,
/// with one region of burst.
struct Budget {
    since: Instant,
    spent: u64,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            since: Instant::now(),
            spent: 0,
        }
    }

    fn allows(&self, rate: u64) -> bool {
        let rate = rate.max(1 << 20);
        let allowed = (self.since.elapsed().as_secs_f64() * rate as f64) as u64 + REGION;
        self.spent < allowed
    }

    fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
    }
}

/// Sends up to [`SEND_BATCH`] records from the window, starting at the
/// link's cursor, in one vectored send.
async fn send_live(
    primary: &Primary,
    link: &LinkState,
    sock: &Socket,
    epoch: u64,
) -> Result<(), LinkError> {
    let first = link.sent_next.get();
    let mut next = first;
    let mut out = Vec::new();
    while next.0 - first.0 < SEND_BATCH as u64 {
        let Some(r) = primary.get(next) else { break };
        push_record(&mut out, &r, epoch);
        next = next.next();
    }
    assert!(next > first, "a live send starts at a record in the window");
    // Counted as sent before the write completes: the window keeps these
    // records until the send is done, because `out` holds them.
    link.sent_next.set(next);
    push_barrier(&mut out, link);
    write_all(sock, out).await?;
    Ok(())
}

/// Catch-up: the record at the cursor is no longer in memory; read it back
/// from the journal and send it.
async fn send_catch_up(
    vol: &Engine,
    link: &LinkState,
    sock: &Socket,
    epoch: u64,
    alive: &mut Keepalive,
) -> Result<(), LinkError> {
    let cursor = link.sent_next.get();
    // The read writes nothing to the socket: PINGs go meanwhile.
    let read = alive
        .during(sock, vol.journal().read_record(cursor, vol.pool()))
        .await?
        .map_err(|e| LinkError::Local(format!("catch-up read of LSN {cursor} failed: {e}")))?;
    let ReadBack::Journaled(rec) = read else {
        // Its data is only in the store, possibly overwritten since: the
        // next handshake plans a bitmap resync instead.
        return Err(LinkError::Local(format!(
            "catch-up reached LSN {cursor}, a write made in place whose data the journal does not hold; reconnecting to resync its regions"
        )));
    };
    let mut out = Vec::new();
    push_record(&mut out, &rec, epoch);
    link.sent_next.set(cursor.next());
    push_barrier(&mut out, link);
    write_all(sock, out).await?;
    Ok(())
}

/// Sends what the replica needs next, for as long as the connection lasts:
/// a resync or verify frame when one is due, live records from the window,
/// catch-up records from the journal, barriers, and PINGs, so that it never
/// stays silent for a third of the heartbeat timeout, whatever it waits for.
async fn send_loop(
    vol: &Rc<Engine>,
    primary: &Rc<Primary>,
    link: &Rc<LinkState>,
    sock: &Rc<Socket>,
    hb: Duration,
) -> Result<(), LinkError> {
    let epoch = vol.journal().epoch().0;
    let mut alive = Keepalive::new(hb / 3);
    let mut budget = Budget::new();
    loop {
        // Resync and verify frames go between records, rate-limited: at
        // most one per pass of this loop, so live records never queue
        // behind a run of regions.
        let resync_sent = job_step(vol, primary, link, sock, &mut budget, &mut alive).await?;
        if resync_sent {
            alive.sent();
        }
        let cursor = link.sent_next.get();
        let wake = link.wake.notified();
        if primary.get(cursor).is_some() {
            // Live: from memory, zero-copy, many records per send.
            if *link.phase.borrow() != Phase::InSync {
                primary.set_phase(link, Phase::InSync);
            }
            send_live(primary, link, sock, epoch).await?;
            alive.sent();
            // This link may have been all that kept those records (and
            // their buffers) in memory: release them now, not at the next
            // apply, which may be waiting for the buffers.
            primary.trim(vol.applied_next());
            continue;
        }
        if cursor < vol.journal().next_lsn() {
            send_catch_up(vol, link, sock, epoch, &mut alive).await?;
            alive.sent();
            continue;
        }
        if *link.phase.borrow() != Phase::InSync {
            primary.set_phase(link, Phase::InSync);
        }
        if resync_sent {
            continue;
        }
        // A FLUSH or FUA write whose records are all sent asks for a barrier.
        let mut out = Vec::new();
        push_barrier(&mut out, link);
        if !out.is_empty() {
            write_all(sock, out).await?;
            alive.sent();
            continue;
        }
        // Idle: wait for records, pinging so the replica knows we live.
        let mut left = alive.due_in();
        if left.is_zero() {
            alive.ping(sock).await?;
            continue;
        }
        if link.job.borrow().is_some() || link.verify_request.get().is_some() {
            left = left.min(Duration::from_millis(10));
        }
        let _ = tokio::time::timeout(left, wake).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_goes_once_every_record_it_covers_is_sent() {
        let l = |n| Lsn(n);
        // (wanted, sent, sent_next, barrier LSN)
        let table = [
            // Nothing asked, or already covered by one sent.
            (l(0), l(1), l(5), None),
            (l(5), l(5), l(9), None),
            (l(4), l(5), l(9), None),
            // Asked, and its records are sent: the barrier covers the last.
            (l(6), l(5), l(9), Some(l(5))),
            (l(9), l(1), l(9), Some(l(8))),
            // Its last record is not sent yet: not before it.
            (l(10), l(5), l(9), None),
        ];
        for (wanted, sent, sent_next, want) in table {
            assert_eq!(
                barrier_due(wanted, sent, sent_next),
                want,
                "{wanted:?} {sent:?} {sent_next:?}"
            );
        }
    }
}
