//! `guardrail`: the companion of the Guardrail filter.
//!
//! The CLI validates policies (`check`), prepares them for the filter's plugin configuration
//! (`export`), lists its apps with their risk (`catalog`), derives the digests the catalog stores for API keys (`hash-key`), serves policy to
//! every Envoy of the fleet (`serve`, `status`) and issues JIT credentials (`keygen`, `mint`);
//! `replay` decides recorded traffic with a candidate policy before it is rolled out; `request`,
//! `requests`, `approve` and `reject` file and decide self-service requests on a companion.
//!
//! Exit codes: 0 success, 1 the policy (or file) is invalid, the request was refused or the
//! companion could not be reached, 2 the command line is wrong; `replay`: 3 when the candidate
//! changes any recorded decision.

mod audit;
mod cases;
mod catalog;
mod console;
mod explain;
mod hash_key;
mod jwk;
mod keygen;
mod log;
mod mint;
mod pb;
mod policy;
mod replay;
mod requests_cli;
mod selfservice;
mod serve;
mod status;
mod store;
mod tls;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "guardrail", version, about = "Guardrail companion: policy validation, push and JIT credentials")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the digest to store in a policy's `api_keys` for an API key.
    HashKey(hash_key::Args),
    /// Validate a policy file; errors are printed as `file:line: path: message`, warnings as
    /// `file:line: warning: path: message` (exit 0 with only warnings, 1 with --strict).
    Check(policy::CheckArgs),
    /// Validate a policy file and print it as compact JSON, for the filter's plugin configuration.
    Export(policy::ExportArgs),
    /// List every app of a policy: owner, placement, risk tier with reasons, trust score with its
    /// factors, API key fingerprints (never keys) and the quota in force.
    Catalog(catalog::Args),
    /// Run policy test cases (request → expected decision) through the filter's decide().
    Test(cases::Args),
    /// Judge one request: the trace of every check and rule, the verdict and Envoy's response.
    Explain(explain::Args),
    /// Serve a policy to every Envoy over gRPC, pushing each valid change as it is saved.
    Serve(serve::Args),
    /// Show the nodes connected to a companion, the revision each acknowledged, and fleet usage.
    Status(status::Args),
    /// Show the policy revisions served, newest first, each with what it changed.
    Audit(audit::Args),
    /// Write a new Ed25519 signing key (private JWK) and print its public JWKS entry.
    Keygen(keygen::Args),
    /// Issue a short-lived JWT for an app, scoped to datasets (a JIT credential).
    Mint(mint::Args),
    /// Decide recorded traffic (Envoy JSON access logs) with a candidate policy and show, per app,
    /// what would change; exit 3 when anything would, 0 when nothing would.
    Replay(replay::Args),
    /// File a self-service request as an app (quota, connector, access, review) on a companion's
    /// HTTP port; prints the request and, as the last line, its id.
    Request(requests_cli::FileArgs),
    /// List the self-service requests on a companion, newest first (an approver's token, or an
    /// app's key for its own).
    Requests(requests_cli::ListArgs),
    /// Approve a pending request (an approver of settings.approvers); prints the revision pushed.
    Approve(requests_cli::ApproveArgs),
    /// Reject a pending request, saying why (an approver of settings.approvers).
    Reject(requests_cli::RejectArgs),
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
        Command::Catalog(args) => catalog::run(&args),
        Command::Test(args) => cases::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Audit(args) => audit::run(&args),
        Command::Keygen(args) => keygen::run(&args),
        Command::Mint(args) => mint::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Request(args) => requests_cli::file(&args),
        Command::Requests(args) => requests_cli::list(&args),
        Command::Approve(args) => requests_cli::approve(&args),
        Command::Reject(args) => requests_cli::reject(&args),
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
