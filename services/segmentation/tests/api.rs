//! Segmentation against real Postgres, RabbitMQ and Redis, with the events and profiles
//! services running beside it (events come in through Track, traits through profiles).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone as _, Utc};
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::{EventBatch, SegmentChanged};
use relance_kit::testing::{Tap, TestApp, TestEnv, authed, eventually, patience};
use relance_kit::{Clock as _, ManualClock, SharedClock};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::segments_client::SegmentsClient;
use relance_proto::v1::{self as pb, customer_ref};
use sqlx::Connection as _;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    app: TestApp,
    clock: Arc<ManualClock>,
    segments: SegmentsClient<Channel>,
    events: EventsClient<Channel>,
    profiles: ProfilesClient<Channel>,
}

fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 9, 30, 0)
        .single()
        .expect("date")
}

async fn spawn_app() -> Harness {
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with(&[
            ("segmentation.sweep_every_ms", "50"),
            ("segmentation.build_poll_ms", "100"),
            ("profiles.rescore_after_purchases_secs", "1"),
        ])
        .expect("settings");
    let clock = ManualClock::new(start_time());
    let shared: SharedClock = clock.clone();
    let app = TestApp::start(
        env,
        settings,
        shared,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_profiles::serve(platform, server).await?;
                relance_events::serve(platform, server).await?;
                relance_segmentation::serve(platform, server).await
            })
        }),
    )
    .await;
    let channel = app.channel().await;
    Harness {
        segments: SegmentsClient::new(channel.clone()),
        events: EventsClient::new(channel.clone()),
        profiles: ProfilesClient::new(channel),
        app,
        clock,
    }
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

