//! `campaigns`: the campaigns service's durable journeys and broadcasts at a million rows.
//!
//! 1. **Due steps per second with 1 M pending journeys.** A flow (applied through ApplyFlow)
//!    whose only step sends an in-app message; 1 M journeys written straight into
//!    `campaigns.journeys` (the state `JourneyState::start()` serialises to, status 1), of
//!    which 200,000 fall due at once and the rest weeks later. Steps/s = journeys the engine
//!    advanced ÷ time from the moment they fell due to the last one committed; the relay's
//!    publish rate of the send requests beside it.
//! 2. **Lateness of due steps** at a steady rate (2,000/s for 60 s, on top of 1 M pending):
//!    `step_visits.at` (the batch's clock read) − the journey's due time, and the time the
//!    send request reached a queue bound to `relance.delivery` − the due time.
//! 3. **A broadcast to 1 M customers**: ScheduleBroadcast (`schedule: now`) → (a) every
//!    recipient written, (b) every send request in the outbox (`broadcasts.queued`),
//!    (c) every one published to RabbitMQ (the relay's confirmed count) and counted on the
//!    bound queue.
//! 4. **Baselines in the same run**: for 1, a raw SQL loop doing only the claim
//!    (`FOR UPDATE SKIP LOCKED`) + the same journey UPDATE + commit; for 3, the same number of
//!    envelopes of the same size published with the kit's `Publisher` to a queue of the same
//!    kind, consumed the same way.
//!
//! Everything runs in this one process, as the services' tests do: profiles and campaigns on
//! `relance_kit::testing::TestApp` (its own database, RabbitMQ prefix and Redis prefix,
//! removed at the end), with a fake Segments server (Get, Count, ListMembers of 1 M ids in
//! pages) and a fake Delivery server (GetTemplate) on ports of their own, named in
//! `services.segmentation` and `services.delivery`. Nothing consumes the send requests but
//! the bench's counting consumer.
//!
//! The engine's clock is the machine's shifted by a constant: the pre-inserted journeys
//! are due a day ahead while they are written (so the engine sees none of them), then the
//! clock jumps to the planned instant and runs at normal speed from there. `step_visits.at`
//! and the due times are both in that frame.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use futures::Stream;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use relance_campaigns::domain::journey::JourneyState;
use relance_delivery::wire::Envelope;
use relance_kit::bus::{
    ConsumerSpec, DELIVERY_EXCHANGE, HandleError, Handler, Outgoing, Publisher, Received,
};
use relance_kit::testing::{TestApp, TestEnv, authed};
use relance_kit::{Clock, SharedClock, SystemClock};
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::{self as pb, customer_ref};
use serde::{Deserialize, Serialize};
use sqlx::ConnectOptions as _;
use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::stats::Percentiles;

const FLOW: &str = "bench-send";
const STEP: &str = "notify";
const TEMPLATE: &str = "bench-inbox";
const SEGMENT: &str = "bench-audience";
const BROADCAST: &str = "bench-broadcast";
/// The queue bound to `relance.delivery` with `#`, in place of delivery's own.
const TAP_QUEUE: &str = "bench.delivery-requests";
const BASELINE_EXCHANGE: &str = "bench.baseline";
const BASELINE_QUEUE: &str = "bench.bus-baseline";
/// The bench's own Postgres connections, left out of the activity samples.
const MONITOR_APP: &str = "bench-monitor";
/// Sampling period of counters and progress.
const TICK: StdDuration = StdDuration::from_millis(100);

/// The engine's claim, exactly as `store::journeys::claim_due` runs it (schema-qualified).
const CLAIM_SQL: &str = "SELECT id, workspace_id, flow, flow_version, customer_id, control, state, trigger_data, entered_at \
     FROM campaigns.journeys WHERE status = 1 AND next_wake_at <= $1 ORDER BY next_wake_at LIMIT $2 FOR UPDATE SKIP LOCKED";
/// The index the broadcaster's claim lacks (measured as a what-if, rolled back; built for a
/// whole run with `--recipients-index`).
const PROPOSED_INDEX: &str = "CREATE INDEX bench_recipients_pending ON campaigns.broadcast_recipients \
     (workspace_id, broadcast, run, due_at) WHERE state = 0";
/// The engine's journey write, exactly as `store::journeys::write_journeys` runs it.
const WRITE_SQL: &str = "UPDATE campaigns.journeys j SET status = w.status, end_reason = w.reason, state = w.state, \
     waiting_event = w.waiting, next_wake_at = w.wake, updated_at = $7, \
     ended_at = CASE WHEN w.status = 3 THEN $7 ELSE NULL END, \
     trigger_data = CASE WHEN w.status = 3 THEN '{}'::jsonb ELSE j.trigger_data END \
     FROM UNNEST($1::uuid[], $2::smallint[], $3::smallint[], $4::jsonb[], $5::text[], $6::timestamptz[]) \
     AS w(id, status, reason, state, waiting, wake) WHERE j.id = w.id";

#[derive(Debug, Clone, clap::Args)]
pub struct CampaignsArgs {
    /// Journeys pending when the engine starts, the due ones included.
    #[arg(long, default_value_t = 1_000_000)]
    pub pending: u32,
    /// Of them, due at once (the drain measured for steps/s).
    #[arg(long, default_value_t = 200_000)]
    pub due: u32,
    /// Journeys falling due per second in the lateness run (0: skip it).
    #[arg(long, default_value_t = 2_000)]
    pub paced_rate: u32,
    /// How long journeys keep falling due in the lateness run.
    #[arg(long, default_value_t = 60)]
    pub paced_secs: u32,
    /// Customers in the broadcast's segment (0: skip the broadcast and the bus baseline).
    #[arg(long, default_value_t = 1_000_000)]
    pub audience: u32,
    /// Journey workers (`campaigns.workers`).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Due journeys claimed per transaction (`campaigns.batch`).
    #[arg(long, default_value_t = 500)]
    pub batch: i64,
    /// Milliseconds between polls when nothing is due (`campaigns.poll_ms`).
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
    /// Broadcast recipients per transaction (`campaigns.broadcast_batch`).
    #[arg(long, default_value_t = 2_000)]
    pub broadcast_batch: i64,
    /// Postgres connections per service pool (`database_max_connections`).
    #[arg(long, default_value_t = 10)]
    pub db_connections: u32,
    /// Envelopes per `publish_all` call in the bus baseline (the relay's batch is 1,000).
    #[arg(long, default_value_t = 1_000)]
    pub publish_chunk: usize,
    /// Prefetch of the counting consumers.
    #[arg(long, default_value_t = 1_024)]
    pub prefetch: u16,
    /// Journeys written per INSERT while preparing.
    #[arg(long, default_value_t = 50_000)]
    pub insert_chunk: u32,
    /// Longest wait for a journey drain, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Longest wait for the broadcast, in seconds.
    #[arg(long, default_value_t = 300)]
    pub broadcast_timeout_secs: u64,
    /// The services' log filter.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// An experiment, not the service as it is: build the index the broadcaster's claim
    /// lacks (`PROPOSED_INDEX`) before the broadcast.
    #[arg(long)]
    pub recipients_index: bool,
    /// An experiment: ANALYZE `broadcast_recipients` as soon as the audience is written (what
    /// autovacuum would do, were it on and quick).
    #[arg(long)]
    pub analyze_after_snapshot: bool,
    /// Skip the bus baseline (for experiments on the broadcast alone).
    #[arg(long)]
    pub no_bus_baseline: bool,
}

// --- Results ------------------------------------------------------------------------------

/// The settings of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    pub pending: u32,
    pub due: u32,
    pub paced_rate: u32,
    pub paced_secs: u32,
    pub audience: u32,
    pub workers: usize,
    pub batch: i64,
    pub poll_ms: u64,
    pub broadcast_batch: i64,
    pub db_connections: u32,
    pub publish_chunk: usize,
}

/// Batch durations from the engine's `relance_campaigns_batch_seconds` histogram (bucket
/// bounds: p50 and p99 are "at most").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchStats {
    pub batches: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub journeys_per_batch: f64,
}

/// What Postgres was doing, from `pg_stat_activity` sampled every 50 ms: average backends
/// in each state and statement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DbActivity {
    pub samples: u64,
    /// (what, average backends), largest first.
    pub top: Vec<(String, f64)>,
}

/// A drain of due journeys (the engine or the raw SQL baseline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Drain {
    pub what: String,
    pub journeys: u64,
    /// Due → the last one committed.
    pub secs: f64,
    pub per_sec: f64,
    /// Steps/s over 1-second windows of the drain (median, slowest).
    pub per_sec_median: f64,
    pub per_sec_min: f64,
    pub batch: BatchStats,
    /// Send requests published by the relay (broker-confirmed) during the drain.
    pub published: u64,
    /// Due → the last send request published.
    pub published_secs: Option<f64>,
    pub publish_per_sec: Option<f64>,
    /// Due → the last send request counted on the bound queue.
    pub consumed_secs: Option<f64>,
    /// Each journey's wait: its `step_visits.at` − its due time.
    pub wait: Option<Percentiles>,
    /// CPU cores used, by process.
    pub cpu: BTreeMap<String, f64>,
    pub db: DbActivity,
}

/// Journeys falling due at a steady rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paced {
    pub rate: u32,
    pub secs: u32,
    pub journeys: u64,
    /// Journeys advanced by the end of the wait.
    pub advanced: u64,
    /// `step_visits.at` − due.
    pub lateness: Percentiles,
    /// Counted on the queue bound to `relance.delivery` − due.
    pub to_queue: Percentiles,
    pub batch: BatchStats,
    pub cpu: BTreeMap<String, f64>,
    pub db: DbActivity,
}

/// The broadcast to the whole audience.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastRun {
    pub audience: u64,
    pub schedule_ms: f64,
    /// ScheduleBroadcast → the fake's last ListMembers page sent.
    pub listed_secs: Option<f64>,
    /// → every recipient written (`run_state` 1).
    pub snapshot_secs: Option<f64>,
    /// → every send request in the outbox (`queued` = audience).
    pub queued_secs: Option<f64>,
    /// → every send request published (the relay's confirmed count).
    pub published_secs: Option<f64>,
    /// → every send request counted on the bound queue.
    pub consumed_secs: Option<f64>,
    pub recipients: u64,
    pub queued: u64,
    pub published: u64,
    pub consumed: u64,
    /// Send requests queued (outbox) and published per second, median of 1-second windows
    /// once the snapshot was done.
    pub queue_per_sec_median: f64,
    pub publish_per_sec_median: f64,
    pub payload_bytes: f64,
    pub outbox_left: i64,
    pub timed_out: bool,
    /// (seconds since ScheduleBroadcast, queued, published) every 10 s.
    #[serde(default)]
    pub progress: Vec<(f64, u64, u64)>,
    /// When not done: when every send request would have been queued at the last minute's
    /// rate (seconds since ScheduleBroadcast).
    #[serde(default)]
    pub queued_eta_secs: Option<f64>,
    /// CancelBroadcast calls refused before one went through (after a timeout).
    #[serde(default)]
    pub cancel_failures: u32,
    /// The run had the index the bench proposes on `broadcast_recipients`.
    #[serde(default)]
    pub with_index: bool,
    /// `broadcast_recipients` was analyzed as soon as the audience was written.
    #[serde(default)]
    pub analyzed: bool,
    pub cpu: BTreeMap<String, f64>,
    pub db: DbActivity,
}

