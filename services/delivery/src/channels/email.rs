//! E-mail through an SMTP server (the shop's relay or an ESP's SMTP endpoint), with a pool of
//! connections kept open between messages.
//!
//! Each message is `multipart/alternative` (plain text, then HTML), with `Message-ID:
//! <{message id}@relance>` so a resend after a crash can be recognised, and the one-click
//! unsubscribe headers of RFC 8058 that Gmail and Yahoo require of bulk senders.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Address as MailAddress, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use relance_proto::v1::Channel;
use secrecy::ExposeSecret;

use super::config::{Fields, ProviderConfig, SmtpTls};
use super::{Accepted, Address, Content, Outbound, Permanent, Provider, SendError};

/// One SMTP server and sender.
pub struct Smtp {
    name: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from_address: MailAddress,
    from_name: Option<String>,
}

impl Smtp {
    pub(crate) fn from_config(
        fields: &Fields<'_>,
        config: &ProviderConfig,
    ) -> anyhow::Result<Smtp> {
        let host = fields.required("host", &config.host)?.to_owned();
        let tls_mode = config.tls.unwrap_or_default();
        let port = match (config.port, tls_mode) {
            (Some(0), _) => return Err(fields.error("port", "must be 1 to 65535")),
            (Some(port), _) => port,
            (None, SmtpTls::None) => 25,
            (None, SmtpTls::Starttls) => 587,
            (None, SmtpTls::Tls) => 465,
        };
        let from_address: MailAddress = fields
            .required("from_address", &config.from_address)?
            .parse()
            .map_err(|err| {
                fields.error(
                    "from_address",
                    format_args!("not an e-mail address ({err})"),
                )
            })?;
        let tls = match tls_mode {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls | SmtpTls::Tls => {
                let parameters = TlsParameters::new(host.clone()).map_err(|err| {
                    fields.error("host", format_args!("cannot set up TLS ({err})"))
                })?;
                if tls_mode == SmtpTls::Tls {
                    Tls::Wrapper(parameters)
                } else {
                    Tls::Required(parameters)
                }
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(config.timeout()))
            .pool_config(
                PoolConfig::new()
                    .max_size(config.max_in_flight() as u32)
                    .idle_timeout(Duration::from_secs(60)),
            );
        match (&config.username, &config.password) {
            (Some(username), Some(password)) => {
                builder = builder.credentials(Credentials::new(
                    username.clone(),
                    password.expose_secret().to_owned(),
                ));
            }
            (Some(_), None) => return Err(fields.error("password", "required with username")),
            (None, Some(_)) => return Err(fields.error("username", "required with password")),
            (None, None) => {}
        }
        let from_name = config
            .from_name
            .as_deref()
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
        Ok(Smtp {
            name: config.name.trim().to_owned(),
            transport: builder.build(),
            from_address,
            from_name,
        })
    }

    /// Builds the RFC 5322 message.
    pub(crate) fn message(&self, outbound: &Outbound, to: &str) -> Result<Message, SendError> {
        let Content::Email(email) = &outbound.content else {
            return Err(SendError::permanent(
                Permanent::Rejected,
                "smtp sends email content only",
            ));
        };
        let to: MailAddress = to.trim().parse().map_err(|err| {
            SendError::permanent(
                Permanent::InvalidAddress,
                format!("not an e-mail address: {err}"),
            )
        })?;
        let name = if email.from_name.trim().is_empty() {
            self.from_name.clone()
        } else {
            Some(email.from_name.trim().to_owned())
        };
        let mut builder = Message::builder()
            .from(Mailbox::new(name, self.from_address.clone()))
            .to(Mailbox::new(None, to))
            .subject(email.subject.clone())
            .message_id(Some(format!(
                "<{}@relance>",
                outbound.message_id.hyphenated()
            )))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-Relance-Message-Id"),
                outbound.message_id.hyphenated().to_string(),
            ));
        if !email.reply_to.trim().is_empty() {
            let reply_to: Mailbox = email.reply_to.trim().parse().map_err(|err| {
                SendError::permanent(
                    Permanent::Rejected,
                    format!("reply_to is not an e-mail address: {err}"),
                )
            })?;
            builder = builder.reply_to(reply_to);
        }
        if let Some(url) = outbound
            .unsubscribe_url
            .as_deref()
            .filter(|url| !url.is_empty())
        {
            builder = builder
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe"),
                    format!("<{url}>"),
                ))
                .raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                    "List-Unsubscribe=One-Click".to_owned(),
                ));
        }
        let text = if email.text.is_empty() {
            text_of_html(&email.html)
        } else {
            email.text.clone()
        };
        builder
            .multipart(MultiPart::alternative_plain_html(text, email.html.clone()))
            .map_err(|err| {
                SendError::permanent(
                    Permanent::Rejected,
                    format!("cannot build the message: {err}"),
                )
            })
    }
}

/// A crude plain-text version of an HTML body, for content that has none: tags dropped, the
/// common entities decoded, blank runs collapsed. The renderer normally provides a better one.
fn text_of_html(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let decoded = text
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    let mut lines = Vec::new();
    for line in decoded.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.is_empty() {
            lines.push(words.join(" "));
        }
    }
    lines.join("\n")
}

/// Classifies an SMTP failure.
fn classify(err: &lettre::transport::smtp::Error) -> SendError {
    let code = err.status().map(u16::from);
    let detail = match code {
        Some(code) => format!("smtp {code}: {err}"),
        None => format!("smtp: {err}"),
    };
    if err.is_permanent() {
        return match code {
            // Mailbox unavailable, user not local, mailbox name not allowed.
            Some(550 | 551 | 553) => SendError::permanent(Permanent::InvalidAddress, detail),
            _ => SendError::permanent(Permanent::Rejected, detail),
        };
    }
    // 4xx, connection, TLS and timeout errors: try again later.
    SendError::temporary(detail)
}

impl Provider for Smtp {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn accepts(&self, address: &Address) -> bool {
        matches!(address, Address::Email(_))
    }

    fn send<'a>(&'a self, message: &'a Outbound) -> BoxFuture<'a, Result<Accepted, SendError>> {
        async move {
            let Address::Email(to) = &message.address else {
                return Err(SendError::permanent(Permanent::InvalidAddress, "smtp needs an e-mail address"));
            };
            let email = self.message(message, to)?;
            match self.transport.send(email).await {
                Ok(response) => {
                    // Servers often answer `250 2.0.0 Ok: queued as <id>`: keep the line.
                    let id = response.message().collect::<Vec<_>>().join(" ");
                    let id = if id.is_empty() { None } else { Some(super::truncate(id)) };
                    Ok(Accepted { provider_message_id: id })
                }
                Err(err) => {
                    let error = classify(&err);
                    tracing::debug!(provider = %self.name, error = %error, "smtp refused a message");
                    Err(error)
                }
            }
        }
        .boxed()
    }
}
