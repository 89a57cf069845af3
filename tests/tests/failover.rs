//! Automatic failover on etcd (issue 13): a real etcd (Debian's
//! `etcd-server`) and nodes started per the contract (`--etcd`, no `--role`),
//! with a FUA writer that records every acknowledged write, the node that
//! acknowledged it and when ([`mirrorblk_tests::writer`]).
//!
//! What is shown: a replica serves within a bounded time of the primary's
//! `kill -9` and holds every acknowledged write, over five failovers (the
//! times are printed); a partitioned primary acknowledges nothing after its
//! successor's first acknowledgement; a replica that is not in sync is never
//! promoted; etcd killed under load holds writes while no lease is valid
//! and loses none. The nodes are compared with `mirrorblk verify` and, once
//! stopped, byte for byte.

mod failover {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use mirrorblk_admin::{Event, EventKind, Role};
    use mirrorblk_etcd::records::decode;
    use mirrorblk_etcd::{InSyncRecord, VolumeKeys};
    use mirrorblk_tests::cluster::{
        assert_stores_identical, write_secret, Node, NodeFiles, EXPORT,
    };
    use mirrorblk_tests::coordinated::{target_of, Coordinated, ELECTION_TIMEOUT, IN_SYNC_TIMEOUT};
    use mirrorblk_tests::daemon::Daemon;
    use mirrorblk_tests::etcd::{Etcd, KeepAliveWatch};
    use mirrorblk_tests::netns::{Net, PRIMARY_IP, REPLICA_IP};
    use mirrorblk_tests::util::MIB;
    use mirrorblk_tests::writer::{check_through, connect, Writer, WriterConfig, Written};
    use mirrorblk_tests::TestDir;

    /// The daemon's default `--lease-ttl`.
    const LEASE_TTL: Duration = Duration::from_secs(2);
    /// The least fencing margin the tests accept: a primary must stop
    /// acknowledging this long before its lease can expire (counted from
    /// when etcd answered its last renewal).
    const MIN_FENCE_MARGIN: Duration = Duration::from_millis(250);
    /// The goal for kill → first write acknowledged by the new
    /// primary (printed, not asserted).
    const FAILOVER_GOAL: Duration = Duration::from_secs(3);
    /// The bound asserted on it (a loaded 2-core machine, debug builds).
    const FAILOVER_BOUND: Duration = Duration::from_secs(15);
    /// Bound on `mirrorblk verify` of a 256M volume.
    const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
    /// The three nodes of every test.
    const NAMES: [&str; 3] = ["n1", "n2", "n3"];

    /// The harness's etcd keeps what was put in it across `kill -9` and a
    /// restart on the same ports, and refuses while it is down.
    #[test]
    fn etcd_harness_survives_kill9_and_restart() {
        let dir = TestDir::new();
        let mut etcd = Etcd::start(dir.path());
        let c = etcd.client();
        c.put("/mirrorblk-test/k", b"v1", None).expect("put");
        let pid = etcd.pid();
        etcd.kill9();
        assert!(
            c.get("/mirrorblk-test/k").is_err(),
            "a killed etcd answered"
        );
        etcd.restart();
        assert_ne!(etcd.pid(), pid, "restart reused the process");
        let kv = etcd
            .get("/mirrorblk-test/k")
            .expect("get after the restart")
            .expect("the key survived the restart");
        assert_eq!(kv.value, b"v1");
    }

    /// Three coordinated nodes in sync mode, and the index of the one
    /// serving once it has every replica in sync. The others refuse NBD
    /// clients, `mirrorblk status --json` shows the roles, and the leader
    /// key names the primary.
    fn three_nodes(dir: &TestDir, etcd: &Etcd, mode: &str, extra: &[&str]) -> (Coordinated, usize) {
        three_nodes_via(
            dir,
            etcd,
            &[etcd.url(), etcd.url(), etcd.url()],
            mode,
            extra,
        )
    }

