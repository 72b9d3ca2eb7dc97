//! The rules a send request must meet, whichever way it came (Send RPC or the bus), and the
//! retry schedule.

use std::time::Duration;

use relance_proto::v1::{Channel, MessageKind, SendRequest, customer_ref, send_request};

/// Longest idempotency key.
pub const MAX_KEY_CHARS: usize = 256;
/// Largest `data`, as JSON.
pub const MAX_DATA_BYTES: usize = 32 * 1024;
/// Default time to live.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest time to live.
pub const MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// A request field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a request; `from_bus` requests must say their kind (campaigns send marketing
/// messages; a request without a kind on the bus is a producer's bug, not a default).
pub fn validate(request: &SendRequest, from_bus: bool) -> Result<(), FieldError> {
    let key = &request.idempotency_key;
    if key.is_empty() || key.chars().count() > MAX_KEY_CHARS {
        return Err(refuse("idempotency_key", "must be 1 to 256 characters"));
    }
    match request.customer.as_ref().and_then(|c| c.id.as_ref()) {
        Some(customer_ref::Id::CustomerId(id)) if valid_id(id) => {}
        Some(customer_ref::Id::AnonymousId(id)) if valid_id(id) => {}
        Some(customer_ref::Id::CustomerId(_)) => {
            return Err(refuse(
                "customer.customer_id",
                "must be 1 to 128 characters",
            ));
        }
        Some(customer_ref::Id::AnonymousId(_)) => {
            return Err(refuse(
                "customer.anonymous_id",
                "must be 1 to 128 characters",
            ));
        }
        None => return Err(refuse("customer", "required: customer_id or anonymous_id")),
    }
    if request.channels.is_empty() || request.channels.len() > 6 {
        return Err(refuse("channels", "1 to 6 channels are required"));
    }
    let mut seen = Vec::with_capacity(request.channels.len());
    for (index, raw) in request.channels.iter().enumerate() {
        let channel = Channel::try_from(*raw).unwrap_or(Channel::Unspecified);
        if channel == Channel::Unspecified {
            return Err(refuse(&format!("channels[{index}]"), "not a channel"));
        }
        if seen.contains(&channel) {
            return Err(refuse(&format!("channels[{index}]"), "repeated"));
        }
        seen.push(channel);
    }
    match &request.content {
        Some(send_request::Content::Template(name)) => {
            if let Err(reason) = crate::domain::template::validate_name(name) {
                return Err(refuse("template", reason));
            }
        }
        Some(send_request::Content::Inline(_)) => {}
        None => return Err(refuse("content", "required: template or inline")),
    }
    if request.topic.is_empty() || request.topic.chars().count() > 64 {
        return Err(refuse("topic", "must be 1 to 64 characters"));
    }
    let kind = MessageKind::try_from(request.kind).unwrap_or(MessageKind::Unspecified);
    if from_bus && kind == MessageKind::Unspecified {
        return Err(refuse(
            "kind",
            "required on the bus: TRANSACTIONAL or MARKETING",
        ));
    }
    if let Some(data) = &request.data {
        let json = relance_proto::convert::struct_to_json(data);
        if serde_json::to_vec(&json)
            .map(|b| b.len())
            .unwrap_or(usize::MAX)
            > MAX_DATA_BYTES
        {
            return Err(refuse("data", "larger than 32 KiB as JSON"));
        }
    }
    if !request.locale.is_empty() && !valid_locale(&request.locale) {
        return Err(refuse(
            "locale",
            "not a BCP 47 locale such as fr, ar or fr-DZ",
        ));
    }
    if let Some(ttl) = &request.ttl {
        let seconds = ttl.seconds;
        if seconds < 1 || seconds as u64 > MAX_TTL.as_secs() {
            return Err(refuse("ttl", "must be between 1 second and 28 days"));
        }
    }
    Ok(())
}

