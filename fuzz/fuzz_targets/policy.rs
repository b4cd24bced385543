//! Policy documents: arbitrary bytes as JSON (what the filter reads from its plugin configuration
//! and from the companion's snapshots) and as YAML (what `guardrail check`/`serve` read). Either
//! a compiled policy or errors naming fields, never a panic. A policy that compiles then judges
//! a few fixed requests, so the indexes it built are exercised too.
#![no_main]

use guardrail_core::compile::compile_json_str;
use guardrail_core::decide::{decide, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::quota::{ensure_keys, MemoryStore};
use libfuzzer_sys::fuzz_target;

const NOW_NS: u64 = 1_795_924_800 * 1_000_000_000; // 2026-11-29T04:00:00Z

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = compile_json_str(text) {
        judge(&policy);
    }
    match guardrail_core::source::load_str(text) {
        Ok(policy) => judge(&policy),
        Err(errors) => assert!(!errors.0.is_empty(), "an Err must hold at least one error"),
    }
});

fn judge(policy: &guardrail_core::compile::CompiledPolicy) {
    let mut store = MemoryStore::default();
    let _ = ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str()));
    let mut tokens = TokenCache::new(16);
    let headers: Vec<(String, String)> = match policy.apps.first() {
        Some(_) => vec![("x-api-key".into(), "k".into()), ("x-team".into(), "crm".into())],
        None => Vec::new(),
    };
    for (method, host, path) in [("GET", "api.example", "/customers/7"), ("DELETE", "x", "/"), ("get", "", "/a/../b")] {
        let request = Request {
            method,
            host,
            path,
            connector: Some("upstream"),
            request_id: "fuzz",
            headers: &headers,
            gateway_region: None,
            fleet: None,
            peer: None,
        };
        let _ = decide(policy, &request, NOW_NS, &mut store, &mut tokens);
    }
    // Every app is reachable by id, as decide_as (explain/test) needs.
    for app in &policy.apps {
        assert!(policy.app(&app.id).is_some(), "app `{}` not indexed", app.id);
    }
}
