//! Apple Push Notification service, token-based authentication over HTTP/2: iOS push.
//!
//! `POST {base}/3/device/{token}` with an ES256 JWT (`iss` = team id, `iat`, header `kid` =
//! key id) as bearer. Apple refuses a JWT older than an hour and also one renewed more often
//! than every 20 minutes, so it is renewed every 50 minutes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relance_proto::v1::{Channel, PushPlatform};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::config::{Fields, ProviderConfig};
use super::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, read_response,
    retry_after, temporary_after, transport_error,
};

/// How long one provider token is used.
const JWT_LIFETIME: Duration = Duration::from_secs(50 * 60);

/// One APNs signing key and app.
pub struct Apns {
    name: String,
    http: reqwest::Client,
    base: String,
    topic: String,
    team_id: String,
    key_id: String,
    key: EncodingKey,
    timeout: Duration,
    jwt: Mutex<Option<CachedJwt>>,
}

#[derive(Clone)]
struct CachedJwt {
    token: String,
    issued: Instant,
    /// Made after APNs refused the previous one: if APNs refuses this one too, the key is
    /// wrong and the refusal is permanent.
    after_refusal: bool,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

impl Apns {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
    ) -> anyhow::Result<Apns> {
        let base = fields.base_url()?;
        let team_id = fields.required("team_id", &config.team_id)?.to_owned();
        let key_id = fields.required("key_id", &config.key_id)?.to_owned();
        let topic = fields.required("topic", &config.topic)?.to_owned();
        let pem = fields.required_secret("private_key", &config.private_key)?;
        let key = EncodingKey::from_ec_pem(pem.expose_secret().as_bytes()).map_err(|err| {
            fields.error(
                "private_key",
                format_args!("not an ES256 (P-256) PKCS#8 PEM key ({err})"),
            )
        })?;
        // Sign once now, so a key that parses but cannot sign fails at start-up.
        sign(&key, &key_id, &team_id).map_err(|err| fields.error("private_key", err))?;
        // APNs speaks only HTTP/2: over https ALPN settles it; a plain-http fake needs prior
        // knowledge.
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout())
            .pool_idle_timeout(Duration::from_secs(600));
        if base.starts_with("http://") {
            builder = builder.http2_prior_knowledge();
        }
        let http = builder.build().map_err(|err| {
            fields.error(
                "base_url",
                format_args!("cannot build the HTTP/2 client: {err}"),
            )
        })?;
        Ok(Apns {
            name: config.name.trim().to_owned(),
            http,
            base,
            topic,
            team_id,
            key_id,
            key,
            timeout: config.timeout(),
            jwt: Mutex::new(None),
        })
    }

    /// The current provider token, made anew when older than [`JWT_LIFETIME`].
    fn jwt(&self) -> Result<CachedJwt, SendError> {
        let mut cached = self
            .jwt
            .lock()
            .map_err(|_| SendError::temporary("apns jwt lock poisoned"))?;
        if let Some(jwt) = cached.as_ref()
            && jwt.issued.elapsed() < JWT_LIFETIME
        {
            return Ok(jwt.clone());
        }
        let token = sign(&self.key, &self.key_id, &self.team_id)
            .map_err(|err| SendError::permanent(Permanent::Rejected, err))?;
        let jwt = CachedJwt {
            token,
            issued: Instant::now(),
            after_refusal: false,
        };
        *cached = Some(jwt.clone());
        Ok(jwt)
    }

    /// APNs refused `refused`: makes a new token unless one was already made since. Returns
    /// false when `refused` was itself made after a refusal (the key is wrong).
    fn renew_after_refusal(&self, refused: &CachedJwt) -> bool {
        if refused.after_refusal {
            return false;
        }
        let Ok(mut cached) = self.jwt.lock() else {
            return true;
        };
        let still_current = cached
            .as_ref()
            .is_some_and(|jwt| jwt.token == refused.token);
        if still_current && let Ok(token) = sign(&self.key, &self.key_id, &self.team_id) {
            *cached = Some(CachedJwt {
                token,
                issued: Instant::now(),
                after_refusal: true,
            });
        }
        true
    }

    /// A token that worked: the next refusal is again worth one renewal.
    fn token_worked(&self, used: &CachedJwt) {
        if !used.after_refusal {
            return;
        }
        if let Ok(mut cached) = self.jwt.lock()
            && let Some(jwt) = cached.as_mut()
            && jwt.token == used.token
        {
            jwt.after_refusal = false;
        }
    }

    /// The JSON payload.
    pub(crate) fn payload(message: &Outbound) -> Result<Value, SendError> {
        let Content::Push(push) = &message.content else {
            return Err(SendError::permanent(
                Permanent::Rejected,
                "apns sends push content only",
            ));
        };
        let mut root = Map::new();
        // Custom keys first, so that ours overwrite theirs.
        for (key, value) in &message.tags {
            root.insert(key.clone(), json!(value));
        }
        for (key, value) in &push.data {
            root.insert(key.clone(), json!(value));
        }
        // mutable-content lets the app's notification service extension download the image.
        root.insert(
            "aps".to_owned(),
            json!({
                "alert": { "title": push.title, "body": push.body },
                "sound": "default",
                "mutable-content": 1,
            }),
        );
        if !push.url.is_empty() {
            root.insert("url".to_owned(), json!(push.url));
        }
        if !push.image_url.is_empty() {
            root.insert("image_url".to_owned(), json!(push.image_url));
        }
        root.insert(
            "relance_message_id".to_owned(),
            json!(message.message_id.to_string()),
        );
        Ok(Value::Object(root))
    }
}

