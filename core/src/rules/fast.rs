//! The fast path of the rules: a `when` expression lowered, once, from the `cel` crate's AST into
//! a tree whose names are resolved at compile time (`app.tier` is [`AppField::Tier`], not a map
//! lookup), then evaluated per request over the request's own data, borrowed: no `cel::Value` is
//! built, and the common path allocates nothing.
//!
//! The semantics are those of the `cel` crate (0.15) that the interpreter path runs, operator by
//! operator (its `objects.rs`, `common/types/*.rs`): the same `Ok(true)`, `Ok(false)` or error for
//! every expression. Where they are subtle, the code says so. Anything the lowering does not know
//! (map literals, bytes, optionals, conversions, functions other than `size`, `contains`,
//! `startsWith` and `endsWith`) keeps the whole expression on the interpreter; a value whose
//! result would depend on the interpreter's hash-map order (`map`/`filter` over a map, a list
//! plus a map) makes an evaluation [`Fail::Defer`] to it.

use super::Input;
use crate::compile::Dataset;
use crate::jwt::VerifiedToken;
use crate::raw::{Classification, Environment, Lifecycle};
use cel::common::ast::{operators, CallExpr, ComprehensionExpr, Expr, IdedExpr, ListExpr, LiteralValue};
use serde_json::{Map as JsonMap, Value as Json};
use std::borrow::Cow;
use std::cell::OnceCell;
use std::cmp::Ordering;
use std::rc::Rc;

/// JSON nested deeper than this is `null` to rules (as `token_value` converts it).
const MAX_JSON_DEPTH: u32 = 16;

// === Lowered expressions ===

/// One of the four variables of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Var {
    App,
    Dataset,
    Request,
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AppField {
    Id,
    Owner,
    Team,
    Department,
    Environment,
    Tier,
    Lifecycle,
    Region,
    DataClasses,
    Connectors,
}

