//! Attribute-based rules in CEL (the `cel` crate): compiled once per policy, evaluated per request
//! over `app`, `dataset`, `request` {method, host, path, headers} and `token` {claims}.
//!
//! Bounds keep any policy from making a request slow: an expression is at most
//! [`MAX_EXPRESSION_LEN`] bytes and [`MAX_NESTING`] brackets deep (the parser recurses). It may
//! only name the four variables above, the fields they hold (`token.claims` and `request.headers`
//! are open maps) and the functions the interpreter declares, and it may not be a constant other
//! than `true` or `false`: all checked at compile time, so a typo is a policy error, not a rule
//! that fails (and denies) on every request in Envoy.
//!
//! Two paths evaluate an expression, with the same results. The `cel` crate parses and checks
//! every one; those made of the usual parts (see `rules/fast.rs`) are also lowered into a tree
//! that is evaluated over the request's data in place ([`Path::Fast`]), and the rest run on the
//! crate's interpreter ([`Path::Interpreter`]), whose variables are converted into `cel::Value`s
//! only when a rule of the request needs them, once per request:
//!
//! ```
//! use guardrail_core::rules::{Cel, Path};
//!
//! let cel = Cel::default();
//! assert_eq!(cel.compile("request.method == 'DELETE' && app.tier != 'gold'").unwrap().path(), Path::Fast);
//! assert_eq!(cel.compile("{'a': 1}.a == 1").unwrap().path(), Path::Interpreter);
//! ```

mod fast;

use crate::compile::{App, Dataset};
use crate::jwt::VerifiedToken;
use cel::common::ast::{operators, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Program, Value};
use std::borrow::Cow;
use std::cell::OnceCell;
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

/// What a compiled expression is made of, read from the AST the macros expanded into, so no
/// spelling (spaces, comments, line breaks) hides a part: its comprehensions (how deep they nest,
/// how many there are, the variables they bind), the functions it calls, and the fields it reads
/// that its variables do not have.
#[derive(Default)]
struct Parts<'e> {
    longest_list: usize,
    deepest: usize,
    total: usize,
    bound: Vec<String>,
    /// Comprehension variables in scope, innermost last: they shadow the four variables.
    locals: Vec<&'e str>,
    /// Functions called: name, and whether on a target (`x.name(..)`).
    calls: Vec<(&'e str, bool)>,
    /// Fields read that are never there, each said once.
    missing: Vec<String>,
}

impl<'e> Parts<'e> {
    fn walk(&mut self, e: &'e IdedExpr, depth: usize) {
        match &e.expr {
            Expr::Comprehension(c) => {
                self.total += 1;
                self.deepest = self.deepest.max(depth + 1);
                self.bound.push(c.iter_var.clone());
                self.bound.extend(c.iter_var2.clone());
                self.bound.push(c.accu_var.clone());
                self.walk(&c.iter_range, depth);
                self.walk(&c.accu_init, depth);
                let scope = self.locals.len();
                self.locals.push(&c.iter_var);
                self.locals.extend(c.iter_var2.as_deref());
                self.locals.push(&c.accu_var);
                for inner in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.walk(inner, depth + 1);
                }
                self.locals.truncate(scope);
            }
            Expr::Call(call) => {
                let name = call.func_name.as_str();
                match (name, call.args.as_slice()) {
                    (operators::INDEX, [operand, key]) => {
                        if let Expr::Literal(LiteralValue::String(key)) = &key.expr {
                            self.field(operand, key.inner());
                        }
                    }
                    // A name an expression can spell; operators (`_==_`, `!_`, `@in`) cannot be.
                    _ if name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.')) => {
                        self.calls.push((name, call.target.is_some()))
                    }
                    _ => {}
                }
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
            Expr::Select(sel) => {
                self.field(&sel.operand, &sel.field);
                self.walk(&sel.operand, depth)
            }
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        }
    }

    fn entry(&mut self, e: &'e EntryExpr, depth: usize) {
        match e {
            EntryExpr::StructField(f) => self.walk(&f.value, depth),
            EntryExpr::MapEntry(m) => {
                self.walk(&m.key, depth);
                self.walk(&m.value, depth);
            }
        }
    }

    /// `operand.field` (or `operand['field']`): where `operand` is one of the four variables, it
    /// must have the field.
    fn field(&mut self, operand: &IdedExpr, field: &str) {
        let Expr::Ident(var) = &operand.expr else { return };
        let Some(fields) = fast::field_list(var).filter(|_| !self.locals.contains(&var.as_str())) else {
            return;
        };
        if fields.split(',').any(|f| f.trim_start() == field) {
            return;
        }
        let text = format!("`{var}` has no field `{field}` (fields: {fields})");
        if !self.missing.contains(&text) {
            self.missing.push(text);
        }
    }
}

