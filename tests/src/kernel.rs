//! A real Linux kernel as the NBD client: a small qemu guest that attaches
//! an export with the kernel's nbd driver and `nbd-client`, makes and
//! checks an ext4 filesystem on it, and reports each step.
//!
//! - [`image`]: Debian's kernel and the guest initramfs, built (and cached
//!   under `target/kernel-cache/`) by `tests/kernel/prepare.sh`.
//! - [`Relay`]: the single network path out of the guest. qemu's user-mode
//!   network (`restrict=on`) forwards exactly one guest endpoint,
//!   10.0.2.100:10809, to the `guestfwd-relay` program, which connects each
//!   guest connection to 127.0.0.1 on the port in the relay's port file.
//!   Rewriting that file moves the guest to another server.
//! - [`Guest::boot`]: starts qemu (TCG unless KVM really runs guests here,
//!   see [`accel`]) with a workload from `tests/kernel/workloads.sh`.
//! - [`Outcome::check`]: the guest's `PASS step` / `FAIL step: why` lines
//!   (on its second serial port) against the steps a workload must pass.
//!
//! qemu is killed by PID when its [`Guest`] is dropped, and every wait is
//! bounded.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::daemon::{workspace_root, TestDir};

/// The guest address the workloads connect to (see `workloads.sh`).
pub const GUEST_ENDPOINT: &str = "tcp:10.0.2.100:10809";
/// The guest-side address of every relay (one guest port per relay).
pub const GUEST_HOST: &str = "10.0.2.100";
/// The guest port of the first relay (the one [`Guest::boot`] uses).
pub const GUEST_PORT: u16 = 10809;
/// The guest's own address on qemu's user network (host forwards reach it).
pub const GUEST_ADDR: &str = "10.0.2.15";

/// How long `prepare.sh` may take (first run: ~75 MB of packages).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// The kernel and initramfs the guest boots.
#[derive(Debug, Clone)]
pub struct Image {
    /// `vmlinuz-VERSION`.
    pub kernel: PathBuf,
    /// The initramfs (busybox, modules, nbd-client, e2fsprogs, /init).
    pub initramfs: PathBuf,
}

/// The cargo target directory this test runs from (the cache lives there).
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() {
            d
        } else {
            workspace_root().join(d)
        };
    }
    // target/<profile>/deps/<test executable>
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `target/kernel-cache/`.
pub fn cache_dir() -> PathBuf {
    target_dir().join("kernel-cache")
}

/// The guest image, built by `tests/kernel/prepare.sh` when missing (it
/// downloads packages with `apt-get download` the first time, and is a
/// cheap check afterwards). Panics with the script's output if it fails.
pub fn image() -> Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let script = workspace_root().join("tests/kernel/prepare.sh");
            let mut cmd = Command::new(&script);
            cmd.arg(cache_dir());
            let out = run_bounded(cmd, PREPARE_TIMEOUT);
            assert!(
                out.status.is_some_and(|s| s.success()),
                "{} failed ({:?}):\n{}{}",
                script.display(),
                out.status,
                out.stdout,
                out.stderr
            );
            let field = |name: &str| {
                out.stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|p| PathBuf::from(p.trim()))
                    .unwrap_or_else(|| {
                        panic!("prepare.sh printed no `{name}` line:\n{}", out.stdout)
                    })
            };
            Image {
                kernel: field("kernel "),
                initramfs: field("initramfs "),
            }
        })
        .clone()
}

/// What a bounded command run produced.
struct Ran {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with output captured to files; kills it (by PID) after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).expect("create stdout file"))
        .stderr(fs::File::create(&e).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
    let status = wait_or_kill(&mut child, timeout);
    Ran {
        status,
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
    }
}

/// Waits up to `timeout` for `child`; kills it (by PID) and returns None
/// if it is still running then.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `qemu-system-x86_64`; panics with how to install it.
pub fn qemu() -> PathBuf {
    find_in_path("qemu-system-x86_64").unwrap_or_else(|| {
        panic!(
            "qemu-system-x86_64 is not installed; ./run-tests installs it \
             (apt-get install qemu-system-x86 qemu-utils, at the version of the installed qemu-utils)"
        )
    })
}

