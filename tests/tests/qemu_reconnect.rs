//! qemu's NBD client across a `kill -9` and restart of a single node
//! (issue 14, item 3). qemu's `reconnect-delay=N` keeps a request that finds
//! the connection dead waiting up to N seconds for a reconnect, then resends
//! it; without it the request fails at once. docs/OPERATIONS.md ("qemu
//! clients") documents the setting; these tests prove what it promises.

use std::path::Path;
use std::time::{Duration, Instant};

use mirrorblk_tests::cluster::pick_port;
use mirrorblk_tests::daemon::{args, Daemon, TestDir};
use mirrorblk_tests::tools::{self, Tool};

/// How long qemu-io sleeps between its first write and the second: the node
/// is killed inside this window and restarted after it, so the second write
/// is issued while nothing listens.
const PAUSE_MS: u64 = 2000;
/// Kill this long after the client attached (its first write is done by then).
const KILL_AFTER: Duration = Duration::from_millis(700);
/// Restart this long after the kill: past the second write's issue time.
const DOWN_FOR: Duration = Duration::from_millis(2500);
/// qemu's reconnect-delay in the test that expects a reconnect.
const RECONNECT_DELAY_S: u32 = 30;
/// Bound on a whole qemu-io run.
const QEMU_IO_LIMIT: Duration = Duration::from_secs(90);

/// qemu-io's `--image-opts` for the nbd driver on 127.0.0.1:`port`.
fn image_opts(port: u16, reconnect_delay: u32) -> String {
    format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vol0,reconnect-delay={reconnect_delay}"
    )
}

/// The daemon's event log (its default place: beside the journal).
fn event_log(dir: &TestDir) -> std::path::PathBuf {
    dir.join("vol0.journal.events.jsonl")
}

/// Waits (bounded) until the event log records a client attach.
fn wait_client_attached(log: &Path, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("\"client-attach\"") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "no client-attach event within {limit:?} in {}",
        log.display()
    );
}

/// Runs qemu-io (write, pause, write, read both back) against a node that
/// is `kill -9`ed during the pause and restarted after it; returns its
/// output and the daemon, restarted.
fn write_across_kill_and_restart(
    dir: &TestDir,
    reconnect_delay: u32,
) -> (tools::ToolOutput, Daemon) {
    let port = pick_port();
    let mut a = dir.volume_args("vol0", "64M");
    let at = a.iter().position(|x| x == "--listen").expect("--listen") + 1;
    a[at] = format!("127.0.0.1:{port}").into();
    let mut d = Daemon::start(&a);
    let cmds = [
        "write -P 0x5a 0 1M".to_string(),
        format!("sleep {PAUSE_MS}"),
        "write -P 0xa5 1M 1M".to_string(),
        "flush".to_string(),
        "read -P 0x5a 0 1M".to_string(),
        "read -P 0xa5 1M 1M".to_string(),
    ];
    let mut qa = args([
        "--image-opts".to_string(),
        image_opts(port, reconnect_delay),
    ]);
    for c in &cmds {
        qa.extend(args(["-c", c.as_str()]));
    }
    let io = tools::spawn(Tool::QemuIo, qa);
    wait_client_attached(&event_log(dir), Duration::from_secs(20));
    std::thread::sleep(KILL_AFTER);
    d.kill9();
    std::thread::sleep(DOWN_FOR);
    d.restart();
    (io.wait(QEMU_IO_LIMIT), d)
}

/// With `reconnect-delay`, qemu rides through a `kill -9` and restart of the
/// node: the write issued while the node was down waits, is sent after the
/// reconnect, and both writes read back (the first from the journal the
/// restart recovered); qemu-io reports no error.
#[test]
fn qemu_with_reconnect_delay_rides_through_a_kill_and_restart() {
    let dir = TestDir::new();
    let started = Instant::now();
    let (out, d) = write_across_kill_and_restart(&dir, RECONNECT_DELAY_S);
    let took = started.elapsed();
    assert!(
        out.success() && !out.combined().contains("failed") && !out.combined().contains("error"),
        "qemu-io saw an error across the restart: {out}\n--- daemon ---\n{}",
        d.full_log()
    );
    assert_eq!(
        out.combined().matches("wrote 1048576/1048576").count(),
        2,
        "both writes must complete: {out}"
    );
    assert_eq!(
        out.combined().matches("read 1048576/1048576").count(),
        2,
        "both reads must complete: {out}"
    );
    // qemu-io prints each command's time: the second write's is the stall.
    eprintln!(
        "qemu-io across kill -9 and restart: {took:?} in all (pause {PAUSE_MS} ms, node down {DOWN_FOR:?})\n{}",
        out.stdout
    );
    // And the data is on the node, not only in qemu's view.
    tools::qemu_io_ok(&d.uri("vol0"), &["read -P 0x5a 0 1M", "read -P 0xa5 1M 1M"]);
}

/// The control: the same run without `reconnect-delay` (qemu's default, 0)
/// fails the write issued while the node was down. This is what the
/// setting is for, and it shows the test above can fail.
#[test]
fn qemu_without_reconnect_delay_fails_the_write_issued_while_down() {
    let dir = TestDir::new();
    let (out, d) = write_across_kill_and_restart(&dir, 0);
    assert!(
        !out.success() || out.combined().contains("failed"),
        "qemu-io without reconnect-delay should have failed a write: {out}\n--- daemon ---\n{}",
        d.full_log()
    );
    // The write acknowledged before the kill survived it.
    tools::qemu_io_ok(&d.uri("vol0"), &["read -P 0x5a 0 1M"]);
}
