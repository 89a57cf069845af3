//! fio-compare: the same fio jobs through mirrorblkd and through its peers
//! (nbdkit memory and file, qemu-nbd), plus fio on the bare file, on fresh
//! 1 GiB file-backed volumes; with `--replicated`, also through mirrorblkd
//! primaries with 1 or 2 replicas on loopback (each mode, one replica down,
//! one replica behind a delaying proxy) and through their peer, a
//! qemu-storage-daemon mirroring to another one (`qsd-mirror`); prints one table and writes JSON,
//! markdown and an SVG chart under `benches/results/<UTC timestamp>/`.
//!
//! Run it with `benches/fio-compare [flags]` (builds the workspace in
//! release first) or `cargo run --release -p mirrorblk-benches --bin
//! fio-compare -- [flags]`; `--help` lists the flags.

// The flags' doc comments are their `--help` text, where `<N>` is the usual
// placeholder syntax, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

use mirrorblk_benches::cluster::{self, COPIES_METRIC, REQUEST_BYTES_METRIC};
use mirrorblk_benches::error::{Error, IoContext, Result};
use mirrorblk_benches::fio::{self, Endpoint, Job, Timing};
use mirrorblk_benches::machine;
use mirrorblk_benches::process::{self, Running, Volume};
use mirrorblk_benches::report::{
    self, Cell, MetricsReading, ProcessRecord, ReplicationRecord, RunRecord, Settings, TargetRecord,
};
use mirrorblk_benches::svg;
use mirrorblk_benches::targets::{self, Class, Launch, Target};

/// Wall seconds a run costs beyond ramp + runtime (fio start-up, connection,
/// JSON), measured on the 2-core development machine; used for the estimate.
const RUN_OVERHEAD_S: f64 = 0.4;
/// Per-target cost beyond the jobs (start-up, 1 GiB fill, stop), for the estimate.
const TARGET_OVERHEAD_S: f64 = 4.0;
/// Extra per running replica (journal creation, checksum resync, the fill
/// replicated), for the estimate.
const REPLICA_OVERHEAD_S: f64 = 3.0;
/// fio bound on the precondition fill (it ends when the region is written).
const FILL_BOUND_S: u64 = 300;

