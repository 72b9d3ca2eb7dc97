//! Segmentation benchmarks.
//!
//! - `segment-batch`: batch evaluation of a three-condition segment over a population —
//!   the Online Retail customers, or a generated one (1 M customers, 20 events each) —
//!   measured three ways in the same run: the service's evaluator counting members (what
//!   Preview does), the same segment compiled by hand to one SQL query (the alternative the
//!   design weighed), and the full build of a version (evaluate, write memberships, switch).
//! - `segment-latency`: from a Track acknowledged to `segment.entered` published, at a
//!   fixed event rate, with the event's own publication on the bus as the baseline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, TimeZone as _, Utc};
use futures::StreamExt as _;
use relance_proto::v1 as pb;
use relance_segmentation::domain::eval::Series;
use relance_segmentation::domain::{Compiled, aggregate, parse};
use relance_segmentation::store::SegmentStore;
use relance_segmentation::store::mirror::Mirror;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::stats::{self, Percentiles};

/// The segment both populations are measured with.
pub const THREE_CONDITIONS: &str = "kind: Segment
name: bench-three-conditions
where:
  all:
    - trait: revenue
      gte: 100
    - event: order_completed
      within: 90d
    - not:
        event: product_viewed
        within: 7d
";

#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Postgres database the service's `segments` schema lives in (created if missing).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    pub database_url: String,
    /// Load the Online Retail customers from this file instead of generating a population.
    #[arg(long)]
    pub online_retail: Option<PathBuf>,
    /// Customers generated (ignored with --online-retail).
    #[arg(long, default_value_t = 1_000_000)]
    pub customers: u32,
    /// Events per generated customer: 4 orders, the rest product views.
    #[arg(long, default_value_t = 20)]
    pub events_per_customer: u32,
    /// Timed repetitions of each method.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Where to write the result (JSON).
    #[arg(long)]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub population_name: String,
    pub customers: u64,
    pub events: u64,
    pub members: u64,
    /// Seconds per repetition.
    pub evaluator_secs: Vec<f64>,
    pub sql_secs: Vec<f64>,
    pub build_secs: Vec<f64>,
}

pub async fn batch(args: &BatchArgs) -> anyhow::Result<BatchResult> {
    let settings =
        relance_kit::Settings::from_pairs(&[("database_url", args.database_url.as_str())])?;
    let pool = relance_kit::db::connect(&settings, relance_segmentation::SCHEMA).await?;
    relance_kit::db::migrate(
        &pool,
        &relance_segmentation::MIGRATOR,
        relance_segmentation::SCHEMA,
    )
    .await?;
    let definition =
        parse::parse_definition(THREE_CONDITIONS).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let compiled = Compiled::new(definition);
    let order_id = selector_named(&compiled, "order_completed")?;
    let view_id = selector_named(&compiled, "product_viewed")?;
    let (workspace, now, customers, events, population_name) = match &args.online_retail {
        Some(file) => {
            let now = Utc
                .with_ymd_and_hms(2011, 12, 10, 0, 0, 0)
                .single()
                .context("date")?;
            let (customers, events) = load_online_retail(&pool, file, &compiled, now).await?;
            (
                "bench-online-retail".to_owned(),
                now,
                customers,
                events,
                "Online Retail".to_owned(),
            )
        }
        None => {
            let now = relance_kit::Clock::now(&relance_kit::SystemClock);
            let workspace = format!("bench-generated-{}", args.customers);
            let events = generate(
                &pool,
                &workspace,
                args.customers,
                args.events_per_customer,
                order_id,
                view_id,
                &compiled,
                now,
            )
            .await?;
            let name = format!(
                "generated ({} customers, {} events)",
                args.customers, events
            );
            (workspace, now, u64::from(args.customers), events, name)
        }
    };
    sqlx::query("VACUUM ANALYZE segments.people")
        .execute(&pool)
        .await?;
    sqlx::query("VACUUM ANALYZE segments.aggregates")
        .execute(&pool)
        .await?;

    let store = SegmentStore::new(
        pool.clone(),
        Mirror::new(None),
        Arc::new(tokio::sync::Notify::new()),
    );
    let mut result = BatchResult {
        population_name,
        customers,
        events,
        members: 0,
        evaluator_secs: Vec::new(),
        sql_secs: Vec::new(),
        build_secs: Vec::new(),
    };
    for rep in 0..args.reps {
        let started = Instant::now();
        let preview = store.preview(&workspace, &compiled, 0, now).await?;
        result.evaluator_secs.push(started.elapsed().as_secs_f64());

        let started = Instant::now();
        let sql_count = sql_baseline(&pool, &workspace, order_id, view_id, now).await?;
        result.sql_secs.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            sql_count == preview.members,
            "the evaluator counted {} members, the SQL baseline {sql_count}",
            preview.members
        );
        result.members = preview.members;

        // A new version each repetition: the document changes by its description.
        let yaml = format!("{THREE_CONDITIONS}description: rep {rep}\n");
        store.apply(&workspace, &yaml, false, now).await?;
        // The build's clock moves on from `now`, as a real one would: customers touched
        // before the build started are not re-checked at the switch.
        let base = Instant::now();
        let built = store
            .build_pending(|| now + chrono::Duration::from_std(base.elapsed()).unwrap_or_default())
            .await?;
        let done = built.first().context("the version was not built")?;
        anyhow::ensure!(
            done.members as u64 == preview.members,
            "the build found {} members",
            done.members
        );
        result.build_secs.push(done.seconds);
        eprintln!(
            "rep {}: evaluator {:.2} s, sql {:.2} s, build {:.2} s (evaluate and write {:.2} s, switch {:.2} s) ({} members of {})",
            rep + 1,
            result.evaluator_secs.last().copied().unwrap_or_default(),
            result.sql_secs.last().copied().unwrap_or_default(),
            done.seconds,
            done.evaluate_secs,
            done.switch_secs,
            preview.members,
            preview.population
        );
    }
    if let Some(path) = &args.save {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(result)
}

