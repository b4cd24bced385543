//! Where the served policy comes from, and the watcher that notices it change.
//!
//! `--policy` names a file or a directory. A directory holds exactly one policy file: the one
//! `*.yaml`, `*.yml` or `*.json` in it that is not hidden (`.name`), a backup (`name~`) or an
//! editor's scratch file (`*.swp`, `*.tmp`); none or several is an error, never a guess. (Merging
//! several documents would need rules for every list and setting; one file per directory keeps
//! "what is served" obvious, and still lets a Kubernetes ConfigMap mounted as a directory work.)
//!
//! The watcher polls every [`POLL_INTERVAL`] (5 ms): a `stat` of the file (device, inode, size,
//! modification and change times), which sees atomic renames (editors, `kubectl`, ConfigMap
//! symlink swaps) and in-place writes alike, with no platform notification API to go wrong. When
//! the `stat` changes the file is read once (and discarded if the `stat` changed while it was
//! read); content equal to what was acted on last is a touch, nothing more. File times are coarse
//! (a kernel tick), so a second write within one tick may leave the `stat` as it was: until the
//! file has been read once more than [`RACY`] after its modification time, it is read again on
//! every poll (git's "racy" rule).
//!
//! A half-written file is never applied. A complete JSON document is acted on at once: a JSON
//! text ends with the `}` that closes it, so a file caught half-written (truncated, or the prefix
//! of the new document) does not parse as one. Anything else (YAML, whose prefix is often valid
//! YAML, or JSON with an error) is acted on only once [`CONFIRM_POLLS`] polls in a row saw the
//! same file and content (20 ms without a write). A file that vanishes for a moment is not
//! reported either; one that stays missing or unreadable is reported once and the last good policy
//! stays in force. Each change is read once, parsed and compiled once, and pushed.

use super::hub::{Hub, Offer};
use crate::log::log;
use guardrail_core::rules::ExpressionCache;
use guardrail_core::source::{load_document, load_json_document, load_yaml_document, read_file, Document};
use guardrail_core::PolicyErrors;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the watcher looks at the policy (a `stat`; a read only when that changed).
/// (A `stat` costs microseconds; the interval is most of the time a JSON change takes to be noticed.)
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Polls in a row that must see the same file before a change that is not a complete JSON
/// document is acted on: four intervals (20 ms) without a write.
pub const CONFIRM_POLLS: u32 = 5;

/// What polls in a row have seen: the count of the same value seen last (see [`CONFIRM_POLLS`]).
/// Used by the policy's watcher and the candidate file's.
#[derive(Debug)]
pub struct Streak<T>(Option<(T, u32)>);

impl<T> Default for Streak<T> {
    fn default() -> Self {
        Streak(None)
    }
}

impl<T: PartialEq> Streak<T> {
    /// Records `value` as seen by one more poll; how many polls in a row have seen it.
    pub fn see(&mut self, value: T) -> u32 {
        match &mut self.0 {
            Some((seen, n)) if *seen == value => {
                *n += 1;
                *n
            }
            _ => {
                self.0 = Some((value, 1));
                1
            }
        }
    }

    /// Starts over (what was seen has been acted on, or is gone).
    pub fn clear(&mut self) {
        self.0 = None;
    }
}
/// A `stat` is trusted alone once the file was read this long after its modification time (more
/// than a kernel tick, the granularity of file times; see [`Stamp::racy`]).
pub const RACY: Duration = Duration::from_millis(30);
/// The same for file systems that keep whole seconds (FAT even two).
const RACY_COARSE: Duration = Duration::from_millis(2500);
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
        let stamp = self.stamp()?;
        let text = read_checked(&stamp)?;
        Ok((stamp.file, text))
    }

    /// The policy file and its `stat`.
    pub fn stamp(&self) -> Result<Stamp, String> {
        let file = self.file()?;
        let meta = std::fs::metadata(&file).map_err(|e| format!("{}: cannot read the file: {e}", file.display()))?;
        Ok(Stamp::of(file, &meta))
    }

    /// The text of the file `stamp` names, if the file still has that `stamp` after it was read
    /// (`None`: it is being written; look again at the next poll).
    fn read_at(&self, stamp: &Stamp) -> Result<Option<String>, String> {
        let text = read_checked(stamp)?;
        let after = std::fs::metadata(&stamp.file).map(|meta| Stamp::of(stamp.file.clone(), &meta)).ok();
        Ok((after.as_ref() == Some(stamp)).then_some(text))
    }
}

