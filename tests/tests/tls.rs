//! NBD over TLS with real clients: certificates from `mirrorblk certs
//! init`, libnbd (nbdinfo, nbdcopy, fio's nbd engine) over `nbds://`, qemu-io
//! and qemu-img with `tls-creds-x509`; `--tls require` refusing clear text
//! option by option; `--tls-verify-peer` refusing a client certificate from
//! another CA (or none).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use mirrorblk_tests::cluster::certs_init;
use mirrorblk_tests::daemon::args;
use mirrorblk_tests::tools::{self, Tool, TOOL_TIMEOUT};
use mirrorblk_tests::util::{Rng, MIB};
use mirrorblk_tests::{Daemon, TestDir};

/// A daemon serving vol0 (64M) with `--tls MODE --tls-certificates DIR` and
/// `extra` flags.
fn tls_daemon(dir: &TestDir, mode: &str, certs: &Path, extra: &[&str]) -> Daemon {
    let mut a = dir.volume_args("vol0", "64M");
    a.extend(args(["--tls", mode, "--tls-certificates"]));
    a.push(certs.into());
    a.extend(args(extra));
    Daemon::start(a)
}

fn nbds(d: &Daemon, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/vol0?tls-certificates={}",
        d.port(),
        certs.display()
    )
}

/// qemu-io over TLS: `--object tls-creds-x509` with the client certificate.
fn qemu_io_tls(d: &Daemon, certs: &Path, commands: &[String]) -> tools::ToolOutput {
    let mut a = vec![
        "--object".to_string(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        ),
        "--image-opts".into(),
    ];
    for c in commands {
        a.extend(["-c".to_string(), c.clone()]);
    }
    a.push(format!(
        "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
        d.port()
    ));
    tools::run(Tool::QemuIo, a, TOOL_TIMEOUT)
}

/// Every client over TLS, each reading what another wrote: nbdcopy in,
/// qemu-img compare (tls-creds-x509), qemu-io writes, fio with crc32c
/// verify through libnbd's nbds:// (without server verification: libnbd
/// lets fio give no certificate path), nbdcopy out byte-identical to the
/// model.
#[test]
fn tls_clients_read_back_what_others_wrote() {
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let d = tls_daemon(&dir, "require", &certs, &[]);
    let uri = nbds(&d, &certs);

    let mut model = vec![0u8; (64 * MIB) as usize];
    Rng::new(16).fill(&mut model[..(8 * MIB) as usize]);
    model[(40 * MIB) as usize..(40 * MIB + 65536) as usize].fill(0xab);
    let src = dir.join("src.img");
    std::fs::write(&src, &model).unwrap();
    tools::run(Tool::NbdCopy, [src.to_str().unwrap(), &uri], TOOL_TIMEOUT).expect_success();

    let info = tools::nbdinfo_json(&uri);
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["TLS"], true, "{info:#}");

    let o = qemu_io_tls(
        &d,
        &certs,
        &[
            format!("read -P 0xab {} 65536", 40 * MIB),
            format!("write -P 0x5c {} 131072", 50 * MIB),
            format!("read -P 0x5c {} 131072", 50 * MIB),
        ],
    );
    assert!(o.success() && !o.combined().contains("failed"), "{o}");
    model[(50 * MIB) as usize..(50 * MIB + 131072) as usize].fill(0x5c);
    std::fs::write(&src, &model).unwrap();
    let cmp = tools::run(
        Tool::QemuImg,
        [
            "compare".to_string(),
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                certs.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
                d.port()
            ),
            format!("driver=file,filename={}", src.display()),
        ],
        TOOL_TIMEOUT,
    );
    assert!(cmp.success(), "qemu-img compare over TLS: {cmp}");

    let fio_out = dir.join("fio.json");
    let fio = tools::run(
        Tool::Fio,
        [
            "--name=tls".to_string(),
            "--ioengine=nbd".into(),
            // libnbd refuses a certificates path in a URI that fio passes
            // (nbd_set_uri_allow_local_file); without one it can only skip
            // verifying the server: encrypted, unauthenticated.
            format!(
                "--uri=nbds://127.0.0.1:{}/vol0?tls-verify-peer=false",
                d.port()
            ),
            "--rw=randwrite".into(),
            "--bsrange=4k-64k".into(),
            format!("--offset={}", 56 * MIB),
            "--size=8m".into(),
            "--iodepth=16".into(),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--verify_fatal=1".into(),
            "--verify_state_save=0".into(),
            "--output-format=json".into(),
            format!("--output={}", fio_out.display()),
        ],
        TOOL_TIMEOUT,
    );
    let text = std::fs::read_to_string(&fio_out).unwrap_or_default();
    assert!(fio.success(), "fio over nbds:// failed: {fio}\n{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("fio JSON");
    assert_eq!(v["jobs"][0]["error"].as_i64(), Some(0), "{text}");

    // Everything but fio's region reads back as the model says.
    let out = dir.join("out.img");
    tools::run(Tool::NbdCopy, [&uri, out.to_str().unwrap()], TOOL_TIMEOUT).expect_success();
    let got = std::fs::read(&out).unwrap();
    let end = (56 * MIB) as usize;
    assert!(
        got[..end] == model[..end],
        "nbdcopy out differs from the model"
    );
}