/// The bus alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BusBaseline {
    pub messages: u64,
    pub payload_bytes: f64,
    pub publish_secs: f64,
    pub publish_per_sec: f64,
    pub consumed: u64,
    pub consumed_secs: f64,
    pub consumed_per_sec: f64,
    pub cpu: BTreeMap<String, f64>,
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of a query the service runs, at a named moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explained {
    pub what: String,
    pub execution_ms: f64,
    pub plan: String,
}

/// Preparation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetupSummary {
    pub journeys_inserted: u64,
    pub insert_secs: f64,
    pub vacuum_secs: f64,
    pub flow_version: u32,
}

/// The `campaigns` scenario's result (`--save`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignsResult {
    pub scenario: String,
    pub config: BenchConfig,
    pub setup: SetupSummary,
    pub raw_baseline: Option<Drain>,
    pub engine: Option<Drain>,
    pub paced: Option<Paced>,
    pub broadcast: Option<BroadcastRun>,
    pub bus_baseline: Option<BusBaseline>,
    pub explains: Vec<Explained>,
    /// Table sizes at the end (`pg_total_relation_size`, MB).
    pub sizes_mb: BTreeMap<String, f64>,
}

impl CampaignsResult {
    pub fn line(&self) -> String {
        let mut lines = Vec::new();
        for drain in [&self.raw_baseline, &self.engine].into_iter().flatten() {
            lines.push(drain.line());
        }
        if let Some(paced) = &self.paced {
            lines.push(format!(
                "paced {}/s for {} s: {} journeys, {} advanced, lateness p50={:.1}ms p99={:.1}ms max={:.1}ms, due → on the queue p50={:.1}ms p99={:.1}ms",
                paced.rate,
                paced.secs,
                paced.journeys,
                paced.advanced,
                paced.lateness.p50,
                paced.lateness.p99,
                paced.lateness.max,
                paced.to_queue.p50,
                paced.to_queue.p99,
            ));
        }
        if let Some(b) = &self.broadcast {
            let s = |v: Option<f64>| v.map(|v| format!("{v:.1}s")).unwrap_or_else(|| "–".into());
            lines.push(format!(
                "broadcast {}: listed {} snapshot {} queued {} published {} consumed {} (queued={} published={} consumed={})",
                b.audience,
                s(b.listed_secs),
                s(b.snapshot_secs),
                s(b.queued_secs),
                s(b.published_secs),
                s(b.consumed_secs),
                b.queued,
                b.published,
                b.consumed
            ));
        }
        if let Some(bus) = &self.bus_baseline {
            lines.push(format!(
                "baseline bus alone n={} publish {:.1}s ({:.0}/s) consumed {:.1}s ({:.0}/s)",
                bus.messages,
                bus.publish_secs,
                bus.publish_per_sec,
                bus.consumed_secs,
                bus.consumed_per_sec
            ));
        }
        for explain in &self.explains {
            lines.push(format!(
                "explain {}: {:.1} ms",
                explain.what, explain.execution_ms
            ));
        }
        lines.join("\n")
    }
}

impl Drain {
    fn line(&self) -> String {
        let published = self
            .publish_per_sec
            .map(|p| format!(" relay={p:.0}/s"))
            .unwrap_or_default();
        format!(
            "{:<24} n={} elapsed={:.2}s steps/s={:.0} (1-s windows median {:.0}, min {:.0}) batches={} mean={:.1}ms{published}",
            self.what,
            self.journeys,
            self.secs,
            self.per_sec,
            self.per_sec_median,
            self.per_sec_min,
            self.batch.batches,
            self.batch.mean_ms,
        )
    }
}

// --- Clocks and machine -------------------------------------------------------------------

/// The machine's clock shifted by an offset the bench moves.
#[derive(Debug, Default)]
struct ShiftClock {
    offset_us: AtomicI64,
}

impl Clock for ShiftClock {
    fn now(&self) -> DateTime<Utc> {
        SystemClock.now() + Duration::microseconds(self.offset_us.load(Ordering::SeqCst))
    }
}

impl ShiftClock {
    /// From now on, the clock reads `at` and moves on from there.
    fn jump_to(&self, at: DateTime<Utc>) {
        let offset = (at - SystemClock.now()).num_microseconds().unwrap_or(0);
        self.offset_us.store(offset, Ordering::SeqCst);
    }

    /// The clock's reading at wall-clock nanoseconds `wall`.
    fn at_wall_ns(&self, wall: i128) -> DateTime<Utc> {
        let micros = (wall / 1000) as i64 + self.offset_us.load(Ordering::SeqCst);
        DateTime::from_timestamp_micros(micros).unwrap_or_default()
    }
}

fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// CPU time (clock ticks) of every process, by pid, with the group it counts in; the
/// machine's busy ticks under the pseudo-pid 0.
type Ticks = HashMap<u32, (&'static str, u64)>;

/// The machine's busy and total ticks (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 8 {
        return None;
    }
    let total: u64 = values.iter().take(8).sum();
    Some((total - values[3] - values[4], total))
}

fn process_ticks() -> Ticks {
    let me = std::process::id();
    let mut ticks: Ticks = HashMap::new();
    if let Some((busy, _)) = machine_ticks() {
        ticks.insert(0, ("machine, all processes", busy));
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return ticks;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.len() < 13 {
            continue;
        }
        let used = fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        let group = if pid == me {
            "bench process (campaigns, profiles, fakes, consumer)"
        } else if comm == "postgres" {
            "postgres"
        } else if comm == "beam.smp" || comm.starts_with("erl") {
            "rabbitmq"
        } else if comm.starts_with("redis") {
            "redis"
        } else {
            "other processes"
        };
        ticks.insert(pid, (group, used));
    }
    ticks
}

/// Cores used by each group between two readings `secs` apart (100 ticks a second): the
/// growth of each process alive at the end (a process that ended meanwhile is missed).
fn cores(before: &Ticks, after: &Ticks, secs: f64) -> BTreeMap<String, f64> {
    let mut used: BTreeMap<String, u64> = BTreeMap::new();
    for (pid, (group, end)) in after {
        let start = before.get(pid).map(|(_, t)| *t).unwrap_or(0);
        *used.entry((*group).to_owned()).or_insert(0) += end.saturating_sub(start);
    }
    used.into_iter()
        .map(|(group, ticks)| {
            let cores = ticks as f64 / 100.0 / secs.max(1e-9);
            (group, (cores * 100.0).round() / 100.0)
        })
        .collect()
}

// --- Fakes --------------------------------------------------------------------------------

type Answer<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn audience_id(n: u32) -> String {
    format!("b{n:07}")
}

/// Segmentation with one segment of `audience` customers.
#[derive(Debug, Clone)]
struct FakeSegments {
    audience: u32,
    /// Wall-clock ns when the last page of the last ListMembers stream was produced.
    listed_at: Arc<AtomicI64>,
}

#[tonic::async_trait]
impl pb::segments_server::Segments for FakeSegments {
    type ListMembersStream = BoxStream<pb::ListSegmentMembersResponse>;

    async fn apply(&self, _: Request<pb::ApplySegmentRequest>) -> Answer<pb::ApplySegmentResponse> {
        Err(Status::unimplemented("fake segmentation"))
    }

    async fn get(&self, request: Request<pb::GetSegmentRequest>) -> Answer<pb::Segment> {
        let name = request.into_inner().name;
        if name != SEGMENT {
            return Err(Status::not_found(format!("segment {name} does not exist")));
        }
        Ok(Response::new(pb::Segment {
            name,
            version: 1,
            latest_version: 1,
            status: pb::SegmentStatus::Active as i32,
            member_count: u64::from(self.audience),
            ..Default::default()
        }))
    }

    async fn list(&self, _: Request<pb::ListSegmentsRequest>) -> Answer<pb::ListSegmentsResponse> {
        Err(Status::unimplemented("fake segmentation"))
    }

