//! The `delivery.requests` queue: send requests from campaigns (and from the Send RPC, via
//! the outbox), taken in batches. Each message is put in the ledger, claimed, sent, and its
//! outcome written before the broker hears the ack: a crash at any point redelivers it, and
//! the ledger makes the redelivery find the first outcome instead of sending again.
//!
//! Temporary failures are retried through the consumer's delayed queues, with the attempt's
//! exponential, jittered delay as the message's own expiration. A sweeper republishes the
//! rare message whose retry copy was lost (a crash between the ledger write and the publish).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message as _;
use relance_kit::bus::{
    ConsumerSpec, DELIVERY_EXCHANGE, HandleError, Handler, Outgoing, Publisher, Received,
};
use relance_kit::{ApiError, SharedClock};
use relance_proto::v1::SendRequest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::DeliveryConfig;
use crate::domain::request;
use crate::pipeline::{ProcessError, Retry, Sender};
use crate::store::{DeliveryStore, NewMessage, SENDING};
use crate::wire::{Envelope, REQUESTS_QUEUE};

/// The queue's topology: every channel's requests, retries at the configured backoff.
pub fn spec(config: &DeliveryConfig) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(REQUESTS_QUEUE).bind(DELIVERY_EXCHANGE, "#");
    spec.prefetch = config.prefetch;
    spec.retry_delays = config.retry_levels();
    spec
}

/// A request taken from the bus (or a Send call), ready for the ledger; `trace` is the trace
/// context it arrived in.
pub fn new_message(
    workspace_id: &str,
    request: &SendRequest,
    now: chrono::DateTime<chrono::Utc>,
    trace: Option<String>,
) -> NewMessage {
    let (customer_id, anonymous_id) = match request.customer.as_ref().and_then(|c| c.id.as_ref()) {
        Some(relance_proto::v1::customer_ref::Id::CustomerId(id)) => (Some(id.clone()), None),
        Some(relance_proto::v1::customer_ref::Id::AnonymousId(id)) => (None, Some(id.clone())),
        None => (None, None),
    };
    let origin = request.origin.clone().unwrap_or_default();
    let template = match &request.content {
        Some(relance_proto::v1::send_request::Content::Template(name)) => name.clone(),
        _ => String::new(),
    };
    let ttl = chrono::Duration::from_std(request::ttl_of(request))
        .unwrap_or_else(|_| chrono::Duration::hours(24));
    let _ = workspace_id;
    NewMessage {
        id: Uuid::now_v7(),
        idempotency_key: request.idempotency_key.clone(),
        customer_id,
        anonymous_id,
        kind: request::kind_of(request) as i16,
        topic: request.topic.clone(),
        template,
        locale: request.locale.clone(),
        flow: origin.flow,
        flow_version: origin.flow_version as i32,
        step: origin.step,
        variant: origin.variant,
        broadcast: origin.broadcast,
        journey_id: origin.journey_id,
        request: request.encode_to_vec(),
        created_at: now,
        expires_at: now + ttl,
        trace,
    }
}

/// Handles send requests in batches.
pub struct RequestHandler {
    pub sender: Sender,
    pub store: DeliveryStore,
    pub clock: SharedClock,
    pub config: DeliveryConfig,
    pub retries: Arc<RetryPublisher>,
}

impl std::fmt::Debug for RequestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandler").finish()
    }
}

impl Handler for RequestHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move { self.run(std::slice::from_ref(message)).await })
    }

    fn max_batch(&self) -> usize {
        self.config.batch.max(1)
    }

    fn handle_batch<'a>(
        &'a self,
        messages: &'a [Received<'a>],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move { self.run(messages).await })
    }
}

