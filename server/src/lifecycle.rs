//! Role changes by restart: `promote`, `demote` and self-fencing persist the
//! new role (and epoch) in the journal superblock, then ask the main thread
//! to stop gracefully and re-execute the daemon with that role. Start-up
//! already knows how to come up as a primary or a replica (recovery,
//! listeners, links), so role changes reuse those paths instead of
//! re-plumbing a running node.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mirrorblk_admin::Role;

static RESTART: Mutex<Option<Role>> = Mutex::new(None);

/// Whether etcd decides the role (then a restart never adds `--role`).
static COORDINATED: AtomicBool = AtomicBool::new(false);

/// The etcd lease an election winner hands to its restarted self.
static LEASE: Mutex<Option<i64>> = Mutex::new(None);

/// The environment variable that carries a handed-over lease (hex) across
/// the re-execution.
pub const LEASE_ENV: &str = "MIRRORBLK_ETCD_LEASE";

/// Marks this node as coordinated: its role comes from etcd on every start.
pub fn set_coordinated() {
    COORDINATED.store(true, Ordering::Relaxed);
}

/// Passes `lease` to the restarted daemon (an election winner's).
pub fn hand_over_lease(lease: i64) {
    *LEASE.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
}

/// Asks the main thread to stop and come back with `role`.
pub fn request_restart(role: Role) {
    let mut r = RESTART.lock().unwrap_or_else(|e| e.into_inner());
    if r.is_some() {
        // Already on its way; a second signal would stay pending across
        // exec and stop the restarted daemon at once.
        return;
    }
    *r = Some(role);
    drop(r);
    // Process-directed, so the main thread's sigwait receives it.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
}

/// The role a restart was requested with, if any. It stays set: a later
/// request before the exec must not signal again.
pub fn take_restart() -> Option<Role> {
    *RESTART.lock().unwrap_or_else(|e| e.into_inner())
}

/// The command line with `--role` replaced by `role` (removed for None).
pub fn args_with_role(args: Vec<OsString>, role: Option<Role>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--role" {
            skip = true;
            continue;
        }
        if a.to_str().is_some_and(|s| s.starts_with("--role=")) {
            continue;
        }
        out.push(a);
    }
    if let Some(role) = role {
        out.push("--role".into());
        out.push(role.to_string().into());
    }
    out
}

/// Replaces this process with the daemon running as `role`.
pub fn reexec(role: Role) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let coordinated = COORDINATED.load(Ordering::Relaxed);
    let flag = (!coordinated).then_some(role);
    let args = args_with_role(std::env::args_os().collect(), flag);
    let exe = std::env::current_exe().unwrap_or_else(|_| args[0].clone().into());
    tracing::warn!("restarting as {role}");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args[1..]).env_remove(LEASE_ENV);
    if let Some(lease) = *LEASE.lock().unwrap_or_else(|e| e.into_inner()) {
        cmd.env(LEASE_ENV, format!("{lease:x}"));
    }
    cmd.exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_flag_is_replaced() {
        let a: Vec<OsString> = [
            "mirrorblkd",
            "--role",
            "replica",
            "--node",
            "n2",
            "--role=replica",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let b = args_with_role(a.clone(), Some(Role::Primary));
        assert_eq!(
            b,
            ["mirrorblkd", "--node", "n2", "--role", "primary"]
                .iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
        let c = args_with_role(a, None);
        assert_eq!(
            c,
            ["mirrorblkd", "--node", "n2"]
                .iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
    }
}
