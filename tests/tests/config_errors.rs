//! Configuration mistakes: each makes mirrorblkd exit with status 2 within a
//! few seconds, printing one line on stderr (`mirrorblkd: ...`) that names
//! the problem, and never start serving.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;
use mirrorblk_server::config::Cli;
use mirrorblk_tests::daemon::{args, run_to_exit};
use mirrorblk_tests::{Daemon, Exited, TestDir};

/// "Within a few seconds", with room for a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// Runs mirrorblkd with `a` and checks exit status 2, promptness, and one
/// `mirrorblkd:` line containing every one of `needles`.
#[track_caller]
fn expect_config_error(a: Vec<OsString>, needles: &[&str]) -> Exited {
    let r = run_to_exit(&a, Duration::from_secs(20));
    let shown = format!(
        "args {a:?}\n--- stderr ---\n{}--- stdout ---\n{}",
        r.stderr, r.stdout
    );
    assert!(
        !r.served,
        "mirrorblkd started serving instead of refusing the configuration; {shown}"
    );
    assert_eq!(
        r.code(),
        2,
        "exit status should be 2 (configuration error); {shown}"
    );
    assert!(
        r.elapsed < EXIT_WITHIN,
        "took {:?} to refuse the configuration; {shown}",
        r.elapsed
    );
    let lines = r.message_lines();
    assert_eq!(
        lines.len(),
        1,
        "want exactly one message line on stderr, got {lines:?}; {shown}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("mirrorblkd: "),
        "message line should start with 'mirrorblkd: ': {line:?}"
    );
    for n in needles {
        assert!(line.contains(n), "message should mention {n:?}: {line:?}");
    }
    r
}

/// Flags for volume `export` with the given paths (and size), on port 0.
fn volume(export: &str, data: &Path, journal: &Path, size: Option<&str>) -> Vec<OsString> {
    let mut a = args([
        "--export".as_ref(),
        export.as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--journal".as_ref(),
        journal.as_os_str(),
    ]);
    if let Some(s) = size {
        a.extend(args(["--size", s]));
    }
    // A small journal: some refusals come after the journal is created.
    a.extend(args(["--journal-size", "8M", "--listen", "127.0.0.1:0"]));
    a
}

#[test]
fn size_not_a_multiple_of_4k() {
    let dir = TestDir::new();
    expect_config_error(
        volume("vol0", &dir.join("d"), &dir.join("j"), Some("4097")),
        &["4097", "not a multiple of 4 KiB"],
    );
    assert!(
        !dir.join("d").exists(),
        "a refused configuration must not create the data file"
    );
}

/// A journal created for volume 'alpha' is refused for volume 'beta'.
#[test]
fn journal_of_another_volume() {
    let dir = TestDir::new();
    let (data, journal) = (dir.join("d"), dir.join("j"));
    let mut d = Daemon::start(volume("alpha", &data, &journal, Some("64M")));
    assert!(d.terminate().success());
    let j = journal.display().to_string();
    expect_config_error(
        volume("beta", &data, &journal, Some("64M")),
        &[&j, "belongs to volume 'alpha'", "'beta'"],
    );
}

#[test]
fn data_file_smaller_than_size() {
    let dir = TestDir::new();
    let data = dir.join("d");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let p = data.display().to_string();
    expect_config_error(
        volume("vol0", &data, &dir.join("j"), Some("64M")),
        &[&p, "1048576 bytes", "less than the volume size"],
    );
}

#[test]
fn tcp_port_in_use() {
    let dir = TestDir::new();
    // Hold a port so mirrorblkd cannot bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut a = volume("vol0", &dir.join("d"), &dir.join("j"), Some("64M"));
    let n = a.len();
    a[n - 1] = addr.clone().into(); // replaces 127.0.0.1:0
    expect_config_error(
        a,
        &[
            &format!("cannot listen on {addr}"),
            "another process uses that port",
        ],
    );
}

#[test]
fn missing_data_file_without_size() {
    let dir = TestDir::new();
    let data = dir.join("missing.data");
    let p = data.display().to_string();
    expect_config_error(
        volume("vol0", &data, &dir.join("j"), None),
        &[&p, "does not exist", "--size"],
    );
}

#[test]
fn missing_device_path() {
    let dir = TestDir::new();
    let dev = PathBuf::from("/dev/nonexistent-mirrorblk");
    assert!(
        !dev.exists(),
        "{} exists on this machine; the test needs it absent",
        dev.display()
    );
    expect_config_error(
        volume("vol0", &dev, &dir.join("j"), None),
        &["/dev/nonexistent-mirrorblk", "does not exist"],
    );
}

/// Removes a file the daemon wrongly created under /dev (only a regular file
/// that did not exist before the test), so the machine is left clean.
struct RemoveIfCreated(PathBuf);

impl Drop for RemoveIfCreated {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_file()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A missing device under /dev with --size: a path in /dev names a device,
/// so it must be refused like any missing device, not created as a regular
/// file (on devtmpfs that file lives in RAM and the "durable" volume would
/// vanish at reboot).
#[test]
fn missing_device_path_with_size_is_not_created() {
    let dir = TestDir::new();
    let dev = PathBuf::from(format!("/dev/nonexistent-mirrorblk-{}", std::process::id()));
    assert!(
        !dev.exists(),
        "{} exists on this machine; the test needs it absent",
        dev.display()
    );
    let _cleanup = RemoveIfCreated(dev.clone());
    let r = run_to_exit(
        volume("vol0", &dev, &dir.join("j"), Some("1M")),
        Duration::from_secs(20),
    );
    let created = dev.exists();
    assert!(
        r.code() == 2 && !created && r.message_lines().iter().any(|l| l.contains(&*dev.to_string_lossy())),
        "want exit status 2 naming {} and no file created; got status {:?}, served={}, file created={created}\n--- stderr ---\n{}",
        dev.display(),
        r.status,
        r.served,
        r.stderr
    );
}

#[test]
fn no_volume_configured() {
    expect_config_error(
        args(["--listen", "127.0.0.1:0"]),
        &["no volume configured", "--export"],
    );
}

/// `--help` exits 0 and lists every option the CLI defines, with the
/// documented defaults.
#[test]
fn help_lists_every_option_and_defaults() {
    let r = run_to_exit(["--help"], Duration::from_secs(20));
    assert_eq!(r.code(), 0, "--help failed: {}", r.stderr);
    let help = &r.stdout;
    let cmd = Cli::command();
    let mut missing = Vec::new();
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            if !help.contains(&format!("--{long}")) {
                missing.push(long.to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "--help does not list {missing:?}:\n{help}"
    );
    for must in [
        "--export",
        "--data",
        "--journal",
        "--size",
        "--journal-size",
        "--listen",
        "--unix",
        "--read-only",
        "--config",
        "--checkpoint-interval",
    ] {
        assert!(
            help.contains(must),
            "--help does not mention {must}:\n{help}"
        );
    }
    for default in ["127.0.0.1:10809", "256M"] {
        assert!(
            help.contains(default),
            "--help does not show the default {default}:\n{help}"
        );
    }
}
