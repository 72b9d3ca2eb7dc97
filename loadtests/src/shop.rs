//! Whole-platform load scenarios (`make loadtest SCENARIO=…`): a storefront's day, an
//! ingestion burst and a Black Friday broadcast, each against the six services' APIs running
//! **in-process** on a database, RabbitMQ prefix and Redis prefix of their own (removed at the
//! end), with the fake FCM of `relance_delivery::fake`.
//!
//! - `shop-day`: storefront sessions arrive at a fixed rate (open loop: session `i` starts at
//!   `start + i / rate` whatever the earlier ones are doing) for `--duration` seconds. Each
//!   session walks the funnel below, calling Events (Track, TrackBatch), Recommendations
//!   (Recommend) and, for sign-ups, Profiles (Upsert, SetConsent). An abandoned-cart flow
//!   (trigger `cart_updated`, exit on `order_completed`, wait `--wait-secs`, one push) is
//!   active: each `cart_updated` carries the wall-clock time of its Track call in
//!   `sent_at_ns`, the push template copies `data.trigger.sent_at_ns` into the FCM data, and
//!   the fake FCM's receive time gives the end-to-end time event → message.
//! - `ingestion-burst`: Track and TrackBatch at a base rate, then `--burst-factor` times that
//!   for `--burst-secs`, then the base rate again; latency per phase, the events relay's
//!   backlog (events stored but not yet published) and the consumers' queue depths sampled
//!   every 250 ms, and how long they take to drain after the burst.
//! - `black-friday`: shop-day traffic for `--baseline-secs`, then a broadcast (push, with a
//!   products block) to `--audience` customers written beforehand in bulk, while the traffic
//!   continues until every message reached the fake FCM or `--max-secs` passed. Shop latency
//!   before vs during the broadcast, the broadcast's queued/s and sent/s.
//!
//! The storefront funnel, per session (shares of sessions): 5% a new customer signs up
//! (Profiles.Upsert with a push token, SetConsent, Track `signed_up`), 20% anonymous browsing
//! (the app's SDK sends its views in one TrackBatch at the end), 75% a returning customer of
//! the Online Retail file. Each: the home page (Recommend HOME), 1–6 product views (Track
//! `product_viewed` + Recommend PRODUCT with the item in view; items drawn by their share of
//! the file's order lines), then, known customers only, 30% put an item of a real invoice in
//! the cart (Track `cart_updated` + Recommend CART), half of those start checkout (Track
//! `checkout_started` + Recommend CHECKOUT) and 70% of those order (Track `order_completed`
//! with the invoice's lines and revenue): 10.5% of sessions order, the rest of the carts are
//! abandoned. Pages are 200–800 ms apart (think time); within a session each call waits for
//! the previous answer, as a browser does, so call latency is measured from its send.
//!
//! Recommendations need a model: before the clock starts, the catalog (the file's products,
//! their description and price) and the history (one `order_completed` per invoice, times
//! shifted so that the last invoice is yesterday) are loaded and a model trained in-process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use relance_delivery::fake::FakeProviders;
use relance_kit::testing::{TestApp, TestEnv, authed};
use relance_kit::{SharedClock, SystemClock};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::{self as pb, customer_ref};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::stats::Percentiles;

const FCM_PROJECT: &str = "loadtest";
const FCM_PATH: &str = "/v1/projects/loadtest/messages:send";
const CART_FLOW: &str = "abandoned-cart";
const CART_TEMPLATE: &str = "cart-reminder";
const BROADCAST: &str = "black-friday";
const BROADCAST_TEMPLATE: &str = "black-friday-push";
/// The fake segmentation's one segment (`campaigns.rs`).
const BROADCAST_SEGMENT: &str = "bench-audience";
/// The consumers of `relance.events` running in the scenarios, and delivery's queue.
const QUEUES: &[&str] = &[
    "events.ingest",
    "events.identity",
    "profiles.traits",
    "recommendations.history",
    "campaigns.events",
    relance_delivery::wire::REQUESTS_QUEUE,
];

// --- Arguments ----------------------------------------------------------------------------

/// What every scenario shares: the in-process services and the storefront data.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The Online Retail file (catalog, customers, order shapes, training history).
    #[arg(long, default_value = "examples/data/online-retail.csv.gz")]
    pub online_retail: PathBuf,
    /// Postgres connections per service pool (`database_max_connections`): five services
    /// share one process here and Postgres allows 100 in all.
    #[arg(long, default_value_t = 5)]
    pub db_connections: u32,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The services' log filter.
    /// (lapin logs every passive declare of a queue that does not exist yet, e.g. a
    /// dead-letter queue nothing was dead-lettered to, as an error.)
    #[arg(long, default_value = "warn,lapin=off")]
    pub log_level: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ShopArgs {
    #[command(flatten)]
    pub common: Common,
    /// Storefront sessions started per second.
    #[arg(long, default_value_t = 20.0)]
    pub session_rate: f64,
    /// Seconds sessions keep arriving.
    #[arg(long, default_value_t = 120, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=1800))]
    pub duration: u64,
    /// The abandoned-cart flow's wait before its push, in seconds (1 h in production).
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BurstArgs {
    #[command(flatten)]
    pub common: Common,
    /// Single Track calls per second at the base rate.
    #[arg(long, default_value_t = 200)]
    pub track_rate: u32,
    /// TrackBatch calls per second at the base rate.
    #[arg(long, default_value_t = 10)]
    pub batch_rate: u32,
    /// Events per TrackBatch (an SDK's flush).
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Seconds at the base rate before the burst.
    #[arg(long, default_value_t = 30)]
    pub before_secs: u64,
    /// Seconds of the burst.
    #[arg(long, default_value_t = 30)]
    pub burst_secs: u64,
    /// The burst's rate as a multiple of the base rate.
    #[arg(long, default_value_t = 10)]
    pub burst_factor: u32,
    /// Seconds at the base rate after the burst (the backlog is followed until it drained or
    /// `--drain-timeout-secs`).
    #[arg(long, default_value_t = 30)]
    pub after_secs: u64,
    /// Longest wait for the backlog to drain after the burst.
    #[arg(long, default_value_t = 180)]
    pub drain_timeout_secs: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BlackFridayArgs {
    #[command(flatten)]
    pub shop: ShopArgs,
    /// Customers in the broadcast's audience (with a push token and push consent).
    #[arg(long, default_value_t = 1_000_000)]
    pub audience: u32,
    /// Seconds of shop traffic before the broadcast (the baseline of the same run).
    #[arg(long, default_value_t = 60)]
    pub baseline_secs: u64,
    /// Longest the broadcast is followed; the traffic stops then even if it is not done.
    #[arg(long, default_value_t = 900)]
    pub max_secs: u64,
}

// --- Results ------------------------------------------------------------------------------

/// One RPC in one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcStats {
    pub phase: String,
    pub rpc: String,
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Calls completed per second of the phase.
    pub per_sec: f64,
    pub latency: Percentiles,
}

/// A phase of the run: its name and length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    pub customers: u64,
    pub items: u64,
    pub orders: u64,
    pub model_version: u64,
    pub audience: u64,
    pub audience_secs: f64,
    pub secs: f64,
}

/// What the sessions did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Funnel {
    pub sessions: u64,
    pub signups: u64,
    pub anonymous: u64,
    pub product_views: u64,
    pub carts: u64,
    pub checkouts: u64,
    pub orders: u64,
    /// Sessions that ended with a call error.
    pub failed: u64,
}

/// Track of `cart_updated` → the push at the fake FCM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndToEnd {
    pub wait_secs: u64,
    /// Carts left without an order.
    pub abandoned_carts: u64,
    /// The pushes the flow owes: a customer's cart while their reminder is pending joins it,
    /// an order during the wait (in any session) cancels it.
    #[serde(default)]
    pub reminders_due: u64,
    /// Cart pushes the fake FCM received.
    pub messages: u64,
    pub latency: Percentiles,
    /// The same minus the flow's wait: what the platform adds.
    pub beyond_wait: Percentiles,
}