/// Compare mirrorblkd with peer NBD servers through fio's nbd engine.
///
/// Every target gets a fresh volume file under --dir (default: a temporary
/// directory in /var/tmp, on the real disk, not tmpfs), is filled once with
/// sequential 1 MiB writes so reads hit written data, then runs each job
/// --repeat times. The report has a table per durability class (durable per
/// write: raw-dsync, qemu-nbd-directsync, nbdkit-file-fua, mirrorblk; NBD's
/// contract: nbdkit-file, qemu-nbd, with mirrorblk beside them; replicated;
/// context) with medians (min–max), and each figure divided by the best
/// peer of the same class.
///
/// Repetitions run in rounds: each round starts every target afresh, fills
/// it and runs each job once, so a slow phase of a shared machine lands on
/// all targets alike rather than on whichever target ran then
/// (--no-interleave runs all repetitions of a target back to back).
#[derive(Debug, Parser)]
#[command(name = "fio-compare", version)]
struct Cli {
    /// Targets to run, comma separated (see --list).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Also run the replicated targets: mirrorblk with 1 and 2 replicas in
    /// each mode, one replica down, one replica behind a delaying proxy in
    /// each mode, 1 and 2 replicas with every node in --durability flush
    /// (NBD's contract), and their peer qsd-mirror (qemu-storage-daemon's
    /// write-blocking active mirror to a second qemu-storage-daemon); write
    /// jobs only: about 23 more minutes with the defaults. They can also be
    /// named in --targets.
    #[arg(long)]
    replicated: bool,
    /// Delay per direction, in milliseconds, of the proxy between primary
    /// and replica in the cross-site targets (mirrorblk-r1-MODE-<N>ms).
    #[arg(long, default_value_t = 5, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=1000))]
    cross_site_delay: u64,
    /// Jobs to run, comma separated (see --list).
    #[arg(long, value_delimiter = ',')]
    jobs: Option<Vec<String>>,
    /// Measured seconds per job run (after the ramp).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runtime: u64,
    /// Unmeasured warm-up seconds per job run (fio ramp_time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=600))]
    ramp: u64,
    /// Volume size and fio region, with K/M/G suffix (powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Repetitions of every job on every target.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Run all repetitions of a target back to back (one start and fill per
    /// target) instead of in rounds across the targets (one start and fill
    /// per target and round; ratios are fairer on a noisy machine).
    #[arg(long)]
    no_interleave: bool,
    /// Directory for the volume files (a fresh subdirectory is made and
    /// removed). Default: a temporary directory in /var/tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the results/<timestamp>/ directories go. Default: benches/results.
    #[arg(long)]
    results: Option<PathBuf>,
    /// The mirrorblkd binary. Default: next to this program, else
    /// target/release/mirrorblkd of the workspace.
    #[arg(long)]
    mirrorblkd: Option<PathBuf>,
    /// Another mirrorblkd build (e.g. the commit before a change) for an A/B
    /// in one run: adds the targets mirrorblk-base and mirrorblk-base-r1-sync
    /// (and the other replicated ones, renamed alike), run with the same
    /// arguments; name them in --targets. A build whose status answer has no
    /// `listen` field is ready once it logs "serving NBD on".
    #[arg(long, value_name = "PATH")]
    baseline_bin: Option<PathBuf>,
    /// Add a mirrorblkd target NAME run with extra daemon arguments, e.g.
    /// --mirrorblk-variant 'mirrorblk-cp5s=--checkpoint-interval 5s'.
    /// Repeatable. Arguments are split on whitespace.
    #[arg(long = "mirrorblk-variant", value_name = "NAME=ARGS")]
    variants: Vec<String>,
    /// Skip the sequential fill before the jobs (reads then hit holes).
    #[arg(long)]
    no_precondition: bool,
    /// Before starting, wait (at most --load-wait-max) until the 1-minute
    /// load average is below this; the run then goes ahead anyway, noting
    /// the load.
    #[arg(long, value_name = "LOAD")]
    wait_for_load: Option<f64>,
    /// Longest --wait-for-load wait, in seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    load_wait_max: u64,
    /// List the targets and jobs, then exit.
    #[arg(long)]
    list: bool,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..].trim_end_matches(['B', 'b']).trim_end_matches('i') {
                "" => 1,
                "K" | "k" => 1 << 10,
                "M" | "m" => 1 << 20,
                "G" | "g" => 1 << 30,
                "T" | "t" => 1 << 40,
                other => return Err(format!("unknown size suffix '{other}' (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 1G or 512M"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if v < (16 << 20) || v % 4096 != 0 {
        return Err(format!(
            "size {v} must be at least 16M and a multiple of 4K"
        ));
    }
    Ok(v)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn workspace_root() -> PathBuf {
    // benches/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn default_mirrorblkd(ws: &Path) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("mirrorblkd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| ws.join("target/release/mirrorblkd"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Picks items of `all` named in `wanted` (all if `None`), keeping `all`'s order.
fn select<T: Clone>(
    all: &[T],
    wanted: &Option<Vec<String>>,
    name: impl Fn(&T) -> &str,
    what: &str,
) -> Result<Vec<T>> {
    let Some(w) = wanted else {
        return Ok(all.to_vec());
    };
    let known: Vec<&str> = all.iter().map(&name).collect();
    for n in w {
        if !known.contains(&n.as_str()) {
            return Err(Error::Usage(format!(
                "unknown {what} '{n}'; known: {}",
                known.join(", ")
            )));
        }
    }
    Ok(all
        .iter()
        .filter(|t| w.iter().any(|n| n == name(t)))
        .cloned()
        .collect())
}

/// Longest wait for the filesystem to write back dirty data between targets.
const SYNC_BOUND: Duration = Duration::from_secs(120);

/// Writes back the dirty data of the filesystem holding `dir`, so one
/// target's page-cache writes (nbdkit-file) are not flushed to the disk while
/// the next target is measured. Runs `syncfs` on a helper thread and waits at
/// most [`SYNC_BOUND`]; returns the seconds waited.
fn settle_disk(dir: &Path) -> f64 {
    let t0 = Instant::now();
    let Ok(f) = std::fs::File::open(dir) else {
        return 0.0;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor this closure owns.
        unsafe { libc::syncfs(f.as_raw_fd()) };
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(SYNC_BOUND);
    t0.elapsed().as_secs_f64()
}

/// The fio engine options of a no-server target, for the record.
fn direct_command(extra: &[String], file: &Path) -> String {
    let mut c = "fio --ioengine=io_uring --direct=1".to_string();
    for a in extra {
        c.push(' ');
        c.push_str(a);
    }
    format!("{c} --filename={} (no server)", file.display())
}

/// Lines of a server log that look like trouble.
fn log_problems(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| {
            let u = l.to_ascii_uppercase();
            u.contains("WARN") || u.contains("ERROR") || u.contains("PANIC")
        })
        .take(50)
        .map(str::to_string)
        .collect()
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("fio-compare: {e}");
            std::process::exit(match e {
                Error::Usage(_) => 2,
                _ => 1,
            });
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let ws = workspace_root();
    let mirrorblkd = cli
        .mirrorblkd
        .clone()
        .unwrap_or_else(|| default_mirrorblkd(&ws));
    let mut all_targets = targets::builtin(&mirrorblkd);
    all_targets.extend(targets::replicated(&mirrorblkd, cli.cross_site_delay));
    if let Some(b) = &cli.baseline_bin {
        all_targets.extend(targets::baseline(b, &mirrorblkd, cli.cross_site_delay));
    }
    for v in &cli.variants {
        let (name, args) = v
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--mirrorblk-variant '{v}' is not NAME=ARGS")))?;
        let extra: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        all_targets.push(targets::mirrorblk_variant(
            name,
            &mirrorblkd,
            &extra,
            "mirrorblkd with extra arguments (see command); local writes durable before reply",
        ));
    }
    let all_jobs = fio::builtin_jobs();
    if cli.list {
        println!("targets:");
        for t in &all_targets {
            let d = if t.in_default {
                ""
            } else if t.class == Class::Replicated {
                " [--replicated; write jobs only]"
            } else {
                " [not in the default run]"
            };
            println!("  {:<22} {}{d}", t.name, t.durability);
        }
        println!("jobs:");
        for j in &all_jobs {
            println!("  {}", j.name);
        }
        return Ok(());
    }
    let wanted = cli.targets.clone().or_else(|| {
        Some(
            all_targets
                .iter()
                .filter(|t| t.in_default || (cli.replicated && t.class == Class::Replicated))
                .map(|t| t.name.clone())
                .collect(),
        )
    });
    let sel_targets = select(&all_targets, &wanted, |t: &Target| &t.name, "target")?;
    let jobs = select(&all_jobs, &cli.jobs, |j: &Job| j.name, "job")?;
    let repeat = cli.repeat as usize;
    // Rounds × repetitions per round = repeat.
    let (rounds, per_round) = if cli.no_interleave {
        (1, repeat)
    } else {
        (repeat, 1)
    };

    let handler = on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }

    if fio::version().is_none() {
        return Err(Error::Usage(
            "fio not found: install it (apt-get install fio)".into(),
        ));
    }
    let nbd_ok = fio::has_nbd_engine();

    // Availability first, so the estimate counts only what will run.
    let mut records: Vec<TargetRecord> = Vec::new();
    for t in &sel_targets {
        let mut skipped = t.check().err();
        if skipped.is_none() && matches!(t.launch, Launch::Server { .. }) && !nbd_ok {
            skipped = Some("this fio has no nbd engine (fio --enghelp=nbd fails)".into());
        }
        if let Some(why) = &skipped {
            println!("skipping {}: {why}", t.name);
        }
        records.push(TargetRecord {
            name: t.name.clone(),
            command: match &t.launch {
                Launch::Direct { fio_args } => direct_command(fio_args, Path::new("FILE")),
                Launch::Server { program, args, .. } => process::shell_line(program, args),
            },
            durability: t.durability.clone(),
            class: t.class,
            peer: t.peer,
            skipped,
            error: None,
            version: t.version(),
            ready_after_s: None,
            precondition: None,
            stop: None,
            log: None,
            log_problems: Vec::new(),
            jobs: t.jobs.clone(),
            processes: Vec::new(),
            replication: None,
            metrics: None,
        });
    }
    let runnable = records.iter().filter(|r| r.skipped.is_none()).count();
    let per_run = (cli.runtime + cli.ramp) as f64 + RUN_OVERHEAD_S;
    let mut total_runs = 0usize;
    let mut estimated_s = 0.0;
    for (t, r) in sel_targets.iter().zip(&records) {
        if r.skipped.is_some() {
            continue;
        }
        let n = jobs.iter().filter(|j| t.runs_job(j.name)).count() * repeat;
        total_runs += n;
        let replicas = t.replication.as_ref().map_or(0, |r| r.running());
        estimated_s += n as f64 * per_run
            + rounds as f64 * (TARGET_OVERHEAD_S + replicas as f64 * REPLICA_OVERHEAD_S);
    }
    println!(
        "plan: {runnable} target(s), {total_runs} fio run(s) in {rounds} round(s) of {} s runtime + {} s ramp + ~{RUN_OVERHEAD_S} s start, \
         + ~{TARGET_OVERHEAD_S} s per target and round (start, {} MiB fill, stop) + ~{REPLICA_OVERHEAD_S} s per replica ≈ {:.0} s",
        cli.runtime,
        cli.ramp,
        cli.size >> 20,
        estimated_s
    );

    let mut notes = Vec::new();
    if let Some(max) = cli.wait_for_load {
        let wait_max = Duration::from_secs(cli.load_wait_max);
        let t0 = Instant::now();
        while machine::load1().is_some_and(|l| l > max) && t0.elapsed() < wait_max && !interrupted()
        {
            println!(
                "load average {} above {max}; waiting (up to {} s more)",
                machine::loadavg(),
                (wait_max - t0.elapsed()).as_secs()
            );
            std::thread::sleep(Duration::from_secs(30).min(wait_max.saturating_sub(t0.elapsed())));
        }
        if machine::load1().is_some_and(|l| l > max) {
            notes.push(format!(
                "load average still above {max} after waiting {} s; ran anyway (load {})",
                t0.elapsed().as_secs(),
                machine::loadavg()
            ));
        }
    }

    // Output and volume directories.
    let started = now_secs();
    let stamp = report::utc(started).replace(['-', ':'], "");
    let out_dir = cli
        .results
        .clone()
        .unwrap_or_else(|| ws.join("benches/results"))
        .join(&stamp);
    let logs = out_dir.join("logs");
    let fio_dir = out_dir.join("fio");
    std::fs::create_dir_all(&logs).ctx(|| format!("cannot create {}", logs.display()))?;
    std::fs::create_dir_all(&fio_dir).ctx(|| format!("cannot create {}", fio_dir.display()))?;
    let base = cli.dir.clone().unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base).ctx(|| format!("cannot create {}", base.display()))?;
    let vol_dir = tempfile::Builder::new()
        .prefix("fio-compare-")
        .tempdir_in(&base)
        .ctx(|| format!("cannot make a temporary directory in {}", base.display()))?;

    let mut versions = vec![("fio".to_string(), fio::version().unwrap_or_default())];
    for (t, r) in sel_targets.iter().zip(&records) {
        if let (Launch::Server { program, .. }, Some(v)) = (&t.launch, &r.version) {
            let tool = program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // A binary built from a work tree may not match the recorded
            // commit: its build time tells which state of the tree it is.
            let built = std::fs::metadata(program)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| format!(" (binary built {})", report::utc(d.as_secs())))
                .unwrap_or_default();
            if !versions.iter().any(|(n, _)| *n == tool) {
                versions.push((tool, format!("{v}{built}")));
            }
        }
    }
    let mut mach = machine::describe(vol_dir.path(), &ws, versions);
    if mach.filesystem.starts_with("tmpfs") {
        notes.push(format!(
            "volume directory {} is on tmpfs: figures do not include a disk",
            vol_dir.path().display()
        ));
    }
    println!(
        "volumes in {} ({}); results in {}; load {}",
        vol_dir.path().display(),
        mach.filesystem,
        out_dir.display(),
        mach.load_before
    );

    let t_start = Instant::now();
    let mut done_runs = 0usize;
    let timing = Timing {
        runtime: cli.runtime,
        ramp: cli.ramp,
        size: cli.size,
        time_based: true,
    };
    // One cell per (target, job), filled across the rounds.
    let mut target_cells: Vec<Vec<Cell>> = sel_targets
        .iter()
        .map(|t| {
            jobs.iter()
                .filter(|j| t.runs_job(j.name))
                .map(|j| Cell::new(&t.name, j.name))
                .collect()
        })
        .collect();
    for round in 0..rounds {
        if rounds > 1 {
            println!("-- round {}/{rounds}", round + 1);
        }
        for ((t, rec), tcells) in sel_targets
            .iter()
            .zip(records.iter_mut())
            .zip(target_cells.iter_mut())
        {
            // A target that failed once is not retried in later rounds.
            if rec.skipped.is_some() || rec.error.is_some() || interrupted() {
                continue;
            }
            let waited = settle_disk(vol_dir.path());
            if waited > 1.0 {
                println!("   waited {waited:.1} s for the disk to write back dirty data");
            }
            let tjobs: Vec<Job> = jobs
                .iter()
                .filter(|j| t.runs_job(j.name))
                .cloned()
                .collect();
            let reps = Reps {
                first: round * per_round,
                count: per_round,
            };
            let res = run_target(
                t,
                rec,
                &tjobs,
                reps,
                timing,
                &cli,
                vol_dir.path(),
                &logs,
                &fio_dir,
                tcells,
                &mut done_runs,
                total_runs,
            );
            if let Err(e) = res {
                println!("{}: {e}", t.name);
                rec.error = Some(e.to_string());
            }
            if let Some(l) = &rec.log {
                rec.log_problems = log_problems(Path::new(l));
            }
            for p in rec.processes.iter_mut() {
                p.log_problems = log_problems(Path::new(&p.log));
            }
        }
    }
    let mut cells: Vec<Cell> = target_cells.into_iter().flatten().collect();
    if interrupted() {
        notes.push("interrupted: results are partial".into());
    }

    for c in cells.iter_mut() {
        c.summarize();
    }
    report::compute_class_ratios(&mut cells, &records);
    mach.load_after = machine::loadavg();
    let record = RunRecord {
        schema: "mirrorblk-fio-compare/1",
        started_utc: report::utc(started),
        finished_utc: report::utc(now_secs()),
        elapsed_s: t_start.elapsed().as_secs_f64(),
        estimated_s,
        settings: Settings {
            runtime_s: cli.runtime,
            ramp_s: cli.ramp,
            size: cli.size,
            repeat,
            rounds,
            targets: sel_targets.iter().map(|t| t.name.clone()).collect(),
            jobs: jobs.iter().map(|j| j.name.to_string()).collect(),
            dir: vol_dir.path().display().to_string(),
            argv: std::env::args().collect(),
        },
        machine: mach,
        jobs,
        targets: records,
        cells,
        notes,
    };
    let table = report::markdown(&record);
    let json = serde_json::to_string_pretty(&record)
        .map_err(|e| Error::Tool(format!("cannot serialise the results: {e}")))?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let p = out_dir.join(name);
        std::fs::write(&p, text).ctx(|| format!("cannot write {}", p.display()))?;
        Ok(p)
    };
    let header = format!(
        "# fio-compare {}\n\nMeasured on a {}-CPU machine shared with other work (noisy neighbour); see conditions below.\n\n",
        record.started_utc, record.machine.nproc
    );
    write("table.md", &(header + &table))?;
    write("results.json", &json)?;
    write("chart.svg", &svg::chart(&record))?;
    println!();
    println!("{table}");
    println!(
        "took {:.0} s (estimated {:.0} s). Results: {}/{{table.md,results.json,chart.svg}}, fio JSON in fio/, server logs in logs/",
        record.elapsed_s,
        record.estimated_s,
        out_dir.display()
    );
    Ok(())
}

