//! `guardrail check` and `guardrail export`: validate a policy file, then report or print it.

use anyhow::Context;
use guardrail_core::source::{load_document_file, Document};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file (YAML or JSON).
    path: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Policy file (YAML or JSON).
    path: PathBuf,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let Some(doc) = load(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let p = &doc.policy;
    let revision = if p.revision.is_empty() { "unset" } else { p.revision.as_str() };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ok: {} (revision {revision}, {}, {}, {})",
        args.path.display(),
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
    let Some(doc) = load(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", doc.canonical).context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// Loads and validates one policy file; on failure prints every error to stderr, one per line.
fn load(path: &Path) -> Option<Document> {
    if path.is_dir() {
        eprintln!(
            "{}: is a directory; this command takes one policy file (directories are supported by `guardrail serve` only)",
            path.display()
        );
        return None;
    }
    match load_document_file(path) {
        Ok(doc) => Some(doc),
        Err(errors) => {
            let mut err = std::io::stderr().lock();
            for line in errors.lines() {
                // Nothing sensible is left to do when stderr itself is gone.
                let _ = writeln!(err, "{line}");
            }
            None
        }
    }
}
