//! The activity flows react to (kept from the event stream) and the outcome of each
//! campaign message (from delivery's `message_*` events).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use relance_kit::error::ApiResult;
use sqlx::PgConnection;

use super::CampaignStore;
use crate::domain::besttime::Histogram;
use crate::domain::journey::Activity;

/// Events that teach the best send time: the customer acting.
pub const BEST_TIME_EVENTS: [&str; 3] = ["order_completed", "message_opened", "message_clicked"];
/// How far back the best time learns.
const BEST_TIME_HISTORY_DAYS: i64 = 365;

/// One event to keep.
#[derive(Debug, Clone)]
pub struct ActivityRow {
    pub event_id: String,
    pub customer_id: String,
    pub name: String,
    pub at: DateTime<Utc>,
    pub properties: serde_json::Value,
    pub revenue: f64,
}

/// A change to a message's outcome.
#[derive(Debug, Clone)]
pub struct MessageUpdate {
    pub message_id: String,
    pub journey_id: String,
    pub flow: String,
    pub flow_version: i32,
    pub broadcast: String,
    pub step: String,
    pub variant: String,
    pub channel: String,
    pub customer_id: String,
    /// 1 sent, 2 skipped, 3 failed; None for delivered / opened / clicked.
    pub status: Option<i16>,
    pub at: DateTime<Utc>,
    pub delivered: bool,
    pub opened: bool,
    pub clicked: bool,
}

