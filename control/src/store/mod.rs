//! The companion's durable state, behind one trait ([`Store`]) with one implementation per engine:
//! [`sqlite`] (embedded, one companion: the default `sqlite:guardrail.db`) and [`redis`] (shared by
//! several companions). `guardrail serve` only ever holds a `dyn Store`, opened from `--store URL`
//! by [`open`]; every engine passes the same contract suite (`tests.rs`).
//!
//! What it holds:
//! - usage per UTC day, node and app, as the nodes report it (absolute counts, merged by keeping the
//!   highest of each count, so a repeated or reordered write is harmless), and the fleet totals per
//!   day and app derived from it, kept at least [`RETENTION_DAYS`] days;
//! - the nodes (what each acknowledged or rejected, which companion it is connected to, when it was
//!   last seen) and the companions themselves (what each serves, when it was last alive);
//! - the audit trail: every policy revision served, first time first;
//! - the unregistered callers seen (unknown API key fingerprints, unregistered app ids);
//! - the self-service trail ([`Event`]: every JIT token the token service issued, every request
//!   filed, approved, rejected or expired) and the requests themselves ([`RequestRecord`]).

pub mod redis;
pub mod sqlite;

#[cfg(test)]
pub(crate) mod tests;

use crate::serve::fleet::Counts;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Usage is kept at least this many days (SQLite prunes older days; Redis keys of a day expire
/// this long after the day ends).
pub const RETENTION_DAYS: u64 = 400;

/// The first day whose usage is kept on `today`.
pub fn first_kept_day(today: u64) -> u64 {
    today.saturating_sub(RETENTION_DAYS)
}

/// A store operation that failed; the message names the store and the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

pub type Result<T> = std::result::Result<T, StoreError>;

/// One node's counts of one app on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: u64,
    pub node: String,
    pub app: String,
    pub counts: Counts,
}

/// A node (Envoy process) as the fleet last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeRecord {
    pub node_id: String,
    /// The companion whose stream it opened last.
    pub companion: String,
    pub envoy_version: String,
    pub filter_version: String,
    pub acked_revision: String,
    pub nacked_revision: String,
    pub last_error: String,
    pub last_seen: i64,
    /// Streams open on `companion` when it wrote this (0: disconnected).
    pub streams: u32,
    pub client_certificate: String,
}

/// A companion, as it last said it was alive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompanionRecord {
    pub name: String,
    /// The revision it serves, and the content's SHA-256 (hex).
    pub revision: String,
    pub content_sha256: String,
    pub started: i64,
    pub last_seen: i64,
}

/// One difference between two policies: `kind` (`app`, `tier`, `dataset`, `rule`, `connector`,
/// `settings`, …), `id`, `action` (`added`, `removed`, `changed`, `lifecycle`, `tier`) and for the
/// latter two the values before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Change {
    pub kind: String,
    pub id: String,
    pub action: String,
    pub from: String,
    pub to: String,
}

/// A revision served, in the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Revision {
    pub revision: String,
    /// SHA-256 (hex) of the policy as compact JSON.
    pub content_sha256: String,
    /// Unix seconds when a companion first served it.
    pub first_served: i64,
    /// The file it was read from.
    pub source: String,
    /// The companion that served it first.
    pub companion: String,
    /// What changed from the revision served before it (empty for the first one).
    pub changes: Vec<Change>,
}

impl Revision {
    /// The identity of an entry: a revision label with one content.
    pub fn key(&self) -> String {
        format!("{}@{}", self.revision, self.content_sha256)
    }
}

/// A caller the catalog does not know: `kind` `api-key` (id: the key's fingerprint) or `app` (id:
/// the app id a valid token names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub kind: String,
    pub id: String,
    pub count: u64,
    pub last_seen: i64,
}

/// One entry of the self-service trail: `kind` `token` (id: the token's `jti`), or `request-filed`,
/// `request-approved`, `request-rejected`, `request-expired` (id: the request's id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Event {
    /// Unix seconds.
    pub at: i64,
    pub kind: String,
    pub id: String,
    /// The app it concerns.
    pub app: String,
    /// Who acted: the app (a token, a request filed) or the approver.
    pub actor: String,
    /// What: the token's scope and expiry, the request's change, the reason given.
    pub detail: String,
    /// The companion that recorded it.
    pub companion: String,
}

/// A self-service request as stored: its fields are those of the HTTP API (`serde_json` object),
/// with `status` kept apart so that a change of status is a compare-and-set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestRecord {
    pub id: String,
    /// `pending`, `approved`, `rejected`, `expired`.
    pub status: String,
    /// Unix seconds when it was filed (the order of the list).
    pub filed_at: i64,
    /// The whole request (JSON).
    pub record: String,
}

/// The companion's durable state. Every method may fail (the engine is down, the disk full); the
/// caller keeps what it could not write and tries again.
#[tonic::async_trait]
pub trait Store: Send + Sync {
    /// The store's URL as given, without a password (for logs and `status`).
    fn url(&self) -> &str;