/// Reads the file of `stamp`, refusing one larger than [`MAX_FILE_BYTES`].
fn read_checked(stamp: &Stamp) -> Result<String, String> {
    if stamp.len > MAX_FILE_BYTES {
        return Err(format!(
            "{}: the file is {} bytes; a policy may be at most {MAX_FILE_BYTES}",
            stamp.file.display(),
            stamp.len
        ));
    }
    read_file(&stamp.file).map_err(|e| e.lines().join("; "))
}

/// What `stat` says of the policy file: any write or replacement changes it, except a second write
/// of the same size within one tick of the file-time clock (see [`Stamp::racy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    file: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    /// Device, inode and change time (seconds, nanoseconds), where the platform has them.
    ids: [i64; 4],
}

// === impl Stamp ===

impl Stamp {
    fn of(file: PathBuf, meta: &std::fs::Metadata) -> Stamp {
        #[cfg(unix)]
        let ids = {
            use std::os::unix::fs::MetadataExt;
            // Device and inode numbers are compared, never computed with: wrapping is harmless.
            [meta.dev() as i64, meta.ino() as i64, meta.ctime(), meta.ctime_nsec()]
        };
        #[cfg(not(unix))]
        let ids = [0; 4];
        Stamp { file, len: meta.len(), modified: meta.modified().ok(), ids }
    }

    /// A stamp no file has, for content whose stamp is not known yet.
    fn unknown(file: &Path) -> Stamp {
        Stamp { file: file.to_path_buf(), len: u64::MAX, modified: None, ids: [-1; 4] }
    }

    /// Whether a write after a read made at `read_at` could leave this stamp as it is: the read was
    /// within one tick of the file-time clock after the modification (or before it: a clock step).
    pub fn racy(&self, read_at: SystemTime) -> bool {
        let Some(modified) = self.modified else {
            return true;
        };
        let whole_seconds = modified.duration_since(UNIX_EPOCH).is_ok_and(|t| t.subsec_nanos() == 0);
        let window = if whole_seconds { RACY_COARSE } else { RACY };
        read_at.duration_since(modified).map_or(true, |age| age < window)
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

/// What the watcher acted on last: a file's text as of a stamp and the time it was read (kept
/// whole: comparing it costs less than hashing it), or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    Content(Stamp, String, SystemTime),
    Problem(String),
}

/// A change waiting for confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Content(Stamp, String),
    Problem(String),
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Nothing new, or a change not yet confirmed.
    Nothing,
    /// A change was offered to the hub.
    Offered(Offer),
    /// The new content does not validate; these errors were logged and it was not applied.
    Invalid(Vec<String>),
    /// The policy cannot be read (vanished, ambiguous directory…); the last good one stays.
    Unreadable(String),
}

/// Polls a [`Source`] and offers each change to the hub.
pub struct Watcher {
    source: Source,
    hub: Arc<Hub>,
    handled: Handled,
    /// A change seen in polls in a row, not acted on yet.
    pending: Streak<Seen>,
    /// The rules' expressions of the last change loaded, for the next one.
    expressions: ExpressionCache,
}

// === impl Watcher ===

impl Watcher {
    /// A watcher of `source`, whose content `text` (read from `file`) is served already.
    pub fn new(source: Source, hub: Arc<Hub>, file: &Path, text: &str) -> Watcher {
        let handled = Handled::Content(Stamp::unknown(file), text.to_string(), UNIX_EPOCH);
        Watcher { source, hub, handled, pending: Streak::default(), expressions: ExpressionCache::default() }
    }

