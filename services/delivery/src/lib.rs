//! The delivery service: renders and sends every message, on every channel, exactly once.
//!
//! - API: [`api`] (proto ↔ store and pipeline), [`http`] (tracking links, open pixel,
//!   unsubscribe page)
//! - domain: [`domain`] (templates, links, HTML, channel choice and consent, request rules;
//!   pure)
//! - store: [`store`] (templates, the message ledger, the inbox, the outbox)
//! - the send path: [`consumer`] (the `delivery.requests` queue, retries, the sweeper) →
//!   [`pipeline`] (profile, channel, render, products, provider) → [`channels`] (one adapter
//!   per provider, rate limits, circuit breakers, failover)
//! - [`clients`]: calls to profiles and recommendations; [`feed`]: live inbox updates
#![forbid(unsafe_code)]

pub mod api;
pub mod channels;
pub mod clients;
pub mod consumer;
pub mod dlq;
pub mod domain;
#[cfg(feature = "testing")]
pub mod fake;
pub mod feed;
pub mod http;
pub mod pipeline;
pub mod store;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relance_kit::bus::Publisher;
use relance_kit::grpc::GrpcServer;
use relance_kit::{Platform, outbox};
use relance_proto::v1::delivery_server::DeliveryServer;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::channels::ProviderConfig;
use crate::channels::set::Providers;
use crate::domain::links::LinkSigner;

/// Migrations of the `delivery` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "delivery";

/// The `[delivery]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DeliveryConfig {
    /// Address of the HTTP listener for tracking links, the open pixel and unsubscribes.
    pub http_addr: SocketAddr,
    /// The public URL of that listener, as links in messages show it (e.g.
    /// `https://t.shop.example`).
    pub public_url: String,
    /// Key signing tracking and unsubscribe links; must be the same on every replica and
    /// survive restarts. Unset: a random one per process (links die with it; dev only).
    pub link_secret: Option<SecretString>,
    /// The providers, in failover order within each channel (see `channels::config`).
    pub providers: Vec<ProviderConfig>,
    /// Consumers of the request queue in this process, each handling its own batches.
    pub consumers: usize,
    /// Requests handled together (one ledger write per batch).
    pub batch: usize,
    /// Unacked requests the broker may push ahead.
    pub prefetch: u16,
    /// Provider calls in flight per batch.
    pub concurrency: usize,
    /// Finished sends written to the ledger together (at most; fewer when fewer are done):
    /// what a crash can leave in doubt besides the calls in flight.
    pub record_every: usize,
    /// Seconds a worker holds a message it is sending; after that another may take it.
    pub lease_secs: u64,
    /// Attempts before a temporary failure becomes FAILED.
    pub max_attempts: u32,
    /// First retry delay, in milliseconds; doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub retry_cap_ms: u64,
    /// Default wait for the recommendations of a products block, in milliseconds.
    pub products_timeout_ms: u64,
    /// Seconds between sweeps for messages whose retry or lease is overdue.
    pub sweep_every_secs: u64,
    /// How overdue, in seconds, before the sweeper republishes a message.
    pub sweep_grace_secs: u64,
    /// Days the ledger remembers messages (and so their idempotency keys).
    pub retention_days: u32,
}

impl Default for DeliveryConfig {
    fn default() -> DeliveryConfig {
        DeliveryConfig {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            public_url: "http://127.0.0.1:8080".into(),
            link_secret: None,
            providers: Vec::new(),
            consumers: 4,
            batch: 256,
            prefetch: 512,
            concurrency: 128,
            record_every: 32,
            lease_secs: 30,
            max_attempts: 6,
            retry_base_ms: 5_000,
            retry_cap_ms: 30 * 60 * 1000,
            products_timeout_ms: 50,
            sweep_every_secs: 15,
            sweep_grace_secs: 60,
            retention_days: 30,
        }
    }
}

impl DeliveryConfig {
    /// The first retry delay.
    pub fn retry_base(&self) -> Duration {
        Duration::from_millis(self.retry_base_ms.max(1))
    }

    /// The longest retry delay.
    pub fn retry_cap(&self) -> Duration {
        Duration::from_millis(self.retry_cap_ms.max(self.retry_base_ms).max(1))
    }

