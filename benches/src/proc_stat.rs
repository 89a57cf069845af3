//! CPU time of process trees from `/proc`, to charge each target for the CPU
//! its server processes (a primary and its replicas) spend per GiB moved.
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
    trees_cpu_seconds(&[root]).map(|v| v[0])
}

/// [`tree_cpu_seconds`] of several roots from one scan of `/proc`, in the
/// order given (a replicated target is a primary plus replica processes).
/// `None` if any root is gone.
pub fn trees_cpu_seconds(roots: &[i32]) -> Option<Vec<f64>> {
    let lines = scan_proc()?;
    let tps = ticks_per_second();
    sum_trees(&lines, roots).map(|v| v.into_iter().map(|t| t as f64 / tps).collect())
}

/// Every readable `/proc/PID/stat` line.
fn scan_proc() -> Option<Vec<StatLine>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(st) = parse_stat(&text) {
            out.push(st);
        }
    }
    Some(out)
}

/// Clock ticks of each root's tree in `lines`: the root's own and reaped
/// children's ticks plus every live descendant's. A process below two roots
/// (one root the ancestor of another) is counted once, for the nearest root.
/// `None` if a root is missing from `lines`.
pub fn sum_trees(lines: &[StatLine], roots: &[i32]) -> Option<Vec<u64>> {
    let mut by_parent: HashMap<i32, Vec<&StatLine>> = HashMap::new();
    let mut by_pid: HashMap<i32, &StatLine> = HashMap::new();
    for st in lines {
        by_parent.entry(st.ppid).or_default().push(st);
        by_pid.insert(st.pid, st);
    }
    let mut out = Vec::with_capacity(roots.len());
    for &root in roots {
        let r = by_pid.get(&root)?;
        let mut ticks = r.ticks + r.child_ticks;
        // Depth-first walk; the pid tree is acyclic, and the stack holds at
        // most every process once, so this ends.
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            for k in by_parent.get(&p).into_iter().flatten() {
                if roots.contains(&k.pid) {
                    continue;
                }
                ticks += k.ticks;
                stack.push(k.pid);
            }
        }
        out.push(ticks);
    }
    Some(out)
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

    fn line(pid: i32, ppid: i32, ticks: u64, child_ticks: u64) -> StatLine {
        StatLine {
            pid,
            ppid,
            ticks,
            child_ticks,
        }
    }

    #[test]
    fn sums_each_root_tree_once() {
        // 10 and 20 are roots (a primary and a replica); 11 and 12 are 10's
        // descendants, 21 is 20's child, 30 is someone else's.
        let lines = [
            line(10, 1, 100, 5),
            line(11, 10, 7, 0),
            line(12, 11, 3, 0),
            line(20, 1, 50, 0),
            line(21, 20, 2, 9),
            line(30, 1, 1000, 0),
        ];
        assert_eq!(sum_trees(&lines, &[10, 20]), Some(vec![115, 52]));
        // A root below another root is not counted twice.
        assert_eq!(sum_trees(&lines, &[10, 11]), Some(vec![105, 10]));
        assert_eq!(sum_trees(&lines, &[10, 99]), None);
    }

    #[test]
    fn own_process_has_a_cpu_time() {
        let me = std::process::id() as i32;
        assert!(tree_cpu_seconds(me).is_some());
        let both = trees_cpu_seconds(&[me, me]).expect("both");
        assert_eq!(both.len(), 2);
    }
}
