//! Attribute-based rules in CEL (the `cel` crate): compiled once per policy, evaluated per request
//! over `app`, `dataset`, `request` {method, host, path, headers} and `token` {claims}.
//!
//! Bounds keep any policy from making a request slow: an expression is at most
//! [`MAX_EXPRESSION_LEN`] bytes and [`MAX_NESTING`] brackets deep (the parser recurses), and it may
//! only name the four variables above (checked at compile time, so a typo is a policy error).

use crate::compile::{App, Dataset};
use crate::jwt::VerifiedToken;
use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value};
use std::collections::HashMap;
use std::sync::Arc;

pub const MAX_EXPRESSION_LEN: usize = 2048;
pub const MAX_NESTING: usize = 24;
pub const VARIABLES: [&str; 4] = ["app", "dataset", "request", "token"];

/// The CEL environment shared by every rule of a policy.
pub struct Cel {
    env: Arc<Env>,
}

impl std::fmt::Debug for Cel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cel")
    }
}

impl Default for Cel {
    fn default() -> Self {
        Cel { env: Arc::new(Env::stdlib()) }
    }
}

/// A compiled `when` expression.
pub struct Expression {
    program: Program,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Expression")
    }
}

impl Cel {
    /// Compiles an expression, refusing syntax errors, unknown variables and oversized input.
    pub fn compile(&self, source: &str) -> Result<Expression, String> {
        if source.len() > MAX_EXPRESSION_LEN {
            return Err(format!("expression is {} bytes; at most {MAX_EXPRESSION_LEN} are allowed", source.len()));
        }
        let mut depth = 0usize;
        let mut deepest = 0usize;
        for b in source.bytes() {
            match b {
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if deepest > MAX_NESTING {
            return Err(format!("expression nests {deepest} brackets deep; at most {MAX_NESTING} are allowed"));
        }
        let program = self.env.compile(source).map_err(|e| format!("CEL syntax error: {}", e.to_string().trim()))?;
        let references = program.references();
        let mut unknown: Vec<&str> = references.variables().into_iter().filter(|v| !VARIABLES.contains(v)).collect();
        unknown.sort_unstable();
        unknown.dedup();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable{} `{}` (available: app, dataset, request, token)",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join("`, `")
            ));
        }
        Ok(Expression { program })
    }

    /// Evaluates `expr` to a boolean; any other result or an error is an `Err` (the caller denies).
    pub fn eval(&self, expr: &Expression, vars: &Vars) -> Result<bool, String> {
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        ctx.add_variable_from_value("app", vars.app.clone());
        ctx.add_variable_from_value("dataset", vars.dataset.clone());
        ctx.add_variable_from_value("request", vars.request.clone());
        ctx.add_variable_from_value("token", vars.token.clone());
        match expr.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("expression gave {:?}, not a boolean", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The variables of one evaluation. App and dataset values are built once per policy.
pub struct Vars {
    pub app: Value,
    pub dataset: Value,
    pub request: Value,
    pub token: Value,
}

fn string(s: &str) -> Value {
    Value::String(Arc::new(s.to_string()))
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m: HashMap<Key, Value> = HashMap::with_capacity(entries.len());
    for (k, v) in entries {
        m.insert(Key::String(Arc::new(k.to_string())), v);
    }
    Value::Map(Map { map: Arc::new(m) })
}

fn opt(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Null, string)
}

fn list(items: impl Iterator<Item = Value>) -> Value {
    Value::List(Arc::new(items.collect()))
}

/// `app`: id, owner, team, department, environment, tier, lifecycle, region, data_classes, connectors.
pub fn app_value(app: &App, tier: &str) -> Value {
    map(vec![
        ("id", string(&app.id)),
        ("owner", opt(&app.owner)),
        ("team", opt(&app.team)),
        ("department", opt(&app.department)),
        ("environment", string(&format!("{:?}", app.environment).to_lowercase())),
        ("tier", string(tier)),
        ("lifecycle", string(&format!("{:?}", app.lifecycle).to_lowercase())),
        ("region", string(&app.region)),
        ("data_classes", list(app.data_classes.iter().map(|c| string(c.as_str())))),
        ("connectors", list(app.connectors.iter().map(|c| string(c)))),
    ])
}

/// `dataset`: id, classification, owner_department, allowed_regions, requires_jit.
pub fn dataset_value(d: &Dataset) -> Value {
    map(vec![
        ("id", string(&d.id)),
        ("classification", string(d.classification.as_str())),
        ("owner_department", opt(&d.owner_department)),
        ("allowed_regions", list(d.allowed_regions.iter().map(|r| string(r)))),
        ("requires_jit", Value::Bool(d.requires_jit)),
    ])
}

/// `request`: method, host, path (normalised), headers (lower-case names; repeated values joined by `,`).
pub fn request_value(method: &str, host: &str, path: &str, headers: &[(String, String)]) -> Value {
    let mut h: HashMap<Key, Value> = HashMap::with_capacity(headers.len());
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        let key = Key::String(Arc::new(k.to_ascii_lowercase()));
        let joined = match h.get(&key) {
            Some(Value::String(prev)) => format!("{prev},{v}"),
            _ => v.clone(),
        };
        h.insert(key, Value::String(Arc::new(joined)));
    }
    map(vec![
        ("method", string(method)),
        ("host", string(host)),
        ("path", string(path)),
        ("headers", Value::Map(Map { map: Arc::new(h) })),
    ])
}

