//! Postgres: templates, the message ledger, the in-app inbox and the outbox of the events
//! delivery records (`message_sent`, `message_failed`, `message_opened`, `message_clicked`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost::Message as _;
use relance_kit::bus::EVENTS_EXCHANGE;
use relance_kit::messages::{INGEST_KEY_PREFIX, IngestEvent, IngestEvents};
use relance_kit::{ApiError, ApiResult, outbox};
use relance_proto::v1::{MessageStatus, Template};
use sqlx::{PgConnection, PgPool, Row as _};
use tokio::sync::Notify;
use uuid::Uuid;

/// The ledger's status of a message a worker is sending (held until `lease_until`); shown
/// as QUEUED outside.
pub const SENDING: i16 = 100;

/// Postgres channel on which inbox changes are announced to every replica's live feeds.
pub const INBOX_NOTIFY_CHANNEL: &str = "delivery_inbox";

/// The store of the delivery schema.
#[derive(Debug, Clone)]
pub struct DeliveryStore {
    pub pool: PgPool,
    /// Notified after a commit that wrote to the outbox.
    pub outbox_wake: Arc<Notify>,
}

/// A request to put in the ledger.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub idempotency_key: String,
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub kind: i16,
    pub topic: String,
    pub template: String,
    pub locale: String,
    pub flow: String,
    pub flow_version: i32,
    pub step: String,
    pub variant: String,
    pub broadcast: String,
    pub journey_id: String,
    /// The request, protobuf-encoded.
    pub request: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The trace context the request arrived in (not stored: a retry starts its own trace).
    pub trace: Option<String>,
}

/// Builds the bus message (routing key, JSON body) announcing an accepted request.
pub type Announce<'a> = dyn Fn(&NewMessage) -> (String, serde_json::Value) + Sync + 'a;

