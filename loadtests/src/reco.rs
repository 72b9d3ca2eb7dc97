//! Recommendations benchmarks.
//!
//! - `reco-latency`: `Recommend` at a fixed request rate, open loop (latency from each
//!   request's due time, as in `rate.rs`), or the no-op `Ping` on the same server stack —
//!   the baseline, so that the difference is the cost of recommending.
//! - `reco-max`: a closed loop with C requests always in flight: the most the service
//!   answers per second, for `Recommend` and `Ping` alike.
//! - `reco-generate`: a large synthetic shop (customers, orders, product views, catalog)
//!   written straight into Postgres, to train at scale.
//! - `reco-report`: the results of `bench/reco.sh` → the `reco` section of BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Datelike as _, NaiveDate, SecondsFormat};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use relance_kit::auth::BearerKey;
use relance_proto::v1 as pb;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use serde::{Deserialize, Serialize};
use sqlx::{Connection as _, PgConnection};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::client::Target;
use crate::ingest::push_copy_escaped;
use crate::report::thousands;
use crate::stats::{self, Percentiles, RateResult};

// --- Connections ----------------------------------------------------------------------------

type Client = RecommendationsClient<InterceptedService<Channel, BearerKey>>;

/// A call that takes longer has failed: a stuck server must not hang the benchmark.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to keep retrying the first connection (the server may still be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

/// `count` clients, each on its own HTTP/2 connection, like `Target::connect` does for the
/// events service.
async fn connect(target: &Target, count: usize) -> anyhow::Result<Vec<Client>> {
    let key = BearerKey::new(&target.api_key)
        .map_err(|_| anyhow::anyhow!("--api-key: not a valid key"))?;
    let endpoint = Endpoint::from_shared(target.addr.clone())
        .with_context(|| format!("--addr {}", target.addr))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT);
    crate::client::ensure_loopback("--addr", endpoint.uri().host().unwrap_or_default())?;
    let mut clients = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("waiting for {} ({error})", endpoint.uri());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => {
                    anyhow::bail!(
                        "cannot reach {} ({error}); is `relance serve recommendations` running?",
                        endpoint.uri()
                    );
                }
            }
        };
        clients.push(RecommendationsClient::with_interceptor(
            channel,
            key.clone(),
        ));
    }
    Ok(clients)
}

/// Pings once (waiting up to `wait` seconds for a model when asked) and returns the model
/// version serving the key's workspace. A refused key or a server without the
/// recommendations service fails here, not as a run of 100% errors.
async fn check(client: &mut Client, wait: u32) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(u64::from(wait));
    loop {
        let version = client
            .ping(pb::PingRequest {})
            .await
            .context("Ping (is `relance serve recommendations` running, and the key valid?)")?
            .into_inner()
            .model_version;
        if version > 0 || wait == 0 {
            return Ok(version);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the key's workspace still serves no model after {wait} s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// --- What is asked --------------------------------------------------------------------------

/// The call measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rpc {
    /// The hot path: the best 5 items for a customer on a placement.
    Recommend,
    /// Does nothing but check the key and answer: the baseline of the server stack.
    Ping,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::Recommend => "Recommend",
            Rpc::Ping => "Ping",
        }
    }
}

/// A shop's traffic: (placement, share in percent, fewest and most context items).
const PLACEMENT_MIX: [(pb::Placement, u32, usize, usize); 5] = [
    (pb::Placement::Home, 30, 0, 0),
    (pb::Placement::Product, 25, 1, 1),
    (pb::Placement::Cart, 25, 1, 3),
    (pb::Placement::Checkout, 10, 1, 3),
    (pb::Placement::Email, 10, 0, 0),
];

/// The placement of a roll in 0..100 and the range of its number of context items.
fn placement_of(roll: u32) -> (pb::Placement, usize, usize) {
    let mut upper = 0;
    for (placement, share, fewest, most) in PLACEMENT_MIX {
        upper += share;
        if roll < upper {
            return (placement, fewest, most);
        }
    }
    let (placement, _, fewest, most) = PLACEMENT_MIX[PLACEMENT_MIX.len() - 1];
    (placement, fewest, most)
}

/// Where request ids come from.
#[derive(Debug, Clone, clap::Args)]
pub struct IdsArgs {
    /// Take customer ids (invoices with a customer) and item ids (their lines' stock codes)
    /// from this Online Retail file, as `relance import online-retail` stored them.
    #[arg(long, conflicts_with_all = ["customers", "items", "categories"])]
    pub online_retail: Option<PathBuf>,
    /// Otherwise: generated customers `c0`…`c{N-1}`, as `reco-generate` writes them.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..))]
    pub customers: u32,
    /// Generated items `i0`…`i{N-1}`.
    #[arg(long, default_value_t = 100_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..))]
    pub items: u32,
    /// Categories of the generated items (as given to `reco-generate`): context items are
    /// drawn with the same popularity as its orders.
    #[arg(long, default_value_t = 1_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..))]
    pub categories: u32,
}

/// Which customers and items the requests name, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Population {
    /// `online-retail` or `generated`.
    pub source: String,
    pub customers: u64,
    pub items: u64,
}

/// The ids requests are drawn from.
#[derive(Debug)]
enum Ids {
    /// Online Retail: customers uniformly; context items line by line, so by popularity.
    Retail {
        customers: Vec<String>,
        items: Vec<String>,
        /// The item of every order line.
        lines: Vec<u32>,
    },
    /// The generated shop: customers uniformly; items by the popularity of its orders.
    Generated(Shop),
}

impl Ids {
    fn load(args: &IdsArgs) -> anyhow::Result<Ids> {
        let Some(file) = &args.online_retail else {
            return Ok(Ids::Generated(Shop::new(
                0,
                args.customers,
                args.items,
                args.categories,
            )));
        };
        let reader = relance_retail_data::Reader::open(file)
            .with_context(|| format!("opening {}", file.display()))?;
        let mut customers = Vec::new();
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut lines = Vec::new();
        for invoice in reader {
            let invoice = invoice?;
            let Some(customer) = invoice.customer_id else {
                continue;
            };
            if invoice.is_cancellation {
                continue;
            }
            if seen.insert(customer.clone()) {
                customers.push(customer);
            }
            for line in invoice.lines {
                let next = items.len() as u32;
                let id = *index.entry(line.stock_code.clone()).or_insert(next);
                if id == next {
                    items.push(line.stock_code);
                }
                lines.push(id);
            }
        }
        if customers.is_empty() || lines.is_empty() {
            anyhow::bail!("{}: no invoice with a customer and lines", file.display());
        }
        Ok(Ids::Retail {
            customers,
            items,
            lines,
        })
    }

    fn population(&self) -> Population {
        match self {
            Ids::Retail {
                customers, items, ..
            } => Population {
                source: "online-retail".into(),
                customers: customers.len() as u64,
                items: items.len() as u64,
            },
            Ids::Generated(shop) => Population {
                source: "generated".into(),
                customers: u64::from(shop.customers),
                items: u64::from(shop.items),
            },
        }
    }

    fn customer(&self, rng: &mut StdRng) -> String {
        match self {
            Ids::Retail { customers, .. } => {
                customers[rng.random_range(0..customers.len())].clone()
            }
            Ids::Generated(shop) => format!("c{}", rng.random_range(0..shop.customers)),
        }
    }

    fn item(&self, rng: &mut StdRng) -> String {
        match self {
            Ids::Retail { items, lines, .. } => {
                items[lines[rng.random_range(0..lines.len())] as usize].clone()
            }
            Ids::Generated(shop) => format!("i{}", shop.popular_item(rng)),
        }
    }
}

/// A Recommend request as a shop sends it: a random customer on a placement of the mix,
/// with its context items, 5 items wanted, no filter, a fresh exploration draw.
fn recommend_request(ids: &Ids, rng: &mut StdRng) -> pb::RecommendRequest {
    let (placement, fewest, most) = placement_of(rng.random_range(0..100));
    let wanted = if most == 0 {
        0
    } else {
        rng.random_range(fewest..=most)
    };
    let mut context: Vec<String> = Vec::with_capacity(wanted);
    // A few tries for distinct items (a cart holds each item once).
    for _ in 0..wanted * 4 {
        if context.len() == wanted {
            break;
        }
        let item = ids.item(rng);
        if !context.contains(&item) {
            context.push(item);
        }
    }
    pb::RecommendRequest {
        customer: Some(pb::CustomerRef {
            id: Some(pb::customer_ref::Id::CustomerId(ids.customer(rng))),
        }),
        placement: placement as i32,
        context_item_ids: context,
        n: 5,
        filter: Some(pb::RecommendationFilter {
            in_stock_only: false,
            ..Default::default()
        }),
        seed: None,
        ..Default::default()
    }
}

/// One request, built before it is due.
enum Call {
    Recommend(pb::RecommendRequest),
    Ping,
}

impl Call {
    fn draw(rpc: Rpc, ids: &Ids, rng: &mut StdRng) -> Call {
        match rpc {
            Rpc::Recommend => Call::Recommend(recommend_request(ids, rng)),
            Rpc::Ping => Call::Ping,
        }
    }

    async fn send(self, client: &mut Client) -> Result<(), tonic::Status> {
        match self {
            Call::Recommend(request) => client.recommend(request).await.map(|_| ()),
            Call::Ping => client.ping(pb::PingRequest {}).await.map(|_| ()),
        }
    }
}

