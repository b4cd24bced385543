//! The console's KPIs (the SPEC's "Console" list), as pure functions over the policy and the
//! store's data: the fleet totals per UTC day and app, and the unregistered callers.
//!
//! - apps by lifecycle and by risk tier (the policy in force);
//! - registration share: requests whose credential names a registered app ÷ requests with any
//!   credential (registered apps' requests, plus unknown API keys and valid tokens of apps not in
//!   the catalog), and the unregistered callers themselves;
//! - throttles per app and cause (`quota-exceeded`, `budget-exhausted`, `fleet-budget`);
//! - denials per code; soft-limit warnings;
//! - cost per app and department: admitted requests per connector × `connectors.pricing`;
//! - anomalies: an app whose requests on a day pass 3× its trailing 7-day daily mean, with at least
//!   [`ANOMALY_MIN_REQUESTS`] that day;
//! - the daily history of each over the range.
//!
//! Requests of an app are `allowed` plus every denial (throttles included).

use crate::serve::fleet::{is_app_row, Counts, UNREGISTERED_ROW};
use crate::store::Caller;
use guardrail_core::catalog;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::time::rfc3339_secs;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Fewest requests on a day for an app to count as an anomaly.
pub const ANOMALY_MIN_REQUESTS: u64 = 100;
/// An anomaly's requests pass this many times the trailing mean.
pub const ANOMALY_FACTOR: u64 = 3;
/// Days of the trailing mean.
pub const TRAILING_DAYS: u64 = 7;
/// Longest range `/api/v1/kpis` answers (the store keeps 400 days).
pub const MAX_RANGE_DAYS: u64 = 400;
/// Where an app no longer in the policy is counted by department.
pub const NO_DEPARTMENT: &str = "(none)";

