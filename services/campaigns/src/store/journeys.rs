//! Journeys: starting them (with the re-entry rules), claiming the due ones
//! (`FOR UPDATE SKIP LOCKED`, so two workers never run the same step), writing back what a
//! run decided, and the events that end or wake them.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use relance_kit::error::ApiResult;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::CampaignStore;
use super::flows::{JOURNEY_ACTIVE, JOURNEY_ENDED, JOURNEY_HELD};
use crate::domain::journey::{EndReason, JourneyState};
use crate::domain::model::ReEntry;

/// A journey to start.
#[derive(Debug, Clone)]
pub struct NewJourney {
    pub flow: String,
    pub version: u32,
    pub re_entry: ReEntry,
    pub customer_id: String,
    /// Unique per flow: a redelivered trigger starts nothing.
    pub trigger_id: String,
    pub control: bool,
    pub trigger_data: serde_json::Value,
    /// When its first step runs.
    pub wake_at: DateTime<Utc>,
}

/// A journey claimed by a worker.
#[derive(Debug, Clone)]
pub struct DueJourney {
    pub id: Uuid,
    pub workspace_id: String,
    pub flow: String,
    pub flow_version: u32,
    pub customer_id: String,
    pub control: bool,
    pub state: JourneyState,
    pub trigger_data: serde_json::Value,
    pub entered_at: DateTime<Utc>,
    /// When it was due (its lateness is the claim time minus this).
    pub due_at: DateTime<Utc>,
    /// The trace context of what started it: its steps join that trace.
    pub traceparent: Option<String>,
}

/// What a run decided for one journey.
#[derive(Debug, Clone)]
pub struct JourneyWrite {
    pub id: Uuid,
    pub status: i16,
    pub end_reason: Option<EndReason>,
    pub state: JourneyState,
    pub waiting_event: Option<String>,
    pub next_wake_at: Option<DateTime<Utc>>,
}

/// A step a journey reached.
#[derive(Debug, Clone)]
pub struct Visit {
    pub journey_id: Uuid,
    pub seq: u32,
    pub workspace_id: String,
    pub flow: String,
    pub step: String,
    pub at: DateTime<Utc>,
}

