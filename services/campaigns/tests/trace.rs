//! One trace from a Track call to the provider call: the event's trace context travels
//! through RabbitMQ headers (events → segmentation), the segmentation outbox (the
//! `segment.entered` announcement), the journey row (its steps run later, in another task),
//! the campaigns outbox (the send request) and delivery's claim, and gRPC metadata carries it
//! between services. Spans are collected by an in-memory exporter.
//!
//! Its own test binary: the tracing subscriber and the tracer provider are process-wide.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use opentelemetry::trace::{TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use relance_delivery::fake::FakeProviders;
use relance_kit::SharedClock;
use relance_kit::clock::ManualClock;
use relance_kit::testing::{TestApp, TestEnv, authed, eventually};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::segments_client::SegmentsClient;
use relance_proto::v1::{self as pb, customer_ref};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collected {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
}

fn install_tracing() -> Collected {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("relance-test")))
        .init();
    collected
}

/// Recognises the span of one hop.
type SpanMatcher = dyn Fn(&SpanData) -> bool;

fn customer(id: &str) -> pb::CustomerRef {
    pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// `name` and its attributes, to read in a failure message.
fn describe(span: &SpanData) -> String {
    let mut text = span.name.to_string();
    for kv in &span.attributes {
        text.push_str(&format!(" {}={}", kv.key, kv.value));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_track_to_the_provider_call() {
    let collected = install_tracing();
    let fake = FakeProviders::start().await.unwrap();
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with_toml(&format!(
            r#"
database_max_connections = 4

[campaigns]
poll_ms = 20
workers = 1

[delivery]
http_addr = "127.0.0.1:0"

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "shop"
access_token = "fcm-test-token"
"#,
            base = fake.base_url()
        ))
        .unwrap();
    // Midday on a Monday: outside the default quiet hours.
    let clock: SharedClock =
        ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).single().unwrap());
    let app = TestApp::start(
        env.clone(),
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_segmentation::serve(platform, server).await?;
                relance_delivery::serve(platform, server).await?;
                relance_campaigns::serve(platform, server).await
            })
        }),
    )
    .await;
    let channel = app.channel().await;
    let key = app.admin_key.clone();
    let mut profiles = ProfilesClient::new(channel.clone());
    let mut delivery = DeliveryClient::new(channel.clone());
    let mut segments = SegmentsClient::new(channel.clone());
    let mut campaigns = CampaignsClient::new(channel.clone());
    let mut events = EventsClient::new(channel);

    // A customer reachable by push, a push template, a real-time segment and a flow that
    // sends when a customer enters it.
    profiles
        .upsert(authed(
            &key,
            pb::UpsertProfileRequest {
                customer: Some(customer("c1")),
                attributes: Some(json_to_struct(&serde_json::json!({"first_name": "Amina"}))),
                push_tokens: vec![pb::PushToken {
                    token: "android-token-c1".into(),
                    platform: pb::PushPlatform::Android as i32,
                    app_id: "com.shop.app".into(),
                    updated_at: None,
                }],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    profiles
        .set_consent(authed(
            &key,
            pb::SetConsentRequest {
                customer: Some(customer("c1")),
                consent: Some(pb::Consent {
                    channel: pb::Channel::Push as i32,
                    topic: String::new(),
                    status: pb::ConsentStatus::OptedIn as i32,
                    updated_at: None,
                    source: "signup_form".into(),
                }),
            },
        ))
        .await
        .unwrap();
    delivery
        .upsert_template(authed(
            &key,
            pb::UpsertTemplateRequest {
                template: Some(pb::Template {
                    name: "cart-1".into(),
                    default_locale: "en".into(),
                    variants: vec![pb::TemplateVariant {
                        locale: "en".into(),
                        content: Some(pb::MessageContent {
                            push: Some(pb::PushContent {
                                title: "{{ customer.first_name }}, your cart".into(),
                                body: "It is still waiting".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                dry_run: false,
            },
        ))
        .await
        .unwrap();
    segments
        .apply(authed(
            &key,
            pb::ApplySegmentRequest {
                yaml: "kind: Segment\nname: cart-holders\nwhere: { event: cart_updated, within: 1d }\n"
                    .into(),
                dry_run: false,
            },
        ))
        .await
        .unwrap();
    campaigns
        .apply_flow(authed(
            &key,
            pb::ApplyFlowRequest {
                yaml:
                    "kind: Flow\nname: cart-reminder\ntrigger: { segment_entered: cart-holders }\n\
                       steps:\n  - send: { channel: push, template: cart-1 }\n"
                        .into(),
                dry_run: false,
            },
        ))
        .await
        .unwrap();
    // The segment's first version is built (empty) before the event that moves c1 in.
    eventually(20, "the segment is active", || {
        let mut segments = segments.clone();
        let key = key.clone();
        async move {
            let segment = segments
                .get(authed(
                    &key,
                    pb::GetSegmentRequest {
                        name: "cart-holders".into(),
                        version: 0,
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (segment.status == pb::SegmentStatus::Active as i32).then_some(())
        }
    })
    .await;

    events
        .track(authed(
            &key,
            pb::TrackRequest {
                event: Some(pb::Event {
                    name: "cart_updated".into(),
                    customer_id: "c1".into(),
                    properties: Some(json_to_struct(&serde_json::json!({"value": 42.0}))),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    eventually(
        20,
        "c1 enters cart-holders and starts a journey",
        || async {
            let journeys: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM campaigns.journeys WHERE customer_id = 'c1'",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (journeys == 1).then_some(())
        },
    )
    .await;
    eventually(20, "the send request reaches delivery's ledger", || async {
        let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery.messages")
            .fetch_one(&db)
            .await
            .ok()?;
        (messages == 1).then_some(())
    })
    .await;
    eventually(30, "the push reaches the provider", || async {
        (!fake
            .requests_for("/v1/projects/shop/messages:send")
            .is_empty())
        .then_some(())
    })
    .await;

    // The Track call's span is the root; every hop below must be in its trace.
    let track_trace = eventually(10, "the Track span is exported", || async {
        collected.spans().into_iter().find_map(|span| {
            let rpc = attribute(&span, "rpc")?;
            (span.name == "rpc" && rpc.ends_with("/Track")).then_some(span.span_context.trace_id())
        })
    })
    .await;
    let in_trace = |trace: TraceId| -> Vec<SpanData> {
        collected
            .spans()
            .into_iter()
            .filter(|span| span.span_context.trace_id() == trace)
            .collect()
    };
    let expected: [(&str, &SpanMatcher); 5] = [
        ("segmentation consumes the event", &|span: &SpanData| {
            span.name == "consume"
                && attribute(span, "queue").is_some_and(|q| q.starts_with("segmentation"))
        }),
        ("campaigns consumes segment.entered", &|span: &SpanData| {
            span.name == "consume"
                && attribute(span, "routing_key").is_some_and(|k| k == "segment.entered")
                && attribute(span, "queue").is_some_and(|q| q.starts_with("campaigns"))
        }),
        ("the journey step runs", &|span: &SpanData| {
            span.name == "journey_step"
                && attribute(span, "flow").is_some_and(|f| f == "cart-reminder")
        }),
        ("delivery delivers the message", &|span: &SpanData| {
            span.name == "deliver"
        }),
        ("delivery calls the provider", &|span: &SpanData| {
            span.name == "provider_send"
        }),
    ];
    for (what, matches) in &expected {
        eventually(10, what, || async {
            in_trace(track_trace).iter().any(matches).then_some(())
        })
        .await;
    }
    // Each hop is a child of the one before: Track → its handler → segmentation's consume → campaigns'
    // consume → the journey step → deliver → the provider call.
    let spans = in_trace(track_trace);
    let names: Vec<String> = spans.iter().map(describe).collect();
    let find = |what: &str| -> SpanData {
        let (_, matches) = expected.iter().find(|(w, _)| *w == what).unwrap();
        spans
            .iter()
            .find(|s| matches(s))
            .cloned()
            .unwrap_or_else(|| panic!("{what}: not in {names:?}"))
    };
    let track = spans
        .iter()
        .find(|s| s.name == "rpc" && attribute(s, "rpc").is_some_and(|r| r.ends_with("/Track")))
        .cloned()
        .unwrap();
    let handler = spans
        .iter()
        .find(|s| s.name == "track")
        .cloned()
        .unwrap_or_else(|| panic!("the events service's track span: not in {names:?}"));
    let chain = [
        ("the Track call", track),
        ("the events service's track handler", handler),
        ("segmentation", find("segmentation consumes the event")),
        ("campaigns", find("campaigns consumes segment.entered")),
        ("journey step", find("the journey step runs")),
        ("deliver", find("delivery delivers the message")),
        ("provider call", find("delivery calls the provider")),
    ];
    for pair in chain.windows(2) {
        let ((parent_name, parent), (child_name, child)) = (&pair[0], &pair[1]);
        assert_eq!(
            child.parent_span_id,
            parent.span_context.span_id(),
            "{child_name} is a child of {parent_name}; spans in the trace: {names:?}"
        );
    }
    app.stop().await;
}
