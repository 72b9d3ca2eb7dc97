//! The message templates of the example flows (`examples/templates/*.yaml`), read into
//! `relance.v1.Template` for Delivery.UpsertTemplate.
//!
//! One YAML document per template (`---` between them), with the fields of the proto in
//! snake_case; each variant is one locale and holds the content of the channels it can go
//! out on:
//!
//! ```yaml
//! kind: Template
//! name: cart-3
//! description: A last reminder of the cart, with similar products.
//! default_locale: en
//! products: { placement: cart, n: 3, context_path: "trigger.items[].product_id" }
//! sample_data: { customer: { attributes: { first_name: Amina } } }
//! variants:
//!   - locale: en
//!     push: { title: "…", body: "…", url: "https://shop.example/cart" }
//!     email: { subject: "…", html: "…" }
//! ```
//!
//! Unknown keys are refused, so a misspelt field does not silently vanish.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use relance_proto::convert::json_to_struct;
use relance_proto::v1 as pb;
use serde_json::{Map, Value};

/// A template read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct TemplateDocument {
    /// `examples/templates/cart.yaml (document 2)`.
    pub origin: String,
    pub template: pb::Template,
}

/// Every template of the `.yaml`/`.yml` files of `dir`, in file then document order.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<TemplateDocument>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut templates = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, yaml) in relance_kit::yaml::split_documents(&text)
            .into_iter()
            .enumerate()
        {
            let origin = if i == 0 {
                file.display().to_string()
            } else {
                format!("{} (document {})", file.display(), i + 1)
            };
            let root = relance_kit::yaml::parse(&yaml)
                .map_err(|p| anyhow::anyhow!("{origin}: {}", relance_kit::yaml::describe(&[p])))?;
            let template =
                from_json(&root.to_json()).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            templates.push(TemplateDocument { origin, template });
        }
    }
    Ok(templates)
}

/// Checks that `object` holds only `allowed` keys; `path` names it in the error.
fn only(object: &Map<String, Value>, allowed: &[&str], path: &str) -> Result<(), String> {
    for key in object.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "{path}{key}: unknown field (expected one of {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{path}: must be a mapping"))
}

fn text(object: &Map<String, Value>, key: &str, path: &str) -> Result<String, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(_) => Err(format!("{path}{key}: must be text")),
    }
}

fn texts(object: &Map<String, Value>, key: &str, path: &str) -> Result<Vec<String>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(format!("{path}{key}[{i}]: must be text")),
            })
            .collect(),
        Some(_) => Err(format!("{path}{key}: must be a list")),
    }
}