/// One option request, raw.
fn option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&nbd::consts::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// One option reply: (option, type, data).
fn reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("an option reply");
    let word = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut data = vec![0u8; word(16) as usize];
    s.read_exact(&mut data).unwrap();
    (word(8), word(12), data)
}

/// `--tls require` against a clear-text client, byte by byte: every option
/// (structured replies, list, info, go, meta contexts) is answered
/// NBD_REP_ERR_TLS_REQD, and EXPORT_NAME ends the connection without an
/// export; libnbd's nbd:// is refused. The same daemon serves nbds://.
#[test]
fn require_refuses_every_clear_text_option() {
    use nbd::consts;
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let d = tls_daemon(&dir, "require", &certs, &[]);

    let mut s = d.tcp();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(consts::FLAG_C_FIXED_NEWSTYLE | consts::FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"vol0");
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut meta = Vec::new();
    meta.extend_from_slice(&4u32.to_be_bytes());
    meta.extend_from_slice(b"vol0");
    meta.extend_from_slice(&0u32.to_be_bytes());
    let opts: [(u32, &[u8]); 6] = [
        (consts::OPT_STRUCTURED_REPLY, &[]),
        (consts::OPT_LIST, &[]),
        (consts::OPT_LIST_META_CONTEXT, &meta),
        (consts::OPT_SET_META_CONTEXT, &meta),
        (consts::OPT_INFO, &go),
        (consts::OPT_GO, &go),
    ];
    for (opt, data) in opts {
        option(&mut s, opt, data);
        let (o, ty, msg) = reply(&mut s);
        assert_eq!(o, opt);
        assert_eq!(
            ty,
            consts::REP_ERR_TLS_REQD,
            "option {opt}: reply type {ty:#x} ({})",
            String::from_utf8_lossy(&msg)
        );
    }
    option(&mut s, consts::OPT_EXPORT_NAME, b"vol0");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "EXPORT_NAME before TLS got {n} bytes: {rest:?}");

    let clear = tools::run(Tool::NbdInfo, [d.uri("vol0")], TOOL_TIMEOUT);
    assert!(!clear.success(), "nbdinfo nbd:// was served: {clear}");
    tools::run(Tool::NbdInfo, [nbds(&d, &certs)], TOOL_TIMEOUT).expect_success();
}

/// `--tls on` serves both kinds of client.
#[test]
fn tls_on_serves_clear_text_and_tls() {
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let d = tls_daemon(&dir, "on", &certs, &[]);
    let clear = tools::nbdinfo_json(&d.uri("vol0"));
    assert_eq!(clear["TLS"], false, "{clear:#}");
    let tls = tools::nbdinfo_json(&nbds(&d, &certs));
    assert_eq!(tls["TLS"], true, "{tls:#}");
}

/// `--tls-verify-peer`: a client certificate from another CA, or none, is
/// refused at the TLS handshake; the CA's own client certificate works.
#[test]
fn verify_peer_refuses_a_client_certificate_from_another_ca() {
    let dir = TestDir::new();
    let certs = dir.join("pki");
    certs_init(&certs, &[]);
    let d = tls_daemon(&dir, "require", &certs, &["--tls-verify-peer"]);

    // Trusts the server's CA but presents a certificate another CA signed.
    let other = dir.join("other");
    certs_init(&other, &[]);
    let foreign = dir.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), foreign.join(f)).unwrap();
    }
    // Trusts the server's CA and presents nothing.
    let anonymous = dir.join("anonymous");
    std::fs::create_dir(&anonymous).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();

    for refused in [&foreign, &anonymous] {
        let o = tools::run(Tool::NbdInfo, [nbds(&d, refused)], TOOL_TIMEOUT);
        assert!(!o.success(), "{} was served: {o}", refused.display());
        let o = qemu_io_tls(&d, refused, &["read 0 4k".to_string()]);
        assert!(
            !o.success() || o.combined().contains("failed"),
            "qemu-io with {} was served: {o}",
            refused.display()
        );
    }
    let log = d.log();
    assert!(
        log.contains("TLS handshake"),
        "no refusal in the log:\n{log}"
    );
    tools::run(Tool::NbdInfo, [nbds(&d, &certs)], TOOL_TIMEOUT).expect_success();
    let o = qemu_io_tls(&d, &certs, &["read -P 0 0 4k".to_string()]);
    assert!(o.success() && !o.combined().contains("failed"), "{o}");
}
