//! Broadcasts: their definitions and life cycle, each run's recipients (taken from the
//! segment when the run starts, each with the moment of its wave), and the claim of due
//! recipients (`FOR UPDATE SKIP LOCKED`), so a crash mid-run resumes where it stopped.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use relance_kit::error::{ApiError, ApiResult};
use sqlx::{PgConnection, Row};

use super::CampaignStore;
use crate::domain::model::BroadcastDef;

/// A broadcast's life cycle (`relance.v1.BroadcastStatus`).
pub const SCHEDULED: i16 = 1;
pub const SENDING: i16 = 2;
pub const COMPLETED: i16 = 3;
pub const CANCELLED: i16 = 4;

/// Recipient states.
pub const PENDING: i16 = 0;
pub const QUEUED: i16 = 1;
pub const CONTROL: i16 = 2;
pub const CAPPED: i16 = 3;
pub const PAST: i16 = 4;

/// One broadcast as stored.
#[derive(Debug, Clone)]
pub struct BroadcastRecord {
    pub def: BroadcastDef,
    pub version: u32,
    pub yaml: String,
    pub status: i16,
    pub next_run_at: Option<DateTime<Utc>>,
    pub run: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub run_state: i16,
    pub audience_size: u64,
    pub queued: u64,
    pub control: u64,
    pub capped: u64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// A broadcast to schedule.
#[derive(Debug, Clone, Copy)]
pub struct Scheduled<'a> {
    pub def: &'a BroadcastDef,
    /// The document, or empty for a structured spec.
    pub yaml: &'a str,
    /// The first run (its first wave).
    pub next_run_at: DateTime<Utc>,
    /// The segment's size now.
    pub audience_size: u64,
    /// Validate only.
    pub dry_run: bool,
}

/// A recipient of a run.
#[derive(Debug, Clone)]
pub struct NewRecipient {
    pub customer_id: String,
    pub due_at: DateTime<Utc>,
    pub state: i16,
    pub variant: String,
}

/// A due recipient claimed by the sender.
#[derive(Debug, Clone)]
pub struct DueRecipient {
    /// The row's physical address (`ctid`), valid while the claim's transaction holds its
    /// lock: the write goes straight to it.
    pub row: String,
    pub customer_id: String,
    pub due_at: DateTime<Utc>,
    pub first_due_at: DateTime<Utc>,
    pub variant: String,
}

/// What became of a claimed recipient.
#[derive(Debug, Clone)]
pub struct RecipientWrite {
    /// The claimed row (`DueRecipient::row`).
    pub row: String,
    pub customer_id: String,
    pub state: i16,
    pub due_at: DateTime<Utc>,
}

const COLUMNS: &str = "name, version, definition, yaml, status, next_run_at, run, run_at, run_state, audience_size, \
    queued, control, capped, created_at, started_at, ended_at";

fn record(row: &sqlx::postgres::PgRow) -> ApiResult<BroadcastRecord> {
    let json: serde_json::Value = row.try_get("definition")?;
    let version: i32 = row.try_get("version")?;
    let audience: i64 = row.try_get("audience_size")?;
    let queued: i64 = row.try_get("queued")?;
    let control: i64 = row.try_get("control")?;
    let capped: i64 = row.try_get("capped")?;
    Ok(BroadcastRecord {
        def: serde_json::from_value(json).map_err(anyhow::Error::from)?,
        version: version as u32,
        yaml: row.try_get("yaml")?,
        status: row.try_get("status")?,
        next_run_at: row.try_get("next_run_at")?,
        run: row.try_get("run")?,
        run_at: row.try_get("run_at")?,
        run_state: row.try_get("run_state")?,
        audience_size: audience.max(0) as u64,
        queued: queued.max(0) as u64,
        control: control.max(0) as u64,
        capped: capped.max(0) as u64,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
    })
}

