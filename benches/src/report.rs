//! The results of a comparison: the record written as JSON, the summaries
//! over repetitions, the ratios to the best peer, and the markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cluster::ReplicaRecord;
use crate::fio::{Job, RunFigures};
use crate::machine::Machine;
use crate::process::StopOutcome;
use crate::stats::{summarize, Summary};
use crate::targets::Class;

/// One figure of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// Operations per second.
    Iops,
    /// MiB per second.
    MibS,
    /// Median total latency.
    P50,
    /// 99th percentile total latency.
    P99,
    /// 99.9th percentile total latency.
    P999,
    /// Server CPU seconds per GiB moved.
    Cpu,
}

impl Figure {
    /// All figures, in column order.
    pub const ALL: [Figure; 6] = [
        Figure::Iops,
        Figure::MibS,
        Figure::P50,
        Figure::P99,
        Figure::P999,
        Figure::Cpu,
    ];

    /// Key in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Figure::Iops => "iops",
            Figure::MibS => "mib_s",
            Figure::P50 => "lat_p50_us",
            Figure::P99 => "lat_p99_us",
            Figure::P999 => "lat_p999_us",
            Figure::Cpu => "cpu_s_per_gib",
        }
    }

    /// Column header.
    pub fn label(self) -> &'static str {
        match self {
            Figure::Iops => "IOPS",
            Figure::MibS => "MiB/s",
            Figure::P50 => "p50",
            Figure::P99 => "p99",
            Figure::P999 => "p99.9",
            Figure::Cpu => "CPU s/GiB",
        }
    }

    /// Whether more is better (throughput) or less (latency, CPU).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Figure::Iops | Figure::MibS)
    }

    /// The value in one run.
    pub fn of(self, r: &RunFigures) -> Option<f64> {
        match self {
            Figure::Iops => Some(r.iops),
            Figure::MibS => Some(r.mib_s),
            Figure::P50 => Some(r.lat_p50_us),
            Figure::P99 => Some(r.lat_p99_us),
            Figure::P999 => Some(r.lat_p999_us),
            Figure::Cpu => r.cpu_s_per_gib,
        }
    }

    /// Formats a value for the table.
    pub fn format(self, v: f64) -> String {
        match self {
            Figure::Iops => fmt_count(v),
            Figure::MibS => {
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            }
            Figure::P50 | Figure::P99 | Figure::P999 => fmt_us(v),
            Figure::Cpu => format!("{v:.2}"),
        }
    }
}

/// "41.2k", "1.23k", "950".
pub fn fmt_count(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// Microseconds as "48 µs", "1.91 ms", "12.3 ms".
pub fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// A target's ratio to the best peer for one figure.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// This target's median divided by the best peer's median (so for
    /// latency and CPU, above 1 is worse; for IOPS and MiB/s, below 1 is).
    pub ratio: f64,
    /// Which peer was best for this figure.
    pub peer: String,
}

/// One target on one job: all its runs and their summaries.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Target name.
    pub target: String,
    /// Job name.
    pub job: String,
    /// Every repetition that succeeded.
    pub runs: Vec<RunFigures>,
    /// Why repetitions failed, if any did.
    pub errors: Vec<String>,
    /// Median and spread per figure (keys as [`Figure::key`]).
    pub summary: BTreeMap<&'static str, Summary>,
    /// Ratio to the best peer per figure.
    pub vs_best_peer: BTreeMap<&'static str, Ratio>,
}

impl Cell {
    /// A cell with no runs yet.
    pub fn new(target: &str, job: &str) -> Cell {
        Cell {
            target: target.into(),
            job: job.into(),
            runs: Vec::new(),
            errors: Vec::new(),
            summary: BTreeMap::new(),
            vs_best_peer: BTreeMap::new(),
        }
    }

    /// Fills `summary` from `runs`.
    pub fn summarize(&mut self) {
        self.summary.clear();
        for f in Figure::ALL {
            let vals: Vec<f64> = self.runs.iter().filter_map(|r| f.of(r)).collect();
            if let Some(s) = summarize(&vals) {
                self.summary.insert(f.key(), s);
            }
        }
    }

