//! What the console's pages and API render: one [`Model`] per policy revision and moment, built
//! from the catalog (the same [`crate::catalog::entry`] as `guardrail catalog`), today's fleet
//! usage, the last 30 days of history (last seen, cost) and the unregistered callers.
//!
//! The model is cached: rebuilt at once when the served revision changes, and otherwise at most
//! once per [`FRESH`], in the background while the previous one is served (so a catalog of
//! 10,000 apps is not rebuilt per request). Past days' totals are read from the store once and
//! kept ([`MAX_DAYS_KEPT`]); today's come from the hub, yesterday's from the store each time.

use super::kpis::{self, Days};
use super::problem;
use crate::catalog::{rate_text, Entry};
use crate::selfservice::requests::{Kind, Request};
use crate::serve::fleet::Counts;
use crate::serve::hub::{Hub, Snapshot};
use crate::store::Caller;
use axum::http::StatusCode;
use axum::response::Response;
use guardrail_core::compile::App;
use guardrail_core::time::rfc3339_secs;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a model is served before it is rebuilt (in the background).
pub const FRESH: Duration = Duration::from_secs(1);
/// Days of totals kept in memory.
const MAX_DAYS_KEPT: usize = 500;
/// Unregistered callers kept in a model (the store's most frequent).
pub const MAX_CALLERS_SHOWN: usize = 1_000;
/// Days of history behind `cost_30d` and `last_seen`.
const RECENT_DAYS: u64 = 30;

/// Requests of one app over a period, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageView {
    pub requests: u64,
    pub allowed: u64,
    pub throttled: u64,
    pub soft_limit: u64,
    pub fleet_budget: u64,
    /// By problem code (throttles included).
    pub denied: BTreeMap<String, u64>,
    pub connectors: BTreeMap<String, u64>,
}

impl From<&Counts> for UsageView {
    fn from(c: &Counts) -> Self {
        UsageView {
            requests: kpis::requests(c),
            allowed: c.allowed,
            throttled: c.throttled,
            soft_limit: c.soft_limit,
            fleet_budget: c.fleet_budget,
            denied: c.denied.clone(),
            connectors: c.connectors.clone(),
        }
    }
}

/// A catalog entry with what the fleet saw of the app.
#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    #[serde(flatten)]
    pub entry: Entry,
    pub today: UsageView,
    /// The last UTC day (`YYYY-MM-DD`) with a request in the last 30 days.
    pub last_seen: Option<String>,
    /// Cost of the last 30 days, today included, in the policy's currency.
    pub cost_30d: f64,
    /// What the policy served grants the app beyond its tier and catalog now, until a time.
    pub granted: Vec<Granted>,
    /// `review_by` overdue or less than 14 days ahead: what `guardrail check` says of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_due: Option<String>,
}

/// Something the policy served grants an app until a time: a quota override, a connector
/// exception, an access grant (from the policy file or, when its reason starts with
/// `request <id>:`, an approved self-service request), or a review date an approved request moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Granted {
    /// `quota`, `connector`, `access` or `review`.
    pub kind: &'static str,
    /// What it grants, in words (`rate 3000/1m burst 3000`, `connector s3-export`, …).
    pub what: String,
    /// When it ends (RFC 3339).
    pub until: String,
    pub reason: Option<String>,
    /// The approved request it comes from (`req-…`), if any.
    pub request: Option<String>,
}

