//! `guardrail request`, `requests`, `approve`, `reject`: self-service requests from the command
//! line, as a client of the companion's HTTP API (`guardrail serve --http ADDR`; README
//! "Self-service: requests and approvals").
//!
//! A builder files a request as the app (HTTP Basic with its id and one of its API keys, each
//! form-urlencoded as in RFC 6749 §2.3.1); an approver lists and decides requests with a bearer
//! token whose digest `settings.approvers` lists. The companion checks and decides everything: this
//! side builds the JSON, sends it over HTTP/1.1 and renders the answer, or the companion's refusal
//! (its problem+json `detail`, which names the field) on standard error with exit code 1.
//!
//! ```text
//! $ guardrail request quota --server http://127.0.0.1:18001 --app claims-bot \
//!     --api-key-file claims-bot.key --rate 3000/1m --until 2026-12-20 --reason "month-end batch"
//! request req-3f9c0a1b2c4d filed, pending
//!   …
//! req-3f9c0a1b2c4d
//! ```

use crate::selfservice::requests::{Kind, Request};
use crate::status::{error_chain, print, server_url, table};
use crate::UsageError;
use anyhow::Context;
use base64ct::{Base64, Encoding};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::ServerName;

/// How long a call may take, connecting and answering.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Answers larger than this are refused (a list of every request ever filed stays far below).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The media type of the companion's refusals (RFC 9457).
const PROBLEM: &str = "application/problem+json";

// === arguments ===

#[derive(Debug, clap::Args)]
pub struct FileArgs {
    /// What to ask for: `quota` (--rate and/or --daily-budget), `connector` (--connector), `access`
    /// (--dataset, one marked `approval: required`) or `review` (a later review date, --until).
    #[arg(value_parser = kind_parser())]
    kind: Kind,
    /// The companion's HTTP address (`serve --http`): `http://HOST:PORT`, or `https://HOST:PORT`
    /// with --tls-ca (`serve --http-tls-cert`).
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: crate::tls::ClientArgs,
    /// The app the request is for, which files it (its id in the policy).
    #[arg(long)]
    app: String,
    /// A file holding one of the app's API keys (surrounding whitespace is ignored; never printed).
    #[arg(long, value_name = "FILE")]
    api_key_file: PathBuf,
    /// quota: the rate asked for, `REQUESTS/DURATION` (e.g. `3000/1m`).
    #[arg(long)]
    rate: Option<String>,
    /// quota: the daily budget asked for (requests per UTC day).
    #[arg(long, value_name = "N")]
    daily_budget: Option<u64>,
    /// connector: the upstream connector (Envoy cluster) the app is to reach.
    #[arg(long, value_name = "NAME")]
    connector: Option<String>,
    /// access: the dataset (marked `approval: required`) the app is to get JIT tokens for.
    #[arg(long, value_name = "ID")]
    dataset: Option<String>,
    /// Until when: `YYYY-MM-DD` (through that day, UTC) or an RFC 3339 time; at most
    /// `settings.max_request_duration` ahead (default 90 days). review: the new review date.
    #[arg(long, value_name = "DATE|RFC3339")]
    until: String,
    /// Why (an approver reads it).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Print the request filed as JSON instead.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The companion's HTTP address (`serve --http`): `http://HOST:PORT`, or `https://HOST:PORT`
    /// with --tls-ca (`serve --http-tls-cert`).
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: crate::tls::ClientArgs,
    /// Only the requests with this status.
    #[arg(long, value_parser = ["pending", "approved", "rejected", "expired"])]
    status: Option<String>,
    /// Only the requests of this app (with --api-key-file: the app asking, which sees only its own).
    #[arg(long)]
    app: Option<String>,
    /// A file holding an approver's token (or the console's, `serve --http-token-file`); not
    /// needed by an approver listed by certificate who connects with it (--tls-cert).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["api_key_file", "tls_cert"],
        conflicts_with = "api_key_file"
    )]
    token_file: Option<PathBuf>,
    /// Instead of a token: a file holding one of --app's API keys, to list that app's requests.
    #[arg(long, value_name = "FILE", requires = "app")]
    api_key_file: Option<PathBuf>,
    /// Print `{"requests": [...]}` as the companion answers it.
    #[arg(long)]
    json: bool,
}