    async fn count(
        &self,
        request: Request<pb::CountSegmentRequest>,
    ) -> Answer<pb::CountSegmentResponse> {
        Ok(Response::new(pb::CountSegmentResponse {
            name: request.into_inner().name,
            version: 1,
            count: u64::from(self.audience),
            as_of: None,
        }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> Answer<Self::ListMembersStream> {
        let page = request.into_inner().page_size.clamp(1, 10_000);
        let audience = self.audience;
        let listed_at = self.listed_at.clone();
        let pages = futures::stream::unfold(0u32, move |next| {
            let listed_at = listed_at.clone();
            async move {
                if next >= audience {
                    return None;
                }
                let end = next.saturating_add(page).min(audience);
                let members = (next..end)
                    .map(|n| pb::SegmentMember {
                        customer: Some(pb::CustomerRef {
                            id: Some(customer_ref::Id::CustomerId(audience_id(n))),
                        }),
                        entered_at: None,
                    })
                    .collect();
                if end == audience {
                    listed_at.store(wall_ns() as i64, Ordering::SeqCst);
                }
                let response = pb::ListSegmentMembersResponse {
                    members,
                    version: 1,
                    ..Default::default()
                };
                Some((Ok(response), end))
            }
        });
        Ok(Response::new(Box::pin(pages)))
    }

    async fn is_member(
        &self,
        request: Request<pb::IsSegmentMemberRequest>,
    ) -> Answer<pb::IsSegmentMemberResponse> {
        let memberships = request
            .into_inner()
            .names
            .into_iter()
            .map(|name| pb::SegmentMembership {
                name,
                member: true,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::IsSegmentMemberResponse { memberships }))
    }

    async fn preview(
        &self,
        _: Request<pb::PreviewSegmentRequest>,
    ) -> Answer<pb::PreviewSegmentResponse> {
        Err(Status::unimplemented("fake segmentation"))
    }

    async fn archive(&self, _: Request<pb::ArchiveSegmentRequest>) -> Answer<pb::Segment> {
        Err(Status::unimplemented("fake segmentation"))
    }
}

/// Delivery that knows one template and takes nothing else: send requests stay on the bus
/// for the bench's counting consumer.
#[derive(Debug, Clone, Default)]
struct FakeDelivery;

#[tonic::async_trait]
impl pb::delivery_server::Delivery for FakeDelivery {
    type WatchInboxStream = BoxStream<pb::InboxUpdate>;

    async fn send(&self, _: Request<pb::SendRequest>) -> Answer<pb::SendResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn get_message(&self, _: Request<pb::GetMessageRequest>) -> Answer<pb::MessageRecord> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn list_messages(
        &self,
        _: Request<pb::ListMessagesRequest>,
    ) -> Answer<pb::ListMessagesResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn list_inbox(&self, _: Request<pb::ListInboxRequest>) -> Answer<pb::ListInboxResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn mark_read(&self, _: Request<pb::MarkReadRequest>) -> Answer<pb::MarkReadResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn watch_inbox(
        &self,
        _: Request<pb::WatchInboxRequest>,
    ) -> Answer<Self::WatchInboxStream> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn preview_template(
        &self,
        _: Request<pb::PreviewTemplateRequest>,
    ) -> Answer<pb::PreviewTemplateResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn upsert_template(
        &self,
        _: Request<pb::UpsertTemplateRequest>,
    ) -> Answer<pb::UpsertTemplateResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
    async fn get_template(&self, request: Request<pb::GetTemplateRequest>) -> Answer<pb::Template> {
        let name = request.into_inner().name;
        if name != TEMPLATE {
            return Err(Status::not_found(format!("template {name} does not exist")));
        }
        Ok(Response::new(pb::Template {
            name,
            version: 1,
            default_locale: "en".into(),
            variants: vec![pb::TemplateVariant {
                locale: "en".into(),
                content: Some(pb::MessageContent {
                    in_app: Some(pb::InAppContent {
                        title: "News for you".into(),
                        body: "See what is new".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
    async fn list_templates(
        &self,
        _: Request<pb::ListTemplatesRequest>,
    ) -> Answer<pb::ListTemplatesResponse> {
        Err(Status::unimplemented("fake delivery"))
    }
}

/// Serves the fakes on free ports of 127.0.0.1; returns their URLs.
/// The fake segmentation alone, with one segment of `audience` ids (`b0000000`, …): the
/// load-test scenarios (`shop.rs`) write those customers' profiles themselves. Returns its URL.
pub(crate) async fn serve_fake_segments(
    audience: u32,
    stop: CancellationToken,
) -> anyhow::Result<String> {
    let segments = FakeSegments {
        audience,
        listed_at: Arc::new(AtomicI64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the fake segmentation's port")?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = tonic::transport::Server::builder()
        .add_service(pb::segments_server::SegmentsServer::new(segments));
    tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            eprintln!("fake segmentation failed: {error:#}");
        }
    });
    Ok(format!("http://{addr}"))
}

async fn serve_fakes(
    segments: FakeSegments,
    stop: CancellationToken,
) -> anyhow::Result<(String, String)> {
    let mut urls = Vec::new();
    for which in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a fake's port")?;
        let addr = listener.local_addr()?;
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = stop.clone();
        let mut builder = tonic::transport::Server::builder();
        let router = if which == 0 {
            builder.add_service(pb::segments_server::SegmentsServer::new(segments.clone()))
        } else {
            builder.add_service(pb::delivery_server::DeliveryServer::new(FakeDelivery))
        };
        tokio::spawn(async move {
            if let Err(error) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                eprintln!("fake server failed: {error:#}");
            }
        });
        urls.push(format!("http://{addr}"));
    }
    Ok((urls[0].clone(), urls[1].clone()))
}

// --- The counting consumer ------------------------------------------------------------------

/// Counts the messages of a queue; while `recording`, keeps each message id with the
/// wall-clock time it was taken.
#[derive(Default)]
struct Tap {
    count: AtomicU64,
    bytes: AtomicU64,
    recording: AtomicBool,
    records: Mutex<Vec<(String, i128)>>,
    batch: usize,
}

impl Tap {
    fn take(&self, messages: &[Received<'_>]) {
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.count
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        if self.recording.load(Ordering::Relaxed) {
            let now = wall_ns();
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            for message in messages {
                records.push((message.message_id.to_owned(), now));
            }
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Handler for Tap {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            self.take(std::slice::from_ref(message));
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
            self.take(messages);
            Ok(())
        })
    }
}

// --- Metrics --------------------------------------------------------------------------------

/// The process's Prometheus recorder (the services' counters and histograms).
struct Metrics(Box<dyn Fn() -> String + Send + Sync>);

/// The counters the bench follows, at one moment.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    steps: u64,
    published: u64,
    batch_buckets: Vec<(f64, u64)>,
    batch_sum: f64,
    batch_count: u64,
}

impl Metrics {
    fn snapshot(&self) -> Snapshot {
        let text = (self.0)();
        let mut snapshot = Snapshot::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match key.split_once('{') {
                Some((name, labels)) => (name, labels),
                None => (key, ""),
            };
            match name {
                "relance_campaigns_steps_total" => snapshot.steps += value as u64,
                "relance_campaigns_sends_published_total" => snapshot.published += value as u64,
                "relance_campaigns_batch_seconds_bucket" => {
                    let le = labels
                        .split("le=\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .map(|le| {
                            if le == "+Inf" {
                                f64::INFINITY
                            } else {
                                le.parse().unwrap_or(f64::INFINITY)
                            }
                        })
                        .unwrap_or(f64::INFINITY);
                    snapshot.batch_buckets.push((le, value as u64));
                }
                "relance_campaigns_batch_seconds_sum" => snapshot.batch_sum += value,
                "relance_campaigns_batch_seconds_count" => snapshot.batch_count += value as u64,
                _ => {}
            }
        }
        snapshot.batch_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        snapshot
    }
}

/// Batch statistics between two snapshots.
fn batch_stats(before: &Snapshot, after: &Snapshot, journeys: u64) -> BatchStats {
    let count = after.batch_count.saturating_sub(before.batch_count);
    if count == 0 {
        return BatchStats::default();
    }
    let mut buckets = Vec::new();
    for (le, cumulative) in &after.batch_buckets {
        let earlier = before
            .batch_buckets
            .iter()
            .find(|(b, _)| b == le)
            .map(|(_, c)| *c)
            .unwrap_or(0);
        buckets.push((*le, cumulative.saturating_sub(earlier)));
    }
    let quantile = |q: f64| {
        let target = (q * count as f64).ceil() as u64;
        buckets
            .iter()
            .find(|(_, c)| *c >= target)
            .map(|(le, _)| {
                if le.is_finite() {
                    le * 1000.0
                } else {
                    f64::INFINITY
                }
            })
            .unwrap_or(f64::INFINITY)
    };
    BatchStats {
        batches: count,
        mean_ms: (after.batch_sum - before.batch_sum) / count as f64 * 1000.0,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        journeys_per_batch: journeys as f64 / count as f64,
    }
}

// --- Postgres activity ------------------------------------------------------------------------

/// By phase: samples taken, and how many backends were seen in each state and statement.
type ActivityCounts = HashMap<String, (u64, HashMap<String, u64>)>;

/// Samples `pg_stat_activity` every 50 ms while a phase is named.
#[derive(Clone, Default)]
struct Activity {
    phase: Arc<Mutex<Option<String>>>,
    counts: Arc<Mutex<ActivityCounts>>,
}

impl Activity {
    fn begin(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = Some(phase.to_owned());
    }

    fn end(&self) -> DbActivity {
        let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(phase) = phase else {
            return DbActivity::default();
        };
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some((samples, keys)) = counts.get(&phase) else {
            return DbActivity::default();
        };
        let mut top: Vec<(String, f64)> = keys
            .iter()
            .map(|(key, n)| (key.clone(), *n as f64 / (*samples).max(1) as f64))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(10);
        DbActivity {
            samples: *samples,
            top,
        }
    }

    async fn run(self, pool: sqlx::PgPool, stop: CancellationToken) {
        let mut every = tokio::time::interval(StdDuration::from_millis(50));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let Some(phase) = phase else {
                continue;
            };
            let rows: Result<Vec<(String, String, String)>, _> = sqlx::query_as(
                "SELECT coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, ''), \
                 left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 90) \
                 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend' AND application_name <> $1 AND state <> 'idle'",
            )
            .bind(MONITOR_APP)
            .fetch_all(&pool)
            .await;
            let Ok(rows) = rows else {
                continue;
            };
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let entry = counts.entry(phase).or_default();
            entry.0 += 1;
            for (state, wait, query) in rows {
                let key = if state == "active" {
                    if wait.is_empty() {
                        format!("running: {query}")
                    } else {
                        format!("waiting ({wait}): {query}")
                    }
                } else {
                    format!("{state}, after: {query}")
                };
                *entry.1.entry(key).or_insert(0) += 1;
            }
        }
    }
}

// --- The bench --------------------------------------------------------------------------------

struct Bench {
    app: TestApp,
    clock: Arc<ShiftClock>,
    campaigns: CampaignsClient<tonic::transport::Channel>,
    /// The bench's own connections (inserts, progress, EXPLAIN), left out of the samples.
    pool: sqlx::PgPool,
    /// The raw SQL baseline's connections (sampled like the services').
    raw_pool: sqlx::PgPool,
    metrics: Metrics,
    tap: Arc<Tap>,
    activity: Activity,
    listed_at: Arc<AtomicI64>,
    broadcast_batch: i64,
    stop: CancellationToken,
    _telemetry: relance_kit::telemetry::TelemetryGuard,
}

async fn start(args: &CampaignsArgs) -> anyhow::Result<Bench> {
    // Installed before any service starts, so that their counters are recorded.
    let handle = relance_kit::metrics::recorder();
    let metrics = Metrics(Box::new(move || handle.render()));
    let stop = CancellationToken::new();
    let listed_at = Arc::new(AtomicI64::new(0));
    let segments = FakeSegments {
        audience: args.audience,
        listed_at: listed_at.clone(),
    };
    let (segments_url, delivery_url) = serve_fakes(segments, stop.clone()).await?;
    let env = Arc::new(TestEnv::new().await);
    let toml = format!(
        r#"
[campaigns]
workers = {workers}
batch = {batch}
poll_ms = {poll_ms}
broadcast_batch = {broadcast_batch}

[services]
segmentation = "{segments_url}"
delivery = "{delivery_url}"
"#,
        workers = args.workers,
        batch = args.batch,
        poll_ms = args.poll_ms,
        broadcast_batch = args.broadcast_batch,
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
    let telemetry = relance_kit::telemetry::init(&settings, "relance-loadtest")?;
    let database_url = env.database_url();
    let clock = Arc::new(ShiftClock::default());
    let shared: SharedClock = clock.clone();
    let app = TestApp::start(
        env,
        settings,
        shared,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_campaigns::serve(platform, server).await
            })
        }),
    )
    .await;
    let options = database_url
        .parse::<PgConnectOptions>()
        .context("the bench database URL")?
        .application_name(MONITOR_APP)
        // Its inserts and EXPLAINs are slow on purpose: only the services' slow statements
        // are worth a line of the run's output.
        .disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone())
        .await
        .context("connecting to the bench database")?;
    let raw_pool = PgPoolOptions::new()
        .max_connections(args.workers.max(1) as u32)
        .connect_with(options.application_name("bench-raw-baseline"))
        .await
        .context("connecting to the bench database")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS public.bench_due (id uuid PRIMARY KEY, due timestamptz NOT NULL, phase text NOT NULL)",
    )
    .execute(&pool)
    .await?;

    // The queue delivery would consume, bound the same way, consumed by the platform's
    // consumer with a handler that only counts.
    let tap = Arc::new(Tap {
        batch: 256,
        ..Tap::default()
    });
    let mut spec = ConsumerSpec::new(TAP_QUEUE).bind(DELIVERY_EXCHANGE, "#");
    spec.prefetch = args.prefetch;
    relance_kit::bus::declare(&app.platform.bus, &spec).await?;
    tokio::spawn(relance_kit::bus::run_consumer(
        app.platform.bus.clone(),
        spec,
        tap.clone(),
        stop.clone(),
    ));
    let activity = Activity::default();
    tokio::spawn(activity.clone().run(pool.clone(), stop.clone()));
    let campaigns = CampaignsClient::new(app.channel().await);
    Ok(Bench {
        app,
        clock,
        campaigns,
        pool,
        raw_pool,
        metrics,
        tap,
        activity,
        listed_at,
        broadcast_batch: args.broadcast_batch,
        stop,
        _telemetry: telemetry,
    })
}

/// Times in seconds since `t0` when a counter first reached `target` (linear between
/// samples is not worth it at 100 ms ticks).
fn reached(samples: &[(f64, u64)], base: u64, target: u64) -> Option<f64> {
    samples
        .iter()
        .find(|(_, value)| value.saturating_sub(base) >= target)
        .map(|(t, _)| *t)
}

/// Median and slowest rate over 1-second windows of `samples` between `from` and `to`.
fn window_rates(samples: &[(f64, u64)], from: f64, to: f64) -> (f64, f64) {
    let mut rates = Vec::new();
    let mut start = from;
    while start + 1.0 <= to + 1e-9 {
        let at = |t: f64| {
            samples
                .iter()
                .take_while(|(s, _)| *s <= t + 1e-9)
                .last()
                .map(|(_, v)| *v)
                .unwrap_or(0)
        };
        let a = at(start);
        let b = at(start + 1.0);
        rates.push(b.saturating_sub(a) as f64);
        start += 1.0;
    }
    if rates.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    (crate::stats::median(&rates), min)
}

fn percentiles_ms(values_ms: &[f64]) -> anyhow::Result<Percentiles> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for value in values_ms {
        let micros = (value * 1000.0).max(1.0) as u64;
        histogram.saturating_record(micros);
    }
    Ok(Percentiles::of(&histogram))
}

impl Bench {
    fn admin<T>(&self, message: T) -> Request<T> {
        authed(&self.app.admin_key, message)
    }

