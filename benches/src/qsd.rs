//! `qsd-mirror`: the closest open peer of a synchronously replicated NBD
//! export. Two `qemu-storage-daemon` processes on loopback:
//!
//! * the **mirror target** serves its own raw file (`cache.direct=on`,
//!   io_uring) over NBD;
//! * the **source** serves the volume file the same way over NBD to fio and,
//!   set up through its QMP socket ([`crate::qmp`]), adds an NBD client node
//!   for the target and runs `blockdev-mirror` with `sync=full` and
//!   `copy-mode=write-blocking`: once the job is `ready`, every write reaches
//!   the target before it completes.
//!
//! The order of a start: target daemon (on a port we choose), source daemon
//! (NBD port we choose, QMP socket in the target's directory), QMP
//! `blockdev-add` + `blockdev-mirror`, then a wait, bounded by
//! [`MIRROR_READY_TIMEOUT`], until `query-block-jobs` shows the job ready.
//! The stop: `block-job-cancel` (a ready mirror then completes without
//! switching over, and flushes the target once), `quit`, and SIGTERM/SIGKILL
//! by PID for whatever is still running (see
//! [`crate::process::Running::stop`]). What happened goes to the source's
//! log, problems as `ERROR` lines (which the report lists).
//!
//! QEMU's option parser splits on commas: a comma inside a value is
//! written `,,` ([`opt_value`]); a path that is not UTF-8 is refused.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};
use crate::process::{Helper, PortMode, Running, Server, Volume};
use crate::qmp::Qmp;

/// The NBD export name on both daemons.
pub const EXPORT: &str = "vol0";
/// The source's format node, which the export and the mirror job use.
const SOURCE_NODE: &str = "disk";
/// The source's NBD client node pointing at the target daemon.
const TARGET_NODE: &str = "mirror-target";
/// The mirror job's id.
pub const JOB: &str = "mirror0";
/// Bound of one QMP command (and of the connection with its handshake).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the mirror to be ready: the initial full copy of a fresh
/// (sparse, all-zero) volume takes milliseconds; the rest is slack for a
/// loaded machine or a volume with data.
pub const MIRROR_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Pause between `query-block-jobs` polls while waiting for ready.
const POLL: Duration = Duration::from_millis(50);
/// Longest wait for the job to end after `block-job-cancel`.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// What a completed write promises on `qsd-mirror`, as verified with strace
/// on qemu-storage-daemon 10.0.2 (aio=threads so the syscalls are visible):
/// a write is `pwrite` on both O_DIRECT files before its reply; NBD FLUSH and
/// FUA writes `fdatasync` the source only; the target sees its one
/// `fdatasync` when the job is cancelled.
pub const DURABILITY: &str = "qemu-storage-daemon active mirror (blockdev-mirror sync=full, \
     copy-mode=write-blocking) to a second qemu-storage-daemon over NBD on loopback: every write \
     in both daemons' O_DIRECT files (cache.direct=on: the device, not the page cache) before its \
     reply, no flush per write; NBD FLUSH and FUA make only the source durable (the running \
     mirror never flushes its target; it does once when the job is cancelled)";

/// How the two daemons are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdMirror {
    /// The file driver's `aio` (`io_uring`, `native`, `threads`).
    pub aio: &'static str,
    /// `blockdev-mirror`'s `copy-mode`.
    pub copy_mode: &'static str,
}

impl Default for QsdMirror {
    fn default() -> Self {
        QsdMirror {
            aio: "io_uring",
            copy_mode: "write-blocking",
        }
    }
}

/// `s` as a value of a QEMU `key=value,...` option: commas doubled.
pub fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

/// A path as an option value ([`opt_value`]); refused if it is not UTF-8
/// (QEMU's options are text).
pub fn path_value(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        Error::Usage(format!(
            "path {} is not UTF-8: qemu-storage-daemon options cannot carry it",
            p.display()
        ))
    })?;
    Ok(opt_value(s))
}

/// The `--blockdev` pair of a raw file `file` (already an option value),
/// bypassing the page cache.
fn blockdev_args(m: &QsdMirror, file: &str) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=file,node-name=file0,filename={file},cache.direct=on,aio={}",
            m.aio
        ),
        "--blockdev".into(),
        format!("driver=raw,node-name={SOURCE_NODE},file=file0"),
    ]
}

