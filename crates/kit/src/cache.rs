//! Redis for hot state only (recent items, counters, membership sets): every value kept
//! here can be rebuilt from Postgres, so losing Redis costs speed, never correctness.

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use secrecy::ExposeSecret as _;

use crate::config::Settings;

/// A reconnecting Redis connection and the key prefix of this deployment.
#[derive(Clone)]
pub struct Cache {
    connection: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Cache {
    /// Connects; the manager reconnects by itself after a failure.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Cache> {
        let client =
            redis::Client::open(settings.redis_url.expose_secret()).context("RELANCE_REDIS_URL")?;
        let connection = ConnectionManager::new(client)
            .await
            .context("connecting to Redis")?;
        Ok(Cache {
            connection,
            prefix: settings.redis_prefix.clone(),
        })
    }

    /// `<prefix><workspace>:<name>`: every key is confined to a workspace.
    pub fn key(&self, workspace_id: &str, name: &str) -> String {
        format!("{}{}:{}", self.prefix, workspace_id, name)
    }

    /// A handle to run commands on (cheap to clone).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }
}
