//! Delivery against real Postgres, RabbitMQ and a real SMTP server, with profiles and events
//! beside it and local fake providers (FCM, APNs, Twilio, Meta, a webhook receiver) that
//! record the exact requests they receive.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use relance_delivery::fake::{FakeProviders, SmtpSink, start_smtp_server};
use relance_delivery::wire::Envelope;
use relance_kit::bus::{DELIVERY_EXCHANGE, EVENTS_EXCHANGE, Outgoing, Publisher};
use relance_kit::testing::{Tap, TestApp, TestEnv, authed, eventually};
use relance_kit::{SharedClock, SystemClock};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::delivery_client::DeliveryClient;
use relance_proto::v1::profiles_client::ProfilesClient;
use relance_proto::v1::{self as pb, customer_ref};
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    app: TestApp,
    delivery: DeliveryClient<Channel>,
    profiles: ProfilesClient<Channel>,
    fake: FakeProviders,
    smtp: SmtpSink,
    tracking: String,
}

const APNS_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgevZzL1gdAFr88hb2
OF/2NxApJCzGCEDdfSp6VQO30hyhRANCAAQRWz+jn65BtOMvdyHKcvjBeBSDZH2r
1RTwjmYSi9R/zpBnuQ4EiMnCqfMPWiZqB4QdbAd0E7oH50VpuZ1P087G
-----END PRIVATE KEY-----";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_app(extra: &[(&str, &str)]) -> Harness {
    let fake = FakeProviders::start().await.unwrap();
    let smtp = start_smtp_server().await.unwrap();
    let env = Arc::new(TestEnv::new().await);
    let http_port = free_port();
    let tracking = format!("http://127.0.0.1:{http_port}");
    let base = fake.base_url();
    let providers = format!(
        r#"
[delivery]
http_addr = "127.0.0.1:{http_port}"
public_url = "{tracking}"
link_secret = "test-link-secret"
retry_base_ms = 300
retry_cap_ms = 2000
max_attempts = 4
lease_secs = 5
sweep_every_secs = 1
sweep_grace_secs = 1

[[delivery.providers]]
name = "fcm"
kind = "fcm"
base_url = "{base}"
project_id = "shop"
access_token = "fcm-test-token"

[[delivery.providers]]
name = "fcm-backup"
kind = "fcm"
base_url = "{base}"
project_id = "shop-backup"
access_token = "fcm-backup-token"

[[delivery.providers]]
name = "apns"
kind = "apns"
base_url = "{base}"
team_id = "TEAM123456"
key_id = "KEY1234567"
topic = "com.shop.app"
private_key = """{APNS_KEY}"""

[[delivery.providers]]
name = "smtp"
kind = "smtp"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from_address = "news@shop.example"
from_name = "Shop"

[[delivery.providers]]
name = "twilio"
kind = "twilio"
base_url = "{base}"
account_sid = "AC123"
auth_token = "twilio-secret"
from = "+15550001111"

[[delivery.providers]]
name = "meta"
kind = "meta"
base_url = "{base}"
phone_number_id = "1055"
access_token = "meta-token"
app_secret = "meta-app-secret"
verify_token = "verify-me"

[[delivery.providers]]
name = "webhook"
kind = "webhook"
url = "{base}/webhook"
secret = "hook-secret"
"#,
        smtp_port = smtp.port()
    );
    let settings = env.settings.with_toml(&providers).unwrap();
    let settings = settings.with(extra).unwrap();
    let clock: SharedClock = Arc::new(SystemClock);
    let app = TestApp::start(
        env,
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
    let channel = app.channel().await;
    Harness {
        delivery: DeliveryClient::new(channel.clone()),
        profiles: ProfilesClient::new(channel),
        app,
        fake,
        smtp,
        tracking,
    }
}

fn customer(id: &str) -> Option<pb::CustomerRef> {
    Some(pb::CustomerRef {
        id: Some(customer_ref::Id::CustomerId(id.into())),
    })
}

fn consent(channel: pb::Channel, status: pb::ConsentStatus) -> pb::Consent {
    pb::Consent {
        channel: channel as i32,
        topic: String::new(),
        status: status as i32,
        updated_at: None,
        source: "signup_form".into(),
    }
}

