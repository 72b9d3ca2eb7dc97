//! How purchase events change a customer's traits.

use chrono::{DateTime, Utc};

/// What one purchase event does to the traits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PurchaseEffect {
    /// `order_completed`: one more order worth `revenue`.
    Order { revenue: f64, at: DateTime<Utc> },
    /// `order_refunded`: `amount` given back (positive).
    Refund { amount: f64 },
}

/// The effect of an event, if it is a purchase event.
///
/// The amount is the `revenue` property when present, else the sum of
/// `items[].price × items[].quantity` (quantity 1 when absent).
pub fn effect_of(
    name: &str,
    properties: &serde_json::Value,
    at: DateTime<Utc>,
) -> Option<PurchaseEffect> {
    let amount = || -> f64 {
        if let Some(revenue) = properties
            .get("revenue")
            .and_then(serde_json::Value::as_f64)
        {
            return revenue;
        }
        let mut sum = 0.0;
        if let Some(items) = properties
            .get("items")
            .and_then(serde_json::Value::as_array)
        {
            for item in items {
                let price = item
                    .get("price")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0);
                let quantity = item
                    .get("quantity")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(1.0);
                sum += price * quantity;
            }
        }
        sum
    };
    match name {
        "order_completed" => Some(PurchaseEffect::Order {
            revenue: amount(),
            at,
        }),
        "order_refunded" => Some(PurchaseEffect::Refund {
            amount: amount().abs(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revenue_comes_from_the_property_or_the_items() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
        let explicit = serde_json::json!({"revenue": 42.5, "items": [{"price": 1, "quantity": 1}]});
        assert_eq!(
            effect_of("order_completed", &explicit, at),
            Some(PurchaseEffect::Order { revenue: 42.5, at })
        );
        let items = serde_json::json!({"items": [{"price": 2.5, "quantity": 4}, {"price": 1}]});
        assert_eq!(
            effect_of("order_completed", &items, at),
            Some(PurchaseEffect::Order { revenue: 11.0, at })
        );
    }

    #[test]
    fn refunds_are_positive_amounts_and_other_events_do_nothing() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
        let refund = serde_json::json!({"revenue": -15.0});
        assert_eq!(
            effect_of("order_refunded", &refund, at),
            Some(PurchaseEffect::Refund { amount: 15.0 })
        );
        assert_eq!(effect_of("product_viewed", &refund, at), None);
    }
}
