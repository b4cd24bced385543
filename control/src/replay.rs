//! `guardrail replay --policy CANDIDATE [--baseline CURRENT] LOG…`: what a candidate policy would
//! have decided for recorded traffic, against what was decided (or what CURRENT decides).
//!
//! ```text
//! guardrail replay --policy policy-v2.yaml access.log.1.gz access.log
//! ```
//!
//! Each line of an Envoy JSON access log (the format of the repository's Envoy configs: see
//! [`guardrail_core::replay::REQUIRED_FIELDS`]) is decided again by core's `decide()` as the app
//! it recorded ([`guardrail_core::replay::Replayer`]), its quota replayed at its recorded time in
//! one in-memory store per policy. Several logs are merged by time into one stream; gzip
//! is recognised by its magic bytes. Memory stays constant: only counters and at most
//! [`SAMPLES`] request ids per outcome change are kept.
//!
//! Exit codes: 0 no change, 3 changes, 1 an error (a log that cannot be read or is of another
//! format, an invalid policy), 2 a wrong command line.

use anyhow::Context;
use guardrail_core::compile::CompiledPolicy;
use guardrail_core::replay::{Outcome, Record, Replayer, Undetermined, OPTIONAL_FIELDS, REQUIRED_FIELDS};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Request ids kept per outcome change and per reason a record is undetermined.
pub const SAMPLES: usize = 3;
/// Malformed lines whose place is shown.
pub const MALFORMED_SHOWN: usize = 10;
/// Lines read to recognise a log's format.
const SNIFF_LINES: usize = 10;
/// Apps counted one by one; beyond (a log full of unknown app names), the rest are counted together.
const MAX_APPS: usize = 10_000;
const OTHER_APPS: &str = "(other apps)";
const NO_APP: &str = "(no app)";
/// Exit code when the candidate changes any decision.
const EXIT_CHANGES: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The candidate policy (file, or a directory holding one, as `guardrail serve` takes it).
    #[arg(long, value_name = "CANDIDATE")]
    policy: PathBuf,
    /// Compare with what this policy decides (replayed the same way) instead of what was recorded.
    #[arg(long, value_name = "CURRENT")]
    baseline: Option<PathBuf>,
    /// Envoy JSON access logs, plain or gzip (`-`: standard input); several are merged by time.
    #[arg(required = true, value_name = "LOG")]
    logs: Vec<PathBuf>,
    /// Print the report as one JSON document.
    #[arg(long)]
    json: bool,
    /// The region the recording Envoy's configuration gave (default: the policy's
    /// `settings.gateway_region`); the log does not say.
    #[arg(long, value_name = "REGION")]
    gateway_region: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let Some(candidate) = load(&args.policy, "candidate")? else {
        return Ok(ExitCode::FAILURE);
    };
    let baseline = match &args.baseline {
        Some(path) => match load(path, "baseline")? {
            Some(loaded) => Some(loaded),
            None => return Ok(ExitCode::FAILURE),
        },
        None => None,
    };
    let mut sources = Vec::with_capacity(args.logs.len());
    for path in &args.logs {
        sources.push(Source::open(path)?);
    }
    let replayer = |policy| {
        Replayer::new(policy, args.gateway_region.clone())
            .map_err(|e| anyhow::anyhow!("preparing the quota store: {e:?}"))
    };
    let mut tally = Tally {
        candidate: replayer(&candidate.1)?,
        baseline: match &baseline {
            Some((_, policy)) => Some(replayer(policy)?),
            None => None,
        },
        report: Report::default(),
    };
    replay_all(&mut sources, &mut tally)?;
    let header = Header {
        candidate: (&candidate.0, &candidate.1),
        baseline: baseline.as_ref().map(|(p, c)| (p.as_path(), c)),
        logs: args.logs.iter().map(|p| p.display().to_string()).collect(),
    };
    let report = tally.report;
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = report.json(&header);
        writeln!(out, "{json}").context("writing to standard output")?;
    } else {
        out.write_all(report.text(&header).as_bytes()).context("writing to standard output")?;
    }
    Ok(if report.changed > 0 { ExitCode::from(EXIT_CHANGES) } else { ExitCode::SUCCESS })
}

/// A policy validated as `guardrail check` does; its errors (`file:line: …`) go to stderr.
fn load(path: &Path, role: &str) -> anyhow::Result<Option<(PathBuf, CompiledPolicy)>> {
    match crate::policy::load(path) {
        Ok((file, doc)) => Ok(Some((file, doc.policy))),
        Err(lines) => {
            let mut err = std::io::stderr().lock();
            for line in lines {
                writeln!(err, "{line}").context("writing to standard error")?;
            }
            writeln!(err, "error: the {role} policy {} is invalid: nothing replayed", path.display())
                .context("writing to standard error")?;
            Ok(None)
        }
    }
}

