//! The campaigns service: durable flows (journeys with timers in Postgres), broadcasts,
//! frequency caps, quiet hours, experiments with control groups, and the report of what
//! each step and variant earned.
//!
//! - API: [`api`] (proto ↔ domain and store)
//! - domain: [`domain`] (definitions, the journey state machine, guardrails, best time,
//!   schedules, experiments, the report's arithmetic; pure)
//! - store: [`store`] (flows, journeys, broadcasts, activity, counters, the outbox)
//! - background: [`engine`] (due journeys), [`broadcaster`] (broadcast runs),
//!   [`scheduler`] (schedule-triggered flows), [`consumer`] (events and segment changes),
//!   [`relay`] (send requests to delivery, rate-limited per channel)
#![forbid(unsafe_code)]

pub mod api;
pub mod broadcaster;
pub mod clients;
pub mod consumer;
pub mod domain;
pub mod engine;
pub mod relay;
pub mod scheduler;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use relance_kit::Platform;
use relance_kit::bus::Publisher;
use relance_kit::grpc::GrpcServer;
use relance_proto::v1::campaigns_server::CampaignsServer;
use serde::Deserialize;
use tokio::sync::Notify;

/// Migrations of the `campaigns` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "campaigns";

/// The `[campaigns]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CampaignsConfig {
    /// Journey workers per process (each runs one batch at a time).
    pub workers: usize,
    /// Due journeys claimed per transaction.
    pub batch: i64,
    /// Milliseconds between polls for due journeys when none were due.
    pub poll_ms: u64,
    /// Broadcast recipients handled per transaction.
    pub broadcast_batch: i64,
    /// Most send requests published per second, by channel (`push = 2000`); a channel not
    /// named is not limited. Per process: divide by the number of replicas.
    pub channel_rate_per_sec: HashMap<String, u32>,
    /// Milliseconds between checks for due scheduled flows and broadcasts.
    pub schedule_poll_ms: u64,
}

impl Default for CampaignsConfig {
    fn default() -> CampaignsConfig {
        CampaignsConfig {
            workers: 2,
            batch: 500,
            poll_ms: 200,
            broadcast_batch: 2000,
            channel_rate_per_sec: HashMap::new(),
            schedule_poll_ms: 1000,
        }
    }
}

/// Starts the campaigns service: migrations, the send relay, the event consumer, the
/// journey workers, the broadcaster, the scheduler, and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let config: CampaignsConfig = platform.settings.section("campaigns")?;
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let outbox_wake = Arc::new(Notify::new());
    let store = store::CampaignStore::new(pool.clone(), outbox_wake.clone());
    let clients = clients::Clients::new(&platform.settings, platform.internal_key.clone())?;

    let publisher = Arc::new(Publisher::new(platform.bus.clone()));
    platform.spawn(
        "campaigns-relay",
        relay::run(
            pool.clone(),
            publisher,
            outbox_wake,
            relay::ChannelLimits::new(config.channel_rate_per_sec.clone()),
            platform.shutdown.clone(),
        ),
    );
    let handler = Arc::new(consumer::EventHandler {
        store: store.clone(),
        clients: clients.clone(),
        clock: platform.clock.clone(),
    });
    platform
        .consume("campaigns-events", consumer::spec(), handler)
        .await?;

    let engine = engine::Engine::new(
        store.clone(),
        clients.clone(),
        platform.clock.clone(),
        engine::EngineConfig {
            batch: config.batch.max(1),
            poll_ms: config.poll_ms,
        },
    );
    for _ in 0..config.workers.max(1) {
        platform.spawn(
            "campaigns-journeys",
            engine.clone().run(platform.shutdown.clone()),
        );
    }
    let broadcaster = broadcaster::Broadcaster {
        store: store.clone(),
        clients: clients.clone(),
        clock: platform.clock.clone(),
        config: broadcaster::BroadcasterConfig {
            batch: config.broadcast_batch.max(1),
            poll_ms: config.schedule_poll_ms.min(config.poll_ms.max(50)),
        },
    };
    platform.spawn(
        "campaigns-broadcasts",
        broadcaster.run(platform.shutdown.clone()),
    );
    platform.spawn(
        "campaigns-scheduler",
        scheduler::run(
            store.clone(),
            clients.clone(),
            platform.clock.clone(),
            Duration::from_millis(config.schedule_poll_ms.max(50)),
            platform.shutdown.clone(),
        ),
    );
    platform.spawn(
        "campaigns-purge",
        purge_loop(
            store.clone(),
            platform.clock.clone(),
            platform.shutdown.clone(),
        ),
    );

    server.add_service(CampaignsServer::new(api::CampaignsApi {
        store,
        clients,
        clock: platform.clock.clone(),
    }));
    Ok(())
}

/// Deletes frequency-cap counters past their period, hourly.
async fn purge_loop(
    store: store::CampaignStore,
    clock: relance_kit::SharedClock,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(error) = store.purge_cap_counters(clock.now()).await {
            tracing::warn!(%error, "cap counter purge failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
