//! A description of the machine a run was measured on, read from `/proc`,
//! `/sys` and the tools' `--version`, so results from different machines are
//! never compared blindly.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What the figures depend on besides the code.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs (`nproc`).
    pub nproc: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Total memory in MiB.
    pub mem_total_mib: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// The block device holding the volume files, and what it is.
    pub disk: String,
    /// Filesystem type and mount point of the volume directory.
    pub filesystem: String,
    /// How an idle CPU waits (cpuidle driver, governor, guest halt polling,
    /// idle states): it sets what every cross-CPU wake-up costs, which
    /// moves QD1 latencies and the peers' ratios more than the code does.
    pub cpu_idle: String,
    /// Tool versions: fio, nbdkit, qemu-nbd, mirrorblkd.
    pub versions: Vec<(String, String)>,
    /// Git commit of the workspace (read from `.git`, not by running git).
    pub git_commit: Option<String>,
    /// `/proc/loadavg` when the run started.
    pub load_before: String,
    /// `/proc/loadavg` when the run ended.
    pub load_after: String,
}

fn read(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The current `/proc/loadavg` line.
pub fn loadavg() -> String {
    read("/proc/loadavg").unwrap_or_else(|| "unknown".into())
}

/// The 1-minute load average.
pub fn load1() -> Option<f64> {
    loadavg().split_whitespace().next()?.parse().ok()
}

/// Online CPUs.
pub fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Describes the machine; `dir` is where the volume files live.
pub fn describe(dir: &Path, workspace: &Path, versions: Vec<(String, String)>) -> Machine {
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_total_mib = read("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    Machine {
        nproc: nproc(),
        cpu_model,
        mem_total_mib,
        kernel: read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        disk: disk_of(dir),
        filesystem: filesystem_of(dir),
        cpu_idle: cpu_idle(),
        versions,
        git_commit: git_commit(workspace),
        load_before: loadavg(),
        load_after: String::new(),
    }
}

/// "vda (virtio_blk, model ..., rotational=1, write cache: write back, scheduler mq-deadline)".
fn disk_of(dir: &Path) -> String {
    let Ok(meta) = std::fs::metadata(dir) else {
        return "unknown".into();
    };
    let dev = meta.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let Ok(mut sys) = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")) else {
        return format!("device {maj}:{min} (not in /sys/dev/block)");
    };
    // A partition's attributes live on its parent disk.
    if sys.join("partition").exists() {
        if let Some(p) = sys.parent() {
            sys = p.to_path_buf();
        }
    }
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dev_dir = sys.join("device");
    let mut parts = Vec::new();
    if let Some(d) = std::fs::read_link(dev_dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    {
        parts.push(d);
    }
    for (label, file) in [
        ("model", "model"),
        ("vendor", "vendor"),
        ("device id", "device"),
    ] {
        if let Some(v) = read(dev_dir.join(file)).filter(|v| !v.is_empty()) {
            parts.push(format!("{label} {v}"));
        }
    }
    let q = sys.join("queue");
    if let Some(r) = read(q.join("rotational")) {
        parts.push(format!("rotational={r}"));
    }
    if let Some(w) = read(q.join("write_cache")) {
        parts.push(format!("write cache: {w}"));
    }
    if let Some(s) = read(q.join("scheduler")) {
        parts.push(format!("scheduler: {s}"));
    }
    if let Some(sectors) = read(sys.join("size")).and_then(|s| s.parse::<u64>().ok()) {
        parts.push(format!("{} GiB", (sectors * 512) >> 30));
    }
    format!("{name} ({})", parts.join(", "))
}

/// The cpuidle set-up, read from `/sys` (see [`describe_cpu_idle`]).
fn cpu_idle() -> String {
    let base = Path::new("/sys/devices/system/cpu/cpuidle");
    let driver = read(base.join("current_driver"));
    let governor =
        read(base.join("current_governor")).or_else(|| read(base.join("current_governor_ro")));
    let poll_ns =
        read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").and_then(|s| s.parse().ok());
    // A handful of states at most; the bound only guards the loop.
    let states = (0..16)
        .map_while(|i| {
            read(format!(
                "/sys/devices/system/cpu/cpu0/cpuidle/state{i}/name"
            ))
        })
        .collect();
    describe_cpu_idle(driver, governor, poll_ns, states)
}

/// "driver haltpoll, governor haltpoll, guest_halt_poll_ns 0 (…), states POLL, haltpoll idle".
/// A guest whose haltpoll driver does not poll halts an idle vCPU at once, so
/// every wake-up of it (a reply, a completion) is a VM exit: that is said,
/// since it costs each NBD round trip tens of microseconds.
fn describe_cpu_idle(
    driver: Option<String>,
    governor: Option<String>,
    poll_ns: Option<u64>,
    states: Vec<String>,
) -> String {
    let Some(driver) = driver.filter(|d| d != "none") else {
        return "no cpuidle driver".into();
    };
    let mut parts = vec![format!("driver {driver}")];
    if let Some(g) = governor {
        parts.push(format!("governor {g}"));
    }
    match poll_ns {
        Some(0) if driver == "haltpoll" => parts.push(
            "guest_halt_poll_ns 0 (no polling: an idle vCPU halts at once, each wake-up is a VM exit)"
                .into(),
        ),
        Some(ns) => parts.push(format!("guest_halt_poll_ns {ns}")),
        None => {}
    }
    if !states.is_empty() {
        parts.push(format!("states {}", states.join(", ")));
    }
    parts.join(", ")
}

/// "ext4 on /" for the mount holding `dir` (the longest matching mount point).
fn filesystem_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = read("/proc/mounts").unwrap_or_default();
    let mut best: Option<(PathBuf, String, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = PathBuf::from(f[1]);
        // The longest mount point containing `dir` is the one it is on.
        let longer = match &best {
            None => true,
            Some((b, _, _)) => mp.as_os_str().len() >= b.as_os_str().len(),
        };
        if dir.starts_with(&mp) && longer {
            best = Some((mp, f[2].to_string(), f[0].to_string()));
        }
    }
    match best {
        Some((mp, fs, src)) => format!("{fs} on {} ({src})", mp.display()),
        None => "unknown".into(),
    }
}

