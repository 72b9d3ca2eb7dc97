//! `make chaos`: the whole platform under load while its parts fail, one after the other.
//!
//! Six `relance serve <service>` processes (the release binary, as in production: one role
//! per process) on a database, RabbitMQ prefix and Redis prefix of their own, with the fake
//! push provider. Load runs the whole time: customers sign up (profile, push opt-in, a
//! `signed_up` event) at `--signups-per-sec`, and shop events arrive at `--events-per-sec`.
//! A flow triggered by the event sends each new customer two pushes, `--wait-secs` apart;
//! a second flow, triggered when the customer enters a real-time segment of the signed-up,
//! sends a third (so the path Track → segment change → journey step → delivery is checked
//! too). Then, with `--settle-secs` of load between faults:
//!
//! 1. each service in turn is killed with SIGKILL and started again;
//! 2. RabbitMQ is stopped and started (durable queues, persistent messages);
//! 3. Redis is stopped and started with its data gone (it keeps no snapshot);
//! 4. PostgreSQL is restarted (fast shutdown: open connections are cut).
//!
//! For each fault the time to recover is measured: until all six services answer their
//! health check and a recommendation is served, and until a customer who signs up right
//! after the fault gets the first push of each flow (end to end). Afterwards, with the load
//! stopped and the flows drained: every acknowledged event is in the event log, every
//! acknowledged sign-up got all three pushes, and the provider received each (customer, push)
//! once. Calls that failed during a fault are
//! retried with the same message ids, as a client would: what was never acknowledged may be
//! retried, what was acknowledged must never be lost.
//!
//! Only for a machine of its own: it restarts the machine's RabbitMQ, Redis and PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use relance_delivery::fake::FakeProviders;
use relance_kit::auth::BearerKey;
use relance_proto::convert::json_to_struct;
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::segments_client::SegmentsClient;
use relance_proto::v1::{self as pb, customer_ref};
use serde::Serialize;
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The services, in the order they are killed.
const SERVICES: [&str; 6] = [
    "events",
    "profiles",
    "segmentation",
    "recommendations",
    "campaigns",
    "delivery",
];

const INTERNAL_KEY: &str = "chaos-internal-key";
/// The pushes each signed-up customer gets: two from the event-triggered flow, one from the
/// segment-triggered flow.
const PUSHES: [&str; 3] = ["welcome-1", "welcome-2", "member-1"];
/// The first push of each flow: a new sign-up has them both once the platform works.
const FIRST_PUSHES: [&str; 2] = ["welcome-1", "member-1"];
const FCM_PATH: &str = "/v1/projects/chaos/messages:send";

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The `relance` binary to run (a release build).
    #[arg(long, default_value = "target/release/relance")]
    pub relance: PathBuf,
    /// The PostgreSQL server (a database of the run's own is created there).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
    /// New customers per second (each: profile, push opt-in, `signed_up`).
    #[arg(long, default_value_t = 10)]
    pub signups_per_sec: u32,
    /// Shop events per second (product views and orders of existing customers).
    #[arg(long, default_value_t = 100)]
    pub events_per_sec: u32,
    /// Seconds between the flow's two pushes.
    #[arg(long, default_value_t = 20)]
    pub wait_secs: u32,
    /// Seconds of load before the first fault and between faults.
    #[arg(long, default_value_t = 20)]
    pub settle_secs: u64,
    /// Most seconds to wait for the platform to recover from one fault.
    #[arg(long, default_value_t = 180)]
    pub recover_secs: u64,
    /// Kill the services only; leave RabbitMQ, Redis and PostgreSQL alone.
    #[arg(long)]
    pub services_only: bool,
    /// Where the processes' logs and the result go.
    #[arg(long, default_value = "target/chaos")]
    pub out: PathBuf,
    /// Write the report into this file's `<!-- chaos:begin -->` section (BENCHMARKS.md).
    #[arg(long)]
    pub benchmarks: Option<PathBuf>,
    /// Keep the run's database afterwards (to look into it).
    #[arg(long)]
    pub keep: bool,
}

