//! Campaigns as a process: 100,000 customers through a three-step flow while the campaigns
//! process is killed with SIGKILL several times (while starting journeys, and twice while
//! sending); afterwards every customer got each message exactly once according to delivery's
//! ledger, and none was missed.
//!
//! A second test does the same to a broadcast: killed while it queues its send requests,
//! restarted, every member of the segment got it once.
//!
//! Profiles, events and delivery (and segmentation, for the broadcast's audience) run in
//! this test's process; `relance serve campaigns` runs as a child process, the one that is
//! killed. `RELANCE_CHAOS_CUSTOMERS` changes the count.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relance_kit::testing::{TestApp, TestEnv, authed, eventually};
use relance_kit::{SharedClock, SystemClock};
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::{self as pb};
use sqlx::PgPool;

const INTERNAL_KEY: &str = "campaigns-chaos-internal-key";

fn customers() -> usize {
    std::env::var("RELANCE_CHAOS_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start(env: &TestEnv, grpc: u16, admin: u16, config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_relance"))
        .args(["serve", "campaigns"])
        .env("RELANCE_CONFIG", config)
        .env("RELANCE_DATABASE_URL", env.database_url())
        .env("RELANCE_AMQP_PREFIX", &env.settings.amqp_prefix)
        .env("RELANCE_AMQP_EPHEMERAL", "true")
        .env("RELANCE_REDIS_PREFIX", &env.settings.redis_prefix)
        .env("RELANCE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("RELANCE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env("RELANCE_INTERNAL_KEY", INTERNAL_KEY)
        // Two such tests may run at once beside others: Postgres's 100 connections are shared.
        .env("RELANCE_DATABASE_MAX_CONNECTIONS", "6")
        .env("RELANCE_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start relance serve campaigns")
}

async fn channel(port: u16) -> tonic::transport::Channel {
    eventually(60, "relance serve campaigns to listen", || async move {
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .ok()?
            .connect()
            .await
            .ok()
    })
    .await
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap_or(-1)
}

fn kill(process: &mut Child) {
    process.kill().expect("SIGKILL");
    process.wait().expect("reaped");
}