/// What both `reco-latency` and `reco-max` take.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The call measured: `recommend`, or `ping` (the no-op baseline).
    #[arg(long, value_enum, default_value_t = Rpc::Recommend)]
    pub rpc: Rpc,
    /// Seconds timed.
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=600))]
    pub duration: u32,
    /// Seconds of the same load first, not timed (connections, caches, the allocator).
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(0..=60))]
    pub warmup: u32,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub connections: usize,
    /// Seed of the drawn customers, placements and context items.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Wait up to this many seconds for the key's workspace to serve a model (what Ping
    /// reports) before starting; 0 starts at once, model or not.
    #[arg(long, default_value_t = 0)]
    pub wait_for_model: u32,
    #[command(flatten)]
    pub ids: IdsArgs,
    /// Write the result as JSON to this file (what `reco-report` reads).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Latency, outcomes and errors by status code of the timed calls.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            latency: stats::new_histogram()?,
            ok: 0,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            first_error: None,
        })
    }

    /// Counts one answer; latency is recorded for successful ones only (an error's time
    /// says nothing of the service's).
    fn add(&mut self, latency: Duration, result: Result<(), tonic::Status>) -> bool {
        match result {
            Ok(()) => {
                self.ok += 1;
                stats::record(&mut self.latency, latency);
                true
            }
            Err(status) => {
                self.errors += 1;
                *self
                    .errors_by_code
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(status.to_string());
                }
                false
            }
        }
    }

    fn merge(&mut self, other: &Tally) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.ok += other.ok;
        self.errors += other.errors;
        for (code, count) in &other.errors_by_code {
            *self.errors_by_code.entry(code.clone()).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        Ok(())
    }

    fn warn(&self, scenario: &str, rpc: Rpc) {
        if let Some(error) = &self.first_error {
            eprintln!(
                "{scenario}: {} {} calls failed, the first with: {error}",
                self.errors,
                rpc.name()
            );
        }
    }
}

/// "0", or "12 (Unavailable 10, Internal 2)".
fn errors_cell(errors: u64, by_code: &BTreeMap<String, u64>) -> String {
    if errors == 0 || by_code.is_empty() {
        return errors.to_string();
    }
    let codes: Vec<String> = by_code
        .iter()
        .map(|(code, count)| format!("{code} {count}"))
        .collect();
    format!("{errors} ({})", codes.join(", "))
}

// --- reco-latency ---------------------------------------------------------------------------

#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Requests per second (at most 50,000).
    #[arg(long, default_value_t = 1_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=50_000))]
    pub rate: u32,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Latency of one call at a fixed rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyResult {
    pub rpc: Rpc,
    pub population: Population,
    /// The model version serving when the run started (Ping's answer); 0 for none.
    pub model_version: u64,
    #[serde(flatten)]
    pub run: RateResult,
    /// From due to actually sent: the load generator's own lag (1 ms timer ticks, a busy
    /// CPU). It is part of `latency`, which starts at the due time.
    pub send_lag: Percentiles,
    pub errors_by_code: BTreeMap<String, u64>,
}

impl LatencyResult {
    pub fn line(&self) -> String {
        format!(
            "reco-latency rpc={} rate={}/s duration={:.0}s sent={} ok={} errors={} achieved={:.0}/s latency p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms (service time p99={:.2}ms, send lag p99={:.2}ms)",
            self.rpc.name(),
            self.run.rate,
            self.run.duration_secs,
            self.run.sent,
            self.run.ok,
            errors_cell(self.run.errors, &self.errors_by_code),
            self.run.achieved_rate,
            self.run.latency.p50,
            self.run.latency.p90,
            self.run.latency.p99,
            self.run.latency.p999,
            self.run.latency.max,
            self.run.service_time.p99,
            self.send_lag.p99,
        )
    }
}

/// What the in-flight requests of an open-loop run record into.
struct Recorder {
    tally: Tally,
    service_time: Histogram<u64>,
    send_lag: Histogram<u64>,
    last_done: Option<Instant>,
}

/// Open loop: request `i` is due at `start + i / rate` whatever happened to the earlier
/// ones, and its latency runs from that due time, so a stall is charged to every request
/// queued behind it (no coordinated omission). Requests are drawn in the scheduling loop
/// just before they are due (not all up front as in `track-rate`: at 50,000/s that would be
/// millions of messages in memory).
pub async fn latency(target: &Target, args: &LatencyArgs) -> anyhow::Result<LatencyResult> {
    let run = &args.run;
    let ids = Ids::load(&run.ids)?;
    let clients = connect(target, run.connections).await?;
    let model_version = check(&mut clients[0].clone(), run.wait_for_model).await?;

    let warmup = u64::from(args.rate) * u64::from(run.warmup);
    let timed = u64::from(args.rate) * u64::from(run.duration);
    let total = warmup + timed;
    let rate = f64::from(args.rate);
    let recorder = Arc::new(Mutex::new(Recorder {
        tally: Tally::new()?,
        service_time: stats::new_histogram()?,
        send_lag: stats::new_histogram()?,
        last_done: None,
    }));
    let mut rng = StdRng::seed_from_u64(run.seed);
    let start = Instant::now() + Duration::from_millis(100);
    let timed_start = start + Duration::from_secs_f64(warmup as f64 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        let call = Call::draw(run.rpc, &ids, &mut rng);
        tokio::time::sleep_until(due.into()).await;
        let mut client = clients[(index % clients.len() as u64) as usize].clone();
        let recorder = recorder.clone();
        let is_timed = index >= warmup;
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = call.send(&mut client).await;
            let done = Instant::now();
            if !is_timed {
                return;
            }
            let mut recorder = lock(&recorder);
            if recorder
                .tally
                .add(done.saturating_duration_since(due), result)
            {
                stats::record(&mut recorder.service_time, done - sent);
                stats::record(&mut recorder.send_lag, sent.saturating_duration_since(due));
            }
            recorder.last_done = Some(recorder.last_done.map_or(done, |last| last.max(done)));
        });
        // Finished tasks are reaped as the run goes rather than kept to the end.
        while let Some(finished) = tasks.try_join_next() {
            finished.context("a request task panicked")?;
        }
    }
    while let Some(finished) = tasks.join_next().await {
        finished.context("a request task panicked")?;
    }

    let recorder = lock(&recorder);
    recorder.tally.warn("reco-latency", run.rpc);
    let window = recorder
        .last_done
        .map_or(0.0, |last| (last - timed_start).as_secs_f64());
    let tally = &recorder.tally;
    Ok(LatencyResult {
        rpc: run.rpc,
        population: ids.population(),
        model_version,
        run: RateResult {
            rate: args.rate,
            duration_secs: f64::from(run.duration),
            connections: clients.len(),
            sent: timed,
            ok: tally.ok,
            errors: tally.errors,
            achieved_rate: if window > 0.0 {
                tally.ok as f64 / window
            } else {
                0.0
            },
            latency: Percentiles::of(&tally.latency),
            service_time: Percentiles::of(&recorder.service_time),
            distribution: stats::distribution(&tally.latency),
        },
        send_lag: Percentiles::of(&recorder.send_lag),
        errors_by_code: tally.errors_by_code.clone(),
    })
}

// --- reco-max -------------------------------------------------------------------------------

#[derive(Debug, Clone, clap::Args)]
pub struct MaxArgs {
    /// Requests in flight at every moment (each caller sends its next one on an answer).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_024))]
    pub concurrency: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The most one call answers per second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxResult {
    pub rpc: Rpc,
    pub population: Population,
    pub model_version: u64,
    pub concurrency: usize,
    pub connections: usize,
    pub duration_secs: f64,
    /// Answers received within the timed window.
    pub ok: u64,
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    /// Successful answers per second over the timed window.
    pub throughput: f64,
    /// From send to answer (a closed loop has no due time: this is service time under
    /// saturation).
    pub latency: Percentiles,
    pub distribution: Vec<(f64, f64)>,
}

impl MaxResult {
    pub fn line(&self) -> String {
        format!(
            "reco-max rpc={} concurrency={} duration={:.0}s ok={} errors={} throughput={:.0}/s latency p50={:.2}ms p99={:.2}ms max={:.2}ms",
            self.rpc.name(),
            self.concurrency,
            self.duration_secs,
            self.ok,
            errors_cell(self.errors, &self.errors_by_code),
            self.throughput,
            self.latency.p50,
            self.latency.p99,
            self.latency.max,
        )
    }
}

/// Closed loop: `concurrency` callers, each sending its next request as soon as the last
/// one is answered, for the warm-up and the timed window; answers arriving within the
/// window are counted. This is the "max sustainable" number, not a latency measurement
/// (the load adapts to the server).
pub async fn max(target: &Target, args: &MaxArgs) -> anyhow::Result<MaxResult> {
    let run = &args.run;
    let ids = Arc::new(Ids::load(&run.ids)?);
    let clients = connect(target, run.connections).await?;
    let model_version = check(&mut clients[0].clone(), run.wait_for_model).await?;

    let timed_start = Instant::now() + Duration::from_secs(u64::from(run.warmup));
    let end = timed_start + Duration::from_secs(u64::from(run.duration));
    let mut workers = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let ids = ids.clone();
        let mut rng = StdRng::seed_from_u64(mix(run.seed, worker as u64));
        let mut tally = Tally::new()?;
        let rpc = run.rpc;
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let call = Call::draw(rpc, &ids, &mut rng);
                let sent = Instant::now();
                let result = call.send(&mut client).await;
                let done = Instant::now();
                if done < timed_start || done >= end {
                    continue;
                }
                tally.add(done.saturating_duration_since(sent), result);
            }
            tally
        }));
    }
    let mut tally = Tally::new()?;
    for worker in workers {
        let worker_tally = worker.await.context("a caller panicked")?;
        tally.merge(&worker_tally)?;
    }
    tally.warn("reco-max", run.rpc);
    let duration = f64::from(run.duration);
    Ok(MaxResult {
        rpc: run.rpc,
        population: ids.population(),
        model_version,
        concurrency: args.concurrency,
        connections: clients.len(),
        duration_secs: duration,
        ok: tally.ok,
        errors: tally.errors,
        errors_by_code: tally.errors_by_code.clone(),
        throughput: tally.ok as f64 / duration,
        latency: Percentiles::of(&tally.latency),
        distribution: stats::distribution(&tally.latency),
    })
}