/// The ingestion burst's backlog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backlog {
    pub events_sent: u64,
    /// Events per second asked for at the base rate and in the burst.
    pub base_events_per_sec: f64,
    pub burst_events_per_sec: f64,
    /// Largest relay backlog (events stored, not yet published) and its age.
    pub max_relay_backlog: u64,
    pub max_relay_lag_secs: f64,
    /// Largest sum of the consumers' queue depths.
    pub max_queued: u64,
    /// From the burst's end until the relay backlog and the queues were empty; `None` when
    /// they were not before the timeout.
    pub drain_secs: Option<f64>,
    /// (seconds since start, relay backlog, relay lag s, queued) every 250 ms.
    pub samples: Vec<(f64, u64, f64, u64)>,
}

/// The broadcast under shop traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastRun {
    pub audience: u64,
    /// Send requests queued by campaigns (`broadcasts.queued`) and pushes at the fake FCM.
    pub queued: u64,
    pub sent: u64,
    /// Failed or skipped in delivery's ledger (no token, no consent, provider error).
    pub failed: u64,
    pub queued_secs: Option<f64>,
    pub sent_secs: Option<f64>,
    pub queued_per_sec: f64,
    pub sent_per_sec: f64,
    /// The whole broadcast, ScheduleBroadcast → the last push; `None` when not done in time.
    pub complete_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResult {
    pub scenario: String,
    pub config: serde_json::Value,
    pub setup: Setup,
    pub phases: Vec<Phase>,
    pub rpcs: Vec<RpcStats>,
    pub funnel: Option<Funnel>,
    pub end_to_end: Option<EndToEnd>,
    pub backlog: Option<Backlog>,
    pub broadcast: Option<BroadcastRun>,
    /// Busy share of the machine's CPUs over the timed part (`/proc/stat`).
    pub cpu_busy: f64,
}

impl LoadResult {
    /// The readable report.
    pub fn line(&self) -> String {
        let mut out = format!("{} — ", self.scenario);
        for phase in &self.phases {
            out.push_str(&format!("{} {:.0}s  ", phase.name, phase.secs));
        }
        out.push_str(&format!("(CPU busy {:.0}%)\n", self.cpu_busy));
        if let Some(funnel) = &self.funnel {
            out.push_str(&format!(
                "sessions {} (sign-ups {}, anonymous {}, failed {}): views {}, carts {}, checkouts {}, orders {}\n",
                funnel.sessions,
                funnel.signups,
                funnel.anonymous,
                funnel.failed,
                funnel.product_views,
                funnel.carts,
                funnel.checkouts,
                funnel.orders
            ));
        }
        out.push_str(&format!(
            "{:<10} {:<26} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9}\n",
            "phase", "rpc", "calls", "errors", "per s", "p50 ms", "p99 ms", "p99.9 ms"
        ));
        for rpc in &self.rpcs {
            out.push_str(&format!(
                "{:<10} {:<26} {:>8} {:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2}\n",
                rpc.phase,
                rpc.rpc,
                rpc.calls,
                rpc.errors,
                rpc.per_sec,
                rpc.latency.p50,
                rpc.latency.p99,
                rpc.latency.p999
            ));
        }
        if let Some(e2e) = &self.end_to_end {
            out.push_str(&format!(
                "end to end (Track cart_updated → push at the fake FCM, wait {} s): {} of {} reminders due ({} carts without an order), p50 {:.2} s, p99 {:.2} s, p99.9 {:.2} s; beyond the wait p50 {:.0} ms, p99 {:.0} ms\n",
                e2e.wait_secs,
                e2e.messages,
                e2e.reminders_due,
                e2e.abandoned_carts,
                e2e.latency.p50 / 1000.0,
                e2e.latency.p99 / 1000.0,
                e2e.latency.p999 / 1000.0,
                e2e.beyond_wait.p50,
                e2e.beyond_wait.p99
            ));
        }
        if let Some(backlog) = &self.backlog {
            let drain = backlog
                .drain_secs
                .map_or("not drained".to_owned(), |s| format!("{s:.1} s"));
            out.push_str(&format!(
                "events {}: base {:.0}/s, burst {:.0}/s; relay backlog max {} (oldest {:.1} s), queues max {}; drained {drain} after the burst\n",
                backlog.events_sent,
                backlog.base_events_per_sec,
                backlog.burst_events_per_sec,
                backlog.max_relay_backlog,
                backlog.max_relay_lag_secs,
                backlog.max_queued
            ));
        }
        if let Some(b) = &self.broadcast {
            let secs = |s: Option<f64>| s.map_or("not done".to_owned(), |s| format!("{s:.1} s"));
            out.push_str(&format!(
                "broadcast to {}: queued {} in {} ({:.0}/s), sent {} in {} ({:.0}/s), complete {}\n",
                b.audience,
                b.queued,
                secs(b.queued_secs),
                b.queued_per_sec,
                b.sent,
                secs(b.sent_secs),
                b.sent_per_sec,
                secs(b.complete_secs)
            ));
        }
        out
    }
}

// --- Measuring ----------------------------------------------------------------------------

fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Maps the fake's `Instant`s to wall-clock nanoseconds (both read once, together).
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

/// Microseconds from 1 µs to 1 h: an end-to-end time includes the flow's wait, and a call
/// stuck behind a broadcast may take long.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