const APP_FIELDS: [(&str, AppField); 10] = [
    ("id", AppField::Id),
    ("owner", AppField::Owner),
    ("team", AppField::Team),
    ("department", AppField::Department),
    ("environment", AppField::Environment),
    ("tier", AppField::Tier),
    ("lifecycle", AppField::Lifecycle),
    ("region", AppField::Region),
    ("data_classes", AppField::DataClasses),
    ("connectors", AppField::Connectors),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DatasetField {
    Id,
    Classification,
    OwnerDepartment,
    AllowedRegions,
    RequiresJit,
}

const DATASET_FIELDS: [(&str, DatasetField); 5] = [
    ("id", DatasetField::Id),
    ("classification", DatasetField::Classification),
    ("owner_department", DatasetField::OwnerDepartment),
    ("allowed_regions", DatasetField::AllowedRegions),
    ("requires_jit", DatasetField::RequiresJit),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestField {
    Method,
    Host,
    Path,
    Headers,
}

const REQUEST_FIELDS: [(&str, RequestField); 4] = [
    ("method", RequestField::Method),
    ("host", RequestField::Host),
    ("path", RequestField::Path),
    ("headers", RequestField::Headers),
];

const TOKEN_FIELDS: [&str; 1] = ["claims"];

/// The fields of one of the four variables, as its value holds them (`app_value` and the others
/// in `rules.rs` build the same, and the tables above resolve them: tests hold all three equal).
pub(super) fn field_list(var: &str) -> Option<&'static str> {
    Some(match var {
        "app" => "id, owner, team, department, environment, tier, lifecycle, region, data_classes, connectors",
        "dataset" => "id, classification, owner_department, allowed_regions, requires_jit",
        "request" => "method, host, path, headers",
        "token" => "claims",
        _ => return None,
    })
}

/// The names of the tables above, for the test that holds them equal to [`field_list`].
#[cfg(test)]
pub(super) fn table_names(var: &str) -> Vec<&'static str> {
    fn names<T>(table: &[(&'static str, T)]) -> Vec<&'static str> {
        table.iter().map(|(n, _)| *n).collect()
    }
    match var {
        "app" => names(&APP_FIELDS),
        "dataset" => names(&DATASET_FIELDS),
        "request" => names(&REQUEST_FIELDS),
        "token" => TOKEN_FIELDS.to_vec(),
        _ => Vec::new(),
    }
}

fn field<T: Copy>(table: &[(&str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Binary operators evaluated strictly (both sides, left first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    In,
}

/// The string member functions of the standard library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TextFn {
    Contains,
    StartsWith,
    EndsWith,
}

/// The comprehension macros (`filter` is a `map` whose guard is the predicate and whose body is
/// the variable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LoopKind {
    Exists,
    All,
    ExistsOne,
    Map,
}

#[derive(Debug)]
pub(super) struct Loop {
    kind: LoopKind,
    range: Node,
    guard: Option<Node>,
    body: Node,
}

/// An expression with its names resolved.
#[derive(Debug)]
pub(super) enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Box<str>),
    /// A list literal of scalar literals: a view of the nodes, built without allocating.
    ConstList(Box<[Node]>),
    List(Box<[Node]>),
    Var(Var),
    /// The variable of the comprehension `n` levels out from the root (0 = outermost).
    Local(usize),
    App(AppField),
    Dataset(DatasetField),
    Request(RequestField),
    /// `token.claims`.
    Claims,
    Select(Box<Node>, Box<str>),
    Has(Box<Node>, Box<str>),
    Index(Box<Node>, Box<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Binary(Op, Box<Node>, Box<Node>),
    Size(Box<Node>),
    /// `target.f(arg)`.
    Text(TextFn, Box<Node>, Box<Node>),
    Loop(Box<Loop>),
}

impl Node {
    fn is_scalar(&self) -> bool {
        matches!(self, Node::Null | Node::Bool(_) | Node::Int(_) | Node::UInt(_) | Node::Double(_) | Node::Str(_))
    }
}

// === Lowering ===

/// Lowers a parsed (macro-expanded) expression, or `None` if any part of it is beyond the fast
/// path: then the interpreter evaluates all of it.
pub(super) fn lower(e: &IdedExpr) -> Option<Node> {
    Lower { locals: Vec::new() }.expr(e)
}

struct Lower<'e> {
    /// Comprehension variables in scope, outermost first.
    locals: Vec<&'e str>,
}

fn boxed(n: Node) -> Box<Node> {
    Box::new(n)
}

impl<'e> Lower<'e> {
    fn expr(&mut self, e: &'e IdedExpr) -> Option<Node> {
        Some(match &e.expr {
            Expr::Literal(l) => literal(l)?,
            Expr::Ident(name) => self.ident(name)?,
            Expr::Select(s) => {
                let operand = self.expr(&s.operand)?;
                if s.test {
                    Node::Has(boxed(operand), s.field.as_str().into())
                } else {
                    select(operand, &s.field)
                }
            }
            Expr::Call(call) => self.call(call)?,
            Expr::List(list) => {
                if !list.optional_indices.is_empty() {
                    return None;
                }
                let items = list.elements.iter().map(|x| self.expr(x)).collect::<Option<Vec<_>>>()?;
                if items.iter().all(Node::is_scalar) {
                    Node::ConstList(items.into())
                } else {
                    Node::List(items.into())
                }
            }
            Expr::Comprehension(c) => self.comprehension(c)?,
            Expr::Map(_) | Expr::Struct(_) | Expr::Unspecified => return None,
        })
    }

    /// The innermost comprehension variable of that name, else one of the four variables. Any
    /// other name (a type such as `int`, a comprehension variable used outside its macro, an
    /// absolute `.name`) is left to the interpreter.
    fn ident(&self, name: &str) -> Option<Node> {
        if let Some(depth) = self.locals.iter().rposition(|l| *l == name) {
            return Some(Node::Local(depth));
        }
        Some(Node::Var(match name {
            "app" => Var::App,
            "dataset" => Var::Dataset,
            "request" => Var::Request,
            "token" => Var::Token,
            _ => return None,
        }))
    }

    fn call(&mut self, call: &'e CallExpr) -> Option<Node> {
        let name = call.func_name.as_str();
        let node = match (call.target.as_deref(), call.args.as_slice()) {
            (None, [c, a, b]) if name == operators::CONDITIONAL => {
                Node::Cond(boxed(self.expr(c)?), boxed(self.expr(a)?), boxed(self.expr(b)?))
            }
            (None, [a, b]) => {
                let op = match name {
                    operators::LOGICAL_OR => return Some(Node::Or(boxed(self.expr(a)?), boxed(self.expr(b)?))),
                    operators::LOGICAL_AND => return Some(Node::And(boxed(self.expr(a)?), boxed(self.expr(b)?))),
                    operators::INDEX => return Some(Node::Index(boxed(self.expr(a)?), boxed(self.expr(b)?))),
                    operators::EQUALS => Op::Eq,
                    operators::NOT_EQUALS => Op::Ne,
                    operators::LESS => Op::Lt,
                    operators::LESS_EQUALS => Op::Le,
                    operators::GREATER => Op::Gt,
                    operators::GREATER_EQUALS => Op::Ge,
                    operators::ADD => Op::Add,
                    operators::SUBSTRACT => Op::Sub,
                    operators::MULTIPLY => Op::Mul,
                    operators::DIVIDE => Op::Div,
                    operators::MODULO => Op::Rem,
                    operators::IN => Op::In,
                    _ => return None,
                };
                Node::Binary(op, boxed(self.expr(a)?), boxed(self.expr(b)?))
            }
            (None, [a]) => match name {
                operators::LOGICAL_NOT => Node::Not(boxed(self.expr(a)?)),
                operators::NEGATE => Node::Neg(boxed(self.expr(a)?)),
                "size" => Node::Size(boxed(self.expr(a)?)),
                _ => return None,
            },
            (Some(target), []) if name == "size" => Node::Size(boxed(self.expr(target)?)),
            (Some(target), [arg]) => {
                let f = match name {
                    "contains" => TextFn::Contains,
                    "startsWith" => TextFn::StartsWith,
                    "endsWith" => TextFn::EndsWith,
                    _ => return None,
                };
                Node::Text(f, boxed(self.expr(target)?), boxed(self.expr(arg)?))
            }
            _ => return None,
        };
        Some(node)
    }

    /// Only the exact expansions of the standard macros are lowered.
    fn comprehension(&mut self, c: &'e ComprehensionExpr) -> Option<Node> {
        if c.iter_var2.is_some() {
            return None;
        }
        let (kind, guard, body) = macro_shape(c)?;
        let range = self.expr(&c.iter_range)?;
        self.locals.push(&c.iter_var);
        let guard = guard.map(|g| self.expr(g));
        let body = self.expr(body);
        self.locals.pop();
        let guard = match guard {
            Some(g) => Some(g?),
            None => None,
        };
        Some(Node::Loop(Box::new(Loop { kind, range, guard, body: body? })))
    }
}

fn literal(l: &LiteralValue) -> Option<Node> {
    Some(match l {
        LiteralValue::Null => Node::Null,
        LiteralValue::Boolean(b) => Node::Bool(*b.inner()),
        LiteralValue::Int(i) => Node::Int(*i.inner()),
        LiteralValue::UInt(u) => Node::UInt(*u.inner()),
        LiteralValue::Double(d) => Node::Double(*d.inner()),
        LiteralValue::String(s) => Node::Str(s.inner().into()),
        LiteralValue::Bytes(_) => return None,
    })
}

/// `operand.field`, resolved to a field of a variable when the operand is one.
fn select(operand: Node, name: &str) -> Node {
    let resolved = match operand {
        Node::Var(Var::App) => field(&APP_FIELDS, name).map(Node::App),
        Node::Var(Var::Dataset) => field(&DATASET_FIELDS, name).map(Node::Dataset),
        Node::Var(Var::Request) => field(&REQUEST_FIELDS, name).map(Node::Request),
        Node::Var(Var::Token) if name == "claims" => Some(Node::Claims),
        _ => None,
    };
    resolved.unwrap_or_else(|| Node::Select(boxed(operand), name.into()))
}

fn call_of<'x>(e: &'x IdedExpr, name: &str) -> Option<&'x [IdedExpr]> {
    match &e.expr {
        Expr::Call(c) if c.target.is_none() && c.func_name == name => Some(&c.args),
        _ => None,
    }
}

