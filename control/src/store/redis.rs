//! `redis://HOST:PORT[/DB]`: the store several companions share (the `redis` crate on tokio, through
//! its connection manager, which reconnects by itself after Redis restarts); `rediss://` is the
//! same over TLS (rustls on ring), with the CA and client certificate of [`super::TlsFiles`].
//!
//! Keys (all under `guardrail:v1:`, so a Redis can hold other data, and a later layout gets `v2`):
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `usage:{day}:{app}` | hash | node id → that node's counts of the app that day (JSON) | [`RETENTION_DAYS`] after the day |
//! | `usage:{day}` | hash | app → fleet totals of the day (JSON) | [`RETENTION_DAYS`] after the day |
//! | `nodes` | hash | node id → node record (JSON) | forgotten a day after last seen |
//! | `companions` | hash | companion name → its record (JSON), its heartbeat | forgotten after a day |
//! | `audit` | sorted set | `{revision}@{sha256}` by order first served | never (one per revision) |
//! | `audit:entries` | hash | `{revision}@{sha256}` → audit entry (JSON) | never |
//! | `audit:seq` | string | the order of the last entry | never |
//! | `policy:last` | string | the policy served last (JSON), to tell what the next changes | never |
//! | `events` | list | the self-service trail, oldest first (JSON entries) | never |
//! | `requests` | hash | request id → `{status, filed_at, record}` (JSON) | never |
//! | `callers` | hash | `{kind}:{id}` → count of an unregistered caller | never |
//! | `callers:last_seen` | hash | `{kind}:{id}` → Unix seconds | never |
//! | `rate:token:{client}` | string | the client's token-service bucket (its theoretical arrival time, µs) | once full again |
//!
//! Memory is bounded by apps × nodes × days kept for usage (a few hundred bytes per entry), plus
//! one record per node and revision. Every write is one command or one short Lua script, so two
//! companions never read, modify and write the same value: usage is merged by the highest count in
//! the script, which adds what it raised to the day's totals in the same step.

use super::{
    Caller, CompanionRecord, Event, NodeRecord, RequestRecord, Result, Revision, StoreError, UsageRow, RETENTION_DAYS,
};
use crate::serve::fleet::Counts;
use guardrail_core::time::SECS_PER_DAY;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const PREFIX: &str = "guardrail:v1:";
/// How long one Redis call may take before the store counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Max-merges one app's per-node counts of a day, adding each raise to the day's totals.
/// KEYS: totals `usage:{day}`, per-node `usage:{day}:{app}`. ARGV: app, expiry (Unix seconds),
/// then node, counts (JSON) pairs.
const MERGE_USAGE: &str = r"
local function load(v)
  local c = v and cjson.decode(v) or {}
  if type(c.denied) ~= 'table' then c.denied = {} end
  if type(c.connectors) ~= 'table' then c.connectors = {} end
  return c
end
local function num(x) return tonumber(x) or 0 end
local total = load(redis.call('HGET', KEYS[1], ARGV[1]))
for i = 3, #ARGV, 2 do
  local node, new = ARGV[i], load(ARGV[i + 1])
  local old = load(redis.call('HGET', KEYS[2], node))
  for _, f in ipairs({'allowed', 'throttled', 'soft_limit', 'fleet_budget'}) do
    local o, n = num(old[f]), num(new[f])
    old[f] = o
    if n > o then total[f] = num(total[f]) + n - o; old[f] = n end
  end
  for _, m in ipairs({'denied', 'connectors'}) do
    for k, n in pairs(new[m]) do
      local o = num(old[m][k])
      n = num(n)
      if n > o then total[m][k] = num(total[m][k]) + n - o; old[m][k] = n end
    end
  end
  redis.call('HSET', KEYS[2], node, cjson.encode(old))
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(total))
redis.call('EXPIREAT', KEYS[1], ARGV[2])
redis.call('EXPIREAT', KEYS[2], ARGV[2])
return 1
";

