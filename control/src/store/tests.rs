//! The contract every [`Store`] keeps, run against each engine started for real (limitador's
//! `test_with_all_storage_impls!`): a SQLite file in a fresh directory, and a `redis-server` on a
//! free loopback port with its own directory and AOF on (skipped, loudly, where it is not
//! installed; `./build.sh` installs it).

use super::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A directory of its own under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "guardrail-store-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` of the test's own, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    pub dir: TempDir,
}

impl RedisServer {
    /// Starts one, or says loudly why not and returns `None` (redis-server not installed).
    pub fn start() -> Option<RedisServer> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            eprintln!(
                "\n!!! SKIPPED: redis-server is not installed (./build.sh installs it: apt-get install redis-server); \
                 the Redis store was NOT tested\n"
            );
            return None;
        }
        let dir = TempDir::new("redis");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(RedisServer { port, child, dir })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs each named contract test (an `async fn(&dyn Store)`, `Fn() -> Arc<dyn Store>` to open
/// another handle on the same data) against every engine.
macro_rules! test_with_all_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let dir = super::TempDir::new("sqlite");
                    let url = format!("sqlite:{}", dir.0.join("guardrail.db").display());
                    let store = super::open(&url, &super::TlsFiles::default()).await.unwrap();
                    super::$name(&*store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    let Some(server) = super::RedisServer::start() else { return };
                    let store = super::open(&server.url(), &super::TlsFiles::default()).await.unwrap();
                    super::$name(&*store).await;
                }
            }
        )*
    };
}

test_with_all_stores!(
    usage_keeps_the_highest_count_and_sums_the_fleet,
    usage_of_each_day_is_apart,
    concurrent_writers_lose_nothing,
    nodes_are_replaced_and_forgotten,
    companions_are_listed,
    the_audit_keeps_the_first_entry_newest_first,
    the_last_policy_is_kept,
    unregistered_callers_are_counted,
    fleet_budget_refusals_and_connectors_are_kept,
    a_batch_of_a_thousand_nodes_is_written_in_well_under_a_second,
    the_self_service_trail_is_kept_newest_first,
    a_request_changes_status_once,
);

fn counts(allowed: u64, denied: &[(&str, u64)]) -> Counts {
    Counts {
        allowed,
        throttled: allowed / 10,
        soft_limit: 0,
        denied: denied.iter().map(|(c, n)| ((*c).to_string(), *n)).collect(),
        ..Counts::default()
    }
}

fn row(day: u64, node: &str, app: &str, c: Counts) -> UsageRow {
    UsageRow { day, node: node.into(), app: app.into(), counts: c }
}

const DAY: u64 = 20_428;

async fn usage_keeps_the_highest_count_and_sums_the_fleet(store: &dyn Store) {
    store
        .put_usage(&[
            row(DAY, "a", "pos", counts(10, &[("quota-exceeded", 2)])),
            row(DAY, "b", "pos", counts(5, &[])),
            row(DAY, "a", "crm", counts(1, &[])),
        ])
        .await
        .unwrap();
    // A reordered (older) report and a repeated one change nothing; a newer one raises the count.
    store.put_usage(&[row(DAY, "a", "pos", counts(7, &[("quota-exceeded", 1)]))]).await.unwrap();
    store.put_usage(&[row(DAY, "b", "pos", counts(5, &[]))]).await.unwrap();
    store.put_usage(&[row(DAY, "b", "pos", counts(20, &[("budget-exhausted", 3)]))]).await.unwrap();

    let rows = store.usage(DAY).await.unwrap();
    assert_eq!(
        rows,
        vec![
            row(DAY, "a", "crm", counts(1, &[])),
            row(DAY, "a", "pos", counts(10, &[("quota-exceeded", 2)])),
            row(DAY, "b", "pos", counts(20, &[("budget-exhausted", 3)])),
        ],
        "per node: the highest of each count"
    );
    let totals = store.totals(DAY).await.unwrap();
    let pos = totals.get("pos").cloned().unwrap_or_default();
    assert_eq!(
        (pos.allowed, pos.throttled, pos.denied.get("quota-exceeded"), pos.denied.get("budget-exhausted")),
        (30, 3, Some(&2), Some(&3)),
        "totals: the sum over nodes ({pos:?})"
    );
    assert_eq!(totals.get("crm").map(|c| c.allowed), Some(1));
}

