//! The fast rule evaluator against the `cel` crate's interpreter: random expressions over every
//! variable, field, operator, function and macro the fast path knows (and some it does not, and
//! many that fail to evaluate), on random apps, datasets, requests and tokens. For every
//! expression the fast path evaluates, its outcome must be the interpreter's: the same `true` or
//! `false`, or an error (the text may differ). Also: the benchmark's rule shapes take the fast
//! path and never touch the interpreter.
//!
//! `PROPTEST_CASES=100000 cargo test -p guardrail-core --test cel_differential` runs more.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use guardrail_core::compile::{App, Dataset};
use guardrail_core::jwt::VerifiedToken;
use guardrail_core::raw::{Classification, Environment, Lifecycle};
use guardrail_core::rules::{Cel, Expression, Input, Path, USES_ALL};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use serde_json::{json, Map, Value};

// === The world: an app, maybe a dataset, a request, maybe a token ===

#[derive(Debug, Clone)]
struct World {
    app: App,
    tier: String,
    dataset: Option<Dataset>,
    method: String,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    token: Option<VerifiedToken>,
}

impl World {
    fn input(&self) -> Input<'_> {
        Input {
            app: &self.app,
            tier: &self.tier,
            dataset: self.dataset.as_ref(),
            method: &self.method,
            host: &self.host,
            path: &self.path,
            headers: &self.headers,
            token: self.token.as_ref(),
        }
    }
}

fn name() -> impl Strategy<Value = Option<String>> {
    let names = select(vec!["crm", "retail", "engineering", "", "Ops é"]);
    prop_oneof![Just(None), names.prop_map(|s| Some(s.to_string()))]
}

fn strings(pool: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(select(pool).prop_map(str::to_string), 0..=max)
}

fn classes() -> impl Strategy<Value = Vec<Classification>> {
    let all =
        vec![Classification::Public, Classification::Internal, Classification::Confidential, Classification::Regulated];
    proptest::collection::vec(select(all), 0..=3)
}

const REGIONS: &[&str] = &["eu-west-1", "eu-central-1", "us-east-1", ""];

fn app() -> impl Strategy<Value = (App, String)> {
    let env = select(vec![Environment::Dev, Environment::Test, Environment::Prod]);
    let life = select(vec![
        Lifecycle::Draft,
        Lifecycle::Approved,
        Lifecycle::Published,
        Lifecycle::Deprecated,
        Lifecycle::Quarantined,
    ]);
    (
        (select(vec!["app-1", "pos", "", "x-a"]), name(), name(), name(), env, life),
        (select(REGIONS), classes(), strings(&["upstream", "crm-api", ""], 3), select(vec!["standard", "sandbox", ""])),
    )
        .prop_map(
            |((id, owner, team, department, environment, lifecycle), (region, data_classes, connectors, tier))| {
                let app = App {
                    id: id.to_string(),
                    owner,
                    team,
                    department,
                    environment,
                    tier: 0,
                    lifecycle,
                    region: region.to_string(),
                    data_classes,
                    connectors,
                    overrides: Vec::new(),
                    quota_key: format!("guardrail.quota.{id}"),
                    review_by: None,
                    review_overdue_at_secs: i64::MAX,
                    masks: None,
                    connector_exceptions: Vec::new(),
                    access_grants: Vec::new(),
                };
                (app, tier.to_string())
            },
        )
}

fn dataset() -> impl Strategy<Value = Option<Dataset>> {
    let class = select(vec![
        Classification::Public,
        Classification::Internal,
        Classification::Confidential,
        Classification::Regulated,
    ]);
    let some = (select(vec!["ds-01", "customers", ""]), class, name(), strings(REGIONS, 3), any::<bool>()).prop_map(
        |(id, classification, owner_department, allowed_regions, requires_jit)| Dataset {
            id: id.to_string(),
            classification,
            owner_department,
            allowed_regions,
            routes: Vec::new(),
            requires_jit,
            approval_required: false,
            region_mask: None,
        },
    );
    prop_oneof![1 => Just(None), 5 => some.prop_map(Some)]
}

/// Header names: lower- and upper-case spellings of the same name, pseudo-headers, odd ones.
const HEADER_NAMES: &[&str] =
    &["user-agent", "User-Agent", "x-a", "X-A", "x-debug", "accept", ":path", ":authority", "", "x_b", "é", "k"];
