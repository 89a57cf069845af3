//! Launching a replicated volume's nodes, shared by `mirrorblk demo`, the
//! integration tests and the benches: a node's command line from its
//! [`NodeSpec`], the shared secret ([`write_secret`]), and a bounded wait
//! until a primary's replicas are in sync ([`wait_in_sync`]).
//!
//! Starting and supervising the processes stays with each caller (they log,
//! retry and stop differently); readiness is [`crate::probe`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::call_within;
use crate::protocol::{Request, VolumeStatus};
use crate::states::{Mode, Role};

/// How often [`wait_in_sync`] asks the primary.
const SYNC_POLL: Duration = Duration::from_millis(50);
/// How long one status request of [`wait_in_sync`] may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// One `mirrorblkd` of a replicated (or standalone) volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// `--node`.
    pub name: String,
    /// `--export`: the volume's name.
    pub export: String,
    /// `--data`: the data store.
    pub data: PathBuf,
    /// `--journal`.
    pub journal: PathBuf,
    /// `--size` (bytes, or with a K/M/G suffix).
    pub size: String,
    /// `--journal-size`, when not the default.
    pub journal_size: Option<String>,
    /// `--listen`: the NBD address (`127.0.0.1:0` for any free port).
    pub listen: String,
    /// `--admin-socket`.
    pub admin: Option<PathBuf>,
    /// `--role` (None: the role the journal last had).
    pub role: Option<Role>,
    /// `--replication-listen`, on a node a primary connects to.
    pub replication_listen: Option<String>,
    /// `--peer NAME=ADDR`, on a primary: its replicas.
    pub peers: Vec<(String, String)>,
    /// `--secret-file`.
    pub secret: Option<PathBuf>,
    /// `--mode`, on a primary.
    pub mode: Option<Mode>,
    /// Anything else, appended last.
    pub extra: Vec<OsString>,
}

impl NodeSpec {
    /// The whole command line: [`NodeSpec::volume_args`], then
    /// [`NodeSpec::replication_args`], then `extra`.
    pub fn args(&self) -> Vec<OsString> {
        let mut a = self.volume_args();
        a.extend(self.replication_args());
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The node, its volume, listener and admin socket.
    pub fn volume_args(&self) -> Vec<OsString> {
        let mut a = flags([("--node", self.name.as_str()), ("--export", &self.export)]);
        a.extend([
            "--data".into(),
            self.data.clone().into(),
            "--journal".into(),
            self.journal.clone().into(),
        ]);
        a.extend(flags([("--size", self.size.as_str())]));
        if let Some(js) = &self.journal_size {
            a.extend(flags([("--journal-size", js.as_str())]));
        }
        a.extend(flags([("--listen", self.listen.as_str())]));
        if let Some(admin) = &self.admin {
            a.extend(["--admin-socket".into(), admin.clone().into()]);
        }
        a
    }

    /// Its role and replication: `--role`, `--replication-listen`, each
    /// `--peer`, `--secret-file` and `--mode`, those that are set.
    pub fn replication_args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        if let Some(role) = self.role {
            a.extend(flags([("--role", role.as_str())]));
        }
        if let Some(l) = &self.replication_listen {
            a.extend(flags([("--replication-listen", l.as_str())]));
        }
        for (name, addr) in &self.peers {
            a.extend(["--peer".into(), format!("{name}={addr}").into()]);
        }
        if let Some(secret) = &self.secret {
            a.extend(["--secret-file".into(), secret.clone().into()]);
        }
        if let Some(mode) = self.mode {
            a.extend(flags([("--mode", mode.as_str())]));
        }
        a
    }
}

/// `--flag value` pairs as arguments.
fn flags<const N: usize>(pairs: [(&str, &str); N]) -> Vec<OsString> {
    pairs
        .iter()
        .flat_map(|(f, v)| [OsString::from(f), OsString::from(v)])
        .collect()
}

/// Writes a fresh shared secret to `path`: 32 random bytes as 64 hex
/// digits, readable by the owner only (mode 0600).
pub fn write_secret(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(hex.as_bytes())
}

/// Whether `want`'s replicas of `status` are in sync with no resync left:
/// each one named, or, with `want` empty, every replica (at least one).
pub fn replicas_settled(status: &VolumeStatus, want: &[String]) -> bool {
    if want.is_empty() {
        return !status.replicas.is_empty() && status.replicas.iter().all(|r| r.is_settled());
    }
    want.iter().all(|w| {
        status
            .replicas
            .iter()
            .any(|r| &r.peer == w && r.is_settled())
    })
}

/// Why [`wait_in_sync`] gave up.
#[derive(Debug, thiserror::Error)]
#[error("replicas of {volume} not in sync within {timeout:?}{}; last status: {last}", if *.interrupted { " (interrupted)" } else { "" })]
pub struct NotInSync {
    /// The volume.
    pub volume: String,
    /// The bound waited.
    pub timeout: Duration,
    /// Whether the caller interrupted the wait.
    pub interrupted: bool,
    /// The last status seen (pretty-printed), or why none was had.
    pub last: String,
}

/// Polls the primary at `admin` until `want`'s replicas of `volume` are in
/// sync with no resync left (see [`replicas_settled`]), at most `timeout`
/// or until `interrupted` says so; returns the time waited and that status.
pub fn wait_in_sync(
    admin: &Path,
    volume: &str,
    want: &[String],
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
) -> Result<(Duration, VolumeStatus), NotInSync> {
    let t0 = Instant::now();
    loop {
        let last = match volume_status(admin, volume) {
            Ok(s) if replicas_settled(&s, want) => return Ok((t0.elapsed(), s)),
            Ok(s) => format!("{s:#?}"),
            Err(e) => e,
        };
        let stop = interrupted();
        if stop || t0.elapsed() >= timeout {
            return Err(NotInSync {
                volume: volume.to_string(),
                timeout,
                interrupted: stop,
                last,
            });
        }
        std::thread::sleep(SYNC_POLL);
    }
}

