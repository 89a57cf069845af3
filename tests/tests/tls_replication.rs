//! Replication over mutual TLS (`--replication-tls`): a failover under fio
//! load with every link inside TLS, and a primary whose certificate another
//! CA signed, an expired or a revoked one, or none at all, refused before
//! any record flows, with a log line and a `peer-auth-failed` event.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mirrorblk_admin::{ReplicaState, Role};
use mirrorblk_tests::cluster::{
    assert_stores_identical, certs_init, pick_port, view_of, write_secret, Node, NodeFiles, EXPORT,
};
use mirrorblk_tests::daemon::Daemon;
use mirrorblk_tests::tools::{self, Tool};
use mirrorblk_tests::util::poll_until;
use mirrorblk_tests::TestDir;

const J64: &str = "64M";

/// `--replication-tls --tls-certificates DIR`.
fn tls_flags(certs: &Path) -> Vec<String> {
    vec![
        "--replication-tls".into(),
        "--tls-certificates".into(),
        certs.display().to_string(),
        "--heartbeat-timeout".into(),
        "2s".into(),
    ]
}

/// A node of a two-node cluster in which each knows the other; `primary`
/// sets its role, else it starts as replica.
fn start(dir: &TestDir, i: usize, addrs: &[SocketAddr; 2], primary: bool, tls: &[String]) -> Node {
    let names = ["n1", "n2"];
    let secret = dir.join("secret");
    if !secret.exists() {
        write_secret(dir, "secret");
    }
    let files = NodeFiles::new(dir, names[i]);
    let peer = format!("{}={}", names[1 - i], addrs[1 - i]);
    let mut extra: Vec<String> = tls.to_vec();
    extra.extend(["--mode".into(), "sync".into()]);
    let args = if primary {
        extra.extend(["--replication-listen".to_string(), addrs[i].to_string()]);
        let e: Vec<&str> = extra.iter().map(String::as_str).collect();
        files.primary_args(&secret, &[peer], J64, &e)
    } else {
        extra.extend(["--peer".to_string(), peer]);
        let e: Vec<&str> = extra.iter().map(String::as_str).collect();
        files.replica_args(&secret, addrs[i], J64, &e)
    };
    let daemon =
        Daemon::try_start(args).unwrap_or_else(|e| panic!("{} did not start: {e}", names[i]));
    Node {
        files,
        daemon,
        replication: Some(addrs[i]),
    }
}

fn addrs() -> [SocketAddr; 2] {
    [
        ([127, 0, 0, 1], pick_port()).into(),
        ([127, 0, 0, 1], pick_port()).into(),
    ]
}

/// fio writing to `node` for `secs` seconds (crc32c-stamped blocks).
fn fio_load(node: &Node, secs: u32) -> tools::Background {
    tools::spawn(
        Tool::Fio,
        [
            "--name=load".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={}", node.daemon.uri(EXPORT)),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--size=32m".into(),
            "--iodepth=16".into(),
            "--time_based".into(),
            format!("--runtime={secs}"),
        ],
    )
}

/// Two nodes replicating over mutual TLS in sync mode under fio: the
/// primary is killed with -9, the replica promoted (it serves), the old
/// primary comes back as its replica and is resynced over TLS; `mirrorblk
/// verify` and a byte comparison agree, and no link was refused.
#[test]
fn replication_over_mutual_tls_survives_a_failover_under_load() {
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let tls = tls_flags(&certs);
    let addrs = addrs();
    let mut n2 = start(&dir, 1, &addrs, false, &tls);
    let mut n1 = start(&dir, 0, &addrs, true, &tls);
    n1.wait_replicas_in_sync(Duration::from_secs(30));

    let load = fio_load(&n1, 30);
    std::thread::sleep(Duration::from_secs(3));
    n1.wait_status(Duration::from_secs(10), "writes replicated", |s| {
        s.last_lsn > 100 && view_of(s, "n2").state == ReplicaState::InSync
    });
    n1.daemon.kill9();
    let _ = load.wait(Duration::from_secs(60));

    let before = n2.daemon.ready().clone();
    let out = n2.cli(&["promote"], Duration::from_secs(30));
    assert_eq!(out.code, 0, "mirrorblk promote failed: {out:#?}");
    n2.daemon
        .wait_serving_again(&before, Duration::from_secs(30));
    n2.wait_status(Duration::from_secs(30), "n2 primary", |s| {
        s.role == Role::Primary && s.epoch == 2
    });
    let load = fio_load(&n2, 4);

    // n1 returns without --role: demoted by n2 over TLS, and resynced.
    let args: Vec<std::ffi::OsString> = {
        let mut out = Vec::new();
        let mut it = n1.daemon.args().iter();
        while let Some(a) = it.next() {
            if a == "--role" {
                it.next();
            } else {
                out.push(a.clone());
            }
        }
        out
    };
    n1.daemon.restart_with(args);
    let fio = load.wait(Duration::from_secs(60));
    assert!(fio.success(), "fio against the promoted n2: {fio}");
    n2.wait_status(Duration::from_secs(60), "n1 resynced by n2", |s| {
        let v = view_of(s, "n1");
        v.state == ReplicaState::InSync && v.resync.is_none() && v.out_of_sync_bytes == 0
    });
    let v = n2.cli(&["verify"], Duration::from_secs(60));
    assert_eq!(v.code, 0, "verify after the failover: {v:#?}");
    // A connection cut by the kill may fail its handshake; none may fail
    // for its certificate.
    for n in [&n1, &n2] {
        let refused: Vec<String> = n
            .log_lines_with("TLS handshake")
            .into_iter()
            .filter(|l| l.contains("certificate") || l.contains("alert"))
            .collect();
        assert!(
            refused.is_empty(),
            "{}: a link was refused: {refused:#?}",
            n.name()
        );
    }
    n2.stop();
    n1.stop();
    assert_stores_identical(&[&n1, &n2]);
}

