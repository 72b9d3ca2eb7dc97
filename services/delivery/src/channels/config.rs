//! The configuration of one provider account (`delivery.providers[]`) and the factory that
//! turns it into a [`Provider`].
//!
//! One flat struct for every kind keeps the TOML simple (`kind = "fcm"` plus that kind's
//! fields); [`build`] checks that the fields of the chosen kind are there and names the
//! missing or invalid ones by their path, so a bad configuration fails at start-up, not at the
//! first message.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Provider;

/// Which provider a configured account talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Firebase Cloud Messaging, HTTP v1 API (Android and web push).
    Fcm,
    /// Apple Push Notification service, token-based HTTP/2 API (iOS push).
    Apns,
    /// Any SMTP server (e-mail).
    Smtp,
    /// Twilio Programmable Messaging (SMS).
    Twilio,
    /// Meta's WhatsApp Cloud API (WhatsApp templates).
    Meta,
    /// The workspace's own HTTPS endpoint.
    Webhook,
}

impl ProviderKind {
    /// The base URL of the real provider, used when `base_url` is not set; `None` for the kinds
    /// that have no single public endpoint.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Fcm => Some("https://fcm.googleapis.com"),
            ProviderKind::Apns => Some("https://api.push.apple.com"),
            ProviderKind::Twilio => Some("https://api.twilio.com"),
            ProviderKind::Meta => Some("https://graph.facebook.com"),
            ProviderKind::Smtp | ProviderKind::Webhook => None,
        }
    }
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (a local relay or a test server only).
    None,
    /// Plain connection upgraded with STARTTLS, which is required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// One provider account, as configured under `delivery.providers`.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderConfig {
    /// The name recorded in the ledger (`fcm`, `twilio-backup`…); unique.
    pub name: String,
    /// Which provider.
    pub kind: ProviderKind,
    /// Where the provider's API is; unset means the real provider's (see
    /// [`ProviderKind::default_base_url`]). Tests and benchmarks point it at a fake.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Calls per second allowed to this account; 0 means unlimited.
    #[serde(default)]
    pub rate_per_sec: f64,
    /// Calls that may be made at once above the rate; 0 means one second's worth.
    #[serde(default)]
    pub burst: u32,
    /// Timeout of one provider call, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive temporary failures that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit stays open before one trial call, in milliseconds.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,

    // --- fcm ---
    /// FCM: the Firebase project id.
    #[serde(default)]
    pub project_id: Option<String>,
    /// FCM and Meta: a static bearer token (FCM: for development and tests only, as Google's
    /// tokens expire within the hour; Meta: a system user's long-lived token).
    #[serde(default)]
    pub access_token: Option<SecretString>,
    /// FCM: the Google service account's JSON key file, as text (`client_email`,
    /// `private_key`, `token_uri`), exchanged for access tokens with an RS256 JWT.
    #[serde(default)]
    pub service_account_json: Option<SecretString>,

    // --- apns ---
    /// APNs: the Apple developer team id (the JWT's `iss`).
    #[serde(default)]
    pub team_id: Option<String>,
    /// APNs: the id of the signing key (the JWT's `kid`).
    #[serde(default)]
    pub key_id: Option<String>,
    /// APNs: the `.p8` ES256 signing key, PEM.
    #[serde(default)]
    pub private_key: Option<SecretString>,
    /// APNs: the app's bundle id (`apns-topic`).
    #[serde(default)]
    pub topic: Option<String>,

    // --- smtp ---
    /// SMTP: the server's host name.
    #[serde(default)]
    pub host: Option<String>,
    /// SMTP: the port; unset means 25, 587 or 465 according to `tls`.
    #[serde(default)]
    pub port: Option<u16>,
    /// SMTP: how the connection is secured; unset means STARTTLS.
    #[serde(default)]
    pub tls: Option<SmtpTls>,
    /// SMTP: the login, when the server wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP: the password.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// SMTP: the sender's address.
    #[serde(default)]
    pub from_address: Option<String>,
    /// SMTP: the sender's default display name.
    #[serde(default)]
    pub from_name: Option<String>,

    // --- twilio ---
    /// Twilio: the account SID (`AC…`).
    #[serde(default)]
    pub account_sid: Option<String>,
    /// Twilio: the auth token.
    #[serde(default)]
    pub auth_token: Option<SecretString>,
    /// Twilio: the sending number (E.164) or a messaging service SID (`MG…`).
    #[serde(default)]
    pub from: Option<String>,

    /// Calls in flight at once; unset means 16 for SMTP (a pool of connections), 256 for
    /// the HTTP APIs.
    #[serde(default)]
    pub max_in_flight: Option<usize>,

    // --- meta ---
    /// Meta: the WhatsApp business phone number id.
    #[serde(default)]
    pub phone_number_id: Option<String>,
    /// Meta: the Graph API version; unset means `v21.0`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Meta: the app secret that signs status webhooks (`X-Hub-Signature-256`); unset means
    /// delivery receipts from Meta are refused.
    #[serde(default)]
    pub app_secret: Option<SecretString>,
    /// Meta: the token Meta echoes when the webhook is registered (`hub.verify_token`).
    #[serde(default)]
    pub verify_token: Option<String>,

    // --- webhook ---
    /// Webhook: the endpoint messages are POSTed to.
    #[serde(default)]
    pub url: Option<String>,
    /// Webhook: the HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret: Option<SecretString>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_breaker_failures() -> u32 {
    5
}

fn default_breaker_open_ms() -> u64 {
    30_000
}

