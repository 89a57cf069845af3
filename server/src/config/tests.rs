//! Resolution of flags and files.

use super::*;
use crate::journal::Durability;
use clap::{CommandFactory, Parser};
use std::collections::HashSet;

fn cli(args: &[&str]) -> Cli {
    let mut v = vec!["mirrorblkd"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).expect("flags parse")
}

#[test]
fn flags_define_a_volume() {
    let c = Config::from_cli(&cli(&[
        "--export",
        "v",
        "--data",
        "/x/d",
        "--journal",
        "/x/j",
        "--size",
        "1G",
    ]))
    .unwrap();
    assert_eq!(c.volumes[0].size, Some(1 << 30));
    assert_eq!(c.listen, defaults::LISTEN);
}

#[test]
fn unaligned_size_is_refused_with_a_suggestion() {
    let e = Config::from_cli(&cli(&[
        "--export",
        "v",
        "--data",
        "/d",
        "--journal",
        "/j",
        "--size",
        "4097",
    ]))
    .unwrap_err();
    assert!(
        e.to_string().contains("not a multiple of 4 KiB") && e.to_string().contains("8K"),
        "{}",
        e
    );
}

#[test]
fn partial_volume_flags_are_refused() {
    let e = Config::from_cli(&cli(&["--export", "v"])).unwrap_err();
    assert!(e.to_string().contains("go together"));
}

#[test]
fn toml_file_with_two_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "listen = \"127.0.0.1:1234\"\n[[volume]]\nname = \"a\"\ndata = \"/a\"\njournal = \"/aj\"\nsize = \"64M\"\n[[volume]]\nname = \"b\"\ndata = \"/b\"\njournal = \"/bj\"\nread_only = true\n",
    )
    .unwrap();
    let c = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap();
    assert_eq!(c.volumes.len(), 2);
    assert_eq!(c.listen.port(), 1234);
    assert!(c.volumes[1].read_only);
}

#[test]
fn shipped_example_config_parses() {
    let text = include_str!("../../../systemd/example-node.toml");
    let f: Settings = toml::from_str(text).expect("example config parses");
    assert_eq!(f.volumes.len(), 2);
    assert!(f.volumes[1].read_only);
}

#[test]
fn unknown_toml_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "lisen = \"x\"\n").unwrap();
    let e = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap_err();
    assert!(e.to_string().contains("lisen"), "{e}");
}

#[test]
fn duplicate_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "[[volume]]\nname = \"a\"\ndata = \"/a\"\njournal = \"/a\"\n",
    )
    .unwrap();
    let e = Config::from_cli(&cli(&["--config", p.to_str().unwrap()])).unwrap_err();
    assert!(e.to_string().contains("used twice"), "{e}");
}

