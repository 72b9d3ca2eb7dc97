//! Deterministic, realistic-looking events: product views, cart updates and orders of a shop
//! with ~100k customers and a few thousand products.
//!
//! The same seed gives the same events, so the gRPC scenario and the raw Postgres baseline
//! store exactly the same rows (only the timestamps move with the moment the run starts).

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use relance_kit::{Clock as _, SystemClock};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct, struct_to_json};
use relance_proto::v1 as pb;
use serde_json::json;

/// How the generated traffic looks.
#[derive(Debug, Clone, clap::Args)]
pub struct Shape {
    /// Distinct known customers the events are spread over.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u32,
    /// Distinct products in the catalogue.
    #[arg(long, default_value_t = 5_000)]
    pub products: u32,
    /// Share of events sent by anonymous visitors only (no customer id): storefront browsing
    /// before sign-in. These take the service's identity-lock path.
    #[arg(long, default_value_t = 0.1)]
    pub anonymous_share: f64,
}

/// One event in plain form, convertible to the proto (gRPC) and to table columns (SQL).
#[derive(Debug, Clone)]
pub struct GenEvent {
    pub message_id: String,
    pub name: &'static str,
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub timestamp: DateTime<Utc>,
    /// Already normalised the way the service stores it (whole numbers as integers).
    pub properties: serde_json::Value,
    pub context: Vec<(&'static str, String)>,
}

impl GenEvent {
    /// The event as sent to `Track` / `TrackBatch`.
    pub fn to_proto(&self) -> pb::Event {
        pb::Event {
            message_id: self.message_id.clone(),
            name: self.name.to_owned(),
            customer_id: self.customer_id.clone().unwrap_or_default(),
            anonymous_id: self.anonymous_id.clone().unwrap_or_default(),
            timestamp: Some(chrono_to_timestamp(self.timestamp)),
            properties: Some(json_to_struct(&self.properties)),
            context: self
                .context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    /// The context as the JSON object the service stores.
    pub fn context_json(&self) -> String {
        let mut map = serde_json::Map::new();
        for (key, value) in &self.context {
            map.insert((*key).to_owned(), serde_json::Value::String(value.clone()));
        }
        serde_json::Value::Object(map).to_string()
    }
}

const CURRENCIES: &[&str] = &["EUR", "EUR", "EUR", "DZD", "GBP", "USD"];
const CATEGORIES: &[&str] = &[
    "home",
    "kitchen",
    "garden",
    "toys",
    "stationery",
    "lighting",
    "gifts",
];
const CHANNELS: &[&str] = &["web", "web", "ios", "android"];
const LOCALES: &[&str] = &["fr-FR", "fr-DZ", "ar-DZ", "en-GB", "en-US"];
const CAMPAIGNS: &[&str] = &["", "", "", "spring-sale", "newsletter-42", "cart-reminder"];

/// Produces events from a seed.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    shape: Shape,
    /// Event times lie in the ten minutes before this.
    anchor: DateTime<Utc>,
}

/// The machine's time (through the kit's clock, like everything else in the workspace).
pub fn now() -> DateTime<Utc> {
    SystemClock.now()
}

impl Generator {
    /// A generator for `seed`, with event times just before `anchor`.
    pub fn new(seed: u64, shape: Shape, anchor: DateTime<Utc>) -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(seed),
            shape,
            anchor,
        }
    }

