//! Path normalisation and dataset lookup. Input: `host\npath` (or only a path). Invariants of an
//! accepted path: it starts with `/`, has no empty, `.` or `..` segment, and normalising it again
//! gives it back unchanged (so no spelling is classified differently by a second decoding).
#![no_main]

use guardrail_core::path::{normalize_host, normalize_path, DatasetIndex};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn index() -> &'static DatasetIndex {
    static INDEX: OnceLock<DatasetIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut ix = DatasetIndex::default();
        ix.insert(None, "/customers", &[], 0);
        ix.insert(None, "/api", &["GET".into()], 1);
        ix.insert(None, "/api/orders", &[], 2);
        ix.insert(Some("api.example"), "/customers", &[], 3);
        ix.insert(None, "/", &["DELETE".into()], 4);
        ix
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (host, raw) = text.split_once('\n').unwrap_or(("api.example", text));
    let host_key = normalize_host(host);
    assert!(!host_key.ends_with('.'), "host {host:?} normalised to {host_key:?}");
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'), "{raw:?} normalised to {path:?}: not absolute");
    assert!(!path.contains("//"), "{raw:?} normalised to {path:?}: empty segment");
    assert!(
        path == "/" || path.split('/').skip(1).all(|s| !s.is_empty() && s != "." && s != ".."),
        "{raw:?} normalised to {path:?}: dot or empty segment"
    );
    assert!(!path.contains(['?', '#', '\\']), "{raw:?} normalised to {path:?}");
    assert_eq!(normalize_path(&path).as_deref(), Ok(path.as_str()), "not idempotent: {raw:?} -> {path:?}");
    for method in ["GET", "DELETE", "post"] {
        let found = index().lookup(host, method, &path);
        assert!(found.is_none_or(|ds| ds <= 4), "unknown dataset {found:?}");
    }
});
