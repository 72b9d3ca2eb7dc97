//! Ingestion: validate, drop repeats, store, wake the relay.
//!
//! Calls do not each take a database connection: they queue their valid events for a few
//! writers (one connection each), and a writer inserts the queued events of every waiting
//! call of a workspace in one statement and one commit (group commit). At a trickle each call
//! is written alone and at once; under a burst, one INSERT of many calls costs about what one
//! call's did, so throughput grows with load instead of calls waiting for connections until
//! they time out. When more events wait than `max_queued_events`, calls are refused at once
//! with RESOURCE_EXHAUSTED (nothing of them is stored) so that clients back off and retry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use relance_kit::SharedClock;
use relance_kit::bus::HandleError;
use relance_kit::error::ApiError;
use relance_kit::messages::EventMessage;
use serde::Deserialize;
use tokio::sync::{Notify, oneshot};
use tracing::Instrument as _;

use crate::domain::{self, FieldError, Limits, NewEvent, RawEvent};
use crate::relay::RelayCache;
use crate::store::{EventStore, RelayKey, Stored};

/// The `[events]` settings of the write path.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WriterSettings {
    /// Inserts running at once, each holding one database connection; 0 means the pool's
    /// size less two (the relay and the identity consumer keep theirs).
    pub writers: usize,
    /// Most events one grouped INSERT takes (a single call larger than this is written
    /// alone).
    pub group_events: usize,
    /// Most events waiting for a writer; a call that would queue more is refused with
    /// RESOURCE_EXHAUSTED.
    pub max_queued_events: usize,
}

impl Default for WriterSettings {
    fn default() -> WriterSettings {
        WriterSettings {
            writers: 0,
            group_events: 2000,
            max_queued_events: 20_000,
        }
    }
}

/// Why events were not stored; none of the call's events were acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// Too many events wait for the database: retry with backoff.
    #[error("ingestion is over capacity: {queued} events wait to be written; retry with backoff")]
    Overloaded { queued: usize },
    /// The database failed; the events may be retried (with the same message ids).
    #[error("database: {0}")]
    Store(Arc<sqlx::Error>),
    /// The service is shutting down.
    #[error("the events service is stopping")]
    Stopped,
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> ApiError {
        match error {
            IngestError::Overloaded { .. } => ApiError::ResourceExhausted(error.to_string()),
            IngestError::Stopped => ApiError::Unavailable(error.to_string()),
            // The error is shared by every call of the group, so it is read, not taken.
            IngestError::Store(error) => relance_kit::error::database_unavailable(&error)
                .unwrap_or_else(|| ApiError::Internal(anyhow::anyhow!("storing events: {error}"))),
        }
    }
}

impl From<IngestError> for HandleError {
    fn from(error: IngestError) -> HandleError {
        HandleError::Retry(error.into())
    }
}

/// The outcome of ingesting a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events stored now.
    pub accepted: u64,
    /// Events already stored (same message id), now or earlier in the same batch.
    pub duplicates: u64,
    /// (index in the batch, what is wrong).
    pub rejected: Vec<(usize, FieldError)>,
}

/// Validates events and hands them to the writers.
#[derive(Debug, Clone)]
pub struct Ingestor {
    pub store: Arc<EventStore>,
    pub clock: SharedClock,
    pub limits: Limits,
    writer: Arc<GroupWriter>,
}

impl Ingestor {
    /// `pool_size` is the events pool's size (for `writers: 0`).
    pub fn new(
        store: Arc<EventStore>,
        clock: SharedClock,
        limits: Limits,
        mut settings: WriterSettings,
        pool_size: u32,
        relay_wake: Arc<Notify>,
        relay_cache: Arc<RelayCache>,
    ) -> Ingestor {
        if settings.writers == 0 {
            settings.writers = (pool_size as usize).saturating_sub(2).max(1);
        }
        settings.group_events = settings.group_events.max(1);
        Ingestor {
            store: store.clone(),
            clock,
            limits,
            writer: Arc::new(GroupWriter {
                store,
                relay_wake,
                relay_cache,
                settings,
                queue: Mutex::new(Queue::default()),
            }),
        }
    }

