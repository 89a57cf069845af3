//! Live restart, the old process's sequence: run on the main thread once
//! the admin socket's `restart` has a successor that said HELLO, it
//! quiesces the node, passes everything on (see [`crate::handover`]), and
//! ends the process once the successor serves.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mirrorblk_admin::RestartOutcome;

use crate::handover::wire::{ConnState, State};
use crate::handover::{HandOverOrder, RestartError, Successor};
use crate::node::{HandOff, RunningNode};

/// How long the process waits for the admin connection to write the
/// restart's answer before it ends.
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The state message and the descriptors it refers to, in index order.
fn state_of(off: &HandOff, paused_at_ms: u64) -> (State, Vec<BorrowedFd<'_>>) {
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let mut listeners = Vec::new();
    for (kind, fd) in &off.listeners {
        listeners.push((*kind, fds.len() as u32));
        fds.push(fd.as_fd());
    }
    let mut conns = Vec::new();
    for q in &off.conns {
        conns.push(ConnState {
            fd: fds.len() as u32,
            unix: q.unix,
            export: q.neg.export.name.clone(),
            size: q.neg.export.size,
            transmission_flags: q.neg.transmission_flags,
            structured_replies: q.neg.structured_replies,
            extended_headers: q.neg.extended_headers,
            base_allocation: q.neg.base_allocation,
            dirty_bitmap: q.neg.dirty_bitmap,
            no_zeroes: q.neg.no_zeroes,
            leftover: q.leftover.clone(),
            peer: q.peer.clone(),
        });
        fds.push(q.fd.as_fd());
    }
    let state = State {
        from_pid: std::process::id(),
        paused_at_ms,
        closed_cleanly: off.clean,
        etcd_lease: off.etcd_lease,
        listeners,
        conns,
    };
    (state, fds)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hands `node` over to the order's successor, answers the admin
/// connection, and returns the process's exit status: 0 once a successor
/// serves (the asked binary, or the running one after it failed), 1 when
/// none does (the clients are then lost: see docs/RESTART.md).
pub fn complete(node: RunningNode, order: HandOverOrder) -> u8 {
    let HandOverOrder {
        mut successor,
        binary,
        answer,
        written,
    } = order;
    let (paused, paused_at_ms) = (Instant::now(), now_ms());
    tracing::info!(
        "restart: stopping at a request boundary and handing over to pid {}",
        successor.pid()
    );
    let off = node.hand_over();
    if !off.clean {
        tracing::warn!("restart: a core did not drain and checkpoint in time; the new process replays its journal");
    }
    let (state, fds) = state_of(&off, paused_at_ms);
    let connections = state.conns.len();
    // The successor opens the event log once it has the state: every event
    // of this process must be durable before.
    crate::events::flush();
    let outcome = match successor.hand(&state, &fds) {
        Ok(served) => {
            successor.release();
            Ok((served.pid, binary))
        }
        Err(e) => {
            successor.abandon();
            fall_back(&e, &state, &fds).map_err(|why| why.to_string())
        }
    };
    let pause_ms = paused.elapsed().as_millis() as u64;
    let (status, reply) = match outcome {
        Ok((pid, binary)) if binary.as_path() != crate::handover::running_binary() => {
            crate::notify::notify(&format!("MAINPID={pid}\nREADY=1"));
            tracing::info!(
                "restart: pid {pid} serves {connections} connections; clients paused {pause_ms} ms"
            );
            let o = RestartOutcome {
                from_pid: std::process::id(),
                pid,
                binary,
                connections,
                pause_ms,
            };
            (0, Ok(o))
        }
        Ok((pid, _)) => {
            crate::notify::notify(&format!("MAINPID={pid}\nREADY=1"));
            (0, Err(format!("the new binary failed after the hand-over; the running binary took over as pid {pid}: clients paused {pause_ms} ms, none lost")))
        }
        Err(why) => (1, Err(why)),
    };
    let _ = answer.send(reply);
    let _ = written.recv_timeout(ANSWER_LIMIT);
    status
}

/// The asked binary failed after this process let go of its volumes: hand
/// the same state to the binary this process runs, so that no client is
/// stranded.
fn fall_back(
    e: &RestartError,
    state: &State,
    fds: &[BorrowedFd<'_>],
) -> Result<(u32, std::path::PathBuf), String> {
    let running = crate::handover::running_binary();
    let why = format!("{e}; handing over to the running binary instead");
    tracing::error!("restart: {why}");
    crate::events::emit(crate::events::EventKind::RestartFailed {
        reason: why.clone(),
    });
    crate::events::flush();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let attempt = |path: &Path| -> Result<u32, RestartError> {
        let mut s = Successor::spawn(path, &args)?;
        s.wait_hello()?;
        match s.hand(state, fds) {
            Ok(served) => {
                s.release();
                Ok(served.pid)
            }
            Err(e) => {
                s.abandon();
                Err(e)
            }
        }
    };
    match attempt(&running) {
        Ok(pid) => Ok((pid, running)),
        Err(e2) => {
            tracing::error!("restart: the running binary could not take over either: {e2}; the clients are disconnected");
            Err(format!(
                "{why}; that failed too ({e2}): the clients are disconnected and the node is down"
            ))
        }
    }
}