impl Harness {
    async fn apply(&mut self, yaml: &str) -> Result<pb::ApplySegmentResponse, tonic::Status> {
        let key = self.app.admin_key.clone();
        self.segments
            .apply(authed(
                &key,
                pb::ApplySegmentRequest {
                    yaml: yaml.into(),
                    dry_run: false,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Applies and waits until the version answers.
    async fn apply_built(&mut self, yaml: &str) -> pb::Segment {
        let applied = self.apply(yaml).await.expect("applied");
        let mut segments = self.segments.clone();
        let key = self.app.admin_key.clone();
        eventually(20, "the segment version is built", || {
            let mut segments = segments.clone();
            let key = key.clone();
            let name = applied.name.clone();
            async move {
                let segment = segments
                    .get(authed(&key, pb::GetSegmentRequest { name, version: 0 }))
                    .await
                    .ok()?
                    .into_inner();
                (segment.status == pb::SegmentStatus::Active as i32
                    && segment.version == applied.version)
                    .then_some(segment)
            }
        })
        .await;
        segments
            .get(authed(
                &key,
                pb::GetSegmentRequest {
                    name: applied.name,
                    version: 0,
                },
            ))
            .await
            .expect("get")
            .into_inner()
    }

    async fn track(
        &mut self,
        message_id: &str,
        who: &str,
        name: &str,
        properties: serde_json::Value,
    ) {
        let key = self.app.ingest_key.clone();
        let event = pb::Event {
            message_id: message_id.into(),
            name: name.into(),
            customer_id: who.into(),
            timestamp: Some(chrono_to_timestamp(self.clock.now())),
            properties: Some(json_to_struct(&properties)),
            ..Default::default()
        };
        self.events
            .track(authed(&key, pb::TrackRequest { event: Some(event) }))
            .await
            .expect("tracked");
    }

    async fn is_member(&mut self, who: &str, name: &str) -> bool {
        let key = self.app.admin_key.clone();
        let response = self
            .segments
            .is_member(authed(
                &key,
                pb::IsSegmentMemberRequest {
                    customer: customer(who),
                    names: vec![name.into()],
                },
            ))
            .await
            .expect("is_member")
            .into_inner();
        response.memberships[0].member
    }

    async fn wait_member(&mut self, who: &str, name: &str, expected: bool) {
        let deadline = Instant::now() + patience(10);
        while self.is_member(who, name).await != expected {
            assert!(
                Instant::now() < deadline,
                "{who} should {}be in {name}",
                if expected { "" } else { "not " }
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `selectors` aggregates of a person exist (their events were applied).
    async fn wait_applied(&self, person: &str, selectors: i64) {
        let mut db = sqlx::PgConnection::connect(&self.app.env.database_url())
            .await
            .expect("db");
        let deadline = Instant::now() + patience(10);
        loop {
            let found: i64 =
                sqlx::query_scalar("SELECT count(*) FROM segments.aggregates WHERE person = $1")
                    .bind(person)
                    .fetch_one(&mut db)
                    .await
                    .expect("aggregates");
            if found >= selectors {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{person}'s events were not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a segment counts `expected` members.
    async fn wait_count(&mut self, name: &str, expected: u64) {
        let deadline = Instant::now() + patience(10);
        loop {
            let (version, count) = self.count(name).await;
            if count == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} (version {version}) still counts {count}, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn count(&mut self, name: &str) -> (u32, u64) {
        let key = self.app.admin_key.clone();
        let count = self
            .segments
            .count(authed(&key, pb::CountSegmentRequest { name: name.into() }))
            .await
            .expect("count")
            .into_inner();
        (count.version, count.count)
    }
}

async fn next_change(tap: &mut Tap, seconds: u64) -> Option<(String, SegmentChanged)> {
    let (key, body) = tap.next(seconds).await?;
    Some((
        key,
        serde_json::from_slice(&body).expect("a SegmentChanged"),
    ))
}

const BIG_SPENDERS: &str = "kind: Segment
name: big-spenders
where:
  event: order_completed
  within: 30d
  sum: { property: revenue, gte: 100 }
";

const TWO_ORDERS: &str = "kind: Segment
name: two-orders
where:
  event: order_completed
  count: 2
";

#[tokio::test]
async fn a_qualifying_track_enters_within_a_second_and_a_redelivery_changes_nothing() {
    let mut h = spawn_app().await;
    h.apply_built(BIG_SPENDERS).await;
    h.apply_built(TWO_ORDERS).await;
    let mut tap = Tap::bind(&h.app.platform.bus, EVENTS_EXCHANGE, "segment.*").await;
    let mut raw = Tap::bind(
        &h.app.platform.bus,
        EVENTS_EXCHANGE,
        "event.order_completed",
    )
    .await;

    h.track(
        "o-1",
        "alice",
        "order_completed",
        serde_json::json!({"revenue": 60}),
    )
    .await;
    // One order of 60: neither a big spender nor two orders.
    h.wait_applied("c:alice", 2).await;
    assert!(
        next_change(&mut tap, 1).await.is_none(),
        "entered too early"
    );

    let acknowledged = Instant::now();
    h.track(
        "o-2",
        "alice",
        "order_completed",
        serde_json::json!({"revenue": 50}),
    )
    .await;
    let mut entered = Vec::new();
    while entered.len() < 2 {
        let (key, change) = next_change(&mut tap, 5)
            .await
            .expect("segment.entered published");
        assert_eq!(key, "segment.entered");
        entered.push(change);
    }
    let latency = acknowledged.elapsed();
    assert!(
        latency < Duration::from_secs(1),
        "entered {latency:?} after the Track was acknowledged"
    );
    let mut names: Vec<&str> = entered.iter().map(|c| c.segment.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["big-spenders", "two-orders"]);
    for change in &entered {
        assert_eq!(change.customer_id.as_deref(), Some("alice"));
        assert_eq!(change.version, 1);
        assert_eq!(change.cause, "event");
        assert_eq!(change.reason_at, start_time());
    }
    assert!(h.is_member("alice", "big-spenders").await);

    // Redeliver both event batches as the broker would after a lost ack.
    let publisher = Publisher::new(h.app.platform.bus.clone());
    for _ in 0..2 {
        let (routing_key, body) = raw.next(5).await.expect("the event batch");
        let batch: EventBatch = serde_json::from_slice(&body).expect("batch");
        publisher
            .publish_all(&[Outgoing {
                exchange: EVENTS_EXCHANGE.into(),
                routing_key,
                message_id: batch.bus_id(),
                payload: body,
                headers: Default::default(),
            }])
            .await
            .expect("republished");
    }
    assert!(
        next_change(&mut tap, 2).await.is_none(),
        "a redelivery announced a change"
    );
    // Counted once: with the events doubled, `count: 2` would no longer hold.
    assert!(h.is_member("alice", "two-orders").await);
    assert_eq!(h.count("two-orders").await, (1, 1));
    h.app.stop().await;
}

#[tokio::test]
async fn time_alone_moves_a_customer_at_the_window_boundary() {
    let mut h = spawn_app().await;
    h.apply_built(
        "kind: Segment
name: lapsed-2d
where:
  all:
    - event: order_completed
    - not:
        event: order_completed
        within: 2d
",
    )
    .await;
    let mut tap = Tap::bind(&h.app.platform.bus, EVENTS_EXCHANGE, "segment.*").await;
    h.track(
        "o-1",
        "bob",
        "order_completed",
        serde_json::json!({"revenue": 10}),
    )
    .await;
    // Ordered on March 10: inside `within: 2d` through March 12; lapsed from March 13, 00:00.
    let boundary = Utc
        .with_ymd_and_hms(2026, 3, 13, 0, 0, 0)
        .single()
        .expect("date");
    h.wait_applied("c:bob", 1).await;
    assert!(!h.is_member("bob", "lapsed-2d").await);

    h.clock.set(boundary - chrono::Duration::seconds(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !h.is_member("bob", "lapsed-2d").await,
        "lapsed a second early"
    );
    assert!(next_change(&mut tap, 1).await.is_none());

    h.clock.set(boundary + chrono::Duration::seconds(1));
    let (key, change) = next_change(&mut tap, 5)
        .await
        .expect("entered by the sweeper");
    assert_eq!(key, "segment.entered");
    assert_eq!(change.cause, "time");
    assert_eq!(change.reason_at, boundary);
    assert!(h.is_member("bob", "lapsed-2d").await);

    // A new order takes them out at once; the next boundary is two days later again.
    h.track(
        "o-2",
        "bob",
        "order_completed",
        serde_json::json!({"revenue": 10}),
    )
    .await;
    let (key, change) = next_change(&mut tap, 5).await.expect("exited on the order");
    assert_eq!(
        (key.as_str(), change.cause.as_str()),
        ("segment.exited", "event")
    );
    h.app.stop().await;
}

#[tokio::test]
async fn nested_all_any_not_and_in_segment_evaluate_together() {
    let mut h = spawn_app().await;
    h.apply_built("kind: Segment\nname: buyers\nwhere:\n  event: order_completed\n")
        .await;
    // Decided for newcomers too, though what brings them (a profile, a view) is not an order.
    h.apply_built(
        "kind: Segment\nname: never-ordered\nwhere:\n  not:\n    event: order_completed\n",
    )
    .await;
    h.apply_built(
        "kind: Segment
name: maghreb-buyers
where:
  all:
    - in_segment: buyers
    - any:
        - attribute: country
          in: [DZ, MA, TN]
        - attribute: city
          starts_with: Alg
    - not:
        attribute: staff
        eq: true
",
    )
    .await;
    let key = h.app.admin_key.clone();
    for (id, attributes) in [
        ("dz-buyer", serde_json::json!({"country": "DZ"})),
        (
            "algiers-buyer",
            serde_json::json!({"country": "FR", "city": "Alger"}),
        ),
        (
            "fr-buyer",
            serde_json::json!({"country": "FR", "city": "Paris"}),
        ),
        (
            "dz-staff",
            serde_json::json!({"country": "DZ", "staff": true}),
        ),
        ("dz-browser", serde_json::json!({"country": "DZ"})),
    ] {
        h.profiles
            .upsert(authed(
                &key,
                pb::UpsertProfileRequest {
                    customer: customer(id),
                    attributes: Some(json_to_struct(&attributes)),
                    ..Default::default()
                },
            ))
            .await
            .expect("upsert");
        if id != "dz-browser" {
            h.track(
                &format!("order-{id}"),
                id,
                "order_completed",
                serde_json::json!({"revenue": 20}),
            )
            .await;
        }
    }
    h.wait_member("dz-buyer", "maghreb-buyers", true).await;
    h.wait_member("algiers-buyer", "maghreb-buyers", true).await;
    h.wait_member("fr-buyer", "buyers", true).await;
    h.wait_member("dz-staff", "buyers", true).await;
    assert!(!h.is_member("fr-buyer", "maghreb-buyers").await);
    assert!(!h.is_member("dz-staff", "maghreb-buyers").await);
    assert!(!h.is_member("dz-browser", "maghreb-buyers").await);
    h.wait_member("dz-browser", "never-ordered", true).await;
    assert!(!h.is_member("dz-buyer", "never-ordered").await);
    h.track(
        "view-1",
        "window-shopper",
        "product_viewed",
        serde_json::json!({}),
    )
    .await;
    h.wait_member("window-shopper", "never-ordered", true).await;
    h.track(
        "order-ws",
        "window-shopper",
        "order_completed",
        serde_json::json!({"revenue": 5}),
    )
    .await;
    h.wait_member("window-shopper", "never-ordered", false)
        .await;
    assert_eq!(h.count("maghreb-buyers").await.1, 2);

    // A profile change alone moves membership.
    h.profiles
        .upsert(authed(
            &key,
            pb::UpsertProfileRequest {
                customer: customer("dz-staff"),
                attributes: Some(json_to_struct(&serde_json::json!({"staff": false}))),
                ..Default::default()
            },
        ))
        .await
        .expect("upsert");
    h.wait_member("dz-staff", "maghreb-buyers", true).await;

    // Cycles are refused, naming the path of the reference.
    let cycle = h
        .apply("kind: Segment\nname: buyers\nwhere:\n  all:\n    - event: order_completed\n    - in_segment: maghreb-buyers\n")
        .await
        .expect_err("a cycle");
    assert_eq!(cycle.code(), Code::InvalidArgument);
    assert!(cycle.message().starts_with("where.all[1].in_segment: segments may not refer to each other in a cycle: buyers → maghreb-buyers → buyers"), "{}", cycle.message());
    // And a segment in use cannot be archived.
    let archived = h
        .segments
        .archive(authed(
            &key,
            pb::ArchiveSegmentRequest {
                name: "buyers".into(),
            },
        ))
        .await
        .expect_err("in use");
    assert_eq!(archived.code(), Code::FailedPrecondition);
    h.app.stop().await;
}

#[tokio::test]
async fn invalid_definitions_are_refused_with_the_path_named() {
    let mut h = spawn_app().await;
    let bad = "kind: Segment
name: broken
where:
  all:
    - trait: orders_count
      gte: 1
    - event: { name: order_completed, within: 30x }
    - event: order_completed
      between: [30d, 90d]
    - attribute: country
      like: DZ
    - in_segment: nowhere
";
    let refused = h.apply(bad).await.expect_err("invalid");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let lines: Vec<&str> = refused.message().lines().collect();
    assert_eq!(lines.len(), 3, "{}", refused.message());
    assert!(
        lines[0].starts_with("where.all[1].event.within: \"30x\" is not a duration"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("where.all[2].between: impossible window"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("where.all[3].like: unknown operator"),
        "{}",
        lines[2]
    );

    // dry_run: the same problems in the response, with positions; nothing stored.
    let key = h.app.admin_key.clone();
    let dry = h
        .segments
        .apply(authed(
            &key,
            pb::ApplySegmentRequest {
                yaml: bad.into(),
                dry_run: true,
            },
        ))
        .await
        .expect("dry run answers")
        .into_inner();
    assert_eq!(dry.name, "broken");
    assert_eq!(dry.errors.len(), 3);
    assert_eq!((dry.errors[0].line, dry.errors[0].column), (7, 47));

    // Once the syntax is right, the reference is checked.
    let unknown = h
        .apply("kind: Segment\nname: broken\nwhere:\n  in_segment: nowhere\n")
        .await
        .expect_err("unknown segment");
    assert_eq!(
        unknown.message(),
        "where.in_segment: no active segment named \"nowhere\" in this workspace (line 4, column 15)"
    );
    let missing = h
        .segments
        .get(authed(
            &key,
            pb::GetSegmentRequest {
                name: "broken".into(),
                version: 0,
            },
        ))
        .await
        .expect_err("nothing stored");
    assert_eq!(missing.code(), Code::NotFound);
    h.app.stop().await;
}

#[tokio::test]
async fn a_changed_definition_switches_versions_without_a_moment_of_missing_members() {
    let mut h = spawn_app().await;
    let key = h.app.admin_key.clone();
    let ingest = h.app.ingest_key.clone();
    let mut batch = Vec::new();
    for i in 0..300 {
        batch.push(pb::Event {
            message_id: format!("order-{i}"),
            name: "order_completed".into(),
            customer_id: format!("c{i:03}"),
            timestamp: Some(chrono_to_timestamp(start_time())),
            properties: Some(json_to_struct(&serde_json::json!({"revenue": i}))),
            ..Default::default()
        });
    }
    h.events
        .track_batch(authed(&ingest, pb::TrackBatchRequest { events: batch }))
        .await
        .expect("batch");
    let v1 = "kind: Segment\nname: buyers\nwhere:\n  event: order_completed\n";
    h.apply_built(v1).await;
    h.wait_count("buyers", 300).await;
    let mut tap = Tap::bind(&h.app.platform.bus, EVENTS_EXCHANGE, "segment.*").await;

    // v2 keeps everyone and adds a window: membership must never dip while it builds.
    let v2 = "kind: Segment\nname: buyers\ndescription: v2\nwhere:\n  event: order_completed\n  within: 3650d\n";
    let applied = h.apply(v2).await.expect("v2");
    assert_eq!((applied.version, applied.changed), (2, true));
    let mut seen_versions = Vec::new();
    loop {
        let (version, count) = h.count("buyers").await;
        assert_eq!(
            count, 300,
            "version {version} answered with {count} members"
        );
        assert!(
            h.is_member("c042", "buyers").await,
            "c042 missing during the switch"
        );
        if !seen_versions.contains(&version) {
            seen_versions.push(version);
        }
        if version == 2 {
            break;
        }
    }
    assert_eq!(seen_versions.last(), Some(&2));
    // Customers whose event was applied just as version 1 went live entered it in real
    // time, announced a moment later by the outbox; the definition change moved nobody.
    while let Some((key, change)) = next_change(&mut tap, 1).await {
        assert_eq!(
            (key.as_str(), change.version, change.cause.as_str()),
            ("segment.entered", 1, "event"),
            "only version 1's real-time entries may be announced: {change:?}"
        );
    }

    // v3 drops the small orders: they leave, announced with the definition as cause.
    let v3 = "kind: Segment\nname: buyers\nwhere:\n  event: order_completed\n  sum: { property: revenue, gte: 290 }\n";
    h.apply_built(v3).await;
    assert_eq!(h.count("buyers").await, (3, 10));
    let mut exits = 0;
    while let Some((key, change)) = next_change(&mut tap, 2).await {
        if change.version == 1 {
            continue;
        }
        assert_eq!(
            (key.as_str(), change.cause.as_str(), change.version),
            ("segment.exited", "definition", 3)
        );
        exits += 1;
    }
    assert_eq!(exits, 290);
    let identical = h.apply(v3).await.expect("same document");
    assert_eq!((identical.version, identical.changed), (3, false));
    // Older versions stay readable.
    let first = h
        .segments
        .get(authed(
            &key,
            pb::GetSegmentRequest {
                name: "buyers".into(),
                version: 1,
            },
        ))
        .await
        .expect("v1")
        .into_inner();
    assert_eq!(
        (first.version, first.latest_version, first.yaml.as_str()),
        (1, 3, v1)
    );
    h.app.stop().await;
}

#[tokio::test]
async fn workspaces_are_isolated() {
    let mut h = spawn_app().await;
    h.apply_built(BIG_SPENDERS).await;
    let other = h.app.other_workspace_key().await;
    let missing = h
        .segments
        .get(authed(
            &other,
            pb::GetSegmentRequest {
                name: "big-spenders".into(),
                version: 0,
            },
        ))
        .await
        .expect_err("invisible to another workspace");
    assert_eq!(missing.code(), Code::NotFound);
    let applied = h
        .segments
        .apply(authed(
            &other,
            pb::ApplySegmentRequest {
                yaml: BIG_SPENDERS.into(),
                dry_run: false,
            },
        ))
        .await
        .expect("same name elsewhere")
        .into_inner();
    assert_eq!(applied.version, 1);
    h.track(
        "o-1",
        "carol",
        "order_completed",
        serde_json::json!({"revenue": 500}),
    )
    .await;
    h.wait_member("carol", "big-spenders", true).await;
    let theirs = eventually(10, "the other workspace's version is built", || {
        let mut s = h.segments.clone();
        let other = other.clone();
        async move {
            let m = s
                .is_member(authed(
                    &other,
                    pb::IsSegmentMemberRequest {
                        customer: customer("carol"),
                        names: vec!["big-spenders".into()],
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (m.memberships[0].version == 1).then_some(m)
        }
    })
    .await;
    assert!(
        !theirs.memberships[0].member,
        "carol's order leaked into another workspace"
    );
    h.app.stop().await;
}

#[tokio::test]
async fn members_stream_in_pages_preview_samples_and_redis_loss_costs_only_speed() {
    let mut h = spawn_app().await;
    let key = h.app.admin_key.clone();
    let ingest = h.app.ingest_key.clone();
    let mut batch = Vec::new();
    for i in 0..250 {
        batch.push(pb::Event {
            message_id: format!("view-{i}"),
            name: if i % 2 == 0 {
                "order_completed"
            } else {
                "product_viewed"
            }
            .into(),
            customer_id: format!("c{i:03}"),
            timestamp: Some(chrono_to_timestamp(start_time())),
            ..Default::default()
        });
    }
    h.events
        .track_batch(authed(&ingest, pb::TrackBatchRequest { events: batch }))
        .await
        .expect("batch");
    let yaml = "kind: Segment\nname: buyers\nwhere:\n  event: order_completed\n";
    // Preview before applying: computed from the event log, nothing stored.
    let preview = eventually(10, "the events reached the log", || {
        let mut s = h.segments.clone();
        let key = key.clone();
        async move {
            let p = s
                .preview(authed(
                    &key,
                    pb::PreviewSegmentRequest {
                        yaml: yaml.into(),
                        sample_size: 5,
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (p.population == 250).then_some(p)
        }
    })
    .await;
    assert_eq!(preview.count, 125);
    assert_eq!(preview.sample.len(), 5);
    h.apply_built(yaml).await;
    h.wait_count("buyers", 125).await;
    let mut stream = h
        .segments
        .list_members(authed(
            &key,
            pb::ListSegmentMembersRequest {
                name: "buyers".into(),
                page_size: 50,
                ..Default::default()
            },
        ))
        .await
        .expect("stream")
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await.expect("page") {
        pages.push(page);
    }
    assert_eq!(
        pages.iter().map(|p| p.members.len()).collect::<Vec<_>>(),
        vec![50, 50, 25]
    );
    let resumed = h
        .segments
        .list_members(authed(
            &key,
            pb::ListSegmentMembersRequest {
                name: "buyers".into(),
                page_size: 50,
                page_token: pages[1].next_page_token.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("resume")
        .into_inner()
        .message()
        .await
        .expect("page")
        .expect("a page");
    assert_eq!(resumed.members, pages[2].members);

    // Flush Redis: answers stay right (from Postgres), and a change still lands.
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("t-{}:*", h.app.env.id))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert!(!keys.is_empty(), "the mirror was loaded");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .expect("del");
    assert!(h.is_member("c000", "buyers").await);
    assert!(!h.is_member("c001", "buyers").await);
    h.track("late", "c001", "order_completed", serde_json::json!({}))
        .await;
    h.wait_member("c001", "buyers", true).await;

    // Erasure removes the customer from every segment.
    let mut db = sqlx::PgConnection::connect(&h.app.env.database_url())
        .await
        .expect("db");
    h.profiles
        .delete(authed(
            &key,
            pb::DeleteProfileRequest {
                customer: customer("c000"),
            },
        ))
        .await
        .expect("deleted");
    h.wait_member("c000", "buyers", false).await;
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM segments.aggregates WHERE person = 'c:c000'")
            .fetch_one(&mut db)
            .await
            .expect("count");
    assert_eq!(left, 0);
    h.app.stop().await;
}
