//! TLS on the companion's gRPC channel (rustls): `serve` with a certificate and key, and, with a
//! client CA, mutual TLS that lets only Envoys (and `status` callers) holding a certificate from
//! that CA connect; `status` as the client (through tonic). The server's files are read again when
//! they change ([`ServerTls`]), so a renewed certificate needs no restart.
//!
//! Files are PEM. Every problem names the flag and the file: a file that cannot be read, one
//! without the expected PEM block, a key that does not belong to the certificate.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// `serve`'s TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// Serve over TLS with this PEM certificate (chain), with --tls-key. Envoy's
    /// `guardrail_control` cluster then needs a TLS transport socket (README "Companion TLS").
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients presenting a certificate signed by a CA in this PEM file.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerArgs {
    /// The server's TLS (`None`: plain text), read from the files now; see [`ServerTls`].
    pub fn server_tls(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        ServerTls::of(&self.tls_cert, &self.tls_key, &self.tls_client_ca, &GRPC)
    }

    /// How the log describes the channel.
    pub fn describe(&self) -> &'static str {
        describe(&self.tls_cert, &self.tls_client_ca)
    }
}

/// `serve`'s TLS flags for the HTTP port (`--http`: console, JSON API, token service, `/metrics`),
/// apart from the gRPC port's: the Envoys' CA and the people's (approvers, app builders) are
/// seldom the same.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpServerArgs {
    /// Serve the --http port over TLS (HTTPS) with this PEM certificate (chain), with --http-tls-key.
    #[arg(long, value_name = "FILE", requires = "http_tls_key", requires = "http")]
    pub http_tls_cert: Option<PathBuf>,
    /// The PEM private key of --http-tls-cert.
    #[arg(long, value_name = "FILE", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Mutual TLS on the --http port: every connection (health checks included) must present a
    /// client certificate signed by a CA in this PEM file; approvers listed by `certificate:` act
    /// with it.
    #[arg(long, value_name = "FILE", requires = "http_tls_cert")]
    pub http_client_ca: Option<PathBuf>,
}

impl HttpServerArgs {
    /// The HTTP port's TLS (`None`: plain text), read from the files now; see [`ServerTls`].
    pub fn server_tls(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        ServerTls::of(&self.http_tls_cert, &self.http_tls_key, &self.http_client_ca, &HTTP)
    }

    /// How the log describes the port.
    pub fn describe(&self) -> &'static str {
        describe(&self.http_tls_cert, &self.http_client_ca)
    }
}

fn describe(cert: &Option<PathBuf>, client_ca: &Option<PathBuf>) -> &'static str {
    match (cert, client_ca) {
        (None, _) => "plain text",
        (Some(_), None) => "TLS",
        (Some(_), Some(_)) => "mutual TLS",
    }
}

/// Which port a [`ServerTls`] is for: the flags its errors name and the protocol it offers.
pub struct Port {
    cert: &'static str,
    key: &'static str,
    client_ca: &'static str,
    /// ALPN: HTTP/2 for gRPC, HTTP/1.1 for the console (its server speaks only that).
    alpn: &'static [u8],
}

const GRPC: Port = Port { cert: "--tls-cert", key: "--tls-key", client_ca: "--tls-client-ca", alpn: b"h2" };
const HTTP: Port =
    Port { cert: "--http-tls-cert", key: "--http-tls-key", client_ca: "--http-client-ca", alpn: b"http/1.1" };

/// The companion's TLS configuration, rebuilt from its files when one of them changes (a renewed
/// certificate, a rotated client CA) so that new connections get it without a restart; streams
/// already open keep the session they have. A change that does not make a usable configuration
/// (a half-written file, a key that is not the certificate's) is refused with an error and the
/// configuration in force stays.
pub struct ServerTls {
    files: Files,
    /// What the files looked like when last read, and the configuration in force.
    state: Mutex<(Stamp, Arc<ServerConfig>)>,
}

/// Outcome of [`ServerTls::reload_if_changed`].
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    /// The files changed and the new configuration is in force.
    Reloaded,
    /// The files changed but do not make a usable configuration (why); the old one stays.
    Refused(String),
}