    /// [`three_nodes`], each node given its own etcd URL (a proxy of etcd's).
    fn three_nodes_via(
        dir: &TestDir,
        etcd: &Etcd,
        urls: &[String],
        mode: &str,
        extra: &[&str],
    ) -> (Coordinated, usize) {
        let secret = write_secret(dir, "secret");
        let mut c = Coordinated::start_each(dir, &secret, urls, &NAMES, mode, extra);
        let p = c.wait_primary(&[0, 1, 2], ELECTION_TIMEOUT);
        for (i, n) in c.nodes.iter().enumerate() {
            let out = n.cli(&["status", "--json"], Duration::from_secs(20));
            assert_eq!(out.code, 0, "status --json on {}: {out:#?}", n.name());
            let v: serde_json::Value = serde_json::from_str(&out.stdout)
                .unwrap_or_else(|e| panic!("status --json of {}: {e}: {out:#?}", n.name()));
            let want = if i == p { "primary" } else { "replica" };
            assert_eq!(
                v["volumes"][0]["role"],
                want,
                "{}'s status --json: {v:#}",
                n.name()
            );
            if i != p {
                assert!(
                    connect(&target_of(n)).is_none(),
                    "replica {} accepted an NBD client",
                    n.name()
                );
            }
        }
        let leader = etcd
            .leader(EXPORT)
            .expect("read the leader key")
            .expect("a leader key while a primary serves");
        assert_eq!(leader.node, c.nodes[p].name(), "the leader key: {leader:?}");
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        (c, p)
    }

    /// The first 20 of `lines`, and how many more there are.
    fn first_lines(lines: &[String]) -> String {
        let mut t = lines
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        if lines.len() > 20 {
            t.push_str(&format!("\n… and {} more", lines.len() - 20));
        }
        t
    }

    /// Reads every write `w` recorded back from node `i` (through a client
    /// of its own) and fails naming each one missing.
    #[track_caller]
    fn assert_holds_every_write(c: &Coordinated, i: usize, w: &Written, limit: u64, what: &str) {
        let mut client = connect(&target_of(&c.nodes[i]))
            .unwrap_or_else(|| panic!("{} does not serve NBD clients", c.nodes[i].name()));
        let bad = check_through(what, w, limit, &mut client);
        assert!(
            bad.is_empty(),
            "{} violations among {} acknowledged and {} unanswered writes:\n{}",
            bad.len(),
            w.acked.len(),
            w.unanswered.len(),
            first_lines(&bad)
        );
    }

    /// `mirrorblk verify` on primary `p` finds every store identical; then
    /// the replicas and the primary stop cleanly and their stores are
    /// byte-identical.
    #[track_caller]
    fn verify_and_compare(c: &mut Coordinated, p: usize) {
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        let v = c.nodes[p].cli(&["verify"], VERIFY_TIMEOUT);
        assert_eq!(v.code, 0, "mirrorblk verify: {v:#?}");
        for i in (0..c.nodes.len()).filter(|&i| i != p) {
            c.nodes[i].stop();
        }
        c.nodes[p].stop();
        let nodes: Vec<&_> = c.nodes.iter().collect();
        assert_stores_identical(&nodes);
    }

