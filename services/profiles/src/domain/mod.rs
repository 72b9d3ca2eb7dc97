//! The profiles service's rules: what a valid profile change is, how purchases become
//! traits, how RFM scores are computed. Pure code, no I/O.

pub mod rfm;
pub mod traits;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A profile as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileRecord {
    #[serde(skip)]
    pub id: i64,
    pub customer_id: Option<String>,
    pub anonymous_ids: Vec<String>,
    pub attributes: serde_json::Value,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    pub push_tokens: Vec<PushToken>,
    pub consents: Vec<Consent>,
    pub traits: Traits,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A device's push token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushToken {
    pub token: String,
    /// `android`, `ios` or `web`.
    pub platform: String,
    pub app_id: String,
    pub updated_at: DateTime<Utc>,
}

/// One consent decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    /// `push`, `email`, `sms`, `whatsapp`, `in_app`, `webhook`.
    pub channel: String,
    /// '' for every topic of the channel.
    pub topic: String,
    /// `opted_in` or `opted_out`.
    pub status: String,
    pub decided_at: DateTime<Utc>,
    pub source: String,
}

/// Traits computed from purchases.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Traits {
    pub orders_count: i64,
    pub revenue: f64,
    pub refunded: f64,
    pub first_purchase_at: Option<DateTime<Utc>>,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub rfm: rfm::Scores,
    pub rfm_scored_at: Option<DateTime<Utc>>,
}

impl Traits {
    /// Revenue per order; 0 without orders.
    pub fn average_basket(&self) -> f64 {
        if self.orders_count > 0 {
            self.revenue / self.orders_count as f64
        } else {
            0.0
        }
    }
}

/// A field of a request that is not acceptable: `field` is its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Which profile a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerKey {
    Customer(String),
    Anonymous(String),
}

impl CustomerKey {
    /// Checks the id (1-128 characters, no control characters).
    pub fn checked(self, field: &str) -> Result<CustomerKey, Invalid> {
        let (id, sub) = match &self {
            CustomerKey::Customer(id) => (id, "customer_id"),
            CustomerKey::Anonymous(id) => (id, "anonymous_id"),
        };
        check_id(&format!("{field}.{sub}"), id)?;
        Ok(self)
    }
}

/// A customer or anonymous id: 1-128 characters, no control characters or edge spaces.
pub fn check_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(invalid(field, "required"));
    }
    if id.len() > 128 {
        return Err(invalid(field, "longer than 128 characters"));
    }
    if id.chars().any(char::is_control) || id.trim() != id {
        return Err(invalid(
            field,
            "contains control characters or leading/trailing spaces",
        ));
    }
    Ok(())
}

/// A partial update of a profile (see `UpsertProfileRequest` for the merge rules).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfilePatch {
    /// Keys to set.
    pub set_attributes: serde_json::Map<String, serde_json::Value>,
    /// Keys to remove (sent as null).
    pub remove_attributes: Vec<String>,
    /// `Some("")` clears.
    pub email: Option<String>,
    pub phone: Option<String>,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    pub push_tokens: Vec<(String, String, String)>,
    pub remove_push_tokens: Vec<String>,
}

/// Limits on attributes.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