    /// The delayed queues: one per attempt, base × 2ⁿ up to the cap.
    pub fn retry_levels(&self) -> Vec<Duration> {
        let mut levels = Vec::new();
        let attempts = self.max_attempts.max(2);
        for attempt in 1..attempts {
            let delay = self
                .retry_base()
                .saturating_mul(1u32 << (attempt - 1).min(20))
                .min(self.retry_cap());
            if levels.last() != Some(&delay) {
                levels.push(delay);
            }
        }
        levels
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            anyhow::bail!("RELANCE_DELIVERY__PUBLIC_URL: must start with http:// or https://");
        }
        if self.batch == 0 || self.batch > 1000 {
            anyhow::bail!("RELANCE_DELIVERY__BATCH: must be 1 to 1000");
        }
        if self.max_attempts == 0 {
            anyhow::bail!("RELANCE_DELIVERY__MAX_ATTEMPTS: must be at least 1");
        }
        Ok(())
    }
}

/// Starts the delivery service: migrations, outbox relay, the request consumer, the
/// sweeper, the live inbox feed, the tracking HTTP listener and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let config: DeliveryConfig = platform.settings.section("delivery")?;
    config.check()?;
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let outbox_wake = Arc::new(Notify::new());
    let store = store::DeliveryStore::new(pool.clone(), outbox_wake.clone());

    let secret = match &config.link_secret {
        Some(secret) => secret.expose_secret().as_bytes().to_vec(),
        None => {
            tracing::warn!(
                "delivery.link_secret is not set: tracking links will not survive a restart"
            );
            uuid::Uuid::new_v4().as_bytes().to_vec()
        }
    };
    let links = Arc::new(LinkSigner::new(&secret, &config.public_url));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let providers = Arc::new(Providers::build(&config.providers, &http)?);
    tracing::info!(providers = ?providers, "delivery providers");
    let clients = clients::Clients::new(&platform.settings, platform.internal_key.clone())?;
    let sender = pipeline::Sender::new(
        store.clone(),
        clients.clone(),
        providers,
        links.clone(),
        platform.clock.clone(),
        config.clone(),
    );

    let publisher = Arc::new(Publisher::new(platform.bus.clone()));
    platform.spawn(
        "delivery-outbox",
        outbox::run_relay(
            pool.clone(),
            publisher,
            outbox_wake,
            platform.shutdown.clone(),
        ),
    );
    let retries = Arc::new(consumer::RetryPublisher::new(
        Arc::new(Publisher::new(platform.bus.clone())),
        config.retry_levels(),
    ));
    let handler = Arc::new(consumer::RequestHandler {
        sender: sender.clone(),
        store: store.clone(),
        clock: platform.clock.clone(),
        config: config.clone(),
        retries: retries.clone(),
    });
    // Several consumers on the queue: while one batch waits on profiles, recommendations or
    // providers, the next is being handled.
    for _ in 0..config.consumers.max(1) {
        platform
            .consume(
                "delivery-requests",
                consumer::spec(&config),
                handler.clone(),
            )
            .await?;
    }
    platform
        .consume(
            "delivery-opens",
            consumer::opens_spec(),
            Arc::new(consumer::OpensHandler {
                store: store.clone(),
            }),
        )
        .await?;
    platform.spawn(
        "delivery-sweeper",
        consumer::sweep_loop(
            store.clone(),
            retries,
            platform.clock.clone(),
            config.clone(),
            platform.shutdown.clone(),
        ),
    );
    let feed = feed::Feed::default();
    platform.spawn(
        "delivery-inbox-feed",
        feed::listen(pool, feed.clone(), platform.shutdown.clone()),
    );
    let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
    let tracking = http::Tracking {
        store: store.clone(),
        links,
        clients,
        clock: platform.clock.clone(),
        providers: Arc::new(config.providers.clone()),
        public_url: config.public_url.trim_end_matches('/').to_owned(),
    };
    tracing::info!(addr = %listener.local_addr()?, "tracking links listening");
    platform.spawn(
        "delivery-http",
        http::serve(listener, tracking, platform.shutdown.clone()),
    );
    server.add_service(DeliveryServer::new(api::DeliveryApi {
        store,
        sender,
        feed,
        clock: platform.clock.clone(),
        shutdown: platform.shutdown.clone(),
    }));
    Ok(())
}