/// What approving and rejecting share: the request, the companion and the approver.
#[derive(Debug, clap::Args)]
pub struct Decider {
    /// The request's id (`req-<12 hex digits>`, as `guardrail request` and `guardrail requests` print it).
    id: String,
    /// The companion's HTTP address (`serve --http`): `http://HOST:PORT`, or `https://HOST:PORT`
    /// with --tls-ca (`serve --http-tls-cert`).
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: crate::tls::ClientArgs,
    /// A file holding the approver's token (its `guardrail hash-key` digest is in settings.approvers);
    /// not needed by an approver listed by certificate who connects with it (--tls-cert).
    #[arg(long, value_name = "FILE", required_unless_present = "tls_cert")]
    token_file: Option<PathBuf>,
    /// Print the decided request as JSON instead.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    on: Decider,
    /// Why (kept with the decision).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RejectArgs {
    #[command(flatten)]
    on: Decider,
    /// Why it is rejected (the builder reads it).
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

fn kind_parser() -> impl TypedValueParser<Value = Kind> {
    PossibleValuesParser::new(["quota", "connector", "access", "review"])
        .try_map(|text| Kind::parse(&text).ok_or_else(|| format!("unknown kind `{text}`")))
}

// === commands ===

/// `guardrail request KIND …`: files the request; prints it and its id as the last line.
pub fn file(args: &FileArgs) -> anyhow::Result<ExitCode> {
    let body = filing(args)?;
    let api = Api::new(&args.server, &args.tls)?;
    let auth = Auth::Basic { app: args.app.clone(), key: read_secret(&args.api_key_file, "--api-key-file")? };
    let answer = api.call(Method::POST, "/api/v1/requests", &auth, Some(&body))?;
    let (json, request) = answer.request(&api)?;
    print(args.json, || json, || format!("{}{}\n", render(&request, "filed"), request.id))?;
    Ok(ExitCode::SUCCESS)
}

/// `guardrail requests`: the requests, newest first.
pub fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.server, &args.tls)?;
    let auth = match (&args.token_file, &args.api_key_file, &args.app) {
        (Some(file), _, _) => Auth::Bearer(read_secret(file, "--token-file")?),
        (None, Some(file), Some(app)) => Auth::Basic { app: app.clone(), key: read_secret(file, "--api-key-file")? },
        (None, None, _) if args.tls.tls_cert.is_some() => Auth::Certificate,
        _ => {
            return Err(
                UsageError("give --token-file, --app with --api-key-file, or --tls-cert with --tls-key".into()).into()
            )
        }
    };
    let answer = api.call(Method::GET, &list_path(args.status.as_deref(), args.app.as_deref()), &auth, None)?;
    let json = answer.json(&api)?;
    let requests: Vec<Request> =
        json.get("requests")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("the companion at {} answered without a list of requests", api.base))?;
    print(args.json, || json, || render_list(&requests))?;
    Ok(ExitCode::SUCCESS)
}

/// `guardrail approve ID [--reason T]`.
pub fn approve(args: &ApproveArgs) -> anyhow::Result<ExitCode> {
    decide(&args.on, "approve", args.reason.as_deref())
}

/// `guardrail reject ID --reason T`.
pub fn reject(args: &RejectArgs) -> anyhow::Result<ExitCode> {
    decide(&args.on, "reject", Some(&args.reason))
}

fn decide(on: &Decider, verb: &str, reason: Option<&str>) -> anyhow::Result<ExitCode> {
    let path = decision_path(&on.id, verb)?;
    let api = Api::new(&on.server, &on.tls)?;
    let auth = match &on.token_file {
        Some(file) => Auth::Bearer(read_secret(file, "--token-file")?),
        None => Auth::Certificate,
    };
    let body = reason.map(|r| serde_json::json!({ "reason": r }));
    let answer = api.call(Method::POST, &path, &auth, body.as_ref())?;
    let (json, request) = answer.request(&api)?;
    print(on.json, || json, || render(&request, &request.status))?;
    Ok(ExitCode::SUCCESS)
}