impl CampaignStore {
    /// Schedules a broadcast, or replaces one that has not started; returns it and whether
    /// it changed. One that has started is refused.
    pub async fn schedule_broadcast(
        &self,
        workspace_id: &str,
        scheduled: &Scheduled<'_>,
        now: DateTime<Utc>,
    ) -> ApiResult<(BroadcastRecord, bool)> {
        let Scheduled {
            def,
            yaml,
            next_run_at,
            audience_size,
            dry_run,
        } = *scheduled;
        let definition = serde_json::to_value(def).map_err(anyhow::Error::from)?;
        let mut tx = self.pool.begin().await?;
        let existing = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM broadcasts WHERE workspace_id = $1 AND name = $2 FOR UPDATE"
        ))
        .bind(workspace_id)
        .bind(&def.name)
        .fetch_optional(&mut *tx)
        .await?;
        let version = match &existing {
            Some(row) => {
                let current = record(row)?;
                if current.started_at.is_some() {
                    return Err(ApiError::FailedPrecondition(format!(
                        "broadcast \"{}\" has started: schedule it under a new name",
                        def.name
                    )));
                }
                let stored: serde_json::Value = row.try_get("definition")?;
                if stored == definition && current.status == SCHEDULED {
                    return Ok((current, false));
                }
                current.version + 1
            }
            None => 1,
        };
        let planned = BroadcastRecord {
            def: def.clone(),
            version,
            yaml: yaml.to_owned(),
            status: SCHEDULED,
            next_run_at: Some(next_run_at),
            run: 0,
            run_at: None,
            run_state: 0,
            audience_size,
            queued: 0,
            control: 0,
            capped: 0,
            created_at: now,
            started_at: None,
            ended_at: None,
        };
        if dry_run {
            return Ok((planned, true));
        }
        sqlx::query(
            "INSERT INTO broadcasts (workspace_id, name, version, definition, yaml, status, next_run_at, audience_size, created_at) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) \
             ON CONFLICT (workspace_id, name) DO UPDATE SET version = $3, definition = $4, yaml = $5, status = 1, \
             next_run_at = $6, audience_size = $7, ended_at = NULL",
        )
        .bind(workspace_id)
        .bind(&def.name)
        .bind(version as i32)
        .bind(&definition)
        .bind(yaml)
        .bind(next_run_at)
        .bind(audience_size as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.forget_broadcast_events(workspace_id);
        self.broadcast(workspace_id, &def.name)
            .await
            .map(|b| (b, true))
    }

    /// One broadcast.
    pub async fn broadcast(&self, workspace_id: &str, name: &str) -> ApiResult<BroadcastRecord> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM broadcasts WHERE workspace_id = $1 AND name = $2"
        ))
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => record(&row),
            None => Err(ApiError::NotFound(format!(
                "broadcast \"{name}\" does not exist"
            ))),
        }
    }

    /// Broadcasts in these statuses (all when empty), scheduled ones by next run first, then
    /// the others newest first; `offset` is the page token.
    pub async fn list_broadcasts(
        &self,
        workspace_id: &str,
        statuses: &[i16],
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        offset: i64,
        limit: i64,
    ) -> ApiResult<Vec<BroadcastRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM broadcasts WHERE workspace_id = $1 \
             AND (cardinality($2::smallint[]) = 0 OR status = ANY($2)) \
             AND ($3::timestamptz IS NULL OR COALESCE(next_run_at, run_at, started_at, created_at) >= $3) \
             AND ($4::timestamptz IS NULL OR COALESCE(next_run_at, run_at, started_at, created_at) < $4) \
             ORDER BY (next_run_at IS NULL), next_run_at, COALESCE(run_at, started_at, created_at) DESC, name \
             OFFSET $5 LIMIT $6"
        ))
        .bind(workspace_id)
        .bind(statuses)
        .bind(from)
        .bind(to)
        .bind(offset)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut broadcasts = Vec::with_capacity(rows.len());
        for row in &rows {
            broadcasts.push(record(row)?);
        }
        Ok(broadcasts)
    }

    /// Cancels a broadcast: pending recipients are dropped; what was queued still goes.
    ///
    /// Two transactions, never one: the sender locks recipients, then the broadcast row
    /// (its counters); taking the broadcast row first and the recipients second would
    /// deadlock with it. Once the status is CANCELLED no new batch is claimed, and the
    /// recipients left pending are dropped.
    pub async fn cancel_broadcast(
        &self,
        workspace_id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<BroadcastRecord> {
        let updated = sqlx::query(
            "UPDATE broadcasts SET status = 4, next_run_at = NULL, ended_at = $3 \
             WHERE workspace_id = $1 AND name = $2 AND status IN (1, 2)",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() > 0 {
            sqlx::query(
                "UPDATE broadcast_recipients SET state = 5 WHERE workspace_id = $1 AND broadcast = $2 AND state = 0",
            )
            .bind(workspace_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        }
        self.broadcast(workspace_id, name).await
    }

    /// Conversion events of the workspace's broadcasts (the consumer keeps them).
    pub async fn broadcast_conversion_events(
        &self,
        workspace_id: &str,
    ) -> ApiResult<std::sync::Arc<HashSet<String>>> {
        if let Some(cached) = self.broadcast_events_cached(workspace_id) {
            return Ok(cached);
        }
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT definition->'conversion'->'goal'->>'event' FROM broadcasts \
             WHERE workspace_id = $1 AND definition->'conversion'->'goal'->>'event' IS NOT NULL",
        )
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        let names: HashSet<String> = rows.into_iter().map(|(name,)| name).collect();
        let names = std::sync::Arc::new(names);
        self.cache_broadcast_events(workspace_id, names.clone());
        Ok(names)
    }
}

/// Claims one broadcast whose next run (or run in progress) is due.
pub async fn claim_due_broadcast(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> ApiResult<Option<(String, BroadcastRecord)>> {
    let row = sqlx::query(&format!(
        "SELECT workspace_id, {COLUMNS} FROM broadcasts WHERE next_run_at <= $1 AND status IN (1, 2) \
         ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => {
            let workspace: String = row.try_get("workspace_id")?;
            Ok(Some((workspace, record(&row)?)))
        }
        None => Ok(None),
    }
}

/// Broadcasts being sent (their recipients are due over time).
pub async fn sending(conn: &mut PgConnection) -> ApiResult<Vec<(String, BroadcastRecord)>> {
    let rows = sqlx::query(&format!(
        "SELECT workspace_id, {COLUMNS} FROM broadcasts WHERE status = 2 AND run_state = 1 ORDER BY name"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let workspace: String = row.try_get("workspace_id")?;
        out.push((workspace, record(row)?));
    }
    Ok(out)
}

/// Starts a new run: the broadcast is SENDING and its audience is being taken.
pub async fn begin_run(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    run_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> ApiResult<i32> {
    let row: (i32,) = sqlx::query_as(
        "UPDATE broadcasts SET run = run + 1, run_at = $3, run_state = 0, status = 2, \
         started_at = COALESCE(started_at, $4) WHERE workspace_id = $1 AND name = $2 RETURNING run",
    )
    .bind(workspace_id)
    .bind(name)
    .bind(run_at)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.0)
}

/// Adds recipients of a run (a retried snapshot adds nothing twice).
pub async fn insert_recipients(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    run: i32,
    recipients: &[NewRecipient],
) -> ApiResult<u64> {
    if recipients.is_empty() {
        return Ok(0);
    }
    let n = recipients.len();
    let mut customers = Vec::with_capacity(n);
    let mut dues = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut variants = Vec::with_capacity(n);
    for recipient in recipients {
        customers.push(recipient.customer_id.clone());
        dues.push(recipient.due_at);
        states.push(recipient.state);
        variants.push(recipient.variant.clone());
    }
    let inserted = sqlx::query(
        "INSERT INTO broadcast_recipients (workspace_id, broadcast, run, customer_id, due_at, first_due_at, state, variant) \
         SELECT $1, $2, $3, c, d, d, s, v FROM UNNEST($4::text[], $5::timestamptz[], $6::smallint[], $7::text[]) AS t(c, d, s, v) \
         ON CONFLICT DO NOTHING",
    )
    .bind(workspace_id)
    .bind(name)
    .bind(run)
    .bind(&customers)
    .bind(&dues)
    .bind(&states)
    .bind(&variants)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected())
}

/// The run's audience is taken: its recipients are sent from now on.
pub async fn finish_snapshot(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    run: i32,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE broadcasts b SET run_state = 1, next_run_at = NULL, \
         audience_size = (SELECT count(*) FROM broadcast_recipients r WHERE r.workspace_id = b.workspace_id AND r.broadcast = b.name AND r.run = $3), \
         control = b.control + (SELECT count(*) FROM broadcast_recipients r WHERE r.workspace_id = b.workspace_id AND r.broadcast = b.name AND r.run = $3 AND r.state = 2) \
         WHERE workspace_id = $1 AND name = $2",
    )
    .bind(workspace_id)
    .bind(name)
    .bind(run)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Claims up to `limit` due recipients of a run.
pub async fn claim_recipients(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    run: i32,
    now: DateTime<Utc>,
    limit: i64,
) -> ApiResult<Vec<DueRecipient>> {
    // (row address, customer, due, first due, variant)
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, String, DateTime<Utc>, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT ctid::text, customer_id, due_at, first_due_at, variant FROM broadcast_recipients \
         WHERE workspace_id = $1 AND broadcast = $2 AND run = $3 AND state = 0 AND due_at <= $4 \
         ORDER BY due_at LIMIT $5 FOR UPDATE SKIP LOCKED",
    )
    .bind(workspace_id)
    .bind(name)
    .bind(run)
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(row, customer_id, due_at, first_due_at, variant)| DueRecipient {
                row,
                customer_id,
                due_at,
                first_due_at,
                variant,
            },
        )
        .collect())
}

