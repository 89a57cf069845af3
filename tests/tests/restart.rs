//! Live restart (`mirrorblk restart`): the daemon hands its listeners and its
//! NBD connections to a new process, and clients never notice more than a
//! pause. fio's nbd engine (libnbd, which never reconnects) writes with
//! crc32c verification across the restarts, alone and with a replica (which
//! catches up without a resync); a new binary that exits at start leaves
//! the old process serving; one that fails after the hand-over is replaced
//! by the running binary.

mod restart {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use mirrorblk_admin::{Event, EventKind, RestartOutcome};
    use mirrorblk_tests::cluster::{write_secret, Node, NodeFiles};
    use mirrorblk_tests::tools::{self, Tool};
    use mirrorblk_tests::{Daemon, TestDir};

    /// Bound on one `mirrorblk restart` (start, drain, hand-over, recovery).
    const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
    /// Bound on the old process exiting after it answered.
    const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Bound on a fio run (64 MiB written and verified, debug build).
    const FIO_TIMEOUT: Duration = Duration::from_secs(180);
    /// Bound on fio getting under way, and on replicas reaching in-sync.
    const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Journal size with a replica: while the replica is away (its restart)
    /// and then catches up, fio goes on at full speed (it is not in sync, so
    /// writes do not wait for it); the primary keeps records for it up to
    /// half its journal, beyond which the replica would need a bitmap
    /// resync. 256M holds all of fio's 64 MiB.
    const JOURNAL: &str = "256M";
    /// Bound on one `mirrorblk events` or `status` run.
    const CLI_TIMEOUT: Duration = Duration::from_secs(20);

    /// fio through the nbd engine: 64 MiB of 4 KiB random writes (queue
    /// depth 16; 16384 writes, so it is still writing at the restarts),
    /// every block verified with crc32c (inline every 256 blocks, and all at
    /// the end), any mismatch fatal.
    fn start_fio(dir: &TestDir, uri: &str, name: &str) -> (tools::Background, std::path::PathBuf) {
        let out = dir.join(&format!("{name}.json"));
        let args = vec![
            "--name=restart".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--size=64m".into(),
            "--iodepth=16".into(),
            "--verify=crc32c".into(),
            "--verify_fatal=1".into(),
            "--verify_backlog=256".into(),
            "--do_verify=1".into(),
            "--verify_state_save=0".into(),
            "--output-format=json".into(),
            format!("--output={}", out.display()),
        ];
        (tools::spawn(Tool::Fio, &args), out)
    }

