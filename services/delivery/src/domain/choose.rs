//! Before sending: which channel, to which address, and whether the customer's consent
//! allows it.
//!
//! Consent rules: a marketing message needs an opt-in for the channel and the topic (or for
//! the whole channel); a transactional message goes out unless the customer opted out of
//! its topic (or the whole channel). The most specific decision wins: a topic's decision
//! overrides the channel's. In-app and webhook messages need no opt-in (the customer is in
//! the shop's own app, the webhook is the shop's own system) but an explicit opt-out still
//! stops them.

use relance_proto::v1::{Channel, ConsentStatus, MessageKind, MessageReason, PushPlatform};

use crate::channels::Address;

/// What delivery knows of the recipient, taken from their profile.
#[derive(Debug, Clone, Default)]
pub struct Recipient {
    pub email: String,
    pub phone: String,
    /// Push tokens, most recently registered first.
    pub push_tokens: Vec<(String, PushPlatform, String)>,
    /// (channel, topic, status) decisions; topic "" covers the whole channel.
    pub consents: Vec<(Channel, String, ConsentStatus)>,
    /// The channel the customer prefers (profile attribute `preferred_channel`).
    pub preferred: Option<Channel>,
    /// A known customer (in-app inboxes need an id; anonymous visitors have one too).
    pub has_id: bool,
}

/// The decision for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Send on this channel to this address.
    Send(Channel, Address),
    /// Do not send, for this reason.
    Skip(MessageReason),
}

/// Whether the recipient's consent allows `kind` on `channel` for `topic`.
pub fn consent_allows(
    recipient: &Recipient,
    channel: Channel,
    topic: &str,
    kind: MessageKind,
) -> bool {
    let mut channel_wide = ConsentStatus::Unspecified;
    let mut for_topic = ConsentStatus::Unspecified;
    for (consent_channel, consent_topic, status) in &recipient.consents {
        if *consent_channel != channel {
            continue;
        }
        if consent_topic.is_empty() {
            channel_wide = *status;
        } else if consent_topic == topic {
            for_topic = *status;
        }
    }
    let decision = if for_topic != ConsentStatus::Unspecified {
        for_topic
    } else {
        channel_wide
    };
    if decision == ConsentStatus::OptedOut {
        return false;
    }
    let needs_opt_in =
        kind == MessageKind::Marketing && !matches!(channel, Channel::InApp | Channel::Webhook);
    !needs_opt_in || decision == ConsentStatus::OptedIn
}

/// The recipient's address on `channel`, if they have one that a configured provider can
/// reach (`reachable` says which push platforms are served).
pub fn address_for(
    recipient: &Recipient,
    channel: Channel,
    reachable: impl Fn(&Address) -> bool,
) -> Option<Address> {
    match channel {
        Channel::Push => {
            for (token, platform, app_id) in &recipient.push_tokens {
                let address = Address::Push {
                    token: token.clone(),
                    platform: *platform,
                    app_id: app_id.clone(),
                };
                if reachable(&address) {
                    return Some(address);
                }
            }
            None
        }
        Channel::Email if !recipient.email.is_empty() => {
            Some(Address::Email(recipient.email.clone()))
        }
        Channel::Sms | Channel::Whatsapp if !recipient.phone.is_empty() => {
            Some(Address::Phone(recipient.phone.clone()))
        }
        Channel::InApp if recipient.has_id => Some(Address::Inbox),
        Channel::Webhook => Some(Address::Webhook),
        _ => None,
    }
}