/// One journey, for ListJourneys.
#[derive(Debug, Clone)]
pub struct JourneyRecord {
    pub id: Uuid,
    pub flow: String,
    pub flow_version: u32,
    pub customer_id: String,
    pub status: i16,
    pub end_reason: Option<i16>,
    pub control: bool,
    pub state: JourneyState,
    pub next_wake_at: Option<DateTime<Utc>>,
    pub entered_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl CampaignStore {
    /// Starts the journeys the re-entry rules allow; returns how many started. A trigger
    /// seen before (same flow and trigger id) or a running journey in the flow starts
    /// nothing.
    pub async fn start_journeys(
        &self,
        workspace_id: &str,
        starts: &[NewJourney],
        now: DateTime<Utc>,
    ) -> ApiResult<u64> {
        if starts.is_empty() {
            return Ok(0);
        }
        let mut flows = Vec::with_capacity(starts.len());
        let mut customers = Vec::with_capacity(starts.len());
        for start in starts {
            flows.push(start.flow.clone());
            customers.push(start.customer_id.clone());
        }
        // The latest journey of each (flow, customer), for the re-entry rules.
        let rows: Vec<(String, String, i16, DateTime<Utc>)> = sqlx::query_as(
            "SELECT DISTINCT ON (j.flow, j.customer_id) j.flow, j.customer_id, j.status, j.entered_at \
             FROM journeys j JOIN UNNEST($2::text[], $3::text[]) AS k(flow, customer_id) \
             ON j.flow = k.flow AND j.customer_id = k.customer_id \
             WHERE j.workspace_id = $1 ORDER BY j.flow, j.customer_id, j.entered_at DESC",
        )
        .bind(workspace_id)
        .bind(&flows)
        .bind(&customers)
        .fetch_all(&self.pool)
        .await?;
        let mut latest: HashMap<(String, String), (i16, DateTime<Utc>)> = HashMap::new();
        for (flow, customer, status, entered_at) in rows {
            latest.insert((flow, customer), (status, entered_at));
        }
        let mut ids = Vec::new();
        let mut flow_names = Vec::new();
        let mut versions = Vec::new();
        let mut customer_ids = Vec::new();
        let mut trigger_ids = Vec::new();
        let mut controls = Vec::new();
        let mut states = Vec::new();
        let mut trigger_data = Vec::new();
        let mut wakes = Vec::new();
        let start_state =
            serde_json::to_value(JourneyState::start()).map_err(anyhow::Error::from)?;
        let mut seen = std::collections::HashSet::new();
        for start in starts {
            let key = (start.flow.clone(), start.customer_id.clone());
            if !seen.insert(key.clone()) {
                continue;
            }
            if let Some((status, entered_at)) = latest.get(&key) {
                let running = *status == JOURNEY_ACTIVE || *status == JOURNEY_HELD;
                let allowed = match start.re_entry {
                    ReEntry::Never => false,
                    ReEntry::Always => !running,
                    ReEntry::After { secs } => {
                        !running && *entered_at + Duration::seconds(secs) <= now
                    }
                };
                if !allowed {
                    continue;
                }
            }
            ids.push(Uuid::now_v7());
            flow_names.push(start.flow.clone());
            versions.push(start.version as i32);
            customer_ids.push(start.customer_id.clone());
            trigger_ids.push(start.trigger_id.clone());
            controls.push(start.control);
            states.push(start_state.clone());
            trigger_data.push(start.trigger_data.clone());
            wakes.push(start.wake_at);
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let inserted = sqlx::query(
            "INSERT INTO journeys (id, workspace_id, flow, flow_version, customer_id, trigger_id, status, control, \
             state, next_wake_at, trigger_data, entered_at, updated_at, traceparent) \
             SELECT id, $1, flow, version, customer_id, trigger_id, 1, control, state, wake, data, $11, $11, $12 \
             FROM UNNEST($2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], $7::bool[], $8::jsonb[], \
             $9::timestamptz[], $10::jsonb[]) AS t(id, flow, version, customer_id, trigger_id, control, state, wake, data) \
             ON CONFLICT DO NOTHING",
        )
        .bind(workspace_id)
        .bind(&ids)
        .bind(&flow_names)
        .bind(&versions)
        .bind(&customer_ids)
        .bind(&trigger_ids)
        .bind(&controls)
        .bind(&states)
        .bind(&wakes)
        .bind(&trigger_data)
        .bind(now)
        // Started by the message or call being handled: its trace continues in the steps.
        .bind(relance_kit::trace::current())
        .execute(&self.pool)
        .await?;
        let started = inserted.rows_affected();
        metrics::counter!("relance_campaigns_journeys_started_total").increment(started);
        Ok(started)
    }

    /// Ends the running journeys of these customers in `flow` that began at or before the
    /// goal event (GOAL_REACHED); returns how many ended.
    pub async fn reach_goal(
        &self,
        workspace_id: &str,
        flow: &str,
        customers: &[String],
        event_times: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> ApiResult<u64> {
        let ended = sqlx::query(
            "UPDATE journeys j SET status = 3, end_reason = $3, ended_at = $4, next_wake_at = NULL, \
             waiting_event = NULL, updated_at = $4 \
             FROM UNNEST($5::text[], $6::timestamptz[]) AS e(customer_id, at) \
             WHERE j.workspace_id = $1 AND j.flow = $2 AND j.customer_id = e.customer_id \
             AND j.status IN (1, 2) AND j.entered_at <= e.at",
        )
        .bind(workspace_id)
        .bind(flow)
        .bind(EndReason::GoalReached as i16)
        .bind(now)
        .bind(customers)
        .bind(event_times)
        .execute(&self.pool)
        .await?;
        Ok(ended.rows_affected())
    }

    /// Wakes at once the journeys of these customers waiting for an event of this name.
    pub async fn wake_waiting(
        &self,
        workspace_id: &str,
        event: &str,
        customers: &[String],
        now: DateTime<Utc>,
    ) -> ApiResult<u64> {
        let woken = sqlx::query(
            "UPDATE journeys SET next_wake_at = $4 WHERE workspace_id = $1 AND customer_id = ANY($2) \
             AND waiting_event = $3 AND status = 1 AND next_wake_at > $4",
        )
        .bind(workspace_id)
        .bind(customers)
        .bind(event)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(woken.rows_affected())
    }

    /// Ends every running journey of an erased customer (CUSTOMER_DELETED) and forgets what
    /// campaigns kept about them.
    pub async fn erase_customer(
        &self,
        workspace_id: &str,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE journeys SET status = 3, end_reason = $3, ended_at = $4, next_wake_at = NULL, \
             waiting_event = NULL, trigger_data = '{}', updated_at = $4 \
             WHERE workspace_id = $1 AND customer_id = $2 AND status IN (1, 2)",
        )
        .bind(workspace_id)
        .bind(customer_id)
        .bind(EndReason::CustomerDeleted as i16)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // Locks in the workers' order (journeys or recipients, then counters), so an erasure
        // during a send cannot deadlock with it.
        sqlx::query(
            "UPDATE broadcast_recipients SET state = 5 WHERE workspace_id = $1 AND customer_id = $2 AND state = 0",
        )
        .bind(workspace_id)
        .bind(customer_id)
        .execute(&mut *tx)
        .await?;
        for table in ["activity", "cap_counters"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE workspace_id = $1 AND customer_id = $2"
            ))
            .bind(workspace_id)
            .bind(customer_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A customer's journeys, newest first, after the page token's entry time.
    pub async fn list_journeys(
        &self,
        workspace_id: &str,
        customer_id: &str,
        flow: &str,
        statuses: &[i16],
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> ApiResult<Vec<JourneyRecord>> {
        let rows = sqlx::query(
            "SELECT id, flow, flow_version, customer_id, status, end_reason, control, state, next_wake_at, \
             entered_at, ended_at FROM journeys WHERE workspace_id = $1 AND customer_id = $2 \
             AND ($3 = '' OR flow = $3) AND (cardinality($4::smallint[]) = 0 OR status = ANY($4)) \
             AND ($5::timestamptz IS NULL OR entered_at < $5) ORDER BY entered_at DESC LIMIT $6",
        )
        .bind(workspace_id)
        .bind(customer_id)
        .bind(flow)
        .bind(statuses)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut journeys = Vec::with_capacity(rows.len());
        for row in rows {
            let state: serde_json::Value = row.try_get("state")?;
            let version: i32 = row.try_get("flow_version")?;
            journeys.push(JourneyRecord {
                id: row.try_get("id")?,
                flow: row.try_get("flow")?,
                flow_version: version as u32,
                customer_id: row.try_get("customer_id")?,
                status: row.try_get("status")?,
                end_reason: row.try_get("end_reason")?,
                control: row.try_get("control")?,
                state: serde_json::from_value(state).map_err(anyhow::Error::from)?,
                next_wake_at: row.try_get("next_wake_at")?,
                entered_at: row.try_get("entered_at")?,
                ended_at: row.try_get("ended_at")?,
            });
        }
        Ok(journeys)
    }
}

/// Claims up to `limit` due journeys, locking them until the transaction ends.
pub async fn claim_due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> ApiResult<Vec<DueJourney>> {
    let rows = sqlx::query(
        "SELECT id, workspace_id, flow, flow_version, customer_id, control, state, trigger_data, entered_at, next_wake_at, traceparent \
         FROM journeys WHERE status = 1 AND next_wake_at <= $1 ORDER BY next_wake_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for row in rows {
        let state: serde_json::Value = row.try_get("state")?;
        let version: i32 = row.try_get("flow_version")?;
        due.push(DueJourney {
            id: row.try_get("id")?,
            workspace_id: row.try_get("workspace_id")?,
            flow: row.try_get("flow")?,
            flow_version: version as u32,
            customer_id: row.try_get("customer_id")?,
            control: row.try_get("control")?,
            state: serde_json::from_value(state).map_err(anyhow::Error::from)?,
            trigger_data: row.try_get("trigger_data")?,
            entered_at: row.try_get("entered_at")?,
            due_at: row.try_get("next_wake_at")?,
            traceparent: row.try_get("traceparent")?,
        });
    }
    Ok(due)
}

/// Writes back what runs decided, in one statement.
pub async fn write_journeys(
    conn: &mut PgConnection,
    writes: &[JourneyWrite],
    now: DateTime<Utc>,
) -> ApiResult<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(writes.len());
    let mut statuses = Vec::with_capacity(writes.len());
    let mut reasons: Vec<Option<i16>> = Vec::with_capacity(writes.len());
    let mut states = Vec::with_capacity(writes.len());
    let mut waiting: Vec<Option<String>> = Vec::with_capacity(writes.len());
    let mut wakes: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(writes.len());
    for write in writes {
        ids.push(write.id);
        statuses.push(write.status);
        reasons.push(write.end_reason.map(|r| r as i16));
        states.push(serde_json::to_value(&write.state).map_err(anyhow::Error::from)?);
        waiting.push(write.waiting_event.clone());
        wakes.push(write.next_wake_at);
    }
    sqlx::query(
        "UPDATE journeys j SET status = w.status, end_reason = w.reason, state = w.state, \
         waiting_event = w.waiting, next_wake_at = w.wake, updated_at = $7, \
         ended_at = CASE WHEN w.status = 3 THEN $7 ELSE NULL END, \
         trigger_data = CASE WHEN w.status = 3 THEN '{}'::jsonb ELSE j.trigger_data END \
         FROM UNNEST($1::uuid[], $2::smallint[], $3::smallint[], $4::jsonb[], $5::text[], $6::timestamptz[]) \
         AS w(id, status, reason, state, waiting, wake) WHERE j.id = w.id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&states)
    .bind(&waiting)
    .bind(&wakes)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let ended = statuses.iter().filter(|s| **s == JOURNEY_ENDED).count();
    metrics::counter!("relance_campaigns_journeys_ended_total").increment(ended as u64);
    Ok(())
}

/// Records the steps journeys reached (a re-run after a crash writes the same rows).
pub async fn insert_visits(conn: &mut PgConnection, visits: &[Visit]) -> ApiResult<()> {
    if visits.is_empty() {
        return Ok(());
    }
    let mut journeys = Vec::with_capacity(visits.len());
    let mut seqs = Vec::with_capacity(visits.len());
    let mut workspaces = Vec::with_capacity(visits.len());
    let mut flows = Vec::with_capacity(visits.len());
    let mut steps = Vec::with_capacity(visits.len());
    let mut ats = Vec::with_capacity(visits.len());
    for visit in visits {
        journeys.push(visit.journey_id);
        seqs.push(visit.seq as i32);
        workspaces.push(visit.workspace_id.clone());
        flows.push(visit.flow.clone());
        steps.push(visit.step.clone());
        ats.push(visit.at);
    }
    sqlx::query(
        "INSERT INTO step_visits (journey_id, seq, workspace_id, flow, step, at) \
         SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&journeys)
    .bind(&seqs)
    .bind(&workspaces)
    .bind(&flows)
    .bind(&steps)
    .bind(&ats)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