/// The standard macros and how they are called: a call of that name in another form stays a
/// call, of a function no one declares.
const MACROS: [(&str, &str); 6] = [
    ("has", "has(x.field)"),
    ("all", "list.all(x, condition)"),
    ("exists", "list.exists(x, condition)"),
    ("exists_one", "list.exists_one(x, condition)"),
    ("map", "list.map(x, expression) or list.map(x, condition, expression)"),
    ("filter", "list.filter(x, condition)"),
];

/// The CEL environment shared by every rule of a policy.
#[derive(Clone)]
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

/// Expressions compiled by earlier policy compiles, by source text, and the CEL environment they
/// were compiled in. Most revisions change the catalog and leave the rules alone; with a cache
/// they reuse their expressions instead of parsing CEL again (parsing was a quarter of compiling a
/// 1,000-app, 20-rule policy). It keeps only what the last compile used, so it never outgrows one
/// policy. An expression is a pure function of its source and the environment: the result is the
/// same as compiling afresh.
#[derive(Default)]
pub struct ExpressionCache {
    cel: Cel,
    known: HashMap<String, Arc<Expression>>,
    used: HashMap<String, Arc<Expression>>,
}

impl ExpressionCache {
    /// The environment every expression of the cache was compiled in.
    pub fn cel(&self) -> &Cel {
        &self.cel
    }

    /// `source` compiled, from the cache if an earlier compile had it. Errors are not kept.
    pub fn compile(&mut self, source: &str) -> Result<Arc<Expression>, String> {
        if let Some(expr) = self.used.get(source) {
            return Ok(Arc::clone(expr));
        }
        let expr = match self.known.remove(source) {
            Some(expr) => expr,
            None => Arc::new(self.cel.compile(source)?),
        };
        self.used.insert(source.to_string(), Arc::clone(&expr));
        Ok(expr)
    }

    /// Ends one policy compile: what it did not use is dropped.
    pub fn finish(&mut self) {
        self.known = std::mem::take(&mut self.used);
    }
}

/// A compiled `when` expression.
pub struct Expression {
    program: Program,
    /// Which of [`VARIABLES`] the expression names (bit i for `VARIABLES[i]`).
    uses: u8,
    /// The expression lowered for the fast path, if all of it could be.
    fast: Option<fast::Node>,
}

/// How an expression is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Lowered at compile time and evaluated over the request's data in place. Should a value
    /// turn out to need what only the interpreter does (`map`/`filter` over a map, whose result
    /// follows its hash order), that one evaluation is handed over to the interpreter.
    Fast,
    /// On the `cel` crate's interpreter, over variables converted into `cel::Value`s.
    Interpreter,
}

/// Bits of [`Expression::uses`].
pub const USES_APP: u8 = 1;
pub const USES_DATASET: u8 = 2;
pub const USES_REQUEST: u8 = 4;
pub const USES_TOKEN: u8 = 8;
pub const USES_ALL: u8 = USES_APP | USES_DATASET | USES_REQUEST | USES_TOKEN;