fn is_bool(e: &IdedExpr, want: bool) -> bool {
    matches!(&e.expr, Expr::Literal(LiteralValue::Boolean(b)) if *b.inner() == want)
}

fn is_int(e: &IdedExpr, want: i64) -> bool {
    matches!(&e.expr, Expr::Literal(LiteralValue::Int(i)) if *i.inner() == want)
}

fn is_ident(e: &IdedExpr, name: &str) -> bool {
    matches!(&e.expr, Expr::Ident(n) if n == name)
}

/// `[x]`: the single element of a plain list literal.
fn single(e: &IdedExpr) -> Option<&IdedExpr> {
    match &e.expr {
        Expr::List(ListExpr { elements, optional_indices }) if optional_indices.is_empty() => match elements.as_slice()
        {
            [x] => Some(x),
            _ => None,
        },
        _ => None,
    }
}

/// Which macro `c` is the expansion of (see the `cel` crate's `parser/macros.rs`), with its guard
/// and body: `exists`, `all`, `exists_one`, `map` (two or three arguments) or `filter`.
fn macro_shape(c: &ComprehensionExpr) -> Option<(LoopKind, Option<&IdedExpr>, &IdedExpr)> {
    let accu = c.accu_var.as_str();
    let is_accu = |e: &IdedExpr| is_ident(e, accu);
    // `@result + [f]`
    fn append<'x>(e: &'x IdedExpr, accu: &str) -> Option<&'x IdedExpr> {
        match call_of(e, operators::ADD) {
            Some([a, list]) if is_ident(a, accu) => single(list),
            _ => None,
        }
    }
    let empty_list =
        matches!(&c.accu_init.expr, Expr::List(l) if l.elements.is_empty() && l.optional_indices.is_empty());

    if is_bool(&c.accu_init, false) && is_accu(&c.result) {
        // exists: cond `@not_strictly_false(!@result)`, step `@result || p`
        let cond = call_of(&c.loop_cond, operators::NOT_STRICTLY_FALSE);
        let not = match cond {
            Some([x]) => call_of(x, operators::LOGICAL_NOT),
            _ => None,
        };
        if let (Some([a]), Some([acc, p])) = (not, call_of(&c.loop_step, operators::LOGICAL_OR)) {
            if is_accu(a) && is_accu(acc) {
                return Some((LoopKind::Exists, None, p));
            }
        }
        return None;
    }
    if is_bool(&c.accu_init, true) && is_accu(&c.result) {
        // all: cond `@not_strictly_false(@result)`, step `@result && p`
        if let (Some([a]), Some([acc, p])) =
            (call_of(&c.loop_cond, operators::NOT_STRICTLY_FALSE), call_of(&c.loop_step, operators::LOGICAL_AND))
        {
            if is_accu(a) && is_accu(acc) {
                return Some((LoopKind::All, None, p));
            }
        }
        return None;
    }
    if is_int(&c.accu_init, 0) && is_bool(&c.loop_cond, true) {
        // exists_one: step `p ? @result + 1 : @result`, result `@result == 1`
        let result_ok = matches!(call_of(&c.result, operators::EQUALS), Some([a, one]) if is_accu(a) && is_int(one, 1));
        if let Some([p, inc, keep]) = call_of(&c.loop_step, operators::CONDITIONAL) {
            let inc_ok = matches!(call_of(inc, operators::ADD), Some([a, one]) if is_accu(a) && is_int(one, 1));
            if result_ok && inc_ok && is_accu(keep) {
                return Some((LoopKind::ExistsOne, None, p));
            }
        }
        return None;
    }
    if empty_list && is_bool(&c.loop_cond, true) && is_accu(&c.result) {
        // map: step `@result + [f]`; map with a predicate and filter: `p ? @result + [f] : @result`
        if let Some(f) = append(&c.loop_step, accu) {
            return Some((LoopKind::Map, None, f));
        }
        if let Some([p, step, keep]) = call_of(&c.loop_step, operators::CONDITIONAL) {
            if is_accu(keep) {
                return append(step, accu).map(|f| (LoopKind::Map, Some(p), f));
            }
        }
    }
    None
}

// === Values ===

/// Why an evaluation produced no value.
#[derive(Debug)]
pub(super) enum Fail {
    /// A CEL evaluation error: the rule fails (the caller denies).
    Error(Cow<'static, str>),
    /// The result depends on what the fast path does not model: ask the interpreter.
    Defer,
}

type R<T> = Result<T, Fail>;

fn fail<T>(message: impl Into<Cow<'static, str>>) -> R<T> {
    Err(Fail::Error(message.into()))
}

/// What one evaluation reads: the request's parts, its host normalised, and its path in the
/// form datasets are matched by, made when an expression first reads it.
#[derive(Debug)]
pub(super) struct Cx<'a> {
    pub input: &'a Input<'a>,
    pub host: &'a str,
    /// `Some` once made and unlike the input's path; `None` inside when that is canonical already.
    pub path: &'a OnceCell<Option<String>>,
}

impl<'a> Cx<'a> {
    /// `request.path`: [`crate::path::canonical_path`] of the input's, borrowed when it is so already.
    /// Not inlined: it would grow `Eval::eval`, which every node of every rule goes through.
    #[inline(never)]
    fn path(&self) -> &'a str {
        let input: &'a str = self.input.path;
        let made = self.path.get_or_init(|| match crate::path::canonical_path(input) {
            Cow::Borrowed(_) => None,
            Cow::Owned(canonical) => Some(canonical),
        });
        made.as_deref().unwrap_or(input)
    }
}

