//! Catalog items and their validation.

use chrono::{DateTime, Utc};
use relance_kit::ApiError;

use super::model::ItemFacts;

/// Longest item id.
pub const MAX_ID_LEN: usize = 128;
const MAX_TITLE_LEN: usize = 500;
const MAX_CATEGORY_DEPTH: usize = 8;
const MAX_TAGS: usize = 50;
const MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;

/// A catalog item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub title: String,
    pub category_path: Vec<String>,
    pub brand: String,
    pub price: f64,
    pub currency: String,
    pub in_stock: bool,
    pub stock: Option<i64>,
    pub tags: Vec<String>,
    /// `None`: keep the stored one, or now for a new item.
    pub created_at: Option<DateTime<Utc>>,
    pub url: String,
    pub image_url: String,
    pub replenishable: bool,
    pub attributes: serde_json::Value,
}

/// Checks an item id; `field` names it in the error.
pub fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if id.chars().count() > MAX_ID_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl Item {
    /// Checks every field; `prefix` is the item's path in the request (`items[3]`).
    pub fn validate(&self, prefix: &str) -> Result<(), ApiError> {
        let field = |name: &str| format!("{prefix}.{name}");
        check_id(&field("id"), &self.id)?;
        if self.title.chars().count() > MAX_TITLE_LEN {
            return Err(ApiError::invalid(
                field("title"),
                format!("must be at most {MAX_TITLE_LEN} characters"),
            ));
        }
        if self.category_path.len() > MAX_CATEGORY_DEPTH {
            return Err(ApiError::invalid(
                field("category_path"),
                format!("must have at most {MAX_CATEGORY_DEPTH} levels"),
            ));
        }
        for (level, name) in self.category_path.iter().enumerate() {
            if name.trim().is_empty() || name.contains(" > ") {
                return Err(ApiError::invalid(
                    format!("{prefix}.category_path[{level}]"),
                    "must be a non-empty name without ` > `",
                ));
            }
        }
        if !self.price.is_finite() || self.price < 0.0 {
            return Err(ApiError::invalid(field("price"), "must be a number ≥ 0"));
        }
        if !self.currency.is_empty()
            && (self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()))
        {
            return Err(ApiError::invalid(
                field("currency"),
                "must be an ISO 4217 code such as EUR or DZD",
            ));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(ApiError::invalid(
                field("tags"),
                format!("must have at most {MAX_TAGS} tags"),
            ));
        }
        let attributes = serde_json::to_vec(&self.attributes).unwrap_or_default();
        if attributes.len() > MAX_ATTRIBUTES_BYTES {
            return Err(ApiError::invalid(
                field("attributes"),
                "must be at most 8 KiB once encoded as JSON",
            ));
        }
        Ok(())
    }

    /// Whether it can be recommended as in stock: `stock` 0 wins over `in_stock`.
    pub fn available(&self) -> bool {
        self.in_stock && self.stock != Some(0)
    }

    /// What ranking needs of it.
    pub fn facts(&self, created_at: DateTime<Utc>, deleted: bool) -> ItemFacts {
        ItemFacts {
            category: self.category_path.clone(),
            brand: self.brand.clone(),
            price: self.price,
            in_stock: self.available(),
            replenishable: self.replenishable,
            created_at: created_at.timestamp(),
            deleted,
        }
    }
}

