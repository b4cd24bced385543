//! The quarterly report (`/report?quarter=YYYY-Qn`, `/api/v1/report?quarter=…&format=json|csv`):
//! the quarter's KPIs with one row per app of the catalog (never-seen apps with zeros) and the
//! unregistered callers' requests, for executives and spreadsheets.

use super::kpis::Kpis;
use super::model::Model;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quarter: String,
    pub revision: String,
    pub apps_total: usize,
    pub rows: Vec<Row>,
    pub kpis: Kpis,
    /// This quarter's totals, and the quarter before's to compare.
    pub summary: Summary,
    pub previous: Option<Summary>,
}

/// A quarter in a few numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub quarter: String,
    pub registered_requests: u64,
    pub unregistered_requests: u64,
    pub registration_share: Option<f64>,
    pub throttled: u64,
    /// Denials other than throttles, unregistered callers' included.
    pub denied: u64,
    pub cost: f64,
    pub anomaly_days: u64,
}

impl Summary {
    pub fn of(quarter: &str, k: &Kpis) -> Summary {
        let throttled: u64 = k.throttles.iter().map(|t| t.quota_exceeded + t.budget_exhausted + t.fleet_budget).sum();
        let denied: u64 = k.denials.values().sum::<u64>().saturating_sub(throttled);
        Summary {
            quarter: quarter.to_string(),
            registered_requests: k.registration.registered_requests,
            unregistered_requests: k.registration.unregistered_requests,
            registration_share: k.registration.share,
            throttled,
            denied,
            cost: k.cost.total,
            anomaly_days: k.daily.iter().filter(|d| d.anomalies > 0).count() as u64,
        }
    }
}

/// One app's quarter.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub app: String,
    pub department: String,
    pub team: String,
    pub lifecycle: String,
    pub risk_tier: String,
    pub requests: u64,
    pub allowed: u64,
    pub throttled: u64,
    pub denied: u64,
    pub cost: f64,
}

/// A CSV field: quoted when it holds a separator, quote or line break; a leading `=`, `+`, `-`
/// or `@` is prefixed with `'` so that a spreadsheet does not run it as a formula.
fn field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) { format!("'{text}") } else { text.to_string() };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

impl Report {
    pub fn new(quarter: &str, m: &Model, kpis: Kpis) -> Report {
        let mut rows: Vec<Row> = m
            .apps
            .iter()
            .map(|a| {
                let e = &a.entry;
                let t = kpis.apps.get(&e.id).cloned().unwrap_or_default();
                let cost = kpis.cost.by_app.iter().find(|c| c.app == e.id).map_or(0.0, |c| c.cost);
                Row {
                    app: e.id.clone(),
                    department: e.department.clone().unwrap_or_default(),
                    team: e.team.clone().unwrap_or_default(),
                    lifecycle: e.lifecycle.to_string(),
                    risk_tier: e.risk.tier.to_string(),
                    requests: t.requests,
                    allowed: t.allowed,
                    throttled: t.throttled,
                    denied: t.denied,
                    cost,
                }
            })
            .collect();
        rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.app.cmp(&b.app)));
        Report {
            quarter: quarter.to_string(),
            revision: m.revision.clone(),
            apps_total: m.apps.len(),
            rows,
            summary: Summary::of(quarter, &kpis),
            previous: None,
            kpis,
        }
    }

    /// One line per app, then one for the unregistered callers.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "quarter,app,department,team,lifecycle,risk_tier,requests,allowed,throttled,denied,cost,currency\n",
        );
        let currency = field(&self.kpis.currency);
        for r in &self.rows {
            let line = [
                field(&self.quarter),
                field(&r.app),
                field(&r.department),
                field(&r.team),
                field(&r.lifecycle),
                field(&r.risk_tier),
                r.requests.to_string(),
                r.allowed.to_string(),
                r.throttled.to_string(),
                r.denied.to_string(),
                format!("{:.2}", r.cost),
                currency.clone(),
            ];
            out.push_str(&line.join(","));
            out.push('\n');
        }
        let unregistered = self.kpis.registration.unregistered_requests;
        out.push_str(&format!(
            "{},(unregistered),,,,,{unregistered},0,0,{unregistered},0.00,{currency}\n",
            field(&self.quarter)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        let cases = [
            ("plain", "plain"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("-1", "'-1"),
            ("line\nbreak", "\"line\nbreak\""),
        ];
        for (text, want) in cases {
            assert_eq!(field(text), want, "{text}");
        }
    }
}
