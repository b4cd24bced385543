//! `guardrail catalog PATH [--json]`: every app of a policy as the console shows it — who owns it,
//! where it runs, what it may reach, its risk tier with the reasons and its trust score with each
//! factor ([`guardrail_core::catalog`]), its API keys as fingerprints (never keys) and the quota in
//! force with any unexpired override. [`entries`] is what the console reads too.

use crate::log::{now_secs, rfc3339_secs};
use anyhow::Context;
use guardrail_core::catalog::{self, Evidence, Usage};
use guardrail_core::compile::{App, CompiledPolicy, Rate};
use guardrail_core::time::NANOS_PER_SEC;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML or JSON), or a directory holding one, as `guardrail serve` takes it.
    path: PathBuf,
    /// Print one JSON document (`{"revision", "apps": [..]}`) instead of text.
    #[arg(long)]
    json: bool,
}

/// The first 8 hex digits of an API-key digest: enough to tell keys apart, nothing to use.
pub fn fingerprint(digest: &[u8; 32]) -> String {
    hex::encode(digest.get(..4).unwrap_or_default())
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub department: Option<String>,
    pub environment: &'static str,
    pub tier: String,
    pub lifecycle: &'static str,
    pub region: String,
    pub data_classes: Vec<&'static str>,
    pub connectors: Vec<Connector>,
    pub risk: Risk,
    pub trust: Trust,
    pub api_keys: ApiKeys,
    pub quota: Quota,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connector {
    pub name: String,
    pub approved: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Risk {
    pub tier: &'static str,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trust {
    pub score: u8,
    pub factors: Vec<Factor>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Factor {
    pub name: &'static str,
    pub detail: String,
    pub points: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiKeys {
    pub count: usize,
    pub fingerprints: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quota {
    pub rate: RateView,
    pub daily_budget: Option<u64>,
    /// The unexpired overrides, in policy order (the first with a rate, and the first with a
    /// budget, are in force).
    pub overrides: Vec<Override>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateView {
    pub requests: u64,
    pub per_seconds: f64,
    pub burst: u64,
}

impl From<Rate> for RateView {
    fn from(r: Rate) -> Self {
        // Durations are whole milliseconds at most, so this is exact for any policy's `per`.
        let per_seconds = r.per_ns as f64 / NANOS_PER_SEC as f64;
        RateView { requests: r.requests, per_seconds, burst: r.burst }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Override {
    pub rate: Option<RateView>,
    pub daily_budget: Option<u64>,
    pub expires_at: String,
    pub reason: Option<String>,
}

/// The catalog entry of every app, in policy order, judged at `now_secs` with what is known of
/// each app's usage (`usage(app_id)`).
pub fn entries(policy: &CompiledPolicy, now_secs: i64, usage: impl Fn(&str) -> Option<Usage>) -> Vec<Entry> {
    let keys = policy.api_key_digests_by_app();
    policy
        .apps
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let digests = keys.get(i).map(Vec::as_slice).unwrap_or_default();
            let evidence = Evidence { usage: usage(&app.id), days_since_review: None };
            entry(policy, app, digests, now_secs, &evidence)
        })
        .collect()
}

pub fn entry(policy: &CompiledPolicy, app: &App, digests: &[[u8; 32]], now: i64, evidence: &Evidence) -> Entry {
    let risk = catalog::risk(policy, app);
    let trust = catalog::trust(policy, app, evidence);
    let tier = policy.tier_of(app);
    let limits = policy.limits(app, now);
    let rate = limits.map(|l| l.rate).or(tier.map(|t| t.rate)).unwrap_or(Rate { requests: 0, per_ns: 0, burst: 0 });
    Entry {
        id: app.id.clone(),
        owner: app.owner.clone(),
        team: app.team.clone(),
        department: app.department.clone(),
        environment: app.environment.as_str(),
        tier: tier.map(|t| t.name.clone()).unwrap_or_default(),
        lifecycle: app.lifecycle.as_str(),
        region: app.region.clone(),
        data_classes: app.data_classes.iter().map(|c| c.as_str()).collect(),
        connectors: app
            .connectors
            .iter()
            .map(|c| Connector { name: c.clone(), approved: policy.approved_connectors.contains_key(c.as_str()) })
            .collect(),
        risk: Risk { tier: risk.tier.as_str(), reasons: risk.reasons },
        trust: Trust {
            score: trust.score,
            factors: trust
                .factors
                .into_iter()
                .map(|f| Factor { name: f.name, detail: f.detail, points: f.points })
                .collect(),
        },
        api_keys: ApiKeys { count: digests.len(), fingerprints: digests.iter().map(fingerprint).collect() },
        quota: Quota {
            rate: rate.into(),
            daily_budget: limits.and_then(|l| l.daily_budget),
            overrides: app
                .overrides
                .iter()
                .filter(|o| now < o.expires_at_secs)
                .map(|o| Override {
                    rate: o.rate.map(RateView::from),
                    daily_budget: o.daily_budget,
                    expires_at: rfc3339_secs(o.expires_at_secs),
                    reason: o.reason.clone(),
                })
                .collect(),
        },
    }
}

/// `600/1m burst 100`.
pub fn rate_text(r: &RateView) -> String {
    let s = r.per_seconds;
    let per = if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    };
    format!("{}/{per} burst {}", r.requests, r.burst)
}

/// The quota on one line: `600/1m burst 100, daily budget 10000; override until T (reason): …`.
pub fn quota_text(q: &Quota) -> String {
    let budget = q.daily_budget.map_or("no daily budget".to_string(), |b| format!("daily budget {b}"));
    let mut out = format!("{}, {budget}", rate_text(&q.rate));
    for o in &q.overrides {
        let mut sets = Vec::new();
        if let Some(r) = &o.rate {
            sets.push(format!("rate {}", rate_text(r)));
        }
        if let Some(b) = o.daily_budget {
            sets.push(format!("daily budget {b}"));
        }
        let reason = o.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        out.push_str(&format!("; override until {}{reason}: {}", o.expires_at, sets.join(", ")));
    }
    out
}

fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn write_text(out: &mut impl Write, revision: &str, entries: &[Entry]) -> std::io::Result<()> {
    writeln!(out, "revision {revision}: {} apps", entries.len())?;
    for e in entries {
        writeln!(out)?;
        let reasons =
            if e.risk.reasons.is_empty() { String::new() } else { format!(" ({})", e.risk.reasons.join("; ")) };
        writeln!(out, "{}  risk {}{reasons}  trust {}", e.id, e.risk.tier, e.trust.score)?;
        writeln!(
            out,
            "  owner {}  team {}  department {}  environment {}  tier {}  lifecycle {}  region {}",
            or_dash(&e.owner),
            or_dash(&e.team),
            or_dash(&e.department),
            e.environment,
            e.tier,
            e.lifecycle,
            e.region
        )?;
        let classes = if e.data_classes.is_empty() { "-".to_string() } else { e.data_classes.join(", ") };
        let connectors: Vec<String> = e
            .connectors
            .iter()
            .map(|c| if c.approved { c.name.clone() } else { format!("{} (not approved)", c.name) })
            .collect();
        let connectors = if connectors.is_empty() { "-".to_string() } else { connectors.join(", ") };
        writeln!(out, "  data classes: {classes}  connectors: {connectors}")?;
        let fps = if e.api_keys.fingerprints.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.api_keys.fingerprints.join(", "))
        };
        writeln!(out, "  api keys: {}{fps}", e.api_keys.count)?;
        writeln!(out, "  quota: {}", quota_text(&e.quota))?;
        let factors: Vec<String> =
            e.trust.factors.iter().map(|f| format!("{} {:+} ({})", f.name, f.points, f.detail)).collect();
        writeln!(out, "  trust factors: {}", factors.join("; "))?;
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let Some((_, doc)) = crate::policy::load_or_report(&args.path) else {
        return Ok(ExitCode::FAILURE);
    };
    let policy = &doc.policy;
    let entries = entries(policy, now_secs(), |_| None);
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({"revision": policy.revision, "apps": entries});
        writeln!(out, "{doc}").context("writing to standard output")?;
    } else {
        let revision = if policy.revision.is_empty() { "unset" } else { policy.revision.as_str() };
        write_text(&mut out, revision, &entries).context("writing to standard output")?;
    }
    Ok(ExitCode::SUCCESS)
}
