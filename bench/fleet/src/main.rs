//! The fleet benchmark (issue 20, "The fleet benchmark"): N simulated Envoys against one
//! `guardrail serve`, or two sharing a redis-server, each node on its own HTTP/2 connection and
//! speaking the real protocol (the companion's generated tonic client): Hello with a distinct node
//! id, an ACK of every snapshot, a usage report of a few apps every second.
//!
//! It measures the time until every node is connected and has ACKed; the latency from an atomic
//! rename of a changed policy to each node receiving it (p50, p99, max); the companions' RSS and
//! CPU (from /proc) steady and during the push; `guardrail status` latency under load; and the time
//! from the report that takes a fleet-wide daily budget past its limit until every node has heard
//! (FleetState). It starts the companions (and Redis) itself; see bench/README.md "Fleet".
//!
//!     guardrail-fleet --guardrail target/release/guardrail --policy-template POLICY.json \
//!         --nodes 1000 --companions 1 --work DIR [--json OUT] [--redis-server redis-server]

mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    include!("../../../control/src/pb/guardrail.v1.rs");
}

use anyhow::{bail, Context, Result};
use guardrail_proto::v1::{self, client_message, server_message};
use pb::policy_service_client::PolicyServiceClient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// The app whose fleet-wide budget the exhaustion phase spends.
const BUDGET_APP: &str = "app-00000";
/// What each node reports of [`BUDGET_APP`] in the exhaustion phase (node 0 one less at first).
const PER_NODE: u64 = 1000;

struct Opts {
    guardrail: PathBuf,
    template: PathBuf,
    nodes: usize,
    companions: usize,
    work: PathBuf,
    json: Option<PathBuf>,
    redis: String,
    apps_per_node: usize,
    connect_parallel: usize,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        guardrail: "target/release/guardrail".into(),
        template: PathBuf::new(),
        nodes: 1000,
        companions: 1,
        work: std::env::temp_dir().join("guardrail-fleet"),
        json: None,
        redis: "redis-server".into(),
        apps_per_node: 3,
        connect_parallel: 256,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--guardrail" => o.guardrail = v()?.into(),
            "--policy-template" => o.template = v()?.into(),
            "--nodes" => o.nodes = v()?.parse()?,
            "--companions" => o.companions = v()?.parse()?,
            "--work" => o.work = v()?.into(),
            "--json" => o.json = Some(v()?.into()),
            "--redis-server" => o.redis = v()?,
            "--apps-per-node" => o.apps_per_node = v()?.parse()?,
            "--connect-parallel" => o.connect_parallel = v()?.parse()?,
            _ => bail!("unknown argument {a} (see the crate docs)"),
        }
    }
    if o.template.as_os_str().is_empty() || !(1..=2).contains(&o.companions) || o.nodes == 0 {
        bail!("usage: guardrail-fleet --policy-template FILE --nodes N --companions 1|2 [--work DIR] [--json OUT]");
    }
    Ok(o)
}

/// What the nodes saw, written by their tasks and read by the coordinator.
struct Board {
    start: Instant,
    /// revision → when each node received it.
    snaps: HashMap<String, Vec<Option<Instant>>>,
    exhausted: Vec<Option<Instant>>,
    closed: Vec<Option<String>>,
    nodes: usize,
    /// revision → (snapshots received as a delta, bytes of every snapshot message received).
    sizes: HashMap<String, (usize, usize)>,
}

impl Board {
    fn received(&mut self, revision: &str, node: usize, at: Instant, delta: bool, bytes: usize) {
        let size = self.sizes.entry(revision.to_string()).or_default();
        size.0 += usize::from(delta);
        size.1 += bytes;
        let n = self.nodes;
        let v = self.snaps.entry(revision.to_string()).or_insert_with(|| vec![None; n]);
        if v[node].is_none() {
            v[node] = Some(at);
        }
    }
    fn count(&self, revision: &str) -> usize {
        self.snaps.get(revision).map_or(0, |v| v.iter().filter(|t| t.is_some()).count())
    }
    fn live(&self) -> usize {
        self.closed.iter().filter(|c| c.is_none()).count()
    }
}