fn string_map(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<std::collections::HashMap<String, String>, String> {
    let mut out = std::collections::HashMap::new();
    if let Some(value) = object.get(key) {
        for (k, v) in self::object(value, &format!("{path}{key}"))? {
            match v {
                Value::String(s) => out.insert(k.clone(), s.clone()),
                other => out.insert(k.clone(), other.to_string()),
            };
        }
    }
    Ok(out)
}

/// One `kind: Template` document, as JSON, into the proto.
pub fn from_json(document: &Value) -> Result<pb::Template, String> {
    let root = object(document, "the document")?;
    only(
        root,
        &[
            "kind",
            "name",
            "description",
            "default_locale",
            "products",
            "sample_data",
            "variants",
        ],
        "",
    )?;
    if root.get("kind").and_then(Value::as_str) != Some("Template") {
        return Err("kind: must be Template".into());
    }
    let mut template = pb::Template {
        name: text(root, "name", "")?,
        description: text(root, "description", "")?,
        default_locale: text(root, "default_locale", "")?,
        ..Default::default()
    };
    if let Some(products) = root.get("products") {
        template.products = Some(products_from_json(object(products, "products")?)?);
    }
    if let Some(sample) = root.get("sample_data") {
        object(sample, "sample_data")?;
        template.sample_data = Some(json_to_struct(sample));
    }
    let variants = root
        .get("variants")
        .and_then(Value::as_array)
        .ok_or("variants: a list of locales is required")?;
    for (i, variant) in variants.iter().enumerate() {
        let path = format!("variants[{i}].");
        template
            .variants
            .push(variant_from_json(object(variant, &path)?, &path)?);
    }
    Ok(template)
}

fn products_from_json(products: &Map<String, Value>) -> Result<pb::TemplateProducts, String> {
    let path = "products.";
    only(
        products,
        &["placement", "n", "context_path", "fallback", "timeout_ms"],
        path,
    )?;
    let mut out = pb::TemplateProducts {
        context_path: text(products, "context_path", path)?,
        ..Default::default()
    };
    let placement = text(products, "placement", path)?;
    if !placement.is_empty() {
        let name = format!("PLACEMENT_{}", placement.to_ascii_uppercase());
        out.placement = pb::Placement::from_str_name(&name)
            .ok_or_else(|| format!("{path}placement: {placement:?} is not a placement"))?
            as i32;
    }
    if let Some(n) = products.get("n") {
        out.n = n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{path}n: must be a whole number"))?;
    }
    let fallback = text(products, "fallback", path)?;
    if !fallback.is_empty() {
        let name = format!("PRODUCTS_FALLBACK_{}", fallback.to_ascii_uppercase());
        out.fallback = pb::ProductsFallback::from_str_name(&name)
            .ok_or_else(|| format!("{path}fallback: {fallback:?} is not trending or omit"))?
            as i32;
    }
    if let Some(ms) = products.get("timeout_ms") {
        let ms = ms
            .as_u64()
            .ok_or_else(|| format!("{path}timeout_ms: must be a whole number"))?;
        out.timeout = Some(prost_types::Duration {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        });
    }
    Ok(out)
}

fn variant_from_json(
    variant: &Map<String, Value>,
    path: &str,
) -> Result<pb::TemplateVariant, String> {
    only(
        variant,
        &[
            "locale",
            "direction",
            "push",
            "email",
            "sms",
            "whatsapp",
            "in_app",
        ],
        path,
    )?;
    let mut content = pb::MessageContent::default();
    if let Some(push) = variant.get("push") {
        let p = format!("{path}push.");
        let push = object(push, &p)?;
        only(
            push,
            &["title", "body", "image_url", "url", "data", "collapse_key"],
            &p,
        )?;
        content.push = Some(pb::PushContent {
            title: text(push, "title", &p)?,
            body: text(push, "body", &p)?,
            image_url: text(push, "image_url", &p)?,
            url: text(push, "url", &p)?,
            data: string_map(push, "data", &p)?,
            collapse_key: text(push, "collapse_key", &p)?,
        });
    }
    if let Some(email) = variant.get("email") {
        let p = format!("{path}email.");
        let email = object(email, &p)?;
        only(
            email,
            &[
                "subject",
                "preheader",
                "html",
                "text",
                "from_name",
                "reply_to",
            ],
            &p,
        )?;
        content.email = Some(pb::EmailContent {
            subject: text(email, "subject", &p)?,
            preheader: text(email, "preheader", &p)?,
            html: text(email, "html", &p)?,
            text: text(email, "text", &p)?,
            from_name: text(email, "from_name", &p)?,
            reply_to: text(email, "reply_to", &p)?,
        });
    }
    if let Some(sms) = variant.get("sms") {
        let p = format!("{path}sms.");
        let sms = object(sms, &p)?;
        only(sms, &["body"], &p)?;
        content.sms = Some(pb::SmsContent {
            body: text(sms, "body", &p)?,
        });
    }
    if let Some(whatsapp) = variant.get("whatsapp") {
        let p = format!("{path}whatsapp.");
        let whatsapp = object(whatsapp, &p)?;
        only(
            whatsapp,
            &[
                "template_name",
                "language",
                "header_image_url",
                "body_parameters",
                "button_url_parameters",
            ],
            &p,
        )?;
        content.whatsapp = Some(pb::WhatsAppContent {
            template_name: text(whatsapp, "template_name", &p)?,
            language: text(whatsapp, "language", &p)?,
            header_image_url: text(whatsapp, "header_image_url", &p)?,
            body_parameters: texts(whatsapp, "body_parameters", &p)?,
            button_url_parameters: texts(whatsapp, "button_url_parameters", &p)?,
        });
    }
    if let Some(in_app) = variant.get("in_app") {
        let p = format!("{path}in_app.");
        let in_app = object(in_app, &p)?;
        only(in_app, &["title", "body", "image_url", "url", "data"], &p)?;
        content.in_app = Some(pb::InAppContent {
            title: text(in_app, "title", &p)?,
            body: text(in_app, "body", &p)?,
            image_url: text(in_app, "image_url", &p)?,
            url: text(in_app, "url", &p)?,
            data: string_map(in_app, "data", &p)?,
            ..Default::default()
        });
    }
    let direction = match text(variant, "direction", path)?.as_str() {
        "" => pb::TextDirection::Unspecified,
        "ltr" => pb::TextDirection::Ltr,
        "rtl" => pb::TextDirection::Rtl,
        other => return Err(format!("{path}direction: {other:?} is not ltr or rtl")),
    };
    Ok(pb::TemplateVariant {
        locale: text(variant, "locale", path)?,
        direction: direction as i32,
        content: Some(content),
    })
}

/// The channels a template has content for, in the proto's order (for the README's lines).
#[cfg(test)]
pub fn channels(template: &pb::Template) -> Vec<pb::Channel> {
    let mut out = Vec::new();
    for variant in &template.variants {
        let Some(content) = &variant.content else {
            continue;
        };
        let present = [
            (content.push.is_some(), pb::Channel::Push),
            (content.email.is_some(), pb::Channel::Email),
            (content.sms.is_some(), pb::Channel::Sms),
            (content.whatsapp.is_some(), pb::Channel::Whatsapp),
            (content.in_app.is_some(), pb::Channel::InApp),
        ];
        for (is, channel) in present {
            if is && !out.contains(&channel) {
                out.push(channel);
            }
        }
    }
    out.sort_by_key(|c| *c as i32);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The workspace root (tests run in the crate's directory).
    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn templates() -> BTreeMap<String, pb::Template> {
        let mut by_name = BTreeMap::new();
        for document in load_dir(&root().join("examples/templates")).expect("templates load") {
            let name = document.template.name.clone();
            assert!(
                by_name.insert(name.clone(), document.template).is_none(),
                "{name} is defined twice"
            );
        }
        by_name
    }

    /// Every template a flow or broadcast of examples/flows sends.
    fn used_templates() -> BTreeSet<String> {
        let mut used = BTreeSet::new();
        let dir = root().join("examples/flows");
        for entry in std::fs::read_dir(&dir).expect("examples/flows") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for yaml in relance_kit::yaml::split_documents(&text) {
                if yaml.contains("kind: Broadcast") {
                    let def = relance_campaigns::domain::parse::parse_broadcast(&yaml)
                        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                    used.extend(def.template.clone());
                    used.extend(def.variants.iter().map(|v| v.template.clone()));
                } else {
                    let def = relance_campaigns::domain::parse::parse_flow(&yaml)
                        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                    used.extend(def.templates().into_iter().map(str::to_owned));
                }
            }
        }
        used
    }

    #[test]
    fn every_template_the_example_flows_send_is_defined_and_valid() {
        let templates = templates();
        let used = used_templates();
        assert_eq!(used.len(), 21, "the README lists 21 templates: {used:?}");
        for name in &used {
            let template = templates.get(name).unwrap_or_else(|| {
                panic!("{name} is sent by a flow but not in examples/templates")
            });
            if let Err(errors) = relance_delivery::domain::template::compile(template) {
                panic!("{name} is refused by delivery: {errors:#?}");
            }
        }
        let unused: Vec<&String> = templates.keys().filter(|n| !used.contains(*n)).collect();
        assert!(unused.is_empty(), "templates no flow sends: {unused:?}");
    }

    /// The README's line for each template names its channels and whether it shows
    /// products: the files must agree.
    #[test]
    fn templates_have_the_channels_and_products_the_flows_readme_lists() {
        let templates = templates();
        let readme =
            std::fs::read_to_string(root().join("examples/flows/README.md")).expect("README");
        let mut listed = 0;
        for line in readme.lines() {
            let Some(rest) = line.strip_prefix("- `") else {
                continue;
            };
            let Some((name, rest)) = rest.split_once("` — ") else {
                continue;
            };
            let Some((channels, what)) = rest.split_once(" — ") else {
                continue;
            };
            listed += 1;
            let template = templates
                .get(name)
                .unwrap_or_else(|| panic!("{name} is listed in the README but not defined"));
            let expected: Vec<String> = channels.split(", ").map(str::to_owned).collect();
            let actual: Vec<String> = channels_of(template);
            assert_eq!(actual, expected, "{name}: channels");
            // "with similar products", "three recommended products": the line promises
            // a products block (others may have one too, e.g. "picked for you").
            if what.contains("products") {
                assert!(
                    template.products.is_some(),
                    "{name}: no products block ({what})"
                );
            }
        }
        assert_eq!(listed, 21);
    }

    fn channels_of(template: &pb::Template) -> Vec<String> {
        channels(template)
            .into_iter()
            .map(|c| relance_delivery::channels::channel_name(c).to_owned())
            .collect()
    }

    #[test]
    fn the_campaign_segments_parse() {
        let text = std::fs::read_to_string(root().join("examples/segments/campaigns.yaml"))
            .expect("campaigns.yaml");
        let mut names = Vec::new();
        for yaml in relance_kit::yaml::split_documents(&text) {
            let definition = relance_segmentation::domain::parse::parse_definition(&yaml)
                .unwrap_or_else(|e| panic!("{e:?}"));
            names.push(definition.name);
        }
        assert_eq!(
            names,
            [
                "lapsed-30d",
                "lapsed-60d",
                "lapsed-90d",
                "vip",
                "active-buyers"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let document = serde_json::json!({
            "kind": "Template", "name": "x", "default_locale": "en",
            "variants": [ { "locale": "en", "push": { "titel": "Hi" } } ],
        });
        let error = from_json(&document).expect_err("refused");
        assert!(
            error.starts_with("variants[0].push.titel: unknown field"),
            "{error}"
        );
    }
}