/// Picks the channel: the customer's preferred one among `requested` if it has content,
/// consent, an address and a provider; otherwise the first of `requested` that has all four.
/// When none does, the reason names the first obstacle met in this order of importance:
/// consent, then address, then configuration, then content.
pub fn choose(
    recipient: &Recipient,
    requested: &[Channel],
    kind: MessageKind,
    topic: &str,
    has_content: impl Fn(Channel) -> bool,
    configured: impl Fn(Channel) -> bool,
    reachable: impl Fn(&Address) -> bool,
) -> Choice {
    let mut order: Vec<Channel> = Vec::with_capacity(requested.len());
    if let Some(preferred) = recipient.preferred
        && requested.contains(&preferred)
    {
        order.push(preferred);
    }
    for channel in requested {
        if !order.contains(channel) {
            order.push(*channel);
        }
    }
    let mut no_consent = false;
    let mut no_address = false;
    let mut not_configured = false;
    for channel in order {
        if !has_content(channel) {
            continue;
        }
        if !consent_allows(recipient, channel, topic, kind) {
            no_consent = true;
            continue;
        }
        if !configured(channel) {
            not_configured = true;
            continue;
        }
        match address_for(recipient, channel, &reachable) {
            Some(address) => return Choice::Send(channel, address),
            None => no_address = true,
        }
    }
    let reason = if no_consent {
        MessageReason::NoConsent
    } else if no_address {
        MessageReason::NoAddress
    } else if not_configured {
        MessageReason::ChannelNotConfigured
    } else {
        MessageReason::TemplateError
    };
    Choice::Skip(reason)
}

