//! The segmentation service: who belongs to which segment, kept true in real time as
//! customers act and as time passes.
//!
//! - API: [`api`] (proto ↔ store)
//! - domain: [`domain`] (the definition language, evaluation, time boundaries; pure)
//! - store: [`store`] (definitions, aggregates, membership in Postgres; the Redis mirror;
//!   real-time and batch evaluation)
//! - background: [`consumer`] (events and profile changes), the sweeper (time boundaries),
//!   the builder (new versions), the mirror reload, the outbox relay
#![forbid(unsafe_code)]

pub mod api;
pub mod consumer;
pub mod domain;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use relance_kit::bus::Publisher;
use relance_kit::cache::Cache;
use relance_kit::grpc::GrpcServer;
use relance_kit::{Platform, SharedClock, outbox};
use relance_proto::v1::segments_server::SegmentsServer;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Migrations of the `segments` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "segments";

/// The `[segmentation]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SegmentationConfig {
    /// Milliseconds between sweeps for customers whose window boundary has passed.
    pub sweep_every_ms: u64,
    /// Customers re-evaluated per sweep transaction.
    pub sweep_batch: i64,
    /// Milliseconds between checks for versions to build (an Apply in this process wakes
    /// the builder at once).
    pub build_poll_ms: u64,
    /// Seconds between full reloads of the Redis membership mirror.
    pub mirror_reload_secs: u64,
}

impl Default for SegmentationConfig {
    fn default() -> SegmentationConfig {
        SegmentationConfig {
            sweep_every_ms: 1000,
            sweep_batch: 1000,
            build_poll_ms: 2000,
            mirror_reload_secs: 600,
        }
    }
}

/// Starts the segmentation service: migrations, outbox relay, consumer, sweeper, builder,
/// mirror reload, and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let config: SegmentationConfig = platform.settings.section("segmentation")?;
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let cache = match Cache::connect(&platform.settings).await {
        Ok(cache) => Some(cache),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "redis unreachable: membership checks will read postgres");
            None
        }
    };
    let outbox_wake = Arc::new(Notify::new());
    let store = store::SegmentStore::new(
        pool.clone(),
        store::mirror::Mirror::new(cache),
        outbox_wake.clone(),
    );

    let publisher = Arc::new(Publisher::new(platform.bus.clone()));
    platform.spawn(
        "segments-outbox",
        outbox::run_relay(pool, publisher, outbox_wake, platform.shutdown.clone()),
    );
    let handler = Arc::new(consumer::ChangeHandler {
        store: store.clone(),
        clock: platform.clock.clone(),
    });
    platform
        .consume("segments-changes", consumer::spec(), handler)
        .await?;
    platform.spawn(
        "segments-sweeper",
        sweep_loop(
            store.clone(),
            platform.clock.clone(),
            config.clone(),
            platform.shutdown.clone(),
        ),
    );
    platform.spawn(
        "segments-builder",
        build_loop(
            store.clone(),
            platform.clock.clone(),
            config.clone(),
            platform.shutdown.clone(),
        ),
    );
    platform.spawn(
        "segments-mirror",
        mirror_loop(store.clone(), config, platform.shutdown.clone()),
    );
    server.add_service(SegmentsServer::new(api::SegmentsApi {
        store,
        clock: platform.clock.clone(),
    }));
    Ok(())
}

/// Wakes customers at their window boundaries.
async fn sweep_loop(
    store: store::SegmentStore,
    clock: SharedClock,
    config: SegmentationConfig,
    shutdown: CancellationToken,
) {
    let pause = Duration::from_millis(config.sweep_every_ms.max(10));
    loop {
        let swept = match store.sweep(clock.now(), config.sweep_batch).await {
            Ok(swept) => swept,
            Err(error) => {
                tracing::warn!(%error, "sweep failed, retrying");
                0
            }
        };
        if swept as i64 == config.sweep_batch {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Backfills new selectors and builds new versions.
async fn build_loop(
    store: store::SegmentStore,
    clock: SharedClock,
    config: SegmentationConfig,
    shutdown: CancellationToken,
) {
    let pause = Duration::from_millis(config.build_poll_ms.max(10));
    let wake = store.build_wake.clone();
    loop {
        if let Err(error) = store.build_pending(|| clock.now()).await {
            tracing::warn!(%error, "segment build failed, retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Reloads the Redis mirror at start and periodically.
async fn mirror_loop(
    store: store::SegmentStore,
    config: SegmentationConfig,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) = store.reload_all_mirrors().await {
            tracing::warn!(%error, "membership mirror reload failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(config.mirror_reload_secs.max(10))) => {}
        }
    }
}
