//! Everything campaigns keeps in Postgres: flows, journeys (the durable timers), the
//! activity flows react to, message outcomes, broadcasts, guardrail settings and counters,
//! and the outbox of send requests. SQL lives here and nowhere else.

pub mod activity;
pub mod broadcasts;
pub mod flows;
pub mod journeys;
pub mod report;
pub mod sends;
pub mod settings;
pub mod ttl;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use relance_kit::error::ApiResult;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::domain::model::FlowDef;
use flows::FlowStatus;

/// How long the list of a workspace's active flows is trusted by the consumer (an apply in
/// this process forgets it at once).
const ACTIVE_FLOWS_TTL: Duration = Duration::from_secs(2);

/// A flow that may start or affect journeys: active or paused, at its latest version.
#[derive(Debug, Clone)]
pub struct LiveFlow {
    pub name: String,
    pub version: u32,
    pub status: FlowStatus,
    pub def: Arc<FlowDef>,
}

type DefinitionKey = (String, String, u32);

/// The campaigns store.
#[derive(Clone)]
pub struct CampaignStore {
    pub pool: PgPool,
    /// Notified after a commit that wrote to the outbox.
    pub outbox_wake: Arc<Notify>,
    definitions: Arc<Mutex<HashMap<DefinitionKey, Arc<FlowDef>>>>,
    live_flows: ttl::TtlMap<Arc<Vec<LiveFlow>>>,
    guardrail_cache: settings::GuardrailCache,
    broadcast_events: ttl::TtlMap<Arc<HashSet<String>>>,
}

impl std::fmt::Debug for CampaignStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignStore").finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned cache still holds usable entries.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CampaignStore {
    pub fn new(pool: PgPool, outbox_wake: Arc<Notify>) -> CampaignStore {
        CampaignStore {
            pool,
            outbox_wake,
            definitions: Arc::new(Mutex::new(HashMap::new())),
            live_flows: ttl::TtlMap::new(ACTIVE_FLOWS_TTL),
            guardrail_cache: settings::guardrail_cache(),
            broadcast_events: ttl::TtlMap::new(ACTIVE_FLOWS_TTL),
        }
    }

    fn lock_definitions(&self) -> MutexGuard<'_, HashMap<DefinitionKey, Arc<FlowDef>>> {
        lock(&self.definitions)
    }

    /// Drops the cached list of live flows (after an apply or a status change).
    pub fn forget_active_flows(&self, workspace_id: &str) {
        self.live_flows.forget(workspace_id);
    }

    /// The workspace's active and paused flows at their latest versions.
    pub async fn live_flows(&self, workspace_id: &str) -> ApiResult<Arc<Vec<LiveFlow>>> {
        if let Some(flows) = self.live_flows.get(workspace_id) {
            return Ok(flows);
        }
        let rows: Vec<(String, i32, i16)> = sqlx::query_as(
            "SELECT name, latest_version, status FROM flows WHERE workspace_id = $1 AND status IN (1, 2) ORDER BY name",
        )
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        let mut flows = Vec::with_capacity(rows.len());
        for (name, version, status) in rows {
            let def = self.definition(workspace_id, &name, version as u32).await?;
            flows.push(LiveFlow {
                name,
                version: version as u32,
                status: FlowStatus::from_i16(status),
                def,
            });
        }
        let flows = Arc::new(flows);
        self.live_flows.put(workspace_id, flows.clone());
        Ok(flows)
    }

    fn broadcast_events_cached(&self, workspace_id: &str) -> Option<Arc<HashSet<String>>> {
        self.broadcast_events.get(workspace_id)
    }

    fn cache_broadcast_events(&self, workspace_id: &str, names: Arc<HashSet<String>>) {
        self.broadcast_events.put(workspace_id, names);
    }

    fn forget_broadcast_events(&self, workspace_id: &str) {
        self.broadcast_events.forget(workspace_id);
    }
}
