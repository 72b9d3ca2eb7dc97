//! Postgres for the profiles service: profiles, identities, push tokens, consent, RFM
//! thresholds, and the outbox of `profile.*` messages.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use relance_kit::bus::EVENTS_EXCHANGE;
use relance_kit::messages::{
    PROFILE_DELETED, PROFILE_MERGED, PROFILE_UPDATED, PROFILES_RESCORED, ProfileDeleted,
    ProfileMerged, ProfileUpdated, ProfilesRescored,
};
use relance_kit::{db, outbox};
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool, Row as _};
use tokio::sync::Notify;

use crate::domain::rfm::{self, Measures, Scores, Thresholds};
use crate::domain::traits::PurchaseEffect;
use crate::domain::{
    Consent, CustomerKey, ProfileError, ProfilePatch, ProfileRecord, PushToken, Traits,
};

/// Lock class of per-identity advisory locks (creation and merge of anonymous ids).
const PROFILE_LOCK_CLASS: i32 = 0x5052; // "PR"

/// The consumer name under which purchase events are deduplicated.
pub const TRAITS_CONSUMER: &str = "profiles.traits";

type Result<T> = std::result::Result<T, ProfileError>;

/// How List orders profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOrder {
    Rfm,
    Revenue,
    Updated,
}

/// The profiles service's tables.
#[derive(Debug, Clone)]
pub struct ProfileStore {
    pool: PgPool,
    outbox_wake: Arc<Notify>,
}

impl ProfileStore {
    /// The store; `outbox_wake` is notified after each commit that wrote to the outbox.
    pub fn new(pool: PgPool, outbox_wake: Arc<Notify>) -> ProfileStore {
        ProfileStore { pool, outbox_wake }
    }

    /// One profile.
    pub async fn get(&self, workspace_id: &str, key: &CustomerKey) -> Result<ProfileRecord> {
        let mut conn = self.pool.acquire().await?;
        let Some(id) = find(&mut conn, workspace_id, key).await? else {
            return Err(ProfileError::NotFound(key.to_string()));
        };
        load(&mut conn, id).await
    }