// --- The synthetic shop ---------------------------------------------------------------------

/// Zipf exponent of popularity, across categories and within each.
const ZIPF_EXPONENT: f64 = 1.0;
/// Chance that an order line or a view is in one of the customer's preferred categories.
const PREFERRED_SHARE: f64 = 0.8;
/// Orders per customer: geometric with this success chance, truncated to 1..=MAX_ORDERS
/// (mean ≈ 3.7, so with ~2 views per order ≈ 11 events per customer).
const ORDER_P: f64 = 0.15;
const MAX_ORDERS: u32 = 8;

/// SplitMix64's finaliser: a well-mixed 64-bit value of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for item `index` of stream `seed`: each customer (or item) gets its own random
/// stream, so that any one of them can be generated alone and in any order.
fn mix(seed: u64, index: u64) -> u64 {
    splitmix64(seed ^ splitmix64(index))
}

/// Cumulative shares of ranks 0..n under Zipf's law, the last exactly 1.
fn zipf_cdf(n: usize, exponent: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n);
    let mut total = 0.0;
    for rank in 0..n {
        total += 1.0 / ((rank + 1) as f64).powf(exponent);
        cdf.push(total);
    }
    for share in &mut cdf {
        *share /= total;
    }
    cdf
}

fn draw(cdf: &[f64], rng: &mut StdRng) -> usize {
    let roll: f64 = rng.random();
    cdf.partition_point(|&share| share <= roll)
        .min(cdf.len().saturating_sub(1))
}

/// A synthetic shop big enough to train at scale, with structure for collaborative
/// filtering to find: item `j` is in category `j % categories` at popularity rank
/// `j / categories`; categories and the items within each are Zipf-popular; each customer
/// prefers 1–3 categories and buys and views mostly (80%) there.
#[derive(Debug, Clone)]
pub struct Shop {
    seed: u64,
    customers: u32,
    items: u32,
    categories: u32,
    category_cdf: Vec<f64>,
    rank_cdf: Vec<f64>,
}

/// One generated order and the product views before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenOrder {
    /// Unix seconds.
    pub at: i64,
    /// (item, quantity), each item once.
    pub lines: Vec<(u32, u32)>,
    /// (unix seconds, item), oldest first, all before `at`.
    pub views: Vec<(i64, u32)>,
}

impl Shop {
    pub fn new(seed: u64, customers: u32, items: u32, categories: u32) -> Shop {
        let items = items.max(1);
        let categories = categories.clamp(1, items);
        Shop {
            seed,
            customers: customers.max(1),
            items,
            categories,
            category_cdf: zipf_cdf(categories as usize, ZIPF_EXPONENT),
            rank_cdf: zipf_cdf(items.div_ceil(categories) as usize, ZIPF_EXPONENT),
        }
    }

    fn category_of(&self, item: u32) -> u32 {
        item % self.categories
    }

    /// Items in `category`: the first `items % categories` categories have one more.
    fn category_size(&self, category: u32) -> u32 {
        self.items / self.categories + u32::from(category < self.items % self.categories)
    }

    fn popular_category(&self, rng: &mut StdRng) -> u32 {
        draw(&self.category_cdf, rng) as u32
    }

    /// An item of `category`, by popularity within it.
    fn item_in(&self, category: u32, rng: &mut StdRng) -> u32 {
        loop {
            let rank = draw(&self.rank_cdf, rng) as u32;
            // Only the last rank can be missing from a category (a rare redraw).
            if rank < self.category_size(category) {
                return rank * self.categories + category;
            }
        }
    }

    /// An item by overall popularity: what shoppers look at.
    fn popular_item(&self, rng: &mut StdRng) -> u32 {
        let category = self.popular_category(rng);
        self.item_in(category, rng)
    }

    /// An item a customer with these preferred categories picks.
    fn pick(&self, preferred: &[u32], rng: &mut StdRng) -> u32 {
        let category = if rng.random_bool(PREFERRED_SHARE) {
            preferred[rng.random_range(0..preferred.len())]
        } else {
            self.popular_category(rng)
        };
        self.item_in(category, rng)
    }

    /// 1–3 distinct categories, popular ones more often: a customer's tastes.
    fn preferences(&self, rng: &mut StdRng) -> Vec<u32> {
        let wanted = rng.random_range(1..=3usize).min(self.categories as usize);
        let mut preferred: Vec<u32> = Vec::with_capacity(wanted);
        for _ in 0..wanted * 8 {
            if preferred.len() == wanted {
                break;
            }
            let category = self.popular_category(rng);
            if !preferred.contains(&category) {
                preferred.push(category);
            }
        }
        preferred
    }

    /// The orders of `customer`, oldest first, between `from` and `until` (unix seconds,
    /// at least an hour apart): the same for the same seed, whatever else is generated.
    pub fn customer_orders(&self, customer: u32, from: i64, until: i64) -> Vec<GenOrder> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, u64::from(customer)));
        let preferred = self.preferences(&mut rng);
        let count = orders_count(&mut rng);
        // Views come up to an hour before their order: orders start an hour in.
        let first = from + 3_600;
        let mut times: Vec<i64> = (0..count)
            .map(|_| rng.random_range(first..until.max(first + 1)))
            .collect();
        times.sort_unstable();
        let mut orders = Vec::with_capacity(times.len());
        for at in times {
            let size = rng.random_range(1..=5usize);
            let mut lines: Vec<(u32, u32)> = Vec::with_capacity(size);
            for _ in 0..size * 4 {
                if lines.len() == size {
                    break;
                }
                let item = self.pick(&preferred, &mut rng);
                if lines.iter().any(|(known, _)| *known == item) {
                    continue;
                }
                let quantity = match rng.random_range(0..100) {
                    0..80 => 1,
                    80..95 => 2,
                    _ => 3,
                };
                lines.push((item, quantity));
            }
            // ~2 views per order: one of the items bought, the others browsed around it.
            let view_count = rng.random_range(1..=3usize);
            let mut views = Vec::with_capacity(view_count);
            for index in 0..view_count {
                let item = if index == 0 {
                    lines[rng.random_range(0..lines.len())].0
                } else {
                    self.pick(&preferred, &mut rng)
                };
                views.push((at - rng.random_range(60..3_600), item));
            }
            views.sort_unstable();
            orders.push(GenOrder { at, lines, views });
        }
        orders
    }

    fn item_hash(&self, item: u32) -> u64 {
        mix(self.seed ^ 0x17E3_5EED, u64::from(item))
    }

    /// Price in cents, log-uniform from 1.50 to 150.00.
    fn price_cents(&self, item: u32) -> u64 {
        let unit = (self.item_hash(item) >> 11) as f64 / (1u64 << 53) as f64;
        (150.0 * 100f64.powf(unit)).round() as u64
    }

    fn in_stock(&self, item: u32) -> bool {
        self.item_hash(item) % 100 < 95
    }
}

/// 1..=MAX_ORDERS, geometric truncated by inversion: a roll in [q^MAX, 1) maps to 1..=MAX.
fn orders_count(rng: &mut StdRng) -> u32 {
    let q = 1.0 - ORDER_P;
    let floor = q.powi(MAX_ORDERS as i32);
    let roll = floor + (1.0 - floor) * rng.random::<f64>();
    let count = 1 + (roll.ln() / q.ln()).floor() as u32;
    count.clamp(1, MAX_ORDERS)
}

// --- reco-generate --------------------------------------------------------------------------

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Postgres database of the Relance to train (after `relance migrate`).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    pub database_url: String,
    /// Workspace the events and items are written to.
    #[arg(long, default_value = "bench-large")]
    pub workspace: String,
    /// Customers `c0`…, each with 1–8 orders.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=50_000_000))]
    pub customers: u32,
    /// Catalog items `i0`….
    #[arg(long, default_value_t = 100_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=10_000_000))]
    pub items: u32,
    /// Categories the items are spread over.
    #[arg(long, default_value_t = 1_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=100_000))]
    pub categories: u32,
    /// Days of history, ending at 00:00 UTC today (so that runs on the same day write the
    /// same rows).
    #[arg(long, default_value_t = 180, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=365))]
    pub days: u32,
    /// Seed of the shop: the same seed, sizes and day write the same rows.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Delete the workspace's events and catalog first; without it a workspace that has
    /// any is refused.
    #[arg(long)]
    pub replace: bool,
    /// Write the result as JSON to this file (what `reco-report` reads).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateResult {
    pub workspace: String,
    pub seed: u64,
    pub customers: u64,
    pub items: u64,
    pub categories: u64,
    pub days: u32,
    pub orders: u64,
    pub order_lines: u64,
    pub views: u64,
    /// Orders and views.
    pub events: u64,
    /// From the first row sent to the commit.
    pub secs: f64,
    pub events_per_sec: f64,
}

impl GenerateResult {
    pub fn line(&self) -> String {
        format!(
            "reco-generate workspace={} customers={} items={} events={} (orders={} with {} lines, views={}) in {:.1}s ({:.0} events/s)",
            self.workspace,
            self.customers,
            self.items,
            self.events,
            self.orders,
            self.order_lines,
            self.views,
            self.secs,
            self.events_per_sec,
        )
    }
}

/// Counts of generated rows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    orders: u64,
    order_lines: u64,
    views: u64,
}

impl Counts {
    fn events(&self) -> u64 {
        self.orders + self.views
    }

    fn add(&mut self, other: Counts) {
        self.orders += other.orders;
        self.order_lines += other.order_lines;
        self.views += other.views;
    }
}

/// Columns written to `events.events`. `xid` is written as 0 (see [`generate`]); `seq`
/// takes its default.
const EVENT_COLUMNS: &str = "workspace_id, xid, message_id, name, customer_id, anonymous_id, ts, received_at, properties, context";

const ITEM_COLUMNS: &str = "workspace_id, id, title, category_path, brand, price, currency, in_stock, stock, tags, created_at, url, image_url, replenishable, attributes, updated_at, deleted_at";