async fn fleet_budget_refusals_and_connectors_are_kept(store: &dyn Store) {
    let with = |allowed, fleet_budget, connectors: &[(&str, u64)]| Counts {
        fleet_budget,
        connectors: connectors.iter().map(|(c, n)| ((*c).to_string(), *n)).collect(),
        ..counts(allowed, &[])
    };
    store.put_usage(&[row(DAY, "a", "pos", with(10, 2, &[("crm", 7), ("mail", 3)]))]).await.unwrap();
    store.put_usage(&[row(DAY, "a", "pos", with(12, 1, &[("crm", 9)]))]).await.unwrap();
    store.put_usage(&[row(DAY, "b", "pos", with(4, 0, &[("crm", 4)]))]).await.unwrap();
    let rows = store.usage(DAY).await.unwrap();
    assert_eq!(
        rows.first().map(|r| r.counts.clone()),
        Some(with(12, 2, &[("crm", 9), ("mail", 3)])),
        "per node: the highest"
    );
    let totals = store.totals(DAY).await.unwrap();
    assert_eq!(totals.get("pos").cloned(), Some(with(16, 2, &[("crm", 13), ("mail", 3)])), "the sum over nodes");
}

async fn usage_of_each_day_is_apart(store: &dyn Store) {
    store.put_usage(&[row(DAY - 1, "a", "pos", counts(100, &[])), row(DAY, "a", "pos", counts(3, &[]))]).await.unwrap();
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(3));
    assert_eq!(store.totals(DAY - 1).await.unwrap().get("pos").map(|c| c.allowed), Some(100));
    assert!(store.usage(DAY + 1).await.unwrap().is_empty(), "a day without reports");
    store.prune(DAY).await.unwrap();
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(3), "pruning keeps the day kept");
}

async fn concurrent_writers_lose_nothing(store: &dyn Store) {
    // Eight nodes, each reporting a rising count 25 times, written concurrently.
    let writes = (1..=25u64).flat_map(|i| (0..8).map(move |n| (n, i)));
    let futures: Vec<_> = writes
        .map(|(n, i)| async move { store.put_usage(&[row(DAY, &format!("node-{n}"), "pos", counts(i, &[]))]).await })
        .collect();
    for result in futures_join(futures).await {
        result.unwrap();
    }
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(8 * 25));
}

/// Polls every future to completion concurrently (on this task).
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn node(id: &str, companion: &str, last_seen: i64, streams: u32) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        companion: companion.into(),
        envoy_version: "1.40.0".into(),
        acked_revision: "7".into(),
        last_seen,
        streams,
        ..Default::default()
    }
}

async fn nodes_are_replaced_and_forgotten(store: &dyn Store) {
    store.put_nodes(&[node("a", "c1", 100, 1), node("b", "c1", 100, 0)]).await.unwrap();
    let mut moved = node("a", "c2", 200, 1);
    moved.nacked_revision = "8".into();
    moved.last_error = "rules[0].when: bad".into();
    store.put_nodes(&[moved.clone()]).await.unwrap();
    assert_eq!(store.nodes().await.unwrap(), vec![moved.clone(), node("b", "c1", 100, 0)]);
    store.put_nodes(&[node("a", "c1", 210, 0)]).await.unwrap();
    assert_eq!(store.nodes().await.unwrap()[0], moved, "c1's late word of a's disconnection");
    store.put_nodes(&[node("a", "c2", 220, 0)]).await.unwrap();
    assert_eq!(store.nodes().await.unwrap()[0], node("a", "c2", 220, 0), "c2's is taken");
    store.forget_nodes(150).await.unwrap();
    assert_eq!(store.nodes().await.unwrap(), vec![node("a", "c2", 220, 0)], "b: last seen before 150");
}

async fn companions_are_listed(store: &dyn Store) {
    let c = |name: &str, revision: &str, last_seen| CompanionRecord {
        name: name.into(),
        revision: revision.into(),
        content_sha256: "ab".into(),
        started: 1,
        last_seen,
    };
    store.put_companion(&c("c2", "7", 10)).await.unwrap();
    store.put_companion(&c("c1", "7", 10)).await.unwrap();
    store.put_companion(&c("c1", "8", 11)).await.unwrap();
    assert_eq!(store.companions().await.unwrap(), vec![c("c1", "8", 11), c("c2", "7", 10)]);
    store.forget_nodes(11).await.unwrap();
    assert_eq!(store.companions().await.unwrap(), vec![c("c1", "8", 11)], "c2: silent since 10");
}