    /// Median of a figure.
    pub fn median(&self, f: Figure) -> Option<f64> {
        self.summary.get(f.key()).map(|s| s.median)
    }
}

/// Fills every cell's `vs_best_peer` from the summarised cells of the peers.
pub fn compute_ratios(cells: &mut [Cell], peers: &[String]) {
    let mut best: BTreeMap<(String, &'static str), (f64, String)> = BTreeMap::new();
    for c in cells.iter().filter(|c| peers.contains(&c.target)) {
        for f in Figure::ALL {
            let Some(v) = c.median(f) else { continue };
            let key = (c.job.clone(), f.key());
            let better = match best.get(&key) {
                None => true,
                Some((b, _)) => {
                    if f.higher_is_better() {
                        v > *b
                    } else {
                        v < *b
                    }
                }
            };
            if better {
                best.insert(key, (v, c.target.clone()));
            }
        }
    }
    for c in cells.iter_mut() {
        c.vs_best_peer.clear();
        for f in Figure::ALL {
            let (Some(v), Some((b, peer))) = (c.median(f), best.get(&(c.job.clone(), f.key())))
            else {
                continue;
            };
            if *b > 0.0 {
                c.vs_best_peer.insert(
                    f.key(),
                    Ratio {
                        ratio: v / b,
                        peer: peer.clone(),
                    },
                );
            }
        }
    }
}

/// The targets a class's table shows: its own, and for NBD's contract also
/// the unreplicated mirrorblk targets (durable per write: a stronger promise
/// measured against the weaker one's peers).
pub fn class_members(targets: &[TargetRecord], class: Class) -> Vec<&TargetRecord> {
    targets
        .iter()
        .filter(|t| {
            t.class == class
                || (class == Class::NbdContract
                    && t.class == Class::DurablePerWrite
                    && t.name.starts_with("mirrorblk"))
        })
        .collect()
}

/// `cells` of `class`'s table with their ratios to the best peer of that
/// class (a target shown in two tables has a ratio in each).
pub fn class_cells(cells: &[Cell], targets: &[TargetRecord], class: Class) -> Vec<Cell> {
    let members = class_members(targets, class);
    let peers: Vec<String> = members
        .iter()
        .filter(|t| t.peer && t.class == class)
        .map(|t| t.name.clone())
        .collect();
    let mut out: Vec<Cell> = cells
        .iter()
        .filter(|c| members.iter().any(|t| t.name == c.target))
        .cloned()
        .collect();
    compute_ratios(&mut out, &peers);
    out
}

/// Fills every cell's `vs_best_peer` from the peers of its target's own
/// class (what results.json records).
pub fn compute_class_ratios(cells: &mut [Cell], targets: &[TargetRecord]) {
    for class in Class::ALL {
        for rated in class_cells(cells, targets, class) {
            let own = targets
                .iter()
                .any(|t| t.name == rated.target && t.class == class);
            if let Some(c) = cells
                .iter_mut()
                .find(|c| own && c.target == rated.target && c.job == rated.job)
            {
                c.vs_best_peer = rated.vs_best_peer;
            }
        }
    }
}

/// What happened to one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRecord {
    /// Target name.
    pub name: String,
    /// The exact server command line (for `raw`, the fio engine options).
    pub command: String,
    /// When a completed write is durable.
    pub durability: String,
    /// What a completed write promises; ratios are taken within the class.
    pub class: Class,
    /// Whether the ratios of its class are taken against it.
    pub peer: bool,
    /// Why it was not measured, if it was not.
    pub skipped: Option<String>,
    /// A failure that ended its measurements early.
    pub error: Option<String>,
    /// Server version line.
    pub version: Option<String>,
    /// Seconds from spawn to accepting connections.
    pub ready_after_s: Option<f64>,
    /// The sequential fill before the jobs.
    pub precondition: Option<RunFigures>,
    /// How the server stopped.
    pub stop: Option<StopOutcome>,
    /// Server log file.
    pub log: Option<String>,
    /// Warning and error lines found in the server log (at most 50).
    pub log_problems: Vec<String>,
    /// The jobs it runs, when not all (replicated targets: the write jobs).
    pub jobs: Option<Vec<String>>,
    /// Every process of the target (the server; a replicated target's
    /// primary, replicas and proxies), with its exact command line.
    pub processes: Vec<ProcessRecord>,
    /// A replicated target's set-up and replica states.
    pub replication: Option<ReplicationRecord>,
    /// Counters read from a mirrorblkd's Prometheus endpoint.
    pub metrics: Option<MetricsReading>,
}

