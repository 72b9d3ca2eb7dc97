//! Twilio Programmable Messaging: SMS.
//!
//! `POST {base}/2010-04-01/Accounts/{sid}/Messages.json`, HTTP basic auth with the account
//! SID and auth token, a form-encoded body (`To`, `Body`, and `From` or
//! `MessagingServiceSid`).

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use relance_proto::v1::Channel;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::config::{Fields, ProviderConfig};
use super::{
    Accepted, Address, Content, Outbound, Permanent, Provider, SendError, read_response,
    retry_after, temporary_after, transport_error,
};

/// One Twilio account and sender.
pub struct Twilio {
    name: String,
    http: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: SecretString,
    /// `From` (a number) or `MessagingServiceSid` (an `MG…` SID, which picks the number).
    sender: (&'static str, String),
    timeout: Duration,
}

impl Twilio {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
        http: &reqwest::Client,
    ) -> anyhow::Result<Twilio> {
        let base = fields.base_url()?;
        let account_sid = fields
            .required("account_sid", &config.account_sid)?
            .to_owned();
        if !account_sid.starts_with("AC")
            || !account_sid[2..].chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(fields.error("account_sid", "a Twilio account SID starts with AC"));
        }
        let auth_token = fields
            .required_secret("auth_token", &config.auth_token)?
            .clone();
        let from = fields.required("from", &config.from)?.to_owned();
        let sender = if from.starts_with("MG") {
            ("MessagingServiceSid", from)
        } else if from.starts_with('+')
            && from.len() > 4
            && from[1..].chars().all(|c| c.is_ascii_digit())
        {
            ("From", from)
        } else if !from.is_empty()
            && from.len() <= 11
            && from.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ')
        {
            // An alphanumeric sender id, allowed in some countries.
            ("From", from)
        } else {
            return Err(fields.error(
                "from",
                "an E.164 number (+…), an alphanumeric sender id or a messaging service SID (MG…)",
            ));
        };
        Ok(Twilio {
            name: config.name.trim().to_owned(),
            http: http.clone(),
            url: format!("{base}/2010-04-01/Accounts/{account_sid}/Messages.json"),
            account_sid,
            auth_token,
            sender,
            timeout: config.timeout(),
        })
    }
}

/// Classifies an error answer from Twilio's JSON error `code`.
pub(crate) fn classify(
    status: reqwest::StatusCode,
    body: &Value,
    text: &str,
    retry: Option<Duration>,
) -> SendError {
    let code = body.get("code").and_then(Value::as_u64).unwrap_or(0);
    let message = body.get("message").and_then(Value::as_str).unwrap_or(text);
    let detail = format!("{} {code}: {message}", status.as_u16());
    if status.as_u16() == 429 || status.is_server_error() {
        return temporary_after(detail, retry);
    }
    match code {
        // Invalid 'To' number, not a mobile number, not reachable by SMS.
        21211 | 21614 | 21217 | 21612 => SendError::permanent(Permanent::InvalidAddress, detail),
        // The recipient replied STOP.
        21610 => SendError::permanent(Permanent::Unsubscribed, detail),
        20003 => SendError::permanent(Permanent::Rejected, format!("bad credentials: {detail}")),
        _ => SendError::permanent(Permanent::Rejected, detail),
    }
}

impl Provider for Twilio {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn accepts(&self, address: &Address) -> bool {
        matches!(address, Address::Phone(_))
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let Address::Phone(to) = &message.address else {
                return Err(SendError::permanent(Permanent::InvalidAddress, "twilio needs a phone number"));
            };
            let Content::Sms(sms) = &message.content else {
                return Err(SendError::permanent(Permanent::Rejected, "twilio sends sms content only"));
            };
            let form = [
                ("To", to.as_str()),
                (self.sender.0, self.sender.1.as_str()),
                ("Body", sms.body.as_str()),
            ];
            let response = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
                .form(&form)
                .send()
                .await
                .map_err(|err| transport_error(&err))?;
            let (status, headers, body) = read_response(response).await?;
            let answer = body.json();
            if status.is_success() {
                let id = answer.get("sid").and_then(Value::as_str).map(str::to_owned);
                return Ok(Accepted { provider_message_id: id });
            }
            let error = classify(status, &answer, &body.excerpt(), retry_after(&headers));
            tracing::debug!(provider = %self.name, %status, error = %error, "twilio refused a message");
            Err(error)
        }
        .boxed()
    }
}
