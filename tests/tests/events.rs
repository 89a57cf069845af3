//! The event log across real processes: a primary and its replica write
//! their events durably (a `kill -9` loses none), `mirrorblk events --json`
//! (the real CLI) parses them in order across a restart for a role change,
//! `--follow` prints a new event within a bounded time, and the metrics
//! count them; under etcd, a failover shows as each node saw it.

mod events {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use mirrorblk_admin::{Event, EventKind, Role};
    use mirrorblk_tests::cluster::{mirrorblk_cli, write_secret, Node, EXPORT};
    use mirrorblk_tests::TestDir;

    /// Bound on a freshly started pair reaching in-sync.
    const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(20);
    /// Bound on one `mirrorblk events` run.
    const CLI_TIMEOUT: Duration = Duration::from_secs(20);
    /// Bound on `--follow` printing an event after it happened (the replica
    /// notices a killed primary at once, its socket closes; at worst after
    /// the 2 s heartbeat timeout).
    const FOLLOW_TIMEOUT: Duration = Duration::from_secs(15);

    /// The events `mirrorblk events --json` prints for `node`; every line
    /// must parse.
    fn events_of(node: &Node, extra: &[&str]) -> Vec<Event> {
        let mut args = vec!["events", "--json"];
        args.extend_from_slice(extra);
        let out = node.cli(&args, CLI_TIMEOUT);
        assert_eq!(out.code, 0, "mirrorblk events failed: {out:#?}");
        out.stdout
            .lines()
            .map(|l| Event::from_line(l).unwrap_or_else(|e| panic!("{l:?} is no event: {e}")))
            .collect()
    }

    /// An event looked for: what it is called and whether a kind is it.
    type Wanted<'a> = (&'a str, &'a dyn Fn(&EventKind) -> bool);

