//! `guardrail status`: asks a running companion for its fleet and prints it.

use crate::log::{now_secs, rfc3339_secs};
use crate::pb::policy_service_client::PolicyServiceClient;
use anyhow::Context;
use guardrail_proto::v1;
use serde_json::json;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::ClientTlsConfig;

/// How long to wait for the companion, connecting and answering.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The companion a client command asks: `--server` and the TLS flags.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// The companion's address, `HOST:PORT` or `http://HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub server: String,
    #[command(flatten)]
    pub tls: crate::tls::ClientArgs,
}

impl Remote {
    /// The URL to call and its TLS configuration.
    pub fn target(&self) -> anyhow::Result<(String, Option<ClientTlsConfig>)> {
        let tls = self.tls.config()?;
        let url = server_url(&self.server, tls.is_some());
        if tls.is_some() && url.starts_with("http://") {
            return Err(crate::UsageError(format!(
                "--tls-ca: the server {url} is plain http://; use https:// or HOST:PORT"
            ))
            .into());
        }
        Ok((url, tls))
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: Remote,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let (url, tls) = args.remote.target()?;
    let tls_on = tls.is_some();
    let status = match runtime.block_on(fetch(&url, tls)) {
        Ok(status) => status,
        Err(why) => {
            eprintln!("error: cannot get the status from the companion at {url}: {why}");
            // A TLS mismatch shows up as a protocol error or a cancelled call: say what may be missing.
            if !why.contains("tcp connect error") && !why.contains("invalid peer certificate") {
                if !tls_on {
                    eprintln!(
                        "hint: if the companion serves TLS, pass --tls-ca (and --tls-cert/--tls-key for mutual TLS)"
                    );
                } else if args.remote.tls.tls_cert.is_none() {
                    eprintln!("hint: a companion started with --tls-client-ca also needs --tls-cert and --tls-key");
                }
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    print(args.json, || to_json(&status), || render(&status, now_secs()))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `json()` (pretty, with `--json`) or `text()` to standard output.
pub fn print(
    as_json: bool,
    json: impl FnOnce() -> serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if as_json {
        let text = serde_json::to_string_pretty(&json()).context("encoding JSON")?;
        writeln!(out, "{text}").context("writing to standard output")
    } else {
        out.write_all(text().as_bytes()).context("writing to standard output")
    }
}

/// `HOST:PORT` becomes `http://HOST:PORT` (`https://` with `tls`); a URL stays as it is.
pub fn server_url(server: &str, tls: bool) -> String {
    if server.contains("://") {
        server.to_string()
    } else if tls {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    }
}

/// Calls `Status`; the error is a readable reason.
pub async fn fetch(url: &str, tls: Option<ClientTlsConfig>) -> Result<v1::StatusResponse, String> {
    let channel = connect(url, tls).await?;
    let mut client = PolicyServiceClient::new(channel);
    let response =
        client.status(v1::StatusRequest {}).await.map_err(|s| format!("{} ({:?})", s.message(), s.code()))?;
    Ok(response.into_inner())
}

/// A channel to the companion at `url`; the error is a readable reason.
pub async fn connect(url: &str, tls: Option<ClientTlsConfig>) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {}", error_chain(&e)))?;
    } else if url.starts_with("https://") {
        return Err("https:// needs --tls-ca (the CA that signed the companion's certificate)".to_string());
    }
    endpoint.connect().await.map_err(|e| error_chain(&e))
}

/// An error and its causes on one line (`transport error: tcp connect error: Connection refused`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The status as JSON (`--json`): the proto fields, by their proto names.
pub fn to_json(s: &v1::StatusResponse) -> serde_json::Value {
    json!({
        "revision": s.revision,
        "day": s.day,
        "date": date_of_day(s.day),
        "last_policy_error": s.last_policy_error,
        "companion": s.companion,
        "store": s.store.as_ref().map(|st| json!({"url": st.url, "available": st.available, "error": st.error})),
        "companions": s.companions.iter().map(|c| json!({
            "name": c.name,
            "revision": c.revision,
            "content_sha256": c.content_sha256,
            "last_seen_unix": c.last_seen_unix,
            "alive": c.alive,
        })).collect::<Vec<_>>(),
        "drift": drift(s),
        "nodes": s.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "companion": n.companion,
            "connected": n.connected,
            "streams": n.streams,
            "client_certificate": n.client_certificate,
            "envoy_version": n.envoy_version,
            "filter_version": n.filter_version,
            "acked_revision": n.acked_revision,
            "nacked_revision": n.nacked_revision,
            "last_error": n.last_error,
            "last_seen_unix": n.last_seen_unix,
            "in_sync": n.acked_revision == s.revision,
        })).collect::<Vec<_>>(),
        "fleet_usage": s.fleet_usage.iter().map(|u| json!({
            "app": u.app,
            "allowed": u.allowed,
            "throttled": u.throttled,
            "soft_limit": u.soft_limit,
            "denied": u.denied.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "daily_budget": s.daily_budgets.get(&u.app),
            "exhausted": s.exhausted_apps.contains(&u.app),
        })).collect::<Vec<_>>(),
        "exhausted_apps": s.exhausted_apps,
        "exempt": s.exempt.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "candidate": s.candidate.as_ref().map(|c| json!({
            "revision": c.revision,
            "last_error": c.last_error,
            "applied_nodes": c.applied_nodes,
            "nacked_nodes": c.nacked_nodes,
            "differences": c.differences.iter().map(|d| json!({
                "app": d.app, "enforced": d.enforced, "candidate": d.candidate, "count": d.count,
            })).collect::<Vec<_>>(),
        })),
    })
}

