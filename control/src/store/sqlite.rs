//! `sqlite:PATH`: the embedded store of one companion (rusqlite, SQLite compiled in, WAL).
//!
//! One companion owns the file: it holds an exclusive lock on `PATH.lock` (released by the kernel
//! when the process dies, `kill -9` included), and a second companion started on the same file is
//! refused with an error naming the holder. Operations run on tokio's blocking pool, one at a time.
//!
//! WAL with `synchronous=NORMAL`: a committed write survives the process being killed; a power cut
//! may lose the last transactions (the companion writes a batch a second).

use super::{Caller, CompanionRecord, Event, NodeRecord, RequestRecord, Result, Revision, StoreError, UsageRow};
use crate::serve::fleet::Counts;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    day INTEGER NOT NULL, node TEXT NOT NULL, app TEXT NOT NULL,
    allowed INTEGER NOT NULL, throttled INTEGER NOT NULL, soft_limit INTEGER NOT NULL,
    denied TEXT NOT NULL,
    PRIMARY KEY (day, app, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    day INTEGER NOT NULL, app TEXT NOT NULL,
    allowed INTEGER NOT NULL, throttled INTEGER NOT NULL, soft_limit INTEGER NOT NULL,
    denied TEXT NOT NULL,
    PRIMARY KEY (day, app)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, companion TEXT NOT NULL, last_seen INTEGER NOT NULL, streams INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS companions (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    key TEXT PRIMARY KEY, first_served INTEGER NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revisions_in_order ON revisions (seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, filed_at INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS callers (
    kind TEXT NOT NULL, id TEXT NOT NULL, count INTEGER NOT NULL, last_seen INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
";

pub struct SqliteStore {
    url: String,
    conn: Arc<Mutex<Connection>>,
    /// Held (locked) for the life of the store.
    _lock: File,
}

fn err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError(format!("sqlite:{}: {e}", path.display()))
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, refusing it when another companion holds it.
    pub async fn open(path: &Path, url: &str) -> anyhow::Result<SqliteStore> {
        let lock = lock_file(path)?;
        let path_buf = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || init(&path_buf))
            .await
            .map_err(|e| anyhow::anyhow!("opening {url}: {e}"))??;
        Ok(SqliteStore { url: super::redacted(url), conn: Arc::new(Mutex::new(conn)), _lock: lock })
    }

    /// Runs `f` on the connection, on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn).map_err(|e| StoreError(format!("{url}: {e}")))
        })
        .await
        .map_err(|e| StoreError(format!("{}: {e}", self.url)))?
    }
}

/// Takes the exclusive lock on `PATH.lock`, writing this process's id into it.
fn lock_file(path: &Path) -> anyhow::Result<File> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path).map_err(
            |e| anyhow::anyhow!("--store sqlite:{}: cannot open {}: {e}", path.display(), lock_path.display()),
        )?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let by = if holder.is_empty() { String::new() } else { format!(" (process {holder})") };
            anyhow::bail!(
                "--store sqlite:{}: the database is in use by another companion{by}; one companion owns a SQLite \
                 store: stop the other one, give this one another file, or share state through --store redis://…",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("--store sqlite:{}: cannot lock {}: {e}", path.display(), lock_path.display())
        }
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

fn init(path: &Path) -> anyhow::Result<Connection> {
    let e = err(path);
    let conn = Connection::open(path).map_err(&e)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(&e)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(&e)?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("sqlite:{}: cannot use write-ahead logging (journal mode {mode})", path.display());
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL;").map_err(&e)?;
    conn.execute_batch(SCHEMA).map_err(&e)?;
    // Stores made before the console's counts (fleet-budget refusals, connectors) gain the column.
    for table in ["usage", "totals"] {
        let has: bool = conn
            .query_row(&format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = 'extra'"), [], |r| {
                r.get::<_, i64>(0).map(|n| n > 0)
            })
            .map_err(&e)?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN extra TEXT NOT NULL DEFAULT '{{}}'"))
                .map_err(&e)?;
        }
    }
    Ok(conn)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn json<T: serde::Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// `allowed`, `throttled` and `soft_limit` as SQLite integers.
fn scalars(c: &Counts) -> [i64; 3] {
    [to_i64(c.allowed), to_i64(c.throttled), to_i64(c.soft_limit)]
}

/// The counts kept in the `extra` column (JSON): fleet-budget refusals and connectors.
#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(default)]
struct Extra {
    fleet_budget: u64,
    connectors: BTreeMap<String, u64>,
}

