//! The services together, and the `relance` binary as a process: erasure across services,
//! durability across SIGKILL, the Online Retail import run twice.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use relance_kit::auth::{KeyStore, Scope};
use relance_kit::bus::{Bus, EVENTS_EXCHANGE};
use relance_kit::messages::EventBatch;
use relance_kit::testing::{Tap, TestApp, TestEnv, authed, eventually};
use relance_kit::{SharedClock, SystemClock, db};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::{self as pb, customer_ref};

fn known(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn event(message_id: &str, name: &str, customer_id: &str, anonymous_id: &str) -> pb::Event {
    pb::Event {
        message_id: message_id.into(),
        name: name.into(),
        customer_id: customer_id.into(),
        anonymous_id: anonymous_id.into(),
        properties: Some(json_to_struct(&serde_json::json!({"revenue": 25.0}))),
        ..Default::default()
    }
}

async fn spawn_platform() -> TestApp {
    let env = Arc::new(TestEnv::new().await);
    let settings = env.settings.clone();
    let clock: SharedClock = Arc::new(SystemClock);
    TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await
            })
        }),
    )
    .await
}

#[tokio::test]
async fn an_erased_customer_leaves_nothing_in_profiles_or_events() {
    let app = spawn_platform().await;
    let channel = app.channel().await;
    let mut events = EventsClient::new(channel.clone());
    let mut profiles = ProfilesClient::new(channel);
    let batch = vec![
        event("e-1", "product_viewed", "", "anon-1"),
        // Identifies the visitor: profiles merges anon-1 into c1.
        event("e-2", "signed_up", "c1", "anon-1"),
        event("e-3", "order_completed", "c1", ""),
        event("e-4", "order_completed", "c2", ""),
    ];
    events
        .track_batch(authed(
            &app.ingest_key,
            pb::TrackBatchRequest { events: batch },
        ))
        .await
        .expect("track");
    let profile = eventually(10, "c1's traits and merged identity", || {
        let mut profiles = profiles.clone();
        let key = app.admin_key.clone();
        async move {
            let profile = profiles
                .get(authed(
                    &key,
                    pb::GetProfileRequest {
                        customer: known("c1"),
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (profile.traits.as_ref()?.orders_count == 1 && profile.anonymous_ids == ["anon-1"])
                .then_some(profile)
        }
    })
    .await;
    assert!((profile.traits.expect("traits").revenue - 25.0).abs() < 1e-9);
    eventually(10, "anon-1's event re-attributed to c1", || {
        let mut events = events.clone();
        let key = app.admin_key.clone();
        async move {
            let page = events
                .query(authed(
                    &key,
                    pb::QueryEventsRequest {
                        customer: known("c1"),
                        ..Default::default()
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (page.events.len() == 3).then_some(())
        }
    })
    .await;

    profiles
        .delete(authed(
            &app.admin_key,
            pb::DeleteProfileRequest {
                customer: known("c1"),
            },
        ))
        .await
        .expect("delete");
    let events_pool = db::connect(&app.platform.settings, "events")
        .await
        .expect("pool");
    eventually(10, "the events service to erase c1's events", || {
        let pool = events_pool.clone();
        async move {
            // Of the four dedup ids, only c2's (e-4) may remain.
            let left: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM events WHERE customer_id = 'c1' OR anonymous_id = 'anon-1') \
                      + (SELECT count(*) FROM event_ids) - 1 \
                      + (SELECT count(*) FROM identity_links WHERE customer_id = 'c1')",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (left == 0).then_some(())
        }
    })
    .await;
    let profiles_pool = db::connect(&app.platform.settings, "profiles")
        .await
        .expect("pool");
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM profiles WHERE customer_id = 'c1') + (SELECT count(*) FROM identities WHERE anonymous_id = 'anon-1')",
    )
    .fetch_one(&profiles_pool)
    .await
    .expect("count");
    assert_eq!(left, 0);
    // The other customer is untouched.
    let page = events
        .query(authed(
            &app.admin_key,
            pb::QueryEventsRequest {
                customer: known("c2"),
                ..Default::default()
            },
        ))
        .await
        .expect("c2")
        .into_inner();
    assert_eq!(page.events.len(), 1);
    app.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_events_process(
    env: &TestEnv,
    grpc_port: u16,
    admin_port: u16,
    relay_batch: &str,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_relance"))
        .args(["serve", "events"])
        .env("RELANCE_DATABASE_URL", env.database_url())
        .env("RELANCE_AMQP_PREFIX", &env.settings.amqp_prefix)
        .env("RELANCE_AMQP_EPHEMERAL", "true")
        .env("RELANCE_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("RELANCE_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("RELANCE_LOG_LEVEL", "warn")
        .env("RELANCE_EVENTS__RELAY_BATCH", relay_batch)
        .stdout(Stdio::null())
        .spawn()
        .expect("start relance serve events")
}

async fn connect(port: u16) -> EventsClient<tonic::transport::Channel> {
    eventually(30, "relance serve events to listen", || async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        Some(EventsClient::new(channel))
    })
    .await
}

#[tokio::test]
async fn acknowledged_events_survive_sigkill_and_are_published_after_restart() {
    let env = TestEnv::new().await;
    let auth = db::connect(&env.settings, "auth").await.expect("auth pool");
    db::migrate(&auth, &relance_kit::platform::AUTH_MIGRATOR, "auth")
        .await
        .expect("migrate");
    let key = KeyStore::new(auth)
        .create_key("crash", &[Scope::Ingest, Scope::Admin], "test")
        .await
        .expect("key");
    let bus = Bus::connect(&env.settings).await.expect("bus");
    let mut tap = Tap::bind(&bus, EVENTS_EXCHANGE, "event.#").await;

    // A relay publishing one event per round trip is still busy when the process dies.
    let port = free_port();
    let admin_port = free_port();
    let mut process = start_events_process(&env, port, admin_port, "1");
    let mut events = connect(port).await;
    let mut acknowledged = HashSet::new();
    for batch in 0..10 {
        let chunk: Vec<_> = (0..500)
            .map(|i| {
                event(
                    &format!("k-{batch}-{i}"),
                    "product_viewed",
                    &format!("c{i}"),
                    "",
                )
            })
            .collect();
        let response = events
            .track_batch(authed(
                &key,
                pb::TrackBatchRequest {
                    events: chunk.clone(),
                },
            ))
            .await
            .expect("acknowledged")
            .into_inner();
        assert_eq!(response.accepted, 500);
        acknowledged.extend(chunk.into_iter().map(|e| e.message_id));
    }
    let metrics = http_get(admin_port, "/metrics").await;
    assert!(
        metrics.contains(r#"relance_grpc_requests_total{rpc="Events/TrackBatch",code="OK"} 10"#),
        "per-RPC counts on the admin port: {metrics}"
    );
    process.kill().expect("SIGKILL");
    process.wait().expect("reaped");

    let pool = db::connect(&env.settings, "events").await.expect("pool");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 5000, "every acknowledged event is in Postgres");

    let mut published = HashSet::new();
    while let Some((_, body)) = tap.next(1).await {
        let batch: EventBatch = serde_json::from_slice(&body).expect("json");
        published.extend(batch.events.into_iter().map(|e| e.message_id));
    }
    let before_restart = published.len();
    eprintln!(
        "published before the kill: {before_restart} of {}",
        acknowledged.len()
    );
    assert!(
        before_restart < 5000,
        "the relay was still behind when killed ({before_restart} published)"
    );

    let mut process = start_events_process(&env, port, admin_port, "1000");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while published.len() < acknowledged.len() && tokio::time::Instant::now() < deadline {
        if let Some((_, body)) = tap.next(5).await {
            let batch: EventBatch = serde_json::from_slice(&body).expect("json");
            published.extend(batch.events.into_iter().map(|e| e.message_id));
        }
    }
    assert_eq!(
        published, acknowledged,
        "every acknowledged event was published ({before_restart} before the kill)"
    );

    // The backlog was read back from Postgres; from now on the relay takes what this
    // process ingests from memory.
    let read_back = |metrics: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("relance_events_relay_read_back_total"));
        line.and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = read_back(&http_get(admin_port, "/metrics").await);
    assert!(
        before > 0,
        "the backlog left by the killed process was read back"
    );
    let fresh: Vec<_> = (0..100)
        .map(|i| event(&format!("after-{i}"), "product_viewed", "c-after", ""))
        .collect();
    events = connect(port).await;
    events
        .track_batch(authed(&key, pb::TrackBatchRequest { events: fresh }))
        .await
        .expect("track after restart");
    let mut seen = 0;
    while seen < 100 {
        let Some((_, body)) = tap.next(10).await else {
            break;
        };
        let batch: EventBatch = serde_json::from_slice(&body).expect("json");
        seen += batch
            .events
            .iter()
            .filter(|e| e.message_id.starts_with("after-"))
            .count();
    }
    assert_eq!(seen, 100, "the new events were published");
    assert_eq!(
        read_back(&http_get(admin_port, "/metrics").await),
        before,
        "new events came from memory, not from Postgres"
    );

    assert_eq!(health(port, "relance.v1.Events").await, 1, "SERVING");
    // SIGTERM: stop accepting, drain, exit cleanly.
    let terminated = Command::new("kill")
        .args(["-TERM", &process.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(terminated.success());
    let status = eventually(15, "a clean exit after SIGTERM", || {
        let status = process.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

async fn import_sample(app: &TestApp) -> String {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/data/online-retail-sample.csv.gz"
    );
    // The services run in this test's runtime: wait for the child without blocking it.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_relance"))
        .args(["import", "online-retail", sample, "--quiet"])
        .env("RELANCE_ADDR", format!("http://{}", app.addr))
        .env("RELANCE_API_KEY", &app.admin_key)
        .output()
        .await
        .expect("run relance import");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "import failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn figure(report: &str, label: &str) -> String {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in {report}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_the_online_retail_sample_twice_stores_nothing_twice() {
    let app = spawn_platform().await;
    // Counts measured independently with Python's csv module (examples/data/README.md).
    let first = import_sample(&app).await;
    assert_eq!(figure(&first, "rows read"), "195,679");
    assert_eq!(figure(&first, "invoices"), "8,426");
    assert_eq!(figure(&first, "customers"), "2,872");
    assert_eq!(figure(&first, "events sent"), "7,577");
    assert_eq!(figure(&first, "events accepted"), "7,577");
    assert_eq!(figure(&first, "events rejected"), "0");
    assert_eq!(figure(&first, "invoices skipped"), "849");

    let second = import_sample(&app).await;
    assert_eq!(figure(&second, "events accepted"), "0", "{second}");
    assert_eq!(figure(&second, "events already stored"), "7,577");
    let pool = db::connect(&app.platform.settings, "events")
        .await
        .expect("pool");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 7577);
    app.stop().await;
}

/// A plain HTTP/1.0 GET on the admin port.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("admin port");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}

/// The gRPC health status of `service` (1 = SERVING).
async fn health(port: u16, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check");
    response.into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_racing_an_identity_merge_all_end_up_with_the_customer() {
    // A peer's known bug: an event written while the visitor is being merged kept the old id.
    let app = spawn_platform().await;
    let channel = app.channel().await;
    let events = EventsClient::new(channel.clone());
    let mut profiles = ProfilesClient::new(channel);
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut events = events.clone();
        let key = app.ingest_key.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                let event = event(
                    &format!("race-{writer}-{i}"),
                    "product_viewed",
                    "",
                    "anon-race",
                );
                events
                    .track(authed(&key, pb::TrackRequest { event: Some(event) }))
                    .await
                    .expect("track");
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let merge = pb::MergeProfilesRequest {
        anonymous_id: "anon-race".into(),
        customer_id: "c-race".into(),
    };
    profiles
        .merge(authed(&app.admin_key, merge))
        .await
        .expect("merge");
    for writer in writers {
        writer.await.expect("writer");
    }
    let pool = db::connect(&app.platform.settings, "events")
        .await
        .expect("pool");
    eventually(10, "every racing event attributed to the customer", || {
        let pool = pool.clone();
        async move {
            let (total, attributed): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE customer_id = 'c-race') FROM events WHERE anonymous_id = 'anon-race'",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (total == 200 && attributed == 200).then_some(())
        }
    })
    .await;
    app.stop().await;
}

/// Sends one raw HTTP/1.1 request and returns the whole response.
async fn http_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("request");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_tracks_an_event_over_grpc_web() {
    let app = spawn_platform().await;
    // The CORS preflight a browser sends before the call.
    let preflight = format!(
        "OPTIONS /relance.v1.Events/Track HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://shop.example\r\n\
         Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization,content-type,x-grpc-web\r\n\
         Connection: close\r\n\r\n",
        addr = app.addr
    );
    let answer = String::from_utf8_lossy(&http_exchange(app.addr, preflight.as_bytes()).await)
        .to_lowercase();
    assert!(
        answer.contains("access-control-allow-origin: https://shop.example"),
        "{answer}"
    );

    // The call itself, framed as gRPC-Web: a 0 flag byte, the length, the protobuf message.
    let track = pb::TrackRequest {
        event: Some(event("web-1", "product_viewed", "c-web", "")),
    };
    let message = prost::Message::encode_to_vec(&track);
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let mut request = format!(
        "POST /relance.v1.Events/Track HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://shop.example\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {length}\r\nConnection: close\r\n\r\n",
        addr = app.addr,
        key = app.ingest_key,
        length = body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let response = http_exchange(app.addr, &request).await;
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("grpc-status:0"),
        "the trailers frame says OK: {text}"
    );

    let mut events = EventsClient::new(app.channel().await);
    let page = events
        .query(authed(
            &app.admin_key,
            pb::QueryEventsRequest {
                customer: known("c-web"),
                ..Default::default()
            },
        ))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(page.events.len(), 1, "the browser's event is stored");
    app.stop().await;
}
