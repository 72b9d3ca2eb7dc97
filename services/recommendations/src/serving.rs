//! The snapshots this replica serves: one per workspace, swapped in whole (arc-swap) when
//! a new model version becomes current or the catalog changes, so that requests never
//! wait for a load and never see half of one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use relance_kit::{ApiError, ApiResult};

use crate::domain::model::{self, Snapshot};
use crate::domain::train::Trained;
use crate::store::{ModelRecord, RecoStore};

/// What one workspace is served from.
#[derive(Debug)]
pub struct Served {
    pub snapshot: Snapshot,
    pub model: Option<ModelRecord>,
    pub trained: Option<Arc<Trained>>,
    pub catalog_version: i64,
    pub loaded_at: DateTime<Utc>,
}

/// Every workspace's snapshot.
#[derive(Debug, Default)]
pub struct Serving {
    workspaces: ArcSwap<HashMap<String, Arc<Served>>>,
    /// Serialises reloads (the periodic refresh and the one after a local Train).
    reload: tokio::sync::Mutex<()>,
}

impl Serving {
    pub fn new() -> Serving {
        Serving::default()
    }

    /// The workspace's snapshot; `None` when it has neither catalog nor model.
    pub fn get(&self, workspace_id: &str) -> Option<Arc<Served>> {
        self.workspaces.load().get(workspace_id).cloned()
    }

    /// Loads whatever changed in Postgres since the last refresh.
    pub async fn refresh(&self, store: &RecoStore, now: DateTime<Utc>) -> ApiResult<()> {
        let _one_at_a_time = self.reload.lock().await;
        let versions = store.workspace_versions().await?;
        for (workspace_id, catalog_version, model_version) in versions {
            let loaded = self.get(&workspace_id);
            let loaded_model = loaded
                .as_ref()
                .and_then(|s| s.model.as_ref().map(|m| m.version))
                .unwrap_or(0);
            let loaded_catalog = loaded.as_ref().map(|s| s.catalog_version).unwrap_or(-1);
            if loaded_model == model_version && loaded_catalog == catalog_version {
                continue;
            }
            let started = Instant::now();
            let (record, trained) = if loaded_model == model_version {
                let loaded = loaded.as_ref();
                (
                    loaded.and_then(|s| s.model.clone()),
                    loaded.and_then(|s| s.trained.clone()),
                )
            } else {
                load_model(store, &workspace_id, model_version).await?
            };
            let facts = store.catalog_facts(&workspace_id).await?;
            let version = record.as_ref().map(|r| r.version as u64).unwrap_or(0);
            let for_snapshot = trained.clone();
            let snapshot =
                tokio::task::spawn_blocking(move || Snapshot::new(version, for_snapshot, facts))
                    .await
                    .map_err(|e| ApiError::Internal(e.into()))?;
            let items = snapshot.len();
            let served = Arc::new(Served {
                snapshot,
                model: record,
                trained,
                catalog_version,
                loaded_at: now,
            });
            let mut next = HashMap::clone(&self.workspaces.load());
            next.insert(workspace_id.clone(), served);
            self.workspaces.store(Arc::new(next));
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            metrics::histogram!("relance_recommendations_model_load_seconds")
                .record(load_ms / 1000.0);
            tracing::info!(
                workspace = %workspace_id,
                model_version = version,
                catalog_version,
                items,
                load_ms,
                "model loaded"
            );
        }
        Ok(())
    }
}

async fn load_model(
    store: &RecoStore,
    workspace_id: &str,
    version: i64,
) -> ApiResult<(Option<ModelRecord>, Option<Arc<Trained>>)> {
    if version == 0 {
        return Ok((None, None));
    }
    let Some(record) = store.model_record(workspace_id, version).await? else {
        return Ok((None, None));
    };
    let Some(body) = store.model_body(workspace_id, version).await? else {
        return Ok((None, None));
    };
    let trained = tokio::task::spawn_blocking(move || model::decode(&body))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|reason| {
            ApiError::Internal(anyhow::anyhow!(
                "model version {version} cannot be decoded: {reason}"
            ))
        })?;
    Ok((Some(record), Some(Arc::new(trained))))
}

/// The workspace's current trained model, read from Postgres.
pub async fn load_current(
    store: &RecoStore,
    workspace_id: &str,
) -> ApiResult<Option<Arc<Trained>>> {
    let Some(current) = store.current(workspace_id).await? else {
        return Ok(None);
    };
    Ok(load_model(store, workspace_id, current.version).await?.1)
}