/// The commit `HEAD` points at, read from the files under `.git` (loose ref
/// or packed-refs). In a linked work tree (`.git` is a file naming the
/// work tree's git directory), `HEAD` is read there and refs from the
/// common directory it names.
pub fn git_commit(workspace: &Path) -> Option<String> {
    let mut git = workspace.join(".git");
    if git.is_file() {
        let link = read(git.clone())?;
        let dir = link.strip_prefix("gitdir:")?.trim();
        git = workspace.join(dir);
    }
    let common = match read(git.join("commondir")) {
        Some(c) => git.join(c),
        None => git.clone(),
    };
    let head = read(git.join("HEAD"))?;
    let Some(r) = head.strip_prefix("ref: ") else {
        return Some(head);
    };
    if let Some(c) = read(git.join(r)).or_else(|| read(common.join(r))) {
        return Some(c);
    }
    read(common.join("packed-refs"))?
        .lines()
        .find(|l| l.ends_with(r))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_idle_says_when_a_guest_halts_without_polling() {
        let s = |v: &str| Some(v.to_string());
        let states = || vec!["POLL".to_string(), "haltpoll idle".to_string()];
        for (driver, governor, poll, want) in [
            (None, None, None, "no cpuidle driver"),
            (s("none"), None, None, "no cpuidle driver"),
            (
                s("haltpoll"),
                s("haltpoll"),
                Some(0),
                "driver haltpoll, governor haltpoll, guest_halt_poll_ns 0 (no polling: an idle vCPU halts at once, each wake-up is a VM exit), states POLL, haltpoll idle",
            ),
            (
                s("haltpoll"),
                s("haltpoll"),
                Some(200_000),
                "driver haltpoll, governor haltpoll, guest_halt_poll_ns 200000, states POLL, haltpoll idle",
            ),
            (
                s("intel_idle"),
                s("menu"),
                Some(0),
                "driver intel_idle, governor menu, guest_halt_poll_ns 0, states POLL, haltpoll idle",
            ),
        ] {
            assert_eq!(describe_cpu_idle(driver, governor, poll, states()), want);
        }
    }

    #[test]
    fn reads_head_of_a_linked_work_tree() {
        let d = tempfile::tempdir().expect("tempdir");
        let main = d.path().join("main/.git");
        let wt_git = main.join("worktrees/wt");
        std::fs::create_dir_all(main.join("refs/heads")).unwrap();
        std::fs::create_dir_all(&wt_git).unwrap();
        std::fs::write(main.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(main.join("refs/heads/main"), "aaaa\n").unwrap();
        std::fs::write(main.join("packed-refs"), "bbbb refs/heads/b\n").unwrap();
        std::fs::write(wt_git.join("HEAD"), "ref: refs/heads/b\n").unwrap();
        std::fs::write(wt_git.join("commondir"), "../..\n").unwrap();
        let wt = d.path().join("wt");
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(wt.join(".git"), format!("gitdir: {}\n", wt_git.display())).unwrap();
        assert_eq!(git_commit(&d.path().join("main")).as_deref(), Some("aaaa"));
        assert_eq!(git_commit(&wt).as_deref(), Some("bbbb"));
    }
}
