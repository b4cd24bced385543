#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use guardrail_core::compile::compile_json_str;

const NOW: i64 = 1_796_558_400; // 2026-12-06T12:00:00Z

fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(guardrail_core::api_key_digest(key)))
}

fn base() -> Value {
    json!({
        "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "7",
        "settings": {"max_request_duration": "30d"},
        "tiers": {"sandbox": {"rate": {"requests": 5, "per": "1m"}, "daily_budget": 100}},
        "connectors": {"approved": ["crm"]},
        "apps": [
            {"id": "lab", "owner": "priya@x", "environment": "prod", "tier": "sandbox", "lifecycle": "published",
             "region": "eu-west-1", "data_classes": ["public", "regulated"], "connectors": ["crm"],
             "api_keys": [digest("k")], "review_by": "2026-12-31"},
            {"id": "bad", "environment": "prod", "tier": "sandbox", "lifecycle": "quarantined",
             "region": "eu-west-1", "connectors": ["crm"]}
        ],
        "datasets": [
            {"id": "payroll", "classification": "regulated", "allowed_regions": ["eu-west-1"],
             "routes": [{"path_prefix": "/payroll"}], "requires_jit": false, "approval": "required"},
            {"id": "cards", "classification": "regulated", "allowed_regions": ["us-east-1"],
             "routes": [{"path_prefix": "/cards"}], "requires_jit": false, "approval": "required"},
            {"id": "open", "classification": "public", "allowed_regions": ["eu-west-1"],
             "routes": [{"path_prefix": "/open"}]}
        ]
    })
}

fn filing(kind: &str, extra: Value) -> Filing {
    let mut doc = json!({"kind": kind, "app": "lab", "until": "2026-12-20", "reason": "the winter campaign"});
    for (k, v) in extra.as_object().unwrap() {
        doc[k] = v.clone();
    }
    serde_json::from_value(doc).unwrap()
}

fn filed(f: &Filing) -> Result<Request, String> {
    let policy = compile_json_str(&base().to_string()).unwrap();
    file(&policy, f, "lab", "req-1".into(), NOW)
}

#[test]
fn each_kind_is_filed_with_what_it_changes_and_the_apps_risk() {
    let q = filed(&filing("quota", json!({"rate": "600/1m", "daily_budget": 5000}))).unwrap();
    assert_eq!(q.change, "rate 5/1m → 600/1m, daily budget 100 → 5000 until 2026-12-21T00:00:00Z");
    assert_eq!((q.status.as_str(), q.until_secs), ("pending", NOW + 14 * 86_400 + 12 * 3_600));
    assert_eq!(q.risk_tier, "red", "a regulated data class: {:?}", q.risk_reasons);
    let c = filed(&filing("connector", json!({"connector": "legacy-erp"}))).unwrap();
    assert_eq!(c.change, "app `lab` may reach connector `legacy-erp` until 2026-12-21T00:00:00Z");
    let a = filed(&filing("access", json!({"dataset": "payroll"}))).unwrap();
    assert_eq!(a.dataset.as_deref(), Some("payroll"));
    let r = filed(&filing("review", json!({"until": "2027-01-04"}))).unwrap();
    assert_eq!(r.change, "app `lab`'s review_by 2026-12-31 → 2027-01-04");
}