/// Reads an item from a catalog event's properties (`catalog_item_updated`): the same
/// fields as the API's `CatalogItem`, in JSON.
pub fn item_from_json(properties: &serde_json::Value) -> Result<Item, ApiError> {
    let object = properties
        .as_object()
        .ok_or_else(|| ApiError::invalid("properties", "must be an object"))?;
    let text = |name: &str| -> Result<String, ApiError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(serde_json::Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(ApiError::invalid(
                format!("properties.{name}"),
                "must be a string",
            )),
        }
    };
    let texts = |name: &str| -> Result<Vec<String>, ApiError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(values)) => {
                let mut out = Vec::with_capacity(values.len());
                for (index, value) in values.iter().enumerate() {
                    match value.as_str() {
                        Some(text) => out.push(text.to_owned()),
                        None => {
                            return Err(ApiError::invalid(
                                format!("properties.{name}[{index}]"),
                                "must be a string",
                            ));
                        }
                    }
                }
                Ok(out)
            }
            Some(_) => Err(ApiError::invalid(
                format!("properties.{name}"),
                "must be a list of strings",
            )),
        }
    };
    let price = match object.get("price") {
        None => 0.0,
        Some(value) => value
            .as_f64()
            .ok_or_else(|| ApiError::invalid("properties.price", "must be a number"))?,
    };
    let flag = |name: &str, default: bool| -> Result<bool, ApiError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| {
                ApiError::invalid(format!("properties.{name}"), "must be true or false")
            }),
        }
    };
    let stock =
        match object.get("stock") {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => Some(value.as_i64().filter(|s| *s >= 0).ok_or_else(|| {
                ApiError::invalid("properties.stock", "must be a whole number ≥ 0")
            })?),
        };
    let id = match object.get("id").or_else(|| object.get("product_id")) {
        Some(serde_json::Value::String(id)) => id.clone(),
        _ => {
            return Err(ApiError::invalid(
                "properties.id",
                "is required (the item's id, a string)",
            ));
        }
    };
    let item = Item {
        id,
        title: text("title")?,
        category_path: texts("category_path")?,
        brand: text("brand")?,
        price,
        currency: text("currency")?,
        in_stock: flag("in_stock", true)?,
        stock,
        tags: texts("tags")?,
        created_at: None,
        url: text("url")?,
        image_url: text("image_url")?,
        replenishable: flag("replenishable", false)?,
        attributes: object
            .get("attributes")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
    };
    item.validate("properties")?;
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item {
            id: "85123A".into(),
            title: "White hanging heart t-light holder".into(),
            category_path: vec!["Home".into(), "Candles".into()],
            brand: String::new(),
            price: 2.55,
            currency: "GBP".into(),
            in_stock: true,
            stock: None,
            tags: vec![],
            created_at: None,
            url: String::new(),
            image_url: String::new(),
            replenishable: false,
            attributes: serde_json::json!({}),
        }
    }

    #[test]
    fn names_the_field_at_fault() {
        let mut bad = item();
        bad.price = -1.0;
        assert_eq!(
            bad.validate("items[2]").expect_err("negative").to_string(),
            "items[2].price: must be a number ≥ 0"
        );
        let mut bad = item();
        bad.category_path = vec!["Home".into(), " ".into()];
        assert!(
            bad.validate("items[0]")
                .expect_err("blank")
                .to_string()
                .starts_with("items[0].category_path[1]")
        );
        let mut bad = item();
        bad.currency = "euro".into();
        assert!(bad.validate("items[0]").is_err());
        assert!(item().validate("items[0]").is_ok());
    }

    #[test]
    fn stock_zero_means_unavailable() {
        let mut sold_out = item();
        sold_out.stock = Some(0);
        assert!(!sold_out.available());
        assert!(item().available());
    }

    #[test]
    fn reads_catalog_events() {
        let parsed = item_from_json(&serde_json::json!({
            "id": "A1", "title": "Mug", "price": 4.5, "category_path": ["Home", "Kitchen"],
            "in_stock": false, "stock": 3
        }))
        .expect("valid");
        assert_eq!(parsed.id, "A1");
        assert!(!parsed.in_stock);
        assert_eq!(parsed.stock, Some(3));
        let error = item_from_json(&serde_json::json!({ "id": "A1", "price": "cheap" }))
            .expect_err("price");
        assert_eq!(error.to_string(), "properties.price: must be a number");
        assert!(item_from_json(&serde_json::json!({ "title": "no id" })).is_err());
    }
}
