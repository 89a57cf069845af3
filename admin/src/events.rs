//! The node's event log: one JSON [`Event`] per line, appended durably by the
//! daemon and read by `mirrorblk events` (as `drbdsetup events2` reads DRBD's
//! state changes).
//!
//! A line is the event's stamp (`ts`, `seq`, `node`) and, flattened beside
//! it, its kind: `{"ts":"2026-12-04T20:30:16.123Z","seq":7,"node":"n1",
//! "event":"role-change","volume":"vol0",...}`. The daemon writes and the
//! CLI parses this one type, so a field renamed here is renamed on both ends.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::states::Role;

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened: RFC 3339, UTC, milliseconds (`2026-12-04T20:30:16.123Z`).
    pub ts: String,
    /// Position in the node's log: one more than the line before it, across
    /// restarts and rotations (a gap means events were dropped).
    pub seq: u64,
    /// The node that wrote it.
    pub node: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened, with the fields of each kind of event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// The daemon started (first start or a restart for a role change).
    DaemonStart {
        /// Its process id.
        pid: u32,
        /// Its version.
        version: String,
        /// The volumes it serves.
        volumes: Vec<String>,
        /// The process it took over from at a live restart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        took_over_from: Option<u32>,
    },
    /// The daemon is stopping.
    DaemonStop {
        /// Why: the signal, or the role it restarts as.
        reason: String,
    },
    /// A volume's role changed.
    RoleChange {
        /// The volume.
        volume: String,
        /// The role it had.
        from: Role,
        /// The role it has now.
        to: Role,
        /// The epoch it has now.
        epoch: u64,
        /// Why (an admin command, the coordinator, a self-fence).
        reason: String,
    },
    /// The coordinator granted (or renewed into existence) a lease.
    LeaseGranted {
        /// The volume.
        volume: String,
        /// The lease's id.
        lease: String,
        /// Its time to live in milliseconds.
        ttl_ms: u64,
    },
    /// A lease lapsed or was revoked.
    LeaseLost {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// The fence: the primary stopped acknowledging writes (it holds them).
    WritesHeld {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// Held writes are acknowledged again.
    WritesResumed {
        /// The volume.
        volume: String,
        /// How long writes were held, in milliseconds.
        held_ms: u64,
    },
    /// The coordinator names a leader for a volume.
    LeaderSeen {
        /// The volume.
        volume: String,
        /// The leading node.
        leader: String,
        /// Its epoch.
        epoch: u64,
    },
    /// This node won an election for a volume.
    CampaignWon {
        /// The volume.
        volume: String,
        /// The epoch it leads in.
        epoch: u64,
    },
    /// Another node won an election this node took part in.
    CampaignLost {
        /// The volume.
        volume: String,
        /// The node that won.
        winner: String,
    },
    /// This node did not campaign (not in sync, behind, ...).
    CampaignRefused {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// The primary published the replicas in sync with it.
    InSyncPublished {
        /// The volume.
        volume: String,
        /// The primary's epoch.
        epoch: u64,
        /// The nodes in sync.
        replicas: Vec<String>,
    },
    /// The coordinator stopped answering.
    CoordinatorUnreachable {
        /// Why.
        reason: String,
    },
    /// The coordinator answers again.
    CoordinatorReachable {},
    /// A replication link came up (on a primary: to a replica; on a replica:
    /// from its primary).
    PeerConnect {
        /// The volume.
        volume: String,
        /// The peer node.
        peer: String,
        /// The peer's role on the link.
        peer_role: Role,
    },
    /// A replication link went down.
    PeerDisconnect {
        /// The volume.
        volume: String,
        /// The peer node.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A peer failed to prove it knows the shared secret (or this node
    /// failed to prove it to the peer).
    PeerAuthFailed {
        /// The peer's address.
        addr: String,
        /// The node name it claimed, if it got that far.
        peer: Option<String>,
        /// What failed.
        reason: String,
    },
    /// The primary stopped keeping journal records for a replica that is
    /// not in sync, because the journal passed the fill it may hold: the
    /// replica will need a bitmap resync instead of a journal catch-up.
    RetentionDropped {
        /// The volume.
        volume: String,
        /// The replica.
        peer: String,
        /// How full the journal was, in percent.
        journal_percent: u8,
    },
    /// A resync pass to a replica started.
    ResyncStart {
        /// The volume.
        volume: String,
        /// The replica.
        peer: String,
        /// Bytes of regions to check or send.
        total_bytes: u64,
    },
    /// A resync pass to a replica ended.
    ResyncEnd {
        /// The volume.
        volume: String,
        /// The replica.
        peer: String,
        /// Whether it finished (the replica is consistent).
        completed: bool,
        /// Region bytes sent.
        sent_bytes: u64,
        /// How long it ran, in milliseconds.
        ms: u64,
        /// Why it stopped early, when it did.
        aborted: Option<String>,
    },
    /// A verify pass against a replica started.
    VerifyStart {
        /// The volume.
        volume: String,
        /// The replica.
        peer: String,
        /// Whether differing regions are resynced.
        repair: bool,
    },
    /// A verify pass against a replica ended.
    VerifyEnd {
        /// The volume.
        volume: String,
        /// The replica.
        peer: String,
        /// Regions found different.
        differing: u64,
        /// Why it stopped early, when it did.
        aborted: Option<String>,
    },
    /// An NBD client attached to a volume.
    ClientAttach {
        /// The volume.
        volume: String,
        /// The client's address.
        client: String,
    },
    /// An NBD client detached.
    ClientDetach {
        /// The volume.
        volume: String,
        /// The client's address.
        client: String,
        /// Why (a clean disconnect, an error).
        reason: String,
    },
    /// A live restart was asked for (`mirrorblk restart`).
    RestartRequested {
        /// The binary to start.
        binary: String,
    },
    /// A live restart did not happen with the asked binary: the old process
    /// serves on (it failed before the hand-over) or the running binary
    /// took over instead.
    RestartFailed {
        /// Why, and what serves now.
        reason: String,
    },
    /// This process took over a live restart's listeners and connections
    /// (written by the new process once it serves).
    HandedOver {
        /// The process that handed over.
        from_pid: u32,
        /// NBD connections taken over.
        connections: usize,
        /// How long clients waited, in milliseconds.
        pause_ms: u64,
    },
    /// A connection still negotiating (NBD) or authenticating
    /// (replication) was dropped: to make room for a newcomer, at its
    /// deadline or byte bound. Rate-limited: `suppressed` drops since the
    /// previous such event were counted in metrics only.
    ConnectionDropped {
        /// `nbd` or `replication`.
        port: String,
        /// The peer's address.
        peer: String,
        /// `evicted`, `source-share`, `deadline`, `too-many-bytes`,
        /// `serving-full`.
        reason: String,
        /// Drops not recorded since the previous event.
        suppressed: u64,
    },
    /// A volume's size changed on this node: its resize record was applied
    /// (on the primary and on each replica), or a replica took the
    /// primary's size for a resync.
    Resize {
        /// The volume.
        volume: String,
        /// Its size before, in bytes.
        from: u64,
        /// Its size now, in bytes.
        to: u64,
        /// The resize record's LSN (0: taken for a resync).
        lsn: u64,
    },
    /// A point-in-time snapshot was created (its export `VOLUME@NAME` serves).
    SnapshotCreated {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
        /// The last LSN it includes.
        lsn: u64,
        /// The bound on the old data it keeps aside, in bytes.
        space: u64,
    },
    /// A snapshot broke: its export fails every read with EIO from now on
    /// (writes to the volume go on). Delete it and take a new one.
    SnapshotBroken {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
        /// Why (space bound reached, a resync, a shrink, an I/O error).
        reason: String,
    },
    /// A snapshot was deleted (its export and side file are gone).
    SnapshotDeleted {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
    /// A request on the admin socket was carried out or refused.
    AdminCommand {
        /// The request, as its JSON line.
        command: String,
        /// Whether it succeeded.
        ok: bool,
        /// Why not, when it failed.
        error: Option<String>,
    },
}

impl EventKind {
    /// The kind's word on the wire (`role-change`), also its metrics label.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::DaemonStart { .. } => "daemon-start",
            EventKind::DaemonStop { .. } => "daemon-stop",
            EventKind::RoleChange { .. } => "role-change",
            EventKind::LeaseGranted { .. } => "lease-granted",
            EventKind::LeaseLost { .. } => "lease-lost",
            EventKind::WritesHeld { .. } => "writes-held",
            EventKind::WritesResumed { .. } => "writes-resumed",
            EventKind::LeaderSeen { .. } => "leader-seen",
            EventKind::CampaignWon { .. } => "campaign-won",
            EventKind::CampaignLost { .. } => "campaign-lost",
            EventKind::CampaignRefused { .. } => "campaign-refused",
            EventKind::InSyncPublished { .. } => "in-sync-published",
            EventKind::CoordinatorUnreachable { .. } => "coordinator-unreachable",
            EventKind::CoordinatorReachable {} => "coordinator-reachable",
            EventKind::PeerConnect { .. } => "peer-connect",
            EventKind::PeerDisconnect { .. } => "peer-disconnect",
            EventKind::PeerAuthFailed { .. } => "peer-auth-failed",
            EventKind::ResyncStart { .. } => "resync-start",
            EventKind::ResyncEnd { .. } => "resync-end",
            EventKind::VerifyStart { .. } => "verify-start",
            EventKind::VerifyEnd { .. } => "verify-end",
            EventKind::ClientAttach { .. } => "client-attach",
            EventKind::ClientDetach { .. } => "client-detach",
            EventKind::AdminCommand { .. } => "admin-command",
            EventKind::RestartRequested { .. } => "restart-requested",
            EventKind::RestartFailed { .. } => "restart-failed",
            EventKind::HandedOver { .. } => "handed-over",
            EventKind::ConnectionDropped { .. } => "connection-dropped",
            EventKind::Resize { .. } => "resize",
            EventKind::SnapshotCreated { .. } => "snapshot-created",
            EventKind::SnapshotBroken { .. } => "snapshot-broken",
            EventKind::SnapshotDeleted { .. } => "snapshot-deleted",
            EventKind::RetentionDropped { .. } => "retention-dropped",
        }
    }
}

impl Event {
    /// The event as one JSON line, without its newline.
    pub fn to_line(&self) -> String {
        // Serializing plain strings, numbers and enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line of the log (without its newline).
    pub fn from_line(line: &str) -> Result<Event, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// The fields of a JSON object in the order written (serde_json's `Map`
/// sorts them), for the human rendering.
struct Fields(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(InOrder)
    }
}

/// A value as `key=value` shows it: strings bare unless they would read as
/// several words, lists comma-separated.
fn human_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"') => {
            format!("{s:?}")
        }
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(human_value).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// One line in the style of `drbdsetup events2`:
/// `2026-12-04T20:30:16.123Z n1 role-change volume=vol0 from=replica to=primary epoch=3 reason=...`
/// (absent optional fields are left out).
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.ts, self.node, self.kind.name())?;
        let json = serde_json::to_string(&self.kind).map_err(|_| fmt::Error)?;
        let Fields(fields) = serde_json::from_str(&json).map_err(|_| fmt::Error)?;
        for (key, value) in fields {
            if key == "event" || value.is_null() {
                continue;
            }
            write!(f, " {key}={}", human_value(&value))?;
        }
        Ok(())
    }
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-04T20:30:16.123Z`);
/// times before 1970 show as the epoch.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A line of the log that is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: not an event ({reason}): {text:?}")]
pub struct BadLine {
    /// Its number in the text read (from 1).
    pub line: usize,
    /// Why it does not parse.
    pub reason: String,
    /// The line, cut to 80 characters.
    pub text: String,
}

/// A line of the log that holds an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The event.
    pub event: Event,
    /// The line as written, without its newline.
    pub text: String,
}

/// Parses the complete lines at the start of `buf`; returns each one's
/// event (or why it is none) and how many bytes they took. Bytes after the
/// last newline are a line still being written (or torn by a crash) and
/// are left for the caller; empty lines are skipped.
pub fn parse_lines(buf: &[u8]) -> (Vec<Result<Line, BadLine>>, usize) {
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
    let out = buf[..complete]
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(i, l)| parse_one(i + 1, l))
        .collect();
    (out, complete)
}

fn parse_one(line: usize, bytes: &[u8]) -> Result<Line, BadLine> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match Event::from_line(text) {
        Ok(event) => Ok(Line {
            event,
            text: text.to_string(),
        }),
        Err(e) => Err(BadLine {
            line,
            reason: e.to_string(),
            text: text.chars().take(80).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        v.to_string()
    }

    /// One event of every kind.
    fn every_kind() -> Vec<EventKind> {
        let v = || s("vol0");
        vec![
            EventKind::DaemonStart {
                pid: 42,
                version: s("0.1.0"),
                volumes: vec![v()],
                took_over_from: Some(41),
            },
            EventKind::DaemonStop {
                reason: s("SIGTERM"),
            },
            EventKind::RoleChange {
                volume: v(),
                from: Role::Replica,
                to: Role::Primary,
                epoch: 3,
                reason: s("admin promote"),
            },
            EventKind::LeaseGranted {
                volume: v(),
                lease: s("694d7a"),
                ttl_ms: 5000,
            },
            EventKind::LeaseLost {
                volume: v(),
                reason: s("expired"),
            },
            EventKind::WritesHeld {
                volume: v(),
                reason: s("lease may lapse"),
            },
            EventKind::WritesResumed {
                volume: v(),
                held_ms: 812,
            },
            EventKind::LeaderSeen {
                volume: v(),
                leader: s("n2"),
                epoch: 4,
            },
            EventKind::CampaignWon {
                volume: v(),
                epoch: 5,
            },
            EventKind::CampaignLost {
                volume: v(),
                winner: s("n3"),
            },
            EventKind::CampaignRefused {
                volume: v(),
                reason: s("not in the in-sync set"),
            },
            EventKind::InSyncPublished {
                volume: v(),
                epoch: 5,
                replicas: vec![s("n2"), s("n3")],
            },
            EventKind::CoordinatorUnreachable {
                reason: s("connection refused"),
            },
            EventKind::CoordinatorReachable {},
            EventKind::PeerConnect {
                volume: v(),
                peer: s("n2"),
                peer_role: Role::Replica,
            },
            EventKind::PeerDisconnect {
                volume: v(),
                peer: s("n2"),
                reason: s("heartbeat timeout"),
            },
            EventKind::PeerAuthFailed {
                addr: s("127.0.0.1:4000"),
                peer: Some(s("n9")),
                reason: s("wrong secret"),
            },
            EventKind::ResyncStart {
                volume: v(),
                peer: s("n2"),
                total_bytes: 1 << 20,
            },
            EventKind::ResyncEnd {
                volume: v(),
                peer: s("n2"),
                completed: false,
                sent_bytes: 4096,
                ms: 30,
                aborted: Some(s("link lost")),
            },
            EventKind::VerifyStart {
                volume: v(),
                peer: s("n2"),
                repair: true,
            },
            EventKind::VerifyEnd {
                volume: v(),
                peer: s("n2"),
                differing: 1,
                aborted: None,
            },
            EventKind::ClientAttach {
                volume: v(),
                client: s("127.0.0.1:5000"),
            },
            EventKind::ClientDetach {
                volume: v(),
                client: s("127.0.0.1:5000"),
                reason: s("disconnect"),
            },
            EventKind::AdminCommand {
                command: s(r#"{"cmd":"demote"}"#),
                ok: true,
                error: None,
            },
            EventKind::RestartRequested {
                binary: s("/usr/local/bin/mirrorblkd"),
            },
            EventKind::RestartFailed {
                reason: s("exited (exit status: 1) before serving"),
            },
            EventKind::HandedOver {
                from_pid: 41,
                connections: 3,
                pause_ms: 120,
            },
            EventKind::ConnectionDropped {
                port: s("nbd"),
                peer: s("127.0.0.1:5000"),
                reason: s("evicted"),
                suppressed: 2,
            },
            EventKind::Resize {
                volume: v(),
                from: 1 << 30,
                to: 2 << 30,
                lsn: 77,
            },
            EventKind::SnapshotCreated {
                volume: v(),
                name: s("b1"),
                lsn: 41,
                space: 1 << 30,
            },
            EventKind::SnapshotBroken {
                volume: v(),
                name: s("b1"),
                reason: s("space bound reached"),
            },
            EventKind::SnapshotDeleted {
                volume: v(),
                name: s("b1"),
            },
            EventKind::RetentionDropped {
                volume: v(),
                peer: s("n2"),
                journal_percent: 51,
            },
        ]
    }

    /// Fails to compile when a kind is added and not listed in
    /// [`every_kind`] (the count below then disagrees).
    fn ordinal(k: &EventKind) -> usize {
        match k {
            EventKind::DaemonStart { .. } => 0,
            EventKind::DaemonStop { .. } => 1,
            EventKind::RoleChange { .. } => 2,
            EventKind::LeaseGranted { .. } => 3,
            EventKind::LeaseLost { .. } => 4,
            EventKind::WritesHeld { .. } => 5,
            EventKind::WritesResumed { .. } => 6,
            EventKind::LeaderSeen { .. } => 7,
            EventKind::CampaignWon { .. } => 8,
            EventKind::CampaignLost { .. } => 9,
            EventKind::CampaignRefused { .. } => 10,
            EventKind::InSyncPublished { .. } => 11,
            EventKind::CoordinatorUnreachable { .. } => 12,
            EventKind::CoordinatorReachable {} => 13,
            EventKind::PeerConnect { .. } => 14,
            EventKind::PeerDisconnect { .. } => 15,
            EventKind::PeerAuthFailed { .. } => 16,
            EventKind::ResyncStart { .. } => 17,
            EventKind::ResyncEnd { .. } => 18,
            EventKind::VerifyStart { .. } => 19,
            EventKind::VerifyEnd { .. } => 20,
            EventKind::ClientAttach { .. } => 21,
            EventKind::ClientDetach { .. } => 22,
            EventKind::AdminCommand { .. } => 23,
            EventKind::RestartRequested { .. } => 24,
            EventKind::RestartFailed { .. } => 25,
            EventKind::HandedOver { .. } => 26,
            EventKind::ConnectionDropped { .. } => 27,
            EventKind::Resize { .. } => 28,
            EventKind::SnapshotCreated { .. } => 29,
            EventKind::SnapshotBroken { .. } => 30,
            EventKind::SnapshotDeleted { .. } => 31,
            EventKind::RetentionDropped { .. } => 32,
        }
    }

    #[test]
    fn every_kind_round_trips_under_its_name() {
        let kinds = every_kind();
        let ordinals: Vec<usize> = kinds.iter().map(ordinal).collect();
        assert_eq!(ordinals, (0..33).collect::<Vec<_>>(), "one of each kind");
        for (seq, kind) in kinds.into_iter().enumerate() {
            let e = Event {
                ts: s("2026-12-04T20:30:16.123Z"),
                seq: seq as u64,
                node: s("n1"),
                kind,
            };
            let line = e.to_line();
            let tag = format!(r#""event":"{}""#, e.kind.name());
            assert!(line.contains(&tag), "{line} lacks {tag}");
            assert!(!line.contains('\n'));
            assert_eq!(Event::from_line(&line).expect("parses"), e, "{line}");
        }
    }

    #[test]
    fn the_wire_form_is_flat_and_kebab_case() {
        let e = Event {
            ts: s("2026-12-04T20:30:16.123Z"),
            seq: 9,
            node: s("n1"),
            kind: EventKind::RoleChange {
                volume: s("vol0"),
                from: Role::Replica,
                to: Role::Primary,
                epoch: 3,
                reason: s("admin promote"),
            },
        };
        assert_eq!(
            e.to_line(),
            concat!(
                r#"{"ts":"2026-12-04T20:30:16.123Z","seq":9,"node":"n1","event":"role-change","#,
                r#""volume":"vol0","from":"replica","to":"primary","epoch":3,"reason":"admin promote"}"#
            )
        );
        assert_eq!(
            e.to_string(),
            r#"2026-12-04T20:30:16.123Z n1 role-change volume=vol0 from=replica to=primary epoch=3 reason="admin promote""#
        );
    }

    #[test]
    fn the_human_form_lists_and_omits() {
        let e = Event {
            ts: s("t"),
            seq: 1,
            node: s("n1"),
            kind: EventKind::InSyncPublished {
                volume: s("v"),
                epoch: 2,
                replicas: vec![s("n2"), s("n3")],
            },
        };
        assert_eq!(
            e.to_string(),
            "t n1 in-sync-published volume=v epoch=2 replicas=n2,n3"
        );
        let e = Event {
            kind: EventKind::VerifyEnd {
                volume: s("v"),
                peer: s("n2"),
                differing: 0,
                aborted: None,
            },
            ..e
        };
        assert_eq!(
            e.to_string(),
            "t n1 verify-end volume=v peer=n2 differing=0"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        use std::time::Duration;
        let at = |ms: u64| rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_796_416_216_123), "2026-12-04T20:30:16.123Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn a_torn_last_line_is_left_and_a_bad_line_is_reported() {
        let good = Event {
            ts: s("t"),
            seq: 1,
            node: s("n1"),
            kind: EventKind::CoordinatorReachable {},
        }
        .to_line();
        let text = format!("{good}\nnot json\n\n{good}\n{{\"ts\":\"t\",\"se");
        let (lines, used) = parse_lines(text.as_bytes());
        assert_eq!(used, text.rfind('\n').unwrap() + 1, "the torn tail is left");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].as_ref().unwrap().text, good);
        assert!(lines[2].is_ok());
        let bad = lines[1].as_ref().unwrap_err();
        assert_eq!(bad.line, 2);
        assert_eq!(bad.text, "not json");
        assert_eq!(parse_lines(b"{\"torn\":").1, 0);
    }
}
