//! Schedule-triggered flows (`trigger: { schedule: "0 18 1 * *", segment: vip }`): at each
//! occurrence, every member of the segment starts a journey — at the occurrence, or with
//! `local_time`, at that local time in their own timezone.

use std::collections::HashMap;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Timelike, Utc};
use relance_kit::SharedClock;
use relance_kit::error::{ApiError, ApiResult};
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::domain::experiment;
use crate::domain::guard;
use crate::domain::model::Trigger;
use crate::domain::schedule::{self, Cron};
use crate::store::CampaignStore;
use crate::store::journeys::NewJourney;

/// Journeys started per call of the store.
const START_CHUNK: usize = 2000;

/// Runs due schedule triggers until shutdown.
pub async fn run(
    store: CampaignStore,
    clients: Clients,
    clock: SharedClock,
    poll: StdDuration,
    shutdown: CancellationToken,
) {
    loop {
        match run_due(&store, &clients, &clock).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => tracing::warn!(error = %error, "scheduled flow run failed, retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Runs one due occurrence; true when there was one.
pub async fn run_due(
    store: &CampaignStore,
    clients: &Clients,
    clock: &SharedClock,
) -> ApiResult<bool> {
    let now = clock.now();
    let mut tx = store.pool.begin().await?;
    let row: Option<(String, String, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT workspace_id, name, latest_version, next_run_at FROM flows \
         WHERE status = 1 AND next_run_at <= $1 ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((workspace_id, name, version, occurrence)) = row else {
        return Ok(false);
    };
    let def = store
        .definition(&workspace_id, &name, version as u32)
        .await?;
    let Trigger::Schedule {
        cron,
        segment,
        local_time,
    } = &def.trigger
    else {
        sqlx::query("UPDATE flows SET next_run_at = NULL WHERE workspace_id = $1 AND name = $2")
            .bind(&workspace_id)
            .bind(&name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(true);
    };
    let mut members = Vec::new();
    clients
        .segment_members(&workspace_id, segment, |ids| members.extend(ids))
        .await
        .map_err(|status| ApiError::Unavailable(format!("segmentation: {}", status.message())))?;
    let guardrails = store.guardrails(&workspace_id).await?;
    let default_tz = guard::resolve_tz(
        Some(&guardrails.quiet_hours.default_timezone),
        chrono_tz::UTC,
    );
    // The occurrence as a local date and time (read at UTC+14, where it happens first).
    let local = occurrence.with_timezone(&chrono_tz::Etc::GMTMinus14);
    for chunk in members.chunks(START_CHUNK) {
        let mut zones = HashMap::new();
        if *local_time {
            let profiles = clients
                .profiles(&workspace_id, chunk)
                .await
                .map_err(|status| {
                    ApiError::Unavailable(format!("profiles: {}", status.message()))
                })?;
            for (customer, profile) in profiles {
                zones.insert(
                    customer,
                    guard::resolve_tz(profile.timezone.as_deref(), default_tz),
                );
            }
        }
        let mut starts = Vec::with_capacity(chunk.len());
        for customer in chunk {
            let wake_at = if *local_time {
                let tz = zones.get(customer).copied().unwrap_or(default_tz);
                schedule::local_instant(local.date_naive(), local.hour(), local.minute(), tz)
            } else {
                occurrence
            };
            starts.push(NewJourney {
                flow: name.clone(),
                version: version as u32,
                re_entry: match def.re_entry {
                    crate::domain::model::ReEntry::Never => crate::domain::model::ReEntry::Always,
                    other => other,
                },
                customer_id: customer.clone(),
                // Unique per customer and occurrence: a retried run starts nobody twice.
                trigger_id: format!("schedule:{}:{customer}", occurrence.to_rfc3339()),
                control: experiment::in_control(customer, &name, def.control_group_percent),
                trigger_data: serde_json::json!({ "segment": segment, "occurrence": occurrence.to_rfc3339() }),
                wake_at,
            });
        }
        store.start_journeys(&workspace_id, &starts, now).await?;
    }
    let tz = if *local_time {
        chrono_tz::Etc::GMTMinus14
    } else {
        chrono_tz::UTC
    };
    let next = Cron::parse(cron)
        .ok()
        .and_then(|c| c.next_after(occurrence.max(now), tz));
    sqlx::query("UPDATE flows SET next_run_at = $3 WHERE workspace_id = $1 AND name = $2")
        .bind(&workspace_id)
        .bind(&name)
        .bind(next)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(flow = %name, members = members.len(), next = ?next, "scheduled flow run started journeys");
    Ok(true)
}
