//! Role changes by restart: `promote`, `demote` and self-fencing persist the
//! new role (and epoch) in the journal superblock, then ask the main thread
//! to stop gracefully and re-execute the daemon with that role. Start-up
//! already knows how to come up as a primary or a replica (recovery,
//! listeners, links), so role changes reuse those paths instead of
//! re-plumbing a running node.

use std::ffi::OsString;
use std::sync::Mutex;

use mirrorblk_admin::Role;

static RESTART: Mutex<Option<Role>> = Mutex::new(None);

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

/// The command line with `--role` replaced.
pub fn args_with_role(args: Vec<OsString>, role: Role) -> Vec<OsString> {
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
    out.push("--role".into());
    out.push(role.to_string().into());
    out
}

/// Replaces this process with the daemon running as `role`.
pub fn reexec(role: Role) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args = args_with_role(std::env::args_os().collect(), role);
    let exe = std::env::current_exe().unwrap_or_else(|_| args[0].clone().into());
    tracing::warn!("restarting as {role}");
    std::process::Command::new(exe).args(&args[1..]).exec()
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
        let b = args_with_role(a, Role::Primary);
        assert_eq!(
            b,
            ["mirrorblkd", "--node", "n2", "--role", "primary"]
                .iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
    }
}