/// Customers per chunk handed from the generating thread to the COPY (≈ 12 MB of text).
const CHUNK_CUSTOMERS: u32 = 5_000;

fn copy_time(at: i64) -> String {
    DateTime::from_timestamp(at, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// 950 → 9.5: a price as a JSON number.
fn money(cents: u64) -> f64 {
    cents as f64 / 100.0
}

/// Appends one customer's events in COPY's text format (`workspace` already escaped). The
/// ids and JSON are made of letters, digits and punctuation that need no escaping.
fn push_customer_events(
    out: &mut String,
    workspace: &str,
    shop: &Shop,
    customer: u32,
    orders: &[GenOrder],
) -> Counts {
    let mut counts = Counts::default();
    let seed = shop.seed;
    for (number, order) in orders.iter().enumerate() {
        for (view, (at, item)) in order.views.iter().enumerate() {
            let ts = copy_time(*at);
            let _ = writeln!(
                out,
                "{workspace}\t0\tgen{seed}-c{customer}-o{number}-v{view}\tproduct_viewed\tc{customer}\t\\N\t{ts}\t{ts}\t{{\"product_id\":\"i{item}\"}}\t{{\"source\":\"reco-generate\"}}"
            );
            counts.views += 1;
        }
        let ts = copy_time(order.at);
        let mut items = String::with_capacity(order.lines.len() * 56);
        let mut revenue = 0;
        for (index, (item, quantity)) in order.lines.iter().enumerate() {
            let price = shop.price_cents(*item);
            revenue += price * u64::from(*quantity);
            if index > 0 {
                items.push(',');
            }
            let _ = write!(
                items,
                "{{\"product_id\":\"i{item}\",\"quantity\":{quantity},\"price\":{}}}",
                money(price)
            );
        }
        let _ = writeln!(
            out,
            "{workspace}\t0\tgen{seed}-c{customer}-o{number}\torder_completed\tc{customer}\t\\N\t{ts}\t{ts}\t{{\"order_id\":\"c{customer}-{number}\",\"revenue\":{},\"currency\":\"EUR\",\"items\":[{items}]}}\t{{\"source\":\"reco-generate\"}}",
            money(revenue)
        );
        counts.orders += 1;
        counts.order_lines += order.lines.len() as u64;
    }
    counts
}

/// Appends one catalog row in COPY's text format (`workspace` already escaped).
fn push_item(out: &mut String, workspace: &str, shop: &Shop, item: u32, until: i64, now: &str) {
    let hash = shop.item_hash(item);
    let category = shop.category_of(item);
    let sub = (item / shop.categories) % 5;
    let brand = (hash >> 20) % 500;
    let created = copy_time(until - ((hash >> 32) % 730) as i64 * 86_400);
    let in_stock = if shop.in_stock(item) { 't' } else { 'f' };
    let replenishable = if (hash >> 8) % 100 < 5 { 't' } else { 'f' };
    let _ = writeln!(
        out,
        "{workspace}\ti{item}\tProduct {item}\t{{\"Cat {category}\",\"Sub {category}-{sub}\"}}\tBrand {brand}\t{}\tEUR\t{in_stock}\t\\N\t{{}}\t{created}\thttps://shop.example/p/i{item}\thttps://shop.example/img/i{item}.jpg\t{replenishable}\t{{}}\t{now}\t\\N",
        money(shop.price_cents(item))
    );
}

/// The first day of every month from `from`'s to `until`'s, both included.
fn months(from: NaiveDate, until: NaiveDate) -> Vec<NaiveDate> {
    let mut months = Vec::new();
    let Some(mut month) = from.with_day(1) else {
        return months;
    };
    while month <= until {
        months.push(month);
        let Some(next) = next_month(month) else {
            break;
        };
        month = next;
    }
    months
}

fn next_month(month: NaiveDate) -> Option<NaiveDate> {
    if month.month() == 12 {
        NaiveDate::from_ymd_opt(month.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(month.year(), month.month() + 1, 1)
    }
}

/// Creates the monthly partitions of `events.events` the rows need, as the events service
/// does (same names), each in its own short statement: creating one locks the whole table.
async fn create_partitions(
    conn: &mut PgConnection,
    from: NaiveDate,
    until: NaiveDate,
) -> anyhow::Result<()> {
    for month in months(from, until) {
        let Some(next) = next_month(month) else {
            continue;
        };
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS events.events_{} PARTITION OF events.events FOR VALUES FROM ('{}') TO ('{}')",
            month.format("%Y_%m"),
            month.format("%Y-%m-%d"),
            next.format("%Y-%m-%d"),
        );
        if let Err(error) = sqlx::query(&sql).execute(&mut *conn).await {
            // The service created it at the same moment.
            let raced = error
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code == "42P07" || code == "23505");
            if !raced {
                return Err(error).context("creating a partition of events.events");
            }
        }
    }
    Ok(())
}

async fn table_exists(conn: &mut PgConnection, table: &str) -> anyhow::Result<bool> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Writes the shop into Postgres in one transaction: the events by COPY into
/// `events.events` (streamed from a generating thread in chunks), the catalog by COPY into
/// `recommendations.items`.
///
/// The events are history, not news: they are written with transaction id 0 and the relay
/// cursor is moved past them in the same transaction, so the events relay never publishes
/// them (12 M events replayed through RabbitMQ would rewrite every profile and measure
/// something else). Dedup ids (`events.event_ids`) are not written: training does not read
/// them.
pub async fn generate(args: &GenerateArgs) -> anyhow::Result<GenerateResult> {
    if args.workspace.is_empty() {
        anyhow::bail!("--workspace must not be empty");
    }
    let options: sqlx::postgres::PgConnectOptions = args
        .database_url
        .parse()
        .with_context(|| format!("--database-url {}", args.database_url))?;
    crate::client::ensure_loopback("--database-url", options.get_host())?;
    let mut conn = PgConnection::connect_with(&options)
        .await
        .with_context(|| format!("connecting to {}", args.database_url))?;
    for table in [
        "events.events",
        "events.relay_cursor",
        "recommendations.items",
    ] {
        if !table_exists(&mut conn, table).await? {
            anyhow::bail!("{table} does not exist: run `relance migrate` on this database first");
        }
    }
    let existing: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events.events WHERE workspace_id = $1)
             OR EXISTS (SELECT 1 FROM recommendations.items WHERE workspace_id = $1)",
    )
    .bind(&args.workspace)
    .fetch_one(&mut conn)
    .await?;
    if existing && !args.replace {
        anyhow::bail!(
            "workspace {} already has events or items: choose another --workspace or pass --replace",
            args.workspace
        );
    }

    let today = crate::generate::now().date_naive();
    let until_date = today;
    let from_date = today - chrono::Days::new(u64::from(args.days));
    let until = until_date
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let from = from_date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    create_partitions(&mut conn, from_date, until_date).await?;

    let shop = Shop::new(args.seed, args.customers, args.items, args.categories);
    let mut workspace = String::new();
    push_copy_escaped(&mut workspace, &args.workspace);
    let started = Instant::now();
    let mut tx = conn.begin().await?;
    if args.replace {
        for table in ["events.events", "recommendations.items"] {
            let deleted = sqlx::query(&format!("DELETE FROM {table} WHERE workspace_id = $1"))
                .bind(&args.workspace)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted > 0 {
                eprintln!("deleted {deleted} rows of {table}");
            }
        }
    }

    // Generating and sending overlap: a thread makes the text chunk by chunk, a few chunks
    // ahead of the COPY at most.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<(String, Counts, u32)>(4);
    let producer = {
        let shop = shop.clone();
        let workspace = workspace.clone();
        let (from, until) = (from.timestamp(), until.timestamp());
        let customers = args.customers;
        tokio::task::spawn_blocking(move || {
            let mut first = 0u32;
            while first < customers {
                let last = first.saturating_add(CHUNK_CUSTOMERS).min(customers);
                let mut text = String::with_capacity((last - first) as usize * 2_600);
                let mut counts = Counts::default();
                for customer in first..last {
                    let orders = shop.customer_orders(customer, from, until);
                    counts.add(push_customer_events(
                        &mut text, &workspace, &shop, customer, &orders,
                    ));
                }
                // The COPY failed and hung up: its error is the one reported.
                if sender.blocking_send((text, counts, last)).is_err() {
                    return;
                }
                first = last;
            }
        })
    };
    let mut copy = tx
        .copy_in_raw(&format!("COPY events.events ({EVENT_COLUMNS}) FROM STDIN"))
        .await
        .context("COPY into events.events")?;
    let mut counts = Counts::default();
    let step = (args.customers / 10).max(1);
    let mut next_report = step;
    while let Some((text, chunk, done)) = receiver.recv().await {
        copy.send(text.into_bytes())
            .await
            .context("COPY into events.events")?;
        counts.add(chunk);
        if done >= next_report || done == args.customers {
            eprintln!(
                "events of {done} of {} customers sent ({} events, {:.0} s)",
                args.customers,
                counts.events(),
                started.elapsed().as_secs_f64()
            );
            next_report = done.saturating_add(step);
        }
    }
    let copied = copy.finish().await.context("COPY into events.events")?;
    producer.await.context("the generating thread panicked")?;
    anyhow::ensure!(
        copied == counts.events(),
        "COPY stored {copied} events of {} generated",
        counts.events()
    );

    let now = copy_time(crate::generate::now().timestamp());
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY recommendations.items ({ITEM_COLUMNS}) FROM STDIN"
        ))
        .await
        .context("COPY into recommendations.items")?;
    let mut first = 0u32;
    while first < args.items {
        let last = first.saturating_add(50_000).min(args.items);
        let mut text = String::with_capacity((last - first) as usize * 250);
        for item in first..last {
            push_item(&mut text, &workspace, &shop, item, until.timestamp(), &now);
        }
        copy.send(text.into_bytes())
            .await
            .context("COPY into recommendations.items")?;
        first = last;
    }
    let items = copy
        .finish()
        .await
        .context("COPY into recommendations.items")?;

    // Rows of transaction 0 sort before anything the relay has published; if it has
    // published nothing yet (its cursor is still at transaction 0), the cursor moves past
    // the last sequence number taken here. Same transaction: the relay never sees the rows
    // above its cursor.
    sqlx::query(
        "UPDATE events.relay_cursor SET seq = GREATEST(seq, currval('events.event_seq'))
         WHERE id = 1 AND xid = '0'::xid8",
    )
    .execute(&mut *tx)
    .await
    .context("moving the relay cursor past the generated events")?;
    // Replicas reload a workspace's catalog when its version moves.
    if table_exists(&mut tx, "recommendations.catalog_versions").await? {
        sqlx::query(
            "INSERT INTO recommendations.catalog_versions (workspace_id, version) VALUES ($1, 1)
             ON CONFLICT (workspace_id) DO UPDATE SET version = recommendations.catalog_versions.version + 1",
        )
        .bind(&args.workspace)
        .execute(&mut *tx)
        .await?;
    }
    eprintln!(
        "committing {} events and {items} items ({:.0} s)",
        counts.events(),
        started.elapsed().as_secs_f64()
    );
    tx.commit().await?;
    let secs = started.elapsed().as_secs_f64();
    Ok(GenerateResult {
        workspace: args.workspace.clone(),
        seed: args.seed,
        customers: u64::from(args.customers),
        items,
        categories: u64::from(shop.categories),
        days: args.days,
        orders: counts.orders,
        order_lines: counts.order_lines,
        views: counts.views,
        events: counts.events(),
        secs,
        events_per_sec: counts.events() as f64 / secs,
    })
}