/// A CEL value, borrowing the request's data and the expression's literals.
#[derive(Debug, Clone)]
pub(super) enum V<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Cow<'a, str>),
    List(L<'a>),
    Map(M<'a>),
}

/// A list: a view of data held elsewhere, or built by the expression.
#[derive(Debug, Clone)]
pub(super) enum L<'a> {
    Strs(&'a [String]),
    Classes(&'a [Classification]),
    Const(&'a [Node]),
    /// A JSON array at this depth (its elements one deeper).
    Json(&'a [Json], u32),
    Owned(Rc<Vec<V<'a>>>),
}

/// A map: every map a rule can reach has string keys (map literals stay on the interpreter).
#[derive(Debug, Clone, Copy)]
pub(super) enum M<'a> {
    App(&'a Cx<'a>),
    Dataset(&'a Dataset),
    Request(&'a Cx<'a>),
    /// `request.headers`: lower-case names, pseudo-headers left out, repeated values joined.
    Headers(&'a [(String, String)]),
    Token(&'a VerifiedToken),
    /// A JSON object at this depth (its values one deeper).
    Json(&'a JsonMap<String, Json>, u32),
}

pub(super) fn environment_name(e: Environment) -> &'static str {
    match e {
        Environment::Dev => "dev",
        Environment::Test => "test",
        Environment::Prod => "prod",
    }
}

pub(super) fn lifecycle_name(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Draft => "draft",
        Lifecycle::Approved => "approved",
        Lifecycle::Published => "published",
        Lifecycle::Deprecated => "deprecated",
        Lifecycle::Quarantined => "quarantined",
    }
}

fn type_name(v: &V<'_>) -> &'static str {
    match v {
        V::Null => "null",
        V::Bool(_) => "bool",
        V::Int(_) => "int",
        V::UInt(_) => "uint",
        V::Double(_) => "double",
        V::Str(_) => "string",
        V::List(_) => "list",
        V::Map(_) => "map",
    }
}

fn opt(s: &Option<String>) -> V<'_> {
    s.as_deref().map_or(V::Null, |s| V::Str(Cow::Borrowed(s)))
}

fn text(s: &str) -> V<'_> {
    V::Str(Cow::Borrowed(s))
}

/// A claim, as `token_value` converts it: integers that fit `i64` are ints, other numbers
/// doubles, and anything nested deeper than [`MAX_JSON_DEPTH`] is null.
fn json(v: &Json, depth: u32) -> V<'_> {
    if depth > MAX_JSON_DEPTH {
        return V::Null;
    }
    match v {
        Json::Null => V::Null,
        Json::Bool(b) => V::Bool(*b),
        Json::Number(n) => n.as_i64().map(V::Int).or_else(|| n.as_f64().map(V::Double)).unwrap_or(V::Null),
        Json::String(s) => text(s),
        Json::Array(a) => V::List(L::Json(a, depth)),
        Json::Object(o) => V::Map(M::Json(o, depth)),
    }
}

fn scalar(n: &Node) -> V<'_> {
    match n {
        Node::Bool(b) => V::Bool(*b),
        Node::Int(i) => V::Int(*i),
        Node::UInt(u) => V::UInt(*u),
        Node::Double(d) => V::Double(*d),
        Node::Str(s) => text(s),
        _ => V::Null,
    }
}

impl<'a> L<'a> {
    fn len(&self) -> usize {
        match self {
            L::Strs(s) => s.len(),
            L::Classes(c) => c.len(),
            L::Const(n) => n.len(),
            L::Json(a, _) => a.len(),
            L::Owned(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> Option<V<'a>> {
        Some(match self {
            L::Strs(s) => text(s.get(i)?),
            L::Classes(c) => text(c.get(i)?.as_str()),
            L::Const(n) => scalar(n.get(i)?),
            L::Json(a, depth) => json(a.get(i)?, depth + 1),
            L::Owned(v) => v.get(i)?.clone(),
        })
    }
}

/// Whether header `name` (as sent) is the map key `key`: keys are lower-case names, so a key
/// with an upper-case letter matches nothing.
fn header_is(name: &str, key: &str) -> bool {
    !name.starts_with(':') && name.eq_ignore_ascii_case(key) && !key.bytes().any(|b| b.is_ascii_uppercase())
}

fn lower_case(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Whether header `i` is the first of its (lower-cased) name, pseudo-headers left out.
fn first_of_name(headers: &[(String, String)], i: usize) -> bool {
    let Some((name, _)) = headers.get(i) else { return false };
    !name.starts_with(':') && !headers[..i].iter().any(|(k, _)| !k.starts_with(':') && k.eq_ignore_ascii_case(name))
}

impl<'a> M<'a> {
    fn len(&self) -> usize {
        match self {
            M::App(_) => APP_FIELDS.len(),
            M::Dataset(_) => DATASET_FIELDS.len(),
            M::Request(_) => REQUEST_FIELDS.len(),
            M::Token(_) => TOKEN_FIELDS.len(),
            M::Headers(h) => (0..h.len()).filter(|&i| first_of_name(h, i)).count(),
            M::Json(o, _) => o.len(),
        }
    }

    fn has(&self, key: &str) -> bool {
        match self {
            M::App(_) => field(&APP_FIELDS, key).is_some(),
            M::Dataset(_) => field(&DATASET_FIELDS, key).is_some(),
            M::Request(_) => field(&REQUEST_FIELDS, key).is_some(),
            M::Token(_) => TOKEN_FIELDS.contains(&key),
            M::Headers(h) => h.iter().any(|(k, _)| header_is(k, key)),
            M::Json(o, _) => o.contains_key(key),
        }
    }

    fn get(&self, key: &str) -> Option<V<'a>> {
        match *self {
            M::App(cx) => Some(app_field(cx, field(&APP_FIELDS, key)?)),
            M::Dataset(d) => Some(dataset_field(d, field(&DATASET_FIELDS, key)?)),
            M::Request(cx) => Some(request_field(cx, field(&REQUEST_FIELDS, key)?)),
            M::Token(t) => TOKEN_FIELDS.contains(&key).then_some(V::Map(M::Json(&t.claims, 0))),
            M::Headers(h) => header(h, key),
            M::Json(o, depth) => o.get(key).map(|v| json(v, depth + 1)),
        }
    }

    fn keys(&self) -> Keys<'a> {
        match *self {
            M::App(_) => Keys::App(APP_FIELDS.iter()),
            M::Dataset(_) => Keys::Dataset(DATASET_FIELDS.iter()),
            M::Request(_) => Keys::Request(REQUEST_FIELDS.iter()),
            M::Token(_) => Keys::Token(TOKEN_FIELDS.iter()),
            M::Headers(h) => Keys::Headers(h, 0),
            M::Json(o, _) => Keys::Json(o.keys()),
        }
    }
}

/// The keys of a map, in the fast path's order (only order-independent results are computed
/// from it).
enum Keys<'a> {
    App(std::slice::Iter<'static, (&'static str, AppField)>),
    Dataset(std::slice::Iter<'static, (&'static str, DatasetField)>),
    Request(std::slice::Iter<'static, (&'static str, RequestField)>),
    Token(std::slice::Iter<'static, &'static str>),
    Headers(&'a [(String, String)], usize),
    Json(serde_json::map::Keys<'a>),
}

impl<'a> Iterator for Keys<'a> {
    type Item = Cow<'a, str>;

    fn next(&mut self) -> Option<Cow<'a, str>> {
        match self {
            Keys::App(it) => it.next().map(|(n, _)| Cow::Borrowed(*n)),
            Keys::Dataset(it) => it.next().map(|(n, _)| Cow::Borrowed(*n)),
            Keys::Request(it) => it.next().map(|(n, _)| Cow::Borrowed(*n)),
            Keys::Token(it) => it.next().map(|n| Cow::Borrowed(*n)),
            Keys::Json(it) => it.next().map(|k| Cow::Borrowed(k.as_str())),
            Keys::Headers(h, i) => loop {
                let at = *i;
                let (name, _) = h.get(at)?;
                *i += 1;
                if first_of_name(h, at) {
                    return Some(lower_case(name));
                }
            },
        }
    }
}

/// The value of header `key`: several are joined with `,` in the order sent (the only
/// allocation of a header lookup).
fn header<'a>(headers: &'a [(String, String)], key: &str) -> Option<V<'a>> {
    let mut values = headers.iter().filter(|(k, _)| header_is(k, key)).map(|(_, v)| v.as_str());
    let first = values.next()?;
    Some(V::Str(match values.next() {
        None => Cow::Borrowed(first),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for v in values {
                joined.push(',');
                joined.push_str(v);
            }
            Cow::Owned(joined)
        }
    }))
}