#[derive(Default)]
struct Calls {
    latency: Option<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

/// Latency per (phase, RPC). A call belongs to the phase it was sent in.
#[derive(Default)]
struct Recorder {
    /// Phase boundaries in order: (start, name).
    phases: Vec<(Instant, String)>,
    calls: BTreeMap<(usize, &'static str), Calls>,
}

type SharedRecorder = Arc<Mutex<Recorder>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Recorder {
    fn begin(recorder: &SharedRecorder, name: &str) {
        lock(recorder)
            .phases
            .push((Instant::now(), name.to_owned()));
    }

    fn phase_of(&self, sent: Instant) -> Option<usize> {
        let mut found = None;
        for (index, (start, _)) in self.phases.iter().enumerate() {
            if *start <= sent {
                found = Some(index);
            }
        }
        found
    }

    fn add<T>(&mut self, rpc: &'static str, sent: Instant, result: &Result<T, tonic::Status>) {
        let Some(phase) = self.phase_of(sent) else {
            return; // before the clock started (warm-up, setup)
        };
        let calls = self.calls.entry((phase, rpc)).or_default();
        match result {
            Ok(_) => record(calls.latency.get_or_insert_with(histogram), sent.elapsed()),
            Err(status) => {
                calls.errors += 1;
                if calls.first_error.is_none() {
                    calls.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }

    /// Phases (with their lengths up to `end`) and the per-RPC statistics.
    fn finish(&self, end: Instant) -> (Vec<Phase>, Vec<RpcStats>) {
        let mut phases = Vec::new();
        for (index, (start, name)) in self.phases.iter().enumerate() {
            let stop = self.phases.get(index + 1).map_or(end, |(next, _)| *next);
            phases.push(Phase {
                name: name.clone(),
                secs: stop.saturating_duration_since(*start).as_secs_f64(),
            });
        }
        let mut rpcs = Vec::new();
        for ((phase, rpc), calls) in &self.calls {
            let secs = phases[*phase].secs.max(1e-9);
            let latency = calls
                .latency
                .as_ref()
                .map(Percentiles::of)
                .unwrap_or_default();
            rpcs.push(RpcStats {
                phase: phases[*phase].name.clone(),
                rpc: (*rpc).to_owned(),
                calls: latency.count + calls.errors,
                errors: calls.errors,
                first_error: calls.first_error.clone(),
                per_sec: latency.count as f64 / secs,
                latency,
            });
        }
        (phases, rpcs)
    }
}

/// Runs a call and records its latency under `rpc`.
async fn timed<T>(
    recorder: &SharedRecorder,
    rpc: &'static str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let sent = Instant::now();
    let result = call.await;
    lock(recorder).add(rpc, sent, &result);
    result.map(tonic::Response::into_inner)
}

fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 5 {
        return None;
    }
    Some((values.iter().take(8).sum(), values[3] + values[4]))
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

// --- The storefront's data ----------------------------------------------------------------

/// A product of the file.
struct Product {
    id: String,
    title: String,
    price: f64,
}

/// One order line: the product's index, quantity, unit price.
type Line = (u32, i64, f64);

/// The Online Retail file, reduced to what the storefront needs.
struct Retail {
    customers: Vec<String>,
    products: Vec<Product>,
    /// The product of every order line: drawing from it draws products by popularity.
    line_products: Vec<u32>,
    /// Every invoice with a customer: (customer index, time, lines).
    invoices: Vec<(u32, chrono::NaiveDateTime, Vec<Line>)>,
}

impl Retail {
    fn load(path: &Path) -> anyhow::Result<Retail> {
        let reader = relance_retail_data::Reader::open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut customers = Vec::new();
        let mut customer_index: HashMap<String, u32> = HashMap::new();
        let mut products = Vec::new();
        let mut product_index: HashMap<String, u32> = HashMap::new();
        let mut line_products = Vec::new();
        let mut invoices = Vec::new();
        for invoice in reader {
            let invoice = invoice?;
            let Some(customer) = invoice.customer_id else {
                continue;
            };
            if invoice.is_cancellation || invoice.lines.is_empty() {
                continue;
            }
            let customer = match customer_index.get(&customer) {
                Some(&index) => index,
                None => {
                    let index = customers.len() as u32;
                    customers.push(format!("r{customer}"));
                    customer_index.insert(customer, index);
                    index
                }
            };
            let mut lines = Vec::with_capacity(invoice.lines.len());
            for line in invoice.lines {
                if line.quantity <= 0 || line.unit_price <= 0.0 {
                    continue;
                }
                let next = products.len() as u32;
                let product = *product_index.entry(line.stock_code.clone()).or_insert(next);
                if product == next {
                    products.push(Product {
                        id: line.stock_code.clone(),
                        title: line.description.clone(),
                        price: line.unit_price,
                    });
                }
                line_products.push(product);
                lines.push((product, line.quantity, line.unit_price));
            }
            if !lines.is_empty() {
                invoices.push((customer, invoice.invoiced_at, lines));
            }
        }
        if customers.is_empty() || invoices.is_empty() {
            anyhow::bail!("{}: no invoice with a customer and lines", path.display());
        }
        Ok(Retail {
            customers,
            products,
            line_products,
            invoices,
        })
    }

    fn popular_product(&self, rng: &mut StdRng) -> u32 {
        self.line_products[rng.random_range(0..self.line_products.len())]
    }
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn push_token(id: &str) -> pb::PushToken {
    pb::PushToken {
        token: format!("android-token-{id}"),
        platform: pb::PushPlatform::Android as i32,
        app_id: "com.shop.app".into(),
        updated_at: None,
    }
}

fn opt_in(id: &str) -> pb::SetConsentRequest {
    pb::SetConsentRequest {
        customer: customer(id),
        consent: Some(pb::Consent {
            channel: pb::Channel::Push as i32,
            topic: String::new(),
            status: pb::ConsentStatus::OptedIn as i32,
            updated_at: None,
            source: "loadtest".into(),
        }),
    }
}

fn items_json(retail: &Retail, lines: &[Line]) -> (serde_json::Value, f64) {
    let mut items = Vec::with_capacity(lines.len());
    let mut revenue = 0.0;
    for &(product, quantity, price) in lines {
        revenue += price * quantity as f64;
        items.push(serde_json::json!({
            "product_id": retail.products[product as usize].id,
            "quantity": quantity,
            "price": price,
        }));
    }
    (
        serde_json::Value::Array(items),
        (revenue * 100.0).round() / 100.0,
    )
}

// --- The services -------------------------------------------------------------------------

struct Platform {
    app: TestApp,
    channels: Vec<Channel>,
    fake: FakeProviders,
    anchor: Anchor,
    pool: sqlx::PgPool,
    stop: CancellationToken,
    _telemetry: relance_kit::telemetry::TelemetryGuard,
}

async fn start(common: &Common, audience: u32) -> anyhow::Result<Platform> {
    let anchor = Anchor::now();
    let fake = FakeProviders::start().await?;
    let stop = CancellationToken::new();
    // Segmentation is the fake of the campaigns scenario (one segment of `audience` ids): the
    // flow here is triggered by an event, and a real build of a 1 M segment is the
    // segmentation benchmark's subject, not this one's.
    let segments_url = crate::campaigns::serve_fake_segments(audience, stop.clone()).await?;
    let env = Arc::new(TestEnv::new().await);
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let toml = format!(
        r#"
[delivery]
http_addr = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
link_secret = "loadtest-link-secret"

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "{FCM_PROJECT}"
access_token = "fcm-loadtest-token"

[recommendations]
train_every_hours = 0

[services]
segmentation = "{segments_url}"
"#,
        base = fake.base_url(),
    );
    let settings = env
        .settings
        .with_toml(&toml)
        .context("the scenario's settings")?
        .with(&[
            (
                "database_max_connections",
                common.db_connections.to_string().as_str(),
            ),
            ("log_level", common.log_level.as_str()),
        ])
        .context("the scenario's settings")?;
    let telemetry = relance_kit::telemetry::init(&settings, "relance-loadtest")?;
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
                relance_delivery::serve(platform, server).await?;
                relance_campaigns::serve(platform, server).await
            })
        }),
    )
    .await;
    // Each on its own HTTP/2 connection; a call that takes longer than 30 s has failed (and
    // a stuck call must not hold the run past its bound).
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))?
        .timeout(Duration::from_secs(30));
    let mut channels = Vec::new();
    for _ in 0..common.connections.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .context("connecting to the services")?,
        );
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .context("connecting to the scenario's database")?;
    Ok(Platform {
        app,
        channels,
        fake,
        anchor,
        pool,
        stop,
        _telemetry: telemetry,
    })
}