/// One fault and how long the platform took to recover from it.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub fault: String,
    /// Seconds from the fault until every service answered its health check as serving and a
    /// recommendation was served (a killed service is started again at once).
    pub serving_secs: Option<f64>,
    /// Seconds from the fault until a customer who signed up after it got the first push of
    /// both flows (the event-triggered and the segment-triggered one).
    pub end_to_end_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosResult {
    /// When the run started (UTC) and the load it ran under.
    pub started_at: String,
    pub signups_per_sec: u32,
    pub events_per_sec: u32,
    pub settle_secs: u64,
    pub recoveries: Vec<Recovery>,
    pub run_secs: f64,
    pub events_acknowledged: u64,
    pub events_stored: u64,
    pub events_lost: u64,
    /// Calls that failed during faults and were retried (same message id).
    pub calls_retried: u64,
    pub signups_acknowledged: u64,
    pub pushes_expected: u64,
    pub pushes_received: u64,
    pub pushes_missing: u64,
    /// (customer, push) pairs the provider received more than once.
    pub pushes_duplicated: u64,
}

impl ChaosResult {
    pub fn line(&self) -> String {
        format!(
            "chaos: {} faults in {:.0} s; events acknowledged {}, lost {}; sign-ups {}, pushes expected {}, missing {}, duplicated {}",
            self.recoveries.len(),
            self.run_secs,
            self.events_acknowledged,
            self.events_lost,
            self.signups_acknowledged,
            self.pushes_expected,
            self.pushes_missing,
            self.pushes_duplicated,
        )
    }

    /// Zero loss and zero duplicates, and every fault recovered from.
    pub fn passed(&self) -> bool {
        self.events_lost == 0
            && self.pushes_missing == 0
            && self.pushes_duplicated == 0
            && self
                .recoveries
                .iter()
                .all(|r| r.serving_secs.is_some() && r.end_to_end_secs.is_some())
    }
}

type Events = EventsClient<InterceptedService<Channel, BearerKey>>;
type Profiles = ProfilesClient<InterceptedService<Channel, BearerKey>>;
type Recommendations = RecommendationsClient<InterceptedService<Channel, BearerKey>>;

/// The running platform: one child process per service, always on the same ports.
struct Platform {
    relance: PathBuf,
    env: Vec<(String, String)>,
    ports: BTreeMap<&'static str, (u16, u16)>,
    children: BTreeMap<&'static str, Child>,
    logs: PathBuf,
}