// --- Output ---------------------------------------------------------------------------------

/// Prints a result (its line, or JSON when asked) and writes it as JSON to `out`.
pub fn emit<T: Serialize>(
    result: &T,
    line: &str,
    out: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(path) = out {
        std::fs::write(path, serde_json::to_string_pretty(result)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string(result)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

// --- reco-report ----------------------------------------------------------------------------

/// The recommendations section of BENCHMARKS.md.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Folder of `reco-latency*.json`, `reco-max*.json`, `reco-generate*.json`, the
    /// training outputs `train-<catalog>.txt` (`/usr/bin/time -v relance reco train …`) and
    /// `model-load*.log` (the server's `model loaded` lines).
    #[arg(long, alias = "results")]
    pub dir: PathBuf,
    /// The markdown file to update (created if missing).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// `Key=Value` rows of the run's header table (command, date, machine, …), in order.
    #[arg(long = "meta", value_parser = crate::report::parse_meta)]
    pub meta: Vec<(String, String)>,
}

/// What one `relance reco train` printed, with `/usr/bin/time -v`'s figures.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TrainRun {
    /// `online-retail`, `generated`, … (from the file name).
    pub catalog: String,
    pub version: Option<u64>,
    pub items: Option<u64>,
    pub customers: Option<u64>,
    pub interactions: Option<u64>,
    /// Training time as the command reports it.
    pub secs: Option<f64>,
    pub model_bytes: Option<u64>,
    /// People whose history was written to Redis (`--seed-history`).
    pub histories: Option<u64>,
    /// The whole command, from `/usr/bin/time`.
    pub wall_secs: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// "3,684" → 3684.
fn number<T: std::str::FromStr>(token: &str) -> Option<T> {
    token.replace([',', '_'], "").parse().ok()
}

/// "1:02:03.5" → 3723.5, "0:12.34" → 12.34.
fn clock_secs(text: &str) -> Option<f64> {
    let mut secs = 0.0;
    for part in text.trim().split(':') {
        secs = secs * 60.0 + part.parse::<f64>().ok()?;
    }
    Some(secs)
}

/// Reads `trained version N: I items, C customers, X interactions in S s, model M bytes…`
/// (and `histories of P people` after it) and `/usr/bin/time -v`'s wall clock and maximum
/// resident set size; without the latter, the command's own `peak memory of this process`.
pub fn parse_train_output(catalog: &str, text: &str) -> TrainRun {
    let mut run = TrainRun {
        catalog: catalog.to_owned(),
        ..TrainRun::default()
    };
    let mut own_peak = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(value) = line.strip_prefix("peak memory of this process:") {
            own_peak = value
                .trim()
                .strip_suffix("MiB")
                .and_then(|mib| mib.trim().parse::<f64>().ok())
                .map(|mib| (mib * 1024.0 * 1024.0) as u64);
            continue;
        }
        if let Some(value) = line.strip_prefix("Elapsed (wall clock) time (h:mm:ss or m:ss):") {
            run.wall_secs = clock_secs(value);
            continue;
        }
        if let Some(value) = line.strip_prefix("Maximum resident set size (kbytes):") {
            run.peak_rss_bytes = number::<u64>(value.trim()).map(|kib| kib * 1024);
            continue;
        }
        if !line.starts_with("trained version") {
            continue;
        }
        let tokens: Vec<&str> = line
            .split_whitespace()
            .map(|t| t.trim_end_matches([',', ':', ';']))
            .collect();
        for (index, token) in tokens.iter().enumerate() {
            let previous = index.checked_sub(1).map(|i| tokens[i]);
            let next = tokens.get(index + 1).copied();
            match (previous, next) {
                (Some("version"), _) => run.version = number(token),
                (_, Some("items")) => run.items = number(token),
                (_, Some("customers")) => run.customers = number(token),
                (_, Some("interactions")) => run.interactions = number(token),
                (Some("in"), Some("s")) => run.secs = number(token),
                (_, Some("bytes")) => run.model_bytes = number(token),
                (Some("of"), Some("people")) => run.histories = number(token),
                _ => {}
            }
        }
    }
    if run.peak_rss_bytes.is_none() {
        run.peak_rss_bytes = own_peak;
    }
    run
}

/// One `model loaded` line of the server's log.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLoad {
    pub workspace: String,
    pub model_version: Option<u64>,
    pub items: Option<u64>,
    pub load_ms: f64,
}

/// The `model loaded` lines of a log, JSON (the service's default format) or `key=value`.
pub fn parse_model_loads(text: &str) -> Vec<ModelLoad> {
    let mut loads = Vec::new();
    for line in text.lines() {
        if !line.contains("model loaded") {
            continue;
        }
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(line.trim()) {
            let fields = value.get("fields").unwrap_or(&value);
            let Some(load_ms) = fields.get("load_ms").and_then(|v| v.as_f64()) else {
                continue;
            };
            loads.push(ModelLoad {
                workspace: fields
                    .get("workspace")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                model_version: fields.get("model_version").and_then(|v| v.as_u64()),
                items: fields.get("items").and_then(|v| v.as_u64()),
                load_ms,
            });
            continue;
        }
        let mut pairs = HashMap::new();
        for token in line.split_whitespace() {
            if let Some((key, value)) = token.split_once('=') {
                pairs.insert(key, value.trim_matches('"'));
            }
        }
        let Some(load_ms) = pairs.get("load_ms").and_then(|v| v.parse().ok()) else {
            continue;
        };
        loads.push(ModelLoad {
            workspace: pairs
                .get("workspace")
                .copied()
                .unwrap_or_default()
                .to_owned(),
            model_version: pairs.get("model_version").and_then(|v| v.parse().ok()),
            items: pairs.get("items").and_then(|v| v.parse().ok()),
            load_ms,
        });
    }
    loads
}

/// Everything `reco-report` read.
#[derive(Debug, Default)]
pub struct RecoResults {
    pub latency: Vec<LatencyResult>,
    pub max: Vec<MaxResult>,
    pub generated: Vec<GenerateResult>,
    pub training: Vec<TrainRun>,
    pub loads: Vec<ModelLoad>,
}

fn read_results(dir: &Path) -> anyhow::Result<RecoResults> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        files.push(entry?.path());
    }
    files.sort();
    let mut results = RecoResults::default();
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let read = || {
            std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))
        };
        let json = name.ends_with(".json");
        if json && name.starts_with("reco-latency") {
            results.latency.push(
                serde_json::from_str(&read()?)
                    .with_context(|| format!("{} is not a reco-latency result", file.display()))?,
            );
        } else if json && name.starts_with("reco-max") {
            results.max.push(
                serde_json::from_str(&read()?)
                    .with_context(|| format!("{} is not a reco-max result", file.display()))?,
            );
        } else if json && name.starts_with("reco-generate") {
            results
                .generated
                .push(serde_json::from_str(&read()?).with_context(|| {
                    format!("{} is not a reco-generate result", file.display())
                })?);
        } else if let Some(catalog) = name
            .strip_prefix("train-")
            .and_then(|rest| rest.strip_suffix(".txt"))
        {
            results.training.push(parse_train_output(catalog, &read()?));
        } else if name.starts_with("model-load") && name.ends_with(".log") {
            results.loads.extend(parse_model_loads(&read()?));
        }
    }
    Ok(results)
}

pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let results = read_results(&args.dir)?;
    if results.latency.is_empty() && results.max.is_empty() && results.training.is_empty() {
        anyhow::bail!("{}: no recommendations results", args.dir.display());
    }
    let body = render(&results, &args.meta);
    crate::report::write_section(&args.out, "reco", &body)
}

/// 12345.6 → "12,346".
fn bytes(value: u64) -> String {
    let value = value as f64;
    if value >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", value / (1024.0 * 1024.0 * 1024.0))
    } else if value >= 1024.0 * 1024.0 {
        format!("{:.0} MiB", value / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", value / 1024.0)
    }
}

fn seconds(value: f64) -> String {
    if value >= 120.0 {
        let whole = value.round() as u64;
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        format!("{value:.1} s")
    }
}

fn or_dash<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or("–".to_owned(), show)
}