#[test]
fn bad_filings_are_refused_naming_what_is_wrong() {
    let cases: &[(&str, Value, &str)] = &[
        ("quota", json!({}), "needs rate"),
        ("quota", json!({"rate": "5/1m"}), "already has 5/1m"),
        ("quota", json!({"rate": "1/1s"}), ""), // 60/1m: more
        ("quota", json!({"rate": "fast"}), "rate fast"),
        ("quota", json!({"daily_budget": 100}), "already has 100"),
        ("quota", json!({"rate": "600/1m", "connector": "crm"}), "connector: not part of a quota request"),
        ("connector", json!({"connector": "crm"}), "may reach it already"),
        ("connector", json!({}), "needs connector"),
        ("access", json!({"dataset": "open"}), "not marked approval: required"),
        ("access", json!({"dataset": "cards"}), "the filter would refuse app `lab` whatever an approver says"),
        ("access", json!({"dataset": "nope"}), "dataset `nope`: not in the policy"),
        ("review", json!({"until": "2026-12-30"}), "no earlier"),
        ("quota", json!({"rate": "600/1m", "until": "2026-12-05"}), "in the past"),
        ("quota", json!({"rate": "600/1m", "until": "2027-02-01"}), "beyond the policy's maximum of 30 days"),
        ("quota", json!({"rate": "600/1m", "until": "soon"}), "until `soon`"),
        ("quota", json!({"rate": "600/1m", "reason": "  "}), "reason: say why"),
        ("quota", json!({"rate": "600/1m", "app": "other"}), "an app files its own requests"),
        ("holiday", json!({}), "kind `holiday`"),
    ];
    for (kind, extra, want) in cases {
        let got = filed(&filing(kind, extra.clone()));
        match (want.is_empty(), got) {
            (true, Ok(_)) => {}
            (true, Err(e)) => panic!("{kind} {extra}: refused: {e}"),
            (false, Ok(r)) => panic!("{kind} {extra}: filed: {r:?}"),
            (false, Err(e)) => assert!(e.contains(want), "{kind} {extra}: {e:?} does not say {want:?}"),
        }
    }
    let policy = compile_json_str(&base().to_string()).unwrap();
    let mut f = filing("quota", json!({"rate": "600/1m"}));
    f.app = "bad".into();
    let e = file(&policy, &f, "bad", "req-2".into(), NOW).unwrap_err();
    assert!(e.contains("quarantined"), "{e}");
}

#[test]
fn approved_requests_become_an_overlay_that_compiles_and_a_label_of_their_own() {
    let mut q = filed(&filing("quota", json!({"rate": "600/1m"}))).unwrap();
    q.status = "approved".into();
    let mut c = filed(&filing("connector", json!({"connector": "legacy-erp"}))).unwrap();
    (c.id, c.status) = ("req-2".into(), "approved".into());
    let mut a = filed(&filing("access", json!({"dataset": "payroll"}))).unwrap();
    (a.id, a.status) = ("req-3".into(), "approved".into());
    let mut r = filed(&filing("review", json!({"until": "2027-01-04"}))).unwrap();
    (r.id, r.status) = ("req-4".into(), "approved".into());
    let (doc, skipped) = apply(&base(), &[q.clone(), c, a, r]);
    assert!(skipped.is_empty());
    let label = doc["revision"].as_str().unwrap();
    assert!(label.starts_with("7+req.") && label.len() == "7+req.".len() + 8, "{label}");
    let policy = compile_json_str(&doc.to_string()).unwrap();
    let lab = policy.app("lab").unwrap();
    assert_eq!(policy.limits(lab, NOW).unwrap().rate.requests, 600, "the approved rate is in force");
    assert_eq!(policy.limits(lab, q.until_secs).unwrap().rate.requests, 5, "and ends at its until");
    assert!(guardrail_core::decide::check_connector(&policy, lab, "legacy-erp", NOW).is_ok());
    assert!(lab.access_grant("payroll", NOW).is_some());
    assert_eq!(lab.review_by.as_deref(), Some("2027-01-04"));
    // The same set gives the same label; none gives the file as it is.
    assert_eq!(apply(&base(), &[q.clone()]).0["revision"], apply(&base(), &[q.clone()]).0["revision"]);
    assert_eq!(apply(&base(), &[]).0, base());
    // A request for an app the file no longer has is left out, named.
    let mut gone = q;
    gone.app = "gone".into();
    let (doc, skipped) = apply(&base(), &[gone]);
    assert_eq!(skipped, ["req-1"]);
    assert!(compile_json_str(&doc.to_string()).is_ok());
}