    /// Node `n`'s event log as `mirrorblk events --json` prints it (from its
    /// file, so also while the node is down), every line parsed; the log's
    /// `seq` numbers run without a gap.
    #[track_caller]
    fn events_of(n: &Node) -> Vec<Event> {
        let file = format!("{}.events.jsonl", n.files.journal.display());
        let out = n.cli(
            &["events", "--json", "--file", &file],
            Duration::from_secs(20),
        );
        assert_eq!(
            out.code,
            0,
            "mirrorblk events --json on {}: {out:#?}",
            n.name()
        );
        let events: Vec<Event> = out
            .stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("{}'s event line {l:?} does not parse: {e}", n.name())
                })
            })
            .collect();
        for pair in events.windows(2) {
            assert_eq!(
                pair[1].seq,
                pair[0].seq + 1,
                "{}'s event log has a gap: {pair:?}",
                n.name()
            );
        }
        events
    }

    /// One expected event: its name, and what it must say.
    type Step<'a> = (&'a str, &'a dyn Fn(&EventKind) -> bool);

    /// Asserts `events[from..]` holds events matching `steps` in that order
    /// (others may come between); returns the index of the last one.
    #[track_caller]
    fn assert_in_order(who: &str, events: &[Event], from: usize, steps: &[Step]) -> usize {
        let mut at = from;
        for (name, ok) in steps {
            match events[at..].iter().position(|e| ok(&e.kind)) {
                Some(i) => at += i + 1,
                None => panic!(
                    "{who}'s event log lacks {name} in the sequence {:?} (from event {from}); its events:\n{}",
                    steps.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                    events.iter().map(|e| format!("{} {:?}", e.seq, e.kind)).collect::<Vec<_>>().join("\n")
                ),
            }
        }
        at - 1
    }

    /// The median of `times` (sorted in place).
    fn median(times: &mut [Duration]) -> Duration {
        times.sort();
        times[times.len() / 2]
    }

    /// Three nodes and etcd, a FUA writer through whoever serves; five times
    /// the primary is killed with -9: a replica serves and acknowledges a
    /// write within [`FAILOVER_BOUND`], every write acknowledged so far
    /// reads back from it, and the old primary, restarted with the same
    /// flags, rejoins as a replica and comes back in sync. At the end
    /// `mirrorblk verify` and a byte comparison of the stopped stores agree.
    /// Prints each kill → first acknowledgement time and their median.
    #[test]
    fn primary_killed_five_times_a_replica_serves_and_nothing_acknowledged_is_lost() {
        let dir = TestDir::new();
        let etcd = Etcd::start(dir.path());
        let (mut c, mut p) = three_nodes(&dir, &etcd, "sync", &[]);
        let config = WriterConfig {
            room: 200 * MIB,
            ..WriterConfig::default()
        };
        let limit = config.base + config.room;
        let writer = Writer::start(c.targets(), config);
        let mut times = Vec::new();
        for round in 1..=5 {
            let name = c.nodes[p].name().to_string();
            let since = Instant::now();
            writer
                .wait_until(Duration::from_secs(20), |w| {
                    w.acked
                        .iter()
                        .filter(|a| a.node == name && a.at >= since)
                        .count()
                        >= 50
                })
                .unwrap_or_else(|| {
                    panic!(
                        "round {round}: {name} acknowledged no 50 writes in 20 s: {:?}",
                        writer.snapshot().errors
                    )
                });
            let killed = Instant::now();
            c.nodes[p].daemon.kill9();
            let w = writer.wait_until(FAILOVER_BOUND, |w| {
                w.first_ack_not_by(&name, killed).is_some()
            });
            let Some(w) = w else {
                panic!(
                    "round {round}: no write acknowledged by another node within {FAILOVER_BOUND:?} of killing {name}; statuses:\n{}",
                    c.describe()
                );
            };
            let ack = w.first_ack_not_by(&name, killed).expect("found above");
            let took = ack.at - killed;
            eprintln!(
                "round {round}: killed {name}; {} acknowledged a write {took:?} later",
                ack.node
            );
            times.push(took);
            let old = p;
            p = c.index(&ack.node);
            assert_eq!(c.wait_primary(&[p], Duration::from_secs(5)), p);
            assert_holds_every_write(
                &c,
                p,
                &w,
                w.end,
                &format!("round {round}, new primary {}", ack.node),
            );
            c.nodes[old].daemon.restart();
            c.nodes[old].wait_status(
                Duration::from_secs(30),
                "the old primary back as a replica",
                |s| s.role == Role::Replica,
            );
            c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        }
        let w = writer.finish(Duration::from_secs(10));
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        let mut sorted = times.clone();
        let med = median(&mut sorted);
        eprintln!(
            "kill -9 -> first write acknowledged by the new primary: {times:?}; median {med:?} (goal {FAILOVER_GOAL:?}, lease TTL {LEASE_TTL:?})"
        );
        assert_holds_every_write(&c, p, &w, limit, "after five failovers");
        verify_and_compare(&mut c, p);
    }

    /// Every acknowledgement of `w` at or after `from` and before `to`.
    fn acks_between(w: &Written, from: Instant, to: Instant) -> Vec<String> {
        w.acked
            .iter()
            .filter(|a| a.at >= from && a.at < to)
            .map(|a| format!("{:?} by {} at +{:?}", a.region, a.node, a.at - from))
            .collect()
    }

    /// etcd killed with -9 under write load, right after it answered the
    /// primary's lease renewal (seen through a proxy per node), for three
    /// lease TTLs, then restarted: while it is down no node becomes a second
    /// primary; the primary acknowledges nothing from [`MIN_FENCE_MARGIN`]
    /// before its lease lapses (one TTL after that renewal) until etcd is
    /// back, and fails nothing either (the writes are held on the same
    /// connection); after the restart writes are
    /// acknowledged again within a bounded time. Nothing acknowledged is
    /// lost; verify and the stopped stores agree.
    #[test]
    fn etcd_killed_under_load_holds_writes_and_loses_nothing() {
        let dir = TestDir::new();
        let mut etcd = Etcd::start(dir.path());
        let watches: Vec<KeepAliveWatch> = (0..3)
            .map(|_| KeepAliveWatch::start(etcd.client_addr()))
            .collect();
        let urls: Vec<String> = watches.iter().map(KeepAliveWatch::url).collect();
        let (mut c, p) = three_nodes_via(&dir, &etcd, &urls, "sync", &[]);
        let config = WriterConfig::default();
        let limit = config.base + config.room;
        let writer = Writer::start(c.targets(), config);
        writer
            .wait_until(Duration::from_secs(20), |w| w.acked.len() >= 100)
            .expect("100 writes acknowledged before etcd is killed");
        let connections = writer.snapshot().connections.len();
        // Right after a renewal: the lease then lasts a whole TTL from
        // `renewed`, and the primary must stop acknowledging a margin before.
        let renewed = watches[p]
            .wait_answered(watches[p].count(), Duration::from_secs(5))
            .expect("the primary renews its lease through its proxy");
        etcd.kill9();
        let killed = Instant::now();
        eprintln!(
            "etcd killed {:?} after the primary's last renewal",
            killed - renewed
        );
        let mut most_primaries = 0;
        while killed.elapsed() < 3 * LEASE_TTL {
            most_primaries = most_primaries.max(c.primaries().len());
            std::thread::sleep(Duration::from_millis(100));
        }
        let restarted = Instant::now();
        etcd.restart();
        let w = writer
            .wait_until(FAILOVER_BOUND, |w| w.acked.iter().any(|a| a.at >= restarted))
            .unwrap_or_else(|| {
                panic!(
                    "no write acknowledged within {FAILOVER_BOUND:?} of etcd's restart; statuses:\n{}",
                    c.describe()
                )
            });
        let resumed = w
            .acked
            .iter()
            .find(|a| a.at >= restarted)
            .expect("found above");
        let last_before = w.acked.iter().rev().find(|a| a.at < restarted);
        eprintln!(
            "etcd down {:?}; last acknowledgement {:?} after the kill, first {:?} after the restart (by {})",
            restarted - killed,
            last_before.map(|a| a.at.saturating_duration_since(killed)),
            resumed.at - restarted,
            resumed.node
        );
        assert!(
            w.errors.is_empty(),
            "writes failed instead of being held: {:#?}",
            w.errors
        );
        assert_eq!(
            w.connections.len(),
            connections,
            "the writer's connection was dropped while etcd was down: {:?}",
            w.connections
        );
        assert!(
            most_primaries <= 1,
            "{most_primaries} nodes said primary while etcd was down"
        );
        let fenced = acks_between(&w, renewed + LEASE_TTL - MIN_FENCE_MARGIN, restarted);
        assert!(
            fenced.is_empty(),
            "{} writes acknowledged within {MIN_FENCE_MARGIN:?} of the lease's expiry ({LEASE_TTL:?} after its last renewal, just before etcd's kill) or later, before etcd came back:\n{}",
            fenced.len(),
            first_lines(&fenced)
        );
        writer
            .wait_until(Duration::from_secs(20), |w| {
                w.acked.iter().filter(|a| a.at >= restarted).count() >= 50
            })
            .expect("50 writes acknowledged after the restart");
        let w = writer.finish(Duration::from_secs(10));
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        let p = c.wait_primary(&[0, 1, 2], ELECTION_TIMEOUT);
        assert_holds_every_write(&c, p, &w, limit, "after etcd's restart");
        let primary = c.nodes[p].name().to_string();
        assert_in_order(
            &primary,
            &events_of(&c.nodes[p]),
            0,
            &[
                ("coordinator-unreachable", &|k| {
                    matches!(k, EventKind::CoordinatorUnreachable { .. })
                }),
                ("writes-held", &|k| {
                    matches!(k, EventKind::WritesHeld { .. })
                }),
                ("coordinator-reachable", &|k| {
                    matches!(k, EventKind::CoordinatorReachable {})
                }),
                ("writes-resumed", &|k| {
                    matches!(k, EventKind::WritesResumed { .. })
                }),
            ],
        );
        verify_and_compare(&mut c, p);
    }

    /// A replica that misses writes (killed while the others go on) is left
    /// out of the in-sync set the primary publishes; with the primary and
    /// the in-sync replica then killed, it is the only node left and etcd
    /// has no leader, yet for three lease TTLs it never becomes primary and
    /// serves no client. The in-sync replica, restarted, takes over with
    /// every acknowledged write, and the stale one is resynced from it.
    #[test]
    fn a_replica_not_in_sync_is_never_promoted() {
        let dir = TestDir::new();
        let etcd = Etcd::start(dir.path());
        let (mut c, p) = three_nodes(&dir, &etcd, "sync", &[]);
        let others: Vec<usize> = (0..3).filter(|&i| i != p).collect();
        let (fresh, stale) = (others[0], others[1]);
        let stale_name = c.nodes[stale].name().to_string();
        c.nodes[stale].daemon.kill9();
        let writer = Writer::start(
            vec![target_of(&c.nodes[p])],
            WriterConfig {
                reconnect: false,
                bytes_per_second: 8 * MIB,
                ..WriterConfig::default()
            },
        );
        writer
            .wait_until(Duration::from_secs(30), |w| w.acked.len() >= 300)
            .expect("300 writes acknowledged without the stale replica");
        let w = writer.finish(Duration::from_secs(10));
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        let in_sync = etcd
            .get(&VolumeKeys::new(EXPORT).in_sync())
            .expect("read the in-sync key")
            .expect("an in-sync set published before writes went on without a replica");
        let record: InSyncRecord = decode(&in_sync).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !record.includes(&stale_name),
            "{stale_name} is in the published in-sync set: {record:?}"
        );
        c.nodes[p].daemon.kill9();
        c.nodes[fresh].daemon.kill9();
        c.nodes[stale].daemon.restart();
        let watched = Instant::now();
        while watched.elapsed() < 3 * LEASE_TTL {
            let s = c.nodes[stale].status();
            assert_eq!(
                s.role,
                Role::Replica,
                "{stale_name}, not in sync, became primary: {s:#?}"
            );
            assert!(
                connect(&target_of(&c.nodes[stale])).is_none(),
                "{stale_name}, not in sync, accepted an NBD client"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let why = c.nodes[stale].log_lines_with("not campaigning");
        eprintln!("{stale_name} says: {why:?}");
        assert!(
            !why.is_empty(),
            "{stale_name} never said why it does not campaign: {}",
            c.nodes[stale].daemon.log()
        );
        let refused: Vec<String> = events_of(&c.nodes[stale])
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::CampaignRefused { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        assert!(
            refused.iter().any(|r| r.contains("in-sync")),
            "{stale_name}'s event log has no campaign-refused naming the in-sync set: {refused:?}"
        );
        c.nodes[fresh].daemon.restart();
        let np = c.wait_primary(&[fresh], ELECTION_TIMEOUT);
        assert_holds_every_write(&c, np, &w, w.end, "the in-sync replica, promoted");
        c.nodes[p].daemon.restart();
        verify_and_compare(&mut c, np);
    }

    /// n1 alone in one network namespace, n2, n3 and etcd in the other;
    /// n1 is started first, so it is primary.
    fn partitioned_nodes(dir: &TestDir, net: &Net, etcd: &Etcd) -> Coordinated {
        let secret = write_secret(dir, "secret");
        let ips = [PRIMARY_IP, REPLICA_IP, REPLICA_IP];
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| format!("{}:{}", ips[i], 7101 + i).parse().expect("address"))
            .collect();
        let url = etcd.url();
        let start = |i: usize| -> Node {
            let files = NodeFiles::new(dir, NAMES[i]);
            let peers: Vec<(String, String)> = (0..3)
                .filter(|&j| j != i)
                .map(|j| (NAMES[j].to_string(), addrs[j].to_string()))
                .collect();
            let unix = dir
                .join(&format!("{}.sock", NAMES[i]))
                .display()
                .to_string();
            let flags = [
                "--mode",
                "sync",
                "--heartbeat-timeout",
                "1s",
                "--unix",
                &unix,
            ];
            let ns = if i == 0 {
                &net.primary_ns
            } else {
                &net.replica_ns
            };
            let daemon = Daemon::try_start_in_netns(
                ns,
                files.coordinated_args(&secret, addrs[i], &peers, &url, &flags),
            )
            .unwrap_or_else(|e| panic!("{} did not start in {ns}: {e}", NAMES[i]));
            Node {
                files,
                daemon,
                replication: Some(addrs[i]),
            }
        };
        let mut c = Coordinated {
            nodes: vec![start(0)],
        };
        c.wait_primary(&[0], ELECTION_TIMEOUT);
        c.nodes.push(start(1));
        c.nodes.push(start(2));
        c.wait_in_sync(0, IN_SYNC_TIMEOUT);
        c
    }

    /// The primary (n1) loses etcd and both replicas while a client keeps
    /// writing through it (pinned to it), and another client writes through
    /// whichever of n2 and n3 serves: n1 acknowledges nothing after the new
    /// primary's first acknowledgement. After the heal n1 rejoins as a
    /// replica and converges; every write either client saw acknowledged
    /// reads back from the new primary; verify and the stopped stores agree.
    /// Prints SKIP where network namespaces cannot be made.
    #[test]
    fn partitioned_primary_stops_acknowledging_before_a_replica_is_promoted() {
        let net = match Net::create("f") {
            Ok(n) => n,
            Err(why) => {
                println!("SKIP: cannot create network namespaces here: {why}");
                return;
            }
        };
        let dir = TestDir::new();
        let etcd =
            Etcd::start_in_netns(dir.path(), &net.replica_ns, REPLICA_IP.parse().expect("ip"));
        let mut c = partitioned_nodes(&dir, &net, &etcd);
        let old = WriterConfig {
            reconnect: false,
            room: 64 * MIB,
            ..WriterConfig::default()
        };
        let new = WriterConfig {
            base: 64 * MIB,
            room: 64 * MIB,
            ..WriterConfig::default()
        };
        let (old_limit, new_limit) = (old.base + old.room, new.base + new.room);
        let to_old = Writer::start(vec![target_of(&c.nodes[0])], old);
        let to_new = Writer::start(vec![target_of(&c.nodes[1]), target_of(&c.nodes[2])], new);
        to_old
            .wait_until(Duration::from_secs(20), |w| w.acked.len() >= 100)
            .expect("100 writes acknowledged by n1 before the partition");
        let cut = Instant::now();
        net.set_link(false);
        let first = to_new
            .wait_until(FAILOVER_BOUND + LEASE_TTL, |w| !w.acked.is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "no replica acknowledged a write within {:?} of the partition; statuses:\n{}",
                    FAILOVER_BOUND + LEASE_TTL,
                    c.describe()
                )
            });
        let first = first.acked[0].clone();
        // Give n1 every chance to acknowledge what it should not.
        std::thread::sleep(Duration::from_secs(2));
        let held = to_old.snapshot();
        let last_old = held
            .last_ack_by("n1")
            .expect("n1 acknowledged writes before the cut")
            .clone();
        eprintln!(
            "partition: n1's last acknowledgement {:?} after the cut; {}'s first {:?} after the cut",
            last_old.at.saturating_duration_since(cut),
            first.node,
            first.at - cut,
        );
        assert!(
            last_old.at < first.at,
            "split brain: n1 acknowledged {:?} {:?} after {} acknowledged its first write",
            last_old.region,
            last_old.at - first.at,
            first.node
        );
        net.set_link(true);
        c.nodes[0].wait_status(
            Duration::from_secs(60),
            "n1 back as a replica after the heal",
            |s| s.role == Role::Replica,
        );
        let p = c.index(&first.node);
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        let w_old = to_old.finish(Duration::from_secs(10));
        let w_new = to_new.finish(Duration::from_secs(10));
        eprintln!(
            "n1's client: {} acknowledged, {} unanswered, errors {:?}",
            w_old.acked.len(),
            w_old.unanswered.len(),
            w_old.errors
        );
        let late: Vec<_> = w_old.acked.iter().filter(|a| a.at >= first.at).collect();
        assert!(
            late.is_empty(),
            "n1 acknowledged {} writes after the new primary's first: {late:?}",
            late.len()
        );
        assert!(
            w_new.errors.is_empty(),
            "write errors through the new primary: {:#?}",
            w_new.errors
        );
        assert_holds_every_write(&c, p, &w_old, old_limit, "n1's writes, on the new primary");
        assert_holds_every_write(&c, p, &w_new, new_limit, "the new primary's writes");
        verify_and_compare(&mut c, p);
        drop(etcd);
        drop(net);
    }

    /// A port base for the demo: it and the ports the demo counts from it
    /// (replication, replicas' NBD, metrics, etcd) are free now.
    fn demo_port_base() -> u16 {
        use mirrorblk_tests::cluster::pick_port;
        const OFFSETS: [u16; 9] = [0, 1, 2, 3, 12, 13, 100, 200, 201];
        for _ in 0..50 {
            let base = pick_port();
            let free = OFFSETS.iter().all(|o| {
                base.checked_add(*o)
                    .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            });
            if free {
                return base;
            }
        }
        panic!("no free port base for the demo in 50 attempts");
    }

    /// The demo process: interrupted (SIGINT, as Ctrl-C), then killed, by
    /// its PID when dropped, so its nodes and etcd are stopped by it.
    struct Demo {
        child: std::process::Child,
        lines: std::sync::mpsc::Receiver<String>,
        seen: Vec<String>,
    }

    impl Demo {
        /// Waits up to `timeout` for an output line containing `needle`.
        fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                    return l.clone();
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(l) => self.seen.push(l),
                    Err(_) => panic!(
                        "the demo printed no line with {needle:?} within {timeout:?}; it printed:\n{}",
                        self.seen.join("\n")
                    ),
                }
            }
        }

        /// SIGINT, and its exit status within 30 s (None: it hung).
        fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = self.child.try_wait() {
                    return Some(st);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        }
    }

    impl Drop for Demo {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) && self.interrupt().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    /// `mirrorblk demo --auto-failover` starts etcd and three nodes, names
    /// the primary with its PID; after `kill -9` of that PID it prints the
    /// replica that took over, and Ctrl-C stops everything with status 0.
    #[test]
    fn demo_auto_failover_shows_a_replica_taking_over() {
        use std::io::BufRead;
        let dir = TestDir::new();
        let listen = format!("127.0.0.1:{}", demo_port_base());
        let mut child = std::process::Command::new(mirrorblk_tests::cluster::mirrorblk_cli())
            .args([
                "demo",
                "--auto-failover",
                "--size",
                "64M",
                "--listen",
                &listen,
                "--dir",
            ])
            .arg(dir.join("demo"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run mirrorblk demo");
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut demo = Demo {
            child,
            lines,
            seen: Vec::new(),
        };
        let line = demo.wait_line(" is primary: nbd://", ELECTION_TIMEOUT);
        let pid: i32 = line
            .rsplit_once("(pid ")
            .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        let old = line
            .split_whitespace()
            .next()
            .expect("a node name")
            .to_string();
        // SAFETY: kill(2) on the primary the demo (our child) started and named.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {pid}");
        let now = demo.wait_line(" is primary now", FAILOVER_BOUND);
        assert!(!now.starts_with(&old), "{old} is primary again: {now:?}");
        eprintln!("demo: {line}\ndemo: {now}");
        let st = demo
            .interrupt()
            .expect("the demo stops within 30 s of Ctrl-C");
        assert!(
            st.success(),
            "the demo exited with {st}; it printed:\n{}",
            demo.seen.join("\n")
        );
    }

    /// The event log tells a failover step by step, and `mirrorblk events
    /// --json` parses every line: the first primary's lease-granted,
    /// campaign-won, role-change to primary and in-sync-published naming
    /// both replicas; after its `kill -9`, the successor's leader-seen,
    /// campaign-won, role-change and in-sync-published without the dead
    /// node; the old primary, restarted, starts as a replica (role-change
    /// to replica) and sees the successor lead.
    #[test]
    fn the_event_log_records_each_step_of_a_failover_in_order() {
        let dir = TestDir::new();
        let etcd = Etcd::start(dir.path());
        let (mut c, p) = three_nodes(&dir, &etcd, "sync", &[]);
        let old = c.nodes[p].name().to_string();
        let others: Vec<String> = (0..3)
            .filter(|&i| i != p)
            .map(|i| c.nodes[i].name().to_string())
            .collect();
        c.nodes[p].daemon.kill9();
        let np = c.wait_primary(
            &(0..3).filter(|&i| i != p).collect::<Vec<_>>(),
            FAILOVER_BOUND,
        );
        let new = c.nodes[np].name().to_string();
        c.wait_in_sync(np, IN_SYNC_TIMEOUT);
        let first = events_of(&c.nodes[p]);
        assert_in_order(
            &old,
            &first,
            0,
            &[
                ("lease-granted", &|k| {
                    matches!(k, EventKind::LeaseGranted { .. })
                }),
                ("campaign-won", &|k| {
                    matches!(k, EventKind::CampaignWon { .. })
                }),
                ("role-change to primary", &|k| {
                    matches!(
                        k,
                        EventKind::RoleChange {
                            to: Role::Primary,
                            ..
                        }
                    )
                }),
                (
                    "in-sync-published with both replicas",
                    &|k| matches!(k, EventKind::InSyncPublished { replicas, .. } if others.iter().all(|o| replicas.contains(o))),
                ),
            ],
        );
        let second = events_of(&c.nodes[np]);
        let seen = assert_in_order(
            &new,
            &second,
            0,
            &[(
                "leader-seen naming the first primary",
                &|k| matches!(k, EventKind::LeaderSeen { leader, .. } if *leader == old),
            )],
        );
        assert_in_order(
            &new,
            &second,
            seen,
            &[
                ("campaign-won", &|k| {
                    matches!(k, EventKind::CampaignWon { .. })
                }),
                ("role-change to primary", &|k| {
                    matches!(
                        k,
                        EventKind::RoleChange {
                            from: Role::Replica,
                            to: Role::Primary,
                            ..
                        }
                    )
                }),
                (
                    "in-sync-published without the dead primary",
                    &|k| matches!(k, EventKind::InSyncPublished { replicas, .. } if !replicas.contains(&old)),
                ),
            ],
        );
        c.nodes[p].daemon.restart();
        c.nodes[p].wait_status(
            Duration::from_secs(30),
            "the old primary back as a replica",
            |s| s.role == Role::Replica,
        );
        c.wait_in_sync(np, IN_SYNC_TIMEOUT);
        let again = events_of(&c.nodes[p]);
        let restart = assert_in_order(
            &old,
            &again,
            first.len(),
            &[("daemon-start", &|k| {
                matches!(k, EventKind::DaemonStart { .. })
            })],
        );
        assert!(
            !again[restart..].iter().any(|e| matches!(
                e.kind,
                EventKind::RoleChange {
                    to: Role::Primary,
                    ..
                }
            )),
            "the restarted old primary became primary again: {:?}",
            &again[restart..]
        );
        assert_in_order(
            &old,
            &again,
            restart,
            &[(
                "leader-seen naming the successor",
                &|k| matches!(k, EventKind::LeaderSeen { leader, .. } if *leader == new),
            )],
        );
        verify_and_compare(&mut c, np);
    }

    /// A replica in the middle of a resync is never promoted: n3 comes back
    /// with a new, empty store (a replaced disk) after 8 MiB were written
    /// without it, and is resynced at 4 MiB/s; while it is Inconsistent the
    /// primary and the other replica are killed. For three lease TTLs it
    /// stays a replica and serves no client, and its event log says why
    /// (campaign-refused: Inconsistent). The other replica, restarted,
    /// takes over with every acknowledged write and finishes the resync.
    #[test]
    fn a_replica_in_the_middle_of_a_resync_is_never_promoted() {
        let dir = TestDir::new();
        let etcd = Etcd::start(dir.path());
        let (mut c, p) = three_nodes(&dir, &etcd, "sync", &["--resync-rate", "4M"]);
        let others: Vec<usize> = (0..3).filter(|&i| i != p).collect();
        let (fresh, resyncing) = (others[0], others[1]);
        let name = c.nodes[resyncing].name().to_string();
        c.nodes[resyncing].daemon.kill9();
        let writer = Writer::start(
            vec![target_of(&c.nodes[p])],
            WriterConfig {
                reconnect: false,
                bytes_per_second: 16 * MIB,
                room: 8 * MIB,
                ..WriterConfig::default()
            },
        );
        let w = writer.finish_when_out_of_room(Duration::from_secs(30));
        assert!(w.errors.is_empty(), "write errors: {:#?}", w.errors);
        for f in [
            &c.nodes[resyncing].files.data,
            &c.nodes[resyncing].files.journal,
        ] {
            std::fs::remove_file(f).unwrap_or_else(|e| panic!("remove {}: {e}", f.display()));
        }
        c.nodes[resyncing].daemon.restart();
        c.nodes[resyncing].wait_status(Duration::from_secs(30), "a resync under way", |s| {
            s.inconsistent
        });
        c.nodes[p].daemon.kill9();
        c.nodes[fresh].daemon.kill9();
        let watched = Instant::now();
        while watched.elapsed() < 3 * LEASE_TTL {
            let s = c.nodes[resyncing].status();
            assert_eq!(
                s.role,
                Role::Replica,
                "{name}, resyncing, became primary: {s:#?}"
            );
            assert!(
                connect(&target_of(&c.nodes[resyncing])).is_none(),
                "{name}, resyncing, accepted an NBD client"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let refused: Vec<String> = events_of(&c.nodes[resyncing])
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::CampaignRefused { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        eprintln!("{name}'s campaign-refused events: {refused:?}");
        assert!(
            refused.iter().any(|r| r.contains("Inconsistent")),
            "{name}'s event log has no campaign-refused saying it is Inconsistent: {refused:?}"
        );
        c.nodes[fresh].daemon.restart();
        let np = c.wait_primary(&[fresh], ELECTION_TIMEOUT);
        assert_holds_every_write(&c, np, &w, w.end, "the in-sync replica, promoted");
        c.nodes[p].daemon.restart();
        verify_and_compare(&mut c, np);
    }
}
