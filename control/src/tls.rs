//! TLS on the companion's gRPC channel (rustls, through tonic): `serve` with a certificate and key,
//! and, with a client CA, mutual TLS that lets only Envoys (and `status` callers) holding a
//! certificate from that CA connect; `status` as the client.
//!
//! Files are PEM. Every problem names the flag and the file: a file that cannot be read, one
//! without the expected PEM block, a key that does not belong to the certificate.

use anyhow::Context;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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
    /// The server's TLS configuration (`None`: plain text).
    pub fn config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new().identity(identity(cert, key)?);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(pem("--tls-client-ca", ca, Block::Certificate)?));
        }
        Ok(Some(config))
    }

    /// How the log describes the channel.
    pub fn describe(&self) -> &'static str {
        match (&self.tls_cert, &self.tls_client_ca) {
            (None, _) => "plain text",
            (Some(_), None) => "TLS",
            (Some(_), Some(_)) => "mutual TLS",
        }
    }
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
            config = config.identity(identity(cert, key)?);
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

#[derive(Clone, Copy)]
enum Block {
    Certificate,
    Key,
}

/// The certificate of `--tls-cert` with the key of `--tls-key`.
fn identity(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(pem("--tls-cert", cert, Block::Certificate)?, pem("--tls-key", key, Block::Key)?))
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