/// One process of a target.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessRecord {
    /// "primary", "replica n2", "delay-proxy n2".
    pub role: String,
    /// The exact command line.
    pub command: String,
    /// Its log file.
    pub log: String,
    /// Whether its CPU is in the target's "server CPU" figure.
    pub cpu_charged: bool,
    /// How it stopped.
    pub stop: Option<StopOutcome>,
    /// Why stopping it failed, if it did.
    pub stop_error: Option<String>,
    /// Warning and error lines in its log (at most 50).
    pub log_problems: Vec<String>,
}

/// A replicated target's set-up and what its primary reported.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationRecord {
    /// Replicas configured (`--peer` flags).
    pub peers: usize,
    /// Replicas running.
    pub replicas_running: usize,
    /// `--mode`.
    pub mode: String,
    /// Proxy delay per direction, for a cross-site target.
    pub delay_ms_each_way: Option<u64>,
    /// Seconds from the primary accepting NBD to every running replica in
    /// sync with no resync left (the checksum resync of the fresh volume).
    pub in_sync_after_s: Option<f64>,
    /// Replica states when the jobs started.
    pub replicas_before_jobs: Vec<ReplicaRecord>,
    /// Replica states right after the last job.
    pub replicas_after_jobs: Vec<ReplicaRecord>,
}

/// Counters read from the primary's `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsReading {
    /// `mirrorblk_payload_copies_total` after the sequential fill.
    pub payload_copies_after_fill: Option<f64>,
    /// `mirrorblk_payload_copies_total` after the last job.
    pub payload_copies_after_jobs: Option<f64>,
    /// Client write bytes (`mirrorblk_request_bytes_total{op="write"}`)
    /// after the last job: how much load the copy count covers.
    pub write_bytes_after_jobs: Option<f64>,
    /// Why a scrape failed, if one did.
    pub error: Option<String>,
}

/// Settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Measured seconds per run.
    pub runtime_s: u64,
    /// Warm-up seconds per run.
    pub ramp_s: u64,
    /// Volume and fio region size in bytes.
    pub size: u64,
    /// Repetitions.
    pub repeat: usize,
    /// Rounds the repetitions ran in (each round starts every target afresh
    /// and runs each of its jobs `repeat / rounds` times).
    pub rounds: usize,
    /// Target names in order.
    pub targets: Vec<String>,
    /// Job names in order.
    pub jobs: Vec<String>,
    /// Where the volumes lived.
    pub dir: String,
    /// The full command line of the harness.
    pub argv: Vec<String>,
}

/// Everything a run produced: serialised to `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Format name and version of this file.
    pub schema: &'static str,
    /// UTC start, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started_utc: String,
    /// UTC end.
    pub finished_utc: String,
    /// Wall seconds of the whole run.
    pub elapsed_s: f64,
    /// The estimate printed before starting.
    pub estimated_s: f64,
    /// Settings.
    pub settings: Settings,
    /// The machine.
    pub machine: Machine,
    /// Job definitions.
    pub jobs: Vec<Job>,
    /// Targets.
    pub targets: Vec<TargetRecord>,
    /// Per target and job results.
    pub cells: Vec<Cell>,
    /// Remarks about conditions (load, failures).
    pub notes: Vec<String>,
}

