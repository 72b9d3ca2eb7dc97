//! The events service against real Postgres and RabbitMQ.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone as _, Utc};
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::{EventBatch, PROFILE_MERGED, ProfileMerged};
use relance_kit::testing::{Tap, TestApp, TestEnv, authed, eventually};
use relance_kit::{ManualClock, SharedClock};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::Code;
use tonic::transport::Channel;

/// The time of the test clock.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 20, 18, 0, 0)
        .single()
        .expect("date")
}

async fn spawn_app() -> TestApp {
    spawn_app_with("").await
}

/// The service with `[events]` settings of the test's own (TOML).
async fn spawn_app_with(events_toml: &str) -> TestApp {
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with_toml(&format!("[events]\n{events_toml}"))
        .expect("events settings");
    let clock: SharedClock = ManualClock::new(now());
    TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| Box::pin(relance_events::serve(platform, server))),
    )
    .await
}

fn event(message_id: &str, name: &str, customer_id: &str) -> pb::Event {
    pb::Event {
        message_id: message_id.into(),
        name: name.into(),
        customer_id: customer_id.into(),
        properties: Some(json_to_struct(
            &serde_json::json!({"revenue": 10.5, "items": [{"product_id": "P1", "quantity": 1}]}),
        )),
        ..Default::default()
    }
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

async fn client(app: &TestApp) -> EventsClient<Channel> {
    EventsClient::new(app.channel().await)
}

async fn query(
    client: &mut EventsClient<Channel>,
    key: &str,
    customer_id: &str,
) -> Vec<pb::StoredEvent> {
    client
        .query(authed(
            key,
            pb::QueryEventsRequest {
                customer: customer(customer_id),
                ..Default::default()
            },
        ))
        .await
        .expect("query")
        .into_inner()
        .events
}

#[tokio::test]
async fn a_retried_track_stores_and_publishes_once() {
    let app = spawn_app().await;
    let mut tap = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, "event.#").await;
    let mut events = client(&app).await;

    let first = events
        .track(authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(event("m-1", "order_completed", "c1")),
            },
        ))
        .await
        .expect("track");
    assert!(!first.get_ref().duplicate);
    let retry = events
        .track(authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(event("m-1", "order_completed", "c1")),
            },
        ))
        .await
        .expect("retry");
    assert!(retry.get_ref().duplicate, "the retry must be recognised");

    let stored = query(&mut events, &app.admin_key, "c1").await;
    assert_eq!(stored.len(), 1);

    let (routing_key, body) = tap.next(10).await.expect("published");
    assert_eq!(routing_key, "event.order_completed");
    let batch: EventBatch = serde_json::from_slice(&body).expect("json");
    assert_eq!(batch.events.len(), 1);
    let message = &batch.events[0];
    assert_eq!(
        (message.message_id.as_str(), message.workspace_id.as_str()),
        ("m-1", app.workspace.as_str())
    );
    assert_eq!(message.properties["revenue"], serde_json::json!(10.5));
    assert!(tap.next(1).await.is_none(), "published exactly once");
    app.stop().await;
}