impl Platform {
    async fn start(&mut self, service: &'static str) -> anyhow::Result<()> {
        let (grpc, admin) = self.ports[service];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{service}.log")))
            .context("opening the service's log")?;
        let log_err = log.try_clone().context("opening the service's log")?;
        let child = Command::new(&self.relance)
            .args(["serve", service])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RELANCE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("RELANCE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting relance serve {service}"))?;
        self.children.insert(service, child);
        Ok(())
    }

    async fn kill(&mut self, service: &'static str) -> anyhow::Result<()> {
        if let Some(mut child) = self.children.remove(service) {
            child.start_kill().context("SIGKILL")?;
            child.wait().await.context("reaping the killed process")?;
        }
        Ok(())
    }

    /// Waits until `service` answers its gRPC health check as SERVING.
    async fn serving(&self, service: &'static str, patience: Duration) -> Option<Instant> {
        let (grpc, _) = self.ports[service];
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if health_serving(grpc).await {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Waits until every service answers its health check as SERVING and `recommendations`
    /// serves a recommendation (its hot path reads Redis and its model).
    async fn all_serving(
        &self,
        recommendations: &Recommendations,
        patience: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + patience;
        for service in SERVICES {
            self.serving(service, deadline.saturating_duration_since(Instant::now()))
                .await?;
        }
        while Instant::now() < deadline {
            let mut client = recommendations.clone();
            let answer = client
                .recommend(pb::RecommendRequest {
                    customer: customer("u0"),
                    placement: pb::Placement::Home as i32,
                    ..Default::default()
                })
                .await;
            if answer.is_ok() {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn stop_all(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

async fn health_serving(port: u16) -> bool {
    let Ok(endpoint) = Endpoint::from_shared(format!("http://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    match client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(answer) => {
            answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }
        Err(_) => false,
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run_command(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .await
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {}: {status}", args.join(" "));
    }
    Ok(())
}

/// The machine's infrastructure, restarted the way `machines/rust-svc.md` starts it.
async fn restart_rabbitmq() -> anyhow::Result<()> {
    run_command("rabbitmqctl", &["stop"]).await?;
    run_command("rabbitmq-server", &["-detached"]).await?;
    // `-detached` returns before the node has registered itself, and `await_startup` fails at
    // once for a node it cannot reach: ask again until it answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("running rabbitmqctl")?;
        if ready.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("RabbitMQ did not start within 120 s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn restart_redis_empty() -> anyhow::Result<()> {
    // `nosave`: the restarted server starts empty, as after losing its machine.
    run_command("redis-cli", &["shutdown", "nosave"]).await?;
    run_command(
        "redis-server",
        &[
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
    )
    .await
}

async fn restart_postgres() -> anyhow::Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")
        .context("/etc/postgresql")?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .context("no PostgreSQL cluster under /etc/postgresql")?;
    run_command(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ],
    )
    .await
}

/// What the load generators have had acknowledged.
#[derive(Debug, Default)]
struct Ledger {
    events: Mutex<Vec<String>>,
    /// Sign-ups acknowledged: customer id → when.
    signups: Mutex<Vec<(String, Instant)>>,
    retried: AtomicU64,
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.to_owned())),
    })
}

/// Calls `call` until it succeeds or `stop` is set, counting the retries; a fault makes
/// calls fail for a while, and a client retries with the same message id.
async fn until_ok<T, F, Fut>(ledger: &Ledger, stop: &AtomicBool, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(answer) => return Some(answer),
            Err(_) if stop.load(Ordering::Relaxed) => return None,
            Err(_) => {
                ledger.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Signs up one customer: profile with a push token, push opt-in, then the `signed_up`
/// event that starts the flow. Acknowledged once the event is.
async fn sign_up(
    profiles: &mut Profiles,
    events: &mut Events,
    ledger: &Ledger,
    stop: &AtomicBool,
    id: &str,
) -> bool {
    let upsert = pb::UpsertProfileRequest {
        customer: customer(id),
        attributes: Some(json_to_struct(&serde_json::json!({ "first_name": id }))),
        push_tokens: vec![pb::PushToken {
            token: format!("tok-{id}"),
            platform: pb::PushPlatform::Android as i32,
            app_id: "com.shop.app".into(),
            updated_at: None,
        }],
        ..Default::default()
    };
    if until_ok(ledger, stop, || {
        let mut profiles = profiles.clone();
        let upsert = upsert.clone();
        async move { profiles.upsert(upsert).await }
    })
    .await
    .is_none()
    {
        return false;
    }
    let consent = pb::SetConsentRequest {
        customer: customer(id),
        consent: Some(pb::Consent {
            channel: pb::Channel::Push as i32,
            topic: String::new(),
            status: pb::ConsentStatus::OptedIn as i32,
            updated_at: None,
            source: "signup_form".into(),
        }),
    };
    if until_ok(ledger, stop, || {
        let mut profiles = profiles.clone();
        let consent = consent.clone();
        async move { profiles.set_consent(consent).await }
    })
    .await
    .is_none()
    {
        return false;
    }
    let track = pb::TrackRequest {
        event: Some(pb::Event {
            message_id: format!("signup-{id}"),
            name: "signed_up".into(),
            customer_id: id.to_owned(),
            ..Default::default()
        }),
    };
    let acked = until_ok(ledger, stop, || {
        let mut events = events.clone();
        let track = track.clone();
        async move { events.track(track).await }
    })
    .await
    .is_some();
    if acked {
        ledger
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("signup-{id}"));
        ledger
            .signups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id.to_owned(), Instant::now()));
    }
    acked
}

/// Sign-ups at a fixed rate until `stop`; ids `u0`, `u1`, …
async fn signups(
    mut profiles: Profiles,
    mut events: Events,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    per_sec: u32,
    next: Arc<AtomicU64>,
) {
    let period = Duration::from_secs_f64(1.0 / per_sec.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let id = format!("u{}", next.fetch_add(1, Ordering::Relaxed));
        sign_up(&mut profiles, &mut events, &ledger, &stop, &id).await;
    }
}

/// Shop events of already signed-up customers at a fixed rate, in batches of ten.
async fn shop_events(
    events: Events,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    per_sec: u32,
    signed_up: Arc<AtomicU64>,
) {
    let batch = 10u32;
    let period = Duration::from_secs_f64(batch as f64 / per_sec.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let customers = signed_up.load(Ordering::Relaxed).max(1);
        let mut batch_events = Vec::with_capacity(batch as usize);
        for _ in 0..batch {
            sequence += 1;
            let who = format!("u{}", sequence % customers);
            // One order in ten views, as in a storefront's funnel.
            let (name, properties) = if sequence.is_multiple_of(10) {
                (
                    "order_completed",
                    serde_json::json!({ "order_id": format!("o{sequence}"), "revenue": 25.0, "currency": "GBP" }),
                )
            } else {
                (
                    "product_viewed",
                    serde_json::json!({ "product_id": format!("p{}", sequence % 500) }),
                )
            };
            batch_events.push(pb::Event {
                message_id: format!("shop-{sequence}"),
                name: name.into(),
                customer_id: who,
                properties: Some(json_to_struct(&properties)),
                ..Default::default()
            });
        }
        let ids: Vec<String> = batch_events.iter().map(|e| e.message_id.clone()).collect();
        let request = pb::TrackBatchRequest {
            events: batch_events,
        };
        let answer = until_ok(&ledger, &stop, || {
            let mut events = events.clone();
            let request = request.clone();
            async move { events.track_batch(request).await }
        })
        .await;
        if let Some(answer) = answer {
            // Every event of an answered batch is stored (accepted or a duplicate of a stored
            // one), unless refused: none is, they are valid.
            if answer.get_ref().rejected.is_empty() {
                ledger
                    .events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ids);
            }
        }
    }
}

/// The pushes the fake provider received: (token, title) → how many times.
fn received(fake: &FakeProviders) -> HashMap<(String, String), u64> {
    let mut counts = HashMap::new();
    for request in fake.requests_for(FCM_PATH) {
        let body = request.json();
        let message = &body["message"];
        let token = message["token"].as_str().unwrap_or_default().to_owned();
        let title = message["notification"]["title"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *counts.entry((token, title)).or_insert(0) += 1;
    }
    counts
}

/// Waits until the first push of each flow reached the provider for customer `id`; the
/// seconds since `from`.
async fn first_pushes_of(
    fake: &FakeProviders,
    id: &str,
    from: Instant,
    patience: Duration,
) -> Option<f64> {
    let keys: Vec<(String, String)> = FIRST_PUSHES
        .iter()
        .map(|push| (format!("tok-{id}"), (*push).to_owned()))
        .collect();
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let got = received(fake);
        if keys.iter().all(|key| got.contains_key(key)) {
            return Some(from.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

pub async fn run(args: &ChaosArgs) -> anyhow::Result<ChaosResult> {
    if !args.relance.exists() {
        bail!(
            "--relance {}: not found (build it with cargo build --release -p relance)",
            args.relance.display()
        );
    }
    crate::client::ensure_loopback("--postgres", host_of(&args.postgres))?;
    let run_id = format!(
        "{}",
        relance_kit::Clock::now(&relance_kit::SystemClock).format("%Y%m%d%H%M%S")
    );
    let database = format!("relance_chaos_{run_id}");
    let logs = args.out.join(&run_id);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    {
        use sqlx::Connection as _;
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", args.postgres)).await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await?;
    }
    let database_url = format!("{}/{database}", args.postgres);
    let fake = FakeProviders::start().await?;
    let config = logs.join("relance.toml");
    let mut ports = BTreeMap::new();
    for service in SERVICES {
        ports.insert(service, (free_port()?, free_port()?));
    }
    let address = |service: &str| format!("http://127.0.0.1:{}", ports[service].0);
    std::fs::write(
        &config,
        format!(
            r#"
[campaigns]
poll_ms = 100

[delivery]
http_addr = "127.0.0.1:{http}"
sweep_every_secs = 2
sweep_grace_secs = 2
lease_secs = 10

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "chaos"
access_token = "chaos-token"
"#,
            http = free_port()?,
            base = fake.base_url(),
        ),
    )?;
    let env: Vec<(String, String)> = vec![
        ("RELANCE_CONFIG".into(), config.display().to_string()),
        ("RELANCE_DATABASE_URL".into(), database_url.clone()),
        ("RELANCE_DATABASE_MAX_CONNECTIONS".into(), "6".into()),
        ("RELANCE_AMQP_PREFIX".into(), format!("chaos{run_id}")),
        // Queues are durable and survive the broker's restart; they expire a minute after the
        // run's last consumer is gone, so nothing is left behind.
        ("RELANCE_AMQP_EPHEMERAL".into(), "true".into()),
        ("RELANCE_REDIS_PREFIX".into(), format!("chaos{run_id}:")),
        ("RELANCE_INTERNAL_KEY".into(), INTERNAL_KEY.into()),
        ("RELANCE_MIGRATE_ON_START".into(), "false".into()),
        ("RELANCE_LOG_LEVEL".into(), "warn".into()),
        ("RELANCE_SERVICES__PROFILES".into(), address("profiles")),
        ("RELANCE_SERVICES__EVENTS".into(), address("events")),
        (
            "RELANCE_SERVICES__SEGMENTATION".into(),
            address("segmentation"),
        ),
        (
            "RELANCE_SERVICES__RECOMMENDATIONS".into(),
            address("recommendations"),
        ),
        ("RELANCE_SERVICES__DELIVERY".into(), address("delivery")),
        ("RELANCE_SERVICES__CAMPAIGNS".into(), address("campaigns")),
    ];
    // Migrations once, as the chart's Job does; then an admin key, as an SRE would make it.
    let migrate = Command::new(&args.relance)
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await?;
    if !migrate.status.success() {
        bail!(
            "relance migrate: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    let key_out = Command::new(&args.relance)
        .args(["key", "create", "--workspace", "chaos", "--scope", "admin"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await?;
    if !key_out.status.success() {
        bail!(
            "relance key create: {}",
            String::from_utf8_lossy(&key_out.stderr)
        );
    }
    let api_key = String::from_utf8_lossy(&key_out.stdout).trim().to_owned();

    let mut platform = Platform {
        relance: args.relance.clone(),
        env,
        ports: ports.clone(),
        children: BTreeMap::new(),
        logs: logs.clone(),
    };
    for service in SERVICES {
        platform.start(service).await?;
    }
    for service in SERVICES {
        if platform
            .serving(service, Duration::from_secs(args.recover_secs))
            .await
            .is_none()
        {
            platform.stop_all().await;
            bail!("{service} did not start; see {}", logs.display());
        }
    }
    let outcome = drive(args, &mut platform, &fake, &api_key, &database_url).await;
    platform.stop_all().await;
    clean_up(args, &database, &run_id).await;
    outcome
}

/// Drops the run's database and Redis keys (its queues expire by themselves).
async fn clean_up(args: &ChaosArgs, database: &str, run_id: &str) {
    if args.keep {
        return;
    }
    use sqlx::Connection as _;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&format!("{}/postgres", args.postgres)).await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
    let pattern = format!("chaos{run_id}:*");
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!("redis-cli --scan --pattern '{pattern}' | xargs -r redis-cli del >/dev/null"),
        ])
        .status()
        .await;
}

fn host_of(url: &str) -> &str {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split([':', '/']).next().unwrap_or(rest)
}

async fn clients(
    ports: &BTreeMap<&'static str, (u16, u16)>,
    api_key: &str,
) -> anyhow::Result<(
    Events,
    Profiles,
    CampaignsClient<InterceptedService<Channel, BearerKey>>,
    DeliveryClient<InterceptedService<Channel, BearerKey>>,
    SegmentsClient<InterceptedService<Channel, BearerKey>>,
    Recommendations,
)> {
    let key = BearerKey::new(api_key)
        .map_err(|_| anyhow::anyhow!("the created key is not a valid header"))?;
    // Lazy channels reconnect by themselves after a service restarts.
    let channel = |service: &str| -> anyhow::Result<Channel> {
        Ok(
            Endpoint::from_shared(format!("http://127.0.0.1:{}", ports[service].0))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(10))
                .connect_lazy(),
        )
    };
    Ok((
        EventsClient::with_interceptor(channel("events")?, key.clone()),
        ProfilesClient::with_interceptor(channel("profiles")?, key.clone()),
        CampaignsClient::with_interceptor(channel("campaigns")?, key.clone()),
        DeliveryClient::with_interceptor(channel("delivery")?, key.clone()),
        SegmentsClient::with_interceptor(channel("segmentation")?, key.clone()),
        RecommendationsClient::with_interceptor(channel("recommendations")?, key),
    ))
}

async fn drive(
    args: &ChaosArgs,
    platform: &mut Platform,
    fake: &FakeProviders,
    api_key: &str,
    database_url: &str,
) -> anyhow::Result<ChaosResult> {
    let started = Instant::now();
    let started_at = relance_kit::Clock::now(&relance_kit::SystemClock);
    let (events, profiles, mut campaigns, mut delivery, mut segments, recommendations) =
        clients(&platform.ports, api_key).await?;
    for name in PUSHES {
        let template = pb::Template {
            name: name.into(),
            default_locale: "en".into(),
            variants: vec![pb::TemplateVariant {
                locale: "en".into(),
                content: Some(pb::MessageContent {
                    push: Some(pb::PushContent {
                        title: name.into(),
                        body: "Welcome to the shop".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        delivery
            .upsert_template(pb::UpsertTemplateRequest {
                template: Some(template),
                dry_run: false,
            })
            .await
            .context("saving a template")?;
    }
    // The run goes on at any hour: quiet hours would hold every push until morning.
    campaigns
        .set_quiet_hours(pb::SetQuietHoursRequest {
            quiet_hours: Some(pb::QuietHours {
                enabled: false,
                start: "22:00".into(),
                end: "08:00".into(),
                ..Default::default()
            }),
        })
        .await
        .context("turning quiet hours off")?;
    campaigns
        .apply_flow(pb::ApplyFlowRequest {
            yaml: format!(
                "kind: Flow\nname: chaos-welcome\ntrigger: {{ event: signed_up }}\nsteps:\n  \
                 - send: {{ channel: push, template: welcome-1 }}\n  - wait: {}s\n  \
                 - send: {{ channel: push, template: welcome-2 }}\n",
                args.wait_secs
            ),
            dry_run: false,
        })
        .await
        .context("applying the flow")?;
    segments
        .apply(pb::ApplySegmentRequest {
            yaml: "kind: Segment\nname: chaos-signed-up\nwhere:\n  event: signed_up\n".into(),
            dry_run: false,
        })
        .await
        .context("applying the segment")?;
    campaigns
        .apply_flow(pb::ApplyFlowRequest {
            yaml: "kind: Flow\nname: chaos-member\ntrigger: { segment_entered: chaos-signed-up }\n\
                   steps:\n  - send: { channel: push, template: member-1 }\n"
                .into(),
            dry_run: false,
        })
        .await
        .context("applying the segment's flow")?;

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    // Two sign-up workers share the rate, so one stuck on a failing call does not stop both.
    for _ in 0..2 {
        load.push(tokio::spawn(signups(
            profiles.clone(),
            events.clone(),
            ledger.clone(),
            stop.clone(),
            (args.signups_per_sec / 2).max(1),
            next.clone(),
        )));
    }
    load.push(tokio::spawn(shop_events(
        events.clone(),
        ledger.clone(),
        stop.clone(),
        args.events_per_sec,
        next.clone(),
    )));

    let settle = Duration::from_secs(args.settle_secs);
    let patience = Duration::from_secs(args.recover_secs);
    tokio::time::sleep(settle).await;
    let mut faults: Vec<String> = SERVICES.iter().map(|s| format!("kill -9 {s}")).collect();
    if !args.services_only {
        faults.push("restart RabbitMQ".into());
        faults.push("restart Redis, data gone".into());
        faults.push("restart PostgreSQL".into());
    }
    let mut recoveries = Vec::new();
    let mut canary_profiles = profiles.clone();
    let mut canary_events = events.clone();
    for (index, fault) in faults.iter().enumerate() {
        println!("chaos: {fault}");
        let at = Instant::now();
        if let Some(service) = fault.strip_prefix("kill -9 ") {
            let service = SERVICES
                .iter()
                .copied()
                .find(|s| *s == service)
                .context("unknown service")?;
            platform.kill(service).await?;
            platform.start(service).await?;
        } else if fault.contains("RabbitMQ") {
            restart_rabbitmq().await?;
        } else if fault.contains("Redis") {
            restart_redis_empty().await?;
        } else {
            restart_postgres().await?;
        }
        let serving_secs = platform
            .all_serving(&recommendations, patience)
            .await
            .map(|when| (when - at).as_secs_f64());
        // End to end: a customer who signs up now gets the first push.
        let canary = format!("canary{index}");
        let signed = sign_up(
            &mut canary_profiles,
            &mut canary_events,
            &ledger,
            &stop,
            &canary,
        )
        .await;
        let end_to_end_secs = if signed {
            first_pushes_of(fake, &canary, at, patience).await
        } else {
            None
        };
        println!(
            "chaos: {fault}: serving after {}, end to end after {}",
            secs(serving_secs),
            secs(end_to_end_secs)
        );
        recoveries.push(Recovery {
            fault: fault.clone(),
            serving_secs,
            end_to_end_secs,
        });
        tokio::time::sleep(settle).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }

    // Drain: every acknowledged sign-up's second push is due `wait_secs` after its first.
    let signups: Vec<(String, Instant)> = ledger
        .signups
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut expected: HashSet<(String, String)> = HashSet::new();
    for (id, _) in &signups {
        for push in PUSHES {
            expected.insert((format!("tok-{id}"), push.to_owned()));
        }
    }
    let drain_deadline = Instant::now() + Duration::from_secs(args.wait_secs as u64) + patience;
    loop {
        let got = received(fake);
        let missing = expected.iter().filter(|k| !got.contains_key(*k)).count();
        if missing == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A little longer, so a late duplicate would be seen too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = received(fake);
    let mut pushes_received = 0;
    let mut pushes_missing = 0;
    let mut pushes_duplicated = 0;
    for key in &expected {
        match got.get(key) {
            None => pushes_missing += 1,
            Some(count) => {
                pushes_received += 1;
                if *count > 1 {
                    pushes_duplicated += 1;
                }
            }
        }
    }

    let acknowledged: Vec<String> = ledger
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let stored = stored_events(database_url, &acknowledged).await?;
    let result = ChaosResult {
        started_at: started_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        signups_per_sec: args.signups_per_sec,
        events_per_sec: args.events_per_sec,
        settle_secs: args.settle_secs,
        recoveries,
        run_secs: started.elapsed().as_secs_f64(),
        events_acknowledged: acknowledged.len() as u64,
        events_stored: stored,
        events_lost: acknowledged.len() as u64 - stored.min(acknowledged.len() as u64),
        calls_retried: ledger.retried.load(Ordering::Relaxed),
        signups_acknowledged: signups.len() as u64,
        pushes_expected: expected.len() as u64,
        pushes_received,
        pushes_missing,
        pushes_duplicated,
    };
    Ok(result)
}

/// How many of `ids` are in the event log (of the workspace `chaos`).
async fn stored_events(database_url: &str, ids: &[String]) -> anyhow::Result<u64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let mut unique: Vec<String> = ids.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let mut stored = 0u64;
    for chunk in unique.chunks(10_000) {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT message_id) FROM events.events WHERE workspace_id = 'chaos' AND message_id = ANY($1)",
        )
        .bind(chunk)
        .fetch_one(&pool)
        .await?;
        stored += found as u64;
    }
    Ok(stored)
}

fn secs(value: Option<f64>) -> String {
    match value {
        Some(secs) => format!("{secs:.1} s"),
        None => "never (gave up)".to_owned(),
    }
}

/// The report: one line per fault, then the checks.
pub fn render(result: &ChaosResult, command: &str, machine: &str) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "Command: `{command}`, {} — {machine}; the six services, the fake FCM, PostgreSQL, Redis \
         and RabbitMQ share it.\n\n",
        result.started_at
    ));
    md.push_str(&format!(
        "Load the whole time: {} sign-ups/s (profile, push opt-in, `signed_up`; each gets two \
         pushes from an event-triggered flow and one from a flow triggered by entering a \
         real-time segment) and {} shop events/s in batches of ten; {} s of load before the \
         first fault and between faults.\n\n",
        result.signups_per_sec, result.events_per_sec, result.settle_secs
    ));
    md.push_str(
        "| fault | all services serving after | first push of each flow to a new sign-up after |\n|---|---:|---:|\n",
    );
    for recovery in &result.recoveries {
        md.push_str(&format!(
            "| {} | {} | {} |\n",
            recovery.fault,
            secs(recovery.serving_secs),
            secs(recovery.end_to_end_secs)
        ));
    }
    md.push_str(&format!(
        "\nOver {:.0} s: {} events acknowledged, {} in the event log (**{} lost**); {} sign-ups \
         acknowledged, {} pushes expected, {} received (**{} missing, {} received twice**); {} calls \
         failed during faults and were retried with the same message id.\n",
        result.run_secs,
        result.events_acknowledged,
        result.events_stored,
        result.events_lost,
        result.signups_acknowledged,
        result.pushes_expected,
        result.pushes_received,
        result.pushes_missing,
        result.pushes_duplicated,
        result.calls_retried,
    ));
    md
}

/// The machine, for the report: cores, CPU model and memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores ({model}), {gib:.0} GiB")
}