    /// `count` events.
    pub fn take(&mut self, count: usize) -> Vec<GenEvent> {
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            events.push(self.next_event());
        }
        events
    }

    /// The next event: 60% product views, 25% cart updates, 15% completed orders.
    pub fn next_event(&mut self) -> GenEvent {
        let message_id = uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string();
        let roll: f64 = self.rng.random();
        let (name, properties) = if roll < 0.60 {
            ("product_viewed", self.product_viewed())
        } else if roll < 0.85 {
            ("cart_updated", self.cart_updated())
        } else {
            ("order_completed", self.order_completed())
        };
        // Browsing can be anonymous; buying needs an account.
        let anonymous = name == "product_viewed"
            && self
                .rng
                .random_bool((self.shape.anonymous_share / 0.6).clamp(0.0, 1.0));
        let (customer_id, anonymous_id) = if anonymous {
            (None, Some(format!("anon-{:08x}", self.rng.random::<u32>())))
        } else {
            (
                Some(format!(
                    "cust-{:06}",
                    self.rng.random_range(0..self.shape.customers.max(1))
                )),
                None,
            )
        };
        let timestamp = self.anchor - Duration::milliseconds(self.rng.random_range(0..600_000));
        let mut context = vec![
            ("app", "relance-shop".to_owned()),
            ("channel", self.pick(CHANNELS).to_owned()),
            ("locale", self.pick(LOCALES).to_owned()),
        ];
        let campaign = self.pick(CAMPAIGNS);
        if !campaign.is_empty() {
            context.push(("campaign", campaign.to_owned()));
        }
        GenEvent {
            message_id,
            name,
            customer_id,
            anonymous_id,
            timestamp,
            // Round-trip through the proto Struct so that the baseline stores the same JSON
            // the service stores (whole prices become integers there).
            properties: struct_to_json(&json_to_struct(&properties)),
            context,
        }
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.rng.random_range(0..choices.len())]
    }

    fn product_id(&mut self) -> String {
        format!(
            "SKU-{:05}",
            self.rng.random_range(0..self.shape.products.max(1))
        )
    }

    fn price(&mut self) -> f64 {
        f64::from(self.rng.random_range(150..20_000u32)) / 100.0
    }

    /// 1 to 5 order lines.
    fn items(&mut self) -> (Vec<serde_json::Value>, f64) {
        let lines = self.rng.random_range(1..=5);
        let mut items = Vec::with_capacity(lines);
        let mut total = 0.0;
        for _ in 0..lines {
            let quantity = self.rng.random_range(1..=6u32);
            let price = self.price();
            total += f64::from(quantity) * price;
            items.push(
                json!({ "product_id": self.product_id(), "quantity": quantity, "price": price }),
            );
        }
        (items, (total * 100.0).round() / 100.0)
    }

    fn product_viewed(&mut self) -> serde_json::Value {
        json!({
            "product_id": self.product_id(),
            "price": self.price(),
            "currency": self.pick(CURRENCIES),
            "category": self.pick(CATEGORIES),
        })
    }

    fn cart_updated(&mut self) -> serde_json::Value {
        let (items, value) = self.items();
        json!({
            "cart_id": format!("cart-{:08x}", self.rng.random::<u32>()),
            "items": items,
            "value": value,
            "currency": self.pick(CURRENCIES),
        })
    }

    fn order_completed(&mut self) -> serde_json::Value {
        let (items, revenue) = self.items();
        json!({
            "order_id": format!("ord-{:010}", self.rng.random::<u32>()),
            "revenue": revenue,
            "currency": self.pick(CURRENCIES),
            "items": items,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            customers: 100_000,
            products: 5_000,
            anonymous_share: 0.1,
        }
    }

    #[test]
    fn same_seed_same_events() {
        let anchor = now();
        let a = Generator::new(7, shape(), anchor).take(50);
        let b = Generator::new(7, shape(), anchor).take(50);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.message_id, y.message_id);
            assert_eq!(x.properties, y.properties);
        }
    }

    #[test]
    fn events_are_valid_and_mixed() {
        let events = Generator::new(1, shape(), now()).take(10_000);
        let orders = events
            .iter()
            .filter(|e| e.name == "order_completed")
            .count();
        let anonymous = events.iter().filter(|e| e.customer_id.is_none()).count();
        assert!((1_000..2_000).contains(&orders), "{orders}");
        assert!((700..1_300).contains(&anonymous), "{anonymous}");
        for event in &events {
            assert!(event.customer_id.is_some() || event.anonymous_id.is_some());
            if event.name == "order_completed" {
                let lines = event.properties["items"].as_array().map_or(0, Vec::len);
                assert!((1..=5).contains(&lines));
            }
        }
    }
}