/// Writes what became of claimed recipients and adds to the broadcast's counters.
pub async fn write_recipients(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    writes: &[RecipientWrite],
) -> ApiResult<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(writes.len());
    let mut states = Vec::with_capacity(writes.len());
    let mut dues = Vec::with_capacity(writes.len());
    let mut queued = 0i64;
    let mut capped = 0i64;
    for write in writes {
        rows.push(write.row.clone());
        states.push(write.state);
        dues.push(write.due_at);
        match write.state {
            QUEUED => queued += 1,
            CAPPED => capped += 1,
            _ => {}
        }
    }
    // By the rows' addresses alone (a TID scan each): a join on the key left the plan to
    // statistics that lag behind a million-row snapshot being worked through (a sequential
    // scan, over a second per batch, in the 1 M broadcast benchmark), and any other condition
    // on the table offers the generic plan an index scan of the whole run instead. The rows are
    // locked by the claim, in this transaction, so their addresses hold.
    sqlx::query(
        "UPDATE broadcast_recipients r SET state = w.state, due_at = w.due \
         FROM UNNEST($1::text[]::tid[], $2::smallint[], $3::timestamptz[]) AS w(row_id, state, due) \
         WHERE r.ctid = w.row_id",
    )
    .bind(&rows)
    .bind(&states)
    .bind(&dues)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE broadcasts SET queued = queued + $3, capped = capped + $4 WHERE workspace_id = $1 AND name = $2")
        .bind(workspace_id)
        .bind(name)
        .bind(queued)
        .bind(capped)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// When the run's next pending recipient is due; `None` when the run is over.
pub async fn next_pending(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    run: i32,
) -> ApiResult<Option<DateTime<Utc>>> {
    let row: (Option<DateTime<Utc>>,) = sqlx::query_as(
        "SELECT min(due_at) FROM broadcast_recipients WHERE workspace_id = $1 AND broadcast = $2 AND run = $3 AND state = 0",
    )
    .bind(workspace_id)
    .bind(name)
    .bind(run)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.0)
}

/// Ends a run: the next one is scheduled (recurring) or the broadcast is complete.
pub async fn end_run(
    conn: &mut PgConnection,
    workspace_id: &str,
    name: &str,
    next_run_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    match next_run_at {
        Some(next) => {
            sqlx::query("UPDATE broadcasts SET status = 1, next_run_at = $3 WHERE workspace_id = $1 AND name = $2 AND status = 2")
                .bind(workspace_id)
                .bind(name)
                .bind(next)
                .execute(&mut *conn)
                .await?;
        }
        None => {
            sqlx::query(
                "UPDATE broadcasts SET status = 3, next_run_at = NULL, ended_at = $3 WHERE workspace_id = $1 AND name = $2 AND status = 2",
            )
            .bind(workspace_id)
            .bind(name)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
