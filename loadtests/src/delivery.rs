//! `delivery`: messages per second through the delivery service's whole pipeline — the
//! `delivery.requests` queue → profile → products block (Recommend) → render → provider →
//! ledger — for push (the fake FCM) and e-mail (a real SMTP server, aiosmtpd), with the
//! queue-to-provider latency of every message, against two baselines measured in the same run:
//! the bus alone (the same envelopes through a consumer that only acks) and the fake provider
//! alone (the same number of FCM-shaped POSTs straight to it).
//!
//! Everything runs in this one process, as the services' tests do: profiles, events,
//! recommendations and delivery on `relance_kit::testing::TestApp` (its own database,
//! RabbitMQ prefix and Redis prefix, removed at the end), the fake providers and aiosmtpd.
//!
//! Each message's publish time travels in its `data.sent_at_ns` (wall clock, ns). The push
//! template copies it into the FCM `data` map, so the fake's recorded body gives it back with
//! the fake's receive `Instant`; the e-mail template puts it in the subject, and the SMTP
//! sink's file (written when the message is received) gives the receive time as its mtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use relance_delivery::fake::{FakeProviders, SmtpSink, start_smtp_server};
use relance_delivery::wire::Envelope;
use relance_kit::bus::{
    Bus, ConsumerSpec, DELIVERY_EXCHANGE, HandleError, Handler, Outgoing, Publisher, Received,
};
use relance_kit::testing::{TestApp, TestEnv, authed};
use relance_kit::{SharedClock, SystemClock};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::{self as pb, customer_ref};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::stats::Percentiles;

/// The exchange and queue of the bus baseline (beside the services', never bound to them).
const BASELINE_EXCHANGE: &str = "bench.baseline";
const BASELINE_QUEUE: &str = "bench.bus-baseline";
/// The fake FCM project the service sends to.
const FCM_PROJECT: &str = "bench";
/// SMTP connections, for delivery's provider and the sink's baseline alike.
const SMTP_CONNECTIONS: usize = 16;
const FIRST_NAMES: &[&str] = &[
    "Amina", "Yacine", "Lina", "Karim", "Sara", "Nassim", "Inès", "Walid", "Meriem", "Samir",
];

#[derive(Debug, Clone, clap::Args)]
pub struct DeliveryArgs {
    /// Customers created (with an Android push token, an e-mail address, push and e-mail
    /// opted in); messages go to them in turn.
    #[arg(long, default_value_t = 20_000)]
    pub customers: u32,
    /// Catalog items.
    #[arg(long, default_value_t = 2_000)]
    pub items: u32,
    /// `order_completed` events tracked before training.
    #[arg(long, default_value_t = 30_000)]
    pub orders: u32,
    /// Push messages published.
    #[arg(long, default_value_t = 50_000)]
    pub push: u32,
    /// E-mails published.
    #[arg(long, default_value_t = 10_000)]
    pub email: u32,
    /// Then pushes at this steady rate (messages/s), below capacity, for `--paced-secs`: the
    /// queue → provider latency of one message rather than a burst's drain time (0: skip).
    #[arg(long, default_value_t = 1_000)]
    pub push_rate: u32,
    /// How long the paced run publishes.
    #[arg(long, default_value_t = 20)]
    pub paced_secs: u32,
    /// The delivery service's batch (`delivery.batch`).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// The delivery consumer's prefetch (`delivery.prefetch`).
    #[arg(long, default_value_t = 1024)]
    pub prefetch: u16,
    /// Provider calls in flight per batch (`delivery.concurrency`).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Postgres connections per service pool (`database_max_connections`; 10 is the
    /// platform's default).
    #[arg(long, default_value_t = 10)]
    pub db_connections: u32,
    /// Envelopes per `publish_all` call.
    #[arg(long, default_value_t = 1_000)]
    pub publish_chunk: usize,
    /// Requests in flight in the fake-provider baseline.
    #[arg(long, default_value_t = 128)]
    pub fake_concurrency: usize,
    /// Calls in flight while creating customers.
    #[arg(long, default_value_t = 64)]
    pub setup_concurrency: usize,
    /// Longest wait for one measurement to finish, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Seed of the generated orders.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The services' log filter.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// The service's settings in the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    pub customers: u32,
    pub items: u32,
    pub orders: u32,
    pub batch: usize,
    pub prefetch: u16,
    pub concurrency: usize,
    pub db_connections: u32,
    pub publish_chunk: usize,
}

/// What the setup created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupSummary {
    pub customers: u32,
    pub items: u32,
    pub events_accepted: u64,
    /// The trained model's version; 0 when training failed.
    pub model_version: u64,
    /// Why training failed, when it did (products then come from the catalog's fallback).
    pub train_error: Option<String>,
    pub secs: f64,
}

/// One channel through the whole pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelRun {
    /// `push` or `email`.
    pub channel: String,
    /// Messages published.
    pub messages: u64,
    pub publish_secs: f64,
    pub publish_per_sec: f64,
    /// Messages the provider received.
    pub reached_provider: u64,
    /// First publish → the provider's last request.
    pub provider_secs: f64,
    /// `reached_provider / provider_secs`.
    pub per_sec: f64,
    /// First publish → every message terminal in the ledger (polled every 100 ms); `None`
    /// when that did not happen before the timeout.
    pub ledger_secs: Option<f64>,
    /// Ledger rows by `status/reason` at the end.
    pub ledger: BTreeMap<String, u64>,
    /// Publish → provider receive, per message.
    pub latency: Percentiles,
    /// Products blocks that fell back (Recommend timed out or failed), from the service's
    /// `relance_delivery_products_fallbacks_total`.
    pub products_fallbacks: u64,
}

/// A baseline: messages (or requests) and how fast they went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub what: String,
    pub messages: u64,
    pub secs: f64,
    pub per_sec: f64,
    /// Publish rate (bus baseline only).
    pub publish_per_sec: Option<f64>,
    pub concurrency: Option<usize>,
}

/// The `delivery` scenario's result (`--save`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryResult {
    pub scenario: String,
    pub config: BenchConfig,
    pub setup: SetupSummary,
    pub bus_baseline: Baseline,
    pub fake_baseline: Baseline,
    /// The SMTP sink alone (absent in results saved before it was measured).
    #[serde(default)]
    pub smtp_baseline: Option<Baseline>,
    pub runs: Vec<ChannelRun>,
    /// Busy CPU share of the machine while each measurement ran (`/proc/stat`), by name.
    pub cpu_busy: BTreeMap<String, f64>,
    /// Median milliseconds of single calls the pipeline makes, on the idle system.
    #[serde(default)]
    pub probes: BTreeMap<String, f64>,
}

