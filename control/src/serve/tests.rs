//! The policy service over a real in-process gRPC server (127.0.0.1:0) with tonic clients, a
//! policy file in a temporary directory, a watcher polled by hand and a fake clock.

use super::hub::{day_of, Clock, Hub, Offer};
use super::service::{StreamLimits, MAX_MESSAGE_BYTES};
use super::watch::{Polled, Source, Watcher, CONFIRM_POLLS, RACY};
use super::{start, Running};
use crate::pb::policy_service_client::PolicyServiceClient;
use crate::store::tests::TempDir;
use guardrail_proto::v1::{self, client_message::Msg, server_message};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// Long enough for anything that should happen; a broken test fails after it instead of hanging.
const WAIT: Duration = Duration::from_secs(5);
/// 2026-03-21T12:00:00Z.
const NOON: i64 = 1_774_094_400;

fn policy(revision: &str, budget: u64, extra_app: bool) -> String {
    let mut text = format!(
        "\
apiVersion: guardrail/v1
kind: Policy
revision: {revision}
settings:
  gateway_region: eu-west-1
tiers:
  small:
    rate: {{requests: 100, per: 1s}}
    daily_budget: {budget}
connectors:
  approved: [upstream]
apps:
  - id: app-a
    environment: prod
    tier: small
    lifecycle: published
    region: eu-west-1
    data_classes: [public]
    connectors: [upstream]
"
    );
    if extra_app {
        text.push_str(
            "  - id: app-b
    environment: prod
    tier: small
    lifecycle: published
    region: eu-west-1
    data_classes: [public]
    connectors: [upstream]
",
        );
    }
    text
}

/// [`policy`] as indented JSON.
fn json_policy(revision: &str, budget: u64, extra_app: bool) -> String {
    let value: serde_json::Value = serde_yaml_ng::from_str(&policy(revision, budget, extra_app)).unwrap();
    serde_json::to_string_pretty(&value).unwrap()
}

// === Fixture ===

struct Fixture {
    dir: TempDir,
    file: PathBuf,
    hub: Arc<Hub>,
    now: Arc<AtomicI64>,
    watcher: Watcher,
    server: Option<Running>,
}

impl Fixture {
    async fn new(text: &str) -> Fixture {
        Fixture::with_limits(text, StreamLimits::default()).await
    }

    async fn with_limits(text: &str, limits: StreamLimits) -> Fixture {
        Fixture::with_file("policy.yaml", text, limits).await
    }

    async fn with_file(name: &str, text: &str, limits: StreamLimits) -> Fixture {
        let dir = TempDir::new("serve");
        let file = dir.0.join(name);
        std::fs::write(&file, text).unwrap();
        let now = Arc::new(AtomicI64::new(NOON));
        let clock_now = now.clone();
        let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        let source = Source::new(&file);
        let (path, read, doc) = source.load().unwrap();
        let hub = Hub::new(&path, doc, clock).unwrap();
        let watcher = Watcher::new(source, hub.clone(), &path, &read);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = start(listener, hub.clone(), limits, None).unwrap();
        Fixture { dir, file, hub, now, watcher, server: Some(server) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.as_ref().unwrap().addr)
    }

    async fn client(&self) -> PolicyServiceClient<Channel> {
        let client = tokio::time::timeout(WAIT, PolicyServiceClient::connect(self.url())).await.unwrap().unwrap();
        client.max_decoding_message_size(MAX_MESSAGE_BYTES * 2)
    }

    /// Opens a stream; the Hello (if any) is sent first.
    async fn open(&self, hello: Option<&str>) -> Node {
        let (tx, rx) = mpsc::channel(16);
        if let Some(id) = hello {
            tx.send(hello_message(id)).await.unwrap();
        }
        let mut client = self.client().await;
        let response = tokio::time::timeout(WAIT, client.stream(ReceiverStream::new(rx))).await.unwrap().unwrap();
        Node { tx, rx: response.into_inner() }
    }

    /// Writes the policy file and polls the watcher until it acts (a YAML change once confirmed).
    fn change(&mut self, text: &str) -> Polled {
        std::fs::write(&self.file, text).unwrap();
        self.settle()
    }

    fn settle(&mut self) -> Polled {
        for _ in 0..CONFIRM_POLLS + 2 {
            let polled = self.watcher.poll();
            if polled != Polled::Nothing {
                return polled;
            }
        }
        Polled::Nothing
    }

    async fn status(&self) -> v1::StatusResponse {
        let mut client = self.client().await;
        tokio::time::timeout(WAIT, client.status(v1::StatusRequest {})).await.unwrap().unwrap().into_inner()
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop(&self.hub).await;
        }
    }
}

/// A client stream, as a filter would hold it.
struct Node {
    tx: mpsc::Sender<v1::ClientMessage>,
    rx: Streaming<v1::ServerMessage>,
}

impl Node {
    async fn send(&self, msg: Msg) {
        self.tx.send(v1::ClientMessage { msg: Some(msg) }).await.unwrap();
    }

