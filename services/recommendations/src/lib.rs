//! The recommendations service: which products to show a customer while they wait — on a
//! shop page or in a message.
//!
//! - API: [`api`] (proto ↔ domain)
//! - domain: [`domain`] (training, the blend and business rules, offline evaluation; pure)
//! - store: [`store`] (catalog, model versions and impressions in Postgres; the customers'
//!   recent history in Redis)
//! - serving: [`serving`] (the in-memory snapshots, swapped without a pause)
//! - background: [`consumer`] (history and catalog events), the snapshot refresh, the
//!   periodic training ([`training`]), the impression writer
#![forbid(unsafe_code)]

pub mod api;
pub mod consumer;
pub mod domain;
pub mod serving;
pub mod store;
pub mod training;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use relance_kit::cache::Cache;
use relance_kit::grpc::GrpcServer;
use relance_kit::{Platform, SharedClock};
use relance_proto::v1::recommendations_server::RecommendationsServer;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::domain::serve::{Blend, Placement, Rules};
use crate::domain::train::TrainOptions;
use crate::serving::Serving;
use crate::store::history::History;
use crate::store::{Impression, RecoStore};

/// Migrations of the `recommendations` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema this service owns.
pub const SCHEMA: &str = "recommendations";

/// A placement's shares, as configured.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BlendSettings {
    pub predicted: f64,
    pub trending: f64,
    pub explore: f64,
}

/// The `[recommendations]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RecommendationsSettings {
    /// Milliseconds between checks for a new model version or catalog change made by
    /// another replica.
    pub refresh_ms: u64,
    /// Hours between trainings of each workspace (0: only on demand).
    pub train_every_hours: f64,
    /// Days of events training reads.
    pub lookback_days: f64,
    /// EASE's λ and the neighbourhood size of the personal model.
    pub lambda: f64,
    pub neighbours: usize,
    /// Threads training may use.
    pub training_threads: usize,
    /// Memory the personal model's neighbourhood matrices may take at once, in MiB.
    pub training_memory_mib: usize,
    /// Half-life of trending counts, in days.
    pub trending_half_life_days: f64,
    /// History entries kept per customer (Redis) and read per request.
    pub history_limit: usize,
    /// Share of answers logged as impressions (0 to 1).
    pub impression_sample_rate: f64,
    /// Default "at most k items of one leaf category".
    pub max_per_category: usize,
    /// Items bought again by at least this share of their buyers count as replenishable.
    pub learned_replenishable_rate: f32,
    /// Shares by placement (`home`, `product`, `cart`, `checkout`, `category`, `email`,
    /// `push`, `in_app`, `whatsapp`); a placement left out uses its default.
    pub blend: HashMap<String, BlendSettings>,
}

impl Default for RecommendationsSettings {
    fn default() -> RecommendationsSettings {
        let personal = crate::domain::train::PersonalOptions::default();
        let rules = Rules::default();
        RecommendationsSettings {
            refresh_ms: 2_000,
            train_every_hours: 24.0,
            lookback_days: 365.0,
            lambda: personal.lambda,
            neighbours: personal.neighbours,
            training_threads: 2,
            training_memory_mib: 2_048,
            trending_half_life_days: TrainOptions::default().trending_half_life_days,
            history_limit: rules.history_limit,
            impression_sample_rate: 0.1,
            max_per_category: rules.max_per_category,
            learned_replenishable_rate: rules.learned_replenishable_rate,
            blend: HashMap::new(),
        }
    }
}

/// The default shares of a placement: 70/20/10 where the customer is the signal; the items
/// in view drive product, cart and checkout, with less exploration at checkout.
pub fn default_blend(placement: Placement) -> Blend {
    match placement {
        Placement::Checkout => Blend {
            predicted: 0.9,
            trending: 0.1,
            explore: 0.0,
        },
        Placement::Category => Blend {
            predicted: 0.7,
            trending: 0.3,
            explore: 0.0,
        },
        _ => Blend::DEFAULT,
    }
}

/// The validated configuration the API reads.
#[derive(Debug, Clone)]
pub struct RecommendationsConfig {
    pub settings: RecommendationsSettings,
    pub rules: Rules,
    pub train: TrainOptions,
    pub impression_sample_rate: f64,
    blends: HashMap<Placement, Blend>,
}