    /// Validates every event, has the valid ones stored, and reports the rest.
    pub async fn ingest(
        &self,
        workspace_id: &str,
        batch: Vec<RawEvent>,
    ) -> Result<Outcome, IngestError> {
        let now = self.clock.now();
        let mut valid = Vec::with_capacity(batch.len());
        let mut outcome = Outcome::default();
        for (index, raw) in batch.into_iter().enumerate() {
            match domain::validate(raw, now, &self.limits, || uuid::Uuid::now_v7().to_string()) {
                Ok(event) => valid.push((index, event)),
                Err(error) => outcome.rejected.push((index, error)),
            }
        }
        let (unique, repeats) = domain::first_of_each_id(valid);
        let events: Vec<NewEvent> = unique.into_iter().map(|(_, event)| event).collect();
        let submitted = events.len() as u64;
        if submitted > 0 {
            let (reply, written) = oneshot::channel();
            self.writer.submit(Call {
                workspace_id: workspace_id.to_owned(),
                events,
                received_at: now,
                trace: relance_kit::trace::current(),
                reply,
            })?;
            outcome.accepted = written.await.map_err(|_| IngestError::Stopped)??;
        }
        outcome.duplicates = (submitted - outcome.accepted) + repeats as u64;
        metrics::counter!("relance_events_accepted_total").increment(outcome.accepted);
        metrics::counter!("relance_events_duplicates_total").increment(outcome.duplicates);
        metrics::counter!("relance_events_rejected_total").increment(outcome.rejected.len() as u64);
        Ok(outcome)
    }
}

/// One call's valid, distinct events waiting to be written.
#[derive(Debug)]
struct Call {
    workspace_id: String,
    events: Vec<NewEvent>,
    received_at: DateTime<Utc>,
    /// The caller's trace, carried by its events to the relay.
    trace: Option<String>,
    /// How many of the events were stored now (the rest were stored before).
    reply: oneshot::Sender<Result<u64, IngestError>>,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Call>,
    queued_events: usize,
    /// Writer tasks running; each leaves when it finds the queue empty.
    writers: usize,
}

/// The calls of the oldest waiting call's workspace, oldest first, up to `max_events`
/// events (at least one call); the others stay in order.
fn take_group(waiting: &mut VecDeque<Call>, max_events: usize) -> Vec<Call> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut events = first.events.len();
    let mut group = vec![first];
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(call) = waiting.pop_front() {
        if call.workspace_id == group[0].workspace_id && events + call.events.len() <= max_events {
            events += call.events.len();
            group.push(call);
        } else {
            rest.push_back(call);
        }
    }
    *waiting = rest;
    group
}

/// The group's events for one INSERT — the first of each message id across the calls —
/// and, for each, the index of the call it came from. A later call's event with the same id
/// is a duplicate of the first (as within one call).
fn merge_group(calls: &mut [Call]) -> (Vec<NewEvent>, Vec<usize>) {
    let mut seen = HashSet::new();
    let mut events = Vec::new();
    let mut owners = Vec::new();
    for (index, call) in calls.iter_mut().enumerate() {
        for event in std::mem::take(&mut call.events) {
            if seen.insert(event.message_id.clone()) {
                events.push(event);
                owners.push(index);
            }
        }
    }
    (events, owners)
}

/// Writes queued calls in groups; see the module's documentation.
#[derive(Debug)]
struct GroupWriter {
    store: Arc<EventStore>,
    /// Notified after each commit so that the relay publishes at once.
    relay_wake: Arc<Notify>,
    /// Where committed events wait for the relay.
    relay_cache: Arc<RelayCache>,
    settings: WriterSettings,
    queue: Mutex<Queue>,
}