/// A node setting: its flag, its TOML key and two values.
struct Case {
    flag: &'static str,
    key: &'static str,
    values: [&'static str; 2],
}

const fn case(flag: &'static str, key: &'static str, values: [&'static str; 2]) -> Case {
    Case { flag, key, values }
}

/// Every node setting (flags that also are TOML keys), with values that
/// differ from the default and from each other. `@` is the test directory.
const NODE_SETTINGS: &[Case] = &[
    case("--node", "node", ["n8", "n9"]),
    case("--admin-socket", "admin_socket", ["@/a1", "@/a2"]),
    case("--listen", "listen", ["127.0.0.1:1", "127.0.0.1:2"]),
    case("--unix", "unix", ["@/u1", "@/u2"]),
    case("--cores", "cores", ["1", "2"]),
    case("--buffer-memory", "buffer_memory", ["64M", "1G"]),
    case("--busy-poll-us", "busy_poll_us", ["100", "500"]),
    case(
        "--metrics-listen",
        "metrics_listen",
        ["127.0.0.1:3", "127.0.0.1:4"],
    ),
    case(
        "--advertise",
        "advertise",
        ["192.0.2.1:10809", "nbd.example:10810"],
    ),
    case("--max-connections", "max_connections", ["7", "8"]),
    case("--max-handshakes", "max_handshakes", ["7", "8"]),
    case(
        "--max-handshakes-per-source",
        "max_handshakes_per_source",
        ["3", "4"],
    ),
    case("--handshake-timeout", "handshake_timeout", ["250ms", "2m"]),
    case("--tls", "tls", ["require", "on"]),
    case("--tls-certificates", "tls_certificates", ["@/c2", "@/c1"]),
    case("--tls-verify-peer", "tls_verify_peer", ["true", "false"]),
    case("--replication-tls", "replication_tls", ["false", "true"]),
    case(
        "--checkpoint-interval",
        "checkpoint_interval",
        ["250ms", "2m"],
    ),
    case("--in-place-min", "in_place_min", ["0", "4K"]),
    case(
        "--replication-listen",
        "replication_listen",
        ["127.0.0.1:5", "127.0.0.1:6"],
    ),
    case("--peer", "peers", ["b=127.0.0.1:7", "c=127.0.0.1:8"]),
    case("--secret-file", "secret_file", ["@/s2", "@/s1"]),
    case("--role", "role", ["primary", "replica"]),
    case(
        "--etcd",
        "etcd",
        ["http://127.0.0.1:1", "http://127.0.0.1:2"],
    ),
    case("--lease-ttl", "lease_ttl", ["3s", "10s"]),
    case("--mode", "mode", ["async", "flush"]),
    case("--min-sync-replicas", "min_sync_replicas", ["1", "2"]),
    case("--heartbeat-timeout", "heartbeat_timeout", ["2s", "1h"]),
    case("--on-replica-loss", "on_replica_loss", ["block", "degrade"]),
    case("--max-lag", "max_lag", ["1M", "2M"]),
    case("--resync-rate", "resync_rate", ["10M", "20M"]),
    case("--log-level", "log_level", ["debug", "warn"]),
    case("--event-log", "event_log", ["@/e1", "@/e2"]),
    case(
        "--event-log-max-bytes",
        "event_log_max_bytes",
        ["1M", "64K"],
    ),
];

/// Node settings that a replicating node refuses (so the scene below,
/// which replicates, cannot test them): checked on a single node.
const SINGLE_NODE_SETTINGS: &[Case] = &[case("--durability", "durability", ["flush", "per-write"])];

/// Flags of the `--export` volume and the `[[volume]]` keys they stand for.
const VOLUME_SETTINGS: &[Case] = &[
    case("--export", "name", ["v1", "v2"]),
    case("--data", "data", ["@/d1", "@/d2"]),
    case("--journal", "journal", ["@/j1", "@/j2"]),
    case("--size", "size", ["1G", "4K"]),
    case("--journal-size", "journal_size", ["8M", "1G"]),
    case("--preallocate", "preallocate", ["sparse", "full"]),
    case("--description", "description", ["one", "two"]),
    case("--read-only", "read_only", ["true", "false"]),
    case("--read-cache", "read_cache", ["false", "true"]),
];

/// Flags that are not settings of the file.
const FLAG_ONLY: &[&str] = &["--config", "--log-format", "--help", "--version"];

/// A test directory with two secret files, and the files and flags of a
/// replicating node with two volumes in its file: every node setting has an
/// effect on it.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s1"), "0123456789abcdef-one").unwrap();
        std::fs::write(dir.path().join("s2"), "0123456789abcdef-two").unwrap();
        for c in ["c1", "c2"] {
            write_certificates(&dir.path().join(c));
        }
        Scene { dir }
    }

    fn value(&self, v: &str) -> String {
        v.replace('@', &self.dir.path().display().to_string())
    }

    /// `key = value` as the file writes it.
    fn line(&self, key: &str, v: &str) -> String {
        let v = self.value(v);
        match key {
            "peers" | "etcd" => format!("{key} = [\"{v}\"]"),
            _ if v.parse::<u64>().is_ok() || v == "true" || v == "false" => format!("{key} = {v}"),
            _ => format!("{key} = \"{v}\""),
        }
    }

    /// The node's file with `lines` replacing the base's lines of the same keys.
    fn file(&self, lines: &[String]) -> String {
        let mut base = vec![
            self.line("replication_listen", "127.0.0.1:9"),
            self.line("secret_file", "@/s1"),
            // The TLS settings all change something once certificates are
            // in use.
            self.line("tls_certificates", "@/c1"),
            self.line("replication_tls", "true"),
            "peers = [\"p=127.0.0.1:10\", \"q=127.0.0.1:11\"]".to_string(),
        ];
        for l in lines {
            let key = l.split(' ').next().unwrap();
            base.retain(|b| b.split(' ').next() != Some(key));
            base.push(l.clone());
        }
        let mut text = base.join("\n");
        for v in ["a", "b"] {
            text.push_str(&format!(
                "\n[[volume]]\nname = \"{v}\"\ndata = \"/{v}\"\njournal = \"/{v}j\"\n"
            ));
        }
        text
    }