/// Replays every line of every source, merged by time (the earliest head line first; lines
/// without a readable time go first, to be counted as what they are).
fn replay_all(sources: &mut [Source], tally: &mut Tally<'_>) -> anyhow::Result<()> {
    let merge = sources.len() > 1;
    for source in sources.iter_mut() {
        source.advance(merge)?;
    }
    if let [source] = sources {
        // One log: in file order, no merge.
        while source.has_head {
            tally.line(&source.name, source.head_line, &source.head);
            source.advance(false)?;
        }
        return Ok(());
    }
    loop {
        let next = sources.iter().enumerate().filter(|(_, s)| s.has_head).min_by_key(|(_, s)| s.head_ns);
        let Some((i, _)) = next else { return Ok(()) };
        let Some(source) = sources.get_mut(i) else { return Ok(()) };
        tally.line(&source.name, source.head_line, &source.head);
        source.advance(merge)?;
    }
}

// === Source: one log, read line by line ===

struct Source {
    name: String,
    reader: Box<dyn BufRead>,
    /// Lines read so far.
    line_no: u64,
    /// Lines read ahead to recognise the format, not yet replayed.
    ahead: VecDeque<(u64, Vec<u8>)>,
    /// The next line to replay (trimmed, non-empty) when `has_head`.
    head: Vec<u8>,
    head_line: u64,
    has_head: bool,
    /// The head line's time (0 if unreadable), when several logs are merged.
    head_ns: u64,
}

impl Source {
    fn open(path: &Path) -> anyhow::Result<Source> {
        let name = path.display().to_string();
        let raw: Box<dyn Read> = if path == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?)
        };
        let mut buffered = BufReader::with_capacity(1 << 18, raw);
        let magic = buffered.fill_buf().with_context(|| format!("cannot read {name}"))?;
        let reader: Box<dyn BufRead> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(BufReader::with_capacity(1 << 18, flate2::bufread::MultiGzDecoder::new(buffered)))
        } else {
            Box::new(buffered)
        };
        let mut source = Source {
            name,
            reader,
            line_no: 0,
            ahead: VecDeque::new(),
            head: Vec::new(),
            head_line: 0,
            has_head: false,
            head_ns: 0,
        };
        source.sniff()?;
        Ok(source)
    }

    /// Reads the next non-empty line into `buf` (trimmed); false at the end.
    fn read_line(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
        loop {
            buf.clear();
            let n = self
                .reader
                .read_until(b'\n', buf)
                .with_context(|| format!("cannot read {} after line {}", self.name, self.line_no))?;
            if n == 0 {
                return Ok(false);
            }
            self.line_no += 1;
            let end = buf.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
            buf.truncate(end);
            if !buf.is_empty() {
                return Ok(true);
            }
        }
    }

    /// Recognises the format from the first lines: at least one must be a record with every
    /// required field; a log of another format is an error naming what is expected.
    fn sniff(&mut self) -> anyhow::Result<()> {
        let mut lacking: Option<Vec<&'static str>> = None;
        let mut first_line: Option<String> = None;
        let mut found = false;
        while self.ahead.len() < SNIFF_LINES {
            let mut buf = Vec::new();
            if !self.read_line(&mut buf)? {
                break;
            }
            match serde_json::from_slice::<Record<'_>>(&buf) {
                Ok(record) if record.missing().is_empty() => found = true,
                Ok(record) => {
                    lacking.get_or_insert_with(|| record.missing());
                }
                Err(_) => {}
            }
            if first_line.is_none() {
                let text = String::from_utf8_lossy(&buf);
                first_line = Some(text.chars().take(120).collect());
            }
            self.ahead.push_back((self.line_no, buf));
            if found {
                break;
            }
        }
        let Some(first_line) = first_line.filter(|_| !found) else {
            return Ok(()); // Guardrail's format, or an empty log.
        };
        let expected = format!(
            "expected Envoy JSON access log lines with the fields {} (and optionally {}), as the Envoy \
             configs in envoy/ write them",
            REQUIRED_FIELDS.join(", "),
            OPTIONAL_FIELDS.join(", ")
        );
        match lacking {
            Some(missing) => anyhow::bail!(
                "{}: not Guardrail's access-log format: its JSON records lack {}; {expected}",
                self.name,
                missing.join(", ")
            ),
            None => anyhow::bail!(
                "{}: not a JSON access log (line {}: `{first_line}`); {expected}",
                self.name,
                self.ahead.front().map_or(1, |(n, _)| *n)
            ),
        }
    }

    /// Moves to the next line to replay.
    fn advance(&mut self, merge: bool) -> anyhow::Result<()> {
        if let Some((line, buf)) = self.ahead.pop_front() {
            self.head = buf;
            self.head_line = line;
            self.has_head = true;
        } else {
            let mut head = std::mem::take(&mut self.head);
            self.has_head = self.read_line(&mut head)?;
            self.head = head;
            self.head_line = self.line_no;
        }
        if merge && self.has_head {
            self.head_ns = time_of(&self.head).unwrap_or(0);
        }
        Ok(())
    }
}