fn sign(key: &EncodingKey, key_id: &str, team_id: &str) -> Result<String, String> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key_id.to_owned());
    let claims = Claims {
        iss: team_id,
        iat: super::wall_clock_secs(),
    };
    jsonwebtoken::encode(&header, &claims, key)
        .map_err(|err| format!("cannot sign the apns jwt: {err}"))
}

impl Provider for Apns {
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
                platform: PushPlatform::Ios,
                ..
            }
        )
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let Address::Push { token, .. } = &message.address else {
                return Err(SendError::permanent(Permanent::InvalidAddress, "apns needs a push token"));
            };
            if token.is_empty() || !token.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(SendError::permanent(
                    Permanent::InvalidAddress,
                    "apns device tokens are hexadecimal",
                ));
            }
            let Content::Push(push) = &message.content else {
                return Err(SendError::permanent(Permanent::Rejected, "apns sends push content only"));
            };
            let payload = Apns::payload(message)?;
            let jwt = self.jwt()?;
            let expiration = super::wall_clock_secs() + message.ttl.as_secs().max(1) as i64;
            let apns_id = message.message_id.hyphenated().to_string();
            let mut request = self
                .http
                .post(format!("{}/3/device/{token}", self.base))
                .timeout(self.timeout)
                .header("authorization", format!("bearer {}", jwt.token))
                .header("apns-topic", &self.topic)
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .header("apns-expiration", expiration.to_string())
                .header("apns-id", &apns_id)
                .json(&payload);
            if !push.collapse_key.is_empty() {
                // At most 64 bytes.
                let mut end = push.collapse_key.len().min(64);
                while !push.collapse_key.is_char_boundary(end) {
                    end -= 1;
                }
                request = request.header("apns-collapse-id", &push.collapse_key[..end]);
            } else {
                // A resend after a crash (same message) replaces the notification on the
                // device instead of showing twice.
                request = request.header("apns-collapse-id", &apns_id);
            }
            let response = request.send().await.map_err(|err| transport_error(&err))?;
            let (status, headers, body) = read_response(response).await?;
            if status.is_success() {
                self.token_worked(&jwt);
                let id = headers
                    .get("apns-id")
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or(apns_id);
                return Ok(Accepted { provider_message_id: Some(id) });
            }
            let answer = body.json();
            let reason = answer.get("reason").and_then(Value::as_str).unwrap_or("");
            let detail = format!("{} {reason}", status.as_u16());
            let error = match (status.as_u16(), reason) {
                (410, _) | (400, "BadDeviceToken" | "Unregistered" | "DeviceTokenNotForTopic") => {
                    SendError::permanent(Permanent::InvalidAddress, detail)
                }
                (403, "ExpiredProviderToken" | "InvalidProviderToken") => {
                    if self.renew_after_refusal(&jwt) {
                        tracing::warn!(provider = %self.name, reason, "apns refused the provider token; renewed it");
                        SendError::temporary(format!("{detail} (provider token renewed)"))
                    } else {
                        SendError::permanent(
                            Permanent::Rejected,
                            format!("bad credentials: {detail} (a fresh provider token was refused too)"),
                        )
                    }
                }
                (403, _) => SendError::permanent(Permanent::Rejected, format!("bad credentials: {detail}")),
                (429 | 500..=599, _) => temporary_after(detail, retry_after(&headers)),
                _ => SendError::permanent(Permanent::Rejected, detail),
            };
            tracing::debug!(provider = %self.name, %status, error = %error, "apns refused a message");
            Err(error)
        }
        .boxed()
    }
}
