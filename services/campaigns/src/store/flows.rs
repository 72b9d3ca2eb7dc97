//! Flows and their versions; the life cycle (pause, resume, archive) and what it does to
//! running journeys.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use relance_kit::error::{ApiError, ApiResult};
use sqlx::Row;

use super::CampaignStore;
use crate::domain::journey::EndReason;
use crate::domain::model::{FlowDef, Trigger};

/// A flow's life cycle (`relance.v1.FlowStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowStatus {
    Active = 1,
    Paused = 2,
    Archived = 3,
}

impl FlowStatus {
    pub fn from_i16(value: i16) -> FlowStatus {
        match value {
            2 => FlowStatus::Paused,
            3 => FlowStatus::Archived,
            _ => FlowStatus::Active,
        }
    }
}

/// Journey statuses (`relance.v1.JourneyStatus`).
pub const JOURNEY_ACTIVE: i16 = 1;
pub const JOURNEY_HELD: i16 = 2;
pub const JOURNEY_ENDED: i16 = 3;

/// One flow version as stored.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    pub name: String,
    pub version: u32,
    pub latest_version: u32,
    pub status: FlowStatus,
    pub yaml: String,
    pub definition: Arc<FlowDef>,
    pub active_journeys: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub paused_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// What ApplyFlow did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub version: u32,
    pub changed: bool,
    pub status: FlowStatus,
}

/// The trigger's kind number and subject, as the `flows` row keeps them.
pub fn trigger_columns(def: &FlowDef) -> (i16, String) {
    match &def.trigger {
        Trigger::Event(event) => (1, event.event.clone()),
        Trigger::SegmentEntered { segment } => (2, segment.clone()),
        Trigger::Schedule { segment, .. } => (3, segment.clone()),
    }
}