fn app_field<'a>(cx: &'a Cx<'a>, f: AppField) -> V<'a> {
    let app = cx.input.app;
    match f {
        AppField::Id => text(&app.id),
        AppField::Owner => opt(&app.owner),
        AppField::Team => opt(&app.team),
        AppField::Department => opt(&app.department),
        AppField::Environment => text(environment_name(app.environment)),
        AppField::Tier => text(cx.input.tier),
        AppField::Lifecycle => text(lifecycle_name(app.lifecycle)),
        AppField::Region => text(&app.region),
        AppField::DataClasses => V::List(L::Classes(&app.data_classes)),
        AppField::Connectors => V::List(L::Strs(&app.connectors)),
    }
}

fn dataset_field(d: &Dataset, f: DatasetField) -> V<'_> {
    match f {
        DatasetField::Id => text(&d.id),
        DatasetField::Classification => text(d.classification.as_str()),
        DatasetField::OwnerDepartment => opt(&d.owner_department),
        DatasetField::AllowedRegions => V::List(L::Strs(&d.allowed_regions)),
        DatasetField::RequiresJit => V::Bool(d.requires_jit),
    }
}

fn request_field<'a>(cx: &'a Cx<'a>, f: RequestField) -> V<'a> {
    match f {
        RequestField::Method => text(cx.input.method),
        RequestField::Host => text(cx.host),
        RequestField::Path => text(cx.path()),
        RequestField::Headers => V::Map(M::Headers(cx.input.headers)),
    }
}

// === Semantics of the `cel` crate ===

/// `a.equals(b)` of the `cel` crate: numbers compare across int, uint and double (ints and uints
/// converted to `f64`, as it does, lossily), lists element-wise, maps by their keys' values, and
/// values of different types are unequal (never an error).
fn equal(a: &V<'_>, b: &V<'_>) -> bool {
    match (a, b) {
        (V::Null, V::Null) => true,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Str(x), V::Str(y)) => x == y,
        (V::List(x), V::List(y)) => {
            x.len() == y.len()
                && (0..x.len()).all(|i| match (x.get(i), y.get(i)) {
                    (Some(p), Some(q)) => equal(&p, &q),
                    _ => false,
                })
        }
        (V::Map(x), V::Map(y)) => {
            x.len() == y.len()
                && x.keys().all(|k| match (x.get(&k), y.get(&k)) {
                    (Some(p), Some(q)) => equal(&p, &q),
                    _ => false,
                })
        }
        _ => numeric_order(a, b) == Some(Ordering::Equal),
    }
}

/// The order of two numbers as the `cel` crate's `Comparer`s give it; `None` for NaN or
/// non-numbers.
fn numeric_order(a: &V<'_>, b: &V<'_>) -> Option<Ordering> {
    match (a, b) {
        (V::Int(x), V::Int(y)) => Some(x.cmp(y)),
        // An int that is no uint is negative, a uint that is no int above `i64::MAX`.
        (V::Int(x), V::UInt(y)) => Some(u64::try_from(*x).map_or(Ordering::Less, |x| x.cmp(y))),
        (V::Int(x), V::Double(y)) => (*x as f64).partial_cmp(y),
        (V::UInt(x), V::UInt(y)) => Some(x.cmp(y)),
        (V::UInt(x), V::Int(y)) => Some(i64::try_from(*x).map_or(Ordering::Greater, |x| x.cmp(y))),
        (V::UInt(x), V::Double(y)) => (*x as f64).partial_cmp(y),
        (V::Double(x), V::Double(y)) => x.partial_cmp(y),
        (V::Double(x), V::Int(y)) => x.partial_cmp(&(*y as f64)),
        (V::Double(x), V::UInt(y)) => x.partial_cmp(&(*y as f64)),
        _ => None,
    }
}