#[tokio::test]
async fn invalid_events_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let mut events = client(&app).await;
    let cases = [
        (event("a", "Order-Completed", "c1"), "event.name:"),
        (event("b", "app_opened", ""), "event.customer_id:"),
        (
            pb::Event {
                timestamp: Some(chrono_to_timestamp(now() + Duration::days(3))),
                ..event("c", "app_opened", "c1")
            },
            "event.timestamp:",
        ),
        (
            pb::Event {
                customer_id: "x".repeat(129),
                ..event("d", "app_opened", "")
            },
            "event.customer_id:",
        ),
    ];
    for (bad, field) in cases {
        let status = events
            .track(authed(
                &app.ingest_key,
                pb::TrackRequest { event: Some(bad) },
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(field),
            "{} should start with {field}",
            status.message()
        );
    }
    let status = events
        .track(authed(&app.ingest_key, pb::TrackRequest { event: None }))
        .await
        .expect_err("refused");
    assert!(
        status.message().starts_with("event:"),
        "{}",
        status.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_batch_keeps_the_good_events_and_reports_the_bad_by_index() {
    let app = spawn_app().await;
    let mut events = client(&app).await;
    let batch = vec![
        event("b-1", "product_viewed", "c1"),
        event("b-2", "Bad Name", "c1"),
        event("b-3", "cart_updated", "c1"),
        event("b-1", "product_viewed", "c1"),
        pb::Event {
            properties: Some(json_to_struct(
                &serde_json::json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}),
            )),
            ..event("b-4", "app_opened", "c1")
        },
        event("b-5", "order_completed", "c1"),
    ];
    let response = events
        .track_batch(authed(
            &app.ingest_key,
            pb::TrackBatchRequest { events: batch },
        ))
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(response.accepted, 3);
    assert_eq!(response.duplicates, 1);
    let rejected: Vec<(u32, &str)> = response
        .rejected
        .iter()
        .map(|e| (e.index, e.field.as_str()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "events[1].name"),
            (4, "events[4].properties.a.b.c.d.e.f.g.h")
        ]
    );
    assert_eq!(query(&mut events, &app.admin_key, "c1").await.len(), 3);

    let too_many: Vec<_> = (0..1001)
        .map(|i| event(&format!("x-{i}"), "app_opened", "c1"))
        .collect();
    let status = events
        .track_batch(authed(
            &app.ingest_key,
            pb::TrackBatchRequest { events: too_many },
        ))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("events:"),
        "{}",
        status.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn import_streams_chunks_and_counts_across_the_stream() {
    let app = spawn_app().await;
    let mut events = client(&app).await;
    let chunks = vec![
        pb::ImportRequest {
            events: (0..300)
                .map(|i| event(&format!("i-{i}"), "order_completed", &format!("c{}", i % 7)))
                .collect(),
        },
        pb::ImportRequest {
            events: vec![
                event("i-5", "order_completed", "c5"),
                event("bad", "", "c1"),
            ],
        },
        pb::ImportRequest {
            events: (300..400)
                .map(|i| event(&format!("i-{i}"), "order_completed", "c1"))
                .collect(),
        },
    ];
    let request = authed(&app.ingest_key, futures::stream::iter(chunks));
    let summary = events.import(request).await.expect("import").into_inner();
    assert_eq!(
        (
            summary.received,
            summary.accepted,
            summary.duplicates,
            summary.rejected
        ),
        (402, 400, 1, 1)
    );
    assert_eq!(summary.errors[0].index, 301, "indexed across the stream");
    assert_eq!(summary.errors[0].field, "name");
    app.stop().await;
}

