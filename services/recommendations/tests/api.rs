//! Recommendations against real Postgres, RabbitMQ and Redis, with the events service
//! beside it: orders come in through Track, training reads them from the event log, the
//! history follows the event stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Duration, TimeZone as _, Utc};
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::{EventBatch, EventMessage};
use relance_kit::testing::{TestApp, TestEnv, authed, eventually};
use relance_kit::{ManualClock, SharedClock};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::recommendations_client::RecommendationsClient;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    app: TestApp,
    reco: RecommendationsClient<Channel>,
    events: EventsClient<Channel>,
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 4, 12, 0, 0)
        .single()
        .expect("date")
}

async fn spawn_app() -> Harness {
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with(&[
            ("recommendations.refresh_ms", "100"),
            ("recommendations.train_every_hours", "0"),
            ("recommendations.impression_sample_rate", "1"),
        ])
        .expect("settings");
    let clock: SharedClock = ManualClock::new(now());
    let app = TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| {
            Box::pin(async move {
                relance_events::serve(platform, server).await?;
                relance_recommendations::serve(platform, server).await
            })
        }),
    )
    .await;
    let channel = app.channel().await;
    Harness {
        reco: RecommendationsClient::new(channel.clone()),
        events: EventsClient::new(channel),
        app,
    }
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn item(id: &str, category: &[&str], price: f64) -> pb::CatalogItem {
    pb::CatalogItem {
        id: id.into(),
        title: format!("Item {id}"),
        category_path: category.iter().map(|c| c.to_string()).collect(),
        price,
        currency: "EUR".into(),
        in_stock: true,
        ..Default::default()
    }
}

fn order(customer: &str, number: u32, items: &[&str], at: DateTime<Utc>) -> pb::Event {
    let lines: Vec<serde_json::Value> = items
        .iter()
        .map(|i| serde_json::json!({ "product_id": i, "quantity": 1, "price": 5.0 }))
        .collect();
    pb::Event {
        message_id: format!("order-{customer}-{number}"),
        name: "order_completed".into(),
        customer_id: customer.into(),
        timestamp: Some(chrono_to_timestamp(at)),
        properties: Some(json_to_struct(
            &serde_json::json!({ "items": lines, "revenue": 10.0 }),
        )),
        ..Default::default()
    }
}

impl Harness {
    fn key(&self) -> String {
        self.app.admin_key.clone()
    }

    async fn upsert(&mut self, items: Vec<pb::CatalogItem>) -> pb::UpsertItemsResponse {
        let key = self.key();
        self.reco
            .upsert_items(authed(&key, pb::UpsertItemsRequest { items }))
            .await
            .expect("upsert")
            .into_inner()
    }

    async fn track(&mut self, events: Vec<pb::Event>) {
        let key = self.key();
        let response = self
            .events
            .track_batch(authed(&key, pb::TrackBatchRequest { events }))
            .await
            .expect("track")
            .into_inner();
        assert!(response.rejected.is_empty(), "{:?}", response.rejected);
    }

    async fn train(&mut self) -> pb::TrainResponse {
        let key = self.key();
        self.reco
            .train(authed(&key, pb::TrainRequest::default()))
            .await
            .expect("train")
            .into_inner()
    }

    async fn recommend(
        &mut self,
        request: pb::RecommendRequest,
    ) -> Result<pb::RecommendResponse, tonic::Status> {
        let key = self.key();
        self.reco
            .recommend(authed(&key, request))
            .await
            .map(|r| r.into_inner())
    }

