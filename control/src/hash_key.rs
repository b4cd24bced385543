//! `guardrail hash-key`: the digest of an API key, exactly as the catalog stores it.

use crate::UsageError;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;

/// Shorter keys can be guessed, digest or not: `hash-key` warns about them (it still hashes them,
/// so that keys already handed out can be catalogued).
pub const MIN_KEY_CHARS: usize = 16;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The API key (prefer --stdin: a key on the command line stays in the shell history).
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin", allow_hyphen_values = true)]
    key: Option<String>,
    /// Read the key from standard input (one trailing newline is removed).
    #[arg(long)]
    stdin: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let key = match &args.key {
        Some(key) => key.clone(),
        None => read_stdin()?,
    };
    check_key(&key)?;
    let chars = key.chars().count();
    if chars < MIN_KEY_CHARS {
        eprintln!(
            "warning: the key is {chars} characters long; a key under {MIN_KEY_CHARS} can be guessed \
             (make new ones with e.g. `openssl rand -hex 32`)"
        );
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", digest(&key)).context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// `sha256:<64 lower-case hex>` of the key's bytes.
pub fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn read_stdin() -> anyhow::Result<String> {
    let mut stdin = std::io::stdin().lock();
    let mut bytes = Vec::new();
    if stdin.is_terminal() {
        eprint!("API key (then Enter): ");
        stdin.read_until(b'\n', &mut bytes).context("reading the key from standard input")?;
    } else {
        stdin.read_to_end(&mut bytes).context("reading the key from standard input")?;
    }
    let mut key =
        String::from_utf8(bytes).map_err(|_| UsageError("the key on standard input is not UTF-8 text".into()))?;
    if key.ends_with('\n') {
        key.pop();
        if key.ends_with('\r') {
            key.pop();
        }
    }
    Ok(key)
}

/// Refuses keys that are empty or that could never arrive intact in an HTTP header.
fn check_key(key: &str) -> Result<(), UsageError> {
    if key.is_empty() {
        return Err(UsageError("the key is empty".into()));
    }
    if key.trim() != key {
        return Err(UsageError(
            "the key starts or ends with whitespace, which HTTP strips from header values: it could never match".into(),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(UsageError(
            "the key contains control characters (a newline?), which cannot be sent in an HTTP header".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_checks() {
        let cases: &[(&str, bool, &str)] = &[
            ("", false, "empty"),
            ("short", true, "short: hashed, with a warning"),
            ("0123456789abcdef", true, "16 chars"),
            ("ééééééééééééééééé", true, "counted in characters, not bytes"),
            (" 0123456789abcdef", false, "leading space"),
            ("0123456789abcdef\n", false, "trailing newline"),
            ("0123456789\tabcdef", false, "tab inside"),
        ];
        for (key, ok, why) in cases {
            assert_eq!(check_key(key).is_ok(), *ok, "{why}: {key:?}");
        }
    }
}