    /// The next server message, or the status the stream ended with.
    async fn next(&mut self) -> Result<Option<server_message::Msg>, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(result) => result.map(|m| m.and_then(|m| m.msg)),
            Err(_) => panic!("no server message within {WAIT:?}"),
        }
    }

    async fn snapshot(&mut self) -> v1::PolicySnapshot {
        match self.next().await {
            Ok(Some(server_message::Msg::Snapshot(s))) => s,
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    async fn fleet(&mut self) -> v1::FleetState {
        match self.next().await {
            Ok(Some(server_message::Msg::Fleet(f))) => f,
            other => panic!("expected fleet state, got {other:?}"),
        }
    }

    /// Nothing arrives within a short while.
    async fn quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(150), self.rx.message()).await;
        assert!(got.is_err(), "expected no message, got {got:?}");
    }

    /// Hello, then the initial snapshot and fleet state.
    async fn joined(fixture: &Fixture, id: &str) -> (Node, v1::PolicySnapshot) {
        let mut node = fixture.open(Some(id)).await;
        let snapshot = node.snapshot().await;
        node.fleet().await;
        (node, snapshot)
    }
}

/// A node's Hello; a node whose id ends with `-zlib` inflates snapshots, as the filter does.
fn hello_message(id: &str) -> v1::ClientMessage {
    v1::ClientMessage {
        msg: Some(Msg::Hello(v1::Hello {
            node_id: id.into(),
            envoy_version: "1.33.0".into(),
            filter_version: "0.1.0".into(),
            revision: String::new(),
            accepts_zlib: id.ends_with("-zlib"),
            accepts_delta: false,
        })),
    }
}

fn usage(day: u64, app: &str, allowed: u64) -> Msg {
    Msg::Usage(v1::UsageReport {
        day,
        apps: vec![v1::AppUsage { app: app.into(), allowed, ..Default::default() }],
        ..Default::default()
    })
}

/// Polls `check` until it holds (or fails the test after [`WAIT`]).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn revision_in(json: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    value["revision"].as_str().unwrap_or_default().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

// === Stream protocol ===

#[tokio::test]
async fn hello_gets_the_snapshot_then_the_fleet_state() {
    let f = Fixture::new(&policy("1", 10, false)).await;
    let mut node = f.open(Some("envoy-1")).await;
    let snapshot = node.snapshot().await;
    assert_eq!(snapshot.revision, "1");
    assert_eq!(revision_in(&json(&snapshot)), "1", "the JSON names the same revision");
    guardrail_core::compile::compile_json_str(&json(&snapshot)).expect("the pushed JSON is a valid policy");
    let fleet = node.fleet().await;
    assert_eq!((fleet.day, fleet.exhausted_apps.len()), (day_of(NOON), 0));
    // A node that inflates gets the same document compressed, and nothing else.
    let (_zlib_node, compressed) = Node::joined(&f, "envoy-2-zlib").await;
    assert!(compressed.policy_json.is_empty() && !compressed.policy_zlib.is_empty(), "sent compressed");
    assert!(compressed.policy_zlib.len() < snapshot.policy_json.len(), "and smaller");
    assert_eq!((compressed.revision.as_str(), json(&compressed)), (snapshot.revision.as_str(), json(&snapshot)));
    node.quiet().await;
    f.stop().await;
}

#[tokio::test]
async fn the_first_message_must_be_hello() {
    let f = Fixture::new(&policy("1", 10, false)).await;
    let mut node = f.open(None).await;
    node.send(Msg::Ack(v1::Ack { revision: "1".into(), candidate: false })).await;
    let status = node.next().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let mut node = f.open(None).await;
    node.send(Msg::Hello(v1::Hello::default())).await;
    let status = node.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "empty node id: {status:?}");
    f.stop().await;
}

#[tokio::test]
async fn a_stream_without_hello_is_closed_after_the_timeout() {
    let limits = StreamLimits { hello_timeout: Duration::from_millis(100), ..StreamLimits::default() };
    let f = Fixture::with_limits(&policy("1", 10, false), limits).await;
    let mut silent = f.open(None).await;
    let status = silent.next().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    f.stop().await;
}

#[tokio::test]
async fn acks_and_nacks_are_recorded_and_shown_by_status() {
    let mut f = Fixture::new(&policy("1", 10, false)).await;
    let (node, _) = Node::joined(&f, "envoy-1").await;
    node.send(Msg::Ack(v1::Ack { revision: "1".into(), candidate: false })).await;
    eventually("ACK recorded", || f.hub.node("envoy-1").is_some_and(|n| n.acked_revision == "1")).await;

    assert_eq!(f.change(&policy("2", 10, false)), Polled::Offered(Offer::Published("2".into())));
    node.send(Msg::Nack(v1::Nack {
        revision: "2".into(),
        error: "rules[0].when: unknown function\nrules[1].when: syntax error".into(),
        candidate: false,
    }))
    .await;
    eventually("NACK recorded", || f.hub.node("envoy-1").is_some_and(|n| n.nacked_revision == "2")).await;

    let status = f.status().await;
    assert_eq!(status.revision, "2");
    let n = &status.nodes[0];
    assert_eq!(
        (n.node_id.as_str(), n.connected, n.streams, n.acked_revision.as_str(), n.nacked_revision.as_str()),
        ("envoy-1", true, 1, "1", "2")
    );
    assert!(n.last_error.contains("unknown function"), "{n:?}");
    assert_eq!(n.envoy_version, "1.33.0");
    assert_eq!(n.last_seen_unix, NOON);

    node.send(Msg::Ack(v1::Ack { revision: "2".into(), candidate: false })).await;
    eventually("ACK of the served revision clears the NACK", || {
        f.hub.node("envoy-1").is_some_and(|n| n.acked_revision == "2" && n.last_error.is_empty())
    })
    .await;

    drop(node);
    eventually("disconnect recorded", || f.hub.node("envoy-1").is_some_and(|n| n.streams == 0)).await;
    let status = f.status().await;
    assert!(!status.nodes[0].connected, "kept, as disconnected");
    f.stop().await;
}

