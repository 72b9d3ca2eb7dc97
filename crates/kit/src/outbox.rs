//! The transactional outbox: a service writes the message it must publish in the same
//! transaction as the change it announces, and a relay publishes it with publisher
//! confirms, then deletes it. A committed change is therefore always announced (at least
//! once; consumers deduplicate on the message id).
//!
//! Each schema that publishes has an `outbox` table:
//! `(id bigserial, exchange text, routing_key text, message_id text, payload jsonb, created_at,
//! traceparent text)`; the relay publishes each message in the trace of the span that
//! enqueued it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{Outgoing, Publisher};

/// Writes a message to the outbox inside the caller's transaction, in the current span's
/// trace.
pub async fn enqueue(
    conn: &mut PgConnection,
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    payload: &serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (exchange, routing_key, message_id, payload, traceparent) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(exchange)
    .bind(routing_key)
    .bind(message_id)
    .bind(payload)
    .bind(crate::trace::current())
    .execute(conn)
    .await?;
    Ok(())
}

/// Publishes the outbox until `shutdown`. `wake` is notified after a commit that enqueued
/// something, so messages leave at once; the relay also polls, for other replicas' rows.
pub async fn run_relay(
    pool: PgPool,
    publisher: Arc<Publisher>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let sent = match relay_batch(&pool, &publisher, 500).await {
            Ok(sent) => sent,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "outbox relay failed, retrying");
                0
            }
        };
        if sent == 500 {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Publishes up to `limit` outbox rows and deletes them; returns how many.
///
/// Rows are locked with SKIP LOCKED, so several replicas can relay side by side; if
/// publishing fails, the transaction rolls back and the rows stay for the next attempt.
pub async fn relay_batch(
    pool: &PgPool,
    publisher: &Publisher,
    limit: i64,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let messages = take(&mut tx, limit).await?;
    if messages.is_empty() {
        return Ok(0);
    }
    publisher.publish_all(&messages).await?;
    tx.commit().await?;
    Ok(messages.len())
}

/// Deletes up to `limit` outbox rows (locked with SKIP LOCKED) inside the caller's
/// transaction and returns them as messages in the order they were written, each carrying
/// the trace context it was enqueued in. Publish them before committing.
pub async fn take(conn: &mut PgConnection, limit: i64) -> anyhow::Result<Vec<Outgoing>> {
    #[allow(clippy::type_complexity)]
    let mut rows: Vec<(i64, String, String, String, serde_json::Value, Option<String>)> =
        sqlx::query_as(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, exchange, routing_key, message_id, payload, traceparent",
        )
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    rows.sort_by_key(|row| row.0);
    let mut messages = Vec::with_capacity(rows.len());
    for (_, exchange, routing_key, message_id, payload, traceparent) in rows {
        let mut headers = std::collections::BTreeMap::new();
        if let Some(traceparent) = traceparent {
            headers.insert(crate::trace::TRACEPARENT.to_owned(), traceparent);
        }
        messages.push(Outgoing {
            exchange,
            routing_key,
            message_id,
            payload: serde_json::to_vec(&payload)?,
            headers,
        });
    }
    Ok(messages)
}
