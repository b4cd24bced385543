//! The console's pages: server-rendered HTML that works without JavaScript, charts as inline SVG.
//! Every string that comes from the policy or from traffic goes through [`esc`].

use super::kpis::{self, Days, Kpis};
use super::model::{AppView, Granted, Model};
use super::query::Query;
use super::report::Report;
use crate::catalog::{quota_text, rate_text};
use std::fmt::Write;

/// `text` safe in HTML text and in quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// `text` as a URL path segment or query value.
pub(super) fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header a{color:#cfe3ff;text-decoration:none}header b{font-size:16px}
main{padding:16px 20px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:8px}
th,td{border-bottom:1px solid #e3e6ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;white-space:nowrap}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:9px;padding:0 8px;font-weight:600;color:#fff}
.red{background:#c62828}.amber{background:#e08a00}.green{background:#2e7d32}
.small{font-size:12px;color:#5b6372}.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}form.filters{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:12px}
code{font-size:12px}.no{color:#c62828;font-weight:600}.yes{color:#2e7d32}
svg{background:#fff;border:1px solid #e3e6ea}.grey{background:#6b7280}
.outcome.error{color:#c62828;font-weight:600}.outcome.done{color:#2e7d32;font-weight:600}
@media print{header{display:none}body{background:#fff}}
";

pub(super) fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Guardrail</title><style>{STYLE}</style></head>\
         <body><header><b>Guardrail</b><a href=\"/\">Catalog</a><a href=\"/kpis\">KPIs</a><a href=\"/requests\">Requests</a><a href=\"/report?quarter={}\">Report</a>\
         <a href=\"/metrics\">Metrics</a></header><main>{body}</main></body></html>",
        esc(title),
        current_quarter()
    )
}

fn current_quarter() -> String {
    let today = kpis::date(crate::serve::hub::day_of(crate::log::now_secs()));
    let month: u32 = today.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
    format!("{}-Q{}", today.get(..4).unwrap_or("1970"), month.div_ceil(3))
}

pub(super) fn badge(tier: &str) -> String {
    format!("<span class=\"badge {0}\">{0}</span>", esc(tier))
}

fn money(amount: f64, currency: &str) -> String {
    format!("{amount:.2} {}", esc(currency))
}

/// A stacked bar chart of one value per day and series (`(name, colour, values)`), as inline SVG.
pub fn chart(title: &str, days: &[String], series: &[(&str, &str, Vec<f64>)]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 170.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 20.0;
    let n = days.len().max(1);
    let totals: Vec<f64> =
        (0..n).map(|i| series.iter().map(|(_, _, v)| v.get(i).copied().unwrap_or(0.0)).sum()).collect();
    let max = totals.iter().copied().fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { (H - TOP - BOTTOM) / max } else { 0.0 };
    let slot = (W - 60.0) / n as f64;
    let mut svg = format!(
        "<svg role=\"img\" aria-label=\"{t}\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"6\" y=\"15\" font-size=\"12\" font-weight=\"600\">{t}</text><text x=\"{x}\" y=\"15\" font-size=\"11\" text-anchor=\"end\">max {max}</text>",
        t = esc(title),
        x = W - 6.0,
        max = trim(max),
    );
    for i in 0..n {
        let mut y = H - BOTTOM;
        let day = days.get(i).map(String::as_str).unwrap_or_default();
        for (name, colour, values) in series {
            let v = values.get(i).copied().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let h = v * scale;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {}: {}</title></rect>",
                50.0 + i as f64 * slot,
                (slot - 1.0).max(1.0),
                esc(colour),
                esc(day),
                esc(name),
                trim(v)
            );
        }
    }
    if let (Some(first), Some(last)) = (days.first(), days.last()) {
        let _ = write!(
            svg,
            "<text x=\"50\" y=\"{y}\" font-size=\"11\">{}</text><text x=\"{x}\" y=\"{y}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            esc(first),
            esc(last),
            y = H - 5.0,
            x = W - 10.0
        );
    }
    let mut legend = 6.0;
    for (name, colour, _) in series {
        let _ = write!(
            svg,
            "<rect x=\"{legend}\" y=\"22\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"31\" font-size=\"11\">{}</text>",
            esc(colour),
            legend + 14.0,
            esc(name)
        );
        legend += 30.0 + 7.0 * name.len() as f64;
    }
    svg.push_str("</svg>");
    svg
}

fn trim(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn select(name: &str, label: &str, options: &[String], chosen: &str) -> String {
    let mut out = format!("<label>{} <select name=\"{}\"><option value=\"\">all</option>", esc(label), esc(name));
    for o in options {
        let sel = if o == chosen { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{0}\"{sel}>{0}</option>", esc(o));
    }
    out.push_str("</select></label>");
    out
}

fn distinct(m: &Model, f: impl Fn(&AppView) -> Option<String>) -> Vec<String> {
    let mut v: Vec<String> = m.apps.iter().filter_map(f).collect();
    v.sort();
    v.dedup();
    v
}

/// Whether an app passes the catalog's filters.
fn matches(a: &AppView, q: &Query) -> bool {
    let e = &a.entry;
    let is = |name: &str, value: Option<&str>| {
        let want = q.value(name);
        want.is_empty() || value == Some(want)
    };
    let search = q.value("q").to_lowercase();
    let found = search.is_empty()
        || [Some(&e.id), e.owner.as_ref(), e.team.as_ref(), e.department.as_ref()]
            .into_iter()
            .flatten()
            .any(|s| s.to_lowercase().contains(&search));
    found
        && is("department", e.department.as_deref())
        && is("team", e.team.as_deref())
        && is("lifecycle", Some(e.lifecycle))
        && is("risk", Some(e.risk.tier))
        && is("environment", Some(e.environment))
}

/// Rows of the catalog page; `page=N` (from 1) shows the others.
pub const PAGE_SIZE: usize = 200;

/// The catalog URL with the query's filters and `page`.
fn page_link(q: &Query, page: usize) -> String {
    let mut out = format!("/?page={page}");
    for name in ["q", "department", "team", "lifecycle", "risk", "environment"] {
        let v = q.value(name);
        if !v.is_empty() {
            let _ = write!(out, "&amp;{name}={}", url(v));
        }
    }
    out
}

/// The shadow candidate's section of the catalog page ("" when none is served): where
/// the candidate would decide otherwise than the policy in force.
fn shadow(candidate: Option<&guardrail_proto::v1::CandidateStatus>) -> String {
    let Some(c) = candidate else { return String::new() };
    let mut out = format!(
        "<section id=\"shadow\"><h2>Shadow candidate <code>{}</code></h2><p class=\"small\">decided beside the policy in \
         force by {} node(s), never enforced{}{}</p>",
        esc(&c.revision),
        c.applied_nodes.len(),
        if c.nacked_nodes.is_empty() { String::new() } else { format!(" · rejected by {}", c.nacked_nodes.len()) },
        if c.last_error.is_empty() { String::new() } else { format!(" · last change refused: {}", esc(&c.last_error)) },
    );
    if c.differences.is_empty() {
        out.push_str("<p>No request decided otherwise so far.</p>");
    } else {
        out.push_str(
            "<table><thead><tr><th>app</th><th>enforced</th><th>candidate</th><th>requests</th></tr></thead><tbody>",
        );
        for d in &c.differences {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"shadow-count\">{}</td></tr>",
                esc(&d.app),
                esc(&d.enforced),
                esc(&d.candidate),
                d.count
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
    out
}

/// The catalog page; `pending` the number of pending self-service requests (`None`: the store
/// cannot say).
pub fn catalog(
    m: &Model,
    q: &Query,
    candidate: Option<&guardrail_proto::v1::CandidateStatus>,
    pending: Option<usize>,
) -> String {
    let matching: Vec<&AppView> = m.apps.iter().filter(|a| matches(a, q)).collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let at = q.value("page").parse::<usize>().unwrap_or(1).clamp(1, pages);
    let shown: Vec<&AppView> = matching.iter().skip((at - 1) * PAGE_SIZE).take(PAGE_SIZE).copied().collect();
    let mut body = String::with_capacity(1024 * shown.len() + 4096);
    let count = |tier: &str| m.apps.iter().filter(|a| a.entry.risk.tier == tier).count();
    let today: u64 = m.apps.iter().map(|a| a.today.requests).sum();
    let unregistered: u64 = m.totals.get(crate::serve::fleet::UNREGISTERED_ROW).map_or(0, kpis::requests);
    let registered: u64 =
        (m.totals.iter()).filter(|(row, _)| crate::serve::fleet::is_app_row(row)).map(|(_, c)| kpis::requests(c)).sum();
    let all = registered + unregistered;
    let _ = write!(
        body,
        "<h1>Catalog</h1><p class=\"small\">Revision <code>{}</code> · every app of the policy, also those never seen</p>\
         <div class=\"cards\"><div class=\"card\"><div class=\"small\">apps</div><div class=\"v\" id=\"apps-total\">{}</div></div>\
         <div class=\"card\"><div class=\"small\">risk</div><div class=\"v\">{} {} · {} {} · {} {}</div></div>\
         <div class=\"card\"><div class=\"small\">requests today</div><div class=\"v\" id=\"requests-today\">{today}</div></div>\
         <div class=\"card\"><div class=\"small\">registration share today</div><div class=\"v\" id=\"share-today\">{}</div>\
         <div class=\"small\">{unregistered} unregistered · <a href=\"/kpis\">KPIs and history</a></div></div>\
         <div class=\"card\"><div class=\"small\">pending requests</div><div class=\"v\" id=\"pending-requests\">\
         <a href=\"/requests\">{}</a></div></div></div>{}",
        esc(&m.revision),
        m.apps.len(),
        badge("red"),
        count("red"),
        badge("amber"),
        count("amber"),
        badge("green"),
        count("green"),
        pct((all > 0).then(|| registered as f64 / all as f64)),
        pending.map_or("–".to_string(), |n| n.to_string()),
        reviews_due(m),
    );
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/\"><label>Search <input name=\"q\" value=\"{}\"></label>{}{}{}{}{}\
         <button type=\"submit\">Filter</button> <a href=\"/\">clear</a></form>",
        esc(q.value("q")),
        select("department", "Department", &distinct(m, |a| a.entry.department.clone()), q.value("department")),
        select("team", "Team", &distinct(m, |a| a.entry.team.clone()), q.value("team")),
        select("lifecycle", "Lifecycle", &distinct(m, |a| Some(a.entry.lifecycle.to_string())), q.value("lifecycle")),
        select("risk", "Risk tier", &["red".into(), "amber".into(), "green".into()], q.value("risk")),
        select("environment", "Environment", &distinct(m, |a| Some(a.entry.environment.to_string())), q.value("environment")),
    );
    let _ = write!(
        body,
        "<p class=\"small\" id=\"shown\">{} of {} apps{}</p><table id=\"catalog\"><thead><tr><th>App</th><th>Owner</th><th>Team</th>\
         <th>Department</th><th>Env</th><th>Tier</th><th>Lifecycle</th><th>Region</th><th>Data classes</th><th>Connectors</th>\
         <th>Risk</th><th class=\"n\">Trust</th><th>API keys</th><th>Quota</th><th class=\"n\">Today</th><th>Last seen</th>\
         <th class=\"n\">Cost 30 d</th></tr></thead><tbody>",
        matching.len(),
        m.apps.len(),
        if pages > 1 {
            let prev = if at > 1 { format!(" <a href=\"{}\">previous</a>", page_link(q, at - 1)) } else { String::new() };
            let next = if at < pages { format!(" <a href=\"{}\">next</a>", page_link(q, at + 1)) } else { String::new() };
            format!(" · page {at} of {pages}{prev}{next}")
        } else {
            String::new()
        }
    );
    for a in shown {
        let e = &a.entry;
        let connectors: Vec<String> = e
            .connectors
            .iter()
            .map(|c| {
                if c.approved {
                    esc(&c.name)
                } else {
                    format!("<span class=\"no\" title=\"not approved\">{} ✗</span>", esc(&c.name))
                }
            })
            .collect();
        let t = &a.today;
        let _ = write!(
            body,
            "<tr data-app=\"{id}\"><td><a href=\"/apps/{href}\">{id}</a>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"risk\">{}<div class=\"small\">{}</div></td>\
             <td class=\"n trust\">{}</td><td class=\"keys\">{} <span class=\"small\">{}</span></td><td class=\"small\">{}</td>\
             <td class=\"n today\" title=\"allowed {} · throttled {} · denied {}\">{}</td><td class=\"last-seen\">{}</td>\
             <td class=\"n cost\">{}</td></tr>",
            granted_note(&a.granted),
            esc(e.owner.as_deref().unwrap_or("")),
            esc(e.team.as_deref().unwrap_or("")),
            esc(e.department.as_deref().unwrap_or("")),
            esc(e.environment),
            esc(&e.tier),
            esc(e.lifecycle),
            esc(&e.region),
            esc(&e.data_classes.join(", ")),
            connectors.join(", "),
            badge(e.risk.tier),
            esc(&e.risk.reasons.join("; ")),
            e.trust.score,
            e.api_keys.count,
            esc(&e.api_keys.fingerprints.join(" ")),
            esc(&quota_text(&e.quota)),
            t.allowed,
            t.throttled,
            t.requests.saturating_sub(t.allowed).saturating_sub(t.throttled),
            t.requests,
            esc(a.last_seen.as_deref().unwrap_or("never")),
            money(a.cost_30d, &m.currency),
            id = esc(&e.id),
            href = url(&e.id),
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(&shadow(candidate));
    page("Catalog", &body)
}

/// Under an app's id in the catalog: what it is granted beyond its tier and catalog ("" if nothing).
/// The apps whose review is overdue or due within 14 days, as `guardrail check` warns of them.
fn reviews_due(m: &Model) -> String {
    let due: Vec<&AppView> = m.apps.iter().filter(|a| a.review_due.is_some()).collect();
    if due.is_empty() {
        return String::new();
    }
    let mut b = format!("<section id=\"reviews-due\"><h2>Reviews due ({})</h2><ul>", due.len());
    for a in due {
        let _ = write!(
            b,
            "<li><a href=\"/apps/{}\">{}</a>: {}</li>",
            url(&a.entry.id),
            esc(&a.entry.id),
            esc(a.review_due.as_deref().unwrap_or_default())
        );
    }
    b.push_str("</ul></section>");
    b
}

fn granted_note(granted: &[Granted]) -> String {
    if granted.is_empty() {
        return String::new();
    }
    let what: Vec<String> = granted.iter().map(|g| esc(&g.what)).collect();
    let from_requests = granted.iter().filter(|g| g.request.is_some()).count();
    format!(
        "<div class=\"small granted\" title=\"{}\">{} in force{}</div>",
        what.join("; "),
        granted.len(),
        if from_requests > 0 { format!(", {from_requests} by request") } else { String::new() }
    )
}

/// The app page's table of what the app is granted, each marked with its request.
fn granted_table(b: &mut String, app: &str, granted: &[Granted]) {
    let _ = write!(
        b,
        "<h2>Granted until a date</h2><p class=\"small\">Quota overrides, connector exceptions, access grants and \
         review dates in force in the policy served; those of approved requests are marked with the request. \
         <a href=\"/requests?app={}\">Requests of this app</a></p>",
        url(app)
    );
    rows(
        b,
        &["Kind", "Grants", "Until", "Source", "Reason"],
        granted.iter().map(|g| {
            let source = match &g.request {
                Some(id) => format!("<a href=\"/requests#{}\">request {}</a>", url(id), esc(id)),
                None => "policy file".to_string(),
            };
            vec![esc(g.kind), esc(&g.what), esc(&g.until), source, esc(g.reason.as_deref().unwrap_or(""))]
        }),
        "granted",
    );
}

fn rows(out: &mut String, head: &[&str], rows: impl IntoIterator<Item = Vec<String>>, id: &str) {
    let _ = write!(out, "<table id=\"{}\"><thead><tr>", esc(id));
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    let mut any = false;
    for r in rows {
        any = true;
        out.push_str("<tr>");
        for cell in r {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    if !any {
        let _ = write!(out, "<tr><td colspan=\"{}\" class=\"small\">none</td></tr>", head.len());
    }
    out.push_str("</tbody></table>");
}

pub fn app(m: &Model, a: &AppView, days: &Days, today: u64) -> String {
    let e = &a.entry;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>{} {}</h1><p class=\"small\">{}</p><div class=\"cards\">\
         <div class=\"card\"><div class=\"small\">trust score</div><div class=\"v\" id=\"trust\">{}</div></div>\
         <div class=\"card\"><div class=\"small\">requests today</div><div class=\"v\" id=\"today\">{}</div></div>\
         <div class=\"card\"><div class=\"small\">last seen</div><div class=\"v\" id=\"last-seen\">{}</div></div>\
         <div class=\"card\"><div class=\"small\">cost, 30 days</div><div class=\"v\">{}</div></div></div>",
        esc(&e.id),
        badge(e.risk.tier),
        esc(&e.risk.reasons.join("; ")),
        e.trust.score,
        a.today.requests,
        esc(a.last_seen.as_deref().unwrap_or("never")),
        money(a.cost_30d, &m.currency),
    );
    if let Some(due) = &a.review_due {
        let _ = write!(b, "<p class=\"warning\" id=\"review-due\">{}</p>", esc(due));
    }
    b.push_str("<h2>Usage</h2>");
    let t = &a.today;
    let _ = write!(
        b,
        "<p>Today: {} requests — allowed {}, throttled {} (fleet budget {}), soft-limit warnings {}</p>",
        t.requests, t.allowed, t.throttled, t.fleet_budget, t.soft_limit
    );
    let from = today.saturating_sub(89);
    let labels: Vec<String> = (from..=today).map(kpis::date).collect();
    let per_day = |f: &dyn Fn(&crate::serve::fleet::Counts) -> u64| -> Vec<f64> {
        (from..=today).map(|d| days.get(&d).and_then(|x| x.get(&e.id)).map_or(0.0, |c| f(c) as f64)).collect()
    };
    b.push_str(&chart(
        "Requests per day, last 90 days",
        &labels,
        &[
            ("allowed", "#2e7d32", per_day(&|c| c.allowed)),
            ("throttled", "#e08a00", per_day(&|c| c.throttled)),
            (
                "denied",
                "#c62828",
                per_day(&|c| kpis::requests(c).saturating_sub(c.allowed).saturating_sub(c.throttled)),
            ),
        ],
    ));
    b.push_str("<h2>Denials today by code</h2>");
    rows(&mut b, &["Code", "Requests"], t.denied.iter().map(|(c, n)| vec![esc(c), n.to_string()]), "denials");

    let fields = [
        ("Owner", e.owner.clone().unwrap_or_default()),
        ("Team", e.team.clone().unwrap_or_default()),
        ("Department", e.department.clone().unwrap_or_default()),
        ("Environment", e.environment.to_string()),
        ("Tier", e.tier.clone()),
        ("Lifecycle", e.lifecycle.to_string()),
        ("Region", e.region.clone()),
        ("Data classes", e.data_classes.join(", ")),
    ];
    b.push_str("<h2>Identity</h2>");
    rows(&mut b, &["Field", "Value"], fields.iter().map(|(k, v)| vec![esc(k), esc(v)]), "identity");

    b.push_str("<h2>Quota in force</h2>");
    let budget = e.quota.daily_budget.map_or("none".to_string(), |n| n.to_string());
    let _ = write!(b, "<p id=\"quota\">rate {} · daily budget {}</p>", esc(&rate_text(&e.quota.rate)), esc(&budget));
    rows(
        &mut b,
        &["Override rate", "Override daily budget", "Expires", "Reason"],
        e.quota.overrides.iter().map(|o| {
            vec![
                esc(&o.rate.as_ref().map(rate_text).unwrap_or_default()),
                o.daily_budget.map(|n| n.to_string()).unwrap_or_default(),
                esc(&o.expires_at),
                esc(o.reason.as_deref().unwrap_or("")),
            ]
        }),
        "overrides",
    );

    granted_table(&mut b, &e.id, &a.granted);

    b.push_str("<h2>Connectors</h2>");
    rows(
        &mut b,
        &["Connector", "Approved", "Admitted today"],
        e.connectors.iter().map(|c| {
            let ok = if c.approved {
                "<span class=\"yes\">approved</span>"
            } else {
                "<span class=\"no\">not approved</span>"
            };
            vec![esc(&c.name), ok.to_string(), t.connectors.get(&c.name).copied().unwrap_or(0).to_string()]
        }),
        "connectors",
    );
    b.push_str("<h2>Datasets it may reach</h2>");
    rows(
        &mut b,
        &["Dataset", "Classification", "Allowed regions", "From the app's region", "JIT"],
        m.detail(a).into_iter().map(|r| {
            vec![
                esc(&r.dataset),
                esc(r.classification),
                esc(&r.allowed_regions.join(", ")),
                if r.from_app_region { "yes".into() } else { "<span class=\"no\">no</span>".into() },
                if r.requires_jit { "required".into() } else { String::new() },
            ]
        }),
        "datasets",
    );
    b.push_str("<h2>Trust score</h2>");
    rows(
        &mut b,
        &["Factor", "Seen", "Points"],
        e.trust.factors.iter().map(|f| vec![esc(f.name), esc(&f.detail), f.points.to_string()]),
        "factors",
    );
    b.push_str("<h2>API keys</h2>");
    rows(
        &mut b,
        &["Fingerprint (first 8 hex of SHA-256)"],
        e.api_keys.fingerprints.iter().map(|f| vec![esc(f)]),
        "keys",
    );
    page(&e.id, &b)
}

fn pct(share: Option<f64>) -> String {
    share.map_or("–".to_string(), |s| format!("{:.1} %", s * 100.0))
}

/// The KPI tables shared by the KPIs page and the report.
fn kpi_tables(b: &mut String, k: &Kpis) {
    b.push_str("<h2>Unregistered callers</h2>");
    rows(
        b,
        &["Kind", "Id", "Requests", "Last seen"],
        k.unregistered_callers
            .iter()
            .map(|c| vec![esc(&c.kind), esc(&c.id), c.requests.to_string(), esc(&c.last_seen)]),
        "unregistered",
    );
    b.push_str("<h2>Throttles per app and cause</h2>");
    rows(
        b,
        &["App", "quota-exceeded", "budget-exhausted", "fleet-budget"],
        k.throttles.iter().map(|t| {
            vec![esc(&t.app), t.quota_exceeded.to_string(), t.budget_exhausted.to_string(), t.fleet_budget.to_string()]
        }),
        "throttles",
    );
    b.push_str("<h2>Denials per code</h2>");
    rows(b, &["Code", "Requests"], k.denials.iter().map(|(c, n)| vec![esc(c), n.to_string()]), "denials");
    let _ = write!(b, "<p>Soft-limit warnings: <b id=\"soft-limit\">{}</b></p>", k.soft_limit_warnings);
    b.push_str("<h2>Cost per app</h2>");
    rows(
        b,
        &["App", "Department", "Admitted by connector", "Cost"],
        k.cost.by_app.iter().map(|c| {
            let by: Vec<String> = c.requests.iter().map(|(k, n)| format!("{} {n}", esc(k))).collect();
            vec![esc(&c.app), esc(&c.department), by.join(", "), money(c.cost, &k.currency)]
        }),
        "cost-apps",
    );
    b.push_str("<h2>Cost per department</h2>");
    rows(
        b,
        &["Department", "Cost"],
        k.cost.by_department.iter().map(|(d, c)| vec![esc(d), money(*c, &k.currency)]),
        "cost-departments",
    );
    b.push_str("<h2>Anomalies</h2><p class=\"small\">Requests on the last day above 3× the trailing 7-day mean, at least 100.</p>");
    rows(
        b,
        &["App", "Day", "Requests", "Trailing mean"],
        k.anomalies
            .iter()
            .map(|a| vec![esc(&a.app), esc(&a.day), a.requests.to_string(), format!("{:.1}", a.trailing_mean)]),
        "anomalies",
    );
}

fn kpi_cards(b: &mut String, k: &Kpis) {
    let by = |m: &std::collections::BTreeMap<&str, u64>| {
        m.iter().map(|(k, n)| format!("{} {n}", esc(k))).collect::<Vec<_>>().join(" · ")
    };
    let _ = write!(
        b,
        "<div class=\"cards\"><div class=\"card\"><div class=\"small\">registration share</div><div class=\"v\" id=\"share\">{}</div>\
         <div class=\"small\">{} registered · {} unregistered</div></div>\
         <div class=\"card\"><div class=\"small\">apps by lifecycle</div><div>{}</div></div>\
         <div class=\"card\"><div class=\"small\">apps by risk tier</div><div>{}</div></div>\
         <div class=\"card\"><div class=\"small\">cost</div><div class=\"v\" id=\"cost\">{}</div></div></div>",
        pct(k.registration.share),
        k.registration.registered_requests,
        k.registration.unregistered_requests,
        by(&k.apps_by_lifecycle),
        by(&k.apps_by_risk),
        money(k.cost.total, &k.currency),
    );
}

pub fn kpis(_m: &Model, k: &Kpis) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>KPIs</h1><form class=\"filters\" method=\"get\" action=\"/kpis\"><label>From <input type=\"date\" name=\"from\" value=\"{}\"></label>\
         <label>To <input type=\"date\" name=\"to\" value=\"{}\"></label><button type=\"submit\">Show</button></form>",
        esc(&k.from),
        esc(&k.to)
    );
    kpi_cards(&mut b, k);
    let labels: Vec<String> = k.daily.iter().map(|d| d.day.clone()).collect();
    let col = |f: &dyn Fn(&kpis::Daily) -> f64| -> Vec<f64> { k.daily.iter().map(f).collect() };
    b.push_str(&chart(
        "Requests per day",
        &labels,
        &[
            ("allowed", "#2e7d32", col(&|d| d.allowed as f64)),
            ("throttled", "#e08a00", col(&|d| d.throttled as f64)),
            ("denied", "#c62828", col(&|d| d.denied as f64)),
            ("unregistered", "#6a1b9a", col(&|d| d.unregistered as f64)),
        ],
    ));
    b.push_str(&chart(
        "Registration share per day (%)",
        &labels,
        &[("share", "#1565c0", col(&|d| d.registration_share.map_or(0.0, |s| (s * 1000.0).round() / 10.0)))],
    ));
    b.push_str(&chart(&format!("Cost per day ({})", k.currency), &labels, &[("cost", "#00897b", col(&|d| d.cost))]));
    b.push_str(&chart(
        "Soft-limit warnings and anomalies per day",
        &labels,
        &[
            ("soft-limit", "#f9a825", col(&|d| d.soft_limit_warnings as f64)),
            ("anomalies", "#ad1457", col(&|d| d.anomalies as f64)),
        ],
    ));
    kpi_tables(&mut b, k);
    page("KPIs", &b)
}

/// One line of the quarter comparison: a summary's value as shown.
type SummaryCell<'a> = dyn Fn(&super::report::Summary) -> String + 'a;

pub fn report(r: &Report) -> String {
    let k = &r.kpis;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Quarterly report {}</h1><p class=\"small\">{} to {} · revision <code>{}</code> · {} apps in the catalog · \
         <a href=\"/api/v1/report?quarter={q}&amp;format=csv\">CSV</a> · <a href=\"/api/v1/report?quarter={q}\">JSON</a></p>",
        esc(&r.quarter),
        esc(&k.from),
        esc(&k.to),
        esc(&r.revision),
        r.apps_total,
        q = url(&r.quarter),
    );
    kpi_cards(&mut b, k);
    b.push_str("<h2>Compared with the quarter before</h2>");
    let quarters: Vec<&super::report::Summary> = r.previous.iter().chain([&r.summary]).collect();
    let mut head = vec!["".to_string()];
    head.extend(quarters.iter().map(|s| s.quarter.clone()));
    let lines: [(&str, &SummaryCell<'_>); 7] = [
        ("Registered requests", &|s| s.registered_requests.to_string()),
        ("Unregistered requests", &|s| s.unregistered_requests.to_string()),
        ("Registration share", &|s| pct(s.registration_share)),
        ("Throttled", &|s| s.throttled.to_string()),
        ("Denied", &|s| s.denied.to_string()),
        ("Cost", &|s| money(s.cost, &k.currency)),
        ("Days with anomalies", &|s| s.anomaly_days.to_string()),
    ];
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    rows(
        &mut b,
        &head_refs,
        lines.iter().map(|(name, f)| std::iter::once(esc(name)).chain(quarters.iter().map(|s| f(s))).collect()),
        "compare",
    );
    b.push_str("<h2>Apps</h2>");
    rows(
        &mut b,
        &["App", "Department", "Team", "Lifecycle", "Risk", "Requests", "Allowed", "Throttled", "Denied", "Cost"],
        r.rows.iter().map(|row| {
            vec![
                esc(&row.app),
                esc(&row.department),
                esc(&row.team),
                esc(&row.lifecycle),
                badge(&row.risk_tier),
                row.requests.to_string(),
                row.allowed.to_string(),
                row.throttled.to_string(),
                row.denied.to_string(),
                money(row.cost, &k.currency),
            ]
        }),
        "report-apps",
    );
    kpi_tables(&mut b, k);
    page(&format!("Report {}", r.quarter), &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        let cases = [
            ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
            ("\"><img src=x onerror=alert(1)>", "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"),
            ("a&b 'c'", "a&amp;b &#39;c&#39;"),
            ("plain-id_1.2", "plain-id_1.2"),
        ];
        for (text, want) in cases {
            assert_eq!(esc(text), want, "{text}");
        }
        assert_eq!(url("a b/<c>"), "a%20b%2F%3Cc%3E");
    }

    #[test]
    fn a_chart_has_a_bar_per_day_and_series_with_a_value() {
        let days: Vec<String> = vec!["d1".into(), "d2".into(), "<d3>".into()];
        let svg = chart("T<", &days, &[("a", "#000", vec![1.0, 0.0, 2.0]), ("b", "#fff", vec![1.0, 1.0, 0.0])]);
        assert_eq!(svg.matches("<rect ").count(), 6, "4 bars and 2 legend boxes: {svg}");
        assert!(svg.contains("T&lt;") && svg.contains("&lt;d3&gt;") && !svg.contains("<d3>"), "escaped");
        assert!(svg.contains("max 2"), "the scale");
    }
}