fn selector_named(compiled: &Compiled, name: &str) -> anyhow::Result<i64> {
    compiled
        .selectors
        .iter()
        .find(|s| s.name == name)
        .map(aggregate::selector_id)
        .with_context(|| format!("no {name} selector"))
}

/// The segment as one hand-written SQL query over the same tables: a count, no writes.
async fn sql_baseline(
    pool: &PgPool,
    workspace: &str,
    order_id: i64,
    view_id: i64,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let today = now.timestamp().div_euclid(86_400) as i32;
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM segments.people p
         WHERE p.workspace_id = $1
           AND (p.traits->>'revenue')::float8 >= 100
           AND EXISTS (SELECT 1 FROM segments.aggregates a WHERE a.workspace_id = $1 AND a.person = p.person
                       AND a.selector_id = $2 AND a.days[array_upper(a.days, 1)] >= $4 - 90)
           AND NOT EXISTS (SELECT 1 FROM segments.aggregates a WHERE a.workspace_id = $1 AND a.person = p.person
                       AND a.selector_id = $3 AND a.days[array_upper(a.days, 1)] >= $4 - 7)",
    )
    .bind(workspace)
    .bind(order_id)
    .bind(view_id)
    .bind(today)
    .fetch_one(pool)
    .await?;
    Ok(count as u64)
}

/// Empties a benchmark workspace and registers the segment's selectors as ready.
async fn reset_workspace(
    pool: &PgPool,
    workspace: &str,
    compiled: &Compiled,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    for table in ["people", "aggregates", "selectors"] {
        sqlx::query(&format!(
            "DELETE FROM segments.{table} WHERE workspace_id = $1"
        ))
        .bind(workspace)
        .execute(pool)
        .await?;
    }
    register_selectors(pool, workspace, compiled, now).await
}

