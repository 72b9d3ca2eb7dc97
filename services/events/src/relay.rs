//! The relay: publishes the event log to `relance.events` in commit order, with publisher
//! confirms, and moves its cursor only after the broker has confirmed. One replica relays
//! at a time (a session advisory lock); the others wait to take over.

use std::sync::Arc;
use std::time::Duration;

use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::EVENT_KEY_PREFIX;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store;

/// Runs until `shutdown`: takes the relay lock, then publishes batches as they commit.
pub async fn run(pool: sqlx::PgPool, publisher: Arc<Publisher>, wake: Arc<Notify>, batch: i64, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let conn = match pool.acquire().await {
            // A connection of its own, so that the session lock lives and dies with it.
            Ok(conn) => conn.detach(),
            Err(error) => {
                tracing::warn!(%error, "relay cannot reach Postgres");
                pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = relay_while_leader(conn, &publisher, &wake, batch, &shutdown).await {
            tracing::warn!(error = %format!("{error:#}"), "relay interrupted, restarting");
            pause(&shutdown, Duration::from_millis(500)).await;
        }
    }
}

async fn relay_while_leader(
    mut conn: PgConnection,
    publisher: &Publisher,
    wake: &Notify,
    batch: i64,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    while !store::try_lock_relay(&mut conn).await? {
        if pause(shutdown, Duration::from_secs(2)).await {
            return Ok(());
        }
    }
    tracing::info!("relay is active");
    while !shutdown.is_cancelled() {
        let (messages, last) = store::next_to_publish(&mut conn, batch).await?;
        let Some((xid, seq)) = last else {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        };
        let outgoing: Vec<Outgoing> = messages
            .iter()
            .map(|message| Outgoing {
                exchange: EVENTS_EXCHANGE.to_owned(),
                routing_key: format!("{EVENT_KEY_PREFIX}{}", message.name),
                message_id: message.bus_id(),
                payload: serde_json::to_vec(message).unwrap_or_default(),
                headers: [("workspace_id".to_owned(), message.workspace_id.clone())].into(),
            })
            .collect();
        publisher.publish_all(&outgoing).await?;
        store::advance_cursor(&mut conn, &xid, seq).await?;
        metrics::counter!("relance_events_published_total").increment(outgoing.len() as u64);
        if let Some(newest) = messages.last() {
            let lag = (chrono::Utc::now() - newest.received_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("relance_events_relay_lag_seconds").set(lag);
        }
    }
    Ok(())
}

/// Sleeps for `duration`; returns true if shutdown came first.
async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(duration) => false,
    }
}
