//! Policies from files: YAML or JSON, with `file:line: path: message` errors.
//!
//! A JSON document (text that parses as one JSON object) is read with `serde_json` directly: the
//! companion reads every change of a large policy file, and the YAML reader is ten times slower
//! on it. YAML, and text that is not a complete JSON document, goes through `serde_yaml_ng` and
//! `serde_path_to_error`, so a typo, a wrong type or an unknown enum value is reported with its
//! field path and the line it is on. Either way what is compiled holds exactly the values of the
//! JSON the filter receives ([`Document::canonical`]). Errors carry a field path
//! (`apps[2].tier`); only when there are errors is the text indexed ([`locate`], with
//! `yaml-rust2`'s event parser, which marks every event and reads JSON too) to find their lines.
//!
//! Only the companion (`guardrail check`, `serve`, `export`) uses this module: the filter reads
//! JSON and builds `guardrail-core` without the `yaml` feature.
//!
//! ```
//! use guardrail_core::source::load_str;
//!
//! let text = "apiVersion: guardrail/v1\nkind: Policy\nunknown: 1\n";
//! let errors = load_str(text).unwrap_err();
//! assert_eq!(errors.0[0].line, Some(3));
//! ```

use crate::compile::{bare_message, compile_with, parse_json_str, CompiledPolicy, JsonError};
use crate::error::{PolicyError, PolicyErrors};
use crate::lint::{lint, Warning};
use crate::raw::RawPolicy;
use crate::rules::ExpressionCache;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

// === Parsing ===

/// Parses a policy document (YAML, or JSON read as YAML) into its raw form.
///
/// Errors name the field (`apps[1]`, `apps[0].lifecycle`) and the line. A key written twice in one
/// mapping is an error too: YAML parsers otherwise keep one of the two silently.
pub fn parse_document(text: &str) -> Result<RawPolicy, PolicyErrors> {
    let index = LineIndex::build(text);
    if let Some(line) = index.second_document {
        let message = "a second YAML document starts here; a policy file holds exactly one";
        return Err(PolicyErrors::from(PolicyError { path: String::new(), message: message.into(), line: Some(line) }));
    }
    if !index.duplicates.is_empty() {
        return Err(duplicate_errors(&index));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let reached = clean_path(&e.path().to_string());
        let inner = e.into_inner();
        let (path, message) = yaml_error(&inner, &reached);
        // Parsing moves forward, so the later of the node reached and the error's own location is
        // the more precise: `serde_yaml_ng` marks some errors (an untagged enum's) at the
        // enclosing mapping, and a syntax error past the node reached.
        let reached_line = index.lines.get(&reached).copied();
        let line = reached_line.max(inner.location().map(|l| l.line())).or_else(|| index.line_of(&path));
        syntax_error(text, inner.location()).unwrap_or_else(|| PolicyErrors::from(PolicyError { path, message, line }))
    })
}

/// The syntax error of `text`, if it has one that explains a failed read better than the error
/// the reader met (`met`, where it met it): the YAML reader is lazy, so a mis-indented key
/// (`environment:` one space left of the app's other keys) first ends the app's mapping, and the
/// app is reported as missing the key, before the reader reaches the line that breaks. A key
/// that lines up with no mapping above it is said to be mis-indented, at its line.
fn syntax_error(text: &str, met: Option<serde_yaml_ng::Location>) -> Option<PolicyErrors> {
    let e = serde_yaml_ng::from_str::<de::IgnoredAny>(text).err()?;
    let at = e.location()?;
    let line = Some(at.line());
    if let Some(message) = misindented(text, at.line()) {
        return Some(PolicyErrors::from(PolicyError { path: String::new(), message, line }));
    }
    if met.is_some_and(|m| (m.line(), m.column()) == (at.line(), at.column())) {
        return None;
    }
    let (path, message) = yaml_error(&e, "");
    Some(PolicyErrors::from(PolicyError { path, message, line }))
}

/// `indentation: …` when line `line` (1-based) of a block YAML `text` is a mapping key that lines
/// up with none of the mappings above it, naming the nearest key above and its indentation.
fn misindented(text: &str, line: usize) -> Option<String> {
    if text.trim_start().starts_with(['{', '[']) {
        return None;
    }
    let lines: Vec<&str> = text.lines().collect();
    let (column, key) = block_key(lines.get(line.checked_sub(1)?)?)?;
    // The keys of the mappings still open above it: going up, each one left of the last.
    let mut open: Vec<(usize, &str, usize)> = Vec::new();
    for (i, text) in lines.get(..line - 1)?.iter().enumerate().rev() {
        let Some((c, k)) = block_key(text) else { continue };
        if open.last().is_none_or(|&(last, ..)| c < last) {
            open.push((c, k, i + 1));
        }
        if c == 0 {
            break;
        }
    }
    if open.iter().any(|&(c, ..)| c == column) {
        return None;
    }
    let &(near, near_key, near_line) = open.first()?;
    let spaces = |n: usize| format!("{n} space{}", if n == 1 { "" } else { "s" });
    Some(format!(
        "indentation: `{key}` is indented {}, and `{near_key}` above it (line {near_line}) {}: the keys of one \
         mapping line up, so `{key}` belongs to no mapping here",
        spaces(column),
        spaces(near)
    ))
}

/// The column and name of the key a block YAML line starts (after any `- ` of sequence items),
/// e.g. `(4, "tier")` for `  - tier: s`; `None` for other lines (comments, items, flow text).
fn block_key(line: &str) -> Option<(usize, &str)> {
    let mut rest = line.trim_start_matches(' ');
    while let Some(after) = rest.strip_prefix('-').filter(|a| a.starts_with(' ')) {
        rest = after.trim_start_matches(' ');
    }
    let column = line.len() - rest.len();
    let (key, after) = match rest.as_bytes().first()? {
        q @ (b'"' | b'\'') => {
            let end = rest.get(1..)?.find(char::from(*q))? + 1;
            (rest.get(1..end)?, rest.get(end + 1..)?)
        }
        _ => {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')))?;
            (rest.get(..end)?, rest.get(end..)?)
        }
    };
    let after = after.trim_start_matches(' ');
    let is_key = !key.is_empty() && (after == ":" || after.starts_with(": ") || after.starts_with(":\t"));
    is_key.then_some((column, key))
}

/// The document as a JSON value: what `guardrail export` prints and the filter reads.
pub fn to_json_value(text: &str) -> Result<serde_json::Value, PolicyErrors> {
    serde_yaml_ng::from_str::<serde_json::Value>(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let (path, message) = yaml_error(&e, "");
        PolicyErrors::from(PolicyError { path, message, line })
    })
}