/// The NBD server on `127.0.0.1:{port}` (chosen when it starts) and the
/// writable export of the format node.
fn export_args() -> Vec<String> {
    vec![
        "--nbd-server".into(),
        "addr.type=inet,addr.host=127.0.0.1,addr.port={port}".into(),
        "--export".into(),
        format!("type=nbd,id=export0,node-name={SOURCE_NODE},name={EXPORT},writable=on"),
    ]
}

/// The source daemon's arguments with `{file}` (the volume) and `{qmp}` (its
/// QMP socket) still to fill by [`fill`]; `{port}` is filled when it starts.
/// The monitor comes first: it exists once the NBD port accepts.
pub fn source_template(m: &QsdMirror) -> Vec<String> {
    let mut a = vec![
        "--chardev".into(),
        "socket,id=qmp0,path={qmp},server=on,wait=off".into(),
        "--monitor".into(),
        "chardev=qmp0".into(),
    ];
    a.extend(blockdev_args(m, "{file}"));
    a.extend(export_args());
    a
}

/// `template` with `{file}` and `{qmp}` replaced by the escaped paths; the
/// socket path must fit a Unix socket address.
pub fn fill(template: &[String], file: &Path, qmp: &Path) -> Result<Vec<String>> {
    let qmp_len = qmp.as_os_str().len();
    if qmp_len > SUN_PATH_MAX {
        return Err(Error::Usage(format!(
            "QMP socket path {} is {qmp_len} bytes, more than a Unix socket address holds \
             ({SUN_PATH_MAX}): use a shorter --dir",
            qmp.display()
        )));
    }
    let (f, q) = (path_value(file)?, path_value(qmp)?);
    Ok(template
        .iter()
        .map(|a| a.replace("{file}", &f).replace("{qmp}", &q))
        .collect())
}

/// The mirror target daemon's arguments for `file`.
pub fn target_args(m: &QsdMirror, file: &Path) -> Result<Vec<String>> {
    let mut a = blockdev_args(m, &path_value(file)?);
    a.extend(export_args());
    Ok(a)
}

/// The QMP commands that start the mirror to the target daemon on `port`:
/// an NBD client node, then the job.
pub fn mirror_commands(m: &QsdMirror, port: u16) -> [(&'static str, Value); 2] {
    [
        (
            "blockdev-add",
            json!({
                "driver": "nbd",
                "node-name": TARGET_NODE,
                "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()},
                "export": EXPORT,
            }),
        ),
        (
            "blockdev-mirror",
            json!({
                "job-id": JOB,
                "device": SOURCE_NODE,
                "target": TARGET_NODE,
                "sync": "full",
                "copy-mode": m.copy_mode,
            }),
        ),
    ]
}

/// One block job as `query-block-jobs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// `created`, `running`, `ready`, `concluded`, ...
    pub status: String,
    /// Whether it may be completed (for a mirror: source and target in sync).
    pub ready: bool,
    /// Bytes copied so far, and the total.
    pub offset: u64,
    /// Total bytes of the job.
    pub len: u64,
    /// Whether writes are mirrored synchronously now (write-blocking mode).
    pub actively_synced: Option<bool>,
    /// `ok`, `failed`, `nospace`.
    pub io_status: String,
}

impl std::fmt::Display for JobView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {}, ready {}, actively-synced {}, io-status {}, {} of {} bytes",
            self.status,
            self.ready,
            self.actively_synced
                .map_or("?".to_string(), |b| b.to_string()),
            self.io_status,
            self.offset,
            self.len
        )
    }
}

/// Job `id` in a `query-block-jobs` return value, if it is listed.
pub fn job_view(jobs: &Value, id: &str) -> Option<JobView> {
    let j = jobs
        .as_array()?
        .iter()
        .find(|j| j.get("device").and_then(Value::as_str) == Some(id))?;
    let text = |k: &str| j.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let num = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(JobView {
        status: text("status"),
        ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
        offset: num("offset"),
        len: num("len"),
        actively_synced: j.get("actively-synced").and_then(Value::as_bool),
        io_status: text("io-status"),
    })
}

/// Where the wait for a ready mirror stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    /// Ready, and (in write-blocking mode) mirroring every write.
    Ready,
    /// Still copying.
    Copying,
    /// It cannot become ready; why.
    Failed(String),
}