// === Policy changes ===

#[tokio::test]
async fn a_policy_change_is_pushed_to_every_stream() {
    let mut f = Fixture::new(&policy("1", 10, false)).await;
    let (mut a, _) = Node::joined(&f, "envoy-a").await;
    let (mut b, _) = Node::joined(&f, "envoy-b").await;
    assert_eq!(f.change(&policy("2", 10, true)), Polled::Offered(Offer::Published("2".into())));
    for node in [&mut a, &mut b] {
        let s = node.snapshot().await;
        assert_eq!(s.revision, "2");
        assert!(json(&s).contains("app-b"));
    }
    // A new stream gets the newest policy right away.
    let (_c, s) = Node::joined(&f, "envoy-c").await;
    assert_eq!(s.revision, "2");
    f.stop().await;
}

#[tokio::test]
async fn an_invalid_change_is_refused_and_the_last_good_policy_stays() {
    let mut f = Fixture::new(&policy("1", 10, false)).await;
    let (mut node, _) = Node::joined(&f, "envoy-1").await;
    let bad = policy("2", 10, false).replace("tier: small", "tier: huge");
    let Polled::Invalid(lines) = f.change(&bad) else {
        panic!("an unknown tier must be refused");
    };
    let file = path_str(&f.file).to_string();
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{file}:15: apps[0].tier"))),
        "names file, line and field: {lines:?}"
    );
    assert_eq!(f.hub.current().revision, "1");
    node.quiet().await;
    let status = f.status().await;
    assert_eq!(status.revision, "1");
    assert!(status.last_policy_error.contains("apps[0].tier"), "{status:?}");

    // Fixed: pushed, and the error is history.
    assert_eq!(f.change(&policy("2", 10, false)), Polled::Offered(Offer::Published("2".into())));
    assert_eq!(node.snapshot().await.revision, "2");
    assert_eq!(f.status().await.last_policy_error, "");
    f.stop().await;
}

#[tokio::test]
async fn a_json_change_is_pushed_at_the_first_poll_and_never_half_written() {
    let mut f = Fixture::with_file("policy.json", &json_policy("1", 10, false), StreamLimits::default()).await;
    let (mut node, _) = Node::joined(&f, "envoy-1").await;

    // Written in place and caught half-written: never pushed, however long it stays so (once
    // confirmed it is refused like any invalid change).
    let full = json_policy("2", 10, true);
    std::fs::write(&f.file, &full[..full.find("app-b").unwrap()]).unwrap();
    let mut refused = 0;
    for _ in 0..CONFIRM_POLLS + 2 {
        match f.watcher.poll() {
            Polled::Nothing => {}
            Polled::Invalid(_) => refused += 1,
            other => panic!("a half-written JSON file was acted on: {other:?}"),
        }
    }
    assert_eq!(refused, 1, "refused once, once confirmed");
    assert_eq!(f.hub.current().revision, "1");
    node.quiet().await;

    // Complete: a JSON document cannot be a prefix of another, so it is pushed at once.
    std::fs::write(&f.file, &full).unwrap();
    assert_eq!(f.watcher.poll(), Polled::Offered(Offer::Published("2".into())));
    assert!(json(&node.snapshot().await).contains("app-b"), "the whole file");
    assert_eq!(f.watcher.poll(), Polled::Nothing, "acted on once");

    // Replaced by an atomic rename: pushed at the first poll too.
    let tmp = f.dir.0.join("policy.json.tmp");
    std::fs::write(&tmp, json_policy("3", 10, true)).unwrap();
    std::fs::rename(&tmp, &f.file).unwrap();
    assert_eq!(f.watcher.poll(), Polled::Offered(Offer::Published("3".into())));
    assert_eq!(node.snapshot().await.revision, "3");

    // Rewritten with the same content, or the same document laid out differently: nothing pushed.
    std::fs::write(&f.file, json_policy("3", 10, true)).unwrap();
    assert_eq!(f.watcher.poll(), Polled::Nothing);
    let compact: serde_json::Value = serde_json::from_str(&json_policy("3", 10, true)).unwrap();
    std::fs::write(&f.file, compact.to_string()).unwrap();
    assert_eq!(f.watcher.poll(), Polled::Offered(Offer::Unchanged("3".into())));
    node.quiet().await;

    // An error is refused at the first poll, naming the file, the line and the field.
    let bad = json_policy("4", 10, true).replacen("\"tier\": \"small\"", "\"tier\": \"gold\"", 1);
    let line = bad[..bad.find("gold").unwrap()].matches('\n').count() + 1;
    std::fs::write(&f.file, &bad).unwrap();
    let Polled::Invalid(lines) = f.watcher.poll() else {
        panic!("an invalid JSON change must be refused at once");
    };
    let want = format!("{}:{line}: apps[0].tier: unknown tier `gold`", f.file.display());
    assert!(lines.len() == 1 && lines[0].starts_with(&want), "{lines:?} should start with {want}");
    assert_eq!(f.hub.current().revision, "3");
    assert!(f.status().await.last_policy_error.contains("unknown tier `gold`"));
    node.quiet().await;
    f.stop().await;
}

