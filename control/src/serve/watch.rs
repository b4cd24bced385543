//! Where the served policy comes from, and the watcher that notices it change.
//!
//! `--policy` names a file or a directory. A directory holds exactly one policy file: the one
//! `*.yaml`, `*.yml` or `*.json` in it that is not hidden (`.name`), a backup (`name~`) or an
//! editor's scratch file (`*.swp`, `*.tmp`); none or several is an error, never a guess. (Merging
//! several documents would need rules for every list and setting; one file per directory keeps
//! "what is served" obvious, and still lets a Kubernetes ConfigMap mounted as a directory work.)
//!
//! The watcher polls: every interval it reads the file and hashes it. Polling sees atomic renames
//! (editors, `kubectl`, ConfigMap symlink swaps) and in-place writes alike, with no platform
//! notification API to go wrong. A change is acted on only once two reads in a row agree, so a
//! file caught half-written (truncated, or the prefix of a longer document, which can be valid
//! YAML) is never applied, and a file that vanishes for a moment is not reported. A file that
//! stays missing or unreadable is reported once and the last good policy stays in force.

use super::hub::{Hub, Offer};
use crate::log::log;
use guardrail_core::source::{load_document, read_file, Document};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the watcher reads the policy: a change is applied 1 to 2 intervals after it is made.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// A larger policy file is refused unread.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// The `--policy` argument.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Dir(PathBuf),
}

impl Source {
    pub fn new(path: &Path) -> Source {
        if path.is_dir() {
            Source::Dir(path.to_path_buf())
        } else {
            Source::File(path.to_path_buf())
        }
    }

    /// The policy file to read now.
    pub fn file(&self) -> Result<PathBuf, String> {
        match self {
            Source::File(file) => Ok(file.clone()),
            Source::Dir(dir) => policy_file_in(dir),
        }
    }

    /// Reads, parses and validates the policy. Errors are display lines
    /// (`file:line: path: message`).
    pub fn load(&self) -> Result<(PathBuf, String, Document), Vec<String>> {
        let (file, text) = self.read().map_err(|e| vec![e])?;
        match load_document(&text) {
            Ok(doc) => Ok((file, text, doc)),
            Err(errors) => Err(guardrail_core::source::FileErrors { file, errors: errors.0 }.lines()),
        }
    }

    /// The policy file's path and text.
    fn read(&self) -> Result<(PathBuf, String), String> {
        let file = self.file()?;
        let size =
            std::fs::metadata(&file).map_err(|e| format!("{}: cannot read the file: {e}", file.display()))?.len();
        if size > MAX_FILE_BYTES {
            return Err(format!(
                "{}: the file is {size} bytes; a policy may be at most {MAX_FILE_BYTES}",
                file.display()
            ));
        }
        let text = read_file(&file).map_err(|e| e.lines().join("; "))?;
        Ok((file, text))
    }
}

/// Whether a directory entry can be the policy file (see the module docs).
pub fn is_policy_file_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.starts_with('.') && !name.ends_with('~') && [".yaml", ".yml", ".json"].iter().any(|ext| lower.ends_with(ext))
}

fn policy_file_in(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: cannot list the directory: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: cannot list the directory: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // `entry.path()` may be a symlink (a ConfigMap's); what counts is where it leads.
        if is_policy_file_name(name) && entry.path().is_file() {
            files.push(name.to_string());
        }
    }
    files.sort();
    match files.as_slice() {
        [one] => Ok(dir.join(one)),
        [] => Err(format!("{}: holds no policy file (*.yaml, *.yml or *.json)", dir.display())),
        many => Err(format!(
            "{}: holds {} policy files ({}); a policy directory holds exactly one",
            dir.display(),
            many.len(),
            many.join(", ")
        )),
    }
}

/// What the watcher last read: a file's content (by hash), or why it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Content(PathBuf, [u8; 32]),
    Problem(String),
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Nothing new, or a change not yet confirmed by a second read.
    Nothing,
    /// A change was offered to the hub.
    Offered(Offer),
    /// The new content does not validate; these errors were logged and it was not applied.
    Invalid(Vec<String>),
    /// The policy cannot be read (vanished, ambiguous directory…); the last good one stays.
    Unreadable(String),
}

/// Polls a [`Source`] and offers each confirmed change to the hub.
pub struct Watcher {
    source: Source,
    hub: Arc<Hub>,
    /// The last read, awaiting confirmation by the next.
    pending: Option<Seen>,
    /// The last read acted on.
    handled: Option<Seen>,
}

// === impl Watcher ===

impl Watcher {
    /// A watcher of `source`, whose content `text` (read from `file`) is served already.
    pub fn new(source: Source, hub: Arc<Hub>, file: &Path, text: &str) -> Watcher {
        let seen = Seen::Content(file.to_path_buf(), hash(text));
        Watcher { source, hub, pending: Some(seen.clone()), handled: Some(seen) }
    }

    /// Polls until `stop` is set.
    pub fn run(mut self, interval: Duration, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.poll();
            std::thread::sleep(interval);
        }
    }

    /// Reads the source once and acts on a change seen twice in a row.
    pub fn poll(&mut self) -> Polled {
        let read = self.source.read();
        let seen = match &read {
            Ok((file, text)) => Seen::Content(file.clone(), hash(text)),
            Err(problem) => Seen::Problem(problem.clone()),
        };
        let confirmed = self.pending.as_ref() == Some(&seen);
        self.pending = Some(seen.clone());
        if !confirmed || self.handled.as_ref() == Some(&seen) {
            return Polled::Nothing;
        }
        self.handled = Some(seen);
        let served = self.hub.current().revision.clone();
        let (file, text) = match read {
            Ok(read) => read,
            Err(problem) => {
                log!("policy unreadable: {problem}; still serving revision {served}");
                self.hub.policy_error(problem.clone());
                return Polled::Unreadable(problem);
            }
        };
        let doc = match load_document(&text) {
            Ok(doc) => doc,
            Err(errors) => {
                let lines = guardrail_core::source::FileErrors { file: file.clone(), errors: errors.0 }.lines();
                for line in &lines {
                    log!("policy change refused: {line}");
                }
                log!("policy change refused ({} errors); still serving revision {served}", lines.len());
                self.hub.policy_error(lines.join("\n"));
                return Polled::Invalid(lines);
            }
        };
        let offer = self.hub.offer(&file, doc);
        match &offer {
            Offer::Published(revision) => {
                log!("policy revision {revision} from {}: pushing to every node (was {served})", file.display())
            }
            Offer::Unchanged(revision) => log!(
                "{} changed but its policy did not (comments or layout): still revision {revision}",
                file.display()
            ),
            Offer::Refused(why) => {
                log!("policy change refused: {why}; still serving revision {served}")
            }
        }
        Polled::Offered(offer)
    }
}

fn hash(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_file_names() {
        let cases: &[(&str, bool)] = &[
            ("policy.yaml", true),
            ("policy.yml", true),
            ("policy.json", true),
            ("POLICY.YAML", true),
            (".policy.yaml", false),
            (".policy.yaml.swp", false),
            ("policy.yaml~", false),
            ("policy.yaml.swp", false),
            ("policy.yaml.tmp", false),
            ("policy.tmp", false),
            ("4913", false),
            ("README.md", false),
            ("..data", false),
        ];
        for (name, want) in cases {
            assert_eq!(is_policy_file_name(name), *want, "{name}");
        }
    }
}
