//! Attribute-based rules in CEL (the `cel` crate): compiled once per policy, evaluated per request
//! over `app`, `dataset`, `request` {method, host, path, headers} and `token` {claims}.
//!
//! Bounds keep any policy from making a request slow: an expression is at most
//! [`MAX_EXPRESSION_LEN`] bytes and [`MAX_NESTING`] brackets deep (the parser recurses), and it may
//! only name the four variables above (checked at compile time, so a typo is a policy error).

use crate::compile::{App, Dataset};
use crate::jwt::VerifiedToken;
use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value};
use std::collections::HashMap;
use std::sync::Arc;

pub const MAX_EXPRESSION_LEN: usize = 2048;
pub const MAX_NESTING: usize = 24;
pub const VARIABLES: [&str; 4] = ["app", "dataset", "request", "token"];
/// Comprehension macros multiply each other's cost (8 nested `exists` over 10 items are 10^8
/// steps), so how many there are and how deep they nest is bounded too.
pub const MAX_COMPREHENSION_NESTING: usize = 2;
pub const MAX_COMPREHENSIONS: usize = 8;
/// Longest list literal: with two nested comprehensions a rule costs at most 64² steps per list.
pub const MAX_LIST_LITERAL: usize = 64;

/// Comprehensions in a compiled expression: how deep they nest, how many there are, and the
/// variables they bind. Read from the AST the macros expanded into, so no spelling (spaces,
/// comments, line breaks) hides one.
#[derive(Default)]
struct Comprehensions {
    longest_list: usize,
    deepest: usize,
    total: usize,
    bound: Vec<String>,
}

impl Comprehensions {
    fn walk(&mut self, e: &IdedExpr, depth: usize) {
        match &e.expr {
            Expr::Comprehension(c) => {
                self.total += 1;
                self.deepest = self.deepest.max(depth + 1);
                self.bound.push(c.iter_var.clone());
                self.bound.extend(c.iter_var2.clone());
                self.bound.push(c.accu_var.clone());
                self.walk(&c.iter_range, depth);
                self.walk(&c.accu_init, depth);
                for inner in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.walk(inner, depth + 1);
                }
            }
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.walk(target, depth);
                }
                for arg in &call.args {
                    self.walk(arg, depth);
                }
            }
            Expr::List(list) => {
                self.longest_list = self.longest_list.max(list.elements.len());
                list.elements.iter().for_each(|x| self.walk(x, depth))
            }
            Expr::Map(map) => map.entries.iter().for_each(|x| self.entry(&x.expr, depth)),
            Expr::Struct(st) => st.entries.iter().for_each(|x| self.entry(&x.expr, depth)),
            Expr::Select(sel) => self.walk(&sel.operand, depth),
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        }
    }

    fn entry(&mut self, e: &EntryExpr, depth: usize) {
        match e {
            EntryExpr::StructField(f) => self.walk(&f.value, depth),
            EntryExpr::MapEntry(m) => {
                self.walk(&m.key, depth);
                self.walk(&m.value, depth);
            }
        }
    }
}

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
    /// Which of [`VARIABLES`] the expression names (bit i for `VARIABLES[i]`).
    uses: u8,
}

/// Bits of [`Expression::uses`].
pub const USES_APP: u8 = 1;
pub const USES_DATASET: u8 = 2;
pub const USES_REQUEST: u8 = 4;
pub const USES_TOKEN: u8 = 8;

impl Expression {
    /// The variables this expression reads, as `USES_*` bits: only those are built per request.
    pub fn uses(&self) -> u8 {
        self.uses
    }
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
        let mut found = Comprehensions::default();
        found.walk(program.expression(), 0);
        if found.longest_list > MAX_LIST_LITERAL {
            return Err(format!(
                "a list literal has {} elements; at most {MAX_LIST_LITERAL} are allowed (comprehensions over it multiply)",
                found.longest_list
            ));
        }
        let (nested, total, bound) = (found.deepest, found.total, found.bound);
        if nested > MAX_COMPREHENSION_NESTING || total > MAX_COMPREHENSIONS {
            return Err(format!(
                "expression has {total} comprehensions (exists, all, exists_one, map, filter) nested {nested} deep; \
                 at most {MAX_COMPREHENSIONS}, nested {MAX_COMPREHENSION_NESTING} deep, are allowed (their cost multiplies)"
            ));
        }
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v) && !bound.iter().any(|b| b == v))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown variable{} `{}` (available: app, dataset, request, token)",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join("`, `")
            ));
        }
        let variables = references.variables();
        let uses = VARIABLES
            .iter()
            .enumerate()
            .filter(|(_, v)| variables.contains(v))
            .fold(0u8, |bits, (i, _)| bits | (1 << i));
        Ok(Expression { program, uses })
    }

    /// One evaluation scope per request: the variables are converted into CEL's representation
    /// once, however many rules are then evaluated in it. Variables left `None` are not bound
    /// (no rule in scope reads them).
    pub fn scope(&self, vars: Vars) -> Scope {
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        for (name, value) in VARIABLES.iter().zip([vars.app, vars.dataset, vars.request, vars.token]) {
            if let Some(value) = value {
                ctx.add_variable_from_value(*name, value);
            }
        }
        Scope { ctx }
    }

    /// Evaluates `expr` to a boolean; any other result or an error is an `Err` (the caller denies).
    pub fn eval(&self, expr: &Expression, scope: &Scope) -> Result<bool, String> {
        match expr.program.execute(&scope.ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("expression gave {:?}, not a boolean", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The variables of one request's evaluations (`None`: not needed). App and dataset values are
/// built once per policy.
pub struct Vars {
    pub app: Option<Value>,
    pub dataset: Option<Value>,
    pub request: Option<Value>,
    pub token: Option<Value>,
}

/// A request's variables, ready for [`Cel::eval`].
pub struct Scope {
    ctx: Context<'static, 'static>,
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
            ("request.headers.exists(k, app.data_classes.exists(c, c == k))", None, "two nested comprehensions"),
            (
                "[1].exists(a, [1].exists(b, [1].exists(c, true)))",
                Some("comprehensions"),
                "three nested comprehensions",
            ),
            ("'.exists(.exists(.exists(' == request.path", None, "macro names in a string"),
            (&format!("[{}].exists(a, a == 0)", vec!["0"; 65].join(",")), Some("list literal"), "long list literal"),
            ("[1]. exists(a, [1] .exists (b, [1].\n exists(c, true)))", Some("comprehensions"), "spaced macro calls"),
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
        let scope = cel.scope(Vars {
            app: Some(map(vec![("id", string("pos")), ("tier", string("standard"))])),
            dataset: Some(Value::Null),
            request: Some(request_value("GET", "api.example", "/customers/7", &headers)),
            token: Some(Value::Null),
        });
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
            assert_eq!(cel.eval(&expr, &scope).map_err(|_| ()), *want, "{why}: {src}");
        }
    }
}