impl Expression {
    /// The variables this expression reads, as `USES_*` bits: only those are built per request.
    pub fn uses(&self) -> u8 {
        self.uses
    }

    /// The expression's syntax tree, its macros expanded (what [`crate::lint`] reads).
    pub fn ast(&self) -> &IdedExpr {
        self.program.expression()
    }

    /// Which path evaluates this expression.
    pub fn path(&self) -> Path {
        if self.fast.is_some() {
            Path::Fast
        } else {
            Path::Interpreter
        }
    }
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Expression")
    }
}

impl Cel {
    /// Compiles an expression, refusing syntax errors, oversized input, and what could never
    /// evaluate: unknown variables, fields and functions, a constant that is not a boolean.
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
        let mut found = Parts::default();
        found.walk(program.expression(), 0);
        if found.longest_list > MAX_LIST_LITERAL {
            return Err(format!(
                "a list literal has {} elements; at most {MAX_LIST_LITERAL} are allowed (comprehensions over it multiply)",
                found.longest_list
            ));
        }
        let (nested, total, bound) = (found.deepest, found.total, &found.bound);
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
        let root = match &program.expression().expr {
            Expr::Literal(LiteralValue::Boolean(_)) => None,
            Expr::Literal(_) => Some("a constant"),
            Expr::List(_) => Some("a list"),
            Expr::Map(_) | Expr::Struct(_) => Some("a map"),
            _ => None,
        };
        if let Some(what) = root {
            return Err(format!(
                "the expression is {what} (`{}`), never true or false; write a condition, e.g. `request.method == 'DELETE'`",
                source.trim()
            ));
        }
        let mut problems = String::new();
        for text in &found.missing {
            problems.push_str(text);
            problems.push_str("; ");
        }
        for (i, &(name, method)) in found.calls.iter().enumerate() {
            if found.calls[..i].contains(&(name, method)) || self.declares(name, method) {
                continue;
            }
            let (what, form) = match MACROS.iter().find(|(m, _)| *m == name) {
                Some((_, form)) => ("a macro, written ", *form),
                None if !self.declares(name, !method) => ("unknown (not a function of Guardrail's CEL)", ""),
                None if method => ("not a method, called as ", "`f(x)`"),
                None => ("a method, called as ", "`x.f(..)`"),
            };
            problems.push_str(&format!("`{name}` is {what}{form}; "));
        }
        if !problems.is_empty() {
            return Err(format!("{problems}evaluating it fails, and a failing rule denies"));
        }
        let variables = references.variables();
        let uses = VARIABLES
            .iter()
            .enumerate()
            .filter(|(_, v)| variables.contains(v))
            .fold(0u8, |bits, (i, _)| bits | (1 << i));
        let fast = fast::lower(program.expression());
        Ok(Expression { program, uses, fast })
    }

    /// Whether the interpreter declares the function `name`, as a method (`x.name(..)`) or not
    /// (`name(..)`). Asked of the interpreter itself, so that it is the set it really provides: a
    /// call without arguments, which a declared function answers with its result or an overload
    /// error, and an undeclared one with an undeclared reference.
    fn declares(&self, name: &str, method: bool) -> bool {
        let probe = if method { format!("''.{name}()") } else { format!("{name}()") };
        let Ok(program) = self.env.compile(&probe) else {
            // Not a name a call can have; not this check's to refuse.
            return true;
        };
        let ctx = Context::with_env(Arc::clone(&self.env));
        !matches!(program.execute(&ctx), Err(ExecutionError::UndeclaredReference(_)))
    }

    /// One evaluation scope per request: the variables are converted into CEL's representation
    /// once, however many rules are then evaluated in it. Variables left `None` are not bound
    /// (no rule in scope reads them).
    pub fn scope(&self, vars: Vars) -> Scope {
        let bound = [&vars.app, &vars.dataset, &vars.request, &vars.token]
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .fold(0u8, |bits, (i, _)| bits | (1 << i));
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        for (name, value) in VARIABLES.iter().zip([vars.app, vars.dataset, vars.request, vars.token]) {
            if let Some(value) = value {
                ctx.add_variable_from_value(*name, value);
            }
        }
        Scope { ctx, bound }
    }

    /// Evaluates `expr` on the interpreter, whatever its [`Path`], to a boolean; any other result
    /// or an error is an `Err` (the caller denies).
    pub fn eval(&self, expr: &Expression, scope: &Scope) -> Result<bool, String> {
        match expr.program.execute(&scope.ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("expression gave {:?}, not a boolean", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The evaluations of one request's rules: see [`Evaluation::eval`].
    pub fn evaluation<'a>(&'a self, input: Input<'a>) -> Evaluation<'a> {
        let host = crate::path::normalize_host(input.host);
        Evaluation { cel: self, input, host, path: OnceCell::new(), scope: None }
    }

    /// Evaluates `expr` on the fast path alone: `None` if it takes the interpreter's, or if this
    /// evaluation would be handed over to it. For tests that hold the two paths side by side.
    pub fn eval_fast(&self, expr: &Expression, input: &Input<'_>) -> Option<Result<bool, String>> {
        let node = expr.fast.as_ref()?;
        let host = crate::path::normalize_host(input.host);
        let path = OnceCell::new();
        let cx = fast::Cx { input, host: &host, path: &path };
        match fast::run(node, &cx) {
            Ok(b) => Some(Ok(b)),
            Err(fast::Fail::Error(e)) => Some(Err(e.into_owned())),
            Err(fast::Fail::Defer) => None,
        }
    }
}

/// What the rules read of one request, borrowed from it and from the policy.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub app: &'a App,
    /// The name of the app's tier.
    pub tier: &'a str,
    /// The dataset the request reaches, if any (`dataset` is null otherwise).
    pub dataset: Option<&'a Dataset>,
    /// Upper case.
    pub method: &'a str,
    /// As sent: rules see it normalised (`crate::path::normalize_host`).
    pub host: &'a str,
    /// Normalised (`crate::path::normalize_path`): rules see it in the form datasets are matched
    /// by (`crate::path::canonical_path`: without `;params`, lower-case).
    pub path: &'a str,
    /// Names as Envoy gives them: rules see them lower-cased, without pseudo-headers.
    pub headers: &'a [(String, String)],
    /// The verified bearer token, if any (`token` is null otherwise).
    pub token: Option<&'a VerifiedToken>,
}

impl Input<'_> {
    /// The interpreter's variables for the `USES_*` bits in `uses`.
    pub fn vars(&self, uses: u8) -> Vars {
        let wants = |bit: u8| uses & bit != 0;
        Vars {
            app: wants(USES_APP).then(|| app_value(self.app, self.tier)),
            dataset: wants(USES_DATASET).then(|| self.dataset.map_or(Value::Null, dataset_value)),
            request: wants(USES_REQUEST).then(|| {
                let (host, path) = (crate::path::normalize_host(self.host), crate::path::canonical_path(self.path));
                request_value(self.method, &host, &path, self.headers)
            }),
            token: wants(USES_TOKEN).then(|| token_value(self.token)),
        }
    }
}

