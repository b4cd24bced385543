//! `guardrail check` and `guardrail export`: validate a policy, then report or print it; and
//! [`load`], how every command reads the policy it is given. `check` also prints the policy's
//! warnings ([`guardrail_core::lint`]) as `file:line: warning: path: message`: exit 0 with only
//! warnings, 1 with `--strict`.

use crate::log::now_secs;
use crate::serve::watch::Source;
use anyhow::Context;
use guardrail_core::source::{lint_text, Document};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
    /// Treat warnings (what is valid but likely not meant) as errors: exit 1 when there are any.
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let (file, text, doc) = match Source::new(&args.path).load() {
        Ok(loaded) => loaded,
        Err(lines) => {
            print_lines(&lines);
            return Ok(ExitCode::FAILURE);
        }
    };
    let warnings = lint_text(&text, &doc.policy, now_secs());
    let lines: Vec<String> = warnings
        .iter()
        .map(|w| match w.line {
            Some(line) => format!("{}:{line}: {w}", file.display()),
            None => format!("{}: {w}", file.display()),
        })
        .collect();
    print_lines(&lines);
    if args.strict && !warnings.is_empty() {
        print_lines(&[format!(
            "{}: {}, which --strict makes errors",
            file.display(),
            counted(warnings.len(), "warning")
        )]);
        return Ok(ExitCode::FAILURE);
    }
    let p = &doc.policy;
    let revision = if p.revision.is_empty() { "unset" } else { p.revision.as_str() };
    let warned = if warnings.is_empty() { String::new() } else { format!("; {}", counted(warnings.len(), "warning")) };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ok: {} (revision {revision}, {}, {}, {}{warned})",
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
    load(path).map_err(|lines| print_lines(&lines)).ok()
}

/// Prints `lines` to stderr, one per line.
pub(crate) fn print_lines(lines: &[String]) {
    let mut err = std::io::stderr().lock();
    for line in lines {
        // Nothing sensible is left to do when stderr itself is gone.
        let _ = writeln!(err, "{line}");
    }
}
