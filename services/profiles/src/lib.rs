//! The profiles service: who each customer is — attributes, identities (anonymous → known
//! merge), channel addresses, consent, timezone and locale, traits computed from purchases
//! (orders, revenue, first/last purchase, average basket, RFM), GDPR export and erasure.
//!
//! - API: [`api`] (proto ↔ domain)
//! - domain: [`domain`] (validation, RFM, purchase effects; pure)
//! - store: [`store`] (SQL, outbox)
//! - background: [`consumer`] (events → traits and merges), RFM rescoring, outbox relay
#![forbid(unsafe_code)]

pub mod api;
pub mod consumer;
pub mod domain;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use relance_kit::bus::Publisher;
use relance_kit::grpc::GrpcServer;
use relance_kit::{Platform, SharedClock, outbox};
use relance_proto::v1::profiles_server::ProfilesServer;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Migrations of the `profiles` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "profiles";

/// The `[profiles]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProfilesConfig {
    /// Seconds between RFM rescorings when purchases arrived since the last one.
    pub rescore_after_purchases_secs: u64,
    /// Seconds between full RFM rescorings (recency changes as time passes).
    pub rescore_every_secs: u64,
}

impl Default for ProfilesConfig {
    fn default() -> ProfilesConfig {
        ProfilesConfig {
            rescore_after_purchases_secs: 30,
            rescore_every_secs: 3600,
        }
    }
}

/// Starts the profiles service: migrations, outbox relay, event consumer, RFM rescoring,
/// and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let config: ProfilesConfig = platform.settings.section("profiles")?;
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let outbox_wake = Arc::new(Notify::new());
    let store = store::ProfileStore::new(pool.clone(), outbox_wake.clone());

    let publisher = Arc::new(Publisher::new(platform.bus.clone()));
    platform.spawn(
        "profiles-outbox",
        outbox::run_relay(pool, publisher, outbox_wake, platform.shutdown.clone()),
    );

    let purchases_seen = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(consumer::EventHandler {
        store: store.clone(),
        clock: platform.clock.clone(),
        purchases_seen: purchases_seen.clone(),
    });
    platform
        .consume("profiles-events", consumer::spec(), handler)
        .await?;
    platform.spawn(
        "profiles-rfm",
        rescore_loop(
            store.clone(),
            platform.clock.clone(),
            config,
            purchases_seen,
            platform.shutdown.clone(),
        ),
    );

    server.add_service(ProfilesServer::new(api::ProfilesApi {
        store,
        clock: platform.clock.clone(),
    }));
    Ok(())
}

/// Rescoring RFM: soon after purchases arrive, and periodically as recency ages.
async fn rescore_loop(
    store: store::ProfileStore,
    clock: SharedClock,
    config: ProfilesConfig,
    purchases_seen: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut since_full = Duration::ZERO;
    let tick = Duration::from_secs(config.rescore_after_purchases_secs.max(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        since_full += tick;
        let due = purchases_seen.swap(false, Ordering::Relaxed)
            || since_full >= Duration::from_secs(config.rescore_every_secs);
        if !due {
            continue;
        }
        since_full = Duration::ZERO;
        if let Err(error) = rescore_all(&store, &clock).await {
            tracing::warn!(%error, "rfm rescoring failed");
        }
    }
}

/// Rescores every workspace that has buyers.
pub async fn rescore_all(
    store: &store::ProfileStore,
    clock: &SharedClock,
) -> Result<(), domain::ProfileError> {
    for workspace in store.workspaces_with_buyers().await? {
        if let Some((_, buyers)) = store.rescore(&workspace, clock.now()).await? {
            tracing::info!(%workspace, buyers, "rfm scores refreshed");
        }
    }
    Ok(())
}