impl Harness {
    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        authed(&self.app.admin_key, message)
    }

    /// A customer with every address, opted in to every channel unless `opted_in` is false.
    async fn customer(&mut self, id: &str, locale: &str, opted_in: bool) {
        let attributes = serde_json::json!({"first_name": "Amina", "preferred_channel": ""});
        let upsert = pb::UpsertProfileRequest {
            customer: customer(id),
            attributes: Some(json_to_struct(&attributes)),
            email: Some(format!("{id}@example.com")),
            phone: Some("+213555123412".into()),
            push_tokens: vec![pb::PushToken {
                token: format!("android-token-{id}"),
                platform: pb::PushPlatform::Android as i32,
                app_id: "com.shop.app".into(),
                updated_at: None,
            }],
            locale: Some(locale.into()),
            ..Default::default()
        };
        self.profiles.upsert(self.admin(upsert)).await.unwrap();
        if opted_in {
            for channel in [
                pb::Channel::Push,
                pb::Channel::Email,
                pb::Channel::Sms,
                pb::Channel::Whatsapp,
            ] {
                let request = pb::SetConsentRequest {
                    customer: customer(id),
                    consent: Some(consent(channel, pb::ConsentStatus::OptedIn)),
                };
                self.profiles
                    .set_consent(self.admin(request))
                    .await
                    .unwrap();
            }
        }
    }

    async fn save(&mut self, template: pb::Template) -> pb::UpsertTemplateResponse {
        let request = pb::UpsertTemplateRequest {
            template: Some(template),
            dry_run: false,
        };
        self.delivery
            .upsert_template(self.admin(request))
            .await
            .unwrap()
            .into_inner()
    }

    async fn send(&mut self, request: pb::SendRequest) -> pb::SendResponse {
        self.delivery
            .send(self.admin(request))
            .await
            .unwrap()
            .into_inner()
    }

    async fn message(&mut self, key: &str) -> pb::MessageRecord {
        let request = pb::GetMessageRequest {
            key: Some(pb::get_message_request::Key::IdempotencyKey(key.into())),
        };
        self.delivery
            .get_message(self.admin(request))
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the message has left QUEUED (and RETRYING unless `through_retries`).
    async fn outcome(&mut self, key: &str) -> pb::MessageRecord {
        let mut delivery = self.delivery.clone();
        let admin = self.app.admin_key.clone();
        eventually(30, &format!("message {key} to end"), || {
            let mut delivery = delivery.clone();
            let admin = admin.clone();
            async move {
                let request = pb::GetMessageRequest {
                    key: Some(pb::get_message_request::Key::IdempotencyKey(key.into())),
                };
                let record = delivery
                    .get_message(authed(&admin, request))
                    .await
                    .ok()?
                    .into_inner();
                let status = pb::MessageStatus::try_from(record.status).ok()?;
                match status {
                    pb::MessageStatus::Queued | pb::MessageStatus::Retrying => None,
                    _ => Some(record),
                }
            }
        })
        .await;
        let _ = &mut delivery;
        self.message(key).await
    }
}

fn every_channel_template(name: &str) -> pb::Template {
    let content = pb::MessageContent {
        push: Some(pb::PushContent {
            title: "Hello {{ customer.first_name }}".into(),
            body: "Your cart: {{ data.items[0].title }}".into(),
            url: "https://shop.example/cart".into(),
            ..Default::default()
        }),
        email: Some(pb::EmailContent {
            subject: "Your cart, {{ customer.first_name }}".into(),
            html: "<html><body><p>Hi {{ customer.first_name | default: \"there\" }}</p>\
                   <a href=\"https://shop.example/cart?x=1&amp;y=2\">Back to cart</a></body></html>"
                .into(),
            ..Default::default()
        }),
        sms: Some(pb::SmsContent {
            body: "Hi {{ customer.first_name }}, your cart is waiting".into(),
        }),
        whatsapp: Some(pb::WhatsAppContent {
            template_name: "cart_reminder".into(),
            language: "fr".into(),
            body_parameters: vec![
                "{{ customer.first_name }}".into(),
                "{{ data.items[0].title }}".into(),
            ],
            ..Default::default()
        }),
        in_app: Some(pb::InAppContent {
            title: "Hello {{ customer.first_name }}".into(),
            body: "Your cart is waiting".into(),
            url: "https://shop.example/cart".into(),
            ..Default::default()
        }),
        webhook: Some(pb::WebhookContent {
            body:
                "{\"who\": \"{{ customer.customer_id }}\", \"item\": \"{{ data.items[0].title }}\"}"
                    .into(),
            ..Default::default()
        }),
    };
    pb::Template {
        name: name.into(),
        default_locale: "fr".into(),
        variants: vec![pb::TemplateVariant {
            locale: "fr".into(),
            direction: 0,
            content: Some(content),
        }],
        sample_data: Some(json_to_struct(&serde_json::json!({
            "customer": {"first_name": "Amina", "customer_id": "c1"},
            "data": {"items": [{"title": "Lamp", "product_id": "p1"}]},
        }))),
        ..Default::default()
    }
}

