//! `/metrics`: the fleet in the OpenMetrics text format (`prometheus-client`), built per scrape
//! from the console's [`Model`] and the hub's status. Per app at most 7 series: one
//! `guardrail_app_info`, five `guardrail_app_requests_today` outcomes (only for apps seen today),
//! `guardrail_app_cost_today` (apps with a priced connector) and `guardrail_app_anomaly`
//! (anomalous apps only). Names and labels are documented in the README ("Console").

use super::kpis;
use super::model::Model;
use crate::serve::fleet::UNREGISTERED_ROW;
use crate::serve::hub::Hub;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;
type IntGauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// A label, its value escaped as the exposition format asks (`\\`, `\"`, `\n`): the crate writes
/// values as given, and an owner or team from the policy may hold a quote.
fn l(name: &'static str, value: &str) -> (&'static str, String) {
    (name, value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

fn set(family: &IntGauges, labels: Labels, value: u64) {
    family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
}

pub fn render(hub: &Hub, m: &Model) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("guardrail");
    let status = hub.status();

    let nodes = IntGauges::default();
    let connected = status.nodes.iter().filter(|n| n.connected).count() as u64;
    set(&nodes, vec![l("state", "connected")], connected);
    set(&nodes, vec![l("state", "disconnected")], status.nodes.len() as u64 - connected);
    registry.register("nodes", "Envoy processes the companion knows, by state", nodes.clone());

    let by_revision = IntGauges::default();
    let mut acked: BTreeMap<&str, u64> = BTreeMap::new();
    for n in status.nodes.iter().filter(|n| n.connected) {
        *acked.entry(n.acked_revision.as_str()).or_default() += 1;
    }
    for (revision, n) in acked {
        set(&by_revision, vec![l("revision", revision)], n);
    }
    registry.register(
        "node_revisions",
        "Connected nodes by the policy revision they acknowledged",
        by_revision.clone(),
    );

    let served = IntGauges::default();
    set(&served, vec![l("revision", &m.revision)], 1);
    registry.register("policy_revision", "The policy revision this companion serves (value 1)", served.clone());

    let apps = IntGauges::default();
    let info = IntGauges::default();
    for a in &m.apps {
        let e = &a.entry;
        set(
            &info,
            vec![
                l("app", &e.id),
                l("department", e.department.as_deref().unwrap_or("")),
                l("team", e.team.as_deref().unwrap_or("")),
                l("lifecycle", e.lifecycle),
                l("risk_tier", e.risk.tier),
            ],
            1,
        );
        apps.get_or_create(&vec![l("lifecycle", e.lifecycle), l("risk_tier", e.risk.tier)]).inc();
    }
    registry.register("apps", "Apps of the catalog by lifecycle and risk tier", apps.clone());
    registry.register(
        "app_info",
        "Every app of the catalog (value 1) with its owner labels and risk tier",
        info.clone(),
    );

    let requests = IntGauges::default();
    let cost = FloatGauges::default();
    let unregistered = IntGauges::default();
    for (app, c) in m.totals.iter() {
        if app == UNREGISTERED_ROW {
            for (kind, n) in &c.denied {
                set(&unregistered, vec![l("kind", kind)], *n);
            }
            continue;
        }
        let denied = |code: &str| c.denied.get(code).copied().unwrap_or(0);
        let budget = denied("budget-exhausted");
        let all = kpis::requests(c);
        let outcomes = [
            ("allowed", c.allowed),
            ("denied", all.saturating_sub(c.allowed).saturating_sub(c.throttled)),
            ("quota-exceeded", denied("quota-exceeded")),
            ("budget-exhausted", budget.saturating_sub(c.fleet_budget)),
            ("fleet-budget", c.fleet_budget.min(budget)),
        ];
        for (outcome, n) in outcomes {
            set(&requests, vec![l("app", app), l("outcome", outcome)], n);
        }
        let amount = kpis::cost_of(&m.snapshot.policy, c);
        if amount > 0.0 {
            cost.get_or_create(&vec![l("app", app), l("currency", &m.currency)]).set(amount);
        }
    }
    registry.register(
        "app_requests_today",
        "Requests of an app today (UTC) over the fleet, by outcome: allowed, denied (not throttled), quota-exceeded, \
         budget-exhausted, fleet-budget",
        requests.clone(),
    );
    registry.register("app_cost_today", "Cost of an app's admitted requests today (connectors.pricing)", cost.clone());
    registry.register(
        "unregistered_requests_today",
        "Requests today of callers the catalog does not know, by kind (api-key, app)",
        unregistered.clone(),
    );

    let anomaly = IntGauges::default();
    for a in &m.anomalies {
        set(&anomaly, vec![l("app", &a.app)], 1);
    }
    let anomalies = Gauge::<i64>::default();
    anomalies.set(i64::try_from(m.anomalies.len()).unwrap_or(i64::MAX));
    registry.register(
        "app_anomaly",
        "Apps whose requests today pass 3x their trailing 7-day mean (value 1)",
        anomaly.clone(),
    );
    registry.register("anomalies", "Apps anomalous today", anomalies.clone());

    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::l;

    #[test]
    fn label_values_are_escaped() {
        let cases =
            [("plain", "plain"), ("a\"b", "a\\\"b"), ("back\\slash", "back\\\\slash"), ("two\nlines", "two\\nlines")];
        for (value, want) in cases {
            assert_eq!(l("x", value).1, want, "{value}");
        }
    }
}