    /// Several profiles, in request order; `None` for those not found.
    pub async fn batch_get(
        &self,
        workspace_id: &str,
        keys: &[CustomerKey],
    ) -> Result<Vec<Option<ProfileRecord>>> {
        // A handful of set-based queries whatever the number of keys: delivery asks for
        // hundreds of profiles per batch of messages.
        let mut conn = self.pool.acquire().await?;
        let mut customers = Vec::new();
        let mut anonymous = Vec::new();
        for key in keys {
            match key {
                CustomerKey::Customer(id) => customers.push(id.clone()),
                CustomerKey::Anonymous(id) => anonymous.push(id.clone()),
            }
        }
        let by_customer: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
            "SELECT customer_id, id FROM profiles WHERE workspace_id = $1 AND customer_id = ANY($2)",
        )
        .bind(workspace_id)
        .bind(&customers)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        let by_anonymous: HashMap<String, i64> = if anonymous.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT anonymous_id, profile_id FROM identities WHERE workspace_id = $1 AND anonymous_id = ANY($2)",
            )
            .bind(workspace_id)
            .bind(&anonymous)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
        };
        let mut ids: Vec<i64> = by_customer
            .values()
            .chain(by_anonymous.values())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut loaded = load_many(&mut conn, &ids).await?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let id = match key {
                CustomerKey::Customer(id) => by_customer.get(id),
                CustomerKey::Anonymous(id) => by_anonymous.get(id),
            };
            // The same profile may be asked for twice (by id and by an anonymous id).
            out.push(id.and_then(|id| loaded.get(id).cloned()));
        }
        loaded.clear();
        Ok(out)
    }

    /// Known customers in `order`, `limit` from `offset`.
    pub async fn list(
        &self,
        workspace_id: &str,
        order: ListOrder,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<ProfileRecord>> {
        let order_by = match order {
            ListOrder::Rfm => "(rfm_recency + rfm_frequency + rfm_monetary) DESC, revenue DESC, id",
            ListOrder::Revenue => "revenue DESC, id",
            ListOrder::Updated => "updated_at DESC, id",
        };
        let sql = format!(
            "SELECT id FROM profiles WHERE workspace_id = $1 AND customer_id IS NOT NULL ORDER BY {order_by} LIMIT $2 OFFSET $3"
        );
        let mut conn = self.pool.acquire().await?;
        let ids: Vec<i64> = sqlx::query_scalar(&sql)
            .bind(workspace_id)
            .bind(limit)
            .bind(offset)
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(load(&mut conn, id).await?);
        }
        Ok(out)
    }

    /// Creates or partially updates a profile.
    pub async fn upsert(
        &self,
        workspace_id: &str,
        key: &CustomerKey,
        patch: &ProfilePatch,
        now: DateTime<Utc>,
    ) -> Result<ProfileRecord> {
        let mut tx = self.pool.begin().await?;
        let id = find_or_create(&mut tx, workspace_id, key, now).await?;
        let set = serde_json::Value::Object(patch.set_attributes.clone());
        let clear = |value: &Option<String>| {
            value
                .as_ref()
                .map(|v| if v.is_empty() { None } else { Some(v.clone()) })
        };
        sqlx::query(
            "UPDATE profiles SET \
                attributes = (attributes || $2::jsonb) - $3::text[], \
                email    = CASE WHEN $4 THEN $5 ELSE email END, \
                phone    = CASE WHEN $6 THEN $7 ELSE phone END, \
                timezone = CASE WHEN $8 THEN $9 ELSE timezone END, \
                locale   = CASE WHEN $10 THEN $11 ELSE locale END, \
                updated_at = $12 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(&set)
        .bind(&patch.remove_attributes)
        .bind(patch.email.is_some())
        .bind(clear(&patch.email).flatten())
        .bind(patch.phone.is_some())
        .bind(clear(&patch.phone).flatten())
        .bind(patch.timezone.is_some())
        .bind(clear(&patch.timezone).flatten())
        .bind(patch.locale.is_some())
        .bind(clear(&patch.locale).flatten())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for (token, platform, app_id) in &patch.push_tokens {
            // A token identifies a device: it moves to whoever registered it last.
            sqlx::query(
                "INSERT INTO push_tokens (workspace_id, token, profile_id, platform, app_id, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workspace_id, token) DO UPDATE SET profile_id = excluded.profile_id, platform = excluded.platform, \
                 app_id = excluded.app_id, updated_at = excluded.updated_at",
            )
            .bind(workspace_id)
            .bind(token)
            .bind(id)
            .bind(platform)
            .bind(app_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !patch.remove_push_tokens.is_empty() {
            sqlx::query("DELETE FROM push_tokens WHERE profile_id = $1 AND token = ANY($2)")
                .bind(id)
                .bind(&patch.remove_push_tokens)
                .execute(&mut *tx)
                .await?;
        }
        let record = load(&mut tx, id).await?;
        announce_update(&mut tx, workspace_id, &record, patch.changed_parts(), now).await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(record)
    }

    /// Attaches `anonymous_id` to `customer_id`; `false` when it already was.
    pub async fn merge(
        &self,
        workspace_id: &str,
        anonymous_id: &str,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(ProfileRecord, bool)> {
        // Every event of a signed-in visitor carries both ids: answer the common "already
        // merged" case with a read, without a transaction or a lock.
        let owner: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT i.profile_id, p.customer_id FROM identities i JOIN profiles p ON p.id = i.profile_id \
             WHERE i.workspace_id = $1 AND i.anonymous_id = $2",
        )
        .bind(workspace_id)
        .bind(anonymous_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((profile, Some(owner))) = owner
            && owner == customer_id
        {
            let mut conn = self.pool.acquire().await?;
            return Ok((load(&mut conn, profile).await?, false));
        }
        let mut tx = self.pool.begin().await?;
        lock_identity(&mut tx, workspace_id, anonymous_id).await?;
        let known = find_or_create(
            &mut tx,
            workspace_id,
            &CustomerKey::Customer(customer_id.to_owned()),
            now,
        )
        .await?;
        let current: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT i.profile_id, p.customer_id FROM identities i JOIN profiles p ON p.id = i.profile_id \
             WHERE i.workspace_id = $1 AND i.anonymous_id = $2",
        )
        .bind(workspace_id)
        .bind(anonymous_id)
        .fetch_optional(&mut *tx)
        .await?;
        match current {
            Some((profile, _)) if profile == known => {
                let record = load(&mut tx, known).await?;
                tx.commit().await?;
                return Ok((record, false));
            }
            Some((_, Some(owner))) => {
                return Err(ProfileError::MergedElsewhere {
                    anonymous_id: anonymous_id.to_owned(),
                    owner,
                });
            }
            Some((anonymous_profile, None)) => {
                fold_into(&mut tx, anonymous_profile, known, now).await?
            }
            None => {
                sqlx::query("INSERT INTO identities (workspace_id, anonymous_id, profile_id, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(workspace_id)
                    .bind(anonymous_id)
                    .bind(known)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let merged = ProfileMerged {
            workspace_id: workspace_id.to_owned(),
            anonymous_id: anonymous_id.to_owned(),
            customer_id: customer_id.to_owned(),
        };
        let message_id = format!("merge:{workspace_id}:{anonymous_id}:{customer_id}");
        outbox::enqueue(
            &mut tx,
            EVENTS_EXCHANGE,
            PROFILE_MERGED,
            &message_id,
            &to_json(&merged),
        )
        .await?;
        let record = load(&mut tx, known).await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok((record, true))
    }

    /// Records one consent decision; the latest decision (by its time) wins.
    pub async fn set_consent(
        &self,
        workspace_id: &str,
        key: &CustomerKey,
        consent: &Consent,
        now: DateTime<Utc>,
    ) -> Result<ProfileRecord> {
        let mut tx = self.pool.begin().await?;
        let id = find_or_create(&mut tx, workspace_id, key, now).await?;
        sqlx::query(
            "INSERT INTO consents (profile_id, channel, topic, status, decided_at, source) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (profile_id, channel, topic) DO UPDATE SET status = excluded.status, decided_at = excluded.decided_at, \
             source = excluded.source WHERE excluded.decided_at >= consents.decided_at",
        )
        .bind(id)
        .bind(&consent.channel)
        .bind(&consent.topic)
        .bind(&consent.status)
        .bind(consent.decided_at)
        .bind(&consent.source)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO consent_history (profile_id, channel, topic, status, decided_at, source, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(&consent.channel)
        .bind(&consent.topic)
        .bind(&consent.status)
        .bind(consent.decided_at)
        .bind(&consent.source)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE profiles SET updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let record = load(&mut tx, id).await?;
        announce_update(
            &mut tx,
            workspace_id,
            &record,
            vec!["consent".to_owned()],
            now,
        )
        .await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(record)
    }

    /// Everything held on one customer, as a JSON document.
    pub async fn export(
        &self,
        workspace_id: &str,
        key: &CustomerKey,
        now: DateTime<Utc>,
    ) -> Result<serde_json::Value> {
        let mut conn = self.pool.acquire().await?;
        let Some(id) = find(&mut conn, workspace_id, key).await? else {
            return Err(ProfileError::NotFound(key.to_string()));
        };
        let record = load(&mut conn, id).await?;
        let history = sqlx::query(
            "SELECT channel, topic, status, decided_at, source, recorded_at FROM consent_history WHERE profile_id = $1 ORDER BY recorded_at",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let mut consent_history = Vec::with_capacity(history.len());
        for row in history {
            consent_history.push(serde_json::json!({
                "channel": row.try_get::<String, _>("channel")?,
                "topic": row.try_get::<String, _>("topic")?,
                "status": row.try_get::<String, _>("status")?,
                "decided_at": row.try_get::<DateTime<Utc>, _>("decided_at")?,
                "source": row.try_get::<String, _>("source")?,
                "recorded_at": row.try_get::<DateTime<Utc>, _>("recorded_at")?,
            }));
        }
        Ok(serde_json::json!({
            "exported_at": now,
            "workspace_id": workspace_id,
            "profile": record,
            "average_basket": record.traits.average_basket(),
            "consent_history": consent_history,
        }))
    }

    /// Erases a profile and announces it; returns the erased ids.
    pub async fn delete(
        &self,
        workspace_id: &str,
        key: &CustomerKey,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let Some(id) = find(&mut tx, workspace_id, key).await? else {
            return Err(ProfileError::NotFound(key.to_string()));
        };
        let record = load(&mut tx, id).await?;
        sqlx::query("DELETE FROM profiles WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let mut erased: Vec<String> = record.customer_id.iter().cloned().collect();
        erased.extend(record.anonymous_ids.iter().cloned());
        for subject in &erased {
            sqlx::query(
                "INSERT INTO erasures (workspace_id, subject_hash, erased_at) VALUES ($1, $2, $3)",
            )
            .bind(workspace_id)
            .bind(hex::encode(Sha256::digest(
                format!("{workspace_id}:{subject}").as_bytes(),
            )))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let deleted = ProfileDeleted {
            workspace_id: workspace_id.to_owned(),
            customer_id: record.customer_id.clone(),
            anonymous_ids: record.anonymous_ids.clone(),
        };
        let message_id = format!("delete:{workspace_id}:{id}");
        outbox::enqueue(
            &mut tx,
            EVENTS_EXCHANGE,
            PROFILE_DELETED,
            &message_id,
            &to_json(&deleted),
        )
        .await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(erased)
    }

    /// Applies a purchase event to the buyer's traits, once per bus message id; returns
    /// `false` for a redelivery.
    pub async fn apply_purchase(
        &self,
        workspace_id: &str,
        bus_id: &str,
        key: &CustomerKey,
        effect: PurchaseEffect,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if !db::first_delivery(&mut tx, TRAITS_CONSUMER, bus_id).await? {
            return Ok(false);
        }
        let id = find_or_create(&mut tx, workspace_id, key, now).await?;
        let row = match effect {
            PurchaseEffect::Order { revenue, at } => {
                sqlx::query(
                    "UPDATE profiles SET orders_count = orders_count + 1, revenue = revenue + $2, \
                     first_purchase_at = LEAST(first_purchase_at, $3), last_purchase_at = GREATEST(last_purchase_at, $3), \
                     updated_at = $4 WHERE id = $1 RETURNING orders_count, revenue, last_purchase_at",
                )
                .bind(id)
                .bind(revenue)
                .bind(at)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
            }
            PurchaseEffect::Refund { amount } => {
                sqlx::query(
                    "UPDATE profiles SET revenue = revenue - $2, refunded = refunded + $2, updated_at = $3 \
                     WHERE id = $1 RETURNING orders_count, revenue, last_purchase_at",
                )
                .bind(id)
                .bind(amount)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
            }
        };
        let orders: i64 = row.try_get("orders_count")?;
        let revenue: f64 = row.try_get("revenue")?;
        let last: Option<DateTime<Utc>> = row.try_get("last_purchase_at")?;
        if let (Some(last), Some(thresholds)) =
            (last, load_thresholds(&mut tx, workspace_id).await?)
        {
            let measures = Measures {
                days_since_last: days_between(last, now),
                orders: orders as f64,
                revenue,
            };
            let scores = rfm::score(measures, &thresholds);
            sqlx::query("UPDATE profiles SET rfm_recency = $2, rfm_frequency = $3, rfm_monetary = $4, rfm_scored_at = $5 WHERE id = $1")
                .bind(id)
                .bind(scores.recency)
                .bind(scores.frequency)
                .bind(scores.monetary)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let record = load(&mut tx, id).await?;
        announce_update(
            &mut tx,
            workspace_id,
            &record,
            vec!["traits".to_owned()],
            now,
        )
        .await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(true)
    }

    /// Workspaces that have at least one buyer.
    pub async fn workspaces_with_buyers(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT workspace_id FROM profiles WHERE orders_count > 0")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Recomputes the workspace's quintile thresholds and every buyer's RFM scores as of
    /// `now`; returns the thresholds and how many buyers were scored.
    pub async fn rescore(
        &self,
        workspace_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(Thresholds, usize)>> {
        let rows = sqlx::query(
            "SELECT id, EXTRACT(EPOCH FROM ($2::timestamptz - last_purchase_at))::float8 / 86400.0 AS days, \
                    orders_count::float8 AS orders, revenue \
             FROM profiles WHERE workspace_id = $1 AND orders_count > 0 AND last_purchase_at IS NOT NULL",
        )
        .bind(workspace_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut buyers = Vec::with_capacity(rows.len());
        for row in rows {
            ids.push(row.try_get::<i64, _>("id")?);
            buyers.push(Measures {
                days_since_last: row.try_get("days")?,
                orders: row.try_get("orders")?,
                revenue: row.try_get("revenue")?,
            });
        }
        // Sorting a large population is CPU work: keep it off the async threads.
        let scored = tokio::task::spawn_blocking(move || {
            let thresholds = rfm::thresholds(&buyers)?;
            let scores: Vec<Scores> = buyers.iter().map(|b| rfm::score(*b, &thresholds)).collect();
            Some((thresholds, scores))
        })
        .await
        .map_err(|e| {
            ProfileError::Database(sqlx::Error::Protocol(format!("rfm scoring panicked: {e}")))
        })?;
        let Some((thresholds, scores)) = scored else {
            return Ok(None);
        };

        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO rfm_thresholds (workspace_id, recency_days, frequency, monetary, buyers, computed_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (workspace_id) DO UPDATE SET recency_days = excluded.recency_days, frequency = excluded.frequency, \
             monetary = excluded.monetary, buyers = excluded.buyers, computed_at = excluded.computed_at",
        )
        .bind(workspace_id)
        .bind(thresholds.recency_days.to_vec())
        .bind(thresholds.frequency.to_vec())
        .bind(thresholds.monetary.to_vec())
        .bind(ids.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut changed: Vec<i64> = Vec::new();
        for (chunk_ids, chunk_scores) in ids.chunks(10_000).zip(scores.chunks(10_000)) {
            let r: Vec<i16> = chunk_scores.iter().map(|s| s.recency).collect();
            let f: Vec<i16> = chunk_scores.iter().map(|s| s.frequency).collect();
            let m: Vec<i16> = chunk_scores.iter().map(|s| s.monetary).collect();
            // Only customers whose scores moved are announced (segments follow them).
            let moved: Vec<i64> = sqlx::query_scalar(
                "UPDATE profiles p SET rfm_recency = s.r, rfm_frequency = s.f, rfm_monetary = s.m, rfm_scored_at = $5 \
                 FROM unnest($1::bigint[], $2::smallint[], $3::smallint[], $4::smallint[]) AS s(id, r, f, m) \
                 WHERE p.id = s.id AND (p.rfm_recency, p.rfm_frequency, p.rfm_monetary) IS DISTINCT FROM (s.r, s.f, s.m) \
                 RETURNING p.id",
            )
            .bind(chunk_ids)
            .bind(&r)
            .bind(&f)
            .bind(&m)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            changed.extend(moved);
            sqlx::query("UPDATE profiles SET rfm_scored_at = $2 WHERE id = ANY($1)")
                .bind(chunk_ids)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        announce_rescored(&mut tx, workspace_id, &changed, now).await?;
        tx.commit().await?;
        if !changed.is_empty() {
            self.outbox_wake.notify_one();
        }
        Ok(Some((thresholds, ids.len())))
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn days_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> f64 {
    (later - earlier).num_seconds() as f64 / 86_400.0
}

async fn lock_identity(
    conn: &mut PgConnection,
    workspace_id: &str,
    anonymous_id: &str,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2 || ':' || $3))")
        .bind(PROFILE_LOCK_CLASS)
        .bind(workspace_id)
        .bind(anonymous_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn find(
    conn: &mut PgConnection,
    workspace_id: &str,
    key: &CustomerKey,
) -> sqlx::Result<Option<i64>> {
    match key {
        CustomerKey::Customer(id) => {
            sqlx::query_scalar(
                "SELECT id FROM profiles WHERE workspace_id = $1 AND customer_id = $2",
            )
            .bind(workspace_id)
            .bind(id)
            .fetch_optional(conn)
            .await
        }
        CustomerKey::Anonymous(id) => {
            sqlx::query_scalar(
                "SELECT profile_id FROM identities WHERE workspace_id = $1 AND anonymous_id = $2",
            )
            .bind(workspace_id)
            .bind(id)
            .fetch_optional(conn)
            .await
        }
    }
}

/// The profile of `key`, created if new (an anonymous id gets an anonymous profile).
///
/// Reads first: most calls find the profile, and an upsert that always wrote would leave a
/// dead row version behind each event.
async fn find_or_create(
    conn: &mut PgConnection,
    workspace_id: &str,
    key: &CustomerKey,
    now: DateTime<Utc>,
) -> sqlx::Result<i64> {
    if let Some(existing) = find(conn, workspace_id, key).await? {
        return Ok(existing);
    }
    match key {
        CustomerKey::Customer(id) => {
            let created: Option<i64> = sqlx::query_scalar(
                "INSERT INTO profiles (workspace_id, customer_id, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (workspace_id, customer_id) DO NOTHING RETURNING id",
            )
            .bind(workspace_id)
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            match created {
                Some(id) => Ok(id),
                // Created by a concurrent transaction since our read.
                None => find(conn, workspace_id, key)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound),
            }
        }
        CustomerKey::Anonymous(id) => {
            lock_identity(conn, workspace_id, id).await?;
            if let Some(existing) = find(conn, workspace_id, key).await? {
                return Ok(existing);
            }
            let profile: i64 = sqlx::query_scalar(
                "INSERT INTO profiles (workspace_id, customer_id, created_at, updated_at) VALUES ($1, NULL, $2, $2) RETURNING id",
            )
            .bind(workspace_id)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?;
            sqlx::query("INSERT INTO identities (workspace_id, anonymous_id, profile_id, created_at) VALUES ($1, $2, $3, $4)")
                .bind(workspace_id)
                .bind(id)
                .bind(profile)
                .bind(now)
                .execute(conn)
                .await?;
            Ok(profile)
        }
    }
}

/// Moves everything of an anonymous profile into a known one, then removes it. The known
/// customer's attributes and addresses win; traits add up; the latest consent wins.
async fn fold_into(
    conn: &mut PgConnection,
    anonymous: i64,
    known: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE profiles k SET attributes = a.attributes || k.attributes, \
            email = COALESCE(k.email, a.email), phone = COALESCE(k.phone, a.phone), \
            timezone = COALESCE(k.timezone, a.timezone), locale = COALESCE(k.locale, a.locale), \
            orders_count = k.orders_count + a.orders_count, revenue = k.revenue + a.revenue, refunded = k.refunded + a.refunded, \
            first_purchase_at = LEAST(k.first_purchase_at, a.first_purchase_at), \
            last_purchase_at = GREATEST(k.last_purchase_at, a.last_purchase_at), updated_at = $3 \
         FROM profiles a WHERE k.id = $1 AND a.id = $2",
    )
    .bind(known)
    .bind(anonymous)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    for table in ["identities", "push_tokens", "consent_history"] {
        sqlx::query(&format!(
            "UPDATE {table} SET profile_id = $1 WHERE profile_id = $2"
        ))
        .bind(known)
        .bind(anonymous)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "INSERT INTO consents (profile_id, channel, topic, status, decided_at, source) \
         SELECT $1, channel, topic, status, decided_at, source FROM consents WHERE profile_id = $2 \
         ON CONFLICT (profile_id, channel, topic) DO UPDATE SET status = excluded.status, decided_at = excluded.decided_at, \
         source = excluded.source WHERE excluded.decided_at > consents.decided_at",
    )
    .bind(known)
    .bind(anonymous)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM profiles WHERE id = $1")
        .bind(anonymous)
        .execute(conn)
        .await?;
    Ok(())
}

async fn load_thresholds(
    conn: &mut PgConnection,
    workspace_id: &str,
) -> sqlx::Result<Option<Thresholds>> {
    let row: Option<(Vec<f64>, Vec<f64>, Vec<f64>)> = sqlx::query_as(
        "SELECT recency_days, frequency, monetary FROM rfm_thresholds WHERE workspace_id = $1",
    )
    .bind(workspace_id)
    .fetch_optional(conn)
    .await?;
    let four = |v: Vec<f64>| -> Option<[f64; 4]> { v.try_into().ok() };
    Ok(row.and_then(|(r, f, m)| {
        Some(Thresholds {
            recency_days: four(r)?,
            frequency: four(f)?,
            monetary: four(m)?,
        })
    }))
}

/// Announces the customers whose scores moved, a chunk of them per message.
async fn announce_rescored(
    conn: &mut PgConnection,
    workspace_id: &str,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<()> {
    for chunk in ids.chunks(1000) {
        let rows = sqlx::query(
            "SELECT p.customer_id, p.attributes, p.timezone, p.orders_count, p.revenue, p.refunded, \
                    p.first_purchase_at, p.last_purchase_at, p.rfm_recency, p.rfm_frequency, p.rfm_monetary, p.rfm_scored_at, \
                    COALESCE((SELECT array_agg(i.anonymous_id ORDER BY i.created_at, i.anonymous_id) \
                              FROM identities i WHERE i.profile_id = p.id), '{}') AS anonymous_ids \
             FROM profiles p WHERE p.id = ANY($1)",
        )
        .bind(chunk)
        .fetch_all(&mut *conn)
        .await?;
        let mut profiles = Vec::with_capacity(rows.len());
        for row in rows {
            let traits = traits_from_row(&row)?;
            profiles.push(ProfileUpdated {
                workspace_id: workspace_id.to_owned(),
                customer_id: row.try_get("customer_id")?,
                anonymous_ids: row.try_get("anonymous_ids")?,
                changed: vec!["traits".to_owned()],
                at: now,
                attributes: row.try_get("attributes")?,
                traits: to_json(&traits),
                timezone: row.try_get("timezone")?,
            });
        }
        let message = ProfilesRescored {
            workspace_id: workspace_id.to_owned(),
            profiles,
        };
        outbox::enqueue(
            conn,
            EVENTS_EXCHANGE,
            PROFILES_RESCORED,
            &uuid::Uuid::now_v7().to_string(),
            &to_json(&message),
        )
        .await?;
    }
    Ok(())
}

async fn announce_update(
    conn: &mut PgConnection,
    workspace_id: &str,
    record: &ProfileRecord,
    changed: Vec<String>,
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let updated = ProfileUpdated {
        workspace_id: workspace_id.to_owned(),
        customer_id: record.customer_id.clone(),
        anonymous_ids: record.anonymous_ids.clone(),
        changed,
        at: now,
        attributes: record.attributes.clone(),
        traits: to_json(&record.traits),
        timezone: record.timezone.clone(),
    };
    let message_id = uuid::Uuid::now_v7().to_string();
    outbox::enqueue(
        conn,
        EVENTS_EXCHANGE,
        PROFILE_UPDATED,
        &message_id,
        &to_json(&updated),
    )
    .await
}

/// The computed traits of a `profiles` row.
fn traits_from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<Traits> {
    Ok(Traits {
        orders_count: row.try_get("orders_count")?,
        revenue: row.try_get("revenue")?,
        refunded: row.try_get("refunded")?,
        first_purchase_at: row.try_get("first_purchase_at")?,
        last_purchase_at: row.try_get("last_purchase_at")?,
        rfm: Scores {
            recency: row.try_get("rfm_recency")?,
            frequency: row.try_get("rfm_frequency")?,
            monetary: row.try_get("rfm_monetary")?,
        },
        rfm_scored_at: row.try_get("rfm_scored_at")?,
    })
}

async fn load(conn: &mut PgConnection, id: i64) -> Result<ProfileRecord> {
    let mut loaded = load_many(conn, &[id]).await?;
    loaded
        .remove(&id)
        .ok_or_else(|| sqlx::Error::RowNotFound.into())
}

/// Profiles by id, each with its identities, push tokens and consents: four queries.
async fn load_many(conn: &mut PgConnection, ids: &[i64]) -> Result<HashMap<i64, ProfileRecord>> {
    let mut out: HashMap<i64, ProfileRecord> = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query(
        "SELECT id, customer_id, attributes, email, phone, timezone, locale, orders_count, revenue, refunded, \
                first_purchase_at, last_purchase_at, rfm_recency, rfm_frequency, rfm_monetary, rfm_scored_at, created_at, updated_at \
         FROM profiles WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let id: i64 = row.try_get("id")?;
        out.insert(
            id,
            ProfileRecord {
                id,
                customer_id: row.try_get("customer_id")?,
                anonymous_ids: Vec::new(),
                attributes: row.try_get("attributes")?,
                email: row.try_get("email")?,
                phone: row.try_get("phone")?,
                timezone: row.try_get("timezone")?,
                locale: row.try_get("locale")?,
                push_tokens: Vec::new(),
                consents: Vec::new(),
                traits: traits_from_row(&row)?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
            },
        );
    }
    let identities: Vec<(i64, String)> = sqlx::query_as(
        "SELECT profile_id, anonymous_id FROM identities WHERE profile_id = ANY($1) \
         ORDER BY profile_id, created_at, anonymous_id",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for (id, anonymous_id) in identities {
        if let Some(record) = out.get_mut(&id) {
            record.anonymous_ids.push(anonymous_id);
        }
    }
    let tokens = sqlx::query(
        "SELECT profile_id, token, platform, app_id, updated_at FROM push_tokens WHERE profile_id = ANY($1) \
         ORDER BY profile_id, updated_at",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for token in tokens {
        let id: i64 = token.try_get("profile_id")?;
        if let Some(record) = out.get_mut(&id) {
            record.push_tokens.push(PushToken {
                token: token.try_get("token")?,
                platform: token.try_get("platform")?,
                app_id: token.try_get("app_id")?,
                updated_at: token.try_get("updated_at")?,
            });
        }
    }
    let consents = sqlx::query(
        "SELECT profile_id, channel, topic, status, decided_at, source FROM consents WHERE profile_id = ANY($1) \
         ORDER BY profile_id, channel, topic",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for consent in consents {
        let id: i64 = consent.try_get("profile_id")?;
        if let Some(record) = out.get_mut(&id) {
            record.consents.push(Consent {
                channel: consent.try_get("channel")?,
                topic: consent.try_get("topic")?,
                status: consent.try_get("status")?,
                decided_at: consent.try_get("decided_at")?,
                source: consent.try_get("source")?,
            });
        }
    }
    Ok(out)
}
