//! Replication across real processes: a primary mirrors every write to its
//! replicas over TCP (docs/REPLICATION.md). Each test starts its own nodes on
//! 127.0.0.1 (own files, admin sockets, fixed replication ports), drives
//! writes through the primary with fio or the protocol client, and checks
//! the promises with the nodes' admin-socket status, their logs, and byte
//! comparisons of their data stores after a clean stop (SIGTERM applies and
//! checkpoints everything, so a stopped node's data file holds every write
//! it applied; primaries are stopped first so replicas have everything).

// The tests live in a module so their names start with `replication::` and
// `cargo nextest run -p mirrorblk-tests replication` selects exactly them.
mod replication {
    use std::collections::HashMap;
    use std::fs::File;
    use std::net::TcpStream;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mirrorblk_admin::{ReplicaState, Role};
    use mirrorblk_tests::cluster::{
        assert_stores_identical, view_of, write_secret, Node, EXPORT, VOLUME_BYTES,
    };
    use mirrorblk_tests::daemon::CLIENT_TIMEOUT;
    use mirrorblk_tests::tools::{self, Tool, TOOL_TIMEOUT};
    use mirrorblk_tests::util::{first_difference, pattern, poll_until, Rng, KIB4, MIB};
    use mirrorblk_tests::TestDir;
    use nbd::{Client, ClientError, Command, CommandFlags, Request};

    /// The journal size of most tests (a quarter of the volume).
    const J64: &str = "64M";
    /// Bound on a freshly started cluster reaching in-sync (debug builds, a
    /// loaded 2-core machine, the primary's reconnect backoff).
    const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(20);
    /// Bound on `mirrorblk verify` of a 256M volume (at the default resync rate).
    const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

    /// Replicas n2 and n3 first (so the primary finds them at once), then
    /// primary n1 with `primary_extra` flags. All with `secret` and journals of
    /// `journal`. Returns (primary, n2, n3).
    fn three_nodes(
        dir: &TestDir,
        secret: &std::path::Path,
        journal: &str,
        primary_extra: &[&str],
    ) -> (Node, Node, Node) {
        let r2 = Node::start_replica(dir, "n2", secret, journal, &[]);
        let r3 = Node::start_replica(dir, "n3", secret, journal, &[]);
        let p = Node::start_primary(dir, "n1", secret, &[&r2, &r3], journal, primary_extra);
        (p, r2, r3)
    }

    /// fio through `node`'s NBD export with the report going to `json`.
    fn fio_args(node: &Node, json: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "--name=replication".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={}", node.daemon.uri(EXPORT)),
            "--rw=randwrite".into(),
            "--size=256m".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(tools::fio_json_args(json));
        a
    }

    /// The job of a fio report, after checking fio reported no error.
    #[track_caller]
    fn fio_job(v: &serde_json::Value) -> serde_json::Value {
        let job = v["jobs"][0].clone();
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio reported an error: {job:#}"
        );
        job
    }

    /// Asserts every node reports the same durable LSN, equal to the primary's
    /// last LSN, and the primary sees each replica in-sync at that LSN.
    #[track_caller]
    fn assert_same_durable_lsn(p: &Node, replicas: &[&Node], when: &str) {
        let sp = p.status();
        assert!(sp.last_lsn > 0, "{when}: the primary has no records at all");
        assert_eq!(
            sp.durable_lsn, sp.last_lsn,
            "{when}: the primary's own journal is not durable up to its last LSN: {sp:#?}"
        );
        for r in replicas {
            let sr = r.status();
            assert_eq!(
                sr.durable_lsn,
                sp.durable_lsn,
                "{when}: {} has durable_lsn {} but the primary {}; primary: {sp:#?}\n{}: {sr:#?}",
                r.name(),
                sr.durable_lsn,
                sp.durable_lsn,
                r.name()
            );
            assert!(!sr.inconsistent, "{when}: {} is inconsistent", r.name());
            let view = view_of(&sp, r.name());
            assert!(
                view.state == ReplicaState::InSync
                    && view.durable_lsn == sp.durable_lsn
                    && view.lag_lsn == 0,
                "{when}: the primary's view of {} is not in-sync at LSN {}: {view:#?}",
                r.name(),
                sp.durable_lsn
            );
        }
    }

    /// 1 primary + 2 replicas in sync mode: fio randwrite with crc32c verify
    /// through the primary has no errors; right after it (no waiting: every
    /// acknowledgement in sync mode means durable on every in-sync replica) all
    /// three nodes report the same durable LSN; after SIGTERM the three data
    /// stores are byte-identical.
    #[test]
    fn three_nodes_fio_verify_and_identical_stores() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(&dir, &secret, J64, &["--mode", "sync"]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);