impl RecommendationsConfig {
    pub fn new(settings: RecommendationsSettings) -> anyhow::Result<RecommendationsConfig> {
        let mut blends = HashMap::new();
        for placement in Placement::ALL {
            blends.insert(placement, default_blend(placement));
        }
        for (name, shares) in &settings.blend {
            let Some(placement) = Placement::ALL.into_iter().find(|p| p.name() == name) else {
                anyhow::bail!("recommendations.blend.{name}: not a placement");
            };
            let blend = Blend {
                predicted: shares.predicted,
                trending: shares.trending,
                explore: shares.explore,
            };
            blend
                .validate()
                .map_err(|reason| anyhow::anyhow!("recommendations.blend.{name}: {reason}"))?;
            blends.insert(placement, blend);
        }
        if !(0.0..=1.0).contains(&settings.impression_sample_rate) {
            anyhow::bail!("recommendations.impression_sample_rate: must be between 0 and 1");
        }
        if settings.lambda <= 0.0 || settings.neighbours == 0 {
            anyhow::bail!("recommendations.lambda and recommendations.neighbours: must be above 0");
        }
        let rules = Rules {
            history_limit: settings.history_limit.max(1),
            max_per_category: settings.max_per_category.max(1),
            learned_replenishable_rate: settings.learned_replenishable_rate,
            ..Rules::default()
        };
        let train = TrainOptions {
            lookback_days: settings.lookback_days,
            trending_half_life_days: settings.trending_half_life_days,
            personal: crate::domain::train::PersonalOptions {
                lambda: settings.lambda,
                neighbours: settings.neighbours,
                ..Default::default()
            },
            threads: settings.training_threads.max(1),
            memory_budget_bytes: settings.training_memory_mib.max(16) << 20,
            ..TrainOptions::default()
        };
        Ok(RecommendationsConfig {
            impression_sample_rate: settings.impression_sample_rate,
            settings,
            rules,
            train,
            blends,
        })
    }

    pub fn blend(&self, placement: Placement) -> Blend {
        self.blends
            .get(&placement)
            .copied()
            .unwrap_or(Blend::DEFAULT)
    }
}

/// Connects what the service (or `relance reco train`) needs.
pub async fn connect(
    platform_settings: &relance_kit::Settings,
) -> anyhow::Result<(RecoStore, History, RecommendationsConfig)> {
    let settings: RecommendationsSettings = platform_settings.section("recommendations")?;
    let config = RecommendationsConfig::new(settings)?;
    let pool = relance_kit::db::connect(platform_settings, SCHEMA).await?;
    relance_kit::db::migrate(&pool, &MIGRATOR, SCHEMA).await?;
    let cache = connect_cache(platform_settings).await;
    let history = History::new(cache, config.rules.history_limit);
    Ok((RecoStore::new(pool), history, config))
}

async fn connect_cache(settings: &relance_kit::Settings) -> Option<Cache> {
    match Cache::connect(settings).await {
        Ok(cache) => Some(cache),
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "redis unreachable: recommendations will not be personal");
            None
        }
    }
}

/// Starts the recommendations service: migrations, snapshot load, consumer, refresh,
/// periodic training, impression writer, and the gRPC API.
pub async fn serve(platform: &Platform, server: &mut GrpcServer) -> anyhow::Result<()> {
    let settings: RecommendationsSettings = platform.settings.section("recommendations")?;
    let config = Arc::new(RecommendationsConfig::new(settings)?);
    let pool = platform.database(SCHEMA, &MIGRATOR).await?;
    let store = RecoStore::new(pool);
    let history = History::new(
        connect_cache(&platform.settings).await,
        config.rules.history_limit,
    );
    let serving = Arc::new(Serving::new());
    serving.refresh(&store, platform.clock.now()).await?;

    let catalog_changed = Arc::new(Notify::new());
    platform
        .consume(
            "recommendations-history",
            consumer::spec(),
            Arc::new(consumer::HistoryHandler {
                store: store.clone(),
                history: history.clone(),
                catalog_changed: catalog_changed.clone(),
            }),
        )
        .await?;
    platform.spawn(
        "recommendations-refresh",
        refresh_loop(
            store.clone(),
            serving.clone(),
            platform.clock.clone(),
            Duration::from_millis(config.settings.refresh_ms.max(50)),
            catalog_changed,
            platform.shutdown.clone(),
        ),
    );
    if config.settings.train_every_hours > 0.0 {
        platform.spawn(
            "recommendations-training",
            training_loop(
                store.clone(),
                history.clone(),
                serving.clone(),
                platform.clock.clone(),
                config.clone(),
                platform.shutdown.clone(),
            ),
        );
    }
    let (impressions, queue) = mpsc::channel(10_000);
    platform.spawn(
        "recommendations-impressions",
        impression_writer(store.clone(), queue, platform.shutdown.clone()),
    );
    server.add_service(RecommendationsServer::new(api::RecommendationsApi {
        store,
        history,
        serving,
        clock: platform.clock.clone(),
        config,
        impressions,
    }));
    Ok(())
}

