//! `mirrorblk certs init DIR`: a CA and the certificates signed by it, in
//! the layout mirrorblkd (`--tls-certificates`), qemu (`tls-creds-x509`),
//! nbdkit and libnbd (`tls-certificates=DIR`) all read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Files `init` writes, with their modes: keys are readable by their owner
/// only.
const FILES: [(&str, u32); 6] = [
    ("ca-cert.pem", 0o644),
    ("ca-key.pem", 0o600),
    ("server-cert.pem", 0o644),
    ("server-key.pem", 0o600),
    ("client-cert.pem", 0o644),
    ("client-key.pem", 0o600),
];

/// What `init` makes.
pub struct InitArgs<'a> {
    /// The directory.
    pub dir: &'a Path,
    /// Names and addresses the server certificate is valid for.
    pub hosts: &'a [String],
    /// Validity in days.
    pub days: u32,
    /// Replace existing files.
    pub force: bool,
}

/// Writes the CA, server and client certificates; exit status 1 with a
/// sentence on failure.
pub fn init(a: &InitArgs) -> ExitCode {
    match write_all(a) {
        Ok(()) => {
            println!(
                "wrote a CA, a server and a client certificate to {}:\n  \
                 mirrorblkd ... --tls require --tls-certificates {dir}\n  \
                 nbdinfo 'nbds://HOST:10809/vol0?tls-certificates={dir}'\n\
                 server-cert.pem names: {}; every node may use it (it is also the\n\
                 client certificate of --replication-tls). Keep ca-key.pem offline.",
                a.dir.display(),
                a.hosts.join(", "),
                dir = a.dir.display(),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrorblk: certs init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn write_all(a: &InitArgs) -> Result<(), String> {
    std::fs::create_dir_all(a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    if !a.force {
        if let Some((f, _)) = FILES.iter().find(|(f, _)| a.dir.join(f).exists()) {
            return Err(format!(
                "{} exists; give --force to replace the certificates in {}",
                a.dir.join(f).display(),
                a.dir.display()
            ));
        }
    }
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(err)?;
    let until = now + std::time::Duration::from_secs(u64::from(a.days) * 86_400);
    // Tolerate clocks a little behind the one that made the certificates.
    let from = now - std::time::Duration::from_secs(3600);

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name = name("mirrorblk CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (from, until);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(err)?;

    let leaf = |cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
        let mut p = CertificateParams::new(sans).map_err(err)?;
        p.distinguished_name = name(cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = usages;
        (p.not_before, p.not_after) = (from, until);
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca).map_err(err)?;
        Ok::<_, String>((cert.pem(), key.serialize_pem()))
    };
    // The server certificate also authenticates a node to its replication
    // peers, as a client.
    let server = leaf(
        a.hosts.first().map_or("mirrorblk", |h| h.as_str()),
        a.hosts.to_vec(),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let client = leaf(
        "mirrorblk client",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let contents = [ca.pem(), ca_pem, server.0, server.1, client.0, client.1];
    for ((file, mode), text) in FILES.iter().zip(contents) {
        write_file(&a.dir.join(file), *mode, &text)?;
    }
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "mirrorblk");
    dn
}

fn write_file(path: &Path, mode: u32, text: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The names `certs init` puts in the server certificate when `--hosts`
/// is not given: loopback and this host's name.
pub fn default_hosts() -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str().filter(|h| !h.is_empty() && *h != "localhost") {
            hosts.push(h.to_string());
        }
    }
    hosts
}
