//! fio jobs: their definitions, how one run is launched against a target,
//! and what is read back from fio's JSON.
//!
//! Every job runs with `--unified_rw_reporting=mixed` so reads and writes of
//! the mixed job are summarised together (fio then reports a single `mixed`
//! section for every job, one parser for all), and with `--lat_percentiles=1`
//! so fio computes percentiles of total latency (`lat_ns`: submission to
//! completion), not only of completion latency (`clat_ns`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::proc_stat;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;
/// Bytes in a MiB.
pub const MIB: f64 = (1u64 << 20) as f64;
/// Extra wall time a fio run may take beyond ramp + runtime before it is
/// killed (connection set-up, a stalled server).
pub const FIO_GRACE: Duration = Duration::from_secs(30);

/// One fio workload.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Name used on the command line and in the table.
    pub name: &'static str,
    /// fio `rw=`.
    pub rw: &'static str,
    /// fio `bs=`.
    pub bs: &'static str,
    /// fio `iodepth=`.
    pub iodepth: u32,
    /// fio `rwmixread=` for mixed jobs.
    pub rwmixread: Option<u32>,
    /// fio `fsync=`: an NBD FLUSH after every this many writes (the jobs
    /// that ask for NBD's contract: durable at FLUSH).
    pub fsync: Option<u32>,
    /// fio `numjobs=`: connections (NBD) driving the job at once, each at
    /// `iodepth`; more than one is reported as one group (issue 17's reads
    /// "with two jobs": a volume's connections on several cores).
    pub numjobs: u32,
}

/// The jobs of the default comparison, in table order.
pub fn builtin_jobs() -> Vec<Job> {
    let j = |name, rw, bs, iodepth, rwmixread| Job {
        name,
        rw,
        bs,
        iodepth,
        rwmixread,
        fsync: None,
        numjobs: 1,
    };
    vec![
        j("4k-randwrite-qd1", "randwrite", "4k", 1, None),
        j("4k-randwrite-qd32", "randwrite", "4k", 32, None),
        Job {
            fsync: Some(32),
            ..j("4k-randwrite-qd32-fsync32", "randwrite", "4k", 32, None)
        },
        j("4k-randread-qd32", "randread", "4k", 32, None),
        Job {
            numjobs: 2,
            ..j("4k-randread-qd32-2jobs", "randread", "4k", 32, None)
        },
        j("64k-randrw70-qd16", "randrw", "64k", 16, Some(70)),
        j("1m-write-qd8", "write", "1m", 8, None),
        j("1m-read-qd8", "read", "1m", 8, None),
    ]
}

/// The sequential fill run before measuring, so reads hit written data and
/// file extents are allocated on every target alike.
pub fn precondition_job() -> Job {
    Job {
        name: "precondition-1m-write-qd8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        rwmixread: None,
        fsync: None,
        numjobs: 1,
    }
}

/// Where fio sends its I/O.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// io_uring with O_DIRECT on a file, plus extra fio options.
    File(PathBuf, Vec<String>),
    /// fio's nbd engine on this URI.
    Nbd(String),
}

/// How long and how much a run does.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Measured seconds (fio `runtime`), after the ramp.
    pub runtime: u64,
    /// Unmeasured warm-up seconds (fio `ramp_time`).
    pub ramp: u64,
    /// Region size in bytes (fio `size`).
    pub size: u64,
    /// Whether the run is time based (jobs) or ends after `size` bytes (fill).
    pub time_based: bool,
}

