//! The console's Requests page (`/requests[?app=ID]`): the self-service requests of the store,
//! pending first (what each changes, why, until when, the app's risk tier), then the recent
//! decided ones (status, who decided and when, why, the revision pushed).
//!
//! Deciding from the page: an approver pastes their own bearer token (the one whose digest
//! `settings.approvers` lists) once; it stays in the tab's `sessionStorage` and [`SCRIPT`] sends it
//! as `Authorization: Bearer` with `fetch` to `POST /api/v1/requests/{id}/approve|reject`, showing
//! the decided request (and its revision) or the problem's detail. No cookie is ever set, so
//! another site cannot make the browser decide (CSRF): it has no way to add the header. The page's
//! Content-Security-Policy ([`CSP`]) allows that one script by its SHA-256, `fetch` to this origin
//! only, no form submission and no framing.

use super::html::{badge, esc, page, url};
use super::problem;
use crate::catalog::Risk;
use crate::selfservice::requests::Request;
use crate::serve::hub::Hub;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use std::fmt::Write;
use std::sync::LazyLock;

/// Decided (approved, rejected, expired) requests shown, most recently decided first.
pub const RECENT_DECIDED: usize = 100;

/// The page's script: keeps the approver's token for the tab and decides a row's request.
pub const SCRIPT: &str = r#""use strict";
(function () {
  var KEY = "guardrail.approver-token";
  var store = window.sessionStorage;
  var state = document.getElementById("approver-state");
  var input = document.getElementById("approver-token");
  function token() { return store.getItem(KEY) || ""; }
  function showState() {
    state.textContent = token() ? "an approver token is set for this tab" : "no approver token set: paste yours to decide";
  }
  document.getElementById("approver").addEventListener("submit", function (event) {
    event.preventDefault();
    var t = input.value.trim();
    input.value = "";
    if (t) { store.setItem(KEY, t); }
    showState();
  });
  document.getElementById("approver-forget").addEventListener("click", function () {
    store.removeItem(KEY);
    showState();
  });
  showState();

  function problemText(status, body, text) {
    if (body && typeof body === "object" && body.detail) {
      var code = String(body.type || "").replace("urn:guardrail:problem:", "");
      return status + " " + code + ": " + body.detail;
    }
    return status + ": " + String(text).slice(0, 300);
  }

  function enable(buttons, on) {
    buttons.forEach(function (b) { b.disabled = !on; });
  }

  function decide(row, action) {
    var outcome = row.querySelector(".outcome");
    var buttons = row.querySelectorAll("button");
    var reason = row.querySelector(".decision-reason").value.trim();
    var t = token();
    outcome.className = "outcome small error";
    if (!t) { outcome.textContent = "paste your approver token above first"; return; }
    if (action === "reject" && !reason) { outcome.textContent = "a rejection needs a reason"; return; }
    enable(buttons, false);
    outcome.className = "outcome small";
    outcome.textContent = action === "approve" ? "approving…" : "rejecting…";
    fetch("/api/v1/requests/" + encodeURIComponent(row.dataset.request) + "/" + action, {
      method: "POST",
      credentials: "omit",
      cache: "no-store",
      headers: { "Authorization": "Bearer " + t, "Content-Type": "application/json" },
      body: JSON.stringify(reason ? { reason: reason } : {})
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = JSON.parse(text); } catch (e) { body = null; }
        if (response.ok && body && body.status) {
          row.dataset.status = body.status;
          row.querySelector(".status").textContent = body.status;
          outcome.className = "outcome small done";
          outcome.textContent = body.status + " by " + body.decided_by +
            (body.revision ? " · revision " + body.revision : "");
          return;
        }
        outcome.className = "outcome small error";
        outcome.textContent = problemText(response.status, body, text);
        enable(buttons, true);
      });
    }).catch(function (error) {
      outcome.className = "outcome small error";
      outcome.textContent = "no answer from the companion: " + error;
      enable(buttons, true);
    });
  }

  document.querySelectorAll("tr[data-request][data-status=pending]").forEach(function (row) {
    row.querySelector("button.approve").addEventListener("click", function () { decide(row, "approve"); });
    row.querySelector("button.reject").addEventListener("click", function () { decide(row, "reject"); });
  });
})();
"#;