impl ServerTls {
    fn of(
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
        client_ca: &Option<PathBuf>,
        port: &'static Port,
    ) -> anyhow::Result<Option<Arc<ServerTls>>> {
        let (Some(cert), Some(key)) = (cert, key) else {
            return Ok(None);
        };
        let files = Files { cert: cert.clone(), key: key.clone(), client_ca: client_ca.clone(), port };
        let stamp = files.stamp();
        let config = files.server_config()?;
        Ok(Some(Arc::new(ServerTls { files, state: Mutex::new((stamp, Arc::new(config))) })))
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.lock().1)
    }

    /// Reads the files again if their size or modification time changed since the last look.
    pub fn reload_if_changed(&self) -> Reload {
        let stamp = self.files.stamp();
        if stamp == self.lock().0 {
            return Reload::Unchanged;
        }
        // Read outside the lock; a change meanwhile is seen by the next look.
        let built = self.files.server_config();
        let mut state = self.lock();
        state.0 = stamp;
        match built {
            Ok(config) => {
                state.1 = Arc::new(config);
                Reload::Reloaded
            }
            Err(e) => Reload::Refused(format!("{e:#}")),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Stamp, Arc<ServerConfig>)> {
        // A panic while holding it cannot leave the pair half-updated: recover the guard.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Size and modification time of each file (`None`: cannot be read).
type Stamp = Vec<Option<(u64, Option<SystemTime>)>>;

struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    port: &'static Port,
}

impl Files {
    fn stamp(&self) -> Stamp {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok())))
            .collect()
    }

    /// rustls's configuration from the files, as tonic would make it (the port's protocol by
    /// ALPN; with a client CA, a client certificate from it is required), naming the flag and file
    /// of any problem.
    fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let flags = self.port;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the TLS library refused its default protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(flags.client_ca, ca)? {
                    roots.add(cert).with_context(|| {
                        format!("{} {}: not a usable CA certificate", flags.client_ca, ca.display())
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .with_context(|| format!("{} {}: not usable to verify clients", flags.client_ca, ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let chain = certificates(flags.cert, &self.cert)?;
        let key = private_key(flags.key, &self.key)?;
        let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => anyhow::anyhow!(
                "{} {}: not the private key of the certificate in {} {}",
                flags.key,
                self.key.display(),
                flags.cert,
                self.cert.display()
            ),
            e => anyhow::anyhow!(
                "{} {} / {} {}: not usable for TLS: {e}",
                flags.cert,
                self.cert.display(),
                flags.key,
                self.key.display()
            ),
        })?;
        config.alpn_protocols = vec![flags.alpn.to_vec()];
        Ok(config)
    }
}

/// The certificates of a PEM file (at least one).
fn certificates(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    parse_certificates(flag, path, &certificate_pem(flag, path)?)
}

fn parse_certificates(flag: &str, path: &Path, bytes: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {}: not a valid PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {}: holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The PEM file of `flag`, checked to hold valid certificates (at least one).
pub fn certificate_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = pem(flag, path, Block::Certificate)?;
    parse_certificates(flag, path, &bytes)?;
    Ok(bytes)
}

fn private_key(flag: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    parse_private_key(flag, path, &pem(flag, path, Block::Key)?)
}

fn parse_private_key(flag: &str, path: &Path, bytes: &[u8]) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(bytes)
        .map_err(|e| anyhow::anyhow!("{flag} {}: not a valid PEM private key: {e}", path.display()))
}

/// The PEM file of `flag`, checked to hold a valid private key.
pub fn private_key_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = pem(flag, path, Block::Key)?;
    parse_private_key(flag, path, &bytes)?;
    Ok(bytes)
}

/// `status`'s TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// Connect over TLS, trusting the companion's certificate if this PEM CA signed it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: present this PEM certificate (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the companion's certificate must carry, when it is not the host of --server.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl ClientArgs {
    /// The client's TLS configuration (`None`: plain text).
    pub fn config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem("--tls-ca", ca, Block::Certificate)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(
                pem("--tls-cert", cert, Block::Certificate)?,
                pem("--tls-key", key, Block::Key)?,
            ));
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

impl ClientArgs {
    /// rustls's client configuration for an HTTP/1.1 client (the self-service CLI): the companion
    /// is trusted if --tls-ca signed its certificate; with --tls-cert, that certificate is
    /// presented (mutual TLS). `None` without --tls-ca.
    pub fn http_config(&self) -> anyhow::Result<Option<rustls::ClientConfig>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        for cert in certificates("--tls-ca", ca)? {
            roots.add(cert).with_context(|| format!("--tls-ca {}: not a usable CA certificate", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the TLS library refused its default protocol versions")?
            .with_root_certificates(roots);
        let mut config = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates("--tls-cert", cert)?, private_key("--tls-key", key)?)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--tls-cert {} / --tls-key {}: not usable for TLS: {e}",
                        cert.display(),
                        key.display()
                    )
                })?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(config))
    }
}

/// The SHA-256 of a certificate's DER, as `settings.approvers[].certificate` lists it
/// (`openssl x509 -in CERT -outform der | sha256sum`).
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert.as_ref()).into()
}

#[derive(Clone, Copy)]
enum Block {
    Certificate,
    Key,
}

/// The PEM file of `flag`, if it holds the expected kind of block.
fn pem(flag: &str, path: &Path, block: Block) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}: cannot read the file", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let (found, wanted) = match block {
        Block::Certificate => {
            (text.contains("-----BEGIN CERTIFICATE-----"), "PEM certificate (-----BEGIN CERTIFICATE-----)")
        }
        // PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`).
        Block::Key => (
            text.lines().any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")),
            "PEM private key (-----BEGIN PRIVATE KEY-----)",
        ),
    };
    if !found {
        anyhow::bail!("{flag} {}: holds no {wanted}", path.display());
    }
    Ok(bytes)
}