#[tokio::test]
async fn calls_without_a_valid_key_are_refused() {
    let app = spawn_app().await;
    let mut events = client(&app).await;
    let status = events
        .track(pb::TrackRequest {
            event: Some(event("u", "app_opened", "c1")),
        })
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = events
        .track(authed(
            "rlk_not-a-key",
            pb::TrackRequest {
                event: Some(event("u", "app_opened", "c1")),
            },
        ))
        .await
        .expect_err("bad key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = events
        .query(authed(
            &app.ingest_key,
            pb::QueryEventsRequest {
                customer: customer("c1"),
                ..Default::default()
            },
        ))
        .await
        .expect_err("ingest key cannot read");
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test]
async fn a_key_of_another_workspace_sees_nothing() {
    let app = spawn_app().await;
    let other = app.other_workspace_key().await;
    let mut events = client(&app).await;
    events
        .track(authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(event("w-1", "order_completed", "c1")),
            },
        ))
        .await
        .expect("track");
    assert!(query(&mut events, &other, "c1").await.is_empty());
    // The same message id in another workspace is a different event.
    let response = events
        .track(authed(
            &other,
            pb::TrackRequest {
                event: Some(event("w-1", "order_completed", "c1")),
            },
        ))
        .await
        .expect("track");
    assert!(!response.get_ref().duplicate);
    assert_eq!(query(&mut events, &other, "c1").await.len(), 1);
    assert_eq!(query(&mut events, &app.admin_key, "c1").await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_merged_visitor_s_events_move_to_the_customer_including_later_ones() {
    let app = spawn_app().await;
    let mut events = client(&app).await;
    let anonymous = |id: &str| pb::Event {
        anonymous_id: "anon-7".into(),
        ..event(id, "product_viewed", "")
    };
    events
        .track(authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(anonymous("before")),
            },
        ))
        .await
        .expect("track");

    let publisher = Publisher::new(app.platform.bus.clone());
    let merged = ProfileMerged {
        workspace_id: app.workspace.clone(),
        anonymous_id: "anon-7".into(),
        customer_id: "c-42".into(),
    };
    let message = Outgoing {
        exchange: EVENTS_EXCHANGE.into(),
        routing_key: PROFILE_MERGED.into(),
        message_id: "merge-1".into(),
        payload: serde_json::to_vec(&merged).expect("json"),
        headers: Default::default(),
    };
    publisher
        .publish_all(std::slice::from_ref(&message))
        .await
        .expect("publish");
    eventually(10, "the anonymous event to be re-attributed", || async {
        let mut events = client(&app).await;
        (query(&mut events, &app.admin_key, "c-42").await.len() == 1).then_some(())
    })
    .await;

    // An event arriving after the merge with only the anonymous id is attributed at once.
    events
        .track(authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(anonymous("after")),
            },
        ))
        .await
        .expect("track");
    assert_eq!(query(&mut events, &app.admin_key, "c-42").await.len(), 2);
    // A redelivered merge changes nothing.
    publisher
        .publish_all(&[message])
        .await
        .expect("publish again");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(query(&mut events, &app.admin_key, "c-42").await.len(), 2);
    app.stop().await;
}

/// Calls that arrive together are written together (one writer here), and each learns its
/// own outcome: an id sent by several concurrent calls is stored once, acknowledged as new to
/// exactly one of them and as a duplicate to the others.
#[tokio::test]
async fn concurrent_calls_are_written_together_and_an_id_is_stored_once() {
    let app = spawn_app_with("writers = 1").await;
    let mut tap = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, "event.#").await;
    let events = client(&app).await;
    let mut calls = Vec::new();
    // 120 calls over 40 ids: each id three times, all in flight at once.
    for call in 0..120 {
        let mut events = events.clone();
        let key = app.ingest_key.clone();
        calls.push(tokio::spawn(async move {
            let id = format!("m-{}", call % 40);
            let answer = events
                .track(authed(
                    &key,
                    pb::TrackRequest {
                        event: Some(event(&id, "product_viewed", &format!("c{}", call % 40))),
                    },
                ))
                .await
                .expect("track");
            (id, answer.into_inner().duplicate)
        }));
    }
    let mut new_of: std::collections::HashMap<String, u32> = Default::default();
    for call in calls {
        let (id, duplicate) = call.await.expect("call");
        let count = new_of.entry(id).or_default();
        if !duplicate {
            *count += 1;
        }
    }
    assert_eq!(new_of.len(), 40);
    assert!(
        new_of.values().all(|new| *new == 1),
        "each id is new to exactly one call: {new_of:?}"
    );
    let mut events = client(&app).await;
    for n in 0..40 {
        let stored = query(&mut events, &app.admin_key, &format!("c{n}")).await;
        assert_eq!(stored.len(), 1, "c{n}'s event is stored once");
    }
    let mut published = std::collections::HashSet::new();
    while published.len() < 40 {
        let (_, body) = tap.next(10).await.expect("published");
        let batch: EventBatch = serde_json::from_slice(&body).expect("json");
        for message in batch.events {
            assert!(
                published.insert(message.message_id.clone()),
                "{} published twice",
                message.message_id
            );
        }
    }
    assert!(tap.next(1).await.is_none(), "nothing more is published");
    app.stop().await;
}

