//! CPU time of a process tree from `/proc`, to charge each server for the CPU
//! it spends per GiB moved.
//!
//! `/proc/PID/stat` of a process already sums all its threads, so walking the
//! process tree (not the thread list) is enough. Children that already exited
//! and were reaped show up in the parent's `cutime`/`cstime`, which we add for
//! the root so forked helpers that come and go are not lost.

use std::collections::HashMap;
use std::fs;

/// One `/proc/PID/stat` line, reduced to what we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatLine {
    /// The process id.
    pub pid: i32,
    /// Its parent's id.
    pub ppid: i32,
    /// User plus system time of all its threads, in clock ticks.
    pub ticks: u64,
    /// User plus system time of its reaped children, in clock ticks.
    pub child_ticks: u64,
}

/// Parses one `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so the fields
/// are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<StatLine> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    // Fields after the name, starting with field 3 (state) at index 0.
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
    let ppid = rest.get(1)?.parse().ok()?;
    Some(StatLine {
        pid,
        ppid,
        ticks: field(14)? + field(15)?,
        child_ticks: field(16)? + field(17)?,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system) used so far by `root` and every live
/// descendant, plus the reaped children of `root`. `None` if `root` is gone.
///
/// Processes that vanish between listing `/proc` and reading their stat are
/// skipped: their time is then missing from this sample, an error of at most
/// one short-lived helper, which none of the measured servers spawns.
pub fn tree_cpu_seconds(root: i32) -> Option<f64> {
    let mut by_parent: HashMap<i32, Vec<StatLine>> = HashMap::new();
    let mut root_line = None;
    let entries = fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(st) = parse_stat(&text) else {
            continue;
        };
        if st.pid == root {
            root_line = Some(st);
        }
        by_parent.entry(st.ppid).or_default().push(st);
    }
    let root_line = root_line?;
    let mut ticks = root_line.ticks + root_line.child_ticks;
    // Depth-first walk; the pid tree is acyclic, and the stack holds at most
    // every process once, so this ends.
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(kids) = by_parent.get(&p) {
            for k in kids {
                ticks += k.ticks;
                stack.push(k.pid);
            }
        }
    }
    Some(ticks as f64 / ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let line = "1234 (qemu (nbd) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 4 0 100 1000000 200 18446744073709551615";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st.pid, 1234);
        assert_eq!(st.ppid, 1);
        assert_eq!(st.ticks, 300);
        assert_eq!(st.child_ticks, 10);
    }

    #[test]
    fn own_process_has_a_cpu_time() {
        let me = std::process::id() as i32;
        assert!(tree_cpu_seconds(me).is_some());
    }
}