/// The request id of a policy entry's reason written by an approval (`request req-<hex>: …`).
pub fn request_of_reason(reason: &str) -> Option<&str> {
    let (id, _) = reason.strip_prefix("request ")?.split_once(':')?;
    let hex = id.strip_prefix("req-")?;
    (!hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// What `app` (its catalog entry `entry`) is granted at `now`; `in_force` the approved requests
/// the policy served carries (for the review dates they moved, which have no reason field).
pub fn granted(app: &App, entry: &Entry, in_force: &[Request], now: i64) -> Vec<Granted> {
    let mut out = Vec::new();
    let item = |kind, what: String, until: String, reason: Option<&String>| Granted {
        kind,
        what,
        until,
        request: reason.and_then(|r| request_of_reason(r)).map(str::to_string),
        reason: reason.cloned(),
    };
    for o in &entry.quota.overrides {
        let mut sets = Vec::new();
        if let Some(r) = &o.rate {
            sets.push(format!("rate {}", rate_text(r)));
        }
        if let Some(b) = o.daily_budget {
            sets.push(format!("daily budget {b}"));
        }
        out.push(item("quota", sets.join(", "), o.expires_at.clone(), o.reason.as_ref()));
    }
    for (kind, list) in [("connector", &app.connector_exceptions), ("access", &app.access_grants)] {
        let noun = if kind == "connector" { "connector" } else { "dataset" };
        for e in list.iter().filter(|e| now < e.expires_at_secs) {
            out.push(item(kind, format!("{noun} {}", e.what), rfc3339_secs(e.expires_at_secs), e.reason.as_ref()));
        }
    }
    for r in in_force.iter().filter(|r| r.kind == Kind::Review && r.app == app.id && r.in_force(now)) {
        out.push(Granted {
            kind: "review",
            what: format!("review by {}", app.review_by.as_deref().unwrap_or("(none)")),
            until: r.until.clone(),
            reason: Some(format!("request {}: {}", r.id, r.reason)),
            request: Some(r.id.clone()),
        });
    }
    out
}

/// A dataset an app's data classes let it reach, and whether its region may.
#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    pub dataset: String,
    pub classification: &'static str,
    pub allowed_regions: Vec<String>,
    pub from_app_region: bool,
    pub requires_jit: bool,
}

pub struct Model {
    pub snapshot: Arc<Snapshot>,
    pub revision: String,
    pub currency: String,
    pub apps: Vec<AppView>,
    index: HashMap<String, usize>,
    pub callers: Vec<Caller>,
    /// Today's fleet totals, apps no longer in the catalog included.
    pub totals: Arc<BTreeMap<String, Counts>>,
    /// Apps anomalous today.
    pub anomalies: Vec<kpis::Anomaly>,
    /// `/api/v1/apps` as served: written once per model, not per request.
    pub apps_json: axum::body::Bytes,
}

impl Model {
    pub fn app(&self, id: &str) -> Option<&AppView> {
        self.index.get(id).and_then(|&i| self.apps.get(i))
    }

    fn policy_app(&self, id: &str) -> Option<&App> {
        self.snapshot.policy.app(id)
    }

    /// The datasets the app may reach by its data classes, with their regions.
    pub fn detail(&self, a: &AppView) -> Vec<Reach> {
        let Some(app) = self.policy_app(&a.entry.id) else { return Vec::new() };
        (self.snapshot.policy.datasets.iter())
            .filter(|d| app.data_classes.contains(&d.classification))
            .map(|d| Reach {
                dataset: d.id.clone(),
                classification: d.classification.as_str(),
                allowed_regions: d.allowed_regions.clone(),
                from_app_region: d.allowed_regions.contains(&app.region),
                requires_jit: d.requires_jit,
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Cache {
    model: tokio::sync::Mutex<Option<(Arc<Model>, Instant)>>,
    rebuilding: AtomicBool,
    past: Mutex<BTreeMap<u64, Arc<BTreeMap<String, Counts>>>>,
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", &format!("the store cannot be read: {e}"))
}

impl Cache {
    /// The model of now (see the module docs).
    pub async fn get(self: &Arc<Self>, hub: &Arc<Hub>) -> Result<Arc<Model>, Response> {
        let snapshot = hub.current();
        let mut slot = self.model.lock().await;
        if let Some((model, at)) = slot.as_ref() {
            if Arc::ptr_eq(&model.snapshot, &snapshot) {
                if at.elapsed() >= FRESH && !self.rebuilding.swap(true, Ordering::AcqRel) {
                    let (cache, hub) = (self.clone(), hub.clone());
                    tokio::spawn(async move {
                        if let Ok(m) = cache.build(&hub, hub.current()).await {
                            *cache.model.lock().await = Some((Arc::new(m), Instant::now()));
                        }
                        cache.rebuilding.store(false, Ordering::Release);
                    });
                }
                return Ok(model.clone());
            }
        }
        let model = Arc::new(self.build(hub, snapshot).await?);
        *slot = Some((model.clone(), Instant::now()));
        Ok(model)
    }

    /// Fleet totals of the days `from..=to` (see the module docs).
    pub async fn days(&self, hub: &Hub, from: u64, to: u64) -> Result<Days, Response> {
        let today = hub.today();
        let store = hub.store();
        let mut days = Days::new();
        for day in from..=to.min(today) {
            if day == today {
                days.insert(day, Arc::new(hub.fleet_totals(day)));
                continue;
            }
            let Some(store) = &store else {
                days.insert(day, Arc::new(hub.fleet_totals(day)));
                continue;
            };
            let kept = self.past.lock().unwrap_or_else(PoisonError::into_inner).get(&day).cloned();
            if let Some(totals) = kept {
                days.insert(day, totals);
                continue;
            }
            let totals = Arc::new(store.totals(day).await.map_err(unavailable)?);
            if day + 1 < today {
                let mut past = self.past.lock().unwrap_or_else(PoisonError::into_inner);
                past.insert(day, totals.clone());
                while past.len() > MAX_DAYS_KEPT {
                    past.pop_first();
                }
            }
            days.insert(day, totals);
        }
        Ok(days)
    }

    async fn build(&self, hub: &Hub, snapshot: Arc<Snapshot>) -> Result<Model, Response> {
        let today = hub.today();
        let days = self.days(hub, today.saturating_sub(RECENT_DAYS - 1), today).await?;
        let anomalies = kpis::anomalies(&days, today);
        let mut callers = match hub.store() {
            Some(store) => store.callers().await.map_err(unavailable)?,
            None => Vec::new(),
        };
        // Most frequent first: the rest is a long tail the KPIs need not list.
        callers.truncate(MAX_CALLERS_SHOWN);
        let policy = &snapshot.policy;
        let keys = policy.api_key_digests_by_app();
        let now = hub.now();
        let totals = days.get(&today).cloned().unwrap_or_default();
        let in_force = hub.requests_in_force();
        let mut apps = Vec::with_capacity(policy.apps.len());
        let mut index = HashMap::with_capacity(policy.apps.len());
        for (i, app) in policy.apps.iter().enumerate() {
            let digests = keys.get(i).map(Vec::as_slice).unwrap_or_default();
            let today_counts = totals.get(&app.id);
            let evidence = guardrail_core::catalog::Evidence {
                usage: today_counts.map(|c| guardrail_core::catalog::Usage {
                    allowed: c.allowed,
                    throttled: c.throttled,
                    denied: kpis::requests(c).saturating_sub(c.allowed).saturating_sub(c.throttled),
                }),
                days_since_review: None,
            };
            let entry = crate::catalog::entry(policy, app, digests, now, &evidence);
            let mut last_seen = None;
            let mut cost = 0.0;
            for (day, apps) in &days {
                if let Some(c) = apps.get(&app.id) {
                    if kpis::requests(c) > 0 {
                        last_seen = Some(*day);
                    }
                    cost += kpis::cost_of(policy, c);
                }
            }
            index.insert(app.id.clone(), i);
            apps.push(AppView {
                granted: granted(app, &entry, &in_force, now),
                review_due: guardrail_core::lint::review_warning(app, now),
                entry,
                today: today_counts.map(UsageView::from).unwrap_or_default(),
                last_seen: last_seen.map(kpis::date),
                cost_30d: (cost * 100.0).round() / 100.0,
            });
        }
        let apps_json = serde_json::to_vec(&serde_json::json!({
            "revision": snapshot.revision, "currency": policy.settings.currency, "apps": apps,
        }))
        .unwrap_or_default()
        .into();
        Ok(Model {
            apps_json,
            revision: snapshot.revision.clone(),
            currency: policy.settings.currency.clone(),
            snapshot,
            apps,
            index,
            callers,
            totals,
            anomalies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_796_558_400; // 2026-12-06T12:00:00Z

    #[test]
    fn what_is_granted_is_what_is_in_force_marked_with_its_request() {
        let doc = json!({
            "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "7+req.0badc0de",
            "tiers": {"sandbox": {"rate": {"requests": 5, "per": "1m"}}},
            "connectors": {"approved": ["crm"]},
            "apps": [{
                "id": "lab", "environment": "prod", "tier": "sandbox", "lifecycle": "published",
                "region": "eu-west-1", "data_classes": ["public"], "connectors": ["crm"], "review_by": "2027-01-31",
                "quota_overrides": [
                    {"rate": {"requests": 600, "per": "1m"}, "expires_at": "2026-12-21T00:00:00Z",
                     "reason": "request req-0a1b2c3d4e5f: black friday"},
                    {"daily_budget": 900, "expires_at": "2026-12-31T00:00:00Z", "reason": "quarter close"},
                    {"daily_budget": 800, "expires_at": "2026-12-01T00:00:00Z", "reason": "request req-0000000000aa: old"}
                ],
                "connector_exceptions": [
                    {"connector": "s3-export", "expires_at": "2026-12-10T00:00:00Z",
                     "reason": "request req-0a1b2c3d4e60: nightly export"},
                    {"connector": "ftp", "expires_at": "2026-12-05T00:00:00Z", "reason": "ended"}
                ]
            }]
        });
        let policy = guardrail_core::compile::compile_json_str(&doc.to_string()).unwrap();
        let app = policy.app("lab").unwrap();
        let entry = crate::catalog::entry(&policy, app, &[], NOW, &guardrail_core::catalog::Evidence::default());
        let review: Request = serde_json::from_value(json!({
            "id": "req-0a1b2c3d4e61", "kind": "review", "app": "lab", "status": "approved",
            "filed_at": "2026-12-01T00:00:00Z", "until": "2027-02-01T00:00:00Z", "until_secs": 1_801_440_000,
            "reason": "re-attested", "risk_tier": "green", "change": "app `lab`'s review_by → 2027-01-31"
        }))
        .unwrap();
        let all = granted(app, &entry, &[review], NOW);
        let got: Vec<(&str, &str, &str, Option<&str>)> =
            all.iter().map(|g| (g.kind, g.what.as_str(), g.until.as_str(), g.request.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                ("quota", "rate 600/1m burst 600", "2026-12-21T00:00:00Z", Some("req-0a1b2c3d4e5f")),
                ("quota", "daily budget 900", "2026-12-31T00:00:00Z", None),
                ("connector", "connector s3-export", "2026-12-10T00:00:00Z", Some("req-0a1b2c3d4e60")),
                ("review", "review by 2027-01-31", "2027-02-01T00:00:00Z", Some("req-0a1b2c3d4e61")),
            ],
            "what ended is not listed; a request is named only by an approval's reason"
        );
    }

    #[test]
    fn an_approvals_reason_names_its_request() {
        let cases = [
            ("request req-0a1b2c3d4e5f: black friday", Some("req-0a1b2c3d4e5f"), "as an approval writes it"),
            ("request req-0a1b2c3d4e5f:", Some("req-0a1b2c3d4e5f"), "an empty reason after it"),
            ("quarter close", None, "a reason of the policy file"),
            ("request req-: x", None, "no hex"),
            ("request req-xyz: x", None, "not hex"),
            ("request <b>req-1</b>: x", None, "markup is no id"),
            ("request req-1 2: x", None, "a space is no id"),
            ("Request req-1: x", None, "only as written by an approval"),
        ];
        for (reason, want, why) in cases {
            assert_eq!(request_of_reason(reason), want, "{why}: {reason}");
        }
    }
}