const HEADER_VALUES: &[&str] = &["sqlmap/1.0", "bench/1.0", "", "a", "1", "GET", "x,y", "é"];

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let usual = proptest::collection::vec(any::<bool>(), 3);
    let random = proptest::collection::vec(
        (select(HEADER_NAMES), select(HEADER_VALUES)).prop_map(|(k, v)| (k.to_string(), v.to_string())),
        0..6,
    );
    (usual, random).prop_map(|(usual, random)| {
        let mut h: Vec<(String, String)> = [(":path", "/"), ("user-agent", "bench/1.0"), ("x-a", "a"), ("k", "1")]
            .into_iter()
            .zip([true].into_iter().chain(usual))
            .filter(|(_, keep)| *keep)
            .map(|((k, v), _)| (k.to_string(), v.to_string()))
            .collect();
        h.extend(random);
        h
    })
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        select(vec![0i64, 1, -1, 2, i64::MAX, i64::MIN]).prop_map(Value::from),
        select(vec![u64::MAX, 1u64 << 63]).prop_map(Value::from),
        select(vec![0.0f64, 1.0, 1.5, -2.5, 1e300]).prop_map(Value::from),
        select(vec!["", "a", "blocked-subject", "read write", "sub", "é"]).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((select(vec!["k", "a", "sub", "x"]), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// `{"k": {"k": ... }}` nested `n` deep: claims deeper than 16 levels are null to rules.
fn nested(n: usize) -> Value {
    (0..n).fold(json!(1), |v, _| json!({ "k": v }))
}

/// Claims: the usual ones, each of its usual type most of the time, and random others.
fn claims() -> impl Strategy<Value = Map<String, Value>> {
    let usual = (
        (
            select(vec![json!("blocked-subject"), json!("svc-a"), json!(""), json!(7)]),
            select(vec![json!("read write"), json!("dataset:ds-01"), json!(null)]),
            select(vec![json!(0), json!(1), json!(-3), json!(i64::MAX), json!(2.5)]),
            select(vec![json!(1.5), json!(-0.0), json!(1e300), json!(3)]),
            any::<bool>(),
        ),
        (
            proptest::collection::vec(json_leaf(), 0..4),
            json_value(),
            select(vec![json!(u64::MAX), json!(1u64 << 63), json!(5)]),
            prop_oneof![0usize..1, 14usize..19],
        ),
        proptest::collection::vec(any::<bool>(), 9),
    );
    let extra = proptest::collection::vec((select(vec!["k", "a", "x", "é", ""]), json_value()), 0..3);
    (usual, extra).prop_map(|(((sub, scope, n, f, b), (arr, obj_k, big, deep), keep), extra)| {
        let values = [
            ("sub", sub),
            ("scope", scope),
            ("n", n),
            ("f", f),
            ("b", json!(b)),
            ("nul", Value::Null),
            ("arr", Value::Array(arr)),
            ("obj", json!({"k": obj_k, "a": ["x", 1]})),
            ("big", big),
        ];
        let mut m: Map<String, Value> = values
            .into_iter()
            .zip(keep.iter().map(|k| *k || deep % 3 != 0))
            .filter(|(_, keep)| *keep)
            .map(|((k, v), _)| (k.to_string(), v))
            .collect();
        if deep > 0 {
            m.insert("deep".into(), nested(deep));
        }
        for (k, v) in extra {
            m.insert(k.to_string(), v);
        }
        m
    })
}

fn token() -> impl Strategy<Value = Option<VerifiedToken>> {
    let some = claims().prop_map(|claims| VerifiedToken {
        issuer: 0,
        app: "app-1".into(),
        claims,
        exp: 2_000_000_000,
        iat: None,
        nbf: None,
        scopes: Vec::new(),
        clock_skew_seconds: 0,
        app_index: None,
    });
    prop_oneof![1 => Just(None), 5 => some.prop_map(Some)]
}

fn world() -> impl Strategy<Value = World> {
    (
        app(),
        dataset(),
        select(vec!["GET", "DELETE", "POST", "get", ""]),
        select(vec!["api.example", "API.Example.:8443", " api.example. ", "[::1]:80", "x.internal", "a:b", ""]),
        select(vec!["/customers/7", "/admin/export", "/", "/é", ""]),
        headers(),
        token(),
    )
        .prop_map(|((app, tier), dataset, method, host, path, headers, token)| World {
            app,
            tier,
            dataset,
            method: method.to_string(),
            host: host.to_string(),
            path: path.to_string(),
            headers,
            token,
        })
}

// === Expressions ===

/// Atoms by the type they (mostly) have; `ANY` adds nulls and ones that fail to evaluate.
const BOOLS: &[&str] = &["true", "false", "dataset.requires_jit", "token.claims.b", "has(token.claims.sub)"];
const STRS: &[&str] = &[
    "''",
    "'a'",
    "'x-a'",
    "'k'",
    "'user-agent'",
    "'GET'",
    "'DELETE'",
    "'sandbox'",
    "'standard'",
    "'prod'",
    "'test'",
    "'published'",
    "'eu-west-1'",
    "'internal'",
    "'public'",
    "'crm'",
    "'é'",
    "'/admin/'",
    "'/customers'",
    "'.internal'",
    "'api.example'",
    "'sub'",
    "'sqlmap'",
    "'blocked-subject'",
    "app.id",
    "app.owner",
    "app.team",
    "app.department",
    "app.environment",
    "app.tier",
    "app.lifecycle",
    "app.region",
    "dataset.id",
    "dataset.classification",
    "dataset.owner_department",
    "request.method",
    "request.host",
    "request.path",
    "request.headers['user-agent']",
    "request.headers['x-a']",
    "request.headers.k",
    "token.claims.sub",
    "token.claims['scope']",
];
const NUMS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "9223372036854775807",
    "-9223372036854775807",
    "0u",
    "1u",
    "2u",
    "18446744073709551615u",
    "0.0",
    "-0.0",
    "1.0",
    "1.5",
    "2.0",
    "1e308",
    "(0.0 / 0.0)",
    "(1.0 / 0.0)",
    "token.claims.n",
    "token.claims.f",
    "token.claims.big",
    "token.claims.arr[0]",
    "token.claims.obj.k",
];
const LISTS: &[&str] = &[
    "[]",
    "['GET', 'HEAD', 'POST']",
    "['prod', 'test']",
    "['internal', 'public']",
    "[1, 2u, 3.0]",
    "[null, true, 'a']",
    "[[1], ['a']]",
    "['a', 1, 2]",
    "[0, 'a', 2u, null]",
    "['é', 'ab', '']",
    "app.data_classes",
    "app.connectors",
    "dataset.allowed_regions",
    "token.claims.arr",
    "token.claims.obj.a",
];
const MAPS: &[&str] = &[
    "app",
    "dataset",
    "request",
    "request.headers",
    "token",
    "token.claims",
    "token.claims.obj",
    "token.claims.deep",
    "{'a': 1}",
];
const ANY: &[&str] = &[
    "null",
    "token.claims.nul",
    // (A field the four variables do not have, `app.nope`, is refused when compiled.)
    "request.headers.nope",
    "token.claims.missing",
    "request.headers[':path']",
    "request.headers['X-A']",
    "b'a'",
    "token.claims.deep.k.k.k.k.k.k.k.k.k.k.k.k.k.k",
    "token.claims.deep.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k",
    "token.claims.deep.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k",
];
/// Keys of the maps above.
const KEYS: &[&str] = &[
    "'sub'",
    "'n'",
    "'arr'",
    "'x-a'",
    "'user-agent'",
    "'k'",
    "'a'",
    "'tier'",
    "'id'",
    "'method'",
    "'headers'",
    "'X-A'",
];

const FIELDS: &[&str] =
    &["id", "tier", "owner", "claims", "sub", "arr", "k", "a", "method", "headers", "accept", "nope"];
/// Comprehension variables; `app` shadows the variable.
const LOCALS: &[&str] = &["x", "y", "app"];

#[derive(Debug, Clone)]
enum G {
    Atom(&'static str),
    /// The k-th enclosing comprehension's variable (`null` when there is none).
    Local(usize),
    List(Vec<G>),
    Unary(&'static str, Box<G>),
    Binary(&'static str, Box<G>, Box<G>),
    Cond(Box<G>, Box<G>, Box<G>),
    Index(Box<G>, Box<G>),
    Select(Box<G>, &'static str),
    Has(Box<G>, &'static str),
    Text(&'static str, Box<G>, Box<G>),
    Size(bool, Box<G>),
    Macro(&'static str, &'static str, Box<G>, Box<G>),
    Map3(&'static str, Box<G>, Box<G>, Box<G>),
}

const BOOL: usize = 0;
const STR: usize = 1;
const NUM: usize = 2;
const LIST: usize = 3;
const MAP: usize = 4;
const ANYT: usize = 5;

type S = BoxedStrategy<G>;

fn atoms(table: &'static [&'static str]) -> S {
    select(table).prop_map(G::Atom).boxed()
}

fn b(s: &S) -> BoxedStrategy<Box<G>> {
    s.clone().prop_map(Box::new).boxed()
}

fn bin(ops: Vec<&'static str>, a: &S, c: &S) -> S {
    (select(ops), b(a), b(c)).prop_map(|(o, a, c)| G::Binary(o, a, c)).boxed()
}

fn text(fns: Vec<&'static str>, a: &S, c: &S) -> S {
    (select(fns), b(a), b(c)).prop_map(|(f, a, c)| G::Text(f, a, c)).boxed()
}

fn comprehension(kinds: Vec<&'static str>, range: &S, body: &S) -> S {
    (select(kinds), select(LOCALS), b(range), b(body)).prop_map(|(k, v, r, p)| G::Macro(k, v, r, p)).boxed()
}

/// A comprehension whose predicate is `x <op> n`, which fails on elements of another type.
fn on_element(kinds: Vec<&'static str>, range: &S, ops: Vec<&'static str>, n: &S) -> S {
    (select(kinds), select(LOCALS), b(range), select(ops), b(n))
        .prop_map(|(k, v, r, op, n)| G::Macro(k, v, r, Box::new(G::Binary(op, Box::new(G::Local(0)), n))))
        .boxed()
}

/// Expressions of each type, one level deeper than those of `l`.
fn deeper(l: &[S; 6]) -> [S; 6] {
    let any_of = || {
        prop_oneof![
            3 => l[BOOL].clone(),
            3 => l[STR].clone(),
            3 => l[NUM].clone(),
            2 => l[LIST].clone(),
            2 => l[MAP].clone(),
            1 => l[ANYT].clone(),
        ]
        .boxed()
    };
    let dynamic = any_of();
    let local = any::<usize>().prop_map(G::Local);
    let iterable = prop_oneof![3 => l[LIST].clone(), 1 => l[MAP].clone()].boxed();
    let (bools, strs, nums, lists, maps) = (&l[BOOL], &l[STR], &l[NUM], &l[LIST], &l[MAP]);
    let bool_ = prop_oneof![
        36 => bools.clone(),
        3 => bin(vec!["==", "!="], strs, strs),
        3 => bin(vec!["<", "<=", ">", ">=", "==", "!="], nums, nums),
        1 => bin(vec!["<", ">=", "==", "!="], strs, strs),
        3 => bin(vec!["in"], &dynamic, lists),
        2 => bin(vec!["in"], strs, maps),
        1 => bin(vec!["in"], &dynamic, maps),
        1 => bin(vec!["in"], nums, lists),
        2 => bin(vec!["==", "!="], &dynamic, &dynamic),
        4 => bin(vec!["&&", "||"], bools, bools),
        1 => bin(vec!["&&", "||"], &dynamic, bools),
        1 => bin(vec!["&&", "||"], bools, &dynamic),
        2 => b(bools).prop_map(|a| G::Unary("!", a)),
        1 => (b(bools), b(bools), b(bools)).prop_map(|(c, a, d)| G::Cond(c, a, d)),
        2 => (b(maps), select(FIELDS)).prop_map(|(a, f)| G::Has(a, f)),
        3 => text(vec!["contains", "startsWith", "endsWith"], strs, strs),
        1 => text(vec!["contains", "matches", "startsWith"], &dynamic, &dynamic),
        4 => comprehension(vec!["exists", "all", "exists_one"], &iterable, bools),
        3 => on_element(vec!["exists", "all", "exists_one"], &iterable, vec![">", "<=", "==", "!="], nums),
        1 => (select(vec!["exists", "all"]), select(LOCALS), b(&iterable), b(strs)).prop_map(|(k, v, r, t)| {
            G::Macro(k, v, r, Box::new(G::Text("startsWith", Box::new(G::Local(0)), t)))
        }),
        1 => local.clone(),
        1 => l[ANYT].clone(),
    ]
    .boxed();
    let str_ = prop_oneof![
        6 => strs.clone(),
        1 => bin(vec!["+"], strs, strs),
        1 => (b(bools), b(strs), b(strs)).prop_map(|(c, a, d)| G::Cond(c, a, d)),
        1 => (b(lists), b(nums)).prop_map(|(a, i)| G::Index(a, i)),
        1 => (b(maps), select(KEYS)).prop_map(|(a, k)| G::Index(a, Box::new(G::Atom(k)))),
        1 => local.clone(),
    ]
    .boxed();
    let num = prop_oneof![
        7 => nums.clone(),
        3 => bin(vec!["+", "-", "*", "/", "%"], nums, nums),
        1 => b(nums).prop_map(|a| G::Unary("-", a)),
        2 => (any::<bool>(), b(&dynamic)).prop_map(|(m, a)| G::Size(m, a)),
        1 => (any::<bool>(), b(strs)).prop_map(|(m, a)| G::Size(m, a)),
        1 => local.clone(),
    ]
    .boxed();
    let list = prop_oneof![
        8 => lists.clone(),
        2 => proptest::collection::vec(dynamic.clone(), 0..3).prop_map(G::List),
        1 => bin(vec!["+"], lists, lists),
        1 => bin(vec!["+"], lists, &dynamic),
        2 => comprehension(vec!["map", "filter"], &iterable, &dynamic),
        1 => (select(LOCALS), b(&iterable), b(bools), b(&dynamic)).prop_map(|(v, r, p, f)| G::Map3(v, r, p, f)),
        1 => local.clone(),
    ]
    .boxed();
    let map = prop_oneof![
        4 => maps.clone(),
        1 => (b(maps), select(FIELDS)).prop_map(|(a, f)| G::Select(a, f)),
        1 => (b(maps), select(KEYS)).prop_map(|(a, k)| G::Index(a, Box::new(G::Atom(k)))),
        1 => local.clone(),
    ]
    .boxed();
    let anything = prop_oneof![
        3 => l[ANYT].clone(),
        1 => any_of(),
        1 => (b(&dynamic), select(FIELDS)).prop_map(|(a, f)| G::Select(a, f)),
        1 => (b(&dynamic), b(&dynamic)).prop_map(|(a, i)| G::Index(a, i)),
        1 => bin(vec!["+", "-", "*", "/", "%", "<", "in", "&&", "||"], &dynamic, &dynamic),
        1 => (b(&dynamic), b(&dynamic), b(&dynamic)).prop_map(|(c, a, d)| G::Cond(c, a, d)),
        1 => (select(vec!["!", "-"]), b(&dynamic)).prop_map(|(o, a)| G::Unary(o, a)),
        1 => (b(&dynamic), select(FIELDS)).prop_map(|(a, f)| G::Has(a, f)),
        1 => comprehension(MACROS.to_vec(), &dynamic, &dynamic),
    ]
    .boxed();
    [bool_, str_, num, list, map, anything]
}

const MACROS: &[&str] = &["exists", "all", "exists_one", "map", "filter"];

/// Boolean expressions (mostly) up to four operators deep.
fn expr() -> S {
    let mut level = [atoms(BOOLS), atoms(STRS), atoms(NUMS), atoms(LISTS), atoms(MAPS), atoms(ANY)];
    for _ in 0..4 {
        level = deeper(&level);
    }
    level[BOOL].clone()
}

fn render(g: &G, scope: &mut Vec<&'static str>, out: &mut String) {
    let paren = |g: &G, scope: &mut Vec<&'static str>, out: &mut String| {
        out.push('(');
        render(g, scope, out);
        out.push(')');
    };
    match g {
        G::Atom(a) => out.push_str(a),
        G::Local(i) => match scope.len() {
            0 => out.push_str("null"),
            n => out.push_str(scope[i % n]),
        },
        G::List(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                render(item, scope, out);
            }
            out.push(']');
        }
        G::Unary(op, a) => {
            out.push_str(op);
            paren(a, scope, out);
        }
        G::Binary(op, a, b) => {
            paren(a, scope, out);
            out.push_str(&format!(" {op} "));
            paren(b, scope, out);
        }
        G::Cond(c, a, b) => {
            paren(c, scope, out);
            out.push_str(" ? ");
            paren(a, scope, out);
            out.push_str(" : ");
            paren(b, scope, out);
        }
        G::Index(a, i) => {
            paren(a, scope, out);
            out.push('[');
            render(i, scope, out);
            out.push(']');
        }
        G::Select(a, f) => {
            paren(a, scope, out);
            out.push('.');
            out.push_str(f);
        }
        G::Has(a, f) => {
            out.push_str("has(");
            paren(a, scope, out);
            out.push('.');
            out.push_str(f);
            out.push(')');
        }
        G::Text(f, a, b) => {
            paren(a, scope, out);
            out.push('.');
            out.push_str(f);
            out.push('(');
            render(b, scope, out);
            out.push(')');
        }
        G::Size(member, a) => {
            if *member {
                paren(a, scope, out);
                out.push_str(".size()");
            } else {
                out.push_str("size(");
                render(a, scope, out);
                out.push(')');
            }
        }
        G::Macro(kind, var, range, body) => {
            paren(range, scope, out);
            out.push_str(&format!(".{kind}({var}, "));
            scope.push(var);
            render(body, scope, out);
            scope.pop();
            out.push(')');
        }
        G::Map3(var, range, p, f) => {
            paren(range, scope, out);
            out.push_str(&format!(".map({var}, "));
            scope.push(var);
            render(p, scope, out);
            out.push_str(", ");
            render(f, scope, out);
            scope.pop();
            out.push(')');
        }
    }
}

fn source(g: &G) -> String {
    let mut out = String::new();
    render(g, &mut Vec::new(), &mut out);
    out
}

// === The comparison ===

/// What a run covered.
#[derive(Debug, Default)]
struct Tally {
    compiled: usize,
    fast_expressions: usize,
    values: usize,
    errors: usize,
    deferred: usize,
}

fn outcome(r: &Result<bool, String>) -> Result<bool, ()> {
    r.clone().map_err(|_| ())
}

/// Evaluates `expr` on both paths for `world`, failing with both results when they differ.
fn check(cel: &Cel, src: &str, expr: &Expression, world: &World, tally: &mut Tally) -> Result<(), TestCaseError> {
    let input = world.input();
    let interpreted = cel.eval(expr, &cel.scope(input.vars(USES_ALL)));
    if expr.path() != Path::Fast {
        return Ok(());
    }
    let Some(fast) = cel.eval_fast(expr, &input) else {
        // Deferred to the interpreter (an order the interpreter's hash map decides).
        tally.deferred += 1;
        return Ok(());
    };
    match &fast {
        Ok(_) => tally.values += 1,
        Err(_) => tally.errors += 1,
    }
    if std::env::var_os("CEL_DIFF_SHOW").is_some() {
        eprintln!("{src}  =>  {fast:?}");
    }
    prop_assert_eq!(
        outcome(&fast),
        outcome(&interpreted),
        "`{}`\nfast: {:?}\ninterpreter: {:?}\nworld: {:#?}",
        src,
        fast,
        interpreted,
        world
    );
    // The evaluation `decide()` runs gives the fast result too, without the interpreter.
    let mut evaluation = cel.evaluation(input);
    prop_assert_eq!(evaluation.eval(expr), fast, "`{}`: Evaluation::eval differs from the fast path", src);
    prop_assert!(!evaluation.interpreted(), "`{}` evaluated fast, yet built the interpreter's scope", src);
    Ok(())
}

/// Random expressions, each on four random worlds (3000 cases unless `PROPTEST_CASES` says).
#[test]
fn fast_path_matches_the_interpreter() {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 3000;
    }
    let cases = config.cases as usize;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let result = runner.run(&(expr(), proptest::collection::vec(world(), 4)), |(g, worlds)| {
        let cel = Cel::default();
        let src = source(&g);
        let Ok(expr) = cel.compile(&src) else { return Ok(()) };
        let mut tally = tally.borrow_mut();
        tally.compiled += 1;
        if expr.path() == Path::Fast {
            tally.fast_expressions += 1;
        }
        for world in &worlds {
            check(&cel, &src, &expr, world, &mut tally)?;
        }
        Ok(())
    });
    let tally = tally.into_inner();
    eprintln!("{cases} cases: {tally:?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    // A floor, so that a generator that stops producing what the fast path evaluates fails loudly.
    assert!(tally.compiled * 2 > cases, "too few expressions compile: {tally:?}");
    assert!(tally.fast_expressions * 2 > tally.compiled, "too few take the fast path: {tally:?}");
    assert!(tally.values * 10 > tally.values + tally.errors && tally.errors * 2 > tally.values, "{tally:?}");
}

/// Hand-picked cases: the corners of the `cel` crate's semantics, each on several worlds.
#[test]
fn fast_path_matches_the_interpreter_on_corner_cases() {
    let cases = [
        // `||` / `&&`: errors and non-bools on one side absorbed by the settling value on the other
        "1 || true",
        "true || 1",
        "false || 1",
        "1 || false",
        "1 && false",
        "false && 1",
        "true && 1",
        "request.headers.nope || true",
        "true || request.headers.nope",
        "request.headers.nope && false",
        "request.headers.nope || request.headers.nope",
        "!(request.method in ['GET', 'HEAD', 'POST']) && app.tier == 'sandbox'",
        "token != null && token.claims.sub == 'blocked-subject'",
        "token.claims.sub == 'blocked-subject' && token != null",
        // numbers
        "1 == 1u",
        "1 == 1.0",
        "-1 < 0u",
        "18446744073709551615u > 9223372036854775807",
        "9223372036854775807 == 9223372036854775806.0",
        "0.0 / 0.0 == 0.0 / 0.0",
        "0.0 / 0.0 != 0.0 / 0.0",
        "0.0 / 0.0 < 1.0",
        "1 / 0 == 0",
        "1 % 0 == 0",
        "1.5 % 1.0 == 0.5",
        "9223372036854775807 + 1 > 0",
        "-(-9223372036854775807 - 1) > 0",
        "0u - 1u > 0u",
        "1 + 1u == 2",
        "-(1u) == 1",
        "1.0 / 0.0 > 1e308",
        "true > false",
        "null < null",
        "'a' < 'b'",
        "'é' > 'z'",
        // equality across types never errors
        "null == false",
        "[1, 2] == [1u, 2.0]",
        "[1] == [1, 2]",
        "request.headers == request.headers",
        "token.claims == token.claims",
        "app == app",
        "app == dataset",
        "token.claims.obj == {'k': 1}",
        // in
        "null in token.claims",
        "1 in token.claims",
        "'sub' in token.claims",
        "1 in [1u]",
        "1 in 'abc'",
        "'X-A' in request.headers",
        "'x-a' in request.headers",
        "':path' in request.headers",
        "'tier' in app",
        "[1] in request.headers",
        // indexing and fields
        "request.headers['x-a'] == 'a'",
        "request.headers['x-a'] == 'a,a'",
        "request.headers['X-A'] == 'a'",
        "[1, 2][1] == 2",
        "[1, 2][1u] == 2",
        "[1, 2][1.0] == 2",
        "[1, 2][1.5] == 2",
        "[1, 2][-1] == 2",
        "[1, 2][2] == 2",
        "token.claims.arr[0] == null",
        "token.claims['n'] == 1",
        "app.data_classes[0] == 'internal'",
        "dataset.classification == 'internal'",
        "dataset == null",
        "token.claims.nope == null",
        "app.owner == null",
        "token.claims.deep.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k == null",
        "token.claims.deep.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k == null",
        "token.claims.big > 0",
        "token.claims.big == 18446744073709551615u",
        "'a'.b == 1",
        // has
        "has(app.owner)",
        "has(token.claims.nope)",
        "has(token.claims.sub)",
        "has(token.claims.nul)",
        "has(request.headers.k)",
        "has(token.claims.arr.k)",
        "has(dataset.id)",
        // size and strings
        "size('é') == 1",
        "'é'.size() == 1",
        "size(app.connectors) == 0",
        "size(request.headers) > 0",
        "size(token.claims) > 0",
        "size(1) == 1",
        "size(app) == 10",
        "request.path.endsWith('/export')",
        "request.path.contains(1)",
        "app.connectors.contains('upstream')",
        "request.host.endsWith('.internal')",
        "request.host == 'api.example'",
        "'a' + 'b' == 'ab'",
        "'a' + 1 == 'a1'",
        "[1] + [2] == [1, 2]",
        "app.connectors + app.data_classes == []",
        "[1] + token.claims == []",
        // ternary
        "1 ? true : false",
        "request.method == 'GET' ? true : request.headers.nope",
        // macros
        "request.headers.exists(k, k == 'x-a')",
        "request.headers.exists(k, request.headers[k] == 'a')",
        "request.headers.all(k, k.startsWith('x'))",
        "request.headers.exists_one(k, k == 'x-a')",
        "token.claims.exists(k, token.claims[k] == 1)",
        "token.claims.all(k, token.claims[k] > 0)",
        "token.claims.exists(k, token.claims[k] > 0)",
        "[1, 'a', 2].exists(x, x > 1)",
        "[1, 'a', 2].all(x, x > 0)",
        "[1, 'a', 0].all(x, x > 0)",
        "[1, 2].exists_one(x, x > 1)",
        "[1, 'a'].exists_one(x, x > 0)",
        "[1, 2].map(x, x * 2) == [2, 4]",
        "[1, 2].map(x, x > 1, x * 2) == [4]",
        "[1, 2].filter(x, x > 1) == [2]",
        "[1, 'a'].filter(x, x > 1) == [2]",
        "request.headers.map(k, k).size() >= 0",
        "app.data_classes.exists(app, app == 'internal')",
        "[1, 2].exists(x, [3].exists(y, x + y == 5))",
        "[1, 2].all(x, [x].exists(x, x == 2))",
        "1.exists(x, true)",
        "null.all(x, true)",
        "x == 1 || [1].exists(x, true)",
    ];
    let worlds: Vec<World> = {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = world();
        (0..64).map(|_| strategy.new_tree(&mut runner).unwrap().current()).collect()
    };
    let cel = Cel::default();
    // Neither path sees what cannot evaluate at all: it is refused when compiled.
    for src in ["request.nope || true", "app.nope == null", "has(app.nope)", "token.nope == 1", "foo(1) || true"] {
        assert!(cel.compile(src).is_err(), "{src} compiled");
    }
    let mut fast = 0;
    for src in cases {
        let expr = cel.compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        if expr.path() == Path::Fast {
            fast += 1;
        }
        for world in &worlds {
            if let Err(e) = check(&cel, src, &expr, world, &mut Tally::default()) {
                panic!("{e}");
            }
        }
    }
    assert!(fast > cases.len() * 9 / 10, "only {fast} of {} corner cases take the fast path", cases.len());
}

/// The rule shapes of the benchmark (`bench/policy_gen.py`, `bench/decide/src/main.rs`) take the fast
/// path, and evaluating them never builds the interpreter's scope.
#[test]
fn benchmark_rule_shapes_take_the_fast_path() {
    let shapes = [
        "request.method == 'DELETE'",
        "'x-debug' in request.headers",
        "!(request.method in ['GET', 'HEAD', 'POST']) && app.tier == 'sandbox'",
        "token != null && token.claims.sub == 'blocked-subject'",
        "request.path.endsWith('/export') && app.environment != 'prod'",
        "app.region != 'eu-west-1' && dataset.classification == 'internal'",
        "app.department == dataset.owner_department || app.tier == 'standard'",
        "request.method == 'DELETE' && dataset.classification != 'public'",
        "app.lifecycle == 'published' || app.lifecycle == 'approved'",
        "'user-agent' in request.headers && request.headers['user-agent'].startsWith('sqlmap')",
        "!(app.region in dataset.allowed_regions)",
        "dataset.classification in app.data_classes && app.environment in ['prod', 'test']",
        "request.path.contains('/admin/') && app.department != 'engineering'",
        "size(app.connectors) == 0 || request.host.endsWith('.internal')",
    ];
    let cel = Cel::default();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = world();
    let worlds: Vec<World> = (0..64).map(|_| strategy.new_tree(&mut runner).unwrap().current()).collect();
    for src in shapes {
        let expr = cel.compile(src).unwrap();
        assert_eq!(expr.path(), Path::Fast, "{src}");
        for world in &worlds {
            let mut evaluation = cel.evaluation(world.input());
            let _ = evaluation.eval(&expr);
            assert!(!evaluation.interpreted(), "{src} built the interpreter's scope");
            check(&cel, src, &expr, world, &mut Tally::default()).unwrap();
        }
    }
}
