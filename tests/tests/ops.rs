//! Operations: the systemd unit verifies, metrics move under load, the admin
//! socket answers, and the offline journal inspector reads a stopped node.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use mirrorblk_admin::ReplicaState;
use mirrorblk_tests::daemon::{workspace_root, Daemon, TestDir};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Fetches `http://127.0.0.1:port/metrics` with a plain socket (bounded).
fn scrape(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let mut out = String::new();
            if s.read_to_string(&mut out).is_ok() && out.contains("\r\n\r\n") {
                return out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics endpoint on port {port} never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
}

use mirrorblk_tests::cluster::mirrorblk_cli;

#[test]
fn systemd_unit_verifies() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("systemd-analyze is missing: install the systemd package (run-tests does)");
    };
    let dir = TestDir::new();
    // Verify checks that ExecStart's binary exists: point it at the build.
    let units = [
        (
            "mirrorblkd@.service",
            "/usr/local/bin/mirrorblkd",
            mirrorblk_tests::daemon::mirrorblkd_path(),
        ),
        (
            "mirrorblk-attach@.service",
            "/usr/local/bin/mirrorblk",
            mirrorblk_cli(),
        ),
    ];
    for (name, installed, built) in units {
        let unit = std::fs::read_to_string(workspace_root().join("systemd").join(name))
            .expect("unit file");
        let unit = unit.replace(installed, built.to_str().expect("utf-8 path"));
        let path = dir.join(name);
        std::fs::write(&path, unit).expect("write unit");
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "systemd-analyze verify {name} failed:\n{text}"
        );
        assert!(
            !text.contains("Unknown key"),
            "{name} has unknown keys:\n{text}"
        );
    }
}