/// A counter summed over rounds (a round whose scrape failed adds nothing;
/// the failure is in `MetricsReading::error`).
fn add(total: Option<f64>, round: Option<f64>) -> Option<f64> {
    match (total, round) {
        (Some(a), Some(b)) => Some(a + b),
        (None, b) => b,
        (a, None) => a,
    }
}

/// Reads the payload-copy and write-byte counters from a mirrorblkd's
/// `/metrics` (`port`): `(copies, client write bytes)`.
fn read_counters(port: u16) -> Result<(Option<f64>, Option<f64>)> {
    let text = cluster::scrape(port)?;
    Ok((
        cluster::metric_value(&text, COPIES_METRIC, &[]),
        cluster::metric_value(&text, REQUEST_BYTES_METRIC, &["op=\"write\""]),
    ))
}

/// Which repetitions one round runs: `count` of them, numbered from `first`.
#[derive(Debug, Clone, Copy)]
struct Reps {
    first: usize,
    count: usize,
}

/// Runs every job on one target for one round: fresh volume, server start
/// (a replicated target: replicas, proxies, primary, then a wait until the
/// replicas are in sync), fill, jobs, stop. Results go into `cells` (one per
/// job) and `rec` (the last round's processes and states; the copy counters
/// summed over the rounds).
#[allow(clippy::too_many_arguments)]
fn run_target(
    t: &Target,
    rec: &mut TargetRecord,
    jobs: &[Job],
    reps: Reps,
    timing: Timing,
    cli: &Cli,
    vol_dir: &Path,
    logs: &Path,
    fio_dir: &Path,
    cells: &mut [Cell],
    done_runs: &mut usize,
    total_runs: usize,
) -> Result<()> {
    let vol = Volume::create(vol_dir, &t.name, timing.size)?;
    // A replicated target's other nodes keep their files here.
    let side_dir = vol_dir.join(format!("{}.nodes", t.name));
    // Remove the volume's files however this function ends: 1 GiB per
    // target (and per replica) adds up, and the next target must start from
    // a fresh volume.
    struct Cleanup<'a>(&'a Volume, &'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0.file);
            let _ = std::fs::remove_file(&self.0.journal);
            let _ = std::fs::remove_dir_all(self.1);
        }
    }
    let _cleanup = Cleanup(&vol, &side_dir);
    let log = logs.join(format!("{}.log", t.name));
    let tdir = fio_dir.join(&t.name);
    std::fs::create_dir_all(&tdir).ctx(|| format!("cannot create {}", tdir.display()))?;
    println!("== {}: starting", t.name);
    let mut running: Option<Running> = t.start(&vol, &log, &side_dir)?;
    let ep = match (&running, &t.launch) {
        (None, Launch::Direct { fio_args }) => {
            rec.command = direct_command(fio_args, &vol.file);
            Endpoint::File(vol.file.clone(), fio_args.clone())
        }
        (None, Launch::Server { .. }) => {
            return Err(Error::Tool(format!("{} started no server", t.name)))
        }
        (Some(r), _) => {
            let s = &r.primary;
            rec.command = s.command.clone();
            rec.log = Some(log.display().to_string());
            rec.ready_after_s = Some(s.ready_after.as_secs_f64());
            rec.processes = r
                .processes()
                .into_iter()
                .map(|(role, p, charged)| ProcessRecord {
                    role: role.to_string(),
                    command: p.command.clone(),
                    log: p.log.display().to_string(),
                    cpu_charged: charged,
                    stop: None,
                    stop_error: None,
                    log_problems: Vec::new(),
                })
                .collect();
            println!(
                "   {} accepting on port {} after {:.2} s",
                t.name,
                s.port,
                s.ready_after.as_secs_f64()
            );
            Endpoint::Nbd(format!("nbd://127.0.0.1:{}/{}", s.port, t.export))
        }
    };
    let charged = running.as_ref().map(Running::charged).unwrap_or_default();
    let metrics_port = running
        .as_ref()
        .and_then(|r| r.primary.chosen("metrics_port"));
    if metrics_port.is_some() && rec.metrics.is_none() {
        rec.metrics = Some(MetricsReading::default());
    }
    let result = (|| -> Result<()> {
        if let (Some(r), Some(repl)) = (&running, &t.replication) {
            let admin = r.admin.clone().unwrap_or_default();
            let want: Vec<String> = repl
                .replica_names()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| repl.runs(*i))
                .map(|(_, n)| n)
                .collect();
            let mut rr = ReplicationRecord {
                peers: repl.peers,
                replicas_running: repl.running(),
                mode: repl.mode.as_str().to_string(),
                delay_ms_each_way: repl.delay_ms,
                in_sync_after_s: None,
                replicas_before_jobs: Vec::new(),
                replicas_after_jobs: Vec::new(),
            };
            if want.is_empty() {
                rr.replicas_before_jobs = cluster::status(&admin)?;
            } else {
                let (secs, states) =
                    cluster::wait_in_sync(&admin, &want, cluster::IN_SYNC_TIMEOUT, &interrupted)?;
                println!("   replicas {} in sync after {secs:.1} s", want.join(", "));
                rr.in_sync_after_s = Some(secs);
                rr.replicas_before_jobs = states;
            }
            rec.replication = Some(rr);
        }
        if !cli.no_precondition {
            let fill = Timing {
                runtime: FILL_BOUND_S,
                ramp: 0,
                size: timing.size,
                time_based: false,
            };
            let f = fio::run(
                &fio::precondition_job(),
                &ep,
                fill,
                &tdir.join("precondition.json"),
                &charged,
            )?;
            println!(
                "   filled {} MiB at {:.0} MiB/s in {:.1} s",
                timing.size >> 20,
                f.mib_s,
                f.wall_s
            );
            rec.precondition = Some(f);
            if let (Some(port), Some(m)) = (metrics_port, rec.metrics.as_mut()) {
                match read_counters(port) {
                    Ok((copies, _)) => {
                        m.payload_copies_after_fill = add(m.payload_copies_after_fill, copies)
                    }
                    Err(e) => m.error = Some(e.to_string()),
                }
            }
        }
        for rep in reps.first..reps.first + reps.count {
            for (ji, job) in jobs.iter().enumerate() {
                if interrupted() {
                    return Err(Error::Tool("interrupted".into()));
                }
                if let Some(r) = running.as_mut() {
                    if let Some((role, log, st)) = r.exited()? {
                        return Err(Error::Tool(format!(
                            "{role} exited during the run ({st}); log {}:\n{}",
                            log.display(),
                            process::log_tail(&log, 15)
                        )));
                    }
                }
                *done_runs += 1;
                let out = tdir.join(format!("{}-r{}.json", job.name, rep + 1));
                match fio::run(job, &ep, timing, &out, &charged) {
                    Ok(f) => {
                        println!(
                            "   [{}/{}] {} {} #{}: {:.0} IOPS, {:.1} MiB/s, p99 {}, server CPU {}",
                            done_runs,
                            total_runs,
                            t.name,
                            job.name,
                            rep + 1,
                            f.iops,
                            f.mib_s,
                            report::fmt_us(f.lat_p99_us),
                            f.cpu_s_per_gib
                                .map(|c| format!("{c:.2} s/GiB"))
                                .unwrap_or_else(|| "n/a".into())
                        );
                        cells[ji].runs.push(f);
                    }
                    Err(e) => {
                        println!(
                            "   [{}/{}] {} {} #{}: FAILED: {e}",
                            done_runs,
                            total_runs,
                            t.name,
                            job.name,
                            rep + 1
                        );
                        cells[ji].errors.push(e.to_string());
                    }
                }
            }
        }
        Ok(())
    })();
    // Counters and replica states after the jobs (also after a failure:
    // they help explain it), before anything is stopped.
    if let (Some(port), Some(m)) = (metrics_port, rec.metrics.as_mut()) {
        match read_counters(port) {
            Ok((copies, bytes)) => {
                // Each round's processes start from zero: sum them.
                m.payload_copies_after_jobs = add(m.payload_copies_after_jobs, copies);
                m.write_bytes_after_jobs = add(m.write_bytes_after_jobs, bytes);
                println!(
                    "   payload copies: {} after {:.2} GiB of client writes",
                    copies
                        .map(|c| format!("{c:.0}"))
                        .unwrap_or_else(|| "?".into()),
                    bytes.unwrap_or(0.0) / fio::GIB
                );
            }
            Err(e) => m.error = Some(e.to_string()),
        }
    }
    if let (Some(r), Some(rr)) = (&running, rec.replication.as_mut()) {
        if let Some(admin) = &r.admin {
            match cluster::status(admin) {
                Ok(st) => rr.replicas_after_jobs = st,
                Err(e) => println!("   cannot read the replica states: {e}"),
            }
        }
    }
    if let Some(r) = running.as_mut() {
        let stops = r.stop();
        for st in &stops {
            match &st.outcome {
                Ok(o) => println!(
                    "   stopped {}: {} after {:.2} s{}",
                    st.role,
                    o.status,
                    o.seconds,
                    if o.killed { " (needed SIGKILL)" } else { "" }
                ),
                Err(e) => println!("   stopping {} failed: {e}", st.role),
            }
            if let Some(p) = rec.processes.iter_mut().find(|p| p.role == st.role) {
                match &st.outcome {
                    Ok(o) => p.stop = Some(o.clone()),
                    Err(e) => p.stop_error = Some(e.clone()),
                }
            }
        }
        match stops.into_iter().next().map(|s| s.outcome) {
            Some(Ok(o)) => rec.stop = Some(o),
            Some(Err(e)) => return Err(Error::Tool(e)),
            None => {}
        }
    }
    result
}