fn revision(label: &str, sha: &str, at: i64) -> Revision {
    Revision {
        revision: label.into(),
        content_sha256: sha.into(),
        first_served: at,
        source: "/etc/guardrail/policy.yaml".into(),
        companion: "c1".into(),
        changes: vec![Change {
            kind: "app".into(),
            id: "pos".into(),
            action: "lifecycle".into(),
            from: "approved".into(),
            to: "quarantined".into(),
        }],
    }
}

async fn the_audit_keeps_the_first_entry_newest_first(store: &dyn Store) {
    assert!(store.add_revision(&revision("1", "aa", 100)).await.unwrap());
    assert!(store.add_revision(&revision("2", "bb", 100)).await.unwrap(), "same second, later");
    assert!(!store.add_revision(&revision("1", "aa", 300)).await.unwrap(), "served again (another companion)");
    assert!(store.add_revision(&revision("2", "cc", 200)).await.unwrap(), "same label, other content");
    let all = store.revisions(10).await.unwrap();
    let got: Vec<(&str, &str, i64)> =
        all.iter().map(|r| (r.revision.as_str(), r.content_sha256.as_str(), r.first_served)).collect();
    assert_eq!(got, vec![("2", "cc", 200), ("2", "bb", 100), ("1", "aa", 100)]);
    assert_eq!(all[0], revision("2", "cc", 200), "every field kept");
    assert_eq!(store.revisions(1).await.unwrap().len(), 1);
    assert!(store.revisions(0).await.unwrap().is_empty());
}

async fn the_self_service_trail_is_kept_newest_first(store: &dyn Store) {
    let e = |at, kind: &str, id: &str| Event {
        at,
        kind: kind.into(),
        id: id.into(),
        app: "pos".into(),
        actor: "pos".into(),
        detail: "scope dataset:payments".into(),
        companion: "c1".into(),
    };
    assert!(store.events(10).await.unwrap().is_empty());
    store.add_events(&[]).await.unwrap();
    store.add_events(&[e(1, "token", "j1"), e(1, "token", "j2")]).await.unwrap();
    store.add_events(&[e(2, "request-filed", "r1")]).await.unwrap();
    let ids: Vec<String> = store.events(10).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec!["r1", "j2", "j1"], "newest first, same second in order written");
    assert_eq!(store.events(1).await.unwrap(), vec![e(2, "request-filed", "r1")], "every field kept");
    assert!(store.events(0).await.unwrap().is_empty());
}

