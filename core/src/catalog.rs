//! The catalog's judgement of an app: its risk tier (exactly as the SPEC's "Console" section defines
//! it) with the reasons, and a trust score 0–100 made of documented factors, each shown with its
//! contribution. Pure functions over a [`CompiledPolicy`] (and, when known, usage and the last
//! review), so `guardrail catalog` and the console agree.
//!
//! # Risk tier
//! - **red** when the app's data classes include `confidential` or `regulated`, or it lists a
//!   connector that is not in `connectors.approved`, or its lifecycle is `quarantined`;
//! - **amber** otherwise, when it has `internal` data or its environment is `prod`;
//! - **green** otherwise.
//!
//! # Trust score
//! 100, minus the penalty of each factor ([`Factor::points`], never positive), floored at 0:
//!
//! | factor | penalty |
//! |---|---|
//! | `lifecycle` | draft −10, deprecated −15, quarantined −40; approved and published 0 |
//! | `data-classes` | the most sensitive class: regulated −25, confidential −15, internal −5, public 0 |
//! | `unapproved-connectors` | −15 per connector not in `connectors.approved`, at most −30 |
//! | `denial-rate` (usage given, ≥ 1 request) | −round(40 × denied ÷ requests), throttles not counted |
//! | `throttle-rate` (usage given, ≥ 1 request) | −round(20 × throttled ÷ requests) |
//! | `review` (when known) | overdue −10; done in time 0 |
//!
//! Factors whose input is unknown (no usage, no review date) are left out, not counted as 0.

use crate::compile::{App, CompiledPolicy};
use crate::raw::{Classification, Environment, Lifecycle};

/// Days after its last review an app's review is overdue.
pub const REVIEW_INTERVAL_DAYS: u32 = 90;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RiskTier {
    Green,
    Amber,
    Red,
}

impl RiskTier {
    pub const ALL: [RiskTier; 3] = [RiskTier::Green, RiskTier::Amber, RiskTier::Red];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskTier::Green => "green",
            RiskTier::Amber => "amber",
            RiskTier::Red => "red",
        }
    }

    pub fn parse(text: &str) -> Option<RiskTier> {
        RiskTier::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

/// An app's tier and every reason for it (empty for green).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Risk {
    pub tier: RiskTier,
    pub reasons: Vec<String>,
}

/// Requests of an app over some period; `denied` excludes throttles (HTTP 429), which are in
/// `throttled`. [`Usage::requests`] is their sum with `allowed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub allowed: u64,
    pub denied: u64,
    pub throttled: u64,
}

impl Usage {
    pub fn requests(&self) -> u64 {
        self.allowed.saturating_add(self.denied).saturating_add(self.throttled)
    }

    /// From a filter's day counters, whose `denied` per code includes the throttles.
    pub fn from_counters(c: &crate::fleet::UsageCounters) -> Usage {
        let denied: u64 = c.denied.iter().map(|d| u64::from(*d)).sum();
        Usage {
            allowed: u64::from(c.allowed),
            denied: denied.saturating_sub(u64::from(c.throttled)),
            throttled: u64::from(c.throttled),
        }
    }
}

/// What is known beyond the policy: usage (e.g. the last 7 days) and days since the last review.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    pub usage: Option<Usage>,
    pub days_since_review: Option<u32>,
}

/// One factor of the trust score: its name, what was seen, and the points it takes off (≤ 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Factor {
    pub name: &'static str,
    pub detail: String,
    pub points: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    pub score: u8,
    pub factors: Vec<Factor>,
}

/// The app's connectors that are not in `connectors.approved`, in the app's order.
pub fn unapproved_connectors<'a>(policy: &CompiledPolicy, app: &'a App) -> Vec<&'a str> {
    app.connectors.iter().filter(|c| !policy.approved_connectors.contains_key(c.as_str())).map(String::as_str).collect()
}

pub fn risk(policy: &CompiledPolicy, app: &App) -> Risk {
    let mut red = Vec::new();
    for class in [Classification::Confidential, Classification::Regulated] {
        if app.data_classes.contains(&class) {
            red.push(format!("data class `{}`", class.as_str()));
        }
    }
    for c in unapproved_connectors(policy, app) {
        red.push(format!("connector `{c}` is not approved"));
    }
    if app.lifecycle == Lifecycle::Quarantined {
        red.push("quarantined".to_string());
    }
    if !red.is_empty() {
        return Risk { tier: RiskTier::Red, reasons: red };
    }
    let mut amber = Vec::new();
    if app.data_classes.contains(&Classification::Internal) {
        amber.push("data class `internal`".to_string());
    }
    if app.environment == Environment::Prod {
        amber.push("runs in prod".to_string());
    }
    if !amber.is_empty() {
        return Risk { tier: RiskTier::Amber, reasons: amber };
    }
    Risk { tier: RiskTier::Green, reasons: Vec::new() }
}