    /// Resolves `flags` over `file`.
    fn resolve(&self, file: &str, flags: &[String]) -> Result<Config, ConfigError> {
        let path = self.dir.path().join("node.toml");
        std::fs::write(&path, file).unwrap();
        let mut args = vec!["mirrorblkd".to_string(), "--config".into()];
        args.push(path.display().to_string());
        args.extend(flags.iter().cloned());
        Config::from_cli(&Cli::try_parse_from(args).expect("flags parse"))
    }
}

#[test]
fn every_node_setting_resolves_alike_from_its_flag_and_its_key() {
    let s = Scene::new();
    let base = s.resolve(&s.file(&[]), &[]).unwrap();
    for c in NODE_SETTINGS {
        let v = c.values[0];
        let by_flag = s.resolve(&s.file(&[]), &[c.flag.into(), s.value(v)]);
        let by_key = s.resolve(&s.file(&[s.line(c.key, v)]), &[]);
        let (by_flag, by_key) = (by_flag.unwrap(), by_key.unwrap());
        assert_eq!(by_flag, by_key, "{} {v} and {}", c.flag, s.line(c.key, v));
        assert_ne!(by_flag, base, "{} {v} has no effect", c.flag);
    }
}

#[test]
fn single_node_settings_resolve_alike_and_flags_override_the_file() {
    let s = Scene::new();
    let single = |lines: &[String], flags: &[String]| {
        let mut text = lines.join("\n");
        text.push_str("\n[[volume]]\nname = \"v\"\ndata = \"/d\"\njournal = \"/j\"\n");
        s.resolve(&text, flags).unwrap()
    };
    let base = single(&[], &[]);
    for c in SINGLE_NODE_SETTINGS {
        let [v, other] = c.values;
        let by_flag = single(&[], &[c.flag.into(), v.into()]);
        assert_eq!(by_flag, single(&[s.line(c.key, v)], &[]), "{} {v}", c.flag);
        assert_ne!(by_flag, base, "{} {v} has no effect", c.flag);
        let over = single(&[s.line(c.key, other)], &[c.flag.into(), v.into()]);
        assert_eq!(over, by_flag, "{} {v} over {} {other}", c.flag, c.key);
    }
}

#[test]
fn either_durability_replicates() {
    let s = Scene::new();
    for (file, flags, want) in [
        (
            s.file(&[]),
            vec!["--durability".to_string(), "flush".into()],
            Durability::Flush,
        ),
        (
            s.file(&[s.line("durability", "flush")]),
            vec![],
            Durability::Flush,
        ),
        (
            s.file(&[]),
            vec!["--durability".to_string(), "per-write".into()],
            Durability::PerWrite,
        ),
    ] {
        let c = s.resolve(&file, &flags).expect("replicated config");
        assert!(c.replication.is_some());
        assert_eq!(c.durability, want);
    }
}

#[test]
fn flags_override_the_file() {
    let s = Scene::new();
    for c in NODE_SETTINGS {
        let [in_file, by_flag] = c.values.map(|v| s.value(v));
        let flag = [c.flag.to_string(), by_flag.clone()];
        let both = s.resolve(&s.file(&[s.line(c.key, &in_file)]), &flag);
        let flag_only = s.resolve(&s.file(&[]), &flag);
        assert_eq!(
            both.unwrap(),
            flag_only.unwrap(),
            "{} {by_flag} over {}",
            c.flag,
            c.key
        );
    }
}

#[test]
fn every_volume_flag_resolves_alike_from_its_key() {
    let s = Scene::new();
    for c in VOLUME_SETTINGS {
        let mut given = vec![("name", "v"), ("data", "@/d"), ("journal", "@/j")];
        given.retain(|(key, _)| *key != c.key);
        given.push((c.key, c.values[0]));
        let mut flags = Vec::new();
        let mut table = String::from("[[volume]]\n");
        for (key, v) in given {
            let flag = VOLUME_SETTINGS.iter().find(|f| f.key == key).unwrap().flag;
            flags.push(flag.to_string());
            match (flag, v) {
                ("--read-only", "true") => {}
                ("--read-only", _) => drop(flags.pop()),
                _ => flags.push(s.value(v)),
            }
            table.push_str(&s.line(key, v));
            table.push('\n');
        }
        let by_flags = s.resolve("", &flags).unwrap().volumes;
        let by_table = s.resolve(&table, &[]).unwrap().volumes;
        assert_eq!(by_flags, by_table, "{flags:?} and {table}");
    }
}

/// A CA and a server certificate it signed, in `dir`.
fn write_certificates(dir: &std::path::Path) {
    use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join(crate::tls::CA_CERT), ca.pem()).unwrap();
    std::fs::write(dir.join(crate::tls::SERVER_CERT), cert.pem()).unwrap();
    std::fs::write(dir.join(crate::tls::SERVER_KEY), key.serialize_pem()).unwrap();
}