/// When more events wait for the database than the queue holds, a call is refused at once
/// with RESOURCE_EXHAUSTED and none of its events is stored; the calls already queued are
/// written once the database moves again, and the refused call succeeds when retried.
#[tokio::test]
async fn a_full_write_queue_refuses_calls_at_once_and_stores_nothing_of_them() {
    let app = spawn_app_with("writers = 1\nmax_queued_events = 15").await;
    let mut events = client(&app).await;
    let batch = |prefix: &str| pb::TrackBatchRequest {
        events: (0..10)
            .map(|n| event(&format!("{prefix}-{n}"), "product_viewed", prefix))
            .collect(),
    };
    // Someone holds the dedup table: the writer's INSERT waits behind it.
    let pool = sqlx::PgPool::connect(&app.env.database_url())
        .await
        .expect("connect");
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events.event_ids IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");

    let first = tokio::spawn({
        let mut events = events.clone();
        let request = authed(&app.ingest_key, batch("a"));
        async move { events.track_batch(request).await }
    });
    // The writer has taken the first call and waits for the lock.
    eventually(10, "the writer waits for the lock", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        }
    })
    .await;
    // Two more calls of ten: whichever comes first waits in the queue (an empty queue takes
    // any call), the other would make 20 > 15 events and is refused at once.
    let call = |prefix: &'static str| {
        let mut events = events.clone();
        let request = authed(&app.ingest_key, batch(prefix));
        tokio::spawn(async move { (prefix, events.track_batch(request).await) })
    };
    let mut pending = vec![call("b"), call("c")];
    let finished = eventually(10, "one call is refused", || {
        let index = pending.iter().position(|call| call.is_finished());
        async move { index }
    })
    .await;
    let (refused, answer) = pending.remove(finished).await.expect("call");
    let status = answer.expect_err("the call over the queue's bound is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("over capacity"),
        "the refusal says why: {status:?}"
    );
    blocker.rollback().await.expect("unlock");
    let first = first.await.expect("first").expect("first call");
    assert_eq!(first.get_ref().accepted, 10);
    let (queued, answer) = pending.remove(0).await.expect("call");
    assert_eq!(answer.expect("the queued call").get_ref().accepted, 10);
    assert_eq!(query(&mut events, &app.admin_key, queued).await.len(), 10);
    assert!(
        query(&mut events, &app.admin_key, refused).await.is_empty(),
        "nothing of a refused call is stored"
    );
    let retried = events
        .track_batch(authed(&app.ingest_key, batch(refused)))
        .await
        .expect("the retry is taken");
    assert_eq!(retried.get_ref().accepted, 10);
    assert_eq!(query(&mut events, &app.admin_key, refused).await.len(), 10);
    app.stop().await;
}

/// An event whose transaction commits late is published, before the events of transactions
/// that started after it: the relay waits for a writer still running.
#[tokio::test]
async fn an_event_that_commits_late_is_published_and_first() {
    let app = spawn_app().await;
    let mut tap = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, "event.#").await;
    let mut events = client(&app).await;
    let track = |id: &str| {
        authed(
            &app.ingest_key,
            pb::TrackRequest {
                event: Some(event(id, "order_completed", "c1")),
            },
        )
    };
    events.track(track("before")).await.expect("track");
    tap.next(10).await.expect("the first event is published");

    // A writer that has inserted its event and not committed yet, as ingestion does it.
    let pool = sqlx::PgPool::connect(&app.env.database_url())
        .await
        .expect("connect");
    let mut late = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO events.event_ids (id) VALUES (gen_random_uuid())")
        .execute(&mut *late)
        .await
        .expect("dedup id");
    sqlx::query(
        "INSERT INTO events.events (workspace_id, message_id, name, customer_id, ts, received_at, properties, context) \
         VALUES ($1, 'late', 'order_completed', 'c1', $2, $2, '{}', '{}')",
    )
    .bind(&app.workspace)
    .bind(now())
    .execute(&mut *late)
    .await
    .expect("event");

    events.track(track("after")).await.expect("track");
    assert!(
        tap.next(2).await.is_none(),
        "nothing is published past a writer still running"
    );
    late.commit().await.expect("commit");
    let mut published = Vec::new();
    while published.len() < 2 {
        let (_, body) = tap.next(10).await.expect("published");
        let batch: EventBatch = serde_json::from_slice(&body).expect("json");
        published.extend(batch.events.into_iter().map(|e| e.message_id));
    }
    assert_eq!(published, vec!["late", "after"]);
    app.stop().await;
}