/// The figures of one fio run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    /// Operations per second (reads + writes).
    pub iops: f64,
    /// MiB per second (reads + writes).
    pub mib_s: f64,
    /// Total-latency percentiles in microseconds.
    pub lat_p50_us: f64,
    /// 99th percentile.
    pub lat_p99_us: f64,
    /// 99.9th percentile.
    pub lat_p999_us: f64,
    /// Which fio latency the percentiles are from (`lat_ns` or `clat_ns`).
    pub lat_source: String,
    /// Mean total latency in microseconds.
    pub lat_mean_us: f64,
    /// Bytes moved in the measured period.
    pub io_bytes: u64,
    /// Measured period in seconds, as fio reports it.
    pub fio_runtime_s: f64,
    /// Server CPU seconds per GiB moved (steady-state window, see
    /// [`CpuSample`]); `None` without a server.
    pub cpu_s_per_gib: Option<f64>,
    /// The raw CPU samples behind `cpu_s_per_gib`.
    pub cpu: Option<CpuSample>,
    /// fio's own CPU use (the client), percent of one core, user and system.
    pub fio_usr_cpu: f64,
    /// See `fio_usr_cpu`.
    pub fio_sys_cpu: f64,
    /// Wall seconds of the whole fio process.
    pub wall_s: f64,
    /// Path of fio's JSON output.
    pub fio_json: String,
}

/// Server CPU samples for one run.
///
/// fio does not report the bytes moved during its ramp, so dividing the CPU
/// of the whole process lifetime by the measured bytes would overcharge the
/// server by (ramp + set-up) / runtime. Instead the tree's CPU time is also
/// sampled over a window inside the measured period (from ramp + margin
/// after fio starts, to ramp + runtime after it starts: fio's set-up is
/// shorter than the margin), and the CPU rate in that window is divided by
/// fio's measured byte rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuSample {
    /// CPU seconds of the server tree over the whole fio process.
    pub whole_run_cpu_s: f64,
    /// Wall seconds of the whole fio process.
    pub whole_run_wall_s: f64,
    /// CPU seconds of the server tree in the window.
    pub window_cpu_s: f64,
    /// Wall seconds of the window.
    pub window_wall_s: f64,
    /// Server CPU cores busy on average in the window.
    pub window_cores: f64,
    /// The window's CPU seconds per charged process (primary, replicas),
    /// labelled as in [`Charged`]; they sum to `window_cpu_s`.
    pub window_cpu_s_by_process: Vec<(String, f64)>,
}

/// A process whose tree's CPU is charged to the target, with a label for
/// the record ("mirrorblkd", "replica n2").
#[derive(Debug, Clone)]
pub struct Charged {
    /// Label in the record.
    pub label: String,
    /// Root PID of the tree.
    pub pid: i32,
}

/// fio's version line.
pub fn version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether this fio has the nbd engine (it is optional at build time).
pub fn has_nbd_engine() -> bool {
    Command::new("fio")
        .arg("--enghelp=nbd")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The fio command line for `job` on `ep`, writing JSON to `out`.
pub fn args(job: &Job, ep: &Endpoint, t: Timing, out: &Path) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", job.name),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        format!("--size={}", t.size),
        format!("--numjobs={}", job.numjobs),
        "--output-format=json".into(),
        format!("--output={}", out.display()),
        "--lat_percentiles=1".into(),
        "--percentile_list=50:99:99.9".into(),
        "--unified_rw_reporting=mixed".into(),
    ];
    if job.numjobs > 1 {
        // One `jobs[0]` summing every job, which `parse` reads.
        a.push("--group_reporting=1".into());
    }
    if let Some(n) = job.fsync {
        a.push(format!("--fsync={n}"));
    }
    if let Some(m) = job.rwmixread {
        a.push(format!("--rwmixread={m}"));
    }
    if t.time_based {
        a.push("--time_based=1".into());
        a.push(format!("--runtime={}", t.runtime));
        a.push(format!("--ramp_time={}", t.ramp));
    } else {
        // A fill ends after `size` bytes; the runtime only bounds a stall.
        a.push(format!("--runtime={}", t.runtime));
    }
    match ep {
        Endpoint::File(f, extra) => {
            a.push("--ioengine=io_uring".into());
            a.push("--direct=1".into());
            a.extend(extra.iter().cloned());
            a.push(format!("--filename={}", f.display()));
        }
        Endpoint::Nbd(uri) => {
            a.push("--ioengine=nbd".into());
            a.push(format!("--uri={uri}"));
        }
    }
    a
}