// === what is sent ===

/// The JSON body of `POST /api/v1/requests` for `args`; the flags a kind needs, or cannot take,
/// are usage errors here, before anything is sent.
fn filing(args: &FileArgs) -> Result<Value, UsageError> {
    let given = [
        ("--rate", args.rate.is_some()),
        ("--daily-budget", args.daily_budget.is_some()),
        ("--connector", args.connector.is_some()),
        ("--dataset", args.dataset.is_some()),
    ];
    let (takes, needs): (&[&str], &str) = match args.kind {
        Kind::Quota => (&["--rate", "--daily-budget"], "--rate REQUESTS/DURATION and/or --daily-budget N"),
        Kind::Connector => (&["--connector"], "--connector NAME"),
        Kind::Access => (&["--dataset"], "--dataset ID"),
        Kind::Review => (&[], ""),
    };
    let kind = args.kind.as_str();
    if let Some((flag, _)) = given.iter().find(|(flag, on)| *on && !takes.contains(flag)) {
        return Err(UsageError(format!("{flag} is not part of a {kind} request")));
    }
    if !takes.is_empty() && !given.iter().any(|(flag, on)| *on && takes.contains(flag)) {
        return Err(UsageError(format!("a {kind} request needs {needs}")));
    }
    let mut body = serde_json::json!({
        "kind": kind,
        "app": args.app,
        "until": args.until,
        "reason": args.reason,
    });
    let optional = [
        ("rate", args.rate.clone().map(Value::from)),
        ("daily_budget", args.daily_budget.map(Value::from)),
        ("connector", args.connector.clone().map(Value::from)),
        ("dataset", args.dataset.clone().map(Value::from)),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            body[field] = value;
        }
    }
    Ok(body)
}

/// `/api/v1/requests[?status=S][&app=A]`.
fn list_path(status: Option<&str>, app: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(status) = status {
        query.append_pair("status", status);
    }
    if let Some(app) = app {
        query.append_pair("app", app);
    }
    let query = query.finish();
    if query.is_empty() {
        "/api/v1/requests".into()
    } else {
        format!("/api/v1/requests?{query}")
    }
}

/// `/api/v1/requests/ID/VERB`; an id that cannot be one (the companion makes `req-<hex>`) is a
/// usage error rather than a path to escape.
fn decision_path(id: &str, verb: &str) -> Result<String, UsageError> {
    let fits = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.is_empty() || id.len() > 64 || !id.chars().all(fits) {
        let shown: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
        return Err(UsageError(format!(
            "ID `{shown}`: not a request id (`req-<12 hex digits>`, as `guardrail requests` prints it)"
        )));
    }
    Ok(format!("/api/v1/requests/{id}/{verb}"))
}

/// A secret from `file`, trimmed: one line, not empty.
fn read_secret(file: &Path, flag: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{flag} {}: cannot read", file.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        anyhow::bail!("{flag} {}: the file is empty", file.display());
    }
    if secret.chars().any(char::is_control) {
        anyhow::bail!("{flag} {}: more than one line; the file must hold the secret alone", file.display());
    }
    Ok(secret.to_string())
}

/// How a call authenticates.
enum Auth {
    /// An app: its id and API key (RFC 6749 §2.3.1: each form-urlencoded, then base64).
    Basic { app: String, key: String },
    /// An approver (or the console): `Authorization: Bearer`.
    Bearer(String),
    /// An approver by the client certificate of the TLS connection (--tls-cert): no header.
    Certificate,
}

impl Auth {
    fn header(&self) -> Option<String> {
        match self {
            Auth::Basic { app, key } => {
                let pair = format!("{}:{}", urlencoded(app), urlencoded(key));
                Some(format!("Basic {}", Base64::encode_string(pair.as_bytes())))
            }
            Auth::Bearer(token) => Some(format!("Bearer {token}")),
            Auth::Certificate => None,
        }
    }