impl DeliveryResult {
    pub fn line(&self) -> String {
        let mut lines = Vec::new();
        lines.push(self.bus_baseline.line());
        lines.push(self.fake_baseline.line());
        if let Some(smtp) = &self.smtp_baseline {
            lines.push(smtp.line());
        }
        for run in &self.runs {
            let mut line = run.line();
            if run.channel == "push" {
                let share = |base: f64| {
                    if base > 0.0 {
                        format!("{:.0}%", 100.0 * run.per_sec / base)
                    } else {
                        "–".to_owned()
                    }
                };
                line.push_str(&format!(
                    " ({} of the bus alone, {} of the fake alone)",
                    share(self.bus_baseline.per_sec),
                    share(self.fake_baseline.per_sec)
                ));
            }
            if run.channel == "email"
                && let Some(smtp) = &self.smtp_baseline
                && smtp.per_sec > 0.0
            {
                line.push_str(&format!(
                    " ({:.0}% of the SMTP sink alone)",
                    100.0 * run.per_sec / smtp.per_sec
                ));
            }
            lines.push(line);
        }
        lines.join("\n")
    }
}

impl Baseline {
    fn line(&self) -> String {
        let publish = self
            .publish_per_sec
            .map(|p| format!(" publish={p:.0}/s"))
            .unwrap_or_default();
        format!(
            "baseline {:<22} n={} elapsed={:.2}s throughput={:.0}/s{publish}",
            self.what, self.messages, self.secs, self.per_sec
        )
    }
}

impl ChannelRun {
    fn line(&self) -> String {
        let ledger = self
            .ledger_secs
            .map(|s| format!("{s:.2}s"))
            .unwrap_or_else(|| "incomplete".to_owned());
        format!(
            "delivery {:<5} n={} reached={} elapsed={:.2}s throughput={:.0} msgs/s publish={:.0}/s queue→provider p50={:.1}ms p99={:.1}ms p99.9={:.1}ms max={:.1}ms ledger complete={ledger} products fallbacks={}",
            self.channel,
            self.messages,
            self.reached_provider,
            self.provider_secs,
            self.per_sec,
            self.publish_per_sec,
            self.latency.p50,
            self.latency.p99,
            self.latency.p999,
            self.latency.max,
            self.products_fallbacks,
        )
    }
}

// --- Clocks -----------------------------------------------------------------------------

/// Wall-clock nanoseconds now.
fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Maps `Instant`s to wall-clock nanoseconds (taken together once).
#[derive(Debug, Clone, Copy)]
struct Anchor {
    instant: Instant,
    wall: i128,
}

impl Anchor {
    fn now() -> Anchor {
        Anchor {
            instant: Instant::now(),
            wall: wall_ns(),
        }
    }

    fn wall_of(&self, at: Instant) -> i128 {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.wall + after.as_nanos() as i128,
            None => self.wall - self.instant.duration_since(at).as_nanos() as i128,
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 10 minutes (a burst's tail outlives the
/// 60 s of the other scenarios' histograms).
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn record_ns(histogram: &mut Histogram<u64>, nanos: i128) {
    let micros = u64::try_from((nanos / 1000).max(1)).unwrap_or(u64::MAX);
    histogram.saturating_record(micros);
}

/// Busy share of all CPUs between two `/proc/stat` readings.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 5 {
        return None;
    }
    let idle = values[3] + values[4];
    let total: u64 = values.iter().take(8).sum();
    Some((total, idle))
}

fn busy_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    let (Some((t0, i0)), Some((t1, i1))) = (before, after) else {
        return 0.0;
    };
    let total = t1.saturating_sub(t0);
    if total == 0 {
        return 0.0;
    }
    100.0 * (total - i1.saturating_sub(i0).min(total)) as f64 / total as f64
}

// --- The services -----------------------------------------------------------------------

struct Bench {
    app: TestApp,
    channels: Vec<Channel>,
    fake: FakeProviders,
    smtp: SmtpSink,
    /// Where the SMTP sink may be writing (`relance-smtp-*` directories that appeared when it
    /// started); the one with the most messages is ours.
    smtp_dirs: Vec<PathBuf>,
    pool: sqlx::PgPool,
    publisher: Publisher,
    metrics: Metrics,
    anchor: Anchor,
    _telemetry: relance_kit::telemetry::TelemetryGuard,
}

/// The process's Prometheus recorder (installed as `relance serve` does).
struct Metrics(Box<dyn Fn() -> String + Send + Sync>);

impl Metrics {
    /// The value of a counter without labels, 0 when absent.
    fn counter(&self, name: &str) -> u64 {
        let text = (self.0)();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            if parts.next() == Some(name)
                && let Some(value) = parts.next().and_then(|v| v.parse::<f64>().ok())
            {
                return value as u64;
            }
        }
        0
    }
}

fn free_port() -> anyhow::Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(probe.local_addr()?.port())
}

fn smtp_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return dirs;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("relance-smtp-")
        {
            dirs.push(entry.path());
        }
    }
    dirs
}

async fn start(args: &DeliveryArgs) -> anyhow::Result<Bench> {
    let anchor = Anchor::now();
    let fake = FakeProviders::start().await?;
    let before = smtp_dirs();
    let smtp = start_smtp_server().await.context("starting aiosmtpd")?;
    let smtp_dirs: Vec<PathBuf> = smtp_dirs()
        .into_iter()
        .filter(|dir| !before.contains(dir))
        .collect();
    let env = Arc::new(TestEnv::new().await);
    let http_port = free_port()?;
    let toml = format!(
        r#"
[delivery]
http_addr = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
link_secret = "bench-link-secret"
batch = {batch}
prefetch = {prefetch}
concurrency = {concurrency}

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "{FCM_PROJECT}"
access_token = "fcm-bench-token"

[[delivery.providers]]
name = "smtp"
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from_address = "news@shop.example"
from_name = "Shop"
max_in_flight = {SMTP_CONNECTIONS}

[recommendations]
train_every_hours = 0
"#,
        batch = args.batch,
        prefetch = args.prefetch,
        concurrency = args.concurrency,
        base = fake.base_url(),
        smtp_port = smtp.port(),
    );
    let settings = env
        .settings
        .with_toml(&toml)
        .context("the bench settings")?
        .with(&[
            (
                "database_max_connections",
                args.db_connections.to_string().as_str(),
            ),
            ("log_level", args.log_level.as_str()),
        ])
        .context("the bench settings")?;
    // Logs and trace ids as `relance serve` has them (their cost is part of the pipeline's).
    let telemetry = relance_kit::telemetry::init(&settings, "relance-loadtest")?;
    let handle = relance_kit::metrics::recorder();
    let metrics = Metrics(Box::new(move || handle.render()));
    let database_url = env.database_url();
    let clock: SharedClock = Arc::new(SystemClock);
    let app = TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_recommendations::serve(platform, server).await?;
                relance_delivery::serve(platform, server).await
            })
        }),
    )
    .await;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(app.channel().await);
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .context("connecting to the bench database")?;
    let publisher = Publisher::new(app.platform.bus.clone());
    Ok(Bench {
        app,
        channels,
        fake,
        smtp,
        smtp_dirs,
        pool,
        publisher,
        metrics,
        anchor,
        _telemetry: telemetry,
    })
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn customer_id(index: u32) -> String {
    format!("c{index:06}")
}

