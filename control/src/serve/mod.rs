//! `guardrail serve`: push a policy file (or directory) to every connected Envoy, hot-reloaded.
//!
//! On start the policy is validated like `guardrail check` (exit 1 with `file:line: path: message`
//! errors if it is not valid). Then a watcher thread polls it ([`watch`]); each valid change is
//! pushed to every stream at once through the [`hub::Hub`], an invalid one is refused with a log
//! line per error and the last good policy stays in force. The gRPC service ([`service`]) tracks
//! every node's ACKs, NACKs and usage; a ticker rolls the fleet over at each UTC day.

pub mod audit;
pub mod fleet;
pub mod hub;
pub mod persist;
pub mod service;
pub mod shadow;
pub mod watch;
pub mod wire;

#[cfg(test)]
mod tests;

use crate::log::log;
use crate::pb::policy_service_server::PolicyServiceServer;
use crate::tls::{Reload, ServerTls};
use anyhow::Context;
use hub::{system_clock, Hub};
use service::{PolicyServer, StreamLimits, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use watch::{Source, Watcher, POLL_INTERVAL};

/// How long streams get to close when the server stops, before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML or JSON), or a directory holding exactly one (`*.yaml`, `*.yml`, `*.json`;
    /// hidden files, `~` backups, `*.swp` and `*.tmp` are ignored).
    #[arg(long)]
    policy: PathBuf,
    /// A candidate policy decided in shadow beside the enforced one on every Envoy, never enforced;
    /// `guardrail status` shows where it differs (README "Safe rollout: shadow").
    #[arg(long)]
    candidate: Option<PathBuf>,
    /// Address to listen on, `HOST:PORT` (port 0 picks a free port; the log says which).
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: String,
    /// Where the state that outlives the process is kept: `sqlite:PATH` (one companion) or
    /// `redis://HOST:PORT[/DB]` (shared by several companions; `rediss://` over TLS, see
    /// --store-ca). See README "Companion state".
    #[arg(long, default_value = crate::store::DEFAULT_URL)]
    store: String,
    #[command(flatten)]
    store_tls: crate::store::TlsFiles,
    /// This companion's name in the store and in `status` (default: `HOSTNAME:PORT`).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    tls: crate::tls::ServerArgs,
    /// Also serve the console (catalog JSON API, health checks) over HTTP on `HOST:PORT`.
    #[arg(long)]
    http: Option<String>,
    /// A file holding the token every console request but the health checks must bring as
    /// `Authorization: Bearer <token>`; required to listen beyond loopback.
    #[arg(long, requires = "http")]
    http_token_file: Option<PathBuf>,
    #[command(flatten)]
    http_tls: crate::tls::HttpServerArgs,
    /// The private key (a JWK file from `guardrail keygen`, mode 600) the token service
    /// (`POST /api/v1/token` on --http) signs JIT tokens with; an issuer of the policy must trust it.
    #[arg(long, requires = "http")]
    issuer_key: Option<PathBuf>,
    /// Token requests each client may make, `REQUESTS/DURATION` (a bucket of REQUESTS, refilled
    /// over DURATION).
    #[arg(long, default_value = crate::selfservice::DEFAULT_TOKEN_RATE, requires = "http")]
    token_rate: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let source = Source::new(&args.policy);
    let (file, text, doc) = match source.load() {
        Ok(loaded) => loaded,
        Err(lines) => {
            for line in lines {
                eprintln!("{line}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    // A candidate is validated like the policy, before anything is pushed.
    let candidate = match &args.candidate {
        None => None,
        Some(path) => {
            let source = Source::new(path);
            match source.load() {
                Ok((file, text, doc)) => {
                    let message = shadow::candidate_of(&doc).map_err(anyhow::Error::msg)?;
                    Some((source, file, text, message))
                }
                Err(lines) => {
                    for line in lines {
                        eprintln!("{line}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    };
    let tls = args.tls.server_tls()?;
    let http_tls = args.http_tls.server_tls()?;
    let hub = Hub::new(&file, doc, system_clock()).map_err(anyhow::Error::msg)?;
    if let Some((_, file, _, message)) = &candidate {
        log!(
            "candidate revision {} from {}: decided in shadow on every node, never enforced",
            message.revision,
            file.display()
        );
        hub.shadow.set(Some(message.clone()));
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(serve(
        args,
        [tls, http_tls],
        source,
        file,
        text,
        hub,
        candidate.map(|(source, _, text, _)| (source, text)),
    ))
}

/// The TLS of the gRPC port and of the HTTP port (`None`: plain text).
type Tls = [Option<Arc<ServerTls>>; 2];

async fn serve(
    args: &Args,
    [tls, http_tls]: Tls,
    source: Source,
    file: PathBuf,
    text: String,
    hub: Arc<Hub>,
    candidate: Option<(Source, String)>,
) -> anyhow::Result<ExitCode> {
    // The token service's settings are checked before anything listens.
    let token_rate = crate::selfservice::parse_rate(&args.token_rate, "--token-rate").map_err(crate::UsageError)?;
    let key = match &args.issuer_key {
        Some(path) => Some(crate::selfservice::load_issuer_key(path, &hub.current())?),
        None => None,
    };
    let store = crate::store::open(&args.store, &args.store_tls).await?;
    let listener =
        TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("starting the gRPC server")?;
    let name = args.name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));
    hub.attach_store(store.clone(), &name);
    let mut persist = persist::Persist::new(hub.clone(), store.clone());
    // Unavailable (Redis down): serve without it; the store task loads it once it answers.
    let loaded = persist.load().await;
    persist.note(loaded);
    let (persist_stop, persist_stopped) = tokio::sync::watch::channel(false);
    let trail_stop = persist_stopped.clone();
    // The approved requests in force are served from the first snapshot on, then kept in step.
    let mut requests = crate::selfservice::approvals::Sync::default();
    crate::selfservice::approvals::sync(&hub, &mut requests).await;
    let requests = tokio::spawn(crate::selfservice::approvals::run_sync(hub.clone(), persist_stopped.clone()));
    let persist = tokio::spawn(persist.run(persist_stopped));
    let mut trail = None;
    let console = match &args.http {
        Some(http) => {
            let l = TcpListener::bind(http).await.with_context(|| format!("cannot listen on --http {http}"))?;
            let at = l.local_addr().context("starting the console")?;
            let token = crate::console::token_for(at, args.http_token_file.as_deref())?;
            let scheme = if http_tls.is_some() { "https" } else { "http" };
            match &http_tls {
                None => log!("console on http://{at}/"),
                Some(_) => log!("console on https://{at}/ ({})", args.http_tls.describe()),
            }
            if let Some(key) = &key {
                log!(
                    "token service on {scheme}://{at}/api/v1/token (issuer key {}, {} per client)",
                    key.kid,
                    args.token_rate
                );
            }
            let options = crate::selfservice::Options { key, token_rate, console_token: token.clone() };
            let (selfservice, writer) = crate::selfservice::SelfService::start(hub.clone(), options, trail_stop);
            trail = Some(writer);
            let more = crate::selfservice::router(selfservice);
            Some(crate::console::start(l, hub.clone(), token, more, http_tls.clone()))
        }
        None => None,
    };
    let server = start(listener, hub.clone(), StreamLimits::default(), tls.clone())?;
    log!(
        "serving policy revision {} from {} on {} (gRPC guardrail.v1.PolicyService, {}; companion {name}, store {})",
        hub.current().revision,
        file.display(),
        server.addr,
        args.tls.describe(),
        store.url()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Watcher::new(source, hub.clone(), &file, &text);
    let watcher_stop = stop.clone();
    let watcher = std::thread::Builder::new()
        .name("policy-watcher".into())
        .spawn(move || watcher.run(POLL_INTERVAL, &watcher_stop))
        .context("starting the policy watcher")?;
    let candidate_watcher = match candidate {
        None => None,
        Some((source, text)) => {
            let (hub, stop) = (hub.clone(), stop.clone());
            Some(
                std::thread::Builder::new()
                    .name("candidate-watcher".into())
                    .spawn(move || shadow::watch(source, hub, Some(text), POLL_INTERVAL, &stop))
                    .context("starting the candidate watcher")?,
            )
        }
    };

    let ticker_hub = hub.clone();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            ticker_hub.tick();
            crate::log::NODE_LINES.flush();
            for (port, tls) in [("gRPC", &tls), ("HTTP", &http_tls)] {
                match tls.as_deref().map(ServerTls::reload_if_changed) {
                    None | Some(Reload::Unchanged) => {}
                    Some(Reload::Reloaded) => {
                        log!("{port} port: TLS certificate files changed: new connections get them")
                    }
                    Some(Reload::Refused(why)) => log!(
                        "{port} port: TLS certificate files changed but are refused, the ones read before stay in force: {why}"
                    ),
                }
            }
        }
    });

    let signal = stop_signal().await;
    log!("{signal}: stopping");
    stop.store(true, Ordering::Relaxed);
    ticker.abort();
    requests.abort();
    if let Some(console) = console {
        console.abort();
    }
    server.stop(&hub).await;
    // The last batch (the streams just closed among it) goes to the store before the exit.
    let _ = persist_stop.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, persist).await.is_err() {
        log!("the store did not take the last batch in time; stopping anyway");
    }
    // Likewise the self-service trail's last entries (every token issued is in it).
    if let Some(trail) = trail {
        if tokio::time::timeout(SHUTDOWN_GRACE, trail).await.is_err() {
            log!("the store did not take the self-service trail's last entries in time; stopping anyway");
        }
    }
    let _ = watcher.join();
    if let Some(candidate_watcher) = candidate_watcher {
        let _ = candidate_watcher.join();
    }
    Ok(ExitCode::SUCCESS)
}

/// The machine's name (a pod's name under Kubernetes), for this companion's default name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "companion".to_string())
}

/// Waits for Ctrl-C or SIGTERM; names the one that came.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

/// A gRPC server running in the background.
pub struct Running {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Serves the policy service on `listener` until [`Running::stop`], over TLS when `tls` is set.
pub fn start(
    listener: TcpListener,
    hub: Arc<Hub>,
    limits: StreamLimits,
    tls: Option<Arc<ServerTls>>,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("starting the gRPC server")?;
    let service = wire::Routed::new(PolicyServer::new(hub, limits), MAX_MESSAGE_BYTES);
    // grpc.health.v1.Health: SERVING for the server ("") and for guardrail.v1.PolicyService.
    let (health, health_service) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        // Dead peers (a killed Envoy, a cut network) are noticed and their streams closed.
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(service);
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = async {
        let _ = stopped.await;
    };
    let task = tokio::spawn(async move {
        health.set_serving::<PolicyServiceServer<PolicyServer>>().await;
        match tls {
            None => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                server.serve_with_incoming_shutdown(incoming, stopped).await
            }
            Some(tls) => server.serve_with_incoming_shutdown(tls_incoming(listener, tls, false), stopped).await,
        }
    });
    Ok(Running { addr, stop, task })
}

/// How long a client gets to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed handshakes logged per minute; the rest are counted in the next line.
const HANDSHAKE_FAILURES_LOGGED: u32 = 20;

/// The connections of `listener` that complete a TLS handshake with the configuration in force
/// when they arrive; each failed handshake is logged with the peer and rustls's reason (a client
/// without a certificate, one from another CA, plain text), at most
/// [`HANDSHAKE_FAILURES_LOGGED`] a minute. Accepting stops when the server drops the stream.
/// With `answer_http` (the HTTP port), a plain-text HTTP request is answered `400` saying to use
/// `https://` rather than dropped without a word.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    answer_http: bool,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let failures = Arc::new(FailureLog::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: the next accept may work.
                    log!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let (tx, failures) = (tx.clone(), failures.clone());
            tokio::spawn(async move {
                let handshake = async {
                    if answer_http && plain_http(&tcp).await {
                        return Err(std::io::Error::other(answer_plain_http(tcp).await));
                    }
                    acceptor.accept(tcp).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    // Closed without a TLS error, most often before a word: a TCP health check or a
                    // port scan.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Ok(Err(e)) => failures.note(peer, &crate::status::error_chain(&e)),
                    Err(_) => failures.note(peer, &format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether a connection opens with plain text rather than a TLS record (a handshake starts with
/// byte 22): an HTTP method's first letter.
async fn plain_http(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// Answers a plain-text HTTP request on the TLS port with a 400 naming the fix, then closes; the
/// reason to log.
async fn answer_plain_http(mut tcp: tokio::net::TcpStream) -> &'static str {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The request is read (what has come of it) and, after the answer, the rest until the client
    // closes: closing with unread data would reset the connection before the client reads.
    let mut sink = [0u8; 8192];
    let _ = tcp.read(&mut sink).await;
    const BODY: &str = "this port speaks HTTPS (serve --http-tls-cert): use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    "plain-text HTTP on the TLS port (answered 400: use https://)"
}

/// Rate-limits the log lines of failed handshakes.
#[derive(Default)]
struct FailureLog {
    /// (start of the current minute, lines logged in it, failures not logged in it)
    window: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>,
}

impl FailureLog {
    fn note(&self, peer: SocketAddr, why: &str) {
        let now = std::time::Instant::now();
        let mut w = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let new_minute = match w.0 {
            None => true,
            Some(start) => now.duration_since(start) >= Duration::from_secs(60),
        };
        if new_minute {
            if w.2 > 0 {
                log!("TLS: {} more failed handshakes in the last minute were not logged", w.2);
            }
            *w = (Some(now), 0, 0);
        }
        if w.1 < HANDSHAKE_FAILURES_LOGGED {
            w.1 += 1;
            log!("TLS handshake with {peer} failed: {why}");
        } else {
            w.2 += 1;
        }
    }
}

impl Running {
    /// Ends every stream and stops the server (waiting at most [`SHUTDOWN_GRACE`]).
    pub async fn stop(self, hub: &Hub) {
        hub.shut_down();
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log!("gRPC server error: {e}"),
            Ok(Err(e)) => log!("gRPC server task failed: {e}"),
            Err(_) => {
                log!("streams did not close in time; stopping anyway");
                task.abort();
            }
        }
    }
}
