//! Firebase Cloud Messaging, HTTP v1 API: Android and web push.
//!
//! `POST {base}/v1/projects/{project_id}/messages:send` with a bearer token: a static one
//! (development, tests) or one obtained from a service account's key through Google's OAuth2
//! JWT-bearer grant (an RS256 JWT exchanged at the key's `token_uri`), cached until shortly
//! before it expires.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relance_proto::v1::{Channel, PushPlatform};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::config::{Fields, ProviderConfig};
use super::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, read_response,
    retry_after, temporary_after, transport_error,
};

/// The OAuth2 scope that allows sending with FCM.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A token is renewed this long before Google says it expires, so that no call goes out with
/// a token that expires on the way.
const TOKEN_MARGIN: Duration = Duration::from_secs(120);

/// One FCM project.
pub struct Fcm {
    name: String,
    http: reqwest::Client,
    send_url: String,
    project_id: String,
    timeout: Duration,
    auth: Auth,
}

enum Auth {
    Static(SecretString),
    ServiceAccount(ServiceAccount),
}

/// A service account's key and the access token last obtained with it.
struct ServiceAccount {
    client_email: String,
    key: EncodingKey,
    token_uri: String,
    /// A tokio mutex: held across the exchange, so that concurrent sends wait for one
    /// exchange instead of each making their own.
    cached: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

impl Fcm {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
        http: &reqwest::Client,
    ) -> anyhow::Result<Fcm> {
        let base = fields.base_url()?;
        let project_id = fields
            .required("project_id", &config.project_id)?
            .to_owned();
        if !project_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':')
        {
            return Err(fields.error("project_id", "not a Firebase project id"));
        }
        let auth = match (&config.access_token, &config.service_account_json) {
            (Some(_), Some(_)) => {
                return Err(fields.error(
                    "access_token",
                    "set either access_token or service_account_json, not both",
                ));
            }
            (Some(_), None) => Auth::Static(
                fields
                    .required_secret("access_token", &config.access_token)?
                    .clone(),
            ),
            (None, Some(json)) => {
                let file: KeyFile = serde_json::from_str(json.expose_secret()).map_err(|err| {
                    fields.error(
                        "service_account_json",
                        format_args!("not a service account key file ({err})"),
                    )
                })?;
                let key =
                    EncodingKey::from_rsa_pem(file.private_key.as_bytes()).map_err(|err| {
                        fields.error(
                            "service_account_json",
                            format_args!("private_key is not an RSA PEM key ({err})"),
                        )
                    })?;
                let token_uri = file
                    .token_uri
                    .unwrap_or_else(|| "https://oauth2.googleapis.com/token".to_owned());
                super::config::check_http_url(&token_uri).map_err(|reason| {
                    fields.error("service_account_json", format_args!("token_uri {reason}"))
                })?;
                Auth::ServiceAccount(ServiceAccount {
                    client_email: file.client_email,
                    key,
                    token_uri,
                    cached: tokio::sync::Mutex::new(None),
                })
            }
            (None, None) => {
                return Err(fields.error(
                    "service_account_json",
                    "required for kind Fcm (or access_token, for development)",
                ));
            }
        };
        Ok(Fcm {
            name: config.name.trim().to_owned(),
            http: http.clone(),
            send_url: format!("{base}/v1/projects/{project_id}/messages:send"),
            project_id,
            timeout: config.timeout(),
            auth,
        })
    }

    /// The bearer token for the next call.
    async fn token(&self) -> Result<SecretString, SendError> {
        let account = match &self.auth {
            Auth::Static(token) => return Ok(token.clone()),
            Auth::ServiceAccount(account) => account,
        };
        let mut cached = account.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + TOKEN_MARGIN < *expires
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.exchange(account).await?;
        *cached = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    /// Forgets the cached token, after FCM refused it.
    async fn forget_token(&self) {
        if let Auth::ServiceAccount(account) = &self.auth {
            *account.cached.lock().await = None;
        }
    }

    /// Exchanges a signed assertion for an access token (RFC 7523).
    async fn exchange(
        &self,
        account: &ServiceAccount,
    ) -> Result<(SecretString, Duration), SendError> {
        let now = super::wall_clock_secs();
        let claims = AssertionClaims {
            iss: &account.client_email,
            scope: SCOPE,
            aud: &account.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &account.key)
            .map_err(|err| {
                SendError::permanent(
                    Permanent::Rejected,
                    format!("cannot sign the oauth assertion: {err}"),
                )
            })?;
        let response = self
            .http
            .post(&account.token_uri)
            .timeout(self.timeout)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|err| transport_error(&err))?;
        let (status, headers, body) = read_response(response).await?;
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(temporary_after(
                format!("oauth token exchange: {status}: {}", body.excerpt()),
                retry_after(&headers),
            ));
        }
        if !status.is_success() {
            // invalid_grant, invalid_client: the key is revoked or wrong; retrying is useless.
            return Err(SendError::permanent(
                Permanent::Rejected,
                format!(
                    "bad credentials: oauth token exchange refused: {status}: {}",
                    body.excerpt()
                ),
            ));
        }
        let answer = body.json();
        let Some(token) = answer.get("access_token").and_then(Value::as_str) else {
            return Err(SendError::temporary(format!(
                "oauth token exchange: no access_token in {}",
                body.excerpt()
            )));
        };
        let lifetime = answer
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        tracing::debug!(provider = %self.name, lifetime_s = lifetime, "fcm access token obtained");
        Ok((
            SecretString::from(token.to_owned()),
            Duration::from_secs(lifetime),
        ))
    }

    /// The v1 request body.
    pub(crate) fn body(
        message: &Outbound,
        token: &str,
        platform: PushPlatform,
    ) -> Result<Value, SendError> {
        let Content::Push(push) = &message.content else {
            return Err(SendError::permanent(
                Permanent::Rejected,
                "fcm sends push content only",
            ));
        };
        // Data values must be strings; ours are set last so an app's key cannot spoof them.
        let mut data: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, value) in &message.tags {
            data.insert(key, value);
        }
        for (key, value) in &push.data {
            data.insert(key, value);
        }
        let message_id = message.message_id.to_string();
        data.insert("relance_message_id", &message_id);
        if !push.url.is_empty() {
            data.insert("url", &push.url);
        }

        let mut notification = json!({ "title": push.title, "body": push.body });
        if !push.image_url.is_empty() {
            notification["image"] = json!(push.image_url);
        }
        let ttl_secs = message.ttl.as_secs().max(1);
        let mut android = json!({ "ttl": format!("{ttl_secs}s") });
        if !push.collapse_key.is_empty() {
            android["collapse_key"] = json!(push.collapse_key);
        }
        // The notification's tag: a resend after a crash (same message) replaces the one on
        // the device instead of showing twice; a collapse key groups on purpose.
        let tag = if push.collapse_key.is_empty() {
            message_id.as_str()
        } else {
            push.collapse_key.as_str()
        };
        android["notification"] = json!({ "tag": tag });
        let mut body = json!({
            "message": {
                "token": token,
                "notification": notification,
                "data": data,
                "android": android,
            }
        });
        if platform == PushPlatform::Web {
            let mut webpush = json!({ "headers": { "TTL": ttl_secs.to_string() } });
            if !push.collapse_key.is_empty() {
                webpush["headers"]["Topic"] = json!(web_topic(&push.collapse_key));
            }
            // FCM only accepts an HTTPS link for web notifications.
            if push.url.starts_with("https://") {
                webpush["fcm_options"] = json!({ "link": push.url });
            }
            body["message"]["webpush"] = webpush;
        }
        if let Some(label) = analytics_label(&message.tags) {
            body["message"]["fcm_options"] = json!({ "analytics_label": label });
        }
        Ok(body)
    }
}