    /// What to check when the companion does not know the caller.
    fn hint(&self) -> &'static str {
        match self {
            Auth::Basic { .. } => {
                "hint: --app must be the app's id and --api-key-file hold one of its keys (the digest in its api_keys)"
            }
            Auth::Bearer(_) => {
                "hint: --token-file must hold an approver's token, whose `guardrail hash-key` digest is in settings.approvers"
            }
            Auth::Certificate => {
                "hint: --tls-cert must be an approver's certificate, whose SHA-256 (`openssl x509 -in CERT -outform der | sha256sum`) is in settings.approvers"
            }
        }
    }
}

fn urlencoded(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

// === the HTTP client ===

/// The companion's HTTP API at `--server`.
#[derive(Debug)]
struct Api {
    /// `http[s]://HOST:PORT` and any path prefix, as given (for messages).
    base: String,
    /// Over TLS (`https://`, --tls-ca): the client's configuration and the name the companion's
    /// certificate must carry.
    tls: Option<(std::sync::Arc<tokio_rustls::rustls::ClientConfig>, ServerName<'static>)>,
    /// Whether a client certificate is presented (--tls-cert), for messages.
    client_certificate: bool,
    /// `HOST:PORT` to connect to and send as `Host`.
    authority: String,
    /// A path the API is under (behind a proxy), without a trailing `/`; usually empty.
    prefix: String,
    /// How long a call may take ([`TIMEOUT`]).
    timeout: Duration,
}

/// An answer: its status, whether it is problem+json, and its body.
#[derive(Debug)]
struct Answer {
    status: u16,
    problem: bool,
    body: Bytes,
    /// The method and path asked, for messages.
    asked: String,
    /// What to check on a 401.
    hint: &'static str,
}

impl Api {
    /// `--server`: `http[s]://HOST[:PORT][/PREFIX]` or `HOST:PORT`; `https://` with `tls`'s --tls-ca.
    fn new(server: &str, tls: &crate::tls::ClientArgs) -> anyhow::Result<Api> {
        let url = server_url(server.trim(), tls.tls_ca.is_some());
        let bad = |why: &str| UsageError(format!("--server {url}: {why}"));
        let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
            if tls.tls_ca.is_none() {
                return Err(bad("https:// needs --tls-ca FILE, the CA that signed the companion's certificate").into());
            }
            ("https", rest, 443)
        } else if let Some(rest) = url.strip_prefix("http://") {
            if tls.tls_ca.is_some() {
                return Err(bad("--tls-ca is for https://: the companion's HTTP port is reached over TLS").into());
            }
            ("http", rest, 80)
        } else {
            return Err(bad("expected http://HOST:PORT or https://HOST:PORT").into());
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') {
            return Err(bad(&format!("expected {scheme}://HOST:PORT")).into());
        }
        if path.contains(['?', '#']) {
            return Err(bad("no query or fragment: the address of the companion only").into());
        }
        let port = match authority.rsplit_once(':') {
            Some((_, port)) if !port.ends_with(']') => Some(port),
            _ => None,
        };
        let (host, authority) = match port {
            Some(port) if port.parse::<u16>().is_err() => {
                return Err(bad(&format!("port `{port}` is not a port")).into())
            }
            Some(port) => (&authority[..authority.len() - port.len() - 1], authority.to_string()),
            None => (authority, format!("{authority}:{default_port}")),
        };
        let args_cert = tls.tls_cert.is_some();
        let tls = match tls.http_config()? {
            None => None,
            Some(config) => {
                let name = tls.tls_server_name.as_deref().unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
                let name = ServerName::try_from(name.to_string())
                    .map_err(|_| bad(&format!("`{name}` is not a host name or IP address for TLS")))?;
                Some((std::sync::Arc::new(config), name))
            }
        };
        let prefix = path.trim_end_matches('/').to_string();
        let client_certificate = tls.is_some() && args_cert;
        Ok(Api {
            base: format!("{scheme}://{authority}{prefix}"),
            tls,
            client_certificate,
            authority,
            prefix,
            timeout: TIMEOUT,
        })
    }

    /// Sends one request (JSON `body`, if any) and reads the answer, within `timeout`; the error
    /// says why the companion could not be asked.
    fn call(&self, method: Method, path: &str, auth: &Auth, body: Option<&Value>) -> anyhow::Result<Answer> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        let asked = format!("{method} {path}");
        let exchange = self.exchange(method, path, auth, body);
        let answer = match runtime.block_on(async { tokio::time::timeout(self.timeout, exchange).await }) {
            Ok(Ok((status, problem, body))) => Answer { status, problem, body, asked, hint: auth.hint() },
            Ok(Err(why)) => anyhow::bail!("cannot reach the companion at {}: {why}", self.base),
            Err(_) => {
                anyhow::bail!("cannot reach the companion at {}: no answer within {:?}", self.base, self.timeout)
            }
        };
        Ok(answer)
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<(u16, bool, Bytes), String> {
        let stream = tokio::net::TcpStream::connect(self.authority.as_str()).await.map_err(|e| connect_error(&e))?;
        let request = self.request(method, path, auth, body)?;
        match &self.tls {
            None => send(stream, request).await,
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let stream = connector.connect(name.clone(), stream).await.map_err(|e| tls_error(&e))?;
                // Under TLS 1.3 the companion checks the client certificate after the client's side
                // of the handshake: its refusal arrives as an alert with the answer.
                send(stream, request).await.map_err(|why| match why.find("received fatal alert") {
                    Some(at) => refused_session(&why[at..], self.client_certificate),
                    None => why,
                })
            }
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, &self.authority)
            .header(ACCEPT, format!("application/json, {PROBLEM}"))
            .header(USER_AGENT, concat!("guardrail/", env!("CARGO_PKG_VERSION")));
        if let Some(value) = auth.header() {
            request = request.header(AUTHORIZATION, value);
        }
        let payload = match body {
            Some(value) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        // The only header value from outside is the token, checked by read_secret.
        request.body(Full::new(payload)).map_err(|e| format!("the request cannot be sent: {e}"))
    }
}

/// Sends `request` over `stream` (plain or TLS) with HTTP/1.1 and reads the answer.
async fn send<S>(stream: S, request: hyper::Request<Full<Bytes>>) -> Result<(u16, bool, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| error_chain(&e))?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| protocol_error(&e))?;
    let status = response.status().as_u16();
    let problem = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(PROBLEM)));
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, problem, body))
}