type Shared = Arc<Mutex<Board>>;

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Board> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Exhaustion phase: 0 none reported, 1 every node reports PER_NODE (node 0 one less), 2 node 0 too.
struct Ctl {
    stage: AtomicU8,
    kick: Notify,
    /// When node 0 sent the report that passed the budget.
    passed: Mutex<Option<Instant>>,
    apps_per_node: usize,
    start: Instant,
}

fn day() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400)
}

fn usage(node: usize, ctl: &Ctl) -> v1::ClientMessage {
    let secs = ctl.start.elapsed().as_secs();
    let mut apps: Vec<v1::AppUsage> = (0..ctl.apps_per_node)
        .map(|k| v1::AppUsage {
            app: format!("app-{:05}", 1 + (node * 7 + k * 131) % 999),
            allowed: secs,
            ..Default::default()
        })
        .collect();
    let stage = ctl.stage.load(Ordering::SeqCst);
    if stage > 0 {
        let allowed = if node == 0 && stage == 1 { PER_NODE - 1 } else { PER_NODE };
        apps.push(v1::AppUsage { app: BUDGET_APP.into(), allowed, ..Default::default() });
    }
    v1::ClientMessage {
        msg: Some(client_message::Msg::Usage(v1::UsageReport { day: day(), apps, ..Default::default() })),
    }
}

async fn node(i: usize, addr: String, board: Shared, ctl: Arc<Ctl>, gate: Arc<Semaphore>) {
    let end = run_node(i, &addr, &board, &ctl, &gate).await;
    let why = match end {
        Ok(()) => "stream ended".to_string(),
        Err(e) => format!("{e:#}"),
    };
    lock(&board).closed[i] = Some(why);
}

async fn run_node(i: usize, addr: &str, board: &Shared, ctl: &Ctl, gate: &Semaphore) -> Result<()> {
    let permit = gate.acquire().await?;
    // One Endpoint, one connection: each node on its own HTTP/2 connection, as Envoys are.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(60))
        .connect()
        .await
        .context("connect")?;
    let mut client = PolicyServiceClient::new(channel).max_decoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(16);
    let hello = v1::Hello {
        node_id: format!("fleet-node-{i:05}"),
        envoy_version: "simulated".into(),
        filter_version: "fleet-bench".into(),
        revision: String::new(),
        // As the filter does; the simulator ACKs without inflating or applying a delta (an Envoy
        // spends that CPU, and checks the delta's SHA-256).
        accepts_zlib: true,
        accepts_delta: true,
    };
    tx.send(v1::ClientMessage { msg: Some(client_message::Msg::Hello(hello)) }).await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.context("open stream")?.into_inner();
    drop(permit);
    // Reports spread over the second, as independent Envoys' are.
    let offset = Duration::from_millis((i as u64 * 7919) % 1000);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message.context("stream")? else { return Ok(()) };
                let at = Instant::now();
                match message.msg {
                    Some(server_message::Msg::Snapshot(s)) => {
                        let bytes = prost::Message::encoded_len(&s);
                        lock(board).received(&s.revision, i, at, s.delta.is_some(), bytes);
                        let ack = v1::Ack { revision: s.revision, candidate: false };
                        tx.send(v1::ClientMessage { msg: Some(client_message::Msg::Ack(ack)) }).await?;
                    }
                    Some(server_message::Msg::Fleet(f)) if f.exhausted_apps.iter().any(|a| a == BUDGET_APP) => {
                        let mut b = lock(board);
                        if b.exhausted[i].is_none() {
                            b.exhausted[i] = Some(at);
                        }
                    }
                    // A shadow candidate: real Envoys ACK it apart; the simulator only measures policy pushes.
                    Some(server_message::Msg::Fleet(_) | server_message::Msg::Candidate(_)) | None => {}
                }
            }
            _ = tick.tick() => tx.send(usage(i, ctl)).await?,
            () = ctl.kick.notified(), if i == 0 => {
                let report = usage(i, ctl);
                tx.send(report).await?;
                *ctl.passed.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            }
        }
    }
}

// === companions ===

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    Ok(cmd.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null()).spawn()?)
}

fn wait_listening(port: u16, what: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on {port} within 60 s")
}

