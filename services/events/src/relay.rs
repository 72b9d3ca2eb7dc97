//! The relay: publishes the event log to `relance.events` in commit order, with publisher
//! confirms, and moves its cursor only after the broker has confirmed. One replica relays
//! at a time (a session advisory lock); the others wait to take over.

use std::sync::Arc;
use std::time::Duration;

use relance_kit::SharedClock;
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use relance_kit::messages::{EVENT_KEY_PREFIX, EventBatch, EventMessage};
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{self, RelayKey};

/// Events this process stored and has not published yet, by relay key: the relay takes them
/// from here instead of reading their rows back (reading jsonb back cost Postgres a third of
/// the ingestion's CPU). Bounded: beyond it, and for other replicas' events or after a
/// restart, the relay reads the rows.
#[derive(Debug, Default)]
pub struct RelayCache {
    entries: Mutex<BTreeMap<RelayKey, Cached>>,
    /// Only the replica whose relay is active keeps events: the others' would never be
    /// taken.
    active: AtomicBool,
}

/// An event with the trace context (`traceparent`) of the call that stored it.
type Cached = (EventMessage, Option<Arc<str>>);

/// Most events kept waiting for the relay (about 100 MB of typical events).
const RELAY_CACHE_CAPACITY: usize = 200_000;

impl RelayCache {
    /// Keeps committed events for the relay, with the `traceparent` of the call that stored
    /// them (they are published in its trace; events read back from Postgres start their own).
    pub fn put(&self, events: Vec<(RelayKey, EventMessage)>, trace: Option<String>) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let trace: Option<Arc<str>> = trace.map(Arc::from);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for (key, event) in events {
            entries.insert(key, (event, trace.clone()));
        }
        while entries.len() > RELAY_CACHE_CAPACITY {
            entries.pop_first();
        }
    }

    /// Takes the events of `keys` that are here; returns them and the keys that are not.
    fn take(&self, keys: &[RelayKey]) -> (Vec<(RelayKey, Cached)>, Vec<RelayKey>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for key in keys {
            match entries.remove(key) {
                Some(event) => found.push((*key, event)),
                None => missing.push(*key),
            }
        }
        (found, missing)
    }

    /// Starts or stops keeping events, as this replica's relay takes or loses the lead.
    fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
        if !active {
            self.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    /// Forgets everything up to `last` (published by this or another replica's relay).
    fn forget_through(&self, last: RelayKey) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while entries
            .first_key_value()
            .is_some_and(|(key, _)| *key <= last)
        {
            entries.pop_first();
        }
    }
}

/// The relay of one events service replica.
#[derive(Debug)]
pub struct Relay {
    pub clock: SharedClock,
    pub publisher: Arc<Publisher>,
    /// Events handed over by this process's ingestion.
    pub cache: Arc<RelayCache>,
    /// Notified by ingestion after each commit.
    pub wake: Arc<Notify>,
    /// Events per round trip.
    pub batch: i64,
}