/// How qemu runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// qemu's emulator (slower, always works).
    Tcg,
}

/// KVM if it really runs a guest on this machine, else TCG.
///
/// `MIRRORBLK_KERNEL_ACCEL=kvm|tcg` forces a choice. Otherwise: no usable
/// `/dev/kvm` means TCG at once. A `/dev/kvm` that opens is not enough
/// (on the development machines it opens, but a guest never prints a
/// line), so the kernel is booted under KVM for at most 5 s and KVM is used
/// only if the kernel's first console line appears. The answer is cached
/// per host boot in the kernel cache, so the probe costs 5 s once.
pub fn accel(image: &Image) -> Accel {
    match std::env::var("MIRRORBLK_KERNEL_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cached = cache_dir().join(format!("kvm-probe-{}", boot_id.trim()));
    match fs::read_to_string(&cached).as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let console = dir.path().join("console");
    let mut cmd = Command::new(qemu());
    cmd.args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults"])
        .args(["-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.kernel)
        .args(["-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut works = false;
    while Instant::now() < deadline {
        if fs::read_to_string(&console).is_ok_and(|t| t.contains("Linux version")) {
            works = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let a = if works { Accel::Kvm } else { Accel::Tcg };
    let _ = fs::write(&cached, if works { "kvm" } else { "tcg" });
    eprintln!("kernel tests: KVM probe says {a:?}");
    a
}

/// The guest's way out: a port file read by `guestfwd-relay` for every
/// new guest connection.
#[derive(Debug)]
pub struct Relay {
    program: PathBuf,
    port_file: PathBuf,
    wait: Duration,
}

impl Relay {
    /// A relay (the `guestfwd-relay` binary at `program`) whose port file
    /// lives in `dir`, pointing at `port`. A guest connection made while
    /// nothing accepts on the port waits up to `wait` for a server (a
    /// reconnect during failover), then is closed.
    pub fn new(program: &Path, dir: &TestDir, port: u16, wait: Duration) -> Relay {
        Relay::named(program, dir, "relay-port", port, wait)
    }

    /// Like [`Relay::new`], with its own port file `name` in `dir` (one
    /// relay per node when the guest reaches several).
    pub fn named(program: &Path, dir: &TestDir, name: &str, port: u16, wait: Duration) -> Relay {
        let r = Relay {
            program: program.to_path_buf(),
            port_file: dir.join(name),
            wait,
        };
        r.point_at(port);
        r
    }

    /// Sends new guest connections to 127.0.0.1:`port` (connections
    /// already open stay where they are). Written to a temporary file and
    /// renamed, so a relay never reads half a number.
    pub fn point_at(&self, port: u16) {
        let tmp = self.port_file.with_extension("tmp");
        fs::write(&tmp, format!("{port}\n")).expect("write the relay port file");
        fs::rename(&tmp, &self.port_file).expect("rename the relay port file");
    }

    /// The `guestfwd=` of this relay for guest port `guest_port` on 10.0.2.100.
    fn guestfwd(&self, guest_port: u16) -> String {
        let cmd = format!(
            "{} {} {}",
            self.program.display(),
            self.port_file.display(),
            self.wait.as_secs()
        );
        // qemu's option syntax: a comma would end the value, and the
        // command is run by /bin/sh, so keep both out of the paths.
        assert!(
            !cmd.contains(',') && !cmd.contains('\'') && !cmd.contains('"'),
            "relay command {cmd:?} has characters qemu or the shell would split on"
        );
        format!("guestfwd=tcp:{GUEST_HOST}:{guest_port}-cmd:{cmd}")
    }
}

/// The `-netdev` option: user mode, no address but the forwarded ones
/// (`restrict=on` leaves explicit forwards working).
fn netdev(relays: &[(u16, &Relay)], forwards: &[(u16, u16)]) -> String {
    let mut s = "user,id=n0,restrict=on".to_string();
    for (port, r) in relays {
        s.push(',');
        s.push_str(&r.guestfwd(*port));
    }
    for (host, guest) in forwards {
        s.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{host}-{GUEST_ADDR}:{guest}"
        ));
    }
    s
}

/// What a guest boots with.
#[derive(Debug, Default)]
pub struct Boot<'a> {
    /// The `workload_NAME` of `tests/kernel/workloads.sh` to run.
    pub workload: &'a str,
    /// More kernel command line parameters (`mb.KEY`, value; no spaces:
    /// workloads read commas as spaces).
    pub params: Vec<(&'a str, String)>,
    /// Relays by guest port: `10.0.2.100:PORT` reaches the relay's server.
    pub relays: Vec<(u16, &'a Relay)>,
    /// Put the `mirrorblk` CLI (stripped, with the libraries `ldd` names)
    /// into the guest as `/usr/sbin/mirrorblk`.
    pub mirrorblk: bool,
    /// Put `mirrorblkd` into the guest the same way, as `/usr/sbin/mirrorblkd`.
    pub mirrorblkd: bool,
    /// A virtio disk (`/dev/vda`) on this NBD URI, with 4 KiB logical and
    /// physical blocks and qemu's `cache=writeback`, so the guest sees a
    /// volatile write cache and sends its flushes through.
    pub disk: Option<String>,
    /// Host forwards: `127.0.0.1:HOST` on the host reaches the guest's
    /// `10.0.2.15:GUEST` (host port, guest port).
    pub forwards: Vec<(u16, u16)>,
    /// More files for the guest (path under the image's folders, mode,
    /// contents), e.g. TLS certificates.
    pub files: Vec<CpioFile>,
}

/// One file of the per-boot archive: path (under the image's existing
/// folders), mode, contents.
pub type CpioFile = (String, u32, Vec<u8>);

/// The initrd of one boot: the cached image, then (a second cpio archive,
/// which the kernel unpacks over the first) `workloads.sh` read fresh, and
/// `extra` files.
fn write_initrd(initrd: &Path, image: &Image, extra: Vec<CpioFile>) {
    let mut out = fs::File::create(initrd).expect("create the initrd");
    let mut base = fs::read(&image.initramfs).expect("read the initramfs");
    // Each archive of the concatenation must start 4-byte aligned
    // (the kernel skips zero padding between them).
    base.resize(base.len().next_multiple_of(4), 0);
    out.write_all(&base).expect("write the initrd");
    let mut files: Vec<CpioFile> = vec![(
        "workloads.sh".into(),
        0o100644,
        fs::read(workspace_root().join("tests/kernel/workloads.sh"))
            .expect("read tests/kernel/workloads.sh"),
    )];
    files.extend(extra);
    let refs: Vec<(&str, u32, &[u8])> = files
        .iter()
        .map(|(p, m, d)| (p.as_str(), *m, d.as_slice()))
        .collect();
    out.write_all(&cpio_newc_modes(&refs))
        .expect("write the initrd");
}

/// A binary of this build (`cli`), stripped (a debug build is large; the
/// guest needs no symbols), as `/usr/sbin/NAME`, and every library `ldd`
/// says it loads, for the guest. Built per boot from the current binary, so
/// the guest always runs the code under test (strip takes a second; the
/// image cache stays independent of the workspace's code).
fn binary_files(dir: &TestDir, cli: &Path, name: &str) -> Vec<CpioFile> {
    let stripped = dir.join(&format!("{name}.stripped"));
    let st = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(cli)
        .status()
        .unwrap_or_else(|e| panic!("cannot run strip (apt-get install binutils): {e}"));
    assert!(st.success(), "strip {} failed: {st}", cli.display());
    let mut files = vec![(
        format!("usr/sbin/{name}"),
        0o100755,
        fs::read(&stripped).expect("read the stripped binary"),
    )];
    let out = Command::new("ldd")
        .arg(cli)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("not found"),
        "ldd {}: {text}",
        cli.display()
    );
    // "libx.so.6 => /lib/x86_64-linux-gnu/libx.so.6 (0x...)"; the loader
    // and the vDSO have no "=>" and are already there or virtual.
    for lib in text
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split(' ').next())
    {
        let name = Path::new(lib)
            .file_name()
            .expect("a library path")
            .to_string_lossy()
            .into_owned();
        let data = fs::read(lib).unwrap_or_else(|e| panic!("read {lib}: {e}"));
        files.push((format!("lib/x86_64-linux-gnu/{name}"), 0o100755, data));
    }
    files
}

/// A running guest.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    results: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    started: Instant,
    accel: Accel,
}

/// How a guest run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Lines of the result port (`PASS ...`, `FAIL ...`, `FSYNCED ...`, `END`).
    pub lines: Vec<String>,
    /// The console (kernel messages and the workload's own output).
    pub console: String,
    /// qemu's own stdout and stderr.
    pub qemu_log: String,
    /// qemu's exit status; None if it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// From qemu's start to its exit (or kill).
    pub elapsed: Duration,
    /// How it ran.
    pub accel: Accel,
}

impl Guest {
    /// Boots the guest in `dir` running `workload` (a `workload_NAME` of
    /// `tests/kernel/workloads.sh`), with `nbd_args` (extra nbd-client
    /// arguments, passed as `mb.connect=`) and its network through `relay`
    /// (guest port 10809).
    pub fn boot(dir: &TestDir, workload: &str, nbd_args: &[&str], relay: &Relay) -> Guest {
        Guest::boot_with_files(dir, workload, nbd_args, relay, Vec::new())
    }

    /// [`Guest::boot`] with `files` added to the guest's initramfs.
    pub fn boot_with_files(
        dir: &TestDir,
        workload: &str,
        nbd_args: &[&str],
        relay: &Relay,
        files: Vec<CpioFile>,
    ) -> Guest {
        let mut params = Vec::new();
        if !nbd_args.is_empty() {
            params.push(("mb.connect", nbd_args.join(",")));
        }
        Guest::start(
            dir,
            &Boot {
                workload,
                params,
                relays: vec![(GUEST_PORT, relay)],
                files,
                ..Boot::default()
            },
        )
    }

    /// Boots the guest as `boot` says.
    pub fn start(dir: &TestDir, boot: &Boot<'_>) -> Guest {
        let image = image();
        let accel = accel(&image);
        let initrd = dir.join("initrd.img");
        let mut extra = boot.files.clone();
        if boot.mirrorblk {
            extra.extend(binary_files(
                dir,
                &crate::cluster::mirrorblk_cli(),
                "mirrorblk",
            ));
        }
        if boot.mirrorblkd {
            extra.extend(binary_files(
                dir,
                &crate::daemon::mirrorblkd_path(),
                "mirrorblkd",
            ));
        }
        write_initrd(&initrd, &image, extra);
        let results = dir.join("guest-results.log");
        let console = dir.join("guest-console.log");
        let qemu_log = dir.join("qemu.log");
        for p in [&results, &console] {
            assert!(
                !p.to_string_lossy().contains(','),
                "{} has a comma, which qemu's -serial file: cannot take",
                p.display()
            );
        }
        let mut append = format!(
            "console=ttyS0 panic=-1 loglevel=4 mb.workload={}",
            boot.workload
        );
        for (k, v) in &boot.params {
            assert!(!v.contains(' '), "kernel parameter {k}={v:?} has a space");
            append.push_str(&format!(" {k}={v}"));
        }
        let accel_args: &[&str] = match accel {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg"],
        };
        let mut args: Vec<OsString> = accel_args.iter().map(OsString::from).collect();
        args.extend(
            [
                "-smp",
                "1",
                "-m",
                "512",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ]
            .map(OsString::from),
        );
        args.push("-kernel".into());
        args.push(image.kernel.into());
        args.push("-initrd".into());
        args.push(initrd.into());
        args.push("-append".into());
        args.push(append.into());
        // ttyS0: the console; ttyS1: the workload's results and nothing else.
        args.push("-serial".into());
        args.push(format!("file:{}", console.display()).into());
        args.push("-serial".into());
        args.push(format!("file:{}", results.display()).into());
        args.push("-netdev".into());
        args.push(netdev(&boot.relays, &boot.forwards).into());
        args.push("-device".into());
        args.push("virtio-net-pci,netdev=n0".into());
        if let Some(uri) = &boot.disk {
            assert!(!uri.contains(','), "disk URI {uri:?} has a comma");
            args.push("-drive".into());
            args.push(format!("file={uri},format=raw,if=none,id=d0,cache=writeback").into());
            args.push("-device".into());
            args.push(
                "virtio-blk-pci,drive=d0,logical_block_size=4096,physical_block_size=4096".into(),
            );
        }
        let log = fs::File::create(&qemu_log).expect("create qemu.log");
        let child = Command::new(qemu())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone qemu.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64: {e}"));
        Guest {
            child: Some(child),
            results,
            console,
            qemu_log,
            started: Instant::now(),
            accel,
        }
    }

    /// The console so far (kernel messages and what the workload prints).
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The result lines so far.
    pub fn lines(&self) -> Vec<String> {
        read_lines(&self.results)
    }

    /// Waits up to `timeout` for a result line starting with `prefix` and
    /// returns it; Err with what was seen if the guest ended or time ran out.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(l) = lines.iter().find(|l| l.starts_with(prefix)) {
                return Ok(l.clone());
            }
            let ended = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if ended || lines.iter().any(|l| l == "END") || Instant::now() >= deadline {
                return Err(format!(
                    "no result line starting with {prefix:?} (guest {}); results so far:\n{}\nconsole tail:\n{}",
                    if ended { "ended" } else { "still running" },
                    lines.join("\n"),
                    tail(&fs::read_to_string(&self.console).unwrap_or_default(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest powers off (its workload ended), at most
    /// `timeout` from boot; then it is killed (by PID).
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let mut child = self.child.take().expect("guest is running");
        let left = timeout.saturating_sub(self.started.elapsed());
        let status = wait_or_kill(&mut child, left);
        Outcome {
            lines: read_lines(&self.results),
            console: fs::read_to_string(&self.console).unwrap_or_default(),
            qemu_log: fs::read_to_string(&self.qemu_log).unwrap_or_default(),
            status,
            elapsed: self.started.elapsed(),
            accel: self.accel,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Outcome {
    /// Ok if the guest finished in time, reported no FAIL, reported
    /// `PASS step` (or `PASS step: detail`) for every step of `expected`,
    /// and powered off normally; otherwise Err with everything needed to
    /// see why (results, console tail, qemu's messages).
    pub fn check(&self, expected: &[&str]) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.status.is_none() {
            problems.push(format!(
                "the guest did not finish within {:?} (killed)",
                self.elapsed
            ));
        } else if !self.status.is_some_and(|s| s.success()) {
            problems.push(format!("qemu exited with {:?}", self.status));
        }
        problems.extend(
            self.lines
                .iter()
                .filter(|l| l.starts_with("FAIL"))
                .map(|l| format!("the guest reported: {l}")),
        );
        for step in expected {
            if !self.passed(step) {
                problems.push(format!("no PASS {step}"));
            }
        }
        if !self.lines.iter().any(|l| l == "END") {
            problems.push("the workload never reached its end (no END line)".into());
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{}\n--- guest results ({:?}, {:.1} s) ---\n{}\n--- console (last 40 lines) ---\n{}\n--- qemu ---\n{}",
            problems.join("\n"),
            self.accel,
            self.elapsed.as_secs_f64(),
            self.lines.join("\n"),
            tail(&self.console, 40),
            self.qemu_log
        ))
    }

    /// Whether `PASS step` (or `PASS step: ...`) was reported.
    pub fn passed(&self, step: &str) -> bool {
        self.lines.iter().any(|l| {
            l.strip_prefix("PASS ")
                .and_then(|r| r.strip_prefix(step))
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
    }

    /// The `FAIL ...` lines.
    pub fn failures(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.starts_with("FAIL"))
            .map(String::as_str)
            .collect()
    }
}

fn read_lines(p: &Path) -> Vec<String> {
    // The serial file is written byte by byte by qemu: only whole lines count.
    let text = fs::read(p).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A cpio archive (`newc` format, what the kernel unpacks as initramfs) of
/// regular files at the root, mode 0644.
pub fn cpio_newc(files: &[(&str, &[u8])]) -> Vec<u8> {
    let with_modes: Vec<(&str, u32, &[u8])> =
        files.iter().map(|(n, d)| (*n, 0o100644, *d)).collect();
    cpio_newc_modes(&with_modes)
}

/// A cpio archive (`newc`) of regular files with their modes; a path's
/// folders must exist already (in an archive unpacked before this one).
pub fn cpio_newc_modes(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}
