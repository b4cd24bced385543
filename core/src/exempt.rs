//! Exemptions: callers that pass without an app credential (health checks, the mesh's own
//! services), by route and/or by the SPIFFE id of the mTLS peer as Envoy reports it. An exempt
//! request takes no quota and carries no app; an exemption can never reach a `confidential` or
//! `regulated` dataset (`check` refuses one that could, and `decide()` does not exempt a request
//! that does).

use crate::compile::{Dataset, Route};
use crate::error::Errors;
use crate::path::{path_prefix_problem, route_covers, route_host_problem, segments_within};
use crate::raw::{Classification, RawExemption};
use std::collections::HashSet;

/// The longest SPIFFE id accepted (the SPIFFE standard's limit).
const MAX_SPIFFE_ID_LEN: usize = 2048;

#[derive(Debug, Clone)]
pub struct Exemption {
    pub id: String,
    /// Empty: every route (then `peers` is not).
    pub routes: Vec<Route>,
    /// Empty: any caller, with or without a certificate.
    pub peers: Vec<PeerPattern>,
    pub reason: Option<String>,
}

/// A SPIFFE id, or a prefix of one (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPattern {
    Exact(String),
    Prefix(String),
}

impl PeerPattern {
    pub fn matches(&self, peer: &str) -> bool {
        match self {
            PeerPattern::Exact(id) => peer == id,
            PeerPattern::Prefix(prefix) => peer.starts_with(prefix.as_str()),
        }
    }
}

impl Exemption {
    /// Whether a request (normalised path) from `peer` (the mTLS peer's URI SAN as Envoy reports
    /// it, if any) is exempt by this exemption. A peer that is not a valid SPIFFE id matches none.
    pub fn covers(&self, host: &str, method: &str, path: &str, peer: Option<&str>) -> bool {
        let by_route = self.routes.is_empty()
            || self
                .routes
                .iter()
                .any(|r| route_covers(r.host.as_deref(), &r.path_prefix, &r.methods, host, method, path));
        if !by_route {
            return false;
        }
        if self.peers.is_empty() {
            return true;
        }
        match peer {
            Some(id) if spiffe_id_problem(id).is_none() => self.peers.iter().any(|p| p.matches(id)),
            _ => false,
        }
    }
}

/// Why `id` is not a SPIFFE id (`spiffe://<trust domain>/<path>`), if it is not: the trust
/// domain is lower-case letters, digits, `.`, `-`, `_`; each path segment letters, digits, `.`,
/// `-`, `_`, neither empty nor `.` or `..`. What Envoy reports is checked the same way, so a
/// certificate whose URI SAN carries a comma, a newline or a `..` never matches a pattern.
pub fn spiffe_id_problem(id: &str) -> Option<&'static str> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Some("longer than 2048 bytes");
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Some("must start with `spiffe://`");
    };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain.is_empty()
        || !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Some("the trust domain must be lower-case letters, digits, `.`, `-` or `_`");
    }
    if path.is_empty() {
        return None;
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Some("a path segment is empty, `.` or `..`");
        }
        if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
            return Some("a path segment may only hold letters, digits, `.`, `-` and `_`");
        }
    }
    None
}