/// The `time` of a line without parsing all of it (to merge logs by time).
fn time_of(line: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"time\":\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = line.get(at..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(rest.get(..end)?).ok()?;
    guardrail_core::replay::parse_time_ns(text)
}

// === Tally: what each record does ===

struct Tally<'p> {
    candidate: Replayer<'p>,
    baseline: Option<Replayer<'p>>,
    report: Report,
}

impl Tally<'_> {
    fn line(&mut self, file: &str, line: u64, bytes: &[u8]) {
        let record: Record<'_> = match serde_json::from_slice::<Record<'_>>(bytes) {
            Ok(record) if record.missing().is_empty() => record,
            _ => return self.report.malformed(file, line),
        };
        let verdict = match record.time_ns() {
            None => Err(Undetermined::BadTime),
            Some(now_ns) => {
                // Both replayers see every record, so that each quota store follows all the traffic.
                let to = self.candidate.replay(&record, now_ns);
                let from = match &mut self.baseline {
                    Some(baseline) => baseline.replay(&record, now_ns),
                    None => record.recorded(),
                };
                from.and_then(|from| to.map(|to| (from, to)))
            }
        };
        let id = record.request_id();
        let r = &mut self.report;
        r.records += 1;
        match verdict {
            Err(why) => {
                r.undetermined.entry(why).or_default().add(id);
                let app = r.app(record.app());
                app.records += 1;
                app.undetermined += 1;
            }
            Ok((from, to)) if from == to => {
                r.unchanged += 1;
                let app = r.app(record.app());
                app.records += 1;
                app.unchanged += 1;
            }
            Ok((from, to)) => {
                r.changed += 1;
                let app = r.app(record.app());
                app.records += 1;
                app.changes.entry((from, to)).or_default().add(id);
            }
        }
    }
}

// === Report ===

#[derive(Debug, Default)]
struct Bucket {
    count: u64,
    samples: Vec<String>,
}

impl Bucket {
    fn add(&mut self, id: &str) {
        self.count += 1;
        if self.samples.len() < SAMPLES {
            self.samples.push(id.to_string());
        }
    }
}

#[derive(Debug, Default)]
struct AppTally {
    records: u64,
    unchanged: u64,
    undetermined: u64,
    changes: HashMap<(Outcome, Outcome), Bucket>,
}

impl AppTally {
    fn changed(&self) -> u64 {
        self.changes.values().map(|b| b.count).sum()
    }

    /// Changes, the most frequent first.
    fn sorted_changes(&self) -> Vec<(&(Outcome, Outcome), &Bucket)> {
        let mut list: Vec<_> = self.changes.iter().collect();
        list.sort_by(|a, b| {
            b.1.count
                .cmp(&a.1.count)
                .then_with(|| (a.0 .0.to_string(), a.0 .1.to_string()).cmp(&(b.0 .0.to_string(), b.0 .1.to_string())))
        });
        list
    }
}

#[derive(Debug, Default)]
struct Report {
    records: u64,
    unchanged: u64,
    changed: u64,
    /// Per app, in order of first appearance; `app_index` finds one by id.
    apps: Vec<(String, AppTally)>,
    app_index: HashMap<String, usize>,
    undetermined: HashMap<Undetermined, Bucket>,
    malformed: u64,
    /// The first [`MALFORMED_SHOWN`] malformed lines: file and line number.
    malformed_lines: Vec<(String, u64)>,
}

struct Header<'a> {
    candidate: (&'a Path, &'a CompiledPolicy),
    baseline: Option<(&'a Path, &'a CompiledPolicy)>,
    logs: Vec<String>,
}

fn revision(policy: &CompiledPolicy) -> &str {
    if policy.revision.is_empty() {
        "unset"
    } else {
        &policy.revision
    }
}

impl Report {
    /// The tally of app `id` (`None`: no app recorded).
    fn app(&mut self, id: Option<&str>) -> &mut AppTally {
        let id = id.unwrap_or(NO_APP);
        let key = if self.app_index.contains_key(id) || self.apps.len() < MAX_APPS { id } else { OTHER_APPS };
        let i = match self.app_index.get(key) {
            Some(&i) => i,
            None => {
                self.apps.push((key.to_string(), AppTally::default()));
                self.app_index.insert(key.to_string(), self.apps.len() - 1);
                self.apps.len() - 1
            }
        };
        &mut self.apps[i].1
    }

