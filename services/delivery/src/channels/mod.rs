//! Channel adapters: one [`Provider`] per provider account, each speaking its provider's
//! real wire format against a configurable base URL (so tests and benchmarks point them at
//! local fakes), and the [`Providers`] set that adds rate limits, circuit breakers and
//! failover between the providers of one channel.
//!
//! An adapter only translates: it gets a rendered message and an address, makes one call,
//! and classifies the answer as accepted, a permanent refusal (never retried) or a
//! temporary failure (retried later, or failed over to the next provider).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use relance_proto::v1::{
    Channel, EmailContent, InAppContent, PushContent, PushPlatform, SmsContent, WebhookContent,
    WhatsAppContent,
};

pub mod apns;
pub mod config;
pub mod email;
pub mod fcm;
pub mod meta;
pub mod set;
pub mod twilio;
pub mod webhook;

pub use config::{ProviderConfig, ProviderKind, SmtpTls, build};
pub use set::Providers;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A device's push token.
    Push {
        token: String,
        platform: PushPlatform,
        app_id: String,
    },
    /// An e-mail address.
    Email(String),
    /// A phone number in E.164 form (SMS, WhatsApp).
    Phone(String),
    /// The customer's in-app inbox (no provider call; stored by the service).
    Inbox,
    /// The workspace's webhook endpoint (configured on the provider).
    Webhook,
}

/// The rendered content of the chosen channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Push(PushContent),
    Email(EmailContent),
    Sms(SmsContent),
    WhatsApp(WhatsAppContent),
    InApp(InAppContent),
    Webhook(WebhookContent),
}

/// One message ready for a provider.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The ledger's id of the message: sent to every provider that takes an id of ours
    /// (APNs `apns-id`, the e-mail `Message-ID`, the webhook's `Idempotency-Key`, FCM and
    /// Meta custom data), so a resend after a crash can be recognised downstream.
    pub message_id: uuid::Uuid,
    /// The workspace.
    pub workspace_id: String,
    /// The customer's id (or anonymous id), for the webhook body.
    pub customer: String,
    /// Where to.
    pub address: Address,
    /// What.
    pub content: Content,
    /// How long the provider may keep trying (push TTL); at least one second.
    pub ttl: Duration,
    /// E-mail: the one-click unsubscribe URL for the `List-Unsubscribe` header.
    pub unsubscribe_url: Option<String>,
    /// Webhook: the JSON body to POST (already rendered).
    pub webhook_body: Option<serde_json::Value>,
    /// Text direction of the rendered locale (`rtl` adds markup where the channel has any).
    pub right_to_left: bool,
    /// The origin (flow, step, variant, broadcast), as key-values for providers that carry
    /// custom data.
    pub tags: BTreeMap<String, String>,
}

/// The provider took the message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    /// The provider's id of the message, when it returns one.
    pub provider_message_id: Option<String>,
}

/// Why a provider refused a message for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permanent {
    /// The address is invalid or dead (unregistered push token, hard bounce, bad number).
    InvalidAddress,
    /// The recipient unsubscribed or blocked us.
    Unsubscribed,
    /// The message itself was refused (content, unapproved template, bad credentials).
    Rejected,
}

/// A provider call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Never retried; the detail is the provider's own words (at most 1,000 characters).
    #[error("permanent ({kind:?}): {detail}")]
    Permanent { kind: Permanent, detail: String },
    /// Worth retrying (timeout, 5xx, 429); `retry_after` when the provider said.
    #[error("temporary: {detail}")]
    Temporary {
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl SendError {
    /// A temporary error with no hint of when to retry.
    pub fn temporary(detail: impl Into<String>) -> SendError {
        SendError::Temporary {
            detail: truncate(detail.into()),
            retry_after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(kind: Permanent, detail: impl Into<String>) -> SendError {
        SendError::Permanent {
            kind,
            detail: truncate(detail.into()),
        }
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > 1000 {
        let mut end = 1000;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// One provider account of one channel.
pub trait Provider: Send + Sync + 'static {
    /// The configured name (`fcm`, `twilio-backup`, …), recorded in the ledger.
    fn name(&self) -> &str;
    /// The channel it serves.
    fn channel(&self) -> Channel;
    /// Whether it can send to this address (APNs takes iOS tokens, FCM Android and web).
    fn accepts(&self, address: &Address) -> bool;
    /// Makes the provider call.
    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>>;
}

/// The lowercase name of a channel, for logs, metrics and error details.
pub fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Unspecified => "unspecified",
        Channel::Push => "push",
        Channel::Email => "email",
        Channel::Sms => "sms",
        Channel::Whatsapp => "whatsapp",
        Channel::InApp => "in_app",
        Channel::Webhook => "webhook",
    }
}

/// The machine's time, in unix seconds, for what a provider checks against its own clock (JWT
/// `iat`, APNs expiration, the webhook timestamp): a test clock moved by days must not leak
/// into them, or the provider would refuse the call.
pub(crate) fn wall_clock_secs() -> i64 {
    use relance_kit::Clock;
    relance_kit::SystemClock.now().timestamp()
}

/// The `Retry-After` header, in seconds or as an HTTP date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = date.timestamp() - wall_clock_secs();
    Some(Duration::from_secs(u64::try_from(wait).unwrap_or(0)))
}

/// A temporary error with the provider's `Retry-After`, when it gave one.
pub(crate) fn temporary_after(detail: impl Into<String>, retry: Option<Duration>) -> SendError {
    SendError::Temporary {
        detail: truncate(detail.into()),
        retry_after: retry,
    }
}

/// A call that got no answer (connection refused, reset, timeout): always temporary, as
/// nothing says the provider refused the message.
pub(crate) fn transport_error(err: &reqwest::Error) -> SendError {
    if err.is_timeout() {
        return SendError::temporary(format!("timed out: {err}"));
    }
    if err.is_connect() {
        return SendError::temporary(format!("cannot connect: {err}"));
    }
    SendError::temporary(format!("call failed: {err}"))
}

/// The start of a response body for an error detail: providers' error bodies are short, but
/// an HTML error page from a proxy is not.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut end = text.len().min(500);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Reads a response to the end, as a call's outcome: the status, headers and body, or a
/// temporary error when the body cannot be read.
pub(crate) async fn read_response(
    response: reqwest::Response,
) -> Result<
    (
        reqwest::StatusCode,
        reqwest::header::HeaderMap,
        bytes_body::Body,
    ),
    SendError,
> {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map_err(|err| transport_error(&err))?;
    Ok((status, headers, bytes_body::Body(body.to_vec())))
}

pub(crate) mod bytes_body {
    /// A response body read to the end.
    pub(crate) struct Body(pub(crate) Vec<u8>);

    impl Body {
        /// The body as JSON, or `Null` when it is not.
        pub(crate) fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.0).unwrap_or(serde_json::Value::Null)
        }

        /// The body as text for an error detail.
        pub(crate) fn excerpt(&self) -> String {
            super::body_excerpt(&self.0)
        }
    }
}