/// Parses and compiles a policy document; every error carries the line of its field when known.
pub fn load_str(text: &str) -> Result<CompiledPolicy, PolicyErrors> {
    load_document(text).map(|d| d.policy)
}

/// A validated policy together with the document it came from, as JSON.
#[derive(Debug)]
pub struct Document {
    /// The document as written, converted to JSON (for the filter's plugin configuration).
    pub json: Value,
    /// `json` as compact JSON (object keys sorted): what the companion pushes (with its `revision`
    /// replaced by the label it serves it under). `policy` was compiled from it (YAML) or from the
    /// JSON text it was made from, which holds the same values under the same keys.
    pub canonical: String,
    pub policy: CompiledPolicy,
}

/// Parses and compiles a policy document (JSON or YAML), keeping its JSON form: what was validated
/// is what the filter gets.
pub fn load_document(text: &str) -> Result<Document, PolicyErrors> {
    let expressions = &mut ExpressionCache::default();
    load_json_document(text, expressions).unwrap_or_else(|| load_yaml_document(text, expressions))
}

/// Reads a JSON document with `serde_json`. `None` when the text is not one complete JSON value:
/// YAML, a JSON file with a syntax error, or one caught half-written (a JSON text ends with the
/// `}` that closes it, so no prefix of a document parses). Such text is for
/// [`load_yaml_document`], whose errors name the line. A key written twice in one object is an
/// error (serde_json would keep the last silently).
/// `expressions` holds the rules' expressions of the previous load (see [`ExpressionCache`]).
pub fn load_json_document(text: &str, expressions: &mut ExpressionCache) -> Option<Result<Document, PolicyErrors>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    // The JSON tree (for the canonical form) and the policy are read from the text side by side:
    // the companion validates every change of a large file while the gateways wait for it. A JSON
    // text and its canonical form hold the same values under the same keys, so they compile alike.
    let (tree, policy) = std::thread::scope(|scope| {
        let tree = std::thread::Builder::new().spawn_scoped(scope, || json_tree(text));
        let policy = compile_json_text(text, expressions);
        let tree = match tree {
            Ok(handle) => handle.join().unwrap_or_else(|_| json_tree(text)),
            Err(_) => json_tree(text),
        };
        (tree, policy)
    });
    let (json, canonical) = match tree {
        Ok(tree) => tree,
        // The only data error the reader raises: located by the full index, which sees them all.
        Err(e) if e.is_data() => return Some(Err(duplicate_keys(text, &e))),
        Err(_) => return None,
    };
    Some(policy.map(|policy| Document { json, canonical, policy }))
}

/// The JSON tree of `text` (refusing duplicate keys) and its compact form.
fn json_tree(text: &str) -> Result<(Value, String), serde_json::Error> {
    let Unique(json) = serde_json::from_str(text)?;
    let canonical = serde_json::to_string(&json)?;
    Ok((json, canonical))
}

/// Compiles JSON text; errors get their lines in it.
fn compile_json_text(text: &str, expressions: &mut ExpressionCache) -> Result<CompiledPolicy, PolicyErrors> {
    let raw = parse_json_str(text).map_err(|e| located(text, &e))?;
    compile_with(raw, expressions).map_err(|errors| with_lines(text, errors))
}

/// Reads a YAML document (or JSON read as YAML) with located errors.
pub fn load_yaml_document(text: &str, expressions: &mut ExpressionCache) -> Result<Document, PolicyErrors> {
    parse_document(text)?;
    let json = to_json_value(text)?;
    compile_json_form(text, json, expressions)
}

/// Compiles the JSON form of `text`; errors get their lines in `text`.
fn compile_json_form(text: &str, json: Value, expressions: &mut ExpressionCache) -> Result<Document, PolicyErrors> {
    let canonical = serde_json::to_string(&json)
        .map_err(|e| PolicyErrors::from(PolicyError::new("", format!("cannot encode the policy as JSON: {e}"))))?;
    let raw = parse_json_str(&canonical).map_err(|e| located(text, &e))?;
    let policy = compile_with(raw, expressions).map_err(|errors| with_lines(text, errors))?;
    Ok(Document { json, canonical, policy })
}

/// A parse error of the JSON form, with its path as the YAML reader reports it and its line in
/// `text` (`text` and the JSON form have the same field paths, not the same lines).
fn located(text: &str, e: &JsonError) -> PolicyErrors {
    let (path, message) = split_message(bare_message(&e.error), &e.path);
    let message = in_document_terms(&message);
    let index = LineIndex::build(text);
    let line = index.lines.get(&e.path).copied().or_else(|| index.line_of(&path));
    PolicyErrors::from(PolicyError { path, message, line })
}

/// The duplicate keys of a JSON text that [`Unique`] refused, with their lines.
fn duplicate_keys(text: &str, e: &serde_json::Error) -> PolicyErrors {
    let index = LineIndex::build(text);
    if index.duplicates.is_empty() {
        // Not expected (both readers unescape keys alike); still an error, where serde_json saw it.
        return PolicyErrors::from(PolicyError { path: String::new(), message: bare_message(e), line: Some(e.line()) });
    }
    duplicate_errors(&index)
}

fn duplicate_errors(index: &LineIndex) -> PolicyErrors {
    PolicyErrors(
        index
            .duplicates
            .iter()
            .map(|d| PolicyError {
                path: d.path.clone(),
                message: format!("duplicate key `{}` (first written on line {})", d.key, d.first_line),
                line: Some(d.line),
            })
            .collect(),
    )
}

/// A JSON value whose objects have no key twice.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor).map(Unique)
    }
}