/// The page's Content-Security-Policy: [`SCRIPT`] by its hash and nothing else runs; it may
/// `fetch` this origin only; no form is submitted and no other site frames the page.
pub static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    use base64ct::Encoding;
    let digest = guardrail_core::api_key_digest(SCRIPT);
    let policy = format!(
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{}'; \
         connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
        base64ct::Base64::encode_string(&digest)
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

fn unavailable(why: impl std::fmt::Display) -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", &format!("the requests cannot be read: {why}"))
}

/// Every request of the store, newest first; a 503 problem when there is no store or it fails.
pub async fn load(hub: &Hub) -> Result<Vec<Request>, Response> {
    let store = hub.store().ok_or_else(|| unavailable("no store attached"))?;
    let records = store.requests().await.map_err(unavailable)?;
    Ok(records.iter().filter_map(crate::selfservice::approvals::request_of).collect())
}

/// How many requests are pending, or `None` when the store cannot say (the overview shows "–").
pub async fn pending_count(hub: &Hub) -> Option<usize> {
    let records = hub.store()?.requests().await.ok()?;
    Some(records.iter().filter(|r| r.status == "pending").count())
}

/// When a decided request was decided (or, expired, ended): the order of the decided table.
fn decided_when(r: &Request) -> &str {
    r.decided_at.as_deref().unwrap_or(&r.until)
}

fn status_badge(status: &str) -> String {
    let colour = match status {
        "approved" => "green",
        "rejected" => "red",
        "pending" => "amber",
        _ => "grey",
    };
    format!("<span class=\"badge {colour} status\">{}</span>", esc(status))
}

fn app_cell(app: &str) -> String {
    format!("<a href=\"/apps/{}\">{}</a>", url(app), esc(app))
}