/// A TLS replica refuses primaries with a certificate from another CA and
/// with none (clear text): each is
/// logged and recorded as `peer-auth-failed`, no record reaches the replica
/// (its journal stays empty), and the primary never counts it in sync.
#[test]
fn a_replica_refuses_a_primary_with_a_wrong_certificate() {
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let other = dir.join("other");
    certs_init(&other, &[]);
    let addrs = addrs();
    let n2 = start(&dir, 1, &addrs, false, &tls_flags(&certs));
    let cases: [(&str, Vec<String>); 2] = [
        ("another CA", tls_flags(&other)),
        (
            "no certificate (clear text)",
            vec!["--heartbeat-timeout".into(), "2s".into()],
        ),
    ];
    let lsn = n2.status().last_lsn;
    for (what, flags) in cases {
        let refused_before = n2.log_lines_with("TLS handshake").len();
        let mut n1 = start(&dir, 0, &addrs, true, &flags);
        poll_until(Duration::from_secs(20), "n2 refuses n1", || {
            (n2.log_lines_with("TLS handshake").len() > refused_before).then_some(())
        });
        let s = n1.status();
        assert_ne!(
            view_of(&s, "n2").state,
            ReplicaState::InSync,
            "{what}: the primary counts n2 in sync"
        );
        assert_eq!(n2.status().last_lsn, lsn, "{what}: a record reached n2");
        n1.daemon.kill9();
    }
    let events = std::fs::read_to_string(n2.files.journal.with_extension("journal.events.jsonl"))
        .unwrap_or_default();
    assert!(
        events.matches("peer-auth-failed").count() >= 2,
        "no peer-auth-failed events on n2:\n{events}"
    );
}

/// One CA (with a CRL) and three node certificates for 127.0.0.1 in
/// `good/`, `expired/` and `revoked/`, each a `--tls-certificates` directory:
/// valid; valid only in 2020; revoked in `ca-crl.pem` (every directory has
/// the CRL).
fn pki_with_bad_certificates(root: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        ExtendedKeyUsagePurpose as Eku, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevocationReason, RevokedCertParams, SerialNumber,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |serial: u64, expired: bool| {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, &ca).unwrap().pem(), key.serialize_pem())
    };
    let crl = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2100, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(3u64),
            revocation_time: rcgen::date_time_ymd(2024, 1, 1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca)
    .unwrap()
    .pem()
    .unwrap();
    for (name, (cert, key)) in [
        ("good", leaf(1, false)),
        ("expired", leaf(2, true)),
        ("revoked", leaf(3, false)),
    ] {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), ca.pem()).unwrap();
        std::fs::write(d.join("ca-crl.pem"), &crl).unwrap();
        std::fs::write(d.join("server-cert.pem"), cert).unwrap();
        std::fs::write(d.join("server-key.pem"), key).unwrap();
    }
}

/// A replica whose CA signed the primary's certificate still refuses it
/// when that certificate has expired or is revoked in the CA's CRL: logged,
/// recorded as `peer-auth-failed`, and no record reaches the replica; the
/// same CA's valid certificate is accepted.
#[test]
fn a_replica_refuses_an_expired_or_revoked_certificate() {
    let dir = TestDir::new();
    let pki = dir.join("pki");
    pki_with_bad_certificates(&pki);
    let addrs = addrs();
    let n2 = start(&dir, 1, &addrs, false, &tls_flags(&pki.join("good")));
    let lsn = n2.status().last_lsn;
    for bad in ["expired", "revoked"] {
        let refused_before = n2.log_lines_with("TLS handshake").len();
        let mut n1 = start(&dir, 0, &addrs, true, &tls_flags(&pki.join(bad)));
        poll_until(Duration::from_secs(20), "n2 refuses n1", || {
            (n2.log_lines_with("TLS handshake").len() > refused_before).then_some(())
        });
        assert_eq!(n2.status().last_lsn, lsn, "{bad}: a record reached n2");
        assert_ne!(
            view_of(&n1.status(), "n2").state,
            ReplicaState::InSync,
            "{bad}: in sync"
        );
        n1.daemon.kill9();
    }
    let events = std::fs::read_to_string(n2.files.journal.with_extension("journal.events.jsonl"))
        .unwrap_or_default();
    assert!(events.matches("peer-auth-failed").count() >= 2, "{events}");
    let n1 = start(&dir, 0, &addrs, true, &tls_flags(&pki.join("good")));
    n1.wait_replicas_in_sync(Duration::from_secs(30));
}
