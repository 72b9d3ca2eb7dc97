//! The profiles service against real Postgres and RabbitMQ.

use std::sync::Arc;

use chrono::{Duration, TimeZone as _, Utc};
use relance_kit::bus::{EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::messages::{
    EventBatch, EventMessage, PROFILE_DELETED, PROFILE_MERGED, PROFILE_UPDATED, ProfileDeleted,
    ProfileMerged, ProfileUpdated,
};
use relance_kit::testing::{Tap, TestApp, TestEnv, authed, eventually};
use relance_kit::{ManualClock, SharedClock};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct, struct_to_json};
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::Code;
use tonic::transport::Channel;

async fn spawn_app() -> (TestApp, Arc<ManualClock>) {
    let env = Arc::new(TestEnv::new().await);
    let settings = env.settings.clone();
    let manual = ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .single()
            .expect("date"),
    );
    let clock: SharedClock = manual.clone();
    let app = TestApp::start(
        env,
        settings,
        clock,
        Box::new(|platform, server| Box::pin(relance_profiles::serve(platform, server))),
    )
    .await;
    (app, manual)
}

fn known(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn anonymous(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::AnonymousId(id.into())),
    })
}

async fn client(app: &TestApp) -> ProfilesClient<Channel> {
    ProfilesClient::new(app.channel().await)
}

async fn get(
    profiles: &mut ProfilesClient<Channel>,
    key: &str,
    customer: Option<pb::CustomerRef>,
) -> Result<pb::Profile, tonic::Status> {
    profiles
        .get(authed(key, pb::GetProfileRequest { customer }))
        .await
        .map(|r| r.into_inner())
}

fn attributes(profile: &pb::Profile) -> serde_json::Value {
    profile
        .attributes
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default()
}

