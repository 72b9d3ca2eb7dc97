//! Meta's WhatsApp Cloud API: template messages.
//!
//! `POST {base}/{api_version}/{phone_number_id}/messages` with a bearer token and a
//! `type: template` message. Marketing on WhatsApp must use templates approved by Meta, so
//! that is the only kind sent; the template's parameters are rendered by Relance.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use relance_proto::v1::Channel;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::config::{Fields, ProviderConfig};
use super::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, read_response,
    retry_after, temporary_after, transport_error,
};

/// The Graph API version used when none is configured.
pub const DEFAULT_API_VERSION: &str = "v21.0";

/// One WhatsApp business phone number.
pub struct Meta {
    name: String,
    http: reqwest::Client,
    url: String,
    access_token: SecretString,
    timeout: Duration,
}

impl Meta {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
        http: &reqwest::Client,
    ) -> anyhow::Result<Meta> {
        let base = fields.base_url()?;
        let phone_number_id = fields.required("phone_number_id", &config.phone_number_id)?;
        if !phone_number_id.chars().all(|c| c.is_ascii_digit()) {
            return Err(fields.error("phone_number_id", "Meta's phone number ids are digits"));
        }
        let api_version = config
            .api_version
            .as_deref()
            .map(str::trim)
            .unwrap_or(DEFAULT_API_VERSION);
        let valid_version = api_version.strip_prefix('v').is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
        });
        if !valid_version {
            return Err(fields.error("api_version", "a Graph API version such as v21.0"));
        }
        let access_token = fields
            .required_secret("access_token", &config.access_token)?
            .clone();
        Ok(Meta {
            name: config.name.trim().to_owned(),
            http: http.clone(),
            url: format!("{base}/{api_version}/{phone_number_id}/messages"),
            access_token,
            timeout: config.timeout(),
        })
    }

    /// The request body.
    pub(crate) fn body(message: &Outbound, phone: &str) -> Result<Value, SendError> {
        let Content::WhatsApp(whatsapp) = &message.content else {
            return Err(SendError::permanent(
                Permanent::Rejected,
                "meta sends whatsapp content only",
            ));
        };
        let to: String = phone.chars().filter(char::is_ascii_digit).collect();
        if to.len() < 6 {
            return Err(SendError::permanent(
                Permanent::InvalidAddress,
                "not a phone number",
            ));
        }
        let mut components = Vec::new();
        if !whatsapp.header_image_url.is_empty() {
            components.push(json!({
                "type": "header",
                "parameters": [{ "type": "image", "image": { "link": whatsapp.header_image_url } }],
            }));
        }
        if !whatsapp.body_parameters.is_empty() {
            let mut parameters = Vec::new();
            for text in &whatsapp.body_parameters {
                parameters.push(json!({ "type": "text", "text": text }));
            }
            components.push(json!({ "type": "body", "parameters": parameters }));
        }
        for (index, suffix) in whatsapp.button_url_parameters.iter().enumerate() {
            components.push(json!({
                "type": "button",
                "sub_type": "url",
                "index": index.to_string(),
                "parameters": [{ "type": "text", "text": suffix }],
            }));
        }
        Ok(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "template",
            "template": {
                "name": whatsapp.template_name,
                "language": { "code": whatsapp.language },
                "components": components,
            },
            "biz_opaque_callback_data": message.message_id.to_string(),
        }))
    }
}

/// Classifies an error answer from the Graph API's `error.code`.
pub(crate) fn classify(
    status: reqwest::StatusCode,
    body: &Value,
    text: &str,
    retry: Option<Duration>,
) -> SendError {
    let code = body
        .pointer("/error/code")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or(text);
    let details = body
        .pointer("/error/error_data/details")
        .and_then(Value::as_str)
        .unwrap_or("");
    let detail = if details.is_empty() {
        format!("{} {code}: {message}", status.as_u16())
    } else {
        format!("{} {code}: {message} ({details})", status.as_u16())
    };
    match code {
        // Undeliverable (not on WhatsApp, old app), not in the test number's allowed list,
        // invalid user.
        131026 | 131030 | 1013 => SendError::permanent(Permanent::InvalidAddress, detail),
        // The user stopped marketing messages from this business.
        131050 => SendError::permanent(Permanent::Unsubscribed, detail),
        // Rate limits (throughput, spam rate, pair rate), temporary service errors.
        4 | 80007 | 130429 | 131048 | 131056 | 131000 | 131016 | 133004 => {
            temporary_after(detail, retry)
        }
        // Expired or wrong access token, missing permission.
        190 | 10 | 200 => {
            SendError::permanent(Permanent::Rejected, format!("bad credentials: {detail}"))
        }
        // Template problems (parameter count, missing, paused, disabled…) and anything else.
        _ if status.as_u16() == 429 || status.is_server_error() => temporary_after(detail, retry),
        _ => SendError::permanent(Permanent::Rejected, detail),
    }
}

impl Provider for Meta {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        Channel::Whatsapp
    }

    fn accepts(&self, address: &Address) -> bool {
        matches!(address, Address::Phone(_))
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let Address::Phone(phone) = &message.address else {
                return Err(SendError::permanent(Permanent::InvalidAddress, "meta needs a phone number"));
            };
            let body = Meta::body(message, phone)?;
            let response = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .bearer_auth(self.access_token.expose_secret())
                .json(&body)
                .send()
                .await
                .map_err(|err| transport_error(&err))?;
            let (status, headers, body) = read_response(response).await?;
            let answer = body.json();
            if status.is_success() {
                let id = answer
                    .pointer("/messages/0/id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                return Ok(Accepted { provider_message_id: id });
            }
            let error = classify(status, &answer, &body.excerpt(), retry_after(&headers));
            tracing::debug!(provider = %self.name, %status, error = %error, "meta refused a message");
            Err(error)
        }
        .boxed()
    }
}