/// Single-letter tag of a peer for the ratio column ("Q" for qemu-nbd).
pub fn peer_tag(name: &str) -> String {
    name.chars()
        .next()
        .map(|c| c.to_ascii_uppercase().to_string())
        .unwrap_or_default()
}

fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

/// The markdown table, with the legend, durability and commands under it.
pub fn markdown(rec: &RunRecord) -> String {
    let mut s = String::new();
    for class in Class::ALL {
        s.push_str(&class_table(rec, class));
    }
    let _ = writeln!(
        s,
        "Cells: median over {} repetition(s) of {} s (after {} s ramp) in {} round(s) (each round starts every target afresh), (min–max) when they differ. \
         Latency is fio total latency (submission to completion, `lat_ns`). \
         Ratios: target median ÷ the best median among the peers of its table's class for that figure, the letter says which peer was best; \
         above 1 is better for IOPS and MiB/s, worse for latency and CPU. \
         Server CPU: user+system seconds of the server process tree per GiB moved, measured in a window inside fio's measured period; \
         for a replicated target, summed over the primary and every replica process (the delay proxy of a cross-site target \
         stands for the network and is not charged).",
        rec.settings.repeat, rec.settings.runtime_s, rec.settings.ramp_s, rec.settings.rounds
    );
    let partial: Vec<&TargetRecord> = rec
        .targets
        .iter()
        .filter(|t| t.jobs.is_some() && t.skipped.is_none())
        .collect();
    if !partial.is_empty() {
        let _ = writeln!(s);
        let names: Vec<&str> = partial.iter().map(|t| t.name.as_str()).collect();
        let jobs = partial[0].jobs.clone().unwrap_or_default();
        let _ = writeln!(
            s,
            "Not every target ran every job: {} ran only {} (writes; reads never touch the replicas, \
             the primary serves them alone as with 0 replicas), so their rows for the other jobs are left out.",
            names.join(", "),
            jobs.join(", ")
        );
    }
    let repl = replication_markdown(rec);
    if !repl.is_empty() {
        let _ = writeln!(s);
        s.push_str(&repl);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Targets (durability of a completed write; exact command):"
    );
    let _ = writeln!(s);
    for t in &rec.targets {
        if t.processes.len() > 1 {
            let _ = writeln!(
                s,
                "- **{}**: {}. Processes (replicas and proxies start first, the primary last):",
                t.name, t.durability
            );
            for p in &t.processes {
                let cpu = if p.cpu_charged {
                    ""
                } else {
                    " (CPU not charged)"
                };
                let _ = writeln!(s, "  - {}{cpu}: `{}`", p.role, p.command);
                // The primary's warnings are listed below, as for every target.
                if p.role != "primary" && !p.log_problems.is_empty() {
                    let _ = writeln!(
                        s,
                        "    - {} warning/error line(s) in {}, first: `{}`",
                        p.log_problems.len(),
                        p.log,
                        p.log_problems[0]
                    );
                }
            }
        } else {
            let _ = writeln!(s, "- **{}**: {}. `{}`", t.name, t.durability, t.command);
        }
        if let Some(why) = &t.skipped {
            let _ = writeln!(s, "  - skipped: {why}");
        }
        if let Some(e) = &t.error {
            let _ = writeln!(s, "  - failed: {}", e.lines().next().unwrap_or(""));
        }
        if !t.log_problems.is_empty() {
            let _ = writeln!(
                s,
                "  - {} warning/error line(s) in its log {}, first: `{}`",
                t.log_problems.len(),
                t.log.as_deref().unwrap_or("?"),
                t.log_problems[0]
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{}", machine_markdown(rec));
    s
}

/// One class's table (empty when no target of it ran): a heading with the
/// peers' legend, then a row per job and target.
fn class_table(rec: &RunRecord, class: Class) -> String {
    let members = class_members(&rec.targets, class);
    let cells = class_cells(&rec.cells, &rec.targets, class);
    if cells.is_empty() {
        return String::new();
    }
    let legend = members
        .iter()
        .filter(|t| t.peer && t.class == class)
        .map(|t| format!("{} = {}", peer_tag(&t.name), t.name))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = String::new();
    let _ = writeln!(s, "#### {}", class.heading());
    let _ = writeln!(s);
    if !legend.is_empty() {
        let _ = writeln!(s, "Peers: {legend}.");
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "| job | target | IOPS | MiB/s | p50 lat | p99 lat | p99.9 lat | server CPU s/GiB | ÷ best peer: IOPS, MiB/s, p50, p99, p99.9, CPU |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|---|");
    for job in &rec.jobs {
        for t in &members {
            if let Some(c) = cells
                .iter()
                .find(|c| c.job == job.name && c.target == t.name)
            {
                s.push_str(&row(job.name, t, c));
            }
        }
    }
    let _ = writeln!(s);
    s
}

/// One table row: the figures' medians (min–max) and the ratios.
fn row(job: &str, t: &TargetRecord, c: &Cell) -> String {
    let mut row = format!("| {job} | {} |", t.name);
    for f in Figure::ALL {
        let cell = match c.summary.get(f.key()) {
            None if f == Figure::Cpu && t.command.starts_with("fio ") => "n/a".into(),
            None if !c.errors.is_empty() => "failed".into(),
            None => "–".into(),
            Some(sm) if sm.n > 1 && sm.min != sm.max => format!(
                "{} ({}–{})",
                f.format(sm.median),
                f.format(sm.min),
                f.format(sm.max)
            ),
            Some(sm) => f.format(sm.median),
        };
        let _ = write!(row, " {cell} |");
    }
    let ratios: Vec<String> = Figure::ALL
        .iter()
        .map(|f| match c.vs_best_peer.get(f.key()) {
            Some(r) => format!("{}{}", fmt_ratio(r.ratio), peer_tag(&r.peer)),
            None => "–".into(),
        })
        .collect();
    let _ = writeln!(row, " {} |", ratios.join(" "));
    row
}

/// The target replicated targets are compared with: mirrorblkd alone.
pub const BASELINE: &str = "mirrorblk";
/// The unreplicated peer the cost targets name.
pub const FILE_PEER: &str = "nbdkit-file";

fn median_of(rec: &RunRecord, target: &str, job: &str, f: Figure) -> Option<f64> {
    rec.cells
        .iter()
        .find(|c| c.target == target && c.job == job)
        .and_then(|c| c.median(f))
}

fn ratio_text(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => fmt_ratio(a / b),
        _ => "–".into(),
    }
}

/// The replicated targets' cost relative to mirrorblkd alone and to
/// nbdkit-file, and the payload-copy counters; empty without replicated
/// targets.
pub fn replication_markdown(rec: &RunRecord) -> String {
    let repl: Vec<&TargetRecord> = rec
        .targets
        .iter()
        .filter(|t| t.class == Class::Replicated && t.skipped.is_none())
        .collect();
    if repl.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Replication cost (medians; ÷ {BASELINE} = the same job on mirrorblkd with 0 replicas, ÷ {FILE_PEER} = unreplicated nbdkit file plugin; CPU summed over primary and replicas):"
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| job | target | IOPS | IOPS ÷ {BASELINE} | IOPS ÷ {FILE_PEER} | p99 | p99 ÷ {BASELINE} | CPU s/GiB | CPU ÷ {BASELINE} | CPU ÷ {FILE_PEER} | replicas' CPU share |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for job in &rec.jobs {
        for t in &repl {
            let Some(c) = rec
                .cells
                .iter()
                .find(|c| c.job == job.name && c.target == t.name)
            else {
                continue;
            };
            let m = |f: Figure| c.median(f);
            let base = |f: Figure| median_of(rec, BASELINE, job.name, f);
            let file = |f: Figure| median_of(rec, FILE_PEER, job.name, f);
            let fmt = |f: Figure| {
                m(f).map(|v| f.format(v)).unwrap_or_else(|| {
                    if c.errors.is_empty() {
                        "–".into()
                    } else {
                        "failed".into()
                    }
                })
            };
            // The replicas' share of the charged CPU, median over runs.
            let shares: Vec<f64> = c
                .runs
                .iter()
                .filter_map(|r| {
                    let cpu = r.cpu.as_ref()?;
                    if cpu.window_cpu_s <= 0.0 {
                        return None;
                    }
                    let replicas: Vec<f64> = cpu
                        .window_cpu_s_by_process
                        .iter()
                        .filter(|(l, _)| l.starts_with("replica"))
                        .map(|(_, v)| *v)
                        .collect();
                    if replicas.is_empty() {
                        return None;
                    }
                    Some(replicas.iter().sum::<f64>() / cpu.window_cpu_s)
                })
                .collect();
            let share = summarize(&shares)
                .map(|sm| format!("{:.0} %", sm.median * 100.0))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                job.name,
                t.name,
                fmt(Figure::Iops),
                ratio_text(m(Figure::Iops), base(Figure::Iops)),
                ratio_text(m(Figure::Iops), file(Figure::Iops)),
                fmt(Figure::P99),
                ratio_text(m(Figure::P99), base(Figure::P99)),
                fmt(Figure::Cpu),
                ratio_text(m(Figure::Cpu), base(Figure::Cpu)),
                ratio_text(m(Figure::Cpu), file(Figure::Cpu)),
                share
            );
        }
    }
    // Only mirrorblkd serves the counters (qsd-mirror alone has none).
    if !rec
        .targets
        .iter()
        .any(|t| t.metrics.is_some() && t.skipped.is_none())
    {
        return s;
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Userspace payload copies on the write path (`mirrorblk_payload_copies_total` on the primary's /metrics) and replica states:"
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| target | copies after fill | copies after all jobs | client bytes written by then | in sync after | replicas after the jobs |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|---|");
    let with_metrics = rec
        .targets
        .iter()
        .filter(|t| t.metrics.is_some() && t.skipped.is_none());
    for t in with_metrics {
        let m = t.metrics.clone().unwrap_or_default();
        let n = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "–".into());
        let gib = m
            .write_bytes_after_jobs
            .map(|b| format!("{:.2} GiB", b / (1u64 << 30) as f64))
            .unwrap_or_else(|| "–".into());
        let (in_sync, after) = match &t.replication {
            None => ("no replicas".to_string(), "–".to_string()),
            Some(r) => (
                r.in_sync_after_s
                    .map(|x| format!("{x:.1} s"))
                    .unwrap_or_else(|| {
                        if r.replicas_running == 0 {
                            "n/a (down)".into()
                        } else {
                            "–".into()
                        }
                    }),
                if r.replicas_after_jobs.is_empty() {
                    "–".into()
                } else {
                    r.replicas_after_jobs
                        .iter()
                        .map(|x| format!("{} {} (lag {} LSN)", x.peer, x.state, x.lag_lsn))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {gib} | {in_sync} | {after} |",
            t.name,
            n(m.payload_copies_after_fill),
            n(m.payload_copies_after_jobs),
        );
    }
    s
}

/// The machine and conditions as a markdown list.
pub fn machine_markdown(rec: &RunRecord) -> String {
    let m = &rec.machine;
    let mut s = String::new();
    let _ = writeln!(s, "Machine and conditions:");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- run: {} → {} UTC ({:.0} s; estimated {:.0} s)",
        rec.started_utc, rec.finished_utc, rec.elapsed_s, rec.estimated_s
    );
    let _ = writeln!(s, "- CPU: {} × {}", m.nproc, m.cpu_model);
    let _ = writeln!(s, "- memory: {} MiB", m.mem_total_mib);
    let _ = writeln!(s, "- kernel: {}", m.kernel);
    let _ = writeln!(s, "- disk: {}", m.disk);
    let _ = writeln!(s, "- CPU idle: {}", m.cpu_idle);
    let _ = writeln!(
        s,
        "- filesystem: {} (volumes in {})",
        m.filesystem, rec.settings.dir
    );
    for (tool, v) in &m.versions {
        let _ = writeln!(s, "- {tool}: {v}");
    }
    let _ = writeln!(
        s,
        "- git commit: {}",
        m.git_commit.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        s,
        "- load average before: {}; after: {}",
        m.load_before, m.load_after
    );
    for n in &rec.notes {
        let _ = writeln!(s, "- note: {n}");
    }
    s
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, so
/// no date crate is needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_223_879), "2026-11-21T01:17:59Z");
    }

    #[test]
    fn ratios_pick_the_best_peer_per_figure() {
        let run = |iops: f64, p99: f64| RunFigures {
            iops,
            lat_p99_us: p99,
            ..RunFigures::default()
        };
        let mut cells = vec![
            Cell::new("a", "j"),
            Cell::new("b", "j"),
            Cell::new("m", "j"),
        ];
        cells[0].runs.push(run(100.0, 50.0));
        cells[1].runs.push(run(200.0, 80.0));
        cells[2].runs.push(run(50.0, 100.0));
        cells.iter_mut().for_each(Cell::summarize);
        compute_ratios(&mut cells, &["a".into(), "b".into()]);
        let r = &cells[2].vs_best_peer;
        assert_eq!((r["iops"].ratio, r["iops"].peer.as_str()), (0.25, "b"));
        assert_eq!(
            (r["lat_p99_us"].ratio, r["lat_p99_us"].peer.as_str()),
            (2.0, "a")
        );
    }

    fn target(name: &str, class: Class, peer: bool) -> TargetRecord {
        TargetRecord {
            name: name.into(),
            command: String::new(),
            durability: String::new(),
            class,
            peer,
            skipped: None,
            error: None,
            version: None,
            ready_after_s: None,
            precondition: None,
            stop: None,
            log: None,
            log_problems: Vec::new(),
            jobs: None,
            processes: Vec::new(),
            replication: None,
            metrics: None,
        }
    }

    #[test]
    fn ratios_are_taken_within_a_class_and_mirrorblk_shows_in_both() {
        let targets = vec![
            target("nbdkit-file", Class::NbdContract, true),
            target("qemu-nbd-directsync", Class::DurablePerWrite, true),
            target("raw", Class::Context, false),
            target("mirrorblk", Class::DurablePerWrite, false),
        ];
        let mut cells: Vec<Cell> = [
            ("nbdkit-file", 400.0),
            ("qemu-nbd-directsync", 100.0),
            ("raw", 1000.0),
            ("mirrorblk", 200.0),
        ]
        .iter()
        .map(|&(t, iops)| {
            let mut c = Cell::new(t, "j");
            c.runs.push(RunFigures {
                iops,
                ..RunFigures::default()
            });
            c.summarize();
            c
        })
        .collect();
        compute_class_ratios(&mut cells, &targets);
        let iops = |cells: &[Cell], t: &str| {
            let r = &cells.iter().find(|c| c.target == t).unwrap().vs_best_peer["iops"];
            (r.ratio, r.peer.clone())
        };
        // results.json: mirrorblk against the durable-per-write peer only.
        assert_eq!(
            iops(&cells, "mirrorblk"),
            (2.0, "qemu-nbd-directsync".into())
        );
        assert!(cells
            .iter()
            .find(|c| c.target == "raw")
            .unwrap()
            .vs_best_peer
            .is_empty());
        // The NBD-contract table shows mirrorblk against nbdkit-file.
        let contract = class_cells(&cells, &targets, Class::NbdContract);
        let names: Vec<&str> = contract.iter().map(|c| c.target.as_str()).collect();
        assert_eq!(names, ["nbdkit-file", "mirrorblk"]);
        assert_eq!(iops(&contract, "mirrorblk"), (0.5, "nbdkit-file".into()));
    }
}