    /// Panics unless `events` holds events matching `wanted`, in this order
    /// (others may come between), and their sequence numbers go up by one.
    fn assert_in_order(who: &str, events: &[Event], wanted: &[Wanted<'_>]) {
        let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
        for pair in events.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1, "{who}: a gap in {names:?}");
        }
        let mut rest = events.iter();
        for (what, ok) in wanted {
            assert!(
                rest.any(|e| ok(&e.kind)),
                "{who}: no {what} after the earlier ones in {names:#?}"
            );
        }
    }

    /// The `mirrorblk_events_total` sample for `event`, scraped from
    /// `http://127.0.0.1:port/metrics` (bounded).
    fn events_counted(port: u16, event: &str) -> f64 {
        let needle = format!("mirrorblk_events_total{{event=\"{event}\"}} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut text = String::new();
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
                let _ = s.read_to_string(&mut text);
            }
            if let Some(v) = text.lines().find_map(|l| l.strip_prefix(&needle)) {
                return v.trim().parse().expect("a number");
            }
            assert!(Instant::now() < deadline, "no {needle} in:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mirrorblk events --follow --json` on `admin`, its lines sent to the
    /// returned channel by a reader thread.
    fn follow(admin: &Path) -> (std::process::Child, mpsc::Receiver<String>) {
        let mut child = Command::new(mirrorblk_cli())
            .arg("--admin-socket")
            .arg(admin)
            .args(["events", "--follow", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mirrorblk events --follow");
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }

    /// Waits (bounded) for a line of `rx` holding `needle`.
    fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// A replica and its primary; a client attaches to the primary; the
    /// primary is killed (-9), the replica promoted by the CLI. The killed
    /// primary's log still holds its events, the replica's shows each step
    /// in order across its restart, `--follow` saw the lost peer as it
    /// happened, and the metrics counted the events.
    #[test]
    fn the_event_log_records_each_step_in_order() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let hb = ["--heartbeat-timeout", "2s"];
        let mut r = Node::start_replica(&dir, "n2", &secret, "16M", &hb);
        let metrics = free_port();
        let m = format!("127.0.0.1:{metrics}");
        let mut p =
            Node::start_primary(&dir, "n1", &secret, &[&r], "16M", &["--metrics-listen", &m]);
        p.wait_replicas_in_sync(IN_SYNC_TIMEOUT);
        let client = p.daemon.connect(EXPORT);
        drop(client);
        let (mut follower, lines) = follow(&r.files.admin);
        assert!(
            wait_line(&lines, "\"peer-connect\"", FOLLOW_TIMEOUT).is_some(),
            "--follow did not print the replica's history"
        );
        // The client's detach reaches the log after its connection closed.
        let p_log = PathBuf::from(format!("{}.events.jsonl", p.files.journal.display()));
        let detached = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&p_log)
            .unwrap_or_default()
            .contains("client-detach")
        {
            assert!(
                Instant::now() < detached,
                "n1 never logged the client's detach"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(events_counted(metrics, "peer-connect"), 1.0);
        assert_eq!(events_counted(metrics, "client-attach"), 1.0);

        p.daemon.kill9();
        let seen = wait_line(&lines, "\"peer-disconnect\"", FOLLOW_TIMEOUT);
        let _ = follower.kill();
        let _ = follower.wait();
        assert!(
            seen.is_some(),
            "--follow did not print the lost primary within {FOLLOW_TIMEOUT:?}"
        );

        let before = r.daemon.ready().clone();
        let out = r.cli(&["promote"], Duration::from_secs(30));
        assert_eq!(out.code, 0, "mirrorblk promote failed: {out:#?}");
        r.daemon
            .wait_serving_again(&before, Duration::from_secs(30));
        r.wait_status(Duration::from_secs(30), "n2 primary", |s| {
            s.role == Role::Primary
        });

        let n1 = events_of(&r, &["--file", p_log.to_str().expect("utf-8 path")]);
        assert_in_order(
            "n1 (killed)",
            &n1,
            &[
                ("daemon-start", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                (
                    "peer-connect to n2",
                    &|k| matches!(k, EventKind::PeerConnect { peer, peer_role: Role::Replica, .. } if peer == "n2"),
                ),
                (
                    "client-attach",
                    &|k| matches!(k, EventKind::ClientAttach { volume, .. } if volume == EXPORT),
                ),
                ("client-detach", &|k| {
                    matches!(k, EventKind::ClientDetach { .. })
                }),
            ],
        );
        let n2 = events_of(&r, &[]);
        assert_in_order(
            "n2",
            &n2,
            &[
                ("daemon-start", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                (
                    "peer-connect from n1",
                    &|k| matches!(k, EventKind::PeerConnect { peer, peer_role: Role::Primary, .. } if peer == "n1"),
                ),
                (
                    "peer-disconnect of n1",
                    &|k| matches!(k, EventKind::PeerDisconnect { peer, .. } if peer == "n1"),
                ),
                ("role-change to primary", &|k| {
                    matches!(
                        k,
                        EventKind::RoleChange {
                            from: Role::Replica,
                            to: Role::Primary,
                            epoch: 2,
                            ..
                        }
                    )
                }),
                (
                    "admin-command promote, logged with its outcome",
                    &|k| matches!(k, EventKind::AdminCommand { command, ok: true, .. } if command.contains("promote")),
                ),
                (
                    "daemon-stop for the restart",
                    &|k| matches!(k, EventKind::DaemonStop { reason } if reason == "restart as primary"),
                ),
                ("daemon-start again", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
            ],
        );
        let human = r.cli(&["events"], CLI_TIMEOUT);
        assert!(
            human.stdout.lines().any(|l| l.contains(" n2 role-change volume=vol0 from=replica to=primary epoch=2 ")),
            "no human role-change line in:\n{}",
            human.stdout
        );

        // The killed primary comes back with --role replica: its log goes
        // on where it stopped, and says the role changed at start.
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut given = p.daemon.args().iter();
        while let Some(a) = given.next() {
            if a == "--role" {
                given.next();
            } else {
                args.push(a.clone());
            }
        }
        let listen = format!("127.0.0.1:{}", mirrorblk_tests::cluster::pick_port());
        args.extend(["--role", "replica", "--replication-listen", &listen].map(Into::into));
        p.daemon.restart_with(args);
        let n1 = events_of(&p, &[]);
        assert_in_order(
            "n1 (restarted)",
            &n1,
            &[
                ("client-detach", &|k| {
                    matches!(k, EventKind::ClientDetach { .. })
                }),
                ("daemon-start", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                (
                    "role-change at start",
                    &|k| matches!(k, EventKind::RoleChange { from: Role::Primary, to: Role::Replica, epoch: 1, reason, .. } if reason == "started as replica"),
                ),
            ],
        );
        p.stop();
        r.stop();
    }

    /// Three nodes under a real etcd; the primary is killed (-9) and a
    /// replica takes over. The new primary's log tells the story in order:
    /// the old leader seen, its link lost, the election won, the role
    /// changed, the restart, the lease handed over; the third node sees the
    /// new leader after the old one; the killed node's log kept its lease.
    #[test]
    fn under_etcd_a_failover_shows_in_order_on_every_node() {
        use mirrorblk_tests::coordinated::{Coordinated, ELECTION_TIMEOUT, IN_SYNC_TIMEOUT};
        use mirrorblk_tests::etcd::Etcd;
        let dir = TestDir::new();
        let etcd = Etcd::start(dir.path());
        let secret = write_secret(&dir, "secret");
        let names = ["n1", "n2", "n3"];
        let mut c = Coordinated::start(&dir, &secret, &etcd.url(), &names, "sync", &[]);
        let p = c.wait_primary(&[0, 1, 2], ELECTION_TIMEOUT);
        c.wait_in_sync(p, IN_SYNC_TIMEOUT);
        let old = c.nodes[p].name().to_string();
        let old_log = format!("{}.events.jsonl", c.nodes[p].files.journal.display());
        c.nodes[p].daemon.kill9();
        let others: Vec<usize> = (0..3).filter(|&i| i != p).collect();
        let np = c.wait_primary(&others, ELECTION_TIMEOUT);
        let new = c.nodes[np].name().to_string();
        let third = others.into_iter().find(|&i| i != np).expect("a third node");
        // After its restart the new primary logs the lease it handed over.
        let restarted_with_lease = |events: &[Event]| {
            let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
            let start = names.iter().rposition(|n| *n == "daemon-start");
            start.is_some_and(|s| s > 0 && names[s..].contains(&"lease-granted"))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut events = events_of(&c.nodes[np], &[]);
        while !restarted_with_lease(&events) {
            let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
            assert!(
                Instant::now() < deadline,
                "{new} never logged its lease after the restart: {names:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
            events = events_of(&c.nodes[np], &[]);
        }
        let epoch = c.nodes[np].status().epoch;
        assert_in_order(
            &new,
            &events,
            &[
                ("daemon-start", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                (
                    "leader-seen of the old primary",
                    &|k| matches!(k, EventKind::LeaderSeen { leader, .. } if *leader == old),
                ),
                (
                    "peer-disconnect of the old primary",
                    &|k| matches!(k, EventKind::PeerDisconnect { peer, .. } if *peer == old),
                ),
                (
                    "campaign-won",
                    &|k| matches!(k, EventKind::CampaignWon { epoch: e, .. } if *e == epoch),
                ),
                (
                    "role-change to primary",
                    &|k| matches!(k, EventKind::RoleChange { from: Role::Replica, to: Role::Primary, epoch: e, .. } if *e == epoch),
                ),
                (
                    "daemon-stop for the restart",
                    &|k| matches!(k, EventKind::DaemonStop { reason } if reason == "restart as primary"),
                ),
                ("daemon-start as primary", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                ("lease-granted", &|k| {
                    matches!(k, EventKind::LeaseGranted { .. })
                }),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = events_of(&c.nodes[third], &[]);
        let saw_new = |events: &[Event]| {
            events
                .iter()
                .any(|e| matches!(&e.kind, EventKind::LeaderSeen { leader, .. } if *leader == new))
        };
        while !saw_new(&seen) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            seen = events_of(&c.nodes[third], &[]);
        }
        assert_in_order(
            names[third],
            &seen,
            &[
                (
                    "leader-seen of the old primary",
                    &|k| matches!(k, EventKind::LeaderSeen { leader, .. } if *leader == old),
                ),
                (
                    "leader-seen of the new primary",
                    &|k| matches!(k, EventKind::LeaderSeen { leader, epoch: e, .. } if *leader == new && *e == epoch),
                ),
            ],
        );
        let killed = events_of(&c.nodes[np], &["--file", &old_log]);
        assert_in_order(
            &old,
            &killed,
            &[
                ("daemon-start", &|k| {
                    matches!(k, EventKind::DaemonStart { .. })
                }),
                ("lease-granted", &|k| {
                    matches!(k, EventKind::LeaseGranted { .. })
                }),
            ],
        );
    }

    /// A replica with another secret: the primary logs a peer-auth-failed
    /// event naming it, and never a peer-connect.
    #[test]
    fn a_wrong_secret_is_a_peer_auth_failed_event() {
        let dir = TestDir::new();
        let secret = write_secret(&dir, "secret");
        let other = write_secret(&dir, "other-secret");
        let mut r = Node::start_replica(&dir, "n2", &other, "16M", &[]);
        let mut p = Node::start_primary(&dir, "n1", &secret, &[&r], "16M", &[]);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut events = events_of(&p, &[]);
        while !events.iter().any(|e| e.kind.name() == "peer-auth-failed") {
            assert!(
                Instant::now() < deadline,
                "no peer-auth-failed in {events:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
            events = events_of(&p, &[]);
        }
        let failed = events.iter().find_map(|e| match &e.kind {
            EventKind::PeerAuthFailed { addr, peer, reason } => Some((addr, peer, reason)),
            _ => None,
        });
        let (addr, peer, reason) = failed.expect("found above");
        assert_eq!(peer.as_deref(), Some("n2"));
        assert_eq!(Some(addr.parse().expect("an address")), r.replication);
        assert!(reason.contains("secret"), "{reason}");
        assert!(
            !events.iter().any(|e| e.kind.name() == "peer-connect"),
            "a peer connected without the secret: {events:#?}"
        );
        p.stop();
        r.stop();
    }
}