/// A row of [`DeliveryStore::states`].
type StateRow = (Uuid, i16, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Where a request stands after [`DeliveryStore::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub idempotency_key: String,
    pub id: Uuid,
    /// False when the key was already in the ledger.
    pub fresh: bool,
}

/// A message a worker now holds.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub workspace_id: String,
    pub attempts: i32,
    pub request: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The trace context the request arrived in, on its first attempt.
    pub trace: Option<String>,
}

/// A message's state, for deciding what to do with a delivery that could not claim it.
#[derive(Debug, Clone, Copy)]
pub struct State {
    pub id: Uuid,
    pub status: i16,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub lease_until: Option<DateTime<Utc>>,
}

/// What happened to one message, to write to the ledger.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub id: Uuid,
    pub status: i16,
    pub reason: i16,
    pub detail: String,
    pub channel: i16,
    pub address: String,
    pub provider: String,
    pub provider_message_id: String,
    pub template_version: i32,
    pub locale: String,
    /// The chosen channel's rendered content (protobuf `MessageContent`).
    pub rendered: Option<Vec<u8>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

/// An in-app message to add to an inbox.
#[derive(Debug, Clone)]
pub struct InboxRow {
    pub message_id: Uuid,
    pub workspace_id: String,
    pub recipient: String,
    pub title: String,
    pub body: String,
    pub image_url: String,
    pub url: String,
    pub data: serde_json::Value,
    pub direction: i16,
    pub locale: String,
    pub origin: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
}

/// One ledger row as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: Uuid,
    pub workspace_id: String,
    pub idempotency_key: String,
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub channel: i16,
    pub status: i16,
    pub reason: i16,
    pub reason_detail: String,
    pub kind: i16,
    pub topic: String,
    pub template: String,
    pub template_version: i32,
    pub locale: String,
    pub flow: String,
    pub flow_version: i32,
    pub step: String,
    pub variant: String,
    pub broadcast: String,
    pub journey_id: String,
    pub address: String,
    pub provider: String,
    pub provider_message_id: String,
    pub attempts: i32,
    pub rendered: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub opened_at: Option<DateTime<Utc>>,
    pub clicked_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

const MESSAGE_COLUMNS: &str = "id, workspace_id, idempotency_key, customer_id, anonymous_id, channel, status, reason, \
     reason_detail, kind, topic, template, template_version, locale, flow, flow_version, step, variant, \
     broadcast, journey_id, address, provider, provider_message_id, attempts, rendered, created_at, \
     sent_at, delivered_at, opened_at, clicked_at, ended_at, next_attempt_at";

/// Filters of ListMessages.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub channels: Vec<i16>,
    pub statuses: Vec<i16>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub flow: String,
    pub broadcast: String,
    /// Keyset cursor: (created_at, id) of the last row of the previous page.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// A tracked interaction with a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Opened,
    Clicked,
}

impl DeliveryStore {
    /// A store over the delivery schema's pool.
    pub fn new(pool: PgPool, outbox_wake: Arc<Notify>) -> DeliveryStore {
        DeliveryStore { pool, outbox_wake }
    }

    // ----- templates -----

    /// Stores `template` as a new version unless it equals the current one; returns the
    /// version now current and whether it changed.
    pub async fn save_template(
        &self,
        workspace_id: &str,
        template: &Template,
        channels: &[i16],
        now: DateTime<Utc>,
    ) -> ApiResult<(u32, bool)> {
        let mut tx = self.pool.begin().await?;
        // One writer per template name at a time, so versions are numbered without gaps.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))")
            .bind(workspace_id)
            .bind(&template.name)
            .execute(&mut *tx)
            .await?;
        let current: Option<(i32, Vec<u8>)> = sqlx::query_as(
            "SELECT version, body FROM templates WHERE workspace_id = $1 AND name = $2 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(workspace_id)
        .bind(&template.name)
        .fetch_optional(&mut *tx)
        .await?;
        let mut comparable = template.clone();
        comparable.version = 0;
        comparable.created_at = None;
        comparable.updated_at = None;
        let mut created_at = now;
        let mut next = 1;
        if let Some((version, body)) = current {
            let stored =
                Template::decode(body.as_slice()).map_err(|e| ApiError::Internal(e.into()))?;
            created_at = stored
                .created_at
                .as_ref()
                .and_then(relance_proto::convert::timestamp_to_chrono)
                .unwrap_or(now);
            let mut stored_comparable = stored;
            stored_comparable.version = 0;
            stored_comparable.created_at = None;
            stored_comparable.updated_at = None;
            if stored_comparable == comparable {
                return Ok((version as u32, false));
            }
            next = version + 1;
        }
        let mut saved = comparable;
        saved.version = next as u32;
        saved.created_at = Some(relance_proto::convert::chrono_to_timestamp(created_at));
        saved.updated_at = Some(relance_proto::convert::chrono_to_timestamp(now));
        sqlx::query(
            "INSERT INTO templates (workspace_id, name, version, body, channels, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(workspace_id)
        .bind(&saved.name)
        .bind(next)
        .bind(saved.encode_to_vec())
        .bind(channels)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((next as u32, true))
    }

    /// A template's current version (`version` None or 0) or a given one.
    pub async fn template(
        &self,
        workspace_id: &str,
        name: &str,
        version: Option<u32>,
    ) -> ApiResult<Option<Template>> {
        let row: Option<(Vec<u8>,)> = match version {
            Some(version) if version > 0 => sqlx::query_as(
                "SELECT body FROM templates WHERE workspace_id = $1 AND name = $2 AND version = $3",
            )
            .bind(workspace_id)
            .bind(name)
            .bind(version as i32)
            .fetch_optional(&self.pool)
            .await?,
            _ => {
                sqlx::query_as(
                    "SELECT body FROM templates WHERE workspace_id = $1 AND name = $2 \
                     ORDER BY version DESC LIMIT 1",
                )
                .bind(workspace_id)
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        match row {
            Some((body,)) => Ok(Some(
                Template::decode(body.as_slice()).map_err(|e| ApiError::Internal(e.into()))?,
            )),
            None => Ok(None),
        }
    }

    /// The current version number of a template, if it exists.
    pub async fn template_version(&self, workspace_id: &str, name: &str) -> ApiResult<Option<u32>> {
        let row: Option<(i32,)> = sqlx::query_as(
            "SELECT max(version) FROM templates WHERE workspace_id = $1 AND name = $2 HAVING max(version) IS NOT NULL",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(v,)| v as u32))
    }

    /// Current versions of templates by name, after `after` (keyset paging).
    pub async fn list_templates(
        &self,
        workspace_id: &str,
        prefix: &str,
        channel: Option<i16>,
        after: &str,
        limit: i64,
    ) -> ApiResult<Vec<Template>> {
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT DISTINCT ON (name) body FROM templates \
             WHERE workspace_id = $1 AND name LIKE $2 || '%' AND name > $3 \
             ORDER BY name, version DESC",
        )
        .bind(workspace_id)
        .bind(prefix.replace('%', "\\%").replace('_', "\\_"))
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let mut templates = Vec::new();
        for (body,) in rows {
            let template =
                Template::decode(body.as_slice()).map_err(|e| ApiError::Internal(e.into()))?;
            if let Some(channel) = channel
                && !crate::domain::choose::template_has_channel(&template, channel as i32)
            {
                continue;
            }
            templates.push(template);
            if templates.len() as i64 >= limit {
                break;
            }
        }
        Ok(templates)
    }

    // ----- the ledger -----

    /// Puts requests in the ledger (QUEUED) unless their key is there already. With
    /// `publish`, each fresh request's bus envelope is written to the outbox in the same
    /// transaction, so that an accepted Send is never lost.
    pub async fn accept(
        &self,
        workspace_id: &str,
        messages: &[NewMessage],
        publish: Option<&Announce<'_>>,
    ) -> ApiResult<Vec<Admitted>> {
        let mut tx = self.pool.begin().await?;
        let admitted = insert_messages(&mut tx, workspace_id, messages, None).await?;
        let mut wrote_outbox = false;
        if let Some(publish) = publish {
            for (message, admitted) in messages.iter().zip(&admitted) {
                if !admitted.fresh {
                    continue;
                }
                let (routing_key, payload) = publish(message);
                outbox::enqueue(
                    &mut tx,
                    relance_kit::bus::DELIVERY_EXCHANGE,
                    &routing_key,
                    &format!("{workspace_id}:{}", message.idempotency_key),
                    &payload,
                )
                .await?;
                wrote_outbox = true;
            }
        }
        tx.commit().await?;
        if wrote_outbox {
            self.outbox_wake.notify_one();
        }
        Ok(admitted)
    }

    /// Puts requests from the bus in the ledger already claimed by this worker (one write
    /// instead of an insert then a claim); returns the claims of the new ones and the ids of
    /// those whose key was already there, to claim the usual way.
    pub async fn accept_claimed(
        &self,
        workspace_id: &str,
        messages: &[NewMessage],
        lease_until: DateTime<Utc>,
    ) -> ApiResult<(Vec<Claimed>, Vec<Uuid>)> {
        let mut conn = self.pool.acquire().await?;
        let admitted =
            insert_messages(&mut conn, workspace_id, messages, Some(lease_until)).await?;
        let mut claimed = Vec::new();
        let mut existing = Vec::new();
        for (message, admitted) in messages.iter().zip(admitted) {
            if admitted.fresh {
                claimed.push(Claimed {
                    id: admitted.id,
                    workspace_id: workspace_id.to_owned(),
                    attempts: 1,
                    request: message.request.clone(),
                    created_at: message.created_at,
                    expires_at: message.expires_at,
                    trace: message.trace.clone(),
                });
            } else if !existing.contains(&admitted.id) {
                existing.push(admitted.id);
            }
        }
        Ok((claimed, existing))
    }

    /// Takes the messages among `ids` that are waiting (queued, due for a retry, or held by
    /// a worker whose lease ran out), marks them as being sent until `lease_until` and counts
    /// the attempt.
    pub async fn claim(
        &self,
        ids: &[Uuid],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> ApiResult<Vec<Claimed>> {
        let rows = sqlx::query(
            "UPDATE messages SET status = 100, lease_until = $3, attempts = attempts + 1 \
             WHERE id = ANY($1) AND (status = 1 \
                OR (status = 6 AND next_attempt_at <= $2 + interval '2 seconds') \
                OR (status = 100 AND lease_until < $2)) \
             RETURNING id, workspace_id, attempts, request, created_at, expires_at",
        )
        .bind(ids)
        .bind(now)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            claimed.push(Claimed {
                id: row.try_get("id")?,
                workspace_id: row.try_get("workspace_id")?,
                attempts: row.try_get("attempts")?,
                request: row.try_get("request")?,
                created_at: row.try_get("created_at")?,
                expires_at: row.try_get("expires_at")?,
                trace: None,
            });
        }
        Ok(claimed)
    }

    /// The state of messages (those a delivery could not claim).
    pub async fn states(&self, ids: &[Uuid]) -> ApiResult<Vec<State>> {
        let rows: Vec<StateRow> = sqlx::query_as(
            "SELECT id, status, next_attempt_at, lease_until FROM messages WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, status, next_attempt_at, lease_until)| State {
                id,
                status,
                next_attempt_at,
                lease_until,
            })
            .collect())
    }

    /// Gives claimed messages back (a dependency failed before anything was sent): the
    /// attempt does not count.
    pub async fn release(&self, ids: &[Uuid]) -> ApiResult<()> {
        sqlx::query(
            "UPDATE messages SET status = CASE WHEN next_attempt_at IS NULL THEN 1 ELSE 6 END, \
             lease_until = NULL, attempts = greatest(attempts - 1, 0) \
             WHERE id = ANY($1) AND status = 100",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes outcomes, inbox rows and the events announcing them in one transaction.
    pub async fn record(
        &self,
        outcomes: &[Outcome],
        inbox: &[InboxRow],
        events: &[IngestEvents],
    ) -> ApiResult<()> {
        let mut tx = self.pool.begin().await?;
        record_outcomes(&mut tx, outcomes).await?;
        for row in inbox {
            insert_inbox(&mut tx, row).await?;
        }
        let wrote = enqueue_events(&mut tx, events).await?;
        tx.commit().await?;
        if wrote {
            self.outbox_wake.notify_one();
        }
        Ok(())
    }

    /// Messages whose retry or lease is overdue by more than `grace`: their broker copy was
    /// lost (a crash between commit and publish), so the sweeper publishes them again.
    pub async fn overdue(
        &self,
        now: DateTime<Utc>,
        grace: chrono::Duration,
        limit: i64,
    ) -> ApiResult<Vec<(Uuid, String, Vec<u8>)>> {
        let rows: Vec<(Uuid, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, workspace_id, request FROM messages \
             WHERE (status = 6 AND next_attempt_at < $1) OR (status = 100 AND lease_until < $1) \
             ORDER BY next_attempt_at NULLS FIRST LIMIT $2",
        )
        .bind(now - grace)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Forgets messages older than `before` (idempotency keys are remembered 30 days).
    pub async fn purge(&self, before: DateTime<Utc>, now: DateTime<Utc>) -> ApiResult<u64> {
        let inbox = sqlx::query("DELETE FROM inbox WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let done =
            sqlx::query("DELETE FROM messages WHERE created_at < $1 AND status NOT IN (1, 6, 100)")
                .bind(before)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() + inbox.rows_affected())
    }

    /// One message by id or by idempotency key.
    pub async fn message(
        &self,
        workspace_id: &str,
        id: Option<Uuid>,
        key: Option<&str>,
    ) -> ApiResult<Option<MessageRow>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE workspace_id = $1 AND (id = $2 OR idempotency_key = $3)"
        );
        let row = sqlx::query_as::<_, MessageRow>(&sql)
            .bind(workspace_id)
            .bind(id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// A customer's messages, newest first.
    pub async fn messages_of(
        &self,
        workspace_id: &str,
        customer_id: Option<&str>,
        anonymous_id: Option<&str>,
        filter: &MessageFilter,
    ) -> ApiResult<Vec<MessageRow>> {
        let (before_at, before_id) = match filter.before {
            Some((at, id)) => (Some(at), Some(id)),
            None => (None, None),
        };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE workspace_id = $1 \
             AND (($2::text IS NOT NULL AND customer_id = $2) OR ($3::text IS NOT NULL AND anonymous_id = $3)) \
             AND (cardinality($4::int2[]) = 0 OR channel = ANY($4)) \
             AND (cardinality($5::int2[]) = 0 OR (CASE WHEN status = 100 THEN 1 ELSE status END) = ANY($5)) \
             AND ($6::timestamptz IS NULL OR created_at >= $6) AND ($7::timestamptz IS NULL OR created_at < $7) \
             AND ($8 = '' OR flow = $8) AND ($9 = '' OR broadcast = $9) \
             AND ($10::timestamptz IS NULL OR (created_at, id) < ($10, $11)) \
             ORDER BY created_at DESC, id DESC LIMIT $12"
        );
        let rows = sqlx::query_as::<_, MessageRow>(&sql)
            .bind(workspace_id)
            .bind(customer_id)
            .bind(anonymous_id)
            .bind(&filter.channels)
            .bind(&filter.statuses)
            .bind(filter.from)
            .bind(filter.to)
            .bind(&filter.flow)
            .bind(&filter.broadcast)
            .bind(before_at)
            .bind(before_id)
            .bind(filter.limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Records an open or a click of a message; the first one of each kind is announced as
    /// an event (`message_opened`, `message_clicked`), so a reloaded pixel or a link clicked
    /// twice counts once. Returns false for an unknown message.
    pub async fn interaction(
        &self,
        workspace_id: &str,
        message_id: Uuid,
        interaction: Interaction,
        url: Option<&str>,
        now: DateTime<Utc>,
    ) -> ApiResult<bool> {
        let column = match interaction {
            Interaction::Opened => "opened_at",
            Interaction::Clicked => "clicked_at",
        };
        let mut tx = self.pool.begin().await?;
        // A click implies an open (mail clients that block images still follow links).
        let sql = format!(
            "UPDATE messages SET {column} = coalesce({column}, $3), opened_at = coalesce(opened_at, $3) \
             WHERE workspace_id = $1 AND id = $2 \
             RETURNING ({column} = $3) AS first, {MESSAGE_COLUMNS}"
        );
        let Some(row) = sqlx::query(&sql)
            .bind(workspace_id)
            .bind(message_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let first: bool = row.try_get("first")?;
        if first {
            let message = <MessageRow as sqlx::FromRow<_>>::from_row(&row)?;
            let name = match interaction {
                Interaction::Opened => "message_opened",
                Interaction::Clicked => "message_clicked",
            };
            let mut properties = message_properties(&message);
            if let Some(url) = url
                && let Some(object) = properties.as_object_mut()
            {
                object.insert("url".into(), serde_json::Value::String(url.to_owned()));
            }
            let event = IngestEvents {
                workspace_id: workspace_id.to_owned(),
                events: vec![IngestEvent {
                    message_id: format!("{message_id}:{name}"),
                    name: name.to_owned(),
                    customer_id: message.customer_id.clone(),
                    anonymous_id: message.anonymous_id.clone(),
                    timestamp: now,
                    properties,
                }],
            };
            enqueue_events(&mut tx, &[event]).await?;
        }
        tx.commit().await?;
        if first {
            self.outbox_wake.notify_one();
        }
        Ok(true)
    }

    /// Records what a provider's receipt says of a message it took (delivered, or failed
    /// after all) and announces it (`message_delivered`, `message_failed`); a repeated
    /// receipt changes nothing. Returns false when no sent message has that provider id.
    pub async fn receipt(
        &self,
        provider: &str,
        receipt: &crate::domain::receipts::Receipt,
        now: DateTime<Utc>,
    ) -> ApiResult<bool> {
        use crate::domain::receipts::ReceiptState;
        let (status, reason, detail, name) = match &receipt.state {
            ReceiptState::Delivered => (
                MessageStatus::Delivered,
                0i16,
                String::new(),
                "message_delivered",
            ),
            ReceiptState::Failed(detail) => (
                MessageStatus::Failed,
                relance_proto::v1::MessageReason::ProviderRejected as i16,
                detail.clone(),
                "message_failed",
            ),
        };
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE messages SET status = $3, reason = $4, reason_detail = $5,              delivered_at = CASE WHEN $3 = 3 THEN $6 ELSE delivered_at END,              ended_at = CASE WHEN $3 = 4 THEN $6 ELSE ended_at END              WHERE provider = $1 AND provider_message_id = $2 AND status = 2              RETURNING {MESSAGE_COLUMNS}"
        );
        let Some(message) = sqlx::query_as::<_, MessageRow>(&sql)
            .bind(provider)
            .bind(&receipt.provider_message_id)
            .bind(status as i16)
            .bind(reason)
            .bind(&detail)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let mut properties = message_properties(&message);
        if let Some(object) = properties.as_object_mut() {
            object.insert("provider".into(), provider.into());
            if !detail.is_empty() {
                object.insert("reason".into(), "PROVIDER_REJECTED".into());
                object.insert("detail".into(), detail.into());
            }
        }
        let event = IngestEvents {
            workspace_id: message.workspace_id.clone(),
            events: vec![IngestEvent {
                message_id: format!("{}:{name}", message.id),
                name: name.to_owned(),
                customer_id: message.customer_id.clone(),
                anonymous_id: message.anonymous_id.clone(),
                timestamp: now,
                properties,
            }],
        };
        enqueue_events(&mut tx, &[event]).await?;
        tx.commit().await?;
        self.outbox_wake.notify_one();
        Ok(true)
    }

    /// Records opens that apps reported through `Events.Track` (`message_opened` with the
    /// message's id): the event is already on the stream, only the ledger learns of it.
    pub async fn app_opens(&self, opens: &[(String, Uuid, DateTime<Utc>)]) -> ApiResult<()> {
        for (workspace_id, id, at) in opens {
            sqlx::query(
                "UPDATE messages SET opened_at = least(coalesce(opened_at, $3), $3)                  WHERE workspace_id = $1 AND id = $2",
            )
            .bind(workspace_id)
            .bind(id)
            .bind(at)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    // ----- the inbox -----

    /// A page of an inbox, newest first, without expired messages.
    pub async fn inbox(
        &self,
        workspace_id: &str,
        recipient: &str,
        unread_only: bool,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> ApiResult<Vec<InboxRow>> {
        let (before_at, before_id) = match before {
            Some((at, id)) => (Some(at), Some(id)),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT message_id, workspace_id, recipient, title, body, image_url, url, data, direction, \
             locale, origin, created_at, read_at, expires_at FROM inbox \
             WHERE workspace_id = $1 AND recipient = $2 AND expires_at > $3 \
             AND (NOT $4 OR read_at IS NULL) \
             AND ($5::timestamptz IS NULL OR (created_at, message_id) < ($5, $6)) \
             ORDER BY created_at DESC, message_id DESC LIMIT $7",
        )
        .bind(workspace_id)
        .bind(recipient)
        .bind(now)
        .bind(unread_only)
        .bind(before_at)
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(inbox_row(&row)?);
        }
        Ok(out)
    }

    /// Unread, unexpired messages of an inbox.
    pub async fn unread_count(
        &self,
        workspace_id: &str,
        recipient: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<u32> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM inbox WHERE workspace_id = $1 AND recipient = $2 \
             AND expires_at > $3 AND read_at IS NULL",
        )
        .bind(workspace_id)
        .bind(recipient)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u32)
    }

    /// Marks messages read (all of the inbox when `ids` is None); returns those that changed.
    pub async fn mark_read(
        &self,
        workspace_id: &str,
        recipient: &str,
        ids: Option<&[Uuid]>,
        now: DateTime<Utc>,
    ) -> ApiResult<Vec<InboxRow>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE inbox SET read_at = $3 WHERE workspace_id = $1 AND recipient = $2 \
             AND read_at IS NULL AND expires_at > $3 AND ($4::uuid[] IS NULL OR message_id = ANY($4)) \
             RETURNING message_id, workspace_id, recipient, title, body, image_url, url, data, direction, \
             locale, origin, created_at, read_at, expires_at",
        )
        .bind(workspace_id)
        .bind(recipient)
        .bind(now)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let inbox = inbox_row(&row)?;
            notify_inbox(
                &mut tx,
                &inbox.workspace_id,
                &inbox.recipient,
                "read",
                inbox.message_id,
            )
            .await?;
            out.push(inbox);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// One inbox message.
    pub async fn inbox_message(&self, message_id: Uuid) -> ApiResult<Option<InboxRow>> {
        let row = sqlx::query(
            "SELECT message_id, workspace_id, recipient, title, body, image_url, url, data, direction, \
             locale, origin, created_at, read_at, expires_at FROM inbox WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(inbox_row(&row)?)),
            None => Ok(None),
        }
    }
}

fn inbox_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<InboxRow> {
    Ok(InboxRow {
        message_id: row.try_get("message_id")?,
        workspace_id: row.try_get("workspace_id")?,
        recipient: row.try_get("recipient")?,
        title: row.try_get("title")?,
        body: row.try_get("body")?,
        image_url: row.try_get("image_url")?,
        url: row.try_get("url")?,
        data: row.try_get("data")?,
        direction: row.try_get("direction")?,
        locale: row.try_get("locale")?,
        origin: row.try_get("origin")?,
        created_at: row.try_get("created_at")?,
        read_at: row.try_get("read_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// The properties every `message_*` event carries: which message, channel (once one is
/// chosen), campaign, template and topic — from the ledger row.
pub fn message_properties(message: &MessageRow) -> serde_json::Value {
    let channel = relance_proto::v1::Channel::try_from(i32::from(message.channel))
        .unwrap_or(relance_proto::v1::Channel::Unspecified);
    let origin = relance_proto::v1::MessageOrigin {
        flow: message.flow.clone(),
        flow_version: message.flow_version as u32,
        step: message.step.clone(),
        variant: message.variant.clone(),
        broadcast: message.broadcast.clone(),
        journey_id: message.journey_id.clone(),
    };
    event_properties(
        message.id,
        Some(channel),
        &origin,
        &message.template,
        &message.topic,
    )
}

/// The properties of a `message_*` event, whether the send path (from the request) or a
/// later interaction (from the ledger row) announces it: one place for the event's shape.
pub fn event_properties(
    message_id: Uuid,
    channel: Option<relance_proto::v1::Channel>,
    origin: &relance_proto::v1::MessageOrigin,
    template: &str,
    topic: &str,
) -> serde_json::Value {
    let mut properties = serde_json::json!({
        "message_id": message_id.to_string(),
        "flow": origin.flow,
        "flow_version": origin.flow_version,
        "step": origin.step,
        "variant": origin.variant,
        "broadcast": origin.broadcast,
        "journey_id": origin.journey_id,
        "template": template,
        "topic": topic,
    });
    if let Some(channel) = channel
        && let Some(object) = properties.as_object_mut()
    {
        object.insert(
            "channel".into(),
            crate::domain::choose::channel_name(channel).into(),
        );
    }
    properties
}

async fn insert_messages(
    conn: &mut PgConnection,
    workspace_id: &str,
    messages: &[NewMessage],
    lease_until: Option<DateTime<Utc>>,
) -> ApiResult<Vec<Admitted>> {
    let n = messages.len();
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut anonymous = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut topics = Vec::with_capacity(n);
    let mut templates = Vec::with_capacity(n);
    let mut locales = Vec::with_capacity(n);
    let mut flows = Vec::with_capacity(n);
    let mut flow_versions = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    let mut variants = Vec::with_capacity(n);
    let mut broadcasts = Vec::with_capacity(n);
    let mut journeys = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    for m in messages {
        ids.push(m.id);
        keys.push(m.idempotency_key.clone());
        customers.push(m.customer_id.clone());
        anonymous.push(m.anonymous_id.clone());
        kinds.push(m.kind);
        topics.push(m.topic.clone());
        templates.push(m.template.clone());
        locales.push(m.locale.clone());
        flows.push(m.flow.clone());
        flow_versions.push(m.flow_version);
        steps.push(m.step.clone());
        variants.push(m.variant.clone());
        broadcasts.push(m.broadcast.clone());
        journeys.push(m.journey_id.clone());
        requests.push(m.request.clone());
        created.push(m.created_at);
        expires.push(m.expires_at);
    }
    let inserted: Vec<(Uuid, String)> = sqlx::query_as(
        "INSERT INTO messages (id, workspace_id, idempotency_key, customer_id, anonymous_id, status, kind, topic, \
         template, locale, flow, flow_version, step, variant, broadcast, journey_id, request, created_at, expires_at, \
         lease_until, attempts) \
         SELECT u.id, $1, u.key, u.customer, u.anonymous, CASE WHEN $19::timestamptz IS NULL THEN 1 ELSE 100 END, \
         u.kind, u.topic, u.template, u.locale, u.flow, \
         u.flow_version, u.step, u.variant, u.broadcast, u.journey, u.request, u.created, u.expires, \
         $19, CASE WHEN $19::timestamptz IS NULL THEN 0 ELSE 1 END \
         FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::text[], $8::text[], $9::text[], \
         $10::text[], $11::int4[], $12::text[], $13::text[], $14::text[], $15::text[], $16::bytea[], \
         $17::timestamptz[], $18::timestamptz[]) \
         AS u(id, key, customer, anonymous, kind, topic, template, locale, flow, flow_version, step, variant, \
         broadcast, journey, request, created, expires) \
         ON CONFLICT (workspace_id, idempotency_key) DO NOTHING RETURNING id, idempotency_key",
    )
    .bind(workspace_id)
    .bind(&ids)
    .bind(&keys)
    .bind(&customers)
    .bind(&anonymous)
    .bind(&kinds)
    .bind(&topics)
    .bind(&templates)
    .bind(&locales)
    .bind(&flows)
    .bind(&flow_versions)
    .bind(&steps)
    .bind(&variants)
    .bind(&broadcasts)
    .bind(&journeys)
    .bind(&requests)
    .bind(&created)
    .bind(&expires)
    .bind(lease_until)
    .fetch_all(&mut *conn)
    .await?;
    let fresh: std::collections::HashMap<String, Uuid> =
        inserted.into_iter().map(|(id, key)| (key, id)).collect();
    let mut missing: Vec<String> = Vec::new();
    for key in &keys {
        if !fresh.contains_key(key) {
            missing.push(key.clone());
        }
    }
    let mut existing: std::collections::HashMap<String, Uuid> = std::collections::HashMap::new();
    if !missing.is_empty() {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, idempotency_key FROM messages WHERE workspace_id = $1 AND idempotency_key = ANY($2)",
        )
        .bind(workspace_id)
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        existing = rows.into_iter().map(|(id, key)| (key, id)).collect();
    }
    let mut admitted = Vec::with_capacity(n);
    for key in keys {
        if let Some(id) = fresh.get(&key) {
            // The same key twice in one batch: the first is fresh, the second a duplicate.
            let first = !admitted.iter().any(|a: &Admitted| a.idempotency_key == key);
            admitted.push(Admitted {
                id: *id,
                fresh: first,
                idempotency_key: key,
            });
        } else if let Some(id) = existing.get(&key) {
            admitted.push(Admitted {
                id: *id,
                fresh: false,
                idempotency_key: key,
            });
        } else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "message {key} neither inserted nor found"
            )));
        }
    }
    Ok(admitted)
}

async fn record_outcomes(conn: &mut PgConnection, outcomes: &[Outcome]) -> ApiResult<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let n = outcomes.len();
    let mut ids = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut details = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut addresses = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut provider_ids = Vec::with_capacity(n);
    let mut template_versions = Vec::with_capacity(n);
    let mut locales = Vec::with_capacity(n);
    let mut rendered = Vec::with_capacity(n);
    let mut next_attempts = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    for o in outcomes {
        ids.push(o.id);
        statuses.push(o.status);
        reasons.push(o.reason);
        details.push(o.detail.clone());
        channels.push(o.channel);
        addresses.push(o.address.clone());
        providers.push(o.provider.clone());
        provider_ids.push(o.provider_message_id.clone());
        template_versions.push(o.template_version);
        locales.push(o.locale.clone());
        rendered.push(o.rendered.clone());
        next_attempts.push(o.next_attempt_at);
        ats.push(o.at);
    }
    let sent = MessageStatus::Sent as i16;
    let retrying = MessageStatus::Retrying as i16;
    sqlx::query(
        "UPDATE messages m SET status = u.status, reason = u.reason, reason_detail = u.detail, \
         channel = u.channel, address = u.address, provider = u.provider, \
         provider_message_id = u.provider_id, template_version = u.template_version, \
         locale = CASE WHEN u.locale = '' THEN m.locale ELSE u.locale END, \
         rendered = coalesce(u.rendered, m.rendered), next_attempt_at = u.next_attempt, lease_until = NULL, \
         sent_at = CASE WHEN u.status = $14 THEN u.at ELSE m.sent_at END, \
         ended_at = CASE WHEN u.status IN ($14, $15) THEN m.ended_at ELSE u.at END \
         FROM UNNEST($1::uuid[], $2::int2[], $3::int2[], $4::text[], $5::int2[], $6::text[], $7::text[], \
         $8::text[], $9::int4[], $10::text[], $11::bytea[], $12::timestamptz[], $13::timestamptz[]) \
         AS u(id, status, reason, detail, channel, address, provider, provider_id, template_version, locale, \
         rendered, next_attempt, at) \
         WHERE m.id = u.id AND m.status = 100",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&details)
    .bind(&channels)
    .bind(&addresses)
    .bind(&providers)
    .bind(&provider_ids)
    .bind(&template_versions)
    .bind(&locales)
    .bind(&rendered)
    .bind(&next_attempts)
    .bind(&ats)
    .bind(sent)
    .bind(retrying)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_inbox(conn: &mut PgConnection, row: &InboxRow) -> ApiResult<()> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id, workspace_id, recipient, title, body, image_url, url, data, direction, \
         locale, origin, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(row.message_id)
    .bind(&row.workspace_id)
    .bind(&row.recipient)
    .bind(&row.title)
    .bind(&row.body)
    .bind(&row.image_url)
    .bind(&row.url)
    .bind(&row.data)
    .bind(row.direction)
    .bind(&row.locale)
    .bind(&row.origin)
    .bind(row.created_at)
    .bind(row.expires_at)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() > 0 {
        notify_inbox(
            conn,
            &row.workspace_id,
            &row.recipient,
            "added",
            row.message_id,
        )
        .await?;
    }
    Ok(())
}

/// Announces an inbox change to every replica (delivered at commit).
async fn notify_inbox(
    conn: &mut PgConnection,
    workspace_id: &str,
    recipient: &str,
    change: &str,
    message_id: Uuid,
) -> ApiResult<()> {
    let payload = serde_json::json!({
        "workspace_id": workspace_id,
        "recipient": recipient,
        "change": change,
        "message_id": message_id,
    });
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(INBOX_NOTIFY_CHANNEL)
        .bind(payload.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn enqueue_events(conn: &mut PgConnection, batches: &[IngestEvents]) -> ApiResult<bool> {
    let mut wrote = false;
    for batch in batches {
        let Some(first) = batch.events.first() else {
            continue;
        };
        let payload = serde_json::to_value(batch).map_err(|e| ApiError::Internal(e.into()))?;
        outbox::enqueue(
            conn,
            EVENTS_EXCHANGE,
            &format!("{INGEST_KEY_PREFIX}{}", first.name),
            &format!(
                "{}:{}+{}",
                batch.workspace_id,
                first.message_id,
                batch.events.len()
            ),
            &payload,
        )
        .await?;
        wrote = true;
    }
    Ok(wrote)
}