/// The companion ended the TLS session with an alert (`why`): most often a client certificate
/// missing or not from its --http-client-ca.
fn refused_session(why: &str, client_certificate: bool) -> String {
    let why = why.split(" (is this the companion").next().unwrap_or(why);
    if client_certificate {
        format!(
            "the companion refused the TLS session: {why} (is --tls-cert signed by the CA of its --http-client-ca?)"
        )
    } else {
        format!(
            "the companion refused the TLS session: {why} (it requires a client certificate from its \
             --http-client-ca: give --tls-cert and --tls-key)"
        )
    }
}

/// A TLS handshake that failed: the companion's certificate not from --tls-ca, a client
/// certificate it refused (or none where it requires one), or a port that does not speak TLS.
fn tls_error(e: &std::io::Error) -> String {
    let why = error_chain(e);
    if e.kind() == std::io::ErrorKind::InvalidData && why.contains("InvalidContentType") {
        return format!("{why} (the port does not speak TLS: is it served without --http-tls-cert? use http://)");
    }
    format!("TLS handshake failed: {why}")
}

fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is `guardrail serve --http` running there?)".into()
        }
        _ => e.to_string(),
    }
}

/// A connection made but no HTTP/1.1 answer on it: most likely the gRPC port (HTTP/2 only).
fn protocol_error(e: &hyper::Error) -> String {
    format!(
        "{} (is this the companion's --http address? its gRPC --listen port does not answer HTTP/1.1)",
        error_chain(e)
    )
}