/// The page: `all` newest first (as the store lists them), the app's current risk from
/// `risk_of` (else the tier it had when the request was filed), only `app`'s when not empty.
pub fn render(all: &[Request], risk_of: &dyn Fn(&str) -> Option<Risk>, app: &str) -> String {
    let shown: Vec<&Request> = all.iter().filter(|r| app.is_empty() || r.app == app).collect();
    let pending: Vec<&Request> = shown.iter().copied().filter(|r| r.status == "pending").collect();
    let mut decided: Vec<&Request> = shown.iter().copied().filter(|r| r.status != "pending").collect();
    decided.sort_by(|a, b| decided_when(b).cmp(decided_when(a)));
    let mut b = String::with_capacity(4096 + 1024 * (pending.len() + decided.len().min(RECENT_DECIDED)));
    b.push_str("<h1>Requests</h1>");
    if !app.is_empty() {
        let _ = write!(b, "<p class=\"small\">App {} only · <a href=\"/requests\">every app</a></p>", app_cell(app));
    }
    b.push_str(
        "<p class=\"small\">Filed by apps with their API key (<code>guardrail request</code>, <code>POST \
         /api/v1/requests</code>); decided by an approver of <code>settings.approvers</code>, never by the app's \
         owner. An approved request is an overlay on the policy, pushed as its own revision until it ends.</p>\
         <form id=\"approver\" class=\"filters\" autocomplete=\"off\"><label>Approver token \
         <input id=\"approver-token\" type=\"password\" autocomplete=\"off\" spellcheck=\"false\" size=\"40\"></label>\
         <button type=\"submit\">Use for this tab</button> <button type=\"button\" id=\"approver-forget\">Forget</button> \
         <span id=\"approver-state\" class=\"small\">deciding here needs JavaScript; else \
         <code>guardrail approve ID --server URL --token-file F</code></span></form>\
         <p class=\"small\">Your token stays in this tab (sessionStorage) and is sent only as <code>Authorization: \
         Bearer</code> to this companion's <code>/api/v1/requests/{id}/approve</code> or <code>/reject</code>; no \
         cookie is set.</p>",
    );
    let _ = write!(b, "<h2>Pending <span id=\"pending-count\">{}</span></h2>", pending.len());
    b.push_str(
        "<table id=\"pending\"><thead><tr><th>Request</th><th>App</th><th>Kind</th><th>Change</th><th>Reason</th>\
         <th>Until</th><th>Risk</th><th>Filed</th><th>Status</th><th>Decide</th></tr></thead><tbody>",
    );
    for r in &pending {
        let (tier, reasons) = match risk_of(&r.app) {
            Some(risk) => (risk.tier.to_string(), risk.reasons),
            None => (r.risk_tier.clone(), r.risk_reasons.clone()),
        };
        let _ = write!(
            b,
            "<tr id=\"{id}\" data-request=\"{id}\" data-status=\"pending\"><td><code>{id}</code></td><td class=\"app\">{}</td>\
             <td class=\"kind\">{}</td><td class=\"change\">{}</td><td class=\"reason\">{}</td>\
             <td class=\"until\">{}</td><td class=\"risk\">{}<div class=\"small\">{}</div></td><td class=\"filed\">{}</td>\
             <td class=\"status\">pending</td><td class=\"decide\"><input class=\"decision-reason\" aria-label=\"reason\" \
             placeholder=\"reason (required to reject)\" maxlength=\"1000\"> <button type=\"button\" class=\"approve\">Approve\
             </button> <button type=\"button\" class=\"reject\">Reject</button><div class=\"outcome small\" role=\"status\">\
             </div></td></tr>",
            app_cell(&r.app),
            esc(r.kind.as_str()),
            esc(&r.change),
            esc(&r.reason),
            esc(&r.until),
            badge(&tier),
            esc(&reasons.join("; ")),
            esc(&r.filed_at),
            id = esc(&r.id),
        );
    }
    if pending.is_empty() {
        b.push_str("<tr><td colspan=\"10\" class=\"small\">none</td></tr>");
    }
    b.push_str("</tbody></table>");
    let _ = write!(
        b,
        "<h2>Decided</h2><p class=\"small\">The {RECENT_DECIDED} most recently decided (or ended), newest first.</p>\
         <table id=\"decided\"><thead><tr><th>Request</th><th>App</th><th>Kind</th><th>Change</th><th>Reason</th>\
         <th>Status</th><th>Decided by</th><th>Decided at</th><th>Decision reason</th><th>Revision</th></tr></thead><tbody>"
    );
    for r in decided.iter().take(RECENT_DECIDED) {
        let _ = write!(
            b,
            "<tr id=\"{id}\" data-request=\"{id}\" data-status=\"{status}\"><td><code>{id}</code></td><td class=\"app\">{}</td>\
             <td class=\"kind\">{}</td><td class=\"change\">{}</td><td class=\"reason\">{}</td><td>{}</td>\
             <td class=\"decided-by\">{}</td><td class=\"decided-at\">{}</td><td class=\"decision-reason\">{}</td>\
             <td class=\"revision\"><code>{}</code></td></tr>",
            app_cell(&r.app),
            esc(r.kind.as_str()),
            esc(&r.change),
            esc(&r.reason),
            status_badge(&r.status),
            esc(r.decided_by.as_deref().unwrap_or("")),
            esc(r.decided_at.as_deref().unwrap_or(if r.status == "expired" { &r.until } else { "" })),
            esc(r.decision_reason.as_deref().unwrap_or("")),
            esc(r.revision.as_deref().unwrap_or("")),
            id = esc(&r.id),
            status = esc(&r.status),
        );
    }
    if decided.is_empty() {
        b.push_str("<tr><td colspan=\"10\" class=\"small\">none</td></tr>");
    }
    b.push_str("</tbody></table>");
    let _ = write!(b, "<script>{SCRIPT}</script>");
    page("Requests", &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selfservice::requests::Kind;

    fn request(id: &str, app: &str, status: &str, reason: &str) -> Request {
        Request {
            id: id.into(),
            kind: Kind::Quota,
            app: app.into(),
            status: status.into(),
            filed_at: "2026-12-01T10:00:00Z".into(),
            until: "2026-12-21T00:00:00Z".into(),
            until_secs: 1_797_811_200,
            reason: reason.into(),
            rate: Some("600/1m".into()),
            daily_budget: None,
            connector: None,
            dataset: None,
            risk_tier: "amber".into(),
            risk_reasons: vec!["runs in prod".into()],
            change: "rate 5/1m → 600/1m until 2026-12-21T00:00:00Z".into(),
            decided_by: None,
            decided_at: None,
            decision_reason: None,
            revision: None,
        }
    }

    fn decided(mut r: Request, by: &str, at: &str, why: &str, revision: Option<&str>) -> Request {
        r.decided_by = Some(by.into());
        r.decided_at = Some(at.into());
        r.decision_reason = Some(why.into());
        r.revision = revision.map(String::from);
        r
    }

    /// The text between `<tbody>` and `</tbody>` of the table `id`.
    fn table<'a>(page: &'a str, id: &str) -> &'a str {
        let start = page.find(&format!("<table id=\"{id}\"")).unwrap_or_else(|| panic!("no table {id}"));
        let body = &page[start..];
        &body[..body.find("</table>").unwrap_or(body.len())]
    }

    #[test]
    fn what_a_builder_wrote_is_shown_as_text() {
        let evil = "<script>alert('x')</script>";
        let app = "app\"><img src=x onerror=alert(1)>";
        let all = [
            request("req-000000000001", app, "pending", evil),
            decided(
                request("req-000000000002", "pos", "rejected", "a </td> b"),
                "<b>eve</b>",
                "2026-12-02T00:00:00Z",
                evil,
                None,
            ),
        ];
        let page = render(&all, &|_| None, "");
        let html_without_script = page.replace(&format!("<script>{SCRIPT}</script>"), "");
        for (case, raw) in [("reason", evil), ("app", app), ("decided by", "<b>eve</b>"), ("cell", "a </td> b")] {
            assert!(!html_without_script.contains(raw), "{case}: `{raw}` is in the page unescaped");
        }
        assert!(html_without_script.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"), "reason as text");
        assert!(html_without_script.contains("app&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"), "app as text");
        assert!(
            html_without_script.contains("/apps/app%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"),
            "app link"
        );
        assert_eq!(page.matches("<script>").count(), 1, "only the page's own script");
    }

    #[test]
    fn pending_first_then_decided_with_revision() {
        let all = [
            request("req-00000000000a", "pos", "pending", "black friday"),
            decided(
                request("req-00000000000b", "pos", "approved", "launch"),
                "alice",
                "2026-12-03T00:00:00Z",
                "ok",
                Some("e2e-1+req.0badc0de"),
            ),
            decided(
                request("req-00000000000c", "tiny", "rejected", "more"),
                "bob",
                "2026-12-04T00:00:00Z",
                "no need",
                None,
            ),
            request("req-00000000000d", "tiny", "expired", "old"),
            request("req-00000000000e", "tiny", "pending", "a demo"),
        ];
        let risk =
            |app: &str| (app == "pos").then(|| Risk { tier: "red", reasons: vec!["holds regulated data".into()] });
        let page = render(&all, &risk, "");
        let pending = table(&page, "pending");
        assert!(pending.contains("data-request=\"req-00000000000a\"") && !pending.contains("req-00000000000b"));
        assert!(pending.contains("<span class=\"badge red\">red</span>"), "the app's risk now: {pending}");
        assert!(pending.contains("rate 5/1m → 600/1m") && pending.contains("black friday"), "{pending}");
        assert!(page.contains("<span id=\"pending-count\">2</span>"));
        let decided_rows = table(&page, "decided");
        let order: Vec<usize> = ["req-00000000000d", "req-00000000000c", "req-00000000000b"]
            .iter()
            .map(|id| decided_rows.find(&format!("<tr id=\"{id}\"")).unwrap_or_else(|| panic!("{id} missing")))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "newest decision first (an expiry at its end): {order:?}");
        assert!(decided_rows.contains("e2e-1+req.0badc0de") && decided_rows.contains("no need"), "{decided_rows}");
        assert!(decided_rows.contains("<span class=\"badge grey status\">expired</span>"));
        assert!(page.find("id=\"pending\"") < page.find("id=\"decided\""), "pending first");

        let only_tiny = render(&all, &risk, "tiny");
        assert!(!only_tiny.contains("req-00000000000a") && only_tiny.contains("req-00000000000c"), "?app= filters");
        let pending = table(&only_tiny, "pending");
        assert!(
            pending.contains("<span class=\"badge amber\">amber</span>"),
            "the tier when filed, no app now: {pending}"
        );
        assert!(only_tiny.contains("<span id=\"pending-count\">1</span>"));
    }

    #[test]
    fn the_csp_allows_exactly_the_page_script() {
        use base64ct::Encoding;
        let page = render(&[], &|_| None, "");
        let start = page.find("<script>").map(|i| i + "<script>".len()).unwrap_or_default();
        let end = page.find("</script>").unwrap_or_default();
        let digest = guardrail_core::api_key_digest(&page[start..end]);
        let want = format!("script-src 'sha256-{}'", base64ct::Base64::encode_string(&digest));
        let csp = CSP.to_str().unwrap_or_default();
        assert!(csp.contains(&want), "{csp} lacks {want}");
        for directive in ["default-src 'none'", "connect-src 'self'", "form-action 'none'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{csp} lacks {directive}");
        }
        assert!(!csp.contains("unsafe-inline'; script") && !csp.contains("script-src 'unsafe"), "{csp}");
    }
}