/// The Online Retail catalog first, then the generated one, then anything else.
fn catalog_order(source: &str) -> (u8, String) {
    match source {
        "online-retail" => (0, String::new()),
        "generated" => (1, String::new()),
        other => (2, other.to_owned()),
    }
}

fn catalog_label(population: &Population) -> String {
    match population.source.as_str() {
        "online-retail" => format!(
            "Online Retail ({} customers, {} items)",
            thousands(population.customers as f64),
            thousands(population.items as f64)
        ),
        "generated" => format!(
            "generated ({} customers, {} items)",
            thousands(population.customers as f64),
            thousands(population.items as f64)
        ),
        other => other.to_owned(),
    }
}

fn render(results: &RecoResults, meta: &[(String, String)]) -> String {
    let mut md = String::new();
    md.push_str("## Recommendations\n\n");
    md.push_str("_Written by `bash bench/reco.sh` from the runs below; rerun it rather than editing this section._\n\n");
    if !meta.is_empty() {
        md.push_str("| | |\n|---|---|\n");
        for (key, value) in meta {
            let _ = writeln!(md, "| {key} | {value} |");
        }
        md.push('\n');
    }
    render_latency(&mut md, &results.latency);
    render_max(&mut md, &results.max);
    render_training(&mut md, results);
    md
}

