//! The workspace's own webhook: a signed JSON POST.
//!
//! Headers: `content-type: application/json`, `x-relance-timestamp: <unix seconds>`,
//! `x-relance-signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>` and
//! `idempotency-key: <message id>`, plus the content's own headers (at most 20, never one of
//! these). A receiver checks the signature with [`verify`]: signing the timestamp with the
//! body lets it refuse a replayed request.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use relance_proto::v1::Channel;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::Sha256;

use super::config::{Fields, ProviderConfig};
use super::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, read_response,
    retry_after, temporary_after, transport_error,
};

/// The most extra headers a webhook content may add.
pub const MAX_EXTRA_HEADERS: usize = 20;

/// Headers set by Relance (or by HTTP itself) that a content's headers cannot override.
const RESERVED: [&str; 8] = [
    "content-type",
    "x-relance-timestamp",
    "x-relance-signature",
    "idempotency-key",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// One webhook endpoint.
pub struct Webhook {
    name: String,
    http: reqwest::Client,
    url: String,
    secret: SecretString,
    timeout: Duration,
}

impl Webhook {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
        http: &reqwest::Client,
    ) -> anyhow::Result<Webhook> {
        let url = fields.required("url", &config.url)?.to_owned();
        super::config::check_http_url(&url).map_err(|reason| fields.error("url", reason))?;
        let secret = fields.required_secret("secret", &config.secret)?.clone();
        Ok(Webhook {
            name: config.name.trim().to_owned(),
            http: http.clone(),
            url,
            secret,
            timeout: config.timeout(),
        })
    }
}

/// The signature header's value for a body sent at `timestamp` (unix seconds):
/// `v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("hmac accepts keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// For receivers: checks a request's `x-relance-signature` header (`signature`, which may hold
/// several comma-separated `v1=` values while a secret is being rotated) against its
/// `x-relance-timestamp` and raw body, in constant time, and refuses a timestamp further than
/// `tolerance` from `now` (unix seconds), so a captured request cannot be replayed later.
pub fn verify(
    secret: &[u8],
    signature: &str,
    timestamp: i64,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> bool {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return false;
    }
    for candidate in signature.split(',') {
        let Some(hex_value) = candidate.trim().strip_prefix("v1=") else {
            continue;
        };
        let Ok(expected) = hex::decode(hex_value) else {
            continue;
        };
        if mac(secret, timestamp, body).verify_slice(&expected).is_ok() {
            return true;
        }
    }
    false
}

impl Provider for Webhook {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        Channel::Webhook
    }

    fn accepts(&self, address: &Address) -> bool {
        matches!(address, Address::Webhook)
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let body_value = match &message.webhook_body {
                Some(body) => body.clone(),
                None => json!({
                    "customer": message.customer,
                    "data": {},
                    "message_id": message.message_id.to_string(),
                }),
            };
            let body = serde_json::to_vec(&body_value)
                .map_err(|err| SendError::permanent(Permanent::Rejected, format!("body is not JSON: {err}")))?;
            let timestamp = super::wall_clock_secs();
            let signature = sign(self.secret.expose_secret().as_bytes(), timestamp, &body);
            let mut request = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .header("content-type", "application/json")
                .header("x-relance-timestamp", timestamp.to_string())
                .header("x-relance-signature", signature)
                .header("idempotency-key", message.message_id.hyphenated().to_string());
            if let Content::Webhook(webhook) = &message.content {
                let mut added = 0;
                for (name, value) in &webhook.headers {
                    if added == MAX_EXTRA_HEADERS {
                        tracing::warn!(provider = %self.name, limit = MAX_EXTRA_HEADERS, "webhook headers over the limit dropped");
                        break;
                    }
                    let lower = name.trim().to_ascii_lowercase();
                    if RESERVED.contains(&lower.as_str()) {
                        continue;
                    }
                    let (Ok(name), Ok(value)) =
                        (HeaderName::from_bytes(lower.as_bytes()), HeaderValue::from_str(value))
                    else {
                        tracing::debug!(provider = %self.name, header = %lower, "invalid webhook header dropped");
                        continue;
                    };
                    request = request.header(name, value);
                    added += 1;
                }
            }
            let response = request.body(body).send().await.map_err(|err| transport_error(&err))?;
            let (status, headers, body) = read_response(response).await?;
            if status.is_success() {
                return Ok(Accepted::default());
            }
            let detail = format!("{}: {}", status.as_u16(), body.excerpt());
            let error = match status.as_u16() {
                408 | 425 | 429 | 500..=599 => temporary_after(detail, retry_after(&headers)),
                _ => SendError::permanent(Permanent::Rejected, detail),
            };
            tracing::debug!(provider = %self.name, %status, error = %error, "webhook refused a message");
            Err(error)
        }
        .boxed()
    }
}