    /// Polls until `stop` is set.
    pub fn run(mut self, interval: Duration, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.poll();
            std::thread::sleep(interval);
        }
    }

    /// Looks at the source once and acts on a change (see the module docs for when).
    pub fn poll(&mut self) -> Polled {
        let stamp = match self.source.stamp() {
            Ok(stamp) => stamp,
            Err(problem) => return self.confirm(Seen::Problem(problem), None),
        };
        if let Handled::Content(done, _, read_at) = &self.handled {
            if *done == stamp && !stamp.racy(*read_at) {
                self.pending.clear();
                return Polled::Nothing;
            }
        }
        let read_at = SystemTime::now();
        let text = match self.source.read_at(&stamp) {
            Ok(Some(text)) => text,
            Ok(None) => return Polled::Nothing,
            Err(problem) => return self.confirm(Seen::Problem(problem), None),
        };
        if let Handled::Content(done, done_text, done_read_at) = &mut self.handled {
            if *done_text == text && done.file == stamp.file {
                // Touched, or a recently written file read again: the content acted on.
                *done = stamp;
                *done_read_at = read_at;
                self.pending.clear();
                return Polled::Nothing;
            }
        }
        if let Some(loaded) = load_json_document(&text, &mut self.expressions) {
            self.pending.clear();
            let file = stamp.file.clone();
            self.handled = Handled::Content(stamp, text, read_at);
            return self.act(&file, loaded);
        }
        self.confirm(Seen::Content(stamp, text), Some(read_at))
    }

    /// Acts on `seen` once it was seen in [`CONFIRM_POLLS`] polls in a row.
    fn confirm(&mut self, seen: Seen, read_at: Option<SystemTime>) -> Polled {
        if self.pending.see(seen.clone()) < CONFIRM_POLLS {
            return Polled::Nothing;
        }
        self.pending.clear();
        match (seen, read_at) {
            (Seen::Problem(problem), _) => {
                if self.handled == Handled::Problem(problem.clone()) {
                    return Polled::Nothing;
                }
                self.handled = Handled::Problem(problem.clone());
                let served = self.hub.current().revision.clone();
                log!("policy unreadable: {problem}; still serving revision {served}");
                self.hub.policy_error(problem.clone());
                Polled::Unreadable(problem)
            }
            (Seen::Content(stamp, text), Some(read_at)) => {
                let file = stamp.file.clone();
                let loaded = load_yaml_document(&text, &mut self.expressions);
                self.handled = Handled::Content(stamp, text, read_at);
                self.act(&file, loaded)
            }
            (Seen::Content(..), None) => Polled::Nothing,
        }
    }

    /// Offers a loaded change to the hub, or logs why it is refused.
    fn act(&mut self, file: &Path, loaded: Result<Document, PolicyErrors>) -> Polled {
        let served = self.hub.current().revision.clone();
        let doc = match loaded {
            Ok(doc) => doc,
            Err(errors) => {
                let lines = guardrail_core::source::FileErrors { file: file.to_path_buf(), errors: errors.0 }.lines();
                for line in &lines {
                    log!("policy change refused: {line}");
                }
                log!("policy change refused ({} errors); still serving revision {served}", lines.len());
                self.hub.policy_error(lines.join("\n"));
                return Polled::Invalid(lines);
            }
        };
        let offer = self.hub.offer(file, doc);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A streak counts the same value in polls in a row; another value or a clear starts over.
    #[test]
    fn a_streak_counts_the_same_value_in_a_row() {
        let mut streak = Streak::default();
        assert_eq!((streak.see("a"), streak.see("a"), streak.see("a")), (1, 2, 3));
        assert_eq!(streak.see("b"), 1, "another value starts over");
        streak.clear();
        assert_eq!(streak.see("b"), 1, "a clear starts over");
    }

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