impl ProfilePatch {
    /// Builds and checks a patch from the request's parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        attributes: serde_json::Value,
        email: Option<String>,
        phone: Option<String>,
        timezone: Option<String>,
        locale: Option<String>,
        push_tokens: Vec<(String, String, String)>,
        remove_push_tokens: Vec<String>,
    ) -> Result<ProfilePatch, Invalid> {
        let mut patch = ProfilePatch::default();
        match attributes {
            serde_json::Value::Null => {}
            serde_json::Value::Object(map) => {
                if serde_json::Value::Object(map.clone()).to_string().len() > MAX_ATTRIBUTES_BYTES {
                    return Err(invalid(
                        "attributes",
                        format!("more than {MAX_ATTRIBUTES_BYTES} bytes as JSON"),
                    ));
                }
                for (key, value) in map {
                    if key.is_empty() || key.len() > 64 {
                        return Err(invalid(
                            format!("attributes.{key}"),
                            "keys must have 1-64 characters",
                        ));
                    }
                    if value.is_null() {
                        patch.remove_attributes.push(key);
                    } else {
                        patch.set_attributes.insert(key, value);
                    }
                }
            }
            _ => return Err(invalid("attributes", "must be an object")),
        }
        if let Some(email) = &email
            && !email.is_empty()
            && !is_email(email)
        {
            return Err(invalid(
                "email",
                format!("{email:?} is not an e-mail address"),
            ));
        }
        if let Some(phone) = &phone
            && !phone.is_empty()
            && !is_e164(phone)
        {
            return Err(invalid(
                "phone",
                format!("{phone:?} is not in E.164 form (+ and 8-15 digits)"),
            ));
        }
        if let Some(timezone) = &timezone
            && !timezone.is_empty()
            && timezone.parse::<chrono_tz::Tz>().is_err()
        {
            return Err(invalid(
                "timezone",
                format!("{timezone:?} is not an IANA timezone (e.g. Africa/Algiers)"),
            ));
        }
        if let Some(locale) = &locale
            && !locale.is_empty()
            && !is_locale(locale)
        {
            return Err(invalid(
                "locale",
                format!("{locale:?} is not a BCP 47 locale (e.g. fr-DZ)"),
            ));
        }
        for (index, (token, platform, _)) in push_tokens.iter().enumerate() {
            if token.is_empty() || token.len() > 4096 {
                return Err(invalid(
                    format!("push_tokens[{index}].token"),
                    "must have 1-4096 characters",
                ));
            }
            if !matches!(platform.as_str(), "android" | "ios" | "web") {
                return Err(invalid(
                    format!("push_tokens[{index}].platform"),
                    "required (android, ios or web)",
                ));
            }
        }
        patch.email = email;
        patch.phone = phone;
        patch.timezone = timezone;
        patch.locale = locale;
        patch.push_tokens = push_tokens;
        patch.remove_push_tokens = remove_push_tokens;
        Ok(patch)
    }

    /// The parts of the profile this patch changes, for `profile.updated`.
    pub fn changed_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if !self.set_attributes.is_empty() || !self.remove_attributes.is_empty() {
            parts.push("attributes".to_owned());
        }
        if self.email.is_some()
            || self.phone.is_some()
            || !self.push_tokens.is_empty()
            || !self.remove_push_tokens.is_empty()
        {
            parts.push("addresses".to_owned());
        }
        if self.timezone.is_some() {
            parts.push("timezone".to_owned());
        }
        if self.locale.is_some() {
            parts.push("locale".to_owned());
        }
        parts
    }
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && s.len() <= 254
        && !s.contains(char::is_whitespace)
}

fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0')
}

