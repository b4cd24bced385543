//! `guardrail keygen`: a new Ed25519 signing key for JIT credentials.
//!
//! With `--out FILE`, writes the private JWK there (mode 0600, never over an existing file unless
//! `--force`) and prints the public JWK on stdout, one line of JSON, which is also a YAML flow
//! mapping: paste it as an item of `settings.identity.jwt[].jwks.keys` in the policy. Without
//! `--out` (`guardrail keygen > key.jwk`), the private JWK goes to stdout and the public one, for
//! the policy, to stderr.

use crate::jwk::SigningKey;
use crate::UsageError;
use anyhow::Context;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the private key (a JWK; readable by its owner only). Without it the private
    /// key goes to stdout and the public key to stderr.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Key id (`kid`); defaults to the key's RFC 7638 thumbprint.
    #[arg(long)]
    kid: Option<String>,
    /// Replace the file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(kid) = &args.kid {
        if kid.is_empty() || kid.chars().any(char::is_control) || kid.len() > 128 {
            return Err(UsageError("--kid must be 1 to 128 printable characters".into()).into());
        }
    }
    if let Some(out) = args.out.as_ref().filter(|out| out.exists() && !args.force) {
        return Err(
            UsageError(format!("{} exists; choose another --out or add --force to replace it", out.display())).into()
        );
    }
    let key = SigningKey::generate(args.kid.clone()).map_err(anyhow::Error::msg)?;
    let private = serde_json::to_string_pretty(&key.private_jwk()).context("encoding the key")?;
    let Some(path) = &args.out else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{private}").context("writing to standard output")?;
        eprintln!(
            "{}\nabove: the public key {} for the policy (settings.identity.jwt[].jwks.keys); \
             the private key went to standard output: keep it secret (`guardrail mint --key FILE`)",
            key.public_jwk(),
            key.kid
        );
        return Ok(ExitCode::SUCCESS);
    };
    write_private(path, &format!("{private}\n"), args.force)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", key.public_jwk()).context("writing to standard output")?;
    eprintln!(
        "wrote the private key {} to {} (mode 0600); add the public key above to the policy \
         under settings.identity.jwt[].jwks.keys",
        key.kid,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to a new file readable by its owner only. With `replace`, an existing file is
/// replaced atomically (written beside it, then renamed over it).
fn write_private(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    let target = if replace {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "key".into());
        path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    } else {
        path.to_path_buf()
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&target).with_context(|| format!("cannot create {}", target.display()))?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", target.display()));
    drop(file);
    let done = written.and_then(|()| {
        if replace {
            std::fs::rename(&target, path).with_context(|| format!("cannot replace {}", path.display()))
        } else {
            Ok(())
        }
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&target);
    }
    done
}