impl CampaignStore {
    /// Stores a flow document: a new version when it differs from the current one. An
    /// archived flow comes back active; a paused one stays paused.
    pub async fn apply_flow(
        &self,
        workspace_id: &str,
        def: &FlowDef,
        yaml: &str,
        next_run_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> ApiResult<Applied> {
        let definition = serde_json::to_value(def).map_err(anyhow::Error::from)?;
        let mut tx = self.pool.begin().await?;
        let head: Option<(i32, i16)> = sqlx::query_as(
            "SELECT latest_version, status FROM flows WHERE workspace_id = $1 AND name = $2 FOR UPDATE",
        )
        .bind(workspace_id)
        .bind(&def.name)
        .fetch_optional(&mut *tx)
        .await?;
        let (trigger_kind, trigger_subject) = trigger_columns(def);
        let version = match head {
            Some((latest, status)) => {
                let current: (serde_json::Value,) = sqlx::query_as(
                    "SELECT definition FROM flow_versions WHERE workspace_id = $1 AND name = $2 AND version = $3",
                )
                .bind(workspace_id)
                .bind(&def.name)
                .bind(latest)
                .fetch_one(&mut *tx)
                .await?;
                let status = FlowStatus::from_i16(status);
                if current.0 == definition && status != FlowStatus::Archived {
                    return Ok(Applied {
                        version: latest as u32,
                        changed: false,
                        status,
                    });
                }
                let new_status = match status {
                    FlowStatus::Paused => FlowStatus::Paused,
                    _ => FlowStatus::Active,
                };
                sqlx::query(
                    "UPDATE flows SET latest_version = $3, status = $4, trigger_kind = $5, trigger_subject = $6, \
                     next_run_at = $7, updated_at = $8, archived_at = NULL \
                     WHERE workspace_id = $1 AND name = $2",
                )
                .bind(workspace_id)
                .bind(&def.name)
                .bind(latest + 1)
                .bind(new_status as i16)
                .bind(trigger_kind)
                .bind(&trigger_subject)
                .bind(next_run_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                latest + 1
            }
            None => {
                sqlx::query(
                    "INSERT INTO flows (workspace_id, name, latest_version, status, trigger_kind, trigger_subject, \
                     next_run_at, created_at, updated_at) VALUES ($1, $2, 1, 1, $3, $4, $5, $6, $6)",
                )
                .bind(workspace_id)
                .bind(&def.name)
                .bind(trigger_kind)
                .bind(&trigger_subject)
                .bind(next_run_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                1
            }
        };
        sqlx::query(
            "INSERT INTO flow_versions (workspace_id, name, version, yaml, definition, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(workspace_id)
        .bind(&def.name)
        .bind(version)
        .bind(yaml)
        .bind(&definition)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let status: (i16,) =
            sqlx::query_as("SELECT status FROM flows WHERE workspace_id = $1 AND name = $2")
                .bind(workspace_id)
                .bind(&def.name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        self.forget_active_flows(workspace_id);
        Ok(Applied {
            version: version as u32,
            changed: true,
            status: FlowStatus::from_i16(status.0),
        })
    }

    /// The version a new document would get, and whether it differs (for dry runs).
    pub async fn would_apply(&self, workspace_id: &str, def: &FlowDef) -> ApiResult<(u32, bool)> {
        let definition = serde_json::to_value(def).map_err(anyhow::Error::from)?;
        let row: Option<(i32, i16, serde_json::Value)> = sqlx::query_as(
            "SELECT f.latest_version, f.status, v.definition FROM flows f \
             JOIN flow_versions v ON v.workspace_id = f.workspace_id AND v.name = f.name AND v.version = f.latest_version \
             WHERE f.workspace_id = $1 AND f.name = $2",
        )
        .bind(workspace_id)
        .bind(&def.name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => (1, true),
            Some((latest, status, current)) => {
                if current == definition && status != FlowStatus::Archived as i16 {
                    (latest as u32, false)
                } else {
                    (latest as u32 + 1, true)
                }
            }
        })
    }

    /// One flow at a version (0: the latest).
    pub async fn flow(
        &self,
        workspace_id: &str,
        name: &str,
        version: u32,
    ) -> ApiResult<FlowRecord> {
        let row = sqlx::query(
            "SELECT f.latest_version, f.status, f.created_at, f.paused_at, f.archived_at, \
             v.version, v.yaml, v.definition, v.created_at AS version_at, \
             (SELECT count(*) FROM journeys j WHERE j.workspace_id = f.workspace_id AND j.flow = f.name AND j.status IN (1, 2)) AS running \
             FROM flows f JOIN flow_versions v ON v.workspace_id = f.workspace_id AND v.name = f.name \
             AND v.version = CASE WHEN $3 = 0 THEN f.latest_version ELSE $3 END \
             WHERE f.workspace_id = $1 AND f.name = $2",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(version as i32)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(match version {
                0 => ApiError::NotFound(format!("flow \"{name}\" does not exist")),
                v => ApiError::NotFound(format!("flow \"{name}\" has no version {v}")),
            });
        };
        flow_record(name, &row)
    }

    /// Flows by name, in the given statuses, after `after` (the page token).
    pub async fn list_flows(
        &self,
        workspace_id: &str,
        statuses: &[i16],
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> ApiResult<Vec<FlowRecord>> {
        let rows = sqlx::query(
            "SELECT f.name, f.latest_version, f.status, f.created_at, f.paused_at, f.archived_at, \
             v.version, '' AS yaml, v.definition, v.created_at AS version_at, \
             (SELECT count(*) FROM journeys j WHERE j.workspace_id = f.workspace_id AND j.flow = f.name AND j.status IN (1, 2)) AS running \
             FROM flows f JOIN flow_versions v ON v.workspace_id = f.workspace_id AND v.name = f.name AND v.version = f.latest_version \
             WHERE f.workspace_id = $1 AND f.status = ANY($2) AND f.name LIKE $3 || '%' AND f.name > $4 \
             ORDER BY f.name LIMIT $5",
        )
        .bind(workspace_id)
        .bind(statuses)
        .bind(like_escape(prefix))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut flows = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get("name")?;
            flows.push(flow_record(&name, row)?);
        }
        Ok(flows)
    }

    /// Pauses a flow: running journeys hold before their next send (the engine sees the
    /// status when it runs them).
    pub async fn pause_flow(
        &self,
        workspace_id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let updated = sqlx::query(
            "UPDATE flows SET status = 2, paused_at = $3 WHERE workspace_id = $1 AND name = $2 AND status = 1",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            self.require_not_archived(workspace_id, name).await?;
        }
        self.forget_active_flows(workspace_id);
        Ok(())
    }

    /// Resumes a paused flow: held journeys continue at once, or end (HELD_DROPPED).
    pub async fn resume_flow(
        &self,
        workspace_id: &str,
        name: &str,
        end_held: bool,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE flows SET status = 1, paused_at = NULL WHERE workspace_id = $1 AND name = $2 AND status = 2",
        )
        .bind(workspace_id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tx.rollback().await?;
            return self.require_not_archived(workspace_id, name).await;
        }
        if end_held {
            sqlx::query(
                "UPDATE journeys SET status = 3, end_reason = $3, ended_at = $4, next_wake_at = NULL, \
                 waiting_event = NULL, updated_at = $4 WHERE workspace_id = $1 AND flow = $2 AND status = 2",
            )
            .bind(workspace_id)
            .bind(name)
            .bind(EndReason::HeldDropped as i16)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE journeys SET status = 1, next_wake_at = $3, updated_at = $3 \
                 WHERE workspace_id = $1 AND flow = $2 AND status = 2",
            )
            .bind(workspace_id)
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.forget_active_flows(workspace_id);
        Ok(())
    }

    /// Archives a flow: every running journey ends (FLOW_ARCHIVED).
    pub async fn archive_flow(
        &self,
        workspace_id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE flows SET status = 3, archived_at = $3, next_run_at = NULL \
             WHERE workspace_id = $1 AND name = $2 AND status <> 3",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() > 0 {
            sqlx::query(
                "UPDATE journeys SET status = 3, end_reason = $3, ended_at = $4, next_wake_at = NULL, \
                 waiting_event = NULL, updated_at = $4 WHERE workspace_id = $1 AND flow = $2 AND status IN (1, 2)",
            )
            .bind(workspace_id)
            .bind(name)
            .bind(EndReason::FlowArchived as i16)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if updated.rows_affected() == 0 {
            self.flow(workspace_id, name, 0).await?;
        }
        self.forget_active_flows(workspace_id);
        Ok(())
    }

    async fn require_not_archived(&self, workspace_id: &str, name: &str) -> ApiResult<()> {
        let flow = self.flow(workspace_id, name, 0).await?;
        if flow.status == FlowStatus::Archived {
            return Err(ApiError::FailedPrecondition(format!(
                "flow \"{name}\" is archived: apply its document again to bring it back"
            )));
        }
        Ok(())
    }

    /// A flow version's definition (versions never change, so they are cached).
    pub async fn definition(
        &self,
        workspace_id: &str,
        name: &str,
        version: u32,
    ) -> ApiResult<Arc<FlowDef>> {
        let key = (workspace_id.to_owned(), name.to_owned(), version);
        if let Some(def) = self.lock_definitions().get(&key) {
            return Ok(def.clone());
        }
        let row: Option<(serde_json::Value,)> = sqlx::query_as(
            "SELECT definition FROM flow_versions WHERE workspace_id = $1 AND name = $2 AND version = $3",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(version as i32)
        .fetch_optional(&self.pool)
        .await?;
        let Some((json,)) = row else {
            return Err(ApiError::NotFound(format!(
                "flow \"{name}\" has no version {version}"
            )));
        };
        let def: FlowDef = serde_json::from_value(json).map_err(anyhow::Error::from)?;
        let def = Arc::new(def);
        let mut cache = self.lock_definitions();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, def.clone());
        Ok(def)
    }

    /// The status of each flow of the workspace by name (for the engine's pause checks).
    pub async fn flow_statuses(
        &self,
        workspace_id: &str,
    ) -> ApiResult<std::collections::HashMap<String, FlowStatus>> {
        let rows: Vec<(String, i16)> =
            sqlx::query_as("SELECT name, status FROM flows WHERE workspace_id = $1")
                .bind(workspace_id)
                .fetch_all(&self.pool)
                .await?;
        let mut statuses = std::collections::HashMap::with_capacity(rows.len());
        for (name, status) in rows {
            statuses.insert(name, FlowStatus::from_i16(status));
        }
        Ok(statuses)
    }
}

fn flow_record(name: &str, row: &sqlx::postgres::PgRow) -> ApiResult<FlowRecord> {
    let json: serde_json::Value = row.try_get("definition")?;
    let def: FlowDef = serde_json::from_value(json).map_err(anyhow::Error::from)?;
    let running: i64 = row.try_get("running")?;
    let version: i32 = row.try_get("version")?;
    let latest: i32 = row.try_get("latest_version")?;
    let status: i16 = row.try_get("status")?;
    Ok(FlowRecord {
        name: name.to_owned(),
        version: version as u32,
        latest_version: latest as u32,
        status: FlowStatus::from_i16(status),
        yaml: row.try_get("yaml")?,
        definition: Arc::new(def),
        active_journeys: running.max(0) as u64,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("version_at")?,
        paused_at: row.try_get("paused_at")?,
        archived_at: row.try_get("archived_at")?,
    })
}

/// Escapes `%`, `_` and `\` for a LIKE prefix.
fn like_escape(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