#[test]
fn tls_needs_certificates_that_load() {
    let s = Scene::new();
    let no_certs = |l: &str| vec![s.line("tls_certificates", l)];
    let r = s.resolve(
        &s.file(&[]),
        &["--tls-certificates".into(), s.value("@/none")],
    );
    assert!(matches!(r, Err(ConfigError::Tls(_))), "{r:?}");
    std::fs::write(s.dir.path().join("c1").join(crate::tls::SERVER_KEY), "junk").unwrap();
    let r = s.resolve(&s.file(&no_certs("@/c1")), &[]);
    assert!(matches!(r, Err(ConfigError::Tls(_))), "{r:?}");
    let r = s.resolve(
        &s.file(&[]).replace("tls_certificates", "#"),
        &["--tls=require".into()],
    );
    assert!(
        matches!(r, Err(ConfigError::TlsWithoutCertificates(_))),
        "{r:?}"
    );
}

#[test]
fn the_tables_cover_every_flag() {
    let listed: HashSet<&str> = NODE_SETTINGS
        .iter()
        .chain(SINGLE_NODE_SETTINGS)
        .chain(VOLUME_SETTINGS)
        .map(|c| c.flag)
        .chain(FLAG_ONLY.iter().copied())
        .collect();
    let mut cmd = Cli::command();
    cmd.build();
    for arg in cmd.get_arguments() {
        let flag = format!("--{}", arg.get_long().unwrap_or_default());
        assert!(listed.contains(flag.as_str()), "{flag} is in no test table");
    }
}

/// The `[default: …]` an option's help shows.
fn shown_default(flag: &str) -> String {
    let cmd = Cli::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == flag.strip_prefix("--"))
        .unwrap();
    if let Some(v) = arg.get_default_values().first() {
        return v.to_string_lossy().into_owned();
    }
    let help = arg.get_help().unwrap().to_string();
    let (_, d) = help
        .split_once("[default: ")
        .unwrap_or_else(|| panic!("{flag}: {help}"));
    d.trim_end_matches(']').to_string()
}

#[test]
fn the_default_in_help_is_the_default_applied() {
    let s = Scene::new();
    let c = s.resolve(&s.file(&[]), &[]).unwrap();
    let r = c.replication.as_ref().unwrap();
    let choice =
        |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| v().unwrap().get_name().to_string();
    use crate::units::{ByteSize, Interval};
    use clap::ValueEnum;
    let size = |b: u64| ByteSize(b).to_string();
    let applied = [
        ("--listen", c.listen.to_string()),
        ("--buffer-memory", size(c.buffer_memory)),
        (
            "--busy-poll-us",
            c.busy_poll.map_or(0, |w| w.as_micros()).to_string(),
        ),
        ("--max-connections", c.max_connections.to_string()),
        ("--max-handshakes", c.handshake.max_pending.to_string()),
        (
            "--max-handshakes-per-source",
            c.handshake.per_source.to_string(),
        ),
        (
            "--handshake-timeout",
            Interval(c.handshake.deadline).to_string(),
        ),
        (
            "--checkpoint-interval",
            Interval(c.checkpoint_interval).to_string(),
        ),
        ("--in-place-min", size(c.in_place_min)),
        ("--durability", choice(&|| c.durability.to_possible_value())),
        ("--mode", choice(&|| r.mode.to_possible_value())),
        (
            "--heartbeat-timeout",
            Interval(r.heartbeat_timeout).to_string(),
        ),
        (
            "--on-replica-loss",
            choice(&|| r.on_replica_loss.to_possible_value()),
        ),
        ("--max-lag", size(r.max_lag)),
        ("--event-log-max-bytes", size(c.event_log_max_bytes)),
        (
            "--resync-rate",
            format!("{} per second", size(r.resync_rate)),
        ),
        (
            "--log-level",
            format!(
                "{}; the MIRRORBLK_LOG environment variable also works",
                c.log_level
            ),
        ),
    ];
    for (flag, value) in applied {
        assert_eq!(shown_default(flag), value, "{flag}");
    }
    let table = "[[volume]]\nname = \"v\"\ndata = \"/d\"\njournal = \"/j\"\n";
    let v = &s.resolve(table, &[]).unwrap().volumes[0];
    let flags = Cli::try_parse_from(["mirrorblkd"]).unwrap();
    let applied = [
        ("--journal-size", size(v.journal_size)),
        (
            "--preallocate",
            choice(&|| v.preallocate.to_possible_value()),
        ),
        ("--read-cache", v.read_cache.to_string()),
        (
            "--log-format",
            choice(&|| flags.log_format.to_possible_value()),
        ),
    ];
    for (flag, value) in applied {
        assert_eq!(shown_default(flag), value, "{flag}");
    }
}