/// Validates `exemptions[]` against the compiled datasets: every error names the field.
pub(crate) fn compile_exemptions(raw: &[RawExemption], datasets: &[Dataset], errs: &mut Errors) -> Vec<Exemption> {
    let mut out = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    for (i, e) in raw.iter().enumerate() {
        let path = format!("exemptions[{i}]");
        let before = errs.0.len();
        if !crate::compile::valid_id(&e.id) {
            errs.push(format!("{path}.id"), format!("invalid exemption id `{}`", e.id));
        } else if !seen.insert(e.id.as_str()) {
            errs.push(format!("{path}.id"), format!("duplicate exemption id `{}`", e.id));
        }
        if e.routes.is_empty() && e.peers.is_empty() {
            errs.push(path.clone(), "an exemption needs `routes`, `peers` or both (it would exempt every request)");
        }
        let mut routes = Vec::with_capacity(e.routes.len());
        for (r, route) in e.routes.iter().enumerate() {
            let rpath = format!("{path}.routes[{r}]");
            if let Some(problem) = path_prefix_problem(&route.path_prefix) {
                errs.push(format!("{rpath}.path_prefix"), problem);
            }
            if let Some(problem) = route.host.as_deref().and_then(route_host_problem) {
                errs.push(format!("{rpath}.host"), problem);
            }
            let mut methods = Vec::with_capacity(route.methods.len());
            for (m, method) in route.methods.iter().enumerate() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    errs.push(format!("{rpath}.methods[{m}]"), format!("`{method}` is not an HTTP method"));
                }
                methods.push(method.to_ascii_uppercase());
            }
            let prefix = route.path_prefix.trim_end_matches('/');
            routes.push(Route {
                host: route.host.as_ref().map(|h| crate::path::normalize_host(h).into_owned()),
                path_prefix: if prefix.is_empty() { "/".to_string() } else { prefix.to_string() },
                methods,
            });
        }
        let mut peers = Vec::with_capacity(e.peers.len());
        for (p, peer) in e.peers.iter().enumerate() {
            let (id, pattern) = match peer.strip_suffix('*') {
                Some(prefix) => (prefix, PeerPattern::Prefix(prefix.to_string())),
                None => (peer.as_str(), PeerPattern::Exact(peer.clone())),
            };
            // A prefix may end within a segment or with `/`: what is before the `*` must be a
            // SPIFFE id or one followed by `/`.
            let checked = id.strip_suffix('/').filter(|_| matches!(pattern, PeerPattern::Prefix(_))).unwrap_or(id);
            if let Some(problem) = spiffe_id_problem(checked) {
                errs.push(
                    format!("{path}.peers[{p}]"),
                    format!(
                        "`{peer}` is not a SPIFFE id ({problem}); write `spiffe://<trust domain>/<path>`, \
                         with a trailing `*` for a prefix"
                    ),
                );
            }
            peers.push(pattern);
        }
        if errs.0.len() != before {
            continue;
        }
        let exemption = Exemption { id: e.id.clone(), routes, peers, reason: e.reason.clone() };
        if let Some((ds, route)) = sensitive_reach(&exemption, datasets) {
            let how = match route {
                Some(r) => format!("its route `{}` overlaps a route of dataset `{}`", describe(r), ds.id),
                None => format!("it has no routes, so it covers dataset `{}` too", ds.id),
            };
            errs.push(
                path,
                format!(
                    "exemption `{}` would reach {} dataset `{}`: {how}; exemptions may only cover public or internal \
                     data (narrow its routes)",
                    exemption.id,
                    ds.classification.as_str(),
                    ds.id
                ),
            );
            continue;
        }
        out.push(exemption);
    }
    out
}

fn describe(r: &Route) -> String {
    let host = r.host.clone().unwrap_or_default();
    let methods = if r.methods.is_empty() { String::new() } else { format!(" {}", r.methods.join(",")) };
    format!("{host}{}{methods}", r.path_prefix)
}

fn is_sensitive(class: Classification) -> bool {
    matches!(class, Classification::Confidential | Classification::Regulated)
}

/// The first `confidential`/`regulated` dataset an exemption reaches, with the exemption's route
/// that does (none: the exemption has no routes).
fn sensitive_reach<'e, 'd>(e: &'e Exemption, datasets: &'d [Dataset]) -> Option<(&'d Dataset, Option<&'e Route>)> {
    let sensitive = datasets.iter().filter(|d| is_sensitive(d.classification));
    if e.routes.is_empty() {
        return sensitive.into_iter().next().map(|d| (d, None));
    }
    for ds in sensitive {
        for route in &e.routes {
            if ds.routes.iter().any(|dr| routes_overlap(route, dr)) {
                return Some((ds, Some(route)));
            }
        }
    }
    None
}

/// Whether some request matches both routes: hosts compatible, a method in common, and one
/// prefix within the other (whole segments, case-insensitively).
pub fn routes_overlap(a: &Route, b: &Route) -> bool {
    let hosts = match (&a.host, &b.host) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    let methods = a.methods.is_empty() || b.methods.is_empty() || a.methods.iter().any(|m| b.methods.contains(m));
    hosts
        && methods
        && (segments_within(&a.path_prefix, &b.path_prefix) || segments_within(&b.path_prefix, &a.path_prefix))
}