#[test]
fn metrics_move_under_load_and_status_and_inspect_answer() {
    let dir = TestDir::new();
    let mport = free_port();
    let sock = dir.join("admin.sock");
    let mut args = dir.volume_args("vol0", "64M");
    args.extend([
        "--metrics-listen".into(),
        format!("127.0.0.1:{mport}").into(),
        "--admin-socket".into(),
        sock.clone().into(),
    ]);
    let mut d = Daemon::start(args);
    // The volume registers its series when its core starts it: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let t = scrape(mport);
        if t.contains("mirrorblk_requests_total{volume=\"vol0\",op=\"write\"}") {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "volume metrics never appeared:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let w0 = sample(
        &before,
        "mirrorblk_requests_total{volume=\"vol0\",op=\"write\"}",
    );

    // Some writes through a real client.
    let mut c = d.connect("vol0");
    for i in 0..64u64 {
        c.write(i * 4096, &[i as u8; 4096], i % 8 == 0)
            .expect("write");
    }
    c.flush().expect("flush");

    let after = scrape(mport);
    let w1 = sample(
        &after,
        "mirrorblk_requests_total{volume=\"vol0\",op=\"write\"}",
    );
    assert!(
        w1 >= w0 + 64.0,
        "write counter did not rise by 64: {w0} -> {w1}"
    );
    let n = sample(
        &after,
        "mirrorblk_request_duration_seconds_count{volume=\"vol0\",op=\"write\"}",
    );
    assert!(n >= 64.0, "write latency histogram holds {n} samples");
    assert!(
        after.contains(
            "mirrorblk_request_duration_seconds_bucket{volume=\"vol0\",op=\"write\",le=\"0.001\"}"
        ),
        "latency buckets missing"
    );
    assert_eq!(
        sample(&after, "mirrorblk_payload_copies_total{volume=\"vol0\"}"),
        0.0,
        "payload bytes were copied"
    );
    assert!(
        sample(
            &after,
            "mirrorblk_journal_commit_seconds_count{volume=\"vol0\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&after, "mirrorblk_journal_syncs_total{volume=\"vol0\"}"),
        0.0,
        "per-write durability needs no journal fdatasync"
    );

    // The admin socket reports the same LSNs.
    let cli = mirrorblk_cli();
    let out = Command::new(&cli)
        .arg("--admin-socket")
        .arg(&sock)
        .args(["status", "--json"])
        .output()
        .expect("run mirrorblk");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let vol = &v["volumes"][0];
    assert_eq!(vol["name"], "vol0");
    assert_eq!(vol["role"], "primary");
    assert!(
        vol["durable_lsn"].as_u64().unwrap_or(0) >= 64,
        "status: {v}"
    );

    // Stopped, the journal inspector reads the checkpoint and finds nothing to replay.
    drop(c);
    let st = d.terminate();
    assert!(st.success(), "SIGTERM exit {st:?}");
    let out = Command::new(&cli)
        .args(["journal", "inspect"])
        .arg(dir.join("vol0.journal"))
        .output()
        .expect("run inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("checkpoint LSN   65"),
        "inspect output:\n{text}"
    );
    assert!(
        text.contains("records          0 past the checkpoint"),
        "inspect output:\n{text}"
    );
}

/// With `--durability flush` a FLUSH makes the journal durable with one
/// group `fdatasync`, and `mirrorblk_journal_syncs_total` counts it.
#[test]
fn flush_durability_counts_its_journal_syncs() {
    let dir = TestDir::new();
    let mport = free_port();
    let mut args = dir.volume_args("vol0", "64M");
    args.extend([
        "--durability".into(),
        "flush".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{mport}").into(),
    ]);
    let mut d = Daemon::start(args);
    let mut c = d.connect("vol0");
    for i in 0..16u64 {
        c.write(i * 4096, &[i as u8 + 1; 4096], false)
            .expect("write");
    }
    c.flush().expect("flush");
    // The applier publishes the count when it next looks at the journal,
    // right after the FLUSH's sync made its batch applicable.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = scrape(mport);
        let key = "mirrorblk_journal_syncs_total{volume=\"vol0\"}";
        if t.contains(key) && sample(&t, key) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no journal sync counted 10 s after a FLUSH:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(c);
    assert!(d.terminate().success());
}

/// A primary with two replicas, seen the way an operator sees it: during a
/// fio run `/metrics` shows requests rising, latency histograms filling, both
/// replicas in-sync (state 2) with their lag reported, and no payload copy;
/// `mirrorblk status --json` shows roles, epoch, states and lag. A replica
/// killed with -9 shows a changed state metric within the heartbeat timeout.
/// Brought back as a new replica (its journal and data gone), its full
/// resync is followed by `mirrorblk resync --watch` to completion.
#[test]
fn replicated_metrics_status_and_resync_watch() {
    use mirrorblk_tests::cluster::{view_of, write_secret, Node, EXPORT};
    use mirrorblk_tests::tools::{self, Tool};
    let dir = TestDir::new();
    let secret = write_secret(&dir, "secret");
    let mport = free_port();
    let r2 = Node::start_replica(&dir, "n2", &secret, "64M", &[]);
    let r3_port = free_port();
    let r3_metrics = format!("127.0.0.1:{r3_port}");
    let mut r3 = Node::start_replica(
        &dir,
        "n3",
        &secret,
        "64M",
        &["--metrics-listen", &r3_metrics],
    );
    let metrics = format!("127.0.0.1:{mport}");
    let p = Node::start_primary(
        &dir,
        "n1",
        &secret,
        &[&r2, &r3],
        "64M",
        &[
            "--mode",
            "sync",
            "--heartbeat-timeout",
            "2s",
            "--metrics-listen",
            &metrics,
            "--resync-rate",
            "32M",
        ],
    );
    p.wait_replicas_in_sync(Duration::from_secs(20));
    let writes = "mirrorblk_requests_total{volume=\"vol0\",op=\"write\"}";
    let before = sample(&scrape(mport), writes);

    let fio = tools::spawn(
        Tool::Fio,
        [
            "--name=ops".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={}", p.daemon.uri(EXPORT)),
            "--rw=randwrite".into(),
            // The 256K writes go to the store in place on every node.
            "--bssplit=4k/80:256k/20".into(),
            "--iodepth=8".into(),
            "--size=64m".into(),
            "--time_based".into(),
            "--runtime=4".into(),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let during = scrape(mport);
    let cli = mirrorblk_cli();
    let status = Command::new(&cli)
        .arg("--admin-socket")
        .arg(&p.files.admin)
        .args(["status", "--json"])
        .output()
        .expect("run mirrorblk status");
    let run = fio.wait(Duration::from_secs(60));
    assert!(run.success(), "fio failed: {run}");

    assert!(
        sample(&during, writes) > before,
        "the write counter did not rise during fio"
    );
    assert!(
        sample(
            &during,
            "mirrorblk_request_duration_seconds_count{volume=\"vol0\",op=\"write\"}"
        ) > 0.0,
        "the write latency histogram is empty during fio"
    );
    for peer in ["n2", "n3"] {
        let l = format!("{{volume=\"vol0\",peer=\"{peer}\"}}");
        assert_eq!(
            sample(&during, &format!("mirrorblk_replica_state{l}")),
            2.0,
            "{peer} not in-sync during fio"
        );
        for lag in ["mirrorblk_replica_lag_lsn", "mirrorblk_replica_lag_bytes"] {
            assert!(during.contains(&format!("{lag}{l}")), "no {lag} for {peer}");
        }
    }
    assert_eq!(
        sample(&during, "mirrorblk_payload_copies_total{volume=\"vol0\"}"),
        0.0,
        "payload bytes were copied"
    );
    let in_place = "mirrorblk_in_place_write_bytes_total{volume=\"vol0\"}";
    assert!(
        sample(&during, in_place) > 0.0,
        "no write went to the primary's store in place"
    );
    assert!(
        sample(&scrape(r3_port), in_place) > 0.0,
        "no replicated write went to n3's store in place"
    );

    assert!(
        status.status.success(),
        "status --json failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let vol = &v["volumes"][0];
    assert_eq!(vol["role"], "primary", "{v:#}");
    assert_eq!(vol["epoch"], 1, "{v:#}");
    let reps = vol["replicas"].as_array().expect("replicas");
    assert_eq!(reps.len(), 2, "{v:#}");
    for r in reps {
        assert_eq!(r["state"], "in-sync", "{v:#}");
        assert!(
            r["lag_lsn"].is_u64() && r["lag_bytes"].is_u64(),
            "no lag in {r:#}"
        );
        assert!(r["durable_lsn"].as_u64().unwrap_or(0) > 0, "{r:#}");
    }

    // Killed: the state metric leaves in-sync within the heartbeat timeout.
    let mut r2 = r2;
    r2.daemon.kill9();
    let killed = Instant::now();
    let state = "mirrorblk_replica_state{volume=\"vol0\",peer=\"n2\"}";
    while sample(&scrape(mport), state) == 2.0 {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "n2's state metric still says in-sync {:?} after its kill (heartbeat timeout 2 s)",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "n2's state metric changed {:?} after kill -9",
        killed.elapsed()
    );

    // n3 replaced by a new, empty node: a full resync, watched to the end.
    r3.stop();
    std::fs::remove_file(&r3.files.journal).expect("remove n3's journal");
    std::fs::remove_file(&r3.files.data).expect("remove n3's data");
    r3.daemon.restart();
    p.wait_status(Duration::from_secs(20), "n3's resync started", |s| {
        let v = view_of(s, "n3");
        v.resync.is_some() && v.state == ReplicaState::Resyncing
    });
    let watch = p.cli(&["resync", "--watch"], Duration::from_secs(120));
    assert_eq!(watch.code, 0, "resync --watch: {watch:#?}");
    let progress: Vec<&str> = watch
        .stdout
        .lines()
        .filter(|l| l.starts_with("vol0/n3: resync ") && l.contains('%'))
        .collect();
    assert!(
        !progress.is_empty(),
        "resync --watch showed no progress: {watch:#?}"
    );
    assert!(
        watch.stdout.contains("vol0/n3: resync complete")
            && watch.stdout.contains("all resyncs complete"),
        "resync --watch did not follow the resync to its end: {watch:#?}"
    );
    let s = p.status();
    assert!(view_of(&s, "n3").resync.is_none(), "{s:#?}");
    r2.daemon.restart();
    p.wait_replicas_in_sync(Duration::from_secs(30));
}

/// SIGTERM while a client keeps 8 writes in flight: the daemon drains and
/// exits 0 well within its bound, every write it acknowledged reads back
/// after a restart, and that restart replays nothing (the journal was
/// checkpointed on the way out).
#[test]
fn sigterm_under_load_drains_and_restart_replays_nothing() {
    use mirrorblk_tests::util::pattern;
    use nbd::{Command as NbdCommand, CommandFlags, Request};
    let dir = TestDir::new();
    let mut d = Daemon::start(dir.volume_args("vol0", "64M"));
    let mut c = d.connect("vol0");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut inflight = std::collections::HashMap::new();
            let mut next = 0u64;
            let blocks = 64 * 1024 * 1024 / 4096;
            loop {
                while inflight.len() < 8 && next < blocks {
                    let cookie = c.next_cookie();
                    let req = Request {
                        flags: CommandFlags::empty(),
                        command: NbdCommand::Write,
                        cookie,
                        offset: next * 4096,
                        length: 4096,
                    };
                    if c.submit(&req, Some(&pattern(next, 4096))).is_err() {
                        return done;
                    }
                    inflight.insert(cookie, next);
                    next += 1;
                }
                if inflight.is_empty() {
                    return done;
                }
                let Ok(r) = c.receive() else { return done };
                let block = inflight.remove(&r.cookie).expect("known cookie");
                match r.error {
                    None => done.push(block),
                    // Requests that arrive while it drains are refused with
                    // ESHUTDOWN (108): not acknowledged, and no more are sent.
                    Some(108) => next = blocks,
                    Some(e) => panic!("write of block {block} failed with NBD error {e}"),
                }
                acked.store(done.len(), std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let t = Instant::now();
    while acked.load(std::sync::atomic::Ordering::Relaxed) < 500
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopping = Instant::now();
    let st = d.terminate();
    let took = stopping.elapsed();
    assert!(
        st.success(),
        "SIGTERM under load: exit {st:?}; log:\n{}",
        d.log()
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?} to exit"
    );
    let done = writer.join().expect("writer");
    assert!(done.len() >= 500, "only {} writes acknowledged", done.len());
    eprintln!(
        "exited 0 {took:?} after SIGTERM with {} writes acknowledged",
        done.len()
    );

    d.restart();
    let replayed = d.wait_for_log("journal recovery replayed", Duration::from_secs(10));
    assert!(
        replayed.contains("replayed 0 records"),
        "the restart replayed records past the checkpoint: {replayed}"
    );
    let mut c = d.connect("vol0");
    for &b in &done {
        assert!(
            c.read(b * 4096, 4096).expect("read") == pattern(b, 4096),
            "acknowledged block {b} does not read back after SIGTERM and restart"
        );
    }
}

/// The soft open-file limit of a process, from /proc/PID/limits.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no soft limit in {line:?}"))
}

/// Started with systemd's usual soft open-file limit (1024, below what the
/// default --max-connections and --max-handshakes may hold), the daemon
/// raises its soft limit to the hard one.
#[test]
fn daemon_raises_its_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard > 1024,
        "this host's hard limit {hard} leaves nothing to raise"
    );
    // nextest runs each test in its own process: only this one is lowered,
    // and the daemon inherits it.
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).expect("lower the soft limit");
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    assert_eq!(soft_nofile(d.pid()), hard, "the daemon's soft limit");
}