impl Answer {
    /// The JSON of a 2xx answer; any other is the companion's refusal, as an error.
    fn json(self, api: &Api) -> anyhow::Result<Value> {
        if !(200..300).contains(&self.status) {
            anyhow::bail!(self.refusal(api));
        }
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the companion at {} answered {} to {} with a body that is not JSON",
                api.base, self.status, self.asked
            )
        })
    }

    /// The JSON of a 2xx answer holding one request, and the request.
    fn request(self, api: &Api) -> anyhow::Result<(Value, Request)> {
        let json = self.json(api)?;
        let request = serde_json::from_value(json.clone())
            .with_context(|| format!("the companion at {} answered with JSON that is not a request", api.base))?;
        Ok((json, request))
    }

    /// `refused (422 invalid-request): <detail>`, from problem+json; any other body is quoted.
    fn refusal(&self, api: &Api) -> String {
        let problem: Option<Value> = if self.problem { serde_json::from_slice(&self.body).ok() } else { None };
        let Some(problem) = problem else {
            let text = String::from_utf8_lossy(&self.body);
            let text: String = text.chars().take(200).filter(|c| !c.is_control()).collect();
            // A companion's HTTPS port answering plain HTTP says what to do itself.
            let hint =
                if text.contains("use https://") { "" } else { " (is it a companion of this release, with --http?)" };
            return format!(
                "the companion at {} answered {} to {}{}{text}{hint}",
                api.base,
                self.status,
                self.asked,
                if text.is_empty() { "" } else { ": " }
            );
        };
        let field = |name: &str| problem.get(name).and_then(Value::as_str).unwrap_or_default();
        let code = field("type").strip_prefix("urn:guardrail:problem:").unwrap_or(field("type"));
        let mut text = format!("refused ({} {code}): {}", self.status, field("detail"));
        if self.status == 401 {
            let _ = write!(text, "\n{}", self.hint);
        }
        text
    }
}

// === what is printed ===

/// A request, one field a line, after a headline (`request ID filed, pending`).
fn render(r: &Request, what: &str) -> String {
    let mut out = match what {
        "filed" => format!("request {} filed, {}\n", r.id, r.status),
        "approved" => format!(
            "request {} approved: revision {} pushed to the fleet\n",
            r.id,
            r.revision.as_deref().unwrap_or("(none reported)")
        ),
        _ => format!("request {} {}\n", r.id, r.status),
    };
    let mut risk = r.risk_tier.clone();
    if !r.risk_reasons.is_empty() {
        let _ = write!(risk, " ({})", r.risk_reasons.join("; "));
    }
    let mut rows = vec![
        vec!["app".to_string(), r.app.clone()],
        vec!["kind".into(), r.kind.as_str().into()],
        vec!["status".into(), r.status.clone()],
        vec!["change".into(), r.change.clone()],
        vec!["risk".into(), risk],
        vec!["until".into(), r.until.clone()],
        vec!["filed".into(), r.filed_at.clone()],
        vec!["reason".into(), r.reason.clone()],
    ];
    if let Some(by) = &r.decided_by {
        let at = r.decided_at.as_deref().map(|at| format!(" at {at}")).unwrap_or_default();
        rows.push(vec!["decided".into(), format!("{} by {by}{at}", r.status)]);
    }
    if let Some(why) = &r.decision_reason {
        rows.push(vec!["decision".into(), why.clone()]);
    }
    if let Some(revision) = &r.revision {
        rows.push(vec!["revision".into(), revision.clone()]);
    }
    out.push_str(&table(&rows));
    out
}

/// The requests as a table, in the order given (the companion's: newest first).
fn render_list(requests: &[Request]) -> String {
    if requests.is_empty() {
        return "no requests\n".into();
    }
    let mut rows = vec![["ID", "APP", "KIND", "STATUS", "UNTIL", "RISK", "CHANGE"].map(String::from).to_vec()];
    rows.extend(requests.iter().map(|r| {
        vec![
            r.id.clone(),
            r.app.clone(),
            r.kind.as_str().into(),
            r.status.clone(),
            r.until.clone(),
            r.risk_tier.clone(),
            r.change.clone(),
        ]
    }));
    table(&rows)
}

#[cfg(test)]
mod tests;
