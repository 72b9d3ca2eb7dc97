//! The channel adapters against the fake providers (and a real SMTP server): the exact
//! requests each provider receives, how their error answers are classified, and the provider
//! set's failover, circuit breakers and rate limits.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Version;
use base64::Engine;
use mail_parser::MimeHeaders;
use relance_delivery::channels::config::{ProviderConfig, ProviderKind, SmtpTls, build};
use relance_delivery::channels::set::Providers;
use relance_delivery::channels::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, webhook,
};
use relance_delivery::fake::{FakeProviders, start_smtp_server};
use relance_proto::v1::{
    Channel, EmailContent, PushContent, PushPlatform, SmsContent, WebhookContent, WhatsAppContent,
};
use secrecy::SecretString;
use serde_json::{Value, json};

fn secret(text: &str) -> Option<SecretString> {
    Some(SecretString::from(text.to_owned()))
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn outbound(address: Address, content: Content) -> Outbound {
    let mut tags = BTreeMap::new();
    tags.insert("flow".to_owned(), "cart-abandoned".to_owned());
    tags.insert("step".to_owned(), "push-1".to_owned());
    Outbound {
        message_id: uuid::Uuid::new_v4(),
        workspace_id: "shop".to_owned(),
        customer: "cust-42".to_owned(),
        address,
        content,
        ttl: Duration::from_secs(3600),
        unsubscribe_url: None,
        webhook_body: None,
        right_to_left: false,
        tags,
    }
}

fn push_content() -> Content {
    let mut data = std::collections::HashMap::new();
    data.insert("cart_id".to_owned(), "c-9".to_owned());
    Content::Push(PushContent {
        title: "Votre panier".to_owned(),
        body: "Il vous attend".to_owned(),
        image_url: "https://cdn.example/p.jpg".to_owned(),
        url: "https://shop.example/cart".to_owned(),
        data,
        collapse_key: "cart".to_owned(),
    })
}

fn android(token: &str) -> Address {
    Address::Push {
        token: token.to_owned(),
        platform: PushPlatform::Android,
        app_id: "app".to_owned(),
    }
}

fn ios(token: &str) -> Address {
    Address::Push {
        token: token.to_owned(),
        platform: PushPlatform::Ios,
        app_id: "app".to_owned(),
    }
}

fn fcm_config(fake: &FakeProviders, name: &str, project: &str) -> ProviderConfig {
    let mut config = ProviderConfig::new(name, ProviderKind::Fcm);
    config.base_url = Some(fake.base_url());
    config.project_id = Some(project.to_owned());
    config.access_token = secret("static-token");
    config
}

fn permanent_kind(result: Result<Accepted, SendError>) -> Permanent {
    match result {
        Err(SendError::Permanent { kind, .. }) => kind,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

fn temporary(result: Result<Accepted, SendError>) -> (String, Option<Duration>) {
    match result {
        Err(SendError::Temporary {
            detail,
            retry_after,
        }) => (detail, retry_after),
        other => panic!("expected a temporary error, got {other:?}"),
    }
}

/// Runs openssl; returns (private PKCS#8 PEM, public SPKI PEM).
fn openssl_key(kind: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("relance-key-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("key.pem");
    let generate = match kind {
        "ec" => format!(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out {}",
            private.display()
        ),
        _ => format!(
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {} 2>/dev/null",
            private.display()
        ),
    };
    let status = std::process::Command::new("sh")
        .args(["-c", &generate])
        .status()
        .unwrap();
    assert!(status.success());
    let public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .output()
        .unwrap();
    assert!(public.status.success());
    let private_pem = std::fs::read_to_string(&private).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (private_pem, String::from_utf8(public.stdout).unwrap())
}

// --- FCM ---------------------------------------------------------------------------------

#[tokio::test]
async fn fcm_sends_the_v1_request() {
    let fake = FakeProviders::start().await.unwrap();
    let fcm = build(&fcm_config(&fake, "fcm", "demo-shop"), 0, &http()).unwrap();
    assert!(fcm.accepts(&android("t")));
    assert!(!fcm.accepts(&ios("t")));
    assert_eq!(fcm.channel(), Channel::Push);
    let message = outbound(android("android-token-1"), push_content());
    let accepted = fcm.send(&message).await.unwrap();
    assert!(
        accepted
            .provider_message_id
            .unwrap()
            .starts_with("projects/demo-shop/messages/")
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/projects/demo-shop/messages:send");
    assert_eq!(request.header("authorization"), Some("Bearer static-token"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body = request.json();
    let sent = &body["message"];
    assert_eq!(sent["token"], "android-token-1");
    assert_eq!(
        sent["notification"],
        json!({ "title": "Votre panier", "body": "Il vous attend", "image": "https://cdn.example/p.jpg" })
    );
    assert_eq!(
        sent["data"],
        json!({
            "cart_id": "c-9",
            "flow": "cart-abandoned",
            "step": "push-1",
            "relance_message_id": message.message_id.to_string(),
            "url": "https://shop.example/cart",
        })
    );
    assert_eq!(
        sent["android"],
        json!({ "ttl": "3600s", "collapse_key": "cart", "notification": { "tag": "cart" } })
    );
    assert_eq!(
        sent["fcm_options"],
        json!({ "analytics_label": "cart-abandoned" })
    );
    assert!(
        sent.get("webpush").is_none(),
        "android tokens get no webpush block"
    );
}

#[tokio::test]
async fn fcm_web_tokens_get_webpush() {
    let fake = FakeProviders::start().await.unwrap();
    let fcm = build(&fcm_config(&fake, "fcm", "demo"), 0, &http()).unwrap();
    let web = Address::Push {
        token: "web-1".to_owned(),
        platform: PushPlatform::Web,
        app_id: "site".to_owned(),
    };
    assert!(fcm.accepts(&web));
    fcm.send(&outbound(web, push_content())).await.unwrap();
    let body = fake.requests()[0].json();
    assert_eq!(
        body["message"]["webpush"],
        json!({ "headers": { "TTL": "3600", "Topic": "cart" }, "fcm_options": { "link": "https://shop.example/cart" } })
    );
}

#[tokio::test]
async fn fcm_errors_are_classified() {
    let fake = FakeProviders::start().await.unwrap();
    let fcm = build(&fcm_config(&fake, "fcm", "demo"), 0, &http()).unwrap();
    let message = outbound(android("dead"), push_content());
    let prefix = "/v1/projects/demo";

    fake.fail_next(
        prefix,
        404,
        r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
        1,
    );
    assert_eq!(
        permanent_kind(fcm.send(&message).await),
        Permanent::InvalidAddress
    );

    fake.fail_next(
        prefix,
        400,
        r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#,
        1,
    );
    assert_eq!(
        permanent_kind(fcm.send(&message).await),
        Permanent::InvalidAddress
    );

    fake.fail_next(
        prefix,
        401,
        r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#,
        1,
    );
    match fcm.send(&message).await {
        Err(SendError::Permanent {
            kind: Permanent::Rejected,
            detail,
        }) => {
            assert!(detail.contains("bad credentials"), "{detail}")
        }
        other => panic!("{other:?}"),
    }

    fake.fail_next_with_headers(
        prefix,
        503,
        r#"{"error":{"code":503,"message":"The service is currently unavailable.","status":"UNAVAILABLE"}}"#,
        &[("retry-after", "7")],
        1,
    );
    let (detail, retry) = temporary(fcm.send(&message).await);
    assert!(detail.contains("503"), "{detail}");
    assert_eq!(retry, Some(Duration::from_secs(7)));

    fake.fail_next(
        prefix,
        429,
        r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota"}}"#,
        1,
    );
    temporary(fcm.send(&message).await);
    fake.fail_next(prefix, 500, "{}", 1);
    temporary(fcm.send(&message).await);

    // Nothing listening: temporary.
    let mut config = fcm_config(&fake, "fcm", "demo");
    config.base_url = Some("http://127.0.0.1:9".to_owned());
    let nowhere = build(&config, 0, &http()).unwrap();
    temporary(nowhere.send(&message).await);
}

#[tokio::test]
async fn fcm_service_account_exchanges_a_signed_jwt_and_caches_the_token() {
    let fake = FakeProviders::start().await.unwrap();
    let (private_pem, public_pem) = openssl_key("rsa");
    let token_uri = format!("{}/token", fake.base_url());
    let key_file = json!({
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": "k1",
        "private_key": private_pem,
        "client_email": "relance@demo.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    let mut config = fcm_config(&fake, "fcm", "demo");
    config.access_token = None;
    config.service_account_json = secret(&key_file.to_string());
    let fcm = build(&config, 0, &http()).unwrap();
    fcm.send(&outbound(android("a"), push_content()))
        .await
        .unwrap();
    fcm.send(&outbound(android("b"), push_content()))
        .await
        .unwrap();

    let exchanges = fake.requests_for("/token");
    assert_eq!(exchanges.len(), 1, "the token is cached");
    let form: BTreeMap<String, String> = exchanges[0].form().into_iter().collect();
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let header = jsonwebtoken::decode_header(&form["assertion"]).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_uri.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(
        &form["assertion"],
        &jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["iss"], "relance@demo.iam.gserviceaccount.com");
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    let sends = fake.requests_for("/v1/");
    assert_eq!(sends.len(), 2);
    for send in &sends {
        assert_eq!(
            send.header("authorization"),
            Some("Bearer fake-access-token-1")
        );
    }
}

// --- APNs --------------------------------------------------------------------------------

fn apns_config(fake: &FakeProviders, private_pem: &str) -> ProviderConfig {
    let mut config = ProviderConfig::new("apns", ProviderKind::Apns);
    config.base_url = Some(fake.base_url());
    config.team_id = Some("TEAM123456".to_owned());
    config.key_id = Some("KEY1234567".to_owned());
    config.private_key = secret(private_pem);
    config.topic = Some("com.example.shop".to_owned());
    config
}

#[tokio::test]
async fn apns_sends_over_http2_with_a_signed_jwt() {
    let fake = FakeProviders::start().await.unwrap();
    let (private_pem, public_pem) = openssl_key("ec");
    let apns = build(&apns_config(&fake, &private_pem), 0, &http()).unwrap();
    assert!(apns.accepts(&ios("ab")));
    assert!(!apns.accepts(&android("ab")));
    let message = outbound(ios("a1b2c3d4"), push_content());
    let before = relance_kit::Clock::now(&relance_kit::SystemClock).timestamp();
    let accepted = apns.send(&message).await.unwrap();
    let apns_id = message.message_id.hyphenated().to_string();
    assert_eq!(
        accepted.provider_message_id.as_deref(),
        Some(apns_id.as_str())
    );

    let requests = fake.requests();
    let request = &requests[0];
    assert_eq!(request.version, Version::HTTP_2);
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/3/device/a1b2c3d4");
    assert_eq!(request.header("apns-topic"), Some("com.example.shop"));
    assert_eq!(request.header("apns-push-type"), Some("alert"));
    assert_eq!(request.header("apns-priority"), Some("10"));
    assert_eq!(request.header("apns-id"), Some(apns_id.as_str()));
    assert_eq!(request.header("apns-collapse-id"), Some("cart"));
    let expiration: i64 = request.header("apns-expiration").unwrap().parse().unwrap();
    assert!(
        (before + 3600..=before + 3602).contains(&expiration),
        "{expiration}"
    );

    let jwt = request
        .header("authorization")
        .unwrap()
        .strip_prefix("bearer ")
        .unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some("KEY1234567"));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(
        jwt,
        &jsonwebtoken::DecodingKey::from_ec_pem(public_pem.as_bytes()).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["iss"], "TEAM123456");
    assert!((claims["iat"].as_i64().unwrap() - before).abs() <= 2);

    assert_eq!(
        request.json(),
        json!({
            "aps": { "alert": { "title": "Votre panier", "body": "Il vous attend" }, "sound": "default", "mutable-content": 1 },
            "url": "https://shop.example/cart",
            "image_url": "https://cdn.example/p.jpg",
            "relance_message_id": message.message_id.to_string(),
            "cart_id": "c-9",
            "flow": "cart-abandoned",
            "step": "push-1",
        })
    );

    // The JWT is reused.
    apns.send(&message).await.unwrap();
    let second = &fake.requests()[1];
    assert_eq!(
        second.header("authorization"),
        request.header("authorization")
    );
}

#[tokio::test]
async fn the_fake_apns_also_speaks_http1() {
    let fake = FakeProviders::start().await.unwrap();
    let response = http()
        .post(format!("{}/3/device/abcd", fake.base_url()))
        .header("authorization", "bearer x")
        .header("apns-id", "0a1b2c3d-0000-0000-0000-000000000000")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["apns-id"],
        "0a1b2c3d-0000-0000-0000-000000000000"
    );
    assert_eq!(fake.requests()[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn apns_errors_are_classified() {
    let fake = FakeProviders::start().await.unwrap();
    let (private_pem, _) = openssl_key("ec");
    let apns = build(&apns_config(&fake, &private_pem), 0, &http()).unwrap();
    let message = outbound(ios("abcdef"), push_content());

    fake.fail_next(
        "/3/device/",
        410,
        r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
        1,
    );
    assert_eq!(
        permanent_kind(apns.send(&message).await),
        Permanent::InvalidAddress
    );
    fake.fail_next("/3/device/", 400, r#"{"reason":"BadDeviceToken"}"#, 1);
    assert_eq!(
        permanent_kind(apns.send(&message).await),
        Permanent::InvalidAddress
    );
    fake.fail_next("/3/device/", 400, r#"{"reason":"PayloadEmpty"}"#, 1);
    assert_eq!(
        permanent_kind(apns.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next("/3/device/", 429, r#"{"reason":"TooManyRequests"}"#, 1);
    temporary(apns.send(&message).await);
    fake.fail_next("/3/device/", 503, r#"{"reason":"ServiceUnavailable"}"#, 1);
    temporary(apns.send(&message).await);

    // An expired provider token: renewed, temporary; refused again with the new one: the key
    // is wrong, permanent.
    fake.clear();
    fake.fail_next("/3/device/", 403, r#"{"reason":"ExpiredProviderToken"}"#, 2);
    temporary(apns.send(&message).await);
    assert_eq!(
        permanent_kind(apns.send(&message).await),
        Permanent::Rejected
    );
    apns.send(&message).await.unwrap();
    let requests = fake.requests();
    assert_ne!(
        requests[0].header("authorization"),
        requests[1].header("authorization"),
        "renewed"
    );
    assert_eq!(
        requests[1].header("authorization"),
        requests[2].header("authorization")
    );
    // Once a token worked, the next refusal is again worth a renewal.
    fake.fail_next("/3/device/", 403, r#"{"reason":"InvalidProviderToken"}"#, 1);
    temporary(apns.send(&message).await);
}

// --- SMTP --------------------------------------------------------------------------------

#[tokio::test]
async fn smtp_sends_a_multipart_message_with_the_list_headers() {
    let sink = start_smtp_server().await.unwrap();
    let mut config = ProviderConfig::new("smtp", ProviderKind::Smtp);
    config.host = Some("127.0.0.1".to_owned());
    config.port = Some(sink.port());
    config.tls = Some(SmtpTls::None);
    config.from_address = Some("news@shop.example".to_owned());
    config.from_name = Some("La Boutique".to_owned());
    let smtp = build(&config, 0, &http()).unwrap();
    assert!(smtp.accepts(&Address::Email("x@y.z".to_owned())));

    let html =
        r#"<html dir="rtl" lang="ar"><body><p>مرحبا سارة، سلتك في انتظارك</p></body></html>"#;
    let mut message = outbound(
        Address::Email("sara@example.dz".to_owned()),
        Content::Email(EmailContent {
            subject: "سلتك في انتظارك".to_owned(),
            preheader: String::new(),
            html: html.to_owned(),
            text: "مرحبا سارة، سلتك في انتظارك".to_owned(),
            from_name: "متجر".to_owned(),
            reply_to: "help@shop.example".to_owned(),
        }),
    );
    message.right_to_left = true;
    message.unsubscribe_url = Some("https://t.shop.example/u/abc123".to_owned());
    let accepted = smtp.send(&message).await.unwrap();
    assert!(accepted.provider_message_id.unwrap().contains("queued as"));

    let received = sink.messages();
    assert_eq!(received.len(), 1);
    let parsed = mail_parser::MessageParser::default()
        .parse(received[0].as_bytes())
        .unwrap();
    let content_type = parsed.content_type().unwrap();
    assert_eq!(content_type.ctype(), "multipart");
    assert_eq!(content_type.subtype(), Some("alternative"));
    assert_eq!(parsed.subject(), Some("سلتك في انتظارك"));
    let from = parsed.from().unwrap().first().unwrap();
    assert_eq!(from.name(), Some("متجر"));
    assert_eq!(from.address(), Some("news@shop.example"));
    assert_eq!(
        parsed.reply_to().unwrap().first().unwrap().address(),
        Some("help@shop.example")
    );
    assert_eq!(
        parsed.to().unwrap().first().unwrap().address(),
        Some("sara@example.dz")
    );
    let message_id = format!("{}@relance", message.message_id.hyphenated());
    assert_eq!(parsed.message_id(), Some(message_id.as_str()));
    assert_eq!(
        parsed.header_raw("List-Unsubscribe").map(str::trim),
        Some("<https://t.shop.example/u/abc123>")
    );
    assert_eq!(
        parsed.header_raw("List-Unsubscribe-Post").map(str::trim),
        Some("List-Unsubscribe=One-Click")
    );
    let id_header = message.message_id.hyphenated().to_string();
    assert_eq!(
        parsed.header_raw("X-Relance-Message-Id").map(str::trim),
        Some(id_header.as_str())
    );
    assert_eq!(parsed.text_body.len(), 1);
    assert_eq!(parsed.html_body.len(), 1);
    assert_eq!(
        parsed.body_text(0).unwrap().trim(),
        "مرحبا سارة، سلتك في انتظارك"
    );
    assert_eq!(parsed.body_html(0).unwrap().trim(), html);

    // The configured name when the content has none; no list headers without a URL.
    message.unsubscribe_url = None;
    if let Content::Email(email) = &mut message.content {
        email.from_name.clear();
        email.reply_to.clear();
    }
    smtp.send(&message).await.unwrap();
    let received = sink.messages();
    let parsed = mail_parser::MessageParser::default()
        .parse(received[1].as_bytes())
        .unwrap();
    assert_eq!(
        parsed.from().unwrap().first().unwrap().name(),
        Some("La Boutique")
    );
    assert!(parsed.header_raw("List-Unsubscribe").is_none());
    assert!(parsed.reply_to().is_none());

    // Refusals.
    message.address = Address::Email("bounce@example.dz".to_owned());
    assert_eq!(
        permanent_kind(smtp.send(&message).await),
        Permanent::InvalidAddress
    );
    message.address = Address::Email("policy@example.dz".to_owned());
    assert_eq!(
        permanent_kind(smtp.send(&message).await),
        Permanent::Rejected
    );
    message.address = Address::Email("busy@example.dz".to_owned());
    temporary(smtp.send(&message).await);
    message.address = Address::Email("not an address".to_owned());
    assert_eq!(
        permanent_kind(smtp.send(&message).await),
        Permanent::InvalidAddress
    );
    assert_eq!(sink.messages().len(), 2);

    // Nobody listening: temporary.
    drop(sink);
    message.address = Address::Email("sara@example.dz".to_owned());
    config.port = Some(9);
    let closed = build(&config, 0, &http()).unwrap();
    temporary(closed.send(&message).await);
}

// --- Twilio ------------------------------------------------------------------------------

fn twilio_config(fake: &FakeProviders, from: &str) -> ProviderConfig {
    let mut config = ProviderConfig::new("twilio", ProviderKind::Twilio);
    config.base_url = Some(fake.base_url());
    config.account_sid = Some("AC0123456789abcdef".to_owned());
    config.auth_token = secret("tw-secret");
    config.from = Some(from.to_owned());
    config
}

fn sms(body: &str) -> Content {
    Content::Sms(SmsContent {
        body: body.to_owned(),
    })
}

#[tokio::test]
async fn twilio_sends_a_form_with_basic_auth() {
    let fake = FakeProviders::start().await.unwrap();
    let twilio = build(&twilio_config(&fake, "+15005550006"), 0, &http()).unwrap();
    assert_eq!(twilio.channel(), Channel::Sms);
    let message = outbound(
        Address::Phone("+213555123456".to_owned()),
        sms("Votre code : 1234 & merci"),
    );
    let accepted = twilio.send(&message).await.unwrap();
    assert!(accepted.provider_message_id.unwrap().starts_with("SM"));
    let request = &fake.requests()[0];
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.path,
        "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("AC0123456789abcdef:tw-secret");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        request.form(),
        vec![
            ("To".to_owned(), "+213555123456".to_owned()),
            ("From".to_owned(), "+15005550006".to_owned()),
            ("Body".to_owned(), "Votre code : 1234 & merci".to_owned()),
        ]
    );

    let service = build(&twilio_config(&fake, "MG0123456789abcdef"), 0, &http()).unwrap();
    service.send(&message).await.unwrap();
    let form: BTreeMap<String, String> = fake.requests()[1].form().into_iter().collect();
    assert_eq!(
        form.get("MessagingServiceSid").map(String::as_str),
        Some("MG0123456789abcdef")
    );
    assert!(!form.contains_key("From"));
}

#[tokio::test]
async fn twilio_errors_are_classified() {
    let fake = FakeProviders::start().await.unwrap();
    let twilio = build(&twilio_config(&fake, "+15005550006"), 0, &http()).unwrap();
    let message = outbound(Address::Phone("+15005550001".to_owned()), sms("hi"));
    let prefix = "/2010-04-01/";
    let error = |code: u32, text: &str| {
        json!({ "code": code, "message": text, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": 400 })
            .to_string()
    };
    fake.fail_next(
        prefix,
        400,
        error(
            21211,
            "The 'To' number +15005550001 is not a valid phone number.",
        ),
        1,
    );
    assert_eq!(
        permanent_kind(twilio.send(&message).await),
        Permanent::InvalidAddress
    );
    fake.fail_next(
        prefix,
        400,
        error(21614, "'To' number is not a valid mobile number"),
        1,
    );
    assert_eq!(
        permanent_kind(twilio.send(&message).await),
        Permanent::InvalidAddress
    );
    fake.fail_next(
        prefix,
        400,
        error(21610, "Attempt to send to unsubscribed recipient"),
        1,
    );
    assert_eq!(
        permanent_kind(twilio.send(&message).await),
        Permanent::Unsubscribed
    );
    fake.fail_next(
        prefix,
        400,
        error(
            21408,
            "Permission to send an SMS has not been enabled for the region",
        ),
        1,
    );
    assert_eq!(
        permanent_kind(twilio.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next(prefix, 429, error(20429, "Too Many Requests"), 1);
    temporary(twilio.send(&message).await);
    fake.fail_next(prefix, 503, "", 1);
    temporary(twilio.send(&message).await);
}

// --- Meta --------------------------------------------------------------------------------

fn meta_config(fake: &FakeProviders) -> ProviderConfig {
    let mut config = ProviderConfig::new("meta", ProviderKind::Meta);
    config.base_url = Some(fake.base_url());
    config.phone_number_id = Some("1098765432".to_owned());
    config.access_token = secret("meta-token");
    config
}

fn whatsapp() -> Content {
    Content::WhatsApp(WhatsAppContent {
        template_name: "cart_reminder".to_owned(),
        language: "ar".to_owned(),
        header_image_url: "https://cdn.example/p.jpg".to_owned(),
        body_parameters: vec!["سارة".to_owned(), "2 500 DA".to_owned()],
        button_url_parameters: vec!["c-9".to_owned()],
    })
}

#[tokio::test]
async fn meta_sends_a_template_message() {
    let fake = FakeProviders::start().await.unwrap();
    let meta = build(&meta_config(&fake), 0, &http()).unwrap();
    assert_eq!(meta.channel(), Channel::Whatsapp);
    let message = outbound(Address::Phone("+213555123456".to_owned()), whatsapp());
    let accepted = meta.send(&message).await.unwrap();
    assert!(accepted.provider_message_id.unwrap().starts_with("wamid."));
    let request = &fake.requests()[0];
    assert_eq!(request.path, "/v21.0/1098765432/messages");
    assert_eq!(request.header("authorization"), Some("Bearer meta-token"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json(),
        json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "213555123456",
            "type": "template",
            "template": {
                "name": "cart_reminder",
                "language": { "code": "ar" },
                "components": [
                    { "type": "header", "parameters": [{ "type": "image", "image": { "link": "https://cdn.example/p.jpg" } }] },
                    { "type": "body", "parameters": [{ "type": "text", "text": "سارة" }, { "type": "text", "text": "2 500 DA" }] },
                    { "type": "button", "sub_type": "url", "index": "0", "parameters": [{ "type": "text", "text": "c-9" }] },
                ],
            },
            "biz_opaque_callback_data": message.message_id.to_string(),
        })
    );
}

#[tokio::test]
async fn meta_errors_are_classified() {
    let fake = FakeProviders::start().await.unwrap();
    let meta = build(&meta_config(&fake), 0, &http()).unwrap();
    let message = outbound(Address::Phone("+213555123456".to_owned()), whatsapp());
    let error = |code: u32, text: &str| {
        json!({ "error": { "message": text, "type": "OAuthException", "code": code, "error_data": { "messaging_product": "whatsapp", "details": text }, "fbtrace_id": "x" } })
            .to_string()
    };
    fake.fail_next("/v21.0/", 400, error(131026, "Message Undeliverable"), 1);
    assert_eq!(
        permanent_kind(meta.send(&message).await),
        Permanent::InvalidAddress
    );
    fake.fail_next("/v21.0/", 400, error(131050, "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages"), 1);
    assert_eq!(
        permanent_kind(meta.send(&message).await),
        Permanent::Unsubscribed
    );
    fake.fail_next(
        "/v21.0/",
        400,
        error(132001, "Template name does not exist in the translation"),
        1,
    );
    assert_eq!(
        permanent_kind(meta.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next(
        "/v21.0/",
        400,
        error(
            132000,
            "Number of parameters does not match the expected number of params",
        ),
        1,
    );
    assert_eq!(
        permanent_kind(meta.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next("/v21.0/", 400, error(130429, "Rate limit hit"), 1);
    temporary(meta.send(&message).await);
    fake.fail_next(
        "/v21.0/",
        400,
        error(
            131056,
            "(Business Account, Consumer Account) pair rate limit hit",
        ),
        1,
    );
    temporary(meta.send(&message).await);
    fake.fail_next("/v21.0/", 500, error(1, "An unknown error occurred"), 1);
    temporary(meta.send(&message).await);
}

// --- Webhook -----------------------------------------------------------------------------

#[tokio::test]
async fn webhook_posts_a_signed_body() {
    let fake = FakeProviders::start().await.unwrap();
    let mut config = ProviderConfig::new("webhook", ProviderKind::Webhook);
    config.url = Some(format!("{}/webhook/relance", fake.base_url()));
    config.secret = secret("whsec");
    let hook = build(&config, 0, &http()).unwrap();
    let mut headers = std::collections::HashMap::new();
    headers.insert("X-Shop".to_owned(), "demo".to_owned());
    headers.insert("X-Relance-Signature".to_owned(), "forged".to_owned());
    headers.insert("Content-Type".to_owned(), "text/plain".to_owned());
    let mut message = outbound(
        Address::Webhook,
        Content::Webhook(WebhookContent {
            body: String::new(),
            headers,
        }),
    );
    message.webhook_body = Some(json!({ "customer": "cust-42", "data": { "order": 7 } }));
    let before = relance_kit::Clock::now(&relance_kit::SystemClock).timestamp();
    hook.send(&message).await.unwrap();

    let request = &fake.requests()[0];
    assert_eq!(request.path, "/webhook/relance");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-shop"), Some("demo"));
    let id = message.message_id.hyphenated().to_string();
    assert_eq!(request.header("idempotency-key"), Some(id.as_str()));
    let timestamp: i64 = request
        .header("x-relance-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    assert!((timestamp - before).abs() <= 2);
    let signature = request.header("x-relance-signature").unwrap();
    assert_eq!(signature, webhook::sign(b"whsec", timestamp, &request.body));
    assert!(webhook::verify(
        b"whsec",
        signature,
        timestamp,
        &request.body,
        timestamp + 10,
        Duration::from_secs(300)
    ));
    assert!(!webhook::verify(
        b"other",
        signature,
        timestamp,
        &request.body,
        timestamp,
        Duration::from_secs(300)
    ));
    assert!(!webhook::verify(
        b"whsec",
        signature,
        timestamp,
        b"{}",
        timestamp,
        Duration::from_secs(300)
    ));
    assert!(!webhook::verify(
        b"whsec",
        signature,
        timestamp,
        &request.body,
        timestamp + 301,
        Duration::from_secs(300)
    ));
    assert_eq!(
        request.json(),
        json!({ "customer": "cust-42", "data": { "order": 7 } })
    );

    fake.fail_next("/webhook", 410, "gone", 1);
    assert_eq!(
        permanent_kind(hook.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next("/webhook", 400, "bad", 1);
    assert_eq!(
        permanent_kind(hook.send(&message).await),
        Permanent::Rejected
    );
    fake.fail_next("/webhook", 500, "oops", 1);
    temporary(hook.send(&message).await);
    fake.fail_next("/webhook", 429, "slow down", 1);
    temporary(hook.send(&message).await);
}

#[test]
fn webhook_signature_is_hmac_sha256_of_timestamp_dot_body() {
    // Computed with: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
    let expected = std::process::Command::new("sh")
        .args([
            "-c",
            "printf '1700000000.{\"a\":1}' | openssl dgst -sha256 -hmac secret -r | cut -d' ' -f1",
        ])
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap();
    assert_eq!(
        webhook::sign(b"secret", 1_700_000_000, br#"{"a":1}"#),
        format!("v1={}", expected.trim())
    );
    let rotated = format!("v1=00, {}", webhook::sign(b"secret", 5, b"x"));
    assert!(webhook::verify(
        b"secret",
        &rotated,
        5,
        b"x",
        5,
        Duration::from_secs(1)
    ));
}

// --- Config --------------------------------------------------------------------------------

#[test]
fn config_deserializes_with_defaults_and_names_missing_fields() {
    let list: Vec<ProviderConfig> = serde_json::from_value(json!([
        { "name": "fcm", "kind": "fcm", "project_id": "p", "access_token": "t" },
        { "name": "meta", "kind": "meta", "phone_number_id": "1", "access_token": "t" },
        { "name": "apns", "kind": "apns", "team_id": "T" },
    ]))
    .unwrap();
    assert_eq!(list[0].timeout_ms, 10_000);
    assert_eq!(
        list[0].resolved_base_url().as_deref(),
        Some("https://fcm.googleapis.com")
    );
    assert_eq!(list[0].rate_per_sec, 0.0);
    assert!(build(&list[0], 0, &http()).is_ok());
    assert!(build(&list[1], 1, &http()).is_ok());
    let error = build(&list[2], 2, &http()).err().unwrap().to_string();
    assert_eq!(
        error,
        "delivery.providers[2].key_id: required for kind Apns"
    );

    let mut twilio = ProviderConfig::new("sms", ProviderKind::Twilio);
    twilio.account_sid = Some("AC1".to_owned());
    twilio.auth_token = secret("x");
    twilio.from = Some("not a number!".to_owned());
    let error = build(&twilio, 4, &http()).err().unwrap().to_string();
    assert!(error.starts_with("delivery.providers[4].from: "), "{error}");

    let mut hook = ProviderConfig::new("hook", ProviderKind::Webhook);
    hook.url = Some("ftp://x".to_owned());
    hook.secret = secret("s");
    let error = build(&hook, 0, &http()).err().unwrap().to_string();
    assert!(
        error.starts_with("delivery.providers[0].url: must be http or https"),
        "{error}"
    );

    let mut apns = ProviderConfig::new("apns", ProviderKind::Apns);
    apns.team_id = Some("T".to_owned());
    apns.key_id = Some("K".to_owned());
    apns.topic = Some("com.x".to_owned());
    apns.private_key = secret("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n");
    let error = build(&apns, 3, &http()).err().unwrap().to_string();
    assert!(
        error.starts_with("delivery.providers[3].private_key: "),
        "{error}"
    );

    let bad_kind =
        serde_json::from_value::<ProviderConfig>(json!({ "name": "x", "kind": "carrier-pigeon" }));
    assert!(bad_kind.is_err());
    let duplicate = Providers::build(&[list[0].clone(), list[0].clone()], &http())
        .err()
        .unwrap()
        .to_string();
    assert!(
        duplicate.starts_with("delivery.providers[1].name: "),
        "{duplicate}"
    );
}

// --- The provider set ------------------------------------------------------------------------

fn two_fcm(fake: &FakeProviders) -> Vec<ProviderConfig> {
    vec![
        fcm_config(fake, "fcm", "primary"),
        fcm_config(fake, "fcm-backup", "backup"),
    ]
}

#[tokio::test]
async fn providers_fail_over_to_the_secondary_on_a_temporary_error() {
    let fake = FakeProviders::start().await.unwrap();
    let providers = Providers::build(&two_fcm(&fake), &http()).unwrap();
    assert!(providers.has_channel(Channel::Push));
    assert!(!providers.has_channel(Channel::Sms));
    let message = outbound(android("tok"), push_content());

    let (name, _) = providers.send(Channel::Push, &message).await.unwrap();
    assert_eq!(name, "fcm");

    fake.set_down("/v1/projects/primary/", true);
    let (name, accepted) = providers.send(Channel::Push, &message).await.unwrap();
    assert_eq!(name, "fcm-backup");
    assert!(
        accepted
            .provider_message_id
            .unwrap()
            .starts_with("projects/backup/")
    );
    assert_eq!(fake.requests_for("/v1/projects/primary/").len(), 2);
    assert_eq!(fake.requests_for("/v1/projects/backup/").len(), 1);

    // Both down: temporary, naming both.
    fake.set_down("/v1/projects/backup/", true);
    match providers.send(Channel::Push, &message).await {
        Err(SendError::Temporary { detail, .. }) => {
            assert!(
                detail.starts_with("all providers of push unavailable: fcm: 503"),
                "{detail}"
            );
            assert!(detail.contains("; fcm-backup: 503"), "{detail}");
        }
        other => panic!("{other:?}"),
    }

    // An iOS token: no provider of push accepts it.
    assert!(matches!(
        providers
            .send(Channel::Push, &outbound(ios("ab"), push_content()))
            .await,
        Err(SendError::Permanent {
            kind: Permanent::Rejected,
            ..
        })
    ));
    // No provider for the channel.
    assert!(matches!(
        providers
            .send(
                Channel::Sms,
                &outbound(Address::Phone("+1".to_owned()), sms("x"))
            )
            .await,
        Err(SendError::Temporary { .. })
    ));
}

#[tokio::test]
async fn providers_do_not_fail_over_a_permanent_error() {
    let fake = FakeProviders::start().await.unwrap();
    let providers = Providers::build(&two_fcm(&fake), &http()).unwrap();
    fake.fail_next(
        "/v1/projects/primary/",
        404,
        r#"{"error":{"code":404,"status":"NOT_FOUND","message":"Requested entity was not found.","details":[{"errorCode":"UNREGISTERED"}]}}"#,
        1,
    );
    let result = providers
        .send(Channel::Push, &outbound(android("dead"), push_content()))
        .await;
    assert!(matches!(
        result,
        Err(SendError::Permanent {
            kind: Permanent::InvalidAddress,
            ..
        })
    ));
    assert!(fake.requests_for("/v1/projects/backup/").is_empty());
}

#[tokio::test]
async fn the_circuit_opens_after_five_failures_and_the_primary_is_skipped() {
    let fake = FakeProviders::start().await.unwrap();
    let mut configs = two_fcm(&fake);
    configs[0].breaker_open_ms = 300;
    let providers = Providers::build(&configs, &http()).unwrap();
    let message = outbound(android("tok"), push_content());
    fake.set_down("/v1/projects/primary/", true);
    for _ in 0..5 {
        let (name, _) = providers.send(Channel::Push, &message).await.unwrap();
        assert_eq!(name, "fcm-backup");
    }
    assert_eq!(fake.requests_for("/v1/projects/primary/").len(), 5);
    for _ in 0..10 {
        let (name, _) = providers.send(Channel::Push, &message).await.unwrap();
        assert_eq!(name, "fcm-backup");
    }
    assert_eq!(
        fake.requests_for("/v1/projects/primary/").len(),
        5,
        "skipped while open"
    );

    // Both unavailable: the detail says the circuit is open.
    fake.set_down("/v1/projects/backup/", true);
    match providers.send(Channel::Push, &message).await {
        Err(SendError::Temporary { detail, .. }) => {
            assert!(
                detail.starts_with(
                    "all providers of push unavailable: fcm: circuit open; fcm-backup: 503"
                ),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    fake.set_down("/v1/projects/backup/", false);

    // After the open time: one trial call, which succeeds and closes the circuit.
    fake.set_down("/v1/projects/primary/", false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (name, _) = providers.send(Channel::Push, &message).await.unwrap();
    assert_eq!(name, "fcm");
    let (name, _) = providers.send(Channel::Push, &message).await.unwrap();
    assert_eq!(name, "fcm");
}

#[tokio::test]
async fn a_rate_limited_primary_overflows_to_the_secondary() {
    let fake = FakeProviders::start().await.unwrap();
    let mut configs = two_fcm(&fake);
    configs[0].rate_per_sec = 1.0;
    configs[0].burst = 2;
    let providers = Providers::build(&configs, &http()).unwrap();
    let message = outbound(android("tok"), push_content());
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(providers.send(Channel::Push, &message).await.unwrap().0);
    }
    assert_eq!(names, ["fcm", "fcm", "fcm-backup", "fcm-backup"]);
}

#[tokio::test]
async fn the_last_provider_waits_briefly_for_a_token() {
    let fake = FakeProviders::start().await.unwrap();
    let mut config = fcm_config(&fake, "fcm", "only");
    config.rate_per_sec = 50.0; // one token every 20 ms
    config.burst = 1;
    let providers = Providers::build(&[config], &http()).unwrap();
    let message = outbound(android("tok"), push_content());
    let started = std::time::Instant::now();
    for _ in 0..5 {
        providers.send(Channel::Push, &message).await.unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(70),
        "{:?}",
        started.elapsed()
    );

    // A slow rate: no token within 50 ms, refused as rate limited.
    let mut slow = fcm_config(&fake, "slow", "slow");
    slow.rate_per_sec = 0.5;
    slow.burst = 1;
    let providers = Providers::build(&[slow], &http()).unwrap();
    providers.send(Channel::Push, &message).await.unwrap();
    match providers.send(Channel::Push, &message).await {
        Err(SendError::Temporary {
            detail,
            retry_after,
        }) => {
            assert_eq!(
                detail,
                "all providers of push unavailable: slow: rate limited"
            );
            assert!(retry_after.is_some());
        }
        other => panic!("{other:?}"),
    }
}

/// Custom providers can be put in a set too.
struct Always(&'static str);

impl Provider for Always {
    fn name(&self) -> &str {
        self.0
    }
    fn channel(&self) -> Channel {
        Channel::Webhook
    }
    fn accepts(&self, _: &Address) -> bool {
        true
    }
    fn send<'a>(
        &'a self,
        _: &'a Outbound,
    ) -> futures::future::BoxFuture<'a, Result<Accepted, SendError>> {
        Box::pin(async { Ok(Accepted::default()) })
    }
}

#[tokio::test]
async fn providers_from_parts() {
    let providers = Providers::from_parts(vec![(
        Arc::new(Always("custom")) as Arc<dyn Provider>,
        relance_delivery::channels::set::Limits::default(),
    )]);
    let message = outbound(
        Address::Webhook,
        Content::Webhook(WebhookContent::default()),
    );
    assert_eq!(
        providers.send(Channel::Webhook, &message).await.unwrap().0,
        "custom"
    );
}

#[tokio::test]
async fn the_fake_counts_without_recording_bodies() {
    let fake = FakeProviders::start().await.unwrap();
    fake.record_bodies(false);
    let client = http();
    for _ in 0..20 {
        client
            .post(format!("{}/webhook", fake.base_url()))
            .body("{}")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(fake.count(), 20);
    assert!(
        fake.requests()
            .iter()
            .all(|request| request.body.is_empty())
    );
}

/// How many requests a second the fake takes (run by hand: `-- --ignored fake_throughput`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn fake_throughput() {
    let fake = FakeProviders::start().await.unwrap();
    fake.record_bodies(false);
    let client = http();
    let url = format!("{}/webhook", fake.base_url());
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..625 {
                client.post(&url).body("{}").send().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rate = fake.count() as f64 / started.elapsed().as_secs_f64();
    println!("fake providers: {rate:.0} requests/s");
    assert_eq!(fake.count(), 20_000);
}
