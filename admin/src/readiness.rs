//! Readiness as an interface: a daemon is up once its admin socket answers
//! `status` with the addresses it serves on. Supervisors (the test harness,
//! the benches, `mirrorblk demo`) poll for this instead of reading logs.

use std::path::Path;
use std::time::Duration;

use crate::client::call_within;
use crate::protocol::{Listening, Request, Response};

/// A serving daemon, as its status answer identifies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// Its process id.
    pub pid: u32,
    /// When its process image started (Unix seconds with a fraction).
    pub started_at: f64,
    /// Where it serves.
    pub listen: Listening,
}

impl Ready {
    /// The readiness a status answer carries: None from a refusal, from a
    /// daemon still starting (no addresses yet), or from one too old to say.
    pub fn from_response(resp: &Response) -> Option<Ready> {
        if !resp.ok {
            return None;
        }
        Some(Ready {
            pid: resp.pid?,
            started_at: resp.started_at?,
            listen: resp.listen.clone()?,
        })
    }

    /// Whether `self` and `other` are the same run of a daemon (a restart,
    /// including a role change's re-exec under the same pid, is another).
    pub fn same_run(&self, other: &Ready) -> bool {
        self.pid == other.pid && self.started_at == other.started_at
    }
}

/// How long one probe waits for an answer: a daemon's cores answer a status
/// within 5 s or the daemon refuses it, so this bounds a hung daemon only.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the daemon at `admin` once whether it serves; None while it is not
/// (not started, starting, or gone).
pub fn probe(admin: &Path) -> Option<Ready> {
    let resp = call_within(admin, &Request::Status, PROBE_TIMEOUT).ok()?;
    Ready::from_response(&resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pid: Option<u32>, listen: bool) -> Response {
        let mut r: Response = serde_json::from_str(
            r#"{"ok":true,"node":"n1","volumes":[],"pid":7,"started_at":1700000000.25,
                "listen":{"nbd":"127.0.0.1:4000","unix":null,"replication":"127.0.0.1:4001"}}"#,
        )
        .expect("parses");
        r.pid = pid;
        if !listen {
            r.listen = None;
        }
        r
    }

    #[test]
    fn ready_only_with_pid_start_and_addresses() {
        let ready = Ready::from_response(&status(Some(7), true)).expect("ready");
        assert_eq!(ready.pid, 7);
        assert_eq!(ready.listen.nbd.port(), 4000);
        assert_eq!(
            ready.listen.replication,
            Some("127.0.0.1:4001".parse().expect("addr"))
        );
        assert!(Ready::from_response(&status(Some(7), false)).is_none());
        assert!(Ready::from_response(&status(None, true)).is_none());
        assert!(Ready::from_response(&Response::error("no")).is_none());
    }

    #[test]
    fn a_reexec_under_the_same_pid_is_another_run() {
        let a = Ready::from_response(&status(Some(7), true)).expect("ready");
        let mut b = a.clone();
        assert!(a.same_run(&b));
        b.started_at += 0.5;
        assert!(!a.same_run(&b), "same pid, later start: a new run");
        let mut c = a.clone();
        c.pid = 8;
        assert!(!a.same_run(&c));
    }

    #[test]
    fn readiness_fields_are_left_out_when_unknown() {
        let line = serde_json::to_string(&Response::error("x")).expect("writes");
        assert_eq!(line, r#"{"ok":false,"error":"x","node":"","volumes":[]}"#);
    }
}