    fn undetermined_count(&self) -> u64 {
        self.undetermined.values().map(|b| b.count).sum()
    }

    fn malformed(&mut self, file: &str, line: u64) {
        self.malformed += 1;
        if self.malformed_lines.len() < MALFORMED_SHOWN {
            self.malformed_lines.push((file.to_string(), line));
        }
    }

    fn sorted_apps(&self) -> Vec<(&String, &AppTally)> {
        let mut apps: Vec<_> = self.apps.iter().map(|(id, t)| (id, t)).collect();
        apps.sort_by(|a, b| a.0.cmp(b.0));
        apps
    }

    fn sorted_undetermined(&self) -> Vec<(Undetermined, &Bucket)> {
        Undetermined::ALL.iter().filter_map(|&u| self.undetermined.get(&u).map(|b| (u, b))).collect()
    }

    fn against(header: &Header<'_>) -> String {
        match header.baseline {
            Some((path, policy)) => format!("baseline {} (revision {})", path.display(), revision(policy)),
            None => "the decisions recorded".to_string(),
        }
    }

    fn text(&self, header: &Header<'_>) -> String {
        let mut s = String::new();
        let (path, policy) = header.candidate;
        let undetermined = self.undetermined_count();
        let _ = writeln!(
            s,
            "replay: candidate {} (revision {}) against {}",
            path.display(),
            revision(policy),
            Self::against(header)
        );
        let _ = writeln!(
            s,
            "{} records in {}: {} decided ({} unchanged, {} changed), {} undetermined; {} malformed lines skipped",
            self.records,
            header.logs.join(", "),
            self.unchanged + self.changed,
            self.unchanged,
            self.changed,
            undetermined,
            self.malformed
        );
        if self.changed > 0 {
            let _ = writeln!(s, "\nchanges by app:");
            for (app, tally) in self.sorted_apps() {
                let changed = tally.changed();
                if changed == 0 {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "  {app}: {changed} of {} records changed ({} undetermined)",
                    tally.records, tally.undetermined
                );
                for ((from, to), bucket) in tally.sorted_changes() {
                    let _ = writeln!(s, "    {from} → {to}: {}  e.g. {}", bucket.count, bucket.samples.join(", "));
                }
            }
        } else {
            let _ = writeln!(s, "\nno decision changes");
        }
        if undetermined > 0 {
            let _ = writeln!(s, "\nundetermined (the log cannot tell): {undetermined}");
            for (why, bucket) in self.sorted_undetermined() {
                let _ = writeln!(s, "  {}: {}  e.g. {}", why.reason(), bucket.count, bucket.samples.join(", "));
            }
        }
        if self.malformed > 0 {
            let shown: Vec<String> = self.malformed_lines.iter().map(|(f, n)| format!("{f}:{n}")).collect();
            let more = if self.malformed > shown.len() as u64 { ", …" } else { "" };
            let _ = writeln!(s, "\nmalformed lines (skipped): {}: {}{more}", self.malformed, shown.join(", "));
        }
        s
    }

    fn json(&self, header: &Header<'_>) -> serde_json::Value {
        use serde_json::json;
        let policy =
            |(path, p): (&Path, &CompiledPolicy)| json!({"path": path.display().to_string(), "revision": p.revision});
        let outcome = |o: &Outcome| json!({"status": o.status(), "code": o.code(), "label": o.to_string()});
        let apps: Vec<_> = self
            .sorted_apps()
            .into_iter()
            .map(|(app, t)| {
                let changes: Vec<_> = t
                    .sorted_changes()
                    .into_iter()
                    .map(|((from, to), b)| {
                        json!({"from": outcome(from), "to": outcome(to), "count": b.count, "samples": b.samples})
                    })
                    .collect();
                json!({
                    "app": if app == NO_APP { serde_json::Value::Null } else { json!(app) },
                    "records": t.records,
                    "unchanged": t.unchanged,
                    "changed": t.changed(),
                    "undetermined": t.undetermined,
                    "changes": changes,
                })
            })
            .collect();
        let reasons: Vec<_> = self
            .sorted_undetermined()
            .into_iter()
            .map(|(why, b)| json!({"reason": why.id(), "detail": why.reason(), "count": b.count, "samples": b.samples}))
            .collect();
        let lines: Vec<_> = self.malformed_lines.iter().map(|(f, n)| json!({"file": f, "line": n})).collect();
        json!({
            "candidate": policy(header.candidate),
            "baseline": header.baseline.map(policy),
            "logs": header.logs,
            "records": self.records,
            "decided": self.unchanged + self.changed,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "apps": apps,
            "undetermined": {"count": self.undetermined_count(), "reasons": reasons},
            "malformed": {"count": self.malformed, "lines": lines},
        })
    }
}