/// `round(weight × part ÷ whole)` in integers (whole > 0).
fn share(weight: u64, part: u64, whole: u64) -> i32 {
    let scaled = (u128::from(weight) * u128::from(part.min(whole)) * 2 + u128::from(whole)) / (u128::from(whole) * 2);
    i32::try_from(scaled).unwrap_or(i32::MAX)
}

pub fn trust(policy: &CompiledPolicy, app: &App, evidence: &Evidence) -> Trust {
    let mut factors = Vec::new();
    let lifecycle = match app.lifecycle {
        Lifecycle::Draft => -10,
        Lifecycle::Approved | Lifecycle::Published => 0,
        Lifecycle::Deprecated => -15,
        Lifecycle::Quarantined => -40,
    };
    factors.push(Factor { name: "lifecycle", detail: app.lifecycle.as_str().to_string(), points: lifecycle });

    let top = app.data_classes.iter().max().copied();
    let classes = match top {
        Some(Classification::Regulated) => -25,
        Some(Classification::Confidential) => -15,
        Some(Classification::Internal) => -5,
        Some(Classification::Public) | None => 0,
    };
    let detail = top.map_or("none".to_string(), |c| format!("most sensitive `{}`", c.as_str()));
    factors.push(Factor { name: "data-classes", detail, points: classes });

    let unapproved = unapproved_connectors(policy, app);
    let points = -(15 * i32::try_from(unapproved.len().min(2)).unwrap_or(2));
    let detail = if unapproved.is_empty() { "none".to_string() } else { unapproved.join(", ") };
    factors.push(Factor { name: "unapproved-connectors", detail, points });

    if let Some(usage) = evidence.usage.filter(|u| u.requests() > 0) {
        let total = usage.requests();
        factors.push(Factor {
            name: "denial-rate",
            detail: format!("{} of {} requests denied", usage.denied, total),
            points: -share(40, usage.denied, total),
        });
        factors.push(Factor {
            name: "throttle-rate",
            detail: format!("{} of {} requests throttled", usage.throttled, total),
            points: -share(20, usage.throttled, total),
        });
    }
    if let Some(days) = evidence.days_since_review {
        let overdue = days > REVIEW_INTERVAL_DAYS;
        let detail = if overdue {
            format!("last review {days} days ago, overdue (every {REVIEW_INTERVAL_DAYS} days)")
        } else {
            format!("last review {days} days ago")
        };
        factors.push(Factor { name: "review", detail, points: if overdue { -10 } else { 0 } });
    }
    let total: i32 = factors.iter().map(|f| f.points).sum();
    let score = u8::try_from((100 + total).clamp(0, 100)).unwrap_or(0);
    Trust { score, factors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_json_str;
    use serde_json::json;

    fn policy(app: serde_json::Value) -> CompiledPolicy {
        let mut a = json!({"id": "a", "tier": "standard", "lifecycle": "published", "environment": "dev",
                           "region": "eu-west-1"});
        if let (Some(base), Some(extra)) = (a.as_object_mut(), app.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        let doc = json!({"apiVersion": "guardrail/v1", "kind": "Policy",
            "tiers": {"standard": {"rate": {"requests": 10, "per": "1m"}}},
            "connectors": {"approved": ["crm", "mail"]}, "apps": [a]});
        match compile_json_str(&doc.to_string()) {
            Ok(p) => p,
            Err(e) => unreachable!("test policy does not compile: {e:?}"),
        }
    }

    #[test]
    fn risk_tier_as_the_spec_defines_it() {
        let cases: &[(serde_json::Value, RiskTier, &[&str])] = &[
            (json!({}), RiskTier::Green, &[]),
            (json!({"data_classes": ["public"], "connectors": ["crm"]}), RiskTier::Green, &[]),
            (json!({"environment": "test", "lifecycle": "draft"}), RiskTier::Green, &[]),
            (json!({"data_classes": ["internal"]}), RiskTier::Amber, &["data class `internal`"]),
            (json!({"environment": "prod"}), RiskTier::Amber, &["runs in prod"]),
            (
                json!({"environment": "prod", "data_classes": ["public", "internal"]}),
                RiskTier::Amber,
                &["data class `internal`", "runs in prod"],
            ),
            (json!({"data_classes": ["confidential"]}), RiskTier::Red, &["data class `confidential`"]),
            (json!({"data_classes": ["regulated"], "environment": "prod"}), RiskTier::Red, &["data class `regulated`"]),
            (json!({"connectors": ["crm", "shadow-ai"]}), RiskTier::Red, &["connector `shadow-ai` is not approved"]),
            (json!({"lifecycle": "quarantined"}), RiskTier::Red, &["quarantined"]),
            (
                json!({"lifecycle": "quarantined", "data_classes": ["internal", "confidential", "regulated"],
                       "connectors": ["x"]}),
                RiskTier::Red,
                &[
                    "data class `confidential`",
                    "data class `regulated`",
                    "connector `x` is not approved",
                    "quarantined",
                ],
            ),
        ];
        for (app, tier, reasons) in cases {
            let p = policy(app.clone());
            let Some(a) = p.apps.first() else { unreachable!() };
            let r = risk(&p, a);
            assert_eq!(r.tier, *tier, "{app}");
            assert_eq!(r.reasons, reasons.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{app}");
        }
    }

    /// An app's overrides, what is known of it, the score expected and each factor's points.
    type TrustCase = (serde_json::Value, Evidence, u8, &'static [(&'static str, i32)]);

    #[test]
    fn trust_score_factors_and_contributions() {
        let u = |allowed, denied, throttled| Some(Usage { allowed, denied, throttled });
        let cases: &[TrustCase] = &[
            (
                json!({}),
                Evidence::default(),
                100,
                &[("lifecycle", 0), ("data-classes", 0), ("unapproved-connectors", 0)],
            ),
            (
                json!({"lifecycle": "draft", "data_classes": ["public", "internal"]}),
                Evidence::default(),
                85,
                &[("lifecycle", -10), ("data-classes", -5), ("unapproved-connectors", 0)],
            ),
            (
                json!({"lifecycle": "deprecated", "data_classes": ["confidential"], "connectors": ["a", "crm"]}),
                Evidence::default(),
                55,
                &[("lifecycle", -15), ("data-classes", -15), ("unapproved-connectors", -15)],
            ),
            (
                json!({"lifecycle": "quarantined", "data_classes": ["regulated"], "connectors": ["a", "b", "c"]}),
                Evidence { usage: u(0, 100, 0), days_since_review: Some(400) },
                0,
                &[
                    ("lifecycle", -40),
                    ("data-classes", -25),
                    ("unapproved-connectors", -30),
                    ("denial-rate", -40),
                    ("throttle-rate", 0),
                    ("review", -10),
                ],
            ),
            (
                json!({}),
                Evidence { usage: u(70, 10, 20), days_since_review: Some(90) },
                92,
                &[
                    ("lifecycle", 0),
                    ("data-classes", 0),
                    ("unapproved-connectors", 0),
                    ("denial-rate", -4),
                    ("throttle-rate", -4),
                    ("review", 0),
                ],
            ),
            (
                // No requests: the rates are unknown, not zero.
                json!({}),
                Evidence { usage: u(0, 0, 0), days_since_review: Some(91) },
                90,
                &[("lifecycle", 0), ("data-classes", 0), ("unapproved-connectors", 0), ("review", -10)],
            ),
        ];
        for (app, evidence, score, factors) in cases {
            let p = policy(app.clone());
            let Some(a) = p.apps.first() else { unreachable!() };
            let t = trust(&p, a, evidence);
            assert_eq!(t.score, *score, "{app} {evidence:?}");
            let got: Vec<(&str, i32)> = t.factors.iter().map(|f| (f.name, f.points)).collect();
            assert_eq!(got, factors.to_vec(), "{app} {evidence:?}");
        }
    }

    #[test]
    fn usage_from_counters_separates_throttles_from_denials() {
        let mut c = crate::fleet::UsageCounters { allowed: 5, ..Default::default() };
        c.count_denied(crate::decide::Code::QuotaExceeded);
        c.count_denied(crate::decide::Code::AccessDenied);
        c.count_denied(crate::decide::Code::AccessDenied);
        assert_eq!(Usage::from_counters(&c), Usage { allowed: 5, denied: 2, throttled: 1 });
    }

    #[test]
    fn key_digests_by_app_are_sorted_and_per_app() {
        let k1 = format!("sha256:{}", hex::encode(crate::api_key_digest("k1")));
        let k2 = format!("sha256:{}", hex::encode(crate::api_key_digest("k2")));
        let p = policy(json!({"api_keys": [k1, k2]}));
        let mut want = vec![crate::api_key_digest("k1"), crate::api_key_digest("k2")];
        want.sort_unstable();
        assert_eq!(p.api_key_digests_by_app(), vec![want]);
    }
}