/// One request's rule evaluations: fast-path expressions read the [`Input`] in place; the
/// interpreter's scope is only built if an expression needs it, once, and each variable in it
/// converted at most once.
pub struct Evaluation<'a> {
    cel: &'a Cel,
    input: Input<'a>,
    host: Cow<'a, str>,
    /// The canonical path, once an expression reads it (`None` inside: the input's is canonical).
    path: OnceCell<Option<String>>,
    scope: Option<Scope>,
}

impl Evaluation<'_> {
    /// Evaluates `expr` to a boolean; any other result or an error is an `Err` (the caller
    /// denies).
    pub fn eval(&mut self, expr: &Expression) -> Result<bool, String> {
        if let Some(node) = &expr.fast {
            let cx = fast::Cx { input: &self.input, host: &self.host, path: &self.path };
            match fast::run(node, &cx) {
                Ok(b) => return Ok(b),
                Err(fast::Fail::Error(e)) => return Err(e.into_owned()),
                Err(fast::Fail::Defer) => {}
            }
        }
        let (cel, input) = (self.cel, &self.input);
        let scope = self.scope.get_or_insert_with(|| cel.scope(input.vars(0)));
        let missing = expr.uses & !scope.bound;
        if missing != 0 {
            let vars = input.vars(missing);
            for (i, value) in [vars.app, vars.dataset, vars.request, vars.token].into_iter().enumerate() {
                if let (Some(value), Some(name)) = (value, VARIABLES.get(i)) {
                    scope.ctx.add_variable_from_value(*name, value);
                }
            }
            scope.bound |= missing;
        }
        cel.eval(expr, scope)
    }

    /// Whether an expression needed the interpreter in this request.
    pub fn interpreted(&self) -> bool {
        self.scope.is_some()
    }
}

