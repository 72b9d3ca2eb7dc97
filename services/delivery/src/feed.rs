//! Live inbox updates for WatchInbox: every replica listens to Postgres notifications of
//! inbox changes (sent at commit by whichever replica made them) and hands them to the
//! streams it serves.

use std::time::Duration;

use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::INBOX_NOTIFY_CHANNEL;

/// One inbox change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InboxChange {
    pub workspace_id: String,
    pub recipient: String,
    /// `added` or `read`.
    pub change: String,
    pub message_id: Uuid,
}

/// The changes seen by this replica, for its open streams.
#[derive(Debug, Clone)]
pub struct Feed {
    sender: broadcast::Sender<InboxChange>,
}

impl Default for Feed {
    fn default() -> Feed {
        let (sender, _) = broadcast::channel(4096);
        Feed { sender }
    }
}

impl Feed {
    /// A receiver of every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<InboxChange> {
        self.sender.subscribe()
    }
}

/// Listens until shutdown, reconnecting after failures.
pub async fn listen(pool: PgPool, feed: Feed, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match listen_once(&pool, &feed, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, ?backoff, "inbox feed lost its listener, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn listen_once(pool: &PgPool, feed: &Feed, shutdown: &CancellationToken) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(INBOX_NOTIFY_CHANNEL).await?;
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = listener.recv() => next?,
        };
        match serde_json::from_str::<InboxChange>(notification.payload()) {
            // No receiver (no stream open) is not an error.
            Ok(change) => {
                let _ = feed.sender.send(change);
            }
            Err(error) => tracing::warn!(%error, "unreadable inbox notification"),
        }
    }
}
