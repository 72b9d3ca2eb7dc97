//! The tracking HTTP listener: click links (signed, so there is no open redirect and a
//! tampered link goes nowhere), the e-mail open pixel, and the unsubscribe page (with the
//! one-click POST mail clients send for `List-Unsubscribe-Post`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use relance_kit::SharedClock;
use relance_proto::v1::{CustomerRef, customer_ref};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::channels::{ProviderConfig, ProviderKind};
use crate::clients::Clients;
use crate::domain::links::{LinkAction, LinkKind, LinkSigner};
use crate::domain::receipts;
use crate::store::{DeliveryStore, Interaction};

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// What the listener needs.
#[derive(Clone)]
pub struct Tracking {
    pub store: DeliveryStore,
    pub links: Arc<LinkSigner>,
    pub clients: Clients,
    pub clock: SharedClock,
    /// The providers, for their receipts' secrets.
    pub providers: Arc<Vec<ProviderConfig>>,
    /// The public URL of this listener (what providers sign their callbacks with).
    pub public_url: String,
}

/// The listener's routes.
pub fn router(tracking: Tracking) -> Router {
    Router::new()
        .route("/c/{token}", get(click))
        .route("/o/{token}", get(open))
        .route("/u/{token}", get(unsubscribe_page).post(unsubscribe))
        .route(
            "/receipts/{provider}",
            get(receipts_verification).post(receipts),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(tracking)
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, tracking: Tracking, shutdown: CancellationToken) {
    let app = router(tracking);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "tracking listener failed");
    }
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn invalid_link() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Link not valid",
        "This link is not valid or has been altered.",
    )
}

async fn click(State(tracking): State<Tracking>, Path(token): Path<String>) -> Response {
    let link = match tracking.links.verify(LinkKind::Click, &token) {
        Ok(link) => link,
        Err(error) => {
            tracing::info!(%error, "click link refused");
            metrics::counter!("relance_delivery_links_refused_total", "kind" => "click")
                .increment(1);
            return invalid_link();
        }
    };
    let LinkAction::Click { target } = link.action else {
        return invalid_link();
    };
    let now = tracking.clock.now();
    // The customer is sent on even if the click could not be recorded.
    if let Err(error) = tracking
        .store
        .interaction(
            &link.workspace,
            link.message_id,
            Interaction::Clicked,
            Some(&target),
            now,
        )
        .await
    {
        tracing::warn!(%error, message_id = %link.message_id, "click not recorded");
    }
    metrics::counter!("relance_delivery_clicks_total").increment(1);
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, target.as_str()),
            (header::CACHE_CONTROL, "no-store"),
        ],
    )
        .into_response()
}

async fn open(State(tracking): State<Tracking>, Path(file): Path<String>) -> Response {
    let token = file.strip_suffix(".gif").unwrap_or(&file);
    match tracking.links.verify(LinkKind::Open, token) {
        Ok(link) => {
            let now = tracking.clock.now();
            if let Err(error) = tracking
                .store
                .interaction(
                    &link.workspace,
                    link.message_id,
                    Interaction::Opened,
                    None,
                    now,
                )
                .await
            {
                tracing::warn!(%error, message_id = %link.message_id, "open not recorded");
            }
        }
        Err(error) => {
            tracing::info!(%error, "open pixel refused");
            return (StatusCode::NOT_FOUND, "").into_response();
        }
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-store, max-age=0"),
        ],
        PIXEL,
    )
        .into_response()
}

async fn unsubscribe_page(State(tracking): State<Tracking>, Path(token): Path<String>) -> Response {
    if tracking
        .links
        .verify(LinkKind::Unsubscribe, &token)
        .is_err()
    {
        return invalid_link();
    }
    // A GET only asks: link scanners in mail gateways fetch every link, and must not
    // unsubscribe anyone.
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head>\
         <body><h1>Unsubscribe</h1><form method=\"post\" action=\"/u/{token}\">\
         <button type=\"submit\">Unsubscribe me</button></form></body></html>"
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn unsubscribe(State(tracking): State<Tracking>, Path(token): Path<String>) -> Response {
    let link = match tracking.links.verify(LinkKind::Unsubscribe, &token) {
        Ok(link) => link,
        Err(_) => return invalid_link(),
    };
    let LinkAction::Unsubscribe {
        customer_id,
        channel,
        topic,
    } = link.action
    else {
        return invalid_link();
    };
    let customer = CustomerRef {
        id: Some(customer_ref::Id::CustomerId(customer_id)),
    };
    match tracking
        .clients
        .opt_out(
            &link.workspace,
            customer,
            channel,
            &topic,
            "unsubscribe_link",
        )
        .await
    {
        Ok(()) => page(
            StatusCode::OK,
            "Unsubscribed",
            "You will no longer receive these messages.",
        ),
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = %status.message(), "unsubscribe not recorded");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "We could not record your choice just now. Please try again in a minute.",
            )
        }
    }
}