/// The `candidate` section: what the shadow candidate would have decided differently.
fn render_candidate(c: &v1::CandidateStatus, out: &mut String) {
    out.push_str(&format!("\ncandidate {} (in shadow, not enforced):\n", c.revision));
    let applied = if c.applied_nodes.is_empty() { "none yet".to_string() } else { c.applied_nodes.join(", ") };
    out.push_str(&format!("  applied by: {applied}\n"));
    for nacked in &c.nacked_nodes {
        out.push_str(&format!("  NACKED by {nacked}\n"));
    }
    if !c.last_error.is_empty() {
        out.push_str(&format!("  newest candidate change refused:\n    {}\n", c.last_error.replace('\n', "\n    ")));
    }
    if c.differences.is_empty() {
        out.push_str("  (no request decided differently yet)\n");
    } else {
        let mut rows = vec![row(&["APP", "ENFORCED → CANDIDATE", "REQUESTS"])];
        for d in &c.differences {
            rows.push(row(&[&d.app, &format!("{} → {}", d.enforced, d.candidate), &d.count.to_string()]));
        }
        out.push_str(&table(&rows));
    }
}

/// The revisions served by live companions, when they are not all the same one (sorted).
pub fn drift(s: &v1::StatusResponse) -> Vec<String> {
    let revisions: std::collections::BTreeSet<&str> =
        s.companions.iter().filter(|c| c.alive).map(|c| c.revision.as_str()).collect();
    if revisions.len() > 1 {
        revisions.into_iter().map(str::to_string).collect()
    } else {
        Vec::new()
    }
}

/// `YYYY-MM-DD` of a day number.
fn date_of_day(day: u64) -> String {
    let secs = i64::try_from(day.saturating_mul(86_400)).unwrap_or(i64::MAX);
    rfc3339_secs(secs).chars().take(10).collect()
}