    /// A shop: mugs m0..m9 (Kitchen > Mugs), toys t0..t9 (Kids > Toys), a tea tin bought
    /// again and again (replenishable in the catalog). Forty customers: each buys a pair of
    /// neighbouring mugs, then a pair of neighbouring toys; c-tea buys tea every week.
    async fn shop(&mut self) {
        let mut items = Vec::new();
        for i in 0..10 {
            items.push(item(&format!("m{i}"), &["Kitchen", "Mugs"], 5.0 + i as f64));
            items.push(item(&format!("t{i}"), &["Kids", "Toys"], 20.0 + i as f64));
        }
        let mut tea = item("tea", &["Grocery", "Tea"], 3.0);
        tea.replenishable = true;
        items.push(tea);
        let accepted = self.upsert(items).await;
        assert_eq!(accepted.accepted, 21);
        let mut events = Vec::new();
        for c in 0..40u32 {
            let id = format!("c{c}");
            let m = c % 9;
            let t = c % 9;
            let at = now() - Duration::days(20) + Duration::hours(c as i64);
            events.push(order(
                &id,
                1,
                &[&format!("m{m}"), &format!("m{}", m + 1)],
                at,
            ));
            events.push(order(
                &id,
                2,
                &[&format!("t{t}"), &format!("t{}", t + 1)],
                at + Duration::days(2),
            ));
        }
        for week in 0..4 {
            events.push(order(
                "c-tea",
                week,
                &["tea"],
                now() - Duration::days(7 * (week as i64 + 1)),
            ));
        }
        self.track(events).await;
        // The event log must hold them before training reads it.
        let pool = relance_kit::db::connect(&self.app.platform.settings, "events")
            .await
            .expect("pool");
        eventually(10, "orders stored", || {
            let pool = pool.clone();
            async move {
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (count == 84).then_some(())
            }
        })
        .await;
        // And the customers' histories must be in Redis (the consumer follows the stream).
        let redis = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
        let redis = redis
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let prefix = format!(
            "{}{}:reco:h:c:",
            self.app.platform.settings.redis_prefix, self.app.workspace
        );
        eventually(10, "histories recorded", || {
            let mut redis = redis.clone();
            let prefix = prefix.clone();
            async move {
                for c in 0..40 {
                    let count: i64 = redis::cmd("ZCARD")
                        .arg(format!("{prefix}c{c}"))
                        .query_async(&mut redis)
                        .await
                        .ok()?;
                    if count < 4 {
                        return None;
                    }
                }
                let tea: i64 = redis::cmd("ZCARD")
                    .arg(format!("{prefix}c-tea"))
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                (tea == 4).then_some(())
            }
        })
        .await;
    }
}

fn ids(response: &pb::RecommendResponse) -> Vec<String> {
    response.items.iter().map(|i| i.item_id.clone()).collect()
}

fn reason(item: &pb::RecommendedItem) -> pb::RecommendationReason {
    pb::RecommendationReason::try_from(item.reason).expect("reason")
}