/// A BCP 47 tag as shops use them: a 2–3 letter language, then optional subtags of 2–8
/// letters or digits (`fr`, `ar`, `fr-DZ`, `zh-Hant-TW`).
pub fn valid_locale(locale: &str) -> bool {
    let mut parts = locale.split(['-', '_']);
    let Some(language) = parts.next() else {
        return false;
    };
    if !(2..=3).contains(&language.len()) || !language.chars().all(|c| c.is_ascii_alphabetic()) {
        return false;
    }
    for part in parts {
        if !(2..=8).contains(&part.len()) || !part.chars().all(|c| c.is_ascii_alphanumeric()) {
            return false;
        }
    }
    true
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= 128
}

/// The request's kind, unset meaning transactional (the Send RPC's default).
pub fn kind_of(request: &SendRequest) -> MessageKind {
    match MessageKind::try_from(request.kind) {
        Ok(MessageKind::Marketing) => MessageKind::Marketing,
        _ => MessageKind::Transactional,
    }
}

/// The request's time to live.
pub fn ttl_of(request: &SendRequest) -> Duration {
    match &request.ttl {
        Some(ttl) if ttl.seconds > 0 => Duration::from_secs(ttl.seconds as u64).min(MAX_TTL),
        _ => DEFAULT_TTL,
    }
}

/// The requested channels, in order.
pub fn channels_of(request: &SendRequest) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(request.channels.len());
    for raw in &request.channels {
        if let Ok(channel) = Channel::try_from(*raw)
            && channel != Channel::Unspecified
        {
            channels.push(channel);
        }
    }
    channels
}

/// When to try again after failed attempt number `attempt` (1-based): exponential from
/// `base`, capped at `cap`, with "equal jitter" (half fixed, half drawn from `unit` in
/// [0, 1)) so that a provider outage does not bring every retry back in the same second.
pub fn retry_delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exponent).min(cap);
    let half = full / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relance_proto::v1::CustomerRef;

    fn request() -> SendRequest {
        SendRequest {
            idempotency_key: "order-1-confirmation".into(),
            customer: Some(CustomerRef {
                id: Some(customer_ref::Id::CustomerId("c1".into())),
            }),
            channels: vec![Channel::Email as i32],
            content: Some(send_request::Content::Template("order-confirmation".into())),
            topic: "order_updates".into(),
            ..SendRequest::default()
        }
    }

    #[test]
    fn a_good_request_passes_and_each_fault_names_its_field() {
        assert_eq!(validate(&request(), false), Ok(()));
        type Change = Box<dyn Fn(&mut SendRequest)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|r| r.idempotency_key.clear()), "idempotency_key"),
            (Box::new(|r| r.customer = None), "customer"),
            (Box::new(|r| r.channels.clear()), "channels"),
            (Box::new(|r| r.channels = vec![2, 2]), "channels[1]"),
            (Box::new(|r| r.channels = vec![2, 42]), "channels[1]"),
            (Box::new(|r| r.content = None), "content"),
            (
                Box::new(|r| r.content = Some(send_request::Content::Template("Bad Name".into()))),
                "template",
            ),
            (Box::new(|r| r.topic.clear()), "topic"),
            (Box::new(|r| r.locale = "not a locale!".into()), "locale"),
            (
                Box::new(|r| {
                    r.ttl = Some(prost_types::Duration {
                        seconds: 40 * 86400,
                        nanos: 0,
                    })
                }),
                "ttl",
            ),
        ];
        for (change, field) in cases {
            let mut r = request();
            change(&mut r);
            assert_eq!(
                validate(&r, false).map_err(|e| e.field),
                Err(field.to_owned())
            );
        }
        // On the bus the kind must be said.
        assert_eq!(
            validate(&request(), true).map_err(|e| e.field),
            Err("kind".into())
        );
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_and_a_cap() {
        let base = Duration::from_secs(5);
        let cap = Duration::from_secs(1800);
        assert_eq!(retry_delay(1, base, cap, 0.0), Duration::from_millis(2500));
        assert_eq!(retry_delay(1, base, cap, 1.0), Duration::from_secs(5));
        assert_eq!(retry_delay(3, base, cap, 0.0), Duration::from_secs(10));
        assert_eq!(retry_delay(30, base, cap, 1.0), cap);
        assert!(retry_delay(2, base, cap, 0.5) > retry_delay(2, base, cap, 0.1));
    }
}