/// Decides from one `query-block-jobs` view of the job.
pub fn readiness(view: Option<&JobView>, copy_mode: &str) -> Readiness {
    let Some(v) = view else {
        return Readiness::Failed("the job is gone (it failed and was dismissed?)".into());
    };
    if v.io_status != "ok" && v.io_status != "?" {
        return Readiness::Failed(format!("I/O error: {v}"));
    }
    match v.status.as_str() {
        "aborting" | "concluded" | "null" | "undefined" => {
            Readiness::Failed(format!("the job ended: {v}"))
        }
        // Write-blocking mode mirrors writes synchronously only once
        // `actively-synced` (QEMU sets it at ready); older QEMUs lack the field.
        "ready"
            if v.ready && (copy_mode != "write-blocking" || v.actively_synced != Some(false)) =>
        {
            Readiness::Ready
        }
        _ => Readiness::Copying,
    }
}

/// Appends `line` to `log` (best effort: the log is a record, not a channel).
fn note(log: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
    {
        let _ = writeln!(f, "qsd-mirror: {line}");
    }
}

/// Adds the target node, starts the mirror and waits until it is ready;
/// returns the job as it was then.
fn set_up_mirror(q: &mut Qmp, m: &QsdMirror, target_port: u16) -> Result<JobView> {
    for (cmd, args) in mirror_commands(m, target_port) {
        q.execute(cmd, &args, QMP_TIMEOUT)?;
    }
    let deadline = Instant::now() + MIRROR_READY_TIMEOUT;
    loop {
        let jobs = q.execute("query-block-jobs", &Value::Null, QMP_TIMEOUT)?;
        let view = job_view(&jobs, JOB);
        match readiness(view.as_ref(), m.copy_mode) {
            Readiness::Ready => return view.ok_or_else(|| Error::Tool("job vanished".into())),
            Readiness::Failed(why) => {
                return Err(Error::Tool(format!("mirror job {JOB} failed: {why}")))
            }
            Readiness::Copying if Instant::now() >= deadline => {
                return Err(Error::Tool(format!(
                    "mirror job {JOB} not ready within {MIRROR_READY_TIMEOUT:?}: {}",
                    view.map_or("not listed".to_string(), |v| v.to_string())
                )))
            }
            Readiness::Copying => std::thread::sleep(POLL),
        }
    }
}

/// The graceful stop: records the job's state after the run, cancels it
/// (waiting for its end), then `quit`. Every step is noted in `log`.
fn shut_down(mut q: Qmp, log: &Path) -> std::result::Result<(), String> {
    match q.execute("query-block-jobs", &Value::Null, QMP_TIMEOUT) {
        Ok(jobs) => match job_view(&jobs, JOB) {
            Some(v) => note(log, &format!("job {JOB} before the stop: {v}")),
            None => note(log, &format!("ERROR: job {JOB} is gone before the stop")),
        },
        Err(e) => note(log, &format!("ERROR: query-block-jobs: {e}")),
    }
    let t0 = Instant::now();
    let cancelled = q
        .execute("block-job-cancel", &json!({ "device": JOB }), QMP_TIMEOUT)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            q.wait_event(
                &["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"],
                CANCEL_TIMEOUT,
            )
            .map_err(|e| e.to_string())
        });
    match &cancelled {
        Ok(e) => note(
            log,
            &format!(
                "job ended by block-job-cancel after {:.2} s: {} {}",
                t0.elapsed().as_secs_f64(),
                e.name,
                e.data
            ),
        ),
        Err(e) => note(log, &format!("ERROR: block-job-cancel: {e}")),
    }
    // Quit even when the cancel failed: the daemon should still go.
    match q.execute("quit", &Value::Null, QMP_TIMEOUT) {
        Ok(_) => {
            note(log, "quit accepted");
            cancelled.map(|_| ())
        }
        Err(e) => {
            note(log, &format!("ERROR: quit: {e}"));
            Err(format!("quit: {e}"))
        }
    }
}