/// Takes one request from a client's token-service bucket, shared by every companion: GCRA on
/// Redis's own clock (`TIME`), so the companions' clocks do not matter. KEYS: `rate:token:{client}`.
/// ARGV: the interval between requests and the bucket's span (`requests × interval`), in
/// microseconds. Returns -1 when taken, else the microseconds until one is back. The time is kept
/// as `%.3f` (Lua's `tostring` would round a time in µs to 14 digits).
const TAKE_TOKEN_REQUEST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, span = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat + interval - span - now
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], string.format('%.3f', tat + interval), 'PX', math.ceil((tat + interval - now) / 1000) + 1000)
return -1
";

/// Adds an audit entry unless its key is there. KEYS: `audit:entries`, `audit`, `audit:seq`.
/// ARGV: key, entry (JSON).
const ADD_REVISION: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
  return 1
end
return 0
";

/// Counts an unregistered caller. KEYS: `callers`, `callers:last_seen`. ARGV: field, count, time.
const NOTE_CALLER: &str = r"
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local seen = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[3]) > seen then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
return 1
";

/// Replaces a request if its status is still ARGV[2]. KEYS: `requests`. ARGV: id, from, new (JSON).
const UPDATE_REQUEST: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or cjson.decode(old).status ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
";

/// Deletes records of a hash whose `last_seen` is before ARGV[1] (a connected node's is refreshed
/// every 30 s). KEYS: the hash.
const FORGET: &str = r"
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local r = cjson.decode(all[i + 1])
  if (tonumber(r.last_seen) or 0) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return 1
";

/// Writes node records, except that a companion saying a node disconnected does not overwrite
/// another companion's record of the node connected to it (the node moved, and the two writes
/// crossed). KEYS: `nodes`. ARGV: id, record (JSON) pairs.
const PUT_NODES: &str = r"
for i = 1, #ARGV, 2 do
  local new = cjson.decode(ARGV[i + 1])
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  old = old and cjson.decode(old)
  if not (old and (tonumber(new.streams) or 0) == 0 and (tonumber(old.streams) or 0) > 0
          and old.companion ~= new.companion) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
";

pub struct RedisStore {
    url: String,
    conn: ConnectionManager,
}

fn key(rest: &str) -> String {
    format!("{PREFIX}{rest}")
}

fn usage_key(day: u64) -> String {
    key(&format!("usage:{day}"))
}

fn app_key(day: u64, app: &str) -> String {
    key(&format!("usage:{day}:{app}"))
}

impl RedisStore {
    /// A store on `url`; it connects on first use (and again whenever the connection is lost).
    /// `rediss://` is TLS (rustls on ring): Redis's certificate must be signed by a CA of
    /// `tls.ca`, or of the system's when that is not given, and name the URL's host.
    pub fn open(url: &str, tls: &super::TlsFiles) -> anyhow::Result<RedisStore> {
        let shown = super::redacted(url);
        let client = if url.starts_with("rediss://") {
            // The files are checked now: a wrong one stops `serve` naming it, not every connection.
            let root_cert = tls.ca.as_deref().map(|p| crate::tls::certificate_pem("--store-ca", p)).transpose()?;
            let client_tls = match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: crate::tls::certificate_pem("--store-cert", cert)?,
                    client_key: crate::tls::private_key_pem("--store-key", key)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert })
                .map_err(|e| anyhow::anyhow!("--store {shown}: {e}"))?
        } else {
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("--store {shown}: {e}"))?
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("--store {shown}: {e}"))?;
        Ok(RedisStore { url: shown, conn })
    }

    fn err(&self, e: &redis::RedisError) -> StoreError {
        StoreError(format!("{}: {e}", self.url))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(TIMEOUT, cmd.query_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| self.err(&e)),
            Err(_) => Err(StoreError(format!("{}: no answer within {} s", self.url, TIMEOUT.as_secs()))),
        }
    }

    async fn pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(TIMEOUT, pipe.query_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| self.err(&e)),
            Err(_) => Err(StoreError(format!("{}: no answer within {} s", self.url, TIMEOUT.as_secs()))),
        }
    }

    async fn hash_values<T: serde::de::DeserializeOwned>(&self, hash: &str) -> Result<Vec<(String, T)>> {
        let all: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(key(hash))).await?;
        let mut out: Vec<(String, T)> = all
            .into_iter()
            .filter_map(|(field, value)| serde_json::from_str(&value).ok().map(|v| (field, v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("encoding JSON: {e}")))
}