/// `<`, `<=`, `>`, `>=`: numbers across types (NaN is an error), strings by bytes, bools; any
/// other pair is an error (no overload).
fn order(op: &'static str, a: &V<'_>, b: &V<'_>) -> R<Ordering> {
    let found = match (a, b) {
        (V::Str(x), V::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (V::Bool(x), V::Bool(y)) => Some(x.cmp(y)),
        _ => numeric_order(a, b),
    };
    found.map_or_else(|| no_overload(op, a, b), Ok)
}

#[cold]
#[inline(never)]
fn unary_error<T>(op: &'static str, a: &V<'_>) -> R<T> {
    fail(format!("no such overload: {op} {}", type_name(a)))
}

#[cold]
#[inline(never)]
fn overflow<T>(op: &'static str) -> R<T> {
    fail(format!("{op}: integer overflow"))
}

#[cold]
#[inline(never)]
fn no_overload<T>(op: &'static str, a: &V<'_>, b: &V<'_>) -> R<T> {
    fail(format!("no such overload: {} {op} {}", type_name(a), type_name(b)))
}

/// `+ - * / %`: ints and uints checked (overflow, division and remainder by zero are errors),
/// doubles IEEE (no `%`), strings and lists concatenated; mixed types are errors.
fn arithmetic<'a>(op: Op, a: V<'a>, b: V<'a>) -> R<V<'a>> {
    let symbol = match op {
        Op::Add => "+",
        Op::Sub => "-",
        Op::Mul => "*",
        Op::Div => "/",
        _ => "%",
    };
    Ok(match (op, &a, &b) {
        (_, V::Int(x), V::Int(y)) => V::Int(
            match op {
                Op::Add => x.checked_add(*y),
                Op::Sub => x.checked_sub(*y),
                Op::Mul => x.checked_mul(*y),
                Op::Div if *y == 0 => return fail("division by zero"),
                Op::Div => x.checked_div(*y),
                _ if *y == 0 => return fail("remainder by zero"),
                _ => x.checked_rem(*y),
            }
            .map_or_else(|| overflow(symbol), Ok)?,
        ),
        (_, V::UInt(x), V::UInt(y)) => V::UInt(
            match op {
                Op::Add => x.checked_add(*y),
                Op::Sub => x.checked_sub(*y),
                Op::Mul => x.checked_mul(*y),
                Op::Div if *y == 0 => return fail("division by zero"),
                Op::Div => x.checked_div(*y),
                _ if *y == 0 => return fail("remainder by zero"),
                _ => x.checked_rem(*y),
            }
            .map_or_else(|| overflow(symbol), Ok)?,
        ),
        (Op::Add, V::Double(x), V::Double(y)) => V::Double(x + y),
        (Op::Sub, V::Double(x), V::Double(y)) => V::Double(x - y),
        (Op::Mul, V::Double(x), V::Double(y)) => V::Double(x * y),
        (Op::Div, V::Double(x), V::Double(y)) => V::Double(x / y),
        (Op::Add, V::Str(x), V::Str(y)) => {
            let mut s = String::with_capacity(x.len() + y.len());
            s.push_str(x);
            s.push_str(y);
            V::Str(Cow::Owned(s))
        }
        (Op::Add, V::List(x), V::List(y)) => {
            let items = (0..x.len()).filter_map(|i| x.get(i)).chain((0..y.len()).filter_map(|i| y.get(i)));
            V::List(L::Owned(Rc::new(items.collect())))
        }
        // A list plus a map appends the map's keys, in the interpreter's hash order.
        (Op::Add, V::List(_), V::Map(_)) => return Err(Fail::Defer),
        _ => return no_overload(symbol, &a, &b),
    })
}

/// `a in b`: an element of a list equal to `a`, or a key of a map. Every map here has string
/// keys: another key type is simply absent, but a value that can be no key at all (null, a
/// list, a map) is an error, as in the `cel` crate.
fn contains(a: &V<'_>, b: &V<'_>) -> R<bool> {
    match b {
        V::List(l) => Ok((0..l.len()).any(|i| l.get(i).is_some_and(|x| equal(&x, a)))),
        V::Map(m) => match a {
            V::Str(key) => Ok(m.has(key)),
            V::Int(_) | V::UInt(_) | V::Double(_) | V::Bool(_) => Ok(false),
            _ => unary_error("map key of type", a),
        },
        _ => no_overload("in", a, b),
    }
}

/// `d` as an `i64` if it converts without loss (the `cel` crate's `double_to_int_lossless`).
fn double_to_int(d: f64) -> Option<i64> {
    if d > i64::MIN as f64 && d < i64::MAX as f64 {
        let i = d as i64;
        (i as f64 == d).then_some(i)
    } else {
        None
    }
}

/// `a[i]`: a list by int, uint or whole double (out of range is an error), a map by key
/// (missing is an error).
fn index<'a>(a: V<'a>, i: V<'a>) -> R<V<'a>> {
    let found = match (&a, &i) {
        (V::List(l), V::Int(n)) => usize::try_from(*n).ok().and_then(|n| l.get(n)),
        (V::List(l), V::UInt(n)) => usize::try_from(*n).ok().and_then(|n| l.get(n)),
        (V::List(l), V::Double(d)) => double_to_int(*d).and_then(|n| usize::try_from(n).ok()).and_then(|n| l.get(n)),
        (V::Map(m), V::Str(key)) => m.get(key),
        _ => None,
    };
    found.map_or_else(|| no_key(&a, &i), Ok)
}

#[cold]
#[inline(never)]
fn no_key<T>(a: &V<'_>, i: &V<'_>) -> R<T> {
    let key = match i {
        V::Str(s) => format!("'{s}'"),
        V::Int(n) => n.to_string(),
        V::UInt(n) => n.to_string(),
        V::Double(d) => d.to_string(),
        other => type_name(other).to_string(),
    };
    fail(format!("no such key or index {key} in {}", type_name(a)))
}

/// `a.f`: a map's key (missing is an error); on anything else an error.
fn select_field<'a>(a: V<'a>, name: &str) -> R<V<'a>> {
    let found = match &a {
        V::Map(m) => m.get(name),
        _ => None,
    };
    found.map_or_else(|| no_key(&a, &text(name)), Ok)
}

