//! Campaigns against real Postgres and RabbitMQ, with profiles, events, segmentation and
//! delivery running beside it in the same process, all on one test clock that the tests
//! move forward by hours and days.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use relance_kit::SharedClock;
use relance_kit::clock::ManualClock;
use relance_kit::testing::{TestApp, TestEnv, authed, eventually};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1::campaigns_client::CampaignsClient;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::events_client::EventsClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::segments_client::SegmentsClient;
use relance_proto::v1::{self as pb, customer_ref};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    app: TestApp,
    clock: Arc<ManualClock>,
    campaigns: CampaignsClient<Channel>,
    delivery: DeliveryClient<Channel>,
    events: EventsClient<Channel>,
    profiles: ProfilesClient<Channel>,
    segments: SegmentsClient<Channel>,
    db: PgPool,
}

/// Monday 2 March 2026, 09:00 UTC.
fn monday_9am() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).single().unwrap()
}

async fn spawn_app() -> Harness {
    spawn_app_at(monday_9am()).await
}

async fn spawn_app_at(start: DateTime<Utc>) -> Harness {
    let env = Arc::new(TestEnv::new().await);
    let settings = env
        .settings
        .with_toml(
            r#"
# Five services share this test's connections; two tests run at once under nextest.
database_max_connections = 4

[campaigns]
poll_ms = 20
schedule_poll_ms = 50
workers = 1

[delivery]
http_addr = "127.0.0.1:0"

[segmentation]
sweep_every_ms = 100
build_poll_ms = 100
"#,
        )
        .unwrap();
    let clock = ManualClock::new(start);
    let shared: SharedClock = clock.clone();
    let app = TestApp::start(
        env.clone(),
        settings,
        shared,
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
    let db = PgPool::connect(&env.database_url()).await.unwrap();
    Harness {
        campaigns: CampaignsClient::new(channel.clone()),
        delivery: DeliveryClient::new(channel.clone()),
        events: EventsClient::new(channel.clone()),
        profiles: ProfilesClient::new(channel.clone()),
        segments: SegmentsClient::new(channel),
        app,
        clock,
        db,
    }
}

fn customer(id: &str) -> pb::CustomerRef {
    pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    }
}

