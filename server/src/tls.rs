//! TLS for NBD clients and replication peers, with rustls.
//!
//! Certificates live in one directory, in the layout qemu, nbdkit and libnbd
//! share: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and an optional
//! `ca-crl.pem`. [`Material::load`] reads them once, at configuration time,
//! into the rustls configurations every connection uses.
//!
//! The data path stays the clear-text one: once a TLS session is set up, a
//! [`relay`] thread moves bytes between it and one end of a Unix socket
//! pair, and the core serves the other end exactly as it serves any Unix
//! client (io_uring reads and writes, no TLS code on the cores). kTLS would
//! save that hop, but this host's kernel has no `tls` ULP.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub mod relay;

/// The CA that signs servers and clients.
pub const CA_CERT: &str = "ca-cert.pem";
/// This node's certificate (also its client certificate towards peers).
pub const SERVER_CERT: &str = "server-cert.pem";
/// Its key.
pub const SERVER_KEY: &str = "server-key.pem";
/// Revoked certificates (optional).
pub const CA_CRL: &str = "ca-crl.pem";

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("TLS certificates: {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match its
    /// certificate, a CRL it cannot parse, …).
    #[error("TLS certificates in {}: {reason}", dir.display())]
    Config {
        /// The directory.
        dir: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// The loaded certificates and the rustls configurations built from them.
#[derive(Clone)]
pub struct Material {
    /// Where they came from (shown in logs and `config check`).
    pub dir: PathBuf,
    /// NBD clients must present a certificate (`--tls-verify-peer`).
    pub verify_peer: bool,
    /// For NBD clients: a client certificate is asked for only with
    /// `--tls-verify-peer`.
    pub nbd: Arc<ServerConfig>,
    /// For replication peers that connect here: a certificate signed by the
    /// CA is required.
    pub peer_server: Arc<ServerConfig>,
    /// For connecting to a replication peer: presents this node's
    /// certificate and checks the peer's against the CA.
    pub peer_client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

/// Two loads of the same directory with the same verification are the
/// same configuration.
impl PartialEq for Material {
    fn eq(&self, other: &Material) -> bool {
        self.dir == other.dir && self.verify_peer == other.verify_peer
    }
}

impl Eq for Material {}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in it"));
    }
    Ok(certs)
}

fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join(CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .map_err(|e| file_error(&path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&path, e))
}

impl Material {
    /// Reads `dir`; `verify_peer` makes NBD clients present a certificate
    /// signed by the CA.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<Material, TlsError> {
        // ring, not aws-lc-rs (no cmake or NASM build); rustls 0.23.48
        // deprecates it only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_error = |e: &dyn std::fmt::Display| TlsError::Config {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        let ca_path = dir.join(CA_CERT);
        for ca in certs(&ca_path)? {
            roots.add(ca).map_err(|e| file_error(&ca_path, e))?;
        }
        let roots = Arc::new(roots);
        let crls = crls(dir)?;
        let chain = certs(&dir.join(SERVER_CERT))?;
        let key_path = dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_error(&key_path, e))?;

        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .build()
            .map_err(|e| config_error(&e))?;
        let server = |verify: bool| -> Result<Arc<ServerConfig>, TlsError> {
            let b = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| config_error(&e))?;
            let b = if verify {
                b.with_client_cert_verifier(clients.clone())
            } else {
                b.with_no_client_auth()
            };
            let cfg = b
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| config_error(&e))?;
            Ok(Arc::new(cfg))
        };
        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .with_crls(crls)
        .build()
        .map_err(|e| config_error(&e))?;
        let peer_client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&e))?
            .with_webpki_verifier(servers)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| config_error(&e))?;
        Ok(Material {
            dir: dir.to_path_buf(),
            verify_peer,
            nbd: server(verify_peer)?,
            peer_server: server(true)?,
            peer_client: Arc::new(peer_client),
        })
    }
}

/// A byte stream with a descriptor: what TLS runs over and the relay polls.
pub trait Transport: Read + Write + AsFd + Send + 'static {
    /// Blocking mode with `t` as read and write timeout (None: no timeout),
    /// or non-blocking.
    fn set_blocking(&self, blocking: bool, t: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down.
    fn shutdown_both(&self);
}

impl Transport for std::net::TcpStream {
    fn set_blocking(&self, blocking: bool, t: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(!blocking)?;
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for std::os::unix::net::UnixStream {
    fn set_blocking(&self, blocking: bool, t: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(!blocking)?;
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// Runs a TLS handshake to its end over a blocking `sock` (its timeouts
/// bound it).
pub fn complete_handshake<S: Transport>(
    conn: &mut rustls::Connection,
    sock: &mut S,
) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    // Flush what the handshake left queued (TLS 1.3 session tickets).
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// A TLS session over a blocking socket during a negotiation (the NBD
/// handshake, the replication HELLO).
pub struct Session<S: Transport> {
    /// The rustls state.
    pub conn: rustls::Connection,
    /// The socket.
    pub sock: S,
}

impl<S: Transport> Session<S> {
    /// Accepts a TLS client on `sock` with `config`.
    pub fn accept(config: Arc<ServerConfig>, mut sock: S) -> io::Result<Session<S>> {
        let server = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut conn = rustls::Connection::Server(server);
        complete_handshake(&mut conn, &mut sock)?;
        Ok(Session { conn, sock })
    }

    /// Connects as a TLS client on `sock`, expecting `name` in the server's
    /// certificate.
    pub fn connect(
        config: Arc<ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        mut sock: S,
    ) -> io::Result<Session<S>> {
        let client = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut conn = rustls::Connection::Client(client);
        complete_handshake(&mut conn, &mut sock)?;
        Ok(Session { conn, sock })
    }

    /// Hands the session to a relay thread; the returned Unix socket carries
    /// its clear text.
    pub fn into_relay(self, peer: &str) -> io::Result<std::os::unix::net::UnixStream> {
        relay::spawn(self.conn, self.sock, peer)
    }
}

impl<S: Transport> Read for Session<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl<S: Transport> Write for Session<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}
