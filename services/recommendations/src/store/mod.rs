//! Postgres: the catalog, the model versions, the impressions, and the training data read
//! from the event log. Redis: each customer's recent history ([`history`]).

pub mod history;

use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use relance_kit::{ApiError, ApiResult};
use sqlx::{PgPool, Row as _};

use crate::domain::catalog::Item;
use crate::domain::dataset::{Dataset, Kind};
use crate::domain::model::ItemFacts;

/// Event names training and the history read, by kind.
pub const PURCHASE_EVENTS: &[&str] = &["order_completed"];
pub const CART_EVENTS: &[&str] = &["cart_updated", "product_added_to_cart"];
pub const VIEW_EVENTS: &[&str] = &["product_viewed"];

/// The kind of interaction an event stands for, if any.
pub fn kind_of(event_name: &str) -> Option<Kind> {
    if PURCHASE_EVENTS.contains(&event_name) {
        Some(Kind::Purchase)
    } else if CART_EVENTS.contains(&event_name) {
        Some(Kind::Cart)
    } else if VIEW_EVENTS.contains(&event_name) {
        Some(Kind::View)
    } else {
        None
    }
}

/// The item ids of an interaction event: `items[].product_id`, else `product_id`.
pub fn items_of(properties: &serde_json::Value) -> Vec<String> {
    let mut ids = Vec::new();
    if let Some(items) = properties.get("items").and_then(|v| v.as_array()) {
        for item in items {
            if let Some(id) = item.get("product_id").and_then(|v| v.as_str())
                && !id.is_empty()
            {
                ids.push(id.to_owned());
            }
        }
        return ids;
    }
    if let Some(id) = properties.get("product_id").and_then(|v| v.as_str())
        && !id.is_empty()
    {
        ids.push(id.to_owned());
    }
    ids
}

fn internal(error: sqlx::Error) -> ApiError {
    ApiError::Internal(error.into())
}

/// A stored catalog item with the times Relance keeps.
#[derive(Debug, Clone)]
pub struct StoredItem {
    pub item: Item,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a model version row says (without its body).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    pub version: i64,
    pub kinds: Vec<String>,
    pub trained_at: DateTime<Utc>,
    pub training_ms: i64,
    pub data_until: DateTime<Utc>,
    pub item_count: i64,
    pub customer_count: i64,
    pub interaction_count: i64,
    pub algorithm: String,
    pub memory_bytes: i64,
    pub metrics: serde_json::Value,
}

/// A new version to store.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub record: ModelRecord,
    pub body: Vec<u8>,
}

/// The workspace's pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Current {
    pub version: i64,
    pub previous: Option<i64>,
}

/// Versions kept per workspace besides the current and previous ones.
const VERSIONS_KEPT: i64 = 5;

/// Advisory lock class of a workspace's training.
const TRAINING_LOCK: i32 = 0x5245;

#[derive(Debug, Clone)]
pub struct RecoStore {
    pub pool: PgPool,
}

const MODEL_COLUMNS: &str = "version, kinds, trained_at, training_ms, data_until, item_count, customer_count, interaction_count, algorithm, memory_bytes, metrics";

fn model_record(row: &sqlx::postgres::PgRow) -> Result<ModelRecord, sqlx::Error> {
    Ok(ModelRecord {
        version: row.try_get("version")?,
        kinds: row.try_get("kinds")?,
        trained_at: row.try_get("trained_at")?,
        training_ms: row.try_get("training_ms")?,
        data_until: row.try_get("data_until")?,
        item_count: row.try_get("item_count")?,
        customer_count: row.try_get("customer_count")?,
        interaction_count: row.try_get("interaction_count")?,
        algorithm: row.try_get("algorithm")?,
        memory_bytes: row.try_get("memory_bytes")?,
        metrics: row.try_get("metrics")?,
    })
}

const ITEM_COLUMNS: &str = "id, title, category_path, brand, price, currency, in_stock, stock, tags, created_at, url, image_url, replenishable, attributes, updated_at";