impl CampaignStore {
    /// Keeps events (a redelivered one is kept once).
    pub async fn record_activity(&self, workspace_id: &str, rows: &[ActivityRow]) -> ApiResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len();
        let mut ids = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut ats = Vec::with_capacity(n);
        let mut properties = Vec::with_capacity(n);
        let mut revenues = Vec::with_capacity(n);
        for row in rows {
            ids.push(row.event_id.clone());
            customers.push(row.customer_id.clone());
            names.push(row.name.clone());
            ats.push(row.at);
            properties.push(row.properties.clone());
            revenues.push(row.revenue);
        }
        sqlx::query(
            "INSERT INTO activity (workspace_id, event_id, customer_id, name, at, properties, revenue) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[], $7::float8[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(&ids)
        .bind(&customers)
        .bind(&names)
        .bind(&ats)
        .bind(&properties)
        .bind(&revenues)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies message outcomes; each flag only ever turns on, so a redelivery changes
    /// nothing, and an open that arrives before the send is kept.
    pub async fn record_messages(
        &self,
        workspace_id: &str,
        updates: &[MessageUpdate],
    ) -> ApiResult<()> {
        if updates.is_empty() {
            return Ok(());
        }
        // One statement per batch; the caller sends each message at most once per batch
        // (a batch holds one event name), so no row is updated twice by it.
        let n = updates.len();
        let mut ids = Vec::with_capacity(n);
        let mut journeys = Vec::with_capacity(n);
        let mut flows = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut broadcasts = Vec::with_capacity(n);
        let mut steps = Vec::with_capacity(n);
        let mut variants = Vec::with_capacity(n);
        let mut channels = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        let mut statuses: Vec<Option<i16>> = Vec::with_capacity(n);
        let mut ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut delivered = Vec::with_capacity(n);
        let mut opened = Vec::with_capacity(n);
        let mut clicked = Vec::with_capacity(n);
        for update in updates {
            ids.push(update.message_id.clone());
            journeys.push(update.journey_id.clone());
            flows.push(update.flow.clone());
            versions.push(update.flow_version);
            broadcasts.push(update.broadcast.clone());
            steps.push(update.step.clone());
            variants.push(update.variant.clone());
            channels.push(update.channel.clone());
            customers.push(update.customer_id.clone());
            statuses.push(update.status);
            ats.push(update.status.map(|_| update.at));
            delivered.push(update.delivered);
            opened.push(update.opened);
            clicked.push(update.clicked);
        }
        sqlx::query(
            "INSERT INTO messages (workspace_id, message_id, journey_id, flow, flow_version, broadcast, step, variant, \
             channel, customer_id, status, at, delivered, opened, clicked) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[], \
             $9::text[], $10::text[], $11::smallint[], $12::timestamptz[], $13::bool[], $14::bool[], $15::bool[]) \
             ON CONFLICT (workspace_id, message_id) DO UPDATE SET \
             journey_id = CASE WHEN messages.journey_id = '' THEN EXCLUDED.journey_id ELSE messages.journey_id END, \
             flow = CASE WHEN messages.flow = '' THEN EXCLUDED.flow ELSE messages.flow END, \
             flow_version = GREATEST(messages.flow_version, EXCLUDED.flow_version), \
             broadcast = CASE WHEN messages.broadcast = '' THEN EXCLUDED.broadcast ELSE messages.broadcast END, \
             step = CASE WHEN messages.step = '' THEN EXCLUDED.step ELSE messages.step END, \
             variant = CASE WHEN messages.variant = '' THEN EXCLUDED.variant ELSE messages.variant END, \
             channel = CASE WHEN messages.channel = '' THEN EXCLUDED.channel ELSE messages.channel END, \
             customer_id = CASE WHEN messages.customer_id = '' THEN EXCLUDED.customer_id ELSE messages.customer_id END, \
             status = COALESCE(messages.status, EXCLUDED.status), \
             at = COALESCE(messages.at, EXCLUDED.at), \
             delivered = messages.delivered OR EXCLUDED.delivered, \
             opened = messages.opened OR EXCLUDED.opened, \
             clicked = messages.clicked OR EXCLUDED.clicked",
        )
        .bind(workspace_id)
        .bind(&ids)
        .bind(&journeys)
        .bind(&flows)
        .bind(&versions)
        .bind(&broadcasts)
        .bind(&steps)
        .bind(&variants)
        .bind(&channels)
        .bind(&customers)
        .bind(&statuses)
        .bind(&ats)
        .bind(&delivered)
        .bind(&opened)
        .bind(&clicked)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The workspace's histogram of acting hours, read in `tz` (the fallback of customers
    /// with too little history of their own), from the last year of activity.
    pub async fn workspace_histogram(
        &self,
        workspace_id: &str,
        tz: Tz,
        now: DateTime<Utc>,
    ) -> ApiResult<Histogram> {
        let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
            "SELECT date_trunc('hour', at) AS hour, count(*) FROM activity \
             WHERE workspace_id = $1 AND name = ANY($2) AND at >= $3 GROUP BY 1",
        )
        .bind(workspace_id)
        .bind(BEST_TIME_EVENTS.map(str::to_owned).to_vec())
        .bind(now - Duration::days(BEST_TIME_HISTORY_DAYS))
        .fetch_all(&self.pool)
        .await?;
        let mut histogram = Histogram::default();
        for (hour, count) in rows {
            histogram.add(hour, tz, count.clamp(0, u32::MAX as i64) as u32);
        }
        Ok(histogram)
    }
}

/// The recent activity of these customers with these names, since `since`.
pub async fn activity_of(
    conn: &mut PgConnection,
    workspace_id: &str,
    customers: &[String],
    names: &[String],
    since: DateTime<Utc>,
) -> ApiResult<HashMap<String, Vec<Activity>>> {
    let rows: Vec<(String, String, DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
        "SELECT customer_id, name, at, properties FROM activity \
         WHERE workspace_id = $1 AND customer_id = ANY($2) AND name = ANY($3) AND at >= $4",
    )
    .bind(workspace_id)
    .bind(customers)
    .bind(names)
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    let mut activity: HashMap<String, Vec<Activity>> = HashMap::new();
    for (customer, name, at, properties) in rows {
        activity.entry(customer).or_default().push(Activity {
            name,
            at,
            properties,
        });
    }
    Ok(activity)
}

/// The times these customers acted (orders, opens, clicks) in the last year, for their own
/// best-time histograms.
pub async fn acting_times(
    conn: &mut PgConnection,
    workspace_id: &str,
    customers: &[String],
    now: DateTime<Utc>,
) -> ApiResult<HashMap<String, Vec<DateTime<Utc>>>> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT customer_id, at FROM activity WHERE workspace_id = $1 AND customer_id = ANY($2) \
         AND name = ANY($3) AND at >= $4",
    )
    .bind(workspace_id)
    .bind(customers)
    .bind(BEST_TIME_EVENTS.map(str::to_owned).to_vec())
    .bind(now - Duration::days(BEST_TIME_HISTORY_DAYS))
    .fetch_all(&mut *conn)
    .await?;
    let mut times: HashMap<String, Vec<DateTime<Utc>>> = HashMap::new();
    for (customer, at) in rows {
        times.entry(customer).or_default().push(at);
    }
    Ok(times)
}