impl Relay {
    /// Runs until `shutdown`: takes the relay lock, then publishes batches as they commit.
    pub async fn run(self, pool: sqlx::PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let conn = match pool.acquire().await {
                // A connection of its own, so that the session lock lives and dies with it.
                Ok(conn) => conn.detach(),
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach Postgres");
                    pause(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let led = self.relay_while_leader(conn, &shutdown).await;
            self.cache.set_active(false);
            if let Err(error) = led {
                tracing::warn!(error = %format!("{error:#}"), "relay interrupted, restarting");
                pause(&shutdown, Duration::from_millis(500)).await;
            }
        }
    }

    async fn relay_while_leader(
        &self,
        mut conn: PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        while !store::try_lock_relay(&mut conn).await? {
            if pause(shutdown, Duration::from_secs(2)).await {
                return Ok(());
            }
        }
        // Losing the last cursor move in a crash only republishes a few events, which
        // consumers deduplicate: the cursor's commits need not wait for the disk.
        sqlx::query("SET synchronous_commit TO off")
            .execute(&mut conn)
            .await?;
        self.cache.set_active(true);
        tracing::info!("relay is active");
        while !shutdown.is_cancelled() {
            let keys = store::next_keys(&mut conn, self.batch).await?;
            let Some(&last) = keys.last() else {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = self.wake.notified() => {
                        // Let the commits of concurrent calls gather into one round.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            };
            let (mut events, missing) = self.cache.take(&keys);
            if !missing.is_empty() {
                metrics::counter!("relance_events_relay_read_back_total")
                    .increment(missing.len() as u64);
                let fetched = store::fetch_events(&mut conn, &missing).await?;
                events.extend(fetched.into_iter().map(|(key, event)| (key, (event, None))));
                events.sort_by_key(|(key, _)| *key);
            }
            let mut traces: HashMap<String, Arc<str>> = HashMap::new();
            let mut messages: Vec<EventMessage> = Vec::with_capacity(events.len());
            for (_, (event, trace)) in events {
                if let Some(trace) = trace {
                    traces.insert(event.message_id.clone(), trace);
                }
                messages.push(event);
            }
            let count = messages.len();
            let newest = messages.last().map(|m| m.received_at);
            let mut outgoing = Vec::new();
            for batch in batches_by_workspace_and_name(messages) {
                let first = &batch.events[0];
                let mut headers: BTreeMap<String, String> =
                    [("workspace_id".to_owned(), first.workspace_id.clone())].into();
                // One message, one parent: the batch joins the trace of its first traced event.
                if let Some(trace) = batch.events.iter().find_map(|e| traces.get(&e.message_id)) {
                    headers.insert(
                        relance_kit::trace::TRACEPARENT.to_owned(),
                        trace.to_string(),
                    );
                }
                outgoing.push(Outgoing {
                    exchange: EVENTS_EXCHANGE.to_owned(),
                    routing_key: format!("{EVENT_KEY_PREFIX}{}", first.name),
                    message_id: batch.bus_id(),
                    headers,
                    payload: serde_json::to_vec(&batch)?,
                });
            }
            self.publisher.publish_all(&outgoing).await?;
            store::advance_cursor(&mut conn, last).await?;
            self.cache.forget_through(last);
            metrics::counter!("relance_events_published_total").increment(count as u64);
            if let Some(newest) = newest {
                let lag = (self.clock.now() - newest).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::gauge!("relance_events_relay_lag_seconds").set(lag);
            }
        }
        Ok(())
    }
}

/// Groups events by (workspace, name), in order of first appearance, keeping commit order
/// within each group.
pub fn batches_by_workspace_and_name(events: Vec<EventMessage>) -> Vec<EventBatch> {
    let mut batches: Vec<EventBatch> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for event in events {
        let key = (event.workspace_id.clone(), event.name.clone());
        match index.get(&key) {
            Some(&at) => batches[at].events.push(event),
            None => {
                index.insert(key, batches.len());
                batches.push(EventBatch {
                    events: vec![event],
                });
            }
        }
    }
    batches
}

/// Sleeps for `duration`; returns true if shutdown came first.
async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(duration) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(workspace: &str, name: &str, id: &str) -> EventMessage {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        EventMessage {
            workspace_id: workspace.into(),
            seq: 0,
            message_id: id.into(),
            name: name.into(),
            customer_id: Some("c".into()),
            anonymous_id: None,
            timestamp: at,
            received_at: at,
            properties: serde_json::json!({}),
            context: serde_json::json!({}),
        }
    }

    #[test]
    fn the_cache_hands_over_what_it_has_and_forgets_what_was_published() {
        let cache = RelayCache::default();
        let key = |xid, seq| RelayKey { xid, seq };
        cache.put(vec![(key(1, 1), event("a", "x", "0"))], None);
        assert!(
            cache.take(&[key(1, 1)]).0.is_empty(),
            "a replica that does not relay keeps nothing"
        );
        cache.set_active(true);
        cache.put(
            vec![
                (key(10, 1), event("a", "x", "1")),
                (key(10, 2), event("a", "x", "2")),
                (key(11, 3), event("a", "x", "3")),
            ],
            None,
        );
        let (found, missing) = cache.take(&[key(10, 1), key(9, 9), key(10, 2)]);
        assert_eq!(
            found.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            vec![key(10, 1), key(10, 2)]
        );
        assert_eq!(missing, vec![key(9, 9)]);
        cache.forget_through(key(11, 3));
        assert!(
            cache.take(&[key(11, 3)]).0.is_empty(),
            "published by another round: forgotten"
        );
    }

    #[test]
    fn batches_group_by_workspace_and_name_keeping_order() {
        let batches = batches_by_workspace_and_name(vec![
            event("a", "cart_updated", "1"),
            event("a", "order_completed", "2"),
            event("b", "cart_updated", "3"),
            event("a", "cart_updated", "4"),
        ]);
        let ids: Vec<Vec<&str>> = batches
            .iter()
            .map(|b| b.events.iter().map(|e| e.message_id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["1", "4"], vec!["2"], vec!["3"]]);
        assert_eq!(batches[0].bus_id(), "a:1+2");
    }
}