#[tokio::test]
async fn upsert_merges_attributes_key_by_key_and_validates_fields() {
    let (app, _) = spawn_app().await;
    let mut updates = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, PROFILE_UPDATED).await;
    let mut profiles = client(&app).await;
    let first = pb::UpsertProfileRequest {
        customer: known("c1"),
        attributes: Some(json_to_struct(
            &serde_json::json!({"first_name": "Amina", "city": "Oran", "gender": "f"}),
        )),
        email: Some("amina@example.dz".into()),
        timezone: Some("Africa/Algiers".into()),
        locale: Some("ar-DZ".into()),
        push_tokens: vec![pb::PushToken {
            token: "tok-1".into(),
            platform: pb::PushPlatform::Android as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    profiles
        .upsert(authed(&app.admin_key, first))
        .await
        .expect("upsert");
    let patch = pb::UpsertProfileRequest {
        customer: known("c1"),
        attributes: Some(json_to_struct(
            &serde_json::json!({"city": "Alger", "gender": null}),
        )),
        ..Default::default()
    };
    let profile = profiles
        .upsert(authed(&app.admin_key, patch))
        .await
        .expect("patch")
        .into_inner();
    assert_eq!(
        attributes(&profile),
        serde_json::json!({"first_name": "Amina", "city": "Alger"})
    );
    assert_eq!(profile.email, "amina@example.dz", "absent fields are kept");
    assert_eq!(
        (profile.timezone.as_str(), profile.locale.as_str()),
        ("Africa/Algiers", "ar-DZ")
    );
    assert_eq!(profile.push_tokens.len(), 1);
    let (_, body) = updates.next(10).await.expect("profile.updated published");
    let update: ProfileUpdated = serde_json::from_slice(&body).expect("json");
    assert_eq!(update.customer_id.as_deref(), Some("c1"));
    assert_eq!(
        update.attributes["first_name"], "Amina",
        "the update carries the values"
    );
    assert!(
        update.changed.contains(&"attributes".to_owned())
            && update.changed.contains(&"addresses".to_owned())
    );
    assert_eq!(update.timezone.as_deref(), Some("Africa/Algiers"));

    for (request, field) in [
        (
            pb::UpsertProfileRequest {
                customer: known("c1"),
                email: Some("not-an-email".into()),
                ..Default::default()
            },
            "email:",
        ),
        (
            pb::UpsertProfileRequest {
                customer: known("c1"),
                timezone: Some("Mars/Base".into()),
                ..Default::default()
            },
            "timezone:",
        ),
        (
            pb::UpsertProfileRequest {
                customer: known("c1"),
                phone: Some("0550".into()),
                ..Default::default()
            },
            "phone:",
        ),
        (
            pb::UpsertProfileRequest {
                customer: None,
                ..Default::default()
            },
            "customer:",
        ),
        (
            pb::UpsertProfileRequest {
                customer: known(""),
                ..Default::default()
            },
            "customer.customer_id:",
        ),
    ] {
        let status = profiles
            .upsert(authed(&app.admin_key, request))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(field),
            "{} should start with {field}",
            status.message()
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn merging_an_anonymous_visitor_is_idempotent_and_announced_once() {
    let (app, _) = spawn_app().await;
    let mut tap = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, PROFILE_MERGED).await;
    let mut profiles = client(&app).await;
    let visitor = pb::UpsertProfileRequest {
        customer: anonymous("anon-1"),
        attributes: Some(json_to_struct(
            &serde_json::json!({"city": "Blida", "utm_source": "ads"}),
        )),
        ..Default::default()
    };
    profiles
        .upsert(authed(&app.admin_key, visitor))
        .await
        .expect("visitor");
    let customer = pb::UpsertProfileRequest {
        customer: known("c7"),
        attributes: Some(json_to_struct(&serde_json::json!({"city": "Oran"}))),
        ..Default::default()
    };
    profiles
        .upsert(authed(&app.admin_key, customer))
        .await
        .expect("customer");

    let merge = || pb::MergeProfilesRequest {
        anonymous_id: "anon-1".into(),
        customer_id: "c7".into(),
    };
    let first = profiles
        .merge(authed(&app.admin_key, merge()))
        .await
        .expect("merge")
        .into_inner();
    assert!(first.merged);
    let profile = first.profile.expect("profile");
    assert_eq!(
        attributes(&profile),
        serde_json::json!({"city": "Oran", "utm_source": "ads"}),
        "the known customer's values win"
    );
    assert_eq!(profile.anonymous_ids, vec!["anon-1".to_owned()]);

    let again = profiles
        .merge(authed(&app.admin_key, merge()))
        .await
        .expect("merge again")
        .into_inner();
    assert!(!again.merged, "merging twice is a no-op");
    assert_eq!(again.profile.expect("profile"), profile);

    let by_anonymous = get(&mut profiles, &app.admin_key, anonymous("anon-1"))
        .await
        .expect("reachable by anonymous id");
    assert_eq!(by_anonymous.customer_id, "c7");

    let (_, body) = tap.next(10).await.expect("profile.merged published");
    let merged: ProfileMerged = serde_json::from_slice(&body).expect("json");
    assert_eq!(merged.customer_id, "c7");
    assert!(tap.next(1).await.is_none(), "announced once");

    let status = profiles
        .merge(authed(
            &app.admin_key,
            pb::MergeProfilesRequest {
                anonymous_id: "anon-1".into(),
                customer_id: "c8".into(),
            },
        ))
        .await
        .expect_err("belongs to c7");
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.stop().await;
}

fn purchase(
    app: &TestApp,
    message_id: &str,
    name: &str,
    customer_id: &str,
    revenue: f64,
    days_ago: i64,
    now: chrono::DateTime<Utc>,
) -> Outgoing {
    batch_of(vec![purchase_event(
        app,
        message_id,
        name,
        customer_id,
        revenue,
        days_ago,
        now,
    )])
}

/// The events as the relay publishes them: one message per batch.
fn batch_of(events: Vec<EventMessage>) -> Outgoing {
    let batch = EventBatch { events };
    Outgoing {
        exchange: EVENTS_EXCHANGE.into(),
        routing_key: format!("event.{}", batch.events[0].name),
        message_id: batch.bus_id(),
        payload: serde_json::to_vec(&batch).expect("json"),
        headers: Default::default(),
    }
}

fn purchase_event(
    app: &TestApp,
    message_id: &str,
    name: &str,
    customer_id: &str,
    revenue: f64,
    days_ago: i64,
    now: chrono::DateTime<Utc>,
) -> EventMessage {
    EventMessage {
        workspace_id: app.workspace.clone(),
        seq: 1,
        message_id: message_id.into(),
        name: name.into(),
        customer_id: Some(customer_id.into()),
        anonymous_id: None,
        timestamp: now - Duration::days(days_ago),
        received_at: now,
        properties: serde_json::json!({"revenue": revenue}),
        context: serde_json::json!({}),
    }
}

#[tokio::test]
async fn purchases_become_traits_once_even_when_redelivered() {
    let (app, clock) = spawn_app().await;
    let now = relance_kit::Clock::now(clock.as_ref());
    let publisher = Publisher::new(app.platform.bus.clone());
    let order = purchase(&app, "o-1", "order_completed", "c1", 100.0, 10, now);
    publisher
        .publish_all(&[
            order.clone(),
            order.clone(),
            purchase(&app, "o-2", "order_completed", "c1", 50.0, 2, now),
        ])
        .await
        .expect("publish");
    publisher
        .publish_all(&[
            purchase(&app, "r-1", "order_refunded", "c1", -20.0, 1, now),
            order,
        ])
        .await
        .expect("publish");

    let mut profiles = client(&app).await;
    let traits = eventually(10, "traits from three distinct purchase events", || {
        let mut profiles = profiles.clone();
        let key = app.admin_key.clone();
        async move {
            let traits = get(&mut profiles, &key, known("c1")).await.ok()?.traits?;
            (traits.orders_count == 2 && traits.refunded > 0.0).then_some(traits)
        }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let traits_later = get(&mut profiles, &app.admin_key, known("c1"))
        .await
        .expect("profile")
        .traits
        .expect("traits");
    assert_eq!(traits_later, traits, "redeliveries changed nothing");
    assert_eq!(traits.orders_count, 2);
    assert!(
        (traits.revenue - 130.0).abs() < 1e-9,
        "150 bought - 20 refunded, got {}",
        traits.revenue
    );
    assert!((traits.average_basket - 65.0).abs() < 1e-9);
    assert_eq!(
        traits.first_purchase_at,
        Some(chrono_to_timestamp(now - Duration::days(10)))
    );
    assert_eq!(
        traits.last_purchase_at,
        Some(chrono_to_timestamp(now - Duration::days(2)))
    );
    app.stop().await;
}

#[tokio::test]
async fn rfm_scores_rank_buyers_by_quintile() {
    let (app, clock) = spawn_app().await;
    let now = relance_kit::Clock::now(clock.as_ref());
    let publisher = Publisher::new(app.platform.bus.clone());
    // Ten buyers: buyer i bought i times, i × 100 in all, last (100 - 10 i) days ago; all
    // 55 orders in one batch, as the relay sends them.
    let mut events = Vec::new();
    for i in 1..=10i64 {
        for order in 0..i {
            let days = if order == 0 { 100 - 10 * i } else { 200 };
            events.push(purchase_event(
                &app,
                &format!("o-{i}-{order}"),
                "order_completed",
                &format!("b{i}"),
                100.0,
                days,
                now,
            ));
        }
    }
    publisher
        .publish_all(&[batch_of(events)])
        .await
        .expect("publish");
    let mut profiles = client(&app).await;
    eventually(15, "all 55 orders applied", || {
        let mut profiles = profiles.clone();
        let key = app.admin_key.clone();
        async move {
            let last = get(&mut profiles, &key, known("b10")).await.ok()?.traits?;
            let first = get(&mut profiles, &key, known("b1")).await.ok()?.traits?;
            (last.orders_count == 10 && first.orders_count == 1).then_some(())
        }
    })
    .await;
    let pool = relance_kit::db::connect(&app.platform.settings, relance_profiles::SCHEMA)
        .await
        .expect("pool");
    let store =
        relance_profiles::store::ProfileStore::new(pool, Arc::new(tokio::sync::Notify::new()));
    relance_profiles::rescore_all(&store, &app.platform.clock)
        .await
        .expect("rescore");

    let best = get(&mut profiles, &app.admin_key, known("b10"))
        .await
        .expect("b10")
        .traits
        .expect("traits");
    let worst = get(&mut profiles, &app.admin_key, known("b1"))
        .await
        .expect("b1")
        .traits
        .expect("traits");
    assert_eq!(
        (best.rfm_recency, best.rfm_frequency, best.rfm_monetary),
        (5, 5, 5)
    );
    assert_eq!(
        (worst.rfm_recency, worst.rfm_frequency, worst.rfm_monetary),
        (1, 1, 1)
    );
    let top = profiles
        .list(authed(
            &app.admin_key,
            pb::ListProfilesRequest {
                page_size: 3,
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = top
        .profiles
        .iter()
        .map(|p| p.customer_id.as_str())
        .collect();
    assert_eq!(ids, vec!["b10", "b9", "b8"]);
    assert!(!top.next_page_token.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_latest_consent_decision_wins_and_the_export_keeps_the_history() {
    let (app, clock) = spawn_app().await;
    let now = relance_kit::Clock::now(clock.as_ref());
    let mut profiles = client(&app).await;
    let consent =
        |status: pb::ConsentStatus, minutes_ago: i64, source: &str| pb::SetConsentRequest {
            customer: known("c1"),
            consent: Some(pb::Consent {
                channel: pb::Channel::Whatsapp as i32,
                topic: "marketing".into(),
                status: status as i32,
                updated_at: Some(chrono_to_timestamp(now - Duration::minutes(minutes_ago))),
                source: source.into(),
            }),
        };
    profiles
        .set_consent(authed(
            &app.admin_key,
            consent(pb::ConsentStatus::OptedOut, 5, "unsubscribe_link"),
        ))
        .await
        .expect("opt out");
    // An older decision that arrives late does not override the newer one.
    let profile = profiles
        .set_consent(authed(
            &app.admin_key,
            consent(pb::ConsentStatus::OptedIn, 60, "signup_form"),
        ))
        .await
        .expect("late")
        .into_inner();
    assert_eq!(profile.consents.len(), 1);
    assert_eq!(
        profile.consents[0].status,
        pb::ConsentStatus::OptedOut as i32
    );

    let bad = pb::SetConsentRequest {
        consent: Some(pb::Consent {
            source: String::new(),
            ..consent(pb::ConsentStatus::OptedIn, 0, "x")
                .consent
                .expect("c")
        }),
        ..consent(pb::ConsentStatus::OptedIn, 0, "x")
    };
    let status = profiles
        .set_consent(authed(&app.admin_key, bad))
        .await
        .expect_err("no source");
    assert!(
        status.message().starts_with("consent.source:"),
        "{}",
        status.message()
    );

    let export = profiles
        .export(authed(
            &app.admin_key,
            pb::ExportProfileRequest {
                customer: known("c1"),
            },
        ))
        .await
        .expect("export")
        .into_inner();
    let document: serde_json::Value = serde_json::from_str(&export.json).expect("json");
    assert_eq!(document["profile"]["customer_id"], "c1");
    assert_eq!(
        document["consent_history"].as_array().map(Vec::len),
        Some(2)
    );
    app.stop().await;
}

#[tokio::test]
async fn delete_erases_the_profile_and_announces_it() {
    let (app, _) = spawn_app().await;
    let mut tap = Tap::bind(&app.platform.bus, EVENTS_EXCHANGE, PROFILE_DELETED).await;
    let mut profiles = client(&app).await;
    profiles
        .upsert(authed(
            &app.admin_key,
            pb::UpsertProfileRequest {
                customer: anonymous("a-9"),
                ..Default::default()
            },
        ))
        .await
        .expect("visitor");
    profiles
        .merge(authed(
            &app.admin_key,
            pb::MergeProfilesRequest {
                anonymous_id: "a-9".into(),
                customer_id: "c9".into(),
            },
        ))
        .await
        .expect("merge");
    let erased = profiles
        .delete(authed(
            &app.admin_key,
            pb::DeleteProfileRequest {
                customer: known("c9"),
            },
        ))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(erased.erased_ids, vec!["c9".to_owned(), "a-9".to_owned()]);
    assert_eq!(
        get(&mut profiles, &app.admin_key, known("c9"))
            .await
            .expect_err("gone")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        get(&mut profiles, &app.admin_key, anonymous("a-9"))
            .await
            .expect_err("gone")
            .code(),
        Code::NotFound
    );
    let (_, body) = tap.next(10).await.expect("profile.deleted published");
    let deleted: ProfileDeleted = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        (
            deleted.customer_id.as_deref(),
            deleted.anonymous_ids.as_slice()
        ),
        (Some("c9"), ["a-9".to_owned()].as_slice())
    );

    let pool = relance_kit::db::connect(&app.platform.settings, relance_profiles::SCHEMA)
        .await
        .expect("pool");
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM profiles) + (SELECT count(*) FROM identities) + (SELECT count(*) FROM consents)",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(left, 0, "nothing of the customer remains");
    app.stop().await;
}

#[tokio::test]
async fn another_workspace_s_key_sees_no_profile() {
    let (app, _) = spawn_app().await;
    let other = app.other_workspace_key().await;
    let mut profiles = client(&app).await;
    profiles
        .upsert(authed(
            &app.admin_key,
            pb::UpsertProfileRequest {
                customer: known("c1"),
                ..Default::default()
            },
        ))
        .await
        .expect("upsert");
    assert_eq!(
        get(&mut profiles, &other, known("c1"))
            .await
            .expect_err("isolated")
            .code(),
        Code::NotFound
    );
    let batch = profiles
        .batch_get(authed(
            &other,
            pb::BatchGetProfilesRequest {
                customers: vec![known("c1").expect("ref")],
            },
        ))
        .await
        .expect("batch")
        .into_inner();
    assert!(batch.profiles.is_empty());
    assert_eq!(batch.not_found.len(), 1);
    let status = profiles
        .get(authed(
            &app.ingest_key,
            pb::GetProfileRequest {
                customer: known("c1"),
            },
        ))
        .await
        .expect_err("ingest scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}