#[tokio::test]
async fn sigkill_while_journeys_start_and_send_then_every_customer_got_each_message_exactly_once() {
    let n = customers();
    let started = Instant::now();
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with(&[
            ("internal_key", INTERNAL_KEY),
            ("delivery.http_addr", "127.0.0.1:0"),
            ("database_max_connections", "4"),
        ])
        .expect("settings");
    let clock: SharedClock = Arc::new(SystemClock);
    let app = TestApp::start(
        env.clone(),
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_delivery::serve(platform, server).await
            })
        }),
    )
    .await;
    let db = PgPool::connect(&env.database_url()).await.expect("pool");
    // The customers: profiles written in bulk (the in-app channel needs a profile, no
    // address or opt-in).
    sqlx::query(
        "INSERT INTO profiles.profiles (workspace_id, customer_id, created_at, updated_at) \
         SELECT $1, 'c' || i, now(), now() FROM generate_series(0, $2 - 1) AS i",
    )
    .bind(&app.workspace)
    .bind(n as i64)
    .execute(&db)
    .await
    .expect("profiles");
    let local = app.channel().await;
    let mut delivery = DeliveryClient::new(local.clone());
    for name in ["chaos-1", "chaos-2", "chaos-3"] {
        let template = pb::Template {
            name: name.into(),
            default_locale: "en".into(),
            variants: vec![pb::TemplateVariant {
                locale: "en".into(),
                content: Some(pb::MessageContent {
                    in_app: Some(pb::InAppContent {
                        title: name.to_string(),
                        body: "Hello".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        delivery
            .upsert_template(authed(
                &app.admin_key,
                pb::UpsertTemplateRequest {
                    template: Some(template),
                    dry_run: false,
                },
            ))
            .await
            .expect("template");
    }

    let (grpc, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("relance-campaigns-chaos-{}", env.id));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("relance.toml");
    let here = format!("http://{}", app.addr);
    std::fs::write(
        &config,
        format!(
            r#"
[services]
profiles = "{here}"
events = "{here}"
segmentation = "{here}"
delivery = "{here}"

[campaigns]
workers = 2
batch = 500
poll_ms = 50
"#
        ),
    )
    .expect("config");
    let mut process = start(&env, grpc, admin, &config);
    let mut campaigns = CampaignsClient::new(channel(grpc).await);
    // The test runs at any hour: quiet hours would hold the sends until morning.
    campaigns
        .set_quiet_hours(authed(
            &app.admin_key,
            pb::SetQuietHoursRequest {
                quiet_hours: Some(pb::QuietHours {
                    enabled: false,
                    start: "22:00".into(),
                    end: "08:00".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("quiet hours off");
    campaigns
        .apply_flow(authed(
            &app.admin_key,
            pb::ApplyFlowRequest {
                yaml: r#"
kind: Flow
name: chaos
trigger: { event: signed_up }
steps:
  - send: { channel: in_app, template: chaos-1 }
  - wait: 15s
  - send: { channel: in_app, template: chaos-2 }
  - wait: 15s
  - send: { channel: in_app, template: chaos-3 }
"#
                .into(),
                dry_run: false,
            },
        ))
        .await
        .expect("flow applied");

    let mut events = EventsClient::new(local);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| pb::Event {
                message_id: format!("signup-{i}"),
                name: "signed_up".into(),
                customer_id: format!("c{i}"),
                ..Default::default()
            })
            .collect();
        let response = events
            .track_batch(authed(
                &app.ingest_key,
                pb::TrackBatchRequest { events: batch },
            ))
            .await
            .expect("track batch")
            .into_inner();
        assert!(response.rejected.is_empty(), "{:?}", response.rejected);
    }
    eprintln!(
        "{n} sign-ups accepted after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let expected = 3 * n as i64;
    let ledger = "SELECT count(*) FROM delivery.messages WHERE flow = 'chaos'";
    let mut kills = Vec::new();
    // 1: while the consumer is starting journeys.
    eventually(300, "journeys to start", || {
        let db = db.clone();
        async move {
            (count(&db, "SELECT count(*) FROM campaigns.journeys").await >= (n as i64) / 3)
                .then_some(())
        }
    })
    .await;
    kill(&mut process);
    kills.push(format!(
        "journeys {}",
        count(&db, "SELECT count(*) FROM campaigns.journeys").await
    ));
    process = start(&env, grpc, admin, &config);
    // 2 and 3: while sending.
    for share in [3, 6] {
        eventually(600, "sends to progress", || {
            let db = db.clone();
            async move { (count(&db, ledger).await >= expected * share / 10).then_some(()) }
        })
        .await;
        kill(&mut process);
        kills.push(format!("ledger {}", count(&db, ledger).await));
        tokio::time::sleep(Duration::from_millis(200)).await;
        process = start(&env, grpc, admin, &config);
    }

    eventually(
        900,
        "every journey to end and every message to be in the ledger",
        || {
            let db = db.clone();
            async move {
                let ended = count(
                    &db,
                    "SELECT count(*) FROM campaigns.journeys WHERE status = 3",
                )
                .await;
                let messages = count(&db, ledger).await;
                (ended == n as i64 && messages >= expected).then_some(())
            }
        },
    )
    .await;
    // Give a late duplicate (an outbox row published twice) the time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        count(&db, "SELECT count(*) FROM campaigns.journeys").await,
        n as i64,
        "one journey per customer"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM (SELECT customer_id FROM campaigns.journeys GROUP BY 1 HAVING count(*) > 1) d").await,
        0
    );
    assert_eq!(
        count(&db, ledger).await,
        expected,
        "three messages per customer in the ledger"
    );
    // Each customer: exactly the three steps, once each, all sent.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM (SELECT customer_id FROM delivery.messages WHERE flow = 'chaos' GROUP BY 1 \
             HAVING count(*) = 3 AND count(DISTINCT step) = 3 \
             AND array_agg(template ORDER BY template) = ARRAY['chaos-1', 'chaos-2', 'chaos-3']) ok"
        )
        .await,
        n as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM delivery.messages WHERE flow = 'chaos' AND status <> 2"
        )
        .await,
        0,
        "all sent"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM campaigns.sends").await,
        expected
    );
    eprintln!(
        "{n} customers, {expected} messages, kills at {kills:?}, done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    kill(&mut process);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sigkill_while_a_broadcast_queues_then_every_member_got_it_once() {
    let n = (customers() / 5).max(1000);
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with(&[
            ("internal_key", INTERNAL_KEY),
            ("delivery.http_addr", "127.0.0.1:0"),
            ("database_max_connections", "4"),
        ])
        .expect("settings");
    let clock: SharedClock = Arc::new(SystemClock);
    let app = TestApp::start(
        env.clone(),
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_segmentation::serve(platform, server).await?;
                relance_delivery::serve(platform, server).await
            })
        }),
    )
    .await;
    let db = PgPool::connect(&env.database_url()).await.expect("pool");
    sqlx::query(
        "INSERT INTO profiles.profiles (workspace_id, customer_id, created_at, updated_at) \
         SELECT $1, 'm' || i, now(), now() FROM generate_series(0, $2 - 1) AS i",
    )
    .bind(&app.workspace)
    .bind(n as i64)
    .execute(&db)
    .await
    .expect("profiles");
    let local = app.channel().await;
    let template = pb::Template {
        name: "flash-sale".into(),
        default_locale: "en".into(),
        variants: vec![pb::TemplateVariant {
            locale: "en".into(),
            content: Some(pb::MessageContent {
                in_app: Some(pb::InAppContent {
                    title: "Flash sale".into(),
                    body: "Two hours only".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    DeliveryClient::new(local.clone())
        .upsert_template(authed(
            &app.admin_key,
            pb::UpsertTemplateRequest {
                template: Some(template),
                dry_run: false,
            },
        ))
        .await
        .expect("template");
    // The audience: everyone who visited (segmentation builds it from the events).
    let mut segments = relance_proto::v1::segments_client::SegmentsClient::new(local.clone());
    segments
        .apply(authed(
            &app.admin_key,
            pb::ApplySegmentRequest {
                yaml: "kind: Segment\nname: visitors\nwhere: { event: app_opened }\n".into(),
                dry_run: false,
            },
        ))
        .await
        .expect("segment");
    let mut events = EventsClient::new(local);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| pb::Event {
                message_id: format!("open-{i}"),
                name: "app_opened".into(),
                customer_id: format!("m{i}"),
                ..Default::default()
            })
            .collect();
        events
            .track_batch(authed(
                &app.ingest_key,
                pb::TrackBatchRequest { events: batch },
            ))
            .await
            .expect("track batch");
    }
    eventually(300, "the audience to be built", || {
        let mut segments = segments.clone();
        let key = app.admin_key.clone();
        async move {
            let count = segments
                .count(authed(
                    &key,
                    pb::CountSegmentRequest {
                        name: "visitors".into(),
                    },
                ))
                .await
                .ok()?
                .into_inner()
                .count;
            (count == n as u64).then_some(())
        }
    })
    .await;

    let (grpc, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("relance-broadcast-chaos-{}", env.id));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("relance.toml");
    let here = format!("http://{}", app.addr);
    std::fs::write(
        &config,
        format!(
            r#"
[services]
profiles = "{here}"
events = "{here}"
segmentation = "{here}"
delivery = "{here}"

[campaigns]
broadcast_batch = 500
"#
        ),
    )
    .expect("config");
    let mut process = start(&env, grpc, admin, &config);
    let mut campaigns = CampaignsClient::new(channel(grpc).await);
    // Throttled, so the kills land while it is queuing.
    let response = campaigns
        .schedule_broadcast(authed(
            &app.admin_key,
            pb::ScheduleBroadcastRequest {
                definition: Some(pb::schedule_broadcast_request::Definition::Yaml(format!(
                    "kind: Broadcast\nname: flash\nsegment: visitors\nchannel: in_app\ntemplate: flash-sale\n\
                     ignore_quiet_hours: true\nmax_sends_per_second: {}\n",
                    (n / 10).max(100)
                ))),
                dry_run: false,
            },
        ))
        .await
        .expect("scheduled")
        .into_inner();
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let queued = "SELECT count(*) FROM campaigns.broadcast_recipients WHERE state = 1";
    let mut kills = Vec::new();
    for share in [2, 5] {
        eventually(300, "the broadcast to progress", || {
            let db = db.clone();
            async move { (count(&db, queued).await >= (n as i64) * share / 10).then_some(()) }
        })
        .await;
        kill(&mut process);
        kills.push(count(&db, queued).await);
        process = start(&env, grpc, admin, &config);
    }
    let ledger = "SELECT count(*) FROM delivery.messages WHERE broadcast = 'flash'";
    eventually(600, "every member's message in the ledger", || {
        let db = db.clone();
        async move { (count(&db, ledger).await >= n as i64).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&db, ledger).await, n as i64, "one message per member");
    assert_eq!(
        count(&db, "SELECT count(DISTINCT customer_id) FROM delivery.messages WHERE broadcast = 'flash' AND status = 2").await,
        n as i64
    );
    let broadcast = campaigns
        .get_broadcast(authed(
            &app.admin_key,
            pb::GetBroadcastRequest {
                name: "flash".into(),
            },
        ))
        .await
        .expect("broadcast")
        .into_inner();
    assert_eq!(broadcast.status, pb::BroadcastStatus::Completed as i32);
    assert_eq!(broadcast.queued, n as u64);
    eprintln!("broadcast to {n}: kills after {kills:?} queued");
    kill(&mut process);
    let _ = std::fs::remove_dir_all(&dir);
}