/// Starts `qsd-mirror` for `vol`: the target daemon (its volume in `dir`,
/// its log beside `log`), then the source daemon (`program` with `template`,
/// see [`source_template`]) logging to `log`, then the mirror over QMP.
/// Returns once the mirror is ready; the processes are stopped by
/// [`Running::stop`] (graceful first) or, on an error here, when dropped.
pub fn start(
    m: &QsdMirror,
    program: &Path,
    template: &[String],
    vol: &Volume,
    dir: &Path,
    log: &Path,
) -> Result<Running> {
    std::fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let qmp_path = dir.join("source.qmp");
    // Checked before anything starts: a bad path is a usage error.
    let source_args = fill(template, &vol.file, &qmp_path)?;
    let tvol = Volume::create(dir, "target", vol.size)?;
    let stem = log
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target_log = log.with_file_name(format!("{stem}.target.log"));
    let target = Server::start(
        program,
        &target_args(m, &tvol.file)?,
        &PortMode::Chosen,
        &tvol,
        &target_log,
    )?;
    let source = Server::start(program, &source_args, &PortMode::Chosen, vol, log)?;
    let t0 = Instant::now();
    let mut q = Qmp::connect(&qmp_path, QMP_TIMEOUT)?;
    let job = set_up_mirror(&mut q, m, target.port)?;
    note(
        log,
        &format!(
            "job {JOB} ({} to 127.0.0.1:{}) ready after {:.2} s: {job}",
            m.copy_mode,
            target.port,
            t0.elapsed().as_secs_f64()
        ),
    );
    let source_log = log.to_path_buf();
    Ok(Running {
        primary: source,
        role: "primary".into(),
        // "replica" first: the report sums the replicas' CPU share by it.
        helpers: vec![Helper {
            role: "replica (mirror target)".into(),
            server: target,
            charged: true,
        }],
        admin: None,
        graceful: Some(Box::new(move || shut_down(q, &source_log))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_in_paths_are_doubled_for_qemus_option_parser() {
        let m = QsdMirror::default();
        let a = target_args(&m, Path::new("/d/a,b.img")).expect("args");
        assert_eq!(
            a[1],
            "driver=file,node-name=file0,filename=/d/a,,b.img,cache.direct=on,aio=io_uring"
        );
        let s = fill(
            &source_template(&m),
            Path::new("/v/x,y.img"),
            Path::new("/v/n,1/source.qmp"),
        )
        .expect("filled");
        assert_eq!(
            s[1],
            "socket,id=qmp0,path=/v/n,,1/source.qmp,server=on,wait=off"
        );
        assert!(s[5].contains("filename=/v/x,,y.img,"));
        assert!(s
            .iter()
            .all(|x| !x.contains("{file}") && !x.contains("{qmp}")));
        // {port} stays for the server start to fill.
        assert!(s.contains(&"addr.type=inet,addr.host=127.0.0.1,addr.port={port}".to_string()));
    }

    #[test]
    fn refuses_a_socket_path_too_long_or_not_text() {
        let long = Path::new("/").join("x".repeat(120));
        let t = source_template(&QsdMirror::default());
        assert!(matches!(
            fill(&t, Path::new("/v/a.img"), &long),
            Err(Error::Usage(_))
        ));
        use std::os::unix::ffi::OsStrExt;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/v/\xff.img"));
        assert!(matches!(path_value(bad), Err(Error::Usage(_))));
    }

    #[test]
    fn mirror_is_full_and_write_blocking_to_the_nbd_node() {
        let [(add, node), (mirror, job)] = mirror_commands(&QsdMirror::default(), 4321);
        assert_eq!((add, mirror), ("blockdev-add", "blockdev-mirror"));
        assert_eq!(node["server"]["port"], "4321");
        assert_eq!(node["node-name"], job["target"]);
        assert_eq!(job["device"], SOURCE_NODE);
        assert_eq!(
            (job["sync"].as_str(), job["copy-mode"].as_str()),
            (Some("full"), Some("write-blocking"))
        );
    }

    fn jobs(status: &str, ready: bool, synced: bool, io: &str) -> Value {
        json!([{"device": JOB, "status": status, "ready": ready, "actively-synced": synced,
                "io-status": io, "offset": 10, "len": 20, "type": "mirror"}])
    }

    #[test]
    fn ready_only_when_ready_and_actively_synced() {
        let r = |v: Value| readiness(job_view(&v, JOB).as_ref(), "write-blocking");
        assert_eq!(r(jobs("running", false, false, "ok")), Readiness::Copying);
        assert_eq!(r(jobs("ready", true, true, "ok")), Readiness::Ready);
        assert_eq!(r(jobs("ready", true, false, "ok")), Readiness::Copying);
        assert!(matches!(
            r(jobs("concluded", false, false, "ok")),
            Readiness::Failed(_)
        ));
        assert!(matches!(
            r(jobs("running", false, false, "failed")),
            Readiness::Failed(_)
        ));
        assert!(matches!(r(json!([])), Readiness::Failed(_)));
        // Background mode never reports actively-synced true: ready suffices.
        let v = jobs("ready", true, false, "ok");
        assert_eq!(
            readiness(job_view(&v, JOB).as_ref(), "background"),
            Readiness::Ready
        );
        let view = job_view(&v, JOB).expect("listed");
        assert_eq!((view.offset, view.len), (10, 20));
        assert_eq!(job_view(&v, "other"), None);
    }
}