fn is_locale(s: &str) -> bool {
    let mut parts = s.split(['-', '_']);
    let Some(language) = parts.next() else {
        return false;
    };
    (2..=3).contains(&language.len())
        && language.chars().all(|c| c.is_ascii_alphabetic())
        && parts.all(|p| (2..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// The channels consent is recorded for.
pub const CHANNELS: &[&str] = &["push", "email", "sms", "whatsapp", "in_app", "webhook"];

/// A consent decision to record, checked.
pub fn check_consent(
    channel: &str,
    topic: &str,
    status: &str,
    source: &str,
) -> Result<(), Invalid> {
    if !CHANNELS.contains(&channel) {
        return Err(invalid(
            "consent.channel",
            "required (push, email, sms, whatsapp, in_app or webhook)",
        ));
    }
    if topic.len() > 64
        || topic
            .chars()
            .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'))
    {
        return Err(invalid("consent.topic", "at most 64 of a-z 0-9 _ -"));
    }
    if !matches!(status, "opted_in" | "opted_out") {
        return Err(invalid(
            "consent.status",
            "required (opted_in or opted_out)",
        ));
    }
    if source.is_empty() || source.len() > 128 {
        return Err(invalid(
            "consent.source",
            "required: where the decision came from (1-128 characters)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(attributes: serde_json::Value) -> Result<ProfilePatch, Invalid> {
        ProfilePatch::new(attributes, None, None, None, None, vec![], vec![])
    }

    #[test]
    fn null_attributes_are_removals() {
        let p = patch(serde_json::json!({"city": "Oran", "gender": null})).expect("valid");
        assert_eq!(
            p.set_attributes.get("city"),
            Some(&serde_json::json!("Oran"))
        );
        assert_eq!(p.remove_attributes, vec!["gender".to_owned()]);
        assert_eq!(p.changed_parts(), vec!["attributes".to_owned()]);
    }

    #[test]
    fn addresses_timezone_and_locale_are_checked() {
        let bad =
            |email: Option<&str>, phone: Option<&str>, tz: Option<&str>, locale: Option<&str>| {
                ProfilePatch::new(
                    serde_json::Value::Null,
                    email.map(Into::into),
                    phone.map(Into::into),
                    tz.map(Into::into),
                    locale.map(Into::into),
                    vec![],
                    vec![],
                )
                .expect_err("invalid")
                .field
            };
        assert_eq!(bad(Some("nope"), None, None, None), "email");
        assert_eq!(bad(None, Some("0550123456"), None, None), "phone");
        assert_eq!(bad(None, None, Some("Mars/Olympus"), None), "timezone");
        assert_eq!(bad(None, None, None, Some("french!")), "locale");
        let ok = ProfilePatch::new(
            serde_json::Value::Null,
            Some("amina@example.dz".into()),
            Some("+213550123456".into()),
            Some("Africa/Algiers".into()),
            Some("ar-DZ".into()),
            vec![],
            vec![],
        );
        assert!(ok.is_ok());
        // An empty string clears, so it is valid.
        assert!(
            ProfilePatch::new(
                serde_json::Value::Null,
                Some(String::new()),
                None,
                None,
                None,
                vec![],
                vec![]
            )
            .is_ok()
        );
    }

    #[test]
    fn push_tokens_need_a_platform() {
        let error = ProfilePatch::new(
            serde_json::Value::Null,
            None,
            None,
            None,
            None,
            vec![("tok".into(), "".into(), "".into())],
            vec![],
        )
        .expect_err("no platform");
        assert_eq!(error.field, "push_tokens[0].platform");
    }

    #[test]
    fn consent_needs_channel_status_and_source() {
        assert!(check_consent("push", "marketing", "opted_in", "signup_form").is_ok());
        assert_eq!(
            check_consent("fax", "", "opted_in", "x")
                .expect_err("channel")
                .field,
            "consent.channel"
        );
        assert_eq!(
            check_consent("sms", "", "maybe", "x")
                .expect_err("status")
                .field,
            "consent.status"
        );
        assert_eq!(
            check_consent("sms", "", "opted_out", "")
                .expect_err("source")
                .field,
            "consent.source"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(
            CustomerKey::Customer("17850".into())
                .checked("customer")
                .is_ok()
        );
        let error = CustomerKey::Anonymous(String::new())
            .checked("customer")
            .expect_err("empty");
        assert_eq!(error.field, "customer.anonymous_id");
    }
}

/// Why a profile operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A request field is not acceptable.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No such profile in the workspace.
    #[error("no profile for {0}")]
    NotFound(String),
    /// The anonymous id already belongs to another known customer.
    #[error("anonymous_id: {anonymous_id:?} already belongs to customer {owner:?}")]
    MergedElsewhere { anonymous_id: String, owner: String },
    /// Postgres failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<ProfileError> for relance_kit::ApiError {
    fn from(error: ProfileError) -> relance_kit::ApiError {
        use relance_kit::ApiError;
        match error {
            ProfileError::Invalid(Invalid { field, reason }) => {
                ApiError::InvalidArgument { field, reason }
            }
            ProfileError::NotFound(what) => ApiError::NotFound(format!("no profile for {what}")),
            error @ ProfileError::MergedElsewhere { .. } => {
                ApiError::FailedPrecondition(error.to_string())
            }
            ProfileError::Database(error) => ApiError::from(error),
        }
    }
}

impl std::fmt::Display for CustomerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CustomerKey::Customer(id) => write!(f, "customer_id {id:?}"),
            CustomerKey::Anonymous(id) => write!(f, "anonymous_id {id:?}"),
        }
    }
}
