//! Delivery as a process: killed with SIGKILL in the middle of sending a batch, restarted,
//! and every message sent — none missed, none sent twice by the ledger.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use relance_delivery::fake::FakeProviders;
use relance_delivery::wire::Envelope;
use relance_kit::auth::{KeyStore, Scope};
use relance_kit::bus::{Bus, DELIVERY_EXCHANGE, Outgoing, Publisher};
use relance_kit::db;
use relance_kit::testing::{TestEnv, authed, eventually};
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::{self as pb, customer_ref};

const MESSAGES: usize = 2000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn known(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

struct Ports {
    grpc: u16,
    admin: u16,
    http: u16,
}

fn start(env: &TestEnv, ports: &Ports, config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_relance"))
        .args(["serve", "profiles", "delivery"])
        .env("RELANCE_CONFIG", config)
        .env("RELANCE_DATABASE_URL", env.database_url())
        .env("RELANCE_AMQP_PREFIX", &env.settings.amqp_prefix)
        .env("RELANCE_AMQP_EPHEMERAL", "true")
        .env("RELANCE_REDIS_PREFIX", &env.settings.redis_prefix)
        .env("RELANCE_GRPC_ADDR", format!("127.0.0.1:{}", ports.grpc))
        .env("RELANCE_ADMIN_ADDR", format!("127.0.0.1:{}", ports.admin))
        .env("RELANCE_INTERNAL_KEY", "crash-test-internal-key")
        .env("RELANCE_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start relance serve profiles delivery")
}

async fn channel(port: u16) -> tonic::transport::Channel {
    eventually(60, "relance serve to listen", || async move {
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .ok()?
            .connect()
            .await
            .ok()
    })
    .await
}

/// Message ids the fake FCM received, with how many requests each.
fn received(fake: &FakeProviders) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in fake.requests_for("/v1/projects/shop/messages:send") {
        let id = request.json()["message"]["data"]["relance_message_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn sigkill_mid_batch_then_restart_sends_every_message_once_resending_only_what_was_in_flight()
{
    let env = TestEnv::new().await;
    let auth = db::connect(&env.settings, "auth").await.expect("auth pool");
    db::migrate(&auth, &relance_kit::platform::AUTH_MIGRATOR, "auth")
        .await
        .expect("migrate");
    let key = KeyStore::new(auth)
        .create_key("crash", &[Scope::Admin], "test")
        .await
        .expect("key");
    let fake = FakeProviders::start().await.expect("fake providers");
    // Each provider call takes a while, so the kill lands while calls are in flight.
    fake.set_latency(Duration::from_millis(20));
    let ports = Ports {
        grpc: free_port(),
        admin: free_port(),
        http: free_port(),
    };
    let dir = std::env::temp_dir().join(format!("relance-crash-{}", env.id));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("relance.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[delivery]
http_addr = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
link_secret = "crash-test"
consumers = 2
batch = 100
concurrency = 32
lease_secs = 3
sweep_every_secs = 1
sweep_grace_secs = 1

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "shop"
access_token = "token"
"#,
            http = ports.http,
            base = fake.base_url()
        ),
    )
    .expect("config");

    let mut process = start(&env, &ports, &config);
    let grpc = channel(ports.grpc).await;
    let profiles = ProfilesClient::new(grpc.clone());
    let mut delivery = DeliveryClient::new(grpc);
    let mut customers = Vec::new();
    for i in 0..MESSAGES {
        let id = format!("c{i}");
        let mut client = profiles.clone();
        let key = key.clone();
        customers.push(async move {
            client
                .upsert(authed(
                    &key,
                    pb::UpsertProfileRequest {
                        customer: known(&id),
                        push_tokens: vec![pb::PushToken {
                            token: format!("token-{i}"),
                            platform: pb::PushPlatform::Android as i32,
                            app_id: String::new(),
                            updated_at: None,
                        }],
                        ..Default::default()
                    },
                ))
                .await
        });
        if customers.len() == 100 {
            for result in futures::future::join_all(customers.drain(..)).await {
                result.expect("profile");
            }
        }
    }
    for result in futures::future::join_all(customers.drain(..)).await {
        result.expect("profile");
    }
    let template = pb::Template {
        name: "order-shipped".into(),
        default_locale: "en".into(),
        variants: vec![pb::TemplateVariant {
            locale: "en".into(),
            direction: 0,
            content: Some(pb::MessageContent {
                push: Some(pb::PushContent {
                    title: "Your order shipped".into(),
                    body: "Order {{ data.order }} is on its way".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    delivery
        .upsert_template(authed(
            &key,
            pb::UpsertTemplateRequest {
                template: Some(template),
                dry_run: false,
            },
        ))
        .await
        .expect("template");

    // Every request published (and confirmed by the broker) before the first kill.
    let bus = Bus::connect(&env.settings).await.expect("bus");
    let publisher = Publisher::new(bus);
    let mut outgoing = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let request = pb::SendRequest {
            idempotency_key: format!("shipped-{i}"),
            customer: known(&format!("c{i}")),
            channels: vec![pb::Channel::Push as i32],
            content: Some(pb::send_request::Content::Template("order-shipped".into())),
            topic: "order_updates".into(),
            kind: pb::MessageKind::Transactional as i32,
            data: Some(relance_proto::convert::json_to_struct(
                &serde_json::json!({ "order": i }),
            )),
            ..Default::default()
        };
        outgoing.push(Outgoing {
            exchange: DELIVERY_EXCHANGE.into(),
            routing_key: "push".into(),
            message_id: format!("crash:shipped-{i}"),
            payload: serde_json::to_vec(&Envelope::new("crash", &request)).expect("json"),
            headers: Default::default(),
        });
    }
    for chunk in outgoing.chunks(500) {
        publisher.publish_all(chunk).await.expect("published");
    }

    // Killed twice while sending, each time once some hundreds more went out.
    let mut kills = Vec::new();
    for round in 1..=2 {
        let target = round * MESSAGES / 4;
        eventually(120, "sends to start", || {
            let count = fake.count() as usize;
            async move { (count >= target).then_some(()) }
        })
        .await;
        process.kill().expect("SIGKILL");
        process.wait().expect("reaped");
        kills.push(fake.count());
        tokio::time::sleep(Duration::from_millis(300)).await;
        process = start(&env, &ports, &config);
    }

    let pool = db::connect(&env.settings, "delivery").await.expect("pool");
    let sent: i64 = eventually(180, "every message to be sent", || {
        let pool = pool.clone();
        async move {
            let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE status = 2")
                .fetch_one(&pool)
                .await
                .ok()?;
            (sent as usize == MESSAGES).then_some(sent)
        }
    })
    .await;
    assert_eq!(sent as usize, MESSAGES);
    let ledger_ids: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM messages")
            .fetch_all(&pool)
            .await
            .expect("ids")
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    assert_eq!(
        ledger_ids.len(),
        MESSAGES,
        "one ledger row per idempotency key"
    );

    let counts = received(&fake);
    let missed: Vec<&String> = ledger_ids
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(
        missed.is_empty(),
        "every message reached the provider; missed: {missed:?}"
    );
    // A message whose provider call was in flight at the kill has an unknown outcome: it is
    // sent again (same message id, so receivers can tell), and only those.
    let in_doubt: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM messages WHERE attempts > 1")
            .fetch_all(&pool)
            .await
            .expect("in doubt")
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    let mut twice = 0;
    for (id, count) in &counts {
        assert!(
            ledger_ids.contains(id),
            "the provider got only ledger messages"
        );
        if *count > 1 {
            twice += 1;
            assert_eq!(*count, 2, "{id} sent {count} times");
            assert!(
                in_doubt.contains(id),
                "{id} sent twice but was never in doubt"
            );
        }
    }
    eprintln!(
        "kills after {kills:?} provider requests; {} messages in doubt, {twice} of them resent; {} requests for {MESSAGES} messages",
        in_doubt.len(),
        fake.count()
    );
    // Resent means in flight at a kill, or finished but not yet written: at most the
    // concurrency plus one group of outcomes, per consumer and kill.
    assert!(twice <= 2 * 2 * (32 + 32), "{twice} resent");
    let _ = process.kill();
    let _ = process.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