    /// Waits for fio's end and checks it wrote and verified everything with
    /// no error; returns the largest write completion latency (ms).
    #[track_caller]
    fn finish_fio(fio: tools::Background, out: &Path) -> f64 {
        let run = fio.wait(FIO_TIMEOUT);
        let v = tools::fio_report(out, &run);
        let job = &v["jobs"][0];
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio reported an error: {job:#}"
        );
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(64 << 20),
            "fio did not write everything: {job:#}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 64 << 20,
            "fio did not verify everything: {job:#}"
        );
        job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6
    }

    /// Waits until the volume has taken `records` writes (fio is under way).
    fn wait_writing(node: &Node, records: u64) {
        node.wait_status(SETTLE_TIMEOUT, "fio under way", |s| s.last_lsn >= records);
    }

    /// `mirrorblk restart --json` on `node` (with `--binary` if given): the
    /// outcome, or the CLI's exit code and stderr.
    fn restart(node: &Node, binary: Option<&Path>) -> Result<RestartOutcome, (i32, String)> {
        let mut args = vec!["restart", "--json"];
        let b;
        if let Some(p) = binary {
            b = p.display().to_string();
            args.extend(["--binary", b.as_str()]);
        }
        let run = node.cli(&args, RESTART_TIMEOUT);
        if run.code != 0 {
            return Err((run.code, run.stderr));
        }
        Ok(serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("restart --json printed no outcome ({e}): {run:?}")))
    }

    /// Restarts `node` live and checks the new process serves: another pid
    /// in the outcome and in `status --json`, a later start, and the old
    /// process gone with status 0. Returns the outcome.
    #[track_caller]
    fn restart_live(node: &mut Node) -> RestartOutcome {
        let before = node.daemon.ready().clone();
        let old = node.daemon.pid();
        let o = restart(node, None).unwrap_or_else(|(code, err)| {
            panic!("restart failed ({code}): {err}\n{}", node.daemon.full_log())
        });
        assert_eq!(o.from_pid, old, "{o:?}");
        assert_ne!(o.pid, old, "a new process serves: {o:?}");
        let st = node.daemon.follow_successor(o.pid, EXIT_TIMEOUT);
        assert!(st.success(), "the old process exited with {st}");
        let status = node.cli(&["status", "--json"], CLI_TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&status.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {status:?}"));
        assert_eq!(
            v["pid"].as_u64(),
            Some(o.pid as u64),
            "status names the new pid: {v}"
        );
        let started = v["started_at"].as_f64().unwrap_or(0.0);
        assert!(
            started > before.started_at,
            "status gives the new start time: {v}"
        );
        o
    }

    /// Every event of `node`'s log (`mirrorblk events --json`).
    fn events_of(node: &Node) -> Vec<Event> {
        let out = node.cli(&["events", "--json"], CLI_TIMEOUT);
        assert_eq!(out.code, 0, "mirrorblk events failed: {out:#?}");
        out.stdout
            .lines()
            .map(|l| Event::from_line(l).unwrap_or_else(|e| panic!("{l:?} is no event: {e}")))
            .collect()
    }

    /// The events after the last `daemon-start` that took over from `pid`.
    fn events_since_take_over(node: &Node, pid: u32) -> Vec<EventKind> {
        let all = events_of(node);
        let at = all
            .iter()
            .rposition(|e| matches!(e.kind, EventKind::DaemonStart { took_over_from: Some(p), .. } if p == pid))
            .unwrap_or_else(|| panic!("no daemon-start taking over from pid {pid}: {all:#?}"));
        all[at..].iter().map(|e| e.kind.clone()).collect()
    }

    /// A standalone primary on `dir`'s files, with an admin socket and
    /// `extra` flags.
    fn standalone(dir: &TestDir, extra: &[&std::ffi::OsStr]) -> Node {
        let files = NodeFiles::new(dir, "n1");
        let mut args = files.standalone_primary_args("64M");
        args.extend(extra.iter().map(|a| a.to_os_string()));
        let daemon = Daemon::start(args);
        Node {
            files,
            daemon,
            replication: None,
        }
    }

    /// `GET /metrics` on `port`: the body (bounded).
    /// Waits (bounded) until the metrics on `port` count `n` open NBD
    /// connections.
    fn wait_connections(port: u16, n: u64) {
        let open = |m: &str| {
            m.lines()
                .filter(|l| {
                    l.starts_with("mirrorblk_connections ")
                        || l.starts_with("mirrorblk_connections{")
                })
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let since = std::time::Instant::now();
        loop {
            let now = open(&scrape(port));
            if now >= n as f64 {
                return;
            }
            assert!(
                since.elapsed() < SETTLE_TIMEOUT,
                "{n} NBD connections not open within {SETTLE_TIMEOUT:?} (open: {now})"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn scrape(port: u16) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("metrics port {port}: {e}"));
        s.set_read_timeout(Some(CLI_TIMEOUT)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("send the scrape");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read the scrape");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        out
    }

    /// fio writes and verifies 64 MiB through a standalone primary, over
    /// TCP and over its Unix socket at once, while it is restarted live
    /// twice: both fio runs exit 0 with no error, each restart hands both
    /// connections over, another pid serves each time, the metrics port
    /// answers the new process (handed over, never rebound) with the pause,
    /// and the event log shows the take-over.
    #[test]
    fn fio_verifies_across_two_live_restarts() {
        Daemon::become_subreaper();
        let dir = TestDir::new();
        let sock = dir.join("n1.nbd");
        let port = mirrorblk_tests::cluster::pick_port();
        let metrics = format!("127.0.0.1:{port}");
        let mut n1 = standalone(
            &dir,
            &[
                "--unix".as_ref(),
                sock.as_os_str(),
                "--metrics-listen".as_ref(),
                metrics.as_ref(),
            ],
        );
        let (fio, out) = start_fio(&dir, &n1.daemon.uri("vol0"), "fio");
        let unix_uri = format!("nbd+unix:///vol0?socket={}", sock.display());
        let (fio_unix, out_unix) = start_fio(&dir, &unix_uri, "fio-unix");
        wait_writing(&n1, 300);
        // Both fio runs connected (a loaded machine may start one late).
        wait_connections(port, 2);
        let first = restart_live(&mut n1);
        assert_eq!(
            first.connections, 2,
            "both fio connections were handed over: {first:?}"
        );
        let m = scrape(port);
        assert!(m.contains("mirrorblk_restart_pause_seconds"), "{m}");
        wait_writing(&n1, n1.status().last_lsn + 300);
        let second = restart_live(&mut n1);
        assert_eq!(second.connections, 2, "{second:?}");
        let max_ms = finish_fio(fio, &out);
        let max_unix_ms = finish_fio(fio_unix, &out_unix);
        eprintln!(
            "live restarts under fio: pauses {} ms and {} ms; largest write latency {max_ms:.1} ms (TCP), {max_unix_ms:.1} ms (Unix)",
            first.pause_ms, second.pause_ms
        );
        let ev = events_since_take_over(&n1, first.pid);
        assert!(
            ev.iter().any(|k| matches!(k, EventKind::HandedOver { from_pid, connections: 2, .. } if *from_pid == second.from_pid)),
            "a handed-over event: {ev:#?}"
        );
        assert!(
            !ev.iter()
                .any(|k| matches!(k, EventKind::ClientAttach { .. })),
            "a handed-over connection is no new attach: {ev:#?}"
        );
        n1.daemon.terminate();
    }

    /// The same with a replica (sync mode): the primary is restarted live
    /// under fio, then the replica (its replication listener handed over).
    /// fio exits 0 with no error; each time the replica is in sync again
    /// by catching up from the journal: no resync pass starts, and no
    /// region is out of sync.
    #[test]
    fn fio_verifies_across_live_restarts_of_primary_and_replica_without_resync() {
        Daemon::become_subreaper();
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut n2 = Node::start_replica(&dir, "n2", &secret, JOURNAL, &[]);
        let mut n1 = Node::start_primary(&dir, "n1", &secret, &[&n2], JOURNAL, &[]);
        n1.wait_replicas_in_sync(SETTLE_TIMEOUT);
        let (fio, out) = start_fio(&dir, &n1.daemon.uri("vol0"), "fio");
        wait_writing(&n1, 300);
        let primary = restart_live(&mut n1);
        assert_eq!(primary.connections, 1, "{primary:?}");
        // No wait for in-sync here: fio must still be writing at the
        // replica's restart (the replica may still be catching up then).
        wait_writing(&n1, n1.status().last_lsn + 300);
        let replica = restart_live(&mut n2);
        assert_eq!(
            replica.connections, 0,
            "a replica serves no NBD client: {replica:?}"
        );
        // The replica's session with the primary ended before its volume
        // closed: the successor finds every record applied, none to replay
        // (and no write of the old process can land after it opened the
        // journal).
        let log = n2.daemon.log_lines();
        let at = |needle: &str| log.iter().rposition(|l| l.contains(needle));
        let (ended, closed) = (at("this node is stopping"), at("stopped: all"));
        assert!(
            matches!((ended, closed), (Some(e), Some(c)) if e < c),
            "n2's replication session did not end before its volume closed: {ended:?} {closed:?}"
        );
        let replays = n2.log_lines_with("journal recovery replayed");
        let last = replays
            .last()
            .expect("n2's successor recovered its journal");
        assert!(
            last.contains("replayed 0 records"),
            "n2 journaled records after it stopped: {replays:#?}"
        );
        let s = n1.wait_replicas_in_sync(SETTLE_TIMEOUT);
        assert_eq!(s.replicas[0].out_of_sync_bytes, 0, "{s:#?}");
        let max_ms = finish_fio(fio, &out);
        eprintln!(
            "live restarts with a replica under fio: primary pause {} ms, replica pause {} ms; largest write latency {max_ms:.1} ms",
            primary.pause_ms, replica.pause_ms
        );
        let ev = events_since_take_over(&n1, primary.from_pid);
        assert!(
            ev.iter()
                .any(|k| matches!(k, EventKind::PeerConnect { .. })),
            "the new primary reconnected to n2: {ev:#?}"
        );
        let resyncs: Vec<_> = ev
            .iter()
            .filter(|k| matches!(k, EventKind::ResyncStart { .. }))
            .collect();
        assert!(
            resyncs.is_empty(),
            "no resync after the restarts: {resyncs:#?}"
        );
        let caught_up = n1.log_lines_with("replica connected at LSN");
        assert!(
            caught_up.len() >= 2,
            "n2 caught up after each restart: {caught_up:#?}"
        );
        n1.daemon.terminate();
        n2.daemon.terminate();
    }

    /// A `--binary` that does not exist, then one that exits 1 at start:
    /// each restart fails saying why (the exit status), the old process
    /// (same pid) serves on, the event log has restart-requested and
    /// restart-failed, and fio, writing and verifying through it meanwhile,
    /// sees no error.
    #[test]
    fn a_binary_that_exits_at_start_leaves_the_old_process_serving() {
        let dir = TestDir::new();
        let mut n1 = standalone(&dir, &[]);
        let bad = dir.join("exits.sh");
        std::fs::write(&bad, "#!/bin/sh\nexit 1\n").expect("write the script");
        std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let pid = n1.daemon.pid();
        let (fio, out) = start_fio(&dir, &n1.daemon.uri("vol0"), "fio");
        wait_writing(&n1, 300);
        let missing = dir.join("no-such-binary");
        let (code, err) = restart(&n1, Some(&missing)).expect_err("a missing binary");
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("cannot start") && err.contains("serves on"),
            "{err}"
        );
        let (code, err) = restart(&n1, Some(&bad)).expect_err("the restart fails");
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("exited (exit status: 1) before serving"),
            "{err}"
        );
        assert!(err.contains(&format!("pid {pid}) serves on")), "{err}");
        n1.daemon.assert_running();
        assert_eq!(n1.daemon.pid(), pid);
        let max_ms = finish_fio(fio, &out);
        eprintln!("failed restart under fio: largest write latency {max_ms:.1} ms");
        let status = n1.cli(&["status", "--json"], CLI_TIMEOUT);
        assert!(
            status.stdout.contains(&format!("\"pid\": {pid}")),
            "{status:?}"
        );
        let all = events_of(&n1);
        assert!(
            all.iter().any(|e| matches!(&e.kind, EventKind::RestartRequested { binary } if binary.ends_with("exits.sh"))),
            "a restart-requested event: {all:#?}"
        );
        assert!(
            all.iter().any(|e| matches!(&e.kind, EventKind::RestartFailed { reason } if reason.contains("exited"))),
            "a restart-failed event: {all:#?}"
        );
        n1.daemon.terminate();
    }

    /// A `--binary` that starts but cannot serve (its event log cannot be
    /// created): it fails after the old process let go of its volumes, so
    /// the old process hands the same connections to the binary it runs.
    /// The restart says so; fio sees no error; another pid serves.
    #[test]
    fn a_binary_that_fails_after_the_hand_over_is_replaced_by_the_running_one() {
        Daemon::become_subreaper();
        let dir = TestDir::new();
        let mut n1 = standalone(&dir, &[]);
        let wrapper = dir.join("fails-late.sh");
        let daemon = mirrorblk_tests::daemon::mirrorblkd_path();
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} \"$@\" --event-log /proc/no-such-dir/events.jsonl\n",
                daemon.display()
            ),
        )
        .expect("write the wrapper");
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let old = n1.daemon.pid();
        let (fio, out) = start_fio(&dir, &n1.daemon.uri("vol0"), "fio");
        wait_writing(&n1, 300);
        let started = Instant::now();
        let (code, err) = restart(&n1, Some(&wrapper)).expect_err("the asked binary fails");
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("the running binary took over as pid"), "{err}");
        let pid: u32 = err
            .split("took over as pid ")
            .nth(1)
            .and_then(|t| t.split(':').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {err}"));
        assert_ne!(pid, old);
        n1.daemon.follow_successor(pid, EXIT_TIMEOUT);
        n1.daemon.assert_running();
        let ev = events_since_take_over(&n1, old);
        assert!(
            ev.iter()
                .any(|k| matches!(k, EventKind::HandedOver { connections: 1, .. })),
            "the running binary took fio's connection over: {ev:#?}"
        );
        let max_ms = finish_fio(fio, &out);
        eprintln!(
            "fallback restart under fio took {:?}; largest write latency {max_ms:.1} ms",
            started.elapsed()
        );
        n1.daemon.terminate();
    }

    /// The leader key of the test volume: the node it names, its epoch and
    /// the lease it is under; and the lease of `replica`'s position record.
    fn etcd_view(etcd: &mirrorblk_tests::etcd::Etcd, replica: &str) -> (String, u64, i64, i64) {
        use mirrorblk_etcd::{records, LeaderRecord, VolumeKeys};
        let keys = VolumeKeys::new(mirrorblk_tests::cluster::EXPORT);
        let kv = etcd
            .get(&keys.leader())
            .expect("read the leader key")
            .expect("a leader key");
        let rec: LeaderRecord = records::decode(&kv).expect("a leader record");
        let node = etcd
            .get(&keys.node(replica))
            .expect("read the replica's record")
            .expect("the replica's position record");
        (rec.node, rec.epoch, kv.lease, node.lease)
    }

    /// Under etcd (`--etcd`, roles decided by the coordinator), a live
    /// restart hands the node's etcd lease to the new process, so it is no
    /// failover: three nodes in sync mode, fio writing and verifying through
    /// the primary while the primary and then a replica are restarted live.
    /// fio exits 0 with no error; the leader key still names the same node,
    /// in the same epoch, under the same lease (no election happened: a
    /// lapsed lease would have made a replica primary in a later epoch); the
    /// replica's position record stays under its lease; and the restarted
    /// primary serves with its replicas in sync.
    #[test]
    fn under_etcd_live_restarts_keep_the_lease_and_the_epoch() {
        use mirrorblk_tests::coordinated::{
            Coordinated, NbdAddr, ELECTION_TIMEOUT, IN_SYNC_TIMEOUT,
        };
        Daemon::become_subreaper();
        let dir = TestDir::new();
        let etcd = mirrorblk_tests::etcd::Etcd::start(dir.path());
        let secret = write_secret(&dir, "secret");
        // Fixed NBD ports: a node elected at start re-executes as primary
        // and would otherwise bind another ephemeral one.
        let nbd: Vec<NbdAddr> = (0..3)
            .map(|_| NbdAddr {
                port: mirrorblk_tests::cluster::pick_port(),
                advertise: None,
            })
            .collect();
        let urls = vec![etcd.url(); 3];
        let mut c = Coordinated::start_listening(
            &dir,
            &secret,
            &urls,
            &["n1", "n2", "n3"],
            "sync",
            &[],
            Some(&nbd),
        );
        let p = c.wait_primary(&[0, 1, 2], ELECTION_TIMEOUT);
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        let r = (p + 1) % 3;
        let replica = c.nodes[r].name().to_string();
        let before = etcd_view(&etcd, &replica);
        assert_eq!(before.0, c.nodes[p].name(), "{before:?}");
        let uri = format!("nbd://127.0.0.1:{}/vol0", nbd[p].port);
        let (fio, out) = start_fio(&dir, &uri, "fio");
        wait_writing(&c.nodes[p], 300);
        let primary = restart_live(&mut c.nodes[p]);
        assert_eq!(
            primary.connections,
            1,
            "{primary:?}\n{}",
            c.nodes[p].daemon.full_log()
        );
        wait_writing(&c.nodes[p], c.nodes[p].status().last_lsn + 300);
        let restarted = restart_live(&mut c.nodes[r]);
        assert_eq!(restarted.connections, 0, "{restarted:?}");
        let max_ms = finish_fio(fio, &out);
        eprintln!(
            "live restarts under etcd: primary pause {} ms, replica pause {} ms; largest write latency {max_ms:.1} ms",
            primary.pause_ms, restarted.pause_ms
        );
        // Past two lease TTLs: a lease left to lapse would be gone by now.
        std::thread::sleep(Duration::from_secs(5));
        let after = etcd_view(&etcd, &replica);
        assert_eq!(
            after, before,
            "(leader, epoch, leader lease, replica lease) changed across the live restarts"
        );
        assert_eq!(c.primaries(), vec![p], "{}", c.describe());
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        for n in &mut c.nodes {
            n.daemon.terminate();
        }
    }

    /// `--tls on` with a TLS client (fio over nbds://) and a clear-text one
    /// (fio over nbd://) writing at once across a live restart: only the
    /// clear-text connection is handed over (a TLS session's keys stay in
    /// the old process); the TLS one is closed at a request boundary and
    /// named in the log, never carried over broken; the clear fio verifies.
    #[test]
    fn a_live_restart_closes_tls_connections_and_hands_over_the_rest() {
        Daemon::become_subreaper();
        let dir = TestDir::new();
        let certs = dir.join("pki");
        let init = std::process::Command::new(mirrorblk_tests::cluster::mirrorblk_cli())
            .args(["certs", "init"])
            .arg(&certs)
            .output()
            .expect("certs init");
        assert!(init.status.success(), "{init:?}");
        let mut n1 = standalone(
            &dir,
            &[
                "--tls".as_ref(),
                "on".as_ref(),
                "--tls-certificates".as_ref(),
                certs.as_os_str(),
            ],
        );
        let (fio, out) = start_fio(&dir, &n1.daemon.uri("vol0"), "fio");
        let tls_uri = format!(
            "nbds://127.0.0.1:{}/vol0?tls-verify-peer=false",
            n1.daemon.port()
        );
        let (fio_tls, _) = start_fio(&dir, &tls_uri, "fio-tls");
        wait_writing(&n1, 600);
        let o = restart_live(&mut n1);
        assert_eq!(
            o.connections, 1,
            "only the clear-text connection is handed over: {o:?}"
        );
        let closed = n1.log_lines_with("closing a TLS connection at the live restart");
        assert_eq!(closed.len(), 1, "{}", n1.daemon.full_log());
        let tls_run = fio_tls.wait(FIO_TIMEOUT);
        assert!(
            !tls_run.success(),
            "fio over TLS went on across the restart: {tls_run}"
        );
        finish_fio(fio, &out);
        // The TLS port itself was handed over: a new TLS client is served.
        tools::run(
            Tool::NbdInfo,
            [format!(
                "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
                n1.daemon.port(),
                certs.display()
            )],
            CLI_TIMEOUT,
        )
        .expect_success();
        n1.daemon.terminate();
    }
}
