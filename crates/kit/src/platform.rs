//! What a service gets when it starts: settings, clock, the broker, the API-key store, and
//! a shutdown token with a tracker of the background work to drain.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::KeyStore;
use crate::bus::{self, Bus, ConsumerSpec, Handler};
use crate::clock::SharedClock;
use crate::config::Settings;
use crate::db;

/// Migrations of the `auth` schema (workspaces and API keys).
pub static AUTH_MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The shared context of the services running in one process.
#[derive(Debug, Clone)]
pub struct Platform {
    /// Validated settings.
    pub settings: Settings,
    /// The one source of time.
    pub clock: SharedClock,
    /// The RabbitMQ connection.
    pub bus: Arc<Bus>,
    /// API keys, for the auth layer and the CLI.
    pub keys: Arc<KeyStore>,
    /// Cancelled on SIGTERM/SIGINT: stop taking work, finish what is in flight.
    pub shutdown: CancellationToken,
    /// Background tasks (consumers, relays, timers) that shutdown waits for.
    pub tasks: TaskTracker,
    /// The key this process presents to the other services (and accepts from them).
    pub internal_key: crate::auth::InternalKey,
}

impl Platform {
    /// Connects to Postgres (auth schema) and RabbitMQ.
    pub async fn start(settings: Settings, clock: SharedClock) -> anyhow::Result<Platform> {
        let auth_pool = db::connect(&settings, "auth").await?;
        if settings.migrate_on_start {
            db::migrate(&auth_pool, &AUTH_MIGRATOR, "auth").await?;
        }
        let bus = Bus::connect(&settings)
            .await
            .context("connecting to RabbitMQ (RELANCE_AMQP_URL)")?;
        let internal_key = match &settings.internal_key {
            Some(key) => secrecy::ExposeSecret::expose_secret(key).to_owned(),
            None => format!("rik_{}", uuid::Uuid::new_v4().simple()),
        };
        let keys = KeyStore::new(auth_pool).with_internal_key(&internal_key);
        Ok(Platform {
            internal_key: crate::auth::InternalKey::new(&internal_key)?,
            settings,
            clock,
            bus,
            keys: Arc::new(keys),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// A pool on `schema`, migrated with `migrator` when `migrate_on_start` is set.
    pub async fn database(&self, schema: &str, migrator: &Migrator) -> anyhow::Result<PgPool> {
        let pool = db::connect(&self.settings, schema).await?;
        if self.settings.migrate_on_start {
            db::migrate(&pool, migrator, schema).await?;
        }
        Ok(pool)
    }

    /// Runs a background task that shutdown will wait for.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tracing::debug!(task = name, "background task started");
        self.tasks.spawn(task);
    }

    /// Declares a consumer's queues now (so that what is published before it runs is
    /// kept), then consumes them in the background until shutdown.
    pub async fn consume(
        &self,
        task: &'static str,
        spec: ConsumerSpec,
        handler: Arc<dyn Handler>,
    ) -> anyhow::Result<()> {
        bus::declare(&self.bus, &spec)
            .await
            .with_context(|| format!("declaring the queues of {}", spec.queue))?;
        self.spawn(
            task,
            bus::run_consumer(self.bus.clone(), spec, handler, self.shutdown.clone()),
        );
        Ok(())
    }

    /// Cancels the shutdown token on SIGTERM or Ctrl-C.
    pub fn cancel_on_signal(&self) {
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received, shutting down");
            token.cancel();
        });
    }

    /// Waits for background tasks to finish, at most the configured grace period.
    pub async fn drain(&self) {
        self.tasks.close();
        let grace = std::time::Duration::from_secs(self.settings.shutdown_grace_secs);
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "background tasks still running after the grace period"
            );
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