/// Ready selectors for the compiled segment, so that nothing is backfilled.
async fn register_selectors(
    pool: &PgPool,
    workspace: &str,
    compiled: &Compiled,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    for selector in &compiled.selectors {
        sqlx::query(
            "INSERT INTO segments.selectors (workspace_id, id, event_name, definition, status, created_at) \
             VALUES ($1, $2, $3, $4, 'ready', $5) ON CONFLICT (workspace_id, id) DO UPDATE SET status = 'ready'",
        )
        .bind(workspace)
        .bind(aggregate::selector_id(selector))
        .bind(&selector.name)
        .bind(serde_json::json!({"name": selector.name, "where": selector.filter_json, "value": selector.value.as_ref().map(|v| v.join("."))}))
        .bind(now)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A generated population: each customer has `revenue` in their traits, `orders` orders
/// and the rest of their events as product views, on random days of the last year.
#[allow(clippy::too_many_arguments)]
async fn generate(
    pool: &PgPool,
    workspace: &str,
    customers: u32,
    events_per_customer: u32,
    order_id: i64,
    view_id: i64,
    compiled: &Compiled,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    let existing: i64 =
        sqlx::query_scalar("SELECT count(*) FROM segments.people WHERE workspace_id = $1")
            .bind(workspace)
            .fetch_one(pool)
            .await?;
    let orders = 4.min(events_per_customer);
    let views = events_per_customer - orders;
    let events = u64::from(customers) * u64::from(events_per_customer);
    if existing == i64::from(customers) {
        eprintln!("reusing the generated population of {workspace}");
        return Ok(events);
    }
    let started = Instant::now();
    reset_workspace(pool, workspace, compiled, now).await?;
    let today = now.timestamp().div_euclid(86_400) as i32;
    let chunk = 100_000u32;
    let mut from = 0u32;
    while from < customers {
        let to = (from + chunk).min(customers);
        sqlx::query(
            "INSERT INTO segments.people (workspace_id, person, traits, touched_at)
             SELECT $1, 'c:' || lpad(i::text, 8, '0'), jsonb_build_object('revenue', round((random() * 400)::numeric, 2)), $4
             FROM generate_series($2::int, $3::int - 1) AS i",
        )
        .bind(workspace)
        .bind(from as i32)
        .bind(to as i32)
        .bind(now)
        .execute(pool)
        .await?;
        for (selector, per_customer) in [(order_id, orders), (view_id, views)] {
            // `per_customer` events on random days of the last 365, grouped by day.
            sqlx::query(
                "INSERT INTO segments.aggregates (workspace_id, selector_id, person, days, counts, sums, last_at)
                 SELECT $1, $2, 'c:' || lpad(i::text, 8, '0'), d.days, d.counts, d.sums,
                        to_timestamp(d.days[array_upper(d.days, 1)]::bigint * 86400 + 43200)
                 FROM generate_series($3::int, $4::int - 1) AS i,
                 LATERAL (SELECT array_agg(day ORDER BY day) AS days, array_agg(n ORDER BY day) AS counts,
                                 array_agg(0::float8 ORDER BY day) AS sums
                          FROM (SELECT $6 - (random() * 364)::int + (i * 0) AS day, count(*)::int AS n
                                FROM generate_series(1, $5) GROUP BY 1) AS e) AS d",
            )
            .bind(workspace)
            .bind(selector)
            .bind(from as i32)
            .bind(to as i32)
            .bind(per_customer as i32)
            .bind(today)
            .execute(pool)
            .await?;
        }
        from = to;
        eprintln!(
            "generated {to} of {customers} customers ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(events)
}

/// The Online Retail customers: each buyer's orders as the service would aggregate them,
/// and their net revenue as a trait. Returns (customers, events).
async fn load_online_retail(
    pool: &PgPool,
    file: &std::path::Path,
    compiled: &Compiled,
    now: DateTime<Utc>,
) -> anyhow::Result<(u64, u64)> {
    let workspace = "bench-online-retail";
    reset_workspace(pool, workspace, compiled, now).await?;
    let order_id = selector_named(compiled, "order_completed")?;
    let reader = relance_retail_data::Reader::open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let mut series: HashMap<String, Series> = HashMap::new();
    let mut revenue: HashMap<String, f64> = HashMap::new();
    let mut events = 0u64;
    for invoice in reader {
        let invoice = invoice?;
        let person = match &invoice.customer_id {
            Some(id) => format!("c:{id}"),
            None => format!("v:guest-{}", invoice.invoice_no),
        };
        events += 1;
        let amount = invoice.revenue();
        *revenue.entry(person.clone()).or_default() += amount;
        if !invoice.is_cancellation {
            let at = invoice.invoiced_at.and_utc();
            series.entry(person).or_default().add(at, amount);
        }
    }
    let people: Vec<&String> = revenue.keys().collect();
    for chunk in people.chunks(5_000) {
        let keys: Vec<&str> = chunk.iter().map(|p| p.as_str()).collect();
        let traits: Vec<serde_json::Value> = chunk
            .iter()
            .map(|p| serde_json::json!({"revenue": revenue[*p]}))
            .collect();
        sqlx::query(
            "INSERT INTO segments.people (workspace_id, person, traits, touched_at) SELECT $1, p, t, $4 FROM unnest($2::text[], $3::jsonb[]) AS u(p, t)",
        )
        .bind(workspace)
        .bind(&keys)
        .bind(&traits)
        .bind(now)
        .execute(pool)
        .await?;
    }
    for (person, s) in &series {
        sqlx::query(
            "INSERT INTO segments.aggregates (workspace_id, selector_id, person, days, counts, sums, last_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(workspace)
        .bind(order_id)
        .bind(person)
        .bind(&s.days)
        .bind(&s.counts)
        .bind(&s.sums)
        .bind(s.last_at)
        .execute(pool)
        .await?;
    }
    Ok((revenue.len() as u64, events))
}

#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Events per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Percent of the events that are orders, each from a new customer who qualifies at
    /// once (timed); the rest are product views from other new customers, who do not.
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=100))]
    pub qualifying_percent: u32,
    /// Seconds timed.
    #[arg(long, default_value_t = 20)]
    pub duration: u32,
    /// Seconds sent first and not timed.
    #[arg(long, default_value_t = 3)]
    pub warmup: u32,
    /// A seed, so that each run's customers are new.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// RabbitMQ the service publishes to.
    #[arg(
        long,
        env = "RELANCE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The service's queue and exchange name prefix.
    #[arg(long, env = "RELANCE_AMQP_PREFIX", default_value = "")]
    pub amqp_prefix: String,
    #[arg(long)]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyResult {
    pub rate: u32,
    #[serde(default = "all")]
    pub qualifying_percent: u32,
    pub duration_secs: u32,
    pub sent: u64,
    pub track_ack: Percentiles,
    pub event_published: Percentiles,
    pub segment_entered: Percentiles,
    pub missing: u64,
}

fn all() -> u32 {
    100
}

const LATENCY_SEGMENT: &str = "kind: Segment
name: bench-buyers-today
description: Everyone who ordered today (each benchmark order qualifies its customer).
where:
  event: order_completed
  within: 1d
";

pub async fn latency(
    target: &crate::client::Target,
    args: &LatencyArgs,
) -> anyhow::Result<LatencyResult> {
    let channel = tonic::transport::Channel::from_shared(target.addr.clone())?
        .connect()
        .await?;
    let key = relance_kit::auth::BearerKey::new(&target.api_key)
        .map_err(|_| anyhow::anyhow!("--api-key"))?;
    let mut segments = pb::segments_client::SegmentsClient::with_interceptor(channel, key);
    let applied = segments
        .apply(pb::ApplySegmentRequest {
            yaml: LATENCY_SEGMENT.into(),
            dry_run: false,
        })
        .await?
        .into_inner();
    loop {
        let segment = segments
            .get(pb::GetSegmentRequest {
                name: applied.name.clone(),
                version: 0,
            })
            .await?
            .into_inner();
        if segment.status == pb::SegmentStatus::Active as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let settings = relance_kit::Settings::from_pairs(&[
        ("amqp_url", args.amqp_url.as_str()),
        ("amqp_prefix", args.amqp_prefix.as_str()),
    ])?;
    let bus = relance_kit::bus::Bus::connect(&settings).await?;
    let book = Arc::new(Mutex::new(Book::new()?));
    let prefix = format!("lat{}-", args.seed);
    let warmup = u64::from(args.rate) * u64::from(args.warmup);
    let mut watchers = Vec::new();
    for (pattern, stream) in [
        ("event.order_completed", 0usize),
        ("segment.entered", 1usize),
    ] {
        let (mut consumer, channel) = subscribe(&bus, pattern).await?;
        let book = book.clone();
        let prefix = prefix.clone();
        watchers.push(tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let arrived = Instant::now();
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                let mut customers = Vec::new();
                if let Some(events) = body.get("events").and_then(|e| e.as_array()) {
                    for event in events {
                        if let Some(id) = event.get("customer_id").and_then(|c| c.as_str()) {
                            customers.push(id.to_owned());
                        }
                    }
                } else if body.get("segment").and_then(|s| s.as_str()) == Some("bench-buyers-today")
                    && let Some(id) = body.get("customer_id").and_then(|c| c.as_str())
                {
                    customers.push(id.to_owned());
                }
                for id in customers {
                    let Some(index) = id.strip_prefix(&prefix).and_then(|i| i.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    if index < warmup {
                        continue;
                    }
                    if let Ok(mut book) = book.lock() {
                        book.arrived(stream, id, arrived);
                    }
                }
            }
        }));
    }

    let clients = target.connect(4).await?;
    let total = u64::from(args.rate) * u64::from(args.warmup + args.duration);
    let start = Instant::now() + Duration::from_millis(100);
    let mut in_flight = Vec::with_capacity(total as usize);
    let today = relance_kit::Clock::now(&relance_kit::SystemClock);
    for index in 0..total {
        let due = start + Duration::from_secs_f64(index as f64 / f64::from(args.rate));
        tokio::time::sleep_until(due.into()).await;
        let mut client = clients[index as usize % clients.len()].clone();
        // Orders spread evenly: index × percent crosses a multiple of 100 once per order.
        let qualifies =
            (index * u64::from(args.qualifying_percent)) % 100 < u64::from(args.qualifying_percent);
        let customer = if qualifies {
            format!("{prefix}{index}")
        } else {
            format!("{prefix}view-{index}")
        };
        let book = book.clone();
        in_flight.push(tokio::spawn(async move {
            let event = pb::Event {
                message_id: format!("{customer}-event"),
                name: if qualifies {
                    "order_completed"
                } else {
                    "product_viewed"
                }
                .into(),
                customer_id: customer.clone(),
                timestamp: Some(relance_proto::convert::chrono_to_timestamp(today)),
                ..Default::default()
            };
            if client
                .track(pb::TrackRequest { event: Some(event) })
                .await
                .is_ok()
            {
                let done = Instant::now();
                if qualifies
                    && index >= warmup
                    && let Ok(mut book) = book.lock()
                {
                    book.acked(customer, due, done);
                }
            }
        }));
    }
    for task in in_flight {
        task.await?;
    }
    // Let the last entries arrive.
    let timed = (warmup..total)
        .filter(|i| {
            (i * u64::from(args.qualifying_percent)) % 100 < u64::from(args.qualifying_percent)
        })
        .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let seen = book
            .lock()
            .map(|b| b.histograms[1].len())
            .unwrap_or_default();
        if seen >= timed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for watcher in &watchers {
        watcher.abort();
    }
    let book = book.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let segment_entered = Percentiles::of(&book.histograms[1]);
    let result = LatencyResult {
        rate: args.rate,
        qualifying_percent: args.qualifying_percent,
        duration_secs: args.duration,
        sent: timed,
        track_ack: Percentiles::of(&book.ack),
        event_published: Percentiles::of(&book.histograms[0]),
        missing: timed.saturating_sub(segment_entered.count),
        segment_entered,
    };
    if let Some(path) = &args.save {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(result)
}

/// Ack and arrival times per customer. A message can reach this client before the Track's
/// ack does (both race through different sockets): its latency from the ack is then ~0,
/// recorded when the ack comes.
struct Book {
    acks: HashMap<String, Instant>,
    early: [HashMap<String, Instant>; 2],
    ack: hdrhistogram::Histogram<u64>,
    histograms: [hdrhistogram::Histogram<u64>; 2],
}

impl Book {
    fn new() -> anyhow::Result<Book> {
        Ok(Book {
            acks: HashMap::new(),
            early: [HashMap::new(), HashMap::new()],
            ack: stats::new_histogram()?,
            histograms: [stats::new_histogram()?, stats::new_histogram()?],
        })
    }

    fn acked(&mut self, customer: String, due: Instant, done: Instant) {
        stats::record(&mut self.ack, done.saturating_duration_since(due));
        for stream in 0..2 {
            if let Some(arrived) = self.early[stream].remove(&customer) {
                stats::record(
                    &mut self.histograms[stream],
                    arrived.saturating_duration_since(done),
                );
            }
        }
        self.acks.insert(customer, done);
    }

    fn arrived(&mut self, stream: usize, customer: String, arrived: Instant) {
        match self.acks.get(&customer) {
            Some(done) => stats::record(
                &mut self.histograms[stream],
                arrived.saturating_duration_since(*done),
            ),
            None => {
                self.early[stream].insert(customer, arrived);
            }
        }
    }
}

async fn subscribe(
    bus: &relance_kit::bus::Bus,
    pattern: &str,
) -> anyhow::Result<(lapin::Consumer, lapin::Channel)> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = bus.channel().await?;
    bus.declare_exchange(&channel, relance_kit::bus::EVENTS_EXCHANGE)
        .await?;
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().as_str(),
            &bus.name(relance_kit::bus::EVENTS_EXCHANGE),
            pattern,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().as_str(),
            "bench",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((consumer, channel))
}