fn write_policy(doc: &serde_json::Value, path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(doc)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// (VmRSS KiB, VmHWM KiB, utime+stime ticks)
fn proc_sample(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: utime and stime are fields 14 and 15 (1-based).
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (kib("VmRSS:"), kib("VmHWM:"), ticks)
}

const TICKS_PER_SEC: f64 = 100.0;

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

/// `guardrail status` wall time (the CLI as an operator runs it), seconds; None if it failed.
async fn status_secs(bin: &Path, addr: &str) -> Option<f64> {
    let t = Instant::now();
    let out = tokio::process::Command::new(bin)
        .args(["status", "--server", addr, "--json"])
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    out.status.success().then(|| t.elapsed().as_secs_f64())
}

/// The fleet total of `app` a companion reports (Status RPC), None if it does not answer in 5 s.
async fn fleet_allowed(addr: &str, app: &str) -> Option<u64> {
    let ask = async {
        let mut c = PolicyServiceClient::connect(format!("http://{addr}")).await.ok()?;
        let s = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
        Some(s.fleet_usage.iter().find(|u| u.app == app).map_or(0, |u| u.allowed))
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten()
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = opts()?;
    std::fs::create_dir_all(&o.work)?;
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&o.template)?)?;
    let budget = PER_NODE * o.nodes as u64;
    doc["tiers"]["fleet-bench"] =
        serde_json::json!({"rate": {"requests": 1_000_000_000u64, "per": "1s"}, "daily_budget": budget});
    doc["apps"][0]["tier"] = "fleet-bench".into();
    doc["revision"] = "fleet-0".into();
    let policy = o.work.join("policy.json");
    write_policy(&doc, &policy)?;
    let policy_bytes = std::fs::metadata(&policy)?.len();

    let mut procs = Procs(Vec::new());
    let store_for = |i: usize, redis: Option<u16>| match redis {
        Some(p) => format!("redis://127.0.0.1:{p}"),
        None => format!("sqlite:{}", o.work.join(format!("companion-{i}.db")).display()),
    };
    let redis = if o.companions == 2 {
        let port = free_port()?;
        let dir = o.work.join("redis");
        std::fs::create_dir_all(&dir)?;
        procs.0.push(spawn(
            Command::new(&o.redis)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir),
            &o.work.join("redis.log"),
        )?);
        wait_listening(port, "redis-server")?;
        Some(port)
    } else {
        None
    };
    for i in 0..o.companions {
        let _ = std::fs::remove_file(o.work.join(format!("companion-{i}.db")));
    }
    let mut addrs = Vec::new();
    let mut pids = Vec::new();
    for i in 0..o.companions {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let child = spawn(
            Command::new(&o.guardrail)
                .args(["serve", "--listen", &addr, "--name", &format!("fleet-{i}"), "--store", &store_for(i, redis)])
                .arg("--policy")
                .arg(&policy),
            &o.work.join(format!("companion-{i}.log")),
        )?;
        pids.push(child.id());
        procs.0.push(child);
        wait_listening(port, "guardrail serve")?;
        addrs.push(addr);
    }

    let start = Instant::now();
    let board: Shared = Arc::new(Mutex::new(Board {
        start,
        snaps: HashMap::new(),
        exhausted: vec![None; o.nodes],
        closed: vec![None; o.nodes],
        nodes: o.nodes,
        sizes: HashMap::new(),
    }));
    let ctl = Arc::new(Ctl {
        stage: AtomicU8::new(0),
        kick: Notify::new(),
        passed: Mutex::new(None),
        apps_per_node: o.apps_per_node,
        start,
    });
    let gate = Arc::new(Semaphore::new(o.connect_parallel));
    eprintln!("==> fleet: {} nodes against {} companion(s) (policy {} bytes)", o.nodes, o.companions, policy_bytes);
    for i in 0..o.nodes {
        tokio::spawn(node(i, addrs[i % addrs.len()].clone(), board.clone(), ctl.clone(), gate.clone()));
    }
    let n = o.nodes;
    let all_acked = wait_until(Duration::from_secs(300), || lock(&board).count("fleet-0") == n).await;
    let connect_secs = start.elapsed().as_secs_f64();
    let (connected, live) = {
        let b = lock(&board);
        (b.count("fleet-0"), b.live())
    };
    eprintln!("==> connected and ACKed: {connected}/{n} in {connect_secs:.2} s ({live} streams open)");
    if !all_acked {
        let b = lock(&board);
        if let Some(why) = b.closed.iter().flatten().next() {
            eprintln!("    e.g. a node ended: {why}");
        }
    }

    // Steady state: every node reporting each second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: Vec<_> = pids.iter().map(|p| proc_sample(*p)).collect();
    let t = Instant::now();
    let mut status = Vec::new();
    for _ in 0..5 {
        let s = status_secs(&o.guardrail, &addrs[0]).await;
        status.push(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
    let after: Vec<_> = pids.iter().map(|p| proc_sample(*p)).collect();
    let secs = t.elapsed().as_secs_f64();
    let steady_cpu: Vec<f64> =
        before.iter().zip(&after).map(|(b, a)| (a.2 - b.2) as f64 / TICKS_PER_SEC / secs * 100.0).collect();
    let steady_rss: Vec<u64> = after.iter().map(|a| a.0).collect();
    let live_steady = lock(&board).live();

    // The push: a changed policy renamed into place.
    let flip = &mut doc["apps"][1]["lifecycle"];
    *flip = if flip == "quarantined" { "published".into() } else { "quarantined".into() };
    doc["revision"] = "fleet-1".into();
    let before: Vec<_> = pids.iter().map(|p| proc_sample(*p)).collect();
    let tmp = policy.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
    let status_during = tokio::spawn({
        let bin = o.guardrail.clone();
        let addr = addrs[0].clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            status_secs(&bin, &addr).await
        }
    });
    std::fs::rename(&tmp, &policy)?;
    let renamed = Instant::now();
    let mut peak_rss = vec![0u64; pids.len()];
    let until = renamed + Duration::from_secs(120);
    loop {
        for (k, p) in pids.iter().enumerate() {
            peak_rss[k] = peak_rss[k].max(proc_sample(*p).0);
        }
        let (got, live) = {
            let b = lock(&board);
            (b.count("fleet-1"), b.live())
        };
        if got >= live.min(connected) && got > 0 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let push_window = renamed.elapsed().as_secs_f64();
    let after: Vec<_> = pids.iter().map(|p| proc_sample(*p)).collect();
    let push_cpu: Vec<f64> =
        before.iter().zip(&after).map(|(b, a)| (a.2 - b.2) as f64 / TICKS_PER_SEC / push_window * 100.0).collect();
    let hwm: Vec<u64> = after.iter().map(|a| a.1).collect();
    let mut push: Vec<f64> = {
        let b = lock(&board);
        b.snaps.get("fleet-1").map_or_else(Vec::new, |v| {
            v.iter().flatten().map(|t| t.saturating_duration_since(renamed).as_secs_f64()).collect()
        })
    };
    push.sort_by(f64::total_cmp);
    let status_push = status_during.await.ok().flatten();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_push: Vec<u64> = pids.iter().map(|p| proc_sample(*p).0).collect();

    // Fleet exhaustion: every node reports PER_NODE of BUDGET_APP but node 0 one less (the total
    // one short of the budget), then node 0 reports the last one.
    ctl.stage.store(1, Ordering::SeqCst);
    let short = budget - 1;
    let mut reached = false;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until && !reached {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut all = true;
        for a in &addrs {
            all &= fleet_allowed(a, BUDGET_APP).await == Some(short);
        }
        reached = all;
    }
    let (exhaust, exhausted_nodes, early) = if reached {
        let early = lock(&board).exhausted.iter().filter(|e| e.is_some()).count();
        ctl.stage.store(2, Ordering::SeqCst);
        ctl.kick.notify_waiters();
        let live_now = lock(&board).live();
        wait_until(Duration::from_secs(30), || {
            lock(&board).exhausted.iter().filter(|e| e.is_some()).count() >= live_now
        })
        .await;
        let passed = ctl.passed.lock().unwrap_or_else(PoisonError::into_inner).unwrap_or(renamed);
        let b = lock(&board);
        let mut v: Vec<f64> =
            b.exhausted.iter().flatten().map(|t| t.saturating_duration_since(passed).as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        let k = v.len();
        (v, k, early)
    } else {
        eprintln!(
            "==> the fleet total of {BUDGET_APP} never reached {short} at every companion: no exhaustion measured"
        );
        (Vec::new(), 0, 0)
    };
    let live_end = lock(&board).live();
    let elapsed_total = lock(&board).start.elapsed().as_secs_f64();

    let mib = |k: &u64| format!("{:.0}", *k as f64 / 1024.0);
    let join = |v: Vec<String>| v.join("+");
    let ms = |s: Option<f64>| s.map_or("failed".to_string(), |s| format!("{:.0}", s * 1000.0));
    let mut st: Vec<f64> = status.iter().flatten().copied().collect();
    st.sort_by(f64::total_cmp);
    let load = load_average();
    println!(
        "fleet  nodes={n} companions={} policy={policy_bytes}B  load average {load}  (2 cores shared; simulator on the same cores)",
        o.companions
    );
    println!("  connected+ACKed      {connected}/{n} in {connect_secs:.2} s");
    println!(
        "  push                 {}/{} nodes; p50 {:.3} s  p99 {:.3} s  max {:.3} s",
        push.len(),
        connected,
        pct(&push, 50.0),
        pct(&push, 99.0),
        pct(&push, 100.0)
    );
    let (deltas, push_bytes) = lock(&board).sizes.get("fleet-1").copied().unwrap_or_default();
    println!(
        "  push message         {} bytes per node on average; {deltas} of {} as a delta",
        push_bytes / push.len().max(1),
        push.len()
    );
    println!(
        "  companion RSS MiB    steady {}  push peak {} (VmHWM {})  3 s after {}",
        join(steady_rss.iter().map(mib).collect()),
        join(peak_rss.iter().map(mib).collect()),
        join(hwm.iter().map(mib).collect()),
        join(rss_after_push.iter().map(mib).collect())
    );
    println!(
        "  companion CPU %      steady {}  push {} (over {push_window:.2} s)",
        join(steady_cpu.iter().map(|c| format!("{c:.0}")).collect()),
        join(push_cpu.iter().map(|c| format!("{c:.0}")).collect())
    );
    println!(
        "  status ms            steady median {} max {} ({} of 5 answered); during push {}",
        ms(st.get(st.len() / 2).copied()),
        ms(st.last().copied()),
        st.len(),
        ms(status_push)
    );
    println!(
        "  exhaustion           {exhausted_nodes}/{live_end} nodes; p50 {:.3} s  p99 {:.3} s  max {:.3} s{}",
        pct(&exhaust, 50.0),
        pct(&exhaust, 99.0),
        pct(&exhaust, 100.0),
        if early > 0 { format!(" ({early} heard before the budget passed!)") } else { String::new() }
    );
    println!("  streams open         steady {live_steady}, end {live_end}; run {elapsed_total:.0} s");
    if live_end < connected {
        let b = lock(&board);
        if let Some(why) = b.closed.iter().flatten().next() {
            println!("  a stream ended: {why}");
        }
    }
    if let Some(path) = &o.json {
        let r = serde_json::json!({
            "nodes": n, "companions": o.companions, "policy_bytes": policy_bytes, "load_average": load,
            "connected": connected, "connect_ack_s": connect_secs,
            "push_nodes": push.len(), "push_p50_s": pct(&push, 50.0), "push_p99_s": pct(&push, 99.0), "push_max_s": pct(&push, 100.0),
            "push_deltas": deltas, "push_bytes": push_bytes,
            "rss_steady_kib": steady_rss, "rss_push_peak_kib": peak_rss, "rss_hwm_kib": hwm, "rss_after_push_kib": rss_after_push,
            "cpu_steady_pct": steady_cpu, "cpu_push_pct": push_cpu, "push_window_s": push_window,
            "status_steady_s": status, "status_push_s": status_push,
            "exhausted_nodes": exhausted_nodes, "exhaustion_p50_s": pct(&exhaust, 50.0),
            "exhaustion_p99_s": pct(&exhaust, 99.0), "exhaustion_max_s": pct(&exhaust, 100.0),
            "streams_steady": live_steady, "streams_end": live_end,
        });
        let mut all: Vec<serde_json::Value> =
            std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        all.push(r);
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
    }
    drop(procs);
    std::process::exit(0)
}