impl Harness {
    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        authed(&self.app.admin_key, message)
    }

    fn now(&self) -> DateTime<Utc> {
        relance_kit::Clock::now(self.clock.as_ref())
    }

    /// An in-app template whose title names it.
    async fn template(&mut self, name: &str) {
        let template = pb::Template {
            name: name.into(),
            default_locale: "en".into(),
            variants: vec![pb::TemplateVariant {
                locale: "en".into(),
                content: Some(pb::MessageContent {
                    in_app: Some(pb::InAppContent {
                        title: format!(
                            "{name} for {{{{ customer.attributes.first_name | default: 'you' }}}}"
                        ),
                        body: "See what is new".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let request = self.admin(pb::UpsertTemplateRequest {
            template: Some(template),
            dry_run: false,
        });
        self.delivery.upsert_template(request).await.unwrap();
    }

    async fn profile(&mut self, id: &str, timezone: &str, attributes: serde_json::Value) {
        let request = self.admin(pb::UpsertProfileRequest {
            customer: Some(customer(id)),
            attributes: Some(json_to_struct(&attributes)),
            timezone: Some(timezone.into()),
            ..Default::default()
        });
        self.profiles.upsert(request).await.unwrap();
    }

    async fn apply(&mut self, yaml: &str) -> pb::ApplyFlowResponse {
        let request = self.admin(pb::ApplyFlowRequest {
            yaml: yaml.into(),
            dry_run: false,
        });
        self.campaigns
            .apply_flow(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn track_at(
        &mut self,
        id: &str,
        name: &str,
        properties: serde_json::Value,
        at: DateTime<Utc>,
    ) -> String {
        let request = self.admin(pb::TrackRequest {
            event: Some(pb::Event {
                name: name.into(),
                customer_id: id.into(),
                timestamp: Some(chrono_to_timestamp(at)),
                properties: Some(json_to_struct(&properties)),
                ..Default::default()
            }),
        });
        self.events
            .track(request)
            .await
            .unwrap()
            .into_inner()
            .message_id
    }

    async fn track(&mut self, id: &str, name: &str, properties: serde_json::Value) -> String {
        let now = self.now();
        self.track_at(id, name, properties, now).await
    }

    /// Journeys of `flow` (any status).
    async fn journeys(&self, flow: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM campaigns.journeys WHERE flow = $1")
            .bind(flow)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Waits until `flow` has `count` journeys and their first steps have run: a wait that
    /// starts a flow counts from when it runs, so moving the clock before would move its end.
    async fn wait_for_journeys(&self, flow: &str, count: i64) {
        eventually(20, &format!("{count} journeys in {flow}"), || async {
            (self.journeys(flow).await == count).then_some(())
        })
        .await;
        self.settle().await;
    }

    /// Moves the clock and waits until nothing is due any more (journeys, broadcast
    /// recipients, the send outbox).
    async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.settle().await;
    }

    async fn settle(&self) {
        let now = self.now();
        eventually(30, "due work done", || async {
            let due: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM campaigns.journeys WHERE status = 1 AND next_wake_at <= $1) \
                 + (SELECT count(*) FROM campaigns.broadcast_recipients WHERE state = 0 AND due_at <= $1) \
                 + (SELECT count(*) FROM campaigns.broadcasts WHERE status IN (1, 2) AND next_run_at <= $1) \
                 + (SELECT count(*) FROM campaigns.outbox)",
            )
            .bind(now)
            .fetch_one(&self.db)
            .await
            .unwrap();
            (due == 0).then_some(())
        })
        .await;
    }

    /// The templates campaigns queued for a customer, in order.
    async fn sent_templates(&self, id: &str) -> Vec<String> {
        // The delivery ledger holds what was asked for: read the template names there.
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT template FROM delivery.messages WHERE customer_id = $1 ORDER BY created_at, idempotency_key",
        )
        .bind(id)
        .fetch_all(&self.db)
        .await
        .unwrap();
        rows.into_iter().map(|(t,)| t).collect()
    }

    /// Waits until delivery's ledger holds `count` messages for the customer.
    async fn wait_for_messages(&self, id: &str, count: usize) -> Vec<String> {
        eventually(20, &format!("{count} messages for {id}"), || async {
            let templates = self.sent_templates(id).await;
            (templates.len() == count).then_some(templates)
        })
        .await
    }

    async fn journey_rows(&self, flow: &str) -> Vec<(String, i32, i16, Option<i16>)> {
        sqlx::query_as(
            "SELECT customer_id, flow_version, status, end_reason FROM campaigns.journeys WHERE flow = $1 ORDER BY customer_id, entered_at",
        )
        .bind(flow)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn every_step_type_runs_wait_send_branch_update_exit_and_wait_for_an_event() {
    let mut h = spawn_app().await;
    for name in ["vip-welcome", "nudge", "welcome"] {
        h.template(name).await;
    }
    h.profile(
        "gold",
        "Africa/Algiers",
        serde_json::json!({ "tier": "gold" }),
    )
    .await;
    h.profile(
        "silver",
        "Africa/Algiers",
        serde_json::json!({ "tier": "silver" }),
    )
    .await;
    h.profile(
        "bronze",
        "Africa/Algiers",
        serde_json::json!({ "tier": "bronze" }),
    )
    .await;
    let applied = h
        .apply(
            r#"
kind: Flow
name: onboarding
trigger: { event: signed_up }
steps:
  - update: { set: { onboarding: started } }
  - wait: 1h
  - branch:
      if: { attribute: tier, eq: gold }
      then:
        - send: { channel: in_app, template: vip-welcome }
        - exit
  - wait: { event: app_opened, timeout: 2d, on_timeout: [ { send: { channel: in_app, template: nudge } } ] }
  - send: { channel: in_app, template: welcome }
"#,
        )
        .await;
    assert_eq!(applied.version, 1);
    assert!(applied.changed);
    for id in ["gold", "silver", "bronze"] {
        h.track(id, "signed_up", serde_json::json!({})).await;
    }
    h.wait_for_journeys("onboarding", 3).await;
    h.settle().await;
    // The update step ran at once.
    let profile = h
        .profiles
        .get(h.admin(pb::GetProfileRequest {
            customer: Some(customer("gold")),
        }))
        .await
        .unwrap()
        .into_inner();
    let attributes = relance_proto::convert::struct_to_json(&profile.attributes.unwrap());
    assert_eq!(attributes["onboarding"], "started");
    // Nothing before the hour is out.
    h.advance(Duration::minutes(59)).await;
    assert!(h.sent_templates("gold").await.is_empty());
    h.advance(Duration::minutes(1)).await;
    assert_eq!(h.wait_for_messages("gold", 1).await, vec!["vip-welcome"]);
    // Silver opens the app a day later: the wait ends at once, no nudge.
    h.advance(Duration::days(1)).await;
    h.track("silver", "app_opened", serde_json::json!({})).await;
    assert_eq!(h.wait_for_messages("silver", 1).await, vec!["welcome"]);
    // Bronze never does: after the timeout, the nudge, then the welcome.
    assert!(h.sent_templates("bronze").await.is_empty());
    h.advance(Duration::days(1)).await;
    assert_eq!(
        h.wait_for_messages("bronze", 2).await,
        vec!["nudge", "welcome"]
    );
    let rows = h.journey_rows("onboarding").await;
    assert_eq!(
        rows,
        vec![
            ("bronze".into(), 1, 3, Some(1)),
            ("gold".into(), 1, 3, Some(3)),
            ("silver".into(), 1, 3, Some(1)),
        ]
    );
    // ListJourneys shows where each one ended.
    let listed = h
        .campaigns
        .list_journeys(h.admin(pb::ListJourneysRequest {
            customer: Some(customer("gold")),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.journeys.len(), 1);
    assert_eq!(
        listed.journeys[0].end_reason,
        pb::JourneyEndReason::ExitStep as i32
    );
}

#[tokio::test]
async fn reaching_the_goal_ends_the_journey_mid_flow_and_a_redelivered_trigger_starts_nothing() {
    let mut h = spawn_app().await;
    for name in ["cart-1", "cart-2"] {
        h.template(name).await;
    }
    h.profile("amina", "Africa/Algiers", serde_json::json!({}))
        .await;
    h.profile("karim", "Africa/Algiers", serde_json::json!({}))
        .await;
    h.apply(
        r#"
kind: Flow
name: abandoned-cart
trigger: { event: cart_updated }
exit_when: { event: order_completed }
steps:
  - wait: 1h
  - send: { channel: in_app, template: cart-1 }
  - wait: 24h
  - send: { channel: in_app, template: cart-2 }
"#,
    )
    .await;
    let first = h
        .track(
            "amina",
            "cart_updated",
            serde_json::json!({ "items": [{ "sku": "A1" }] }),
        )
        .await;
    h.track("karim", "cart_updated", serde_json::json!({}))
        .await;
    h.wait_for_journeys("abandoned-cart", 2).await;
    // The same event again (a client retry): deduplicated, one journey per customer.
    let request = h.admin(pb::TrackRequest {
        event: Some(pb::Event {
            message_id: first.clone(),
            name: "cart_updated".into(),
            customer_id: "amina".into(),
            ..Default::default()
        }),
    });
    assert!(
        h.events
            .track(request)
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
    h.advance(Duration::hours(1)).await;
    h.wait_for_messages("amina", 1).await;
    h.wait_for_messages("karim", 1).await;
    // Amina orders: her journey ends before the second reminder.
    h.track(
        "amina",
        "order_completed",
        serde_json::json!({ "revenue": 40.0 }),
    )
    .await;
    eventually(10, "goal reached", || async {
        let rows = h.journey_rows("abandoned-cart").await;
        (rows[0].3 == Some(2)).then_some(())
    })
    .await;
    h.advance(Duration::hours(24)).await;
    assert_eq!(
        h.wait_for_messages("karim", 2).await,
        vec!["cart-1", "cart-2"]
    );
    assert_eq!(h.sent_templates("amina").await, vec!["cart-1"]);
    assert_eq!(h.journeys("abandoned-cart").await, 2);
}

#[tokio::test]
async fn re_entry_waits_for_the_rule_and_never_means_once() {
    let mut h = spawn_app().await;
    h.template("hello").await;
    h.profile("nadia", "UTC", serde_json::json!({})).await;
    h.apply(
        r#"
kind: Flow
name: weekly
trigger: { event: product_viewed }
re_entry: { after: 7d }
steps:
  - send: { channel: in_app, template: hello }
"#,
    )
    .await;
    h.apply(
        r#"
kind: Flow
name: once
trigger: { event: product_viewed }
steps:
  - send: { channel: in_app, template: hello }
"#,
    )
    .await;
    h.track("nadia", "product_viewed", serde_json::json!({}))
        .await;
    h.wait_for_journeys("weekly", 1).await;
    h.wait_for_journeys("once", 1).await;
    h.settle().await;
    // A day later: too soon for `weekly`, never again for `once`.
    h.advance(Duration::days(1)).await;
    h.track("nadia", "product_viewed", serde_json::json!({}))
        .await;
    // The consumer has seen the event once its activity row is there.
    eventually(10, "second view kept", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM campaigns.activity WHERE name = 'product_viewed'",
        )
        .fetch_one(&h.db)
        .await
        .unwrap();
        (n == 2).then_some(())
    })
    .await;
    assert_eq!(h.journeys("weekly").await, 1);
    assert_eq!(h.journeys("once").await, 1);
    // Seven days after the first entry: `weekly` again.
    h.advance(Duration::days(6)).await;
    h.track("nadia", "product_viewed", serde_json::json!({}))
        .await;
    h.wait_for_journeys("weekly", 2).await;
    h.settle().await;
    assert_eq!(h.journeys("once").await, 1);
    assert_eq!(h.wait_for_messages("nadia", 3).await.len(), 3);
}

#[tokio::test]
async fn frequency_caps_count_across_two_flows() {
    let mut h = spawn_app().await;
    for name in ["a-1", "a-2", "b-1"] {
        h.template(name).await;
    }
    h.profile("sami", "Africa/Algiers", serde_json::json!({}))
        .await;
    let caps = pb::FrequencyCaps {
        caps: vec![pb::FrequencyCap {
            channel: pb::Channel::InApp as i32,
            period: pb::FrequencyCapPeriod::Day as i32,
            max_messages: 2,
        }],
        policy: pb::FrequencyCapPolicy::Skip as i32,
        ..Default::default()
    };
    h.campaigns
        .set_frequency_caps(h.admin(pb::SetFrequencyCapsRequest { caps: Some(caps) }))
        .await
        .unwrap();
    h.apply(
        r#"
kind: Flow
name: flow-a
trigger: { event: signed_up }
steps:
  - send: { channel: in_app, template: a-1 }
  - wait: 1h
  - send: { channel: in_app, template: a-2 }
"#,
    )
    .await;
    h.apply(
        r#"
kind: Flow
name: flow-b
trigger: { event: signed_up }
steps:
  - wait: 2h
  - send: { channel: in_app, template: b-1 }
"#,
    )
    .await;
    h.track("sami", "signed_up", serde_json::json!({})).await;
    h.wait_for_journeys("flow-a", 1).await;
    h.wait_for_journeys("flow-b", 1).await;
    h.settle().await;
    h.advance(Duration::hours(1)).await;
    h.advance(Duration::hours(1)).await;
    // Two in-app messages today: flow-b's third is skipped, and counted.
    assert_eq!(h.wait_for_messages("sami", 2).await, vec!["a-1", "a-2"]);
    let skipped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM campaigns.guard_events WHERE flow = 'flow-b' AND kind = 2",
    )
    .fetch_one(&h.db)
    .await
    .unwrap();
    assert_eq!(skipped, 1);
    let rows = h.journey_rows("flow-b").await;
    assert_eq!(rows[0].2, 3, "flow-b moved on past the skipped send");
    let report = h
        .campaigns
        .get_flow_report(h.admin(pb::GetFlowReportRequest {
            name: "flow-b".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let total = report.total.unwrap();
    assert_eq!((total.sends, total.capped, total.skipped), (0, 1, 1));
}

#[tokio::test]
async fn quiet_hours_hold_a_send_until_morning_in_each_customers_timezone() {
    // 14:00 UTC: 23:00 in Tokyo (quiet), 15:00 in Algiers.
    let mut h = spawn_app_at(Utc.with_ymd_and_hms(2026, 3, 2, 14, 0, 0).single().unwrap()).await;
    h.template("promo").await;
    h.profile("tokyo", "Asia/Tokyo", serde_json::json!({}))
        .await;
    h.profile("algiers", "Africa/Algiers", serde_json::json!({}))
        .await;
    h.apply(
        r#"
kind: Flow
name: promo
trigger: { event: product_viewed }
steps:
  - send: { channel: in_app, template: promo }
"#,
    )
    .await;
    h.track("tokyo", "product_viewed", serde_json::json!({}))
        .await;
    h.track("algiers", "product_viewed", serde_json::json!({}))
        .await;
    h.wait_for_journeys("promo", 2).await;
    h.settle().await;
    h.wait_for_messages("algiers", 1).await;
    assert!(h.sent_templates("tokyo").await.is_empty());
    // 08:00 in Tokyo is 23:00 UTC.
    h.advance(Duration::hours(8) + Duration::minutes(59)).await;
    assert!(h.sent_templates("tokyo").await.is_empty());
    h.advance(Duration::minutes(1)).await;
    h.wait_for_messages("tokyo", 1).await;
    let at: DateTime<Utc> =
        sqlx::query_scalar("SELECT at FROM campaigns.sends WHERE customer_id = 'tokyo'")
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(
        at,
        Utc.with_ymd_and_hms(2026, 3, 2, 23, 0, 0).single().unwrap()
    );
    let deferred: i64 =
        sqlx::query_scalar("SELECT count(*) FROM campaigns.guard_events WHERE kind = 3")
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(deferred, 1);
}

#[tokio::test]
async fn a_best_time_send_lands_in_the_hour_the_customer_orders() {
    let mut h = spawn_app().await;
    h.template("recap").await;
    h.profile("leila", "Africa/Algiers", serde_json::json!({}))
        .await;
    // A newcomer with no history of their own: the shop's hours decide (here, Leila's), read
    // in the shop's timezone.
    h.profile("newcomer", "Africa/Algiers", serde_json::json!({}))
        .await;
    h.campaigns
        .set_quiet_hours(h.admin(pb::SetQuietHoursRequest {
            quiet_hours: Some(pb::QuietHours {
                enabled: true,
                start: "22:00".into(),
                end: "08:00".into(),
                default_timezone: "Africa/Algiers".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
    h.apply(
        r#"
kind: Flow
name: recap
trigger: { event: signed_up }
steps:
  - wait: { until: best_time, within: 24h }
  - send: { channel: in_app, template: recap }
"#,
    )
    .await;
    // Leila orders in the evening, 20:xx in Algiers (19:xx UTC), on past days.
    for days_ago in 1..=8 {
        let at =
            monday_9am() - Duration::days(days_ago) + Duration::hours(10) + Duration::minutes(15);
        h.track_at(
            "leila",
            "order_completed",
            serde_json::json!({ "revenue": 20.0 }),
            at,
        )
        .await;
    }
    eventually(10, "orders kept", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM campaigns.activity WHERE name = 'order_completed'",
        )
        .fetch_one(&h.db)
        .await
        .unwrap();
        (n == 8).then_some(())
    })
    .await;
    h.track("leila", "signed_up", serde_json::json!({})).await;
    h.track("newcomer", "signed_up", serde_json::json!({}))
        .await;
    h.wait_for_journeys("recap", 2).await;
    h.settle().await;
    h.advance(Duration::hours(9) + Duration::minutes(59)).await;
    assert!(h.sent_templates("leila").await.is_empty());
    assert!(h.sent_templates("newcomer").await.is_empty());
    h.advance(Duration::minutes(1)).await;
    h.wait_for_messages("leila", 1).await;
    h.wait_for_messages("newcomer", 1).await;
    let times: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT at FROM campaigns.sends ORDER BY customer_id")
            .fetch_all(&h.db)
            .await
            .unwrap();
    // 19:00 UTC is 20:00 in Algiers.
    let evening = Utc.with_ymd_and_hms(2026, 3, 2, 19, 0, 0).single().unwrap();
    assert_eq!(times, vec![evening, evening]);
}

#[tokio::test]
async fn running_journeys_keep_their_version_when_the_flow_changes() {
    let mut h = spawn_app().await;
    for name in ["v1", "v2"] {
        h.template(name).await;
    }
    h.profile("early", "UTC", serde_json::json!({})).await;
    h.profile("late", "UTC", serde_json::json!({})).await;
    let yaml = r#"
kind: Flow
name: welcome
trigger: { event: signed_up }
steps:
  - wait: 2h
  - send: { channel: in_app, template: v1 }
"#;
    assert_eq!(h.apply(yaml).await.version, 1);
    // The same document again changes nothing.
    let again = h.apply(yaml).await;
    assert_eq!((again.version, again.changed), (1, false));
    h.track("early", "signed_up", serde_json::json!({})).await;
    h.wait_for_journeys("welcome", 1).await;
    h.settle().await;
    let v2 = h
        .apply(
            r#"
kind: Flow
name: welcome
trigger: { event: signed_up }
steps:
  - send: { channel: in_app, template: v2 }
"#,
        )
        .await;
    assert_eq!((v2.version, v2.changed), (2, true));
    h.track("late", "signed_up", serde_json::json!({})).await;
    h.wait_for_journeys("welcome", 2).await;
    h.settle().await;
    assert_eq!(h.wait_for_messages("late", 1).await, vec!["v2"]);
    h.advance(Duration::hours(2)).await;
    assert_eq!(h.wait_for_messages("early", 1).await, vec!["v1"]);
    let rows = h.journey_rows("welcome").await;
    assert_eq!(rows[0].1, 1);
    assert_eq!(rows[1].1, 2);
    // Version 1 is still readable.
    let flow = h
        .campaigns
        .get_flow(h.admin(pb::GetFlowRequest {
            name: "welcome".into(),
            version: 1,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((flow.version, flow.latest_version), (1, 2));
    assert!(flow.yaml.contains("template: v1"));
}

#[tokio::test]
async fn invalid_flows_are_refused_with_the_path_of_each_problem() {
    let mut h = spawn_app().await;
    h.template("cart-1").await;
    let yaml = r#"
kind: Flow
name: broken
trigger: { event: cart_updated }
steps:
  - send: { channel: in_app, template: nope }
  - send:
      channel: in_app
      variants: [ { name: A, weight: 50, template: cart-1 }, { name: B, weight: 0, template: cart-1 } ]
"#;
    let error = h
        .campaigns
        .apply_flow(h.admin(pb::ApplyFlowRequest {
            yaml: yaml.into(),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("steps[1].send.variants[1].weight"),
        "{}",
        error.message()
    );
    // The weight is refused before templates are looked up; once it is fixed, the unknown
    // template is named.
    let yaml = yaml.replace("weight: 0", "weight: 50");
    let response = h
        .campaigns
        .apply_flow(h.admin(pb::ApplyFlowRequest {
            yaml,
            dry_run: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.errors.len(), 1);
    assert_eq!(response.errors[0].field, "steps[0].send.template");
    assert_eq!(
        response.errors[0].reason,
        "template \"nope\" does not exist"
    );
    // A loop without a wait can never end.
    let looping = r#"
kind: Flow
name: looping
trigger: { event: cart_updated }
steps:
  - id: again
    send: { channel: in_app, template: cart-1 }
  - goto: again
"#;
    let error = h
        .campaigns
        .apply_flow(h.admin(pb::ApplyFlowRequest {
            yaml: looping.into(),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("the steps can never end"),
        "{}",
        error.message()
    );
    // Nothing was stored.
    let flows = h
        .campaigns
        .list_flows(h.admin(pb::ListFlowsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(flows.flows.is_empty());
}

#[tokio::test]
async fn a_local_time_broadcast_goes_out_in_waves_one_per_timezone() {
    // Sunday 1 March 2026, 12:00 UTC; the broadcast is for Monday 2 March, 10:00 local.
    let mut h = spawn_app_at(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().unwrap()).await;
    h.template("ramadan").await;
    h.profile(
        "tokyo",
        "Asia/Tokyo",
        serde_json::json!({ "audience": "ramadan" }),
    )
    .await;
    h.profile(
        "algiers",
        "Africa/Algiers",
        serde_json::json!({ "audience": "ramadan" }),
    )
    .await;
    h.profile(
        "newyork",
        "America/New_York",
        serde_json::json!({ "audience": "ramadan" }),
    )
    .await;
    h.profile(
        "other",
        "Africa/Algiers",
        serde_json::json!({ "audience": "no" }),
    )
    .await;
    let segment = h
        .segments
        .apply(h.admin(pb::ApplySegmentRequest {
            yaml: "kind: Segment\nname: ramadan-audience\nwhere: { attribute: audience, eq: ramadan }\n".into(),
            dry_run: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(segment.errors.is_empty(), "{:?}", segment.errors);
    eventually(20, "segment built", || async {
        let count = h
            .segments
            .clone()
            .count(h.admin(pb::CountSegmentRequest {
                name: "ramadan-audience".into(),
            }))
            .await
            .ok()?
            .into_inner()
            .count;
        (count == 3).then_some(())
    })
    .await;
    let response = h
        .campaigns
        .schedule_broadcast(
            h.admin(pb::ScheduleBroadcastRequest {
                definition: Some(pb::schedule_broadcast_request::Definition::Yaml(
                    r#"
kind: Broadcast
name: ramadan-day-1
segment: ramadan-audience
channel: in_app
template: ramadan
schedule: { local_time: "2026-03-02 10:00" }
"#
                    .into(),
                )),
                dry_run: false,
            }),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let broadcast = response.broadcast.unwrap();
    assert_eq!(broadcast.audience_size, 3);
    // The first wave is 10:00 at UTC+14: Sunday 20:00 UTC.
    assert_eq!(
        broadcast.next_run_at.unwrap(),
        chrono_to_timestamp(Utc.with_ymd_and_hms(2026, 3, 1, 20, 0, 0).single().unwrap())
    );
    h.advance(Duration::hours(8)).await; // Sunday 20:00 UTC: the audience is taken
    // Tokyo's 10:00 is 01:00 UTC.
    h.advance(Duration::hours(5)).await;
    h.wait_for_messages("tokyo", 1).await;
    assert!(h.sent_templates("algiers").await.is_empty());
    // Algiers' 10:00 is 09:00 UTC; New York's (EST) 15:00 UTC.
    h.advance(Duration::hours(8)).await;
    h.wait_for_messages("algiers", 1).await;
    assert!(h.sent_templates("newyork").await.is_empty());
    h.advance(Duration::hours(6)).await;
    h.wait_for_messages("newyork", 1).await;
    assert!(h.sent_templates("other").await.is_empty());
    let times: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT customer_id, at FROM campaigns.sends WHERE broadcast = 'ramadan-day-1' ORDER BY at",
    )
    .fetch_all(&h.db)
    .await
    .unwrap();
    let expected = [
        (
            "tokyo",
            Utc.with_ymd_and_hms(2026, 3, 2, 1, 0, 0).single().unwrap(),
        ),
        (
            "algiers",
            Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).single().unwrap(),
        ),
        (
            "newyork",
            Utc.with_ymd_and_hms(2026, 3, 2, 15, 0, 0).single().unwrap(),
        ),
    ];
    let expected: Vec<(String, DateTime<Utc>)> =
        expected.iter().map(|(c, t)| (c.to_string(), *t)).collect();
    assert_eq!(times, expected);
    h.settle().await;
    let broadcast = h
        .campaigns
        .get_broadcast(h.admin(pb::GetBroadcastRequest {
            name: "ramadan-day-1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(broadcast.status, pb::BroadcastStatus::Completed as i32);
    assert_eq!(broadcast.queued, 3);
    // Scheduling again once started is refused.
    let error = h
        .campaigns
        .schedule_broadcast(h.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Spec(
                broadcast.spec.unwrap(),
            )),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
}

/// The report on a small scripted scenario, against figures computed by hand.
#[tokio::test]
async fn the_report_equals_the_figures_computed_by_hand() {
    let mut h = spawn_app().await;
    for name in ["pn1-a", "pn1-b", "pn2"] {
        h.template(name).await;
    }
    let flow = r#"
kind: Flow
name: scripted
trigger: { event: cart_updated }
conversion: { event: order_completed, within: 72h }
control_group: 30%
steps:
  - id: pn1
    send:
      channel: in_app
      variants: [ { name: A, weight: 50, template: pn1-a }, { name: B, weight: 50, template: pn1-b } ]
  - wait: 24h
  - id: pn2
    send: { channel: in_app, template: pn2 }
"#;
    h.apply(flow).await;
    // Twenty customers; which are held out and which variant each gets is decided by hash.
    let ids: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    for id in &ids {
        h.profile(id, "UTC", serde_json::json!({})).await;
        h.track(id, "cart_updated", serde_json::json!({})).await;
    }
    h.wait_for_journeys("scripted", 20).await;
    h.settle().await;
    let control: Vec<&String> = ids
        .iter()
        .filter(|id| relance_campaigns::domain::experiment::in_control(id, "scripted", 30.0))
        .collect();
    let treated: Vec<&String> = ids.iter().filter(|id| !control.contains(id)).collect();
    assert!(
        !control.is_empty() && treated.len() >= 6,
        "control {control:?}"
    );
    for id in &treated {
        h.wait_for_messages(id, 1).await;
    }
    // The script: the first three treated customers click PN1; the first two order 2 h
    // later (40 and 60: last touch PN1); one control customer orders at +10 h (15); the
    // fourth treated customer orders at +30 h, after PN2 (25: last touch PN2); the first
    // orders again at +50 h (10: PN2, within 72 h of it).
    for id in treated.iter().take(3) {
        let (message_id, variant, journey): (String, String, String) = sqlx::query_as(
            "SELECT id::text, variant, journey_id FROM delivery.messages WHERE customer_id = $1 AND step = 'pn1'",
        )
        .bind(id.as_str())
        .fetch_one(&h.db)
        .await
        .unwrap();
        h.track(
            id,
            "message_clicked",
            serde_json::json!({ "message_id": message_id, "flow": "scripted", "step": "pn1", "variant": variant,
                               "journey_id": journey, "channel": "in_app" }),
        )
        .await;
    }
    h.advance(Duration::hours(2)).await;
    h.track(
        treated[0],
        "order_completed",
        serde_json::json!({ "revenue": 40.0 }),
    )
    .await;
    h.track(
        treated[1],
        "order_completed",
        serde_json::json!({ "revenue": 60.0 }),
    )
    .await;
    h.advance(Duration::hours(8)).await;
    h.track(
        control[0],
        "order_completed",
        serde_json::json!({ "revenue": 15.0 }),
    )
    .await;
    h.advance(Duration::hours(14)).await; // +24 h: PN2
    for id in &treated {
        h.wait_for_messages(id, 2).await;
    }
    h.advance(Duration::hours(6)).await; // +30 h
    h.track(
        treated[3],
        "order_completed",
        serde_json::json!({ "revenue": 25.0 }),
    )
    .await;
    h.advance(Duration::hours(20)).await; // +50 h
    h.track(
        treated[0],
        "order_completed",
        serde_json::json!({ "revenue": 10.0 }),
    )
    .await;
    eventually(10, "orders and clicks kept", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM campaigns.activity WHERE name = 'order_completed') \
             + (SELECT count(*) FROM campaigns.messages WHERE clicked)",
        )
        .fetch_one(&h.db)
        .await
        .unwrap();
        (n == 8).then_some(())
    })
    .await;
    eventually(10, "every send's outcome recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM campaigns.messages WHERE status = 1")
            .fetch_one(&h.db)
            .await
            .unwrap();
        (n == 2 * treated.len() as i64).then_some(())
    })
    .await;

    let report = h
        .campaigns
        .get_flow_report(h.admin(pb::GetFlowReportRequest {
            name: "scripted".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let n_treated = treated.len() as u64;
    let n_control = control.len() as u64;
    let total = report.total.unwrap();
    // Hand-computed: every treated customer got two sends; three clicks; conversions by
    // treated[0] (40 at +2 h → pn1, 10 at +50 h → pn2), treated[1] (60 → pn1), treated[3]
    // (25 at +30 h → pn2): three customers, revenue 135.
    assert_eq!(total.entered, n_treated);
    assert_eq!(total.sends, 2 * n_treated);
    assert_eq!(total.clicks, 3);
    assert_eq!(total.conversions, 3);
    assert!((total.revenue - 135.0).abs() < 1e-9);
    assert!((total.conversion_rate - 3.0 / n_treated as f64).abs() < 1e-12);
    assert!((total.ctr - 3.0 / (2 * n_treated) as f64).abs() < 1e-12);
    let control_stats = report.control.unwrap();
    assert_eq!(
        (control_stats.entered, control_stats.conversions),
        (n_control, 1)
    );
    assert!((control_stats.revenue - 15.0).abs() < 1e-9);
    let uplift = report.uplift.unwrap();
    let p1 = 3.0 / n_treated as f64;
    let p0 = 1.0 / n_control as f64;
    assert!((uplift.absolute - (p1 - p0)).abs() < 1e-12);
    let se = (p1 * (1.0 - p1) / n_treated as f64 + p0 * (1.0 - p0) / n_control as f64).sqrt();
    assert!((uplift.ci_low - (p1 - p0 - 1.959964 * se)).abs() < 1e-6);
    // Per step.
    let pn1 = &report.steps[0];
    let pn2 = &report.steps[2];
    assert_eq!(pn1.step_id, "pn1");
    let pn1_stats = pn1.stats.unwrap();
    let pn2_stats = pn2.stats.unwrap();
    assert_eq!(
        (pn1_stats.entered, pn1_stats.sends, pn1_stats.clicks),
        (n_treated, n_treated, 3)
    );
    assert_eq!((pn1_stats.conversions, pn2_stats.conversions), (2, 2));
    assert!((pn1_stats.revenue - 100.0).abs() < 1e-9);
    assert!((pn2_stats.revenue - 35.0).abs() < 1e-9);
    // Per variant: the assignment the messages carry.
    let variants = &pn1.variants;
    assert_eq!(variants.len(), 2);
    let entered: u64 = variants.iter().map(|v| v.stats.unwrap().entered).sum();
    assert_eq!(entered, n_treated);
    // Push carried every conversion here: in-app's share is 100 %.
    assert_eq!(report.channel_shares.len(), 1);
    assert_eq!(report.channel_shares[0].channel, pb::Channel::InApp as i32);
    assert!((report.channel_shares[0].share - 1.0).abs() < 1e-12);
}

#[tokio::test]
async fn a_paused_flow_holds_journeys_before_their_send_and_resume_lets_them_go() {
    let mut h = spawn_app().await;
    h.template("hello").await;
    for id in ["p1", "p2"] {
        h.profile(id, "UTC", serde_json::json!({})).await;
    }
    h.apply(
        r#"
kind: Flow
name: paused
trigger: { event: signed_up }
steps:
  - wait: 1h
  - send: { channel: in_app, template: hello }
"#,
    )
    .await;
    h.track("p1", "signed_up", serde_json::json!({})).await;
    h.wait_for_journeys("paused", 1).await;
    h.settle().await;
    let flow = h
        .campaigns
        .pause_flow(h.admin(pb::PauseFlowRequest {
            name: "paused".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flow.status, pb::FlowStatus::Paused as i32);
    // No new journey while paused; the running one holds at its send.
    h.track("p2", "signed_up", serde_json::json!({})).await;
    eventually(10, "the sign-up seen", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM campaigns.activity WHERE name = 'signed_up'")
                .fetch_one(&h.db)
                .await
                .unwrap();
        (n == 2).then_some(())
    })
    .await;
    h.advance(Duration::hours(2)).await;
    assert_eq!(h.journeys("paused").await, 1);
    assert_eq!(h.journey_rows("paused").await[0].2, 2, "held");
    assert!(h.sent_templates("p1").await.is_empty());
    h.campaigns
        .resume_flow(h.admin(pb::ResumeFlowRequest {
            name: "paused".into(),
            end_held_journeys: false,
        }))
        .await
        .unwrap();
    h.settle().await;
    assert_eq!(h.wait_for_messages("p1", 1).await, vec!["hello"]);
    // Archived: running journeys end, the flow is listed only when asked.
    h.track("p2", "signed_up", serde_json::json!({})).await;
    h.wait_for_journeys("paused", 2).await;
    let archived = h
        .campaigns
        .archive_flow(h.admin(pb::ArchiveFlowRequest {
            name: "paused".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(archived.status, pb::FlowStatus::Archived as i32);
    let rows = h.journey_rows("paused").await;
    assert_eq!(rows[1], ("p2".into(), 1, 3, Some(5)));
    let listed = h
        .campaigns
        .list_flows(h.admin(pb::ListFlowsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.flows.is_empty());
    // Pausing an archived flow is refused; applying it again brings it back as a new version.
    let error = h
        .campaigns
        .pause_flow(h.admin(pb::PauseFlowRequest {
            name: "paused".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_broadcast_with_variants_and_a_control_group_reports_each_variant_against_control() {
    let mut h = spawn_app().await;
    for name in ["promo-a", "promo-b"] {
        h.template(name).await;
    }
    let ids: Vec<String> = (0..40).map(|i| format!("b{i:02}")).collect();
    for id in &ids {
        h.profile(id, "UTC", serde_json::json!({ "audience": "yes" }))
            .await;
    }
    h.segments
        .apply(
            h.admin(pb::ApplySegmentRequest {
                yaml:
                    "kind: Segment\nname: everyone\nwhere: { attribute: audience, eq: \"yes\" }\n"
                        .into(),
                dry_run: false,
            }),
        )
        .await
        .unwrap();
    eventually(20, "segment built", || async {
        let count = h
            .segments
            .clone()
            .count(h.admin(pb::CountSegmentRequest {
                name: "everyone".into(),
            }))
            .await
            .ok()?
            .into_inner()
            .count;
        (count == 40).then_some(())
    })
    .await;
    let spec = pb::BroadcastSpec {
        name: "spring-sale".into(),
        segment: "everyone".into(),
        channels: vec![pb::Channel::InApp as i32],
        variants: vec![
            pb::CampaignVariant {
                name: "A".into(),
                weight: 50,
                template: "promo-a".into(),
                channels: vec![],
            },
            pb::CampaignVariant {
                name: "B".into(),
                weight: 50,
                template: "promo-b".into(),
                channels: vec![],
            },
        ],
        control_group_percent: 25.0,
        ..Default::default()
    };
    // A structured spec with a bad weight names the field.
    let mut bad = spec.clone();
    bad.variants[1].weight = 0;
    let error = h
        .campaigns
        .schedule_broadcast(h.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Spec(bad)),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("spec.variants[1].weight"),
        "{}",
        error.message()
    );
    h.campaigns
        .schedule_broadcast(h.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Spec(spec)),
            dry_run: false,
        }))
        .await
        .unwrap();
    h.settle().await;
    let control: Vec<&String> = ids
        .iter()
        .filter(|id| relance_campaigns::domain::experiment::in_control(id, "spring-sale", 25.0))
        .collect();
    let treated: Vec<&String> = ids.iter().filter(|id| !control.contains(id)).collect();
    for id in &treated {
        h.wait_for_messages(id, 1).await;
    }
    for id in &control {
        assert!(
            h.sent_templates(id).await.is_empty(),
            "{id} is in the control group"
        );
    }
    // Two treated customers and one control customer order within the window.
    h.advance(Duration::hours(3)).await;
    h.track(
        treated[0],
        "order_completed",
        serde_json::json!({ "revenue": 30.0 }),
    )
    .await;
    h.track(
        treated[1],
        "order_completed",
        serde_json::json!({ "revenue": 20.0 }),
    )
    .await;
    h.track(
        control[0],
        "order_completed",
        serde_json::json!({ "revenue": 10.0 }),
    )
    .await;
    eventually(10, "orders kept and sends recorded", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM campaigns.activity WHERE name = 'order_completed') * 1000 \
             + (SELECT count(*) FROM campaigns.messages WHERE status = 1)",
        )
        .fetch_one(&h.db)
        .await
        .unwrap();
        (n == 3000 + treated.len() as i64).then_some(())
    })
    .await;
    let report = h
        .campaigns
        .get_broadcast_report(h.admin(pb::GetBroadcastReportRequest {
            name: "spring-sale".into(),
            range: None,
        }))
        .await
        .unwrap()
        .into_inner();
    let total = report.total.unwrap();
    assert_eq!(
        (total.entered, total.sends, total.conversions),
        (treated.len() as u64, treated.len() as u64, 2)
    );
    assert!((total.revenue - 50.0).abs() < 1e-9);
    let control_stats = report.control.unwrap();
    assert_eq!(
        (control_stats.entered, control_stats.conversions),
        (control.len() as u64, 1)
    );
    assert_eq!(report.variants.len(), 2);
    let assigned: u64 = report
        .variants
        .iter()
        .map(|v| v.stats.unwrap().entered)
        .sum();
    assert_eq!(assigned, treated.len() as u64);
    for variant in &report.variants {
        assert!(
            variant.uplift.is_some(),
            "each variant is compared with control"
        );
    }
    let broadcast = h
        .campaigns
        .get_broadcast(h.admin(pb::GetBroadcastRequest {
            name: "spring-sale".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(broadcast.status, pb::BroadcastStatus::Completed as i32);
    assert_eq!(
        (broadcast.queued, broadcast.control),
        (treated.len() as u64, control.len() as u64)
    );
}

/// Applies a segment of the customers whose `audience` attribute is `value`, and waits until
/// it holds `size` members.
async fn audience_segment(h: &Harness, name: &str, value: &str, size: u64) {
    h.segments
        .clone()
        .apply(h.admin(pb::ApplySegmentRequest {
            yaml: format!(
                "kind: Segment\nname: {name}\nwhere: {{ attribute: audience, eq: \"{value}\" }}\n"
            ),
            dry_run: false,
        }))
        .await
        .unwrap();
    eventually(20, "segment built", || async {
        let count = h
            .segments
            .clone()
            .count(h.admin(pb::CountSegmentRequest { name: name.into() }))
            .await
            .ok()?
            .into_inner()
            .count;
        (count == size).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_scheduled_flow_starts_a_journey_per_member_at_the_local_time_of_each() {
    let mut h = spawn_app().await;
    h.template("vip-recap").await;
    h.profile(
        "vip-algiers",
        "Africa/Algiers",
        serde_json::json!({ "audience": "vip" }),
    )
    .await;
    h.profile(
        "vip-tokyo",
        "Asia/Tokyo",
        serde_json::json!({ "audience": "vip" }),
    )
    .await;
    audience_segment(&h, "vip", "vip", 2).await;
    // Every day at 18:00 in each customer's own timezone.
    h.apply(
        r#"
kind: Flow
name: vip-daily
trigger: { schedule: "0 18 * * *", segment: vip, local_time: true }
steps:
  - send: { channel: in_app, template: vip-recap }
"#,
    )
    .await;
    // Monday 09:00 UTC: 18:00 in Tokyo (UTC+9) is now; in Algiers (UTC+1) it is 17:00 UTC.
    // The run starts when 18:00 first happens anywhere (UTC+14: 04:00 UTC, already past for
    // today's run, so the next is Tuesday's, at Monday 04:00 UTC + 1 day).
    h.settle().await;
    let next: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT next_run_at FROM campaigns.flows WHERE name = 'vip-daily'")
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert_eq!(
        next,
        Some(Utc.with_ymd_and_hms(2026, 3, 3, 4, 0, 0).single().unwrap())
    );
    h.advance(Duration::hours(19)).await; // Tuesday 04:00 UTC: Tuesday's run starts
    h.wait_for_journeys("vip-daily", 2).await;
    let wakes: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT customer_id, next_wake_at FROM campaigns.journeys ORDER BY customer_id",
    )
    .fetch_all(&h.db)
    .await
    .unwrap();
    assert_eq!(
        wakes,
        vec![
            (
                "vip-algiers".to_owned(),
                Utc.with_ymd_and_hms(2026, 3, 3, 17, 0, 0).single().unwrap()
            ),
            (
                "vip-tokyo".to_owned(),
                Utc.with_ymd_and_hms(2026, 3, 3, 9, 0, 0).single().unwrap()
            ),
        ]
    );
    h.advance(Duration::hours(5)).await; // 09:00 UTC
    h.wait_for_messages("vip-tokyo", 1).await;
    assert!(h.sent_templates("vip-algiers").await.is_empty());
    h.advance(Duration::hours(8)).await; // 17:00 UTC
    h.wait_for_messages("vip-algiers", 1).await;
    // The next day's run starts new journeys (the previous ones ended).
    h.advance(Duration::hours(11)).await; // Wednesday 04:00 UTC
    h.wait_for_journeys("vip-daily", 4).await;
}

#[tokio::test]
async fn a_recurring_broadcast_runs_on_its_cron_until_it_ends() {
    let mut h = spawn_app().await;
    h.template("daily-deal").await;
    for id in ["r1", "r2"] {
        h.profile(id, "UTC", serde_json::json!({ "audience": "deals" }))
            .await;
    }
    audience_segment(&h, "deal-lovers", "deals", 2).await;
    let response = h
        .campaigns
        .schedule_broadcast(
            h.admin(pb::ScheduleBroadcastRequest {
                definition: Some(pb::schedule_broadcast_request::Definition::Yaml(
                    r#"
kind: Broadcast
name: daily-deal
segment: deal-lovers
channel: in_app
template: daily-deal
schedule: { cron: "0 10 * * *", ends_at: "2026-03-04T12:00:00Z" }
"#
                    .into(),
                )),
                dry_run: false,
            }),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    assert_eq!(
        response.broadcast.unwrap().next_run_at.unwrap(),
        chrono_to_timestamp(Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).single().unwrap())
    );
    h.settle().await;
    assert!(h.sent_templates("r1").await.is_empty());
    // Monday 10:00, Tuesday 10:00, Wednesday 10:00; Thursday's run is past `ends_at`.
    for day in 1..=3 {
        h.advance(if day == 1 {
            Duration::hours(1)
        } else {
            Duration::days(1)
        })
        .await;
        h.wait_for_messages("r1", day).await;
        h.wait_for_messages("r2", day).await;
        h.settle().await;
    }
    h.advance(Duration::days(1)).await;
    let broadcast = h
        .campaigns
        .get_broadcast(h.admin(pb::GetBroadcastRequest {
            name: "daily-deal".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(broadcast.status, pb::BroadcastStatus::Completed as i32);
    assert_eq!(broadcast.queued, 6);
    assert_eq!(h.sent_templates("r1").await.len(), 3);
}

#[tokio::test]
async fn erasing_a_customer_ends_their_journeys_and_forgets_their_activity() {
    let mut h = spawn_app().await;
    h.template("later").await;
    h.profile("erase-me", "UTC", serde_json::json!({})).await;
    h.apply(
        r#"
kind: Flow
name: slow
trigger: { event: signed_up }
steps:
  - wait: 3d
  - send: { channel: in_app, template: later }
"#,
    )
    .await;
    h.track("erase-me", "signed_up", serde_json::json!({}))
        .await;
    h.track(
        "erase-me",
        "order_completed",
        serde_json::json!({ "revenue": 12.0 }),
    )
    .await;
    h.wait_for_journeys("slow", 1).await;
    h.profiles
        .delete(h.admin(pb::DeleteProfileRequest {
            customer: Some(customer("erase-me")),
        }))
        .await
        .unwrap();
    eventually(10, "journey ended for erasure", || async {
        let rows = h.journey_rows("slow").await;
        (rows[0].3 == Some(7)).then_some(())
    })
    .await;
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM campaigns.activity WHERE customer_id = 'erase-me'",
    )
    .fetch_one(&h.db)
    .await
    .unwrap();
    assert_eq!(kept, 0);
    h.advance(Duration::days(3)).await;
    assert!(h.sent_templates("erase-me").await.is_empty());
}

#[tokio::test]
async fn cancelling_a_broadcast_mid_send_stops_it_and_keeps_what_was_queued() {
    let mut h = spawn_app().await;
    h.template("slow-promo").await;
    let ids: Vec<String> = (0..60).map(|i| format!("s{i:02}")).collect();
    for id in &ids {
        h.profile(id, "UTC", serde_json::json!({ "audience": "slow" }))
            .await;
    }
    audience_segment(&h, "slow-audience", "slow", 60).await;
    h.campaigns
        .schedule_broadcast(h.admin(pb::ScheduleBroadcastRequest {
            definition: Some(pb::schedule_broadcast_request::Definition::Yaml(
                "kind: Broadcast\nname: slow-promo\nsegment: slow-audience\nchannel: in_app\ntemplate: slow-promo\nmax_sends_per_second: 10\n"
                    .into(),
            )),
            dry_run: false,
        }))
        .await
        .unwrap();
    eventually(20, "some queued", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM campaigns.sends WHERE broadcast = 'slow-promo'",
        )
        .fetch_one(&h.db)
        .await
        .unwrap();
        (n >= 10).then_some(())
    })
    .await;
    let cancelled = h
        .campaigns
        .cancel_broadcast(h.admin(pb::CancelBroadcastRequest {
            name: "slow-promo".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, pb::BroadcastStatus::Cancelled as i32);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let queued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM campaigns.sends WHERE broadcast = 'slow-promo'")
            .fetch_one(&h.db)
            .await
            .unwrap();
    let dropped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM campaigns.broadcast_recipients WHERE state = 5")
            .fetch_one(&h.db)
            .await
            .unwrap();
    assert!(queued < 60, "{queued} queued");
    assert_eq!(
        queued + dropped,
        60,
        "every recipient either queued or dropped"
    );
    // Cancelling again changes nothing.
    let again = h
        .campaigns
        .cancel_broadcast(h.admin(pb::CancelBroadcastRequest {
            name: "slow-promo".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.status, again.queued),
        (cancelled.status, queued as u64)
    );
}