/// The segmentation section of BENCHMARKS.md.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Folder of `segment-batch-*.json` and `segment-latency.json`.
    #[arg(long)]
    pub results: PathBuf,
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    #[arg(long = "meta", value_parser = crate::report::parse_meta)]
    pub meta: Vec<(String, String)>,
}

pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut batches: Vec<BatchResult> = Vec::new();
    let mut latencies: Vec<LatencyResult> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.results)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let text = std::fs::read(&file)?;
        if name.starts_with("segment-batch") {
            batches.push(serde_json::from_slice(&text)?);
        } else if name.starts_with("segment-latency") {
            latencies.push(serde_json::from_slice(&text)?);
        }
    }
    let mut body = String::new();
    writeln!(body, "## Segmentation\n")?;
    writeln!(body, "| | |\n|---|---|")?;
    for (key, value) in &args.meta {
        writeln!(body, "| {key} | {value} |")?;
    }
    writeln!(body)?;
    writeln!(body, "### Batch evaluation of a three-condition segment\n")?;
    writeln!(body, "```yaml\n{}```\n", THREE_CONDITIONS)?;
    writeln!(
        body,
        "Median of the repetitions, seconds (customers per second). *Evaluator*: the service's batch evaluator counting the members (pages of 5,000 customers: their traits and daily aggregates read in key order, the same Rust evaluation as real time; what Preview runs). *SQL*: the same segment compiled by hand into one query, counting only — the baseline the design weighed. *Build*: what Apply costs end to end — evaluation, writing the memberships, the atomic switch.\n"
    )?;
    writeln!(
        body,
        "| population | customers | events | members | evaluator | SQL (baseline) | build (evaluate + write + switch) |"
    )?;
    writeln!(body, "|---|---:|---:|---:|---:|---:|---:|")?;
    for b in &batches {
        let cell = |secs: &[f64]| {
            let m = crate::stats::median(secs);
            format!("{m:.2} s ({:.0}/s)", b.customers as f64 / m)
        };
        writeln!(
            body,
            "| {} | {} | {} | {} | {} | {} | {} |",
            b.population_name,
            b.customers,
            b.events,
            b.members,
            cell(&b.evaluator_secs),
            cell(&b.sql_secs),
            cell(&b.build_secs)
        )?;
    }
    if !latencies.is_empty() {
        writeln!(
            body,
            "\n### Real time: Track acknowledged → `segment.entered` published\n"
        )?;
        writeln!(
            body,
            "Every event is from a new customer. Orders qualify at once for `event: order_completed, within: 1d`; product views do not (but are applied and their customers evaluated all the same). Latencies of the orders, from the moment their Track call was acknowledged to the moment a client of RabbitMQ received the message; the baseline row is the order itself reaching the bus (the events relay), so the difference is segmentation's share: consume, aggregate, evaluate, commit with the outbox, publish.\n"
        )?;
    }
    for l in &latencies {
        writeln!(
            body,
            "**{} events/s for {} s, {}% of them orders** (a warm-up before):\n",
            l.rate, l.duration_secs, l.qualifying_percent
        )?;
        writeln!(
            body,
            "| path | received | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|"
        )?;
        for (name, p) in [
            (
                "the order's Track call (scheduled → acknowledged)",
                &l.track_ack,
            ),
            (
                "baseline: ack → `event.order_completed` on the bus",
                &l.event_published,
            ),
            ("ack → `segment.entered` on the bus", &l.segment_entered),
        ] {
            writeln!(
                body,
                "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                p.count, p.p50, p.p90, p.p99, p.max
            )?;
        }
        writeln!(
            body,
            "\nEntries not received within 30 s of the last Track: {}.\n",
            l.missing
        )?;
    }
    crate::report::write_section(&args.out, "segments", &body)
}
