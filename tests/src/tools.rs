//! Running the real NBD clients the daemon must interoperate with, each with
//! a timeout (a hung tool is killed by PID and fails the test).
//!
//! A tool missing from `PATH` fails the test with the apt package to install,
//! rather than skipping it: a skipped interop test proves nothing.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default time limit for one tool run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The external programs the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `qemu-io` (QEMU's block-layer exerciser).
    QemuIo,
    /// `qemu-img`.
    QemuImg,
    /// `nbdinfo` (libnbd).
    NbdInfo,
    /// `nbdcopy` (libnbd).
    NbdCopy,
    /// `fio`, with its `nbd` engine.
    Fio,
    /// Debian's `python3` (which has libnbd's Python bindings, the module
    /// `nbdsh` runs), for scripted libnbd clients.
    LibnbdPython,
}

impl Tool {
    /// The executable name.
    pub fn program(self) -> &'static str {
        match self {
            Tool::QemuIo => "qemu-io",
            Tool::QemuImg => "qemu-img",
            Tool::NbdInfo => "nbdinfo",
            Tool::NbdCopy => "nbdcopy",
            Tool::Fio => "fio",
            Tool::LibnbdPython => "python3",
        }
    }

    /// The Debian/Ubuntu package that provides it.
    pub fn package(self) -> &'static str {
        match self {
            Tool::QemuIo | Tool::QemuImg => "qemu-utils",
            Tool::NbdInfo | Tool::NbdCopy => "libnbd-bin",
            Tool::Fio => "fio",
            Tool::LibnbdPython => "python3-libnbd",
        }
    }

    /// Its full path; panics naming the package if it is not installed.
    #[track_caller]
    pub fn path(self) -> PathBuf {
        // The distribution's interpreter, not one earlier on PATH (a pyenv
        // build has no libnbd module).
        let system = Path::new("/usr/bin/python3");
        if self == Tool::LibnbdPython && is_executable(system) {
            return system.to_path_buf();
        }
        find_in_path(self.program()).unwrap_or_else(|| {
            panic!(
                "{} is not installed (not found on PATH); install it with: apt-get install {}",
                self.program(),
                self.package()
            )
        })
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// What a tool run produced.
#[derive(Debug)]
pub struct ToolOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl ToolOutput {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout and stderr together, for matching messages.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics with the full output unless it exited with status 0.
    #[track_caller]
    pub fn expect_success(self) -> ToolOutput {
        if !self.success() {
            panic!("{self}");
        }
        self
    }
}

impl std::fmt::Display for ToolOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Starts `tool` with `args`, stdout and stderr drained on threads.
/// Returns the printable command line, the child and the two readers.
#[track_caller]
fn launch<I, S>(tool: Tool, args: I) -> (String, Child, JoinHandle<String>, JoinHandle<String>)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = tool.path();
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let command = std::iter::once(tool.program().to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let out = read_all(child.stdout.take().expect("piped"));
    let err = read_all(child.stderr.take().expect("piped"));
    (command, child, out, err)
}

/// Runs `tool` with `args`, killing it (by PID) and panicking if it runs
/// longer than `timeout`.
#[track_caller]
pub fn run<I, S>(tool: Tool, args: I, timeout: Duration) -> ToolOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (command, mut child, out, err) = launch(tool, args);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!("`{command}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ToolOutput {
        command,
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `qemu-io -f raw` on `uri`, running each of `commands` (`-c` each) in order
/// in one process. qemu-io exits non-zero if any command fails, including a
/// `read -P` whose data does not match.
#[track_caller]
pub fn qemu_io<S: AsRef<str>>(uri: &str, commands: &[S]) -> ToolOutput {
    qemu_io_opts(uri, false, commands)
}

/// Like [`qemu_io`], opening the image read-only (`-r`) when `read_only`.
#[track_caller]
pub fn qemu_io_opts<S: AsRef<str>>(uri: &str, read_only: bool, commands: &[S]) -> ToolOutput {
    let mut a: Vec<String> = vec!["-f".into(), "raw".into()];
    if read_only {
        a.push("-r".into());
    }
    for c in commands {
        a.push("-c".into());
        a.push(c.as_ref().to_string());
    }
    a.push(uri.to_string());
    run(Tool::QemuIo, a, TOOL_TIMEOUT)
}

/// Runs qemu-io commands and panics unless every one succeeded (exit 0 and
/// no "Pattern verification failed" / "failed" message).
#[track_caller]
pub fn qemu_io_ok<S: AsRef<str>>(uri: &str, commands: &[S]) -> ToolOutput {
    let o = qemu_io(uri, commands);
    if !o.success() || o.combined().contains("failed") {
        panic!("qemu-io commands did not all succeed: {o}");
    }
    o
}

/// `nbdinfo --json URI`, parsed.
#[track_caller]
pub fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let o = run(Tool::NbdInfo, ["--json", uri], TOOL_TIMEOUT).expect_success();
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json printed invalid JSON ({e}):\n{}", o.stdout))
}

/// A tool running in the background (e.g. fio under load while a node is
/// killed). It is killed by PID if still running when dropped.
#[derive(Debug)]
pub struct Background {
    command: String,
    child: Option<std::process::Child>,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

/// Starts `tool` with `args` in the background.
#[track_caller]
pub fn spawn<I, S>(tool: Tool, args: I) -> Background
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (command, child, out, err) = launch(tool, args);
    Background {
        command,
        child: Some(child),
        out: Some(out),
        err: Some(err),
    }
}

impl Background {
    /// Its process id (to signal it: only ever this child's own).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Waits up to `timeout` for it to exit; kills it (by PID) and panics
    /// with its output if it does not.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> ToolOutput {
        let mut child = self.child.take().expect("not waited for yet");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
                }
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = self.out.take().map(|h| h.join().unwrap_or_default());
        let stderr = self.err.take().map(|h| h.join().unwrap_or_default());
        let (stdout, stderr) = (stdout.unwrap_or_default(), stderr.unwrap_or_default());
        match status {
            Some(status) => ToolOutput {
                command: self.command.clone(),
                status,
                stdout,
                stderr,
            },
            None => panic!(
                "`{}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
                self.command
            ),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// fio arguments that write its JSON report to `json_path`.
pub fn fio_json_args(json_path: &Path) -> Vec<String> {
    vec![
        "--output-format=json".into(),
        format!("--output={}", json_path.display()),
    ]
}

/// Parses the JSON report fio wrote to `json_path`; panics (showing fio's
/// output) if there is none or fio failed.
#[track_caller]
pub fn fio_report(json_path: &Path, run: &ToolOutput) -> serde_json::Value {
    let text = std::fs::read_to_string(json_path).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio wrote no valid JSON ({e}); {run}\n{text}"));
    assert!(run.success(), "fio failed: {run}\n{text}");
    v
}