/// Whether route `wide` covers more than route `narrow` starting inside it: `wide`'s prefix
/// strictly contains `narrow`'s (for the linter: an exemption wider than a dataset's routes).
pub fn strictly_wider(wide: &Route, narrow: &Route) -> bool {
    routes_overlap(wide, narrow)
        && segments_within(&wide.path_prefix, &narrow.path_prefix)
        && !segments_within(&narrow.path_prefix, &wide.path_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let cases: &[(&str, bool, &str)] = &[
            ("spiffe://cluster.local/ns/monitoring/sa/prometheus", true, "an Istio workload id"),
            ("spiffe://cluster.local", true, "a trust domain alone"),
            ("spiffe://Cluster.local/ns/a", false, "upper-case trust domain"),
            ("spiffe://cluster.local/ns/../admin", false, "dot-dot segment"),
            ("spiffe://cluster.local/ns//a", false, "empty segment"),
            ("spiffe://cluster.local/ns/a\r\nx-injected: 1", false, "a header injected into the SAN"),
            ("spiffe://cluster.local/ns/a,spiffe://cluster.local/ns/b", false, "two ids joined by a comma"),
            ("http://cluster.local/ns/a", false, "another scheme"),
            ("spiffe:///ns/a", false, "no trust domain"),
            ("spiffe://cluster.local/ns/a/", false, "trailing slash"),
        ];
        for (id, ok, why) in cases {
            assert_eq!(spiffe_id_problem(id).is_none(), *ok, "{why}: {id}");
        }
        assert!(spiffe_id_problem(&format!("spiffe://td/{}", "a".repeat(2100))).is_some(), "too long");
    }

    #[test]
    fn peer_patterns() {
        let prefix = PeerPattern::Prefix("spiffe://cluster.local/ns/monitoring/".into());
        assert!(prefix.matches("spiffe://cluster.local/ns/monitoring/sa/prometheus"));
        assert!(!prefix.matches("spiffe://cluster.local/ns/monitoring-evil/sa/x"));
        let exact = PeerPattern::Exact("spiffe://cluster.local/ns/a/sa/b".into());
        assert!(exact.matches("spiffe://cluster.local/ns/a/sa/b"));
        assert!(!exact.matches("spiffe://cluster.local/ns/a/sa/bc"));
    }

    fn route(host: Option<&str>, prefix: &str, methods: &[&str]) -> Route {
        Route {
            host: host.map(str::to_string),
            path_prefix: prefix.to_string(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn overlap() {
        let cases = [
            (route(None, "/", &[]), route(None, "/payments", &[]), true, "the root covers everything"),
            (route(None, "/health", &[]), route(None, "/payments", &[]), false, "siblings"),
            (route(None, "/payments/status", &[]), route(None, "/payments", &[]), true, "inside the dataset"),
            (route(None, "/Payments", &["GET"]), route(None, "/payments", &["GET", "POST"]), true, "case and methods"),
            (route(None, "/payments", &["GET"]), route(None, "/payments", &["POST"]), false, "no method in common"),
            (route(Some("a.example"), "/p", &[]), route(Some("b.example"), "/p", &[]), false, "other host"),
            (route(Some("a.example"), "/p", &[]), route(None, "/p", &[]), true, "any host"),
            (route(None, "/pay", &[]), route(None, "/payments", &[]), false, "whole segments only"),
        ];
        for (a, b, want, why) in cases {
            assert_eq!(routes_overlap(&a, &b), want, "{why}");
            assert_eq!(routes_overlap(&b, &a), want, "{why} (swapped)");
        }
        assert!(strictly_wider(&route(None, "/", &[]), &route(None, "/catalog", &[])));
        assert!(!strictly_wider(&route(None, "/catalog", &[]), &route(None, "/catalog", &[])));
        assert!(!strictly_wider(&route(None, "/catalog/x", &[]), &route(None, "/catalog", &[])));
    }
}
