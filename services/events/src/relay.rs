//! The relay: publishes the event log to `relance.events` in commit order, with publisher
//! confirms, and moves its cursor only after the broker has confirmed. One replica relays
//! at a time (a session advisory lock); the others wait to take over.

use std::sync::Arc;
use std::time::Duration;

use relance_kit::SharedClock;
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::EVENT_KEY_PREFIX;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store;

/// The relay of one events service replica.
#[derive(Debug)]
pub struct Relay {
    pub clock: SharedClock,
    pub publisher: Arc<Publisher>,
    /// Notified by ingestion after each commit.
    pub wake: Arc<Notify>,
    /// Events per round trip.
    pub batch: i64,
}

impl Relay {
    /// Runs until `shutdown`: takes the relay lock, then publishes batches as they commit.
    pub async fn run(self, pool: sqlx::PgPool, shutdown: CancellationToken) {
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
            if let Err(error) = self.relay_while_leader(conn, &shutdown).await {
                tracing::warn!(error = %format!("{error:#}"), "relay interrupted, restarting");
                pause(&shutdown, Duration::from_millis(500)).await;
            }
        }
    }

    async fn relay_while_leader(
        &self,
        mut conn: PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        while !store::try_lock_relay(&mut conn).await? {
            if pause(shutdown, Duration::from_secs(2)).await {
                return Ok(());
            }
        }
        tracing::info!("relay is active");
        while !shutdown.is_cancelled() {
            let (messages, last) = store::next_to_publish(&mut conn, self.batch).await?;
            let Some((xid, seq)) = last else {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            };
            let mut outgoing = Vec::with_capacity(messages.len());
            for message in &messages {
                outgoing.push(Outgoing {
                    exchange: EVENTS_EXCHANGE.to_owned(),
                    routing_key: format!("{EVENT_KEY_PREFIX}{}", message.name),
                    message_id: message.bus_id(),
                    payload: serde_json::to_vec(message)?,
                    headers: [("workspace_id".to_owned(), message.workspace_id.clone())].into(),
                });
            }
            self.publisher.publish_all(&outgoing).await?;
            store::advance_cursor(&mut conn, &xid, seq).await?;
            metrics::counter!("relance_events_published_total").increment(outgoing.len() as u64);
            if let Some(newest) = messages.last() {
                let lag = (self.clock.now() - newest.received_at)
                    .num_milliseconds()
                    .max(0) as f64
                    / 1000.0;
                metrics::gauge!("relance_events_relay_lag_seconds").set(lag);
            }
        }
        Ok(())
    }
}

/// Sleeps for `duration`; returns true if shutdown came first.
async fn pause(shutdown: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(duration) => false,
    }
}
