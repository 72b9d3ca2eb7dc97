//! The events service: ingestion (Track, TrackBatch, Import), dedup, the partitioned event
//! log, and its publication to `relance.events`.
//!
//! - API: [`api`] (proto ↔ domain)
//! - domain: [`domain`] (validation, batch rules; pure)
//! - store: [`store`] (SQL)
//! - background: [`relay`] (event log → RabbitMQ), [`consumer`] (identity changes)
#![forbid(unsafe_code)]

pub mod api;
pub mod consumer;
pub mod domain;
pub mod ingest;
pub mod relay;
pub mod store;

use std::sync::Arc;

use relance_kit::Platform;
use relance_kit::bus::Publisher;
use relance_kit::grpc::GrpcServer;
use relance_proto::v1::events_server::EventsServer;
use serde::Deserialize;
use tokio::sync::Notify;

/// Migrations of the `events` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "events";

/// The `[events]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EventsConfig {
    /// Validation limits.
    #[serde(flatten)]
    pub limits: domain::Limits,
    /// The write path: writers, group size, queue bound.
    #[serde(flatten)]
    pub writer: ingest::WriterSettings,
    /// Events published per relay round trip.
    pub relay_batch: i64,
    /// Largest gRPC message accepted (TrackBatch of 1,000 events).
    pub max_message_bytes: usize,
}

impl Default for EventsConfig {
    fn default() -> EventsConfig {
        EventsConfig {
            limits: domain::Limits::default(),
            writer: ingest::WriterSettings::default(),
            relay_batch: 1000,
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Starts the events service: migrations, relay, identity consumer, and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let config: EventsConfig = platform.settings.section("events")?;
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let store = Arc::new(store::EventStore::new(pool.clone()));
    let relay_wake = Arc::new(Notify::new());

    let relay_cache = Arc::new(relay::RelayCache::default());
    let relay = relay::Relay {
        clock: platform.clock.clone(),
        cache: relay_cache.clone(),
        publisher: Arc::new(Publisher::new(platform.bus.clone())),
        wake: relay_wake.clone(),
        batch: config.relay_batch,
    };
    platform.spawn("events-relay", relay.run(pool, platform.shutdown.clone()));

    let handler = Arc::new(consumer::IdentityHandler {
        store: store.clone(),
    });
    platform
        .consume("events-identity", consumer::spec(), handler)
        .await?;

    let ingestor = ingest::Ingestor::new(
        store,
        platform.clock.clone(),
        config.limits,
        config.writer,
        platform.settings.database_max_connections,
        relay_wake,
        relay_cache,
    );
    platform
        .consume(
            "events-ingest",
            consumer::ingest_spec(),
            Arc::new(consumer::IngestHandler {
                ingestor: ingestor.clone(),
            }),
        )
        .await?;
    server.add_service(
        EventsServer::new(api::EventsApi { ingestor })
            .max_decoding_message_size(config.max_message_bytes),
    );
    Ok(())
}