/// Picks up model versions and catalog changes (from any replica).
async fn refresh_loop(
    store: RecoStore,
    serving: Arc<Serving>,
    clock: SharedClock,
    pause: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        if let Err(error) = serving.refresh(&store, clock.now()).await {
            tracing::warn!(%error, "snapshot refresh failed, keeping the loaded ones");
        }
    }
}

/// Retrains every workspace whose current model is older than the period.
async fn training_loop(
    store: RecoStore,
    history: History,
    serving: Arc<Serving>,
    clock: SharedClock,
    config: Arc<RecommendationsConfig>,
    shutdown: CancellationToken,
) {
    let period = chrono::Duration::seconds((config.settings.train_every_hours * 3600.0) as i64);
    // When each workspace was last tried, so that one without data is not retried every
    // minute.
    let mut attempted: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let workspaces = match store.known_workspaces().await {
            Ok(workspaces) => workspaces,
            Err(error) => {
                tracing::warn!(%error, "listing workspaces for training failed");
                continue;
            }
        };
        for workspace_id in workspaces {
            let now = clock.now();
            let trained_at = serving
                .get(&workspace_id)
                .and_then(|s| s.model.as_ref().map(|m| m.trained_at));
            let last = match (trained_at, attempted.get(&workspace_id)) {
                (Some(a), Some(b)) => Some(a.max(*b)),
                (a, b) => a.or(b.copied()),
            };
            if last.is_some_and(|last| now - last < period) {
                continue;
            }
            attempted.insert(workspace_id.clone(), now);
            let job = training::TrainJob {
                workspace_id: workspace_id.clone(),
                kinds: Vec::new(),
                lookback_days: config.train.lookback_days,
                cutoff: None,
                options: config.train.clone(),
                keep_current: false,
                seed_history: false,
            };
            match training::run(&store, &history, &serving, job, now).await {
                Ok(outcome) => {
                    tracing::info!(workspace = %workspace_id, version = outcome.record.version, "periodic training done");
                    if let Err(error) = serving.refresh(&store, clock.now()).await {
                        tracing::warn!(%error, "snapshot refresh after training failed");
                    }
                }
                Err(relance_kit::ApiError::Aborted(_)) => {}
                Err(relance_kit::ApiError::FailedPrecondition(reason)) => {
                    tracing::debug!(workspace = %workspace_id, %reason, "nothing to train on")
                }
                Err(error) => {
                    tracing::warn!(workspace = %workspace_id, %error, "periodic training failed")
                }
            }
        }
    }
}

/// Writes sampled impressions in batches; they are samples, so a full queue drops (and
/// counts) rather than slowing answers down.
async fn impression_writer(
    store: RecoStore,
    mut queue: mpsc::Receiver<Impression>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(500);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => {
                // Write what is already queued, then stop.
                while batch.len() < 10_000 {
                    match queue.try_recv() {
                        Ok(impression) => batch.push(impression),
                        Err(_) => break,
                    }
                }
                write_impressions(&store, &batch).await;
                return;
            }
            received = queue.recv_many(&mut batch, 500) => received,
        };
        if received == 0 {
            return;
        }
        write_impressions(&store, &batch).await;
        batch.clear();
    }
}

async fn write_impressions(store: &RecoStore, batch: &[Impression]) {
    if let Err(error) = store.record_impressions(batch).await {
        metrics::counter!("relance_recommendations_impressions_dropped_total")
            .increment(batch.len() as u64);
        tracing::warn!(%error, "writing impressions failed");
    }
}
