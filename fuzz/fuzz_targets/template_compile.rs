//! Template saving: what UpsertTemplate runs before storing, `template::compile` (checks
//! every field, parses every Liquid string, renders each variant with the sample data).
//!
//! The input is either the wire bytes of a `Template`, or a `kind: Template` YAML document
//! like those of `examples/templates` (read leniently into the proto here, so that mutations
//! of the Liquid text reach the compiler). A bad template must come back as errors naming
//! their field, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use relance_delivery::domain::template;
use relance_proto::convert::json_to_struct;
use relance_proto::v1 as pb;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    if let Ok(draft) = pb::Template::decode(data) {
        check(&draft);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(root) = relance_kit::yaml::parse(text)
    {
        check(&template_from_json(&root.to_json()));
    }
});

fn check(draft: &pb::Template) {
    match template::compile(draft) {
        Ok(compiled) => {
            let variant = compiled.pick_variant(&draft.default_locale);
            assert!(variant < draft.variants.len());
            assert!(!compiled.channels(variant).is_empty());
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in &errors {
                assert!(
                    !error.field.is_empty(),
                    "an error names its field: {error:?}"
                );
                assert!(!error.reason.is_empty());
            }
        }
    }
}

fn object(value: Option<&Value>) -> Map<String, Value> {
    match value {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    }
}

fn text(object: &Map<String, Value>, key: &str) -> String {
    match object.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn texts(object: &Map<String, Value>, key: &str) -> Vec<String> {
    match object.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn string_map(object: &Map<String, Value>, key: &str) -> std::collections::HashMap<String, String> {
    let map = self::object(object.get(key));
    map.keys().map(|k| (k.clone(), text(&map, k))).collect()
}

fn duration(value: Option<&Value>) -> Option<prost_types::Duration> {
    let value = value?;
    let ms = value.as_i64().unwrap_or(-1);
    Some(prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// A `kind: Template` document (the layout of `examples/templates`) as the proto; what does
/// not fit is dropped or defaulted rather than refused, unlike the CLI's reader.
fn template_from_json(document: &Value) -> pb::Template {
    let root = object(Some(document));
    let products = root.get("products").map(|products| {
        let products = object(Some(products));
        pb::TemplateProducts {
            placement: pb::Placement::from_str_name(&format!(
                "PLACEMENT_{}",
                text(&products, "placement").to_ascii_uppercase()
            ))
            .map_or(0, |p| p as i32),
            n: products
                .get("n")
                .and_then(Value::as_u64)
                .map_or(0, |n| n as u32),
            context_path: text(&products, "context_path"),
            fallback: pb::ProductsFallback::from_str_name(&format!(
                "PRODUCTS_FALLBACK_{}",
                text(&products, "fallback").to_ascii_uppercase()
            ))
            .map_or(0, |f| f as i32),
            timeout: duration(products.get("timeout_ms")),
            ..Default::default()
        }
    });
    let variants = match root.get("variants") {
        Some(Value::Array(items)) => items.iter().map(variant_from_json).collect(),
        _ => Vec::new(),
    };
    pb::Template {
        name: text(&root, "name"),
        description: text(&root, "description"),
        default_locale: text(&root, "default_locale"),
        variants,
        products,
        sample_data: root.get("sample_data").map(json_to_struct),
        ..Default::default()
    }
}

fn variant_from_json(variant: &Value) -> pb::TemplateVariant {
    let variant = object(Some(variant));
    let mut content = pb::MessageContent::default();
    if let Some(push) = variant.get("push") {
        let push = object(Some(push));
        content.push = Some(pb::PushContent {
            title: text(&push, "title"),
            body: text(&push, "body"),
            image_url: text(&push, "image_url"),
            url: text(&push, "url"),
            data: string_map(&push, "data"),
            collapse_key: text(&push, "collapse_key"),
        });
    }
    if let Some(email) = variant.get("email") {
        let email = object(Some(email));
        content.email = Some(pb::EmailContent {
            subject: text(&email, "subject"),
            preheader: text(&email, "preheader"),
            html: text(&email, "html"),
            text: text(&email, "text"),
            from_name: text(&email, "from_name"),
            reply_to: text(&email, "reply_to"),
        });
    }
    if let Some(sms) = variant.get("sms") {
        content.sms = Some(pb::SmsContent {
            body: text(&object(Some(sms)), "body"),
        });
    }
    if let Some(whatsapp) = variant.get("whatsapp") {
        let whatsapp = object(Some(whatsapp));
        content.whatsapp = Some(pb::WhatsAppContent {
            template_name: text(&whatsapp, "template_name"),
            language: text(&whatsapp, "language"),
            header_image_url: text(&whatsapp, "header_image_url"),
            body_parameters: texts(&whatsapp, "body_parameters"),
            button_url_parameters: texts(&whatsapp, "button_url_parameters"),
        });
    }
    if let Some(in_app) = variant.get("in_app") {
        let in_app = object(Some(in_app));
        content.in_app = Some(pb::InAppContent {
            title: text(&in_app, "title"),
            body: text(&in_app, "body"),
            image_url: text(&in_app, "image_url"),
            url: text(&in_app, "url"),
            data: string_map(&in_app, "data"),
            expires_after: in_app
                .get("expires_after_seconds")
                .map(|s| prost_types::Duration {
                    seconds: s.as_i64().unwrap_or(-1),
                    nanos: 0,
                }),
        });
    }
    if let Some(webhook) = variant.get("webhook") {
        let webhook = object(Some(webhook));
        content.webhook = Some(pb::WebhookContent {
            body: text(&webhook, "body"),
            headers: string_map(&webhook, "headers"),
        });
    }
    let direction = match text(&variant, "direction").as_str() {
        "ltr" => pb::TextDirection::Ltr,
        "rtl" => pb::TextDirection::Rtl,
        _ => pb::TextDirection::Unspecified,
    };
    pb::TemplateVariant {
        locale: text(&variant, "locale"),
        direction: direction as i32,
        content: Some(content),
    }
}
