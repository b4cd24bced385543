//! Guardrail proxy-wasm filter (placeholder while the spine lands).