fn render_latency(md: &mut String, runs: &[LatencyResult]) {
    if runs.is_empty() {
        return;
    }
    let mut runs: Vec<&LatencyResult> = runs.iter().collect();
    runs.sort_by(|a, b| {
        catalog_order(&a.population.source)
            .cmp(&catalog_order(&b.population.source))
            .then(a.run.rate.cmp(&b.run.rate))
            .then((a.rpc == Rpc::Recommend).cmp(&(b.rpc == Rpc::Recommend)))
    });
    let first = runs[0];
    let _ = writeln!(
        md,
        "### Serving latency: `Recommend` vs `Ping`\n\n\
         Open loop at a fixed rate for {:.0} s after a warm-up, over {} HTTP/2 connections; \
         latency is measured from when each request was due, so a stall counts against every \
         request queued behind it. `Ping` only checks the key and answers, on the same server \
         stack: the difference is the cost of recommending. Each `Recommend` names a random \
         customer of the catalog and a placement drawn from a shop's mix — home 30%, product \
         page 25% (1 context item), cart 25% and checkout 10% (1–3 context items), e-mail \
         10% — and asks for 5 items, no filter.\n",
        first.run.duration_secs, first.run.connections,
    );
    md.push_str("| catalog | req/s | `Ping` p50 | `Recommend` p50 | `Ping` p99 | `Recommend` p99 | `Recommend` p99.9 | `Recommend` max | errors |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut pairs: Vec<(String, u32)> = Vec::new();
    for run in &runs {
        let key = (run.population.source.clone(), run.run.rate);
        if !pairs.contains(&key) {
            pairs.push(key);
        }
    }
    for (source, rate) in &pairs {
        let find = |rpc: Rpc| {
            runs.iter()
                .copied()
                .find(|r| r.rpc == rpc && &r.population.source == source && r.run.rate == *rate)
        };
        let ping = find(Rpc::Ping);
        let recommend = find(Rpc::Recommend);
        let Some(label) = recommend.or(ping).map(|r| catalog_label(&r.population)) else {
            continue;
        };
        let ms = |run: Option<&LatencyResult>, pick: fn(&Percentiles) -> f64| {
            or_dash(run, |r| format!("{:.2} ms", pick(&r.run.latency)))
        };
        let errors: Vec<String> = [ping, recommend]
            .into_iter()
            .flatten()
            .filter(|r| r.run.errors > 0)
            .map(|r| {
                format!(
                    "{}: {}",
                    r.rpc.name(),
                    errors_cell(r.run.errors, &r.errors_by_code)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(f64::from(*rate)),
            ms(ping, |p| p.p50),
            ms(recommend, |p| p.p50),
            ms(ping, |p| p.p99),
            ms(recommend, |p| p.p99),
            ms(recommend, |p| p.p999),
            ms(recommend, |p| p.max),
            if errors.is_empty() {
                "0".to_owned()
            } else {
                errors.join("; ")
            },
        );
    }
    md.push('\n');
    md.push_str("Every run:\n\n");
    md.push_str("| catalog | call | model | req/s asked | completed/s | sent | errors | p50 | p90 | p99 | p99.9 | max | service time p99 | send lag p99 |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for run in &runs {
        let p = &run.run.latency;
        let _ = writeln!(
            md,
            "| {} | `{}` | v{} | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            catalog_label(&run.population),
            run.rpc.name(),
            run.model_version,
            thousands(f64::from(run.run.rate)),
            thousands(run.run.achieved_rate),
            thousands(run.run.sent as f64),
            errors_cell(run.run.errors, &run.errors_by_code),
            p.p50,
            p.p90,
            p.p99,
            p.p999,
            p.max,
            run.run.service_time.p99,
            run.send_lag.p99,
        );
    }
    md.push_str(
        "\n_Service time_ runs from the actual send; _send lag_ (due → sent) is the load \
         generator's own delay (1 ms timer ticks, a busy CPU), included in the latency.\n\n",
    );
}

fn render_max(md: &mut String, runs: &[MaxResult]) {
    if runs.is_empty() {
        return;
    }
    let mut runs: Vec<&MaxResult> = runs.iter().collect();
    runs.sort_by_key(|run| catalog_order(&run.population.source));
    let first = runs[0];
    let _ = writeln!(
        md,
        "### Maximum throughput\n\n\
         Closed loop: {} requests always in flight over {} HTTP/2 connections for {:.0} s after \
         a warm-up (each caller sends its next request when the last is answered); answers per \
         second over the timed window. The load generator shares the machine, so this is what \
         the machine sustains, service and client together. Latency is from send to answer \
         under that saturation.\n",
        first.concurrency, first.connections, first.duration_secs,
    );
    md.push_str("| catalog | `Ping` req/s | `Recommend` req/s | `Recommend` / `Ping` | `Recommend` p50 | `Recommend` p99 | errors |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    let mut sources: Vec<String> = Vec::new();
    for run in &runs {
        if !sources.contains(&run.population.source) {
            sources.push(run.population.source.clone());
        }
    }
    for source in &sources {
        let find = |rpc: Rpc| {
            runs.iter()
                .copied()
                .find(|r| r.rpc == rpc && &r.population.source == source)
        };
        let ping = find(Rpc::Ping);
        let recommend = find(Rpc::Recommend);
        let Some(label) = recommend.or(ping).map(|r| catalog_label(&r.population)) else {
            continue;
        };
        let ratio = match (ping, recommend) {
            (Some(ping), Some(recommend)) if ping.throughput > 0.0 => {
                format!("{:.0}%", 100.0 * recommend.throughput / ping.throughput)
            }
            _ => "–".to_owned(),
        };
        let errors: Vec<String> = [ping, recommend]
            .into_iter()
            .flatten()
            .filter(|r| r.errors > 0)
            .map(|r| {
                format!(
                    "{}: {}",
                    r.rpc.name(),
                    errors_cell(r.errors, &r.errors_by_code)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {ratio} | {} | {} | {} |",
            or_dash(ping, |r| thousands(r.throughput)),
            or_dash(recommend, |r| thousands(r.throughput)),
            or_dash(recommend, |r| format!("{:.2} ms", r.latency.p50)),
            or_dash(recommend, |r| format!("{:.2} ms", r.latency.p99)),
            if errors.is_empty() {
                "0".to_owned()
            } else {
                errors.join("; ")
            },
        );
    }
    md.push('\n');
}

fn render_training(md: &mut String, results: &RecoResults) {
    if results.training.is_empty() && results.loads.is_empty() {
        return;
    }
    if !results.training.is_empty() {
        let mut runs: Vec<&TrainRun> = results.training.iter().collect();
        runs.sort_by_key(|run| catalog_order(&run.catalog));
        md.push_str(
            "### Training\n\n\
             `relance reco train --seed-history`: reads the workspace's interactions from the \
             event log in Postgres, trains every model in-process, stores and activates the \
             version, and writes each customer's recent history to Redis. Wall time and peak \
             resident memory of the whole command from `/usr/bin/time -v`.\n\n",
        );
        md.push_str("| catalog | model | customers | items | interactions | histories written | training (as reported) | wall time | peak RSS | model in memory |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for run in &runs {
            let catalog = match run.catalog.as_str() {
                "online-retail" => "Online Retail".to_owned(),
                other => other.to_owned(),
            };
            let count = |value: Option<u64>| or_dash(value, |v| thousands(v as f64));
            let _ = writeln!(
                md,
                "| {catalog} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                or_dash(run.version, |v| format!("v{v}")),
                count(run.customers),
                count(run.items),
                count(run.interactions),
                count(run.histories),
                or_dash(run.secs, seconds),
                or_dash(run.wall_secs, seconds),
                or_dash(run.peak_rss_bytes, bytes),
                or_dash(run.model_bytes, bytes),
            );
        }
        md.push('\n');
    }
    for generated in &results.generated {
        let _ = writeln!(
            md,
            "The generated catalog (workspace `{}`, seed {}): {} customers with 1–3 preferred \
             categories among {} (Zipf-popular, as are the items within each), {} items, \
             {} days of history — {} orders with {} lines and {} product views, {} events in \
             all, written by `relance-loadtest reco-generate` (COPY) in {} ({} events/s).\n",
            generated.workspace,
            generated.seed,
            thousands(generated.customers as f64),
            thousands(generated.categories as f64),
            thousands(generated.items as f64),
            generated.days,
            thousands(generated.orders as f64),
            thousands(generated.order_lines as f64),
            thousands(generated.views as f64),
            thousands(generated.events as f64),
            seconds(generated.secs),
            thousands(generated.events_per_sec),
        );
    }
    if !results.loads.is_empty() {
        md.push_str(
            "### Model load at start\n\n\
             The server restarted after training: loading each workspace's current version from \
             Postgres, decoding it and building the serving snapshot (the server's `model loaded` \
             log line).\n\n",
        );
        md.push_str("| workspace | model | items | load time |\n|---|---:|---:|---:|\n");
        for load in &results.loads {
            let _ = writeln!(
                md,
                "| `{}` | {} | {} | {} |",
                load.workspace,
                or_dash(load.model_version, |v| format!("v{v}")),
                or_dash(load.items, |v| thousands(v as f64)),
                if load.load_ms >= 1000.0 {
                    format!("{:.2} s", load.load_ms / 1000.0)
                } else {
                    format!("{:.0} ms", load.load_ms)
                },
            );
        }
        md.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_mix_covers_every_roll() {
        let total: u32 = PLACEMENT_MIX.iter().map(|(_, share, _, _)| share).sum();
        assert_eq!(total, 100);
        assert_eq!(placement_of(0).0, pb::Placement::Home);
        assert_eq!(placement_of(29).0, pb::Placement::Home);
        assert_eq!(placement_of(30), (pb::Placement::Product, 1, 1));
        assert_eq!(placement_of(55), (pb::Placement::Cart, 1, 3));
        assert_eq!(placement_of(80), (pb::Placement::Checkout, 1, 3));
        assert_eq!(placement_of(90), (pb::Placement::Email, 0, 0));
        assert_eq!(placement_of(99), (pb::Placement::Email, 0, 0));
    }

    #[test]
    fn requests_follow_the_mix() {
        let ids = Ids::Generated(Shop::new(0, 1_000, 500, 50));
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts: HashMap<i32, u32> = HashMap::new();
        let draws = 20_000;
        for _ in 0..draws {
            let request = recommend_request(&ids, &mut rng);
            assert_eq!(request.n, 5);
            let context = request.context_item_ids.len();
            let placement = pb::Placement::try_from(request.placement).expect("placement");
            match placement {
                pb::Placement::Home | pb::Placement::Email => assert_eq!(context, 0),
                pb::Placement::Product => assert_eq!(context, 1),
                pb::Placement::Cart | pb::Placement::Checkout => {
                    assert!((1..=3).contains(&context), "{context}")
                }
                other => panic!("unexpected placement {other:?}"),
            }
            let distinct: HashSet<&String> = request.context_item_ids.iter().collect();
            assert_eq!(distinct.len(), context);
            let Some(pb::CustomerRef {
                id: Some(pb::customer_ref::Id::CustomerId(customer)),
            }) = &request.customer
            else {
                panic!("no customer id");
            };
            assert!(customer.starts_with('c'));
            *counts.entry(request.placement).or_default() += 1;
        }
        for (placement, share, _, _) in PLACEMENT_MIX {
            let seen = f64::from(counts[&(placement as i32)]) / f64::from(draws);
            assert!(
                (seen - f64::from(share) / 100.0).abs() < 0.02,
                "{placement:?}: {seen}"
            );
        }
    }

    #[test]
    fn zipf_draws_favour_the_first_ranks() {
        let cdf = zipf_cdf(100, 1.0);
        assert_eq!(cdf.len(), 100);
        assert!((cdf[99] - 1.0).abs() < 1e-12);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[draw(&cdf, &mut rng)] += 1;
        }
        // Rank 1 is drawn about twice as often as rank 2, ten times as often as rank 10.
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((1.8..2.2).contains(&ratio), "{ratio}");
        let ratio = f64::from(counts[0]) / f64::from(counts[9]);
        assert!((8.0..12.0).contains(&ratio), "{ratio}");
    }

    #[test]
    fn items_stay_in_their_category_and_range() {
        let shop = Shop::new(3, 100, 1_003, 10);
        assert_eq!((0..10).map(|c| shop.category_size(c)).sum::<u32>(), 1_003);
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..10_000 {
            let category = shop.popular_category(&mut rng);
            let item = shop.item_in(category, &mut rng);
            assert!(item < 1_003);
            assert_eq!(shop.category_of(item), category);
        }
        // More categories than items: one item each.
        let tiny = Shop::new(3, 10, 5, 1_000);
        assert_eq!(tiny.categories, 5);
        assert!(tiny.popular_item(&mut rng) < 5);
    }

    #[test]
    fn the_generator_is_deterministic() {
        let from = 1_700_000_000;
        let until = from + 180 * 86_400;
        let shop = Shop::new(42, 1_000, 10_000, 100);
        let again = Shop::new(42, 1_000, 10_000, 100);
        let other = Shop::new(43, 1_000, 10_000, 100);
        let mut text = String::new();
        let mut same = String::new();
        let mut differs = false;
        for customer in 0..200 {
            let orders = shop.customer_orders(customer, from, until);
            assert_eq!(orders, again.customer_orders(customer, from, until));
            differs |= orders != other.customer_orders(customer, from, until);
            push_customer_events(&mut text, "ws", &shop, customer, &orders);
            push_customer_events(&mut same, "ws", &again, customer, &orders);
        }
        assert_eq!(text, same);
        assert!(differs, "another seed gives other orders");
        // A customer alone gives what it gives among others.
        assert_eq!(
            shop.customer_orders(150, from, until),
            Shop::new(42, 1_000, 10_000, 100).customer_orders(150, from, until)
        );
    }

    #[test]
    fn generated_customers_look_like_a_shop() {
        let from = 1_700_000_000;
        let until = from + 180 * 86_400;
        let shop = Shop::new(1, 5_000, 100_000, 1_000);
        let mut counts = Counts::default();
        let mut text = String::new();
        let mut preferred_lines = 0u64;
        for customer in 0..5_000 {
            let orders = shop.customer_orders(customer, from, until);
            // The same stream, drawn from its start: the customer's preferences.
            let preferred =
                shop.preferences(&mut StdRng::seed_from_u64(mix(1, u64::from(customer))));
            assert!((1..=3).contains(&preferred.len()));
            assert!((1..=MAX_ORDERS as usize).contains(&orders.len()));
            for order in &orders {
                assert!((1..=5).contains(&order.lines.len()));
                assert!((1..=3).contains(&order.views.len()));
                assert!(order.at >= from + 3_600 && order.at < until);
                for (at, item) in &order.views {
                    assert!(*at < order.at && *at >= from);
                    assert!(*item < 100_000);
                }
                for (item, quantity) in &order.lines {
                    assert!((1..=3).contains(quantity));
                    if preferred.contains(&shop.category_of(*item)) {
                        preferred_lines += 1;
                    }
                }
            }
            counts.add(push_customer_events(
                &mut text, "ws", &shop, customer, &orders,
            ));
        }
        let per_customer = counts.events() as f64 / 5_000.0;
        assert!(
            (9.0..14.0).contains(&per_customer),
            "{per_customer} events per customer"
        );
        // 80% from the preferred categories, plus the popular picks that land there too.
        let share = preferred_lines as f64 / counts.order_lines as f64;
        assert!(
            (0.8..0.9).contains(&share),
            "{share} of the lines in preferred categories"
        );
        assert_eq!(text.lines().count() as u64, counts.events());
        for line in text.lines().take(100) {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 10, "{line}");
            assert_eq!(fields[1], "0");
            let properties: serde_json::Value =
                serde_json::from_str(fields[8]).expect("properties are JSON");
            match fields[3] {
                "product_viewed" => assert!(properties["product_id"].is_string()),
                "order_completed" => {
                    let items = properties["items"].as_array().expect("items");
                    assert!(!items.is_empty());
                    assert!(
                        items[0]["product_id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with('i'))
                    );
                    assert!(
                        items[0]["price"]
                            .as_f64()
                            .is_some_and(|p| (1.5..=150.0).contains(&p))
                    );
                    assert!(properties["revenue"].as_f64().is_some_and(|r| r > 0.0));
                }
                other => panic!("unexpected event {other}"),
            }
        }
    }

    #[test]
    fn catalog_rows_have_every_column() {
        let shop = Shop::new(1, 10, 2_000, 100);
        let mut text = String::new();
        for item in 0..2_000 {
            push_item(
                &mut text,
                "ws",
                &shop,
                item,
                1_700_000_000,
                "2023-11-14T22:13:20Z",
            );
        }
        let mut in_stock = 0;
        for line in text.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 17, "{line}");
            if fields[7] == "t" {
                in_stock += 1;
            }
        }
        assert!((1_850..1_970).contains(&in_stock), "{in_stock}");
        assert!(text.starts_with("ws\ti0\tProduct 0\t{\"Cat 0\",\"Sub 0-0\"}\t"));
    }

    #[test]
    fn months_of_a_window() {
        let date = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).expect("date");
        assert_eq!(
            months(date(2025, 11, 20), date(2026, 2, 1)),
            vec![
                date(2025, 11, 1),
                date(2025, 12, 1),
                date(2026, 1, 1),
                date(2026, 2, 1)
            ]
        );
        assert_eq!(
            months(date(2025, 3, 5), date(2025, 3, 9)),
            vec![date(2025, 3, 1)]
        );
    }

    #[test]
    fn reads_the_training_output() {
        let text = "trained version 3: 3,684 items, 4,338 customers, 389,012 interactions in 12.5 s, model 45678901 bytes, current, histories of 4338 people written to Redis\n\
            peak memory of this process: 300 MiB\n\
            \tCommand being timed: \"relance reco train --workspace bench --seed-history\"\n\
            \tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n\
            \tMaximum resident set size (kbytes): 524288\n";
        let run = parse_train_output("online-retail", text);
        assert_eq!(run.version, Some(3));
        assert_eq!(run.items, Some(3_684));
        assert_eq!(run.customers, Some(4_338));
        assert_eq!(run.interactions, Some(389_012));
        assert_eq!(run.secs, Some(12.5));
        assert_eq!(run.model_bytes, Some(45_678_901));
        assert_eq!(run.wall_secs, Some(62.5));
        assert_eq!(run.histories, Some(4_338));
        assert_eq!(run.peak_rss_bytes, Some(512 * 1024 * 1024));
        let untimed = parse_train_output("x", "peak memory of this process: 300 MiB\n");
        assert_eq!(untimed.peak_rss_bytes, Some(300 * 1024 * 1024));
        assert_eq!(clock_secs("1:02:03.5"), Some(3_723.5));
        let empty = parse_train_output("x", "error: no events\n");
        assert_eq!(empty.version, None);
        assert_eq!(empty.wall_secs, None);
    }

    #[test]
    fn reads_model_loaded_lines() {
        let text = r#"{"timestamp":"2026-11-22T05:00:00Z","level":"INFO","fields":{"message":"model loaded","workspace":"bench-large","model_version":1,"catalog_version":1,"items":100000,"load_ms":812.5},"target":"relance_recommendations::serving"}
{"timestamp":"2026-11-22T05:00:00Z","level":"INFO","fields":{"message":"something else","load_ms":1}}
INFO model loaded workspace=bench model_version=2 items=3684 load_ms=40.25"#;
        let loads = parse_model_loads(text);
        assert_eq!(
            loads,
            vec![
                ModelLoad {
                    workspace: "bench-large".into(),
                    model_version: Some(1),
                    items: Some(100_000),
                    load_ms: 812.5
                },
                ModelLoad {
                    workspace: "bench".into(),
                    model_version: Some(2),
                    items: Some(3_684),
                    load_ms: 40.25
                },
            ]
        );
    }

    #[test]
    fn online_retail_ids() {
        let file = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/online-retail-sample.csv.gz"
        ));
        let ids = Ids::load(&IdsArgs {
            online_retail: Some(file),
            customers: 1,
            items: 1,
            categories: 1,
        })
        .expect("the sample loads");
        let population = ids.population();
        assert_eq!(population.source, "online-retail");
        assert!(population.customers > 2_000, "{population:?}");
        assert!(population.items > 2_000, "{population:?}");
        let mut rng = StdRng::seed_from_u64(1);
        let request = recommend_request(&ids, &mut rng);
        assert!(request.customer.is_some());
    }

    /// A Recommendations server that answers at once: Ping with version 3, Recommend with
    /// one item, refusing malformed requests and failing one call in 50 (to count errors).
    #[derive(Default)]
    struct Mock {
        calls: std::sync::atomic::AtomicU64,
    }

    type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

    #[tonic::async_trait]
    impl pb::recommendations_server::Recommendations for Mock {
        async fn recommend(
            &self,
            request: tonic::Request<pb::RecommendRequest>,
        ) -> Answer<pb::RecommendResponse> {
            let request = request.into_inner();
            if request.n != 5
                || request.placement == pb::Placement::Unspecified as i32
                || request.customer.is_none()
            {
                return Err(tonic::Status::invalid_argument("malformed"));
            }
            let call = self
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if call % 50 == 49 {
                return Err(tonic::Status::unavailable("every 50th call"));
            }
            Ok(tonic::Response::new(pb::RecommendResponse {
                items: vec![pb::RecommendedItem {
                    item_id: "i1".into(),
                    ..Default::default()
                }],
                model_version: 3,
                ..Default::default()
            }))
        }
        async fn similar_items(
            &self,
            _: tonic::Request<pb::SimilarItemsRequest>,
        ) -> Answer<pb::SimilarItemsResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn upsert_items(
            &self,
            _: tonic::Request<pb::UpsertItemsRequest>,
        ) -> Answer<pb::UpsertItemsResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn get_items(
            &self,
            _: tonic::Request<pb::GetItemsRequest>,
        ) -> Answer<pb::GetItemsResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn delete_items(
            &self,
            _: tonic::Request<pb::DeleteItemsRequest>,
        ) -> Answer<pb::DeleteItemsResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn train(&self, _: tonic::Request<pb::TrainRequest>) -> Answer<pb::TrainResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn model_info(
            &self,
            _: tonic::Request<pb::ModelInfoRequest>,
        ) -> Answer<pb::ModelInfoResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
        async fn ping(&self, _: tonic::Request<pb::PingRequest>) -> Answer<pb::PingResponse> {
            Ok(tonic::Response::new(pb::PingResponse { model_version: 3 }))
        }
        async fn rollback(
            &self,
            _: tonic::Request<pb::RollbackModelRequest>,
        ) -> Answer<pb::ModelInfoResponse> {
            Err(tonic::Status::unimplemented("mock"))
        }
    }

    /// Serves [`Mock`] on a free port of 127.0.0.1.
    async fn serve_mock() -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                stream
            });
            Some((accepted, listener))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::recommendations_server::RecommendationsServer::new(
                    Mock::default(),
                ))
                .serve_with_incoming(incoming),
        );
        Target {
            addr: format!("http://{addr}"),
            api_key: "rlk_test".into(),
        }
    }

    fn run_args(rpc: Rpc) -> RunArgs {
        RunArgs {
            rpc,
            duration: 1,
            warmup: 0,
            connections: 2,
            seed: 1,
            wait_for_model: 5,
            ids: IdsArgs {
                online_retail: None,
                customers: 1_000,
                items: 500,
                categories: 20,
            },
            out: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_and_closed_loops_against_a_mock() {
        let target = serve_mock().await;
        let result = latency(
            &target,
            &LatencyArgs {
                rate: 500,
                run: run_args(Rpc::Recommend),
            },
        )
        .await
        .expect("open loop");
        assert_eq!(result.model_version, 3);
        assert_eq!(result.run.sent, 500);
        assert_eq!(result.run.ok + result.run.errors, 500);
        assert_eq!(result.run.errors, 10, "{:?}", result.errors_by_code);
        assert_eq!(result.errors_by_code["Unavailable"], 10);
        assert_eq!(result.run.latency.count, 490);
        assert!(
            result.run.achieved_rate > 300.0,
            "{}",
            result.run.achieved_rate
        );
        assert_eq!(result.population.source, "generated");

        let ping = max(
            &target,
            &MaxArgs {
                concurrency: 8,
                run: run_args(Rpc::Ping),
            },
        )
        .await
        .expect("closed loop");
        assert_eq!(ping.errors, 0);
        assert!(ping.throughput > 100.0, "{}", ping.throughput);
        assert_eq!(ping.latency.count, ping.ok);
    }

    fn percentiles(p50: f64, p99: f64) -> Percentiles {
        Percentiles {
            count: 100,
            mean: p50,
            p50,
            p90: p99,
            p99,
            p999: p99,
            max: p99,
        }
    }

    fn latency_result(source: &str, rpc: Rpc, rate: u32, p50: f64, errors: u64) -> LatencyResult {
        LatencyResult {
            rpc,
            population: Population {
                source: source.into(),
                customers: 4_338,
                items: 3_684,
            },
            model_version: 1,
            run: RateResult {
                rate,
                duration_secs: 20.0,
                connections: 4,
                sent: u64::from(rate) * 20,
                ok: u64::from(rate) * 20 - errors,
                errors,
                achieved_rate: f64::from(rate),
                latency: percentiles(p50, p50 * 3.0),
                service_time: percentiles(p50, p50 * 2.0),
                distribution: vec![(50.0, p50)],
            },
            send_lag: percentiles(0.1, 0.9),
            errors_by_code: if errors > 0 {
                BTreeMap::from([("Unavailable".to_owned(), errors)])
            } else {
                BTreeMap::new()
            },
        }
    }

    #[test]
    fn latency_results_round_trip_as_json() {
        let result = latency_result("generated", Rpc::Recommend, 5_000, 1.5, 3);
        let json = serde_json::to_string(&result).expect("json");
        assert!(json.contains("\"rpc\":\"recommend\""));
        assert!(json.contains("\"achieved_rate\""), "flattened: {json}");
        let back: LatencyResult = serde_json::from_str(&json).expect("read back");
        assert_eq!(back.run.rate, 5_000);
        assert_eq!(back.errors_by_code["Unavailable"], 3);
    }

    #[test]
    fn renders_the_comparison() {
        let max = |rpc, throughput| MaxResult {
            rpc,
            population: Population {
                source: "online-retail".into(),
                customers: 4_338,
                items: 3_684,
            },
            model_version: 1,
            concurrency: 64,
            connections: 4,
            duration_secs: 20.0,
            ok: 1,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            throughput,
            latency: percentiles(2.0, 6.0),
            distribution: Vec::new(),
        };
        let results = RecoResults {
            latency: vec![
                latency_result("online-retail", Rpc::Recommend, 1_000, 0.9, 0),
                latency_result("online-retail", Rpc::Ping, 1_000, 0.3, 0),
                latency_result("online-retail", Rpc::Recommend, 5_000, 1.2, 2),
            ],
            max: vec![max(Rpc::Ping, 40_000.0), max(Rpc::Recommend, 10_000.0)],
            generated: Vec::new(),
            training: vec![parse_train_output(
                "online-retail",
                "trained version 1: 3684 items, 4338 customers, 389012 interactions in 2.5 s, model 1048576 bytes\n",
            )],
            loads: Vec::new(),
        };
        let md = render(&results, &[("Commit".into(), "abc123".into())]);
        assert!(md.contains("| Commit | abc123 |"));
        assert!(md.contains(
            "| Online Retail (4,338 customers, 3,684 items) | 1,000 | 0.30 ms | 0.90 ms | 0.90 ms | 2.70 ms |"
        ));
        assert!(md.contains("| 5,000 | – | 1.20 ms |"), "{md}");
        assert!(md.contains("Recommend: 2 (Unavailable 2)"));
        assert!(md.contains("| 40,000 | 10,000 | 25% |"), "{md}");
        assert!(
            md.contains(
                "| Online Retail | v1 | 4,338 | 3,684 | 389,012 | – | 2.5 s | – | – | 1 MiB |"
            ),
            "{md}"
        );
    }
}