#[test]
fn a_stat_is_trusted_once_the_file_was_read_a_clock_tick_after_its_last_write() {
    let dir = TempDir::new("serve");
    let file = dir.0.join("policy.json");
    std::fs::write(&file, "{}").unwrap();
    let stamp = Source::new(&file).stamp().unwrap();
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert!(stamp.racy(modified), "read as it was written");
    assert!(stamp.racy(modified + RACY / 2), "read within the window");
    assert!(!stamp.racy(modified + RACY), "read past the window");
    assert!(stamp.racy(modified - Duration::from_secs(1)), "read before it was written (a clock step)");
    // Whole seconds: a file system with coarse times gets a wider window.
    let coarse = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let f = std::fs::File::options().write(true).open(&file).unwrap();
    f.set_modified(coarse).unwrap();
    let stamp = Source::new(&file).stamp().unwrap();
    assert!(stamp.racy(coarse + RACY), "within a second of a whole-second time");
    assert!(!stamp.racy(coarse + Duration::from_secs(3)), "seconds later");
}

#[tokio::test]
async fn a_half_written_or_vanished_file_is_never_applied() {
    let mut f = Fixture::new(&policy("1", 10, false)).await;
    let (mut node, _) = Node::joined(&f, "envoy-1").await;

    // A prefix of the new file is itself a valid policy (without app-b); it is seen once only,
    // before the rest is written, so it is never applied.
    let full = policy("2", 10, true);
    let prefix = &full[..full.find("  - id: app-b").unwrap()];
    std::fs::write(&f.file, prefix).unwrap();
    assert_eq!(f.watcher.poll(), Polled::Nothing);
    std::fs::write(&f.file, &full).unwrap();
    for _ in 1..CONFIRM_POLLS {
        assert_eq!(f.watcher.poll(), Polled::Nothing, "not confirmed yet");
    }
    assert_eq!(f.watcher.poll(), Polled::Offered(Offer::Published("2".into())));
    let s = node.snapshot().await;
    assert!(json(&s).contains("app-b"), "the whole file");

    // Vanished: reported, nothing pushed; back: nothing to push either.
    std::fs::remove_file(&f.file).unwrap();
    assert!(matches!(f.settle(), Polled::Unreadable(e) if e.contains("cannot read")));
    assert_eq!(f.hub.current().revision, "2");
    assert!(f.status().await.last_policy_error.contains("cannot read"));
    assert_eq!(f.change(&full), Polled::Offered(Offer::Unchanged("2".into())));
    node.quiet().await;

    // Replaced by an atomic rename, as editors and `kubectl cp` do.
    let tmp = f.dir.0.join(".policy.yaml.tmp");
    std::fs::write(&tmp, policy("3", 10, true)).unwrap();
    std::fs::rename(&tmp, &f.file).unwrap();
    assert_eq!(f.settle(), Polled::Offered(Offer::Published("3".into())));
    assert_eq!(node.snapshot().await.revision, "3");
    f.stop().await;
}

#[tokio::test]
async fn revisions_name_one_content_only() {
    let mut f = Fixture::new(&policy("7", 10, false)).await;
    let (mut node, _) = Node::joined(&f, "envoy-1").await;

    // Comments and layout only: same policy, nothing to push.
    let commented = format!("# reviewed\n{}", policy("7", 10, false));
    assert_eq!(f.change(&commented), Polled::Offered(Offer::Unchanged("7".into())));
    node.quiet().await;

    // New content under the same revision: labelled with its hash.
    let Polled::Offered(Offer::Published(label)) = f.change(&policy("7", 20, false)) else {
        panic!("a content change must be pushed");
    };
    assert!(label.starts_with("7+sha256:") && label.len() == 17, "{label}");
    let s = node.snapshot().await;
    assert_eq!((s.revision.as_str(), revision_in(&json(&s))), (label.as_str(), label.clone()));

    // Back to the first content: its first label again.
    assert_eq!(f.change(&policy("7", 10, false)), Polled::Offered(Offer::Published("7".into())));
    assert_eq!(node.snapshot().await.revision, "7");
    f.stop().await;
}

#[tokio::test]
async fn a_directory_holds_exactly_one_policy_file() {
    let dir = TempDir::new("serve");
    let file = dir.0.join("policy.yaml");
    std::fs::write(&file, policy("1", 10, false)).unwrap();
    for ignored in [".policy.yaml.swp", "policy.yaml~", "policy.yaml.tmp", "README.md"] {
        std::fs::write(dir.0.join(ignored), "junk").unwrap();
    }
    let source = Source::new(&dir.0);
    let (path, _, doc) = source.load().unwrap();
    assert_eq!((path.as_path(), doc.policy.revision.as_str()), (file.as_path(), "1"));

    std::fs::write(dir.0.join("other.json"), "{}").unwrap();
    let err = source.load().unwrap_err();
    assert!(err[0].contains("holds 2 policy files (other.json, policy.yaml)"), "{err:?}");
    std::fs::remove_file(dir.0.join("other.json")).unwrap();
    std::fs::remove_file(&file).unwrap();
    let err = source.load().unwrap_err();
    assert!(err[0].contains("holds no policy file"), "{err:?}");
}

// === Fleet budgets ===