/// The address as shown in the ledger and to support staff: enough to recognise, not to use.
pub fn mask(address: &Address) -> String {
    match address {
        Address::Email(email) => match email.split_once('@') {
            Some((local, domain)) => {
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            None => "***".to_owned(),
        },
        Address::Phone(phone) => {
            let chars: Vec<char> = phone.chars().collect();
            if chars.len() <= 7 {
                return "*".repeat(chars.len());
            }
            let head: String = chars[..5].iter().collect();
            let tail: String = chars[chars.len() - 2..].iter().collect();
            format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
        }
        Address::Push { token, .. } => {
            let chars: Vec<char> = token.chars().collect();
            let tail: String = chars[chars.len().saturating_sub(6)..].iter().collect();
            format!("…{tail}")
        }
        Address::Inbox => "inbox".to_owned(),
        Address::Webhook => "webhook".to_owned(),
    }
}

/// Whether any variant of a template has content for `channel`.
pub fn template_has_channel(template: &relance_proto::v1::Template, channel: i32) -> bool {
    for variant in &template.variants {
        if let Some(content) = &variant.content
            && content_has_channel(content, channel)
        {
            return true;
        }
    }
    false
}

/// Whether `content` has a part for `channel`.
pub fn content_has_channel(content: &relance_proto::v1::MessageContent, channel: i32) -> bool {
    match Channel::try_from(channel) {
        Ok(Channel::Push) => content.push.is_some(),
        Ok(Channel::Email) => content.email.is_some(),
        Ok(Channel::Sms) => content.sms.is_some(),
        Ok(Channel::Whatsapp) => content.whatsapp.is_some(),
        Ok(Channel::InApp) => content.in_app.is_some(),
        Ok(Channel::Webhook) => content.webhook.is_some(),
        _ => false,
    }
}

/// A channel's name as written in configuration, YAML and events.
pub use crate::channels::channel_name;

/// Parses a channel's name (`push`, `email`, `sms`, `whatsapp`, `in_app`, `webhook`).
pub fn parse_channel(name: &str) -> Option<Channel> {
    match name {
        "push" => Some(Channel::Push),
        "email" => Some(Channel::Email),
        "sms" => Some(Channel::Sms),
        "whatsapp" => Some(Channel::Whatsapp),
        "in_app" | "inapp" => Some(Channel::InApp),
        "webhook" => Some(Channel::Webhook),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient() -> Recipient {
        Recipient {
            email: "amina@example.com".into(),
            phone: "+213555123412".into(),
            push_tokens: vec![("tok-ios-123456".into(), PushPlatform::Ios, String::new())],
            consents: vec![],
            preferred: None,
            has_id: true,
        }
    }

    fn everything(_: Channel) -> bool {
        true
    }

    fn any(_: &Address) -> bool {
        true
    }

    #[test]
    fn marketing_needs_an_opt_in_transactional_only_no_opt_out() {
        let mut r = recipient();
        assert!(!consent_allows(
            &r,
            Channel::Email,
            "marketing",
            MessageKind::Marketing
        ));
        assert!(consent_allows(
            &r,
            Channel::Email,
            "order_updates",
            MessageKind::Transactional
        ));
        r.consents
            .push((Channel::Email, String::new(), ConsentStatus::OptedIn));
        assert!(consent_allows(
            &r,
            Channel::Email,
            "marketing",
            MessageKind::Marketing
        ));
        // The topic's decision overrides the channel's.
        r.consents
            .push((Channel::Email, "marketing".into(), ConsentStatus::OptedOut));
        assert!(!consent_allows(
            &r,
            Channel::Email,
            "marketing",
            MessageKind::Marketing
        ));
        assert!(consent_allows(
            &r,
            Channel::Email,
            "newsletter",
            MessageKind::Marketing
        ));
        r.consents.push((
            Channel::Email,
            "order_updates".into(),
            ConsentStatus::OptedOut,
        ));
        assert!(!consent_allows(
            &r,
            Channel::Email,
            "order_updates",
            MessageKind::Transactional
        ));
        // In-app needs no opt-in, but an opt-out stops it.
        assert!(consent_allows(
            &r,
            Channel::InApp,
            "marketing",
            MessageKind::Marketing
        ));
        r.consents
            .push((Channel::InApp, String::new(), ConsentStatus::OptedOut));
        assert!(!consent_allows(
            &r,
            Channel::InApp,
            "marketing",
            MessageKind::Marketing
        ));
    }

    #[test]
    fn the_preferred_channel_wins_then_the_order_given() {
        let mut r = recipient();
        r.consents
            .push((Channel::Push, String::new(), ConsentStatus::OptedIn));
        r.consents
            .push((Channel::Whatsapp, String::new(), ConsentStatus::OptedIn));
        let requested = [Channel::Push, Channel::Whatsapp];
        let pick = |r: &Recipient| {
            choose(
                r,
                &requested,
                MessageKind::Marketing,
                "marketing",
                everything,
                everything,
                any,
            )
        };
        assert!(matches!(pick(&r), Choice::Send(Channel::Push, _)));
        r.preferred = Some(Channel::Whatsapp);
        assert_eq!(
            pick(&r),
            Choice::Send(Channel::Whatsapp, Address::Phone("+213555123412".into()))
        );
        // A preferred channel the request does not list is ignored.
        r.preferred = Some(Channel::Email);
        assert!(matches!(pick(&r), Choice::Send(Channel::Push, _)));
    }

    #[test]
    fn skips_name_the_obstacle() {
        let mut r = recipient();
        let requested = [Channel::Push, Channel::Email];
        let skip = |r: &Recipient, kind| {
            choose(
                r,
                &requested,
                kind,
                "marketing",
                everything,
                everything,
                any,
            )
        };
        assert_eq!(
            skip(&r, MessageKind::Marketing),
            Choice::Skip(MessageReason::NoConsent)
        );
        r.push_tokens.clear();
        r.email.clear();
        assert_eq!(
            skip(&r, MessageKind::Transactional),
            Choice::Skip(MessageReason::NoAddress)
        );
        let none = |_: Channel| false;
        assert_eq!(
            choose(
                &r,
                &requested,
                MessageKind::Transactional,
                "t",
                everything,
                none,
                any
            ),
            Choice::Skip(MessageReason::ChannelNotConfigured)
        );
        // A token no configured provider serves is no address.
        let mut r = recipient();
        r.consents
            .push((Channel::Push, String::new(), ConsentStatus::OptedIn));
        let android_only = |a: &Address| matches!(a, Address::Push { platform, .. } if *platform == PushPlatform::Android);
        assert_eq!(
            choose(
                &r,
                &[Channel::Push],
                MessageKind::Marketing,
                "m",
                everything,
                everything,
                android_only
            ),
            Choice::Skip(MessageReason::NoAddress)
        );
    }

    #[test]
    fn masks_keep_enough_to_recognise() {
        assert_eq!(
            mask(&Address::Email("amina@example.com".into())),
            "a***@example.com"
        );
        assert_eq!(
            mask(&Address::Phone("+213555123412".into())),
            "+2135******12"
        );
        let push = Address::Push {
            token: "abcdefghijkl".into(),
            platform: PushPlatform::Android,
            app_id: String::new(),
        };
        assert_eq!(mask(&push), "…ghijkl");
    }
}
