//! One volume on several cores (docs/ARCHITECTURE.md, "Threads"): with
//! `--cores 2` a volume's plain-export connections open at once alternate
//! between its home core and a satellite core. A satellite reads the store itself only
//! when nothing is unapplied and forwards everything else home, so NBD's
//! multi-conn promises hold across the cores:
//! - a write acknowledged on one connection reads back at once on every
//!   other, also while the applier is behind (`--durability flush` keeps
//!   records unapplied until a sync);
//! - a FLUSH on one connection covers the writes completed on the others
//!   (`kill -9` right after its reply loses none of them);
//! - after a shrink, a satellite refuses reads past the new end as the home
//!   core does (EINVAL);
//! - `nbdcopy -C 4` (libnbd, four connections) copies out exactly what was
//!   written.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mirrorblk_tests::daemon::{args, Daemon, TestDir};
use mirrorblk_tests::tools::{self, Tool, TOOL_TIMEOUT};
use mirrorblk_tests::util::{assert_bytes_eq, pattern, Rng, KIB4, MIB};
use nbd::{ClientError, ErrorCode};

/// Bound of every loop here.
const LOOP_BUDGET: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The value of `metric{volume="vol0"}` scraped from the metrics endpoint.
fn metric(port: u16, name: &str) -> f64 {
    series(port, &format!("{name}{{volume=\"vol0\"}}"))
}

/// The value of the unlabelled `name` scraped from the metrics endpoint.
fn process_metric(port: u16, name: &str) -> f64 {
    series(port, name)
}

