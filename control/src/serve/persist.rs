//! The store task of `guardrail serve`: loads the fleet from the store on start, then once a
//! second writes what changed (usage, nodes, revisions served) and reads what the other companions
//! sharing the store wrote (fleet totals, nodes, companions).
//!
//! Reports never wait for the store: the hub marks what a report changed, and this task takes the
//! marks (and the counts as they are then) once per [`INTERVAL`]. A write that fails is kept marked
//! and written with the next batch, so a store that comes back catches up; a crash loses at most
//! the reports of one interval, which live nodes send again (they are absolute counts).
//!
//! While the store is unavailable, policy push goes on, fleet budgets count what this companion
//! knows (its own nodes and the last totals the store gave), `status` says `store: unavailable`,
//! and the log says so once a minute at most.

use super::audit;
use super::hub::{Hub, Served, COMPANION_ALIVE_SECS};
use crate::log::log;
use crate::store::{first_kept_day, Revision, Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often usage and node changes are written, and the store read.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How often the nodes and companions of the whole fleet are read from the store.
const FLEET_EVERY: u32 = 2;
/// How often this companion's connected nodes are written even unchanged (their `last_seen`).
const HEARTBEAT_EVERY: u32 = 30;
/// How often old usage and long-gone nodes are dropped.
const PRUNE_EVERY: u32 = 3_600;
/// A store still unavailable is logged again after this long.
const LOG_AGAIN: Duration = Duration::from_secs(60);
/// Disconnected nodes and silent companions are forgotten by the store after this long.
const FORGET_AFTER_SECS: i64 = 86_400;

pub struct Persist {
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    started: i64,
    /// The policy served last (JSON), to tell what the next one changes; `None` until loaded.
    last_policy: Option<serde_json::Value>,
    loaded: bool,
    /// `Some(since)` while the store is unavailable, with when that was last logged.
    down: Option<Instant>,
    ticks: u32,
    /// Whether another live companion shares the store, as it said last.
    others: bool,
}

impl Persist {
    pub fn new(hub: Arc<Hub>, store: Arc<dyn Store>) -> Persist {
        let started = hub.now();
        Persist { hub, store, started, last_policy: None, loaded: false, down: None, ticks: 0, others: false }
    }

    /// Reads the fleet as the store has it: today's and yesterday's usage of every node (so fleet
    /// budgets count nodes that went away), the nodes, the companions, and the policy served last.
    pub async fn load(&mut self) -> Result<(), StoreError> {
        let started = Instant::now();
        let today = self.hub.today();
        let mut usage = self.store.usage(today.saturating_sub(1)).await?;
        usage.extend(self.store.usage(today).await?);
        let nodes = self.store.nodes().await?;
        let companions = self.store.companions().await?;
        let totals = self.store.totals(today).await?;
        let last = self.store.last_policy().await?;
        self.last_policy = last.and_then(|text| serde_json::from_str(&text).ok());
        let revisions = self.store.revisions(1).await?.len();
        self.hub.set_companions(companions);
        self.hub.absorb(&usage, &nodes);
        self.hub.set_store_totals(today, totals);
        // This companion's nodes of before a restart are written back as disconnected.
        self.hub.mark_own(false);
        self.loaded = true;
        log!(
            "store {}: loaded {} usage rows of today and yesterday, {} nodes{} in {} ms",
            self.store.url(),
            usage.len(),
            nodes.len(),
            if revisions == 0 { ", no audit trail yet" } else { ", the audit trail" },
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Writes and reads every [`INTERVAL`] until `stop`, then writes what is left.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.changed() => break,
            }
            let result = self.step().await;
            self.note(result);
        }
        let result = self.flush().await;
        self.note(result);
    }

    /// One round: load if not yet done, write, read.
    async fn step(&mut self) -> Result<(), StoreError> {
        if !self.loaded {
            self.load().await?;
        }
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(HEARTBEAT_EVERY) {
            self.hub.mark_own(true);
        }
        self.flush().await?;
        let today = self.hub.today();
        if self.ticks.is_multiple_of(FLEET_EVERY) {
            let companions = self.store.companions().await?;
            let now = self.hub.now();
            let own = self.hub.name();
            let others = companions.iter().any(|c| c.name != own && now - c.last_seen <= COMPANION_ALIVE_SECS);
            self.hub.set_companions(companions);
            // Alone on the store (always so on SQLite, which one companion locks), the store holds
            // nothing this companion does not: reading the whole fleet back every two seconds
            // was most of a 10,000-node companion's CPU. Once more after the last other one
            // left, so that its nodes show as they ended.
            if others || self.others {
                let nodes = self.store.nodes().await?;
                self.hub.absorb(&[], &nodes);
            }
            self.others = others;
        }
        if self.others {
            let totals = self.store.totals(today).await?;
            self.hub.set_store_totals(today, totals);
        }
        if self.ticks % PRUNE_EVERY == 1 {
            self.store.prune(first_kept_day(today)).await?;
            self.store.forget_nodes(self.hub.now() - FORGET_AFTER_SECS).await?;
        }
        Ok(())
    }

    /// Writes what changed: revisions served, usage, nodes, and this companion's heartbeat.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let served = self.hub.take_served();
        if let Err((e, left)) = self.record(served).await {
            self.hub.requeue_served(left);
            return Err(e);
        }
        let batch = self.hub.take_batch();
        let written = async {
            self.store.put_usage(&batch.usage).await?;
            self.store.put_nodes(&batch.nodes).await
        };
        if let Err(e) = written.await {
            self.hub.requeue(batch.keys);
            self.hub.requeue_callers(batch.callers);
            return Err(e);
        }
        let noted = if batch.callers.is_empty() { Ok(()) } else { self.store.note_callers(&batch.callers).await };
        if let Err(e) = noted {
            self.hub.requeue_callers(batch.callers);
            return Err(e);
        }
        self.store.put_companion(&self.hub.companion_record(self.started)).await
    }

    /// Adds revisions to the audit trail, each with what changed from the one before; on failure,
    /// the error and the revisions not recorded.
    async fn record(&mut self, served: Vec<Served>) -> Result<(), (StoreError, Vec<Served>)> {
        let mut served = served.into_iter();
        while let Some(s) = served.next() {
            let json: serde_json::Value = serde_json::from_str(&s.snapshot.json).unwrap_or_default();
            let entry = Revision {
                revision: s.snapshot.revision.clone(),
                content_sha256: hex::encode(s.snapshot.content),
                first_served: s.at,
                source: s.source.clone(),
                companion: self.hub.name(),
                changes: audit::changes(self.last_policy.as_ref(), &json),
            };
            let result = async {
                self.store.add_revision(&entry).await?;
                self.store.set_last_policy(&s.snapshot.json).await
            };
            if let Err(e) = result.await {
                let mut left = vec![s];
                left.extend(served);
                return Err((e, left));
            }
            self.last_policy = Some(json);
        }
        Ok(())
    }

    /// Logs a change of the store's availability (and, while it is down, once a minute).
    pub fn note(&mut self, result: Result<(), StoreError>) {
        match (result, self.down) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => {
                self.down = None;
                self.hub.set_store_error(None);
                log!("store: available again ({}); writing what it missed", self.store.url());
                // It may have lost what was written before (a Redis restarted without its data).
                self.hub.mark_own(false);
            }
            (Err(e), down) => {
                let first = down.is_none();
                if first || down.is_some_and(|at| at.elapsed() >= LOG_AGAIN) {
                    log!(
                        "store: unavailable ({e}){}; policy push goes on, fleet budgets count the nodes this \
                         companion sees, and what is not written is kept for when it returns",
                        if first { "" } else { " still" }
                    );
                    self.down = Some(Instant::now());
                }
                self.hub.set_store_error(Some(e.to_string()));
            }
        }
    }
}
