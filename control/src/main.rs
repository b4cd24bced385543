//! `guardrail`: the companion of the Guardrail filter.
//!
//! The CLI validates policies (`check`), prepares them for the filter's plugin configuration
//! (`export`) and derives the digests the catalog stores for API keys (`hash-key`). The policy
//! push server (`serve`, `status`) and the decision tools (`test`, `explain`, `keygen`, `mint`)
//! join as further subcommands of [`Command`].
//!
//! Exit codes: 0 success, 1 the policy (or file) is invalid, 2 the command line is wrong.

mod hash_key;
mod policy;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "guardrail",
    version,
    about = "Guardrail companion: policy validation, push and JIT credentials"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the digest to store in a policy's `api_keys` for an API key.
    HashKey(hash_key::Args),
    /// Validate a policy file; errors are printed as `file:line: path: message`.
    Check(policy::CheckArgs),
    /// Validate a policy file and print it as compact JSON, for the filter's plugin configuration.
    Export(policy::ExportArgs),
}

/// A command line that cannot be acted on: reported like clap's own errors, with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::HashKey(args) => hash_key::run(&args),
        Command::Check(args) => policy::check(&args),
        Command::Export(args) => policy::export(&args),
    };
    match result {
        Ok(code) => code,
        // A closed pipe (`guardrail export p.yaml | head -c 100`): stop quietly, as a process
        // killed by SIGPIPE would, with the exit status a shell reports for one.
        Err(e) if is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
