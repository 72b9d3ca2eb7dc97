//! Send requests (recorded by idempotency key and written to the outbox in the same
//! transaction as the journey or recipient that produced them), the guardrails' events and
//! the frequency-cap counters.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use relance_kit::bus::DELIVERY_EXCHANGE;
use relance_kit::error::ApiResult;
use sqlx::PgConnection;
use uuid::Uuid;

use super::CampaignStore;
use crate::domain::guard::{CapCounts, CounterKey};

/// One send request to queue for delivery.
#[derive(Debug, Clone)]
pub struct SendRow {
    pub workspace_id: String,
    pub idempotency_key: String,
    pub journey_id: Option<Uuid>,
    pub flow: String,
    pub flow_version: u32,
    pub broadcast: String,
    pub step: String,
    pub variant: String,
    /// The first channel (the routing key).
    pub channel: String,
    pub customer_id: String,
    pub at: DateTime<Utc>,
    /// The outbox payload: delivery's envelope around the `SendRequest`.
    pub envelope: serde_json::Value,
    /// The trace context of the step that made it (W3C `traceparent`).
    pub trace: Option<String>,
}

/// A send the guardrails held or dropped.
#[derive(Debug, Clone)]
pub struct GuardEvent {
    pub workspace_id: String,
    pub flow: String,
    pub broadcast: String,
    pub step: String,
    pub journey_id: String,
    pub customer_id: String,
    pub kind: GuardKind,
    pub channel: String,
    pub at: DateTime<Utc>,
}

/// What the guardrails did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardKind {
    CapDeferred = 1,
    CapSkipped = 2,
    QuietDeferred = 3,
}

impl GuardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardKind::CapDeferred => "cap_deferred",
            GuardKind::CapSkipped => "cap_skipped",
            GuardKind::QuietDeferred => "quiet_deferred",
        }
    }
}

/// A counter increment.
#[derive(Debug, Clone)]
pub struct CapIncrement {
    pub workspace_id: String,
    pub customer_id: String,
    pub key: CounterKey,
}

/// Records the sends and writes the new ones to the outbox; a key recorded before (a
/// re-run after a crash that committed) is not queued again. Returns how many were queued,
/// and counts them in `relance_campaigns_sends_queued_total{source, campaign, channel}`
/// (`source` is `flow` or `broadcast`, `campaign` the flow's or the broadcast's name).
pub async fn queue_sends(conn: &mut PgConnection, sends: &[SendRow]) -> ApiResult<u64> {
    if sends.is_empty() {
        return Ok(0);
    }
    let n = sends.len();
    let mut workspaces = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut journeys: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut flows = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut broadcasts = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    let mut variants = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    let mut envelopes = Vec::with_capacity(n);
    let mut message_ids = Vec::with_capacity(n);
    let mut traces: Vec<Option<String>> = Vec::with_capacity(n);
    for send in sends {
        traces.push(send.trace.clone());
        workspaces.push(send.workspace_id.clone());
        keys.push(send.idempotency_key.clone());
        journeys.push(send.journey_id);
        flows.push(send.flow.clone());
        versions.push(send.flow_version as i32);
        broadcasts.push(send.broadcast.clone());
        steps.push(send.step.clone());
        variants.push(send.variant.clone());
        channels.push(send.channel.clone());
        customers.push(send.customer_id.clone());
        ats.push(send.at);
        envelopes.push(send.envelope.clone());
        // The AMQP message id delivery deduplicates on (see delivery's wire::Envelope).
        message_ids.push(format!("{}:{}", send.workspace_id, send.idempotency_key));
    }
    // The new sends, counted per flow or broadcast and channel for the metric.
    let counts: Vec<(String, String, String, i64)> = sqlx::query_as(
        "WITH new AS ( \
           INSERT INTO sends (workspace_id, idempotency_key, journey_id, flow, flow_version, broadcast, step, variant, \
           channel, customer_id, at) \
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::int[], $6::text[], $7::text[], \
           $8::text[], $9::text[], $10::text[], $11::timestamptz[]) \
           ON CONFLICT DO NOTHING RETURNING workspace_id, idempotency_key, flow, broadcast, channel), \
         queued AS ( \
           INSERT INTO outbox (exchange, routing_key, message_id, payload, traceparent) \
           SELECT $12, o.channel, o.message_id, o.envelope, o.traceparent \
           FROM UNNEST($1::text[], $2::text[], $9::text[], $13::text[], $14::jsonb[], $15::text[]) \
           AS o(workspace_id, idempotency_key, channel, message_id, envelope, traceparent) \
           JOIN new ON new.workspace_id = o.workspace_id AND new.idempotency_key = o.idempotency_key) \
         SELECT flow, broadcast, channel, count(*) FROM new GROUP BY flow, broadcast, channel",
    )
    .bind(&workspaces)
    .bind(&keys)
    .bind(&journeys)
    .bind(&flows)
    .bind(&versions)
    .bind(&broadcasts)
    .bind(&steps)
    .bind(&variants)
    .bind(&channels)
    .bind(&customers)
    .bind(&ats)
    .bind(DELIVERY_EXCHANGE)
    .bind(&message_ids)
    .bind(&envelopes)
    .bind(&traces)
    .fetch_all(&mut *conn)
    .await?;
    let mut queued = 0;
    for (flow, broadcast, channel, count) in counts {
        let (source, campaign) = if broadcast.is_empty() {
            ("flow", flow)
        } else {
            ("broadcast", broadcast)
        };
        let count = count.max(0) as u64;
        metrics::counter!("relance_campaigns_sends_queued_total", "source" => source, "campaign" => campaign, "channel" => channel)
            .increment(count);
        queued += count;
    }
    Ok(queued)
}