#[tokio::test]
async fn usage_of_two_nodes_sums_and_exhausts_the_app_fleet_wide() {
    let f = Fixture::new(&policy("1", 10, true)).await;
    let today = day_of(NOON);
    let (mut a, _) = Node::joined(&f, "envoy-a").await;
    let (mut b, _) = Node::joined(&f, "envoy-b").await;

    a.send(usage(today, "app-a", 6)).await;
    a.send(usage(today, "app-b", 3)).await;
    eventually("first report", || f.hub.status().fleet_usage.len() == 2).await;
    a.quiet().await;
    b.send(usage(today, "app-a", 4)).await;
    for node in [&mut a, &mut b] {
        let fleet = node.fleet().await;
        assert_eq!((fleet.day, fleet.exhausted_apps), (today, vec!["app-a".to_string()]));
    }
    let status = f.status().await;
    let app_a = status.fleet_usage.iter().find(|u| u.app == "app-a").unwrap();
    assert_eq!(app_a.allowed, 10);
    assert_eq!(status.exhausted_apps, vec!["app-a".to_string()]);
    assert_eq!(status.daily_budgets.get("app-a"), Some(&10));

    // A repeated report changes nothing (counts are absolute).
    b.send(usage(today, "app-a", 4)).await;
    a.quiet().await;

    // A new node learns of it on Hello.
    let mut c = f.open(Some("envoy-c")).await;
    c.snapshot().await;
    assert_eq!(c.fleet().await.exhausted_apps, vec!["app-a".to_string()]);

    // A new UTC day: nothing is exhausted.
    f.now.store(NOON + 86_400, Ordering::SeqCst);
    f.hub.tick();
    for node in [&mut a, &mut b, &mut c] {
        let fleet = node.fleet().await;
        assert_eq!((fleet.day, fleet.exhausted_apps.len()), (today + 1, 0));
    }
    f.stop().await;
}

#[tokio::test]
async fn a_raised_budget_lifts_the_exhaustion() {
    let mut f = Fixture::new(&policy("1", 10, false)).await;
    let today = day_of(NOON);
    let (mut a, _) = Node::joined(&f, "envoy-a").await;
    a.send(usage(today, "app-a", 10)).await;
    assert_eq!(a.fleet().await.exhausted_apps, vec!["app-a".to_string()]);
    assert!(matches!(f.change(&policy("2", 50, false)), Polled::Offered(Offer::Published(_))));
    assert_eq!(a.snapshot().await.revision, "2");
    assert_eq!(a.fleet().await.exhausted_apps.len(), 0);
    f.stop().await;
}

// === Misbehaving clients ===

#[tokio::test]
async fn bad_and_oversized_messages_close_only_their_stream() {
    let f = Fixture::new(&policy("1", 10, false)).await;
    let today = day_of(NOON);
    let (mut good, _) = Node::joined(&f, "good").await;

    let (mut big, _) = Node::joined(&f, "big").await;
    big.send(Msg::Usage(v1::UsageReport {
        day: today,
        apps: vec![v1::AppUsage { app: "x".repeat(MAX_MESSAGE_BYTES + 1), ..Default::default() }],
        ..Default::default()
    }))
    .await;
    let status = big.next().await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let (mut skewed, _) = Node::joined(&f, "skewed").await;
    skewed.send(usage(today + 5, "app-a", 1)).await;
    let status = skewed.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The well-behaved stream is still served.
    good.send(usage(today, "app-a", 10)).await;
    assert_eq!(good.fleet().await.exhausted_apps, vec!["app-a".to_string()]);
    f.stop().await;
}