fn stored_item(row: &sqlx::postgres::PgRow) -> Result<StoredItem, sqlx::Error> {
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    Ok(StoredItem {
        item: Item {
            id: row.try_get("id")?,
            title: row.try_get("title")?,
            category_path: row.try_get("category_path")?,
            brand: row.try_get("brand")?,
            price: row.try_get("price")?,
            currency: row.try_get("currency")?,
            in_stock: row.try_get("in_stock")?,
            stock: row.try_get("stock")?,
            tags: row.try_get("tags")?,
            created_at: Some(created_at),
            url: row.try_get("url")?,
            image_url: row.try_get("image_url")?,
            replenishable: row.try_get("replenishable")?,
            attributes: row.try_get("attributes")?,
        },
        created_at,
        updated_at: row.try_get("updated_at")?,
    })
}

impl RecoStore {
    pub fn new(pool: PgPool) -> RecoStore {
        RecoStore { pool }
    }

    // --- catalog ------------------------------------------------------------------------

    /// Creates or replaces items (already validated) as of `at`; an item already stored with
    /// a later `updated_at` is left alone (a late catalog event does not undo a newer
    /// write). Returns (stored, created).
    pub async fn upsert_items(
        &self,
        workspace_id: &str,
        items: &[Item],
        at: DateTime<Utc>,
    ) -> ApiResult<(u32, u32)> {
        if items.is_empty() {
            return Ok((0, 0));
        }
        let mut tx = self.pool.begin().await.map_err(internal)?;
        let (mut stored, mut created) = (0, 0);
        for item in items {
            let row = sqlx::query(
                "INSERT INTO items (workspace_id, id, title, category_path, brand, price, currency, in_stock, stock, tags, created_at, url, image_url, replenishable, attributes, updated_at, deleted_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11, $16), $12, $13, $14, $15, $16, NULL)
                 ON CONFLICT (workspace_id, id) DO UPDATE SET
                   title = EXCLUDED.title, category_path = EXCLUDED.category_path, brand = EXCLUDED.brand,
                   price = EXCLUDED.price, currency = EXCLUDED.currency, in_stock = EXCLUDED.in_stock,
                   stock = EXCLUDED.stock, tags = EXCLUDED.tags,
                   created_at = CASE WHEN items.deleted_at IS NOT NULL THEN EXCLUDED.created_at ELSE COALESCE($11, items.created_at) END,
                   url = EXCLUDED.url, image_url = EXCLUDED.image_url, replenishable = EXCLUDED.replenishable,
                   attributes = EXCLUDED.attributes, updated_at = EXCLUDED.updated_at, deleted_at = NULL
                 WHERE items.updated_at <= EXCLUDED.updated_at
                 RETURNING (xmax = 0) AS inserted",
            )
            .bind(workspace_id)
            .bind(&item.id)
            .bind(&item.title)
            .bind(&item.category_path)
            .bind(&item.brand)
            .bind(item.price)
            .bind(&item.currency)
            .bind(item.in_stock)
            .bind(item.stock)
            .bind(&item.tags)
            .bind(item.created_at)
            .bind(&item.url)
            .bind(&item.image_url)
            .bind(item.replenishable)
            .bind(&item.attributes)
            .bind(at)
            .fetch_optional(&mut *tx)
            .await
            .map_err(internal)?;
            if let Some(row) = row {
                stored += 1;
                if row.try_get::<bool, _>("inserted").map_err(internal)? {
                    created += 1;
                }
            }
        }
        bump_catalog(&mut tx, workspace_id).await?;
        tx.commit().await.map_err(internal)?;
        Ok((stored, created))
    }

    /// Marks items deleted as of `at`; returns the ids that were live.
    pub async fn delete_items(
        &self,
        workspace_id: &str,
        ids: &[String],
        at: DateTime<Utc>,
    ) -> ApiResult<Vec<String>> {
        let mut tx = self.pool.begin().await.map_err(internal)?;
        let deleted: Vec<String> = sqlx::query_scalar(
            "UPDATE items SET deleted_at = $3, updated_at = $3
             WHERE workspace_id = $1 AND id = ANY($2) AND deleted_at IS NULL AND updated_at <= $3
             RETURNING id",
        )
        .bind(workspace_id)
        .bind(ids)
        .bind(at)
        .fetch_all(&mut *tx)
        .await
        .map_err(internal)?;
        if !deleted.is_empty() {
            bump_catalog(&mut tx, workspace_id).await?;
        }
        tx.commit().await.map_err(internal)?;
        Ok(deleted)
    }