fn send_request(
    key: &str,
    customer_id: &str,
    channels: &[pb::Channel],
    template: &str,
) -> pb::SendRequest {
    pb::SendRequest {
        idempotency_key: key.into(),
        customer: customer(customer_id),
        channels: channels.iter().map(|c| *c as i32).collect(),
        content: Some(pb::send_request::Content::Template(template.into())),
        topic: "marketing".into(),
        kind: pb::MessageKind::Marketing as i32,
        data: Some(json_to_struct(
            &serde_json::json!({"items": [{"title": "Lamp", "product_id": "p1"}]}),
        )),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_channel_goes_out_in_its_providers_wire_format() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    let saved = h.save(every_channel_template("cart-1")).await;
    assert_eq!((saved.version, saved.changed), (1, true));

    let channels = [
        pb::Channel::Push,
        pb::Channel::Email,
        pb::Channel::Sms,
        pb::Channel::Whatsapp,
        pb::Channel::InApp,
        pb::Channel::Webhook,
    ];
    for channel in channels {
        let key = format!("wire-{}", channel.as_str_name());
        let response = h.send(send_request(&key, "c1", &[channel], "cart-1")).await;
        assert!(!response.duplicate);
        let record = h.outcome(&key).await;
        assert_eq!(
            record.status,
            pb::MessageStatus::Sent as i32,
            "{channel:?}: {record:?}"
        );
        assert_eq!(record.channel, channel as i32);
        assert_eq!(record.template_version, 1);
    }

    // FCM HTTP v1.
    let fcm = h.fake.requests_for("/v1/projects/shop/messages:send");
    assert_eq!(fcm.len(), 1);
    assert_eq!(fcm[0].method, "POST");
    assert_eq!(
        fcm[0].header("authorization"),
        Some("Bearer fcm-test-token")
    );
    let body = fcm[0].json();
    assert_eq!(body["message"]["token"], "android-token-c1");
    assert_eq!(body["message"]["notification"]["title"], "Hello Amina");
    assert_eq!(body["message"]["notification"]["body"], "Your cart: Lamp");
    let push_url = body["message"]["data"]["url"].as_str().unwrap();
    assert!(
        push_url.starts_with(&format!("{}/c/", h.tracking)),
        "{push_url}"
    );
    let push_record = h.message("wire-CHANNEL_PUSH").await;
    assert_eq!(
        body["message"]["data"]["relance_message_id"],
        push_record.message_id
    );
    assert_eq!(push_record.address, "…ken-c1");
    assert_eq!(push_record.provider, "fcm");

    // SMTP: multipart, tracking links, open pixel, List-Unsubscribe (marketing).
    let mails = eventually(10, "the e-mail at the SMTP server", || {
        let messages = h.smtp.messages();
        async move { (!messages.is_empty()).then_some(messages) }
    })
    .await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(mail.contains("Subject: Your cart, Amina"), "{mail}");
    assert!(mail.contains("multipart/alternative"), "{mail}");
    assert!(
        mail.contains("List-Unsubscribe: <http://127.0.0.1:"),
        "{mail}"
    );
    assert!(
        mail.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        "{mail}"
    );
    let email_record = h.message("wire-CHANNEL_EMAIL").await;
    let html = email_record
        .rendered
        .as_ref()
        .unwrap()
        .email
        .as_ref()
        .unwrap()
        .html
        .clone();
    assert!(html.contains(&format!("{}/c/", h.tracking)), "{html}");
    assert!(html.contains(&format!("{}/o/", h.tracking)), "{html}");
    assert!(
        !html.contains("href=\"https://shop.example/cart"),
        "links are wrapped: {html}"
    );

    // Twilio.
    let sms = h
        .fake
        .requests_for("/2010-04-01/Accounts/AC123/Messages.json");
    assert_eq!(sms.len(), 1);
    let form: HashMap<String, String> = sms[0].form().into_iter().collect();
    assert_eq!(form["To"], "+213555123412");
    assert_eq!(form["From"], "+15550001111");
    assert_eq!(form["Body"], "Hi Amina, your cart is waiting");

    // Meta WhatsApp Cloud API template message.
    let whatsapp = h.fake.requests_for("/v21.0/1055/messages");
    assert_eq!(whatsapp.len(), 1);
    let body = whatsapp[0].json();
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["to"], "213555123412");
    assert_eq!(body["type"], "template");
    assert_eq!(body["template"]["name"], "cart_reminder");
    assert_eq!(body["template"]["language"]["code"], "fr");
    let parameters = &body["template"]["components"][0]["parameters"];
    assert_eq!(parameters[0]["text"], "Amina");
    assert_eq!(parameters[1]["text"], "Lamp");

    // Webhook: the rendered JSON, signed.
    let hooks = h.fake.requests_for("/webhook");
    assert_eq!(hooks.len(), 1);
    assert_eq!(
        hooks[0].json(),
        serde_json::json!({"who": "c1", "item": "Lamp"})
    );
    let timestamp: i64 = hooks[0]
        .header("x-relance-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let expected =
        relance_delivery::channels::webhook::sign(b"hook-secret", timestamp, &hooks[0].body);
    assert_eq!(
        hooks[0].header("x-relance-signature"),
        Some(expected.as_str())
    );

    // In-app: in the inbox, unread, then read.
    let inbox = h
        .delivery
        .list_inbox(authed(
            &h.app.ingest_key,
            pb::ListInboxRequest {
                customer: customer("c1"),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.unread_count, 1);
    assert_eq!(inbox.messages[0].title, "Hello Amina");
    assert_eq!(inbox.messages[0].direction, pb::TextDirection::Ltr as i32);
    let marked = h
        .delivery
        .mark_read(authed(
            &h.app.ingest_key,
            pb::MarkReadRequest {
                customer: customer("c1"),
                message_ids: vec![inbox.messages[0].message_id.clone()],
                all: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((marked.marked, marked.unread_count), (1, 0));

    h.app.stop().await;
}

#[tokio::test]
async fn a_request_delivered_twice_sends_once() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;

    // Through Send: the retried call returns the first outcome.
    let first = h
        .send(send_request(
            "twice-rpc",
            "c1",
            &[pb::Channel::Push],
            "cart-1",
        ))
        .await;
    let second = h
        .send(send_request(
            "twice-rpc",
            "c1",
            &[pb::Channel::Push],
            "cart-1",
        ))
        .await;
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.message_id, second.message_id);

    // Through the bus: the same request published three times (a producer's retry and a
    // broker redelivery), some in one batch.
    let publisher = Publisher::new(h.app.platform.bus.clone());
    let request = send_request("twice-bus", "c1", &[pb::Channel::Push], "cart-1");
    let envelope = serde_json::to_vec(&Envelope::new(&h.app.workspace, &request)).unwrap();
    let outgoing = Outgoing {
        exchange: DELIVERY_EXCHANGE.into(),
        routing_key: "push".into(),
        message_id: format!("{}:twice-bus", h.app.workspace),
        payload: envelope,
        headers: Default::default(),
    };
    publisher
        .publish_all(&[outgoing.clone(), outgoing.clone()])
        .await
        .unwrap();
    h.outcome("twice-bus").await;
    publisher.publish_all(&[outgoing]).await.unwrap();
    h.outcome("twice-rpc").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fcm = h.fake.requests_for("/v1/projects/shop/messages:send");
    assert_eq!(fcm.len(), 2, "one push per idempotency key");
    let record = h.message("twice-bus").await;
    assert_eq!(record.attempts, 1);
    h.app.stop().await;
}

#[tokio::test]
async fn temporary_failures_are_retried_then_succeed_and_permanent_ones_are_not() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.customer("c2", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;

    // Twilio answers 503 twice, then accepts.
    h.fake.fail_next(
        "/2010-04-01/",
        503,
        "{\"code\": 20503, \"message\": \"unavailable\"}",
        2,
    );
    h.send(send_request(
        "retry-sms",
        "c1",
        &[pb::Channel::Sms],
        "cart-1",
    ))
    .await;
    let record = h.outcome("retry-sms").await;
    assert_eq!(record.status, pb::MessageStatus::Sent as i32, "{record:?}");
    assert_eq!(record.attempts, 3);
    assert_eq!(h.fake.requests_for("/2010-04-01/").len(), 3);

    // FCM says the token is dead: failed at once, not retried, token removed from the profile.
    h.fake.fail_next(
        "/v1/projects/shop/",
        404,
        "{\"error\": {\"code\": 404, \"message\": \"Requested entity was not found.\", \"status\": \"NOT_FOUND\", \
         \"details\": [{\"@type\": \"type.googleapis.com/google.firebase.fcm.v1.FcmError\", \"errorCode\": \"UNREGISTERED\"}]}}",
        1,
    );
    h.send(send_request(
        "dead-token",
        "c2",
        &[pb::Channel::Push],
        "cart-1",
    ))
    .await;
    let record = h.outcome("dead-token").await;
    assert_eq!(record.status, pb::MessageStatus::Failed as i32);
    assert_eq!(record.reason, pb::MessageReason::InvalidAddress as i32);
    assert_eq!(record.attempts, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.fake.requests_for("/v1/projects/shop/").len(),
        1,
        "a permanent error is not retried"
    );
    let mut profiles = h.profiles.clone();
    let admin = h.app.admin_key.clone();
    eventually(10, "the dead token removed from the profile", || {
        let mut profiles = profiles.clone();
        let admin = admin.clone();
        async move {
            let profile = profiles
                .get(authed(
                    &admin,
                    pb::GetProfileRequest {
                        customer: customer("c2"),
                    },
                ))
                .await
                .ok()?
                .into_inner();
            profile.push_tokens.is_empty().then_some(())
        }
    })
    .await;
    let _ = &mut profiles;
    h.app.stop().await;
}

#[tokio::test]
async fn a_provider_that_is_down_fails_over_to_the_secondary() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;
    h.fake.set_down("/v1/projects/shop/", true);
    h.send(send_request(
        "failover",
        "c1",
        &[pb::Channel::Push],
        "cart-1",
    ))
    .await;
    let record = h.outcome("failover").await;
    assert_eq!(record.status, pb::MessageStatus::Sent as i32, "{record:?}");
    assert_eq!(record.provider, "fcm-backup");
    let backup = h.fake.requests_for("/v1/projects/shop-backup/");
    assert_eq!(backup.len(), 1);
    assert_eq!(
        backup[0].header("authorization"),
        Some("Bearer fcm-backup-token")
    );
    h.app.stop().await;
}

#[tokio::test]
async fn consent_and_missing_addresses_skip_with_their_reason() {
    let mut h = spawn_app(&[]).await;
    h.customer("no-consent", "fr", false).await;
    h.save(every_channel_template("cart-1")).await;

    // Marketing without an opt-in: skipped.
    h.send(send_request(
        "marketing-no-consent",
        "no-consent",
        &[pb::Channel::Push, pb::Channel::Email],
        "cart-1",
    ))
    .await;
    let record = h.outcome("marketing-no-consent").await;
    assert_eq!(record.status, pb::MessageStatus::Skipped as i32);
    assert_eq!(record.reason, pb::MessageReason::NoConsent as i32);

    // Transactional needs no opt-in…
    let mut transactional = send_request("order-1", "no-consent", &[pb::Channel::Email], "cart-1");
    transactional.kind = pb::MessageKind::Transactional as i32;
    transactional.topic = "order_updates".into();
    h.send(transactional).await;
    assert_eq!(
        h.outcome("order-1").await.status,
        pb::MessageStatus::Sent as i32
    );

    // …but respects an opt-out of its topic.
    let opt_out = pb::SetConsentRequest {
        customer: customer("no-consent"),
        consent: Some(pb::Consent {
            channel: pb::Channel::Email as i32,
            topic: "order_updates".into(),
            status: pb::ConsentStatus::OptedOut as i32,
            updated_at: None,
            source: "support".into(),
        }),
    };
    h.profiles.set_consent(h.admin(opt_out)).await.unwrap();
    let mut transactional = send_request("order-2", "no-consent", &[pb::Channel::Email], "cart-1");
    transactional.kind = pb::MessageKind::Transactional as i32;
    transactional.topic = "order_updates".into();
    h.send(transactional).await;
    assert_eq!(
        h.outcome("order-2").await.reason,
        pb::MessageReason::NoConsent as i32
    );

    // A customer with no push token: no address.
    let upsert = pb::UpsertProfileRequest {
        customer: customer("no-token"),
        ..Default::default()
    };
    h.profiles.upsert(h.admin(upsert)).await.unwrap();
    let mut request = send_request("no-token-1", "no-token", &[pb::Channel::Push], "cart-1");
    request.kind = pb::MessageKind::Transactional as i32;
    h.send(request).await;
    let record = h.outcome("no-token-1").await;
    assert_eq!(record.status, pb::MessageStatus::Skipped as i32);
    assert_eq!(record.reason, pb::MessageReason::NoAddress as i32);

    // Nobody at all.
    h.send(send_request(
        "ghost-1",
        "ghost",
        &[pb::Channel::Push],
        "cart-1",
    ))
    .await;
    assert_eq!(
        h.outcome("ghost-1").await.reason,
        pb::MessageReason::UnknownCustomer as i32
    );
    assert_eq!(h.fake.count(), 0, "nothing reached a provider");
    h.app.stop().await;
}

#[tokio::test]
async fn template_errors_are_refused_at_save_and_bad_requests_name_the_field() {
    let mut h = spawn_app(&[]).await;
    let mut bad = every_channel_template("cart-bad");
    bad.variants[0]
        .content
        .as_mut()
        .unwrap()
        .email
        .as_mut()
        .unwrap()
        .html = "<p>{{ customer.first_name | monye }}</p>".into();
    let error = h
        .delivery
        .upsert_template(h.admin(pb::UpsertTemplateRequest {
            template: Some(bad.clone()),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error
            .message()
            .starts_with("template.variants[0].content.email.html:"),
        "{}",
        error.message()
    );
    assert!(error.message().contains("monye"), "{}", error.message());
    let dry = h
        .delivery
        .upsert_template(h.admin(pb::UpsertTemplateRequest {
            template: Some(bad),
            dry_run: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.errors[0].field, "variants[0].content.email.html");
    let missing = h
        .delivery
        .get_template(h.admin(pb::GetTemplateRequest {
            name: "cart-bad".into(),
            version: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Unclosed tag.
    let mut unclosed = every_channel_template("cart-bad");
    unclosed.variants[0]
        .content
        .as_mut()
        .unwrap()
        .push
        .as_mut()
        .unwrap()
        .body = "{% if x %}oops".into();
    let error = h
        .delivery
        .upsert_template(h.admin(pb::UpsertTemplateRequest {
            template: Some(unclosed),
            dry_run: false,
        }))
        .await
        .unwrap_err();
    assert!(
        error
            .message()
            .starts_with("template.variants[0].content.push.body:"),
        "{}",
        error.message()
    );

    // Saving the same template twice stores one version.
    assert_eq!(h.save(every_channel_template("cart-1")).await.version, 1);
    let again = h.save(every_channel_template("cart-1")).await;
    assert_eq!((again.version, again.changed), (1, false));

    // Send requests: each fault names its field.
    let cases: Vec<(pb::SendRequest, &str)> = vec![
        (
            pb::SendRequest {
                idempotency_key: String::new(),
                ..send_request("k", "c1", &[pb::Channel::Push], "cart-1")
            },
            "idempotency_key",
        ),
        (
            pb::SendRequest {
                channels: vec![],
                ..send_request("k", "c1", &[pb::Channel::Push], "cart-1")
            },
            "channels",
        ),
        (
            pb::SendRequest {
                topic: String::new(),
                ..send_request("k", "c1", &[pb::Channel::Push], "cart-1")
            },
            "topic",
        ),
        (
            send_request("k", "c1", &[pb::Channel::Push], "no-such-template"),
            "template",
        ),
    ];
    for (request, field) in cases {
        let error = h.delivery.send(h.admin(request)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(
            error.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            error.message()
        );
    }
    h.app.stop().await;
}

#[tokio::test]
async fn products_fall_back_when_recommendations_time_out() {
    // Recommendations "answers" on a port that accepts connections and never replies.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut h = spawn_app(&[("services.recommendations", silent_url.as_str())]).await;
    h.customer("c1", "fr", true).await;
    let mut template = every_channel_template("with-products");
    template.products = Some(pb::TemplateProducts {
        placement: pb::Placement::Email as i32,
        n: 3,
        timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 50_000_000,
        }),
        fallback: pb::ProductsFallback::Omit as i32,
        ..Default::default()
    });
    template.variants[0].content.as_mut().unwrap().email.as_mut().unwrap().html =
        "<html><body>{% if products != empty %}{% for p in products %}<a href=\"{{ p.url }}\">{{ p.title }}</a>{% endfor %}\
         {% else %}<p>See what is new</p>{% endif %}</body></html>".into();
    template.sample_data = Some(json_to_struct(&serde_json::json!({
        "customer": {"first_name": "Amina"},
        "data": {"items": [{"title": "Lamp"}]},
        "products": [{"id": "p1", "title": "Lamp", "url": "https://shop.example/p1"}],
    })));
    h.save(template).await;
    let started = std::time::Instant::now();
    let mut request = send_request(
        "products-timeout",
        "c1",
        &[pb::Channel::Email],
        "with-products",
    );
    request.wait_for_outcome = true;
    let response = h.send(request).await;
    assert_eq!(
        response.status,
        pb::MessageStatus::Sent as i32,
        "{response:?}"
    );
    let record = h.message("products-timeout").await;
    let html = record.rendered.unwrap().email.unwrap().html;
    assert!(html.contains("See what is new"), "{html}");
    assert!(started.elapsed() < Duration::from_secs(10));
    h.app.stop().await;
}

#[tokio::test]
async fn click_links_redirect_and_tampered_ones_are_refused() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;
    h.send(send_request(
        "click-1",
        "c1",
        &[pb::Channel::Email],
        "cart-1",
    ))
    .await;
    let record = h.outcome("click-1").await;
    let html = record.rendered.unwrap().email.unwrap().html;
    let start = html.find(&format!("{}/c/", h.tracking)).unwrap();
    let link: String = html[start..].chars().take_while(|c| *c != '"').collect();

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(&link).send().await.unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        "https://shop.example/cart?x=1&y=2"
    );

    // One character changed: refused, and no redirect anywhere.
    let mut tampered: Vec<char> = link.chars().collect();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let response = client.get(&tampered).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().get("location").is_none());
    // A link to somewhere else entirely, never signed.
    let response = client
        .get(format!("{}/c/aHR0cHM6Ly9ldmlsLmV4YW1wbGU", h.tracking))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // The click and the implied open are recorded once, and announced as events.
    let mut tap = Tap::bind(
        &h.app.platform.bus,
        EVENTS_EXCHANGE,
        "event.message_clicked",
    )
    .await;
    client.get(&link).send().await.unwrap();
    let record = h.message("click-1").await;
    assert!(record.clicked_at.is_some());
    assert!(record.opened_at.is_some());
    let (_, body) = tap
        .next(20)
        .await
        .expect("message_clicked reaches the event stream");
    let batch: relance_kit::messages::EventBatch = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].properties["message_id"], record.message_id);
    assert_eq!(batch.events[0].properties["channel"], "email");
    h.app.stop().await;
}

#[tokio::test]
async fn an_arabic_template_renders_right_to_left() {
    let mut h = spawn_app(&[]).await;
    h.customer("c-ar", "ar-DZ", true).await;
    let mut template = every_channel_template("welcome");
    let arabic = pb::MessageContent {
        email: Some(pb::EmailContent {
            subject: "مرحبا {{ customer.first_name }}".into(),
            html: "<html><body><p>مرحبا بك في متجرنا</p></body></html>".into(),
            ..Default::default()
        }),
        in_app: Some(pb::InAppContent {
            title: "مرحبا".into(),
            body: "تخفيضات اليوم".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    template.variants.push(pb::TemplateVariant {
        locale: "ar".into(),
        direction: 0,
        content: Some(arabic),
    });
    h.save(template).await;
    h.send(send_request(
        "ar-email",
        "c-ar",
        &[pb::Channel::Email],
        "welcome",
    ))
    .await;
    h.send(send_request(
        "ar-inapp",
        "c-ar",
        &[pb::Channel::InApp],
        "welcome",
    ))
    .await;
    let email = h.outcome("ar-email").await;
    assert_eq!(email.locale, "ar");
    let html = email.rendered.unwrap().email.unwrap().html;
    assert!(html.contains("dir=\"rtl\""), "{html}");
    assert!(html.contains("lang=\"ar\""), "{html}");
    h.outcome("ar-inapp").await;
    let inbox = h
        .delivery
        .list_inbox(h.admin(pb::ListInboxRequest {
            customer: customer("c-ar"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.messages[0].direction, pb::TextDirection::Rtl as i32);
    assert_eq!(inbox.messages[0].locale, "ar");

    // The preview shows the same for the customer.
    let preview = h
        .delivery
        .preview_template(h.admin(pb::PreviewTemplateRequest {
            source: Some(pb::preview_template_request::Source::Name("welcome".into())),
            customer: customer("c-ar"),
            channel: pb::Channel::Email as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.direction, pb::TextDirection::Rtl as i32);
    assert!(
        preview
            .rendered
            .unwrap()
            .email
            .unwrap()
            .subject
            .contains("Amina")
    );
    h.app.stop().await;
}

#[tokio::test]
async fn requests_that_can_never_be_handled_wait_in_the_dead_letter_queue() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;
    let publisher = Publisher::new(h.app.platform.bus.clone());
    // No kind on the bus: a producer's bug, refused to the dead-letter queue.
    let mut invalid = send_request("no-kind", "c1", &[pb::Channel::Push], "cart-1");
    invalid.kind = pb::MessageKind::Unspecified as i32;
    let bodies = [
        serde_json::to_vec(&Envelope::new(&h.app.workspace, &invalid)).unwrap(),
        b"not json at all".to_vec(),
    ];
    for (index, body) in bodies.iter().enumerate() {
        publisher
            .publish_all(&[Outgoing {
                exchange: DELIVERY_EXCHANGE.into(),
                routing_key: "push".into(),
                message_id: format!("bad-{index}"),
                payload: body.clone(),
                headers: Default::default(),
            }])
            .await
            .unwrap();
    }
    let bus = h.app.platform.bus.clone();
    let letters = eventually(20, "both requests in the dead-letter queue", || {
        let bus = bus.clone();
        async move {
            let letters = relance_delivery::dlq::list(&bus, 10).await.ok()?;
            (letters.len() == 2).then_some(letters)
        }
    })
    .await;
    assert!(
        letters.iter().any(|l| l.summary.contains("\"no-kind\"")),
        "{letters:?}"
    );
    assert!(
        letters.iter().any(|l| l.summary.starts_with("undecodable")),
        "{letters:?}"
    );
    // Listing leaves them there; nothing was sent and nothing is in the ledger.
    assert_eq!(
        relance_delivery::dlq::list(&bus, 10).await.unwrap().len(),
        2
    );
    assert_eq!(h.fake.count(), 0);

    // Replayed, they go through the queue again (and, still broken, come back). The broker
    // puts back what `list` held asynchronously: replay once both are ready again.
    eventually(20, "the listed requests back in the queue", || {
        let bus = bus.clone();
        async move {
            let depth = bus.queue_depth("delivery.requests.dlq").await.ok()?;
            (depth == 2).then_some(())
        }
    })
    .await;
    assert_eq!(relance_delivery::dlq::replay(&bus, 10).await.unwrap(), 2);
    eventually(20, "the replayed requests refused again", || {
        let bus = bus.clone();
        async move {
            let letters = relance_delivery::dlq::list(&bus, 10).await.ok()?;
            (letters.len() == 2).then_some(())
        }
    })
    .await;
    h.app.stop().await;
}

#[tokio::test]
async fn provider_receipts_and_app_opens_reach_the_ledger_and_the_event_stream() {
    use hmac::Mac as _;
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;
    h.send(send_request(
        "receipt-sms",
        "c1",
        &[pb::Channel::Sms],
        "cart-1",
    ))
    .await;
    h.send(send_request(
        "receipt-wa",
        "c1",
        &[pb::Channel::Whatsapp],
        "cart-1",
    ))
    .await;
    h.send(send_request(
        "opened-push",
        "c1",
        &[pb::Channel::Push],
        "cart-1",
    ))
    .await;
    let sms = h.outcome("receipt-sms").await;
    let whatsapp = h.outcome("receipt-wa").await;
    let push = h.outcome("opened-push").await;
    assert!(!sms.provider_message_id.is_empty());
    let mut tap = Tap::bind(
        &h.app.platform.bus,
        EVENTS_EXCHANGE,
        "event.message_delivered",
    )
    .await;
    let client = reqwest::Client::new();

    // Twilio's status callback, signed as Twilio signs it.
    let url = format!("{}/receipts/twilio", h.tracking);
    let params = vec![
        ("MessageSid".to_owned(), sms.provider_message_id.clone()),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
    ];
    let signature =
        relance_delivery::domain::receipts::twilio_signature(b"twilio-secret", &url, &params);
    let forged = client
        .post(&url)
        .header("x-twilio-signature", "AAAA")
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403, "an unsigned receipt is refused");
    assert_eq!(
        h.message("receipt-sms").await.status,
        pb::MessageStatus::Sent as i32
    );
    let response = client
        .post(&url)
        .header("x-twilio-signature", signature)
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let record = h.message("receipt-sms").await;
    assert_eq!(record.status, pb::MessageStatus::Delivered as i32);
    assert!(record.delivered_at.is_some());
    let (_, body) = tap
        .next(20)
        .await
        .expect("message_delivered on the event stream");
    let batch: relance_kit::messages::EventBatch = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch.events[0].properties["message_id"], record.message_id);
    assert_eq!(batch.events[0].properties["channel"], "sms");

    // Meta's webhook: a failure after acceptance.
    let body = serde_json::json!({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {"statuses": [
        {"id": whatsapp.provider_message_id, "status": "failed", "errors": [{"code": 131026, "title": "Message undeliverable"}]}
    ]}}]}]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"meta-app-secret").unwrap();
    mac.update(&bytes);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let response = client
        .post(format!("{}/receipts/meta", h.tracking))
        .header("x-hub-signature-256", signature)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let record = h.message("receipt-wa").await;
    assert_eq!(record.status, pb::MessageStatus::Failed as i32);
    assert!(
        record.reason_detail.contains("131026"),
        "{}",
        record.reason_detail
    );
    let challenge = client
        .get(format!(
            "{}/receipts/meta?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=42",
            h.tracking
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.text().await.unwrap(), "42");

    // The app reports the push as opened through Events.Track.
    let mut events = relance_proto::v1::events_client::EventsClient::new(h.app.channel().await);
    events
        .track(authed(
            &h.app.ingest_key,
            pb::TrackRequest {
                event: Some(pb::Event {
                    message_id: "app-open-1".into(),
                    name: "message_opened".into(),
                    customer_id: "c1".into(),
                    properties: Some(json_to_struct(
                        &serde_json::json!({"message_id": push.message_id, "channel": "push"}),
                    )),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
    let mut delivery = h.delivery.clone();
    let admin = h.app.admin_key.clone();
    eventually(20, "the app's open in the ledger", || {
        let mut delivery = delivery.clone();
        let admin = admin.clone();
        async move {
            let record = delivery
                .get_message(authed(
                    &admin,
                    pb::GetMessageRequest {
                        key: Some(pb::get_message_request::Key::IdempotencyKey(
                            "opened-push".into(),
                        )),
                    },
                ))
                .await
                .ok()?
                .into_inner();
            record.opened_at.map(|_| ())
        }
    })
    .await;
    let _ = &mut delivery;
    h.app.stop().await;
}

#[tokio::test]
async fn the_inbox_feed_ledger_listing_and_templates_are_per_workspace() {
    let mut h = spawn_app(&[]).await;
    h.customer("c1", "fr", true).await;
    h.save(every_channel_template("cart-1")).await;

    // An app opens the live feed: the unread count at once, then each change.
    let mut feed = h
        .delivery
        .watch_inbox(authed(
            &h.app.ingest_key,
            pb::WatchInboxRequest {
                customer: customer("c1"),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sync = tokio::time::timeout(Duration::from_secs(20), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (sync.kind, sync.unread_count),
        (pb::InboxUpdateKind::Sync as i32, 0)
    );
    h.send(send_request(
        "feed-1",
        "c1",
        &[pb::Channel::InApp],
        "cart-1",
    ))
    .await;
    let added = tokio::time::timeout(Duration::from_secs(20), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(added.kind, pb::InboxUpdateKind::Added as i32);
    assert_eq!(added.unread_count, 1);
    let message = added.message.unwrap();
    assert_eq!(message.title, "Hello Amina");
    h.delivery
        .mark_read(authed(
            &h.app.ingest_key,
            pb::MarkReadRequest {
                customer: customer("c1"),
                message_ids: vec![],
                all: true,
            },
        ))
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (read.kind, read.unread_count),
        (pb::InboxUpdateKind::Read as i32, 0)
    );
    assert_eq!(read.message.unwrap().message_id, message.message_id);
    drop(feed);

    // The ledger, newest first, filtered and paged.
    h.send(send_request("list-1", "c1", &[pb::Channel::Push], "cart-1"))
        .await;
    h.send(send_request("list-2", "c1", &[pb::Channel::Push], "cart-1"))
        .await;
    h.outcome("list-1").await;
    h.outcome("list-2").await;
    let page = h
        .delivery
        .list_messages(h.admin(pb::ListMessagesRequest {
            customer: customer("c1"),
            channels: vec![pb::Channel::Push as i32],
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].idempotency_key, "list-2");
    assert!(
        page.messages[0].rendered.is_none(),
        "lists leave the content out"
    );
    let next = h
        .delivery
        .list_messages(h.admin(pb::ListMessagesRequest {
            customer: customer("c1"),
            channels: vec![pb::Channel::Push as i32],
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.messages[0].idempotency_key, "list-1");
    let bad = h
        .delivery
        .list_messages(h.admin(pb::ListMessagesRequest {
            customer: customer("c1"),
            page_size: 501,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.message(), "page_size: must be at most 500");

    // Versions: a change makes version 2; version 1 stays readable.
    let mut changed = every_channel_template("cart-1");
    changed.variants[0]
        .content
        .as_mut()
        .unwrap()
        .push
        .as_mut()
        .unwrap()
        .title = "Bonjour {{ customer.first_name }}".into();
    assert_eq!(h.save(changed).await.version, 2);
    let v1 = h
        .delivery
        .get_template(h.admin(pb::GetTemplateRequest {
            name: "cart-1".into(),
            version: 1,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v1.variants[0]
            .content
            .as_ref()
            .unwrap()
            .push
            .as_ref()
            .unwrap()
            .title,
        "Hello {{ customer.first_name }}"
    );
    let listed = h
        .delivery
        .list_templates(h.admin(pb::ListTemplatesRequest {
            channel: pb::Channel::Sms as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.templates.len(), 1);
    assert_eq!(listed.templates[0].version, 2);

    // Another workspace sees none of it; an ingest key cannot read the ledger.
    let other = h.app.other_workspace_key().await;
    let missing = h
        .delivery
        .get_message(authed(
            &other,
            pb::GetMessageRequest {
                key: Some(pb::get_message_request::Key::IdempotencyKey(
                    "list-1".into(),
                )),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let none = h
        .delivery
        .list_templates(authed(&other, pb::ListTemplatesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(none.templates.is_empty());
    let denied = h
        .delivery
        .get_message(authed(
            &h.app.ingest_key,
            pb::GetMessageRequest {
                key: Some(pb::get_message_request::Key::IdempotencyKey(
                    "list-1".into(),
                )),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    h.app.stop().await;
}