    fn workspace(&self) -> &str {
        &self.app.workspace
    }

    /// Quiet hours off (the run may fall at night in UTC), then the flow.
    async fn setup(&mut self) -> anyhow::Result<u32> {
        let quiet = pb::SetQuietHoursRequest {
            quiet_hours: Some(pb::QuietHours {
                enabled: false,
                start: "22:00".into(),
                end: "08:00".into(),
                ..Default::default()
            }),
        };
        let request = self.admin(quiet);
        self.campaigns
            .set_quiet_hours(request)
            .await
            .context("SetQuietHours")?;
        let yaml = format!(
            "kind: Flow\nname: {FLOW}\ndescription: One in-app message (the campaigns benchmark).\n\
             trigger: {{ event: bench_signal }}\nsteps:\n  - id: {STEP}\n    send: {{ channel: in_app, template: {TEMPLATE} }}\n"
        );
        let request = self.admin(pb::ApplyFlowRequest {
            yaml,
            dry_run: false,
        });
        let applied = self
            .campaigns
            .apply_flow(request)
            .await
            .context("ApplyFlow")?
            .into_inner();
        Ok(applied.version)
    }

    /// Writes the journeys of customers `customers`, the i-th due at `base + i × step_secs`;
    /// keeps their due times in `bench_due` under `phase`.
    async fn insert(
        &self,
        args: &CampaignsArgs,
        version: u32,
        customers: std::ops::Range<u64>,
        base: DateTime<Utc>,
        step_secs: f64,
        phase: Option<&str>,
    ) -> anyhow::Result<()> {
        let state = serde_json::to_value(JourneyState::start())?;
        let entered = base - Duration::hours(1);
        let first = customers.start;
        let count = customers.end.saturating_sub(customers.start);
        let mut done = 0u64;
        while done < count {
            let size = (count - done).min(u64::from(args.insert_chunk.max(1)));
            let ids: Vec<Uuid> = (0..size).map(|_| Uuid::now_v7()).collect();
            sqlx::query(
                "WITH ins AS ( \
                   INSERT INTO campaigns.journeys (id, workspace_id, flow, flow_version, customer_id, trigger_id, status, \
                   control, state, next_wake_at, trigger_data, entered_at, updated_at) \
                   SELECT u.id, $2, $3, $4, 'c' || lpad(($5::bigint + u.i - 1)::text, 8, '0'), 'bench-' || ($5::bigint + u.i - 1), \
                   1, false, $6::jsonb, $7::timestamptz + make_interval(secs => ($8::bigint + u.i - 1) * $9::float8), \
                   '{}'::jsonb, $10, $10 \
                   FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u(id, i) \
                   RETURNING id, next_wake_at) \
                 INSERT INTO public.bench_due (id, due, phase) SELECT id, next_wake_at, $11 FROM ins WHERE $11 <> ''",
            )
            .bind(&ids)
            .bind(self.workspace())
            .bind(FLOW)
            .bind(version as i32)
            .bind((first + done) as i64)
            .bind(&state)
            .bind(base)
            .bind(done as i64)
            .bind(step_secs)
            .bind(entered)
            .bind(phase.unwrap_or(""))
            .execute(&self.pool)
            .await
            .context("inserting journeys")?;
            done += size;
        }
        Ok(())
    }

    async fn vacuum(&self) -> anyhow::Result<f64> {
        let started = Instant::now();
        sqlx::raw_sql("VACUUM (ANALYZE) campaigns.journeys")
            .execute(&self.pool)
            .await
            .context("VACUUM")?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// `EXPLAIN (ANALYZE, BUFFERS)` of `sql` (rolled back).
    async fn explain(
        &self,
        what: &str,
        sql: &str,
        generic: Option<&str>,
    ) -> anyhow::Result<Explained> {
        let setup: Vec<String> = match generic {
            Some(prepare) => vec![
                "SET LOCAL plan_cache_mode = force_generic_plan".to_owned(),
                prepare.to_owned(),
            ],
            None => Vec::new(),
        };
        let cleanup = if generic.is_some() {
            Some("DEALLOCATE bench_claim")
        } else {
            None
        };
        self.explain_after(what, &setup, sql, cleanup).await
    }

    /// `EXPLAIN (ANALYZE, BUFFERS)` of `sql` after `setup` in the same transaction, all
    /// rolled back (a what-if index is built, used and forgotten).
    async fn explain_after(
        &self,
        what: &str,
        setup: &[String],
        sql: &str,
        cleanup: Option<&str>,
    ) -> anyhow::Result<Explained> {
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql("SET LOCAL lock_timeout = '30s'")
            .execute(&mut *tx)
            .await?;
        for statement in setup {
            sqlx::raw_sql(statement)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("{statement} (for EXPLAIN {what})"))?;
        }
        let rows = sqlx::raw_sql(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"))
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("EXPLAIN {what}"))?;
        if let Some(cleanup) = cleanup {
            sqlx::raw_sql(cleanup).execute(&mut *tx).await?;
        }
        tx.rollback().await?;
        let mut plan = Vec::new();
        let mut execution_ms = 0.0;
        for row in rows {
            let line: String = row.try_get(0)?;
            if let Some(ms) = line.trim().strip_prefix("Execution Time: ") {
                execution_ms = ms.trim_end_matches(" ms").parse().unwrap_or(0.0);
            }
            plan.push(line);
        }
        let explained = Explained {
            what: what.to_owned(),
            execution_ms,
            plan: plan.join("\n"),
        };
        println!("explain {what}: {execution_ms:.1} ms");
        Ok(explained)
    }

    async fn explain_claim(
        &self,
        what: &str,
        now: DateTime<Utc>,
        limit: i64,
        generic: bool,
    ) -> anyhow::Result<Explained> {
        let literal = format!("'{}'::timestamptz", now.to_rfc3339());
        if generic {
            let prepare = format!("PREPARE bench_claim(timestamptz, bigint) AS {CLAIM_SQL}");
            return self
                .explain(
                    what,
                    &format!("EXECUTE bench_claim({literal}, {limit})"),
                    Some(&prepare),
                )
                .await;
        }
        let sql = CLAIM_SQL
            .replace("$1", &literal)
            .replace("$2", &limit.to_string());
        self.explain(what, &sql, None).await
    }