impl Platform {
    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        authed(&self.app.admin_key, message)
    }

    fn channel(&self, index: usize) -> Channel {
        self.channels[index % self.channels.len()].clone()
    }

    /// The backlog readings (relay and queues) on this platform.
    fn probe(&self) -> Probe {
        Probe {
            pool: self.pool.clone(),
            bus: self.app.platform.bus.clone(),
        }
    }

    /// Waits (at most `limit`) until the relay and every queue are empty.
    async fn quiesce(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let probe = self.probe();
        loop {
            let (backlog, _) = probe.relay_backlog().await;
            let waiting = probe.queued().await;
            if backlog == 0 && waiting == 0 {
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "note: {backlog} events unpublished, {waiting} queued after {limit:?}; going on"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // --- Setup ----------------------------------------------------------------------------

    /// Catalog, customers, history and a trained model from the Online Retail file.
    async fn seed_shop(&self, retail: &Retail, setup: &mut Setup) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut reco = RecommendationsClient::new(self.channel(0));
        for chunk in retail.products.chunks(1000) {
            let mut items = Vec::with_capacity(chunk.len());
            for product in chunk {
                items.push(pb::CatalogItem {
                    id: product.id.clone(),
                    title: product.title.clone(),
                    category_path: vec!["Gifts".into()],
                    price: product.price,
                    currency: "GBP".into(),
                    in_stock: true,
                    url: format!("https://shop.example/p/{}", product.id),
                    image_url: format!("https://cdn.shop.example/{}.jpg", product.id),
                    ..Default::default()
                });
            }
            let response = reco
                .upsert_items(self.admin(pb::UpsertItemsRequest { items }))
                .await
                .context("UpsertItems")?
                .into_inner();
            if let Some(rejected) = response.rejected.first() {
                println!("note: the catalog refused some items, e.g. {rejected:?}");
            }
        }
        setup.items = retail.products.len() as u64;

        // Every customer of the file, with a push token and push consent: the cart reminder
        // has somewhere to go.
        let admin = self.app.admin_key.clone();
        let calls = futures::stream::iter(retail.customers.iter().enumerate())
            .map(|(index, id)| {
                let mut profiles = ProfilesClient::new(self.channel(index));
                let admin = admin.clone();
                async move {
                    let upsert = pb::UpsertProfileRequest {
                        customer: customer(id),
                        attributes: Some(json_to_struct(
                            &serde_json::json!({ "first_name": "Sam" }),
                        )),
                        push_tokens: vec![push_token(id)],
                        locale: Some("en".into()),
                        ..Default::default()
                    };
                    profiles
                        .upsert(authed(&admin, upsert))
                        .await
                        .with_context(|| format!("upserting {id}"))?;
                    profiles
                        .set_consent(authed(&admin, opt_in(id)))
                        .await
                        .with_context(|| format!("consent of {id}"))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(32);
        let mut calls = std::pin::pin!(calls);
        while let Some(result) = calls.next().await {
            result?;
        }
        setup.customers = retail.customers.len() as u64;
        println!(
            "setup: {} products, {} customers ({:.1}s)",
            setup.items,
            setup.customers,
            started.elapsed().as_secs_f64()
        );

        // The history: the file's invoices, moved so that the last one was yesterday.
        let last = retail
            .invoices
            .iter()
            .map(|(_, at, _)| *at)
            .max()
            .unwrap_or_default();
        let now = self.app.platform.clock.now().naive_utc();
        let shift = now - chrono::Duration::days(1) - last;
        let mut events = EventsClient::new(self.channel(1));
        for (chunk_index, chunk) in retail.invoices.chunks(1000).enumerate() {
            let mut batch = Vec::with_capacity(chunk.len());
            for (offset, (customer_index, at, lines)) in chunk.iter().enumerate() {
                let n = chunk_index * 1000 + offset;
                let (items, revenue) = items_json(retail, lines);
                let at = (*at + shift).and_utc();
                batch.push(pb::Event {
                    message_id: format!("history-{n}"),
                    name: "order_completed".into(),
                    customer_id: retail.customers[*customer_index as usize].clone(),
                    timestamp: Some(prost_types::Timestamp { seconds: at.timestamp(), nanos: 0 }),
                    properties: Some(json_to_struct(&serde_json::json!({
                        "order_id": format!("h{n}"), "revenue": revenue, "currency": "GBP", "items": items,
                    }))),
                    ..Default::default()
                });
            }
            let response = events
                .track_batch(self.admin(pb::TrackBatchRequest { events: batch }))
                .await
                .context("TrackBatch of the history")?
                .into_inner();
            setup.orders += u64::from(response.accepted);
        }
        // Traits and histories follow from the consumers: let them finish before training and
        // before the clock starts.
        self.quiesce(Duration::from_secs(120)).await;
        let trained = reco
            .train(self.admin(pb::TrainRequest::default()))
            .await
            .context("Train")?
            .into_inner();
        setup.model_version = trained.model.map(|m| m.version).unwrap_or(0);
        println!(
            "setup: {} orders of history, model v{} trained ({:.1}s)",
            setup.orders,
            setup.model_version,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The push templates and the abandoned-cart flow; quiet hours off (the run may fall at
    /// night in UTC, and the reminders must go out now).
    async fn flows(&self, wait_secs: u64) -> anyhow::Result<()> {
        let mut delivery = DeliveryClient::new(self.channel(0));
        let products = pb::TemplateProducts {
            placement: pb::Placement::Push as i32,
            n: 2,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 50_000_000,
            }),
            fallback: pb::ProductsFallback::Trending as i32,
            ..Default::default()
        };
        let sample = json_to_struct(&serde_json::json!({
            "customer": {"first_name": "Sam"},
            "data": {"sent_at_ns": "1700000000000000000", "trigger": {"sent_at_ns": "1700000000000000000"}},
            "products": [{"id": "22423", "title": "REGENCY CAKESTAND 3 TIER", "url": "https://shop.example/p/22423",
                          "image_url": "https://cdn.shop.example/22423.jpg", "price": 12.75, "currency": "GBP"}],
        }));
        let templates = [
            (
                CART_TEMPLATE,
                "Still thinking it over?",
                "Your cart is waiting — and {{ products[0].title }} goes well with it",
                "{{ data.trigger.sent_at_ns }}",
            ),
            (
                BROADCAST_TEMPLATE,
                "Black Friday: -50% today",
                "{{ products[0].title }} and more, picked for you",
                "",
            ),
        ];
        for (name, title, body, sent_at) in templates {
            let mut data = BTreeMap::new();
            if !sent_at.is_empty() {
                data.insert("sent_at_ns".to_owned(), sent_at.to_owned());
            }
            let content = pb::MessageContent {
                push: Some(pb::PushContent {
                    title: title.into(),
                    body: body.into(),
                    url: "https://shop.example/cart".into(),
                    data: data.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let template = pb::Template {
                name: name.into(),
                default_locale: "en".into(),
                variants: vec![pb::TemplateVariant {
                    locale: "en".into(),
                    direction: 0,
                    content: Some(content),
                }],
                products: Some(products.clone()),
                sample_data: Some(sample.clone()),
                ..Default::default()
            };
            delivery
                .upsert_template(self.admin(pb::UpsertTemplateRequest {
                    template: Some(template),
                    dry_run: false,
                }))
                .await
                .with_context(|| format!("saving template {name}"))?;
        }
        let mut campaigns = CampaignsClient::new(self.channel(0));
        let quiet = pb::SetQuietHoursRequest {
            quiet_hours: Some(pb::QuietHours {
                enabled: false,
                start: "22:00".into(),
                end: "08:00".into(),
                ..Default::default()
            }),
        };
        campaigns
            .set_quiet_hours(self.admin(quiet))
            .await
            .context("SetQuietHours")?;
        let yaml = format!(
            "kind: Flow\nname: {CART_FLOW}\ntrigger: {{ event: cart_updated }}\nexit_when: {{ event: order_completed }}\n\
             re_entry: always\nconversion: {{ event: order_completed, within: 72h }}\nsteps:\n  - wait: {wait_secs}s\n  - send: {{ channel: push, template: {CART_TEMPLATE} }}\n"
        );
        let applied = campaigns
            .apply_flow(self.admin(pb::ApplyFlowRequest {
                yaml,
                dry_run: false,
            }))
            .await
            .context("ApplyFlow")?
            .into_inner();
        if !applied.errors.is_empty() {
            anyhow::bail!("the abandoned-cart flow was refused: {:?}", applied.errors);
        }
        Ok(())
    }

    /// `audience` profiles (`b0000000`…), each with a push token and push consent, written
    /// straight into profiles' tables in chunks of 50,000 (one statement per chunk): the rows
    /// Upsert and SetConsent write, without 3 M RPCs before the clock starts.
    async fn bulk_audience(&self, audience: u32) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut next = 0u32;
        while next < audience {
            let end = (next + 50_000).min(audience);
            sqlx::query(
                "WITH p AS ( \
                   INSERT INTO profiles.profiles (workspace_id, customer_id, attributes, locale, created_at, updated_at) \
                   SELECT $1, 'b' || lpad(n::text, 7, '0'), '{\"first_name\": \"Sam\"}'::jsonb, 'en', now(), now() \
                   FROM generate_series($2::int, $3::int - 1) AS n RETURNING id, customer_id), \
                 t AS ( \
                   INSERT INTO profiles.push_tokens (workspace_id, token, profile_id, platform, app_id, updated_at) \
                   SELECT $1, 'android-token-' || customer_id, id, 'android', 'com.shop.app', now() FROM p) \
                 INSERT INTO profiles.consents (profile_id, channel, topic, status, decided_at, source) \
                 SELECT id, 'push', '', 'opted_in', now(), 'loadtest' FROM p",
            )
            .bind(&self.app.workspace)
            .bind(next as i32)
            .bind(end as i32)
            .execute(&self.pool)
            .await
            .context("writing the audience")?;
            next = end;
        }
        sqlx::raw_sql("ANALYZE profiles.profiles, profiles.push_tokens, profiles.consents")
            .execute(&self.pool)
            .await?;
        Ok(started.elapsed().as_secs_f64())
    }

    // --- Reading the fake -----------------------------------------------------------------

    /// Cart pushes at the fake FCM (those carrying `sent_at_ns`): Track → provider latency.
    fn cart_messages(&self, wait_secs: u64) -> (u64, Histogram<u64>, Histogram<u64>) {
        let mut latency = histogram();
        let mut beyond = histogram();
        let mut count = 0;
        for request in self.fake.requests_for(FCM_PATH) {
            let body = request.json();
            let Some(sent) = body["message"]["data"]["sent_at_ns"]
                .as_str()
                .and_then(|v| v.parse::<i128>().ok())
            else {
                continue;
            };
            let nanos = (self.anchor.wall_of(request.received) - sent).max(0);
            count += 1;
            record(&mut latency, Duration::from_nanos(nanos as u64));
            let wait = i128::from(wait_secs) * 1_000_000_000;
            record(
                &mut beyond,
                Duration::from_nanos((nanos - wait).max(0) as u64),
            );
        }
        (count, latency, beyond)
    }
}

// --- The sessions -------------------------------------------------------------------------

/// What a session needs, shared by all.
struct Storefront {
    retail: Retail,
    channels: Vec<Channel>,
    key: String,
    recorder: SharedRecorder,
    funnel: Mutex<Funnel>,
    /// Every acknowledged cart and order of a known customer, for the reminders due.
    carts_and_orders: Mutex<Vec<CartOrOrder>>,
    run: String,
}

/// A `cart_updated` or `order_completed` the platform acknowledged.
#[derive(Debug, Clone)]
struct CartOrOrder {
    customer_id: String,
    at: Instant,
    order: bool,
}

/// The reminders the abandoned-cart flow owes (`re_entry: always`, exit on an order, one push
/// after `wait`): a cart starts a journey unless the customer's previous one is still
/// waiting (then it joins it); an order during the wait ends the journey without a push.
fn reminders_due(mut timeline: Vec<CartOrOrder>, wait: Duration) -> u64 {
    timeline.sort_by(|a, b| a.customer_id.cmp(&b.customer_id).then(a.at.cmp(&b.at)));
    let mut due = 0;
    let mut waiting: Option<(&str, Instant)> = None;
    for step in &timeline {
        if let Some((customer, until)) = waiting
            && (customer != step.customer_id || step.at >= until)
        {
            // The journey's wait ran out: its push was sent.
            due += 1;
            waiting = None;
        }
        if step.order {
            waiting = None;
        } else if waiting.is_none() {
            waiting = Some((step.customer_id.as_str(), step.at + wait));
        }
    }
    if waiting.is_some() {
        due += 1;
    }
    due
}

type Events = EventsClient<Channel>;
type Reco = RecommendationsClient<Channel>;

impl Storefront {
    fn event(
        &self,
        name: &str,
        customer_id: &str,
        anonymous_id: &str,
        properties: serde_json::Value,
    ) -> pb::Event {
        pb::Event {
            message_id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            customer_id: customer_id.into(),
            anonymous_id: anonymous_id.into(),
            timestamp: None,
            properties: Some(json_to_struct(&properties)),
            context: [("channel".to_owned(), "web".to_owned())]
                .into_iter()
                .collect(),
        }
    }

    async fn track(&self, events: &mut Events, event: pb::Event) -> Result<(), tonic::Status> {
        let request = authed(&self.key, pb::TrackRequest { event: Some(event) });
        timed(&self.recorder, "Events.Track", events.track(request))
            .await
            .map(|_| ())
    }

    async fn recommend(
        &self,
        reco: &mut Reco,
        customer_id: &str,
        placement: pb::Placement,
        context: Vec<String>,
        n: u32,
    ) -> Result<(), tonic::Status> {
        let rpc = match placement {
            pb::Placement::Home => "Recommend HOME",
            pb::Placement::Product => "Recommend PRODUCT",
            pb::Placement::Cart => "Recommend CART",
            _ => "Recommend CHECKOUT",
        };
        let request = pb::RecommendRequest {
            customer: if customer_id.is_empty() {
                None
            } else {
                customer(customer_id)
            },
            placement: placement as i32,
            context_item_ids: context,
            n,
            include_details: true,
            ..Default::default()
        };
        timed(
            &self.recorder,
            rpc,
            reco.recommend(authed(&self.key, request)),
        )
        .await
        .map(|_| ())
    }

    /// One visit, the funnel of the module's documentation.
    async fn session(&self, index: u64, seed: u64) -> Result<(), tonic::Status> {
        let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let channel = self.channels[index as usize % self.channels.len()].clone();
        let mut events = EventsClient::new(channel.clone());
        let mut reco = RecommendationsClient::new(channel.clone());
        let think = |rng: &mut StdRng| Duration::from_millis(rng.random_range(200..=800));
        let kind: f64 = rng.random();
        let (customer_id, anonymous_id) = if kind < 0.05 {
            // A new customer signs up in the app: profile with a push token, consent, event.
            let id = format!("new-{}-{index}", self.run);
            let mut profiles = ProfilesClient::new(channel.clone());
            let upsert = pb::UpsertProfileRequest {
                customer: customer(&id),
                email: Some(format!("{id}@example.com")),
                push_tokens: vec![push_token(&id)],
                locale: Some("en".into()),
                ..Default::default()
            };
            timed(
                &self.recorder,
                "Profiles.Upsert",
                profiles.upsert(authed(&self.key, upsert)),
            )
            .await?;
            timed(
                &self.recorder,
                "Profiles.SetConsent",
                profiles.set_consent(authed(&self.key, opt_in(&id))),
            )
            .await?;
            self.track(
                &mut events,
                self.event("signed_up", &id, "", serde_json::json!({ "method": "app" })),
            )
            .await?;
            lock(&self.funnel).signups += 1;
            (id, String::new())
        } else if kind < 0.25 {
            lock(&self.funnel).anonymous += 1;
            (String::new(), format!("anon-{}-{index}", self.run))
        } else {
            let customers = &self.retail.customers;
            (
                customers[rng.random_range(0..customers.len())].clone(),
                String::new(),
            )
        };

        self.recommend(&mut reco, &customer_id, pb::Placement::Home, Vec::new(), 10)
            .await?;
        let views = rng.random_range(1..=6);
        let mut buffered = Vec::new();
        for _ in 0..views {
            tokio::time::sleep(think(&mut rng)).await;
            let product = &self.retail.products[self.retail.popular_product(&mut rng) as usize];
            let event = self.event(
                "product_viewed",
                &customer_id,
                &anonymous_id,
                serde_json::json!({ "product_id": product.id, "price": product.price }),
            );
            if customer_id.is_empty() {
                // The app's SDK batches an anonymous visitor's views.
                buffered.push(event);
            } else {
                self.track(&mut events, event).await?;
            }
            self.recommend(
                &mut reco,
                &customer_id,
                pb::Placement::Product,
                vec![product.id.clone()],
                8,
            )
            .await?;
        }
        lock(&self.funnel).product_views += views;
        if !buffered.is_empty() {
            let request = authed(&self.key, pb::TrackBatchRequest { events: buffered });
            timed(
                &self.recorder,
                "Events.TrackBatch",
                events.track_batch(request),
            )
            .await?;
        }
        if customer_id.is_empty() || rng.random::<f64>() >= 0.30 {
            return Ok(());
        }

        // The cart: a few lines of a real invoice.
        let (_, _, lines) = &self.retail.invoices[rng.random_range(0..self.retail.invoices.len())];
        let take = rng.random_range(1..=lines.len().min(4));
        let cart: Vec<Line> = lines[..take].to_vec();
        let (items, value) = items_json(&self.retail, &cart);
        let ids: Vec<String> = cart
            .iter()
            .map(|(p, _, _)| self.retail.products[*p as usize].id.clone())
            .collect();
        tokio::time::sleep(think(&mut rng)).await;
        // The Track call's wall-clock time rides in the event to the flow's push.
        let sent_at = wall_ns().to_string();
        self.track(
            &mut events,
            self.event(
                "cart_updated",
                &customer_id,
                "",
                serde_json::json!({ "items": items, "value": value, "sent_at_ns": sent_at }),
            ),
        )
        .await?;
        self.recommend(&mut reco, &customer_id, pb::Placement::Cart, ids.clone(), 6)
            .await?;
        lock(&self.funnel).carts += 1;
        lock(&self.carts_and_orders).push(CartOrOrder {
            customer_id: customer_id.clone(),
            at: Instant::now(),
            order: false,
        });
        if rng.random::<f64>() >= 0.5 {
            return Ok(());
        }
        tokio::time::sleep(think(&mut rng)).await;
        self.track(
            &mut events,
            self.event(
                "checkout_started",
                &customer_id,
                "",
                serde_json::json!({ "value": value }),
            ),
        )
        .await?;
        self.recommend(&mut reco, &customer_id, pb::Placement::Checkout, ids, 4)
            .await?;
        lock(&self.funnel).checkouts += 1;
        if rng.random::<f64>() >= 0.7 {
            return Ok(());
        }
        tokio::time::sleep(think(&mut rng)).await;
        let order = serde_json::json!({ "order_id": format!("o-{}-{index}", self.run), "revenue": value, "currency": "GBP", "items": items });
        self.track(
            &mut events,
            self.event("order_completed", &customer_id, "", order),
        )
        .await?;
        lock(&self.funnel).orders += 1;
        lock(&self.carts_and_orders).push(CartOrOrder {
            customer_id: customer_id.clone(),
            at: Instant::now(),
            order: true,
        });
        Ok(())
    }
}

/// Starts sessions at `rate` per second until `until` or `stop`, each at its due time (open
/// loop); returns once every started session ended.
async fn drive_sessions(
    store: Arc<Storefront>,
    rate: f64,
    seed: u64,
    until: Instant,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut running = Vec::new();
    let mut index = 0u64;
    loop {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        if due >= until || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {}
            () = stop.cancelled() => break,
        }
        let store = store.clone();
        running.push(tokio::spawn(async move {
            let result = store.session(index, seed).await;
            let mut funnel = lock(&store.funnel);
            funnel.sessions += 1;
            if result.is_err() {
                funnel.failed += 1;
            }
        }));
        index += 1;
    }
    for session in running {
        session.await.context("a session panicked")?;
    }
    Ok(())
}

async fn prepare_shop(
    common: &Common,
    audience: u32,
    wait_secs: u64,
) -> anyhow::Result<(Platform, Arc<Storefront>, Setup)> {
    let started = Instant::now();
    let retail = Retail::load(&common.online_retail)?;
    let platform = start(common, audience).await?;
    let mut setup = Setup::default();
    platform.seed_shop(&retail, &mut setup).await?;
    platform.flows(wait_secs).await?;
    if audience > 0 {
        setup.audience = u64::from(audience);
        setup.audience_secs = platform.bulk_audience(audience).await?;
        println!(
            "setup: audience of {audience} written in {:.1}s",
            setup.audience_secs
        );
    }
    platform.quiesce(Duration::from_secs(120)).await;
    platform.fake.clear();
    setup.secs = started.elapsed().as_secs_f64();
    let store = Arc::new(Storefront {
        retail,
        channels: platform.channels.clone(),
        key: platform.app.admin_key.clone(),
        recorder: SharedRecorder::default(),
        funnel: Mutex::new(Funnel::default()),
        carts_and_orders: Mutex::new(Vec::new()),
        run: platform.app.env.id.clone(),
    });
    Ok((platform, store, setup))
}

/// Waits for the last reminders: abandoned carts of the last `wait` seconds are still due.
async fn wait_for_reminders(platform: &Platform, store: &Storefront, wait_secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(wait_secs + 30);
    let due = reminders_due(
        lock(&store.carts_and_orders).clone(),
        Duration::from_secs(wait_secs),
    );
    loop {
        let (received, _, _) = platform.cart_messages(wait_secs);
        if received >= due || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn end_to_end(platform: &Platform, store: &Storefront, wait_secs: u64) -> EndToEnd {
    let funnel = lock(&store.funnel).clone();
    let (messages, latency, beyond) = platform.cart_messages(wait_secs);
    EndToEnd {
        wait_secs,
        abandoned_carts: funnel.carts - funnel.orders,
        reminders_due: reminders_due(
            lock(&store.carts_and_orders).clone(),
            Duration::from_secs(wait_secs),
        ),
        messages,
        latency: Percentiles::of(&latency),
        beyond_wait: Percentiles::of(&beyond),
    }
}

/// Stops the services. The load's connections are closed first: the server's graceful
/// shutdown waits for open connections.
async fn finish(platform: Platform, store: Option<Arc<Storefront>>) {
    drop(store);
    let Platform { app, stop, .. } = platform;
    stop.cancel();
    // The services drain in-flight work; the results are already taken.
    if tokio::time::timeout(Duration::from_secs(30), app.stop())
        .await
        .is_err()
    {
        println!("note: the services took more than 30 s to stop");
    }
}

// --- shop-day -----------------------------------------------------------------------------

pub async fn shop_day(args: &ShopArgs) -> anyhow::Result<LoadResult> {
    let (platform, store, setup) = prepare_shop(&args.common, 0, args.wait_secs).await?;
    println!(
        "shop-day: {} sessions/s for {} s",
        args.session_rate, args.duration
    );
    let cpu = cpu_times();
    Recorder::begin(&store.recorder, "shop");
    let until = Instant::now() + Duration::from_secs(args.duration);
    drive_sessions(
        store.clone(),
        args.session_rate,
        args.common.seed,
        until,
        platform.stop.clone(),
    )
    .await?;
    let end = Instant::now();
    let cpu_busy = busy_share(cpu, cpu_times());
    println!("shop-day: sessions done; waiting for the last reminders");
    wait_for_reminders(&platform, &store, args.wait_secs).await;
    let (phases, rpcs) = lock(&store.recorder).finish(end);
    // Each read takes the lock on its own: a guard in the struct literal below would live
    // to the end of the statement.
    let funnel = lock(&store.funnel).clone();
    let e2e = end_to_end(&platform, &store, args.wait_secs);
    let result = LoadResult {
        scenario: "shop-day".into(),
        config: serde_json::json!({
            "session_rate": args.session_rate, "duration_secs": args.duration, "wait_secs": args.wait_secs,
            "db_connections": args.common.db_connections, "connections": args.common.connections, "seed": args.common.seed,
        }),
        setup,
        phases,
        rpcs,
        funnel: Some(funnel),
        end_to_end: Some(e2e),
        backlog: None,
        broadcast: None,
        cpu_busy,
    };
    finish(platform, Some(store)).await;
    Ok(result)
}

// --- ingestion-burst ----------------------------------------------------------------------

/// Track at `track_rate`/s and TrackBatch at `batch_rate`/s (each at its due time) from
/// `from` for `secs`.
async fn ingest_phase(
    platform: &Platform,
    recorder: &SharedRecorder,
    generator: &Mutex<crate::generate::Generator>,
    args: &BurstArgs,
    factor: u32,
    secs: u64,
) -> anyhow::Result<u64> {
    let track_rate = f64::from(args.track_rate * factor);
    let batch_rate = f64::from(args.batch_rate * factor);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut running = Vec::new();
    let mut tracks = 0u64;
    let mut batches = 0u64;
    let mut sent = 0u64;
    loop {
        let next_track = start + Duration::from_secs_f64(tracks as f64 / track_rate.max(1e-9));
        let next_batch = start + Duration::from_secs_f64(batches as f64 / batch_rate.max(1e-9));
        let (due, is_batch) = if batch_rate > 0.0 && (track_rate <= 0.0 || next_batch < next_track)
        {
            (next_batch, true)
        } else {
            (next_track, false)
        };
        if due >= end {
            break;
        }
        let size = if is_batch { args.batch } else { 1 };
        let mut events = Vec::with_capacity(size);
        {
            let mut generator = lock(generator);
            for _ in 0..size {
                events.push(generator.next_event().to_proto());
            }
        }
        tokio::time::sleep_until(due.into()).await;
        let mut client = EventsClient::new(platform.channel((tracks + batches) as usize));
        let key = platform.app.admin_key.clone();
        let recorder = recorder.clone();
        sent += size as u64;
        running.push(tokio::spawn(async move {
            if is_batch {
                let request = authed(&key, pb::TrackBatchRequest { events });
                let _ = timed(&recorder, "Events.TrackBatch", client.track_batch(request)).await;
            } else {
                let event = events.pop();
                let request = authed(&key, pb::TrackRequest { event });
                let _ = timed(&recorder, "Events.Track", client.track(request)).await;
            }
        }));
        if is_batch {
            batches += 1;
        } else {
            tracks += 1;
        }
    }
    for call in running {
        call.await.context("a call panicked")?;
    }
    Ok(sent)
}

pub async fn ingestion_burst(args: &BurstArgs) -> anyhow::Result<LoadResult> {
    let platform = start(&args.common, 0).await?;
    let generator = Mutex::new(crate::generate::Generator::new(
        args.common.seed,
        crate::generate::Shape {
            customers: 100_000,
            products: 5_000,
            anonymous_share: 0.1,
        },
        crate::generate::now(),
    ));
    let recorder = SharedRecorder::default();
    let base = f64::from(args.track_rate) + f64::from(args.batch_rate) * args.batch as f64;
    println!(
        "ingestion-burst: {base:.0} events/s for {} s, {:.0}/s for {} s, {base:.0}/s for {} s",
        args.before_secs,
        base * f64::from(args.burst_factor),
        args.burst_secs,
        args.after_secs
    );
    // A short untimed warm-up: connections, prepared statements, this month's partition.
    ingest_phase(&platform, &recorder, &generator, args, 1, 2).await?;
    platform.quiesce(Duration::from_secs(60)).await;

    // The sampler: relay backlog and queue depths every 250 ms, until stopped.
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = CancellationToken::new();
    let sampler = {
        let samples = samples.clone();
        let sampling = sampling.clone();
        let probe = platform.probe();
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                let (backlog, lag) = probe.relay_backlog().await;
                let queued = probe.queued().await;
                lock(&samples).push((t0.elapsed().as_secs_f64(), backlog, lag, queued));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    () = sampling.cancelled() => {}
                }
            }
        })
    };
    let cpu = cpu_times();
    let mut sent = 0u64;
    Recorder::begin(&recorder, "before");
    sent += ingest_phase(&platform, &recorder, &generator, args, 1, args.before_secs).await?;
    Recorder::begin(&recorder, "burst");
    sent += ingest_phase(
        &platform,
        &recorder,
        &generator,
        args,
        args.burst_factor,
        args.burst_secs,
    )
    .await?;
    let burst_end = t0.elapsed().as_secs_f64();
    Recorder::begin(&recorder, "after");
    sent += ingest_phase(&platform, &recorder, &generator, args, 1, args.after_secs).await?;
    let end = Instant::now();
    let cpu_busy = busy_share(cpu, cpu_times());
    // Follow the backlog until it is empty (the base traffic has stopped by now if it was
    // still not drained).
    let deadline = Instant::now() + Duration::from_secs(args.drain_timeout_secs);
    loop {
        let drained = lock(&samples)
            .iter()
            .filter(|(t, ..)| *t > burst_end)
            .any(|(_, backlog, _, queued)| *backlog == 0 && *queued == 0);
        if drained || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sampling.cancel();
    sampler.await.context("the sampler panicked")?;
    let samples = lock(&samples).clone();
    // Drained: the first sample after the burst with nothing waiting anywhere.
    let drain_secs = samples
        .iter()
        .find(|(t, backlog, _, queued)| *t > burst_end && *backlog == 0 && *queued == 0)
        .map(|(t, ..)| t - burst_end);
    let max_relay_backlog = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_relay_lag_secs = samples.iter().map(|s| s.2).fold(0.0, f64::max);
    let max_queued = samples.iter().map(|s| s.3).max().unwrap_or(0);
    let (phases, rpcs) = lock(&recorder).finish(end);
    let result = LoadResult {
        scenario: "ingestion-burst".into(),
        config: serde_json::json!({
            "track_rate": args.track_rate, "batch_rate": args.batch_rate, "batch": args.batch,
            "before_secs": args.before_secs, "burst_secs": args.burst_secs, "burst_factor": args.burst_factor,
            "after_secs": args.after_secs, "db_connections": args.common.db_connections, "seed": args.common.seed,
        }),
        setup: Setup::default(),
        phases,
        rpcs,
        funnel: None,
        end_to_end: None,
        backlog: Some(Backlog {
            events_sent: sent,
            base_events_per_sec: base,
            burst_events_per_sec: base * f64::from(args.burst_factor),
            max_relay_backlog,
            max_relay_lag_secs,
            max_queued,
            drain_secs,
            samples,
        }),
        broadcast: None,
        cpu_busy,
    };
    finish(platform, None).await;
    Ok(result)
}

/// The backlog readings, apart from [`Platform`] so that the sampler task can own them.
struct Probe {
    pool: sqlx::PgPool,
    bus: Arc<relance_kit::bus::Bus>,
}

impl Probe {
    async fn relay_backlog(&self) -> (u64, f64) {
        let row: Result<(i64, Option<f64>), _> = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM clock_timestamp() - min(e.received_at))::float8 \
             FROM events.events e, events.relay_cursor c WHERE (e.xid, e.seq) > (c.xid, c.seq)",
        )
        .fetch_one(&self.pool)
        .await;
        match row {
            Ok((count, age)) => (count as u64, age.unwrap_or(0.0)),
            Err(_) => (0, 0.0),
        }
    }

    async fn queued(&self) -> u64 {
        let mut waiting = 0u64;
        for queue in QUEUES {
            waiting += u64::from(self.bus.queue_depth(queue).await.unwrap_or(0));
        }
        waiting
    }
}

// --- black-friday -------------------------------------------------------------------------

pub async fn black_friday(args: &BlackFridayArgs) -> anyhow::Result<LoadResult> {
    let shop = &args.shop;
    let (platform, store, setup) =
        prepare_shop(&shop.common, args.audience, shop.wait_secs).await?;
    // Bodies are kept for the cart reminders' end-to-end times; at a million pushes they
    // would hold too much memory, and the count is all the broadcast needs.
    platform.fake.record_bodies(args.audience <= 200_000);
    println!(
        "black-friday: {} sessions/s, {} s before the broadcast to {}, at most {} s",
        shop.session_rate, args.baseline_secs, args.audience, args.max_secs
    );
    let cpu = cpu_times();
    let traffic_stop = CancellationToken::new();
    Recorder::begin(&store.recorder, "before");
    let run_start = Instant::now();
    let traffic = tokio::spawn(drive_sessions(
        store.clone(),
        shop.session_rate,
        shop.common.seed,
        run_start + Duration::from_secs(args.baseline_secs + args.max_secs),
        traffic_stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;

    Recorder::begin(&store.recorder, "broadcast");
    let mut campaigns = CampaignsClient::new(platform.channel(0));
    let fcm_before = platform.fake.count();
    let started = Instant::now();
    let yaml = format!(
        "kind: Broadcast\nname: {BROADCAST}\nsegment: {BROADCAST_SEGMENT}\nchannel: push\ntemplate: {BROADCAST_TEMPLATE}\n\
         schedule: now\nignore_frequency_caps: true\nignore_quiet_hours: true\n"
    );
    let scheduled = campaigns
        .schedule_broadcast(platform.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Yaml(yaml)),
            dry_run: false,
        }))
        .await
        .context("ScheduleBroadcast")?
        .into_inner();
    if !scheduled.errors.is_empty() {
        anyhow::bail!("the broadcast was refused: {:?}", scheduled.errors);
    }
    let audience = u64::from(args.audience);
    let deadline = started + Duration::from_secs(args.max_secs);
    let mut queued = 0u64;
    let mut queued_secs = None;
    let mut sent = 0u64;
    let mut sent_secs = None;
    let mut last_print = Instant::now();
    // Progress from campaigns' own counter (queued) and delivery's ledger (messages of this
    // broadcast handed to the provider, or failed/skipped), every 2 s: the fake's count alone
    // would mix in the cart reminders.
    let mut failed = 0u64;
    while Instant::now() < deadline {
        let state: Option<(i64,)> = sqlx::query_as(
            "SELECT queued FROM campaigns.broadcasts WHERE workspace_id = $1 AND name = $2",
        )
        .bind(&platform.app.workspace)
        .bind(BROADCAST)
        .fetch_optional(&platform.pool)
        .await
        .unwrap_or(None);
        queued = state.map_or(0, |(q,)| q as u64);
        if queued_secs.is_none() && queued >= audience {
            queued_secs = Some(started.elapsed().as_secs_f64());
        }
        if let Ok((done, not_sent)) = broadcast_sent(&platform).await {
            sent = done;
            failed = not_sent;
        }
        if sent + failed >= audience {
            sent_secs = Some(started.elapsed().as_secs_f64());
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!(
                "broadcast: {queued} queued, {sent} sent, {failed} failed after {:.0}s (fake FCM requests: {})",
                started.elapsed().as_secs_f64(),
                platform.fake.count() - fcm_before
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let broadcast_end = Instant::now();
    Recorder::begin(&store.recorder, "after");
    // A little traffic after, then stop: the latency once the broadcast is over.
    tokio::time::sleep(Duration::from_secs(args.baseline_secs.min(30))).await;
    traffic_stop.cancel();
    traffic.await.context("the traffic task panicked")??;
    let end = Instant::now();
    let cpu_busy = busy_share(cpu, cpu_times());
    let elapsed = broadcast_end.duration_since(started).as_secs_f64();
    let broadcast = BroadcastRun {
        audience,
        queued,
        sent,
        failed,
        queued_per_sec: queued as f64 / queued_secs.unwrap_or(elapsed).max(1e-9),
        sent_per_sec: sent as f64 / sent_secs.unwrap_or(elapsed).max(1e-9),
        queued_secs,
        sent_secs,
        complete_secs: sent_secs,
    };
    let (phases, rpcs) = lock(&store.recorder).finish(end);
    let e2e = (args.audience <= 200_000).then(|| end_to_end(&platform, &store, shop.wait_secs));
    let funnel = lock(&store.funnel).clone();
    let result = LoadResult {
        scenario: "black-friday".into(),
        config: serde_json::json!({
            "session_rate": shop.session_rate, "baseline_secs": args.baseline_secs, "audience": args.audience,
            "max_secs": args.max_secs, "wait_secs": shop.wait_secs, "db_connections": shop.common.db_connections,
            "connections": shop.common.connections, "seed": shop.common.seed,
        }),
        setup,
        phases,
        rpcs,
        funnel: Some(funnel),
        end_to_end: e2e,
        backlog: None,
        broadcast: Some(broadcast),
        cpu_busy,
    };
    finish(platform, Some(store)).await;
    Ok(result)
}

/// The broadcast's messages in delivery's ledger: handed to the provider (sent or
/// delivered), and failed or skipped.
async fn broadcast_sent(platform: &Platform) -> anyhow::Result<(u64, u64)> {
    let (sent, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN (2, 3)), count(*) FILTER (WHERE status IN (4, 5)) \
         FROM delivery.messages WHERE workspace_id = $1 AND broadcast = $2",
    )
    .bind(&platform.app.workspace)
    .bind(BROADCAST)
    .fetch_one(&platform.pool)
    .await?;
    Ok((sent as u64, failed as u64))
}

// --- The report ---------------------------------------------------------------------------

/// The `loadtest` section of BENCHMARKS.md from the `*.json` results of a folder.
pub fn render(dir: &Path, meta: &[(String, String)]) -> anyhow::Result<String> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut md = String::new();
    md.push_str("## Load tests (`make loadtest SCENARIO=…`)\n\n");
    md.push_str("| | |\n|---|---|\n");
    for (key, value) in meta {
        md.push_str(&format!("| {key} | {value} |\n"));
    }
    md.push('\n');
    let mut seen = HashSet::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let result: LoadResult = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a load test result", path.display()))?;
        if !seen.insert(result.scenario.clone()) {
            continue;
        }
        md.push_str(&format!("### {}\n\n", result.scenario));
        md.push_str(&format!("Settings: `{}`. ", result.config));
        let phases: Vec<String> = result
            .phases
            .iter()
            .map(|p| format!("{} {:.0} s", p.name, p.secs))
            .collect();
        md.push_str(&format!(
            "Phases: {}; machine CPU busy {:.0}% over them.",
            phases.join(", "),
            result.cpu_busy
        ));
        if result.setup.items > 0 {
            md.push_str(&format!(
                " Setup (untimed): {} products, {} customers, {} orders of history, model v{}{} in {:.0} s.",
                result.setup.items,
                result.setup.customers,
                result.setup.orders,
                result.setup.model_version,
                if result.setup.audience > 0 { format!(", audience of {} written in {:.1} s", result.setup.audience, result.setup.audience_secs) } else { String::new() },
                result.setup.secs
            ));
        }
        md.push_str("\n\n");
        if let Some(f) = &result.funnel {
            md.push_str(&format!(
                "Sessions: {} ({} sign-ups, {} anonymous, {} ended by an error): {} product views, {} carts, {} checkouts, {} orders.\n\n",
                f.sessions, f.signups, f.anonymous, f.failed, f.product_views, f.carts, f.checkouts, f.orders
            ));
        }
        md.push_str("| phase | RPC | calls | errors | per s | p50 ms | p99 ms | p99.9 ms |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
        for r in &result.rpcs {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
                r.phase,
                r.rpc,
                r.calls,
                r.errors,
                r.per_sec,
                r.latency.p50,
                r.latency.p99,
                r.latency.p999
            ));
        }
        md.push('\n');
        for r in &result.rpcs {
            if let Some(error) = &r.first_error {
                md.push_str(&format!(
                    "Errors of {} in phase {}: {} of {} calls, the first: `{error}`.\n\n",
                    r.rpc, r.phase, r.errors, r.calls
                ));
            }
        }
        if let Some(e) = &result.end_to_end {
            md.push_str(&format!(
                "End to end, Track `cart_updated` → the push at the fake FCM (flow wait {} s): **{} reminders of {} due** ({} carts left without an order: a customer's cart while their reminder is pending joins it, an order in a later session cancels it); p50 **{:.2} s**, p99 **{:.2} s**, p99.9 {:.2} s — beyond the wait p50 {:.0} ms, p99 {:.0} ms.\n\n",
                e.wait_secs, e.messages, e.reminders_due, e.abandoned_carts, e.latency.p50 / 1000.0, e.latency.p99 / 1000.0, e.latency.p999 / 1000.0, e.beyond_wait.p50, e.beyond_wait.p99
            ));
        }
        if let Some(b) = &result.backlog {
            md.push_str(&format!(
                "Events: {} sent, base {:.0}/s, burst {:.0}/s. Relay backlog (stored, not yet published) at most {} events, the oldest {:.1} s old; consumers' queues at most {} messages; {}.\n\n",
                b.events_sent,
                b.base_events_per_sec,
                b.burst_events_per_sec,
                b.max_relay_backlog,
                b.max_relay_lag_secs,
                b.max_queued,
                b.drain_secs.map_or("not drained before the timeout".to_owned(), |s| format!("drained **{s:.1} s** after the burst ended"))
            ));
        }
        if let Some(b) = &result.broadcast {
            let secs =
                |s: Option<f64>| s.map_or("not done in time".to_owned(), |s| format!("{s:.1} s"));
            md.push_str(&format!(
                "Broadcast to {}: queued {} ({}, {:.0}/s), sent to the fake FCM {} ({}, **{:.0}/s**); complete: {}.\n\n",
                b.audience, b.queued, secs(b.queued_secs), b.queued_per_sec, b.sent, secs(b.sent_secs), b.sent_per_sec, secs(b.complete_secs)
            ));
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reminders_due_follow_the_flow_s_journeys() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(30);
        let step = |customer: &str, secs: u64, order: bool| CartOrOrder {
            customer_id: customer.to_owned(),
            at: t0 + Duration::from_secs(secs),
            order,
        };
        let timeline = vec![
            // a: two carts within the wait share one reminder; a later cart gets its own.
            step("a", 0, false),
            step("a", 10, false),
            step("a", 45, false),
            // b: the order during the wait cancels the reminder.
            step("b", 0, false),
            step("b", 20, true),
            // c: the order comes after the reminder was sent.
            step("c", 0, false),
            step("c", 40, true),
            // d: an order with no cart owes nothing.
            step("d", 5, true),
        ];
        assert_eq!(reminders_due(timeline, wait), 3);
    }
}