/// The value of the series named exactly `series` (name and labels)
/// scraped from the metrics endpoint (0 when it is not there).
fn series(port: u16, series: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let mut out = String::new();
            if s.read_to_string(&mut out).is_ok() && out.contains("\r\n\r\n") {
                break out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics on port {port} never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

/// A daemon serving vol0 (64M) on two cores, with metrics on `port`.
fn two_cores(dir: &TestDir, port: Option<u16>, extra: &[&str]) -> Daemon {
    let mut a = dir.volume_args("vol0", "64M");
    a.extend(args(["--cores", "2"]));
    if let Some(port) = port {
        let listen = format!("127.0.0.1:{port}");
        a.extend(args(["--metrics-listen", listen.as_str()]));
    }
    a.extend(extra.iter().map(OsString::from));
    Daemon::start(&a)
}

/// Reads `[off, off + data.len())` on every connection: `data` each time.
#[track_caller]
fn read_on_every(conns: &mut [nbd::Client<TcpStream>], off: u64, data: &[u8], what: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let got = c.read(off, data.len() as u32).expect("read");
        assert_bytes_eq(&format!("{what}, read on connection {i}"), off, data, &got);
    }
}

/// Four connections: the first and third on the home core, the second and
/// fourth on the satellite (each goes to the core serving the fewest, home
/// first on a tie). With
/// `--durability flush` the applier applies a record only after a sync, so
/// most reads right after a write find it unapplied (satellites forward
/// them); with `per-write` it is usually applied at once (satellites read
/// the store). Now and then the applier is let catch up and every
/// connection rereads, so satellites read the store in both.
#[test]
fn a_write_acknowledged_on_one_connection_reads_back_at_once_on_every_other() {
    for durability in ["flush", "per-write"] {
        let dir = TestDir::new();
        let port = free_port();
        let d = two_cores(&dir, Some(port), &["--durability", durability]);
        let mut conns: Vec<_> = (0..4).map(|_| d.connect("vol0")).collect();
        let mut rng = Rng::from_env_or_time("multicore-read-your-writes");
        let started = Instant::now();
        let rounds = 400;
        for round in 0..rounds {
            assert!(
                started.elapsed() < LOOP_BUDGET,
                "{durability}: {round} of {rounds} rounds in {LOOP_BUDGET:?}"
            );
            let writer = round % conns.len();
            // Unaligned too: a satellite reads whole blocks around it.
            let off = rng.below(64) * 16 * KIB4 + rng.below(4) * 512;
            let len = (rng.range(1, 8) * KIB4) as usize;
            let data = pattern(rng.next_u64(), len);
            conns[writer].write(off, &data, false).expect("write");
            let what = format!("{durability}, round {round}: written on connection {writer}");
            read_on_every(&mut conns, off, &data, &format!("{what}, at once"));
            if round % 20 == 19 {
                conns[writer].flush().expect("flush");
                std::thread::sleep(Duration::from_millis(150));
                read_on_every(&mut conns, off, &data, &format!("{what}, after a pause"));
            }
        }
        let local = metric(port, "mirrorblk_satellite_local_reads_total");
        let forwarded = metric(port, "mirrorblk_forwarded_requests_total");
        assert!(
            local >= 20.0 && forwarded >= 100.0,
            "{durability}: satellite reads must take both paths: {local} served locally, {forwarded} requests forwarded"
        );
    }
}

/// Writes on one connection, FLUSH on another (each way between the home
/// core and the satellite: even cycles write on the satellite and flush
/// home, odd ones the other way), `kill -9` right after the FLUSH reply:
/// every write stays after the restart, read on both cores.
#[test]
fn a_flush_on_one_connection_covers_writes_completed_on_the_others_across_kill_9() {
    let dir = TestDir::new();
    let mut d = two_cores(&dir, None, &["--durability", "flush"]);
    let mut rng = Rng::from_env_or_time("multicore-flush-covers");
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    for cycle in 0..5u64 {
        // A fresh process with nothing else connected: the first connection
        // stays home, the second goes to the satellite.
        let (home, sat) = (0, 1);
        let mut conns: Vec<_> = (0..2).map(|_| d.connect("vol0")).collect();
        // What the flushes before the kills covered, on both cores.
        for (i, c) in conns.iter_mut().enumerate() {
            for (off, data) in &written {
                let got = c.read(*off, data.len() as u32).expect("read after restart");
                let what = format!("after kill -9 {cycle}, read on connection {i}");
                assert_bytes_eq(&what, *off, data, &got);
            }
        }
        if cycle == 4 {
            break;
        }
        let (writer, flusher) = if cycle % 2 == 0 {
            (sat, home)
        } else {
            (home, sat)
        };
        // Large writes: forwarding them takes the home core a while, so a
        // satellite that acknowledged one before the home core journaled
        // it would be caught by the flush and kill right behind.
        for i in 0..16u64 {
            let off = (cycle * 16 + i) * MIB;
            let data = pattern(rng.next_u64(), (KIB4 * rng.range(64, 256)) as usize);
            conns[writer].write(off, &data, false).expect("write");
            written.push((off, data));
        }
        conns[flusher].flush().expect("flush");
        d.kill9();
        d.restart();
    }
}

/// The error a read gets.
fn read_error(c: &mut nbd::Client<TcpStream>, off: u64, len: u32) -> Option<u32> {
    match c.read(off, len) {
        Ok(_) => None,
        Err(ClientError::Server(code)) => Some(code),
        Err(e) => panic!("read at {off}: {e} (the server must answer)"),
    }
}

/// Shrink 64M → 32M while a satellite connection is open: its reads past
/// the new end fail with EINVAL as the home core's do (while the resize
/// is pending and once it is applied), and reads below it still work.
#[test]
fn a_satellite_refuses_reads_past_the_end_after_a_shrink() {
    let dir = TestDir::new();
    let port = free_port();
    let d = two_cores(&dir, Some(port), &[]);
    let mut home = d.connect("vol0");
    let mut sat = d.connect("vol0");
    let low = pattern(1, 64 * 1024);
    home.write(0, &low, true).expect("write below the new end");
    sat.write(40 * MIB, &pattern(2, 4096), true)
        .expect("write past the new end, before the shrink");
    let r = mirrorblk_admin::call(
        &d.admin_socket(),
        &mirrorblk_admin::Request::Resize {
            volume: "vol0".into(),
            size: 32 * MIB,
            force: true,
        },
    )
    .expect("admin call");
    assert!(r.ok, "shrink refused: {:?}", r.error);
    let started = Instant::now();
    let mut rounds = 0;
    // Both before and after the resize record is applied (the applier
    // runs within milliseconds; 300 ms of rounds see both).
    while started.elapsed() < Duration::from_millis(300) {
        for (name, c) in [("home", &mut home), ("satellite", &mut sat)] {
            for (off, len) in [(40 * MIB, 4096), (32 * MIB, 4096), (32 * MIB - 4096, 8192)] {
                assert_eq!(
                    read_error(c, off, len),
                    Some(ErrorCode::Inval as u32),
                    "{name} read of {len} bytes at {off} after the shrink to 32M"
                );
            }
            let got = c.read(0, low.len() as u32).expect("read below the new end");
            assert_bytes_eq(&format!("{name} read below the new end"), 0, &low, &got);
        }
        rounds += 1;
    }
    assert!(rounds >= 3, "only {rounds} rounds");
    assert!(
        metric(port, "mirrorblk_satellite_local_reads_total") >= 1.0,
        "the satellite never read on its own"
    );
}

/// `nbdcopy -C 4` in and out: four connections over two cores, the copy
/// out equal to what went in (and to blocks overwritten just before it,
/// still unapplied).
#[test]
fn nbdcopy_with_four_connections_copies_out_what_was_written() {
    let dir = TestDir::new();
    let port = free_port();
    let d = two_cores(&dir, Some(port), &["--durability", "flush"]);
    let uri = d.uri("vol0");
    let img_path = dir.join("in.raw");
    let mut img = pattern(17, (64 * MIB) as usize);
    std::fs::write(&img_path, &img).expect("write the image");
    tools::run(
        Tool::NbdCopy,
        args(["-C", "4", img_path.to_str().expect("utf-8"), uri.as_str()]),
        TOOL_TIMEOUT,
    )
    .expect_success();
    // Fresh writes the applier has not reached yet (no flush asks for them).
    let mut c = d.connect("vol0");
    for i in 0..16u64 {
        let off = i * 4 * MIB;
        let data = pattern(100 + i, KIB4 as usize);
        c.write(off, &data, false).expect("write");
        img[off as usize..(off + KIB4) as usize].copy_from_slice(&data);
    }
    // nbdcopy hands out work as connections ask for it, so a copy may end
    // before a slower connection (the satellite makes its buffer pool at
    // its first connection) gets any: copy again until the satellite has
    // served some (a precondition of this test, not its rule), bounded.
    let reached = || {
        metric(port, "mirrorblk_satellite_local_reads_total") >= 1.0
            && metric(port, "mirrorblk_forwarded_requests_total") >= 1.0
    };
    for attempt in 0..5 {
        let out = dir.join(&format!("out{attempt}.raw"));
        tools::run(
            Tool::NbdCopy,
            args(["-C", "4", uri.as_str(), out.to_str().expect("utf-8")]),
            TOOL_TIMEOUT,
        )
        .expect_success();
        let copied = std::fs::read(&out).expect("read the copy");
        assert_bytes_eq(
            &format!("nbdcopy -C 4 out, copy {attempt}"),
            0,
            &img,
            &copied,
        );
        std::fs::remove_file(&out).expect("remove the copy");
        if reached() {
            break;
        }
    }
    assert!(
        reached(),
        "in 5 copies nbdcopy's connections never reached the satellite"
    );
}

/// The kernel's count of pages pinned by process `pid` (`VmPin`, bytes):
/// what io_uring's registered buffers hold.
fn pinned(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Waits (bounded) until `pid` pins more than `floor` bytes; the last value.
fn pinned_above(pid: u32, floor: u64, limit: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let now = pinned(pid);
        if now > floor || started.elapsed() > limit {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A core serving no volume of its own (every CPU gets a core by default)
/// makes its buffer pool at its first satellite connection: idle, the
/// daemon pins one `--buffer-memory` (the home core's), not one per core;
/// once a connection lands on the satellite, its pool is made too.
#[test]
fn an_idle_satellite_core_pins_no_buffer_memory() {
    const BUDGET: u64 = 64 * MIB;
    let dir = TestDir::new();
    let d = two_cores(&dir, None, &["--buffer-memory", "64M"]);
    let pid = d.pid();
    // Registration pins the pages a moment after the core starts.
    let home = pinned_above(pid, 0, Duration::from_secs(10));
    assert!(home > 0, "the home core's pool was never registered");
    std::thread::sleep(Duration::from_secs(1));
    let idle = pinned(pid);
    assert!(
        idle <= BUDGET,
        "idle with --cores 2, {idle} bytes pinned: more than one --buffer-memory of {BUDGET}"
    );
    // The first connection stays home (a tie), the second goes to the satellite.
    let mut conns: Vec<_> = (0..2).map(|_| d.connect("vol0")).collect();
    for c in &mut conns {
        c.read(0, KIB4 as u32).expect("read");
    }
    let busy = pinned_above(pid, BUDGET, Duration::from_secs(10));
    assert!(
        busy > BUDGET,
        "a connection on the satellite, yet only {busy} bytes pinned: its pool was never made"
    );
}

/// `--busy-poll-us`: the cores poll instead of sleeping after each request
/// (the poller submits the ring's queue itself, since a polling thread
/// never parks). Two connections, one per core, each at queue depth 1
/// (where polling runs), write and read back, small writes and now and
/// then a large one (where it does not); a FLUSH then `kill -9`
/// loses nothing. The metric shows the cores did poll, and a daemon
/// without the flag never does.
#[test]
fn busy_polling_cores_serve_every_request_and_a_flush_covers_them() {
    let dir = TestDir::new();
    let port = free_port();
    let mut d = two_cores(&dir, Some(port), &["--busy-poll-us", "500"]);
    let mut conns: Vec<_> = (0..2).map(|_| d.connect("vol0")).collect();
    let mut rng = Rng::from_env_or_time("multicore-busy-poll");
    let mut written = Vec::new();
    let started = Instant::now();
    for round in 0..300u64 {
        assert!(
            started.elapsed() < LOOP_BUDGET,
            "{round} rounds in {LOOP_BUDGET:?}"
        );
        // Every 25th a large write, which the cores do not poll for.
        let blocks = if round % 25 == 24 {
            32
        } else {
            rng.range(1, 4)
        };
        let off = round * 32 * KIB4;
        let data = pattern(rng.next_u64(), (KIB4 * blocks) as usize);
        conns[(round % 2) as usize]
            .write(off, &data, false)
            .expect("write");
        read_on_every(&mut conns, off, &data, &format!("round {round}"));
        written.push((off, data));
    }
    let rounds = process_metric(port, "mirrorblk_busy_poll_rounds_total");
    assert!(
        rounds >= 100.0,
        "the cores polled {rounds} rounds for 300 writes"
    );
    conns[1].flush().expect("flush");
    drop(conns);
    d.kill9();
    d.restart();
    let mut c = d.connect("vol0");
    for (off, data) in &written {
        let got = c.read(*off, data.len() as u32).expect("read after restart");
        assert_bytes_eq("after the flush and kill -9", *off, data, &got);
    }
    drop(c);
    drop(d);
    let plain_dir = TestDir::new();
    let plain_port = free_port();
    let plain = two_cores(&plain_dir, Some(plain_port), &[]);
    let mut c = plain.connect("vol0");
    for i in 0..50u64 {
        c.write(i * KIB4, &pattern(i, KIB4 as usize), false)
            .expect("write");
    }
    let rounds = process_metric(plain_port, "mirrorblk_busy_poll_rounds_total");
    assert_eq!(rounds, 0.0, "a daemon without --busy-poll-us polled");
}