#[test]
fn unknown_volume_keys_and_flag_only_settings_are_refused_in_the_file() {
    let s = Scene::new();
    let vol = "\n[[volume]]\nname = \"v\"\ndata = \"/d\"\njournal = \"/j\"\n";
    for (text, key) in [
        (format!("{vol}sizee = \"1G\"\n"), "sizee"),
        (format!("config = \"/x\"{vol}"), "config"),
        (format!("log_format = \"json\"{vol}"), "log_format"),
        (format!("export = \"v\"{vol}"), "export"),
        (format!("{vol}export = \"v\"\n"), "export"),
    ] {
        let e = s.resolve(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(&format!("unknown field `{key}`")), "{text}: {e}");
    }
}

#[test]
fn a_volume_table_without_name_is_refused_while_parsing() {
    let s = Scene::new();
    let e = s.resolve("[[volume]]\ndata = \"/d\"\njournal = \"/j\"\n", &[]);
    let e = e.unwrap_err().to_string();
    assert!(e.contains("missing field `name`"), "{e}");
}

#[test]
fn bad_file_values_are_refused_naming_their_key() {
    let s = Scene::new();
    for (line, want) in [
        (
            "checkpoint_interval = \"x\"",
            "checkpoint_interval: 'x' is not a duration",
        ),
        (
            "heartbeat_timeout = \"5 parsecs\"",
            "heartbeat_timeout: '5 parsecs' is not a duration",
        ),
        (
            "peers = [\"nope\"]",
            "peers: peer 'nope' must look like NAME=HOST:PORT",
        ),
    ] {
        let e = s
            .resolve(&s.file(&[line.into()]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{line}: {e}");
    }
}

#[test]
fn the_event_log_lies_beside_the_first_journal_unless_given() {
    let vol = ["--export", "v", "--data", "/x/d", "--journal", "/x/j"];
    let c = Config::from_cli(&cli(&vol)).unwrap();
    assert_eq!(c.event_log, std::path::Path::new("/x/j.events.jsonl"));
    assert_eq!(c.event_log_max_bytes, defaults::EVENT_LOG_MAX_BYTES.0);
    let small = [&vol[..], &["--event-log-max-bytes", "4K"]].concat();
    let e = Config::from_cli(&cli(&small)).unwrap_err().to_string();
    assert!(e.contains("--event-log-max-bytes 4K is too small"), "{e}");
    let device = [
        "--export",
        "v",
        "--data",
        "/x/d",
        "--journal",
        "/dev/nvme0n1p3",
    ];
    let e = Config::from_cli(&cli(&device)).unwrap_err().to_string();
    assert!(e.contains("give --event-log PATH"), "{e}");
    let given = [&device[..], &["--event-log", "/x/e"]].concat();
    assert_eq!(
        Config::from_cli(&cli(&given)).unwrap().event_log,
        std::path::Path::new("/x/e")
    );
}

#[test]
fn advertise_must_be_host_and_port() {
    let scene = Scene::new();
    for bad in ["nohost", ":10809", "h:", "h:0", "h:99999"] {
        let r = scene.resolve(&scene.file(&[]), &[format!("--advertise={bad}")]);
        assert!(matches!(r, Err(ConfigError::Advertise(_))), "{bad}: {r:?}");
    }
    let ok = scene
        .resolve(&scene.file(&[]), &["--advertise=[::1]:10809".into()])
        .unwrap();
    assert_eq!(ok.advertise.as_deref(), Some("[::1]:10809"));
}

#[test]
fn busy_polling_is_off_by_default_and_bounded() {
    let vol = ["--export", "v", "--data", "/x/d", "--journal", "/x/j"];
    let poll = |us: &str| Config::from_cli(&cli(&[&vol[..], &["--busy-poll-us", us]].concat()));
    assert_eq!(Config::from_cli(&cli(&vol)).unwrap().busy_poll, None);
    assert_eq!(poll("0").unwrap().busy_poll, None);
    assert_eq!(
        poll("10000").unwrap().busy_poll,
        Some(std::time::Duration::from_millis(10))
    );
    let e = poll("10001").unwrap_err().to_string();
    assert!(
        e.contains("--busy-poll-us 10001 is too long: use at most 10000"),
        "{e}"
    );
}