/// Records what the guardrails did.
pub async fn insert_guard_events(conn: &mut PgConnection, events: &[GuardEvent]) -> ApiResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let n = events.len();
    let mut workspaces = Vec::with_capacity(n);
    let mut flows = Vec::with_capacity(n);
    let mut broadcasts = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    let mut journeys = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    for event in events {
        workspaces.push(event.workspace_id.clone());
        flows.push(event.flow.clone());
        broadcasts.push(event.broadcast.clone());
        steps.push(event.step.clone());
        journeys.push(event.journey_id.clone());
        customers.push(event.customer_id.clone());
        kinds.push(event.kind as i16);
        channels.push(event.channel.clone());
        ats.push(event.at);
        metrics::counter!("relance_campaigns_guardrail_total", "action" => event.kind.as_str(), "channel" => event.channel.clone())
            .increment(1);
    }
    sqlx::query(
        "INSERT INTO guard_events (workspace_id, flow, broadcast, step, journey_id, customer_id, kind, channel, at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::smallint[], \
         $8::text[], $9::timestamptz[])",
    )
    .bind(&workspaces)
    .bind(&flows)
    .bind(&broadcasts)
    .bind(&steps)
    .bind(&journeys)
    .bind(&customers)
    .bind(&kinds)
    .bind(&channels)
    .bind(&ats)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Adds one to each counter (a week's counter expires 8 days after, a day's 2 days after,
/// so no timezone keeps it past its period).
pub async fn add_cap_counts(
    conn: &mut PgConnection,
    increments: &[CapIncrement],
    now: DateTime<Utc>,
) -> ApiResult<()> {
    if increments.is_empty() {
        return Ok(());
    }
    // Several sends of one customer in a batch: one row each, summed.
    let mut summed: HashMap<(String, String, String, String), i32> = HashMap::new();
    for increment in increments {
        let key = (
            increment.workspace_id.clone(),
            increment.customer_id.clone(),
            increment.key.scope.clone(),
            increment.key.period_key.clone(),
        );
        *summed.entry(key).or_insert(0) += 1;
    }
    let mut workspaces = Vec::with_capacity(summed.len());
    let mut customers = Vec::with_capacity(summed.len());
    let mut scopes = Vec::with_capacity(summed.len());
    let mut periods = Vec::with_capacity(summed.len());
    let mut counts = Vec::with_capacity(summed.len());
    let mut expiries = Vec::with_capacity(summed.len());
    let mut entries: Vec<_> = summed.into_iter().collect();
    // A fixed order, so concurrent batches lock counters in the same order.
    entries.sort();
    for ((workspace, customer, scope, period), count) in entries {
        let days = if period.starts_with('w') { 9 } else { 3 };
        workspaces.push(workspace);
        customers.push(customer);
        scopes.push(scope);
        periods.push(period);
        counts.push(count);
        expiries.push(now + Duration::days(days));
    }
    sqlx::query(
        "INSERT INTO cap_counters (workspace_id, customer_id, scope, period_key, count, expires_at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[]) \
         ON CONFLICT (workspace_id, customer_id, scope, period_key) \
         DO UPDATE SET count = cap_counters.count + EXCLUDED.count",
    )
    .bind(&workspaces)
    .bind(&customers)
    .bind(&scopes)
    .bind(&periods)
    .bind(&counts)
    .bind(&expiries)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The live counters of these customers.
pub async fn cap_counts(
    conn: &mut PgConnection,
    workspace_id: &str,
    customers: &[String],
    now: DateTime<Utc>,
) -> ApiResult<HashMap<String, CapCounts>> {
    let rows: Vec<(String, String, String, i32)> = sqlx::query_as(
        "SELECT customer_id, scope, period_key, count FROM cap_counters \
         WHERE workspace_id = $1 AND customer_id = ANY($2) AND expires_at > $3",
    )
    .bind(workspace_id)
    .bind(customers)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts: HashMap<String, CapCounts> = HashMap::new();
    for (customer, scope, period_key, count) in rows {
        counts
            .entry(customer)
            .or_default()
            .insert(CounterKey { scope, period_key }, count.max(0) as u32);
    }
    Ok(counts)
}

impl CampaignStore {
    /// Deletes counters past their period.
    pub async fn purge_cap_counters(&self, now: DateTime<Utc>) -> ApiResult<u64> {
        let purged = sqlx::query("DELETE FROM cap_counters WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(purged.rows_affected())
    }
}