async fn a_request_changes_status_once(store: &dyn Store) {
    let r = |id: &str, status: &str, at| RequestRecord {
        id: id.into(),
        status: status.into(),
        filed_at: at,
        record: format!(r#"{{"id":"{id}","status":"{status}"}}"#),
    };
    assert!(store.add_request(&r("a", "pending", 10)).await.unwrap());
    assert!(!store.add_request(&r("a", "pending", 11)).await.unwrap(), "an id is used once");
    assert!(store.add_request(&r("b", "pending", 20)).await.unwrap());
    assert!(store.update_request("pending", &r("a", "approved", 10)).await.unwrap());
    assert!(!store.update_request("pending", &r("a", "rejected", 10)).await.unwrap(), "decided already");
    assert!(!store.update_request("pending", &r("zz", "approved", 1)).await.unwrap(), "no such request");
    let all = store.requests().await.unwrap();
    assert_eq!(all, vec![r("b", "pending", 20), r("a", "approved", 10)], "newest first");
}

async fn the_last_policy_is_kept(store: &dyn Store) {
    assert_eq!(store.last_policy().await.unwrap(), None);
    store.set_last_policy(r#"{"revision":"1"}"#).await.unwrap();
    store.set_last_policy(r#"{"revision":"2"}"#).await.unwrap();
    assert_eq!(store.last_policy().await.unwrap().as_deref(), Some(r#"{"revision":"2"}"#));
}

async fn unregistered_callers_are_counted(store: &dyn Store) {
    let c = |kind: &str, id: &str, count, last_seen| Caller { kind: kind.into(), id: id.into(), count, last_seen };
    store.note_callers(&[c("api-key", "0a1b2c3d", 3, 100), c("app", "shadow-app", 1, 50)]).await.unwrap();
    store.note_callers(&[c("api-key", "0a1b2c3d", 2, 90), c("app", "shadow-app", 1, 60)]).await.unwrap();
    assert_eq!(
        store.callers().await.unwrap(),
        vec![c("api-key", "0a1b2c3d", 5, 100), c("app", "shadow-app", 2, 60)],
        "counts add up, last seen only moves forward"
    );
}

async fn a_batch_of_a_thousand_nodes_is_written_in_well_under_a_second(store: &dyn Store) {
    // A second of reports from 1,000 nodes using 5 apps each, as the store task writes it.
    let rows: Vec<UsageRow> = (0..1_000)
        .flat_map(|n| (0..5).map(move |a| row(DAY, &format!("node-{n}"), &format!("app-{a}"), counts(n + 1, &[]))))
        .collect();
    let nodes: Vec<NodeRecord> = (0..1_000).map(|n| node(&format!("node-{n}"), "c1", 100, 1)).collect();
    let started = Instant::now();
    store.put_usage(&rows).await.unwrap();
    store.put_nodes(&nodes).await.unwrap();
    let written = started.elapsed();
    let started = Instant::now();
    let (usage, totals) = (store.usage(DAY).await.unwrap(), store.totals(DAY).await.unwrap());
    eprintln!(
        "{}: wrote 5,000 usage rows and 1,000 nodes in {written:?}; read them back in {:?}",
        store.url(),
        started.elapsed()
    );
    assert_eq!((usage.len(), totals.get("app-0").map(|c| c.allowed)), (5_000, Some(500_500)));
    assert!(written < Duration::from_secs(2), "{written:?}");
}

// === engine-specific ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_companion_on_one_sqlite_file_is_refused() {
    let dir = TempDir::new("sqlite-lock");
    let url = format!("sqlite:{}", dir.0.join("guardrail.db").display());
    let first = open(&url, &TlsFiles::default()).await.unwrap();
    let second = open(&url, &TlsFiles::default()).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        second.contains("in use by another companion") && second.contains(&std::process::id().to_string()),
        "{second}"
    );
    drop(first);
    assert!(open(&url, &TlsFiles::default()).await.is_ok(), "free again once the first is gone");
}

#[tokio::test]
async fn store_tls_files_are_checked_when_the_store_is_opened() {
    let dir = TempDir::new("store-tls");
    let not_pem = dir.0.join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let tls = TlsFiles { ca: Some(not_pem.clone()), ..TlsFiles::default() };
    let error = |url: &str, tls: &TlsFiles| {
        let url = url.to_string();
        let tls = tls.clone();
        async move { open(&url, &tls).await.err().map(|e| e.to_string()).unwrap_or_default() }
    };
    let plain = error("redis://127.0.0.1:1/0", &tls).await;
    assert!(plain.contains("--store-ca") && plain.contains("rediss://"), "{plain}");
    let sqlite = error(&format!("sqlite:{}", dir.0.join("g.db").display()), &tls).await;
    assert!(sqlite.contains("not sqlite:"), "{sqlite}");
    let bad = error("rediss://127.0.0.1:1/0", &tls).await;
    assert!(bad.contains(&format!("--store-ca {}: holds no PEM certificate", not_pem.display())), "{bad}");
    let missing = TlsFiles { ca: Some(dir.0.join("nope.pem")), ..TlsFiles::default() };
    let gone = error("rediss://127.0.0.1:1/0", &missing).await;
    assert!(gone.contains("--store-ca") && gone.contains("nope.pem") && gone.contains("cannot read"), "{gone}");
    // Without files, rediss:// opens (it connects on first use, trusting the system's CAs).
    assert!(open("rediss://127.0.0.1:1/0", &TlsFiles::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_data_outlives_the_store() {
    let dir = TempDir::new("sqlite-reopen");
    let url = format!("sqlite:{}", dir.0.join("guardrail.db").display());
    let store = open(&url, &TlsFiles::default()).await.unwrap();
    store.put_usage(&[row(DAY, "a", "pos", counts(4, &[]))]).await.unwrap();
    drop(store);
    let store = open(&url, &TlsFiles::default()).await.unwrap();
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_companions_share_one_redis() {
    let Some(server) = RedisServer::start() else { return };
    let (one, two) = (
        open(&server.url(), &TlsFiles::default()).await.unwrap(),
        open(&server.url(), &TlsFiles::default()).await.unwrap(),
    );
    let (rows_a, rows_b) = ([row(DAY, "a", "pos", counts(10, &[]))], [row(DAY, "b", "pos", counts(15, &[]))]);
    let (a, b) = tokio::join!(one.put_usage(&rows_a), two.put_usage(&rows_b));
    a.unwrap();
    b.unwrap();
    assert_eq!(one.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(25));
    assert_eq!(two.usage(DAY).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companions_on_one_redis_share_each_clients_token_bucket() {
    let Some(server) = RedisServer::start() else { return };
    let (one, two) = (
        open(&server.url(), &TlsFiles::default()).await.unwrap(),
        open(&server.url(), &TlsFiles::default()).await.unwrap(),
    );
    let hour = Duration::from_secs(3600);
    let mut taken = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { &one } else { &two };
        taken.push(store.take_token_request("pos", 5, hour).await.unwrap().unwrap());
    }
    assert_eq!(taken.iter().filter(|t| t.is_ok()).count(), 5, "5 per hour across both: {taken:?}");
    assert!(taken[..5].iter().all(std::result::Result::is_ok), "{taken:?}");
    for refused in &taken[5..] {
        let wait = refused.unwrap_err();
        assert!((700..=720).contains(&wait), "one is back in 720 s (3600 / 5), not {wait}");
    }
    // Another client has a bucket of its own; a fast rate refills within the test.
    assert_eq!(two.take_token_request("other", 5, hour).await.unwrap(), Some(Ok(())));
    let fast = Duration::from_millis(200);
    assert_eq!(one.take_token_request("fast", 1, fast).await.unwrap(), Some(Ok(())));
    assert_eq!(two.take_token_request("fast", 1, fast).await.unwrap(), Some(Err(1)), "a wait under 1 s says 1");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(two.take_token_request("fast", 1, fast).await.unwrap(), Some(Ok(())), "refilled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_leaves_the_token_bucket_to_its_one_companion() {
    let dir = TempDir::new("sqlite-rate");
    let store = open(&format!("sqlite:{}", dir.0.join("guardrail.db").display()), &TlsFiles::default()).await.unwrap();
    assert_eq!(store.take_token_request("pos", 5, Duration::from_secs(3600)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_an_error_then_the_store_reconnects() {
    let Some(server) = RedisServer::start() else { return };
    let store = open(&server.url(), &TlsFiles::default()).await.unwrap();
    store.put_usage(&[row(DAY, "a", "pos", counts(1, &[]))]).await.unwrap();
    let port = server.port;
    let dir = server.dir.0.clone();
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();
    let started = Instant::now();
    let failed = store.put_usage(&[row(DAY, "a", "pos", counts(2, &[]))]).await;
    assert!(failed.is_err(), "written to a stopped Redis?");
    assert!(started.elapsed() < Duration::from_secs(6), "the error took {:?}", started.elapsed());
    // The same port and directory again: the AOF brings the data back, the store reconnects.
    server.child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if store.put_usage(&[row(DAY, "a", "pos", counts(2, &[]))]).await.is_ok() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no reconnection");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(2));
}

/// A SQLite file written before the console's counts (no `extra` column) is opened, its usage
/// read back, and new counts written on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_of_before_the_console_gains_its_column() {
    let dir = TempDir::new("sqlite-old");
    let path = dir.0.join("guardrail.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE usage (day INTEGER NOT NULL, node TEXT NOT NULL, app TEXT NOT NULL,
                 allowed INTEGER NOT NULL, throttled INTEGER NOT NULL, soft_limit INTEGER NOT NULL,
                 denied TEXT NOT NULL, PRIMARY KEY (day, app, node)) WITHOUT ROWID;
             CREATE TABLE totals (day INTEGER NOT NULL, app TEXT NOT NULL,
                 allowed INTEGER NOT NULL, throttled INTEGER NOT NULL, soft_limit INTEGER NOT NULL,
                 denied TEXT NOT NULL, PRIMARY KEY (day, app)) WITHOUT ROWID;",
        )
        .unwrap();
        conn.execute(&format!("INSERT INTO usage VALUES ({DAY}, 'a', 'pos', 5, 0, 0, '{{}}')"), []).unwrap();
        conn.execute(&format!("INSERT INTO totals VALUES ({DAY}, 'pos', 5, 0, 0, '{{}}')"), []).unwrap();
    }
    let store = open(&format!("sqlite:{}", path.display()), &TlsFiles::default()).await.unwrap();
    assert_eq!(store.totals(DAY).await.unwrap().get("pos").map(|c| c.allowed), Some(5), "the old rows are read");
    let mut c = counts(7, &[]);
    c.connectors.insert("crm".into(), 7);
    store.put_usage(&[row(DAY, "a", "pos", c)]).await.unwrap();
    let total = store.totals(DAY).await.unwrap().get("pos").cloned().unwrap_or_default();
    assert_eq!((total.allowed, total.connectors.get("crm").copied()), (7, Some(7)), "{total:?}");
}