        let json = dir.join("fio.json");
        let a = fio_args(
            &p,
            &json,
            &[
                "--bsrange=4k-512k",
                "--io_size=32m",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                // No state file in the working directory.
                "--verify_state_save=0",
            ],
        );
        let run = tools::run(Tool::Fio, &a, TOOL_TIMEOUT);
        let job = fio_job(&tools::fio_report(&json, &run));
        // Random sizes up to 512K (the larger ones go in place on every
        // node): fio's last write may take it a little past 32M.
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(written >= 32 * MIB, "fio did not write everything: {job:#}");
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(written),
            "fio did not verify everything: {job:#}"
        );

        assert_same_durable_lsn(&p, &[&r2, &r3], "right after fio (sync mode)");

        let v = p.cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(
            v.code, 0,
            "mirrorblk verify did not report all identical: {v:#?}"
        );
        for r in ["vol0/n2: identical", "vol0/n3: identical"] {
            assert!(v.stdout.contains(r), "verify report lacks {r:?}: {v:#?}");
        }

        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }

    /// `replica connected at LSN X; sending from Y` → (X, Y).
    fn parse_connected(line: &str) -> Option<(u64, u64)> {
        let rest = line.split("replica connected at LSN ").nth(1)?;
        let (x, rest) = rest.split_once(';')?;
        let y = rest
            .split("sending from ")
            .nth(1)?
            .split_whitespace()
            .next()?;
        Some((x.trim().parse().ok()?, y.parse().ok()?))
    }

    /// The next LSN a node's journal recovery reported (`...; next LSN M` or
    /// `... and stopped at LSN M: ...`).
    fn recovered_next_lsn(log: &[String]) -> Option<u64> {
        let line = log
            .iter()
            .find(|l| l.contains("journal recovery replayed"))?;
        let tail = line
            .split("; next LSN ")
            .nth(1)
            .or_else(|| line.split("stopped at LSN ").nth(1))?;
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// What happened around a replica's outage.
    struct Outage {
        /// The primary's log from the kill on (a fresh replica's first
        /// connection is a full resync too: that one does not count).
        primary_log: Vec<String>,
        /// The primary's `replica connected at LSN` lines for n2 after the kill.
        reconnects: Vec<String>,
        /// n2's log after its restart.
        replica_log: Vec<String>,
    }

    /// 1 primary + 2 replicas, sync mode, `--heartbeat-timeout 2s`, journals of
    /// `journal`. fio randwrite (time-based, `runtime` s, `fio_extra`) through
    /// the primary; after `kill_after` n2 is killed with -9 and restarted on the
    /// same files `outage` later. Checks: the primary notices, n2 comes back
    /// in-sync with no resync running and is consistent, fio has no error, all
    /// three converge to the same durable LSN, and after SIGTERM the three data
    /// stores are byte-identical.
    fn replica_outage_under_load(
        journal: &str,
        fio_extra: &[&str],
        runtime: u64,
        kill_after: Duration,
        outage: Duration,
    ) -> Outage {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(
            &dir,
            &secret,
            journal,
            &["--mode", "sync", "--heartbeat-timeout", "2s"],
        );
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);

        let json = dir.join("fio.json");
        let mut extra = vec!["--time_based".to_string(), format!("--runtime={runtime}")];
        extra.extend(fio_extra.iter().map(|s| s.to_string()));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let fio = tools::spawn(Tool::Fio, fio_args(&p, &json, &extra));
        let fio_started = Instant::now();

        std::thread::sleep(kill_after);
        let before = p.status();
        assert_eq!(
            view_of(&before, "n2").state,
            ReplicaState::InSync,
            "n2 was not in-sync under load before the kill: {before:#?}"
        );
        assert!(
            before.last_lsn > 0,
            "fio wrote nothing in {kill_after:?}: {before:#?}"
        );
        let connects_before = p.log_lines_with("replica connected at LSN").len();
        let lines_before = p.daemon.log_lines().len();
        r2.daemon.kill9();
        let killed = Instant::now();
        p.wait_status(
            Duration::from_secs(10),
            "the primary to notice that n2 is gone",
            |s| view_of(s, "n2").state != ReplicaState::InSync,
        );
        std::thread::sleep(outage.saturating_sub(killed.elapsed()));
        r2.daemon.restart();

        // Back: streaming, no resync running, and consistent on its own account.
        p.wait_status(
            Duration::from_secs(45),
            "n2 in-sync with no resync running, and not inconsistent",
            |s| {
                let v = view_of(s, "n2");
                v.state == ReplicaState::InSync
                    && v.resync.is_none()
                    && r2.try_status().is_ok_and(|r| !r.inconsistent)
            },
        );
        eprintln!(
            "n2 back in sync {:.1?} after its restart ({:.1?} into fio)",
            killed.elapsed().saturating_sub(outage),
            fio_started.elapsed()
        );

        let run = fio.wait(Duration::from_secs(runtime) + TOOL_TIMEOUT);
        let job = fio_job(&tools::fio_report(&json, &run));
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(written > 0, "fio wrote nothing: {job:#}");

        // Sync mode: once both replicas stream, every write is on them.
        p.wait_status(
            Duration::from_secs(20),
            "both replicas in-sync at the primary's last LSN",
            |s| {
                s.replicas.iter().all(|r| {
                    r.state == ReplicaState::InSync
                        && r.resync.is_none()
                        && r.durable_lsn == s.last_lsn
                })
            },
        );
        assert_same_durable_lsn(&p, &[&r2, &r3], "after fio and the outage");

        let reconnects: Vec<String> = p
            .log_lines_with("replica connected at LSN")
            .into_iter()
            .skip(connects_before)
            .filter(|l| l.contains("peer=n2"))
            .collect();
        assert!(
            !reconnects.is_empty(),
            "the primary never logged n2 reconnecting; its log:\n{}",
            p.daemon.log()
        );

        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
        Outage {
            primary_log: p.daemon.log_lines().split_off(lines_before),
            reconnects,
            replica_log: r2.daemon.log_lines(),
        }
    }

    /// A replica killed with -9 under write load (sync mode, heartbeat 2 s, 64M
    /// journals) and restarted 2 s later is brought back (by a bitmap resync
    /// when the primary's journal no longer holds what it missed, else from
    /// the journal; never by a full resync: the primary knows what it missed)
    /// until it streams in-sync and is consistent; after the load all three
    /// data stores are byte-identical.
    #[test]
    fn replica_killed_under_load_resyncs_and_converges() {
        let o = replica_outage_under_load(
            J64,
            &["--bsrange=4k-512k", "--iodepth=8"],
            8,
            Duration::from_secs(2),
            Duration::from_secs(2),
        );
        let resyncs: Vec<&String> = o
            .primary_log
            .iter()
            .filter(|l| l.contains("resync of n2 ("))
            .collect();
        eprintln!(
            "n2 came back by {}; reconnections: {:#?}",
            if resyncs.is_empty() {
                "catch-up from the journal"
            } else {
                "a bitmap resync"
            },
            o.reconnects
        );
        for line in &resyncs {
            assert!(
                line.contains("bitmap resync of n2"),
                "the primary knew what n2 missed, yet did not resync it by bitmap: {line}"
            );
        }
        if !resyncs.is_empty() {
            assert!(
                o.primary_log
                    .iter()
                    .any(|l| l.contains("resync of n2 complete")),
                "a resync of n2 started but the primary never logged it complete"
            );
            assert!(
                o.replica_log.iter().any(|l| l.contains("resync complete")),
                "a resync of n2 started but n2 never logged it complete:\n{}",
                o.replica_log.join("\n")
            );
        }
    }

    /// A replica down for 1 s under a light load (500 IOPS of 4k, 256M
    /// journals) is caught up from the primary's journal: the primary resends
    /// from the LSN right after the replica's durable one (which is where the
    /// replica's own journal recovery ended) and never starts a full resync.
    /// The stores end byte-identical.
    #[test]
    fn replica_short_outage_catches_up_from_the_journal() {
        let o = replica_outage_under_load(
            "256M",
            &["--bs=4k", "--iodepth=4", "--rate_iops=500"],
            6,
            Duration::from_millis(1500),
            Duration::from_secs(1),
        );
        let resyncs: Vec<&String> = o
            .primary_log
            .iter()
            .filter(|l| l.contains("resync of n2 ("))
            .collect();
        assert!(
            resyncs.is_empty(),
            "a 1 s outage with 256M journals ended in a resync: {resyncs:#?}"
        );
        assert!(
            !o.replica_log
                .iter()
                .any(|l| l.contains("resyncing from the primary")),
            "n2 was resynced:\n{}",
            o.replica_log.join("\n")
        );
        let next = recovered_next_lsn(&o.replica_log).unwrap_or_else(|| {
            panic!(
                "no journal recovery line in n2's restart log:\n{}",
                o.replica_log.join("\n")
            )
        });
        for line in &o.reconnects {
            let (at, from) = parse_connected(line)
                .unwrap_or_else(|| panic!("cannot parse the reconnection line {line:?}"));
            assert_eq!(
                from,
                at + 1,
                "the primary did not resend from the LSN after n2's: {line:?}"
            );
        }
        let (at, from) = parse_connected(&o.reconnects[0]).expect("parsed above");
        assert_eq!(
            at,
            next - 1,
            "n2 recovered up to LSN {} but told the primary {at}: {:?}",
            next - 1,
            o.reconnects[0]
        );
        let want = format!("from LSN {from}");
        assert!(
            o.replica_log
                .iter()
                .any(|l| l.contains("replicating from primary") && l.contains(&want)),
            "n2 did not log replicating {want}:\n{}",
            o.replica_log.join("\n")
        );
    }

    /// One write of the primary-kill test: a region and the seed of its data.
    #[derive(Debug, Clone, Copy)]
    struct Region {
        offset: u64,
        len: u32,
        seed: u64,
    }

    /// What the writer saw before its connection died.
    #[derive(Debug, Default)]
    struct Written {
        /// Writes the primary acknowledged.
        acked: Vec<Region>,
        /// Writes sent but never answered (the primary died first).
        unanswered: Vec<Region>,
        /// Error replies (there must be none).
        errors: Vec<String>,
        /// Offset past the last region sent.
        end: u64,
    }

    /// Pipelined writes (`depth` in flight) of 4k-64k patterned regions, one
    /// after the other from offset 0, until the connection dies, the volume is
    /// nearly full or `limit` passes. `acked` counts acknowledgements as they come.
    fn write_until_cut(
        mut c: Client<TcpStream>,
        seed: u64,
        depth: usize,
        acked: &AtomicUsize,
        limit: Duration,
    ) -> Written {
        let mut w = Written::default();
        let mut rng = Rng::new(seed);
        let mut inflight: HashMap<u64, Region> = HashMap::new();
        let deadline = Instant::now() + limit;
        let mut index = 0u64;
        // The last MiB stays unwritten, to check it reads back as zeroes.
        let room = VOLUME_BYTES - MIB;
        'run: while Instant::now() < deadline {
            while inflight.len() < depth {
                let len = (rng.range(1, 16) * KIB4) as u32;
                if w.end + u64::from(len) > room {
                    break;
                }
                let r = Region {
                    offset: w.end,
                    len,
                    seed: seed ^ (index << 20),
                };
                index += 1;
                let cookie = c.next_cookie();
                let req = Request {
                    flags: CommandFlags::empty(),
                    command: Command::Write,
                    cookie,
                    offset: r.offset,
                    length: u64::from(r.len),
                };
                w.end += u64::from(len);
                inflight.insert(cookie, r);
                if c.submit(&req, Some(&pattern(r.seed, len as usize)))
                    .is_err()
                {
                    break 'run;
                }
            }
            if inflight.is_empty() {
                break;
            }
            let Ok(resp) = c.receive() else { break };
            match inflight.remove(&resp.cookie) {
                Some(r) => match resp.error {
                    None => {
                        w.acked.push(r);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(code) => w
                        .errors
                        .push(format!("write {r:?} failed with NBD error {code}")),
                },
                None => w
                    .errors
                    .push(format!("reply for unknown cookie {}", resp.cookie)),
            }
        }
        w.unanswered = inflight.into_values().collect();
        w
    }

    /// Checks `read(region)` for every region: acknowledged ones hold exactly
    /// their data; unanswered ones hold their data or zeroes (a replicated
    /// record is whole or absent), and `[end, end + 1 MiB)` is zeroes. Returns
    /// the violations.
    fn check_regions(
        what: &str,
        w: &Written,
        mut read: impl FnMut(u64, u32) -> Vec<u8>,
    ) -> Vec<String> {
        let mut bad = Vec::new();
        for r in &w.acked {
            let want = pattern(r.seed, r.len as usize);
            if let Some(d) = first_difference(r.offset, &want, &read(r.offset, r.len)) {
                bad.push(format!("{what}: acknowledged write {r:?} is lost: {d}"));
            }
        }
        for r in &w.unanswered {
            let got = read(r.offset, r.len);
            let zero = got.iter().all(|&b| b == 0);
            if !zero && got != pattern(r.seed, r.len as usize) {
                let d = first_difference(r.offset, &pattern(r.seed, r.len as usize), &got);
                bad.push(format!(
                    "{what}: unanswered write {r:?} is neither absent nor whole: {}",
                    d.unwrap_or_default()
                ));
            }
        }
        let tail = read(w.end, MIB as u32);
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            bad.push(format!(
                "{what}: byte {} past every write is {:#04x}, not zero",
                w.end + i as u64,
                tail[i]
            ));
        }
        bad
    }

    /// A primary whose replica is away (frozen past the heartbeat timeout,
    /// so writes go on without it) is killed with -9 while 1 MiB writes go
    /// to its store in place, each to a region nothing else wrote since the
    /// replica left; three times. After each restart the replica comes back
    /// in sync, and after SIGTERM on both the data stores are byte-identical.
    /// A write placed in the primary's store whose record never became
    /// durable was never acknowledged, but it is in that store: only its
    /// intent record tells recovery to mark the range for the replica's
    /// resync (without it the stores differ there for good).
    #[test]
    fn primary_killed_during_in_place_writes_stays_identical_to_its_replica() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let mut p = Node::start_primary(
            &dir,
            "n1",
            &secret,
            &[&r2],
            J64,
            &["--mode", "sync", "--heartbeat-timeout", "1s"],
        );
        let mut rng = Rng::from_env_or_time("primary_killed_during_in_place_writes");
        let mut intents = 0;
        // A kill finds an in-place write under way in most cycles, not all
        // (on a loaded machine, sometimes none of three): run at least 3
        // cycles and on until one did, at most 8 (the 256M volume holds 8
        // fresh 32 MiB stretches).
        for cycle in 0..8u64 {
            if cycle >= 3 && intents > 0 {
                break;
            }
            p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
            r2.freeze();
            p.wait_status(Duration::from_secs(10), "n2 out of sync", |s| {
                view_of(s, "n2").state != ReplicaState::InSync
            });
            let mut c = p.daemon.connect(EXPORT);
            let seed = rng.next_u64();
            // Sequential 1 MiB writes over a fresh 32 MiB stretch (never
            // wrapping, so no earlier record touched a region written at
            // the kill), 8 in flight; killed at a random point of the run.
            let base = cycle * 32 * MIB;
            let kill_at = rng.range(8, 28);
            let progress = Arc::new(AtomicUsize::new(0));
            let writer = {
                let progress = progress.clone();
                std::thread::spawn(move || {
                    let (mut inflight, mut sent) = (0usize, 0u64);
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while Instant::now() < deadline {
                        while inflight < 8 && sent < 32 {
                            let req = Request {
                                flags: CommandFlags::empty(),
                                command: Command::Write,
                                cookie: c.next_cookie(),
                                offset: base + sent * MIB,
                                length: MIB,
                            };
                            if c.submit(&req, Some(&pattern(seed ^ sent, MIB as usize)))
                                .is_err()
                            {
                                return sent;
                            }
                            sent += 1;
                            inflight += 1;
                            progress.store(sent as usize, Ordering::Relaxed);
                        }
                        if inflight == 0 || c.receive().is_err() {
                            return sent;
                        }
                        inflight -= 1;
                    }
                    sent
                })
            };
            let waited = Instant::now();
            while progress.load(Ordering::Relaxed) < kill_at as usize
                && waited.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            let delay = waited.elapsed();
            p.daemon.kill9();
            let sent = writer.join().expect("the writer thread panicked");
            r2.thaw();
            p.daemon.restart();
            let under_way = p.log_lines_with("were under way at the crash");
            intents += under_way.len();
            eprintln!(
                "cycle {cycle}: killed after {delay:?} and {sent} writes sent; {under_way:?}"
            );
        }
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        p.stop();
        r2.stop();
        assert_stores_identical(&[&p, &r2]);
        assert!(
            intents > 0,
            "no in-place write was under way at any of the kills: the test proved nothing"
        );
    }

    /// Sync mode with 2 replicas: pipelined patterned writes through the
    /// primary; then n3 is frozen (SIGSTOP) for 1 s, well within the heartbeat
    /// timeout so it stays in sync, and meanwhile at most the writes already
    /// in flight may be acknowledged (sync mode waits for every in-sync
    /// replica); the primary is killed with -9 while writes are in flight,
    /// n3 thawed, and both replicas stopped with SIGTERM. Every write the
    /// primary acknowledged is on both replicas: n3 restarted as a standalone
    /// primary on its files serves all of them, and n2's data file holds all
    /// of them. Unanswered writes are whole or absent, never torn.
    #[test]
    fn primary_killed_in_sync_mode_loses_no_acknowledged_write() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(&dir, &secret, J64, &["--mode", "sync"]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        let seed = Rng::from_env_or_time("primary_killed_in_sync_mode").next_u64();

        const DEPTH: usize = 8;
        let client = p.daemon.connect(EXPORT);
        let acked = Arc::new(AtomicUsize::new(0));
        let writer = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                write_until_cut(client, seed, DEPTH, &acked, Duration::from_secs(40))
            })
        };
        // Kill it mid-stream, once a good number of writes are acknowledged.
        const WANT_ACKED: usize = 400;
        let waited = Instant::now();
        while acked.load(Ordering::Relaxed) < WANT_ACKED
            && waited.elapsed() < Duration::from_secs(30)
            && !writer.is_finished()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // n3 hangs: acknowledgements need it, so they stop (but for
        // replies already on their way when it froze).
        r3.freeze();
        let acked_at_freeze = acked.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        let acked_while_frozen = acked.load(Ordering::Relaxed) - acked_at_freeze;
        let sp = p.status();
        p.daemon.kill9();
        r3.thaw();
        let w = writer.join().expect("the writer thread panicked");
        eprintln!(
            "primary killed at last_lsn {} with {} writes acknowledged ({acked_while_frozen} while n3 was frozen), {} unanswered",
            sp.last_lsn,
            w.acked.len(),
            w.unanswered.len()
        );
        assert!(
            acked_while_frozen <= DEPTH,
            "{acked_while_frozen} writes were acknowledged while in-sync replica n3 was frozen (at most the {DEPTH} in flight may be): sync mode acknowledged writes n3 did not have"
        );
        assert_eq!(
            view_of(&sp, "n3").state,
            ReplicaState::InSync,
            "n3 was no longer in sync when the primary was killed, so sync mode did not cover it: {sp:#?}"
        );
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        assert!(
            w.acked.len() >= WANT_ACKED,
            "only {} writes were acknowledged in {:?}",
            w.acked.len(),
            waited.elapsed()
        );
        assert!(
            !w.unanswered.is_empty(),
            "no write was in flight when the primary was killed; the test proves nothing"
        );
        // The promise covers in-sync replicas: both must have stayed in sync.
        let dropped = p.log_lines_with("replica out of sync");
        assert!(
            dropped.is_empty(),
            "a replica fell out of sync before the kill: {dropped:#?}"
        );

        r2.stop();
        r3.stop();

        let mut bad = Vec::new();
        // n2: its data store, read directly.
        let f2 = File::open(&r2.files.data).expect("open n2's data store");
        bad.extend(check_regions("n2's data store", &w, |off, len| {
            let mut b = vec![0u8; len as usize];
            f2.read_exact_at(&mut b, off).expect("read n2's data store");
            b
        }));
        // n3: promoted (restarted alone as primary on its files), over NBD.
        let args = r3.files.standalone_primary_args(J64);
        r3.daemon.restart_with(args);
        assert_eq!(
            r3.status().role,
            Role::Primary,
            "n3 did not come up as primary"
        );
        let mut c = r3.daemon.connect(EXPORT);
        bad.extend(check_regions("n3 promoted", &w, |off, len| {
            c.read(off, len)
                .unwrap_or_else(|e| panic!("read {len} bytes at {off} from promoted n3: {e}"))
        }));
        assert!(
            bad.is_empty(),
            "{} violations (of {} acknowledged writes):\n{}",
            bad.len(),
            w.acked.len(),
            bad.join("\n")
        );
        r3.stop();
    }

    /// A replica with a different secret: the primary reports it out-of-sync
    /// with a reason about the secret, a log says authentication failed, and no
    /// record reaches it while the primary takes writes and keeps retrying.
    #[test]
    fn wrong_secret_is_refused() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let other = write_secret(&dir, "other-secret");
        let mut r2 = Node::start_replica(&dir, "n2", &other, J64, &[]);
        let mut p = Node::start_primary(&dir, "n1", &secret, &[&r2], J64, &[]);

        let s = p.wait_status(
            Duration::from_secs(10),
            "n2 out-of-sync with a reason naming the secret",
            |s| {
                let v = view_of(s, "n2");
                v.state == ReplicaState::OutOfSync
                    && v.reason.as_deref().is_some_and(|m| m.contains("secret"))
            },
        );
        eprintln!("n2 as the primary sees it: {:?}", view_of(&s, "n2"));
        // The status can show the reason a moment before the log line is
        // written and read back: wait for it, bounded.
        let auth_lines = || {
            [
                p.log_lines_with("failed authentication"),
                r2.log_lines_with("failed authentication"),
            ]
            .concat()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut auth = auth_lines();
        while auth.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            auth = auth_lines();
        }
        assert!(
            !auth.is_empty(),
            "neither log says authentication failed; primary:\n{}\nreplica:\n{}",
            p.daemon.log(),
            r2.daemon.log()
        );

        // Writes on the primary (degrade: no in-sync replica holds them up).
        let mut c = p.daemon.connect(EXPORT);
        for i in 0..32u64 {
            c.write(i * 64 * 1024, &pattern(i, 64 * 1024), false)
                .unwrap_or_else(|e| panic!("write {i} on the primary failed: {e}"));
        }
        c.flush().expect("flush on the primary");
        // Let the primary retry at least twice more with records to send.
        let ended = r2.log_lines_with("replication from n1 ended").len();
        poll_until(
            Duration::from_secs(15),
            "two more refused connection attempts",
            || (r2.log_lines_with("replication from n1 ended").len() >= ended + 2).then_some(()),
        );

        let sp = p.status();
        assert!(sp.last_lsn >= 32, "the primary took no records: {sp:#?}");
        let v = view_of(&sp, "n2");
        assert!(
            v.state != ReplicaState::InSync && v.durable_lsn == 0,
            "the primary thinks n2 has records: {v:#?}"
        );
        let sr = r2.status();
        assert!(
            sr.durable_lsn == 0 && sr.last_lsn == 0 && sr.applied_lsn == 0,
            "records reached the replica with the wrong secret: {sr:#?}"
        );
        for (node, needle) in [
            (&p, "replica in-sync peer=n2"),
            (&p, "replica connected at LSN"),
            (&r2, "replicating from primary"),
        ] {
            let hits = node.log_lines_with(needle);
            assert!(
                hits.is_empty(),
                "{} logged {needle:?} though the secrets differ: {hits:#?}",
                node.name()
            );
        }

        p.stop();
        r2.stop();
        let mut b = vec![0u8; 2 * MIB as usize];
        File::open(&p.files.data)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .expect("read n1's store");
        assert_eq!(
            &b[..64 * 1024],
            &pattern(0, 64 * 1024)[..],
            "n1 lost a write"
        );
        File::open(&r2.files.data)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .expect("read n2's store");
        assert!(
            b.iter().all(|&x| x == 0),
            "n2's data store holds written data though it was never authenticated"
        );
    }

    /// A replica does not offer its export: the protocol client and nbdinfo get
    /// a prompt refusal (that names the node a replica, or connection
    /// refused), never a hang,
    /// while the primary serves the volume and the replica keeps replicating.
    #[test]
    fn replica_refuses_nbd_clients() {
        const PROMPT: Duration = Duration::from_secs(5);
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let p = Node::start_primary(&dir, "n1", &secret, &[&r2], J64, &[]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        let addr = r2.daemon.addr();

        for export in [EXPORT, ""] {
            let t = Instant::now();
            let result = TcpStream::connect(addr)
                .map_err(ClientError::Io)
                .and_then(|s| {
                    s.set_read_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
                    s.set_write_timeout(Some(CLIENT_TIMEOUT)).expect("timeout");
                    Client::connect(s, export, false)
                });
            let took = t.elapsed();
            match result {
                Ok(c) => panic!(
                    "the replica accepted an NBD client for export {export:?} (size {})",
                    c.size()
                ),
                // Named: the refusal says why (a client such as `mirrorblk
                // attach` then tries the next node).
                Err(ClientError::OptionRejected { message, .. }) if export == EXPORT => assert!(
                    message.contains("replica") && message.contains("primary"),
                    "the replica's refusal does not say it is a replica: {message:?}"
                ),
                Err(ClientError::OptionRejected { .. }) => {}
                Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => panic!("export {export:?} on the replica: not a clear refusal: {e}"),
            }
            assert!(
                took < PROMPT,
                "the refusal of export {export:?} took {took:?}"
            );
        }

        let t = Instant::now();
        let o = tools::run(
            Tool::NbdInfo,
            [r2.daemon.uri(EXPORT)],
            Duration::from_secs(20),
        );
        let took = t.elapsed();
        assert!(!o.success(), "nbdinfo succeeded against a replica: {o}");
        assert!(took < PROMPT, "nbdinfo took {took:?} to be refused: {o}");
        let msg = o.combined();
        assert!(
            msg.contains(EXPORT) || msg.contains("refused"),
            "nbdinfo's error names neither the export nor a refused connection: {o}"
        );
        eprintln!("nbdinfo against the replica: {}", msg.trim());

        let o = tools::run(
            Tool::NbdInfo,
            ["--list".to_string(), format!("nbd://{addr}/")],
            Duration::from_secs(20),
        );
        assert!(
            !o.stdout.contains(&format!("export=\"{EXPORT}\""))
                && !o.stdout.contains("export-size"),
            "the replica lists an export: {o}"
        );

        // The primary serves it; the replica is alive and still streaming.
        let mut c = p.daemon.connect(EXPORT);
        c.write(0, &pattern(1, 4096), false)
            .expect("write on the primary");
        r2.daemon.assert_running();
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
    }

    /// `count` pipelined 4k writes (`depth` in flight) at blocks 0..count;
    /// every reply must be a success.
    fn write_blocks(c: &mut Client<TcpStream>, count: u64, depth: usize, seed: u64) {
        let mut next = 0u64;
        let mut inflight = HashMap::new();
        while next < count || !inflight.is_empty() {
            while next < count && inflight.len() < depth {
                let cookie = c.next_cookie();
                let req = Request {
                    flags: CommandFlags::empty(),
                    command: Command::Write,
                    cookie,
                    offset: next * KIB4,
                    length: KIB4,
                };
                c.submit(&req, Some(&pattern(seed ^ next, KIB4 as usize)))
                    .unwrap_or_else(|e| panic!("submit write {next}: {e}"));
                inflight.insert(cookie, next);
                next += 1;
            }
            let r = c.receive().unwrap_or_else(|e| panic!("write reply: {e}"));
            let block = inflight
                .remove(&r.cookie)
                .unwrap_or_else(|| panic!("reply for unknown cookie {}", r.cookie));
            assert!(
                r.error.is_none(),
                "write of block {block} failed: {:?}",
                r.error
            );
        }
    }

    /// Whether a reply starts arriving on `c` within `wait` (peeked, not consumed).
    fn reply_within(c: &Client<TcpStream>, wait: Duration) -> bool {
        let s = c.get_ref();
        s.set_read_timeout(Some(wait)).expect("set_read_timeout");
        let mut b = [0u8; 1];
        let answered = match s.peek(&mut b) {
            Ok(n) => n > 0,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("waiting for a reply: {e}"),
        };
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("set_read_timeout");
        answered
    }

    /// One mode's promise with one replica; returns the violations.
    fn check_mode(mode: &str) -> Vec<String> {
        const WRITES: u64 = 300;
        let mut bad = Vec::new();
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let p = Node::start_primary(
            &dir,
            "n1",
            &secret,
            &[&r2],
            J64,
            &["--mode", mode, "--heartbeat-timeout", "5s"],
        );
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);

        let mut c = p.daemon.connect(EXPORT);
        write_blocks(&mut c, WRITES, 16, 0x6d6f6465);
        // Before any FLUSH: sync promises durability on the replica for every
        // acknowledged write, flush promises receipt.
        let last = p.status().last_lsn;
        let r = r2.status();
        if last < WRITES {
            bad.push(format!(
                "{mode}: the primary's last_lsn is {last} after {WRITES} writes"
            ));
        }
        if mode == "sync" && r.durable_lsn < last {
            let got = r.durable_lsn;
            bad.push(format!(
                "sync: writes up to LSN {last} acknowledged, replica durable only to {got}"
            ));
        }
        if mode == "flush" && r.last_lsn < last {
            let got = r.last_lsn;
            bad.push(format!(
                "flush: writes up to LSN {last} acknowledged, replica received only to {got}"
            ));
        }

        c.flush().expect("FLUSH");
        let last = p.status().last_lsn;
        let r = r2.status();
        match mode {
            "sync" | "flush" => {
                if r.durable_lsn < last {
                    let got = r.durable_lsn;
                    bad.push(format!(
                        "{mode}: right after FLUSH, primary at LSN {last}, replica durable to {got}"
                    ));
                }
            }
            _ => {
                let t = Instant::now();
                let converged = loop {
                    match r2.try_status() {
                        Ok(s) if s.durable_lsn >= last => break true,
                        _ if t.elapsed() > Duration::from_secs(5) => break false,
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                };
                if !converged {
                    bad.push(format!(
                        "async: the replica did not reach LSN {last} within 5 s: {:#?}",
                        r2.try_status()
                    ));
                }
            }
        }
        eprintln!(
            "{mode}: primary at LSN {last}; replica right after FLUSH: durable {}, received {}",
            r.durable_lsn, r.last_lsn
        );

        // The replica hangs (SIGSTOP) for 1 s, well within the 5 s heartbeat
        // timeout, so it stays in sync: sync (durable) and flush (received)
        // must hold a write until it answers again; async must not wait.
        r2.freeze();
        let cookie = c.next_cookie();
        let req = Request {
            flags: CommandFlags::empty(),
            command: Command::Write,
            cookie,
            offset: WRITES * KIB4,
            length: KIB4,
        };
        let submitted = c.submit(&req, Some(&pattern(0x66726f7a, KIB4 as usize)));
        let answered = submitted.is_ok() && reply_within(&c, Duration::from_secs(1));
        r2.thaw();
        submitted.expect("submit the write to the frozen replica's primary");
        let reply = c.receive().expect("reply to the write after the thaw");
        assert_eq!(reply.cookie, cookie);
        assert!(
            reply.error.is_none(),
            "{mode}: write failed: {:?}",
            reply.error
        );
        if mode != "async" && answered {
            bad.push(format!(
                "{mode}: a write was acknowledged within 1 s while the in-sync replica was frozen"
            ));
        }
        if mode == "async" && !answered {
            bad.push("async: a write waited more than 1 s for a frozen replica".into());
        }
        // Once the replica answers, the held write completes on its account.
        let last = p.status().last_lsn;
        let r = r2.status();
        if mode == "sync" && r.durable_lsn < last {
            let got = r.durable_lsn;
            bad.push(format!(
                "sync: held write done at LSN {last}, but replica durable only to {got}"
            ));
        }
        if mode == "flush" && r.last_lsn < last {
            let got = r.last_lsn;
            bad.push(format!(
                "flush: held write done at LSN {last}, but replica received only to {got}"
            ));
        }
        bad
    }

    /// Each acknowledgement mode with one replica and a few hundred 4k writes
    /// then a FLUSH: sync (every acknowledged write durable on the replica, even
    /// before the FLUSH) and flush (received before the FLUSH, durable once it
    /// completes) hold right after the FLUSH, before anything is stopped; async
    /// converges within 5 s. Then, with the replica frozen for 1 s (SIGSTOP,
    /// shorter than the heartbeat timeout): sync and flush hold a write until
    /// it is back, async acknowledges it at once.
    #[test]
    fn modes_keep_their_promise() {
        let bad: Vec<String> = ["sync", "flush", "async"]
            .into_iter()
            .flat_map(check_mode)
            .collect();
        assert!(bad.is_empty(), "broken promises:\n{}", bad.join("\n"));
    }

    // ---- resync by bitmap and checksum, resumption, verify ----

    /// Writes `mib` MiB of pattern data (1 MiB requests, seed `seed`) at
    /// `offset` through `node`, then FLUSH.
    fn write_mib(node: &Node, offset: u64, mib: u64, seed: u64) {
        let mut c = node.daemon.connect(EXPORT);
        for i in 0..mib {
            c.write(offset + i * MIB, &pattern(seed + i, MIB as usize), false)
                .unwrap_or_else(|e| panic!("write at {} MiB: {e}", offset / MIB + i));
        }
        c.flush().expect("flush");
    }

    /// The number after `key` in the first primary log line containing `needle`.
    fn logged_number(node: &Node, needle: &str, key: &str) -> u64 {
        let lines = node.log_lines_with(needle);
        let line = lines.first().unwrap_or_else(|| {
            panic!(
                "{} never logged {needle:?}; its log:\n{}",
                node.name(),
                node.daemon.log()
            )
        });
        let tail = line
            .split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
    }

    /// Waits until every replica of `p` streams in-sync with no resync, no
    /// out-of-sync region, at the primary's last LSN.
    fn wait_converged(p: &Node, limit: Duration, what: &str) {
        p.wait_status(limit, what, |s| {
            s.replicas.iter().all(|r| {
                r.state == ReplicaState::InSync
                    && r.resync.is_none()
                    && r.out_of_sync_bytes == 0
                    && r.durable_lsn == s.last_lsn
            })
        });
    }

    /// A replica that is away while more than half of the primary's (8M)
    /// journal is written is brought back by a bitmap resync of exactly the
    /// regions written meanwhile (24 MiB written within the first 32 MiB of a
    /// 256 MiB volume: at most 32 regions), not a full one; all identical.
    #[test]
    fn bitmap_resync_after_the_journal_let_go() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(
            &dir,
            &secret,
            "8M",
            &["--mode", "sync", "--heartbeat-timeout", "2s"],
        );
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        write_mib(&p, 200 * MIB, 2, 1);
        r2.daemon.kill9();
        p.wait_status(Duration::from_secs(10), "n2 noticed gone", |s| {
            view_of(s, "n2").state != ReplicaState::InSync
        });
        // 24 MiB: three times the journal, all within regions 0..32.
        let mut c = p.daemon.connect(EXPORT);
        let mut rng = Rng::new(7);
        for i in 0..(24 * MIB / (64 * 1024)) {
            let block = rng.next_u64() % (32 * MIB / (64 * 1024));
            c.write(block * 64 * 1024, &pattern(100 + i, 64 * 1024), false)
                .expect("write while n2 is away");
        }
        c.flush().expect("flush");
        let away = view_of(&p.status(), "n2");
        assert!(
            away.out_of_sync_bytes > 0 && away.out_of_sync_bytes <= 32 * MIB,
            "the primary did not mark what n2 missed in its bitmap (1..=32 MiB): {away:#?}"
        );
        r2.daemon.restart();
        wait_converged(
            &p,
            Duration::from_secs(60),
            "n2 back in sync after a bitmap resync",
        );
        let regions = logged_number(&p, "bitmap resync of n2", " in ");
        assert!(
            (1..=32).contains(&regions),
            "the bitmap resync covered {regions} regions, want 1..=32"
        );
        assert!(
            p.log_lines_with("full checksum resync of n2").len() <= 1,
            "n2 got a second full resync"
        );
        let sent = logged_number(&p, "resync of n2 complete", "complete: ");
        assert!(
            sent <= 32 * MIB,
            "the bitmap resync sent {sent} bytes, more than the 32 MiB written"
        );
        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }

    /// A replica whose journal is lost (a new volume UUID: its data is
    /// unknown) gets a full checksum resync: every region is compared, and only
    /// the one region that differs (corrupted while it was down) is sent.
    #[test]
    fn checksum_resync_sends_only_differing_regions() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(&dir, &secret, J64, &["--mode", "sync"]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        write_mib(&p, 0, 16, 3);
        wait_converged(&p, Duration::from_secs(30), "n3 has the 16 MiB");
        r3.stop();
        std::fs::remove_file(&r3.files.journal).expect("remove n3's journal");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&r3.files.data)
            .expect("open n3's data");
        f.write_all_at(&[0xab; 4096], 100 * MIB + 8192)
            .expect("corrupt n3");
        drop(f);
        let before = p.log_lines_with("resync of n3 complete").len();
        r3.daemon.restart();
        wait_converged(
            &p,
            Duration::from_secs(60),
            "n3 back after a checksum resync",
        );
        let lines = p.log_lines_with("resync of n3 complete");
        let line = lines
            .get(before)
            .unwrap_or_else(|| panic!("no second resync of n3: {lines:#?}"));
        assert!(
            line.contains(&format!(
                "complete: {MIB} bytes of region data sent, {VOLUME_BYTES} bytes compared"
            )),
            "want exactly one region sent after comparing the whole volume: {line}"
        );
        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }

    /// A full resync of a new replica (slowed to 2 MiB/s) survives a kill -9
    /// of the replica and then of the primary: each time it goes on from the
    /// regions still out of sync ("resumed", fewer regions than the volume's),
    /// and ends with all stores identical.
    #[test]
    fn resync_resumes_after_either_side_restarts() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let mut p = Node::start_primary(
            &dir,
            "n1",
            &secret,
            &[&r2],
            J64,
            &[
                "--mode",
                "sync",
                "--resync-rate",
                "2M",
                "--heartbeat-timeout",
                "2s",
            ],
        );
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        write_mib(&p, 0, 24, 5);
        wait_converged(&p, Duration::from_secs(30), "n2 has the 24 MiB");
        // A new replica: no journal, an empty data store.
        r2.stop();
        std::fs::remove_file(&r2.files.journal).expect("remove n2's journal");
        std::fs::remove_file(&r2.files.data).expect("remove n2's data");
        r2.daemon.restart();
        let mid_resync = |p: &Node, what: &str| {
            p.wait_status(Duration::from_secs(60), what, |s| {
                view_of(s, "n2")
                    .resync
                    .is_some_and(|(done, total)| done >= 4 * MIB && done + 4 * MIB < total)
            })
        };
        mid_resync(&p, "n2's full resync a little under way");
        // An Inconsistent replica refuses promotion, and says what to do.
        let refused = r2.cli(&["promote"], Duration::from_secs(20));
        assert_eq!(
            refused.code, 1,
            "promote of an Inconsistent replica: {refused:#?}"
        );
        assert!(
            refused.stderr.contains("Inconsistent") && refused.stderr.contains("--force"),
            "the refusal does not say why and what to do: {refused:#?}"
        );
        assert_eq!(r2.status().role, Role::Replica);
        r2.daemon.kill9();
        r2.daemon.restart();
        p.wait_status(Duration::from_secs(30), "n2 resuming", |_| {
            !p.log_lines_with("resumed resync of n2").is_empty()
        });
        let regions = logged_number(&p, "resumed resync of n2", " in ");
        assert!(
            regions < (VOLUME_BYTES / MIB),
            "after the replica's restart the resync started over ({regions} regions)"
        );
        mid_resync(&p, "n2's resumed resync under way");
        p.daemon.kill9();
        p.daemon.restart();
        p.wait_status(
            Duration::from_secs(30),
            "n2 resuming after the primary's restart",
            |_| !p.log_lines_with("resumed resync of n2").is_empty(),
        );
        let regions = logged_number(&p, "resumed resync of n2", " in ");
        assert!(
            regions < (VOLUME_BYTES / MIB),
            "after the primary's restart the resync started over ({regions} regions)"
        );
        wait_converged(&p, Duration::from_secs(90), "the resumed resync to finish");
        r2.wait_status(
            Duration::from_secs(10),
            "n2 consistent after its resync",
            |s| !s.inconsistent,
        );
        p.stop();
        r2.stop();
        assert_stores_identical(&[&p, &r2]);
    }

    /// Writes of `size` bytes through the primary, one at a time at
    /// distinct offsets from `base`, `count` of them; `done` counts those
    /// acknowledged. Returns the first error, if any.
    fn write_in_background(
        p: &Node,
        (base, size): (u64, u64),
        count: u64,
        done: Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<Result<(), String>> {
        let mut c = p.daemon.connect(EXPORT);
        std::thread::spawn(move || {
            for i in 0..count {
                c.write(base + i * size, &pattern(1000 + i, size as usize), false)
                    .map_err(|e| format!("write {i} of {count}: {e}"))?;
                done.store(i as usize + 1, Ordering::SeqCst);
            }
            Ok(())
        })
    }

    /// Primary n1 in sync mode (with `extra` and a journal of `journal`)
    /// whose one replica, n2, is reached through `proxy`.
    fn primary_through(
        dir: &TestDir,
        secret: &std::path::Path,
        proxy: &mirrorblk_tests::proxy::DelayProxy,
        journal: &str,
        extra: &[&str],
    ) -> Node {
        use mirrorblk_tests::cluster::NodeFiles;
        use mirrorblk_tests::daemon::Daemon;
        let files = NodeFiles::new(dir, "n1");
        let mut flags = vec!["--mode", "sync"];
        flags.extend_from_slice(extra);
        let daemon = Daemon::try_start(files.primary_args(
            secret,
            &[format!("n2={}", proxy.addr())],
            journal,
            &flags,
        ))
        .unwrap_or_else(|e| panic!("primary: {e}"));
        Node {
            files,
            daemon,
            replication: None,
        }
    }

    /// Waits (bounded: `limit`) until `done` has not moved for a second,
    /// and returns it.
    fn until_it_stops(done: &AtomicUsize, limit: Duration) -> usize {
        let started = Instant::now();
        let (mut last, mut since) = (done.load(Ordering::SeqCst), Instant::now());
        while started.elapsed() < limit && since.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(50));
            let now = done.load(Ordering::SeqCst);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    }

    /// The link to a replica in the middle of its resync stalls (its bytes
    /// stop moving; heartbeats of 20 s, so nobody gives up) while a client
    /// writes: first 256 KiB blocks, so the link's send blocks on a full
    /// socket holding buffers of that class only (`--buffer-memory 256M`: 64
    /// of them, for the 56 writes), then 1 MiB blocks, whose records pile up
    /// unsent in the primary's window until they hold every 1 MiB buffer of
    /// its pool (184 of them) and the client waits for one. Once the link moves again, the client's writes
    /// complete and the resync finishes. Before the fix the link's next
    /// region read waited for a 1 MiB buffer that only its own progress
    /// could free, with everything applied (so nothing trimmed the window):
    /// the livelock seen in CI, where every reconnect stopped the same way.
    #[test]
    fn a_link_stalled_mid_resync_while_writes_fill_the_pool_recovers() {
        // A journal of 256M: the unsent records (14 MiB, then 184 MiB) must
        // exhaust the pool before they fill the journal.
        stalled_mid_resync_recovers("256M", Then::Moves);
    }

    /// As above with a journal of 64M: the unsent records fill the
    /// *journal* before they exhaust the pool (an in-place record keeps its
    /// journal space while a link has not sent it), so the client's writes
    /// wait for journal space. Once the link moves again they complete.
    /// Before the fix they never resumed (49 of 200 after 19 s): the
    /// journal-full wait waited on a link that waited on it.
    #[test]
    fn a_link_stalled_mid_resync_while_writes_fill_the_journal_recovers() {
        stalled_mid_resync_recovers(J64, Then::Moves);
    }

    /// As above, but the stalled link is then lost for good (the proxy
    /// cuts it): the primary stops keeping journal records for n2 (the
    /// journal is more than half full), so the client's writes complete
    /// without it. Before the fix that decision was taken only after an
    /// apply, and none came: the writers waited for the journal space n2
    /// pinned until it came back.
    #[test]
    fn a_link_lost_mid_resync_while_writes_fill_the_journal_lets_them_complete() {
        stalled_mid_resync_recovers(J64, Then::Lost);
    }

    /// Replica n2 (flags `hb`) behind a proxy, and primary n1 (journal of
    /// `journal`, flags `hb`, 256M of buffers, resyncs at 1 MiB/s) reaching
    /// it through the proxy. Returns (n2, proxy, n1).
    fn replica_behind_a_proxy(
        dir: &TestDir,
        secret: &std::path::Path,
        journal: &str,
        hb: &[&str; 2],
    ) -> (Node, mirrorblk_tests::proxy::DelayProxy, Node) {
        let r2 = Node::start_replica(dir, "n2", secret, J64, hb);
        let proxy = mirrorblk_tests::proxy::DelayProxy::start(
            "127.0.0.1:0".parse().expect("address"),
            r2.replication.expect("a replica has a replication address"),
            Duration::ZERO,
        )
        .expect("start the proxy");
        // A full checksum pass of 256 regions at 1 MiB/s of budget (a
        // check spends a 16th of a region) takes about 16 s.
        let flags = [
            hb[0],
            hb[1],
            "--buffer-memory",
            "256M",
            "--resync-rate",
            "1M",
        ];
        let p = primary_through(dir, secret, &proxy, journal, &flags);
        (r2, proxy, p)
    }

    /// Waits (bounded: `limit`) until `thread` has finished.
    fn wait_finished<T>(thread: &std::thread::JoinHandle<T>, limit: Duration) {
        let started = Instant::now();
        while !thread.is_finished() && started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What becomes of the stalled link.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Then {
        /// It moves again: the resync converges.
        Moves,
        /// It is cut for good.
        Lost,
    }

    /// The body of the tests above: `journal` is the primary's.
    fn stalled_mid_resync_recovers(journal: &str, then: Then) {
        const BLOCKS: u64 = 200;
        const HB: [&str; 2] = ["--heartbeat-timeout", "20s"];
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut r2, proxy, mut p) = replica_behind_a_proxy(&dir, &secret, journal, &HB);
        // n2 is new: a full checksum resync, streaming live meanwhile.
        p.wait_status(Duration::from_secs(20), "n2 resyncing", |s| {
            view_of(s, "n2").state == ReplicaState::Resyncing
        });
        proxy.hold_forward(true);
        // First 14 MiB in 256 KiB writes (buffers of another class): the
        // link's send blocks on a full socket holding only those.
        let small = Arc::new(AtomicUsize::new(0));
        let fill = write_in_background(&p, (128 * MIB, 256 << 10), 56, small.clone());
        until_it_stops(&small, Duration::from_secs(10));
        assert!(fill.is_finished(), "the 256 KiB writes stalled");
        // Then 1 MiB writes pile up unsent behind it until the pool has no
        // 1 MiB buffer left.
        let done = Arc::new(AtomicUsize::new(0));
        let writer = write_in_background(&p, (16 * MIB, MIB), BLOCKS, done.clone());
        let during = until_it_stops(&done, Duration::from_secs(12));
        match then {
            Then::Moves => proxy.hold_forward(false),
            Then::Lost => proxy.cut(),
        }
        assert!(
            (during as u64) < BLOCKS,
            "all {BLOCKS} writes of 1 MiB went through while n2's link was stalled: neither the pool nor the journal ran out, so this test proves nothing"
        );
        let released = Instant::now();
        wait_finished(&writer, Duration::from_secs(30));
        let after = done.load(Ordering::SeqCst);
        assert_eq!(
            after as u64,
            BLOCKS,
            "the client's writes stalled after n2's link moved again or was lost ({during} done during the stall, {after} of {BLOCKS} after {:.1?}); primary log:\n{}",
            released.elapsed(),
            p.daemon.log()
        );
        writer
            .join()
            .expect("writer thread")
            .unwrap_or_else(|e| panic!("{e}"));
        if then == Then::Lost {
            let log = p.daemon.log();
            let dropped = log.contains("no longer keeping records for replica n2");
            assert!(dropped, "the primary kept records for the lost n2:\n{log}");
            poll_until(Duration::from_secs(10), "a retention-dropped event", || {
                retention_dropped_for(&p, "n2")
            });
            return;
        }
        wait_converged(&p, Duration::from_secs(60), "n2's resync to finish");
        p.stop();
        r2.stop();
        assert_stores_identical(&[&p, &r2]);
    }

    /// Some(()) once `node`'s event log has a `retention-dropped` event
    /// for `peer` (read with `mirrorblk events --json`).
    fn retention_dropped_for(node: &Node, peer: &str) -> Option<()> {
        let out = node.cli(&["events", "--json"], Duration::from_secs(10));
        assert_eq!(out.code, 0, "mirrorblk events failed: {out:#?}");
        out.stdout
            .lines()
            .filter_map(|l| mirrorblk_admin::events::Event::from_line(l).ok())
            .any(|e| {
                matches!(&e.kind, mirrorblk_admin::events::EventKind::RetentionDropped { peer: p, journal_percent, .. } if p == peer && *journal_percent > 50)
            })
            .then_some(())
    }

    /// `mirrorblk verify` finds a region corrupted on one replica behind the
    /// primary's back (exit 1, the offset reported), `--repair` resends it,
    /// and a second verify finds all identical, as do the stopped stores.
    #[test]
    fn verify_finds_and_repairs_a_corrupted_replica() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let (mut p, mut r2, mut r3) = three_nodes(&dir, &secret, J64, &["--mode", "sync"]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        write_mib(&p, 4 * MIB, 4, 9);
        wait_converged(&p, Duration::from_secs(30), "replicas have the data");
        r3.stop();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&r3.files.data)
            .expect("open n3's data");
        f.write_all_at(&[0x5a; 4096], 5 * MIB + 4096)
            .expect("corrupt n3");
        drop(f);
        p.wait_status(Duration::from_secs(30), "n3 noticed gone", |s| {
            view_of(s, "n3").state != ReplicaState::InSync
        });
        r3.daemon.restart();
        wait_converged(&p, Duration::from_secs(30), "n3 back");

        let v = p.cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(v.code, 1, "verify must fail on a difference: {v:#?}");
        assert!(v.stdout.contains("vol0/n2: identical"), "{v:#?}");
        assert!(
            v.stdout.contains("vol0/n3: 1 differing region(s)")
                && v.stdout.contains(&(5 * MIB).to_string()),
            "verify did not report n3's region at 5 MiB: {v:#?}"
        );
        let j = p.cli(&["verify", "--json"], VERIFY_TIMEOUT);
        let report: serde_json::Value = serde_json::from_str(&j.stdout)
            .unwrap_or_else(|e| panic!("verify --json: {e}: {j:#?}"));
        let n3 = report
            .as_array()
            .and_then(|a| a.iter().find(|r| r["replica"] == "n3"))
            .unwrap_or_else(|| panic!("no n3 in {report:#}"));
        assert_eq!(
            n3["differing_offsets"],
            serde_json::json!([5 * MIB]),
            "{report:#}"
        );

        let r = p.cli(&["verify", "--repair"], VERIFY_TIMEOUT);
        assert_eq!(r.code, 0, "verify --repair failed: {r:#?}");
        assert!(r.stdout.contains("repaired"), "{r:#?}");
        let again = p.cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(
            again.code, 0,
            "still different after the repair: {again:#?}"
        );

        // Online: verify while fio writes through the primary (both sides
        // compare the same moment of the stream, so no false difference).
        let json = dir.join("fio.json");
        let fio = tools::spawn(
            Tool::Fio,
            fio_args(
                &p,
                &json,
                &[
                    "--bs=4k",
                    "--iodepth=4",
                    "--time_based",
                    "--runtime=4",
                    "--rate_iops=2000",
                ],
            ),
        );
        std::thread::sleep(Duration::from_millis(300));
        let online = p.cli(&["verify"], VERIFY_TIMEOUT);
        let run = fio.wait(TOOL_TIMEOUT);
        assert!(run.success(), "fio failed: {run}");
        assert_eq!(
            online.code, 0,
            "verify under write load found differences: {online:#?}"
        );

        // Verify is refused (clearly) while a replica is not in sync.
        r2.daemon.kill9();
        p.wait_status(Duration::from_secs(30), "n2 noticed gone", |s| {
            view_of(s, "n2").state != ReplicaState::InSync
        });
        let refused = p.cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(refused.code, 1, "{refused:#?}");
        assert!(
            refused
                .stderr
                .contains("wait until every replica is in sync"),
            "{refused:#?}"
        );
        r2.daemon.restart();
        wait_converged(&p, Duration::from_secs(30), "n2 back");

        p.stop();
        r2.stop();
        r3.stop();
        assert_stores_identical(&[&p, &r2, &r3]);
    }

    /// Failover the way an operator does it, on three nodes that all know
    /// each other (every node has `--replication-listen` and `--peer` for the
    /// two others): the primary is killed with -9 under write load in sync
    /// mode; `mirrorblk promote` on n2 makes it primary in epoch 2 and it
    /// serves NBD; every write the old primary acknowledged reads back from
    /// it; n3 follows the new primary. The old primary is restarted without
    /// `--role`: it comes back as primary of epoch 1, learns of epoch 2 at its
    /// first handshake, demotes itself, and is resynced by n2. New writes
    /// reach all three; `mirrorblk verify` and a byte comparison agree.
    #[test]
    fn failover_by_promotion_and_the_old_primary_rejoins() {
        use mirrorblk_tests::cluster::{pick_port, NodeFiles};
        use mirrorblk_tests::daemon::Daemon;
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let names = ["n1", "n2", "n3"];
        let addrs: Vec<std::net::SocketAddr> = (0..3)
            .map(|_| ([127, 0, 0, 1], pick_port()).into())
            .collect();
        let start = |i: usize, primary: bool| -> Node {
            let files = NodeFiles::new(&dir, names[i]);
            let peers: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("{}={}", names[j], addrs[j]))
                .collect();
            let mut extra = vec!["--heartbeat-timeout".to_string(), "2s".into()];
            let args = if primary {
                extra.extend([
                    "--replication-listen".to_string(),
                    addrs[i].to_string(),
                    "--mode".into(),
                    "sync".into(),
                ]);
                let e: Vec<&str> = extra.iter().map(String::as_str).collect();
                files.primary_args(&secret, &peers, J64, &e)
            } else {
                for p in &peers {
                    extra.extend(["--peer".to_string(), p.clone()]);
                }
                let e: Vec<&str> = extra.iter().map(String::as_str).collect();
                files.replica_args(&secret, addrs[i], J64, &e)
            };
            let daemon = Daemon::try_start(args)
                .unwrap_or_else(|e| panic!("{} did not start: {e}", names[i]));
            Node {
                files,
                daemon,
                replication: Some(addrs[i]),
            }
        };
        let mut r2 = start(1, false);
        let mut r3 = start(2, false);
        let mut p = start(0, true);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);

        let seed = Rng::from_env_or_time("failover_by_promotion").next_u64();
        let acked = Arc::new(AtomicUsize::new(0));
        let writer = {
            let client = p.daemon.connect(EXPORT);
            let acked = acked.clone();
            std::thread::spawn(move || {
                write_until_cut(client, seed, 8, &acked, Duration::from_secs(40))
            })
        };
        poll_until(Duration::from_secs(30), "300 writes acknowledged", || {
            (acked.load(Ordering::Relaxed) >= 300 || writer.is_finished()).then_some(())
        });
        p.daemon.kill9();
        let w = writer.join().expect("the writer panicked");
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        assert!(!w.acked.is_empty(), "nothing was acknowledged");

        // Promote n2 with the CLI: it restarts in place as primary, epoch 2.
        let before = r2.daemon.ready().clone();
        let out = r2.cli(&["promote"], Duration::from_secs(30));
        assert_eq!(out.code, 0, "mirrorblk promote failed: {out:#?}");
        r2.daemon
            .wait_serving_again(&before, Duration::from_secs(30));
        r2.wait_status(Duration::from_secs(30), "n2 primary in epoch 2", |s| {
            s.role == Role::Primary && s.epoch == 2
        });
        let mut c = r2.daemon.connect(EXPORT);
        let bad = check_regions("n2 promoted", &w, |off, len| {
            c.read(off, len)
                .unwrap_or_else(|e| panic!("read {len} at {off} from n2: {e}"))
        });
        assert!(
            bad.is_empty(),
            "{} violations of {} acknowledged writes:\n{}",
            bad.len(),
            w.acked.len(),
            bad.join("\n")
        );
        drop(c);
        r2.wait_status(
            Duration::from_secs(60),
            "n3 in sync with the new primary",
            |s| {
                let v = view_of(s, "n3");
                v.state == ReplicaState::InSync && v.resync.is_none()
            },
        );
        assert_eq!(r3.status().epoch, 2, "n3 did not adopt epoch 2");

        // The old primary comes back on its persisted role, without --role.
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut it = p.daemon.args().iter();
        while let Some(a) = it.next() {
            if a == "--role" {
                it.next();
            } else {
                args.push(a.clone());
            }
        }
        p.daemon.restart_with(args);
        p.wait_status(
            Duration::from_secs(60),
            "n1 demoted to a replica of epoch 2",
            |s| s.role == Role::Replica && s.epoch == 2,
        );
        assert!(
            !p.log_lines_with("demoting to replica").is_empty(),
            "n1 never said it was demoting: {}",
            p.daemon.log()
        );
        r2.wait_status(Duration::from_secs(60), "n1 resynced by n2", |s| {
            let v = view_of(s, "n1");
            v.state == ReplicaState::InSync && v.resync.is_none() && v.out_of_sync_bytes == 0
        });
        // The replica clears its mark when it handles RESYNC_DONE, a moment
        // after the primary ends the pass.
        p.wait_status(Duration::from_secs(10), "n1 consistent", |s| {
            !s.inconsistent
        });

        write_mib(&r2, 100 * MIB, 4, 77);
        wait_converged(&r2, Duration::from_secs(30), "all three at n2's last LSN");
        let v = r2.cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(v.code, 0, "verify after the failover: {v:#?}");
        r2.stop();
        p.stop();
        r3.stop();
        assert_stores_identical(&[&r2, &p, &r3]);
    }

    /// One mode across a 5 ms-each-way link (the tests' delaying proxy
    /// between primary and replica): 40 writes at queue depth 1, each checked
    /// against the mode's promise right after its acknowledgement, then a
    /// FLUSH. Returns (broken promises, median write latency).
    fn check_mode_across_link(mode: &str) -> (Vec<String>, Duration) {
        use mirrorblk_tests::cluster::NodeFiles;
        use mirrorblk_tests::daemon::Daemon;
        use mirrorblk_tests::proxy::DelayProxy;
        const WRITES: u64 = 40;
        let mut bad = Vec::new();
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let proxy = DelayProxy::start(
            "127.0.0.1:0".parse().expect("address"),
            r2.replication.expect("a replica has a replication address"),
            Duration::from_millis(5),
        )
        .expect("start the delaying proxy");
        let files = NodeFiles::new(&dir, "n1");
        let daemon = Daemon::try_start(files.primary_args(
            &secret,
            &[format!("n2={}", proxy.addr())],
            J64,
            &["--mode", mode, "--heartbeat-timeout", "5s"],
        ))
        .unwrap_or_else(|e| panic!("primary: {e}"));
        let p = Node {
            files,
            daemon,
            replication: None,
        };
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);

        let mut c = p.daemon.connect(EXPORT);
        let mut latencies = Vec::new();
        for i in 0..WRITES {
            let t = Instant::now();
            c.write(i * KIB4, &pattern(i, KIB4 as usize), false)
                .unwrap_or_else(|e| panic!("{mode}: write {i}: {e}"));
            latencies.push(t.elapsed());
            let last = p.status().last_lsn;
            let r = r2.status();
            if mode == "sync" && r.durable_lsn < last {
                bad.push(format!(
                    "sync: write {i} acknowledged at LSN {last}, replica durable only to {}",
                    r.durable_lsn
                ));
            }
            if mode == "flush" && r.last_lsn < last {
                bad.push(format!(
                    "flush: write {i} acknowledged at LSN {last}, replica received only to {}",
                    r.last_lsn
                ));
            }
        }
        c.flush().expect("FLUSH");
        let last = p.status().last_lsn;
        if mode == "async" {
            let reached = poll_for(Duration::from_secs(5), || {
                r2.try_status().is_ok_and(|s| s.durable_lsn >= last)
            });
            if !reached {
                bad.push(format!(
                    "async: the replica did not reach LSN {last} within 5 s"
                ));
            }
        } else if r2.status().durable_lsn < last {
            bad.push(format!(
                "{mode}: right after FLUSH the replica is not durable to LSN {last}"
            ));
        }
        latencies.sort();
        let median = latencies[latencies.len() / 2];
        let rtt = Duration::from_millis(10);
        match mode {
            // Both wait for the replica's answer: never faster than the link.
            "sync" | "flush" if latencies[0] < rtt => bad.push(format!(
                "{mode}: a write was acknowledged in {:?}, faster than the 10 ms round trip to the replica",
                latencies[0]
            )),
            "async" if median >= rtt => bad.push(format!(
                "async: median write latency {median:?} is not below the 10 ms round trip: it waits for the replica"
            )),
            _ => {}
        }
        drop(proxy);
        (bad, median)
    }

    /// Polls `ok` every 20 ms for up to `limit`.
    fn poll_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        loop {
            if ok() {
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cross-site latency: with 5 ms each way between primary and replica,
    /// sync (durable on the replica) and flush (received by it) acknowledge
    /// no write before a round trip and keep their promise after each one;
    /// async acknowledges without waiting for the link and its replica
    /// converges. The median QD1 write latency of each mode is printed.
    #[test]
    fn modes_keep_their_promise_across_a_5ms_link() {
        let mut bad = Vec::new();
        for mode in ["sync", "flush", "async"] {
            let (b, median) = check_mode_across_link(mode);
            eprintln!("{mode}: median QD1 4k write latency across a 5 ms link: {median:?}");
            bad.extend(b);
        }
        assert!(bad.is_empty(), "broken promises:\n{}", bad.join("\n"));
    }

    /// A record corrupted on the wire (one byte flipped 2 MiB into the
    /// primary's stream, inside a 1 MiB write's payload) is rejected by the
    /// replica's checksum check and never applied; the link is re-established
    /// and the replica catches up, ending byte-identical to the primary.
    #[test]
    fn a_corrupted_record_is_rejected_and_the_link_recovers() {
        use mirrorblk_tests::cluster::NodeFiles;
        use mirrorblk_tests::daemon::Daemon;
        use mirrorblk_tests::proxy::DelayProxy;
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let mut r2 = Node::start_replica(&dir, "n2", &secret, J64, &[]);
        let proxy = DelayProxy::start_corrupting(
            "127.0.0.1:0".parse().expect("address"),
            r2.replication.expect("replication address"),
            Duration::ZERO,
            Some(2 * MIB + 12345),
        )
        .expect("start the corrupting proxy");
        let files = NodeFiles::new(&dir, "n1");
        let daemon = Daemon::try_start(files.primary_args(
            &secret,
            &[format!("n2={}", proxy.addr())],
            J64,
            &["--mode", "sync"],
        ))
        .unwrap_or_else(|e| panic!("primary: {e}"));
        let mut p = Node {
            files,
            daemon,
            replication: None,
        };
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        write_mib(&p, 0, 8, 11);
        wait_converged(
            &p,
            Duration::from_secs(30),
            "n2 back in sync after the corruption",
        );
        let rejected = r2.log_lines_with("rejected");
        let rejected = if rejected.is_empty() {
            r2.log_lines_with("checksum mismatch")
        } else {
            rejected
        };
        assert!(
            !rejected.is_empty(),
            "the replica never rejected the corrupted stream; its log:\n{}",
            r2.daemon.log()
        );
        eprintln!("n2 rejected: {}", rejected[0]);
        assert!(
            p.log_lines_with("replica connected at LSN").len() >= 2,
            "the primary never reconnected after the rejection"
        );
        drop(proxy);
        p.stop();
        r2.stop();
        assert_stores_identical(&[&p, &r2]);
    }

    /// Split brain: two nodes both primary in epoch 1, each listing the other
    /// as its peer. Their handshakes refuse each other and both log what to
    /// run; neither stops serving. `mirrorblk demote` on one makes it a
    /// replica (it restarts in place), which the other then resyncs by
    /// checksum (its data is another volume's) until both are identical.
    #[test]
    fn split_brain_is_refused_and_demote_resolves_it() {
        use mirrorblk_tests::cluster::{pick_port, NodeFiles};
        use mirrorblk_tests::daemon::Daemon;
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let a_addr: std::net::SocketAddr = ([127, 0, 0, 1], pick_port()).into();
        let b_addr: std::net::SocketAddr = ([127, 0, 0, 1], pick_port()).into();
        let start = |name: &str, own: std::net::SocketAddr, peer: String| -> Node {
            let files = NodeFiles::new(&dir, name);
            let listen = own.to_string();
            let args = files.primary_args(
                &secret,
                &[peer],
                J64,
                &["--replication-listen", &listen, "--heartbeat-timeout", "2s"],
            );
            let daemon = Daemon::try_start(args).unwrap_or_else(|e| panic!("{name}: {e}"));
            Node {
                files,
                daemon,
                replication: Some(own),
            }
        };
        let mut a = start("na", a_addr, format!("nb={b_addr}"));
        let mut b = start("nb", b_addr, format!("na={a_addr}"));
        write_mib(&a, 0, 2, 21);
        write_mib(&b, 0, 2, 22);
        for (n, other) in [(&a, "nb"), (&b, "na")] {
            n.daemon
                .wait_for_log("SPLIT BRAIN", Duration::from_secs(20));
            let line = n.log_lines_with("SPLIT BRAIN").remove(0);
            assert!(
                line.contains(other) && line.contains("demote"),
                "{}'s split-brain line does not name its peer and what to run: {line}",
                n.name()
            );
            assert_eq!(n.status().role, Role::Primary);
        }
        // Both keep serving their clients.
        a.daemon.connect(EXPORT).read(0, 4096).expect("na serves");
        b.daemon.connect(EXPORT).read(0, 4096).expect("nb serves");

        // Resolve: nb's writes are the ones to discard.
        let out = b.cli(&["demote"], Duration::from_secs(30));
        assert_eq!(out.code, 0, "demote: {out:#?}");
        b.wait_status(Duration::from_secs(30), "nb is a replica", |s| {
            s.role == Role::Replica
        });
        a.wait_status(Duration::from_secs(60), "nb resynced from na", |s| {
            let v = view_of(s, "nb");
            v.state == ReplicaState::InSync && v.resync.is_none() && v.out_of_sync_bytes == 0
        });
        assert!(
            !a.log_lines_with("full checksum resync of nb").is_empty(),
            "na did not resync nb by checksum"
        );
        a.stop();
        b.stop();
        assert_stores_identical(&[&a, &b]);
    }
}