/// `size(a)`: code points of a string, elements of a list, entries of a map.
fn size(a: &V<'_>) -> R<V<'static>> {
    let n = match a {
        V::Str(s) => s.chars().count(),
        V::List(l) => l.len(),
        V::Map(m) => m.len(),
        other => return unary_error("size of", other),
    };
    Ok(V::Int(i64::try_from(n).unwrap_or(i64::MAX)))
}

#[cold]
#[inline(never)]
fn not_bool(v: &V<'_>) -> Cow<'static, str> {
    format!("no such overload: logical operator on {}", type_name(v)).into()
}

/// The result of one operand of `&&` / `||`: a bool, or why not.
fn operand(r: R<V<'_>>) -> R<Result<bool, Cow<'static, str>>> {
    match r {
        Ok(V::Bool(b)) => Ok(Ok(b)),
        Ok(other) => Ok(Err(not_bool(&other))),
        Err(Fail::Error(e)) => Ok(Err(e)),
        Err(Fail::Defer) => Err(Fail::Defer),
    }
}

// === Evaluation ===

struct Eval<'a> {
    cx: &'a Cx<'a>,
    /// Comprehension variables, outermost first.
    locals: Vec<V<'a>>,
}

/// Evaluates a lowered expression to a boolean.
pub(super) fn run<'a>(node: &'a Node, cx: &'a Cx<'a>) -> Result<bool, Fail> {
    let mut ev = Eval { cx, locals: Vec::new() };
    match ev.eval(node)? {
        V::Bool(b) => Ok(b),
        other => fail(format!("expression gave {}, not a boolean", type_name(&other))),
    }
}

impl<'a> Eval<'a> {
    /// One node. The arms that recurse are functions of their own, and errors are built out of
    /// line, so that each level of a deep expression takes little stack.
    fn eval(&mut self, node: &'a Node) -> R<V<'a>> {
        let cx = self.cx;
        Ok(match node {
            Node::Null => V::Null,
            Node::Bool(b) => V::Bool(*b),
            Node::Int(i) => V::Int(*i),
            Node::UInt(u) => V::UInt(*u),
            Node::Double(d) => V::Double(*d),
            Node::Str(s) => text(s),
            Node::ConstList(items) => V::List(L::Const(items)),
            Node::List(items) => return self.list(items),
            Node::Var(Var::App) => V::Map(M::App(cx)),
            Node::Var(Var::Dataset) => cx.input.dataset.map_or(V::Null, |d| V::Map(M::Dataset(d))),
            Node::Var(Var::Request) => V::Map(M::Request(cx)),
            Node::Var(Var::Token) => cx.input.token.map_or(V::Null, |t| V::Map(M::Token(t))),
            // Lowering only makes locals of enclosing loops; should one be missing, ask the
            // interpreter rather than guess.
            Node::Local(depth) => self.locals.get(*depth).cloned().ok_or(Fail::Defer)?,
            Node::App(f) => app_field(cx, *f),
            Node::Dataset(f) => match cx.input.dataset {
                Some(d) => dataset_field(d, *f),
                None => return fail("no such key: a field of dataset, which is null"),
            },
            Node::Request(f) => request_field(cx, *f),
            Node::Claims => match cx.input.token {
                Some(t) => V::Map(M::Json(&t.claims, 0)),
                None => return fail("no such key: claims of token, which is null"),
            },
            Node::Select(operand, name) => return self.select(operand, name),
            Node::Has(operand, name) => return self.has(operand, name),
            Node::Index(a, i) => return self.index(a, i),
            Node::Not(a) => return self.not(a),
            Node::Neg(a) => return self.neg(a),
            Node::Or(a, b) => return self.logical(false, a, b),
            Node::And(a, b) => return self.logical(true, a, b),
            Node::Cond(c, a, b) => return self.cond(c, a, b),
            Node::Binary(op, a, b) => return self.binary(*op, a, b),
            Node::Size(a) => return self.size(a),
            Node::Text(f, target, arg) => return self.text(*f, target, arg),
            Node::Loop(l) => return self.comprehension(l),
        })
    }

    #[inline(never)]
    fn list(&mut self, items: &'a [Node]) -> R<V<'a>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.eval(item)?);
        }
        Ok(V::List(L::Owned(Rc::new(out))))
    }

    #[inline(never)]
    fn select(&mut self, operand: &'a Node, name: &str) -> R<V<'a>> {
        let base = self.eval(operand)?;
        select_field(base, name)
    }

    /// `has(a.f)`: whether map `a` has the key, even with a null value; an error on anything but
    /// a map (a list included), as in the `cel` crate.
    #[inline(never)]
    fn has(&mut self, operand: &'a Node, name: &str) -> R<V<'a>> {
        match self.eval(operand)? {
            V::Map(m) => Ok(V::Bool(m.has(name))),
            other => unary_error("has() on", &other),
        }
    }

    #[inline(never)]
    fn index(&mut self, a: &'a Node, i: &'a Node) -> R<V<'a>> {
        let base = self.eval(a)?;
        let at = self.eval(i)?;
        index(base, at)
    }

    #[inline(never)]
    fn not(&mut self, a: &'a Node) -> R<V<'a>> {
        match self.eval(a)? {
            V::Bool(b) => Ok(V::Bool(!b)),
            other => unary_error("!", &other),
        }
    }

    #[inline(never)]
    fn neg(&mut self, a: &'a Node) -> R<V<'a>> {
        match self.eval(a)? {
            V::Int(i) => i.checked_neg().map_or_else(|| overflow("-"), |i| Ok(V::Int(i))),
            V::Double(d) => Ok(V::Double(-d)),
            other => unary_error("-", &other),
        }
    }

    /// `a || b` (`and` false) as the `cel` crate evaluates it: `a` first, and `true` settles it;
    /// else `b`, whose own error is the result; `true` on the right absorbs an error (or a
    /// non-bool) on the left; anything else is an error. `a && b` (`and` true) is its mirror
    /// image, with `false` settling.
    #[inline(never)]
    fn logical(&mut self, and: bool, a: &'a Node, b: &'a Node) -> R<V<'a>> {
        let settles = !and;
        let left = operand(self.eval(a))?;
        if left == Ok(settles) {
            return Ok(V::Bool(settles));
        }
        match (left, self.eval(b)?) {
            (Ok(_), V::Bool(r)) => Ok(V::Bool(r)),
            (Err(_), V::Bool(r)) if r == settles => Ok(V::Bool(r)),
            (Err(e), _) => Err(Fail::Error(e)),
            (Ok(_), other) => unary_error(if and { "bool &&" } else { "bool ||" }, &other),
        }
    }

    #[inline(never)]
    fn cond(&mut self, c: &'a Node, a: &'a Node, b: &'a Node) -> R<V<'a>> {
        match self.eval(c)? {
            V::Bool(true) => self.eval(a),
            V::Bool(false) => self.eval(b),
            other => unary_error("? : with a condition of", &other),
        }
    }

    #[inline(never)]
    fn binary(&mut self, op: Op, a: &'a Node, b: &'a Node) -> R<V<'a>> {
        let a = self.eval(a)?;
        let b = self.eval(b)?;
        Ok(match op {
            Op::Eq => V::Bool(equal(&a, &b)),
            Op::Ne => V::Bool(!equal(&a, &b)),
            Op::Lt => V::Bool(order("<", &a, &b)? == Ordering::Less),
            Op::Le => V::Bool(order("<=", &a, &b)? != Ordering::Greater),
            Op::Gt => V::Bool(order(">", &a, &b)? == Ordering::Greater),
            Op::Ge => V::Bool(order(">=", &a, &b)? != Ordering::Less),
            Op::In => V::Bool(contains(&a, &b)?),
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem => arithmetic(op, a, b)?,
        })
    }

    #[inline(never)]
    fn size(&mut self, a: &'a Node) -> R<V<'a>> {
        size(&self.eval(a)?)
    }

    /// A member call evaluates its argument before its target; both must be strings.
    #[inline(never)]
    fn text(&mut self, f: TextFn, target: &'a Node, arg: &'a Node) -> R<V<'a>> {
        let arg = self.eval(arg)?;
        let target = self.eval(target)?;
        match (&target, &arg) {
            (V::Str(t), V::Str(a)) => Ok(V::Bool(match f {
                TextFn::Contains => t.contains(a.as_ref()),
                TextFn::StartsWith => t.starts_with(a.as_ref()),
                TextFn::EndsWith => t.ends_with(a.as_ref()),
            })),
            _ => no_overload("string function", &target, &arg),
        }
    }

    /// Evaluates `node` with `item` bound to the innermost comprehension variable.
    fn with_local(&mut self, item: V<'a>, node: &'a Node) -> R<V<'a>> {
        self.locals.push(item);
        let result = self.eval(node);
        self.locals.pop();
        result
    }

    /// The macros as the `cel` crate runs their expansions. `exists`: the first `true` wins;
    /// else an error of any element (a non-bool included) is the result; else `false`. `all`:
    /// the mirror image. `exists_one`: any error is the result, else exactly one `true`.
    /// `map`/`filter`: any error is the result. Over a map they iterate its keys; `exists`, `all`
    /// and `exists_one` do not depend on the order, `map` and `filter` do (the interpreter's
    /// order is a hash map's), so those are deferred to it.
    #[inline(never)]
    fn comprehension(&mut self, l: &'a Loop) -> R<V<'a>> {
        let range = self.eval(&l.range)?;
        let mut items = match (&range, l.kind) {
            (V::List(list), _) => Items::List(list.clone(), 0),
            (V::Map(_), LoopKind::Map) => return Err(Fail::Defer),
            (V::Map(m), _) => Items::Keys(m.keys()),
            (other, _) => return fail(format!("cannot iterate over {}", type_name(other))),
        };
        match l.kind {
            LoopKind::Exists | LoopKind::All => {
                let settles = l.kind == LoopKind::Exists;
                let mut pending: Option<Cow<'static, str>> = None;
                while let Some(item) = items.next() {
                    match operand(self.with_local(item, &l.body))? {
                        Ok(b) if b == settles => return Ok(V::Bool(settles)),
                        Ok(_) => {}
                        Err(e) => pending = Some(e),
                    }
                }
                match pending {
                    Some(e) => Err(Fail::Error(e)),
                    None => Ok(V::Bool(!settles)),
                }
            }
            LoopKind::ExistsOne => {
                let mut count = 0usize;
                while let Some(item) = items.next() {
                    match self.with_local(item, &l.body)? {
                        V::Bool(true) => count += 1,
                        V::Bool(false) => {}
                        other => return fail(format!("exists_one: predicate gave {}", type_name(&other))),
                    }
                }
                Ok(V::Bool(count == 1))
            }
            LoopKind::Map => {
                let mut out = Vec::new();
                while let Some(item) = items.next() {
                    if let Some(guard) = &l.guard {
                        match self.with_local(item.clone(), guard)? {
                            V::Bool(true) => {}
                            V::Bool(false) => continue,
                            other => return fail(format!("filter: predicate gave {}", type_name(&other))),
                        }
                    }
                    out.push(self.with_local(item, &l.body)?);
                }
                Ok(V::List(L::Owned(Rc::new(out))))
            }
        }
    }
}

/// The elements of a list or the keys of a map, as a comprehension visits them.
enum Items<'a> {
    List(L<'a>, usize),
    Keys(Keys<'a>),
}

impl<'a> Items<'a> {
    fn next(&mut self) -> Option<V<'a>> {
        match self {
            Items::List(l, i) => {
                let item = l.get(*i)?;
                *i += 1;
                Some(item)
            }
            Items::Keys(k) => k.next().map(V::Str),
        }
    }
}