/// Fleet totals: per UTC day (days since 1970-01-01), per app (and [`UNREGISTERED_ROW`]).
pub type Days = BTreeMap<u64, Arc<BTreeMap<String, Counts>>>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kpis {
    pub from: String,
    pub to: String,
    pub currency: String,
    pub apps_by_lifecycle: BTreeMap<&'static str, u64>,
    pub apps_by_risk: BTreeMap<&'static str, u64>,
    pub registration: Registration,
    pub unregistered_callers: Vec<CallerView>,
    pub throttles: Vec<Throttles>,
    pub denials: BTreeMap<String, u64>,
    pub soft_limit_warnings: u64,
    pub cost: Cost,
    /// Requests of each app seen in the range.
    pub apps: BTreeMap<String, AppTotal>,
    /// Apps anomalous on the last day of the range.
    pub anomalies: Vec<Anomaly>,
    pub daily: Vec<Daily>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Registration {
    pub registered_requests: u64,
    pub unregistered_requests: u64,
    /// `registered ÷ (registered + unregistered)`; `None` without any request with a credential.
    pub share: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallerView {
    /// `api-key` (id: the first 8 hex of the key's SHA-256) or `app` (a token's app id).
    pub kind: String,
    pub id: String,
    /// Requests since it was first seen.
    pub requests: u64,
    pub last_seen: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Throttles {
    pub app: String,
    pub quota_exceeded: u64,
    pub budget_exhausted: u64,
    pub fleet_budget: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AppTotal {
    pub requests: u64,
    pub allowed: u64,
    pub throttled: u64,
    /// Denials other than throttles.
    pub denied: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    pub total: f64,
    pub by_app: Vec<AppCost>,
    pub by_department: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AppCost {
    pub app: String,
    pub department: String,
    /// Admitted requests by connector.
    pub requests: BTreeMap<String, u64>,
    pub cost: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Anomaly {
    pub app: String,
    pub day: String,
    pub requests: u64,
    pub trailing_mean: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Daily {
    pub day: String,
    pub requests: u64,
    pub allowed: u64,
    pub throttled: u64,
    /// Denials other than throttles.
    pub denied: u64,
    pub soft_limit_warnings: u64,
    pub unregistered: u64,
    pub registration_share: Option<f64>,
    pub cost: f64,
    pub anomalies: u64,
}

/// `YYYY-MM-DD` of a day number.
pub fn date(day: u64) -> String {
    let secs = i64::try_from(day.saturating_mul(86_400)).unwrap_or(i64::MAX);
    rfc3339_secs(secs).chars().take(10).collect()
}

/// The day number of `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Option<u64> {
    if text.len() != 10 {
        return None;
    }
    let secs = guardrail_core::time::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
    u64::try_from(secs / 86_400).ok()
}

/// The first and last day of `YYYY-Qn` (n in 1..=4).
pub fn parse_quarter(text: &str) -> Option<(u64, u64)> {
    let (year, q) = text.split_once("-Q")?;
    if year.len() != 4 || !year.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let q: u32 = match q {
        "1" => 1,
        "2" => 2,
        "3" => 3,
        "4" => 4,
        _ => return None,
    };
    let first = parse_date(&format!("{year}-{:02}-01", 3 * q - 2))?;
    let next = if q == 4 {
        let y: u32 = year.parse().ok()?;
        parse_date(&format!("{:04}-01-01", y + 1))?
    } else {
        parse_date(&format!("{year}-{:02}-01", 3 * q + 1))?
    };
    Some((first, next - 1))
}

/// The quarter before `YYYY-Qn` (`2026-Q1` → `2025-Q4`).
pub fn previous_quarter(text: &str) -> Option<String> {
    let (year, q) = text.split_once("-Q")?;
    let year: u32 = year.parse().ok()?;
    match q {
        "1" => Some(format!("{:04}-Q4", year.checked_sub(1)?)),
        "2" | "3" | "4" => Some(format!("{year:04}-Q{}", q.parse::<u32>().ok()? - 1)),
        _ => None,
    }
}

/// Requests of one app's counts: admitted and every denial.
pub fn requests(c: &Counts) -> u64 {
    c.denied.values().fold(c.allowed, |a, n| a.saturating_add(*n))
}

pub fn cost_of(policy: &CompiledPolicy, c: &Counts) -> f64 {
    c.connectors.iter().map(|(name, n)| policy.pricing.get(name).map_or(0.0, |p| p * *n as f64 / 1000.0)).sum()
}

/// Money rounded to cents (what is shown; sums are of the unrounded amounts).
fn cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn share(registered: u64, unregistered: u64) -> Option<f64> {
    let all = registered.saturating_add(unregistered);
    (all > 0).then(|| registered as f64 / all as f64)
}

/// Requests of `app` on each of the [`TRAILING_DAYS`] days before `day` (missing days count 0),
/// as a mean.
fn trailing_mean(days: &Days, app: &str, day: u64) -> f64 {
    let sum: u64 = (day.saturating_sub(TRAILING_DAYS)..day)
        .filter_map(|d| days.get(&d).and_then(|apps| apps.get(app)))
        .map(requests)
        .sum();
    sum as f64 / TRAILING_DAYS as f64
}

/// The apps anomalous on `day`, most requests first.
pub fn anomalies(days: &Days, day: u64) -> Vec<Anomaly> {
    let Some(apps) = days.get(&day) else { return Vec::new() };
    let mut out: Vec<Anomaly> = apps
        .iter()
        .filter(|(app, _)| is_app_row(app))
        .filter_map(|(app, c)| {
            let n = requests(c);
            let mean = trailing_mean(days, app, day);
            (n >= ANOMALY_MIN_REQUESTS && n as f64 > ANOMALY_FACTOR as f64 * mean).then(|| Anomaly {
                app: app.clone(),
                day: date(day),
                requests: n,
                trailing_mean: mean,
            })
        })
        .collect();
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.app.cmp(&b.app)));
    out
}

/// How many apps were anomalous on each day of `from..=to`: every app's requests per day read
/// once, the trailing sums kept as a window (not 7 lookups per app and day).
fn anomalies_per_day(days: &Days, from: u64, to: u64) -> Vec<u64> {
    let first = from.saturating_sub(TRAILING_DAYS);
    let len = usize::try_from(to - first + 1).unwrap_or(0);
    let mut series: std::collections::HashMap<&str, Vec<u64>> = std::collections::HashMap::new();
    for (day, apps) in days.range(first..=to) {
        let at = usize::try_from(day - first).unwrap_or(0);
        for (app, c) in apps.iter().filter(|(app, _)| is_app_row(app)) {
            let row = series.entry(app.as_str()).or_insert_with(|| vec![0; len]);
            if let Some(slot) = row.get_mut(at) {
                *slot = requests(c);
            }
        }
    }
    let offset = usize::try_from(from - first).unwrap_or(0);
    let mut out = vec![0u64; len - offset];
    for row in series.values() {
        let mut window: u64 = row.iter().take(offset).sum();
        for (i, slot) in out.iter_mut().enumerate() {
            let n = row.get(offset + i).copied().unwrap_or(0);
            // `window`: the requests of the TRAILING_DAYS days before (days before the store's
            // history count 0).
            if n >= ANOMALY_MIN_REQUESTS && n.saturating_mul(TRAILING_DAYS) > ANOMALY_FACTOR.saturating_mul(window) {
                *slot += 1;
            }
            window = window.saturating_add(n);
            if let Some(dropped) = (offset + i).checked_sub(TRAILING_DAYS as usize) {
                window = window.saturating_sub(row.get(dropped).copied().unwrap_or(0));
            }
        }
    }
    out
}

/// The KPIs of the days `from..=to` (both within `days`, which also holds the
/// [`TRAILING_DAYS`] before `from` for the anomalies), with `callers` from the store.
pub fn kpis(policy: &CompiledPolicy, days: &Days, callers: &[Caller], from: u64, to: u64) -> Kpis {
    let mut by_app: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut unregistered = 0u64;
    let mut daily = Vec::new();
    for day in from..=to {
        let mut d = Daily { day: date(day), ..Daily::default() };
        let mut registered = 0u64;
        let mut day_cost = 0.0;
        for (app, c) in days.get(&day).map(|apps| apps.iter()).into_iter().flatten() {
            if app == UNREGISTERED_ROW {
                d.unregistered = d.unregistered.saturating_add(requests(c));
                continue;
            }
            if !is_app_row(app) {
                continue;
            }
            by_app.entry(app.as_str()).or_default().add(c);
            let n = requests(c);
            registered = registered.saturating_add(n);
            d.requests = d.requests.saturating_add(n);
            d.allowed = d.allowed.saturating_add(c.allowed);
            d.throttled = d.throttled.saturating_add(c.throttled);
            d.denied = d.denied.saturating_add(n.saturating_sub(c.allowed).saturating_sub(c.throttled));
            d.soft_limit_warnings = d.soft_limit_warnings.saturating_add(c.soft_limit);
            day_cost += cost_of(policy, c);
        }
        unregistered = unregistered.saturating_add(d.unregistered);
        d.registration_share = share(registered, d.unregistered);
        d.cost = cents(day_cost);
        daily.push(d);
    }
    for (d, n) in daily.iter_mut().zip(anomalies_per_day(days, from, to)) {
        d.anomalies = n;
    }

    let mut apps_by_lifecycle = BTreeMap::new();
    let mut apps_by_risk: BTreeMap<&'static str, u64> =
        catalog::RiskTier::ALL.iter().map(|t| (t.as_str(), 0)).collect();
    for app in &policy.apps {
        *apps_by_lifecycle.entry(app.lifecycle.as_str()).or_default() += 1;
        *apps_by_risk.entry(catalog::risk(policy, app).tier.as_str()).or_default() += 1;
    }

    let registered: u64 = by_app.values().map(requests).sum();
    let mut denials: BTreeMap<String, u64> = BTreeMap::new();
    let mut throttles = Vec::new();
    let mut soft_limit_warnings = 0u64;
    let mut cost = Cost::default();
    let mut totals = BTreeMap::new();
    for (app, c) in &by_app {
        let n = requests(c);
        let total = AppTotal {
            requests: n,
            allowed: c.allowed,
            throttled: c.throttled,
            denied: n.saturating_sub(c.allowed).saturating_sub(c.throttled),
        };
        totals.insert((*app).to_string(), total);
        for (code, n) in &c.denied {
            *denials.entry(code.clone()).or_default() += n;
        }
        soft_limit_warnings = soft_limit_warnings.saturating_add(c.soft_limit);
        let budget = c.denied.get("budget-exhausted").copied().unwrap_or(0);
        let t = Throttles {
            app: (*app).to_string(),
            quota_exceeded: c.denied.get("quota-exceeded").copied().unwrap_or(0),
            budget_exhausted: budget.saturating_sub(c.fleet_budget),
            fleet_budget: c.fleet_budget.min(budget),
        };
        if t.quota_exceeded + t.budget_exhausted + t.fleet_budget > 0 {
            throttles.push(t);
        }
        let amount = cost_of(policy, c);
        let department =
            policy.app(app).and_then(|a| a.department.clone()).unwrap_or_else(|| NO_DEPARTMENT.to_string());
        if !c.connectors.is_empty() {
            *cost.by_department.entry(department.clone()).or_default() += amount;
            cost.total += amount;
            cost.by_app.push(AppCost {
                app: (*app).to_string(),
                department,
                requests: c.connectors.clone(),
                cost: cents(amount),
            });
        }
    }
    // Unknown API keys were refused as `unauthenticated`, tokens of unregistered apps as
    // `app-not-registered`: denials no app's counts hold.
    for c in days.range(from..=to).filter_map(|(_, apps)| apps.get(UNREGISTERED_ROW)) {
        for (kind, code) in [("api-key", "unauthenticated"), ("app", "app-not-registered")] {
            if let Some(n) = c.denied.get(kind).filter(|n| **n > 0) {
                *denials.entry(code.to_string()).or_default() += n;
            }
        }
    }
    throttles.sort_by(|a, b| {
        let sum = |t: &Throttles| t.quota_exceeded + t.budget_exhausted + t.fleet_budget;
        sum(b).cmp(&sum(a)).then_with(|| a.app.cmp(&b.app))
    });
    cost.by_app.sort_by(|a, b| b.cost.total_cmp(&a.cost).then_with(|| a.app.cmp(&b.app)));
    cost.total = cents(cost.total);
    for v in cost.by_department.values_mut() {
        *v = cents(*v);
    }
    let since = i64::try_from(from.saturating_mul(86_400)).unwrap_or(i64::MAX);
    let unregistered_callers = callers
        .iter()
        .filter(|c| c.last_seen >= since)
        .map(|c| CallerView {
            kind: c.kind.clone(),
            id: c.id.clone(),
            requests: c.count,
            last_seen: rfc3339_secs(c.last_seen),
        })
        .collect();
    Kpis {
        from: date(from),
        to: date(to),
        currency: policy.settings.currency.clone(),
        apps_by_lifecycle,
        apps_by_risk,
        registration: Registration {
            registered_requests: registered,
            unregistered_requests: unregistered,
            share: share(registered, unregistered),
        },
        unregistered_callers,
        throttles,
        denials,
        soft_limit_warnings,
        cost,
        apps: totals,
        anomalies: anomalies(days, to),
        daily,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardrail_core::compile::compile_json_str;
    use serde_json::json;

    fn policy() -> CompiledPolicy {
        let doc = json!({"apiVersion": "guardrail/v1", "kind": "Policy", "settings": {"currency": "EUR"},
        "tiers": {"standard": {"rate": {"requests": 10, "per": "1m"}}},
        "connectors": {"approved": ["crm", "mail"], "pricing": {"crm": {"per_1k_requests": 0.4}}},
        "apps": [
            {"id": "pos", "tier": "standard", "lifecycle": "published", "environment": "prod", "region": "eu",
             "department": "retail", "connectors": ["crm", "mail"]},
            {"id": "hr", "tier": "standard", "lifecycle": "draft", "environment": "dev", "region": "eu",
             "department": "people", "data_classes": ["regulated"]},
            {"id": "wiki", "tier": "standard", "lifecycle": "published", "environment": "dev", "region": "eu"}
        ]});
        match compile_json_str(&doc.to_string()) {
            Ok(p) => p,
            Err(e) => unreachable!("{e:?}"),
        }
    }

    fn counts(allowed: u64, denied: &[(&str, u64)], connectors: &[(&str, u64)], fleet_budget: u64) -> Counts {
        let throttled =
            denied.iter().filter(|(c, _)| c.ends_with("exceeded") || c.ends_with("exhausted")).map(|(_, n)| n).sum();
        Counts {
            allowed,
            throttled,
            soft_limit: allowed / 10,
            denied: denied.iter().map(|(c, n)| ((*c).to_string(), *n)).collect(),
            fleet_budget,
            connectors: connectors.iter().map(|(c, n)| ((*c).to_string(), *n)).collect(),
        }
    }

    const DAY: u64 = 20_428; // 2025-12-06

    #[test]
    fn dates_and_quarters() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("2026-Q4", Some(("2026-10-01", "2026-12-31"))),
            ("2026-Q1", Some(("2026-01-01", "2026-03-31"))),
            ("2024-Q1", Some(("2024-01-01", "2024-03-31"))),
            ("2026-Q2", Some(("2026-04-01", "2026-06-30"))),
            ("2026-Q5", None),
            ("2026-Q0", None),
            ("26-Q1", None),
            ("2026Q1", None),
            ("2026-q1", None),
            ("", None),
        ];
        for (text, want) in cases {
            let got = parse_quarter(text).map(|(a, b)| (date(a), date(b)));
            assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())), "{text}");
        }
        assert_eq!(previous_quarter("2026-Q1").as_deref(), Some("2025-Q4"));
        assert_eq!(previous_quarter("2026-Q4").as_deref(), Some("2026-Q3"));
        assert_eq!(previous_quarter("2026-Q9"), None);
        assert_eq!(parse_date("2025-12-06"), Some(DAY));
        assert_eq!(date(DAY), "2025-12-06");
        for bad in ["2025-13-01", "2025-12-6", "2025-12-06T00", "yesterday", "2025-02-30"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn kpis_over_a_range() {
        let p = policy();
        let mut building: BTreeMap<u64, BTreeMap<String, Counts>> = BTreeMap::new();
        building.entry(DAY - 1).or_default().insert("pos".into(), counts(500, &[], &[("crm", 500)], 0));
        let today = building.entry(DAY).or_default();
        today.insert(
            "pos".into(),
            counts(
                2000,
                &[("quota-exceeded", 5), ("budget-exhausted", 7), ("access-denied", 3)],
                &[("crm", 1500), ("mail", 500)],
                4,
            ),
        );
        today.insert("hr".into(), counts(10, &[("app-not-active", 2)], &[], 0));
        today.insert(
            UNREGISTERED_ROW.into(),
            Counts {
                denied: [("api-key".to_string(), 6), ("app".to_string(), 2)].into_iter().collect(),
                ..Counts::default()
            },
        );
        let days: Days = building.into_iter().map(|(d, apps)| (d, Arc::new(apps))).collect();
        let callers = vec![
            Caller { kind: "api-key".into(), id: "0a1b2c3d".into(), count: 6, last_seen: (DAY * 86_400 + 60) as i64 },
            Caller { kind: "app".into(), id: "old".into(), count: 9, last_seen: 1_000 },
        ];
        let k = kpis(&p, &days, &callers, DAY - 1, DAY);
        // (what, got, want)
        let cases: Vec<(&str, serde_json::Value, serde_json::Value)> = vec![
            ("range", json!([k.from, k.to]), json!(["2025-12-05", "2025-12-06"])),
            ("lifecycle", json!(k.apps_by_lifecycle), json!({"draft": 1, "published": 2})),
            ("risk", json!(k.apps_by_risk), json!({"green": 1, "amber": 1, "red": 1})),
            (
                "registration: 500 + 2015 + 12 of them with 8 unregistered",
                json!([k.registration.registered_requests, k.registration.unregistered_requests]),
                json!([2527, 8]),
            ),
            ("callers seen in the range only", json!(k.unregistered_callers.len()), json!(1)),
            (
                "throttles by cause: budget-exhausted 7 of which 4 fleet-wide",
                json!(k.throttles),
                json!([{"app": "pos", "quota_exceeded": 5, "budget_exhausted": 3, "fleet_budget": 4}]),
            ),
            (
                "denials with the unregistered callers' codes",
                json!(k.denials),
                json!({"access-denied": 3, "app-not-active": 2, "app-not-registered": 2, "budget-exhausted": 7,
                       "quota-exceeded": 5, "unauthenticated": 6}),
            ),
            ("soft limit", json!(k.soft_limit_warnings), json!(50 + 200 + 1)),
            ("cost: 2,000 crm requests at 0.40 per 1k, mail free", json!(k.cost.total), json!(0.8)),
            ("cost by department", json!(k.cost.by_department), json!({"retail": 0.8})),
            ("currency", json!(k.currency), json!("EUR")),
            (
                "anomaly: 2,015 > 3 × 500/7",
                json!(k.anomalies.iter().map(|a| &a.app).collect::<Vec<_>>()),
                json!(["pos"]),
            ),
            (
                "daily",
                json!(k.daily.iter().map(|d| (d.requests, d.unregistered, d.cost, d.anomalies)).collect::<Vec<_>>()),
                json!([[500, 0, 0.2, 1], [2027, 8, 0.6, 1]]),
            ),
        ];
        for (what, got, want) in cases {
            assert_eq!(got, want, "{what}");
        }
        let share = k.registration.share.unwrap_or(0.0);
        assert!((share - 2527.0 / 2535.0).abs() < 1e-9, "share {share}");
    }

    #[test]
    fn daily_anomaly_counts_agree_with_the_anomalies_of_each_day() {
        // Three apps over 40 days with bursts; each day's count must be what `anomalies` finds.
        let mut days = Days::new();
        for d in DAY - 40..=DAY {
            let apps: BTreeMap<String, Counts> = (0..3u64)
                .map(|a| {
                    let n = if (d + a * 5) % 11 == 0 { 900 } else { (d * 37 + a * 13) % 150 };
                    (format!("app-{a}"), counts(n, &[], &[], 0))
                })
                .collect();
            days.insert(d, Arc::new(apps));
        }
        let from = DAY - 30;
        let got = anomalies_per_day(&days, from, DAY);
        let want: Vec<u64> = (from..=DAY).map(|d| anomalies(&days, d).len() as u64).collect();
        assert_eq!(got, want);
        assert!(want.iter().sum::<u64>() > 0, "the case has anomalies");
    }

    #[test]
    fn anomalies_need_three_times_the_trailing_mean_and_a_hundred_requests() {
        // (requests on each of the 7 days before, requests on the day, anomalous?)
        let cases: &[(u64, u64, bool, &str)] = &[
            (0, 100, true, "new traffic of 100"),
            (0, 99, false, "under 100 requests"),
            (100, 300, false, "exactly 3×: not past it"),
            (100, 301, true, "past 3×"),
            (1000, 2000, false, "2× only"),
        ];
        for (before, on, want, why) in cases {
            let day = |n| Arc::new([("a".to_string(), counts(n, &[], &[], 0))].into_iter().collect());
            let mut days: Days = (DAY - 7..DAY).map(|d| (d, day(*before))).collect();
            days.insert(DAY, day(*on));
            assert_eq!(!anomalies(&days, DAY).is_empty(), *want, "{why}");
        }
    }
}