/// Usage of `day` expires this long after the day ends.
fn expiry(day: u64) -> u64 {
    day.saturating_add(1).saturating_add(RETENTION_DAYS).saturating_mul(SECS_PER_DAY)
}

fn eval<'a>(pipe: &'a mut redis::Pipeline, script: &str, keys: &[String]) -> &'a mut redis::Pipeline {
    let cmd = pipe.cmd("EVAL").arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd
}

// === impl Store ===

#[tonic::async_trait]
impl super::Store for RedisStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn put_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let mut by_app: BTreeMap<(u64, &str), Vec<&UsageRow>> = BTreeMap::new();
        for row in rows {
            by_app.entry((row.day, row.app.as_str())).or_default().push(row);
        }
        if by_app.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for ((day, app), rows) in by_app {
            let cmd = eval(&mut pipe, MERGE_USAGE, &[usage_key(day), app_key(day, app)]).arg(app).arg(expiry(day));
            for row in rows {
                cmd.arg(&row.node).arg(json(&row.counts)?);
            }
            cmd.ignore();
        }
        self.pipe::<()>(&pipe).await
    }

    async fn usage(&self, day: u64) -> Result<Vec<UsageRow>> {
        let apps: Vec<String> = self.query(redis::cmd("HKEYS").arg(usage_key(day))).await?;
        if apps.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for app in &apps {
            pipe.cmd("HGETALL").arg(app_key(day, app));
        }
        let per_app: Vec<HashMap<String, String>> = self.pipe(&pipe).await?;
        let mut rows = Vec::new();
        for (app, nodes) in apps.into_iter().zip(per_app) {
            for (node, counts) in nodes {
                if let Ok(counts) = serde_json::from_str::<Counts>(&counts) {
                    rows.push(UsageRow { day, node, app: app.clone(), counts });
                }
            }
        }
        rows.sort_by(|a, b| (&a.app, &a.node).cmp(&(&b.app, &b.node)));
        Ok(rows)
    }

    async fn totals(&self, day: u64) -> Result<BTreeMap<String, Counts>> {
        Ok(self.hash_values::<Counts>(&format!("usage:{day}")).await?.into_iter().collect())
    }

    async fn put_nodes(&self, nodes: &[NodeRecord]) -> Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let cmd = eval(&mut pipe, PUT_NODES, &[key("nodes")]);
        for node in nodes {
            cmd.arg(&node.node_id).arg(json(node)?);
        }
        cmd.ignore();
        self.pipe(&pipe).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(self.hash_values::<NodeRecord>("nodes").await?.into_iter().map(|(_, n)| n).collect())
    }

    async fn forget_nodes(&self, before: i64) -> Result<()> {
        let mut pipe = redis::pipe();
        eval(&mut pipe, FORGET, &[key("nodes")]).arg(before).ignore();
        eval(&mut pipe, FORGET, &[key("companions")]).arg(before).ignore();
        self.pipe(&pipe).await
    }

    async fn put_companion(&self, companion: &CompanionRecord) -> Result<()> {
        self.query(redis::cmd("HSET").arg(key("companions")).arg(&companion.name).arg(json(companion)?)).await
    }

    async fn companions(&self) -> Result<Vec<CompanionRecord>> {
        Ok(self.hash_values::<CompanionRecord>("companions").await?.into_iter().map(|(_, c)| c).collect())
    }

    async fn add_revision(&self, revision: &Revision) -> Result<bool> {
        let mut pipe = redis::pipe();
        eval(&mut pipe, ADD_REVISION, &[key("audit:entries"), key("audit"), key("audit:seq")])
            .arg(revision.key())
            .arg(json(revision)?);
        let (added,): (i64,) = self.pipe(&pipe).await?;
        Ok(added == 1)
    }

    async fn revisions(&self, limit: usize) -> Result<Vec<Revision>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stop = i64::try_from(limit).unwrap_or(i64::MAX).saturating_sub(1);
        let keys: Vec<String> = self.query(redis::cmd("ZREVRANGE").arg(key("audit")).arg(0).arg(stop)).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Option<String>> = self.query(redis::cmd("HMGET").arg(key("audit:entries")).arg(&keys)).await?;
        Ok(entries.into_iter().flatten().filter_map(|e| serde_json::from_str(&e).ok()).collect())
    }

    async fn set_last_policy(&self, json: &str) -> Result<()> {
        self.query(redis::cmd("SET").arg(key("policy:last")).arg(json)).await
    }

    async fn last_policy(&self) -> Result<Option<String>> {
        self.query(redis::cmd("GET").arg(key("policy:last"))).await
    }

    async fn note_callers(&self, callers: &[Caller]) -> Result<()> {
        if callers.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for c in callers {
            eval(&mut pipe, NOTE_CALLER, &[key("callers"), key("callers:last_seen")])
                .arg(format!("{}:{}", c.kind, c.id))
                .arg(c.count)
                .arg(c.last_seen)
                .ignore();
        }
        self.pipe(&pipe).await
    }

    async fn callers(&self) -> Result<Vec<Caller>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(key("callers")).cmd("HGETALL").arg(key("callers:last_seen"));
        let (counts, seen): (HashMap<String, u64>, HashMap<String, i64>) = self.pipe(&pipe).await?;
        let mut callers: Vec<Caller> = counts
            .into_iter()
            .filter_map(|(field, count)| {
                let last_seen = seen.get(&field).copied().unwrap_or(0);
                let (kind, id) = field.split_once(':')?;
                Some(Caller { kind: kind.to_string(), id: id.to_string(), count, last_seen })
            })
            .collect();
        callers.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| (&a.kind, &a.id).cmp(&(&b.kind, &b.id))));
        Ok(callers)
    }

    async fn add_events(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let entries = events.iter().map(json).collect::<Result<Vec<String>>>()?;
        self.query(redis::cmd("RPUSH").arg(key("events")).arg(entries)).await
    }

    async fn events(&self, limit: usize) -> Result<Vec<Event>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = -i64::try_from(limit).unwrap_or(i64::MAX);
        let entries: Vec<String> = self.query(redis::cmd("LRANGE").arg(key("events")).arg(start).arg(-1)).await?;
        Ok(entries.iter().rev().filter_map(|e| serde_json::from_str(e).ok()).collect())
    }

    async fn add_request(&self, request: &RequestRecord) -> Result<bool> {
        let added: i64 =
            self.query(redis::cmd("HSETNX").arg(key("requests")).arg(&request.id).arg(json(request)?)).await?;
        Ok(added == 1)
    }

    async fn update_request(&self, from: &str, request: &RequestRecord) -> Result<bool> {
        let mut pipe = redis::pipe();
        eval(&mut pipe, UPDATE_REQUEST, &[key("requests")]).arg(&request.id).arg(from).arg(json(request)?);
        let (changed,): (i64,) = self.pipe(&pipe).await?;
        Ok(changed == 1)
    }

    async fn requests(&self) -> Result<Vec<RequestRecord>> {
        let mut all: Vec<RequestRecord> =
            self.hash_values::<RequestRecord>("requests").await?.into_iter().map(|(_, r)| r).collect();
        all.sort_by(|a, b| b.filed_at.cmp(&a.filed_at).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    async fn take_token_request(
        &self,
        client: &str,
        requests: u64,
        per: Duration,
    ) -> Result<Option<std::result::Result<(), u64>>> {
        let span = per.as_secs_f64() * 1e6;
        let interval = span / requests.max(1) as f64;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE_TOKEN_REQUEST).arg(1).arg(key(&format!("rate:token:{client}"))).arg(interval).arg(span);
        let wait: i64 = self.query(&cmd).await?;
        Ok(Some(if wait < 0 { Ok(()) } else { Err(wait.unsigned_abs().div_ceil(1_000_000).max(1)) }))
    }

    async fn prune(&self, _first_day: u64) -> Result<()> {
        // Per-day keys carry their own expiry.
        Ok(())
    }
}