/// The variables of one evaluation on the interpreter (`None`: not needed).
pub struct Vars {
    pub app: Option<Value>,
    pub dataset: Option<Value>,
    pub request: Option<Value>,
    pub token: Option<Value>,
}

/// A request's variables, ready for [`Cel::eval`].
pub struct Scope {
    ctx: Context<'static, 'static>,
    /// `USES_*` bits of the variables bound.
    bound: u8,
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
        ("environment", string(fast::environment_name(app.environment))),
        ("tier", string(tier)),
        ("lifecycle", string(fast::lifecycle_name(app.lifecycle))),
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

/// `request`: method, host, path (canonical: `crate::path::canonical_path`), headers (lower-case names; repeated values joined by `,`).
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

    /// Expressions that parse but could never evaluate (so would deny every request in scope) are
    /// refused when compiled, naming what is wrong.
    #[test]
    fn names_the_evaluation_would_not_find_are_compile_errors() {
        let cel = Cel::default();
        // (expression, part of the error or None when valid, why)
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("foo(request.method)", Some("`foo` is unknown (not a function of Guardrail's CEL); evaluating it fails, and a failing rule denies"), "an undeclared function"),
            ("request.path.lowerAscii() == '/x'", Some("`lowerAscii` is unknown"), "an extension not in the build"),
            ("matches(request.path, '^/x')", Some("`matches` is unknown"), "regex is not in this build"),
            ("timestamp(token.claims.iat) > timestamp('2020-01-01T00:00:00Z')", Some("`timestamp` is unknown"), "chrono is not in this build"),
            ("contains(request.path, 'x')", Some("`contains` is a method, called as `x.f(..)`"), "a method called as a function"),
            ("request.path.string() == 'x'", Some("`string` is not a method, called as `f(x)`"), "a function called as a method"),
            ("app.connectors.exists(app.id == 'x')", Some("`exists` is a macro, written list.exists(x, condition)"), "a macro with too few arguments"),
            ("app.colour == 'red'", Some("`app` has no field `colour` (fields: id, owner, team, department, environment, tier, lifecycle, region, data_classes, connectors)"), "an app field"),
            ("dataset.nosuch == 1", Some("`dataset` has no field `nosuch` (fields: id, classification, owner_department, allowed_regions, requires_jit)"), "a dataset field"),
            ("request.nosuch == 'x'", Some("`request` has no field `nosuch` (fields: method, host, path, headers)"), "a request field"),
            ("token.sub == 'x'", Some("`token` has no field `sub` (fields: claims)"), "a claim outside claims"),
            ("app['colour'] == 'red'", Some("`app` has no field `colour`"), "an index with a literal key"),
            ("has(app.colour)", Some("`app` has no field `colour`"), "has() of a field that is never there"),
            ("foo(app.colour)", Some("`app` has no field `colour` (fields: id, owner, team, department, environment, tier, lifecycle, region, data_classes, connectors); `foo` is unknown"), "every problem is named"),
            ("'abc'", Some("the expression is a constant (`'abc'`)"), "a string literal"),
            ("1", Some("the expression is a constant (`1`)"), "an int literal"),
            ("null", Some("a constant"), "null"),
            ("['x']", Some("the expression is a list"), "a list literal"),
            ("{'a': true}", Some("the expression is a map"), "a map literal"),
            // Valid: what the interpreter has, and the dynamic maps.
            ("true", None, "a constant boolean"),
            ("token.claims.anything == 'x' && has(token.claims.other)", None, "claims are a dynamic map"),
            ("request.headers['x-a'] == '1' && request.headers.x == '2'", None, "headers are a dynamic map"),
            ("size(request.path) > 1 && request.path.size() > 1", None, "size both ways"),
            ("request.path.startsWith('/a') || request.path.endsWith('b') || request.path.contains('c')", None, "string methods"),
            ("int(request.headers['n']) > 1 && string(1) == '1' && double('1.5') > 1.0 && uint(1) == 1u", None, "conversions"),
            ("type(app.id) == type('') && dyn(1) == 1 && bytes('a') == b'a'", None, "type, dyn and bytes"),
            ("app.data_classes[0] == 'internal'", None, "an index into a list field"),
            ("[1].exists(app, app == 1)", None, "a comprehension variable shadows `app`"),
            ("app.connectors.exists(c, c == app.id)", None, "a macro"),
            ("app.connectors.map(c, c.size()).all(n, n > 0)", None, "nested macros"),
            ("has(dataset.requires_jit) && dataset.requires_jit", None, "has() of a field that is there"),
            (".size('a') == 1", None, "an absolute function name"),
            ("request.headers.?x.orValue('') == 'y'", None, "an optional value's method"),
        ];
        for (src, want, why) in cases {
            match (cel.compile(src), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{why}: error `{e}` should mention `{w}`"),
                (Ok(_), Some(w)) => panic!("{why}: {src}: expected an error mentioning `{w}`"),
                (Err(e), None) => panic!("{why}: {src}: unexpected error {e}"),
            }
        }
    }

    /// The functions rules can call are those the interpreter declares (this build has neither
    /// the regex nor the chrono feature, nor the strings extension); `declares` asks it, and
    /// agrees with evaluation. `hasValue` and `orValue` are the optional values' (`x.?field`).
    #[test]
    fn declared_functions_are_those_the_interpreter_evaluates() {
        let cel = Cel::default();
        let functions = ["size", "string", "int", "uint", "double", "bytes", "bool", "dyn", "type", "max", "min"];
        let methods = [
            "size",
            "contains",
            "startsWith",
            "endsWith",
            "matches",
            "lowerAscii",
            "split",
            "string",
            "hasValue",
            "orValue",
        ];
        let mut declared = Vec::new();
        for name in functions {
            if cel.declares(name, false) {
                declared.push(format!("{name}()"));
            }
        }
        for name in methods {
            if cel.declares(name, true) {
                declared.push(format!(".{name}()"));
            }
        }
        assert_eq!(
            declared,
            [
                "size()",
                "string()",
                "int()",
                "uint()",
                "double()",
                "bytes()",
                "bool()",
                "dyn()",
                "type()",
                ".size()",
                ".contains()",
                ".startsWith()",
                ".endsWith()",
                ".hasValue()",
                ".orValue()"
            ],
            "as README 'The policy' lists them"
        );
        // The probe and a real evaluation agree: an undeclared function fails to evaluate.
        let env = Arc::new(Env::stdlib());
        for (src, undeclared) in [("matches('a', 'a')", true), ("size('a') == 1", false), ("'a'.string() == 'a'", true)]
        {
            let program = env.compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            let result = program.execute(&Context::with_env(Arc::clone(&env)));
            assert_eq!(matches!(result, Err(ExecutionError::UndeclaredReference(_))), undeclared, "{src}: {result:?}");
        }
    }

    /// The fields the check knows are those the variables are built with.
    #[test]
    fn the_known_fields_are_those_of_the_values() {
        fn keys(v: &Value) -> Vec<String> {
            let Value::Map(m) = v else { panic!("not a map: {v:?}") };
            let mut keys: Vec<String> = m.map.keys().map(|k| format!("{k:?}")).collect();
            keys.sort();
            keys
        }
        fn names(var: &str) -> Vec<String> {
            let listed: Vec<&str> = fast::field_list(var).unwrap_or_default().split(", ").collect();
            assert_eq!(listed, fast::table_names(var), "{var}: the list and the fast path's table");
            let mut names: Vec<String> =
                listed.iter().map(|n| format!("{:?}", Key::String(Arc::new(n.to_string())))).collect();
            names.sort();
            names
        }
        let app = app();
        let dataset = Dataset {
            id: "d".into(),
            classification: crate::raw::Classification::Public,
            owner_department: None,
            allowed_regions: vec!["eu".into()],
            routes: Vec::new(),
            requires_jit: false,
            approval_required: false,
            region_mask: None,
        };
        let token = VerifiedToken {
            issuer: 0,
            app: "pos".into(),
            app_index: None,
            claims: serde_json::Map::new(),
            exp: 0,
            iat: None,
            nbf: None,
            scopes: Vec::new(),
            clock_skew_seconds: 0,
        };
        assert_eq!(keys(&app_value(&app, "standard")), names("app"), "app");
        assert_eq!(keys(&dataset_value(&dataset)), names("dataset"), "dataset");
        assert_eq!(keys(&request_value("GET", "h", "/", &[])), names("request"), "request");
        assert_eq!(keys(&token_value(Some(&token))), names("token"), "token");
    }

    #[test]
    fn the_expression_cache_keeps_what_the_last_compile_used() {
        let mut cache = ExpressionCache::default();
        let compile =
            |cache: &mut ExpressionCache, src: &str| cache.compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let gold = compile(&mut cache, "app.tier == 'gold'");
        let get = compile(&mut cache, "request.method == 'GET'");
        assert!(Arc::ptr_eq(&gold, &compile(&mut cache, "app.tier == 'gold'")), "twice in one policy: once");
        assert!(cache.compile("app.tier == ").is_err());
        cache.finish();
        assert!(Arc::ptr_eq(&gold, &compile(&mut cache, "app.tier == 'gold'")), "used by the last compile: kept");
        cache.finish();
        assert!(!Arc::ptr_eq(&get, &compile(&mut cache, "request.method == 'GET'")), "unused by the last: dropped");
        assert!(cache.compile("app.tier == ").is_err(), "an error is never kept");
        let scope = cache.cel().scope(Vars {
            app: Some(map(vec![("tier", string("gold"))])),
            dataset: None,
            request: None,
            token: None,
        });
        assert_eq!(cache.cel().eval(&gold, &scope), Ok(true), "evaluates in the cache's environment");
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

    fn app() -> App {
        App {
            id: "pos".into(),
            owner: None,
            team: Some("crm".into()),
            department: Some("retail".into()),
            environment: crate::raw::Environment::Prod,
            tier: 0,
            lifecycle: crate::raw::Lifecycle::Published,
            region: "eu-west-1".into(),
            data_classes: vec![crate::raw::Classification::Internal],
            connectors: vec!["upstream".into()],
            overrides: Vec::new(),
            quota_key: "guardrail.quota.pos".into(),
            review_by: None,
            connector_exceptions: Vec::new(),
            access_grants: Vec::new(),
            review_overdue_at_secs: i64::MAX,
            masks: None,
        }
    }

    #[test]
    fn app_values_name_environments_and_lifecycles_as_before() {
        use crate::raw::{Environment, Lifecycle};
        for e in [Environment::Dev, Environment::Test, Environment::Prod] {
            assert_eq!(fast::environment_name(e), format!("{e:?}").to_lowercase());
        }
        for l in
            [Lifecycle::Draft, Lifecycle::Approved, Lifecycle::Published, Lifecycle::Deprecated, Lifecycle::Quarantined]
        {
            assert_eq!(fast::lifecycle_name(l), format!("{l:?}").to_lowercase());
        }
    }

    /// Rules read `request.path` as datasets match it, on both paths: without `;params`, lower-case.
    #[test]
    fn request_path_is_canonical_on_both_paths() {
        let cel = Cel::default();
        let app = app();
        let fast = cel.compile("request.path == '/p/admin'").unwrap_or_else(|e| panic!("{e}"));
        let interpreted = cel.compile("{'p': request.path}.p == '/p/admin'").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((fast.path(), interpreted.path()), (Path::Fast, Path::Interpreter), "fixture");
        // (normalised path as decide() passes it, whether rules read it as `/p/admin`)
        let cases: &[(&str, bool, &str)] = &[
            ("/p/admin", true, "canonical already"),
            ("/p;x=1/admin", true, "params"),
            ("/p/Admin", true, "upper case"),
            ("/P;v=1/ADMIN;y", true, "both"),
            ("/p%3Bx/admin", true, "an encoded semicolon"),
            ("/p/admins", false, "another path"),
        ];
        for (path, want, why) in cases {
            let input = Input {
                app: &app,
                tier: "standard",
                dataset: None,
                method: "GET",
                host: "api.example",
                path,
                headers: &[],
                token: None,
            };
            let mut evaluation = cel.evaluation(input);
            assert_eq!(evaluation.eval(&fast), Ok(*want), "{why}: fast path, {path}");
            assert_eq!(evaluation.eval(&fast), Ok(*want), "{why}: fast path again (made once), {path}");
            assert_eq!(evaluation.eval(&interpreted), Ok(*want), "{why}: interpreter, {path}");
            assert_eq!(cel.eval_fast(&fast, &input), Some(Ok(*want)), "{why}: eval_fast, {path}");
        }
    }

    /// The interpreter's scope is built only for an expression that needs it, once, and each
    /// variable converted when an expression first reads it.
    #[test]
    fn evaluation_converts_variables_only_for_the_interpreter() {
        let cel = Cel::default();
        let app = app();
        let headers = vec![("x-a".to_string(), "1".to_string()), ("X-A".to_string(), "2".to_string())];
        let input = Input {
            app: &app,
            tier: "standard",
            dataset: None,
            method: "GET",
            host: "API.example:443",
            path: "/customers/7",
            headers: &headers,
            token: None,
        };
        let mut evaluation = cel.evaluation(input);
        let cases: &[(&str, Path, Result<bool, ()>, bool)] = &[
            ("app.tier == 'standard' && request.host == 'api.example'", Path::Fast, Ok(true), false),
            ("request.headers['x-a'] == '1,2' && size(request.headers) == 1", Path::Fast, Ok(true), false),
            ("dataset.id == 'x'", Path::Fast, Err(()), false),
            // hash order: deferred to the interpreter for this evaluation
            ("request.headers.map(k, k) == ['x-a']", Path::Fast, Ok(true), true),
            ("{'a': app.id}.a == 'pos'", Path::Interpreter, Ok(true), true),
            ("{'a': token}.a == null && request.method == 'GET'", Path::Interpreter, Ok(true), true),
            ("app.environment == 'prod'", Path::Fast, Ok(true), true),
        ];
        for (src, path, want, interpreted) in cases {
            let expr = cel.compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(expr.path(), *path, "{src}");
            assert_eq!(evaluation.eval(&expr).map_err(|_| ()), *want, "{src}");
            assert_eq!(evaluation.interpreted(), *interpreted, "{src}");
        }
        let scope = evaluation.scope.as_ref().map(|s| s.bound);
        assert_eq!(scope, Some(USES_APP | USES_REQUEST | USES_TOKEN), "dataset never converted");
    }
}