fn item_id(index: u32) -> String {
    format!("p{index:05}")
}

impl Bench {
    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        authed(&self.app.admin_key, message)
    }

    fn channel(&self, index: usize) -> Channel {
        self.channels[index % self.channels.len()].clone()
    }

    // --- Setup --------------------------------------------------------------------------

    async fn setup(&self, args: &DeliveryArgs) -> anyhow::Result<SetupSummary> {
        let started = Instant::now();
        self.customers(args).await?;
        println!(
            "setup: {} customers in {:.1}s",
            args.customers,
            started.elapsed().as_secs_f64()
        );
        self.catalog(args.items).await?;
        let events_accepted = self.orders(args).await?;
        println!(
            "setup: {} items, {events_accepted} order_completed events",
            args.items
        );
        let mut reco = RecommendationsClient::new(self.channel(0));
        let trained = reco
            .train(self.admin(pb::TrainRequest::default()))
            .await
            .map(|r| r.into_inner());
        let (model_version, train_error) = match trained {
            Ok(response) => (response.model.map(|m| m.version).unwrap_or(0), None),
            Err(status) => (
                0,
                Some(format!("{:?}: {}", status.code(), status.message())),
            ),
        };
        match &train_error {
            None => println!("setup: model v{model_version} trained"),
            Some(error) => println!(
                "setup: training failed ({error}); products come from the catalog's fallback"
            ),
        }
        self.save_templates().await?;
        self.quiesce().await;
        Ok(SetupSummary {
            customers: args.customers,
            items: args.items,
            events_accepted,
            model_version,
            train_error,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    async fn customers(&self, args: &DeliveryArgs) -> anyhow::Result<()> {
        let admin = self.app.admin_key.clone();
        let calls = futures::stream::iter(0..args.customers)
            .map(|index| {
                let mut profiles = ProfilesClient::new(self.channel(index as usize));
                let admin = admin.clone();
                async move {
                    let id = customer_id(index);
                    let first_name = FIRST_NAMES[index as usize % FIRST_NAMES.len()];
                    let upsert = pb::UpsertProfileRequest {
                        customer: customer(&id),
                        attributes: Some(json_to_struct(
                            &serde_json::json!({ "first_name": first_name }),
                        )),
                        email: Some(format!("{id}@example.com")),
                        push_tokens: vec![pb::PushToken {
                            token: format!("android-token-{id}"),
                            platform: pb::PushPlatform::Android as i32,
                            app_id: "com.shop.app".into(),
                            updated_at: None,
                        }],
                        locale: Some("en".into()),
                        ..Default::default()
                    };
                    profiles
                        .upsert(authed(&admin, upsert))
                        .await
                        .with_context(|| format!("upserting {id}"))?;
                    for channel in [pb::Channel::Push, pb::Channel::Email] {
                        let request = pb::SetConsentRequest {
                            customer: customer(&id),
                            consent: Some(pb::Consent {
                                channel: channel as i32,
                                topic: String::new(),
                                status: pb::ConsentStatus::OptedIn as i32,
                                updated_at: None,
                                source: "bench".into(),
                            }),
                        };
                        profiles
                            .set_consent(authed(&admin, request))
                            .await
                            .with_context(|| format!("consent of {id}"))?;
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(args.setup_concurrency.max(1));
        let mut calls = std::pin::pin!(calls);
        while let Some(result) = calls.next().await {
            result?;
        }
        Ok(())
    }

    async fn catalog(&self, items: u32) -> anyhow::Result<()> {
        let mut reco = RecommendationsClient::new(self.channel(0));
        let all: Vec<u32> = (0..items).collect();
        for chunk in all.chunks(1000) {
            let mut batch = Vec::with_capacity(chunk.len());
            for &index in chunk {
                let id = item_id(index);
                batch.push(pb::CatalogItem {
                    id: id.clone(),
                    title: format!("Product {index}"),
                    category_path: vec!["Home".into(), format!("Category {}", index % 40)],
                    brand: format!("Brand {}", index % 25),
                    price: 5.0 + f64::from(index % 200),
                    currency: "EUR".into(),
                    in_stock: true,
                    url: format!("https://shop.example/p/{id}"),
                    image_url: format!("https://cdn.shop.example/{id}.jpg"),
                    ..Default::default()
                });
            }
            let response = reco
                .upsert_items(self.admin(pb::UpsertItemsRequest { items: batch }))
                .await
                .context("UpsertItems")?
                .into_inner();
            if !response.rejected.is_empty() {
                anyhow::bail!("UpsertItems refused items: {:?}", response.rejected.first());
            }
        }
        Ok(())
    }

    async fn orders(&self, args: &DeliveryArgs) -> anyhow::Result<u64> {
        let mut events = EventsClient::new(self.channel(1));
        let mut rng = StdRng::seed_from_u64(args.seed);
        let now = self.app.platform.clock.now().timestamp();
        let mut accepted = 0u64;
        let mut sent = 0u32;
        while sent < args.orders {
            let size = (args.orders - sent).min(1000);
            let mut batch = Vec::with_capacity(size as usize);
            for n in sent..sent + size {
                let customer = rng.random_range(0..args.customers.max(1));
                // Popular items first: a square skews draws toward low ids.
                let lines = rng.random_range(1..=4);
                let mut items = Vec::with_capacity(lines);
                let mut revenue = 0.0;
                for _ in 0..lines {
                    let draw: f64 = rng.random();
                    let item = ((draw * draw) * f64::from(args.items.max(1))) as u32;
                    let price = 5.0 + f64::from(item % 200);
                    revenue += price;
                    items.push(serde_json::json!({
                        "product_id": item_id(item),
                        "quantity": 1,
                        "price": price,
                    }));
                }
                let at = now - rng.random_range(60..60 * 86_400);
                batch.push(pb::Event {
                    message_id: format!("bench-order-{n}"),
                    name: "order_completed".into(),
                    customer_id: customer_id(customer),
                    timestamp: Some(prost_types::Timestamp {
                        seconds: at,
                        nanos: 0,
                    }),
                    properties: Some(json_to_struct(&serde_json::json!({
                        "order_id": format!("o{n}"),
                        "revenue": revenue,
                        "currency": "EUR",
                        "items": items,
                    }))),
                    ..Default::default()
                });
            }
            let response = events
                .track_batch(self.admin(pb::TrackBatchRequest { events: batch }))
                .await
                .context("TrackBatch")?
                .into_inner();
            accepted += u64::from(response.accepted);
            sent += size;
        }
        Ok(accepted)
    }

    async fn save_templates(&self) -> anyhow::Result<()> {
        let mut delivery = DeliveryClient::new(self.channel(0));
        let products = |placement: pb::Placement| pb::TemplateProducts {
            placement: placement as i32,
            n: 3,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 50_000_000,
            }),
            fallback: pb::ProductsFallback::Trending as i32,
            ..Default::default()
        };
        let sample = json_to_struct(&serde_json::json!({
            "customer": {"first_name": "Amina"},
            "data": {"sent_at_ns": "1700000000000000000"},
            "products": [
                {"id": "p00001", "title": "Product 1", "url": "https://shop.example/p/p00001",
                 "image_url": "https://cdn.shop.example/p00001.jpg", "price": 6.0, "currency": "EUR"},
            ],
        }));
        let push = pb::MessageContent {
            push: Some(pb::PushContent {
                title: "{{ customer.first_name }}, picked for you".into(),
                body: "{{ products[0].title }} and more in the shop".into(),
                url: "https://shop.example/for-you".into(),
                data: [("sent_at_ns".to_owned(), "{{ data.sent_at_ns }}".to_owned())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let email = pb::MessageContent {
            email: Some(pb::EmailContent {
                subject: "{{ customer.first_name }}, picked for you #{{ data.sent_at_ns }}".into(),
                html: "<html><body><p>Hello {{ customer.first_name | default: \"there\" }},</p>\
                       <p>Picked for you this week:</p><table>\
                       {% for p in products %}<tr>\
                       <td><a href=\"{{ p.url }}\"><img src=\"{{ p.image_url }}\" alt=\"{{ p.title }}\" width=\"120\"></a></td>\
                       <td><a href=\"{{ p.url }}\">{{ p.title }}</a><br>{{ p.price }} {{ p.currency }}</td>\
                       </tr>{% endfor %}</table>\
                       <p><a href=\"https://shop.example/new\">See what is new</a></p></body></html>"
                    .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let templates = [
            ("bench-push", push.clone(), pb::Placement::Push),
            ("bench-push-paced", push, pb::Placement::Push),
            ("bench-email", email, pb::Placement::Email),
        ];
        for (name, content, placement) in templates {
            let template = pb::Template {
                name: name.into(),
                default_locale: "en".into(),
                variants: vec![pb::TemplateVariant {
                    locale: "en".into(),
                    direction: 0,
                    content: Some(content),
                }],
                products: Some(products(placement)),
                sample_data: Some(sample.clone()),
                ..Default::default()
            };
            let request = pb::UpsertTemplateRequest {
                template: Some(template),
                dry_run: false,
            };
            delivery
                .upsert_template(self.admin(request))
                .await
                .with_context(|| format!("saving template {name}"))?;
        }
        Ok(())
    }

    /// Waits (at most 120 s) until the services' consumers have nothing waiting, so that one
    /// step's backlog does not run into the next measurement.
    async fn quiesce(&self) {
        let queues = [
            "events.ingest",
            "events.identity",
            "profiles.traits",
            "recommendations.history",
            relance_delivery::wire::REQUESTS_QUEUE,
        ];
        let deadline = Instant::now() + Duration::from_secs(120);
        let bus: &Bus = &self.app.platform.bus;
        loop {
            let mut waiting = 0u64;
            for queue in queues {
                waiting += u64::from(bus.queue_depth(queue).await.unwrap_or(0));
            }
            if waiting == 0 {
                break;
            }
            if Instant::now() > deadline {
                println!("note: {waiting} messages still queued after 120 s; going on");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The last messages taken are being handled: let them finish.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// Times, one at a time on the idle system, the calls a batch makes to other services:
    /// what one batch of the pipeline waits for at least.
    async fn probes(&self, args: &DeliveryArgs) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut probes = BTreeMap::new();
        let mut profiles = ProfilesClient::new(self.channel(0));
        let batch = args.batch.clamp(1, 500);
        let mut times = Vec::new();
        for round in 0..5 {
            let mut customers = Vec::with_capacity(batch);
            for n in 0..batch {
                let index = (round * batch + n) as u32 % args.customers.max(1);
                customers.push(pb::CustomerRef {
                    id: Some(customer_ref::Id::CustomerId(customer_id(index))),
                });
            }
            let started = Instant::now();
            profiles
                .batch_get(self.admin(pb::BatchGetProfilesRequest { customers }))
                .await
                .context("BatchGet")?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        probes.insert(
            format!("profiles BatchGet of {batch} customers"),
            crate::stats::median(&times),
        );
        let mut reco = RecommendationsClient::new(self.channel(0));
        for details in [false, true] {
            let mut times = Vec::new();
            for n in 0..50u32 {
                let request = pb::RecommendRequest {
                    customer: customer(&customer_id(n * 7 % args.customers.max(1))),
                    placement: pb::Placement::Push as i32,
                    n: 3,
                    include_details: details,
                    ..Default::default()
                };
                let started = Instant::now();
                reco.recommend(self.admin(request))
                    .await
                    .context("Recommend")?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            let label = if details {
                "Recommend, push placement, 3 items, with details"
            } else {
                "Recommend, push placement, 3 items, without details"
            };
            probes.insert(label.to_owned(), crate::stats::median(&times));
        }
        // The catalog read alone, through the same server stack: is the cost of details the
        // query or the way the answer travels?
        let mut times = Vec::new();
        for n in 0..50u32 {
            let ids = (0..3)
                .map(|k| item_id((n * 3 + k) % args.items.max(1)))
                .collect();
            let started = Instant::now();
            reco.get_items(self.admin(pb::GetItemsRequest { ids }))
                .await
                .context("GetItems")?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        probes.insert(
            "Recommendations.GetItems of 3 items".to_owned(),
            crate::stats::median(&times),
        );
        Ok(probes)
    }

    // --- Publishing ---------------------------------------------------------------------

    /// A send request as campaigns would publish it.
    fn envelope(&self, channel: pb::Channel, key: &str, index: u32, customers: u32) -> Outgoing {
        let (template, _) = template_of(channel, key.starts_with("push-paced"));
        let request = pb::SendRequest {
            idempotency_key: key.to_owned(),
            customer: customer(&customer_id(index % customers.max(1))),
            channels: vec![channel as i32],
            content: Some(pb::send_request::Content::Template(template.into())),
            topic: "marketing".into(),
            kind: pb::MessageKind::Marketing as i32,
            data: Some(json_to_struct(
                &serde_json::json!({ "sent_at_ns": wall_ns().to_string() }),
            )),
            ..Default::default()
        };
        let envelope = Envelope::new(&self.app.workspace, &request);
        Outgoing {
            exchange: DELIVERY_EXCHANGE.into(),
            routing_key: Envelope::routing_key(&request).into(),
            message_id: Envelope::message_id(&self.app.workspace, &request),
            payload: serde_json::to_vec(&envelope).unwrap_or_default(),
            headers: BTreeMap::new(),
        }
    }

    /// Publishes `count` requests in chunks, as fast as confirms allow; returns when the first
    /// chunk went and how long it all took.
    async fn publish(
        &self,
        channel: pb::Channel,
        prefix: &str,
        count: u32,
        pace: Pace,
        customers: u32,
        exchange: &str,
    ) -> anyhow::Result<(Instant, Duration)> {
        // Paced: a chunk every 20 ms, each at its due time (not after the previous one), so
        // the rate holds even when a publish is slow.
        let (chunk, tick) = match pace {
            Pace::Rate(rate) => (
                ((rate / 50).max(1)) as usize,
                Some(Duration::from_millis(20)),
            ),
            Pace::Burst(chunk) => (chunk, None),
        };
        let mut first = None;
        let mut next = 0u32;
        let mut round = 0u32;
        while next < count {
            if let (Some(tick), Some(start)) = (tick, first) {
                let due: Instant = start + tick * round;
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep(due - now).await;
                }
            }
            round += 1;
            let size = (count - next).min(chunk.max(1) as u32);
            let mut messages = Vec::with_capacity(size as usize);
            for index in next..next + size {
                let mut message =
                    self.envelope(channel, &format!("{prefix}-{index}"), index, customers);
                message.exchange = exchange.to_owned();
                messages.push(message);
            }
            first.get_or_insert_with(Instant::now);
            self.publisher
                .publish_all(&messages)
                .await
                .context("publishing send requests")?;
            next += size;
        }
        let first = first.unwrap_or_else(Instant::now);
        Ok((first, first.elapsed()))
    }

    // --- Baselines ----------------------------------------------------------------------

    /// The bus alone: the same envelopes through a consumer of the same kind (quorum queue,
    /// prefetch, batches) whose handler only counts.
    async fn bus_baseline(&self, args: &DeliveryArgs) -> anyhow::Result<Baseline> {
        let mut spec = ConsumerSpec::new(BASELINE_QUEUE).bind(BASELINE_EXCHANGE, "#");
        spec.prefetch = args.prefetch;
        let bus = self.app.platform.bus.clone();
        relance_kit::bus::declare(&bus, &spec).await?;
        let counter = Arc::new(Counter {
            count: AtomicU64::new(0),
            last: Mutex::new(None),
            batch: args.batch,
        });
        let stop = CancellationToken::new();
        let consumer = tokio::spawn(relance_kit::bus::run_consumer(
            bus,
            spec,
            counter.clone(),
            stop.clone(),
        ));
        let target = u64::from(args.push);
        let (first, publish) = self
            .publish(
                pb::Channel::Push,
                "bus",
                args.push,
                Pace::Burst(args.publish_chunk),
                args.customers,
                BASELINE_EXCHANGE,
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        while counter.count.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let _ = consumer.await;
        let consumed = counter.count.load(Ordering::Relaxed);
        let last = counter
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(first);
        let secs = last.duration_since(first).as_secs_f64().max(1e-9);
        Ok(Baseline {
            what: "bus alone".into(),
            messages: consumed,
            secs,
            per_sec: consumed as f64 / secs,
            publish_per_sec: Some(f64::from(args.push) / publish.as_secs_f64().max(1e-9)),
            concurrency: None,
        })
    }

    /// The SMTP sink alone: the same number of e-mails sent straight to it with lettre,
    /// over as many pooled connections as delivery's SMTP provider uses.
    async fn smtp_baseline(&self, args: &DeliveryArgs) -> anyhow::Result<Baseline> {
        use lettre::AsyncTransport as _;
        let connections = SMTP_CONNECTIONS;
        let transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
                .port(self.smtp.port())
                .pool_config(
                    lettre::transport::smtp::PoolConfig::new().max_size(connections as u32),
                )
                .build();
        let started = Instant::now();
        let sends = futures::stream::iter(0..args.email)
            .map(|index| {
                let transport = transport.clone();
                async move {
                    let message = lettre::Message::builder()
                        .from("Shop <news@shop.example>".parse()?)
                        .to(
                            format!("{}@example.com", customer_id(index % args.customers.max(1)))
                                .parse()?,
                        )
                        .subject("baseline")
                        .multipart(lettre::message::MultiPart::alternative_plain_html(
                            "Picked for you".to_owned(),
                            "<p>Picked for you</p>".to_owned(),
                        ))?;
                    transport.send(message).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(connections);
        let mut sends = std::pin::pin!(sends);
        let mut done = 0u64;
        while let Some(result) = sends.next().await {
            result?;
            done += 1;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok(Baseline {
            what: "SMTP sink alone".into(),
            messages: done,
            secs,
            per_sec: done as f64 / secs,
            publish_per_sec: None,
            concurrency: Some(connections),
        })
    }

    /// The fake provider alone: FCM-shaped POSTs straight to it, `fake_concurrency` in flight.
    async fn fake_baseline(&self, args: &DeliveryArgs) -> anyhow::Result<Baseline> {
        self.fake.clear();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        let url = format!(
            "{}/v1/projects/{FCM_PROJECT}/messages:send",
            self.fake.base_url()
        );
        let started = Instant::now();
        let calls = futures::stream::iter(0..args.push)
            .map(|index| {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let id = customer_id(index % args.customers.max(1));
                    let body = serde_json::json!({
                        "message": {
                            "token": format!("android-token-{id}"),
                            "notification": {
                                "title": "Amina, picked for you",
                                "body": "Product 12 and more in the shop",
                            },
                            "data": {
                                "sent_at_ns": wall_ns().to_string(),
                                "relance_message_id": uuid::Uuid::now_v7().to_string(),
                                "topic": "marketing",
                                "url": "http://127.0.0.1:8080/c/ws-bench/0190f0f0-0000-7000-8000-000000000000/aHR0cHM6Ly9zaG9wLmV4YW1wbGUvZm9yLXlvdQ.sig",
                            },
                            "android": { "ttl": "86400s" },
                        }
                    });
                    let response = http
                        .post(&url)
                        .bearer_auth("fcm-bench-token")
                        .json(&body)
                        .send()
                        .await?;
                    let status = response.status();
                    let _ = response.bytes().await?;
                    if !status.is_success() {
                        anyhow::bail!("the fake answered {status}");
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(args.fake_concurrency.max(1));
        let mut calls = std::pin::pin!(calls);
        let mut done = 0u64;
        while let Some(result) = calls.next().await {
            result?;
            done += 1;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        self.fake.clear();
        Ok(Baseline {
            what: "fake provider alone".into(),
            messages: done,
            secs,
            per_sec: done as f64 / secs,
            publish_per_sec: None,
            concurrency: Some(args.fake_concurrency),
        })
    }

    // --- The pipeline -------------------------------------------------------------------

    async fn ledger(&self, template: &str) -> anyhow::Result<(u64, BTreeMap<String, u64>)> {
        let rows: Vec<(i16, i16, i64)> = sqlx::query_as(
            "SELECT status, reason, count(*) FROM delivery.messages WHERE template = $1 \
             GROUP BY status, reason",
        )
        .bind(template)
        .fetch_all(&self.pool)
        .await
        .context("counting the ledger")?;
        let mut terminal = 0u64;
        let mut by_status = BTreeMap::new();
        for (status, reason, count) in rows {
            let count = u64::try_from(count).unwrap_or(0);
            // SENT, DELIVERED, FAILED, SKIPPED.
            if (2..=5).contains(&status) {
                terminal += count;
            }
            let status_name = pb::MessageStatus::try_from(i32::from(status))
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("MESSAGE_STATUS_")
                        .to_owned()
                })
                .unwrap_or_else(|_| format!("status {status}"));
            let label = if reason == 0 {
                status_name
            } else {
                let reason_name = pb::MessageReason::try_from(i32::from(reason))
                    .map(|r| {
                        r.as_str_name()
                            .trim_start_matches("MESSAGE_REASON_")
                            .to_owned()
                    })
                    .unwrap_or_else(|_| format!("reason {reason}"));
                format!("{status_name}/{reason_name}")
            };
            by_status.insert(label, count);
        }
        Ok((terminal, by_status))
    }

    /// Messages the provider of `channel` has received so far.
    fn reached(&self, channel: pb::Channel) -> u64 {
        match channel {
            pb::Channel::Email => self.email_files().len() as u64,
            _ => self.fake.count(),
        }
    }

    /// The SMTP sink's message files (ours: the candidate directory with the most).
    fn email_files(&self) -> Vec<PathBuf> {
        let mut best: Vec<PathBuf> = Vec::new();
        for dir in &self.smtp_dirs {
            let Ok(entries) = std::fs::read_dir(dir.join("mail")) else {
                continue;
            };
            let files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|ext| ext == "eml"))
                .collect();
            if files.len() > best.len() {
                best = files;
            }
        }
        best
    }

    async fn run_channel(
        &self,
        channel: pb::Channel,
        count: u32,
        args: &DeliveryArgs,
        rate: Option<u32>,
    ) -> anyhow::Result<ChannelRun> {
        let (template, name) = template_of(channel, rate.is_some());
        self.fake.clear();
        self.fake.record_bodies(true);
        let fallbacks_before = self
            .metrics
            .counter("relance_delivery_products_fallbacks_total");
        let (first, publish) = self
            .publish(
                channel,
                name,
                count,
                match rate {
                    Some(rate) => Pace::Rate(rate),
                    None => Pace::Burst(args.publish_chunk),
                },
                args.customers,
                DELIVERY_EXCHANGE,
            )
            .await?;
        let target = u64::from(count);
        let deadline = first + Duration::from_secs(args.timeout_secs);
        let mut ledger_secs = None;
        let mut last_progress = (0u64, 0u64, Instant::now());
        loop {
            let reached = self.reached(channel);
            let (terminal, _) = self.ledger(template).await?;
            if ledger_secs.is_none() && terminal >= target {
                ledger_secs = Some(first.elapsed().as_secs_f64());
            }
            if ledger_secs.is_some() && reached >= target {
                break;
            }
            if (reached, terminal) != (last_progress.0, last_progress.1) {
                last_progress = (reached, terminal, Instant::now());
            } else if last_progress.2.elapsed() > Duration::from_secs(60) {
                println!(
                    "note: {name}: no progress for 60 s ({reached} at the provider, {terminal} terminal); stopping"
                );
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "note: {name}: timed out ({reached} at the provider, {terminal} terminal of {target})"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, ledger) = self.ledger(template).await?;
        let products_fallbacks = self
            .metrics
            .counter("relance_delivery_products_fallbacks_total")
            .saturating_sub(fallbacks_before);
        let first_wall = self.anchor.wall_of(first);
        let mut latency = histogram()?;
        let mut last_wall = first_wall;
        let mut reached = 0u64;
        let mut unmatched = 0u64;
        if channel == pb::Channel::Email {
            for path in self.email_files() {
                let received = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos() as i128);
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                match (received, sent_at_in_subject(&text)) {
                    (Some(received), Some(sent)) => {
                        reached += 1;
                        last_wall = last_wall.max(received);
                        record_ns(&mut latency, received - sent);
                    }
                    _ => unmatched += 1,
                }
            }
        } else {
            let path = format!("/v1/projects/{FCM_PROJECT}/messages:send");
            for request in self.fake.requests_for(&path) {
                let received = self.anchor.wall_of(request.received);
                let body = request.json();
                let sent = body["message"]["data"]["sent_at_ns"]
                    .as_str()
                    .and_then(|v| v.parse::<i128>().ok());
                match sent {
                    Some(sent) => {
                        reached += 1;
                        last_wall = last_wall.max(received);
                        record_ns(&mut latency, received - sent);
                    }
                    None => unmatched += 1,
                }
            }
            self.fake.clear();
        }
        if unmatched > 0 {
            println!("note: {name}: {unmatched} provider requests without a readable sent_at_ns");
        }
        let provider_secs = ((last_wall - first_wall) as f64 / 1e9).max(1e-9);
        Ok(ChannelRun {
            channel: name.into(),
            messages: target,
            publish_secs: publish.as_secs_f64(),
            publish_per_sec: target as f64 / publish.as_secs_f64().max(1e-9),
            reached_provider: reached,
            provider_secs,
            per_sec: reached as f64 / provider_secs,
            ledger_secs,
            ledger,
            latency: Percentiles::of(&latency),
            products_fallbacks,
        })
    }
}

/// How requests are published.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// As fast as the broker confirms, in chunks of this many.
    Burst(usize),
    /// At this many per second.
    Rate(u32),
}

/// The template and the short name of a channel's run (the paced push run has its own
/// template, so that its ledger rows are counted apart).
fn template_of(channel: pb::Channel, paced: bool) -> (&'static str, &'static str) {
    match channel {
        pb::Channel::Email => ("bench-email", "email"),
        _ if paced => ("bench-push-paced", "push-paced"),
        _ => ("bench-push", "push"),
    }
}

/// The `#<ns>` the e-mail template puts at the end of the subject.
fn sent_at_in_subject(message: &str) -> Option<i128> {
    for line in message.lines() {
        let Some(subject) = line.strip_prefix("Subject:") else {
            continue;
        };
        let (_, digits) = subject.trim().rsplit_once('#')?;
        return digits.trim().parse().ok();
    }
    None
}

/// Counts what the bus baseline's consumer takes, and when it took the last.
struct Counter {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
    batch: usize,
}

impl Counter {
    fn take(&self, n: usize) {
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

impl Handler for Counter {
    fn handle<'a>(&'a self, _message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            self.take(1);
            Ok(())
        })
    }

    fn max_batch(&self) -> usize {
        self.batch.max(1)
    }

    fn handle_batch<'a>(
        &'a self,
        messages: &'a [Received<'a>],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            self.take(messages.len());
            Ok(())
        })
    }
}

/// Runs the whole scenario.
pub async fn run(args: &DeliveryArgs) -> anyhow::Result<DeliveryResult> {
    let bench = start(args).await?;
    println!(
        "services up (workspace {}, fake providers at {}, smtp on port {})",
        bench.app.workspace,
        bench.fake.base_url(),
        bench.smtp.port()
    );
    bench.fake.record_bodies(true);
    let setup = bench.setup(args).await?;
    println!("setup done in {:.1}s", setup.secs);
    let probes = bench.probes(args).await?;
    for (what, ms) in &probes {
        println!("probe: {what}: {ms:.2} ms (median)");
    }
    let mut cpu_busy = BTreeMap::new();

    let before = cpu_times();
    let bus_baseline = bench.bus_baseline(args).await?;
    cpu_busy.insert("bus alone".to_owned(), busy_share(before, cpu_times()));
    println!("{}", bus_baseline.line());
    bench.quiesce().await;

    let before = cpu_times();
    let fake_baseline = bench.fake_baseline(args).await?;
    cpu_busy.insert(
        "fake provider alone".to_owned(),
        busy_share(before, cpu_times()),
    );
    println!("{}", fake_baseline.line());
    bench.quiesce().await;

    let smtp_baseline = if args.email > 0 {
        let before = cpu_times();
        let baseline = bench.smtp_baseline(args).await?;
        cpu_busy.insert(
            "SMTP sink alone".to_owned(),
            busy_share(before, cpu_times()),
        );
        println!("{}", baseline.line());
        bench.quiesce().await;
        Some(baseline)
    } else {
        None
    };

    let mut runs = Vec::new();
    for (channel, count) in [
        (pb::Channel::Push, args.push),
        (pb::Channel::Email, args.email),
    ] {
        if count == 0 {
            continue;
        }
        let before = cpu_times();
        let run = bench.run_channel(channel, count, args, None).await?;
        cpu_busy.insert(run.channel.clone(), busy_share(before, cpu_times()));
        println!("{}", run.line());
        runs.push(run);
        bench.quiesce().await;
    }

    if args.push_rate > 0 && args.paced_secs > 0 {
        let count = args.push_rate.saturating_mul(args.paced_secs);
        let before = cpu_times();
        let mut run = bench
            .run_channel(pb::Channel::Push, count, args, Some(args.push_rate))
            .await?;
        run.channel = format!("push at {}/s", args.push_rate);
        cpu_busy.insert(run.channel.clone(), busy_share(before, cpu_times()));
        println!("{}", run.line());
        runs.push(run);
        bench.quiesce().await;
    }

    let Bench { app, smtp, .. } = bench;
    app.stop().await;
    drop(smtp);
    Ok(DeliveryResult {
        scenario: "delivery".into(),
        config: BenchConfig {
            customers: args.customers,
            items: args.items,
            orders: args.orders,
            batch: args.batch,
            prefetch: args.prefetch,
            concurrency: args.concurrency,
            db_connections: args.db_connections,
            publish_chunk: args.publish_chunk,
        },
        setup,
        bus_baseline,
        fake_baseline,
        smtp_baseline,
        runs,
        cpu_busy,
        probes,
    })
}

// --- The report ---------------------------------------------------------------------------

fn ms(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2} s", value / 1000.0)
    } else {
        format!("{value:.1} ms")
    }
}

/// The `delivery` section of BENCHMARKS.md from the `delivery*.json` results in `dir`.
pub fn render(dir: &Path, meta: &[(String, String)]) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut results = Vec::new();
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_result = path.extension().is_some_and(|ext| ext == "json")
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("delivery"));
        if is_result {
            paths.push(path);
        }
    }
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let result: DeliveryResult = serde_json::from_str(text.trim())
            .with_context(|| format!("{} is not a delivery result", path.display()))?;
        results.push(result);
    }
    let Some(result) = results.last() else {
        anyhow::bail!("no delivery*.json result in {}", dir.display());
    };
    let thousands = crate::report::thousands;
    let mut md = String::new();
    md.push_str("## Delivery: the whole send pipeline\n\n");
    md.push_str("_Written by `bash bench/delivery.sh` (`make bench-delivery`) from the run below; rerun it rather than editing this section._\n\n");
    if !meta.is_empty() {
        md.push_str("| | |\n|---|---|\n");
        for (key, value) in meta {
            let _ = writeln!(md, "| {key} | {value} |");
        }
        md.push('\n');
    }
    let c = &result.config;
    let s = &result.setup;
    let training = match &s.train_error {
        None => format!("a model trained on them (v{})", s.model_version),
        Some(error) => {
            format!("training failed ({error}), so products came from the catalog's fallback")
        }
    };
    let _ = writeln!(
        md,
        "One process (`relance-loadtest delivery`, release) runs profiles, events, \
         recommendations and delivery as `relance serve` would, on a fresh database, with \
         the fake providers: the fake FCM (an HTTP server recording every request) and a real \
         SMTP server, aiosmtpd (Python), writing each e-mail to a file. Setup: {} customers \
         (Android push token, e-mail, push and e-mail opted in), {} catalog items, {} \
         `order_completed` events and {training}. Delivery: batch {}, prefetch {}, \
         concurrency {}, {} Postgres connections per service.\n",
        thousands(f64::from(s.customers)),
        thousands(f64::from(s.items)),
        thousands(s.events_accepted as f64),
        c.batch,
        c.prefetch,
        c.concurrency,
        c.db_connections,
    );
    let _ = writeln!(
        md,
        "Each send request (kind MARKETING, topic `marketing`, a distinct idempotency key, \
         template `bench-push` or `bench-email`, each with a products block: 3 items, 50 ms \
         timeout, trending fallback) is published as an envelope on `relance.delivery` with \
         `publish_all` in chunks of {} — all of them as fast as the broker confirms, a burst \
         — and goes queue → ledger (accept, claim) → profile → `Recommend` → render (Liquid, \
         tracking links, e-mail: open pixel, unsubscribe link, text part) → provider → \
         ledger (outcome). **msgs/s** = messages that reached the provider ÷ time from the \
         first publish to the provider's last request. **Queue → provider** = the provider's \
         receive time − the publish time of the message's chunk (carried in `data.sent_at_ns`); \
         in a burst it is mostly waiting in the queue, so its p99 is close to the run's \
         length. **Ledger complete** = first publish → every message terminal in \
         `delivery.messages` (polled every 100 ms).\n",
        c.publish_chunk,
    );
    md.push_str("| channel | messages | published/s | reached provider | **msgs/s** | queue → provider p50 | p99 | p99.9 | max | ledger complete | products fallbacks | CPU busy |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for run in &result.runs {
        let ledger = run
            .ledger_secs
            .map(|secs| format!("{secs:.2} s"))
            .unwrap_or_else(|| "incomplete".to_owned());
        let cpu = result
            .cpu_busy
            .get(&run.channel)
            .map(|v| format!("{v:.0}%"))
            .unwrap_or_else(|| "–".to_owned());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {cpu} |",
            run.channel,
            thousands(run.messages as f64),
            thousands(run.publish_per_sec),
            thousands(run.reached_provider as f64),
            thousands(run.per_sec),
            ms(run.latency.p50),
            ms(run.latency.p99),
            ms(run.latency.p999),
            ms(run.latency.max),
            ledger,
            thousands(run.products_fallbacks as f64),
        );
    }
    md.push('\n');
    let outcomes: Vec<String> = result
        .runs
        .iter()
        .map(|run| {
            let parts: Vec<String> = run
                .ledger
                .iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v as f64)))
                .collect();
            format!("{}: {}", run.channel, parts.join(", "))
        })
        .collect();
    let _ = writeln!(md, "Ledger outcomes — {}.\n", outcomes.join(" · "));

    md.push_str("### Baselines, same run\n\n");
    md.push_str("| baseline | n | per second | push msgs/s as a share of it | CPU busy |\n|---|---:|---:|---:|---:|\n");
    let push = result.runs.iter().find(|r| r.channel == "push");
    for (baseline, how) in [
        (
            &result.bus_baseline,
            "the same envelopes published the same way to a quorum queue of their own, consumed by the platform's consumer (same prefetch and batch) with a handler that only counts",
        ),
        (
            &result.fake_baseline,
            "FCM-shaped POSTs straight to the fake FCM with a reqwest client",
        ),
    ]
    .into_iter()
    .chain(result.smtp_baseline.as_ref().map(|smtp| {
        (
            smtp,
            "e-mails sent straight to the aiosmtpd sink with lettre, as many connections as delivery's SMTP provider uses — compare the e-mail rate with this one",
        )
    })) {
        let share = push
            .filter(|_| baseline.per_sec > 0.0)
            .map(|p| format!("{:.0}%", 100.0 * p.per_sec / baseline.per_sec))
            .unwrap_or_else(|| "–".to_owned());
        let cpu = result
            .cpu_busy
            .get(&baseline.what)
            .map(|v| format!("{v:.0}%"))
            .unwrap_or_else(|| "–".to_owned());
        let extra = match (baseline.publish_per_sec, baseline.concurrency) {
            (Some(publish), _) => format!("; published at {}/s", thousands(publish)),
            (_, Some(concurrency)) => format!(", {concurrency} in flight"),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "| {} ({how}{extra}) | {} | {} | {share} | {cpu} |",
            baseline.what,
            thousands(baseline.messages as f64),
            thousands(baseline.per_sec),
        );
    }
    md.push('\n');
    if !result.probes.is_empty() {
        md.push_str("Single calls a batch makes to other services, one at a time on the idle system after setup (median):\n\n| call | median |\n|---|---:|\n");
        for (what, value) in &result.probes {
            let _ = writeln!(md, "| {what} | {} |", ms(*value));
        }
        md.push('\n');
    }
    if let Some(push) = push {
        let verdict = if push.per_sec >= 5000.0 {
            "meets"
        } else {
            "misses"
        };
        let _ = writeln!(
            md,
            "**Push: {} msgs/s through the whole pipeline, queue → provider p99 {} — {verdict} the ≥ 5,000 push/s aim.**\n",
            thousands(push.per_sec),
            ms(push.latency.p99),
        );
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_publish_time_from_the_subject() {
        let message = "From: Shop <news@shop.example>\r\nSubject: Amina, picked for you #1700000000123456789\r\nTo: c1@example.com\r\n\r\nbody";
        assert_eq!(sent_at_in_subject(message), Some(1_700_000_000_123_456_789));
        assert_eq!(sent_at_in_subject("Subject: no time\r\n"), None);
    }

    #[test]
    fn anchor_maps_instants_both_ways() {
        let anchor = Anchor::now();
        let later = anchor.instant + Duration::from_millis(5);
        assert_eq!(anchor.wall_of(later) - anchor.wall, 5_000_000);
    }

    #[test]
    fn busy_share_of_two_readings() {
        assert_eq!(busy_share(Some((100, 50)), Some((200, 100))), 50.0);
        assert_eq!(busy_share(None, Some((1, 1))), 0.0);
    }
}