fn provider<'a>(tracking: &'a Tracking, name: &str) -> Option<&'a ProviderConfig> {
    tracking.providers.iter().find(|p| p.name == name)
}

/// Meta's webhook registration: echo `hub.challenge` when `hub.verify_token` matches.
async fn receipts_verification(
    State(tracking): State<Tracking>,
    Path(name): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let Some(config) = provider(&tracking, &name) else {
        return (StatusCode::NOT_FOUND, "").into_response();
    };
    let params: Vec<(String, String)> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let field = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let expected = config.verify_token.clone().unwrap_or_default();
    if config.kind != ProviderKind::Meta
        || expected.is_empty()
        || field("hub.mode").as_deref() != Some("subscribe")
        || field("hub.verify_token").as_deref() != Some(expected.as_str())
    {
        return (StatusCode::FORBIDDEN, "").into_response();
    }
    (StatusCode::OK, field("hub.challenge").unwrap_or_default()).into_response()
}

/// Delivery receipts: Twilio status callbacks and Meta status webhooks, each verified with
/// its provider's signature before anything is recorded.
async fn receipts(
    State(tracking): State<Tracking>,
    Path(name): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use secrecy::ExposeSecret as _;
    let Some(config) = provider(&tracking, &name) else {
        return (StatusCode::NOT_FOUND, "").into_response();
    };
    let header = |key: &str| {
        headers
            .get(key)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let found = match config.kind {
        ProviderKind::Twilio => {
            let Some(token) = &config.auth_token else {
                return (StatusCode::FORBIDDEN, "").into_response();
            };
            let params: Vec<(String, String)> =
                form_urlencoded::parse(&body).into_owned().collect();
            let mut url = format!("{}/receipts/{name}", tracking.public_url);
            if let Some(query) = &query {
                url.push('?');
                url.push_str(query);
            }
            let signature = header("x-twilio-signature");
            if !receipts::twilio_verify(token.expose_secret().as_bytes(), &url, &params, signature)
            {
                metrics::counter!("relance_delivery_receipts_refused_total", "provider" => name.clone()).increment(1);
                return (StatusCode::FORBIDDEN, "").into_response();
            }
            receipts::twilio_receipt(&params)
                .into_iter()
                .collect::<Vec<_>>()
        }
        ProviderKind::Meta => {
            let Some(secret) = &config.app_secret else {
                return (StatusCode::FORBIDDEN, "").into_response();
            };
            if !receipts::meta_verify(
                secret.expose_secret().as_bytes(),
                &body,
                header("x-hub-signature-256"),
            ) {
                metrics::counter!("relance_delivery_receipts_refused_total", "provider" => name.clone()).increment(1);
                return (StatusCode::FORBIDDEN, "").into_response();
            }
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(json) => receipts::meta_receipts(&json),
                Err(_) => return (StatusCode::BAD_REQUEST, "").into_response(),
            }
        }
        _ => return (StatusCode::NOT_FOUND, "").into_response(),
    };
    let now = tracking.clock.now();
    for receipt in &found {
        match tracking.store.receipt(&name, receipt, now).await {
            Ok(true) => {
                metrics::counter!("relance_delivery_receipts_total", "provider" => name.clone())
                    .increment(1);
            }
            Ok(false) => {
                tracing::debug!(provider = %name, id = %receipt.provider_message_id, "receipt for no sent message");
            }
            // The provider retries a callback that did not get a 2xx.
            Err(error) => {
                tracing::warn!(%error, provider = %name, "receipt not recorded");
                return (StatusCode::SERVICE_UNAVAILABLE, "").into_response();
            }
        }
    }
    (StatusCode::OK, "").into_response()
}
