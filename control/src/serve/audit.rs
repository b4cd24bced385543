//! What a policy revision changed, for the audit trail: apps added or removed, their lifecycle and
//! tier changes (and other edits), tiers, datasets, rules and exemptions added, removed or changed,
//! connectors approved or withdrawn, settings changed.
//!
//! Computed from the two documents as pushed (compact JSON), by id, off the hub's lock.

use crate::store::Change;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The changes from `before` to `after` (both policy documents as JSON). Without `before` (the
/// first revision this store sees) there are none.
pub fn changes(before: Option<&Value>, after: &Value) -> Vec<Change> {
    let Some(before) = before else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let empty = Map::new();
    let (b, a) = (before.as_object().unwrap_or(&empty), after.as_object().unwrap_or(&empty));

    apps(&by_id(b.get("apps")), &by_id(a.get("apps")), &mut out);
    for (key, kind) in [("datasets", "dataset"), ("rules", "rule"), ("exemptions", "exemption")] {
        listed(kind, &by_id(b.get(key)), &by_id(a.get(key)), &mut out);
    }
    listed("tier", &by_key(b.get("tiers")), &by_key(a.get("tiers")), &mut out);
    connectors(b.get("connectors"), a.get("connectors"), &mut out);
    listed("settings", &by_key(b.get("settings")), &by_key(a.get("settings")), &mut out);
    // Anything else at the top (a key a later policy version adds).
    let handled = [
        "apiVersion",
        "kind",
        "revision",
        "apps",
        "datasets",
        "rules",
        "exemptions",
        "tiers",
        "connectors",
        "settings",
    ];
    let top = |m: &Map<String, Value>| -> BTreeMap<String, Value> {
        m.iter().filter(|(k, _)| !handled.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    listed("policy", &top(b), &top(a), &mut out);
    out
}

fn change(kind: &str, id: &str, action: &str, from: &str, to: &str) -> Change {
    Change { kind: kind.into(), id: id.into(), action: action.into(), from: from.into(), to: to.into() }
}

/// The entries of a list of objects, by their `id`.
fn by_id(list: Option<&Value>) -> BTreeMap<String, Value> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.get("id")?.as_str()?.to_string(), v.clone())))
        .collect()
}

/// The entries of an object, by key.
fn by_key(object: Option<&Value>) -> BTreeMap<String, Value> {
    object.and_then(Value::as_object).into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Added, removed and changed entries of one kind.
fn listed(kind: &str, before: &BTreeMap<String, Value>, after: &BTreeMap<String, Value>, out: &mut Vec<Change>) {
    for (id, v) in after {
        match before.get(id) {
            None => out.push(change(kind, id, "added", "", "")),
            Some(old) if old != v => out.push(change(kind, id, "changed", "", "")),
            Some(_) => {}
        }
    }
    for id in before.keys().filter(|id| !after.contains_key(*id)) {
        out.push(change(kind, id, "removed", "", ""));
    }
}

/// Apps: lifecycle and tier changes are named with their values; other edits are `changed`.
fn apps(before: &BTreeMap<String, Value>, after: &BTreeMap<String, Value>, out: &mut Vec<Change>) {
    for (id, v) in after {
        let Some(old) = before.get(id) else {
            out.push(change("app", id, "added", "", ""));
            continue;
        };
        if old == v {
            continue;
        }
        let mut rest = (old.clone(), v.clone());
        for field in ["lifecycle", "tier"] {
            let (was, now) = (text(old.get(field)), text(v.get(field)));
            if was != now {
                out.push(change("app", id, field, &was, &now));
            }
            for side in [&mut rest.0, &mut rest.1] {
                if let Some(o) = side.as_object_mut() {
                    o.remove(field);
                }
            }
        }
        if rest.0 != rest.1 {
            out.push(change("app", id, "changed", "", ""));
        }
    }
    for id in before.keys().filter(|id| !after.contains_key(*id)) {
        out.push(change("app", id, "removed", "", ""));
    }
}

/// Approved connectors added and removed; any other edit of `connectors` (pricing) is `changed`.
fn connectors(before: Option<&Value>, after: Option<&Value>, out: &mut Vec<Change>) {
    let approved = |v: Option<&Value>| -> BTreeMap<String, Value> {
        v.and_then(|c| c.get("approved"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c.as_str()?.to_string(), Value::Null)))
            .collect()
    };
    let (b, a) = (approved(before), approved(after));
    for id in a.keys().filter(|id| !b.contains_key(*id)) {
        out.push(change("connector", id, "added", "", ""));
    }
    for id in b.keys().filter(|id| !a.contains_key(*id)) {
        out.push(change("connector", id, "removed", "", ""));
    }
    let others = |v: Option<&Value>| {
        let mut m = by_key(v);
        m.remove("approved");
        m
    };
    listed("connectors", &others(before), &others(after), out);
}

fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// One line per change, as `guardrail audit` prints them: `app pos: lifecycle approved → quarantined`.
pub fn describe(c: &Change) -> String {
    match c.action.as_str() {
        "lifecycle" | "tier" => format!(
            "{} {}: {} {} → {}",
            c.kind,
            c.id,
            c.action,
            if c.from.is_empty() { "(default)" } else { &c.from },
            if c.to.is_empty() { "(default)" } else { &c.to }
        ),
        action => format!("{} {} {action}", c.kind, c.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_what_changed() {
        let before = json!({
            "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "1",
            "settings": {"gateway_region": "eu-west-1"},
            "tiers": {"sandbox": {"daily_budget": 10}, "standard": {"daily_budget": 100}},
            "connectors": {"approved": ["crm", "erp"]},
            "apps": [
                {"id": "pos", "lifecycle": "approved", "tier": "sandbox", "owner": "a"},
                {"id": "gone", "lifecycle": "approved"},
                {"id": "same", "lifecycle": "approved"},
            ],
            "datasets": [{"id": "hr", "classification": "internal"}, {"id": "old", "classification": "public"}],
            "rules": [{"id": "r1", "effect": "deny", "when": "true"}],
        });
        let after = json!({
            "apiVersion": "guardrail/v1", "kind": "Policy", "revision": "2",
            "settings": {"gateway_region": "eu-west-2"},
            "tiers": {"sandbox": {"daily_budget": 20}, "standard": {"daily_budget": 100}},
            "connectors": {"approved": ["crm", "mail"]},
            "apps": [
                {"id": "pos", "lifecycle": "quarantined", "tier": "standard", "owner": "b"},
                {"id": "same", "lifecycle": "approved"},
                {"id": "new", "lifecycle": "draft"},
            ],
            "datasets": [{"id": "hr", "classification": "confidential"}],
            "rules": [{"id": "r1", "effect": "deny", "when": "true"}, {"id": "r2", "effect": "allow", "when": "true"}],
        });
        let got: Vec<String> = changes(Some(&before), &after).iter().map(describe).collect();
        assert_eq!(
            got,
            vec![
                "app new added",
                "app pos: lifecycle approved → quarantined",
                "app pos: tier sandbox → standard",
                "app pos changed",
                "app gone removed",
                "dataset hr changed",
                "dataset old removed",
                "rule r2 added",
                "tier sandbox changed",
                "connector mail added",
                "connector erp removed",
                "settings gateway_region changed",
            ]
        );
        assert!(changes(None, &after).is_empty(), "the first revision has nothing to compare with");
        assert!(changes(Some(&after), &after).is_empty(), "only the revision differs");
    }
}