    /// Records usage rows, keeping per (day, node, app) the highest of each count, and adds what
    /// they raise to the day's fleet totals.
    async fn put_usage(&self, rows: &[UsageRow]) -> Result<()>;
    /// Every node's usage of `day`.
    async fn usage(&self, day: u64) -> Result<Vec<UsageRow>>;
    /// The fleet totals per app of `day` (the sum over nodes of [`Store::usage`]).
    async fn totals(&self, day: u64) -> Result<BTreeMap<String, Counts>>;

    /// Writes node records (each replaces the one of the same id), except a record of a node
    /// without streams from one companion over a record of it connected to another (the node
    /// moved; the disconnection's write came last).
    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()>;
    async fn nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Forgets nodes and companions last seen before `before` (Unix seconds; a companion refreshes
    /// its connected nodes' every 30 s).
    async fn forget_nodes(&self, before: i64) -> Result<()>;

    /// Writes the record of one companion (its heartbeat).
    async fn put_companion(&self, companion: &CompanionRecord) -> Result<()>;
    async fn companions(&self) -> Result<Vec<CompanionRecord>>;

    /// Adds a revision to the audit trail unless an entry with its [`Revision::key`] exists (then
    /// the first one stays, with its time). True when added.
    async fn add_revision(&self, revision: &Revision) -> Result<bool>;
    /// The newest `limit` revisions, newest first.
    async fn revisions(&self, limit: usize) -> Result<Vec<Revision>>;
    /// The policy (compact JSON) served last, to tell what the next one changes.
    async fn set_last_policy(&self, json: &str) -> Result<()>;
    async fn last_policy(&self) -> Result<Option<String>>;

    /// Adds to the counts of unregistered callers (and moves their last seen forward).
    async fn note_callers(&self, callers: &[Caller]) -> Result<()>;
    /// Every unregistered caller, most frequent first.
    async fn callers(&self) -> Result<Vec<Caller>>;

    /// Appends entries to the self-service trail.
    async fn add_events(&self, events: &[Event]) -> Result<()>;
    /// The newest `limit` entries of the trail, newest first.
    async fn events(&self, limit: usize) -> Result<Vec<Event>>;

    /// Adds a new request; false (and nothing written) when one with its id exists.
    async fn add_request(&self, request: &RequestRecord) -> Result<bool>;
    /// Replaces request `request.id` if its status is still `from` (compare-and-set: of two
    /// approvers, or two companions, one wins). True when replaced.
    async fn update_request(&self, from: &str, request: &RequestRecord) -> Result<bool>;
    /// Every request, newest first.
    async fn requests(&self) -> Result<Vec<RequestRecord>>;

    /// Drops usage of days before `first_day` where the engine does not expire it by itself.
    async fn prune(&self, first_day: u64) -> Result<()>;

    /// Takes one token-service request of `client` from a bucket every companion of this store
    /// shares: `requests` at once, refilled at `requests` per `per`, on the store's clock.
    /// `Ok(Some(Ok(())))` when taken, `Ok(Some(Err(secs)))` when empty (one is back in `secs`, at
    /// least 1). `Ok(None)` from a store only one companion can use (SQLite): its bucket in memory
    /// is already exact.
    async fn take_token_request(
        &self,
        client: &str,
        requests: u64,
        per: Duration,
    ) -> Result<Option<std::result::Result<(), u64>>> {
        let _ = (client, requests, per);
        Ok(None)
    }
}

/// The default store: a SQLite file in the working directory.
pub const DEFAULT_URL: &str = "sqlite:guardrail.db";

/// The files a `rediss://` store is reached with (`serve --store-ca/--store-cert/--store-key`):
/// the CA (PEM) that signed Redis's certificate, instead of the system's CAs, and a client
/// certificate and key (PEM) for a Redis that requires one (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFiles {
    /// With `--store rediss://…`: trust only the CAs of this PEM file for Redis's certificate
    /// (default: the system's CAs).
    #[arg(long = "store-ca", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// With `--store rediss://…`: present this PEM client certificate (chain) to Redis, with
    /// --store-key.
    #[arg(long = "store-cert", value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The PEM private key of --store-cert.
    #[arg(long = "store-key", value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn given(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Opens the store of `url`: `sqlite:PATH`, `redis://HOST:PORT[/DB]` or `rediss://…` (TLS, with
/// `tls`). SQLite fails here when the file is held by another companion; Redis does not fail for
/// being unreachable (the store reports it on each operation and reconnects by itself).
pub async fn open(url: &str, tls: &TlsFiles) -> anyhow::Result<Arc<dyn Store>> {
    if tls.given() && !url.starts_with("rediss://") {
        return Err(crate::UsageError(format!(
            "--store-ca, --store-cert and --store-key are for a TLS store (--store rediss://HOST:PORT[/DB]), not {}",
            redacted(url)
        ))
        .into());
    }
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            anyhow::bail!("--store {url}: sqlite: needs a file path, e.g. sqlite:guardrail.db");
        }
        let store = sqlite::SqliteStore::open(std::path::Path::new(path), url).await?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(redis::RedisStore::open(url, tls)?));
    }
    Err(crate::UsageError(format!(
        "--store {}: expected sqlite:PATH, redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB]",
        redacted(url)
    ))
    .into())
}

/// `url` without the password of its user-info part (`redis://:secret@h` → `redis://:***@h`).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}