/// The status as tables, for people.
pub fn render(s: &v1::StatusResponse, now: i64) -> String {
    let mut out = String::new();
    let error =
        if s.last_policy_error.is_empty() { "none".to_string() } else { s.last_policy_error.replace('\n', "\n  ") };
    out.push_str(&format!("serving revision {}\n", s.revision));
    out.push_str(&format!("last policy error: {error}\n"));
    if let Some(store) = &s.store {
        // An error names the store already.
        let state =
            if store.available { format!("ok ({})", store.url) } else { format!("unavailable ({})", store.error) };
        out.push_str(&format!("companion {}, store: {state}\n", dash(&s.companion)));
    }
    if s.companions.len() > 1 {
        let mut rows = vec![row(&["COMPANION", "REVISION", "ALIVE", "LAST SEEN"])];
        for c in &s.companions {
            let alive = if c.alive { "yes" } else { "no" };
            rows.push(row(&[&c.name, dash(&c.revision), alive, &ago(now - c.last_seen_unix)]));
        }
        out.push_str(&format!("companions sharing the store: {}\n", s.companions.len()));
        out.push_str(&table(&rows));
    }
    let drift = drift(s);
    if !drift.is_empty() {
        out.push_str(&format!("DRIFT: live companions serve different revisions: {}\n", drift.join(", ")));
    }
    out.push('\n');

    let in_sync = s.nodes.iter().filter(|n| n.connected && n.acked_revision == s.revision).count();
    let connected = s.nodes.iter().filter(|n| n.connected).count();
    out.push_str(&format!("nodes: {connected} connected, {in_sync} on revision {}\n", s.revision));
    if s.nodes.is_empty() {
        out.push_str("  (none yet)\n");
    } else {
        let mut rows =
            vec![row(&["NODE", "CONNECTED", "ACKED", "NACKED", "LAST SEEN", "ENVOY", "FILTER", "COMPANION"])];
        for n in &s.nodes {
            let connected = match (n.connected, n.streams) {
                (false, _) => "no".to_string(),
                (true, 1) => "yes".to_string(),
                (true, k) => format!("yes ({k} streams)"),
            };
            rows.push(row(&[
                &n.node_id,
                &connected,
                dash(&n.acked_revision),
                dash(&n.nacked_revision),
                &ago(now - n.last_seen_unix),
                dash(&n.envoy_version),
                dash(&n.filter_version),
                dash(&n.companion),
            ]));
        }
        out.push_str(&table(&rows));
        for n in s.nodes.iter().filter(|n| !n.client_certificate.is_empty()) {
            out.push_str(&format!("  {} client certificate {}\n", n.node_id, n.client_certificate));
        }
        for n in s.nodes.iter().filter(|n| !n.last_error.is_empty()) {
            out.push_str(&format!(
                "  {} rejected {}: {}\n",
                n.node_id,
                n.nacked_revision,
                n.last_error.replace('\n', "\n    ")
            ));
        }
    }

    out.push_str(&format!("\nfleet usage on {} (UTC):\n", date_of_day(s.day)));
    if s.fleet_usage.is_empty() {
        out.push_str("  (no usage reported yet)\n");
    } else {
        let mut rows = vec![row(&["APP", "ALLOWED", "BUDGET", "DENIED", "THROTTLED", "SOFT-LIMIT", "STATE"])];
        for u in &s.fleet_usage {
            let denied: u64 = u.denied.values().fold(0, |a, n| a.saturating_add(*n));
            let budget = s.daily_budgets.get(&u.app).map_or_else(|| "-".to_string(), u64::to_string);
            let state = if s.exhausted_apps.contains(&u.app) { "budget exhausted" } else { "ok" };
            rows.push(row(&[
                &u.app,
                &u.allowed.to_string(),
                &budget,
                &denied.to_string(),
                &u.throttled.to_string(),
                &u.soft_limit.to_string(),
                state,
            ]));
        }
        out.push_str(&table(&rows));
    }
    if !s.exempt.is_empty() {
        let mut exempt: Vec<(&String, &u64)> = s.exempt.iter().collect();
        exempt.sort();
        let list: Vec<String> = exempt.iter().map(|(id, n)| format!("{id} {n}")).collect();
        out.push_str(&format!("exempt (requests passed without an app, no quota): {}\n", list.join(", ")));
    }
    if let Some(c) = &s.candidate {
        render_candidate(c, &mut out);
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_string()).collect()
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|cell| cell.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(" ");
        for (cell, width) in r.iter().zip(&widths) {
            line.push(' ');
            line.push_str(cell);
            line.push_str(&" ".repeat(width.saturating_sub(cell.chars().count()) + 1));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `3s ago`, `4m ago`, `2h ago`, `3d ago`.
fn ago(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7_199 => format!("{}m ago", secs / 60),
        7_200..=172_799 => format!("{}h ago", secs / 3_600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> v1::StatusResponse {
        v1::StatusResponse {
            revision: "8".into(),
            nodes: vec![
                v1::Node {
                    node_id: "envoy-a".into(),
                    envoy_version: "1.33.0".into(),
                    filter_version: "0.1.0".into(),
                    acked_revision: "7".into(),
                    nacked_revision: "8".into(),
                    last_error: "rules[0].when: bad\nrules[1].when: bad".into(),
                    last_seen_unix: 990,
                    connected: true,
                    streams: 1,
                    client_certificate: "sha256:0a1b".into(),
                    companion: "cp-0:18000".into(),
                },
                v1::Node {
                    node_id: "envoy-b".into(),
                    acked_revision: "8".into(),
                    last_seen_unix: 0,
                    ..Default::default()
                },
            ],
            fleet_usage: vec![v1::AppUsage {
                app: "pos".into(),
                allowed: 100,
                denied: [("quota-exceeded".to_string(), 2)].into_iter().collect(),
                ..Default::default()
            }],
            day: 20_000,
            last_policy_error: String::new(),
            exhausted_apps: vec!["pos".into()],
            daily_budgets: [("pos".to_string(), 100)].into_iter().collect(),
            companion: "cp-0:18000".into(),
            store: Some(v1::StoreStatus {
                url: "redis://cache:6379/0".into(),
                available: false,
                error: "refused".into(),
            }),
            companions: vec![
                v1::Companion {
                    name: "cp-0:18000".into(),
                    revision: "8".into(),
                    last_seen_unix: 999,
                    alive: true,
                    ..Default::default()
                },
                v1::Companion {
                    name: "cp-1:18000".into(),
                    revision: "7".into(),
                    last_seen_unix: 998,
                    alive: true,
                    ..Default::default()
                },
            ],
            candidate: None,
            exempt: [("health-checks".to_string(), 40)].into(),
        }
    }

    #[test]
    fn renders_the_candidate_in_shadow() {
        let mut s = sample();
        s.candidate = Some(v1::CandidateStatus {
            revision: "9+sha256:0a1b2c3d".into(),
            applied_nodes: vec!["envoy-a".into()],
            differences: vec![v1::ShadowDifference {
                app: "checkout".into(),
                enforced: "allow".into(),
                candidate: "residency-violation".into(),
                count: 12,
            }],
            ..Default::default()
        });
        let text = render(&s, 1_000);
        assert!(
            text.contains("candidate 9+sha256:0a1b2c3d (in shadow, not enforced):\n  applied by: envoy-a\n"),
            "{text}"
        );
        assert!(
            text.contains("checkout") && text.contains("allow → residency-violation") && text.contains("12"),
            "{text}"
        );
        let json = to_json(&s);
        assert_eq!(json["candidate"]["differences"][0]["candidate"], "residency-violation");
        assert_eq!(json["candidate"]["differences"][0]["count"], 12);
        assert!(to_json(&sample())["candidate"].is_null(), "no candidate: null");
    }

    #[test]
    fn renders_nodes_and_usage() {
        let text = render(&sample(), 1_000);
        for want in [
            "serving revision 8",
            "last policy error: none",
            "nodes: 1 connected, 0 on revision 8",
            "envoy-a  yes        7      8       10s ago",
            "envoy-b  no         8      -",
            "envoy-a rejected 8: rules[0].when: bad\n    rules[1].when: bad",
            "  envoy-a client certificate sha256:0a1b\n",
            "fleet usage on 2024-10-04 (UTC)",
            "companion cp-0:18000, store: unavailable (refused)\n",
            "companions sharing the store: 2\n",
            "DRIFT: live companions serve different revisions: 7, 8\n",
            "0.1.0   cp-0:18000\n",
            "pos  100      100     2       0          0           budget exhausted",
            "exempt (requests passed without an app, no quota): health-checks 40\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in:\n{text}");
        }
    }

    #[test]
    fn json_has_every_field() {
        let v = to_json(&sample());
        assert_eq!(v["nodes"][0]["nacked_revision"], "8");
        assert_eq!(v["nodes"][1]["in_sync"], true);
        assert_eq!(
            (v["nodes"][0]["client_certificate"].as_str(), v["nodes"][1]["client_certificate"].as_str()),
            (Some("sha256:0a1b"), Some(""))
        );
        assert_eq!(v["fleet_usage"][0]["daily_budget"], 100);
        assert_eq!(v["fleet_usage"][0]["exhausted"], true);
        assert_eq!(v["fleet_usage"][0]["denied"]["quota-exceeded"], 2);
        assert_eq!(v["date"], "2024-10-04");
        assert_eq!(v["nodes"][0]["companion"], "cp-0:18000");
        assert_eq!(v["store"]["available"], false);
        assert_eq!(v["drift"], serde_json::json!(["7", "8"]));
        assert_eq!(v["exempt"]["health-checks"], 40);
    }

    #[test]
    fn addresses_and_ages() {
        assert_eq!(server_url("127.0.0.1:18000", false), "http://127.0.0.1:18000");
        assert_eq!(server_url("127.0.0.1:18000", true), "https://127.0.0.1:18000");
        assert_eq!(server_url("https://cp:443", false), "https://cp:443");
        assert_eq!(ago(5), "5s ago");
        assert_eq!(ago(600), "10m ago");
        assert_eq!(ago(-3), "0s ago");
    }
}
