//! `guardrail check` and `guardrail export`: validate a policy, then report or print it; and
//! [`load`], how every command reads the policy it is given.

use crate::serve::watch::Source;
use anyhow::Context;
use guardrail_core::source::Document;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let Some((file, doc)) = load_or_report(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let p = &doc.policy;
    let revision = if p.revision.is_empty() { "unset" } else { p.revision.as_str() };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ok: {} (revision {revision}, {}, {}, {})",
        file.display(),
        counted(p.apps.len(), "app"),
        counted(p.datasets.len(), "dataset"),
        counted(p.rules.len(), "rule")
    )
    .context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// `1 rule`, `2 rules`, `0 rules`.
fn counted(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

pub fn export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let Some((_, doc)) = load_or_report(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", doc.canonical).context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// Reads and validates the policy at `path` exactly as `guardrail serve --policy` does: a file, or
/// a directory holding one policy file (see [`Source`]). Returns the file read and its document,
/// or the errors as display lines (`file:line: path: message`).
pub fn load(path: &Path) -> Result<(PathBuf, Document), Vec<String>> {
    Source::new(path).load().map(|(file, _, doc)| (file, doc))
}

/// [`load`], printing every error to stderr, one per line.
pub fn load_or_report(path: &Path) -> Option<(PathBuf, Document)> {
    match load(path) {
        Ok(loaded) => Some(loaded),
        Err(lines) => {
            let mut err = std::io::stderr().lock();
            for line in lines {
                // Nothing sensible is left to do when stderr itself is gone.
                let _ = writeln!(err, "{line}");
            }
            None
        }
    }
}