    /// The floor: `workers` loops of claim → the same UPDATE → commit, nothing else.
    async fn raw_drain(
        &self,
        args: &CampaignsArgs,
        now: DateTime<Utc>,
        expected: u64,
    ) -> anyhow::Result<Drain> {
        let done = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(Mutex::new(Vec::<f64>::new()));
        let t0 = Instant::now();
        let ticks = process_ticks();
        self.activity.begin("raw");
        let state = serde_json::to_value(JourneyState::start())?;
        let mut workers = Vec::new();
        for _ in 0..args.workers.max(1) {
            let pool = self.raw_pool.clone();
            let done = done.clone();
            let batches = batches.clone();
            let state = state.clone();
            let limit = args.batch;
            workers.push(tokio::spawn(async move {
                loop {
                    let started = Instant::now();
                    let mut tx = pool.begin().await?;
                    let rows = sqlx::query(CLAIM_SQL)
                        .bind(now)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await?;
                    if rows.is_empty() {
                        tx.commit().await?;
                        return anyhow::Ok(());
                    }
                    let mut ids = Vec::with_capacity(rows.len());
                    for row in &rows {
                        // Read as the engine reads them.
                        let id: Uuid = row.try_get("id")?;
                        let _: String = row.try_get("workspace_id")?;
                        let _: String = row.try_get("customer_id")?;
                        let stored: serde_json::Value = row.try_get("state")?;
                        let _: JourneyState = serde_json::from_value(stored)?;
                        let _: serde_json::Value = row.try_get("trigger_data")?;
                        ids.push(id);
                    }
                    let n = ids.len();
                    let states: Vec<serde_json::Value> = vec![state.clone(); n];
                    sqlx::query(WRITE_SQL)
                        .bind(&ids)
                        .bind(vec![3i16; n])
                        .bind(vec![Some(1i16); n])
                        .bind(&states)
                        .bind(vec![None::<String>; n])
                        .bind(vec![None::<DateTime<Utc>>; n])
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    done.fetch_add(n as u64, Ordering::Relaxed);
                    batches
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }));
        }
        let mut samples = Vec::new();
        let watcher = async {
            loop {
                samples.push((t0.elapsed().as_secs_f64(), done.load(Ordering::Relaxed)));
                if workers.iter().all(|w| w.is_finished()) {
                    break;
                }
                tokio::time::sleep(TICK).await;
            }
        };
        tokio::time::timeout(StdDuration::from_secs(args.timeout_secs), watcher)
            .await
            .ok();
        for worker in workers {
            worker.await??;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cores(&ticks, &process_ticks(), secs);
        let db = self.activity.end();
        let journeys = done.load(Ordering::Relaxed);
        if journeys < expected {
            println!("note: the raw baseline advanced {journeys} of {expected} journeys");
        }
        samples.push((secs, journeys));
        let (median, min) = window_rates(&samples, 0.0, secs);
        let batches = batches.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let batch_hist = percentiles_ms(&batches)?;
        Ok(Drain {
            what: "raw SQL (claim + UPDATE)".into(),
            journeys,
            secs,
            per_sec: journeys as f64 / secs.max(1e-9),
            per_sec_median: median,
            per_sec_min: min,
            batch: BatchStats {
                batches: batches.len() as u64,
                mean_ms: batch_hist.mean,
                p50_ms: batch_hist.p50,
                p99_ms: batch_hist.p99,
                journeys_per_batch: journeys as f64 / batches.len().max(1) as f64,
            },
            published: 0,
            published_secs: None,
            publish_per_sec: None,
            consumed_secs: None,
            wait: None,
            cpu,
            db,
        })
    }

    /// Releases the engine on journeys due at `at` and follows the drain of `expected`.
    async fn engine_drain(
        &self,
        args: &CampaignsArgs,
        at: DateTime<Utc>,
        expected: u64,
    ) -> anyhow::Result<Drain> {
        let before = self.metrics.snapshot();
        let (tapped0, _) = self.tap.counts();
        let ticks = process_ticks();
        self.activity.begin("engine");
        let t0 = Instant::now();
        self.clock.jump_to(at);
        let deadline = t0 + StdDuration::from_secs(args.timeout_secs);
        let mut steps = Vec::new();
        let mut published = Vec::new();
        let mut tapped = Vec::new();
        let mut steps_done = None;
        loop {
            let now = self.metrics.snapshot();
            let t = t0.elapsed().as_secs_f64();
            steps.push((t, now.steps));
            published.push((t, now.published));
            tapped.push((t, self.tap.counts().0));
            if steps_done.is_none() && now.steps.saturating_sub(before.steps) >= expected {
                steps_done = Some(t);
            }
            let all_published = now.published.saturating_sub(before.published) >= expected
                && self.tap.counts().0.saturating_sub(tapped0) >= expected;
            if (steps_done.is_some() && all_published) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        let after = self.metrics.snapshot();
        let end = t0.elapsed().as_secs_f64();
        let cpu = cores(&ticks, &process_ticks(), end);
        let db = self.activity.end();
        let journeys = after.steps.saturating_sub(before.steps).min(expected);
        let secs = steps_done.unwrap_or(end);
        let (median, min) = window_rates(&steps, 0.0, secs);
        let published_secs = reached(&published, before.published, expected);
        let consumed_secs = reached(&tapped, tapped0, expected);
        let waits: Vec<(f64,)> = sqlx::query_as(
            "SELECT extract(epoch FROM v.at - d.due)::float8 * 1000 FROM campaigns.step_visits v \
             JOIN public.bench_due d ON d.id = v.journey_id WHERE d.phase = 'burst'",
        )
        .fetch_all(&self.pool)
        .await?;
        let waits: Vec<f64> = waits.into_iter().map(|(w,)| w).collect();
        Ok(Drain {
            what: "engine (run_batch)".into(),
            journeys,
            secs,
            per_sec: journeys as f64 / secs.max(1e-9),
            per_sec_median: median,
            per_sec_min: min,
            batch: batch_stats(&before, &after, journeys),
            published: after.published.saturating_sub(before.published),
            published_secs,
            publish_per_sec: published_secs.map(|s| expected as f64 / s.max(1e-9)),
            consumed_secs,
            wait: (!waits.is_empty())
                .then(|| percentiles_ms(&waits))
                .transpose()?,
            cpu,
            db,
        })
    }

    /// Journeys falling due at `rate` for `secs`: lateness of each.
    async fn paced(&self, args: &CampaignsArgs, version: u32, first: u64) -> anyhow::Result<Paced> {
        let count = u64::from(args.paced_rate) * u64::from(args.paced_secs);
        // Written an hour ahead of the engine's clock, then the clock is moved to just
        // before the first one.
        let start = self.clock.now() + Duration::hours(1);
        let inserting = Instant::now();
        self.insert(
            args,
            version,
            first..first + count,
            start,
            1.0 / f64::from(args.paced_rate.max(1)),
            Some("paced"),
        )
        .await?;
        // Pending stays at the bench's size: as many not-yet-due journeys as the drain took.
        let filler_base = self.clock.now() + Duration::days(60);
        self.insert(
            args,
            version,
            first + count..first + count + u64::from(args.due),
            filler_base,
            1.0,
            None,
        )
        .await?;
        sqlx::raw_sql("ANALYZE campaigns.journeys")
            .execute(&self.pool)
            .await?;
        println!(
            "paced: {count} journeys due at {}/s and {} more pending written in {:.1}s",
            args.paced_rate,
            args.due,
            inserting.elapsed().as_secs_f64()
        );
        let before = self.metrics.snapshot();
        let ticks = process_ticks();
        self.tap
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.tap.recording.store(true, Ordering::SeqCst);
        self.activity.begin("paced");
        let t0 = Instant::now();
        self.clock.jump_to(start - Duration::seconds(2));
        let window = StdDuration::from_secs(u64::from(args.paced_secs) + 2);
        let deadline = t0 + window + StdDuration::from_secs(args.timeout_secs);
        loop {
            let now = self.metrics.snapshot();
            let tapped = self
                .tap
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64;
            if (now.steps.saturating_sub(before.steps) >= count
                && tapped >= count
                && t0.elapsed() > window)
                || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        self.tap.recording.store(false, Ordering::SeqCst);
        let after = self.metrics.snapshot();
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cores(&ticks, &process_ticks(), secs);
        let db = self.activity.end();
        let advanced = after.steps.saturating_sub(before.steps);

        let rows: Vec<(Uuid, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT d.id, d.due, v.at FROM public.bench_due d \
             LEFT JOIN campaigns.step_visits v ON v.journey_id = d.id WHERE d.phase = 'paced'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut due_of: HashMap<Uuid, DateTime<Utc>> = HashMap::with_capacity(rows.len());
        let mut lateness = Vec::with_capacity(rows.len());
        for (id, due, at) in rows {
            due_of.insert(id, due);
            if let Some(at) = at {
                lateness.push((at - due).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        let records =
            std::mem::take(&mut *self.tap.records.lock().unwrap_or_else(|p| p.into_inner()));
        let mut to_queue = Vec::with_capacity(records.len());
        for (message_id, wall) in records {
            // `{workspace}:{journey id}:{step}#{seq}`
            let Some(id) = message_id
                .split(':')
                .nth(1)
                .and_then(|id| Uuid::parse_str(id).ok())
            else {
                continue;
            };
            if let Some(due) = due_of.get(&id) {
                let at = self.clock.at_wall_ns(wall);
                to_queue.push((at - *due).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        Ok(Paced {
            rate: args.paced_rate,
            secs: args.paced_secs,
            journeys: count,
            advanced,
            lateness: percentiles_ms(&lateness)?,
            to_queue: percentiles_ms(&to_queue)?,
            batch: batch_stats(&before, &after, advanced),
            cpu,
            db,
        })
    }

    async fn broadcast_state(&self) -> anyhow::Result<Option<(i16, i16, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT status, run_state, audience_size, queued FROM campaigns.broadcasts WHERE workspace_id = $1 AND name = $2",
        )
        .bind(self.workspace())
        .bind(BROADCAST)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// ScheduleBroadcast (now) to the whole segment, followed to the last publish.
    async fn broadcast(
        &mut self,
        args: &CampaignsArgs,
        explains: &mut Vec<Explained>,
    ) -> anyhow::Result<BroadcastRun> {
        let audience = u64::from(args.audience);
        let yaml = format!(
            "kind: Broadcast\nname: {BROADCAST}\ndescription: The campaigns benchmark.\nsegment: {SEGMENT}\n\
             channel: in_app\ntemplate: {TEMPLATE}\nschedule: now\n"
        );
        if args.recipients_index {
            let started = Instant::now();
            sqlx::raw_sql(&PROPOSED_INDEX.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
                .execute(&self.pool)
                .await
                .context("the proposed index")?;
            println!(
                "experiment: the proposed index on broadcast_recipients built in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        let before = self.metrics.snapshot();
        let (tapped0, bytes0) = self.tap.counts();
        let ticks = process_ticks();
        self.listed_at.store(0, Ordering::SeqCst);
        self.activity.begin("broadcast");
        let t0 = Instant::now();
        let wall0 = wall_ns();
        let request = self.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Yaml(yaml)),
            dry_run: false,
        });
        self.campaigns
            .schedule_broadcast(request)
            .await
            .context("ScheduleBroadcast")?;
        let schedule_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let deadline = t0 + StdDuration::from_secs(args.broadcast_timeout_secs);
        let mut snapshot_secs = None;
        let mut queued_secs = None;
        let mut published_secs = None;
        let mut consumed_secs = None;
        let mut queued_series = Vec::new();
        let mut published_series = Vec::new();
        let mut recipients = 0u64;
        let mut queued = 0u64;
        let mut explained_start = false;
        let mut explained_midway = false;
        let mut timed_out = false;
        let mut progress: Vec<(f64, u64, u64)> = Vec::new();
        let mut cancel_failures = 0u32;
        loop {
            let t = t0.elapsed().as_secs_f64();
            if let Some((status, run_state, size, q)) = self.broadcast_state().await? {
                if run_state == 1 || status == 3 {
                    recipients = size.max(0) as u64;
                    if snapshot_secs.is_none() {
                        snapshot_secs = Some(t);
                        println!("broadcast: {recipients} recipients written after {t:.1}s");
                        if args.analyze_after_snapshot {
                            let started = Instant::now();
                            sqlx::raw_sql("ANALYZE campaigns.broadcast_recipients")
                                .execute(&self.pool)
                                .await?;
                            println!(
                                "experiment: broadcast_recipients analyzed in {:.1}s",
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                }
                queued = q.max(0) as u64;
                queued_series.push((t, queued));
                if queued_secs.is_none() && queued >= audience {
                    queued_secs = Some(t);
                    println!("broadcast: {queued} send requests in the outbox after {t:.1}s");
                }
            }
            let now = self.metrics.snapshot();
            let published = now.published.saturating_sub(before.published);
            published_series.push((t, published));
            if published_secs.is_none() && published >= audience {
                published_secs = Some(t);
                println!("broadcast: {published} send requests published after {t:.1}s");
            }
            if consumed_secs.is_none() && self.tap.counts().0.saturating_sub(tapped0) >= audience {
                consumed_secs = Some(t);
            }
            // The claims' plans as the run goes: just after the snapshot, then half-way.
            let moment = if !explained_start && snapshot_secs.is_some() && queued < audience / 10 {
                explained_start = true;
                Some("just after the snapshot")
            } else if !explained_midway && queued >= audience / 2 && queued < audience {
                explained_midway = true;
                Some("half the broadcast queued")
            } else {
                None
            };
            if let Some(moment) = moment {
                let label = format!(
                    "{moment}, {} queued",
                    crate::report::thousands(queued as f64)
                );
                match self.explain_recipients_claim(&label).await {
                    Ok(explained) => explains.push(explained),
                    Err(error) => {
                        println!("note: EXPLAIN of the recipients' claim failed: {error:#}")
                    }
                }
                match self.explain_relay_claim(&label).await {
                    Ok(explained) => explains.push(explained),
                    Err(error) => println!("note: EXPLAIN of the relay's claim failed: {error:#}"),
                }
            }
            if progress
                .last()
                .is_none_or(|(at, _, _): &(f64, u64, u64)| t - at >= 10.0)
            {
                progress.push((t, queued, published));
            }
            if published_secs.is_some() && consumed_secs.is_some() && queued_secs.is_some() {
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                println!(
                    "note: the broadcast was not done after {} s: cancelled ({queued} queued, {published} published)",
                    args.broadcast_timeout_secs
                );
                break;
            }
            tokio::time::sleep(StdDuration::from_millis(200)).await;
        }
        let end = t0.elapsed().as_secs_f64();
        let cpu = cores(&ticks, &process_ticks(), end);
        let db = self.activity.end();
        let after = self.metrics.snapshot();
        progress.push((
            end,
            queued,
            after.published.saturating_sub(before.published),
        ));
        // Rate of the last minute, to tell how long the rest would have taken.
        let recent_from = (end - 60.0).max(snapshot_secs.unwrap_or(0.0));
        let (recent_rate, _) = window_rates(&queued_series, recent_from, end);
        let queued_eta_secs = (queued < audience && recent_rate.is_finite() && recent_rate > 0.0)
            .then(|| end + (audience - queued) as f64 / recent_rate);
        if timed_out {
            // Where the time goes, on the rows left: the claim and the recipients' update
            // as the broadcaster runs them, and the claim with the index it lacks.
            for explained in self.explain_broadcast_end(queued).await {
                explains.push(explained);
            }
            // What is left must not run into the bus baseline: drop the pending recipients,
            // let the relay publish what was queued (at most a minute).
            // CancelBroadcast first (as an operator would); it can deadlock with the
            // sender's batch (see the report), so the sender is then stopped the way it
            // checks: a broadcast not SENDING is not sent.
            let request = self.admin(pb::CancelBroadcastRequest {
                name: BROADCAST.into(),
            });
            if let Err(status) = self.campaigns.cancel_broadcast(request).await {
                println!("note: CancelBroadcast failed: {status}");
                cancel_failures += 1;
                sqlx::query(
                    "UPDATE campaigns.broadcasts SET status = 4, next_run_at = NULL, ended_at = now() \
                     WHERE workspace_id = $1 AND name = $2 AND status IN (1, 2)",
                )
                .bind(self.workspace())
                .bind(BROADCAST)
                .execute(&self.pool)
                .await
                .context("stopping the broadcast")?;
                println!("note: the broadcast was stopped with SQL (status 4)");
            }
            let until = Instant::now() + StdDuration::from_secs(60);
            while Instant::now() < until {
                let queued_now = self
                    .broadcast_state()
                    .await?
                    .map(|s| s.3)
                    .unwrap_or(0)
                    .max(0) as u64;
                let published_now = self
                    .metrics
                    .snapshot()
                    .published
                    .saturating_sub(before.published);
                if published_now >= queued_now {
                    break;
                }
                tokio::time::sleep(StdDuration::from_millis(200)).await;
            }
        }
        let (tapped, bytes) = self.tap.counts();
        let consumed = tapped.saturating_sub(tapped0);
        let listed = self.listed_at.load(Ordering::SeqCst);
        let listed_secs = (listed > 0).then(|| (i128::from(listed) - wall0) as f64 / 1e9);
        let from = snapshot_secs.unwrap_or(0.0);
        let (queue_median, _) = window_rates(&queued_series, from, queued_secs.unwrap_or(end));
        let (publish_median, _) =
            window_rates(&published_series, from, published_secs.unwrap_or(end));
        let outbox_left: (i64,) = sqlx::query_as("SELECT count(*) FROM campaigns.outbox")
            .fetch_one(&self.pool)
            .await?;
        Ok(BroadcastRun {
            audience,
            schedule_ms,
            listed_secs,
            snapshot_secs,
            queued_secs,
            published_secs,
            consumed_secs,
            recipients,
            queued,
            published: after.published.saturating_sub(before.published),
            consumed,
            queue_per_sec_median: queue_median,
            publish_per_sec_median: publish_median,
            payload_bytes: (bytes - bytes0) as f64 / consumed.max(1) as f64,
            outbox_left: outbox_left.0,
            timed_out,
            progress,
            queued_eta_secs,
            cancel_failures,
            with_index: args.recipients_index,
            analyzed: args.analyze_after_snapshot,
            cpu,
            db,
        })
    }

    async fn explain_recipients_claim(&self, moment: &str) -> anyhow::Result<Explained> {
        let sql = self.recipients_claim_sql();
        let what = format!(
            "broadcaster's claim of {} due recipients, {moment}",
            crate::report::thousands(self.broadcast_batch as f64)
        );
        self.explain(&what, &sql, None).await
    }

    /// At the end of a broadcast that did not finish: the broadcaster's claim and its
    /// recipients' UPDATE (on 2,000 recipients already queued, rolled back), and the claim
    /// with the index `PROPOSED_INDEX` built in the same transaction.
    async fn explain_broadcast_end(&self, queued: u64) -> Vec<Explained> {
        let mut explains = Vec::new();
        let moment = format!(
            "at the end, {} queued",
            crate::report::thousands(queued as f64)
        );
        match self.explain_recipients_claim(&moment).await {
            Ok(explained) => explains.push(explained),
            Err(error) => println!("note: EXPLAIN of the recipients' claim failed: {error:#}"),
        }
        let batch = crate::report::thousands(self.broadcast_batch as f64);
        let analyze = vec!["ANALYZE campaigns.broadcast_recipients".to_owned()];
        match self.recipients_update_sql().await {
            Ok((sql, n)) => {
                let n = crate::report::thousands(n as f64);
                let runs = [
                    (
                        format!("broadcaster's UPDATE of {n} recipients, {moment}"),
                        Vec::new(),
                    ),
                    (
                        format!(
                            "broadcaster's UPDATE of {n} recipients, {moment}, after ANALYZE (rolled back)"
                        ),
                        analyze.clone(),
                    ),
                ];
                for (what, setup) in runs {
                    match self.explain_after(&what, &setup, &sql, None).await {
                        Ok(explained) => explains.push(explained),
                        Err(error) => println!("note: EXPLAIN failed: {error:#}"),
                    }
                }
            }
            Err(error) => println!("note: no recipients to EXPLAIN the update with: {error:#}"),
        }
        let what = format!(
            "broadcaster's claim of {batch} due recipients, {moment}, after ANALYZE (rolled back)"
        );
        match self
            .explain_after(&what, &analyze, &self.recipients_claim_sql(), None)
            .await
        {
            Ok(explained) => explains.push(explained),
            Err(error) => println!("note: EXPLAIN failed: {error:#}"),
        }
        let what = format!(
            "broadcaster's claim of {} due recipients, {moment}, with the proposed index (built in {{build}}, rolled back)",
            crate::report::thousands(self.broadcast_batch as f64)
        );
        let started = Instant::now();
        let built = async {
            let mut tx = self.pool.begin().await?;
            sqlx::raw_sql("SET LOCAL lock_timeout = '30s'")
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(PROPOSED_INDEX).execute(&mut *tx).await?;
            let build = started.elapsed().as_secs_f64();
            let rows = sqlx::raw_sql(&format!(
                "EXPLAIN (ANALYZE, BUFFERS) {}",
                self.recipients_claim_sql()
            ))
            .fetch_all(&mut *tx)
            .await?;
            tx.rollback().await?;
            anyhow::Ok((build, rows))
        };
        match built.await {
            Ok((build, rows)) => {
                let mut plan = Vec::new();
                let mut execution_ms = 0.0;
                for row in rows {
                    let line: String = row.try_get(0).unwrap_or_default();
                    if let Some(ms) = line.trim().strip_prefix("Execution Time: ") {
                        execution_ms = ms.trim_end_matches(" ms").parse().unwrap_or(0.0);
                    }
                    plan.push(line);
                }
                let what = what.replace("{build}", &format!("{build:.1} s"));
                println!("explain {what}: {execution_ms:.1} ms");
                explains.push(Explained {
                    what,
                    execution_ms,
                    plan: format!("{PROPOSED_INDEX};\n\n{}", plan.join("\n")),
                });
            }
            Err(error) => println!("note: the what-if index failed: {error:#}"),
        }
        explains
    }

    fn recipients_claim_sql(&self) -> String {
        format!(
            "SELECT customer_id, due_at, first_due_at, variant FROM campaigns.broadcast_recipients \
             WHERE workspace_id = '{}' AND broadcast = '{BROADCAST}' AND run = 1 AND state = 0 AND due_at <= '{}'::timestamptz \
             ORDER BY due_at LIMIT {} FOR UPDATE SKIP LOCKED",
            self.workspace(),
            self.clock.now().to_rfc3339(),
            self.broadcast_batch
        )
    }

    /// `store::broadcasts::write_recipients`' UPDATE, on recipients already queued (to be
    /// rolled back), and how many it names.
    async fn recipients_update_sql(&self) -> anyhow::Result<(String, usize)> {
        // The broadcaster writes by the claimed rows' addresses (see store/broadcasts.rs).
        let customers: Vec<(String,)> = sqlx::query_as(
            "SELECT ctid::text FROM campaigns.broadcast_recipients WHERE workspace_id = $1 AND broadcast = $2 \
             AND run = 1 AND state = 1 LIMIT $3",
        )
        .bind(self.workspace())
        .bind(BROADCAST)
        .bind(self.broadcast_batch)
        .fetch_all(&self.pool)
        .await?;
        let list = customers
            .iter()
            .map(|(c,)| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(",");
        let n = customers.len();
        let sql = format!(
            "UPDATE campaigns.broadcast_recipients r SET state = w.state, due_at = w.due \
             FROM UNNEST(ARRAY[{list}]::text[]::tid[], array_fill(1::smallint, ARRAY[{n}]), array_fill(now(), ARRAY[{n}])) AS w(row_id, state, due) \
             WHERE r.ctid = w.row_id"
        );
        Ok((sql, n))
    }

    async fn explain_relay_claim(&self, moment: &str) -> anyhow::Result<Explained> {
        // The relay's DELETE … RETURNING, as a SELECT of the same rows (nothing deleted).
        let sql = "SELECT id, exchange, routing_key, message_id, payload FROM campaigns.outbox \
                   WHERE id IN (SELECT id FROM campaigns.outbox ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED)";
        let what = format!("relay's claim of 1,000 outbox rows, {moment}");
        self.explain(&what, sql, None).await
    }

    /// The bus alone: as many envelopes of the broadcast's shape through a queue of the same
    /// kind, consumed the same way.
    async fn bus_baseline(&self, args: &CampaignsArgs) -> anyhow::Result<BusBaseline> {
        let tap = Arc::new(Tap {
            batch: 256,
            ..Tap::default()
        });
        let mut spec = ConsumerSpec::new(BASELINE_QUEUE).bind(BASELINE_EXCHANGE, "#");
        spec.prefetch = args.prefetch;
        let bus = self.app.platform.bus.clone();
        relance_kit::bus::declare(&bus, &spec).await?;
        let stop = CancellationToken::new();
        let consumer = tokio::spawn(relance_kit::bus::run_consumer(
            bus.clone(),
            spec,
            tap.clone(),
            stop.clone(),
        ));
        let publisher = Publisher::new(bus);
        let total = args.audience;
        let ticks = process_ticks();
        let t0 = Instant::now();
        let mut next = 0u32;
        let mut bytes = 0u64;
        while next < total {
            let end = next
                .saturating_add(args.publish_chunk.max(1) as u32)
                .min(total);
            let mut messages = Vec::with_capacity((end - next) as usize);
            for n in next..end {
                let message = self.broadcast_envelope(n);
                bytes += message.payload.len() as u64;
                messages.push(message);
            }
            publisher
                .publish_all(&messages)
                .await
                .context("publishing the baseline")?;
            next = end;
        }
        let publish_secs = t0.elapsed().as_secs_f64();
        let deadline = Instant::now() + StdDuration::from_secs(args.timeout_secs);
        while tap.counts().0 < u64::from(total) && Instant::now() < deadline {
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
        let consumed_secs = t0.elapsed().as_secs_f64();
        let cpu = cores(&ticks, &process_ticks(), consumed_secs);
        stop.cancel();
        let _ = consumer.await;
        let consumed = tap.counts().0;
        Ok(BusBaseline {
            messages: u64::from(total),
            payload_bytes: bytes as f64 / f64::from(total.max(1)),
            publish_secs,
            publish_per_sec: f64::from(total) / publish_secs.max(1e-9),
            consumed,
            consumed_secs,
            consumed_per_sec: consumed as f64 / consumed_secs.max(1e-9),
            cpu,
        })
    }

    /// A send request as the broadcaster builds it (`broadcaster::broadcast_request`), in
    /// delivery's envelope, to the baseline's exchange.
    fn broadcast_envelope(&self, n: u32) -> Outgoing {
        let customer = audience_id(n);
        let key = format!("b:{BROADCAST}:1:{customer}");
        let request = pb::SendRequest {
            idempotency_key: key.clone(),
            customer: Some(pb::CustomerRef {
                id: Some(customer_ref::Id::CustomerId(customer)),
            }),
            channels: vec![pb::Channel::InApp as i32],
            content: Some(pb::send_request::Content::Template(TEMPLATE.into())),
            topic: "marketing".into(),
            kind: pb::MessageKind::Marketing as i32,
            origin: Some(pb::MessageOrigin {
                broadcast: BROADCAST.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let envelope = Envelope::new(self.workspace(), &request);
        // The relay stores the envelope as JSONB and publishes `serde_json::to_vec` of it.
        let stored = serde_json::to_value(&envelope).unwrap_or_default();
        Outgoing {
            exchange: BASELINE_EXCHANGE.into(),
            routing_key: "in_app".into(),
            message_id: format!("{}:{key}", self.workspace()),
            payload: serde_json::to_vec(&stored).unwrap_or_default(),
            headers: BTreeMap::new(),
        }
    }

    async fn sizes(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.relname::text, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'campaigns' AND c.relkind = 'r' AND c.relname IN \
             ('journeys', 'step_visits', 'sends', 'outbox', 'broadcast_recipients')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, bytes)| (name, (bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0))
            .collect())
    }
}

/// Runs the whole scenario; on Ctrl-C (or `timeout --signal=INT`), stops and removes the
/// bench's database, queues and keys before returning.
pub async fn run(args: &CampaignsArgs) -> anyhow::Result<CampaignsResult> {
    tokio::select! {
        result = run_all(args) => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the bench's database is removed, no result"),
    }
}

async fn run_all(args: &CampaignsArgs) -> anyhow::Result<CampaignsResult> {
    anyhow::ensure!(args.due <= args.pending, "--due must be at most --pending");
    let mut bench = start(args).await?;
    let version = bench.setup().await?;
    println!(
        "services up (workspace {}), flow {FLOW} v{version} applied, quiet hours off",
        bench.workspace()
    );
    let mut setup = SetupSummary {
        flow_version: version,
        ..SetupSummary::default()
    };
    let mut explains = Vec::new();
    let mut raw_baseline = None;
    let mut engine = None;
    let mut paced = None;
    let due = u64::from(args.due);
    let pending = u64::from(args.pending);

    if args.due > 0 {
        // Engine frame: `base` is when the engine's drain starts, a day ahead of the machine's
        // clock while the rows are written. Customers 0..due: the raw baseline's, due 10
        // minutes before; due..2×due: the engine's; then the rest of the pending ones, due 30
        // days later.
        let base = bench.clock.now() + Duration::days(1);
        let raw_at = base - Duration::minutes(10);
        let started = Instant::now();
        let step = 1.0 / due as f64;
        bench
            .insert(
                args,
                version,
                0..due,
                raw_at - Duration::seconds(1),
                step,
                None,
            )
            .await?;
        bench
            .insert(
                args,
                version,
                due..2 * due,
                base - Duration::seconds(1),
                step,
                Some("burst"),
            )
            .await?;
        bench
            .insert(
                args,
                version,
                2 * due..due + pending,
                base + Duration::days(30),
                1.0,
                None,
            )
            .await?;
        setup.journeys_inserted = due + pending;
        setup.insert_secs = started.elapsed().as_secs_f64();
        println!(
            "setup: {} journeys written in {:.1}s",
            setup.journeys_inserted, setup.insert_secs
        );
        setup.vacuum_secs = bench.vacuum().await?;

        let raw = bench.raw_drain(args, raw_at, due).await?;
        println!("{}", raw.line());
        raw_baseline = Some(raw);
        bench.vacuum().await?;

        explains.push(
            bench
                .explain_claim(
                    &format!(
                        "engine's claim, {} pending, {} due (custom plan)",
                        pending, due
                    ),
                    base,
                    args.batch,
                    false,
                )
                .await?,
        );
        explains.push(
            bench
                .explain_claim(
                    &format!(
                        "engine's claim, {} pending, {} due (generic plan)",
                        pending, due
                    ),
                    base,
                    args.batch,
                    true,
                )
                .await?,
        );
        let drained = bench.engine_drain(args, base, due).await?;
        println!("{}", drained.line());
        engine = Some(drained);
        explains.push(
            bench
                .explain_claim(
                    "engine's claim just after the drain, nothing due, before VACUUM",
                    bench.clock.now(),
                    args.batch,
                    false,
                )
                .await?,
        );
        bench.vacuum().await?;

        if args.paced_rate > 0 && args.paced_secs > 0 {
            let run = bench.paced(args, version, due + pending).await?;
            println!(
                "paced {}/s: lateness p50={:.1}ms p99={:.1}ms max={:.1}ms; due → on the queue p50={:.1}ms p99={:.1}ms",
                run.rate,
                run.lateness.p50,
                run.lateness.p99,
                run.lateness.max,
                run.to_queue.p50,
                run.to_queue.p99
            );
            paced = Some(run);
        }
    }

    let mut broadcast = None;
    let mut bus_baseline = None;
    if args.audience > 0 {
        let run = bench.broadcast(args, &mut explains).await?;
        broadcast = Some(run);
    }
    if args.audience > 0 && !args.no_bus_baseline {
        let bus = bench.bus_baseline(args).await?;
        println!(
            "baseline bus alone: {} published in {:.1}s ({:.0}/s), consumed after {:.1}s",
            bus.messages, bus.publish_secs, bus.publish_per_sec, bus.consumed_secs
        );
        bus_baseline = Some(bus);
    }
    let sizes_mb = bench.sizes().await.unwrap_or_default();

    let Bench {
        app, stop, pool, ..
    } = bench;
    stop.cancel();
    pool.close().await;
    app.stop().await;
    Ok(CampaignsResult {
        scenario: "campaigns".into(),
        config: BenchConfig {
            pending: args.pending,
            due: args.due,
            paced_rate: args.paced_rate,
            paced_secs: args.paced_secs,
            audience: args.audience,
            workers: args.workers,
            batch: args.batch,
            poll_ms: args.poll_ms,
            broadcast_batch: args.broadcast_batch,
            db_connections: args.db_connections,
            publish_chunk: args.publish_chunk,
        },
        setup,
        raw_baseline,
        engine,
        paced,
        broadcast,
        bus_baseline,
        explains,
        sizes_mb,
    })
}

// --- The report ---------------------------------------------------------------------------------

fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else if !value.is_finite() {
        "> 10 s".to_owned()
    } else if value >= 1000.0 {
        format!("{:.2} s", value / 1000.0)
    } else {
        format!("{value:.1} ms")
    }
}

fn secs(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.1} s"))
        .unwrap_or_else(|| "not reached".to_owned())
}

fn cpu_cell(cpu: &BTreeMap<String, f64>) -> String {
    let machine = cpu
        .get("machine, all processes")
        .map(|v| format!("all {v:.2} of 2 — "))
        .unwrap_or_default();
    let mut parts: Vec<(&String, &f64)> = cpu
        .iter()
        .filter(|(name, v)| **v >= 0.05 && name.as_str() != "machine, all processes")
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts = parts
        .iter()
        .map(|(name, v)| format!("{} {v:.2}", short_process(name)))
        .collect::<Vec<_>>()
        .join(" · ");
    format!("{machine}{parts}")
}

fn short_process(name: &str) -> &str {
    if name.starts_with("bench process") {
        "bench process"
    } else {
        name
    }
}

/// The `campaigns` section of BENCHMARKS.md from the `campaigns*.json` results in `dir`.
pub fn render(dir: &Path, meta: &[(String, String)]) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_result = path.extension().is_some_and(|ext| ext == "json")
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("campaigns"));
        if is_result {
            paths.push(path);
        }
    }
    paths.sort();
    let Some(path) = paths.last() else {
        anyhow::bail!("no campaigns*.json result in {}", dir.display());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let result: CampaignsResult = serde_json::from_str(text.trim())
        .with_context(|| format!("{} is not a campaigns result", path.display()))?;
    let thousands = crate::report::thousands;
    let c = &result.config;
    let mut md = String::new();
    md.push_str("## Campaigns: due journeys and a 1 M broadcast\n\n");
    md.push_str("_Written by `bash bench/campaigns.sh` (`make bench-campaigns`) from the run below; rerun it rather than editing this section._\n\n");
    if !meta.is_empty() {
        md.push_str("| | |\n|---|---|\n");
        for (key, value) in meta {
            let _ = writeln!(md, "| {key} | {value} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "One process (`relance-loadtest campaigns`, release) runs profiles and campaigns as \
         `relance serve` would, on a fresh database, with a fake Segments server (Get, Count, \
         ListMembers streaming {} customer ids in pages of 5,000) and a fake Delivery server \
         (GetTemplate) named in `services.segmentation` and `services.delivery`; a counting \
         consumer (the platform's, on a quorum queue bound to `relance.delivery` with `#`) \
         stands where delivery's queue would be. Campaigns: workers {}, batch {}, poll_ms {}, \
         broadcast_batch {}, {} Postgres connections per service. Quiet hours off \
         (SetQuietHours), no frequency caps. The flow `{FLOW}` (applied with ApplyFlow) has \
         one step, `send: {{ channel: in_app, template: {TEMPLATE} }}`; its journeys are \
         written with SQL ({} rows in {:.0} s, state `JourneyState::start()`, status 1) and \
         the engine's clock is moved to the moment they fall due.\n",
        thousands(f64::from(c.audience)),
        c.workers,
        c.batch,
        c.poll_ms,
        c.broadcast_batch,
        c.db_connections,
        thousands(result.setup.journeys_inserted as f64),
        result.setup.insert_secs,
    );

    if let Some(engine) = &result.engine {
        let _ = writeln!(
            md,
            "### Due steps with {} pending journeys\n",
            thousands(f64::from(c.pending))
        );
        let _ = writeln!(
            md,
            "{} of the {} pending journeys fall due at once (the rest 30 days later). \
             **steps/s** = journeys advanced ÷ time from due to the last one committed \
             (the engine's `relance_campaigns_steps_total`, read every 100 ms); 1-s windows \
             give the median and slowest second. The raw SQL baseline drains {} other \
             journeys of the same table the same way minus the engine: {} loops of the \
             engine's claim (`… ORDER BY next_wake_at LIMIT {} FOR UPDATE SKIP LOCKED`), \
             the engine's journey UPDATE, commit. Both start on a freshly vacuumed table.\n",
            thousands(f64::from(c.due)),
            thousands(f64::from(c.pending)),
            thousands(f64::from(c.due)),
            c.workers,
            c.batch,
        );
        md.push_str("| run | journeys | time | **steps/s** | 1-s windows: median | slowest | batches | batch mean | batch p50 | batch p99 | CPU (cores) |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for drain in [&result.raw_baseline, &result.engine].into_iter().flatten() {
            let bound = |v: f64, histogram: bool| {
                if histogram && v.is_finite() {
                    format!("≤ {}", ms(v))
                } else {
                    ms(v)
                }
            };
            let histogram = drain.what.starts_with("engine");
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} s | **{}** | {} | {} | {} | {} | {} | {} | {} |",
                drain.what,
                thousands(drain.journeys as f64),
                drain.secs,
                thousands(drain.per_sec),
                rate(drain.per_sec_median),
                rate(drain.per_sec_min),
                thousands(drain.batch.batches as f64),
                ms(drain.batch.mean_ms),
                bound(drain.batch.p50_ms, histogram),
                bound(drain.batch.p99_ms, histogram),
                cpu_cell(&drain.cpu),
            );
        }
        md.push('\n');
        if let (Some(raw), true) = (&result.raw_baseline, engine.per_sec > 0.0) {
            let _ = write!(
                md,
                "The engine runs at **{:.0}% of the raw SQL floor**. ",
                100.0 * engine.per_sec / raw.per_sec.max(1e-9)
            );
        }
        let relay = match (engine.published_secs, engine.publish_per_sec) {
            (Some(secs), Some(rate)) => format!(
                "The relay published the {} send requests (broker-confirmed) {:.1} s after they fell due — **{} publishes/s** over the drain; the counting consumer had them all after {}.",
                thousands(engine.published as f64),
                secs,
                thousands(rate),
                secs_opt(engine.consumed_secs),
            ),
            _ => format!(
                "The relay published {} send requests before the wait ended.",
                thousands(engine.published as f64)
            ),
        };
        md.push_str(&relay);
        if let Some(wait) = &engine.wait {
            let _ = write!(
                md,
                " Each journey's wait in the drain (`step_visits.at` − due): p50 {}, p99 {}, max {}.",
                ms(wait.p50),
                ms(wait.p99),
                ms(wait.max)
            );
        }
        md.push_str("\n\n");
    }

    if let Some(paced) = &result.paced {
        let _ = writeln!(
            md,
            "### Lateness at {} due steps/s\n",
            thousands(f64::from(paced.rate))
        );
        let _ = writeln!(
            md,
            "{} journeys fall due at a steady {}/s for {} s, on top of {} pending not yet due. \
             **Lateness** = `step_visits.at` (the batch's clock read, before its claim) − the \
             journey's due time; **due → on the queue** = the time the counting consumer took \
             the send request from the queue bound to `relance.delivery` − the due time (the \
             whole way: poll, claim, batch, commit, relay, broker).\n",
            thousands(paced.journeys as f64),
            thousands(f64::from(paced.rate)),
            paced.secs,
            thousands(f64::from(c.pending)),
        );
        md.push_str("| measure | n | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|\n");
        for (what, p) in [
            ("**lateness** (step run − due)", &paced.lateness),
            ("due → on the queue", &paced.to_queue),
        ] {
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {} | **{}** | {} | {} |",
                thousands(p.count as f64),
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max)
            );
        }
        let _ = writeln!(
            md,
            "\nBatches: {} (mean {}, {} journeys each on average); CPU (cores): {}.\n",
            thousands(paced.batch.batches as f64),
            ms(paced.batch.mean_ms),
            paced.batch.journeys_per_batch.round(),
            cpu_cell(&paced.cpu),
        );
    }

    if let Some(b) = &result.broadcast {
        let _ = writeln!(
            md,
            "### A broadcast to {} customers{}\n",
            thousands(b.audience as f64),
            match (b.with_index, b.analyzed) {
                (true, true) =>
                    " — experiment: with the proposed index, analyzed after the snapshot",
                (true, false) => " — experiment: with the proposed index on `broadcast_recipients`",
                (false, true) =>
                    " — experiment: `broadcast_recipients` analyzed after the snapshot",
                (false, false) => "",
            }
        );
        let _ = writeln!(
            md,
            "ScheduleBroadcast (`schedule: now`, in-app, no variants, no control group) at 0, \
             then: the fake streamed its last ListMembers page; (a) every recipient written \
             (`broadcasts.run_state` = 1); (b) every send request in the outbox \
             (`broadcasts.queued`); (c) every one published by the relay (broker-confirmed) and \
             counted on the bound queue. Polled every 200 ms.\n"
        );
        md.push_str("| step | time since ScheduleBroadcast |\n|---|---:|\n");
        let _ = writeln!(md, "| ScheduleBroadcast answered | {} |", ms(b.schedule_ms));
        let _ = writeln!(
            md,
            "| ListMembers streamed (fake's last page) | {} |",
            secs_opt(b.listed_secs)
        );
        let _ = writeln!(
            md,
            "| (a) {} recipients written | {} |",
            thousands(b.recipients as f64),
            secs(b.snapshot_secs)
        );
        let _ = writeln!(
            md,
            "| (b) {} send requests in the outbox | **{}** |",
            thousands(b.queued as f64),
            secs(b.queued_secs)
        );
        let _ = writeln!(
            md,
            "| (c) {} published to RabbitMQ | **{}** |",
            thousands(b.published as f64),
            secs(b.published_secs)
        );
        let _ = writeln!(
            md,
            "| (c) {} counted on the bound queue | {} |",
            thousands(b.consumed as f64),
            secs(b.consumed_secs)
        );
        let _ = writeln!(
            md,
            "\nAfter the snapshot: {} queued/s and {} published/s (median of 1-s windows); \
             envelopes of {:.0} bytes; {} rows left in the outbox at the end{}. CPU (cores): {}.\n",
            rate(b.queue_per_sec_median),
            rate(b.publish_per_sec_median),
            b.payload_bytes,
            thousands(b.outbox_left as f64),
            if b.timed_out { " (**timed out**)" } else { "" },
            cpu_cell(&b.cpu),
        );
        if !b.progress.is_empty() {
            let points: Vec<String> = b
                .progress
                .iter()
                .map(|(t, q, p)| {
                    format!(
                        "{t:.0} s: {} / {}",
                        crate::report::thousands(*q as f64),
                        crate::report::thousands(*p as f64)
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "Progress (queued / published since ScheduleBroadcast): {}.\n",
                points.join(" · ")
            );
        }
        if let Some(bus) = &result.bus_baseline {
            md.push_str("| baseline, same run | n | envelope | published in | per second | consumed in | per second | CPU (cores) |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
            let _ = writeln!(
                md,
                "| bus alone: the kit's `Publisher`, `publish_all` in chunks of {}, to a quorum queue of its own consumed the same way | {} | {:.0} B | {:.1} s | {} | {:.1} s | {} | {} |",
                c.publish_chunk,
                thousands(bus.messages as f64),
                bus.payload_bytes,
                bus.publish_secs,
                thousands(bus.publish_per_sec),
                bus.consumed_secs,
                thousands(bus.consumed_per_sec),
                cpu_cell(&bus.cpu),
            );
            md.push('\n');
        }
        if b.cancel_failures > 0 {
            let _ = writeln!(
                md,
                "CancelBroadcast, called at the timeout to stop the rest, was refused {} time(s) with INTERNAL (Postgres: `deadlock detected`) while the broadcaster was sending.\n",
                b.cancel_failures
            );
        }
        let verdict = match b.published_secs {
            Some(s) if s < 300.0 => "meets",
            _ => "misses",
        };
        if b.timed_out {
            let eta = b
                .queued_eta_secs
                .map(|eta| {
                    format!(
                        "; at the last minute's rate, all would have been queued after ≈ {:.1} min",
                        eta / 60.0
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "**Broadcast to {}: not done when the bench stopped it after {:.0} s — {} of {} send requests queued and {} published{eta} — {verdict} the < 5 min aim.**\n",
                thousands(b.audience as f64),
                b.progress.last().map(|p| p.0).unwrap_or(0.0),
                thousands(b.queued as f64),
                thousands(b.audience as f64),
                thousands(b.published as f64),
            );
        } else {
            let _ = writeln!(
                md,
                "**Broadcast to {}: all send requests queued after {}, all published after {} — {verdict} the < 5 min aim.**\n",
                thousands(b.audience as f64),
                secs(b.queued_secs),
                secs(b.published_secs),
            );
        }
    }

    if let (Some(engine), Some(paced)) = (&result.engine, &result.paced) {
        let steps = if engine.per_sec >= 5000.0 {
            "meets"
        } else {
            "misses"
        };
        let late = if paced.lateness.p99 < 1000.0 {
            "meets"
        } else {
            "misses"
        };
        let _ = writeln!(
            md,
            "**Due steps: {} steps/s with {} pending ({steps} the ≥ 5,000/s aim); lateness p99 {} at {}/s ({late} the < 1 s aim).**\n",
            thousands(engine.per_sec),
            thousands(f64::from(c.pending)),
            ms(paced.lateness.p99),
            thousands(f64::from(paced.rate)),
        );
    }

    let phases: Vec<(&str, &DbActivity)> = [
        (
            "raw SQL baseline",
            result.raw_baseline.as_ref().map(|d| &d.db),
        ),
        ("engine drain", result.engine.as_ref().map(|d| &d.db)),
        ("paced", result.paced.as_ref().map(|p| &p.db)),
        ("broadcast", result.broadcast.as_ref().map(|b| &b.db)),
    ]
    .into_iter()
    .filter_map(|(name, db)| db.filter(|db| db.samples > 0).map(|db| (name, db)))
    .collect();
    if !phases.is_empty() {
        md.push_str("### Where Postgres time goes\n\n");
        md.push_str(
            "`pg_stat_activity` of the services' connections sampled every 50 ms: the average number \
             of backends in each state (a backend \"idle in transaction\" is waiting for the service \
             between two statements of an open transaction; the statement named is its last).\n\n",
        );
        for (name, db) in phases {
            let _ = writeln!(
                md,
                "<details><summary>{name} ({} samples)</summary>\n",
                db.samples
            );
            md.push_str("| backends | state: statement |\n|---:|---|\n");
            for (what, avg) in db.top.iter().take(8) {
                let _ = writeln!(md, "| {avg:.2} | `{}` |", what.replace('|', "\\|"));
            }
            md.push_str("\n</details>\n\n");
        }
    }
    if !result.explains.is_empty() {
        md.push_str(
            "### Claim queries at a million rows\n\n| query, moment | execution |\n|---|---:|\n",
        );
        for explain in &result.explains {
            let _ = writeln!(md, "| {} | {} |", explain.what, ms(explain.execution_ms));
        }
        md.push('\n');
        for explain in &result.explains {
            let _ = writeln!(
                md,
                "<details><summary>{}</summary>\n\n```\n{}\n```\n\n</details>\n",
                explain.what, explain.plan
            );
        }
    }
    if !result.sizes_mb.is_empty() {
        let sizes: Vec<String> = result
            .sizes_mb
            .iter()
            .map(|(name, mb)| format!("`{name}` {mb:.0} MB"))
            .collect();
        let _ = writeln!(
            md,
            "Table sizes at the end (with indexes): {}.\n",
            sizes.join(", ")
        );
    }
    Ok(md)
}

fn rate(value: f64) -> String {
    if value.is_finite() {
        crate::report::thousands(value)
    } else {
        "–".to_owned()
    }
}

fn secs_opt(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.1} s"))
        .unwrap_or_else(|| "–".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_one_second_windows() {
        let samples = vec![
            (0.0, 0),
            (0.5, 50),
            (1.0, 100),
            (1.5, 200),
            (2.0, 300),
            (2.5, 310),
        ];
        let (median, min) = window_rates(&samples, 0.0, 2.5);
        assert_eq!(min, 100.0);
        assert_eq!(median, 150.0);
    }

    #[test]
    fn reached_finds_the_first_sample_over_the_target() {
        let samples = vec![(0.0, 10), (0.1, 50), (0.2, 110)];
        assert_eq!(reached(&samples, 10, 100), Some(0.2));
        assert_eq!(reached(&samples, 10, 1000), None);
    }

    #[test]
    fn batch_quantiles_from_buckets() {
        let before = Snapshot::default();
        let after = Snapshot {
            batch_buckets: vec![(0.05, 10), (0.1, 90), (0.25, 100), (f64::INFINITY, 100)],
            batch_sum: 7.0,
            batch_count: 100,
            ..Snapshot::default()
        };
        let stats = batch_stats(&before, &after, 50_000);
        assert_eq!(stats.batches, 100);
        assert_eq!(stats.p50_ms, 100.0);
        assert_eq!(stats.p99_ms, 250.0);
        assert!((stats.mean_ms - 70.0).abs() < 1e-9);
        assert_eq!(stats.journeys_per_batch, 500.0);
    }
}