/// `token`: {claims} of the verified bearer token, or null when the request had none.
pub fn token_value(token: Option<&VerifiedToken>) -> Value {
    match token {
        Some(t) => map(vec![("claims", json_object(&t.claims, 0))]),
        None => Value::Null,
    }
}

fn json_object(m: &serde_json::Map<String, serde_json::Value>, depth: usize) -> Value {
    let mut out: HashMap<Key, Value> = HashMap::with_capacity(m.len());
    for (k, v) in m {
        out.insert(Key::String(Arc::new(k.clone())), json(v, depth + 1));
    }
    Value::Map(Map { map: Arc::new(out) })
}

fn json(v: &serde_json::Value, depth: usize) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            n.as_i64().map(Value::Int).or_else(|| n.as_f64().map(Value::Float)).unwrap_or(Value::Null)
        }
        serde_json::Value::String(s) => string(s),
        serde_json::Value::Array(a) => list(a.iter().map(|x| json(x, depth + 1))),
        serde_json::Value::Object(o) => json_object(o, depth),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_table() {
        let cel = Cel::default();
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("app.tier == 'sandbox'", None, "valid"),
            ("request.method in ['GET', 'HEAD'] && dataset != null", None, "valid with list"),
            ("has(token.claims.scope)", None, "has macro"),
            ("app.tier == ", Some("syntax"), "syntax error"),
            ("user.id == 'x'", Some("unknown variable `user`"), "unknown variable"),
            ("apps.id == 'x' || reqest.path == '/'", Some("unknown variables `apps`, `reqest`"), "two unknown"),
            (&"(".repeat(40), Some("nests"), "too deep"),
        ];
        for (src, want_err, why) in cases {
            match (cel.compile(src), want_err) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => {
                    assert!(e.contains(w), "{why}: error `{e}` should mention `{w}`")
                }
                (Ok(_), Some(w)) => panic!("{why}: expected error mentioning `{w}`"),
                (Err(e), None) => panic!("{why}: unexpected error {e}"),
            }
        }
        let long = format!("app.id == '{}'", "x".repeat(MAX_EXPRESSION_LEN));
        assert!(cel.compile(&long).is_err(), "oversized expression refused");
    }

    #[test]
    fn eval_table() {
        let cel = Cel::default();
        let headers = vec![("x-team".to_string(), "crm".to_string()), (":path".to_string(), "/p".to_string())];
        let vars = Vars {
            app: map(vec![("id", string("pos")), ("tier", string("standard"))]),
            dataset: Value::Null,
            request: request_value("GET", "api.example", "/customers/7", &headers),
            token: Value::Null,
        };
        let cases: &[(&str, Result<bool, ()>, &str)] = &[
            ("app.tier == 'standard'", Ok(true), "string equality"),
            ("request.path.startsWith('/customers')", Ok(true), "startsWith"),
            ("request.headers['x-team'] == 'crm'", Ok(true), "header lookup"),
            ("dataset == null", Ok(true), "null dataset"),
            ("token == null", Ok(true), "no token"),
            ("request.method == 'POST'", Ok(false), "false"),
            ("request.headers['missing'] == 'x'", Err(()), "missing key is an evaluation error"),
            ("token.claims.sub == 'x'", Err(()), "field of null is an error"),
            ("app.id", Err(()), "non-boolean result"),
        ];
        for (src, want, why) in cases {
            let expr = cel.compile(src).unwrap_or_else(|e| panic!("{why}: compile: {e}"));
            assert_eq!(cel.eval(&expr, &vars).map_err(|_| ()), *want, "{why}: {src}");
        }
    }
}