/// Volume `volume`'s status from the daemon at `admin`, or why none was had.
pub fn volume_status(admin: &Path, volume: &str) -> Result<VolumeStatus, String> {
    let resp = call_within(admin, &Request::Status, STATUS_TIMEOUT).map_err(|e| e.to_string())?;
    if !resp.ok {
        return Err(format!("status failed: {}", resp.error.unwrap_or_default()));
    }
    resp.volumes
        .into_iter()
        .find(|v| v.name == volume)
        .ok_or_else(|| format!("status lists no volume '{volume}'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Response;
    use crate::states::ReplicaState;

    fn line(a: &[OsString]) -> String {
        a.iter()
            .map(|x| x.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn spec(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            export: "vol0".into(),
            data: format!("/d/{name}.data").into(),
            journal: format!("/d/{name}.journal").into(),
            size: "256M".into(),
            listen: "127.0.0.1:0".into(),
            admin: Some(format!("/d/{name}.admin").into()),
            secret: Some("/d/secret".into()),
            ..NodeSpec::default()
        }
    }

    #[test]
    fn replica_and_primary_command_lines() {
        let mut r = spec("n2");
        r.journal_size = Some("64M".into());
        r.role = Some(Role::Replica);
        r.replication_listen = Some("127.0.0.1:4000".into());
        r.extra = vec!["--log-level".into(), "debug".into()];
        assert_eq!(
            line(&r.args()),
            "--node n2 --export vol0 --data /d/n2.data --journal /d/n2.journal --size 256M \
             --journal-size 64M --listen 127.0.0.1:0 --admin-socket /d/n2.admin --role replica \
             --replication-listen 127.0.0.1:4000 --secret-file /d/secret --log-level debug"
        );
        let mut p = spec("n1");
        p.role = Some(Role::Primary);
        p.peers = vec![
            ("n2".into(), "127.0.0.1:4000".into()),
            ("n3".into(), "127.0.0.1:4001".into()),
        ];
        p.mode = Some(Mode::Flush);
        assert_eq!(
            line(&p.replication_args()),
            "--role primary --peer n2=127.0.0.1:4000 --peer n3=127.0.0.1:4001 \
             --secret-file /d/secret --mode flush"
        );
    }

    #[test]
    fn unset_fields_give_no_flags() {
        let mut s = spec("n1");
        s.admin = None;
        s.secret = None;
        assert_eq!(
            line(&s.args()),
            "--node n1 --export vol0 --data /d/n1.data --journal /d/n1.journal --size 256M \
             --listen 127.0.0.1:0"
        );
    }

    #[test]
    fn secret_is_64_hex_digits_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("mirrorblk-admin-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("secret");
        write_secret(&path).expect("writes");
        let text = std::fs::read_to_string(&path).expect("reads");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        write_secret(&path).expect("writes again");
        let again = std::fs::read_to_string(&path).expect("reads");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(text, again, "each secret is fresh");
    }

    fn status(states: &[(&str, ReplicaState, bool)]) -> VolumeStatus {
        let resp: Response = serde_json::from_str(
            r#"{"ok":true,"node":"n1","volumes":[{"name":"vol0","size":1,"read_only":false,
            "role":"primary","epoch":1,"last_lsn":0,"durable_lsn":0,"applied_lsn":0,
            "journal_used":0,"journal_size":1,"journal_batches":0,"checkpoints":0,
            "journal_error":null,"replicas":[{"peer":"x","state":"in-sync","reason":null,
            "durable_lsn":0,"lag_lsn":0,"resync":null,"rtt_us":0}]}]}"#,
        )
        .expect("parses");
        let mut v = resp.volumes[0].clone();
        let proto = v.replicas[0].clone();
        v.replicas = states
            .iter()
            .map(|&(peer, state, resync)| {
                let mut r = proto.clone();
                r.peer = peer.into();
                r.state = state;
                r.resync = resync.then_some((1, 2));
                r
            })
            .collect();
        v
    }

    #[test]
    fn settled_needs_every_wanted_replica_in_sync_without_resync() {
        use ReplicaState::*;
        let want = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let s = status(&[("n2", InSync, false), ("n3", InSync, true)]);
        assert!(replicas_settled(&s, &want(&["n2"])));
        assert!(!replicas_settled(&s, &want(&["n2", "n3"])), "n3 resyncs");
        assert!(!replicas_settled(&s, &want(&["n4"])), "n4 is not there");
        assert!(!replicas_settled(&s, &[]), "all: n3 resyncs");
        let s = status(&[("n2", InSync, false), ("n3", CatchingUp, false)]);
        assert!(!replicas_settled(&s, &[]));
        assert!(!replicas_settled(&status(&[]), &[]), "no replica at all");
        assert!(replicas_settled(&status(&[("n2", InSync, false)]), &[]));
    }

    #[test]
    fn wait_in_sync_is_bounded() {
        let t0 = Instant::now();
        let e = wait_in_sync(
            Path::new("/nonexistent/mirrorblk.admin"),
            "vol0",
            &[],
            Duration::from_millis(120),
            &|| false,
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!e.interrupted);
        assert!(e.last.contains("cannot connect"), "{e}");
        let e = wait_in_sync(
            Path::new("/nonexistent/mirrorblk.admin"),
            "vol0",
            &[],
            Duration::from_secs(60),
            &|| true,
        )
        .unwrap_err();
        assert!(e.interrupted, "{e}");
    }
}