#[tokio::test]
async fn a_flooding_client_is_cut_off() {
    let limits = StreamLimits { messages_per_sec: 1, message_burst: 5, ..StreamLimits::default() };
    let f = Fixture::with_limits(&policy("1", 10, false), limits).await;
    let (mut flood, _) = Node::joined(&f, "flood").await;
    for _ in 0..10 {
        flood.send(Msg::Ack(v1::Ack { revision: "1".into(), candidate: false })).await;
    }
    let status = flood.next().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    f.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_up_the_others() {
    let limits = StreamLimits { outbound_queue: 2, ..StreamLimits::default() };
    // 256 KiB snapshots: a few overflow the HTTP/2 windows (64 KiB) of a client that does not read.
    let owner = "o".repeat(256 * 1024);
    let with_padding = |revision: &str| {
        policy(revision, 10, false)
            .replace("    environment: prod\n", &format!("    environment: prod\n    owner: {owner}\n"))
    };
    let mut f = Fixture::with_limits(&with_padding("1"), limits).await;
    let (stuck, _) = Node::joined(&f, "stuck").await;
    let (mut reader, _) = Node::joined(&f, "reader").await;
    let mut revision = 1;
    while f.hub.node("stuck").is_some_and(|n| n.streams > 0) {
        revision += 1;
        assert!(revision < 100, "the stuck stream was never closed");
        let expected = revision.to_string();
        assert_eq!(f.change(&with_padding(&expected)), Polled::Offered(Offer::Published(expected.clone())));
        assert_eq!(reader.snapshot().await.revision, expected, "the reader keeps up");
    }
    drop(stuck);
    assert_eq!(f.hub.node("reader").map(|n| n.streams), Some(1));
    f.stop().await;
}

// === The store ===

/// Gives the fixture's hub `store`, loaded as `serve` does on start.
async fn attach(f: &Fixture, store: &Arc<dyn crate::store::Store>, name: &str) -> super::persist::Persist {
    f.hub.attach_store(store.clone(), name);
    let mut persist = super::persist::Persist::new(f.hub.clone(), store.clone());
    persist.load().await.unwrap();
    persist
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_started_on_its_store_counts_the_nodes_that_went_away_and_keeps_the_audit() {
    let dir = TempDir::new("persist");
    let store = crate::store::open(&format!("sqlite:{}", dir.0.join("guardrail.db").display()), &Default::default())
        .await
        .unwrap();
    let today = day_of(NOON);

    let mut before = Fixture::new(&policy("1", 10, false)).await;
    let mut persist = attach(&before, &store, "cp-0").await;
    let (node, _) = Node::joined(&before, "envoy-1").await;
    node.send(usage(today, "app-a", 6)).await;
    node.send(Msg::Ack(v1::Ack { revision: "1".into(), candidate: false })).await;
    eventually("the report", || before.hub.status().fleet_usage.iter().any(|u| u.allowed == 6)).await;
    assert!(matches!(before.change(&policy("2", 10, true)), Polled::Offered(Offer::Published(_))));
    let started = std::time::Instant::now();
    persist.flush().await.unwrap();
    eprintln!("one batch written to SQLite in {:?}", started.elapsed());
    drop(node);
    before.stop().await;

    // Another process, as after a crash: nothing of the fleet in memory but what the store gives.
    let after = Fixture::new(&policy("2", 10, true)).await;
    let started = std::time::Instant::now();
    let mut persist = attach(&after, &store, "cp-0").await;
    eprintln!("loaded from SQLite in {:?}", started.elapsed());
    let status = after.status().await;
    assert_eq!(status.fleet_usage.iter().find(|u| u.app == "app-a").map(|u| u.allowed), Some(6));
    let node = status.nodes.iter().find(|n| n.node_id == "envoy-1").cloned().unwrap_or_default();
    assert_eq!((node.acked_revision.as_str(), node.connected, node.companion.as_str()), ("1", false, "cp-0"));
    // 6 spent by a node that is gone + 4 here: the budget of 10 is spent fleet-wide.
    let (mut node, _) = Node::joined(&after, "envoy-2").await;
    node.send(usage(today, "app-a", 4)).await;
    assert_eq!(node.fleet().await.exhausted_apps, vec!["app-a".to_string()]);

    persist.flush().await.unwrap();
    let trail = store.revisions(10).await.unwrap();
    let got: Vec<(&str, usize)> = trail.iter().map(|r| (r.revision.as_str(), r.changes.len())).collect();
    assert_eq!(got, vec![("2", 1), ("1", 0)], "revision 2 added app-b; the restart served 2 again: no entry");
    assert_eq!(
        trail[0].changes[0],
        crate::store::Change { kind: "app".into(), id: "app-b".into(), action: "added".into(), ..Default::default() }
    );
    after.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companions_sharing_a_store_see_each_others_nodes_and_spend_one_budget() {
    let Some(redis) = crate::store::tests::RedisServer::start() else { return };
    let (a, b) = (Fixture::new(&policy("1", 10, false)).await, Fixture::new(&policy("1", 10, false)).await);
    let store_a = crate::store::open(&redis.url(), &Default::default()).await.unwrap();
    let store_b = crate::store::open(&redis.url(), &Default::default()).await.unwrap();
    let mut persist_a = attach(&a, &store_a, "cp-a").await;
    let mut persist_b = attach(&b, &store_b, "cp-b").await;
    let today = day_of(NOON);
    let (node_a, _) = Node::joined(&a, "envoy-a").await;
    let (mut node_b, _) = Node::joined(&b, "envoy-b").await;
    node_a.send(usage(today, "app-a", 6)).await;
    eventually("a's report", || a.hub.status().fleet_usage.iter().any(|u| u.allowed == 6)).await;
    persist_a.flush().await.unwrap();
    node_b.send(usage(today, "app-a", 4)).await;
    eventually("b's report", || b.hub.status().fleet_usage.iter().any(|u| u.allowed == 4)).await;
    persist_b.flush().await.unwrap();
    // What b's store task reads once a second: the totals, the companions and their nodes.
    b.hub.set_store_totals(today, store_b.totals(today).await.unwrap());
    assert_eq!(node_b.fleet().await.exhausted_apps, vec!["app-a".to_string()], "6 on a + 4 on b");
    b.hub.set_companions(store_b.companions().await.unwrap());
    b.hub.absorb(&[], &store_b.nodes().await.unwrap());
    let nodes: Vec<(String, bool, String)> =
        b.hub.status().nodes.into_iter().map(|n| (n.node_id, n.connected, n.companion)).collect();
    assert_eq!(nodes, vec![("envoy-a".into(), true, "cp-a".into()), ("envoy-b".into(), true, "cp-b".into())]);
    a.stop().await;
    b.stop().await;
}

// === The shadow candidate ===

#[tokio::test]
async fn a_candidate_goes_out_apart_and_its_differences_reach_status() {
    let f = Fixture::new(&policy("1", 10, false)).await;
    let (mut node, _) = Node::joined(&f, "envoy-a").await;
    node.quiet().await;
    let (mut inflating, _) = Node::joined(&f, "envoy-b-zlib").await;
    let candidate =
        v1::Candidate { revision: "2+sha256:00000000".into(), policy_json: "{}".into(), ..Default::default() };
    assert!(f.hub.shadow.set(Some(candidate.clone())));
    match node.next().await {
        Ok(Some(server_message::Msg::Candidate(c))) => assert_eq!(c, candidate),
        other => panic!("expected the candidate, got {other:?}"),
    }
    // A node that inflates gets it compressed, as snapshots.
    match inflating.next().await {
        Ok(Some(server_message::Msg::Candidate(c))) => {
            assert_eq!((c.revision.as_str(), c.policy_json.as_str()), (candidate.revision.as_str(), ""));
            let mut json = String::new();
            std::io::Read::read_to_string(&mut flate2::read::ZlibDecoder::new(&c.policy_zlib[..]), &mut json).unwrap();
            assert_eq!(json, "{}");
        }
        other => panic!("expected the candidate, compressed, got {other:?}"),
    }
    node.send(Msg::Ack(v1::Ack { revision: candidate.revision.clone(), candidate: true })).await;
    node.send(Msg::Usage(v1::UsageReport {
        day: day_of(NOON),
        candidate_revision: candidate.revision.clone(),
        shadow: vec![v1::ShadowDifference {
            app: "app-a".into(),
            enforced: "allow".into(),
            candidate: "residency-violation".into(),
            count: 4,
        }],
        ..Default::default()
    }))
    .await;
    let mut status = f.status().await;
    for _ in 0..50 {
        if status.candidate.as_ref().is_some_and(|c| !c.differences.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = f.status().await;
    }
    assert_eq!(status.nodes[0].acked_revision, "", "a candidate ACK is not an ACK of the enforced policy");
    let c = status.candidate.expect("a candidate section");
    assert_eq!(c.applied_nodes, vec!["envoy-a".to_string()]);
    assert_eq!((c.differences[0].app.as_str(), c.differences[0].count), ("app-a", 4));
    // A late joiner gets it after the snapshot, before the fleet state (a first fleet state with
    // no candidate before it tells a node none is served); stopping reaches every node.
    let mut late = f.open(Some("envoy-b")).await;
    late.snapshot().await;
    assert!(matches!(late.next().await, Ok(Some(server_message::Msg::Candidate(_)))));
    late.fleet().await;
    assert!(f.hub.shadow.set(None));
    for n in [&mut node, &mut late] {
        match n.next().await {
            Ok(Some(server_message::Msg::Candidate(c))) => assert_eq!(c.revision, "", "stop shadowing"),
            other => panic!("expected an empty candidate, got {other:?}"),
        }
    }
    assert!(f.status().await.candidate.is_none());
    f.stop().await;
}

/// A pushed snapshot's JSON (UTF-8 by construction), inflated when it came compressed.
fn json(snapshot: &v1::PolicySnapshot) -> String {
    if snapshot.policy_zlib.is_empty() {
        return String::from_utf8(snapshot.policy_json.to_vec()).expect("policy_json is UTF-8");
    }
    assert!(snapshot.policy_json.is_empty(), "one of policy_json and policy_zlib, not both");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::ZlibDecoder::new(&snapshot.policy_zlib[..]), &mut text)
        .expect("policy_zlib inflates to UTF-8");
    text
}

#[tokio::test]
async fn exemption_counts_are_summed_over_nodes_and_shown_apart_from_apps() {
    let f = Fixture::new(&policy("1", 10, false)).await;
    let report = |n: u64, app: u64| {
        Msg::Usage(v1::UsageReport {
            day: day_of(NOON),
            apps: vec![v1::AppUsage { app: "app-a".into(), allowed: app, ..Default::default() }],
            exempt: [("health-checks".to_string(), n), ("mesh-peers".to_string(), 1)].into(),
            ..Default::default()
        })
    };
    let (a, _) = Node::joined(&f, "envoy-a").await;
    let (b, _) = Node::joined(&f, "envoy-b").await;
    a.send(report(5, 2)).await;
    b.send(report(7, 3)).await;
    // A repeated (absolute) count is not counted twice.
    a.send(report(5, 2)).await;
    let mut status = f.status().await;
    for _ in 0..50 {
        if status.exempt.get("health-checks") == Some(&12) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = f.status().await;
    }
    let exempt: std::collections::BTreeMap<_, _> = status.exempt.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(exempt, [("health-checks", 12), ("mesh-peers", 2)].into());
    let apps: Vec<(&str, u64)> = status.fleet_usage.iter().map(|u| (u.app.as_str(), u.allowed)).collect();
    assert_eq!(apps, [("app-a", 5)], "exemptions are not apps");
    // An exemption id that is not one is refused, naming the limit.
    let (mut c, _) = Node::joined(&f, "envoy-c").await;
    c.send(Msg::Usage(v1::UsageReport {
        day: day_of(NOON),
        exempt: [(String::new(), 1)].into(),
        ..Default::default()
    }))
    .await;
    match c.next().await {
        Err(status) => assert!(status.message().contains("exemption counts"), "{status:?}"),
        other => panic!("expected the stream to end, got {other:?}"),
    }
    f.stop().await;
}

/// A stream whose request says its messages are compressed (the server decodes none) is refused
/// with UNIMPLEMENTED, as tonic's own server does, before any task starts.
#[tokio::test]
async fn a_compressed_stream_is_refused() {
    use super::service::PolicyServer;
    use super::wire::{Routed, STREAM_PATH};
    use tonic::codegen::{http, Service};
    let f = Fixture::new(&policy("1", 10, false)).await;
    let mut routed = Routed::new(PolicyServer::new(f.hub.clone(), StreamLimits::default()), MAX_MESSAGE_BYTES);
    let request = http::Request::builder()
        .method("POST")
        .uri(STREAM_PATH)
        .header("content-type", "application/grpc")
        .header("grpc-encoding", "gzip")
        .body(tonic::body::Body::empty())
        .unwrap();
    let response = routed.call(request).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "12", "{:?}", response.headers());
    assert!(f.hub.status().nodes.is_empty());
}

/// [`policy`] with `apps` more apps (`app-0`…), app `quarantined` quarantined: big enough that a
/// one-app change is worth a delta.
fn many_apps(revision: &str, apps: usize, quarantined: usize) -> String {
    let mut text = policy(revision, 10, false);
    for k in 0..apps {
        let lifecycle = if k == quarantined { "quarantined" } else { "published" };
        text.push_str(&format!(
            "  - id: app-{k}\n    environment: prod\n    tier: small\n    lifecycle: {lifecycle}\n    \
             region: eu-west-1\n    data_classes: [public]\n    connectors: [upstream]\n"
        ));
    }
    text
}

impl Node {
    /// The next snapshot, past any fleet state.
    async fn next_snapshot(&mut self) -> v1::PolicySnapshot {
        loop {
            match self.next().await {
                Ok(Some(server_message::Msg::Snapshot(s))) => return s,
                Ok(Some(server_message::Msg::Fleet(_))) => {}
                other => panic!("expected a snapshot, got {other:?}"),
            }
        }
    }

    async fn ack(&self, revision: &str) {
        self.send(Msg::Ack(v1::Ack { revision: revision.into(), candidate: false })).await;
    }
}

/// A node that applies deltas gets a change as edits of the revision it ACKed, which give exactly
/// the policy served whole; if it NACKs the delta it gets the revision whole (and no NACK is
/// recorded against it). A node that has not ACKed that base, or does not take deltas, gets it
/// whole.
#[tokio::test]
async fn a_change_goes_as_a_delta_to_nodes_holding_the_revision_before() {
    use sha2::{Digest, Sha256};
    let delta_hello = |id: &str| v1::ClientMessage {
        msg: Some(Msg::Hello(v1::Hello { node_id: id.into(), accepts_delta: true, ..Default::default() })),
    };
    let mut f = Fixture::new(&many_apps("1", 200, 999)).await;
    let mut nodes = Vec::new();
    for (id, delta) in [("a", true), ("b", true), ("c", false)] {
        let (tx, rx) = mpsc::channel(16);
        tx.send(if delta { delta_hello(id) } else { hello_message(id) }).await.unwrap();
        let response = f.client().await.stream(ReceiverStream::new(rx)).await.unwrap();
        let mut node = Node { tx, rx: response.into_inner() };
        let first = node.next_snapshot().await;
        assert!(first.delta.is_none(), "the first snapshot on a stream is whole");
        nodes.push((node, first));
    }
    let first = nodes[0].1.clone();
    // a and c ACK revision 1; b does not.
    nodes[0].0.ack(&first.revision).await;
    nodes[2].0.ack(&first.revision).await;
    eventually("the ACKs are recorded", || {
        ["a", "c"].iter().all(|id| f.hub.node(id).is_some_and(|n| n.acked_revision == first.revision))
    })
    .await;

    assert_eq!(f.change(&many_apps("2", 200, 7)), Polled::Offered(Offer::Published("2".into())));
    let served = f.hub.current().json.clone();
    let second = nodes[0].0.next_snapshot().await;
    let delta = second.delta.clone().expect("a delta for a node holding revision 1");
    assert!(second.policy_json.is_empty() && second.policy_zlib.is_empty(), "the delta alone");
    assert_eq!((second.revision.as_str(), delta.base_revision.as_str()), ("2", "1"));
    let json = guardrail_proto::delta::apply(&first.policy_json, &delta.ops, usize::MAX).unwrap();
    assert_eq!(String::from_utf8(json.clone()).unwrap(), served, "the delta gives the policy served");
    assert_eq!(Sha256::digest(&json)[..], delta.sha256[..]);
    assert!(delta.encoded_len() * 10 < served.len(), "{} bytes for a one-app change", delta.encoded_len());
    for k in [1, 2] {
        let whole = nodes[k].0.next_snapshot().await;
        assert!(whole.delta.is_none(), "node {k} did not ACK revision 1, or takes no deltas");
        assert_eq!(whole.policy_json, served.as_bytes());
    }

    nodes[0]
        .0
        .send(Msg::Nack(v1::Nack { revision: "2".into(), error: "delta: SHA-256 differs".into(), candidate: false }))
        .await;
    let again = nodes[0].0.next_snapshot().await;
    assert!(again.delta.is_none(), "after a NACK of the delta, the revision whole");
    assert_eq!((again.revision.as_str(), &again.policy_json[..]), ("2", served.as_bytes()));
    nodes[0].0.ack("2").await;
    eventually("a holds revision 2", || f.hub.node("a").is_some_and(|n| n.acked_revision == "2")).await;
    assert_eq!(f.hub.node("a").unwrap().nacked_revision, "", "a delta NACK is not the policy's");

    // A NACK of a delta's policy itself (not of the delta) is recorded, and nothing is resent.
    assert_eq!(f.change(&many_apps("3", 200, 8)), Polled::Offered(Offer::Published("3".into())));
    let third = nodes[0].0.next_snapshot().await;
    assert_eq!(third.delta.map(|d| d.base_revision), Some("2".into()));
    nodes[0]
        .0
        .send(Msg::Nack(v1::Nack { revision: "3".into(), error: "apps[8]: unknown field".into(), candidate: false }))
        .await;
    eventually("a's NACK of revision 3", || f.hub.node("a").is_some_and(|n| n.nacked_revision == "3")).await;
    let resent = tokio::time::timeout(Duration::from_millis(200), nodes[0].0.next_snapshot()).await;
    assert!(resent.is_err(), "nothing resent: {resent:?}");
    f.stop().await;
}