impl GroupWriter {
    /// Queues `call`, starting a writer when fewer than `writers` run.
    fn submit(self: &Arc<Self>, call: Call) -> Result<(), IngestError> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let events = call.events.len();
        // A call always gets into an empty queue, however large.
        if queue.queued_events > 0 && queue.queued_events + events > self.settings.max_queued_events
        {
            metrics::counter!("relance_events_overloaded_total").increment(1);
            return Err(IngestError::Overloaded {
                queued: queue.queued_events,
            });
        }
        queue.queued_events += events;
        queue.waiting.push_back(call);
        metrics::gauge!("relance_events_write_queue").set(queue.queued_events as f64);
        if queue.writers < self.settings.writers {
            queue.writers += 1;
            let writer = self.clone();
            // Written whatever becomes of the calls: one dropping its request (a client gone)
            // does not stop the others' events.
            tokio::spawn(async move { writer.run().await });
        }
        Ok(())
    }

    /// Writes groups until the queue is empty.
    async fn run(self: Arc<Self>) {
        let mut running = Running {
            writer: &self,
            done: false,
        };
        loop {
            let group = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let group = take_group(&mut queue.waiting, self.settings.group_events);
                if group.is_empty() {
                    // Under the lock that `submit` takes: a call queued after this line starts
                    // a writer of its own.
                    queue.writers -= 1;
                    running.done = true;
                    return;
                }
                let taken: usize = group.iter().map(|call| call.events.len()).sum();
                queue.queued_events -= taken;
                metrics::gauge!("relance_events_write_queue").set(queue.queued_events as f64);
                group
            };
            self.write(group).await;
        }
    }

    /// One INSERT and one commit for the group; each call learns how many of its events were
    /// stored, or the error.
    async fn write(&self, mut calls: Vec<Call>) {
        let workspace_id = calls[0].workspace_id.clone();
        let received_at = calls[0].received_at;
        let (events, owners) = merge_group(&mut calls);
        let span = tracing::info_span!("write_events", calls = calls.len(), events = events.len());
        metrics::histogram!("relance_events_write_group_calls").record(calls.len() as f64);
        let written = self
            .insert(&workspace_id, events, &owners, &calls, received_at)
            .instrument(span)
            .await;
        match written {
            Ok(accepted) => {
                if accepted.iter().any(|n| *n > 0) {
                    self.relay_wake.notify_one();
                }
                for (call, accepted) in calls.into_iter().zip(accepted) {
                    let _ = call.reply.send(Ok(accepted));
                }
            }
            Err(error) => {
                let error = IngestError::Store(Arc::new(error));
                for call in calls {
                    let _ = call.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Inserts, hands the stored events to the relay (each call's with its trace), commits;
    /// the number of events stored per call.
    async fn insert(
        &self,
        workspace_id: &str,
        events: Vec<NewEvent>,
        owners: &[usize],
        calls: &[Call],
        received_at: DateTime<Utc>,
    ) -> sqlx::Result<Vec<u64>> {
        let mut pending = self
            .store
            .insert(workspace_id, &events, received_at)
            .await?;
        let stored = std::mem::take(&mut pending.stored);
        let mut owner_of: HashMap<String, usize> = HashMap::with_capacity(events.len());
        for (event, owner) in events.iter().zip(owners) {
            owner_of.insert(event.message_id.clone(), *owner);
        }
        let mut accepted = vec![0u64; calls.len()];
        let mut published_of: Vec<Vec<(RelayKey, EventMessage)>> =
            (0..calls.len()).map(|_| Vec::new()).collect();
        for (key, message) in to_publish(workspace_id, events, stored, received_at) {
            if let Some(owner) = owner_of.get(&message.message_id) {
                accepted[*owner] += 1;
                published_of[*owner].push((key, message));
            }
        }
        // Handed over before the commit, so the relay (which sees rows only once they are
        // committed) finds them in memory instead of reading them back. Should the commit
        // fail, their keys never appear in the log: the relay never asks for them, and they
        // leave the cache once the relay has moved past them.
        for (published, call) in published_of.into_iter().zip(calls) {
            if !published.is_empty() {
                self.relay_cache.put(published, call.trace.clone());
            }
        }
        pending.commit().await?;
        Ok(accepted)
    }
}

/// Gives the writer's place back should it panic, so that later calls still start writers.
struct Running<'a> {
    writer: &'a GroupWriter,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self.writer.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.writers -= 1;
        }
    }
}

/// The stored events as the relay publishes them.
fn to_publish(
    workspace_id: &str,
    events: Vec<NewEvent>,
    stored: Vec<Stored>,
    received_at: DateTime<Utc>,
) -> Vec<(RelayKey, EventMessage)> {
    let mut by_id: HashMap<String, NewEvent> = HashMap::with_capacity(events.len());
    for event in events {
        by_id.insert(event.message_id.clone(), event);
    }
    let mut out = Vec::with_capacity(stored.len());
    for row in stored {
        let Some(event) = by_id.remove(&row.message_id) else {
            continue;
        };
        out.push((
            row.key,
            EventMessage {
                workspace_id: workspace_id.to_owned(),
                seq: row.key.seq,
                message_id: row.message_id,
                name: event.name,
                customer_id: row.customer_id,
                anonymous_id: event.anonymous_id,
                timestamp: event.timestamp,
                received_at,
                properties: event.properties_value,
                context: event.context_value,
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(
        workspace_id: &str,
        ids: &[&str],
    ) -> (Call, oneshot::Receiver<Result<u64, IngestError>>) {
        let (reply, receiver) = oneshot::channel();
        let events = ids
            .iter()
            .map(|id| NewEvent {
                message_id: (*id).to_owned(),
                name: "product_viewed".into(),
                customer_id: Some("c1".into()),
                anonymous_id: None,
                timestamp: DateTime::<Utc>::UNIX_EPOCH,
                properties: "{}".into(),
                context: "{}".into(),
                properties_value: serde_json::json!({}),
                context_value: serde_json::json!({}),
            })
            .collect();
        let call = Call {
            workspace_id: workspace_id.to_owned(),
            events,
            received_at: DateTime::<Utc>::UNIX_EPOCH,
            trace: None,
            reply,
        };
        (call, receiver)
    }

    fn ids_of(calls: &[Call]) -> Vec<Vec<String>> {
        calls
            .iter()
            .map(|call| call.events.iter().map(|e| e.message_id.clone()).collect())
            .collect()
    }

    #[test]
    fn a_group_is_the_oldest_call_s_workspace_up_to_the_event_bound() {
        let mut waiting = VecDeque::new();
        for (workspace, ids) in [
            ("shop-a", vec!["1", "2"]),
            ("shop-b", vec!["3"]),
            ("shop-a", vec!["4", "5"]),
            ("shop-a", vec!["6", "7", "8"]),
            ("shop-a", vec!["9"]),
        ] {
            waiting.push_back(call(workspace, &ids).0);
        }
        let group = take_group(&mut waiting, 5);
        // 2 + 2 events; the call of three would pass the bound, the last call of one fits.
        assert_eq!(
            ids_of(&group),
            vec![vec!["1", "2"], vec!["4", "5"], vec!["9"]]
        );
        let rest: Vec<&str> = waiting
            .iter()
            .map(|c| c.events[0].message_id.as_str())
            .collect();
        assert_eq!(rest, vec!["3", "6"]);
        let group = take_group(&mut waiting, 5);
        assert_eq!(ids_of(&group), vec![vec!["3"]]);
        let group = take_group(&mut waiting, 5);
        assert_eq!(ids_of(&group), vec![vec!["6", "7", "8"]]);
        assert!(take_group(&mut waiting, 5).is_empty());
    }

    #[test]
    fn a_call_larger_than_the_bound_is_written_alone() {
        let mut waiting = VecDeque::new();
        waiting.push_back(call("shop", &["1", "2", "3"]).0);
        waiting.push_back(call("shop", &["4"]).0);
        let group = take_group(&mut waiting, 2);
        assert_eq!(ids_of(&group), vec![vec!["1", "2", "3"]]);
        assert_eq!(waiting.len(), 1);
    }

    #[test]
    fn an_id_in_several_calls_of_a_group_is_inserted_once_for_the_first() {
        let mut calls = vec![
            call("shop", &["1", "2"]).0,
            call("shop", &["2", "3"]).0,
            call("shop", &["1"]).0,
        ];
        let (events, owners) = merge_group(&mut calls);
        let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
        assert_eq!(ids, vec!["1", "2", "3"]);
        assert_eq!(owners, vec![0, 0, 1]);
    }
}
