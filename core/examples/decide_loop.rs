//! `decide()` in a loop over a policy and a request list from files, for profiling it inside a
//! wasm runtime (bench/profile-wasm.sh runs it in Node's V8, the engine Envoy embeds):
//!
//! ```sh
//! decide_loop POLICY.json REQUESTS.tsv ITERATIONS
//! ```
//!
//! REQUESTS.tsv: one request per line, `path<TAB>header-name<TAB>header-value` (as bench.py writes
//! them). Prints the mean nanoseconds per decision and how many were admitted.

use guardrail_core::compile::compile_json_str;
use guardrail_core::decide::{decide, Request};
use guardrail_core::jwt::TokenCache;
use guardrail_core::quota::{ensure_keys, MemoryStore};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, policy, requests, iterations] = args.as_slice() else {
        return Err("usage: decide_loop POLICY.json REQUESTS.tsv ITERATIONS".into());
    };
    let text = std::fs::read_to_string(policy).map_err(|e| format!("{policy}: {e}"))?;
    let started = Instant::now();
    let policy = compile_json_str(&text).map_err(|e| format!("{policy}: {e}"))?;
    println!("compile: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    let iterations: usize = iterations.parse().map_err(|e| format!("ITERATIONS: {e}"))?;
    let host = "api.bench.example";
    let requests: Vec<Vec<(String, String)>> = std::fs::read_to_string(requests)
        .map_err(|e| format!("{requests}: {e}"))?
        .lines()
        .filter_map(|line| {
            let mut cols = line.splitn(3, '\t');
            let (path, name, value) = (cols.next()?, cols.next()?, cols.next()?);
            Some(vec![
                (":method".to_string(), "GET".to_string()),
                (":authority".to_string(), host.to_string()),
                (":path".to_string(), path.to_string()),
                (":scheme".to_string(), "http".to_string()),
                ("user-agent".to_string(), "wrk".to_string()),
                (name.to_string(), value.to_string()),
                ("x-request-id".to_string(), "00000000-0000-4000-8000-000000000000".to_string()),
            ])
        })
        .collect();
    let mut store = MemoryStore::default();
    ensure_keys(&mut store, policy.apps.iter().map(|a| a.quota_key.as_str())).map_err(|e| e.to_string())?;
    let mut tokens = TokenCache::new(4096);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    let now_ns = u64::try_from(now.as_nanos()).map_err(|e| e.to_string())?;
    let mut admitted = 0usize;
    let started = Instant::now();
    for i in 0..iterations {
        let Some(headers) = requests.get(i % requests.len().max(1)) else { break };
        let value = |name: &str| headers.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str());
        let request = Request {
            method: value(":method"),
            host: value(":authority"),
            path: value(":path"),
            connector: Some("upstream"),
            request_id: value("x-request-id"),
            headers,
            gateway_region: None,
            fleet: None,
            peer: None,
        };
        let decision = decide(&policy, &request, now_ns + i as u64 * 1000, &mut store, &mut tokens);
        admitted += usize::from(decision.denial.is_none());
    }
    let elapsed = started.elapsed();
    println!(
        "{iterations} decisions: {:.2} µs each, {admitted} admitted",
        elapsed.as_secs_f64() * 1e6 / iterations.max(1) as f64
    );
    Ok(())
}