    /// Live items by id.
    pub async fn get_items(
        &self,
        workspace_id: &str,
        ids: &[String],
    ) -> ApiResult<Vec<StoredItem>> {
        let rows = sqlx::query(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE workspace_id = $1 AND id = ANY($2) AND deleted_at IS NULL"
        ))
        .bind(workspace_id)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(stored_item(row).map_err(internal)?);
        }
        Ok(items)
    }

    /// Everything ranking needs of the catalog, deleted items included.
    pub async fn catalog_facts(&self, workspace_id: &str) -> ApiResult<Vec<(String, ItemFacts)>> {
        let mut rows = sqlx::query(
            "SELECT id, category_path, brand, price, in_stock AND COALESCE(stock, 1) > 0 AS available,
                    replenishable, created_at, deleted_at IS NOT NULL AS deleted
             FROM items WHERE workspace_id = $1",
        )
        .bind(workspace_id)
        .fetch(&self.pool);
        let mut facts = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(internal)? {
            let created_at: DateTime<Utc> = row.try_get("created_at").map_err(internal)?;
            facts.push((
                row.try_get("id").map_err(internal)?,
                ItemFacts {
                    category: row.try_get("category_path").map_err(internal)?,
                    brand: row.try_get("brand").map_err(internal)?,
                    price: row.try_get("price").map_err(internal)?,
                    in_stock: row.try_get("available").map_err(internal)?,
                    replenishable: row.try_get("replenishable").map_err(internal)?,
                    created_at: created_at.timestamp(),
                    deleted: row.try_get("deleted").map_err(internal)?,
                },
            ));
        }
        Ok(facts)
    }

    /// (workspace, catalog version, current model version) of every workspace with either.
    pub async fn workspace_versions(&self) -> ApiResult<Vec<(String, i64, i64)>> {
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT COALESCE(c.workspace_id, m.workspace_id), c.version, m.version
             FROM catalog_versions c FULL JOIN current_models m ON m.workspace_id = c.workspace_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        Ok(rows
            .into_iter()
            .map(|(w, c, m)| (w, c.unwrap_or(0), m.unwrap_or(0)))
            .collect())
    }

    // --- models -------------------------------------------------------------------------

    /// Stores a new version (numbered after the last one) and, with `activate`, makes it
    /// current. Older versions beyond the few kept are dropped.
    pub async fn store_model(
        &self,
        workspace_id: &str,
        model: NewModel,
        activate: bool,
        at: DateTime<Utc>,
    ) -> ApiResult<ModelRecord> {
        let mut tx = self.pool.begin().await.map_err(internal)?;
        // Serialise version numbering per workspace.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(TRAINING_LOCK + 1)
            .bind(workspace_id)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE workspace_id = $1",
        )
        .bind(workspace_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(internal)?;
        let record = ModelRecord {
            version,
            ..model.record
        };
        sqlx::query(
            "INSERT INTO models (workspace_id, version, kinds, trained_at, training_ms, data_until, item_count, customer_count, interaction_count, algorithm, memory_bytes, metrics, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(workspace_id)
        .bind(version)
        .bind(&record.kinds)
        .bind(record.trained_at)
        .bind(record.training_ms)
        .bind(record.data_until)
        .bind(record.item_count)
        .bind(record.customer_count)
        .bind(record.interaction_count)
        .bind(&record.algorithm)
        .bind(record.memory_bytes)
        .bind(&record.metrics)
        .bind(&model.body)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
        if activate {
            set_current(&mut tx, workspace_id, version, at).await?;
        }
        sqlx::query(
            "DELETE FROM models m WHERE m.workspace_id = $1 AND m.version <= $2 - $3
               AND NOT EXISTS (SELECT 1 FROM current_models c WHERE c.workspace_id = m.workspace_id
                               AND (c.version = m.version OR c.previous = m.version))",
        )
        .bind(workspace_id)
        .bind(version)
        .bind(VERSIONS_KEPT)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(record)
    }

    /// Makes `version` (0: the previous one) current again.
    pub async fn rollback(
        &self,
        workspace_id: &str,
        version: i64,
        at: DateTime<Utc>,
    ) -> ApiResult<i64> {
        let mut tx = self.pool.begin().await.map_err(internal)?;
        let current: Option<(i64, Option<i64>)> = sqlx::query_as(
            "SELECT version, previous FROM current_models WHERE workspace_id = $1 FOR UPDATE",
        )
        .bind(workspace_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(internal)?;
        let target = if version == 0 {
            match current {
                Some((_, Some(previous))) => previous,
                _ => {
                    return Err(ApiError::NotFound(
                        "there is no previous model version to roll back to".into(),
                    ));
                }
            }
        } else {
            version
        };
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM models WHERE workspace_id = $1 AND version = $2)",
        )
        .bind(workspace_id)
        .bind(target)
        .fetch_one(&mut *tx)
        .await
        .map_err(internal)?;
        if !exists {
            return Err(ApiError::NotFound(format!(
                "model version {target} is not stored (anymore)"
            )));
        }
        if current.map(|c| c.0) != Some(target) {
            set_current(&mut tx, workspace_id, target, at).await?;
        }
        tx.commit().await.map_err(internal)?;
        Ok(target)
    }

    pub async fn current(&self, workspace_id: &str) -> ApiResult<Option<Current>> {
        let row: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT version, previous FROM current_models WHERE workspace_id = $1")
                .bind(workspace_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(internal)?;
        Ok(row.map(|(version, previous)| Current { version, previous }))
    }

    pub async fn model_record(
        &self,
        workspace_id: &str,
        version: i64,
    ) -> ApiResult<Option<ModelRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE workspace_id = $1 AND version = $2"
        ))
        .bind(workspace_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(internal)?;
        row.as_ref().map(model_record).transpose().map_err(internal)
    }

    /// Versions below `below`, newest first.
    pub async fn older_models(
        &self,
        workspace_id: &str,
        below: i64,
        limit: i64,
    ) -> ApiResult<Vec<ModelRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE workspace_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(below)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            records.push(model_record(row).map_err(internal)?);
        }
        Ok(records)
    }

    pub async fn model_body(&self, workspace_id: &str, version: i64) -> ApiResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT body FROM models WHERE workspace_id = $1 AND version = $2")
            .bind(workspace_id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .map_err(internal)
    }

    /// Takes the workspace's training lock on a connection of its own (released when the
    /// returned guard's connection is closed). `None` when another training holds it.
    pub async fn try_training_lock(
        &self,
        workspace_id: &str,
    ) -> ApiResult<Option<sqlx::pool::PoolConnection<sqlx::Postgres>>> {
        let mut connection = self.pool.acquire().await.map_err(internal)?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(TRAINING_LOCK)
            .bind(workspace_id)
            .fetch_one(&mut *connection)
            .await
            .map_err(internal)?;
        if !taken {
            return Ok(None);
        }
        Ok(Some(connection))
    }

    /// Releases the lock [`try_training_lock`](Self::try_training_lock) took.
    pub async fn release_training_lock(
        &self,
        mut connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
        workspace_id: &str,
    ) {
        let released = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(TRAINING_LOCK)
            .bind(workspace_id)
            .execute(&mut *connection)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "releasing the training lock failed; closing its connection");
            connection.close_on_drop();
        }
    }

    /// Whether a training of the workspace is running anywhere.
    pub async fn training_running(&self, workspace_id: &str) -> ApiResult<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid
               AND objid = hashtext($2)::oid AND granted)",
        )
        .bind(TRAINING_LOCK)
        .bind(workspace_id)
        .fetch_one(&self.pool)
        .await
        .map_err(internal)
    }

    /// Workspaces with a catalog or a model (the periodic training's list).
    pub async fn known_workspaces(&self) -> ApiResult<Vec<String>> {
        sqlx::query_scalar(
            "SELECT DISTINCT workspace_id FROM (
               SELECT workspace_id FROM catalog_versions UNION SELECT workspace_id FROM current_models
             ) w",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(internal)
    }

    // --- training data ------------------------------------------------------------------

    /// Interactions of the workspace in `[from, until)`, read from the event log: one
    /// basket per event. People are `c:<customer id>` or `a:<anonymous id>`.
    pub async fn load_dataset(
        &self,
        workspace_id: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> ApiResult<Dataset> {
        let names: Vec<&str> = PURCHASE_EVENTS
            .iter()
            .chain(CART_EVENTS)
            .chain(VIEW_EVENTS)
            .copied()
            .collect();
        let mut rows = sqlx::query(
            "SELECT CASE WHEN customer_id IS NOT NULL THEN 'c:' || customer_id ELSE 'a:' || anonymous_id END AS person,
                    name, ts,
                    CASE WHEN jsonb_typeof(properties->'items') = 'array'
                         THEN ARRAY(SELECT x->>'product_id' FROM jsonb_array_elements(properties->'items') x
                                    WHERE jsonb_typeof(x->'product_id') = 'string')
                         ELSE ARRAY[properties->>'product_id'] END AS items
             FROM events.events
             WHERE workspace_id = $1 AND ts >= $2 AND ts < $3 AND name = ANY($4)",
        )
        .bind(workspace_id)
        .bind(from)
        .bind(until)
        .bind(&names)
        .fetch(&self.pool);
        let mut data = Dataset::default();
        while let Some(row) = rows.try_next().await.map_err(internal)? {
            let person: Option<String> = row.try_get("person").map_err(internal)?;
            let name: String = row.try_get("name").map_err(internal)?;
            let at: DateTime<Utc> = row.try_get("ts").map_err(internal)?;
            let items: Vec<Option<String>> = row.try_get("items").map_err(internal)?;
            let (Some(person), Some(kind)) = (person, kind_of(&name)) else {
                continue;
            };
            let basket = data.new_basket();
            for item in items.into_iter().flatten() {
                if !item.is_empty() && item.len() <= crate::domain::catalog::MAX_ID_LEN {
                    data.add(&person, &item, basket, at.timestamp(), kind);
                }
            }
        }
        Ok(data)
    }

    // --- impressions --------------------------------------------------------------------

    pub async fn record_impressions(&self, impressions: &[Impression]) -> ApiResult<()> {
        if impressions.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(internal)?;
        for impression in impressions {
            sqlx::query(
                "INSERT INTO impressions (recommendation_id, workspace_id, customer_id, anonymous_id, placement, model_version, items, reasons, served_at)
                 VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            )
            .bind(impression.recommendation_id.to_string())
            .bind(&impression.workspace_id)
            .bind(&impression.customer_id)
            .bind(&impression.anonymous_id)
            .bind(&impression.placement)
            .bind(impression.model_version)
            .bind(&impression.items)
            .bind(&impression.reasons)
            .bind(impression.served_at)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)
    }
}