fn extra(c: &Counts) -> rusqlite::Result<String> {
    json(&Extra { fleet_budget: c.fleet_budget, connectors: c.connectors.clone() })
}

/// Counts from the columns `allowed, throttled, soft_limit, denied, extra` starting at `first`.
fn counts_of(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Counts> {
    let denied: String = row.get(first + 3)?;
    let extra: Extra = from_json(&row.get::<_, String>(first + 4)?)?;
    Ok(Counts {
        allowed: to_u64(row.get(first)?),
        throttled: to_u64(row.get(first + 1)?),
        soft_limit: to_u64(row.get(first + 2)?),
        denied: from_json(&denied)?,
        fleet_budget: extra.fleet_budget,
        connectors: extra.connectors,
    })
}

// === impl Store ===

#[tonic::async_trait]
impl super::Store for SqliteStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn put_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let rows = rows.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut get = tx.prepare_cached(
                    "SELECT allowed, throttled, soft_limit, denied, extra FROM usage
                     WHERE day = ?1 AND app = ?2 AND node = ?3",
                )?;
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO usage (day, node, app, allowed, throttled, soft_limit, denied, extra)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                let mut get_total = tx.prepare_cached(
                    "SELECT allowed, throttled, soft_limit, denied, extra FROM totals WHERE day = ?1 AND app = ?2",
                )?;
                let mut put_total = tx.prepare_cached(
                    "INSERT OR REPLACE INTO totals (day, app, allowed, throttled, soft_limit, denied, extra)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                // The store's only writer is this process (the lock): reading and writing in one
                // transaction is atomic here; Redis does the same in a script.
                // A fleet total is read and written once per (day, app) of the batch, not once per
                // row: at 10,000 nodes reporting 3 apps each second, 30,000 rows a second fall on
                // about a thousand apps' totals.
                let mut grown: BTreeMap<(i64, String), Counts> = BTreeMap::new();
                for row in rows {
                    let day = to_i64(row.day);
                    let stored = get.query_row(params![day, row.app, row.node], |r| counts_of(r, 0)).optional()?;
                    let known = stored.is_some();
                    let before = stored.unwrap_or_default();
                    let mut counts = before.clone();
                    counts.merge_max(&row.counts);
                    // A row the batch does not move (a node marked dirty for another app of it).
                    if known && counts == before {
                        continue;
                    }
                    let [a, t, s] = scalars(&counts);
                    put.execute(params![day, row.node, row.app, a, t, s, json(&counts.denied)?, extra(&counts)?])?;
                    grown.entry((day, row.app)).or_default().add(&counts.minus(&before));
                }
                for ((day, app), delta) in grown {
                    let mut total =
                        get_total.query_row(params![day, app], |r| counts_of(r, 0)).optional()?.unwrap_or_default();
                    total.add(&delta);
                    let [a, t, s] = scalars(&total);
                    put_total.execute(params![day, app, a, t, s, json(&total.denied)?, extra(&total)?])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn usage(&self, day: u64) -> Result<Vec<UsageRow>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT node, app, allowed, throttled, soft_limit, denied, extra FROM usage WHERE day = ?1
                 ORDER BY app, node",
            )?;
            let rows = stmt.query_map([to_i64(day)], |r| {
                Ok(UsageRow { day, node: r.get(0)?, app: r.get(1)?, counts: counts_of(r, 2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn totals(&self, day: u64) -> Result<BTreeMap<String, Counts>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT app, allowed, throttled, soft_limit, denied, extra FROM totals WHERE day = ?1",
            )?;
            let rows = stmt.query_map([to_i64(day)], |r| Ok((r.get(0)?, counts_of(r, 1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()> {
        let nodes = nodes.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                // As on Redis: a disconnection does not overwrite another companion's connection.
                let mut put = tx.prepare_cached(
                    "INSERT INTO nodes (node_id, companion, last_seen, streams, record) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (node_id) DO UPDATE SET companion = excluded.companion,
                     last_seen = excluded.last_seen, streams = excluded.streams, record = excluded.record
                     WHERE NOT (excluded.streams = 0 AND nodes.streams > 0 AND nodes.companion != excluded.companion)",
                )?;
                for node in nodes {
                    put.execute(params![node.node_id, node.companion, node.last_seen, node.streams, json(&node)?])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT record FROM nodes ORDER BY node_id")?;
            let rows = stmt.query_map([], |r| from_json(&r.get::<_, String>(0)?))?;
            rows.collect()
        })
        .await
    }

    async fn forget_nodes(&self, before: i64) -> Result<()> {
        self.with(move |conn| {
            conn.execute("DELETE FROM nodes WHERE last_seen < ?1", [before])?;
            conn.execute("DELETE FROM companions WHERE json_extract(record, '$.last_seen') < ?1", [before]).map(|_| ())
        })
        .await
    }

    async fn put_companion(&self, companion: &CompanionRecord) -> Result<()> {
        let companion = companion.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO companions (name, record) VALUES (?1, ?2)",
                params![companion.name, json(&companion)?],
            )
            .map(|_| ())
        })
        .await
    }

    async fn companions(&self) -> Result<Vec<CompanionRecord>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT record FROM companions ORDER BY name")?;
            let rows = stmt.query_map([], |r| from_json(&r.get::<_, String>(0)?))?;
            rows.collect()
        })
        .await
    }

    async fn add_revision(&self, revision: &Revision) -> Result<bool> {
        let revision = revision.clone();
        self.with(move |conn| {
            let added = conn.execute(
                "INSERT OR IGNORE INTO revisions (key, first_served, seq, record)
                 VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM revisions), ?3)",
                params![revision.key(), revision.first_served, json(&revision)?],
            )?;
            Ok(added == 1)
        })
        .await
    }

    async fn revisions(&self, limit: usize) -> Result<Vec<Revision>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT record FROM revisions ORDER BY seq DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit], |r| from_json(&r.get::<_, String>(0)?))?;
            rows.collect()
        })
        .await
    }

    async fn set_last_policy(&self, json: &str) -> Result<()> {
        let json = json.to_string();
        self.with(move |conn| {
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_policy', ?1)", [json]).map(|_| ())
        })
        .await
    }

    async fn last_policy(&self) -> Result<Option<String>> {
        self.with(|conn| {
            conn.query_row("SELECT value FROM meta WHERE key = 'last_policy'", [], |r| r.get(0)).optional()
        })
        .await
    }

    async fn note_callers(&self, callers: &[Caller]) -> Result<()> {
        let callers = callers.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT INTO callers (kind, id, count, last_seen) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind, id) DO UPDATE SET count = count + excluded.count,
                     last_seen = MAX(last_seen, excluded.last_seen)",
                )?;
                for c in callers {
                    put.execute(params![c.kind, c.id, to_i64(c.count), c.last_seen])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn callers(&self) -> Result<Vec<Caller>> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT kind, id, count, last_seen FROM callers ORDER BY count DESC, kind, id")?;
            let rows = stmt.query_map([], |r| {
                Ok(Caller { kind: r.get(0)?, id: r.get(1)?, count: to_u64(r.get(2)?), last_seen: r.get(3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn add_events(&self, events: &[Event]) -> Result<()> {
        let events = events.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut put = tx.prepare_cached("INSERT INTO events (record) VALUES (?1)")?;
                for e in &events {
                    put.execute([json(e)?])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn events(&self, limit: usize) -> Result<Vec<Event>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT record FROM events ORDER BY seq DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit], |r| from_json(&r.get::<_, String>(0)?))?;
            rows.collect()
        })
        .await
    }

    async fn add_request(&self, request: &RequestRecord) -> Result<bool> {
        let r = request.clone();
        self.with(move |conn| {
            let added = conn.execute(
                "INSERT OR IGNORE INTO requests (id, status, filed_at, record) VALUES (?1, ?2, ?3, ?4)",
                params![r.id, r.status, r.filed_at, r.record],
            )?;
            Ok(added == 1)
        })
        .await
    }

    async fn update_request(&self, from: &str, request: &RequestRecord) -> Result<bool> {
        let (r, from) = (request.clone(), from.to_string());
        self.with(move |conn| {
            let changed = conn.execute(
                "UPDATE requests SET status = ?2, record = ?3 WHERE id = ?1 AND status = ?4",
                params![r.id, r.status, r.record, from],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn requests(&self) -> Result<Vec<RequestRecord>> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, status, filed_at, record FROM requests ORDER BY filed_at DESC, id")?;
            let rows = stmt.query_map([], |r| {
                Ok(RequestRecord { id: r.get(0)?, status: r.get(1)?, filed_at: r.get(2)?, record: r.get(3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn prune(&self, first_day: u64) -> Result<()> {
        self.with(move |conn| {
            conn.execute("DELETE FROM usage WHERE day < ?1", [to_i64(first_day)])?;
            conn.execute("DELETE FROM totals WHERE day < ?1", [to_i64(first_day)]).map(|_| ())
        })
        .await
    }
}
