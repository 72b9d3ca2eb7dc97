//! Per-workspace guardrail settings: frequency caps and quiet hours.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use relance_kit::error::ApiResult;

use super::CampaignStore;
use crate::domain::guard::{CapSettings, QuietHoursRule};

/// How long a workspace's settings are trusted by the workers (a Set call in this process
/// forgets them at once; other replicas see the change within this time).
const SETTINGS_TTL: Duration = Duration::from_secs(5);

/// A workspace's guardrails.
#[derive(Debug, Clone, Default)]
pub struct Guardrails {
    pub caps: CapSettings,
    pub caps_updated_at: Option<DateTime<Utc>>,
    pub quiet_hours: QuietHoursRule,
    pub quiet_hours_updated_at: Option<DateTime<Utc>>,
}

/// Cached guardrails by workspace.
pub type GuardrailCache = super::ttl::TtlMap<Arc<Guardrails>>;

/// The cache the store starts with.
pub fn guardrail_cache() -> GuardrailCache {
    super::ttl::TtlMap::new(SETTINGS_TTL)
}

/// A workspace's stored settings row: caps, when set, quiet hours, when set.
type SettingsRow = (
    Option<serde_json::Value>,
    Option<DateTime<Utc>>,
    Option<serde_json::Value>,
    Option<DateTime<Utc>>,
);

impl CampaignStore {
    /// The workspace's guardrails (defaults where never set: no caps; quiet hours on,
    /// 22:00–08:00).
    pub async fn guardrails(&self, workspace_id: &str) -> ApiResult<Arc<Guardrails>> {
        if let Some(cached) = self.guardrail_cache.get(workspace_id) {
            return Ok(cached);
        }
        let row: Option<SettingsRow> =
            sqlx::query_as(
                "SELECT caps, caps_updated_at, quiet_hours, quiet_hours_updated_at FROM workspace_settings WHERE workspace_id = $1",
            )
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await?;
        let mut guardrails = Guardrails::default();
        if let Some((caps, caps_at, quiet, quiet_at)) = row {
            if let Some(caps) = caps {
                guardrails.caps = serde_json::from_value(caps).map_err(anyhow::Error::from)?;
                guardrails.caps_updated_at = caps_at;
            }
            if let Some(quiet) = quiet {
                guardrails.quiet_hours =
                    serde_json::from_value(quiet).map_err(anyhow::Error::from)?;
                guardrails.quiet_hours_updated_at = quiet_at;
            }
        }
        let guardrails = Arc::new(guardrails);
        self.guardrail_cache.put(workspace_id, guardrails.clone());
        Ok(guardrails)
    }

    /// Replaces the workspace's frequency caps.
    pub async fn set_caps(
        &self,
        workspace_id: &str,
        caps: &CapSettings,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let json = serde_json::to_value(caps).map_err(anyhow::Error::from)?;
        sqlx::query(
            "INSERT INTO workspace_settings (workspace_id, caps, caps_updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (workspace_id) DO UPDATE SET caps = $2, caps_updated_at = $3",
        )
        .bind(workspace_id)
        .bind(json)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.guardrail_cache.forget(workspace_id);
        Ok(())
    }

    /// Replaces the workspace's quiet hours.
    pub async fn set_quiet_hours(
        &self,
        workspace_id: &str,
        rule: &QuietHoursRule,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let json = serde_json::to_value(rule).map_err(anyhow::Error::from)?;
        sqlx::query(
            "INSERT INTO workspace_settings (workspace_id, quiet_hours, quiet_hours_updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (workspace_id) DO UPDATE SET quiet_hours = $2, quiet_hours_updated_at = $3",
        )
        .bind(workspace_id)
        .bind(json)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.guardrail_cache.forget(workspace_id);
        Ok(())
    }
}
