//! `guardrail audit`: the policy revisions a companion (and every companion sharing its store)
//! served, newest first, each with what it changed.

use crate::log::rfc3339_secs;
use crate::pb::policy_service_client::PolicyServiceClient;
use crate::serve::audit::describe;
use crate::status::{connect, print, Remote};
use anyhow::Context;
use guardrail_proto::v1;
use serde_json::json;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: Remote,
    /// The newest N revisions only.
    #[arg(long)]
    limit: Option<u32>,
    /// Print the trail as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let (url, tls) = args.remote.target()?;
    let request = v1::AuditRequest { limit: args.limit.unwrap_or(0) };
    let fetched = runtime.block_on(async {
        let channel = connect(&url, tls).await?;
        PolicyServiceClient::new(channel)
            .audit(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{} ({:?})", s.message(), s.code()))
    });
    let audit = match fetched {
        Ok(audit) => audit,
        Err(why) => {
            eprintln!("error: cannot get the audit trail from the companion at {url}: {why}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print(args.json, || to_json(&audit), || render(&audit))?;
    Ok(ExitCode::SUCCESS)
}

fn change(c: &v1::PolicyChange) -> crate::store::Change {
    crate::store::Change {
        kind: c.kind.clone(),
        id: c.id.clone(),
        action: c.action.clone(),
        from: c.from.clone(),
        to: c.to.clone(),
    }
}

pub fn to_json(a: &v1::AuditResponse) -> serde_json::Value {
    json!({
        "store": a.store.as_ref().map(|s| json!({"url": s.url, "available": s.available, "error": s.error})),
        "revisions": a.revisions.iter().map(|r| json!({
            "revision": r.revision,
            "content_sha256": r.content_sha256,
            "first_served_unix": r.first_served_unix,
            "first_served": rfc3339_secs(r.first_served_unix),
            "source": r.source,
            "companion": r.companion,
            "changes": r.changes.iter().map(|c| json!({
                "kind": c.kind, "id": c.id, "action": c.action, "from": c.from, "to": c.to,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "events": a.events.iter().map(|e| json!({
            "at_unix": e.at_unix, "at": rfc3339_secs(e.at_unix), "kind": e.kind, "id": e.id, "app": e.app,
            "actor": e.actor, "detail": e.detail, "companion": e.companion,
        })).collect::<Vec<_>>(),
    })
}

/// One paragraph per revision, newest first.
pub fn render(a: &v1::AuditResponse) -> String {
    let mut out = String::new();
    if a.revisions.is_empty() {
        out.push_str("no revision served yet\n");
    }
    for r in &a.revisions {
        let short = r.content_sha256.get(..12).unwrap_or(&r.content_sha256);
        out.push_str(&format!(
            "revision {}  {}  sha256:{short}  from {}  by {}\n",
            r.revision,
            rfc3339_secs(r.first_served_unix),
            r.source,
            if r.companion.is_empty() { "-" } else { &r.companion }
        ));
        if r.changes.is_empty() {
            out.push_str("  (first revision in the trail, or nothing but the revision changed)\n");
        }
        for c in &r.changes {
            out.push_str(&format!("  {}\n", describe(&change(c))));
        }
    }
    if !a.events.is_empty() {
        out.push_str("\nself-service (newest first)\n");
    }
    for e in &a.events {
        out.push_str(&format!(
            "{}  {:<16} {}  app {}  by {}  {}\n",
            rfc3339_secs(e.at_unix),
            e.kind,
            e.id,
            e.app,
            e.actor,
            e.detail
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_revisions_and_changes() {
        let a = v1::AuditResponse {
            revisions: vec![
                v1::AuditEntry {
                    revision: "2".into(),
                    content_sha256: "0a1b2c3d4e5f60718293a4b5".into(),
                    first_served_unix: 1_796_000_000,
                    source: "/etc/guardrail/policy.yaml".into(),
                    companion: "cp-0:18000".into(),
                    changes: vec![v1::PolicyChange {
                        kind: "app".into(),
                        id: "pos".into(),
                        action: "lifecycle".into(),
                        from: "approved".into(),
                        to: "quarantined".into(),
                    }],
                },
                v1::AuditEntry { revision: "1".into(), ..Default::default() },
            ],
            store: None,
            events: vec![v1::AuditEvent {
                at_unix: 1_796_000_100,
                kind: "token".into(),
                id: "q1w2e3r4t5y6u7i8".into(),
                app: "pos".into(),
                actor: "pos".into(),
                detail: "scope dataset:payments, expires 2026-11-30T01:00:00Z".into(),
                companion: "cp-0:18000".into(),
            }],
        };
        let text = render(&a);
        assert!(
            text.ends_with(
                "self-service (newest first)\n2026-11-30T00:55:00Z  token            q1w2e3r4t5y6u7i8  app pos  by pos  scope dataset:payments, expires 2026-11-30T01:00:00Z\n"
            ),
            "{text}"
        );
        assert!(
            text.starts_with(
                "revision 2  2026-11-30T00:53:20Z  sha256:0a1b2c3d4e5f  from /etc/guardrail/policy.yaml  by cp-0:18000\n  app pos: lifecycle approved → quarantined\n"
            ),
            "{text}"
        );
        assert!(text.contains("revision 1 "), "{text}");
        let v = to_json(&a);
        assert_eq!(v["revisions"][0]["changes"][0]["to"], "quarantined");
        assert_eq!(v["revisions"][0]["first_served"], "2026-11-30T00:53:20Z");
        assert_eq!(v["events"][0]["id"], "q1w2e3r4t5y6u7i8");
    }
}