impl RequestHandler {
    async fn run(&self, messages: &[Received<'_>]) -> Result<(), HandleError> {
        let now = self.clock.now();
        // Workspace → new ledger rows, in arrival order.
        let mut by_workspace: Vec<(String, Vec<NewMessage>)> = Vec::new();
        for message in messages {
            let (workspace, request) = decode(message.payload).map_err(HandleError::Reject)?;
            if let Err(error) = request::validate(&request, true) {
                return Err(HandleError::Reject(anyhow::anyhow!(
                    "invalid send request {}: {}: {}",
                    message.message_id,
                    error.field,
                    error.reason
                )));
            }
            let row = new_message(&workspace, &request, now, message.trace.map(str::to_owned));
            match by_workspace.iter_mut().find(|(w, _)| *w == workspace) {
                Some((_, rows)) => rows.push(row),
                None => by_workspace.push((workspace, vec![row])),
            }
        }
        // New requests are claimed as they are inserted; known keys (a redelivery, a retry
        // coming back) are claimed the usual way.
        let lease_until = now + chrono::Duration::seconds(self.config.lease_secs as i64);
        let mut claimed = Vec::with_capacity(messages.len());
        let mut known = Vec::new();
        for (workspace, rows) in &by_workspace {
            let (fresh, existing) = self
                .store
                .accept_claimed(workspace, rows, lease_until)
                .await
                .map_err(retry)?;
            claimed.extend(fresh);
            known.extend(existing);
        }
        let mut others = Vec::new();
        if !known.is_empty() {
            let reclaimed = self
                .store
                .claim(&known, now, lease_until)
                .await
                .map_err(retry)?;
            let reclaimed_ids: HashSet<Uuid> = reclaimed.iter().map(|c| c.id).collect();
            for id in known {
                if !reclaimed_ids.contains(&id) {
                    others.push(id);
                }
            }
            claimed.extend(reclaimed);
        }

        if !claimed.is_empty() {
            let held: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
            match self.sender.process(claimed).await {
                Ok(retries) => self.schedule(retries).await,
                Err(ProcessError::BeforeSending(error)) => {
                    // Nothing went out: give the messages back and let the broker retry.
                    if let Err(release) = self.store.release(&held).await {
                        tracing::warn!(error = %release, "could not release claimed messages; their lease will expire");
                    }
                    return Err(HandleError::Retry(error));
                }
                Err(ProcessError::WhileSending(error)) => {
                    // Some may have gone out: their leases run out and the sweeper sends
                    // them again as in doubt (the broker's copies find them still held).
                    return Err(HandleError::Retry(error));
                }
            }
        }
        if !others.is_empty() {
            self.check_unclaimed(&others, now).await?;
        }
        Ok(())
    }

    /// A message that could not be claimed is finished (a duplicate: nothing to do), waiting
    /// for its retry (its delayed copy is queued), or held by another worker right now — then
    /// it is looked at again later, in case that worker dies before finishing.
    async fn check_unclaimed(
        &self,
        ids: &[Uuid],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), HandleError> {
        let states = self.store.states(ids).await.map_err(retry)?;
        let mut held_elsewhere = 0;
        for state in &states {
            if state.status == SENDING && state.lease_until.is_some_and(|l| l >= now) {
                held_elsewhere += 1;
            }
        }
        metrics::counter!("relance_delivery_duplicates_total")
            .increment((states.len() - held_elsewhere) as u64);
        if held_elsewhere > 0 {
            // The sweeper republishes it once the lease has run out; nothing is lost by
            // acking this copy.
            tracing::debug!(
                held_elsewhere,
                "messages held by another worker; the sweeper watches their lease"
            );
        }
        Ok(())
    }

    async fn schedule(&self, retries: Vec<Retry>) {
        for retry in retries {
            if let Err(error) = self.retries.publish(&retry).await {
                // The ledger has the retry's due time: the sweeper republishes it.
                tracing::warn!(error = %format!("{error:#}"), "retry copy not published; the sweeper will");
            }
        }
    }
}

fn retry(error: ApiError) -> HandleError {
    HandleError::Retry(anyhow::anyhow!("{error}"))
}

/// Reads an envelope.
pub fn decode(payload: &[u8]) -> anyhow::Result<(String, SendRequest)> {
    let envelope: Envelope = serde_json::from_slice(payload)?;
    let request = envelope.decode()?;
    Ok((envelope.workspace_id, request))
}

/// Publishes delayed copies of requests to the retry queues, each with its own expiration
/// (the jittered delay), with publisher confirms.
pub struct RetryPublisher {
    publisher: Arc<Publisher>,
    levels: Vec<Duration>,
}

impl RetryPublisher {
    /// A publisher for the queue's retry levels.
    pub fn new(publisher: Arc<Publisher>, levels: Vec<Duration>) -> RetryPublisher {
        RetryPublisher { publisher, levels }
    }