/// One sampled answer.
#[derive(Debug, Clone)]
pub struct Impression {
    pub recommendation_id: uuid::Uuid,
    pub workspace_id: String,
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub placement: String,
    pub model_version: i64,
    pub items: Vec<String>,
    pub reasons: Vec<String>,
    pub served_at: DateTime<Utc>,
}

async fn bump_catalog(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace_id: &str,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO catalog_versions (workspace_id, version) VALUES ($1, 1)
         ON CONFLICT (workspace_id) DO UPDATE SET version = catalog_versions.version + 1",
    )
    .bind(workspace_id)
    .execute(&mut **tx)
    .await
    .map_err(internal)?;
    Ok(())
}

async fn set_current(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace_id: &str,
    version: i64,
    at: DateTime<Utc>,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO current_models (workspace_id, version, previous, changed_at) VALUES ($1, $2, NULL, $3)
         ON CONFLICT (workspace_id) DO UPDATE SET previous = current_models.version, version = EXCLUDED.version, changed_at = EXCLUDED.changed_at",
    )
    .bind(workspace_id)
    .bind(version)
    .bind(at)
    .execute(&mut **tx)
    .await
    .map_err(internal)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_items_of_events() {
        let order =
            serde_json::json!({"items": [{"product_id": "A"}, {"sku": "x"}, {"product_id": "B"}]});
        assert_eq!(items_of(&order), vec!["A", "B"]);
        assert_eq!(items_of(&serde_json::json!({"product_id": "C"})), vec!["C"]);
        assert!(items_of(&serde_json::json!({})).is_empty());
        assert_eq!(kind_of("order_completed"), Some(Kind::Purchase));
        assert_eq!(kind_of("signed_up"), None);
    }
}