#[tokio::test]
async fn the_fallback_chain_always_answers() {
    let mut h = spawn_app().await;
    // Nothing at all: an empty answer, not an error.
    let empty = h
        .recommend(pb::RecommendRequest {
            customer: customer("new"),
            placement: pb::Placement::Home as i32,
            ..Default::default()
        })
        .await
        .expect("nothing known");
    assert!(empty.items.is_empty());
    assert_eq!(empty.model_version, 0);

    // A catalog but no model: newest items, as fallback.
    let mut old = item("old", &["Home"], 1.0);
    old.created_at = Some(chrono_to_timestamp(now() - Duration::days(30)));
    let mut newest = item("newest", &["Home"], 1.0);
    newest.created_at = Some(chrono_to_timestamp(now() - Duration::days(1)));
    h.upsert(vec![old, newest]).await;
    let answer = h
        .recommend(pb::RecommendRequest {
            customer: customer("new"),
            placement: pb::Placement::Cart as i32,
            context_item_ids: vec!["unknown-item".into()],
            ..Default::default()
        })
        .await
        .expect("catalog only");
    assert_eq!(ids(&answer), vec!["newest", "old"]);
    assert!(
        answer
            .items
            .iter()
            .all(|i| reason(i) == pb::RecommendationReason::Fallback)
    );

    // A model: a customer never seen gets trending and popular items; an unknown item in
    // view changes nothing.
    h.shop().await;
    let trained = h.train().await;
    assert!(trained.activated);
    let model = trained.model.expect("model");
    assert_eq!(model.customer_count, 41);
    let answer = h
        .recommend(pb::RecommendRequest {
            customer: customer("never-seen"),
            placement: pb::Placement::Home as i32,
            context_item_ids: vec!["no-such-item".into()],
            n: 5,
            seed: Some(7),
            ..Default::default()
        })
        .await
        .expect("new customer");
    assert_eq!(answer.items.len(), 5);
    assert_eq!(answer.model_version, model.version);
    for item in &answer.items {
        assert!(matches!(
            reason(item),
            pb::RecommendationReason::Trending
                | pb::RecommendationReason::Fallback
                | pb::RecommendationReason::Explore
        ));
    }
    // A visitor with no id at all, and SimilarItems of an unknown item.
    let visitor = h
        .recommend(pb::RecommendRequest {
            placement: pb::Placement::Home as i32,
            ..Default::default()
        })
        .await
        .expect("no id");
    assert_eq!(visitor.items.len(), 5);
    let key = h.key();
    let similar = h
        .reco
        .similar_items(authed(
            &key,
            pb::SimilarItemsRequest {
                item_id: "no-such-item".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("similar")
        .into_inner();
    assert_eq!(similar.items.len(), 5);
    h.app.stop().await;
}

#[tokio::test]
async fn context_history_filters_and_business_rules() {
    let mut h = spawn_app().await;
    h.shop().await;
    h.train().await;

    // The cart holds m3: its partners (m2, m4) come first, bought together, because of m3.
    let cart = h
        .recommend(pb::RecommendRequest {
            customer: customer("never-seen"),
            placement: pb::Placement::Cart as i32,
            context_item_ids: vec!["m3".into()],
            n: 2,
            seed: Some(1),
            filter: Some(pb::RecommendationFilter {
                max_per_category: 5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("cart");
    // (The second slot may go to trending or exploration: the blend's shares are drawn.)
    assert!(
        ["m2", "m4"].contains(&cart.items[0].item_id.as_str()),
        "{cart:?}"
    );
    assert_eq!(
        reason(&cart.items[0]),
        pb::RecommendationReason::BoughtTogether
    );
    assert_eq!(cart.items[0].because_item_id, "m3");
    assert!(
        !ids(&cart).contains(&"m3".to_string()),
        "context items are never recommended"
    );

    // c3 bought m3, m4, t3, t4: the personal model proposes their neighbours, never what
    // c3 already has (not replenishable), at most 2 per category by default (five items
    // fit within the cap: two mugs, two toys, the tea; a sixth would relax it).
    let personal = h
        .recommend(pb::RecommendRequest {
            customer: customer("c3"),
            placement: pb::Placement::Email as i32,
            n: 5,
            seed: Some(3),
            ..Default::default()
        })
        .await
        .expect("personal");
    let got = ids(&personal);
    for owned in ["m3", "m4", "t3", "t4"] {
        assert!(
            !got.contains(&owned.to_string()),
            "{owned} already bought: {got:?}"
        );
    }
    assert!(
        personal
            .items
            .iter()
            .any(|i| reason(i) == pb::RecommendationReason::Personal),
        "{personal:?}"
    );
    let mugs = got.iter().filter(|i| i.starts_with('m')).count();
    let toys = got
        .iter()
        .filter(|i| i.starts_with('t') && *i != "tea")
        .count();
    assert!(mugs <= 2 && toys <= 2, "{got:?}");

    // Replenishable tea comes back for its buyer.
    let tea = h
        .recommend(pb::RecommendRequest {
            customer: customer("c-tea"),
            placement: pb::Placement::Home as i32,
            n: 3,
            seed: Some(5),
            ..Default::default()
        })
        .await
        .expect("tea");
    assert!(ids(&tea).contains(&"tea".to_string()), "{tea:?}");

    // Filters: category, price range, exclusions; out-of-stock items dropped.
    let mut sold_out = item("t5", &["Kids", "Toys"], 25.0);
    sold_out.stock = Some(0);
    sold_out.in_stock = true;
    h.upsert(vec![sold_out]).await;
    let filtered = h
        .recommend(pb::RecommendRequest {
            customer: customer("c3"),
            placement: pb::Placement::Category as i32,
            n: 10,
            seed: Some(2),
            filter: Some(pb::RecommendationFilter {
                categories: vec!["Kids > Toys".into()],
                min_price: Some(21.0),
                max_price: Some(28.0),
                exclude_item_ids: vec!["t6".into()],
                max_per_category: 10,
                in_stock_only: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("filtered");
    let got: HashSet<String> = ids(&filtered).into_iter().collect();
    // Toys priced 21–28: t1..t8; minus t3, t4 (bought), t5 (sold out), t6 (excluded).
    let expected: HashSet<String> = ["t1", "t2", "t7", "t8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, expected);

    // Deleted items are never recommended, even by the loaded model.
    let key = h.key();
    h.reco
        .delete_items(authed(
            &key,
            pb::DeleteItemsRequest {
                ids: vec!["m2".into(), "m4".into()],
            },
        ))
        .await
        .expect("delete");
    let cart = h
        .recommend(pb::RecommendRequest {
            placement: pb::Placement::Cart as i32,
            context_item_ids: vec!["m3".into()],
            n: 10,
            ..Default::default()
        })
        .await
        .expect("cart");
    assert!(
        !ids(&cart).iter().any(|i| i == "m2" || i == "m4"),
        "{cart:?}"
    );

    // Details on request; every answer logged (sample rate 1 in this test).
    let detailed = h
        .recommend(pb::RecommendRequest {
            placement: pb::Placement::Product as i32,
            context_item_ids: vec!["t1".into()],
            include_details: true,
            ..Default::default()
        })
        .await
        .expect("details");
    assert!(detailed.logged);
    let first = detailed.items[0].item.as_ref().expect("details");
    assert_eq!(first.id, detailed.items[0].item_id);
    assert!(first.title.starts_with("Item "));
    let pool = relance_kit::db::connect(&h.app.platform.settings, "recommendations")
        .await
        .expect("pool");
    let id = detailed.recommendation_id.clone();
    eventually(5, "impression written", || {
        let pool = pool.clone();
        let id = id.clone();
        async move {
            let found: Option<String> = sqlx::query_scalar(
                "SELECT placement FROM impressions WHERE recommendation_id = $1::uuid",
            )
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .ok()?;
            found
        }
    })
    .await;
    h.app.stop().await;
}

#[tokio::test]
async fn history_follows_events_and_redelivery_changes_nothing() {
    let mut h = spawn_app().await;
    h.shop().await;
    h.train().await;
    let before = h
        .recommend(pb::RecommendRequest {
            customer: customer("newcomer"),
            placement: pb::Placement::Home as i32,
            n: 4,
            seed: Some(11),
            ..Default::default()
        })
        .await
        .expect("recommend");
    assert!(
        !before
            .items
            .iter()
            .any(|i| reason(i) == pb::RecommendationReason::Personal)
    );
    // The newcomer views m6: the next answer is personal, because of m6.
    let view = pb::Event {
        message_id: "view-1".into(),
        name: "product_viewed".into(),
        customer_id: "newcomer".into(),
        timestamp: Some(chrono_to_timestamp(now())),
        properties: Some(json_to_struct(&serde_json::json!({ "product_id": "m6" }))),
        ..Default::default()
    };
    h.track(vec![view]).await;
    let after = eventually(10, "the view changes the answer", || {
        let mut request_h = h.reco.clone();
        let key = h.key();
        async move {
            let answer = request_h
                .recommend(authed(
                    &key,
                    pb::RecommendRequest {
                        customer: customer("newcomer"),
                        placement: pb::Placement::Home as i32,
                        n: 4,
                        seed: Some(11),
                        ..Default::default()
                    },
                ))
                .await
                .ok()?
                .into_inner();
            answer
                .items
                .iter()
                .any(|i| i.because_item_id == "m6")
                .then_some(answer)
        }
    })
    .await;
    assert_ne!(ids(&before), ids(&after));

    // The same event published again (a redelivery) leaves the history as it was.
    let redis = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut redis = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!(
        "{}{}:reco:h:c:newcomer",
        h.app.platform.settings.redis_prefix, h.app.workspace
    );
    let before_count: i64 = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("zcard");
    assert_eq!(before_count, 1);
    let publisher = Publisher::new(h.app.platform.bus.clone());
    let message = EventMessage {
        workspace_id: h.app.workspace.clone(),
        seq: 1,
        message_id: "view-1".into(),
        name: "product_viewed".into(),
        customer_id: Some("newcomer".into()),
        anonymous_id: None,
        timestamp: now(),
        received_at: now(),
        properties: serde_json::json!({ "product_id": "m6" }),
        context: serde_json::json!({}),
    };
    let batch = EventBatch {
        events: vec![message],
    };
    for _ in 0..2 {
        publisher
            .publish_all(&[Outgoing {
                exchange: EVENTS_EXCHANGE.into(),
                routing_key: "event.product_viewed".into(),
                message_id: batch.bus_id(),
                payload: serde_json::to_vec(&batch).expect("json"),
                headers: Default::default(),
            }])
            .await
            .expect("publish");
    }
    // A marker event after them: once it is in, the redeliveries were handled.
    let marker = pb::Event {
        message_id: "view-2".into(),
        name: "product_viewed".into(),
        customer_id: "newcomer".into(),
        timestamp: Some(chrono_to_timestamp(now())),
        properties: Some(json_to_struct(&serde_json::json!({ "product_id": "m7" }))),
        ..Default::default()
    };
    h.track(vec![marker]).await;
    let count: i64 = eventually(10, "marker recorded", || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let count: i64 = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .ok()?;
            (count >= 2).then_some(count)
        }
    })
    .await;
    assert_eq!(count, 2, "the redelivered view was not added twice");
    h.app.stop().await;
}

#[tokio::test]
async fn a_model_swap_under_load_answers_every_request() {
    let mut h = spawn_app().await;
    h.shop().await;
    let first = h.train().await.model.expect("model").version;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let mut client = h.reco.clone();
        let key = h.key();
        let stop = stop.clone();
        let answered = answered.clone();
        workers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let request = pb::RecommendRequest {
                    customer: customer(&format!("c{}", (worker * 7 + round) % 40)),
                    placement: pb::Placement::Home as i32,
                    n: 5,
                    ..Default::default()
                };
                let answer = client
                    .recommend(authed(&key, request))
                    .await
                    .expect("every request is answered")
                    .into_inner();
                assert_eq!(answer.items.len(), 5);
                versions.push(answer.model_version);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            versions
        }));
    }
    // Three new versions and a rollback while they run.
    for _ in 0..3 {
        h.train().await;
    }
    let key = h.key();
    let info = h
        .reco
        .rollback(authed(&key, pb::RollbackModelRequest { version: 0 }))
        .await
        .expect("rollback")
        .into_inner();
    let current = info.current.expect("current").version;
    assert_eq!(current, first + 2);
    assert_eq!(info.previous.expect("previous").version, first + 3);
    let seen_after = answered.load(Ordering::Relaxed);
    eventually(10, "more answers after the rollback", || {
        let answered = answered.clone();
        async move { (answered.load(Ordering::Relaxed) > seen_after + 20).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut versions = HashSet::new();
    for worker in workers {
        versions.extend(worker.await.expect("worker"));
    }
    assert!(versions.len() >= 2, "the swaps were seen: {versions:?}");
    assert!(answered.load(Ordering::Relaxed) > 50);
    // The last answers come from the rolled-back version.
    let answer = h
        .recommend(pb::RecommendRequest {
            placement: pb::Placement::Home as i32,
            ..Default::default()
        })
        .await
        .expect("answer");
    assert_eq!(answer.model_version, current);

    // A training while another one holds the workspace's lock is refused.
    let pool = relance_kit::db::connect(&h.app.platform.settings, "recommendations")
        .await
        .expect("pool");
    let mut holder = pool.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(0x5245)
        .bind(&h.app.workspace)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let key = h.key();
    let refused = h
        .reco
        .train(authed(&key, pb::TrainRequest::default()))
        .await
        .expect_err("busy");
    assert_eq!(refused.code(), Code::Aborted);
    h.app.stop().await;
}

#[tokio::test]
async fn bad_input_names_the_field_and_workspaces_are_isolated() {
    let mut h = spawn_app().await;
    h.shop().await;
    h.train().await;
    let cases: Vec<(pb::RecommendRequest, &str)> = vec![
        (
            pb::RecommendRequest {
                placement: pb::Placement::Home as i32,
                n: 51,
                ..Default::default()
            },
            "n: must be at most 50",
        ),
        (pb::RecommendRequest::default(), "placement: is required"),
        (
            pb::RecommendRequest {
                placement: 99,
                ..Default::default()
            },
            "placement: 99 is not a placement",
        ),
        (
            pb::RecommendRequest {
                placement: pb::Placement::Home as i32,
                customer: customer(""),
                ..Default::default()
            },
            "customer.customer_id: must not be empty",
        ),
        (
            pb::RecommendRequest {
                placement: pb::Placement::Cart as i32,
                context_item_ids: vec!["m1".into(), "x".repeat(129)],
                ..Default::default()
            },
            "context_item_ids[1]: must be at most 128 characters",
        ),
        (
            pb::RecommendRequest {
                placement: pb::Placement::Home as i32,
                filter: Some(pb::RecommendationFilter {
                    min_price: Some(10.0),
                    max_price: Some(5.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "filter.min_price: must not be above filter.max_price",
        ),
    ];
    for (request, message) in cases {
        let status = h.recommend(request).await.expect_err(message);
        assert_eq!(status.code(), Code::InvalidArgument, "{message}");
        assert!(
            status.message().starts_with(message),
            "{} vs {message}",
            status.message()
        );
    }
    // n left at 0 means 5.
    let default = h
        .recommend(pb::RecommendRequest {
            placement: pb::Placement::Home as i32,
            ..Default::default()
        })
        .await
        .expect("default n");
    assert_eq!(default.items.len(), 5);

    // UpsertItems keeps the valid items and reports the others by index and field.
    let mut bad_price = item("bad", &["Home"], -2.0);
    bad_price.currency = "EUR".into();
    let response = h.upsert(vec![item("ok", &["Home"], 2.0), bad_price]).await;
    assert_eq!(response.accepted, 1);
    assert_eq!(response.rejected.len(), 1);
    assert_eq!(response.rejected[0].index, 1);
    assert_eq!(response.rejected[0].field, "items[1].price");

    // Another workspace sees none of this one's catalog or model.
    let other = h.app.other_workspace_key().await;
    let answer = h
        .reco
        .recommend(authed(
            &other,
            pb::RecommendRequest {
                customer: customer("c3"),
                placement: pb::Placement::Cart as i32,
                context_item_ids: vec!["m3".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("other workspace")
        .into_inner();
    assert!(answer.items.is_empty(), "{answer:?}");
    assert_eq!(answer.model_version, 0);
    let found = h
        .reco
        .get_items(authed(
            &other,
            pb::GetItemsRequest {
                ids: vec!["m3".into()],
            },
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(found.not_found, vec!["m3"]);
    // An ingest key may ask for recommendations but not train.
    let ingest = h.app.ingest_key.clone();
    let refused = h
        .reco
        .train(authed(&ingest, pb::TrainRequest::default()))
        .await
        .expect_err("ingest key");
    assert_eq!(refused.code(), Code::PermissionDenied);
    h.app.stop().await;
}

#[tokio::test]
async fn catalog_events_update_the_catalog() {
    let mut h = spawn_app().await;
    let updated = pb::Event {
        message_id: "cat-1".into(),
        name: "catalog_item_updated".into(),
        anonymous_id: "catalog-sync".into(),
        timestamp: Some(chrono_to_timestamp(now())),
        properties: Some(json_to_struct(&serde_json::json!({
            "id": "lamp", "title": "Desk lamp", "price": 30.0,
            "category_path": ["Home", "Lights"], "in_stock": true
        }))),
        ..Default::default()
    };
    h.track(vec![updated]).await;
    let key = h.key();
    let client = h.reco.clone();
    let found = eventually(10, "the item arrives", || {
        let mut client = client.clone();
        let key = key.clone();
        async move {
            let found = client
                .get_items(authed(
                    &key,
                    pb::GetItemsRequest {
                        ids: vec!["lamp".into()],
                    },
                ))
                .await
                .ok()?
                .into_inner();
            found.items.into_iter().next()
        }
    })
    .await;
    assert_eq!(found.title, "Desk lamp");
    assert_eq!(found.category_path, vec!["Home", "Lights"]);
    let deleted = pb::Event {
        message_id: "cat-2".into(),
        name: "catalog_item_deleted".into(),
        anonymous_id: "catalog-sync".into(),
        timestamp: Some(chrono_to_timestamp(now() + Duration::seconds(1))),
        properties: Some(json_to_struct(&serde_json::json!({ "id": "lamp" }))),
        ..Default::default()
    };
    h.track(vec![deleted]).await;
    eventually(10, "the item is gone", || {
        let key = key.clone();
        let mut client = client.clone();
        async move {
            let found = client
                .get_items(authed(
                    &key,
                    pb::GetItemsRequest {
                        ids: vec!["lamp".into()],
                    },
                ))
                .await
                .ok()?
                .into_inner();
            found.items.is_empty().then_some(())
        }
    })
    .await;
    // The serving snapshot is refreshed in the background after a catalog change, so
    // Recommend stops offering the item shortly after GetItems stops finding it.
    eventually(10, "recommendations no longer offer the item", || {
        let key = key.clone();
        let mut client = client.clone();
        async move {
            let answer = client
                .recommend(authed(
                    &key,
                    pb::RecommendRequest {
                        placement: pb::Placement::Home as i32,
                        ..Default::default()
                    },
                ))
                .await
                .ok()?
                .into_inner();
            answer.items.is_empty().then_some(())
        }
    })
    .await;
    h.app.stop().await;
}