    fn to_queue(&self, base: &str, workspace_id: &str, request: &[u8]) -> anyhow::Result<Outgoing> {
        let envelope = Envelope::from_encoded(workspace_id, request);
        Ok(Outgoing {
            exchange: String::new(),
            routing_key: self.publisher.queue_name(base),
            message_id: String::new(),
            payload: serde_json::to_vec(&envelope)?,
            headers: Default::default(),
        })
    }

    /// Queues `retry` in the shortest level that holds its delay.
    pub async fn publish(&self, retry: &Retry) -> anyhow::Result<()> {
        let mut level = self.levels.len();
        for (index, ttl) in self.levels.iter().enumerate() {
            if *ttl >= retry.delay {
                level = index + 1;
                break;
            }
        }
        let level = level.max(1);
        let expiration = retry.delay.min(self.levels[level - 1]);
        let message = self.to_queue(
            &format!("{REQUESTS_QUEUE}.retry.{level}"),
            &retry.workspace_id,
            &retry.request,
        )?;
        self.publisher
            .publish_expiring(&message, expiration)
            .await?;
        Ok(())
    }

    /// Publishes requests back to the main queue (the sweeper's way).
    pub async fn requeue(&self, workspace_id: &str, request: &[u8]) -> anyhow::Result<()> {
        let message = self.to_queue(REQUESTS_QUEUE, workspace_id, request)?;
        self.publisher
            .publish_all(std::slice::from_ref(&message))
            .await?;
        Ok(())
    }
}

/// Republishes messages whose retry or lease is long overdue (their broker copy was lost),
/// and forgets messages past the retention.
pub async fn sweep_loop(
    store: DeliveryStore,
    retries: Arc<RetryPublisher>,
    clock: SharedClock,
    config: DeliveryConfig,
    shutdown: CancellationToken,
) {
    let pause = Duration::from_secs(config.sweep_every_secs.max(1));
    let grace = chrono::Duration::seconds(config.sweep_grace_secs as i64);
    let mut last_purge = std::time::Instant::now();
    loop {
        match store.overdue(clock.now(), grace, 500).await {
            Ok(rows) => {
                for (id, workspace, request) in rows {
                    if let Err(error) = retries.requeue(&workspace, &request).await {
                        tracing::warn!(%id, error = %format!("{error:#}"), "overdue message not republished");
                        break;
                    }
                    metrics::counter!("relance_delivery_swept_total").increment(1);
                }
            }
            Err(error) => tracing::warn!(%error, "sweep failed"),
        }
        if last_purge.elapsed() > Duration::from_secs(3600) {
            last_purge = std::time::Instant::now();
            let before = clock.now() - chrono::Duration::days(i64::from(config.retention_days));
            match store.purge(before, clock.now()).await {
                Ok(purged) => tracing::info!(purged, "old messages forgotten"),
                Err(error) => tracing::warn!(%error, "purge failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The queue of opens reported by apps (`message_opened` through `Events.Track`, with the
/// message's id in `properties.message_id`), so the ledger knows of push and in-app opens.
pub fn opens_spec() -> ConsumerSpec {
    ConsumerSpec::new("delivery.opens").bind(
        relance_kit::bus::EVENTS_EXCHANGE,
        &format!("{}message_opened", relance_kit::messages::EVENT_KEY_PREFIX),
    )
}

/// Records app-reported opens in the ledger (idempotent: the first open is kept).
pub struct OpensHandler {
    pub store: DeliveryStore,
}

impl Handler for OpensHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let batch: relance_kit::messages::EventBatch = serde_json::from_slice(message.payload)
                .map_err(|e| HandleError::Reject(e.into()))?;
            let mut opens = Vec::with_capacity(batch.events.len());
            for event in batch.events {
                let Some(id) = event
                    .properties
                    .get("message_id")
                    .and_then(|v| v.as_str())
                    .and_then(|v| Uuid::parse_str(v).ok())
                else {
                    continue;
                };
                opens.push((event.workspace_id, id, event.timestamp));
            }
            self.store.app_opens(&opens).await.map_err(retry)?;
            Ok(())
        })
    }
}