/// Runs fio once, sampling the CPU of the process trees rooted at `charged`
/// (none: no server, no CPU figure; several: a primary and its replicas,
/// summed). Killed if it outlives ramp + runtime + [`FIO_GRACE`].
pub fn run(
    job: &Job,
    ep: &Endpoint,
    t: Timing,
    out: &Path,
    charged: &[Charged],
) -> Result<RunFigures> {
    let argv = args(job, ep, t, out);
    let pids: Vec<i32> = charged.iter().map(|c| c.pid).collect();
    let cpu = || -> Option<Vec<f64>> {
        if pids.is_empty() {
            None
        } else {
            proc_stat::trees_cpu_seconds(&pids)
        }
    };
    let total = |v: &Vec<f64>| v.iter().sum::<f64>();
    let cpu_start = cpu();
    let t0 = Instant::now();
    let mut child = Command::new("fio")
        .args(&argv)
        .stdin(Stdio::null())
        // fio prints "fio: connected to NBD server" on stdout even with
        // --output; JSON goes to the file, chatter is dropped.
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "cannot run fio (is it installed?)".into())?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        })
    });
    let margin = (t.runtime as f64 / 2.0).min(0.5);
    let win_start = Duration::from_secs_f64(t.ramp as f64 + margin);
    let win_end = Duration::from_secs(t.ramp + t.runtime);
    let bound = Duration::from_secs(t.ramp + t.runtime) + FIO_GRACE;
    let mut w0: Option<(Instant, Vec<f64>)> = None;
    let mut w1: Option<(Instant, Vec<f64>)> = None;
    let status = loop {
        if let Some(st) = child.try_wait().ctx(|| "cannot wait for fio".into())? {
            break st;
        }
        let el = t0.elapsed();
        if t.time_based {
            if w0.is_none() && el >= win_start {
                w0 = cpu().map(|c| (Instant::now(), c));
            }
            if w1.is_none() && el >= win_end {
                w1 = cpu().map(|c| (Instant::now(), c));
            }
        }
        if el >= bound {
            // Our own child, by handle.
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Tool(format!(
                "fio {} did not finish within {bound:?} (server stalled?); command: fio {}",
                job.name,
                argv.join(" ")
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu_end = cpu();
    let err_text = stderr
        .and_then(|h| h.join().ok())
        .unwrap_or_default()
        .trim()
        .to_string();
    let text =
        std::fs::read_to_string(out).ctx(|| format!("cannot read fio output {}", out.display()));
    if !status.success() {
        return Err(Error::Tool(format!(
            "fio {} failed ({status}): {err_text}; command: fio {}",
            job.name,
            argv.join(" ")
        )));
    }
    let mut f = parse(&text?).map_err(|e| {
        Error::Tool(format!(
            "fio {}: {e} (output {}; stderr: {err_text})",
            job.name,
            out.display()
        ))
    })?;
    f.wall_s = wall;
    f.fio_json = out.display().to_string();
    if let (Some(a), Some(b)) = (cpu_start, cpu_end) {
        let mut s = CpuSample {
            whole_run_cpu_s: total(&b) - total(&a),
            whole_run_wall_s: wall,
            ..CpuSample::default()
        };
        if let (Some((ta, ca)), Some((tb, cb))) = (w0, w1) {
            s.window_cpu_s = total(&cb) - total(&ca);
            s.window_cpu_s_by_process = charged
                .iter()
                .zip(cb.iter().zip(&ca))
                .map(|(c, (b, a))| (c.label.clone(), b - a))
                .collect();
            s.window_wall_s = tb.duration_since(ta).as_secs_f64();
            if s.window_wall_s > 0.0 {
                s.window_cores = s.window_cpu_s / s.window_wall_s;
                let gib_per_s = f.mib_s * MIB / GIB;
                if gib_per_s > 0.0 {
                    f.cpu_s_per_gib = Some(s.window_cores / gib_per_s);
                }
            }
        }
        f.cpu = Some(s);
    }
    Ok(f)
}

/// Reads the figures from fio's JSON output (a `mixed` section, see the
/// module docs). Text before the first `{` is skipped: some engines print a
/// line there.
pub fn parse(text: &str) -> std::result::Result<RunFigures, String> {
    let start = text.find('{').ok_or("no JSON in fio output")?;
    let v: Value = serde_json::from_str(&text[start..])
        .map_err(|e| format!("fio JSON does not parse: {e}"))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or("fio JSON has no jobs[0]")?;
    if let Some(e) = job.get("error").and_then(Value::as_i64) {
        if e != 0 {
            return Err(format!("fio reports error {e} (an errno)"));
        }
    }
    let m = job
        .get("mixed")
        .ok_or("fio JSON has no 'mixed' section (needs --unified_rw_reporting=mixed)")?;
    let num = |o: &Value, k: &str| o.get(k).and_then(Value::as_f64);
    // Total latency when fio computed its percentiles, else completion latency.
    let (src, lat) = ["lat_ns", "clat_ns"]
        .iter()
        .find_map(|k| {
            let l = m.get(*k)?;
            l.get("percentile").map(|_| (*k, l))
        })
        .ok_or("fio JSON has no latency percentiles")?;
    let pct = |p: &str| {
        lat.get("percentile")
            .and_then(|x| x.get(p))
            .and_then(Value::as_f64)
            .map(|ns| ns / 1000.0)
            .ok_or(format!("fio JSON lacks the {p} percentile of {src}"))
    };
    Ok(RunFigures {
        iops: num(m, "iops").ok_or("no iops")?,
        mib_s: num(m, "bw_bytes").ok_or("no bw_bytes")? / MIB,
        lat_p50_us: pct("50.000000")?,
        lat_p99_us: pct("99.000000")?,
        lat_p999_us: pct("99.900000")?,
        lat_source: src.to_string(),
        lat_mean_us: num(lat, "mean").unwrap_or(f64::NAN) / 1000.0,
        io_bytes: num(m, "io_bytes").unwrap_or(0.0) as u64,
        fio_runtime_s: num(m, "runtime").unwrap_or(0.0) / 1000.0,
        fio_usr_cpu: num(job, "usr_cpu").unwrap_or(f64::NAN),
        fio_sys_cpu: num(job, "sys_cpu").unwrap_or(f64::NAN),
        ..RunFigures::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_mixed_section_after_chatter() {
        let text = r#"fio: connected to NBD server
{"fio version":"fio-3.33","jobs":[{"error":0,"usr_cpu":10.0,"sys_cpu":20.0,
 "mixed":{"io_bytes":4096000,"bw_bytes":1048576,"iops":256.0,"runtime":4000,
  "lat_ns":{"mean":3000.0,"percentile":{"50.000000":2000,"99.000000":9000,"99.900000":15000}},
  "clat_ns":{"mean":2500.0}}}]}"#;
        let f = parse(text).expect("parses");
        assert_eq!(f.iops, 256.0);
        assert_eq!(f.mib_s, 1.0);
        assert_eq!(
            (f.lat_p50_us, f.lat_p99_us, f.lat_p999_us),
            (2.0, 9.0, 15.0)
        );
        assert_eq!(f.lat_source, "lat_ns");
        assert_eq!(f.fio_runtime_s, 4.0);
    }

    #[test]
    fn reports_a_fio_error() {
        let text = r#"{"jobs":[{"error":5,"mixed":{}}]}"#;
        assert!(parse(text).unwrap_err().contains("error 5"));
    }

    #[test]
    fn several_jobs_are_reported_as_one_group() {
        let t = Timing {
            runtime: 4,
            ramp: 1,
            size: 1 << 30,
            time_based: true,
        };
        let ep = Endpoint::Nbd("nbd://127.0.0.1:1/vol0".into());
        let jobs = builtin_jobs();
        let job = |name: &str| jobs.iter().find(|j| j.name == name).expect("a builtin job");
        let two = args(job("4k-randread-qd32-2jobs"), &ep, t, Path::new("o.json"));
        assert!(two.contains(&"--numjobs=2".to_string()));
        assert!(two.contains(&"--group_reporting=1".to_string()));
        let one = args(job("4k-randread-qd32"), &ep, t, Path::new("o.json"));
        assert!(one.contains(&"--numjobs=1".to_string()));
        assert!(!one.iter().any(|a| a.starts_with("--group_reporting")));
    }
}