/// The Web Push `Topic` header allows at most 32 URL-safe base64 characters.
fn web_topic(collapse_key: &str) -> String {
    collapse_key
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect()
}

/// FCM's analytics label (`^[a-zA-Z0-9-_.~%]{1,50}$`), from the broadcast or flow the message
/// belongs to, so that Firebase's delivery reports can be split by campaign.
fn analytics_label(tags: &BTreeMap<String, String>) -> Option<String> {
    let source = tags.get("broadcast").or_else(|| tags.get("flow"))?;
    let label: String = source
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '%'))
        .take(50)
        .collect();
    if label.is_empty() {
        return None;
    }
    Some(label)
}

/// Classifies an error answer of `messages:send`.
pub(crate) fn classify(
    status: reqwest::StatusCode,
    body: &Value,
    text: &str,
    retry: Option<Duration>,
) -> SendError {
    let error_code = body
        .pointer("/error/details")
        .and_then(Value::as_array)
        .and_then(|details| {
            details
                .iter()
                .find_map(|detail| detail.get("errorCode").and_then(Value::as_str))
        })
        .or_else(|| body.pointer("/error/status").and_then(Value::as_str))
        .unwrap_or("");
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or(text);
    let detail = format!("{} {error_code}: {message}", status.as_u16());
    match status.as_u16() {
        404 => SendError::permanent(Permanent::InvalidAddress, detail),
        _ if error_code == "UNREGISTERED" => {
            SendError::permanent(Permanent::InvalidAddress, detail)
        }
        400 if message.to_ascii_lowercase().contains("token") => {
            SendError::permanent(Permanent::InvalidAddress, detail)
        }
        401 | 403 => SendError::permanent(
            Permanent::Rejected,
            format!("bad credentials or project: {detail}"),
        ),
        429 | 500..=599 => temporary_after(detail, retry),
        _ => SendError::permanent(Permanent::Rejected, detail),
    }
}

impl Provider for Fcm {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        Channel::Push
    }

    fn accepts(&self, address: &Address) -> bool {
        matches!(
            address,
            Address::Push {
                platform: PushPlatform::Android | PushPlatform::Web,
                ..
            }
        )
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let Address::Push { token, platform, .. } = &message.address else {
                return Err(SendError::permanent(Permanent::InvalidAddress, "fcm needs a push token"));
            };
            let body = Fcm::body(message, token, *platform)?;
            let bearer = self.token().await?;
            let response = self
                .http
                .post(&self.send_url)
                .timeout(self.timeout)
                .bearer_auth(bearer.expose_secret())
                .json(&body)
                .send()
                .await
                .map_err(|err| transport_error(&err))?;
            let (status, headers, body) = read_response(response).await?;
            if status.is_success() {
                let answer = body.json();
                let id = answer.get("name").and_then(Value::as_str).map(str::to_owned);
                return Ok(Accepted { provider_message_id: id });
            }
            if status.as_u16() == 401 {
                self.forget_token().await;
            }
            let error = classify(status, &body.json(), &body.excerpt(), retry_after(&headers));
            tracing::debug!(provider = %self.name, project = %self.project_id, %status, error = %error, "fcm refused a message");
            Err(error)
        }
        .boxed()
    }
}