impl ProviderConfig {
    /// A configuration with every optional field unset and the defaults of the others; set
    /// the kind's fields before [`build`].
    pub fn new(name: impl Into<String>, kind: ProviderKind) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            kind,
            base_url: None,
            rate_per_sec: 0.0,
            burst: 0,
            timeout_ms: default_timeout_ms(),
            breaker_failures: default_breaker_failures(),
            breaker_open_ms: default_breaker_open_ms(),
            project_id: None,
            access_token: None,
            service_account_json: None,
            team_id: None,
            key_id: None,
            private_key: None,
            topic: None,
            host: None,
            port: None,
            tls: None,
            username: None,
            password: None,
            from_address: None,
            from_name: None,
            account_sid: None,
            auth_token: None,
            from: None,
            phone_number_id: None,
            api_version: None,
            max_in_flight: None,
            app_secret: None,
            verify_token: None,
            url: None,
            secret: None,
        }
    }

    /// The base URL to call, without a trailing slash: the configured one or the kind's
    /// default.
    pub fn resolved_base_url(&self) -> Option<String> {
        let base = match &self.base_url {
            Some(url) => Some(url.clone()),
            None => self.kind.default_base_url().map(str::to_owned),
        };
        base.map(|url| url.trim_end_matches('/').to_owned())
    }

    /// Calls in flight at once.
    pub fn max_in_flight(&self) -> usize {
        match self.max_in_flight {
            Some(n) => n.max(1),
            None if self.kind == ProviderKind::Smtp => 16,
            None => 256,
        }
    }

    /// The longest one call may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Reads one field for [`build`]: present and not blank, or an error naming it.
pub(crate) struct Fields<'a> {
    index: usize,
    config: &'a ProviderConfig,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(config: &'a ProviderConfig, index: usize) -> Fields<'a> {
        Fields { index, config }
    }

    /// The error for a field, in the `delivery.providers[i].field: reason` form.
    pub(crate) fn error(&self, field: &str, reason: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("delivery.providers[{}].{field}: {reason}", self.index)
    }

    pub(crate) fn required<'v>(
        &self,
        field: &str,
        value: &'v Option<String>,
    ) -> anyhow::Result<&'v str> {
        match value.as_deref().map(str::trim) {
            Some(text) if !text.is_empty() => Ok(text),
            _ => Err(self.error(
                field,
                format_args!("required for kind {:?}", self.config.kind),
            )),
        }
    }

    pub(crate) fn required_secret<'v>(
        &self,
        field: &str,
        value: &'v Option<SecretString>,
    ) -> anyhow::Result<&'v SecretString> {
        match value {
            Some(secret) if !secret.expose_secret().trim().is_empty() => Ok(secret),
            _ => Err(self.error(
                field,
                format_args!("required for kind {:?}", self.config.kind),
            )),
        }
    }

    /// The base URL, which must be http(s).
    pub(crate) fn base_url(&self) -> anyhow::Result<String> {
        let Some(base) = self.config.resolved_base_url() else {
            return Err(self.error("base_url", "required"));
        };
        check_http_url(&base).map_err(|reason| self.error("base_url", reason))?;
        Ok(base)
    }
}

/// Checks that a configured URL is an absolute http(s) URL.
pub(crate) fn check_http_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|err| format!("not a URL ({err})"))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(format!("must be http or https, not {}", parsed.scheme()));
    }
    if parsed.host_str().is_none() {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// Validates a provider's configuration and builds it. `index` is its position in
/// `delivery.providers`, used in the error messages; `http` is the shared client (APNs builds
/// its own, as it must speak HTTP/2).
pub fn build(
    config: &ProviderConfig,
    index: usize,
    http: &reqwest::Client,
) -> anyhow::Result<Arc<dyn Provider>> {
    let fields = Fields::new(config, index);
    let name = config.name.trim();
    if name.is_empty() {
        return Err(fields.error("name", "required"));
    }
    if name.len() > 64 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fields.error("name", "at most 64 characters, no spaces"));
    }
    if !config.rate_per_sec.is_finite() || config.rate_per_sec < 0.0 {
        return Err(fields.error("rate_per_sec", "must be 0 (unlimited) or more"));
    }
    if config.timeout_ms == 0 {
        return Err(fields.error("timeout_ms", "must be more than 0"));
    }
    if config.breaker_failures == 0 {
        return Err(fields.error("breaker_failures", "must be more than 0"));
    }
    let provider: Arc<dyn Provider> = match config.kind {
        ProviderKind::Fcm => Arc::new(super::fcm::Fcm::from_config(&fields, config, http)?),
        ProviderKind::Apns => Arc::new(super::apns::Apns::from_config(&fields, config)?),
        ProviderKind::Smtp => Arc::new(super::email::Smtp::from_config(&fields, config)?),
        ProviderKind::Twilio => {
            Arc::new(super::twilio::Twilio::from_config(&fields, config, http)?)
        }
        ProviderKind::Meta => Arc::new(super::meta::Meta::from_config(&fields, config, http)?),
        ProviderKind::Webhook => {
            Arc::new(super::webhook::Webhook::from_config(&fields, config, http)?)
        }
    };
    Ok(provider)
}

/// Checks the whole list: every entry builds and names are unique.
pub(crate) fn check_unique_names(configs: &[ProviderConfig]) -> anyhow::Result<()> {
    for (index, config) in configs.iter().enumerate() {
        for earlier in &configs[..index] {
            if earlier.name.trim() == config.name.trim() {
                bail!(
                    "delivery.providers[{index}].name: {:?} is already the name of another provider",
                    config.name
                );
            }
        }
    }
    Ok(())
}
