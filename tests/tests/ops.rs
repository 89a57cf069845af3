//! Operations: the systemd unit verifies, metrics move under load, the admin
//! socket answers, and the offline journal inspector reads a stopped node.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

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
    let unit = std::fs::read_to_string(workspace_root().join("systemd/mirrorblkd@.service"))
        .expect("unit file");
    // Verify checks that ExecStart's binary exists: point it at the build.
    let daemon = mirrorblk_tests::daemon::mirrorblkd_path();
    let unit = unit.replace(
        "/usr/local/bin/mirrorblkd",
        daemon.to_str().expect("utf-8 path"),
    );
    let path = dir.join("mirrorblkd@.service");
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
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        !text.contains("Unknown key"),
        "unit has unknown keys:\n{text}"
    );
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