/// Builds a [`Value`] as serde_json's own visitor does, refusing duplicate keys.
struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Unique::deserialize(deserializer).map(|u| u.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Unique(value) = map.next_value()?;
            match object.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(first) => {
                    return Err(de::Error::custom(format_args!("duplicate key `{}`", first.key())));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// Fills in the line of every error that has none, from its field path.
pub fn with_lines(text: &str, mut errors: PolicyErrors) -> PolicyErrors {
    let index = LineIndex::build(text);
    for e in &mut errors.0 {
        if e.line.is_none() {
            e.line = index.line_of(&e.path);
        }
    }
    errors
}

/// The warnings of a valid policy ([`crate::lint::lint`] at `now_secs`), each with the line of its
/// field in `text`, the document `policy` was compiled from, in the order of their lines.
pub fn lint_text(text: &str, policy: &CompiledPolicy, now_secs: i64) -> Vec<Warning> {
    let index = LineIndex::build(text);
    let mut warnings = lint(policy, now_secs);
    for w in &mut warnings {
        w.line = w.line.or_else(|| index.line_of(&w.path));
    }
    // In the order of the file (those without a line last).
    warnings.sort_by_key(|w| w.line.unwrap_or(usize::MAX));
    warnings
}

/// serde_path_to_error writes `.` for the document itself; errors use the empty path there.
fn clean_path(path: &str) -> String {
    if path == "." {
        String::new()
    } else {
        path.to_string()
    }
}

/// Splits a `serde_yaml_ng` error into the path it is about and its bare message, without the
/// position (` at line L column C`, reported as the line).
///
/// `serde_yaml_ng` prefixes the message with the path of the node it attached the error to (for an
/// unknown field, the mapping holding it: `apps[1]`); `serde_path_to_error` gives the path reached
/// (`apps[1].tierr`). The first is what the message is about, so it wins when present.
fn yaml_error(e: &serde_yaml_ng::Error, reached: &str) -> (String, String) {
    let mut text = e.to_string();
    if let Some(loc) = e.location() {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = text.find(&at) {
            text.replace_range(i..i + at.len(), "");
        }
    }
    let (path, message) = split_message(text, reached);
    (path, in_document_terms(&message))
}

/// The path an error message (without position) is about, and the message without that path: a
/// prefix naming a path (`serde_yaml_ng` writes one) wins over the path reached, and an unknown
/// field is about the mapping holding it.
fn split_message(text: String, reached: &str) -> (String, String) {
    let mut candidate = Some(reached);
    while let Some(path) = candidate.filter(|p| !p.is_empty()) {
        if let Some(rest) = text.strip_prefix(path).and_then(|r| r.strip_prefix(": ")) {
            return (path.to_string(), rest.to_string());
        }
        candidate = parent_path(path);
    }
    // At the top level there is no prefix; an unknown field is still about its mapping.
    if let Some(parent) = parent_path(reached) {
        let field = reached[parent.len()..].trim_start_matches('.');
        if text.starts_with(&format!("unknown field `{field}`")) {
            return (parent.to_string(), text);
        }
    }
    (reached.to_string(), text)
}

/// A serde message in the terms of the document, not of the Rust types that read it: any
/// `struct Name` is `a mapping` (and `enum Name` `a string`), an integer type `a whole number`
/// (with its range when the integer is outside it), `f32`/`f64` `a number`, a sequence `a list`,
/// a map `a mapping`, a unit value `null`; serde_json's bare `expected value` (an enum's name
/// that is not a string) `expected a string`. Every message of the companion's readers (YAML,
/// JSON files, case files) goes through here, so no type needs its own wording. (The filter keeps
/// serde's words: what it reads was checked by the companion or `guardrail export`, and the
/// module has no room to spare; see README "Performance".)
pub fn in_document_terms(message: &str) -> String {
    if message == "expected value" {
        return "expected a string".into();
    }
    if let Some(text) = out_of_range(message) {
        return text;
    }
    let mut text = message.to_string();
    for (from, to) in [
        ("expected a sequence", "expected a list"),
        ("invalid type: sequence", "invalid type: list"),
        ("expected a map", "expected a mapping"),
        ("invalid type: map", "invalid type: mapping"),
        ("unit value", "null"),
    ] {
        if let Some(i) = text.find(from) {
            let end = i + from.len();
            if !text.get(end..).is_some_and(|r| r.starts_with(|c: char| c.is_ascii_alphanumeric())) {
                text.replace_range(i..end, to);
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("expected ") {
        let (head, tail) = rest.split_at(i + "expected ".len());
        out.push_str(head);
        let (word, after) = split_word(tail);
        let (replacement, after) = match word {
            "struct" | "enum" => match after.strip_prefix(' ').map(split_word) {
                Some((name, after)) if !name.is_empty() => {
                    (Some(if word == "struct" { "a mapping" } else { "a string" }), after)
                }
                _ => (None, tail),
            },
            "f32" | "f64" => (Some("a number"), after),
            w if int_range(w).is_some() => (Some("a whole number"), after),
            _ => (None, tail),
        };
        out.push_str(replacement.unwrap_or(""));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `word` of `text` (letters, digits, `_`) and what follows it.
fn split_word(text: &str) -> (&str, &str) {
    text.split_at(text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len()))
}

/// The values of an integer type, by its name.
fn int_range(name: &str) -> Option<(i128, i128)> {
    Some(match name {
        "i8" => (i8::MIN.into(), i8::MAX.into()),
        "i16" => (i16::MIN.into(), i16::MAX.into()),
        "i32" => (i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => (i64::MIN.into(), i64::MAX.into()),
        "u8" => (0, u8::MAX.into()),
        "u16" => (0, u16::MAX.into()),
        "u32" => (0, u32::MAX.into()),
        "u64" | "usize" => (0, u64::MAX.into()),
        _ => return None,
    })
}

/// `invalid value: integer `N`, expected i64` (or `integer `N` as u128`): a whole number, but
/// outside what the field holds.
fn out_of_range(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid value: ").or_else(|| message.strip_prefix("invalid type: "))?;
    let (number, rest) = rest.strip_prefix("integer `")?.split_once('`')?;
    let rest = rest.strip_prefix(" as u128").or_else(|| rest.strip_prefix(" as i128")).unwrap_or(rest);
    let (min, max) = int_range(rest.strip_prefix(", expected ")?)?;
    Some(format!("integer `{number}` is out of range: expected a whole number from {min} to {max}"))
}

// === Locating field paths ===

/// The 1-based line of the node at `path` (`apps[2].quota_overrides[0].expires_at`,
/// `tiers.sandbox.rate.requests`, `settings.identity.jwt[0].jwks.keys[1]`) in a YAML or JSON text:
/// for a mapping entry the line of its key, for a sequence item the line where the item starts.
/// When the path is not in the text (a field left out), the line of its longest present prefix.
/// The empty path is the document. `None` when not even the document can be found.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    LineIndex::build(text).line_of(path)
}

/// Line of every node of a document, by field path.
#[derive(Debug, Default)]
struct LineIndex {
    lines: HashMap<String, usize>,
    duplicates: Vec<Duplicate>,
    /// Line where a second YAML document starts, if any (a policy file holds one).
    second_document: Option<usize>,
}

#[derive(Debug)]
struct Duplicate {
    path: String,
    key: String,
    line: usize,
    first_line: usize,
}

impl LineIndex {
    /// Indexes the first document of `text`. A syntax error stops the walk; what was seen before
    /// it stays indexed (the syntax error itself is reported by the YAML deserializer).
    fn build(text: &str) -> Self {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        // Ignoring the error is deliberate: see above.
        let _ = parser.load(&mut walker, true);
        walker.index
    }

    fn line_of(&self, path: &str) -> Option<usize> {
        let mut current = path;
        loop {
            if let Some(&line) = self.lines.get(current) {
                return Some(line);
            }
            current = parent_path(current)?;
        }
    }
}

/// `a.b[2]` → `a.b`, `a[1].b` → `a[1]`, `a` → `` (the document), `` → none.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        if let Some(i) = path.rfind('[') {
            return Some(&path[..i]);
        }
    }
    Some(path.rfind('.').map_or("", |i| &path[..i]))
}

/// Walks parser events with a stack of open mappings and sequences, recording the line of each
/// node's path.
#[derive(Debug, Default)]
struct Walker {
    index: LineIndex,
    stack: Vec<Frame>,
    /// Set once the first document is complete; later documents are not indexed.
    done: bool,
}

#[derive(Debug)]
enum Frame {
    Mapping {
        path: String,
        next: Expect,
        /// Keys seen so far with their lines, to report duplicates.
        seen: HashMap<String, usize>,
    },
    Sequence {
        path: String,
        next: usize,
    },
    /// A mapping or sequence used as a mapping key (legal YAML, never a policy field), or the
    /// value of such a key: not indexed. `depth` counts the open collections inside it.
    Skipped {
        depth: usize,
    },
}

/// What a mapping expects next.
#[derive(Debug)]
enum Expect {
    Key,
    Value(String),
    SkippedValue,
}

/// Where a node that starts now belongs.
enum Slot {
    /// A node with this path.
    Node(String),
    /// A mapping key (already recorded) or a node that is not indexed.
    Other,
}

impl Walker {
    fn record(&mut self, path: &str, line: usize) {
        self.index.lines.entry(path.to_string()).or_insert(line);
    }

    /// Decides where a starting node belongs, updating the enclosing frame. `scalar` is the text of
    /// a scalar node, `None` for collections and aliases.
    fn slot(&mut self, mark: Marker, scalar: Option<&str>) -> Slot {
        let Some(frame) = self.stack.last_mut() else {
            return Slot::Node(String::new());
        };
        match frame {
            Frame::Skipped { .. } => Slot::Other,
            Frame::Sequence { path, next } => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Slot::Node(p)
            }
            Frame::Mapping { path, next, seen } => match std::mem::replace(next, Expect::Key) {
                Expect::Value(key) => Slot::Node(join(path, &key)),
                Expect::SkippedValue => Slot::Other,
                Expect::Key => {
                    let Some(key) = scalar else {
                        *next = Expect::SkippedValue;
                        return Slot::Other;
                    };
                    let line = mark.line();
                    match seen.get(key) {
                        Some(&first_line) => self.index.duplicates.push(Duplicate {
                            path: path.clone(),
                            key: key.to_string(),
                            line,
                            first_line,
                        }),
                        None => {
                            seen.insert(key.to_string(), line);
                        }
                    }
                    let full = join(path, key);
                    *next = Expect::Value(key.to_string());
                    self.index.lines.entry(full).or_insert(line);
                    Slot::Other
                }
            },
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.done {
            if matches!(ev, Event::DocumentStart) && self.index.second_document.is_none() {
                self.index.second_document = Some(mark.line());
            }
            return;
        }
        match ev {
            Event::Scalar(value, ..) => {
                if let Slot::Node(path) = self.slot(mark, Some(&value)) {
                    self.record(&path, mark.line());
                }
            }
            Event::Alias(_) => {
                if let Slot::Node(path) = self.slot(mark, None) {
                    self.record(&path, mark.line());
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_mapping = matches!(ev, Event::MappingStart(..));
                match self.slot(mark, None) {
                    Slot::Node(path) => {
                        self.record(&path, mark.line());
                        self.stack.push(if is_mapping {
                            Frame::Mapping { path, next: Expect::Key, seen: HashMap::new() }
                        } else {
                            Frame::Sequence { path, next: 0 }
                        });
                    }
                    Slot::Other => match self.stack.last_mut() {
                        Some(Frame::Skipped { depth }) => *depth += 1,
                        _ => self.stack.push(Frame::Skipped { depth: 1 }),
                    },
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(Frame::Skipped { depth }) = self.stack.last_mut() {
                    *depth -= 1;
                    if *depth > 0 {
                        return;
                    }
                }
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
        }
    }
}

// === Files ===

/// Everything wrong with one policy file; displays as one `file:line: path: message` per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileErrors {
    pub file: PathBuf,
    pub errors: Vec<PolicyError>,
}

impl FileErrors {
    fn one(file: &Path, message: impl Into<String>) -> Self {
        FileErrors { file: file.to_path_buf(), errors: vec![PolicyError::new("", message)] }
    }

    /// One display line per error: `file:line: path: message`, `file: path: message` without a
    /// line, `file:line: message` for an error about the whole document.
    pub fn lines(&self) -> Vec<String> {
        let file = self.file.display();
        self.errors
            .iter()
            .map(|e| match e.line {
                Some(line) => format!("{file}:{line}: {e}"),
                None => format!("{file}: {e}"),
            })
            .collect()
    }
}

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

impl std::error::Error for FileErrors {}

/// Reads a policy (or case) file as UTF-8 text, without the byte order mark some editors on
/// Windows write first (YAML and JSON readers would take it as part of the first key); failures
/// name the file.
pub fn read_file(path: &Path) -> Result<String, FileErrors> {
    if path.is_dir() {
        return Err(FileErrors::one(path, "is a directory; expected a policy file (.yaml, .yml or .json)"));
    }
    let mut bytes = std::fs::read(path).map_err(|e| FileErrors::one(path, format!("cannot read the file: {e}")))?;
    if bytes.starts_with(UTF8_BOM) {
        bytes.drain(..UTF8_BOM.len());
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        FileErrors {
            file: path.to_path_buf(),
            errors: vec![PolicyError {
                path: String::new(),
                message: format!("not UTF-8 text (invalid byte at offset {at})"),
                line: Some(line),
            }],
        }
    })
}

/// U+FEFF in UTF-8.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// Reads, parses and compiles one policy file.
pub fn load_file(path: &Path) -> Result<CompiledPolicy, FileErrors> {
    load_document_file(path).map(|d| d.policy)
}

/// Reads, parses and compiles one policy file, keeping the document as JSON.
pub fn load_document_file(path: &Path) -> Result<Document, FileErrors> {
    let text = read_file(path)?;
    load_document(&text).map_err(|errors| FileErrors { file: path.to_path_buf(), errors: errors.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
apiVersion: guardrail/v1
kind: Policy
revision: 7
settings:
  gateway_region: eu-west-1
  identity:
    jwt:
      - issuer: https://idp.example
        jwks:
          keys:
            - {kty: OKP, crv: Ed25519, x: abc}
            - kty: EC
              crv: P-256
tiers:
  sandbox:
    rate: {requests: 10, per: 1m}
  standard:
    rate:
      requests: 600
      per: 1m
apps:
  - id: one
    tier: sandbox
  - id: two
    tier: standard
    api_keys:
      - sha256:aaaa
      - sha256:bbbb
    quota_overrides:
      - daily_budget: 5
        expires_at: 2030-01-01T00:00:00Z
  -
    id: three
datasets: [{id: hr, routes: [{path_prefix: /hr}]}]
";

    const JSON: &str = r#"{
  "apiVersion": "guardrail/v1",
  "kind": "Policy",
  "tiers": {
    "sandbox": {
      "rate": {"requests": 10, "per": "1m"}
    }
  },
  "apps": [
    {
      "id": "one",
      "tier": "sandbox"
    },
    {"id": "two", "tier": "sandbox",
     "api_keys": ["sha256:aaaa", "sha256:bbbb"]}
  ]
}
"#;

    #[test]
    fn locate_table() {
        let cases: &[(&str, &str, &str, Option<usize>)] = &[
            (YAML, "", "the document", Some(1)),
            (YAML, "kind", "top-level key", Some(2)),
            (YAML, "settings.gateway_region", "nested mapping", Some(5)),
            (YAML, "settings.identity.jwt[0]", "sequence item of mappings", Some(8)),
            (YAML, "settings.identity.jwt[0].issuer", "key of the first entry of an item", Some(8)),
            (YAML, "settings.identity.jwt[0].jwks", "nested key in an item", Some(9)),
            (YAML, "settings.identity.jwt[0].jwks.keys[0]", "flow mapping in a block sequence", Some(11)),
            (YAML, "settings.identity.jwt[0].jwks.keys[0].crv", "key inside a flow mapping", Some(11)),
            (YAML, "settings.identity.jwt[0].jwks.keys[1]", "second sequence item", Some(12)),
            (YAML, "settings.identity.jwt[0].jwks.keys[1].crv", "second key of a block item", Some(13)),
            (YAML, "tiers.sandbox.rate.requests", "flow mapping value", Some(16)),
            (YAML, "tiers.standard.rate.per", "block mapping value", Some(20)),
            (YAML, "apps[1]", "second app", Some(24)),
            (YAML, "apps[1].api_keys[1]", "scalar sequence item", Some(28)),
            (YAML, "apps[1].quota_overrides[0].expires_at", "deep path", Some(31)),
            (YAML, "apps[2].id", "item starting on the line after its dash", Some(33)),
            (YAML, "datasets[0].routes[0].path_prefix", "all flow style", Some(34)),
            (YAML, "apps[0].region", "missing key falls back to its mapping", Some(22)),
            (YAML, "apps[1].quota_overrides[0].rate.requests", "missing subtree falls back", Some(30)),
            (YAML, "apps[9].tier", "missing item falls back to the sequence", Some(21)),
            (YAML, "nothing.here", "unknown top level falls back to the document", Some(1)),
            (JSON, "", "JSON document", Some(1)),
            (JSON, "kind", "JSON top-level key", Some(3)),
            (JSON, "tiers.sandbox.rate.per", "JSON nested object on one line", Some(6)),
            (JSON, "apps[0]", "JSON array item", Some(10)),
            (JSON, "apps[0].tier", "JSON key in an array item", Some(12)),
            (JSON, "apps[1].id", "JSON compact item", Some(14)),
            (JSON, "apps[1].api_keys[1]", "JSON scalar array item on a continued line", Some(15)),
            ("", "kind", "empty text has no document", None),
        ];
        for (text, path, why, want) in cases {
            assert_eq!(locate(text, path), *want, "{why}: locate({path:?})");
        }
    }

    #[test]
    fn parent_paths() {
        let cases: &[(&str, Option<&str>)] = &[
            ("apps[2].quota_overrides[0].expires_at", Some("apps[2].quota_overrides[0]")),
            ("apps[2].quota_overrides[0]", Some("apps[2].quota_overrides")),
            ("apps[2].quota_overrides", Some("apps[2]")),
            ("apps[2]", Some("apps")),
            ("apps", Some("")),
            ("", None),
        ];
        for (path, want) in cases {
            assert_eq!(parent_path(path), *want, "parent of {path:?}");
        }
    }

    #[test]
    fn locate_survives_a_syntax_error_after_the_path() {
        let text = "kind: Policy\napps:\n  - id: a\n  - id: [unclosed\n";
        assert_eq!(locate(text, "apps[0].id"), Some(3));
    }

    const HEAD: &str = "apiVersion: guardrail/v1\nkind: Policy\n";

    #[test]
    fn parse_errors_table() {
        // (document after HEAD, why, expected path, expected line (of the whole text), message part)
        let cases: &[(&str, &str, &str, usize, &str)] = &[
            (
                "tiers:\n  s:\n    rate: {requests: 1, per: 1s}\napps:\n  - id: a\n    tier: s\n    environment: dev\n    lifecycle: draft\n  - id: b\n    tierr: s\n",
                "unknown field in an app",
                "apps[1]",
                12,
                "unknown field `tierr`, expected one of",
            ),
            (
                "apps:\n  - id: a\n    tier: s\n    environment: dev\n    lifecycle: retired\n",
                "unknown lifecycle",
                "apps[0].lifecycle",
                7,
                "unknown variant `retired`",
            ),
            (
                "apps:\n  - id: a\n    tier: s\n    environment: staging\n    lifecycle: draft\n",
                "unknown environment",
                "apps[0].environment",
                6,
                "unknown variant `staging`",
            ),
            (
                "tiers:\n  s:\n    rate:\n      requests: lots\n      per: 1s\n",
                "wrong type",
                "tiers.s.rate.requests",
                6,
                "invalid type",
            ),
            ("colour: blue\n", "unknown top-level key", "", 3, "unknown field `colour`"),
            (
                "apps:\n  - id: a\n    environment: dev\n    lifecycle: draft\n",
                "missing field",
                "apps[0]",
                4,
                "missing field `tier`",
            ),
            ("tiers:\n  s: {rate: {requests: 1, per: 1s}}\n  s: {rate: {requests: 2, per: 1s}}\n", "duplicate key", "tiers", 5, "duplicate key `s` (first written on line 4)"),
            ("apps: [\n", "syntax error", "apps", 4, "did not find expected node content"),
            ("revision: 1\n---\nkind: Policy\n", "two documents", "", 4, "a second YAML document"),
            ("revision: [1]\n", "revision of the wrong type", "revision", 3, "must be a whole number or a string, not [1]"),
            ("kind: Policy\n", "duplicate key of a struct", "", 3, "duplicate key `kind` (first written on line 2)"),
            ("revision: 7.5\n", "a fraction for a revision", "revision", 3, "must be a whole number or a string, not 7.5"),
            (
                "tiers:\n  s:\n    rate: {requests: 1.5, per: 1s}\n",
                "a fraction for a count",
                "tiers.s.rate.requests",
                5,
                "invalid type: floating point `1.5`, expected a whole number",
            ),
            ("settings: {soft_limit_ratio: most}\n", "a word for a ratio", "settings.soft_limit_ratio", 3, "expected a number"),
            (
                "settings:\n  identity:\n    jwt:\n      - issuer: x\n        jwks: {keys: []}\n        app_claims: sub\n",
                "unknown field deep in a list",
                "settings.identity.jwt[0]",
                8,
                "unknown field `app_claims`",
            ),
        ];
        for (body, why, want_path, want_line, want_message) in cases {
            let text = format!("{HEAD}{body}");
            let errors = match parse_document(&text) {
                Ok(_) => Vec::new(),
                Err(e) => e.0,
            };
            assert_eq!(errors.len(), 1, "{why}: one error expected, got {errors:?}");
            let e = &errors[0];
            assert_eq!(e.path, *want_path, "{why}: path of {e:?}");
            assert_eq!(e.line, Some(*want_line), "{why}: line of {e:?}");
            assert!(e.message.contains(want_message), "{why}: message of {e:?}");
            assert!(!e.message.contains(" at line "), "{why}: the line is not repeated in {e:?}");
            for internal in ["struct", "Raw", "i64", "f64", "u128", "unit value"] {
                assert!(!e.message.contains(internal), "{why}: `{internal}` is Rust's, not the document's: {e:?}");
            }
            assert!(
                !e.message.starts_with(&format!("{want_path}: ")) || want_path.is_empty(),
                "{why}: no doubled path in {e:?}"
            );
        }
    }

    #[test]
    fn indentation_errors_are_reported_at_the_key() {
        // An app of four keys after HEAD and a tier (lines 3-4); `environment` mis-indented.
        let app = |environment: &str, after: &str| {
            format!(
                "{HEAD}tiers:\n  s: {{rate: {{requests: 1, per: 1s}}}}\napps:\n  - id: a\n    tier: s\n{environment}    lifecycle: draft\n    region: eu-west-1\n{after}"
            )
        };
        // (text, why, line, message)
        let cases: Vec<(String, &str, usize, &str)> = vec![
            (
                app("   environment: dev\n", ""),
                "one space less than its siblings",
                8,
                "indentation: `environment` is indented 3 spaces, and `tier` above it (line 7) 4 spaces: the keys of one mapping line up, so `environment` belongs to no mapping here",
            ),
            (
                app("     environment: dev\n", ""),
                "one space more",
                8,
                "indentation: `environment` is indented 5 spaces, and `tier` above it (line 7) 4 spaces",
            ),
            (app("  environment: dev\n", ""), "at the column of the item's dash", 8, "`environment` is indented 2 spaces, and `tier` above it (line 7) 4 spaces"),
            (
                app("", "    data_classes:\n    - public\n   environment: dev\n"),
                "after an indentless list",
                12,
                "`environment` is indented 3 spaces, and `data_classes` above it (line 10) 4 spaces",
            ),
            (
                app("", "    quota_overrides:\n      - daily_budget: 5\n       expires_at: \"2030-01-01T00:00:00Z\"\n"),
                "in a list item's mapping",
                12,
                "`expires_at` is indented 7 spaces, and `daily_budget` above it (line 11) 8 spaces",
            ),
        ];
        for (text, why, line, message) in &cases {
            let errors = parse_document(text).err().map(|e| e.0).unwrap_or_default();
            assert_eq!(errors.len(), 1, "{why}: {errors:?}");
            let e = &errors[0];
            assert_eq!((e.path.as_str(), e.line), ("", Some(*line)), "{why}: {e:?}");
            assert!(e.message.contains(message), "{why}: {:?} should contain {message:?}", e.message);
            assert!(!e.message.contains("missing field"), "{why}: {e:?}");
        }
        // Keys that line up are not an indentation problem, whatever else is wrong.
        let text = app("    environment: dev\n", "    colour: blue\n");
        let errors = parse_document(&text).err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.iter().map(|e| (e.path.as_str(), e.line)).collect::<Vec<_>>(), [("apps[0]", Some(11))]);
        assert!(errors[0].message.starts_with("unknown field `colour`"), "{errors:?}");
    }

    #[test]
    fn block_keys() {
        let cases: &[(&str, Option<(usize, &str)>)] = &[
            ("    tier: s", Some((4, "tier"))),
            ("  - id: a", Some((4, "id"))),
            ("- - x: 1", Some((4, "x"))),
            ("apps:", Some((0, "apps"))),
            ("  rate: {requests: 1}", Some((2, "rate"))),
            ("  \"x-team\": crm", Some((2, "x-team"))),
            ("  'a b': 1", Some((2, "a b"))),
            ("  key:   # comment", Some((2, "key"))),
            ("  - public", None),
            ("  # id: a", None),
            ("  url: https://x", Some((2, "url"))),
            ("  https://x", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(block_key(line), *want, "{line:?}");
        }
    }

    #[test]
    fn serde_messages_are_in_the_documents_terms() {
        // (serde's message, as a policy author reads it, why)
        let cases = [
            ("invalid type: null, expected struct RawSettings", "invalid type: null, expected a mapping", "a Raw struct"),
            ("invalid type: unit value, expected struct RawPolicy", "invalid type: null, expected a mapping", "unit"),
            ("invalid type: integer `5`, expected struct RawCase", "invalid type: integer `5`, expected a mapping", "any struct"),
            ("invalid type: integer `5`, expected enum Lifecycle", "invalid type: integer `5`, expected a string", "an enum"),
            ("expected value", "expected a string", "serde_json's enum of a number"),
            ("invalid type: floating point `7.5`, expected i64", "invalid type: floating point `7.5`, expected a whole number", "i64"),
            ("invalid type: string \"x\", expected u32", "invalid type: string \"x\", expected a whole number", "u32"),
            ("invalid type: string \"abc\", expected f64", "invalid type: string \"abc\", expected a number", "f64"),
            (
                "invalid type: integer `99999999999999999999` as u128, expected i64",
                "integer `99999999999999999999` is out of range: expected a whole number from -9223372036854775808 to 9223372036854775807",
                "u128",
            ),
            (
                "invalid value: integer `-1`, expected u32",
                "integer `-1` is out of range: expected a whole number from 0 to 4294967295",
                "a negative unsigned",
            ),
            ("invalid type: map, expected a sequence", "invalid type: mapping, expected a list", "map and sequence"),
            ("invalid type: sequence, expected a map", "invalid type: list, expected a mapping", "sequence and map"),
            ("unknown field `x`, expected one of `a`, `b`", "unknown field `x`, expected one of `a`, `b`", "unchanged"),
            ("missing field `kind`", "missing field `kind`", "unchanged"),
            ("invalid type: string \"i64\", expected a string", "invalid type: string \"i64\", expected a string", "a value"),
            ("expected structure", "expected structure", "a word that starts like one"),
        ];
        for (serde, want, why) in cases {
            assert_eq!(in_document_terms(serde), want, "{why}");
        }
        // Through the JSON reader of files.
        let head = r#""apiVersion": "guardrail/v1", "kind": "Policy""#;
        let documents = [
            (format!(r#"{{{head}, "revision": 7.5}}"#), "revision", "must be a whole number or a string, not 7.5"),
            (format!(r#"{{{head}, "settings": null}}"#), "settings", "invalid type: null, expected a mapping"),
            ("null".to_string(), "", "invalid type: null, expected a mapping"),
            (
                format!(r#"{{{head}, "tiers": {{"s": {{"rate": {{"requests": 1.5, "per": "1s"}}}}}}}}"#),
                "tiers.s.rate.requests",
                "invalid type: floating point `1.5`, expected a whole number",
            ),
        ];
        for (text, path, message) in documents {
            let got = load_document(&text).err().map(|e| e.0).unwrap_or_default();
            let got: Vec<(&str, &str)> = got.iter().map(|e| (e.path.as_str(), e.message.as_str())).collect();
            assert_eq!(got, [(path, message)], "{text}");
        }
    }
    #[test]
    fn json_is_read_as_yaml() {
        let text = "{\n  \"apiVersion\": \"guardrail/v1\",\n  \"kind\": \"Policy\",\n  \"apps\": [\n    {\"id\": \"a\", \"tier\": \"s\", \"environment\": \"dev\", \"lifecycle\": \"retired\"}\n  ]\n}\n";
        let errors = parse_document(text).err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "apps[0].lifecycle");
        assert_eq!(errors[0].line, Some(5));
    }

    /// A JSON policy with one app per line, so that every field is on a line of its own app.
    fn json_policy(apps: &[&str]) -> String {
        let mut text = String::from(
            "{\n  \"apiVersion\": \"guardrail/v1\",\n  \"kind\": \"Policy\",\n  \"revision\": \"r1\",\n  \"tiers\": {\"s\": {\"rate\": {\"requests\": 1, \"per\": \"1s\"}}},\n  \"apps\": [\n",
        );
        let lines: Vec<String> = apps.iter().map(|a| format!("    {a}")).collect();
        text.push_str(&lines.join(",\n"));
        text.push_str("\n  ]\n}\n");
        text
    }

    const APP: &str = r#"{"id": "a", "tier": "s", "environment": "dev", "lifecycle": "draft", "region": "eu"}"#;
    const KEY: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn json_documents_are_read_with_serde_json() {
        let text = json_policy(&[APP]);
        let doc = load_json_document(&text, &mut ExpressionCache::default()).map(|r| r.map_err(|e| e.to_string()));
        let Some(Ok(doc)) = doc else { panic!("a valid JSON policy: {doc:?}") };
        assert_eq!(doc.policy.revision, "r1");
        assert_eq!(doc.policy.apps.len(), 1);
        // The canonical form is the document as compact JSON, keys sorted.
        assert_eq!(serde_json::from_str::<Value>(&doc.canonical).ok(), Some(doc.json.clone()));
        assert!(
            doc.canonical.starts_with(r#"{"apiVersion":"guardrail/v1","apps":[{"environment""#),
            "{}",
            doc.canonical
        );
        // The same document read as YAML compiles to the same thing.
        let yaml = load_yaml_document(&text, &mut ExpressionCache::default()).map_err(|e| e.to_string());
        assert_eq!(yaml.map(|d| d.canonical).as_deref(), Ok(doc.canonical.as_str()));
    }

    #[test]
    fn the_filters_json_reader_names_the_field_and_refuses_trailing_text() {
        // parse_json_str is the one reader of the policy types (the filter's snapshots and inline
        // policies): one tracked pass, then the end of the text.
        let text = json_policy(&[APP]);
        assert!(parse_json_str(&text).is_ok());
        let e = parse_json_str(&format!("{text} x")).err().map(|e| (e.path, bare_message(&e.error)));
        assert_eq!(e, Some((String::new(), "trailing characters".to_string())));
        let e = parse_json_str(&text.replace("\"eu\"", "7")).err().map(|e| (e.path, bare_message(&e.error)));
        assert_eq!(e, Some(("apps[0].region".to_string(), "invalid type: integer `7`, expected a string".to_string())));
        let e = parse_json_str(&text.replace("\"tier\"", "\"tierr\"")).err().map(|e| e.path);
        assert_eq!(e.as_deref(), Some("apps[0].tierr"), "the path reached: the unknown key itself");
    }

    #[test]
    fn json_errors_name_the_field_and_its_line() {
        // (apps, why, expected path, expected line, message part); app i is on line 7 + i.
        let app = |id: &str, replace: &str, with: &str| {
            APP.replace("\"id\": \"a\"", &format!("\"id\": \"{id}\"")).replace(replace, with)
        };
        let keyed = |id: &str, keys: &str| app(id, "}", &format!(r#", "api_keys": [{keys}]}}"#));
        let cases: Vec<(Vec<String>, &str, &str, usize, &str)> = vec![
            (
                vec![app("a", "", ""), app("b", "\"tier\"", "\"tierr\"")],
                "unknown field",
                "apps[1]",
                8,
                "unknown field `tierr`, expected one of",
            ),
            (
                vec![app("a", "draft", "retired")],
                "unknown variant",
                "apps[0].lifecycle",
                7,
                "unknown variant `retired`",
            ),
            (
                vec![app("a", "", ""), app("b", "\"eu\"", "7")],
                "wrong type",
                "apps[1].region",
                8,
                "invalid type: integer `7`, expected a string",
            ),
            (
                vec![app("a", "", ""), app("b", "\"tier\": \"s\", ", "")],
                "missing field",
                "apps[1]",
                8,
                "missing field `tier`",
            ),
            (
                vec![app("a", "", ""), app("b", "\"s\"", "\"gold\"")],
                "compile error: unknown tier",
                "apps[1].tier",
                8,
                "unknown tier `gold` (known: s)",
            ),
            (
                vec![app("a", "", ""), app("b", "\"tier\"", "\"id\": \"c\", \"tier\"")],
                "duplicate key in an object",
                "apps[1]",
                8,
                "duplicate key `id` (first written on line 8)",
            ),
            (
                vec![keyed("a", &format!("\"{KEY}\", \"{KEY}\""))],
                "one key listed twice by its app",
                "apps[0].api_keys[1]",
                7,
                "API-key digest already used by app `a`",
            ),
            (
                vec![keyed("a", &format!("\"{KEY}\"")), keyed("b", &format!("\"{KEY}\""))],
                "one key for two apps",
                "apps[1].api_keys[0]",
                8,
                "API-key digest already used by app `a`",
            ),
        ];
        for (apps, why, want_path, want_line, want_message) in &cases {
            let apps: Vec<&str> = apps.iter().map(String::as_str).collect();
            let text = json_policy(&apps);
            let errors = match load_json_document(&text, &mut ExpressionCache::default()) {
                Some(Err(e)) => e.0,
                other => panic!("{why}: expected errors from the JSON reader, got {other:?}"),
            };
            assert_eq!(errors.len(), 1, "{why}: one error expected, got {errors:?}");
            let e = &errors[0];
            assert_eq!((e.path.as_str(), e.line), (*want_path, Some(*want_line)), "{why}: {e:?}");
            assert!(e.message.contains(want_message), "{why}: message of {e:?}");
            assert!(!e.message.contains(" at line "), "{why}: no position of the JSON form in {e:?}");
            let file = FileErrors { file: PathBuf::from("p.json"), errors: errors.clone() };
            assert_eq!(file.lines()[0], format!("p.json:{want_line}: {want_path}: {}", e.message), "{why}");
        }
    }

    #[test]
    fn duplicate_tiers_in_json_are_an_error() {
        // A map field: serde_json alone would keep the second tier silently.
        let text = "{\"apiVersion\": \"guardrail/v1\", \"kind\": \"Policy\",\n \"tiers\": {\"s\": {\"rate\": {\"requests\": 1, \"per\": \"1s\"}},\n  \"s\": {\"rate\": {\"requests\": 9, \"per\": \"1s\"}}}}\n";
        let errors = load_document(text).err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("tiers", Some(3)));
        assert!(errors[0].message.starts_with("duplicate key `s`"), "{errors:?}");
    }

    #[test]
    fn text_that_is_not_one_complete_json_document_goes_to_the_yaml_reader() {
        let full = json_policy(&[APP, APP]);
        // Every prefix of the document (a file caught half-written) is refused by the JSON reader.
        for cut in (1..full.trim_end().len()).step_by(7) {
            assert!(
                load_json_document(&full[..cut], &mut ExpressionCache::default()).is_none(),
                "prefix of {cut} bytes read as JSON"
            );
        }
        for (text, why) in [
            ("apiVersion: guardrail/v1\nkind: Policy\n", "YAML"),
            ("{apiVersion: guardrail/v1, kind: Policy}\n", "a YAML flow mapping"),
            ("{\"kind\": \"Policy\",}\n", "a JSON syntax error"),
            ("{\"kind\": \"Policy\"}\n{}\n", "two documents"),
        ] {
            assert!(load_json_document(text, &mut ExpressionCache::default()).is_none(), "{why}");
        }
        // A syntax error is then reported by the YAML reader, with its line.
        let text = "{\n  \"apiVersion\": \"guardrail/v1\",\n  \"kind\": [\n}\n";
        let errors = load_document(text).err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].line.is_some(), "{errors:?}");
    }

    #[test]
    fn to_json_keeps_the_document() {
        let value = to_json_value("kind: Policy\nrevision: 3\ntiers: {s: {rate: {requests: 1, per: 1s}}}\n");
        let want = serde_json::json!({"kind": "Policy", "revision": 3, "tiers": {"s": {"rate": {"requests": 1, "per": "1s"}}}});
        assert_eq!(value.ok(), Some(want));
    }

    #[test]
    fn file_errors_render_one_line_each() {
        let errors = FileErrors {
            file: PathBuf::from("p.yaml"),
            errors: vec![
                PolicyError { path: "apps[0].tier".into(), message: "unknown tier `x`".into(), line: Some(4) },
                PolicyError { path: "kind".into(), message: "bad".into(), line: None },
                PolicyError { path: String::new(), message: "cannot read".into(), line: None },
            ],
        };
        assert_eq!(
            errors.to_string(),
            "p.yaml:4: apps[0].tier: unknown tier `x`\np.yaml: kind: bad\np.yaml: cannot read"
        );
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_document() {
        let yaml = "apiVersion: guardrail/v1\nkind: Policy\nrevision: 3\n";
        let json = "{\"apiVersion\": \"guardrail/v1\",\n \"kind\": \"Policy\", \"revision\": 3}\n";
        let bad = "apiVersion: guardrail/v1\nkind: Policy\ncolour: blue\n";
        // (text after the mark, the line of the error or None when valid, why)
        let cases: &[(&str, Option<usize>, &str)] =
            &[(yaml, None, "YAML"), (json, None, "JSON"), (bad, Some(3), "an error keeps its line")];
        for (i, (text, want_line, why)) in cases.iter().enumerate() {
            let file = std::env::temp_dir().join(format!("guardrail-bom-{}-{i}.yaml", std::process::id()));
            let written = std::fs::write(&file, [UTF8_BOM, text.as_bytes()].concat());
            assert!(written.is_ok(), "{why}: writing {}", file.display());
            let read = read_file(&file).map_err(|e| e.to_string());
            let loaded = load_file(&file).map(|p| p.revision).map_err(|e| e.errors);
            let _ = std::fs::remove_file(&file);
            assert_eq!(read.as_deref(), Ok(*text), "{why}: the text without its mark");
            match (want_line, loaded) {
                (None, Ok(revision)) => assert_eq!(revision, "3", "{why}"),
                (Some(line), Err(errors)) => assert_eq!(errors[0].line, Some(*line), "{why}: {errors:?}"),
                (_, other) => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn read_failures_name_the_file() {
        let missing = std::env::temp_dir().join(format!("guardrail-missing-{}.yaml", std::process::id()));
        let text = load_file(&missing).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.starts_with(&format!("{}: cannot read the file", missing.display())), "{text}");

        let bad = std::env::temp_dir().join(format!("guardrail-latin1-{}.yaml", std::process::id()));
        let written = std::fs::write(&bad, b"kind: Policy\nowner: Jos\xe9\n");
        assert!(written.is_ok());
        let text = load_file(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        let _ = std::fs::remove_file(&bad);
        assert!(text.starts_with(&format!("{}:2: not UTF-8", bad.display())), "{text}");
    }
}
